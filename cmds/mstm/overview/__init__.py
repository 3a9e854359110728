"""Every stream at a glance: ``--status`` tables and Prometheus metrics files.

* spoolview.py -- a read-only look at one spool directory (queue, done, failed, owners),
  fast on deep queues (one listing, one stat per record file);
* snapshot.py  -- one stream (push or pull) or receiving area as a snapshot: its state
  (running, idle, paused and why, backing off until when, failing), queue, last
  verified delivery, the last 24 hours, parked items; JSON with ISO 8601 times;
* table.py     -- snapshots as an aligned table, and as one JSON document;
* metrics.py   -- the metric families (names and meanings: mstm(7), "Metrics") and the
  throttled, atomic writing of a .prom file for node_exporter's textfile collector;
* live.py      -- the hooks a running Sender, Puller, Receiver and mstm-diskwatch call:
  they keep the totals that survive restarts and write the metrics file.

Nothing below the command line imports this package: the commands hand a hook to the
stage that runs (``Sender.on_progress``, ``Puller.on_cycle``, ``Receiver.on_pass``).
"""

from __future__ import annotations

from mstm.overview.snapshot import (
    AreaSnapshot,
    StreamSnapshot,
    all_areas,
    all_streams,
    area_snapshot,
    broken_area,
    broken_snapshot,
    checked_area_snapshot,
    checked_stream_snapshot,
    stream_snapshot,
)
from mstm.overview.table import render_areas, render_streams, to_document

__all__ = ["AreaSnapshot", "StreamSnapshot", "all_areas", "all_streams", "area_snapshot",
           "broken_area", "broken_snapshot", "checked_area_snapshot",
           "checked_stream_snapshot", "render_areas", "render_streams",
           "stream_snapshot", "to_document"]
