"""Writers the path of an open file does not lead to (issue #12, class 3).

A process in another mount namespace, writing through its own bind mount of the stream
directory, and a process that writes through a shared writable memory map after closing
its descriptor: both must be seen by open_for_writing() and held_for_writing(), so the
file is not sent (or its source deleted) while it is still being written.  Readers, and
private (copy-on-write) maps, must not be reported.
"""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest
from tests.conftest import need, need_root

from mstm.openfiles import held_for_writing, open_for_writing

pytestmark = pytest.mark.integration

WRITER = """
import sys
f = open(sys.argv[1], "ab")
f.write(b"first half")
f.flush()
print("open", flush=True)
sys.stdin.readline()
"""

READER = """
import sys
f = open(sys.argv[1], "rb")
print("open", flush=True)
sys.stdin.readline()
"""

# Maps the file with the libc mmap() (Python's mmap module keeps a dup of the descriptor,
# which would hide the case), closes the descriptor, writes through the map, and waits.
MAPPER = """
import ctypes, os, sys
path, share, prot_write = sys.argv[1], sys.argv[2], sys.argv[3] == "w"
libc = ctypes.CDLL(None, use_errno=True)
libc.mmap.restype = ctypes.c_void_p
libc.mmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int, ctypes.c_int,
                      ctypes.c_int, ctypes.c_long]
PROT_READ, PROT_WRITE, MAP_SHARED, MAP_PRIVATE = 1, 2, 1, 2
fd = os.open(path, os.O_RDWR if prot_write else os.O_RDONLY)
size = os.fstat(fd).st_size
prot = PROT_READ | (PROT_WRITE if prot_write else 0)
addr = libc.mmap(None, size, prot, MAP_SHARED if share == "shared" else MAP_PRIVATE, fd, 0)
if addr in (None, ctypes.c_void_p(-1).value):
    raise OSError(ctypes.get_errno(), "mmap")
os.close(fd)
if prot_write:
    ctypes.memmove(addr, b"written through the map", 23)
print("mapped", flush=True)
sys.stdin.readline()
"""


def ident(path: Path) -> tuple[int, int]:
    st = os.stat(path)
    return (st.st_dev, st.st_ino)


@contextmanager
def child(argv: list[str], ready: str) -> Iterator[subprocess.Popen[str]]:
    proc = subprocess.Popen(argv, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    try:
        assert proc.stdout is not None
        line = proc.stdout.readline().strip()
        assert line == ready, f"child said {line!r}, exit status {proc.poll()}"
        yield proc
    finally:
        proc.kill()
        proc.wait()


def fd_targets(pid: int) -> list[str]:
    fd_dir = f"/proc/{pid}/fd"
    return [os.readlink(f"{fd_dir}/{n}") for n in os.listdir(fd_dir)]


@pytest.fixture
def stream_dir(tmp_path: Path) -> Path:
    d = tmp_path / "stream"
    d.mkdir()
    return d


def test_writer_in_another_mount_namespace_through_its_own_bind_mount_is_seen(
    tmp_path: Path, stream_dir: Path
) -> None:
    need_root()
    unshare = need("unshare")
    f = stream_dir / "f"
    f.write_bytes(b"")
    other = tmp_path / "other"  # an empty directory here; the stream directory in there
    other.mkdir()
    script = 'mount --bind "$1" "$2" && exec "$3" -c "$4" "$2/f"'
    argv = [unshare, "-m", "--propagation", "private", "sh", "-c", script, "sh",
            os.fsdecode(stream_dir), os.fsdecode(other), sys.executable, WRITER]
    with child(argv, "open") as writer:
        # the writer's view: it holds .../other/f, a name that in our namespace is an
        # empty directory's would-be child; the path leads nowhere near the stream dir
        assert any(t.endswith("/other/f") for t in fd_targets(writer.pid))
        assert not (other / "f").exists()
        assert ident(f) in open_for_writing(stream_dir)
        assert held_for_writing({ident(f)}) == {ident(f)}
    assert ident(f) not in open_for_writing(stream_dir)
    assert held_for_writing({ident(f)}) == set()


def test_shared_writable_map_without_a_descriptor_is_seen(stream_dir: Path) -> None:
    f = stream_dir / "mapped.bin"
    f.write_bytes(b"\0" * 8192)
    with child([sys.executable, "-c", MAPPER, os.fsdecode(f), "shared", "w"], "mapped") as p:
        assert os.fsdecode(f) not in fd_targets(p.pid)  # only the map holds it
        assert ident(f) in open_for_writing(stream_dir)
        assert held_for_writing({ident(f)}) == {ident(f)}
        assert f.read_bytes().startswith(b"written through the map")
    assert ident(f) not in open_for_writing(stream_dir)
    assert held_for_writing({ident(f)}) == set()


def test_shared_writable_map_in_another_mount_namespace_is_seen(
    tmp_path: Path, stream_dir: Path
) -> None:
    need_root()
    unshare = need("unshare")
    f = stream_dir / "mapped.bin"
    f.write_bytes(b"\0" * 4096)
    other = tmp_path / "other"
    other.mkdir()
    script = 'mount --bind "$1" "$2" && exec "$3" -c "$4" "$2/mapped.bin" shared w'
    argv = [unshare, "-m", "--propagation", "private", "sh", "-c", script, "sh",
            os.fsdecode(stream_dir), os.fsdecode(other), sys.executable, MAPPER]
    with child(argv, "mapped"):
        assert ident(f) in open_for_writing(stream_dir)
        assert held_for_writing({ident(f)}) == {ident(f)}


@pytest.mark.parametrize(
    ("share", "write"),
    [("private", "w"), ("shared", "r"), ("private", "r")],
    ids=["private-writable", "shared-read-only", "private-read-only"],
)
def test_maps_that_cannot_change_the_file_are_not_reported(
    stream_dir: Path, share: str, write: str
) -> None:
    f = stream_dir / "mapped.bin"
    f.write_bytes(b"\0" * 4096)
    with child([sys.executable, "-c", MAPPER, os.fsdecode(f), share, write], "mapped") as p:
        assert os.fsdecode(f) not in fd_targets(p.pid)
        maps = Path(f"/proc/{p.pid}/maps").read_text()
        assert os.fsdecode(f) in maps  # the map is there, and is not a writable shared one
        assert ident(f) not in open_for_writing(stream_dir)
        assert held_for_writing({ident(f)}) == set()
    assert f.read_bytes() == b"\0" * 4096


def test_reader_in_another_mount_namespace_is_not_reported(
    tmp_path: Path, stream_dir: Path
) -> None:
    need_root()
    unshare = need("unshare")
    f = stream_dir / "f"
    f.write_bytes(b"x")
    other = tmp_path / "other"
    other.mkdir()
    script = 'mount --bind "$1" "$2" && exec "$3" -c "$4" "$2/f"'
    argv = [unshare, "-m", "--propagation", "private", "sh", "-c", script, "sh",
            os.fsdecode(stream_dir), os.fsdecode(other), sys.executable, READER]
    with child(argv, "open"):
        assert ident(f) not in open_for_writing(stream_dir)
        assert held_for_writing({ident(f)}) == set()
