"""Scenario 1, process crashes: SIGKILL (and SIGTERM) of mstm-send, mstm-receive and
mstm-scan at random moments while files move; each is started again at once.

The stream is set up as in production with the arrival monitor: ``mstm-send --follow``
(which scans too, as mstm-stream@.service runs it), a separate ``mstm-scan --follow``
racing it for the scan lock, and ``mstm-receive --follow`` on the target side, all
over a real sshd on loopback.  A producer keeps adding files (written under a dot name,
then renamed) for the whole fault phase, so every kill lands while something moves.
"""

from __future__ import annotations

import random
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
    timed,
    wait_until,
)

pytestmark = pytest.mark.integration


@pytest.mark.parametrize("iteration", range(PROFILE.iterations))
def test_kill_send_receive_and_scan_at_random_moments(tmp_path: Path, sshd: LoopbackSshd,
                                                       iteration: int) -> None:
    rng = random.Random(PROFILE.seed + iteration)
    n_files, n_kills = PROFILE.crash_files, PROFILE.crash_kills
    env = StreamEnv.create(tmp_path / "src", sshd, name="crash")
    rx = ReceiverConf(tmp_path / "rx", env.target)
    env.configure(outgoing={"target_uses_arrival_monitor": "true",
                            "receipt_file_poll_interval": "0.1",
                            "receipt_file_poll_count": "150",
                            "batch_max_items": "25", "retry_count": "20",
                            "retry_backoff": "0.2", "retry_backoff_max": "1"},
                  data_stream={"poll_interval": "0.5"})
    ledger = Ledger(env.source)
    logs = tmp_path / "logs"
    logs.mkdir()
    file_sizes = sizes(rng, n_files)
    fault_seconds = max(PROFILE.seconds, 12.0 if PROFILE.name == "short" else 60.0)

    def produce() -> None:
        # every file within the fault phase, in small bursts
        per_burst = max(1, n_files // int(fault_seconds / 0.25))
        deadline = time.monotonic() + fault_seconds + 60
        i = 0
        while i < n_files and time.monotonic() < deadline:
            for _ in range(per_burst):
                if i >= n_files:
                    break
                ledger.put(f"d{i % 7}/run{i // 100}/f{i:05d}.dat", file_sizes[i])
                i += 1
            time.sleep(0.25 * rng.uniform(0.5, 1.5))

    with Daemons() as daemons, TargetObserver(ledger, env.target) as observer, timed() as t:
        send = daemons.add(Daemon("mstm-send", env.command("mstm-send", "-v", "--follow"),
                                  logs / "send.log"))
        scan = daemons.add(Daemon("mstm-scan", env.command("mstm-scan", "-v", "--follow"),
                                  logs / "scan.log"))
        recv = daemons.add(Daemon("mstm-receive", rx.argv("--follow"), logs / "receive.log"))
        for d in (recv, scan, send):
            d.start()
        producer = threading.Thread(target=produce, name="producer", daemon=True)
        producer.start()
        victims = [send] * 5 + [recv] * 3 + [scan] * 2
        started = time.monotonic()
        kills = 0
        while (kills < n_kills or time.monotonic() - started < fault_seconds) and \
                time.monotonic() - started < fault_seconds + 240:
            time.sleep(rng.uniform(0.3, 1.6) * fault_seconds / max(n_kills, 1) / 1.0)
            victim = rng.choice(victims)
            sig = signal.SIGTERM if rng.random() < 0.2 else signal.SIGKILL
            victim.signal(sig)
            kills += 1
            if rng.random() < 0.3:
                time.sleep(rng.uniform(0, 0.5))
            victim.start()
        producer.join(timeout=120)
        assert not producer.is_alive(), "the producer did not finish"
        for d in (recv, scan, send):
            d.start()
        drained = wait_until(delivered_all(ledger, env.target), timeout=180)
        daemons.stop_all()
        observer.stop()
        stuck = sum(d.kills.get("SIGKILL-after-timeout", 0) for d in daemons.all.values())
        res = audit(f"crash[{iteration}]", ledger, target=env.target, spool_dirs=[env.spool],
                    observer=observer,
                    extra={"kills": daemons.kills(),
                           "sigkill": sum(d.kills.get("SIGKILL", 0) for d in
                                          daemons.all.values()),
                           "sigterm": sum(d.kills.get("SIGTERM", 0) for d in
                                          daemons.all.values()),
                           "sigterm-hung": stuck,
                           "seconds": round(time.monotonic() - t["start"], 1),
                           "seed": PROFILE.seed + iteration})
    assert drained, "not everything was delivered in time\n" + res.line() + "\n" + \
        "\n".join(res.details[:20]) + daemons.logs()
    res.check(all_delivered=True)
    assert kills >= n_kills
    assert stuck == 0, "a process did not end within 30 s of SIGTERM\n" + daemons.logs()
