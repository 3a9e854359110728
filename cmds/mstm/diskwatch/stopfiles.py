"""Stop files: where each stream has one, when it is wanted, and placing one safely.

A stop file is created with O_EXCL, never over an existing one; a :class:`StopRecord`
(its inode and first line) is what lets :class:`~mstm.diskwatch.watch.DiskWatch` remove
only a file that is still exactly the one it placed (:func:`is_ours`).
"""

from __future__ import annotations

import logging
import os
import stat
from dataclasses import dataclass
from pathlib import Path

from mstm.config import StreamConfig
from mstm.diskwatch.levels import Level

log = logging.getLogger("mstm.diskwatch")

STOP_MARK = "mstm-diskwatch:"


@dataclass(frozen=True)
class Target:
    """One stop file of one stream: in its directory, or in its incoming area."""

    stream: str
    priority: int
    directory: Path
    stop_name: str
    side: str  # "outgoing" | "incoming"

    @property
    def path(self) -> Path:
        return self.directory / self.stop_name


def targets_of(stream: StreamConfig) -> list[Target]:
    """The stop files of *stream*: in its directory, and in its incoming area if that
    exists on this host (it does where mstm-receive receives for the stream)."""
    found = [Target(stream.name, stream.priority, stream.directory,
                    stream.outgoing.stop_file, "outgoing")]
    incoming_dir = getattr(stream.incoming, "incoming_dir", None)
    if incoming_dir is not None and os.path.isdir(incoming_dir):
        incoming = Target(stream.name, stream.priority, Path(incoming_dir),
                          stream.incoming.stop_file, "incoming")
        if incoming.path != found[0].path:
            found.append(incoming)
    return found


def wants_stop(level: Level, priority: int, base: int) -> bool:
    """Should a stream that is running be paused at this level?"""
    return level == Level.VLOW or (level == Level.LOW and priority <= base)


def keeps_stop(level: Level, priority: int, base: int) -> bool:
    """May a stop file we placed stay?  (Paused at LOW: until GOOD; at VLOW: until OKAY.)"""
    return level <= Level.LOW or (level == Level.OKAY and priority <= base)


@dataclass(frozen=True)
class StopRecord:
    """A stop file this program placed, as recorded in the state file."""

    stream: str
    dev: int
    ino: int
    first_line: str
    placed_at: float
    level: str


def _first_line(fd: int) -> str:
    data = os.read(fd, 512)
    return data.split(b"\n", 1)[0].decode("utf-8", "replace")


def is_ours(path: Path, rec: StopRecord) -> bool:
    """Is the file at *path* still exactly the stop file we placed?"""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC)
    except OSError:
        return False
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode) or (st.st_dev, st.st_ino) != (rec.dev, rec.ino):
            return False
        return _first_line(fd) == rec.first_line
    finally:
        os.close(fd)


def place_stop_file(path: Path, text: str) -> tuple[int, int, str] | None:
    """Create *path* with *text*, never over an existing file; (dev, ino, first line).

    None if a file of that name exists already.  On a full disk the file may stay empty:
    it pauses the stream all the same.
    """
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC,
                     0o644)
    except FileExistsError:
        return None
    try:
        data = text.encode("utf-8")
        try:
            written = os.write(fd, data)
            if written != len(data):
                raise OSError("short write")
            first = text.split("\n", 1)[0]
        except OSError as e:
            log.warning("stop file %s: could not write its text (%s); left empty", path, e)
            os.ftruncate(fd, 0)
            first = ""
        st = os.fstat(fd)
    finally:
        os.close(fd)
    return st.st_dev, st.st_ino, first
