"""Readiness: which items of a stream's directory may be sent now.

An item (a regular file, or with ``transfer_unit = dir`` a top-level directory) is
*ready* when all of these hold:

(a) **named like an item**: no component of its path starts with "." (rsync's temporary
    files, our ``.mstm-partial``, ``.stop`` are never items) and its name matches none of
    ``ignore_patterns`` (shell globs on the base name; a directory whose name matches is
    not walked into).  Ready markers are never items either.  These rules pick items;
    inside a directory unit everything (dot files too) belongs to the unit and counts
    for (b) and (c), since a half-written ``.tmp`` file there means the unit is not done.
(b) **quiet**: ``settle_seconds`` have passed since the newest of its mtime and ctime
    (for a directory unit: of everything in the tree, directories included).  ctime is
    what makes this sound: ``cp -p`` or ``tar`` can set mtime into the past, but any
    change sets ctime to the present.  No sleeping is involved, so ``--once`` is instant,
    and an item that is still settling tells the caller when to look again
    (:attr:`ScanReport.next_check`).
(c) **closed**: no process on this host holds it (or, for a directory unit, any file in
    its tree) open for writing; see :mod:`mstm.openfiles`.  Asked once per scan, and only
    when some item passed (a), (b) and (d).
(d) **marked**, when ``ready_marker`` is set: the marker exists.  The template names it
    relative to the stream directory, ``{name}`` being the item's relative path:
    ``"{name}.done"`` for ``a/b.dat`` is ``a/b.dat.done``; ``"{name}/COMPLETE"`` (for
    directory units) is a file inside the directory.

The walk never follows symlinked directories, never opens FIFOs or devices, needs no
recursion, and treats everything that vanishes or changes while it looks (rsync temp
files, a producer renaming things) as normal: it is skipped, or for a directory unit
the unit counts as still changing.  Only an unusable stream directory raises
(:class:`StreamDirectoryError`).

Symbolic links: with ``follow_symlinks`` off (the default) a link is never an item; it
is skipped with a reason and left alone.  With it on (``transfer_unit = file``), a link
to a regular file is an item whose version (size, mtime) is that of the file it points
to: that content is sent, hashed and verified, and in move mode only the link is deleted
(:mod:`mstm.send.finish`).  A link to a directory, a dangling link, a loop, a link to a FIFO
or device is skipped with a reason.  Inside a directory unit nothing is ever followed,
and a unit that holds a link, FIFO, socket or device is skipped with the reason: a
directory unit carries regular files and directories (empty ones too), each verified at
the target, and nothing else.  Every path below the stream directory is reached
through :mod:`mstm.safefs`: no symbolic link on the way is ever followed.
"""

from __future__ import annotations

import errno
import fnmatch
import logging
import os
import re
import stat
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from mstm import safefs
from mstm.errors import EXIT_CONFIG, EXIT_TEMPFAIL, MstmError
from mstm.log import event, fields, show
from mstm.openfiles import open_for_writing
from mstm.spool import ItemRecord, Spool

log = logging.getLogger("mstm.scan")

_VANISHED = (FileNotFoundError, NotADirectoryError)
_NS = 1_000_000_000


@dataclass(frozen=True)
class Candidate:
    """One item that could be sent.

    ``relpath`` is relative to the stream directory, "/"-separated, decoded with
    :func:`os.fsdecode` (surrogateescape), so ``os.fsencode(relpath)`` gives back the
    exact bytes of names that are not UTF-8.
    """

    relpath: str
    size: int  # bytes; for a directory unit the total of the regular files in its tree
    mtime_ns: int  # for a directory unit the newest mtime in its tree
    is_dir: bool


@dataclass
class ScanReport:
    ready: list[Candidate] = field(default_factory=list)
    waiting: int = 0  # items that exist but are not ready yet
    skipped: list[tuple[str, str]] = field(default_factory=list)  # (relpath, reason)
    # Seconds until the earliest settling item could become ready; None if nothing is
    # settling (items waiting for their marker or for a writer to close have no
    # predictable time: a watcher's event, or the poll interval, brings the next scan).
    next_check: float | None = None


class StreamDirectoryError(MstmError):
    """The stream directory itself cannot be read (missing, not a directory, I/O)."""

    exit_code = EXIT_TEMPFAIL


def _fsbytes_key(text: str) -> bytes:
    return os.fsencode(text)


class _Rules:
    """Naming rules of one stream, compiled once per scan."""

    def __init__(self, ignore_patterns: tuple[str, ...], ready_marker: str | None) -> None:
        self._ignore = (
            re.compile("|".join(fnmatch.translate(p) for p in ignore_patterns))
            if ignore_patterns
            else None
        )
        self.marker = ready_marker
        self._marker_re: re.Pattern[str] | None = None
        if ready_marker:
            parts = [re.escape(p) for p in ready_marker.split("{name}")]
            rx = parts[0]
            if len(parts) > 1:  # "{name}" once or more; else one marker gates every item
                rx += "(?P<name>.+)"
                for p in parts[1:-1]:
                    rx += p + "(?P=name)"
                rx += parts[-1]
            self._marker_re = re.compile(rx, re.DOTALL)

    def ignored(self, name: str) -> bool:
        return name.startswith(".") or (
            self._ignore is not None and self._ignore.match(name) is not None
        )

    def is_marker(self, relpath: str) -> bool:
        """True for names that are (or would be) some item's ready marker."""
        return self._marker_re is not None and self._marker_re.fullmatch(relpath) is not None

    def marker_for(self, relpath: str) -> str | None:
        return marker_for(self.marker, relpath)


def marker_for(template: str | None, relpath: str) -> str | None:
    """The ready marker of item *relpath* (relative to the stream directory), or None."""
    if not template:
        return None
    return template.replace("{name}", relpath)


def _quiet_since_ns(st: os.stat_result, now_ns: int) -> int:
    """When the inode last changed: the newer of mtime and ctime.

    An mtime in the future (``touch -d``, an archive from a host with a fast clock) is
    not believed: ctime alone then says when the inode last changed, so such a file is
    not held back until that future date.
    """
    mtime, ctime = st.st_mtime_ns, st.st_ctime_ns
    return max(mtime, ctime) if mtime <= now_ns else ctime


def _join(rel: str, name: str) -> str:
    return f"{rel}/{name}" if rel else name


@dataclass
class _Item:
    cand: Candidate
    quiet_ns: int
    inodes: set[tuple[int, int]]


class _Scanner:
    def __init__(self, stream: Any, now: float, root_fd: int) -> None:
        self.stream = stream
        self.root_fd = root_fd
        self.now_ns = int(now * _NS)
        self.settle_ns = int(float(stream.settle_seconds) * _NS)
        self.rules = _Rules(tuple(stream.ignore_patterns), stream.ready_marker)
        self.follow = bool(stream.follow_symlinks)
        self.report = ScanReport()
        self.pending: list[_Item] = []

    # -- listing ---------------------------------------------------------------------

    def _open_dir(self, rel: str) -> int | None:
        """An fd for directory *rel* (never through a symlink), or None if unusable."""
        try:
            return safefs.open_beneath(self.root_fd, rel)
        except _VANISHED:
            log.debug("directory vanished during scan: %r", rel)
        except OSError as e:
            if e.errno == errno.ELOOP:  # replaced by a symlink since it was listed
                log.debug("directory became a symlink during scan: %r", rel)
            else:
                self.report.skipped.append((rel, f"cannot read directory: {e.strerror}"))
        return None

    def _entries(self, rel: str) -> Iterator[tuple[os.DirEntry[str], int]]:
        """Entries of directory *rel* with the directory's fd (open while iterating)."""
        fd = self._open_dir(rel)
        if fd is None:
            return
        try:
            with os.scandir(fd) as it:
                for entry in it:
                    yield entry, fd
        except OSError as e:  # EIO, ESTALE while reading the directory
            self.report.skipped.append((rel, f"cannot read directory: {e.strerror}"))
        finally:
            os.close(fd)

    # -- transfer_unit = file ----------------------------------------------------------

    def walk_files(self) -> None:
        stack = [""]
        while stack:
            rel = stack.pop()
            for entry, dir_fd in self._entries(rel):
                name = entry.name
                if self.rules.ignored(name):
                    continue
                relpath = _join(rel, name)
                try:
                    if entry.is_dir(follow_symlinks=False):
                        stack.append(relpath)
                        continue
                    st = entry.stat(follow_symlinks=False)
                except _VANISHED:
                    log.debug("vanished during scan: %r", relpath)
                    continue
                except OSError as e:
                    self.report.skipped.append((relpath, f"cannot stat: {e.strerror}"))
                    continue
                mode = st.st_mode
                if stat.S_ISDIR(mode):  # was something else when listed
                    stack.append(relpath)
                elif stat.S_ISREG(mode):
                    if not self.rules.is_marker(relpath):
                        self._consider_file(relpath, st, st)
                elif stat.S_ISLNK(mode):
                    self._symlink_file(relpath, name, st, dir_fd)
                else:
                    self.report.skipped.append((relpath, safefs.special_reason(mode)))

    def _symlink_file(self, relpath: str, name: str, lst: os.stat_result, dir_fd: int) -> None:
        if not self.follow:
            self.report.skipped.append((relpath, "symbolic link (follow_symlinks is off)"))
            return
        try:
            st = os.stat(name, dir_fd=dir_fd, follow_symlinks=True)
        except _VANISHED:
            self.report.skipped.append((relpath, "dangling symbolic link"))
            return
        except OSError as e:
            self.report.skipped.append((relpath, f"symbolic link: {e.strerror}"))
            return
        if stat.S_ISREG(st.st_mode):
            if not safefs.link_owner_ok(lst, st):
                self.report.skipped.append(
                    (relpath, f"symbolic link to a file of another owner (link uid "
                              f"{lst.st_uid}, file uid {st.st_uid})"))
            elif not self.rules.is_marker(relpath):
                self._consider_file(relpath, st, lst)
        elif stat.S_ISDIR(st.st_mode):
            self.report.skipped.append((relpath, "symbolic link to a directory (never followed)"))
        else:
            self.report.skipped.append(
                (relpath, f"symbolic link to a {safefs.special_reason(st.st_mode)}")
            )

    def _consider_file(self, relpath: str, st: os.stat_result, lst: os.stat_result) -> None:
        quiet = max(_quiet_since_ns(st, self.now_ns), _quiet_since_ns(lst, self.now_ns))
        self._consider(
            _Item(
                Candidate(relpath, st.st_size, st.st_mtime_ns, is_dir=False),
                quiet,
                {(st.st_dev, st.st_ino)},
            )
        )

    # -- transfer_unit = dir -----------------------------------------------------------

    def walk_dirs(self) -> None:
        for entry, dir_fd in self._entries(""):
            name = entry.name
            if self.rules.ignored(name) or self.rules.is_marker(name):
                continue
            try:
                st = entry.stat(follow_symlinks=False)
            except _VANISHED:
                log.debug("vanished during scan: %r", name)
                continue
            except OSError as e:
                self.report.skipped.append((name, f"cannot stat: {e.strerror}"))
                continue
            mode = st.st_mode
            if stat.S_ISDIR(mode):
                item = self._tree(name, st)
                if item is not None:
                    self._consider(item)
            elif stat.S_ISREG(mode):
                self.report.skipped.append((name, "not a directory (transfer_unit = dir)"))
            elif stat.S_ISLNK(mode):
                if not self.follow:
                    reason = "symbolic link (follow_symlinks is off)"
                else:
                    try:
                        target = os.stat(name, dir_fd=dir_fd).st_mode
                    except OSError:
                        reason = "dangling symbolic link"
                    else:
                        reason = (
                            "symbolic link to a directory (never followed)"
                            if stat.S_ISDIR(target)
                            else "symbolic link, not a directory (transfer_unit = dir)"
                        )
                self.report.skipped.append((name, reason))
            else:
                self.report.skipped.append((name, safefs.special_reason(mode)))

    def _tree(self, top: str, top_st: os.stat_result) -> _Item | None:
        """Aggregate one directory unit: size, newest mtime, newest change, inodes.

        A unit holding a symbolic link, FIFO, socket or device is refused (skipped with
        the reason): a directory unit carries only regular files and directories, and
        its source is never deleted with anything unverified in it."""
        size = 0
        newest_mtime = top_st.st_mtime_ns
        quiet = _quiet_since_ns(top_st, self.now_ns)
        inodes: set[tuple[int, int]] = set()
        changing = False

        def moved(rel: str, err: OSError) -> None:  # a directory vanished or became a link
            nonlocal changing
            if not isinstance(err, _VANISHED) and err.errno != errno.ELOOP:
                raise err
            changing = True

        try:
            for entry in safefs.walk(self.root_fd, top, on_error=moved):
                st = entry.st
                newest_mtime = max(newest_mtime, st.st_mtime_ns)
                quiet = max(quiet, _quiet_since_ns(st, self.now_ns))
                if entry.is_file:
                    size += st.st_size
                    inodes.add((st.st_dev, st.st_ino))
                elif not entry.is_dir:
                    self.report.skipped.append(
                        (top, f"holds a {safefs.special_reason(st.st_mode)} "
                              f"({entry.relpath}): a directory unit carries only regular "
                              f"files and directories"))
                    return None
        except _VANISHED:
            log.debug("vanished during scan: %r", top)
            return None
        except OSError as e:
            if e.errno == errno.ELOOP:
                return None  # the unit itself became a link since it was listed
            self.report.skipped.append((top, f"cannot read it: {e.strerror}"))
            return None
        if changing:
            log.debug("directory unit changed during scan: %r", top)
            quiet = max(quiet, self.now_ns)
        return _Item(Candidate(top, size, newest_mtime, is_dir=True), quiet, inodes)

    # -- readiness ---------------------------------------------------------------------

    def _marker_exists(self, relpath: str) -> bool:
        marker = self.rules.marker_for(relpath)
        if marker is None:
            return True
        try:
            safefs.lstat_beneath(self.root_fd, marker)
        except (OSError, ValueError):
            return False
        return True

    def _consider(self, item: _Item) -> None:
        """Apply (d) and (b); what passes waits for the one open-files check (c)."""
        relpath = item.cand.relpath
        if not self._marker_exists(relpath):
            log.debug("waiting for ready marker: %r", relpath)
            self.report.waiting += 1
            return
        ready_at = item.quiet_ns + self.settle_ns
        if ready_at > self.now_ns:
            self.report.waiting += 1
            due = (ready_at - self.now_ns) / _NS
            nc = self.report.next_check
            self.report.next_check = due if nc is None else min(nc, due)
            return
        self.pending.append(item)

    def finish(self, open_files: Callable[[Path], set[tuple[int, int]]]) -> ScanReport:
        report = self.report
        if self.pending:
            busy = open_files(Path(self.stream.directory))
            for item in self.pending:
                if busy and not item.inodes.isdisjoint(busy):
                    log.debug("open for writing: %r", item.cand.relpath)
                    report.waiting += 1
                else:
                    report.ready.append(item.cand)
        self.pending = []
        report.ready.sort(key=lambda c: _fsbytes_key(c.relpath))
        report.skipped.sort(key=lambda s: _fsbytes_key(s[0]))
        return report


def scan(
    stream: Any,
    *,
    now: float | None = None,
    open_files: Callable[[Path], set[tuple[int, int]]] = open_for_writing,
) -> ScanReport:
    """Walk *stream*'s directory once and sort its items into ready / waiting / skipped.

    *stream* is a :class:`mstm.config.StreamConfig` (attributes used: ``directory``,
    ``transfer_unit``, ``settle_seconds``, ``ignore_patterns``, ``ready_marker``,
    ``follow_symlinks``).  *now* (default: the current time) is the instant the settle
    period is measured against.  Ready items come sorted by the bytes of their path.

    Raises :class:`StreamDirectoryError` only if the stream directory itself cannot be
    opened; nothing below it makes the scan fail.
    """
    directory = Path(stream.directory)
    try:
        root_fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    except OSError as e:
        err = StreamDirectoryError(
            f"stream directory {directory}: {e.strerror}",
            hint="check [data_stream] directory, and that its filesystem is mounted",
        )
        if isinstance(e, _VANISHED):
            err.exit_code = EXIT_CONFIG
        raise err from e
    try:
        scanner = _Scanner(stream, time.time() if now is None else now, root_fd)
        if stream.transfer_unit == "dir":
            scanner.walk_dirs()
        else:
            scanner.walk_files()
        report = scanner.finish(open_files)
    finally:
        os.close(root_fd)
    log.debug(
        "scanned %s: %d ready, %d waiting, %d skipped",
        directory,
        len(report.ready),
        report.waiting,
        len(report.skipped),
    )
    return report


def enqueue_ready(stream: Any, spool: Spool, ready: Iterable[Candidate]) -> int:
    """Queue the ready items of *stream* that its spool does not know; how many were new.

    In move mode an item whose id is in ``done/`` while its source is still here is
    queued again (see mstm.send.finish): it is a new file sharing path, size and mtime with
    one delivered before, or one whose deletion failed, and is sent and verified again,
    never deleted unsent.  In mirror mode ``done/`` means "this version is at the target".
    """
    now = time.time()
    records = [ItemRecord(relpath=c.relpath, size=c.size, mtime_ns=c.mtime_ns,
                          is_dir=c.is_dir, enqueued_at=now) for c in ready]
    return spool.enqueue(records, again_if_done=stream.outgoing.transfer_mode == "move")


def scan_and_queue(stream: Any, spool: Spool) -> ScanReport:
    """Scan *stream* and queue what is ready in *spool*, saying what was queued and
    (at debug level) what was skipped and why.  The caller holds the spool's scan lock."""
    report = scan(stream)
    added = enqueue_ready(stream, spool, report.ready)
    if added:
        log.info("%s: %d new item(s) queued", stream.name, added,
                 extra=event("enqueued", stream=stream.name))
    for relpath, reason in report.skipped:
        log.debug("skipped %s: %s", show(relpath), reason,
                  extra=fields(stream=stream.name, item=relpath, reason=reason))
    return report
