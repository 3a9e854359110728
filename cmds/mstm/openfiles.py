"""Which files on this host are open for writing, read from /proc.

One call walks ``/proc/<pid>/fd`` and ``/proc/<pid>/maps`` of every process once: the
cost is proportional to the number of processes and open file descriptors on the host,
never to the number of files being scanned, and no program (lsof, fuser) is started.

Files are matched by **device and inode, never by path**.  The path a process holds a
file under says nothing reliable: a writer behind a bind mount, in another mount
namespace (a container), or through a hard link in another directory holds the very
inode under a name that does not lie below the directory asked about.  So:

* **Descriptors.**  For every ``/proc/<pid>/fd/<fd>``, lstat() of the link (which only
  asks /proc: its permission bits are the descriptor's access mode) skips descriptors
  not open for writing; for the others, stat() of the link itself reaches the very
  inode the process holds (not whatever now has that name), and regular files on a
  device of interest are confirmed by the access mode in ``/proc/<pid>/fdinfo/<fd>``
  ("flags:", ``O_WRONLY`` or ``O_RDWR``).  fdinfo is read only for these candidates,
  and a file on some other filesystem (a hung NFS or FUSE mount) is stat()ed only when
  it is held for writing.
* **Shared writable memory maps.**  A process may mmap() a file ``MAP_SHARED`` with
  ``PROT_WRITE`` and close its descriptor: it still writes the file.  Every line of
  ``/proc/<pid>/maps`` whose permissions are writable and shared (``rw-s``, ``-w-s``)
  names the mapped inode by device ("major:minor", hex) and inode number (decimal).
  Where ``/proc/<pid>/map_files/`` can be read (root, or CAP_CHECKPOINT_RESTORE), the
  mapping is stat()ed there to confirm the file's ``(st_dev, st_ino)`` and that it is a
  regular file; otherwise the numbers of the maps line are taken as they are.

Two questions are answered: :func:`open_for_writing` (every such file on the
filesystems of a directory, for the scanner: a superset of the files below it, which
the caller intersects with the inodes it found) and :func:`held_for_writing` (which of
given files are held, for the sender right before it deletes a verified source).

Limits, by design of /proc:

* Without root (or CAP_SYS_PTRACE) only the processes of our own user are visible;
  writers running as other users are not seen.  Run the scanner as the same user as
  the producers, or rely on the settle period and ready markers for the others.
  ``/proc`` mounted with ``hidepid=`` hides more.
* Only this host: writers on other NFS clients are invisible (the settle period
  covers them).
* Only processes our ``/proc`` lists.  A container's processes are listed when we run
  in the host's PID namespace (they are its processes too); from inside a container,
  the host's and other containers' processes are not.
* The device of a memory map is the filesystem's own (``s_dev``), which for most
  filesystems is the ``st_dev`` stat() reports.  Where it is not (btrfs subvolumes,
  overlayfs), a map is still matched when ``map_files`` can be read (as root), through
  the inode number for :func:`held_for_writing` and through the mount table for
  :func:`open_for_writing`; without that access a map of such a file may be missed.  A
  map of a file on overlayfs names the file of the layer below, which is not the inode
  the scanner sees: such writers are left to the settle period.
* A descriptor is looked for in the process's file table only (threads that
  unshare() their file table are not walked), and everything is a snapshot: a writer
  that opens the file right after the walk is not seen.
"""

from __future__ import annotations

import logging
import os
import re
import stat
from collections.abc import Collection, Iterator
from pathlib import Path

log = logging.getLogger("mstm.openfiles")

_PROC = "/proc"
_WRITE_MODES = (os.O_WRONLY, os.O_RDWR)

# One line of /proc/<pid>/maps whose mapping is writable and shared:
# "start-end perms offset major:minor inode [path]"; perms like "rw-s" or "-w-s".
_SHARED_WRITABLE = re.compile(
    rb"^([0-9a-f]+)-([0-9a-f]+) [r-]w[x-]s [0-9a-f]+ ([0-9a-f]+):([0-9a-f]+) ([0-9]+)",
    re.MULTILINE,
)


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


def _unescape(field: str) -> str:
    """A path field of /proc/self/mountinfo ("\\040" for a space and so on)."""
    return re.sub(r"\\([0-7]{3})", lambda m: chr(int(m.group(1), 8)), field)


def _mounts_of(root: str) -> tuple[set[int], dict[int, set[int]]]:
    """The devices of the mounts below *root* (stat()ed), and for the filesystem holding
    *root* and those below it, each ``s_dev`` (as /proc/<pid>/maps shows it) that
    differs from the ``st_dev`` stat() reports, mapped to those ``st_dev``."""
    below: set[int] = set()
    s_dev_to_st_dev: dict[int, set[int]] = {}
    prefix = root.rstrip("/") + "/"
    holder: tuple[int, str] | None = None  # (s_dev, mount point) of the mount holding root
    try:
        with open(f"{_PROC}/self/mountinfo", encoding="utf-8", errors="surrogateescape") as f:
            lines = f.read().splitlines()
    except OSError:
        return below, s_dev_to_st_dev
    mounts: list[tuple[int, str]] = []
    for line in lines:
        fields = line.split(" ")
        if len(fields) < 5:
            continue
        try:
            major, minor = fields[2].split(":")
            s_dev = os.makedev(int(major), int(minor))
        except ValueError:
            continue
        point = _unescape(fields[4])
        if point.startswith(prefix):
            mounts.append((s_dev, point))
        elif root == point or root.startswith(point.rstrip("/") + "/"):
            if holder is None or len(point) >= len(holder[1]):  # deepest, then latest
                holder = (s_dev, point)
    if holder is not None:
        mounts.append((holder[0], root))
    for s_dev, point in mounts:
        try:
            st_dev = os.stat(point).st_dev
        except OSError:
            continue
        if point != root:
            below.add(st_dev)
        if st_dev != s_dev:
            s_dev_to_st_dev.setdefault(s_dev, set()).add(st_dev)
    return below, s_dev_to_st_dev


def _file_writers(pid: str, devices: Collection[int]) -> Iterator[os.stat_result]:
    """stat() of each regular file on *devices* that process *pid* holds by a descriptor
    open for writing (the same file once per descriptor)."""
    fd_dir = f"{_PROC}/{pid}/fd"
    try:
        fds = os.scandir(fd_dir)
    except OSError:
        return  # gone (ENOENT), or another user's process (EACCES): normal
    with fds:
        for fd in fds:
            try:
                # the link's own mode is the descriptor's access mode (r, w): asking it
                # costs /proc only, and spares stat() of every file read elsewhere
                if not fd.stat(follow_symlinks=False).st_mode & stat.S_IWUSR:
                    continue
                st = os.stat(fd.path)  # follows the magic link to the open inode
            except OSError:
                continue
            if st.st_dev not in devices or not stat.S_ISREG(st.st_mode):
                continue
            flags = _fd_flags(pid, fd.name)
            if flags is None or (flags & os.O_ACCMODE) not in _WRITE_MODES:
                continue
            yield st


def _map_writers(
    pid: str,
    devices: Collection[int],
    translate: dict[int, set[int]],
    inodes: Collection[int],
) -> Iterator[tuple[tuple[int, int], os.stat_result | None]]:
    """``((st_dev, st_ino), stat or None)`` of each file process *pid* maps shared and
    writable, when the maps line names a device in *devices* or *translate*, or an inode
    number in *inodes*.  The stat is that of ``map_files`` where it can be read (then the
    key is its ``(st_dev, st_ino)``); None where it cannot (the key is then the maps line's,
    translated from ``s_dev`` to ``st_dev`` through *translate* where they differ)."""
    try:
        with open(f"{_PROC}/{pid}/maps", "rb") as f:
            text = f.read()
    except OSError:
        return
    if b"s " not in text:
        return  # no shared mapping at all: the common case, decided in C
    for m in _SHARED_WRITABLE.finditer(text):
        ino = int(m.group(5))
        if ino == 0:
            continue  # anonymous shared memory
        dev = os.makedev(int(m.group(3), 16), int(m.group(4), 16))
        if dev not in devices and dev not in translate and ino not in inodes:
            continue
        name = f"{int(m.group(1), 16):x}-{int(m.group(2), 16):x}"  # no leading zeros
        try:
            st = os.stat(f"{_PROC}/{pid}/map_files/{name}")
        except FileNotFoundError:
            continue  # unmapped meanwhile
        except OSError:
            # no access to map_files: trust the numbers of the maps line
            if dev in devices:
                yield (dev, ino), None
            for st_dev in translate.get(dev, ()):
                yield (st_dev, ino), None
            continue
        if stat.S_ISREG(st.st_mode) and st.st_dev in devices:
            yield (st.st_dev, st.st_ino), st


def _walk(
    devices: Collection[int],
    translate: dict[int, set[int]],
    inodes: Collection[int],
    keep_unlinked: bool,
) -> set[tuple[int, int]]:
    found: set[tuple[int, int]] = set()
    if not devices:
        return found
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
            for st in _file_writers(pid, devices):
                if keep_unlinked or st.st_nlink > 0:
                    found.add((st.st_dev, st.st_ino))
            for key, mst in _map_writers(pid, devices, translate, inodes):
                if keep_unlinked or mst is None or mst.st_nlink > 0:
                    found.add(key)
    return found


def open_for_writing(under: Path, devices: set[int] | None = None) -> set[tuple[int, int]]:
    """``(st_dev, st_ino)`` of every regular file on the filesystems of *under* that some
    process holds open for writing, or maps shared and writable.

    The answer is a superset of the files below *under* held that way: it may list files
    elsewhere on the same filesystems, so callers look up the inodes they care about in
    it.  *devices* are the filesystems looked at; by default (None) the device of
    *under* and of every mount point below it.  Files already deleted (link count 0) are
    left out: they are no longer below *under*.

    Never raises for processes, descriptors or maps that vanish or deny access while the
    walk runs; those are skipped.  Returns an empty set where /proc is unavailable, or
    *under* does not exist.
    """
    translate: dict[int, set[int]] = {}
    if devices is None:
        root = os.path.realpath(under)
        try:
            devices = {os.stat(root).st_dev}
        except OSError:
            return set()
        below, translate = _mounts_of(root)
        devices |= below
    return _walk(devices, translate, (), keep_unlinked=False)


def held_for_writing(keys: set[tuple[int, int]]) -> set[tuple[int, int]]:
    """Which of *keys* (``(st_dev, st_ino)`` of files, as stat() gives them) some process
    on this host holds now by a descriptor open for writing (``O_WRONLY``/``O_RDWR``), or
    maps shared and writable (even after closing its descriptor).

    Meant for the last look before a verified source is deleted: a file in *keys* that
    is returned is still being written (by whatever name, in whatever mount namespace),
    and must not be deleted now.  A file deleted while held (link count 0) still counts.
    One pass over /proc, looking only at the devices of *keys*: its cost is that of
    :func:`open_for_writing`, whatever the number of keys.  Same limits (see the module):
    processes /proc does not show us are not seen.
    """
    if not keys:
        return set()
    devices = {dev for dev, _ in keys}
    inodes = {ino for _, ino in keys}
    return keys & _walk(devices, {}, inodes, keep_unlinked=True)
