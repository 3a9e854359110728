"""Prometheus text files for node_exporter's textfile collector.

Each long-running command writes one file into ``[global] metrics_dir`` (default
``/var/lib/mstm/metrics``, a directory of user mstm; empty: none):
``mstm_send_<stream>.prom``, ``mstm_receive_<stream>.prom``, ``mstm_diskwatch.prom``.
Not Debian's ``/var/lib/prometheus/node-exporter``: root's collectors write there with
``sponge``, which follows symbolic links, so a service user able to write that directory
could make root overwrite any file (mstm(7), "Metrics", says how to point node_exporter
at mstm's directory, or link its files into Debian's).

The text comes from prometheus_client (``generate_latest``); the file is written here,
not by its ``write_to_textfile``, for two reasons: that function leaves the file with
the process umask (the units' UMask=0027 gives 0640 mstm:mstm, which Debian's
node_exporter, running as user prometheus, cannot read), and its temporary name
(``<path>.<pid>.<thread>``) is predictable and opened following symbolic links.
:func:`mstm.smallfiles.replace_file` writes a ``mkstemp`` file (O_EXCL, a random name),
makes it 0644 and renames it over the final name: a scrape never sees half a file.
Written after each batch and at least once a minute, at most once a second (or less
often when a look at a deep spool takes long: see :class:`TextFile`).  A directory that
is missing or not writable costs one warning, never the transfer.  Every metric is
listed in mstm(7), "Metrics".
"""

from __future__ import annotations

import logging
import re
import time
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path

from prometheus_client import CollectorRegistry
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.exposition import generate_latest
from prometheus_client.registry import Collector

from mstm.diskwatch.report import FsReport
from mstm.overview.snapshot import (
    PAUSE_REASONS,
    AreaSnapshot,
    StreamSnapshot,
    count,
    time_value,
)
from mstm.overview.spoolview import REASONS
from mstm.smallfiles import replace_file

log = logging.getLogger("mstm.metrics")

MIN_INTERVAL = 1.0  # seconds: no two writes closer than this (small-file batches)
MAX_INTERVAL = 50.0  # seconds: with the loops waking at least once a minute, a write a minute
COST_FACTOR = 10.0  # a write costing t seconds waits at least COST_FACTOR * t for the next

#: The disk levels of mstm-diskwatch as numbers (mstm.diskwatch.levels.Level).
DISK_LEVELS = {"VLOW": 0, "LOW": 1, "OKAY": 2, "GOOD": 3}


def file_name(kind: str, name: str = "") -> str:
    """``mstm_<kind>_<name>.prom`` (a name's odd characters become "_")."""
    safe = re.sub(r"[^A-Za-z0-9_.-]", "_", name)
    return f"mstm_{kind}_{safe}.prom" if name else f"mstm_{kind}.prom"


# ------------------------------------------------------------------------- the metrics


def stream_families(snaps: Iterable[StreamSnapshot]) -> list[Metric]:
    """The metric families of push and pull streams (label ``stream``)."""
    def g(name: str, doc: str, labels: Sequence[str] = ("stream",)) -> GaugeMetricFamily:
        return GaugeMetricFamily(name, doc, labels=list(labels))

    def c(name: str, doc: str, labels: Sequence[str] = ("stream",)) -> CounterMetricFamily:
        return CounterMetricFamily(name, doc, labels=list(labels))

    items = g("mstm_queue_items", "Items waiting to be delivered (new and claimed).")
    size = g("mstm_queue_bytes", "Bytes of the items waiting to be delivered.")
    age = g("mstm_queue_oldest_age_seconds",
            "Seconds the oldest waiting item has been queued (0 if none), when the file"
            " was written (alert on the timestamp below: this one freezes if the writer"
            " stops).")
    enq = g("mstm_queue_oldest_enqueued_timestamp_seconds",
            "When the oldest waiting item was queued (unix time; 0 if none).")
    done = c("mstm_delivered_items", "Items verified at the target, since the stream began.")
    done_b = c("mstm_delivered_bytes", "Bytes verified at the target, since the stream began.")
    fails = c("mstm_failures", "Items given up (parked in failed/), by reason class.",
              ("stream", "reason"))
    parked = g("mstm_failed_items", "Items parked in failed/ now, by reason class.",
               ("stream", "reason"))
    last = g("mstm_last_success_timestamp_seconds",
             "When the last item was verified at the target (unix time; 0: never).")
    backoff = g("mstm_backoff", "1 while the stream backs off from an unreachable target.")
    until = g("mstm_backoff_until_timestamp_seconds",
              "When the backoff ends (unix time; 0: not backing off).")
    paused = g("mstm_paused", "1 while the stream is paused, for that reason.",
               ("stream", "reason"))
    down = g("mstm_target_unreachable", "1 while the last try to reach the target failed.")
    for s in snaps:
        n = s.stream
        items.add_metric([n], s.queued_items)
        size.add_metric([n], s.queued_bytes)
        age.add_metric([n], round(s.oldest_age(), 3))
        enq.add_metric([n], s.oldest_queued or 0.0)
        done.add_metric([n], s.delivered_total_items)
        done_b.add_metric([n], s.delivered_total_bytes)
        for r in REASONS:
            fails.add_metric([n, r], s.failures_total.get(r, 0))
            parked.add_metric([n, r], s.failed_by_reason.get(r, 0))
        last.add_metric([n], s.last_delivery or 0.0)
        step = count(s.backoff.get("step"))
        backoff.add_metric([n], 1 if step else 0)
        until.add_metric([n], time_value(s.backoff.get("until")) if step else 0.0)
        for r in PAUSE_REASONS:
            paused.add_metric([n, r], 1 if s.pause_reason == r else 0)
        down.add_metric([n], 1 if s.target_unreachable else 0)
    return [items, size, age, enq, done, done_b, fails, parked, last, backoff, until, paused, down]


def area_families(snaps: Iterable[AreaSnapshot]) -> list[Metric]:
    """The metric families of receiving areas (label ``stream``)."""
    waiting = GaugeMetricFamily("mstm_receive_waiting_batches",
                                "Batches whose control file is not answered yet.",
                                labels=["stream"])
    aside = GaugeMetricFamily("mstm_receive_set_aside",
                              "Entries set aside in the incoming area's .quarantine/.",
                              labels=["stream"])
    items = CounterMetricFamily("mstm_received_items", "Items verified and published.",
                                labels=["stream"])
    size = CounterMetricFamily("mstm_received_bytes", "Bytes verified and published.",
                               labels=["stream"])
    refused = CounterMetricFamily("mstm_receive_refusals",
                                  "Items answered other than ok, by answer.",
                                  labels=["stream", "reason"])
    last = GaugeMetricFamily("mstm_last_success_timestamp_seconds",
                             "When the last item was published (unix time; 0: never).",
                             labels=["stream"])
    paused = GaugeMetricFamily("mstm_paused", "1 while senders are told to pause.",
                               labels=["stream", "reason"])
    for a in snaps:
        waiting.add_metric([a.stream], a.waiting_batches)
        aside.add_metric([a.stream], a.set_aside)
        items.add_metric([a.stream], a.published_total_items)
        size.add_metric([a.stream], a.published_total_bytes)
        for status in ("bad-size", "bad-checksum", "missing", "io-error", "refused"):
            refused.add_metric([a.stream, status], a.refused_total.get(status, 0))
        last.add_metric([a.stream], a.last_publish or 0.0)
        paused.add_metric([a.stream, "local_stop_file"], 1 if a.paused else 0)
    return [waiting, aside, items, size, refused, last, paused]


def disk_families(filesystems: Iterable[FsReport]) -> list[Metric]:
    """The metric families of mstm-diskwatch (label ``mount``), from its FsReports."""
    used = GaugeMetricFamily("mstm_disk_used_ratio",
                             "Used fraction of the file system (0 to 1).", labels=["mount"])
    free = GaugeMetricFamily("mstm_disk_free_bytes", "Bytes free to unprivileged writers.",
                             labels=["mount"])
    total = GaugeMetricFamily("mstm_disk_size_bytes", "Size of the file system.",
                              labels=["mount"])
    level = GaugeMetricFamily("mstm_disk_level",
                              "The file system's level: 0 VLOW, 1 LOW, 2 OKAY, 3 GOOD.",
                              labels=["mount"])
    for fs in filesystems:
        mount, size, avail = fs.mount, fs.total, fs.free
        used.add_metric([mount], round(1 - avail / size, 6) if size else 0.0)
        free.add_metric([mount], avail)
        total.add_metric([mount], size)
        level.add_metric([mount], DISK_LEVELS.get(fs.level, -1))
    return [used, free, total, level]


class _Families(Collector):
    def __init__(self, families: list[Metric]) -> None:
        self.families = families

    def collect(self) -> Iterable[Metric]:
        return self.families


def render_families(families: list[Metric]) -> str:
    """The families in the text format (what the file holds), for tests and --json."""
    registry = CollectorRegistry(auto_describe=False)
    registry.register(_Families(families))
    return generate_latest(registry).decode("utf-8")


# ------------------------------------------------------------------------- the file


class TextFile:
    """One .prom file, rewritten at most every MIN_INTERVAL and at least every
    MAX_INTERVAL (the caller asks often; :meth:`due` says when to).  A write that took t
    seconds (a deep spool to look at) puts the next at least COST_FACTOR * t later, so a
    look never takes more than about a tenth of the time.  Write errors: one warning
    (again only once writing worked in between), never raised."""

    def __init__(self, directory: Path | None, name: str, *,
                 clock: Callable[[], float] = time.monotonic,
                 min_interval: float = MIN_INTERVAL, max_interval: float = MAX_INTERVAL
                 ) -> None:
        self.path = directory / name if directory else None
        self.clock = clock
        self.min_interval = min_interval
        self.max_interval = max_interval
        self.last: float | None = None  # when the last write began (clock)
        self.cost = 0.0  # seconds the last write took
        self.writes = 0
        self.failing = False
        self.pending = False  # a change not written yet (throttled)

    @property
    def enabled(self) -> bool:
        return self.path is not None

    def due(self, *, changed: bool) -> bool:
        """Whether a write is due now: *changed* (a batch ended) and the minimum gap is
        over, or the maximum gap is."""
        self.pending = self.pending or changed
        if self.last is None:
            return True
        gap = self.clock() - self.last
        if gap >= self.max_interval:
            return True
        return self.pending and gap >= self._min_gap()

    def _min_gap(self) -> float:
        return max(self.min_interval, COST_FACTOR * self.cost)

    def wait(self) -> float | None:
        """Seconds until a change held back by the throttle may be written (the caller
        wakes then and asks again), or None if none is held back."""
        if not self.pending or self.last is None:
            return None
        return max(0.0, self.last + self._min_gap() - self.clock())

    def write(self, families: Callable[[], list[Metric]]) -> bool:
        """Build the families and write the file now; False if it could not be written."""
        self.last = self.clock()
        self.pending = False
        t0 = time.monotonic()
        try:
            built = families()
            if self.path is None:
                return False
            registry = CollectorRegistry(auto_describe=False)
            registry.register(_Families(built))
            replace_file(self.path, generate_latest(registry), mode=0o644)
        except Exception as err:  # never the transfer's end: one warning, go on
            why = err.strerror if isinstance(err, OSError) and err.strerror else err
            if not self.failing:
                log.warning("cannot write metrics file %s: %s (the transfer goes on; set "
                            "[global] metrics_dir, or empty it to write none)", self.path,
                            why)
            self.failing = True
            return False
        finally:
            self.cost = time.monotonic() - t0
        if self.failing:
            log.info("metrics file %s written again", self.path)
        self.failing = False
        self.writes += 1
        return True
