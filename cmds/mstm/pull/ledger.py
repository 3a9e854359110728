"""The done-ledger of a pull stream: a text file a person may read and edit.

One line per item, a JSON object (shown folded here; each is one line in the file)::

    {"item": "12282a", "state": "done", "at": "2024-05-01T10:02:11Z",
     "signature": "entries=14 bytes=52428800 mtime=1714557600.2500000000",
     "destination": "/scratch/ny79/12282a"}
    {"item": "99999z", "state": "unmapped", "reason": "no [pull] map rule matches",
     "at": "2024-05-01T10:00:03Z"}

``done`` items are fetched again only when their remote signature (number of entries,
total bytes of regular files, newest mtime in the tree) differs from the one recorded;
``unmapped`` items (no map rule, or a name that is never fetched) were reported once and
are not reported again.  Deleting a line forgets the item: it is fetched (or reported)
again.  A line ``- NAME`` (the form of ASSyncy's ignore.yml) marks NAME as done for good,
whatever its signature.  Lines starting with ``#`` and blank lines are comments.

Every change is a read-modify-write of the whole file under an exclusive ``flock`` on
``<ledger>.lock``: the file is read again, only the lines of the item concerned are
replaced (every other line, comments and hand-written ones included, stays exactly as it
was), and the result is written to a temporary file, fsync'd and renamed into place.  So
several workers, threads or processes, never lose each other's updates (ASSyncy's defect
4), a crash leaves the old or the new file and never half of one, and edits a person
made are respected.  A ledger that cannot be parsed is never overwritten: the stream
stops with the line number, for a person to fix.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from mstm.errors import EXIT_CONFIG, MstmError
from mstm.smallfiles import read_error, read_small

HEADER = (
    "# mstm pull ledger: one line per item (see mstm.conf(5), [pull] ledger).\n"
    "# Delete an item's line to have it fetched (or reported) again; a line \"- NAME\"\n"
    "# marks NAME as done for good.  Safe to edit while mstm runs.\n"
)
#: A ledger larger than this is refused (LedgerError), never read into memory: one line
#: is some 150 bytes, so this is more than a million items.
MAX_LEDGER_BYTES = 256 << 20

DONE = "done"
UNMAPPED = "unmapped"
STATES = (DONE, UNMAPPED)


class LedgerError(MstmError):
    """The ledger cannot be read or written; it is left as it is."""

    exit_code = EXIT_CONFIG


@dataclass(frozen=True)
class Entry:
    item: str
    state: str  # DONE | UNMAPPED
    signature: str | None = None  # DONE: remote signature when done; None: done for good
    at: str | None = None  # when (UTC, ISO 8601)
    destination: str | None = None
    reason: str | None = None
    extra: dict[str, Any] = field(default_factory=dict, compare=False)  # kept as written

    @property
    def done_for_good(self) -> bool:
        return self.state == DONE and self.signature is None

    def to_line(self) -> str:
        obj: dict[str, Any] = {"item": self.item, "state": self.state}
        for key in ("signature", "at", "destination", "reason"):
            value = getattr(self, key)
            if value is not None:
                obj[key] = value
        obj.update({k: v for k, v in self.extra.items() if k not in obj})
        text = json.dumps(obj, ensure_ascii=False)
        try:
            text.encode("utf-8")
        except UnicodeEncodeError:  # a name that is not UTF-8: escape it all
            text = json.dumps(obj, ensure_ascii=True)
        return text


def now_iso() -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())


@dataclass
class _Line:
    text: str
    entry: Entry | None = None


def _parse_line(text: str, path: Path, lineno: int) -> _Line:
    stripped = text.strip()
    if not stripped or stripped.startswith("#") or stripped == "---":
        return _Line(text)
    where = f"{path}: line {lineno}"
    if stripped.startswith("- "):
        name = stripped[2:].strip()
        if len(name) >= 2 and name[0] == name[-1] and name[0] in "\"'":
            name = name[1:-1]
        if not name:
            raise LedgerError(f"{where}: '-' without a name")
        return _Line(text, Entry(item=name, state=DONE, signature=None))
    if not stripped.startswith("{"):
        raise LedgerError(f"{where}: expected a JSON object, '- NAME' or a # comment",
                          hint="fix or delete that line; mstm does not overwrite a ledger"
                               " it cannot read")
    try:
        obj = json.loads(stripped)
    except ValueError as err:
        raise LedgerError(f"{where}: not valid JSON ({err})",
                          hint="fix or delete that line; mstm does not overwrite a ledger"
                               " it cannot read") from None
    if not isinstance(obj, dict) or not isinstance(obj.get("item"), str) or not obj["item"]:
        raise LedgerError(f"{where}: an object with a non-empty \"item\" is expected")
    state = obj.get("state", DONE)
    if state not in STATES:
        raise LedgerError(f"{where}: \"state\" must be one of {', '.join(STATES)}")

    def opt(key: str) -> str | None:
        value = obj.get(key)
        if value is not None and not isinstance(value, str):
            raise LedgerError(f"{where}: \"{key}\" must be a string")
        return value

    known = {"item", "state", "signature", "at", "destination", "reason"}
    return _Line(text, Entry(item=obj["item"], state=state, signature=opt("signature"),
                             at=opt("at"), destination=opt("destination"),
                             reason=opt("reason"),
                             extra={k: v for k, v in obj.items() if k not in known}))


class Ledger:
    """One ledger file; every method is safe from several threads and processes."""

    def __init__(self, path: Path) -> None:
        self.path = Path(path)
        self.lock_path = self.path.with_name(self.path.name + ".lock")

    # -- reading ------------------------------------------------------------------
    def _lines(self) -> list[_Line]:
        try:  # no link followed, no FIFO or device read, MAX_LEDGER_BYTES at most
            data = read_small(self.path, MAX_LEDGER_BYTES)
        except FileNotFoundError:
            return []
        except OSError as err:
            raise LedgerError(f"{self.path}: cannot read: {read_error(err)}") from None
        try:
            text = data.decode("utf-8")
        except UnicodeDecodeError as err:
            line = data[: err.start].count(b"\n") + 1
            raise LedgerError(f"{self.path}: line {line}: not valid UTF-8") from None
        return [_parse_line(t, self.path, n) for n, t in enumerate(text.splitlines(), 1)]

    def read(self) -> dict[str, Entry]:
        """Every item's entry as the file says now (a later line wins over an earlier one)."""
        return {ln.entry.item: ln.entry for ln in self._lines() if ln.entry is not None}

    # -- writing ------------------------------------------------------------------
    @contextlib.contextmanager
    def locked(self) -> Iterator[None]:
        """The exclusive lock every writer holds for its read-modify-write."""
        self.path.parent.mkdir(parents=True, exist_ok=True)
        # each holder opens the file itself: flock then excludes threads of one process
        # as well as other processes
        fd = os.open(self.lock_path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
            yield
        finally:
            os.close(fd)  # releases the flock

    def update(self, change: Callable[[dict[str, Entry]], list[Entry]]) -> dict[str, Entry]:
        """Under the lock: read the file, let *change* see its entries and return the
        entries to set (each replaces that item's lines), write it back atomically."""
        with self.locked():
            lines = self._lines()
            current = {ln.entry.item: ln.entry for ln in lines if ln.entry is not None}
            new = change(current)
            if not new:
                return current
            by_item = {e.item: e for e in new}
            out: list[str] = []
            placed: set[str] = set()
            for ln in lines:
                if ln.entry is not None and ln.entry.item in by_item:
                    if ln.entry.item not in placed:  # the first line of it is replaced
                        out.append(by_item[ln.entry.item].to_line())
                        placed.add(ln.entry.item)
                    continue  # later duplicates go
                out.append(ln.text)
            out += [e.to_line() for e in new if e.item not in placed]
            if not lines:
                out.insert(0, HEADER.rstrip("\n"))
            self._write("".join(t + "\n" for t in out))
            current.update(by_item)
            return current

    def set(self, *entries: Entry) -> None:
        self.update(lambda _current: list(entries))

    def _write(self, text: str) -> None:
        d = self.path.parent
        tmp = d / f".{self.path.name}.tmp.{os.getpid()}.{threading.get_ident()}"
        try:
            mode = self.path.stat().st_mode & 0o7777
        except FileNotFoundError:
            mode = 0o644
        try:
            fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, mode)
            try:
                os.fchmod(fd, mode)
                view = memoryview(text.encode("utf-8"))
                while view:
                    view = view[os.write(fd, view):]
                os.fsync(fd)
            finally:
                os.close(fd)
            os.replace(tmp, self.path)
            dfd = os.open(d, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
            try:
                os.fsync(dfd)
            finally:
                os.close(dfd)
        except OSError as err:
            with contextlib.suppress(OSError):
                os.unlink(tmp)
            raise LedgerError(f"{self.path}: cannot write: {err.strerror or err}") from None
        self._remove_stale_temporaries()

    def _remove_stale_temporaries(self) -> None:
        """Temporary files of writers that died (kill -9) between write and rename."""
        prefix = f".{self.path.name}.tmp."
        with contextlib.suppress(OSError), os.scandir(self.path.parent) as it:
            for e in it:
                if e.name.startswith(prefix):
                    pid = e.name[len(prefix):].split(".")[0]
                    if pid.isdigit() and not _alive(int(pid)):
                        with contextlib.suppress(OSError):
                            os.unlink(e.path)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True
