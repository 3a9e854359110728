"""Staging, publish and discard at the target for local, sftp and ftp (issue #12).

Each transport is driven directly, the way the sender drives it without the arrival
monitor: send into <target>/.mstm-staging/<batch>/, inspect there, publish what
verified, discard the rest.  Real servers on loopback: a directory of this host, the
machine's OpenSSH sshd (internal-sftp), pyftpdlib.
"""

from __future__ import annotations

import hashlib
import os
import stat
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from tests.conftest import need
from tests.harness.servers import FtpServer
from tests.harness.sshd import SSHD, LoopbackSshd

from mstm.protocol import new_batch_id
from mstm.transports.base import STAGING, Item, TransportOptions, staging_dir

pytestmark = pytest.mark.integration

ALL = ["local", "sftp", "ftp"]
SECRET = b"outside-the-stream secret " * 40


@dataclass
class Rig:
    kind: str
    t: Any  # the transport
    src: Path  # the stream directory
    dst: Path  # where target_dir is on this host
    target_dir: str  # target_dir as the transport sees it
    server: Any = None

    def deliver(self, items: list[Item], *, expect: dict[str, str] | None = None
                ) -> tuple[str, dict[str, str]]:
        """send + inspect + publish (only what matches *expect*, a relpath -> sha256 of
        every file, or everything when None) + discard; (batch, publish errors)."""
        batch = new_batch_id()
        r = self.t.send(items, dest=staging_dir(self.target_dir, batch))
        assert r.exit_code == 0, r.error
        ok = [i for i in items if i.relpath not in r.item_errors]
        if expect is not None:
            got = self.t.inspect(list(expect), staged=batch)
            ok = [i for i in ok if all(
                got.get(rel) is not None and got[rel].sha256 == digest
                for rel, digest in expect.items()
                if rel == i.relpath or rel.startswith(i.relpath + "/"))]
        errors: dict[str, str] = self.t.publish(ok, staged=batch) if ok else {}
        self.t.discard(batch)
        return batch, {**r.item_errors, **errors}


def _make(kind: str, root: Path, **kw: Any) -> Rig:
    src = root / "src"
    src.mkdir(parents=True)
    if kind == "local":
        from mstm.transports.local import Local

        dst = root / "dst"
        dst.mkdir()
        return Rig(kind, Local(TransportOptions(source_dir=src, target_dir=str(dst), **kw)), src,
                   dst, str(dst))
    if kind == "sftp":
        from mstm.transports.sftp import Sftp

        need(SSHD)
        sshd = LoopbackSshd(root=root / "sshd").start()
        dst = root / "dst"
        dst.mkdir()
        t: Any = Sftp(TransportOptions(source_dir=src, target_dir=str(dst), **kw),
                      host="127.0.0.1", port=sshd.port, identity_file=sshd.client_key,
                      known_hosts=sshd.known_hosts)
        return Rig(kind, t, src, dst, str(dst), sshd)
    from mstm.transports.ftp import Ftp

    server = FtpServer(root / "ftpd")
    server.start()
    dst = server.home / "incoming"
    dst.mkdir()
    t2: Any = Ftp(TransportOptions(source_dir=src, target_dir="/incoming", **kw),
                  host="127.0.0.1", port=server.port, username=server.user,
                  password_file=server.password_file)
    return Rig(kind, t2, src, dst, "/incoming", server)


@pytest.fixture
def rigs(tmp_path: Path) -> Iterator[Any]:
    made: list[Rig] = []

    def make(kind: str, **kw: Any) -> Rig:
        rig = _make(kind, tmp_path / f"{kind}{len(made)}", **kw)
        made.append(rig)
        rig.t.open()
        return rig

    yield make
    for rig in made:
        rig.t.close()
        if rig.server is not None:
            rig.server.cleanup()


def sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def tree(path: Path) -> dict[str, bytes | str]:
    """Everything below *path* (staging excluded): files by content, links by target,
    directories as "dir"."""
    out: dict[str, bytes | str] = {}
    for dirpath, dirs, files in os.walk(path):
        dirs[:] = [d for d in dirs if d != STAGING]
        for name in dirs + files:
            p = os.path.join(dirpath, name)
            rel = os.path.relpath(p, path)
            if os.path.islink(p):
                out[rel] = "-> " + os.readlink(p)
            elif os.path.isdir(p):
                out[rel] = "dir"
            else:
                out[rel] = Path(p).read_bytes()
    return out


def put(root: Path, rel: str, data: bytes) -> None:
    p = root / rel
    p.parent.mkdir(parents=True, exist_ok=True)
    p.write_bytes(data)


# -- A. torn files -------------------------------------------------------------------------
@pytest.mark.parametrize("kind", ALL)
def test_a_file_rewritten_during_its_transfer_never_shows_torn_under_its_final_name(
        rigs: Any, kind: str) -> None:
    rig = rigs(kind, bwlimit=2048)
    old = os.urandom(1 << 20)
    put(rig.src, "f.bin", old)
    assert rig.deliver([Item("f.bin", len(old))], expect={"f.bin": sha(old)})[1] == {}
    final = rig.dst / "f.bin"
    first = os.stat(final).st_ino
    assert final.read_bytes() == old

    v1 = os.urandom(6 << 20)
    put(rig.src, "f.bin", v1)
    seen: set[tuple[int, int]] = set()
    done = threading.Event()

    def watch() -> None:
        while not done.is_set():
            try:
                st = os.stat(final)
                seen.add((st.st_ino, st.st_size))
            except FileNotFoundError:
                seen.add((0, 0))
            time.sleep(0.005)

    def rewrite() -> None:
        time.sleep(1.0)  # mid-transfer (6 MiB at 2 MiB/s)
        with open(rig.src / "f.bin", "r+b") as f:
            f.write(b"\0" * (1 << 20))

    watcher = threading.Thread(target=watch)
    writer = threading.Thread(target=rewrite)
    watcher.start()
    writer.start()
    try:
        # the sender hashed v1 when it claimed the item: only that may be published
        batch, errors = rig.deliver([Item("f.bin", len(v1), force=True)],
                                    expect={"f.bin": sha(v1)})
    finally:
        done.set()
        watcher.join()
        writer.join()
    assert "f.bin" in errors  # refused by the transport, or not verified
    assert seen == {(first, len(old))}, seen  # the old verified file, the whole time
    assert final.read_bytes() == old
    assert not (rig.dst / STAGING / batch).exists()


@pytest.mark.parametrize("kind", ALL)
def test_staging_directories_are_private_and_stale_batches_are_cleaned_at_open(
        rigs: Any, kind: str) -> None:
    rig = rigs(kind)
    put(rig.src, "a.dat", b"a")
    batch = new_batch_id()
    r = rig.t.send([Item("a.dat", 1)], dest=staging_dir(rig.target_dir, batch))
    assert r.exit_code == 0 and r.item_errors == {}, r.error
    assert not (rig.dst / "a.dat").exists()  # nothing under its final name yet
    staging = rig.dst / STAGING
    if kind != "ftp":  # FTP has no chmod: the server's defaults apply
        assert stat.S_IMODE(os.stat(staging).st_mode) == 0o700
        assert stat.S_IMODE(os.stat(staging / batch).st_mode) == 0o700
    rig.t.close()

    old = time.time() - 2 * 86400
    stale = staging / "20200101T000000000000-0123456789ab"
    (stale / "deep" / "er").mkdir(parents=True)
    (stale / "deep" / "er" / "x").write_bytes(b"x")
    keep_shape = staging / "not-a-batch"
    keep_shape.mkdir()
    recent = staging / "20200101T000000000000-ba9876543210"
    (recent / "d").mkdir(parents=True)
    (recent / "d" / "writing").write_bytes(b"now")  # a file written lately
    for p in (stale / "deep" / "er" / "x", stale / "deep" / "er", stale / "deep", stale,
              keep_shape, recent / "d", recent):
        os.utime(p, (old, old), follow_symlinks=False)
    rig.t.open()
    assert not stale.exists()
    assert keep_shape.exists() and recent.exists()


# -- B. directory items merge --------------------------------------------------------------
@pytest.mark.parametrize("kind", ALL)
def test_a_directory_item_delivered_twice_merges_and_keeps_what_others_put_there(
        rigs: Any, kind: str) -> None:
    rig = rigs(kind)
    put(rig.dst, "run42/other-team.txt", b"theirs")
    put(rig.src, "run42/a.dat", b"a1")
    put(rig.src, "run42/sub/b.dat", b"b1")
    (rig.src / "run42" / "empty").mkdir()
    assert rig.deliver([Item("run42", 4, is_dir=True)])[1] == {}
    (rig.src / "run42" / "a.dat").write_bytes(b"a2 newer")
    (rig.src / "run42" / "sub" / "b.dat").unlink()
    put(rig.src, "run42/c.dat", b"c")
    put(rig.src, "run42/sub/d.dat", b"d")
    assert rig.deliver([Item("run42", 10, is_dir=True)])[1] == {}
    assert tree(rig.dst) == {
        "run42": "dir", "run42/other-team.txt": b"theirs", "run42/a.dat": b"a2 newer",
        "run42/c.dat": b"c", "run42/empty": "dir", "run42/sub": "dir",
        "run42/sub/b.dat": b"b1", "run42/sub/d.dat": b"d"}
    assert os.listdir(rig.dst / STAGING) == []


@pytest.mark.parametrize("kind", ALL)
def test_a_type_conflict_fails_the_directory_item_and_changes_nothing(
        rigs: Any, kind: str) -> None:
    rig = rigs(kind)
    put(rig.dst, "run42/sub", b"a file where the item has a directory")
    put(rig.dst, "run42/keep.dat", b"keep")
    put(rig.src, "run42/aaa.dat", b"new")  # would be renamed first, if anything were
    put(rig.src, "run42/sub/b.dat", b"b")
    before = tree(rig.dst)
    _batch, errors = rig.deliver([Item("run42", 4, is_dir=True)])
    assert set(errors) == {"run42"} and "sub" in errors["run42"], errors
    assert tree(rig.dst) == before
    # the other way round: a directory where the item brings a file
    put(rig.src, "run43/x", b"x")
    put(rig.dst, "run43/x/theirs", b"t")
    before = tree(rig.dst)
    _batch, errors = rig.deliver([Item("run43", 1, is_dir=True)])
    assert set(errors) == {"run43"}
    assert tree(rig.dst) == before


@pytest.mark.parametrize("kind", ["local", "sftp", "ftp"])
def test_a_symbolic_link_planted_at_the_target_is_never_written_through(
        rigs: Any, kind: str, tmp_path: Path) -> None:
    rig = rigs(kind)
    outside = rig.dst.parent / "elsewhere"  # for ftp: inside the server's home
    outside.mkdir()
    os.symlink(outside, rig.dst / "run42")
    os.symlink(outside, rig.dst / "deep")
    put(rig.src, "run42/a.dat", b"a")
    put(rig.src, "deep/f.dat", b"f")
    _batch, errors = rig.deliver([Item("run42", 1, is_dir=True), Item("deep/f.dat", 1)])
    assert set(errors) == {"run42", "deep/f.dat"}, errors
    assert os.listdir(outside) == []
    assert os.readlink(rig.dst / "run42") == str(outside)
    # the staging directory itself planted as a link
    os.rmdir(rig.dst / STAGING)
    os.symlink(outside, rig.dst / STAGING)
    put(rig.src, "g.dat", b"g")
    batch = new_batch_id()
    r = rig.t.send([Item("g.dat", 1)], dest=staging_dir(rig.target_dir, batch))
    assert r.exit_code != 0 or set(r.item_errors) == {"g.dat"}
    assert os.listdir(outside) == []


# -- D. reading the source -------------------------------------------------------------------
@pytest.mark.parametrize("kind", ALL)
def test_a_source_component_swapped_for_a_link_out_of_the_stream_reads_nothing_outside(
        rigs: Any, kind: str, tmp_path: Path) -> None:
    rig = rigs(kind)
    outside = tmp_path / "secret-dir"
    outside.mkdir()
    (outside / "f.dat").write_bytes(SECRET)
    (outside / "b.dat").write_bytes(SECRET)
    put(rig.src, "run/a.dat", b"a")
    os.symlink(outside, rig.src / "run" / "sub")  # a dir item's component
    os.symlink(outside, rig.src / "d")  # a file item's parent component
    batch = new_batch_id()
    r = rig.t.send([Item("run", 1, is_dir=True), Item("d/f.dat", len(SECRET))],
                   dest=staging_dir(rig.target_dir, batch))
    assert set(r.item_errors) == {"run", "d/f.dat"}, (r.item_errors, r.error)
    for dirpath, _dirs, files in os.walk(rig.dst):
        for name in files:
            assert Path(dirpath, name).read_bytes() != SECRET

    # swapped while the item is being sent: the walk never follows it either
    put(rig.src, "run2/a/big.dat", os.urandom(3 << 20))
    put(rig.src, "run2/z/b.dat", b"b")
    rig.t.close()
    rig2 = rigs(kind, bwlimit=2048)
    rig2.src.rmdir()
    os.symlink(rig.src, rig2.src)  # the stream directory itself may be a link

    def swap() -> None:
        time.sleep(0.5)
        os.rename(rig.src / "run2" / "z", rig.src / "run2" / "z.gone")
        os.symlink(outside, rig.src / "run2" / "z")

    swapper = threading.Thread(target=swap)
    swapper.start()
    r = rig2.t.send([Item("run2", 3 << 20, is_dir=True)],
                    dest=staging_dir(rig2.target_dir, new_batch_id()))
    swapper.join()
    assert "run2" in r.item_errors, r
    for dirpath, _dirs, files in os.walk(rig2.dst):
        for name in files:
            assert Path(dirpath, name).read_bytes() != SECRET


# -- C. permissions ----------------------------------------------------------------------------
@pytest.mark.parametrize("kind", ALL)
def test_setuid_setgid_and_sticky_bits_never_arrive(rigs: Any, kind: str) -> None:
    rig = rigs(kind)
    put(rig.src, "suid.bin", b"x")
    os.chmod(rig.src / "suid.bin", 0o4755)
    put(rig.src, "tree/sgid.bin", b"y")
    os.chmod(rig.src / "tree" / "sgid.bin", 0o2750)
    (rig.src / "tree" / "sticky").mkdir()
    os.chmod(rig.src / "tree" / "sticky", 0o3777)
    os.mkfifo(rig.src / "fifo-file")
    _batch, errors = rig.deliver([Item("suid.bin", 1), Item("tree", 1, is_dir=True),
                                  Item("fifo-file", 0)])
    assert set(errors) == {"fifo-file"}, errors
    for rel in ("suid.bin", "tree", "tree/sgid.bin", "tree/sticky"):
        mode = os.lstat(rig.dst / rel).st_mode
        assert mode & 0o7000 == 0, (rel, oct(mode))
    if kind != "ftp":
        assert stat.S_IMODE(os.stat(rig.dst / "suid.bin").st_mode) == 0o755
        assert stat.S_IMODE(os.stat(rig.dst / "tree" / "sgid.bin").st_mode) == 0o750
        assert stat.S_IMODE(os.stat(rig.dst / "tree" / "sticky").st_mode) == 0o777
    assert not (rig.dst / "fifo-file").exists()
    assert not os.path.lexists(rig.dst / "fifo-file")


@pytest.mark.parametrize("kind", ALL)
def test_a_directory_item_holding_a_fifo_or_a_link_creates_neither(
        rigs: Any, kind: str) -> None:
    rig = rigs(kind)
    put(rig.src, "run/a.dat", b"a")
    os.mkfifo(rig.src / "run" / "pipe")
    put(rig.src, "run2/a.dat", b"a")
    os.symlink("a.dat", rig.src / "run2" / "link")
    _batch, errors = rig.deliver([Item("run", 1, is_dir=True), Item("run2", 1, is_dir=True)])
    assert set(errors) == {"run", "run2"}
    assert not os.path.lexists(rig.dst / "run" / "pipe")
    assert not os.path.lexists(rig.dst / "run2" / "link")


# -- discard ------------------------------------------------------------------------------------
@pytest.mark.parametrize("kind", ALL)
def test_discard_removes_a_staged_tree_1000_levels_deep(rigs: Any, kind: str) -> None:
    """ftp walks it with one LIST connection per level: 200 levels (a path of 400
    bytes, past what one FTP command line may carry) prove the same in a fifth of the
    minute 1,000 take there."""
    rig = rigs(kind)
    batch = new_batch_id()
    top = rig.dst / STAGING / batch
    top.mkdir(parents=True)
    fd = os.open(top, os.O_RDONLY | os.O_DIRECTORY)
    try:
        for i in range(200 if kind.startswith("ftp") else 1000):
            os.mkdir("d", dir_fd=fd)
            below = os.open("d", os.O_RDONLY | os.O_DIRECTORY, dir_fd=fd)
            os.close(fd)
            fd = below
            if i % 100 == 0:
                os.close(os.open("f", os.O_WRONLY | os.O_CREAT, 0o600, dir_fd=fd))
    finally:
        os.close(fd)
    outside = rig.dst / "keep"
    outside.mkdir()
    (outside / "k").write_bytes(b"k")
    os.symlink(outside, top / "link")  # a link in the staged tree is removed, not followed
    rig.t.discard(batch)
    assert not top.exists()
    assert (outside / "k").read_bytes() == b"k"
