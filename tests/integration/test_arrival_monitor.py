"""The arrival monitor end to end: mstm-send -> real sshd -> real mstm-receive."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from tests.harness.sshd import LoopbackSshd
from tests.harness.streams import BIN, StreamEnv

pytestmark = pytest.mark.integration


class Receiver:
    """A receiving stream on the 'target host' (this machine, another config)."""

    def __init__(self, root: Path, directory: Path, name: str = "inbound",
                 incoming: dict[str, str] | None = None) -> None:
        self.root = root
        self.name = name
        self.directory = directory
        self.directory.mkdir(parents=True, exist_ok=True)
        (root / "spool").mkdir(parents=True, exist_ok=True)
        self.global_ini = root / "etc" / "global.ini"
        self.global_ini.parent.mkdir(parents=True, exist_ok=True)
        self.global_ini.write_text(
            f"[global]\ndata_stream_list = {name}\nspool_base_dir = {root / 'spool'}\n"
            f"runtime_dir = {root / 'run'}\ngeneral_poll_interval = 0.5\n")
        (root / "etc" / f"{name}.ini").write_text(
            f"[data_stream]\ndirectory = {directory}\n" + "".join(
                f"[incoming]\n{k} = {v}\n" for k, v in (incoming or {}).items()))
        self.proc: subprocess.Popen[bytes] | None = None
        self.log = root / "receive.log"

    @property
    def incoming(self) -> Path:
        return self.directory / ".mstm-incoming"

    def start(self) -> Receiver:
        with open(self.log, "ab") as log:
            self.proc = subprocess.Popen(
                [str(BIN / "mstm-receive"), "--config", str(self.global_ini), "-v",
                 "--follow", self.name], stdout=subprocess.DEVNULL, stderr=log)
        return self

    def stop(self) -> None:
        if self.proc and self.proc.poll() is None:
            self.proc.terminate()
            self.proc.wait(timeout=30)


@pytest.fixture
def receiver(tmp_path: Path, stream: StreamEnv) -> Iterator[Receiver]:
    rx = Receiver(tmp_path / "rx", stream.target).start()
    stream.configure(outgoing={"target_uses_arrival_monitor": "true",
                               "receipt_file_poll_interval": "0.5",
                               "receipt_file_poll_count": "40"})
    yield rx
    rx.stop()


def protocol_leftovers(rx: Receiver) -> list[str]:
    if not rx.incoming.exists():
        return []
    return sorted(p.name for p in rx.incoming.iterdir() if p.name != ".quarantine")


def damaging_rsync(path: Path, action: str) -> Path:
    """An rsync that, after a real transfer into a batch directory, damages victim.dat."""
    path.write_text(f"""#!{sys.executable}
import glob, os, subprocess, sys
data = sys.stdin.buffer.read()
rc = subprocess.run(["rsync", *sys.argv[1:]], input=data).returncode
for victim in glob.glob(os.path.join(sys.argv[-1].split(":", 1)[1], "victim.dat")):
    if {action!r} == "corrupt":
        with open(victim, "r+b") as f:
            f.write(b"X")
    elif {action!r} == "truncate":
        os.truncate(victim, 10)
    elif {action!r} == "delete":
        os.unlink(victim)
sys.exit(rc)
""")
    path.chmod(0o755)
    return path


def test_a_batch_is_published_acknowledged_and_cleaned_up(stream: StreamEnv,
                                                           receiver: Receiver) -> None:
    payloads = {f"obs/{i:03d}.nc": os.urandom(3000 + i) for i in range(100)}
    payloads["name with\nnewline %41"] = b"odd"
    for name, data in payloads.items():
        stream.put(name, data)

    r = stream.run("mstm-send", "--once", "--json")

    assert r.returncode == 0, r.stderr + receiver.log.read_text()
    assert json.loads(r.stdout)["delivered"] == 101
    published = {k: v for k, v in stream.files(stream.target).items()
                 if not k.startswith(b".mstm-incoming")}
    assert published == {os.fsencode(n): __import__("hashlib").sha256(d).hexdigest()
                         for n, d in payloads.items()}
    assert stream.files(stream.source) == {}
    deadline = time.monotonic() + 10
    while protocol_leftovers(receiver) and time.monotonic() < deadline:
        time.sleep(0.1)
    # MiStaMover defect 4: the thank-you never arrived and receipts piled up
    assert protocol_leftovers(receiver) == []


@pytest.mark.parametrize(("action", "status"), [("corrupt", "bad-checksum"),
                                                 ("truncate", "bad-size"),
                                                 ("delete", "missing")])
def test_a_damaged_item_gets_its_status_a_resend_and_is_parked_with_its_source_kept(
        stream: StreamEnv, receiver: Receiver, tmp_path: Path, action: str, status: str) -> None:
    stream.configure(rsync_ssh={"cmd": str(damaging_rsync(tmp_path / "rsync", action))},
                     outgoing={"retry_count": "3"})  # 3 attempts in all
    stream.put("victim.dat", b"v" * 1000)
    stream.put("fine.dat", b"f" * 1000)

    r = stream.run("mstm-send", "--once", "--json")

    assert r.returncode == 1, r.stderr
    summary = json.loads(r.stdout)
    # MiStaMover defect 2: a "bad checksum" receipt counted as success and the source went
    assert [f["path"] for f in summary["failed"]] == ["victim.dat"]
    assert status in summary["failed"][0]["reason"]
    assert summary["failed"][0]["attempts"] == 3
    assert (stream.source / "victim.dat").read_bytes() == b"v" * 1000
    assert not (stream.target / "victim.dat").exists()
    assert (stream.target / "fine.dat").read_bytes() == b"f" * 1000
    assert not (stream.source / "fine.dat").exists()


def test_control_files_never_overtake_their_data(stream: StreamEnv, receiver: Receiver
                                                 ) -> None:
    # MiStaMover defect 3: rsync sent ".x.ctrl" before "x"; the receiver said "no such file"
    stream.configure(outgoing={"batch_max_items": "7"})
    for i in range(140):
        stream.put(f"a{i:03d}", b"%d" % i)
    r = stream.run("mstm-send", "--once", "--json")
    summary = json.loads(r.stdout)
    assert summary["delivered"] == 140 and summary["retried"] == 0, r.stderr


def test_a_stop_file_in_the_target_incoming_area_pauses_the_sender_until_removed(
        stream: StreamEnv, receiver: Receiver) -> None:
    stream.configure(outgoing={"stop_file_poll_interval": "0.5"})
    stream.put("first.dat", b"1")
    assert stream.run("mstm-send", "--once").returncode == 0
    stop = receiver.incoming / ".stop"
    stop.write_text("maintenance\n")
    errlog = stream.root / "follow.err"
    with open(errlog, "wb") as err:
        proc = stream.popen("mstm-send", "--follow", stderr=err, stdout=subprocess.DEVNULL)
    try:
        time.sleep(1.5)
        stream.put("second.dat", b"2")
        time.sleep(2)
        assert not (stream.target / "second.dat").exists()
        assert "paused" in errlog.read_text()
        stop.unlink()
        deadline = time.monotonic() + 10
        while not (stream.target / "second.dat").exists() and time.monotonic() < deadline:
            time.sleep(0.1)
        assert (stream.target / "second.dat").read_bytes() == b"2"
        assert "resumed" in errlog.read_text()
    finally:
        proc.terminate()
        proc.wait(timeout=30)


def test_a_three_hop_chain_moves_500_files_each_hop_verified(tmp_path: Path,
                                                             sshd: LoopbackSshd) -> None:
    hop_a = StreamEnv.create(tmp_path / "A", sshd, name="a2b")
    hop_b = StreamEnv.create(tmp_path / "B", sshd, name="b2c")
    # B's published directory is both B's receiving directory and the source of hop b2c
    rx_b = Receiver(tmp_path / "rxB", hop_b.source, name="b_in")
    rx_c = Receiver(tmp_path / "rxC", hop_b.target, name="c_in")
    am = {"target_uses_arrival_monitor": "true", "receipt_file_poll_interval": "0.5"}
    hop_a.configure(outgoing={**am, "target_dir": str(hop_b.source)})
    hop_b.configure(outgoing=am)
    payloads = {f"run{i % 5}/f{i:03d}": os.urandom(500 + i) for i in range(500)}
    for name, data in payloads.items():
        hop_a.put(name, data)
    rx_b.start()
    rx_c.start()
    try:
        ra = hop_a.run("mstm-send", "--once", "--json")
        rb = hop_b.run("mstm-send", "--once", "--json")
    finally:
        rx_b.stop()
        rx_c.stop()
    assert json.loads(ra.stdout)["delivered"] == 500, ra.stderr
    assert json.loads(rb.stdout)["delivered"] == 500, rb.stderr
    final = {k: v for k, v in hop_b.files(hop_b.target).items()
             if not k.startswith(b".mstm-incoming")}
    assert len(final) == 500
    assert hop_a.files(hop_a.source) == {}
    assert {k for k in hop_b.files(hop_b.source) if not k.startswith(b".mstm-incoming")} == set()


def test_a_batch_left_by_a_sender_killed_mid_rsync_is_removed_and_later_deliveries_work(
        tmp_path: Path, stream: StreamEnv) -> None:
    """A sender killed during the rsync leaves its batch directory (a partial file in it)
    and no control file; it never sends into that directory again.  The receiver removes
    it once nothing in it changed for abandoned_batch_seconds, and the item goes in a
    new batch."""
    rx = Receiver(tmp_path / "rx", stream.target,
                  incoming={"abandoned_batch_seconds": "2"}).start()
    stream.configure(outgoing={"target_uses_arrival_monitor": "true",
                               "receipt_file_poll_interval": "0.5",
                               "receipt_file_poll_count": "40", "bwlimit": "2048"})
    # 20 s at 2 MiB/s, below the streaming threshold; rsync's receiver writes in 256 KiB
    # blocks, so the partial file changes many times a second while the sender lives
    data = os.urandom(40 << 20)
    stream.put("big.dat", data)
    try:
        errlog = stream.root / "killed-sender.err"
        with open(errlog, "wb") as err:
            sender = stream.popen("mstm-send", "--once", stdout=subprocess.DEVNULL,
                                  stderr=err, start_new_session=True)

        def partial_batches() -> list[Path]:
            if not rx.incoming.exists():
                return []
            return [d for d in rx.incoming.iterdir() if d.is_dir() and not
                    d.name.startswith(".") and any(f.is_file() and f.stat().st_size
                                                   for f in d.rglob("*"))]

        deadline = time.monotonic() + 30
        while not partial_batches():
            assert time.monotonic() < deadline and sender.poll() is None, \
                errlog.read_text() + rx.log.read_text()
            time.sleep(0.05)
        (batch_dir,) = partial_batches()
        os.killpg(sender.pid, signal.SIGKILL)  # mstm-send, its rsync and its ssh
        sender.wait(timeout=10)
        # (rsync may move its partial file to the partial directory as it dies: the
        # batch directory stays, maybe empty)
        assert not any(p.name.startswith(batch_dir.name + ".") for p in rx.incoming.iterdir())

        deadline = time.monotonic() + 20
        while batch_dir.exists():
            assert time.monotonic() < deadline, rx.log.read_text()
            time.sleep(0.1)
        assert protocol_leftovers(rx) == []
        log = rx.log.read_text()
        assert f"batch {batch_dir.name} abandoned" in log and "Traceback" not in log

        # the item is still queued (its claim's owner is dead) and goes in a new batch
        stream.configure(outgoing={"bwlimit": "0"})
        r = stream.run("mstm-send", "--once", "--json")
        assert r.returncode == 0, r.stderr + rx.log.read_text()
        assert json.loads(r.stdout)["delivered"] == 1
        assert (stream.target / "big.dat").read_bytes() == data
        assert not (stream.source / "big.dat").exists()
        deadline = time.monotonic() + 10
        while protocol_leftovers(rx) and time.monotonic() < deadline:
            time.sleep(0.1)
        assert protocol_leftovers(rx) == []
        assert rx.log.read_text().count(" abandoned (") == 1
    finally:
        rx.stop()
