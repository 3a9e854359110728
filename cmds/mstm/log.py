"""One logging set-up for every command.

Under systemd (stderr connected to the journal, as $JOURNAL_STREAM says) records go to
journald natively, with structured fields (MSTM_STREAM, MSTM_ITEM, MSTM_BYTES,
MSTM_PEER, MSTM_RESULT, MSTM_SHA256, MESSAGE_ID); otherwise plain lines with a level go to stderr.
Never both, so nothing is doubled.

Callers attach fields with ``extra=fields(stream=..., item=..., ...)`` and events an
operator may search for with ``extra=event("delivered", ...)``.
"""

from __future__ import annotations

import logging
import os
import sys
from typing import Any

# MESSAGE_IDs (see docs/catalog and mstm(7)); stable forever once released.
MESSAGE_IDS: dict[str, str] = {
    "delivered": "6d1c2b8e0c8a4a5e9f1d7c3b2a190001",
    "failed": "6d1c2b8e0c8a4a5e9f1d7c3b2a190002",
    "retried": "6d1c2b8e0c8a4a5e9f1d7c3b2a190003",
    "paused": "6d1c2b8e0c8a4a5e9f1d7c3b2a190004",
    "resumed": "6d1c2b8e0c8a4a5e9f1d7c3b2a190005",
    "disk_level": "6d1c2b8e0c8a4a5e9f1d7c3b2a190006",
    "diskwatch_deleted": "6d1c2b8e0c8a4a5e9f1d7c3b2a190007",
    "target_unreachable": "6d1c2b8e0c8a4a5e9f1d7c3b2a190008",
    "enqueued": "6d1c2b8e0c8a4a5e9f1d7c3b2a190009",
    "source_deleted": "6d1c2b8e0c8a4a5e9f1d7c3b2a19000a",
    "lease_taken_over": "6d1c2b8e0c8a4a5e9f1d7c3b2a19000b",
    "skipped": "6d1c2b8e0c8a4a5e9f1d7c3b2a19000c",
    "unmapped": "6d1c2b8e0c8a4a5e9f1d7c3b2a19000d",
    "abandoned_batch_removed": "6d1c2b8e0c8a4a5e9f1d7c3b2a19000e",
    "stuck": "6d1c2b8e0c8a4a5e9f1d7c3b2a19000f",
    "fatal": "6d1c2b8e0c8a4a5e9f1d7c3b2a190010",
}

# Between INFO and DEBUG: what -v adds on a terminal (one line per delivered item);
# under the journal those lines are logged at INFO anyway.
VERBOSE = 15
logging.addLevelName(VERBOSE, "VERBOSE")

_FIELD_NAMES = {"stream", "item", "bytes", "peer", "result", "attempt", "reason", "sha256",
                "exit_code"}


def fields(**kw: Any) -> dict[str, Any]:
    """Structured fields for a log record: ``log.info(msg, extra=fields(stream=s))``."""
    unknown = set(kw) - _FIELD_NAMES
    if unknown:
        raise ValueError(f"unknown log fields: {sorted(unknown)}")
    return {"mstm_fields": {k: v for k, v in kw.items() if v is not None}}


def event(name: str, **kw: Any) -> dict[str, Any]:
    """Fields plus the MESSAGE_ID of an event an operator may search or alert on."""
    extra = fields(**kw)
    extra["mstm_event"] = name
    extra["mstm_fields"]["result"] = kw.get("result", name)
    return extra


def under_journal() -> bool:
    """True when our stderr is the journal's stream (systemd sets $JOURNAL_STREAM)."""
    spec = os.environ.get("JOURNAL_STREAM")
    if not spec:
        return False
    try:
        dev, ino = (int(x) for x in spec.split(":"))
        st = os.fstat(sys.stderr.fileno())
    except (ValueError, OSError):
        return False
    return st.st_dev == dev and st.st_ino == ino


def _printable(value: Any) -> str:
    if isinstance(value, bytes):
        return value.decode("utf-8", "backslashreplace")
    s = str(value)
    # lone surrogates (non-UTF-8 file names) and control characters are escaped
    return s.encode("utf-8", "surrogateescape").decode("utf-8", "backslashreplace").encode(
        "unicode_escape").decode("ascii") if not s.isprintable() or _has_surrogates(s) else s


def _has_surrogates(s: str) -> bool:
    return any(0xD800 <= ord(c) <= 0xDFFF for c in s)


class JournalHandler(logging.Handler):
    """Native journald records with MSTM_* fields and MESSAGE_ID."""

    def __init__(self, tool: str) -> None:
        super().__init__()
        from systemd import journal

        self._send = journal.send
        self._tool = tool

    def emit(self, record: logging.LogRecord) -> None:
        try:
            msg = self.format(record)
            extra: dict[str, Any] = {
                "PRIORITY": str(_syslog_priority(record.levelno)),
                "SYSLOG_IDENTIFIER": self._tool,
                "CODE_FILE": record.pathname,
                "CODE_LINE": record.lineno,  # python-systemd formats it with {:d}
                "CODE_FUNC": record.funcName,
            }
            for key, value in getattr(record, "mstm_fields", {}).items():
                extra[f"MSTM_{key.upper()}"] = _printable(value)
            name = getattr(record, "mstm_event", None)
            if name:
                extra["MESSAGE_ID"] = MESSAGE_IDS[name]
                extra["MSTM_EVENT"] = name
            self._send(msg, **extra)
        except Exception:
            self.handleError(record)


def _syslog_priority(levelno: int) -> int:
    if levelno >= logging.CRITICAL:
        return 2
    if levelno >= logging.ERROR:
        return 3
    if levelno >= logging.WARNING:
        return 4
    if levelno >= logging.INFO:
        return 6
    return 7


class StderrFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        text = record.getMessage()
        level = record.levelname.lower()
        if level == "warning":
            level = "warn"
        return f"{self._tool}: {level}: {text}" \
            if record.levelno not in (logging.INFO, VERBOSE) else f"{self._tool}: {text}"

    def __init__(self, tool: str) -> None:
        super().__init__()
        self._tool = tool


def setup_logging(tool: str, level: int = logging.INFO, *, force_stderr: bool = False) -> None:
    root = logging.getLogger("mstm")
    root.handlers.clear()
    root.setLevel(level)
    root.propagate = False
    handler: logging.Handler
    if under_journal() and not force_stderr:
        try:
            handler = JournalHandler(tool)
            handler.setFormatter(logging.Formatter("%(message)s"))
        except ImportError:
            handler = logging.StreamHandler(sys.stderr)
            handler.setFormatter(StderrFormatter(tool))
    else:
        handler = logging.StreamHandler(sys.stderr)
        handler.setFormatter(StderrFormatter(tool))
    root.addHandler(handler)


def show(value: Any) -> str:
    """A file name or value made safe for one log line (newlines, bad bytes escaped)."""
    return _printable(value)
