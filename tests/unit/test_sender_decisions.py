"""The sender's decisions, against a real spool and real source files; only the target is
in memory (mstm.transports.memory), with faults injected at chosen moments.

What every test here defends is the first promise: nothing is ever lost.  A source is
deleted only after the bytes the target holds under its final name were proven to be
that very version; nothing unverified is ever visible under a final name; nothing
outside the stream directory is ever read into the target or deleted.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import (
    RuleBasedStateMachine,
    initialize,
    invariant,
    rule,
)

from mstm.config import StreamConfig, load_stream
from mstm.send import Sender
from mstm.spool import ItemRecord, Spool
from mstm.transports.base import STAGING, TransportOptions
from mstm.transports.memory import MemoryTransport

TARGET = "/archive/proj1"


# -- a stream, its spool, a memory target, a sender ------------------------------------
class Env:
    """A stream directory and a directory outside it, in *root*; a sender whose target
    is a :class:`MemoryTransport`."""

    def __init__(self, root: Path, *, mode: str = "move", unit: str = "file",
                 retry_count: int = 2, retry_backoff: str = "0",
                 follow_symlinks: bool = False, owner: str | None = None) -> None:
        self.root = root
        self.src = root / "src"
        self.outside = root / "outside"
        for d in (self.src, self.outside, root / "spool"):
            d.mkdir(parents=True, exist_ok=True)
        (root / "global.ini").write_text(
            "[global]\ndata_stream_list = proj1\n"
            f"spool_base_dir = {root / 'spool'}\nruntime_dir = {root / 'run'}\n")
        (root / "proj1.ini").write_text(
            f"[data_stream]\ndirectory = {self.src}\nsettle_seconds = 0\n"
            f"transfer_unit = {unit}\nfollow_symlinks = {str(follow_symlinks).lower()}\n"
            f"[outgoing]\ntransfer_protocol = local\ntarget_dir = {TARGET}\n"
            f"transfer_mode = {mode}\nretry_count = {retry_count}\n"
            f"retry_backoff = {retry_backoff}\nretry_backoff_max = 3600\n")
        self.stream: StreamConfig = load_stream("proj1", root / "global.ini")
        self.spool = Spool(self.stream.spool_dir, lease_seconds=self.stream.outgoing.lease_seconds,
                           owner=owner).open()
        self.target = MemoryTransport(TransportOptions(source_dir=self.src, target_dir=TARGET,
                                                       follow_symlinks=follow_symlinks))
        self.sender = Sender(self.stream, spool=self.spool, transport=self.target)

    def write(self, relpath: str, data: bytes, *, where: Path | None = None) -> Path:
        path = (where or self.src) / relpath
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(data)
        return path

    def cycle(self) -> None:
        """One scan and one delivery of everything claimable (no waiting)."""
        self.sender.scan_into_spool()
        self.sender.deliver_pending()

    def records(self, state: str) -> list[ItemRecord]:
        return list(self.spool.iter_records(state))

    def source_files(self) -> dict[str, bytes]:
        out = {}
        for d, _dirs, names in os.walk(self.src):
            for n in names:
                p = Path(d) / n
                out[str(p.relative_to(self.src))] = p.read_bytes()
        return out


@pytest.fixture
def env(tmp_path: Path) -> Env:
    return Env(tmp_path)


def sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def no_unverified_final_names(t: MemoryTransport) -> Callable[[], None]:
    """A hook that asserts nothing of the batch is under a final name yet."""
    def check() -> None:
        assert t.final_files() == {}, "visible under its final name before verification"
    return check


# -- move and mirror ------------------------------------------------------------------
def test_move_deletes_a_verified_source_and_commits_its_record_to_done(env: Env) -> None:
    env.write("a.dat", b"alpha" * 100)
    env.write("sub/b.dat", b"")
    env.target.faults.between = no_unverified_final_names(env.target)

    env.cycle()

    assert env.target.final_files() == {"a.dat": b"alpha" * 100, "sub/b.dat": b""}
    assert env.source_files() == {}
    done = {r.relpath: r for r in env.records("done")}
    assert set(done) == {"a.dat", "sub/b.dat"}
    assert done["a.dat"].sha256 == sha(b"alpha" * 100)
    assert env.spool.counts() == {"new": 0, "claimed": 0, "done": 2, "failed": 0}
    assert env.target.staged() == []  # the batch's staging directory is gone
    assert len(env.sender.summary.delivered) == 2


def test_mirror_never_deletes_a_source_and_sends_each_version_once(tmp_path: Path) -> None:
    env = Env(tmp_path, mode="mirror")
    env.write("a.dat", b"one")
    env.cycle()
    env.cycle()  # the same version is not sent again

    assert env.source_files() == {"a.dat": b"one"}
    assert env.target.final_files() == {"a.dat": b"one"}
    assert env.target.sent == [["a.dat"]]
    assert [r.relpath for r in env.records("done")] == ["a.dat"]


# -- copies that do not verify ----------------------------------------------------------
@pytest.mark.parametrize(("fault", "reason"), [("corrupt", "bad checksum"),
                                               ("drop", "missing at the target")])
def test_a_copy_that_does_not_verify_is_retried_then_parked_in_failed_with_its_reason(
        env: Env, fault: str, reason: str) -> None:
    env.write("a.dat", b"precious")
    env.write("b.dat", b"fine")
    getattr(env.target.faults, fault).add("a.dat")

    env.cycle()  # retry_backoff = 0: every attempt happens now

    assert [i for batch in env.target.sent for i in batch].count("a.dat") == 2  # retry_count 2
    failed = env.records("failed")
    assert [(r.relpath, r.attempts) for r in failed] == [("a.dat", 2)]
    assert reason in (failed[0].last_error or "")
    assert env.source_files() == {"a.dat": b"precious"}  # kept, untouched
    assert env.target.final_files() == {"b.dat": b"fine"}  # never the bad copy
    assert env.target.staged() == []
    assert env.sender.summary.failed[0]["attempts"] == 2


def test_a_failed_item_is_not_queued_again_by_the_next_scan(env: Env) -> None:
    env.write("a.dat", b"precious")
    env.target.faults.corrupt.add("a.dat")
    env.cycle()
    sends = len(env.target.sent)
    env.target.faults.corrupt.clear()
    env.cycle()
    assert len(env.target.sent) == sends
    assert env.source_files() == {"a.dat": b"precious"}


# -- a target that cannot be reached ----------------------------------------------------
def test_an_unreachable_target_releases_the_batch_without_an_attempt_and_backs_off(
        env: Env) -> None:
    env.write("a.dat", b"x")
    env.target.faults.unreachable = "connection refused"

    env.cycle()

    assert [(r.relpath, r.attempts) for r in env.records("new")] == [("a.dat", 0)]
    assert env.sender.backoff.step == 1 and env.sender.summary.error == "connection refused"
    assert env.spool.load_state()["backoff"]["step"] == 1  # survives a restart
    env.target.faults.unreachable = None
    env.sender.deliver_pending()  # still backing off: the target is not even tried
    assert env.target.opens == 0 and env.target.sent == []
    env.sender.backoff.until = 0.0  # the backoff is over
    env.sender.deliver_pending()
    assert env.target.final_files() == {"a.dat": b"x"} and env.source_files() == {}
    assert env.sender.backoff.step == 0


def _count_opens(env: Env) -> list[int]:
    """Every call of the target's open(), failed ones too."""
    calls: list[int] = []
    real = env.target.open

    def counting() -> None:
        calls.append(1)
        real()

    env.target.open = counting  # type: ignore[method-assign]
    return calls


@pytest.mark.parametrize("retry_count", [0, 3])
def test_run_once_tries_an_unreachable_target_once_and_never_sleeps_out_the_backoff(
        tmp_path: Path, retry_count: int) -> None:
    """A one-off run (cron) ends at its first connection failure: before, it slept out
    retry_count backoffs (11.6 s, then 73.8 s, then 739 s for three runs in a row)."""
    env = Env(tmp_path, retry_count=retry_count)
    env.write("a.dat", b"x")
    env.write("b.dat", b"y")
    env.target.faults.unreachable = "no route to host"
    opens = _count_opens(env)
    started = time.monotonic()
    summary = env.sender.run_once()
    assert time.monotonic() - started < 2
    assert len(opens) == 1
    assert summary.error == "no route to host" and summary.queued == 2
    assert env.source_files() == {"a.dat": b"x", "b.dat": b"y"}
    assert sorted((r.relpath, r.attempts) for r in env.records("new")) == [
        ("a.dat", 0), ("b.dat", 0)]
    assert env.spool.load_state()["backoff"]["step"] == 1  # for --follow to wait out


def test_run_once_tries_at_once_whatever_backoff_an_earlier_run_saved(tmp_path: Path) -> None:
    first = Env(tmp_path)
    first.write("a.dat", b"x")
    first.target.faults.unreachable = "connection refused"
    for _ in range(3):  # three failed cron runs: the saved backoff grows
        first.sender = Sender(first.stream, spool=first.spool, transport=first.target)
        first.sender.run_once()
    saved = first.spool.load_state()["backoff"]
    assert saved["step"] == 3 and saved["until"] > time.time()
    first.target.faults.unreachable = None  # the target is back
    again = Sender(first.stream, spool=first.spool, transport=first.target)
    started = time.monotonic()
    summary = again.run_once()
    assert time.monotonic() - started < 2
    assert [d["path"] for d in summary.delivered] == ["a.dat"]
    assert first.spool.load_state()["backoff"]["step"] == 0


def test_run_once_finishes_a_transfer_cut_in_the_middle_in_the_same_run(
        tmp_path: Path) -> None:
    """Reached, then lost (the server died mid-batch): the run reconnects after the
    target's backoff and delivers; only a target never reached ends the run at once."""
    env = Env(tmp_path, retry_count=3)
    for n in range(3):
        env.write(f"f{n}.dat", b"x" * (n + 1))
    env.target.faults.die_in_send = 1
    opens = _count_opens(env)
    summary = env.sender.run_once(max_wait=30)
    assert sorted(d["path"] for d in summary.delivered) == ["f0.dat", "f1.dat", "f2.dat"]
    assert summary.queued == 0 and len(opens) >= 2
    assert env.source_files() == {}


def test_run_once_gives_up_reconnecting_after_retry_count_tries(tmp_path: Path) -> None:
    env = Env(tmp_path, retry_count=2)
    env.write("a.dat", b"x")
    sends: list[int] = []

    def dies_every_time() -> None:
        sends.append(1)
        env.target.faults.die_in_send = 0

    env.target.faults.before_send = dies_every_time
    summary = env.sender.run_once(max_wait=60)
    assert summary.delivered == [] and summary.queued == 1 and summary.error
    assert len(sends) == 2  # retry_count tries in all, as for an item
    assert env.source_files() == {"a.dat": b"x"}


def test_run_once_never_sleeps_longer_than_max_wait_and_leaves_the_rest_queued(
        tmp_path: Path) -> None:
    env = Env(tmp_path, retry_count=5, retry_backoff="30")
    env.write("good.dat", b"fine")
    env.write("bad.dat", b"flipped at the target")
    env.target.faults.corrupt = {"bad.dat"}
    started = time.monotonic()
    summary = env.sender.run_once(max_wait=2)
    assert time.monotonic() - started < 5  # the retry is due in ~30 s: not waited for
    assert [d["path"] for d in summary.delivered] == ["good.dat"]
    assert summary.queued == 1 and summary.waiting_retry
    assert [(r.relpath, r.attempts) for r in env.records("new")] == [("bad.dat", 1)]


def test_run_once_waits_for_a_retry_that_is_due_within_max_wait(tmp_path: Path) -> None:
    env = Env(tmp_path, retry_count=3, retry_backoff="0.3")
    env.write("flaky.dat", b"once wrong, then right")
    env.target.faults.corrupt = {"flaky.dat"}
    env.target.faults.between = lambda: env.target.faults.corrupt.clear()
    summary = env.sender.run_once(max_wait=10)
    assert [d["path"] for d in summary.delivered] == ["flaky.dat"]
    assert summary.queued == 0 and not summary.waiting_retry


def test_run_once_says_how_many_items_are_not_ready_yet(tmp_path: Path) -> None:
    env = Env(tmp_path)
    ini = tmp_path / "proj1.ini"
    ini.write_text(ini.read_text().replace("settle_seconds = 0", "settle_seconds = 3600"))
    env.sender = Sender(load_stream("proj1", tmp_path / "global.ini"), spool=env.spool,
                        transport=env.target)
    env.write("fresh.dat", b"still being written, for all we know")
    summary = env.sender.run_once()
    assert summary.delivered == [] and summary.settling == 1
    assert json.loads(summary.to_json())["settling"] == 1


@pytest.mark.parametrize("fault", ["die_in_send", "inspect_unavailable"])
def test_a_connection_lost_during_a_batch_releases_it_without_an_attempt(
        env: Env, fault: str) -> None:
    env.write("a.dat", b"first")
    env.write("b.dat", b"second")
    if fault == "die_in_send":
        env.target.faults.die_in_send = 1  # after the first item
    else:
        env.target.faults.inspect_unavailable = "connection reset by peer"

    env.cycle()

    assert sorted((r.relpath, r.attempts) for r in env.records("new")) == [
        ("a.dat", 0), ("b.dat", 0)]
    assert env.target.final_files() == {}
    assert env.source_files() == {"a.dat": b"first", "b.dat": b"second"}
    assert env.sender.backoff.step == 1


# -- the source changes under the sender ------------------------------------------------
@pytest.mark.parametrize("keep_times", [False, True], ids=["rewritten", "rewritten_touch_r"])
def test_a_source_rewritten_between_send_and_verification_is_not_deleted(
        env: Env, keep_times: bool) -> None:
    path = env.write("a.dat", b"version 1")
    st = path.stat()

    def rewrite() -> None:
        assert env.target.final_files() == {}  # nothing unverified under a final name
        path.write_bytes(b"version 2" if keep_times else b"version 2, longer")
        if keep_times:  # same size and mtime: only ctime tells
            os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns))

    env.target.faults.between = rewrite
    env.cycle()

    new = (b"version 2" if keep_times else b"version 2, longer")
    assert env.source_files() == {"a.dat": new}  # not deleted
    assert env.target.final_files() in ({}, {"a.dat": b"version 1"})
    env.target.faults.between = None
    env.cycle()  # the new version is queued again, sent, verified, and only then deleted
    assert env.target.final_files() == {"a.dat": new}
    assert env.source_files() == {}


def test_a_source_rewritten_while_the_batch_is_sent_never_reaches_a_final_name_unproven(
        env: Env) -> None:
    path = env.write("a.dat", b"version 1")
    env.target.faults.before_send = lambda: path.write_bytes(b"version 2!")
    env.cycle()
    target, source = env.target.final_files(), env.source_files()
    assert target.get("a.dat") in (None, b"version 1", b"version 2!")
    assert source.get("a.dat", target.get("a.dat")) == b"version 2!"


def test_a_source_that_vanished_before_the_batch_is_dropped_without_an_attempt(
        env: Env) -> None:
    path = env.write("a.dat", b"x")
    env.sender.scan_into_spool()
    path.unlink()
    env.sender.deliver_pending()
    assert env.spool.counts() == {"new": 0, "claimed": 0, "done": 0, "failed": 0}
    assert env.target.sent == [] and env.sender.summary.skipped


# -- a directory swapped for a link to somewhere outside the stream ---------------------
def _swap_for_outside_link(env: Env) -> None:
    """src/sub -> src/sub.real; src/sub becomes a link to outside/sub, which holds a file
    of the same name, size and mtime (another owner's data)."""
    real = env.src / "sub" / "a.dat"
    st = real.stat()
    fake = env.write("sub/a.dat", b"SECRET!!", where=env.outside)
    os.utime(fake, ns=(st.st_atime_ns, st.st_mtime_ns))
    os.rename(env.src / "sub", env.src / "sub.real")
    os.symlink(env.outside / "sub", env.src / "sub")


@pytest.mark.parametrize("moment", ["before_claim", "before_send", "between"])
def test_a_parent_swapped_for_a_link_to_outside_brings_nothing_from_outside_and_deletes_nothing(
        env: Env, moment: str) -> None:
    env.write("sub/a.dat", b"real one")
    env.sender.scan_into_spool()
    if moment == "before_claim":
        _swap_for_outside_link(env)
    else:
        setattr(env.target.faults, moment, lambda: _swap_for_outside_link(env))

    env.sender.deliver_pending()

    assert (env.outside / "sub" / "a.dat").read_bytes() == b"SECRET!!"  # nothing outside deleted
    assert (env.src / "sub.real" / "a.dat").read_bytes() == b"real one"  # the source kept
    assert b"SECRET!!" not in env.target.final_files().values()
    assert env.target.final_files() in ({}, {"sub/a.dat": b"real one"})
    assert not any(r.relpath == "sub/a.dat" for r in env.records("new") + env.records("failed")
                   ) or moment != "before_claim"
    # the next scan does not follow the link; the real file is sent under its new name
    env.target.faults.before_send = env.target.faults.between = None
    env.cycle()
    assert (env.outside / "sub" / "a.dat").read_bytes() == b"SECRET!!"
    assert env.target.final_files().get("sub.real/a.dat") == b"real one"
    assert b"SECRET!!" not in env.target.final_files().values()


def test_a_followed_link_item_is_sent_as_its_file_and_only_the_link_is_deleted(
        tmp_path: Path) -> None:
    env = Env(tmp_path, follow_symlinks=True)
    data = env.write("data.bin", b"pointed to", where=env.outside)
    os.symlink(data, env.src / "link.bin")
    env.cycle()
    assert env.target.final_files() == {"link.bin": b"pointed to"}
    assert not os.path.lexists(env.src / "link.bin")
    assert data.read_bytes() == b"pointed to"


def test_a_followed_link_retargeted_between_send_and_verification_is_not_deleted(
        tmp_path: Path) -> None:
    env = Env(tmp_path, follow_symlinks=True)
    first = env.write("first.bin", b"first", where=env.outside)
    second = env.write("second.bin", b"other", where=env.outside)
    link = env.src / "link.bin"
    os.symlink(first, link)

    def retarget() -> None:
        tmp = env.src / ".link.tmp"
        os.symlink(second, tmp)
        os.rename(tmp, link)

    env.target.faults.between = retarget
    env.cycle()
    assert os.readlink(link) == str(second)  # the link is kept
    assert (first.read_bytes(), second.read_bytes()) == (b"first", b"other")
    assert env.target.final_files() in ({}, {"link.bin": b"first"})


# -- directory items ------------------------------------------------------------------------
def test_a_directory_item_is_merged_into_an_existing_target_directory(tmp_path: Path) -> None:
    env = Env(tmp_path, unit="dir")
    env.write("d/a.txt", b"a")
    env.write("d/sub/b.txt", b"b")
    (env.src / "d" / "empty").mkdir()
    env.target.put("d/other.txt", b"was there")
    env.target.put("d/a.txt", b"old a")

    env.cycle()

    assert env.target.final_files() == {"d/other.txt": b"was there", "d/a.txt": b"a",
                                        "d/sub/b.txt": b"b"}
    assert "d/empty" in env.target.final_dirs()
    assert not (env.src / "d").exists()
    assert [r.relpath for r in env.records("done")] == ["d"]


@pytest.mark.parametrize("change", ["rewritten", "added"])
def test_a_directory_item_changed_between_send_and_verification_keeps_what_was_not_verified(
        tmp_path: Path, change: str) -> None:
    env = Env(tmp_path, unit="dir")
    env.write("d/a.txt", b"a")
    env.write("d/sub/b.txt", b"b")

    def touch_it() -> None:
        if change == "rewritten":
            env.write("d/sub/b.txt", b"b, rewritten")
        else:
            env.write("d/sub/late.txt", b"came late")

    env.target.faults.between = touch_it
    env.cycle()

    kept = {"rewritten": {"d/sub/b.txt": b"b, rewritten"},
            "added": {"d/sub/late.txt": b"came late"}}[change]
    assert env.source_files() == kept  # only the verified files went
    assert env.target.final_files() == {"d/a.txt": b"a", "d/sub/b.txt": b"b"}
    env.target.faults.between = None
    env.cycle()  # what was kept is a new version of the item: sent and merged
    assert env.source_files() == {}
    assert env.target.final_files() == {"d/a.txt": b"a", **{"d/sub/b.txt": b"b"}, **kept}


@pytest.mark.parametrize("conflict", ["file_where_dir", "dir_where_file", "link_on_the_way"])
def test_a_type_conflict_at_the_target_parks_the_item_after_its_retries_and_keeps_the_source(
        tmp_path: Path, conflict: str) -> None:
    """The conflicting entry is left as it is; whatever the target held stays."""
    env = Env(tmp_path, unit="dir")
    env.write("d/a.txt", b"a")
    env.write("d/sub/b.txt", b"b")
    if conflict == "file_where_dir":
        env.target.put("d/sub", b"a file")
    elif conflict == "dir_where_file":
        env.target.mkdir("d/a.txt")
    else:
        env.target.symlink("d", "/elsewhere")
    before = (env.target.final_files(), env.target.final_dirs(), dict(env.target.links))

    env.cycle()

    failed = env.records("failed")
    assert [(r.relpath, r.attempts) for r in failed] == [("d", 2)]  # retry_count 2
    assert "cannot be put in place" in (failed[0].last_error or "")
    assert env.source_files() == {"d/a.txt": b"a", "d/sub/b.txt": b"b"}
    # nothing that was at the target changed or went; a directory item is published
    # entry by entry, so its verified files that met no conflict may be in place
    files, dirs, links = before
    after = env.target.final_files()
    assert {k: after.get(k) for k in files} == files
    assert set(after) - set(files) <= {"d/a.txt", "d/sub/b.txt"}
    assert all(after[k] == env.source_files()[k] for k in set(after) - set(files))
    assert dirs <= env.target.final_dirs() and dict(env.target.links) == links
    assert env.target.staged() == []


def test_a_file_item_where_the_target_has_a_directory_is_parked(env: Env) -> None:
    env.write("a.dat", b"x")
    env.target.mkdir("a.dat")
    env.cycle()
    assert [r.relpath for r in env.records("failed")] == ["a.dat"]
    assert env.source_files() == {"a.dat": b"x"}
    assert "a.dat" in env.target.final_dirs()


# -- publish failing for some items -------------------------------------------------------
def test_publish_failing_for_one_item_retries_that_item_only(tmp_path: Path) -> None:
    env = Env(tmp_path, retry_backoff="60")
    env.write("a.dat", b"a")
    env.write("b.dat", b"b")
    env.target.faults.publish_errors["b.dat"] = "Input/output error"

    env.cycle()

    assert [sorted(b) for b in env.target.sent] == [["a.dat", "b.dat"]]  # one batch
    assert env.target.final_files() == {"a.dat": b"a"}
    assert env.source_files() == {"b.dat": b"b"}
    assert [r.relpath for r in env.records("done")] == ["a.dat"]
    [b] = env.records("new")
    assert (b.relpath, b.attempts) == ("b.dat", 1)
    assert "Input/output error" in (b.last_error or "")
    assert b.not_before > time.time()  # waits out its backoff
    assert env.target.staged() == []  # the unpublished copy was discarded
    assert env.sender.backoff.step == 0  # an item problem never backs the target off


# -- a lost lease ------------------------------------------------------------------------
def test_a_sender_that_lost_its_lease_deletes_no_source(tmp_path: Path) -> None:
    # an owner on another host (a spool shared over NFS) is judged by its heartbeat
    env = Env(tmp_path, owner="farhost.4242.cafe")
    env.write("a.dat", b"mine?")
    env.write("b.dat", b"or yours?")
    later = time.time() + 10 * env.stream.outgoing.lease_seconds
    rival = Spool(env.stream.spool_dir, lease_seconds=env.stream.outgoing.lease_seconds,
                  clock=lambda: later).open()
    taken: list[int] = []

    def take_over() -> None:
        taken.append(rival.reclaim_expired())
        env.sender.stop()  # no later batch: only this one's commit is judged

    env.target.faults.between = take_over

    env.cycle()

    assert taken == [2]
    assert env.spool.lease_lost()
    assert env.source_files() == {"a.dat": b"mine?", "b.dat": b"or yours?"}
    # nor publishes anything: the new owner may have put a newer version in place
    assert env.target.final_files() == {} and env.target.staged() == []
    assert env.records("done") == []
    assert sorted(r.relpath for r in env.records("new")) == ["a.dat", "b.dat"]
    rival.close()


def test_a_sender_that_lost_its_lease_delivers_again_under_a_new_identity(
        tmp_path: Path) -> None:
    env = Env(tmp_path, owner="farhost.4242.cafe")
    env.write("a.dat", b"taken over")
    later = time.time() + 10 * env.stream.outgoing.lease_seconds
    rival = Spool(env.stream.spool_dir, lease_seconds=env.stream.outgoing.lease_seconds,
                  clock=lambda: later).open()
    env.target.faults.between = rival.reclaim_expired
    env.cycle()
    rival.close()  # the rival went away; its claims (none) are back in new/
    env.target.faults.between = None
    env.write("b.dat", b"new work")

    env.sender.run_once()

    assert env.source_files() == {}
    assert env.target.final_files() == {"a.dat": b"taken over", "b.dat": b"new work"}


# -- the state machine ----------------------------------------------------------------------
EXAMPLES = int(os.environ.get("MSTM_SENDER_EXAMPLES", "30"))
STEPS = int(os.environ.get("MSTM_SENDER_STEPS", "15"))
NAMES = ("a.dat", "b.dat", "sub/c.dat", "sub/deep/d.dat")
FAULTS = ("none", "unreachable", "die_in_send", "corrupt", "drop", "publish_error",
          "inspect_unavailable", "rewrite_between", "delete_between", "rewrite_before_send",
          "swap_parent_between", "swap_parent_before_send", "swap_parent_after_scan")
contents = st.binary(max_size=24).map(lambda b: b"v:" + b)  # never the outside b"OOO..."


class SenderMachine(RuleBasedStateMachine):
    """Sources come, change and go while deliveries run with faults; after every step
    nothing the user wrote is lost and the target holds only versions the user wrote."""

    mode = "move"
    unit = "file"
    names = NAMES

    def __init__(self) -> None:
        super().__init__()
        self.root = Path(tempfile.mkdtemp(prefix="mstm-sender-"))
        self.env = Env(self.root, mode=self.mode, unit=self.unit, retry_count=1)
        self.current: dict[str, bytes] = {}  # what the user last left at each path
        self.versions: dict[str, set[bytes]] = {}  # every version each path ever had
        self.outside = {"sub/x.dat": b"OUTSIDE"}
        for rel, data in self.outside.items():
            self.env.write(rel, data, where=self.env.outside)

    def teardown(self) -> None:
        try:
            self._drain()
        finally:
            self.env.spool.close()
            shutil.rmtree(self.root, ignore_errors=True)

    def _drain(self) -> None:
        """Without faults every source ends delivered, or parked in failed/ (kept)."""
        for _ in range(2):
            self.env.cycle()
        target = self.env.target.final_files()
        parked = {(r.relpath, r.size, r.mtime_ns) for r in self.env.records("failed")}
        parked_dirs = {r.relpath for r in self.env.records("failed") if r.is_dir}
        for name, data in self.current.items():
            path = self.env.src / name
            if path.exists():
                st = path.stat()
                if ((name, st.st_size, st.st_mtime_ns) in parked
                        or name.split("/")[0] in parked_dirs):
                    continue  # this very version failed: kept at the source
                assert self.mode == "mirror", f"{name}: neither delivered nor parked in failed/"
                # mirror: a rewrite keeping size and mtime is not seen (the same id)
                assert target.get(name) in self.versions[name], f"{name}: never delivered"
            else:
                assert target.get(name) == data, f"{name}: lost"

    # -- what the user does
    def _put(self, relpath: str, data: bytes, *, in_place: bool) -> None:
        path = self.env.src / relpath
        path.parent.mkdir(parents=True, exist_ok=True)
        if in_place and path.exists():
            with open(path, "r+b") as f:
                f.write(data)
                f.truncate()
        else:
            tmp = path.with_name("." + path.name + ".tmp")
            tmp.write_bytes(data)
            os.rename(tmp, path)
        self.current[relpath] = data
        self.versions.setdefault(relpath, set()).add(data)

    @initialize(data=contents)
    def first(self, data: bytes) -> None:
        self._put(self.names[0], data, in_place=False)

    @rule(which=st.integers(0, len(NAMES) - 1), data=contents, in_place=st.booleans())
    def write(self, which: int, data: bytes, in_place: bool) -> None:
        self._put(self.names[which], data, in_place=in_place)

    def _present(self, which: int) -> str | None:
        """One of the sources still there, picked by *which*.  What is drawn never depends
        on the file system (whether a source is still there depends on what the sender
        did, and hypothesis replays a case only if the same choices are drawn): an
        integer is drawn, and indexes the present sources modulo their number."""
        present = sorted(n for n in self.current if (self.env.src / n).exists())
        return present[which % len(present)] if present else None

    @rule(which=st.integers(0, len(NAMES) - 1))
    def delete(self, which: int) -> None:
        name = self._present(which)
        if name is not None:
            (self.env.src / name).unlink()
            del self.current[name]

    # -- a delivery, with one fault
    def _swap(self) -> None:
        """src/sub -> src/sub.moved, and src/sub a link to outside/sub, whose files have
        the same names, sizes and mtimes as the real ones (never the same bytes)."""
        sub = self.env.src / "sub"
        if not sub.is_dir() or sub.is_symlink():
            return
        for d, _dirs, names in os.walk(sub):
            for n in names:
                real = Path(d) / n
                rel = str(real.relative_to(self.env.src))
                st = real.stat()
                data = b"O" * st.st_size
                fake = self.env.write(rel, data, where=self.env.outside)
                os.utime(fake, ns=(st.st_atime_ns, st.st_mtime_ns))
                self.outside[rel] = data
        os.rename(sub, self.env.src / "sub.moved")
        os.symlink(self.env.outside / "sub", sub)

    def _unswap(self) -> None:
        sub = self.env.src / "sub"
        if sub.is_symlink():
            sub.unlink()
            os.rename(self.env.src / "sub.moved", sub)

    @rule(fault=st.sampled_from(FAULTS), draw=st.data(), data=contents)
    def deliver(self, fault: str, draw: st.DataObject, data: bytes) -> None:
        t, f = self.env.target, self.env.target.faults
        which = draw.draw(st.integers(0, len(self.names) - 1), label="victim")
        victim = self._present(which) or self.names[which]
        once: list[Callable[[], None]] = []

        def hook(action: Callable[[], None]) -> Callable[[], None]:
            def run() -> None:
                if not once:
                    once.append(action)
                    action()
            return run

        def rewrite() -> None:
            if victim in self.current:
                self._put(victim, data, in_place=True)

        def delete() -> None:
            if victim in self.current and (self.env.src / victim).exists():
                (self.env.src / victim).unlink()
                del self.current[victim]

        if fault == "unreachable":
            f.unreachable = "connection refused"
        elif fault == "die_in_send":
            f.die_in_send = 1
        elif fault in ("corrupt", "drop"):
            getattr(f, fault).add(victim)
        elif fault == "publish_error":
            item = victim if self.unit == "file" else victim.split("/")[0]
            f.publish_errors[item] = "Input/output error"
        elif fault == "inspect_unavailable":
            f.inspect_unavailable = "connection reset"
        elif fault == "rewrite_between":
            f.between = hook(rewrite)
        elif fault == "delete_between":
            f.between = hook(delete)
        elif fault == "rewrite_before_send":
            f.before_send = hook(rewrite)
        elif fault == "swap_parent_between":
            f.between = hook(self._swap)
        elif fault == "swap_parent_before_send":
            f.before_send = hook(self._swap)
        try:
            self.env.sender.scan_into_spool()
            if fault == "swap_parent_after_scan":
                self._swap()  # before the sender claims, re-checks and hashes
            self.env.sender.deliver_pending()
        finally:
            self._unswap()
            t.faults = type(f)()
            self.env.sender.backoff.succeeded()  # the next step may deliver at once

    # -- what must hold after every step
    @invariant()
    def nothing_is_lost(self) -> None:
        source = self.env.source_files()
        target = self.env.target.final_files()
        for name, data in self.current.items():
            if name in source:
                assert source[name] == data, f"{name}: the source was altered"
            else:
                assert target.get(name) == data, f"{name}: lost (neither at the source nor " \
                                                 f"at the target)"
            if self.mode == "mirror":
                assert name in source, f"{name}: deleted in mirror mode"
        assert set(source) <= set(self.current), "a source appeared that nobody wrote"

    @invariant()
    def the_target_holds_only_versions_the_user_wrote(self) -> None:
        for name, data in self.env.target.final_files().items():
            assert data in self.versions.get(name, set()), \
                f"{name}: the target holds bytes that never were a version of it"

    @invariant()
    def nothing_outside_is_touched(self) -> None:
        for rel, data in self.outside.items():
            path = self.env.outside / rel
            assert path.exists(), f"outside/{rel}: deleted through a link"
            assert path.read_bytes() == data, f"outside/{rel}: altered"

    @invariant()
    def every_failed_item_says_why(self) -> None:
        for r in self.env.records("failed"):
            assert r.last_error, f"{r.relpath}: in failed/ without a reason"
        assert not any(p.startswith(STAGING) for p in self.env.target.final_files())


class MirrorMachine(SenderMachine):
    mode = "mirror"


class DirectoryMachine(SenderMachine):
    """Directory units: "a", "b" and "sub" are the items, merged at the target."""

    unit = "dir"
    names = ("a/x.dat", "a/y.dat", "sub/c.dat", "sub/deep/d.dat")


_machine_settings: dict[str, Any] = dict(
    max_examples=EXAMPLES, stateful_step_count=STEPS, deadline=None, database=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much])
TestMoveNeverLosesAFile = SenderMachine.TestCase
TestMoveNeverLosesAFile.settings = settings(**_machine_settings)
TestMirrorNeverLosesAFile = MirrorMachine.TestCase
TestMirrorNeverLosesAFile.settings = settings(
    **{**_machine_settings, "max_examples": max(1, EXAMPLES // 3)})
TestDirectoryUnitsNeverLoseAFile = DirectoryMachine.TestCase
TestDirectoryUnitsNeverLoseAFile.settings = settings(
    **{**_machine_settings, "max_examples": max(1, EXAMPLES // 2)})
