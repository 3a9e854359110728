"""Deleting a delivered source (move mode), and finishing a deletion a crash cut short.

The sender deletes a source right after its commit (``claimed/`` -> ``done/``).  A
sender killed between the two leaves a done record and the source; whichever scans the
stream next -- ``mstm-send``'s own scan or ``mstm-scan`` feeding ``mstm-send --no-scan``
-- finds a ready item whose id (path, size, mtime) is in ``done/`` and finishes the
deletion through :func:`finish_deletions`.  Both ways go through :func:`delete_source`:

* only the verified version goes: a file item must still have the size and mtime that
  were verified; a directory item is checked file by file (the regular files and their
  sizes and mtimes that were hashed, or, when finishing, the size total and newest mtime
  of its whole tree, which is what its id was made of);
* the path is opened one component at a time without following symbolic links, so a
  directory swapped for a link cannot lead the deletion out of the stream's directory;
* a file item that is a symbolic link (``follow_symlinks = true``) is judged by the file
  it points to, and only the link is removed, never that file;
* each deletion is logged as a ``source_deleted`` event; a version that changed is kept
  with a warning.
"""

from __future__ import annotations

import contextlib
import errno
import logging
import os
import shutil
import stat
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from mstm import scan as scanning
from mstm.diskwatch import tree_signature
from mstm.log import event, fields, show
from mstm.spool import item_id

log = logging.getLogger("mstm.send")

Version = tuple[int, int]  # (size, mtime_ns)


def delete_source(stream: Any, relpath: str, versions: dict[str, Version], is_dir: bool, *,
                  whole: Version | None, level: int = logging.DEBUG) -> bool:
    """Delete item *relpath* of *stream* if it still is the version that was verified.

    *versions*: relpath -> (size, mtime_ns) of every regular file that was hashed (a file
    item has one entry, its own).  *whole*: when finishing an interrupted deletion, the
    item's (size, mtime_ns) as its id records them (for a directory: the total of its
    regular files and the newest mtime in its tree); then a directory is checked against
    that instead of *versions*.  *level*: of the log line of a deletion.  True if the
    source was deleted.
    """
    name_shown = show(relpath)
    try:
        dir_fd, name = scanning.open_parent(Path(stream.directory), relpath)
    except FileNotFoundError:
        return False
    except (OSError, ValueError) as err:
        if getattr(err, "errno", None) in (errno.ELOOP, errno.ENOTDIR):
            reason = "a directory in its path is now a symbolic link or not a directory"
        else:
            reason = getattr(err, "strerror", None) or str(err)
        log.warning("%s: %s kept: cannot reach it safely (%s)", stream.name, name_shown,
                    reason, extra=fields(stream=stream.name, item=relpath, reason=reason))
        return False
    try:
        problem = _changed(stream, dir_fd, name, relpath, versions, is_dir, whole)
        if problem:
            log.warning("%s: %s changed after delivery (%s); kept", stream.name, name_shown,
                        problem, extra=fields(stream=stream.name, item=relpath, reason=problem))
            return False
        if is_dir:
            shutil.rmtree(name, dir_fd=dir_fd)  # fd-based: never follows a link inside
        else:
            os.unlink(name, dir_fd=dir_fd)  # a symbolic link itself, never what it points to
    except FileNotFoundError:
        return False
    except OSError as err:
        log.error("%s: cannot delete delivered source %s: %s", stream.name, name_shown,
                  err.strerror or err, extra=fields(stream=stream.name, item=relpath))
        return False
    finally:
        os.close(dir_fd)
    remove_marker(stream, relpath)
    how = "verified at target" if whole is None else \
        "verified at target earlier; finishing a deletion cut short"
    log.log(level, "%s: deleted source %s (%s)", stream.name, name_shown, how,
            extra=event("source_deleted", stream=stream.name, item=relpath))
    return True


def _changed(stream: Any, dir_fd: int, name: str, relpath: str, versions: dict[str, Version],
             is_dir: bool, whole: Version | None) -> str | None:
    """Why the item at dir_fd/name is not the verified version, or None if it is."""
    if not is_dir:
        st = os.stat(name, dir_fd=dir_fd, follow_symlinks=bool(stream.follow_symlinks))
        if not stat.S_ISREG(st.st_mode):
            return "no longer a regular file"
        want = whole if whole is not None else versions[relpath]
        return None if (st.st_size, st.st_mtime_ns) == want else "other size or mtime"
    st = os.stat(name, dir_fd=dir_fd, follow_symlinks=False)
    if not stat.S_ISDIR(st.st_mode):
        return "no longer a directory"
    if whole is not None:
        return None if tree_signature(dir_fd, name) == whole else "its tree changed"
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


def finish_deletions(stream: Any, spool_path: Path, ready: Sequence[scanning.Candidate], *,
                     level: int = logging.DEBUG) -> list[scanning.Candidate]:
    """Finish the deletions a crash cut short; return the ready items left to queue.

    In move mode a ready item whose id is in the spool's ``done/`` was verified at the
    target, but its source was not deleted (the sender died between its commit and the
    unlink): it is deleted now by :func:`delete_source`, with the same checks.  In
    mirror mode nothing is deleted and every item is returned.
    """
    if stream.outgoing.transfer_mode != "move":
        return list(ready)
    done = spool_path / "done"
    rest = []
    for c in ready:
        if (done / item_id(c.relpath, c.size, c.mtime_ns)).exists():
            version = (c.size, c.mtime_ns)
            delete_source(stream, c.relpath, {c.relpath: version}, c.is_dir, whole=version,
                          level=level)
        else:
            rest.append(c)
    return rest
