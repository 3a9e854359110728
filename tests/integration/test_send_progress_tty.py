"""mstm-send --once on a real terminal (a pseudo-terminal, pexpect): one progress line
with percent, bytes, rate, time left and the file being sent; -v lists each delivered
file above it; into a pipe, with --json, nothing of the bar."""

from __future__ import annotations

import json
import os
import re
from pathlib import Path

import pexpect
import pytest
from tests.conftest import need
from tests.harness.sshd import LoopbackSshd
from tests.harness.streams import StreamEnv
from tests.integration.test_pull import make_rig, tree

pytestmark = pytest.mark.integration

SIZE = 128 * 1024
NAMES = [f"f{i}.dat" for i in range(8)] + ["m\nid.dat"]  # rsync sends them in this order
SHOWN = {n: n.replace("\n", "\\n") for n in NAMES}  # a line break shown escaped
UNIT = r"[\d.]+ (?:B|KiB|MiB|GiB)"
RUNNING = re.compile(rf"^proj1: +(\d+)%\|[^|]*\| ({UNIT}) of ({UNIT}), ({UNIT})/s, "
                     rf"ETA (\d\d:\d\d), (\d+)/9 files: (.+)$")
FINISHED = re.compile(rf"^proj1: 100%\|[^|]*\| 1\.1 MiB of 1\.1 MiB, {UNIT}/s, "
                      rf"in 00:0\d, 9/9 files$")
DELIVERED = re.compile(r"^mstm-send: proj1: delivered (.+) \((\d+) bytes, sha256 ([0-9a-f]{16})")
ANSI = re.compile(r"\x1b\[[0-9;?]*[A-Za-z]")


def slow_stream(stream: StreamEnv) -> None:
    """Nine files of 128 KiB at 256 KiB/s: about four seconds, a file every half second."""
    stream.configure(outgoing={"bwlimit": "256"})
    for name in NAMES:
        stream.put(name, os.urandom(SIZE))


def on_terminal(stream: StreamEnv, *args: str) -> tuple[int, list[str]]:
    """Run mstm-send on a pseudo-terminal: its exit status and each state of the screen's
    lines (split at carriage returns and line feeds)."""
    cmd = stream.command("mstm-send", *args)
    child = pexpect.spawn(cmd[0], cmd[1:], timeout=120, dimensions=(24, 200))
    child.expect(pexpect.EOF)
    child.close()
    screen = ANSI.sub("", child.before.decode("utf-8"))
    return child.exitstatus, [s.rstrip() for s in re.split(r"[\r\n]", screen) if s.strip()]


def test_once_on_a_terminal_shows_percent_rate_time_left_and_the_file_being_sent(
        stream: StreamEnv) -> None:
    slow_stream(stream)

    code, screen = on_terminal(stream, "--once")

    assert code == 0, "\n".join(screen)
    bars = [m for s in screen if (m := RUNNING.match(s))]
    percents = {int(m[1]) for m in bars}
    assert len({p for p in percents if 0 < p < 100}) >= 3, screen  # several updates
    assert all(m[3] == "1.1 MiB" for m in bars)  # the run's total, from the start
    assert any(m[5] != "00:00" for m in bars)  # a time left while there is some
    assert {m[7] for m in bars} <= set(SHOWN.values())  # the file being sent, by name
    assert len({m[7] for m in bars}) >= 3
    assert SHOWN["m\nid.dat"] in {m[7] for m in bars}  # escaped, the bar on one line
    assert FINISHED.match(screen[-2]), screen[-2:]  # the final state stays on screen
    assert screen[-1] == "mstm-send: proj1: 9 delivered (1179648 bytes), 0 failed, " \
                         "0 skipped, 0 still queued"
    assert not any(DELIVERED.match(s) for s in screen)  # quiet per file without -v
    assert stream.files(stream.source) == {}
    assert len(stream.files(stream.target)) == 9


def test_verbose_on_a_terminal_lists_each_delivered_file_on_its_own_line_above_the_bar(
        stream: StreamEnv) -> None:
    slow_stream(stream)

    code, screen = on_terminal(stream, "-v", "--once")

    assert code == 0, "\n".join(screen)
    listed = [m for s in screen if (m := DELIVERED.match(s))]
    assert sorted(m[1] for m in listed) == sorted(SHOWN.values())  # each once, whole
    assert all(int(m[2]) == SIZE for m in listed)
    assert any(RUNNING.match(s) for s in screen) and FINISHED.match(screen[-2])
    assert not any("deleted source" in s for s in screen)  # that is -vv's


def test_the_same_run_into_a_pipe_or_with_json_prints_no_bar(stream: StreamEnv) -> None:
    slow_stream(stream)

    r = stream.run("mstm-send", "-v", "--once")

    assert r.returncode == 0, r.stderr
    assert "\r" not in r.stderr + r.stdout and "\x1b" not in r.stderr + r.stdout
    assert "%|" not in r.stderr and "ETA" not in r.stderr
    listed = [m for s in r.stderr.splitlines() if (m := DELIVERED.match(s))]
    assert sorted(m[1] for m in listed) == sorted(SHOWN.values())

    for name in NAMES[:3]:
        stream.put(name, os.urandom(SIZE))
    code, screen = on_terminal(stream, "--once", "--json")  # on a terminal, but JSON asked
    assert code == 0, screen
    assert not any("%|" in s or "ETA" in s for s in screen)
    (summary,) = [s for s in screen if s.startswith("{")]
    assert json.loads(summary)["delivered"] == 3


def test_a_transport_that_copies_chunk_by_chunk_shows_progress_within_one_file(
        stream: StreamEnv) -> None:
    stream.configure(outgoing={"transfer_protocol": "local", "bwlimit": "1024"})
    stream.put("one big\tfile.dat", os.urandom(4 << 20))  # 4 s at 1 MiB/s

    code, screen = on_terminal(stream, "--once")

    assert code == 0, "\n".join(screen)
    within = re.compile(rf"^proj1: +(\d+)%\|[^|]*\| ({UNIT}) of 4\.0 MiB, ({UNIT})/s, "
                        rf"ETA (\d\d:\d\d), 0/1 files: (.+)$")
    bars = [m for s in screen if (m := within.match(s))]
    assert len({int(m[1]) for m in bars if 0 < int(m[1]) < 100}) >= 5  # within the file
    assert {m[5] for m in bars} == {"one big\\tfile.dat"}
    assert any(m[4] != "00:00" for m in bars)


def test_a_pull_stream_fetching_on_a_terminal_shows_the_same_line_summed_over_its_fetches(
        tmp_path: Path, sshd: LoopbackSshd) -> None:
    need("rsync")
    rig = make_rig(tmp_path, sshd)
    rig.configure(outgoing={"bwlimit": "256"}, pull={"max_tasks": "2"})
    items = ["10000a", "10001b", "10002c", "10003d"]
    for item in items:  # 512 KiB each, two at a time at 256 KiB/s each: about 4 s
        for f in range(4):
            (rig.remote / item / f"frame_{f:04d}.img").parent.mkdir(exist_ok=True)
            (rig.remote / item / f"frame_{f:04d}.img").write_bytes(os.urandom(SIZE))

    code, screen = on_terminal(rig.env, "--once", "--execute")

    assert code == 0, "\n".join(screen)
    pulled = re.compile(rf"^proj1: +(\d+)%\|[^|]*\| ({UNIT}) of 2\.0 MiB, ({UNIT})/s, "
                        rf"ETA (\d\d:\d\d), (\d+) files: (.+)$")
    bars = [m for s in screen if (m := pulled.match(s))]
    assert len({int(m[1]) for m in bars if 0 < int(m[1]) < 100}) >= 3, screen
    assert {m[6].split("/")[0] for m in bars} <= set(items)  # item/file, as rsync names it
    assert re.match(rf"^proj1: 100%\|[^|]*\| 2\.0 MiB of 2\.0 MiB, {UNIT}/s, in 00:\d\d, "
                    rf"16 files$", next(s for s in reversed(screen) if s.startswith("proj1:")))
    assert all(tree(rig.folder(n) / n) == tree(rig.remote / n) for n in items)

    (rig.remote / "10004e").mkdir()
    (rig.remote / "10004e" / "late.img").write_bytes(os.urandom(SIZE))
    r = rig.run("--once", "--execute")  # into a pipe: no line at all
    assert r.returncode == 0, r.stderr
    assert "\r" not in r.stderr and "%|" not in r.stderr and "ETA" not in r.stderr
