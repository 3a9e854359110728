"""What one event is: an :class:`Alert` from a journal entry, a JSON object or a log line.

Journal entries come from python-systemd (some fields already converted) or from
``journalctl -o json`` (some fields lists of byte values); ``mstm-alert --stdin`` also
takes plain JSON objects (``message``, ``priority``/``level``, ``stream``, ``item``,
``event``, ``identifier``, ``time``) and log lines (``tool: level: text``).  Priorities
are syslog's, 0 (EMERG) to 7 (DEBUG); :func:`is_mstm` says which entries are mstm's.
"""

from __future__ import annotations

import contextlib
import json
import re
import time
from collections.abc import Mapping
from dataclasses import dataclass, replace
from datetime import datetime
from typing import Any
from uuid import UUID

SELF = "mstm-alert"
PRIORITY_NAMES = ("EMERG", "ALERT", "CRITICAL", "ERROR", "WARNING", "NOTICE", "INFO", "DEBUG")
_PRIORITY_WORDS = {"emerg": 0, "emergency": 0, "panic": 0, "alert": 1, "crit": 2,
                   "critical": 2, "err": 3, "error": 3, "warn": 4, "warning": 4, "notice": 5,
                   "info": 6, "debug": 7}
_LINE = re.compile(r"(?P<tool>[\w.@-]+): (?:(?P<level>[a-z]+): )?(?P<text>.*)")
# A pull stream's line about an item it does not fetch (mstm.pull.puller, event
# "unmapped"): "STREAM: ITEM is not fetched: REASON".  A stream name has no space or
# colon; the item is everything up to the last " is not fetched: ".
_UNMAPPED_LINE = re.compile(r"(?P<stream>[^\s:]+): (?P<item>.+) is not fetched: (?P<reason>.+)")


def threshold_priority(level: str) -> int:
    """A [logging]-style level name (DEBUG .. CRITICAL) as a syslog priority (7 .. 2)."""
    return _PRIORITY_WORDS[level.lower()]


def priority_name(priority: int) -> str:
    """A syslog priority's name, EMERG .. DEBUG."""
    return PRIORITY_NAMES[min(max(priority, 0), 7)]


@dataclass(frozen=True)
class Alert:
    """One event worth mailing (or not): what mattered of one journal entry."""

    time: float
    priority: int
    message: str
    identifier: str
    host: str = ""
    unit: str | None = None
    stream: str | None = None
    item: str | None = None
    event: str | None = None
    message_id: str | None = None
    reason: str | None = None

    @property
    def when(self) -> str:
        return datetime.fromtimestamp(self.time).astimezone().strftime("%Y-%m-%d %H:%M:%S %z")

    @property
    def priority_name(self) -> str:
        return priority_name(self.priority)


def text_of(value: Any) -> str | None:
    """A journal field value as text (python-systemd converts some; -o json may give lists)."""
    if value is None:
        return None
    if isinstance(value, bytes):
        return value.decode("utf-8", "replace")
    if isinstance(value, UUID):
        return value.hex
    if isinstance(value, list):  # binary field in journalctl -o json: a list of byte values
        try:
            return bytes(value).decode("utf-8", "replace")
        except (TypeError, ValueError):
            return str(value)
    return str(value)


def timestamp_of(value: Any) -> float | None:
    if isinstance(value, datetime):
        return value.timestamp()
    if isinstance(value, int | float) and not isinstance(value, bool):
        return float(value) / (1e6 if value > 1e12 else 1)
    if isinstance(value, str):
        with contextlib.suppress(ValueError):
            number = float(value)
            return number / (1e6 if number > 1e12 else 1)
        with contextlib.suppress(ValueError):
            return datetime.fromisoformat(value).timestamp()
    return None


def _priority(value: Any, default: int) -> int:
    if isinstance(value, int) and not isinstance(value, bool):
        return min(max(value, 0), 7)
    text = text_of(value)
    if text is None:
        return default
    text = text.strip().lower()
    if text.isdigit():
        return min(int(text), 7)
    return _PRIORITY_WORDS.get(text, default)


def from_entry(entry: Mapping[str, Any]) -> Alert:
    """An Alert from a journal entry (python-systemd's dict, or journalctl -o json)."""
    def get(*names: str) -> str | None:
        for name in names:
            value = text_of(entry.get(name))
            if value:
                return value
        return None

    when = timestamp_of(entry.get("__REALTIME_TIMESTAMP")) or time.time()
    return Alert(
        time=when,
        priority=_priority(entry.get("PRIORITY"), 6),
        message=get("MESSAGE") or "",
        identifier=get("SYSLOG_IDENTIFIER", "_COMM") or "?",
        host=get("_HOSTNAME") or "",
        unit=get("_SYSTEMD_UNIT", "UNIT", "_SYSTEMD_USER_UNIT", "USER_UNIT"),
        stream=get("MSTM_STREAM"),
        item=get("MSTM_ITEM"),
        event=get("MSTM_EVENT"),
        message_id=get("MESSAGE_ID"),
        reason=get("MSTM_REASON"),
    )


def from_simple(obj: Mapping[str, Any]) -> Alert:
    """An Alert from a plain JSON object: message, priority/level, stream, item, ..."""
    if any(k.isupper() for k in obj):  # journalctl -o json (or export-like) fields
        return from_entry(obj)
    return Alert(
        time=timestamp_of(obj.get("time")) or time.time(),
        priority=_priority(obj.get("priority", obj.get("level")), 3),
        message=text_of(obj.get("message")) or "",
        identifier=text_of(obj.get("identifier", obj.get("tool"))) or "stdin",
        host=text_of(obj.get("host")) or "",
        unit=text_of(obj.get("unit")),
        stream=text_of(obj.get("stream")),
        item=text_of(obj.get("item")),
        event=text_of(obj.get("event")),
        message_id=text_of(obj.get("message_id")),
        reason=text_of(obj.get("reason")),
    )


def from_line(line: str) -> Alert | None:
    """An Alert from one line of stdin: a JSON object, or a plain "tool: level: text"."""
    line = line.strip()
    if not line:
        return None
    if line.startswith("{"):
        try:
            obj = json.loads(line)
        except ValueError:
            obj = None
        if isinstance(obj, dict):
            return from_simple(obj)
    m = _LINE.fullmatch(line)
    if m and (m.group("level") is None or m.group("level") in _PRIORITY_WORDS):
        level = m.group("level")
        alert = Alert(time.time(), _PRIORITY_WORDS[level] if level else 6, m.group("text"),
                      m.group("tool"))
        unmapped = _UNMAPPED_LINE.fullmatch(alert.message)
        if unmapped and alert.identifier.startswith("mstm-"):
            # what the journal has as fields, taken back from mstm's own line: the mail
            # must name each such item, as it does for the journal's entries
            alert = replace(alert, event="unmapped", stream=unmapped.group("stream"),
                            item=unmapped.group("item"), reason=unmapped.group("reason"))
        return alert
    return Alert(time.time(), 6, line, "stdin")


def is_mstm(entry: Mapping[str, Any]) -> bool:
    """An entry of an mstm program or unit (but not mstm-alert's own)."""
    ident = text_of(entry.get("SYSLOG_IDENTIFIER")) or ""
    units = [text_of(entry.get(k)) or "" for k in
             ("_SYSTEMD_UNIT", "UNIT", "_SYSTEMD_USER_UNIT", "USER_UNIT")]
    if ident == SELF or any(u.startswith(SELF) for u in units):
        return False
    return ("MSTM_STREAM" in entry or ident.startswith("mstm-")
            or any(u.startswith("mstm-") for u in units))
