"""`retry_count` is the number of attempts an item gets in all, as MiStaMover counted.

MiStaMover's TransferBase.pushData ran ``while tries < retry_count`` and counted each
failed push: ``retry_count = 3`` meant three pushes, then it gave up.  mstm's docs said
"attempts per item" but the spool parked an item only after retry_count + 1 attempts.
These tests pin the one meaning, against a real spool and real source files with the
target in memory (mstm.transports.memory) corrupting every copy of the item.
"""

from __future__ import annotations

import logging
import re
from pathlib import Path

import pytest

from mstm.config import load_stream
from mstm.config.schema import SCHEMA
from mstm.send import Sender
from mstm.spool import Spool
from mstm.transports.base import TransportOptions
from mstm.transports.memory import MemoryTransport

TARGET = "/archive/proj1"


def sender_for(root: Path, retry_count: int | None) -> tuple[Sender, MemoryTransport, Spool]:
    src = root / "src"
    src.mkdir(parents=True)
    (root / "spool").mkdir()
    (root / "global.ini").write_text(
        "[global]\ndata_stream_list = proj1\n"
        f"spool_base_dir = {root / 'spool'}\nruntime_dir = {root / 'run'}\n")
    written = "" if retry_count is None else f"retry_count = {retry_count}\n"
    (root / "proj1.ini").write_text(
        f"[data_stream]\ndirectory = {src}\nsettle_seconds = 0\n"
        f"[outgoing]\ntransfer_protocol = local\ntarget_dir = {TARGET}\n"
        f"transfer_mode = move\n{written}retry_backoff = 0\nretry_backoff_max = 0\n")
    stream = load_stream("proj1", root / "global.ini")
    spool = Spool(stream.spool_dir, lease_seconds=stream.outgoing.lease_seconds).open()
    target = MemoryTransport(TransportOptions(source_dir=src, target_dir=TARGET))
    (src / "bad.dat").write_bytes(b"precious")
    target.faults.corrupt.add("bad.dat")  # every copy of it fails verification
    return Sender(stream, spool=spool, transport=target), target, spool


def sends_of(target: MemoryTransport, name: str) -> int:
    return [i for batch in target.sent for i in batch].count(name)


@pytest.mark.parametrize(("retry_count", "attempts"), [(1, 1), (2, 2), (3, 3), (5, 5)])
def test_retry_count_n_makes_exactly_n_attempts_then_parks_the_item(
        tmp_path: Path, retry_count: int, attempts: int) -> None:
    sender, target, spool = sender_for(tmp_path, retry_count)
    for _ in range(retry_count + 3):  # more chances than it may take: it must stop at N
        sender.scan_into_spool()
        sender.deliver_pending()
    assert sends_of(target, "bad.dat") == attempts
    assert [(r.relpath, r.attempts) for r in spool.iter_records("failed")] == [
        ("bad.dat", attempts)]
    assert sender.summary.failed[0]["attempts"] == attempts
    assert (tmp_path / "src" / "bad.dat").read_bytes() == b"precious"  # kept


def test_retry_count_0_means_one_attempt_and_no_retry(tmp_path: Path) -> None:
    sender, target, spool = sender_for(tmp_path, 0)
    sender.scan_into_spool()
    sender.deliver_pending()
    assert sends_of(target, "bad.dat") == 1
    assert [r.attempts for r in spool.iter_records("failed")] == [1]
    assert sender.summary.retried == 0


def test_the_default_is_three_attempts_and_the_log_counts_them_out_of_three(
        tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    sender, target, _spool = sender_for(tmp_path, None)
    assert sender.out.retry_count == 3
    with caplog.at_level(logging.DEBUG, logger="mstm"):
        sender.scan_into_spool()
        sender.deliver_pending()
    assert sends_of(target, "bad.dat") == 3
    retries = [r.getMessage() for r in caplog.records if "will retry" in r.getMessage()]
    assert [re.search(r"\(attempt \d+ of \d+\)", m).group(0) for m in retries] == [  # type: ignore[union-attr]
        "(attempt 1 of 3)", "(attempt 2 of 3)"]
    failed = [r.getMessage() for r in caplog.records if r.levelno == logging.ERROR]
    assert len(failed) == 1 and "after 3 attempt(s)" in failed[0]


def test_the_documentation_of_retry_count_says_the_first_attempt_is_included() -> None:
    doc = SCHEMA["outgoing"]["retry_count"].doc
    assert "the first one included" in doc and "3 is one try and two retries" in doc
    conf = (Path(__file__).resolve().parents[2] / "conf" / "global.ini").read_text()
    assert "3 means one try and two retries" in conf
