"""Directory items and shutdown of a follower (the terminal's progress line:
test_send_progress_tty.py)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import time

import pytest
from tests.harness.streams import StreamEnv

pytestmark = pytest.mark.integration


def test_directory_items_arrive_whole_and_are_moved_only_after_verification(
        stream: StreamEnv) -> None:
    stream.configure(data_stream={"transfer_unit": "dir"})
    for run in ("run-001", "run 002"):
        for i in range(5):
            stream.put(f"{run}/part{i}.dat", os.urandom(2000))
        stream.put(f"{run}/sub/-odd name", b"odd")
    expected = stream.files(stream.source)

    r = stream.run("mstm-send", "--once", "--json")

    assert r.returncode == 0, r.stderr
    assert json.loads(r.stdout)["delivered"] == 2
    assert stream.files(stream.target) == expected  # no staging leftovers either
    assert not (stream.target / ".mstm-staging").exists() or \
        not any((stream.target / ".mstm-staging").iterdir())
    assert not (stream.source / "run-001").exists()


def test_mirror_of_a_changed_directory_replaces_it_whole(stream: StreamEnv) -> None:
    stream.configure(data_stream={"transfer_unit": "dir"}, outgoing={"transfer_mode": "mirror"})
    stream.put("run/a.dat", b"one")
    assert stream.run("mstm-send", "--once").returncode == 0
    stream.put("run/b.dat", b"two")
    os.utime(stream.source / "run" / "b.dat", ns=(time.time_ns(), time.time_ns() + 10**9))

    r = stream.run("mstm-send", "--once", "--json")

    assert json.loads(r.stdout)["delivered"] == 1, r.stderr
    assert stream.files(stream.target) == stream.files(stream.source)


def test_sigterm_stops_a_follower_cleanly_with_nothing_half_done(stream: StreamEnv) -> None:
    stream.configure(outgoing={"bwlimit": "1024"})
    for i in range(10):
        stream.put(f"big{i}.dat", os.urandom(300_000))
    proc = stream.popen("mstm-send", "--follow", stdout=subprocess.DEVNULL,
                        stderr=subprocess.PIPE)
    time.sleep(1.5)
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=30)
    assert proc.returncode == 0, err
    # every source missing was delivered; an interrupted file waits only in .mstm-partial/
    src, dst = stream.files(stream.source), stream.files(stream.target)
    final = {n for n in dst if not n.startswith(b".mstm-partial/")}
    assert all(not n.startswith(b".") for n in final)
    assert len(src) + len(final - set(src)) == 10
    r = stream.run("mstm-send", "--once", "--json")
    assert r.returncode == 0
    assert stream.files(stream.source) == {}
    assert len(stream.files(stream.target)) == 10
