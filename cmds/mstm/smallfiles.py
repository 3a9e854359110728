"""Small files of mstm's own (state.json, the receive totals, the metrics files, owner
files, a ledger) in directories a less privileged user may write: the spool belongs to
user mstm, and root runs ``--status``, ``mstm-diskwatch`` and others over it.

:func:`read_small` reads one without following a link, blocking on a FIFO or reading a
huge file into memory; :func:`replace_file` writes one atomically with an exact mode,
through a temporary file no link planted in advance can redirect.  (Sources are read
through :mod:`mstm.safefs`; this is for mstm's own files.)
"""

from __future__ import annotations

import errno
import os
import stat
import tempfile
from contextlib import suppress
from pathlib import Path

from mstm.safefs import READ_FLAGS, special_reason


def read_small(path: str | Path, limit: int) -> bytes:
    """The bytes of the regular file *path*, at most *limit* of them.

    For files a less privileged user may have replaced (a spool's state.json, a ledger,
    owner files, read by root's ``--status``): the last component is never followed
    (OSError ELOOP), a FIFO or device never blocks nor is read (opened O_NONBLOCK, then
    refused: OSError EINVAL "not a regular file: ..."), and a file larger than *limit*
    is refused (OSError EFBIG "larger than N bytes"), never read into memory.
    """
    fd = os.open(path, READ_FLAGS | os.O_NOFOLLOW)
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            what = "a directory" if stat.S_ISDIR(st.st_mode) else special_reason(st.st_mode)
            raise OSError(errno.EINVAL, f"not a regular file: {what}", os.fspath(path))
        if st.st_size > limit:
            raise OSError(errno.EFBIG, f"larger than {limit} bytes", os.fspath(path))
        os.set_blocking(fd, True)
        chunks: list[bytes] = []
        got = 0
        while got <= limit:
            chunk = os.read(fd, min(1 << 20, limit + 1 - got))
            if not chunk:
                break
            chunks.append(chunk)
            got += len(chunk)
        if got > limit:  # it grew after the fstat
            raise OSError(errno.EFBIG, f"larger than {limit} bytes", os.fspath(path))
        return b"".join(chunks)
    finally:
        os.close(fd)


def read_error(err: OSError) -> str:
    """An OSError of :func:`read_small` in words ("a symbolic link", "permission denied")."""
    if err.errno == errno.ELOOP:
        return "a symbolic link (never followed)"
    if err.errno in (errno.EACCES, errno.EPERM):
        return "permission denied"
    return str(err.strerror or err)


def replace_file(path: str | Path, data: bytes, *, mode: int = 0o644,
                 fsync: bool = False) -> None:
    """Put *data* at *path* atomically, with exactly *mode* (whatever the umask).

    A new temporary file in the same directory (``tempfile.mkstemp``: O_EXCL with a
    random name, so no link planted in advance is ever followed or written through),
    written, given *mode*, then renamed over *path* (a link at *path* itself is
    replaced, not followed).  The temporary file is removed if anything fails.  With
    *fsync*, the data reach the disk before the rename.
    """
    directory = os.path.dirname(os.fspath(path)) or "."
    fd, tmp = tempfile.mkstemp(dir=directory, prefix=".mstm-", suffix=".tmp")
    try:
        try:
            os.fchmod(fd, mode)
            view = memoryview(data)
            while view:
                view = view[os.write(fd, view):]
            if fsync:
                os.fsync(fd)
        finally:
            os.close(fd)
        os.replace(tmp, path)
    except BaseException:
        with suppress(FileNotFoundError):
            os.unlink(tmp)
        raise
