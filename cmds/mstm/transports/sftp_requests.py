"""The SFTP requests the sftp transport (sftp.py) builds on, and what it makes of answers.

Paths are bytes (`bpath`, `bjoin`): SFTP names are any bytes but NUL and '/'.  Here: an
atomic replace (`posix-rename@openssh.com`, else remove and rename), a file read back
and hashed, lstat and a walk of a tree's attributes (no link followed), an iterative
removal, publish.py's TargetTree over SFTP, the exec channel's stdin feeder, and the
parser of remote/sftp_inspect.py's answer.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import posixpath
import stat
from collections.abc import Callable
from typing import Any

import paramiko

from mstm.transports.base import RemoteFile
from mstm.transports.common import Monitor

_READ_CHUNK = 1 << 20


def bpath(path: str) -> bytes:
    return os.fsencode(path)


def bjoin(*parts: bytes) -> bytes:
    return posixpath.join(*parts)


def feed(chan: paramiko.Channel, data: bytes) -> None:
    with contextlib.suppress(Exception):
        chan.sendall(data)
    with contextlib.suppress(Exception):
        chan.shutdown_write()


def replace(sftp: paramiko.SFTPClient, tmp: bytes, dst: bytes) -> None:
    """Rename *tmp* over *dst* atomically where the server can (posix-rename)."""
    try:
        sftp.posix_rename(tmp, dst)
        return
    except OSError:
        pass
    except paramiko.SSHException:
        pass
    with contextlib.suppress(FileNotFoundError):
        sftp.remove(dst)
    sftp.rename(tmp, dst)


def read_back(sftp: paramiko.SFTPClient, path: bytes, size: int, mon: Monitor) -> str:
    h = hashlib.sha256()
    with sftp.open(path, "rb") as f:
        f.prefetch(size)
        while data := f.read(_READ_CHUNK):
            h.update(data)
            mon.alive_now()
    return h.hexdigest()


def lstat(sftp: paramiko.SFTPClient, path: bytes) -> paramiko.SFTPAttributes | None:
    try:
        return sftp.lstat(path)  # type: ignore[arg-type]
    except FileNotFoundError:
        return None


def tree_attrs(sftp: paramiko.SFTPClient, top: bytes) -> Any:
    """The attributes (lstat) of every entry below *top*, iteratively."""
    todo = [top]
    while todo:
        here = todo.pop()
        for e in sftp.listdir_attr(here):  # type: ignore[arg-type]
            yield e
            if stat.S_ISDIR(e.st_mode or 0):
                todo.append(bjoin(here, bpath(e.filename)))


class SftpTree:
    """publish.TargetTree over SFTP: types from lstat (READDIR's attributes are lstat's),
    a directory moved in whole by plain rename (refused if the name exists)."""

    refused: tuple[type[Exception], ...] = (OSError,)

    def __init__(self, sftp: paramiko.SFTPClient,
                 ensure_dir: Callable[[bytes, str], None]) -> None:
        self.sftp = sftp
        self._ensure_dir = ensure_dir

    def kind(self, path: bytes) -> str | None:
        st = lstat(self.sftp, path)
        return None if st is None else kind_of(st.st_mode or 0)

    def entries(self, directory: bytes) -> dict[str, str]:
        return {e.filename: kind_of(e.st_mode or 0)
                for e in self.sftp.listdir_attr(directory)}  # type: ignore[arg-type]

    def child(self, directory: bytes, name: str) -> bytes:
        return bjoin(directory, bpath(name))

    def path(self, base: bytes, relpath: str) -> bytes:
        return bjoin(base, bpath(relpath))

    def ensure_dir(self, path: bytes, shown: str) -> None:
        self._ensure_dir(path, shown)

    def rename(self, src: bytes, dst: bytes) -> None:
        self.sftp.rename(src, dst)  # type: ignore[arg-type]

    def replace(self, src: bytes, dst: bytes) -> None:
        replace(self.sftp, src, dst)


def kind_of(mode: int) -> str:
    if stat.S_ISDIR(mode):
        return "d"
    if stat.S_ISREG(mode):
        return "f"
    return "l" if stat.S_ISLNK(mode) else "o"


def rmtree(sftp: paramiko.SFTPClient, path: bytes, mon: Monitor) -> None:
    """Remove *path* and everything below it, iteratively, links removed as links."""
    st = lstat(sftp, path)
    if st is None:
        return
    if not stat.S_ISDIR(st.st_mode or 0):
        sftp.remove(path)  # type: ignore[arg-type]
        return
    stack: list[tuple[bytes, bool]] = [(path, False)]
    while stack:
        here, listed = stack.pop()
        if listed:
            sftp.rmdir(here)  # type: ignore[arg-type]
            continue
        stack.append((here, True))
        for e in sftp.listdir_attr(here):  # type: ignore[arg-type]
            child = bjoin(here, bpath(e.filename))
            if stat.S_ISDIR(e.st_mode or 0):
                stack.append((child, False))
            else:
                sftp.remove(child)  # type: ignore[arg-type]
            mon.alive_now()


# What the target's hasher (remote/sftp_inspect.py) answers: "F size digest path",
# "D 0 - path" (a directory) for what is there, NUL-separated, between a header and "end"
# (a truncated answer is not trusted).
def parse_inspect(out: bytes) -> dict[str, RemoteFile] | None:
    """The target hasher's answer; None if it is not a whole one."""
    recs = out.split(b"\0")
    if len(recs) < 3 or recs[0] != b"mstm-inspect 1" or recs[-2:] != [b"end", b""]:
        return None
    found: dict[str, RemoteFile] = {}
    for rec in recs[1:-2]:
        kind, size, digest, name = [*rec.split(b" ", 3), b"", b"", b""][:4]
        if kind == b"D" and name:
            found[os.fsdecode(name)] = RemoteFile(size=0, sha256=None)
        elif kind == b"F" and size.isdigit() and len(digest) == 64 and name:
            found[os.fsdecode(name)] = RemoteFile(size=int(size),
                                                  sha256=digest.decode("ascii"))
    return found


def reason(err: BaseException) -> str:
    text: Any = getattr(err, "strerror", None) or str(err) or type(err).__name__
    return str(text)
