"""Scenario 7, a hostile source and a hostile target (issue 12): the source's paths and
contents change under mstm while it works, and the target holds traps.

Hostile source (``mstm-send --follow`` over a real sshd, move mode, file items):

* **paths that change**: a directory of the stream is again and again swapped for a
  symbolic link to a directory outside the stream whose files have the same names,
  sizes and mtimes as the real ones (and content "SECRET");
* **content that changes after hashing**: files are rewritten in place with the same
  size and their mtime put back (``touch -r``), replaced by a rename of a file with the
  same size and mtime, and rewritten through a shared ``mmap``;
* the audit: nothing lost, duplicated or torn, and no secret byte under a final name at
  the target.

Hostile target (directory items, with and without the arrival monitor): the target
already holds another team's file inside a directory the stream delivers, a directory
planted as a symbolic link out of the target, and a file where a directory will come;
the same directory item is delivered twice with different files; setuid, setgid and
sticky bits are in the source.  Nothing the stream did not bring is removed, nothing is
written through the planted link, the conflicts are parked with their sources kept, and
no special bit survives.
"""

from __future__ import annotations

import mmap
import os
import random
import stat
import threading
import time
from collections.abc import Callable
from pathlib import Path

import pytest
from tests.harness.audit import Ledger, TargetObserver, audit, payload
from tests.harness.sshd import LoopbackSshd
from tests.harness.streams import StreamEnv
from tests.torture.rig import (
    PROFILE,
    Daemon,
    Daemons,
    ReceiverConf,
    delivered_all,
    timed,
    wait_until,
)

pytestmark = pytest.mark.integration

SECRET = b"SECRET-OUTSIDE-THE-STREAM"
PAGE = 4096  # rewrites of one page: a reader sees the old or the new page, never a mix


def secret_files_under(root: Path) -> list[str]:
    """Final names (no dot component) at *root* holding the secret."""
    found = []
    for dirpath, dirs, names in os.walk(root):
        dirs[:] = [d for d in dirs if not d.startswith(".")]
        for n in names:
            p = os.path.join(dirpath, n)
            try:
                with open(p, "rb") as f:
                    if SECRET in f.read():
                        found.append(p)
            except OSError:
                continue
    return found


class Attacks:
    """The hostile producer's threads; every loop bounded in time."""

    def __init__(self, ledger: Ledger, source: Path, outside: Path, rng: random.Random,
                 seconds: float) -> None:
        self.ledger = ledger
        self.source = source
        self.outside = outside
        self.rng = rng
        self.deadline = time.monotonic() + seconds
        self.counts = {"swaps": 0, "rewrites": 0, "renames": 0, "mmaps": 0, "window": 0}
        self._lock = threading.Lock()
        self._busy: set[bytes] = set()  # files an attack is working on: one at a time
        self.threads = [threading.Thread(target=f, name=f.__name__, daemon=True)
                        for f in (self.swap, self.rewrite, self.rename_over, self.mmap_write)]

    def start(self) -> None:
        for t in self.threads:
            t.start()

    def join(self) -> None:
        for t in self.threads:
            t.join(timeout=max(0.0, self.deadline - time.monotonic()) + 60)
            assert not t.is_alive(), f"attack {t.name} did not end"

    def _count(self, what: str) -> None:
        with self._lock:
            self.counts[what] += 1

    def _pick(self) -> bytes | None:
        """A file no other attack is working on (the ledger's versions of a file must be
        recorded in the order they reach it); release it with _done."""
        with self._lock:
            names = [r for r in self.ledger.final_names()
                     if not r.startswith(b"swapped/") and r not in self._busy]
            if not names:
                return None
            rel = self.rng.choice(names)
            self._busy.add(rel)
            return rel

    def _done(self, rel: bytes) -> None:
        with self._lock:
            self._busy.discard(rel)

    # -- paths that change under us ----------------------------------------------
    def swap(self) -> None:
        real, aside = self.source / "swapped", self.source / ".swapped-real"
        while time.monotonic() < self.deadline:
            os.rename(real, aside)
            os.symlink(self.outside, real)
            time.sleep(self.rng.uniform(0.02, 0.3))
            os.unlink(real)
            os.rename(aside, real)
            self._count("swaps")
            time.sleep(self.rng.uniform(0.02, 0.3))

    # -- content that changes after hashing -----------------------------------------
    def _rewrite_with(self, rel: bytes, write: Callable[[int, bytes], None]) -> None:
        path = os.path.join(os.fsencode(self.source), rel)
        try:
            fd = os.open(path, os.O_RDWR)
        except FileNotFoundError:
            return  # delivered and deleted already
        try:
            st = os.fstat(fd)
            if st.st_nlink == 0 or st.st_size != PAGE:
                return
            time.sleep(0.05)  # held open for writing: mstm must keep it meanwhile
            data = payload(rel, self.ledger.version_count(rel), PAGE)
            digest = self.ledger.record(rel, data)
            write(fd, data)
            os.utime(fd, ns=(st.st_atime_ns, st.st_mtime_ns))  # touch -r: mtime put back
            if os.fstat(fd).st_nlink == 0:
                # unlinked between mstm's last check and our write: the one window
                # mstm(7) names ("What mstm guarantees"); this version never existed
                # under its name for mstm to see
                self._count("window")
                self.ledger.items[rel].versions.remove(digest)
        finally:
            os.close(fd)

    def rewrite(self) -> None:
        while time.monotonic() < self.deadline:
            rel = self._pick()
            if rel is not None:
                try:
                    self._rewrite_with(rel, lambda fd, data: os.pwrite(fd, data, 0))
                finally:
                    self._done(rel)
                self._count("rewrites")
            time.sleep(self.rng.uniform(0.01, 0.08))

    def mmap_write(self) -> None:
        def through_a_map(fd: int, data: bytes) -> None:
            m = mmap.mmap(fd, PAGE, mmap.MAP_SHARED, mmap.PROT_READ | mmap.PROT_WRITE)
            try:
                m[:] = data
                time.sleep(0.1)  # mapped and dirty for a while
                m.flush()
            finally:
                m.close()

        while time.monotonic() < self.deadline:
            rel = self._pick()
            if rel is not None:
                try:
                    self._rewrite_with(rel, through_a_map)
                finally:
                    self._done(rel)
                self._count("mmaps")
            time.sleep(self.rng.uniform(0.05, 0.2))

    def rename_over(self) -> None:
        while time.monotonic() < self.deadline:
            rel = self._pick()
            if rel is not None:
                try:
                    self._rename_over(rel)
                finally:
                    self._done(rel)
            time.sleep(self.rng.uniform(0.02, 0.1))

    def _rename_over(self, rel: bytes) -> None:
        path = os.path.join(os.fsencode(self.source), rel)
        try:
            st = os.stat(path)
        except FileNotFoundError:
            return
        if st.st_size == PAGE:
            tmp = os.path.join(os.path.dirname(path), b".renaming")
            data = payload(rel, self.ledger.version_count(rel), PAGE)
            with open(tmp, "wb") as f:
                f.write(data)
            os.utime(tmp, ns=(st.st_atime_ns, st.st_mtime_ns))  # same size and mtime
            self.ledger.record(rel, data)
            try:
                os.rename(tmp, path)
            except FileNotFoundError:  # its directory went (delivered): not a version
                os.unlink(tmp)
                self.ledger.items[rel].versions.pop()
                return
            self._count("renames")


@pytest.mark.parametrize("iteration", range(PROFILE.iterations))
def test_a_hostile_source_loses_nothing_and_leaks_nothing(tmp_path: Path, sshd: LoopbackSshd,
                                                          iteration: int) -> None:
    rng = random.Random(PROFILE.seed + 700 + iteration)
    env = StreamEnv.create(tmp_path / "src", sshd, name="hostilesrc")
    env.configure(outgoing={"batch_max_items": "8", "retry_count": "50",
                            "retry_backoff": "0.1", "retry_backoff_max": "0.5"},
                  data_stream={"poll_interval": "0.3"})
    ledger = Ledger(env.source)
    outside = tmp_path / "outside"
    outside.mkdir()
    n = PROFILE.hostile_files
    for i in range(n):
        ledger.put(f"d{i % 4}/f{i:05d}.dat", PAGE)
    for i in range(max(8, n // 10)):
        rel = f"swapped/s{i:04d}.dat"
        ledger.put(rel, PAGE)
        st = os.stat(env.source / rel)
        (outside / f"s{i:04d}.dat").write_bytes((SECRET * (PAGE // len(SECRET) + 1))[:PAGE])
        os.utime(outside / f"s{i:04d}.dat", ns=(st.st_atime_ns, st.st_mtime_ns))
    attacks = Attacks(ledger, env.source, outside, rng, PROFILE.hostile_seconds)

    with Daemons() as daemons, TargetObserver(ledger, env.target) as observer, timed() as t:
        send = daemons.add(Daemon("mstm-send", env.command("mstm-send", "-v", "--follow"),
                                  tmp_path / "send.log"))
        attacks.start()
        send.start()
        attacks.join()
        drained = wait_until(delivered_all(ledger, env.target), timeout=180)
        daemons.stop_all()
        observer.stop()
        leaked = secret_files_under(env.target)
        res = audit(f"hostile-source[{iteration}]", ledger, target=env.target,
                    spool_dirs=[env.spool], observer=observer,
                    extra={**attacks.counts, "leaked": len(leaked),
                           "seconds": round(time.monotonic() - t["start"], 1),
                           "seed": PROFILE.seed + 700 + iteration})
    assert not leaked, f"a file from outside the stream reached the target: {leaked}"
    assert all(p.read_bytes().startswith(SECRET) for p in outside.iterdir()), \
        "a file outside the stream was changed or deleted"
    assert drained, "not everything was delivered in time\n" + res.line() + "\n" + \
        "\n".join(res.details[:20]) + daemons.logs()
    res.check(all_delivered=True)
    assert attacks.counts["swaps"] > 0 and attacks.counts["rewrites"] > 0
    assert attacks.counts["window"] <= 2, attacks.counts


@pytest.mark.parametrize("monitor", [False, True], ids=["inspect", "arrival-monitor"])
def test_a_hostile_target_keeps_what_it_had_and_special_bits_never_survive(
        tmp_path: Path, sshd: LoopbackSshd, monitor: bool) -> None:
    env = StreamEnv.create(tmp_path / "src", sshd, name="hostiletgt")
    settings: dict[str, str] = {"retry_count": "1", "retry_backoff": "0.1",
                                "retry_backoff_max": "0.2"}
    if monitor:
        settings.update(target_uses_arrival_monitor="true", receipt_file_poll_interval="0.1",
                        receipt_file_poll_count="150")
    env.configure(data_stream={"transfer_unit": "dir"}, outgoing=settings)
    rx = ReceiverConf(tmp_path / "rx", env.target)
    ledger = Ledger(env.source)
    # the target's own traps and another team's data
    target_outside = tmp_path / "target-outside"
    target_outside.mkdir()
    (env.target / "run1").mkdir(parents=True)
    (env.target / "run1" / "other-team.dat").write_bytes(b"theirs")
    (env.target / "run2").symlink_to(target_outside)  # planted: a link out of the target
    (env.target / "run3").write_bytes(b"a file where a directory will come")
    # what the target held before counts as delivered items of the audit: it must stay
    ledger.record(b"run1/other-team.dat", b"theirs")
    ledger.record(b"run3", b"a file where a directory will come")
    # the source: four directory items, with special bits
    for run in ("run0", "run1", "run2", "run3"):
        for k in range(3):
            ledger.put(f"{run}/sub{k % 2}/f{k}.dat", 1000 + k)
    (env.source / "run0" / "sub0" / "f0.dat").chmod(0o4755)
    (env.source / "run0" / "sub1").chmod(0o3777)
    (env.source / "run0" / "sub0" / "f2.dat").chmod(0o2750)
    (env.source / "run0" / "empty").mkdir()

    with Daemons() as daemons, TargetObserver(ledger, env.target) as observer:
        if monitor:
            daemons.add(Daemon("mstm-receive", rx.argv("--follow"),
                               tmp_path / "receive.log")).start()
        first = env.run("mstm-send", "-v", "--once", "--json", timeout=180)
        # the same directory item again, with other files: merged, nothing of it lost
        for k in range(3, 5):
            ledger.put(f"run0/later/f{k}.dat", 500 + k)
        ledger.put("run1/second.dat", 700)
        for _ in range(3):  # retries of the conflicts end in failed/
            second = env.run("mstm-send", "-v", "--once", "--json", timeout=180)
            time.sleep(0.3)
        daemons.stop_all()
        observer.stop()
        res = audit(f"hostile-target[{'monitor' if monitor else 'inspect'}]", ledger,
                    target=env.target, spool_dirs=[env.spool], observer=observer)
    logs = first.stderr[-3000:] + second.stderr[-3000:]
    assert (env.target / "run1" / "other-team.dat").read_bytes() == b"theirs", logs
    assert list(target_outside.iterdir()) == [], "written through a link planted at the target"
    assert (env.target / "run2").is_symlink() and (env.target / "run3").is_file()
    for rel in ("run0/sub0/f0.dat", "run0/sub1/f1.dat", "run0/later/f3.dat", "run1/sub0/f0.dat",
                "run1/second.dat"):
        assert (env.target / rel).is_file(), f"{rel} not delivered\n{logs}"
    assert (env.target / "run0" / "empty").is_dir()
    for dirpath, dirs, files in os.walk(env.target):
        dirs[:] = [d for d in dirs if not d.startswith(".")]
        for name in dirs + files:
            mode = os.lstat(os.path.join(dirpath, name)).st_mode
            assert not mode & (stat.S_ISUID | stat.S_ISGID | stat.S_ISVTX), \
                f"{dirpath}/{name} kept mode {mode:o}"
    # the conflicting items are parked, their sources kept
    assert (env.source / "run2" / "sub0" / "f0.dat").exists()
    assert (env.source / "run3" / "sub0" / "f0.dat").exists()
    assert res.lost == 0 and res.partial == 0 and res.duplicated == 0, \
        res.line() + "\n" + "\n".join(res.details[:20]) + logs
