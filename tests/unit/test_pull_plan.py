"""mstm.pull without a network: configuration, listing, names, mapping, planning, argv.

The end-to-end behaviour against a real sshd is in tests/integration/test_pull.py.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path

import pytest

from mstm import alert
from mstm.config import StreamConfig, load_stream
from mstm.errors import ConfigError
from mstm.log import MESSAGE_IDS
from mstm.pull import (
    FETCH,
    IGNORED,
    REFETCH,
    REFUSED,
    TOO_OLD,
    UNMAPPED_ITEM,
    UP_TO_DATE,
    ListingError,
    Mapper,
    Puller,
    RemoteItem,
    item_path,
    listing_argv,
    parse_listing,
    plan,
    refuse_name,
)
from mstm.pull.ledger import DONE, UNMAPPED, Entry, Ledger

Sections = dict[str, dict[str, str]]


def write_pull_stream(root: Path, **extra: dict[str, str]) -> Path:
    """A global file and a pull stream 'sync' under *root*; returns the global file."""
    (root / "spool").mkdir(exist_ok=True)
    (root / "dest").mkdir(exist_ok=True)
    sections: Sections = {
        "data_stream": {"directory": str(root / "dest"), "direction": "pull"},
        "outgoing": {"target_host": "sftp.synchrotron.example"},
        "pull": {"source_dir": "/data/epn",
                 "map": "\n  ^12282[a-z]$ -> ny79\n  ^1228 -> /scratch/other\n  ^13 -> ab12"},
    }
    for section, keys in extra.items():
        sections.setdefault(section, {}).update(keys)
    (root / "global.ini").write_text(
        f"[global]\ndata_stream_list = sync\nspool_base_dir = {root / 'spool'}\n")
    (root / "sync.ini").write_text("".join(
        f"[{s}]\n" + "".join(f"{k} = {v}\n" for k, v in keys.items()) + "\n"
        for s, keys in sections.items()))
    return root / "global.ini"


def pull_stream(root: Path, **extra: dict[str, str]) -> StreamConfig:
    return load_stream("sync", write_pull_stream(root, **extra))


def item(name: bytes | str, *, kind: str = "d", entries: int = 3, size: int = 100,
         mtime: float = 1_700_000_000.0) -> RemoteItem:
    raw = name if isinstance(name, bytes) else name.encode()
    return RemoteItem(raw=raw, kind=kind, entries=entries, bytes=size, mtime=mtime,
                      mtime_text=f"{mtime:.10f}")


# --------------------------------------------------------------------------- config


def test_a_pull_stream_needs_no_target_dir_and_defaults_to_mirror(tmp_path: Path) -> None:
    s = pull_stream(tmp_path)
    assert s.direction == "pull"
    assert (s.outgoing.target_host, s.outgoing.target_port) == ("sftp.synchrotron.example",
                                                                None)  # ssh config decides
    assert s.outgoing.transfer_mode == "mirror"
    assert s.pull.source_dir == "/data/epn"
    assert s.pull.map == (("^12282[a-z]$", "ny79"), ("^1228", "/scratch/other"),
                          ("^13", "ab12"))
    assert (s.pull.max_tasks, s.pull.max_age_days, s.pull.item_pattern) == (1, 0, "^[^.]")


def test_the_ledger_defaults_to_the_spool_directory(tmp_path: Path) -> None:
    s = pull_stream(tmp_path)
    assert s.pull.ledger == tmp_path / "spool" / "sync" / "ledger.jsonl"


def test_a_push_stream_is_unchanged_by_the_pull_keys(tmp_path: Path) -> None:
    s = pull_stream(tmp_path, data_stream={"direction": "push"},
                    outgoing={"target_dir": "/archive", "transfer_mode": "move"})
    assert (s.direction, s.outgoing.target_dir, s.outgoing.transfer_mode) == (
        "push", "/archive", "move")


@pytest.mark.parametrize(("extra", "key", "words"), [
    ({"pull": {"source_dir": ""}}, "source_dir", "required"),
    ({"pull": {"map": "\n  ^12282 ny79"}}, "map", "REGEX -> DESTINATION"),
    ({"pull": {"map": "\n  ^(12282 -> ny79"}}, "map", "regular expression"),
    ({"pull": {"map": "\n  ^12282 -> ../../etc"}}, "map", ".."),
    ({"pull": {"item_pattern": "[a-"}}, "item_pattern", "regular expression"),
    ({"pull": {"max_tasks": "0"}}, "max_tasks", "from 1 to 64"),
    ({"outgoing": {"transfer_mode": "move"}}, "transfer_mode", "not implemented"),
    ({"outgoing": {"target_host": ""}}, "target_host", "required"),
    ({"outgoing": {"transfer_protocol": "ftp"}}, "transfer_protocol", "rsync_ssh"),
])
def test_a_wrong_pull_setting_names_its_key(tmp_path: Path, extra: Sections, key: str,
                                            words: str) -> None:
    with pytest.raises(ConfigError) as info:
        pull_stream(tmp_path, **extra)
    assert info.value.key == key and words in info.value.reason, info.value.message


def test_a_pull_source_dir_must_be_absolute(tmp_path: Path) -> None:
    with pytest.raises(ConfigError) as info:
        pull_stream(tmp_path, pull={"source_dir": "data/epn"})
    assert info.value.key == "source_dir"


# --------------------------------------------------------------------------- listing


def listing(*records: tuple[bytes, bytes, bytes, bytes]) -> bytes:
    return b"".join(b"".join(f + b"\0" for f in rec) for rec in records)


def test_the_listing_gives_each_item_its_entries_bytes_and_newest_mtime() -> None:
    out = listing((b"12282a", b"d", b"100.5000000000", b"4096"),
                  (b"12282a/f1", b"f", b"200.2500000000", b"10"),
                  (b"12282a/sub", b"d", b"150.0000000000", b"4096"),
                  (b"12282a/sub/f2", b"f", b"120.0000000000", b"32"),
                  (b"plain.dat", b"f", b"50.0000000000", b"7"),
                  (b"link", b"l", b"60.0000000000", b"3"))
    items = {i.raw: i for i in parse_listing(out)}
    a = items[b"12282a"]
    assert (a.kind, a.entries, a.bytes, a.mtime_text) == ("d", 4, 42, "200.2500000000")
    assert a.signature == "entries=4 bytes=42 mtime=200.2500000000"
    assert (items[b"plain.dat"].kind, items[b"plain.dat"].bytes) == ("f", 7)
    assert items[b"link"].kind == "l"


def test_a_file_added_to_an_item_changes_its_signature() -> None:
    before = parse_listing(listing((b"x", b"d", b"100.0", b"4096"),
                                   (b"x/a", b"f", b"90.0", b"5")))[0]
    after = parse_listing(listing((b"x", b"d", b"100.0", b"4096"),
                                  (b"x/a", b"f", b"90.0", b"5"),
                                  (b"x/b", b"f", b"80.0", b"0")))[0]
    assert before.signature != after.signature


@pytest.mark.parametrize("out", [
    b"x\0d\0",  # not four fields
    b"x\0d\0soon\x004096\0",  # mtime not a number
    b"x\0d\x00100.0\0-1\0",  # size not a number
    b"\0d\x00100.0\x004096\0",  # empty path
])
def test_a_malformed_listing_is_rejected_whole(out: bytes) -> None:
    with pytest.raises(ListingError):
        parse_listing(out)


def test_the_listing_command_is_an_argv_with_nul_separated_fields() -> None:
    argv = listing_argv("/data/epn/")
    assert argv[:4] == ["env", "LC_ALL=C", "find", "-H"]
    assert argv[4] == "/data/epn/" and "%P\\0%y\\0%T@\\0%s\\0" in argv


# --------------------------------------------------------------------------- names


@pytest.mark.parametrize("raw", [
    b"", b".", b"..", b".hidden", b"..x", b"a/b", b"../etc", b"a\0b", b"new\nline",
    b"tab\there", b"esc\x1b[31m", b"del\x7f", b"\xff\xfe", b"x" * 256,
    "rtl\u202eevil".encode(),
])
def test_a_hostile_remote_name_is_refused(raw: bytes) -> None:
    assert refuse_name(raw) is not None
    with pytest.raises(ValueError):
        item_path(Path("/scratch/ny79"), raw)


@pytest.mark.parametrize("raw", [
    b"12282a", b"-e touch PWNED", b"--rsh=sh", b"with space", b"star*[1]?",
    "ünïcødé-日本".encode(), b"x" * 255, b"quote'\"s",
])
def test_a_safe_remote_name_lands_directly_inside_its_folder(raw: bytes) -> None:
    assert refuse_name(raw) is None
    path = item_path(Path("/scratch/ny79"), raw)
    assert path.parent == Path("/scratch/ny79") and os.fsencode(path.name) == raw


def test_crafted_listing_paths_cannot_name_an_item_outside_source_dir() -> None:
    out = listing((b"../evil", b"d", b"1.0", b"0"), (b"/etc/passwd", b"f", b"1.0", b"1"),
                  (b"./x", b"d", b"1.0", b"0"))
    for it in parse_listing(out):
        assert refuse_name(it.raw) is not None, it.raw


# --------------------------------------------------------------------------- mapping


def test_map_rules_are_tried_in_order_and_the_first_match_wins() -> None:
    m = Mapper([("^12282[a-z]$", "ny79"), ("^1228", "/scratch/other"), ("^13", "ab/12")],
               Path("/scratch"))
    assert m.folder("12282a") == Path("/scratch/ny79")
    assert m.folder("12283b") == Path("/scratch/other")
    assert m.folder("13001c") == Path("/scratch/ab/12")
    assert m.folder("99999z") is None


def test_without_map_rules_every_item_goes_into_the_destination_root() -> None:
    assert Mapper([], Path("/scratch")).folder("anything") == Path("/scratch")


# --------------------------------------------------------------------------- planning


def actions(planned: list) -> dict[str, str]:  # type: ignore[type-arg]
    return {p.item.name: p.action for p in planned}


def test_the_plan_says_what_happens_to_each_item(tmp_path: Path) -> None:
    s = pull_stream(tmp_path, pull={"max_age_days": "10"})
    now = 1_700_000_000.0
    items = [item("12282a", mtime=now), item("12282b", mtime=now), item("12283c", mtime=now),
             item("13001a", mtime=now - 11 * 86400), item("99999z", mtime=now),
             item(".partial", mtime=now), item("sym", kind="l", mtime=now),
             item(b"bad\nname", mtime=now), item("13002a", mtime=now)]
    ledger = {
        "12282b": Entry("12282b", DONE, signature=items[1].signature),
        "12283c": Entry("12283c", DONE, signature="entries=1 bytes=0 mtime=1.0"),
        "13002a": Entry("13002a", DONE, signature=None),  # "- 13002a": done for good
    }
    got = actions(plan(s, items, ledger, now=now))
    assert got == {"12282a": FETCH, "12282b": UP_TO_DATE, "12283c": REFETCH,
                   "13001a": TOO_OLD, "99999z": UNMAPPED_ITEM, ".partial": IGNORED,
                   "sym": REFUSED, "bad\nname": REFUSED, "13002a": UP_TO_DATE}


def test_the_plan_places_each_item_by_the_map_rules(tmp_path: Path) -> None:
    s = pull_stream(tmp_path)
    by_name = {p.item.name: p for p in plan(s, [item("12282a"), item("12283b"),
                                                 item("13001c")], {})}
    assert by_name["12282a"].target == tmp_path / "dest" / "ny79" / "12282a"
    assert by_name["12283b"].target == Path("/scratch/other/12283b")
    assert by_name["13001c"].target == tmp_path / "dest" / "ab12" / "13001c"


def test_an_unmapped_item_already_in_the_ledger_is_marked_as_reported(tmp_path: Path) -> None:
    s = pull_stream(tmp_path)
    ledger = {"99999z": Entry("99999z", UNMAPPED, reason="no rule")}
    (p,) = plan(s, [item("99999z")], ledger)
    assert (p.action, p.reported) == (UNMAPPED_ITEM, True)


def test_an_item_once_unmapped_is_fetched_when_a_rule_for_it_appears(tmp_path: Path) -> None:
    s = pull_stream(tmp_path, pull={"map": "\n  ^9 -> late"})
    (p,) = plan(s, [item("99999z")], {"99999z": Entry("99999z", UNMAPPED, reason="x")})
    assert p.action == FETCH and p.target == tmp_path / "dest" / "late" / "99999z"


# --------------------------------------------------------------------------- rsync argv


def test_rsync_gets_names_on_stdin_checksums_to_verify_and_a_stall_timeout(
        tmp_path: Path) -> None:
    s = pull_stream(tmp_path, outgoing={"stall_seconds": "45", "bwlimit": "500"})
    puller = Puller(s, execute=True)
    puller.conn._dir = str(tmp_path)  # as if open: the control path is named in -e
    fetch = puller.rsync_argv(tmp_path / "dest" / "ny79", verify=False, checksum=False)
    verify = puller.rsync_argv(tmp_path / "dest" / "ny79", verify=True, checksum=True)
    for argv in (fetch, verify):
        assert {"--secluded-args", "--from0", "--files-from=-", "--timeout=45",
                "--partial-dir=.mstm-partial"} <= set(argv)
        assert "--size-only" not in argv and "--delete" not in argv
        assert argv[-3:] == ["--", "sftp.synchrotron.example:/data/epn/",
                             f"{tmp_path}/dest/ny79/"]
        rsh = argv[argv.index("--rsh") + 1]
        assert "ConnectTimeout=" in rsh and "ServerAliveInterval=" in rsh
    assert "--bwlimit=500" in fetch and "--checksum" not in fetch
    assert {"--dry-run", "--checksum"} <= set(verify)


# --------------------------------------------------------------------------- reporting


def test_an_unmapped_item_is_reported_once_as_a_warning_event(
        tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    s = pull_stream(tmp_path)
    puller = Puller(s, execute=True)
    caplog.set_level(logging.INFO, logger="mstm")
    for _cycle in range(2):
        from mstm.pull import CycleReport

        report = CycleReport(s.name, True, puller.source)
        report.items = plan(s, [item("99999z"), item("12282a")], puller.ledger.read())
        puller._report_unmapped(report)
    events = [r for r in caplog.records if getattr(r, "mstm_event", None) == "unmapped"]
    assert len(events) == 1
    (rec,) = events
    assert rec.levelno == logging.WARNING
    assert getattr(rec, "mstm_fields", {}) == {"stream": "sync", "item": "99999z",
                                               "reason": "no [pull] map rule matches",
                                               "peer": "sftp.synchrotron.example",
                                               "result": "unmapped"}
    assert Ledger(s.pull.ledger or Path()).read()["99999z"].state == UNMAPPED
    assert "unmapped" in MESSAGE_IDS


def test_the_unmapped_event_is_mailed_when_the_threshold_is_warning() -> None:
    entry = {"MESSAGE": "sync: 99999z is not fetched: no [pull] map rule matches",
             "PRIORITY": "4", "SYSLOG_IDENTIFIER": "mstm-send", "MSTM_STREAM": "sync",
             "MSTM_ITEM": "99999z", "MSTM_EVENT": "unmapped",
             "MESSAGE_ID": MESSAGE_IDS["unmapped"]}
    a = alert.from_entry(entry)
    assert alert.is_mstm(entry)
    assert a.priority <= alert.threshold_priority("WARNING")
    assert (a.event, a.item, a.stream) == ("unmapped", "99999z", "sync")


# --------------------------------------------------------------------------- when it acts


@pytest.mark.parametrize(("execute", "journal", "acts"), [
    (None, False, False),  # the command line: a dry run, like mxsync
    (True, False, True),  # --execute
    (None, True, True),  # under systemd (mstm-send-once@.timer): acts
    (False, True, False),  # --dry-run wins even there
])
def test_a_once_run_acts_only_with_execute_or_under_systemd(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch, execute: bool | None, journal: bool,
        acts: bool) -> None:
    from mstm import pull

    s = pull_stream(tmp_path)
    seen: list[bool] = []

    def cycle(self: Puller) -> pull.CycleReport:
        seen.append(self.execute)
        return pull.CycleReport(s.name, self.execute, self.source)

    monkeypatch.setattr(pull.Puller, "cycle", cycle)
    monkeypatch.setattr(pull.command, "under_journal", lambda: journal)
    out: list[str] = []
    code = pull.run_command(s, follow=False, execute=execute, as_json=False,
                            show_status=False, echo=out.append)
    assert (code, seen) == (0, [acts])
    assert ("dry run" in "".join(out)) is not acts


def test_follow_with_dry_run_is_a_usage_error(tmp_path: Path) -> None:
    from mstm import pull
    from mstm.errors import EXIT_USAGE, MstmError

    with pytest.raises(MstmError) as info:
        pull.run_command(pull_stream(tmp_path), follow=True, execute=False, as_json=False,
                         show_status=False)
    assert info.value.exit_code == EXIT_USAGE
