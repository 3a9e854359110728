"""What the source holds: each file's size and sha256, read through mstm.safefs.

The sender hashes a batch's sources in a thread pool while the transport sends them
(send/sender.py), and compares the result with what the target reports (``compare``).
A digest also records the exact version of each file hashed (device, inode, size, times):
a source is only ever deleted if it is still that version (send/finish.py).
"""

from __future__ import annotations

import hashlib
import os
import time
from dataclasses import dataclass, field
from pathlib import Path

from mstm import safefs
from mstm.log import show
from mstm.safefs import Version
from mstm.send import finish
from mstm.spool import ItemRecord
from mstm.transports.base import RemoteFile

HASH_BLOCK = 1 << 20


@dataclass
class LocalDigest:
    """What the source holds: one entry per regular file (a file item has one)."""

    files: dict[str, tuple[int, str]]  # relpath (relative to the stream dir) -> (size, sha256)
    versions: dict[str, Version]  # relpath -> the version that was hashed
    sha256: str  # of the item: the file's digest, or of a directory's manifest
    size: int
    changed: str | None = None  # why the source cannot be trusted, if it changed meanwhile
    dirs: list[str] = field(default_factory=list)  # a directory item's empty directories
    hashed_at_ns: int = 0  # when the hashing began (time.time_ns())

    def verified(self) -> finish.Verified:
        """What a deletion may rely on, once the target matched."""
        return finish.Verified(self.versions, {r: d for r, (_, d) in self.files.items()},
                               self.hashed_at_ns)


def _hash_file(root_fd: int, relpath: str, *, follow_symlinks: bool = False
               ) -> tuple[Version, str, bool]:
    """(version, sha256, stable) of one regular file below *root_fd*, read in large blocks.

    The path is resolved through :mod:`mstm.safefs`: no symbolic link below the stream
    directory is followed, but for the last component with *follow_symlinks* (then the
    version is that of the file it points to, as the scanner recorded it); anything but a
    regular file raises OSError.  *stable*: the file read is still the one at *relpath*,
    with the same size and times, after the read.
    """
    fd = safefs.open_regular(root_fd, relpath, follow_symlinks=follow_symlinks)
    h = hashlib.sha256()
    with open(fd, "rb", buffering=0) as f:
        before = os.fstat(fd)
        while chunk := f.read(HASH_BLOCK):
            h.update(chunk)
        after = os.fstat(fd)
    version = Version.of(before)
    try:
        dir_fd, name = safefs.open_parent(root_fd, relpath)
        try:
            now = os.stat(name, dir_fd=dir_fd, follow_symlinks=follow_symlinks)
        finally:
            os.close(dir_fd)
    except OSError:
        return version, h.hexdigest(), False
    stable = Version.of(after) == version and version.same_file(now) is None
    return version, h.hexdigest(), stable


def local_digest(source_dir: Path, record: ItemRecord, *, follow_symlinks: bool = True
                 ) -> LocalDigest:
    """Size and sha256 of what the source holds for *record*, read through
    :mod:`mstm.safefs` (nothing outside the stream directory is ever read).

    *follow_symlinks*: a file item that is a symbolic link is read through it (the
    stream's ``follow_symlinks``: links are only ever queued when it is on, and the
    sender's re-check before a batch compares the version with that same setting).
    Inside a directory item nothing is followed: its regular files are hashed, its empty
    directories listed (the target must show them); a link, FIFO, socket or device in
    it makes the item untrusted (``changed``): a directory unit carries only regular
    files and directories, and is never deleted with anything unverified in it.
    """
    hashed_at = time.time_ns()
    with safefs.opened_root(source_dir) as root_fd:
        if not record.is_dir:
            version, digest, stable = _hash_file(root_fd, record.relpath,
                                                 follow_symlinks=follow_symlinks)
            changed = None
            if not stable or (version.size, version.mtime_ns) != (record.size,
                                                                  record.mtime_ns):
                changed = "source changed while it was being sent"
            return LocalDigest({record.relpath: (version.size, digest)},
                               {record.relpath: version}, digest, version.size, changed,
                               hashed_at_ns=hashed_at)
        files: dict[str, tuple[int, str]] = {}
        versions: dict[str, Version] = {}
        manifest = hashlib.sha256()
        total = 0
        changed = None
        empty: list[str] = []
        last_dir: tuple[str, int] | None = None  # a directory not (yet) shown to hold anything
        for entry in safefs.walk(root_fd, record.relpath):
            if last_dir is not None and entry.depth <= last_dir[1]:
                empty.append(last_dir[0])
            last_dir = None
            if entry.is_dir:
                last_dir = (entry.relpath, entry.depth)
                continue
            if not entry.is_file:
                changed = (f"it holds a {safefs.special_reason(entry.st.st_mode)} "
                           f"({show(entry.relpath)}): a directory unit carries only "
                           f"regular files and directories")
                break
            version, digest, stable = _hash_file(root_fd, entry.relpath)
            if not stable:
                changed = "a file in the directory changed while it was being sent"
            files[entry.relpath] = (version.size, digest)
            versions[entry.relpath] = version
            total += version.size
        if last_dir is not None:
            empty.append(last_dir[0])
        for rel in sorted(files, key=os.fsencode):
            size, digest = files[rel]
            manifest.update(os.fsencode(rel) + b"\0" + str(size).encode() + b"\0" +
                            digest.encode() + b"\n")
        return LocalDigest(files, versions, manifest.hexdigest(), total, changed,
                           dirs=sorted(empty), hashed_at_ns=hashed_at)


def compare(local: LocalDigest, remote: dict[str, RemoteFile]) -> str | None:
    """None if the target holds exactly what we hashed, else the first difference."""
    for rel in local.dirs:
        if rel not in remote:
            return f"missing at the target: the directory {show(rel)}"
    for rel, (size, digest) in local.files.items():
        got = remote.get(rel)
        if got is None:
            return f"missing at the target: {show(rel)}"
        if got.size != size:
            return f"bad size at the target: {show(rel)} is {got.size} bytes, expected {size}"
        if got.sha256 is None:  # never accept size alone before deleting anything
            return f"the target gave no checksum for {show(rel)} (is verification disabled?)"
        if got.sha256 != digest:
            return f"bad checksum at the target: {show(rel)}"
    return None
