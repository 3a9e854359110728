"""`make bench`: mstm against plain rsync on one loopback sshd, five workloads (issue 8).

    make bench                                  # default sizes, a few minutes on 2 cores
    make bench BENCH_ARGS=--full                # the issue's full sizes (2 GiB, 1M files, 60 s)
    make bench BENCH_ARGS="--only 1,4 --profile /tmp/prof"   # py-spy profiles as well

Everything lives in one temporary directory, removed at the end; every process started
is stopped, whatever happens.  No timed assertion runs in `make test`: this is the place.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench import workloads
from bench.lib import CHILD_ENV, bench_env, loadavg, machine, out, receiver_available, table

TOP = Path(__file__).resolve().parent.parent


@contextlib.contextmanager
def code_of(rev: str | None) -> Iterator[str]:
    """Run every mstm command of the block from *rev*'s cmds/ (git archive into a
    temporary directory, first on PYTHONPATH); None: this tree's.  The label to print."""
    if rev is None:
        yield "this tree"
        return
    with tempfile.TemporaryDirectory(prefix="mstm-bench-before-") as tmp:
        archive = subprocess.run(["git", "-C", str(TOP), "archive", rev, "cmds"],
                                 capture_output=True, check=True).stdout
        subprocess.run(["tar", "-x", "-C", tmp], input=archive, check=True)
        saved = CHILD_ENV.get("PYTHONPATH")
        CHILD_ENV["PYTHONPATH"] = os.pathsep.join(filter(None, [f"{tmp}/cmds", saved]))
        try:
            yield rev
        finally:
            if saved is None:
                CHILD_ENV.pop("PYTHONPATH", None)
            else:
                CHILD_ENV["PYTHONPATH"] = saved


def compare(before: dict[str, dict[str, Any]], after: dict[str, dict[str, Any]], rev: str) -> None:
    """The cost of what changed since *rev*: the same workloads, old code and new."""
    rows = []
    for load, key, what in (("small", "mstm", "small files, no arrival monitor: wall s"),
                            ("small", "mstm-am", "small files, arrival monitor: wall s"),
                            ("small", "mstm", "small files, no arrival monitor: CPU s"),
                            ("large", "mstm", "large file: MiB/s"),
                            ("large", "mstm-am", "large file, arrival monitor: MiB/s")):
        field = "mib_s" if "MiB/s" in what else ("cpu" if "CPU" in what else "wall")
        old = before.get(load, {}).get(key, {}).get(field)
        new = after.get(load, {}).get(key, {}).get(field)
        base_old = before.get(load, {}).get("rsync", {}).get(field)
        base_new = after.get(load, {}).get("rsync", {}).get(field)
        ratio = (new / old) if old and new else None
        rows.append((what, old, new, ratio,
                     f"{old / base_old:.2f}x -> {new / base_new:.2f}x rsync"
                     if old and new and base_old and base_new else ""))
    out(f"\n== before ({rev}) and after (this tree), same machine, same run")
    out(table(["", "before", "after", "after/before", "against rsync"], rows))


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--full", action="store_true",
                    help="full sizes: 2 GiB file, latency for 20 s, 1M files, idle for 60 s")
    ap.add_argument("--only", default="1,2,3,4,5", help="workloads to run, e.g. 1,4")
    ap.add_argument("--repeat", type=int, default=None,
                    help="runs of workloads 1 and 2 per tool, median reported "
                         "(default 2, with --full 3)")
    ap.add_argument("--profile", type=Path, metavar="DIR",
                    help="also profile mstm in workloads 1 and 4 with py-spy into DIR")
    ap.add_argument("--keep", action="store_true", help="keep the temporary directory")
    ap.add_argument("--before", metavar="REV",
                    help="also run the workloads with the mstm of git revision REV, and "
                         "print old against new (the cost of a change)")
    args = ap.parse_args()
    only = {int(x) for x in args.only.split(",") if x.strip()}

    t_start = time.monotonic()
    out("mstm benchmarks (issue 8)" + (" --full" if args.full else " (default sizes)"))
    out(table(["machine", ""], machine()))
    out("note: figures are wall-clock on a shared machine; the load average is printed with "
        "each workload.")
    repeat = args.repeat if args.repeat is not None else (3 if args.full else 2)
    passes = [args.before, None] if args.before else [None]
    results: list[dict[str, dict[str, Any]]] = []
    for rev in passes:
        with code_of(rev) as label:
            if args.before:
                out(f"\n######## mstm of {label}")
            results.append(run_workloads(args, only, repeat))
    if args.before:
        compare(results[0], results[1], args.before)
    out(f"\ntotal {time.monotonic() - t_start:.0f} s; load average at the end {loadavg()}")
    return 0


def run_workloads(args: argparse.Namespace, only: set[int], repeat: int
                  ) -> dict[str, dict[str, Any]]:
    with bench_env(full=args.full, repeat=max(1, repeat), profile_dir=args.profile,
                   keep=args.keep) as b:
        if args.profile and not b.profiler.enabled:
            out("!! --profile: py-spy not found (pip install py-spy into the venv); "
                "profiles skipped")
        rx_ok, rx_why = (receiver_available(b) if only & {1, 2, 3} else (False, "not probed"))
        out(f"mstm-receive --follow: {'available' if rx_ok else 'NOT available: ' + rx_why}")
        steps = {1: lambda: workloads.small_files(b, rx_ok, rx_why),
                 2: lambda: workloads.large_file(b, rx_ok, rx_why),
                 3: lambda: workloads.latency(b, rx_ok, rx_why),
                 4: lambda: workloads.scale(b),
                 5: lambda: workloads.idle(b)}
        for k in sorted(only):
            t0 = time.monotonic()
            steps[k]()
            out(f"  ({time.monotonic() - t0:.0f} s; load average now {loadavg()})")
        workloads.print_profiles(b)
        out("\n== summary")
        out(table(["target", "goal", "measured", "verdict"], b.targets))
        return dict(b.results)


if __name__ == "__main__":
    sys.exit(main())
