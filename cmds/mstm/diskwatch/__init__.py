"""Free-space levels, stop files in priority order, and safe deletion when space is very low.

mstm-diskwatch looks at the file system of every place a stream's stop file lives: the
stream's ``directory`` (where ``[outgoing] stop_file`` pauses the local sender, and remote
senders that deliver into it without the arrival monitor) and, on a receiving host, its
incoming area (``[incoming] incoming_dir``, if that directory exists here; its
``[incoming] stop_file`` pauses remote senders using the arrival monitor).  Each file system gets
a level from its free space (``f_bavail``: what unprivileged writers can still use):

    GOOD   free > level_good
    OKAY   level_low <= free <= level_good
    LOW    level_vlow <= free < level_low
    VLOW   free < level_vlow

Levels are megabytes (MiB, 1048576 bytes) or "N%" of the file system's size.

**Hysteresis.**  A level falls at once but rises only when free space is above the
boundary by ``hysteresis`` (MB or N%); and the actions themselves have a gap: a stream
paused at LOW resumes only at GOOD, one paused at VLOW resumes at OKAY.  A file system
hovering at a threshold therefore neither flaps its level nor its streams.

**Stop files.**  At LOW every stream with ``priority <= base_priority`` is paused, lowest
priority first; at VLOW every stream on that file system is.  A stop file is created
with O_EXCL (an existing one, an operator's, is never overwritten); its first line says
who placed it and why ("mstm-diskwatch: disk space LOW on /data (812 MB free)"), which
mstm-send quotes when it pauses.  Each one placed is recorded, with its inode and first
line, in ``<spool_base_dir>/.mstm-diskwatch.json``; only a file that is still exactly the
one recorded is ever removed, so an operator's stop file is never touched, not even one
written over ours.

**Deletion at VLOW** (only streams with ``deletion_enabled = true``, lowest priority
first, each stream's items oldest first, until free space is back above level_vlow plus
the hysteresis):

1. items that are safe: their ``done/`` record in the stream's spool says a copy with
   exactly this size and mtime was verified at the target (move mode: the sender had not
   deleted the source yet; mirror mode: delivered copies);
2. only with ``delete_undelivered = true``: any other item, delivered or not.

Nothing else is ever deleted (MiStaMover deleted the newest items first without asking
whether they had been delivered).  Paths are walked with O_NOFOLLOW from the stream's
directory, so a symlinked directory cannot lead the deletion elsewhere; symbolic links
are never deleted (that frees nothing).  Each deletion is logged as a
``diskwatch_deleted`` event; each level change as ``disk_level``.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import stat
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import asdict, dataclass, field
from enum import IntEnum
from pathlib import Path
from typing import Any, Protocol

from mstm import safefs
from mstm.config import DiskSpaceConfig, GlobalConfig, StreamConfig, level_value
from mstm.log import event, fields, show
from mstm.spool import ItemRecord, read_records

log = logging.getLogger("mstm.diskwatch")

MIB = 1024 * 1024
STATE_FILE = ".mstm-diskwatch.json"  # in spool_base_dir; no stream name starts with "."
STOP_MARK = "mstm-diskwatch:"
_DIR_FLAGS = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC
_STATE_FORMAT = 1


class Level(IntEnum):
    VLOW = 0
    LOW = 1
    OKAY = 2
    GOOD = 3


# --------------------------------------------------------------------------- file systems


@dataclass(frozen=True)
class Usage:
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


# --------------------------------------------------------------------------- levels


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


# --------------------------------------------------------------------------- stop files


@dataclass(frozen=True)
class Target:
    """One stop file of one stream: in its directory, or in its incoming area."""

    stream: str
    priority: int
    directory: Path
    stop_name: str
    side: str  # "outgoing" | "incoming"

    @property
    def path(self) -> Path:
        return self.directory / self.stop_name


def targets_of(stream: StreamConfig) -> list[Target]:
    """The stop files of *stream*: in its directory, and in its incoming area if that
    exists on this host (it does where mstm-receive receives for the stream)."""
    found = [Target(stream.name, stream.priority, stream.directory,
                    stream.outgoing.stop_file, "outgoing")]
    incoming_dir = getattr(stream.incoming, "incoming_dir", None)
    if incoming_dir is not None and os.path.isdir(incoming_dir):
        incoming = Target(stream.name, stream.priority, Path(incoming_dir),
                          stream.incoming.stop_file, "incoming")
        if incoming.path != found[0].path:
            found.append(incoming)
    return found


def wants_stop(level: Level, priority: int, base: int) -> bool:
    """Should a stream that is running be paused at this level?"""
    return level == Level.VLOW or (level == Level.LOW and priority <= base)


def keeps_stop(level: Level, priority: int, base: int) -> bool:
    """May a stop file we placed stay?  (Paused at LOW: until GOOD; at VLOW: until OKAY.)"""
    return level <= Level.LOW or (level == Level.OKAY and priority <= base)


@dataclass(frozen=True)
class StopRecord:
    """A stop file this program placed, as recorded in the state file."""

    stream: str
    dev: int
    ino: int
    first_line: str
    placed_at: float
    level: str


def _first_line(fd: int) -> str:
    data = os.read(fd, 512)
    return data.split(b"\n", 1)[0].decode("utf-8", "replace")


def _is_ours(path: Path, rec: StopRecord) -> bool:
    """Is the file at *path* still exactly the stop file we placed?"""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC)
    except OSError:
        return False
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode) or (st.st_dev, st.st_ino) != (rec.dev, rec.ino):
            return False
        return _first_line(fd) == rec.first_line
    finally:
        os.close(fd)


def place_stop_file(path: Path, text: str) -> tuple[int, int, str] | None:
    """Create *path* with *text*, never over an existing file; (dev, ino, first line).

    None if a file of that name exists already.  On a full disk the file may stay empty:
    it pauses the stream all the same.
    """
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC,
                     0o644)
    except FileExistsError:
        return None
    try:
        data = text.encode("utf-8")
        try:
            written = os.write(fd, data)
            if written != len(data):
                raise OSError("short write")
            first = text.split("\n", 1)[0]
        except OSError as e:
            log.warning("stop file %s: could not write its text (%s); left empty", path, e)
            os.ftruncate(fd, 0)
            first = ""
        st = os.fstat(fd)
    finally:
        os.close(fd)
    return st.st_dev, st.st_ino, first


# --------------------------------------------------------------------------- what may go


@dataclass(frozen=True)
class Candidate:
    """An item that may be deleted to free space."""

    stream: str
    priority: int
    directory: Path
    relpath: str
    size: int
    mtime_ns: int
    is_dir: bool
    delivered: bool


def _open_parent(root: Path, relpath: str) -> tuple[int, str]:
    """An fd of the directory holding *relpath* (no symlink followed) and the last name."""
    with safefs.opened_root(root) as root_fd:
        return safefs.open_parent(root_fd, relpath)


def tree_signature(dir_fd: int, name: str) -> tuple[int, int]:
    """(total size of regular files, newest mtime) of a directory unit, as mstm-scan sums it."""
    size, newest = 0, 0
    for entry in safefs.walk(dir_fd, name):
        newest = max(newest, entry.st.st_mtime_ns)
        if entry.is_file:
            size += entry.st.st_size
    return size, newest


def _matches(dir_fd: int, name: str, size: int, mtime_ns: int, is_dir: bool) -> bool:
    """Is the item still exactly the version described (and not a symlink)?"""
    try:
        st = os.stat(name, dir_fd=dir_fd, follow_symlinks=False)
        if is_dir:
            return stat.S_ISDIR(st.st_mode) and tree_signature(dir_fd, name) == (size, mtime_ns)
        return stat.S_ISREG(st.st_mode) and (st.st_size, st.st_mtime_ns) == (size, mtime_ns)
    except OSError:
        return False


def done_records(spool_dir: Path) -> Iterator[ItemRecord]:
    """The readable records of a spool's done/ directory (read only; nothing is created)."""
    return read_records(spool_dir / "done")


def safe_candidates(stream: StreamConfig) -> list[Candidate]:
    """Items of *stream* whose exact version was verified at the target, oldest first."""
    found = []
    for rec in done_records(stream.spool_dir):
        try:
            fd, name = _open_parent(stream.directory, rec.relpath)
        except (OSError, ValueError):
            continue
        try:
            if _matches(fd, name, rec.size, rec.mtime_ns, rec.is_dir):
                found.append(Candidate(stream.name, stream.priority, stream.directory,
                                       rec.relpath, rec.size, rec.mtime_ns, rec.is_dir, True))
        finally:
            os.close(fd)
    found.sort(key=lambda c: (c.mtime_ns, c.relpath))
    return found


def undelivered_candidates(stream: StreamConfig, skip: set[str]) -> list[Candidate]:
    """Every other item of *stream* (names starting with "." excepted), oldest first."""
    found = []
    root = str(stream.directory)
    if stream.transfer_unit == "dir":
        with contextlib.suppress(OSError), os.scandir(root) as it:
            for entry in it:
                if entry.name.startswith(".") or entry.name in skip:
                    continue
                try:
                    if not entry.is_dir(follow_symlinks=False):
                        continue
                    fd = os.open(root, _DIR_FLAGS)
                    try:
                        size, mtime = tree_signature(fd, entry.name)
                    finally:
                        os.close(fd)
                except OSError:
                    continue
                found.append(Candidate(stream.name, stream.priority, stream.directory,
                                       entry.name, size, mtime, True, False))
    else:
        with contextlib.suppress(OSError), safefs.opened_root(root) as root_fd:
            for e in safefs.walk(root_fd, "", on_error=lambda rel, err: None):
                if e.depth == 0 or not e.is_file or e.relpath in skip:
                    continue
                if any(p.startswith(".") for p in e.relpath.split("/")):
                    continue
                found.append(Candidate(stream.name, stream.priority, stream.directory,
                                       e.relpath, e.st.st_size, e.st.st_mtime_ns, False, False))
    found.sort(key=lambda c: (c.mtime_ns, c.relpath))
    return found


def delete_item(c: Candidate) -> bool:
    """Delete *c* if it is still exactly the version judged; False if it changed or went."""
    try:
        fd, name = _open_parent(c.directory, c.relpath)
    except (OSError, ValueError):
        return False
    try:
        judged_ns = time.time_ns()
        if not _matches(fd, name, c.size, c.mtime_ns, c.is_dir):
            return False
        if c.is_dir:
            # what was judged, and nothing that came (or changed) since
            pruned = safefs.prune(fd, name, lambda _rel, st: st.st_ctime_ns < judged_ns)
            return not pruned.kept and not pruned.errors
        else:
            os.unlink(name, dir_fd=fd)
        return True
    except FileNotFoundError:
        return False
    finally:
        os.close(fd)


# --------------------------------------------------------------------------- the report


@dataclass
class Action:
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
    mount: str
    total: int
    free: int
    level: str
    previous: str | None
    thresholds: dict[str, int]


@dataclass
class StreamRow:
    stream: str
    priority: int
    side: str
    stop_file: str
    mount: str | None
    level: str | None
    paused_by: str | None  # "mstm-diskwatch" | "operator" | None


@dataclass
class Report:
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


def human(n: int) -> str:
    value = float(n)
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if value < 1024 or unit == "TiB":
            return f"{value:.0f} {unit}" if unit == "B" else f"{value:.1f} {unit}"
        value /= 1024
    raise AssertionError("unreachable")


# --------------------------------------------------------------------------- the watcher


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
        tmp = self.state_path.with_name(f"{self.state_path.name}.{os.getpid()}.tmp")
        try:
            with open(tmp, "w", encoding="utf-8") as f:
                f.write(text)
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, self.state_path)
            self._saved = text
        except OSError as e:
            with contextlib.suppress(OSError):
                tmp.unlink()
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
        if _is_ours(t.path, rec):
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


def status_line(report: Report) -> str:
    """One line for systemctl status: each file system's level and free space."""
    parts = [f"{f.mount} {f.level} ({human(f.free)} free)" for f in report.filesystems]
    paused = sorted({s.stream for s in report.streams if s.paused_by == "mstm-diskwatch"})
    text = "; ".join(parts) or "no file systems to watch"
    if paused:
        text += "; paused: " + ", ".join(paused)
    return text


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
