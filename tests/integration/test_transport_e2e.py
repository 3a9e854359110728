"""Every transport end to end: the real mstm-send --once against a real server on loopback.

local (a directory of this host), rsync_native (rsync --daemon), sftp (OpenSSH's sshd,
internal-sftp), ftp and ftps (pyftpdlib, TLS required for ftps).  For each: move and
mirror, names with spaces and unicode, 1,000 small files with one large file (256 MiB;
1 GiB with MSTM_LONG=1), an interrupted transfer retried after the server was killed
and restarted, a stall cut by stall_seconds (server SIGSTOP'd, then SIGCONT'd), the
bandwidth limit honoured within 20 %, and directory items.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import signal
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from tests.conftest import need
from tests.harness.servers import (
    FtpServer,
    RsyncDaemon,
    Target,
    kill_server,
    make_stream,
    pause_server,
    resume_server,
)
from tests.harness.sshd import SSHD, LoopbackSshd

pytestmark = pytest.mark.integration

PROTOCOLS = ["local", "rsync_native", "sftp", "ftp", "ftps"]
SERVED = [p for p in PROTOCOLS if p != "local"]
NAMES = ["with space.dat", "ünïcødé-日本.dat", "deep/sub dir/x y.dat", "tab\there.dat",
         "-leading-dash.dat", "quote'single\"double.dat"]
LARGE = (1 << 30) if os.environ.get("MSTM_LONG") == "1" else (256 << 20)


def sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def start_target(protocol: str, root: Path) -> Target:
    if protocol == "local":
        path = root / "target"
        return Target("local", path, {"outgoing": {"target_dir": str(path)}})
    if protocol == "rsync_native":
        need("rsync")
        daemon = RsyncDaemon(root / "rsyncd")
        daemon.start()
        return Target("rsync_native", daemon.path / "incoming", {
            "outgoing": {"target_host": "127.0.0.1", "target_port": str(daemon.port),
                         "target_dir": "/incoming"},
            "rsync_native": {"module": daemon.module, "username": daemon.user,
                             "password_file": str(daemon.password_file)}}, daemon)
    if protocol == "sftp":
        need(SSHD)
        sshd = LoopbackSshd(root=root / "sshd").start()
        path = root / "target"
        return Target("sftp", path, {
            "outgoing": {"target_host": "127.0.0.1", "target_port": str(sshd.port),
                         "target_dir": str(path)},
            "sftp": {"identity_file": str(sshd.client_key),
                     "known_hosts": str(sshd.known_hosts)}}, sshd)
    server = FtpServer(root / "ftpd", tls=protocol == "ftps")
    server.start()
    ftp = {"username": server.user, "password_file": str(server.password_file)}
    if protocol == "ftps":
        ftp["ca_file"] = str(server.cert)
    return Target(protocol, server.home / "incoming", {
        "outgoing": {"target_host": "127.0.0.1", "target_port": str(server.port),
                     "target_dir": "/incoming"}, "ftp": ftp}, server)


def stop_target(target: Target) -> None:
    if target.server is not None:
        if target.server.proc is not None:
            resume_server(target.server)
        target.server.cleanup()


@pytest.fixture(params=PROTOCOLS)
def env(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Any]:
    target = start_target(request.param, tmp_path)
    yield make_stream(tmp_path / "stream", target)
    stop_target(target)


@pytest.fixture(params=SERVED)
def served(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Any]:
    target = start_target(request.param, tmp_path)
    yield make_stream(tmp_path / "stream", target)
    stop_target(target)


def summary(r: subprocess.CompletedProcess[str]) -> dict[str, Any]:
    assert r.stdout, r.stderr[-3000:]
    out: dict[str, Any] = json.loads(r.stdout)
    return out


def bytes_under(path: Path) -> int:
    total = 0
    for dirpath, _dirs, names in os.walk(path):
        for n in names:
            try:
                total += os.lstat(os.path.join(dirpath, n)).st_size
            except OSError:
                pass
    return total


# rsync's own temporary file (".<name>.XXXXXX"), left behind when the daemon is killed
RSYNC_TEMP = re.compile(rb"(^|/)\.[^/]+\.[A-Za-z0-9]{6}$")


def visible(env: Any) -> dict[bytes, str]:
    """Files at the target, staging and partial areas excluded (they may stay behind),
    and for rsync_native the temporary files a killed daemon could not remove."""
    return {k: v for k, v in env.files(env.target).items()
            if not k.startswith((b".mstm-staging/", b".mstm-partial/"))
            and not (env.spec.protocol == "rsync_native" and RSYNC_TEMP.search(k))}


def big_file(path: Path, size: int) -> str:
    """*size* bytes of varied content, written fast; returns its sha256."""
    h = hashlib.sha256()
    block = os.urandom(1 << 20)
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "wb") as f:
        for i in range(size >> 20):
            chunk = i.to_bytes(8, "little") + block[8:]
            f.write(chunk)
            h.update(chunk)
    return h.hexdigest()


def file_sha(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 20):
            h.update(chunk)
    return h.hexdigest()


def test_move_delivers_names_with_spaces_and_unicode_then_deletes_the_sources(env: Any) -> None:
    payloads = {n.encode(): n.encode() * 7 for n in NAMES}
    for name, data in payloads.items():
        env.put(name, data)

    r = env.run("mstm-send", "--once", "--json")

    assert r.returncode == 0, r.stderr[-3000:]
    s = summary(r)
    assert s["delivered"] == len(NAMES) and s["failed"] == []
    assert visible(env) == {n: sha(d) for n, d in payloads.items()}  # no temporary files
    assert env.files(env.source) == {}


def test_mirror_keeps_the_sources_and_sends_nothing_twice(env: Any) -> None:
    env.configure(outgoing={"transfer_mode": "mirror"})
    for i in range(20):
        env.put(f"m/keep {i}.dat", b"k%d" % i * 100)

    first = env.run("mstm-send", "--once", "--json")
    second = env.run("mstm-send", "--once", "--json")

    assert first.returncode == 0 and second.returncode == 0, first.stderr + second.stderr
    assert summary(first)["delivered"] == 20
    assert summary(second)["delivered"] == 0
    assert len(env.files(env.source)) == 20
    assert visible(env) == env.files(env.source)


def test_a_thousand_small_files_and_one_large_file(env: Any) -> None:
    for i in range(1000):
        env.put(f"small/{i % 10}/s{i:04d}.dat", b"%d" % i)
    large_sha = big_file(env.source / "large.bin", LARGE)

    t0 = time.monotonic()
    r = env.run("mstm-send", "--once", "--json", timeout=900)
    took = time.monotonic() - t0

    assert r.returncode == 0, r.stderr[-3000:]
    assert summary(r)["delivered"] == 1001
    assert file_sha(env.target / "large.bin") == large_sha
    small = {k: v for k, v in visible(env).items() if k.startswith(b"small/")}
    assert len(small) == 1000 and small[b"small/7/s0007.dat"] == sha(b"7")
    assert env.files(env.source) == {}
    print(f"{env.spec.protocol}: 1000 small + {LARGE >> 20} MiB in {took:.1f} s")


def test_directory_items_arrive_whole(env: Any) -> None:
    env.configure(data_stream={"transfer_unit": "dir"})
    tree = {"run1/a.dat": b"a" * 1000, "run1/sub dir/b ü.dat": b"b" * 2000,
            "run2/c.dat": b"c" * 10}
    for rel, data in tree.items():
        env.put(rel, data)
    os.makedirs(env.source / "run1" / "empty")

    r = env.run("mstm-send", "--once", "--json")

    assert r.returncode == 0, r.stderr[-3000:]
    assert summary(r)["delivered"] == 2
    # every protocol delivers trees (ftp's Zip64 archives could not merge), merged
    assert visible(env) == {k.encode(): sha(v) for k, v in tree.items()}
    assert (env.target / "run1" / "empty").is_dir()
    assert not (env.source / "run1").exists()


def _wait_for(cond: Any, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not cond():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.05)


def test_a_transfer_interrupted_by_the_server_dying_is_retried_and_delivered_once(
        served: Any) -> None:
    env = served
    payload_sha = big_file(env.source / "big.bin", 24 << 20)
    env.configure(outgoing={"bwlimit": "6144", "retry_count": "20", "connect_timeout": "3"})
    proc = env.popen("mstm-send", "--once", "--json", stdout=subprocess.PIPE,
                     stderr=subprocess.PIPE)
    try:
        _wait_for(lambda: bytes_under(env.target) > (3 << 20), 30, "the transfer to start")
        kill_server(env.spec.server)
        partial = bytes_under(env.target)
        time.sleep(1)
        env.spec.server.start()
        out, err = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 0, err.decode()[-3000:]
    s = json.loads(out)
    assert s["delivered"] == 1 and s["failed"] == []
    assert partial < (24 << 20), "the kill came too late to test anything"
    assert visible(env) == {b"big.bin": payload_sha}  # exactly once, no temporary copy
    assert not (env.source / "big.bin").exists()


def test_a_stalled_server_is_cut_by_the_stall_timeout_then_the_item_is_delivered(
        served: Any) -> None:
    env = served
    # more than loopback's socket buffers hold, so a stopped server blocks the writer
    payload_sha = big_file(env.source / "slow.bin", 32 << 20)
    env.configure(outgoing={"bwlimit": "8192", "stall_seconds": "2", "retry_count": "20",
                            "connect_timeout": "3"})
    proc = env.popen("mstm-send", "--once", "--json", "-v", stdout=subprocess.PIPE,
                     stderr=subprocess.PIPE)
    try:
        _wait_for(lambda: bytes_under(env.target) > (2 << 20), 30, "the transfer to start")
        pause_server(env.spec.server)
        t_pause = time.monotonic()
        time.sleep(5)
        resume_server(env.spec.server)
        out, err = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            proc.kill()
    text = err.decode("utf-8", "replace")
    assert proc.returncode == 0, text[-3000:]
    assert json.loads(out)["delivered"] == 1
    assert visible(env) == {b"slow.bin": payload_sha}
    assert any(w in text for w in ("no progress", "stalled", "timeout", "timed out")), text
    assert time.monotonic() - t_pause < 100


def test_local_copy_killed_mid_file_is_delivered_once_on_the_next_run(tmp_path: Path) -> None:
    target = start_target("local", tmp_path)
    env = make_stream(tmp_path / "stream", target)
    payload_sha = big_file(env.source / "big.bin", 24 << 20)
    env.configure(outgoing={"bwlimit": "6144"})
    proc = env.popen("mstm-send", "--once", stdout=subprocess.DEVNULL,
                     stderr=subprocess.DEVNULL)
    _wait_for(lambda: bytes_under(env.target) > (3 << 20), 30, "the copy to start")
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert not (env.target / "big.bin").exists()  # only the hidden temporary name

    env.configure(outgoing={"bwlimit": "0"})
    r = env.run("mstm-send", "--once", "--json")

    assert r.returncode == 0, r.stderr
    assert summary(r)["delivered"] == 1
    # the killed run's staging batch stays until it is a day old (open() removes it then)
    assert visible(env) == {b"big.bin": payload_sha}


def test_the_bandwidth_limit_is_honoured_within_20_percent(env: Any) -> None:
    size = 5 << 20
    big_file(env.source / "paced.bin", size)
    limit_kib = 1000
    env.configure(outgoing={"bwlimit": str(limit_kib)})
    proc = env.popen("mstm-send", "--once", stdout=subprocess.DEVNULL,
                     stderr=subprocess.PIPE)
    samples: list[tuple[float, int]] = []
    final = env.target / "paced.bin"
    try:
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline and not final.exists():
            n = bytes_under(env.target)
            if n:
                samples.append((time.monotonic(), n))
            time.sleep(0.02)
        done_at = time.monotonic()
        _, err = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 0, err.decode()[-3000:]
    assert samples, "never saw the file grow"
    t_first, n_first = samples[0]
    rate = (size - n_first) / (done_at - t_first) / 1024
    print(f"{env.spec.protocol}: {rate:.0f} KiB/s at a limit of {limit_kib} KiB/s")
    assert 0.8 * limit_kib <= rate <= 1.2 * limit_kib


@pytest.mark.parametrize("protocol", ["ftp", "sftp", "local"])
def test_a_directory_of_2000_entries_is_staged_verified_and_merged(
        protocol: str, tmp_path: Path) -> None:
    """A directory item of many files through the sender: staged, verified file by
    file, merged into a target directory that holds another team's file."""
    target = start_target(protocol, tmp_path)
    try:
        env = make_stream(tmp_path / "stream", target,
                          data_stream={"transfer_unit": "dir"},
                          outgoing={"transfer_mode": "mirror"})
        top = env.source / "huge"
        for d in range(20):
            sub = top / f"d{d:02d}"
            sub.mkdir(parents=True)
            for i in range(100):
                (sub / f"f{i:03d}").write_bytes(b"%d/%d" % (d, i))
        (env.target / "huge").mkdir()
        (env.target / "huge" / "theirs").write_bytes(b"t")

        t0 = time.monotonic()
        r = env.run("mstm-send", "--once", "--json", timeout=600)
        took = time.monotonic() - t0

        assert r.returncode == 0, r.stderr[-3000:]
        assert summary(r)["delivered"] == 1
        got = visible(env)
        assert len(got) == 2001 and (env.target / "huge" / "d19" / "f099").read_bytes() == \
            b"19/99"
        assert (env.target / "huge" / "theirs").read_bytes() == b"t"
        print(f"{protocol}: 2,000 entries in {took:.1f} s")
    finally:
        stop_target(target)


def make_transport_for(env: Any) -> Any:
    from mstm.config import load_stream
    from mstm.transports import make_transport

    return make_transport(load_stream(env.name, env.global_ini))


def test_the_arrival_monitor_operations_work_over_every_transport(env: Any) -> None:
    """What the sender uses with mstm-receive at the target: a batch directory of its
    own (`dest`, directories as plain trees), small files put atomically and awaited."""
    env.put("f ü.dat", b"file")
    env.put("tree/sub/g.dat", b"g" * 100)
    t = make_transport_for(env)
    remote_in = "/incoming/.mstm-incoming" if env.spec.protocol in (
        "rsync_native", "ftp", "ftps") else f"{env.target}/.mstm-incoming"
    local_in = env.target / ".mstm-incoming"
    t.open()
    try:
        from mstm.transports.base import Item

        r = t.send([Item("f ü.dat", 4), Item("tree", 100, is_dir=True)],
                   dest=f"{remote_in}/b1")
        assert r.error == "" and r.files == 2
        assert (local_in / "b1" / "f ü.dat").read_bytes() == b"file"
        assert (local_in / "b1" / "tree" / "sub" / "g.dat").read_bytes() == b"g" * 100
        t.put_file(remote_in, "b1.ctrl", b"control")
        assert (local_in / "b1.ctrl").read_bytes() == b"control"
        assert not [n for n in os.listdir(local_in) if "part" in n]
        assert t.await_file(remote_in, "b1.ctrl", timeout=5, max_bytes=4) == b"cont"
        assert t.await_file(remote_in, "b1.rcpt", timeout=0.5, max_bytes=4) is None
        assert t.stop_file_present() is None
        (env.target / ".stop").touch()
        assert t.stop_file_present()
    finally:
        t.close()


# -- rsync_native: durability at the daemon (--fsync) ------------------------------------
def _fsync_daemon(root: Path, *, refuse: bool = False, trace: Path | None = None) -> Any:
    """An rsync daemon, optionally under strace (logging its fsync calls) or refusing
    --fsync the way a daemon older than 3.2.4 does (exit 4, "--fsync" in the message)."""
    need("rsync")

    class Daemon(RsyncDaemon):
        def argv(self) -> list[str]:
            argv = super().argv()
            if trace is not None:
                argv = [need("strace"), "-f", "-qq", "-e", "trace=fsync,rename,renameat,renameat2",
                        "-o", str(trace), *argv]
            return argv

    daemon = Daemon(root / "rsyncd")
    if refuse:
        daemon.conf.write_text(daemon.conf.read_text() + "refuse options = fsync\n")
    daemon.start()
    return daemon


def _native_stream(root: Path, daemon: Any) -> Any:
    target = Target("rsync_native", daemon.path / "incoming", {
        "outgoing": {"target_host": "127.0.0.1", "target_port": str(daemon.port),
                     "target_dir": "/incoming"},
        "rsync_native": {"module": daemon.module, "username": daemon.user,
                         "password_file": str(daemon.password_file)}}, daemon)
    return make_stream(root / "stream", target)


def test_rsync_native_has_the_daemon_fsync_each_file_before_its_rename(tmp_path: Path) -> None:
    from mstm.transports.rsync_native import supports_fsync

    if not supports_fsync("rsync"):
        pytest.skip("the local rsync has no --fsync (< 3.2.4)")
    trace = tmp_path / "daemon.strace"
    daemon = _fsync_daemon(tmp_path, trace=trace)
    try:
        env = _native_stream(tmp_path, daemon)
        env.put("a.dat", b"a" * 5000)
        env.put("b c.dat", b"b" * 7000)
        r = env.run("mstm-send", "--once", "--json")
        assert r.returncode == 0, r.stderr[-3000:]
        assert summary(r)["delivered"] == 2
    finally:
        daemon.cleanup()
    calls = trace.read_text().splitlines()
    fsyncs = [i for i, c in enumerate(calls) if " fsync(" in c and "= 0" in c]
    renames = [i for i, c in enumerate(calls) if "rename" in c and ".dat" in c]
    assert len(fsyncs) >= 2 and len(renames) == 2, calls
    assert fsyncs[0] < renames[0] and fsyncs[1] < renames[1]


def test_rsync_native_sends_without_fsync_to_a_daemon_that_refuses_it(
        tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    from mstm.transports.base import Item, staging_dir

    daemon = _fsync_daemon(tmp_path, refuse=True)
    try:
        env = _native_stream(tmp_path, daemon)
        env.put("a.dat", b"a" * 5000)
        t = make_transport_for(env)
        t.open()
        with caplog.at_level("WARNING", logger="mstm.rsync_native"):
            r = t.send([Item("a.dat", 5000)], dest=staging_dir(t.target_dir, "b1"))
            assert t.inspect(["a.dat"], staged="b1")["a.dat"].sha256
            assert t.publish([Item("a.dat", 5000)], staged="b1") == {}
            again = t.send([Item("a.dat", 5000, force=True)],
                           dest=staging_dir(t.target_dir, "b2"))
            t.discard("b2")
        t.close()
        assert r.exit_code == 0 and r.files == 1, r.error
        assert again.exit_code == 0
        assert (env.target / "a.dat").read_bytes() == b"a" * 5000
        assert [m for m in caplog.messages if "refuses --fsync" in m] and len(
            [m for m in caplog.messages if "refuses --fsync" in m]) == 1
    finally:
        daemon.cleanup()
