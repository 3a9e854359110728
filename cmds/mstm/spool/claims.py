"""The claim order: which waiting records a claim looks at, and in which order.

Claim order and cost: ``claim`` lists ``new/`` (one scandir; one stat per file, and the
links of a chunk share one) and keeps the oldest-due few batches' worth of names, ordered
by file mtime, which is the due time (``enqueued_at``, or ``not_before`` after a retry;
within a chunk, the records' own times).  Later claims take from that queue; ``new/`` is
listed again when it runs out, or when an item of ours went back to ``new/``.  So a claim
with a million records waiting costs one listing per few batches and the memory of a few
batches.  The record's ``not_before`` is authoritative (the mtime only orders), so a clock
step can't hide a due item; and a record whose last failure lies in the future of the
clock (the clock was stepped back) is due at once, so a step back never stretches a
backoff.

ClaimQueue holds that queue and the records found not yet due; Spool.claim takes names
from it and reads, checks and renames the records.
"""

from __future__ import annotations

import contextlib
import heapq
import os
from collections.abc import Iterator

from mstm.spool.files import SpoolFiles
from mstm.spool.records import ID_RE, ItemRecord, due


def is_due(not_before: float, retried_at: float, now: float) -> bool:
    """Whether a record may be claimed now.  Before the time of its last failed attempt
    means the clock was stepped back since: its backoff is over (one early retry, never
    a wait stretched by the size of the step)."""
    return not_before <= now or now < retried_at


class ClaimQueue:
    """The oldest-due names of new/ from the last listing, in claim order.

    len() is the number of names held.  ``listed`` counts the entries of new/ at the last
    listing, kept current with what this spool enqueued and claimed since (None before
    the first listing).
    """

    def __init__(self, files: SpoolFiles) -> None:
        self._files = files
        self._entries: list[tuple[int, int, str]] = []  # (mtime_ns, inode, name)
        self._pos = 0
        self._ino = -1  # the inode whose run of links in the queue is ordered
        self.partial = False  # new/ held more than the listing kept
        self.listed: int | None = None
        # records found not yet due: name -> (inode, not_before, retried_at)
        self._not_due: dict[str, tuple[int, float, float]] = {}

    def __len__(self) -> int:
        return len(self._entries)

    def exhausted(self) -> bool:
        """Whether every name of the last listing was taken."""
        return self._pos >= len(self._entries)

    def refill(self, keep: int, now: float) -> None:
        """List new/ into the queue: the *keep* oldest-due names, leaving out those
        known not to be due at *now*.

        One scandir; file times come from the inode (the links of one enqueued chunk share
        it, so one stat per chunk), and only *keep* names are held: a claim over a million
        waiting records costs one listing and the memory of a few batches.  Items that come
        back to new/ through this spool (release, retry, takeover) reset the queue.
        """
        mtimes: dict[int, int] = {}  # inode -> mtime_ns, for this listing
        count = candidates = 0
        not_due = self._not_due
        new = self._files.new

        def scan() -> Iterator[tuple[int, int, str]]:
            nonlocal count, candidates
            with contextlib.suppress(FileNotFoundError), os.scandir(new) as it:
                for entry in it:
                    name = entry.name
                    if not ID_RE.fullmatch(name):
                        continue
                    ino = entry.inode()
                    count += 1
                    known = not_due.get(name)
                    if known is not None and known[0] == ino and \
                            not is_due(known[1], known[2], now):
                        continue
                    mtime = mtimes.get(ino)
                    if mtime is None:
                        try:
                            mtime = entry.stat(follow_symlinks=False).st_mtime_ns
                        except FileNotFoundError:
                            continue
                        mtimes[ino] = mtime
                    candidates += 1
                    yield (mtime, ino, name)  # a chunk's links together: parsed once

        self._entries = heapq.nsmallest(keep, scan())
        self._pos = 0
        self._ino = -1
        self.partial = candidates > keep
        self.listed = count
        self._not_due = {n: v for n, v in self._not_due.items()
                         if os.path.lexists(os.path.join(new, n))}

    def pop(self) -> tuple[int, str]:
        """The next (inode, name) in claim order; the queue must not be exhausted."""
        _, ino, name = self._entries[self._pos]
        if ino != self._ino:
            self._order_chunk()
            _, ino, name = self._entries[self._pos]
        self._pos += 1
        return ino, name

    def put_back(self) -> None:
        """Make the name pop() returned last the first in line again."""
        self._pos -= 1

    def _order_chunk(self) -> None:
        """The links of one chunk share its file's time: order them by their records' own
        due times (the chunk is parsed once for the whole run, and cached for the reads)."""
        pos = self._pos
        mtime, ino, name = self._entries[pos]
        self._ino = ino
        end = pos + 1
        while end < len(self._entries) and self._entries[end][:2] == (mtime, ino):
            end += 1
        if end - pos < 2:
            return
        records = self._files.read_file(os.path.join(self._files.new, name), "new") or {}
        inf = float("inf")

        def due_of(entry: tuple[int, int, str]) -> tuple[float, str]:
            rec = records.get(entry[2])
            return (inf if rec is None else due(rec), entry[2])

        self._entries[pos:end] = sorted(self._entries[pos:end], key=due_of)

    def known_not_due(self, name: str, ino: int, now: float) -> bool:
        """Whether the record at new/<name> (this inode) was found not due, and still is."""
        cached = self._not_due.get(name)
        return cached is not None and cached[0] == ino and not is_due(cached[1], cached[2], now)

    def not_due(self, name: str, ino: int, rec: ItemRecord) -> None:
        """Remember that the record at new/<name> is not due yet (it is not read again
        until it is)."""
        self._not_due[name] = (ino, rec.not_before, rec.retried_at)

    def claimed(self, name: str) -> None:
        """The item was claimed: forget what was known of its record."""
        self._not_due.pop(name, None)

    def soonest_not_due(self, now: float) -> float | None:
        """The earliest not_before among the records found not yet due."""
        times = [nb for _, nb, retried in self._not_due.values() if not now < retried]
        return min(times, default=None)

    def requeued(self) -> None:
        """Something of ours went back to new/: list it again at the next claim."""
        self._pos = len(self._entries)

    def count(self, added: int) -> None:
        """Keep ``listed`` current: added entries came into new/ (negative: left it)."""
        if self.listed is not None:
            self.listed += added


def earliest_file_time(new: str) -> float | None:
    """The earliest mtime among the files in directory new (None if there are none).

    new/ files carry their due time as mtime, so this is when the soonest waiting record
    becomes claimable: a directory scan with stat, no record is read, cheap enough for
    every wake-up.
    """
    soonest: float | None = None
    seen: set[int] = set()  # the links of one chunk share an inode: one stat for all
    try:
        with os.scandir(new) as it:
            for entry in it:
                ino = entry.inode()
                if ino in seen:
                    continue
                seen.add(ino)
                try:
                    t = entry.stat(follow_symlinks=False).st_mtime
                except FileNotFoundError:
                    continue
                soonest = t if soonest is None else min(soonest, t)
    except FileNotFoundError:
        return None
    return soonest
