"""Records: what the spool knows of one item, and how records are stored in files.

A record (ItemRecord) is one line of JSON.  ``enqueue`` writes the records of a chunk (up
to CHUNK items) to one file in ``tmp/``, makes it durable with one fsync(2), and
publishes each item as a hard link to that file, ``new/<id>``; ``complete_many`` does the
same with the done records of a batch.  So an item costs a link and a few renames, not a
file, an fsync and a freed block of its own, and a chunk's file is parsed once for all its
items (parses are cached by inode and the file's random token, see RecordFiles).  A
record is never changed in place: a change (retry) is a new one-record file renamed over
the old name.  Damage to a chunk's file makes each of its items unreadable: each is
quarantined and, as for any unreadable record, enqueued again by the next scan if its
source still exists.

This module holds ItemRecord and Claim, item_id, the codec of record files (pack and the
decoding behind RecordFiles), the check of a record before it is enqueued, the cache of
parsed files, and read_records, the read-only reader of one state directory.
"""

from __future__ import annotations

import base64
import functools
import hashlib
import json
import logging
import os
import re
import secrets
import stat
from collections import OrderedDict
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

log = logging.getLogger("mstm.spool")

CHUNK = 512  # records per chunk file, checked and published per hold of spool.lock
ID_RE = re.compile(r"[0-9a-f]{40}")  # an item id, the name of its record in new/, done/...
_MAX_FILE_BYTES = 64 << 20  # one record file: a record, or a chunk of at most CHUNK
_RECORD_CACHE = 16  # parsed record files kept (see RecordFiles)
_FORMAT = 1


def item_id(relpath: str, size: int, mtime_ns: int) -> str:
    """Identity of one version of an item: sha256 of path, size and mtime, 40 hex digits."""
    h = hashlib.sha256(os.fsencode(relpath) + b"\0" + str(size).encode() + b"\0")
    h.update(str(mtime_ns).encode())
    return h.hexdigest()[:40]


@dataclass(frozen=True)
class ItemRecord:
    """One queued item; relpath is relative to the stream's directory (os.fsdecode'd)."""

    relpath: str
    size: int
    mtime_ns: int
    is_dir: bool = False
    attempts: int = 0
    not_before: float = 0.0
    last_error: str | None = None
    enqueued_at: float = 0.0
    sha256: str | None = None
    completed_at: float = 0.0
    retried_at: float = 0.0  # when the last attempt failed (clock-step detection)

    @functools.cached_property
    def id(self) -> str:  # computed once per record (a frozen dataclass may cache it)
        return item_id(self.relpath, self.size, self.mtime_ns)


@dataclass
class Claim:
    """A record held by this sender; path is claimed/<id>@<owner>."""

    record: ItemRecord
    path: Path


def due(rec: ItemRecord) -> float:
    """When the record may be claimed: its enqueue time, or the end of its backoff."""
    return max(rec.enqueued_at, rec.not_before)


def check_record(rec: ItemRecord) -> None:
    """Raise ValueError unless rec's path is relative and normalised and its size and
    mtime are integers (enqueue checks every record it is given)."""
    p = rec.relpath
    if not isinstance(p, str) or not p or "\0" in p or p.startswith("/"):
        raise ValueError(f"not a relative path: {p!r}")
    if any(part in ("", ".", "..") for part in p.split("/")):
        raise ValueError(f"relative path must be normalised: {p!r}")
    if isinstance(rec.size, bool) or not isinstance(rec.size, int) or rec.size < 0:
        raise ValueError(f"bad size for {p!r}: {rec.size!r}")
    if isinstance(rec.mtime_ns, bool) or not isinstance(rec.mtime_ns, int):
        raise ValueError(f"bad mtime_ns for {p!r}: {rec.mtime_ns!r}")


# ---------------------------------------------------------------------------- codec


def _printable(text: str) -> str:
    """Text that encodes as UTF-8 (lone surrogates from os.fsdecode become \\udcxx)."""
    return text.encode("utf-8", "backslashreplace").decode("utf-8")


def pack(records: Iterable[ItemRecord]) -> bytes:
    """The content of one record file: one record per line, the first tagged with a
    random "file" token, so that a file is told apart from an earlier one that had the
    same inode (the parse cache's key, see RecordFiles)."""
    token = secrets.token_hex(8)
    return b"".join(_encode(rec, token if n == 0 else None) for n, rec in enumerate(records))


def _encode(rec: ItemRecord, token: str | None = None) -> bytes:
    raw = os.fsencode(rec.relpath)
    obj: dict[str, Any] = {"file": token} if token else {}
    obj |= {
        "format": _FORMAT,
        "id": rec.id,
        "relpath": raw.decode("utf-8", "backslashreplace"),  # for humans only
        "relpath_b64": base64.b64encode(raw).decode("ascii"),
        "size": rec.size,
        "mtime_ns": rec.mtime_ns,
        "is_dir": rec.is_dir,
        "attempts": rec.attempts,
        "not_before": rec.not_before,
        "last_error": None if rec.last_error is None else _printable(rec.last_error),
        "enqueued_at": rec.enqueued_at,
        "sha256": rec.sha256,
        "completed_at": rec.completed_at,
        "retried_at": rec.retried_at,
    }
    # one line per record: a record file holds one record or a chunk of them (one per line)
    return (json.dumps(obj, ensure_ascii=False, separators=(",", ":")) + "\n").encode("utf-8")


def _get(obj: dict[str, Any], key: str, kind: type | tuple[type, ...], default: Any = ...) -> Any:
    if key not in obj:
        if default is ...:
            raise ValueError(f"missing {key!r}")
        return default
    value = obj[key]
    if isinstance(value, bool) and kind is not bool:
        raise ValueError(f"{key!r} has the wrong type")
    if not isinstance(value, kind):
        raise ValueError(f"{key!r} has the wrong type")
    return value


def _decode_obj(obj: Any) -> ItemRecord:
    if not isinstance(obj, dict):
        raise ValueError("not a JSON object")
    raw = base64.b64decode(_get(obj, "relpath_b64", str), validate=True)
    number = (int, float)
    last_error = _get(obj, "last_error", (str, type(None)), None)
    sha = _get(obj, "sha256", (str, type(None)), None)
    return ItemRecord(
        relpath=os.fsdecode(raw),
        size=_get(obj, "size", int),
        mtime_ns=_get(obj, "mtime_ns", int),
        is_dir=_get(obj, "is_dir", bool, False),
        attempts=_get(obj, "attempts", int, 0),
        not_before=float(_get(obj, "not_before", number, 0.0)),
        last_error=last_error,
        enqueued_at=float(_get(obj, "enqueued_at", number, 0.0)),
        sha256=sha,
        completed_at=float(_get(obj, "completed_at", number, 0.0)),
        retried_at=float(_get(obj, "retried_at", number, 0.0)),
    )


def _decode_file(data: bytes) -> dict[str, ItemRecord]:
    """The records of one record file, by item id: one JSON object (also the older
    pretty-printed form), or a chunk of them, one per line."""
    if len(data) > _MAX_FILE_BYTES:
        raise ValueError("record file too large")
    text = data.decode("utf-8")
    try:
        objs = [json.loads(text)]
    except json.JSONDecodeError as e:
        if not e.msg.startswith("Extra data"):
            raise
        objs = [json.loads(line) for line in text.splitlines() if line.strip()]
    found: dict[str, ItemRecord] = {}
    for obj in objs:
        rec = _decode_obj(obj)
        found[rec.id] = rec
    if not found:
        raise ValueError("no record")
    return found


# ---------------------------------------------------------------------------- reading


class RecordFiles:
    """Parsed record files, the last few kept.

    A record file is never changed in place (a change is a new file renamed over the old
    name), and the entries of one enqueued or completed chunk are hard links to one file,
    so a parse is cached by device, inode, size and first line (which holds the file's
    random token, see pack, so a new file on a reused inode is not mistaken for the old).
    """

    def __init__(self, keep: int = _RECORD_CACHE) -> None:
        self.keep = keep
        self._parsed: OrderedDict[tuple[int, int, int, bytes], dict[str, ItemRecord]] = (
            OrderedDict())

    def load(self, path: str) -> dict[str, ItemRecord]:
        """The records of the file at path by id; OSError if unreadable (FileNotFoundError
        if gone, ELOOP for a symbolic link), ValueError if not a valid record file."""
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC | os.O_NOFOLLOW | os.O_NONBLOCK)
        try:
            st = os.fstat(fd)
            if not stat.S_ISREG(st.st_mode):
                raise ValueError("is a directory" if stat.S_ISDIR(st.st_mode)
                                 else "not a regular file")
            head = os.pread(fd, 4096, 0)
            key = (st.st_dev, st.st_ino, st.st_size, head[: head.find(b"\n") + 1 or None])
            records = self._parsed.get(key)
            if records is not None:
                self._parsed.move_to_end(key)
                return records
            if st.st_size > _MAX_FILE_BYTES:
                raise ValueError("record file too large")
            with open(fd, "rb", closefd=False) as f:
                records = _decode_file(f.read(_MAX_FILE_BYTES + 1))
        finally:
            os.close(fd)
        self._parsed[key] = records
        while len(self._parsed) > self.keep:
            self._parsed.popitem(last=False)
        return records


def names_by_inode(d: str) -> list[str]:
    """The names in directory d, the links of one chunk file together (so a reader
    parses each chunk once); [] if d is gone."""
    try:
        with os.scandir(d) as it:
            return [name for _, name in sorted((e.inode(), e.name) for e in it)]
    except FileNotFoundError:
        return []


def read_records(directory: str | os.PathLike[str]) -> Iterator[ItemRecord]:
    """The readable records in one state directory of a spool (e.g. done/), read only:
    nothing is moved or created, unreadable records are skipped."""
    d = os.fspath(directory)
    files = RecordFiles(keep=2)
    for name in names_by_inode(d):
        item = name.partition("@")[0]
        try:
            rec = files.load(os.path.join(d, name)).get(item)
        except (OSError, ValueError) as e:
            log.debug("skipping record %s/%s: %s", d, name, e)
            continue
        if rec is not None:
            yield rec
