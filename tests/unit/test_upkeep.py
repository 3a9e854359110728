"""A stream's upkeep (mstm.send.upkeep) and what the sender says about it: stuck items
get one warning each, the unit's status line names the cause, done/ does not grow
forever, and mirror mode never sends an item twice because its record was pruned."""

from __future__ import annotations

import logging
import os
import time
from pathlib import Path

import pytest
from tests.unit.test_sender_decisions import TARGET, Env

from mstm.config import load_stream
from mstm.send import Sender
from mstm.send.upkeep import Upkeep

DAY = 86400.0


def _with(env: Env, **data_stream: str) -> None:
    """Reload env's stream with these [data_stream] settings (a new Sender)."""
    ini = env.root / "proj1.ini"
    text = ini.read_text()
    for key, value in data_stream.items():
        text = text.replace("[data_stream]\n", f"[data_stream]\n{key} = {value}\n", 1)
    ini.write_text(text)
    env.stream = load_stream("proj1", env.root / "global.ini")
    env.sender = Sender(env.stream, spool=env.spool, transport=env.target)


def _age_queue(env: Env, seconds: float) -> None:
    """Make every queued record look enqueued *seconds* ago (rewriting its record)."""
    from dataclasses import replace

    from mstm.spool.records import pack

    for r in list(env.spool.iter_records("new")):
        path = env.spool.path / "new" / r.id
        old = replace(r, enqueued_at=r.enqueued_at - seconds)
        tmp = path.with_name(".tmp-" + r.id)
        tmp.write_bytes(pack([old]))
        os.utime(tmp, (old.enqueued_at, old.enqueued_at))
        os.rename(tmp, path)


def _stuck_warnings(caplog: pytest.LogCaptureFixture) -> list[logging.LogRecord]:
    return [r for r in caplog.records if getattr(r, "mstm_event", None) == "stuck"]


def test_an_item_queued_longer_than_stuck_after_is_warned_about_once_with_its_cause(
        tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    env = Env(tmp_path)
    _with(env, stuck_after="1h")
    env.write("waiting.dat", b"x")
    env.write("fresh.dat", b"y")
    env.target.faults.unreachable = "connection refused"
    env.cycle()  # queued, target down: nothing moves
    records = {r.relpath: r for r in env.records("new")}
    _age_queue(env, 2 * 3600)
    fresh = env.root / "src" / "fresh.dat"
    assert fresh.exists() and records
    caplog.set_level(logging.WARNING, logger="mstm")
    env.sender.upkeep.run(env.sender.stuck_cause(), force=True)
    warned = _stuck_warnings(caplog)
    assert sorted(r.mstm_fields["item"] for r in warned) == ["fresh.dat", "waiting.dat"]
    assert all("target is unreachable: connection refused" in r.getMessage() for r in warned)
    assert warned[0].levelno == logging.WARNING
    # the next look, and a restarted sender, say nothing more about the same items
    caplog.clear()
    env.sender.upkeep.run(env.sender.stuck_cause(), force=True)
    Sender(env.stream, spool=env.spool, transport=env.target).upkeep.run(force=True)
    assert _stuck_warnings(caplog) == []
    assert env.sender.upkeep.stuck == 2


def test_an_item_queued_for_less_than_stuck_after_is_not_stuck(
        tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    env = Env(tmp_path)
    env.write("a.dat", b"x")
    env.target.faults.unreachable = "no route to host"
    env.cycle()
    caplog.set_level(logging.WARNING, logger="mstm")
    env.sender.upkeep.run(force=True)
    assert _stuck_warnings(caplog) == [] and env.sender.upkeep.stuck == 0


def test_the_status_line_keeps_the_queue_count_while_backing_off(tmp_path: Path) -> None:
    env = Env(tmp_path)
    for n in range(3):
        env.write(f"{n}.dat", b"x")
    env.target.faults.unreachable = "connection refused"
    env.cycle()
    line = env.sender.status_line()
    assert line.startswith("backing off ") and "connection refused" in line
    assert "3 queued" in line


def test_a_target_unreachable_longer_than_stuck_after_puts_the_cause_in_the_status_line(
        tmp_path: Path) -> None:
    env = Env(tmp_path)
    env.write("a.dat", b"x")
    env.target.faults.unreachable = "Connection timed out"
    env.cycle()
    env.sender.backoff.since = time.time() - 5400  # failing for 1.5 h
    line = env.sender.status_line()
    assert line.startswith("stuck: target unreachable for 90 min"), line
    assert "Connection timed out" in line and "1 queued" in line
    # kept across restarts: the first failure's time is saved with the backoff
    env.sender._save_backoff()
    again = Sender(env.stream, spool=env.spool, transport=env.target)
    assert abs(again.backoff.since - env.sender.backoff.since) < 1


def test_move_mode_prunes_done_records_older_than_done_retention_once_an_hour(
        tmp_path: Path) -> None:
    env = Env(tmp_path)
    _with(env, done_retention="30d")
    for n in range(4):
        env.write(f"{n}.dat", b"x" * n)
    env.cycle()
    done = sorted((env.spool.path / "done").iterdir())
    assert len(done) == 4
    old = time.time() - 31 * DAY
    for p in done[:3]:
        os.utime(p, (old, old))  # hard links of one batch file: all four are now old
    upkeep = Upkeep(env.stream, env.spool)
    assert upkeep.prune_if_due(time.time()) == 4
    assert list((env.spool.path / "done").iterdir()) == []
    env.write("later.dat", b"z")
    env.cycle()
    for p in (env.spool.path / "done").iterdir():
        os.utime(p, (old, old))
    assert upkeep.prune_if_due(time.time()) == 0  # an hour has not passed
    assert upkeep.prune_if_due(time.time() + 3601) == 1


def test_mirror_mode_keeps_the_record_of_a_source_still_there_so_it_is_never_sent_twice(
        tmp_path: Path) -> None:
    env = Env(tmp_path, mode="mirror")
    env.write("kept.dat", b"still here")
    env.write("gone.dat", b"deleted later")
    env.write("changed.dat", b"version 1")
    env.cycle()
    assert sorted(env.target.files) == [f"{TARGET}/changed.dat", f"{TARGET}/gone.dat",
                                        f"{TARGET}/kept.dat"]
    (env.src / "gone.dat").unlink()
    st = (env.src / "changed.dat").stat()
    (env.src / "changed.dat").write_bytes(b"version 2, longer")
    os.utime(env.src / "changed.dat", ns=(st.st_atime_ns, st.st_mtime_ns + 10**9))
    env.cycle()  # version 2 of changed.dat is sent: four records now
    old = time.time() - 40 * DAY
    for p in (env.spool.path / "done").iterdir():
        os.utime(p, (old, old))
    sent_before = dict(env.target.files)
    n = Upkeep(env.stream, env.spool).prune(time.time())
    left = sorted(r.relpath for r in env.records("done"))
    assert n == 2 and left == ["changed.dat", "kept.dat"]  # gone, and version 1 of changed
    # the next scan queues nothing: a mirrored source still there is never sent again
    env.target.files.clear()
    env.cycle()
    assert env.target.files == {} and env.records("new") == []
    assert sent_before  # (what was sent before, for the record)


def test_a_done_record_is_pruned_from_the_stream_itself_by_run_once(tmp_path: Path) -> None:
    env = Env(tmp_path)
    env.write("a.dat", b"x")
    env.sender.run_once()
    old = time.time() - 31 * DAY
    for p in (env.spool.path / "done").iterdir():
        os.utime(p, (old, old))
    state = env.spool.load_state()
    assert state["done_pruned_at"] > time.time() - 60  # the first run pruned (nothing)
    state["done_pruned_at"] -= 3601  # an hour later: the next run prunes again
    env.spool.save_state(state)
    Sender(env.stream, spool=env.spool, transport=env.target).run_once()
    assert list((env.spool.path / "done").iterdir()) == []
    assert env.spool.load_state()["done_pruned_at"] > time.time() - 60


def test_done_retention_0_keeps_done_records_forever(tmp_path: Path) -> None:
    env = Env(tmp_path)
    _with(env, done_retention="0")
    env.write("a.dat", b"x")
    env.cycle()
    old = time.time() - 400 * DAY
    for p in (env.spool.path / "done").iterdir():
        os.utime(p, (old, old))
    assert Upkeep(env.stream, env.spool).prune_if_due(time.time()) == 0
    assert len(list((env.spool.path / "done").iterdir())) == 1


def test_each_delivery_is_logged_with_its_full_sha256(
        tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    import hashlib

    env = Env(tmp_path)
    env.sender.per_item_level = logging.INFO
    env.write("proof.dat", b"what arrived")
    caplog.set_level(logging.INFO, logger="mstm")
    env.cycle()
    [rec] = [r for r in caplog.records if getattr(r, "mstm_event", None) == "delivered"]
    assert rec.mstm_fields["sha256"] == hashlib.sha256(b"what arrived").hexdigest()
    assert rec.mstm_fields["item"] == "proof.dat"


def test_a_backlog_past_the_named_limit_is_never_a_flood_nor_named_twice(
        tmp_path: Path, caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch
        ) -> None:
    """The review's case: more stuck items than are remembered.  Each item is named at
    most once; the rest are one line, said again only when their number has doubled."""
    import mstm.send.upkeep as upkeep_mod

    monkeypatch.setattr(upkeep_mod, "_WARNED_MAX", 30)
    monkeypatch.setattr(upkeep_mod, "_WARN_MAX_PER_LOOK", 20)
    env = Env(tmp_path)
    for n in range(50):
        env.write(f"f{n:03d}.dat", b"x")
    env.target.faults.unreachable = "connection refused"
    env.cycle()
    _age_queue(env, 2 * 3600)
    caplog.set_level(logging.WARNING, logger="mstm")
    named: list[str] = []
    more: list[str] = []
    for _ in range(6):
        caplog.clear()
        env.sender.upkeep.run(env.sender.stuck_cause(), force=True)
        for r in _stuck_warnings(caplog):
            if "item" in r.mstm_fields:
                named.append(r.mstm_fields["item"])
            else:
                more.append(r.getMessage())
    assert len(named) == len(set(named)) == 30  # 20, then the 10 the limit leaves room for
    assert len(more) == 1 and "30 more item(s)" in more[0]  # the first look named 20 of 50
    assert env.sender.upkeep.stuck == 50


def test_mirror_mode_prunes_nothing_while_the_stream_directory_is_empty_as_if_unmounted(
        tmp_path: Path) -> None:
    """The review's case: one pruning while the source file system was not mounted (an
    empty mount point) would forget every record, and send everything again once it is
    back."""
    env = Env(tmp_path, mode="mirror")
    for n in range(3):
        env.write(f"f{n}.dat", b"x" * (n + 1))
    env.cycle()
    old = time.time() - 40 * DAY
    for p in (env.spool.path / "done").iterdir():
        os.utime(p, (old, old))
    mounted = env.src.rename(env.root / "mounted")  # the mount point alone is left, empty
    env.src.mkdir()
    assert Upkeep(env.stream, env.spool).prune(time.time()) == 0
    env.src.rmdir()
    mounted.rename(env.src)  # mounted again
    env.target.files.clear()
    env.cycle()
    assert env.target.files == {}  # nothing sent twice
    assert len(env.records("done")) == 3


def test_mirror_mode_skips_one_pruning_when_the_directory_changed_file_system(
        tmp_path: Path) -> None:
    env = Env(tmp_path, mode="mirror")
    env.write("kept.dat", b"x")
    env.cycle()
    state = env.spool.load_state()
    state["directory_dev"] = -1  # as if another file system was mounted there last time
    env.spool.save_state(state)
    old = time.time() - 40 * DAY
    for p in (env.spool.path / "done").iterdir():
        os.utime(p, (old, old))
    (env.src / "kept.dat").unlink()
    upkeep = Upkeep(env.stream, env.spool)
    assert upkeep.prune(time.time()) == 0  # changed since last time: not now
    env.write("other.dat", b"y")  # (not empty)
    assert upkeep.prune(time.time()) == 1  # the same file system again: kept.dat's goes
