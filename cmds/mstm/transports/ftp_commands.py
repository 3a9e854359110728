"""The FTP commands the ftp transport (ftp.py) builds on, and what it makes of answers.

Which names FTP can carry (`ftp_name`), the types of a directory's entries from its
``ls -l``-like LIST (`listing`, `kind_below`: a link is told apart and never gone
through), SIZE, a rename over an existing file, an iterative removal, publish.py's
TargetTree over FTP, and what a broken connection looks like (`LOST`).
"""

from __future__ import annotations

import contextlib
import ftplib
import os
import posixpath
import socket
from collections.abc import Callable

from mstm import safefs
from mstm.transports.common import Monitor

# what a broken connection looks like to ftplib
LOST = (OSError, EOFError, ftplib.error_temp, ftplib.error_reply, ftplib.error_proto)
LOST_ONLY = (ConnectionError, TimeoutError, socket.timeout)


class NameNotSendable(ValueError):
    pass


def ftp_name(path: str) -> str:
    """A path as FTP can carry it: UTF-8, no CR/LF; else NameNotSendable."""
    if "\r" in path or "\n" in path:
        raise NameNotSendable("the name holds a line break, which FTP cannot carry")
    try:
        path.encode("utf-8")
    except UnicodeEncodeError:
        raise NameNotSendable("the name is not valid UTF-8, which FTP needs") from None
    return path


LOST_ONLY = (ConnectionError, TimeoutError, socket.timeout)


def listing(ftp: ftplib.FTP, directory: str) -> dict[str, str]:
    """name -> "d", "f", "l" (a symbolic link) or "o" for the entries of *directory*
    ("": the current one), as its ``ls -l``-like LIST shows them ({} if it cannot be
    listed)."""
    lines: list[str] = []
    try:
        ftp.retrlines(f"LIST {ftp_name(directory)}" if directory else "LIST", lines.append)
    except ftplib.error_perm:
        return {}
    finally:
        ftp.voidcmd("TYPE I")  # retrlines switched to ASCII: SIZE and STOR need binary
    out: dict[str, str] = {}
    for line in lines:
        fields = line.split(None, 8)
        if len(fields) < 9 or not fields[0] or fields[0][0] not in "-dlbcps":
            continue
        kind = {"-": "f", "d": "d", "l": "l"}.get(fields[0][0], "o")
        name = fields[8].split(" -> ", 1)[0] if kind == "l" else fields[8]
        if name not in (".", ".."):
            out[name] = kind
    return out


def kind_below(ftp: ftplib.FTP, base: str, relpath: str,
                listings: dict[str, dict[str, str]]) -> str | None:
    """What *relpath* below *base* is ("d", "f", ...), None if missing or if a component
    on the way is not a directory (a link is never gone through)."""
    parts = [os.fsdecode(p) for p in safefs.split(relpath)]
    here = base
    for i, part in enumerate(parts):
        if here not in listings:
            listings[here] = listing(ftp, here)
        kind = listings[here].get(part)
        if i == len(parts) - 1:
            return kind
        if kind != "d":
            return None
        here = posixpath.join(here, part)
    return None


class FtpTree:
    """publish.TargetTree over FTP: types from LIST of the parent (see `listing`), a
    directory moved in whole by RNFR/RNTO."""

    refused: tuple[type[Exception], ...] = (ftplib.error_perm,)

    def __init__(self, ftp: ftplib.FTP, ensure_dir: Callable[[str, str], None]) -> None:
        self.ftp = ftp
        self._ensure_dir = ensure_dir

    def kind(self, path: str) -> str | None:
        parent, name = posixpath.split(path)
        return listing(self.ftp, parent).get(name)

    def entries(self, directory: str) -> dict[str, str]:
        return listing(self.ftp, directory)

    def child(self, directory: str, name: str) -> str:
        return posixpath.join(directory, name)

    def path(self, base: str, relpath: str) -> str:
        return ftp_name(posixpath.join(base, relpath))

    def ensure_dir(self, path: str, shown: str) -> None:
        self._ensure_dir(path, shown)

    def rename(self, src: str, dst: str) -> None:
        self.ftp.rename(src, dst)

    def replace(self, src: str, dst: str) -> None:
        rename_over(self.ftp, src, dst)


def rmtree(ftp: ftplib.FTP, path: str, mon: Monitor) -> None:
    """Remove *path* and everything below it, iteratively (links removed as links).
    It walks down with CWD and relative names: a tree deeper than a command line can
    name (1,000 levels) goes too."""
    parent, name = posixpath.split(path)
    kind = listing(ftp, parent).get(name)
    if kind is None:
        return
    if kind != "d":
        ftp.delete(path)
        return
    ftp.cwd(parent)
    try:
        ftp.cwd(name)
        frames = [(name, sorted(listing(ftp, "").items()))]
        while frames:
            here, entries = frames[-1]
            if entries:
                child, ckind = entries.pop()
                if ckind == "d":
                    ftp.cwd(child)
                    frames.append((child, sorted(listing(ftp, "").items())))
                else:
                    ftp.delete(child)
            else:
                frames.pop()
                ftp.cwd("..")
                ftp.rmd(here)
            mon.alive_now()
    finally:
        with contextlib.suppress(ftplib.error_perm):
            ftp.cwd("/")


def file_size(ftp: ftplib.FTP, path: str) -> int | None:
    """SIZE of a file, None if there is none (550)."""
    try:
        size = ftp.size(path)
    except ftplib.error_perm:
        return None
    return size


def rename_over(ftp: ftplib.FTP, tmp: str, final: str) -> None:
    try:
        ftp.rename(tmp, final)
    except ftplib.error_perm:
        with contextlib.suppress(ftplib.error_perm):
            ftp.delete(final)
        ftp.rename(tmp, final)


def reason(err: BaseException) -> str:
    text = getattr(err, "strerror", None) or str(err) or type(err).__name__
    return str(text).strip()
