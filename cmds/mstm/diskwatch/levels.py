"""Free space and its levels: the file systems, their usage, the thresholds.

A file system's level comes from its free space (``f_bavail``) against ``level_good``,
``level_low`` and ``level_vlow`` (MB or "N%" of its size); it falls at once and rises
only when free space is above the boundary by the ``hysteresis``.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from enum import IntEnum
from pathlib import Path
from typing import Protocol

from mstm.config import DiskSpaceConfig, level_value

MIB = 1024 * 1024


class Level(IntEnum):
    """A file system's level, from its free space: VLOW < LOW < OKAY < GOOD."""

    VLOW = 0
    LOW = 1
    OKAY = 2
    GOOD = 3


@dataclass(frozen=True)
class Usage:
    """A file system's size and free space."""

    total: int  # bytes
    free: int  # bytes available to unprivileged writers


class FileSystems(Protocol):
    """Where a path's file system is mounted, and how full it is (faked in unit tests)."""

    def mount_of(self, path: Path) -> str: ...

    def usage(self, mount: str) -> Usage: ...


class RealFileSystems:
    """The machine's own file systems: st_dev to find the mount point, statvfs for usage."""

    def mount_of(self, path: Path) -> str:
        path = Path(os.path.realpath(path))
        dev = os.stat(path).st_dev
        while path != path.parent and os.stat(path.parent).st_dev == dev:
            path = path.parent
        return str(path)

    def usage(self, mount: str) -> Usage:
        s = os.statvfs(mount)
        return Usage(total=s.f_blocks * s.f_frsize, free=s.f_bavail * s.f_frsize)


def level_bytes(level: str, total: int) -> int:
    """A validated level ("1500" MB or "10%") in bytes for a file system of *total* bytes."""
    number, percent = level_value(level)
    return int(number / 100 * total) if percent else int(number * MIB)


@dataclass(frozen=True)
class Thresholds:
    good: int
    low: int
    vlow: int
    margin: int

    @classmethod
    def of(cls, cfg: DiskSpaceConfig, total: int) -> Thresholds:
        vlow = level_bytes(cfg.level_vlow, total)
        low = max(level_bytes(cfg.level_low, total), vlow)  # mixed units: keep the order
        good = max(level_bytes(cfg.level_good, total), low)
        return cls(good=good, low=low, vlow=vlow, margin=level_bytes(cfg.hysteresis, total))

    def raw_level(self, free: int) -> Level:
        if free < self.vlow:
            return Level.VLOW
        if free < self.low:
            return Level.LOW
        if free <= self.good:
            return Level.OKAY
        return Level.GOOD

    def next_level(self, previous: Level | None, free: int) -> Level:
        """Falls at once; rises only as far as free space minus the margin allows."""
        raw = self.raw_level(free)
        if previous is None or raw <= previous:
            return raw
        return max(previous, self.raw_level(free - self.margin))
