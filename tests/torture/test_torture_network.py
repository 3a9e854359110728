"""Scenario 2, network faults: sender and target on two "hosts" (network namespaces
joined by a veth pair), sshd inside the target namespace, ``mstm-send --follow`` inside
the sender namespace, ``mstm-receive --follow`` answering on the target side.

While a producer keeps adding files, one fault after another hits the link: a short and
a long cut, 1% random loss, a tbf bandwidth cap, sshd killed with all its sessions and
restarted, a connection that hangs without closing (SIGSTOP of sshd's session
processes), an iptables blackhole of the ssh port, and finally a WAN: a 100 ms delaying
TCP proxy (netem is not available here) with 1% loss and a bandwidth cap together.
For each fault the time until the next delivery is measured; the hung connection must
be cut by the stall timeout, not wait for TCP.
"""

from __future__ import annotations

import os
import random
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path

import psutil
import pytest
from tests.conftest import need, need_root
from tests.harness.audit import Ledger, TargetObserver, audit, walk
from tests.harness.netns import NetnsSshd, NetPair
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

STALL = 4  # [outgoing] stall_seconds in this scenario
ONLY = os.environ.get("TORTURE_NET_ONLY", "")  # debugging: one fault (cut, loss, ...)
PROXY = Path(__file__).resolve().parents[1] / "harness" / "delayproxy.py"


@pytest.mark.parametrize("iteration", range(PROFILE.iterations))
def test_link_cut_loss_cap_delay_sshd_killed_and_hung(tmp_path: Path, iteration: int) -> None:
    need_root()
    for program in ("ip", "iptables", "tc", "ss", "rsync", "ssh"):
        need(program)
    rng = random.Random(PROFILE.seed + 100 + iteration)
    n_files = PROFILE.net_files
    recovery: dict[str, float | None] = {}
    phases: dict[str, float] = {}
    with NetPair() as net:
        sshd = NetnsSshd(tmp_path / "sshd", ns=net.target_ns, address=net.target_addr)
        sshd.start()
        env = StreamEnv.create(tmp_path / "src", sshd, name="net")
        rx = ReceiverConf(tmp_path / "rx", env.target)
        outgoing = {"target_host": net.target_addr, "target_port": str(sshd.port),
                    "target_uses_arrival_monitor": "true",
                    "receipt_file_poll_interval": "0.1", "receipt_file_poll_count": "200",
                    "batch_max_items": "25", "retry_count": "50",
                    "retry_backoff": "0.2", "retry_backoff_max": "1",
                    "connect_timeout": "3", "stall_seconds": str(STALL)}
        env.configure(outgoing=outgoing)
        ledger = Ledger(env.source)
        logs = tmp_path / "logs"
        logs.mkdir()
        file_sizes = sizes(rng, n_files, small=64 << 10, big=1 << 20, big_share=0.1)
        stop_producing = threading.Event()

        def produce() -> None:
            deadline = time.monotonic() + 400
            for i in range(n_files):
                if stop_producing.is_set() or time.monotonic() > deadline:
                    break
                ledger.put(f"net{i // 50}/f{i:04d}.dat", file_sizes[i])
                # spread over the faults; keep a little work always queued
                stop_producing.wait(rng.uniform(0.02, 0.2))
            # whatever is left, at once
            for i in range(sum(1 for r in ledger.items if r.startswith(b"net")), n_files):
                ledger.put(f"net{i // 50}/f{i:04d}.dat", file_sizes[i])

        def probe_delivered(rel: bytes, t0: float, timeout: float) -> float | None:
            """Seconds from *t0* until the probe item is at the target (None: not in time)."""
            path = os.path.join(os.fsencode(env.target), rel)
            if wait_until(lambda: os.path.exists(path), timeout, step=0.1):
                return round(time.monotonic() - t0, 1)
            return None

        with Daemons() as daemons, TargetObserver(ledger, env.target) as observer:
            send = daemons.add(Daemon(
                "mstm-send", net.wrap(net.sender_ns, env.command("mstm-send", "-v", "--follow")),
                logs / "send.log"))
            recv = daemons.add(Daemon("mstm-receive", net.wrap(net.target_ns, rx.argv("--follow")),
                                      logs / "receive.log"))
            recv.start()
            send.start()
            producer = threading.Thread(target=produce, daemon=True)
            producer.start()
            t_start = time.monotonic()
            def fault(name: str, apply: Callable[[], object], revert: Callable[[], object],
                      hold: float) -> None:
                t0 = time.monotonic()
                apply()
                probe = ledger.put(f"probe/{name}.dat", 4096)
                time.sleep(hold)
                revert()
                recovery[name] = probe_delivered(probe, t0, 90)
                phases[name] = round(time.monotonic() - t0, 1)

            def one_round(r: int) -> None:
                if not wait_until(lambda: bool(walk(env.target)), 30):
                    pytest.fail("nothing delivered before the faults\n" + daemons.logs())
                time.sleep(1)
                if ONLY in ("", "cut"):
                    fault(f"link-cut-short-{r}", net.link_down, net.link_up, 2)
                rules: list[tuple[str, list[str]]] = []
                if ONLY in ("", "loss"):
                    fault(f"loss-1%-{r}", lambda: rules.extend(net.loss(0.01)),
                          lambda: net.remove(rules), 3)
                if ONLY in ("", "tbf"):
                    fault(f"tbf-4mbit-{r}", lambda: net.bandwidth("4mbit"), net.unlimited, 3)
                if ONLY in ("", "kill"):
                    fault(f"sshd-killed-{r}", sshd.kill_sessions, sshd.start, 2)
                # a hung connection: the sessions stop while rsync runs, nothing closes;
                # the sender must give up on it after stall_seconds and connect again
                stopped: list[psutil.Process] = []

                def hang() -> None:
                    wait_until(sshd.rsync_running, 10, step=0.02)
                    stopped.extend(sshd.pause_sessions())
                    net.faults["sshd-sigstop"] = net.faults.get("sshd-sigstop", 0) + 1

                fault(f"hung-sigstop-{r}", hang, lambda: None, 0)
                NetnsSshd.resume(stopped, kill=True)
                blackhole: list[tuple[str, list[str]]] = []
                fault(f"blackhole-{r}", lambda: blackhole.extend(net.blackhole(sshd.port)),
                      lambda: net.remove(blackhole), STALL + 3)
                fault(f"link-cut-long-{r}", net.link_down, net.link_up, STALL + 4)

            for r in range(PROFILE.net_rounds):
                one_round(r)
            # the WAN: through a 100 ms delaying proxy, with loss and a cap
            proxy_port = 2200
            proxy = daemons.add(Daemon("delayproxy", net.wrap(net.sender_ns, [
                sys.executable, str(PROXY), "--listen", f"127.0.0.1:{proxy_port}",
                "--to", f"{net.target_addr}:{sshd.port}", "--delay", "0.1",
                "--max-seconds", "900"]), logs / "proxy.log"))
            proxy.start()
            sshd.add_known_host("127.0.0.1", proxy_port)
            send.stop()
            env.configure(outgoing={"target_host": "127.0.0.1", "target_port": str(proxy_port)})
            wan: list[tuple[str, list[str]]] = []
            wan.extend(net.loss(0.01))
            net.bandwidth("8mbit")
            net.faults["delay-100ms"] = 1
            t0 = time.monotonic()
            send.start()
            probe = ledger.put("probe/wan.dat", 4096)
            recovery["wan-100ms"] = probe_delivered(probe, t0, 60)
            time.sleep(3)
            phases["wan-100ms"] = round(time.monotonic() - t0, 1)
            stop_producing.set()
            producer.join(timeout=60)
            net.remove(wan)
            net.unlimited()
            t0 = time.monotonic()
            drained = wait_until(delivered_all(ledger, env.target), timeout=180)
            phases["drain"] = round(time.monotonic() - t0, 1)
            daemons.stop_all()
            observer.stop()
            res = audit(
                f"network[{iteration}]", ledger, target=env.target, spool_dirs=[env.spool],
                observer=observer,
                extra={"faults": sum(net.faults.values()),
                       "kinds": ",".join(sorted(net.faults)),
                       "recovery": ",".join(f"{k}:{v}" for k, v in recovery.items()),
                       "phases": ",".join(f"{k}:{v}" for k, v in phases.items()),
                       "seconds": round(time.monotonic() - t_start, 1),
                       "seed": PROFILE.seed + 100 + iteration})
            logs_text = daemons.logs()
    assert not net.exists(), "a namespace was left behind"
    assert drained, "not everything was delivered in time\n" + res.line() + "\n" + logs_text
    res.check(all_delivered=True)
    slow = {k: v for k, v in recovery.items() if v is None}
    assert not slow, f"no delivery after {slow}\n{res.line()}\n{logs_text}"
    hung = {k: v for k, v in recovery.items() if k.startswith("hung")}
    assert all(v is not None and v < STALL + 12 for v in hung.values()), (
        f"a hung connection held delivery for {hung} s (stall_seconds = {STALL})\n{logs_text}")
