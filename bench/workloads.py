"""The five workloads of issue 8, each printing its table as it completes.

Every workload measures mstm and its baseline in the same run, on the same data, over
the same loopback sshd.  Figures are wall-clock seconds measured by this process from
spawn to exit (interpreter start-up included for mstm, ssh start-up for rsync).
"""

from __future__ import annotations

import json
import os
import subprocess
import threading
import time
from pathlib import Path
from typing import Any

import psutil
from inotify_simple import INotify
from inotify_simple import flags as inf

from bench.lib import (
    BIN,
    Bench,
    Receiver,
    RssSampler,
    am_settings,
    count_files,
    fresh_dir,
    link_tree,
    loadavg,
    median,
    out,
    percentile,
    summarise_profile,
    table,
    timed,
    wait_for,
    wipe,
)

MiB = 1 << 20


def _send_once(b: Bench, stream: Any, *extra: str, profile: str | None = None,
               sample_rss: bool = False) -> tuple[float, int, float, dict[str, Any]]:
    argv = stream.command("mstm-send", "--once", "--json", *extra)
    if profile and b.profiler.enabled:
        argv = b.profiler.wrap(profile, argv)
    r = timed(b.procs, argv, stderr_to=stream.root / "send.log", sample_rss=sample_rss)
    try:
        summary = json.loads(r.stdout.decode().strip().splitlines()[-1])
    except (ValueError, IndexError):
        summary = {}
    return r.wall, r.code, r.cpu, summary


def _check(label: str, ok: bool, detail: str) -> None:
    if not ok:
        out(f"  !! {label}: {detail}")


# ============================================================================ 1. small files
def small_files(b: Bench, rx_ok: bool, rx_why: str) -> None:
    n, size = 10_000, 4096
    out(f"\n== 1. small files: {n:,} x {size // 1024} KiB, one-off move over rsync_ssh "
        f"({b.repeat} run(s) each, median; load {loadavg()})")
    master = fresh_dir(b.root / "w1" / "master")
    for d in range(100):
        sub = master / f"d{d:02d}"
        sub.mkdir()
        for i in range(n // 100):
            (sub / f"f{i:03d}.dat").write_bytes(os.urandom(size))
    base_dst = b.root / "w1" / "rsync-target"
    plain = b.stream("w1/mstm", "small")
    am = b.stream("w1/mstm-am", "smallam", outgoing=am_settings())
    rx = Receiver(b, b.root / "w1" / "rx", am.target) if rx_ok else None

    rows: dict[str, list[tuple[float, float]]] = {k: [] for k in
                                                  ("rsync", "rsync-rm", "mstm", "mstm-am")}
    for _ in range(b.repeat):
        # baseline: one plain rsync -a of the tree over a fresh ssh connection
        fresh_dir(base_dst)
        r = timed(b.procs, b.rsync_argv(f"{master}/", f"{base_dst}/"))
        _check("rsync -a", r.code == 0 and count_files(base_dst) == n, f"exit {r.code}")
        rows["rsync"].append((r.wall, r.cpu))
        # the same with --remove-source-files: what a plain rsync "move" costs
        src = fresh_dir(b.root / "w1" / "rm-src")
        link_tree(master, src)
        fresh_dir(base_dst)
        r = timed(b.procs, b.rsync_argv(f"{src}/", f"{base_dst}/", "--remove-source-files"))
        _check("rsync --remove-source-files", r.code == 0 and count_files(src) == 0,
               f"exit {r.code}")
        rows["rsync-rm"].append((r.wall, r.cpu))
        # mstm, no arrival monitor: scan + spool + one rsync + remote sha256 + move
        for stream, key, receiver in ((plain, "mstm", None), (am, "mstm-am", rx)):
            if key == "mstm-am" and receiver is None:
                continue
            wipe(stream.spool)
            fresh_dir(stream.target)
            fresh_dir(stream.source)
            link_tree(master, stream.source)
            if receiver:
                receiver.start()
            try:
                wall, code, cpu, summary = _send_once(b, stream)
            finally:
                if receiver:
                    receiver.stop()
            delivered = summary.get("delivered")
            _check(key, code == 0 and delivered == n and count_files(stream.source) == 0
                   and count_files(stream.target) == n,
                   f"exit {code}, delivered {delivered}, left {count_files(stream.source)}, "
                   f"target {count_files(stream.target)}; see {stream.root / 'send.log'}")
            rows[key].append((wall, cpu))

    base = median([w for w, _ in rows["rsync"]])
    labels = {
        "rsync": "rsync -a (baseline)",
        "rsync-rm": "rsync -a --remove-source-files",
        "mstm": "mstm-send --once (no arrival monitor)",
        "mstm-am": "mstm-send --once + mstm-receive",
    }
    table_rows: list[tuple[Any, ...]] = []
    res: dict[str, Any] = {}
    for key, label in labels.items():
        runs = rows[key]
        if not runs:
            table_rows.append((label, None, None, None, None,
                               f"not run: mstm-receive unavailable ({rx_why})"))
            continue
        wall = median([w for w, _ in runs])
        cpu = median([c for _, c in runs])
        res[key] = {"wall": wall, "cpu": cpu, "runs": [w for w, _ in runs]}
        table_rows.append((label, wall, n / wall, cpu, wall / base,
                           " ".join(f"{w:.2f}" for w, _ in runs)))
    out(table(["", "wall s", "files/s", "client CPU s", "x rsync", "runs"], table_rows))
    out("  (client CPU: user+sys of the command and the children it waited for; sshd side "
        "not counted. Each tool opens one ssh connection per run; mstm's is a ControlMaster\n"
        "   that its verification round trip reuses, the baseline's is rsync's own.)")
    b.results["small"] = res
    if "mstm" in res:
        ratio = res["mstm"]["wall"] / base
        b.target("1. small files, no arrival monitor", "<= 1.5x rsync", f"{ratio:.2f}x",
                 ratio <= 1.5)
    if "mstm-am" in res:
        ratio = res["mstm-am"]["wall"] / base
        b.target("1. small files, arrival monitor", "<= 2.5x rsync", f"{ratio:.2f}x",
                 ratio <= 2.5)
    else:
        b.target("1. small files, arrival monitor", "<= 2.5x rsync", "not measured", None)

    if b.profiler.enabled:
        wipe(plain.spool)
        fresh_dir(plain.target)
        fresh_dir(plain.source)
        link_tree(master, plain.source)
        _send_once(b, plain, profile="w1-mstm-send")
        if rx is not None:
            wipe(am.spool)
            fresh_dir(am.target)
            fresh_dir(am.source)
            link_tree(master, am.source)
            rx.start(profile="w1-mstm-receive")
            try:
                _send_once(b, am, profile="w1-mstm-send-am")
            finally:
                rx.stop()
    wipe(b.root / "w1")


# ============================================================================ 2. large file
def large_file(b: Bench, rx_ok: bool, rx_why: str) -> None:
    size = (2048 if b.full else 512) * MiB
    out(f"\n== 2. large file: one {size // MiB} MiB file of random data, over rsync_ssh "
        f"({b.repeat} run(s) each, median; load {loadavg()})")
    master = fresh_dir(b.root / "w2" / "master")
    block = os.urandom(16 * MiB)  # 16 MiB random, repeated: no sparse holes, real hashing
    with open(master / "big.dat", "wb") as f:
        for _ in range(size // len(block)):
            f.write(block)
    base_dst = b.root / "w2" / "rsync-target"
    plain = b.stream("w2/mstm", "large")
    am = b.stream("w2/mstm-am", "largeam", outgoing=am_settings())
    rx = Receiver(b, b.root / "w2" / "rx", am.target) if rx_ok else None
    rows: dict[str, list[tuple[float, float]]] = {"rsync": [], "mstm": [], "mstm-am": []}
    for _ in range(b.repeat):
        fresh_dir(base_dst)
        r = timed(b.procs, b.rsync_argv(f"{master}/", f"{base_dst}/"))
        _check("rsync -a", r.code == 0 and (base_dst / "big.dat").stat().st_size == size,
               f"exit {r.code}")
        rows["rsync"].append((r.wall, r.cpu))
        fresh_dir(base_dst)  # the page cache should not hold two copies for the next runs
        for stream, key, receiver in ((plain, "mstm", None), (am, "mstm-am", rx)):
            if key == "mstm-am" and receiver is None:
                continue
            wipe(stream.spool)
            fresh_dir(stream.target)
            fresh_dir(stream.source)
            link_tree(master, stream.source)
            if receiver:
                receiver.start()
            try:
                wall, code, cpu, summary = _send_once(b, stream)
            finally:
                if receiver:
                    receiver.stop()
            _check(key, code == 0 and summary.get("delivered") == 1
                   and (stream.target / "big.dat").exists(),
                   f"exit {code}; see {stream.root / 'send.log'}")
            rows[key].append((wall, cpu))
            fresh_dir(stream.target)
    base = median([w for w, _ in rows["rsync"]])
    labels = {"rsync": "rsync -a (baseline)",
              "mstm": "mstm-send --once (sha256 both ends)",
              "mstm-am": "mstm-send --once + mstm-receive"}
    trows: list[tuple[Any, ...]] = []
    res: dict[str, Any] = {}
    for key, label in labels.items():
        runs = rows[key]
        if not runs:
            trows.append((label, None, None, None, None,
                          f"not run: mstm-receive unavailable ({rx_why})"))
            continue
        wall = median([w for w, _ in runs])
        cpu = median([c for _, c in runs])
        res[key] = {"wall": wall, "cpu": cpu, "mib_s": size / MiB / wall}
        trows.append((label, wall, size / MiB / wall, cpu, base / wall,
                      " ".join(f"{w:.2f}" for w, _ in runs)))
    out(table(["", "wall s", "MiB/s", "client CPU s", "throughput x rsync", "runs"], trows))
    # what the verification alone costs here: sha256 of the file, once
    t0 = time.perf_counter()
    subprocess.run(["sha256sum", str(master / "big.dat")], capture_output=True, check=True)
    sha = time.perf_counter() - t0
    out(f"  (for scale: one sha256sum of the file takes {sha:.2f} s here, "
        f"{size / MiB / sha:.0f} MiB/s)")
    b.results["large"] = {**res, "sha256sum_s": sha, "size_mib": size // MiB}
    for key, what in (("mstm", "2. large file throughput"),
                      ("mstm-am", "2. large file throughput, arrival monitor")):
        if key in res:
            ratio = base / res[key]["wall"]
            b.target(what, ">= 0.9x rsync", f"{ratio:.2f}x", ratio >= 0.9)
        else:
            b.target(what, ">= 0.9x rsync", "not measured", None)
    wipe(b.root / "w2")


# ============================================================================ 3. latency
class ArrivalWatch:
    """First-seen time (monotonic) of each name published in one target directory."""

    def __init__(self, directory: Path) -> None:
        self.ino = INotify()
        self.ino.add_watch(str(directory), inf.MOVED_TO | inf.CREATE | inf.CLOSE_WRITE)
        self.seen: dict[str, float] = {}
        self._stop = threading.Event()
        self._t = threading.Thread(target=self._loop, daemon=True)
        self._t.start()

    def _loop(self) -> None:
        while not self._stop.is_set():
            for ev in self.ino.read(timeout=100):
                now = time.monotonic()
                if ev.name and not ev.name.startswith(".") and not ev.mask & inf.ISDIR:
                    self.seen.setdefault(ev.name, now)

    def close(self) -> None:
        self._stop.set()
        self._t.join(timeout=2)
        self.ino.close()


def _latency_run(b: Bench, stream: Any, rx: Receiver | None, rate: float, seconds: float,
                 profile: str | None = None) -> dict[str, Any]:
    n = int(rate * seconds)
    staging = fresh_dir(stream.root / "staging")  # same filesystem, outside the source
    log = stream.root / "follow.log"
    watch = ArrivalWatch(stream.target)
    if rx:
        rx.start(profile=f"{profile}-mstm-receive" if profile else None)
    argv = stream.command("mstm-send", "--follow")
    if profile and b.profiler.enabled:
        argv = b.profiler.wrap(f"{profile}-mstm-send", argv)
    with open(log, "ab") as err:
        proc = b.procs.start(argv, stdout=subprocess.DEVNULL, stderr=err)
    renamed: dict[str, float] = {}
    try:
        if not wait_for(lambda: "following" in log.read_text(errors="replace"), 30):
            raise RuntimeError(f"mstm-send --follow did not start; see {log}")
        time.sleep(0.5)
        payload = os.urandom(4096)
        t0 = time.monotonic()
        for i in range(n):
            due = t0 + i / rate
            delay = due - time.monotonic()
            if delay > 0:
                time.sleep(delay)
            name = f"lat-{i:05d}.dat"
            tmp = staging / name
            with open(tmp, "wb") as f:
                f.write(payload)
            os.rename(tmp, stream.source / name)
            renamed[name] = time.monotonic()
        wait_for(lambda: len(watch.seen) >= n, 60, interval=0.1)
    finally:
        b.procs.stop(proc)
        if rx:
            rx.stop()
        watch.close()
    lat = [watch.seen[k] - t for k, t in renamed.items() if k in watch.seen]
    # deliveries come in batches: arrivals closer than 50 ms belong to one publication burst
    seen = sorted(watch.seen[k] for k in renamed if k in watch.seen)
    bursts = sum(1 for a, b_ in zip([-1.0, *seen], seen, strict=False) if b_ - a > 0.05)
    span = (seen[-1] - seen[0]) if len(seen) > 1 else 0.0
    return {"n": n, "bursts": bursts, "cycle": span / max(1, bursts - 1),
            "arrived": len(lat), "p50": percentile(lat, 50), "p95": percentile(lat, 95),
            "p99": percentile(lat, 99), "max": max(lat) if lat else float("nan"),
            "min": min(lat) if lat else float("nan")}


def latency(b: Bench, rx_ok: bool, rx_why: str) -> None:
    rate, seconds = 10.0, (20.0 if b.full else 10.0)
    out(f"\n== 3. latency: mstm-send --follow, files dropped atomically at {rate:.0f}/s for "
        f"{seconds:.0f} s (rename into the source -> first seen under its final name at the "
        f"target; settle_seconds = 0; load {loadavg()})")
    settings = {"data_stream": {"settle_seconds": "0"}}
    rows = []
    res: dict[str, Any] = {}
    am = b.stream("w3/am", "latam", outgoing=am_settings(), **settings)
    if rx_ok:
        rx = Receiver(b, b.root / "w3" / "rx", am.target)
        res["am"] = r = _latency_run(b, am, rx, rate, seconds)
        rows.append(("with arrival monitor (published by mstm-receive)", r["n"], r["arrived"],
                     r["min"], r["p50"], r["p95"], r["p99"], r["max"], r["bursts"], r["cycle"]))
    else:
        rows.append((f"with arrival monitor: not run ({rx_why})",) + (None,) * 9)
    plain = b.stream("w3/plain", "lat", **settings)
    res["plain"] = r = _latency_run(b, plain, None, rate, seconds)
    rows.append(("no arrival monitor (rsync's rename; verified after)", r["n"], r["arrived"],
                 r["min"], r["p50"], r["p95"], r["p99"], r["max"], r["bursts"], r["cycle"]))
    out(table(["", "files", "arrived", "min s", "p50 s", "p95 s", "p99 s", "max s", "batches",
               "s/batch"], rows))
    out("  (batches: bursts of publications at the target; s/batch: mean time between them, "
        "i.e. the sender's cycle while files keep coming)")
    b.results["latency"] = res
    if b.profiler.enabled and rx_ok:
        wipe(am.spool)
        fresh_dir(am.target)
        _latency_run(b, am, Receiver(b, b.root / "w3" / "rx", am.target), rate, seconds,
                     profile="w3")
    if "am" in res:
        r = res["am"]
        ok = r["arrived"] == r["n"]
        b.target("3. latency p50 (arrival monitor)", "< 0.5 s", f"{r['p50']:.3f} s",
                 ok and r["p50"] < 0.5)
        b.target("3. latency p99 (arrival monitor)", "< 2 s", f"{r['p99']:.3f} s",
                 ok and r["p99"] < 2)
    else:
        r = res["plain"]
        b.target("3. latency p50 (arrival monitor)", "< 0.5 s",
                 f"not measured; without it {r['p50']:.3f} s", None)
        b.target("3. latency p99 (arrival monitor)", "< 2 s",
                 f"not measured; without it {r['p99']:.3f} s", None)
    wipe(b.root / "w3")


# ============================================================================ 4. scale
class DoneWatch:
    """Times (monotonic) at which records arrive in a spool's done/ directory."""

    def __init__(self, done: Path) -> None:
        done.mkdir(parents=True, exist_ok=True)
        self.ino = INotify()
        self.ino.add_watch(str(done), inf.MOVED_TO | inf.CREATE)
        self.times: list[float] = []
        self._stop = threading.Event()
        self._t = threading.Thread(target=self._loop, daemon=True)
        self._t.start()

    def _loop(self) -> None:
        while not self._stop.is_set():
            evs = self.ino.read(timeout=50)
            now = time.monotonic()
            self.times.extend(now for e in evs if e.mask & (inf.MOVED_TO | inf.CREATE))

    def close(self) -> None:
        self._stop.set()
        self._t.join(timeout=2)
        self.ino.close()


def _make_tree(root: Path, n: int, per_dir: int = 1000) -> float:
    """n empty files (no data blocks: the items cost inodes only), per_dir to a directory."""
    t0 = time.perf_counter()
    for d in range((n + per_dir - 1) // per_dir):
        sub = root / f"d{d:04d}"
        sub.mkdir(parents=True)
        base = os.fsencode(sub)
        for i in range(min(per_dir, n - d * per_dir)):
            os.close(os.open(base + b"/f%04d" % i, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644))
    return time.perf_counter() - t0


def _deliver_some(b: Bench, stream: Any, k: int, profile: str | None = None
                  ) -> dict[str, Any]:
    """Start mstm-send --once --no-scan, stop it once k records reached done/."""
    watch = DoneWatch(stream.spool / "done")
    argv = stream.command("mstm-send", "--once", "--no-scan")
    if profile and b.profiler.enabled:
        argv = b.profiler.wrap(profile, argv)
    t0 = time.monotonic()
    with open(stream.root / "send.log", "ab") as err:
        p = b.procs.start(argv, stdout=subprocess.DEVNULL, stderr=err)
    target_pid = p.pid
    if profile and b.profiler.enabled:  # sample the python under py-spy, not py-spy
        time.sleep(0.3)
        with_children = psutil.Process(p.pid).children()
        target_pid = with_children[0].pid if with_children else p.pid
    rss = RssSampler(target_pid).start()
    try:
        wait_for(lambda: len(watch.times) >= k or p.poll() is not None, 1800, interval=0.05)
    finally:
        rss.stop()
        b.procs.stop(p, timeout=120)
        watch.close()
    times = watch.times
    res: dict[str, Any] = {"delivered": len(times), "peak_rss": rss.peak}
    if len(times) >= 1000:
        res["first_1000"] = times[999] - t0
    if len(times) >= k and k > 1000:
        res["per_1000_after"] = (times[k - 1] - times[999]) / ((k - 1000) / 1000)
    return res


def scale(b: Bench) -> None:
    sizes = [10_000, 100_000] + ([1_000_000] if b.full else [])
    k = 3000
    out(f"\n== 4. scale: N empty files in directories of 1,000; mstm-scan --once vs find; "
        f"sender with N queued (batch_max_items = 1000; load {loadavg()})")
    stream_settings = {"outgoing": {"batch_max_items": "1000"}}
    rows: list[tuple[Any, ...]] = []
    res: dict[int, Any] = {}
    # the reference: 1,000 queued
    small = b.stream("w4/n1000", "scale1000", **stream_settings)
    _make_tree(small.source, 1000)
    timed(b.procs, small.command("mstm-scan", "--once"))
    shallow = _deliver_some(b, small, 1000)
    res[1000] = {"deliver": shallow}
    wipe(b.root / "w4" / "n1000")
    for n in sizes:
        s = b.stream(f"w4/n{n}", f"scale{n}", **stream_settings)
        gen = _make_tree(s.source, n)
        find = timed(b.procs, ["find", str(s.source), "-type", "f"])
        prof = f"w4-mstm-scan-{n}" if n == sizes[-1] else None
        scan_argv = s.command("mstm-scan", "--once")
        scan = timed(b.procs, scan_argv, stderr_to=s.root / "scan.log", sample_rss=True)
        queued = len(os.listdir(s.spool / "new"))
        _check(f"mstm-scan {n}", scan.code == 0 and queued == n,
               f"exit {scan.code}, {queued} queued; see {s.root / 'scan.log'}")
        d = _deliver_some(b, s, k)
        res[n] = {"gen": gen, "find": find.wall, "scan": scan.wall, "scan_cpu": scan.cpu,
                  "scan_rss": scan.peak_rss, "queued": queued, "deliver": d}
        rows.append((f"{n:,}", find.wall, scan.wall, scan.wall / find.wall,
                     1e6 * scan.wall / n, scan.peak_rss / 2**20, d["peak_rss"] / 2**20,
                     d.get("first_1000"), d.get("per_1000_after"),
                     shallow.get("first_1000", float("nan")) / d.get("first_1000", float("nan"))))
        out(f"  N = {n:,}: generated in {gen:.1f} s, scanned in {scan.wall:.1f} s, "
            f"{d['delivered']:,} delivered (load {loadavg()})")
        if prof and b.profiler.enabled:
            # profile a second enqueue of the same tree (fresh spool) and the first batches
            wipe(s.spool)
            timed(b.procs, b.profiler.wrap(prof, scan_argv), stderr_to=s.root / "scan.log")
            _deliver_some(b, s, 2000, profile=f"w4-mstm-send-{n}")
        wipe(b.root / "w4" / f"n{n}")
    out(table(["N", "find s", "scan s", "scan x find", "scan us/item", "scan RSS MiB",
               "send RSS MiB", "send 1st 1k s", "send s/1k after", "rate vs 1k queued"], rows))
    out(f"  reference, 1,000 queued: first 1,000 delivered {shallow.get('first_1000', 0):.2f} s "
        f"after start, sender peak RSS {shallow['peak_rss'] / 2**20:.0f} MiB")
    out("  (send 1st 1k: from spawn to the 1,000th record in done/, start-up included, as in "
        "the 1,000-queued reference; s/1k after: steady-state seconds per batch of 1,000;\n"
        "   rate vs 1k queued: the reference's 1st-1k time over this N's)")
    b.results["scale"] = res
    # linearity: per-item scan cost at the largest N vs the smallest
    small_n, big_n = sizes[0], sizes[-1]
    per_small = res[small_n]["scan"] / small_n
    per_big = res[big_n]["scan"] / big_n
    b.target("4. scan cost grows linearly", f"us/item at {big_n:,} <= 1.5x at {small_n:,}",
             f"{1e6 * per_big:.0f} vs {1e6 * per_small:.0f} us/item", per_big <= 1.5 * per_small)
    rss_big = res[big_n]["deliver"]["peak_rss"] / 2**20
    rss_small = res[small_n]["deliver"]["peak_rss"] / 2**20
    if big_n >= 1_000_000:
        b.target("4. sender peak RSS, 1,000,000 queued", "< 200 MB", f"{rss_big:.0f} MiB",
                 rss_big * 1.048576 < 200)
    else:
        slope = (rss_big - rss_small) / (big_n - small_n)
        est = rss_big + slope * (1_000_000 - big_n)
        b.target("4. sender peak RSS, 1,000,000 queued", "< 200 MB",
                 f"{rss_big:.0f} MiB at {big_n:,}; ~{est:.0f} MiB extrapolated (run --full)",
                 est * 1.048576 < 200)
    d = res[big_n]["deliver"]
    if "first_1000" in d and "first_1000" in shallow:
        ratio = shallow["first_1000"] / d["first_1000"]
        b.target(f"4. throughput, {big_n:,} vs 1,000 queued", ">= 0.8x", f"{ratio:.2f}x",
                 ratio >= 0.8)
    # the same question in steady state (start-up and the first listing of new/ left out):
    # seconds per batch of 1,000 with big_n queued vs with small_n queued
    ref = res[small_n]["deliver"].get("per_1000_after")
    if ref and d.get("per_1000_after"):
        ratio = ref / d["per_1000_after"]
        b.target(f"4. throughput, steady state, {big_n:,} vs {small_n:,} queued", ">= 0.8x",
                 f"{ratio:.2f}x", ratio >= 0.8)
    wipe(b.root / "w4")


# ============================================================================ 5. idle cost
def idle(b: Bench) -> None:
    nstreams, seconds = 20, (60.0 if b.full else 20.0)
    out(f"\n== 5. idle cost: {nstreams} streams in mstm-send --follow with nothing to do for "
        f"{seconds:.0f} s (default poll intervals; load {loadavg()})")
    root = fresh_dir(b.root / "w5")
    etc = root / "etc"
    etc.mkdir()
    (root / "spool").mkdir()
    names = [f"idle{i:02d}" for i in range(nstreams)]
    (etc / "global.ini").write_text(
        f"[global]\ndata_stream_list = {', '.join(names)}\n"
        f"spool_base_dir = {root / 'spool'}\nruntime_dir = {root / 'run'}\n")
    for name in names:
        (root / name / "source").mkdir(parents=True)
        (root / name / "target").mkdir(parents=True)
        (etc / f"{name}.ini").write_text(
            f"[data_stream]\ndirectory = {root / name / 'source'}\n"
            f"[outgoing]\ntarget_host = 127.0.0.1\ntarget_port = {b.sshd.port}\n"
            f"target_dir = {root / name / 'target'}\ntransfer_mode = move\n"
            f"[rsync_ssh]\nidentity_file = {b.sshd.client_key}\n"
            f"known_hosts = {b.sshd.known_hosts}\n")
    procs = []
    logs = []
    nproc = 0
    for name in names:
        log = root / name / "follow.log"
        logs.append(log)
        with open(log, "ab") as err:
            procs.append(b.procs.start([str(BIN / "mstm-send"), "--config",
                                        str(etc / "global.ini"), "--follow", name],
                                       stdout=subprocess.DEVNULL, stderr=err))
    try:
        ok = wait_for(lambda: all("following" in log.read_text(errors="replace")
                                  for log in logs), 120, interval=0.2)
        if not ok:
            bad = [(n, p.poll(), log.read_text(errors="replace").strip().splitlines()[-1:])
                   for n, p, log in zip(names, procs, logs, strict=True)
                   if "following" not in log.read_text(errors="replace")]
            out(f"  !! {len(bad)} sender(s) did not start, e.g. {bad[0]}")
        time.sleep(3)  # let start-up finish everywhere

        def snapshot() -> tuple[float, int, int, int]:
            cpu = 0.0
            rss = ctx = nproc = 0
            for p in procs:
                try:
                    pp = psutil.Process(p.pid)
                    for q in [pp, *pp.children(recursive=True)]:
                        t = q.cpu_times()
                        cpu += t.user + t.system
                        rss += q.memory_info().rss
                        ctx += _voluntary_switches(q.pid)
                        nproc += 1
                except psutil.Error:
                    pass
            return cpu, rss, ctx, nproc

        c0, _, x0, _ = snapshot()
        t0 = time.monotonic()
        time.sleep(seconds)
        c1, rss, x1, nproc = snapshot()
        dt = time.monotonic() - t0
    finally:
        for p in procs:
            b.procs.stop(p)
    cpu = c1 - c0
    pct = 100 * cpu / dt
    out(table(["", "processes", "CPU s", "% of one core", "wake-ups/s", "RSS total MiB",
               "RSS per stream MiB"],
              [(f"{nstreams} x mstm-send --follow", nproc, f"{cpu:.3f}", f"{pct:.3f}",
                f"{(x1 - x0) / dt:.2f}",
                rss / 2**20, rss / 2**20 / nstreams)]))
    out("  (wake-ups: voluntary context switches of all those processes per second)")
    b.results["idle"] = {"cpu_s": cpu, "pct": pct, "rss_mib": rss / 2**20, "seconds": dt,
                         "wakeups_s": (x1 - x0) / dt}
    b.target("5. idle cost of 20 streams", "< 1% of one core", f"{pct:.3f}%",
             pct < 1.0 if nproc >= nstreams else None)
    wipe(root)


def _voluntary_switches(pid: int) -> int:
    """Voluntary context switches of every thread of a process (wake-ups, roughly)."""
    n = 0
    try:
        tasks = os.listdir(f"/proc/{pid}/task")
    except OSError:
        return 0
    for t in tasks:
        try:
            with open(f"/proc/{pid}/task/{t}/status", "rb") as f:
                for line in f:
                    if line.startswith(b"voluntary_ctxt_switches:"):
                        n += int(line.split()[1])
        except (OSError, ValueError):
            continue
    return n


def print_profiles(b: Bench) -> None:
    if not b.profiler.files:
        return
    out("\n== profiles (py-spy, separate runs, not the timed ones)")
    for name, path in b.profiler.files:
        out(f"\n-- {name}  ({path})")
        out(summarise_profile(path))
