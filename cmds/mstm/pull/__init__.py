"""Pull streams: fetch a remote host's items home, as HPC ASSyncy's mxsync did.

A pull stream (``[data_stream] direction = pull``) lists ``[pull] source_dir`` on
``[outgoing] target_host`` and fetches each item (an entry directly inside it: a
directory or a regular file) into a local folder chosen by ordered ``map`` rules under
``[data_stream] directory``.  One cycle:

1. the done-ledger (:mod:`mstm.pull.ledger`) is read again (a person may have edited it);
2. one remote command lists the whole tree, NUL-separated (``find -printf``), so every
   item gets a signature: its number of entries, total bytes and newest mtime;
3. each item is selected (``item_pattern``, ``max_age_days``), checked (a name that
   could escape the destination, or that cannot be shown safely, is refused), and
   mapped to a folder (first rule that matches); items that map nowhere, or are refused,
   are reported once (event ``unmapped``) and remembered in the ledger;
4. items never done, or whose signature changed since they were done (ASSyncy fetched
   an item only once: its defect 1), are fetched, up to ``max_tasks`` at once, each by
   one rsync over the stream's ssh connection (ControlMaster), under a per-item lock so
   no item is ever fetched twice at once, not even by two processes (defect 3);
5. an item is done when its rsync exited 0 and a second rsync, ``--dry-run --checksum
   --itemize-changes``, finds nothing left to transfer: every file's content compared
   by checksum, never by size alone (defect 2).  If it finds something (a local file of
   the same size and time but other bytes), one more transfer with ``--checksum`` runs
   and is verified again.  Only then is the item written to the ledger (atomically,
   under a lock: defect 4).

A hung connection never holds a task slot (defect 5): ssh has ConnectTimeout and
ServerAlive, rsync ``--timeout``, the listing a deadline, and since rsync's own timeout
counts its keep-alives as traffic, each rsync run is watched: one whose processes read
nothing for ``stall_seconds`` (a checksum pass: plus a second per 50 MiB of the item) is
killed with its whole process group, and the item tried again next cycle.  No secret is
ever logged (defect 7): mstm knows none, only the key file's path.

Remote names are untrusted: they travel to rsync on stdin (``--files-from - --from0``,
never on a command line, never glob-expanded), and each local path is built from a
validated name (no '/', no leading '.', nothing unprintable, at most 255 bytes) and
checked to lie directly inside its folder.

Without ``execute`` a cycle only plans: it lists and shows what would be fetched where,
and changes nothing (no ledger, no folder, no lock file).
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import hashlib
import json
import logging
import os
import re
import signal
import subprocess
import threading
import time
from collections.abc import Callable, Sequence
from concurrent.futures import FIRST_COMPLETED, Future, ThreadPoolExecutor, wait
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import click
import psutil

from mstm import safefs
from mstm.config import StreamConfig
from mstm.errors import EXIT_ITEMS_FAILED, EXIT_OK, EXIT_USAGE, TargetUnavailable, die
from mstm.log import event, fields, show, under_journal
from mstm.notify import Notifier
from mstm.pause import is_paused, say_pause_change
from mstm.pull.ledger import DONE, UNMAPPED, Entry, Ledger, LedgerError, now_iso
from mstm.send import json_path
from mstm.transports.ssh import SshConnection, SshTarget, spawn

log = logging.getLogger("mstm.pull")

PARTIAL = ".mstm-partial"
MAX_NAME_BYTES = 255
_XFER = b"mstm-xfer:"
_VERIFY = b"mstm-verify:"
_NUMBER = re.compile(rb"\d+(\.\d+)?")
# A checksum pass may be silent while the remote host reads: it gets stall_seconds plus
# one second for every this many bytes of the item.
CHECKSUM_RATE = 50 << 20
RSYNC_VANISHED = 24  # "some files vanished before they could be transferred"

# What a cycle decides for each remote item
FETCH = "fetch"  # never done
REFETCH = "refetch"  # done, but its signature changed since
UP_TO_DATE = "up_to_date"
UNMAPPED_ITEM = "unmapped"  # no map rule matches
REFUSED = "refused"  # a name or kind that is never fetched
TOO_OLD = "too_old"  # older than max_age_days
IGNORED = "ignored"  # does not match item_pattern
ACTIONS = (FETCH, REFETCH, UP_TO_DATE, UNMAPPED_ITEM, REFUSED, TOO_OLD, IGNORED)

# What happened to an item that was to be fetched
FETCHED = "fetched"
FAILED = "failed"
BUSY = "busy"  # another worker holds its lock
STOPPED = "stopped"
_PAUSE_CHECK = 2.0  # seconds between looks at the stop file while an rsync runs
ALREADY_DONE = "already_done"  # another worker finished it meanwhile
CHANGING = "changing"  # still being written at the source: tried again next cycle


class ListingError(TargetUnavailable):
    """The remote listing failed or could not be trusted."""


# --------------------------------------------------------------------------- listing


@dataclass(frozen=True)
class RemoteItem:
    """One entry directly inside source_dir, with what its tree looked like."""

    raw: bytes  # the name as the remote host gave it
    kind: str  # find's %y of the entry itself: d, f, l, ... ("" if it was not listed)
    entries: int  # entries in its tree, itself included
    bytes: int  # total size of its regular files
    mtime: float  # newest mtime in its tree
    mtime_text: str  # the same, exactly as listed

    @property
    def name(self) -> str:
        return os.fsdecode(self.raw)

    @property
    def signature(self) -> str:
        return f"entries={self.entries} bytes={self.bytes} mtime={self.mtime_text}"


def listing_argv(source_dir: str) -> list[str]:
    """The remote command: every entry below source_dir, four NUL-terminated fields each
    (path relative to source_dir, type, mtime, size).  GNU find on the remote host."""
    return ["env", "LC_ALL=C", "find", "-H", source_dir.rstrip("/") + "/", "-mindepth", "1",
            "-printf", "%P\\0%y\\0%T@\\0%s\\0"]


def parse_listing(out: bytes) -> list[RemoteItem]:
    """The items of a listing, in name order; a malformed record rejects it all."""
    fields_ = out.split(b"\0")
    if fields_ and fields_[-1] == b"":
        fields_.pop()
    if len(fields_) % 4:
        raise ListingError("malformed remote listing (not four fields per entry)")
    acc: dict[bytes, list[Any]] = {}  # name -> [kind, entries, bytes, mtime, mtime_text]
    for i in range(0, len(fields_), 4):
        path, kind, mtime, size = fields_[i:i + 4]
        if not path or not _NUMBER.fullmatch(mtime) or not size.isdigit() or len(kind) != 1:
            raise ListingError(f"malformed remote listing (entry {i // 4 + 1})")
        top, sep, _rest = path.partition(b"/")
        a = acc.setdefault(top, ["", 0, 0, -1.0, "0"])
        if not sep:
            a[0] = kind.decode("ascii", "replace")
        a[1] += 1
        if kind == b"f":
            a[2] += int(size)
        value = float(mtime)
        if value > a[3]:
            a[3], a[4] = value, mtime.decode("ascii")
    return [RemoteItem(raw=name, kind=a[0], entries=a[1], bytes=a[2], mtime=a[3],
                       mtime_text=a[4]) for name, a in sorted(acc.items())]


def refuse_name(raw: bytes) -> str | None:
    """Why a remote name is never fetched, or None if it is safe to use as a file name."""
    if not raw:
        return "empty name"
    if len(raw) > MAX_NAME_BYTES:
        return f"name longer than {MAX_NAME_BYTES} bytes"
    if b"/" in raw or b"\0" in raw:
        return "name holds '/' or NUL"
    if raw.startswith(b"."):
        return "name starts with '.'"
    try:
        name = raw.decode("utf-8")
    except UnicodeDecodeError:
        return "name is not UTF-8"
    if not name.isprintable():
        return "name holds a control or unprintable character"
    return None


def item_path(folder: Path, raw: bytes) -> Path:
    """*folder*/NAME, proven to lie directly inside *folder* (the name was checked)."""
    if refuse_name(raw) is not None:
        raise ValueError(f"unsafe name {raw!r}")
    path = Path(os.path.normpath(os.path.join(folder, os.fsdecode(raw))))
    if path.parent != Path(os.path.normpath(folder)):
        raise ValueError(f"{raw!r} escapes {folder}")
    return path


# --------------------------------------------------------------------------- mapping


class Mapper:
    """[pull] map: ordered (regex, folder) rules; the first whose regex is found wins."""

    def __init__(self, rules: Sequence[tuple[str, str]], root: Path) -> None:
        self.root = root
        self.rules = [(re.compile(pattern), self._folder(dest)) for pattern, dest in rules]

    def _folder(self, dest: str) -> Path:
        return Path(os.path.normpath(dest if dest.startswith("/") else self.root / dest))

    def folder(self, name: str) -> Path | None:
        if not self.rules:
            return self.root
        for pattern, folder in self.rules:
            if pattern.search(name):
                return folder
        return None


# --------------------------------------------------------------------------- planning


@dataclass
class Planned:
    item: RemoteItem
    action: str
    folder: Path | None = None
    reason: str = ""
    reported: bool = False  # unmapped/refused: already in the ledger
    result: str | None = None  # after fetching: FETCHED, FAILED, ...
    moved_bytes: int = 0

    @property
    def target(self) -> Path | None:
        return item_path(self.folder, self.item.raw) if self.folder is not None else None

    def to_json(self) -> dict[str, Any]:
        obj: dict[str, Any] = {**json_path(self.item.name), "action": self.action}
        target = self.target if self.action in (FETCH, REFETCH, UP_TO_DATE) else None
        obj["destination"] = str(target) if target else None
        if self.reason:
            obj["reason"] = self.reason
        if self.action in (UNMAPPED_ITEM, REFUSED):
            obj["reported_before"] = self.reported
        if self.result:
            obj["result"] = self.result
            obj["bytes"] = self.moved_bytes
        obj["signature"] = self.item.signature
        return obj


def plan(stream: StreamConfig, items: Sequence[RemoteItem], ledger: dict[str, Entry],
         *, now: float | None = None) -> list[Planned]:
    cfg = stream.pull
    pattern = re.compile(cfg.item_pattern)
    mapper = Mapper(cfg.map, stream.directory)
    oldest = ((now if now is not None else time.time()) - cfg.max_age_days * 86400
              if cfg.max_age_days else None)
    out: list[Planned] = []
    for it in items:
        name = it.name
        entry = ledger.get(name)
        reported = entry is not None and entry.state == UNMAPPED
        if not pattern.search(name):
            out.append(Planned(it, IGNORED, reason="does not match item_pattern"))
            continue
        refused = refuse_name(it.raw)
        if refused is None and it.kind not in ("d", "f"):
            refused = ("a symbolic link" if it.kind == "l" else
                       f"not a directory or regular file (type {it.kind or '?'})")
        if refused:
            out.append(Planned(it, REFUSED, reason=refused, reported=reported))
            continue
        if oldest is not None and it.mtime < oldest:
            out.append(Planned(it, TOO_OLD, reason=f"unchanged for more than"
                               f" {cfg.max_age_days} days"))
            continue
        done = entry is not None and entry.state == DONE
        folder = mapper.folder(name)
        if done and entry is not None and (entry.signature is None
                                           or entry.signature == it.signature):
            out.append(Planned(it, UP_TO_DATE, folder=folder,
                               reason="marked done for good" if entry.signature is None
                               else ""))
            continue
        if folder is None:
            out.append(Planned(it, UNMAPPED_ITEM, reason="no [pull] map rule matches",
                               reported=reported))
            continue
        if done and entry is not None:
            out.append(Planned(it, REFETCH, folder=folder,
                               reason=f"changed since it was done ({entry.signature} ->"
                                      f" {it.signature})"))
        else:
            out.append(Planned(it, FETCH, folder=folder))
    return out


# --------------------------------------------------------------------------- item locks


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


# --------------------------------------------------------------------------- rsync


@dataclass
class RsyncRun:
    code: int
    changes: int = 0  # itemized lines (verify) or files sent (transfer)
    bytes: int = 0
    error: str = ""
    stopped: bool = False


@dataclass
class CycleReport:
    stream: str
    execute: bool
    source: str
    items: list[Planned] = field(default_factory=list)
    reported: list[str] = field(default_factory=list)  # unmapped items reported this cycle
    started: float = field(default_factory=time.time)
    stopped: bool = False
    paused: str | None = None  # why nothing (more) was fetched: the stop file's reason

    def count(self, action: str) -> int:
        return sum(1 for p in self.items if p.action == action)

    def results(self, result: str) -> list[Planned]:
        return [p for p in self.items if p.result == result]

    def to_json(self) -> str:
        return json.dumps({
            "stream": self.stream,
            "direction": "pull",
            "execute": self.execute,
            "source": self.source,
            "counts": {a: self.count(a) for a in ACTIONS},
            "fetched": len(self.results(FETCHED)),
            "failed": len(self.results(FAILED)),
            "changing": len(self.results(CHANGING)),
            "busy": len(self.results(BUSY)),
            "bytes": sum(p.moved_bytes for p in self.items),
            "reported_unmapped": len(self.reported),
            "stopped": self.stopped,
            "paused": self.paused,
            "seconds": round(time.time() - self.started, 3),
            "items": [p.to_json() for p in self.items],
        }, ensure_ascii=False)


class Puller:
    """One pull stream: cycles of list, plan, report, fetch, verify, record."""

    def __init__(self, stream: StreamConfig, *, execute: bool,
                 notifier: Notifier | None = None, conn: SshConnection | None = None) -> None:
        if stream.direction != "pull":
            raise ValueError(f"stream {stream.name} is not a pull stream")
        self.stream = stream
        self.cfg = stream.pull
        self.out = stream.outgoing
        self.execute = execute
        self.notifier = notifier or Notifier()
        rs = stream.rsync_ssh
        self.conn = conn or SshConnection(
            SshTarget(host=self.out.target_host, port=self.out.target_port, user=rs.username,
                      identity_file=rs.identity_file, known_hosts=rs.known_hosts,
                      connect_timeout=self.out.connect_timeout, ssh_cmd=rs.ssh_cmd),
            runtime_dir=stream.runtime_dir)
        ledger_path = self.cfg.ledger or stream.spool_dir / "ledger.jsonl"
        self.ledger = Ledger(ledger_path)
        self.lock_dir = ledger_path.with_name(ledger_path.name + ".locks")
        self.peer = (f"{rs.username + '@' if rs.username else ''}"
                     f"{self.out.target_host}:{self.out.target_port}")
        self.source = f"{self.peer}:{self.cfg.source_dir}"
        self.stop_event = threading.Event()
        self._procs: set[subprocess.Popen[bytes]] = set()
        self._procs_lock = threading.Lock()
        self._last_error: str | None = None
        self._paused_reason: str | None = None
        self._paused_lock = threading.Lock()

    # -- control --------------------------------------------------------------
    def stop(self) -> None:
        self.stop_event.set()
        with self._procs_lock:
            for proc in self._procs:
                with contextlib.suppress(OSError):
                    proc.terminate()  # rsync keeps what it has in its partial dir

    def close(self) -> None:
        self.conn.close()

    def tick(self) -> None:
        self.notifier.watchdog()

    # -- one cycle ------------------------------------------------------------
    def list_remote(self) -> list[RemoteItem]:
        self.conn.open()
        timeout = max(600.0, 10 * self.out.stall_seconds)
        # a big tree takes a while to list: the watchdog is fed meanwhile
        with ThreadPoolExecutor(max_workers=1, thread_name_prefix="list") as pool:
            future = pool.submit(self.conn.run, listing_argv(self.cfg.source_dir),
                                 timeout=timeout)
            while not wait([future], timeout=1.0).done:
                self.tick()
            r = future.result()
        err = r.stderr.decode("utf-8", "replace").strip()
        if r.returncode != 0:
            if not r.stdout:
                raise ListingError(f"cannot list {self.cfg.source_dir} on "
                                   f"{self.out.target_host}: {_last_line(err) or 'find failed'}")
            # some entries could not be read: their items will fail to fetch, say why once
            log.warning("%s: listing %s was incomplete: %s", self.stream.name,
                        self.cfg.source_dir, _last_line(err),
                        extra=fields(stream=self.stream.name, peer=self.peer))
        return parse_listing(r.stdout)

    def cycle(self) -> CycleReport:
        """List, plan, report what maps nowhere, fetch; with execute False only plan."""
        report = CycleReport(self.stream.name, self.execute, self.source)
        entries = self.ledger.read()  # a person's edits count from this cycle on
        items = self.list_remote()
        report.items = plan(self.stream, items, entries)
        if not self.execute:
            return report
        self._report_unmapped(report)
        todo = [p for p in report.items if p.action in (FETCH, REFETCH)]
        if not self.paused() and todo:
            self._fetch_all(todo, report)
        report.stopped = self.stop_event.is_set()
        report.paused = self._paused_reason
        return report

    def paused(self) -> str | None:
        """The reason no fetch may start now: the stop file in the stream's directory (an
        operator's, or mstm-diskwatch's when the local disk runs low), said once."""
        reason = is_paused(self.stream)
        with self._paused_lock:  # asked by the fetching threads too: said once
            say_pause_change(log, self.stream.name, self._paused_reason, reason)
            self._paused_reason = reason
            return reason

    def _report_unmapped(self, report: CycleReport) -> None:
        fresh = [p for p in report.items
                 if p.action in (UNMAPPED_ITEM, REFUSED) and not p.reported]
        if not fresh:
            return

        def change(current: dict[str, Entry]) -> list[Entry]:
            new: list[Entry] = []
            for p in fresh:
                name = p.item.name
                if name in current and current[name].state == UNMAPPED:
                    continue  # another worker reported it meanwhile
                # logged before it is recorded: a crash in between reports it again,
                # rather than never
                log.warning("%s: %s is not fetched: %s", self.stream.name, show(name),
                            p.reason,
                            extra=event("unmapped", stream=self.stream.name, item=name,
                                        reason=p.reason, peer=self.peer))
                report.reported.append(name)
                new.append(Entry(item=name, state=UNMAPPED, reason=p.reason, at=now_iso()))
            return new

        self.ledger.update(change)

    def _fetch_all(self, todo: list[Planned], report: CycleReport) -> None:
        total = len(todo)
        self.notifier.status(f"fetching {total} item(s)")
        with ThreadPoolExecutor(max_workers=self.cfg.max_tasks,
                                thread_name_prefix="pull") as pool:
            futures: dict[Future[None], Planned] = {pool.submit(self._fetch_one, p): p
                                                    for p in todo}
            pending = set(futures)
            while pending:
                done, pending = wait(pending, timeout=1.0, return_when=FIRST_COMPLETED)
                for f in done:
                    exc = f.exception()
                    if exc is not None:
                        p = futures[f]
                        p.result, p.reason = FAILED, f"internal error: {exc}"
                        log.error("%s: fetching %s failed: %s", self.stream.name,
                                  show(p.item.name), exc, exc_info=exc,
                                  extra=fields(stream=self.stream.name, item=p.item.name))
                self.tick()
                finished = total - len(pending)
                self.notifier.status(f"fetching: {finished} of {total} item(s) handled")

    def _make_folder(self, folder: Path) -> None:
        """Create a mapped folder.  One inside the stream directory is created through
        :mod:`mstm.safefs`: a link planted on the way (folder -> /etc) is refused, never
        followed, so nothing is written outside the stream directory.  A folder the
        admin mapped elsewhere (an absolute path) is created as configured."""
        root = Path(os.path.normpath(self.stream.directory))
        try:
            rel = folder.relative_to(root)
        except ValueError:
            folder.mkdir(parents=True, exist_ok=True)
            return
        with safefs.opened_root(root) as root_fd:
            safefs.makedirs_beneath(root_fd, rel.as_posix())

    def _fetch_one(self, p: Planned) -> None:
        name = p.item.name
        if self.stop_event.is_set():
            p.result = STOPPED
            return
        if self.paused():  # fetches already running finish; no new one starts
            p.result, p.reason = STOPPED, self._paused_reason or "paused"
            return
        lock = ItemLock(self.lock_dir, p.item.raw)
        if not lock.acquire():
            p.result, p.reason = BUSY, "being fetched by another worker"
            log.info("%s: %s is being fetched by another worker; skipped", self.stream.name,
                     show(name), extra=fields(stream=self.stream.name, item=name))
            return
        try:
            entry = self.ledger.read().get(name)
            if entry is not None and entry.state == DONE and (
                    entry.signature is None or entry.signature == p.item.signature):
                p.result = ALREADY_DONE
                return
            target = p.target
            assert target is not None and p.folder is not None
            try:
                self._make_folder(p.folder)
            except OSError as err:
                p.result = FAILED
                p.reason = f"cannot use the folder {p.folder}: {err.strerror or err}"
                log.warning("%s: %s: %s", self.stream.name, show(name), p.reason,
                            extra=fields(stream=self.stream.name, item=name, reason=p.reason))
                return
            log.debug("%s: fetching %s into %s", self.stream.name, show(name), p.folder)
            problem = "still differs after a transfer with --checksum (changing at the source?)"
            changing = True  # expected while the source is still being written: not a warning
            for checksum in (False, True):
                run = self._rsync(p, verify=False, checksum=checksum)
                p.moved_bytes += run.bytes
                if run.stopped or self.stop_event.is_set():
                    p.result, p.reason = STOPPED, self._paused_reason or "stopped"
                    return
                if run.code:
                    problem, changing = run.error, run.code == RSYNC_VANISHED
                    break
                check = self._rsync(p, verify=True, checksum=True)
                if check.stopped or self.stop_event.is_set():
                    p.result = STOPPED
                    return
                if check.code:
                    problem = f"verification: {check.error}"
                    changing = check.code == RSYNC_VANISHED
                    break
                if check.changes == 0:
                    self.ledger.set(Entry(item=name, state=DONE, signature=p.item.signature,
                                          at=now_iso(), destination=str(target)))
                    p.result = FETCHED
                    log.info("%s: fetched %s into %s (%d entries, %d bytes; verified by"
                             " checksum)", self.stream.name, show(name), show(p.folder),
                             p.item.entries, p.item.bytes,
                             extra=fields(stream=self.stream.name, item=name,
                                          bytes=p.item.bytes, peer=self.peer,
                                          result=FETCHED))
                    return
                log.info("%s: %s: %d difference(s) left after the transfer; transferring"
                         " again comparing checksums", self.stream.name, show(name),
                         check.changes, extra=fields(stream=self.stream.name, item=name))
            p.result, p.reason = (CHANGING if changing else FAILED), problem
            log.log(logging.INFO if changing else logging.WARNING,
                    "%s: fetching %s failed, will try again next cycle: %s",
                    self.stream.name, show(name), problem,
                    extra=fields(stream=self.stream.name, item=name, reason=problem,
                                 peer=self.peer, result=p.result))
        finally:
            lock.release()

    def rsync_argv(self, folder: Path, *, verify: bool, checksum: bool) -> list[str]:
        argv = [
            self.stream.rsync_ssh.cmd,
            # setuid, setgid and sticky bits never survive; no devices or FIFOs (no -D)
            "--recursive", "--links", "--perms", "--times", "--chmod=u+rwX,ug-s,o-t",
            "--from0", "--files-from=-",
            "--secluded-args",
            f"--partial-dir={PARTIAL}",
            f"--timeout={max(1, int(self.out.stall_seconds))}",
            "--rsh", self.conn.rsync_rsh(),
        ]
        if verify:
            argv += ["--dry-run", "--checksum", f"--out-format={_VERIFY.decode()}%i"]
        else:
            argv.append(f"--out-format={_XFER.decode()}%i %l")
            if checksum:
                argv.append("--checksum")
            if self.out.bwlimit:
                argv.append(f"--bwlimit={self.out.bwlimit}")
        host = self.out.target_host
        if ":" in host:
            host = f"[{host}]"
        argv += ["--", f"{host}:{self.cfg.source_dir.rstrip('/')}/", f"{folder}/"]
        return argv

    def _rsync(self, p: Planned, *, verify: bool, checksum: bool) -> RsyncRun:
        assert p.folder is not None
        argv = self.rsync_argv(p.folder, verify=verify, checksum=checksum)
        # its own process group: a stalled run is cut with every process it started
        proc = spawn(argv, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                     start_new_session=True)
        with self._procs_lock:
            self._procs.add(proc)
        if self.stop_event.is_set():
            proc.terminate()
        result = RsyncRun(code=0)
        err_tail: list[bytes] = []

        def feed() -> None:
            assert proc.stdin is not None
            with contextlib.suppress(OSError):
                proc.stdin.write(p.item.raw + b"\0")
            with contextlib.suppress(OSError):
                proc.stdin.close()

        def read_out() -> None:
            assert proc.stdout is not None
            for line in proc.stdout:
                if verify and line.startswith(_VERIFY):
                    result.changes += 1
                elif line.startswith(_XFER):
                    flags, _, length = line[len(_XFER):].strip().partition(b" ")
                    if flags[:2] == b">f" and length.isdigit():
                        result.changes += 1
                        result.bytes += int(length)

        def read_err() -> None:
            assert proc.stderr is not None
            for line in proc.stderr:
                err_tail.append(line)
                del err_tail[:-20]

        threads = [threading.Thread(target=f, daemon=True) for f in (feed, read_out, read_err)]
        for t in threads:
            t.start()
        stall = max(1.0, self.out.stall_seconds)
        if checksum:  # the remote side may read a whole file before it says a word
            stall += p.item.bytes / CHECKSUM_RATE
        stalled = True  # until it ended by itself
        try:
            stalled = self._wait(proc, stall)
        finally:
            # after a cut, the ssh master may hold our stderr pipe (ControlMaster passes
            # the client's descriptors to it) until the hung session ends: do not wait
            for t in threads:
                t.join(timeout=0.5 if stalled else 5)
            with self._procs_lock:
                self._procs.discard(proc)
        result.code = proc.returncode
        result.stopped = (self.stop_event.is_set() or self._paused_reason is not None) \
            and proc.returncode != 0
        if stalled:
            result.code = result.code or 30
            result.error = f"rsync made no progress for {stall:.0f} s (stall_seconds); cut"
        elif result.code:
            text = b"".join(err_tail).decode("utf-8", "replace").strip()
            lines = [ln for ln in text.splitlines() if ln.strip()]
            meaningful = [ln for ln in lines if not ln.startswith("rsync error:")] or lines
            result.error = f"rsync exit {result.code}: {meaningful[-1] if meaningful else ''}"
        return result

    def _wait(self, proc: subprocess.Popen[bytes], stall: float) -> bool:
        """Wait for an rsync run; True if it was cut for making no progress.

        rsync's own --timeout counts its keep-alive messages as traffic, so a peer that
        hangs while its connection stays up (a stopped process, a hung file system) could
        hold the task slot for ever.  Here progress is what rsync's processes read: with
        nothing read for *stall* seconds the whole process group is killed.
        """
        last_read, last_change = -1, time.monotonic()
        next_pause_check = time.monotonic() + _PAUSE_CHECK
        while True:
            try:
                proc.wait(timeout=0.5)
                return False
            except subprocess.TimeoutExpired:
                pass
            self.tick()
            if time.monotonic() >= next_pause_check:
                next_pause_check = time.monotonic() + _PAUSE_CHECK
                if self.paused():  # the local disk runs low (mstm-diskwatch): stop now
                    with contextlib.suppress(OSError):
                        proc.terminate()  # rsync keeps what it has in its partial dir
                    proc.wait()
                    return False
            read = _read_chars(proc.pid, skip=os.path.basename(self.stream.rsync_ssh.ssh_cmd))
            now = time.monotonic()
            if read != last_read:
                last_read, last_change = read, now
            elif now - last_change >= stall:
                log.debug("rsync %d: nothing read for %g s; killing it", proc.pid, stall)
                with contextlib.suppress(OSError):
                    os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()
                return True

    # -- running ------------------------------------------------------------------
    def follow(self) -> None:
        """Cycle every poll_interval until stopped; failures wait for the next cycle."""
        self.notifier.ready(f"pulling from {self.source}")
        log.info("%s: pulling %s -> %s every %g s (%d at once)", self.stream.name,
                 self.source, show(self.stream.directory), self.stream.poll_interval,
                 self.cfg.max_tasks, extra=fields(stream=self.stream.name, peer=self.peer))
        try:
            while not self.stop_event.is_set():
                status = self._follow_cycle()
                self.notifier.status(status)
                self._sleep(self.stream.poll_interval)
        finally:
            self.notifier.stopping()
            self.close()

    def _follow_cycle(self) -> str:
        try:
            report = self.cycle()
        except (TargetUnavailable, LedgerError) as err:
            if err.message != self._last_error:  # said once, not every cycle
                self._last_error = err.message
                if isinstance(err, TargetUnavailable):
                    log.warning("%s: %s; trying again in %g s", self.stream.name,
                                err.message, self.stream.poll_interval,
                                extra=event("target_unreachable", stream=self.stream.name,
                                            peer=self.peer, reason=err.message))
                else:
                    log.error("%s: %s", self.stream.name, err.message,
                              extra=fields(stream=self.stream.name, reason=err.message))
            return f"waiting: {err.message}"
        finally:
            # a new connection each cycle: sessions a cut rsync left hanging at the remote
            # end go with the old one
            self.conn.close()
        if self._last_error is not None:
            log.info("%s: working again (%s)", self.stream.name, self.peer,
                     extra=event("resumed", stream=self.stream.name, peer=self.peer))
            self._last_error = None
        log_summary(report)
        if report.paused:
            return f"paused: {report.paused}"
        return (f"idle, last cycle {time.strftime('%H:%M:%S')}: "
                f"{len(report.results(FETCHED))} fetched, {len(report.results(FAILED))} failed")

    def _sleep(self, seconds: float) -> None:
        end = time.monotonic() + seconds
        while not self.stop_event.is_set():
            left = end - time.monotonic()
            if left <= 0:
                return
            self.tick()
            self.stop_event.wait(min(left, self.notifier.max_sleep or left, 5.0))


# --------------------------------------------------------------------------- output


def log_summary(report: CycleReport) -> None:
    failed = report.results(FAILED)
    log.info("%s: %d fetched, %d failed, %d still changing, %d busy elsewhere, %d up to"
             " date, %d unmapped, %d refused, %d too old%s", report.stream,
             len(report.results(FETCHED)), len(failed), len(report.results(CHANGING)),
             len(report.results(BUSY)), report.count(UP_TO_DATE),
             report.count(UNMAPPED_ITEM), report.count(REFUSED), report.count(TOO_OLD),
             "; stopped before the end" if report.stopped
             else f"; paused: {report.paused}" if report.paused else "",
             extra=fields(stream=report.stream))


def render_plan(report: CycleReport) -> str:
    """What a dry run prints: each item that would be acted on, then the counts."""
    lines = [f"{report.stream}: pull from {report.source} (dry run: nothing is changed;"
             " --execute fetches)"]
    for p in report.items:
        if p.action in (FETCH, REFETCH):
            lines.append(f"  {p.action:<9} {show(p.item.name)} -> {show(p.target)}"
                         + (f"  ({p.reason})" if p.reason else ""))
        elif p.action in (UNMAPPED_ITEM, REFUSED):
            seen = ", reported before" if p.reported else ""
            lines.append(f"  {p.action:<9} {show(p.item.name)}  ({p.reason}{seen})")
    counts = ", ".join(f"{report.count(a)} {a.replace('_', ' ')}" for a in ACTIONS)
    lines.append(f"{len(report.items)} item(s): {counts}")
    return "\n".join(lines)


def run_command(stream: StreamConfig, *, follow: bool, execute: bool | None, as_json: bool,
                show_status: bool, notifier: Notifier | None = None,
                install_signals: Callable[[Callable[[], None]], None] | None = None,
                echo: Callable[[str], None] = click.echo) -> int:
    """mstm-send for a pull stream; returns the exit status."""
    if show_status:
        entries = Ledger(stream.pull.ledger or stream.spool_dir / "ledger.jsonl").read()
        echo(json.dumps({"stream": stream.name, "direction": "pull", "status": stream.status,
                         "ledger": str(stream.pull.ledger),
                         "done": sum(1 for e in entries.values() if e.state == DONE),
                         "unmapped": sum(1 for e in entries.values()
                                         if e.state == UNMAPPED)}))
        return EXIT_OK
    if not stream.running:
        log.info("%s: status is %s in %s; nothing to do", stream.name, stream.status,
                 stream.stream_file)
        return EXIT_OK
    if follow and execute is False:
        die("--follow always fetches; --dry-run goes with --once", code=EXIT_USAGE)
    # like mxsync, the command line only shows what it would do unless told --execute;
    # --follow and runs under systemd (the timer's mstm-send-once@) act
    acting = execute if execute is not None else (follow or under_journal())
    puller = Puller(stream, execute=acting, notifier=notifier)
    if install_signals:
        install_signals(puller.stop)
    if follow:
        puller.follow()
        return EXIT_OK
    try:
        report = puller.cycle()
    finally:
        puller.close()
    if as_json:
        echo(report.to_json())
    elif not acting:
        echo(render_plan(report))
    if acting:
        log_summary(report)
    if report.results(FAILED):
        return EXIT_ITEMS_FAILED
    return EXIT_OK


def _read_chars(pid: int, *, skip: str) -> int:
    """Bytes read so far by a process and its descendants, except those named *skip*
    (ssh reads what rsync writes to it, keep-alives included, so it proves nothing)."""
    total = 0
    try:
        root = psutil.Process(pid)
        procs = [root, *root.children(recursive=True)]
    except psutil.Error:
        return total
    for p in procs:
        try:
            if p.name() != skip:
                total += p.io_counters().read_chars
        except (psutil.Error, AttributeError):
            continue
    return total


def _last_line(text: str) -> str:
    lines = [ln.strip() for ln in text.strip().splitlines() if ln.strip()]
    return lines[-1] if lines else ""
