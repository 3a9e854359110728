"""A target held in memory, with faults a test can inject: the sender's decisions
tested in milliseconds (vdirsyncer's ``storage/memory.py`` is the model).

Only the target is simulated.  The source is the real stream directory, read the way
every transport reads it (through :mod:`mstm.safefs`: nothing below the stream directory
is followed, but for a file item that is a link with *follow_symlinks*), so a test can
rewrite, rename or swap real files and directories at any moment of a delivery.

The target is one namespace of absolute paths: ``files`` (path -> bytes), ``dirs`` (a set
of paths) and ``links`` (path -> what the link says; never followed).  It behaves as
:mod:`mstm.transports.base` specifies: a batch is sent into its staging directory
(:func:`~mstm.transports.base.staging_dir`), ``inspect`` answers size and sha256 (a
directory: ``sha256=None``; through no link), ``publish`` renames files over files and
merges directories (a type conflict is an error for the item, which then changes
nothing), ``discard`` drops what is left of a batch.

Faults are knobs in :class:`Faults` (``transport.faults``), set and cleared by the test:

* ``unreachable``: open() raises TargetUnavailable with that reason;
* ``die_in_send``: the connection dies after that many items of the next send (then
  alive() is False until open() is called again);
* ``corrupt`` / ``drop``: file relpaths whose staged copy is altered (one byte flipped,
  or a byte added to an empty file) or removed right after every send;
* ``publish_errors``: item relpath -> the error publish reports for it;
* ``inspect_unavailable``: inspect raises TargetUnavailable (and the connection is gone);
* ``before_send``: called at the start of every send (the sender's hashing threads may be
  reading the source at the same time);
* ``between``: called once per batch at its first ``inspect(staged=...)``, that is
  after the send and after the sender computed its digests, before it verifies: the
  moment to rewrite, rename or swap a source.
"""

from __future__ import annotations

import hashlib
import os
import stat
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field

from mstm import safefs
from mstm.errors import TargetUnavailable
from mstm.transports.base import (
    STAGING,
    Item,
    Progress,
    RemoteFile,
    SendResult,
    ShouldStop,
    TransportOptions,
    staging_dir,
)


@dataclass
class Faults:
    """What goes wrong at the target; see the module docstring."""

    unreachable: str | None = None
    die_in_send: int | None = None
    corrupt: set[str] = field(default_factory=set)
    drop: set[str] = field(default_factory=set)
    publish_errors: dict[str, str] = field(default_factory=dict)
    inspect_unavailable: str | None = None
    before_send: Callable[[], object] | None = None
    between: Callable[[], object] | None = None


class _Conflict(Exception):
    """A path at the target is of another type than the operation needs."""


def _join(base: str, rel: str) -> str:
    return f"{base.rstrip('/')}/{rel}" if rel else base


def _parents(path: str) -> list[str]:
    """Every ancestor of absolute *path*, outermost first ("/" excluded)."""
    parts = path.strip("/").split("/")
    return ["/" + "/".join(parts[:i]) for i in range(1, len(parts))]


class MemoryTransport:
    """A Transport whose target is a few dictionaries (see the module docstring)."""

    name = "memory"

    def __init__(self, options: TransportOptions) -> None:
        self.source_dir = options.source_dir
        self.target_dir = "/" + options.target_dir.strip("/")
        self.follow_symlinks = options.follow_symlinks
        self.stop_file = options.stop_file
        self.stop_dirs = list(options.stop_dirs) or [self.target_dir]
        self.files: dict[str, bytes] = {}
        self.dirs: set[str] = {*_parents(self.target_dir + "/x")}
        self.links: dict[str, str] = {}
        self.faults = Faults()
        self.connected = False
        # what happened, for the tests' assertions
        self.opens = 0
        self.sent: list[list[str]] = []  # the item relpaths of each send
        self.published: list[str] = []  # item relpaths, in order
        self.inspected: list[list[str]] = []
        self._hook_due: set[str] = set()  # batches whose `between` hook is still to run

    # -- the target, for tests ----------------------------------------------------------
    def kind(self, path: str) -> str | None:
        """"file", "dir", "link" or None for absolute *path* (nothing followed)."""
        if path in self.files:
            return "file"
        if path in self.dirs:
            return "dir"
        if path in self.links:
            return "link"
        return None

    def final_files(self) -> dict[str, bytes]:
        """The files under their final names: relpath (to the target dir) -> bytes."""
        top = self.target_dir + "/"
        return {p[len(top):]: data for p, data in self.files.items()
                if p.startswith(top) and not p[len(top):].startswith(STAGING + "/")}

    def final_dirs(self) -> set[str]:
        top = self.target_dir + "/"
        return {p[len(top):] for p in self.dirs
                if p.startswith(top) and not p[len(top):].startswith(STAGING)}

    def staged(self) -> list[str]:
        """Every path left in the staging area (relative to the target directory)."""
        top = f"{self.target_dir}/{STAGING}/"
        return sorted(p[len(self.target_dir) + 1:] for p in (*self.files, *self.dirs,
                                                             *self.links)
                      if p.startswith(top))

    def put(self, relpath: str, data: bytes) -> None:
        """Create a file under its final name, and its missing parents."""
        path = _join(self.target_dir, relpath)
        self._makedirs(path.rsplit("/", 1)[0])
        self.files[path] = data

    def mkdir(self, relpath: str) -> None:
        self._makedirs(_join(self.target_dir, relpath))

    def symlink(self, relpath: str, to: str) -> None:
        path = _join(self.target_dir, relpath)
        self._makedirs(path.rsplit("/", 1)[0])
        self.links[path] = to

    # -- the connection -------------------------------------------------------------------
    def open(self) -> None:
        if self.faults.unreachable is not None:
            self.connected = False
            raise TargetUnavailable(self.faults.unreachable)
        if not self.connected:
            self.opens += 1
        self.connected = True

    def close(self) -> None:
        self.connected = False

    def alive(self) -> bool:
        return self.connected

    def _require(self) -> None:
        if not self.connected:
            raise TargetUnavailable("memory target: not connected")

    # -- sending --------------------------------------------------------------------------
    def send(self, items: Sequence[Item], *, progress: Progress | None = None,
             should_stop: ShouldStop | None = None, tick: Callable[[], None] | None = None,
             dest: str | None = None) -> SendResult:
        result = SendResult()
        if not self.connected:
            result.error, result.exit_code = "memory target: not connected", 255
            return result
        self.sent.append([i.relpath for i in items])
        if self.faults.before_send is not None:
            self.faults.before_send()
        base = "/" + dest.strip("/") if dest is not None else self.target_dir
        staging = dest is not None
        try:
            root = safefs.open_root(self.source_dir)
        except OSError as err:
            result.error, result.exit_code = f"cannot open the source: {err.strerror}", 23
            return result
        try:
            self._makedirs(base)
            for n, item in enumerate(items):
                if should_stop is not None and should_stop():
                    result.stopped = True
                    return result
                if self.faults.die_in_send is not None and n >= self.faults.die_in_send:
                    self.faults.die_in_send = None
                    self.connected = False
                    result.error, result.exit_code = "memory target: connection lost", 255
                    return result
                try:
                    got = (self._send_tree(root, item.relpath, base) if item.is_dir
                           else self._send_file(root, item.relpath, base))
                except (OSError, ValueError, _Conflict) as err:
                    why = getattr(err, "strerror", None) or str(err)
                    result.item_errors[item.relpath] = why
                    if staging:
                        self._remove(_join(base, item.relpath))
                    continue
                result.files += got[0]
                result.bytes += got[1]
                if progress is not None:
                    progress(result.files, result.bytes, item.relpath)
                if tick is not None:
                    tick()
        finally:
            os.close(root)
        for rel in self.faults.corrupt:
            path = _join(base, rel)
            if path in self.files:
                data = self.files[path]
                self.files[path] = bytes([data[0] ^ 0xFF]) + data[1:] if data else b"\0"
        for rel in self.faults.drop:
            self.files.pop(_join(base, rel), None)
        if staging:
            self._hook_due.add(base)
        if result.item_errors:
            result.error, result.exit_code = "some items could not be sent", 23
        return result

    def _send_file(self, root: int, relpath: str, base: str) -> tuple[int, int]:
        safefs.split(relpath)
        fd = safefs.open_regular(root, relpath, follow_symlinks=self.follow_symlinks)
        with open(fd, "rb", buffering=0) as f:
            data = f.read()
        path = _join(base, relpath)
        self._makedirs(path.rsplit("/", 1)[0])
        if path in self.dirs:
            raise _Conflict(f"{relpath}: a directory is in the way")
        self.links.pop(path, None)
        self.files[path] = data
        return 1, len(data)

    def _send_tree(self, root: int, relpath: str, base: str) -> tuple[int, int]:
        """A directory item: its directories, regular files and links (as links); a
        FIFO, socket or device is not sent."""
        files = nbytes = 0
        for entry in safefs.walk(root, relpath):
            path = _join(base, entry.relpath)
            if entry.is_dir:
                self._makedirs(path)
            elif entry.is_file:
                fd = safefs.open_regular(root, entry.relpath)
                with open(fd, "rb", buffering=0) as f:
                    data = f.read()
                self.files[path] = data
                files, nbytes = files + 1, nbytes + len(data)
            elif stat.S_ISLNK(entry.st.st_mode):
                dir_fd, name = safefs.open_parent(root, entry.relpath)
                try:
                    self.links[path] = os.readlink(name, dir_fd=dir_fd)
                finally:
                    os.close(dir_fd)
        return files, nbytes

    # -- verifying ------------------------------------------------------------------------
    def inspect(self, relpaths: Sequence[str], *, staged: str | None = None
                ) -> dict[str, RemoteFile]:
        self._require()
        base = staging_dir(self.target_dir, staged) if staged is not None else self.target_dir
        if base in self._hook_due:
            self._hook_due.discard(base)
            if self.faults.between is not None:
                self.faults.between()
        if self.faults.inspect_unavailable is not None:
            self.connected = False
            raise TargetUnavailable(self.faults.inspect_unavailable)
        self.inspected.append(list(relpaths))
        found: dict[str, RemoteFile] = {}
        if self.kind(base) != "dir":
            return found
        for rel in relpaths:
            try:
                safefs.split(rel)
            except ValueError:
                continue
            path = _join(base, rel)
            if any(self.kind(p) != "dir" for p in _parents(path) if len(p) > len(base)):
                continue  # missing, or a link or file on the way: nothing is followed
            what = self.kind(path)
            if what == "file":
                data = self.files[path]
                found[rel] = RemoteFile(len(data), hashlib.sha256(data).hexdigest())
            elif what == "dir":
                found[rel] = RemoteFile(0, None)
        return found

    # -- publishing -----------------------------------------------------------------------
    def publish(self, items: Sequence[Item], *, staged: str) -> dict[str, str]:
        self._require()
        stage = staging_dir(self.target_dir, staged)
        errors: dict[str, str] = {}
        for item in items:
            injected = self.faults.publish_errors.get(item.relpath)
            if injected is not None:
                errors[item.relpath] = injected
                continue
            try:
                safefs.split(item.relpath)
                self._place(stage, item)
            except (_Conflict, ValueError) as err:
                errors[item.relpath] = str(err)
                continue
            self.published.append(item.relpath)
        return errors

    def _place(self, stage: str, item: Item) -> None:
        src, dst = _join(stage, item.relpath), _join(self.target_dir, item.relpath)
        for p in _parents(dst):
            if len(p) > len(self.target_dir) and self.kind(p) not in (None, "dir"):
                raise _Conflict(f"{item.relpath}: the target has a {self.kind(p)} on the "
                                f"way ({p}); left as it is")
        have = self.kind(src)
        if have is None:
            raise _Conflict(f"{item.relpath}: not in the staging batch")
        if not item.is_dir:
            if have == "dir" or self.kind(dst) == "dir":
                raise _Conflict(f"{item.relpath}: the target has a directory where the item "
                                f"has a file; left as it is")
            self._makedirs(dst.rsplit("/", 1)[0])
            self._move_leaf(src, dst)
            return
        if have != "dir":
            raise _Conflict(f"{item.relpath}: staged as a {have}, not a directory")
        moves = sorted(self._below(src))
        problems = []
        for rel in ["", *moves]:
            s, d = _join(src, rel), _join(dst, rel)
            ks, kd = self.kind(s), self.kind(d)
            if kd is None or (ks == "dir") == (kd == "dir"):
                continue
            if ks == "dir":
                problems.append(f"{_join(item.relpath, rel)}: the target has a {kd} where the "
                                f"item has a directory; left as it is")
            else:
                problems.append(f"{_join(item.relpath, rel)}: the target has a directory where "
                                f"the item has a {ks}; left as it is")
        if problems:
            raise _Conflict("; ".join(problems[:3]))
        self._makedirs(dst)
        for rel in moves:
            s, d = _join(src, rel), _join(dst, rel)
            if self.kind(s) == "dir":
                self.dirs.add(d)
            else:
                self._move_leaf(s, d)

    def _move_leaf(self, src: str, dst: str) -> None:
        """Rename a file or link over a same-named file or link."""
        self.files.pop(dst, None)
        self.links.pop(dst, None)
        if src in self.files:
            self.files[dst] = self.files.pop(src)
        else:
            self.links[dst] = self.links.pop(src)

    def _below(self, top: str) -> Iterator[str]:
        """The paths below *top*, relative to it."""
        prefix = top + "/"
        for p in (*self.files, *self.dirs, *self.links):
            if p.startswith(prefix):
                yield p[len(prefix):]

    def discard(self, staged: str) -> None:
        self._require()
        stage = staging_dir(self.target_dir, staged)
        self._hook_due.discard(stage)
        self._remove(stage)

    # -- small files ----------------------------------------------------------------------
    def put_file(self, directory: str, name: str, data: bytes) -> None:
        self._require()
        d = "/" + directory.strip("/")
        self._makedirs(d)
        self.files[_join(d, name)] = data

    def await_file(self, directory: str, name: str, *, timeout: float, max_bytes: int,
                   tick: Callable[[], None] | None = None,
                   should_stop: ShouldStop | None = None) -> bytes | None:
        self._require()
        path = _join("/" + directory.strip("/"), name)
        end = time.monotonic() + timeout
        while True:
            if path in self.files:
                return self.files[path][:max_bytes]
            if time.monotonic() >= end or (should_stop is not None and should_stop()):
                return None
            if tick is not None:
                tick()
            time.sleep(0.01)

    def stop_file_present(self) -> str | None:
        self._require()
        for d in self.stop_dirs:
            path = _join("/" + d.strip("/"), self.stop_file)
            if path in self.files:
                return f"the target asks to pause ({path} exists)"
        return None

    # -- the namespace --------------------------------------------------------------------
    def _makedirs(self, path: str) -> None:
        for p in (*_parents(path), path):
            what = self.kind(p)
            if what is None:
                self.dirs.add(p)
            elif what != "dir":
                raise _Conflict(f"{p}: a {what} where a directory is needed")

    def _remove(self, top: str) -> None:
        for p in list(self._below(top)):
            full = _join(top, p)
            self.files.pop(full, None)
            self.links.pop(full, None)
            self.dirs.discard(full)
        self.files.pop(top, None)
        self.links.pop(top, None)
        self.dirs.discard(top)
