"""mstm-alert without a journal or a mail server: parsing events, de-duplication, batches
over email_timer, the cursor, the outbox and its backoff, templates, passwords, OnFailure
content.  A fake journal and a fake clock make the timing exact; the fake mail server
only records what it was given."""

from __future__ import annotations

import logging
from collections.abc import Mapping
from dataclasses import replace
from email import message_from_bytes, policy
from email.message import EmailMessage
from pathlib import Path
from typing import Any
from uuid import UUID

import pytest
from click.testing import CliRunner

from mstm.alert import (
    MAX_GROUPS,
    Alert,
    Batch,
    CursorStore,
    Follower,
    Postman,
    Templates,
    compose,
    dedup_key,
    failure_context,
    from_entry,
    from_line,
    is_mstm,
    threshold_priority,
)
from mstm.alert.mailer import Mailer, MailError, read_password
from mstm.cli.alert import main as alert_main
from mstm.config import GlobalConfig, load_global
from mstm.errors import ConfigError

# --------------------------------------------------------------------------- fakes


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


class FakeJournal:
    """Entries that appear at given times; cursors are "c<n>"."""

    def __init__(self, clock: Clock) -> None:
        self.clock = clock
        self.entries: list[tuple[float, dict[str, Any]]] = []

    def log(self, at: float, message: str, *, priority: int = 3, ident: str = "mstm-send",
            **fields: str) -> None:
        entry = {"MESSAGE": message, "PRIORITY": priority, "SYSLOG_IDENTIFIER": ident,
                 "__CURSOR": f"c{len(self.entries)}", **fields}
        self.entries.append((self.clock.now + at, entry))

    def source(self, cursor: str | None) -> FakeSource:
        return FakeSource(self, int(cursor[1:]) + 1 if cursor else len(self.visible()))

    def visible(self) -> list[dict[str, Any]]:
        return [e for t, e in self.entries if t <= self.clock.now]


class FakeSource:
    def __init__(self, journal: FakeJournal, position: int) -> None:
        self.journal = journal
        self.position = position

    def wait(self, timeout: float) -> None:
        self.journal.clock.now += max(timeout, 0.01)

    def read(self) -> list[tuple[str, Mapping[str, Any]]]:
        new = self.journal.visible()[self.position:]
        self.position += len(new)
        return [(e["__CURSOR"], e) for e in new]


class FakeMailer(Mailer):
    """Records what it is asked to send; `down` makes it fail like a dead server."""

    def __init__(self, gcfg: GlobalConfig) -> None:
        super().__init__(gcfg.email)
        self.down = False
        self.refuse: set[str] = set()
        self.sent: list[tuple[str, EmailMessage]] = []
        self.connections = 0

    def send(self, messages: list[tuple[str, str, bytes]]) -> list[MailError | None]:
        self.connections += 1
        if self.down:
            raise MailError("Connection refused")
        results: list[MailError | None] = []
        for _sender, to, raw in messages:
            if to in self.refuse:
                results.append(MailError("550 no such user", permanent=True))
                continue
            msg = message_from_bytes(raw, policy=policy.default)
            assert isinstance(msg, EmailMessage)
            self.sent.append((to, msg))
            results.append(None)
        return results

    def texts(self) -> list[str]:
        out = []
        for _, m in self.sent:
            body = m.get_body(("plain",))
            assert body is not None
            out.append(str(body.get_content()))
        return out


@pytest.fixture(autouse=True)
def _no_env(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in ("MSTM_CONFIG", "CREDENTIALS_DIRECTORY", "STATE_DIRECTORY", "NOTIFY_SOCKET"):
        monkeypatch.delenv(name, raising=False)


def write_config(tmp_path: Path, **email: str) -> Path:
    settings = {"recipient": "ops@example.org, boss@example.org",
                "state_dir": str(tmp_path / "state"), "threshold": "WARNING", **email}
    g = tmp_path / "global.ini"
    g.write_text("[global]\ndata_stream_list =\n[email]\n"
                 + "".join(f"{k} = {v}\n" for k, v in settings.items())
                 + "[logging]\nemail_timer = 10\n")
    return g


@pytest.fixture
def gcfg(tmp_path: Path) -> GlobalConfig:
    return load_global(write_config(tmp_path))


class Rig:
    """A follower on a fake journal, with a fake clock and a fake mail server."""

    def __init__(self, gcfg: GlobalConfig) -> None:
        self.gcfg = gcfg
        self.clock = Clock()
        self.journal = FakeJournal(self.clock)
        self.mailer = FakeMailer(gcfg)
        self.cursors = CursorStore(gcfg.email.state_dir)  # type: ignore[arg-type]
        self.start()

    def start(self) -> None:
        self.postman = Postman(self.gcfg, self.mailer, clock=self.clock)
        self.follower = Follower(self.gcfg, self.postman,
                                 self.journal.source(self.cursors.load()), self.cursors,
                                 clock=self.clock)

    def run_until(self, t: float) -> None:
        end = self.clock.now + t
        while self.clock.now < end:
            self.follower.step(min(self.follower._timeout(), end - self.clock.now))


@pytest.fixture
def rig(gcfg: GlobalConfig) -> Rig:
    return Rig(gcfg)


# --------------------------------------------------------------------------- events


def test_threshold_level_names_map_to_syslog_priorities() -> None:
    assert [threshold_priority(x) for x in ("DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL")] \
        == [7, 6, 4, 3, 2]


def test_a_python_systemd_entry_becomes_an_alert_with_its_mstm_fields() -> None:
    from datetime import UTC, datetime
    a = from_entry({"MESSAGE": "x failed", "PRIORITY": 3, "SYSLOG_IDENTIFIER": "mstm-send",
                    "__REALTIME_TIMESTAMP": datetime(2024, 5, 1, tzinfo=UTC),
                    "MESSAGE_ID": UUID("6d1c2b8e0c8a4a5e9f1d7c3b2a190002"),
                    "MSTM_STREAM": "proj1", "MSTM_ITEM": "a/x", "MSTM_EVENT": "failed",
                    "_SYSTEMD_UNIT": "mstm-stream@proj1.service", "_HOSTNAME": "h"})
    assert (a.priority, a.identifier, a.stream, a.item, a.event, a.unit, a.host) == (
        3, "mstm-send", "proj1", "a/x", "failed", "mstm-stream@proj1.service", "h")
    assert a.message_id == "6d1c2b8e0c8a4a5e9f1d7c3b2a190002"
    assert a.time == datetime(2024, 5, 1, tzinfo=UTC).timestamp()


def test_stdin_takes_journalctl_json_simple_json_and_plain_log_lines() -> None:
    j = from_line('{"MESSAGE": "m", "PRIORITY": "4", "SYSLOG_IDENTIFIER": "mstm-scan",'
                  ' "__REALTIME_TIMESTAMP": "1700000000000000", "MSTM_STREAM": "p"}')
    assert j is not None and (j.priority, j.identifier, j.stream, j.time) == (
        4, "mstm-scan", "p", 1_700_000_000.0)
    s = from_line('{"message": "disk full", "level": "critical", "stream": "p2"}')
    assert s is not None and (s.priority, s.message, s.stream) == (2, "disk full", "p2")
    p = from_line("mstm-send: error: proj1: target unreachable")
    assert p is not None and (p.priority, p.identifier, p.message) == (
        3, "mstm-send", "proj1: target unreachable")
    info = from_line("mstm-send: proj1: 3 delivered")
    assert info is not None and info.priority == 6
    assert from_line("   ") is None


def test_only_mstm_entries_count_and_mstm_alerts_own_never_do() -> None:
    assert is_mstm({"SYSLOG_IDENTIFIER": "mstm-send"})
    assert is_mstm({"SYSLOG_IDENTIFIER": "python3", "MSTM_STREAM": "p"})
    assert is_mstm({"SYSLOG_IDENTIFIER": "systemd", "UNIT": "mstm-stream@p.service"})
    assert not is_mstm({"SYSLOG_IDENTIFIER": "sshd"})
    assert not is_mstm({"SYSLOG_IDENTIFIER": "mstm-alert", "MSTM_STREAM": "p"})
    assert not is_mstm({"SYSLOG_IDENTIFIER": "systemd", "UNIT": "mstm-alert@x.service"})


def test_alike_events_differ_only_in_the_item_name_and_numbers() -> None:
    a = Alert(0, 3, "delivery of a/1.dat failed after 3 attempts", "mstm-send",
              stream="p", item="a/1.dat", event="failed")
    b = replace(a, message="delivery of b/zz.dat failed after 4 attempts", item="b/zz.dat")
    c = replace(a, message="delivery of a/1.dat failed: disk full")
    assert dedup_key(a) == dedup_key(b) != dedup_key(c)
    assert dedup_key(a) != dedup_key(replace(a, stream="q"))


def test_a_batch_shows_each_kind_once_with_how_many_more_like_this_and_their_items() -> None:
    batch = Batch()
    for i in range(48):
        batch.add(Alert(i, 3, f"delivery of f{i} failed", "mstm-send", stream="p",
                        item=f"f{i}", event="failed"))
    batch.add(Alert(99, 2, "disk full", "mstm-diskwatch"))
    groups = batch.ordered()
    assert [g.first.message for g in groups] == ["disk full", "delivery of f0 failed"]
    failed = groups[1]
    assert (failed.count, failed.more, failed.items[:2], failed.more_items) == (
        48, 47, ["f0", "f1"], 38)
    assert batch.total == 49


def test_a_batch_counts_but_does_not_list_more_than_max_groups_kinds() -> None:
    batch = Batch()
    for i in range(MAX_GROUPS + 5):
        batch.add(Alert(i, 3, f"problem {chr(65 + i % 26)}{'x' * (i // 26)}", "mstm-send"))
    assert (len(batch.groups), batch.overflow, batch.total) == (MAX_GROUPS, 5, MAX_GROUPS + 5)


def test_unmapped_items_with_a_different_reason_on_every_line_never_grow_without_bound(
        ) -> None:
    """On the --stdin path a reason is any text a line holds: the named kind has room of
    its own beyond MAX_GROUPS, not a group per line; and the names kept to count each item
    once are bounded."""
    from mstm.alert.batch import MAX_NAMED_GROUPS, MAX_SEEN

    batch = Batch()
    for i in range(MAX_GROUPS + MAX_NAMED_GROUPS + 50):
        why = f"{chr(65 + i % 26)}{chr(65 + i // 26 % 26)}"  # (numbers count as alike)
        batch.add(Alert(i, 4, f"x{i} is not fetched: reason {why}", "mstm-send", stream="p",
                        item=f"x{i}", event="unmapped"))
    assert len(batch.groups) == MAX_GROUPS + MAX_NAMED_GROUPS and batch.overflow == 50
    one = Batch()
    for i in range(MAX_SEEN + 500):
        one.add(Alert(i, 4, "not fetched", "mstm-send", stream="p", item=f"item {i}",
                      event="unmapped"))
    [g] = one.groups.values()
    assert len(g.seen) == MAX_SEEN and len(g.items) == 1000
    assert len(g.items) + g.more_items == MAX_SEEN + 500  # every item still counted


# --------------------------------------------------------------------------- following


def test_events_within_email_timer_become_one_mail_per_recipient(rig: Rig) -> None:
    rig.journal.log(1, "first problem", MSTM_STREAM="p")
    rig.journal.log(5, "second problem", MSTM_STREAM="p")
    rig.journal.log(20, "third problem", MSTM_STREAM="p")
    rig.run_until(10.5)
    assert rig.mailer.sent == []  # the batch opened at 1 s closes at 11 s
    rig.run_until(1)
    assert [to for to, _ in rig.mailer.sent] == ["ops@example.org", "boss@example.org"]
    text = rig.mailer.texts()[0]
    assert "first problem" in text and "second problem" in text and "third" not in text
    rig.run_until(20)
    assert len(rig.mailer.sent) == 4 and "third problem" in rig.mailer.texts()[2]


def test_only_mstm_events_at_or_above_the_threshold_are_mailed(rig: Rig) -> None:
    rig.journal.log(0, "just info", priority=6)
    rig.journal.log(0, "a notice", priority=5)
    rig.journal.log(0, "a warning", priority=4)
    rig.journal.log(0, "an error elsewhere", priority=3, ident="sshd")
    rig.run_until(30)
    text = rig.mailer.texts()[0]
    assert "a warning" in text
    assert "just info" not in text and "a notice" not in text and "elsewhere" not in text


def test_repeats_are_mailed_once_with_how_many_more_like_this(rig: Rig) -> None:
    for i in range(48):
        rig.journal.log(0.1 * i, f"delivery of d/{i}.dat failed: refused", MSTM_STREAM="p",
                        MSTM_ITEM=f"d/{i}.dat", MSTM_EVENT="failed")
    rig.run_until(30)
    text = rig.mailer.texts()[0]
    assert text.count("failed: refused") == 1
    assert "47 more like this" in text and "d/0.dat, d/1.dat" in text


def test_the_cursor_is_saved_only_after_the_batch_is_safe_in_the_outbox(rig: Rig) -> None:
    rig.mailer.down = True
    rig.journal.log(1, "a problem")
    rig.run_until(6)
    assert rig.cursors.load() is None  # the open batch is not in the outbox yet
    rig.run_until(10)
    assert rig.postman.waiting == 2  # one per recipient, kept although the server is down
    assert rig.cursors.load() == "c0"


def test_after_a_restart_nothing_is_mailed_twice_and_nothing_is_skipped(rig: Rig) -> None:
    rig.journal.log(1, "before the restart")
    rig.run_until(15)
    assert len(rig.mailer.sent) == 2
    rig.journal.log(1, "while an open batch was lost")
    rig.run_until(5)  # the batch opened but was not closed: the process "dies" here
    rig.journal.log(1, "while it was down")
    rig.start()
    rig.run_until(30)
    texts = rig.mailer.texts()
    assert len(texts) == 4
    assert "before the restart" not in texts[2]
    assert "while an open batch was lost" in texts[2] and "while it was down" in texts[2]


def test_a_mail_server_that_is_down_means_later_with_growing_backoff_not_lost(
        rig: Rig) -> None:
    rig.mailer.down = True
    rig.journal.log(0, "server down problem")
    rig.run_until(11)
    attempts = [rig.mailer.connections]
    for _ in range(4):
        rig.run_until(8)
        attempts.append(rig.mailer.connections)
    # first try at 10 s, then after 10, 20, 40 s: backoff doubles from email_timer
    assert attempts == [1, 1, 2, 2, 3], attempts
    rig.mailer.down = False
    rig.run_until(60)
    assert [to for to, _ in rig.mailer.sent] == ["ops@example.org", "boss@example.org"]
    assert rig.postman.waiting == 0 and rig.postman.delay == rig.postman.initial_delay


def test_a_recipient_refused_for_good_is_set_aside_and_the_others_still_get_mail(
        rig: Rig, caplog: pytest.LogCaptureFixture) -> None:
    rig.mailer.refuse = {"boss@example.org"}
    rig.journal.log(0, "a problem")
    with caplog.at_level(logging.ERROR, logger="mstm"):
        rig.run_until(15)
    assert [to for to, _ in rig.mailer.sent] == ["ops@example.org"]
    assert rig.postman.waiting == 0
    rejected = rig.postman.outbox.rejected_dir
    assert len(list(rejected.glob("*.json"))) == 1
    assert "550 no such user" in caplog.text


# --------------------------------------------------------------------------- messages


def test_an_admins_template_replaces_the_built_in_one_and_a_broken_one_falls_back(
        tmp_path: Path, gcfg: GlobalConfig, caplog: pytest.LogCaptureFixture) -> None:
    tdir = tmp_path / "templates"
    tdir.mkdir()
    (tdir / "alert.subject").write_text("[ACME] {{ total }} from {{ host }}")
    (tdir / "alert.txt").write_text("{% for g in groups %}{{ g.first.message }}{% endfor")
    batch = Batch()
    batch.add(Alert(1_700_000_000, 3, "boom", "mstm-send"))
    from mstm.alert import alert_context
    with caplog.at_level(logging.ERROR, logger="mstm"):
        msg = compose(Templates(tdir), "alert", alert_context(batch, gcfg.email, gcfg.path),
                      "mstm@h", "ops@example.org")
    assert str(msg["Subject"]).startswith("[ACME] 1 from ")
    body = msg.get_body(("plain",))
    assert body is not None and "boom" in body.get_content()
    assert "alert.txt in template_dir is broken" in caplog.text


def test_the_html_part_escapes_what_events_say(gcfg: GlobalConfig) -> None:
    batch = Batch()
    batch.add(Alert(1_700_000_000, 3, "<script>alert(1)</script> & co", "mstm-send"))
    from mstm.alert import alert_context
    msg = compose(Templates(None), "alert", alert_context(batch, gcfg.email, gcfg.path),
                  "mstm@h", "ops@example.org")
    html = msg.get_body(("html",))
    assert html is not None
    content = html.get_content()
    assert "&lt;script&gt;alert(1)&lt;/script&gt; &amp; co" in content
    assert "<script>" not in content


def test_the_failure_mail_names_the_unit_its_result_and_its_last_lines(
        gcfg: GlobalConfig) -> None:
    from mstm.alert import UnitState
    asked = []

    def lines(unit: str, inv: str | None, count: int) -> list[Alert]:
        asked.append((unit, inv, count))
        return [Alert(1_700_000_000, 6, "starting", "mstm-send"),
                Alert(1_700_000_001, 3, "the last words", "mstm-send")]

    ctx = failure_context("mstm-stream@p.service", gcfg, 50,
                          UnitState("abc123", "exit-code", "3"), lines)
    assert asked == [("mstm-stream@p.service", "abc123", 50)]
    msg = compose(Templates(None), "failure", ctx, "mstm@h", "ops@example.org")
    assert str(msg["Subject"]).startswith("mstm alert: mstm-stream@p.service failed on ")
    text = msg.get_body(("plain",)).get_content()  # type: ignore[union-attr]
    assert "(result: exit-code, exit status 3)" in text
    assert "mstm-send[ERROR]: the last words" in text
    assert "journalctl -u mstm-stream@p.service _SYSTEMD_INVOCATION_ID=abc123" in text


def test_without_an_invocation_id_from_systemctl_the_journals_newest_is_used(
        gcfg: GlobalConfig) -> None:
    from mstm.alert import UnitState
    ctx = failure_context("u.service", gcfg, 5, UnitState(), lambda u, i, n: [],
                          lambda u: "fromjournal")
    assert ctx["invocation_id"] == "fromjournal"


# --------------------------------------------------------------------------- passwords


def test_the_password_comes_from_the_systemd_credential_before_password_file(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    pw_file = tmp_path / "pw"
    pw_file.write_text("from-file\n")
    creds = tmp_path / "creds"
    creds.mkdir()
    g = load_global(write_config(tmp_path, username="mstm", password_file=str(pw_file)))
    assert read_password(g.email) == "from-file"
    monkeypatch.setenv("CREDENTIALS_DIRECTORY", str(creds))
    assert read_password(g.email) == "from-file"  # no such credential loaded: the file
    (creds / "smtp-password").write_text("from-credential\n")
    assert read_password(g.email) == "from-credential"
    assert "from-credential" not in repr(Mailer.from_config(g.email))


def test_a_username_without_any_password_is_a_configuration_error(tmp_path: Path) -> None:
    g = load_global(write_config(tmp_path, username="mstm"))
    with pytest.raises(ConfigError, match="no password"):
        Mailer.from_config(g.email)
    empty = tmp_path / "empty"
    empty.write_text("\n")
    g = load_global(write_config(tmp_path, username="mstm", password_file=str(empty)))
    with pytest.raises(ConfigError, match="is empty"):
        Mailer.from_config(g.email)


# --------------------------------------------------------------------------- command line


def test_exactly_one_of_unit_follow_stdin_check_is_required(tmp_path: Path) -> None:
    g = write_config(tmp_path)
    r = CliRunner().invoke(alert_main, ["--config", str(g)])
    assert r.exit_code == 2 and "exactly one of" in r.output
    r = CliRunner().invoke(alert_main, ["--config", str(g), "--follow", "--stdin"])
    assert r.exit_code == 2 and "got --follow, --stdin" in r.output


def test_a_failed_unit_with_nobody_to_tell_is_logged_and_exits_0(tmp_path: Path) -> None:
    g = write_config(tmp_path, recipient="")
    r = CliRunner().invoke(alert_main, ["--config", str(g), "x.service"])
    assert r.exit_code == 0 and "nobody is told" in r.output


def test_stdin_dry_run_prints_the_messages_and_sends_nothing(tmp_path: Path) -> None:
    g = write_config(tmp_path)
    r = CliRunner().invoke(alert_main, ["--config", str(g), "--stdin", "--dry-run"],
                           input="mstm-send: error: proj1: broken\nmstm-send: fine\n")
    assert r.exit_code == 0, r.output
    assert r.stdout.count("Subject: mstm alert: 1 alert from ") == 2
    assert "proj1: broken" in r.stdout and "fine" not in r.stdout
    assert not (tmp_path / "state" / "outbox").exists()
