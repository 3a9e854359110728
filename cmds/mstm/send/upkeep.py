"""A stream's upkeep, done by the sender itself: stuck items, and pruning done/.

* **Stuck**: an item queued for longer than ``[data_stream] stuck_after`` (default 1 h)
  gets one journal warning (MSTM_EVENT=stuck, with the cause: the target unreachable,
  the stream paused, the item's last error, or plainly waiting).  "One" holds across
  restarts and across the processes sharing a spool: the warned ids are kept in
  state.json (at most _WARNED_MAX, forgotten once the item leaves the queue).  Looked at
  once a minute at most (once per --once run).
* **done/**: the record of a delivered item is kept ``done_retention`` (default 30 days),
  then pruned, once an hour at most (when, is kept in state.json).  In mirror mode a
  record is what stops a second sending of a source that is still there, so a record
  is kept, whatever its age, as long as its source is there unchanged; only the records
  of versions that are gone are pruned.  Move mode deletes a source before it commits,
  so its records are history only.
"""

from __future__ import annotations

import contextlib
import logging
import os
import time
from collections.abc import Callable

from mstm import humanize, safefs
from mstm.config import StreamConfig
from mstm.log import event, show
from mstm.spool import ItemRecord, Spool

log = logging.getLogger("mstm.send")

STUCK_LOOK_EVERY = 60.0  # seconds between two looks for stuck items (follow)
PRUNE_EVERY = 3600.0  # seconds between two prunings of done/
_WARNED_MAX = 1000  # ids remembered in state.json as warned about
_WARN_MAX_PER_LOOK = 20  # individual warnings per look; the rest are counted in one line


class Upkeep:
    """The stuck look and the pruning of one stream; :meth:`run` does what is due."""

    def __init__(self, stream: StreamConfig, spool: Spool,
                 clock: Callable[[], float] = time.time) -> None:
        self.stream = stream
        self.spool = spool
        self.clock = clock
        self.stuck = 0  # items stuck at the last look
        self._looked = 0.0
        self._look_took = 0.0  # seconds the last look took
        self._pruned_at = -PRUNE_EVERY  # when done/ was last pruned, as far as we know
        self._root_fd = -1

    def run(self, cause: str | None = None, *, force: bool = False) -> None:
        """The stuck look if a minute has passed (or *force*), the pruning if an hour has
        (by state.json, so a cron run prunes too).  *cause*: why nothing moves, if the
        sender knows (target unreachable, paused)."""
        now = self.clock()
        # a look reads every queued record: with a deep queue it takes seconds, so it is
        # spaced to cost at most 2 % of the time (50 x its own duration)
        every = max(min(STUCK_LOOK_EVERY, self.stream.stuck_after / 4), 50 * self._look_took)
        if force or now - self._looked >= every:
            self._looked = now
            started = time.monotonic()
            self.look_for_stuck(now, cause)
            self._look_took = time.monotonic() - started
        self.prune_if_due(now)

    # -- stuck --------------------------------------------------------------------
    def look_for_stuck(self, now: float, cause: str | None = None) -> int:
        """Warn once about each item queued longer than stuck_after; how many are."""
        limit = now - self.stream.stuck_after
        if self.spool.count("new") == 0:
            self.stuck = 0
            state = self.spool.load_state()
            if state.get("stuck_warned") or state.get("stuck_more_said"):
                self._remember([], 0)
            return 0
        stuck = [r for r in self.spool.iter_records("new") if 0 < r.enqueued_at <= limit]
        self.stuck = len(stuck)
        state = self.spool.load_state()
        old = state.get("stuck_warned", [])
        warned = {i for i in old if isinstance(i, str)} if isinstance(old, list) else set()
        fresh = [r for r in sorted(stuck, key=lambda r: r.enqueued_at) if r.id not in warned]
        room = max(0, min(_WARN_MAX_PER_LOOK, _WARNED_MAX - len(warned & {r.id for r in stuck})))
        named, unnamed = fresh[:room], len(fresh) - room
        for r in named:
            why = cause or (f"its last attempt failed: {r.last_error}" if r.attempts and
                            r.last_error else "waiting to be sent")
            log.warning("%s: %s queued for %s (since %s): %s", self.stream.name,
                        show(r.relpath), humanize.duration(now - r.enqueued_at),
                        humanize.clock(r.enqueued_at), why,
                        extra=event("stuck", stream=self.stream.name, item=r.relpath,
                                    reason=why, attempt=r.attempts or None))
        # The items not named get one line, said again only when their number has doubled:
        # a backlog of a million is a few lines, never a flood.
        said = state.get("stuck_more_said", 0)
        said = said if isinstance(said, int) else 0
        if unnamed > 0 and unnamed >= 2 * said:
            log.warning("%s: %d more item(s) queued for longer than %s", self.stream.name,
                        unnamed, humanize.duration(self.stream.stuck_after),
                        extra=event("stuck", stream=self.stream.name,
                                    reason=cause or "waiting to be sent"))
            said = unnamed
        elif unnamed == 0:
            said = 0
        # only the items named are remembered (at most _WARNED_MAX, while they are stuck):
        # the others are named at later looks, oldest first, while there is room
        still = {r.id for r in stuck}
        kept = [i for i in warned if i in still] + [r.id for r in named]
        if set(kept) != warned or said != state.get("stuck_more_said", 0):
            self._remember(kept[:_WARNED_MAX], said)
        return self.stuck

    def _remember(self, warned: list[str], more_said: int) -> None:
        """Keep in state.json the ids warned about and the count last said (state.lock:
        what others write meanwhile, the backoff, the totals, is kept)."""
        def change(state: dict[str, object]) -> None:
            state["stuck_warned"] = warned
            state["stuck_more_said"] = more_said

        self.spool.update_state(change)

    # -- done/ ----------------------------------------------------------------------
    def prune_if_due(self, now: float) -> int:
        if self.stream.done_retention <= 0 or 0 <= now - self._pruned_at < PRUNE_EVERY:
            return 0  # (known here without reading state.json on every wake-up)
        state = self.spool.load_state()
        last = state.get("done_pruned_at", 0.0)
        if isinstance(last, int | float) and 0 <= now - last < PRUNE_EVERY:
            self._pruned_at = last  # another process, or an earlier run, did it
            return 0
        self._pruned_at = now
        n = self.prune(now)
        self.spool.update_state(lambda state: state.update(done_pruned_at=now))
        return n

    def prune(self, now: float) -> int:
        """Prune the done/ records older than done_retention (mirror: see the module)."""
        keep = self._source_unchanged if self.stream.outgoing.transfer_mode == "mirror" \
            else None
        try:
            root_fd = safefs.open_root(self.stream.directory) if keep else -1
        except OSError as err:
            log.info("%s: done/ not pruned: cannot open the stream directory: %s",
                     self.stream.name, err.strerror or err)
            return 0
        self._root_fd = root_fd
        try:
            if keep is not None and not self._directory_looks_whole(root_fd):
                return 0
            n = self.spool.prune_done(now - self.stream.done_retention, keep=keep)
        finally:
            if root_fd >= 0:
                os.close(root_fd)
        if n:
            log.info("%s: pruned %d done record(s) older than %s", self.stream.name, n,
                     humanize.duration(self.stream.done_retention))
        return n

    def _directory_looks_whole(self, root_fd: int) -> bool:
        """Mirror mode prunes the records of sources that are gone: never while the stream
        directory looks absent (empty: a file system not mounted on it) or has just
        changed file system (mounted or unmounted since the last pruning), or every
        record would go and every source be sent again once it is back."""
        st = os.fstat(root_fd)
        seen = self.spool.load_state().get("directory_dev")
        if seen != st.st_dev:
            self.spool.update_state(lambda state: state.update(directory_dev=st.st_dev))
            if seen is not None:
                log.info("%s: done/ not pruned: the stream directory is on another file "
                         "system than at the last pruning (mounted or unmounted?); next "
                         "time", self.stream.name)
                return False
        with os.scandir(root_fd) as it:
            if next(iter(it), None) is None:
                log.info("%s: done/ not pruned: the stream directory is empty (a file "
                         "system not mounted?)", self.stream.name)
                return False
        return True

    def _source_unchanged(self, rec: ItemRecord) -> bool:
        """Whether the source of *rec* is there as it was sent (no link followed on the
        way; any doubt keeps the record)."""
        follow = self.stream.follow_symlinks and not rec.is_dir
        try:
            dir_fd, name = safefs.open_parent(self._root_fd, rec.relpath)
        except FileNotFoundError:
            return False
        except (OSError, ValueError):
            return True
        try:
            st = os.stat(name, dir_fd=dir_fd, follow_symlinks=follow)
        except FileNotFoundError:
            return False
        except OSError:
            return True
        finally:
            with contextlib.suppress(OSError):
                os.close(dir_fd)
        if rec.is_dir:
            return True
        return (st.st_size, st.st_mtime_ns) == (rec.size, rec.mtime_ns)
