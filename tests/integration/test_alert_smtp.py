"""mstm-alert against a real SMTP server on loopback (aiosmtpd), issue 5 "done when" 2, 3.

The tests at the top need no journal: ``mstm-alert --stdin``, STARTTLS with login, TLS
from the start, a server that is down (the mail waits in the outbox for the next run).

The journal tests run under a real journald in a private mount namespace (root; under CI
it runs as root): the one test ``test_..._under_a_real_journald`` starts pytest again on
this file inside ``unshare --mount``, where the ``scenario_*`` functions run with a
journald of their own (and, for the OnFailure= mail, a ``systemd --user``).  The SMTP
server runs in that pytest process, on 127.0.0.1.
"""

from __future__ import annotations

import contextlib
import ctypes
import json
import os
import signal
import socket
import ssl
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from email import message_from_bytes, policy
from email.message import EmailMessage
from pathlib import Path
from typing import Any

import pytest
from aiosmtpd.controller import Controller
from aiosmtpd.smtp import SMTP, AuthResult, Envelope, LoginPassword, Session
from tests.conftest import need, need_root

pytestmark = pytest.mark.integration

INSIDE = "MSTM_ALERT_NAMESPACE"
ROOT = Path(__file__).resolve().parents[2]
BIN = Path(sys.executable).parent
USER, PASSWORD = "mstm", "Pa55-w0rd-that-must-never-leak-7f3a"
JOURNALD = "/lib/systemd/systemd-journald"
SYSTEMD = "/lib/systemd/systemd"


# --------------------------------------------------------------------------- an SMTP server


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class Inbox:
    """An SMTP server on 127.0.0.1 that keeps every message it accepts."""

    def __init__(self, port: int | None = None) -> None:
        self.port = port or free_port()
        self.messages: list[tuple[str, list[str], EmailMessage]] = []
        self.logins: list[str] = []
        self.tls_seen: list[bool] = []
        self.controller: Controller | None = None
        self.lock = threading.Lock()

    async def handle_DATA(self, server: SMTP, session: Session, envelope: Envelope) -> str:
        msg = message_from_bytes(envelope.original_content or b"", policy=policy.default)
        assert isinstance(msg, EmailMessage)
        with self.lock:
            self.messages.append((str(envelope.mail_from), list(envelope.rcpt_tos), msg))
            transport = server.transport
            self.tls_seen.append(session.ssl is not None or (
                transport is not None and transport.get_extra_info("ssl_object") is not None))
        return "250 OK"

    def _auth(self, server: SMTP, session: Session, envelope: Envelope, mechanism: str,
              data: Any) -> AuthResult:
        ok = isinstance(data, LoginPassword) and (data.login, data.password) == (
            USER.encode(), PASSWORD.encode())
        if ok:
            self.logins.append(USER)
        return AuthResult(success=ok, handled=False)

    def start(self, *, starttls: ssl.SSLContext | None = None,
              implicit_tls: ssl.SSLContext | None = None) -> Inbox:
        kwargs: dict[str, Any] = {}
        if starttls is not None:
            kwargs.update(tls_context=starttls, require_starttls=True, auth_required=True,
                          auth_require_tls=True, authenticator=self._auth)
        if implicit_tls is not None:
            kwargs.update(ssl_context=implicit_tls, server_hostname="localhost")
        self.controller = Controller(self, hostname="127.0.0.1", port=self.port, **kwargs)
        self.controller.start()
        return self

    def stop(self) -> None:
        if self.controller is not None:
            self.controller.stop()
            self.controller = None

    def wait(self, count: int, timeout: float = 20.0) -> list[EmailMessage]:
        deadline = time.monotonic() + timeout
        while len(self.messages) < count:
            assert time.monotonic() < deadline, f"{len(self.messages)} of {count} mails came"
            time.sleep(0.05)
        return [m for _, _, m in self.messages]

    def texts(self) -> list[str]:
        return [text_of(m) for _, _, m in self.messages]


def text_of(msg: EmailMessage) -> str:
    body = msg.get_body(("plain",))
    assert body is not None
    return str(body.get_content())


def html_of(msg: EmailMessage) -> str:
    body = msg.get_body(("html",))
    assert body is not None
    return str(body.get_content())


@pytest.fixture
def inbox() -> Iterator[Inbox]:
    box = Inbox().start()
    yield box
    box.stop()


@pytest.fixture(scope="module")
def certificate(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """A self-signed certificate for 127.0.0.1 and localhost: (cert, key)."""
    need("openssl")
    d = tmp_path_factory.mktemp("tls")
    cert, key = d / "cert.pem", d / "key.pem"
    subprocess.run(["openssl", "req", "-x509", "-newkey", "ec", "-pkeyopt",
                    "ec_paramgen_curve:prime256v1", "-nodes", "-days", "2", "-subj",
                    "/CN=localhost", "-addext", "subjectAltName=IP:127.0.0.1,DNS:localhost",
                    "-keyout", str(key), "-out", str(cert)], check=True, capture_output=True)
    return cert, key


def server_context(cert: Path, key: Path) -> ssl.SSLContext:
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.load_cert_chain(cert, key)
    return ctx


# --------------------------------------------------------------------------- configuration


def configure(root: Path, port: int, *, email_timer: float = 1.0, **email: str) -> Path:
    settings = {"recipient": "ops@example.org", "from": "mstm@example.org",
                "smarthost": "127.0.0.1", "port": str(port), "threshold": "WARNING",
                "state_dir": str(root / "state"), "timeout": "5", **email}
    root.mkdir(parents=True, exist_ok=True)
    g = root / "global.ini"
    g.write_text("[global]\ndata_stream_list =\n[email]\n"
                 + "".join(f"{k} = {v}\n" for k, v in settings.items())
                 + f"[logging]\nemail_timer = {email_timer}\n")
    return g


def clean_env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in (
        "MSTM_CONFIG", "JOURNAL_STREAM", "NOTIFY_SOCKET", "CREDENTIALS_DIRECTORY",
        "STATE_DIRECTORY", "SSL_CERT_FILE")}
    env.update(extra)
    return env


def alert(config: Path, *args: str, stdin: str = "", env: dict[str, str] | None = None,
          timeout: float = 60) -> subprocess.CompletedProcess[str]:
    return subprocess.run([str(BIN / "mstm-alert"), "--config", str(config), *args],
                          input=stdin, capture_output=True, text=True, timeout=timeout,
                          env=env or clean_env())


def outbox(root: Path) -> list[Path]:
    d = root / "state" / "outbox"
    return sorted(d.glob("*.json")) if d.is_dir() else []


# --------------------------------------------------------------------------- without a journal


def test_stdin_events_at_or_above_the_threshold_arrive_as_one_mail_per_recipient(
        tmp_path: Path, inbox: Inbox) -> None:
    g = configure(tmp_path, inbox.port, recipient="ops@example.org, boss@example.org")
    lines = ["mstm-send: info: proj1: 3 delivered",
             json.dumps({"message": "disk space on /data is LOW", "priority": "warning",
                         "identifier": "mstm-diskwatch"}),
             *(json.dumps({"message": f"delivery of run/{i}.dat failed: No space left",
                           "priority": 3, "stream": "proj1", "item": f"run/{i}.dat",
                           "event": "failed", "identifier": "mstm-send"}) for i in range(48))]
    r = alert(g, "--stdin", stdin="\n".join(lines) + "\n")
    assert r.returncode == 0, r.stderr
    inbox.wait(2)
    time.sleep(0.3)
    assert sorted(rcpt[0] for _, rcpt, _ in inbox.messages) == ["boss@example.org",
                                                                 "ops@example.org"]
    mail = inbox.messages[0][2]
    assert mail["From"] == "mstm@example.org"
    assert mail["Subject"].startswith("mstm alert: 49 alerts from ")
    text = text_of(mail)
    assert "disk space on /data is LOW" in text
    assert text.count("failed: No space left") == 1 and "47 more like this" in text
    assert "3 delivered" not in text  # INFO is below the WARNING threshold
    assert "disk space on /data is LOW" in html_of(mail)
    assert outbox(tmp_path) == []


def test_starttls_and_login_with_the_password_from_a_systemd_credential(
        tmp_path: Path, certificate: tuple[Path, Path]) -> None:
    box = Inbox().start(starttls=server_context(*certificate))
    try:
        creds = tmp_path / "credentials"
        creds.mkdir()
        (creds / "smtp-password").write_text(PASSWORD + "\n")
        g = configure(tmp_path, box.port, starttls="true", username=USER,
                      ca_file=str(certificate[0]))
        env = clean_env(CREDENTIALS_DIRECTORY=str(creds))
        r = alert(g, "--check", "-vv", env=env)
        assert r.returncode == 0 and "STARTTLS, logged in as mstm" in r.stdout, r.stderr
        r = alert(g, "--stdin", "-vv", stdin="mstm-send: error: over TLS\n", env=env)
        assert r.returncode == 0, r.stderr
        box.wait(1)
        assert box.logins == [USER, USER] and box.tls_seen == [True]
        assert "over TLS" in box.texts()[0]
        assert PASSWORD not in r.stdout + r.stderr
    finally:
        box.stop()


def test_a_wrong_password_keeps_the_mail_and_says_so_without_the_password(
        tmp_path: Path, certificate: tuple[Path, Path]) -> None:
    box = Inbox().start(starttls=server_context(*certificate))
    try:
        pw = tmp_path / "pw"
        pw.write_text("not-the-password\n")
        g = configure(tmp_path, box.port, starttls="true", username=USER,
                      password_file=str(pw), ca_file=str(certificate[0]))
        r = alert(g, "--stdin", "-vv", "--retry-for", "0", stdin="mstm-send: error: x\n")
        assert r.returncode == 75, r.stderr
        assert "login refused" in r.stderr and "not-the-password" not in r.stderr
        assert len(outbox(tmp_path)) == 1 and box.messages == []
    finally:
        box.stop()


def test_a_certificate_that_is_not_trusted_is_refused(tmp_path: Path,
                                                      certificate: tuple[Path, Path]) -> None:
    box = Inbox().start(starttls=server_context(*certificate))
    try:
        pw = tmp_path / "pw"
        pw.write_text(PASSWORD)
        g = configure(tmp_path, box.port, starttls="true", username=USER, password_file=str(pw))
        r = alert(g, "--check")
        assert r.returncode == 75 and "CERTIFICATE_VERIFY_FAILED" in r.stderr, r.stderr
        assert box.logins == []
    finally:
        box.stop()


def test_tls_from_the_first_byte_with_ssl_true(tmp_path: Path,
                                               certificate: tuple[Path, Path]) -> None:
    box = Inbox().start(implicit_tls=server_context(*certificate))
    try:
        g = configure(tmp_path, box.port, ssl="true", ca_file=str(certificate[0]))
        r = alert(g, "--stdin", stdin="mstm-send: error: implicit TLS\n")
        assert r.returncode == 0, r.stderr
        box.wait(1)
        assert box.tls_seen == [True]
    finally:
        box.stop()


def test_a_mail_server_that_is_down_means_the_mail_waits_for_the_next_run(
        tmp_path: Path) -> None:
    port = free_port()
    g = configure(tmp_path, port)
    r = alert(g, "--stdin", "--retry-for", "0", stdin="mstm-send: error: sent later\n")
    assert r.returncode == 75 and "wait in" in r.stderr, r.stderr
    assert len(outbox(tmp_path)) == 1
    box = Inbox(port).start()
    try:
        r = alert(g, "--stdin", stdin="")  # the next run, with nothing new to say
        assert r.returncode == 0, r.stderr
        box.wait(1)
        assert "sent later" in box.texts()[0] and outbox(tmp_path) == []
    finally:
        box.stop()


def test_a_mail_server_that_comes_back_within_retry_for_gets_the_mail(tmp_path: Path) -> None:
    port = free_port()
    g = configure(tmp_path, port)
    box = Inbox(port)
    timer = threading.Timer(1.5, box.start)
    timer.start()
    try:
        r = alert(g, "--stdin", "--retry-for", "20", stdin="mstm-send: error: retried\n")
        assert r.returncode == 0, r.stderr
        assert "next try in" in r.stderr
        box.wait(1)
    finally:
        timer.join()
        box.stop()


# --------------------------------------------------------------------------- the namespace


def test_follow_and_onfailure_under_a_real_journald() -> None:
    need_root()
    for program in ("unshare", "mount", "journalctl", "systemctl", JOURNALD, SYSTEMD, "openssl"):
        need(program)
    env = {**os.environ, INSIDE: "1", "PYTHONDONTWRITEBYTECODE": "1"}
    argv = ["unshare", "--mount", "--propagation", "private", sys.executable, "-m", "pytest",
            "-v", "-p", "no:cacheprovider", "-o", "addopts=", "-o", "python_functions=scenario_*",
            "--durations=0", "--rootdir", str(ROOT), __file__]
    r = subprocess.run(argv, cwd=ROOT, env=env, capture_output=True, text=True, timeout=180)
    print(r.stdout, r.stderr)
    assert r.returncode == 0, r.stdout + r.stderr
    assert " 5 passed" in r.stdout, r.stdout


def _die_with_parent() -> None:
    ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG


def _mount_tmpfs(path: str) -> None:
    Path(path).mkdir(parents=True, exist_ok=True)
    subprocess.run(["mount", "-t", "tmpfs", "tmpfs", path], check=True)


@pytest.fixture(scope="module")
def journald() -> Iterator[None]:
    """A journald of our own: tmpfs over /run/systemd, /run/log and /var/log/journal."""
    if os.environ.get(INSIDE) != "1" or os.readlink("/proc/self/ns/mnt") == os.readlink(
            f"/proc/{os.getppid()}/ns/mnt"):
        pytest.fail("the scenarios mount over /run: run them through the test in this file")
    for path in ("/run/systemd", "/run/log", "/var/log/journal"):
        if path != "/var/log/journal" or os.path.isdir(path):
            _mount_tmpfs(path)
    Path("/run/systemd/journal").mkdir()
    Path("/run/systemd/system").mkdir()  # "booted with systemd", for systemd --user
    proc = subprocess.Popen([JOURNALD], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            preexec_fn=_die_with_parent)
    try:
        wait_for(lambda: os.path.exists("/run/systemd/journal/socket")
                 and os.path.exists("/run/systemd/journal/stdout"), "journald")
        yield
    finally:
        proc.terminate()
        proc.wait(10)


def wait_for(cond: Callable[[], object], what: str, timeout: float = 20.0) -> None:
    deadline = time.monotonic() + timeout
    while not cond():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.05)


def log(message: str, priority: int = 3, ident: str = "mstm-send", **fields: str) -> None:
    from systemd import journal
    journal.send(message, PRIORITY=str(priority), SYSLOG_IDENTIFIER=ident, **fields)


def journal_stream(identifier: str) -> socket.socket:
    """A stream into journald, as systemd gives a service for its stderr."""
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    s.connect("/run/systemd/journal/stdout")
    s.sendall(f"{identifier}\n\n6\n0\n0\n0\n0\n".encode())
    s.shutdown(socket.SHUT_RD)
    return s


class Follow:
    """`mstm-alert --follow` as a service would run it: sd_notify READY, stderr to journal."""

    def __init__(self, config: Path, tmp: Path, *args: str) -> None:
        self.notify_path = tmp / f"notify{time.monotonic_ns()}"
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.sock.bind(str(self.notify_path))
        self.sock.settimeout(20)
        self.stream = journal_stream("mstm-alert")
        st = os.fstat(self.stream.fileno())
        env = clean_env(NOTIFY_SOCKET=str(self.notify_path),
                        JOURNAL_STREAM=f"{st.st_dev}:{st.st_ino}")
        self.proc = subprocess.Popen([str(BIN / "mstm-alert"), "--config", str(config),
                                      "--follow", *args], env=env, stdout=subprocess.DEVNULL,
                                     stderr=self.stream.fileno())
        while "READY=1" not in self.sock.recv(4096).decode():
            pass

    def stop(self, sig: int = signal.SIGTERM) -> int:
        self.proc.send_signal(sig)
        code = self.proc.wait(20)
        self.sock.close()
        self.stream.close()
        return code


@pytest.fixture
def follows() -> Iterator[list[Follow]]:
    started: list[Follow] = []
    yield started
    for f in started:
        if f.proc.poll() is None:
            f.stop(signal.SIGKILL)


def scenario_follow_batches_over_email_timer_respects_the_threshold_and_deduplicates(
        journald: None, tmp_path: Path, inbox: Inbox, follows: list[Follow]) -> None:
    g = configure(tmp_path, inbox.port, email_timer=1.5)
    follows.append(Follow(g, tmp_path))
    log("proj1: 5 delivered", priority=6, MSTM_STREAM="proj1")  # INFO: below WARNING
    log("an error of some other program", priority=3, ident="sshd")
    for i in range(48):
        log(f"delivery of run/{i}.dat failed: disk full", MSTM_STREAM="proj1",
            MSTM_ITEM=f"run/{i}.dat", MSTM_EVENT="failed")
    log("disk space on /data is LOW", priority=4, ident="mstm-diskwatch")
    inbox.wait(1)
    time.sleep(2)  # nothing more: all of it was one batch
    assert len(inbox.messages) == 1
    text = inbox.texts()[0]
    assert text.count("failed: disk full") == 1 and "47 more like this" in text
    assert "disk space on /data is LOW" in text
    assert "5 delivered" not in text and "other program" not in text
    log("a later problem", MSTM_STREAM="proj2")
    inbox.wait(2)
    assert "a later problem" in inbox.texts()[1] and "disk full" not in inbox.texts()[1]
    assert follows[0].stop() == 0


def scenario_a_restart_mails_nothing_twice_and_skips_nothing(
        journald: None, tmp_path: Path, inbox: Inbox, follows: list[Follow]) -> None:
    g = configure(tmp_path, inbox.port, email_timer=1)
    follows.append(Follow(g, tmp_path))
    log("event-A before the first stop", MSTM_STREAM="r")
    inbox.wait(1)
    assert follows[-1].stop() == 0  # SIGTERM: a clean stop
    log("event-B while stopped", MSTM_STREAM="r")
    follows.append(Follow(g, tmp_path))
    inbox.wait(2)
    log("event-C, then killed before email_timer", MSTM_STREAM="r")
    time.sleep(0.3)
    follows[-1].stop(signal.SIGKILL)
    follows.append(Follow(g, tmp_path))
    inbox.wait(3)
    time.sleep(1.5)
    texts = inbox.texts()
    assert len(texts) == 3, texts
    for text, event in zip(texts, "ABC", strict=True):
        found = [e for e in "ABC" if f"event-{e}" in text]
        assert found == [event], (event, text)


def scenario_a_mail_server_down_then_up_gets_the_alert_later(
        journald: None, tmp_path: Path, follows: list[Follow]) -> None:
    port = free_port()
    g = configure(tmp_path, port, email_timer=0.5)
    follows.append(Follow(g, tmp_path))
    log("sent once the server is back", MSTM_STREAM="d")
    wait_for(lambda: outbox(tmp_path), "the mail in the outbox")
    time.sleep(1)
    box = Inbox(port).start()
    try:
        box.wait(1, timeout=20)
        assert "sent once the server is back" in box.texts()[0]
        wait_for(lambda: not outbox(tmp_path), "an empty outbox")
    finally:
        box.stop()
    assert follows[0].stop() == 0


def scenario_no_secret_appears_in_logs_ps_output_or_the_journal(
        journald: None, tmp_path: Path, certificate: tuple[Path, Path],
        follows: list[Follow]) -> None:
    box = Inbox().start(starttls=server_context(*certificate))
    try:
        pw = tmp_path / "smtp-password"
        pw.write_text(PASSWORD + "\n")
        g = configure(tmp_path, box.port, email_timer=0.5, starttls="true", username=USER,
                      password_file=str(pw), ca_file=str(certificate[0]))
        f = Follow(g, tmp_path, "-vv")
        follows.append(f)
        ps = subprocess.run(["ps", "-ww", "-eo", "args"], capture_output=True, text=True)
        cmdline = Path(f"/proc/{f.proc.pid}/cmdline").read_bytes()
        assert b"--follow" in cmdline and PASSWORD.encode() not in cmdline
        assert PASSWORD not in ps.stdout
        log("a problem mailed over an authenticated connection", MSTM_STREAM="s")
        box.wait(1)
        assert box.logins == [USER] and box.tls_seen == [True]
        check = alert(g, "--check", "-vv")
        assert check.returncode == 0, check.stderr
        assert f.stop() == 0
        export = subprocess.run(["journalctl", "--no-pager", "-o", "export"],
                                capture_output=True, check=True).stdout
        ours = subprocess.run(["journalctl", "--no-pager", "-o", "json", "-t", "mstm-alert"],
                              capture_output=True, text=True, check=True).stdout
        assert "mail(s) sent through 127.0.0.1" in ours  # its log did reach the journal
        assert PASSWORD.encode() not in export
        assert PASSWORD not in check.stdout + check.stderr
    finally:
        box.stop()


# --------------------------------------------------------------------------- OnFailure=


def _cgroup_sandbox(name: str) -> list[Path]:
    """A cgroup at the root of each hierarchy, named like a slice, for `systemd --user` to
    take as its root, so journald sees _SYSTEMD_UNIT of its services (as in
    tests/system/systemd_scenarios.py)."""
    made: list[Path] = []
    for hierarchy in ("/sys/fs/cgroup/systemd", "/sys/fs/cgroup/unified", "/sys/fs/cgroup"):
        if not os.path.ismount(hierarchy) or (hierarchy == "/sys/fs/cgroup" and made):
            continue
        path = Path(hierarchy) / name
        with contextlib.suppress(OSError):
            path.mkdir()
            made.append(path)
    return made


@contextlib.contextmanager
def user_manager(base: Path, units: dict[str, str]) -> Iterator[dict[str, str]]:
    env = clean_env(XDG_RUNTIME_DIR=str(base / "run"), XDG_CONFIG_HOME=str(base / "config"),
                    HOME=str(base / "home"), SYSTEMD_PAGER="", SYSTEMD_COLORS="0")
    for name in ("run", "config/systemd/user", "home"):
        (base / name).mkdir(parents=True, mode=0o700)
    for name, text in units.items():
        (base / "config/systemd/user" / name).write_text(text)
    cgroups = _cgroup_sandbox(f"mstmalert{os.getpid()}.slice")

    def enter() -> None:
        _die_with_parent()
        for cg in cgroups:
            (cg / "cgroup.procs").write_text(str(os.getpid()))

    proc = subprocess.Popen([SYSTEMD, "--user", "--log-target=journal"], env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            preexec_fn=enter)
    try:
        wait_for(lambda: (base / "run/systemd/private").exists(), "systemd --user")
        yield env
    finally:
        proc.terminate()
        proc.wait(20)
        for top in cgroups:
            for d in sorted((p for p in top.rglob("*") if p.is_dir()), key=lambda p: -len(p.parts)):
                with contextlib.suppress(OSError):
                    d.rmdir()
            with contextlib.suppress(OSError):
                top.rmdir()


def scenario_the_onfailure_mail_names_the_unit_and_the_failed_runs_last_lines(
        journald: None, tmp_path: Path, inbox: Inbox) -> None:
    g = configure(tmp_path / "mstm", inbox.port, recipient="ops@example.org, boss@example.org")
    units = {
        "mstm-alert@.service": (
            "[Unit]\nDescription=mstm alert: %i failed\n"
            "[Service]\nType=oneshot\n"
            f"ExecStart={BIN / 'mstm-alert'} -v %i\n"
            f"Environment=MSTM_CONFIG={g}\n"),
        "broken.service": (
            "[Unit]\nOnFailure=mstm-alert@%n.service\n"
            "[Service]\nType=oneshot\n"
            "ExecStart=/bin/sh -c 'echo \"run $RUN: starting\"; sleep 0.2;"
            " echo \"run $RUN: <the last words>\" >&2; sleep 0.2; exit 3'\n"),
    }
    with user_manager(tmp_path / "user", units) as env:
        def ctl(*args: str) -> subprocess.CompletedProcess[str]:
            return subprocess.run(["systemctl", "--user", "--no-pager", *args], env=env,
                                  capture_output=True, text=True, timeout=30)
        for run in (1, 2):
            ctl("set-environment", f"RUN={run}")
            assert ctl("start", "broken.service").returncode != 0
            inbox.wait(2 * run)
            wait_for(lambda: ctl("is-active", "mstm-alert@broken.service.service").stdout.strip()
                     in ("inactive", "failed"), "the alert unit to finish")
        invocation = ctl("show", "-p", "InvocationID", "--value", "broken.service").stdout.strip()
    assert sorted(r[0] for _, r, _ in inbox.messages[2:]) == ["boss@example.org",
                                                             "ops@example.org"]
    mail = inbox.messages[3][2]
    assert mail["Subject"].startswith("mstm alert: broken.service failed on ")
    text = text_of(mail)
    assert "(result: exit-code, exit status 3)" in text
    assert "run 2: starting" in text and "run 2: <the last words>" in text
    assert "run 1" not in text  # only the failed run's lines
    assert f"_SYSTEMD_INVOCATION_ID={invocation}" in text
    assert "run 2: &lt;the last words&gt;" in html_of(mail)
