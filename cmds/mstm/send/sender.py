"""The delivery loop of one stream: scan, claim a batch, transfer, verify, commit.

The order of a delivery, and why nothing is lost at any instant:

1. the batch is claimed in the spool (rename new/ -> claimed/);
2. each source is re-checked against the version that was scanned;
3. the transport sends the whole batch in one run while a thread pool computes each
   source's sha256 (stat before and after: a file that changed while being hashed is
   not trusted);
4. the target reports size and sha256 of each file under its final name;
5. in move mode, for an exact match only, the source is unlinked if it still is the
   verified version; then the batch's exact matches are committed (rename claimed/ ->
   done/).  A crash between the unlink and the commit leaves a claim whose source is
   gone: taken over, found vanished, dropped (the target holds the verified copy).  So
   a done record never stands for a deletion still to do, and a source found with a
   done record is a new file, sent again (see mstm.send.finish).

Connection failures release the batch untouched (no attempt counted) and back the
whole destination off; item failures (mismatch, missing) count an attempt and the item
is retried with backoff, then parked in failed/ with its reason, its source untouched.
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor

from mstm import humanize, pause, protocol, safefs
from mstm import scan as scanning
from mstm.backoff import DestinationBackoff
from mstm.config import StreamConfig
from mstm.errors import TargetUnavailable
from mstm.log import VERBOSE, event, fields, show, under_journal
from mstm.notify import Notifier
from mstm.runloop import RunLoop
from mstm.send import finish
from mstm.send.digests import LocalDigest, local_digest
from mstm.send.handshake import handshake, inspect_staged
from mstm.send.report import Summary, TtyProgress, json_path
from mstm.send.upkeep import Upkeep
from mstm.spool import Claim, ItemRecord, Spool, SpoolBusy
from mstm.transports.base import Item, Transport, staging_dir

log = logging.getLogger("mstm.send")

DEFAULT_MAX_WAIT = 300.0  # seconds a --once run may sleep in all (mstm-send --max-wait)


# -- the sender ----------------------------------------------------------------------
class Sender:
    """Delivers one stream's queue: claim a batch, send, verify, publish, finish, commit.

    Every decision about an item (retry, release, park, skip, delete, commit) is taken
    here; the transport only moves bytes and reports what the target holds.  Its unit
    tests run it against transports/memory.py (tests/unit/test_sender_decisions.py).
    """

    def __init__(self, stream: StreamConfig, *, spool: Spool, transport: Transport,
                 notifier: Notifier | None = None, progress: TtyProgress | None = None,
                 scan: bool = True) -> None:
        self.stream = stream
        self.out = stream.outgoing
        self.spool = spool
        self.transport = transport
        self.loop = RunLoop(notifier)
        self.notifier = self.loop.notifier
        self.progress = progress
        self.do_scan = scan
        self.summary = Summary(stream.name)
        self.backoff = DestinationBackoff(base=max(0.1, self.out.retry_backoff),
                                          maximum=max(0.1, self.out.retry_backoff_max))
        self.backoff.load_state(spool.load_state().get("backoff", {}))
        port = "" if self.out.target_port is None else f":{self.out.target_port}"
        # no port when none is written: the ssh configuration decides (Host entry's Port)
        self.peer = f"{self.out.transfer_protocol}://{self.out.target_host}{port}" \
                    f"{self.out.target_dir}"
        # one line per delivered item: in the journal always; on a terminal with -v
        # (VERBOSE), its source's deletion with -vv
        self.per_item_level = logging.INFO if under_journal() else VERBOSE
        self.deletion_level = logging.INFO if under_journal() else logging.DEBUG
        self._remote_stop: tuple[float, str | None] = (0.0, None)
        self._paused_reason: str | None = None
        self.last_delivery: float | None = None
        # called after each batch and on each wake-up; decides itself when to act (the
        # command line sets it: totals and metrics file, mstm.overview.live)
        self.on_progress: Callable[[], float | None] | None = None
        self.one_off = False  # run_once: a failure to connect ends the run
        self.upkeep = Upkeep(stream, spool)  # stuck items, pruning done/
        self.reached = False  # the target was reached (opened) in this process

    # -- control --------------------------------------------------------------
    def stop(self) -> None:
        """Finish the current step, then end (SIGTERM, SIGINT)."""
        self.loop.stop()

    def should_stop(self) -> bool:
        """Whether a transfer under way should end now: stop asked, or the lease lost."""
        return self.loop.stopping or self.spool.lease_lost()

    def tick(self) -> None:
        self.loop.tick()

    # -- scanning -------------------------------------------------------------
    def scan_into_spool(self) -> scanning.ScanReport | None:
        try:
            with self.spool.scan_lock():
                return scanning.scan_and_queue(self.stream, self.spool)
        except SpoolBusy:
            log.debug("another scanner holds %s; not scanning", self.spool.path)
            return None

    # -- pausing ----------------------------------------------------------------
    def paused(self) -> str | None:
        reason = pause.is_paused(self.stream)
        if reason is None:
            reason = self._remote_paused()
        pause.say_pause_change(log, self.stream.name, self._paused_reason, reason)
        self._paused_reason = reason
        return reason

    def _remote_paused(self) -> str | None:
        checked, reason = self._remote_stop
        now = time.monotonic()
        if checked and now - checked < self.out.stop_file_poll_interval:
            return reason
        if not self.transport.alive():
            return reason  # only asked over an open connection; never connect just for this
        try:
            reason = self.transport.stop_file_present()
        except TargetUnavailable:
            return reason
        self._remote_stop = (now, reason)
        return reason

    # -- delivering -------------------------------------------------------------
    def deliver_pending(self) -> None:
        """Deliver claimable items until none is left, the target fails, or we stop.

        A lost lease ends a batch (:meth:`should_stop`), not the loop: the next
        ``claim`` continues under a new owner identity."""
        while not self.loop.stopping:
            if self.backoff.remaining(time.time()) > 0:
                return
            if self.paused():
                self.summary.paused = self._paused_reason
                return
            claims = self.spool.claim(max_items=self.out.batch_max_items,
                                      max_bytes=self.out.batch_max_bytes)
            if not claims:
                return
            if not self.transport.alive():
                try:
                    self.transport.open()
                except TargetUnavailable as err:
                    self._target_failed(claims, err.message)
                    return
                self.reached = True
            # the target's stop file is asked over the open connection, before each batch
            if self.paused():
                self.summary.paused = self._paused_reason
                self._release(claims)
                return
            self._deliver(claims)

    def _release(self, claims: list[Claim]) -> None:
        for c in claims:
            self.spool.release(c)

    def _target_failed(self, claims: list[Claim], error: str) -> None:
        self._release(claims)
        self.transport.close()
        wait = self.backoff.failed(time.time(), error)
        self._save_backoff()
        self.summary.error = error
        then = ("this run ends; the next one tries again" if self.one_off and not self.reached
                else f"backing off {wait:.0f} s")
        log.warning("%s: target unreachable (%s); %s (step %d)",
                    self.stream.name, error, then, self.backoff.step,
                    extra=event("target_unreachable", stream=self.stream.name, peer=self.peer,
                                reason=error, attempt=self.backoff.step))
        self.notifier.status(self.status_line())  # "backing off ...; N queued"

    def _save_backoff(self) -> None:
        backoff = self.backoff.to_state()
        self.spool.update_state(lambda state: state.update(backoff=backoff))

    def _deliver(self, claims: list[Claim]) -> None:
        source = self.stream.directory
        live: list[Claim] = []
        try:
            root_fd = safefs.open_root(source)
        except OSError as err:
            self._release(claims)
            log.warning("%s: cannot open the stream directory: %s", self.stream.name,
                        err.strerror or err, extra=fields(stream=self.stream.name))
            return
        try:
            for c in claims:
                problem = self._recheck(root_fd, c.record)
                if problem:
                    self._skip(c, problem)
                else:
                    live.append(c)
        finally:
            os.close(root_fd)
        if not live:
            return
        self.notifier.status(f"sending {len(live)} item(s)")
        try:
            self.transport.open()
        except TargetUnavailable as err:
            self._target_failed(live, err.message)
            return
        self.reached = True
        if self.backoff.succeeded():
            log.info("%s: target %s reachable again", self.stream.name, self.peer,
                     extra=event("resumed", stream=self.stream.name, peer=self.peer))
            self._save_backoff()
        items = [Item(c.record.relpath, c.record.size, c.record.is_dir, force=c.record.attempts > 0)
                 for c in live]
        arrival_monitor = self.out.target_uses_arrival_monitor
        batch = protocol.new_batch_id()
        # with the arrival monitor the batch goes to the receiver's incoming area; else to
        # a staging directory at the target, published only once verified
        batch_dir = (f"{self.out.target_incoming_dir}/{batch}" if arrival_monitor
                     else staging_dir(self.out.target_dir, batch))
        with ThreadPoolExecutor(max_workers=2, thread_name_prefix="hash") as pool:
            futures: dict[str, Future[LocalDigest]] = {
                c.record.id: pool.submit(local_digest, source, c.record,
                                         follow_symlinks=self.stream.follow_symlinks)
                for c in live}
            if self.progress:
                self.progress.batch_start(items)
            result = self.transport.send(
                items, progress=self.progress.batch_progress if self.progress else None,
                should_stop=self.should_stop, tick=self.tick, dest=batch_dir)
            if self.progress:
                self.progress.batch_done()
            if result.stopped or self.should_stop():
                log.info("%s: batch abandoned for shutdown; %d item(s) stay queued",
                         self.stream.name, len(live))
                for f in futures.values():
                    f.cancel()
                self._release(live)
                if not arrival_monitor and self.transport.alive():
                    self._discard(batch)
                return
            if not self.transport.alive():
                self._target_failed(live, result.error or "connection lost during transfer")
                return
            digests: dict[str, LocalDigest | str] = {}
            for c in live:
                try:
                    digests[c.record.id] = futures[c.record.id].result()
                except OSError as err:
                    digests[c.record.id] = f"cannot read the source: {err.strerror or err}"
        try:
            if arrival_monitor:
                problems = handshake(self.transport, self.out, batch, live, digests,
                                     tick=self.tick, should_stop=self.should_stop)
            else:
                problems = inspect_staged(self.transport, batch, live, digests)
        except TargetUnavailable as err:
            self._target_failed(live, err.message)
            return
        verified: list[tuple[Claim, LocalDigest]] = []
        for c in live:
            problem = problems.get(c.record.id)
            if problem and result.error:
                problem = f"{problem} ({result.error})"
            digest = self._settle(c, digests[c.record.id], problem)
            if digest is not None:
                verified.append((c, digest))
        if not arrival_monitor:
            if verified and self.spool.lease_lost():
                # taken over (we looked dead): the new owner may have sent a newer version
                # by now, which a late publish of ours would overwrite
                log.warning("%s: lost the lease before publishing %d item(s); left to the "
                            "new owner", self.stream.name, len(verified),
                            extra=event("lease_taken_over", stream=self.stream.name))
                self._discard(batch)
                return
            verified = self._publish(batch, verified)
        self._commit(verified)
        self.spool.flush()  # the batch's records, durable in one go
        self.notifier.status(self.status_line())
        if self.on_progress:
            self.on_progress()

    def _recheck(self, root_fd: int, r: ItemRecord) -> str | None:
        """Why a claimed source is not to be sent now (it vanished, changed, or cannot be
        reached without following a link below the stream directory), or None."""
        follow = self.stream.follow_symlinks and not r.is_dir
        try:
            dir_fd, name = safefs.open_parent(root_fd, r.relpath)
            try:
                st = os.stat(name, dir_fd=dir_fd, follow_symlinks=follow)
                lst = os.stat(name, dir_fd=dir_fd, follow_symlinks=False) if follow else st
            finally:
                os.close(dir_fd)
        except FileNotFoundError:
            return "source vanished before it was sent"
        except (OSError, ValueError) as err:  # a link on the way, a loop, ...
            why = getattr(err, "strerror", None) or str(err)
            return (f"source cannot be read safely: {why}; it will be queued again if it "
                    f"becomes readable")
        if follow and not safefs.link_owner_ok(lst, st):
            return "now a symbolic link to a file of another owner"
        if not r.is_dir and (st.st_size, st.st_mtime_ns) != (r.size, r.mtime_ns):
            return "source changed since it was scanned; it will be queued again"
        return None

    def _publish(self, batch: str, verified: list[tuple[Claim, LocalDigest]]
                 ) -> list[tuple[Claim, LocalDigest]]:
        """Rename the verified items of *batch* from the staging directory into place;
        what could not be published is retried.  The rest of the staging directory
        (items that did not verify) is discarded."""
        # exactly what was verified is published: a directory item entry by entry (its
        # files, then its empty directories), never the staged tree as it is, which may
        # hold what came into the source after the hash walk
        members: list[tuple[Item, Claim]] = []
        for claim, digest in verified:
            r = claim.record
            if not r.is_dir:
                members.append((Item(r.relpath, r.size), claim))
                continue
            members += [(Item(rel, size), claim) for rel, (size, _) in digest.files.items()]
            members += [(Item(rel, 0, True), claim) for rel in digest.dirs]
        kept: list[tuple[Claim, LocalDigest]] = []
        try:
            errors = (self.transport.publish([i for i, _ in members], staged=batch)
                      if members else {})
        except TargetUnavailable as err:
            self._target_failed([c for c, _ in verified], err.message)
            return []
        failed: dict[str, str] = {}
        for item, claim in members:
            if item.relpath in errors:
                failed.setdefault(claim.record.id, errors[item.relpath])
        for claim, digest in verified:
            error = failed.get(claim.record.id)
            if error:
                self._retry(claim, f"verified, but cannot be put in place at the target: "
                                   f"{error}")
            else:
                kept.append((claim, digest))
        self._discard(batch)
        return kept

    def _discard(self, batch: str) -> None:
        """Remove what is left of *batch*'s staging directory at the target (best effort:
        a leftover is removed by the transport's next open() after a day)."""
        try:
            self.transport.discard(batch)
        except (OSError, TargetUnavailable) as err:
            log.debug("%s: cannot discard staging batch %s: %s", self.stream.name, batch, err)

    def _settle(self, claim: Claim, digest: LocalDigest | str, problem: str | None
                ) -> LocalDigest | None:
        """Retry or skip an item that did not verify; its digest if it is to be committed."""
        if isinstance(digest, str):
            self._retry(claim, digest)
            return None
        if digest.changed:
            self._skip(claim, digest.changed + "; it will be queued again")
            return None
        if problem:
            self._retry(claim, problem)
            return None
        return digest

    def _commit(self, verified: list[tuple[Claim, LocalDigest]]) -> None:
        """In move mode first delete the verified sources, then commit the batch
        (claimed/ -> done/) at once.

        Deleting before committing means a done record never stands for a deletion still
        to do: a crash in between leaves claims whose sources are gone (taken over, found
        vanished, dropped; the target holds the verified copies).  A source that cannot
        be deleted is not committed but retried, so it ends in failed/ with the reason
        instead of being sent again on every scan.
        """
        if self.out.transfer_mode == "move" and self.spool.lease_lost():
            # our claims were taken over (we looked dead): their new owner decides
            log.warning("%s: lost the lease on %d verified item(s) to another sender; "
                        "their sources are left to it", self.stream.name, len(verified),
                        extra=event("lease_taken_over", stream=self.stream.name))
            return
        if self.out.transfer_mode == "move":
            kept: list[tuple[Claim, LocalDigest]] = []
            proofs = [digest.verified() for _, digest in verified]
            busy = finish.writers_of(proofs)  # one look at /proc for the batch
            for (claim, digest), proof in zip(verified, proofs, strict=True):
                r = claim.record
                gone = finish.delete_source(self.stream, r.relpath, proof, r.is_dir,
                                            busy=busy, level=self.deletion_level)
                if gone.error:
                    self._retry(claim, f"delivered, but the source cannot be deleted: "
                                       f"{gone.error}")
                else:
                    kept.append((claim, digest))
            verified = kept
        committed = self.spool.complete_many([(c, d.sha256) for c, d in verified],
                                             durable=False)
        for (claim, digest), ok in zip(verified, committed, strict=True):
            r = claim.record
            if not ok:
                log.warning("%s: lost the lease on %s to another sender before its commit",
                            self.stream.name, show(r.relpath),
                            extra=event("lease_taken_over", stream=self.stream.name,
                                        item=r.relpath))
                continue
            self.last_delivery = time.time()
            self.summary.delivered.append({**json_path(r.relpath), "bytes": digest.size,
                                           "sha256": digest.sha256})
            self.summary.bytes += digest.size
            if log.isEnabledFor(self.per_item_level):
                log.log(self.per_item_level, "%s: delivered %s (%d bytes, sha256 %s)",
                        self.stream.name, show(r.relpath), digest.size, digest.sha256[:16],
                        extra=event("delivered", stream=self.stream.name, item=r.relpath,
                                    bytes=digest.size, peer=self.peer, sha256=digest.sha256))

    def _skip(self, claim: Claim, reason: str) -> None:
        self.spool.drop(claim, reason)
        self.summary.skipped.append({**json_path(claim.record.relpath), "reason": reason})
        log.info("%s: skipped %s: %s", self.stream.name, show(claim.record.relpath), reason,
                 extra=event("skipped", stream=self.stream.name, item=claim.record.relpath,
                             reason=reason))

    def _retry(self, claim: Claim, reason: str) -> None:
        attempt = claim.record.attempts + 1
        outcome = self.spool.retry(claim, reason, retry_count=self.out.retry_count,
                                   backoff=self.out.retry_backoff,
                                   backoff_max=self.out.retry_backoff_max)
        if outcome == "failed":
            self.summary.failed.append({**json_path(claim.record.relpath), "reason": reason,
                                        "attempts": attempt})
            log.error("%s: failed %s after %d attempt(s): %s; kept at the source",
                      self.stream.name, show(claim.record.relpath), attempt, reason,
                      extra=event("failed", stream=self.stream.name, item=claim.record.relpath,
                                  reason=reason, attempt=attempt, peer=self.peer))
        else:
            self.summary.retried += 1
            log.warning("%s: will retry %s (attempt %d of %d): %s", self.stream.name,
                        show(claim.record.relpath), attempt, max(1, self.out.retry_count),
                        reason,
                        extra=event("retried", stream=self.stream.name,
                                    item=claim.record.relpath, reason=reason, attempt=attempt))

    # -- status ---------------------------------------------------------------
    @property
    def paused_reason(self) -> str | None:
        """Why the stream is paused now (its own or the target's stop file), or None."""
        return self._paused_reason

    def status_line(self) -> str:
        """The unit's STATUS=: what it does, the queue (always), and what is stuck."""
        queued = self.spool.queued()  # a deep new/ or done/ is never listed per wake-up
        stuck = (f" ({self.upkeep.stuck} of them for more than "
                 f"{humanize.duration(self.stream.stuck_after)})" if self.upkeep.stuck else "")
        if self._paused_reason:
            return f"paused: {self._paused_reason}; {queued} queued{stuck}"
        if self.backoff.step:
            now = time.time()
            left = self.backoff.remaining(now)
            down = now - self.backoff.since if self.backoff.since else 0.0
            if down >= self.stream.stuck_after:
                return (f"stuck: target unreachable for {humanize.duration(down)} (since "
                        f"{humanize.clock(self.backoff.since)}): {self.backoff.last_error};"
                        f" {queued} queued{stuck}; next try in {left:.0f} s")
            return (f"backing off {left:.0f} s: {self.backoff.last_error}; {queued} queued"
                    f"{stuck}")
        last = humanize.clock(self.last_delivery) if self.last_delivery else "never"
        failed = self.spool.count("failed")
        extra = f", {failed} failed" if failed else ""
        return f"idle, {queued} queued{stuck}{extra}, last delivery {last}"

    def stuck_cause(self) -> str | None:
        """Why nothing moves, if the stream as a whole is held (for the stuck warning)."""
        if self._paused_reason:
            return f"the stream is paused: {self._paused_reason}"
        if self.backoff.step:
            return f"the target is unreachable: {self.backoff.last_error}"
        return None

    # -- the two ways of running ------------------------------------------------
    def next_due(self) -> float | None:
        """Seconds until the earliest queued item may be tried again, if any is waiting."""
        soonest = self.spool.earliest_due()  # from file times: a hint, cheap
        if soonest is None:
            return None
        now = time.time()
        if soonest > now:
            return soonest - now
        # The hint says due, yet nothing was claimable: the last claim read the records
        # that are not due yet and knows their not_before (never read the whole queue
        # here: with a million waiting that takes minutes, and a shutdown would wait).
        exact = self.spool.soonest_not_due()
        return None if exact is None else max(0.05, exact - now)

    def run_once(self, *, max_wait: float = DEFAULT_MAX_WAIT) -> Summary:
        """Scan, then deliver until nothing claimable remains, sleeping *max_wait* seconds
        at most in all (for item retries, or to reconnect after a lost connection).

        The target's saved backoff is never slept out: a one-off run (cron, a timer)
        tries the target at once, whatever an earlier run saved.  If the target cannot
        be reached at all (bounded by connect_timeout) the run ends at once: the items
        stay queued, charged no attempt, and the caller exits 75; the step it saves is
        --follow's to wait out.  A connection lost once the target was reached is
        retried within the run (retry_count tries in all, within *max_wait*), so a transfer cut
        in the middle is finished by the same run.  A wait that would end past
        *max_wait* is not begun: its items stay queued for the next run."""
        self.spool.reclaim_expired()
        if self.do_scan:
            report = self.scan_into_spool()
            if report is not None:
                self.summary.settling = report.waiting
        self.backoff.until = 0.0  # try now; the step (how long it has failed) is kept
        self.one_off = True
        budget = max(0.0, max_wait)
        reconnects = 0
        while not self.loop.stopping:
            self.deliver_pending()
            if self.summary.paused or self.loop.stopping:
                break
            wait = self.backoff.remaining(time.time())
            if wait > 0:
                if not self.reached:
                    break  # not reachable at all: never wait for it in a one-off run
                reconnects += 1
                if reconnects >= max(1, self.out.retry_count):  # tries in all, as items
                    break
            else:
                due = self.next_due()
                if due is None:
                    break
                wait = due
            if wait > budget:
                self.summary.waiting_retry = True
                log.info("%s: the next try is in %.0f s, past --max-wait (%.0f s left); "
                         "left queued for the next run", self.stream.name, wait, budget)
                break
            started = time.monotonic()
            self.loop.sleep(wait)
            budget -= time.monotonic() - started
        self.summary.queued = self.spool.count("new")
        if not self.loop.stopping:
            self.upkeep.run(self.stuck_cause(), force=True)
        if self.progress:
            self.progress.finish()
        return self.summary

    def follow(self) -> None:
        """Run until stopped: scan on every change, deliver, back off, keep systemd told."""
        from mstm.watch import Watcher

        watcher = Watcher(self.stream.directory, poll_interval=self.stream.poll_interval,
                          recursive=True)
        forget_waker = self.loop.on_stop(watcher.wake)
        self.spool.start_heartbeat()
        self.notifier.ready(self.status_line())
        log.info("%s: following %s -> %s:%s (%s, %s)", self.stream.name,
                 show(self.stream.directory), self.peer, self.out.target_dir,
                 self.out.transfer_mode, watcher.backend,
                 extra=fields(stream=self.stream.name, peer=self.peer))
        try:
            while not self.loop.stopping:
                self.tick()
                self.spool.reclaim_expired()
                report = self.scan_into_spool() if self.do_scan else None
                self.deliver_pending()
                self.upkeep.run(self.stuck_cause())
                self.notifier.status(self.status_line())
                timeouts = [self.stream.poll_interval * 20, 60.0]  # 60: the metrics file
                wake = self.on_progress() if self.on_progress else None
                if wake is not None:  # a change it held back (at most one write a second)
                    timeouts.append(wake + 0.01)
                if self.notifier.max_sleep:
                    timeouts.append(self.notifier.max_sleep)
                if report is not None and report.next_check is not None:
                    timeouts.append(report.next_check + 0.05)
                if self.backoff.step:
                    timeouts.append(self.backoff.remaining(time.time()) + 0.01)
                due = None if self._paused_reason or self.backoff.step else self.next_due()
                if due is not None:
                    timeouts.append(due + 0.01)
                if self._paused_reason:
                    timeouts.append(min(self.out.stop_file_poll_interval,
                                        self.stream.poll_interval * 10))
                if not self.do_scan:
                    timeouts.append(self.stream.poll_interval)
                watcher.wait(max(0.0, min(timeouts)))
        finally:
            self.notifier.stopping()
            forget_waker()
            watcher.close()
            self.spool.stop_heartbeat()
            self.transport.close()
