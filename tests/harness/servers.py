"""Throwaway servers on 127.0.0.1 for the transport tests: an rsync daemon and an FTP
server (pyftpdlib, optionally with TLS), each in its own process and directory.

Each can be killed and restarted on the same port (an interrupted transfer), and paused
and resumed with its whole process tree (SIGSTOP/SIGCONT: a stalled server).

Run as a script (`python servers.py ftp ...`) this file *is* the FTP server process.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def signal_tree(pid: int, sig: int) -> None:
    """Send *sig* to *pid* and every descendant (children first for SIGSTOP/SIGKILL
    would not matter: the set is taken before any is signalled)."""
    import psutil

    try:
        root = psutil.Process(pid)
        procs = [root, *root.children(recursive=True)]
    except psutil.NoSuchProcess:
        return
    for p in procs:
        with contextlib.suppress(psutil.NoSuchProcess):
            p.send_signal(sig)


def wait_listening(port: int, proc: subprocess.Popen[bytes], log: Path,
                   timeout: float = 15) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"server exited: {log.read_text(errors='replace')[-2000:]}")
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.5):
                return
        except OSError:
            time.sleep(0.05)
    raise RuntimeError(f"server did not listen on {port}")


class _Server:
    """A server process of our own: start, stop, kill (with its children), pause."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.root.mkdir(parents=True, exist_ok=True)
        self.port = free_port()
        self.log = root / "server.log"
        self.proc: subprocess.Popen[bytes] | None = None

    def argv(self) -> list[str]:
        raise NotImplementedError

    def start(self) -> _Server:
        if self.proc and self.proc.poll() is None:
            return self
        deadline = time.monotonic() + 10
        while True:  # after a kill the port may linger a moment
            with open(self.log, "ab") as logf:
                self.proc = subprocess.Popen(self.argv(), stdout=logf, stderr=logf,
                                             stdin=subprocess.DEVNULL)
            try:
                wait_listening(self.port, self.proc, self.log)
                return self
            except RuntimeError:
                if time.monotonic() > deadline:
                    raise
                self.proc.wait()
                time.sleep(0.3)

    def kill(self) -> None:
        """The server and every session it started die at once (a host going down)."""
        if self.proc is not None:
            signal_tree(self.proc.pid, signal.SIGKILL)
            self.proc.wait()
            self.proc = None

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            signal_tree(self.proc.pid, signal.SIGCONT)
            self.proc.terminate()
            try:
                self.proc.wait(timeout=5)
            except subprocess.TimeoutExpired:
                pass
        self.kill()

    def pause(self) -> None:
        assert self.proc is not None
        signal_tree(self.proc.pid, signal.SIGSTOP)

    def resume(self) -> None:
        assert self.proc is not None
        signal_tree(self.proc.pid, signal.SIGCONT)

    def cleanup(self) -> None:
        self.stop()
        shutil.rmtree(self.root, ignore_errors=True)


class RsyncDaemon(_Server):
    """`rsync --daemon` with one writable module `mstm` and a password-protected user."""

    module = "mstm"
    user = "mstm-test"
    password = "s3cret-rsync pass"

    def __init__(self, root: Path) -> None:
        super().__init__(root)
        self.path = root / "module"
        self.path.mkdir(exist_ok=True)
        self.conf = root / "rsyncd.conf"
        self.secrets = root / "rsyncd.secrets"
        self.password_file = root / "client-password"
        self.secrets.write_text(f"{self.user}:{self.password}\n")
        self.secrets.chmod(0o600)
        self.password_file.write_text(self.password + "\n")
        self.password_file.chmod(0o600)
        ids = f"uid = {os.getuid()}\ngid = {os.getgid()}\n" if os.geteuid() == 0 else ""
        self.conf.write_text(
            f"pid file = {root}/rsyncd.pid\n"
            "use chroot = no\n"
            f"{ids}"
            f"[{self.module}]\n"
            f"path = {self.path}\n"
            "read only = no\n"
            f"auth users = {self.user}\n"
            f"secrets file = {self.secrets}\n")

    def argv(self) -> list[str]:
        (self.root / "rsyncd.pid").unlink(missing_ok=True)
        return ["rsync", "--daemon", "--no-detach", f"--config={self.conf}",
                f"--port={self.port}", "--address=127.0.0.1", f"--log-file={self.log}"]


class FtpServer(_Server):
    """pyftpdlib on loopback; with tls=True TLS is required on control and data."""

    user = "mstm-test"
    password = "s3cret ftp-pass"

    def __init__(self, root: Path, *, tls: bool = False) -> None:
        super().__init__(root)
        self.home = root / "home"
        self.home.mkdir(exist_ok=True)
        self.password_file = root / "client-password"
        self.password_file.write_text(self.password + "\n")
        self.password_file.chmod(0o600)
        self.tls = tls
        self.cert = root / "cert.pem"
        self.key = root / "key.pem"
        if tls:
            make_certificate(self.cert, self.key)

    def argv(self) -> list[str]:
        argv = [sys.executable, str(HERE), "ftp", "--port", str(self.port),
                "--home", str(self.home), "--user", self.user,
                "--password-file", str(self.password_file)]
        if self.tls:
            argv += ["--cert", str(self.cert), "--key", str(self.key)]
        return argv


@dataclass
class Target:
    """Where a transport test sends: its protocol, its settings, the directory on this
    host where delivered files land, and the server process (None for local)."""

    protocol: str
    path: Path
    settings: dict[str, dict[str, str]]
    server: Any = None  # _Server or LoopbackSshd: kill(), start(), pause(), resume()


def kill_server(server: Any) -> None:
    """Kill a server with every session it started (a target going down hard)."""
    if isinstance(server, _Server):
        server.kill()
    else:  # LoopbackSshd
        if server.proc is not None:
            signal_tree(server.proc.pid, signal.SIGKILL)
            server.proc.wait()
            server.proc = None


def pause_server(server: Any) -> None:
    """SIGSTOP the server and its sessions: connections stay open, nothing moves."""
    signal_tree(server.proc.pid, signal.SIGSTOP)


def resume_server(server: Any) -> None:
    signal_tree(server.proc.pid, signal.SIGCONT)


def make_stream(root: Path, target: Target, **sections: dict[str, str]) -> Any:
    """A StreamEnv whose configuration sends to *target*."""
    from tests.harness.streams import StreamEnv

    @dataclass
    class TransportStream(StreamEnv):
        spec: Target | None = field(default=None)

        @property
        def target(self) -> Path:  # type: ignore[override]
            assert self.spec is not None
            return self.spec.path

        def configure(self, **more: dict[str, str]) -> None:
            assert self.spec is not None
            base: dict[str, dict[str, str]] = {
                "data_stream": {"directory": str(self.source), "settle_seconds": "0"},
                "outgoing": {"transfer_protocol": self.spec.protocol,
                             "transfer_mode": "move", "retry_backoff": "0.2",
                             "retry_backoff_max": "1", "connect_timeout": "5"},
            }
            for section, values in (*self.spec.settings.items(), *self.settings.items(),
                                    *more.items()):
                base.setdefault(section, {}).update(values)
            self.settings = base
            etc = self.global_ini.parent
            etc.mkdir(parents=True, exist_ok=True)
            self.global_ini.write_text(
                "[global]\n"
                f"data_stream_list = {self.name}\n"
                f"spool_base_dir = {self.root / 'spool'}\n"
                f"runtime_dir = {self.root / 'run'}\n"
                "general_poll_interval = 0.5\n")
            text = ""
            for section, values in base.items():
                text += f"[{section}]\n" + "".join(f"{k} = {v}\n" for k, v in values.items())
            (etc / f"{self.name}.ini").write_text(text)

    env = TransportStream(root=root, sshd=None, spec=target)  # type: ignore[arg-type]
    env.source.mkdir(parents=True, exist_ok=True)
    target.path.mkdir(parents=True, exist_ok=True)
    (root / "spool").mkdir(parents=True, exist_ok=True)
    env.configure(**sections)
    return env


def make_certificate(cert: Path, key: Path) -> None:
    """A self-signed certificate for 127.0.0.1 (it is its own CA)."""
    import datetime
    import ipaddress

    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    pkey = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "127.0.0.1")])
    now = datetime.datetime.now(datetime.UTC)
    certificate = (
        x509.CertificateBuilder().subject_name(name).issuer_name(name)
        .public_key(pkey.public_key()).serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=2))
        .add_extension(x509.SubjectAlternativeName(
            [x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]), critical=False)
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .sign(pkey, hashes.SHA256()))
    key.write_bytes(pkey.private_bytes(serialization.Encoding.PEM,
                                       serialization.PrivateFormat.PKCS8,
                                       serialization.NoEncryption()))
    key.chmod(0o600)
    cert.write_bytes(certificate.public_bytes(serialization.Encoding.PEM))


def _serve_ftp(args: argparse.Namespace) -> None:
    import logging

    from pyftpdlib.authorizers import DummyAuthorizer
    from pyftpdlib.handlers import FTPHandler, TLS_FTPHandler
    from pyftpdlib.servers import FTPServer

    logging.basicConfig(level=logging.WARNING)
    password = Path(args.password_file).read_text().rstrip("\n")
    authorizer = DummyAuthorizer()
    authorizer.add_user(args.user, password, args.home, perm="elradfmwMT")
    handler: type[FTPHandler]
    if args.cert:
        handler = TLS_FTPHandler
        handler.certfile = args.cert
        handler.keyfile = args.key
        handler.tls_control_required = True
        handler.tls_data_required = True
    else:
        handler = FTPHandler
    handler.authorizer = authorizer
    handler.timeout = 600
    server = FTPServer(("127.0.0.1", args.port), handler)
    server.serve_forever()


def main(argv: list[str]) -> None:
    parser = argparse.ArgumentParser()
    sub = parser.add_subparsers(dest="what", required=True)
    ftp = sub.add_parser("ftp")
    ftp.add_argument("--port", type=int, required=True)
    ftp.add_argument("--home", required=True)
    ftp.add_argument("--user", required=True)
    ftp.add_argument("--password-file", required=True)
    ftp.add_argument("--cert")
    ftp.add_argument("--key")
    args = parser.parse_args(argv)
    if args.what == "ftp":
        _serve_ftp(args)


if __name__ == "__main__":
    main(sys.argv[1:])
