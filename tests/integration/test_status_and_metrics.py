"""Every stream at a glance, and metrics an alert rule can use (issue 14, sections 1-2),
with the real components: streams delivering over a loopback sshd, Debian's
prometheus-node-exporter reading the metrics files with its textfile collector and
scraped over HTTP, and Debian's promtool checking and testing the shipped alert rules."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from tests.conftest import need
from tests.harness.node_exporter import NodeExporter
from tests.harness.sshd import LoopbackSshd, free_port
from tests.harness.streams import StreamEnv

ROOT = Path(__file__).resolve().parents[2]
RULES = ROOT / "conf" / "mstm.rules.yml"
RULE_TESTS = Path(__file__).resolve().parent / "metrics" / "mstm_rules_test.yml"
PROMTOOL = "/usr/bin/promtool"
BIN = Path(sys.executable).parent
ISO = re.compile(r"^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\+00:00$")


# -- promtool -----------------------------------------------------------------------------
def test_promtool_accepts_the_shipped_alert_rules() -> None:
    promtool = need(PROMTOOL)
    r = subprocess.run([promtool, "check", "rules", str(RULES)], capture_output=True,
                       text=True, check=False)
    assert r.returncode == 0, r.stdout + r.stderr
    assert "SUCCESS: 4 rules found" in r.stdout


def test_the_rules_fire_stuck_unreachable_and_failures_only_when_they_should() -> None:
    """promtool test rules: "stuck" fires on an old item with no delivery for an hour and
    not when deliveries happen; unreachable after 15 minutes, not on a blip; failures
    when one item was given up."""
    promtool = need(PROMTOOL)
    r = subprocess.run([promtool, "test", "rules", RULE_TESTS.name], capture_output=True,
                       text=True, check=False, cwd=RULE_TESTS.parent)
    assert r.returncode == 0, r.stdout + r.stderr
    assert "SUCCESS" in r.stdout


# -- node_exporter ----------------------------------------------------------------------
@pytest.fixture
def exporter_for(tmp_path: Path) -> Iterator[Callable[[Path], NodeExporter]]:
    started: list[NodeExporter] = []

    def start(directory: Path) -> NodeExporter:
        exporter = NodeExporter(directory, tmp_path / "node_exporter.log")
        started.append(exporter)
        return exporter

    yield start
    for e in started:
        e.stop()


def wait_for(check: Callable[[], bool], what: str, timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while not check():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.1)


def prom_value(path: Path, line_start: str) -> float | None:
    """The value of the sample line starting with *line_start* in a .prom file."""
    try:
        text = path.read_text()
    except FileNotFoundError:
        return None
    for line in text.splitlines():
        if line.startswith(line_start + " "):
            return float(line.rsplit(" ", 1)[1])
    return None


def test_node_exporter_serves_what_a_following_sender_delivered_then_that_its_target_is_down(
        tmp_path: Path, fresh_sshd: LoopbackSshd,
        exporter_for: Callable[[Path], NodeExporter]) -> None:
    env = StreamEnv.create(tmp_path / "s", fresh_sshd)
    env.configure(outgoing={"retry_backoff": "30", "retry_backoff_max": "60",
                            "connect_timeout": "3"})
    metrics = env.root / "metrics"
    prom = metrics / "mstm_send_proj1.prom"
    exporter = exporter_for(metrics)
    payloads = {f"f{i}.dat": os.urandom(1000 * (i + 1)) for i in range(5)}
    for name, data in payloads.items():
        env.put(name, data)
    sender = env.popen("mstm-send", "--follow", stderr=subprocess.PIPE)
    try:
        wait_for(lambda: all((env.target / n).exists() for n in payloads), "delivery")
        wait_for(lambda: prom_value(prom, 'mstm_delivered_items_total{stream="proj1"}') == 5,
                 "the metrics file to show 5 delivered")
        got = exporter.scrape()
        s = (("stream", "proj1"),)
        assert got[("node_textfile_scrape_error", ())] == 0
        assert got[("mstm_delivered_items_total", s)] == 5
        assert got[("mstm_delivered_bytes_total", s)] == sum(map(len, payloads.values()))
        assert got[("mstm_queue_items", s)] == 0
        assert got[("mstm_queue_oldest_age_seconds", s)] == 0
        assert abs(got[("mstm_last_success_timestamp_seconds", s)] - time.time()) < 60
        assert got[("mstm_target_unreachable", s)] == 0
        assert got[("mstm_backoff", s)] == 0
        assert got[("mstm_failures_total", (("reason", "mismatch"), *s))] == 0
        assert got[("mstm_paused", (("reason", "local_stop_file"), *s))] == 0

        # the target goes down: the next item stays queued, the stream backs off
        fresh_sshd.kill_sessions()
        env.put("late.dat", b"late" * 100)
        wait_for(lambda: prom_value(prom, 'mstm_target_unreachable{stream="proj1"}') == 1,
                 "the metrics file to show the target unreachable")
        got = exporter.scrape()
        assert got[("node_textfile_scrape_error", ())] == 0
        assert got[("mstm_target_unreachable", s)] == 1
        assert got[("mstm_backoff", s)] == 1
        assert got[("mstm_backoff_until_timestamp_seconds", s)] > time.time()
        assert got[("mstm_queue_items", s)] == 1
        assert got[("mstm_queue_bytes", s)] == 400
        assert got[("mstm_delivered_items_total", s)] == 5
    finally:
        sender.send_signal(signal.SIGTERM)
        _out, err = sender.communicate(timeout=60)
    assert sender.returncode == 0, err.decode()
    assert "cannot write metrics" not in err.decode()
    # the totals survive the sender: the status of the stream still says 5 delivered
    r = env.run("mstm-send", "--status")
    assert r.returncode == 0, r.stderr
    status = json.loads(r.stdout)
    assert status["delivered_total_items"] == 5 and status["state"] == "backing-off"


# -- the status of several streams -------------------------------------------------------
CORRUPTING_RSYNC = """#!{python}
import subprocess, sys
data = sys.stdin.buffer.read()
rc = subprocess.run(["rsync", *sys.argv[1:]], input=data).returncode
dest = sys.argv[-1].split(":", 1)[1]  # the batch's staging directory
with open(dest + "victim.dat", "r+b") as f:
    f.write(b"X")
sys.exit(rc)
"""


class Site:
    """Several streams in one configuration, against one loopback sshd."""

    def __init__(self, root: Path, sshd: LoopbackSshd) -> None:
        self.root = root
        self.sshd = sshd
        self.etc = root / "etc"
        for d in (self.etc, root / "spool", root / "metrics"):
            d.mkdir(parents=True)
        self.names: list[str] = []

    @property
    def global_ini(self) -> Path:
        return self.etc / "global.ini"

    def source(self, name: str) -> Path:
        return self.root / "src" / name

    def target(self, name: str) -> Path:
        return self.root / "dst" / name

    def add(self, name: str, port: int | None = None, **sections: dict[str, str]) -> None:
        self.source(name).mkdir(parents=True)
        self.target(name).mkdir(parents=True)
        self.names.append(name)
        self.global_ini.write_text(
            f"[global]\ndata_stream_list = {' '.join(self.names)}\n"
            f"spool_base_dir = {self.root / 'spool'}\nruntime_dir = {self.root / 'run'}\n"
            f"metrics_dir = {self.root / 'metrics'}\n")
        conf: dict[str, dict[str, str]] = {
            "data_stream": {"directory": str(self.source(name)), "settle_seconds": "0"},
            "outgoing": {"target_host": "127.0.0.1", "target_port": str(port or self.sshd.port),
                         "target_dir": str(self.target(name)), "transfer_mode": "move",
                         "retry_backoff": "0.2", "retry_backoff_max": "1",
                         "connect_timeout": "3"},
            "rsync_ssh": {"identity_file": str(self.sshd.client_key),
                          "known_hosts": str(self.sshd.known_hosts)},
        }
        for section, values in sections.items():
            conf.setdefault(section, {}).update(values)
        (self.etc / f"{name}.ini").write_text("".join(
            f"[{s}]\n" + "".join(f"{k} = {v}\n" for k, v in kv.items()) + "\n"
            for s, kv in conf.items()))

    def run(self, *args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run([str(BIN / "mstm-send"), "--config", str(self.global_ini),
                               *args], capture_output=True, text=True, timeout=180,
                              check=False)


def test_status_shows_push_pull_paused_backing_off_and_failing_streams_in_one_table(
        tmp_path: Path, sshd: LoopbackSshd, capsys: pytest.CaptureFixture[str]) -> None:
    site = Site(tmp_path, sshd)
    bad = tmp_path / "rsync-corrupting"
    bad.write_text(CORRUPTING_RSYNC.format(python=sys.executable))
    bad.chmod(0o755)
    remote = tmp_path / "remote"
    for item in ("10001a", "10002b"):
        (remote / item).mkdir(parents=True)
        (remote / item / "frame.img").write_bytes(os.urandom(2000))
    site.add("proj1")
    site.add("proj2", outgoing={"transfer_mode": "mirror"})
    site.add("parked", rsync_ssh={"cmd": str(bad)}, outgoing={"retry_count": "0"})
    site.add("paused")
    site.add("down", port=free_port(), outgoing={"retry_backoff": "600",
                                                 "retry_backoff_max": "600"})
    site.add("fetch", data_stream={"direction": "pull"},
             outgoing={"transfer_mode": "mirror"},
             pull={"source_dir": str(remote), "map": "\n    ^100 -> incoming"})
    for i in range(3):
        (site.source("proj1") / f"run{i}.nc").write_bytes(os.urandom(300_000))
    (site.source("proj2") / "model.tar").write_bytes(os.urandom(1_500_000))
    (site.source("parked") / "victim.dat").write_bytes(b"v" * 1000)
    (site.source("paused") / ".stop").write_text("maintenance until Monday\n")
    (site.source("paused") / "waiting.dat").write_bytes(b"w" * 5000)
    (site.source("down") / "queued.dat").write_bytes(b"q" * 7000)
    assert site.run("--once", "proj1").returncode == 0
    assert site.run("--once", "proj2").returncode == 0
    assert site.run("--once", "parked").returncode == 1
    assert site.run("--once", "paused").returncode == 0
    assert site.run("--once", "down").returncode == 75
    r = site.run("--once", "--execute", "fetch")
    assert r.returncode == 0, r.stderr

    table = site.run("--status")
    document = site.run("--status", "--json")

    assert table.returncode == 0 and document.returncode == 0, table.stderr + document.stderr
    with capsys.disabled():
        print("\n" + table.stdout)
    rows = {ln.split()[0]: ln for ln in table.stdout.splitlines()[1:] if ln.strip()}
    assert table.stdout.splitlines()[0].split()[:4] == ["STREAM", "DIR", "STATE", "QUEUED"]
    assert rows["proj1"].split()[1:4] == ["push", "idle", "0"]
    assert rows["paused"].split()[1:4] == ["push", "paused", "1"]
    assert "maintenance until Monday" in rows["paused"]
    assert rows["down"].split()[1:4] == ["push", "backing-off", "1"]
    assert "until 20" in rows["down"]
    assert rows["parked"].split()[1:3] == ["push", "failing"]
    assert "bad checksum" in rows["parked"]
    assert rows["fetch"].split()[1:3] == ["pull", "idle"]
    doc = json.loads(document.stdout)
    assert ISO.match(doc["taken_at"])
    by = {s["stream"]: s for s in doc["streams"]}
    assert list(by) == ["proj1", "proj2", "parked", "paused", "down", "fetch"]
    assert (by["proj1"]["delivered_24h_items"], by["proj1"]["delivered_24h_bytes"]) == (
        3, 900_000)
    assert ISO.match(by["proj1"]["last_delivery"])
    assert by["parked"]["failed_items"] == 1
    assert by["parked"]["failed_by_reason"] == {"mismatch": 1}
    assert by["parked"]["failures_total"]["mismatch"] == 1
    assert by["paused"]["pause_reason"] == "local_stop_file"
    assert (by["paused"]["queued_items"], by["paused"]["queued_bytes"]) == (1, 5000)
    assert ISO.match(by["paused"]["oldest_queued"])
    assert by["down"]["target_unreachable"] is True
    assert ISO.match(by["down"]["backoff"]["until"])
    assert by["fetch"]["pull"]["done"] == 2 and ISO.match(by["fetch"]["last_delivery"])
    assert by["fetch"]["delivered_24h_items"] == 2
    # read only: a status registered no owner in any spool
    for name in ("proj1", "paused", "down"):
        assert os.listdir(tmp_path / "spool" / name / "owners") == []


def test_a_following_pull_stream_writes_its_metrics_file_after_each_cycle(
        tmp_path: Path, sshd: LoopbackSshd) -> None:
    site = Site(tmp_path, sshd)
    remote = tmp_path / "remote"
    for item in ("10001a", "10002b"):
        (remote / item).mkdir(parents=True)
        (remote / item / "frame.img").write_bytes(os.urandom(2000))
    site.add("fetch", data_stream={"direction": "pull", "poll_interval": "0.5"},
             outgoing={"transfer_mode": "mirror"},
             pull={"source_dir": str(remote), "map": "\n    ^100 -> incoming"})
    prom = tmp_path / "metrics" / "mstm_send_fetch.prom"
    proc = subprocess.Popen([str(BIN / "mstm-send"), "--config", str(site.global_ini),
                             "--follow", "fetch"], stderr=subprocess.PIPE)
    try:
        wait_for(lambda: prom_value(prom, 'mstm_delivered_items_total{stream="fetch"}') == 2,
                 "the pull stream's metrics file")
        assert prom_value(prom, 'mstm_target_unreachable{stream="fetch"}') == 0
        assert abs(prom_value(prom, 'mstm_last_success_timestamp_seconds{stream="fetch"}')
                   - time.time()) < 60  # type: ignore[operator]
    finally:
        proc.send_signal(signal.SIGTERM)
        _, err = proc.communicate(timeout=60)
    assert proc.returncode == 0, err.decode()
