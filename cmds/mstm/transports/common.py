"""What the byte-pushing transports (local, sftp, ftp) share: pacing, stall watch, secrets,
the names of staging batches.

rsync transports leave pacing (`--bwlimit`) and stall detection (`--timeout`) to rsync;
the transports that move the bytes themselves do it here, the same way for all:

* the transfer runs in a worker thread while the caller's thread keeps the service
  watchdog fed (`tick`), answers a stop request, and watches progress;
* *progress* means a whole chunk written to the target (or a file finished): a transfer
  that completes no chunk for `stall_seconds` -- stopped dead or trickling a few bytes
  at a time -- is cut by `abort()`, which closes the connection so the blocked call in
  the worker fails; the transport is then no longer `alive()` and the sender releases
  the batch and retries after its backoff;
* `Throttle` keeps the average rate of a batch at or below `bwlimit` KiB/s by sleeping
  after each chunk, and chunks are sized so that one chunk takes at most ~1/4 s at that
  rate (so the throttle's own sleeps never look like a stall).
"""

from __future__ import annotations

import logging
import os
import posixpath
import stat
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TypeVar

from mstm import safefs
from mstm.errors import ConfigError, TargetUnavailable
from mstm.protocol import BATCH_RE
from mstm.transports.base import STAGING, Item, Progress, SendResult, ShouldStop

log = logging.getLogger("mstm.transport")
T = TypeVar("T")

CHUNK = 256 * 1024
PART_SUFFIX = ".mstm-part"  # temporary upload name: "." + name + PART_SUFFIX, beside it
STALE_SECONDS = 86400.0  # a staging batch untouched this long was left by a killed sender


class ItemProblem(Exception):
    """One item cannot be sent or published; the message says why."""


def open_source_root(source: str | bytes | Path, items: Sequence[Item], result: SendResult
                     ) -> int | None:
    """A descriptor of the stream directory to read *items* from (through
    :mod:`mstm.safefs`), or None with every item marked failed in *result*."""
    try:
        return safefs.open_root(source)
    except OSError as err:
        for item in items:
            result.item_errors[item.relpath] = \
                f"cannot open the stream directory: {err.strerror or err}"
        return None


def file_mode(mode: int) -> int:
    """The permission bits a file gets at the target: never setuid, setgid or sticky."""
    return stat.S_IMODE(mode) & 0o777


def dir_mode(mode: int) -> int:
    """A directory of a directory item: its bits, never s/t, always owner rwx."""
    return (stat.S_IMODE(mode) & 0o777) | 0o700


def part_name(relpath: str) -> str:
    """The hidden temporary name a file is uploaded to, in the same directory."""
    head, tail = os.path.split(relpath)
    return os.path.join(head, f".{tail}{PART_SUFFIX}")


def chunk_size(bwlimit_kib: int, largest: int = CHUNK) -> int:
    """A chunk that takes at most about 1/4 s at the limit (at least 1 KiB)."""
    if bwlimit_kib <= 0:
        return largest
    return max(1024, min(largest, bwlimit_kib * 1024 // 4))


class Throttle:
    """Average rate at or below *kib_per_s* (0: no limit) since the first byte."""

    def __init__(self, kib_per_s: int) -> None:
        self.rate = kib_per_s * 1024
        self.total = 0
        self.t0 = time.monotonic()

    def consumed(self, nbytes: int) -> None:
        if self.rate <= 0:
            return
        self.total += nbytes
        ahead = self.total / self.rate - (time.monotonic() - self.t0)
        if ahead > 0:
            time.sleep(ahead)


class Cancelled(Exception):
    """The worker noticed a stop request at a chunk boundary."""


@dataclass
class Monitor:
    """Shared between the worker (which reports) and the watching thread."""

    progress: Progress | None = None
    throttle: Throttle = field(default_factory=lambda: Throttle(0))
    files: int = 0
    bytes: int = 0
    last: float = field(default_factory=time.monotonic)
    cancel: bool = False
    current: str | None = None  # the file being sent, for *progress*

    def start_file(self, relpath: str) -> None:
        """The worker begins sending *relpath* (progress names it)."""
        self.current = relpath

    def advance(self, nbytes: int) -> None:
        """*nbytes* more reached the target; raises Cancelled when asked to stop."""
        self.bytes += nbytes
        self.last = time.monotonic()
        if self.progress:
            self.progress(self.files, self.bytes, self.current)
        self.throttle.consumed(nbytes)
        self.last = time.monotonic()
        if self.cancel:
            raise Cancelled

    def file_done(self) -> None:
        self.files += 1
        self.last = time.monotonic()
        if self.progress:
            self.progress(self.files, self.bytes, self.current)

    def alive_now(self) -> None:
        """Progress that moved no bytes (a directory made, a rename done)."""
        self.last = time.monotonic()
        if self.cancel:
            raise Cancelled


class Stalled(Exception):
    pass


def run_watched(work: Callable[[Monitor], SendResult], *, monitor: Monitor,
                stall_seconds: float, abort: Callable[[], None],
                should_stop: ShouldStop | None, tick: Callable[[], None] | None,
                grace: float = 10.0) -> SendResult:
    """Run *work* in a worker thread; cut it when it stalls, stop it when asked.

    Returns the worker's result, or (stall, or a worker that would not end) a result
    whose `error` says why; `stopped` is set when *should_stop* asked for it.  After a
    stall *abort* has been called: the caller must treat its connection as dead.
    """
    box: list[SendResult] = []
    failure: list[BaseException] = []

    def body() -> None:
        try:
            box.append(work(monitor))
        except BaseException as exc:  # handed to the caller's thread
            failure.append(exc)

    worker = threading.Thread(target=body, name="mstm-transfer", daemon=True)
    worker.start()
    stopped = False
    stalled = False
    cut_at: float | None = None
    while True:
        worker.join(timeout=0.2)
        if not worker.is_alive():
            break
        if tick:
            tick()
        now = time.monotonic()
        if should_stop and not stopped and should_stop():
            stopped = True
            monitor.cancel = True
            cut_at = now + grace  # a worker blocked in I/O is cut after the grace time
        if not stalled and now - monitor.last > stall_seconds:
            stalled = True
            log.warning("transfer made no progress for %.0f s; cutting the connection",
                        stall_seconds)
            abort()
            cut_at = now + grace
        elif cut_at is not None and now > cut_at:
            if not stalled:
                abort()
                stalled = True
                cut_at = now + grace
            else:
                log.error("the transfer thread does not end (blocked in the kernel?);"
                          " leaving it behind")
                break
    if box and not stalled:
        result = box[0]
    else:
        result = SendResult(files=monitor.files, bytes=monitor.bytes)
        if box:
            result.item_errors.update(box[0].item_errors)
        if stalled and not stopped:
            result.error = f"stalled: no progress for {stall_seconds:g} s; connection cut"
            result.exit_code = 1
        elif failure and not isinstance(failure[0], Cancelled):
            raise failure[0]
    result.stopped = result.stopped or stopped
    return result


def staged_rel(staged: str) -> str:
    """Where batch *staged* waits, relative to target_dir; ValueError if *staged* is not
    a batch id."""
    if not BATCH_RE.match(staged):
        raise ValueError(f"not a batch name: {staged!r}")
    return f"{STAGING}/{staged}"


def staging_batch(target: str | bytes, dest: str | None) -> str | None:
    """The batch id when *dest* is a staging batch directory of *target* (given without
    a trailing slash), else None."""
    if dest is None:
        return None
    head, _, batch = os.fsencode(dest).rstrip(b"/").rpartition(b"/")
    if head == posixpath.join(os.fsencode(target), STAGING.encode()) and \
            BATCH_RE.match(os.fsdecode(batch)):
        return os.fsdecode(batch)
    return None


def note_item_errors(result: SendResult) -> SendResult:
    """Put the first item errors into `error` too, so the reason of a retry says why."""
    if result.item_errors and not result.error:
        shown = list(result.item_errors.items())[:3]
        more = len(result.item_errors) - len(shown)
        result.error = "; ".join(f"{os.fsencode(k)!r}: {v}" for k, v in shown) + (
            f"; and {more} more" if more > 0 else "")
    return result


def read_secret(password_file: Path | None, credential: str, *, section: str) -> str | None:
    """A password from *password_file*, else from the systemd credential *credential*
    ($CREDENTIALS_DIRECTORY/<credential>), else None.  One trailing newline is dropped.
    The value is never logged, nor put on a command line."""
    path = password_file
    if path is None:
        creds = os.environ.get("CREDENTIALS_DIRECTORY")
        if creds and os.path.isfile(os.path.join(creds, credential)):
            path = Path(creds) / credential
    if path is None:
        return None
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as err:
        raise ConfigError(f"cannot read the password: {getattr(err, 'strerror', None) or err}",
                          file=str(path), section=section, key="password_file") from None
    return text[:-1] if text.endswith("\n") else text


def call_watched(fn: Callable[[Monitor], T], *, stall_seconds: float,
                 abort: Callable[[], None], what: str) -> T:
    """Run *fn* in a worker thread and return its value; raise TargetUnavailable when it
    makes no progress (Monitor.advance / alive_now) for *stall_seconds*, after *abort*."""
    monitor = Monitor()
    box: list[T] = []
    failure: list[BaseException] = []

    def body() -> None:
        try:
            box.append(fn(monitor))
        except BaseException as exc:
            failure.append(exc)

    worker = threading.Thread(target=body, name="mstm-inspect", daemon=True)
    worker.start()
    while True:
        worker.join(timeout=0.2)
        if not worker.is_alive():
            break
        if time.monotonic() - monitor.last > stall_seconds:
            abort()
            worker.join(timeout=5)
            raise TargetUnavailable(f"{what}: no progress for {stall_seconds:g} s")
    if failure:
        raise failure[0]
    return box[0]


def poll_until(look: Callable[[], T | None], *, timeout: float, interval: float,
               tick: Callable[[], None] | None = None,
               should_stop: ShouldStop | None = None) -> T | None:
    """Call *look* every *interval* seconds until it returns something, *timeout*
    passes, or *should_stop* says so; *tick* (the watchdog) is fed between looks.

    For transports with no remote shell to wait on the target (see rsync_ssh's
    exchange): their await_file polls through this.
    """
    deadline = time.monotonic() + timeout
    while True:
        found = look()
        if found is not None:
            return found
        if time.monotonic() >= deadline or (should_stop and should_stop()):
            return None
        if tick:
            tick()
        time.sleep(interval)
