"""Issue #12 for rsync_ssh (with stream.py) and rsync_native: nothing unverified under a
final name, directory items merged, no link at the target followed, no setuid / setgid
/ sticky bit, no device or FIFO, staging leftovers removed.

The transports are driven the way the sender drives them: send into the batch's staging
directory, inspect there, publish what verified, discard the rest.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import stat
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from tests.conftest import need, need_root
from tests.harness.sshd import LoopbackSshd

from mstm.protocol import new_batch_id
from mstm.transports.base import STAGING, Item, TransportOptions, staging_dir
from mstm.transports.rsync_ssh import RsyncSsh
from mstm.transports.ssh import SshConnection, SshTarget

pytestmark = pytest.mark.integration
MiB = 1 << 20


def sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def file_sha(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(MiB):
            h.update(chunk)
    return h.hexdigest()


def write(path: Path, data: bytes, mode: int | None = None) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)
    if mode is not None:
        path.chmod(mode)
    return path


@pytest.fixture
def rig(tmp_path: Path, sshd: LoopbackSshd) -> Iterator[tuple[RsyncSsh, Path, Path]]:
    source, target = tmp_path / "src", tmp_path / "target"
    source.mkdir()
    target.mkdir()
    conn = SshConnection(SshTarget(host="127.0.0.1", port=sshd.port,
                                   identity_file=sshd.client_key,
                                   known_hosts=sshd.known_hosts, connect_timeout=5))
    t = RsyncSsh(TransportOptions(source_dir=source, target_dir=str(target)), conn=conn)
    t.open()
    yield t, source, target
    t.close()


def deliver(t: RsyncSsh, items: list[Item], source: Path) -> tuple[str, dict[str, str]]:
    """What the sender does: send into staging, verify there, publish what matched,
    discard the rest.  Returns the batch and publish's errors."""
    batch = new_batch_id()
    r = t.send(items, dest=staging_dir(t.target_dir, batch))
    assert r.exit_code == 0, r.error
    files = []
    for i in items:
        if i.is_dir:
            files += [str(p.relative_to(source)) for p in (source / i.relpath).rglob("*")
                      if p.is_file() and not p.is_symlink()]
        else:
            files.append(i.relpath)
    found = t.inspect(files, staged=batch)
    good = [i for i in items if all(
        (f in found and found[f].sha256 == file_sha(source / f))
        for f in files if f == i.relpath or f.startswith(i.relpath + "/"))]
    errors = t.publish(good, staged=batch)
    t.discard(batch)
    assert not (Path(t.target_dir) / STAGING / batch).exists()
    return batch, errors


# -- A: torn files ---------------------------------------------------------------------
def _rewrite_while_sent(t: RsyncSsh, source: Path, target: Path, size: int) -> None:
    src = write(source / "f.dat", os.urandom(size))
    old = write(target / "f.dat", b"old verified content")
    seen: set[bytes] = set()
    stop = threading.Event()

    def watch() -> None:
        while not stop.is_set():
            with contextlib.suppress(FileNotFoundError):
                seen.add(old.read_bytes()[:64])
            time.sleep(0.002)

    def rewrite() -> None:
        time.sleep(0.7)
        with open(src, "r+b") as f:  # in place, behind rsync's reading: a torn copy
            f.write(b"N" * MiB)

    threads = [threading.Thread(target=watch), threading.Thread(target=rewrite)]
    for th in threads:
        th.start()
    try:
        deliver(t, [Item("f.dat", size)], source)
    finally:
        stop.set()
        for th in threads:
            th.join()
    assert seen == {b"old verified content"}  # never anything else under the final name
    assert old.read_bytes() == b"old verified content"


def test_a_file_rewritten_during_its_rsync_transfer_never_appears_under_its_final_name(
        rig: tuple[RsyncSsh, Path, Path]) -> None:
    t, source, target = rig
    t.bwlimit = 4096  # 8 MiB at 4 MiB/s: the rewrite lands mid-transfer
    _rewrite_while_sent(t, source, target, 8 * MiB)


def test_a_large_file_rewritten_while_streamed_never_appears_under_its_final_name(
        rig: tuple[RsyncSsh, Path, Path]) -> None:
    t, source, target = rig
    t.stream_min, t.bwlimit = 1, 8192
    _rewrite_while_sent(t, source, target, 16 * MiB)


def test_a_verified_file_replaces_the_old_one_and_nothing_is_left_in_staging(
        rig: tuple[RsyncSsh, Path, Path]) -> None:
    t, source, target = rig
    write(source / "a/b/f.dat", b"new")
    write(target / "a/b/f.dat", b"old")
    t.stream_min = None
    _, errors = deliver(t, [Item("a/b/f.dat", 3)], source)
    assert errors == {}
    assert (target / "a/b/f.dat").read_bytes() == b"new"
    assert os.listdir(target / STAGING) == []
    assert stat.S_IMODE((target / STAGING).stat().st_mode) == 0o700


# -- stream.py: resume after a kill ------------------------------------------------------
KILLABLE = r"""
import sys
from pathlib import Path
from mstm.transports.base import Item, TransportOptions, staging_dir
from mstm.transports.rsync_ssh import RsyncSsh
from mstm.transports.ssh import SshConnection, SshTarget
port, key, known, src, tgt, batch, size = sys.argv[1:]
conn = SshConnection(SshTarget(host="127.0.0.1", port=int(port), identity_file=Path(key),
                               known_hosts=Path(known), connect_timeout=5))
t = RsyncSsh(TransportOptions(source_dir=Path(src), target_dir=tgt, bwlimit=16384), conn=conn)
t.open()
t.send([Item("resume.dat", int(size))], dest=staging_dir(tgt, batch))
"""


def test_a_streamed_file_killed_mid_way_resumes_in_the_next_batch(
        rig: tuple[RsyncSsh, Path, Path], sshd: LoopbackSshd) -> None:
    from mstm.transports.stream import temp_name

    t, source, target = rig
    size = 96 * MiB
    h = hashlib.sha256()
    with open(source / "resume.dat", "wb") as f:
        for i in range(size // MiB):
            block = i.to_bytes(8, "little") * (MiB // 8)
            f.write(block)
            h.update(block)
    part = target / ".mstm-partial" / os.fsdecode(temp_name("", "resume.dat",
                                                            final=str(target)))
    proc = subprocess.Popen([sys.executable, "-c", KILLABLE, str(sshd.port),
                             str(sshd.client_key), str(sshd.known_hosts), str(source),
                             str(target), new_batch_id(), str(size)])
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        if part.exists() and part.stat().st_size >= 30 * MiB:
            break
        time.sleep(0.05)
    proc.kill()
    proc.wait()
    time.sleep(0.5)  # the target sees the end of its input and flushes what came
    assert part.exists() and not (target / "resume.dat").exists()
    kept = part.stat().st_size
    assert kept >= 30 * MiB
    t.stream_min = 1
    batch = new_batch_id()
    r = t.send([Item("resume.dat", size)], dest=staging_dir(str(target), batch))
    assert r.exit_code == 0, r.error
    got = t._streamed[(staging_dir(str(target), batch), "resume.dat")]
    assert got.offset >= 30 * MiB
    assert not (target / "resume.dat").exists()  # staged only
    assert t.inspect(["resume.dat"], staged=batch)["resume.dat"].sha256 == h.hexdigest()
    assert t.publish([Item("resume.dat", size)], staged=batch) == {}
    t.discard(batch)
    assert file_sha(target / "resume.dat") == h.hexdigest() and not part.exists()


# -- B: directory items are merged -------------------------------------------------------
def test_a_directory_delivered_twice_keeps_both_deliveries_and_other_teams_files(
        rig: tuple[RsyncSsh, Path, Path]) -> None:
    t, source, target = rig
    write(target / "run42/other-team.txt", b"theirs")
    write(target / "run42/sub/theirs-too.txt", b"theirs too")
    write(source / "run42/a.dat", b"a1")
    write(source / "run42/sub/b.dat", b"b1")
    _, errors = deliver(t, [Item("run42", 0, is_dir=True)], source)
    assert errors == {}
    (source / "run42/a.dat").unlink()
    (source / "run42/sub/b.dat").unlink()
    write(source / "run42/c.dat", b"c2")
    write(source / "run42/sub/deeper/d.dat", b"d2")
    write(source / "run42/sub/b.dat", b"b2")  # a newer version replaces the file
    _, errors = deliver(t, [Item("run42", 0, is_dir=True)], source)
    assert errors == {}
    got = {str(p.relative_to(target)): p.read_bytes() for p in (target / "run42").rglob("*")
           if p.is_file()}
    assert got == {"run42/other-team.txt": b"theirs", "run42/sub/theirs-too.txt": b"theirs too",
                   "run42/a.dat": b"a1", "run42/sub/b.dat": b"b2", "run42/c.dat": b"c2",
                   "run42/sub/deeper/d.dat": b"d2"}


def test_a_type_conflict_is_an_error_for_the_item_and_changes_nothing(
        rig: tuple[RsyncSsh, Path, Path]) -> None:
    t, source, target = rig
    write(target / "run42/sub", b"a file where the item has a directory")
    write(target / "run42/keep.dat", b"old")
    write(source / "run42/keep.dat", b"new")
    write(source / "run42/new.dat", b"new")
    write(source / "run42/sub/x.dat", b"x")
    write(target / "run43/f.dat/inner", b"a directory where the item has a file")
    write(source / "run43/f.dat", b"f")
    write(source / "ok.dat", b"ok")
    before = sorted((str(p), p.is_file() and p.read_bytes()) for p in target.rglob("*")
                    if STAGING not in str(p))
    _, errors = deliver(t, [Item("run42", 0, is_dir=True), Item("run43", 0, is_dir=True),
                            Item("ok.dat", 2)], source)
    assert set(errors) == {"run42", "run43"}, errors
    after = sorted((str(p), p.is_file() and p.read_bytes()) for p in target.rglob("*")
                   if STAGING not in str(p) and p.name != "ok.dat")
    assert after == before
    assert (target / "ok.dat").read_bytes() == b"ok"


def test_a_symlink_planted_at_the_target_is_never_written_through(
        rig: tuple[RsyncSsh, Path, Path], tmp_path: Path) -> None:
    t, source, target = rig
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    outside = write(tmp_path / "outside.txt", b"outside")
    (target / "run42").symlink_to(elsewhere)
    (target / "a").symlink_to(outside)
    write(target / "run43/keep", b"k")
    (target / "run43/sub").symlink_to(elsewhere)
    (target / "deep").symlink_to(elsewhere)
    write(source / "run42/x.dat", b"x")
    write(source / "run43/sub/y.dat", b"y")
    write(source / "a", b"replaces the link, never writes through it")
    write(source / "deep/z.dat", b"z")
    _, errors = deliver(t, [Item("run42", 0, is_dir=True), Item("run43", 0, is_dir=True),
                            Item("a", 42), Item("deep/z.dat", 1)], source)
    assert set(errors) == {"run42", "run43", "deep/z.dat"}, errors
    assert os.listdir(elsewhere) == []
    assert outside.read_bytes() == b"outside"
    assert not (target / "a").is_symlink()
    assert (target / "a").read_bytes() == b"replaces the link, never writes through it"
    assert (target / "run42").is_symlink() and (target / "run43/sub").is_symlink()


# -- C: permissions, devices ------------------------------------------------------------
@pytest.mark.parametrize("streamed", [False, True])
def test_setuid_setgid_and_sticky_never_survive_even_for_root(
        rig: tuple[RsyncSsh, Path, Path], streamed: bool) -> None:
    need_root()  # the remote user is root too (the loopback sshd runs as we do)
    t, source, target = rig
    t.stream_min = 1 if streamed else None
    write(source / "suid.dat", b"s", 0o6755)
    write(source / "tree/bin", b"b", 0o4711)
    (source / "tree/shared").mkdir()
    write(source / "tree/shared/f", b"f", 0o2644)
    (source / "tree/shared").chmod(0o3777)
    (source / "tree").chmod(0o2755)
    _, errors = deliver(t, [Item("suid.dat", 1), Item("tree", 0, is_dir=True)], source)
    assert errors == {}
    modes = {p: stat.S_IMODE((target / p).stat().st_mode)
             for p in ("suid.dat", "tree", "tree/bin", "tree/shared", "tree/shared/f")}
    assert modes == {"suid.dat": 0o755, "tree": 0o755, "tree/bin": 0o711,
                     "tree/shared": 0o777, "tree/shared/f": 0o644}
    assert all((target / p).stat().st_uid == os.geteuid() for p in modes)


def test_rsync_argv_never_asks_for_devices_specials_owners(rig: tuple[RsyncSsh, Path, Path]
                                                           ) -> None:
    t, _, target = rig
    argv = t.rsync_argv("/x", force=False)
    assert "--chmod=a-st" in argv and "--perms" in argv
    assert {"--no-devices", "--no-specials"} <= set(argv)
    for bad in ("-D", "--devices", "--specials", "-a", "--archive", "-o", "-g", "--owner",
                "--group", "--super"):
        assert bad not in argv
    assert f"--partial-dir={target}/.mstm-partial" in argv


def test_a_fifo_in_a_directory_item_is_never_created_at_the_target(
        rig: tuple[RsyncSsh, Path, Path]) -> None:
    t, source, target = rig
    write(source / "run/f.dat", b"f")
    os.mkfifo(source / "run/pipe")
    batch = new_batch_id()
    assert t.send([Item("run", 0, is_dir=True)], dest=staging_dir(str(target), batch)
                  ).exit_code in (0, 23)
    assert not (target / STAGING / batch / "run/pipe").exists()
    # and one planted in staging is refused at publish
    os.mkfifo(target / STAGING / batch / "run/planted")
    assert set(t.publish([Item("run", 0, is_dir=True)], staged=batch)) == {"run"}
    t.discard(batch)
    assert not (target / "run").exists()


# -- discard, stale batches ----------------------------------------------------------
def test_a_1000_level_deep_staging_leftover_is_discarded(rig: tuple[RsyncSsh, Path, Path]
                                                         ) -> None:
    t, _, target = rig
    batch = new_batch_id()
    top = target / STAGING / batch
    top.mkdir(parents=True)
    fd = os.open(top, os.O_RDONLY | os.O_DIRECTORY)
    try:
        for i in range(1000):
            os.mkdir("d" * 50, dir_fd=fd)
            nfd = os.open("d" * 50, os.O_RDONLY | os.O_DIRECTORY, dir_fd=fd)
            os.close(fd)
            fd = nfd
            if i % 100 == 0:
                os.close(os.open("f", os.O_CREAT | os.O_WRONLY, 0o400, dir_fd=fd))
        os.fchmod(fd, 0o500)  # a read-only directory rsync left
    finally:
        os.close(fd)
    t.discard(batch)
    assert os.listdir(target / STAGING) == []


def test_open_removes_only_stale_batch_shaped_staging_directories(
        rig: tuple[RsyncSsh, Path, Path]) -> None:
    t, _, target = rig
    old = time.time() - 2 * 86400
    stale = write(target / STAGING / "20200101T000000000000-0123456789ab/x/f", b"x").parent
    busy = write(target / STAGING / "20200101T000000000001-0123456789ab/x/f", b"x")
    fresh = write(target / STAGING / new_batch_id() / "f", b"x")
    foreign = write(target / STAGING / "not-a-batch/f", b"x")
    for p in (stale / "f", stale, stale.parent, busy.parent, busy.parent.parent,
              foreign, foreign.parent):
        os.utime(p, (old, old))  # busy's file itself is fresh: a transfer still writes
    t.close()
    t.open()
    assert not stale.parent.exists()
    assert busy.exists() and fresh.exists() and foreign.exists()


# -- rsync_native ----------------------------------------------------------------------
@pytest.fixture
def native(tmp_path: Path) -> Iterator[tuple[object, Path, Path]]:
    from tests.harness.servers import RsyncDaemon

    from mstm.transports.rsync_native import RsyncNative

    need("rsync")
    daemon = RsyncDaemon(tmp_path / "rsyncd")
    daemon.start()
    source = tmp_path / "src"
    source.mkdir()
    target = daemon.path / "in"
    target.mkdir()
    t = RsyncNative(TransportOptions(source_dir=source, target_dir="/in"), host="127.0.0.1",
                    port=daemon.port, module=daemon.module, username=daemon.user,
                    password_file=daemon.password_file)
    t.open()
    yield t, source, target
    t.close()
    daemon.cleanup()


def native_deliver(t: object, items: list[Item], source: Path) -> dict[str, str]:
    batch = new_batch_id()
    r = t.send(items, dest=f"/in/{STAGING}/{batch}")  # type: ignore[attr-defined]
    assert r.exit_code == 0, r.error
    files = []
    for i in items:
        if i.is_dir:
            files += [str(p.relative_to(source)) for p in (source / i.relpath).rglob("*")
                      if p.is_file()]
        else:
            files.append(i.relpath)
    found = t.inspect(files, staged=batch)  # type: ignore[attr-defined]
    good = [i for i in items if all(found.get(f) and found[f].sha256 == file_sha(source / f)
                                    for f in files
                                    if f == i.relpath or f.startswith(i.relpath + "/"))]
    errors: dict[str, str] = t.publish(good, staged=batch)  # type: ignore[attr-defined]
    t.discard(batch)  # type: ignore[attr-defined]
    return errors | {i.relpath: "not verified" for i in items if i not in good}


def test_rsync_native_keeps_unverified_content_from_the_final_name(
        native: tuple[object, Path, Path]) -> None:
    t, source, target = native
    t.bwlimit = 4096  # type: ignore[attr-defined]
    size = 8 * MiB
    src = write(source / "f.dat", os.urandom(size))
    write(target / "f.dat", b"old verified content")
    seen: set[bytes] = set()
    stop = threading.Event()

    def watch() -> None:
        while not stop.is_set():
            with contextlib.suppress(FileNotFoundError):
                seen.add((target / "f.dat").read_bytes()[:64])
            time.sleep(0.002)

    def rewrite() -> None:
        time.sleep(0.7)
        with open(src, "r+b") as f:
            f.write(b"N" * MiB)

    threads = [threading.Thread(target=watch), threading.Thread(target=rewrite)]
    for th in threads:
        th.start()
    try:
        errors = native_deliver(t, [Item("f.dat", size)], source)
    finally:
        stop.set()
        for th in threads:
            th.join()
    assert seen == {b"old verified content"} and errors
    # and then, unchanged, it is delivered
    t.bwlimit = 0  # type: ignore[attr-defined]
    assert native_deliver(t, [Item("f.dat", size)], source) == {}
    assert file_sha(target / "f.dat") == file_sha(src)
    assert not [p for p in (target / STAGING).rglob("*")]


def test_rsync_native_merges_directories_and_clears_special_bits(
        native: tuple[object, Path, Path]) -> None:
    t, source, target = native
    write(target / "run42/other-team.txt", b"theirs")
    write(source / "run42/a.dat", b"a1", 0o6755)
    assert native_deliver(t, [Item("run42", 0, is_dir=True)], source) == {}
    (source / "run42/a.dat").unlink()
    write(source / "run42/sub/b.dat", b"b2")
    (source / "run42/sub").chmod(0o3777)
    assert native_deliver(t, [Item("run42", 0, is_dir=True)], source) == {}
    got = {str(p.relative_to(target)): p.read_bytes() for p in (target / "run42").rglob("*")
           if p.is_file()}
    assert got == {"run42/other-team.txt": b"theirs", "run42/a.dat": b"a1",
                   "run42/sub/b.dat": b"b2"}
    assert stat.S_IMODE((target / "run42/a.dat").stat().st_mode) == 0o755
    assert stat.S_IMODE((target / "run42/sub").stat().st_mode) == 0o777
