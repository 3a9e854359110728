"""A read-only look at one spool directory: what waits, what was delivered, what failed.

Nothing here goes through :meth:`mstm.spool.Spool.open`, which creates the layout and
registers an owner: a look never changes the spool (no owner file, no takeover, no
heartbeat, no quarantine of a record it cannot read; it only skips it).

Cost.  The entries of ``new/`` and ``done/`` are hard links to one file per enqueued
chunk or committed batch (see mstm.spool.records), so a look groups the names of a
directory by inode and parses each file once.  :class:`SpoolView` also keeps, per file
(inode, size, mtime: a record file is never changed in place), the number of records it
holds, their bytes and their oldest enqueue time: when every record of a file is still
in ``new/`` (the usual case but for the chunk being claimed from), the next look costs
one directory listing and one ``stat`` per file, not a parse.  Measured figures are in
tests/unit/test_overview.py.
"""

from __future__ import annotations

import logging
import os
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

from mstm.spool.owners import live_owners
from mstm.spool.records import ItemRecord, RecordFiles

log = logging.getLogger("mstm.overview")

DAY = 86400.0
_MAX_FAILED_READ = 10_000  # parked records read for their reasons; beyond, only counted

#: The few words a failure's reason is classed into (a metric's label: never free text).
REASONS = ("mismatch", "missing", "source", "target", "other")


def reason_class(text: str | None) -> str:
    """One word of :data:`REASONS` for the reason an item failed."""
    t = (text or "").lower()
    if "checksum" in t or "bad size" in t or "mismatch" in t:
        return "mismatch"
    if "missing" in t:
        return "missing"
    if "source" in t:
        return "source"
    if "target" in t or "refused" in t or "io-error" in t or "put in place" in t:
        return "target"
    return "other"


@dataclass
class Queue:
    """What waits in new/ (and is held in claimed/)."""

    items: int = 0
    bytes: int = 0
    oldest: float | None = None  # enqueue time of the oldest waiting item (epoch)
    claimed: int = 0


@dataclass
class Delivered:
    """What done/ says: the newest commit, and what was committed since a time."""

    records: int = 0
    newest: float | None = None  # commit time of the newest done record (epoch)
    items_since: int = 0
    bytes_since: int = 0


@dataclass
class Failed:
    """What failed/ holds: parked items by reason class, and the newest reason."""

    items: int = 0
    by_reason: dict[str, int] = field(default_factory=dict)
    last_error: str | None = None
    last_at: float = 0.0


@dataclass(frozen=True)
class _Aggregate:
    count: int
    bytes: int
    oldest: float


def _groups(directory: str) -> dict[int, list[os.DirEntry[str]]]:
    """The entries of *directory* by inode (the links of one record file together)."""
    groups: dict[int, list[os.DirEntry[str]]] = {}
    try:
        with os.scandir(directory) as it:
            for entry in it:
                groups.setdefault(entry.inode(), []).append(entry)
    except (FileNotFoundError, NotADirectoryError):
        pass
    return groups


class SpoolView:
    """Looks at the spool at *path*, read only; keeps what it parsed for the next look."""

    def __init__(self, path: Path | str, *, lease_seconds: float = 300.0) -> None:
        self.path = os.fspath(path)
        self.lease_seconds = lease_seconds
        self._files = RecordFiles(keep=4)
        self._aggregates: dict[tuple[int, int, int], _Aggregate] = {}

    def exists(self) -> bool:
        return os.path.isdir(os.path.join(self.path, "new"))

    def _dir(self, state: str) -> str:
        return os.path.join(self.path, state)

    def _records(self, entries: list[os.DirEntry[str]]) -> list[ItemRecord]:
        """The records the names in *entries* (links of one file) stand for."""
        try:
            parsed = self._files.load(entries[0].path)
        except (OSError, ValueError):
            return []
        found = []
        for e in entries:
            rec = parsed.get(e.name.partition("@")[0])
            if rec is not None:
                found.append(rec)
        return found

    def _aggregate(self, entries: list[os.DirEntry[str]], key: tuple[int, int, int]
                   ) -> _Aggregate | None:
        """The records of the file behind *entries*, summed; None if unreadable."""
        agg = self._aggregates.get(key)
        if agg is not None and agg.count == len(entries):
            return agg
        try:
            parsed = self._files.load(entries[0].path)
        except (OSError, ValueError):
            return None
        whole = _Aggregate(len(parsed), sum(r.size for r in parsed.values()),
                           min((r.enqueued_at for r in parsed.values()), default=0.0))
        self._aggregates[key] = whole
        if whole.count == len(entries):
            return whole
        recs = self._records(entries)
        return _Aggregate(len(recs), sum(r.size for r in recs),
                          min((r.enqueued_at for r in recs), default=0.0))

    def queue(self) -> Queue:
        """Items and bytes waiting in new/ and the oldest one's enqueue time."""
        q = Queue()
        seen: set[tuple[int, int, int]] = set()
        for ino, entries in _groups(self._dir("new")).items():
            try:
                st = entries[0].stat(follow_symlinks=False)
            except OSError:
                continue
            key = (ino, st.st_size, st.st_mtime_ns)
            seen.add(key)
            agg = self._aggregate(entries, key)
            q.items += len(entries)
            if agg is None:
                continue
            q.bytes += agg.bytes
            if agg.count and agg.oldest > 0:
                q.oldest = agg.oldest if q.oldest is None else min(q.oldest, agg.oldest)
        for key in set(self._aggregates) - seen:  # files no longer in new/
            del self._aggregates[key]
        claimed = _groups(self._dir("claimed"))
        q.claimed = sum(len(v) for v in claimed.values())
        q.items += q.claimed
        for entries in claimed.values():
            for rec in self._records(entries):
                q.bytes += rec.size
                if rec.enqueued_at > 0:
                    q.oldest = rec.enqueued_at if q.oldest is None else min(q.oldest,
                                                                            rec.enqueued_at)
        return q

    def delivered(self, since: float | None = None) -> Delivered:
        """The newest done record's commit time (its file's mtime) and, with *since*, the
        items and bytes committed since then."""
        d = Delivered()
        for entries in _groups(self._dir("done")).values():
            d.records += len(entries)
            try:
                mtime = entries[0].stat(follow_symlinks=False).st_mtime
            except OSError:
                continue
            d.newest = mtime if d.newest is None else max(d.newest, mtime)
            if since is not None and mtime >= since:
                d.items_since += len(entries)
                d.bytes_since += sum(r.size for r in self._records(entries))
        return d

    def failed(self) -> Failed:
        """Parked items by reason class; the newest one's reason."""
        f = Failed()
        reasons: Counter[str] = Counter()
        groups = _groups(self._dir("failed"))
        for entries in groups.values():
            f.items += len(entries)
            if f.items > _MAX_FAILED_READ:
                reasons["other"] += len(entries)
                continue
            for rec in self._records(entries):
                reasons[reason_class(rec.last_error)] += 1
                when = rec.retried_at or rec.enqueued_at
                if when >= f.last_at:
                    f.last_at, f.last_error = when, rec.last_error
        f.by_reason = dict(reasons)
        return f

    def owners(self, now: float | None = None) -> list[str]:
        """The senders that hold the spool now (live owner files)."""
        return live_owners(self._dir("owners"), lease_seconds=self.lease_seconds,
                           now=time.time() if now is None else now)

    def counts(self) -> dict[str, int]:
        """Records per state, as ``Spool.counts`` gives them (one listing each)."""
        out = {}
        for state in ("new", "claimed", "done", "failed"):
            n = 0
            try:
                with os.scandir(self._dir(state)) as it:
                    for _ in it:
                        n += 1
            except (FileNotFoundError, NotADirectoryError):
                pass
            out[state] = n
        return out
