"""``mstm-alert --follow``: read the journal, gather batches, post them, keep the cursor.

The order that keeps anything from being mailed twice or skipped (see :mod:`mstm.alert`):
a closed batch goes into the outbox first, then the cursor of the last entry read is
saved, then the outbox is delivered.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any, Protocol

from mstm.alert.batch import Batch
from mstm.alert.compose import alert_context
from mstm.alert.events import from_entry, is_mstm, threshold_priority
from mstm.alert.postman import CursorStore, Postman
from mstm.config import GlobalConfig
from mstm.runloop import RunLoop

log = logging.getLogger("mstm.alert")


class Source(Protocol):
    """Where --follow reads entries: (cursor, entry) pairs, oldest first."""

    def wait(self, timeout: float) -> None: ...

    def read(self) -> list[tuple[str, Mapping[str, Any]]]: ...


class JournalSource:
    """The local journal, from just after *cursor* (or from its end if there is none)."""

    def __init__(self, cursor: str | None, *, path: Path | None = None) -> None:
        from systemd import journal

        self.reader = journal.Reader(path=str(path)) if path else journal.Reader()
        if cursor:
            try:
                self.reader.seek_cursor(cursor)
                first = self.reader.get_next()
                self._pending = [] if not first or self.reader.test_cursor(cursor) else [first]
                return
            except (OSError, ValueError) as e:
                log.warning("journal cursor not usable (%s): starting at the end", e)
        self.reader.seek_tail()
        self.reader.get_previous()
        self._pending = []

    def wait(self, timeout: float) -> None:
        if not self._pending:
            self.reader.wait(timeout)

    def read(self) -> list[tuple[str, Mapping[str, Any]]]:
        entries, self._pending = self._pending, []
        while len(entries) < 10000:
            entry = self.reader.get_next()
            if not entry:
                break
            entries.append(entry)
        return [(str(e["__CURSOR"]), e) for e in entries]


class Follower:
    """--follow: gather, batch, post, save the cursor, deliver with backoff."""

    def __init__(self, gcfg: GlobalConfig, postman: Postman, source: Source,
                 cursors: CursorStore, *, loop: RunLoop | None = None,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.email = gcfg.email
        self.gcfg = gcfg
        self.postman = postman
        self.source = source
        self.cursors = cursors
        self.loop = loop or RunLoop()
        self.clock = clock
        self.threshold = threshold_priority(gcfg.email.threshold)
        self.batch = Batch(clock=clock)
        self.read_cursor: str | None = None  # the last entry read
        self.saved_cursor: str | None = None
        self.saved_at = 0.0

    def follow(self) -> None:
        """Until the loop is stopped; an open batch is left to be gathered again."""
        self.loop.notifier.ready(self._status())
        self.postman.deliver()  # what an earlier run (or the OnFailure handler) left
        while not self.loop.stopping:
            self.step(self._timeout())
        if not self.batch:
            self._save_cursor()
        self.loop.notifier.stopping()

    def _timeout(self) -> float:
        """How long the next wait for entries may be: until the batch or the next try at
        the outbox is due; at most a second, as the journal's wait cannot be woken by stop()."""
        now = self.clock()
        batch_due = self.batch.opened + self.email.email_timer - now if self.batch else None
        retry_due = self.postman.next_try - now if self.postman.waiting else None
        return self.loop.max_wait(1.0, batch_due, retry_due)

    def step(self, timeout: float) -> None:
        """Wait up to *timeout* for entries, take them in, and do what is due."""
        self.source.wait(timeout)
        for cursor, entry in self.source.read():
            self.read_cursor = cursor
            if is_mstm(entry):
                alert = from_entry(entry)
                if alert.priority <= self.threshold:
                    self.batch.add(alert)
        now = self.clock()
        if self.batch and now >= self.batch.opened + self.email.email_timer:
            self.flush()
        elif not self.batch and now - self.saved_at >= 5.0:
            self._save_cursor()
        if self.postman.due():
            self.postman.deliver()
        self.loop.notifier.status(self._status())
        self.loop.tick()

    def flush(self) -> None:
        """The batch into the outbox (durable), then the cursor past it, then try to send."""
        batch, self.batch = self.batch, Batch(clock=self.clock)
        self.postman.post("alert", alert_context(batch, self.email, self.gcfg.path))
        log.info("%d event(s) in %d kind(s) posted to %s", batch.total, len(batch.groups),
                 ", ".join(self.email.recipient))
        self._save_cursor()
        self.postman.next_try = min(self.postman.next_try, self.clock())
        if self.postman.due():
            self.postman.deliver()

    def _save_cursor(self) -> None:
        self.saved_at = self.clock()
        if self.read_cursor is None or self.read_cursor == self.saved_cursor:
            return
        try:
            self.cursors.save(self.read_cursor)
            self.saved_cursor = self.read_cursor
        except OSError as e:
            log.error("cannot save the journal cursor in %s: %s", self.cursors.path, e)

    def _status(self) -> str:
        waiting = self.postman.waiting
        text = f"{self.batch.total} event(s) gathering" if self.batch else "watching the journal"
        if waiting:
            text += f"; {waiting} mail(s) waiting for {self.email.smarthost}"
        return text
