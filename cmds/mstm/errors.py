"""Exit codes and the exceptions that map to them.

Every command turns these into one line on stderr and a distinct exit code
(see mstm(7), "EXIT STATUS").  Nothing else may end a command with a traceback.
"""

from __future__ import annotations

from typing import NoReturn

EXIT_OK = 0
EXIT_ITEMS_FAILED = 1  # some items were parked as failed; the rest were delivered
EXIT_USAGE = 2  # click's own code for bad command-line usage
EXIT_NOT_IMPLEMENTED = 69  # EX_UNAVAILABLE: this command is not built yet
EXIT_SOFTWARE = 70  # EX_SOFTWARE: a bug; the message says where
EXIT_IOERR = 74  # EX_IOERR: the spool cannot be used (permissions, I/O, its filesystem)
EXIT_TEMPFAIL = 75  # EX_TEMPFAIL: the target could not be reached; try again later
EXIT_NOPERM = 77  # EX_NOPERM: root on a spool another user owns (run it as that user)
EXIT_CONFIG = 78  # EX_CONFIG: the configuration is wrong


class MstmError(Exception):
    """An error with a message meant for the operator and an exit code."""

    exit_code = EXIT_SOFTWARE

    def __init__(self, message: str, *, hint: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.hint = hint


class ConfigError(MstmError):
    """A configuration problem, always naming file, section, key and reason."""

    exit_code = EXIT_CONFIG

    def __init__(
        self,
        reason: str,
        *,
        file: str | None = None,
        section: str | None = None,
        key: str | None = None,
        hint: str | None = None,
    ) -> None:
        self.file = file
        self.section = section
        self.key = key
        self.reason = reason
        where = []
        if file:
            where.append(str(file))
        if section:
            where.append(f"[{section}]" + (f" {key}" if key else ""))
        elif key:
            where.append(key)
        super().__init__(": ".join([*where, reason]), hint=hint)


class TargetUnavailable(MstmError):
    """The target host or its service could not be reached."""

    exit_code = EXIT_TEMPFAIL


class NotImplementedYet(MstmError):
    exit_code = EXIT_NOT_IMPLEMENTED


def die(message: str, *, hint: str | None = None, code: int = EXIT_SOFTWARE) -> NoReturn:
    err = MstmError(message, hint=hint)
    err.exit_code = code
    raise err
