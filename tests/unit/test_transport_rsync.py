"""mstm.transports.rsync: the command line of each of its callers (push over ssh, push
to an rsync daemon, pull over ssh), and the runner, with a stand-in for rsync.

Each argv test holds the argv the caller built before the builders became one
(``transfer_argv``): the same program, the same options and the same source and
destination.  Only the order of the options may differ (rsync reads its options in any
order); a pull also says ``--no-devices --no-specials`` now, which it already meant (no
``-D``).
"""

from __future__ import annotations

import os
import sys
import time
from collections import Counter
from pathlib import Path

import pytest
from tests.unit.test_pull_plan import pull_stream
from tests.unit.test_transport_rsync_native import make
from tests.unit.test_transport_rsync_ssh import _transport

from mstm.pull import Puller
from mstm.transports.rsync import run_rsync

# no target_port in these streams: no -p, ssh's configuration decides (issue 14, 7)
RSH = ("ssh -o BatchMode=yes -o StrictHostKeyChecking=yes -o ConnectTimeout=15"
       " -o ServerAliveInterval=10 -o ServerAliveCountMax=3 -o ControlPath=/run/c/c"
       " -o ControlMaster=no -o ControlPersist=no -o LogLevel=ERROR")


def assert_same_argv(got: list[str], before: list[str]) -> None:
    """*got* is *before* up to the order of the options (an option's value stays with
    it); the program comes first, "--", the source and the destination last."""
    assert got[0] == before[0]
    assert got[-3:] == before[-3:] and got[-3] == "--"
    assert Counter(got) == Counter(before)
    for i, arg in enumerate(before):
        if arg == "--rsh":
            assert got[got.index("--rsh") + 1] == before[i + 1]


def test_a_push_over_ssh_runs_the_rsync_it_ran_before(tmp_path: Path) -> None:
    t = _transport(tmp_path)
    t.bwlimit = 300
    t.conn._dir = "/run/c"  # a control path, without connecting
    dest = "archive.example.org:/data/in/.mstm-staging/b/"
    tail = ["--", f"{tmp_path}/", dest]
    common = ["--perms", "--chmod=a-st", "--times", "--no-devices", "--no-specials",
              "--from0", "--files-from=-", "--secluded-args", "--mkpath",
              "--partial-dir=/data/in/.mstm-partial", "--timeout=120",
              "--out-format=mstm-xfer:%i %l %n", "--rsh", RSH]
    assert_same_argv(t.rsync_argv("/data/in/.mstm-staging/b", force=True), [
        "rsync", "--recursive", "--links", *common, "--ignore-times", "--bwlimit=300", *tail])
    t.follow_symlinks = True
    assert_same_argv(t.rsync_argv("/data/in/.mstm-staging/b", force=False), [
        "rsync", "--copy-links", "--no-dirs", *common, "--bwlimit=300", *tail])


def test_a_push_to_an_rsync_daemon_runs_the_rsync_it_ran_before(tmp_path: Path) -> None:
    t = make(tmp_path, bwlimit=100)
    dest = "rsync://mstm@archive.example.org:8730/data/in/.mstm-staging/b/"
    tail = ["--", f"{tmp_path}/", dest]
    common = ["--perms", "--chmod=a-st", "--times", "--no-devices", "--no-specials",
              "--from0", "--files-from=-", "--mkpath", "--partial-dir=.mstm-partial",
              "--out-format=mstm-xfer:%i %l %n"]
    t._fsync = True
    assert_same_argv(t.rsync_argv("in/.mstm-staging/b", force=True), [
        "rsync", "--contimeout=15", "--timeout=120", "--recursive", "--links", *common,
        "--fsync", "--ignore-times", "--bwlimit=100", *tail])
    t._fsync, t.follow_symlinks = False, True
    assert_same_argv(t.rsync_argv("in/.mstm-staging/b", force=False), [
        "rsync", "--contimeout=15", "--timeout=120", "--copy-links", "--no-dirs", *common,
        "--bwlimit=100", *tail])
    assert_same_argv(t.rsync_argv("in/.mstm-staging/b", force=False, dirs=True), [
        "rsync", "--contimeout=15", "--timeout=120", "--recursive", "--links", *common,
        "--bwlimit=100", *tail])
    assert t._base_argv() == ["rsync", "--contimeout=15", "--timeout=120"]


def test_a_pull_runs_the_rsync_it_ran_before(tmp_path: Path) -> None:
    s = pull_stream(tmp_path, outgoing={"stall_seconds": "45", "bwlimit": "500"})
    puller = Puller(s, execute=True)
    puller.conn._dir = "/run/c"
    tail = ["--", "sftp.synchrotron.example:/data/epn/", "/dest/ny79/"]
    common = ["rsync", "--recursive", "--links", "--perms", "--times",
              "--chmod=u+rwX,ug-s,o-t", "--no-devices", "--no-specials",
              "--from0", "--files-from=-", "--secluded-args", "--partial-dir=.mstm-partial",
              "--timeout=45", "--rsh", RSH]
    folder = Path("/dest/ny79")
    assert_same_argv(puller.rsync_argv(folder, verify=False, checksum=False), [
        *common, "--out-format=mstm-xfer:%i %l %n", "--bwlimit=500", *tail])
    assert_same_argv(puller.rsync_argv(folder, verify=False, checksum=True), [
        *common, "--out-format=mstm-xfer:%i %l %n", "--checksum", "--bwlimit=500", *tail])
    assert_same_argv(puller.rsync_argv(folder, verify=True, checksum=True), [
        *common, "--dry-run", "--checksum", "--out-format=mstm-verify:%i", *tail])


# --------------------------------------------------------------------------- the runner


def fake_rsync(tmp_path: Path, body: str) -> list[str]:
    """An "rsync" running *body* (Python; `names` holds what came on stdin)."""
    script = tmp_path / "fake-rsync"
    script.write_text(f"#!{sys.executable}\nimport os, sys, time\n"
                      "names = sys.stdin.buffer.read().split(b'\\0')[:-1]\n" + body)
    script.chmod(0o755)
    return [str(script)]


def gone(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    return False


def test_the_runner_counts_files_sent_and_differences_and_keeps_the_stderr_tail(
        tmp_path: Path) -> None:
    argv = fake_rsync(tmp_path, """
out = sys.stdout.buffer
for n in names:
    out.write(b"mstm-xfer:<f+++++++++ 10 " + n + b"\\n")  # sent
out.write(b"mstm-xfer:>f.st...... 7 odd\\\\#012name\\\\#377 \\n")  # received, escaped name
out.write(b"mstm-xfer:.f..t...... 99\\n")  # only its time set: nothing moved
out.write(b"mstm-xfer:cd+++++++++ 4096\\n")  # a directory
out.write(b"mstm-verify:>fc.T......\\nunrelated\\n")
sys.stderr.write("rsync: [sender] link_stat failed\\nrsync error: some files (code 23)\\n")
sys.exit(23)
""")
    seen: list[tuple[int, int, str | None]] = []
    run = run_rsync(argv, b"a\0b\0",
                    progress=lambda f, b, name=None: seen.append((f, b, name)),
                    done=(5, 1000))
    assert (run.exit_code, run.files, run.file_bytes, run.changes) == (23, 3, 27, 1)
    # each file named as rsync starts it, rsync's escapes undone
    assert seen == [(6, 1010, "a"), (7, 1020, "b"), (8, 1027, "odd\nname\udcff ")]
    assert not run.stopped and not run.stalled
    assert run.error == "rsync exit 23: rsync: [sender] link_stat failed"
    assert run.stderr_tail.endswith(b"(code 23)\n")


def test_the_runner_terminates_rsync_when_told_to_stop_and_feeds_the_watchdog(
        tmp_path: Path) -> None:
    argv = fake_rsync(tmp_path, "time.sleep(60)\n")
    asked: list[float] = []
    ticks: list[float] = []
    start = time.monotonic()

    def should_stop() -> bool:
        asked.append(time.monotonic())
        return time.monotonic() - start > 0.5

    run = run_rsync(argv, b"a\0", should_stop=should_stop,
                    tick=lambda: ticks.append(time.monotonic()))
    assert run.stopped and run.exit_code == -15 and not run.stalled
    assert time.monotonic() - start < 5
    assert len(ticks) >= 2


def test_a_watched_run_that_reads_nothing_is_killed_with_its_process_group(
        tmp_path: Path) -> None:
    pids = tmp_path / "pids"
    argv = fake_rsync(tmp_path, f"""
import subprocess
child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
open({str(pids)!r}, "w").write(str(child.pid))
time.sleep(60)
""")
    start = time.monotonic()
    run = run_rsync(argv, b"a\0", stall=1.0)
    assert run.stalled and not run.stopped and run.exit_code == -9
    assert run.error == "rsync made no progress for 1 s (stall_seconds); cut"
    assert 1.0 <= time.monotonic() - start < 10
    child = int(pids.read_text())
    deadline = time.monotonic() + 5
    while not gone(child) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert gone(child)


@pytest.mark.parametrize("ignored", [False, True])
def test_a_watched_run_counts_what_its_processes_read_except_the_ignored_one(
        tmp_path: Path, ignored: bool) -> None:
    """Reading keeps a run alive, unless it is the program stall_ignores names (ssh)."""
    (tmp_path / "data").write_bytes(b"x" * 4096)
    argv = fake_rsync(tmp_path, f"""
end = time.monotonic() + 2.5
while time.monotonic() < end:
    open({str(tmp_path / "data")!r}, "rb").read()
    time.sleep(0.1)
""")
    run = run_rsync(argv, b"a\0", stall=1.0,
                    stall_ignores="fake-rsync" if ignored else "ssh")
    assert run.stalled is ignored
    assert run.exit_code == (-9 if ignored else 0)
