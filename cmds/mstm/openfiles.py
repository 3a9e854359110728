"""Which files on this host are open for writing, read from /proc.

One call walks ``/proc/<pid>/fd`` of every process once: the cost is proportional to
the number of open file descriptors on the host, never to the number of files being
scanned, and no program (lsof, fuser) is started.

For each descriptor whose link target lies below the directory asked about, the
access mode is read from ``/proc/<pid>/fdinfo/<fd>`` ("flags:", octal); descriptors
opened ``O_WRONLY`` or ``O_RDWR`` are kept and identified by ``(st_dev, st_ino)``, taken
by stat()ing the ``/proc/<pid>/fd/<fd>`` link itself, which reaches the very inode the
process holds (not whatever now has that name).  Files already deleted (link count 0)
are left out: they are no longer below the directory.

Limits, by design of /proc:

* Without root (or CAP_SYS_PTRACE) only the processes of our own user are visible;
  writers running as other users are not seen.  Run the scanner as the same user as
  the producers, or rely on the settle period and ready markers for the others.
* Only this host: writers on other NFS clients are invisible (the settle period
  covers them).
* Processes in another mount namespace (containers) report paths in their own view
  and are not matched.
* Writable memory maps (mmap without an open descriptor) are not looked at.
"""

from __future__ import annotations

import logging
import os
import stat
from pathlib import Path

log = logging.getLogger("mstm.openfiles")

_PROC = "/proc"
_WRITE_MODES = (os.O_WRONLY, os.O_RDWR)


def _fd_flags(pid: str, fd: str) -> int | None:
    """The open flags of one descriptor, or None if it is gone or hidden."""
    try:
        with open(f"{_PROC}/{pid}/fdinfo/{fd}", "rb") as f:
            for line in f:
                if line.startswith(b"flags:"):
                    return int(line.split(b":", 1)[1].strip(), 8)
    except (OSError, ValueError):
        return None
    return None


def open_for_writing(under: Path) -> set[tuple[int, int]]:
    """``(st_dev, st_ino)`` of every regular file below *under* open for writing.

    Never raises for processes or descriptors that vanish or deny access while the
    walk runs; those are skipped.  Returns an empty set where /proc is unavailable.
    """
    root = os.path.realpath(under)
    prefix = root if root.endswith("/") else root + "/"
    found: set[tuple[int, int]] = set()
    try:
        procs = os.scandir(_PROC)
    except OSError as e:
        log.debug("cannot list %s: %s", _PROC, e)
        return found
    with procs:
        for proc in procs:
            pid = proc.name
            if not pid.isdigit():
                continue
            fd_dir = f"{_PROC}/{pid}/fd"
            try:
                fds = os.scandir(fd_dir)
            except OSError:
                # gone (ENOENT), or another user's process (EACCES): normal
                continue
            with fds:
                for fd in fds:
                    link = f"{fd_dir}/{fd.name}"
                    try:
                        target = os.readlink(link)
                    except OSError:
                        continue
                    if not target.startswith(prefix):
                        continue  # sockets, pipes, anon inodes, files elsewhere
                    flags = _fd_flags(pid, fd.name)
                    if flags is None or (flags & os.O_ACCMODE) not in _WRITE_MODES:
                        continue
                    try:
                        st = os.stat(link)  # follows the magic link to the open inode
                    except OSError:
                        continue
                    if not stat.S_ISREG(st.st_mode):
                        continue
                    if st.st_nlink == 0:
                        continue  # unlinked while open ("... (deleted)"): not below `under`
                    found.add((st.st_dev, st.st_ino))
    return found
