"""mstm.receive: verify, publish and answer; every named attack on the incoming area.

Layout of each test: ``tmp_path/published`` is the stream's directory D, the incoming
area I is ``D/.mstm-incoming``, and ``tmp_path/outside`` is what an attacker aims at:
it is snapshotted (and watched with inotify) to prove nothing outside I and D is ever
read, written or deleted.
"""

from __future__ import annotations

import collections
import dataclasses
import errno
import hashlib
import json
import logging
import os
import stat
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import inotify_simple
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from mstm import protocol as p
from mstm import receive as rx
from mstm import safefs
from mstm.protocol import ControlItem, Status
from mstm.receive import Receiver, Settings
from mstm.receive import abandoned as rx_abandoned
from mstm.receive import areas as rx_areas
from mstm.receive import batch as rx_batch
from mstm.receive import cleanup as rx_cleanup
from mstm.receive import mistamover as rx_mistamover
from mstm.receive import receiver as rx_receiver
from mstm.receive import survey as rx_survey

BIN = Path(sys.executable).parent
RCPT, CTRL, THANKS = "mstm-rcpt", "mstm-ctrl", "mstm-thanks"


def sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


class Site:
    """A receiving stream in tmp_path, and the things a sender (or attacker) does."""

    def __init__(self, root: Path, *, overwrite: bool = False,
                 incoming: Path | None = None) -> None:
        self.root = root
        self.D = root / "published"
        self.D.mkdir(exist_ok=True)
        self.I = incoming or self.D / ".mstm-incoming"
        self.outside = root / "outside"
        self.outside.mkdir(exist_ok=True)
        (self.outside / "secret").write_bytes(b"secret")
        self.settings = Settings(stream="t", directory=self.D, incoming_dir=self.I,
                                 overwrite=overwrite, poll_interval=0.2)
        self._receivers: list[Receiver] = []
        self.baseline()

    def baseline(self) -> None:
        """What outside I and D looks like now: the test's own set-up is done."""
        self.before = snapshot(self.root, [self.D])

    def receiver(self, **kw: object) -> Receiver:
        r = Receiver(self.settings, **kw).open()  # type: ignore[arg-type]
        self._receivers.append(r)
        return r

    def close(self) -> None:
        for r in self._receivers:
            r.close()

    def put(self, batch: str, files: dict[str, bytes]) -> list[ControlItem]:
        self.I.mkdir(parents=True, exist_ok=True)
        items = []
        for name, data in files.items():
            path = self.I / batch / os.fsencode(name).decode("utf-8", "surrogateescape")
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_bytes(data)
            items.append(ControlItem(name, len(data), sha(data)))
        return items

    def control(self, batch: str, items: list[ControlItem]) -> None:
        data = p.render_control(p.Control(batch, "sha256", f"{batch}.{RCPT}", tuple(items)))
        self.write(f"{batch}.{CTRL}", data)

    def write(self, name: str, data: bytes) -> None:
        self.I.mkdir(parents=True, exist_ok=True)
        tmp = self.I / f".{name}.tmp"
        tmp.write_bytes(data)
        tmp.rename(self.I / name)

    def send(self, files: dict[str, bytes], batch: str | None = None) -> str:
        batch = batch or p.new_batch_id()
        self.control(batch, self.put(batch, files))
        return batch

    def receipt(self, batch: str) -> dict[str, Status]:
        data = (self.I / f"{batch}.{RCPT}").read_bytes()
        return dict(p.parse_receipt(data, batch=batch).items)

    def thank(self, batch: str) -> None:
        self.write(f"{batch}.{THANKS}", p.render_thanks(batch))

    def published(self) -> dict[str, bytes]:
        """Every file in D outside I (relative path -> content); no symlink followed."""
        out: dict[str, bytes] = {}
        for dirpath, dirs, files in os.walk(self.D):
            here = Path(dirpath)
            dirs[:] = [d for d in dirs if here / d != self.I]
            for name in files:
                path = here / name
                if path.is_symlink():
                    out[str(path.relative_to(self.D))] = b"<symlink>"
                else:
                    out[str(path.relative_to(self.D))] = path.read_bytes()
        return out

    def incoming(self) -> list[str]:
        return sorted(os.listdir(self.I)) if self.I.exists() else []

    def quarantined(self) -> list[str]:
        q = self.I / ".quarantine"
        return sorted(os.listdir(q)) if q.exists() else []


def snapshot(root: Path, skip: list[Path]) -> dict[str, tuple[object, ...]]:
    """Everything under root except the *skip* trees: type, mode, size, times, content."""
    out: dict[str, tuple[object, ...]] = {}
    for dirpath, dirs, files in os.walk(root):
        here = Path(dirpath)
        dirs[:] = [d for d in dirs if here / d not in skip]
        for name in [*dirs, *files, "."]:
            path = here / name
            if path in skip:
                continue
            st = path.lstat()
            if stat.S_ISLNK(st.st_mode):
                extra: object = os.readlink(path)
            elif stat.S_ISREG(st.st_mode):
                extra = sha(path.read_bytes())
            else:
                extra = None
            out[str(path.relative_to(root))] = (st.st_mode, st.st_size, st.st_mtime_ns,
                                                st.st_ctime_ns, st.st_nlink, extra)
    return out


@pytest.fixture
def site(tmp_path: Path) -> Iterator[Site]:
    s = Site(tmp_path)
    yield s
    s.close()
    # nothing outside I and D was written or deleted, whatever the test did
    assert snapshot(tmp_path, [s.D]) == s.before


class Watch:
    """inotify on a directory and its files: did anyone so much as open them?"""

    MASK = (inotify_simple.flags.OPEN | inotify_simple.flags.ACCESS |
            inotify_simple.flags.MODIFY | inotify_simple.flags.CREATE |
            inotify_simple.flags.DELETE | inotify_simple.flags.MOVED_FROM |
            inotify_simple.flags.MOVED_TO | inotify_simple.flags.ATTRIB |
            inotify_simple.flags.CLOSE_WRITE)

    def __init__(self, *dirs: Path) -> None:
        self.ino = inotify_simple.INotify(nonblocking=True)
        for d in dirs:
            children = [c for c in d.iterdir() if not c.is_symlink()]  # before watching
            self.ino.add_watch(d, self.MASK)
            for child in children:
                self.ino.add_watch(child, self.MASK)

    def events(self) -> list[object]:
        try:
            return list(self.ino.read(timeout=0))
        finally:
            self.ino.close()


# --------------------------------------------------------------------------- good batches


def test_a_good_batch_is_published_and_every_item_answered_ok(site: Site) -> None:
    files = {f"obs/{i:03d}.nc": os.urandom(1000 + i) for i in range(50)}
    files["top.txt"] = b""
    r = site.receiver()
    batch = site.send(files)
    summary = r.run_once()
    assert (summary.batches, summary.ok, summary.failed) == (1, 51, 0)
    assert site.receipt(batch) == dict.fromkeys(files, Status.OK)
    assert site.published() == files
    assert list(site.receipt(batch)) == list(files)  # in the control file's order


def test_a_thank_you_removes_exactly_the_batch_files_and_leaves_the_area_empty(
        site: Site) -> None:
    r = site.receiver()
    batch = site.send({"a": b"1", "d/b": b"2"})
    r.run_once()
    assert site.incoming() == sorted([batch + "." + CTRL, batch + "." + RCPT, batch])
    site.thank(batch)
    assert r.run_once().thanked == 1
    assert site.incoming() == []  # no staging or temp leftovers either
    assert site.published() == {"a": b"1", "d/b": b"2"}


def test_names_with_newline_space_percent_and_bad_utf8_are_published_as_named(
        site: Site) -> None:
    files = {"new\nline": b"1", "sp ace/x y": b"2", "100%": b"3",
             os.fsdecode(b"latin-\xe9"): b"4", "tab\t": b"5"}
    r = site.receiver()
    batch = site.send(files)
    r.run_once()
    assert site.receipt(batch) == dict.fromkeys(files, Status.OK)
    assert sorted(os.listdir(os.fsencode(site.D))) == sorted(
        [b".mstm-incoming", b"new\nline", b"sp ace", b"100%", b"latin-\xe9", b"tab\t"])


def test_the_incoming_area_is_created_with_mode_0750(site: Site) -> None:
    site.receiver()
    assert stat.S_IMODE(site.I.stat().st_mode) == 0o750


def test_published_items_keep_their_mode(site: Site) -> None:
    r = site.receiver()
    batch = "b1"
    items = site.put(batch, {"x": b"exec"})
    (site.I / batch / "x").chmod(0o751)
    site.control(batch, items)
    r.run_once()
    assert stat.S_IMODE((site.D / "x").stat().st_mode) == 0o751


def test_a_control_file_already_answered_is_not_answered_again(site: Site) -> None:
    r = site.receiver()
    batch = site.send({"a": b"1"})
    r.run_once()
    first = (site.I / f"{batch}.{RCPT}").stat().st_mtime_ns
    assert r.run_once().batches == 0
    assert (site.I / f"{batch}.{RCPT}").stat().st_mtime_ns == first


def test_a_delivered_item_is_logged_with_structured_fields(
        site: Site, caplog: pytest.LogCaptureFixture) -> None:
    r = site.receiver()
    site.send({"obs.nc": b"12345"})
    with caplog.at_level(logging.INFO, logger="mstm"):
        r.run_once()
    rec = next(r for r in caplog.records if getattr(r, "mstm_event", None) == "delivered")
    assert rec.mstm_fields == {"stream": "t", "item": "obs.nc", "bytes": 5,  # type: ignore[attr-defined]
                               "result": "ok"}


# --------------------------------------------------------------------------- bad items


def test_each_kind_of_damage_gets_its_own_status(site: Site) -> None:
    r = site.receiver()
    batch = "b1"
    good, corrupt, short = os.urandom(3000), os.urandom(3000), os.urandom(3000)
    items = site.put(batch, {"good": good, "corrupt": corrupt, "short": short,
                             "gone": b"gone"})
    with open(site.I / batch / "corrupt", "r+b") as f:
        f.seek(1234)
        f.write(bytes([corrupt[1234] ^ 1]))
    os.truncate(site.I / batch / "short", 2000)
    (site.I / batch / "gone").unlink()
    site.control(batch, items)
    r.run_once()
    assert site.receipt(batch) == {"good": Status.OK, "corrupt": Status.BAD_CHECKSUM,
                                   "short": Status.BAD_SIZE, "gone": Status.MISSING}
    assert site.published() == {"good": good}  # nothing damaged is ever published


def test_a_batch_whose_directory_never_came_is_all_missing(site: Site) -> None:
    r = site.receiver()
    site.control("b1", [ControlItem("a", 1, sha(b"a")), ControlItem("b/c", 1, sha(b"c"))])
    r.run_once()
    assert site.receipt("b1") == {"a": Status.MISSING, "b/c": Status.MISSING}


def test_an_existing_different_file_is_refused_and_kept(site: Site) -> None:
    (site.D / "x").write_bytes(b"theirs")
    r = site.receiver()
    batch = site.send({"x": b"ours"})
    r.run_once()
    assert site.receipt(batch) == {"x": Status.REFUSED}
    assert (site.D / "x").read_bytes() == b"theirs"


def test_an_existing_identical_file_is_a_harmless_redelivery(site: Site) -> None:
    (site.D / "x").write_bytes(b"same")
    r = site.receiver()
    batch = site.send({"x": b"same"})
    r.run_once()
    assert site.receipt(batch) == {"x": Status.OK}


def test_with_overwrite_a_different_file_is_replaced(tmp_path: Path) -> None:
    s = Site(tmp_path, overwrite=True)
    (s.D / "x").write_bytes(b"old")
    r = s.receiver()
    batch = s.send({"x": b"new"})
    r.run_once()
    assert s.receipt(batch) == {"x": Status.OK}
    assert (s.D / "x").read_bytes() == b"new"
    s.close()


def test_a_directory_where_a_file_should_be_published_is_refused(site: Site) -> None:
    (site.D / "x").mkdir()
    r = site.receiver()
    batch = site.send({"x": b"data"})
    r.run_once()
    assert site.receipt(batch) == {"x": Status.REFUSED}


def test_items_aimed_at_the_incoming_area_itself_are_refused(site: Site) -> None:
    r = site.receiver()
    forged = p.render_control(p.Control("b9", "sha256", "b9.mstm-rcpt", ()))
    batch = site.send({".mstm-incoming/b9.mstm-ctrl": forged, "fine": b"ok"})
    r.run_once()
    assert site.receipt(batch) == {".mstm-incoming/b9.mstm-ctrl": Status.REFUSED,
                                   "fine": Status.OK}
    assert not (site.I / "b9.mstm-rcpt").exists()


def test_a_second_receiver_on_the_same_area_is_refused(site: Site) -> None:
    site.receiver()
    with pytest.raises(rx.AlreadyRunning):
        site.receiver()


# --------------------------------------------------------------------------- crash safety


def test_a_crash_between_staging_and_publishing_loses_nothing(
        site: Site, monkeypatch: pytest.MonkeyPatch) -> None:
    files = {f"f{i}": os.urandom(100) for i in range(10)}
    r = site.receiver()
    batch = site.send(files)
    real = rx_batch.rename_noreplace
    calls = []

    def crash_on_fifth(*a: object, **kw: object) -> None:
        calls.append(1)
        if len(calls) == 5:
            raise KeyboardInterrupt  # stands for SIGKILL at this instant
        real(*a, **kw)  # type: ignore[arg-type]

    monkeypatch.setattr(rx_batch, "rename_noreplace", crash_on_fifth)
    with pytest.raises(KeyboardInterrupt):
        r.run_once()
    r.close()
    monkeypatch.setattr(rx_batch, "rename_noreplace", real)
    assert not (site.I / f"{batch}.{RCPT}").exists()
    r2 = site.receiver()
    r2.run_once()
    assert site.receipt(batch) == dict.fromkeys(files, Status.OK)
    assert site.published() == files


def test_a_lost_receipt_is_written_again_and_says_ok_for_published_items(site: Site) -> None:
    r = site.receiver()
    batch = site.send({"a": b"1", "b": b"2"})
    r.run_once()
    (site.I / f"{batch}.{RCPT}").unlink()  # as if killed before the receipt's rename
    r.run_once()
    assert site.receipt(batch) == {"a": Status.OK, "b": Status.OK}


def test_leftover_temp_and_staging_files_of_a_crash_are_removed_at_start(site: Site) -> None:
    site.I.mkdir()
    (site.I / (rx_areas.TMP_PREFIX + "dead")).write_bytes(b"half a receipt")
    (site.I / rx_areas.STAGING / "gone-batch").mkdir(parents=True)
    site.receiver()
    assert site.incoming() == []


def test_leftover_staging_is_removed_periodically_too_and_only_our_own(site: Site) -> None:
    r = site.receiver()
    staging = site.I / rx_areas.STAGING
    (staging / "gone-batch").mkdir(parents=True)
    (staging / "gone-batch" / ("7-" + "f" * 40)).write_bytes(b"staged")
    (staging / "someone").mkdir()
    (staging / "someone" / "data").write_bytes(b"keep")
    r._last_expiry -= rx_receiver.EXPIRY_CHECK_SECONDS  # a minute later: the periodic look
    r.run_once()
    assert sorted(os.listdir(staging)) == ["someone"]
    assert (staging / "someone" / "data").read_bytes() == b"keep"


def test_replaced_trees_left_in_the_published_staging_area_are_removed_when_old(
        site: Site, monkeypatch: pytest.MonkeyPatch) -> None:
    staging = site.D / rx_areas.STAGING
    for name in (".replaced.4242", ".replaced.0123456789ab", ".replaced.0123456789ab.zip",
                 ".replaced.x", "run42"):
        (staging / name / "sub").mkdir(parents=True)
        (staging / name / "sub" / "f").write_bytes(b"old")
    site.receiver().close()
    assert len(os.listdir(staging)) == 5  # young: a publisher may still be at it
    monkeypatch.setattr(rx_cleanup, "REPLACED_SECONDS", 0.0)
    site.receiver()
    assert sorted(os.listdir(staging)) == [".replaced.x", "run42"]


def test_an_unexpected_error_in_one_batch_sets_it_aside_and_the_others_are_answered(
        site: Site, monkeypatch: pytest.MonkeyPatch,
        caplog: pytest.LogCaptureFixture) -> None:
    r = site.receiver()
    bad = site.send({"x": b"1"}, batch="a-bad")
    good = site.send({"y": b"2"}, batch="b-good")
    real = Receiver._answer

    def answer(self: Receiver, control: p.Control, summary: rx.Summary) -> None:
        if control.batch == bad:
            raise RuntimeError("a bug")
        real(self, control, summary)

    monkeypatch.setattr(Receiver, "_answer", answer)
    with caplog.at_level(logging.ERROR, logger="mstm"):
        summary = r.run_once()
    assert summary.quarantined == 2 and summary.ok == 1
    assert site.receipt(good) == {"y": Status.OK}
    assert not (site.I / bad).exists() and not (site.I / f"{bad}.{CTRL}").exists()
    q = site.quarantined()
    assert any(n.endswith(f"-{bad}") for n in q) and any(n.endswith(f"-{bad}.{CTRL}")
                                                         for n in q)
    assert any("RuntimeError: a bug" in rec.getMessage() for rec in caplog.records)
    r.run_once()  # and nothing more happens to it


def test_across_file_systems_items_are_copied_then_renamed(tmp_path: Path) -> None:
    shm = Path("/dev/shm")
    if not shm.is_dir() or shm.stat().st_dev == tmp_path.stat().st_dev:
        pytest.skip("needs /dev/shm on another file system")
    incoming = shm / f"mstm-test-{os.getpid()}-{time.monotonic_ns()}"
    try:
        s = Site(tmp_path, incoming=incoming)
        r = s.receiver()
        files = {"a/b": os.urandom(3 << 20), "c": b"small"}
        bad = s.put("b2", {"bad": b"good data"})
        (incoming / "b2" / "bad").write_bytes(b"evil data")
        s.control("b2", bad)
        batch = s.send(files)
        r.run_once()
        assert s.receipt(batch) == dict.fromkeys(files, Status.OK)
        assert s.receipt("b2") == {"bad": Status.BAD_CHECKSUM}
        assert s.published() == files
        assert not (s.D / rx_areas.STAGING).exists()
        s.close()
    finally:
        import shutil

        shutil.rmtree(incoming, ignore_errors=True)


# --------------------------------------------------------------------------- durability


class Calls:
    """Records, in order, the receiver's flushes, publications and receipts."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch, *, syncfs_works: bool = True,
                 fail_fsync_of: str | None = None) -> None:
        self.log: list[tuple[str, str]] = []
        real_fsync, real_rename = os.fsync, rx_batch.rename_noreplace
        real_write = rx_receiver.write_atomic

        def syncfs(fd: int) -> bool:
            self.log.append(("syncfs", os.readlink(f"/proc/self/fd/{fd}")))
            return syncfs_works and real_syncfs(fd)

        def fsync(fd: int) -> None:
            kind = "fsync-dir" if stat.S_ISDIR(os.fstat(fd).st_mode) else "fsync-file"
            path = os.readlink(f"/proc/self/fd/{fd}")
            self.log.append((kind, path))
            if (fail_fsync_of is not None and kind == "fsync-file"
                    and path.endswith("/" + self.staged_name(fail_fsync_of))):
                raise OSError(errno.EIO, "injected", path)
            real_fsync(fd)

        def rename_noreplace(src: str, dst: str, **kw: int) -> None:
            into = os.readlink(f"/proc/self/fd/{kw['dst_dir_fd']}")
            self.log.append(("publish", os.path.join(into, dst)))
            real_rename(src, dst, **kw)

        def write_atomic(dir_fd: int, name: str, data: bytes, mode: int = 0o640) -> None:
            self.log.append(("receipt", name))
            real_write(dir_fd, name, data, mode)

        real_syncfs = rx_batch.syncfs
        monkeypatch.setattr(rx_batch, "syncfs", syncfs)
        monkeypatch.setattr(os, "fsync", fsync)
        monkeypatch.setattr(rx_batch, "rename_noreplace", rename_noreplace)
        monkeypatch.setattr(rx_receiver, "write_atomic", write_atomic)

    @staticmethod
    def staged_name(relpath: str) -> str:
        raw = os.fsencode(relpath)
        return f"{len(raw)}-{hashlib.sha256(raw).hexdigest()[:40]}"

    def kinds(self, kind: str) -> list[int]:
        return [n for n, (k, _) in enumerate(self.log) if k == kind]

    def first(self, kind: str) -> int:
        return self.kinds(kind)[0]


def test_a_batch_of_n_files_is_flushed_by_one_syncfs_then_published_then_answered(
        site: Site, monkeypatch: pytest.MonkeyPatch) -> None:
    files = {f"f{i:02d}": os.urandom(100 + i) for i in range(60)}
    r = site.receiver()
    batch = site.send(files)
    calls = Calls(monkeypatch)
    r.run_once()
    assert site.receipt(batch) == dict.fromkeys(files, Status.OK)
    assert site.published() == files
    receipt = calls.first("receipt")
    # one syncfs of the staging file system, no fsync of any item's data, then every
    # item is published, then their one directory is flushed, then the receipt written
    assert [k for k, _ in calls.log[:receipt]] == (
        ["syncfs"] + ["publish"] * len(files) + ["fsync-dir"])
    assert calls.log[0][1].endswith(f"{rx_areas.STAGING}/{batch}")
    assert calls.log[receipt - 1][1] == str(site.D)


def test_items_published_into_several_directories_are_flushed_by_a_second_syncfs(
        site: Site, monkeypatch: pytest.MonkeyPatch) -> None:
    files = {f"{d}/f{i:02d}": os.urandom(100 + i) for i in range(30) for d in "abc"}
    r = site.receiver()
    batch = site.send(files)
    calls = Calls(monkeypatch)
    r.run_once()
    assert site.receipt(batch) == dict.fromkeys(files, Status.OK)
    assert site.published() == files
    receipt = calls.first("receipt")
    assert [k for k, _ in calls.log[:receipt]] == (
        ["syncfs"] + ["publish"] * len(files) + ["syncfs"])


def test_without_syncfs_each_item_then_each_directory_is_fsynced_once(
        site: Site, monkeypatch: pytest.MonkeyPatch) -> None:
    # two directories, interleaved in the control file
    files = {f"{d}/f{i:02d}": os.urandom(50) for i in range(10) for d in "ab"}
    r = site.receiver()
    batch = site.send(files)
    calls = Calls(monkeypatch, syncfs_works=False)
    r.run_once()
    assert site.receipt(batch) == dict.fromkeys(files, Status.OK)
    assert site.published() == files
    receipt = calls.first("receipt")
    publishes = calls.kinds("publish")
    # every item's data is flushed before any is published
    flushed = [n for n in calls.kinds("fsync-file") if n < receipt]
    assert sorted(os.path.basename(calls.log[n][1]) for n in flushed) == sorted(
        calls.staged_name(f) for f in files)
    assert max(flushed) < publishes[0]
    # each directory is flushed once, after its last item, before the receipt
    dir_syncs = [(n, path) for n, (k, path) in enumerate(calls.log[:receipt])
                 if k == "fsync-dir"]
    assert sorted(path for _, path in dir_syncs) == [str(site.D / "a"), str(site.D / "b")]
    for n, path in dir_syncs:
        assert n > max(m for m in publishes if os.path.dirname(calls.log[m][1]) == path)


def test_when_the_renames_cannot_be_flushed_no_receipt_is_written_until_they_are(
        site: Site, monkeypatch: pytest.MonkeyPatch) -> None:
    files = {f"{d}/f{i}": os.urandom(50) for i in range(5) for d in "ab"}
    r = site.receiver()
    batch = site.send(files)
    real = rx_batch.syncfs
    calls: list[int] = []

    def second_fails(fd: int) -> bool:
        calls.append(fd)
        return len(calls) != 2 and real(fd)

    monkeypatch.setattr(rx_batch, "syncfs", second_fails)
    r.run_once()
    assert len(calls) == 2 and not (site.I / f"{batch}.{RCPT}").exists()
    assert site.published() == files
    r.run_once()  # finds them published, flushes their directories
    assert site.receipt(batch) == dict.fromkeys(files, Status.OK)


def test_an_item_whose_data_cannot_be_flushed_is_an_io_error_and_not_published(
        site: Site, monkeypatch: pytest.MonkeyPatch) -> None:
    files = {"good": b"good data", "bad": b"unlucky data", "fine": b"more"}
    r = site.receiver()
    batch = site.send(files)
    Calls(monkeypatch, syncfs_works=False, fail_fsync_of="bad")
    r.run_once()
    assert site.receipt(batch) == {"good": Status.OK, "bad": Status.IO_ERROR,
                                   "fine": Status.OK}
    assert site.published() == {"good": b"good data", "fine": b"more"}
    assert site.incoming() == [batch, f"{batch}.{CTRL}", f"{batch}.{RCPT}"]


def test_a_single_item_is_flushed_by_its_own_fsync_not_a_syncfs(
        site: Site, monkeypatch: pytest.MonkeyPatch) -> None:
    r = site.receiver()
    batch = site.send({"only": b"one"})
    calls = Calls(monkeypatch)
    r.run_once()
    assert site.receipt(batch) == {"only": Status.OK}
    assert calls.kinds("syncfs") == []
    (flush,) = [n for n in calls.kinds("fsync-file") if n < calls.first("receipt")]
    assert calls.log[flush][1].endswith(calls.staged_name("only"))
    assert flush < calls.first("publish")


def test_a_crash_after_the_syncfs_and_before_publishing_loses_nothing(
        site: Site, monkeypatch: pytest.MonkeyPatch) -> None:
    files = {f"d{i % 3}/f{i}": os.urandom(200) for i in range(12)}
    r = site.receiver()
    batch = site.send(files)

    def crash(fd: int) -> bool:
        raise KeyboardInterrupt  # stands for SIGKILL once the data is checked

    monkeypatch.setattr(rx_batch, "syncfs", crash)
    with pytest.raises(KeyboardInterrupt):
        r.run_once()
    r.close()
    monkeypatch.undo()
    assert site.published() == {} and not (site.I / f"{batch}.{RCPT}").exists()
    site.receiver().run_once()
    assert site.receipt(batch) == dict.fromkeys(files, Status.OK)
    assert site.published() == files


# --------------------------------------------------------------------------- named attacks


@pytest.mark.parametrize("path", ["../outside/secret", "../../etc/passwd", "a/../../x",
                                  "/etc/passwd", "//x", "a%00b", "..", "a/./b"])
def test_unsafe_names_make_the_control_file_quarantined(site: Site, path: str) -> None:
    r = site.receiver()
    line = f"item 6 {sha(b'secret')} {path.replace(chr(0), '%00')}"
    data = ("\n".join(["mstm-control 1", "batch b1", "algorithm sha256",
                       "receipt b1.mstm-rcpt", line, "end"]) + "\n").encode()
    site.write(f"b1.{CTRL}", data)
    (site.I / "b1").mkdir()
    summary = r.run_once()
    assert summary.quarantined == 1
    assert not (site.I / f"b1.{RCPT}").exists()
    assert len(site.quarantined()) == 1 and site.quarantined()[0].endswith("-b1." + CTRL)
    assert site.published() == {}


def test_a_raw_nul_or_newline_in_a_name_cannot_be_written_and_is_quarantined(
        site: Site) -> None:
    r = site.receiver()
    for n, raw in enumerate([b"a\0b", b"a\nb"]):
        data = (b"mstm-control 1\nbatch b%d\nalgorithm sha256\nreceipt b%d.mstm-rcpt\n"
                % (n, n) + b"item 1 " + sha(b"x").encode() + b" " + raw + b"\nend\n")
        site.write(f"b{n}.{CTRL}", data)
    assert r.run_once().quarantined == 2
    with pytest.raises(p.ProtocolError):
        p.encode_path("a\0b")


def test_a_symlink_in_the_batch_directory_pointing_outside_is_refused(site: Site) -> None:
    site.I.mkdir()
    (site.I / "b1").mkdir()
    (site.I / "b1" / "sub").symlink_to(site.outside)
    (site.I / "b1" / "leaf").symlink_to(site.outside / "secret")
    watch = Watch(site.outside)
    r = site.receiver()
    site.control("b1", [ControlItem("sub/secret", 6, sha(b"secret")),
                        ControlItem("leaf", 6, sha(b"secret"))])
    r.run_once()
    assert site.receipt("b1") == {"sub/secret": Status.REFUSED, "leaf": Status.REFUSED}
    assert site.published() == {}
    assert watch.events() == []  # not even opened
    assert (site.outside / "secret").read_bytes() == b"secret"


def test_a_batch_directory_that_is_a_symlink_is_refused(site: Site) -> None:
    site.I.mkdir()
    (site.I / "b1").symlink_to(site.outside)
    watch = Watch(site.outside)
    r = site.receiver()
    site.control("b1", [ControlItem("secret", 6, sha(b"secret"))])
    r.run_once()
    assert site.receipt("b1") == {"secret": Status.REFUSED}
    site.thank("b1")
    r.run_once()
    assert watch.events() == []
    assert not (site.I / "b1").exists() and (site.outside / "secret").exists()


def test_a_symlink_in_the_published_directory_pointing_outside_is_refused(site: Site) -> None:
    (site.D / "sub").symlink_to(site.outside)
    (site.D / "existing").symlink_to(site.outside / "secret")
    watch = Watch(site.outside)
    r = site.receiver()
    batch = site.send({"sub/new": b"data", "sub/secret": b"overwrite?", "existing": b"x"})
    r.run_once()
    assert site.receipt(batch) == dict.fromkeys(["sub/new", "sub/secret", "existing"],
                                                Status.REFUSED)
    assert watch.events() == []
    assert sorted(os.listdir(site.outside)) == ["secret"]


SWAPPER = r"""
import os, sys, time
parent, target, stop = sys.argv[1:]
real, aside = os.path.join(parent, "sub"), os.path.join(parent, "sub.real")
n = 0
while not os.path.exists(stop):
    try:
        os.rename(real, aside)
        os.symlink(target, real)
        time.sleep(0.0001)
        os.unlink(real)
        os.rename(aside, real)
        n += 1
        time.sleep(0.0005)
    except OSError:
        pass
print(n)
"""


def test_a_symlink_swapped_in_during_publication_never_redirects_a_read_or_write(
        site: Site, tmp_path_factory: pytest.TempPathFactory) -> None:
    """Two processes swap a directory of I/<batch>/ and one of D for symlinks to outside
    directories, as fast as they can, while the receiver publishes 500 items."""
    outside2 = site.root / "outside2"
    outside2.mkdir()
    files = {f"sub/f{i:03d}": f"content {i}".encode() * 50 for i in range(500)}
    for name, data in files.items():  # the attacker's copies: same names, same content
        (site.outside / Path(name).name).write_bytes(data)
    r = site.receiver()
    batch = "b1"
    items = site.put(batch, files)
    (site.D / "sub").mkdir()
    site.control(batch, items)
    stop = tmp_path_factory.mktemp("swappers") / "stop"
    site.baseline()
    watch = Watch(site.outside, outside2)
    swappers = [subprocess.Popen([sys.executable, "-c", SWAPPER, str(parent), str(target),
                                  str(stop)], stdout=subprocess.PIPE, text=True)
                for parent, target in ((site.I / batch, site.outside), (site.D, outside2))]
    try:
        time.sleep(0.2)
        r.run_once()
    finally:
        stop.write_bytes(b"")
        swaps = [int(proc.communicate(timeout=10)[0]) for proc in swappers]
        stop.unlink()
    assert min(swaps) > 10, swaps
    assert watch.events() == []  # nothing outside was opened, read, written or created
    assert os.listdir(outside2) == []
    receipt = site.receipt(batch)
    counts = collections.Counter(receipt.values())
    assert set(counts) <= {Status.OK, Status.REFUSED, Status.MISSING}, counts
    # the attack was met (how many items won their race against the swappers instead is
    # up to the scheduler: with all items checked before any is published, it may be none)
    assert counts[Status.REFUSED] > 0, counts
    # every published file holds exactly its item's content, wherever in D it ended up
    for rel, data in site.published().items():
        assert data == files["sub/" + Path(rel).name], rel
    ok = {n for n, s in receipt.items() if s is Status.OK}
    assert sorted("sub/" + Path(rel).name for rel in site.published()) == sorted(ok)


def test_a_10_mb_control_file_is_quarantined_unread(site: Site) -> None:
    r = site.receiver()
    site.write(f"big.{CTRL}", b"mstm-control 1\n" + b"x" * (10 << 20))
    t0 = time.monotonic()
    assert r.run_once().quarantined == 1
    assert time.monotonic() - t0 < 2
    assert [q.endswith("-big." + CTRL) for q in site.quarantined()] == [True]
    assert not (site.I / f"big.{RCPT}").exists()


def test_a_thank_you_naming_another_batch_removes_nothing_of_it(site: Site) -> None:
    r = site.receiver()
    victim = site.send({"v": b"victim"}, batch="victim")
    r.run_once()
    site.write(f"attacker.{THANKS}", p.render_thanks("victim"))
    assert r.run_once().quarantined == 1
    assert sorted(site.incoming()) == sorted([".quarantine", victim, f"{victim}.{CTRL}",
                                              f"{victim}.{RCPT}"])


def test_a_thank_you_removes_only_names_derived_from_its_batch(site: Site) -> None:
    r = site.receiver()
    batch = site.send({"a": b"1"}, batch="b1")
    r.run_once()
    keep = ["b1.other", "b1-x", "b10", ".b1.mstm-rcpt", "b1.mstm-rcpt.bak"]
    for name in keep:
        (site.I / name).write_bytes(b"keep")
    (site.I / "b10.mstm-rcpt").write_bytes(b"keep")
    site.thank(batch)
    r.run_once()
    assert [n for n in site.incoming() if n != ".quarantine"] == sorted(
        [*keep, "b10.mstm-rcpt"])


def test_a_control_file_naming_another_batch_is_quarantined(site: Site) -> None:
    r = site.receiver()
    site.put("b2", {"a": b"1"})
    site.write(f"b1.{CTRL}", p.render_control(p.Control(
        "b2", "sha256", "b2.mstm-rcpt", (ControlItem("a", 1, sha(b"1")),))))
    assert r.run_once().quarantined == 1
    assert not (site.I / f"b2.{RCPT}").exists() and not (site.I / f"b1.{RCPT}").exists()


def test_garbage_in_the_incoming_area_is_quarantined_or_ignored_never_fatal(
        site: Site) -> None:
    site.I.mkdir()
    i = site.I
    (i / f"garbage.{CTRL}").write_bytes(os.urandom(5000))
    (i / f"empty.{CTRL}").write_bytes(b"")
    (i / f"dir.{CTRL}").mkdir()
    os.mkfifo(i / f"fifo.{CTRL}")
    (i / f"link.{CTRL}").symlink_to(site.outside / "secret")
    (i / f"dangling.{THANKS}").symlink_to(site.outside / "nothing")
    (i / f"bad name!.{CTRL}").write_bytes(b"x")
    (i / f"x.{THANKS}").write_bytes(b"\xff" * 100)
    (i / f"a.b.{CTRL}").write_bytes(b"mstm-control 1\n")
    (i / f".hidden.{CTRL}").write_bytes(b"neither format")
    (i / ".stop").write_bytes(b"")
    (i / "random file").write_bytes(b"data")
    (i / "random dir").mkdir()
    (i / f"old.{RCPT}").write_bytes(b"not ours")
    watch = Watch(site.outside)
    r = site.receiver()
    summary = r.run_once()
    assert summary.quarantined == 10
    assert sorted(site.incoming()) == sorted([".quarantine", ".stop", "random file",
                                              "random dir", f"old.{RCPT}"])
    assert watch.events() == []
    # and a good batch still goes through afterwards
    batch = site.send({"ok": b"fine"})
    r.run_once()
    assert site.receipt(batch) == {"ok": Status.OK}


def test_a_young_hidden_control_like_file_is_left_alone_while_it_may_be_written(
        site: Site) -> None:
    r = site.receiver()
    site.write(f".b1.{CTRL}", b"mstm-control 1\nbatch b1\n")  # somebody's temp file
    assert r.run_once().quarantined == 0
    assert f".b1.{CTRL}" in site.incoming()


def test_a_directory_swapped_in_for_an_item_after_its_check_is_refused(
        site: Site, monkeypatch: pytest.MonkeyPatch) -> None:
    r = site.receiver()
    batch = site.send({"x": b"data", "y": b"more"})
    real_rename = os.rename

    def swap_then_rename(src: str, dst: str, **kw: int) -> None:
        if src == "x":  # the moment between the receiver's check and its move
            os.unlink(site.I / batch / "x")
            os.mkdir(site.I / batch / "x")
            (site.I / batch / "x" / "inner").write_bytes(b"data")
        real_rename(src, dst, **kw)

    monkeypatch.setattr(os, "rename", swap_then_rename)
    r.run_once()
    assert site.receipt(batch) == {"x": Status.REFUSED, "y": Status.OK}
    assert site.published() == {"y": b"more"}


def test_a_staging_impostor_in_the_incoming_area_is_quarantined(site: Site) -> None:
    site.I.mkdir()
    (site.I / rx_areas.STAGING).symlink_to(site.outside)
    r = site.receiver()
    batch = site.send({"a": b"1"})
    r.run_once()
    assert site.receipt(batch) == {"a": Status.OK}
    assert os.listdir(site.outside) == ["secret"]


_FUZZ_TOKENS = [b"../", b"..", b"/", b"%00", b"%0A", b"%2F", b"%2E%2E", b"outside/secret",
                b"\n", b" ", b"end", b"item", b"batch", b"receipt", b"mstm-control 1",
                b"mstm-thanks 1", b".mstm-incoming/", b"\xff", b"99999999999999999999"]


@st.composite
def _mutated(draw: st.DrawFn, base: bytes) -> bytes:
    data = bytearray(base)
    for _ in range(draw(st.integers(0, 4))):
        pos = draw(st.integers(0, len(data)))
        op = draw(st.sampled_from(["token", "cut", "byte"]))
        if op == "token":
            data[pos:pos] = draw(st.sampled_from(_FUZZ_TOKENS))
        elif op == "cut":
            del data[pos:pos + draw(st.integers(1, 30))]
        elif data:
            data[min(pos, len(data) - 1)] = draw(st.integers(0, 255))
    return bytes(data)


@settings(max_examples=1500, deadline=None, derandomize=True,
          suppress_health_check=list(HealthCheck))
@given(data=st.data())
def test_fuzzed_control_and_thank_you_files_never_crash_the_receiver_or_escape(
        site: Site, data: st.DataObject) -> None:
    if not hasattr(site, "fuzz"):
        site.fuzz = site.receiver()  # type: ignore[attr-defined]
        site.fuzz_n = 0  # type: ignore[attr-defined]
    r: Receiver = site.fuzz  # type: ignore[attr-defined]
    site.fuzz_n += 1  # type: ignore[attr-defined]
    batch = f"fz{site.fuzz_n:07d}"  # type: ignore[attr-defined]
    items = site.put(batch, {"a": b"alpha", "sub/b": b"beta"})
    items.append(ControlItem("../outside/secret", 6, sha(b"secret")))
    valid = p.render_control(p.Control(batch, "sha256", f"{batch}.{RCPT}", tuple(items[:2])))
    valid = valid.replace(b"item 5", b"item 6 " + sha(b"secret").encode() +
                          b" ../outside/secret\nitem 5", 1) if data.draw(st.booleans()) else valid
    site.write(f"{batch}.{CTRL}", data.draw(_mutated(valid)))
    if data.draw(st.booleans()):
        previous = f"fz{max(1, site.fuzz_n - 1):07d}"  # type: ignore[attr-defined]
        other = data.draw(st.sampled_from([batch, previous, "x"]))
        site.write(f"{batch}.{THANKS}", data.draw(_mutated(p.render_thanks(other))))
    r.run_once()
    assert os.listdir(site.outside) == ["secret"]
    assert (site.outside / "secret").read_bytes() == b"secret"


# --------------------------------------------------------------------------- MiStaMover


def msm_control(site: Site, filename: str, data: bytes | None, *, md5: str | None = None,
                stamp: str = "1712345678.25") -> str:
    """What MiStaMover's sender pushes: the data file, then .<name>.<ctrl ext>."""
    site.I.mkdir(parents=True, exist_ok=True)
    if data is not None:
        (site.I / filename).write_bytes(data)
    receipt = f".{filename}.{stamp}.{RCPT}"
    site.write(f".{filename}.{CTRL}", p.render_mistamover_control(p.MsmControl(
        filename, len(data or b""), md5 or hashlib.md5(data or b"").hexdigest(), receipt)))
    return receipt


def test_a_mistamover_sender_is_answered_in_its_own_format(site: Site) -> None:
    r = site.receiver()
    receipt = msm_control(site, "obs 1.nc", b"mistamover data")
    r.run_once()
    assert site.published() == {"obs 1.nc": b"mistamover data"}
    got = p.parse_mistamover_receipt((site.I / receipt).read_bytes())
    assert got == p.MsmReceipt("obs 1.nc", p.MsmCode.SUCCESS, 15,
                               hashlib.md5(b"mistamover data").hexdigest(),
                               f".obs 1.nc.1712345678.25.{THANKS}")
    assert site.incoming() == [receipt]  # the control file is answered and gone
    site.write(got.thanks, p.render_mistamover_thanks(receipt))
    r.run_once()
    assert site.incoming() == []


def test_a_mistamover_item_with_a_bad_checksum_gets_code_2_and_is_not_published(
        site: Site) -> None:
    r = site.receiver()
    receipt = msm_control(site, "x.nc", b"data", md5=hashlib.md5(b"other").hexdigest())
    r.run_once()
    got = p.parse_mistamover_receipt((site.I / receipt).read_bytes())
    assert (got.code, got.size, got.md5) == (p.MsmCode.BAD_CKSUM, -1, "")
    assert site.published() == {}
    assert site.incoming() == [receipt]  # the bad data is removed, as MiStaMover did


def test_a_mistamover_control_before_its_data_waits_instead_of_answering_missing(
        site: Site, monkeypatch: pytest.MonkeyPatch) -> None:
    """MiStaMover defect 3: the control could arrive before the data."""
    r = site.receiver()
    receipt = msm_control(site, "late.nc", None)
    summary = r.run_once()
    assert summary.deferred == 1 and not (site.I / receipt).exists()
    (site.I / "late.nc").write_bytes(b"")
    r.run_once()
    assert p.parse_mistamover_receipt((site.I / receipt).read_bytes()).code == 0
    receipt2 = msm_control(site, "never.nc", None)
    monkeypatch.setattr(rx_mistamover, "MSM_DATA_GRACE", 0.0)
    r.run_once()
    assert p.parse_mistamover_receipt((site.I / receipt2).read_bytes()).code == \
        p.MsmCode.NO_SUCH_FILE


def test_a_mistamover_control_asking_for_any_receipt_name_is_quarantined(site: Site) -> None:
    """MiStaMover defect 13: the receipt name came from the peer, unchecked."""
    r = site.receiver()
    (site.I).mkdir(exist_ok=True)
    (site.I / "x.nc").write_bytes(b"1")
    for n, receipt in enumerate([f"b1.{CTRL}", "../../outside/secret", f".y.1.{RCPT}"]):
        site.write(f".x.nc.{CTRL}", p.render_mistamover_control(
            p.MsmControl("x.nc", 1, hashlib.md5(b"1").hexdigest(), receipt)))
        assert r.run_once().quarantined == 1, receipt
        assert len(site.quarantined()) == n + 1
    assert site.published() == {}


def test_a_mistamover_thank_you_deletes_only_the_receipt_its_name_derives_from(
        site: Site) -> None:
    r = site.receiver()
    receipt = msm_control(site, "a.nc", b"A")
    r.run_once()
    batch = site.send({"z": b"z"}, batch="victim")
    r.run_once()
    # a thank-you (our name for it) that names another file in its content
    site.write(f".a.nc.1712345678.25.{THANKS}", p.render_mistamover_thanks(f"victim.{RCPT}"))
    assert r.run_once().quarantined == 1
    assert (site.I / receipt).exists() and (site.I / f"{batch}.{RCPT}").exists()


def test_unacknowledged_mistamover_receipts_expire(site: Site,
                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    """MiStaMover defect 4: its thank-you never arrived and receipts piled up."""
    r = site.receiver()
    receipt = msm_control(site, "a.nc", b"A")
    r.run_once()
    old = time.time() - rx_cleanup.MSM_RECEIPT_TTL - 10
    os.utime(site.I / receipt, (old, old))
    monkeypatch.setattr(r, "_last_expiry", 0.0)
    r.run_once()
    assert site.incoming() == []


def test_answered_batches_without_a_thank_you_expire_after_a_week(site: Site) -> None:
    r = site.receiver()
    batch = site.send({"a": b"1"})
    r.run_once()
    old = time.time() - rx_cleanup.ANSWERED_TTL - 10
    os.utime(site.I / f"{batch}.{RCPT}", (old, old))
    r._last_expiry = 0.0
    r.run_once()
    assert site.incoming() == []
    assert site.published() == {"a": b"1"}


# --------------------------------------------------------------------------- abandoned batches
#
# A sender killed mid-rsync leaves I/<batch>/ with no control file.  The tests fake the
# receiver's wall clock (r.abandoned.clock) and back-date mtimes with os.utime: ctime cannot be
# set, so "old" means the clock moved on, not that the files were back-dated.

LIMIT = 3600.0


# batch names of the shape mstm-send makes (protocol.OUR_BATCH_RE)
B1 = "20261123T000000000001-000000000001"
B2 = "20261123T000000000002-000000000002"
B3 = "20261123T000000000003-000000000003"
B4 = "20261123T000000000004-000000000004"


def test_only_a_directory_named_like_mstm_send_batches_is_ever_taken_for_abandoned(
        site: Site) -> None:
    abandoned_site(site)
    r = site.receiver()
    for name in ("proj2", "2024-01-01", "backup", "b1"):  # valid batch names, not ours
        (site.I / name / "keep").mkdir(parents=True)
        (site.I / name / "keep" / "important.dat").write_bytes(b"x")
    site.baseline()
    later(r, LIMIT + 100)
    assert r.run_once().abandoned == 0
    assert (site.I / "proj2" / "keep" / "important.dat").exists()


def abandoned_site(site: Site, limit: float = LIMIT, **kw: object) -> Site:
    site.settings = dataclasses.replace(site.settings, abandoned_batch_seconds=limit,
                                        **kw)  # type: ignore[arg-type]
    return site


def partial_batch(site: Site, batch: str, files: dict[str, bytes] | None = None) -> Path:
    """What a sender killed during the rsync leaves: data, a partial file, no control."""
    files = files if files is not None else {
        "obs/a.nc": b"a" * 1000, "obs/deep/b.nc": b"b" * 500,
        ".mstm-partial/c.nc": b"c" * 300, "obs/.d.nc.Xy12Ab": b"d" * 200}
    site.put(batch, files)
    return site.I / batch


def backdate(path: Path, seconds: float) -> None:
    """Every entry's mtime (and atime) *seconds* ago, as rsync --times would set them."""
    old = time.time() - seconds
    for dirpath, dirs, files in os.walk(path):
        for name in [*dirs, *files]:
            os.utime(os.path.join(dirpath, name), (old, old), follow_symlinks=False)
    os.utime(path, (old, old), follow_symlinks=False)


def later(r: Receiver, seconds: float) -> None:
    """The receiver's clock, *seconds* from now; and its next look is due at once."""
    r.abandoned.clock = lambda: time.time() + seconds
    r.abandoned.next_look = 0.0


def removals(caplog: pytest.LogCaptureFixture) -> list[logging.LogRecord]:
    return [rec for rec in caplog.records
            if getattr(rec, "mstm_event", None) == "abandoned_batch_removed"]


def test_an_abandoned_batch_directory_older_than_the_limit_is_removed_and_logged_once(
        site: Site, caplog: pytest.LogCaptureFixture) -> None:
    abandoned_site(site)
    r = site.receiver()
    batch = p.new_batch_id()
    partial_batch(site, batch)
    backdate(site.I / batch, 2 * LIMIT)
    later(r, LIMIT + 100)
    with caplog.at_level(logging.INFO, logger="mstm"):
        summary = r.run_once()
        later(r, LIMIT + 200)
        r.run_once()
    assert summary.abandoned == 1 and r.total.abandoned == 1
    assert site.incoming() == []  # nothing set aside is left either
    (rec,) = removals(caplog)  # once
    assert rec.levelno == logging.WARNING
    assert rec.mstm_fields == {  # type: ignore[attr-defined]
        "stream": "t", "item": batch, "bytes": 2000, "result": "abandoned_batch_removed",
        "reason": "unchanged for 3700 s"}  # by the receiver's clock
    msg = rec.getMessage()
    assert batch in msg and "changed for 62 min" in msg and "2000 bytes" in msg


def test_a_batch_directory_changed_within_the_limit_stays(site: Site) -> None:
    abandoned_site(site)
    r = site.receiver()
    partial_batch(site, B1)
    backdate(site.I / B1, 2 * LIMIT)
    later(r, LIMIT + 100)
    # one file deep down was written 10 s ago (by the receiver's clock)
    recent = time.time() + LIMIT + 90
    os.utime(site.I / B1 / "obs" / "deep" / "b.nc", (recent, recent))
    assert r.run_once().abandoned == 0
    assert site.incoming() == [B1]


def test_a_batch_whose_files_have_old_mtimes_but_were_written_lately_stays(
        site: Site) -> None:
    """rsync --times gives each file its source's mtime: only ctime tells when it came."""
    abandoned_site(site)
    r = site.receiver()
    partial_batch(site, B1)
    backdate(site.I / B1, 30 * 86400)  # mtimes a month old; ctimes now
    later(r, LIMIT - 100)
    assert r.run_once().abandoned == 0
    assert site.incoming() == [B1]


def test_an_mtime_in_the_future_does_not_keep_a_batch_forever(site: Site) -> None:
    abandoned_site(site)
    r = site.receiver()
    partial_batch(site, B1)
    future = time.time() + 10 * LIMIT  # a source host's clock far ahead (rsync --times)
    os.utime(site.I / B1 / "obs" / "a.nc", (future, future))
    later(r, LIMIT + 100)
    assert r.run_once().abandoned == 1
    assert site.incoming() == []


@pytest.mark.parametrize("name", [f"{B1}.{CTRL}", f"{B1}.{RCPT}", f"{B1}.{THANKS}",
                                  f".{B1}.{CTRL}.tmp.4242", f".{B1}.{CTRL}"])
def test_a_batch_directory_with_a_control_file_receipt_or_thank_you_stays(
        site: Site, name: str) -> None:
    abandoned_site(site)
    r = site.receiver()
    partial_batch(site, B1)
    (site.I / name).write_bytes(b"")
    backdate(site.I, 2 * LIMIT)
    later(r, LIMIT + 100)
    assert r.abandoned.look(rx.Summary()) is None
    assert sorted(site.incoming()) == sorted([B1, name])


def test_an_old_batch_directory_whose_control_file_arrives_is_answered_not_removed(
        site: Site) -> None:
    abandoned_site(site)
    r = site.receiver()
    items = site.put(B1, {"x": b"late"})
    later(r, LIMIT + 100)
    site.control(B1, items)
    assert r.run_once().abandoned == 0
    assert site.receipt(B1) == {"x": Status.OK}
    assert site.published() == {"x": b"late"}
    assert (site.I / B1).is_dir()  # until the thank-you


def test_entries_not_named_like_a_batch_directory_stay(tmp_path: Path) -> None:
    site = abandoned_site(Site(tmp_path), stop_file="STOP")
    try:
        site.I.mkdir()
        names = ["with.dot", "-dash", "_under", "sp ace", "x" * 65, "ünï", ".hidden",
                 ".quarantine", ".mstm-partial", "STOP"]
        for name in names:
            (site.I / name).mkdir()
            (site.I / name / "f").write_bytes(b"data")
        (site.I / B2).write_bytes(b"a MiStaMover data file, not a directory")
        r = site.receiver()
        later(r, LIMIT + 100)
        assert r.run_once().abandoned == 0
        assert sorted(site.incoming()) == sorted([*names, B2])
    finally:
        site.close()


def test_a_symlink_inside_an_abandoned_batch_pointing_outside_removes_nothing_outside(
        site: Site) -> None:
    abandoned_site(site)
    r = site.receiver()
    partial_batch(site, B1)
    (site.I / B1 / "out").symlink_to(site.outside)
    (site.I / B1 / "obs" / "secret").symlink_to(site.outside / "secret")
    (site.I / B1 / "obs" / "up").symlink_to("../../..")
    (site.I / B2).symlink_to(site.outside)  # a batch "directory" that is a link
    site.baseline()
    watch = Watch(site.outside)
    later(r, LIMIT + 100)
    assert r.run_once().abandoned == 1
    assert site.incoming() == [B2]
    assert watch.events() == []  # nothing outside was even opened
    assert (site.outside / "secret").read_bytes() == b"secret"
    # (and the fixture checks that nothing outside I and D changed)


def test_zero_disables_the_removal_of_abandoned_batches(site: Site) -> None:
    abandoned_site(site, 0)
    r = site.receiver()
    partial_batch(site, B1)
    backdate(site.I / B1, 400 * 86400)
    later(r, 365 * 86400)
    assert r.run_once().abandoned == 0
    assert site.incoming() == [B1]


def test_a_control_file_appearing_while_a_batch_is_removed_keeps_the_batch(
        site: Site, monkeypatch: pytest.MonkeyPatch) -> None:
    """The racing sender: its control file lands after the first look; the batch is
    renamed aside, looked at again, and put back."""
    abandoned_site(site)
    r = site.receiver()
    items = site.put(B1, {"x": b"racing"})
    later(r, LIMIT + 100)
    real = rx_abandoned.survey

    def survey_then_control(*args: object, **kw: object) -> rx_survey.Survey:
        result = real(*args, **kw)  # type: ignore[arg-type]
        if str(args[1]).startswith(rx_abandoned.ABANDONED_PREFIX):  # the look again, set aside
            site.control(B1, items)
        return result

    monkeypatch.setattr(rx_abandoned, "survey", survey_then_control)
    assert r.abandoned.look(rx.Summary()) is None
    assert site.incoming() == [B1, f"{B1}.{CTRL}"]
    monkeypatch.undo()
    r.run_once()
    assert site.receipt(B1) == {"x": Status.OK}


def test_a_write_into_a_batch_while_it_is_being_removed_keeps_the_batch(
        site: Site, monkeypatch: pytest.MonkeyPatch) -> None:
    abandoned_site(site)
    r = site.receiver()
    partial_batch(site, B1)
    later(r, LIMIT + 100)
    real = rx_abandoned.survey

    def survey_after_a_write(parent_fd: int, name: str, **kw: object) -> rx_survey.Survey:
        if name.startswith(rx_abandoned.ABANDONED_PREFIX):  # a sender that held the directory open
            time.sleep(0.02)  # past the file system's timestamp granularity
            (site.I / name / "obs" / "deep" / "more").write_bytes(b"more")
        return real(parent_fd, name, **kw)  # type: ignore[arg-type]

    monkeypatch.setattr(rx_abandoned, "survey", survey_after_a_write)
    assert r.run_once().abandoned == 0
    assert site.incoming() == [B1]
    assert (site.I / B1 / "obs" / "deep" / "more").read_bytes() == b"more"


def test_a_directory_that_cannot_be_removed_is_logged_once_not_fatal_and_retried(
        site: Site, monkeypatch: pytest.MonkeyPatch,
        caplog: pytest.LogCaptureFixture) -> None:
    abandoned_site(site)
    r = site.receiver()
    partial_batch(site, B1)
    batch = site.send({"ok": b"1"})  # a good batch goes through meanwhile

    real = rx_abandoned.remove_tree

    def fail(name: str, *args: object, **kw: object) -> None:
        if name.startswith(rx_abandoned.ABANDONED_PREFIX):
            raise PermissionError(errno.EACCES, "Permission denied")
        real(name, *args, **kw)  # type: ignore[arg-type]

    monkeypatch.setattr(rx_abandoned, "remove_tree", fail)
    with caplog.at_level(logging.INFO, logger="mstm"):
        for _ in range(3):
            later(r, LIMIT + 100)
            assert r.run_once().abandoned == 0
    warnings = [rec for rec in caplog.records if "cannot remove" in rec.getMessage()]
    assert len(warnings) == 1 and "Permission denied" in warnings[0].getMessage()
    assert site.receipt(batch) == {"ok": Status.OK}
    monkeypatch.undo()
    later(r, LIMIT + 100)
    r.run_once()
    assert not any(n.startswith(rx_abandoned.ABANDONED_PREFIX) or n == B1 for n in site.incoming())


def test_a_batch_directory_set_aside_before_a_crash_is_removed_at_start(site: Site) -> None:
    site.I.mkdir()
    aside = site.I / f"{rx_abandoned.ABANDONED_PREFIX}{B1}-0123abcd"
    (aside / "d").mkdir(parents=True)
    (aside / "d" / "f").write_bytes(b"x")
    (aside / "out").symlink_to(site.outside)
    site.baseline()
    abandoned_site(site, 0)  # even when no longer enabled
    site.receiver()
    assert site.incoming() == []


def test_a_mount_point_inside_a_batch_directory_is_never_removed(
        site: Site, monkeypatch: pytest.MonkeyPatch,
        caplog: pytest.LogCaptureFixture) -> None:
    abandoned_site(site)
    r = site.receiver()
    partial_batch(site, B1)
    mounted = site.I / B1 / "obs" / "deep"
    real = rx_survey.mount_id
    mounted_ino = mounted.stat().st_ino
    monkeypatch.setattr(rx_survey, "mount_id", lambda fd: "elsewhere" if os.fstat(fd).st_ino
                        == mounted_ino else real(fd))
    with caplog.at_level(logging.INFO, logger="mstm"):
        for _ in range(2):
            later(r, LIMIT + 100)
            assert r.run_once().abandoned == 0
    assert site.incoming() == [B1]
    assert [rec.getMessage() for rec in caplog.records
            if "left alone" in rec.getMessage()] == [
        f"t: {B1} looks like an abandoned batch directory but is left alone: a mount point"
        " inside"]


def test_looks_for_abandoned_batches_at_start_then_at_most_every_tenth_of_the_limit(
        site: Site, monkeypatch: pytest.MonkeyPatch) -> None:
    abandoned_site(site)
    r = site.receiver()
    looks = []
    real = r.abandoned.look
    monkeypatch.setattr(r.abandoned, "look",
                        lambda summary: looks.append(1) or real(summary))
    for _ in range(20):
        r.run_once()
    assert len(looks) == 1
    assert r.abandoned.next_look - time.monotonic() == pytest.approx(LIMIT / 10, abs=5)


def test_a_look_examines_a_bounded_number_of_entries_and_the_next_one_goes_on(
        site: Site, monkeypatch: pytest.MonkeyPatch) -> None:
    abandoned_site(site)
    monkeypatch.setattr(rx_abandoned, "ABANDONED_BUDGET", 10)
    r = site.receiver()
    for batch in (B1, B2, B3, B4):
        site.put(batch, {f"f{i}": b"x" for i in range(7)})  # 8 entries each
    examined: list[str] = []
    real = rx_abandoned.survey

    def counting(parent_fd: int, name: str, **kw: object) -> rx_survey.Survey:
        result = real(parent_fd, name, **kw)  # type: ignore[arg-type]
        examined.append(f"{name}:{result.verdict}")
        return result

    monkeypatch.setattr(rx_abandoned, "survey", counting)
    gone = []
    for _ in range(4):
        later(r, LIMIT + 100)
        gone.append(r.run_once().abandoned)
    # each look: the first directory to its end, then what is left of 10 entries
    assert gone == [1, 1, 1, 1]
    assert [e for e in examined if not e.startswith(".")] == [
        f"{B1}:old", f"{B2}:unfinished", f"{B2}:old", f"{B3}:unfinished", f"{B3}:old",
        f"{B4}:unfinished", f"{B4}:old"]
    assert site.incoming() == []


def test_follow_removes_an_abandoned_batch_when_it_is_due_without_any_other_event(
        site: Site) -> None:
    abandoned_site(site, 0.6)
    r = site.receiver()
    t = follow_in_thread(r)
    try:
        partial_batch(site, B1)
        t0 = time.monotonic()
        wait_for(lambda: not (site.I / B1).exists(), timeout=10)
        assert 0.5 < time.monotonic() - t0 < 3
        batch = site.send({"after": b"1"})  # and deliveries go on
        wait_for(lambda: (site.I / f"{batch}.{RCPT}").exists())
        assert site.receipt(batch) == {"after": Status.OK}
    finally:
        r.stop()
        t.join(5)



# --------------------------------------------------------------------------- --follow


def follow_in_thread(r: Receiver) -> threading.Thread:
    t = threading.Thread(target=r.follow, daemon=True)
    t.start()
    return t


def wait_for(cond: Callable[[], bool], timeout: float = 10) -> float:
    t0 = time.monotonic()
    while not cond():
        assert time.monotonic() - t0 < timeout, "timed out"
        time.sleep(0.005)
    return time.monotonic() - t0


@pytest.mark.parametrize("force_poll", [False, True])
def test_follow_answers_each_batch_as_it_arrives_and_stops_promptly(
        site: Site, force_poll: bool) -> None:
    r = site.receiver(force_poll=force_poll)
    t = follow_in_thread(r)
    latencies = []
    for n in range(5):
        batch = site.send({f"f{n}": b"x" * n})
        latencies.append(wait_for(lambda b=batch: (site.I / f"{b}.{RCPT}").exists()))
        assert site.receipt(batch) == {f"f{n}": Status.OK}
        site.thank(batch)
        wait_for(lambda b=batch: not (site.I / b).exists())
    if not force_poll:
        assert sorted(latencies)[2] < 0.5, latencies
    t0 = time.monotonic()
    r.stop()
    t.join(5)
    assert not t.is_alive() and time.monotonic() - t0 < 2


def test_stop_during_the_checks_publishes_nothing_and_leaves_the_batch_for_the_restart(
        site: Site, monkeypatch: pytest.MonkeyPatch) -> None:
    files = {f"f{i}": os.urandom(10) for i in range(5)}
    r = site.receiver()
    batch = site.send(files)
    real = r.publisher._check

    def check_then_stop(job: object, index: int, item: ControlItem) -> object:
        result = real(job, index, item)  # type: ignore[arg-type]
        r.stop()
        return result

    monkeypatch.setattr(r.publisher, "_check", check_then_stop)
    r.run_once()
    # the first item was checked in staging; nothing is published before all are
    assert site.published() == {} and not (site.I / f"{batch}.{RCPT}").exists()
    r.close()
    site.receiver().run_once()
    assert site.receipt(batch) == dict.fromkeys(files, Status.OK)
    assert site.published() == files


def test_a_control_file_is_answered_at_once_even_in_a_burst_of_other_events(
        site: Site) -> None:
    """The watcher coalesces a burst of events for up to a second; a control file's
    arrival ends that wait (its sender is waiting for the receipt)."""
    r = site.receiver()
    t = follow_in_thread(r)
    quiet = threading.Event()

    def noise() -> None:  # a file created and removed in I every 10 ms
        n = 0
        while not quiet.is_set():
            path = site.I / f"noise-{n % 4}"
            path.write_bytes(b"x")
            path.unlink()
            n += 1
            time.sleep(0.01)

    noisy = threading.Thread(target=noise, daemon=True)
    noisy.start()
    try:
        latencies = []
        for n in range(5):
            time.sleep(0.137 * n)  # land at different moments of a coalescing wait
            batch = site.send({f"f{n}": b"x"})
            latencies.append(wait_for(lambda b=batch: (site.I / f"{b}.{RCPT}").exists()))
    finally:
        quiet.set()
        noisy.join(5)
        r.stop()
        t.join(5)
    # without the early end, a control waits 0.5 s on average for the burst to stop
    assert sorted(latencies)[3] < 0.3, latencies


# --------------------------------------------------------------------------- the command


def write_config(root: Path, directory: Path, **incoming: str) -> Path:
    etc = root / "etc"
    etc.mkdir()
    # the receiver's own state (its totals, mstm.overview.live) lives in its spool
    # directory: beside root, so that "nothing outside I and D" still holds within it
    spool = root.parent / f"{root.name}-spool"
    spool.mkdir()
    (etc / "global.ini").write_text(f"[global]\ndata_stream_list = inbound\n"
                                    f"spool_base_dir = {spool}\n")
    text = f"[data_stream]\ndirectory = {directory}\n"
    if incoming:
        text += "[incoming]\n" + "".join(f"{k} = {v}\n" for k, v in incoming.items())
    (etc / "inbound.ini").write_text(text)
    return etc / "global.ini"


def test_mstm_receive_once_answers_with_a_receive_only_configuration(site: Site) -> None:
    conf = write_config(site.root, site.D)
    site.baseline()
    batch = site.send({"a": b"1", "b": b"22"})
    r = subprocess.run([str(BIN / "mstm-receive"), "--config", str(conf), "--once", "--json",
                        "inbound"], capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stderr
    assert json.loads(r.stdout)["ok"] == 2
    assert site.receipt(batch) == {"a": Status.OK, "b": Status.OK}
    check = subprocess.run([str(BIN / "mstm-receive"), "--config", str(conf), "--check",
                            "inbound"], capture_output=True, text=True, timeout=60)
    assert check.returncode == 0 and ": ok" in check.stdout, check.stderr


def test_mstm_receive_follow_answers_promptly_and_exits_cleanly_on_sigterm(site: Site) -> None:
    conf = write_config(site.root, site.D)
    site.baseline()
    log = site.root.parent / f"{site.root.name}-receive.log"
    with open(log, "wb") as err:
        proc = subprocess.Popen([str(BIN / "mstm-receive"), "--config", str(conf), "-v",
                                 "--follow", "inbound"], stderr=err)
    try:
        wait_for(lambda: site.I.exists())
        time.sleep(0.3)
        batch = site.send({"a": b"1"})
        wait_for(lambda: (site.I / f"{batch}.{RCPT}").exists())
        assert site.receipt(batch) == {"a": Status.OK}
        proc.terminate()
        assert proc.wait(timeout=10) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    text = log.read_text()
    assert "published a" in text and "stopped" in text and "Traceback" not in text


def test_mstm_receive_with_a_bad_configuration_exits_78_without_a_traceback(
        tmp_path: Path) -> None:
    d = tmp_path / "d"
    d.mkdir()
    conf = write_config(tmp_path, d, overwrite="maybe")
    r = subprocess.run([str(BIN / "mstm-receive"), "--config", str(conf), "inbound"],
                       capture_output=True, text=True, timeout=60)
    assert r.returncode == 78 and "overwrite" in r.stderr and "Traceback" not in r.stderr


def test_rename_noreplace_never_replaces(tmp_path: Path) -> None:
    fd = os.open(tmp_path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        (tmp_path / "a").write_bytes(b"a")
        (tmp_path / "b").write_bytes(b"b")
        with pytest.raises(FileExistsError):
            safefs.rename_noreplace("a", "b", src_dir_fd=fd, dst_dir_fd=fd)
        assert (tmp_path / "b").read_bytes() == b"b"
        safefs.rename_noreplace("a", "c", src_dir_fd=fd, dst_dir_fd=fd)
        assert (tmp_path / "c").read_bytes() == b"a" and not (tmp_path / "a").exists()
    finally:
        os.close(fd)


def test_open_dir_refuses_symlinks_in_every_component(tmp_path: Path) -> None:
    (tmp_path / "a" / "b").mkdir(parents=True)
    (tmp_path / "a" / "l").symlink_to(tmp_path / "a" / "b")
    fd = os.open(tmp_path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.close(safefs.open_dir(["a", "b"], fd))
        for parts in (["a", "l"], ["a", "l", "x"]):
            with pytest.raises(OSError) as info:
                safefs.open_dir(parts, fd, create=True)
            assert info.value.errno in (errno.ELOOP, errno.ENOTDIR)
        assert not (tmp_path / "a" / "b" / "x").exists()
    finally:
        os.close(fd)
