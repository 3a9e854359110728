"""mstm.finish: deleting a delivered source, and finishing a deletion a crash cut short.

The same function serves mstm-send (after its commit, and from its own scan) and
mstm-scan (feeding ``mstm-send --no-scan``); these tests drive it directly, and through
the real mstm-scan command with a ``local`` stream (no server needed).
"""

from __future__ import annotations

import logging
import os
import subprocess
import sys
import time
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest

from mstm.finish import delete_source, finish_deletions
from mstm.scan import scan
from mstm.spool import ItemRecord, Spool

BIN = Path(sys.executable).parent
LATER = 3600.0


def stream(directory: Path, **overrides: Any) -> SimpleNamespace:
    """A stand-in for mstm.config.StreamConfig with what scanning and deleting use."""
    values: dict[str, Any] = {
        "name": "proj1", "directory": directory, "transfer_unit": "file",
        "settle_seconds": 0.0, "ignore_patterns": (), "ready_marker": None,
        "follow_symlinks": False,
        "outgoing": SimpleNamespace(stop_file=".stop", transfer_mode="move"),
    }
    values.update(overrides)
    return SimpleNamespace(**values)


def version(path: Path, *, follow: bool = True) -> tuple[int, int]:
    st = os.stat(path, follow_symlinks=follow)
    return st.st_size, st.st_mtime_ns


def verified(spool_dir: Path, s: SimpleNamespace) -> None:
    """Record every ready item of *s* as verified at the target (done/), as a sender
    killed between its commit and the unlink of the source leaves it."""
    report = scan(s, now=_later())
    with Spool(spool_dir).open() as spool:
        spool.enqueue([ItemRecord(c.relpath, c.size, c.mtime_ns, c.is_dir)
                       for c in report.ready])
        for claim in spool.claim(max_items=1000, max_bytes=1 << 40):
            assert spool.complete(claim, sha256="0" * 64)


def _later() -> float:
    return time.time() + LATER


# -- delete_source -----------------------------------------------------------------------


@pytest.fixture
def linked(tmp_path: Path) -> tuple[Path, Path]:
    """A stream directory holding link.dat, a link to a file outside it: (src, outside)."""
    src = tmp_path / "src"
    src.mkdir()
    outside = tmp_path / "outside.dat"
    outside.write_bytes(b"pointed-to")
    (src / "link.dat").symlink_to(outside)
    return src, outside


def test_a_followed_link_is_deleted_never_the_file_it_points_to(
        linked: tuple[Path, Path]) -> None:
    src, outside = linked
    s = stream(src, follow_symlinks=True)

    assert delete_source(s, "link.dat", {"link.dat": version(outside)}, False, whole=None)

    assert not os.path.lexists(src / "link.dat")
    assert outside.read_bytes() == b"pointed-to"


def test_a_link_is_never_deleted_when_links_are_not_followed(
        linked: tuple[Path, Path]) -> None:
    src, outside = linked
    assert not delete_source(stream(src), "link.dat", {"link.dat": version(outside)}, False,
                             whole=None)
    assert os.path.islink(src / "link.dat")


def test_a_file_changed_after_delivery_is_kept_with_a_warning(
        tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    (tmp_path / "a.dat").write_bytes(b"v1")
    v1 = version(tmp_path / "a.dat")
    os.utime(tmp_path / "a.dat", ns=(v1[1], v1[1] + 1_000_000))
    with caplog.at_level(logging.WARNING, logger="mstm"):
        assert not delete_source(stream(tmp_path), "a.dat", {"a.dat": v1}, False, whole=None)
    assert (tmp_path / "a.dat").exists()
    assert "changed after delivery" in caplog.text


def test_a_directory_swapped_for_a_link_never_leads_the_deletion_outside(
        tmp_path: Path) -> None:
    src = tmp_path / "src"
    (src / "sub").mkdir(parents=True)
    (src / "sub" / "a.dat").write_bytes(b"x")
    v = version(src / "sub" / "a.dat")
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    os.link(src / "sub" / "a.dat", elsewhere / "a.dat")  # the very same version there
    (src / "sub" / "a.dat").unlink()
    (src / "sub").rmdir()
    (src / "sub").symlink_to(elsewhere)

    for follow in (False, True):
        s = stream(src, follow_symlinks=follow)
        assert not delete_source(s, "sub/a.dat", {"sub/a.dat": v}, False, whole=None)
    assert (elsewhere / "a.dat").read_bytes() == b"x"


def test_a_deletion_is_logged_as_a_source_deleted_event_and_its_marker_goes(
        tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    (tmp_path / "sub").mkdir()
    (tmp_path / "sub" / "a.dat").write_bytes(b"x")
    (tmp_path / "sub" / "a.dat.done").write_bytes(b"")
    s = stream(tmp_path, ready_marker="{name}.done")
    with caplog.at_level(logging.DEBUG, logger="mstm"):
        assert delete_source(s, "sub/a.dat", {"sub/a.dat": version(tmp_path / "sub/a.dat")},
                             False, whole=None, level=logging.INFO)
    assert not (tmp_path / "sub" / "a.dat.done").exists()
    (record,) = [r for r in caplog.records if getattr(r, "mstm_event", None)]
    assert record.levelno == logging.INFO
    assert record.mstm_event == "source_deleted"  # type: ignore[attr-defined]
    assert record.mstm_fields == {"stream": "proj1", "item": "sub/a.dat",  # type: ignore[attr-defined]
                                  "result": "source_deleted"}


def test_a_directory_item_is_checked_file_by_file_before_it_goes(tmp_path: Path) -> None:
    (tmp_path / "run1" / "sub").mkdir(parents=True)
    (tmp_path / "run1" / "a").write_bytes(b"a")
    (tmp_path / "run1" / "sub" / "b").write_bytes(b"bb")
    versions = {rel: version(tmp_path / rel) for rel in ("run1/a", "run1/sub/b")}
    s = stream(tmp_path, transfer_unit="dir")
    (tmp_path / "run1" / "late").write_bytes(b"")  # came after it was hashed

    assert not delete_source(s, "run1", versions, True, whole=None)
    assert (tmp_path / "run1" / "late").exists()
    (tmp_path / "run1" / "late").unlink()
    assert delete_source(s, "run1", versions, True, whole=None)
    assert not (tmp_path / "run1").exists()


# -- finish_deletions ----------------------------------------------------------------------


def test_an_item_verified_but_not_deleted_is_deleted_by_the_next_scan(tmp_path: Path) -> None:
    src, spool_dir = tmp_path / "src", tmp_path / "spool"
    src.mkdir()
    (src / "done.dat").write_bytes(b"verified")
    s = stream(src)
    verified(spool_dir, s)
    (src / "new.dat").write_bytes(b"new")

    rest = finish_deletions(s, spool_dir, scan(s, now=_later()).ready)

    assert [c.relpath for c in rest] == ["new.dat"]
    assert sorted(os.listdir(src)) == ["new.dat"]


def test_a_directory_item_is_finished_only_if_its_tree_is_the_verified_one(
        tmp_path: Path) -> None:
    src, spool_dir = tmp_path / "src", tmp_path / "spool"
    (src / "run1" / "sub").mkdir(parents=True)
    (src / "run1" / "sub" / "a").write_bytes(b"aaa")
    (src / "run2").mkdir()
    (src / "run2" / "b").write_bytes(b"b")
    s = stream(src, transfer_unit="dir")
    verified(spool_dir, s)
    ready = scan(s, now=_later()).ready
    (src / "run2" / "c").write_bytes(b"")  # changes run2's tree after the scan looked

    rest = finish_deletions(s, spool_dir, ready)

    assert rest == []
    assert not (src / "run1").exists()
    assert (src / "run2" / "b").exists()


def test_in_mirror_mode_nothing_is_deleted(tmp_path: Path) -> None:
    src, spool_dir = tmp_path / "src", tmp_path / "spool"
    src.mkdir()
    (src / "a.dat").write_bytes(b"a")
    s = stream(src, outgoing=SimpleNamespace(stop_file=".stop", transfer_mode="mirror"))
    verified(spool_dir, s)
    ready = scan(s, now=_later()).ready

    assert finish_deletions(s, spool_dir, ready) == ready
    assert (src / "a.dat").exists()


# -- through mstm-scan ----------------------------------------------------------------------


def configure(root: Path, **data_stream: str) -> Path:
    (root / "src").mkdir(parents=True, exist_ok=True)
    (root / "spool").mkdir(exist_ok=True)
    (root / "global.ini").write_text(
        f"[global]\ndata_stream_list = proj1\nspool_base_dir = {root / 'spool'}\n"
        f"runtime_dir = {root / 'run'}\n")
    extra = "".join(f"{k} = {v}\n" for k, v in data_stream.items())
    (root / "proj1.ini").write_text(
        f"[data_stream]\ndirectory = {root / 'src'}\nsettle_seconds = 0\n{extra}"
        f"[outgoing]\ntransfer_protocol = local\ntarget_dir = {root / 'target'}\n"
        "transfer_mode = move\n")
    return root / "global.ini"


def mstm_scan(global_ini: Path, *args: str) -> subprocess.CompletedProcess[bytes]:
    return subprocess.run([str(BIN / "mstm-scan"), "--config", str(global_ini), *args,
                           "proj1"], capture_output=True, check=False, timeout=60)


def test_mstm_scan_finishes_an_interrupted_deletion_but_print_deletes_nothing(
        tmp_path: Path) -> None:
    g = configure(tmp_path, transfer_unit="dir")
    (tmp_path / "src" / "run1").mkdir()
    (tmp_path / "src" / "run1" / "a").write_bytes(b"a")
    s = stream(tmp_path / "src", transfer_unit="dir")
    verified(tmp_path / "spool" / "proj1", s)

    printed = mstm_scan(g, "--once", "-0")
    assert printed.returncode == 0, printed.stderr
    assert printed.stdout == os.fsencode(tmp_path / "src" / "run1") + b"\0"
    assert (tmp_path / "src" / "run1" / "a").exists()

    r = mstm_scan(g, "--once", "-v")
    assert r.returncode == 0, r.stderr
    assert not (tmp_path / "src" / "run1").exists()
    assert os.listdir(tmp_path / "spool" / "proj1" / "new") == []
