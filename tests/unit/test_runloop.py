"""mstm.runloop: the stop, watchdog, sleep and signals every long-running command shares;
and mstm.pause, the stream's own stop file."""

from __future__ import annotations

import logging
import os
import signal
import threading
import time
from pathlib import Path
from types import SimpleNamespace

import pytest

from mstm import runloop
from mstm.notify import Notifier
from mstm.pause import is_paused, say_pause_change
from mstm.runloop import RunLoop, stop_on_signals


class CountingNotifier(Notifier):
    def __init__(self, max_sleep: float | None = None) -> None:
        super().__init__()
        self.pings = 0
        self._max = max_sleep

    def watchdog(self) -> None:
        self.pings += 1

    @property
    def max_sleep(self) -> float | None:
        return self._max


def test_sleep_returns_false_after_the_time_and_feeds_the_watchdog() -> None:
    n = CountingNotifier(max_sleep=0.02)
    loop = RunLoop(n)
    t0 = time.monotonic()
    assert loop.sleep(0.1) is False
    assert time.monotonic() - t0 >= 0.1
    assert n.pings >= 3  # woke at least every watchdog slice


def test_stop_from_another_thread_ends_a_long_sleep_at_once() -> None:
    loop = RunLoop(CountingNotifier())
    threading.Timer(0.05, loop.stop).start()
    t0 = time.monotonic()
    assert loop.sleep(60) is True
    assert time.monotonic() - t0 < 2
    assert loop.stopping


def test_a_waiter_registered_with_on_stop_is_woken_and_can_be_forgotten() -> None:
    loop = RunLoop(CountingNotifier())
    woken: list[str] = []
    forget_a = loop.on_stop(lambda: woken.append("a"))
    loop.on_stop(lambda: woken.append("b"))
    forget_a()
    loop.stop()
    assert woken == ["b"]
    late: list[str] = []
    loop.on_stop(lambda: late.append("late"))  # registered after stop: woken at once
    assert late == ["late"]


def test_max_wait_is_never_longer_than_the_watchdog_slice_or_the_longest_wait() -> None:
    assert RunLoop(CountingNotifier(max_sleep=0.5)).max_wait(10.0) == 0.5
    assert RunLoop(CountingNotifier()).max_wait(100.0) == runloop.LONGEST_WAIT
    assert RunLoop(CountingNotifier()).max_wait(0.25, None) == 0.25
    assert RunLoop(CountingNotifier()).max_wait(-3.0) == 0.0


def test_sigterm_and_sigint_call_stop_once_each_and_say_what_happens(
        caplog: pytest.LogCaptureFixture) -> None:
    old = signal.getsignal(signal.SIGTERM), signal.getsignal(signal.SIGINT)
    calls: list[int] = []
    try:
        stop_on_signals(lambda: calls.append(1), doing="stopping", name="proj1")
        with caplog.at_level(logging.INFO, logger="mstm"):
            os.kill(os.getpid(), signal.SIGTERM)
            os.kill(os.getpid(), signal.SIGINT)
            time.sleep(0.01)  # signals are handled between bytecodes of the main thread
    finally:
        signal.signal(signal.SIGTERM, old[0])
        signal.signal(signal.SIGINT, old[1])
    assert calls == [1, 1]
    assert "proj1: SIGTERM received; stopping" in caplog.text
    assert "proj1: SIGINT received; stopping" in caplog.text


# -- the stream's own stop file ------------------------------------------------------
def _stream(directory: Path) -> SimpleNamespace:
    return SimpleNamespace(directory=directory, outgoing=SimpleNamespace(stop_file=".stop"))


def test_a_stop_file_pauses_and_its_first_line_is_the_reason(tmp_path: Path) -> None:
    assert is_paused(_stream(tmp_path)) is None
    (tmp_path / ".stop").write_text("maintenance until 14:00\nsecond line\n")
    reason = is_paused(_stream(tmp_path))
    assert reason is not None and reason.endswith(": maintenance until 14:00")


def test_a_stop_file_that_is_a_link_pauses_but_what_it_points_to_is_never_read(
        tmp_path: Path) -> None:
    secret = tmp_path / "outside"
    secret.write_text("do not print me\n")
    stream_dir = tmp_path / "stream"
    stream_dir.mkdir()
    (stream_dir / ".stop").symlink_to(secret)
    reason = is_paused(_stream(stream_dir))
    assert reason is not None and "do not print me" not in reason


def test_a_stop_file_that_is_a_fifo_pauses_without_blocking(tmp_path: Path) -> None:
    os.mkfifo(tmp_path / ".stop")
    reason = is_paused(_stream(tmp_path))
    assert reason == f"stop file {tmp_path / '.stop'} exists"


def test_a_pause_change_is_said_once(caplog: pytest.LogCaptureFixture) -> None:
    log = logging.getLogger("mstm.test")
    with caplog.at_level(logging.INFO, logger="mstm.test"):
        say_pause_change(log, "s", None, "stop file exists")
        say_pause_change(log, "s", "stop file exists", "stop file exists")
        say_pause_change(log, "s", "stop file exists", None)
    assert [r.getMessage() for r in caplog.records] == ["s: paused: stop file exists",
                                                        "s: resumed"]
