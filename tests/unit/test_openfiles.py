"""open_for_writing(): real processes holding real files open."""

from __future__ import annotations

import os
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from tests.conftest import need, need_root

from mstm.openfiles import held_for_writing, open_for_writing


def ident(path: Path) -> tuple[int, int]:
    st = os.stat(path)
    return (st.st_dev, st.st_ino)


HOLDER = """
import sys
f = open(sys.argv[1], sys.argv[2])
print("open", flush=True)
sys.stdin.readline()
f.close()
print("closed", flush=True)
sys.stdin.readline()
"""


@contextmanager
def held_open(path: Path, mode: str) -> Iterator[subprocess.Popen[str]]:
    """A child python process holding *path* open with *mode* until the block ends."""
    child = subprocess.Popen(
        [sys.executable, "-c", HOLDER, os.fsdecode(path), mode],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert child.stdout is not None and child.stdin is not None
        assert child.stdout.readline().strip() == "open"
        yield child
    finally:
        child.kill()
        child.wait()


def close_in_child(child: subprocess.Popen[str]) -> None:
    assert child.stdin is not None and child.stdout is not None
    child.stdin.write("\n")
    child.stdin.flush()
    assert child.stdout.readline().strip() == "closed"


def test_file_held_open_for_appending_by_another_process_is_reported(tmp_path: Path) -> None:
    f = tmp_path / "data.bin"
    f.write_bytes(b"x")
    with held_open(f, "ab") as child:
        assert ident(f) in open_for_writing(tmp_path)
        close_in_child(child)
        assert ident(f) not in open_for_writing(tmp_path)


def test_file_open_read_write_is_reported(tmp_path: Path) -> None:
    f = tmp_path / "rw.bin"
    f.write_bytes(b"x")
    with held_open(f, "r+b"):
        assert ident(f) in open_for_writing(tmp_path)


def test_file_open_read_only_is_not_reported(tmp_path: Path) -> None:
    f = tmp_path / "ro.bin"
    f.write_bytes(b"x")
    with held_open(f, "rb"), open(f, "rb"):
        assert ident(f) not in open_for_writing(tmp_path)


def test_file_open_for_writing_by_this_process_is_reported(tmp_path: Path) -> None:
    f = tmp_path / "mine.bin"
    with open(f, "wb") as out:
        out.write(b"x")
        assert ident(f) in open_for_writing(tmp_path)
    assert ident(f) not in open_for_writing(tmp_path)


def test_files_on_other_devices_are_not_reported(tmp_path: Path) -> None:
    """Matching is by device: a writer on another filesystem is not listed.  (Files
    elsewhere on the same filesystem may be; callers intersect with their own inodes.)"""
    shm = Path("/dev/shm")
    assert shm.is_dir() and os.stat(shm).st_dev != os.stat(tmp_path).st_dev
    fd, name = tempfile.mkstemp(dir=shm, prefix="mstm-test-")
    try:
        assert ident(Path(name)) not in open_for_writing(tmp_path)
        assert ident(Path(name)) in open_for_writing(shm)
    finally:
        os.close(fd)
        os.unlink(name)


def test_devices_parameter_selects_the_filesystems_looked_at(tmp_path: Path) -> None:
    f = tmp_path / "f"
    with open(f, "wb"):
        assert ident(f) in open_for_writing(tmp_path, devices={ident(f)[0]})
        assert ident(f) not in open_for_writing(tmp_path, devices={os.stat("/dev/shm").st_dev})
        assert ident(f) not in open_for_writing(tmp_path, devices=set())


def test_nested_file_is_reported_and_directory_given_through_a_symlink_is_resolved(
    tmp_path: Path,
) -> None:
    real = tmp_path / "real"
    (real / "a" / "b").mkdir(parents=True)
    link = tmp_path / "link"
    link.symlink_to(real)
    f = real / "a" / "b" / "deep.bin"
    with open(f, "ab"):
        assert ident(f) in open_for_writing(link)


def test_deleted_file_still_held_open_is_not_reported(tmp_path: Path) -> None:
    f = tmp_path / "gone.bin"
    with open(f, "wb"):
        key = ident(f)
        os.unlink(f)
        assert key not in open_for_writing(tmp_path)


def test_file_literally_named_deleted_is_reported(tmp_path: Path) -> None:
    f = tmp_path / "x (deleted)"
    with open(f, "wb"):
        assert ident(f) in open_for_writing(tmp_path)


def test_non_utf8_name_is_reported(tmp_path: Path) -> None:
    f = os.path.join(os.fsencode(tmp_path), b"bad\xff\xfename")
    with open(f, "wb"):
        st = os.stat(f)
        assert (st.st_dev, st.st_ino) in open_for_writing(tmp_path)


def test_processes_exiting_during_the_walk_do_not_raise(tmp_path: Path) -> None:
    children = [
        subprocess.Popen([sys.executable, "-c", "pass"], stdout=subprocess.DEVNULL)
        for _ in range(20)
    ]
    try:
        for _ in range(20):
            open_for_writing(tmp_path)
    finally:
        for c in children:
            c.wait()


def test_missing_directory_gives_empty_set(tmp_path: Path) -> None:
    assert open_for_writing(tmp_path / "nope") == set()


def test_open_for_writing_cost_is_reported(tmp_path: Path) -> None:
    n = 20
    t0 = time.perf_counter()
    for _ in range(n):
        open_for_writing(tmp_path)
    per_call = (time.perf_counter() - t0) / n
    nfds = 0
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            nfds += len(os.listdir(f"/proc/{pid}/fd"))
        except OSError:
            pass
    print(f"\nopen_for_writing(): {per_call * 1000:.2f} ms per call, ~{nfds} fds on this host")


# -- writers holding the file under another path (issue #12, class 3) -----------------


def test_file_opened_through_a_symlinked_directory_is_reported(tmp_path: Path) -> None:
    stream_dir = tmp_path / "stream"
    stream_dir.mkdir()
    (tmp_path / "elsewhere").mkdir()
    link = tmp_path / "elsewhere" / "link"
    link.symlink_to(stream_dir)
    f = stream_dir / "data.bin"
    f.write_bytes(b"x")
    with held_open(link / "data.bin", "ab"):
        assert ident(f) in open_for_writing(stream_dir)
        assert held_for_writing({ident(f)}) == {ident(f)}


def test_file_opened_through_a_hard_link_in_another_directory_is_reported(
    tmp_path: Path,
) -> None:
    stream_dir = tmp_path / "stream"
    other = tmp_path / "other"
    stream_dir.mkdir()
    other.mkdir()
    f = stream_dir / "data.bin"
    f.write_bytes(b"x")
    os.link(f, other / "same-inode.bin")
    with held_open(other / "same-inode.bin", "ab"):
        assert ident(f) in open_for_writing(stream_dir)
        assert held_for_writing({ident(f)}) == {ident(f)}


@contextmanager
def bind_mounted(source: Path, target: Path) -> Iterator[Path]:
    need_root()
    need("mount")
    target.mkdir()
    subprocess.run(["mount", "--bind", os.fsdecode(source), os.fsdecode(target)], check=True)
    try:
        yield target
    finally:
        subprocess.run(["umount", "-l", os.fsdecode(target)], check=True)


def test_file_opened_through_a_bind_mount_of_the_directory_is_reported(tmp_path: Path) -> None:
    stream_dir = tmp_path / "stream"
    stream_dir.mkdir()
    f = stream_dir / "data.bin"
    f.write_bytes(b"x")
    with bind_mounted(stream_dir, tmp_path / "bound") as bound, held_open(
        bound / "data.bin", "r+b"
    ):
        assert ident(f) in open_for_writing(stream_dir)
        assert held_for_writing({ident(f)}) == {ident(f)}


def test_held_for_writing_answers_only_for_the_keys_asked(tmp_path: Path) -> None:
    w = tmp_path / "written.bin"
    r = tmp_path / "read.bin"
    idle = tmp_path / "idle.bin"
    for p in (w, r, idle):
        p.write_bytes(b"x")
    with held_open(w, "ab") as writer, held_open(r, "rb"):
        assert held_for_writing({ident(w), ident(r), ident(idle)}) == {ident(w)}
        assert held_for_writing({ident(r)}) == set()
        assert held_for_writing(set()) == set()
        close_in_child(writer)
        assert held_for_writing({ident(w)}) == set()


def test_held_for_writing_cost_is_reported(tmp_path: Path) -> None:
    f = tmp_path / "f"
    f.write_bytes(b"x")
    keys = {ident(f)}
    n = 20
    t0 = time.perf_counter()
    for _ in range(n):
        held_for_writing(keys)
    per_call = (time.perf_counter() - t0) / n
    nprocs = sum(1 for p in os.listdir("/proc") if p.isdigit())
    print(f"\nheld_for_writing(): {per_call * 1000:.2f} ms per call, {nprocs} processes")
