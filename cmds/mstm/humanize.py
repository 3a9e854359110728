"""Sizes, durations and times as a person reads them in a log line or a table."""

from __future__ import annotations

import time


def size(n: float) -> str:
    """1536 -> "1.5 KiB" (binary units; whole bytes below 1 KiB)."""
    value = float(n)
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(value) < 1024:
            return f"{value:.0f} {unit}" if unit == "B" else f"{value:.1f} {unit}"
        value /= 1024
    return f"{value:.1f} PiB"


def duration(seconds: float) -> str:
    """95 -> "95 s", 4000 -> "67 min", 9000 -> "2.5 h", 200000 -> "2.3 days"."""
    if seconds < 120:
        return f"{seconds:.0f} s"
    if seconds < 2 * 3600:
        return f"{seconds / 60:.0f} min"
    if seconds < 2 * 86400:
        return f"{seconds / 3600:.1f} h"
    return f"{seconds / 86400:.1f} days"


def age(seconds: float) -> str:
    """Compact, for a table column: 95 -> "1m35s", 7300 -> "2h01m", 200000 -> "2d07h"."""
    s = int(seconds)
    if s < 60:
        return f"{s}s"
    if s < 3600:
        return f"{s // 60}m{s % 60:02d}s"
    if s < 86400:
        return f"{s // 3600}h{s % 3600 // 60:02d}m"
    return f"{s // 86400}d{s % 86400 // 3600:02d}h"


def clock(t: float) -> str:
    """An epoch time as local "YYYY-mm-dd HH:MM:SS" (the day is left out if it is today)."""
    here = time.localtime(t)
    if time.strftime("%Y-%m-%d", here) == time.strftime("%Y-%m-%d"):
        return time.strftime("%H:%M:%S", here)
    return time.strftime("%Y-%m-%d %H:%M:%S", here)
