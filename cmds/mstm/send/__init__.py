"""Sending: the stage that delivers a stream's queued items to its target.

Where each step lives, in the order of a delivery:

* ``sender.py``    -- :class:`Sender`: the loop (scan, claim a batch, send, verify,
  publish, finish, commit), every retry/release/park decision, --once and --follow;
* ``digests.py``   -- size and sha256 of what the source holds, while the batch travels;
* ``handshake.py`` -- the target's word on the batch: receiver handshake, or inspection
  of the staging directory;
* ``finish.py``    -- deleting a verified source (move mode), and only that version;
* ``report.py``    -- the run's summary (--json) and the progress line on a terminal.

The transports (mstm.transports) move the bytes; the spool (mstm.spool) holds the queue.
"""

from mstm.send.digests import LocalDigest, compare, local_digest
from mstm.send.report import Summary, TtyProgress, json_path, queued_size
from mstm.send.sender import DEFAULT_MAX_WAIT, Sender

__all__ = ["DEFAULT_MAX_WAIT", "LocalDigest", "Sender", "Summary", "TtyProgress", "compare",
           "json_path", "local_digest", "queued_size"]
