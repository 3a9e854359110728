"""The per-item locks of a pull stream: no item is ever fetched twice at once, not even
by two processes.

One lock file per item, named by a hash of the item's remote name, in the directory
beside the ledger (``<ledger>.locks``).
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import hashlib
import os
from pathlib import Path


class ItemLock:
    """An exclusive, non-blocking flock on one file per item, removed when released.

    The lock is taken on the file that is at the path after locking (checked by inode),
    so removing it on release can never let two holders in at once."""

    def __init__(self, directory: Path, name: bytes) -> None:
        self.path = directory / (hashlib.sha256(name).hexdigest()[:40] + ".lock")
        self.fd: int | None = None

    def acquire(self) -> bool:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        while True:
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError as err:
                os.close(fd)
                if err.errno in (errno.EWOULDBLOCK, errno.EAGAIN):
                    return False
                raise
            try:
                same = os.stat(self.path).st_ino == os.fstat(fd).st_ino
            except FileNotFoundError:
                same = False
            if same:
                self.fd = fd
                return True
            os.close(fd)  # a releaser removed it meanwhile: take the new one

    def release(self) -> None:
        if self.fd is not None:
            with contextlib.suppress(OSError):
                os.unlink(self.path)
            os.close(self.fd)
            self.fd = None
