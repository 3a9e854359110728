"""The durable per-stream queue: Maildir-style, every state change one rename(2) or link(2).

Layout of a spool directory (one per stream)::

    tmp/                   records being written: <ns>.<owner>.<n>; garbage after an hour
    new/<id>               waiting; file mtime = due time (an ordering hint only)
    claimed/<id>@<owner>   held by one sender
    done/<id>              verified at the target; file mtime = completion time
    failed/<id>            gave up after retry_count; reason and attempts inside
    owners/<owner>         one per live sender; mtime = last heartbeat
    owners/<owner>.expired-<time>   an owner whose claims were (being) taken over
    corrupt/               unreadable records moved aside (created on demand)
    state.json             stream-level state, replaced atomically
    scan.lock              flock: one scanner per stream
    spool.lock             flock: makes enqueue's duplicate check exact (see below)

Records and files: a record is one line of JSON.  ``enqueue`` writes the records of a
chunk (up to 512 items) to one file in ``tmp/``, makes it durable with one fsync(2), and
publishes each item as a hard link to that file, ``new/<id>``; ``complete_many`` does the
same with the done records of a batch.  So an item costs a link and a few renames, not a
file, an fsync and a freed block of its own, and a chunk's file is parsed once for all its
items (parses are cached by inode and the file's random token).  A record is never
changed in place: a change (retry) is a new one-record file renamed over the old name.
Damage to a chunk's file makes each of its items unreadable: each is quarantined and, as
for any unreadable record, enqueued again by the next scan if its source still exists.

Guarantees:

* Every record file is fsync'd before a name for it is published by
  link or rename, and the directory is fsync'd before the call returns (``complete_many``
  with durable=False leaves that to the caller's ``flush``).  A crash at any instant
  leaves every item in exactly one of new/, claimed/, done/, failed/ (or, if it crashed
  before publication, in none: the scanner enqueues it again).  Stale ``tmp/`` files are
  only garbage.
* A record leaves ``claimed/`` only by its owner (complete, retry, release, drop) or by
  ``reclaim_expired`` once the owner is dead or silent.  When the content changes
  (complete, retry) the new record (or a link to the batch's file) is renamed *over*
  ``claimed/<id>@<owner>`` and then renamed to its destination, so exactly one copy
  exists at any instant.
* ``spool.lock``: moves out of ``claimed/`` by an owner hold it shared; ``enqueue``,
  ``reclaim_expired`` and ``retry_failed`` hold it exclusively.  So a takeover never
  interleaves with an owner's check-and-rewrite of its claim (the rewrite can't resurrect
  a claim already taken over), and enqueue's check "not in new/, claimed/, done/,
  failed/" (made in that order, the order items flow) can't miss an item moving back.
* A record that can't be parsed is moved to ``corrupt/`` with a warning; its item is then
  unknown, and the scanner enqueues it again if its source still exists.

Claim order and cost: ``claim`` lists ``new/`` (one scandir; one stat per file, and the
links of a chunk share one) and keeps the oldest-due few batches' worth of names, ordered
by file mtime, which is the due time (``enqueued_at``, or ``not_before`` after a retry;
within a chunk, the records' own times).  Later claims take from that queue; ``new/`` is
listed again when it runs out, or when an item of ours went back to ``new/``.  So a claim
with a million records waiting costs one listing per few batches and the memory of a few
batches.  The record's ``not_before`` is authoritative (the mtime only orders), so a clock
step can't hide a due item; and a record whose last failure lies in the future of the
clock (the clock was stepped back) is due at once, so a step back never stretches a
backoff.

Leases and clocks: all times come from the injected clock.  A heartbeat sets the owner
file's mtime to now, but never moves it backwards (a backward clock step can't make a
live lease look old; a mark left in the future by a corrected forward step is clamped to
now + lease_seconds).  An owner on this host is judged by its pid alone (authoritative:
dead, zombie or reused pid -> taken over at once; alive -> never, however old its
heartbeat, so a forward clock step can't steal live local claims; a hung sender is the
watchdog's to kill; "this host" means the same hostname, so senders in different pid
namespaces sharing a spool need different hostnames).  An owner on another host is taken
over when its heartbeat is older than lease_seconds by our clock; a forward step may
expire such owners early, which costs a second transfer but never a second completion.
"""

from __future__ import annotations

import base64
import contextlib
import fcntl
import functools
import hashlib
import heapq
import itertools
import json
import logging
import os
import random
import re
import secrets
import socket
import stat
import threading
import time
from collections import OrderedDict
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import psutil

from mstm.errors import EXIT_IOERR, MstmError
from mstm.log import event

log = logging.getLogger("mstm.spool")

STATES = ("new", "claimed", "done", "failed")
TMP_MAX_AGE = 3600.0  # seconds after which a tmp/ file is garbage
EXPIRED_MAX_AGE = 3600.0  # seconds an owners/*.expired-* marker is kept
_CHUNK = 512  # enqueue: records checked and published per hold of spool.lock
_MAX_FILE_BYTES = 64 << 20  # one record file: a record, or a chunk of at most _CHUNK
_RECORD_CACHE = 16  # parsed record files kept (see _RecordFiles)
_EXACT_COUNT = 10_000  # queued(): below this many waiting, count them exactly
_ID_RE = re.compile(r"[0-9a-f]{40}")
_EXPIRED = ".expired-"
_FORMAT = 1


class SpoolError(MstmError):
    """The spool can't be used (layout, permissions, I/O): exit status 74, one line."""

    exit_code = EXIT_IOERR


class SpoolBusy(SpoolError):
    """Another process holds the lock (scan.lock)."""


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


# ---------------------------------------------------------------------------- records


def _printable(text: str) -> str:
    """Text that encodes as UTF-8 (lone surrogates from os.fsdecode become \\udcxx)."""
    return text.encode("utf-8", "backslashreplace").decode("utf-8")


def _pack(records: Iterable[ItemRecord]) -> bytes:
    """The content of one record file: one record per line, the first tagged with a
    random "file" token, so that a file is told apart from an earlier one that had the
    same inode (the parse cache's key, see Spool._read_file)."""
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


def _decode(data: bytes, expect_id: str) -> ItemRecord:
    """The record of item *expect_id* in a record file's content."""
    rec = _decode_file(data).get(expect_id)
    if rec is None:
        raise ValueError(f"holds no record for item {expect_id}")
    return rec


def _check_record(rec: ItemRecord) -> None:
    p = rec.relpath
    if not isinstance(p, str) or not p or "\0" in p or p.startswith("/"):
        raise ValueError(f"not a relative path: {p!r}")
    if any(part in ("", ".", "..") for part in p.split("/")):
        raise ValueError(f"relative path must be normalised: {p!r}")
    if isinstance(rec.size, bool) or not isinstance(rec.size, int) or rec.size < 0:
        raise ValueError(f"bad size for {p!r}: {rec.size!r}")
    if isinstance(rec.mtime_ns, bool) or not isinstance(rec.mtime_ns, int):
        raise ValueError(f"bad mtime_ns for {p!r}: {rec.mtime_ns!r}")


class _RecordFiles:
    """Parsed record files, the last few kept.

    A record file is never changed in place (a change is a new file renamed over the old
    name), and the entries of one enqueued or completed chunk are hard links to one file,
    so a parse is cached by device, inode, size and first line (which holds the file's
    random token, see _pack, so a new file on a reused inode is not mistaken for the old).
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


def read_records(directory: str | os.PathLike[str]) -> Iterator[ItemRecord]:
    """The readable records in one state directory of a spool (e.g. done/), read only:
    nothing is moved or created, unreadable records are skipped."""
    d = os.fspath(directory)
    files = _RecordFiles(keep=2)
    for name in _names_by_inode(d):
        item = name.partition("@")[0]
        try:
            rec = files.load(os.path.join(d, name)).get(item)
        except (OSError, ValueError) as e:
            log.debug("skipping record %s/%s: %s", d, name, e)
            continue
        if rec is not None:
            yield rec


# ---------------------------------------------------------------------------- owners


def _safe_host(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]", "_", name) or "localhost"


def _valid_owner(owner: str) -> bool:
    return not (
        not owner
        or len(owner) > 200
        or owner.startswith(".")
        or _EXPIRED in owner
        or any(c in owner for c in "/@\0")
    )


def _check_owner(owner: str) -> None:
    if not _valid_owner(owner):
        raise ValueError(f"bad owner name: {owner!r}")


def _parse_owner(owner: str) -> tuple[str, int | None]:
    """(host, pid) of "<host>.<pid>.<random>"; pid None if the name has another shape."""
    parts = owner.rsplit(".", 2)
    if len(parts) == 3 and parts[1].isdigit() and int(parts[1]) > 0:
        return parts[0], int(parts[1])
    return owner, None


def _proc_stat(pid: int) -> tuple[str, int] | None:
    """(state letter, start time in clock ticks since boot) of a process, None if gone."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            data = f.read()
    except (FileNotFoundError, ProcessLookupError):
        return None
    except OSError:
        return ("?", -1) if psutil.pid_exists(pid) else None
    fields = data[data.rfind(b")") + 2 :].split()
    return fields[0].decode("ascii", "replace"), int(fields[19])


def _pid_alive(pid: int, start_ticks: int | None) -> bool:
    if not os.path.exists("/proc/self/stat"):
        return psutil.pid_exists(pid)
    st = _proc_stat(pid)
    if st is None or st[0] in ("Z", "X", "x"):
        return False
    # The same pid with another start time is a new process (pid reuse).
    return start_ticks is None or st[1] < 0 or st[1] == start_ticks


# ---------------------------------------------------------------------------- the spool


class Spool:
    """The durable queue of one stream (see the module docstring)."""

    def __init__(
        self,
        path: Path,
        *,
        lease_seconds: float = 300.0,
        owner: str | None = None,
        clock: Callable[[], float] = time.time,
    ) -> None:
        if lease_seconds <= 0:
            raise ValueError("lease_seconds must be positive")
        self.path = Path(path)
        self.lease_seconds = float(lease_seconds)
        self._clock = clock
        self._host = _safe_host(socket.gethostname())
        self.owner = owner if owner is not None else self._new_owner_name()
        _check_owner(self.owner)
        d = str(self.path)
        self._tmp = os.path.join(d, "tmp")
        self._new = os.path.join(d, "new")
        self._claimed = os.path.join(d, "claimed")
        self._done = os.path.join(d, "done")
        self._failed = os.path.join(d, "failed")
        self._owners = os.path.join(d, "owners")
        self._corrupt = os.path.join(d, "corrupt")
        self._state_file = os.path.join(d, "state.json")
        self._scan_lock_file = os.path.join(d, "scan.lock")
        self._spool_lock_file = os.path.join(d, "spool.lock")
        self._dirs = {
            "new": self._new,
            "claimed": self._claimed,
            "done": self._done,
            "failed": self._failed,
        }
        self._rng = random.Random()
        self._seq = itertools.count()
        self._mutex = threading.Lock()  # owner identity and lease flag
        self._lost_owner: str | None = None  # set when our owner file was taken away
        self._opened = False
        self._hb_thread: threading.Thread | None = None
        self._hb_stop = threading.Event()
        self._files = _RecordFiles()
        # claim order: the oldest-due names of new/ from the last listing (see claim)
        self._queue: list[tuple[int, int, str]] = []  # (mtime_ns, inode, name)
        self._queue_pos = 0
        self._queue_ino = -1  # the inode whose run of links in the queue is ordered
        self._queue_partial = False  # new/ held more than the listing kept
        self._listed: int | None = None  # entries in new/ at the last listing, kept current
        # records found not yet due: name -> (inode, not_before, retried_at)
        self._not_due: dict[str, tuple[int, float, float]] = {}

    # ------------------------------------------------------------------ set-up

    def _new_owner_name(self) -> str:
        return f"{self._host}.{os.getpid()}.{secrets.token_hex(4)}"

    def open(self) -> Spool:
        """Create the layout (mode 0o750), check it is writable, register our owner file."""
        try:
            self.path.mkdir(mode=0o750, parents=True, exist_ok=True)
            for d in (self._tmp, *self._dirs.values(), self._owners):
                os.makedirs(d, mode=0o750, exist_ok=True)
            for lock in (self._scan_lock_file, self._spool_lock_file):
                os.close(os.open(lock, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o640))
            probe = self._write_tmp(b"probe\n")
            try:
                os.link(probe, probe + ".link")  # records are published as hard links
                os.unlink(probe + ".link")
            except OSError as e:
                raise SpoolError(f"spool {self.path} is not usable: its filesystem does not "
                                 f"support hard links ({e.strerror or e})") from e
            finally:
                os.unlink(probe)
        except OSError as e:
            raise SpoolError(f"spool {self.path} is not usable: {e}") from e
        self._opened = True
        self._register_owner()
        return self

    def __enter__(self) -> Spool:
        return self.open() if not self._opened else self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _require_open(self) -> None:
        if not self._opened:
            raise SpoolError(f"spool {self.path} is not open")

    def _owner_path(self, owner: str | None = None) -> str:
        return os.path.join(self._owners, owner if owner is not None else self.owner)

    def _register_owner(self) -> None:
        host, pid = _parse_owner(self.owner)
        st = _proc_stat(pid) if pid is not None and pid == os.getpid() else None
        info = {
            "owner": self.owner,
            "host": host,
            "pid": pid,
            "start_ticks": st[1] if st else None,
            "opened_at": self._clock(),
        }
        data = (json.dumps(info) + "\n").encode()
        try:
            tmp = self._write_tmp(data, mtime=self._clock())
            os.rename(tmp, self._owner_path())
            _fsync_dir(self._owners)
        except OSError as e:
            raise SpoolError(f"cannot register owner in {self._owners}: {e}") from e

    def close(self) -> None:
        """Stop beating, hand back any claims still held, remove our owner file."""
        if not self._opened:
            return
        self.stop_heartbeat()
        suffix = "@" + self.owner
        mine = [n for n in _listdir(self._claimed) if n.endswith(suffix)]
        if mine:
            log.warning("spool %s: releasing %d claim(s) still held at close", self.path, len(mine))
            with self._spool_lock(exclusive=False):
                for name in mine:
                    _rename_if_present(
                        os.path.join(self._claimed, name),
                        os.path.join(self._new, name.split("@", 1)[0]),
                    )
            _fsync_dir(self._new)
        with contextlib.suppress(FileNotFoundError):
            os.unlink(self._owner_path())
        self._opened = False

    # ------------------------------------------------------------------ low-level I/O

    def _write_tmp(self, data: bytes, mtime: float | None = None, *, sync: bool = True) -> str:
        """Write data to a new tmp/ file, set its mtime, fsync it (unless the caller
        makes it durable another way); its path."""
        name = f"{int(self._clock() * 1e9)}.{self.owner}.{next(self._seq)}"
        path = os.path.join(self._tmp, name)
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o640)
        try:
            view = memoryview(data)
            while view:
                view = view[os.write(fd, view) :]
            if mtime is not None:
                ns = int(mtime * 1e9)
                os.utime(fd, ns=(ns, ns))
            if sync:
                os.fsync(fd)
        except BaseException:
            os.close(fd)
            with contextlib.suppress(OSError):
                os.unlink(path)
            raise
        os.close(fd)
        return path

    @contextlib.contextmanager
    def _spool_lock(self, *, exclusive: bool) -> Iterator[None]:
        # A fresh descriptor each time: flock belongs to the open file, so threads and
        # several Spool objects in one process exclude each other too.
        fd = os.open(self._spool_lock_file, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o640)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX if exclusive else fcntl.LOCK_SH)
            yield
        finally:
            os.close(fd)

    def _read(self, path: str, expect_id: str, state: str) -> ItemRecord | None:
        """The record at path; None if it vanished or was corrupt (then quarantined).

        A record file is never changed in place (a change is a new file renamed over the
        old name), and the entries of one enqueued or completed chunk are hard links to one
        file, so parsed files are cached by device, inode, size and first line (which holds
        the file's random token, see _pack): reading the records of a batch parses each
        chunk once.
        """
        records = self._read_file(path, state)
        if records is None:
            return None
        rec = records.get(expect_id)
        if rec is None:
            self._quarantine(path, state, f"holds no record for item {expect_id}")
        return rec

    def _read_file(self, path: str, state: str) -> dict[str, ItemRecord] | None:
        """All records of the file at path, by id (see _read)."""
        try:
            return self._files.load(path)
        except FileNotFoundError:
            return None
        except (OSError, ValueError) as e:  # ValueError includes JSON, UTF-8, base64 errors
            why = e.strerror if isinstance(e, OSError) and e.strerror else str(e)
            self._quarantine(path, state, why or type(e).__name__)
            return None

    def _quarantine(self, path: str, state: str, why: str) -> None:
        name = os.path.basename(path)
        os.makedirs(self._corrupt, mode=0o750, exist_ok=True)
        dest = os.path.join(self._corrupt, f"{state}.{name}.{time.time_ns()}")
        try:
            os.rename(path, dest)
        except FileNotFoundError:
            return  # someone else moved it first
        log.warning(
            "spool %s: unreadable record %s/%s (%s) moved to %s; its item is no longer "
            "known and is enqueued again if its source still exists",
            self.path,
            state,
            name,
            why,
            dest,
        )

    # ------------------------------------------------------------------ leases

    def heartbeat(self) -> bool:
        """Touch owners/<owner>; False if it was taken away (lease lost)."""
        self._require_open()
        with self._mutex:
            owner = self.owner
            if self._lost_owner == owner:
                return False
        path = self._owner_path(owner)
        now = self._clock()
        try:
            old = os.stat(path).st_mtime
            mark = max(now, min(old, now + self.lease_seconds))
            ns = int(mark * 1e9)
            os.utime(path, ns=(ns, ns))
        except FileNotFoundError:
            with self._mutex:
                if self.owner == owner:
                    self._lost_owner = owner
            log.warning(
                "spool %s: lease of %s lost (owner file taken away); its claims "
                "belong to whoever took them over",
                self.path,
                owner,
            )
            return False
        except OSError as e:
            raise SpoolError(f"heartbeat {path}: {e}") from e
        return True

    def lease_lost(self) -> bool:
        """True once our owner file was taken away (until claim() starts a new identity)."""
        with self._mutex:
            owner = self.owner
            if self._lost_owner == owner:
                return True
        if not self._opened or os.path.lexists(self._owner_path(owner)):
            return False
        with self._mutex:
            if self.owner == owner:
                self._lost_owner = owner
        return True

    def _ensure_lease(self) -> None:
        if self.heartbeat():
            return
        with self._mutex:
            old, self.owner = self.owner, self._new_owner_name()
            self._lost_owner = None
        self._register_owner()
        log.warning(
            "spool %s: continuing as new owner %s after losing the lease of %s",
            self.path,
            self.owner,
            old,
        )

    def start_heartbeat(self) -> None:
        """Beat every lease_seconds/4 in a daemon thread."""
        self._require_open()
        if self._hb_thread is not None and self._hb_thread.is_alive():
            return
        self._hb_stop.clear()
        self._hb_thread = threading.Thread(
            target=self._beat_forever, name="mstm-spool-heartbeat", daemon=True
        )
        self._hb_thread.start()

    def stop_heartbeat(self) -> None:
        self._hb_stop.set()
        if self._hb_thread is not None:
            self._hb_thread.join(timeout=10)
            self._hb_thread = None

    def _beat_forever(self) -> None:
        while not self._hb_stop.wait(self.lease_seconds / 4):
            try:
                self.heartbeat()
            except Exception:
                log.exception("spool %s: heartbeat failed", self.path)

    def _expired(self, owner: str, now: float, expired_markers: set[str]) -> str | None:
        """Why owner's claims may be taken over, or None if it is alive."""
        host, pid = _parse_owner(owner)
        path = self._owner_path(owner)
        try:
            mtime: float | None = os.stat(path).st_mtime
        except FileNotFoundError:
            mtime = None
        if mtime is None and owner in expired_markers:
            return "takeover already begun"
        if host == self._host and pid is not None:
            start_ticks = None
            if mtime is not None:
                with contextlib.suppress(OSError, ValueError):
                    with open(path, "rb") as f:
                        info = json.loads(f.read(4096))
                    if isinstance(info, dict) and isinstance(info.get("start_ticks"), int):
                        start_ticks = info["start_ticks"]
            return None if _pid_alive(pid, start_ticks) else f"process {pid} is gone"
        if mtime is None:
            return "no owner file"
        if mtime < now - self.lease_seconds:
            return f"no heartbeat for {now - mtime:.0f}s"
        return None

    def reclaim_expired(self) -> int:
        """Take over the claims of dead or silent owners; return items put back in new/."""
        self._require_open()
        now = self._clock()
        moved = 0
        with self._spool_lock(exclusive=True):
            claims: dict[str, list[str]] = {}
            for name in _listdir(self._claimed):
                item, sep, owner = name.partition("@")
                if not sep or not _valid_owner(owner) or not _ID_RE.fullmatch(item):
                    self._quarantine(
                        os.path.join(self._claimed, name), "claimed", "not <id>@<owner>"
                    )
                    continue
                claims.setdefault(owner, []).append(item)
            owner_files: set[str] = set()
            markers: dict[str, tuple[str, float | None]] = {}
            for name in _listdir(self._owners):
                base, sep, stamp = name.partition(_EXPIRED)
                if sep:
                    markers[name] = (base, _float(stamp))
                elif not name.startswith("."):
                    owner_files.add(name)
            marked = {base for base, _ in markers.values()}
            for owner in sorted(set(claims) | owner_files):
                if owner == self.owner:
                    continue
                why = self._expired(owner, now, marked)
                if why is None:
                    continue
                # The owner file goes first: a slow but living owner then sees it lost.
                marker = f"{owner}{_EXPIRED}{int(now)}"
                if _rename_if_present(self._owner_path(owner), self._owner_path(marker)):
                    markers[marker] = (owner, float(int(now)))
                n = 0
                for item in claims.get(owner, []):
                    if _rename_if_present(
                        os.path.join(self._claimed, f"{item}@{owner}"),
                        os.path.join(self._new, item),
                    ):
                        n += 1
                if n:
                    log.warning(
                        "spool %s: took over %d claim(s) of %s (%s)",
                        self.path,
                        n,
                        owner,
                        why,
                        extra=event("lease_taken_over", reason=why),
                    )
                claims.pop(owner, None)
                moved += n
            for name, (base, when) in markers.items():
                if base not in claims and (when is None or when < now - EXPIRED_MAX_AGE):
                    with contextlib.suppress(FileNotFoundError):
                        os.unlink(self._owner_path(name))
            self._remove_stale_tmp(now)
        if moved:
            self._requeued()
            _fsync_dir(self._new)
            _fsync_dir(self._claimed)
        return moved

    def _remove_stale_tmp(self, now: float) -> None:
        with contextlib.suppress(FileNotFoundError), os.scandir(self._tmp) as it:
            for entry in it:
                written = _float(entry.name.split(".", 1)[0])
                if written is not None:
                    written /= 1e9
                else:  # not ours: judge by mtime
                    with contextlib.suppress(OSError):
                        written = entry.stat(follow_symlinks=False).st_mtime
                if written is not None and written < now - TMP_MAX_AGE:
                    with contextlib.suppress(FileNotFoundError, IsADirectoryError):
                        os.unlink(entry.path)

    # ------------------------------------------------------------------ queueing

    def known(self, item_id: str) -> bool:
        """Whether the item is in new/, claimed/, done/ or failed/ (checked in that order).

        Advisory: an item moving back into new/ during the check may be missed;
        enqueue() repeats the check under spool.lock.
        """
        self._require_open()
        if os.path.lexists(os.path.join(self._new, item_id)):
            return True
        if item_id in self._claimed_ids():
            return True
        return any(os.path.lexists(os.path.join(d, item_id)) for d in (self._done, self._failed))

    def _claimed_ids(self) -> set[str]:
        return {name.partition("@")[0] for name in _listdir(self._claimed)}

    def enqueue(self, records: Iterable[ItemRecord], *, again_if_done: bool = False) -> int:
        """Queue the records whose item is not known yet; return how many were new.

        again_if_done: an item in done/ is queued again (its done record removed first).
        Move mode asks for that: its sender deletes a source before it commits, so a
        source still there with a done record is a new file that shares path, size and
        mtime with one delivered before (or its deletion failed), and must be sent again.
        """
        self._require_open()
        now = self._clock()
        batch: dict[str, ItemRecord] = {}
        for rec in records:
            _check_record(rec)
            if rec.enqueued_at == 0.0:
                rec = replace(rec, enqueued_at=now)
            batch.setdefault(rec.id, rec)
        todo = list(batch.values())
        added = 0
        for start in range(0, len(todo), _CHUNK):
            added += self._enqueue_chunk(todo[start : start + _CHUNK], again_if_done)
        if added:
            if self._listed is not None:
                self._listed += added
            _fsync_dir(self._new)
            log.debug("spool %s: enqueued %d item(s)", self.path, added)
        return added

    def _enqueue_chunk(self, chunk: list[ItemRecord], again_if_done: bool) -> int:
        # Cheap unlocked pre-check: nothing written for items already known.
        claimed = self._claimed_ids()
        skip = (self._new, self._failed) if again_if_done else (self._new, self._done,
                                                                  self._failed)
        chunk = [r for r in chunk if r.id not in claimed
                 and not any(os.path.lexists(os.path.join(d, r.id)) for d in skip)]
        if not chunk:
            return 0
        # The chunk's records go into one file, made durable by one fsync; each item is
        # then published as a hard link to it, new/<id>: one file and one link per item
        # instead of a file, an fsync and a rename, and no per-item block to free later.
        tmp = self._write_tmp(_pack(chunk), mtime=min(_due(r) for r in chunk))
        added = 0
        try:
            with self._spool_lock(exclusive=True):
                # Exact check, in the order items flow: new, claimed, done, failed.
                in_new = {r.id for r in chunk if os.path.lexists(os.path.join(self._new, r.id))}
                claimed = self._claimed_ids()
                for rec in chunk:
                    i = rec.id
                    done = os.path.join(self._done, i)
                    if (
                        i in in_new
                        or i in claimed
                        or (not again_if_done and os.path.lexists(done))
                        or os.path.lexists(os.path.join(self._failed, i))
                    ):
                        continue
                    if again_if_done:
                        # one name at a time: a crash here leaves the item in neither
                        # state, and the next scan queues it (its source is still there)
                        with contextlib.suppress(FileNotFoundError):
                            os.unlink(done)
                    try:
                        os.link(tmp, os.path.join(self._new, i))
                    except FileExistsError:
                        continue
                    except FileNotFoundError:
                        log.warning(
                            "spool %s: temporary records vanished (clock step?); they "
                            "will be enqueued on the next scan", self.path)
                        break
                    added += 1
        finally:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(tmp)
        return added

    # ------------------------------------------------------------------ claiming

    def claim(self, *, max_items: int, max_bytes: int) -> list[Claim]:
        """Claim due records, oldest due first, up to max_items and max_bytes.

        At least one record is claimed if any is due, even if it alone exceeds
        max_bytes; the batch stops at the first record that would exceed it.
        """
        self._require_open()
        if max_items < 1:
            raise ValueError("max_items must be at least 1")
        self._ensure_lease()
        now = self._clock()
        # names kept per listing: many batches' worth (a listing of a million costs ~0.5 s),
        # at most ~64k of them (~13 MB), and never fewer than one batch
        keep = max(max_items, min(16 * max_items, 65536), 4096)
        claims: list[Claim] = []
        total = 0
        listings = 0
        while True:
            if self._queue_pos >= len(self._queue):
                # Listed already and nothing more to claim, or nothing due among the oldest
                # (only after a clock step: a record's due time orders it): one more
                # listing then, without the records now known not to be due.
                if listings and (claims or not self._queue_partial or listings >= 2):
                    break
                self._list_new(keep, now)
                listings += 1
                if not self._queue:
                    break
            _, ino, name = self._queue[self._queue_pos]
            if ino != self._queue_ino:
                self._order_chunk()
                _, ino, name = self._queue[self._queue_pos]
            self._queue_pos += 1
            cached = self._not_due.get(name)
            if cached is not None and cached[0] == ino and not _is_due(cached[1], cached[2], now):
                continue
            src = os.path.join(self._new, name)
            rec = self._read(src, name, "new")
            if rec is None:
                continue
            if not _is_due(rec.not_before, rec.retried_at, now):
                self._not_due[name] = (ino, rec.not_before, rec.retried_at)
                continue
            if claims and total + rec.size > max_bytes:
                self._queue_pos -= 1  # first in line for the next claim
                break
            dst = os.path.join(self._claimed, f"{name}@{self.owner}")
            if not _rename_if_present(src, dst):
                continue  # another sender won it
            self._not_due.pop(name, None)
            # Re-read what we actually hold: it may have been retried in between.
            held = self._read(dst, name, "claimed")
            if held is None:
                continue
            if not _is_due(held.not_before, held.retried_at, now):
                with self._spool_lock(exclusive=False):
                    _rename_if_present(dst, src)
                continue
            claims.append(Claim(held, Path(dst)))
            total += held.size
            if len(claims) >= max_items or total >= max_bytes:
                break
        if claims:
            if self._listed is not None:
                self._listed -= len(claims)
            _fsync_dir(self._claimed)
            _fsync_dir(self._new)
        return claims

    def _list_new(self, keep: int, now: float) -> None:
        """List new/ into the claim queue: the *keep* oldest-due names, leaving out those
        known not to be due at *now*.

        One scandir; file times come from the inode (the links of one enqueued chunk share
        it, so one stat per chunk), and only *keep* names are held: a claim over a million
        waiting records costs one listing and the memory of a few batches.  Items that come
        back to new/ through this spool (release, retry, takeover) reset the queue.
        """
        mtimes: dict[int, int] = {}  # inode -> mtime_ns, for this listing
        count = candidates = 0
        not_due = self._not_due

        def scan() -> Iterator[tuple[int, int, str]]:
            nonlocal count, candidates
            with contextlib.suppress(FileNotFoundError), os.scandir(self._new) as it:
                for entry in it:
                    name = entry.name
                    if not _ID_RE.fullmatch(name):
                        continue
                    ino = entry.inode()
                    count += 1
                    known = not_due.get(name)
                    if known is not None and known[0] == ino and \
                            not _is_due(known[1], known[2], now):
                        continue
                    mtime = mtimes.get(ino)
                    if mtime is None:
                        try:
                            mtime = entry.stat(follow_symlinks=False).st_mtime_ns
                        except FileNotFoundError:
                            continue
                        mtimes[ino] = mtime
                    candidates += 1
                    yield (mtime, ino, name)  # a chunk's links together: parsed once

        self._queue = heapq.nsmallest(keep, scan())
        self._queue_pos = 0
        self._queue_ino = -1
        self._queue_partial = candidates > keep
        self._listed = count
        self._not_due = {n: v for n, v in self._not_due.items()
                         if os.path.lexists(os.path.join(self._new, n))}

    def _order_chunk(self) -> None:
        """The links of one chunk share its file's time: order them by their records' own
        due times (the chunk is parsed once for the whole run, and cached for the reads)."""
        pos = self._queue_pos
        mtime, ino, name = self._queue[pos]
        self._queue_ino = ino
        end = pos + 1
        while end < len(self._queue) and self._queue[end][:2] == (mtime, ino):
            end += 1
        if end - pos < 2:
            return
        records = self._read_file(os.path.join(self._new, name), "new") or {}
        inf = float("inf")

        def due(entry: tuple[int, int, str]) -> tuple[float, str]:
            rec = records.get(entry[2])
            return (inf if rec is None else _due(rec), entry[2])

        self._queue[pos:end] = sorted(self._queue[pos:end], key=due)

    def _requeued(self) -> None:
        """Something of ours went back to new/: list it again at the next claim."""
        self._queue_pos = len(self._queue)

    def flush(self) -> None:
        """Make the state changes made so far durable: an fsync of each state directory
        (never a syncfs: the spool may share its filesystem with the data, whose
        writeback is not ours to force)."""
        for d in self._dirs.values():
            _fsync_dir(d)

    def _finish(self, claim: Claim, record: ItemRecord, dest_dir: str, mtime: float,
                *, durable: bool = True) -> bool:
        """Rewrite the claim's record over claimed/<id>@<owner>, then rename it into dest_dir.

        False (nothing changed) if the claim was taken over.
        """
        path = str(claim.path)
        dest = os.path.join(dest_dir, record.id)
        with self._spool_lock(exclusive=False):
            # Under the shared lock no takeover can move our claim, so the check holds
            # until both renames are done.
            if not os.path.lexists(path):
                return False
            tmp = self._write_tmp(_pack([record]), mtime=mtime, sync=durable)
            try:
                os.rename(tmp, path)
            except FileNotFoundError as e:
                raise SpoolError(f"temporary record {tmp} vanished") from e
            os.rename(path, dest)
        if durable:
            _fsync_dir(dest_dir)
            _fsync_dir(self._claimed)
        return True

    def complete(self, claim: Claim, *, sha256: str, durable: bool = True) -> bool:
        """claimed -> done/; False if the claim was lost (then leave the source alone)."""
        return self.complete_many([(claim, sha256)], durable=durable)[0]

    def complete_many(self, verified: Sequence[tuple[Claim, str]], *,
                      durable: bool = True) -> list[bool]:
        """claimed -> done/ for each (claim, sha256); per claim, False if it was lost (taken
        over by another sender).

        The done records of up to _CHUNK claims are written to one file, fsync'd, and each
        claim's entry is replaced by a hard link to it (a link renamed over
        claimed/<id>@<owner>, then renamed to done/<id>: one copy at every instant, and no
        block freed or written per item).  durable=False leaves the directory fsyncs to
        the caller's flush() at the end of its batch.  That is safe because a done record
        is bookkeeping, not the evidence a deletion rests on (the target's verification
        is, and move mode deletes before it commits): a record lost in a crash only makes
        the item be looked at again, and found delivered or its source gone.
        """
        self._require_open()
        now = self._clock()
        results = [False] * len(verified)
        for start in range(0, len(verified), _CHUNK):
            part = range(start, min(start + _CHUNK, len(verified)))
            with self._spool_lock(exclusive=False):
                # Under the shared lock no takeover can move our claims, so the check holds
                # until the renames are done.
                live = [(k, replace(verified[k][0].record, sha256=verified[k][1],
                                    completed_at=now, not_before=0.0))
                        for k in part if os.path.lexists(verified[k][0].path)]
                if not live:
                    continue
                tmp = self._write_tmp(_pack(rec for _, rec in live), mtime=now)
                try:
                    for k, rec in live:
                        claim = verified[k][0]
                        link = f"{tmp}.{k}"
                        os.link(tmp, link)
                        try:
                            os.rename(link, claim.path)
                        except FileNotFoundError as e:
                            raise SpoolError(f"temporary record {link} vanished") from e
                        os.rename(claim.path, os.path.join(self._done, rec.id))
                        claim.record = rec
                        results[k] = True
                finally:
                    with contextlib.suppress(FileNotFoundError):
                        os.unlink(tmp)
        if durable and any(results):
            _fsync_dir(self._done)
            _fsync_dir(self._claimed)
        for k, ok in enumerate(results):
            if not ok:
                log.warning(
                    "spool %s: claim on %r was lost before completion; not completed",
                    self.path,
                    verified[k][0].record.relpath,
                )
        return results

    def retry(
        self, claim: Claim, reason: str, *, retry_count: int, backoff: float, backoff_max: float
    ) -> str:
        """Count a failed attempt: back to new/ after a backoff ("queued"), or "failed"."""
        self._require_open()
        now = self._clock()
        rec = claim.record
        attempts = rec.attempts + 1
        if attempts > retry_count:
            new = replace(rec, attempts=attempts, last_error=reason, not_before=0.0)
            dest, mtime, result = self._failed, now, "failed"
        else:
            delay = min(backoff_max, backoff * 2.0 ** min(attempts - 1, 64))
            not_before = now + delay * self._rng.uniform(0.5, 1.0)
            new = replace(rec, attempts=attempts, last_error=reason, not_before=not_before,
                          retried_at=now)
            dest, mtime, result = self._new, not_before, "queued"
        if not self._finish(claim, new, dest, mtime=mtime):
            log.warning(
                "spool %s: claim on %r was lost; its new owner will try it", self.path, rec.relpath
            )
            return "queued"
        claim.record = new
        if result == "queued":
            self._requeued()
        return result

    def release(self, claim: Claim) -> None:
        """Back to new/ unchanged, no attempt counted."""
        self._require_open()
        with self._spool_lock(exclusive=False):
            moved = _rename_if_present(str(claim.path), os.path.join(self._new, claim.record.id))
        if moved:
            self._requeued()
            _fsync_dir(self._new)

    def drop(self, claim: Claim, reason: str) -> None:
        """Remove the record (its source vanished)."""
        self._require_open()
        with self._spool_lock(exclusive=False):
            try:
                os.unlink(claim.path)
            except FileNotFoundError:
                return
        _fsync_dir(self._claimed)
        log.info("spool %s: dropped %r: %s", self.path, claim.record.relpath, reason)

    # ------------------------------------------------------------------ inspection, upkeep

    def counts(self) -> dict[str, int]:
        """Number of records in each state."""
        self._require_open()
        return {state: len(_listdir(d)) for state, d in self._dirs.items()}

    def count(self, state: str) -> int:
        """Number of records in one state (one directory listing, no list kept)."""
        self._require_open()
        n = 0
        with contextlib.suppress(FileNotFoundError), os.scandir(self._dirs[state]) as it:
            for _ in it:
                n += 1
        return n

    def queued(self) -> int:
        """About how many records wait in new/, without listing a deep queue each time:
        below _EXACT_COUNT an exact count; above, the last listing's count, less what we
        claimed and plus what we enqueued since (another scanner's items show at the next
        listing, i.e. within a few batches)."""
        self._require_open()
        if self._listed is None or self._listed < _EXACT_COUNT:
            return self.count("new")
        return max(0, self._listed)

    def soonest_not_due(self) -> float | None:
        """The earliest not_before among the records the last claim found not yet due."""
        now = self._clock()
        times = [nb for _, nb, retried in self._not_due.values() if not now < retried]
        return min(times, default=None)

    def earliest_due(self) -> float | None:
        """When the soonest waiting record becomes claimable (epoch), from file times only.

        new/ files carry their due time as mtime (see the module docstring), so this is a
        directory scan with stat, no record is read: cheap enough for every wake-up.
        """
        self._require_open()
        soonest: float | None = None
        seen: set[int] = set()  # the links of one chunk share an inode: one stat for all
        try:
            with os.scandir(self._dirs["new"]) as it:
                for entry in it:
                    ino = entry.inode()
                    if ino in seen:
                        continue
                    seen.add(ino)
                    try:
                        t = entry.stat(follow_symlinks=False).st_mtime
                    except FileNotFoundError:
                        continue
                    soonest = t if soonest is None else min(soonest, t)
        except FileNotFoundError:
            return None
        return soonest

    def iter_records(self, state: str) -> Iterator[ItemRecord]:
        """The readable records in one state (new, claimed, done, failed)."""
        self._require_open()
        if state not in self._dirs:
            raise ValueError(f"unknown state {state!r}; expected one of {', '.join(STATES)}")
        d = self._dirs[state]
        for name in _names_by_inode(d):
            item = name.partition("@")[0]
            rec = self._read(os.path.join(d, name), item, state)
            if rec is not None:
                yield rec

    def retry_failed(self, ids: Iterable[str] | None = None) -> int:
        """failed/ -> new/ with attempts reset (all, or only the given ids)."""
        self._require_open()
        names = sorted(_listdir(self._failed)) if ids is None else list(ids)
        n = 0
        with self._spool_lock(exclusive=True):
            for item in names:
                if not _ID_RE.fullmatch(item):
                    continue
                path = os.path.join(self._failed, item)
                rec = self._read(path, item, "failed")
                if rec is None:
                    continue
                rec = replace(rec, attempts=0, not_before=0.0)
                tmp = self._write_tmp(_pack([rec]), mtime=_due(rec))
                os.rename(tmp, path)  # update in place, then move: never two copies
                os.rename(path, os.path.join(self._new, item))
                n += 1
        if n:
            self._requeued()
            _fsync_dir(self._new)
            _fsync_dir(self._failed)
        return n

    def forget_done(self, item_ids: Iterable[str]) -> int:
        """Delete these done records."""
        self._require_open()
        n = 0
        for item in item_ids:
            if not _ID_RE.fullmatch(item):
                continue
            with contextlib.suppress(FileNotFoundError):
                os.unlink(os.path.join(self._done, item))
                n += 1
        if n:
            _fsync_dir(self._done)
        return n

    def prune_done(self, older_than: float) -> int:
        """Delete done records completed before that epoch time (judged by file mtime)."""
        self._require_open()
        n = 0
        with contextlib.suppress(FileNotFoundError), os.scandir(self._done) as it:
            for entry in it:
                try:
                    if entry.stat(follow_symlinks=False).st_mtime >= older_than:
                        continue
                    os.unlink(entry.path)
                except FileNotFoundError:
                    continue
                n += 1
        if n:
            _fsync_dir(self._done)
        return n

    def load_state(self) -> dict[str, Any]:
        """state.json, or {} if there is none (a corrupt one is moved to corrupt/)."""
        self._require_open()
        try:
            with open(self._state_file, "rb") as f:
                data = f.read()
        except FileNotFoundError:
            return {}
        try:
            state = json.loads(data.decode("utf-8"))
            if not isinstance(state, dict):
                raise ValueError("not a JSON object")
        except ValueError as e:
            self._quarantine(self._state_file, "state", str(e))
            return {}
        return state

    def save_state(self, state: dict[str, Any]) -> None:
        """Replace state.json atomically."""
        self._require_open()
        data = (json.dumps(state, sort_keys=True, indent=1) + "\n").encode("utf-8")
        tmp = self._write_tmp(data)
        try:
            os.replace(tmp, self._state_file)
        except FileNotFoundError as e:
            raise SpoolError(f"temporary file {tmp} vanished") from e
        _fsync_dir(str(self.path))

    @contextlib.contextmanager
    def scan_lock(self) -> Iterator[None]:
        """Hold scan.lock (exclusive, non-blocking); raise SpoolBusy if another holds it."""
        self._require_open()
        fd = os.open(self._scan_lock_file, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o640)
        try:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                raise SpoolBusy(f"another scanner is running on {self.path}") from None
            yield
        finally:
            os.close(fd)


# ---------------------------------------------------------------------------- helpers


def _due(rec: ItemRecord) -> float:
    return max(rec.enqueued_at, rec.not_before)


def _is_due(not_before: float, retried_at: float, now: float) -> bool:
    """Whether a record may be claimed now.  Before the time of its last failed attempt
    means the clock was stepped back since: its backoff is over (one early retry, never
    a wait stretched by the size of the step)."""
    return not_before <= now or now < retried_at


def _float(text: str) -> float | None:
    try:
        return float(int(text))
    except ValueError:
        return None


def _names_by_inode(d: str) -> list[str]:
    """The names in directory d, the links of one chunk file together (so a reader
    parses each chunk once); [] if d is gone."""
    try:
        with os.scandir(d) as it:
            return [name for _, name in sorted((e.inode(), e.name) for e in it)]
    except FileNotFoundError:
        return []


def _listdir(d: str) -> list[str]:
    try:
        return os.listdir(d)
    except FileNotFoundError:
        return []


def _rename_if_present(src: str, dst: str) -> bool:
    try:
        os.rename(src, dst)
    except FileNotFoundError:
        return False
    return True


def _fsync_dir(d: str) -> None:
    fd = os.open(d, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
