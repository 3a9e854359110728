"""local: a mounted file system (NFS, Lustre, a local disk): copy, fsync, rename.

What it guarantees:

* **Nothing half-written under a final name.**  Each file is written to a hidden
  `.<name>.mstm-part` beside its final name, `fsync`'d, given the source's mode and
  mtime, then renamed over the final name (`rename(2)`, atomic within a directory also
  on NFS), and the directory is `fsync`'d.  A crash leaves at most the `.mstm-part`
  file, which the next attempt replaces.
* **Directory items** (`transfer_unit = dir`) are copied into
  `<target_dir>/.mstm-staging/<name>` and renamed into place by `publish` after they
  were verified; a directory already there is replaced (moved aside, then removed).
  Symbolic links inside them are copied as links, never followed.
* **Symbolic links as file items** (`follow_symlinks = true`): the file a link points to
  is copied (and so verified); otherwise a source that is a link is refused (the
  scanner never queues one then).  Only regular files are ever opened: a FIFO or device
  is refused, never read.
* **Verification** (`inspect`): size from `stat` and sha256 computed by reading the
  file under its final name (or in the staging area) after the copy was `fsync`'d.  The
  page cache is dropped for the file first (`posix_fadvise(DONTNEED)`), so on a network
  file system the bytes are fetched again from the server where the kernel honours
  that; where it does not (the pages may stay cached), the check proves what this host
  sees, which on NFS's close-to-open consistency is what the server acknowledged.
* **Quick check**: a file whose target already has the source's size and mtime is not
  copied again (as rsync does) unless the sender forces it after a failed check.
* **bwlimit** is honoured by pacing the copy loop; **stall_seconds**: a copy that
  completes no chunk for that long (a hung mount) is abandoned, the transport reports
  itself dead and the sender backs off; **connect_timeout** bounds the check that
  target_dir is there (a `stat` of a hung mount point would otherwise hang).
* Errors that mean the file system itself is unwell (EIO, ESTALE, ENOTCONN, ENOSPC,
  EDQUOT, EROFS, ...) fail the whole batch as "target unavailable"; other errors (a
  name too long, permission denied on one file) fail that item only.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import logging
import os
import secrets
import shutil
import stat
import threading
from collections.abc import Callable, Sequence
from pathlib import Path

from mstm.errors import TargetUnavailable
from mstm.scan import open_regular
from mstm.transports.base import Item, Progress, RemoteFile, SendResult, ShouldStop
from mstm.transports.common import (
    STAGING,
    Monitor,
    Throttle,
    call_watched,
    chunk_size,
    note_item_errors,
    part_name,
    poll_until,
    run_watched,
)

log = logging.getLogger("mstm.local")

# errno values that mean the target file system, not one item, is in trouble
UNAVAILABLE = frozenset({
    errno.EIO, errno.ESTALE, errno.ENOTCONN, errno.ETIMEDOUT, errno.EHOSTDOWN,
    errno.EHOSTUNREACH, errno.ENODEV, errno.ENOSPC, errno.EDQUOT, errno.EROFS,
    errno.ENXIO, errno.ECONNREFUSED, errno.ECONNRESET,
})
_BIG_CHUNK = 8 << 20
_HASH_BLOCK = 1 << 20


class TargetGone(Exception):
    """Raised inside the worker when the file system fails as a whole."""


class Local:
    name = "local"

    def __init__(self, *, source_dir: Path, target_dir: str, stall_seconds: float = 120.0,
                 connect_timeout: float = 15.0, bwlimit: int = 0,
                 stop_file: str = ".stop", stop_dirs: Sequence[str] = (),
                 follow_symlinks: bool = False) -> None:
        self.source = os.fsencode(source_dir)
        self.follow_symlinks = follow_symlinks  # file items: a link goes as its file
        self.target = os.fsencode(target_dir.rstrip("/") or "/")
        self.stall_seconds = stall_seconds
        self.connect_timeout = connect_timeout
        self.bwlimit = bwlimit
        self.stop_file = stop_file
        self.stop_dirs = [os.fsencode(d) for d in stop_dirs] or [self.target]
        self._open = False

    # -- connection -------------------------------------------------------------
    def open(self) -> None:
        if self._open:
            return
        target = self.target

        def check(mon: Monitor) -> str | None:
            try:
                st = os.stat(target)
            except OSError as err:
                return f"{os.fsdecode(target)}: {err.strerror}"
            if not stat.S_ISDIR(st.st_mode):
                return f"{os.fsdecode(target)}: not a directory"
            if not os.access(target, os.W_OK | os.X_OK):
                return f"{os.fsdecode(target)}: not writable by uid {os.geteuid()}"
            return None

        problem = call_watched(check, stall_seconds=self.connect_timeout, abort=lambda: None,
                               what=f"{os.fsdecode(target)} does not answer")
        if problem:
            raise TargetUnavailable(problem)
        self._open = True

    def close(self) -> None:
        self._open = False

    def alive(self) -> bool:
        return self._open

    # -- transfer ---------------------------------------------------------------
    def send(self, items: Sequence[Item], *, progress: Progress | None = None,
             should_stop: ShouldStop | None = None, tick: Callable[[], None] | None = None,
             dest: str | None = None) -> SendResult:
        """Send *items* under target_dir (directories into the staging area), or all
        of them, directories as trees, into *dest*."""
        root = os.fsencode(dest) if dest is not None else self.target
        monitor = Monitor(progress=progress, throttle=Throttle(self.bwlimit))
        cut = threading.Event()

        def work(mon: Monitor) -> SendResult:
            result = SendResult()
            for item in items:
                try:
                    if item.is_dir:
                        tree = root if dest is not None else os.path.join(
                            root, STAGING.encode())
                        self._copy_tree(item, tree, mon, cut)
                    else:
                        src = os.path.join(self.source, os.fsencode(item.relpath))
                        dst = os.path.join(root, os.fsencode(item.relpath))
                        self._copy_file(src, dst, mon, cut, force=item.force, staged=False)
                except OSError as err:
                    if err.errno in UNAVAILABLE or cut.is_set():
                        self._open = False
                        result.error = f"{os.fsdecode(self.target)}: {err.strerror or err}"
                        result.exit_code = 1
                        break
                    result.item_errors[item.relpath] = err.strerror or str(err)
            result.files, result.bytes = mon.files, mon.bytes
            return result

        def abort() -> None:
            cut.set()  # a write blocked in the kernel cannot be interrupted from here
            self._open = False

        result = run_watched(work, monitor=monitor, stall_seconds=self.stall_seconds,
                             abort=abort, should_stop=should_stop, tick=tick, grace=2.0)
        if result.error:
            self._open = False
        return note_item_errors(result)

    def _copy_file(self, src: bytes, dst: bytes, mon: Monitor, cut: threading.Event, *,
                   force: bool, staged: bool) -> None:
        # a file of a directory item (staged) is never read through a link
        fin = open_regular(src, follow_symlinks=self.follow_symlinks and not staged)
        try:
            st = os.fstat(fin)
            if not force:
                with contextlib.suppress(OSError):
                    t = os.stat(dst, follow_symlinks=False)
                    if stat.S_ISREG(t.st_mode) and (t.st_size, t.st_mtime_ns) == (
                            st.st_size, st.st_mtime_ns):
                        return
            parent = os.path.dirname(dst)
            os.makedirs(parent, exist_ok=True)
            # inside the staging area nothing is visible: write under the final name there
            tmp = dst if staged else os.fsencode(part_name(os.fsdecode(dst)))
            with contextlib.suppress(FileNotFoundError):
                os.unlink(tmp)
            fout = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)
            try:
                self._pump(fin, fout, mon, cut)
                os.fchmod(fout, stat.S_IMODE(st.st_mode))
                os.utime(fout, ns=(st.st_atime_ns, st.st_mtime_ns))
                os.fsync(fout)
            except BaseException:
                os.close(fout)
                with contextlib.suppress(OSError):
                    os.unlink(tmp)
                raise
            os.close(fout)
        finally:
            os.close(fin)
        if tmp != dst:
            os.replace(tmp, dst)
        _fsync_dir(parent)
        mon.file_done()

    def _pump(self, fin: int, fout: int, mon: Monitor, cut: threading.Event) -> None:
        limited = self.bwlimit > 0
        size = chunk_size(self.bwlimit, 1 << 20 if limited else _BIG_CHUNK)
        use_cfr = not limited and hasattr(os, "copy_file_range")
        while True:
            if cut.is_set():
                raise OSError(errno.ETIMEDOUT, "transfer cut after a stall")
            n = 0
            if use_cfr:
                try:
                    n = os.copy_file_range(fin, fout, size)
                except OSError as err:
                    if err.errno not in (errno.EXDEV, errno.ENOSYS, errno.EINVAL,
                                         errno.EOPNOTSUPP, errno.EBADF, errno.EPERM):
                        raise
                    use_cfr = False
                    continue
            else:
                data = os.read(fin, size)
                view = memoryview(data)
                while view:
                    written = os.write(fout, view)
                    view = view[written:]
                n = len(data)
            if n == 0:
                return
            mon.advance(n)

    def _copy_tree(self, item: Item, tree: bytes, mon: Monitor, cut: threading.Event) -> None:
        rel = os.fsencode(item.relpath)
        src_root = os.path.join(self.source, rel)
        dst_root = os.path.join(tree, rel)
        os.makedirs(dst_root, exist_ok=True)
        for dirpath, dirnames, filenames in os.walk(src_root):
            sub = os.path.relpath(dirpath, src_root)
            out_dir = os.path.normpath(os.path.join(dst_root, sub))
            for d in dirnames:
                p = os.path.join(dirpath, d)
                if os.path.islink(p):
                    _copy_link(p, os.path.join(out_dir, d))
                else:
                    os.makedirs(os.path.join(out_dir, d), exist_ok=True)
            for f in filenames:
                p = os.path.join(dirpath, f)
                st = os.lstat(p)
                if stat.S_ISLNK(st.st_mode):
                    _copy_link(p, os.path.join(out_dir, f))
                elif stat.S_ISREG(st.st_mode):
                    self._copy_file(p, os.path.join(out_dir, f), mon, cut, force=item.force,
                                    staged=True)
            mon.alive_now()

    # -- verification -----------------------------------------------------------
    def inspect(self, relpaths: Sequence[str], *, staged: bool = False) -> dict[str, RemoteFile]:
        if not relpaths:
            return {}
        base = os.path.join(self.target, STAGING.encode()) if staged else self.target

        def look(mon: Monitor) -> dict[str, RemoteFile]:
            found: dict[str, RemoteFile] = {}
            for rel in relpaths:
                path = os.path.join(base, os.fsencode(rel))
                try:
                    found[rel] = _hash(path, mon)
                except OSError as err:
                    if err.errno in UNAVAILABLE:
                        raise TargetUnavailable(f"{os.fsdecode(path)}: {err.strerror}"
                                                ) from None
                mon.alive_now()
            return found

        return call_watched(look, stall_seconds=self.stall_seconds, abort=self.close,
                            what=f"reading back from {os.fsdecode(self.target)}")

    def publish(self, items: Sequence[Item]) -> dict[str, str]:
        errors: dict[str, str] = {}
        staging = os.path.join(self.target, STAGING.encode())
        for item in items:
            if not item.is_dir:
                continue
            rel = os.fsencode(item.relpath)
            final = os.path.join(self.target, rel)
            staged = os.path.join(staging, rel)
            old = None
            try:
                os.makedirs(os.path.dirname(final), exist_ok=True)
                if os.path.lexists(final):
                    old = os.path.join(staging, b".replaced." + secrets.token_hex(6).encode())
                    os.rename(final, old)
                try:
                    os.rename(staged, final)
                except OSError:
                    if old:
                        os.rename(old, final)
                        old = None
                    raise
                _fsync_dir(os.path.dirname(final))
            except OSError as err:
                errors[item.relpath] = f"could not be moved into place: {err.strerror or err}"
                continue
            if old:
                shutil.rmtree(old, ignore_errors=True)
                with contextlib.suppress(OSError):
                    os.unlink(old)
        return errors

    # -- small files (the arrival monitor's handshake) ---------------------------
    def put_file(self, directory: str, name: str, data: bytes) -> None:
        d = os.fsencode(directory)
        final = os.path.join(d, os.fsencode(name))
        tmp = os.fsencode(part_name(os.fsdecode(final)))
        os.makedirs(d, exist_ok=True)
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o640)
        try:
            view = memoryview(data)
            while view:
                view = view[os.write(fd, view):]
            os.fsync(fd)
        finally:
            os.close(fd)
        os.replace(tmp, final)
        _fsync_dir(d)

    def await_file(self, directory: str, name: str, *, timeout: float, max_bytes: int,
                   tick: Callable[[], None] | None = None,
                   should_stop: ShouldStop | None = None) -> bytes | None:
        path = os.path.join(os.fsencode(directory), os.fsencode(name))

        def look() -> bytes | None:
            try:
                with open(path, "rb") as f:
                    return f.read(max_bytes)
            except FileNotFoundError:
                return None

        return poll_until(look, timeout=timeout, interval=0.05, tick=tick,
                          should_stop=should_stop)

    def stop_file_present(self) -> str | None:
        for d in self.stop_dirs:
            if os.path.lexists(os.path.join(d, os.fsencode(self.stop_file))):
                return f"{self.stop_file} on target ({os.fsdecode(d)})"
        return None


def _hash(path: bytes, mon: Monitor) -> RemoteFile:
    fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC | os.O_NOFOLLOW)
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            raise OSError(errno.EISDIR, "not a regular file")
        with contextlib.suppress(OSError, AttributeError):
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        h = hashlib.sha256()
        size = 0
        while chunk := os.read(fd, _HASH_BLOCK):
            h.update(chunk)
            size += len(chunk)
            mon.alive_now()
        return RemoteFile(size=size, sha256=h.hexdigest())
    finally:
        os.close(fd)


def _copy_link(src: bytes, dst: bytes) -> None:
    with contextlib.suppress(FileNotFoundError):
        os.unlink(dst)
    os.symlink(os.readlink(src), dst)


def _fsync_dir(path: bytes) -> None:
    try:
        fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError as err:
        if err.errno not in (errno.EINVAL, errno.EBADF):  # some file systems refuse
            raise
    finally:
        os.close(fd)
