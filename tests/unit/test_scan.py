"""scan(): readiness of a stream's items (settle, open-for-write, markers, odd names)."""

from __future__ import annotations

import contextlib
import os
import shutil
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest

from mstm import safefs
from mstm.errors import EXIT_CONFIG
from mstm.pause import is_paused
from mstm.scan import (
    Candidate,
    ScanReport,
    StreamDirectoryError,
    marker_for,
    scan,
)

LATER = 3600.0  # seconds: "now" far enough in the future that everything has settled


def stream(directory: Path, **overrides: Any) -> SimpleNamespace:
    """A stand-in for mstm.config.StreamConfig with the attributes scan uses."""
    values: dict[str, Any] = {
        "directory": directory,
        "transfer_unit": "file",
        "settle_seconds": 10.0,
        "ignore_patterns": (),
        "ready_marker": None,
        "follow_symlinks": False,
        "outgoing": SimpleNamespace(stop_file=".stop"),
    }
    values.update(overrides)
    return SimpleNamespace(**values)


def later() -> float:
    return time.time() + LATER


def no_writers(_: Path) -> set[tuple[int, int]]:
    return set()


def ready_names(report: ScanReport) -> list[str]:
    return [c.relpath for c in report.ready]


def write(path: Path, data: bytes = b"x") -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)
    return path


HOLDER = """
import sys
f = open(sys.argv[1], sys.argv[2])
print("open", flush=True)
sys.stdin.readline()
"""


class Holder:
    """A child process holding a file open until release()."""

    def __init__(self, path: Path, mode: str) -> None:
        self.child = subprocess.Popen(
            [sys.executable, "-c", HOLDER, os.fsdecode(path), mode],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
        )
        assert self.child.stdout is not None
        assert self.child.stdout.readline().strip() == "open"

    def release(self) -> None:
        assert self.child.stdin is not None
        self.child.stdin.write("\n")
        self.child.stdin.close()
        self.child.wait(10)

    def __enter__(self) -> Holder:
        return self

    def __exit__(self, *exc: object) -> None:
        self.child.kill()
        self.child.wait()


# -- settle ----------------------------------------------------------------------------


def test_fresh_file_is_waiting_and_next_check_says_when_it_settles(tmp_path: Path) -> None:
    write(tmp_path / "new.dat")
    now = time.time()
    report = scan(stream(tmp_path, settle_seconds=30), now=now, open_files=no_writers)
    assert report.ready == []
    assert report.waiting == 1
    assert report.next_check is not None
    assert 29 <= report.next_check <= 30


def test_settled_file_is_ready_with_its_size_and_mtime(tmp_path: Path) -> None:
    f = write(tmp_path / "a.dat", b"hello")
    report = scan(stream(tmp_path), now=later())
    st = f.stat()
    assert report.ready == [Candidate("a.dat", 5, st.st_mtime_ns, is_dir=False)]
    assert report.waiting == 0
    assert report.next_check is None
    assert report.skipped == []


def test_mtime_set_into_the_past_does_not_make_a_fresh_file_ready(tmp_path: Path) -> None:
    f = write(tmp_path / "copied-with-p.dat")
    past = time.time() - 86400
    os.utime(f, (past, past))  # what cp -p or tar do; ctime becomes "now"
    report = scan(stream(tmp_path, settle_seconds=60), now=time.time(), open_files=no_writers)
    assert report.ready == [] and report.waiting == 1
    settled = scan(stream(tmp_path, settle_seconds=60), now=time.time() + 61)
    assert ready_names(settled) == ["copied-with-p.dat"]
    assert settled.ready[0].mtime_ns == f.stat().st_mtime_ns  # the real (past) mtime


def test_mtime_in_the_future_does_not_hold_a_file_back_forever(tmp_path: Path) -> None:
    f = write(tmp_path / "from-fast-clock.dat")
    future = time.time() + 10 * 365 * 86400
    os.utime(f, (future, future))
    report = scan(stream(tmp_path, settle_seconds=5), now=time.time() + 6)
    assert ready_names(report) == ["from-fast-clock.dat"]


def test_next_check_is_the_earliest_of_the_settling_items(tmp_path: Path) -> None:
    write(tmp_path / "a")
    write(tmp_path / "b")
    now = time.time()
    report = scan(stream(tmp_path, settle_seconds=5), now=now, open_files=no_writers)
    assert report.waiting == 2
    assert report.next_check is not None and 4 <= report.next_check <= 5


def test_zero_settle_seconds_makes_an_untouched_file_ready_at_once(tmp_path: Path) -> None:
    write(tmp_path / "a")
    report = scan(stream(tmp_path, settle_seconds=0), now=time.time() + 0.01)
    assert ready_names(report) == ["a"]


SLOW_WRITER = """
import sys, time
for _ in range(int(sys.argv[2])):
    with open(sys.argv[1], "ab") as f:   # open, append one byte, close: no fd held between
        f.write(b"x")
    time.sleep(1)
"""


def test_file_written_one_byte_per_second_is_never_ready(tmp_path: Path) -> None:
    target = tmp_path / "slow.dat"
    writer = subprocess.Popen([sys.executable, "-c", SLOW_WRITER, str(target), "4"])
    s = stream(tmp_path, settle_seconds=2)
    scans = 0
    try:
        while writer.poll() is None:
            alive_before = writer.poll() is None
            report = scan(s)
            if alive_before and writer.poll() is None:
                scans += 1
                assert "slow.dat" not in ready_names(report)
            time.sleep(0.1)
    finally:
        writer.kill()
        writer.wait()
    assert scans >= 10
    report = scan(s, now=time.time() + 2.5)
    assert report.ready == [Candidate("slow.dat", 4, target.stat().st_mtime_ns, is_dir=False)]


# -- open for writing --------------------------------------------------------------------


def test_file_held_open_for_writing_by_a_process_is_not_ready_until_closed(
    tmp_path: Path,
) -> None:
    f = write(tmp_path / "held.dat")
    write(tmp_path / "other.dat")
    with Holder(f, "ab") as holder:
        report = scan(stream(tmp_path), now=later())
        assert ready_names(report) == ["other.dat"]
        assert report.waiting == 1
        holder.release()
        report = scan(stream(tmp_path), now=later())
        assert ready_names(report) == ["held.dat", "other.dat"]


def test_file_open_read_only_does_not_block(tmp_path: Path) -> None:
    f = write(tmp_path / "read.dat")
    with Holder(f, "rb"), open(f, "rb"):
        assert ready_names(scan(stream(tmp_path), now=later())) == ["read.dat"]


def test_open_files_is_asked_once_per_scan_and_only_when_something_is_otherwise_ready(
    tmp_path: Path,
) -> None:
    calls: list[Path] = []

    def counting(under: Path) -> set[tuple[int, int]]:
        calls.append(under)
        return set()

    for i in range(5):
        write(tmp_path / f"f{i}")
    scan(stream(tmp_path), now=time.time(), open_files=counting)  # all still settling
    assert calls == []
    scan(stream(tmp_path), now=later(), open_files=counting)
    assert calls == [tmp_path]


def test_item_reported_open_by_the_open_files_source_waits(tmp_path: Path) -> None:
    f = write(tmp_path / "f")
    st = f.stat()
    report = scan(stream(tmp_path), now=later(), open_files=lambda _: {(st.st_dev, st.st_ino)})
    assert report.ready == [] and report.waiting == 1


# -- names ----------------------------------------------------------------------------


ODD_NAMES = [
    b"with space.dat",
    b"new\nline.dat",
    b"-leading-dash",
    "ünïcödé-ßπ.dat".encode(),
    b"not-utf8-\xff\xfe.dat",
    b"tab\there",
    b"back\\slash",
    b"brace{name}.dat",
    b"quote'\"`$(echo).dat",
    b"sub dir/\xe9latin1/\xc3(bad-utf8).dat",
]


def test_odd_names_come_back_as_the_exact_bytes(tmp_path: Path) -> None:
    root = os.fsencode(tmp_path)
    for name in ODD_NAMES:
        full = os.path.join(root, name)
        os.makedirs(os.path.dirname(full), exist_ok=True)
        with open(full, "wb") as f:
            f.write(b"data")
    report = scan(stream(tmp_path), now=later())
    got = [os.fsencode(c.relpath) for c in report.ready]
    assert sorted(got) == sorted(ODD_NAMES)
    assert report.skipped == []
    for c in report.ready:  # every relpath can be used to open the file
        assert os.path.getsize(os.path.join(root, os.fsencode(c.relpath))) == 4


def test_ready_items_are_sorted_by_the_bytes_of_their_path(tmp_path: Path) -> None:
    root = os.fsencode(tmp_path)
    names = [b"\xff", "é".encode(), b"a", b"Z", b"a-dir/x", b"a.b"]
    for name in names:
        full = os.path.join(root, name)
        os.makedirs(os.path.dirname(full), exist_ok=True)
        open(full, "wb").close()
    got = [os.fsencode(c.relpath) for c in scan(stream(tmp_path), now=later()).ready]
    assert got == sorted(names)


def test_dot_files_and_dot_directories_are_never_items(tmp_path: Path) -> None:
    for rel in [
        ".hidden",
        ".stop",
        ".dir/inside.dat",
        ".mstm-partial/part.dat",
        "sub/.rsync-tmp.aBcDeF",
        "sub/.deeper/x",
        "keep.dat",
        "sub/keep2.dat",
    ]:
        write(tmp_path / rel)
    report = scan(stream(tmp_path), now=later())
    assert ready_names(report) == ["keep.dat", "sub/keep2.dat"]
    assert report.waiting == 0 and report.skipped == []


def test_ignore_patterns_match_base_names_and_prune_matching_directories(
    tmp_path: Path,
) -> None:
    for rel in ["a.tmp", "sub/b~", "work.tmp/c.dat", "sub/c.dat", "tmpnot.dat"]:
        write(tmp_path / rel)
    report = scan(stream(tmp_path, ignore_patterns=("*.tmp", "*~")), now=later())
    assert ready_names(report) == ["sub/c.dat", "tmpnot.dat"]
    assert report.skipped == []


def make_deep(root: Path, depth: int) -> str:
    """A chain of *depth* directories named "d" with a file at the bottom; its relpath."""
    fd = os.open(root, os.O_RDONLY | os.O_DIRECTORY)
    try:
        for _ in range(depth):
            os.mkdir("d", dir_fd=fd)
            sub = os.open("d", os.O_RDONLY | os.O_DIRECTORY, dir_fd=fd)
            os.close(fd)
            fd = sub
        os.close(os.open("leaf.dat", os.O_WRONLY | os.O_CREAT, dir_fd=fd))
    finally:
        os.close(fd)
    return "/".join(["d"] * depth) + "/leaf.dat"


def remove_deep(root: Path) -> None:
    """Undo make_deep(), even a partial one, without recursion (shutil.rmtree recurses)."""
    d_flags = os.O_RDONLY | os.O_DIRECTORY
    fd = os.open(root, d_flags)
    levels = 0
    try:
        while True:
            try:
                sub = os.open("d", d_flags, dir_fd=fd)
            except FileNotFoundError:
                break
            os.close(fd)
            fd = sub
            levels += 1
        with contextlib.suppress(FileNotFoundError):
            os.unlink("leaf.dat", dir_fd=fd)
        for _ in range(levels):
            parent = os.open("..", d_flags, dir_fd=fd)
            os.close(fd)
            fd = parent
            os.rmdir("d", dir_fd=fd)
    finally:
        os.close(fd)


@pytest.fixture
def deep_tree(tmp_path: Path) -> Iterator[Any]:
    yield lambda depth: make_deep(tmp_path, depth)
    remove_deep(tmp_path)


def test_deep_tree_is_walked_without_recursion_limits(tmp_path: Path, deep_tree: Any) -> None:
    rel = deep_tree(1500)
    assert ready_names(scan(stream(tmp_path), now=later())) == [rel]


def test_tree_deeper_than_path_max_is_reported_not_raised(tmp_path: Path, deep_tree: Any) -> None:
    deep_tree(2100)  # 4,200 characters of relative path
    report = scan(stream(tmp_path), now=later())
    assert report.ready == []
    assert len(report.skipped) == 1
    assert "File name too long" in report.skipped[0][1]


# -- special files and symlinks ---------------------------------------------------------


def scan_in_thread(s: SimpleNamespace, **kw: Any) -> ScanReport:
    """Run scan() in a thread so a hang fails the test instead of blocking it."""
    result: list[ScanReport] = []
    t = threading.Thread(target=lambda: result.append(scan(s, **kw)), daemon=True)
    t.start()
    t.join(20)
    assert not t.is_alive(), "scan hung"
    return result[0]


def test_fifo_and_socket_are_skipped_without_hanging(tmp_path: Path) -> None:
    os.mkfifo(tmp_path / "pipe")
    write(tmp_path / "ok.dat")
    sock = socket.socket(socket.AF_UNIX)
    try:
        sock.bind(os.fsdecode(tmp_path / "sock"))
        report = scan_in_thread(stream(tmp_path), now=later())
    finally:
        sock.close()
    assert ready_names(report) == ["ok.dat"]
    reasons = dict(report.skipped)
    assert "FIFO" in reasons["pipe"]
    assert "socket" in reasons["sock"]


def test_fifo_as_ready_marker_or_stop_file_does_not_hang(tmp_path: Path) -> None:
    write(tmp_path / "a.dat")
    os.mkfifo(tmp_path / "a.dat.done")
    os.mkfifo(tmp_path / ".stop")
    report = scan_in_thread(stream(tmp_path, ready_marker="{name}.done"), now=later())
    assert ready_names(report) == ["a.dat"]
    assert is_paused(stream(tmp_path)) is not None


def make_links(root: Path) -> None:
    write(root / "target.dat", b"12345")
    (root / "realdir").mkdir()
    write(root / "realdir" / "inner.dat")
    (root / "to-file").symlink_to("target.dat")
    (root / "to-dir").symlink_to("realdir")
    (root / "loop").symlink_to(".")
    (root / "dangling").symlink_to("nowhere")


def test_symlinks_are_skipped_when_not_followed(tmp_path: Path) -> None:
    make_links(tmp_path)
    report = scan_in_thread(stream(tmp_path, follow_symlinks=False), now=later())
    assert ready_names(report) == ["realdir/inner.dat", "target.dat"]
    skipped = dict(report.skipped)
    assert set(skipped) == {"to-file", "to-dir", "loop", "dangling"}
    assert all("symbolic link" in r for r in skipped.values())


def test_followed_symlink_to_a_file_is_an_item_but_directories_are_never_walked_into(
    tmp_path: Path,
) -> None:
    make_links(tmp_path)
    report = scan_in_thread(stream(tmp_path, follow_symlinks=True), now=later())
    assert ready_names(report) == ["realdir/inner.dat", "target.dat", "to-file"]
    link = next(c for c in report.ready if c.relpath == "to-file")
    assert link.size == 5 and not link.is_dir
    skipped = dict(report.skipped)
    assert set(skipped) == {"to-dir", "loop", "dangling"}
    assert "directory" in skipped["to-dir"] and "dangling" in skipped["dangling"]


@pytest.mark.skipif(os.geteuid() != 0, reason="needs root to give a link another owner")
def test_a_followed_link_to_a_file_of_another_owner_is_skipped(tmp_path: Path) -> None:
    """Whoever can write the stream's directory must not have mstm send what mstm alone
    can read (its ssh key, say): a link is followed only to its owner's files (or root's
    links anywhere)."""
    secret = tmp_path.parent / f"{tmp_path.name}-key"
    write(secret, b"-----BEGIN OPENSSH PRIVATE KEY-----")  # owned by root, like mstm's
    (tmp_path / "mine.dat").symlink_to(secret)
    os.lchown(tmp_path / "mine.dat", 4242, 4242)  # a user's link to it
    (tmp_path / "roots.dat").symlink_to(secret)  # root's own link: allowed
    report = scan_in_thread(stream(tmp_path, follow_symlinks=True), now=later())
    assert ready_names(report) == ["roots.dat"]
    assert "another owner" in dict(report.skipped)["mine.dat"]


def test_followed_symlink_to_a_file_held_open_for_writing_waits(tmp_path: Path) -> None:
    target = tmp_path.parent / f"{tmp_path.name}-outside.dat"
    write(target)
    (tmp_path / "link").symlink_to(target)
    st = target.stat()
    report = scan(
        stream(tmp_path, follow_symlinks=True),
        now=later(),
        open_files=lambda _: {(st.st_dev, st.st_ino)},
    )
    assert report.ready == [] and report.waiting == 1


def test_followed_symlink_loop_and_link_to_a_fifo_are_skipped_without_hanging(
    tmp_path: Path,
) -> None:
    (tmp_path / "loop-a").symlink_to("loop-b")
    (tmp_path / "loop-b").symlink_to("loop-a")
    os.mkfifo(tmp_path / "pipe")
    (tmp_path / "to-pipe").symlink_to("pipe")
    write(tmp_path / "ok.dat")
    report = scan_in_thread(stream(tmp_path, follow_symlinks=True), now=later())
    assert ready_names(report) == ["ok.dat"]
    skipped = dict(report.skipped)
    assert "Too many levels of symbolic links" in skipped["loop-a"]
    assert "Too many levels of symbolic links" in skipped["loop-b"]
    assert skipped["to-pipe"] == "symbolic link to a FIFO (named pipe)"


def test_in_a_directory_unit_links_are_never_items_and_a_unit_holding_one_is_refused(
        tmp_path: Path) -> None:
    write(tmp_path / "run1" / "a")
    (tmp_path / "run1" / "inside").symlink_to(tmp_path / "outside.dat")
    write(tmp_path / "run2" / "b")
    write(tmp_path / "outside.dat", b"12345")
    (tmp_path / "to-run1").symlink_to("run1")
    (tmp_path / "to-file").symlink_to("outside.dat")
    report = scan_in_thread(stream(tmp_path, transfer_unit="dir", follow_symlinks=True),
                            now=later())
    assert ready_names(report) == ["run2"]
    skipped = dict(report.skipped)
    assert skipped["run1"] == ("holds a symbolic link (run1/inside): a directory unit "
                               "carries only regular files and directories")
    assert skipped["to-run1"] == "symbolic link to a directory (never followed)"
    assert skipped["to-file"] == "symbolic link, not a directory (transfer_unit = dir)"


def test_the_ready_marker_is_named_relative_to_the_stream_directory() -> None:
    assert marker_for("{name}.done", "a/b.dat") == "a/b.dat.done"
    assert marker_for("{name}/COMPLETE", "run1") == "run1/COMPLETE"
    assert marker_for(None, "a/b.dat") is None


# -- things changing under the scan ---------------------------------------------------


class _Listed:
    """What os.scandir returns, with the listing taken before a saboteur runs."""

    def __init__(self, entries: list[os.DirEntry[str]]) -> None:
        self.entries = entries

    def __enter__(self) -> _Listed:
        return self

    def __exit__(self, *exc: object) -> None:
        pass

    def __iter__(self) -> Iterator[os.DirEntry[str]]:
        return iter(self.entries)


def test_items_deleted_between_listing_and_stat_are_skipped_without_raising(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    write(tmp_path / "stays.dat")
    write(tmp_path / "victim.dat")
    write(tmp_path / "victimdir" / "inner.dat")
    write(tmp_path / "sub" / "victim2.dat")
    real_scandir = os.scandir

    def sabotaged(path: Any) -> Any:
        with real_scandir(path) as it:
            entries = list(it)
        for e in entries:  # vanish after readdir, before stat / before descending
            if e.name.startswith("victim"):
                p = tmp_path / ("sub" if e.name == "victim2.dat" else "") / e.name
                shutil.rmtree(p) if e.is_dir() else os.unlink(p)
        return _Listed(entries)

    monkeypatch.setattr(os, "scandir", sabotaged)
    report = scan(stream(tmp_path), now=later())
    assert ready_names(report) == ["stays.dat"]
    assert report.skipped == [] and report.waiting == 0


def test_scanning_while_files_and_directories_come_and_go_never_raises(tmp_path: Path) -> None:
    stop = threading.Event()

    def churn() -> None:
        i = 0
        while not stop.is_set():
            d = tmp_path / f"d{i % 5}"
            try:
                d.mkdir(exist_ok=True)
                for j in range(10):
                    (d / f"f{j}").write_bytes(b"x")
                shutil.rmtree(d)
            except OSError:
                pass
            i += 1

    t = threading.Thread(target=churn, daemon=True)
    t.start()
    try:
        for _ in range(200):
            scan(stream(tmp_path), now=later())
            scan(stream(tmp_path, transfer_unit="dir"), now=later())
    finally:
        stop.set()
        t.join()


def test_unreadable_subdirectory_is_reported_and_the_rest_is_scanned(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    write(tmp_path / "secret" / "x.dat")
    write(tmp_path / "open.dat")
    real_open = safefs.open_beneath

    def denying(root_fd: int, path: Any, *a: Any, **kw: Any) -> int:
        if path == "secret":
            raise PermissionError(13, "Permission denied")
        return real_open(root_fd, path, *a, **kw)

    monkeypatch.setattr(safefs, "open_beneath", denying)
    report = scan(stream(tmp_path), now=later())
    assert ready_names(report) == ["open.dat"]
    assert report.skipped == [("secret", "cannot read directory: Permission denied")]


def test_missing_stream_directory_raises_a_config_error(tmp_path: Path) -> None:
    with pytest.raises(StreamDirectoryError) as exc:
        scan(stream(tmp_path / "absent"))
    assert exc.value.exit_code == EXIT_CONFIG
    assert "absent" in exc.value.message


def test_stream_directory_given_through_a_symlink_is_scanned(tmp_path: Path) -> None:
    real = tmp_path / "real"
    write(real / "a.dat")
    (tmp_path / "link").symlink_to(real)
    assert ready_names(scan(stream(tmp_path / "link"), now=later())) == ["a.dat"]


# -- ready markers ------------------------------------------------------------------------


def test_ready_marker_next_to_the_file_is_required_and_is_never_an_item(
    tmp_path: Path,
) -> None:
    write(tmp_path / "a" / "b.dat")
    write(tmp_path / "a" / "b.dat.done")
    write(tmp_path / "c.dat")
    write(tmp_path / "orphan.done")
    report = scan(stream(tmp_path, ready_marker="{name}.done"), now=later())
    assert ready_names(report) == ["a/b.dat"]
    assert report.waiting == 1  # c.dat
    assert report.next_check is None  # a marker's arrival cannot be predicted
    assert report.skipped == []


def test_ready_marker_inside_a_directory_unit(tmp_path: Path) -> None:
    write(tmp_path / "run1" / "data.bin")
    write(tmp_path / "run1" / "COMPLETE")
    write(tmp_path / "run2" / "data.bin")
    report = scan(
        stream(tmp_path, transfer_unit="dir", ready_marker="{name}/COMPLETE"), now=later()
    )
    assert ready_names(report) == ["run1"]
    assert report.waiting == 1


def test_ready_marker_file_beside_a_directory_unit_is_not_reported_as_skipped(
    tmp_path: Path,
) -> None:
    write(tmp_path / "run1" / "data.bin")
    write(tmp_path / "run1.done")
    report = scan(stream(tmp_path, transfer_unit="dir", ready_marker="{name}.done"), now=later())
    assert ready_names(report) == ["run1"]
    assert report.skipped == []


# -- directory units ----------------------------------------------------------------------


def test_directory_unit_aggregates_size_and_newest_mtime_of_its_tree(tmp_path: Path) -> None:
    run = tmp_path / "run1"
    write(run / "a.bin", b"1" * 100)
    write(run / "deep" / "er" / "b.bin", b"2" * 23)
    write(run / ".hidden-inside", b"3" * 7)  # part of the directory, counted
    t = 1_600_000_000
    times = {run / "a.bin": t, run / "deep" / "er" / "b.bin": t + 50}
    for d in [run / "deep" / "er", run / "deep", run]:
        times[d] = t + 10
    times[run / ".hidden-inside"] = t + 5
    for p, when in times.items():
        os.utime(p, (when, when))
    report = scan(stream(tmp_path, transfer_unit="dir"), now=later())
    assert report.ready == [Candidate("run1", 130, (t + 50) * 1_000_000_000, is_dir=True)]


def test_directory_unit_with_one_file_still_changing_is_not_ready(tmp_path: Path) -> None:
    run = tmp_path / "run1"
    for i in range(5):
        write(run / f"sub{i}" / "f.bin")
    s = stream(tmp_path, transfer_unit="dir", settle_seconds=1.0)
    time.sleep(1.2)
    assert ready_names(scan(s)) == ["run1"]
    with open(run / "sub3" / "f.bin", "ab") as f:
        f.write(b"more")
    report = scan(s, open_files=no_writers)
    assert report.ready == [] and report.waiting == 1
    assert report.next_check is not None and 0.5 < report.next_check <= 1.0


def test_directory_unit_with_a_file_held_open_for_writing_is_not_ready(
    tmp_path: Path,
) -> None:
    write(tmp_path / "run1" / "x.bin")
    write(tmp_path / "run1" / "nested" / ".partial")
    write(tmp_path / "run2" / "y.bin")
    s = stream(tmp_path, transfer_unit="dir")
    with Holder(tmp_path / "run1" / "nested" / ".partial", "ab") as holder:
        report = scan(s, now=later())
        assert ready_names(report) == ["run2"] and report.waiting == 1
        holder.release()
    assert ready_names(scan(s, now=later())) == ["run1", "run2"]


def test_directory_unit_skips_top_level_files_and_special_entries(tmp_path: Path) -> None:
    write(tmp_path / "loose.dat")
    write(tmp_path / ".stop")
    write(tmp_path / ".staging" / "x")
    write(tmp_path / "run1" / "a")
    os.mkfifo(tmp_path / "run1" / "fifo-inside")  # inside a unit: not opened, no hang
    (tmp_path / "run1" / "link-inside").symlink_to("/")
    (tmp_path / "dirlink").symlink_to("run1")
    os.mkfifo(tmp_path / "fifo")
    write(tmp_path / "run2" / "b")
    (tmp_path / "run2" / "empty").mkdir()  # empty directories belong to a unit
    report = scan_in_thread(stream(tmp_path, transfer_unit="dir"), now=later())
    assert ready_names(report) == ["run2"]
    assert report.ready[0].is_dir and report.ready[0].size == 1
    skipped = dict(report.skipped)
    assert skipped["loose.dat"] == "not a directory (transfer_unit = dir)"
    assert "symbolic link" in skipped["dirlink"]
    assert "FIFO" in skipped["fifo"]
    assert skipped["run1"].startswith("holds a FIFO (named pipe) (run1/fifo-inside)")
    assert set(skipped) == {"loose.dat", "dirlink", "fifo", "run1"}


def test_directory_unit_whose_subdirectory_vanishes_mid_scan_counts_as_changing(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    write(tmp_path / "run1" / "keep" / "a")
    write(tmp_path / "run1" / "gone" / "b")
    real_listdir = os.listdir

    def sabotaged(path: Any) -> Any:
        names = real_listdir(path)
        if "gone" in names:
            shutil.rmtree(tmp_path / "run1" / "gone")
        return names

    monkeypatch.setattr(os, "listdir", sabotaged)
    now = time.time() + 100
    report = scan(stream(tmp_path, transfer_unit="dir", settle_seconds=5), now=now)
    assert report.ready == [] and report.waiting == 1
    assert report.next_check == pytest.approx(5.0)


# -- pause ------------------------------------------------------------------------------


def test_is_paused_while_the_local_stop_file_exists(tmp_path: Path) -> None:
    s = stream(tmp_path)
    assert is_paused(s) is None
    (tmp_path / ".stop").write_text("disk space LOW (mstm-diskwatch)\nmore\n")
    reason = is_paused(s)
    assert reason is not None
    assert str(tmp_path / ".stop") in reason and "disk space LOW (mstm-diskwatch)" in reason
    (tmp_path / ".stop").unlink()
    assert is_paused(s) is None


def test_is_paused_honours_the_configured_stop_file_name(tmp_path: Path) -> None:
    s = stream(tmp_path, outgoing=SimpleNamespace(stop_file="PAUSE"))
    write(tmp_path / ".stop")
    assert is_paused(s) is None
    write(tmp_path / "PAUSE", b"")
    assert is_paused(s) == f"stop file {tmp_path / 'PAUSE'} exists"


# -- scale --------------------------------------------------------------------------------


def test_scanning_twenty_thousand_files_completes(tmp_path: Path) -> None:
    for d in range(200):
        sub = tmp_path / f"dir{d:03d}"
        sub.mkdir()
        for i in range(100):
            (sub / f"file{i:03d}.dat").write_bytes(b"x")
    t0 = time.perf_counter()
    report = scan(stream(tmp_path), now=later())
    t_file = time.perf_counter() - t0
    t0 = time.perf_counter()
    dirs = scan(stream(tmp_path, transfer_unit="dir"), now=later())
    t_dir = time.perf_counter() - t0
    t0 = time.perf_counter()
    settling = scan(stream(tmp_path), now=time.time())
    t_settling = time.perf_counter() - t0
    print(
        f"\nscan of 20,000 files: {t_file:.3f} s (file units, all ready), "
        f"{t_settling:.3f} s (all settling), {t_dir:.3f} s (200 directory units)"
    )
    assert len(report.ready) == 20_000
    assert len(dirs.ready) == 200 and sum(c.size for c in dirs.ready) == 20_000
    assert settling.waiting == 20_000


def test_file_written_by_a_process_in_another_mount_namespace_is_not_ready(
    tmp_path: Path,
) -> None:
    """The writer holds the file through its own bind mount, in its own mount namespace:
    the path it holds leads nowhere near the stream directory, its inode does (#12)."""
    from tests.conftest import need, need_root

    need_root()
    unshare = need("unshare")
    stream_dir = tmp_path / "stream"
    f = write(stream_dir / "growing.dat")
    write(stream_dir / "done.dat")
    other = tmp_path / "other"
    other.mkdir()
    writer = (
        'import sys\nf = open(sys.argv[1], "ab")\nprint("open", flush=True)\n'
        "sys.stdin.readline()\n"
    )
    script = 'mount --bind "$1" "$2" && exec "$3" -c "$4" "$2/growing.dat"'
    child = subprocess.Popen(
        [unshare, "-m", "--propagation", "private", "sh", "-c", script, "sh",
         os.fsdecode(stream_dir), os.fsdecode(other), sys.executable, writer],
        stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True,
    )
    try:
        assert child.stdout is not None
        assert child.stdout.readline().strip() == "open"
        report = scan(stream(stream_dir), now=later())
        assert ready_names(report) == ["done.dat"] and report.waiting == 1
    finally:
        child.kill()
        child.wait()
    assert f.exists()
    assert ready_names(scan(stream(stream_dir), now=later())) == ["done.dat", "growing.dat"]
