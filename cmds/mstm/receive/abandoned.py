"""Abandoned batch directories: what a sender killed (or cut off) mid-batch leaves in I.

A sender killed while it pushes a batch leaves ``I/<batch>/`` without a control file,
and never sends into it again (a re-send is a new batch).  Such a directory -- named like
a batch, with no control file, receipt or thank-you, not the stop file, and in which no
entry at any depth has changed (the later of mtime and ctime, see mstm.receive.survey)
for ``[incoming] abandoned_batch_seconds`` -- is removed: renamed aside to
``I/.mstm-abandoned-<batch>-<random>`` (so that the batch name is gone at one instant),
looked at again there, then removed from I's descriptor, iteratively (see
safefs.remove_tree: no depth or path-length limit, a symbolic link is never followed).
A control file that appears meanwhile, or a change in the tree, puts it back.  The
incoming area is looked at for them at start-up and then at most every tenth of that
time, with a bounded number of entries examined per look.
"""

from __future__ import annotations

import bisect
import logging
import os
import secrets
import stat
import time
from collections.abc import Callable
from contextlib import suppress

from mstm import humanize, protocol
from mstm.log import event, show
from mstm.receive.areas import Areas
from mstm.receive.cleanup import WarnOnce, housekeeping
from mstm.receive.settings import Summary
from mstm.receive.survey import Survey, changed_at, survey
from mstm.runloop import RunLoop
from mstm.safefs import mount_id, remove_tree, rename_noreplace

log = logging.getLogger("mstm.receive")

# Abandoned batch directories are renamed to this prefix (+ batch + random) before removal.
ABANDONED_PREFIX = ".mstm-abandoned-"
# Entries examined per look (the first directory looked at is always examined to its
# end, so that every one is eventually decided).
ABANDONED_BUDGET = 100_000


class AbandonedBatches:
    """Finds and removes the abandoned batch directories of I, a bounded look at a time."""

    def __init__(self, areas: Areas, loop: RunLoop, warn_once: WarnOnce) -> None:
        self.areas = areas
        self.s = areas.s
        self.loop = loop
        self.warn_once = warn_once
        # when to look next (time.monotonic(); 0: at the first pass), whether a look is
        # due before the usual interval, where the last look stopped
        self.next_look = 0.0
        self.pending = False
        self._from = ""
        self.clock: Callable[[], float] = time.time  # wall clock, for file times

    def interval(self) -> float:
        return self.s.abandoned_batch_seconds / 10

    def look_if_due(self, names: list[str], summary: Summary, now: float) -> float | None:
        """Look for abandoned batches if a look is due at *now* (time.monotonic());
        *names*: I's listing.  Returns in how many seconds the next look is due, None if
        nothing calls for one before the usual interval (or the removal is disabled)."""
        if self.s.abandoned_batch_seconds <= 0 or self.loop.stopping:
            return None
        if now >= self.next_look:
            # None: nothing to look at again before the usual interval
            wait = housekeeping(self.s.stream, "look_for_abandoned", self.look, summary)
            self.pending = wait is not None
            self.next_look = time.monotonic() + (
                wait if wait is not None else self.interval())
        elif not self.pending and self.candidates(names):
            self.pending = True  # one came since the last look
        if not self.pending:
            return None
        return max(0.0, self.next_look - time.monotonic())  # wake up for it (follow)

    def look(self, summary: Summary) -> float | None:
        """Remove the abandoned batch directories of I (see the module's docstring).

        Candidates are found from I's listing alone: a directory named like a batch, not
        the stop file, and no name in I that starts with "<batch>." or ".<batch>." (its
        control file, receipt, thank-you, their temporary names, a MiStaMover control
        file).  One whose own mtime and ctime are recent is passed over without a look
        inside; the others are examined to the bottom, ABANDONED_BUDGET entries in all
        (but the first to its end); the next look goes on where this one stopped.
        Returns in how many seconds to look again (something may be abandoned by then, or
        this look was cut short), None if nothing calls for it.
        """
        i_fd = self.areas.i_fd
        limit = self.s.abandoned_batch_seconds
        interval = self.interval()
        names = self.areas.listdir()
        self.warn_once.keep_only(set(names))
        self.remove_set_aside(names)
        candidates = self.candidates(names)
        start = bisect.bisect_left(candidates, self._from)
        self._from = ""
        try:
            i_dev = os.fstat(i_fd).st_dev
        except OSError:
            return None
        i_mount = mount_id(i_fd)
        now = self.clock()
        since = now - limit
        budget = ABANDONED_BUDGET
        first = True
        wake: float | None = None  # (wall clock) when one may have become abandoned
        for name in candidates[start:] + candidates[:start]:
            if self.loop.stopping:
                self._from = name
                return interval
            try:
                st = os.stat(name, dir_fd=i_fd, follow_symlinks=False)
            except OSError:
                continue
            if not stat.S_ISDIR(st.st_mode):
                continue
            changed = changed_at(st, now)
            if changed > since and st.st_dev == i_dev:  # cheap: it changed itself lately
                wake = changed + limit if wake is None else min(wake, changed + limit)
                continue
            if not first and budget <= 0:
                self._from = name
                return interval
            found = survey(i_fd, name, dev=i_dev, mount=i_mount, since=since, now=now,
                           budget=None if first else budget, tick=self._tick_alive)
            first = False
            budget -= found.entries
            if found.verdict == "fresh":
                due = found.newest + limit
                wake = due if wake is None else min(wake, due)
            elif found.verdict == "unfinished":
                self._from = name
                return interval
            elif found.verdict == "foreign":
                self.warn_once(name, "%s: %s looks like an abandoned batch directory but is"
                               " left alone: %s", show(name), found.detail)
            elif found.verdict == "old":
                self._remove(name, found, i_dev, i_mount, summary)
        if wake is None:
            return None
        return max(interval, wake - self.clock())

    def candidates(self, names: list[str]) -> list[str]:
        """The names in I's listing *names* that may be abandoned batch directories (by
        their names alone), sorted."""
        referenced = {n.lstrip(".").split(".", 1)[0] for n in names
                      if "." in n.lstrip(".")}
        # only the exact shape mstm-send's batch names have: a directory such as
        # "proj2" or "2024-01-01" (another stream's area, an operator's) is never taken
        return sorted(n for n in names if protocol.OUR_BATCH_RE.match(n)
                      and n != self.s.stop_file and n not in referenced)

    def remove_set_aside(self, names: list[str]) -> None:
        """Batch directories set aside for removal, left by a crash or a failed rmtree."""
        for name in names:
            if name.startswith(ABANDONED_PREFIX):
                try:
                    remove_tree(name, self.areas.i_fd, self._tick)
                except OSError as err:
                    self.warn_once(name, "%s: cannot remove %s: %s; tried again later",
                                   show(name), err)

    def _tick_alive(self) -> bool:
        self.loop.tick()
        return not self.loop.stopping

    def _tick(self) -> bool:
        self.loop.tick()
        return True

    def _handshake_present(self, batch: str) -> bool:
        """Does a control file, receipt or thank-you of *batch* exist now (or a MiStaMover
        control file for an item of that name)?"""
        s = self.s
        names = [f"{batch}.{ext}" for ext in (s.control_ext, s.receipt_ext, s.thanks_ext)]
        names.append(protocol.mistamover_control_name(batch, control_ext=s.control_ext))
        for name in names:
            try:
                os.stat(name, dir_fd=self.areas.i_fd, follow_symlinks=False)
            except FileNotFoundError:
                continue
            except OSError:
                pass
            return True
        return False

    def _remove(self, batch: str, found: Survey, i_dev: int, i_mount: str | None,
                summary: Summary) -> None:
        """Remove I/<batch>, found unchanged since found.newest: rename it aside (the
        batch name is gone at once), look again (a change since, or a control file
        meanwhile, and it is put back), then rmtree relative to I's descriptor."""
        s, i_fd = self.s, self.areas.i_fd
        if self._handshake_present(batch):
            return
        aside = f"{ABANDONED_PREFIX}{batch}-{secrets.token_hex(4)}"
        try:
            rename_noreplace(batch, aside, src_dir_fd=i_fd, dst_dir_fd=i_fd)
        except FileNotFoundError:
            return
        except OSError as err:
            self.warn_once(batch, "%s: cannot remove abandoned batch %s: %s", batch,
                           err.strerror or err)
            return
        again = survey(i_fd, aside, dev=i_dev, mount=i_mount, since=found.newest,
                       now=self.clock(), budget=None, tick=self._tick, root_ctime=False)
        if again.verdict == "gone":  # not ours to remove any more
            return
        if again.verdict != "old" or self._handshake_present(batch):
            try:
                rename_noreplace(aside, batch, src_dir_fd=i_fd, dst_dir_fd=i_fd)
            except OSError as err:
                # the name was taken again meanwhile: what we set aside goes (a control
                # file for it is answered "missing", and its items are sent again)
                log.warning("%s: batch %s changed while being removed and cannot be put"
                            " back: %s", s.stream, batch, err.strerror or err)
            else:
                log.info("%s: batch %s changed while being removed; left in place",
                         s.stream, batch)
                return
        try:
            remove_tree(aside, i_fd, self._tick)  # iterative, never follows a link
        except OSError as err:
            self.warn_once(aside, "%s: cannot remove abandoned batch %s (set aside as %s):"
                           " %s; tried again later", batch, aside, err)
            return
        with suppress(OSError):
            os.fsync(i_fd)
        age = self.clock() - found.newest
        summary.abandoned += 1
        log.warning("%s: batch %s abandoned (no control file, nothing in it changed for %s);"
                    " removed its directory: %d bytes in %d entries", s.stream, batch,
                    humanize.duration(age), again.bytes, again.entries,
                    extra=event("abandoned_batch_removed", stream=s.stream, item=batch,
                                bytes=again.bytes, reason=f"unchanged for {age:.0f} s"))
