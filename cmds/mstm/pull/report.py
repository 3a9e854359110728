"""What a pull cycle did, and how it is told: JSON, the dry run's plan, the log line.

:class:`CycleReport` holds one cycle's planned items and their results;
:func:`log_summary` logs its counts, :func:`render_plan` is what a dry run prints and
``CycleReport.to_json`` what ``--json`` prints.
"""

from __future__ import annotations

import json
import logging
import time
from dataclasses import dataclass, field

from mstm.log import fields, show
from mstm.pull.planning import (
    ACTIONS,
    BUSY,
    CHANGING,
    FAILED,
    FETCH,
    FETCHED,
    REFETCH,
    REFUSED,
    TOO_OLD,
    UNMAPPED_ITEM,
    UP_TO_DATE,
    Planned,
)

log = logging.getLogger("mstm.pull")


@dataclass
class CycleReport:
    stream: str
    execute: bool
    source: str
    items: list[Planned] = field(default_factory=list)
    reported: list[str] = field(default_factory=list)  # unmapped items reported this cycle
    started: float = field(default_factory=time.time)
    stopped: bool = False
    paused: str | None = None  # why nothing (more) was fetched: the stop file's reason

    def count(self, action: str) -> int:
        return sum(1 for p in self.items if p.action == action)

    def results(self, result: str) -> list[Planned]:
        return [p for p in self.items if p.result == result]

    def to_json(self) -> str:
        return json.dumps({
            "stream": self.stream,
            "direction": "pull",
            "execute": self.execute,
            "source": self.source,
            "counts": {a: self.count(a) for a in ACTIONS},
            "fetched": len(self.results(FETCHED)),
            "failed": len(self.results(FAILED)),
            "changing": len(self.results(CHANGING)),
            "busy": len(self.results(BUSY)),
            "bytes": sum(p.moved_bytes for p in self.items),
            "reported_unmapped": len(self.reported),
            "stopped": self.stopped,
            "paused": self.paused,
            "seconds": round(time.time() - self.started, 3),
            "items": [p.to_json() for p in self.items],
        }, ensure_ascii=False)


def log_summary(report: CycleReport) -> None:
    failed = report.results(FAILED)
    log.info("%s: %d fetched, %d failed, %d still changing, %d busy elsewhere, %d up to"
             " date, %d unmapped, %d refused, %d too old%s", report.stream,
             len(report.results(FETCHED)), len(failed), len(report.results(CHANGING)),
             len(report.results(BUSY)), report.count(UP_TO_DATE),
             report.count(UNMAPPED_ITEM), report.count(REFUSED), report.count(TOO_OLD),
             "; stopped before the end" if report.stopped
             else f"; paused: {report.paused}" if report.paused else "",
             extra=fields(stream=report.stream))


def render_plan(report: CycleReport) -> str:
    """What a dry run prints: each item that would be acted on, then the counts."""
    lines = [f"{report.stream}: pull from {report.source} (dry run: nothing is changed;"
             " --execute fetches)"]
    for p in report.items:
        if p.action in (FETCH, REFETCH):
            lines.append(f"  {p.action:<9} {show(p.item.name)} -> {show(p.target)}"
                         + (f"  ({p.reason})" if p.reason else ""))
        elif p.action in (UNMAPPED_ITEM, REFUSED):
            seen = ", reported before" if p.reported else ""
            lines.append(f"  {p.action:<9} {show(p.item.name)}  ({p.reason}{seen})")
    counts = ", ".join(f"{report.count(a)} {a.replace('_', ' ')}" for a in ACTIONS)
    lines.append(f"{len(report.items)} item(s): {counts}")
    return "\n".join(lines)
