"""The sender's own sha256 of a source: what it hashes is what the transport sends."""

from __future__ import annotations

import errno
import hashlib
import os
import threading
from pathlib import Path
from typing import Any

import pytest

import mstm.send.digests as sender
from mstm import safefs
from mstm.safefs import Version
from mstm.send.digests import _hash_file, local_digest
from mstm.spool import ItemRecord


def record(path: Path, relpath: str, *, is_dir: bool = False) -> ItemRecord:
    st = path.stat()  # follows a link: the version the scanner records for it
    return ItemRecord(relpath, st.st_size, st.st_mtime_ns, is_dir)


def test_a_followed_link_is_hashed_as_the_file_it_points_to_and_counts_as_unchanged(
        tmp_path: Path) -> None:
    outside = tmp_path / "outside.dat"
    outside.write_bytes(b"pointed-to" * 1000)
    src = tmp_path / "src"
    src.mkdir()
    (src / "link.dat").symlink_to(outside)

    d = local_digest(src, record(src / "link.dat", "link.dat"), follow_symlinks=True)

    assert d.changed is None
    assert d.sha256 == hashlib.sha256(outside.read_bytes()).hexdigest()
    assert d.versions == {"link.dat": Version.of(outside.stat())}


def test_a_link_is_not_read_through_when_links_are_not_followed(tmp_path: Path) -> None:
    (tmp_path / "real.dat").write_bytes(b"x")
    (tmp_path / "link.dat").symlink_to("real.dat")
    with pytest.raises(OSError) as err:
        local_digest(tmp_path, record(tmp_path / "link.dat", "link.dat"), follow_symlinks=False)
    assert err.value.errno == errno.ELOOP
    with safefs.opened_root(tmp_path) as root:
        assert _hash_file(root, "link.dat", follow_symlinks=True)[2]


def test_a_source_turned_into_a_fifo_is_refused_without_hanging(tmp_path: Path) -> None:
    (tmp_path / "a.dat").write_bytes(b"x")
    rec = record(tmp_path / "a.dat", "a.dat")
    (tmp_path / "a.dat").unlink()
    os.mkfifo(tmp_path / "a.dat")
    errors: list[BaseException] = []

    def hash_it() -> None:
        try:
            local_digest(tmp_path, rec)
        except BaseException as e:  # handed to the test
            errors.append(e)

    t = threading.Thread(target=hash_it, daemon=True)
    t.start()
    t.join(10)
    assert not t.is_alive(), "hashing a FIFO hung"
    assert len(errors) == 1 and isinstance(errors[0], OSError)
    assert "FIFO" in str(errors[0])


def test_a_file_replaced_while_hashed_is_not_stable(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    (tmp_path / "a.dat").write_bytes(b"x" * 1000)
    path = os.fsencode(tmp_path / "a.dat")
    root = safefs.open_root(tmp_path)
    version, _digest, stable = _hash_file(root, "a.dat")
    assert stable and version.size == 1000
    # another file of the same size and times is renamed over it while it is read
    st = os.stat(path)
    (tmp_path / "b.dat").write_bytes(b"y" * 1000)
    os.utime(tmp_path / "b.dat", ns=(st.st_atime_ns, st.st_mtime_ns))
    real_open = open

    def open_then_replace(fd: int, *args: Any, **kw: Any) -> Any:
        f = real_open(fd, *args, **kw)
        os.replace(tmp_path / "b.dat", tmp_path / "a.dat")
        return f

    monkeypatch.setattr(sender, "open", open_then_replace, raising=False)
    assert _hash_file(root, "a.dat")[2] is False  # the file at the path is not the one hashed
    os.close(root)


def test_a_directory_item_holding_a_link_is_refused_and_nothing_outside_is_read(
        tmp_path: Path) -> None:
    (tmp_path / "outside.dat").write_bytes(b"secret")
    run = tmp_path / "src" / "run1"
    (run / "sub").mkdir(parents=True)
    (run / "sub" / "a").write_bytes(b"a")
    (run / "link").symlink_to(tmp_path / "outside.dat")
    (run / "dirlink").symlink_to(tmp_path)

    d = local_digest(tmp_path / "src", record(run, "run1", is_dir=True))

    assert d.changed and "symbolic link" in d.changed
    assert "run1/link" not in d.files and "run1/dirlink" not in d.files


def test_a_directory_items_empty_directories_are_listed_for_the_target_to_show(
        tmp_path: Path) -> None:
    run = tmp_path / "src" / "run1"
    (run / "logs").mkdir(parents=True)
    (run / "data" / "raw").mkdir(parents=True)
    (run / "data" / "x").write_bytes(b"x")

    d = local_digest(tmp_path / "src", record(run, "run1", is_dir=True))

    assert d.changed is None and d.dirs == ["run1/data/raw", "run1/logs"]
    assert sorted(d.files) == ["run1/data/x"]


@pytest.mark.parametrize("follow", [False, True])
def test_a_source_whose_directory_became_a_link_out_of_the_stream_is_never_read(
        tmp_path: Path, follow: bool) -> None:
    """class 1 of issue 12: src/sub swapped for a link to a directory outside the stream,
    holding a file of the same name, size and mtime as the queued one."""
    src, outside = tmp_path / "src", tmp_path / "outside"
    (src / "sub").mkdir(parents=True)
    (src / "sub" / "a.dat").write_bytes(b"public")
    rec = record(src / "sub" / "a.dat", "sub/a.dat")
    outside.mkdir()
    (outside / "a.dat").write_bytes(b"SECRET")
    st = (src / "sub" / "a.dat").stat()
    os.utime(outside / "a.dat", ns=(st.st_atime_ns, st.st_mtime_ns))
    (src / "sub" / "a.dat").unlink()
    (src / "sub").rmdir()
    (src / "sub").symlink_to(outside)

    with pytest.raises(OSError) as err:
        local_digest(src, rec, follow_symlinks=follow)
    assert err.value.errno in (errno.ELOOP, errno.ENOTDIR)
