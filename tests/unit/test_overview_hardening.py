"""What the spool's owner, a data producer or a broken file can do to --status and to the
metrics and totals files (issue 14, an attacker's review): nothing outside their own
stream.  Root runs read and write nothing through a planted link, a FIFO or a device;
a bad stream is one error row; free text reaches no terminal unescaped."""

from __future__ import annotations

import json
import os
import re
import shutil
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from click.testing import CliRunner
from tests.conftest import need, need_root
from tests.unit.test_overview import Site, _samples
from tests.unit.test_overview_receive import Area

from mstm.cli.send import main as send_main
from mstm.config import load_stream
from mstm.config.schema import SCHEMA
from mstm.overview import all_streams, render_streams, to_document
from mstm.overview.live import ReceiveReporter
from mstm.overview.metrics import TextFile, stream_families
from mstm.overview.snapshot import area_snapshot, push_snapshot
from mstm.receive.settings import Summary
from mstm.spool import ItemRecord, Spool
from mstm.spool.owners import safe_host

ROOT = Path(__file__).resolve().parents[2]
BIN = Path(sys.executable).parent
NOBODY = 65534


@pytest.fixture
def site(tmp_path: Path) -> Site:
    return Site(tmp_path)


def finishes(call: Callable[[], Any], timeout: float = 10) -> Any:
    """call() in a daemon thread: its result, or a failure if it blocks (a FIFO)."""
    out: dict[str, Any] = {}

    def run() -> None:
        try:
            out["value"] = call()
        except BaseException as err:
            out["error"] = err

    t = threading.Thread(target=run, daemon=True)
    t.start()
    t.join(timeout)
    assert not t.is_alive(), f"blocked for more than {timeout} s"
    if "error" in out:
        raise out["error"]
    return out["value"]


def status(site: Site, *args: str) -> tuple[int, str]:
    r = CliRunner().invoke(send_main, ["-c", str(site.global_ini), "--status", *args])
    return r.exit_code, r.output


# -- 1. the metrics directory -------------------------------------------------------------
def test_the_service_user_gets_no_acl_on_debians_node_exporter_directory() -> None:
    """Root's collectors write /var/lib/prometheus/node-exporter with sponge, which follows
    symbolic links: a service user able to write there could make root overwrite any
    file.  Neither tmpfiles nor a unit opens it to user mstm."""
    text = (ROOT / "conf" / "mstm.tmpfiles").read_text()
    lines = [ln for ln in text.splitlines() if ln and not ln.startswith("#")]
    assert not [ln for ln in lines if ln.split()[0].startswith("a")], lines
    assert not [ln for ln in lines if "prometheus" in ln], lines
    for unit in sorted((ROOT / "units").glob("*.in")):
        assert "node-exporter" not in unit.read_text(), unit.name


def test_metrics_dir_defaults_to_a_directory_of_user_mstm_that_node_exporter_can_read(
        tmp_path: Path) -> None:
    """The default is /var/lib/mstm/metrics, made 0755 mstm:mstm by tmpfiles; its parent
    (the units' StateDirectory, writable in their sandbox) lets other users through
    (o+x, not o+r) so that user prometheus reaches the files."""
    assert SCHEMA["global"]["metrics_dir"].default == "/var/lib/mstm/metrics"
    text = (ROOT / "conf" / "mstm.tmpfiles").read_text()
    assert re.search(r"^d\s+/var/lib/mstm/metrics\s+0755\s+mstm\s+mstm\s+-$", text, re.M)
    assert re.search(r"^d\s+/var/lib/mstm\s+0751\s+mstm\s+mstm\s+-$", text, re.M)
    for name in ("mstm-stream@", "mstm-receive@", "mstm-diskwatch"):
        unit = (ROOT / "units" / f"{name}.service.in").read_text()
        assert "StateDirectory=mstm" in unit and "StateDirectoryMode=0751" in unit, name
    need("systemd-tmpfiles")
    conf = tmp_path / "t.conf"
    conf.write_text("\n".join(re.sub(r"mstm\s+mstm", f"{NOBODY} {NOBODY}", ln)
                              for ln in text.splitlines() if "/var/lib/mstm" in ln) + "\n")
    root = tmp_path / "root"
    r = subprocess.run(["systemd-tmpfiles", f"--root={root}", "--create", str(conf)],
                       capture_output=True, text=True, check=False)
    assert r.returncode == 0, r.stderr
    assert (root / "var/lib/mstm/metrics").stat().st_mode & 0o7777 == 0o755
    assert (root / "var/lib/mstm").stat().st_mode & 0o7777 == 0o751


# -- 2. the metrics file ------------------------------------------------------------------
def test_the_metrics_file_is_0644_whatever_the_umask(site: Site) -> None:
    """The units' UMask=0027 would leave 0640 mstm:mstm: Debian's node_exporter runs as
    user prometheus and could not read it."""
    cfg = site.add("proj1")
    f = TextFile(site.root / "metrics", "mstm_send_proj1.prom")
    old = os.umask(0o027)
    try:
        assert f.write(lambda: stream_families([push_snapshot(cfg)]))
    finally:
        os.umask(old)
    prom = site.root / "metrics" / "mstm_send_proj1.prom"
    assert prom.stat().st_mode & 0o7777 == 0o644
    assert ("mstm_queue_items", (("stream", "proj1"),)) in _samples(prom.read_text())
    assert sorted(os.listdir(site.root / "metrics")) == ["mstm_send_proj1.prom"]


def test_no_symlink_planted_at_a_predictable_name_is_followed_by_the_metrics_writer(
        tmp_path: Path) -> None:
    metrics = tmp_path / "metrics"
    metrics.mkdir()
    victim = tmp_path / "victim"
    victim.write_text("keep me\n")
    prom = metrics / "mstm_diskwatch.prom"
    # write_to_textfile's temporary name, and a few other guesses
    planted = [f"{prom.name}.{os.getpid()}.{threading.get_ident()}", f"{prom.name}.tmp",
               f".{prom.name}.tmp", f".{prom.name}.{os.getpid()}.tmp"]
    for name in planted:
        (metrics / name).symlink_to(victim)
    f = TextFile(metrics, prom.name, min_interval=0)
    assert f.write(lambda: [])
    assert victim.read_text() == "keep me\n"
    assert prom.is_file() and not prom.is_symlink()
    prom.unlink()
    prom.symlink_to(victim)  # the final name itself: replaced, never written through
    assert f.write(lambda: [])
    assert victim.read_text() == "keep me\n"
    assert not prom.is_symlink()
    assert sorted(os.listdir(metrics)) == sorted([prom.name, *planted])


def test_a_failed_metrics_write_leaves_no_temporary_file(tmp_path: Path) -> None:
    (tmp_path / "mstm_diskwatch.prom").mkdir()  # the rename fails: a directory is there
    f = TextFile(tmp_path, "mstm_diskwatch.prom", min_interval=0)
    assert f.write(lambda: []) is False
    assert os.listdir(tmp_path) == ["mstm_diskwatch.prom"]


# -- 3. the receive totals and a root-run mstm-receive -------------------------------------
@pytest.fixture
def foreign_area(tmp_path: Path) -> Iterator[Area]:
    """A receiving stream whose spool base directory belongs to uid 65534."""
    need_root()
    site = Area(tmp_path)
    site.add("inbound")
    (tmp_path / "spool" / "inbound").mkdir(parents=True)
    for p in (tmp_path / "spool", tmp_path / "spool" / "inbound"):
        os.chown(p, NOBODY, NOBODY)
    yield site


def test_root_keeping_the_receive_totals_follows_no_symlink_planted_by_the_spools_owner(
        foreign_area: Area, tmp_path: Path) -> None:
    cfg = load_stream("inbound", foreign_area.global_ini, role="receive")
    victim = tmp_path / "victim"
    victim.write_text("keep me\n")
    spool = Path(cfg.spool_dir)
    for name in (f".receive-state.json.{os.getpid()}.tmp", ".receive-state.json.tmp"):
        os.symlink(victim, spool / name)
    ReceiveReporter(cfg, metrics=False)(Summary(batches=1, ok=2, bytes=10,
                                                statuses={"ok": 2}))
    assert victim.read_text() == "keep me\n"
    state = json.loads((spool / "receive-state.json").read_text())
    assert state["items"] == 2 and state["bytes"] == 10
    assert not (spool / "receive-state.json").is_symlink()


def test_root_running_mstm_receive_on_a_spool_of_another_user_is_refused(
        foreign_area: Area) -> None:
    code, out = foreign_area.run("inbound")
    assert code == 77, out
    assert not (foreign_area.root / "spool" / "inbound" / "receive-state.json").exists()
    assert foreign_area.run("--status", "inbound")[0] == 0  # reading is fine
    assert foreign_area.run("--check", "inbound")[0] == 0


def test_root_running_mstm_diskwatch_on_a_spool_base_of_another_user_is_refused(
        tmp_path: Path) -> None:
    """mstm-diskwatch keeps its state file in spool_base_dir."""
    from mstm.cli.diskwatch import main as diskwatch_main

    need_root()
    site = Site(tmp_path)
    site.add("proj1")
    os.chown(tmp_path / "spool", NOBODY, NOBODY)
    r = CliRunner().invoke(diskwatch_main, ["-c", str(site.global_ini)])
    assert r.exit_code == 77, r.output
    assert not (tmp_path / "spool" / ".mstm-diskwatch.json").exists()
    r = CliRunner().invoke(diskwatch_main, ["-c", str(site.global_ini), "--dry-run"])
    assert r.exit_code == 0, r.output


def test_mstm_diskwatch_follows_no_symlink_planted_at_its_state_files_temporary_name(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from tests.unit.test_diskwatch import Site as DiskSite

    from mstm.diskwatch.levels import Level

    monkeypatch.delenv("MSTM_CONFIG", raising=False)
    site = DiskSite(tmp_path)
    site.add("proj1", 10)
    victim = tmp_path / "victim"
    victim.write_text("keep me\n")
    state = site.spool / ".mstm-diskwatch.json"
    (site.spool / f"{state.name}.{os.getpid()}.tmp").symlink_to(victim)
    watch = site.watch()
    watch._levels = {"/": Level.LOW}
    watch._save_state()
    assert victim.read_text() == "keep me\n"
    assert json.loads(state.read_text())["levels"]
    assert state.stat().st_mode & 0o777 == 0o640


# -- 4. a bad stream is an error row, nothing hangs or runs out of memory ------------------
def test_a_fifo_in_place_of_state_json_neither_hangs_status_nor_breaks_the_table(
        site: Site) -> None:
    cfg = site.add("proj1")
    site.add("proj2")
    with Spool(cfg.spool_dir) as spool:
        spool.enqueue([ItemRecord("a", 1, 1)])
    os.mkfifo(cfg.spool_dir / "state.json")
    code, out = finishes(lambda: status(site))
    assert code == 0, out
    row = next(ln for ln in out.splitlines() if ln.startswith("proj1 "))
    assert " error " in row, out
    # the whole reason, whatever the length of the path: in the row or below the table
    assert "FIFO" in row or any(ln.startswith("proj1: ") and "FIFO" in ln
                                for ln in out.splitlines()), out
    assert re.search(r"^proj2\s+push\s+idle", out, re.M), out


def test_status_of_one_stream_with_a_fifo_state_json_says_why_and_does_not_hang(
        site: Site) -> None:
    cfg = site.add("proj1")
    with Spool(cfg.spool_dir) as spool:
        spool.enqueue([ItemRecord("a", 1, 1)])
    os.mkfifo(cfg.spool_dir / "state.json")
    code, out = finishes(lambda: status(site, "proj1"))
    assert code == 0, out
    doc = json.loads(out)
    assert doc["state"] == "error" and "FIFO" in doc["why"], doc


def test_a_fifo_receive_state_is_one_error_row_of_the_areas_not_a_hang(
        tmp_path: Path) -> None:
    area = Area(tmp_path)
    area.add("inbound")
    area.add("quiet")
    spool = tmp_path / "spool" / "inbound"
    spool.mkdir(parents=True)
    os.mkfifo(spool / "receive-state.json")
    code, out = finishes(lambda: area.run("--status"))
    assert code == 0, out
    row = next(ln for ln in out.splitlines() if ln.startswith("inbound "))
    assert " error " in row, out
    assert "FIFO" in row or any(ln.startswith("inbound: ") and "FIFO" in ln
                                for ln in out.splitlines()), out
    assert re.search(r"^quiet\s+idle", out, re.M), out
    code, out = finishes(lambda: area.run("--status", "inbound"))
    assert code == 0 and json.loads(out)["state"] == "error", out


def test_a_fifo_owner_file_does_not_hang_status(site: Site) -> None:
    cfg = site.add("proj1")
    with Spool(cfg.spool_dir) as spool:
        spool.enqueue([ItemRecord("a", 1, 1)])
    owners = cfg.spool_dir / "owners"
    owners.mkdir(exist_ok=True)
    os.mkfifo(owners / f"{safe_host(socket.gethostname())}.{os.getpid()}.abcdef")
    code, out = finishes(lambda: status(site))
    assert code == 0, out


def test_a_ledger_linked_to_dev_zero_is_one_error_row_not_an_out_of_memory(
        site: Site) -> None:
    cfg = site.add("fetch", direction="pull", mode="mirror", proto="rsync_ssh",
                   tail="target_host = remote.example.org\n[pull]\nsource_dir = /data\n"
                        "map = ^ -> here\n")
    site.add("proj2")
    ledger = cfg.pull.ledger or cfg.spool_dir / "ledger.jsonl"
    ledger.parent.mkdir(parents=True, exist_ok=True)
    ledger.symlink_to("/dev/zero")
    code, out = finishes(lambda: status(site))
    assert code == 0, out
    row = next(ln for ln in out.splitlines() if ln.startswith("fetch"))
    assert "symbolic link" in row, out
    assert "proj2" in out


def test_a_ledger_larger_than_its_cap_is_refused_with_a_clear_reason(
        site: Site, monkeypatch: pytest.MonkeyPatch) -> None:
    from mstm.pull import ledger as ledger_mod

    cfg = site.add("fetch", direction="pull", mode="mirror", proto="rsync_ssh",
                   tail="target_host = remote.example.org\n[pull]\nsource_dir = /data\n"
                        "map = ^ -> here\n")
    monkeypatch.setattr(ledger_mod, "MAX_LEDGER_BYTES", 100)
    path = cfg.pull.ledger or cfg.spool_dir / "ledger.jsonl"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text('{"item": "10001a", "state": "unmapped", "reason": "no rule"}\n' * 5)
    [snap] = all_streams(site.global_ini)
    assert snap.state in ("failing", "error") and "larger than 100 bytes" in (snap.why or "")


def test_a_backoff_until_far_in_the_future_is_shown_not_an_overflow(site: Site) -> None:
    cfg = site.add("proj1")
    with Spool(cfg.spool_dir) as spool:
        spool.enqueue([ItemRecord("a", 1, 1)])
    (cfg.spool_dir / "state.json").write_text(json.dumps(
        {"backoff": {"step": 3, "until": 1e20, "since": -1e300, "last_error": "x"}}))
    code, out = status(site)
    assert code == 0, out
    code, out = status(site, "--json")
    assert code == 0, out
    doc = json.loads(out)
    assert doc["streams"][0]["state"] in ("backing-off", "failing")
    metrics = stream_families([push_snapshot(cfg)])
    assert metrics  # and the metrics file can be built from it


@pytest.fixture
def world_readable_site() -> Iterator[Site]:
    """A site in a directory every user may read (pytest's basetemp is root's 0700)."""
    need_root()
    d = Path(tempfile.mkdtemp(prefix="mstm-m2-"))
    d.chmod(0o755)
    try:
        yield Site(d / "site")
    finally:
        shutil.rmtree(d)


def test_a_user_outside_group_mstm_gets_an_error_row_not_an_internal_error(
        world_readable_site: Site) -> None:
    site = world_readable_site
    need("setpriv")
    cfg = site.add("proj1")
    site.add("proj2")
    with Spool(cfg.spool_dir) as spool:
        spool.enqueue([ItemRecord("a", 1, 1)])
    for dirpath, dirs, _files in os.walk(site.root):
        for d in dirs:
            os.chmod(os.path.join(dirpath, d), 0o755)
    os.chmod(site.root, 0o755)
    for f in site.root.glob("*.ini"):
        f.chmod(0o644)
    os.chmod(cfg.spool_dir, 0o750)  # root:root, as mstm:mstm is to a stranger
    r = subprocess.run(["setpriv", f"--reuid={NOBODY}", f"--regid={NOBODY}",
                        "--clear-groups", "--", str(BIN / "mstm-send"), "-c",
                        str(site.global_ini), "--status"],
                       capture_output=True, text=True, check=False, timeout=60)
    assert r.returncode == 0, r.stdout + r.stderr
    assert "internal error" not in r.stdout + r.stderr
    row = next(ln for ln in r.stdout.splitlines() if ln.startswith("proj1"))
    assert f"cannot read {cfg.spool_dir}" in row and "permission denied" in row, r.stdout
    assert "(run as mstm or root)" in row, r.stdout
    assert "2 stream(s), 1 need(s) attention" in r.stdout


# -- 5. an alert that still fires when the writer is dead ---------------------------------
def test_the_metrics_file_holds_the_oldest_items_enqueue_time_for_the_stuck_alert(
        site: Site) -> None:
    """mstm_queue_oldest_age_seconds freezes with the file; Prometheus computes
    time() - mstm_queue_oldest_enqueued_timestamp_seconds itself."""
    cfg = site.add("proj1")
    site.add("empty")
    queued_at = time.time() - 7300
    with Spool(cfg.spool_dir) as spool:
        spool.enqueue([ItemRecord("old", 10, 1, enqueued_at=queued_at)])
    f = TextFile(site.root / "metrics", "m.prom")
    assert f.write(lambda: stream_families(all_streams(site.global_ini)))
    got = _samples((site.root / "metrics" / "m.prom").read_text())
    name = "mstm_queue_oldest_enqueued_timestamp_seconds"
    assert got[(name, (("stream", "proj1"),))] == pytest.approx(queued_at, abs=1e-3)
    assert got[(name, (("stream", "empty"),))] == 0


# -- 6. no terminal escapes from free text -------------------------------------------------
def test_free_text_reaches_the_status_table_with_its_escape_sequences_escaped(
        site: Site) -> None:
    esc = "\x1b]0;owned\x07\x1b[2J\x1b[31m"
    paused = site.add("paused")
    (paused.directory / ".stop").write_text(f"maintenance {esc}\n")
    backing = site.add("backing")
    with Spool(backing.spool_dir) as spool:
        spool.enqueue([ItemRecord("a", 1, 1)])
    (backing.spool_dir / "state.json").write_text(json.dumps(
        {"backoff": {"step": 1, "until": time.time() + 600, "last_error": f"down {esc}"}}))
    failing = site.add("failing")
    with Spool(failing.spool_dir) as spool:
        spool.enqueue([ItemRecord("b", 1, 1)])
        [claim] = spool.claim(max_items=1, max_bytes=10**9)
        spool.retry(claim, f"checksum {esc}", retry_count=0, backoff=0, backoff_max=0)
    out = render_streams(all_streams(site.global_ini))
    assert "\x1b" not in out and "\x07" not in out, repr(out)
    assert out.count("\\x1b]0;owned\\x07") == 3, out
    code, cli_out = status(site)
    assert code == 0 and "\x1b" not in cli_out


# -- 7. a malformed receive-state.json ----------------------------------------------------
@pytest.mark.parametrize("state", [
    {"items": "12\u00a0345"},
    {"items": 1e400, "bytes": [1], "last_at": "x", "not_ok": {"bad-size": "x"},
     "hours": {"3600": ["a", None], "x": 1}},
    ["not", "an", "object"],
])
def test_a_malformed_receive_state_never_costs_the_receiver_nor_its_status_row(
        tmp_path: Path, state: Any) -> None:
    """Every value is read through a tolerant number parser: a bad one counts as 0."""
    area = Area(tmp_path)
    area.add("inbound")
    spool = tmp_path / "spool" / "inbound"
    spool.mkdir(parents=True)
    (spool / "receive-state.json").write_text(json.dumps(state).replace("Infinity", "1e400"))
    area.send("inbound", {"a.dat": b"hello"})
    code, out = area.run("inbound")
    assert code == 0, out
    assert (area.published("inbound") / "a.dat").read_bytes() == b"hello"
    cfg = load_stream("inbound", area.global_ini, role="receive")
    snap = area_snapshot(cfg)  # and --status shows the area
    assert snap.state != "error"
    code, out = area.run("--status")
    assert code == 0, out


# -- 8. stuck -----------------------------------------------------------------------------
def test_a_stream_whose_oldest_item_waited_longer_than_stuck_after_is_stuck(
        site: Site) -> None:
    cfg = site.add("proj1")
    relaxed = site.add("proj2", stuck_after="3h")
    for c in (cfg, relaxed):
        with Spool(c.spool_dir) as spool:
            spool.enqueue([ItemRecord("old", 10, 1, enqueued_at=time.time() - 7300)])
    snaps = all_streams(site.global_ini)
    assert [s.state for s in snaps] == ["stuck", "idle"]
    assert "2h01m" in (snaps[0].why or "") and "stuck_after" in (snaps[0].why or "")
    out = render_streams(snaps)
    assert "2 stream(s), 1 need(s) attention." in out
    assert json.loads(to_document("streams", snaps))["streams"][0]["state"] == "stuck"
