"""The audit that ends every torture scenario: nothing lost, nothing twice, nothing torn.

A :class:`Ledger` records every version of every item a scenario's producers put into
the source (content is unique per item and version: a header naming both, then random
bytes).  After the scenario, :func:`audit` compares the ledger with what is at the
source, at the target and in the spool:

* **delivered**: the item's last version is at the target under its own name;
* **failed-kept**: not delivered, but its last version is still at the source (of
  those, **parked** are in the spool's ``failed/`` with a reason);
* **lost**: neither (must be 0);
* **duplicated**: a file at the target under a final name holding another item's
  content, or one record in two spool states at once (must be 0);
* **partial**: a file at the target under a final name whose content is no version the
  source ever had under that name (must be 0).  A :class:`TargetObserver` applies the
  same rule *while* the scenario runs, to every file the moment it is seen.

An item its producer deleted is **withdrawn**: not counted in items, but whatever is at
the target under its name must still be a version it had.

"Final name" means a path with no component starting with "." (items never have one:
the scanner ignores dot files; rsync's temporary files, ``.mstm-partial/``,
``.mstm-staging/`` and ``.mstm-incoming/`` all have one).

Each audit prints one line, ``audit <scenario>: items=N delivered=N failed-kept=N
lost=0 duplicated=0 partial=0`` followed by the scenario's own figures (kills, faults,
seconds), and appends it to the file named by ``$TORTURE_AUDIT_LOG`` if set.
"""

from __future__ import annotations

import base64
import hashlib
import json
import os
import secrets
import threading
import time
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path

AUDIT_LINES: list[str] = []  # every audit line of this process, for the terminal summary


def sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def payload(relpath: bytes, version: int, size: int) -> bytes:
    """Content unique to (item, version): a header naming both, then random bytes."""
    head = b"mstm-torture %s v%d %s\n" % (relpath.hex().encode(), version,
                                           secrets.token_hex(8).encode())
    return (head + os.urandom(max(0, size - len(head))))[: max(size, len(head))]


@dataclass
class Item:
    relpath: bytes
    versions: list[str] = field(default_factory=list)  # sha256 of each version, in order
    withdrawn: bool = False

    @property
    def final(self) -> str | None:
        return None if self.withdrawn or not self.versions else self.versions[-1]


class Ledger:
    """Every item and version the producers put into one source directory (thread-safe)."""

    def __init__(self, source: Path) -> None:
        self.source = source
        self.items: dict[bytes, Item] = {}
        self.owner_of: dict[str, bytes] = {}  # content sha256 -> relpath that had it
        self._lock = threading.Lock()
        self._n = 0

    def _path(self, relpath: bytes) -> bytes:
        return os.path.join(os.fsencode(self.source), relpath)

    def record(self, relpath: bytes, data: bytes) -> str:
        digest = sha(data)
        with self._lock:
            item = self.items.setdefault(relpath, Item(relpath))
            item.versions.append(digest)
            item.withdrawn = False
            self.owner_of.setdefault(digest, relpath)
        return digest

    def version_count(self, relpath: bytes) -> int:
        with self._lock:
            item = self.items.get(relpath)
            return len(item.versions) if item else 0

    def put(self, relpath: bytes | str, size: int, *, atomic: bool = True,
            data: bytes | None = None) -> bytes:
        """Create (or replace) an item at the source; atomic: via a dot-name and rename."""
        rel = os.fsencode(relpath)
        if data is None:
            data = payload(rel, self.version_count(rel), size)
        path = self._path(rel)
        os.makedirs(os.path.dirname(path), exist_ok=True)
        # recorded before it is visible: a scanner must never see an unrecorded version
        self.record(rel, data)
        if atomic:
            with self._lock:
                self._n += 1
                n = self._n
            tmp = os.path.join(os.path.dirname(path), b".producing.%d.%d" % (os.getpid(), n))
            with open(tmp, "wb") as f:
                f.write(data)
            os.rename(tmp, path)
        else:
            with open(path, "wb") as f:
                f.write(data)
        return rel

    def withdraw(self, relpath: bytes | str) -> bool:
        """The producer deletes the item; False if it was no longer there."""
        rel = os.fsencode(relpath)
        try:
            os.unlink(self._path(rel))
        except FileNotFoundError:
            return False
        with self._lock:
            self.items[rel].withdrawn = True
        return True

    def truncate(self, relpath: bytes | str, size: int) -> bool:
        """The producer truncates the item in place (a new, shorter version)."""
        rel = os.fsencode(relpath)
        path = self._path(rel)
        try:
            with open(path, "rb") as f:
                data = f.read(size)
        except FileNotFoundError:
            return False
        self.record(rel, data)
        try:
            os.truncate(path, len(data))  # never longer: truncate(2) would pad with zeros
        except FileNotFoundError:
            return False
        return True

    def final_names(self) -> list[bytes]:
        with self._lock:
            return [r for r, i in self.items.items() if not i.withdrawn]


def is_final_name(rel: bytes) -> bool:
    return not any(part.startswith(b".") for part in rel.split(b"/"))


def walk(root: Path) -> dict[bytes, bytes]:
    """Regular files below *root* under final names: relpath -> absolute path (bytes)."""
    out: dict[bytes, bytes] = {}
    base = os.fsencode(root)
    for dirpath, dirs, names in os.walk(base):
        dirs[:] = [d for d in dirs if not d.startswith(b".")]
        for n in names:
            if n.startswith(b"."):
                continue
            p = os.path.join(dirpath, n)
            if os.path.isfile(p) and not os.path.islink(p):
                out[os.path.relpath(p, base)] = p
    return out


def file_sha(path: bytes) -> str | None:
    try:
        with open(path, "rb") as f:
            h = hashlib.sha256()
            while chunk := f.read(1 << 20):
                h.update(chunk)
            return h.hexdigest()
    except (FileNotFoundError, IsADirectoryError):
        return None


def judge_target_file(ledger: Ledger, rel: bytes, digest: str) -> str | None:
    """None if a target file is fine, else "partial" or "duplicated"."""
    item = ledger.items.get(rel)
    if item is not None and digest in item.versions:
        return None
    owner = ledger.owner_of.get(digest)
    if owner is not None and owner != rel:
        return "duplicated"
    return "partial"


class TargetObserver:
    """Looks at the target every *interval* s while a scenario runs; every file seen under
    a final name must hold some version its source had under that name."""

    def __init__(self, ledger: Ledger, target: Path, interval: float = 0.25,
                 max_seconds: float = 3600) -> None:
        self.ledger = ledger
        self.target = target
        self.interval = interval
        self.max_seconds = max_seconds
        self.problems: list[str] = []
        self.looks = 0
        self._seen: dict[bytes, tuple[int, int, int]] = {}
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="target-observer", daemon=True)

    def __enter__(self) -> TargetObserver:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(timeout=30)

    def _run(self) -> None:
        end = time.monotonic() + self.max_seconds
        while not self._stop.is_set() and time.monotonic() < end:
            self.look()
            self._stop.wait(self.interval)

    def look(self) -> None:
        self.looks += 1
        for rel, path in walk(self.target).items():
            try:
                st = os.stat(path)
            except FileNotFoundError:
                continue
            key = (st.st_ino, st.st_size, st.st_mtime_ns)
            if self._seen.get(rel) == key:
                continue
            digest = file_sha(path)
            if digest is None:
                continue
            self._seen[rel] = key
            verdict = judge_target_file(self.ledger, rel, digest)
            if verdict and len(self.problems) < 100:
                self.problems.append(f"{verdict}: {rel!r} seen with sha256 {digest[:16]}")


@dataclass
class AuditResult:
    scenario: str
    items: int = 0
    delivered: int = 0
    failed_kept: int = 0
    parked: int = 0
    lost: int = 0
    duplicated: int = 0
    partial: int = 0
    withdrawn: int = 0
    source_leftover: int = 0  # delivered, but the source is still there (move mode)
    extra: dict[str, object] = field(default_factory=dict)
    details: list[str] = field(default_factory=list)

    def line(self) -> str:
        base = (f"audit {self.scenario}: items={self.items} delivered={self.delivered} "
                f"failed-kept={self.failed_kept} lost={self.lost} "
                f"duplicated={self.duplicated} partial={self.partial}")
        more = {"parked": self.parked, "withdrawn": self.withdrawn, **self.extra}
        return base + "".join(f" {k}={v}" for k, v in more.items())

    @property
    def clean(self) -> bool:
        return self.lost == 0 and self.duplicated == 0 and self.partial == 0

    def check(self, *, all_delivered: bool = False, no_leftovers: bool = True) -> None:
        """Fail (AssertionError) unless lost, duplicated and partial are 0."""
        problems = list(self.details[:40])
        assert self.clean, f"{self.line()}\n" + "\n".join(problems)
        if all_delivered:
            assert self.delivered == self.items, f"{self.line()}\n" + "\n".join(problems)
        if no_leftovers:
            assert self.source_leftover == 0, f"{self.line()}\n" + "\n".join(problems)


def _spool_states(spool_dir: Path | None) -> tuple[dict[str, list[str]], dict[bytes, str]]:
    """Item id -> states it is in; relpath -> last_error of failed/ records."""
    states: dict[str, list[str]] = {}
    failed: dict[bytes, str] = {}
    if spool_dir is None or not spool_dir.exists():
        return states, failed
    for state in ("new", "claimed", "done", "failed"):
        d = spool_dir / state
        if not d.exists():
            continue
        for name in os.listdir(d):
            states.setdefault(name.partition("@")[0], []).append(state)
            if state == "failed":
                try:
                    obj = json.loads((d / name).read_bytes())
                    rel = base64.b64decode(obj["relpath_b64"])
                    failed[rel] = obj.get("last_error") or ""
                except (OSError, ValueError, KeyError):
                    continue
    return states, failed


def audit(scenario: str, ledger: Ledger, *, target: Path, spool_dirs: Iterable[Path] = (),
          observer: TargetObserver | None = None, move: bool = True,
          extra: dict[str, object] | None = None, emit: bool = True) -> AuditResult:
    """Compare the ledger with source, target and spool; print and log the audit line."""
    res = AuditResult(scenario, extra=dict(extra or {}))
    at_target = {rel: file_sha(p) for rel, p in walk(target).items()}
    at_source = {rel: file_sha(p) for rel, p in walk(ledger.source).items()}
    failed: dict[bytes, str] = {}
    for spool_dir in spool_dirs:
        states, f = _spool_states(spool_dir)
        failed.update(f)
        for item_id, where in states.items():
            if len(where) > 1:
                res.duplicated += 1
                res.details.append(f"duplicated: spool record {item_id} in {where}")
    for rel, digest in at_target.items():
        if digest is None:
            continue
        verdict = judge_target_file(ledger, rel, digest)
        if verdict == "partial":
            res.partial += 1
            res.details.append(f"partial: {rel!r} at the target holds no version it had")
        elif verdict == "duplicated":
            res.duplicated += 1
            res.details.append(f"duplicated: {rel!r} at the target holds "
                               f"{ledger.owner_of[digest]!r}'s content")
    for rel, item in ledger.items.items():
        if item.withdrawn:
            res.withdrawn += 1
            continue
        res.items += 1
        final = item.final
        if at_target.get(rel) == final:
            res.delivered += 1
            if move and at_source.get(rel) == final:
                res.source_leftover += 1
                res.details.append(f"leftover: {rel!r} delivered but still at the source")
        elif at_source.get(rel) == final:
            res.failed_kept += 1
            if rel in failed:
                if not failed[rel]:
                    res.details.append(f"parked without a reason: {rel!r}")
                res.parked += 1
        else:
            res.lost += 1
            res.details.append(f"lost: {rel!r} (target {str(at_target.get(rel))[:12]}, "
                               f"source {str(at_source.get(rel))[:12]}, "
                               f"final {str(final)[:12]}, {len(item.versions)} version(s))")
    if observer is not None:
        for p in observer.problems:
            res.details.append("while running: " + p)
            if p.startswith("partial"):
                res.partial += 1
            else:
                res.duplicated += 1
    if emit:
        emit_line(res.line())
    return res


def emit_line(line: str) -> None:
    AUDIT_LINES.append(line)
    print(line, flush=True)
    log = os.environ.get("TORTURE_AUDIT_LOG")
    if log:
        with open(log, "a") as f:
            f.write(line + "\n")
