"""mstm-diskwatch with a fake file system: levels, stop files in priority order, hysteresis,
ownership of stop files, deletion of safe items only, --dry-run, and the command line.

The fake file system is sized in MiB and counts the files really present under the test's
directory as used space, so deleting a file frees space exactly as on a real disk.
"""

from __future__ import annotations

import json
import logging
import os
from dataclasses import dataclass
from pathlib import Path

import pytest
from click.testing import CliRunner

from mstm.cli.diskwatch import main as diskwatch_main
from mstm.config import DiskSpaceConfig, StreamConfig
from mstm.diskwatch import (
    MIB,
    STATE_FILE,
    DiskWatch,
    Level,
    Report,
    Thresholds,
    Usage,
    load_streams,
    targets_of,
)
from mstm.log import MESSAGE_IDS
from mstm.pause import is_paused
from mstm.spool import ItemRecord, Spool

# level_good / level_low / level_vlow / hysteresis of every test, in MiB
GOOD, LOW, VLOW, MARGIN = 30, 20, 10, 2


@dataclass
class FakeDisk:
    """One file system of *total* MiB holding *root*; *other* bytes used by something else."""

    root: Path
    total: int = 100 * MIB
    other: int = 0
    mount: str = "/fake"

    def mount_of(self, path: Path) -> str:
        return self.mount

    def used(self) -> int:
        n = 0
        for dirpath, _dirs, names in os.walk(self.root):
            for name in names:
                st = os.lstat(os.path.join(dirpath, name))
                n += st.st_size
        return n

    def usage(self, mount: str) -> Usage:
        return Usage(self.total, max(0, self.total - self.other - self.used()))

    def set_free(self, mib: float) -> None:
        """Make free space *mib* MiB (given what the files below root use now)."""
        self.other = self.total - self.used() - int(mib * MIB)


class Site:
    """A global file and stream files in tmp_path; streams as name -> settings."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.etc = root / "etc"
        self.spool = root / "spool"
        self.data = root / "data"
        for d in (self.etc, self.spool, self.data):
            d.mkdir(parents=True, exist_ok=True)
        self.streams: dict[str, dict[str, str]] = {}
        self.disk = FakeDisk(self.data)

    def add(self, name: str, priority: int, mode: str = "move", **data_stream: str) -> Path:
        directory = self.data / name
        directory.mkdir(exist_ok=True)
        self.streams[name] = {"priority": str(priority), "mode": mode, **data_stream}
        self.write()
        return directory

    def write(self, base_priority: int = 100) -> Path:
        g = self.etc / "global.ini"
        g.write_text(
            "[global]\n"
            f"data_stream_list = {' '.join(self.streams)}\n"
            f"spool_base_dir = {self.spool}\n"
            "[disk_space_monitor]\n"
            f"base_priority = {base_priority}\n"
            f"level_good = {GOOD}\nlevel_low = {LOW}\nlevel_vlow = {VLOW}\n"
            f"hysteresis = {MARGIN}\n")
        for name, s in self.streams.items():
            extra = "".join(f"{k} = {v}\n" for k, v in s.items() if k not in ("priority", "mode"))
            (self.etc / f"{name}.ini").write_text(
                "[data_stream]\n"
                f"directory = {self.data / name}\n"
                f"priority = {s['priority']}\n" + extra +
                "[outgoing]\n"
                "target_host = archive.example.org\ntarget_dir = /archive\n"
                f"transfer_mode = {s['mode']}\n")
        return g

    def watch(self, *, dry_run: bool = False) -> DiskWatch:
        gcfg, streams, problems = load_streams(self.etc / "global.ini")
        assert not problems
        return DiskWatch(gcfg, streams, filesystems=self.disk, dry_run=dry_run)

    def stream(self, name: str) -> StreamConfig:
        _, streams, _ = load_streams(self.etc / "global.ini")
        return next(s for s in streams if s.name == name)

    def stop(self, name: str) -> Path:
        return self.data / name / ".stop"

    def stopped(self) -> set[str]:
        return {n for n in self.streams if self.stop(n).exists()}

    def put(self, name: str, rel: str, mib: float, *, mtime: float) -> Path:
        p = self.data / name / rel
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_bytes(b"x" * int(mib * MIB))
        os.utime(p, (mtime, mtime))
        return p

    def deliver(self, name: str, *paths: Path) -> None:
        """Record *paths* as verified at the target (done/), as mstm-send does."""
        with Spool(self.spool / name) as spool:
            recs = []
            for p in paths:
                st = p.stat()
                recs.append(ItemRecord(str(p.relative_to(self.data / name)), st.st_size,
                                       st.st_mtime_ns, is_dir=p.is_dir()))
            spool.enqueue(recs)
            for claim in spool.claim(max_items=1000, max_bytes=1 << 40):
                assert spool.complete(claim, sha256="0" * 64)


@pytest.fixture
def site(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Site:
    monkeypatch.delenv("MSTM_CONFIG", raising=False)
    return Site(tmp_path)


def stop_order(report: Report) -> list[str]:
    return [a.stream for a in report.actions if a.kind == "stop"]


# --------------------------------------------------------------------------- levels


def cfg(good: str = "30", low: str = "20", vlow: str = "10", margin: str = "2") -> DiskSpaceConfig:
    return DiskSpaceConfig(base_priority=100, level_good=good, level_low=low, level_vlow=vlow,
                           poll_interval=60, hysteresis=margin)


def test_level_is_good_okay_low_or_vlow_by_free_space_against_the_levels_in_mib() -> None:
    th = Thresholds.of(cfg(), 100 * MIB)
    assert (th.good, th.low, th.vlow, th.margin) == (30 * MIB, 20 * MIB, 10 * MIB, 2 * MIB)
    assert th.raw_level(31 * MIB) == Level.GOOD
    assert th.raw_level(30 * MIB) == Level.OKAY
    assert th.raw_level(20 * MIB) == Level.OKAY
    assert th.raw_level(20 * MIB - 1) == Level.LOW
    assert th.raw_level(10 * MIB) == Level.LOW
    assert th.raw_level(10 * MIB - 1) == Level.VLOW


def test_percentage_levels_are_a_share_of_the_file_system_size() -> None:
    th = Thresholds.of(cfg("30%", "20%", "10%", "1%"), 1000 * MIB)
    assert (th.good, th.low, th.vlow, th.margin) == (300 * MIB, 200 * MIB, 100 * MIB, 10 * MIB)


def test_mixed_units_keep_the_levels_in_order_on_a_small_file_system() -> None:
    th = Thresholds.of(cfg("10%", "1000", "500"), 2000 * MIB)  # 10% is 200 MiB < 1000 MiB
    assert th.good >= th.low >= th.vlow


def test_a_level_falls_at_once_but_rises_only_past_the_boundary_by_the_margin() -> None:
    th = Thresholds.of(cfg(), 100 * MIB)
    assert th.next_level(Level.GOOD, 19 * MIB) == Level.LOW  # falls at once
    assert th.next_level(Level.LOW, 21 * MIB) == Level.LOW  # above level_low by 1 < 2 MiB
    assert th.next_level(Level.LOW, 22 * MIB + 1) == Level.OKAY
    assert th.next_level(Level.OKAY, 31 * MIB) == Level.OKAY
    assert th.next_level(Level.OKAY, 33 * MIB) == Level.GOOD
    assert th.next_level(None, 31 * MIB) == Level.GOOD  # first look: no history, no margin


# --------------------------------------------------------------------------- stop files


def test_at_low_only_streams_at_or_below_base_priority_are_paused_lowest_priority_first(
        site: Site) -> None:
    site.add("important", 200)
    site.add("bulk", 10)
    site.add("normal", 100)
    site.add("scratch", 5)
    site.disk.set_free(15)
    report = site.watch().check()
    assert stop_order(report) == ["scratch", "bulk", "normal"]
    assert site.stopped() == {"scratch", "bulk", "normal"}
    assert report.filesystems[0].level == "LOW"


def test_at_vlow_every_stream_is_paused_in_priority_order(site: Site) -> None:
    site.add("important", 200)
    site.add("bulk", 10)
    site.disk.set_free(5)
    report = site.watch().check()
    assert stop_order(report) == ["bulk", "important"]


def test_going_from_low_to_vlow_pauses_the_remaining_streams(site: Site) -> None:
    site.add("important", 200)
    site.add("bulk", 10)
    watch = site.watch()
    site.disk.set_free(15)
    assert stop_order(watch.check()) == ["bulk"]
    site.disk.set_free(5)
    assert stop_order(watch.check()) == ["important"]


def test_the_stop_file_says_who_placed_it_and_mstm_send_quotes_that(site: Site) -> None:
    site.add("bulk", 10)
    site.disk.set_free(15)
    site.watch().check()
    first = site.stop("bulk").read_text().splitlines()[0]
    assert first == "mstm-diskwatch: disk space LOW on /fake (15 MB free)"
    reason = is_paused(site.stream("bulk"))
    assert reason is not None and "mstm-diskwatch: disk space LOW on /fake" in reason


def test_streams_paused_at_low_resume_only_at_good_so_hovering_at_level_low_does_not_flap(
        site: Site) -> None:
    site.add("bulk", 10)
    watch = site.watch()
    for free in (19, 21, 19.5, 23, 28, 30):  # around level_low, then up to level_good
        site.disk.set_free(free)
        watch.check()
        assert site.stopped() == {"bulk"}, f"{free} MiB free"
    site.disk.set_free(GOOD + MARGIN + 1)
    report = watch.check()
    assert [a.kind for a in report.actions] == ["resume"]
    assert site.stopped() == set()


def test_streams_paused_only_at_vlow_resume_at_okay_those_paused_at_low_stay(
        site: Site) -> None:
    site.add("important", 200)
    site.add("bulk", 10)
    watch = site.watch()
    site.disk.set_free(5)
    watch.check()
    site.disk.set_free(15)  # back to LOW: nothing resumes yet
    watch.check()
    assert site.stopped() == {"bulk", "important"}
    site.disk.set_free(LOW + MARGIN + 1)  # OKAY
    report = watch.check()
    assert [(a.kind, a.stream) for a in report.actions] == [("resume", "important")]
    assert site.stopped() == {"bulk"}


def test_an_operators_stop_file_is_never_removed_nor_overwritten(site: Site) -> None:
    site.add("bulk", 10)
    site.add("other", 20)
    site.stop("bulk").write_text("operator: maintenance until Friday\n")
    watch = site.watch()
    site.disk.set_free(15)
    report = watch.check()
    assert stop_order(report) == ["other"]
    assert [r.paused_by for r in report.streams] == ["operator", "mstm-diskwatch"]
    site.disk.set_free(50)
    watch.check()
    assert site.stop("bulk").read_text() == "operator: maintenance until Friday\n"
    assert site.stopped() == {"bulk"}


def test_a_stop_file_of_ours_that_an_operator_rewrote_is_left_alone(site: Site) -> None:
    site.add("bulk", 10)
    watch = site.watch()
    site.disk.set_free(15)
    watch.check()
    site.stop("bulk").unlink()
    site.stop("bulk").write_text("operator: keep it stopped\n")  # a new file, same name
    site.disk.set_free(50)
    report = watch.check()
    assert [a.kind for a in report.actions] == ["forget"]
    assert site.stop("bulk").read_text() == "operator: keep it stopped\n"


def test_stop_files_placed_are_remembered_across_restarts(site: Site) -> None:
    site.add("bulk", 10)
    site.disk.set_free(15)
    site.watch().check()
    state = json.loads((site.spool / STATE_FILE).read_text())
    assert list(state["stops"]) == [str(site.stop("bulk"))]
    assert state["levels"] == {"/fake": "LOW"}
    site.disk.set_free(50)
    report = site.watch().check()  # a new process
    assert [a.kind for a in report.actions] == ["resume"]
    assert not site.stop("bulk").exists()


def test_a_stop_file_of_a_stream_no_longer_configured_is_removed(site: Site) -> None:
    site.add("bulk", 10)
    site.add("keep", 10)
    site.disk.set_free(15)
    site.watch().check()
    del site.streams["bulk"]
    site.write()
    report = site.watch().check()
    assert [(a.kind, a.stream) for a in report.actions] == [("resume", "bulk")]
    assert site.stopped() == {"keep"}


def test_on_a_receiving_host_the_incoming_area_gets_a_stop_file_too(site: Site) -> None:
    site.add("bulk", 10)
    assert [t.side for t in targets_of(site.stream("bulk"))] == ["outgoing"]
    incoming = site.data / "bulk" / ".mstm-incoming"  # [incoming] incoming_dir's default
    incoming.mkdir()
    assert [t.side for t in targets_of(site.stream("bulk"))] == ["outgoing", "incoming"]
    site.disk.set_free(15)
    report = site.watch().check()
    assert [a.path for a in report.actions] == [str(site.stop("bulk")), str(incoming / ".stop")]
    site.disk.set_free(50)
    site.watch().check()
    assert not (incoming / ".stop").exists() and not site.stop("bulk").exists()


def test_level_changes_are_logged_as_disk_level_events(site: Site,
                                                       caplog: pytest.LogCaptureFixture) -> None:
    site.add("bulk", 10)
    watch = site.watch()
    site.disk.set_free(50)
    watch.check()
    site.disk.set_free(15)
    with caplog.at_level(logging.INFO, logger="mstm"):
        watch.check()
    levels = [r for r in caplog.records if getattr(r, "mstm_event", None) == "disk_level"]
    assert len(levels) == 1 and levels[0].levelno == logging.WARNING
    assert levels[0].mstm_fields["result"] == "LOW"  # type: ignore[attr-defined]
    assert "GOOD -> LOW" in levels[0].mstm_fields["reason"]  # type: ignore[attr-defined]
    assert "disk_level" in MESSAGE_IDS


# --------------------------------------------------------------------------- deletion


def test_at_vlow_only_delivered_items_are_deleted_oldest_first_until_space_is_back(
        site: Site, caplog: pytest.LogCaptureFixture) -> None:
    site.add("bulk", 10, mode="mirror", deletion_enabled="true")
    old = [site.put("bulk", f"d/old{i}.dat", 2, mtime=1_000_000 + i) for i in range(6)]
    new_undelivered = site.put("bulk", "new.dat", 2, mtime=900_000)  # oldest, not delivered
    site.deliver("bulk", *old)
    site.disk.set_free(7)  # VLOW; the goal is level_vlow + margin = 12 MiB
    with caplog.at_level(logging.INFO, logger="mstm"):
        report = site.watch().check()
    deleted = [a.path for a in report.actions if a.kind == "delete"]
    assert deleted == [str(p) for p in old[:3]]  # 7 + 3 * 2 = 13 >= 12
    assert all(not p.exists() for p in old[:3]) and all(p.exists() for p in old[3:])
    assert new_undelivered.exists()
    events = [r for r in caplog.records if getattr(r, "mstm_event", None) == "diskwatch_deleted"]
    assert [r.mstm_fields["item"] for r in events] == [  # type: ignore[attr-defined]
        f"d/old{i}.dat" for i in range(3)]
    assert report.filesystems[0].level == "LOW"


def test_a_delivered_item_changed_since_delivery_is_not_deleted(site: Site) -> None:
    site.add("bulk", 10, mode="mirror", deletion_enabled="true")
    a = site.put("bulk", "a.dat", 3, mtime=1_000_000)
    b = site.put("bulk", "b.dat", 3, mtime=1_000_001)
    site.deliver("bulk", a, b)
    with open(a, "ab") as f:
        f.write(b"more")  # a new version: not what was delivered
    site.disk.set_free(7)
    report = site.watch().check()
    assert [a_.path for a_ in report.actions if a_.kind == "delete"] == [str(b)]
    assert a.exists()


def test_nothing_is_deleted_without_deletion_enabled(site: Site) -> None:
    site.add("bulk", 10, mode="mirror")
    a = site.put("bulk", "a.dat", 3, mtime=1_000_000)
    site.deliver("bulk", a)
    site.disk.set_free(5)
    report = site.watch().check()
    assert not [x for x in report.actions if x.kind == "delete"] and a.exists()


def test_undelivered_items_go_only_with_delete_undelivered_and_after_delivered_ones(
        site: Site) -> None:
    site.add("bulk", 10, mode="move", deletion_enabled="true", delete_undelivered="true")
    delivered = site.put("bulk", "z-delivered.dat", 2, mtime=2_000_000)
    site.deliver("bulk", delivered)
    waiting = [site.put("bulk", f"w{i}.dat", 2, mtime=1_000_000 + i) for i in range(4)]
    hidden = site.put("bulk", ".partial", 2, mtime=1)
    site.disk.set_free(5)
    report = site.watch().check()
    deleted = [a.path for a in report.actions if a.kind == "delete"]
    assert deleted == [str(delivered), str(waiting[0]), str(waiting[1]), str(waiting[2])]
    assert waiting[3].exists() and hidden.exists()


def test_lower_priority_streams_lose_items_first(site: Site) -> None:
    site.add("important", 200, mode="mirror", deletion_enabled="true")
    site.add("bulk", 10, mode="mirror", deletion_enabled="true")
    imp = site.put("important", "old.dat", 3, mtime=1)
    blk = site.put("bulk", "new.dat", 3, mtime=2_000_000)
    site.deliver("important", imp)
    site.deliver("bulk", blk)
    site.disk.set_free(9.5)  # deleting 3 MiB reaches level_vlow + margin
    report = site.watch().check()
    assert [a.stream for a in report.actions if a.kind == "delete"] == ["bulk"]
    assert imp.exists()


def test_delivered_directory_units_are_deleted_whole_when_unchanged(site: Site) -> None:
    site.add("runs", 10, mode="mirror", deletion_enabled="true", transfer_unit="dir")
    site.put("runs", "run1/a.dat", 2, mtime=1_000)
    site.put("runs", "run1/sub/b.dat", 2, mtime=1_001)
    site.put("runs", "run2/a.dat", 2, mtime=5_000)
    os.utime(site.data / "runs/run1/sub", (1_001, 1_001))
    os.utime(site.data / "runs/run1", (1_001, 1_001))
    # the record mstm-scan makes: total size of the files, newest mtime in the tree
    with Spool(site.spool / "runs") as spool:
        spool.enqueue([ItemRecord("run1", 4 * MIB, 1_001 * 10**9, is_dir=True)])
        for claim in spool.claim(max_items=10, max_bytes=1 << 40):
            spool.complete(claim, sha256="0" * 64)
    site.disk.set_free(5)
    report = site.watch().check()
    assert [a.path for a in report.actions if a.kind == "delete"] == [
        str(site.data / "runs/run1")]
    assert not (site.data / "runs/run1").exists() and (site.data / "runs/run2").exists()


def test_deletion_never_follows_a_symlinked_directory_out_of_the_stream(site: Site,
                                                                        tmp_path: Path) -> None:
    site.add("bulk", 10, mode="mirror", deletion_enabled="true")
    outside = tmp_path / "outside"
    outside.mkdir()
    victim = outside / "a.dat"
    victim.write_bytes(b"x" * MIB)
    os.utime(victim, (5, 5))
    (site.data / "bulk" / "d").symlink_to(outside)
    with Spool(site.spool / "bulk") as spool:  # a record pointing through the symlink
        st = victim.stat()
        spool.enqueue([ItemRecord("d/a.dat", st.st_size, st.st_mtime_ns)])
        for claim in spool.claim(max_items=10, max_bytes=1 << 40):
            spool.complete(claim, sha256="0" * 64)
    site.disk.set_free(5)
    site.watch().check()
    assert victim.exists()


# --------------------------------------------------------------------------- dry run, CLI


def test_dry_run_changes_nothing_but_says_what_it_would_stop_and_delete(site: Site) -> None:
    site.add("bulk", 10, mode="mirror", deletion_enabled="true")
    site.add("important", 200)
    a = site.put("bulk", "a.dat", 3, mtime=1)
    site.deliver("bulk", a)
    site.disk.set_free(5)
    before = sorted(p for p in site.root.rglob("*"))
    report = site.watch(dry_run=True).check()
    assert sorted(p for p in site.root.rglob("*")) == before
    assert [(x.kind, x.stream, x.done) for x in report.actions] == [
        ("stop", "bulk", False), ("stop", "important", False), ("delete", "bulk", False)]
    assert report.actions[0].describe().startswith("stop bulk: would place ")


def test_dry_run_says_which_stop_files_it_would_remove(site: Site) -> None:
    site.add("bulk", 10)
    site.disk.set_free(15)
    site.watch().check()
    site.disk.set_free(50)
    report = site.watch(dry_run=True).check()
    assert [(x.kind, x.done) for x in report.actions] == [("resume", False)]
    assert site.stop("bulk").exists()


def test_once_prints_the_levels_as_a_table_and_json_on_request(
        site: Site, monkeypatch: pytest.MonkeyPatch) -> None:
    site.add("bulk", 10)
    g = site.write()
    monkeypatch.setattr("mstm.diskwatch.watch.RealFileSystems", lambda: site.disk)
    site.disk.set_free(15)
    r = CliRunner().invoke(diskwatch_main, ["--config", str(g), "--once", "--dry-run"])
    assert r.exit_code == 0, r.output
    lines = r.stdout.splitlines()
    assert lines[0].startswith("stop bulk: would place ")
    assert lines[1].split() == ["STREAM", "PRIO", "SIDE", "LEVEL", "FREE", "FILESYSTEM",
                                "STOP", "FILE", "PAUSED", "BY"]
    assert lines[2].split()[:5] == ["bulk", "10", "outgoing", "LOW", "15.0"]
    r = CliRunner().invoke(diskwatch_main, ["--config", str(g), "--json"])
    assert r.exit_code == 0, r.output
    data = json.loads(r.stdout)
    assert data["filesystems"][0]["level"] == "LOW"
    assert data["streams"][0]["paused_by"] == "mstm-diskwatch"


def test_a_broken_stream_file_is_reported_and_the_other_streams_are_still_watched(
        site: Site, monkeypatch: pytest.MonkeyPatch) -> None:
    site.add("bulk", 10)
    site.add("broken", 10)
    g = site.write()
    (site.etc / "broken.ini").write_text("[data_stream]\npriority = high\n")
    monkeypatch.setattr("mstm.diskwatch.watch.RealFileSystems", lambda: site.disk)
    site.disk.set_free(15)
    r = CliRunner().invoke(diskwatch_main, ["--config", str(g)])
    assert r.exit_code == 78, r.output
    assert site.stopped() == {"bulk"}
