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

import hashlib
import json
import logging
import os
import sys
import threading
import time
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from mstm import protocol, safefs
from mstm import scan as scanning
from mstm.backoff import DestinationBackoff
from mstm.config import StreamConfig
from mstm.errors import TargetUnavailable
from mstm.log import event, fields, show, under_journal
from mstm.notify import Notifier
from mstm.safefs import Version
from mstm.send import finish
from mstm.spool import Claim, ItemRecord, Spool, SpoolBusy
from mstm.transports.base import Item, RemoteFile, Transport, exchange, staging_dir

log = logging.getLogger("mstm.send")

HASH_BLOCK = 1 << 20


# -- local digests -------------------------------------------------------------------
@dataclass
class LocalDigest:
    """What the source holds: one entry per regular file (a file item has one)."""

    files: dict[str, tuple[int, str]]  # relpath (relative to the stream dir) -> (size, sha256)
    versions: dict[str, Version]  # relpath -> the version that was hashed
    sha256: str  # of the item: the file's digest, or of a directory's manifest
    size: int
    changed: str | None = None  # why the source cannot be trusted, if it changed meanwhile
    dirs: list[str] = field(default_factory=list)  # a directory item's empty directories
    hashed_at_ns: int = 0  # when the hashing began (time.time_ns())

    def verified(self) -> finish.Verified:
        """What a deletion may rely on, once the target matched."""
        return finish.Verified(self.versions, {r: d for r, (_, d) in self.files.items()},
                               self.hashed_at_ns)


def _hash_file(root_fd: int, relpath: str, *, follow_symlinks: bool = False
               ) -> tuple[Version, str, bool]:
    """(version, sha256, stable) of one regular file below *root_fd*, read in large blocks.

    The path is resolved through :mod:`mstm.safefs`: no symbolic link below the stream
    directory is followed, but for the last component with *follow_symlinks* (then the
    version is that of the file it points to, as the scanner recorded it); anything but a
    regular file raises OSError.  *stable*: the file read is still the one at *relpath*,
    with the same size and times, after the read.
    """
    fd = safefs.open_regular(root_fd, relpath, follow_symlinks=follow_symlinks)
    h = hashlib.sha256()
    with open(fd, "rb", buffering=0) as f:
        before = os.fstat(fd)
        while chunk := f.read(HASH_BLOCK):
            h.update(chunk)
        after = os.fstat(fd)
    version = Version.of(before)
    try:
        dir_fd, name = safefs.open_parent(root_fd, relpath)
        try:
            now = os.stat(name, dir_fd=dir_fd, follow_symlinks=follow_symlinks)
        finally:
            os.close(dir_fd)
    except OSError:
        return version, h.hexdigest(), False
    stable = Version.of(after) == version and version.same_file(now) is None
    return version, h.hexdigest(), stable


def local_digest(source_dir: Path, record: ItemRecord, *, follow_symlinks: bool = True
                 ) -> LocalDigest:
    """Size and sha256 of what the source holds for *record*, read through
    :mod:`mstm.safefs` (nothing outside the stream directory is ever read).

    *follow_symlinks*: a file item that is a symbolic link is read through it (the
    stream's ``follow_symlinks``: links are only ever queued when it is on, and the
    sender's re-check before a batch compares the version with that same setting).
    Inside a directory item nothing is followed: its regular files are hashed, its empty
    directories listed (the target must show them); a link, FIFO, socket or device in
    it makes the item untrusted (``changed``): a directory unit carries only regular
    files and directories, and is never deleted with anything unverified in it.
    """
    hashed_at = time.time_ns()
    with safefs.opened_root(source_dir) as root_fd:
        if not record.is_dir:
            version, digest, stable = _hash_file(root_fd, record.relpath,
                                                 follow_symlinks=follow_symlinks)
            changed = None
            if not stable or (version.size, version.mtime_ns) != (record.size,
                                                                  record.mtime_ns):
                changed = "source changed while it was being sent"
            return LocalDigest({record.relpath: (version.size, digest)},
                               {record.relpath: version}, digest, version.size, changed,
                               hashed_at_ns=hashed_at)
        files: dict[str, tuple[int, str]] = {}
        versions: dict[str, Version] = {}
        manifest = hashlib.sha256()
        total = 0
        changed = None
        empty: list[str] = []
        last_dir: tuple[str, int] | None = None  # a directory not (yet) shown to hold anything
        for entry in safefs.walk(root_fd, record.relpath):
            if last_dir is not None and entry.depth <= last_dir[1]:
                empty.append(last_dir[0])
            last_dir = None
            if entry.is_dir:
                last_dir = (entry.relpath, entry.depth)
                continue
            if not entry.is_file:
                changed = (f"it holds a {safefs.special_reason(entry.st.st_mode)} "
                           f"({show(entry.relpath)}): a directory unit carries only "
                           f"regular files and directories")
                break
            version, digest, stable = _hash_file(root_fd, entry.relpath)
            if not stable:
                changed = "a file in the directory changed while it was being sent"
            files[entry.relpath] = (version.size, digest)
            versions[entry.relpath] = version
            total += version.size
        if last_dir is not None:
            empty.append(last_dir[0])
        for rel in sorted(files, key=os.fsencode):
            size, digest = files[rel]
            manifest.update(os.fsencode(rel) + b"\0" + str(size).encode() + b"\0" +
                            digest.encode() + b"\n")
        return LocalDigest(files, versions, manifest.hexdigest(), total, changed,
                           dirs=sorted(empty), hashed_at_ns=hashed_at)


def compare(local: LocalDigest, remote: dict[str, RemoteFile], *, prefix: str = "") -> str | None:
    """None if the target holds exactly what we hashed, else the first difference."""
    for rel in local.dirs:
        if rel not in remote:
            return f"missing at the target: the directory {show(rel)}"
    for rel, (size, digest) in local.files.items():
        got = remote.get(rel)
        if got is None:
            return f"missing at the target: {show(rel)}"
        if got.size != size:
            return f"bad size at the target: {show(rel)} is {got.size} bytes, expected {size}"
        if got.sha256 is None:  # never accept size alone before deleting anything
            return f"the target gave no checksum for {show(rel)} (is verification disabled?)"
        if got.sha256 != digest:
            return f"bad checksum at the target: {show(rel)}"
    return None


# -- what happened -----------------------------------------------------------------
def json_path(relpath: str) -> dict[str, str]:
    try:
        relpath.encode("utf-8")
        return {"path": relpath}
    except UnicodeEncodeError:
        import base64

        raw = os.fsencode(relpath)
        return {"path": raw.decode("utf-8", "backslashreplace"),
                "path_base64": base64.b64encode(raw).decode()}


@dataclass
class Summary:
    stream: str
    delivered: list[dict[str, Any]] = field(default_factory=list)
    failed: list[dict[str, Any]] = field(default_factory=list)
    skipped: list[dict[str, Any]] = field(default_factory=list)
    retried: int = 0
    bytes: int = 0
    paused: str | None = None
    error: str | None = None
    started: float = field(default_factory=time.time)
    queued: int = 0

    def to_json(self) -> str:
        return json.dumps({
            "stream": self.stream,
            "delivered": len(self.delivered),
            "delivered_bytes": self.bytes,
            "failed": self.failed,
            "skipped": self.skipped,
            "retried": self.retried,
            "queued": self.queued,
            "paused": self.paused,
            "error": self.error,
            "seconds": round(time.time() - self.started, 3),
            "items": self.delivered,
        }, ensure_ascii=False, indent=None)


class TtyProgress:
    """A single updating line on a terminal: items, bytes, rate."""

    def __init__(self, stream: str) -> None:
        self.stream = stream
        self.files = 0
        self.bytes = 0
        self._base = (0, 0)
        self._t0 = time.monotonic()
        self._last = 0.0
        self._shown = False

    def batch_progress(self, files: int, nbytes: int) -> None:
        self.files, self.bytes = self._base[0] + files, self._base[1] + nbytes
        now = time.monotonic()
        if now - self._last >= 0.2:
            self._last = now
            self._draw()

    def batch_done(self) -> None:
        self._base = (self.files, self.bytes)

    def _draw(self) -> None:
        rate = self.bytes / max(1e-6, time.monotonic() - self._t0)
        sys.stderr.write(f"\r{self.stream}: {self.files} files, {_human(self.bytes)}, "
                         f"{_human(rate)}/s   ")
        sys.stderr.flush()
        self._shown = True

    def finish(self) -> None:
        if self._shown:
            self._draw()
            sys.stderr.write("\n")
            sys.stderr.flush()


def _human(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024 or unit == "TiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} TiB"


# -- the sender ----------------------------------------------------------------------
class Sender:
    def __init__(self, stream: StreamConfig, *, spool: Spool, transport: Transport,
                 notifier: Notifier | None = None, progress: TtyProgress | None = None,
                 scan: bool = True) -> None:
        self.stream = stream
        self.out = stream.outgoing
        self.spool = spool
        self.transport = transport
        self.notifier = notifier or Notifier()
        self.progress = progress
        self.do_scan = scan
        self.stop_event = threading.Event()
        self.summary = Summary(stream.name)
        self.backoff = DestinationBackoff(base=max(0.1, self.out.retry_backoff),
                                          maximum=max(0.1, self.out.retry_backoff_max))
        self.backoff.load_state(spool.load_state().get("backoff", {}))
        self.peer = f"{self.out.transfer_protocol}://{self.out.target_host}:" \
                    f"{self.out.target_port}{self.out.target_dir}"
        self.per_item_level = logging.INFO if under_journal() else logging.DEBUG
        self._remote_stop: tuple[float, str | None] = (0.0, None)
        self._paused_reason: str | None = None
        self.last_delivery: float | None = None
        self.waker: Callable[[], None] | None = None

    # -- control --------------------------------------------------------------
    def stop(self) -> None:
        self.stop_event.set()
        if self.waker:
            self.waker()

    def should_stop(self) -> bool:
        return self.stop_event.is_set() or self.spool.lease_lost()

    def tick(self) -> None:
        self.notifier.watchdog()

    def _sleep(self, seconds: float) -> None:
        """Wait, waking for shutdown and keeping the watchdog fed."""
        end = time.monotonic() + seconds
        while not self.stop_event.is_set():
            left = end - time.monotonic()
            if left <= 0:
                return
            self.tick()
            self.stop_event.wait(min(left, self.notifier.max_sleep or left, 5.0))

    # -- scanning -------------------------------------------------------------
    def scan_into_spool(self) -> scanning.ScanReport | None:
        try:
            with self.spool.scan_lock():
                report = scanning.scan(self.stream)
                added = scanning.enqueue_ready(self.stream, self.spool, report.ready)
                if added:
                    log.info("%s: %d new item(s) queued", self.stream.name, added,
                             extra=event("enqueued", stream=self.stream.name))
                for relpath, reason in report.skipped:
                    log.debug("skipped %s: %s", show(relpath), reason,
                              extra=fields(stream=self.stream.name, item=relpath, reason=reason))
                return report
        except SpoolBusy:
            log.debug("another scanner holds %s; not scanning", self.spool.path)
            return None

    # -- pausing ----------------------------------------------------------------
    def paused(self) -> str | None:
        reason = scanning.is_paused(self.stream)
        if reason is None:
            reason = self._remote_paused()
        scanning.say_pause_change(log, self.stream.name, self._paused_reason, reason)
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
        while not self.stop_event.is_set():
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
        log.warning("%s: target unreachable (%s); backing off %.0f s (step %d)",
                    self.stream.name, error, wait, self.backoff.step,
                    extra=event("target_unreachable", stream=self.stream.name, peer=self.peer,
                                reason=error, attempt=self.backoff.step))
        self.notifier.status(f"backing off {wait:.0f} s: {error}")

    def _save_backoff(self) -> None:
        state = self.spool.load_state()
        state["backoff"] = self.backoff.to_state()
        self.spool.save_state(state)

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
        if self.backoff.succeeded():
            log.info("%s: target %s reachable again", self.stream.name, self.peer,
                     extra=event("resumed", stream=self.stream.name, peer=self.peer))
            self._save_backoff()
        items = [Item(c.record.relpath, c.record.size, c.record.is_dir, force=c.record.attempts > 0)
                 for c in live]
        handshake = self.out.target_uses_arrival_monitor
        batch = protocol.new_batch_id()
        # with the arrival monitor the batch goes to the receiver's incoming area; else to
        # a staging directory at the target, published only once verified
        batch_dir = (f"{self.out.target_incoming_dir}/{batch}" if handshake
                     else staging_dir(self.out.target_dir, batch))
        with ThreadPoolExecutor(max_workers=2, thread_name_prefix="hash") as pool:
            futures: dict[str, Future[LocalDigest]] = {
                c.record.id: pool.submit(local_digest, source, c.record,
                                         follow_symlinks=self.stream.follow_symlinks)
                for c in live}
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
                if not handshake and self.transport.alive():
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
            if handshake:
                problems = self._handshake(batch, live, digests)
            else:
                problems = self._inspect(batch, live, digests)
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
        if not handshake:
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

    def _inspect(self, batch: str, live: list[Claim], digests: dict[str, LocalDigest | str]
                 ) -> dict[str, str]:
        """Without a receiver: ask the target for size and sha256 of every file of the
        batch in its staging directory (and that each empty directory is there)."""
        wanted = [rel for c in live if isinstance(d := digests[c.record.id], LocalDigest)
                  and not d.changed for rel in (*d.files, *d.dirs)]
        remote = self.transport.inspect(wanted, staged=batch) if wanted else {}
        problems: dict[str, str] = {}
        for c in live:
            d = digests[c.record.id]
            if isinstance(d, LocalDigest) and not d.changed:
                p = compare(d, remote)
                if p:
                    problems[c.record.id] = p
        return problems

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

    def _handshake(self, batch: str, live: list[Claim], digests: dict[str, LocalDigest | str]
                   ) -> dict[str, str]:
        """With mstm-receive at the target: control file, receipt, thank-you.

        The receipt is untrusted input: parsed strictly, and an item counts as delivered
        only if the receipt says "ok" for every one of its files.  A receipt that never
        comes means the receiver is not working: the batch is released, not failed.
        """
        out = self.out
        control_name, receipt_name, thanks_name = protocol.file_names(
            batch, control_ext=out.control_file_extension,
            receipt_ext=out.receipt_file_extension, thanks_ext=out.thankyou_file_extension)
        entries = [protocol.ControlItem(rel, size, digest)
                   for c in live if isinstance(d := digests[c.record.id], LocalDigest)
                   and not d.changed for rel, (size, digest) in d.files.items()]
        problems: dict[str, str] = {}
        # a control file even for an empty batch: its thank-you lets the receiver clean up.
        # The thank-you goes as soon as the receipt exists (one round trip for it all): if
        # we then fail to read the receipt, nothing is deleted here and a re-send finds the
        # items already published, identical, and gets "ok".
        dirs = tuple(rel for c in live if isinstance(d := digests[c.record.id], LocalDigest)
                     and not d.changed for rel in d.dirs)
        control = protocol.Control(batch=batch, algorithm="sha256", receipt=receipt_name,
                                   items=tuple(entries), dirs=dirs)
        timeout = out.receipt_file_poll_count * out.receipt_file_poll_interval
        try:
            raw = exchange(
                self.transport, out.target_incoming_dir,
                put=(control_name, protocol.render_control(control)),
                await_name=receipt_name, then_put=(thanks_name, protocol.render_thanks(batch)),
                timeout=timeout, max_bytes=64 << 20, tick=self.tick,
                should_stop=self.should_stop)
        except OSError as err:
            raise TargetUnavailable(str(err)) from err
        if raw is None:
            if self.should_stop():
                raise TargetUnavailable("stopped while waiting for the receipt")
            raise TargetUnavailable(f"no receipt from the target's mstm-receive within "
                                    f"{timeout:.0f} s (is it running?)")
        try:
            receipt = protocol.parse_receipt(raw, batch=batch)
        except protocol.ProtocolError as err:
            raise TargetUnavailable(f"unreadable receipt for batch {batch}: {err}") from err
        status = dict(receipt.items)
        for c in live:
            d = digests[c.record.id]
            if not isinstance(d, LocalDigest) or d.changed:
                continue
            for rel in (*d.files, *d.dirs):
                st = status.get(rel)
                if st is not protocol.Status.OK:
                    what = st.value if st is not None else "no answer"
                    problems[c.record.id] = f"receipt says {what}: {show(rel)}"
                    break
        return problems

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
                                            busy=busy, level=self.per_item_level)
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
                                    bytes=digest.size, peer=self.peer))

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
                        show(claim.record.relpath), attempt, self.out.retry_count + 1, reason,
                        extra=event("retried", stream=self.stream.name,
                                    item=claim.record.relpath, reason=reason, attempt=attempt))

    # -- status ---------------------------------------------------------------
    def status_line(self) -> str:
        queued = self.spool.queued()  # a deep new/ or done/ is never listed per wake-up
        if self._paused_reason:
            return f"paused: {self._paused_reason}; {queued} queued"
        if self.backoff.step:
            left = self.backoff.remaining(time.time())
            return f"backing off {left:.0f} s: {self.backoff.last_error}"
        last = (time.strftime("%H:%M:%S", time.localtime(self.last_delivery))
                if self.last_delivery else "never")
        failed = self.spool.count("failed")
        extra = f", {failed} failed" if failed else ""
        return f"idle, {queued} queued{extra}, last delivery {last}"

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

    def run_once(self) -> Summary:
        """Scan, then deliver until nothing claimable remains (waiting out item backoffs)."""
        self.spool.reclaim_expired()
        if self.do_scan:
            self.scan_into_spool()
        connection_tries = 0
        while not self.stop_event.is_set():
            self.deliver_pending()
            if self.summary.paused or self.stop_event.is_set():
                break
            wait_backoff = self.backoff.remaining(time.time())
            if wait_backoff > 0:
                connection_tries += 1
                if connection_tries > self.out.retry_count:
                    break
                self._sleep(wait_backoff)
                continue
            due = self.next_due()
            if due is None:
                break
            self._sleep(due)
        self.summary.queued = self.spool.count("new")
        if self.progress:
            self.progress.finish()
        return self.summary

    def follow(self) -> None:
        """Run until stopped: scan on every change, deliver, back off, keep systemd told."""
        from mstm.watch import Watcher

        watcher = Watcher(self.stream.directory, poll_interval=self.stream.poll_interval,
                          recursive=True)
        self.waker = watcher.wake
        self.spool.start_heartbeat()
        self.notifier.ready(self.status_line())
        log.info("%s: following %s -> %s:%s (%s, %s)", self.stream.name,
                 show(self.stream.directory), self.peer, self.out.target_dir,
                 self.out.transfer_mode, watcher.backend,
                 extra=fields(stream=self.stream.name, peer=self.peer))
        try:
            while not self.stop_event.is_set():
                self.tick()
                self.spool.reclaim_expired()
                report = self.scan_into_spool() if self.do_scan else None
                self.deliver_pending()
                self.notifier.status(self.status_line())
                timeouts = [self.stream.poll_interval * 20]
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
            watcher.close()
            self.spool.stop_heartbeat()
            self.transport.close()
