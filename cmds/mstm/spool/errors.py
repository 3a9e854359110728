"""The spool's errors: SpoolError (the spool can't be used) and SpoolBusy (locked)."""

from __future__ import annotations

from mstm.errors import EXIT_IOERR, MstmError


class SpoolError(MstmError):
    """The spool can't be used (layout, permissions, I/O): exit status 74, one line."""

    exit_code = EXIT_IOERR


class SpoolBusy(SpoolError):
    """Another process holds the lock (scan.lock)."""
