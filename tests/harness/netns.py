"""Two "hosts" on one machine: network namespaces joined by a veth pair, and faults.

:class:`NetPair` makes a sender namespace and a target namespace (both new, both ours:
no address is ever put on an interface of the machine itself, so no packet can leave),
a veth pair between them with one address on each end, and loopback up in each.  It
offers the faults of /work/shared/reference/network-faults.md: the link cut and
restored, iptables random loss and blackhole, a tbf bandwidth cap; there is no netem
here, so delay comes from :mod:`tests.harness.delayproxy`.  Everything it made is
removed by :meth:`NetPair.cleanup` (processes still in the namespaces are killed first,
by pid), also when the test fails: use it as a context manager.

:class:`NetnsSshd` is :class:`~tests.harness.sshd.LoopbackSshd` listening on the
target namespace's address, started there with ``ip netns exec``; it can be killed
with all its sessions, restarted, and have its session processes paused (a connection
that hangs without closing).
"""

from __future__ import annotations

import contextlib
import os
import secrets
import signal
import subprocess
import time
from pathlib import Path

import psutil
from tests.harness.sshd import SSHD, LoopbackSshd

# Addresses exist only inside the two namespaces this module creates.
SUBNET = "10.231.{k}.{h}"


def _run(argv: list[str], *, check: bool = True) -> subprocess.CompletedProcess[str]:
    return subprocess.run(argv, capture_output=True, text=True, timeout=30, check=check)


class NetPair:
    """sender-ns <-veth-> target-ns.  ``sender_addr``/``target_addr`` are the two ends."""

    def __init__(self, tag: str | None = None) -> None:
        tag = tag or secrets.token_hex(3)
        self.tag = tag
        self.sender_ns = f"mstm-{tag}-s"
        self.target_ns = f"mstm-{tag}-t"
        self.sender_dev = f"ms{tag}s"[:15]
        self.target_dev = f"ms{tag}t"[:15]
        k = int(tag[:2], 16) if all(c in "0123456789abcdef" for c in tag[:2]) else 1
        self.sender_addr = SUBNET.format(k=k, h=1)
        self.target_addr = SUBNET.format(k=k, h=2)
        self.faults: dict[str, int] = {}
        self._rules: list[tuple[str, list[str]]] = []
        self._made: list[str] = []

    # -- life cycle -------------------------------------------------------------
    def create(self) -> NetPair:
        try:
            for ns in (self.sender_ns, self.target_ns):
                _run(["ip", "netns", "add", ns])
                self._made.append(ns)
                _run(["ip", "-n", ns, "link", "set", "lo", "up"])
            _run(["ip", "-n", self.sender_ns, "link", "add", self.sender_dev, "type", "veth",
                  "peer", "name", self.target_dev, "netns", self.target_ns])
            for ns, dev, addr in ((self.sender_ns, self.sender_dev, self.sender_addr),
                                  (self.target_ns, self.target_dev, self.target_addr)):
                _run(["ip", "-n", ns, "addr", "add", f"{addr}/30", "dev", dev])
                _run(["ip", "-n", ns, "link", "set", dev, "up"])
            self.wait_reachable()
        except BaseException:
            self.cleanup()
            raise
        return self

    def __enter__(self) -> NetPair:
        return self.create()

    def __exit__(self, *exc: object) -> None:
        self.cleanup()

    def pids(self, ns: str) -> list[int]:
        r = _run(["ip", "netns", "pids", ns], check=False)
        return [int(p) for p in r.stdout.split() if p.isdigit()]

    def cleanup(self) -> None:
        """Kill what still runs in our namespaces (by pid), then delete them."""
        for ns in self._made:
            for pid in self.pids(ns):
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGCONT)
                    os.kill(pid, signal.SIGKILL)
        deadline = time.monotonic() + 10
        while any(self.pids(ns) for ns in self._made) and time.monotonic() < deadline:
            time.sleep(0.05)
        for ns in reversed(self._made):
            _run(["ip", "netns", "delete", ns], check=False)
        self._made = []

    def exists(self) -> bool:
        names = _run(["ip", "netns", "list"], check=False).stdout
        return any(line.split()[0] in (self.sender_ns, self.target_ns)
                   for line in names.splitlines() if line.strip())

    # -- running things ---------------------------------------------------------
    def wrap(self, ns: str, argv: list[str]) -> list[str]:
        return ["ip", "netns", "exec", ns, *argv]

    def wait_reachable(self, timeout: float = 10) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            r = _run(self.wrap(self.sender_ns, ["ping", "-c1", "-W1", self.target_addr]),
                     check=False)
            if r.returncode == 0:
                return
            if "No such file" in r.stderr or "not found" in r.stderr:
                return  # no ping installed: the sshd start-up check will tell
            time.sleep(0.1)
        raise RuntimeError(f"{self.target_addr} not reachable from {self.sender_ns}")

    def _count(self, fault: str) -> None:
        self.faults[fault] = self.faults.get(fault, 0) + 1

    # -- faults -----------------------------------------------------------------
    def link_down(self) -> None:
        self._count("link-cut")
        _run(["ip", "-n", self.target_ns, "link", "set", self.target_dev, "down"])

    def link_up(self) -> None:
        _run(["ip", "-n", self.target_ns, "link", "set", self.target_dev, "up"])
        _run(["ip", "-n", self.sender_ns, "link", "set", self.sender_dev, "up"])

    def _iptables(self, ns: str, rule: list[str]) -> list[str]:
        _run(["ip", "netns", "exec", ns, "iptables", "-w", "-A", *rule])
        self._rules.append((ns, rule))
        return rule

    def _iptables_delete(self, ns: str, rule: list[str]) -> None:
        _run(["ip", "netns", "exec", ns, "iptables", "-w", "-D", *rule], check=False)
        with contextlib.suppress(ValueError):
            self._rules.remove((ns, rule))

    def loss(self, probability: float) -> list[tuple[str, list[str]]]:
        """Drop packets at random, both ways (on INPUT in each namespace)."""
        self._count(f"loss-{probability:g}")
        rules = []
        for ns in (self.sender_ns, self.target_ns):
            rule = ["INPUT", "-m", "statistic", "--mode", "random", "--probability",
                    f"{probability}", "-j", "DROP"]
            rules.append((ns, self._iptables(ns, rule)))
        return rules

    def blackhole(self, port: int) -> list[tuple[str, list[str]]]:
        """Every packet to the target's *port* dropped: connections hang, no reset."""
        self._count("blackhole")
        rule = ["INPUT", "-p", "tcp", "--dport", str(port), "-j", "DROP"]
        return [(self.target_ns, self._iptables(self.target_ns, rule))]

    def remove(self, rules: list[tuple[str, list[str]]]) -> None:
        for ns, rule in rules:
            self._iptables_delete(ns, rule)

    def bandwidth(self, rate: str = "8mbit") -> None:
        """A tbf cap on both ends of the link."""
        self._count(f"tbf-{rate}")
        for ns, dev in ((self.sender_ns, self.sender_dev), (self.target_ns, self.target_dev)):
            _run(["ip", "netns", "exec", ns, "tc", "qdisc", "replace", "dev", dev, "root", "tbf",
                  "rate", rate, "burst", "32kb", "latency", "400ms"])

    def unlimited(self) -> None:
        for ns, dev in ((self.sender_ns, self.sender_dev), (self.target_ns, self.target_dev)):
            _run(["ip", "netns", "exec", ns, "tc", "qdisc", "del", "dev", dev, "root"],
                 check=False)


class NetnsSshd(LoopbackSshd):
    """A throwaway sshd inside *ns*, listening on *address*."""

    def __init__(self, root: Path, *, ns: str, address: str, port: int = 2222) -> None:
        self.ns = ns
        self.address = address
        self._fixed_port = port
        super().__init__(root=root)

    def _setup(self) -> None:
        self.port = self._fixed_port
        super()._setup()
        text = self.config.read_text().replace("ListenAddress 127.0.0.1",
                                                f"ListenAddress {self.address}")
        # notice a dead client quickly, so sessions of killed senders go away
        text += "ClientAliveInterval 5\nClientAliveCountMax 3\n"
        self.config.write_text(text)
        hostpub = Path(f"{self.host_key}.pub").read_text().split()
        self.known_hosts.write_text(f"[{self.address}]:{self.port} {hostpub[0]} {hostpub[1]}\n")

    def add_known_host(self, host: str, port: int) -> None:
        hostpub = Path(f"{self.host_key}.pub").read_text().split()
        with open(self.known_hosts, "a") as f:
            f.write(f"[{host}]:{port} {hostpub[0]} {hostpub[1]}\n")

    def listening(self) -> bool:
        r = _run(["ss", "-N", self.ns, "-Hltn", f"sport = :{self.port}"], check=False)
        return self.address in r.stdout

    def start(self) -> NetnsSshd:
        if self.proc and self.proc.poll() is None:
            return self
        logf = open(self.log, "ab")
        self.proc = subprocess.Popen(["ip", "netns", "exec", self.ns, SSHD, "-D", "-e", "-f",
                                      str(self.config)],
                                     stdout=logf, stderr=logf, stdin=subprocess.DEVNULL)
        logf.close()
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"sshd exited: {self.log.read_text()[-2000:]}")
            if self.listening():
                return self
            time.sleep(0.05)
        raise RuntimeError("sshd did not start listening")

    def sessions(self) -> list[psutil.Process]:
        """The per-connection sshd processes (and everything below them)."""
        if not self.proc or self.proc.poll() is not None:
            return []
        try:
            return psutil.Process(self.proc.pid).children(recursive=True)
        except psutil.NoSuchProcess:
            return []

    def rsync_running(self) -> bool:
        """Is a sender's rsync running at the target (a transfer under way)?"""
        for p in self.sessions():
            with contextlib.suppress(psutil.NoSuchProcess):
                if p.name() == "rsync":
                    return True
        return False

    def kill_sessions(self) -> None:
        """sshd and every session it started die at once (a target going down hard)."""
        victims = self.sessions()
        if self.proc and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()
        for p in victims:
            with contextlib.suppress(psutil.NoSuchProcess):
                p.send_signal(signal.SIGCONT)
                p.kill()
        self.proc = None

    def pause_sessions(self) -> list[psutil.Process]:
        """SIGSTOP every session process: their connections hang without closing."""
        stopped = []
        for p in self.sessions():
            with contextlib.suppress(psutil.NoSuchProcess):
                if p.name().startswith("sshd"):
                    p.send_signal(signal.SIGSTOP)
                    stopped.append(p)
        return stopped

    @staticmethod
    def resume(procs: list[psutil.Process], *, kill: bool = False) -> None:
        for p in procs:
            with contextlib.suppress(psutil.NoSuchProcess):
                p.send_signal(signal.SIGCONT)
                if kill:
                    p.kill()

    def stop(self) -> None:
        self.kill_sessions()
