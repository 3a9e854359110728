"""Deleting a delivered source (move mode).

The sender deletes the sources of a verified batch *before* it commits the batch
(``claimed/`` -> ``done/``).  A crash in between leaves claims whose sources are gone: the
claims are taken over, found "vanished" and dropped; the target holds the verified
copies.  So a done record never means "a source may still be deleted": a ready source
whose id (path, size, mtime) is in ``done/`` in move mode is a *new* file that shares
them with one delivered before (or one whose deletion failed), and is queued and sent
again (``Spool.enqueue(..., again_if_done=True)``), never deleted unsent.

:func:`delete_source` deletes only the version that was verified:

* every path is reached through :mod:`mstm.safefs` (no symbolic link followed below the
  stream directory), so a directory swapped for a link cannot lead the deletion out of
  the stream's directory;
* a file goes only while it is still the very version that was hashed: same device and
  inode (a rename over it is seen), same size and mtime, same ctime (a rewrite in place
  with the mtime put back, ``touch -r``, is seen: it moves ctime);
* and only while no process on this host holds it open for writing or maps it shared
  and writable (:func:`mstm.openfiles.held_for_writing`: a writer through an ``mmap``
  does not move ctime until its pages are written back);
* where the times cannot prove it (the file's ctime lies within a timestamp tick of the
  moment it was hashed, :func:`unproven_ns`: a later write could fall in the same tick),
  it is hashed again and must still have the verified sha256;
* a directory item: exactly its verified regular files go, each judged as above, then
  the directories left empty, bottom-up (descriptor-based: any depth); whatever came
  meanwhile, or changed, stays where it is;
* a file item that is a symbolic link (``follow_symlinks = true``) is judged by the file
  it points to, and only the link is removed, never that file;
* each deletion is logged as a ``source_deleted`` event; a version that changed is kept
  with a warning; a deletion that fails is reported to the caller (``Deletion.error``).

The one window left: a process that opens (or maps) the file for writing between the
last of these checks and the ``unlink(2)`` itself, a few microseconds, writes into an
inode that is then no longer in the stream (see mstm(7), "What mstm guarantees").
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import logging
import os
import stat
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

from mstm import openfiles, safefs
from mstm.log import event, fields, show
from mstm.safefs import Version
from mstm.scan import marker_for

log = logging.getLogger("mstm.send")

# A file whose ctime is this close to the instant it was hashed is hashed again before
# it is deleted: the kernel stamps times from a clock that advances in ticks (a jiffy,
# 1-10 ms), and some filesystems keep whole seconds only, so a write in the same tick as
# the last one before the hash would leave ctime as it was.  A ctime with a sub-second
# part comes from a filesystem with fine timestamps: a tick's margin, generously; a
# ctime of whole seconds may come from one that keeps seconds: two of them.
UNPROVEN_NS = 2_000_000_000
UNPROVEN_FINE_NS = 50_000_000


def unproven_ns(ctime_ns: int) -> int:
    """How close to the hash a change must be for the times to prove nothing."""
    return UNPROVEN_FINE_NS if ctime_ns % 1_000_000_000 else UNPROVEN_NS
_HASH_BLOCK = 1 << 20


@dataclass(frozen=True)
class Deletion:
    """What delete_source did: true if the source was deleted (all of it)."""

    deleted: bool
    error: str | None = None  # the unlink failed: the source is still there

    def __bool__(self) -> bool:
        return self.deleted


@dataclass(frozen=True)
class Verified:
    """What the sender proved of one item: each regular file's version and sha256, and
    when it was hashed (ns since the epoch)."""

    versions: Mapping[str, Version]
    sha256: Mapping[str, str]
    hashed_at_ns: int


def delete_source(stream: Any, relpath: str, verified: Verified, is_dir: bool, *,
                  level: int = logging.DEBUG,
                  busy: set[tuple[int, int]] | None = None,
                  writers: Callable[[set[tuple[int, int]]], set[tuple[int, int]]] | None = None
                  ) -> Deletion:
    """Delete item *relpath* of *stream* if it still is the version that was verified.

    *level*: of the log line of a deletion.  *busy*: the (dev, inode) of files open for
    writing on this host, as :func:`writers_of` found them for a whole batch just before
    (one look at /proc per batch); None: look now, with *writers* (default
    :func:`mstm.openfiles.held_for_writing`).
    """
    name_shown = show(relpath)
    try:
        root_fd = safefs.open_root(stream.directory)
    except OSError as err:
        return _kept(stream, relpath, f"cannot open the stream directory: {err.strerror}")
    try:
        mine = {(v.dev, v.ino) for v in verified.versions.values()}
        if busy is None:
            busy = (writers or openfiles.held_for_writing)(mine)
        if not mine.isdisjoint(busy):
            return _kept(stream, relpath, "open for writing (or mapped writable) by a "
                                          "process on this host")
        if is_dir:
            return _delete_tree(stream, root_fd, relpath, verified, level)
        try:
            dir_fd, name = safefs.open_parent(root_fd, relpath)
        except FileNotFoundError:
            return Deletion(False)
        except (OSError, ValueError) as err:
            return _unreachable(stream, relpath, err)
        try:
            problem = _changed(stream, root_fd, dir_fd, name, relpath, verified)
            if problem:
                return _kept(stream, relpath, problem)
            os.unlink(name, dir_fd=dir_fd)  # a symbolic link itself, never what it points to
        except FileNotFoundError:
            return Deletion(False)
        except OSError as err:
            return _failed(stream, relpath, err)
        finally:
            os.close(dir_fd)
        remove_marker(stream, root_fd, relpath)
    finally:
        os.close(root_fd)
    log.log(level, "%s: deleted source %s (verified at target)", stream.name, name_shown,
            extra=event("source_deleted", stream=stream.name, item=relpath))
    return Deletion(True)


def writers_of(proofs: list[Verified]) -> set[tuple[int, int]]:
    """Which files of these verified items are open for writing (or mapped shared and
    writable) on this host now: one look at /proc for a whole batch."""
    keys = {(v.dev, v.ino) for p in proofs for v in p.versions.values()}
    return openfiles.held_for_writing(keys) if keys else set()


def _changed(stream: Any, root_fd: int, dir_fd: int, name: str, relpath: str,
             verified: Verified) -> str | None:
    """Why file *relpath* (dir_fd/name) is not the verified version, or None if it is."""
    st = os.stat(name, dir_fd=dir_fd, follow_symlinks=bool(stream.follow_symlinks))
    if not stat.S_ISREG(st.st_mode):
        return "no longer a regular file"
    return _judge(root_fd, relpath, st, verified, follow=bool(stream.follow_symlinks))


def _judge(root_fd: int, relpath: str, st: os.stat_result, verified: Verified, *,
           follow: bool = False) -> str | None:
    want = verified.versions.get(relpath)
    if want is None:
        return "not among the verified files"
    problem = want.same_file(st)
    if problem:
        return problem
    if st.st_ctime_ns + unproven_ns(st.st_ctime_ns) > verified.hashed_at_ns:
        # the times cannot prove that nothing was written since the hash: read it again
        try:
            digest = _sha256(root_fd, relpath, follow)
        except OSError as err:
            return f"cannot read it again: {err.strerror or err}"
        if digest != verified.sha256.get(relpath):
            return "its content changed after it was hashed"
    return None


def _sha256(root_fd: int, relpath: str, follow: bool) -> str:
    fd = safefs.open_regular(root_fd, relpath, follow_symlinks=follow)
    h = hashlib.sha256()
    with open(fd, "rb", buffering=0) as f:
        while chunk := f.read(_HASH_BLOCK):
            h.update(chunk)
    return h.hexdigest()


def _delete_tree(stream: Any, root_fd: int, relpath: str, verified: Verified,
                 level: int) -> Deletion:
    """Remove exactly the verified files of directory item *relpath*, then the
    directories left empty; anything else stays."""
    changed: list[str] = []

    def remove(rel: str, st: os.stat_result) -> bool:
        if not stat.S_ISREG(st.st_mode):
            return False  # never verified: a link, FIFO, ... (the sender refuses those)
        problem = _judge(root_fd, rel, st, verified)
        if problem and rel in verified.versions:
            changed.append(f"{show(rel)}: {problem}")
        return problem is None

    try:
        top = safefs.lstat_beneath(root_fd, relpath)
    except FileNotFoundError:
        return Deletion(False)
    except (OSError, ValueError) as err:
        return _unreachable(stream, relpath, err)
    if not stat.S_ISDIR(top.st_mode):
        return _kept(stream, relpath, "no longer a directory")
    try:
        pruned = safefs.prune(root_fd, relpath, remove)
    except OSError as err:
        return _failed(stream, relpath, err)
    if pruned.errors:
        rel, why = pruned.errors[0]
        log.error("%s: cannot delete delivered source %s: %s", stream.name, show(rel), why,
                  extra=fields(stream=stream.name, item=relpath, reason=why))
        return Deletion(False, why)
    if changed:
        _kept(stream, relpath, "; ".join(changed[:5]) + (" ..." if len(changed) > 5 else ""))
    if pruned.kept or changed:
        log.info("%s: %s: the verified files were deleted; %d other entr(y/ies) stay",
                 stream.name, show(relpath), pruned.kept,
                 extra=fields(stream=stream.name, item=relpath))
        return Deletion(False)
    remove_marker(stream, root_fd, relpath)
    log.log(level, "%s: deleted source %s (verified at target)", stream.name, show(relpath),
            extra=event("source_deleted", stream=stream.name, item=relpath))
    return Deletion(True)


def _kept(stream: Any, relpath: str, problem: str) -> Deletion:
    log.warning("%s: %s changed after delivery (%s); kept", stream.name, show(relpath),
                problem, extra=fields(stream=stream.name, item=relpath, reason=problem))
    return Deletion(False)


def _unreachable(stream: Any, relpath: str, err: OSError | ValueError) -> Deletion:
    if getattr(err, "errno", None) in (errno.ELOOP, errno.ENOTDIR, errno.EXDEV):
        reason = "a directory in its path is now a symbolic link or not a directory"
    else:
        reason = getattr(err, "strerror", None) or str(err)
    log.warning("%s: %s kept: cannot reach it safely (%s)", stream.name, show(relpath),
                reason, extra=fields(stream=stream.name, item=relpath, reason=reason))
    return Deletion(False)


def _failed(stream: Any, relpath: str, err: OSError) -> Deletion:
    why = str(err.strerror or err)
    log.error("%s: cannot delete delivered source %s: %s", stream.name, show(relpath), why,
              extra=fields(stream=stream.name, item=relpath, reason=why))
    return Deletion(False, why)


def remove_marker(stream: Any, root_fd: int, relpath: str) -> None:
    """Remove the ready marker of a deleted item (as the scanner names it), if any."""
    marker = marker_for(stream.ready_marker, relpath)
    if not marker:
        return
    try:
        dir_fd, name = safefs.open_parent(root_fd, marker)
    except (OSError, ValueError):
        return
    try:
        with contextlib.suppress(OSError):  # gone, or a directory: nothing to do
            os.unlink(name, dir_fd=dir_fd)
    finally:
        os.close(dir_fd)
