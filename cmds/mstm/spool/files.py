"""The files of one spool directory, and the few file operations the spool is built of.

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
    spool.lock             flock: makes enqueue's duplicate check exact (see spool.py)

SpoolFiles holds these paths and the operations on them: creating the layout, writing a
temporary file, holding spool.lock and scan.lock, reading a record (through the parse
cache) and quarantining an unreadable one, reading and replacing state.json, removing
stale tmp/ files.  The small directory helpers
below it (fsync_dir, listdir, rename_if_present) are used by every part of the spool.
"""

from __future__ import annotations

import contextlib
import fcntl
import itertools
import json
import logging
import os
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

from mstm.spool.errors import SpoolBusy, SpoolError
from mstm.spool.records import ItemRecord, RecordFiles

log = logging.getLogger("mstm.spool")

STATES = ("new", "claimed", "done", "failed")
TMP_MAX_AGE = 3600.0  # seconds after which a tmp/ file is garbage


class SpoolFiles:
    """The paths of one spool directory and the primitive operations on its files."""

    def __init__(self, path: Path, clock: Callable[[], float]) -> None:
        self.path = path
        self._clock = clock
        d = str(path)
        self.tmp = os.path.join(d, "tmp")
        self.new = os.path.join(d, "new")
        self.claimed = os.path.join(d, "claimed")
        self.done = os.path.join(d, "done")
        self.failed = os.path.join(d, "failed")
        self.owners = os.path.join(d, "owners")
        self.corrupt = os.path.join(d, "corrupt")
        self.state_file = os.path.join(d, "state.json")
        self.scan_lock_file = os.path.join(d, "scan.lock")
        self.spool_lock_file = os.path.join(d, "spool.lock")
        self.state_lock_file = os.path.join(d, "state.lock")
        self.states = {
            "new": self.new,
            "claimed": self.claimed,
            "done": self.done,
            "failed": self.failed,
        }
        self._seq = itertools.count()
        self._records = RecordFiles()

    def create(self, owner: str) -> None:
        """Create the layout (mode 0o750) and check it is writable and supports hard
        links, writing a probe as owner; SpoolError if not."""
        try:
            self.path.mkdir(mode=0o750, parents=True, exist_ok=True)
            for d in (self.tmp, *self.states.values(), self.owners):
                os.makedirs(d, mode=0o750, exist_ok=True)
            for lock in (self.scan_lock_file, self.spool_lock_file):
                os.close(os.open(lock, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o640))
            probe = self.write_tmp(b"probe\n", owner)
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

    def write_tmp(self, data: bytes, owner: str, mtime: float | None = None, *,
                  sync: bool = True) -> str:
        """Write data to a new tmp/ file named for owner, set its mtime, fsync it (unless
        the caller makes it durable another way); its path."""
        name = f"{int(self._clock() * 1e9)}.{owner}.{next(self._seq)}"
        path = os.path.join(self.tmp, name)
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
    def lock(self, *, exclusive: bool) -> Iterator[None]:
        """Hold spool.lock, shared or exclusive (see spool.py for who holds it how)."""
        # A fresh descriptor each time: flock belongs to the open file, so threads and
        # several Spool objects in one process exclude each other too.
        fd = os.open(self.spool_lock_file, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o640)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX if exclusive else fcntl.LOCK_SH)
            yield
        finally:
            os.close(fd)

    def read(self, path: str, expect_id: str, state: str) -> ItemRecord | None:
        """The record at path; None if it vanished or was corrupt (then quarantined).

        A record file is never changed in place (a change is a new file renamed over the
        old name), and the entries of one enqueued or completed chunk are hard links to one
        file, so parsed files are cached by device, inode, size and first line (which holds
        the file's random token, see records.pack): reading the records of a batch parses
        each chunk once.
        """
        records = self.read_file(path, state)
        if records is None:
            return None
        rec = records.get(expect_id)
        if rec is None:
            self.quarantine(path, state, f"holds no record for item {expect_id}")
        return rec

    def read_file(self, path: str, state: str) -> dict[str, ItemRecord] | None:
        """All records of the file at path, by id (see read)."""
        try:
            return self._records.load(path)
        except FileNotFoundError:
            return None
        except (OSError, ValueError) as e:  # ValueError includes JSON, UTF-8, base64 errors
            why = e.strerror if isinstance(e, OSError) and e.strerror else str(e)
            self.quarantine(path, state, why or type(e).__name__)
            return None

    def quarantine(self, path: str, state: str, why: str) -> None:
        """Move an unreadable file of the given state to corrupt/, with a warning."""
        name = os.path.basename(path)
        os.makedirs(self.corrupt, mode=0o750, exist_ok=True)
        dest = os.path.join(self.corrupt, f"{state}.{name}.{time.time_ns()}")
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

    @contextlib.contextmanager
    def scan_lock(self) -> Iterator[None]:
        """Hold scan.lock (exclusive, non-blocking); raise SpoolBusy if another holds it."""
        fd = os.open(self.scan_lock_file, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o640)
        try:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                raise SpoolBusy(f"another scanner is running on {self.path}") from None
            yield
        finally:
            os.close(fd)

    @contextlib.contextmanager
    def state_lock(self) -> Iterator[None]:
        """Hold state.lock (exclusive, blocking): one read-modify-write of state.json at a
        time, across the processes and hosts sharing the spool (readers need none: the
        file is replaced by a rename)."""
        fd = os.open(self.state_lock_file,
                     os.O_RDWR | os.O_CREAT | os.O_CLOEXEC | os.O_NOFOLLOW, 0o640)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
            yield
        finally:
            os.close(fd)

    def load_state(self) -> dict[str, Any]:
        """state.json, or {} if there is none (a corrupt one is moved to corrupt/)."""
        try:
            with open(self.state_file, "rb") as f:
                data = f.read()
        except FileNotFoundError:
            return {}
        try:
            state = json.loads(data.decode("utf-8"))
            if not isinstance(state, dict):
                raise ValueError("not a JSON object")
        except ValueError as e:
            self.quarantine(self.state_file, "state", str(e))
            return {}
        return state

    def save_state(self, state: dict[str, Any], owner: str) -> None:
        """Replace state.json atomically (through a tmp/ file named for owner)."""
        data = (json.dumps(state, sort_keys=True, indent=1) + "\n").encode("utf-8")
        tmp = self.write_tmp(data, owner)
        try:
            os.replace(tmp, self.state_file)
        except FileNotFoundError as e:
            raise SpoolError(f"temporary file {tmp} vanished") from e
        fsync_dir(str(self.path))

    def remove_stale_tmp(self, now: float) -> None:
        """Delete the tmp/ files written more than TMP_MAX_AGE before now."""
        with contextlib.suppress(FileNotFoundError), os.scandir(self.tmp) as it:
            for entry in it:
                written = parse_seconds(entry.name.split(".", 1)[0])
                if written is not None:
                    written /= 1e9
                else:  # not ours: judge by mtime
                    with contextlib.suppress(OSError):
                        written = entry.stat(follow_symlinks=False).st_mtime
                if written is not None and written < now - TMP_MAX_AGE:
                    with contextlib.suppress(FileNotFoundError, IsADirectoryError):
                        os.unlink(entry.path)


# ---------------------------------------------------------------------------- helpers


def parse_seconds(text: str) -> float | None:
    """The whole number in text (a time in a file name) as a float; None if it is none."""
    try:
        return float(int(text))
    except ValueError:
        return None


def listdir(d: str) -> list[str]:
    """The names in directory d; [] if d is gone."""
    try:
        return os.listdir(d)
    except FileNotFoundError:
        return []


def rename_if_present(src: str, dst: str) -> bool:
    """Rename src to dst; False if src was gone."""
    try:
        os.rename(src, dst)
    except FileNotFoundError:
        return False
    return True


def fsync_dir(d: str) -> None:
    """Make the entries of directory d durable."""
    fd = os.open(d, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
