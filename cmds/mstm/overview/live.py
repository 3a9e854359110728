"""What a running command reports as it goes: the hooks the command line gives to a
Sender, a Puller, a Receiver and mstm-diskwatch's loop.

Each hook is called often (after each batch, on each wake-up) and decides itself when
to act (:class:`~mstm.overview.metrics.TextFile`): it keeps the stream's totals on disk
(delivered items and bytes, failures by reason, the last verified delivery: in the
spool's ``state.json`` for a sender, in ``<spool_dir>/receive-state.json`` for a
receiver; so they survive restarts and the pruning of done/), and writes the metrics
file.  Nothing here may stop a transfer: an error costs a warning.
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

from mstm import pause
from mstm.config import StreamConfig
from mstm.overview.metrics import (
    TextFile,
    area_families,
    disk_families,
    file_name,
    stream_families,
)
from mstm.overview.snapshot import (
    STATE_KEY,
    Live,
    area_snapshot,
    count,
    pull_snapshot,
    push_snapshot,
    read_json,
    receive_state_path,
    time_value,
)
from mstm.overview.spoolview import REASONS, SpoolView, reason_class
from mstm.smallfiles import replace_file

if TYPE_CHECKING:
    from mstm.pull.puller import Puller
    from mstm.receive.settings import Summary as ReceiveSummary
    from mstm.send.sender import Sender

log = logging.getLogger("mstm.metrics")

HOUR = 3600.0
_KEEP_HOURS = 25  # receive-state.json keeps this many hourly buckets


def _add_totals(state: dict[str, Any], items: int, size: int, last: float | None,
                failures: dict[str, int]) -> None:
    """Add to state.json's totals (kept as a sum: several senders may share a spool)."""
    totals = state.get(STATE_KEY)
    if not isinstance(totals, dict):
        totals = {}
    totals["items"] = count(totals.get("items")) + items
    totals["bytes"] = count(totals.get("bytes")) + size
    if last:
        totals["last_at"] = max(time_value(totals.get("last_at")), last)
    fails = totals.get("failures")
    fails = dict(fails) if isinstance(fails, dict) else {}
    for reason, n in failures.items():
        fails[reason] = count(fails.get(reason)) + n
    totals["failures"] = fails
    state[STATE_KEY] = totals


class SendReporter:
    """The hook of a push Sender (``Sender.on_progress``): totals and metrics (the
    metrics file only with *metrics*: a long-running sender, not a one-off run)."""

    def __init__(self, cfg: StreamConfig, sender: Sender, *, metrics: bool = True,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.cfg = cfg
        self.sender = sender
        self.view = SpoolView(cfg.spool_dir, lease_seconds=cfg.outgoing.lease_seconds)
        self.file = TextFile(cfg.metrics_dir if metrics else None,
                             file_name("send", cfg.name), clock=clock)
        self._summary: object = None
        self._seen = (0, 0, 0)  # items, bytes, failures of that summary already counted

    def __call__(self, changed: bool = True) -> float | None:
        """Act if due; seconds until the hook wants to be called again, if it held a
        change back (the sender's loop wakes then)."""
        if self.file.due(changed=changed):
            self.flush()
        return self.file.wait()

    def flush(self) -> None:
        """Keep the totals, then write the metrics file, now."""
        try:
            self._keep_totals()
        except Exception as err:  # never the transfer's end: say it, go on
            log.warning("%s: cannot keep the delivery totals in state.json: %s",
                        self.cfg.name, err)
        if self.file.enabled:
            self.file.write(self._families)
        else:  # totals only: throttled alike
            self.file.last, self.file.pending = self.file.clock(), False

    def _keep_totals(self) -> None:
        s = self.sender.summary
        if s is not self._summary:  # a new run's summary: counted from zero
            self._summary, self._seen = s, (0, 0, 0)
        items, size, failed = len(s.delivered), s.bytes, len(s.failed)
        d_items, d_bytes = items - self._seen[0], size - self._seen[1]
        new_failures: dict[str, int] = {}
        for f in s.failed[self._seen[2]:]:
            r = reason_class(str(f.get("reason", "")))
            new_failures[r] = new_failures.get(r, 0) + 1
        if not (d_items or d_bytes or new_failures):
            return
        last = self.sender.last_delivery
        # under state.lock: the totals of other senders on this spool are kept
        self.sender.spool.update_state(
            lambda state: _add_totals(state, d_items, d_bytes, last, new_failures))
        self._seen = (items, size, failed)

    def _families(self) -> list[Any]:
        sender = self.sender
        reason = sender.paused_reason
        live = Live(paused=reason or None,
                    remote_paused=bool(reason) and pause.is_paused(self.cfg) is None,
                    unreachable=sender.backoff.step > 0,
                    last_delivery=sender.last_delivery)
        return stream_families([push_snapshot(self.cfg, self.view, live=live,
                                              with_done=False)])


class PullReporter:
    """The hook of a Puller (``Puller.on_cycle``): metrics after each cycle."""

    def __init__(self, cfg: StreamConfig, puller: Puller, *,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.cfg = cfg
        self.puller = puller
        # a cycle lists the remote side: seconds apart at least, so none is held back
        self.file = TextFile(cfg.metrics_dir, file_name("send", cfg.name), clock=clock,
                             min_interval=0.0)

    def __call__(self, error: str | None = None, changed: bool = True) -> None:
        if self.file.enabled and self.file.due(changed=changed):
            self.file.write(lambda: self._families(error))

    def _families(self, error: str | None) -> list[Any]:
        snap = pull_snapshot(self.cfg)
        snap.target_unreachable = error is not None
        return stream_families([snap])


class ReceiveReporter:
    """The hook of a Receiver (``Receiver.on_pass``): totals and metrics after a pass
    (the metrics file only with *metrics*: mstm-receive --follow)."""

    def __init__(self, cfg: StreamConfig, *, metrics: bool = True,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.cfg = cfg
        self.state_path = receive_state_path(cfg)
        self.file = TextFile(cfg.metrics_dir if metrics else None,
                             file_name("receive", cfg.name), clock=clock)
        self._warned = False

    def __call__(self, summary: ReceiveSummary | None = None) -> float | None:
        """Keep the totals of a pass, write the metrics file if due; seconds until the
        hook wants to be called again, if it held a change back."""
        changed = bool(summary and (summary.ok or summary.failed or summary.batches))
        if changed and summary is not None:
            try:
                self._keep_totals(summary)
            except Exception as err:  # never the receiver's end: say it, go on
                self._warn(err)
        if not self.file.enabled:
            return None
        if self.file.due(changed=changed):
            self.file.write(lambda: area_families([area_snapshot(self.cfg)]))
        return self.file.wait()

    def _keep_totals(self, summary: ReceiveSummary, now: float | None = None) -> None:
        """Add a pass to receive-state.json.  Every value read goes through a tolerant
        number parser (a malformed file counts from zero); errors are the caller's."""
        now = time.time() if now is None else now
        try:
            state = read_json(self.state_path)
        except OSError as err:  # a link, a FIFO, too large: start again, say it
            self._warn(err)
            state = {}
        state["items"] = count(state.get("items")) + summary.ok
        state["bytes"] = count(state.get("bytes")) + summary.bytes
        if summary.ok:
            state["last_at"] = now
        not_ok = state.get("not_ok")
        not_ok = dict(not_ok) if isinstance(not_ok, dict) else {}
        for status, n in summary.statuses.items():
            if status != "ok":
                not_ok[status] = count(not_ok.get(status)) + n
        state["not_ok"] = not_ok
        hours = state.get("hours")
        hours = dict(hours) if isinstance(hours, dict) else {}
        hour = str(int(now // HOUR * HOUR))
        old = hours.get(hour)
        items, size = (old[0], old[1]) if isinstance(old, list) and len(old) == 2 else (0, 0)
        hours[hour] = [count(items) + summary.ok, count(size) + summary.bytes]
        oldest = now - _KEEP_HOURS * HOUR
        state["hours"] = {h: v for h, v in hours.items()
                          if h.isdigit() and len(h) < 16 and float(h) >= oldest}
        try:
            _write_json(self.state_path, state)
        except OSError as err:
            self._warn(err)

    def _warn(self, err: Exception) -> None:
        if not self._warned:
            why = err.strerror if isinstance(err, OSError) and err.strerror else err
            log.warning("%s: cannot keep the receive totals in %s: %s (receiving goes on)",
                        self.cfg.name, self.state_path, why)
        self._warned = True


def _write_json(path: Path, data: dict[str, Any]) -> None:
    """Replace *path* atomically: a new temporary file (mkstemp: O_EXCL, a random name,
    never a link planted in the spool), then a rename (mstm.smallfiles.replace_file)."""
    path.parent.mkdir(mode=0o750, parents=True, exist_ok=True)
    replace_file(path, (json.dumps(data, sort_keys=True, indent=1) + "\n").encode("utf-8"),
                 mode=0o640)


class DiskReporter:
    """mstm-diskwatch's metrics: one file, after each check."""

    def __init__(self, metrics_dir: Path | None, *,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.file = TextFile(metrics_dir, file_name("diskwatch"), clock=clock,
                             min_interval=0.0)

    def __call__(self, filesystems: list[Any]) -> None:
        if self.file.enabled:
            self.file.write(lambda: disk_families(filesystems))


__all__ = ["REASONS", "DiskReporter", "PullReporter", "ReceiveReporter", "SendReporter",
           "SpoolView"]
