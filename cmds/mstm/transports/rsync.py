"""Running one rsync transfer: names on stdin, progress from its output, stop and watchdog.

Shared by the transports that drive the rsync program (rsync_ssh, rsync_native): they
differ in how rsync reaches the target, not in how a run is fed and watched.
"""

from __future__ import annotations

import contextlib
import subprocess
import threading
from collections.abc import Callable, Mapping
from dataclasses import dataclass

from mstm.transports.base import Progress, ShouldStop
from mstm.transports.ssh import spawn

# with --out-format=<TAG>%i %l rsync prints one line per transferred entry
PROGRESS_TAG = b"mstm-xfer:"
PROGRESS_FORMAT = f"--out-format={PROGRESS_TAG.decode()}%i %l"


@dataclass
class RsyncRun:
    files: int  # regular files rsync reports it transferred
    sent_bytes: int
    exit_code: int
    stderr_tail: bytes  # the last lines rsync wrote on stderr
    stopped: bool  # terminated because should_stop() said so


def run_rsync(argv: list[str], names: bytes, *, env: Mapping[str, str] | None = None,
              progress: Progress | None = None, should_stop: ShouldStop | None = None,
              tick: Callable[[], None] | None = None, done: tuple[int, int] = (0, 0)
              ) -> RsyncRun:
    """Run *argv* (which reads --files-from - --from0) with *names* on its stdin.

    *progress* gets (files, bytes) counted from *done* on; *tick* is called about five
    times a second while rsync runs (the watchdog); *should_stop* makes us terminate
    rsync, which then removes or parks its temporary files.
    """
    proc = spawn(argv, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                 env=env)
    counts = list(done)
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
            if not line.startswith(PROGRESS_TAG):
                continue
            flags, _, length = line[len(PROGRESS_TAG):].strip().partition(b" ")
            if flags[1:2] == b"f" and length.isdigit():  # a regular file was sent
                counts[0] += 1
                counts[1] += int(length)
                if progress:
                    progress(counts[0], counts[1])

    def read_err() -> None:
        assert proc.stderr is not None
        for line in proc.stderr:
            err_tail.append(line)
            del err_tail[:-20]

    threads = [threading.Thread(target=f, daemon=True) for f in (feed, read_out, read_err)]
    for t in threads:
        t.start()
    stopped = False
    while True:
        try:
            proc.wait(timeout=0.2)
            break
        except subprocess.TimeoutExpired:
            if tick:
                tick()
            if should_stop and not stopped and should_stop():
                stopped = True
                proc.terminate()
    for t in threads:
        t.join(timeout=5)
    return RsyncRun(files=counts[0] - done[0], sent_bytes=counts[1] - done[1],
                    exit_code=proc.returncode or 0, stderr_tail=b"".join(err_tail),
                    stopped=stopped)
