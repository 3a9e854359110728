"""A throwaway sshd on 127.0.0.1 with its own host key and client key.

Used by the integration tests and by `make demo`.  Nothing on the machine's own ssh
set-up changes: keys, config, known_hosts and logs live in one temporary directory.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from pathlib import Path

SSHD = shutil.which("sshd") or "/usr/sbin/sshd"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class LoopbackSshd:
    def __init__(self, root: Path | None = None) -> None:
        self.root = Path(root or tempfile.mkdtemp(prefix="mstm-sshd-"))
        self.port = free_port()
        self.host_key = self.root / "ssh_host_ed25519_key"
        self.client_key = self.root / "id_ed25519"
        self.known_hosts = self.root / "known_hosts"
        self.config = self.root / "sshd_config"
        self.log = self.root / "sshd.log"
        self.proc: subprocess.Popen[bytes] | None = None
        self._setup()

    def _setup(self) -> None:
        self.root.mkdir(parents=True, exist_ok=True)
        os.chmod(self.root, 0o700)
        for key in (self.host_key, self.client_key):
            if not key.exists():
                subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-C", "mstm-test",
                                "-f", str(key)], check=True)
        (self.root / "authorized_keys").write_text(
            Path(f"{self.client_key}.pub").read_text())
        os.chmod(self.root / "authorized_keys", 0o600)
        hostpub = Path(f"{self.host_key}.pub").read_text().split()
        self.known_hosts.write_text(f"[127.0.0.1]:{self.port} {hostpub[0]} {hostpub[1]}\n")
        self.config.write_text(
            f"Port {self.port}\n"
            "ListenAddress 127.0.0.1\n"
            f"HostKey {self.host_key}\n"
            f"PidFile {self.root}/sshd.pid\n"
            f"AuthorizedKeysFile {self.root}/authorized_keys\n"
            "PasswordAuthentication no\nKbdInteractiveAuthentication no\n"
            "PubkeyAuthentication yes\nUsePAM no\nStrictModes no\n"
            "PermitRootLogin prohibit-password\n"
            "MaxSessions 100\nMaxStartups 100:30:200\n"
            "Subsystem sftp internal-sftp\n"
            # Sessions get a HOME of their own: the machine's dotfiles take no part (root's
            # .bashrc here runs pyenv, which costs 0.3 s per command and serialises every
            # session behind one lock file that a killed session leaves stale).
            f"SetEnv HOME={self.root / 'home'}\n"
            "LogLevel ERROR\n")
        (self.root / "home").mkdir(exist_ok=True)
        Path("/run/sshd").mkdir(exist_ok=True) if os.geteuid() == 0 else None

    @property
    def user(self) -> str:
        import pwd

        return pwd.getpwuid(os.geteuid()).pw_name

    def start(self) -> LoopbackSshd:
        if self.proc and self.proc.poll() is None:
            return self
        logf = open(self.log, "ab")
        self.proc = subprocess.Popen([SSHD, "-D", "-e", "-f", str(self.config)],
                                     stdout=logf, stderr=logf, stdin=subprocess.DEVNULL)
        logf.close()
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"sshd exited: {self.log.read_text()[-2000:]}")
            try:
                with socket.create_connection(("127.0.0.1", self.port), timeout=0.5):
                    return self
            except OSError:
                time.sleep(0.05)
        raise RuntimeError("sshd did not start listening")

    def stop(self) -> None:
        if self.proc and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=5)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.proc = None

    def kill_sessions(self) -> None:
        """Stop this sshd and every session it started (a target going down hard);
        other sshds on the machine, and their sessions, are not touched."""
        import psutil

        if self.proc is None:
            return
        try:
            sessions = psutil.Process(self.proc.pid).children(recursive=True)
        except psutil.NoSuchProcess:
            sessions = []
        self.stop()
        for child in sessions:
            with contextlib.suppress(psutil.NoSuchProcess):
                child.kill()

    def pause(self) -> None:
        assert self.proc is not None
        os.kill(self.proc.pid, signal.SIGSTOP)

    def resume(self) -> None:
        assert self.proc is not None
        os.kill(self.proc.pid, signal.SIGCONT)

    def cleanup(self) -> None:
        self.stop()
        shutil.rmtree(self.root, ignore_errors=True)

    def __enter__(self) -> LoopbackSshd:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.cleanup()
