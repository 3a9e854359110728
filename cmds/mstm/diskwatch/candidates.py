"""What may be deleted at VLOW, and deleting it only if it is still what was judged.

Safe candidates are items whose ``done/`` record says this exact version (size and mtime)
was verified at the target; undelivered ones are every other item (only with
``delete_undelivered``).  Paths are opened from the stream's directory with O_NOFOLLOW,
so a symlinked directory cannot lead the deletion elsewhere.
"""

from __future__ import annotations

import contextlib
import os
import stat
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from mstm import safefs
from mstm.config import StreamConfig
from mstm.spool import ItemRecord, read_records

_DIR_FLAGS = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC


@dataclass(frozen=True)
class Candidate:
    """An item that may be deleted to free space."""

    stream: str
    priority: int
    directory: Path
    relpath: str
    size: int
    mtime_ns: int
    is_dir: bool
    delivered: bool


def _open_parent(root: Path, relpath: str) -> tuple[int, str]:
    """An fd of the directory holding *relpath* (no symlink followed) and the last name."""
    with safefs.opened_root(root) as root_fd:
        return safefs.open_parent(root_fd, relpath)


def tree_signature(dir_fd: int, name: str) -> tuple[int, int]:
    """(total size of regular files, newest mtime) of a directory unit, as mstm-scan sums it."""
    size, newest = 0, 0
    for entry in safefs.walk(dir_fd, name):
        newest = max(newest, entry.st.st_mtime_ns)
        if entry.is_file:
            size += entry.st.st_size
    return size, newest


def _matches(dir_fd: int, name: str, size: int, mtime_ns: int, is_dir: bool) -> bool:
    """Is the item still exactly the version described (and not a symlink)?"""
    try:
        st = os.stat(name, dir_fd=dir_fd, follow_symlinks=False)
        if is_dir:
            return stat.S_ISDIR(st.st_mode) and tree_signature(dir_fd, name) == (size, mtime_ns)
        return stat.S_ISREG(st.st_mode) and (st.st_size, st.st_mtime_ns) == (size, mtime_ns)
    except OSError:
        return False


def done_records(spool_dir: Path) -> Iterator[ItemRecord]:
    """The readable records of a spool's done/ directory (read only; nothing is created)."""
    return read_records(spool_dir / "done")


def safe_candidates(stream: StreamConfig) -> list[Candidate]:
    """Items of *stream* whose exact version was verified at the target, oldest first."""
    found = []
    for rec in done_records(stream.spool_dir):
        try:
            fd, name = _open_parent(stream.directory, rec.relpath)
        except (OSError, ValueError):
            continue
        try:
            if _matches(fd, name, rec.size, rec.mtime_ns, rec.is_dir):
                found.append(Candidate(stream.name, stream.priority, stream.directory,
                                       rec.relpath, rec.size, rec.mtime_ns, rec.is_dir, True))
        finally:
            os.close(fd)
    found.sort(key=lambda c: (c.mtime_ns, c.relpath))
    return found


def undelivered_candidates(stream: StreamConfig, skip: set[str]) -> list[Candidate]:
    """Every other item of *stream* (names starting with "." excepted), oldest first."""
    found = []
    root = str(stream.directory)
    if stream.transfer_unit == "dir":
        with contextlib.suppress(OSError), os.scandir(root) as it:
            for entry in it:
                if entry.name.startswith(".") or entry.name in skip:
                    continue
                try:
                    if not entry.is_dir(follow_symlinks=False):
                        continue
                    fd = os.open(root, _DIR_FLAGS)
                    try:
                        size, mtime = tree_signature(fd, entry.name)
                    finally:
                        os.close(fd)
                except OSError:
                    continue
                found.append(Candidate(stream.name, stream.priority, stream.directory,
                                       entry.name, size, mtime, True, False))
    else:
        with contextlib.suppress(OSError), safefs.opened_root(root) as root_fd:
            for e in safefs.walk(root_fd, "", on_error=lambda rel, err: None):
                if e.depth == 0 or not e.is_file or e.relpath in skip:
                    continue
                if any(p.startswith(".") for p in e.relpath.split("/")):
                    continue
                found.append(Candidate(stream.name, stream.priority, stream.directory,
                                       e.relpath, e.st.st_size, e.st.st_mtime_ns, False, False))
    found.sort(key=lambda c: (c.mtime_ns, c.relpath))
    return found


def delete_item(c: Candidate) -> bool:
    """Delete *c* if it is still exactly the version judged; False if it changed or went."""
    try:
        fd, name = _open_parent(c.directory, c.relpath)
    except (OSError, ValueError):
        return False
    try:
        judged_ns = time.time_ns()
        if not _matches(fd, name, c.size, c.mtime_ns, c.is_dir):
            return False
        if c.is_dir:
            # what was judged, and nothing that came (or changed) since
            pruned = safefs.prune(fd, name, lambda _rel, st: st.st_ctime_ns < judged_ns)
            return not pruned.kept and not pruned.errors
        else:
            os.unlink(name, dir_fd=fd)
        return True
    except FileNotFoundError:
        return False
    finally:
        os.close(fd)
