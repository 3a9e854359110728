"""Scenario 4, concurrency: several senders on one spool, one of them SIGKILLed while it
holds claims (its lease is taken over), a producer renaming files and whole directories
in while the scanners run, and files deleted or truncated by their producer between
scan and send (and while they are being sent).
"""

from __future__ import annotations

import os
import random
import re
import signal
import threading
import time
from pathlib import Path

import pytest
from tests.harness.audit import Ledger, TargetObserver, audit
from tests.harness.sshd import LoopbackSshd
from tests.harness.streams import StreamEnv
from tests.torture.rig import (
    PROFILE,
    Daemon,
    Daemons,
    ReceiverConf,
    delivered_all,
    sizes,
    wait_until,
)

pytestmark = pytest.mark.integration


def _claims_of(spool: Path, pid: int) -> int:
    try:
        names = os.listdir(spool / "claimed")
    except FileNotFoundError:
        return 0
    return sum(1 for n in names if re.search(rf"@[^@]*\.{pid}\.[0-9a-f]+$", n))


@pytest.mark.parametrize("iteration", range(PROFILE.iterations))
def test_several_senders_one_killed_holding_claims_while_files_are_renamed_in(
        tmp_path: Path, sshd: LoopbackSshd, iteration: int) -> None:
    rng = random.Random(PROFILE.seed + 400 + iteration)
    n = PROFILE.conc_files
    env = StreamEnv.create(tmp_path / "src", sshd, name="conc")
    rx = ReceiverConf(tmp_path / "rx", env.target)
    env.configure(outgoing={"target_uses_arrival_monitor": "true",
                            "receipt_file_poll_interval": "0.1",
                            "receipt_file_poll_count": "150", "batch_max_items": "15",
                            "retry_count": "20", "retry_backoff": "0.2",
                            "retry_backoff_max": "1", "lease_seconds": "10"})
    ledger = Ledger(env.source)
    logs = tmp_path / "logs"
    logs.mkdir()
    file_sizes = sizes(rng, n)
    takeovers_needed = 2 if PROFILE.name == "short" else 8

    def produce() -> None:
        i = 0
        deadline = time.monotonic() + 120
        while i < n and time.monotonic() < deadline:
            if rng.random() < 0.15:
                # a whole directory renamed in: written under a dot name, then renamed
                d = f"batch{i:05d}"
                tmp = os.path.join(os.fsencode(env.source), b".producing-" + d.encode())
                os.makedirs(tmp)
                k = min(n - i, rng.randrange(2, 8))
                for j in range(k):
                    rel = f"{d}/part{j}.dat".encode()
                    data_rel = os.path.join(b".producing-" + d.encode(), b"part%d.dat" % j)
                    ledger.put(data_rel, file_sizes[i + j], atomic=False)
                    # recorded under the name it will have once the directory is renamed
                    item = ledger.items.pop(data_rel)
                    item.relpath = rel
                    ledger.items[rel] = item
                    for v in item.versions:
                        ledger.owner_of[v] = rel
                os.rename(tmp, os.path.join(os.fsencode(env.source), d.encode()))
                i += k
            else:
                ledger.put(f"flat/f{i:05d}.dat", file_sizes[i])
                i += 1
            time.sleep(rng.uniform(0, 0.02))

    with Daemons() as daemons, TargetObserver(ledger, env.target) as observer:
        daemons.add(Daemon("mstm-receive", rx.argv("--follow"), logs / "receive.log")).start()
        senders = [daemons.add(Daemon(f"mstm-send-{k}",
                                      env.command("mstm-send", "-v", "--follow"),
                                      logs / f"send{k}.log")).start()
                   for k in range(PROFILE.conc_senders)]
        scanner = daemons.add(Daemon("mstm-scan", env.command("mstm-scan", "--follow"),
                                     logs / "scan.log")).start()
        producer = threading.Thread(target=produce, daemon=True)
        producer.start()
        killed_holding = 0
        extra = 0
        deadline = time.monotonic() + 120
        while killed_holding < takeovers_needed and time.monotonic() < deadline:
            victim = rng.choice(senders)
            assert victim.proc is not None
            # SIGKILL it the moment it holds claims
            if wait_until(lambda v=victim: _claims_of(env.spool, v.proc.pid) > 0, 10,
                          step=0.005):
                victim.signal(signal.SIGKILL)
                killed_holding += 1
                time.sleep(rng.uniform(0.5, 2))
                victim.start()
            elif not producer.is_alive():
                extra += 1  # all delivered already: more work, so that claims are held
                for j in range(30):
                    ledger.put(f"extra/e{extra:03d}-{j:02d}.dat", rng.randrange(0, 200_000))
            if not producer.is_alive() and killed_holding >= takeovers_needed:
                break
        producer.join(timeout=120)
        drained = wait_until(delivered_all(ledger, env.target), timeout=120)
        daemons.stop_all()
        observer.stop()
        took_over = sum(d.log.read_text(errors="replace").count("took over")
                        for d in senders)
        res = audit(f"concurrency[{iteration}]", ledger, target=env.target,
                    spool_dirs=[env.spool], observer=observer,
                    extra={"senders": len(senders), "killed-holding-claims": killed_holding,
                           "takeovers": took_over, "scanner": scanner.starts,
                           "seed": PROFILE.seed + 400 + iteration})
    assert drained, res.line() + "\n" + "\n".join(res.details[:20]) + daemons.logs()
    res.check(all_delivered=True)
    assert killed_holding >= takeovers_needed
    assert took_over >= 1, daemons.logs()


@pytest.mark.parametrize("monitor", [False, True], ids=["plain", "arrival-monitor"])
def test_files_deleted_or_truncated_between_scan_and_send_and_while_sent(
        tmp_path: Path, sshd: LoopbackSshd, monitor: bool) -> None:
    rng = random.Random(PROFILE.seed + 450 + monitor)
    n = PROFILE.conc_files // 2
    env = StreamEnv.create(tmp_path / "src", sshd, name="mut")
    outgoing = {"batch_max_items": "20", "retry_count": "3" if monitor else "20",
                "retry_backoff": "0.1",
                "retry_backoff_max": "0.5", "bwlimit": "20000"}
    if monitor:
        outgoing |= {"target_uses_arrival_monitor": "true",
                     "receipt_file_poll_interval": "0.1", "receipt_file_poll_count": "150"}
    env.configure(outgoing=outgoing)
    ledger = Ledger(env.source)
    names = [ledger.put(f"m{i // 40}/x{i:04d}.dat", s)
             for i, s in enumerate(sizes(rng, n, small=256 << 10, big=2 << 20))]
    # 1. scanned (queued), then changed by the producer before any send
    r = env.run("mstm-scan", "--once")
    assert r.returncode == 0, r.stderr
    mutated = {"deleted": 0, "truncated": 0, "rewritten": 0}
    for rel in rng.sample(names, n // 4):
        what = rng.choice(list(mutated))
        if what == "deleted":
            ok = ledger.withdraw(rel)
        elif what == "truncated":
            ok = ledger.truncate(rel, rng.randrange(0, 100))
        else:
            ok = bool(ledger.put(rel, rng.randrange(0, 4096), atomic=False))
        mutated[what] += ok
    # 2. and while the senders run: the same, at random moments
    stop = threading.Event()

    def meddle() -> None:
        deadline = time.monotonic() + 60
        while not stop.is_set() and time.monotonic() < deadline:
            rel = rng.choice(names)
            what = rng.choice(list(mutated))
            if what == "deleted":
                ok = ledger.withdraw(rel)
            elif what == "truncated":
                ok = ledger.truncate(rel, rng.randrange(0, 100))
            elif os.path.exists(os.path.join(os.fsencode(env.source), rel)):
                ok = bool(ledger.put(rel, rng.randrange(0, 4096), atomic=False))
            else:
                ok = False
            mutated[what] += ok
            stop.wait(rng.uniform(0.02, 0.1))

    with Daemons() as daemons, TargetObserver(ledger, env.target) as observer:
        if monitor:
            rx = ReceiverConf(tmp_path / "rx", env.target)
            daemons.add(Daemon("mstm-receive", rx.argv("--follow"),
                               tmp_path / "receive.log")).start()
        for k in range(2):
            daemons.add(Daemon(f"mstm-send-{k}", env.command("mstm-send", "-v", "--follow"),
                               tmp_path / f"send{k}.log")).start()
        meddler = threading.Thread(target=meddle, daemon=True)
        meddler.start()
        time.sleep(4 if PROFILE.name == "short" else 30)
        stop.set()
        meddler.join(timeout=30)
        def settled() -> bool:
            if delivered_all(ledger, env.target)():
                return True
            now = audit("", ledger, target=env.target, spool_dirs=[env.spool], emit=False)
            return monitor and now.delivered + now.parked == now.items

        drained = wait_until(settled, timeout=120)
        daemons.stop_all()
        observer.stop()
        res = audit(f"mutate-{'am' if monitor else 'plain'}", ledger, target=env.target,
                    spool_dirs=[env.spool], observer=observer,
                    extra={**mutated, "seed": PROFILE.seed + 450 + monitor})
    # With the arrival monitor and [incoming] overwrite = false (the default), a version
    # that changed after an earlier one was published is refused: parked with the
    # reason, its source kept.  Anything else must be delivered.
    assert drained, res.line() + "\n" + "\n".join(res.details[:20]) + daemons.logs()
    res.check(all_delivered=not monitor)
    assert res.failed_kept == res.parked, res.line()
