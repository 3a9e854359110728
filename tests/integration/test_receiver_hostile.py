"""Attacks on a real `mstm-receive` process through what any sender may write (issue #12).

Each test runs the real program (``mstm-receive --once`` or ``--follow``) on real files:
a batch directory 1,000 levels deep, names of 255 bytes at depth, symbolic link loops,
FIFOs, sockets and devices in a batch, setuid bits, a full file system.  The receiver
must never crash or hang, must keep answering the other batches, must leave nothing of
a failed batch behind, and must never publish (or keep) a special file or a setuid bit.
"""

from __future__ import annotations

import hashlib
import json
import os
import socket
import stat
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
from tests.conftest import need_root

from mstm import protocol as p
from mstm.protocol import ControlItem, Status

pytestmark = pytest.mark.integration

BIN = Path(sys.executable).parent
RCPT, CTRL, THANKS = "mstm-rcpt", "mstm-ctrl", "mstm-thanks"
DEEP = 1000


def sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


class Target:
    """A receiving stream in *root*: D is root/published, I is D/.mstm-incoming (or
    *incoming*)."""

    def __init__(self, root: Path, directory: Path | None = None,
                 incoming: Path | None = None, **settings: str) -> None:
        self.root = root
        self.D = directory or root / "published"
        self.D.mkdir(parents=True, exist_ok=True)
        self.I = incoming or self.D / ".mstm-incoming"
        etc = root / "etc"
        etc.mkdir(exist_ok=True)
        (root / "spool").mkdir(exist_ok=True)
        self.conf = etc / "global.ini"
        self.conf.write_text(f"[global]\ndata_stream_list = inbound\n"
                             f"spool_base_dir = {root / 'spool'}\n"
                             f"general_poll_interval = 0.2\n")
        inc = dict(settings)
        if incoming is not None:
            inc["incoming_dir"] = str(incoming)
        text = f"[data_stream]\ndirectory = {self.D}\n"
        if inc:
            text += "[incoming]\n" + "".join(f"{k} = {v}\n" for k, v in inc.items())
        (etc / "inbound.ini").write_text(text)
        self.I.mkdir(mode=0o750, exist_ok=True)
        self.log = root / "receive.log"

    def once(self, timeout: float = 120) -> subprocess.CompletedProcess[str]:
        r = subprocess.run([str(BIN / "mstm-receive"), "--config", str(self.conf), "-v",
                            "--once", "--json", "inbound"],
                           capture_output=True, text=True, timeout=timeout)
        with open(self.log, "a") as f:
            f.write(r.stderr)
        return r

    def put(self, batch: str, files: dict[str, bytes]) -> list[ControlItem]:
        items = []
        (self.I / batch).mkdir(exist_ok=True)
        for name, data in files.items():
            write_beneath(self.I / batch, name, data)
            items.append(ControlItem(name, len(data), sha(data)))
        return items

    def control(self, batch: str, items: list[ControlItem]) -> None:
        self.write(f"{batch}.{CTRL}", p.render_control(
            p.Control(batch, "sha256", f"{batch}.{RCPT}", tuple(items))))

    def write(self, name: str, data: bytes) -> None:
        tmp = self.I / f".{name}.tmp"
        tmp.write_bytes(data)
        tmp.rename(self.I / name)

    def send(self, files: dict[str, bytes], batch: str | None = None) -> str:
        batch = batch or p.new_batch_id()
        self.control(batch, self.put(batch, files))
        return batch

    def thank(self, batch: str) -> None:
        self.write(f"{batch}.{THANKS}", p.render_thanks(batch))

    def receipt(self, batch: str) -> dict[str, Status]:
        return dict(p.parse_receipt((self.I / f"{batch}.{RCPT}").read_bytes(),
                                    batch=batch).items)

    def incoming(self) -> list[str]:
        return sorted(n for n in os.listdir(self.I) if n != ".quarantine")

    def quarantined(self) -> list[str]:
        q = self.I / ".quarantine"
        return sorted(os.listdir(q)) if q.exists() else []

    def published(self) -> dict[str, bytes]:
        """Every non-directory in D outside I, from descriptors (no depth limit)."""
        skip = os.path.relpath(self.I, self.D)
        return {rel: data for rel, data in tree(self.D).items()
                if rel != skip and not rel.startswith(skip + "/")}


def tree(top: Path) -> dict[str, bytes]:
    """relpath -> content of each regular file ("<special>" for other non-directories)
    below *top*, walked iteratively from descriptors (no recursion, no PATH_MAX)."""
    out: dict[str, bytes] = {}
    stack = [("", os.open(top, os.O_RDONLY | os.O_DIRECTORY))]
    while stack:
        rel, fd = stack.pop()
        try:
            for name in os.listdir(fd):
                sub = f"{rel}/{name}" if rel else name
                st = os.stat(name, dir_fd=fd, follow_symlinks=False)
                if stat.S_ISDIR(st.st_mode):
                    stack.append((sub, os.open(name, os.O_RDONLY | os.O_DIRECTORY |
                                               os.O_NOFOLLOW, dir_fd=fd)))
                elif stat.S_ISREG(st.st_mode):
                    f = os.open(name, os.O_RDONLY | os.O_NOFOLLOW, dir_fd=fd)
                    with open(f, "rb") as fh:
                        out[sub] = fh.read()
                else:
                    out[sub] = b"<special>"
        finally:
            os.close(fd)
    return out


def write_beneath(top: Path, relpath: str, data: bytes, mode: int = 0o644) -> None:
    """top/relpath with its directories, made from descriptors (any depth)."""
    parts = relpath.split("/")
    fd = os.open(top, os.O_RDONLY | os.O_DIRECTORY)
    try:
        for part in parts[:-1]:
            try:
                os.mkdir(part, dir_fd=fd)
            except FileExistsError:
                pass
            child = os.open(part, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW, dir_fd=fd)
            os.close(fd)
            fd = child
        f = os.open(parts[-1], os.O_WRONLY | os.O_CREAT | os.O_TRUNC, mode, dir_fd=fd)
        with open(f, "wb") as fh:
            fh.write(data)
    finally:
        os.close(fd)


def deep_tree(top: Path, depth: int, name: bytes = b"d", leaf: bytes | None = b"f"
              ) -> None:
    """top/name/name/.../leaf, *depth* directories deep, made from descriptors (the
    path is longer than PATH_MAX)."""
    top.mkdir(parents=True, exist_ok=True)
    fd = os.open(top, os.O_RDONLY | os.O_DIRECTORY)
    try:
        for _ in range(depth):
            os.mkdir(name, dir_fd=fd)
            child = os.open(name, os.O_RDONLY | os.O_DIRECTORY, dir_fd=fd)
            os.close(fd)
            fd = child
        if leaf is not None:
            f = os.open(leaf, os.O_WRONLY | os.O_CREAT, 0o644, dir_fd=fd)
            os.write(f, b"deep")
            os.close(f)
    finally:
        os.close(fd)


def answered(r: subprocess.CompletedProcess[str]) -> dict[str, object]:
    assert r.returncode == 0, r.stderr
    assert "Traceback" not in r.stderr, r.stderr
    out: dict[str, object] = json.loads(r.stdout)
    return out


@pytest.fixture(autouse=True)
def _remove_deep_trees(tmp_path: Path) -> Iterator[None]:
    """pytest's own clean-up of old temp directories recurses (and fails on our trees
    1,000 levels deep): rm(1) removes what a test leaves."""
    yield
    subprocess.run(["rm", "-rf", "--one-file-system", "--", *map(str, tmp_path.iterdir())],
                   check=False)


@pytest.fixture
def target(tmp_path: Path) -> Iterator[Target]:
    yield Target(tmp_path)


# ------------------------------------------------------------------ 1: deep and odd trees


def test_a_thank_you_for_a_batch_1000_levels_deep_is_answered_and_removes_it(
        target: Target) -> None:
    batch = target.send({"a": b"1"})
    deep_tree(target.I / batch, DEEP)
    answered(target.once())
    assert target.receipt(batch) == {"a": Status.OK}
    target.thank(batch)
    for _ in range(2):  # and again: a restart is not stopped by it either
        answered(target.once())
    assert target.incoming() == []
    assert target.published() == {"a": b"1"}


def test_a_batch_with_255_byte_names_1000_levels_deep_is_removed(target: Target) -> None:
    batch = target.send({"a": b"1"})
    deep_tree(target.I / batch, DEEP, name=b"n" * 255, leaf=b"l" * 255)
    answered(target.once())
    target.thank(batch)
    answered(target.once())
    assert target.incoming() == []


def test_a_control_file_naming_items_1000_levels_deep_is_published(target: Target) -> None:
    deep = "/".join(["d"] * DEEP) + "/leaf"
    long = "/".join(["x" * 255] * 14) + "/" + "y" * 255
    assert len(os.fsencode(long)) <= p.PATH_MAX
    batch = target.send({deep: b"deep", long: b"long", "a": b"1"})
    answered(target.once())
    assert target.receipt(batch) == {deep: Status.OK, long: Status.OK, "a": Status.OK}
    assert target.published() == {deep: b"deep", long: b"long", "a": b"1"}
    target.thank(batch)
    answered(target.once())
    assert target.incoming() == []


def special_files(top: Path) -> None:
    """A symlink loop, a FIFO, a socket, a device, a 000 directory and file in *top*."""
    top.mkdir(parents=True, exist_ok=True)
    os.symlink("loop2", top / "loop1")
    os.symlink("loop1", top / "loop2")
    os.symlink(".", top / "self")
    os.mkfifo(top / "fifo")
    s = socket.socket(socket.AF_UNIX)
    cwd = os.getcwd()
    os.chdir(top)  # its full path is too long for a socket address
    try:
        s.bind("sock")
    finally:
        os.chdir(cwd)
        s.close()
    os.mknod(top / "null", 0o666 | stat.S_IFCHR, os.makedev(1, 3))
    (top / "locked").mkdir()
    (top / "locked" / "inner").write_bytes(b"x")
    (top / "locked").chmod(0)
    (top / "nobody").write_bytes(b"x")
    os.chown(top / "nobody", 65534, 65534)
    (top / "nobody").chmod(0)


def test_a_batch_of_links_loops_fifos_sockets_devices_and_000_dirs_is_removed(
        target: Target) -> None:
    need_root()
    batch = target.send({"a": b"1"})
    special_files(target.I / batch / "odd")
    deep_tree(target.I / batch / "odd", 300)
    answered(target.once())
    target.thank(batch)
    answered(target.once())
    assert target.incoming() == []
    assert target.published() == {"a": b"1"}


def test_a_control_file_naming_a_fifo_socket_and_device_refuses_them_without_blocking(
        target: Target) -> None:
    need_root()
    batch = p.new_batch_id()
    items = target.put(batch, {"good": b"1"})
    special_files(target.I / batch)
    odd = [ControlItem(n, 0, sha(b"")) for n in ("fifo", "sock", "null", "loop1", "self")]
    target.control(batch, items + odd)
    answered(target.once(timeout=60))  # a FIFO opened for reading would block forever
    assert target.receipt(batch) == {"good": Status.OK, **{i.relpath: Status.REFUSED
                                                          for i in odd}}
    assert target.published() == {"good": b"1"}
    target.thank(batch)
    answered(target.once())
    assert target.incoming() == []


# ------------------------------------------------------------------ 2: leftovers of a crash


def test_leftover_staging_of_a_crash_is_removed_at_start_but_nobody_elses_data(
        target: Target) -> None:
    staging = target.I / ".mstm-staging"
    dead = staging / "20240101T000000000000-0123456789ab"
    dead.mkdir(parents=True)
    (dead / ("12-" + "0" * 40)).write_bytes(b"half")
    (dead / ("3-" + "a" * 40 + ".part")).write_bytes(b"part")
    deep_tree(staging / "old-batch", DEEP)  # mstm never stages a directory: not ours
    mine = staging / "notes"  # nor anything named like this
    mine.mkdir()
    (mine / "keep.txt").write_bytes(b"user data")
    batch = target.send({"a": b"1"})
    answered(target.once())
    assert target.receipt(batch) == {"a": Status.OK}
    assert sorted(os.listdir(staging)) == ["notes", "old-batch"]
    assert (mine / "keep.txt").read_bytes() == b"user data"
    assert "not something mstm-receive staged" in target.log.read_text()


# ------------------------------------------------------------------ 3: a full file system


@pytest.fixture
def small_fs(tmp_path: Path) -> Iterator[Path]:
    """A real 8 MiB tmpfs, with room for 1,000 inodes."""
    need_root()
    mnt = tmp_path / "small"
    mnt.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=8m,nr_inodes=1000,mode=0755",
                    "tmpfs", str(mnt)], check=True)
    try:
        yield mnt
    finally:
        subprocess.run(["umount", "-l", str(mnt)], check=False)


def fill(path: Path) -> None:
    """Write into *path* until the file system is full."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    try:
        while True:
            os.write(fd, b"\0" * 4096)
    except OSError as err:
        assert err.errno == 28  # ENOSPC
    finally:
        os.close(fd)


@pytest.mark.parametrize("layout", ["incoming-elsewhere", "incoming-inside"])
def test_after_enospc_a_batch_fails_leaves_nothing_behind_and_the_next_succeeds(
        tmp_path: Path, small_fs: Path, layout: str) -> None:
    incoming = tmp_path / "incoming" if layout == "incoming-elsewhere" else None
    t = Target(tmp_path, directory=small_fs / "D", incoming=incoming)
    files = {"big/one.dat": os.urandom(3 << 20), "big/two.dat": os.urandom(2 << 20)}
    batch = t.send(files)
    fill(small_fs / "filler")
    r = t.once()
    answered(r)
    if layout == "incoming-inside":  # publishing is a rename: no space needed but for
        answered(t.once())  # the receipt, written once there is room again
        assert not (t.I / f"{batch}.{RCPT}").exists()
        (small_fs / "filler").unlink()
        answered(t.once())
        assert t.receipt(batch) == dict.fromkeys(files, Status.OK)
    else:  # the copy into D's file system failed: a failure receipt, nothing left
        assert set(t.receipt(batch).values()) == {Status.IO_ERROR}, t.log.read_text()
        assert t.published() == {}
        assert sorted(os.listdir(small_fs)) == ["D", "filler"]
        assert os.listdir(small_fs / "D") == []
        (small_fs / "filler").unlink()
        t.thank(batch)
        answered(t.once())
        batch = t.send(files)  # the sender's retry, in a new batch
        answered(t.once())
        assert t.receipt(batch) == dict.fromkeys(files, Status.OK)
    assert t.published() == files
    t.thank(batch)
    answered(t.once())
    assert os.listdir(t.I) == []
    assert sorted(os.listdir(small_fs / "D")) == (
        ["big"] if incoming is not None else [".mstm-incoming", "big"])


def test_with_no_inode_left_for_staging_a_batch_gets_a_failure_receipt_not_a_hang(
        tmp_path: Path, small_fs: Path) -> None:
    t = Target(tmp_path, directory=small_fs / "D", incoming=tmp_path / "incoming")
    files = {"a/x": b"x" * 1000, "b": b"b"}
    batch = t.send(files)
    fillers = small_fs / "fillers"
    fillers.mkdir()
    n = 0
    try:
        while True:
            (fillers / str(n)).touch()
            n += 1
    except OSError as err:
        assert err.errno == 28
    answered(t.once())
    assert t.receipt(batch) == dict.fromkeys(files, Status.IO_ERROR), t.log.read_text()
    assert "No space left" in t.log.read_text()
    subprocess.run(["rm", "-rf", str(fillers)], check=True)
    t.thank(batch)
    answered(t.once())
    batch = t.send(files)
    answered(t.once())
    assert t.receipt(batch) == dict.fromkeys(files, Status.OK)
    assert t.published() == files
    t.thank(batch)
    answered(t.once())
    assert os.listdir(t.I) == [] and sorted(os.listdir(t.D)) == ["a", "b"]


# ------------------------------------------------------------------ 5: permissions


def test_setuid_setgid_and_sticky_bits_never_survive_publication(target: Target) -> None:
    need_root()
    target.D.chmod(0o2775)  # an admin's setgid directory: its new subdirectories inherit it
    batch = p.new_batch_id()
    files = {"bin/suid": b"#!/bin/sh\n", "bin/sgid": b"x", "tmp/sticky": b"y",
             "sticky-dir/f": b"z", "plain": b"p"}
    items = target.put(batch, files)
    src = target.I / batch
    for name, mode in (("bin/suid", 0o4755), ("bin/sgid", 0o2755), ("tmp/sticky", 0o1777),
                       ("plain", 0o640)):
        os.chmod(src / name, mode)
    os.chmod(src / "sticky-dir", 0o1777)
    os.chown(src / "bin/suid", 0, 0)  # a root-owned setuid file: the worst case
    target.control(batch, items)
    answered(target.once())
    assert target.receipt(batch) == dict.fromkeys(files, Status.OK)
    modes = {}
    for rel in [*files, "bin", "tmp", "sticky-dir"]:
        modes[rel] = stat.S_IMODE((target.D / rel).lstat().st_mode)
    assert {rel: m & 0o7000 for rel, m in modes.items()} == dict.fromkeys(modes, 0)
    assert modes["bin/suid"] == 0o755 and modes["plain"] == 0o640
    assert modes["tmp/sticky"] == 0o777


# ------------------------------------------------------------------ 4, 6: merge, never replace


def test_a_second_delivery_of_a_directory_merges_into_it_and_removes_nothing(
        target: Target) -> None:
    first = target.send({"run42/a": b"1", "run42/sub/b": b"2"})
    answered(target.once())
    (target.D / "run42" / "local-notes").write_bytes(b"the user's own file")
    second = target.send({"run42/c": b"3", "run42/sub/d": b"4", "run42/a": b"1"})
    answered(target.once())
    assert target.receipt(first) == dict.fromkeys(["run42/a", "run42/sub/b"], Status.OK)
    assert target.receipt(second) == dict.fromkeys(["run42/c", "run42/sub/d", "run42/a"],
                                                   Status.OK)
    assert target.published() == {"run42/a": b"1", "run42/sub/b": b"2", "run42/c": b"3",
                                  "run42/sub/d": b"4", "run42/local-notes":
                                  b"the user's own file"}
    assert not (target.D / ".mstm-staging").exists()


def test_type_conflicts_and_symlinked_directories_leave_the_target_untouched(
        target: Target, tmp_path: Path) -> None:
    outside = tmp_path / "outside"
    outside.mkdir()
    (target.D / "run" / "isdir").mkdir(parents=True)
    (target.D / "run" / "isdir" / "keep").write_bytes(b"k")
    (target.D / "run" / "isfile").write_bytes(b"f")
    os.symlink(outside, target.D / "run" / "link")
    files = {"run/isdir": b"file where a directory is", "run/isfile/x": b"under a file",
             "run/link/escape": b"through a symlink", "run/new": b"n"}
    batch = target.send(files)
    answered(target.once())
    got = target.receipt(batch)
    assert got == {"run/isdir": Status.REFUSED, "run/isfile/x": Status.REFUSED,
                   "run/link/escape": Status.REFUSED, "run/new": Status.OK}
    assert os.listdir(outside) == []
    assert (target.D / "run" / "isdir" / "keep").read_bytes() == b"k"
    assert (target.D / "run" / "isfile").read_bytes() == b"f"
    log = target.log.read_text()
    assert "non-file" in log and "non-directory" in log


def test_a_different_file_is_replaced_only_with_overwrite_and_only_that_file(
        tmp_path: Path) -> None:
    t = Target(tmp_path, overwrite="true")
    t.send({"run/a": b"old", "run/b": b"other"})
    answered(t.once())
    batch = t.send({"run/a": b"new"})
    answered(t.once())
    assert t.receipt(batch) == {"run/a": Status.OK}
    assert t.published() == {"run/a": b"new", "run/b": b"other"}


def test_a_watcher_never_sees_a_partial_or_unverified_file_under_its_final_name(
        target: Target) -> None:
    import threading

    files = {f"run/f{i}": os.urandom(200_000) for i in range(20)}
    bad = target.put("evil", {"run/evil": b"good"})
    (target.I / "evil" / "run" / "evil").write_bytes(b"bad!")
    target.control("evil", bad)
    batch = target.send(files)
    seen: dict[str, bytes] = {}
    done = threading.Event()

    def watch() -> None:
        while not done.is_set():
            try:  # the incoming area changes under the walk: look again
                now = target.published()
            except OSError:
                continue
            for rel, data in now.items():
                seen.setdefault(rel, data)

    w = threading.Thread(target=watch, daemon=True)
    w.start()
    answered(target.once())
    done.set()
    w.join()
    assert target.receipt(batch) == dict.fromkeys(files, Status.OK)
    assert target.receipt("evil") == {"run/evil": Status.BAD_CHECKSUM}
    assert seen and all(files[rel] == data for rel, data in seen.items()), "a partial file"
    assert "run/evil" not in target.published()
