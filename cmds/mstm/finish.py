"""Deleting a delivered source (move mode).

The sender deletes the sources of a verified batch *before* it commits the batch
(``claimed/`` -> ``done/``).  A crash in between leaves claims whose sources are gone: the
claims are taken over, found "vanished" and dropped; the target holds the verified
copies.  So a done record never means "a source may still be deleted": a ready source
whose id (path, size, mtime) is in ``done/`` in move mode is a *new* file that shares
them with one delivered before (or one whose deletion failed), and is queued and sent
again (``Spool.enqueue(..., again_if_done=True)``), never deleted unsent.

:func:`delete_source`:

* only the verified version goes: a file item must still have the size and mtime that
  were verified; a directory item is checked file by file (the regular files and their
  sizes and mtimes that were hashed);
* the path is opened one component at a time without following symbolic links, so a
  directory swapped for a link cannot lead the deletion out of the stream's directory;
* a file item that is a symbolic link (``follow_symlinks = true``) is judged by the file
  it points to, and only the link is removed, never that file;
* each deletion is logged as a ``source_deleted`` event; a version that changed is kept
  with a warning; a deletion that fails is reported to the caller (``Deletion.error``).
"""

from __future__ import annotations

import contextlib
import errno
import logging
import os
import shutil
import stat
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from mstm import scan as scanning
from mstm.log import event, fields, show

log = logging.getLogger("mstm.send")

Version = tuple[int, int]  # (size, mtime_ns)


@dataclass(frozen=True)
class Deletion:
    """What delete_source did: true if the source was deleted."""

    deleted: bool
    error: str | None = None  # the unlink or rmtree failed: the source is still there

    def __bool__(self) -> bool:
        return self.deleted


def delete_source(stream: Any, relpath: str, versions: dict[str, Version], is_dir: bool, *,
                  level: int = logging.DEBUG) -> Deletion:
    """Delete item *relpath* of *stream* if it still is the version that was verified.

    *versions*: relpath -> (size, mtime_ns) of every regular file that was hashed (a file
    item has one entry, its own).  *level*: of the log line of a deletion.
    """
    name_shown = show(relpath)
    try:
        dir_fd, name = scanning.open_parent(Path(stream.directory), relpath)
    except FileNotFoundError:
        return Deletion(False)
    except (OSError, ValueError) as err:
        if getattr(err, "errno", None) in (errno.ELOOP, errno.ENOTDIR):
            reason = "a directory in its path is now a symbolic link or not a directory"
        else:
            reason = getattr(err, "strerror", None) or str(err)
        log.warning("%s: %s kept: cannot reach it safely (%s)", stream.name, name_shown,
                    reason, extra=fields(stream=stream.name, item=relpath, reason=reason))
        return Deletion(False)
    try:
        problem = _changed(stream, dir_fd, name, relpath, versions, is_dir)
        if problem:
            log.warning("%s: %s changed after delivery (%s); kept", stream.name, name_shown,
                        problem, extra=fields(stream=stream.name, item=relpath, reason=problem))
            return Deletion(False)
        if is_dir:
            shutil.rmtree(name, dir_fd=dir_fd)  # fd-based: never follows a link inside
        else:
            os.unlink(name, dir_fd=dir_fd)  # a symbolic link itself, never what it points to
    except FileNotFoundError:
        return Deletion(False)
    except OSError as err:
        why = str(err.strerror or err)
        log.error("%s: cannot delete delivered source %s: %s", stream.name, name_shown, why,
                  extra=fields(stream=stream.name, item=relpath, reason=why))
        return Deletion(False, why)
    finally:
        os.close(dir_fd)
    remove_marker(stream, relpath)
    log.log(level, "%s: deleted source %s (verified at target)", stream.name, name_shown,
            extra=event("source_deleted", stream=stream.name, item=relpath))
    return Deletion(True)


def _changed(stream: Any, dir_fd: int, name: str, relpath: str, versions: dict[str, Version],
             is_dir: bool) -> str | None:
    """Why the item at dir_fd/name is not the verified version, or None if it is."""
    if not is_dir:
        st = os.stat(name, dir_fd=dir_fd, follow_symlinks=bool(stream.follow_symlinks))
        if not stat.S_ISREG(st.st_mode):
            return "no longer a regular file"
        return None if (st.st_size, st.st_mtime_ns) == versions[relpath] else \
            "other size or mtime"
    st = os.stat(name, dir_fd=dir_fd, follow_symlinks=False)
    if not stat.S_ISDIR(st.st_mode):
        return "no longer a directory"
    base = os.fsencode(stream.directory)
    now: dict[str, Version] = {}
    for p in scanning.regular_files(os.path.join(base, os.fsencode(relpath))):
        s = os.stat(p, follow_symlinks=False)
        now[os.fsdecode(os.path.relpath(p, base))] = (s.st_size, s.st_mtime_ns)
    return None if now == versions else "a file in it changed, came or went"


def remove_marker(stream: Any, relpath: str) -> None:
    """Remove the ready marker of a deleted item (as the scanner names it), if any."""
    marker = scanning.marker_for(stream.ready_marker, relpath)
    if not marker:
        return
    try:
        dir_fd, name = scanning.open_parent(Path(stream.directory), marker)
    except (OSError, ValueError):
        return
    try:
        with contextlib.suppress(OSError):  # gone, or a directory: nothing to do
            os.unlink(name, dir_fd=dir_fd)
    finally:
        os.close(dir_fd)
