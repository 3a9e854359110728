"""The torture rig: profiles, the real daemons under test, producers, and draining.

Profiles (environment, set by ``make torture`` / left alone by ``make test``):

``TORTURE_PROFILE``     ``short`` (default; what ``make test`` runs) or ``long``
``TORTURE_ITERATIONS``  how many times each scenario runs, each in a fresh world (1)
``TORTURE_SECONDS``     the fault phase of the time-driven scenarios lasts at least
                        this long (0: only the profile's counts matter)
``TORTURE_SEED``        seed of every random choice (default: random, printed)

Every loop here is bounded in count and in time, and every process a scenario starts
is stopped (SIGTERM, then SIGKILL, by its pid) when the scenario ends, also on failure.
"""

from __future__ import annotations

import contextlib
import os
import random
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO

from tests.harness.audit import Ledger

BIN = Path(sys.executable).parent


@dataclass(frozen=True)
class Profile:
    name: str
    iterations: int
    seconds: float
    seed: int
    # scenario 1: process crashes
    crash_files: int
    crash_kills: int
    # scenario 2: network faults
    net_files: int
    net_rounds: int
    # scenario 3: disk full
    disk_files: int
    disk_rounds: int
    # scenario 4: concurrency
    conc_files: int
    conc_senders: int
    # scenario 6: clock
    clock_items: int
    clock_steps: int
    # scenario 7: hostile source and hostile target (issue 12)
    hostile_files: int = 120
    hostile_seconds: float = 8.0


def profile() -> Profile:
    name = os.environ.get("TORTURE_PROFILE", "short")
    seed = int(os.environ.get("TORTURE_SEED") or random.SystemRandom().randrange(1 << 30))
    iterations = int(os.environ.get("TORTURE_ITERATIONS") or 1)
    seconds = float(os.environ.get("TORTURE_SECONDS") or 0)
    if name == "long":
        return Profile("long", iterations, seconds, seed, crash_files=5000, crash_kills=60,
                       net_files=1200, net_rounds=3, disk_files=120, disk_rounds=3,
                       conc_files=3000, conc_senders=4, clock_items=5000, clock_steps=2000,
                       hostile_files=1000, hostile_seconds=60.0)
    if name != "short":
        raise ValueError(f"TORTURE_PROFILE must be short or long, not {name!r}")
    return Profile("short", iterations, seconds, seed, crash_files=500, crash_kills=10,
                   net_files=240, net_rounds=1, disk_files=40, disk_rounds=1,
                   conc_files=400, conc_senders=3, clock_items=600, clock_steps=300)


PROFILE = profile()


# ---------------------------------------------------------------------------- daemons


@dataclass
class Daemon:
    """One real mstm process (or sshd, proxy...) that may be killed and started again."""

    name: str
    argv: list[str]
    log: Path
    env: dict[str, str] | None = None
    proc: subprocess.Popen[bytes] | None = None
    starts: int = 0
    kills: dict[str, int] = field(default_factory=dict)
    exits: list[int | None] = field(default_factory=list)

    def start(self) -> Daemon:
        if self.alive():
            return self
        with open(self.log, "ab") as log:
            log.write(f"--- start {self.starts} at {_stamp()}\n".encode())
        self.proc = subprocess.Popen(self.argv, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                                     stdin=subprocess.DEVNULL, env=self.env)
        # every line of the log gets the time it was written (the tools print none)
        threading.Thread(target=_copy_stamped, args=(self.proc.stderr, self.log),
                         daemon=True).start()
        self.starts += 1
        return self

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def signal(self, sig: int, *, wait: float = 30) -> int | None:
        """Send *sig*, wait for the exit (SIGKILL after *wait* s); the exit status."""
        if not self.alive():
            return None
        assert self.proc is not None
        name = signal.Signals(sig).name
        self.kills[name] = self.kills.get(name, 0) + 1
        with contextlib.suppress(ProcessLookupError):
            self.proc.send_signal(sig)
        try:
            code: int | None = self.proc.wait(timeout=wait)
        except subprocess.TimeoutExpired:
            self.kills["SIGKILL-after-timeout"] = self.kills.get("SIGKILL-after-timeout", 0) + 1
            self.proc.kill()
            code = self.proc.wait()
        self.exits.append(code)
        return code

    def stop(self, wait: float = 30) -> int | None:
        return self.signal(signal.SIGTERM, wait=wait)

    def tail(self, n: int = 3000) -> str:
        try:
            return self.log.read_bytes()[-n:].decode("utf-8", "replace")
        except OSError:
            return ""


def _stamp() -> str:
    now = time.time()
    return time.strftime("%H:%M:%S", time.localtime(now)) + f".{int(now % 1 * 1000):03d}"


def _copy_stamped(stream: IO[bytes], path: Path) -> None:
    with open(path, "ab", buffering=0) as out, contextlib.suppress(OSError, ValueError):
        for line in stream:
            out.write(_stamp().encode() + b" " + line)
        stream.close()


class Daemons:
    """The daemons of one scenario; all stopped on exit, whatever happened."""

    def __init__(self) -> None:
        self.all: dict[str, Daemon] = {}

    def add(self, d: Daemon) -> Daemon:
        self.all[d.name] = d
        return d

    def __getitem__(self, name: str) -> Daemon:
        return self.all[name]

    def __enter__(self) -> Daemons:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop_all()

    def stop_all(self) -> None:
        for d in self.all.values():
            if d.alive():
                assert d.proc is not None
                with contextlib.suppress(ProcessLookupError):
                    d.proc.send_signal(signal.SIGTERM)
        for d in self.all.values():
            if d.proc is not None and d.proc.poll() is None:
                try:
                    d.proc.wait(timeout=30)
                except subprocess.TimeoutExpired:
                    d.proc.kill()
                    d.proc.wait()

    def kills(self) -> int:
        return sum(n for d in self.all.values() for k, n in d.kills.items()
                   if not k.startswith("SIGKILL-after"))

    def logs(self) -> str:
        return "\n".join(f"==== {d.name} ({d.log})\n{d.tail()}" for d in self.all.values())


# ---------------------------------------------------------------------------- receiver


class ReceiverConf:
    """A receiving stream on the target side: publishes into *directory*."""

    def __init__(self, root: Path, directory: Path, name: str = "inbound") -> None:
        self.root = root
        self.name = name
        self.directory = directory
        directory.mkdir(parents=True, exist_ok=True)
        (root / "spool").mkdir(parents=True, exist_ok=True)
        self.global_ini = root / "etc" / "global.ini"
        self.global_ini.parent.mkdir(parents=True, exist_ok=True)
        self.global_ini.write_text(
            f"[global]\ndata_stream_list = {name}\nspool_base_dir = {root / 'spool'}\n"
            f"runtime_dir = {root / 'run'}\ngeneral_poll_interval = 0.5\n")
        (root / "etc" / f"{name}.ini").write_text(f"[data_stream]\ndirectory = {directory}\n")

    def argv(self, *args: str) -> list[str]:
        return [str(BIN / "mstm-receive"), "--config", str(self.global_ini), "-v", *args,
                self.name]


# ---------------------------------------------------------------------------- helpers


def wait_until(pred: Callable[[], bool], timeout: float, step: float = 0.2) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if pred():
            return True
        time.sleep(step)
    return pred()


def delivered_all(ledger: Ledger, target: Path) -> Callable[[], bool]:
    """True once every live item's last version is at the target and gone from the source."""
    from tests.harness.audit import file_sha

    def check() -> bool:
        base_t = os.fsencode(target)
        base_s = os.fsencode(ledger.source)
        for rel in ledger.final_names():
            item = ledger.items[rel]
            if os.path.lexists(os.path.join(base_s, rel)):
                return False
            if file_sha(os.path.join(base_t, rel)) != item.final:
                return False
        return True

    return check


@contextlib.contextmanager
def timed() -> Iterator[dict[str, float]]:
    t: dict[str, float] = {"start": time.monotonic()}
    try:
        yield t
    finally:
        t["seconds"] = round(time.monotonic() - t["start"], 1)


def sizes(rng: random.Random, n: int, *, small: int = 16 << 10, big: int = 512 << 10,
          big_share: float = 0.05) -> list[int]:
    return [rng.randrange(big // 2, big) if rng.random() < big_share else rng.randrange(0, small)
            for _ in range(n)]
