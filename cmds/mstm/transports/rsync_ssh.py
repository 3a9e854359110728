"""rsync over one persistent ssh connection (MiStaMover's `rsync_ssh`).

One rsync run per batch (`--files-from - --from0`: names travel NUL-separated on stdin,
never on a command line), over the stream's ControlMaster connection.  rsync writes each
file to a hidden temporary name beside its final one and renames it only when its own
whole-file checksum matched, so nothing half-written is ever visible under its final
name; an interrupted large file is kept in `.mstm-partial/` and resumed next time.
Directory items are sent into `<target_dir>/.mstm-staging/` and renamed into place after
verification (`publish`).  `inspect` asks the target for size and sha256 of the files
under their final names, in one round trip per batch.

Durability: rsync never fsyncs, and a hash computed at the target is read from its page
cache, so a match proves nothing about what a crash of the target would leave.  Since
the sender deletes a source (move mode) as soon as `inspect` reported a match, `inspect`
first makes the target's filesystem durable -- one syncfs(2) per call (`sync -f`,
coreutils >= 8.24; plain sync(1) where `-f` is unknown) -- and only then computes the
sizes and hashes, in the same round trip.  A failed syncfs (a writeback error) answers
nothing and raises TargetUnavailable: no source goes.  `publish` ends with a syncfs too,
so the renames of directory items are on disk before their sources go.

Hashing at the target: python3's hashlib (OpenSSL, which uses the CPU's SHA extensions:
3-4x faster than coreutils' sha256sum here) when the target has python3, else sha256sum.
The answer is untrusted input: `parse_inspect` accepts only well-formed records.

Large files (file items of `stream_min` bytes, 64 MiB by default) do not go through
rsync but through stream.py, one at a time over the same connection: hashed, written
back and fdatasync'd at the target while they arrive, renamed into place only when
complete and durable, resumable after an interruption.  The digest the target computed
while writing is remembered with the file's (size, mtime, inode); the next `inspect` of
that file answers it without reading the file again as long as those three still hold
at the target, and hashes the file otherwise.  A target without python3 (or one that
refuses an item) gets those files through rsync as before.
"""

from __future__ import annotations

import contextlib
import logging
import os
import time
from collections.abc import Callable, Sequence
from pathlib import Path

from mstm.errors import TargetUnavailable
from mstm.transports.base import Item, Progress, RemoteFile, SendResult, ShouldStop
from mstm.transports.common import Monitor, Throttle, chunk_size, run_watched
from mstm.transports.rsyncrun import PROGRESS_FORMAT, run_rsync
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

STAGING = ".mstm-staging"
PARTIAL = ".mstm-partial"
# rsync exit codes that mean the connection, not an item, failed
CONNECTION_CODES = frozenset({5, 10, 12, 30, 35, 255})
_SPLIT = b"--mstm-split--"

# One round trip per batch: the names arrive NUL-separated on stdin.  First the target
# filesystem is made durable (one syncfs: rsync never fsyncs, and the sender may delete
# the source as soon as we answer); then sizes, the split mark, and sha256 of each
# regular file ("digest  name", NUL-terminated, as `sha256sum -z` prints it).  A failed
# syncfs (a writeback error) answers nothing at all: exit 7.  The hashes come from
# python3's hashlib (OpenSSL, SHA extensions: 3-4x coreutils here) when the target has
# python3, else from sha256sum.
_INSPECT_SCRIPT = r"""
cd -- "$1" || exit 3
t=$(mktemp) || exit 3
trap 'rm -f "$t"' EXIT
cat > "$t"
if ! e=$(LC_ALL=C sync -f -- . 2>&1); then
  case "$e" in
    *option*|*operand*|*sage*) sync ;;
    *) printf '%s\n' "$e" >&2; exit 7 ;;
  esac
fi
if command -v python3 >/dev/null 2>&1 && python3 -I -c "$2" "$t" 2>/dev/null; then
  exit 0
fi
xargs -0 -r -a "$t" stat --printf='%s %n\0' -- 2>/dev/null
printf '%s\0' '--mstm-split--'
xargs -0 -r -a "$t" sha256sum -z -- 2>/dev/null
exit 0
"""

# The target's hasher, given the file of NUL-separated names: sizes (lstat, like stat(1)),
# the split mark, then "digest  name" of each regular file, all in one write at the end
# so that a failure leaves nothing half-said (the script then falls back to sha256sum).
# Names stay bytes throughout.  Python 3.4+ syntax (-I), 1 MiB reads into one buffer.
# After a record "/" (never a relative path) come pairs "size mtime_ns inode digest",
# name: what stream.py's receiver reported for a file it wrote; that digest is answered
# without reading the file only while its size, mtime and inode are still those.
_HASH_PY = r"""
import hashlib, os, stat, sys
recs = open(sys.argv[1], "rb").read().split(b"\0")
cut = recs.index(b"/") if b"/" in recs else len(recs)
names, extra, known = [n for n in recs[:cut] if n], recs[cut + 1:], {}
for i in range(0, len(extra) - 1, 2):
    w = extra[i].split()
    if len(w) == 4 and all(x.isdigit() for x in w[:3]):
        known[extra[i + 1]] = (int(w[0]), int(w[1]), int(w[2]), w[3])
sizes, sums = [], []
buf = bytearray(1 << 20)
view = memoryview(buf)
for n in names:
    try:
        st = os.lstat(n)
        sizes.append(str(st.st_size).encode() + b" " + n + b"\0")
        k = known.get(n)
        if k and stat.S_ISREG(st.st_mode) and (st.st_size, st.st_mtime_ns, st.st_ino) == k[:3]:
            sums.append(k[3] + b"  " + n + b"\0")
            continue
        fd = os.open(n, os.O_RDONLY | os.O_NONBLOCK)
    except OSError:
        continue
    try:
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            continue
        h = hashlib.sha256()
        while True:
            k = os.readv(fd, [buf])
            if not k:
                break
            h.update(view[:k])
        sums.append(h.hexdigest().encode() + b"  " + n + b"\0")
    except OSError:
        continue
    finally:
        os.close(fd)
out = sys.stdout.buffer
out.write(b"".join(sizes) + b"--mstm-split--\0" + b"".join(sums))
out.flush()
"""

# Move staged directory items into place; answers "O name" or "E name" per item.
# POSIX sh only (the target's sh may be dash): names arrive as xargs arguments.  The
# data was made durable by `inspect`; the closing syncfs makes the renames durable too.
_PUBLISH_SCRIPT = r"""
cd -- "$1" || exit 3
xargs -0 -r sh -c '
for n do
  case "$n" in /*|../*|*/../*|..) printf "E %s\0" "$n"; continue;; esac
  d=$(dirname -- "$n")
  mkdir -p -- "$d" || { printf "E %s\0" "$n"; continue; }
  old=""
  if [ -e "$n" ] || [ -L "$n" ]; then
    old=".mstm-staging/.replaced.$$"
    rm -rf -- "$old"
    mv -T -- "$n" "$old" || { printf "E %s\0" "$n"; continue; }
  fi
  if mv -T -- ".mstm-staging/$n" "$n"; then
    printf "O %s\0" "$n"
    [ -n "$old" ] && rm -rf -- "$old"
  else
    [ -n "$old" ] && mv -T -- "$old" "$n"
    printf "E %s\0" "$n"
  fi
done' sh
sync -f -- . 2>/dev/null || sync
"""


# Create one small file atomically: a hidden temporary name, then rename.
_PUT_SCRIPT = r"""
cd -- "$1" || exit 3
umask 027
t=".$2.tmp.$$"
cat > "$t" && mv -f -- "$t" "$2" || { rm -f -- "$t"; exit 1; }
"""

# Wait (up to $3 looks: 10 ms apart for the first 20, then 50 ms -- `_looks`) for a file
# to appear; print at most $4 bytes of it.
_AWAIT_SCRIPT = r"""
cd -- "$1" 2>/dev/null || exit 3
n=0
while [ ! -e "$2" ]; do
  n=$((n+1)); [ "$n" -gt "$3" ] && exit 4
  if [ "$n" -le 20 ]; then sleep 0.01; else sleep 0.05; fi
done
head -c "$4" -- "$2"
"""

# The whole handshake in one round trip (remote shells can be slow to start): create the
# control file atomically (from stdin, when $2 is set), wait up to $5 looks (as above)
# for the receipt $3, print at most $6 bytes of it, then create the thank-you $4 with
# content $7.  Exit 4: not there yet (call again with $2 empty).
_EXCHANGE_SCRIPT = r"""
cd -- "$1" 2>/dev/null || exit 3
umask 027
if [ -n "$2" ]; then
  t=".$2.tmp.$$"
  cat > "$t" && mv -f -- "$t" "$2" || { rm -f -- "$t"; exit 5; }
fi
n=0
while [ ! -e "$3" ]; do
  n=$((n+1)); [ "$n" -gt "$5" ] && exit 4
  if [ "$n" -le 20 ]; then sleep 0.01; else sleep 0.05; fi
done
head -c "$6" -- "$3" || exit 6
t=".$4.tmp.$$"
printf '%s' "$7" > "$t" && mv -f -- "$t" "$4"
exit 0
"""


class RsyncSsh:
    name = "rsync_ssh"

    def __init__(self, *, conn: SshConnection, source_dir: Path, target_dir: str,
                 rsync_cmd: str = "rsync", stall_seconds: float = 120.0, bwlimit: int = 0,
                 stop_file: str = ".stop", stop_dirs: Sequence[str] = (),
                 follow_symlinks: bool = False, stream_min: int | None = STREAM_MIN) -> None:
        self.conn = conn
        self.source_dir = source_dir
        self.target_dir = target_dir.rstrip("/") or "/"
        self.rsync_cmd = rsync_cmd
        self.stall_seconds = stall_seconds
        self.bwlimit = bwlimit
        self.stop_file = stop_file
        self.stop_dirs = list(stop_dirs) or [self.target_dir]
        # a stream of file items (never directory items) whose symbolic links are sent
        # as the files they point to; see rsync_argv
        self.follow_symlinks = follow_symlinks
        # file items of stream_min bytes or more go through stream.py (None: never)
        self.stream_min = stream_min
        self._can_stream = True  # until the target turns out to have no python3
        # (directory at the target, relpath) -> what the target reported having written
        self._streamed: dict[tuple[str, str], Streamed] = {}

    # -- connection -------------------------------------------------------------
    def open(self) -> None:
        self.conn.open()

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
        links = (["--copy-links", "--no-dirs"] if self.follow_symlinks
                 else ["--recursive", "--links"])
        argv = [
            self.rsync_cmd,
            *links, "--perms", "--times",
            "--from0", "--files-from=-",
            "--secluded-args",
            "--mkpath",
            f"--partial-dir={PARTIAL}",
            f"--timeout={max(1, int(self.stall_seconds))}",
            PROGRESS_FORMAT,
            "--rsh", self.conn.rsync_rsh(),
        ]
        if force:
            argv.append("--ignore-times")
        if self.bwlimit:
            argv.append(f"--bwlimit={self.bwlimit}")
        host = self.conn.target.host
        if ":" in host:
            host = f"[{host}]"
        argv += ["--", f"{self.source_dir}/", f"{host}:{dest}/"]
        return argv

    def send(self, items: Sequence[Item], *, progress: Progress | None = None,
             should_stop: ShouldStop | None = None, tick: Callable[[], None] | None = None,
             dest: str | None = None) -> SendResult:
        result = SendResult()
        items = list(items)
        big = [i for i in items if not i.is_dir and self.stream_min is not None
               and i.size >= self.stream_min and self._can_stream]
        if big:
            fallback = self._stream(big, dest or self.target_dir, result, progress=progress,
                                    should_stop=should_stop, tick=tick)
            if result.stopped or not self.conn.alive():
                return result
            chosen = {id(i) for i in big}
            items = [i for i in items if id(i) not in chosen] + fallback
        if dest is not None:
            groups = [(items, dest)]
        else:
            groups = [([i for i in items if not i.is_dir], self.target_dir),
                      ([i for i in items if i.is_dir], f"{self.target_dir}/{STAGING}")]
        for group, dest in groups:
            if not group:
                continue
            r = self._run(group, dest, progress=progress, should_stop=should_stop, tick=tick,
                          done_files=result.files, done_bytes=result.bytes)
            result.files += r.files
            result.bytes += r.bytes
            if r.exit_code and not result.exit_code:
                result.exit_code, result.error = r.exit_code, r.error
            if r.stopped:
                result.stopped = True
                break
            if r.exit_code in CONNECTION_CODES or r.exit_code < 0:
                # stalled (30) or broken: never ask the target over this connection again
                # (it may hang until ssh's keepalive gives up); the sender sees it closed
                # and backs off without counting an attempt against the items
                self.conn.close()
                break
        return result

    def _stream(self, items: list[Item], dest: str, result: SendResult, *,
                progress: Progress | None, should_stop: ShouldStop | None,
                tick: Callable[[], None] | None) -> list[Item]:
        """Send large files one by one through stream.py; adds to *result*, returns the
        items to hand to rsync instead (the target refused to stream them)."""
        base = (result.files, result.bytes)
        fallback: list[Item] = []
        current: list[Stream] = []
        aborted: list[bool] = []

        def report(files: int, nbytes: int) -> None:
            assert progress is not None
            progress(base[0] + files, base[1] + nbytes)

        def abort() -> None:
            aborted.append(True)
            for s in current:
                s.abort()

        def work(m: Monitor) -> SendResult:
            r = SendResult()
            for n, item in enumerate(items):
                if not self._can_stream:
                    fallback.extend(items[n:])
                    break
                s = Stream(self.conn)
                current[:] = [s]
                source = os.path.join(os.fsencode(self.source_dir), os.fsencode(item.relpath))
                try:
                    got = s.send(source, dest=dest, relpath=item.relpath, force=item.force,
                                 monitor=m, chunk=chunk_size(self.bwlimit, largest=CHUNK),
                                 follow_symlinks=self.follow_symlinks)
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
                self._streamed[(dest.rstrip("/") or "/", item.relpath)] = got
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
        error = run.stderr_tail.decode("utf-8", "replace").strip()
        if run.exit_code:
            log.debug("rsync exited %s: %s", run.exit_code, error)
        return SendResult(files=run.files, bytes=run.sent_bytes,
                          error=_summarise(error, run.exit_code), exit_code=run.exit_code,
                          stopped=run.stopped)

    # -- verification -----------------------------------------------------------
    def inspect(self, relpaths: Sequence[str], *, staged: bool = False) -> dict[str, RemoteFile]:
        if not relpaths:
            return {}
        base = f"{self.target_dir}/{STAGING}" if staged else self.target_dir
        names = b"".join(os.fsencode(p) + b"\0" for p in relpaths)
        hints = [f"{got.size} {got.mtime_ns} {got.ino} {got.sha256}".encode() + b"\0"
                 + os.fsencode(p) + b"\0" for p in relpaths
                 if (got := self._streamed.pop((base, p), None)) is not None]
        if hints:
            names += b"/\0" + b"".join(hints)
        # the target reads every byte (and flushes them first): allow for a slow disk,
        # 20 MB/s, on top of a fixed 600 s and 10 ms a name (sizes from our own sources)
        timeout = 600.0 + len(relpaths) * 0.01 + self._local_bytes(relpaths) / 20e6
        r = self.conn.run(["sh", "-c", _INSPECT_SCRIPT, "sh", base, _HASH_PY], input=names,
                          timeout=timeout)
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

    def publish(self, items: Sequence[Item]) -> dict[str, str]:
        dirs = [i for i in items if i.is_dir]
        if not dirs:
            return {}
        names = b"".join(os.fsencode(i.relpath) + b"\0" for i in dirs)
        r = self.conn.run(["sh", "-c", _PUBLISH_SCRIPT, "sh", self.target_dir], input=names)
        ok: set[str] = set()
        for rec in r.stdout.split(b"\0"):
            if rec.startswith(b"O "):
                ok.add(os.fsdecode(rec[2:]))
        return {i.relpath: "could not be moved into place at the target"
                for i in dirs if i.relpath not in ok}

    def put_file(self, directory: str, name: str, data: bytes) -> None:
        r = self.conn.run(["sh", "-c", _PUT_SCRIPT, "sh", directory, name], input=data,
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
            r = self.conn.run(["sh", "-c", _AWAIT_SCRIPT, "sh", directory, name,
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
                ["sh", "-c", _EXCHANGE_SCRIPT, "sh", directory, put[0] if first else "",
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
        split = records.index(_SPLIT)
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


def _looks(seconds: float) -> int:
    """How many looks the polling scripts make in about *seconds*: the first 20 are
    10 ms apart (a receipt usually comes quickly), the rest 50 ms."""
    if seconds <= 0.2:
        return max(1, int(seconds / 0.01))
    return 20 + int((seconds - 0.2) / 0.05)


def _last_line(data: bytes) -> str:
    lines = [ln.strip() for ln in data.decode("utf-8", "replace").splitlines() if ln.strip()]
    return lines[-1] if lines else "no reason given"


def _summarise(error: str, code: int | None) -> str:
    lines = [ln for ln in error.splitlines() if ln.strip()]
    meaningful = [ln for ln in lines if not ln.startswith("rsync error:")] or lines
    text = meaningful[-1] if meaningful else ""
    return f"rsync exit {code}: {text}" if code else text
