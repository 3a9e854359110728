"""What one check found and did: the :class:`Report`, as a table, as JSON, as a status line."""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field

from mstm.humanize import size as human


@dataclass
class Action:
    """One thing a check did (or, with --dry-run, would do)."""

    kind: str  # "stop" | "resume" | "delete" | "forget"
    stream: str
    path: str
    reason: str
    bytes: int | None = None
    done: bool = True  # False: --dry-run, only said

    def describe(self) -> str:
        """One line: "stop proj1: placed /data/proj1/.stop (...)", or "would stop ..."."""
        did, would = {"stop": ("placed", "place"), "resume": ("removed", "remove"),
                      "delete": ("deleted", "delete"), "forget": ("forgot", "forget")}[self.kind]
        size = f" ({self.bytes} bytes)" if self.bytes is not None else ""
        verb = did if self.done else f"would {would}"
        return f"{self.kind} {self.stream}: {verb} {self.path}{size}: {self.reason}"


@dataclass
class FsReport:
    """One file system: its size and free space, its level now and before, its thresholds."""

    mount: str
    total: int
    free: int
    level: str
    previous: str | None
    thresholds: dict[str, int]


@dataclass
class StreamRow:
    """One stop file of one stream: its file system, that one's level, who paused it."""

    stream: str
    priority: int
    side: str
    stop_file: str
    mount: str | None
    level: str | None
    paused_by: str | None  # "mstm-diskwatch" | "operator" | None


@dataclass
class Report:
    """What one check found and did."""

    dry_run: bool
    filesystems: list[FsReport] = field(default_factory=list)
    streams: list[StreamRow] = field(default_factory=list)
    actions: list[Action] = field(default_factory=list)
    errors: list[str] = field(default_factory=list)

    def to_json(self) -> str:
        return json.dumps(asdict(self), indent=1, sort_keys=True)

    def table(self) -> str:
        rows = [("STREAM", "PRIO", "SIDE", "LEVEL", "FREE", "FILESYSTEM", "STOP FILE",
                 "PAUSED BY")]
        free = {f.mount: f.free for f in self.filesystems}
        for s in self.streams:
            rows.append((s.stream, str(s.priority), s.side, s.level or "?",
                         human(free[s.mount]) if s.mount in free else "?", s.mount or "?",
                         s.stop_file, s.paused_by or "-"))
        widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
        return "\n".join("  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)).rstrip()
                         for r in rows)


def status_line(report: Report) -> str:
    """One line for systemctl status: each file system's level and free space."""
    parts = [f"{f.mount} {f.level} ({human(f.free)} free)" for f in report.filesystems]
    paused = sorted({s.stream for s in report.streams if s.paused_by == "mstm-diskwatch"})
    text = "; ".join(parts) or "no file systems to watch"
    if paused:
        text += "; paused: " + ", ".join(paused)
    return text
