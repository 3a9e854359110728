"""mstm-receive --status: every receiving area at a glance, after a real mstm-receive
answered real batches (control files written as a sender writes them), and the metrics
file a following receiver writes."""

from __future__ import annotations

import fcntl
import hashlib
import json
import os
import re
import threading
import time
from pathlib import Path

import pytest
from click.testing import CliRunner
from prometheus_client.parser import text_string_to_metric_families

from mstm import protocol as p
from mstm.cli.receive import main as receive_main
from mstm.config import load_stream
from mstm.notify import Notifier
from mstm.overview.live import ReceiveReporter
from mstm.overview.snapshot import area_snapshot
from mstm.protocol import ControlItem
from mstm.receive import Receiver, Settings

ISO = re.compile(r"^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\+00:00$")
CTRL, RCPT = "mstm-ctrl", "mstm-rcpt"


class Area:
    """Receiving streams in tmp_path, and what a sender puts into their incoming areas."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.names: list[str] = []
        (root / "metrics").mkdir()

    @property
    def global_ini(self) -> Path:
        return self.root / "global.ini"

    def published(self, name: str) -> Path:
        return self.root / "pub" / name

    def incoming(self, name: str) -> Path:
        return self.published(name) / ".mstm-incoming"

    def add(self, name: str) -> None:
        self.names.append(name)
        self.published(name).mkdir(parents=True)
        self.global_ini.write_text(
            f"[global]\ndata_stream_list = {' '.join(self.names)}\n"
            f"spool_base_dir = {self.root / 'spool'}\nruntime_dir = {self.root / 'run'}\n"
            f"metrics_dir = {self.root / 'metrics'}\n")
        (self.root / f"{name}.ini").write_text(
            f"[data_stream]\ndirectory = {self.published(name)}\n")

    def send(self, name: str, files: dict[str, bytes], *, damage: str | None = None) -> str:
        batch = p.new_batch_id()
        inc = self.incoming(name)
        items = []
        for rel, data in files.items():
            (inc / batch).mkdir(parents=True, exist_ok=True)
            (inc / batch / rel).write_bytes(b"X" + data[1:] if rel == damage else data)
            items.append(ControlItem(rel, len(data), hashlib.sha256(data).hexdigest()))
        control = p.render_control(p.Control(batch, "sha256", f"{batch}.{RCPT}", tuple(items)))
        tmp = inc / f".{batch}.tmp"
        tmp.write_bytes(control)
        tmp.rename(inc / f"{batch}.{CTRL}")
        return batch

    def run(self, *args: str) -> tuple[int, str]:
        r = CliRunner().invoke(receive_main, ["-c", str(self.global_ini), *args])
        return r.exit_code, r.output


def test_receive_status_shows_each_area_its_batches_and_what_it_published(
        tmp_path: Path) -> None:
    site = Area(tmp_path)
    site.add("inbound")
    site.add("quiet")
    site.send("inbound", {"a.dat": b"a" * 1000, "b.dat": b"b" * 3000})
    site.send("inbound", {"c.dat": b"c" * 500}, damage="c.dat")
    code, out = site.run("--once", "inbound")
    assert code == 0, out
    site.send("inbound", {"d.dat": b"d" * 10})  # arrives after the run: waiting
    (site.incoming("inbound") / ".quarantine").mkdir(exist_ok=True)
    (site.incoming("inbound") / ".quarantine" / "junk.mstm-ctrl").write_text("junk")

    code, table = site.run("--status")
    code2, doc_text = site.run("--status", "--json")

    assert code == 0 and code2 == 0, table + doc_text
    lines = table.splitlines()
    assert lines[0].split()[:5] == ["AREA", "STATE", "WAITING", "ANSWERED", "SET"]
    inbound = next(ln for ln in lines if ln.startswith("inbound"))
    assert inbound.split()[1:5] == ["failing", "1", "2", "1"]
    assert next(ln for ln in lines if ln.startswith("quiet")).split()[1:5] == [
        "idle", "0", "0", "0"]
    doc = json.loads(doc_text)
    by = {a["stream"]: a for a in doc["areas"]}
    a = by["inbound"]
    assert (a["published_total_items"], a["published_total_bytes"]) == (2, 4000)
    assert (a["published_24h_items"], a["published_24h_bytes"]) == (2, 4000)
    assert a["refused_total"] == {"bad-checksum": 1}
    assert ISO.match(a["last_publish"]) and ISO.match(doc["taken_at"])
    assert by["quiet"]["last_publish"] is None
    # one area alone, as JSON
    code, one = site.run("--status", "quiet")
    assert code == 0 and json.loads(one)["stream"] == "quiet"


def test_an_area_whose_receiver_holds_its_lock_is_running(tmp_path: Path) -> None:
    site = Area(tmp_path)
    site.add("inbound")
    inc = site.incoming("inbound")
    inc.mkdir(parents=True)
    fd = os.open(inc, os.O_RDONLY | os.O_DIRECTORY)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)  # what a receiver holds
        assert area_snapshot(load_stream("inbound", site.global_ini, role="receive")
                             ).state == "running"
    finally:
        os.close(fd)
    assert area_snapshot(load_stream("inbound", site.global_ini, role="receive")
                         ).state == "idle"


def test_a_following_receiver_writes_its_metrics_file_after_a_batch(tmp_path: Path) -> None:
    site = Area(tmp_path)
    site.add("inbound")
    cfg = load_stream("inbound", site.global_ini, role="receive")
    receiver = Receiver(Settings.from_config(cfg), notifier=Notifier())
    receiver.on_pass = ReceiveReporter(cfg)
    prom = tmp_path / "metrics" / "mstm_receive_inbound.prom"
    with receiver:
        t = threading.Thread(target=receiver.follow, daemon=True)
        t.start()
        try:
            site.send("inbound", {"x.dat": b"x" * 2048})
            deadline = time.monotonic() + 30
            while "mstm_received_items_total" not in (prom.read_text() if prom.exists()
                                                      else "") or \
                    'mstm_received_items_total{stream="inbound"} 1.0' not in prom.read_text():
                assert time.monotonic() < deadline, prom.read_text() if prom.exists() else ""
                time.sleep(0.05)
        finally:
            receiver.stop()
            t.join(timeout=30)
    got = {(s.name, tuple(sorted(s.labels.items()))): s.value
           for f in text_string_to_metric_families(prom.read_text()) for s in f.samples}
    s = (("stream", "inbound"),)
    assert got[("mstm_received_bytes_total", s)] == 2048
    assert abs(got[("mstm_last_success_timestamp_seconds", s)] - time.time()) < 60
    assert got[("mstm_receive_refusals_total", (("reason", "bad-checksum"), *s))] == 0


@pytest.mark.parametrize("args", [[], ["--once"], ["--follow"]])
def test_receive_without_a_stream_is_a_usage_error_unless_status(tmp_path: Path,
                                                                 args: list[str]) -> None:
    site = Area(tmp_path)
    site.add("inbound")
    code, out = site.run(*args)
    assert code == 2 and "STREAM" in out
