"""mstm-send over a real sshd on loopback with real rsync: the foundation's promises."""

from __future__ import annotations

import hashlib
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from tests.harness.sshd import LoopbackSshd
from tests.harness.streams import StreamEnv, rsync_wrapper, wrapper_runs, wrapper_senders

pytestmark = pytest.mark.integration

HOSTILE_NAMES = [
    b"with space.dat",
    b"new\nline.dat",
    b"-leading-dash.dat",
    b"--rsh=touch PWNED",
    b"quote'single\"double.dat",
    "ünïcødé-日本.dat".encode(),
    b"non-utf8-\xff\xfe.dat",
    b"back\\slash.dat",
    b"star*and?glob[1].dat",
    b"deep/sub dir/-x/file.dat",
]


def sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def test_move_deletes_each_source_after_the_target_verified_it(stream: StreamEnv) -> None:
    payloads = {f"f{i:03d}.dat".encode(): os.urandom(1000 + i) for i in range(50)}
    for name, data in payloads.items():
        stream.put(name, data)

    r = stream.run("mstm-send", "--once", "--json")

    assert r.returncode == 0, r.stderr
    summary = json.loads(r.stdout)
    assert summary["delivered"] == 50 and summary["failed"] == []
    assert stream.files(stream.target) == {n: sha(d) for n, d in payloads.items()}
    assert stream.files(stream.source) == {}
    by_path = {i["path"]: i["sha256"] for i in summary["items"]}
    assert by_path["f007.dat"] == sha(payloads[b"f007.dat"])


def test_mirror_never_deletes_and_does_not_resend_unchanged_items(stream: StreamEnv) -> None:
    stream.configure(outgoing={"transfer_mode": "mirror"})
    for i in range(20):
        stream.put(f"keep{i}.dat", b"x" * i)

    first = stream.run("mstm-send", "--once", "--json")
    second = stream.run("mstm-send", "--once", "--json")

    assert first.returncode == 0 and second.returncode == 0, first.stderr + second.stderr
    assert json.loads(first.stdout)["delivered"] == 20
    assert json.loads(second.stdout)["delivered"] == 0
    assert len(stream.files(stream.source)) == 20  # MiStaMover defect 1: mirror deleted
    assert stream.files(stream.target) == stream.files(stream.source)


def test_mirror_resends_a_changed_file_of_the_same_size(stream: StreamEnv) -> None:
    stream.configure(outgoing={"transfer_mode": "mirror"})
    path = stream.put("same-size.dat", b"A" * 4096)
    assert stream.run("mstm-send", "--once").returncode == 0
    os.utime(path, ns=(time.time_ns(), time.time_ns() - 10**9))  # mtime differs, size same

    path.write_bytes(b"B" * 4096)  # MiStaMover defect 8: --size-only missed this
    os.utime(path, ns=(time.time_ns(), time.time_ns()))
    r = stream.run("mstm-send", "--once", "--json")

    assert json.loads(r.stdout)["delivered"] == 1
    assert (stream.target / "same-size.dat").read_bytes() == b"B" * 4096


def test_ten_thousand_small_files_go_in_a_handful_of_rsync_runs(stream: StreamEnv,
                                                                  tmp_path: Path) -> None:
    log = tmp_path / "rsync-runs.log"
    stream.configure(rsync_ssh={"cmd": str(rsync_wrapper(tmp_path / "rsync", log))},
                     outgoing={"transfer_mode": "mirror"})
    for i in range(10_000):
        stream.put(f"d{i % 10}/small{i:05d}", b"%d" % i)

    r = stream.run("mstm-send", "--once", "--json", timeout=600)

    assert r.returncode == 0, r.stderr[-2000:]
    assert json.loads(r.stdout)["delivered"] == 10_000
    runs = wrapper_runs(log)
    assert 1 <= len(runs) <= 5, f"{len(runs)} rsync runs"
    assert sum(len(run) for run in runs) == 10_000
    assert len(stream.files(stream.target)) == 10_000


def test_hostile_file_names_arrive_byte_identical(stream: StreamEnv) -> None:
    for name in HOSTILE_NAMES:
        stream.put(name, name * 3)

    r = stream.run("mstm-send", "--once", "--json")

    assert r.returncode == 0, r.stderr
    assert stream.files(stream.target) == {n: sha(n * 3) for n in HOSTILE_NAMES}
    assert stream.files(stream.source) == {}
    assert not Path("PWNED").exists() and not (stream.root / "PWNED").exists()


def test_a_file_held_open_for_writing_is_not_sent_until_closed(stream: StreamEnv) -> None:
    path = stream.put("growing.dat", b"start")
    stream.put("done.dat", b"complete")
    writer = subprocess.Popen([sys.executable, "-c",
                               "import sys,time; f=open(sys.argv[1],'ab'); f.write(b'x');"
                               "f.flush(); sys.stdin.read()", str(path)],
                              stdin=subprocess.PIPE)
    try:
        time.sleep(0.5)
        r = stream.run("mstm-send", "--once", "--json")
        assert [i["path"] for i in json.loads(r.stdout)["items"]] == ["done.dat"]
        assert path.exists() and not (stream.target / "growing.dat").exists()
    finally:
        writer.communicate(b"")
    r = stream.run("mstm-send", "--once", "--json")
    assert [i["path"] for i in json.loads(r.stdout)["items"]] == ["growing.dat"]
    assert (stream.target / "growing.dat").read_bytes() == b"startx"


def test_a_slow_writer_at_one_byte_per_second_is_never_picked_up_early(stream: StreamEnv
                                                                       ) -> None:
    stream.configure(data_stream={"settle_seconds": "3"})
    path = stream.source / "slow.dat"
    writer = subprocess.Popen([sys.executable, "-c",
                               "import sys,time\n"
                               "for i in range(6):\n"
                               "    f=open(sys.argv[1],'ab'); f.write(b'x'); f.close()\n"
                               "    time.sleep(1)",
                               str(path)])
    try:
        while writer.poll() is None:
            r = stream.run("mstm-send", "--once", "--json")
            assert json.loads(r.stdout)["delivered"] == 0
            time.sleep(0.3)
    finally:
        writer.wait()
    assert not (stream.target / "slow.dat").exists()
    time.sleep(3.2)
    r = stream.run("mstm-send", "--once", "--json")
    assert json.loads(r.stdout)["delivered"] == 1
    assert (stream.target / "slow.dat").read_bytes() == b"x" * 6


def test_a_corrupted_copy_at_the_target_is_retried_then_parked_and_the_source_kept(
        stream: StreamEnv, tmp_path: Path) -> None:
    # an rsync that damages what it delivered: verification must catch it every time
    bad = tmp_path / "rsync-corrupting"
    bad.write_text(f"""#!{sys.executable}
import subprocess, sys
data = sys.stdin.buffer.read()
rc = subprocess.run(["rsync", *sys.argv[1:]], input=data).returncode
dest = sys.argv[-1].split(":", 1)[1]  # the batch's staging directory
with open(dest + "victim.dat", "r+b") as f:
    f.write(b"X")
sys.exit(rc)
""")
    bad.chmod(0o755)
    stream.configure(rsync_ssh={"cmd": str(bad)}, outgoing={"retry_count": "3"})
    stream.put("victim.dat", b"v" * 1000)
    stream.put("fine.dat", b"f" * 1000)

    r = stream.run("mstm-send", "--once", "--json")

    assert r.returncode == 1, r.stderr
    summary = json.loads(r.stdout)
    assert [f["path"] for f in summary["failed"]] == ["victim.dat"]
    assert "checksum" in summary["failed"][0]["reason"]
    assert summary["failed"][0]["attempts"] == 3
    assert (stream.source / "victim.dat").read_bytes() == b"v" * 1000
    assert not (stream.source / "fine.dat").exists()
    status = json.loads(stream.run("mstm-send", "--status").stdout)
    assert status["failed"] == 1


def test_kill_9_mid_batch_then_restart_delivers_every_item_exactly_once(
        stream: StreamEnv, tmp_path: Path) -> None:
    payloads = {f"big{i:02d}.dat".encode(): os.urandom(256 * 1024) for i in range(40)}
    for name, data in payloads.items():
        stream.put(name, data)
    # slow enough (2 MB/s) to be killed in the middle of the batch
    stream.configure(outgoing={"bwlimit": "2048", "batch_max_items": "100"})
    proc = stream.popen("mstm-send", "--once", stdout=subprocess.DEVNULL,
                        stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline and len(stream.files(stream.target)) < 3:
        time.sleep(0.1)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    time.sleep(0.5)

    # no source deleted before its verification
    at_source = stream.files(stream.source)
    for name, data in payloads.items():
        if name not in at_source:
            assert (stream.target / os.fsdecode(name)).read_bytes() == data
    assert len(at_source) > 0, "the kill came too late to test anything"

    stream.configure(outgoing={"bwlimit": "0"})
    r = stream.run("mstm-send", "--once", "--json")

    assert r.returncode == 0, r.stderr
    assert stream.files(stream.source) == {}
    # no temp files; the killed sender's staging batch stays until it is a day old
    assert {n: h for n, h in stream.files(stream.target).items()
            if not n.startswith(b".mstm-staging/")} == {n: sha(d) for n, d in payloads.items()}


def test_target_down_during_follow_backs_off_then_delivers_when_it_returns(
        tmp_path: Path, fresh_sshd: LoopbackSshd) -> None:
    env = StreamEnv.create(tmp_path / "s", fresh_sshd)
    env.configure(outgoing={"retry_backoff": "0.5", "retry_backoff_max": "2"})
    fresh_sshd.kill_sessions()
    for i in range(30):
        env.put(f"queued{i}.dat", b"q%d" % i)
    errlog = tmp_path / "follow.err"
    with open(errlog, "wb") as err:
        proc = env.popen("mstm-send", "--follow", stderr=err, stdout=subprocess.DEVNULL)
    try:
        time.sleep(5)
        assert proc.poll() is None, "the sender must not exit while the target is down"
        assert env.files(env.target) == {}
        log_lines = [ln for ln in errlog.read_text().splitlines() if "backing off" in ln]
        steps = [ln.split("(step ")[1].rstrip(")") for ln in log_lines]
        assert len(steps) >= 3 and steps == sorted(set(steps), key=int), log_lines
        fresh_sshd.start()
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline and (len(env.files(env.target)) < 30
                                                or env.files(env.source)):
            time.sleep(0.2)
        assert len(env.files(env.target)) == 30
        assert env.files(env.source) == {}
        assert "reachable again" in errlog.read_text()
    finally:
        proc.terminate()
        proc.wait(timeout=30)
    assert proc.returncode == 0


def test_two_followers_on_one_stream_deliver_2000_items_none_sent_twice(
        stream: StreamEnv, tmp_path: Path) -> None:
    log = tmp_path / "rsync-runs.log"
    stream.configure(rsync_ssh={"cmd": str(rsync_wrapper(tmp_path / "rsync", log))},
                     outgoing={"batch_max_items": "40"})
    for i in range(2000):
        stream.put(f"item{i:04d}", b"%d" % i)
    procs = [stream.popen("mstm-send", "--follow", stdout=subprocess.DEVNULL,
                          stderr=subprocess.DEVNULL) for _ in range(2)]
    try:
        deadline = time.monotonic() + 240
        while time.monotonic() < deadline and len(stream.files(stream.target)) < 2000:
            time.sleep(0.5)
        time.sleep(1)
    finally:
        for p in procs:
            p.terminate()
        for p in procs:
            p.wait(timeout=60)
    sent = [name for run in wrapper_runs(log) for name in run]
    assert len(stream.files(stream.target)) == 2000
    assert stream.files(stream.source) == {}
    assert len(sent) == len(set(sent)) == 2000, "an item was sent twice"
    assert wrapper_senders(log) == {p.pid for p in procs}  # both took part


def test_once_with_the_target_unreachable_exits_75_and_keeps_everything_queued(
        tmp_path: Path, fresh_sshd: LoopbackSshd) -> None:
    env = StreamEnv.create(tmp_path / "s", fresh_sshd)
    env.configure(outgoing={"retry_count": "1", "retry_backoff": "0.1"})
    fresh_sshd.kill_sessions()
    env.put("a.dat", b"a")

    r = env.run("mstm-send", "--once", "--json")

    assert r.returncode == 75, r.stderr
    assert json.loads(r.stdout)["queued"] == 1
    assert (env.source / "a.dat").exists()
    assert r.stderr.count("Traceback") == 0


def test_once_runs_in_a_row_against_a_dead_target_each_end_at_once_with_75(
        tmp_path: Path, fresh_sshd: LoopbackSshd) -> None:
    """From cron: three one-off runs against a target that is down.  Each tries once and
    exits 75 within connect_timeout; none sleeps out the backoff an earlier run saved
    (before: 11.6 s, 73.8 s, then 739 s)."""
    env = StreamEnv.create(tmp_path / "s", fresh_sshd)
    env.configure(outgoing={"retry_count": "3", "retry_backoff": "4", "retry_backoff_max": "60",
                            "connect_timeout": "3"})
    fresh_sshd.kill_sessions()
    env.put("a.dat", b"a")
    for run in range(3):
        started = time.monotonic()
        r = env.run("mstm-send", "--once", "--json")
        took = time.monotonic() - started
        assert r.returncode == 75, r.stderr
        assert took < 10, f"run {run + 1} took {took:.1f} s"
        assert json.loads(r.stdout)["queued"] == 1
    status = json.loads(env.run("mstm-send", "--status", "--json").stdout)
    assert status["backoff"]["step"] == 3  # kept for --follow, which waits it out
    fresh_sshd.start()
    r = env.run("mstm-send", "--once", "--json")  # the target is back: at once, no wait
    assert r.returncode == 0, r.stderr
    assert json.loads(r.stdout)["delivered"] == 1
    assert not (env.source / "a.dat").exists()


def test_once_says_why_nothing_was_delivered_when_files_are_still_settling(
        tmp_path: Path, fresh_sshd: LoopbackSshd) -> None:
    env = StreamEnv.create(tmp_path / "s", fresh_sshd)
    env.configure(data_stream={"settle_seconds": "3600"})
    env.put("being-written.dat", b"not settled yet")
    r = env.run("mstm-send", "--once", "--json")
    assert r.returncode == 0, r.stderr
    summary = json.loads(r.stdout)
    assert summary["delivered"] == 0 and summary["settling"] == 1
    assert "1 not ready yet (settling" in r.stderr
