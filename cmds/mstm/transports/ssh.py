"""ssh: argv built in one place, and one persistent connection per stream.

A ControlMaster connection is opened once and every later ssh or rsync run reuses it,
so a batch costs no new handshake.  Host keys are always checked (BatchMode, never a
prompt); the connection has a connect timeout and keepalives so a dead peer is noticed.
Remote commands are argv lists quoted with shlex for the remote shell; file names never
appear on a command line at all: they travel NUL-separated on stdin.
"""

from __future__ import annotations

import ctypes
import logging
import os
import shlex
import shutil
import subprocess
import tempfile
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from mstm.errors import TargetUnavailable

log = logging.getLogger("mstm.ssh")

# The ControlPath limit.  A Unix socket's sun_path holds 108 bytes, its NUL included, so
# a socket path has at most 107.  While the master binds its socket, ssh (mux.c,
# muxserver_listen) binds "<ControlPath>.<16 random characters>" and renames it into
# place afterwards: the path we give may hold at most 107 - 17 = 90 bytes, or ssh fails
# with 'ControlPath "..." too long for Unix domain socket'.
SUN_PATH_MAX = 107
MUX_TEMP_SUFFIX = 17  # "." and 16 random characters
CONTROL_PATH_MAX = SUN_PATH_MAX - MUX_TEMP_SUFFIX
_DIR_PREFIX = "mstm-ssh-"  # mkdtemp adds 8 random characters
_SOCKET_NAME = "c"
# the longest runtime_dir whose connection directory and socket still fit
RUNTIME_DIR_MAX = CONTROL_PATH_MAX - len(f"/{_DIR_PREFIX}12345678/{_SOCKET_NAME}")

_PR_SET_PDEATHSIG = 1
# Resolved once, in the parent: between fork and exec the child only makes this one call.
# (Loading a library there -- dlopen -- could deadlock on a lock another of our threads
# held at fork time; setpriv(1) would avoid Python in the child but cannot run under the
# unit's empty capability bounding set.)
_prctl = ctypes.CDLL(None, use_errno=True).prctl


def _die_with_parent() -> None:  # runs in the child between fork and exec
    _prctl(_PR_SET_PDEATHSIG, 9)  # SIGKILL


def spawn(argv: Sequence[str], **kw: object) -> subprocess.Popen[bytes]:
    """Popen with an argv list (never a shell) whose process dies with ours.

    A killed sender must never leave an rsync writing on its own.
    """
    return subprocess.Popen(list(argv), preexec_fn=_die_with_parent, **kw)  # type: ignore[call-overload,no-any-return]


@dataclass(frozen=True)
class SshTarget:
    host: str
    # None: no -p, so ssh's configuration decides (a Port in the Host entry, else 22)
    port: int | None = None
    user: str | None = None
    identity_file: Path | None = None
    known_hosts: Path | None = None
    connect_timeout: float = 15.0
    ssh_cmd: str = "ssh"
    # keepalive probe interval; 3 unanswered probes end a hung connection
    alive_interval: int = 10
    config_file: Path | None = None  # ssh -F; None: ssh's own (~/.ssh/config, /etc/ssh)

    @property
    def where(self) -> str:
        """host, or host:port when a port is given: for messages."""
        return self.host if self.port is None else f"{self.host}:{self.port}"


class SshConnection:
    """One ControlMaster connection; `argv()` gives the options every client must use."""

    def __init__(self, target: SshTarget, *, runtime_dir: Path | None = None) -> None:
        self.target = target
        self._runtime_dir = runtime_dir
        self._dir: str | None = None
        self._master: subprocess.Popen[bytes] | None = None

    @property
    def control_path(self) -> str:
        assert self._dir is not None, "open() first"
        return os.path.join(self._dir, _SOCKET_NAME)

    def options(self, *, master: bool = False) -> list[str]:
        t = self.target
        opts = ["-F", str(t.config_file)] if t.config_file else []
        opts += [
            "-o", "BatchMode=yes",
            "-o", "StrictHostKeyChecking=yes",
            "-o", f"ConnectTimeout={max(1, int(t.connect_timeout))}",
            "-o", f"ServerAliveInterval={max(1, t.alive_interval)}",
            "-o", "ServerAliveCountMax=3",
            # ssh expands %-tokens in ControlPath: a literal % is written %%
            "-o", f"ControlPath={self.control_path.replace('%', '%%')}",
            "-o", "ControlMaster=yes" if master else "ControlMaster=no",
            "-o", "ControlPersist=no",
            "-o", "LogLevel=ERROR",
        ]
        if t.port is not None:  # else the ssh configuration's Port for the host, or 22
            opts += ["-p", str(t.port)]
        if t.known_hosts:
            opts += ["-o", f"UserKnownHostsFile={t.known_hosts}",
                     "-o", "GlobalKnownHostsFile=/dev/null"]
        if t.identity_file:
            opts += ["-i", str(t.identity_file), "-o", "IdentitiesOnly=yes"]
        if t.user:
            opts += ["-l", t.user]
        return opts

    def argv(self) -> list[str]:
        return [self.target.ssh_cmd, *self.options()]

    def rsync_rsh(self) -> str:
        """The ssh command as rsync's -e wants it: one string, which rsync splits itself
        (honouring single quotes), not a shell."""
        return " ".join(_rsync_quote(a) for a in self.argv())

    def open(self) -> None:
        if self.alive():
            return
        self.close()
        self._dir = tempfile.mkdtemp(prefix=_DIR_PREFIX, dir=control_base(self._runtime_dir))
        argv = [self.target.ssh_cmd, *self.options(master=True), "-N", self.target.host]
        log.debug("opening ssh connection to %s", self.target.where)
        self._master = spawn(argv, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                             stderr=subprocess.PIPE)
        deadline = time.monotonic() + self.target.connect_timeout + 5
        while time.monotonic() < deadline:
            if self._master.poll() is not None:
                err = (self._master.stderr.read() if self._master.stderr else b"").decode(
                    "utf-8", "replace").strip()
                self._master = None
                raise TargetUnavailable(
                    f"ssh to {self.target.where} failed: "
                    f"{_last_line(err) or 'connection closed'}")
            if os.path.exists(self.control_path) and self._check():
                return
            time.sleep(0.02)
        self.close()
        raise TargetUnavailable(f"ssh to {self.target.where}: timed out")

    def _check(self) -> bool:
        r = subprocess.run([self.target.ssh_cmd, *self.options(), "-O", "check", self.target.host],
                           stdin=subprocess.DEVNULL, capture_output=True, timeout=10, check=False)
        return r.returncode == 0

    def alive(self) -> bool:
        return self._master is not None and self._master.poll() is None

    def run(self, remote_argv: Sequence[str], *, input: bytes = b"", timeout: float = 600.0
            ) -> subprocess.CompletedProcess[bytes]:
        """Run a command on the target over the open connection.

        The remote side always has a shell; each argument is quoted for it, so it sees
        exactly *remote_argv*.  Raises TargetUnavailable if ssh itself fails (exit 255).
        """
        if not self.alive():
            raise TargetUnavailable(f"ssh connection to {self.target.host} is closed")
        argv = [*self.argv(), self.target.host, "--", shlex.join(remote_argv)]
        try:
            proc = spawn(argv, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                         stderr=subprocess.PIPE)
            out, err = proc.communicate(input, timeout=timeout)
        except subprocess.TimeoutExpired as exc:
            proc.kill()
            proc.communicate()
            raise TargetUnavailable(f"remote command on {self.target.host} timed out") from exc
        if proc.returncode == 255:
            raise TargetUnavailable(
                f"ssh to {self.target.host}: {_last_line(err.decode('utf-8', 'replace'))}")
        return subprocess.CompletedProcess(argv, proc.returncode, out, err)

    def close(self) -> None:
        if self._master is not None:
            if self._master.poll() is None:
                self._master.terminate()
                try:
                    self._master.wait(timeout=5)
                except subprocess.TimeoutExpired:
                    self._master.kill()
                    self._master.wait()
            if self._master.stderr:
                self._master.stderr.close()
            self._master = None
        if self._dir:
            shutil.rmtree(self._dir, ignore_errors=True)
            self._dir = None


def _rsync_quote(arg: str) -> str:
    if arg and all(c.isalnum() or c in "-_./=:@,+%" for c in arg):
        return arg
    if "'" in arg:
        raise ValueError(f"cannot pass an argument with a single quote to rsync -e: {arg!r}")
    return f"'{arg}'"


def control_base(runtime_dir: Path | None) -> str:
    """Where a connection's private directory (mode 0700, made by mkdtemp) goes.

    *runtime_dir* when it is writable and short enough for the socket (RUNTIME_DIR_MAX
    bytes) and free of a single quote (which rsync's -e cannot carry); else the temporary
    directory ($TMPDIR, else /tmp: private to the unit with PrivateTmp=), else /tmp.
    """
    if runtime_dir is not None:
        if _fits(str(runtime_dir)):
            if _writable_dir(runtime_dir):
                return str(runtime_dir)
        elif runtime_dir not in _told:  # said once per process, not per connection
            _told.add(runtime_dir)
            log.info("runtime_dir %s is too long for an ssh ControlPath (%d bytes; at most %d"
                     " fit in a Unix socket's name with what ssh adds): the connection's"
                     " socket goes under the temporary directory instead", runtime_dir,
                     len(os.fsencode(runtime_dir)), RUNTIME_DIR_MAX)
    for base in (tempfile.gettempdir(), "/tmp"):
        if _fits(base) and _writable_dir(Path(base)):
            return base
    return "/tmp"


_told: set[Path] = set()


def _fits(base: str) -> bool:
    return len(os.fsencode(base)) <= RUNTIME_DIR_MAX and "'" not in base


def _writable_dir(path: Path) -> bool:
    try:
        path.mkdir(parents=True, exist_ok=True)
    except OSError:
        return False
    return os.access(path, os.W_OK | os.X_OK)


def _last_line(text: str) -> str:
    lines = [ln.strip() for ln in text.strip().splitlines() if ln.strip()]
    return lines[-1] if lines else ""
