"""mstm.pull.ledger and the per-item locks of mstm.pull: what a person and many workers see."""

from __future__ import annotations

import json
import multiprocessing
import os
import subprocess
import sys
from pathlib import Path

import pytest

from mstm.pull import ItemLock
from mstm.pull.ledger import DONE, HEADER, UNMAPPED, Entry, Ledger, LedgerError


def done(name: str, signature: str | None = "entries=1 bytes=0 mtime=1.0") -> Entry:
    return Entry(item=name, state=DONE, signature=signature, at="2024-05-01T00:00:00Z",
                 destination=f"/scratch/{name}")


def test_a_new_ledger_has_a_header_and_one_json_line_per_item(tmp_path: Path) -> None:
    ledger = Ledger(tmp_path / "ledger.jsonl")
    ledger.set(done("12282a"), Entry("99999z", UNMAPPED, reason="no rule", at="t"))
    text = ledger.path.read_text()
    assert text.startswith(HEADER)
    lines = [ln for ln in text.splitlines() if not ln.startswith("#")]
    assert [json.loads(ln)["item"] for ln in lines] == ["12282a", "99999z"]
    assert ledger.read()["12282a"] == done("12282a")
    assert ledger.read()["99999z"].state == UNMAPPED


def test_an_update_replaces_only_that_items_line_and_keeps_a_persons_lines(
        tmp_path: Path) -> None:
    path = tmp_path / "ledger.jsonl"
    hand_written = ("# fetched by hand in 2023, do not touch\n"
                    "- 12000a\n"
                    "- '12001b'\n"
                    '{"item": "12282a", "state": "done", "signature": "old", "note": "mine"}\n'
                    "\n"
                    '{"item": "13000a", "state": "done", "signature": "s"}\n')
    path.write_text(hand_written)
    ledger = Ledger(path)
    ledger.set(done("12282a", "new"))
    lines = path.read_text().splitlines()
    assert lines[:3] == hand_written.splitlines()[:3]
    assert lines[4:] == hand_written.splitlines()[4:]
    replaced = json.loads(lines[3])
    assert replaced["signature"] == "new" and replaced["item"] == "12282a"
    entries = ledger.read()
    assert entries["12000a"].done_for_good and entries["12001b"].done_for_good
    assert not entries["13000a"].done_for_good


def test_deleting_a_line_forgets_the_item(tmp_path: Path) -> None:
    ledger = Ledger(tmp_path / "ledger.jsonl")
    ledger.set(done("a"), done("b"), done("c"))
    text = ledger.path.read_text()
    ledger.path.write_text("".join(ln for ln in text.splitlines(keepends=True)
                                   if '"b"' not in ln))
    assert set(ledger.read()) == {"a", "c"}
    ledger.set(done("d"))  # a later write does not bring it back
    assert set(ledger.read()) == {"a", "c", "d"}


@pytest.mark.parametrize("bad", [
    '{"item": "x", "state": "done",\n',  # an unfinished edit
    "12282a\n",  # neither JSON nor "- NAME"
    '{"item": "x", "state": "maybe"}\n',
    '{"state": "done"}\n',
    b"\xff\xfe\n",
])
def test_a_ledger_that_cannot_be_parsed_is_never_overwritten(tmp_path: Path,
                                                             bad: str | bytes) -> None:
    path = tmp_path / "ledger.jsonl"
    content = (b'{"item": "a", "state": "done"}\n' +
               (bad if isinstance(bad, bytes) else bad.encode()))
    path.write_bytes(content)
    ledger = Ledger(path)
    with pytest.raises(LedgerError) as info:
        ledger.read()
    assert "line 2" in info.value.message
    with pytest.raises(LedgerError):
        ledger.set(done("b"))
    assert path.read_bytes() == content


def test_a_name_that_is_not_utf8_round_trips(tmp_path: Path) -> None:
    name = os.fsdecode(b"bad-\xff")
    ledger = Ledger(tmp_path / "ledger.jsonl")
    ledger.set(Entry(name, UNMAPPED, reason="name is not UTF-8"))
    assert name in Ledger(ledger.path).read()
    ledger.path.read_text(encoding="utf-8")  # the file itself stays valid UTF-8


def _writer(path: str, worker: int, count: int) -> None:
    ledger = Ledger(Path(path))
    for i in range(count):
        ledger.set(done(f"w{worker}-{i}"))


def test_many_processes_updating_at_once_lose_nothing(tmp_path: Path) -> None:
    path = tmp_path / "ledger.jsonl"
    ctx = multiprocessing.get_context("fork")
    procs = [ctx.Process(target=_writer, args=(str(path), w, 25)) for w in range(8)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(60)
        assert p.exitcode == 0
    entries = Ledger(path).read()
    assert len(entries) == 8 * 25
    assert not [p for p in tmp_path.iterdir() if ".tmp." in p.name]


def test_a_temporary_file_of_a_dead_writer_is_removed_by_the_next_write(
        tmp_path: Path) -> None:
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"],
                          capture_output=True, text=True, check=True).stdout.strip()
    stale = tmp_path / f".ledger.jsonl.tmp.{dead}.1"
    stale.write_text('{"item": "half')
    Ledger(tmp_path / "ledger.jsonl").set(done("a"))
    assert not stale.exists()


# --------------------------------------------------------------------------- item locks


def test_an_item_lock_is_exclusive_and_removed_when_released(tmp_path: Path) -> None:
    first, second = ItemLock(tmp_path, b"12282a"), ItemLock(tmp_path, b"12282a")
    assert first.acquire()
    assert not second.acquire()  # even in the same process
    assert ItemLock(tmp_path, b"12283a").acquire()  # other items are independent
    first.release()
    assert not first.path.exists()
    assert second.acquire()
    second.release()


def test_an_item_locked_by_another_process_is_busy(tmp_path: Path) -> None:
    lock = ItemLock(tmp_path, b"-e touch PWNED")
    holder = subprocess.Popen(
        [sys.executable, "-c",
         "import fcntl, os, sys; fd = os.open(sys.argv[1], os.O_RDWR | os.O_CREAT);"
         " fcntl.flock(fd, fcntl.LOCK_EX); print('held', flush=True); sys.stdin.read()",
         str(lock.path)], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout is not None and holder.stdout.readline().strip() == "held"
        assert not lock.acquire()
    finally:
        holder.kill()
        holder.wait()
    assert lock.acquire()  # a dead holder's lock is free at once
    lock.release()
