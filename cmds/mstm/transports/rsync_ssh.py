"""rsync over one persistent ssh connection (MiStaMover's `rsync_ssh`).

One rsync run per batch (`--files-from - --from0`: names travel NUL-separated on stdin,
never on a command line), over the stream's ControlMaster connection, into the
directory the sender names: without the arrival monitor that is the batch's staging
directory `<target_dir>/.mstm-staging/<batch>/` (base.staging_dir), with it the arrival
monitor's batch directory.  Nothing goes to a final name during a transfer: `inspect`
(staged=<batch>) hashes what the staging directory holds, and only the items the sender
verified are moved into place by `publish` -- a rename for a file item, a merge for a
directory item (see remote/stage.py) -- then `discard` removes the rest.  A source rewritten
while rsync read it therefore leaves the target with its old, verified content, or
nothing new.  An interrupted file is kept in `<target_dir>/.mstm-partial/` (an absolute
`--partial-dir`, shared by every batch: rsync takes it as the basis of the next
attempt), and `open` creates both directories with mode 0700 and removes staging batch
directories a killed sender left (only names of the exact shape mstm's batch ids have,
unchanged for a day).

Modes and ownership at the target: rsync runs with `--perms --chmod=a-st`, so files and
directories get their source's permission bits *without* setuid, setgid and sticky;
`publish` clears those bits again (fchmod) on everything it moves into place and
creates, and stream.py's receiver does the same, so they never survive even when the
remote user is root.  rsync is never given -o/-g (nor -a): everything belongs to the
remote user.  It is never given -D/--devices/--specials either (`--no-devices
--no-specials` are explicit): no device file or FIFO is ever created at the target, and
`publish` refuses an item whose staged tree holds one.

Durability: rsync never fsyncs, and a hash computed at the target is read from its page
cache, so a match proves nothing about what a crash of the target would leave.  Since
the sender deletes a source (move mode) as soon as `inspect` reported a match, `inspect`
first makes the target's filesystem durable -- one syncfs(2) per call (`sync -f`,
coreutils >= 8.24; plain sync(1) where `-f` is unknown) -- and only then computes the
sizes and hashes, in the same round trip.  A failed syncfs (a writeback error) answers
nothing and raises TargetUnavailable: no source goes.  `publish` ends with a syncfs too
(an item is reported published only if it succeeded), so the renames are on disk
before their sources go.

Hashing at the target: python3's hashlib (OpenSSL, which uses the CPU's SHA extensions:
3-4x faster than coreutils' sha256sum here) when the target has python3, else sha256sum.
The python hasher walks from the directory's descriptor with O_NOFOLLOW (no link
followed); the sha256sum fallback resolves paths as the shell does.  The answer is
untrusted input: `parse_inspect` accepts only well-formed records.

Large files (file items of `stream_min` bytes, 64 MiB by default) do not go through
rsync but through stream.py, one at a time over the same connection, into the same
staging directory: hashed, written back and fdatasync'd at the target while they
arrive, resumable after an interruption (their partial data waits in `.mstm-partial/`).
The digest the target computed while writing is remembered with the file's (size,
mtime, inode); the next `inspect` of that file answers it without reading the file
again as long as those three still hold at the target, and hashes the file otherwise.
A target without python3 (or one that refuses an item) gets those files through rsync.
Sources are read by rsync itself (what it read is proven by the sender's comparison of
the target's sha256 with its own, taken through safefs) and by stream.py through
safefs.open_regular (no link followed below the stream directory).

Windows left: none under a final name for unverified data.  Without python3 at the
target, `publish` checks each existing path component with `[ -L ]` before it uses it;
a component swapped for a link between that check and the `mv` is followed (only the
remote user or root can write there).  Publishing a directory item is one rename per
file it brings into an existing directory (a reader may see some of its files before
the others), one rename in all for a directory new at the target.
"""

from __future__ import annotations

import contextlib
import logging
import os
import subprocess
import time
from collections.abc import Callable, Sequence

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
from mstm.transports.common import Monitor, Throttle, chunk_size, run_watched
from mstm.transports.remote import hasher, program
from mstm.transports.rsync import run_rsync, ssh_path, summarise, transfer_argv
from mstm.transports.ssh import SshConnection
from mstm.transports.stream import (
    CHUNK,
    STREAM_MIN,
    Stream,
    StreamBroken,
    Streamed,
    StreamItemError,
    StreamUnavailable,
)

log = logging.getLogger("mstm.rsync")

PARTIAL = ".mstm-partial"  # beside .mstm-staging in target_dir; rsync and stream.py
# What rsync does to modes on the way (tested with 3.2.7 and 3.5): setuid, setgid and
# sticky never reach the target.
CHMOD = "a-st"
# rsync exit codes that mean the connection, not an item, failed
CONNECTION_CODES = frozenset({5, 10, 12, 30, 35, 255})


class RsyncSsh:
    name = "rsync_ssh"

    def __init__(self, options: TransportOptions, *, conn: SshConnection,
                 rsync_cmd: str = "rsync", stream_min: int | None = STREAM_MIN) -> None:
        self.conn = conn
        self.source_dir = options.source_dir
        self.target_dir = options.target_dir.rstrip("/") or "/"
        self.rsync_cmd = rsync_cmd
        self.stall_seconds = options.stall_seconds
        self.bwlimit = options.bwlimit
        self.stop_file = options.stop_file
        self.stop_dirs = list(options.stop_dirs) or [self.target_dir]
        # a stream of file items (never directory items) whose symbolic links are sent
        # as the files they point to; see rsync_argv
        self.follow_symlinks = options.follow_symlinks
        # file items of stream_min bytes or more go through stream.py (None: never)
        self.stream_min = stream_min
        self._can_stream = True  # until the target turns out to have no python3
        # (directory at the target, relpath) -> what the target reported having written
        self._streamed: dict[tuple[str, str], Streamed] = {}

    @property
    def partial_dir(self) -> str:
        """Where interrupted files wait for the next attempt (absolute: every batch has
        a staging directory of its own, and rsync resolves a relative one from there)."""
        return f"{self.target_dir.rstrip('/')}/{PARTIAL}"

    # -- connection -------------------------------------------------------------
    def open(self) -> None:
        fresh = not self.conn.alive()
        self.conn.open()
        if fresh:
            # staging and partial directories private (0700), killed senders'
            # leftovers removed; a failure here is not fatal (rsync --mkpath still works)
            r = self._stage("open", "")
            for line in r.stdout.splitlines():
                if line.startswith(b"R "):
                    log.info("removed a staging batch left for a day: %r", line[2:])
            if not r.stdout.endswith(b"MSTM-OK\n"):
                log.debug("preparing %s on the target: %s", self.target_dir,
                          _last_line(r.stderr))

    def _stage(self, mode: str, batch: str, names: bytes = b"", timeout: float = 600.0
               ) -> subprocess.CompletedProcess[bytes]:
        return self.conn.run(["sh", "-c", program("run_stage.sh"), "sh", self.target_dir, mode,
                              batch, program("stage.py"), program("stage.sh")],
                             input=names, timeout=timeout)

    def close(self) -> None:
        self.conn.close()

    def alive(self) -> bool:
        return self.conn.alive()

    # -- transfer ---------------------------------------------------------------
    def rsync_argv(self, dest: str, *, force: bool) -> list[str]:
        # Symbolic links: by default they travel as links (--links; in practice only
        # inside directory items, since the scanner never queues a link then).  With
        # follow_symlinks (file items only) a link is sent as the file it points to
        # (--copy-links), and nothing is recursed into (--no-dirs instead of
        # --recursive): a link turned into a link to a directory since the scan is
        # skipped by rsync, never copied as a whole tree.
        # Modes: --perms with --chmod=a-st (no setuid/setgid/sticky), never -o/-g/-D.
        return transfer_argv(
            self.rsync_cmd, str(self.source_dir), ssh_path(self.conn.target.host, dest),
            rsh=self.conn.rsync_rsh(), stall_seconds=self.stall_seconds,
            copy_links=self.follow_symlinks, chmod=CHMOD, partial_dir=self.partial_dir,
            mkpath=True, ignore_times=force, bwlimit=self.bwlimit)

    def send(self, items: Sequence[Item], *, progress: Progress | None = None,
             should_stop: ShouldStop | None = None, tick: Callable[[], None] | None = None,
             dest: str | None = None) -> SendResult:
        """Transfer *items* into *dest* (a staging batch directory, or the arrival
        monitor's): one rsync run, plus stream.py for large files.  Nothing is sent to
        a final name here; see the module's docstring."""
        if dest is None:
            raise ValueError("rsync_ssh sends into a staging (or incoming) directory only")
        dest = dest.rstrip("/") or "/"
        result = SendResult()
        items = list(items)
        big = [i for i in items if not i.is_dir and self.stream_min is not None
               and i.size >= self.stream_min and self._can_stream]
        if big:
            fallback = self._stream(big, dest, result, progress=progress,
                                    should_stop=should_stop, tick=tick)
            if result.stopped or not self.conn.alive():
                return result
            chosen = {id(i) for i in big}
            items = [i for i in items if id(i) not in chosen] + fallback
        if not items:
            return result
        r = self._run(items, dest, progress=progress, should_stop=should_stop, tick=tick,
                      done_files=result.files, done_bytes=result.bytes)
        result.files += r.files
        result.bytes += r.bytes
        if r.exit_code and not result.exit_code:
            result.exit_code, result.error = r.exit_code, r.error
        result.stopped = result.stopped or r.stopped
        if not r.stopped and (r.exit_code in CONNECTION_CODES or r.exit_code < 0):
            # stalled (30) or broken: never ask the target over this connection again
            # (it may hang until ssh's keepalive gives up); the sender sees it closed
            # and backs off without counting an attempt against the items
            self.conn.close()
        return result

    def _final_for(self, dest: str) -> str:
        """The target directory whose staging directory *dest* is ("" for another
        directory, e.g. the arrival monitor's): stream.py looks there for a file
        already complete under its final name."""
        base = self.target_dir.rstrip("/")
        return self.target_dir if dest.startswith(f"{base}/{STAGING}/") else ""

    def _stream(self, items: list[Item], dest: str, result: SendResult, *,
                progress: Progress | None, should_stop: ShouldStop | None,
                tick: Callable[[], None] | None) -> list[Item]:
        """Send large files one by one through stream.py; adds to *result*, returns the
        items to hand to rsync instead (the target refused to stream them)."""
        base = (result.files, result.bytes)
        fallback: list[Item] = []
        current: list[Stream] = []
        aborted: list[bool] = []

        def report(files: int, nbytes: int, current: str | None = None, /) -> None:
            assert progress is not None
            progress(base[0] + files, base[1] + nbytes, current)

        def abort() -> None:
            aborted.append(True)
            for s in current:
                s.abort()

        final = self._final_for(dest)
        part = self.partial_dir if final else ""

        def work(m: Monitor) -> SendResult:
            r = SendResult()
            try:
                root = safefs.open_root(self.source_dir)
            except OSError as err:
                r.exit_code, r.error = 23, f"cannot open the stream directory: {err.strerror}"
                return r
            try:
                return each(m, r, root)
            finally:
                os.close(root)

        def each(m: Monitor, r: SendResult, root: int) -> SendResult:
            for n, item in enumerate(items):
                if not self._can_stream:
                    fallback.extend(items[n:])
                    break
                s = Stream(self.conn)
                current[:] = [s]
                m.start_file(item.relpath)
                try:
                    got = s.send(root, item.relpath, dest=dest, force=item.force,
                                 monitor=m, chunk=chunk_size(self.bwlimit, largest=CHUNK),
                                 follow_symlinks=self.follow_symlinks, final=final,
                                 partial=part)
                except StreamUnavailable as err:
                    log.info("cannot stream large files to %s (%s); rsync sends them",
                             self.conn.target.host, err)
                    self._can_stream = False
                    fallback.extend(items[n:])
                    break
                except StreamItemError as err:
                    log.info("%r: not streamed (%s); rsync sends it",
                             os.fsencode(item.relpath), err)
                    fallback.append(item)
                    continue
                except StreamBroken as err:
                    r.exit_code, r.error = 12, f"stream: {err}"
                    break
                self._streamed[(dest, item.relpath)] = got
                if got.offset == got.size:
                    log.info("%r: already complete at the target; not sent again",
                             os.fsencode(item.relpath))
                elif got.offset:
                    log.info("%r: resumed at byte %d of %d", os.fsencode(item.relpath),
                             got.offset, got.size)
                m.file_done()
            r.files, r.bytes = m.files, m.bytes
            return r

        monitor = Monitor(progress=report if progress else None, throttle=Throttle(self.bwlimit))
        r = run_watched(work, monitor=monitor, stall_seconds=self.stall_seconds, abort=abort,
                        should_stop=should_stop, tick=tick)
        if aborted and not r.stopped:
            r.exit_code = 30  # like rsync's --timeout: the connection is not to be trusted
        result.files += r.files
        result.bytes += r.bytes
        if r.exit_code and not result.exit_code:
            result.exit_code, result.error = r.exit_code, r.error
        result.stopped = result.stopped or r.stopped
        if r.exit_code in CONNECTION_CODES:
            self.conn.close()
        return fallback

    def _run(self, items: Sequence[Item], dest: str, *, progress: Progress | None,
             should_stop: ShouldStop | None, tick: Callable[[], None] | None,
             done_files: int, done_bytes: int) -> SendResult:
        argv = self.rsync_argv(dest, force=any(i.force for i in items))
        names = b"".join(os.fsencode(i.relpath) + b"\0" for i in items)
        log.debug("rsync: %d items to %s", len(items), dest)
        run = run_rsync(argv, names, progress=progress, should_stop=should_stop, tick=tick,
                        done=(done_files, done_bytes))
        if run.exit_code:
            log.debug("rsync exited %s: %s", run.exit_code,
                      run.stderr_tail.decode("utf-8", "replace").strip())
        return SendResult(files=run.files, bytes=run.file_bytes,
                          error=summarise(run.stderr_tail, run.exit_code),
                          exit_code=run.exit_code, stopped=run.stopped)

    # -- verification -----------------------------------------------------------
    def inspect(self, relpaths: Sequence[str], *, staged: str | None = None
                ) -> dict[str, RemoteFile]:
        if not relpaths:
            return {}
        base = staging_dir(self.target_dir, staged) if staged else self.target_dir
        names = b"".join(os.fsencode(p) + b"\0" for p in relpaths)
        hints = [f"{got.size} {got.mtime_ns} {got.ino} {got.sha256}".encode() + b"\0"
                 + os.fsencode(p) + b"\0" for p in relpaths
                 if (got := self._streamed.pop((base, p), None)) is not None]
        if hints:
            names += b"/\0" + b"".join(hints)
        # the target reads every byte (and flushes them first): allow for a slow disk,
        # 20 MB/s, on top of a fixed 600 s and 10 ms a name (sizes from our own sources)
        timeout = 600.0 + len(relpaths) * 0.01 + self._local_bytes(relpaths) / 20e6
        r = self.conn.run(["sh", "-c", program("inspect.sh"), "sh", base, program("hasher.py")],
                          input=names, timeout=timeout)
        if r.returncode == 7:
            # the target could not write its data back to disk: nothing it holds may be
            # trusted to survive a crash, so no source may go; the stream backs off
            raise TargetUnavailable(
                "cannot make the files durable at the target (syncfs failed): "
                + _last_line(r.stderr))
        return parse_inspect(r.stdout)

    def _local_bytes(self, relpaths: Sequence[str]) -> int:
        total = 0
        base = os.fsencode(self.source_dir)
        for p in relpaths:
            with contextlib.suppress(OSError):
                total += os.stat(os.path.join(base, os.fsencode(p))).st_size
        return total

    def publish(self, items: Sequence[Item], *, staged: str) -> dict[str, str]:
        """Move the verified *items* of batch *staged* into place (file: rename;
        directory: merge), then syncfs; {relpath: error} for those that were not."""
        if not items:
            return {}
        names = b"".join((b"D" if i.is_dir else b"F") + os.fsencode(i.relpath) + b"\0"
                         for i in items)
        r = self._stage("publish", staged, names,
                        timeout=600.0 + len(items) * 0.05)
        if not r.stdout.endswith(b"MSTM-OK\n"):
            why = f"publishing failed at the target: {_last_line(r.stderr)}"
            return {i.relpath: why for i in items}
        answers = parse_publish(r.stdout[:-len(b"MSTM-OK\n")])
        errors: dict[str, str] = {}
        for i in items:
            ok, why = answers.get(i.relpath, (False, "no answer from the target"))
            if not ok:
                errors[i.relpath] = why or "could not be moved into place at the target"
        return errors

    def discard(self, staged: str) -> None:
        """Remove what is left of batch *staged*'s staging directory (best effort)."""
        try:
            r = self._stage("discard", staged)
        except TargetUnavailable as err:
            log.info("could not remove staging batch %s: %s", staged, err)
            return
        if not r.stdout.endswith(b"MSTM-OK\n"):
            log.info("could not remove staging batch %s: %s", staged, _last_line(r.stderr))

    def put_file(self, directory: str, name: str, data: bytes) -> None:
        r = self.conn.run(["sh", "-c", program("put.sh"), "sh", directory, name], input=data,
                          timeout=120)
        if r.returncode != 0:
            raise OSError(f"cannot write {name} in {directory} on the target: "
                          f"{r.stderr.decode('utf-8', 'replace').strip()}")

    def await_file(self, directory: str, name: str, *, timeout: float, max_bytes: int,
                   tick: Callable[[], None] | None = None,
                   should_stop: ShouldStop | None = None) -> bytes | None:
        deadline = time.monotonic() + timeout
        while True:
            left = deadline - time.monotonic()
            if left <= 0 or (should_stop and should_stop()):
                return None
            # wait on the target in slices, so the watchdog and shutdown are served
            slice_ = min(left, 10.0)
            r = self.conn.run(["sh", "-c", program("await.sh"), "sh", directory, name,
                               str(_looks(slice_)), str(max_bytes)],
                              timeout=slice_ + 30)
            if r.returncode == 0:
                return r.stdout
            if tick:
                tick()

    def exchange(self, directory: str, *, put: tuple[str, bytes], await_name: str,
                 then_put: tuple[str, bytes], timeout: float, max_bytes: int,
                 tick: Callable[[], None] | None = None,
                 should_stop: ShouldStop | None = None) -> bytes | None:
        deadline = time.monotonic() + timeout
        first = True
        while True:
            left = deadline - time.monotonic()
            if left <= 0 or (should_stop and should_stop()):
                return None
            slice_ = min(left, 10.0)
            r = self.conn.run(
                ["sh", "-c", program("exchange.sh"), "sh", directory, put[0] if first else "",
                 await_name, then_put[0], str(_looks(slice_)), str(max_bytes),
                 then_put[1].decode("ascii")],
                input=put[1] if first else b"", timeout=slice_ + 30)
            if r.returncode == 5:
                raise OSError(f"cannot write {put[0]} in {directory} on the target: "
                              f"{r.stderr.decode('utf-8', 'replace').strip()}")
            first = False
            if r.returncode == 0:
                return r.stdout
            if tick:
                tick()

    def stop_file_present(self) -> str | None:
        for d in self.stop_dirs:
            r = self.conn.run(["test", "-e", f"{d}/{self.stop_file}"], timeout=30)
            if r.returncode == 0:
                return f"{self.stop_file} on target ({d})"
        return None


def parse_inspect(out: bytes) -> dict[str, RemoteFile]:
    """Parse the inspect script's output; anything malformed is simply not trusted."""
    sizes: dict[str, int] = {}
    hashes: dict[str, str] = {}
    records = out.split(b"\0")
    try:
        split = records.index(hasher.SPLIT)
    except ValueError:
        return {}
    for rec in records[:split]:
        size, sep, name = rec.partition(b" ")
        if sep and size.isdigit():
            sizes[os.fsdecode(name)] = int(size)
    for rec in records[split + 1:]:
        if len(rec) > 66 and rec[64:66] in (b"  ", b" *"):
            digest = rec[:64].decode("ascii", "replace").lower()
            if all(c in "0123456789abcdef" for c in digest):
                hashes[os.fsdecode(rec[66:])] = digest
    return {name: RemoteFile(size=size, sha256=hashes.get(name)) for name, size in sizes.items()}


def parse_publish(out: bytes) -> dict[str, tuple[bool, str]]:
    """The publish program's answers: relpath -> (published, reason)."""
    recs = out.split(b"\0")
    found: dict[str, tuple[bool, str]] = {}
    for n in range(0, len(recs) - 2, 3):
        kind, rel, why = recs[n:n + 3]
        if kind in (b"O", b"E") and rel:
            found[os.fsdecode(rel)] = (kind == b"O", why.decode("utf-8", "replace")[:300])
    return found


def _looks(seconds: float) -> int:
    """How many looks the polling scripts make in about *seconds*: the first 20 are
    10 ms apart (a receipt usually comes quickly), the rest 50 ms."""
    if seconds <= 0.2:
        return max(1, int(seconds / 0.01))
    return 20 + int((seconds - 0.2) / 0.05)


def _last_line(data: bytes) -> str:
    lines = [ln.strip() for ln in data.decode("utf-8", "replace").splitlines() if ln.strip()]
    return lines[-1] if lines else "no reason given"
