"""The arrival-monitor files: control, receipt and thank-you (protocol version 1).

Where they live, on the target host, for a receiving stream with incoming area *I*
(``[incoming] incoming_dir``, default ``<directory>/.mstm-incoming``)::

    I/<batch>/<path>...            the batch's data, pushed by the sender first
    I/<batch>.<control_ext>        then the control file (temp name starting with "." + rename)
    I/<batch>.<receipt_ext>        the receiver's answer (temp + rename)
    I/<batch>.<thanks_ext>         the sender's "got it": the receiver then removes the rest

Every name the receiver writes or deletes is derived from ``<batch>`` (which matches
:data:`BATCH_RE`) and the configured extensions, never from a file's content: a peer
cannot choose the name of a file we write or delete (MiStaMover defect 13).

Control file (ASCII, LF line endings, nothing else)::

    mstm-control 1
    batch <batch>
    algorithm sha256
    receipt <batch>.<receipt_ext>
    item <size> <hexdigest> <path>
    ...
    end

Receipt::

    mstm-receipt 1
    batch <batch>
    item <status> <path>
    ...
    end

Thank-you::

    mstm-thanks 1
    batch <batch>
    end

``<path>`` is the item's path relative to the batch directory (and to the published
directory), percent-encoded: every byte outside 0x21-0x7E, and "%" itself, is written
``%XX`` with upper-case hex digits, and nothing else is encoded, so each path has
exactly one spelling.  Decoded, it is a relative path with no empty, "." or ".."
component and no NUL.  ``<size>`` is a decimal number without leading zeros,
``<hexdigest>`` lower-case hex of the algorithm's length.

The readers are strict: anything else (unknown version or algorithm, a missing
``end``, a duplicate path, a wrong receipt name, a byte too many) raises
:class:`ProtocolError`, and nothing else; every input is hostile until parsed.
"""

from __future__ import annotations

import enum
import os
import re
import secrets
import time
from collections.abc import Iterable
from dataclasses import dataclass

VERSION = 1

CONTROL_MAGIC = "mstm-control"
RECEIPT_MAGIC = "mstm-receipt"
THANKS_MAGIC = "mstm-thanks"

MAX_ITEMS = 1_000_000
MAX_SIZE = (1 << 63) - 1
MAX_THANKS_BYTES = 4096
# Linux limits: a longer name could never be created, so it is a malformed file.
NAME_MAX = 255
PATH_MAX = 4095

# Algorithms a control file may name, and the length of their hex digests.
ALGORITHMS: dict[str, int] = {"sha256": 64}

BATCH_RE: re.Pattern[str] = re.compile(r"\A[0-9A-Za-z][0-9A-Za-z_-]{0,63}\Z")
_EXT_RE = re.compile(r"\A[0-9A-Za-z][0-9A-Za-z_.-]{0,63}\Z")
SIZE_RE = re.compile(r"\A(?:0|[1-9][0-9]{0,18})\Z")
_HEX_RE = re.compile(r"\A[0-9a-f]+\Z")
# A canonical encoded path: visible ASCII except "%", or %XX in upper case.
_ENCODED_RE = re.compile(r"\A(?:[!-$&-~]|%[0-9A-F]{2})+\Z")


class ProtocolError(ValueError):
    """A control, receipt or thank-you file (or a value for one) that breaks the rules."""


# --------------------------------------------------------------------------- names


# The exact shape of the names new_batch_id() makes.  Only a directory named like this is
# ever taken for an abandoned batch and removed (BATCH_RE accepts any peer's batch names).
OUR_BATCH_RE: re.Pattern[str] = re.compile(r"\A[0-9]{8}T[0-9]{12}-[0-9a-f]{12}\Z")


def new_batch_id() -> str:
    """A fresh batch name: UTC time to the microsecond and 48 random bits."""
    now = time.time()
    stamp = time.strftime("%Y%m%dT%H%M%S", time.gmtime(now))
    micro = int((now % 1) * 1_000_000)
    return f"{stamp}{micro:06d}-{secrets.token_hex(6)}"


def check_batch(batch: str) -> str:
    if not isinstance(batch, str) or not BATCH_RE.match(batch):
        raise ProtocolError(f"invalid batch name {batch!r}")
    return batch


def check_extension(ext: str) -> str:
    if not isinstance(ext, str) or not _EXT_RE.match(ext):
        raise ProtocolError(f"invalid file extension {ext!r}")
    return ext


def file_names(batch: str, *, control_ext: str, receipt_ext: str,
               thanks_ext: str) -> tuple[str, str, str]:
    """The control, receipt and thank-you file names of *batch* (in the incoming area)."""
    check_batch(batch)
    for ext in (control_ext, receipt_ext, thanks_ext):
        check_extension(ext)
    return f"{batch}.{control_ext}", f"{batch}.{receipt_ext}", f"{batch}.{thanks_ext}"


# --------------------------------------------------------------------------- paths


def check_path(relpath: str) -> str:
    """*relpath* if it is safe to use under a directory, else :class:`ProtocolError`.

    Safe: relative, every component non-empty and neither "." nor "..", no NUL, and
    within the kernel's name and path length limits.
    """
    if not isinstance(relpath, str):
        raise ProtocolError(f"path is not text: {relpath!r}")
    try:
        raw = os.fsencode(relpath)
    except UnicodeError:
        raise ProtocolError(f"path cannot be encoded: {relpath!r}") from None
    if not raw:
        raise ProtocolError("empty path")
    if b"\0" in raw:
        raise ProtocolError(f"NUL in path {relpath!r}")
    if raw.startswith(b"/"):
        raise ProtocolError(f"absolute path {relpath!r}")
    if len(raw) > PATH_MAX:
        raise ProtocolError(f"path longer than {PATH_MAX} bytes")
    for part in raw.split(b"/"):
        if part in (b"", b".", b".."):
            raise ProtocolError(f"unsafe path {relpath!r} (empty, '.' or '..' component)")
        if len(part) > NAME_MAX:
            raise ProtocolError(f"a component of {relpath!r} is longer than {NAME_MAX} bytes")
    return relpath


def _quote(raw: bytes) -> str:
    out = []
    for byte in raw:
        if 0x21 <= byte <= 0x7E and byte != 0x25:
            out.append(chr(byte))
        else:
            out.append(f"%{byte:02X}")
    return "".join(out)


def _unquote(text: str) -> bytes:
    if not _ENCODED_RE.match(text):
        raise ProtocolError(f"badly encoded path {text[:200]!r}")
    if "%" not in text:
        return text.encode("ascii")
    out = bytearray()
    i, n = 0, len(text)
    while i < n:
        c = text[i]
        if c == "%":
            out.append(int(text[i + 1:i + 3], 16))
            i += 3
        else:
            out.append(ord(c))
            i += 1
    raw = bytes(out)
    if _quote(raw) != text:  # e.g. %41 for "A": one spelling per path
        raise ProtocolError(f"path not in canonical encoding: {text[:200]!r}")
    return raw


def encode_path(relpath: str) -> str:
    """The protocol spelling of *relpath* (a surrogate-escaped str, as os.fsdecode gives).

    Raises :class:`ProtocolError` if the path is unsafe (see :func:`check_path`).
    """
    check_path(relpath)
    return _quote(os.fsencode(relpath))


def decode_path(text: str) -> str:
    """The relative path spelt *text*, as a surrogate-escaped str; ProtocolError if unsafe."""
    return check_path(os.fsdecode(_unquote(text)))


def _path_on_line(text: str, what: str, n: int) -> str:
    """decode_path, its error naming the file and the line."""
    try:
        return decode_path(text)
    except ProtocolError as err:
        raise ProtocolError(f"{what}: line {n}: {err}") from None


# --------------------------------------------------------------------------- control


@dataclass(frozen=True)
class ControlItem:
    relpath: str
    size: int
    digest: str


@dataclass(frozen=True)
class Control:
    batch: str
    algorithm: str
    receipt: str
    items: tuple[ControlItem, ...]
    # empty directories of directory items ("dir <path>" lines): the receiver creates
    # them (merged, never through a link) and answers each like an item
    dirs: tuple[str, ...] = ()


def _check_receipt_name(batch: str, receipt: str) -> None:
    prefix = batch + "."
    if not (isinstance(receipt, str) and receipt.startswith(prefix)):
        raise ProtocolError(f"receipt name {receipt!r} is not {batch}.<extension>")
    check_extension(receipt[len(prefix):])


def render_control(c: Control) -> bytes:
    """The control file for *c*; ProtocolError if *c* breaks a rule."""
    check_batch(c.batch)
    width = ALGORITHMS.get(c.algorithm)
    if width is None:
        raise ProtocolError(f"unknown algorithm {c.algorithm!r}")
    _check_receipt_name(c.batch, c.receipt)
    if len(c.items) > MAX_ITEMS:
        raise ProtocolError(f"more than {MAX_ITEMS} items in one control file")
    lines = [f"{CONTROL_MAGIC} {VERSION}", f"batch {c.batch}", f"algorithm {c.algorithm}",
             f"receipt {c.receipt}"]
    seen: set[str] = set()
    for item in c.items:
        if type(item.size) is not int or not 0 <= item.size <= MAX_SIZE:
            raise ProtocolError(f"bad size {item.size!r} for {item.relpath!r}")
        if len(item.digest) != width or not _HEX_RE.match(item.digest):
            raise ProtocolError(f"bad {c.algorithm} digest {item.digest!r}")
        if item.relpath in seen:
            raise ProtocolError(f"path {item.relpath!r} listed twice")
        seen.add(item.relpath)
        lines.append(f"item {item.size} {item.digest} {encode_path(item.relpath)}")
    if len(c.items) + len(c.dirs) > MAX_ITEMS:
        raise ProtocolError(f"more than {MAX_ITEMS} items in one control file")
    for d in c.dirs:
        if d in seen:
            raise ProtocolError(f"path {d!r} listed twice")
        seen.add(d)
        lines.append(f"dir {encode_path(d)}")
    lines.append("end")
    return ("\n".join(lines) + "\n").encode("ascii")


def _lines(data: bytes, what: str, max_bytes: int) -> list[str]:
    """The lines of a file that must be ASCII, LF-terminated, and at most *max_bytes*."""
    if not isinstance(data, bytes | bytearray | memoryview):
        raise ProtocolError(f"{what}: not bytes")
    data = bytes(data)
    if len(data) > max_bytes:
        raise ProtocolError(f"{what} larger than {max_bytes} bytes")
    if not data.isascii():
        raise ProtocolError(f"{what}: not ASCII")
    if not data.endswith(b"\n"):
        raise ProtocolError(f"{what}: missing 'end' (or final newline)")
    text = data.decode("ascii")
    lines = text[:-1].split("\n")
    if lines[-1] != "end":
        raise ProtocolError(f"{what}: missing 'end'")
    return lines


def _header(lines: list[str], what: str, magic: str) -> None:
    first = lines[0]
    word, sep, version = first.partition(" ")
    if word != magic or not sep:
        raise ProtocolError(f"{what}: not a {magic} file")
    if version != str(VERSION):
        raise ProtocolError(f"{what}: unknown version {version[:20]!r}")


def _field(line: str, name: str, what: str) -> str:
    word, sep, value = line.partition(" ")
    if word != name or not sep:
        raise ProtocolError(f"{what}: expected '{name} ...', got {line[:80]!r}")
    return value


def parse_control(data: bytes, *, receipt_ext: str = "mstm-rcpt",
                  max_bytes: int = 8 << 20) -> Control:
    """Read a control file; ProtocolError on any deviation from the grammar."""
    what = "control file"
    lines = _lines(data, what, max_bytes)
    if len(lines) < 5:
        raise ProtocolError(f"{what}: too short")
    _header(lines, what, CONTROL_MAGIC)
    batch = _field(lines[1], "batch", what)
    if not BATCH_RE.match(batch):
        raise ProtocolError(f"{what}: invalid batch name {batch[:80]!r}")
    algorithm = _field(lines[2], "algorithm", what)
    width = ALGORITHMS.get(algorithm)
    if width is None:
        raise ProtocolError(f"{what}: unknown algorithm {algorithm[:40]!r}")
    receipt = _field(lines[3], "receipt", what)
    if receipt != f"{batch}.{receipt_ext}":
        raise ProtocolError(f"{what}: receipt must be named {batch}.{receipt_ext},"
                            f" not {receipt[:80]!r}")
    body = lines[4:-1]
    if len(body) > MAX_ITEMS:
        raise ProtocolError(f"{what}: more than {MAX_ITEMS} items")
    items: list[ControlItem] = []
    dirs: list[str] = []
    seen: set[str] = set()
    for n, line in enumerate(body, start=5):
        parts = line.split(" ")
        if len(parts) == 2 and parts[0] == "dir":
            relpath = _path_on_line(parts[1], what, n)
            if relpath in seen:
                raise ProtocolError(f"{what}: line {n}: path {parts[1][:200]!r} listed twice")
            seen.add(relpath)
            dirs.append(relpath)
            continue
        if len(parts) != 4 or parts[0] != "item":
            raise ProtocolError(f"{what}: line {n}: expected 'item <size> <digest> <path>'"
                                f" or 'dir <path>'")
        _, size, digest, encoded = parts
        if not SIZE_RE.match(size) or int(size) > MAX_SIZE:
            raise ProtocolError(f"{what}: line {n}: bad size {size[:30]!r}")
        if len(digest) != width or not _HEX_RE.match(digest):
            raise ProtocolError(f"{what}: line {n}: bad {algorithm} digest {digest[:80]!r}")
        relpath = _path_on_line(encoded, what, n)
        if relpath in seen:
            raise ProtocolError(f"{what}: line {n}: path {encoded[:200]!r} listed twice")
        seen.add(relpath)
        items.append(ControlItem(relpath, int(size), digest))
    return Control(batch, algorithm, receipt, tuple(items), tuple(dirs))


# --------------------------------------------------------------------------- receipt


class Status(enum.StrEnum):
    OK = "ok"
    BAD_SIZE = "bad-size"
    BAD_CHECKSUM = "bad-checksum"
    MISSING = "missing"
    IO_ERROR = "io-error"
    REFUSED = "refused"


_STATUSES = {s.value: s for s in Status}


@dataclass(frozen=True)
class Receipt:
    batch: str
    items: tuple[tuple[str, Status], ...]  # (relpath, status)

    def statuses(self) -> dict[str, Status]:
        return dict(self.items)


def render_receipt(r: Receipt) -> bytes:
    check_batch(r.batch)
    lines = [f"{RECEIPT_MAGIC} {VERSION}", f"batch {r.batch}"]
    seen: set[str] = set()
    for relpath, status in r.items:
        if relpath in seen:
            raise ProtocolError(f"path {relpath!r} listed twice")
        seen.add(relpath)
        lines.append(f"item {Status(status).value} {encode_path(relpath)}")
    lines.append("end")
    return ("\n".join(lines) + "\n").encode("ascii")


def parse_receipt(data: bytes, *, batch: str, max_bytes: int = 64 << 20) -> Receipt:
    """Read a receipt for *batch*; ProtocolError on any deviation (also another batch)."""
    what = "receipt"
    lines = _lines(data, what, max_bytes)
    if len(lines) < 3:
        raise ProtocolError(f"{what}: too short")
    _header(lines, what, RECEIPT_MAGIC)
    got = _field(lines[1], "batch", what)
    if got != batch:
        raise ProtocolError(f"{what}: for batch {got[:80]!r}, expected {batch!r}")
    body = lines[2:-1]
    if len(body) > MAX_ITEMS:
        raise ProtocolError(f"{what}: more than {MAX_ITEMS} items")
    items: list[tuple[str, Status]] = []
    seen: set[str] = set()
    for n, line in enumerate(body, start=3):
        parts = line.split(" ")
        if len(parts) != 3 or parts[0] != "item":
            raise ProtocolError(f"{what}: line {n}: expected 'item <status> <path>'")
        status = _STATUSES.get(parts[1])
        if status is None:
            raise ProtocolError(f"{what}: line {n}: unknown status {parts[1][:30]!r}")
        relpath = _path_on_line(parts[2], what, n)
        if relpath in seen:
            raise ProtocolError(f"{what}: line {n}: path listed twice")
        seen.add(relpath)
        items.append((relpath, status))
    return Receipt(batch, tuple(items))


# --------------------------------------------------------------------------- thank-you


def render_thanks(batch: str) -> bytes:
    check_batch(batch)
    return f"{THANKS_MAGIC} {VERSION}\nbatch {batch}\nend\n".encode("ascii")


def parse_thanks(data: bytes, *, batch: str) -> None:
    """Accept exactly the thank-you for *batch*; ProtocolError otherwise."""
    what = "thank-you file"
    lines = _lines(data, what, MAX_THANKS_BYTES)
    if len(lines) != 3:
        raise ProtocolError(f"{what}: expected 3 lines")
    _header(lines, what, THANKS_MAGIC)
    got = _field(lines[1], "batch", what)
    if got != batch:
        raise ProtocolError(f"{what}: for batch {got[:80]!r}, expected {batch!r}")


def receipt_counts(items: Iterable[tuple[str, Status]]) -> dict[Status, int]:
    """How many items have each status (for log lines and summaries)."""
    counts: dict[Status, int] = {}
    for _, status in items:
        counts[status] = counts.get(status, 0) + 1
    return counts
