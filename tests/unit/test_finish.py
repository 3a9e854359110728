"""mstm.send.finish: deleting a delivered source; and what a scan does with a source whose
id is already in done/ (mstm.scan.enqueue_ready): in move mode it is sent again, never
deleted unsent.  Driven directly, and through the real mstm-scan command with a ``local``
stream (no server needed).
"""

from __future__ import annotations

import hashlib
import logging
import os
import subprocess
import sys
import time
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest

from mstm.safefs import Version
from mstm.scan import enqueue_ready, scan
from mstm.send import finish
from mstm.send.finish import Verified, delete_source
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


def version(path: Path, *, follow: bool = True) -> Version:
    return Version.of(os.stat(path, follow_symlinks=follow))


def proof(versions: dict[str, Version], root: Path | None = None, *,
          hashed_at_ns: int | None = None, sha: dict[str, str] | None = None) -> Verified:
    """What a sender proved of these files: their versions and sha256, hashed now (or at
    *hashed_at_ns*)."""
    digests = sha if sha is not None else {
        rel: hashlib.sha256((root / rel).read_bytes()).hexdigest() if root else ""
        for rel in versions}
    return Verified(versions, digests,
                    time.time_ns() + 10**10 if hashed_at_ns is None else hashed_at_ns)


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


def no_writers(keys: set[tuple[int, int]]) -> set[tuple[int, int]]:
    return set()


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

    assert delete_source(s, "link.dat", proof({"link.dat": version(outside)}), False,
                         writers=no_writers)

    assert not os.path.lexists(src / "link.dat")
    assert outside.read_bytes() == b"pointed-to"


def test_a_link_is_never_deleted_when_links_are_not_followed(
        linked: tuple[Path, Path]) -> None:
    src, outside = linked
    assert not delete_source(stream(src), "link.dat", proof({"link.dat": version(outside)}),
                             False, writers=no_writers)
    assert os.path.islink(src / "link.dat")


def test_a_file_changed_after_delivery_is_kept_with_a_warning(
        tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    (tmp_path / "a.dat").write_bytes(b"v1")
    v1 = version(tmp_path / "a.dat")
    os.utime(tmp_path / "a.dat", ns=(v1.mtime_ns, v1.mtime_ns + 1_000_000))
    with caplog.at_level(logging.WARNING, logger="mstm"):
        assert not delete_source(stream(tmp_path), "a.dat", proof({"a.dat": v1}), False,
                                 writers=no_writers)
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
        assert not delete_source(s, "sub/a.dat", proof({"sub/a.dat": v}), False,
                                 writers=no_writers)
    assert (elsewhere / "a.dat").read_bytes() == b"x"


def test_a_deletion_is_logged_as_a_source_deleted_event_and_its_marker_goes(
        tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    (tmp_path / "sub").mkdir()
    (tmp_path / "sub" / "a.dat").write_bytes(b"x")
    (tmp_path / "sub" / "a.dat.done").write_bytes(b"")
    s = stream(tmp_path, ready_marker="{name}.done")
    with caplog.at_level(logging.DEBUG, logger="mstm"):
        assert delete_source(s, "sub/a.dat", proof({"sub/a.dat": version(tmp_path / "sub/a.dat")}),
                             False, level=logging.INFO, writers=no_writers)
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

    assert not delete_source(s, "run1", proof(versions), True, writers=no_writers)
    assert (tmp_path / "run1" / "late").exists()  # what came meanwhile stays
    assert sorted(os.listdir(tmp_path / "run1")) == ["late"]  # the verified files went


# -- content that changes after it was hashed (issue 12, class 2) -----------------------


def hashed(path: Path) -> tuple[Version, str]:
    return version(path), hashlib.sha256(path.read_bytes()).hexdigest()


def test_a_rewrite_in_place_with_the_mtime_put_back_keeps_the_source(tmp_path: Path) -> None:
    """Same size, `touch -r` afterwards: only ctime tells."""
    f = tmp_path / "a.dat"
    f.write_bytes(b"A" * 4096)
    v, sha = hashed(f)
    time.sleep(0.01)
    with open(f, "r+b") as w:
        w.write(b"B" * 4096)
    os.utime(f, ns=(v.mtime_ns, v.mtime_ns))
    assert (os.stat(f).st_size, os.stat(f).st_mtime_ns) == (v.size, v.mtime_ns)

    gone = delete_source(stream(tmp_path), "a.dat", proof({"a.dat": v}, sha={"a.dat": sha}),
                         False, writers=no_writers)
    assert not gone and f.read_bytes() == b"B" * 4096


def test_a_file_renamed_over_the_source_with_the_same_size_and_mtime_is_kept(
        tmp_path: Path) -> None:
    f = tmp_path / "a.dat"
    f.write_bytes(b"A" * 4096)
    v, sha = hashed(f)
    (tmp_path / ".new").write_bytes(b"B" * 4096)
    os.utime(tmp_path / ".new", ns=(v.mtime_ns, v.mtime_ns))
    os.replace(tmp_path / ".new", f)

    gone = delete_source(stream(tmp_path), "a.dat", proof({"a.dat": v}, sha={"a.dat": sha}),
                         False, writers=no_writers)
    assert not gone and f.read_bytes() == b"B" * 4096


def test_a_file_still_mapped_shared_and_writable_is_kept(tmp_path: Path) -> None:
    """A writer through a shared mmap moves no time until its pages are written back:
    the real check of /proc finds the mapping."""
    f = tmp_path / "a.dat"
    f.write_bytes(b"A" * 4096)
    v, sha = hashed(f)
    writer = subprocess.Popen(
        [sys.executable, "-c",
         "import mmap, os, sys\n"
         "fd = os.open(sys.argv[1], os.O_RDWR)\n"
         "m = mmap.mmap(fd, 4096, mmap.MAP_SHARED, mmap.PROT_READ | mmap.PROT_WRITE)\n"
         "os.close(fd)\n"
         "print('mapped', flush=True)\n"
         "sys.stdin.readline()\n"
         "m[:1] = b'B'\n"
         "m.flush()\n", os.fsdecode(f)],
        stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    try:
        assert writer.stdout is not None and writer.stdout.readline().strip() == "mapped"
        gone = delete_source(stream(tmp_path), "a.dat",
                             proof({"a.dat": v}, sha={"a.dat": sha}), False)
        assert not gone and f.exists()
    finally:
        assert writer.stdin is not None
        writer.stdin.write("\n")
        writer.stdin.close()
        writer.wait(10)
    assert f.read_bytes()[:1] == b"B"  # the writer's data is there, nothing lost


def test_a_file_still_open_for_writing_is_kept(tmp_path: Path) -> None:
    f = tmp_path / "a.dat"
    f.write_bytes(b"A" * 10)
    v, sha = hashed(f)
    with open(f, "ab"):
        gone = delete_source(stream(tmp_path), "a.dat",
                             proof({"a.dat": v}, sha={"a.dat": sha}), False)
    assert not gone and f.exists()


def test_where_times_cannot_prove_it_the_file_is_hashed_again_before_it_goes(
        tmp_path: Path) -> None:
    """A change within the same timestamp tick as the hash leaves every time as it was:
    a file changed just before it was hashed is read again, and kept on a mismatch."""
    f = tmp_path / "a.dat"
    f.write_bytes(b"A" * 100)
    v, sha = hashed(f)
    just_now = os.stat(f).st_ctime_ns + 1_000  # hashed within its ctime's tick
    wrong = {"a.dat": hashlib.sha256(b"other").hexdigest()}
    assert not delete_source(stream(tmp_path), "a.dat",
                             proof({"a.dat": v}, sha=wrong, hashed_at_ns=just_now), False,
                             writers=no_writers)
    assert f.exists()
    assert delete_source(stream(tmp_path), "a.dat",
                         proof({"a.dat": v}, sha={"a.dat": sha}, hashed_at_ns=just_now),
                         False, writers=no_writers)
    assert not f.exists()


def test_a_filesystem_that_keeps_whole_seconds_gets_a_wider_margin_before_a_re_hash() -> None:
    assert finish.unproven_ns(1_700_000_000_123_456_789) == finish.UNPROVEN_FINE_NS
    assert finish.unproven_ns(1_700_000_000_000_000_000) == finish.UNPROVEN_NS


def test_a_directory_item_goes_entry_by_entry_and_what_changed_stays(tmp_path: Path) -> None:
    for rel in ("run1/a", "run1/sub/b", "run1/sub/c"):
        (tmp_path / rel).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / rel).write_bytes(rel.encode())
    versions = {rel: version(tmp_path / rel) for rel in ("run1/a", "run1/sub/b", "run1/sub/c")}
    time.sleep(0.01)
    with open(tmp_path / "run1" / "sub" / "b", "r+b") as w:  # same size, new bytes
        w.write(b"X")
    os.utime(tmp_path / "run1" / "sub" / "b",
             ns=(versions["run1/sub/b"].mtime_ns, versions["run1/sub/b"].mtime_ns))

    gone = delete_source(stream(tmp_path, transfer_unit="dir"), "run1",
                         proof(versions, tmp_path), True, writers=no_writers)
    assert not gone
    assert sorted(p.relative_to(tmp_path).as_posix() for p in (tmp_path / "run1").rglob("*")) \
        == ["run1/sub", "run1/sub/b"]


def test_a_verified_directory_item_1000_levels_deep_is_deleted(tmp_path: Path) -> None:
    fd = os.open(tmp_path, os.O_RDONLY)
    os.mkdir("run1", dir_fd=fd)
    below = os.open("run1", os.O_RDONLY, dir_fd=fd)
    os.close(fd)
    fd = below
    for _ in range(1000):
        os.mkdir("level", dir_fd=fd)
        below = os.open("level", os.O_RDONLY, dir_fd=fd)
        os.close(fd)
        fd = below
    w = os.open("f", os.O_WRONLY | os.O_CREAT, 0o644, dir_fd=fd)
    os.write(w, b"f")
    st = os.fstat(w)
    os.close(w)
    os.close(fd)
    rel = "run1/" + "level/" * 1000 + "f"
    proved = Verified({rel: Version.of(st)}, {rel: hashlib.sha256(b"f").hexdigest()},
                      time.time_ns() + 10**10)

    assert delete_source(stream(tmp_path, transfer_unit="dir"), "run1", proved, True,
                         writers=no_writers)
    assert not (tmp_path / "run1").exists()


# -- a done record and a source still there ----------------------------------------------


def queued(spool_dir: Path) -> list[str]:
    with Spool(spool_dir).open() as spool:
        return sorted(r.relpath for r in spool.iter_records("new"))


def test_in_move_mode_a_new_file_sharing_path_size_and_mtime_with_a_delivered_one_is_sent(
        tmp_path: Path) -> None:
    """cp -p, tar x or rsync -t can bring back a path with the size and mtime of a file
    delivered (and deleted) before: its id is in done/, its bytes are new."""
    src, spool_dir = tmp_path / "src", tmp_path / "spool"
    src.mkdir()
    (src / "daily.dat").write_bytes(b"A" * 100)
    s = stream(src)
    verified(spool_dir, s)
    mtime = os.stat(src / "daily.dat").st_mtime_ns
    (src / "daily.dat").unlink()  # delivered and deleted
    (src / "daily.dat").write_bytes(b"B" * 100)
    os.utime(src / "daily.dat", ns=(mtime, mtime))

    with Spool(spool_dir).open() as spool:
        assert enqueue_ready(s, spool, scan(s, now=_later()).ready) == 1

    assert (src / "daily.dat").read_bytes() == b"B" * 100  # never deleted unsent
    assert queued(spool_dir) == ["daily.dat"]


def test_in_mirror_mode_a_delivered_version_is_not_queued_again(tmp_path: Path) -> None:
    src, spool_dir = tmp_path / "src", tmp_path / "spool"
    src.mkdir()
    (src / "a.dat").write_bytes(b"a")
    s = stream(src, outgoing=SimpleNamespace(stop_file=".stop", transfer_mode="mirror"))
    verified(spool_dir, s)

    with Spool(spool_dir).open() as spool:
        assert enqueue_ready(s, spool, scan(s, now=_later()).ready) == 0
    assert (src / "a.dat").exists() and queued(spool_dir) == []


def test_a_deletion_that_fails_says_why_and_keeps_the_source(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    (tmp_path / "a.dat").write_bytes(b"a")

    def refuse(*args: Any, **kw: Any) -> None:
        raise PermissionError(13, "Permission denied")

    monkeypatch.setattr(finish.os, "unlink", refuse)
    gone = delete_source(stream(tmp_path), "a.dat", proof({"a.dat": version(tmp_path / "a.dat")}),
                         False, writers=no_writers)
    assert not gone and gone.error == "Permission denied"
    assert (tmp_path / "a.dat").exists()


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


def test_mstm_scan_queues_again_a_source_whose_id_is_done_and_print_deletes_nothing(
        tmp_path: Path) -> None:
    g = configure(tmp_path, transfer_unit="dir")
    (tmp_path / "src" / "run1").mkdir()
    (tmp_path / "src" / "run1" / "a").write_bytes(b"a")
    s = stream(tmp_path / "src", transfer_unit="dir")
    verified(tmp_path / "spool" / "proj1", s)

    printed = mstm_scan(g, "--once", "-0")
    assert printed.returncode == 0, printed.stderr
    assert printed.stdout == os.fsencode(tmp_path / "src" / "run1") + b"\0"

    r = mstm_scan(g, "--once", "-v")
    assert r.returncode == 0, r.stderr
    assert (tmp_path / "src" / "run1" / "a").exists()  # a scan never deletes
    assert queued(tmp_path / "spool" / "proj1") == ["run1"]
