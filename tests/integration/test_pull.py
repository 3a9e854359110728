"""Pull streams (HPC ASSyncy's mxsync) against a real sshd on loopback with real rsync.

The "remote" host is the loopback sshd; its items live in a temporary directory.  Each
test reads as the promise it checks; ASSyncy's defects (shared/reference/origins.md)
are named where a test is the proof that ours does not have them.
"""

from __future__ import annotations

import hashlib
import json
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import psutil
import pytest
from tests.conftest import need
from tests.harness.sshd import SSHD, LoopbackSshd, free_port
from tests.harness.streams import StreamEnv

from mstm.pull import parse_listing
from mstm.pull.ledger import DONE, UNMAPPED, Entry, Ledger

pytestmark = pytest.mark.integration

# An rsync that records each run (item from stdin, dry run or not, start and end) and
# then runs the real one; it sleeps before a real transfer while <log>.slow says so.
WRAPPER = """#!{python}
import ctypes, json, os, signal, subprocess, sys, time
log = {log!r}
names = sys.stdin.buffer.read()
dry = "--dry-run" in sys.argv
start = time.time()
try:
    delay = float(open(log + ".slow").read())
except OSError:
    delay = 0.0
if delay and not dry:
    time.sleep(delay)
die = lambda: ctypes.CDLL(None).prctl(1, signal.SIGKILL)  # dies with this wrapper
p = subprocess.run(["rsync", *sys.argv[1:]], input=names, preexec_fn=die)
with open(log, "a") as f:
    f.write(json.dumps({{"item": os.fsdecode(names.rstrip(b"\\0")), "dry": dry,
                        "start": start, "end": time.time(), "code": p.returncode}}) + "\\n")
sys.exit(p.returncode)
"""


def sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def tree(root: Path) -> dict[str, str]:
    """relpath -> sha256 of every regular file below *root* (symlinks as their target)."""
    out: dict[str, str] = {}
    for dirpath, _dirs, names in os.walk(root):
        for n in names:
            p = Path(dirpath) / n
            rel = str(p.relative_to(root))
            out[rel] = "->" + os.readlink(p) if p.is_symlink() else sha(p)
    return out


@dataclass
class PullRig:
    env: StreamEnv
    remote: Path
    elsewhere: Path  # an absolute map destination outside the destination root

    @property
    def dest(self) -> Path:
        return self.env.target

    @property
    def ledger_path(self) -> Path:
        return self.env.spool / "ledger.jsonl"

    @property
    def log(self) -> Path:
        return self.env.root / "rsync-runs.log"

    def configure(self, **sections: dict[str, str]) -> None:
        self.env.configure(**sections)

    def make_item(self, name: str | bytes, files: int = 3) -> Path:
        d = Path(os.fsdecode(os.path.join(os.fsencode(self.remote), os.fsencode(name))))
        (d / "sub").mkdir(parents=True)
        for f in range(files):
            where = d / "sub" if f % 2 else d
            (where / f"frame_{f:04d}.img").write_bytes(os.urandom(512 + f * 100))
        return d

    def make_items(self, count: int) -> list[str]:
        names = [f"{10000 + i}{'abcde'[i % 5]}" for i in range(count)]
        for n in names:
            self.make_item(n)
        return names

    def folder(self, name: str) -> Path:
        number = int(name[:5])
        if number < 10020:
            return self.dest / "ny79"
        if number < 10040:
            return self.dest / "ab12"
        return self.elsewhere

    def run(self, *args: str, timeout: float = 120) -> subprocess.CompletedProcess[str]:
        return self.env.run("mstm-send", *args, timeout=timeout)

    def run_json(self, *args: str) -> dict[str, Any]:
        r = self.run("--once", "--json", *args)
        assert r.returncode in (0, 1), r.stderr
        result: dict[str, Any] = json.loads(r.stdout)
        return result

    def ledger(self) -> dict[str, Entry]:
        return Ledger(self.ledger_path).read()

    def remote_signatures(self) -> dict[str, str]:
        out = subprocess.run(["find", f"{self.remote}/", "-mindepth", "1", "-printf",
                              "%P\\0%y\\0%T@\\0%s\\0"], capture_output=True, check=True).stdout
        return {i.name: i.signature for i in parse_listing(out)}

    def wrap_rsync(self, slow: float = 0.0) -> None:
        wrapper = self.env.root / "rsync-wrapper"
        wrapper.write_text(WRAPPER.format(python=sys.executable, log=str(self.log)))
        wrapper.chmod(0o755)
        self.slow(slow)
        self.configure(rsync_ssh={"cmd": str(wrapper)})

    def slow(self, seconds: float) -> None:
        Path(f"{self.log}.slow").write_text(str(seconds))

    def runs(self) -> list[dict[str, Any]]:
        if not self.log.exists():
            return []
        return [json.loads(ln) for ln in self.log.read_text().splitlines()]


def own_sshd(root: Path) -> LoopbackSshd:
    """A loopback sshd whose sessions have a HOME of their own: the machine's dotfiles
    take no part (a login shell's .bashrc may run anything, e.g. pyenv's rehash, which
    serialises every session behind one lock file and leaves it stale when a session is
    killed, as the kill -9 test does)."""
    return LoopbackSshd(root=root).start()  # LoopbackSshd gives sessions their own HOME


@pytest.fixture(scope="module")
def pull_sshd(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LoopbackSshd]:
    need(SSHD)
    need("rsync")
    server = own_sshd(tmp_path_factory.mktemp("pull-sshd"))
    yield server
    server.cleanup()


@pytest.fixture
def rig(tmp_path: Path, pull_sshd: LoopbackSshd) -> PullRig:
    return make_rig(tmp_path, pull_sshd)


def make_rig(tmp_path: Path, sshd: LoopbackSshd) -> PullRig:
    remote, elsewhere = tmp_path / "remote", tmp_path / "elsewhere"
    remote.mkdir()
    env = StreamEnv.create(tmp_path, sshd)
    env.configure(
        data_stream={"directory": str(env.target), "direction": "pull"},
        outgoing={"transfer_mode": "mirror", "stall_seconds": "20"},
        pull={"source_dir": str(remote), "max_tasks": "4",
              "map": ("\n    ^100[01][0-9][a-z]$ -> ny79"
                      "\n    ^100[23][0-9][a-z]$ -> ab12"
                      f"\n    ^1004 -> {elsewhere}")})
    return PullRig(env, remote, elsewhere)


def assert_fetched(rig: PullRig, names: list[str]) -> None:
    for n in names:
        assert tree(rig.folder(n) / n) == tree(rig.remote / n), n


def no_process_within(seconds: float, *, naming: str) -> bool:
    """True once no process has *naming* in its command line (waiting up to *seconds*)."""
    deadline = time.monotonic() + seconds
    while True:
        found = [p.info["cmdline"] for p in psutil.process_iter(["cmdline"])
                 if naming in " ".join(p.info["cmdline"] or [])]
        if not found:
            return True
        if time.monotonic() > deadline:
            print("still running:", found)
            return False
        time.sleep(0.1)


def max_overlap(intervals: list[tuple[float, float]]) -> int:
    edges = sorted([(s, 1) for s, _ in intervals] + [(e, -1) for _, e in intervals])
    best = now = 0
    for _t, step in edges:
        now += step
        best = max(best, now)
    return best


# --------------------------------------------------------------------------- the plan


def test_dry_run_plans_each_item_into_its_mapped_folder_and_changes_nothing(
        rig: PullRig) -> None:
    names = rig.make_items(50)
    remote_before = tree(rig.remote)

    plan = rig.run_json()  # no --execute: like mxsync, the command line only shows
    text = rig.run("--once")

    assert plan["execute"] is False and plan["counts"]["fetch"] == 50
    assert {i["path"]: i["destination"] for i in plan["items"]} == {
        n: str(rig.folder(n) / n) for n in names}
    assert text.returncode == 0 and "10000a -> " + str(rig.dest / "ny79" / "10000a") in \
        text.stdout and "50 fetch" in text.stdout
    assert list(rig.dest.iterdir()) == [] and not rig.elsewhere.exists()
    assert not rig.env.spool.exists()  # no ledger, no lock, nothing
    assert tree(rig.remote) == remote_before


# --------------------------------------------------------------------------- fetching


def test_execute_fetches_fifty_items_four_at_a_time_never_one_item_twice_at_once(
        rig: PullRig) -> None:
    names = rig.make_items(50)
    rig.wrap_rsync(slow=0.2)

    result = rig.run_json("--execute")

    assert result["fetched"] == 50 and result["failed"] == 0, result
    assert_fetched(rig, names)
    ledger = rig.ledger()
    signatures = rig.remote_signatures()
    assert {n: (e.state, e.signature, e.destination) for n, e in ledger.items()} == {
        n: (DONE, signatures[n], str(rig.folder(n) / n)) for n in names}
    runs = rig.runs()
    transfers = [(r["start"], r["end"]) for r in runs if not r["dry"]]
    assert len(transfers) == 50 and len(runs) == 100  # one transfer, one checksum pass
    assert max_overlap([(r["start"], r["end"]) for r in runs]) == 4  # max_tasks
    for n in names:  # ASSyncy defect 3: never two rsyncs on one item at once
        assert max_overlap([(r["start"], r["end"]) for r in runs if r["item"] == n]) == 1
    assert all(r["code"] == 0 for r in runs)

    again = rig.run_json("--execute")

    assert again["fetched"] == 0 and again["counts"]["up_to_date"] == 50
    assert len(rig.runs()) == 100  # nothing was even looked at by rsync


def test_after_kill_9_mid_cycle_the_ledger_holds_only_verified_items_and_a_restart_completes(
        rig: PullRig) -> None:
    names = rig.make_items(50)
    rig.wrap_rsync(slow=0.3)
    proc = rig.env.popen("mstm-send", "--once", "--execute", stdout=subprocess.DEVNULL,
                         stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            if rig.ledger_path.exists() and len(rig.ledger()) >= 10:
                break
            time.sleep(0.05)
        os.kill(proc.pid, signal.SIGKILL)
    finally:
        proc.wait(10)

    ledger = rig.ledger()  # readable: the old file or the new one, never half of one
    signatures = rig.remote_signatures()
    assert 10 <= len(ledger) < 50
    for n, e in ledger.items():  # every entry is true: fetched whole, verified
        assert e.state == DONE and e.signature == signatures[n]
        assert tree(rig.folder(n) / n) == tree(rig.remote / n)
    assert no_process_within(5, naming=str(rig.env.root))  # nothing writes on alone

    rig.slow(0)
    result = rig.run_json("--execute")

    assert result["fetched"] == 50 - len(ledger) and result["failed"] == 0, result
    assert result["counts"]["up_to_date"] == len(ledger)
    assert_fetched(rig, names)
    assert set(rig.ledger()) == set(names)
    lines = [ln for ln in rig.ledger_path.read_text().splitlines() if ln.startswith("{")]
    assert len(lines) == 50  # one line per item, none twice
    assert not [p for p in rig.env.spool.iterdir() if ".tmp." in p.name]


def test_an_item_changed_remotely_after_it_was_done_is_fetched_again(rig: PullRig) -> None:
    names = rig.make_items(3)
    assert rig.run_json("--execute")["fetched"] == 3
    grown = rig.remote / names[0] / "sub" / "frame_9999.img"
    grown.write_bytes(b"late data")  # ASSyncy defect 1: never fetched
    rewritten = rig.remote / names[1] / "frame_0000.img"
    old = rewritten.read_bytes()
    rewritten.write_bytes(bytes(b ^ 0xFF for b in old))  # same size: defect 2
    os.utime(rewritten, (time.time() + 5, time.time() + 5))

    result = rig.run_json("--execute")

    by_path = {i["path"]: i for i in result["items"]}
    assert by_path[names[0]]["action"] == "refetch" and by_path[names[1]]["action"] == "refetch"
    assert by_path[names[2]]["action"] == "up_to_date"
    assert result["fetched"] == 2
    assert_fetched(rig, names)
    assert rig.ledger()[names[0]].signature == rig.remote_signatures()[names[0]]


def test_a_stop_file_in_the_destination_pauses_fetching_until_it_is_removed(
        rig: PullRig) -> None:
    """mstm-diskwatch pauses a stream with a stop file in its directory; for a pull
    stream that is the local destination, the disk that fills."""
    names = rig.make_items(3)
    stop = rig.dest / ".stop"
    stop.write_text("local disk low (mstm-diskwatch)\n")

    paused = rig.run_json("--execute")

    assert paused["fetched"] == 0 and "local disk low" in paused["paused"]
    assert rig.ledger() == {} or all(e.state != "done" for e in rig.ledger().values())
    stop.unlink()
    resumed = rig.run_json("--execute")
    assert resumed["fetched"] == 3 and resumed["paused"] is None
    assert_fetched(rig, names)


def test_a_local_file_of_equal_size_and_time_but_other_bytes_is_corrected_by_checksum(
        rig: PullRig) -> None:
    (name,) = rig.make_items(1)
    src = rig.remote / name / "frame_0000.img"
    stale = rig.folder(name) / name / "frame_0000.img"
    stale.parent.mkdir(parents=True)
    stale.write_bytes(b"\0" * src.stat().st_size)
    os.utime(stale, ns=(src.stat().st_atime_ns, src.stat().st_mtime_ns))

    r = rig.run("--once", "--execute", "-v")

    assert r.returncode == 0, r.stderr
    assert "transferring again comparing checksums" in r.stderr
    assert stale.read_bytes() == src.read_bytes()
    assert rig.ledger()[name].state == DONE


def test_a_persons_ledger_edits_are_respected(rig: PullRig) -> None:
    names = rig.make_items(4)
    rig.run_json("--execute")
    text = rig.ledger_path.read_text()
    kept = "".join(ln for ln in text.splitlines(keepends=True) if names[0] not in ln)
    rig.ledger_path.write_text(kept + f"# ASSyncy's ignore.yml, pasted:\n- {names[3]}x\n")
    rig.make_item(f"{names[3]}x")  # marked done by hand before it ever appeared
    target = rig.folder(names[0]) / names[0]
    (target / "frame_0000.img").unlink()

    result = rig.run_json("--execute")

    by_path = {i["path"]: i for i in result["items"]}
    assert by_path[names[0]]["action"] == "fetch" and result["fetched"] == 1
    assert by_path[f"{names[3]}x"]["action"] == "up_to_date"
    assert (target / "frame_0000.img").exists()
    assert f"- {names[3]}x\n" in rig.ledger_path.read_text()


# --------------------------------------------------------------------------- reporting


def test_an_unmapped_item_is_reported_exactly_once_across_two_cycles(rig: PullRig) -> None:
    names = rig.make_items(2)
    rig.make_item("77777x")

    first = rig.run("--once", "--execute")
    second = rig.run("--once", "--execute")

    warning = "77777x is not fetched: no [pull] map rule matches"
    assert first.returncode == 0 and second.returncode == 0, first.stderr + second.stderr
    assert first.stderr.count(warning) == 1 and "warn" in first.stderr
    assert second.stderr.count("77777x") == 0  # ASSyncy defect 6: every day again
    assert rig.ledger()["77777x"].state == UNMAPPED
    assert_fetched(rig, names)
    status = json.loads(rig.run("--status").stdout)
    assert (status["done"], status["unmapped"]) == (2, 1)
    key = rig.env.sshd.client_key.read_text().split("\n")[1]
    for text in (first.stderr, second.stderr, rig.ledger_path.read_text()):
        assert key not in text  # ASSyncy defect 7: no secret in any output

    rig.configure(pull={"map": f"\n    ^7 -> late\n    ^100 -> {rig.dest}/ny79"})
    third = rig.run_json("--execute")
    assert third["fetched"] == 1 and (rig.dest / "late" / "77777x").is_dir()


HOSTILE = [b"-e touch PWNED", b"--rsh=touch PWNED", b"a*", b"abc", b"new\nline", b"...",
           b"..x", b".hidden", b"tab\there", b"bad-\xff", "ünï 日本".encode()]


def test_hostile_remote_names_never_escape_the_destination(rig: PullRig) -> None:
    rig.configure(pull={"map": "", "item_pattern": ".*"})
    for raw in HOSTILE:
        rig.make_item(raw, files=1)
    os.symlink("/etc", rig.remote / "etc-link")
    os.symlink("..", rig.remote / "up")
    (rig.remote / "-plain file").write_bytes(b"just a file")
    cwd = rig.env.root / "cwd"
    cwd.mkdir()
    outside_before = {p for p in rig.env.root.rglob("*") if rig.dest not in p.parents}

    r = subprocess.run(rig.env.command("mstm-send", "--once", "--execute", "--json"),
                       capture_output=True, text=True, cwd=cwd, timeout=120, check=False)

    assert r.returncode == 0, r.stderr
    fetched = {os.fsencode(p.name) for p in rig.dest.iterdir()}
    assert fetched == {b"-e touch PWNED", b"--rsh=touch PWNED", b"a*", b"abc",
                       "ünï 日本".encode(), b"-plain file"}
    for raw in fetched - {b"-plain file"}:
        name = os.fsdecode(raw)
        assert tree(rig.dest / name) == tree(rig.remote / name)  # a* got only its own
    assert (rig.dest / "-plain file").read_bytes() == b"just a file"
    refused = {i["path"] for i in json.loads(r.stdout)["items"] if i["action"] == "refused"}
    assert {"new\nline", "tab\there", "etc-link", "up", "...", "..x", ".hidden"} <= refused
    outside_after = {p for p in rig.env.root.rglob("*") if rig.dest not in p.parents}
    created = {p for p in outside_after - outside_before
               if rig.env.spool not in p.parents and p != rig.env.spool}
    assert {p for p in created if "run" not in p.parts} == set()
    assert not list(rig.env.root.rglob("PWNED")) and not (cwd / "PWNED").exists()
    assert r.stderr.count("is not fetched") == len(refused)


# --------------------------------------------------------------------------- failures


@pytest.fixture
def fresh_sshd(tmp_path: Path) -> Iterator[LoopbackSshd]:
    """An sshd of the test's own, for a test that stops one of its processes."""
    need(SSHD)
    server = own_sshd(tmp_path / "sshd")
    yield server
    server.cleanup()


def test_a_stalled_transfer_is_cut_by_the_stall_timeout_and_frees_its_slot(
        tmp_path: Path, fresh_sshd: LoopbackSshd) -> None:
    rig = make_rig(tmp_path, fresh_sshd)
    rig.configure(outgoing={"stall_seconds": "3"}, pull={"max_tasks": "1", "map": ""})
    big = rig.make_item("a-stalls") / "big.img"  # fetched first (max_tasks 1, name order)
    big.write_bytes(os.urandom(32 << 20))  # and long enough to be caught in the act
    rig.make_item("b-follows")
    stopped: list[psutil.Process] = []

    def stop_first_remote_rsync() -> None:
        assert fresh_sshd.proc is not None
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline and not stopped:
            for p in psutil.Process(fresh_sshd.proc.pid).children(recursive=True):
                try:
                    if p.name() == "rsync" and "--server" in p.cmdline():
                        p.suspend()  # SIGSTOP: the connection stays, no byte moves
                        stopped.append(p)
                        return
                except psutil.Error:
                    continue
            time.sleep(0.01)

    watcher = threading.Thread(target=stop_first_remote_rsync)
    watcher.start()
    t0 = time.monotonic()
    try:
        r = rig.run("--once", "--execute", "--json", timeout=60)
    finally:
        watcher.join()
        for p in stopped:
            try:
                p.kill()
            except psutil.Error:
                pass
    took = time.monotonic() - t0

    assert stopped, "no remote rsync was seen"
    assert r.returncode == 1, r.stderr  # ASSyncy defect 5: a hung task held its slot
    by_path = {i["path"]: i for i in json.loads(r.stdout)["items"]}
    assert by_path["a-stalls"]["result"] == "failed"
    assert "no progress for 3 s" in by_path["a-stalls"]["reason"]
    assert by_path["b-follows"]["result"] == "fetched"
    assert took < 15
    assert "a-stalls" not in rig.ledger()
    assert rig.run_json("--execute")["fetched"] == 1  # the next cycle fetches it


def test_an_unreachable_host_exits_75_and_changes_nothing(rig: PullRig) -> None:
    rig.make_items(2)
    rig.configure(outgoing={"target_port": str(free_port())})

    for args in (("--once",), ("--once", "--execute")):
        r = rig.run(*args)
        assert r.returncode == 75, r.stderr
        assert "ssh to 127.0.0.1" in r.stderr
    assert list(rig.dest.iterdir()) == [] and not rig.ledger_path.exists()


@pytest.fixture
def follower(rig: PullRig) -> Iterator[subprocess.Popen[bytes]]:
    rig.configure(data_stream={"poll_interval": "0.3"})
    proc = rig.env.popen("mstm-send", "--follow", stdout=subprocess.DEVNULL,
                         stderr=subprocess.PIPE)
    yield proc
    if proc.poll() is None:
        proc.kill()
        proc.wait()


def test_follow_fetches_new_items_every_cycle_and_stops_cleanly_on_sigterm(
        rig: PullRig, follower: subprocess.Popen[bytes]) -> None:
    names = rig.make_items(2)

    def ledger_has(wanted: set[str]) -> bool:
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            if rig.ledger_path.exists() and wanted <= set(rig.ledger()):
                return True
            time.sleep(0.1)
        return False

    assert ledger_has(set(names))  # --follow acts without --execute, like the service
    rig.make_item("10002c")
    assert ledger_has({"10002c"})
    follower.send_signal(signal.SIGTERM)
    assert follower.wait(15) == 0
    assert_fetched(rig, [*names, "10002c"])


def test_a_stop_file_put_during_a_fetch_stops_the_running_transfer(rig: PullRig) -> None:
    """A pull that fills the local disk must stop when mstm-diskwatch says so, not when
    its current (maybe huge) item is done."""
    names = rig.make_items(2)
    rig.wrap_rsync(slow=30)  # every transfer takes 30 s
    proc = rig.env.popen("mstm-send", "--once", "--execute", "--json",
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    time.sleep(1.5)
    (rig.dest / ".stop").write_text("local disk low (mstm-diskwatch)\n")
    out, err = proc.communicate(timeout=20)  # not 30 s: the transfers were cut
    result = json.loads(out)
    assert result["fetched"] == 0 and "local disk low" in result["paused"], err
    assert {i["result"] for i in result["items"]} == {"stopped"}
    (rig.dest / ".stop").unlink()
    rig.slow(0)
    assert rig.run_json("--execute")["fetched"] == 2
    assert_fetched(rig, names)


def test_mstm_scan_refuses_a_pull_stream_with_a_usage_error(rig: PullRig) -> None:
    r = rig.env.run("mstm-scan", "--once")
    assert r.returncode == 2
    assert "is a pull stream" in r.stderr and "Traceback" not in r.stderr
    assert not (rig.env.spool / "new").exists() or os.listdir(rig.env.spool / "new") == []


def test_a_mapped_folder_swapped_for_a_link_out_of_the_stream_is_never_written_through(
        rig: PullRig, tmp_path: Path) -> None:
    """Issue 12, class 1: whoever can write the destination plants ny79 -> elsewhere; the
    fetch refuses the folder instead of writing outside the stream's directory."""
    rig.make_item("10001a")
    rig.make_item("10021a")
    outside = tmp_path / "outside"
    outside.mkdir()
    rig.dest.mkdir(parents=True, exist_ok=True)
    (rig.dest / "ny79").symlink_to(outside)

    result = rig.run_json("--execute")

    assert list(outside.iterdir()) == []  # nothing written through the planted link
    assert tree(rig.folder("10021a") / "10021a") == tree(rig.remote / "10021a")
    assert result["failed"] == 1, result
    assert "10001a" not in rig.ledger() or rig.ledger()["10001a"].state != DONE


def test_setuid_setgid_and_sticky_bits_never_survive_a_pull(rig: PullRig) -> None:
    item = rig.make_item("10002a")
    (item / "frame_0000.img").chmod(0o4755)
    (item / "sub").chmod(0o3777)
    (item / "tool").write_bytes(b"#!/bin/sh\n")
    (item / "tool").chmod(0o2755)

    rig.run_json("--execute")

    got = rig.folder("10002a") / "10002a"
    assert (got / "frame_0000.img").stat().st_mode & 0o7777 == 0o755
    assert (got / "tool").stat().st_mode & 0o7777 == 0o755
    assert (got / "sub").stat().st_mode & 0o7777 == 0o777
