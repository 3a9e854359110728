"""The pacing, stall watch and secrets shared by the local, sftp and ftp transports."""

from __future__ import annotations

import threading
import time
from pathlib import Path

import pytest

from mstm.errors import TargetUnavailable
from mstm.transports.base import SendResult
from mstm.transports.common import (
    Monitor,
    Throttle,
    call_watched,
    chunk_size,
    part_name,
    read_secret,
    run_watched,
)


def test_the_temporary_name_is_hidden_and_beside_the_final_one() -> None:
    assert part_name("a/b/c.dat") == "a/b/.c.dat.mstm-part"
    assert part_name("top.dat") == ".top.dat.mstm-part"


def test_chunks_take_at_most_a_quarter_second_at_the_limit() -> None:
    assert chunk_size(0) == 256 * 1024
    assert chunk_size(1000) == 256000
    assert chunk_size(1) == 1024


def test_the_throttle_keeps_the_average_rate_at_the_limit() -> None:
    throttle = Throttle(1000)  # KiB/s
    t0 = time.monotonic()
    for _ in range(10):
        throttle.consumed(30 * 1024)
    took = time.monotonic() - t0
    assert 0.27 <= took <= 0.45  # 300 KiB at 1000 KiB/s


def test_a_worker_that_makes_no_progress_is_cut_after_stall_seconds() -> None:
    released = threading.Event()
    aborted: list[float] = []

    def work(mon: Monitor) -> SendResult:
        mon.advance(10)
        released.wait(10)  # a write blocked on a stopped server
        raise OSError("connection reset")

    def abort() -> None:
        aborted.append(time.monotonic())
        released.set()

    t0 = time.monotonic()
    result = run_watched(work, monitor=Monitor(), stall_seconds=0.5, abort=abort,
                         should_stop=None, tick=None)
    assert aborted and 0.4 <= aborted[0] - t0 <= 1.5
    assert "stalled" in result.error and result.bytes == 10
    assert not result.stopped


def test_a_trickle_that_never_completes_a_chunk_is_a_stall_too() -> None:
    cut = threading.Event()

    def work(mon: Monitor) -> SendResult:
        while not cut.is_set():  # bytes dribble out, but no chunk ever completes
            time.sleep(0.05)
        raise OSError("shut down")

    result = run_watched(work, monitor=Monitor(), stall_seconds=0.5, abort=cut.set,
                         should_stop=None, tick=None)
    assert "stalled" in result.error


def test_a_stop_request_ends_the_worker_at_its_next_chunk() -> None:
    stop = threading.Event()
    ticks: list[int] = []

    def work(mon: Monitor) -> SendResult:
        for _ in range(1000):
            mon.advance(1)
            time.sleep(0.01)
        return SendResult(files=1)

    threading.Timer(0.3, stop.set).start()
    result = run_watched(work, monitor=Monitor(), stall_seconds=5, abort=lambda: None,
                         should_stop=stop.is_set, tick=lambda: ticks.append(1))
    assert result.stopped and result.files == 0 and 0 < result.bytes < 1000
    assert ticks  # the watchdog was fed meanwhile


def test_an_unexpected_error_of_the_worker_reaches_the_caller() -> None:
    def work(mon: Monitor) -> SendResult:
        raise RuntimeError("bug")

    with pytest.raises(RuntimeError, match="bug"):
        run_watched(work, monitor=Monitor(), stall_seconds=5, abort=lambda: None,
                    should_stop=None, tick=None)


def test_call_watched_raises_target_unavailable_when_the_call_hangs() -> None:
    gate = threading.Event()
    with pytest.raises(TargetUnavailable, match="no progress"):
        call_watched(lambda mon: gate.wait(10), stall_seconds=0.3, abort=gate.set,
                     what="reading back")
    assert call_watched(lambda mon: 42, stall_seconds=1, abort=lambda: None, what="x") == 42


def test_secrets_come_from_the_file_or_the_systemd_credential(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("CREDENTIALS_DIRECTORY", raising=False)
    pw = tmp_path / "pw"
    pw.write_text("se cret\n")
    assert read_secret(pw, "ftp-password", section="ftp") == "se cret"
    assert read_secret(None, "ftp-password", section="ftp") is None
    creds = tmp_path / "creds"
    creds.mkdir()
    (creds / "ftp-password").write_text("from-systemd")
    monkeypatch.setenv("CREDENTIALS_DIRECTORY", str(creds))
    assert read_secret(None, "ftp-password", section="ftp") == "from-systemd"
    assert read_secret(pw, "ftp-password", section="ftp") == "se cret"  # the file wins


def test_an_unreadable_password_file_is_a_config_error_without_its_content(
        tmp_path: Path) -> None:
    from mstm.errors import ConfigError

    with pytest.raises(ConfigError) as info:
        read_secret(tmp_path / "missing", "x", section="ftp")
    assert info.value.key == "password_file"
