"""rsync_ssh makes the target durable before it vouches for a file, and hashes fast.

The target is a real sshd on loopback whose sessions find wrappers first on PATH: `sync`,
`python3` and `sha256sum` that log each call (and, where strace works, the syncfs(2)
the real sync made) before running the real program.  So the tests see what the
target host actually ran, in which order, in the one round trip of `inspect`.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import re
import shutil
import signal
import subprocess
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from tests.conftest import need
from tests.harness.sshd import SSHD, LoopbackSshd
from tests.harness.streams import StreamEnv

from mstm.errors import TargetUnavailable
from mstm.protocol import new_batch_id
from mstm.transports.base import STAGING, Item, TransportOptions, staging_dir
from mstm.transports.rsync_ssh import RsyncSsh
from mstm.transports.ssh import SshConnection, SshTarget
from mstm.transports.stream import temp_name

pytestmark = pytest.mark.integration

HOSTILE = [b"plain.dat", b"with space.dat", b"new\nline.dat", b"-leading-dash.dat",
           b"--rsh=touch PWNED", b"non-utf8-\xff\xfe.dat", b"back\\slash.dat",
           b"star*and?glob[1].dat", b"deep/sub dir/-x/file.dat", b"tab\there.dat"]
# what the remote shell needs when PATH holds nothing else (no python3 there)
TOOLBOX = ["sh", "bash", "cat", "mktemp", "rm", "xargs", "stat", "sha256sum", "head", "mv",
           "rsync", "printf", "sleep", "dirname", "mkdir", "test", "env", "chmod", "find"]


def strace_works() -> bool:
    path = shutil.which("strace")
    if not path:
        return False
    r = subprocess.run([path, "-f", "-qq", "-e", "trace=syncfs", "-o", "/dev/null", "true"],
                       capture_output=True, check=False)
    return r.returncode == 0


STRACE = strace_works()


def wrapper(bindir: Path, name: str, log: Path, body: str | None = None) -> None:
    real = shutil.which(name, path="/usr/local/bin:/usr/bin:/bin")
    assert real, name
    if body is None:
        body = f'exec {real} "$@"'
        if name == "sync" and STRACE:
            body = (f'exec {shutil.which("strace")} -f -qq -e trace=syncfs,sync -o "{log}.strace" '
                    f'{real} "$@"')
    p = bindir / name
    # one line per call (python3's inline program has newlines of its own)
    p.write_text(f'#!/bin/sh\nprintf "%s" "{name} $*" | {shutil.which("tr")} "\\n" " " >> "{log}"\n'
                 f'echo >> "{log}"\n{body}\n')
    p.chmod(0o755)


class Target:
    """A loopback sshd whose sessions run PATH=<bindir>:<rest>."""

    def __init__(self, root: Path, *, path_rest: str = "/usr/local/bin:/usr/bin:/bin") -> None:
        need(SSHD)
        need("rsync")
        self.bindir = root / "bin"
        self.bindir.mkdir(parents=True)
        self.log = root / "calls.log"
        self.dir = root / "target"
        self.dir.mkdir()
        self.sshd = LoopbackSshd(root=root / "sshd")
        path = f"{self.bindir}:{path_rest}" if path_rest else str(self.bindir)
        text = self.sshd.config.read_text()
        self.sshd.config.write_text(text.replace("SetEnv HOME=", f"SetEnv PATH={path} HOME="))
        self.sshd.start()
        for name in ("sync", "python3", "sha256sum"):
            wrapper(self.bindir, name, self.log)

    def calls(self) -> list[str]:
        return (self.log.read_text(errors="replace").splitlines() if self.log.exists()
                else [])

    def syscalls(self) -> str:
        p = Path(f"{self.log}.strace")
        return p.read_text() if p.exists() else ""

    def transport(self, source: Path) -> RsyncSsh:
        conn = SshConnection(SshTarget(host="127.0.0.1", port=self.sshd.port,
                                       identity_file=self.sshd.client_key,
                                       known_hosts=self.sshd.known_hosts, connect_timeout=5))
        log = self.log

        class Quiet(RsyncSsh):  # the calls of open() (staging set-up) are not logged
            def open(self) -> None:
                super().open()
                log.unlink(missing_ok=True)

        return Quiet(TransportOptions(source_dir=source, target_dir=str(self.dir)), conn=conn)

    def part(self, relpath: str) -> Path:
        """Where stream.py keeps the partial data of *relpath*."""
        return self.dir / ".mstm-partial" / os.fsdecode(temp_name("", relpath,
                                                                  final=str(self.dir)))

    def put(self, where: Path, name: bytes, data: bytes) -> None:
        p = os.path.join(os.fsencode(where), name)
        os.makedirs(os.path.dirname(p), exist_ok=True)
        with open(p, "wb") as f:
            f.write(data)


@pytest.fixture
def target(tmp_path: Path) -> Iterator[Target]:
    t = Target(tmp_path / "t")
    yield t
    t.sshd.cleanup()


def payloads() -> dict[bytes, bytes]:
    return {n: os.urandom(100 + i * 37) for i, n in enumerate(HOSTILE)}


def expected(data: dict[bytes, bytes]) -> dict[str, tuple[int, str]]:
    return {os.fsdecode(n): (len(d), hashlib.sha256(d).hexdigest()) for n, d in data.items()}


def answers(found: dict[str, object]) -> dict[str, tuple[int, str | None]]:
    return {n: (r.size, r.sha256) for n, r in found.items()}  # type: ignore[attr-defined]


def test_inspect_syncs_the_filesystem_first_then_hashes_with_python(target: Target,
                                                                    tmp_path: Path) -> None:
    data = payloads()
    for n, d in data.items():
        target.put(target.dir, n, d)
    t = target.transport(tmp_path)
    t.open()
    try:
        found = t.inspect([os.fsdecode(n) for n in data] + ["missing.dat"])
    finally:
        t.close()
    assert answers(found) == expected(data)
    calls = target.calls()
    assert calls[0] == "sync -f -- ."  # one syncfs, before anything is hashed
    assert [c.split()[0] for c in calls] == ["sync", "python3"]  # no sha256sum needed
    if STRACE:
        assert "syncfs(" in target.syscalls() and "= 0" in target.syscalls()


def test_inspect_of_staged_items_syncs_too(target: Target, tmp_path: Path) -> None:
    batch = new_batch_id()
    target.put(target.dir / STAGING / batch, b"tree/a b/c.dat", b"staged")
    target.put(target.dir, b"tree/a b/c.dat", b"final")
    t = target.transport(tmp_path)
    t.open()
    try:
        found = t.inspect(["tree/a b/c.dat"], staged=batch)
    finally:
        t.close()
    assert answers(found) == {"tree/a b/c.dat": (6, hashlib.sha256(b"staged").hexdigest())}
    assert target.calls()[0] == "sync -f -- ."


def test_without_python3_at_the_target_sha256sum_answers_the_same(tmp_path: Path) -> None:
    t_ = Target(tmp_path / "t", path_rest="")
    try:
        for name in TOOLBOX:
            real = shutil.which(name, path="/usr/bin:/bin")
            if real and not (t_.bindir / name).exists():
                (t_.bindir / name).symlink_to(real)
        (t_.bindir / "python3").unlink()
        data = payloads()
        for n, d in data.items():
            t_.put(t_.dir, n, d)
        t = t_.transport(tmp_path)
        t.open()
        try:
            found = t.inspect([os.fsdecode(n) for n in data])
        finally:
            t.close()
        assert answers(found) == expected(data)
        assert [c.split()[0] for c in t_.calls()] == ["sync", "sha256sum"]
    finally:
        t_.sshd.cleanup()


def test_a_sync_without_f_falls_back_to_sync(target: Target, tmp_path: Path) -> None:
    """coreutils < 8.24 has no `sync -f`: the whole-system sync(1) is used instead."""
    wrapper(target.bindir, "sync", target.log,
            body='case "$1" in -f) echo "sync: invalid option -- \'f\'" >&2; exit 1;; esac\n'
                 'exec /bin/sync')
    target.put(target.dir, b"a.dat", b"abc")
    t = target.transport(tmp_path)
    t.open()
    try:
        found = t.inspect(["a.dat"])
    finally:
        t.close()
    assert answers(found) == {"a.dat": (3, hashlib.sha256(b"abc").hexdigest())}
    assert [c for c in target.calls() if c.startswith("sync")] == ["sync -f -- .", "sync "]


def test_a_failing_syncfs_vouches_for_nothing_and_the_source_stays(target: Target,
                                                                   tmp_path: Path) -> None:
    """A writeback error at the target: inspect answers nothing; mstm-send keeps the
    source and backs off (exit 75), counting no attempt against the item."""
    wrapper(target.bindir, "sync", target.log,
            body="echo \"sync: error syncing '.': Input/output error\" >&2; exit 1")
    target.put(target.dir, b"a.dat", b"abc")
    t = target.transport(tmp_path)
    t.open()
    try:
        with pytest.raises(TargetUnavailable, match="Input/output error"):
            t.inspect(["a.dat"])
    finally:
        t.close()
    assert not [c for c in target.calls() if c.startswith(("python3", "sha256sum"))]

    stream = StreamEnv.create(tmp_path / "s", target.sshd)
    stream.configure(outgoing={"target_dir": str(target.dir)})
    stream.put("keep.dat", b"precious")
    r = stream.run("mstm-send", "--once", "--json")
    assert r.returncode == 75, r.stderr
    assert (stream.source / "keep.dat").read_bytes() == b"precious"
    assert "durable" in r.stderr


def test_mstm_send_move_deletes_only_after_the_target_synced(target: Target,
                                                              tmp_path: Path) -> None:
    stream = StreamEnv.create(tmp_path / "s", target.sshd)
    stream.configure(outgoing={"target_dir": str(target.dir)})
    data = payloads()
    for n, d in data.items():
        stream.put(n, d)
    stream.put(b"dir item/x.dat", b"x")
    r = stream.run("mstm-send", "--once", "--json")
    assert r.returncode == 0, r.stderr
    assert json.loads(r.stdout)["delivered"] == len(data) + 1
    assert stream.files(stream.source) == {}
    calls = target.calls()
    syncs = [i for i, c in enumerate(calls) if c.startswith("sync")]
    hashes = [i for i, c in enumerate(calls) if c.startswith("python3") and "mstm-split" in c]
    assert syncs and hashes and syncs[0] < hashes[0]


# -- large files: stream.py (hashed and flushed while they arrive) ---------------------
MiB = 1 << 20


def big(path: Path, size: int) -> str:
    """*size* bytes of varied content; returns its sha256."""
    h = hashlib.sha256()
    block = os.urandom(MiB)
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "wb") as f:
        for i in range(size // MiB):
            chunk = i.to_bytes(8, "little") + block[8:]
            f.write(chunk)
            h.update(chunk)
    return h.hexdigest()


def file_sha(path: Path | bytes) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(MiB):
            h.update(chunk)
    return h.hexdigest()


def test_a_256_mib_file_is_streamed_byte_identical_with_mode_and_mtime(
        target: Target, tmp_path: Path) -> None:
    stream = StreamEnv.create(tmp_path / "s", target.sshd)
    stream.configure(outgoing={"target_dir": str(target.dir)})
    src = stream.source / "big one.dat"
    digest = big(src, 256 * MiB)
    src.chmod(0o640)
    os.utime(src, ns=(1_600_000_000_123_456_789, 1_600_000_000_123_456_789))
    r = stream.run("mstm-send", "--once", "--json")
    assert r.returncode == 0, r.stderr
    out = target.dir / "big one.dat"
    assert file_sha(out) == digest and json.loads(r.stdout)["delivered"] == 1
    st = out.stat()
    assert (st.st_mode & 0o7777, st.st_mtime_ns) == (0o640, 1_600_000_000_123_456_789)
    assert not src.exists()  # moved: verified first
    assert set(os.listdir(target.dir)) == {"big one.dat", STAGING, ".mstm-partial"}
    assert os.listdir(target.dir / STAGING) == os.listdir(target.dir / ".mstm-partial") == []
    # streamed (the receiver program ran), and the digest was not computed again by a
    # second reading: the hasher ran once, for the inspect, and answered from the report
    pythons = [c for c in target.calls() if c.startswith("python3")]
    assert len([c for c in pythons if "MSTM-STREAM-2" in c]) == 1
    assert len([c for c in pythons if "mstm-split" in c]) == 1


def test_a_later_inspect_trusts_the_streamed_digest_only_while_the_file_is_unchanged(
        target: Target, tmp_path: Path) -> None:
    digest = big(tmp_path / "src" / "f.dat", 4 * MiB)
    t = target.transport(tmp_path / "src")
    t.stream_min = 1
    batch = new_batch_id()
    dest = staging_dir(str(target.dir), batch)
    t.open()
    try:
        assert t.send([Item("f.dat", 4 * MiB)], dest=dest).exit_code == 0
        assert t.inspect(["f.dat"], staged=batch)["f.dat"].sha256 == digest
        # rewritten in place, same size and mtime and inode: the report is still used
        out = target.dir / STAGING / batch / "f.dat"
        st = out.stat()
        with open(out, "r+b") as f:
            f.write(b"X")
        os.utime(out, ns=(st.st_atime_ns, st.st_mtime_ns))
        assert t.send([Item("f.dat", 4 * MiB, force=True)], dest=dest).exit_code == 0
        assert file_sha(out) == digest
        with open(out, "r+b") as f:
            f.write(b"Y")
        os.utime(out, ns=(st.st_atime_ns, st.st_mtime_ns + 1))  # mtime differs: re-read
        assert t.inspect(["f.dat"], staged=batch)["f.dat"].sha256 == file_sha(out) != digest
    finally:
        t.close()


def test_streamed_hostile_names_arrive_byte_identical(target: Target, tmp_path: Path) -> None:
    src = tmp_path / "src"
    data = payloads()
    for n, d in data.items():
        target.put(src, n, d)
    t = target.transport(src)
    t.stream_min = 1  # every file through stream.py
    batch = new_batch_id()
    t.open()
    try:
        r = t.send([Item(os.fsdecode(n), len(d)) for n, d in data.items()],
                   dest=staging_dir(str(target.dir), batch))
        assert (r.exit_code, r.files) == (0, len(data)), r.error
        assert len(t._streamed) == len(data)
        found = t.inspect([os.fsdecode(n) for n in data], staged=batch)
    finally:
        t.close()
    assert answers(found) == expected(data)
    for n, d in data.items():
        with open(os.path.join(os.fsencode(target.dir / STAGING / batch), n), "rb") as f:
            assert f.read() == d
    assert not (Path.cwd() / "PWNED").exists()
    leftovers = [p for p in target.dir.rglob("*") if b"mstm-stream" in os.fsencode(p)]
    assert leftovers == []


def test_a_name_that_would_climb_out_is_refused_by_the_receiver(target: Target,
                                                                tmp_path: Path) -> None:
    from mstm.transports.common import Monitor
    from mstm.transports.stream import Stream, StreamItemError

    (tmp_path / "x").write_bytes(b"x")
    t = target.transport(tmp_path)
    t.open()
    fd = os.open(tmp_path / "x", os.O_RDONLY)
    try:
        for bad in ("../escape.dat", "a/../../escape.dat", "/etc/escape.dat", "a//b"):
            with pytest.raises(StreamItemError, match="refused"):
                # past the sender's own check (safefs refuses such a path to begin with)
                Stream(t.conn)._send(fd, os.fstat(fd), dest=str(target.dir), relpath=bad,
                                     force=False, monitor=Monitor(), chunk=1 << 20,
                                     final="", partial="")
        with pytest.raises(StreamItemError, match="refused"):
            Stream(t.conn)._send(fd, os.fstat(fd), dest=str(target.dir), relpath="ok",
                                 force=False, monitor=Monitor(), chunk=1 << 20,
                                 final="relative", partial="")
    finally:
        os.close(fd)
        t.close()
    assert not (target.dir.parent / "escape.dat").exists()


def test_nothing_appears_under_the_final_name_before_it_is_complete_and_durable(
        tmp_path: Path) -> None:
    """The receiver runs under strace: its fdatasync of the data comes before the
    rename, the directory's fsync after; and a watcher never sees the final name with
    less than the whole content."""
    need("strace")
    tgt = Target(tmp_path / "t")
    try:
        wrapper(tgt.bindir, "python3", tgt.log,
                body=f'exec {shutil.which("strace")} -f -qq -e trace=fdatasync,fsync,renameat,'
                     f'rename,sync_file_range -o "{tgt.log}.py.strace" /usr/bin/python3 "$@"')
        digest = big(tmp_path / "src" / "slow.dat", 24 * MiB)
        t = tgt.transport(tmp_path / "src")
        t.stream_min, t.bwlimit = 1, 8 * 1024  # 8 MiB/s: about 3 s
        seen: list[int] = []
        stop = [False]

        batch = new_batch_id()
        staged = tgt.dir / STAGING / batch / "slow.dat"

        def watch() -> None:
            while not stop[0]:
                assert not (tgt.dir / "slow.dat").exists()  # only publish puts it there
                with contextlib.suppress(FileNotFoundError):
                    seen.append(staged.stat().st_size)
                time.sleep(0.005)

        w = threading.Thread(target=watch)
        w.start()
        t.open()
        try:
            t0 = time.monotonic()
            r = t.send([Item("slow.dat", 24 * MiB)], dest=staging_dir(str(tgt.dir), batch))
            took = time.monotonic() - t0
        finally:
            stop[0] = True
            w.join()
            t.close()
        assert r.exit_code == 0 and file_sha(staged) == digest
        assert took >= 2.2  # bwlimit honoured (24 MiB at 8 MiB/s, the first chunk free)
        assert seen and set(seen) == {24 * MiB}
        trace = Path(f"{tgt.log}.py.strace").read_text().splitlines()
        kinds = [ln.split()[1].split("(")[0] for ln in trace if "= 0" in ln]
        assert "sync_file_range" in kinds  # written back while it arrived
        last_data_sync = max(i for i, k in enumerate(kinds) if k == "fdatasync")
        rename = kinds.index("renameat") if "renameat" in kinds else kinds.index("rename")
        assert last_data_sync < rename < max(i for i, k in enumerate(kinds) if k == "fsync")
    finally:
        tgt.sshd.cleanup()


def test_a_send_killed_mid_file_resumes_where_it_stopped(target: Target,
                                                         tmp_path: Path) -> None:
    stream = StreamEnv.create(tmp_path / "s", target.sshd)
    stream.configure(outgoing={"target_dir": str(target.dir), "bwlimit": "16384"})
    digest = big(stream.source / "resume.dat", 128 * MiB)
    proc = stream.popen("mstm-send", "--once", stdout=subprocess.DEVNULL,
                        stderr=subprocess.DEVNULL)
    part = target.part("resume.dat")
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        if part.exists() and part.stat().st_size >= 40 * MiB:
            break
        time.sleep(0.05)
    proc.kill()
    proc.wait()
    time.sleep(0.5)  # the target sees the end of its input and flushes what came
    assert part.exists() and not (target.dir / "resume.dat").exists()
    kept = part.stat().st_size
    assert kept >= 40 * MiB
    stream.configure(outgoing={"bwlimit": "0"})
    r = stream.run("mstm-send", "--once", "--json", "-v")
    assert r.returncode == 0, r.stderr
    assert file_sha(target.dir / "resume.dat") == digest
    assert not part.exists() and not (stream.source / "resume.dat").exists()
    m = re.search(r"resumed at byte (\d+) of (\d+)", r.stderr)
    assert m and int(m.group(1)) >= 40 * MiB and int(m.group(2)) == 128 * MiB, r.stderr


def test_a_stalled_stream_is_cut_then_resumed(tmp_path: Path) -> None:
    tgt = Target(tmp_path / "t")
    try:
        digest = big(tmp_path / "src" / "stall.dat", 64 * MiB)
        t = tgt.transport(tmp_path / "src")
        t.stream_min, t.stall_seconds, t.bwlimit = 1, 2, 16 * 1024
        t.open()
        part = tgt.part("stall.dat")
        dest = staging_dir(str(tgt.dir), new_batch_id())

        def pause_when_started() -> None:
            deadline = time.monotonic() + 30
            while time.monotonic() < deadline:
                if part.exists() and part.stat().st_size >= 8 * MiB:
                    break
                time.sleep(0.02)
            for pid in _session_pids(tgt.sshd):  # the target host freezes
                os.kill(pid, signal.SIGSTOP)

        pauser = threading.Thread(target=pause_when_started)
        pauser.start()
        t0 = time.monotonic()
        try:
            r = t.send([Item("stall.dat", 64 * MiB)], dest=dest)
        finally:
            pauser.join()
            for pid in _session_pids(tgt.sshd):
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGCONT)
        took = time.monotonic() - t0
        assert r.exit_code == 30 and "stalled" in r.error and not t.alive()
        assert took < 30
        t.bwlimit = 0
        t.open()
        r = t.send([Item("stall.dat", 64 * MiB)], dest=dest)
        t.close()
        assert r.exit_code == 0, r.error
        assert t._streamed[(dest, "stall.dat")].offset >= 8 * MiB  # resumed
        assert file_sha(Path(dest) / "stall.dat") == digest
    finally:
        tgt.sshd.cleanup()


def _session_pids(sshd: LoopbackSshd) -> list[int]:
    import psutil

    if sshd.proc is None:
        return []
    return [c.pid for c in psutil.Process(sshd.proc.pid).children(recursive=True)]


def test_without_python3_large_files_go_through_rsync(tmp_path: Path) -> None:
    tgt = Target(tmp_path / "t", path_rest="")
    try:
        for name in TOOLBOX:
            real = shutil.which(name, path="/usr/bin:/bin")
            if real and not (tgt.bindir / name).exists():
                (tgt.bindir / name).symlink_to(real)
        (tgt.bindir / "python3").unlink()
        digest = big(tmp_path / "src" / "f.dat", 2 * MiB)
        t = tgt.transport(tmp_path / "src")
        t.stream_min = 1
        t.open()
        try:
            batch = new_batch_id()
            r = t.send([Item("f.dat", 2 * MiB)], dest=staging_dir(str(tgt.dir), batch))
            assert r.exit_code == 0 and r.files == 1, r.error
            assert not t._can_stream
            assert t.inspect(["f.dat"], staged=batch)["f.dat"].sha256 == digest
            # publish and discard work without python3 too
            assert t.publish([Item("f.dat", 2 * MiB)], staged=batch) == {}
            t.discard(batch)
            assert file_sha(tgt.dir / "f.dat") == digest
            assert os.listdir(tgt.dir / STAGING) == []
        finally:
            t.close()
    finally:
        tgt.sshd.cleanup()


def test_a_file_an_earlier_transfer_still_writes_at_the_target_waits_never_goes_by_rsync(
        target: Target, tmp_path: Path) -> None:
    """An earlier stream of this file we gave up on (a hung disk, a cut connection) may
    still run at the target and rename its data into place when it ends; a copy sent
    meanwhile by rsync could be verified, its source deleted, and then be overwritten."""
    import fcntl

    src = tmp_path / "src"
    target.put(src, b"big.dat", os.urandom(4096))
    target.part("big.dat").parent.mkdir(mode=0o700)
    held = os.open(target.part("big.dat"), os.O_RDWR | os.O_CREAT, 0o600)
    fcntl.flock(held, fcntl.LOCK_EX)  # what the orphaned receiver holds
    t = target.transport(src)
    t.stream_min = 1
    t.open()
    try:
        r = t.send([Item("big.dat", 4096)], dest=staging_dir(str(target.dir), new_batch_id()))
    finally:
        t.close()
        os.close(held)
    assert r.exit_code == 12 and "still running at the target" in r.error
    assert not (target.dir / "big.dat").exists()  # not sent another way


def test_a_large_file_already_complete_at_the_target_is_not_streamed_again(
        target: Target, tmp_path: Path) -> None:
    """A cut between the rename at the target and its answer: the next attempt finds the
    file there, complete, and answers with its digest instead of sending it again."""
    src = tmp_path / "src"
    data = os.urandom(3 << 20)
    target.put(src, b"big.dat", data)
    for attempt in range(2):
        t = target.transport(src)  # a new sender: nothing remembered from the first
        t.stream_min = 1
        batch = new_batch_id()
        dest = staging_dir(str(target.dir), batch)
        t.open()
        try:
            r = t.send([Item("big.dat", len(data))], dest=dest)
            assert r.exit_code == 0, r.error
            got = t._streamed[(dest, "big.dat")]
            found = t.inspect(["big.dat"], staged=batch)
            assert t.publish([Item("big.dat", len(data))], staged=batch) == {}
            t.discard(batch)
        finally:
            t.close()
        if attempt == 0:
            first_ino = os.stat(target.dir / "big.dat").st_ino
            assert got.offset == 0
        else:
            assert got.offset == len(data)  # nothing sent
            assert os.stat(target.dir / "big.dat").st_ino == first_ino  # not rewritten
        assert found["big.dat"].sha256 == hashlib.sha256(data).hexdigest()
