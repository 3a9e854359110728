"""One large file over the ssh connection's stdin, hashed and flushed while it arrives.

rsync_ssh sends files of `STREAM_MIN` bytes or more this way instead of through rsync:
one `python3` at the target (started over the stream's ControlMaster connection, its
program, remote/stream_receiver.py, on the command line, never a file name there) reads
a small binary header from stdin -- the destination directory (the batch's staging
directory), the item's relative path, the target directory and the partial directory
travel as data, so any name works -- and answers the offset it can resume from.  Then
the file's bytes follow.  The target writes them to a hidden temporary file in the
partial directory (`<target_dir>/.mstm-partial/.<40 hex>.mstm-stream`, mode 0600, the
directory 0700), hashes them (sha256) and starts their writeback as they come
(sync_file_range every 8 MiB, so the closing fdatasync is short), sets mode (`& 0o777`:
setuid, setgid and sticky never survive, even for root) and mtime as rsync's `--perms
--chmod=a-st --times` would, fdatasyncs, renames the file into the *staging* directory
and fsyncs that directory.  Only then does it answer `DONE <sha256> <size> <mtime_ns>
<inode>`.  Nothing reaches the final name here: the sender verifies the staged file and
rsync_ssh's `publish` renames it into place.  The file belongs to the remote user.

Resume: an interrupted transfer leaves the temporary file (flushed) in the partial
directory, which every batch shares, with the source's size and mtime in an extended
attribute (`user.mstm.version`).  The next attempt for the same version (in whatever
batch) resumes at its length -- after re-reading and hashing the bytes already there
(nothing a partial file claims is trusted); an item sent again after a failed
verification (`force`) starts from zero.  Without user xattrs at the target there is
no resume, only restarts.  A file already complete under its final name with the
source's size and mtime is hashed there and hard-linked into the staging directory
instead of being sent again.

The sender's side opens the source with safefs.open_regular from a descriptor of the
stream directory (no symbolic link followed below it; the last component only with
`follow_symlinks`) and pushes it with sendfile(2) (no copy through Python), in chunks
paced by `bwlimit`; `run_watched` cuts a transfer that makes no progress (no chunk
written, no word from the target) for `stall_seconds`, and stops it when asked.  The
target's answers are untrusted: `parse_done` accepts exactly one well-formed line.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import logging
import os
import re
import shlex
import stat
import subprocess
import threading
import time
from dataclasses import dataclass
from typing import IO

from mstm import safefs
from mstm.transports.common import Monitor
from mstm.transports.remote import program
from mstm.transports.ssh import SshConnection, spawn

log = logging.getLogger("mstm.stream")

STREAM_MIN = 64 << 20  # files this large (or larger) are streamed
MAGIC = b"MSTM-STREAM-2"
TEMP_SUFFIX = b".mstm-stream"
CHUNK = 1 << 20

_DONE = re.compile(rb"DONE ([0-9a-f]{64}) ([0-9]{1,20}) ([0-9]{1,25}) ([0-9]{1,20})")
_OFFSET = re.compile(rb"OFFSET ([0-9]{1,20})")


@dataclass(frozen=True)
class Streamed:
    """What the target reported for a file it received and renamed into place."""

    sha256: str
    size: int
    mtime_ns: int
    ino: int
    offset: int  # bytes kept from an earlier, interrupted attempt


_MAX_LINES = 16  # unread answers of the target kept (see Stream._read_out)


class StreamItemError(Exception):
    """This item could not be streamed (the target said why); rsync may still send it."""


class StreamUnavailable(StreamItemError):
    """The target cannot stream at all (no python3 there): use rsync from now on."""


class StreamBroken(Exception):
    """The connection broke or the sender went away mid-file (resumable)."""


def parse_done(line: bytes) -> tuple[str, int, int, int] | None:
    m = _DONE.fullmatch(line.rstrip(b"\n"))
    if not m:
        return None
    return m.group(1).decode(), int(m.group(2)), int(m.group(3)), int(m.group(4))


def header(dest: str, relpath: str, *, size: int, mode: int, mtime_ns: int,
           force: bool, final: str = "", partial: str = "") -> bytes:
    d, r, f, p = (os.fsencode(x) for x in (dest, relpath, final, partial))
    return b" ".join([MAGIC, *(str(n).encode() for n in (
        len(d), len(r), len(f), len(p), size, mode, mtime_ns, int(force)))]) + b"\n" \
        + d + r + f + p


def temp_name(dest: str, relpath: str, *, final: str = "") -> bytes:
    """The name of a file's partial data in the partial directory (see
    remote/stream_receiver.py)."""
    key = os.fsencode(final or dest) + b"\0" + os.fsencode(relpath)
    return b"." + hashlib.sha256(key).hexdigest()[:40].encode() + TEMP_SUFFIX


class Stream:
    """One file's transfer; `abort()` (from another thread) kills it."""

    def __init__(self, conn: SshConnection) -> None:
        self.conn = conn
        self.proc: subprocess.Popen[bytes] | None = None
        self._lines: list[bytes] = []
        self._err: list[bytes] = []
        self._cond = threading.Condition()
        self._eof = False

    def abort(self) -> None:
        p = self.proc
        if p is not None and p.poll() is None:
            with contextlib.suppress(OSError):
                p.kill()

    def send(self, root_fd: int, relpath: str, *, dest: str, force: bool,
             monitor: Monitor, chunk: int = CHUNK, follow_symlinks: bool = False,
             final: str = "", partial: str = "") -> Streamed:
        """Send item *relpath* of the stream directory *root_fd* (opened with
        safefs.open_regular: no link followed on the way, the last component only with
        *follow_symlinks*) to *dest*/*relpath* at the target, its partial data kept in
        *partial* (absolute; "" = beside it) and a complete copy looked for under
        *final* ("" = none); raises StreamItemError (the source, or the target's
        refusal), StreamBroken (connection), or Cancelled (stop asked)."""
        try:
            fd = safefs.open_regular(root_fd, relpath, follow_symlinks=follow_symlinks)
        except (OSError, ValueError) as err:
            why = getattr(err, "strerror", None) or str(err)
            raise StreamItemError(f"cannot open the source: {why}") from None
        try:
            st = os.fstat(fd)
            return self._send(fd, st, dest=dest, relpath=relpath, force=force,
                              monitor=monitor, chunk=chunk, final=final, partial=partial)
        finally:
            os.close(fd)

    def _send(self, fd: int, st: os.stat_result, *, dest: str, relpath: str, force: bool,
              monitor: Monitor, chunk: int, final: str, partial: str) -> Streamed:
        if not self.conn.alive():
            raise StreamBroken(f"ssh connection to {self.conn.target.host} is closed")
        argv = [*self.conn.argv(), self.conn.target.host, "--",
                shlex.join(["python3", "-I", "-c", program("stream_receiver.py")])]
        proc = spawn(argv, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                     stderr=subprocess.PIPE)
        self.proc = proc
        assert proc.stdin is not None and proc.stdout is not None and proc.stderr is not None
        readers = [threading.Thread(target=self._read_out, args=(proc.stdout, monitor),
                                    daemon=True),
                   threading.Thread(target=self._read_err, args=(proc.stderr,), daemon=True)]
        for t in readers:
            t.start()
        try:
            try:
                proc.stdin.write(header(dest, relpath, size=st.st_size,
                                        mode=stat.S_IMODE(st.st_mode),
                                        mtime_ns=st.st_mtime_ns, force=force,
                                        final=final, partial=partial))
                proc.stdin.flush()
            except OSError:
                pass  # the answer (or its absence) says why
            first = self._next_line(monitor, skip_progress=True)
            m = _OFFSET.fullmatch(first or b"")
            if m is None or int(m.group(1)) > st.st_size:
                self._finish(proc, readers)
                raise self._refusal(first, proc)
            offset = int(m.group(1))
            monitor.advance(0)
            self._pump(fd, proc.stdin, offset, st.st_size, monitor, chunk)
            with contextlib.suppress(OSError):
                proc.stdin.close()
            answer = self._next_line(monitor, skip_progress=True)
            self._finish(proc, readers)
        except BaseException:
            self.abort()
            self._finish(proc, readers)
            raise
        done = parse_done(answer or b"")
        if done is None:
            raise self._refusal(answer, proc)
        digest, size, mtime_ns, ino = done
        if size != st.st_size:
            raise StreamItemError(f"the target reports {size} bytes, {st.st_size} were sent")
        return Streamed(sha256=digest, size=size, mtime_ns=mtime_ns, ino=ino, offset=offset)

    def _pump(self, fd: int, pipe: IO[bytes], offset: int, size: int, monitor: Monitor,
              chunk: int) -> None:
        out = pipe.fileno()
        pos = offset
        use_sendfile = True
        while pos < size:
            n = min(chunk, size - pos)
            try:
                if use_sendfile:
                    try:
                        sent = os.sendfile(out, fd, pos, n)
                    except OSError as err:
                        if err.errno not in (errno.EINVAL, errno.ENOSYS):
                            raise
                        use_sendfile = False
                        continue
                else:
                    data = os.pread(fd, n, pos)
                    sent = os.write(out, data) if data else 0
            except BrokenPipeError:
                raise StreamBroken("the connection closed during the transfer") from None
            except OSError as err:
                if err.errno == errno.EPIPE:
                    raise StreamBroken("the connection closed during the transfer") from None
                raise StreamItemError(f"cannot read the source: {err.strerror}") from None
            if sent == 0:
                raise StreamItemError("the source shrank while it was sent")
            pos += sent
            monitor.advance(sent)  # tells progress, too

    def _read_out(self, pipe: IO[bytes], monitor: Monitor) -> None:
        # The target's output is untrusted: lines are read at most 512 bytes at a time,
        # progress lines replace each other, and past _MAX_LINES unread answers the rest
        # is dropped (a well-behaved target says one or two things per file).
        while line := pipe.readline(512):
            with self._cond:
                if line.startswith(b"AT ") and self._lines and \
                        self._lines[-1].startswith(b"AT "):
                    self._lines[-1] = line
                elif len(self._lines) < _MAX_LINES:
                    self._lines.append(line)
                monitor.last = time.monotonic()  # the target is alive (flushing, say)
                self._cond.notify_all()
        with self._cond:
            self._eof = True
            self._cond.notify_all()

    def _read_err(self, pipe: IO[bytes]) -> None:
        while line := pipe.readline(512):
            self._err.append(line)
            del self._err[:-10]

    def _next_line(self, monitor: Monitor, *, skip_progress: bool = False) -> bytes | None:
        """The target's next answer (progress lines "AT n" skipped if asked); None at
        the end of its output."""
        with self._cond:
            while True:
                while self._lines:
                    line = self._lines.pop(0).rstrip(b"\n")
                    if skip_progress and line.startswith(b"AT "):
                        continue
                    return line
                if self._eof:
                    return None
                self._cond.wait(timeout=0.5)
                if monitor.cancel:
                    monitor.alive_now()  # raises Cancelled

    def _finish(self, proc: subprocess.Popen[bytes], readers: list[threading.Thread]) -> None:
        with contextlib.suppress(OSError):
            if proc.stdin:
                proc.stdin.close()
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        for t in readers:
            t.join(timeout=5)

    def _refusal(self, line: bytes | None, proc: subprocess.Popen[bytes]) -> Exception:
        err = b"".join(self._err).decode("utf-8", "replace").strip()
        code = proc.returncode
        if line and line.startswith(b"ERROR "):
            return StreamItemError(line[6:].decode("utf-8", "replace"))
        if line == b"BUSY":
            # An earlier transfer of this file (one we gave up on: a hung disk, a cut
            # connection) still runs at the target and will rename its data into place
            # when it ends.  Sending this file another way now (rsync) could be verified,
            # its source deleted, and then overwritten by that late rename: wait instead,
            # as for a broken connection (the batch is released, nothing is counted).
            return StreamBroken("an earlier transfer of this file is still running at the "
                                "target")
        if code == 255:
            return StreamBroken(f"ssh: {err.splitlines()[-1] if err else 'connection lost'}")
        if code in (126, 127) or ("python3" in err and "not found" in err):
            return StreamUnavailable("python3 is not available at the target")
        if code == 2 or code is None or code < 0:
            return StreamBroken("the transfer was interrupted")
        return StreamItemError(f"unexpected answer from the target (exit {code}): "
                               f"{(line or b'').decode('utf-8', 'replace')[:100]!r} "
                               f"{err[-200:]}")
