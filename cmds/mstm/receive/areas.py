"""The receiver's directories, reached only through descriptors opened once.

* *D* (``[data_stream] directory``): where verified items are published;
* *I* (``[incoming] incoming_dir``): where senders put batches and handshake files; it is
  made if missing and locked (``flock``) so that one mstm-receive answers it;
* staging, ``.mstm-staging``: a private directory (mode 0700, ours) in I when I and D
  are one file system and one mount (an item is then renamed, never copied), else in D;
  it exists only while a batch is answered;
* ``I/.quarantine/``: where a handshake file that cannot be answered is moved.

:class:`Areas` holds their descriptors and the operations on names in I that every part
of the receiver shares: list, stat, read a handshake file (size-limited, no-follow),
quarantine, remove a batch, and the staging directory's life.  Nothing outside I and D
is read or written: every path below them is walked with ``O_NOFOLLOW`` relative to
their descriptors.
"""

from __future__ import annotations

import errno
import fcntl
import hashlib
import logging
import os
import secrets
import stat
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager, suppress
from pathlib import Path

from mstm import protocol
from mstm.errors import ConfigError, MstmError
from mstm.log import fields, show
from mstm.receive.settings import Settings
from mstm.safefs import DIR_FLAGS, mount_id, remove_tree

log = logging.getLogger("mstm.receive")

BLOCK = 1 << 20  # hash, copy and read in 1 MiB blocks
QUARANTINE = ".quarantine"
STAGING = ".mstm-staging"
TMP_PREFIX = ".mstm-tmp-"
# a file below I or D is opened for reading with these (a FIFO never blocks the open)
FILE_FLAGS = os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC
# errors that mean "something in the path is a symbolic link or not a directory"
REFUSING = (errno.ELOOP, errno.ENOTDIR, errno.EMLINK)


class AlreadyRunning(MstmError):
    exit_code = 75  # EX_TEMPFAIL


class BadHandshake(Exception):
    """A handshake file that must be quarantined; the message says why."""


@contextmanager
def closing(fd: int) -> Iterator[int]:
    try:
        yield fd
    finally:
        os.close(fd)


def write_atomic(dir_fd: int, name: str, data: bytes, mode: int = 0o640) -> None:
    """*data* under *name* in dir_fd: temp file, fsync, rename, fsync the directory."""
    tmp = TMP_PREFIX + secrets.token_hex(8)
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC,
                 mode, dir_fd=dir_fd)
    try:
        with closing(fd):
            view = memoryview(data)
            while view:
                view = view[os.write(fd, view):]
            os.fsync(fd)
        os.rename(tmp, name, src_dir_fd=dir_fd, dst_dir_fd=dir_fd)
    except BaseException:
        with suppress(OSError):
            os.unlink(tmp, dir_fd=dir_fd)
        raise
    os.fsync(dir_fd)


def exists_in(dir_fd: int, name: str) -> bool:
    try:
        os.stat(name, dir_fd=dir_fd, follow_symlinks=False)
    except OSError:
        return False
    return True


def _utc_stamp() -> str:
    return time.strftime("%Y%m%dT%H%M%SZ", time.gmtime())


def _truncate_name(name: str) -> str:
    raw = os.fsencode(name)
    return name if len(raw) <= protocol.NAME_MAX else os.fsdecode(raw[: protocol.NAME_MAX])


class Areas:
    """I, D, staging and quarantine of one receiving stream, open from open() to close()."""

    def __init__(self, settings: Settings) -> None:
        self.s = settings
        self.d_fd = -1
        self.i_fd = -1
        self.q_fd = -1
        self.stage_root = -1  # open only while a batch is being answered
        self.stage_parent = -1  # I's descriptor, or D's (see same_fs)
        self.same_fs = True  # a file in I can be renamed into D
        # item paths that would land in our own areas inside D (they are refused)
        self.reserved: list[tuple[str, ...]] = []
        self.broken: set[str] = set()  # names that could not even be quarantined

    # ------------------------------------------------------------------ life cycle

    def open(self) -> None:
        """Open (and make) the directories and take the stream's lock.  ConfigError or
        AlreadyRunning if that cannot be done (the caller then closes)."""
        s = self.s
        try:
            self.d_fd = os.open(s.directory, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
        except OSError as err:
            raise ConfigError(f"{s.directory}: {err.strerror}", section="data_stream",
                              key="directory") from None
        real_d, real_i = os.path.realpath(s.directory), os.path.realpath(s.incoming_dir)
        if real_i == real_d or Path(real_d).is_relative_to(real_i):
            raise ConfigError(f"{s.incoming_dir} must not be {s.directory} or contain it",
                              section="incoming", key="incoming_dir")
        try:
            os.mkdir(s.incoming_dir, 0o750)
            os.chmod(s.incoming_dir, 0o750)
            log.info("%s: created %s", s.stream, s.incoming_dir)
        except FileExistsError:
            pass
        except OSError as err:
            raise ConfigError(f"cannot create {s.incoming_dir}: {err.strerror}",
                              section="incoming", key="incoming_dir") from None
        try:
            self.i_fd = os.open(s.incoming_dir, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
        except OSError as err:
            raise ConfigError(f"{s.incoming_dir}: {err.strerror}", section="incoming",
                              key="incoming_dir") from None
        try:
            fcntl.flock(self.i_fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise AlreadyRunning(f"{s.stream}: another mstm-receive is answering"
                                 f" {s.incoming_dir}") from None
        self.same_fs = self._can_rename_into_d()
        self.stage_parent = self.i_fd if self.same_fs else self.d_fd
        if Path(real_i).is_relative_to(real_d):
            self.reserved.append(Path(os.path.relpath(real_i, real_d)).parts)
        if not self.same_fs:
            self.reserved.append((STAGING,))

    def close(self) -> None:
        for name in ("stage_root", "q_fd", "i_fd", "d_fd"):
            fd = getattr(self, name)
            if fd >= 0:
                with suppress(OSError):
                    os.close(fd)
                setattr(self, name, -1)

    def _can_rename_into_d(self) -> bool:
        """Can a file in I be renamed into D: one file system, and one mount of it (a
        rename between two bind mounts of one file system fails with EXDEV)?"""
        if os.fstat(self.i_fd).st_dev != os.fstat(self.d_fd).st_dev:
            return False
        return mount_id(self.i_fd) == mount_id(self.d_fd)

    def is_reserved(self, parts: Sequence[str]) -> bool:
        """Would the item path *parts* land in one of mstm's own areas inside D?"""
        return any(tuple(parts[: len(r)]) == r for r in self.reserved)

    # ------------------------------------------------------------------ staging

    def _private_dir(self, parent_fd: int, name: str, *, in_incoming: bool) -> int:
        """parent/name as a directory of ours, mode 0700; an impostor in I is quarantined."""
        for _ in range(3):
            with suppress(FileExistsError):
                os.mkdir(name, 0o700, dir_fd=parent_fd)
            try:
                fd = os.open(name, DIR_FLAGS, dir_fd=parent_fd)
            except OSError as err:
                if err.errno not in REFUSING or not in_incoming:
                    raise MstmError(f"{self.s.stream}: cannot use {name}: {err.strerror}"
                                    ) from None
                self.quarantine(name, "not a directory")
                continue
            st = os.fstat(fd)
            if st.st_uid != os.geteuid():
                os.close(fd)
                if not in_incoming:
                    raise MstmError(f"{self.s.stream}: {name} in {self.s.directory} belongs"
                                    f" to uid {st.st_uid}")
                self.quarantine(name, f"owned by uid {st.st_uid}")
                continue
            os.fchmod(fd, 0o700)
            return fd
        raise MstmError(f"{self.s.stream}: cannot make a private {name} directory")

    def open_stage_root(self) -> int:
        """The private staging directory, made if need be (on the file system of D)."""
        if self.stage_root < 0:
            self.stage_root = self._private_dir(self.stage_parent, STAGING,
                                                in_incoming=self.same_fs)
        return self.stage_root

    def release_stage_root(self) -> None:
        """Close the staging directory, and remove it if empty: idle, I holds nothing of
        ours."""
        if self.stage_root >= 0:
            os.close(self.stage_root)
            self.stage_root = -1
        with suppress(OSError):
            os.rmdir(STAGING, dir_fd=self.stage_parent)

    def unstage(self, key: str) -> None:
        if self.stage_root >= 0 or exists_in(self.stage_parent, STAGING):
            remove_tree(key, self.open_stage_root())
            self.release_stage_root()

    def stage_key(self, control_name: str) -> str:
        """The name of the staging directory of the control file *control_name*."""
        stem = control_name[: -len(self.s.control_ext) - 1]
        if protocol.BATCH_RE.match(stem):
            return stem
        # MiStaMover controls: a fixed-length name derived from the control file's name
        return "m-" + hashlib.sha256(os.fsencode(control_name)).hexdigest()[:32]

    # ------------------------------------------------------------------ names in I

    def listdir(self) -> list[str]:
        try:
            return os.listdir(self.i_fd)
        except OSError as err:
            log.warning("%s: cannot list %s: %s", self.s.stream, self.s.incoming_dir,
                        err.strerror)
            return []

    def exists(self, name: str) -> os.stat_result | None:
        try:
            return os.stat(name, dir_fd=self.i_fd, follow_symlinks=False)
        except FileNotFoundError:
            return None

    def read(self, name: str, limit: int) -> bytes | None:
        """A handshake file's content (None: it vanished); BadHandshake if it is not
        acceptable."""
        try:
            fd = os.open(name, FILE_FLAGS, dir_fd=self.i_fd)
        except FileNotFoundError:
            return None
        except OSError as err:
            if err.errno in REFUSING:
                raise BadHandshake("a symbolic link") from None
            raise
        with closing(fd):
            st = os.fstat(fd)
            if not stat.S_ISREG(st.st_mode):
                raise BadHandshake("not a regular file")
            if st.st_size > limit:
                raise BadHandshake(f"larger than {limit} bytes ({st.st_size})")
            chunks = []
            left = limit + 1
            while left > 0:
                chunk = os.read(fd, min(left, BLOCK))
                if not chunk:
                    break
                chunks.append(chunk)
                left -= len(chunk)
            data = b"".join(chunks)
            if len(data) > limit:
                raise BadHandshake(f"larger than {limit} bytes")
            return data

    def quarantine(self, name: str, reason: str) -> bool:
        """Move I/<name> to I/.quarantine/ (a time stamp and a random part before its name)."""
        s = self.s
        try:
            if self.q_fd < 0:
                with suppress(FileExistsError):
                    os.mkdir(QUARANTINE, 0o750, dir_fd=self.i_fd)
                self.q_fd = os.open(QUARANTINE, DIR_FLAGS, dir_fd=self.i_fd)
            target = _truncate_name(f"{_utc_stamp()}-{secrets.token_hex(3)}-{name}")
            os.rename(name, target, src_dir_fd=self.i_fd, dst_dir_fd=self.q_fd)
        except FileNotFoundError:
            return False
        except OSError as err:
            if self.q_fd >= 0 and err.errno in (errno.EBADF, errno.ENOENT):
                os.close(self.q_fd)
                self.q_fd = -1
            log.warning("%s: %s: %s; cannot quarantine it: %s", s.stream, show(name), reason,
                        err.strerror, extra=fields(stream=s.stream, item=name,
                                                   result="broken", reason=reason))
            self.broken.add(name)
            return False
        log.warning("%s: %s quarantined in %s: %s", s.stream, show(name), QUARANTINE,
                    reason, extra=fields(stream=s.stream, item=name, result="quarantined",
                                         reason=reason))
        return True

    def remove_batch(self, batch: str) -> None:
        """Remove the batch's control file, receipt and directory: names derived from it."""
        control, receipt, _ = protocol.file_names(
            batch, control_ext=self.s.control_ext, receipt_ext=self.s.receipt_ext,
            thanks_ext=self.s.thanks_ext)
        for derived in (control, receipt):
            remove_tree(derived, self.i_fd)
        remove_tree(batch, self.i_fd)
        self.unstage(batch)
        os.fsync(self.i_fd)
