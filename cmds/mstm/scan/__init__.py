"""Scanning: which items of a stream's directory are ready to be sent.

* ``readiness.py`` -- the rules (named like an item, quiet, closed, marked; see its
  docstring, the one place they are stated), the walk, and queueing the ready items in
  the spool.

A stream's own stop file (pausing) is mstm.pause; waiting for changes is mstm.watch.
"""

from mstm.scan.readiness import (
    Candidate,
    ScanReport,
    StreamDirectoryError,
    enqueue_ready,
    marker_for,
    scan,
    scan_and_queue,
)

__all__ = ["Candidate", "ScanReport", "StreamDirectoryError", "enqueue_ready", "marker_for",
           "scan", "scan_and_queue"]
