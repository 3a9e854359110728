"""What a run of the sender tells: the summary (--json), and progress on a terminal."""

from __future__ import annotations

import base64
import json
import os
import sys
import time
from dataclasses import dataclass, field
from typing import Any


def json_path(relpath: str) -> dict[str, str]:
    """*relpath* for JSON output: as text, plus its bytes in base64 if it is not UTF-8."""
    try:
        relpath.encode("utf-8")
        return {"path": relpath}
    except UnicodeEncodeError:
        raw = os.fsencode(relpath)
        return {"path": raw.decode("utf-8", "backslashreplace"),
                "path_base64": base64.b64encode(raw).decode()}


@dataclass
class Summary:
    stream: str
    delivered: list[dict[str, Any]] = field(default_factory=list)
    failed: list[dict[str, Any]] = field(default_factory=list)
    skipped: list[dict[str, Any]] = field(default_factory=list)
    retried: int = 0
    bytes: int = 0
    paused: str | None = None
    error: str | None = None
    started: float = field(default_factory=time.time)
    queued: int = 0

    def to_json(self) -> str:
        return json.dumps({
            "stream": self.stream,
            "delivered": len(self.delivered),
            "delivered_bytes": self.bytes,
            "failed": self.failed,
            "skipped": self.skipped,
            "retried": self.retried,
            "queued": self.queued,
            "paused": self.paused,
            "error": self.error,
            "seconds": round(time.time() - self.started, 3),
            "items": self.delivered,
        }, ensure_ascii=False, indent=None)


class TtyProgress:
    """A single updating line on a terminal: items, bytes, rate."""

    def __init__(self, stream: str) -> None:
        self.stream = stream
        self.files = 0
        self.bytes = 0
        self._base = (0, 0)
        self._t0 = time.monotonic()
        self._last = 0.0
        self._shown = False

    def batch_progress(self, files: int, nbytes: int) -> None:
        self.files, self.bytes = self._base[0] + files, self._base[1] + nbytes
        now = time.monotonic()
        if now - self._last >= 0.2:
            self._last = now
            self._draw()

    def batch_done(self) -> None:
        self._base = (self.files, self.bytes)

    def _draw(self) -> None:
        rate = self.bytes / max(1e-6, time.monotonic() - self._t0)
        sys.stderr.write(f"\r{self.stream}: {self.files} files, {_human(self.bytes)}, "
                         f"{_human(rate)}/s   ")
        sys.stderr.flush()
        self._shown = True

    def finish(self) -> None:
        if self._shown:
            self._draw()
            sys.stderr.write("\n")
            sys.stderr.flush()


def _human(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024 or unit == "TiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} TiB"
