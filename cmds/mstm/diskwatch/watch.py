"""The watcher: :class:`DiskWatch` checks every file system once, places and removes stop
files, deletes at VLOW, and keeps what it placed in its state file.

The state file (``<spool_base_dir>/.mstm-diskwatch.json``) holds each file system's last
level and every stop file placed; it is written at once after a stop file is placed, so
a crash cannot leave a stop file nobody removes.  :func:`load_streams` gives the streams
to watch.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import asdict
from pathlib import Path
from typing import Any

from mstm.config import GlobalConfig, StreamConfig
from mstm.diskwatch.candidates import (
    Candidate,
    delete_item,
    safe_candidates,
    undelivered_candidates,
)
from mstm.diskwatch.levels import MIB, FileSystems, Level, RealFileSystems, Thresholds, Usage
from mstm.diskwatch.report import Action, FsReport, Report, StreamRow
from mstm.diskwatch.stopfiles import (
    STOP_MARK,
    StopRecord,
    Target,
    is_ours,
    keeps_stop,
    place_stop_file,
    targets_of,
    wants_stop,
)
from mstm.humanize import size as human
from mstm.log import event, fields, show
from mstm.smallfiles import replace_file

log = logging.getLogger("mstm.diskwatch")

STATE_FILE = ".mstm-diskwatch.json"  # in spool_base_dir; no stream name starts with "."
_STATE_FORMAT = 1


class DiskWatch:
    """One check: levels of every file system, stop files placed and removed, deletions."""

    def __init__(self, gcfg: GlobalConfig, streams: Sequence[StreamConfig], *,
                 filesystems: FileSystems | None = None, dry_run: bool = False,
                 state_path: Path | None = None,
                 clock: Callable[[], float] = time.time) -> None:
        self.cfg = gcfg.disk_space_monitor
        self.streams = sorted(streams, key=lambda s: (s.priority, s.name))
        self.fs = filesystems or RealFileSystems()
        self.dry_run = dry_run
        self.state_path = state_path or gcfg.spool_base_dir / STATE_FILE
        self.clock = clock
        self.listed = set(gcfg.data_stream_list)
        self._levels: dict[str, Level] = {}
        self._stops: dict[str, StopRecord] = {}
        self._saved = ""  # the state file's text as last written: unchanged, not rewritten
        self._load_state()

    # ---- state

    def _load_state(self) -> None:
        try:
            data = json.loads(self.state_path.read_text("utf-8"))
            if not isinstance(data, dict):
                raise ValueError("not a JSON object")
            self._levels = {m: Level[name] for m, name in data.get("levels", {}).items()}
            self._stops = {p: StopRecord(**r) for p, r in data.get("stops", {}).items()}
        except FileNotFoundError:
            return
        except (OSError, ValueError, KeyError, TypeError) as e:
            # Forgetting our stop files only means they stay: safe, and said loudly.
            log.error("state file %s is unreadable (%s); stop files placed before are kept"
                      " until removed by hand", self.state_path, e)

    def _save_state(self) -> None:
        if self.dry_run:
            return
        data = {"format": _STATE_FORMAT,
                "levels": {m: lv.name for m, lv in sorted(self._levels.items())},
                "stops": {p: asdict(r) for p, r in sorted(self._stops.items())}}
        text = json.dumps(data, indent=1, sort_keys=True) + "\n"
        if text == self._saved:
            return
        try:  # a mkstemp file, then a rename: no link planted in spool_base_dir followed
            replace_file(self.state_path, text.encode("utf-8"), mode=0o640, fsync=True)
            self._saved = text
        except OSError as e:
            log.error("cannot write state file %s: %s (stop files placed now will not be"
                      " removed automatically)", self.state_path, e)

    @property
    def placed(self) -> dict[str, StopRecord]:
        """The stop files this program placed and still owns: path -> record."""
        return dict(self._stops)

    # ---- one check

    def check(self) -> Report:
        report = Report(dry_run=self.dry_run)
        by_mount: dict[str, list[Target]] = {}
        mount_of: dict[Target, str] = {}
        stream_mount: dict[str, str] = {}
        for stream in self.streams:
            for t in targets_of(stream):
                try:
                    mount = self.fs.mount_of(t.directory)
                except OSError as e:
                    report.errors.append(f"stream {t.stream}: {t.directory}: {e.strerror}")
                    log.error("stream %s: cannot check %s: %s", t.stream, t.directory,
                              e.strerror, extra=fields(stream=t.stream))
                    continue
                by_mount.setdefault(mount, []).append(t)
                mount_of[t] = mount
            with contextlib.suppress(OSError):
                stream_mount[stream.name] = self.fs.mount_of(stream.directory)
        levels: dict[str, Level] = {}
        for mount in sorted(by_mount):
            fs_report = self._check_filesystem(mount, by_mount[mount], stream_mount, report)
            if fs_report is not None:
                report.filesystems.append(fs_report)
                levels[mount] = Level[fs_report.level]
        self._forget_orphans({str(t.path) for s in self.streams for t in targets_of(s)},
                             {s.name for s in self.streams}, report)
        for stream in self.streams:
            for t in targets_of(stream):
                where = mount_of.get(t)
                level = levels.get(where) if where else None
                report.streams.append(StreamRow(
                    t.stream, t.priority, t.side, str(t.path), where,
                    level.name if level is not None else None, self._paused_by(t)))
        self._save_state()
        return report

    def _paused_by(self, t: Target) -> str | None:
        key = str(t.path)
        if key in self._stops:
            return "mstm-diskwatch"
        return "operator" if os.path.lexists(t.path) else None

    def _check_filesystem(self, mount: str, targets: list[Target],
                          stream_mount: dict[str, str], report: Report) -> FsReport | None:
        try:
            usage = self.fs.usage(mount)
        except OSError as e:
            report.errors.append(f"{mount}: {e.strerror}")
            log.error("cannot read the free space of %s: %s", mount, e.strerror)
            return None
        th = Thresholds.of(self.cfg, usage.total)
        previous = self._levels.get(mount)
        level = self._set_level(mount, previous, th.next_level(previous, usage.free), usage)
        self._apply_stops(mount, level, usage, targets, report)
        if level == Level.VLOW:
            streams = [s for s in self.streams if stream_mount.get(s.name) == mount]
            free = self._free_space(mount, th, usage, streams, report)
            if free != usage.free and not self.dry_run:
                usage = Usage(usage.total, free)
                level = self._set_level(mount, level, th.next_level(level, free), usage)
                self._apply_stops(mount, level, usage, targets, report)
        return FsReport(mount, usage.total, usage.free, level.name,
                        previous.name if previous is not None else None,
                        {"good": th.good, "low": th.low, "vlow": th.vlow, "margin": th.margin})

    def _set_level(self, mount: str, previous: Level | None, level: Level,
                   usage: Usage) -> Level:
        if self.dry_run:
            return level
        if level != previous and (previous is not None or level != Level.GOOD):
            was = previous.name if previous is not None else "unknown"
            text = (f"disk space on {mount} is {level.name}: {human(usage.free)} free of"
                    f" {human(usage.total)} (was {was})")
            severity = logging.WARNING if level <= Level.LOW else logging.INFO
            if previous is not None and level > previous:
                severity = logging.INFO
            log.log(severity, "%s", text,
                    extra=event("disk_level", item=mount, bytes=usage.free, result=level.name,
                                reason=f"{was} -> {level.name}"))
        self._levels[mount] = level
        return level

    # ---- stop files

    def _stop_text(self, level: Level, mount: str, usage: Usage) -> str:
        when = time.strftime("%Y-%m-%d %H:%M:%S %z", time.localtime(self.clock()))
        return (f"{STOP_MARK} disk space {level.name} on {mount}"
                f" ({usage.free // MIB} MB free)\n"
                f"Placed {when}.  mstm-diskwatch removes this file itself when space is back;\n"
                "it never removes a stop file it did not place.\n")

    def _apply_stops(self, mount: str, level: Level, usage: Usage, targets: list[Target],
                     report: Report) -> None:
        base = self.cfg.base_priority
        # Resume first the most important streams; pause first the least important ones.
        for t in sorted(targets, key=lambda t: (-t.priority, t.stream)):
            rec = self._stops.get(str(t.path))
            if rec is None or keeps_stop(level, t.priority, base):
                continue
            self._remove(t, rec, f"disk space {level.name} on {mount}", report)
        for t in sorted(targets, key=lambda t: (t.priority, t.stream)):
            key = str(t.path)
            rec = self._stops.get(key)
            if rec is not None and not self._still_ours(t, rec, report):
                rec = None
            if rec is not None or not wants_stop(level, t.priority, base):
                continue
            if os.path.lexists(t.path):
                continue  # an operator's (or someone's) stop file: already paused, not ours
            self._place(t, level, mount, usage, report)

    def _still_ours(self, t: Target, rec: StopRecord, report: Report) -> bool:
        if is_ours(t.path, rec):
            return True
        why = ("was removed by someone else" if not os.path.lexists(t.path)
               else "was replaced by someone else; it is left alone")
        action = Action("forget", t.stream, str(t.path), why, done=not self.dry_run)
        if self.dry_run:
            if action not in report.actions:  # asked twice in one check: said once
                report.actions.append(action)
            return False
        log.info("stream %s: stop file %s %s", t.stream, t.path, why,
                 extra=fields(stream=t.stream, item=str(t.path)))
        report.actions.append(action)
        del self._stops[str(t.path)]
        return False

    def _place(self, t: Target, level: Level, mount: str, usage: Usage,
               report: Report) -> None:
        reason = (f"disk space {level.name} on {mount} ({human(usage.free)} free),"
                  f" priority {t.priority} (base_priority {self.cfg.base_priority})")
        if self.dry_run:
            report.actions.append(Action("stop", t.stream, str(t.path), reason, done=False))
            return
        try:
            placed = place_stop_file(t.path, self._stop_text(level, mount, usage))
        except OSError as e:
            report.errors.append(f"stream {t.stream}: cannot place {t.path}: {e.strerror}")
            log.error("stream %s: cannot place stop file %s: %s", t.stream, t.path, e.strerror,
                      extra=fields(stream=t.stream, item=str(t.path)))
            return
        if placed is None:
            return  # appeared just now: someone else's
        dev, ino, first = placed
        self._stops[str(t.path)] = StopRecord(t.stream, dev, ino, first, self.clock(),
                                              level.name)
        self._save_state()  # at once: a crash must not leave a stop file we forgot
        report.actions.append(Action("stop", t.stream, str(t.path), reason))
        log.warning("stream %s paused: placed %s (%s)", t.stream, t.path, reason,
                    extra=fields(stream=t.stream, item=str(t.path), result="stop_placed",
                                 reason=reason))

    def _remove(self, t: Target, rec: StopRecord, reason: str, report: Report) -> None:
        if not self._still_ours(t, rec, report):
            return
        if self.dry_run:
            report.actions.append(Action("resume", t.stream, str(t.path), reason, done=False))
            return
        try:
            os.unlink(t.path)
        except FileNotFoundError:
            pass
        except OSError as e:
            report.errors.append(f"stream {t.stream}: cannot remove {t.path}: {e.strerror}")
            log.error("stream %s: cannot remove stop file %s: %s", t.stream, t.path,
                      e.strerror, extra=fields(stream=t.stream, item=str(t.path)))
            return
        del self._stops[str(t.path)]
        report.actions.append(Action("resume", t.stream, str(t.path), reason))
        log.info("stream %s may resume: removed %s (%s)", t.stream, t.path, reason,
                 extra=fields(stream=t.stream, item=str(t.path), result="stop_removed",
                              reason=reason))

    def _forget_orphans(self, known: set[str], loaded: set[str], report: Report) -> None:
        """Our stop files that no configured stream uses any more: removed (nobody else
        would).  Those of a listed stream whose file does not load stay where they are."""
        for key, rec in sorted(self._stops.items()):
            if key in known or (rec.stream in self.listed and rec.stream not in loaded):
                continue
            t = Target(rec.stream, 0, Path(key).parent, Path(key).name, "unknown")
            self._remove(t, rec, "its stream is no longer configured", report)

    # ---- deletion

    def _free_space(self, mount: str, th: Thresholds, usage: Usage,
                    streams: Iterable[StreamConfig], report: Report) -> int:
        """Delete until free space is above level_vlow plus the margin; the free space now."""
        goal = th.vlow + th.margin
        free = usage.free
        enabled = [s for s in streams if s.deletion_enabled]
        if not enabled:
            log.warning("disk space on %s is VLOW and no stream there has deletion_enabled",
                        mount, extra=fields(item=mount, bytes=free))
            return free
        judged: dict[str, set[str]] = {}
        for s in enabled:  # lowest priority first
            if free >= goal:
                return free
            safe = safe_candidates(s)
            judged[s.name] = {c.relpath for c in safe}
            free = self._delete_all(mount, safe, free, goal, report)
        for s in enabled:
            if free >= goal:
                return free
            if s.delete_undelivered:
                free = self._delete_all(mount, undelivered_candidates(s, judged[s.name]),
                                        free, goal, report)
        if free < goal:
            log.error("disk space on %s is still VLOW (%s free) after deleting every item"
                      " that may be deleted", mount, human(free),
                      extra=fields(item=mount, bytes=free))
        return free

    def _delete_all(self, mount: str, candidates: list[Candidate], free: int, goal: int,
                    report: Report) -> int:
        for c in candidates:
            if free >= goal:
                break
            what = "delivered (verified at the target)" if c.delivered else "NOT delivered"
            reason = f"disk space VLOW on {mount}; {what}"
            path = str(c.directory / c.relpath)
            if self.dry_run:
                report.actions.append(Action("delete", c.stream, path, reason, c.size,
                                             done=False))
                free += c.size  # what deleting it would give back, roughly
                continue
            if not delete_item(c):
                continue
            report.actions.append(Action("delete", c.stream, path, reason, c.size))
            log.log(logging.WARNING if c.delivered else logging.ERROR,
                    "stream %s: deleted %s (%d bytes, %s) to free space on %s", c.stream,
                    show(c.relpath), c.size, what, mount,
                    extra=event("diskwatch_deleted", stream=c.stream, item=c.relpath,
                                bytes=c.size, reason=what))
            try:
                free = self.fs.usage(mount).free
            except OSError:
                free += c.size
        return free


def load_streams(path: Path | None) -> tuple[GlobalConfig, list[StreamConfig], list[str]]:
    """The global file and every stream that loads; a broken stream file is reported, and
    the others are still watched (one typo must not leave every disk unguarded)."""
    from mstm import config
    from mstm.errors import ConfigError

    gcfg = config.load_global(path)
    streams, problems = [], []
    for name in gcfg.data_stream_list:
        try:
            streams.append(config.load_stream(name, path))
        except ConfigError as e:
            problems.append(e.message)
            log.error("stream %s is not watched: %s", name, e.message,
                      extra=fields(stream=name))
    return gcfg, streams, problems


def state_summary(state_path: Path) -> dict[str, Any]:
    """The state file as data (for tests and --json consumers); {} if there is none."""
    try:
        data = json.loads(state_path.read_text("utf-8"))
    except (OSError, ValueError):
        return {}
    return data if isinstance(data, dict) else {}
