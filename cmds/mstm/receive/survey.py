"""Has anything in a directory tree changed since a given time?  (See :func:`survey`.)

Used to tell an abandoned batch directory (nothing in it changed for a long time) from
one a sender is still writing, without ever following a symbolic link or entering what
is mounted inside.
"""

from __future__ import annotations

import errno
import os
import stat
from collections.abc import Callable
from dataclasses import dataclass
from typing import Literal

from mstm.receive.areas import REFUSING
from mstm.safefs import DIR_FLAGS, mount_id

# The depth beyond which a directory is left alone (each level holds a descriptor).
MAX_DEPTH = 256


def changed_at(st: os.stat_result, now: float, *, ctime: bool = True) -> float:
    """When an entry last changed: the later of its mtime and ctime (rsync --times
    back-dates mtimes; ctime still says when the file was written).  An mtime in the
    future (a clock ahead somewhere) is no change: its ctime says when it was set."""
    changed = st.st_ctime if ctime else 0.0
    if st.st_mtime <= now:
        changed = max(changed, st.st_mtime)
    return changed


@dataclass
class Survey:
    """What survey() found in a directory tree."""

    # old: nothing changed since the time asked; fresh: something did (or vanished, or
    # was replaced); gone: no such directory; foreign: a mount point, too deep or not
    # readable; unfinished: out of budget, or stop was asked
    verdict: Literal["old", "fresh", "gone", "foreign", "unfinished"]
    newest: float = 0.0  # the latest change among the entries examined
    bytes: int = 0  # sizes of the regular files
    entries: int = 0  # examined, the directory itself included
    detail: str = ""


def survey(parent_fd: int, name: str, *, dev: int, mount: str | None, since: float,
           now: float, budget: int | None, tick: Callable[[], bool],
           root_ctime: bool = True) -> Survey:
    """Examine the tree parent_fd/name: has any entry, the directory itself included,
    changed after *since* (see changed_at; *now*: the wall-clock time)?

    Every directory is opened with O_NOFOLLOW relative to its parent's descriptor and
    checked to be the one just examined, so a symbolic link is never followed and nothing
    outside the tree is looked at; an entry on another device than *dev*, or a directory
    on another mount than *mount* (see safefs.mount_id; a bind mount), ends the look
    ("foreign"): what is mounted there is never ours to remove.  It stops at the first
    entry changed after *since* ("fresh"; one that vanishes or is replaced meanwhile
    counts as changed now), after *budget* entries or when *tick* (called every 1000
    entries) returns False ("unfinished").  *root_ctime*: count the directory's own
    ctime (not after we renamed it: that changed it).  At most MAX_DEPTH directories are
    held open.
    """
    try:
        root = os.open(name, DIR_FLAGS, dir_fd=parent_fd)
    except FileNotFoundError:
        return Survey("gone")
    except OSError as err:
        if err.errno in REFUSING:
            return Survey("gone")  # not a directory (any more)
        return Survey("foreign", detail=err.strerror or str(err))
    found = Survey("old")
    fds = [root]
    try:
        st = os.fstat(root)
        found.entries = 1
        found.newest = changed_at(st, now, ctime=root_ctime)
        if st.st_dev != dev or (mount is not None and mount_id(root) != mount):
            found.verdict, found.detail = "foreign", "a mount point"
            return found
        if found.newest > since:
            found.verdict = "fresh"
            return found
        listings = [iter(os.listdir(root))]
        while listings:
            entry = next(listings[-1], None)
            if entry is None:
                os.close(fds.pop())
                listings.pop()
                continue
            found.entries += 1
            if found.entries % 1000 == 0 and not tick():
                found.verdict = "unfinished"
                return found
            if budget is not None and found.entries > budget:
                found.verdict = "unfinished"
                return found
            try:
                est = os.stat(entry, dir_fd=fds[-1], follow_symlinks=False)
            except FileNotFoundError:
                found.verdict, found.newest = "fresh", now
                return found
            found.newest = max(found.newest, changed_at(est, now))
            if found.newest > since:
                found.verdict = "fresh"
                return found
            if est.st_dev != dev:
                found.verdict, found.detail = "foreign", "a mount point inside"
                return found
            if stat.S_ISREG(est.st_mode):
                found.bytes += est.st_size
            elif stat.S_ISDIR(est.st_mode):
                if len(fds) >= MAX_DEPTH:
                    found.verdict = "foreign"
                    found.detail = f"deeper than {MAX_DEPTH} levels"
                    return found
                try:
                    child = os.open(entry, DIR_FLAGS, dir_fd=fds[-1])
                except OSError as err:
                    if err.errno not in (errno.ENOENT, *REFUSING):
                        raise
                    found.verdict, found.newest = "fresh", now  # replaced meanwhile
                    return found
                fds.append(child)
                cst = os.fstat(child)
                if (cst.st_dev, cst.st_ino) != (est.st_dev, est.st_ino):
                    found.verdict, found.newest = "fresh", now
                    return found
                if mount is not None and mount_id(child) != mount:
                    found.verdict, found.detail = "foreign", "a mount point inside"
                    return found
                listings.append(iter(os.listdir(child)))
        return found
    except OSError as err:
        found.verdict, found.detail = "foreign", err.strerror or str(err)
        return found
    finally:
        for fd in fds:
            os.close(fd)
