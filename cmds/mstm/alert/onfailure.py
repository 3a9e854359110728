"""``mstm-alert UNIT`` (the OnFailure= handler): which run of UNIT failed, and its last lines.

The failed run is named by its invocation ID: from systemd's ``$MONITOR_*`` (systemd >=
251), else ``systemctl show`` (system manager, then the user's), else the newest
``_SYSTEMD_INVOCATION_ID`` in the journal.  :func:`failure_context` is what the
``failure.*`` templates render.
"""

from __future__ import annotations

import os
import socket
import subprocess
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from typing import Any

from mstm.alert.events import Alert, from_entry, text_of, timestamp_of
from mstm.config import GlobalConfig


@dataclass
class UnitState:
    invocation_id: str | None = None
    result: str | None = None
    exit_status: str | None = None
    manager: str = "system"


def _systemctl_show(unit: str, user: bool) -> dict[str, str]:
    argv = ["systemctl", *(["--user"] if user else []), "show", "-p", "InvocationID",
            "-p", "Result", "-p", "ExecMainStatus", "--", unit]
    try:
        r = subprocess.run(argv, capture_output=True, text=True, timeout=15, check=False)
    except (OSError, subprocess.TimeoutExpired):
        return {}
    if r.returncode != 0:
        return {}
    return dict(line.split("=", 1) for line in r.stdout.splitlines() if "=" in line)


def unit_state(unit: str) -> UnitState:
    """The failed run of *unit*: what systemd (>= 251) hands an OnFailure= unit in
    $MONITOR_*, else what its service manager says now (system first, then the user's)."""
    env = os.environ
    manager = "user" if env.get("MANAGERPID") else "system"  # set by user managers only
    if env.get("MONITOR_INVOCATION_ID") and env.get("MONITOR_UNIT", unit) == unit:
        return UnitState(env["MONITOR_INVOCATION_ID"], env.get("MONITOR_SERVICE_RESULT"),
                         env.get("MONITOR_EXIT_STATUS"), manager)
    for user in (manager == "user", manager != "user"):
        props = _systemctl_show(unit, user)
        if props.get("InvocationID"):
            return UnitState(props["InvocationID"], props.get("Result") or None,
                             props.get("ExecMainStatus") or None, "user" if user else "system")
    return UnitState(manager=manager)


_UNIT_FIELDS = ("_SYSTEMD_UNIT", "_SYSTEMD_USER_UNIT")
_INVOCATION_FIELDS = ("_SYSTEMD_INVOCATION_ID", "INVOCATION_ID", "USER_INVOCATION_ID")
_INVOCATION_PAIRS = (("_SYSTEMD_UNIT", "_SYSTEMD_INVOCATION_ID"), ("UNIT", "INVOCATION_ID"),
                     ("_SYSTEMD_USER_UNIT", "_SYSTEMD_INVOCATION_ID"),
                     ("USER_UNIT", "USER_INVOCATION_ID"))


def _reader(pairs: Iterable[tuple[str, str | None]]) -> Any:
    """A journal reader matching any of the (field=value[, field=value]) groups."""
    from systemd import journal

    reader = journal.Reader()
    for i, group in enumerate(pairs):
        if i:
            reader.add_disjunction()
        for match in group:
            if match is not None:
                reader.add_match(match)
    return reader


def _unit_reader(unit: str, invocation_id: str | None) -> Any:
    if invocation_id is None:
        return _reader((f"{u}={unit}", None) for u, _ in _INVOCATION_PAIRS)
    return _reader((f"{u}={unit}", f"{i}={invocation_id}") for u, i in _INVOCATION_PAIRS)


def _tail(reader: Any, count: int) -> list[Mapping[str, Any]]:
    reader.seek_tail()
    found: list[Mapping[str, Any]] = []
    while len(found) < count:
        entry = reader.get_previous()
        if not entry:
            break
        found.append(entry)
    return found[::-1]


def newest_invocation(unit: str) -> str | None:
    """The newest invocation ID the journal holds for *unit*."""
    for entry in reversed(_tail(_unit_reader(unit, None), 10000)):
        for key in _INVOCATION_FIELDS:
            value = text_of(entry.get(key))
            if value:
                return value
    return None


def _realtime(entry: Mapping[str, Any]) -> float:
    return timestamp_of(entry.get("__REALTIME_TIMESTAMP")) or 0.0


_START_SLACK = 5.0  # seconds a service may log before its manager says "Starting"


def _previous_run_end(unit: str, invocation_id: str, before: float) -> float:
    """When the unit's run before *invocation_id* logged last (0 if none is found)."""
    reader = _unit_reader(unit, None)
    reader.seek_realtime(before)
    for _ in range(10000):
        entry = reader.get_previous()
        if not entry:
            break
        ids = {text_of(entry.get(k)) for k in _INVOCATION_FIELDS} - {None}
        if ids and invocation_id not in ids:
            return _realtime(entry)
    return 0.0


def last_lines(unit: str, invocation_id: str | None, count: int) -> list[Alert]:
    """The last *count* journal entries of the unit's run *invocation_id*, oldest first.

    journald tags a service's own lines with _SYSTEMD_INVOCATION_ID when it can read the
    ID from the service's cgroup; a user manager (systemd 252) cannot always mark it.
    So the unit's untagged lines are taken too, by time: from the end of the previous
    run (at most a few seconds before the manager's first message about this one, since
    a service may log before its manager does) to the manager's last message about it.
    """
    entries = _tail(_unit_reader(unit, invocation_id), count)
    if invocation_id is not None and entries:
        first, last = _realtime(entries[0]), _realtime(entries[-1])
        lower = max(first - _START_SLACK, _previous_run_end(unit, invocation_id, first))
        reader = _reader((f"{u}={unit}", None) for u in _UNIT_FIELDS)
        reader.seek_realtime(lower)
        seen = {str(e.get("__CURSOR")) for e in entries}
        while True:
            entry = reader.get_next()
            if not entry or _realtime(entry) > last:
                break
            tagged = text_of(entry.get("_SYSTEMD_INVOCATION_ID"))
            if (_realtime(entry) > lower and str(entry.get("__CURSOR")) not in seen
                    and tagged in (None, invocation_id)):
                entries.append(entry)
        entries.sort(key=_realtime)
        entries = entries[-count:]
    return [from_entry(e) for e in entries]


def failure_context(unit: str, gcfg: GlobalConfig, lines: int,
                    state: UnitState | None = None,
                    journal_lines: Callable[[str, str | None, int], list[Alert]] = last_lines,
                    invocation: Callable[[str], str | None] = newest_invocation,
                    ) -> dict[str, Any]:
    state = state or unit_state(unit)
    inv = state.invocation_id or invocation(unit)
    flag = "--user " if state.manager == "user" else ""
    command = f"journalctl {flag}-u {unit}" + (f" _SYSTEMD_INVOCATION_ID={inv}" if inv else "")
    return {
        "subject": gcfg.email.subject,
        "host": socket.gethostname(),
        "unit": unit,
        "invocation_id": inv,
        "result": state.result,
        "exit_status": state.exit_status if state.exit_status not in (None, "0") else None,
        "lines": journal_lines(unit, inv, lines),
        "journal_command": command,
        "config": str(gcfg.path),
    }
