"""One stream, or one receiving area, at a glance: what ``--status`` prints and what the
metrics files hold.

A snapshot is computed from what is on disk, read only (see spoolview.py): the stream's
configuration, its spool (new/, claimed/, done/, failed/, owners/), its stop file, the
backoff and the totals its sender keeps in ``state.json``; for a pull stream its ledger;
for a receiving area its incoming directory and the totals its receiver keeps in
``<spool_dir>/receive-state.json``.  A running sender or receiver adds what only it
knows (the target's own stop file, for one) through :class:`Live`.

States, first match wins: ``stopped`` (status is not RUNNING), ``paused`` (a stop file),
``backing-off`` (the target could not be reached; until when and why), ``failing``
(the last try of the target failed, or items are parked in failed/), ``stuck`` (the
oldest queued item has waited longer than the stream's ``stuck_after``), ``running`` (a
live sender holds the spool), ``idle``; ``error``: the stream could not be looked at
(its configuration, or a file of its spool: the row says which and why).

The files read here may have been replaced by the spool's owner, and ``--status`` may
run as root: each is opened with :func:`mstm.smallfiles.read_small` (no symbolic link
followed, no FIFO or device opened for reading, a size cap), and every number in them
goes through :func:`number` (anything but a finite number counts as absent).
"""

from __future__ import annotations

import json
import math
import os
import re
import time
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from mstm import humanize, pause
from mstm.config import StreamConfig
from mstm.log import show
from mstm.overview.spoolview import DAY, REASONS, SpoolView
from mstm.smallfiles import read_error, read_small

STATE_KEY = "delivered"  # state.json: {"items", "bytes", "last_at", "failures": {reason: n}}
RECEIVE_STATE = "receive-state.json"
DISKWATCH_MARK = "mstm-diskwatch:"  # the first words of a stop file mstm-diskwatch placed

#: Why a stream is paused, as a metric's label (a fixed set).
PAUSE_REASONS = ("local_stop_file", "remote_stop_file", "diskwatch", "status_stopped")

#: States that need someone's attention (the summary line of the table counts them).
ATTENTION = ("failing", "backing-off", "stuck", "error")

MAX_STATE_BYTES = 1 << 20  # state.json, receive-state.json: larger is refused
MAX_TIME = 253402300799.0  # 9999-12-31T23:59:59Z: a later time is not a time


def iso(t: float | None) -> str | None:
    """An epoch time as ISO 8601 in UTC with its offset (2026-12-03T18:50:22+00:00);
    None for none, and for a time that is not one (not finite, past the year 9999)."""
    if t is None or not isinstance(t, (int, float)) or not 0 < t <= MAX_TIME:
        return None
    try:
        return datetime.fromtimestamp(t, UTC).isoformat(timespec="seconds")
    except (OverflowError, OSError, ValueError):
        return None


def read_json(path: Path | str) -> dict[str, Any]:
    """A JSON object from *path* (read only): {} if it is missing or not a JSON object;
    OSError if it cannot be read safely (a symbolic link, a FIFO, larger than 1 MiB)."""
    try:
        data = json.loads(read_small(path, MAX_STATE_BYTES))
    except FileNotFoundError:
        return {}
    except (ValueError, RecursionError):
        return {}
    return data if isinstance(data, dict) else {}


def number(value: object, default: float = 0.0) -> float:
    """A finite number from a JSON value; *default* for anything else (a string, a bool,
    infinity, an integer too large for a float)."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return default
    try:
        f = float(value)
    except OverflowError:
        return default
    return f if math.isfinite(f) else default


def count(value: object) -> int:
    """A count from a JSON value: a finite number's integer part, never below 0."""
    return max(0, int(number(value)))


def time_value(value: object) -> float:
    """An epoch time from a JSON value; 0.0 for none or one that is not a time."""
    t = number(value)
    return t if 0 < t <= MAX_TIME else 0.0


@dataclass
class Live:
    """What only a running sender knows; None fields: judge from disk."""

    paused: str | None = None  # the reason, the target's stop file included
    remote_paused: bool = False
    unreachable: bool | None = None
    delivered_items: int = 0  # not yet in state.json
    delivered_bytes: int = 0
    last_delivery: float | None = None


@dataclass
class StreamSnapshot:
    """One stream (push or pull) as ``--status`` shows it."""

    stream: str
    direction: str = "push"
    status: str = "RUNNING"  # [data_stream] status
    state: str = "idle"
    why: str | None = None
    running: bool = False
    queued_items: int = 0
    queued_bytes: int = 0
    oldest_queued: float | None = None
    last_delivery: float | None = None
    delivered_24h_items: int = 0
    delivered_24h_bytes: int = 0
    delivered_total_items: int = 0
    delivered_total_bytes: int = 0
    failed_items: int = 0
    failed_by_reason: dict[str, int] = field(default_factory=dict)
    failures_total: dict[str, int] = field(default_factory=dict)
    paused: str | None = None
    pause_reason: str | None = None  # one of PAUSE_REASONS
    backoff: dict[str, Any] = field(default_factory=dict)
    target_unreachable: bool = False
    counts: dict[str, int] = field(default_factory=dict)  # records per spool state
    pull: dict[str, Any] = field(default_factory=dict)  # ledger, done, unmapped
    error: str | None = None  # the configuration could not be loaded
    taken_at: float = field(default_factory=time.time)

    def oldest_age(self) -> float:
        """Seconds the oldest queued item has waited (0 if none)."""
        return max(0.0, self.taken_at - self.oldest_queued) if self.oldest_queued else 0.0

    def to_json(self) -> dict[str, Any]:
        """The snapshot as JSON: times as ISO 8601 (UTC, with offset), never epoch."""
        d = asdict(self)
        d.pop("taken_at")
        for key in ("oldest_queued", "last_delivery"):
            d[key] = iso(d[key])
        d["oldest_queued_age_seconds"] = round(self.oldest_age(), 3)
        if self.backoff:
            d["backoff"] = {**self.backoff, "until": iso(time_value(self.backoff.get("until")))}
        if self.backoff.get("since"):
            d["backoff"]["since"] = iso(time_value(self.backoff.get("since")))
        d["taken_at"] = iso(self.taken_at)
        # the keys --status STREAM printed before, kept (queue counts per spool state)
        if self.direction == "push":
            d.update(self.counts)
        else:
            d.update({k: self.pull.get(k) for k in ("ledger", "done", "unmapped")})
        return d


def short_pause(reason: str) -> str:
    """"stop file /long/path/.stop exists: maintenance" -> "stop file: maintenance"."""
    m = re.fullmatch(r"stop file (.+?) exists: (.+)", reason, re.DOTALL)
    return f"{os.path.basename(m.group(1))}: {m.group(2)}" if m else reason


def pause_class(reason: str | None, *, remote: bool = False) -> str | None:
    """The word of PAUSE_REASONS for a pause reason."""
    if not reason:
        return None
    if remote:
        return "remote_stop_file"
    return "diskwatch" if DISKWATCH_MARK in reason else "local_stop_file"


def push_snapshot(cfg: StreamConfig, view: SpoolView | None = None, *,
                  live: Live | None = None, now: float | None = None,
                  with_done: bool = True) -> StreamSnapshot:
    """A push stream's snapshot (*with_done*: look at done/ for the last 24 hours)."""
    now = time.time() if now is None else now
    view = view or SpoolView(cfg.spool_dir, lease_seconds=cfg.outgoing.lease_seconds)
    snap = StreamSnapshot(cfg.name, "push", cfg.status, taken_at=now)
    q = view.queue()
    snap.queued_items, snap.queued_bytes, snap.oldest_queued = q.items, q.bytes, q.oldest
    failed = view.failed()
    snap.failed_items, snap.failed_by_reason = failed.items, failed.by_reason
    state = read_json(Path(cfg.spool_dir) / "state.json")
    backoff = state.get("backoff")
    snap.backoff = dict(backoff) if isinstance(backoff, dict) else {}
    totals = state.get(STATE_KEY)
    totals = totals if isinstance(totals, dict) else {}
    live = live or Live()
    snap.delivered_total_items = count(totals.get("items")) + live.delivered_items
    snap.delivered_total_bytes = count(totals.get("bytes")) + live.delivered_bytes
    fails = totals.get("failures")
    snap.failures_total = ({r: count(fails.get(r)) for r in REASONS}
                           if isinstance(fails, dict) else {r: 0 for r in REASONS})
    last = max(time_value(totals.get("last_at")), live.last_delivery or 0.0)
    if with_done:
        d = view.delivered(since=now - DAY)
        snap.delivered_24h_items, snap.delivered_24h_bytes = d.items_since, d.bytes_since
        last = max(last, d.newest or 0.0)
        snap.counts = {"new": q.items - q.claimed, "claimed": q.claimed, "done": d.records,
                       "failed": failed.items}
    snap.last_delivery = last or None
    snap.running = bool(view.owners(now))
    step = count(snap.backoff.get("step"))
    until = time_value(snap.backoff.get("until"))  # 1e20: not a time, no end known
    if snap.backoff:
        snap.backoff["step"], snap.backoff["until"] = step, until
        if "since" in snap.backoff:
            snap.backoff["since"] = time_value(snap.backoff.get("since"))
    error = str(snap.backoff.get("last_error") or "")
    snap.target_unreachable = live.unreachable if live.unreachable is not None else step > 0
    snap.paused = live.paused if live.paused is not None else pause.is_paused(cfg)
    snap.pause_reason = pause_class(snap.paused, remote=live.remote_paused)
    if not cfg.running:
        snap.state, snap.why = "stopped", f"status = {cfg.status} in {cfg.stream_file}"
        snap.pause_reason = "status_stopped"
    elif snap.paused:
        snap.state, snap.why = "paused", short_pause(snap.paused)
    elif step and until > now:
        snap.state = "backing-off"
        snap.why = f"until {iso(until)}: {error}"
    elif step:  # since when: backoff.since in the JSON
        snap.state, snap.why = "failing", f"target unreachable: {error}"
    elif failed.items:
        snap.state = "failing"
        snap.why = f"{failed.items} parked in failed/" + (
            f"; last: {failed.last_error}" if failed.last_error else "")
    elif snap.oldest_queued and now - snap.oldest_queued > cfg.stuck_after:

        snap.state = "stuck"
        snap.why = (f"the oldest queued item has waited {humanize.age(now - snap.oldest_queued)}"
                    f" (stuck_after {humanize.age(cfg.stuck_after)})")
    elif snap.running:
        snap.state = "running"
    return snap


def pull_snapshot(cfg: StreamConfig, *, now: float | None = None) -> StreamSnapshot:
    """A pull stream's snapshot: what its done-ledger says (read only)."""
    from mstm.pull.ledger import DONE, UNMAPPED, Ledger, LedgerError

    now = time.time() if now is None else now
    snap = StreamSnapshot(cfg.name, "pull", cfg.status, taken_at=now)
    path = cfg.pull.ledger or cfg.spool_dir / "ledger.jsonl"
    snap.pull = {"ledger": str(path), "done": 0, "unmapped": 0, "last_fetch": None}
    try:
        entries = Ledger(path).read()
    except LedgerError as err:
        entries = {}
        snap.state, snap.why = "failing", err.message
    last = 0.0
    for e in entries.values():
        if e.state == DONE:
            snap.pull["done"] += 1
            when = _parse_iso(e.at)
            last = max(last, when)
            if when >= now - DAY:
                snap.delivered_24h_items += 1
        elif e.state == UNMAPPED:
            snap.pull["unmapped"] += 1
    snap.last_delivery = last or None
    snap.pull["last_fetch"] = iso(last or None)
    snap.delivered_total_items = snap.pull["done"]
    snap.paused = pause.is_paused(cfg)
    snap.pause_reason = pause_class(snap.paused)
    if not cfg.running:
        snap.state, snap.why = "stopped", f"status = {cfg.status} in {cfg.stream_file}"
        snap.pause_reason = "status_stopped"
    elif snap.paused:
        snap.state, snap.why = "paused", short_pause(snap.paused)
    elif snap.state == "idle" and snap.pull["unmapped"]:
        snap.why = f"{snap.pull['unmapped']} item(s) map nowhere (see the ledger)"
    return snap


def _parse_iso(text: str | None) -> float:
    if not text:
        return 0.0
    try:
        t = datetime.fromisoformat(text.replace("Z", "+00:00"))
    except ValueError:
        return 0.0
    if t.tzinfo is None:
        t = t.replace(tzinfo=UTC)
    return t.timestamp()


def stream_snapshot(cfg: StreamConfig, *, now: float | None = None) -> StreamSnapshot:
    """The snapshot of a push or pull stream."""
    if cfg.direction == "pull":
        return pull_snapshot(cfg, now=now)
    return push_snapshot(cfg, now=now)


def broken_snapshot(name: str, error: str, *, now: float | None = None) -> StreamSnapshot:
    """A row for a stream whose configuration cannot be loaded."""
    snap = StreamSnapshot(name, "?", "?", taken_at=time.time() if now is None else now)
    snap.state, snap.why, snap.error = "error", error, error
    return snap


# ---------------------------------------------------------------------- receiving areas


@dataclass
class AreaSnapshot:
    """One receiving area (mstm-receive STREAM) as ``mstm-receive --status`` shows it."""

    stream: str
    status: str = "RUNNING"
    state: str = "idle"
    why: str | None = None
    running: bool = False
    incoming: str = ""
    waiting_batches: int = 0  # control files not answered yet
    answered_batches: int = 0  # answered, waiting for the sender's thank-you
    set_aside: int = 0  # entries in the incoming area's .quarantine/
    last_publish: float | None = None
    published_24h_items: int = 0
    published_24h_bytes: int = 0
    published_total_items: int = 0
    published_total_bytes: int = 0
    refused_total: dict[str, int] = field(default_factory=dict)  # not-ok answers by status
    paused: str | None = None
    error: str | None = None
    taken_at: float = field(default_factory=time.time)

    def to_json(self) -> dict[str, Any]:
        d = asdict(self)
        d["last_publish"] = iso(self.last_publish)
        d["taken_at"] = iso(self.taken_at)
        return d


def _flocked(path: Path) -> bool:
    """Whether some process holds a flock on *path* (read from /proc/locks: taking the
    lock to find out could make a receiver starting at that instant fail)."""
    try:
        st = os.stat(path)
        with open("/proc/locks", encoding="ascii", errors="replace") as f:
            lines = f.read().splitlines()
    except OSError:
        return False
    want = (os.major(st.st_dev), os.minor(st.st_dev), st.st_ino)
    for line in lines:
        parts = line.split()
        if "FLOCK" not in parts:
            continue
        for p in parts:
            bits = p.split(":")
            if len(bits) == 3:
                try:
                    got = (int(bits[0], 16), int(bits[1], 16), int(bits[2]))
                except ValueError:
                    continue
                if got == want:
                    return True
    return False


def receive_state_path(cfg: StreamConfig) -> Path:
    return Path(cfg.spool_dir) / RECEIVE_STATE


def area_snapshot(cfg: StreamConfig, *, now: float | None = None) -> AreaSnapshot:
    """A receiving area's snapshot (read only)."""
    now = time.time() if now is None else now
    inc = cfg.incoming
    incoming = Path(inc.incoming_dir or cfg.directory / ".mstm-incoming")
    snap = AreaSnapshot(cfg.name, cfg.status, incoming=str(incoming), taken_at=now)
    try:
        names = os.listdir(incoming)
    except FileNotFoundError:
        names = []
    except OSError as err:
        names = []
        snap.state, snap.why = "failing", f"cannot read {incoming}: {err.strerror or err}"
    present = set(names)
    for name in names:
        if name.endswith("." + inc.control_file_extension):
            stem = name[: -len(inc.control_file_extension) - 1]
            if f"{stem}.{inc.receipt_file_extension}" in present:
                snap.answered_batches += 1
            else:
                snap.waiting_batches += 1
    try:
        snap.set_aside = len(os.listdir(incoming / ".quarantine"))
    except OSError:
        snap.set_aside = 0
    state = read_json(receive_state_path(cfg))
    snap.published_total_items = count(state.get("items"))
    snap.published_total_bytes = count(state.get("bytes"))
    snap.last_publish = time_value(state.get("last_at")) or None
    refused = state.get("not_ok")
    snap.refused_total = ({str(k): count(v) for k, v in refused.items()}
                          if isinstance(refused, dict) else {})
    hours = state.get("hours")
    if isinstance(hours, dict):
        for hour, value in hours.items():
            try:
                start = float(hour)
            except (ValueError, OverflowError):
                continue
            if start + 3600 > now - DAY and isinstance(value, list) and len(value) == 2:
                snap.published_24h_items += count(value[0])
                snap.published_24h_bytes += count(value[1])
    snap.running = _flocked(incoming)
    stop = incoming / inc.stop_file
    if os.path.lexists(stop):
        snap.paused = f"stop file {stop} exists (senders pause)"
    if not cfg.running:
        snap.state, snap.why = "stopped", f"status = {cfg.status} in {cfg.stream_file}"
    elif snap.state == "failing":
        pass
    elif snap.paused:
        snap.state, snap.why = "paused", snap.paused
    elif snap.set_aside:
        snap.state, snap.why = "failing", f"{snap.set_aside} set aside in {incoming}/.quarantine"
    elif snap.running:
        snap.state = "running"
    return snap


def broken_area(name: str, error: str) -> AreaSnapshot:
    snap = AreaSnapshot(name, "?")
    snap.state, snap.why, snap.error = "error", error, error
    return snap


def look_error(err: Exception) -> str:
    """Why a stream could not be looked at, in words for its row."""
    if isinstance(err, PermissionError):
        return (f"cannot read {show(err.filename or '?')}: permission denied"
                " (run as mstm or root)")
    if isinstance(err, OSError):
        where = f" {show(err.filename)}" if err.filename else ""
        return f"cannot read{where}: {read_error(err)}"
    return f"cannot look at it: {type(err).__name__}: {err}"


def checked_stream_snapshot(cfg: StreamConfig) -> StreamSnapshot:
    """:func:`stream_snapshot`, or a row in state ``error`` saying why the stream could
    not be looked at (a file of its spool unreadable, replaced by a FIFO, too large)."""
    try:
        return stream_snapshot(cfg)
    except Exception as err:  # one bad stream is one row, never the whole table
        snap = StreamSnapshot(cfg.name, cfg.direction, cfg.status)
        snap.state, snap.why = "error", look_error(err)
        return snap


def checked_area_snapshot(cfg: StreamConfig) -> AreaSnapshot:
    """:func:`area_snapshot`, or a row in state ``error`` saying why."""
    try:
        return area_snapshot(cfg)
    except Exception as err:  # one bad area is one row, never the whole table
        snap = AreaSnapshot(cfg.name, cfg.status)
        snap.state, snap.why = "error", look_error(err)
        return snap


# ---------------------------------------------------------------------- every stream


def all_streams(config_path: Path | None) -> list[StreamSnapshot]:
    """A snapshot of every stream in data_stream_list, in its order; a stream whose file
    is broken gets a row saying why (the others are still shown)."""
    from mstm import config
    from mstm.errors import ConfigError

    gcfg = config.load_global(config_path)
    snaps = []
    for name in gcfg.data_stream_list:
        try:
            cfg = config.load_stream(name, config_path)
        except ConfigError as err:
            snaps.append(broken_snapshot(name, err.message))
            continue
        snaps.append(checked_stream_snapshot(cfg))
    return snaps


def all_areas(config_path: Path | None) -> list[AreaSnapshot]:
    """A snapshot of every receiving area (every stream of data_stream_list, read as
    mstm-receive reads it)."""
    from mstm import config
    from mstm.errors import ConfigError

    gcfg = config.load_global(config_path)
    snaps = []
    for name in gcfg.data_stream_list:
        try:
            cfg = config.load_stream(name, config_path, role="receive")
        except ConfigError as err:
            snaps.append(broken_area(name, err.message))
            continue
        snaps.append(checked_area_snapshot(cfg))
    return snaps
