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
_SIZE_RE = re.compile(r"\A(?:0|[1-9][0-9]{0,18})\Z")
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
        if not _SIZE_RE.match(size) or int(size) > MAX_SIZE:
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


# --------------------------------------------------------------------------- MiStaMover
#
# MiStaMover's own handshake files (cedadev/mistamover, lib/ControlFile.py,
# lib/ReceiptFile.py, lib/ThankyouFile.py, lib/AbstractControlFile.py,
# lib/DatasetArrivalMonitor.py, lib/TransferModules/RsyncTransfer.py), so that an
# mstm-receive can answer a MiStaMover sender during a migration.  One item per
# handshake; each file is a start line, one value per line, an end line, each line
# ending in LF:
#
#   control   (sender, ".<item>.<control_ext>" next to the data file "<item>"):
#             _start_stager_ctrl_data_ / item name / size / md5 hex /
#             receipt name (".<item>.<time>.<receipt_ext>") / _end_stager_ctrl_data_
#   receipt   (receiver, under the name the control asked for):
#             _start_stager_receipt_data_ / item name / status code / size or -1 /
#             md5 or empty / thank-you name (".<item>.<time>.<thanks_ext>") /
#             _end_stager_receipt_data_
#   thank-you (sender, under the name the receipt asked for):
#             _start_stager_thankyou_ / receipt name / _end_stager_thankyou_
#
# Status codes: 0 success, 1 bad size, 2 bad checksum, 3 I/O error, 4 no such file.
# MiStaMover let the peer choose the receipt and thank-you names (its defect 13); here a
# receipt name is accepted only in the shape MiStaMover's sender gives it, derived from
# the item's name, and a thank-you may only remove the receipt its own name derives from.

MSM_CONTROL_MAGIC = (b"_start_stager_ctrl_data_", b"_end_stager_ctrl_data_")
MSM_RECEIPT_MAGIC = (b"_start_stager_receipt_data_", b"_end_stager_receipt_data_")
MSM_THANKS_MAGIC = (b"_start_stager_thankyou_", b"_end_stager_thankyou_")
MSM_MAX_BYTES = 4096
_MSM_TIME = r"[0-9]{1,20}(?:\.[0-9]{1,9})?"  # MiStaMover's "%.2f" % time.time()
_MD5_RE = re.compile(r"\A[0-9a-f]{32}\Z")
_MSM_SIZE_RE = re.compile(r"\A(?:-1|0|[1-9][0-9]{0,18})\Z")


class MsmCode(enum.IntEnum):
    SUCCESS = 0
    BAD_SIZE = 1
    BAD_CKSUM = 2
    IO_ERROR = 3
    NO_SUCH_FILE = 4


# Our statuses in MiStaMover's codes: it has no "refused"; an I/O error is the nearest
# (its sender retries, and the receiver's log says why).
MSM_CODES: dict[Status, MsmCode] = {
    Status.OK: MsmCode.SUCCESS,
    Status.BAD_SIZE: MsmCode.BAD_SIZE,
    Status.BAD_CHECKSUM: MsmCode.BAD_CKSUM,
    Status.IO_ERROR: MsmCode.IO_ERROR,
    Status.MISSING: MsmCode.NO_SUCH_FILE,
    Status.REFUSED: MsmCode.IO_ERROR,
}


@dataclass(frozen=True)
class MsmControl:
    filename: str  # one plain file name, as os.fsdecode gives it
    size: int
    md5: str
    receipt: str


@dataclass(frozen=True)
class MsmReceipt:
    filename: str
    code: MsmCode
    size: int  # -1: not known
    md5: str  # "": not known
    thanks: str


def is_mistamover(data: bytes) -> bool:
    """True if *data* starts like one of MiStaMover's handshake files."""
    return any(data.startswith(magic + b"\n")
               for magic, _ in (MSM_CONTROL_MAGIC, MSM_RECEIPT_MAGIC, MSM_THANKS_MAGIC))


def _msm_lines(data: bytes, what: str, magic: tuple[bytes, bytes], count: int) -> list[bytes]:
    if not isinstance(data, bytes | bytearray | memoryview):
        raise ProtocolError(f"{what}: not bytes")
    data = bytes(data)
    if len(data) > MSM_MAX_BYTES:
        raise ProtocolError(f"{what} larger than {MSM_MAX_BYTES} bytes")
    if not data.endswith(b"\n"):
        raise ProtocolError(f"{what}: missing final newline")
    lines = data[:-1].split(b"\n")
    if len(lines) != count + 2 or lines[0] != magic[0] or lines[-1] != magic[1]:
        raise ProtocolError(f"{what}: not a MiStaMover {what} ({count} values between"
                            f" {magic[0].decode()} and {magic[1].decode()})")
    return lines[1:-1]


def _msm_name(raw: bytes, what: str) -> str:
    """A plain file name (one component, not hidden) from a MiStaMover file."""
    if (not raw or b"/" in raw or b"\0" in raw or raw.startswith(b".")
            or len(raw) > NAME_MAX or b"\r" in raw):
        raise ProtocolError(f"{what}: unsafe file name {raw[:80]!r}")
    return os.fsdecode(raw)


def _msm_handshake_name(raw: bytes, what: str) -> str:
    if (not raw or b"/" in raw or b"\0" in raw or raw in (b".", b"..")
            or len(raw) > NAME_MAX):
        raise ProtocolError(f"{what}: unsafe file name {raw[:80]!r}")
    return os.fsdecode(raw)


def mistamover_control_name(filename: str, *, control_ext: str) -> str:
    """The control file name MiStaMover's sender uses for the data file *filename*."""
    return f".{filename}.{control_ext}"


def mistamover_receipt_ok(filename: str, receipt: str, receipt_ext: str) -> bool:
    """Is *receipt* a receipt name MiStaMover's sender would ask for, for *filename*?"""
    pattern = rf"\.{re.escape(filename)}\.{_MSM_TIME}\.{re.escape(receipt_ext)}"
    return re.fullmatch(pattern, receipt, re.DOTALL) is not None


def mistamover_receipt_shape(receipt: str, receipt_ext: str) -> bool:
    """Is *receipt* shaped like a MiStaMover receipt name (".<item>.<time>.<ext>")?"""
    pattern = rf"\.[^/]+\.{_MSM_TIME}\.{re.escape(receipt_ext)}"
    return re.fullmatch(pattern, receipt, re.DOTALL) is not None


def mistamover_thanks_name(receipt: str, *, receipt_ext: str, thanks_ext: str) -> str:
    """The thank-you name we ask for in a receipt: the receipt's, with thanks_ext."""
    if not receipt.endswith("." + receipt_ext):
        raise ProtocolError(f"{receipt!r} does not end with .{receipt_ext}")
    return receipt[: -len(receipt_ext)] + thanks_ext


def parse_mistamover_control(data: bytes, *, receipt_ext: str) -> MsmControl:
    what = "control file"
    raw_name, raw_size, raw_md5, raw_receipt = _msm_lines(data, what, MSM_CONTROL_MAGIC, 4)
    filename = _msm_name(raw_name, what)
    size = raw_size.decode("ascii", "replace")
    if not _SIZE_RE.match(size):
        raise ProtocolError(f"{what}: bad size {size[:30]!r}")
    md5 = raw_md5.decode("ascii", "replace")
    if not _MD5_RE.match(md5):
        raise ProtocolError(f"{what}: bad md5 {md5[:80]!r}")
    receipt = _msm_handshake_name(raw_receipt, what)
    if not mistamover_receipt_ok(filename, receipt, receipt_ext):
        raise ProtocolError(f"{what}: receipt name {receipt[:80]!r} is not"
                            f" .{filename[:80]}.<time>.{receipt_ext}")
    return MsmControl(filename, int(size), md5, receipt)


def render_mistamover_control(c: MsmControl) -> bytes:
    values = [os.fsencode(c.filename), str(c.size).encode(), c.md5.encode("ascii"),
              os.fsencode(c.receipt)]
    return b"\n".join([MSM_CONTROL_MAGIC[0], *values, MSM_CONTROL_MAGIC[1]]) + b"\n"


def parse_mistamover_receipt(data: bytes) -> MsmReceipt:
    what = "receipt"
    raw_name, raw_code, raw_size, raw_md5, raw_thanks = _msm_lines(
        data, what, MSM_RECEIPT_MAGIC, 5)
    filename = _msm_name(raw_name, what)
    try:
        code = MsmCode(int(raw_code.decode("ascii"))) if raw_code.isdigit() else None
    except (ValueError, UnicodeDecodeError):
        code = None
    if code is None:
        raise ProtocolError(f"{what}: unknown status code {raw_code[:20]!r}")
    size = raw_size.decode("ascii", "replace")
    if not _MSM_SIZE_RE.match(size):
        raise ProtocolError(f"{what}: bad size {size[:30]!r}")
    md5 = raw_md5.decode("ascii", "replace")
    if md5 and not _MD5_RE.match(md5):
        raise ProtocolError(f"{what}: bad md5 {md5[:80]!r}")
    return MsmReceipt(filename, code, int(size), md5, _msm_handshake_name(raw_thanks, what))


def render_mistamover_receipt(r: MsmReceipt) -> bytes:
    values = [os.fsencode(r.filename), str(int(r.code)).encode(), str(r.size).encode(),
              r.md5.encode("ascii"), os.fsencode(r.thanks)]
    return b"\n".join([MSM_RECEIPT_MAGIC[0], *values, MSM_RECEIPT_MAGIC[1]]) + b"\n"


def parse_mistamover_thanks(data: bytes) -> str:
    """The receipt name a MiStaMover thank-you file acknowledges."""
    (raw,) = _msm_lines(data, "thank-you file", MSM_THANKS_MAGIC, 1)
    return _msm_handshake_name(raw, "thank-you file")


def render_mistamover_thanks(receipt: str) -> bytes:
    return b"\n".join([MSM_THANKS_MAGIC[0], os.fsencode(receipt), MSM_THANKS_MAGIC[1]]) + b"\n"
