"""The Puller: one pull stream's cycles (list, plan, report, fetch, verify, record) and
the loop that repeats them every poll_interval.

Each item is fetched by :func:`mstm.transports.rsync.run_rsync` over the stream's ssh
connection, under its :class:`~mstm.pull.locks.ItemLock`, then verified by a checksum
dry run and written to the ledger.  Every run is stall-watched (see the package's
docstring); a run stops when the Puller is stopped or the stream is paused (its stop
file, looked at every _PAUSE_CHECK seconds while rsync runs).
"""

from __future__ import annotations

import logging
import os
import threading
import time
from collections.abc import Callable
from concurrent.futures import FIRST_COMPLETED, Future, ThreadPoolExecutor, wait
from pathlib import Path

from mstm import safefs
from mstm.config import StreamConfig
from mstm.errors import TargetUnavailable
from mstm.log import event, fields, show
from mstm.notify import Notifier
from mstm.pause import is_paused, say_pause_change
from mstm.pull.ledger import DONE, UNMAPPED, Entry, Ledger, LedgerError, now_iso
from mstm.pull.listing import ListingError, RemoteItem, listing_argv, parse_listing
from mstm.pull.locks import ItemLock
from mstm.pull.planning import (
    ALREADY_DONE,
    BUSY,
    CHANGING,
    FAILED,
    FETCH,
    FETCHED,
    REFETCH,
    REFUSED,
    STOPPED,
    UNMAPPED_ITEM,
    Planned,
    plan,
)
from mstm.pull.report import CycleReport, log_summary
from mstm.runloop import RunLoop
from mstm.send.report import TtyProgress
from mstm.transports.base import Item, Progress, ShouldStop
from mstm.transports.rsync import RsyncRun, run_rsync, ssh_path, transfer_argv
from mstm.transports.ssh import SshConnection, SshTarget

log = logging.getLogger("mstm.pull")

PARTIAL = ".mstm-partial"
# A checksum pass may be silent while the remote host reads: it gets stall_seconds plus
# one second for every this many bytes of the item.
CHECKSUM_RATE = 50 << 20
RSYNC_VANISHED = 24  # "some files vanished before they could be transferred"
_PAUSE_CHECK = 2.0  # seconds between looks at the stop file while an rsync runs


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
        self.loop = RunLoop(notifier)
        self.notifier = self.loop.notifier
        rs = stream.rsync_ssh
        self.conn = conn or SshConnection(
            SshTarget(host=self.out.target_host, port=self.out.target_port, user=rs.username,
                      identity_file=rs.identity_file, known_hosts=rs.known_hosts,
                      connect_timeout=self.out.connect_timeout, ssh_cmd=rs.ssh_cmd,
                      config_file=rs.ssh_config),
            runtime_dir=stream.runtime_dir)
        ledger_path = self.cfg.ledger or stream.spool_dir / "ledger.jsonl"
        self.ledger = Ledger(ledger_path)
        self.lock_dir = ledger_path.with_name(ledger_path.name + ".locks")
        # user@host[:port]: no port when none is written (the ssh configuration decides)
        self.peer = f"{rs.username + '@' if rs.username else ''}{self.conn.target.where}"
        self.source = f"{self.peer}:{self.cfg.source_dir}"
        self._last_error: str | None = None
        self._paused_reason: str | None = None
        self._paused_lock = threading.Lock()
        # called after each cycle of follow() with the error that ended it, if any (the
        # command line sets it: the metrics file, mstm.overview.live)
        self.on_cycle: Callable[[str | None], None] | None = None
        # the progress line of a --once on a terminal (the command line sets it): the
        # bytes of the fetches running side by side, summed
        self.progress: TtyProgress | None = None
        self._moved: dict[int, tuple[int, int]] = {}  # id(Planned) -> (files, bytes) so far
        self._moved_total = (0, 0)
        self._moved_lock = threading.Lock()

    # -- control --------------------------------------------------------------
    def stop(self) -> None:
        """End after the current step; running rsyncs are terminated (they keep what
        they have in their partial directory)."""
        self.loop.stop()

    def close(self) -> None:
        self.conn.close()

    def tick(self) -> None:
        self.loop.tick()

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
        report.stopped = self.loop.stopping
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
                # mstm-alert --stdin reads this form back (mstm.alert.events): keep it
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
        if self.progress:
            self.progress.batch_start([Item(p.item.name, p.item.bytes, True) for p in todo])
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
        if self.loop.stopping:
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
                p.moved_bytes += run.file_bytes
                if run.stopped or self.loop.stopping:
                    p.result, p.reason = STOPPED, self._paused_reason or "stopped"
                    return
                if run.exit_code:
                    problem, changing = run.error, run.exit_code == RSYNC_VANISHED
                    break
                check = self._rsync(p, verify=True, checksum=True)
                if check.stopped or self.loop.stopping:
                    p.result = STOPPED
                    return
                if check.exit_code:
                    problem = f"verification: {check.error}"
                    changing = check.exit_code == RSYNC_VANISHED
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

    # -- rsync ----------------------------------------------------------------
    def rsync_argv(self, folder: Path, *, verify: bool, checksum: bool) -> list[str]:
        """A fetch of the item named on stdin into *folder*; with *verify* a dry run
        comparing checksums that prints each difference left."""
        return transfer_argv(
            self.stream.rsync_ssh.cmd,
            ssh_path(self.out.target_host, self.cfg.source_dir.rstrip("/")), str(folder),
            rsh=self.conn.rsync_rsh(), stall_seconds=self.out.stall_seconds,
            # setuid, setgid and sticky bits never survive; the owner may always write
            chmod="u+rwX,ug-s,o-t", partial_dir=PARTIAL,
            dry_run=verify, checksum=verify or checksum,
            bwlimit=0 if verify else self.out.bwlimit)

    def _rsync(self, p: Planned, *, verify: bool, checksum: bool) -> RsyncRun:
        """One rsync run for *p*, cut if it reads nothing for stall_seconds (a checksum
        pass: plus a second per CHECKSUM_RATE bytes of the item)."""
        assert p.folder is not None
        stall = max(1.0, self.out.stall_seconds)
        if checksum:  # the remote side may read a whole file before it says a word
            stall += p.item.bytes / CHECKSUM_RATE
        run = run_rsync(self.rsync_argv(p.folder, verify=verify, checksum=checksum),
                        p.item.raw + b"\0", should_stop=self._should_stop(), tick=self.tick,
                        progress=self._progress_of(p) if self.progress and not verify
                        else None,
                        stall=stall,
                        stall_ignores=os.path.basename(self.stream.rsync_ssh.ssh_cmd))
        if run.stalled:
            log.debug("rsync %d: nothing read for %g s; killing it", run.pid, stall)
        # a run that failed while the stream is stopping or paused (another worker may
        # have seen the stop file first) counts as stopped, not failed
        if run.exit_code and (self.loop.stopping or self._paused_reason is not None):
            run.stopped = True
        return run

    def _progress_of(self, p: Planned) -> Progress:
        """The progress callback of one rsync run fetching *p*: its files and bytes added
        to those of the other fetches (and of *p*'s earlier runs), for the terminal."""
        key = id(p)

        def report(files: int, nbytes: int, current: str | None = None, /) -> None:
            with self._moved_lock:
                before = self._moved.get(key, (0, 0))
                now = (files, nbytes)
                self._moved[key] = now
                self._moved_total = (self._moved_total[0] + now[0] - before[0],
                                     self._moved_total[1] + now[1] - before[1])
                total = self._moved_total
            if self.progress:
                self.progress.batch_progress(*total, current)

        with self._moved_lock:  # a second run of p (by checksum) counts on from the first
            self._moved[key] = (0, 0)
        return report

    def _should_stop(self) -> ShouldStop:
        """For one rsync run: whether to stop it now, because the Puller is stopping or
        the stream is paused (the local disk runs low: mstm-diskwatch), looked at every
        _PAUSE_CHECK seconds."""
        next_look = time.monotonic() + _PAUSE_CHECK

        def should_stop() -> bool:
            nonlocal next_look
            if self.loop.stopping:
                return True
            if time.monotonic() < next_look:
                return False
            next_look = time.monotonic() + _PAUSE_CHECK
            return self.paused() is not None

        return should_stop

    # -- running ------------------------------------------------------------------
    def follow(self) -> None:
        """Cycle every poll_interval until stopped; failures wait for the next cycle."""
        self.notifier.ready(f"pulling from {self.source}")
        log.info("%s: pulling %s -> %s every %g s (%d at once)", self.stream.name,
                 self.source, show(self.stream.directory), self.stream.poll_interval,
                 self.cfg.max_tasks, extra=fields(stream=self.stream.name, peer=self.peer))
        try:
            while not self.loop.stopping:
                status = self._follow_cycle()
                self.notifier.status(status)
                if self.on_cycle:
                    self.on_cycle(self._last_error)
                self.loop.sleep(self.stream.poll_interval)
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


def _last_line(text: str) -> str:
    lines = [ln.strip() for ln in text.strip().splitlines() if ln.strip()]
    return lines[-1] if lines else ""
