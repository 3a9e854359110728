"""The durable per-stream queue: Maildir-style, every state change one rename(2) or link(2).

One spool directory per stream holds each item's record in new/ (waiting), claimed/
(held by one sender), done/ (verified at the target) or failed/ (given up).  Where to
read what:

* spool.py    -- Spool: open and close, enqueue, claim, complete, retry, release, drop,
  takeover, inspection and upkeep; the guarantees every state change keeps.
* records.py  -- ItemRecord, Claim, item_id; the format of record files, their parse
  cache, and read_records (a read-only reader of one state directory).
* files.py    -- the layout of a spool directory (SpoolFiles): temporary files,
  spool.lock and scan.lock, reading and quarantining records, state.json; the small
  directory helpers (fsync, list, rename).
* owners.py   -- owner names, pid liveness, leases (Leases): heartbeat, lost leases, the
  takeover of dead or silent owners' claims.
* claims.py   -- the claim order (ClaimQueue): which waiting records a claim looks at.
* errors.py   -- SpoolError, SpoolBusy.

This module re-exports the names other packages import.
"""

from __future__ import annotations

from mstm.spool.errors import SpoolBusy, SpoolError
from mstm.spool.files import STATES
from mstm.spool.records import Claim, ItemRecord, item_id, read_records
from mstm.spool.spool import Spool

__all__ = [
    "STATES",
    "Claim",
    "ItemRecord",
    "Spool",
    "SpoolBusy",
    "SpoolError",
    "item_id",
    "read_records",
]
