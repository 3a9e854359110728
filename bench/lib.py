"""Plumbing of the benchmark harness: one temp dir, one loopback sshd, processes that are
always stopped, streams, the receiver, samplers, tables.

Nothing here measures anything by itself; bench/workloads.py does.
"""

from __future__ import annotations

import contextlib
import math
import os
import platform
import re
import resource
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import psutil

REPO = Path(__file__).resolve().parent.parent
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from tests.harness.sshd import LoopbackSshd  # noqa: E402
from tests.harness.streams import StreamEnv  # noqa: E402

BIN = Path(sys.executable).parent

# The children must not log to a journal or talk to a service manager of ours.
CHILD_ENV = {k: v for k, v in os.environ.items()
             if k not in ("JOURNAL_STREAM", "NOTIFY_SOCKET", "WATCHDOG_USEC", "WATCHDOG_PID")}
CHILD_ENV["MSTM_METRICS_DIR"] = ""  # no metrics files (the default directory may not exist)


# ---------------------------------------------------------------------------- output
def out(text: str = "") -> None:
    print(text, flush=True)


def loadavg() -> str:
    one, five, fifteen = os.getloadavg()
    return f"{one:.2f} {five:.2f} {fifteen:.2f}"


def table(headers: Sequence[str], rows: Sequence[Sequence[Any]], title: str = "") -> str:
    cells = [[str(h) for h in headers]] + [[_cell(c) for c in r] for r in rows]
    widths = [max(len(r[i]) for r in cells) for i in range(len(headers))]
    lines = []
    if title:
        lines.append(title)
    for n, r in enumerate(cells):
        lines.append("  ".join(c.ljust(w) if i == 0 else c.rjust(w)
                               for i, (c, w) in enumerate(zip(r, widths, strict=True))).rstrip())
        if n == 0:
            lines.append("  ".join("-" * w for w in widths))
    return "\n".join(lines)


def _cell(v: Any) -> str:
    if v is None:
        return "-"
    if isinstance(v, float):
        if v == 0:
            return "0"
        if abs(v) >= 100:
            return f"{v:.0f}"
        if abs(v) >= 10:
            return f"{v:.1f}"
        if abs(v) >= 0.1:
            return f"{v:.2f}"
        return f"{v:.3f}"
    return str(v)


def median(xs: Sequence[float]) -> float:
    return float(statistics.median(xs)) if xs else float("nan")


def percentile(xs: Sequence[float], p: float) -> float:
    """Nearest-rank percentile (p in 0..100)."""
    if not xs:
        return float("nan")
    s = sorted(xs)
    k = max(0, min(len(s) - 1, math.ceil(p / 100 * len(s)) - 1))
    return s[k]


def machine() -> list[tuple[str, str]]:
    model = "?"
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    mem = psutil.virtual_memory().total / 2**30

    def version(argv: list[str]) -> str:
        try:
            r = subprocess.run(argv, capture_output=True, text=True, timeout=10, check=False)
        except OSError:
            return "not found"
        text = (r.stdout + r.stderr).strip().splitlines()
        return text[0] if text else "?"

    fs = "?"
    with contextlib.suppress(OSError):
        best = ""
        for line in Path("/proc/mounts").read_text().splitlines():
            dev, mnt, kind, *_ = line.split()
            if tempfile.gettempdir().startswith(mnt) and len(mnt) > len(best):
                best, fs = mnt, f"{kind} on {dev} (mounted at {mnt})"
    return [
        ("cpus (nproc)", str(os.cpu_count())),
        ("cpu model", model),
        ("memory", f"{mem:.1f} GiB"),
        ("kernel", platform.release()),
        ("temp filesystem", fs),
        ("rsync", version(["rsync", "--version"])),
        ("ssh", version(["ssh", "-V"])),
        ("python", sys.version.split()[0] + f" ({sys.executable})"),
        ("load average at start", loadavg()),
    ]


# ---------------------------------------------------------------------------- processes
class Procs:
    """Every process the harness starts; stop_all() ends each by its own pid."""

    def __init__(self) -> None:
        self._procs: list[subprocess.Popen[bytes]] = []

    def start(self, argv: Sequence[str], **kw: Any) -> subprocess.Popen[bytes]:
        kw.setdefault("env", CHILD_ENV)
        kw.setdefault("stdin", subprocess.DEVNULL)
        p = subprocess.Popen(list(argv), **kw)
        self._procs.append(p)
        return p

    def stop(self, p: subprocess.Popen[bytes], timeout: float = 30) -> int | None:
        args = p.args if isinstance(p.args, list) else [p.args]
        if p.poll() is None and os.path.basename(str(args[0])) == "py-spy":
            # under the profiler: stop the profiled command, py-spy then writes and exits
            with contextlib.suppress(psutil.Error):
                for child in psutil.Process(p.pid).children():
                    child.terminate()
            with contextlib.suppress(subprocess.TimeoutExpired):
                p.wait(timeout=timeout)
        if p.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                p.send_signal(signal.SIGTERM)
            try:
                p.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                with contextlib.suppress(ProcessLookupError):
                    p.kill()
                p.wait()
        with contextlib.suppress(ValueError):
            self._procs.remove(p)
        return p.returncode

    def stop_all(self) -> None:
        for p in list(self._procs):
            self.stop(p, timeout=10)


@dataclass
class Run:
    """One timed command: wall seconds, exit code, output, client-side CPU of the tree."""

    wall: float
    code: int
    stdout: bytes
    cpu: float  # user+sys of the command and every descendant it waited for
    peak_rss: int = 0  # bytes, of the command's own process (VmHWM), if sampled


def timed(procs: Procs, argv: Sequence[str], *, stderr_to: Path | None = None,
          sample_rss: bool = False, timeout: float = 3600) -> Run:
    """Run argv to completion; wall time from spawn to exit (interpreter start included)."""
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    errf = open(stderr_to, "ab") if stderr_to else subprocess.DEVNULL
    t0 = time.perf_counter()
    try:
        p = procs.start(argv, stdout=subprocess.PIPE, stderr=errf)
        sampler = RssSampler(p.pid).start() if sample_rss else None
        try:
            stdout, _ = p.communicate(timeout=timeout)
        finally:
            wall = time.perf_counter() - t0
            if sampler:
                sampler.stop()
            procs.stop(p)
    finally:
        if stderr_to:
            errf.close()  # type: ignore[union-attr]
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    cpu = (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)
    return Run(wall, p.returncode, stdout, cpu, sampler.peak if sampler else 0)


class RssSampler:
    """Peak RSS of one process: psutil's rss every 20 ms, and the kernel's VmHWM."""

    def __init__(self, pid: int, interval: float = 0.02) -> None:
        self.pid = pid
        self.interval = interval
        self.peak = 0
        self.samples = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, daemon=True)

    def start(self) -> RssSampler:
        self._thread.start()
        return self

    def _loop(self) -> None:
        try:
            proc = psutil.Process(self.pid)
        except psutil.Error:
            return
        while not self._stop.is_set():
            try:
                rss = proc.memory_info().rss
                with open(f"/proc/{self.pid}/status", "rb") as f:
                    for line in f:
                        if line.startswith(b"VmHWM:"):
                            rss = max(rss, int(line.split()[1]) * 1024)
                            break
            except (psutil.Error, OSError, ValueError):
                return
            self.peak = max(self.peak, rss)
            self.samples += 1
            self._stop.wait(self.interval)

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(timeout=5)


# ---------------------------------------------------------------------------- profiling
class Profiler:
    """Wraps chosen commands in `py-spy record` (raw collapsed stacks) when asked to."""

    def __init__(self, directory: Path | None) -> None:
        self.dir = directory
        self.pyspy = shutil.which("py-spy", path=str(BIN)) or shutil.which("py-spy")
        self.files: list[tuple[str, Path]] = []

    @property
    def enabled(self) -> bool:
        return self.dir is not None and self.pyspy is not None

    def wrap(self, name: str, argv: Sequence[str]) -> list[str]:
        assert self.dir is not None and self.pyspy is not None
        self.dir.mkdir(parents=True, exist_ok=True)
        dest = self.dir / f"{name}.txt"
        self.files.append((name, dest))
        return [self.pyspy, "record", "--format", "raw", "--rate", "250", "--idle", "--threads",
                "--nonblocking", "-o", str(dest), "--", *argv]


def summarise_profile(path: Path, top: int = 15) -> str:
    """Top functions by self and by total (inclusive) samples, main thread only."""
    self_: dict[str, int] = {}
    total: dict[str, int] = {}
    lines_: dict[str, int] = {}
    n = 0
    if not path.exists():
        return f"(no profile written at {path})"
    for line in path.read_text(errors="replace").splitlines():
        stack, _, count = line.rpartition(" ")
        if not count.isdigit():
            continue
        frames = stack.split(";")
        # --threads puts a "thread (0x...)" frame first; keep the main thread's stacks
        # (its frames start at the command's entry point); --subprocesses adds "process".
        frames = [f for f in frames if not f.startswith(("process ", "thread "))]
        if not frames or not any("main" in f or "<module>" in f for f in frames[:3]):
            continue
        c = int(count)
        n += c
        leaf = _frame_name(frames[-1])
        self_[leaf] = self_.get(leaf, 0) + c
        where = _frame_name(frames[-1], keep_line=True)
        lines_[where] = lines_.get(where, 0) + c
        for f in {_frame_name(f) for f in frames}:
            total[f] = total.get(f, 0) + c
    if not n:
        return "(empty profile)"
    lines = [f"{n} samples (main thread, wall clock incl. waiting)"]
    lines.append("  self%  function")
    for name, c in sorted(self_.items(), key=lambda kv: -kv[1])[:top]:
        lines.append(f"  {100 * c / n:5.1f}  {name}")
    lines.append("  self%  line")
    for name, c in sorted(lines_.items(), key=lambda kv: -kv[1])[:top // 2]:
        lines.append(f"  {100 * c / n:5.1f}  {name}")
    lines.append("  total%  function (inclusive; mstm code only)")
    mine = [(k, v) for k, v in total.items() if "mstm/" in k or "mstm." in k]
    for name, c in sorted(mine, key=lambda kv: -kv[1])[:top]:
        lines.append(f"  {100 * c / n:6.1f}  {name}")
    return "\n".join(lines)


def _frame_name(frame: str, *, keep_line: bool = False) -> str:
    # py-spy raw frames look like "func (path/to/file.py:123)"; drop the line number
    m = re.match(r"(.*) \((.*?)(:\d+)?\)$", frame)
    if not m:
        return frame
    func, path, line = m.groups()
    if keep_line and line:
        path += line
    short = path
    for marker in ("/cmds/", "/site-packages/", "/lib/python"):
        if marker in path:
            short = path.split(marker, 1)[1]
            break
    return f"{func} ({short})"


# ---------------------------------------------------------------------------- environment
@dataclass
class Bench:
    """One temporary root, one loopback sshd, the processes started, the results."""

    root: Path
    sshd: LoopbackSshd
    procs: Procs
    full: bool
    repeat: int
    profiler: Profiler
    results: dict[str, Any] = field(default_factory=dict)
    # (what, goal, measured, PASS / MISS / n/a)
    targets: list[tuple[str, str, str, str]] = field(default_factory=list)

    def ssh_argv(self) -> list[str]:
        """The ssh a plain rsync uses: the same options mstm passes, minus ControlMaster."""
        s = self.sshd
        return ["ssh", "-o", "BatchMode=yes", "-o", "StrictHostKeyChecking=yes",
                "-o", f"UserKnownHostsFile={s.known_hosts}", "-o", "GlobalKnownHostsFile=/dev/null",
                "-o", "ConnectTimeout=5", "-o", "ServerAliveInterval=10",
                "-o", "ServerAliveCountMax=3", "-o", "LogLevel=ERROR",
                "-i", str(s.client_key), "-o", "IdentitiesOnly=yes", "-p", str(s.port)]

    def rsync_argv(self, src: str, dest: str, *extra: str) -> list[str]:
        return ["rsync", "-a", *extra, "-e", " ".join(self.ssh_argv()), "--", src,
                f"127.0.0.1:{dest}"]

    def stream(self, where: str, name: str, **sections: dict[str, str]) -> StreamEnv:
        # no metrics_dir key: --before runs older code that does not know it ($MSTM_METRICS_DIR
        # is empty in CHILD_ENV, so no .prom file is written either)
        return StreamEnv.create(self.root / where, self.sshd, name=name, metrics=False,
                                **sections)

    def target(self, what: str, goal: str, got: str, ok: bool | None) -> None:
        verdict = "n/a" if ok is None else ("PASS" if ok else "MISS")
        self.targets.append((what, goal, got, verdict))


@contextlib.contextmanager
def bench_env(*, full: bool, repeat: int, profile_dir: Path | None,
              keep: bool = False) -> Iterator[Bench]:
    root = Path(tempfile.mkdtemp(prefix="mstm-bench-"))
    procs = Procs()
    sshd = LoopbackSshd(root / "sshd")
    try:
        sshd.start()
        yield Bench(root=root, sshd=sshd, procs=procs, full=full, repeat=repeat,
                    profiler=Profiler(profile_dir))
    finally:
        procs.stop_all()
        sshd.stop()
        if keep:
            out(f"(kept {root})")
        else:
            shutil.rmtree(root, ignore_errors=True)


# ---------------------------------------------------------------------------- data
def fresh_dir(path: Path) -> Path:
    shutil.rmtree(path, ignore_errors=True)
    path.mkdir(parents=True)
    return path


def link_tree(master: Path, dest: Path) -> None:
    """A copy of master in dest made of hard links (same bytes, no I/O; a move that
    unlinks dest's names leaves master intact)."""
    dest.mkdir(parents=True, exist_ok=True)
    subprocess.run(["cp", "-al", "--", f"{master}/.", str(dest)], check=True)


def count_files(path: Path, *, hidden: bool = False) -> int:
    n = 0
    for _dirpath, dirs, names in os.walk(path):
        if not hidden:
            dirs[:] = [d for d in dirs if not d.startswith(".")]
            names = [x for x in names if not x.startswith(".")]
        n += len(names)
    return n


def wipe(path: Path) -> None:
    shutil.rmtree(path, ignore_errors=True)


def wait_for(pred: Callable[[], bool], timeout: float, interval: float = 0.05) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if pred():
            return True
        time.sleep(interval)
    return pred()


# ---------------------------------------------------------------------------- receiver
class Receiver:
    """`mstm-receive --follow` for a receiving stream on the 'target host' (this machine)."""

    def __init__(self, bench: Bench, root: Path, directory: Path, name: str = "inbound") -> None:
        self.bench = bench
        self.root = root
        self.name = name
        self.directory = directory
        self.proc: subprocess.Popen[bytes] | None = None
        self.log = root / "receive.log"
        self.global_ini = root / "etc" / "global.ini"
        self.configure()

    def configure(self) -> None:
        self.directory.mkdir(parents=True, exist_ok=True)
        (self.root / "spool").mkdir(parents=True, exist_ok=True)
        self.global_ini.parent.mkdir(parents=True, exist_ok=True)
        self.global_ini.write_text(
            f"[global]\ndata_stream_list = {self.name}\n"
            f"spool_base_dir = {self.root / 'spool'}\nruntime_dir = {self.root / 'run'}\n"
            "general_poll_interval = 0.5\n")
        (self.root / "etc" / f"{self.name}.ini").write_text(
            f"[data_stream]\ndirectory = {self.directory}\n")

    def start(self, profile: str | None = None) -> Receiver:
        """Start it; with *profile* (and --profile), under py-spy."""
        self.configure()
        argv = [str(BIN / "mstm-receive"), "--config", str(self.global_ini), "--follow",
                self.name]
        if profile and self.bench.profiler.enabled:
            argv = self.bench.profiler.wrap(profile, argv)
        with open(self.log, "ab") as log:
            self.proc = self.bench.procs.start(argv, stdout=subprocess.DEVNULL, stderr=log)
        time.sleep(1.0 if profile else 0.3)
        return self

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def why_not(self) -> str:
        text = self.log.read_text(errors="replace") if self.log.exists() else ""
        tail = text.strip().splitlines()
        return tail[-1] if tail else "exited"

    def stop(self) -> None:
        if self.proc is not None:
            self.bench.procs.stop(self.proc)
            self.proc = None


def receiver_available(bench: Bench) -> tuple[bool, str]:
    """Whether `mstm-receive --follow` runs here (it is being built by another issue)."""
    rx = Receiver(bench, bench.root / "rx-probe", bench.root / "rx-probe" / "dir")
    rx.start()
    time.sleep(0.7)
    ok = rx.alive()
    why = "" if ok else rx.why_not()
    rx.stop()
    wipe(bench.root / "rx-probe")
    return ok, why


def am_settings() -> dict[str, str]:
    return {"target_uses_arrival_monitor": "true", "receipt_file_poll_interval": "0.5",
            "receipt_file_poll_count": "240"}
