"""rsync over one persistent ssh connection (MiStaMover's `rsync_ssh`).

One rsync run per batch (`--files-from - --from0`: names travel NUL-separated on stdin,
never on a command line), over the stream's ControlMaster connection.  rsync writes each
file to a hidden temporary name beside its final one and renames it only when its own
whole-file checksum matched, so nothing half-written is ever visible under its final
name; an interrupted large file is kept in `.mstm-partial/` and resumed next time.
Directory items are sent into `<target_dir>/.mstm-staging/` and renamed into place after
verification (`publish`).  `inspect` asks the target for size and sha256 of the files
under their final names, in one round trip per batch.
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Callable, Sequence
from pathlib import Path

from mstm.transports.base import Item, Progress, RemoteFile, SendResult, ShouldStop
from mstm.transports.rsyncrun import PROGRESS_FORMAT, run_rsync
from mstm.transports.ssh import SshConnection

log = logging.getLogger("mstm.rsync")

STAGING = ".mstm-staging"
PARTIAL = ".mstm-partial"
# rsync exit codes that mean the connection, not an item, failed
CONNECTION_CODES = frozenset({5, 10, 12, 30, 35, 255})
_SPLIT = b"--mstm-split--"

# One round trip: the names arrive NUL-separated on stdin; sizes first, then sha256.
_INSPECT_SCRIPT = r"""
cd -- "$1" || exit 3
t=$(mktemp) || exit 3
trap 'rm -f "$t"' EXIT
cat > "$t"
xargs -0 -r -a "$t" stat --printf='%s %n\0' -- 2>/dev/null
printf '%s\0' '--mstm-split--'
xargs -0 -r -a "$t" sha256sum -z -- 2>/dev/null
exit 0
"""

# Move staged directory items into place; answers "O name" or "E name" per item.
# POSIX sh only (the target's sh may be dash): names arrive as xargs arguments.
_PUBLISH_SCRIPT = r"""
cd -- "$1" || exit 3
exec xargs -0 -r sh -c '
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
"""


# Create one small file atomically: a hidden temporary name, then rename.
_PUT_SCRIPT = r"""
cd -- "$1" || exit 3
umask 027
t=".$2.tmp.$$"
cat > "$t" && mv -f -- "$t" "$2" || { rm -f -- "$t"; exit 1; }
"""

# Wait (up to $3 tenths of a second) for a file to appear; print at most $4 bytes of it.
_AWAIT_SCRIPT = r"""
cd -- "$1" 2>/dev/null || exit 3
n=0
while [ ! -e "$2" ]; do
  n=$((n+1)); [ "$n" -gt "$3" ] && exit 4
  sleep 0.05
done
head -c "$4" -- "$2"
"""

# The whole handshake in one round trip (remote shells can be slow to start): create the
# control file atomically (from stdin, when $2 is set), wait up to $5 tenths-of-a-second
# ticks for the receipt $3, print at most $6 bytes of it, then create the thank-you $4
# with content $7.  Exit 4: not there yet (call again with $2 empty).
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
  sleep 0.05
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
                 stop_file: str = ".stop", stop_dirs: Sequence[str] = ()) -> None:
        self.conn = conn
        self.source_dir = source_dir
        self.target_dir = target_dir.rstrip("/") or "/"
        self.rsync_cmd = rsync_cmd
        self.stall_seconds = stall_seconds
        self.bwlimit = bwlimit
        self.stop_file = stop_file
        self.stop_dirs = list(stop_dirs) or [self.target_dir]

    # -- connection -------------------------------------------------------------
    def open(self) -> None:
        self.conn.open()

    def close(self) -> None:
        self.conn.close()

    def alive(self) -> bool:
        return self.conn.alive()

    # -- transfer ---------------------------------------------------------------
    def rsync_argv(self, dest: str, *, force: bool) -> list[str]:
        argv = [
            self.rsync_cmd,
            "--recursive", "--links", "--perms", "--times",
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
        if dest is not None:
            groups = [(list(items), dest)]
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
        timeout = 600.0 + sum(1 for _ in relpaths) * 0.01
        r = self.conn.run(["sh", "-c", _INSPECT_SCRIPT, "sh", base], input=names, timeout=timeout)
        return parse_inspect(r.stdout)

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
                               str(max(1, int(slice_ / 0.05))), str(max_bytes)],
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
                 await_name, then_put[0], str(max(1, int(slice_ / 0.05))), str(max_bytes),
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


def _summarise(error: str, code: int | None) -> str:
    lines = [ln for ln in error.splitlines() if ln.strip()]
    meaningful = [ln for ln in lines if not ln.startswith("rsync error:")] or lines
    text = meaningful[-1] if meaningful else ""
    return f"rsync exit {code}: {text}" if code else text
