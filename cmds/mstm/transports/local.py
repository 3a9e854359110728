"""local: a mounted file system (NFS, Lustre, a local disk): copy, fsync, rename.

What it guarantees:

* **Nothing unverified under a final name.**  The sender sends every item (file or
  directory) into a batch directory of its own, ``<target_dir>/.mstm-staging/<batch>/``
  (made mode 0700), verifies it there (`inspect`), and only then has it `publish`ed:
  renamed into place, the target directories `fsync`'d before `publish` returns.  Each
  staged file is `fsync`'d before it is reported sent.  A file rewritten while it was
  being copied is refused at once (its size, mtime or ctime moved); in any case the
  sender's own hash of the source would not match, so nothing is published.
  `discard` removes what is left of a batch; a batch a killed sender left behind is
  removed by `open` once nothing in it changed for a day (only names of the exact
  shape of :func:`mstm.protocol.new_batch_id`; nothing else in ``.mstm-staging`` is
  ever touched).
* **File items** replace a same-named file (or link) by `rename(2)` (atomic); a
  directory of that name is a type conflict: the item fails, nothing changes.
* **Directory items** are *merged*: a directory the target lacks is renamed into
  place whole (``renameat2(RENAME_NOREPLACE)``: the item's tree appears at once);
  into an existing directory each file is renamed over a same-named non-directory,
  missing subdirectories are moved in, and nothing else there is touched or removed.
  All type conflicts are looked for first: a file where the item has a directory, a
  directory where it has a file, or a symbolic link where it needs a directory fail
  the item with nothing changed.  (A conflict created by someone else *during* the
  merge fails the item with what was already merged left in place; nothing is lost.)
* **Links at the target are never written through.**  Every path below target_dir is
  opened from a descriptor with ``O_NOFOLLOW | O_DIRECTORY`` one component at a time
  (or :func:`mstm.safefs.open_beneath`): a planted ``target/run42 -> elsewhere``, or a
  parent component that is a link, fails the item (ELOOP); no window: the kernel
  checks at each open.  target_dir itself may be reached through a link (the
  administrator's configuration).
* **The source is read only through** :mod:`mstm.safefs`: no component below the
  stream directory is ever followed (a file item's last component only with
  ``follow_symlinks``), a directory item is walked from descriptors (no depth limit),
  and only regular files are opened.  A directory item holding a symbolic link, FIFO,
  socket or device fails as a whole (the sender refuses those items too): such a thing
  is never created at the target.
* **Modes and ownership**: a file gets its source's permission bits ``& 0o777``; a
  directory of a directory item gets ``(source mode & 0o777) | 0o700`` (the owner must
  be able to write into it, for this merge and the next); directories above an item
  are made with the default mode (0777 less the umask).  setuid, setgid and sticky
  bits never survive, also when running as root.  Ownership is never copied: files
  belong to whoever writes them.  The mtime is kept.
* **Verification** (`inspect`): size and sha256 computed by reading the staged file
  (or the file under its final name) after it was `fsync`'d, through no link.  The
  page cache is dropped for the file first (`posix_fadvise(DONTNEED)`), so on a
  network file system the bytes are fetched again from the server where the kernel
  honours that; where it does not, the check proves what this host sees, which on
  NFS's close-to-open consistency is what the server acknowledged.  A directory is
  reported present with ``sha256=None``.
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
import logging
import os
import stat
import threading
import time
from collections.abc import Callable, Sequence

from mstm import safefs
from mstm.errors import TargetUnavailable
from mstm.protocol import OUR_BATCH_RE
from mstm.transports.base import (
    STAGING,
    Item,
    Progress,
    RemoteFile,
    SendResult,
    ShouldStop,
    TransportOptions,
)
from mstm.transports.common import (
    STALE_SECONDS,
    ItemProblem,
    Monitor,
    Throttle,
    call_watched,
    chunk_size,
    dir_mode,
    file_mode,
    note_item_errors,
    open_source_root,
    part_name,
    poll_until,
    run_watched,
    staged_rel,
    staging_batch,
)
from mstm.transports.local_tree import (
    DIR_FLAGS,
    fd_headroom,
    fsync_dir,
    fsync_fd,
    keep_dirty,
    look_at,
    makedirs_at,
    merge_tree,
    refuse_dir,
    target_dir_at,
)

log = logging.getLogger("mstm.local")

# errno values that mean the target file system, not one item, is in trouble
UNAVAILABLE = frozenset({
    errno.EIO, errno.ESTALE, errno.ENOTCONN, errno.ETIMEDOUT, errno.EHOSTDOWN,
    errno.EHOSTUNREACH, errno.ENODEV, errno.ENOSPC, errno.EDQUOT, errno.EROFS,
    errno.ENXIO, errno.ECONNREFUSED, errno.ECONNRESET,
})
_BIG_CHUNK = 8 << 20
_WRITE_FLAGS = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC


class TargetGone(Exception):
    """Raised inside the worker when the file system fails as a whole."""


def split_path(path: str | bytes) -> list[bytes]:
    raw = os.fsencode(path).strip(b"/")
    return safefs.split(raw) if raw else []


class Local:
    name = "local"

    def __init__(self, options: TransportOptions) -> None:
        self.source = os.fsencode(options.source_dir)
        self.follow_symlinks = options.follow_symlinks  # file items: a link goes as its file
        self.target = os.fsencode(options.target_dir.rstrip("/") or "/")
        self.stall_seconds = options.stall_seconds
        self.connect_timeout = options.connect_timeout
        self.bwlimit = options.bwlimit
        self.stop_file = options.stop_file
        self.stop_dirs = [os.fsencode(d) for d in options.stop_dirs] or [self.target]
        self._open = False
        self._unfinished: set[str] = set()  # staging batches sent into, not discarded yet

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
        for batch in sorted(self._unfinished):
            with contextlib.suppress(OSError, TargetUnavailable):
                self.discard(batch)
        try:
            call_watched(self._clean_stale, stall_seconds=self.stall_seconds,
                         abort=lambda: None, what=f"cleaning {STAGING} at {os.fsdecode(target)}")
        except (OSError, TargetUnavailable) as err:
            log.warning("%s: cannot clean old staging batches: %s", os.fsdecode(target), err)

    def _clean_stale(self, mon: Monitor) -> None:
        """Remove the staging batches a killed sender left: batch-shaped names only,
        nothing in them changed for STALE_SECONDS."""
        with safefs.opened_root(self.target) as root:
            try:
                fd = safefs.open_beneath(root, STAGING)
            except (FileNotFoundError, NotADirectoryError):
                return
            except OSError as err:
                if err.errno == errno.ELOOP:
                    log.warning("%s/%s is a symbolic link: not used, not cleaned",
                                os.fsdecode(self.target), STAGING)
                    return
                raise
            try:
                names = os.listdir(fd)
            finally:
                os.close(fd)
            limit = time.time() - STALE_SECONDS
            for name in names:
                if not OUR_BATCH_RE.match(name) or name in self._unfinished:
                    continue
                rel = f"{STAGING}/{name}"
                try:
                    fresh = any(e.st.st_mtime > limit
                                for e in safefs.walk(root, rel))
                except OSError:
                    continue
                if not fresh:
                    log.info("removing the abandoned staging batch %s/%s",
                             os.fsdecode(self.target), rel)
                    safefs.prune(root, rel, lambda _rel, _st: True)
                mon.alive_now()

    def close(self) -> None:
        self._open = False

    def alive(self) -> bool:
        return self._open

    # -- transfer ---------------------------------------------------------------
    def send(self, items: Sequence[Item], *, progress: Progress | None = None,
             should_stop: ShouldStop | None = None, tick: Callable[[], None] | None = None,
             dest: str | None = None) -> SendResult:
        """Send *items* into *dest* (a staging batch, or the arrival monitor's batch
        directory), directories as trees.  Without *dest*, file items go straight to
        target_dir (a hidden name, then a rename) and directory items are refused."""
        monitor = Monitor(progress=progress, throttle=Throttle(self.bwlimit))
        cut = threading.Event()
        private = staging_batch(self.target, dest)
        if private:
            self._unfinished.add(private)

        def work(mon: Monitor) -> SendResult:
            result = SendResult()
            src = open_source_root(self.source, items, result)
            if src is None:
                return result
            src_fd: int = src
            try:
                try:
                    dest_fd = self._open_dest(dest, private=private is not None)
                except OSError as err:
                    if err.errno in UNAVAILABLE:
                        raise
                    why = ("a symbolic link on the way" if err.errno == errno.ELOOP
                           else err.strerror or str(err))
                    for item in items:
                        result.item_errors[item.relpath] = f"cannot make {dest}: {why}"
                    return result
                try:
                    for item in items:
                        try:
                            if item.is_dir and dest is None:
                                raise ItemProblem("a directory item needs a staging batch")
                            if item.is_dir:
                                self._copy_tree(src_fd, item, dest_fd, mon, cut)
                            else:
                                self._copy_item_file(src_fd, item, dest_fd, mon, cut,
                                                     direct=dest is None)
                        except ItemProblem as err:
                            result.item_errors[item.relpath] = str(err)
                        except OSError as err:
                            if err.errno in UNAVAILABLE or cut.is_set():
                                raise
                            result.item_errors[item.relpath] = _why(err)
                finally:
                    os.close(dest_fd)
            except OSError as err:
                self._open = False
                result.error = f"{os.fsdecode(self.target)}: {err.strerror or err}"
                result.exit_code = 1
            finally:
                os.close(src_fd)
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

    def _open_dest(self, dest: str | None, *, private: bool) -> int:
        """A descriptor of *dest*, made if missing (0700 for staging), reached below
        target_dir with no link followed."""
        if dest is None:
            return safefs.open_root(self.target)
        raw = os.fsencode(dest).rstrip(b"/") or b"/"
        prefix = self.target.rstrip(b"/") + b"/"
        if raw.startswith(prefix) or raw == self.target:
            base, rel = self.target, raw[len(prefix):] if raw != self.target else b""
        else:  # the arrival monitor's incoming directory: the configured path may be a link
            base, rel = os.path.split(raw)
            os.makedirs(base, exist_ok=True)
        with safefs.opened_root(base) as base_fd:
            return makedirs_at(base_fd, split_path(rel), 0o700 if private else 0o777)

    def _copy_item_file(self, src_fd: int, item: Item, dest_fd: int, mon: Monitor,
                        cut: threading.Event, *, direct: bool) -> None:
        parts = split_path(item.relpath)
        parent = makedirs_at(dest_fd, parts[:-1], 0o777 if direct else 0o700)
        try:
            self._copy_file(src_fd, item.relpath, parent, parts[-1], mon, cut,
                            follow=self.follow_symlinks, direct=direct)
            if direct:
                fsync_fd(parent)
        finally:
            os.close(parent)

    def _copy_file(self, src_fd: int, relpath: str, dir_fd: int, name: bytes, mon: Monitor,
                   cut: threading.Event, *, follow: bool, direct: bool = False) -> None:
        """Copy the source file *relpath* to *name* in *dir_fd*; *direct*: through a
        hidden name renamed over it."""
        mon.start_file(relpath)
        fin = safefs.open_regular(src_fd, relpath, follow_symlinks=follow)
        tmp = os.fsencode(part_name(os.fsdecode(name))) if direct else name
        try:
            st = os.fstat(fin)
            with contextlib.suppress(FileNotFoundError):
                os.unlink(tmp, dir_fd=dir_fd)
            fout = os.open(tmp, _WRITE_FLAGS, 0o600, dir_fd=dir_fd)
            try:
                self._pump(fin, fout, mon, cut)
                os.fchmod(fout, file_mode(st.st_mode))
                os.utime(fout, ns=(st.st_atime_ns, st.st_mtime_ns))
                os.fsync(fout)
                changed = safefs.Version.of(st).same_file(os.fstat(fin))
                if changed:
                    raise ItemProblem(f"{relpath}: the source changed while it was being "
                                      f"sent ({changed})")
            except BaseException:
                os.close(fout)
                with contextlib.suppress(OSError):
                    os.unlink(tmp, dir_fd=dir_fd)
                raise
            os.close(fout)
        finally:
            os.close(fin)
        if tmp != name:
            os.rename(tmp, name, src_dir_fd=dir_fd, dst_dir_fd=dir_fd)
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

    def _copy_tree(self, src_fd: int, item: Item, dest_fd: int, mon: Monitor,
                   cut: threading.Event) -> None:
        """A directory item, walked with :func:`mstm.safefs.walk` (nothing followed),
        into *dest_fd*: directories made, regular files copied, anything else refused."""
        parts = split_path(item.relpath)
        stack = [makedirs_at(dest_fd, parts[:-1], 0o700)]  # stack[d]: parent of depth d
        try:
            for entry in safefs.walk(src_fd, item.relpath):
                while len(stack) > entry.depth + 1:
                    os.close(stack.pop())
                name = os.fsencode(entry.relpath.rsplit("/", 1)[-1])
                parent = stack[entry.depth]
                if entry.is_dir:
                    fd_headroom(2 * len(stack) + 64)
                    with contextlib.suppress(FileExistsError):
                        os.mkdir(name, 0o700, dir_fd=parent)
                    fd = os.open(name, DIR_FLAGS, dir_fd=parent)
                    os.fchmod(fd, dir_mode(entry.st.st_mode))
                    stack.append(fd)
                elif entry.is_file:
                    self._copy_file(src_fd, entry.relpath, parent, name, mon, cut,
                                    follow=False)
                else:
                    raise ItemProblem(
                        f"{entry.relpath} is a {safefs.special_reason(entry.st.st_mode)}: a "
                        f"directory item carries only regular files and directories")
                mon.alive_now()
        finally:
            for fd in stack:
                os.close(fd)

    # -- verification -----------------------------------------------------------
    def inspect(self, relpaths: Sequence[str], *, staged: str | None = None
                ) -> dict[str, RemoteFile]:
        if not relpaths:
            return {}
        base = staged_rel(staged) if staged is not None else ""

        def look(mon: Monitor) -> dict[str, RemoteFile]:
            found: dict[str, RemoteFile] = {}
            try:
                with safefs.opened_root(self.target) as root:
                    try:
                        base_fd = safefs.open_beneath(root, base)
                    except (FileNotFoundError, NotADirectoryError):
                        return found
                    try:
                        for rel in relpaths:
                            got = look_at(base_fd, rel, mon)
                            if got is not None:
                                found[rel] = got
                            mon.alive_now()
                    finally:
                        os.close(base_fd)
            except OSError as err:
                if err.errno in UNAVAILABLE:
                    raise TargetUnavailable(f"{os.fsdecode(self.target)}: {err.strerror}"
                                            ) from None
                if err.errno != errno.ELOOP:
                    raise
            return found

        return call_watched(look, stall_seconds=self.stall_seconds, abort=self.close,
                            what=f"reading back from {os.fsdecode(self.target)}")

    # -- publishing -------------------------------------------------------------
    def publish(self, items: Sequence[Item], *, staged: str) -> dict[str, str]:
        """Rename the verified *items* of batch *staged* into place (see the module
        docstring: files replace, directories merge, links on the way refused)."""
        if not items:
            return {}
        rel = staged_rel(staged)

        def work(mon: Monitor) -> dict[str, str]:
            errors: dict[str, str] = {}
            with safefs.opened_root(self.target) as root:
                try:
                    stage_fd = safefs.open_beneath(root, rel)
                except OSError as err:
                    return {i.relpath: f"the staging batch cannot be opened: {_why(err)}"
                            for i in items}
                dirty: dict[tuple[int, int], int] = {}
                try:
                    for item in items:
                        try:
                            if item.is_dir:
                                self._merge(root, stage_fd, item.relpath, dirty, mon)
                            else:
                                self._place(root, stage_fd, item.relpath, dirty)
                        except ItemProblem as err:
                            errors[item.relpath] = str(err)
                        except OSError as err:
                            if err.errno in UNAVAILABLE:
                                raise TargetUnavailable(
                                    f"{os.fsdecode(self.target)}: {err.strerror}") from None
                            errors[item.relpath] = (f"could not be moved into place: "
                                                    f"{_why(err)}")
                        mon.alive_now()
                    for fd in dirty.values():
                        fsync_fd(fd)  # the renames are durable before we return
                        mon.alive_now()
                finally:
                    for fd in dirty.values():
                        os.close(fd)
                    os.close(stage_fd)
            return errors

        return call_watched(work, stall_seconds=self.stall_seconds, abort=self.close,
                            what=f"publishing at {os.fsdecode(self.target)}")

    def _place(self, root: int, stage_fd: int, relpath: str,
               dirty: dict[tuple[int, int], int]) -> None:
        """A file item: renamed over its final name (a file or link, never a directory)."""
        parts = split_path(relpath)
        src_dir, _name = safefs.open_parent(stage_fd, relpath)
        try:
            dst_dir = target_dir_at(root, parts[:-1], relpath, dirty)
            try:
                refuse_dir(dst_dir, parts[-1], relpath, "a file")
                os.rename(parts[-1], parts[-1], src_dir_fd=src_dir, dst_dir_fd=dst_dir)
            finally:
                keep_dirty(dst_dir, dirty)
        finally:
            os.close(src_dir)

    def _merge(self, root: int, stage_fd: int, relpath: str,
               dirty: dict[tuple[int, int], int], mon: Monitor) -> None:
        """A directory item: conflicts looked for first (nothing changes if there is
        one), then merged."""
        parts = split_path(relpath)
        src_dir, _ = safefs.open_parent(stage_fd, relpath)
        try:
            dst_dir = target_dir_at(root, parts[:-1], relpath, dirty)
            try:
                problems = merge_tree(src_dir, dst_dir, parts[-1], relpath, None, mon)
                if problems:
                    raise ItemProblem("; ".join(problems[:3]) + (
                        f"; and {len(problems) - 3} more" if len(problems) > 3 else ""))
                problems = merge_tree(src_dir, dst_dir, parts[-1], relpath, dirty, mon)
                if problems:
                    raise ItemProblem("changed at the target during the merge: " +
                                      "; ".join(problems[:3]))
            finally:
                keep_dirty(dst_dir, dirty)
        finally:
            os.close(src_dir)

    def discard(self, staged: str) -> None:
        rel = staged_rel(staged)

        def work(mon: Monitor) -> None:
            with safefs.opened_root(self.target) as root:
                out = safefs.prune(root, rel, lambda _rel, _st: True)
            for where, why in out.errors[:5]:
                log.warning("%s: cannot remove %s: %s", os.fsdecode(self.target), where, why)

        call_watched(work, stall_seconds=self.stall_seconds, abort=self.close,
                     what=f"discarding at {os.fsdecode(self.target)}")
        self._unfinished.discard(staged)

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
        fsync_dir(d)

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


# -- helpers ----------------------------------------------------------------------------------
def _why(err: OSError) -> str:
    if err.errno == errno.ELOOP:
        return "a symbolic link on the way (never followed at the target)"
    return err.strerror or str(err)
