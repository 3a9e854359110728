"""The spool: durable per-stream queue; every state change is one atomic rename."""

from __future__ import annotations

import base64
import hashlib
import json
import logging
import os
import socket
import subprocess
import sys
import threading
import time
from collections import defaultdict
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from mstm.spool import STATES, Claim, ItemRecord, Spool, SpoolBusy, SpoolError, item_id, owners
from mstm.spool import spool as spool_mod

LEASE = 60.0
BIG = 10**15  # max_bytes that never limits
HOST = owners.safe_host(socket.gethostname())


class Clock:
    """A fake clock the tests move by hand (forwards and backwards)."""

    def __init__(self, t: float = 1_700_000_000.0) -> None:
        self.t = t

    def __call__(self) -> float:
        return self.t

    def advance(self, seconds: float) -> None:
        self.t += seconds


@pytest.fixture
def clock() -> Clock:
    return Clock()


@pytest.fixture
def root(tmp_path: Path) -> Path:
    return tmp_path / "spool"


@pytest.fixture
def spool(root: Path, clock: Clock) -> Iterator[Spool]:
    s = Spool(root, lease_seconds=LEASE, clock=clock).open()
    yield s
    s.close()


def remote(root: Path, clock: Clock, name: str = "elsewhere") -> Spool:
    """A sender on another host: judged by its heartbeat, not by its pid."""
    return Spool(root, lease_seconds=LEASE, clock=clock, owner=f"{name}.4242.0badf00d").open()


def rec(relpath: str = "a.dat", size: int = 10, mtime_ns: int = 1, **kw: Any) -> ItemRecord:
    return ItemRecord(relpath=relpath, size=size, mtime_ns=mtime_ns, **kw)


def locate(root: Path) -> dict[str, list[str]]:
    """Item id -> every state directory holding a record of it."""
    found: dict[str, list[str]] = defaultdict(list)
    for state in STATES:
        for name in os.listdir(root / state):
            found[name.partition("@")[0]].append(state)
    return found


def assert_each_at_most_once(root: Path) -> dict[str, str]:
    found = locate(root)
    twice = {i: s for i, s in found.items() if len(s) > 1}
    assert not twice, f"items recorded more than once: {twice}"
    return {i: s[0] for i, s in found.items()}


def drain(s: Spool, clock: Clock) -> list[str]:
    """Claim and complete everything claimable (waiting out backoffs); completed ids."""
    completed: list[str] = []
    for _ in range(1000):
        claims = s.claim(max_items=100, max_bytes=BIG)
        if not claims:
            if s.counts()["new"] == 0:
                return completed
            clock.advance(3600)
            continue
        for c in claims:
            assert s.complete(c, sha256="0" * 64)
            completed.append(c.record.id)
    raise AssertionError("drain did not finish")


def dead_pid() -> int:
    p = subprocess.Popen([sys.executable, "-c", "pass"])
    p.wait()
    return p.pid


# ---------------------------------------------------------------------------- identity


def test_item_id_is_sha256_of_path_size_and_mtime() -> None:
    raw = b"dir/caf\xc3\xa9 \xff.nc"
    expected = hashlib.sha256(raw + b"\x00123\x00456").hexdigest()[:40]
    assert item_id(os.fsdecode(raw), 123, 456) == expected
    assert rec(os.fsdecode(raw), 123, 456).id == expected


def test_a_new_version_of_a_file_is_a_new_item(spool: Spool) -> None:
    assert spool.enqueue([rec("f", 1, 100)]) == 1
    assert spool.enqueue([rec("f", 1, 200)]) == 1
    assert spool.enqueue([rec("f", 2, 200)]) == 1
    assert spool.counts()["new"] == 3


# ---------------------------------------------------------------------------- layout


def test_open_creates_the_layout_with_mode_0750(root: Path, clock: Clock) -> None:
    old = os.umask(0o022)
    try:
        s = Spool(root, clock=clock).open()
    finally:
        os.umask(old)
    for d in ("tmp", "new", "claimed", "done", "failed", "owners"):
        assert (root / d).is_dir()
        assert (root / d).stat().st_mode & 0o777 == 0o750
    assert (root / "scan.lock").exists()
    assert (root / "owners" / s.owner).exists()
    s.close()
    assert not (root / "owners" / s.owner).exists()


def test_owner_name_is_host_pid_and_random(spool: Spool) -> None:
    host, pid, rnd = spool.owner.rsplit(".", 2)
    assert host == HOST and pid == str(os.getpid())
    assert len(rnd) == 8 and int(rnd, 16) >= 0
    assert Spool(spool.path).owner != spool.owner


def test_open_fails_with_spool_error_when_the_path_is_unusable(tmp_path: Path) -> None:
    (tmp_path / "file").write_text("x")
    with pytest.raises(SpoolError, match="not usable"):
        Spool(tmp_path / "file" / "spool").open()


def test_using_an_unopened_spool_is_an_error(root: Path) -> None:
    with pytest.raises(SpoolError, match="not open"):
        Spool(root).counts()


# ---------------------------------------------------------------------------- names

ODD_NAMES = [
    "plain.nc",
    "with space/and  two.txt",
    "line\nbreak.dat",
    "-leading-dash",
    "--",
    "tab\tand\rcr",
    "ünïcødé/日本語/ファイル.grib",
    "emoji 🛰.bin",
    os.fsdecode(b"latin1-\xe9t\xe9.txt"),
    os.fsdecode(b"bad\xff\xfe/\x80\x81.bin"),
    "back\\slash",
    "quote\"'s",
    "x" * 250,
]


@pytest.mark.parametrize("name", ODD_NAMES)
def test_names_round_trip_exactly(spool: Spool, root: Path, name: str) -> None:
    assert spool.enqueue([rec(name)]) == 1
    (stored,) = spool.iter_records("new")
    assert stored.relpath == name
    assert os.fsencode(stored.relpath) == os.fsencode(name)
    on_disk = json.loads((root / "new" / stored.id).read_bytes())
    assert base64.b64decode(on_disk["relpath_b64"]) == os.fsencode(name)
    assert "\n" not in on_disk["relpath"] or "\n" in name  # readable, JSON-escaped
    (c,) = spool.claim(max_items=1, max_bytes=BIG)
    assert c.record.relpath == name and c.record.id == item_id(name, 10, 1)
    assert spool.complete(c, sha256="ab" * 32)
    (done,) = spool.iter_records("done")
    assert done.relpath == name


@settings(
    max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(
    parts=st.lists(
        st.binary(min_size=1, max_size=20).filter(
            lambda b: b"/" not in b and b"\0" not in b and b not in (b".", b"..")
        ),
        min_size=1,
        max_size=3,
    )
)
def test_any_byte_string_name_round_trips(spool: Spool, parts: list[bytes]) -> None:
    name = os.fsdecode(b"/".join(parts))
    r = rec(name)
    spool.enqueue([r])
    got = {x.id: x for x in spool.iter_records("new")}
    assert os.fsencode(got[r.id].relpath) == b"/".join(parts)


@pytest.mark.parametrize("bad", ["", "/abs", "a/../b", "..", "a//b", "a/", "./a", "nul\0"])
def test_enqueue_rejects_unsafe_paths_and_enqueues_nothing(spool: Spool, bad: str) -> None:
    with pytest.raises(ValueError):
        spool.enqueue([rec("fine"), rec(bad)])
    assert spool.counts()["new"] == 0


# ---------------------------------------------------------------------------- enqueue


def test_enqueue_is_idempotent_in_every_state(spool: Spool, clock: Clock) -> None:
    items = [rec(f"f{i}") for i in range(4)]
    assert spool.enqueue(items) == 4
    assert spool.enqueue(items) == 0
    c1, c2, _c3 = spool.claim(max_items=3, max_bytes=BIG)
    assert spool.complete(c1, sha256="0" * 64)
    assert spool.retry(c2, "boom", retry_count=0, backoff=1, backoff_max=1) == "failed"
    assert spool.enqueue(items) == 0  # new, claimed, done, failed
    assert spool.counts() == {"new": 1, "claimed": 1, "done": 1, "failed": 1}
    assert all(spool.known(r.id) for r in items)
    assert not spool.known(rec("other").id)


def test_enqueue_counts_duplicates_within_one_call_once(spool: Spool) -> None:
    assert spool.enqueue([rec("a"), rec("a"), rec("b")]) == 2


def test_enqueue_stamps_enqueued_at_from_the_clock(spool: Spool, clock: Clock) -> None:
    spool.enqueue([rec("a"), rec("b", enqueued_at=5.0)])
    got = {r.relpath: r.enqueued_at for r in spool.iter_records("new")}
    assert got == {"a": clock.t, "b": 5.0}


def test_enqueue_of_many_records_fsyncs_each_directory_once(
    spool: Spool, root: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    synced: list[str] = []
    real = spool_mod.fsync_dir
    monkeypatch.setattr(spool_mod, "fsync_dir", lambda d: (synced.append(d), real(d)))
    assert spool.enqueue(rec(f"d/{i}") for i in range(2000)) == 2000
    assert synced == [str(root / "new")]
    assert spool.counts()["new"] == 2000
    assert os.listdir(root / "tmp") == []


def test_enqueue_does_not_write_records_for_items_already_known(
    spool: Spool, monkeypatch: pytest.MonkeyPatch
) -> None:
    spool.enqueue([rec("a")])
    writes = []
    real = spool._write_tmp
    monkeypatch.setattr(spool, "_write_tmp", lambda *a, **k: (writes.append(1), real(*a, **k))[1])
    assert spool.enqueue([rec("a")]) == 0
    assert writes == []


# ---------------------------------------------------------------------------- claim


def test_claim_returns_oldest_enqueued_first(spool: Spool, clock: Clock) -> None:
    for name in ("c", "a", "d", "b"):
        spool.enqueue([rec(name)])
        clock.advance(1)
    got = [c.record.relpath for c in spool.claim(max_items=10, max_bytes=BIG)]
    assert got == ["c", "a", "d", "b"]


def test_claim_respects_max_items_and_max_bytes(spool: Spool) -> None:
    spool.enqueue(rec(f"f{i}", size=100, enqueued_at=i + 1.0) for i in range(10))
    assert len(spool.claim(max_items=3, max_bytes=BIG)) == 3
    assert [c.record.relpath for c in spool.claim(max_items=10, max_bytes=250)] == ["f3", "f4"]
    assert len(spool.claim(max_items=10, max_bytes=300)) == 3
    assert spool.counts()["new"] == 2


def test_claim_takes_one_item_even_if_it_alone_exceeds_max_bytes(spool: Spool) -> None:
    spool.enqueue([rec("huge", size=10**12, enqueued_at=1.0), rec("small", size=1)])
    (c,) = spool.claim(max_items=10, max_bytes=1000)
    assert c.record.relpath == "huge"


def test_claim_skips_records_until_not_before(spool: Spool, clock: Clock) -> None:
    spool.enqueue([rec("later", not_before=clock.t + 100), rec("now")])
    assert [c.record.relpath for c in spool.claim(max_items=10, max_bytes=BIG)] == ["now"]
    assert spool.claim(max_items=10, max_bytes=BIG) == []
    clock.advance(100)
    assert [c.record.relpath for c in spool.claim(max_items=10, max_bytes=BIG)] == ["later"]


def test_claim_path_names_the_item_and_the_owner(spool: Spool, root: Path) -> None:
    spool.enqueue([rec("a")])
    (c,) = spool.claim(max_items=1, max_bytes=BIG)
    assert isinstance(c, Claim)
    assert c.path == root / "claimed" / f"{c.record.id}@{spool.owner}"
    assert c.path.exists() and not (root / "new" / c.record.id).exists()


def test_claim_by_two_owners_never_returns_the_same_item_twice(root: Path, clock: Clock) -> None:
    a = Spool(root, clock=clock).open()
    b = Spool(root, clock=clock).open()
    a.enqueue(rec(f"f{i}") for i in range(300))
    got: dict[str, list[str]] = {a.owner: [], b.owner: []}

    def work(s: Spool) -> None:
        while claims := s.claim(max_items=7, max_bytes=BIG):
            got[s.owner].extend(c.record.id for c in claims)

    threads = [threading.Thread(target=work, args=(s,)) for s in (a, b)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    everything = got[a.owner] + got[b.owner]
    assert len(everything) == 300 == len(set(everything))
    assert a.counts() == {"new": 0, "claimed": 300, "done": 0, "failed": 0}


def test_claim_over_many_waiting_records_reads_about_one_batch(
    spool: Spool, clock: Clock, monkeypatch: pytest.MonkeyPatch
) -> None:
    spool.enqueue(rec(f"f{i}") for i in range(3000))
    spool.enqueue(rec(f"later{i}", not_before=clock.t + 50) for i in range(50))
    reads = []
    real = spool._read
    monkeypatch.setattr(spool, "_read", lambda *a: (reads.append(a[0]), real(*a))[1])
    assert len(spool.claim(max_items=10, max_bytes=BIG)) == 10
    assert len(reads) == 20  # each claimed record is read before and after its rename
    # Records in backoff are read once, then remembered until they are due.
    clock.advance(10)
    while spool.claim(max_items=500, max_bytes=BIG):
        pass
    reads.clear()
    assert spool.claim(max_items=500, max_bytes=BIG) == []
    assert reads == []


# ---------------------------------------------------------------------------- complete, retry


def test_complete_moves_the_record_to_done_with_its_sha256(
    spool: Spool, root: Path, clock: Clock
) -> None:
    spool.enqueue([rec("a")])
    (c,) = spool.claim(max_items=1, max_bytes=BIG)
    clock.advance(5)
    assert spool.complete(c, sha256="ab" * 32) is True
    assert not c.path.exists()
    (done,) = spool.iter_records("done")
    assert done.sha256 == "ab" * 32 and done.completed_at == clock.t
    assert (root / "done" / done.id).stat().st_mtime == pytest.approx(clock.t)
    assert os.listdir(root / "tmp") == []


def test_retry_counts_attempts_and_backs_off_exponentially_with_jitter(
    spool: Spool, clock: Clock
) -> None:
    spool.enqueue([rec("a")])
    limits = {"retry_count": 4, "backoff": 10.0, "backoff_max": 25.0}
    expected_delays = [10.0, 20.0, 25.0]
    for attempt, delay in enumerate(expected_delays, start=1):
        (c,) = spool.claim(max_items=1, max_bytes=BIG)
        assert c.record.attempts == attempt - 1
        assert spool.retry(c, f"mismatch {attempt}", **limits) == "queued"
        (waiting,) = spool.iter_records("new")
        assert waiting.attempts == attempt
        assert waiting.last_error == f"mismatch {attempt}"
        assert clock.t + delay * 0.5 <= waiting.not_before <= clock.t + delay
        assert spool.claim(max_items=1, max_bytes=BIG) == []  # backing off
        clock.t = waiting.not_before
    (c,) = spool.claim(max_items=1, max_bytes=BIG)
    assert spool.retry(c, "still wrong", **limits) == "failed"
    (failed,) = spool.iter_records("failed")
    assert failed.attempts == 4 and failed.last_error == "still wrong"
    assert spool.counts() == {"new": 0, "claimed": 0, "done": 0, "failed": 1}


def test_retry_jitter_spreads_delays(spool: Spool, clock: Clock) -> None:
    spool.enqueue(rec(f"f{i}") for i in range(40))
    for c in spool.claim(max_items=40, max_bytes=BIG):
        spool.retry(c, "x", retry_count=5, backoff=100, backoff_max=1000)
    delays = [r.not_before - clock.t for r in spool.iter_records("new")]
    assert all(50 <= d <= 100 for d in delays)
    assert max(delays) - min(delays) > 10


def test_retry_reason_with_undecodable_bytes_is_stored(spool: Spool) -> None:
    spool.enqueue([rec("a")])
    (c,) = spool.claim(max_items=1, max_bytes=BIG)
    reason = "cannot read " + os.fsdecode(b"\xff.bin")
    assert spool.retry(c, reason, retry_count=0, backoff=1, backoff_max=1) == "failed"
    (failed,) = spool.iter_records("failed")
    assert failed.last_error is not None and "cannot read" in failed.last_error


def test_release_returns_the_record_unchanged_without_counting_an_attempt(
    spool: Spool, root: Path
) -> None:
    spool.enqueue([rec("a")])
    before = (root / "new" / rec("a").id).read_bytes()
    (c,) = spool.claim(max_items=1, max_bytes=BIG)
    spool.release(c)
    assert (root / "new" / rec("a").id).read_bytes() == before
    (c,) = spool.claim(max_items=1, max_bytes=BIG)
    assert c.record.attempts == 0


def test_drop_removes_the_record(spool: Spool, caplog: pytest.LogCaptureFixture) -> None:
    spool.enqueue([rec("a")])
    (c,) = spool.claim(max_items=1, max_bytes=BIG)
    with caplog.at_level(logging.INFO, "mstm.spool"):
        spool.drop(c, "source vanished")
    assert spool.counts() == {"new": 0, "claimed": 0, "done": 0, "failed": 0}
    assert "source vanished" in caplog.text
    assert not spool.known(c.record.id)


# ---------------------------------------------------------------------------- leases


def test_complete_after_lease_loss_returns_false_and_leaves_the_record_for_the_new_owner(
    root: Path, clock: Clock, caplog: pytest.LogCaptureFixture
) -> None:
    slow = remote(root, clock)
    slow.enqueue([rec("a"), rec("b")])
    claims = slow.claim(max_items=2, max_bytes=BIG)
    clock.advance(LEASE + 1)  # slow is silent for longer than its lease
    other = Spool(root, lease_seconds=LEASE, clock=clock).open()
    with caplog.at_level(logging.WARNING, "mstm.spool"):
        assert other.reclaim_expired() == 2
    assert f"took over 2 claim(s) of {slow.owner}" in caplog.text
    assert slow.heartbeat() is False and slow.lease_lost()
    assert slow.complete(claims[0], sha256="0" * 64) is False
    assert slow.retry(claims[1], "x", retry_count=0, backoff=1, backoff_max=1) == "queued"
    assert slow.counts() == {"new": 2, "claimed": 0, "done": 0, "failed": 0}
    assert sorted(drain(other, clock)) == sorted([rec("a").id, rec("b").id])
    assert other.counts()["done"] == 2


def test_owner_that_lost_its_lease_continues_under_a_new_name(root: Path, clock: Clock) -> None:
    slow = remote(root, clock)
    clock.advance(LEASE + 1)
    Spool(root, lease_seconds=LEASE, clock=clock).open().reclaim_expired()
    assert slow.lease_lost()
    old = slow.owner
    slow.enqueue([rec("a")])
    (c,) = slow.claim(max_items=1, max_bytes=BIG)
    assert slow.owner != old and not slow.lease_lost()
    assert c.path.name.endswith("@" + slow.owner)
    assert (root / "owners" / slow.owner).exists()


def test_live_owner_on_this_host_is_never_reclaimed_even_after_a_clock_jump(
    root: Path, clock: Clock
) -> None:
    local = Spool(root, lease_seconds=LEASE, clock=clock).open()
    local.enqueue([rec("a")])
    local.claim(max_items=1, max_bytes=BIG)
    clock.advance(100 * LEASE)
    assert Spool(root, lease_seconds=LEASE, clock=clock).open().reclaim_expired() == 0
    assert local.heartbeat()


def test_dead_pid_on_this_host_is_reclaimed_at_once(
    root: Path, clock: Clock, caplog: pytest.LogCaptureFixture
) -> None:
    pid = dead_pid()
    gone = Spool(root, clock=clock, owner=f"{HOST}.{pid}.0000beef").open()
    gone.enqueue([rec("a"), rec("b"), rec("c")])
    gone.claim(max_items=3, max_bytes=BIG)
    other = Spool(root, clock=clock).open()
    with caplog.at_level(logging.WARNING, "mstm.spool"):
        assert other.reclaim_expired() == 3  # heartbeat is fresh; the pid decides
    assert f"process {pid} is gone" in caplog.text
    assert not (root / "owners" / gone.owner).exists()


def test_reused_pid_on_this_host_is_recognised_as_a_new_process(root: Path, clock: Clock) -> None:
    old = Spool(root, clock=clock).open()  # our own pid, alive
    old.enqueue([rec("a")])
    old.claim(max_items=1, max_bytes=BIG)
    owner_file = root / "owners" / old.owner
    info = json.loads(owner_file.read_text())
    assert isinstance(info["start_ticks"], int)
    info["start_ticks"] -= 1  # the file was written by an earlier process with our pid
    owner_file.write_text(json.dumps(info))
    assert Spool(root, clock=clock).open().reclaim_expired() == 1


def test_our_own_claims_are_never_reclaimed(root: Path, clock: Clock) -> None:
    me = remote(root, clock)
    me.enqueue([rec("a")])
    me.claim(max_items=1, max_bytes=BIG)
    clock.advance(10 * LEASE)
    assert me.reclaim_expired() == 0


def test_backward_clock_jump_never_makes_a_live_lease_look_expired(
    root: Path, clock: Clock
) -> None:
    owner = remote(root, clock)
    owner.enqueue([rec("a")])
    owner.claim(max_items=1, max_bytes=BIG)
    other = Spool(root, lease_seconds=LEASE, clock=clock).open()
    clock.advance(-10 * LEASE)  # every process's clock steps back
    assert other.reclaim_expired() == 0  # before the owner beats again
    for _ in range(60):  # the owner keeps beating, past the old time and beyond
        clock.advance(LEASE / 4)
        assert owner.heartbeat()
        assert other.reclaim_expired() == 0


def test_forward_clock_jump_expires_owners_on_other_hosts_that_are_silent(
    root: Path, clock: Clock
) -> None:
    owner = remote(root, clock)
    owner.enqueue([rec("a")])
    owner.claim(max_items=1, max_bytes=BIG)
    other = Spool(root, lease_seconds=LEASE, clock=clock).open()
    clock.advance(LEASE / 2)
    assert other.reclaim_expired() == 0
    clock.advance(LEASE)
    assert other.reclaim_expired() == 1


def test_heartbeat_clamps_a_mark_left_in_the_future(root: Path, clock: Clock) -> None:
    owner = remote(root, clock)
    clock.advance(100 * LEASE)
    owner.heartbeat()  # clock stepped far forward...
    clock.advance(-100 * LEASE)  # ...and was corrected
    owner.heartbeat()
    assert (root / "owners" / owner.owner).stat().st_mtime == pytest.approx(clock.t + LEASE)


def test_heartbeat_thread_keeps_the_owner_file_fresh(root: Path) -> None:
    s = Spool(root, lease_seconds=0.2).open()
    owner_file = root / "owners" / s.owner
    os.utime(owner_file, (0, 0))
    s.start_heartbeat()
    try:
        deadline = time.monotonic() + 5
        while owner_file.stat().st_mtime == 0 and time.monotonic() < deadline:
            time.sleep(0.02)
        assert owner_file.stat().st_mtime > time.time() - 5
    finally:
        s.stop_heartbeat()
    os.utime(owner_file, (0, 0))
    time.sleep(0.15)
    assert owner_file.stat().st_mtime == 0  # stopped
    s.close()


def test_owner_without_claims_that_died_is_cleaned_up(root: Path, clock: Clock) -> None:
    ghost = remote(root, clock, "ghost")
    other = Spool(root, lease_seconds=LEASE, clock=clock).open()
    clock.advance(LEASE + 1)
    assert other.reclaim_expired() == 0
    assert not (root / "owners" / ghost.owner).exists()
    clock.advance(owners.EXPIRED_MAX_AGE + 1)
    other.reclaim_expired()
    assert sorted(os.listdir(root / "owners")) == [other.owner]


def test_stale_tmp_files_are_removed_after_an_hour(spool: Spool, root: Path, clock: Clock) -> None:
    stale = spool._write_tmp(b"half a record")
    foreign = root / "tmp" / "not-ours"
    foreign.write_text("x")
    os.utime(foreign, (clock.t - 2 * 3600, clock.t - 2 * 3600))
    clock.advance(1800)
    fresh = spool._write_tmp(b"in flight")
    spool.reclaim_expired()
    assert os.path.exists(stale) and os.path.exists(fresh) and not foreign.exists()
    clock.advance(1801)
    spool.reclaim_expired()
    assert not os.path.exists(stale) and os.path.exists(fresh)


def test_close_hands_back_claims_still_held(root: Path, clock: Clock) -> None:
    s = Spool(root, clock=clock).open()
    s.enqueue([rec("a")])
    s.claim(max_items=1, max_bytes=BIG)
    s.close()
    other = Spool(root, clock=clock).open()
    assert other.counts() == {"new": 1, "claimed": 0, "done": 0, "failed": 0}
    assert os.listdir(root / "owners") == [other.owner]


# ---------------------------------------------------------------------------- corruption

CORRUPT = {
    "empty": b"",
    "truncated": b'{"format": 1, "relpath_b64": "YQ==", "si',
    "not json": b"\x00\xff\xfe garbage",
    "a list": b"[1, 2, 3]",
    "wrong types": b'{"relpath_b64": "YQ==", "size": "10", "mtime_ns": 1}',
    "bad base64": b'{"relpath_b64": "!!!", "size": 10, "mtime_ns": 1}',
    "another item": json.dumps({"relpath_b64": "Yg==", "size": 10, "mtime_ns": 1}).encode(),
}


def corrupt(path: Path, data: bytes) -> None:
    """Put an unreadable record at path.  The spool never writes a record file in place
    (and the entries of one chunk are links to one file), so a damaged record is a new
    file under the old name."""
    path.unlink()
    path.write_bytes(data)


@pytest.mark.parametrize("kind", sorted(CORRUPT))
def test_corrupt_record_is_quarantined_with_a_warning(
    spool: Spool, root: Path, kind: str, caplog: pytest.LogCaptureFixture
) -> None:
    spool.enqueue([rec("a"), rec("good", enqueued_at=1.0)])
    corrupt(root / "new" / rec("a").id, CORRUPT[kind])
    with caplog.at_level(logging.WARNING, "mstm.spool"):
        claims = spool.claim(max_items=10, max_bytes=BIG)
    assert [c.record.relpath for c in claims] == ["good"]
    assert "unreadable record" in caplog.text
    (moved,) = os.listdir(root / "corrupt")
    assert moved.startswith(f"new.{rec('a').id}.")
    assert not spool.known(rec("a").id)
    assert spool.enqueue([rec("a")]) == 1  # the scanner brings it back


def test_a_damaged_chunk_quarantines_each_of_its_items_which_are_then_enqueued_again(
    spool: Spool, root: Path
) -> None:
    spool.enqueue([rec("a"), rec("b"), rec("c")])
    (first, *_) = os.listdir(root / "new")
    with open(root / "new" / first, "r+b") as f:  # the one file all three links share
        f.write(b"\xff\xfe")
    assert spool.claim(max_items=10, max_bytes=BIG) == []
    assert len(os.listdir(root / "corrupt")) == 3
    assert spool.enqueue([rec("a"), rec("b"), rec("c")]) == 3
    assert len(spool.claim(max_items=10, max_bytes=BIG)) == 3


def test_an_enqueued_chunk_is_one_file_linked_once_per_item(spool: Spool, root: Path) -> None:
    spool.enqueue([rec(f"f{i}") for i in range(100)])
    inodes = {os.stat(root / "new" / n).st_ino for n in os.listdir(root / "new")}
    assert len(inodes) == 1
    assert os.listdir(root / "tmp") == []


def test_a_completed_batch_shares_one_done_file_and_keeps_each_sha256(
    spool: Spool, root: Path
) -> None:
    spool.enqueue([rec(f"f{i}") for i in range(50)])
    claims = spool.claim(max_items=50, max_bytes=BIG)
    assert spool.complete_many([(c, f"{i:064x}") for i, c in enumerate(claims)]) == [True] * 50
    assert os.listdir(root / "claimed") == [] and os.listdir(root / "tmp") == []
    inodes = {os.stat(root / "done" / n).st_ino for n in os.listdir(root / "done")}
    assert len(inodes) == 1
    got = {r.relpath: r.sha256 for r in spool.iter_records("done")}
    assert got == {c.record.relpath: f"{i:064x}" for i, c in enumerate(claims)}


def test_a_record_replaced_on_a_reused_inode_is_not_read_from_the_cache(
    spool: Spool, root: Path
) -> None:
    spool.enqueue([rec("a")])
    (c,) = spool.claim(max_items=1, max_bytes=BIG)
    first = spool.iter_records("claimed")
    assert [r.attempts for r in first] == [0]
    for n in range(1, 6):  # each retry replaces the file; inode numbers get reused
        assert spool.retry(c, "x", retry_count=99, backoff=0, backoff_max=0) == "queued"
        (c,) = spool.claim(max_items=1, max_bytes=BIG)
        assert c.record.attempts == n


def test_corrupt_records_are_quarantined_when_listed(spool: Spool, root: Path) -> None:
    spool.enqueue([rec("a"), rec("b")])
    (c, _) = spool.claim(max_items=2, max_bytes=BIG)
    spool.complete(c, sha256="0" * 64)
    corrupt(root / "done" / c.record.id, b"{")
    assert list(spool.iter_records("done")) == []
    assert len(list(spool.iter_records("claimed"))) == 1
    assert len(os.listdir(root / "corrupt")) == 1


@pytest.mark.parametrize("name", ["no-owner", f"{'a' * 40}@..", f"{'a' * 40}@", "short@x.1.2"])
def test_malformed_claim_names_are_quarantined_by_reclaim(
    spool: Spool, root: Path, name: str
) -> None:
    (root / "claimed" / name).write_text("{}")
    assert spool.reclaim_expired() == 0
    assert os.listdir(root / "claimed") == []
    assert len(os.listdir(root / "corrupt")) == 1


def test_iter_records_rejects_unknown_states(spool: Spool) -> None:
    with pytest.raises(ValueError):
        list(spool.iter_records("tmp"))


# ---------------------------------------------------------------------------- upkeep


def test_retry_failed_puts_items_back_with_attempts_reset(spool: Spool) -> None:
    spool.enqueue(rec(f"f{i}") for i in range(3))
    for c in spool.claim(max_items=3, max_bytes=BIG):
        spool.retry(c, "nope", retry_count=0, backoff=1, backoff_max=1)
    assert spool.counts()["failed"] == 3
    assert spool.retry_failed([rec("f1").id, "not-an-id", rec("zzz").id]) == 1
    assert spool.retry_failed() == 2
    assert spool.counts() == {"new": 3, "claimed": 0, "done": 0, "failed": 0}
    records = list(spool.iter_records("new"))
    assert all(r.attempts == 0 and r.not_before == 0 for r in records)
    assert len(spool.claim(max_items=3, max_bytes=BIG)) == 3


def test_forget_done_deletes_done_records(spool: Spool, clock: Clock) -> None:
    spool.enqueue(rec(f"f{i}") for i in range(3))
    drain(spool, clock)
    assert spool.forget_done([rec("f0").id, rec("f1").id, rec("f9").id]) == 2
    assert [r.relpath for r in spool.iter_records("done")] == ["f2"]
    assert spool.enqueue([rec("f0")]) == 1  # forgotten: a new arrival again


def test_prune_done_deletes_records_completed_before_a_time(spool: Spool, clock: Clock) -> None:
    spool.enqueue([rec("early"), rec("late")])
    a, b = spool.claim(max_items=2, max_bytes=BIG)
    spool.complete(a, sha256="0" * 64)
    clock.advance(100)
    cutoff = clock.t
    clock.advance(100)
    spool.complete(b, sha256="0" * 64)
    assert spool.prune_done(cutoff) == 1
    assert [r.relpath for r in spool.iter_records("done")] == [b.record.relpath]


def test_counts_reports_every_state(spool: Spool) -> None:
    assert spool.counts() == {"new": 0, "claimed": 0, "done": 0, "failed": 0}


def test_state_json_round_trips(spool: Spool, root: Path) -> None:
    assert spool.load_state() == {}
    spool.save_state({"backoff": {"until": 12.5, "failures": 3}})
    assert spool.load_state() == {"backoff": {"until": 12.5, "failures": 3}}
    assert json.loads((root / "state.json").read_text())["backoff"]["failures"] == 3


def test_state_json_is_replaced_atomically(
    spool: Spool, root: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    spool.save_state({"v": 1})
    inode = (root / "state.json").stat().st_ino

    def crash(*a: Any) -> None:
        raise SimulatedCrash

    monkeypatch.setattr(os, "replace", crash)
    with pytest.raises(SimulatedCrash):
        spool.save_state({"v": 2, "pad": "x" * 100_000})
    monkeypatch.undo()
    assert spool.load_state() == {"v": 1}
    spool.save_state({"v": 3})
    assert (root / "state.json").stat().st_ino != inode  # replaced, never rewritten in place
    assert spool.load_state() == {"v": 3}


def test_corrupt_state_json_is_set_aside(
    spool: Spool, root: Path, caplog: pytest.LogCaptureFixture
) -> None:
    (root / "state.json").write_text('{"half":')
    with caplog.at_level(logging.WARNING, "mstm.spool"):
        assert spool.load_state() == {}
    assert "unreadable" in caplog.text
    assert not (root / "state.json").exists()


def test_scan_lock_is_exclusive(spool: Spool, root: Path, clock: Clock) -> None:
    other = Spool(root, clock=clock).open()
    with spool.scan_lock():
        with pytest.raises(SpoolBusy):
            with other.scan_lock():
                pass
    with other.scan_lock():
        pass


# ---------------------------------------------------------------------------- crashes


class SimulatedCrash(BaseException):
    """The process dies here (a BaseException: no `except OSError` may swallow it)."""


class Crasher:
    """Let `at` mutating system calls through, then die: every later one raises too.

    A crash during write() first writes half the buffer, as a real one may.
    """

    OPS = ("rename", "replace", "fsync", "utime", "unlink", "write")

    def __init__(self, at: int) -> None:
        self.at = at
        self.calls = 0
        self.crashed = False
        self.saved: dict[str, Callable[..., Any]] = {}

    def __enter__(self) -> Crasher:
        for name in self.OPS:
            self.saved[name] = real = getattr(os, name)
            setattr(os, name, self._wrap(name, real))
        return self

    def __exit__(self, *exc: object) -> None:
        for name, real in self.saved.items():
            setattr(os, name, real)

    def _wrap(self, name: str, real: Callable[..., Any]) -> Callable[..., Any]:
        def op(*args: Any, **kw: Any) -> Any:
            if not self.crashed and self.calls < self.at:
                self.calls += 1
                return real(*args, **kw)
            if not self.crashed and name == "write":
                fd, data = args
                real(fd, bytes(data)[: len(data) // 2])
            self.crashed = True
            raise SimulatedCrash

        return op


Scenario = Callable[[Spool, Clock], object]  # the transition to interrupt


def _prepare(root: Path, clock: Clock) -> Spool:
    """A victim (on another host, so its silence expires its lease) with one item in
    each state: f0 done, f1 failed, f2..f4 claimed by it, f5..f7 new."""
    v = remote(root, clock, "victim")
    v.enqueue(rec(f"f{i}", enqueued_at=float(i + 1)) for i in range(8))
    c0, c1 = v.claim(max_items=2, max_bytes=BIG)
    v.complete(c0, sha256="0" * 64)
    v.retry(c1, "bad", retry_count=0, backoff=1, backoff_max=1)
    v.claim(max_items=3, max_bytes=BIG)
    return v


def _held(v: Spool) -> list[Claim]:
    return sorted(
        (Claim(r, v.path / "claimed" / f"{r.id}@{v.owner}") for r in v.iter_records("claimed")),
        key=lambda c: c.record.relpath,
    )


def _ghost_claims(root: Path, clock: Clock) -> None:
    ghost = remote(root, clock, "ghost")
    ghost.claim(max_items=2, max_bytes=BIG)
    clock.advance(LEASE + 1)


SCENARIOS: dict[str, Scenario] = {
    "enqueue": lambda v, c: v.enqueue(rec(f"n{i}") for i in range(3)),
    "claim": lambda v, c: v.claim(max_items=3, max_bytes=BIG),
    "complete": lambda v, c: [v.complete(x, sha256="1" * 64) for x in _held(v)],
    "retry-queued": lambda v, c: [
        v.retry(x, "oops", retry_count=5, backoff=10, backoff_max=10) for x in _held(v)
    ],
    "retry-failed": lambda v, c: [
        v.retry(x, "oops", retry_count=0, backoff=10, backoff_max=10) for x in _held(v)
    ],
    "release": lambda v, c: [v.release(x) for x in _held(v)],
    "drop": lambda v, c: v.drop(_held(v)[0], "source vanished"),
    "retry_failed": lambda v, c: v.retry_failed(),
    "reclaim": lambda v, c: v.reclaim_expired(),
    "heartbeat": lambda v, c: v.heartbeat(),
    "close": lambda v, c: v.close(),
}


@pytest.mark.parametrize("scenario", sorted(SCENARIOS))
def test_crash_at_every_step_of_a_transition_loses_and_duplicates_nothing(
    tmp_path: Path, scenario: str
) -> None:
    for at in range(200):
        clock = Clock()
        root = tmp_path / f"{scenario}-{at}"
        victim = _prepare(root, clock)
        if scenario == "reclaim":
            _ghost_claims(root, clock)
        expected = set(locate(root))
        done_before = {i for i, s in locate(root).items() if s == ["done"]}
        with Crasher(at) as crasher:
            try:
                SCENARIOS[scenario](victim, clock)
            except SimulatedCrash:
                pass
        # At the instant of the crash: nothing is recorded twice.
        assert_each_at_most_once(root)
        # A new sender starts after the victim's lease ran out and recovers everything.
        clock.advance(LEASE + 1)
        s = Spool(root, lease_seconds=LEASE, clock=clock).open()
        s.reclaim_expired()
        states = assert_each_at_most_once(root)
        assert states.get(rec("f1").id) in ("failed", "new")  # retry_failed may have run
        if scenario == "enqueue":
            s.enqueue(rec(f"n{i}") for i in range(3))  # the scanner's next pass
            expected |= {rec(f"n{i}").id for i in range(3)}
        drain(s, clock)
        final = assert_each_at_most_once(root)
        lost = expected - set(final)
        if scenario == "drop":
            lost.discard(_held_id(2))  # dropped on purpose (or not, if it crashed first)
        assert not lost, f"crash before op {at}: lost {lost}"
        assert set(final) <= expected | {rec(f"n{i}").id for i in range(3)}
        assert all(final[i] == "done" for i in done_before), "a done item came back"
        assert {final[i] for i in final} <= {"done", "failed"}
        assert not (root / "corrupt").exists(), "a crash produced an unreadable record"
        clock.advance(2 * 3600)
        s.reclaim_expired()
        assert os.listdir(root / "tmp") == [], "stale temporary files stay forever"
        s.close()
        if not crasher.crashed:
            assert at > 0
            return  # every step of this transition was interrupted once
    raise AssertionError("the transition never finished")


def _held_id(i: int) -> str:
    return rec(f"f{i}").id


def test_record_written_to_tmp_but_not_renamed_is_only_garbage(root: Path, clock: Clock) -> None:
    v = remote(root, clock, "victim")
    (root / "tmp" / f"{int(clock.t * 1e9)}.{v.owner}.0").write_bytes(b'{"half"')
    clock.advance(LEASE + 1)
    s = Spool(root, lease_seconds=LEASE, clock=clock).open()
    assert s.reclaim_expired() == 0
    assert s.counts() == {"new": 0, "claimed": 0, "done": 0, "failed": 0}
    assert s.enqueue([rec("a")]) == 1
    clock.advance(3601)
    s.reclaim_expired()
    assert os.listdir(root / "tmp") == []


def test_takeover_interrupted_after_the_owner_file_was_renamed_is_finished_later(
    root: Path, clock: Clock
) -> None:
    pid = dead_pid()
    gone = Spool(root, clock=clock, owner=f"{HOST}.{pid}.0000beef").open()
    gone.enqueue([rec("a"), rec("b")])
    gone.claim(max_items=2, max_bytes=BIG)
    marker = f"{gone.owner}.expired-{int(clock.t)}"
    os.rename(root / "owners" / gone.owner, root / "owners" / marker)
    # Even if the pid is reused by now, the marker says the takeover had begun.
    s = Spool(root, clock=clock).open()
    assert s.reclaim_expired() == 2
    assert s.counts()["new"] == 2


# ---------------------------------------------------------------------------- deep queues


def test_a_claim_from_a_deep_queue_keeps_only_a_few_batches_of_names(spool: Spool) -> None:
    spool.enqueue(rec(f"f{i:05}", enqueued_at=1.0 + i) for i in range(6000))
    claims = spool.claim(max_items=10, max_bytes=BIG)
    assert [c.record.relpath for c in claims] == [f"f{i:05}" for i in range(10)]
    assert len(spool._queue) <= 4096  # not 6,000 names held between claims
    got = [c.record.relpath for _ in range(3) for c in spool.claim(max_items=10, max_bytes=BIG)]
    assert got == [f"f{i:05}" for i in range(10, 40)]


def test_items_queued_after_a_listing_are_claimed_after_the_older_ones(spool: Spool) -> None:
    spool.enqueue(rec(f"old{i}", enqueued_at=1.0 + i) for i in range(20))
    assert len(spool.claim(max_items=5, max_bytes=BIG)) == 5
    spool.enqueue([rec("young", enqueued_at=100.0)])
    got = [c.record.relpath for c in spool.claim(max_items=100, max_bytes=BIG)]
    assert got == [f"old{i}" for i in range(5, 20)] + ["young"]


def test_a_released_batch_is_claimed_again_before_younger_items(spool: Spool) -> None:
    spool.enqueue(rec(f"f{i}", enqueued_at=1.0 + i) for i in range(20))
    first = spool.claim(max_items=5, max_bytes=BIG)
    for c in first:
        spool.release(c)
    got = [c.record.relpath for c in spool.claim(max_items=5, max_bytes=BIG)]
    assert got == [f"f{i}" for i in range(5)]


def test_a_retried_item_is_claimed_once_its_backoff_is_over(spool: Spool, clock: Clock) -> None:
    spool.enqueue(rec(f"f{i}", enqueued_at=1.0 + i) for i in range(3))
    (c, *_) = spool.claim(max_items=1, max_bytes=BIG)
    assert spool.retry(c, "x", retry_count=3, backoff=10, backoff_max=10) == "queued"
    assert [c.record.relpath for c in spool.claim(max_items=9, max_bytes=BIG)] == ["f1", "f2"]
    assert spool.claim(max_items=9, max_bytes=BIG) == []
    clock.t += 11
    assert [c.record.relpath for c in spool.claim(max_items=9, max_bytes=BIG)] == ["f0"]


def test_a_spool_written_by_the_previous_version_is_read_and_completed(
    spool: Spool, root: Path
) -> None:
    """Before chunk files, each record was its own pretty-printed JSON file."""
    r = rec("old.dat", enqueued_at=5.0)
    obj = {"format": 1, "id": r.id, "relpath": "old.dat", "relpath_b64": "b2xkLmRhdA==",
           "size": r.size, "mtime_ns": r.mtime_ns, "is_dir": False, "attempts": 0,
           "not_before": 0.0, "last_error": None, "enqueued_at": 5.0, "sha256": None,
           "completed_at": 0.0}
    (root / "new" / r.id).write_text(json.dumps(obj, indent=1) + "\n")
    (c,) = spool.claim(max_items=5, max_bytes=BIG)
    assert c.record == r
    assert spool.complete(c, sha256="ab" * 32)
    (done,) = spool.iter_records("done")
    assert done.relpath == "old.dat" and done.sha256 == "ab" * 32


def test_due_items_behind_more_than_a_listings_worth_of_waiting_ones_are_still_claimed(
    spool: Spool, clock: Clock
) -> None:
    """After clock steps, due records can sort behind many not-yet-due ones (a record's
    due time orders it): the claim lists again without the ones it learned are waiting."""
    spool.enqueue(rec(f"w{i:04d}", enqueued_at=clock.t) for i in range(4200))
    for c in spool.claim(max_items=5000, max_bytes=BIG):
        assert spool.retry(c, "x", retry_count=9, backoff=1000, backoff_max=1000) == "queued"
    clock.t += 5000  # forward: the fresh items are stamped later than the retries' due times
    spool.enqueue([rec("fresh1"), rec("fresh2")])
    clock.t -= 4990  # and back again, after the retries: those wait, the fresh are due
    got = [c.record.relpath for c in spool.claim(max_items=10, max_bytes=BIG)]
    assert sorted(got) == ["fresh1", "fresh2"]


def test_an_unusable_spool_stops_a_command_with_exit_74_in_one_line(tmp_path: Path) -> None:
    """A spool it cannot use (here owners/ is a file) is the operator's to fix, not a bug:
    EX_IOERR and the spool's name, never "internal error" (70) or a traceback."""
    import subprocess
    import sys

    for d in ("src", "spool/proj1", "target"):
        (tmp_path / d).mkdir(parents=True)
    (tmp_path / "global.ini").write_text(
        f"[global]\ndata_stream_list = proj1\nspool_base_dir = {tmp_path / 'spool'}\n"
        f"runtime_dir = {tmp_path / 'run'}\n")
    (tmp_path / "proj1.ini").write_text(
        f"[data_stream]\ndirectory = {tmp_path / 'src'}\n[outgoing]\n"
        f"transfer_protocol = local\ntarget_dir = {tmp_path / 'target'}\n"
        "transfer_mode = move\n")
    (tmp_path / "spool" / "proj1" / "owners").write_text("not a directory")
    r = subprocess.run([str(Path(sys.executable).parent / "mstm-send"), "--config",
                        str(tmp_path / "global.ini"), "--once", "proj1"],
                       capture_output=True, text=True, timeout=60, check=False)
    assert r.returncode == 74, r.stderr
    assert "Traceback" not in r.stderr and len(r.stderr.strip().splitlines()) == 1
    assert "spool" in r.stderr and "not usable" in r.stderr


def test_update_state_loses_no_update_of_processes_writing_state_json_at_once(
        root: Path) -> None:
    """The backoff, the stuck list, the totals and the pruning time are written by several
    processes sharing a spool: a read-modify-write under state.lock keeps every one."""
    path = root / "shared"
    Spool(path).open().close()
    script = (
        "import sys\n"
        "from mstm.spool import Spool\n"
        "s = Spool(sys.argv[1]).open()\n"
        "key = sys.argv[2]\n"
        "def add(state):\n"
        "    state[key] = state.get(key, 0) + 1\n"
        "    state['total'] = state.get('total', 0) + 1\n"
        "for _ in range(40):\n"
        "    s.update_state(add)\n"
        "s.close()\n")
    procs = [subprocess.Popen([sys.executable, "-c", script, str(path), f"p{n}"],
                              env={**os.environ, "PYTHONPATH": str(Path(__file__).parents[2]
                                                                   / "cmds")})
             for n in range(4)]
    assert [p.wait(timeout=60) for p in procs] == [0, 0, 0, 0]
    with Spool(path).open() as s:
        state = s.load_state()
    assert state["total"] == 160
    assert [state[f"p{n}"] for n in range(4)] == [40, 40, 40, 40]
