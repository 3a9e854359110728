"""mstm-diskwatch on a small file system of its own: a 16 MiB tmpfs mounted in a private
mount namespace (issue 5, "done when" 1).

The one test here (root; under CI it runs as root) starts pytest again on this file
inside ``unshare --mount``, where the ``scenario_*`` functions run: each mounts its own
tmpfs, so nothing is mounted on the machine itself.  The real command runs
(``mstm-diskwatch --once`` / ``--follow``); free space is what statvfs says.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from tests.conftest import need, need_root

from mstm.log import MESSAGE_IDS
from mstm.spool import ItemRecord, Spool

pytestmark = pytest.mark.integration

INSIDE = "MSTM_DISKWATCH_NAMESPACE"
ROOT = Path(__file__).resolve().parents[2]
BIN = Path(sys.executable).parent
MIB = 1024 * 1024
SIZE_MIB = 16
# level_good, level_low, level_vlow, hysteresis (MB)
GOOD, LOW, VLOW, MARGIN = 10, 6, 3, 0.5


def test_diskwatch_on_a_tmpfs_in_a_private_mount_namespace() -> None:
    need_root()
    need("unshare")
    need("mount")
    env = {**os.environ, INSIDE: "1", "PYTHONDONTWRITEBYTECODE": "1"}
    argv = ["unshare", "--mount", "--propagation", "private", sys.executable, "-m", "pytest",
            "-v", "-p", "no:cacheprovider", "-o", "addopts=", "-o", "python_functions=scenario_*",
            "--rootdir", str(ROOT), __file__]
    r = subprocess.run(argv, cwd=ROOT, env=env, capture_output=True, text=True, timeout=120)
    print(r.stdout, r.stderr)
    assert r.returncode == 0, r.stdout + r.stderr
    assert " 4 passed" in r.stdout, r.stdout


# --------------------------------------------------------------------------- inside


def _inside() -> None:
    if os.environ.get(INSIDE) != "1" or os.readlink("/proc/self/ns/mnt") == os.readlink(
            f"/proc/{os.getppid()}/ns/mnt"):
        pytest.fail("scenarios mount a tmpfs: run them through the test in this file")


class Disk:
    """A tmpfs with streams on it, their config, and helpers to fill and free it."""

    def __init__(self, base: Path) -> None:
        _inside()
        self.mnt = base / "mnt"
        self.mnt.mkdir()
        subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={SIZE_MIB}m", "tmpfs",
                        str(self.mnt)], check=True)
        self.etc = base / "etc"
        self.spool = base / "spool"  # not on the tmpfs: the spool is elsewhere in real life
        self.etc.mkdir()
        self.spool.mkdir()
        (self.mnt / "other").mkdir()
        self.fillers = 0
        self.streams: dict[str, str] = {}

    def umount(self) -> None:
        subprocess.run(["umount", "-l", str(self.mnt)], check=False)

    def add(self, name: str, priority: int, **data_stream: str) -> Path:
        d = self.mnt / name
        d.mkdir()
        mode = data_stream.pop("mode", "move")
        self.streams[name] = (
            "[data_stream]\n"
            f"directory = {d}\npriority = {priority}\n"
            + "".join(f"{k} = {v}\n" for k, v in data_stream.items())
            + "[outgoing]\n"
            f"target_host = archive.example.org\ntarget_dir = /archive\ntransfer_mode = {mode}\n")
        self.write()
        return d

    def write(self) -> Path:
        g = self.etc / "global.ini"
        g.write_text(
            "[global]\n"
            f"data_stream_list = {' '.join(self.streams)}\n"
            f"spool_base_dir = {self.spool}\n"
            "[disk_space_monitor]\n"
            "base_priority = 100\n"
            f"level_good = {GOOD}\nlevel_low = {LOW}\nlevel_vlow = {VLOW}\n"
            f"hysteresis = {MARGIN}\npoll_interval = 0.2\n")
        for name, text in self.streams.items():
            (self.etc / f"{name}.ini").write_text(text)
        return g

    def free(self) -> int:
        s = os.statvfs(self.mnt)
        return s.f_bavail * s.f_frsize

    def fill_to(self, free_mib: float) -> None:
        """Add or remove filler files (outside every stream) until about free_mib is free."""
        want = int(free_mib * MIB)
        while self.free() < want and self.fillers:
            (self.mnt / "other" / f"filler{self.fillers}").unlink()
            self.fillers -= 1
        if self.free() > want:
            self.fillers += 1
            with open(self.mnt / "other" / f"filler{self.fillers}", "wb") as f:
                f.write(b"\0" * (self.free() - want))
        assert abs(self.free() - want) < 64 * 1024 or self.free() > want, self.free()

    def put(self, stream: str, rel: str, mib: float, mtime: float) -> Path:
        p = self.mnt / stream / rel
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_bytes(os.urandom(int(mib * MIB)))
        os.utime(p, (mtime, mtime))
        return p

    def deliver(self, stream: str, *paths: Path) -> None:
        """done/ records for *paths*, as mstm-send writes them after verification."""
        with Spool(self.spool / stream) as spool:
            spool.enqueue([ItemRecord(str(p.relative_to(self.mnt / stream)), p.stat().st_size,
                                      p.stat().st_mtime_ns) for p in paths])
            for claim in spool.claim(max_items=100, max_bytes=1 << 40):
                assert spool.complete(claim, sha256="0" * 64)

    def run(self, *args: str, journal: bool = False) -> subprocess.CompletedProcess[str]:
        """The command; with *journal*, its stderr goes to journald as under systemd."""
        env = {k: v for k, v in os.environ.items()
               if k not in ("JOURNAL_STREAM", "NOTIFY_SOCKET", "MSTM_CONFIG")}
        argv = [str(BIN / "mstm-diskwatch"), "--config", str(self.etc / "global.ini"), *args]
        if not journal:
            return subprocess.run(argv, capture_output=True, text=True, timeout=30, env=env)
        with journal_stream("mstm-diskwatch") as stream:
            st = os.fstat(stream.fileno())
            env["JOURNAL_STREAM"] = f"{st.st_dev}:{st.st_ino}"
            return subprocess.run(argv, stdout=subprocess.PIPE, stderr=stream.fileno(),
                                  text=True, timeout=30, env=env)

    def once(self, *args: str, journal: bool = False) -> dict[str, object]:
        r = self.run("--once", "--json", *args, journal=journal)
        assert r.returncode == 0, r.stdout + r.stderr
        data = json.loads(r.stdout)
        data["stderr"] = r.stderr
        return data  # type: ignore[no-any-return]

    def stopped(self) -> set[str]:
        return {n for n in self.streams if (self.mnt / n / ".stop").exists()}

    def tree(self) -> dict[str, tuple[int, int]]:
        """Every path under the mount and the spool with its size and mtime."""
        out = {}
        for top in (self.mnt, self.spool):
            for p in top.rglob("*"):
                st = p.lstat()
                out[str(p)] = (st.st_size, st.st_mtime_ns)
        return out


@pytest.fixture
def disk(tmp_path: Path) -> Iterator[Disk]:
    d = Disk(tmp_path)
    yield d
    d.umount()


@pytest.fixture(scope="module")
def journald() -> Iterator[None]:
    """A journald of our own (tmpfs over /run/systemd, /run/log, /var/log/journal)."""
    _inside()
    for path in ("/run/systemd", "/run/log", "/var/log/journal"):
        if path != "/var/log/journal" or os.path.isdir(path):
            Path(path).mkdir(parents=True, exist_ok=True)
            subprocess.run(["mount", "-t", "tmpfs", "tmpfs", path], check=True)
    Path("/run/systemd/journal").mkdir()
    proc = subprocess.Popen(["/lib/systemd/systemd-journald"], stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    try:
        wait_for(lambda: os.path.exists("/run/systemd/journal/stdout"))
        yield
    finally:
        proc.terminate()
        proc.wait(10)


def journal_stream(identifier: str) -> socket.socket:
    """A stream into journald, as systemd gives a service for its stderr."""
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    s.connect("/run/systemd/journal/stdout")
    s.sendall(f"{identifier}\n\n6\n0\n0\n0\n0\n".encode())
    s.shutdown(socket.SHUT_RD)
    return s


def journal(*matches: str) -> list[dict[str, str]]:
    r = subprocess.run(["journalctl", "--no-pager", "-o", "json", *matches],
                       capture_output=True, text=True, check=True)
    return [json.loads(line) for line in r.stdout.splitlines()]


def actions(report: dict[str, object], kind: str) -> list[str]:
    return [str(a["stream"]) for a in report["actions"] if a["kind"] == kind]  # type: ignore[attr-defined]


def scenario_filling_past_each_level_stops_streams_in_priority_order_and_freeing_resumes(
        disk: Disk) -> None:
    for name, prio in (("important", 200), ("bulk", 10), ("normal", 100), ("manual", 20)):
        disk.add(name, prio)
    (disk.mnt / "manual" / ".stop").write_text("operator: paused for maintenance\n")
    disk.fill_to(GOOD + 2)
    assert disk.once()["filesystems"][0]["level"] == "GOOD"  # type: ignore[index]
    disk.fill_to(LOW - 1)  # LOW: streams at or below base_priority, lowest first
    report = disk.once()
    assert report["filesystems"][0]["level"] == "LOW"  # type: ignore[index]
    assert actions(report, "stop") == ["bulk", "normal"]
    assert disk.stopped() == {"bulk", "normal", "manual"}
    first = (disk.mnt / "bulk" / ".stop").read_text().splitlines()[0]
    assert first.startswith(f"mstm-diskwatch: disk space LOW on {disk.mnt} (")
    disk.fill_to(VLOW - 1)  # VLOW: the rest too
    assert actions(disk.once(), "stop") == ["important"]
    disk.fill_to(LOW + 0.25)  # just above level_low, within the margin: no change
    assert actions(disk.once(), "resume") == []
    disk.fill_to(LOW + 1)  # OKAY: the stream paused only at VLOW resumes
    assert actions(disk.once(), "resume") == ["important"]
    disk.fill_to(GOOD - 1)  # still OKAY: those paused at LOW stay paused
    assert actions(disk.once(), "resume") == []
    disk.fill_to(GOOD + 1)  # GOOD: all of ours resume, highest priority first
    assert actions(disk.once(), "resume") == ["normal", "bulk"]
    assert disk.stopped() == {"manual"}
    assert (disk.mnt / "manual" / ".stop").read_text() == "operator: paused for maintenance\n"


def scenario_at_vlow_only_delivered_items_are_deleted_oldest_first_and_each_is_logged(
        disk: Disk, journald: None) -> None:
    disk.add("mirror", 10, mode="mirror", deletion_enabled="true")
    disk.add("moved", 20, mode="move", deletion_enabled="true")
    disk.add("keep", 5)  # deletion not enabled
    m = [disk.put("mirror", f"run/m{i}.dat", 1, mtime=1_700_000_000 + i) for i in range(4)]
    waiting = disk.put("mirror", "waiting.dat", 1, mtime=1_600_000_000)  # oldest; undelivered
    v = disk.put("moved", "verified.dat", 1, mtime=1_500_000_000)  # not yet unlinked by send
    k = disk.put("keep", "k.dat", 1, mtime=1_400_000_000)
    disk.deliver("mirror", *m)
    disk.deliver("moved", v)
    disk.deliver("keep", k)
    disk.fill_to(VLOW - 1.5)  # needs 2 MiB back (level_vlow + margin)
    report = disk.once(journal=True)
    deleted = [a["path"] for a in report["actions"] if a["kind"] == "delete"]  # type: ignore[attr-defined]
    assert deleted == [str(m[0]), str(m[1]), str(m[2])]
    assert m[3].exists() and waiting.exists() and v.exists() and k.exists()
    wait_for(lambda: len(journal(f"MESSAGE_ID={MESSAGE_IDS['diskwatch_deleted']}")) == 3)
    events = journal(f"MESSAGE_ID={MESSAGE_IDS['diskwatch_deleted']}")
    assert [(e["MSTM_STREAM"], e["MSTM_ITEM"], e["MSTM_BYTES"]) for e in events] == [
        ("mirror", f"run/m{i}.dat", str(MIB)) for i in range(3)]
    assert all(e["SYSLOG_IDENTIFIER"] == "mstm-diskwatch" for e in events)
    levels = journal(f"MESSAGE_ID={MESSAGE_IDS['disk_level']}")
    assert [e["MSTM_RESULT"] for e in levels] == ["VLOW", "LOW"]
    disk.fill_to(VLOW - 2.5)  # again: the mirror stream's last one, then the moved one
    deleted = [a["path"] for a in disk.once()["actions"] if a["kind"] == "delete"]  # type: ignore[attr-defined]
    assert deleted == [str(m[3]), str(v)]
    assert waiting.exists() and k.exists()


def scenario_dry_run_changes_nothing_and_says_what_it_would_do(disk: Disk) -> None:
    disk.add("bulk", 10, mode="mirror", deletion_enabled="true")
    disk.add("important", 200)
    a = disk.put("bulk", "a.dat", 1, mtime=1_700_000_000)
    disk.deliver("bulk", a)
    disk.fill_to(VLOW - 1)
    before = disk.tree()
    r = disk.run("--once", "--dry-run")
    assert r.returncode == 0, r.stderr
    assert disk.tree() == before
    said = r.stdout.splitlines()[:3]
    assert said[0].startswith(f"stop bulk: would place {disk.mnt / 'bulk' / '.stop'}: ")
    assert said[1].startswith(f"stop important: would place {disk.mnt / 'important'}")
    assert said[2].startswith(f"delete bulk: would delete {a} ({MIB} bytes): ")
    assert r.stdout.splitlines()[3].split()[:2] == ["STREAM", "PRIO"]


def scenario_follow_tells_systemd_it_is_ready_and_reacts_as_the_disk_fills_and_empties(
        disk: Disk, tmp_path: Path) -> None:
    disk.add("bulk", 10)
    disk.fill_to(GOOD + 2)
    sock_path = tmp_path / "notify"
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sock.bind(str(sock_path))
    sock.settimeout(10)
    env = {k: v for k, v in os.environ.items() if k not in ("JOURNAL_STREAM", "MSTM_CONFIG")}
    env.update(NOTIFY_SOCKET=str(sock_path))
    proc = subprocess.Popen([str(BIN / "mstm-diskwatch"), "--config",
                             str(disk.etc / "global.ini"), "--follow"], env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        ready = sock.recv(4096).decode()
        assert "READY=1" in ready and f"{disk.mnt} GOOD" in ready
        disk.fill_to(LOW - 1)
        wait_for(lambda: disk.stopped() == {"bulk"})
        disk.fill_to(GOOD + 1)
        wait_for(lambda: disk.stopped() == set())
    finally:
        proc.send_signal(signal.SIGTERM)
        _out, err = proc.communicate(timeout=10)
        sock.close()
    assert proc.returncode == 0, err
    assert "disk space on" in err and "is LOW" in err


def wait_for(cond: Callable[[], object], timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while not cond():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.05)
