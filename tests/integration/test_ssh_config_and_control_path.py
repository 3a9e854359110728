"""Sites coming from MiStaMover: the ssh client configuration is honoured, and a long
runtime_dir does not break ssh's ControlMaster (issue 14, section 7).

MiStaMover ran ``rsync ... host://dir``: plain ssh, no ``-p``, so a ``Port`` (and a
``HostName``) in the admin's ssh configuration for that host applied.  mstm gave
``-p 22`` whenever target_port was not written, and so silently went to port 22.

Everything here is real: the loopback sshd of tests/harness/sshd.py on a random port,
OpenSSH's ssh and rsync, paramiko for sftp.  A small ``ssh`` wrapper records each argv
mstm gives ssh, then runs the real one.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from tests.harness.sshd import LoopbackSshd
from tests.harness.streams import StreamEnv

from mstm.transports.ssh import CONTROL_PATH_MAX, RUNTIME_DIR_MAX

pytestmark = pytest.mark.integration

ALIAS = "archive-via-alias"


def ssh_config(path: Path, sshd: LoopbackSshd) -> Path:
    """An admin's ssh configuration: the alias names the real host and its port."""
    path.write_text(f"Host {ALIAS}\n    HostName 127.0.0.1\n    Port {sshd.port}\n"
                    "Host *\n    Port 1\n")  # anything else goes nowhere
    return path


def recording_ssh(path: Path, log: Path) -> Path:
    """An ``ssh`` that appends its argv (one JSON list a line) to *log*, then is ssh."""
    real = shutil.which("ssh")
    path.write_text(f"""#!{sys.executable}
import json, os, sys
with open({str(log)!r}, "a") as f:
    f.write(json.dumps(sys.argv[1:]) + "\\n")
os.execv({real!r}, [{real!r}, *sys.argv[1:]])
""")
    path.chmod(0o755)
    return path


def ssh_runs(log: Path) -> list[list[str]]:
    return [json.loads(line) for line in log.read_text().splitlines()] if log.exists() else []


def option(argv: list[str], name: str) -> str | None:
    """The value of ``-o Name=value`` in *argv*."""
    for i, arg in enumerate(argv[:-1]):
        if arg == "-o" and argv[i + 1].startswith(f"{name}="):
            return argv[i + 1].split("=", 1)[1]
    return None


@pytest.fixture
def env(tmp_path: Path, sshd: LoopbackSshd) -> StreamEnv:
    return StreamEnv.create(tmp_path, sshd)


def set_runtime_dir(env: StreamEnv, runtime_dir: Path) -> None:
    """StreamEnv writes runtime_dir = <root>/run; point it elsewhere."""
    text = env.global_ini.read_text()
    default = f"runtime_dir = {env.root / 'run'}\n"
    assert default in text
    env.global_ini.write_text(text.replace(default, f"runtime_dir = {runtime_dir}\n"))


# ------------------------------------------------------------------ the ssh configuration


def test_rsync_ssh_without_target_port_delivers_to_the_port_of_the_ssh_config_host_alias(
        env: StreamEnv, sshd: LoopbackSshd, tmp_path: Path) -> None:
    config = ssh_config(tmp_path / "ssh_config", sshd)
    log = tmp_path / "ssh.log"
    env.configure(outgoing={"target_host": ALIAS, "target_port": ""},
                  rsync_ssh={"ssh_config": str(config),
                             "ssh_cmd": str(recording_ssh(tmp_path / "ssh", log))})
    env.put("with space.dat", b"a" * 1000)
    env.put("ünïcødé.dat", b"b" * 10)

    r = env.run("mstm-send", "--once", "--json")

    assert r.returncode == 0, r.stderr
    assert json.loads(r.stdout)["delivered"] == 2
    assert (env.target / "with space.dat").read_bytes() == b"a" * 1000
    assert (env.target / "ünïcødé.dat").read_bytes() == b"b" * 10
    runs = ssh_runs(log)
    assert runs, "ssh was never run"
    for argv in runs:
        assert "-p" not in argv, argv  # the alias's Port decides, as plain ssh does
        assert argv[argv.index("-F") + 1] == str(config)
    assert ":22" not in r.stderr and "None" not in r.stderr


def test_a_written_target_port_still_wins_over_the_ssh_config(
        env: StreamEnv, sshd: LoopbackSshd, tmp_path: Path) -> None:
    config = tmp_path / "ssh_config"
    config.write_text(f"Host {ALIAS}\n    HostName 127.0.0.1\n    Port 1\n")  # wrong port
    env.configure(outgoing={"target_host": ALIAS, "target_port": str(sshd.port)},
                  rsync_ssh={"ssh_config": str(config)})
    env.put("a.dat", b"a")

    r = env.run("mstm-send", "--once", "--json")

    assert r.returncode == 0, r.stderr
    assert (env.target / "a.dat").read_bytes() == b"a"


def test_without_target_port_and_without_a_config_the_alias_is_not_sent_to_port_22_silently(
        env: StreamEnv, tmp_path: Path) -> None:
    """The ssh configuration is the one place the port comes from: an alias it does not
    know is an unknown host (exit 75, items kept), never a quiet try of port 22."""
    config = tmp_path / "ssh_config"
    config.write_text("Host *\n    Port 1\n")
    env.configure(outgoing={"target_host": ALIAS, "target_port": "", "connect_timeout": "3"},
                  rsync_ssh={"ssh_config": str(config)})
    env.put("a.dat", b"a")

    r = env.run("mstm-send", "--once", "--json")

    assert r.returncode == 75, r.stderr
    assert (env.source / "a.dat").exists()
    assert f"ssh to {ALIAS} failed" in r.stderr  # no ":22", no ":None"


def test_sftp_without_target_port_reads_hostname_and_port_of_the_alias_from_the_ssh_config(
        env: StreamEnv, sshd: LoopbackSshd, tmp_path: Path) -> None:
    config = ssh_config(tmp_path / "ssh_config", sshd)
    env.configure(outgoing={"transfer_protocol": "sftp", "target_host": ALIAS,
                            "target_port": ""},
                  sftp={"ssh_config": str(config), "identity_file": str(sshd.client_key),
                        "known_hosts": str(sshd.known_hosts)})
    env.put("sub dir/é.dat", b"sftp" * 100)

    r = env.run("mstm-send", "--once", "--json")

    assert r.returncode == 0, r.stderr
    assert json.loads(r.stdout)["delivered"] == 1
    assert (env.target / "sub dir" / "é.dat").read_bytes() == b"sftp" * 100


def test_an_unreadable_ssh_config_is_one_configuration_error(
        env: StreamEnv, tmp_path: Path) -> None:
    env.configure(rsync_ssh={"ssh_config": str(tmp_path / "missing")})
    r = env.run("mstm-send", "--check")
    assert r.returncode == 78
    assert "[rsync_ssh] ssh_config" in r.stderr or "ssh_config" in r.stderr
    assert len(r.stderr.strip().splitlines()) == 1, r.stderr


# ------------------------------------------------------------------ the ControlPath limit


@pytest.fixture
def short_base() -> Iterator[Path]:
    """A short directory to grow runtime_dirs of exact lengths from."""
    base = Path(tempfile.mkdtemp(prefix="mstm-rt-", dir="/tmp"))
    yield base
    shutil.rmtree(base, ignore_errors=True)


def exact(base: Path, length: int) -> Path:
    """A path of exactly *length* bytes below *base* (not created)."""
    pad = length - len(str(base)) - 1
    assert pad > 0
    path = base / ("r" * pad)
    assert len(os.fsencode(path)) == length
    return path


def master_binds(sshd: LoopbackSshd, control_path: str) -> tuple[bool, str]:
    """Whether a real ssh ControlMaster can bind *control_path*; and what ssh said."""
    argv = ["ssh", "-F", "/dev/null", "-o", "BatchMode=yes",
            "-o", f"UserKnownHostsFile={sshd.known_hosts}", "-i", str(sshd.client_key),
            "-p", str(sshd.port), "-o", f"ControlPath={control_path}",
            "-o", "ControlMaster=yes", "-o", "ControlPersist=no", "-N", "127.0.0.1"]
    proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stderr=subprocess.PIPE)
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline and proc.poll() is None:
        if os.path.exists(control_path):
            break
        time.sleep(0.02)
    bound = os.path.exists(control_path)
    proc.terminate()
    _, err = proc.communicate(timeout=10)
    return bound, err.decode("utf-8", "replace")


def test_openssh_binds_a_control_path_of_90_bytes_and_not_one_of_91(
        sshd: LoopbackSshd, short_base: Path) -> None:
    """The limit mstm computes (107 bytes of sun_path, less the 17 ssh appends while it
    binds the master socket), checked against the real ssh."""
    assert CONTROL_PATH_MAX == 90
    for length, fits in ((CONTROL_PATH_MAX, True), (CONTROL_PATH_MAX + 1, False)):
        path = exact(short_base / f"d{length}", length)
        path.parent.mkdir()
        bound, err = master_binds(sshd, str(path))
        assert bound is fits, (length, err)
        if not fits:
            assert "too long for Unix domain socket" in err


@pytest.mark.parametrize("length", [RUNTIME_DIR_MAX, 75, 90, 107])
def test_a_long_runtime_dir_still_delivers_over_a_real_control_master(
        env: StreamEnv, tmp_path: Path, short_base: Path, length: int) -> None:
    runtime_dir = exact(short_base, length)
    runtime_dir.mkdir()
    log = tmp_path / "ssh.log"
    env.configure(rsync_ssh={"ssh_cmd": str(recording_ssh(tmp_path / "ssh", log))})
    set_runtime_dir(env, runtime_dir)
    env.put("a.dat", b"a" * 100)
    env.put("b c.dat", b"b" * 100)

    r = env.run("mstm-send", "--once", "--json")

    assert r.returncode == 0, r.stderr
    assert json.loads(r.stdout)["delivered"] == 2
    assert (env.target / "b c.dat").read_bytes() == b"b" * 100
    masters = [a for a in ssh_runs(log) if option(a, "ControlMaster") == "yes"]
    assert masters, "no ControlMaster was started"
    for argv in masters:
        path = option(argv, "ControlPath")
        assert path is not None and len(os.fsencode(path)) <= CONTROL_PATH_MAX
        # the configured directory is used whenever the socket fits in it
        assert path.startswith(f"{runtime_dir}/") is (length <= RUNTIME_DIR_MAX), path
    assert "Unix domain socket" not in r.stderr
    if length > RUNTIME_DIR_MAX:  # the admin is told where the socket went instead
        assert "too long for an ssh ControlPath" in r.stderr
    assert os.listdir(runtime_dir) == []  # the connection's directory is gone
