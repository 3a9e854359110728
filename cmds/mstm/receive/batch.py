"""The items of one control file: staged, checked, flushed to disk, then published in D.

For each item ``I/<batch>/<path>`` (or, for MiStaMover, ``I/<file>``), :class:`Publisher`

1. looks it up with no-follow opens, one component at a time (a symbolic link anywhere in
   the path refuses the item, it is never followed);
2. moves it into a private staging directory (a rename on the same file system, else a
   copy), so that nobody else can change it once checked;
3. checks it there: size, then the digest of exactly the bytes that will be published.

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
not work).  Only then may the receipt be written: an item is "ok" in a receipt only when
its data is on disk under its final name.

An item already staged when a batch is taken up again (after a crash) is taken from
staging and checked again; one already published counts as ok when the published file
has the right size and digest.  So each item is published once, and never visible
half-written under its final name.
"""

from __future__ import annotations

import errno
import hashlib
import logging
import os
import stat
from collections.abc import Callable, Sequence
from contextlib import suppress
from dataclasses import dataclass, field

from mstm import safefs
from mstm.log import event, fields, show
from mstm.protocol import ControlItem, Status
from mstm.receive.areas import BLOCK, FILE_FLAGS, REFUSING, Areas, closing, exists_in
from mstm.runloop import RunLoop
from mstm.safefs import open_dir, plain_mode, remove_tree, rename_noreplace, syncfs

log = logging.getLogger("mstm.receive")


class Stopped(Exception):
    """Stop was requested between two items."""


class _Refused(Exception):
    """The item must be refused; the message says why."""


@dataclass
class Job:
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
class Checked:
    """An item verified in staging, not yet flushed to disk nor published."""

    index: int  # in the control file
    item: ControlItem
    parts: list[str]
    staged: str  # its name in the job's staging directory


@dataclass(frozen=True)
class Result:
    status: Status
    detail: str = ""


def digest(fd: int, algorithm: str, tick: Callable[[], None],
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


class Publisher:
    """Receives the items (and directories) of one control file at a time into D."""

    def __init__(self, areas: Areas, loop: RunLoop) -> None:
        self.areas = areas
        self.s = areas.s
        self.loop = loop
        self._buf = bytearray(BLOCK)  # scratch for hashing

    def receive_all(self, job: Job, items: Sequence[ControlItem]) -> list[Result]:
        """Every item's result, in order; each "ok" one is on disk under its final name.

        Three passes, so that the cost of flushing to disk is paid once per control file
        rather than once per item: check every item in staging (stop() is honoured
        between two of them: Stopped); flush the good ones to disk together; rename them
        into D, grouped by directory, and flush the renames: one more syncfs if they went
        into several directories, else an fsync of the directory (of each directory, where
        syncfs does not work).  Nothing is published before everything has been checked
        and flushed.  OSError: something could not be flushed; nothing is answered.
        """
        results: list[Result | None] = [None] * len(items)
        checked: list[Checked] = []
        try:
            job.staged = set(os.listdir(job.stage_fd))  # staged before a crash
            if job.staged:
                log.info("%s: %s resumed: %d items already staged", self.s.stream,
                         job.label, len(job.staged))
            for index, item in enumerate(items):
                if self.loop.stopping:
                    log.info("%s: stopping; %s is answered after the restart",
                             self.s.stream, job.label)
                    raise Stopped
                got = self._check(job, index, item)
                if isinstance(got, Checked):
                    checked.append(got)
                else:
                    results[index] = got
                self.loop.tick()
            synced = self._make_durable(job, checked, results)
            checked = [c for c in checked if results[c.index] is None]
            checked.sort(key=lambda c: c.parts[:-1])  # each directory flushed once
            job.defer_dirs = synced and len({tuple(c.parts[:-1]) for c in checked}) > 1
            for c in checked:
                results[c.index] = self._publish(job, c.item, c.parts, c.staged)
                self.loop.tick()
            if job.defer_dirs and not syncfs(job.stage_fd):
                # the next pass finds them published and flushes each directory
                raise OSError(errno.EIO, f"{job.label}: cannot flush the renames (syncfs)")
            self._sync_dir(job, None)
        finally:
            self._sync_dir(job, None, flush=False)
        done = [r for r in results if r is not None]
        if len(done) != len(items):
            raise AssertionError("an item without a result")
        for item, result in zip(items, done, strict=True):
            self.log_item(job, item, result)
        return done

    def make_dirs(self, job: Job, dirs: Sequence[str]) -> list[Status]:
        """Create the empty directories a control file lists (a directory item's), merged
        into D like its files: an existing directory is fine, a link or non-directory on
        the way is refused.  Made durable with one syncfs (else an fsync of each)."""
        statuses: list[Status] = []
        for rel in dirs:
            try:
                parts = [os.fsdecode(p) for p in safefs.split(rel)]
                if self.areas.is_reserved(parts):
                    statuses.append(Status.REFUSED)  # would land in mstm's own area
                    continue
                fd = open_dir(parts, self.areas.d_fd, create=True)
            except ValueError:
                statuses.append(Status.REFUSED)
                continue
            except OSError as err:
                statuses.append(Status.REFUSED if err.errno in REFUSING else Status.IO_ERROR)
                log.warning("%s: %s: directory %s: %s", self.s.stream, job.label, show(rel),
                            err.strerror or err,
                            extra=fields(stream=self.s.stream, item=rel))
                continue
            try:
                if not syncfs(fd):
                    os.fsync(fd)
                statuses.append(Status.OK)
            except OSError:
                statuses.append(Status.IO_ERROR)
            finally:
                os.close(fd)
        return statuses

    def log_item(self, job: Job, item: ControlItem, result: Result) -> None:
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

    # ------------------------------------------------------------------ steps 1-3: check

    def _check(self, job: Job, index: int, item: ControlItem) -> Result | Checked:
        """Stage the item (unless it already is) and verify it there: Checked if it is
        good, not yet flushed nor published; else its final result."""
        parts = item.relpath.split("/")
        if self.areas.is_reserved(parts):
            return Result(Status.REFUSED, "would land in mstm's own area")
        staged = str(len(os.fsencode(item.relpath))) + "-" + hashlib.sha256(
            os.fsencode(item.relpath)).hexdigest()[:40]
        if staged not in job.staged:
            got = self._stage(job, item, parts, staged)
            if got is not None:
                return got
        bad = self._verify(job, item, staged)
        if bad is not None:
            return bad
        return Checked(index, item, parts, staged)

    def _stage(self, job: Job, item: ControlItem, parts: list[str],
               staged: str) -> Result | None:
        """Move (or copy) the item into staging; a result if that is already the end."""
        if job.source_fd is None:
            if job.source_refused:
                return Result(Status.REFUSED, "the batch directory is a symbolic link")
            return self._missing(job, item, parts)
        try:
            parent = open_dir(parts[:-1], job.source_fd)
        except OSError as err:
            if err.errno == errno.ENOENT:
                return self._missing(job, item, parts)
            if err.errno in REFUSING:
                return Result(Status.REFUSED, "a symbolic link or non-directory in its path")
            return Result(Status.IO_ERROR, str(err))
        with closing(parent):
            leaf = parts[-1]
            try:
                st = os.stat(leaf, dir_fd=parent, follow_symlinks=False)
            except FileNotFoundError:
                return self._missing(job, item, parts)
            except OSError as err:
                return Result(Status.IO_ERROR, str(err))
            if stat.S_ISLNK(st.st_mode):
                return Result(Status.REFUSED, "a symbolic link")
            if not stat.S_ISREG(st.st_mode):
                return Result(Status.REFUSED, "not a regular file")
            if st.st_size != item.size:
                return Result(Status.BAD_SIZE, f"{st.st_size} bytes, expected {item.size}")
            try:
                if self.areas.same_fs:
                    os.rename(leaf, staged, src_dir_fd=parent, dst_dir_fd=job.stage_fd)
                else:
                    self._copy_in(parent, leaf, job.stage_fd, staged)
                    os.unlink(leaf, dir_fd=parent)
            except FileNotFoundError:
                return self._missing(job, item, parts)
            except _Refused as err:
                return Result(Status.REFUSED, str(err))
            except OSError as err:
                return Result(Status.IO_ERROR, str(err))
        return None

    def _copy_in(self, src_dir: int, leaf: str, dst_dir: int, staged: str) -> None:
        """Copy src_dir/leaf (no-follow) to dst_dir/staged, flushed; via a .part name."""
        try:
            src = os.open(leaf, FILE_FLAGS, dir_fd=src_dir)
        except OSError as err:
            if err.errno in REFUSING:
                raise _Refused("a symbolic link") from None
            raise
        part = staged + ".part"
        with closing(src):
            st = os.fstat(src)
            if not stat.S_ISREG(st.st_mode):
                raise _Refused("not a regular file")
            dst = os.open(part, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_NOFOLLOW |
                          os.O_CLOEXEC, 0o600, dir_fd=dst_dir)
            with closing(dst):
                buf = bytearray(BLOCK)
                with open(src, "rb", buffering=0, closefd=False) as f:
                    while n := f.readinto(buf):
                        view = memoryview(buf)[:n]
                        while view:
                            view = view[os.write(dst, view):]
                        self.loop.tick()
                os.fchmod(dst, stat.S_IMODE(st.st_mode) & 0o777)
                os.fsync(dst)
        os.rename(part, staged, src_dir_fd=dst_dir, dst_dir_fd=dst_dir)

    def _missing(self, job: Job, item: ControlItem, parts: list[str]) -> Result:
        """Not in the incoming area: ok if already published with this content (a restart
        after a crash, or a re-delivery), else missing."""
        if self._published_as(job, item, parts):
            return Result(Status.OK, "already published")
        return Result(Status.MISSING)

    def _published_as(self, job: Job, item: ControlItem, parts: list[str]) -> bool:
        try:
            parent = open_dir(parts[:-1], self.areas.d_fd)
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
            fd = os.open(leaf, FILE_FLAGS, dir_fd=dir_fd)
        except OSError as err:
            if err.errno in (*REFUSING, errno.ENXIO, errno.EISDIR):
                return None
            raise
        with closing(fd):
            st = os.fstat(fd)
            if not stat.S_ISREG(st.st_mode):
                return None
            if st.st_size != item.size:
                return False
            got, size = digest(fd, algorithm, self.loop.tick, self._buf)
            return size == item.size and got == item.digest

    def _verify(self, job: Job, item: ControlItem, staged: str) -> Result | None:
        """Size and digest of the staged file (read, not flushed); None if it is good, else
        the result, the staged file being removed.  No descriptor is kept."""
        try:
            fd = os.open(staged, FILE_FLAGS, dir_fd=job.stage_fd)
        except OSError as err:
            with suppress(OSError):
                remove_tree(staged, job.stage_fd)
            if err.errno in REFUSING:
                return Result(Status.REFUSED, "a symbolic link")
            return Result(Status.IO_ERROR, str(err))
        with closing(fd):
            st = os.fstat(fd)
            bad: Result | None = None
            if not stat.S_ISREG(st.st_mode):
                bad = Result(Status.REFUSED, "not a regular file")
            elif st.st_size != item.size:
                bad = Result(Status.BAD_SIZE, f"{st.st_size} bytes, expected {item.size}")
            else:
                try:
                    plain_mode(fd)  # no setuid, setgid or sticky bit is ever published
                except OSError as err:
                    bad = Result(Status.REFUSED, "its setuid, setgid or sticky bit cannot"
                                 f" be cleared: {err.strerror}")
            if bad is None:
                try:
                    got, size = digest(fd, job.algorithm, self.loop.tick, self._buf)
                    if size != item.size:
                        bad = Result(Status.BAD_SIZE, f"read {size} bytes, expected"
                                     f" {item.size}")
                    elif got != item.digest:
                        bad = Result(Status.BAD_CHECKSUM,
                                     f"{job.algorithm} {got}, expected {item.digest}")
                except OSError as err:
                    bad = Result(Status.IO_ERROR, str(err))
            if bad is not None:
                remove_tree(staged, job.stage_fd)  # a directory, if one was swapped in
        return bad

    def _make_durable(self, job: Job, checked: list[Checked],
                      results: list[Result | None]) -> bool:
        """Flush the checked items' data to disk before any is published: one syncfs(2)
        of the staging file system for them all (True), else (a single item, or syncfs
        not available or failed) an fsync of each; an item that cannot be flushed gets
        its result in *results* and its staged file is removed."""
        if not checked:
            return False
        self.loop.tick()
        if len(checked) > 1 and syncfs(job.stage_fd):
            self.loop.tick()
            return True
        for c in checked:
            try:
                fd = os.open(c.staged, FILE_FLAGS, dir_fd=job.stage_fd)
                with closing(fd):
                    os.fsync(fd)
            except OSError as err:
                with suppress(OSError):
                    remove_tree(c.staged, job.stage_fd)
                results[c.index] = Result(Status.IO_ERROR, str(err))
            self.loop.tick()
        return False

    # ------------------------------------------------------------------ step 4: publish

    def _publish(self, job: Job, item: ControlItem, parts: list[str], staged: str) -> Result:
        for attempt in range(3):
            result = self._publish_once(job, item, parts, staged, last=attempt == 2)
            if result is not None:
                return result
        raise AssertionError("unreachable")

    def _publish_once(self, job: Job, item: ControlItem, parts: list[str], staged: str, *,
                      last: bool) -> Result | None:
        """Rename the staged file into D; None: try again (a directory vanished)."""
        def drop(result: Result) -> Result:
            with suppress(OSError):
                remove_tree(staged, job.stage_fd)
            return result

        try:
            parent = open_dir(parts[:-1], self.areas.d_fd, create=True)
        except OSError as err:
            if err.errno in REFUSING:
                return drop(Result(Status.REFUSED, "a symbolic link or non-directory in"
                                   " its published path"))
            return drop(Result(Status.IO_ERROR, str(err)))
        leaf = parts[-1]
        detail = ""
        try:
            try:
                rename_noreplace(staged, leaf, src_dir_fd=job.stage_fd, dst_dir_fd=parent)
            except FileExistsError:
                same = self._same_content(parent, leaf, item, job.algorithm)
                if same is None:
                    return drop(Result(Status.REFUSED, "published name is taken by a"
                                       " symbolic link or non-file"))
                if same:
                    drop(Result(Status.OK))
                    detail = "identical file already published"
                elif not self.s.overwrite:
                    return drop(Result(Status.REFUSED, "a different file is already"
                                       " published under this name ([incoming] overwrite"
                                       " = false)"))
                else:
                    os.rename(staged, leaf, src_dir_fd=job.stage_fd, dst_dir_fd=parent)
                    detail = "replaced a different file"
        except FileNotFoundError as err:
            # the directory we opened was removed meanwhile (replaced by another)
            if not last and exists_in(job.stage_fd, staged):
                return None
            return drop(Result(Status.IO_ERROR, str(err)))
        except OSError as err:
            return drop(Result(Status.IO_ERROR, str(err)))
        else:
            # a directory that cannot be flushed (this one or the one before) is no item's
            # fault: OSError, and the batch is answered on a later pass
            if not job.defer_dirs:
                self._sync_dir(job, parent)
        finally:
            if job.synced_fd != parent:
                os.close(parent)
        return Result(Status.OK, detail)

    def _sync_dir(self, job: Job, fd: int | None, *, flush: bool = True) -> None:
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
