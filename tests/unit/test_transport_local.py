"""The local transport on this host's file system, including a hung copy."""

from __future__ import annotations

import hashlib
import os
import threading
from pathlib import Path

import pytest

from mstm.errors import TargetUnavailable
from mstm.protocol import new_batch_id
from mstm.transports.base import Item, TransportOptions, staging_dir
from mstm.transports.local import Local


def make(tmp_path: Path, **kw: object) -> tuple[Local, Path, Path]:
    src, dst = tmp_path / "src", tmp_path / "dst"
    src.mkdir()
    dst.mkdir()
    options = TransportOptions(source_dir=src, target_dir=str(dst), **kw)  # type: ignore[arg-type]
    return Local(options), src, dst


def test_open_fails_when_the_target_directory_is_missing(tmp_path: Path) -> None:
    t = Local(TransportOptions(source_dir=tmp_path, target_dir=str(tmp_path / "not-mounted")))
    with pytest.raises(TargetUnavailable, match="No such file"):
        t.open()
    assert not t.alive()


def test_files_arrive_with_mode_and_mtime_and_inspect_hashes_the_copy(tmp_path: Path) -> None:
    t, src, dst = make(tmp_path)
    (src / "d").mkdir()
    (src / "d" / "a b.dat").write_bytes(b"x" * 5000)
    os.chmod(src / "d" / "a b.dat", 0o640)
    os.utime(src / "d" / "a b.dat", ns=(1, 1_000_000_000))
    t.open()
    batch = new_batch_id()
    r = t.send([Item("d/a b.dat", 5000)], dest=staging_dir(str(dst), batch))
    assert (r.files, r.bytes, r.error) == (1, 5000, "")
    assert not (dst / "d").exists()  # nothing under its final name before publish
    got = t.inspect(["d/a b.dat", "d", "missing"], staged=batch)
    assert got["d/a b.dat"].sha256 == hashlib.sha256(b"x" * 5000).hexdigest()
    assert got["d"].sha256 is None and "missing" not in got
    assert t.publish([Item("d/a b.dat", 5000)], staged=batch) == {}
    t.discard(batch)
    st = os.stat(dst / "d" / "a b.dat")
    assert (st.st_mode & 0o777, st.st_mtime_ns) == (0o640, 1_000_000_000)
    assert sorted(os.listdir(dst / "d")) == ["a b.dat"]  # no temporary file left
    assert os.listdir(dst / ".mstm-staging") == []
    final = t.inspect(["d/a b.dat"])
    assert final["d/a b.dat"].size == 5000


def test_a_hung_copy_is_cut_after_stall_seconds_and_nothing_appears(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    t, src, dst = make(tmp_path, stall_seconds=0.5)
    (src / "f.dat").write_bytes(b"y" * 100_000)
    release = threading.Event()

    def hung(*args: object) -> int:
        release.wait(5)  # a write to a hard-mounted NFS server that went away
        raise OSError(5, "Input/output error")

    monkeypatch.setattr(os, "copy_file_range", hung)
    t.open()
    r = t.send([Item("f.dat", 100_000)])
    release.set()
    assert "stalled" in r.error
    assert not t.alive()  # the sender backs off and retries
    assert not (dst / "f.dat").exists()


def test_an_error_of_the_file_system_fails_the_batch_not_the_item(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    t, src, _dst = make(tmp_path)
    (src / "f.dat").write_bytes(b"z")

    def full(*args: object) -> int:
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(os, "copy_file_range", full)
    t.open()
    r = t.send([Item("f.dat", 1)])
    assert "No space left" in r.error and r.item_errors == {}
    assert not t.alive()


def test_directories_are_staged_then_merged_keeping_what_was_there(tmp_path: Path) -> None:
    t, src, dst = make(tmp_path)
    (src / "run" / "sub").mkdir(parents=True)
    (src / "run" / "sub" / "f").write_bytes(b"new")
    (dst / "run").mkdir()
    (dst / "run" / "old").write_bytes(b"old")
    t.open()
    batch = new_batch_id()
    r = t.send([Item("run", 3, is_dir=True)], dest=staging_dir(str(dst), batch))
    assert r.files == 1 and not (dst / "run" / "sub").exists()  # not visible yet
    staged = t.inspect(["run/sub/f", "run/sub"], staged=batch)
    assert staged["run/sub/f"].size == 3 and staged["run/sub"].sha256 is None
    assert t.publish([Item("run", 3, is_dir=True)], staged=batch) == {}
    t.discard(batch)
    assert sorted(os.listdir(dst / "run")) == ["old", "sub"]
    assert (dst / "run" / "sub" / "f").read_bytes() == b"new"
    assert os.listdir(dst / ".mstm-staging") == []


def test_without_dest_a_file_goes_to_its_final_name_through_a_hidden_one(
        tmp_path: Path) -> None:
    t, src, dst = make(tmp_path)
    (src / "f").write_bytes(b"f")
    t.open()
    r = t.send([Item("f", 1), Item("f", 1, is_dir=True)])
    assert r.files == 1 and set(r.item_errors) == {"f"}
    assert os.listdir(dst) == ["f"]


def test_the_handshake_files_and_the_stop_file(tmp_path: Path) -> None:
    t, _src, dst = make(tmp_path, stop_dirs=(str(tmp_path / "dst" / "in"),))
    t.open()
    t.put_file(str(dst / "in"), "batch.ctrl", b"hello")
    assert (dst / "in" / "batch.ctrl").read_bytes() == b"hello"
    assert t.await_file(str(dst / "in"), "batch.ctrl", timeout=1, max_bytes=3) == b"hel"
    assert t.await_file(str(dst / "in"), "none", timeout=0.2, max_bytes=3) is None
    assert t.stop_file_present() is None
    (dst / "in" / ".stop").touch()
    assert t.stop_file_present()
