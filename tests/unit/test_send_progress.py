"""The progress line of mstm-send on a terminal (mstm.send.report.TtyProgress), and what
the transports tell it: files and bytes so far, and the file being sent."""

from __future__ import annotations

import hashlib
import io
import logging
import re
import threading
from pathlib import Path

import pytest
from tests.unit.test_sender_decisions import Env

from mstm.cli.common import level_from_flags
from mstm.log import VERBOSE
from mstm.protocol import new_batch_id
from mstm.send import Sender
from mstm.send import sender as sender_module
from mstm.send.report import TtyProgress, queued_size
from mstm.transports.base import Item, TransportOptions, staging_dir
from mstm.transports.common import Monitor
from mstm.transports.memory import MemoryTransport


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def lines(out: io.StringIO) -> list[str]:
    """Each state of the line drawn (tqdm redraws it after a carriage return)."""
    return [s for s in re.split(r"[\r\n]", out.getvalue()) if s.strip()]


def progress(out: io.StringIO, clock: Clock, queued: tuple[int, int | None] = (0, 0)
             ) -> TtyProgress:
    return TtyProgress("proj1", queued=lambda: queued, file=out, ncols=150, clock=clock)


MiB = 1 << 20


def test_the_line_shows_percent_bytes_rate_time_left_files_and_the_file_being_sent() -> None:
    out, clock = io.StringIO(), Clock()
    p = progress(out, clock, queued=(6, 6 * MiB))  # 6 more queued after this batch
    batch = [Item(f"run/f{i}.dat", MiB) for i in range(4)]
    p.batch_start(batch)
    for i in range(4):
        clock.now += 1.0
        p.batch_progress(i + 1, (i + 1) * MiB, f"run/f{i + 1}.dat")

    last = lines(out)[-1]
    assert last.startswith("proj1:  40%|")
    assert "| 4.0 MiB of 10.0 MiB, 1.0 MiB/s, ETA 00:06, 4/10 files: run/f4.dat" in last


def test_the_final_line_shows_the_average_rate_and_the_time_taken() -> None:
    out, clock = io.StringIO(), Clock()
    p = progress(out, clock)
    p.batch_start([Item("a", 3 * MiB), Item("b", MiB)])
    clock.now += 1.0
    p.batch_progress(1, 3 * MiB, "b")
    clock.now += 3.0
    p.batch_progress(2, 4 * MiB, "b")
    p.batch_done()
    p.finish()

    text = out.getvalue()
    assert text.endswith("\n")
    assert lines(out)[-1].endswith("| 4.0 MiB of 4.0 MiB, 1.0 MiB/s, in 00:04, 2/2 files")
    assert lines(out)[-1].startswith("proj1: 100%|")


def test_a_name_with_a_line_break_a_control_character_or_bad_bytes_stays_on_one_line() -> None:
    out, clock = io.StringIO(), Clock()
    p = progress(out, clock)
    p.batch_start([Item("x", 10), Item("y", 10)])
    clock.now += 1
    p.batch_progress(1, 10, "evil\nname\x1b[2J\udcff.dat")
    p.finish()

    text = out.getvalue()
    assert "\x1b" not in text and "\udcff" not in text
    drawn = [s for s in lines(out) if "1/2 files: " in s]
    assert drawn and drawn[-1].endswith(r"1/2 files: evil\nname\x1b[2J\\xff.dat")


def test_a_long_name_is_shortened_in_the_middle() -> None:
    out, clock = io.StringIO(), Clock()
    p = progress(out, clock)
    p.batch_start([Item("x", 10), Item("y", 10)])
    clock.now += 1
    p.batch_progress(1, 10, "a" * 30 + "/" + "b" * 60 + ".dat")
    name = lines(out)[-1].split("files: ")[1]
    assert len(name) == 48
    assert name.startswith("aaaa") and "..." in name and name.endswith("bbb.dat")


def test_the_total_grows_when_a_later_batch_brings_more_than_was_queued() -> None:
    out, clock = io.StringIO(), Clock()
    p = progress(out, clock, queued=(0, 0))
    p.batch_start([Item("a", MiB)])
    clock.now += 1
    p.batch_progress(1, MiB, "a")
    p.batch_done()
    assert "1.0 MiB of 1.0 MiB" in lines(out)[-1]
    p.batch_start([Item("a", MiB), Item("b", MiB)])  # "a" again (a retry) and a new one
    clock.now += 1
    p.batch_progress(1, MiB, "b")
    assert "2.0 MiB of 3.0 MiB" in lines(out)[-1] and "2/3 files" in lines(out)[-1]


def test_updates_are_drawn_at_most_once_per_mininterval() -> None:
    out, clock = io.StringIO(), Clock()
    p = progress(out, clock)
    p.batch_start([Item("big", 1000 * 4096)])
    drawn = len(lines(out))
    for chunk in range(1, 1001):  # 1000 chunks in 1 s: five draws at most (0.2 s apart)
        clock.now += 0.001
        p.batch_progress(0, chunk * 4096, "big")
    assert 1 <= len(lines(out)) - drawn <= 5


def test_nothing_is_drawn_for_a_run_that_sent_nothing() -> None:
    out = io.StringIO()
    p = progress(out, Clock())
    p.batch_progress(1, 10)  # before any batch: ignored
    p.finish()
    assert out.getvalue() == ""


def test_without_a_known_total_the_line_shows_bytes_rate_and_files_but_no_percent() -> None:
    out, clock = io.StringIO(), Clock()
    p = progress(out, clock, queued=(50_000, None))  # a deep queue is not read for sizes
    p.batch_start([Item("a", MiB)])
    clock.now += 1
    p.batch_progress(1, MiB, "a")
    last = lines(out)[-1]
    assert "%" not in last
    assert last.startswith("proj1: 1.0 MiB, 1.0 MiB/s, 00:01, 1/50001 files: a")


def test_a_transport_monitor_names_the_file_it_sends_and_reports_within_a_file() -> None:
    seen: list[tuple[int, int, str | None]] = []
    m = Monitor(progress=lambda f, b, name=None: seen.append((f, b, name)))
    m.start_file("one")
    m.advance(100)
    m.advance(50)
    m.file_done()
    m.start_file("two")
    m.advance(7)
    assert seen == [(0, 100, "one"), (0, 150, "one"), (1, 150, "one"), (1, 157, "two")]


def test_the_memory_transport_names_each_item_it_sent(tmp_path: Path) -> None:
    src = tmp_path / "src"
    src.mkdir()
    (src / "a").write_bytes(b"12")
    (src / "b").write_bytes(b"345")
    t = MemoryTransport(TransportOptions(source_dir=src, target_dir="/t"))
    t.open()
    seen: list[tuple[int, int, str | None]] = []
    t.send([Item("a", 2), Item("b", 3)], progress=lambda f, b, n=None: seen.append((f, b, n)),
           dest=staging_dir("/t", new_batch_id()))
    assert seen == [(1, 2, "a"), (2, 5, "b")]


def test_progress_is_told_from_another_thread_while_log_lines_are_written() -> None:
    out, clock = io.StringIO(), Clock()
    p = progress(out, clock)
    p.batch_start([Item(str(i), 10) for i in range(200)])

    def worker() -> None:
        for i in range(200):
            clock.now += 0.01
            p.batch_progress(i + 1, (i + 1) * 10, str(i))

    t = threading.Thread(target=worker)
    t.start()
    t.join()
    p.finish()
    assert lines(out)[-1].endswith("200/200 files")


def test_the_first_line_shows_the_total_and_after_a_transfer_it_says_verifying() -> None:
    out, clock = io.StringIO(), Clock()
    p = progress(out, clock, queued=(1, MiB))
    p.batch_start([Item("a", MiB)])
    assert lines(out)[0].endswith("| 0 B of 2.0 MiB, ? B/s, ETA ?, 0/2 files")
    clock.now += 1
    p.batch_progress(1, MiB, "a")
    p.batch_done()  # the target hashes the batch now: no file is being sent
    assert lines(out)[-1].endswith(", 1/2 files, verifying")
    p.batch_start([Item("b", MiB)])
    clock.now += 1
    p.batch_progress(0, MiB // 2, "b")
    assert lines(out)[-1].endswith(", 1/2 files: b")


# -- the sender: what it tells the line, and what -v lists ------------------------------
class Records(logging.Handler):
    def __init__(self) -> None:
        super().__init__(logging.DEBUG)
        self.seen: list[logging.LogRecord] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.seen.append(record)


def short(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()[:16]


def run_logged(env: Env, verbose: int) -> list[str]:
    """The messages mstm logs while *env* delivers, at the level -v given *verbose* times
    sets (on a terminal, not under the journal)."""
    logger, handler = logging.getLogger("mstm"), Records()
    old_level = logger.level
    logger.addHandler(handler)
    logger.setLevel(level_from_flags(verbose, False))
    try:
        env.cycle()
    finally:
        logger.removeHandler(handler)
        logger.setLevel(old_level)
    return [r.getMessage() for r in handler.seen]  # only what the level let through


def test_verbose_lists_each_delivered_item_once_and_debug_adds_its_deletion(
        tmp_path: Path) -> None:
    for verbose, listed, deleted in ((0, 0, 0), (1, 2, 0), (2, 2, 2)):
        env = Env(tmp_path / str(verbose))
        env.write("a.dat", b"1" * 10)
        env.write("odd\nname", b"22")
        said = run_logged(env, verbose)
        lines_ = [m for m in said if ": delivered " in m]
        assert len(lines_) == listed, said
        assert len([m for m in said if "deleted source" in m]) == deleted, said
        if listed:
            assert sorted(lines_) == [
                f"proj1: delivered a.dat (10 bytes, sha256 {short(b'1' * 10)})",
                f"proj1: delivered odd\\nname (2 bytes, sha256 {short(b'22')})"]  # escaped
        env.spool.close()


def test_under_the_journal_each_delivery_and_deletion_is_logged_at_info(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(sender_module, "under_journal", lambda: True)
    env = Env(tmp_path)
    assert (env.sender.per_item_level, env.sender.deletion_level) == (logging.INFO,) * 2
    monkeypatch.setattr(sender_module, "under_journal", lambda: False)
    env.sender = Sender(env.stream, spool=env.spool, transport=env.target)
    assert (env.sender.per_item_level, env.sender.deletion_level) == (VERBOSE, logging.DEBUG)
    env.spool.close()


def test_the_sender_tells_the_line_each_batch_and_the_item_being_sent(tmp_path: Path) -> None:
    env = Env(tmp_path)
    for name in ("a.dat", "b.dat", "c.dat"):
        env.write(name, b"x" * 1000)
    out, clock = io.StringIO(), Clock()
    env.sender = Sender(env.stream, spool=env.spool, transport=env.target,
                        progress=TtyProgress("proj1", queued=lambda: queued_size(env.spool),
                                             file=out, ncols=150, clock=clock, mininterval=0))
    env.cycle()
    env.sender.progress.finish()  # type: ignore[union-attr]
    drawn = lines(out)
    assert drawn[0].endswith("| 0 B of 2.9 KiB, ? B/s, ETA ?, 0/3 files")
    assert {s.rsplit(": ", 1)[1] for s in drawn if "files: " in s} == {"a.dat", "b.dat", "c.dat"}
    assert drawn[-1].startswith("proj1: 100%|") and drawn[-1].endswith("3/3 files")
    env.spool.close()
