"""Scenario 3, disk faults: the target's file system fills up in the middle of a batch,
and the spool's file system fills up while scanning.

The one test (root) runs pytest again on this file inside ``unshare --mount``, where
the ``scenario_*`` functions mount small tmpfs file systems of their own: nothing is
mounted on the machine itself.  sshd, mstm-send and mstm-receive are the real ones,
started inside that mount namespace so that they see the small file systems.

* target full, plain rsync_ssh: a small tmpfs, mostly taken by a filler file; a batch
  larger than what is left fails part way; items are retried, then parked in failed/
  with the reason, sources kept; the filler is deleted ("space freed") and
  ``--retry-failed`` delivers everything.
* target full, with the arrival monitor: the same, with ``mstm-receive --follow``
  answering; what did not fit comes back in error receipts.
* spool full: the spool on a tiny tmpfs that fills while the scan enqueues; the sender
  fails cleanly, nothing is lost, and after a remount with more room all is delivered.
"""

from __future__ import annotations

import os
import random
import re
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
from tests.conftest import need, need_root
from tests.harness.audit import Ledger, TargetObserver, audit, emit_line
from tests.harness.sshd import SSHD, LoopbackSshd
from tests.harness.streams import StreamEnv
from tests.torture.rig import PROFILE, Daemon, Daemons, ReceiverConf, wait_until

pytestmark = pytest.mark.integration

INSIDE = "MSTM_TORTURE_DISK_NAMESPACE"
ROOT = Path(__file__).resolve().parents[2]
MIB = 1 << 20


def test_target_and_spool_file_systems_full(tmp_path: Path) -> None:
    need_root()
    need("unshare")
    need("mount")
    need(SSHD)
    need("rsync")
    log = tmp_path / "audit.log"
    env = {**os.environ, INSIDE: "1", "PYTHONDONTWRITEBYTECODE": "1",
           "TORTURE_SEED": str(PROFILE.seed), "TORTURE_AUDIT_LOG": str(log)}
    argv = ["unshare", "--mount", "--propagation", "private", sys.executable, "-m", "pytest",
            "-q", "-p", "no:cacheprovider", "-o", "addopts=", "-o", "python_functions=scenario_*",
            "--rootdir", str(ROOT), "--basetemp", str(tmp_path / "inside"), __file__]
    r = subprocess.run(argv, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    if log.exists():
        for line in log.read_text().splitlines():
            emit_line(line)
    assert r.returncode == 0, r.stdout[-20000:] + r.stderr[-5000:]
    assert re.search(r"\b3 passed", r.stdout), r.stdout


# --------------------------------------------------------------------------- inside


def _inside() -> None:
    if os.environ.get(INSIDE) != "1" or os.readlink("/proc/self/ns/mnt") == os.readlink(
            f"/proc/{os.getppid()}/ns/mnt"):
        pytest.fail("scenarios mount a tmpfs: run them through the test in this file")


def _mount(path: Path, size_mib: float) -> None:
    path.mkdir(parents=True, exist_ok=True)
    subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={int(size_mib * 1024)}k", "tmpfs",
                    str(path)], check=True)


@pytest.fixture
def box(tmp_path: Path) -> Iterator[tuple[Path, LoopbackSshd]]:
    _inside()
    server = LoopbackSshd(root=tmp_path / "sshd").start()
    yield tmp_path, server
    server.cleanup()
    subprocess.run(["umount", "-R", "-l", str(tmp_path)], check=False,
                   capture_output=True)


def _fill(env: StreamEnv, ledger: Ledger, rng: random.Random, n: int, tag: str) -> None:
    for i in range(n):
        ledger.put(f"{tag}/f{i:03d}.dat", rng.randrange(100 << 10, 400 << 10))


def _run_target_full(tmp: Path, sshd: LoopbackSshd, *, monitor: bool) -> None:
    rng = random.Random(PROFILE.seed + 300 + monitor)
    mnt = tmp / "mnt"
    # room for everything once the filler is gone (items are 100-400 KiB)
    _mount(mnt, 8 + PROFILE.disk_rounds * PROFILE.disk_files * 0.4)
    env = StreamEnv.create(tmp / "src", sshd, name="disk")
    target = mnt / "target"
    target.mkdir()
    outgoing = {"target_dir": str(target), "retry_count": "1", "retry_backoff": "0.1",
                "retry_backoff_max": "0.2", "batch_max_items": "50"}
    if monitor:
        outgoing |= {"target_uses_arrival_monitor": "true",
                     "receipt_file_poll_interval": "0.1", "receipt_file_poll_count": "300"}
    env.configure(outgoing=outgoing)
    ledger = Ledger(env.source)
    runs = []
    with Daemons() as daemons, TargetObserver(ledger, target) as observer:
        if monitor:
            rx = ReceiverConf(tmp / "rx", target)
            daemons.add(Daemon("mstm-receive", rx.argv("--follow"), tmp / "receive.log")).start()
        for rnd in range(PROFILE.disk_rounds):
            filler = mnt / f".filler{rnd}"
            free = os.statvfs(mnt).f_bavail * os.statvfs(mnt).f_frsize
            with open(filler, "wb") as f:
                f.write(b"\0" * max(0, free - 3 * MIB))  # leave ~3 MiB
            _fill(env, ledger, rng, PROFILE.disk_files, f"r{rnd}")  # ~10 MiB: cannot fit
            first = env.run("mstm-send", "--once", "--json", timeout=300)
            runs.append(first.returncode)
            # some items could not be written: parked or queued, with their sources
            assert first.returncode in (1, 75), first.stderr[-3000:]
            failed = os.listdir(env.spool / "failed")
            assert failed or os.listdir(env.spool / "new"), first.stderr[-3000:]
            mid = audit(f"disk-full{'-am' if monitor else ''}[{rnd}] while full", ledger,
                        target=target, spool_dirs=[env.spool], emit=False)
            mid.check()
            assert mid.failed_kept > 0, mid.line() + "\n" + first.stderr[-3000:]
            filler.unlink()  # space freed
            second = env.run("mstm-send", "--once", "--json", "--retry-failed", timeout=300)
            assert second.returncode == 0, second.stderr[-3000:]
        if monitor:
            wait_until(lambda: not any(p.name.endswith(".mstm-rcpt") for p in
                                       (target / ".mstm-incoming").iterdir()), 10)
        daemons.stop_all()
        observer.stop()
        res = audit(f"disk-full{'-am' if monitor else ''}", ledger, target=target,
                    spool_dirs=[env.spool], observer=observer,
                    extra={"rounds": PROFILE.disk_rounds, "parked-while-full": mid.parked,
                           "kept-while-full": mid.failed_kept, "faults": PROFILE.disk_rounds,
                           "seed": PROFILE.seed + 300 + monitor})
    res.check(all_delivered=True)


def scenario_target_full_mid_batch(box: tuple[Path, LoopbackSshd]) -> None:
    _run_target_full(*box, monitor=False)


def scenario_target_full_mid_batch_with_the_arrival_monitor(
        box: tuple[Path, LoopbackSshd]) -> None:
    _run_target_full(*box, monitor=True)


def scenario_spool_full_while_scanning(box: tuple[Path, LoopbackSshd]) -> None:
    tmp, sshd = box
    rng = random.Random(PROFILE.seed + 310)
    spool_base = tmp / "spoolfs"
    # 64 pages: the spool writes the records of 512 items to one file (~35 pages), so
    # the scan fills it with its second chunk
    _mount(spool_base, 0.25)
    env = StreamEnv.create(tmp / "src", sshd, name="sp")
    # StreamEnv puts the spool in <root>/spool: point it at the tiny file system
    env.global_ini.write_text(env.global_ini.read_text().replace(
        f"spool_base_dir = {env.root / 'spool'}", f"spool_base_dir = {spool_base}"))
    ledger = Ledger(env.source)
    n = 3 * 512 + 100 * PROFILE.disk_rounds
    for i in range(n):
        ledger.put(f"s{i // 50}/g{i:04d}.dat", rng.randrange(0, 2048))
    first = env.run("mstm-send", "--once", "--json", timeout=300)
    (tmp / "first.stderr").write_text(first.stderr)
    # bug 2: this was "internal error: OSError ... report it" and exit 70
    assert first.returncode == 75, "the spool did not fill up? " + first.stderr[-2000:]
    assert "internal error" not in first.stderr and "Traceback" not in first.stderr, \
        first.stderr[-3000:]
    mid = audit("spool-full while full", ledger, target=env.target,
                spool_dirs=[spool_base / "sp"], emit=False)
    # nothing lost; an item sent and verified whose done record did not fit keeps its
    # source (never deleted without the record): the next run finishes it
    mid.check(no_leftovers=False)
    subprocess.run(["mount", "-o", "remount,size=64m", str(spool_base)], check=True)
    for _ in range(3):
        second = env.run("mstm-send", "--once", "--json", timeout=300)
        if second.returncode == 0 and not any(walk_source(env)):
            break
    res = audit("spool-full", ledger, target=env.target, spool_dirs=[spool_base / "sp"],
                extra={"first-exit": first.returncode, "delivered-while-full": mid.delivered,
                       "faults": 1, "seed": PROFILE.seed + 310})
    res.check(all_delivered=True)


def walk_source(env: StreamEnv) -> list[str]:
    return [n for _, _, names in os.walk(env.source) for n in names if not n.startswith(".")]
