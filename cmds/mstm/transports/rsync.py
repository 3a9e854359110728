"""Driving the rsync program: the one transfer command line and the one runner.

Three things run rsync: pushing over ssh (:mod:`mstm.transports.rsync_ssh`), pushing to
an rsync daemon (:mod:`mstm.transports.rsync_native`) and fetching over ssh
(:mod:`mstm.pull`).  They differ in which way the data goes, how rsync reaches the other
side and a few choices (modes, fsync, checksums, bwlimit); what they share is written
here once:

* :func:`transfer_argv` builds a transfer's command line: names always come on stdin
  (``--files-from=- --from0``), never on a command line; modes with ``--perms`` and a
  ``--chmod`` (never owners, groups, devices or FIFOs); interrupted files kept in a
  partial directory; ``--timeout`` from stall_seconds; one tagged output line per file
  sent (:data:`PROGRESS_FORMAT`), or, in a dry run, per difference found
  (:data:`VERIFY_FORMAT`).
* :func:`run_rsync` runs it: feeds the names, counts the tagged lines (progress
  callbacks), feeds the watchdog, terminates rsync when asked to stop (rsync then
  removes or parks its temporary files) and, if asked to, watches for a stall: rsync's
  own ``--timeout`` counts its keep-alive messages as traffic, so a peer that hangs
  while its connection stays up (a stopped process, a hung file system) could hold a
  run for ever.  A watched run has its own process group and is killed with it when
  its processes read nothing for the given time.
"""

from __future__ import annotations

import contextlib
import os
import re
import signal
import subprocess
import threading
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass

import psutil

from mstm.transports.base import Progress, ShouldStop
from mstm.transports.ssh import spawn

# with --out-format=<TAG>%i %l %n rsync prints one line per transferred entry, as it
# starts sending it; the name with rsync's escapes (\#ooo for a control character or a
# byte that is not printable), never a line break
PROGRESS_TAG = b"mstm-xfer:"
PROGRESS_FORMAT = f"--out-format={PROGRESS_TAG.decode()}%i %l %n"
_ESCAPE = re.compile(rb"\\#([0-7]{3})")
# with --dry-run and --out-format=<TAG>%i, one line per entry that would change
VERIFY_TAG = b"mstm-verify:"
VERIFY_FORMAT = f"--out-format={VERIFY_TAG.decode()}%i"
STEP = 0.2  # seconds between looks at a running rsync: stop, watchdog
STALL_LOOK = 0.5  # seconds between measures of what a watched run has read


def ssh_path(host: str, path: str) -> str:
    """rsync's HOST:PATH for a remote shell (an IPv6 address in brackets)."""
    return f"[{host}]:{path}" if ":" in host else f"{host}:{path}"


def timeouts(stall_seconds: float, connect_timeout: float | None = None) -> list[str]:
    """rsync's --timeout from stall_seconds; with a daemon, --contimeout first."""
    connect = ([] if connect_timeout is None
               else [f"--contimeout={max(1, int(connect_timeout))}"])
    return [*connect, f"--timeout={max(1, int(stall_seconds))}"]


def transfer_argv(rsync_cmd: str, source: str, dest: str, *, stall_seconds: float,
                  chmod: str, partial_dir: str, rsh: str | None = None,
                  connect_timeout: float | None = None, copy_links: bool = False,
                  mkpath: bool = False, dry_run: bool = False, checksum: bool = False,
                  fsync: bool = False, ignore_times: bool = False, bwlimit: int = 0
                  ) -> list[str]:
    """The command line of one transfer of the names on stdin from *source* into *dest*
    (directories: the local one a path, the remote one :func:`ssh_path` or a daemon's URL).

    *rsh*: over this remote shell (which would split arguments: ``--secluded-args``);
    *connect_timeout*: to a daemon.  *copy_links*: send links as the files they point
    to and recurse into nothing (file items only), else directories recursively with
    links as links.  *chmod*: rsync's --chmod on everything sent.  *mkpath*: create
    *dest* and its parents first.  *dry_run*: change nothing, print a VERIFY line for
    each entry that differs (with *checksum*: compared by content).  *fsync*: the
    receiver fsyncs each file.  *ignore_times*: send every file, even one that looks
    unchanged.  *bwlimit*: KiB/s, 0 for no limit.
    """
    links = ["--copy-links", "--no-dirs"] if copy_links else ["--recursive", "--links"]
    argv = [
        rsync_cmd, *timeouts(stall_seconds, connect_timeout),
        *links, "--perms", f"--chmod={chmod}", "--times",
        "--no-devices", "--no-specials",
        "--from0", "--files-from=-",
    ]
    if rsh is not None:
        argv.append("--secluded-args")
    if mkpath:
        argv.append("--mkpath")
    argv.append(f"--partial-dir={partial_dir}")
    if dry_run:
        argv.append("--dry-run")
    if checksum:
        argv.append("--checksum")
    argv.append(VERIFY_FORMAT if dry_run else PROGRESS_FORMAT)
    if rsh is not None:
        argv += ["--rsh", rsh]
    if fsync:
        argv.append("--fsync")
    if ignore_times:
        argv.append("--ignore-times")
    if bwlimit:
        argv.append(f"--bwlimit={bwlimit}")
    return [*argv, "--", f"{source}/", f"{dest}/"]


def rsync_name(escaped: bytes) -> str:
    """A name as rsync's --out-format %n prints it, its \\#ooo escapes undone (a file
    name as os.fsdecode gives it: bytes that are not UTF-8 as surrogates)."""
    return os.fsdecode(_ESCAPE.sub(lambda m: bytes([int(m[1], 8) & 0xFF]), escaped))


def summarise(stderr: bytes, code: int | None) -> str:
    """What went wrong, from rsync's stderr: its last line that is not rsync's generic
    "rsync error: ..." one, after "rsync exit CODE: " if *code* is not 0."""
    lines = [ln for ln in stderr.decode("utf-8", "replace").strip().splitlines()
             if ln.strip()]
    meaningful = [ln for ln in lines if not ln.startswith("rsync error:")] or lines
    text = meaningful[-1] if meaningful else ""
    return f"rsync exit {code}: {text}" if code else text


@dataclass
class RsyncRun:
    """What one rsync run did."""

    exit_code: int  # rsync's exit status (negative: killed by that signal)
    pid: int  # rsync's process id (and, for a watched run, its process group's)
    files: int = 0  # regular files it reports it transferred (PROGRESS lines)
    file_bytes: int = 0  # their sizes
    changes: int = 0  # entries a dry run found different (VERIFY lines)
    stderr_tail: bytes = b""  # the last lines rsync wrote on stderr
    stopped: bool = False  # terminated because should_stop() said so, and did not finish
    stalled: bool = False  # killed for reading nothing for *stall* seconds
    stall: float = 0.0  # the seconds without reading that cut a watched run

    @property
    def error(self) -> str:
        """Why the run failed ("" if it did not)."""
        if self.stalled:
            return f"rsync made no progress for {self.stall:.0f} s (stall_seconds); cut"
        return summarise(self.stderr_tail, self.exit_code) if self.exit_code else ""


def run_rsync(argv: list[str], names: bytes, *, env: Mapping[str, str] | None = None,
              progress: Progress | None = None, should_stop: ShouldStop | None = None,
              tick: Callable[[], None] | None = None, done: tuple[int, int] = (0, 0),
              stall: float | None = None, stall_ignores: str = "") -> RsyncRun:
    """Run *argv* (which reads --files-from - --from0) with *names* on its stdin.

    *progress* gets (files, bytes) counted from *done* on; *tick* is called every STEP
    while rsync runs (the watchdog); when *should_stop* says so rsync is terminated,
    and then removes or parks its temporary files.  With *stall*, rsync runs in a
    process group of its own, killed whole when its processes, except those named
    *stall_ignores*, read nothing for *stall* seconds.
    """
    # its own process group when watched: a stalled run is cut with every process it started
    proc = spawn(argv, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                 env=env, start_new_session=stall is not None)
    run = RsyncRun(exit_code=0, pid=proc.pid, stall=stall or 0.0)
    err_tail: list[bytes] = []

    def feed() -> None:
        assert proc.stdin is not None
        with contextlib.suppress(OSError):
            proc.stdin.write(names)
        with contextlib.suppress(OSError):
            proc.stdin.close()

    def read_out() -> None:
        assert proc.stdout is not None
        for line in proc.stdout:
            if line.startswith(VERIFY_TAG):
                run.changes += 1
            elif line.startswith(PROGRESS_TAG):
                flags, _, rest = line[len(PROGRESS_TAG):].rstrip(b"\n").partition(b" ")
                length, _, name = rest.partition(b" ")
                # a regular file sent (<) or received (>)
                if flags[:1] in (b"<", b">") and flags[1:2] == b"f" and length.isdigit():
                    run.files += 1
                    run.file_bytes += int(length)
                    if progress:
                        progress(done[0] + run.files, done[1] + run.file_bytes,
                                 rsync_name(name) if name else None)

    def read_err() -> None:
        assert proc.stderr is not None
        for line in proc.stderr:
            err_tail.append(line)
            del err_tail[:-20]

    threads = [threading.Thread(target=f, daemon=True) for f in (feed, read_out, read_err)]
    for t in threads:
        t.start()
    watch = _StallWatch(proc.pid, stall, stall_ignores) if stall is not None else None
    asked = False
    try:
        while True:
            if should_stop and not asked and should_stop():
                asked = True
                with contextlib.suppress(OSError):
                    proc.terminate()
            try:
                proc.wait(timeout=STEP)
                break
            except subprocess.TimeoutExpired:
                pass
            if tick:
                tick()
            if watch is not None and watch.stalled():
                with contextlib.suppress(OSError):
                    os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()
                run.stalled = True
                break
    finally:
        # after a cut, the ssh master may hold our stderr pipe (ControlMaster passes
        # the client's descriptors to it) until the hung session ends: do not wait
        for t in threads:
            t.join(timeout=0.5 if run.stalled else 5)
    run.exit_code = proc.returncode or (30 if run.stalled else 0)
    run.stopped = asked and run.exit_code != 0
    run.stderr_tail = b"".join(err_tail)
    return run


class _StallWatch:
    """Whether a run's processes have read nothing for *stall* seconds (measured every
    STALL_LOOK)."""

    def __init__(self, pid: int, stall: float, ignores: str) -> None:
        self.pid, self.stall, self.ignores = pid, stall, ignores
        self.last_read, self.last_change = -1, time.monotonic()
        self.next_look = 0.0

    def stalled(self) -> bool:
        now = time.monotonic()
        if now < self.next_look:
            return False
        self.next_look = now + STALL_LOOK
        read = _read_chars(self.pid, skip=self.ignores)
        if read != self.last_read:
            self.last_read, self.last_change = read, now
            return False
        return now - self.last_change >= self.stall


def _read_chars(pid: int, *, skip: str) -> int:
    """Bytes read so far by a process and its descendants, except those named *skip*
    (ssh reads what rsync writes to it, keep-alives included, so it proves nothing)."""
    total = 0
    try:
        root = psutil.Process(pid)
        procs = [root, *root.children(recursive=True)]
    except psutil.Error:
        return total
    for p in procs:
        try:
            if p.name() != skip:
                total += p.io_counters().read_chars
        except (psutil.Error, AttributeError):
            continue
    return total
