"""The arrival monitor: verify what senders put in the incoming area, publish, answer.

For a stream whose published directory is *D* (``[data_stream] directory``) and whose
incoming area is *I* (``[incoming] incoming_dir``), see :mod:`mstm.protocol` for the
files.  For each control file ``I/<batch>.<control_ext>`` without a receipt, each item
``I/<batch>/<path>`` is

1. looked up with no-follow opens, one component at a time (a symbolic link anywhere in
   the path refuses the item, it is never followed);
2. moved into a private staging directory (a rename on the same file system, else a
   copy), so that nobody else can change it once checked;
3. checked there: size, then the digest of exactly the bytes that will be published.

When every item of the control file has been checked, the good ones are flushed to disk
together: one ``syncfs(2)`` of the staging directory's file system, instead of an
``fsync`` per file (which is what is done for a single item, or where syncfs is not
available or fails).  Then each is

4. renamed to ``D/<path>`` without replacing anything (``renameat2(RENAME_NOREPLACE)``):
   an existing identical file makes the item "ok" (a re-delivery), a different one makes
   it "refused" unless ``[incoming] overwrite``; parent directories are created and
   opened the same no-follow way.  Items are renamed grouped by directory.

Publishing merges: an existing directory is used as it is, never replaced or removed,
and the files in it that a batch does not bring stay; a type conflict (a directory, link
or other non-file where an item goes, a file or link where one of its directories goes)
leaves the target untouched and refuses the item.  Only regular files are published
(anything else is refused after an lstat, never opened); a staged file's setuid, setgid
and sticky bits are cleared (fchmod) before it is checked, and so are those of the
directories created (a setgid bit inherited from the parent included).  No owner is ever
changed: a file renamed from I keeps the owner its sender gave it, a copied one and the
directories created belong to the receiver's user.

Then the renames are flushed: by one more syncfs when the items went into several
directories, else by an fsync of the directory (of each directory once, where syncfs does
not work).  Only then is the receipt written (temp name, fsync, rename, fsync of I): an
item is "ok" in a receipt only when its data is on disk under its final name.

A thank-you removes the batch's control file, receipt and directory, by names derived
from the batch name only.

Abandoned batches: a sender killed (or cut off) while it pushes a batch leaves
``I/<batch>/`` without a control file, and never sends into it again (a re-send is a new
batch).  Such a directory -- named like a batch, with no control file, receipt or
thank-you, not the stop file, and in which no entry at any depth has changed (the later
of mtime and ctime) for ``[incoming] abandoned_batch_seconds`` -- is removed: renamed
aside to ``I/.mstm-abandoned-<batch>-<random>`` (so that the batch name is gone at one
instant), looked at again there, then removed from I's descriptor, iteratively (see
_remove_tree: no depth or path-length limit, a symbolic link is never followed).  A
control file that appears meanwhile, or a change in the tree, puts it back.  The
incoming area is looked at for them at start-up and then at most every tenth of that
time, with a bounded number of entries examined per look.

Leftovers of a crash are removed at start-up and then every minute, between two batches:
temp files of ours in I, staging directories of batches no longer pending (only those
holding nothing but staged files: anything else is left alone with a warning), and
``D/.mstm-staging/.replaced.*`` trees unchanged for an hour (see _clean_leftovers).
Everything the receiver removes goes through _remove_tree: iterative, from descriptors,
no symbolic link followed, no FIFO or device opened, no mount point entered.

Crash safety: every step is a rename or is repeated.  A receiver killed at any instant
and restarted finds the control file without a receipt and processes it again: an item
already staged is taken from staging (and checked again), one already published counts
as ok when the published file has the right size and digest.  So each item is published
once, and never visible half-written under its final name.

Hostile input: control and thank-you files are size-limited and parsed strictly
(:mod:`mstm.protocol`); one that fails is moved to ``I/.quarantine/`` with a warning.
Any other error while a handshake file is handled (a bug, or an input nobody foresaw)
is logged with its traceback, and the file and its batch directory are moved to
``I/.quarantine/``: nothing is deleted, and the other batches go on being answered.
Nothing outside I and D is read or written: every path below them is walked with
``O_NOFOLLOW`` relative to directory descriptors.

MiStaMover's own handshake files (one item per control file, MD5) are answered too;
see the MiStaMover section of :mod:`mstm.protocol`.
"""

from __future__ import annotations

import bisect
import errno
import fcntl
import hashlib
import logging
import os
import re
import secrets
import stat
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager, suppress
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal, TypeVar

from mstm import protocol, safefs
from mstm.config import StreamConfig
from mstm.errors import ConfigError, MstmError
from mstm.log import event, fields, show
from mstm.notify import Notifier
from mstm.protocol import Control, ControlItem, ProtocolError, Status
from mstm.safefs import mount_id as _mount_id
from mstm.safefs import open_dir, rename_noreplace
from mstm.safefs import plain_mode as _plain_mode
from mstm.safefs import remove_tree as _remove_tree
from mstm.safefs import syncfs as _syncfs
from mstm.watch import Watcher

log = logging.getLogger("mstm.receive")
_T = TypeVar("_T")

BLOCK = 1 << 20  # hash and copy in 1 MiB blocks
QUARANTINE = ".quarantine"
STAGING = ".mstm-staging"
TMP_PREFIX = ".mstm-tmp-"
# An answered batch whose thank-you never came is cleaned up after this long.
ANSWERED_TTL = 7 * 24 * 3600.0
# MiStaMover's sender never delivered its thank-you files (its defect 4).
MSM_RECEIPT_TTL = 24 * 3600.0
# A MiStaMover control may arrive before its data file (its defect 3): wait this long.
MSM_DATA_GRACE = 30.0
# A hidden file named like a handshake file, with unknown content, may still be being
# written by someone; after this long it is garbage.
STALE_SECONDS = 60.0
RESCAN_SECONDS = 60.0  # with inotify: look anyway this often
EXPIRY_CHECK_SECONDS = 60.0
# Abandoned batch directories are renamed to this prefix (+ batch + random) before removal.
ABANDONED_PREFIX = ".mstm-abandoned-"
# Entries examined per look for abandoned batches (the first directory looked at is
# always examined to its end, so that every one is eventually decided), and the depth
# beyond which a directory is left alone (each level holds a descriptor).
ABANDONED_BUDGET = 100_000
ABANDONED_MAX_DEPTH = 256

_O_DIR = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC
_O_FILE = os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC
# The exact shapes of the names mstm makes in I and in staging (see _clean_leftovers):
# MiStaMover staging keys (_stage_key), staged items and
# their partial copies (_check, _copy_in), and the old directories the transports'
# publishers set aside in D/.mstm-staging (rsync over ssh: a pid; local, sftp: 12 hex
# digits; ftp: the same with ".zip").
_MSM_KEY_RE = re.compile(r"\Am-[0-9a-f]{32}\Z")
_STAGED_RE = re.compile(r"\A[0-9]{1,4}-[0-9a-f]{40}(?:\.part)?\Z")
_REPLACED_RE = re.compile(r"\A\.replaced\.(?:[0-9]{1,10}|[0-9a-f]{12}(?:\.zip)?)\Z")
REPLACED_SECONDS = 3600.0  # a .replaced.* tree unchanged this long is a crash's leftover
_NO_SPACE = (errno.ENOSPC, errno.EDQUOT)
# errors that mean "something in the path is a symbolic link or not a directory"
_REFUSING = (errno.ELOOP, errno.ENOTDIR, errno.EMLINK)


class AlreadyRunning(MstmError):
    exit_code = 75  # EX_TEMPFAIL


# --------------------------------------------------------------------------- settings


@dataclass(frozen=True)
class Settings:
    stream: str
    directory: Path  # D: where verified items are published
    incoming_dir: Path  # I: where senders put batches and handshake files
    control_ext: str = "mstm-ctrl"
    receipt_ext: str = "mstm-rcpt"
    thanks_ext: str = "mstm-thanks"
    overwrite: bool = False
    max_control_bytes: int = 8 << 20
    poll_interval: float = 3.0
    stop_file: str = ".stop"
    abandoned_batch_seconds: float = 86400.0  # 0: abandoned batch directories stay

    @classmethod
    def from_config(cls, cfg: StreamConfig) -> Settings:
        inc = cfg.incoming
        return cls(
            stream=cfg.name,
            directory=cfg.directory,
            incoming_dir=inc.incoming_dir or cfg.directory / ".mstm-incoming",
            control_ext=inc.control_file_extension,
            receipt_ext=inc.receipt_file_extension,
            thanks_ext=inc.thankyou_file_extension,
            overwrite=inc.overwrite,
            max_control_bytes=inc.max_control_bytes,
            poll_interval=cfg.poll_interval,
            stop_file=inc.stop_file,
            abandoned_batch_seconds=inc.abandoned_batch_seconds,
        )


@dataclass
class Summary:
    batches: int = 0
    ok: int = 0
    failed: int = 0
    bytes: int = 0
    thanked: int = 0
    quarantined: int = 0
    deferred: int = 0
    abandoned: int = 0  # abandoned batch directories removed
    statuses: dict[str, int] = field(default_factory=dict)

    def merge(self, other: Summary) -> None:
        """Add *other*'s item counts (not its batches, thank-yous or quarantines)."""
        self.ok += other.ok
        self.failed += other.failed
        self.bytes += other.bytes
        for key, n in other.statuses.items():
            self.statuses[key] = self.statuses.get(key, 0) + n

    def count(self, status: Status, size: int) -> None:
        self.statuses[status.value] = self.statuses.get(status.value, 0) + 1
        if status is Status.OK:
            self.ok += 1
            self.bytes += size
        else:
            self.failed += 1


class _Stop(Exception):
    """Stop was requested between two items."""


class _Bad(Exception):
    """A handshake file that must be quarantined; the message says why."""


# --------------------------------------------------------------------------- low level


@contextmanager
def _closing(fd: int) -> Iterator[int]:
    try:
        yield fd
    finally:
        os.close(fd)


def _digest(fd: int, algorithm: str, tick: Callable[[], None],
            buf: bytearray | None = None) -> tuple[str, int]:
    """Hex digest and length of everything readable from *fd* (from its start); *buf*:
    a scratch buffer to read into (one is allocated if None)."""
    h = hashlib.new(algorithm, usedforsecurity=False)
    if buf is None:
        buf = bytearray(BLOCK)
    view = memoryview(buf)
    total = 0
    os.lseek(fd, 0, os.SEEK_SET)
    with open(fd, "rb", buffering=0, closefd=False) as f:
        while n := f.readinto(buf):
            h.update(view[:n])
            total += n
            tick()
    return h.hexdigest(), total


def _write_atomic(dir_fd: int, name: str, data: bytes, mode: int = 0o640) -> None:
    """*data* under *name* in dir_fd: temp file, fsync, rename, fsync the directory."""
    tmp = TMP_PREFIX + secrets.token_hex(8)
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC,
                 mode, dir_fd=dir_fd)
    try:
        with _closing(fd):
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


def _changed_at(st: os.stat_result, now: float, *, ctime: bool = True) -> float:
    """When an entry last changed: the later of its mtime and ctime (rsync --times
    back-dates mtimes; ctime still says when the file was written).  An mtime in the
    future (a clock ahead somewhere) is no change: its ctime says when it was set."""
    changed = st.st_ctime if ctime else 0.0
    if st.st_mtime <= now:
        changed = max(changed, st.st_mtime)
    return changed


@dataclass
class _Survey:
    """What _survey found in a directory tree."""

    # old: nothing changed since the time asked; fresh: something did (or vanished, or
    # was replaced); gone: no such directory; foreign: a mount point, too deep or not
    # readable; unfinished: out of budget, or stop was asked
    verdict: Literal["old", "fresh", "gone", "foreign", "unfinished"]
    newest: float = 0.0  # the latest change among the entries examined
    bytes: int = 0  # sizes of the regular files
    entries: int = 0  # examined, the directory itself included
    detail: str = ""


def _survey(parent_fd: int, name: str, *, dev: int, mount: str | None, since: float,
            now: float, budget: int | None, tick: Callable[[], bool],
            root_ctime: bool = True) -> _Survey:
    """Examine the tree parent_fd/name: has any entry, the directory itself included,
    changed after *since* (see _changed_at; *now*: the wall-clock time)?

    Every directory is opened with O_NOFOLLOW relative to its parent's descriptor and
    checked to be the one just examined, so a symbolic link is never followed and nothing
    outside the tree is looked at; an entry on another device than *dev*, or a directory
    on another mount than *mount* (see _mount_id; a bind mount), ends the look
    ("foreign"): what is mounted there is never ours to remove.  It stops at the first
    entry changed after *since* ("fresh"; one that vanishes or is replaced meanwhile
    counts as changed now), after *budget* entries or when *tick* (called every 1000
    entries) returns False ("unfinished").  *root_ctime*: count the directory's own
    ctime (not after we renamed it: that changed it).  At most ABANDONED_MAX_DEPTH
    directories are held open.
    """
    try:
        root = os.open(name, _O_DIR, dir_fd=parent_fd)
    except FileNotFoundError:
        return _Survey("gone")
    except OSError as err:
        if err.errno in _REFUSING:
            return _Survey("gone")  # not a directory (any more)
        return _Survey("foreign", detail=err.strerror or str(err))
    found = _Survey("old")
    fds = [root]
    try:
        st = os.fstat(root)
        found.entries = 1
        found.newest = _changed_at(st, now, ctime=root_ctime)
        if st.st_dev != dev or (mount is not None and _mount_id(root) != mount):
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
            found.newest = max(found.newest, _changed_at(est, now))
            if found.newest > since:
                found.verdict = "fresh"
                return found
            if est.st_dev != dev:
                found.verdict, found.detail = "foreign", "a mount point inside"
                return found
            if stat.S_ISREG(est.st_mode):
                found.bytes += est.st_size
            elif stat.S_ISDIR(est.st_mode):
                if len(fds) >= ABANDONED_MAX_DEPTH:
                    found.verdict = "foreign"
                    found.detail = f"deeper than {ABANDONED_MAX_DEPTH} levels"
                    return found
                try:
                    child = os.open(entry, _O_DIR, dir_fd=fds[-1])
                except OSError as err:
                    if err.errno not in (errno.ENOENT, *_REFUSING):
                        raise
                    found.verdict, found.newest = "fresh", now  # replaced meanwhile
                    return found
                fds.append(child)
                cst = os.fstat(child)
                if (cst.st_dev, cst.st_ino) != (est.st_dev, est.st_ino):
                    found.verdict, found.newest = "fresh", now
                    return found
                if mount is not None and _mount_id(child) != mount:
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


def _duration(seconds: float) -> str:
    if seconds < 120:
        return f"{seconds:.0f} s"
    if seconds < 2 * 3600:
        return f"{seconds / 60:.0f} min"
    if seconds < 2 * 86400:
        return f"{seconds / 3600:.1f} h"
    return f"{seconds / 86400:.1f} days"


def _utc_stamp() -> str:
    return time.strftime("%Y%m%dT%H%M%SZ", time.gmtime())


def _truncate_name(name: str) -> str:
    raw = os.fsencode(name)
    return name if len(raw) <= protocol.NAME_MAX else os.fsdecode(raw[: protocol.NAME_MAX])


# --------------------------------------------------------------------------- items


@dataclass
class _Job:
    """One control file being answered: where its items are and where they are staged."""

    label: str  # for log lines
    key: str  # the staging directory's name
    algorithm: str
    source_fd: int | None  # directory the item paths are relative to (None: missing)
    source_refused: bool = False  # the batch directory is a symbolic link or not a directory
    stage_fd: int = -1
    staged: set[str] = field(default_factory=set)  # in staging when the job started
    synced_dir: tuple[int, int] | None = None  # (dev, ino) of a directory still to fsync
    synced_fd: int = -1
    defer_dirs: bool = False  # publishing: the renames are flushed by one syncfs after


@dataclass(frozen=True)
class _Checked:
    """An item verified in staging, not yet flushed to disk nor published."""

    index: int  # in the control file
    item: ControlItem
    parts: list[str]
    staged: str  # its name in the job's staging directory


@dataclass(frozen=True)
class _Result:
    status: Status
    detail: str = ""


class Receiver:
    """Answers the control and thank-you files of one receiving stream."""

    def __init__(self, settings: Settings, *, notifier: Notifier | None = None,
                 force_poll: bool = False) -> None:
        self.s = settings
        self.notifier = notifier or Notifier()
        self.force_poll = force_poll
        self._stop = threading.Event()
        self._watcher: Watcher | None = None
        self._d_fd = -1
        self._i_fd = -1
        self._q_fd = -1
        self._stage_root = -1  # open only while a batch is being answered
        self._stage_parent = -1
        self._same_fs = True
        self._reserved: list[tuple[str, ...]] = []
        self._broken: set[str] = set()  # names that could not even be quarantined
        self._last_expiry = 0.0
        # abandoned batch directories: when to look next (time.monotonic(); 0: at the
        # first pass), where the last look stopped, names already warned about
        self._next_abandoned = 0.0
        self._abandoned_from = ""
        self._abandoned_pending = False
        self._abandoned_warned: set[str] = set()
        self._clock: Callable[[], float] = time.time  # wall clock, for file times
        self._buf = bytearray(BLOCK)  # scratch for hashing
        self.total = Summary()
        for ext in (settings.control_ext, settings.receipt_ext, settings.thanks_ext):
            try:
                protocol.check_extension(ext)
            except ProtocolError as err:
                raise ConfigError(str(err), section="incoming") from None

    # ------------------------------------------------------------------ life cycle

    def open(self) -> Receiver:
        """Open (and make) the directories, take the stream's lock, clean up after a
        crash.  ConfigError or AlreadyRunning if that cannot be done."""
        try:
            return self._open()
        except BaseException:
            self.close()
            raise

    def _open(self) -> Receiver:
        s = self.s
        try:
            self._d_fd = os.open(s.directory, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
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
            self._i_fd = os.open(s.incoming_dir, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
        except OSError as err:
            raise ConfigError(f"{s.incoming_dir}: {err.strerror}", section="incoming",
                              key="incoming_dir") from None
        try:
            fcntl.flock(self._i_fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise AlreadyRunning(f"{s.stream}: another mstm-receive is answering"
                                 f" {s.incoming_dir}") from None
        self._same_fs = self._can_rename_into_d()
        self._stage_parent = self._i_fd if self._same_fs else self._d_fd
        # item paths that would land in our own areas inside D are refused
        if Path(real_i).is_relative_to(real_d):
            self._reserved.append(Path(os.path.relpath(real_i, real_d)).parts)
        if not self._same_fs:
            self._reserved.append((STAGING,))
        self._clean_at_start()
        return self

    def close(self) -> None:
        for name in ("_stage_root", "_q_fd", "_i_fd", "_d_fd"):
            fd = getattr(self, name)
            if fd >= 0:
                with suppress(OSError):
                    os.close(fd)
                setattr(self, name, -1)
        if self._watcher is not None:
            self._watcher.close()
            self._watcher = None

    def __enter__(self) -> Receiver:
        return self.open()

    def __exit__(self, *exc: object) -> None:
        self.close()

    def stop(self) -> None:
        """Finish the current item, then return from run_once() or follow().  Thread- and
        signal-safe."""
        self._stop.set()
        if self._watcher is not None:
            self._watcher.wake()

    @property
    def stopping(self) -> bool:
        return self._stop.is_set()

    def _can_rename_into_d(self) -> bool:
        """Can a file in I be renamed into D: one file system, and one mount of it (a
        rename between two bind mounts of one file system fails with EXDEV)?"""
        if os.fstat(self._i_fd).st_dev != os.fstat(self._d_fd).st_dev:
            return False
        return _mount_id(self._i_fd) == _mount_id(self._d_fd)

    def _private_dir(self, parent_fd: int, name: str, *, in_incoming: bool) -> int:
        """parent/name as a directory of ours, mode 0700; an impostor in I is quarantined."""
        for _ in range(3):
            with suppress(FileExistsError):
                os.mkdir(name, 0o700, dir_fd=parent_fd)
            try:
                fd = os.open(name, _O_DIR, dir_fd=parent_fd)
            except OSError as err:
                if err.errno not in _REFUSING or not in_incoming:
                    raise MstmError(f"{self.s.stream}: cannot use {name}: {err.strerror}"
                                    ) from None
                self._quarantine(name, "not a directory")
                continue
            st = os.fstat(fd)
            if st.st_uid != os.geteuid():
                os.close(fd)
                if not in_incoming:
                    raise MstmError(f"{self.s.stream}: {name} in {self.s.directory} belongs"
                                    f" to uid {st.st_uid}")
                self._quarantine(name, f"owned by uid {st.st_uid}")
                continue
            os.fchmod(fd, 0o700)
            return fd
        raise MstmError(f"{self.s.stream}: cannot make a private {name} directory")

    def _clean_at_start(self) -> None:
        """Leftovers of a crash: our temp files; staging of batches no longer pending."""
        names = self._listdir()
        self._remove_set_aside(names)
        self._clean_leftovers(names)

    def _clean_leftovers(self, names: list[str]) -> None:
        """Remove what a crash (or a failed removal) of mstm left, at start and then
        periodically, between two batches: only names of the exact shapes mstm makes --
        our temp files in I (regular files named TMP_PREFIX...), staging directories of batches
        no longer pending whose every entry is a staged file of ours, and the
        ``.replaced.*`` trees older than an hour that a publisher set aside in
        ``D/.mstm-staging`` (the old version of a directory it replaced).  Anything else
        found there (someone's data) is left alone, with one warning."""
        for name in names:
            if name.startswith(TMP_PREFIX):
                with suppress(OSError):
                    if stat.S_ISREG(os.stat(name, dir_fd=self._i_fd,
                                            follow_symlinks=False).st_mode):
                        os.unlink(name, dir_fd=self._i_fd)
        pending = {self._stage_key(n) for n in names if n.endswith("." + self.s.control_ext)}
        if self._exists_in(self._stage_parent, STAGING):
            root = self._open_stage_root()
            try:
                for key in os.listdir(root):
                    if key in pending:
                        continue
                    if _REPLACED_RE.match(key) and not self._same_fs:
                        continue  # D's staging, shared with publishers: see below
                    if not self._ours_to_remove(root, key):
                        self._warn_once(f"{STAGING}/{key}", "%s: %s/%s is not something"
                                        " mstm-receive staged; left alone", STAGING, show(key))
                        continue
                    try:
                        _remove_tree(key, root, self._tick)
                    except OSError as err:
                        self._warn_once(f"{STAGING}/{key}", "%s: cannot remove %s/%s: %s;"
                                        " tried again later", STAGING, show(key), err)
            finally:
                self._release_stage_root()
        self._clean_replaced()

    def _ours_to_remove(self, root: int, key: str) -> bool:
        """Is staging/<key> one of our staging directories: a key's shape, and only
        staged files (or their partial copies) in it?"""
        if not (protocol.BATCH_RE.match(key) or _MSM_KEY_RE.match(key)):
            return False
        try:
            fd = os.open(key, _O_DIR, dir_fd=root)
        except OSError:
            return False
        with _closing(fd):
            try:
                for entry in os.listdir(fd):
                    if not _STAGED_RE.match(entry):
                        return False
                    st = os.stat(entry, dir_fd=fd, follow_symlinks=False)
                    if not stat.S_ISREG(st.st_mode):
                        return False
            except OSError:
                return False
        return True

    def _clean_replaced(self) -> None:
        """``D/.mstm-staging/.replaced.*`` left by a publisher killed between moving an
        old directory aside and removing it; only those of its exact name shapes, owned
        by us, and unchanged for an hour."""
        try:
            fd = os.open(STAGING, _O_DIR, dir_fd=self._d_fd)
        except OSError:
            return
        with _closing(fd):
            try:
                names = [n for n in os.listdir(fd) if _REPLACED_RE.match(n)]
            except OSError:
                return
            for name in names:
                try:
                    st = os.stat(name, dir_fd=fd, follow_symlinks=False)
                except OSError:
                    continue
                if st.st_uid != os.geteuid() or time.time() - _changed_at(
                        st, time.time()) < REPLACED_SECONDS:
                    continue
                try:
                    _remove_tree(name, fd, self._tick)
                except OSError as err:
                    self._warn_once(f"{STAGING}/{name}", "%s: cannot remove %s/%s: %s;"
                                    " tried again later", STAGING, show(name), err)
                else:
                    log.info("%s: removed %s/%s, left by an interrupted publication",
                             self.s.stream, STAGING, show(name))

    def _open_stage_root(self) -> int:
        """The private staging directory, made if need be (on the file system of D)."""
        if self._stage_root < 0:
            self._stage_root = self._private_dir(self._stage_parent, STAGING,
                                                 in_incoming=self._same_fs)
        return self._stage_root

    def _release_stage_root(self) -> None:
        """Close the staging directory, and remove it if empty: idle, I holds nothing of
        ours."""
        if self._stage_root >= 0:
            os.close(self._stage_root)
            self._stage_root = -1
        with suppress(OSError):
            os.rmdir(STAGING, dir_fd=self._stage_parent)

    def _unstage(self, key: str) -> None:
        if self._stage_root >= 0 or self._exists_in(self._stage_parent, STAGING):
            _remove_tree(key, self._open_stage_root())
            self._release_stage_root()

    def _stage_key(self, control_name: str) -> str:
        stem = control_name[: -len(self.s.control_ext) - 1]
        if protocol.BATCH_RE.match(stem):
            return stem
        # MiStaMover controls: a fixed-length name derived from the control file's name
        return "m-" + hashlib.sha256(os.fsencode(control_name)).hexdigest()[:32]

    # ------------------------------------------------------------------ main loops

    def run_once(self) -> Summary:
        """Answer every complete control file (and thank-you) present now."""
        summary = Summary()
        self._pass(summary)
        return summary

    def follow(self) -> None:
        """Answer control and thank-you files as they arrive, until stop()."""
        s = self.s
        # a control file starts a pass at once: its sender waits for the receipt
        self._watcher = Watcher(s.incoming_dir, poll_interval=s.poll_interval,
                                recursive=False, force_poll=self.force_poll,
                                urgent_suffixes=("." + s.control_ext,))
        log.info("%s: receiving in %s, publishing in %s (%s)", s.stream, s.incoming_dir,
                 s.directory, self._watcher.backend)
        self.notifier.ready(f"{s.stream}: waiting for batches")
        while not self.stopping:
            summary = Summary()
            next_due = self._pass(summary)
            self.notifier.watchdog()
            t = self.total
            self.notifier.status(f"{s.stream}: {t.batches} batches answered, {t.ok} items"
                                 f" published, {t.failed} not")
            if self.stopping:
                break
            timeout = RESCAN_SECONDS
            if next_due is not None:
                timeout = min(timeout, max(0.05, next_due))
            if self.notifier.max_sleep is not None:
                timeout = min(timeout, self.notifier.max_sleep)
            self._watcher.wait(timeout)
        self.notifier.stopping(f"{s.stream}: stopping")
        log.info("%s: stopped", s.stream)

    def _pass(self, summary: Summary) -> float | None:
        """One look at I; returns in how many seconds something deferred is due."""
        names = self._listdir()
        present = set(names)
        self._broken &= present
        s = self.s
        due: float | None = None
        for name in sorted(n for n in names if n.endswith("." + s.thanks_ext)):
            if self.stopping:
                return None
            if name not in self._broken:
                self._guard(name, summary, self._on_thanks)
        for name in sorted(n for n in names if n.endswith("." + s.control_ext)):
            if self.stopping:
                return None
            if name in self._broken:
                continue
            wait = self._guard(name, summary, self._on_control)
            if wait is not None:
                due = wait if due is None else min(due, wait)
        now = time.monotonic()
        if now - self._last_expiry >= EXPIRY_CHECK_SECONDS:
            self._last_expiry = now
            self._broken.clear()  # try those again once a minute
            self._housekeeping(self._expire, self._listdir())
            self._housekeeping(self._clean_leftovers, self._listdir())
        if s.abandoned_batch_seconds > 0 and not self.stopping:
            if now >= self._next_abandoned:
                # None: nothing to look at again before the usual interval
                wait = self._housekeeping(self._look_for_abandoned, summary)
                self._abandoned_pending = wait is not None
                self._next_abandoned = time.monotonic() + (
                    wait if wait is not None else self._abandoned_interval())
            elif not self._abandoned_pending and self._abandoned_candidates(names):
                self._abandoned_pending = True  # one came since the last look
            if self._abandoned_pending:  # wake up for it (follow)
                wait = max(0.0, self._next_abandoned - time.monotonic())
                due = wait if due is None else min(due, wait)
        self.total.merge(summary)
        self.total.batches += summary.batches
        self.total.thanked += summary.thanked
        self.total.quarantined += summary.quarantined
        self.total.abandoned += summary.abandoned
        return due

    def _housekeeping(self, task: Callable[[_T], float | None], arg: _T) -> float | None:
        """Run a periodic clean-up: an error in it is logged, never fatal."""
        try:
            return task(arg)
        except Exception as err:
            log.error("%s: %s failed: %s: %s", self.s.stream, task.__name__.strip("_"),
                      type(err).__name__, err, exc_info=not isinstance(err, OSError))
            return None

    def _guard(self, name: str, summary: Summary,
               handler: Callable[[str, Summary], float | None]) -> float | None:
        """Run *handler* on one handshake file; a bad one is quarantined, never fatal."""
        try:
            return handler(name, summary)
        except _Stop:
            return None
        except _Bad as bad:
            if self._quarantine(name, str(bad)):
                summary.quarantined += 1
        except OSError as err:  # the incoming area itself misbehaves: log, try again later
            log.warning("%s: %s: %s", self.s.stream, show(name), err,
                        extra=fields(stream=self.s.stream, item=name, result="io-error",
                                     reason=str(err)))
        except MstmError:  # our own areas are unusable (not this batch's fault)
            raise
        except Exception as err:  # a bug, or an input nobody foresaw: never fatal
            reason = f"internal error: {type(err).__name__}: {err}"
            log.error("%s: %s: %s; set aside in %s", self.s.stream, show(name), reason,
                      QUARANTINE, exc_info=True,
                      extra=fields(stream=self.s.stream, item=name, result="quarantined",
                                   reason=reason))
            self._set_aside(name, reason, summary)
        return None

    def _set_aside(self, name: str, reason: str, summary: Summary) -> None:
        """Quarantine the handshake file *name* whose handling failed, and the directory
        of its batch (nothing is deleted: the other batches go on being served)."""
        with suppress(OSError):  # whatever we held for it
            self._release_stage_root()
        if self._quarantine(name, reason):
            summary.quarantined += 1
        stems = [name[: -len(ext) - 1] for ext in (self.s.control_ext, self.s.thanks_ext)
                 if name.endswith("." + ext)]
        stem = stems[0] if stems else ""
        if protocol.BATCH_RE.match(stem) and self._exists(stem) is not None:
            if self._quarantine(stem, f"its {name} could not be handled"):
                summary.quarantined += 1

    def _listdir(self) -> list[str]:
        try:
            return os.listdir(self._i_fd)
        except OSError as err:
            log.warning("%s: cannot list %s: %s", self.s.stream, self.s.incoming_dir,
                        err.strerror)
            return []

    # ------------------------------------------------------------------ handshake files

    def _exists(self, name: str) -> os.stat_result | None:
        try:
            return os.stat(name, dir_fd=self._i_fd, follow_symlinks=False)
        except FileNotFoundError:
            return None

    def _read(self, name: str, limit: int) -> bytes | None:
        """A handshake file's content (None: it vanished); _Bad if it is not acceptable."""
        try:
            fd = os.open(name, _O_FILE, dir_fd=self._i_fd)
        except FileNotFoundError:
            return None
        except OSError as err:
            if err.errno in _REFUSING:
                raise _Bad("a symbolic link") from None
            raise
        with _closing(fd):
            st = os.fstat(fd)
            if not stat.S_ISREG(st.st_mode):
                raise _Bad("not a regular file")
            if st.st_size > limit:
                raise _Bad(f"larger than {limit} bytes ({st.st_size})")
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
                raise _Bad(f"larger than {limit} bytes")
            return data

    def _quarantine(self, name: str, reason: str) -> bool:
        s = self.s
        try:
            if self._q_fd < 0:
                with suppress(FileExistsError):
                    os.mkdir(QUARANTINE, 0o750, dir_fd=self._i_fd)
                self._q_fd = os.open(QUARANTINE, _O_DIR, dir_fd=self._i_fd)
            target = _truncate_name(f"{_utc_stamp()}-{secrets.token_hex(3)}-{name}")
            os.rename(name, target, src_dir_fd=self._i_fd, dst_dir_fd=self._q_fd)
        except FileNotFoundError:
            return False
        except OSError as err:
            if self._q_fd >= 0 and err.errno in (errno.EBADF, errno.ENOENT):
                os.close(self._q_fd)
                self._q_fd = -1
            log.warning("%s: %s: %s; cannot quarantine it: %s", s.stream, show(name), reason,
                        err.strerror, extra=fields(stream=s.stream, item=name,
                                                   result="broken", reason=reason))
            self._broken.add(name)
            return False
        log.warning("%s: %s quarantined in %s: %s", s.stream, show(name), QUARANTINE,
                    reason, extra=fields(stream=s.stream, item=name, result="quarantined",
                                         reason=reason))
        return True

    def _unknown_hidden(self, name: str, data: bytes) -> float | None:
        """A hidden handshake-like file with unknown content: wait, then quarantine."""
        st = self._exists(name)
        if st is None:
            return None
        if data.startswith(b"mstm-") or not data:  # maybe a temp file being written
            age = time.time() - st.st_mtime
            if age < STALE_SECONDS:
                return STALE_SECONDS - age
        raise _Bad("neither an mstm nor a MiStaMover handshake file")

    def _on_thanks(self, name: str, summary: Summary) -> float | None:
        s = self.s
        stem = name[: -len(s.thanks_ext) - 1]
        if protocol.BATCH_RE.match(stem):
            data = self._read(name, protocol.MAX_THANKS_BYTES)
            if data is None:
                return None
            try:
                protocol.parse_thanks(data, batch=stem)
            except ProtocolError as err:
                raise _Bad(str(err)) from None
            self._clean_batch(stem)
            with suppress(FileNotFoundError):
                os.unlink(name, dir_fd=self._i_fd)
            summary.thanked += 1
            log.info("%s: batch %s acknowledged, cleaned up", s.stream, stem)
            return None
        if stem.startswith("."):
            return self._on_msm_thanks(name, summary)
        raise _Bad("not a thank-you file name (<batch>.<extension>)")

    def _clean_batch(self, batch: str) -> None:
        """Remove the batch's control file, receipt and directory: names derived from it."""
        control, receipt, _ = protocol.file_names(
            batch, control_ext=self.s.control_ext, receipt_ext=self.s.receipt_ext,
            thanks_ext=self.s.thanks_ext)
        for derived in (control, receipt):
            _remove_tree(derived, self._i_fd)
        _remove_tree(batch, self._i_fd)
        self._unstage(batch)
        os.fsync(self._i_fd)

    def _on_control(self, name: str, summary: Summary) -> float | None:
        s = self.s
        stem = name[: -len(s.control_ext) - 1]
        if stem.startswith("."):
            return self._on_msm_control(name, summary)
        if not protocol.BATCH_RE.match(stem):
            raise _Bad("not a control file name (<batch>.<extension>)")
        receipt_name = f"{stem}.{s.receipt_ext}"
        if self._exists(receipt_name) is not None:
            return None  # answered; waiting for the thank-you
        data = self._read(name, s.max_control_bytes)
        if data is None:
            return None
        try:
            control = protocol.parse_control(data, receipt_ext=s.receipt_ext,
                                              max_bytes=s.max_control_bytes)
        except ProtocolError as err:
            raise _Bad(str(err)) from None
        if control.batch != stem:
            raise _Bad(f"names batch {control.batch}, but is {name}")
        self._answer(control, summary)
        return None

    # ------------------------------------------------------------------ batches

    def _answer(self, control: Control, summary: Summary) -> None:
        s = self.s
        batch = control.batch
        t0 = time.monotonic()
        try:
            source_fd: int | None = os.open(batch, _O_DIR, dir_fd=self._i_fd)
        except OSError as err:
            if err.errno not in (errno.ENOENT, *_REFUSING):
                raise
            source_fd = None
            if err.errno != errno.ENOENT:
                log.warning("%s: batch %s: its directory is a symbolic link or not a"
                            " directory", s.stream, batch)
        job = _Job(label=f"batch {batch}", key=batch, algorithm=control.algorithm,
                   source_fd=source_fd,
                   source_refused=source_fd is None and self._exists(batch) is not None)
        batch_summary = Summary()
        try:
            try:
                job.stage_fd = open_dir([job.key], self._open_stage_root(), create=True,
                                        mode=0o700)
            except (OSError, MstmError) as err:
                cause = err.__context__ if isinstance(err, MstmError) else err
                if not isinstance(cause, OSError) or cause.errno not in _NO_SPACE:
                    raise
                # a full file system: a receipt that says so, the sender tries again later
                results = [_Result(Status.IO_ERROR, f"cannot stage: {cause.strerror}")
                           ] * len(control.items)
                for item, result in zip(control.items, results, strict=True):
                    self._log_item(job, item, result)
            else:
                results = self._receive_all(job, control.items)
        finally:
            if job.stage_fd >= 0:
                os.close(job.stage_fd)
            if source_fd is not None:
                os.close(source_fd)
        for item, result in zip(control.items, results, strict=True):
            batch_summary.count(result.status, item.size)
        made = self._make_dirs(job, control.dirs)
        for status in made:
            batch_summary.count(status, 0)
        receipt = protocol.Receipt(batch, (*(
            (item.relpath, result.status)
            for item, result in zip(control.items, results, strict=True)),
            *zip(control.dirs, made, strict=True)))
        _write_atomic(self._i_fd, control.receipt, protocol.render_receipt(receipt))
        self._unstage(job.key)
        summary.batches += 1
        summary.merge(batch_summary)
        level = logging.INFO if not batch_summary.failed else logging.WARNING
        log.log(level, "%s: batch %s answered: %d ok (%d bytes), %d not ok %s in %.2f s",
                s.stream, batch, batch_summary.ok, batch_summary.bytes, batch_summary.failed,
                batch_summary.statuses, time.monotonic() - t0,
                extra=fields(stream=s.stream, item=batch,
                             result="ok" if not batch_summary.failed else "partial"))

    def _make_dirs(self, job: _Job, dirs: Sequence[str]) -> list[Status]:
        """Create the empty directories a control file lists (a directory item's), merged
        into D like its files: an existing directory is fine, a link or non-directory on
        the way is refused.  Made durable with one syncfs (else an fsync of each)."""
        statuses: list[Status] = []
        for rel in dirs:
            try:
                parts = [os.fsdecode(p) for p in safefs.split(rel)]
                if any(tuple(parts[: len(r)]) == r for r in self._reserved):
                    statuses.append(Status.REFUSED)  # would land in mstm's own area
                    continue
                fd = open_dir(parts, self._d_fd, create=True)
            except ValueError:
                statuses.append(Status.REFUSED)
                continue
            except OSError as err:
                statuses.append(Status.REFUSED if err.errno in _REFUSING else Status.IO_ERROR)
                log.warning("%s: %s: directory %s: %s", self.s.stream, job.label, show(rel),
                            err.strerror or err,
                            extra=fields(stream=self.s.stream, item=rel))
                continue
            try:
                if not _syncfs(fd):
                    os.fsync(fd)
                statuses.append(Status.OK)
            except OSError:
                statuses.append(Status.IO_ERROR)
            finally:
                os.close(fd)
        return statuses

    def _receive_all(self, job: _Job, items: Sequence[ControlItem]) -> list[_Result]:
        """Every item's result, in order; each "ok" one is on disk under its final name.

        Three passes, so that the cost of flushing to disk is paid once per control file
        rather than once per item: check every item in staging (stop() is honoured
        between two of them: _Stop); flush the good ones to disk together; rename them
        into D, grouped by directory, and flush the renames: one more syncfs if they went
        into several directories, else an fsync of the directory (of each directory, where
        syncfs does not work).  Nothing is published before everything has been checked
        and flushed.  OSError: something could not be flushed; nothing is answered.
        """
        results: list[_Result | None] = [None] * len(items)
        checked: list[_Checked] = []
        try:
            job.staged = set(os.listdir(job.stage_fd))  # staged before a crash
            if job.staged:
                log.info("%s: %s resumed: %d items already staged", self.s.stream,
                         job.label, len(job.staged))
            for index, item in enumerate(items):
                if self.stopping:
                    log.info("%s: stopping; %s is answered after the restart",
                             self.s.stream, job.label)
                    raise _Stop
                got = self._check(job, index, item)
                if isinstance(got, _Checked):
                    checked.append(got)
                else:
                    results[index] = got
                self.notifier.watchdog()
            synced = self._make_durable(job, checked, results)
            checked = [c for c in checked if results[c.index] is None]
            checked.sort(key=lambda c: c.parts[:-1])  # each directory flushed once
            job.defer_dirs = synced and len({tuple(c.parts[:-1]) for c in checked}) > 1
            for c in checked:
                results[c.index] = self._publish(job, c.item, c.parts, c.staged)
                self.notifier.watchdog()
            if job.defer_dirs and not _syncfs(job.stage_fd):
                # the next pass finds them published and flushes each directory
                raise OSError(errno.EIO, f"{job.label}: cannot flush the renames (syncfs)")
            self._sync_dir(job, None)
        finally:
            self._sync_dir(job, None, flush=False)
        done = [r for r in results if r is not None]
        if len(done) != len(items):
            raise AssertionError("an item without a result")
        for item, result in zip(items, done, strict=True):
            self._log_item(job, item, result)
        return done

    def _log_item(self, job: _Job, item: ControlItem, result: _Result) -> None:
        s = self.s
        if result.status is Status.OK:
            log.info("%s: published %s (%d bytes)%s", s.stream, show(item.relpath), item.size,
                     f" ({result.detail})" if result.detail else "",
                     extra=event("delivered", stream=s.stream, item=item.relpath,
                                 bytes=item.size, result="ok"))
        else:
            log.warning("%s: %s: %s: %s", s.stream, job.label, show(item.relpath),
                        f"{result.status.value}: {result.detail}" if result.detail
                        else result.status.value,
                        extra=fields(stream=s.stream, item=item.relpath, bytes=item.size,
                                     result=result.status.value, reason=result.detail or None))

    def _check(self, job: _Job, index: int, item: ControlItem) -> _Result | _Checked:
        """Stage the item (unless it already is) and verify it there: _Checked if it is
        good, not yet flushed nor published; else its final result."""
        parts = item.relpath.split("/")
        for reserved in self._reserved:
            if tuple(parts[: len(reserved)]) == reserved:
                return _Result(Status.REFUSED, "would land in mstm's own area")
        staged = str(len(os.fsencode(item.relpath))) + "-" + hashlib.sha256(
            os.fsencode(item.relpath)).hexdigest()[:40]
        if staged not in job.staged:
            got = self._stage(job, item, parts, staged)
            if got is not None:
                return got
        bad = self._verify(job, item, staged)
        if bad is not None:
            return bad
        return _Checked(index, item, parts, staged)

    def _stage(self, job: _Job, item: ControlItem, parts: list[str],
               staged: str) -> _Result | None:
        """Move (or copy) the item into staging; a result if that is already the end."""
        if job.source_fd is None:
            if job.source_refused:
                return _Result(Status.REFUSED, "the batch directory is a symbolic link")
            return self._missing(job, item, parts)
        try:
            parent = open_dir(parts[:-1], job.source_fd)
        except OSError as err:
            if err.errno == errno.ENOENT:
                return self._missing(job, item, parts)
            if err.errno in _REFUSING:
                return _Result(Status.REFUSED, "a symbolic link or non-directory in its path")
            return _Result(Status.IO_ERROR, str(err))
        with _closing(parent):
            leaf = parts[-1]
            try:
                st = os.stat(leaf, dir_fd=parent, follow_symlinks=False)
            except FileNotFoundError:
                return self._missing(job, item, parts)
            except OSError as err:
                return _Result(Status.IO_ERROR, str(err))
            if stat.S_ISLNK(st.st_mode):
                return _Result(Status.REFUSED, "a symbolic link")
            if not stat.S_ISREG(st.st_mode):
                return _Result(Status.REFUSED, "not a regular file")
            if st.st_size != item.size:
                return _Result(Status.BAD_SIZE, f"{st.st_size} bytes, expected {item.size}")
            try:
                if self._same_fs:
                    os.rename(leaf, staged, src_dir_fd=parent, dst_dir_fd=job.stage_fd)
                else:
                    self._copy_in(parent, leaf, job.stage_fd, staged)
                    os.unlink(leaf, dir_fd=parent)
            except FileNotFoundError:
                return self._missing(job, item, parts)
            except _Refused as err:
                return _Result(Status.REFUSED, str(err))
            except OSError as err:
                return _Result(Status.IO_ERROR, str(err))
        return None

    def _copy_in(self, src_dir: int, leaf: str, dst_dir: int, staged: str) -> None:
        """Copy src_dir/leaf (no-follow) to dst_dir/staged, flushed; via a .part name."""
        try:
            src = os.open(leaf, _O_FILE, dir_fd=src_dir)
        except OSError as err:
            if err.errno in _REFUSING:
                raise _Refused("a symbolic link") from None
            raise
        part = staged + ".part"
        with _closing(src):
            st = os.fstat(src)
            if not stat.S_ISREG(st.st_mode):
                raise _Refused("not a regular file")
            dst = os.open(part, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_NOFOLLOW |
                          os.O_CLOEXEC, 0o600, dir_fd=dst_dir)
            with _closing(dst):
                buf = bytearray(BLOCK)
                with open(src, "rb", buffering=0, closefd=False) as f:
                    while n := f.readinto(buf):
                        view = memoryview(buf)[:n]
                        while view:
                            view = view[os.write(dst, view):]
                        self.notifier.watchdog()
                os.fchmod(dst, stat.S_IMODE(st.st_mode) & 0o777)
                os.fsync(dst)
        os.rename(part, staged, src_dir_fd=dst_dir, dst_dir_fd=dst_dir)

    def _missing(self, job: _Job, item: ControlItem, parts: list[str]) -> _Result:
        """Not in the incoming area: ok if already published with this content (a restart
        after a crash, or a re-delivery), else missing."""
        if self._published_as(job, item, parts):
            return _Result(Status.OK, "already published")
        return _Result(Status.MISSING)

    def _published_as(self, job: _Job, item: ControlItem, parts: list[str]) -> bool:
        try:
            parent = open_dir(parts[:-1], self._d_fd)
        except OSError:
            return False
        try:
            try:
                if self._same_content(parent, parts[-1], item, job.algorithm) is not True:
                    return False
            except OSError:
                return False
            # its rename may not have been flushed before a crash: flushed with the others
            # (OSError if a directory cannot be flushed: the batch is answered later)
            self._sync_dir(job, parent)
            return True
        finally:
            if job.synced_fd != parent:
                os.close(parent)

    def _same_content(self, dir_fd: int, leaf: str, item: ControlItem,
                      algorithm: str) -> bool | None:
        """Does dir_fd/leaf hold the item's content?  None: it is not a regular file."""
        try:
            fd = os.open(leaf, _O_FILE, dir_fd=dir_fd)
        except OSError as err:
            if err.errno in (*_REFUSING, errno.ENXIO, errno.EISDIR):
                return None
            raise
        with _closing(fd):
            st = os.fstat(fd)
            if not stat.S_ISREG(st.st_mode):
                return None
            if st.st_size != item.size:
                return False
            digest, size = _digest(fd, algorithm, self.notifier.watchdog, self._buf)
            return size == item.size and digest == item.digest

    def _verify(self, job: _Job, item: ControlItem, staged: str) -> _Result | None:
        """Size and digest of the staged file (read, not flushed); None if it is good, else
        the result, the staged file being removed.  No descriptor is kept."""
        try:
            fd = os.open(staged, _O_FILE, dir_fd=job.stage_fd)
        except OSError as err:
            with suppress(OSError):
                _remove_tree(staged, job.stage_fd)
            if err.errno in _REFUSING:
                return _Result(Status.REFUSED, "a symbolic link")
            return _Result(Status.IO_ERROR, str(err))
        with _closing(fd):
            st = os.fstat(fd)
            bad: _Result | None = None
            if not stat.S_ISREG(st.st_mode):
                bad = _Result(Status.REFUSED, "not a regular file")
            elif st.st_size != item.size:
                bad = _Result(Status.BAD_SIZE, f"{st.st_size} bytes, expected {item.size}")
            else:
                try:
                    _plain_mode(fd)  # no setuid, setgid or sticky bit is ever published
                except OSError as err:
                    bad = _Result(Status.REFUSED, "its setuid, setgid or sticky bit cannot"
                                  f" be cleared: {err.strerror}")
            if bad is None:
                try:
                    digest, size = _digest(fd, job.algorithm, self.notifier.watchdog,
                                           self._buf)
                    if size != item.size:
                        bad = _Result(Status.BAD_SIZE, f"read {size} bytes, expected"
                                      f" {item.size}")
                    elif digest != item.digest:
                        bad = _Result(Status.BAD_CHECKSUM,
                                      f"{job.algorithm} {digest}, expected {item.digest}")
                except OSError as err:
                    bad = _Result(Status.IO_ERROR, str(err))
            if bad is not None:
                _remove_tree(staged, job.stage_fd)  # a directory, if one was swapped in
        return bad

    def _make_durable(self, job: _Job, checked: list[_Checked],
                      results: list[_Result | None]) -> bool:
        """Flush the checked items' data to disk before any is published: one syncfs(2)
        of the staging file system for them all (True), else (a single item, or syncfs
        not available or failed) an fsync of each; an item that cannot be flushed gets
        its result in *results* and its staged file is removed."""
        if not checked:
            return False
        self.notifier.watchdog()
        if len(checked) > 1 and _syncfs(job.stage_fd):
            self.notifier.watchdog()
            return True
        for c in checked:
            try:
                fd = os.open(c.staged, _O_FILE, dir_fd=job.stage_fd)
                with _closing(fd):
                    os.fsync(fd)
            except OSError as err:
                with suppress(OSError):
                    _remove_tree(c.staged, job.stage_fd)
                results[c.index] = _Result(Status.IO_ERROR, str(err))
            self.notifier.watchdog()
        return False

    def _publish(self, job: _Job, item: ControlItem, parts: list[str], staged: str) -> _Result:
        for attempt in range(3):
            result = self._publish_once(job, item, parts, staged, last=attempt == 2)
            if result is not None:
                return result
        raise AssertionError("unreachable")

    def _publish_once(self, job: _Job, item: ControlItem, parts: list[str], staged: str, *,
                      last: bool) -> _Result | None:
        """Rename the staged file into D; None: try again (a directory vanished)."""
        def drop(result: _Result) -> _Result:
            with suppress(OSError):
                _remove_tree(staged, job.stage_fd)
            return result

        try:
            parent = open_dir(parts[:-1], self._d_fd, create=True)
        except OSError as err:
            if err.errno in _REFUSING:
                return drop(_Result(Status.REFUSED, "a symbolic link or non-directory in"
                                    " its published path"))
            return drop(_Result(Status.IO_ERROR, str(err)))
        leaf = parts[-1]
        detail = ""
        try:
            try:
                rename_noreplace(staged, leaf, src_dir_fd=job.stage_fd, dst_dir_fd=parent)
            except FileExistsError:
                same = self._same_content(parent, leaf, item, job.algorithm)
                if same is None:
                    return drop(_Result(Status.REFUSED, "published name is taken by a"
                                        " symbolic link or non-file"))
                if same:
                    drop(_Result(Status.OK))
                    detail = "identical file already published"
                elif not self.s.overwrite:
                    return drop(_Result(Status.REFUSED, "a different file is already"
                                        " published under this name ([incoming] overwrite"
                                        " = false)"))
                else:
                    os.rename(staged, leaf, src_dir_fd=job.stage_fd, dst_dir_fd=parent)
                    detail = "replaced a different file"
        except FileNotFoundError as err:
            # the directory we opened was removed meanwhile (replaced by another)
            if not last and self._exists_in(job.stage_fd, staged):
                return None
            return drop(_Result(Status.IO_ERROR, str(err)))
        except OSError as err:
            return drop(_Result(Status.IO_ERROR, str(err)))
        else:
            # a directory that cannot be flushed (this one or the one before) is no item's
            # fault: OSError, and the batch is answered on a later pass
            if not job.defer_dirs:
                self._sync_dir(job, parent)
        finally:
            if job.synced_fd != parent:
                os.close(parent)
        return _Result(Status.OK, detail)

    def _sync_dir(self, job: _Job, fd: int | None, *, flush: bool = True) -> None:
        """Remember *fd* as the directory to fsync; flush the previous one if different.

        Consecutive items mostly share a directory, so each is flushed once.  None: flush
        (or with flush=False only close) the one remembered.
        """
        key = None
        if fd is not None:
            st = os.fstat(fd)
            key = (st.st_dev, st.st_ino)
            if key == job.synced_dir:
                return  # already remembered (the caller closes its own fd)
        if job.synced_fd >= 0:
            try:
                if flush:
                    os.fsync(job.synced_fd)
            finally:
                os.close(job.synced_fd)
                job.synced_fd = -1
                job.synced_dir = None
        if fd is not None:
            job.synced_fd = fd
            job.synced_dir = key

    # ------------------------------------------------------------------ MiStaMover

    def _on_msm_control(self, name: str, summary: Summary) -> float | None:
        s = self.s
        data = self._read(name, protocol.MSM_MAX_BYTES)
        if data is None:
            return None
        if not data.startswith(protocol.MSM_CONTROL_MAGIC[0] + b"\n"):
            return self._unknown_hidden(name, data)
        try:
            c = protocol.parse_mistamover_control(data, receipt_ext=s.receipt_ext)
        except ProtocolError as err:
            raise _Bad(f"MiStaMover {err}") from None
        if name != protocol.mistamover_control_name(c.filename, control_ext=s.control_ext):
            raise _Bad(f"MiStaMover control file for {c.filename!r} under another name")
        if any(c.filename.endswith("." + ext)
               for ext in (s.control_ext, s.receipt_ext, s.thanks_ext)):
            raise _Bad(f"MiStaMover data file name {c.filename!r} is a handshake file name")
        if self._exists(c.receipt) is not None:  # answered before a crash
            _remove_tree(name, self._i_fd)
            return None
        st = self._exists(name)
        if st is None:
            return None
        # MiStaMover's sender could deliver the control before the data (its defect 3)
        if self._exists(c.filename) is None:
            age = time.time() - st.st_ctime
            key = self._stage_key(name)
            staged_before = self._exists_in(self._stage_parent, f"{STAGING}/{key}")
            if age < MSM_DATA_GRACE and not staged_before:
                summary.deferred += 1
                return MSM_DATA_GRACE - age
        item = ControlItem(c.filename, c.size, c.md5)
        job = _Job(label="MiStaMover control " + name, key=self._stage_key(name),
                   algorithm="md5", source_fd=self._i_fd)
        try:
            job.stage_fd = open_dir([job.key], self._open_stage_root(), create=True,
                                    mode=0o700)
            (result,) = self._receive_all(job, [item])
        finally:
            if job.stage_fd >= 0:
                os.close(job.stage_fd)
        if result.status is not Status.OK:  # as MiStaMover did: the sender sends it again
            with suppress(OSError):
                if stat.S_ISREG(os.stat(c.filename, dir_fd=self._i_fd,
                                        follow_symlinks=False).st_mode):
                    os.unlink(c.filename, dir_fd=self._i_fd)
        ok = result.status is Status.OK
        receipt = protocol.MsmReceipt(
            filename=c.filename, code=protocol.MSM_CODES[result.status],
            size=c.size if ok else -1, md5=c.md5 if ok else "",
            thanks=protocol.mistamover_thanks_name(c.receipt, receipt_ext=s.receipt_ext,
                                                   thanks_ext=s.thanks_ext))
        _write_atomic(self._i_fd, c.receipt, protocol.render_mistamover_receipt(receipt))
        _remove_tree(name, self._i_fd)
        self._unstage(job.key)
        summary.batches += 1
        summary.count(result.status, c.size)
        return None

    def _exists_in(self, dir_fd: int, name: str) -> bool:
        try:
            os.stat(name, dir_fd=dir_fd, follow_symlinks=False)
        except OSError:
            return False
        return True

    def _on_msm_thanks(self, name: str, summary: Summary) -> float | None:
        s = self.s
        data = self._read(name, protocol.MSM_MAX_BYTES)
        if data is None:
            return None
        if not data.startswith(protocol.MSM_THANKS_MAGIC[0] + b"\n"):
            return self._unknown_hidden(name, data)
        try:
            named = protocol.parse_mistamover_thanks(data)
        except ProtocolError as err:
            raise _Bad(f"MiStaMover {err}") from None
        # only the receipt this thank-you's own name derives from (we chose that name)
        derived = name[: -len(s.thanks_ext)] + s.receipt_ext
        if named != derived or not protocol.mistamover_receipt_shape(derived, s.receipt_ext):
            raise _Bad(f"MiStaMover thank-you names {named[:80]!r}, expected {derived[:80]!r}")
        st = self._exists(derived)
        if st is not None and stat.S_ISREG(st.st_mode):
            os.unlink(derived, dir_fd=self._i_fd)
        os.unlink(name, dir_fd=self._i_fd)
        summary.thanked += 1
        log.info("%s: MiStaMover receipt %s acknowledged", s.stream, show(derived))
        return None

    # ------------------------------------------------------------------ expiry

    def _expire(self, names: list[str]) -> None:
        """Answered handshakes whose thank-you never came (MiStaMover's defect 4)."""
        s = self.s
        now = time.time()
        suffix = "." + s.receipt_ext
        for name in names:
            if not name.endswith(suffix):
                continue
            stem = name[: -len(suffix)]
            st = self._exists(name)
            if st is None or not stat.S_ISREG(st.st_mode):
                continue
            age = now - st.st_mtime
            if protocol.BATCH_RE.match(stem) and age > ANSWERED_TTL:
                log.warning("%s: no thank-you for batch %s in %.0f days; cleaned up",
                            s.stream, stem, age / 86400)
                with suppress(OSError):
                    self._clean_batch(stem)
            elif stem.startswith(".") and age > MSM_RECEIPT_TTL:
                try:
                    data = self._read(name, protocol.MSM_MAX_BYTES)
                except (OSError, _Bad):
                    continue
                if data is not None and data.startswith(protocol.MSM_RECEIPT_MAGIC[0]):
                    with suppress(OSError):
                        os.unlink(name, dir_fd=self._i_fd)
                    log.info("%s: MiStaMover receipt %s never acknowledged; removed",
                             s.stream, show(name))


    # ------------------------------------------------------------------ abandoned batches

    def _abandoned_interval(self) -> float:
        return self.s.abandoned_batch_seconds / 10

    def _tick_alive(self) -> bool:
        self.notifier.watchdog()
        return not self.stopping

    def _tick(self) -> bool:
        self.notifier.watchdog()
        return True

    def _warn_once(self, name: str, msg: str, *args: object) -> None:
        if name not in self._abandoned_warned:
            self._abandoned_warned.add(name)
            log.warning(msg, self.s.stream, *args)

    def _look_for_abandoned(self, summary: Summary) -> float | None:
        """Remove the abandoned batch directories of I (see the module's docstring).

        Candidates are found from I's listing alone: a directory named like a batch, not
        the stop file, and no name in I that starts with "<batch>." or ".<batch>." (its
        control file, receipt, thank-you, their temporary names, a MiStaMover control
        file).  One whose own mtime and ctime are recent is passed over without a look
        inside; the others are examined to the bottom, ABANDONED_BUDGET entries in all
        (but the first to its end); the next look goes on where this one stopped.
        Returns in how many seconds to look again (something may be abandoned by then, or
        this look was cut short), None if nothing calls for it.
        """
        s = self.s
        limit = s.abandoned_batch_seconds
        interval = self._abandoned_interval()
        names = self._listdir()
        present = set(names)
        self._abandoned_warned &= present
        self._remove_set_aside(names)
        candidates = self._abandoned_candidates(names)
        start = bisect.bisect_left(candidates, self._abandoned_from)
        self._abandoned_from = ""
        try:
            i_dev = os.fstat(self._i_fd).st_dev
        except OSError:
            return None
        i_mount = _mount_id(self._i_fd)
        now = self._clock()
        since = now - limit
        budget = ABANDONED_BUDGET
        first = True
        wake: float | None = None  # (wall clock) when one may have become abandoned
        for name in candidates[start:] + candidates[:start]:
            if self.stopping:
                self._abandoned_from = name
                return interval
            try:
                st = os.stat(name, dir_fd=self._i_fd, follow_symlinks=False)
            except OSError:
                continue
            if not stat.S_ISDIR(st.st_mode):
                continue
            changed = _changed_at(st, now)
            if changed > since and st.st_dev == i_dev:  # cheap: it changed itself lately
                wake = changed + limit if wake is None else min(wake, changed + limit)
                continue
            if not first and budget <= 0:
                self._abandoned_from = name
                return interval
            found = _survey(self._i_fd, name, dev=i_dev, mount=i_mount, since=since, now=now,
                            budget=None if first else budget, tick=self._tick_alive)
            first = False
            budget -= found.entries
            if found.verdict == "fresh":
                due = found.newest + limit
                wake = due if wake is None else min(wake, due)
            elif found.verdict == "unfinished":
                self._abandoned_from = name
                return interval
            elif found.verdict == "foreign":
                self._warn_once(name, "%s: %s looks like an abandoned batch directory but is"
                                " left alone: %s", show(name), found.detail)
            elif found.verdict == "old":
                self._remove_abandoned(name, found, i_dev, i_mount, summary)
        if wake is None:
            return None
        return max(interval, wake - self._clock())

    def _abandoned_candidates(self, names: list[str]) -> list[str]:
        """The names in I's listing *names* that may be abandoned batch directories (by
        their names alone), sorted."""
        referenced = {n.lstrip(".").split(".", 1)[0] for n in names
                      if "." in n.lstrip(".")}
        # only the exact shape mstm-send's batch names have: a directory such as
        # "proj2" or "2024-01-01" (another stream's area, an operator's) is never taken
        return sorted(n for n in names if protocol.OUR_BATCH_RE.match(n)
                      and n != self.s.stop_file and n not in referenced)

    def _handshake_present(self, batch: str) -> bool:
        """Does a control file, receipt or thank-you of *batch* exist now (or a MiStaMover
        control file for an item of that name)?"""
        s = self.s
        names = [f"{batch}.{ext}" for ext in (s.control_ext, s.receipt_ext, s.thanks_ext)]
        names.append(protocol.mistamover_control_name(batch, control_ext=s.control_ext))
        for name in names:
            try:
                os.stat(name, dir_fd=self._i_fd, follow_symlinks=False)
            except FileNotFoundError:
                continue
            except OSError:
                pass
            return True
        return False

    def _remove_abandoned(self, batch: str, found: _Survey, i_dev: int, i_mount: str | None,
                          summary: Summary) -> None:
        """Remove I/<batch>, found unchanged since found.newest: rename it aside (the
        batch name is gone at once), look again (a change since, or a control file
        meanwhile, and it is put back), then rmtree relative to I's descriptor."""
        s = self.s
        if self._handshake_present(batch):
            return
        aside = f"{ABANDONED_PREFIX}{batch}-{secrets.token_hex(4)}"
        try:
            rename_noreplace(batch, aside, src_dir_fd=self._i_fd, dst_dir_fd=self._i_fd)
        except FileNotFoundError:
            return
        except OSError as err:
            self._warn_once(batch, "%s: cannot remove abandoned batch %s: %s", batch,
                            err.strerror or err)
            return
        again = _survey(self._i_fd, aside, dev=i_dev, mount=i_mount, since=found.newest,
                        now=self._clock(), budget=None, tick=self._tick, root_ctime=False)
        if again.verdict == "gone":  # not ours to remove any more
            return
        if again.verdict != "old" or self._handshake_present(batch):
            try:
                rename_noreplace(aside, batch, src_dir_fd=self._i_fd, dst_dir_fd=self._i_fd)
            except OSError as err:
                # the name was taken again meanwhile: what we set aside goes (a control
                # file for it is answered "missing", and its items are sent again)
                log.warning("%s: batch %s changed while being removed and cannot be put"
                            " back: %s", s.stream, batch, err.strerror or err)
            else:
                log.info("%s: batch %s changed while being removed; left in place",
                         s.stream, batch)
                return
        try:
            _remove_tree(aside, self._i_fd, self._tick)  # iterative, never follows a link
        except OSError as err:
            self._warn_once(aside, "%s: cannot remove abandoned batch %s (set aside as %s):"
                            " %s; tried again later", batch, aside, err)
            return
        with suppress(OSError):
            os.fsync(self._i_fd)
        age = self._clock() - found.newest
        summary.abandoned += 1
        log.warning("%s: batch %s abandoned (no control file, nothing in it changed for %s);"
                    " removed its directory: %d bytes in %d entries", s.stream, batch,
                    _duration(age), again.bytes, again.entries,
                    extra=event("abandoned_batch_removed", stream=s.stream, item=batch,
                                bytes=again.bytes, reason=f"unchanged for {age:.0f} s"))

    def _remove_set_aside(self, names: list[str]) -> None:
        """Batch directories set aside for removal, left by a crash or a failed rmtree."""
        for name in names:
            if name.startswith(ABANDONED_PREFIX):
                try:
                    _remove_tree(name, self._i_fd, self._tick)
                except OSError as err:
                    self._warn_once(name, "%s: cannot remove %s: %s; tried again later",
                                    show(name), err)


class _Refused(Exception):
    """The item must be refused; the message says why."""
