"""Receiving: the arrival monitor that verifies what senders put in the incoming area,
publishes it, and answers.

For a stream whose published directory is *D* (``[data_stream] directory``) and whose
incoming area is *I* (``[incoming] incoming_dir``), see :mod:`mstm.protocol` for the
files.  A sender puts a batch in ``I/<batch>/`` and then its control file
``I/<batch>.<control_ext>``; the receiver checks every item in private staging,
publishes the good ones in D atomically (nothing is ever replaced unless
``[incoming] overwrite``, nothing half-written is ever visible), and writes a receipt
that says, per item: ok, bad-size, bad-checksum, missing, io-error or refused.  A
thank-you from the sender then removes the batch.

Where each part lives, in the order a newcomer meets them:

* ``receiver.py``   -- :class:`Receiver`: open/close, one pass over I, --once and
  --follow, the dispatch of each handshake file (a failure quarantines it, never
  stops the others), mstm's control and thank-you files, the receipt;
* ``batch.py``      -- the items of one control file: staged, checked (size, digest),
  flushed to disk together, renamed into D;
* ``mistamover.py`` -- MiStaMover's handshake files, answered during a migration;
* ``cleanup.py``    -- crash leftovers, answers never acknowledged, and the rule that a
  housekeeping failure is logged, never fatal;
* ``abandoned.py``  -- batch directories a killed sender left without a control file;
* ``survey.py``     -- has anything in a tree changed since a given time (no link
  followed, no mount entered);
* ``areas.py``      -- I, D, staging and quarantine, opened once, reached by descriptors;
* ``settings.py``   -- :class:`Settings` (from the stream's configuration) and the
  :class:`Summary` of a run.

The filesystem primitives (no-follow opens, rename without replacing, syncfs, removing
a tree) are mstm.safefs's; the stop, watchdog and waits are mstm.runloop's.
"""

from mstm.receive.areas import AlreadyRunning
from mstm.receive.receiver import Receiver
from mstm.receive.settings import Settings, Summary

__all__ = ["AlreadyRunning", "Receiver", "Settings", "Summary"]
