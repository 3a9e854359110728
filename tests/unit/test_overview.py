"""Every stream at a glance (mstm.overview): the snapshot of a stream read from its spool,
the table and the JSON document of --status, and the Prometheus text file (its content,
its throttle, an unwritable directory).  Real spools and config files in tmp_path; the
metrics file is parsed back with prometheus_client's own parser."""

from __future__ import annotations

import json
import logging
import os
import re
import time
from pathlib import Path
from typing import Any

import pytest
from click.testing import CliRunner
from prometheus_client.parser import text_string_to_metric_families

from mstm.cli.send import main as send_main
from mstm.config import StreamConfig, load_stream
from mstm.diskwatch.report import FsReport
from mstm.overview import render_streams, stream_snapshot, to_document
from mstm.overview.live import SendReporter
from mstm.overview.metrics import TextFile, disk_families, render_families, stream_families
from mstm.overview.snapshot import push_snapshot
from mstm.overview.spoolview import SpoolView, reason_class
from mstm.spool import ItemRecord, Spool

ISO = re.compile(r"^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\+00:00$")


class Site:
    """A global file and streams in tmp_path (transfer_protocol local)."""

    def __init__(self, root: Path) -> None:
        self.root = root
        (root / "spool").mkdir(parents=True)
        (root / "metrics").mkdir()
        self.names: list[str] = []

    @property
    def global_ini(self) -> Path:
        return self.root / "global.ini"

    def add(self, name: str, tail: str = "", mode: str = "move", proto: str = "local",
            **extra: str) -> StreamConfig:
        src = self.root / "src" / name
        src.mkdir(parents=True)
        self.names.append(name)
        self.global_ini.write_text(
            f"[global]\ndata_stream_list = {' '.join(self.names)}\n"
            f"spool_base_dir = {self.root / 'spool'}\nruntime_dir = {self.root / 'run'}\n"
            f"metrics_dir = {self.root / 'metrics'}\n")
        more = "".join(f"{k} = {v}\n" for k, v in extra.items())
        (self.root / f"{name}.ini").write_text(
            f"[data_stream]\ndirectory = {src}\nsettle_seconds = 0\n{more}"
            f"[outgoing]\ntransfer_protocol = {proto}\ntarget_dir = {self.root / 'dst'}\n"
            f"transfer_mode = {mode}\n{tail}")
        return load_stream(name, self.global_ini)


@pytest.fixture
def site(tmp_path: Path) -> Site:
    return Site(tmp_path)


def records(n: int, size: int = 100, prefix: str = "f") -> list[ItemRecord]:
    return [ItemRecord(f"{prefix}{i}", size, i) for i in range(n)]


def tree(root: Path) -> dict[str, tuple[int, int]]:
    """Every name below root with its mtime and inode: what a read-only look must keep."""
    out = {}
    for dirpath, dirs, files in os.walk(root):
        for name in dirs + files:
            p = os.path.join(dirpath, name)
            st = os.lstat(p)
            out[os.path.relpath(p, root)] = (st.st_mtime_ns, st.st_ino)
    return out


# -- the snapshot ------------------------------------------------------------------------
def test_a_snapshot_counts_queued_items_their_bytes_and_the_oldest_enqueue_time(
        site: Site) -> None:
    cfg = site.add("proj1")
    with Spool(cfg.spool_dir) as spool:
        spool.enqueue([ItemRecord("old", 10, 1, enqueued_at=time.time() - 7200)])
        spool.enqueue(records(5, size=1000))
        claims = spool.claim(max_items=2, max_bytes=10**9)
        snap = push_snapshot(cfg)
        assert len(claims) == 2
    # claims were handed back at close; either way they count as queued
    assert (snap.queued_items, snap.queued_bytes) == (6, 5010)
    assert 7190 < snap.oldest_age() < 7300
    assert snap.counts["claimed"] == 2 and snap.counts["new"] == 4


def test_a_snapshot_says_the_last_delivery_and_what_was_delivered_in_24_hours(
        site: Site) -> None:
    cfg = site.add("proj1")
    with Spool(cfg.spool_dir) as spool:
        spool.enqueue(records(3, size=500))
        claims = spool.claim(max_items=10, max_bytes=10**9)
        spool.complete_many([(c, "0" * 64) for c in claims])
    snap = push_snapshot(cfg)
    assert (snap.delivered_24h_items, snap.delivered_24h_bytes) == (3, 1500)
    assert snap.last_delivery is not None and abs(snap.last_delivery - time.time()) < 60
    # a day later (the done records' commit time is their file's mtime)
    later = push_snapshot(cfg, now=time.time() + 2 * 86400)
    assert later.delivered_24h_items == 0 and later.last_delivery == snap.last_delivery


def test_the_last_delivery_survives_the_pruning_of_done_records(site: Site) -> None:
    cfg = site.add("proj1")
    with Spool(cfg.spool_dir) as spool:
        spool.save_state({"delivered": {"items": 7, "bytes": 700, "last_at": 1_700_000_000.0}})
    snap = push_snapshot(cfg)
    assert snap.last_delivery == 1_700_000_000.0
    assert (snap.delivered_total_items, snap.delivered_total_bytes) == (7, 700)


@pytest.mark.parametrize(("setup", "state", "why"), [
    ("stop_file", "paused", ".stop: maintenance"),
    ("backoff", "backing-off", "until 20"),
    ("backoff_over", "failing", "target unreachable: connection refused"),
    ("failed", "failing", "1 parked in failed/; last: bad checksum at the target: f0"),
    ("owner", "running", None),
    ("nothing", "idle", None),
])
def test_a_snapshot_names_the_state_of_a_stream_and_why(
        site: Site, setup: str, state: str, why: str | None) -> None:
    cfg = site.add("proj1")
    spool = Spool(cfg.spool_dir).open()
    now = time.time()
    if setup == "stop_file":
        (cfg.directory / ".stop").write_text("maintenance\n")
    elif setup in ("backoff", "backoff_over"):
        until = now + 600 if setup == "backoff" else now - 5
        spool.save_state({"backoff": {"step": 2, "until": until,
                                      "last_error": "connection refused"}})
    elif setup == "failed":
        spool.enqueue(records(1))
        [claim] = spool.claim(max_items=1, max_bytes=10**9)
        spool.retry(claim, "bad checksum at the target: f0", retry_count=0, backoff=0,
                    backoff_max=0)
    if setup != "owner":
        spool.close()
    try:
        snap = push_snapshot(cfg)
    finally:
        spool.close()
    assert snap.state == state
    assert (snap.why is None) if why is None else (why in (snap.why or ""))
    if setup == "failed":
        assert snap.failed_by_reason == {"mismatch": 1}
    if setup == "stop_file":
        assert snap.pause_reason == "local_stop_file"


def test_a_stop_file_placed_by_diskwatch_is_told_apart_in_the_pause_reason(
        site: Site) -> None:
    cfg = site.add("proj1")
    (cfg.directory / ".stop").write_text("mstm-diskwatch: disk space LOW on /data\n")
    assert push_snapshot(cfg).pause_reason == "diskwatch"


@pytest.mark.parametrize(("reason", "word"), [
    ("bad checksum at the target: a.dat", "mismatch"),
    ("bad size at the target: a.dat is 3 bytes, expected 4", "mismatch"),
    ("missing at the target: a.dat", "missing"),
    ("delivered, but the source cannot be deleted: EPERM", "source"),
    ("verified, but cannot be put in place at the target: EEXIST", "target"),
    ("something nobody foresaw", "other"),
    (None, "other"),
])
def test_failure_reasons_are_classed_into_a_few_fixed_words(reason: str | None,
                                                            word: str) -> None:
    assert reason_class(reason) == word


def test_status_never_changes_the_spool(site: Site) -> None:
    cfg = site.add("proj1")
    with Spool(cfg.spool_dir) as spool:
        spool.enqueue(records(20))
        claims = spool.claim(max_items=5, max_bytes=10**9)
        spool.complete_many([(c, "0" * 64) for c in claims[:3]])
        spool.retry(claims[3], "bad checksum", retry_count=0, backoff=0, backoff_max=0)
        spool.save_state({"backoff": {"step": 1, "until": time.time() + 60,
                                      "last_error": "x"}})
        # a corrupt record: a look skips it, and never moves it to corrupt/
        (cfg.spool_dir / "new" / ("f" * 40)).write_text("not json")
        before = tree(cfg.spool_dir)
        snap = stream_snapshot(cfg)
        result = CliRunner().invoke(send_main, ["-c", str(site.global_ini), "--status"])
        result1 = CliRunner().invoke(send_main, ["-c", str(site.global_ini), "--status",
                                                 "proj1"])
        assert tree(cfg.spool_dir) == before
    assert result.exit_code == 0 and result1.exit_code == 0, result.output + result1.output
    assert snap.queued_items == 15 + 1 + 1  # new, one claimed, the corrupt one (listed)


def test_status_of_a_stream_whose_spool_does_not_exist_creates_nothing(site: Site) -> None:
    cfg = site.add("proj1")
    snap = stream_snapshot(cfg)
    assert not cfg.spool_dir.exists()
    assert (snap.state, snap.queued_items, snap.last_delivery) == ("idle", 0, None)


def test_a_look_at_100000_queued_items_is_fast_and_the_next_one_faster(
        site: Site, capsys: pytest.CaptureFixture[str]) -> None:
    cfg = site.add("proj1")
    with Spool(cfg.spool_dir) as spool:
        spool.enqueue(ItemRecord(f"d{i // 1000}/f{i}", 1000, i) for i in range(100_000))
    view = SpoolView(cfg.spool_dir)
    t0 = time.perf_counter()
    first = view.queue()
    t1 = time.perf_counter()
    again = view.queue()
    t2 = time.perf_counter()
    snap_start = time.perf_counter()
    snap = stream_snapshot(cfg)  # a whole --status row, from scratch
    snap_took = time.perf_counter() - snap_start
    with capsys.disabled():
        print(f"\n100000 queued: first look {t1 - t0:.2f} s, next {t2 - t1:.3f} s,"
              f" whole snapshot {snap_took:.2f} s")
    assert first.items == again.items == snap.queued_items == 100_000
    assert first.bytes == 100_000_000
    assert t1 - t0 < 10 and t2 - t1 < 1.0 and snap_took < 10


# -- the table and the JSON document ------------------------------------------------------
def _iso_everywhere(doc: Any) -> list[str]:
    """Every value under a key that names a time: must be ISO 8601 or None."""
    bad: list[str] = []
    if isinstance(doc, dict):
        for k, v in doc.items():
            if k in ("oldest_queued", "last_delivery", "taken_at", "until", "since", "last_fetch",
                     "last_publish") and v is not None and not (isinstance(v, str)
                                                                and ISO.match(v)):
                bad.append(f"{k}={v!r}")
            bad += _iso_everywhere(v)
    elif isinstance(doc, list):
        for v in doc:
            bad += _iso_everywhere(v)
    return bad


def test_status_without_a_stream_prints_one_aligned_row_per_stream(site: Site) -> None:
    a = site.add("alpha")
    site.add("beta")
    with Spool(a.spool_dir) as spool:
        spool.enqueue(records(4, size=2048))
    result = CliRunner().invoke(send_main, ["-c", str(site.global_ini), "--status"])
    assert result.exit_code == 0, result.output
    lines = result.output.splitlines()
    assert lines[0].split()[:3] == ["STREAM", "DIR", "STATE"]
    alpha = next(ln for ln in lines if ln.startswith("alpha"))
    beta = next(ln for ln in lines if ln.startswith("beta"))
    assert alpha.split()[:5] == ["alpha", "push", "idle", "4", "8.0"]
    # aligned: each column starts at the same place in every row
    assert lines[0].index("STATE") == alpha.index("idle") == beta.index("idle")
    assert "2 stream(s)" in result.output


def test_status_json_is_one_document_with_iso_times_and_no_epoch_floats(site: Site) -> None:
    a = site.add("alpha")
    site.add("beta")
    with Spool(a.spool_dir) as spool:
        spool.enqueue(records(2))
        claims = spool.claim(max_items=1, max_bytes=10**9)
        spool.complete_many([(c, "0" * 64) for c in claims])
        spool.save_state({"backoff": {"step": 1, "until": time.time() + 99,
                                      "last_error": "refused"}})
    result = CliRunner().invoke(send_main, ["-c", str(site.global_ini), "--status",
                                            "--json"])
    doc = json.loads(result.output)
    assert [s["stream"] for s in doc["streams"]] == ["alpha", "beta"]
    assert _iso_everywhere(doc) == []
    alpha = doc["streams"][0]
    assert ISO.match(alpha["last_delivery"]) and ISO.match(alpha["oldest_queued"])
    assert ISO.match(alpha["backoff"]["until"]) and alpha["state"] == "backing-off"


def test_status_of_one_stream_keeps_the_keys_it_always_had(site: Site) -> None:
    cfg = site.add("proj1")
    with Spool(cfg.spool_dir) as spool:
        spool.enqueue(records(3))
    result = CliRunner().invoke(send_main, ["-c", str(site.global_ini), "--status", "proj1"])
    doc = json.loads(result.output)
    assert {k: doc[k] for k in ("stream", "status", "new", "claimed", "done", "failed")} == {
        "stream": "proj1", "status": "RUNNING", "new": 3, "claimed": 0, "done": 0,
        "failed": 0}
    assert "backoff" in doc


def test_a_broken_stream_file_is_a_row_that_says_why_and_the_others_still_show(
        site: Site) -> None:
    site.add("alpha")
    site.add("beta")
    (site.root / "beta.ini").write_text("[data_stream]\ndirectory = relative\n")
    result = CliRunner().invoke(send_main, ["-c", str(site.global_ini), "--status"])
    assert result.exit_code == 0, result.output
    beta = next(ln for ln in result.output.splitlines() if ln.startswith("beta"))
    assert " error " in beta and "configuration error (below)" in beta
    assert re.search(r"^beta: .*beta\.ini.*directory", result.output, re.MULTILINE)
    assert any(ln.startswith("alpha") for ln in result.output.splitlines())


def test_without_a_stream_anything_but_status_is_a_usage_error(site: Site) -> None:
    site.add("alpha")
    for args in ([], ["--once"], ["--follow"], ["--check"]):
        result = CliRunner().invoke(send_main, ["-c", str(site.global_ini), *args])
        assert result.exit_code == 2, (args, result.output)
        assert "STREAM" in result.output


def test_the_table_shows_sizes_and_ages_for_a_person() -> None:
    snap = push_snapshot.__globals__["StreamSnapshot"]("s1", queued_items=3,
                                                       queued_bytes=3 * 1024**3,
                                                       oldest_queued=time.time() - 7300)
    text = render_streams([snap])
    assert "3.0 GiB" in text and "2h01m" in text
    doc = json.loads(to_document("streams", [snap]))
    assert doc["streams"][0]["oldest_queued_age_seconds"] > 7200


# -- the metrics file -------------------------------------------------------------------
def _samples(text: str) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    out = {}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            out[(s.name, tuple(sorted(s.labels.items())))] = s.value
    return out


def test_the_metrics_file_holds_every_stream_metric_in_the_text_format(site: Site) -> None:
    cfg = site.add("proj1")
    with Spool(cfg.spool_dir) as spool:
        spool.enqueue([ItemRecord("a", 300, 1, enqueued_at=time.time() - 100)])
        spool.enqueue(records(2, size=50))
        spool.save_state({"backoff": {"step": 3, "until": 2_000_000_000.0, "last_error": "x"},
                          "delivered": {"items": 9, "bytes": 900, "last_at": 1_800_000_000.0,
                                        "failures": {"mismatch": 2}}})
    (cfg.directory / ".stop").write_text("mstm-diskwatch: LOW\n")
    text = render_families(stream_families([push_snapshot(cfg)]))
    got = _samples(text)
    s = (("stream", "proj1"),)
    assert got[("mstm_queue_items", s)] == 3
    assert got[("mstm_queue_bytes", s)] == 400
    assert 99 <= got[("mstm_queue_oldest_age_seconds", s)] < 200
    assert got[("mstm_delivered_items_total", s)] == 9
    assert got[("mstm_delivered_bytes_total", s)] == 900
    assert got[("mstm_failures_total", (("reason", "mismatch"), *s))] == 2
    assert got[("mstm_failures_total", (("reason", "other"), *s))] == 0
    assert got[("mstm_last_success_timestamp_seconds", s)] == 1_800_000_000.0
    assert got[("mstm_backoff", s)] == 1
    assert got[("mstm_backoff_until_timestamp_seconds", s)] == 2_000_000_000.0
    assert got[("mstm_paused", (("reason", "diskwatch"), *s))] == 1
    assert got[("mstm_paused", (("reason", "local_stop_file"), *s))] == 0
    assert got[("mstm_target_unreachable", s)] == 1
    # a bounded label set: reasons are a few fixed words, never free text
    reasons = {dict(k[1]).get("reason") for k in got if k[0] == "mstm_failed_items"}
    assert reasons == {"mismatch", "missing", "source", "target", "other"}


def test_disk_levels_are_numbers_per_file_system() -> None:
    fs = [FsReport("/data", 1000, 250, "LOW", "OKAY", {}),
          FsReport("/srv", 1000, 900, "GOOD", None, {})]
    got = _samples(render_families(disk_families(fs)))
    assert got[("mstm_disk_used_ratio", (("mount", "/data"),))] == 0.75
    assert got[("mstm_disk_level", (("mount", "/data"),))] == 1
    assert got[("mstm_disk_level", (("mount", "/srv"),))] == 3
    assert got[("mstm_disk_free_bytes", (("mount", "/srv"),))] == 900


class FakeClock:
    def __init__(self) -> None:
        self.t = 1000.0

    def __call__(self) -> float:
        return self.t


def test_the_file_is_written_at_most_once_a_second_and_a_held_back_change_later(
        tmp_path: Path) -> None:
    clock = FakeClock()
    f = TextFile(tmp_path, "m.prom", clock=clock)
    writes = 0

    def families() -> list[Any]:
        nonlocal writes
        writes += 1
        return []

    for _ in range(100):  # 100 small batches within a tenth of a second
        if f.due(changed=True):
            f.write(families)
        clock.t += 0.001
    assert writes == 1
    assert f.wait() is not None and 0.8 < f.wait() <= 1.0  # type: ignore[operator]
    clock.t += 1.0
    assert f.due(changed=False)  # the held-back change
    f.write(families)
    assert writes == 2 and f.wait() is None
    clock.t += 30
    assert not f.due(changed=False)
    clock.t += 31
    assert f.due(changed=False)  # at least once a minute


def test_a_slow_look_spaces_the_writes_further_apart(tmp_path: Path) -> None:
    clock = FakeClock()
    f = TextFile(tmp_path, "m.prom", clock=clock)
    f.write(lambda: (time.sleep(0.3), [])[1])
    clock.t += 1.5
    assert not f.due(changed=True)  # a 0.3 s look: the next not before 3 s
    clock.t += 1.6
    assert f.due(changed=True)


def test_an_unwritable_directory_costs_one_warning_never_an_exception(
        tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    missing = tmp_path / "no" / "such"
    f = TextFile(missing, "mstm_send_x.prom", min_interval=0)
    with caplog.at_level(logging.WARNING, logger="mstm.metrics"):
        assert f.write(lambda: []) is False
        assert f.write(lambda: []) is False
    warnings = [r for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1 and "metrics_dir" in warnings[0].getMessage()
    missing.mkdir(parents=True)
    assert f.write(lambda: []) is True
    assert (missing / "mstm_send_x.prom").exists()
    assert [n for n in os.listdir(missing) if n != "mstm_send_x.prom"] == []


def test_a_sender_keeps_its_totals_in_state_json_and_writes_the_file(site: Site) -> None:
    cfg = site.add("proj1")

    class FakeSender:
        def __init__(self, spool: Spool) -> None:
            from mstm.backoff import DestinationBackoff
            from mstm.send.report import Summary

            self.spool = spool
            self.summary = Summary("proj1")
            self.backoff = DestinationBackoff(base=1, maximum=1)
            self.last_delivery: float | None = None
            self.paused_reason: str | None = None

    with Spool(cfg.spool_dir) as spool:
        sender = FakeSender(spool)
        clock = FakeClock()
        reporter = SendReporter(cfg, sender, clock=clock)  # type: ignore[arg-type]
        sender.summary.delivered += [{"path": "a", "bytes": 10}, {"path": "b", "bytes": 20}]
        sender.summary.bytes = 30
        sender.summary.failed.append({"path": "c", "reason": "bad checksum at the target"})
        sender.last_delivery = 1_900_000_000.0
        reporter()
        reporter()  # nothing new: nothing counted twice
        sender.summary.delivered.append({"path": "d", "bytes": 5})
        sender.summary.bytes = 35
        reporter.flush()
        state = spool.load_state()["delivered"]
    assert state == {"items": 3, "bytes": 35, "last_at": 1_900_000_000.0,
                     "failures": {"mismatch": 1}}
    got = _samples((cfg.metrics_dir / "mstm_send_proj1.prom").read_text())  # type: ignore[operator]
    assert got[("mstm_delivered_items_total", (("stream", "proj1"),))] == 3
    assert got[("mstm_failures_total", (("reason", "mismatch"), ("stream", "proj1")))] == 1


def test_diskwatch_follow_writes_the_disk_levels_file(site: Site) -> None:
    import signal
    import subprocess
    import sys

    site.add("proj1")
    with site.global_ini.open("a") as f:
        f.write("[disk_space_monitor]\npoll_interval = 1\n")
    prom = site.root / "metrics" / "mstm_diskwatch.prom"
    proc = subprocess.Popen([os.path.join(os.path.dirname(sys.executable), "mstm-diskwatch"),
                             "-c", str(site.global_ini), "--follow"],
                            stderr=subprocess.PIPE)
    try:
        deadline = time.monotonic() + 30
        while not prom.exists():
            assert time.monotonic() < deadline and proc.poll() is None
            time.sleep(0.05)
    finally:
        proc.send_signal(signal.SIGTERM)
        _, err = proc.communicate(timeout=30)
    got = _samples(prom.read_text())
    mounts = {dict(k[1])["mount"] for k in got if k[0] == "mstm_disk_level"}
    assert len(mounts) == 1, err.decode()
    mount = (("mount", mounts.pop()),)
    assert 0 <= got[("mstm_disk_used_ratio", mount)] <= 1
    assert got[("mstm_disk_level", mount)] in (0, 1, 2, 3)
    assert got[("mstm_disk_size_bytes", mount)] > got[("mstm_disk_free_bytes", mount)] > 0


def test_a_pull_streams_metrics_come_from_its_ledger_and_its_last_cycle(site: Site) -> None:
    from mstm.overview.live import PullReporter

    cfg = site.add("fetch", direction="pull", mode="mirror", proto="rsync_ssh",
                   tail="target_host = remote.example.org\n[pull]\nsource_dir = /data\n"
                        "map = ^ -> here\n")
    ledger = cfg.pull.ledger or cfg.spool_dir / "ledger.jsonl"
    ledger.parent.mkdir(parents=True)
    ledger.write_text('{"item": "10001a", "state": "done", "signature": "s", '
                      '"at": "2026-01-02T03:04:05Z"}\n'
                      '{"item": "10002b", "state": "unmapped", "reason": "no rule"}\n')
    reporter = PullReporter(cfg, None)  # type: ignore[arg-type]
    reporter("ssh to remote.example.org failed")
    got = _samples((site.root / "metrics" / "mstm_send_fetch.prom").read_text())
    s = (("stream", "fetch"),)
    assert got[("mstm_target_unreachable", s)] == 1
    assert got[("mstm_delivered_items_total", s)] == 1
    assert got[("mstm_last_success_timestamp_seconds", s)] == 1767323045.0
    snap = stream_snapshot(cfg)
    assert snap.pull["unmapped"] == 1 and snap.to_json()["last_delivery"] == (
        "2026-01-02T03:04:05+00:00")


@pytest.mark.parametrize(("line", "expected"), [
    ("metrics_dir =\n", None),
    ("metrics_dir = /srv/metrics\n", Path("/srv/metrics")),
    ("", Path("/var/lib/mstm/metrics")),
])
def test_metrics_dir_is_a_path_or_empty_for_none(site: Site, monkeypatch: pytest.MonkeyPatch,
                                                 line: str, expected: Path | None) -> None:
    monkeypatch.delenv("MSTM_METRICS_DIR", raising=False)
    site.add("proj1")
    text = site.global_ini.read_text()
    site.global_ini.write_text(re.sub(r"metrics_dir = .*\n", line, text))
    assert load_stream("proj1", site.global_ini).metrics_dir == expected


def test_a_relative_metrics_dir_is_a_configuration_error(site: Site) -> None:
    from mstm.errors import ConfigError

    site.add("proj1")
    text = site.global_ini.read_text()
    site.global_ini.write_text(re.sub(r"metrics_dir = .*\n", "metrics_dir = prom\n", text))
    with pytest.raises(ConfigError, match=r"\[global\] metrics_dir.*absolute path"):
        load_stream("proj1", site.global_ini)
