"""Wake-ups for ``--follow``: inotify on the stream's directory tree, else polling.

A :class:`Watcher` only says *when to look again*; what is ready is always decided by a
fresh :func:`mstm.scan.scan`.  So missing an event is never a correctness problem, only
a latency one, and an uncertain situation (queue overflow, the directory replaced) is
reported as "something changed".

The inotify backend watches every directory of the tree whose name does not start with
"." (dot directories never hold items), for files closed after writing, names created,
moved in or out, deleted, and attribute changes; a new subdirectory gets its watches
when its creation is seen.  Events arriving in a burst are coalesced: after the first,
the watcher keeps reading until the directory has been quiet for
:data:`COALESCE_SECONDS` (at most :data:`COALESCE_MAX_SECONDS`), so dropping 1,000 files
at once is one wake-up.  Names given as ``urgent_suffixes`` end the coalescing at once when
a file with such a name is moved in or closed after writing (mstm-receive's control
files: a sender is waiting for the answer).

When inotify cannot be used (not available, too many inotify instances, or the tree
has more directories than ``fs.inotify.max_user_watches``), the watcher polls every
``poll_interval`` seconds and logs one warning saying why.

:meth:`Watcher.wake` (thread-safe, also callable from a signal handler) makes a pending
:meth:`Watcher.wait` return at once, for a prompt shutdown.
"""

from __future__ import annotations

import errno
import logging
import os
import select
import threading
import time
from collections.abc import Iterable
from pathlib import Path
from typing import Any

log = logging.getLogger("mstm.watch")

COALESCE_SECONDS = 0.05
COALESCE_MAX_SECONDS = 1.0

# inotify(7) constants (stable kernel ABI), so this module imports without inotify_simple.
IN_ATTRIB = 0x00000004
IN_CLOSE_WRITE = 0x00000008
IN_MOVED_FROM = 0x00000040
IN_MOVED_TO = 0x00000080
IN_CREATE = 0x00000100
IN_DELETE = 0x00000200
IN_DELETE_SELF = 0x00000400
IN_MOVE_SELF = 0x00000800
IN_Q_OVERFLOW = 0x00004000
IN_IGNORED = 0x00008000
IN_ONLYDIR = 0x01000000
IN_DONT_FOLLOW = 0x02000000
IN_ISDIR = 0x40000000

WATCH_MASK = (
    IN_CLOSE_WRITE
    | IN_MOVED_TO
    | IN_CREATE
    | IN_DELETE
    | IN_ATTRIB
    | IN_MOVED_FROM
    | IN_DELETE_SELF
    | IN_MOVE_SELF
)


class _FallBack(Exception):
    """inotify cannot cover the tree; the message says why."""


def _max_user_watches() -> str:
    try:
        return Path("/proc/sys/fs/inotify/max_user_watches").read_text().strip()
    except OSError:
        return "?"


class Watcher:
    """Tells a follow loop when the directory *may* have changed.

    ``backend`` is ``"inotify"`` or ``"poll"``.  With ``force_poll=True`` inotify is not
    tried (for tests, and for filesystems where inotify sees nothing, such as NFS
    written from other hosts).  A file whose name ends with one of *urgent_suffixes*
    moved in or closed after writing makes :meth:`wait` return without waiting for the
    rest of the burst.
    """

    backend: str

    def __init__(
        self,
        directory: Path,
        *,
        poll_interval: float,
        recursive: bool = True,
        force_poll: bool = False,
        urgent_suffixes: tuple[str, ...] = (),
    ) -> None:
        self.directory = Path(directory)
        self.poll_interval = float(poll_interval)
        self.recursive = recursive
        self.urgent_suffixes = urgent_suffixes
        self._urgent = False  # the events read so far include an urgent one
        self.backend = "poll"
        self._lock = threading.RLock()  # reentrant: wake() may run in a signal handler
        self._closed = False
        self._rpipe, self._wpipe = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
        self._inotify: Any = None
        self._wds: dict[int, str] = {}
        self._root_wd: int | None = None
        if force_poll:
            log.debug("watching %s by polling every %ss (forced)", self.directory, poll_interval)
            return
        try:
            self._start_inotify()
        except _FallBack as e:
            self._fall_back(str(e))

    # -- public ----------------------------------------------------------------------

    def wait(self, timeout: float | None) -> bool:
        """Block until something may have changed (True) or *timeout* passes (False).

        ``timeout=None`` waits without limit (with the poll backend: one poll interval).
        The poll backend cannot tell, so it returns True after sleeping
        ``min(timeout, poll_interval)``; a rescan will tell.  A :meth:`wake` makes it
        return True at once.
        """
        if self._closed:
            raise ValueError("wait() on a closed Watcher")
        if self._inotify is not None and self._root_wd is None:
            self._rearm_root()
        if self._inotify is None or self._root_wd is None:
            nap = self.poll_interval if timeout is None else min(timeout, self.poll_interval)
            self._poll_fds([], nap)
            self._drain_pipe()
            return True
        return self._wait_inotify(timeout)

    def wake(self) -> None:
        """Make a pending or the next :meth:`wait` return True.  Thread-safe."""
        with self._lock:
            if self._closed:
                return
            try:
                os.write(self._wpipe, b"\0")
            except OSError:  # pipe full: a wake-up is already pending
                pass

    def close(self) -> None:
        with self._lock:
            if self._closed:
                return
            self._closed = True
            if self._inotify is not None:
                self._inotify.close()
                self._inotify = None
            os.close(self._rpipe)
            os.close(self._wpipe)

    def __enter__(self) -> Watcher:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- inotify set-up --------------------------------------------------------------

    def _start_inotify(self) -> None:
        try:
            import inotify_simple
        except ImportError as e:
            raise _FallBack(f"the inotify_simple package is not available ({e})") from e
        try:
            self._inotify = inotify_simple.INotify(nonblocking=True)
        except OSError as e:
            raise _FallBack(f"inotify is unavailable: {e.strerror}") from e
        self.backend = "inotify"
        self._rearm_root()

    def _rearm_root(self) -> None:
        """(Re)watch the whole tree; leaves ``_root_wd`` None if the root is missing."""
        try:
            wd = self._inotify.add_watch(self.directory, WATCH_MASK | IN_ONLYDIR)
        except OSError as e:
            if e.errno == errno.ENOSPC:
                self._fall_back_now(e)
                return
            log.debug("cannot watch %s: %s", self.directory, e.strerror)
            return
        self._root_wd = wd
        self._wds[wd] = str(self.directory)
        if self.recursive:
            self._watch_tree(str(self.directory), top_watched=True)

    def _watch_tree(self, top: str, *, top_watched: bool = False) -> None:
        """Add watches to *top* and every non-dot directory below it (no recursion)."""
        stack = [top]
        while stack and self._inotify is not None:
            path = stack.pop()
            if not (top_watched and path == top):
                try:
                    wd = self._inotify.add_watch(path, WATCH_MASK | IN_ONLYDIR | IN_DONT_FOLLOW)
                except OSError as e:
                    if e.errno == errno.ENOSPC:
                        self._fall_back_now(e)
                        return
                    continue  # vanished, replaced by a symlink or a file, no access
                self._wds[wd] = path
            if not self.recursive:
                continue
            try:
                with os.scandir(path) as it:
                    for entry in it:
                        try:
                            if not entry.name.startswith(".") and entry.is_dir(
                                follow_symlinks=False
                            ):
                                stack.append(entry.path)
                        except OSError:
                            continue
            except OSError:
                continue

    def _fall_back_now(self, e: OSError) -> None:
        if e.errno == errno.ENOSPC:
            why = (
                f"{self.directory} has more directories than the inotify watch limit "
                f"(fs.inotify.max_user_watches = {_max_user_watches()})"
            )
        else:
            why = f"inotify failed: {e.strerror}"
        if self._inotify is not None:
            self._inotify.close()
            self._inotify = None
        self._wds.clear()
        self._root_wd = None
        self._fall_back(why)

    def _fall_back(self, why: str) -> None:
        self.backend = "poll"
        log.warning("watching %s by polling every %ss: %s", self.directory, self.poll_interval, why)

    # -- waiting ---------------------------------------------------------------------

    def _poll_fds(self, fds: list[int], timeout: float | None) -> list[int]:
        """poll() *fds* plus the wake pipe; the fds that are readable."""
        p = select.poll()
        for fd in (*fds, self._rpipe):
            p.register(fd, select.POLLIN)
        ms = None if timeout is None else max(0, round(timeout * 1000))
        return [fd for fd, _ in p.poll(ms)]

    def _drain_pipe(self) -> None:
        try:
            while os.read(self._rpipe, 4096):
                pass
        except OSError:  # BlockingIOError: empty
            pass

    def _wait_inotify(self, timeout: float | None) -> bool:
        fd = self._inotify.fileno()
        ready = self._poll_fds([fd], timeout)
        if not ready:
            return False
        if self._rpipe in ready:
            self._drain_pipe()
            return True
        self._urgent = False
        self._handle(self._inotify.read(timeout=0))
        # coalesce the rest of a burst
        give_up = time.monotonic() + COALESCE_MAX_SECONDS
        while not self._urgent and self._inotify is not None and time.monotonic() < give_up:
            ready = self._poll_fds([self._inotify.fileno()], COALESCE_SECONDS)
            if not ready:
                break
            if self._rpipe in ready:
                self._drain_pipe()
                break
            self._handle(self._inotify.read(timeout=0))
        return True

    def _handle(self, events: Iterable[Any]) -> None:
        moved_away: dict[int, str] = {}
        for ev in events:
            wd, mask, cookie, name = ev.wd, ev.mask, ev.cookie, ev.name
            if mask & IN_Q_OVERFLOW:
                log.debug("inotify queue overflowed; re-watching %s", self.directory)
                if self._root_wd is not None:
                    self._watch_tree(str(self.directory), top_watched=True)
                continue
            if mask & IN_IGNORED:
                self._wds.pop(wd, None)
                if wd == self._root_wd:
                    self._lose_root()
                continue
            if wd == self._root_wd and mask & (IN_DELETE_SELF | IN_MOVE_SELF):
                self._lose_root()
                continue
            if (self.urgent_suffixes and name and not mask & IN_ISDIR
                    and mask & (IN_MOVED_TO | IN_CLOSE_WRITE)
                    and name.endswith(self.urgent_suffixes)):
                self._urgent = True
            parent = self._wds.get(wd)
            if parent is None or not name or not (mask & IN_ISDIR) or not self.recursive:
                continue
            path = os.path.join(parent, name)
            if mask & IN_MOVED_FROM:
                moved_away[cookie] = path
            elif mask & (IN_CREATE | IN_MOVED_TO) and not name.startswith("."):
                if mask & IN_MOVED_TO:
                    moved_away.pop(cookie, None)  # moved within the tree: re-watched here
                self._watch_tree(path)
            if self._inotify is None:  # fell back to polling while adding watches
                return
        for old in moved_away.values():  # directories moved out of the tree
            self._unwatch_under(old)

    def _unwatch_under(self, old: str) -> None:
        prefix = old + "/"
        for wd, path in list(self._wds.items()):
            if wd != self._root_wd and (path == old or path.startswith(prefix)):
                del self._wds[wd]
                try:
                    self._inotify.rm_watch(wd)
                except OSError:
                    pass

    def _lose_root(self) -> None:
        """The watched directory itself was deleted or moved: start over when it's back."""
        log.debug("%s was removed or moved; watching again when it reappears", self.directory)
        for wd in list(self._wds):
            try:
                self._inotify.rm_watch(wd)
            except OSError:
                pass
        self._wds.clear()
        self._root_wd = None
