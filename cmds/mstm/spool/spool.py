"""The Spool: the durable queue of one stream and every change of an item's state.

Maildir-style, every state change is one rename(2) or link(2) (the layout is described in
files.py, record files in records.py, leases in owners.py, the claim order in claims.py).
Spool puts those parts together: open and close, enqueue, claim, complete, retry,
release, drop, the takeover of expired claims, and inspection and upkeep (counts,
records, failed and done records, state.json, scan.lock).

Guarantees:

* Every record file is fsync'd before a name for it is published by
  link or rename, and the directory is fsync'd before the call returns (``complete_many``
  with durable=False leaves that to the caller's ``flush``).  A crash at any instant
  leaves every item in exactly one of new/, claimed/, done/, failed/ (or, if it crashed
  before publication, in none: the scanner enqueues it again).  Stale ``tmp/`` files are
  only garbage.
* A record leaves ``claimed/`` only by its owner (complete, retry, release, drop) or by
  ``reclaim_expired`` once the owner is dead or silent.  When the content changes
  (complete, retry) the new record (or a link to the batch's file) is renamed *over*
  ``claimed/<id>@<owner>`` and then renamed to its destination, so exactly one copy
  exists at any instant.
* ``spool.lock``: moves out of ``claimed/`` by an owner hold it shared; ``enqueue``,
  ``reclaim_expired`` and ``retry_failed`` hold it exclusively.  So a takeover never
  interleaves with an owner's check-and-rewrite of its claim (the rewrite can't resurrect
  a claim already taken over), and enqueue's check "not in new/, claimed/, done/,
  failed/" (made in that order, the order items flow) can't miss an item moving back.
* ``state.json`` (the target's backoff, the stuck list, totals, pruning times) is
  changed by ``update_state`` under ``state.lock``, a read-modify-write at a time, so
  senders sharing a spool never undo each other's changes; readers take no lock.
* A record that can't be parsed is moved to ``corrupt/`` with a warning; its item is then
  unknown, and the scanner enqueues it again if its source still exists.
"""

from __future__ import annotations

import contextlib
import logging
import os
import random
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import replace
from pathlib import Path
from typing import Any

from mstm.spool.claims import ClaimQueue, earliest_file_time, is_due
from mstm.spool.errors import SpoolError
from mstm.spool.files import STATES, SpoolFiles, fsync_dir, listdir, rename_if_present
from mstm.spool.owners import Leases
from mstm.spool.records import (
    CHUNK,
    ID_RE,
    Claim,
    ItemRecord,
    check_record,
    due,
    names_by_inode,
    pack,
)

log = logging.getLogger("mstm.spool")

_EXACT_COUNT = 10_000  # queued(): below this many waiting, count them exactly


class Spool:
    """The durable queue of one stream (see the module docstring)."""

    def __init__(
        self,
        path: Path,
        *,
        lease_seconds: float = 300.0,
        owner: str | None = None,
        clock: Callable[[], float] = time.time,
    ) -> None:
        if lease_seconds <= 0:
            raise ValueError("lease_seconds must be positive")
        self.path = Path(path)
        self._clock = clock
        self._files = SpoolFiles(self.path, clock)
        self._leases = Leases(self._files, owner=owner, lease_seconds=float(lease_seconds),
                              clock=clock)
        self._queue = ClaimQueue(self._files)  # claim order (see claim)
        self._rng = random.Random()
        self._opened = False

    @property
    def owner(self) -> str:
        """Our owner name: claims are claimed/<id>@<owner> (a new one after a lost lease)."""
        return self._leases.owner

    @property
    def lease_seconds(self) -> float:
        """How long an owner on another host may stay silent before its claims expire."""
        return self._leases.lease_seconds

    # ------------------------------------------------------------------ set-up

    def open(self) -> Spool:
        """Create the layout (mode 0o750), check it is writable, register our owner file."""
        self._files.create(self.owner)
        self._opened = True
        self._leases.register()
        return self

    def __enter__(self) -> Spool:
        return self.open() if not self._opened else self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _require_open(self) -> None:
        if not self._opened:
            raise SpoolError(f"spool {self.path} is not open")

    def close(self) -> None:
        """Stop beating, hand back any claims still held, remove our owner file."""
        if not self._opened:
            return
        self.stop_heartbeat()
        suffix = "@" + self.owner
        mine = [n for n in listdir(self._files.claimed) if n.endswith(suffix)]
        if mine:
            log.warning("spool %s: releasing %d claim(s) still held at close", self.path, len(mine))
            with self._files.lock(exclusive=False):
                for name in mine:
                    rename_if_present(
                        os.path.join(self._files.claimed, name),
                        os.path.join(self._files.new, name.split("@", 1)[0]),
                    )
            fsync_dir(self._files.new)
        with contextlib.suppress(FileNotFoundError):
            os.unlink(self._leases.owner_path())
        self._opened = False

    def _write_tmp(self, data: bytes, mtime: float | None = None, *, sync: bool = True) -> str:
        """A new tmp/ file of ours holding data (see SpoolFiles.write_tmp); its path."""
        return self._files.write_tmp(data, self.owner, mtime, sync=sync)

    def _read(self, path: str, expect_id: str, state: str) -> ItemRecord | None:
        """The record at path; None if it vanished or was corrupt (then quarantined)."""
        return self._files.read(path, expect_id, state)

    # ------------------------------------------------------------------ leases

    def heartbeat(self) -> bool:
        """Touch owners/<owner>; False if it was taken away (lease lost)."""
        self._require_open()
        return self._leases.heartbeat()

    def lease_lost(self) -> bool:
        """True once our owner file was taken away (until claim() starts a new identity)."""
        return self._leases.lost(look=self._opened)

    def start_heartbeat(self) -> None:
        """Beat every lease_seconds/4 in a daemon thread."""
        self._require_open()
        self._leases.start_heartbeat()

    def stop_heartbeat(self) -> None:
        """Stop the heartbeat thread, if any."""
        self._leases.stop_heartbeat()

    def reclaim_expired(self) -> int:
        """Take over the claims of dead or silent owners; return items put back in new/."""
        self._require_open()
        now = self._clock()
        with self._files.lock(exclusive=True):
            moved = self._leases.take_over_expired(now)
            self._files.remove_stale_tmp(now)
        if moved:
            self._queue.requeued()
            fsync_dir(self._files.new)
            fsync_dir(self._files.claimed)
        return moved

    # ------------------------------------------------------------------ queueing

    def known(self, item_id: str) -> bool:
        """Whether the item is in new/, claimed/, done/ or failed/ (checked in that order).

        Advisory: an item moving back into new/ during the check may be missed;
        enqueue() repeats the check under spool.lock.
        """
        self._require_open()
        if os.path.lexists(os.path.join(self._files.new, item_id)):
            return True
        if item_id in self._claimed_ids():
            return True
        return any(os.path.lexists(os.path.join(d, item_id))
                   for d in (self._files.done, self._files.failed))

    def _claimed_ids(self) -> set[str]:
        return {name.partition("@")[0] for name in listdir(self._files.claimed)}

    def enqueue(self, records: Iterable[ItemRecord], *, again_if_done: bool = False) -> int:
        """Queue the records whose item is not known yet; return how many were new.

        again_if_done: an item in done/ is queued again (its done record removed first).
        Move mode asks for that: its sender deletes a source before it commits, so a
        source still there with a done record is a new file that shares path, size and
        mtime with one delivered before (or its deletion failed), and must be sent again.
        """
        self._require_open()
        now = self._clock()
        batch: dict[str, ItemRecord] = {}
        for rec in records:
            check_record(rec)
            if rec.enqueued_at == 0.0:
                rec = replace(rec, enqueued_at=now)
            batch.setdefault(rec.id, rec)
        todo = list(batch.values())
        added = 0
        for start in range(0, len(todo), CHUNK):
            added += self._enqueue_chunk(todo[start : start + CHUNK], again_if_done)
        if added:
            self._queue.count(added)
            fsync_dir(self._files.new)
            log.debug("spool %s: enqueued %d item(s)", self.path, added)
        return added

    def _enqueue_chunk(self, chunk: list[ItemRecord], again_if_done: bool) -> int:
        # Cheap unlocked pre-check: nothing written for items already known.
        new, done_dir, failed = self._files.new, self._files.done, self._files.failed
        claimed = self._claimed_ids()
        skip = (new, failed) if again_if_done else (new, done_dir, failed)
        chunk = [r for r in chunk if r.id not in claimed
                 and not any(os.path.lexists(os.path.join(d, r.id)) for d in skip)]
        if not chunk:
            return 0
        # The chunk's records go into one file, made durable by one fsync; each item is
        # then published as a hard link to it, new/<id>: one file and one link per item
        # instead of a file, an fsync and a rename, and no per-item block to free later.
        tmp = self._write_tmp(pack(chunk), mtime=min(due(r) for r in chunk))
        added = 0
        try:
            with self._files.lock(exclusive=True):
                # Exact check, in the order items flow: new, claimed, done, failed.
                in_new = {r.id for r in chunk if os.path.lexists(os.path.join(new, r.id))}
                claimed = self._claimed_ids()
                for rec in chunk:
                    i = rec.id
                    done = os.path.join(done_dir, i)
                    if (
                        i in in_new
                        or i in claimed
                        or (not again_if_done and os.path.lexists(done))
                        or os.path.lexists(os.path.join(failed, i))
                    ):
                        continue
                    if again_if_done:
                        # one name at a time: a crash here leaves the item in neither
                        # state, and the next scan queues it (its source is still there)
                        with contextlib.suppress(FileNotFoundError):
                            os.unlink(done)
                    try:
                        os.link(tmp, os.path.join(new, i))
                    except FileExistsError:
                        continue
                    except FileNotFoundError:
                        log.warning(
                            "spool %s: temporary records vanished (clock step?); they "
                            "will be enqueued on the next scan", self.path)
                        break
                    added += 1
        finally:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(tmp)
        return added

    # ------------------------------------------------------------------ claiming

    def claim(self, *, max_items: int, max_bytes: int) -> list[Claim]:
        """Claim due records, oldest due first, up to max_items and max_bytes.

        At least one record is claimed if any is due, even if it alone exceeds
        max_bytes; the batch stops at the first record that would exceed it.
        """
        self._require_open()
        if max_items < 1:
            raise ValueError("max_items must be at least 1")
        self._leases.ensure()
        now = self._clock()
        # names kept per listing: many batches' worth (a listing of a million costs ~0.5 s),
        # at most ~64k of them (~13 MB), and never fewer than one batch
        keep = max(max_items, min(16 * max_items, 65536), 4096)
        queue = self._queue
        claims: list[Claim] = []
        total = 0
        listings = 0
        while True:
            if queue.exhausted():
                # Listed already and nothing more to claim, or nothing due among the oldest
                # (only after a clock step: a record's due time orders it): one more
                # listing then, without the records now known not to be due.
                if listings and (claims or not queue.partial or listings >= 2):
                    break
                queue.refill(keep, now)
                listings += 1
                if queue.exhausted():
                    break
            ino, name = queue.pop()
            if queue.known_not_due(name, ino, now):
                continue
            src = os.path.join(self._files.new, name)
            rec = self._read(src, name, "new")
            if rec is None:
                continue
            if not is_due(rec.not_before, rec.retried_at, now):
                queue.not_due(name, ino, rec)
                continue
            if claims and total + rec.size > max_bytes:
                queue.put_back()  # first in line for the next claim
                break
            dst = os.path.join(self._files.claimed, f"{name}@{self.owner}")
            if not rename_if_present(src, dst):
                continue  # another sender won it
            queue.claimed(name)
            # Re-read what we actually hold: it may have been retried in between.
            held = self._read(dst, name, "claimed")
            if held is None:
                continue
            if not is_due(held.not_before, held.retried_at, now):
                with self._files.lock(exclusive=False):
                    rename_if_present(dst, src)
                continue
            claims.append(Claim(held, Path(dst)))
            total += held.size
            if len(claims) >= max_items or total >= max_bytes:
                break
        if claims:
            queue.count(-len(claims))
            fsync_dir(self._files.claimed)
            fsync_dir(self._files.new)
        return claims

    # ------------------------------------------------------------------ the end of a claim

    def flush(self) -> None:
        """Make the state changes made so far durable: an fsync of each state directory
        (never a syncfs: the spool may share its filesystem with the data, whose
        writeback is not ours to force)."""
        for d in self._files.states.values():
            fsync_dir(d)

    def _finish(self, claim: Claim, record: ItemRecord, dest_dir: str, mtime: float,
                *, durable: bool = True) -> bool:
        """Rewrite the claim's record over claimed/<id>@<owner>, then rename it into dest_dir.

        False (nothing changed) if the claim was taken over.
        """
        path = str(claim.path)
        dest = os.path.join(dest_dir, record.id)
        with self._files.lock(exclusive=False):
            # Under the shared lock no takeover can move our claim, so the check holds
            # until both renames are done.
            if not os.path.lexists(path):
                return False
            tmp = self._write_tmp(pack([record]), mtime=mtime, sync=durable)
            try:
                os.rename(tmp, path)
            except FileNotFoundError as e:
                raise SpoolError(f"temporary record {tmp} vanished") from e
            os.rename(path, dest)
        if durable:
            fsync_dir(dest_dir)
            fsync_dir(self._files.claimed)
        return True

    def complete(self, claim: Claim, *, sha256: str, durable: bool = True) -> bool:
        """claimed -> done/; False if the claim was lost (then leave the source alone)."""
        return self.complete_many([(claim, sha256)], durable=durable)[0]

    def complete_many(self, verified: Sequence[tuple[Claim, str]], *,
                      durable: bool = True) -> list[bool]:
        """claimed -> done/ for each (claim, sha256); per claim, False if it was lost (taken
        over by another sender).

        The done records of up to CHUNK claims are written to one file, fsync'd, and each
        claim's entry is replaced by a hard link to it (a link renamed over
        claimed/<id>@<owner>, then renamed to done/<id>: one copy at every instant, and no
        block freed or written per item).  durable=False leaves the directory fsyncs to
        the caller's flush() at the end of its batch.  That is safe because a done record
        is bookkeeping, not the evidence a deletion rests on (the target's verification
        is, and move mode deletes before it commits): a record lost in a crash only makes
        the item be looked at again, and found delivered or its source gone.
        """
        self._require_open()
        now = self._clock()
        results = [False] * len(verified)
        for start in range(0, len(verified), CHUNK):
            part = range(start, min(start + CHUNK, len(verified)))
            with self._files.lock(exclusive=False):
                # Under the shared lock no takeover can move our claims, so the check holds
                # until the renames are done.
                live = [(k, replace(verified[k][0].record, sha256=verified[k][1],
                                    completed_at=now, not_before=0.0))
                        for k in part if os.path.lexists(verified[k][0].path)]
                if not live:
                    continue
                tmp = self._write_tmp(pack(rec for _, rec in live), mtime=now)
                try:
                    for k, rec in live:
                        claim = verified[k][0]
                        link = f"{tmp}.{k}"
                        os.link(tmp, link)
                        try:
                            os.rename(link, claim.path)
                        except FileNotFoundError as e:
                            raise SpoolError(f"temporary record {link} vanished") from e
                        os.rename(claim.path, os.path.join(self._files.done, rec.id))
                        claim.record = rec
                        results[k] = True
                finally:
                    with contextlib.suppress(FileNotFoundError):
                        os.unlink(tmp)
        if durable and any(results):
            fsync_dir(self._files.done)
            fsync_dir(self._files.claimed)
        for k, ok in enumerate(results):
            if not ok:
                log.warning(
                    "spool %s: claim on %r was lost before completion; not completed",
                    self.path,
                    verified[k][0].record.relpath,
                )
        return results

    def retry(
        self, claim: Claim, reason: str, *, retry_count: int, backoff: float, backoff_max: float
    ) -> str:
        """Count a failed attempt: back to new/ after a backoff ("queued"), or "failed".

        *retry_count* is the number of attempts an item gets in all, the first one
        included, as MiStaMover counted it (``retry_count = 3``: three tries, then
        parked); 0 means the same as 1 (one attempt, never retried).
        """
        self._require_open()
        now = self._clock()
        rec = claim.record
        attempts = rec.attempts + 1
        if attempts >= max(1, retry_count):
            new = replace(rec, attempts=attempts, last_error=reason, not_before=0.0)
            dest, mtime, result = self._files.failed, now, "failed"
        else:
            delay = min(backoff_max, backoff * 2.0 ** min(attempts - 1, 64))
            not_before = now + delay * self._rng.uniform(0.5, 1.0)
            new = replace(rec, attempts=attempts, last_error=reason, not_before=not_before,
                          retried_at=now)
            dest, mtime, result = self._files.new, not_before, "queued"
        if not self._finish(claim, new, dest, mtime=mtime):
            log.warning(
                "spool %s: claim on %r was lost; its new owner will try it", self.path, rec.relpath
            )
            return "queued"
        claim.record = new
        if result == "queued":
            self._queue.requeued()
        return result

    def release(self, claim: Claim) -> None:
        """Back to new/ unchanged, no attempt counted."""
        self._require_open()
        with self._files.lock(exclusive=False):
            moved = rename_if_present(str(claim.path),
                                      os.path.join(self._files.new, claim.record.id))
        if moved:
            self._queue.requeued()
            fsync_dir(self._files.new)

    def drop(self, claim: Claim, reason: str) -> None:
        """Remove the record (its source vanished)."""
        self._require_open()
        with self._files.lock(exclusive=False):
            try:
                os.unlink(claim.path)
            except FileNotFoundError:
                return
        fsync_dir(self._files.claimed)
        log.info("spool %s: dropped %r: %s", self.path, claim.record.relpath, reason)

    # ------------------------------------------------------------------ inspection, upkeep

    def counts(self) -> dict[str, int]:
        """Number of records in each state."""
        self._require_open()
        return {state: len(listdir(d)) for state, d in self._files.states.items()}

    def count(self, state: str) -> int:
        """Number of records in one state (one directory listing, no list kept)."""
        self._require_open()
        n = 0
        with contextlib.suppress(FileNotFoundError), os.scandir(self._files.states[state]) as it:
            for _ in it:
                n += 1
        return n

    def queued(self) -> int:
        """About how many records wait in new/, without listing a deep queue each time:
        below _EXACT_COUNT an exact count; above, the last listing's count, less what we
        claimed and plus what we enqueued since (another scanner's items show at the next
        listing, i.e. within a few batches)."""
        self._require_open()
        listed = self._queue.listed
        if listed is None or listed < _EXACT_COUNT:
            return self.count("new")
        return max(0, listed)

    def soonest_not_due(self) -> float | None:
        """The earliest not_before among the records the last claim found not yet due."""
        return self._queue.soonest_not_due(self._clock())

    def earliest_due(self) -> float | None:
        """When the soonest waiting record becomes claimable (epoch), from file times only
        (see claims.earliest_file_time: no record is read, cheap enough for every wake-up)."""
        self._require_open()
        return earliest_file_time(self._files.new)

    def iter_records(self, state: str) -> Iterator[ItemRecord]:
        """The readable records in one state (new, claimed, done, failed)."""
        self._require_open()
        if state not in self._files.states:
            raise ValueError(f"unknown state {state!r}; expected one of {', '.join(STATES)}")
        d = self._files.states[state]
        for name in names_by_inode(d):
            item = name.partition("@")[0]
            rec = self._read(os.path.join(d, name), item, state)
            if rec is not None:
                yield rec

    def retry_failed(self, ids: Iterable[str] | None = None) -> int:
        """failed/ -> new/ with attempts reset (all, or only the given ids)."""
        self._require_open()
        names = sorted(listdir(self._files.failed)) if ids is None else list(ids)
        n = 0
        with self._files.lock(exclusive=True):
            for item in names:
                if not ID_RE.fullmatch(item):
                    continue
                path = os.path.join(self._files.failed, item)
                rec = self._read(path, item, "failed")
                if rec is None:
                    continue
                rec = replace(rec, attempts=0, not_before=0.0)
                tmp = self._write_tmp(pack([rec]), mtime=due(rec))
                os.rename(tmp, path)  # update in place, then move: never two copies
                os.rename(path, os.path.join(self._files.new, item))
                n += 1
        if n:
            self._queue.requeued()
            fsync_dir(self._files.new)
            fsync_dir(self._files.failed)
        return n

    def forget_done(self, item_ids: Iterable[str]) -> int:
        """Delete these done records."""
        self._require_open()
        n = 0
        for item in item_ids:
            if not ID_RE.fullmatch(item):
                continue
            with contextlib.suppress(FileNotFoundError):
                os.unlink(os.path.join(self._files.done, item))
                n += 1
        if n:
            fsync_dir(self._files.done)
        return n

    def prune_done(self, older_than: float,
                   keep: Callable[[ItemRecord], bool] | None = None) -> int:
        """Delete done records completed before that epoch time (judged by file mtime),
        but those *keep* says to keep (it is given the record; an unreadable one is
        kept)."""
        self._require_open()
        n = 0
        with contextlib.suppress(FileNotFoundError), os.scandir(self._files.done) as it:
            for entry in it:
                try:
                    if entry.stat(follow_symlinks=False).st_mtime >= older_than:
                        continue
                    if keep is not None:
                        if not ID_RE.fullmatch(entry.name):
                            continue
                        rec = self._read(entry.path, entry.name, "done")
                        if rec is None or keep(rec):
                            continue
                    os.unlink(entry.path)
                except FileNotFoundError:
                    continue
                n += 1
        if n:
            fsync_dir(self._files.done)
        return n

    def load_state(self) -> dict[str, Any]:
        """state.json, or {} if there is none (a corrupt one is moved to corrupt/)."""
        self._require_open()
        return self._files.load_state()

    def save_state(self, state: dict[str, Any]) -> None:
        """Replace state.json atomically (see update_state to change a part of it)."""
        self._require_open()
        self._files.save_state(state, self.owner)

    def update_state(self, change: Callable[[dict[str, Any]], object]) -> dict[str, Any]:
        """Read state.json, let *change* alter it in place, write it back, all under
        state.lock: what other processes (or hosts) wrote meanwhile is kept.  *change*
        returning False means nothing changed (nothing is written).  The new state."""
        self._require_open()
        with self._files.state_lock():
            state = self._files.load_state()
            if change(state) is not False:
                self._files.save_state(state, self.owner)
        return state

    @contextlib.contextmanager
    def scan_lock(self) -> Iterator[None]:
        """Hold scan.lock (exclusive, non-blocking); raise SpoolBusy if another holds it."""
        self._require_open()
        with self._files.scan_lock():
            yield

