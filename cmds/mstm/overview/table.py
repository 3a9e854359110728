"""Snapshots as a table a person reads, and as one JSON document.

Free text (a stop file's first line, written by whoever may write the stream's
directory; a target's error; a parked item's reason) is shown through
:func:`mstm.log.show`: control characters are escaped, so no terminal escape sequence
reaches the terminal.  --json is JSON-escaped anyway."""

from __future__ import annotations

import json
import time
from collections.abc import Iterable, Sequence
from typing import Any

from mstm import humanize
from mstm.log import show
from mstm.overview.snapshot import ATTENTION, AreaSnapshot, StreamSnapshot, iso

_WHY_WIDTH = 120  # a wider terminal shows the whole reason; --json always does


def local_time(t: float | None) -> str:
    """A time for a person: local date and time with the zone, or "never"."""
    if not t:
        return "never"
    return time.strftime("%Y-%m-%d %H:%M:%S %Z", time.localtime(t))


def _short(text: str | None, *, whole: bool = False) -> str:
    """*text* on one line, escaped; shortened to the WHY column unless *whole*."""
    t = show(" ".join((text or "").split()))
    return t if whole or len(t) <= _WHY_WIDTH else t[: _WHY_WIDTH - 1] + "…"


def _align(header: Sequence[str], rows: list[list[str]], right: set[int]) -> str:
    widths = [max(len(header[i]), *(len(r[i]) for r in rows)) if rows else len(header[i])
              for i in range(len(header))]

    def line(cells: Sequence[str]) -> str:
        out = [c.rjust(widths[i]) if i in right else c.ljust(widths[i])
               for i, c in enumerate(cells)]
        return "  ".join(out).rstrip()

    return "\n".join([line(header), *(line(r) for r in rows)])


STREAM_HEADER = ("STREAM", "DIR", "STATE", "QUEUED", "SIZE", "OLDEST", "LAST DELIVERY",
                 "24H", "24H SIZE", "FAILED", "WHY")


def render_streams(snaps: Sequence[StreamSnapshot]) -> str:
    """One row per stream, aligned, like ``systemctl list-units``; a summary line."""
    rows = []
    for s in snaps:
        push = s.direction == "push"
        rows.append([
            s.stream, s.direction, s.state,
            str(s.queued_items) if push else "-",
            humanize.size(s.queued_bytes) if push else "-",
            humanize.age(s.oldest_age()) if push and s.oldest_queued else "-",
            local_time(s.last_delivery),
            str(s.delivered_24h_items),
            humanize.size(s.delivered_24h_bytes) if push else "-",
            str(s.failed_items) if push else "-",
            "configuration error (below)" if s.error else
            _short(s.why if s.why or push else
                   f"ledger: {s.pull.get('done', 0)} done, {s.pull.get('unmapped', 0)} unmapped"),
        ])
    table = _align(STREAM_HEADER, rows, right={3, 4, 5, 7, 8, 9})
    bad = sum(1 for s in snaps if s.state in ATTENTION)
    errors = "".join(f"\n{s.stream}: {show(s.error)}" for s in snaps if s.error)
    return (f"{table}\n\n{len(snaps)} stream(s), {bad} need(s) attention.{errors}"
            f"{_whole_reasons((s.stream, s.why) for s in snaps if not s.error)}")


AREA_HEADER = ("AREA", "STATE", "WAITING", "ANSWERED", "SET ASIDE", "LAST PUBLISH",
               "24H", "24H SIZE", "REFUSED", "WHY")


def render_areas(snaps: Sequence[AreaSnapshot]) -> str:
    rows = [[a.stream, a.state, str(a.waiting_batches), str(a.answered_batches),
             str(a.set_aside), local_time(a.last_publish), str(a.published_24h_items),
             humanize.size(a.published_24h_bytes), str(sum(a.refused_total.values())),
             "configuration error (below)" if a.error else _short(a.why)] for a in snaps]
    table = _align(AREA_HEADER, rows, right={2, 3, 4, 6, 7, 8})
    bad = sum(1 for a in snaps if a.state in ATTENTION)
    errors = "".join(f"\n{a.stream}: {show(a.error)}" for a in snaps if a.error)
    return (f"{table}\n\n{len(snaps)} area(s), {bad} need(s) attention.{errors}"
            f"{_whole_reasons((a.stream, a.why) for a in snaps if not a.error)}")


def _whole_reasons(whys: Iterable[tuple[str, str | None]]) -> str:
    """The reasons the WHY column had to shorten, whole, one line each below the table."""
    return "".join(f"\n{name}: {_short(why, whole=True)}" for name, why in whys
                   if why and _short(why) != _short(why, whole=True))


def to_document(kind: str, snaps: Sequence[StreamSnapshot] | Sequence[AreaSnapshot],
                *, now: float | None = None) -> str:
    """One JSON document: {"taken_at": ISO time, kind: [snapshot, ...]}."""
    doc: dict[str, Any] = {"taken_at": iso(time.time() if now is None else now),
                           kind: [s.to_json() for s in snaps]}
    return json.dumps(doc, indent=1)
