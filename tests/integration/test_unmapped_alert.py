"""The mail about unmapped pull items names every item, on both of mstm-alert's paths.

HPC ASSyncy had a program of its own, epnalert, only to mail the experiments that map to
no project, by name.  mstm-alert gathered the pull stream's warnings like any others:
on the ``--stdin`` path eight unmapped items became "14000a ... and 4 more like this"
plus three more groups, and no name but the first.  Here a real pull stream (real sshd,
real rsync) lists eight unmapped items whose names hold spaces and non-ASCII letters;
its warnings reach the real SMTP server of test_alert_smtp.py (aiosmtpd) through
``mstm-send ... 2>&1 | mstm-alert --stdin`` and through ``mstm-alert --follow`` reading a
real journald (in a private mount namespace, as test_alert_smtp.py does).
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
from tests.conftest import need, need_root
from tests.harness.sshd import SSHD, LoopbackSshd
from tests.harness.streams import StreamEnv
from tests.integration import test_alert_smtp as smtp
from tests.integration.test_alert_smtp import (
    INSIDE,
    JOURNALD,
    ROOT,
    Follow,
    Inbox,
    alert,
    configure,
    html_of,
    journal_stream,
    text_of,
)

pytestmark = pytest.mark.integration

# the SMTP server, the private journald and the --follow processes of test_alert_smtp.py
inbox, journald, follows = smtp.inbox, smtp.journald, smtp.follows

UNMAPPED = ["14000a", "14001a", "14002a", "14003a", "14004a", "15000b with space",
            "épn-ünïcødé 日本", "99999z"]
MAPPED = "20000a"


def pull_stream(root: Path, sshd: LoopbackSshd) -> StreamEnv:
    """A pull stream whose remote side holds the eight unmapped items and one mapped."""
    remote = root / "remote"
    for name in [*UNMAPPED, MAPPED]:
        (remote / name).mkdir(parents=True)
        (remote / name / "frame 0001.img").write_bytes(os.urandom(300))
    env = StreamEnv.create(root, sshd, name="sync")
    env.configure(data_stream={"directory": str(env.target), "direction": "pull"},
                  outgoing={"transfer_mode": "mirror"},
                  pull={"source_dir": str(remote), "map": "\n    ^2 -> ny79"})
    return env


def assert_every_name_in(text: str, html: str) -> None:
    for name in UNMAPPED:
        assert text.count(name) >= 1, (name, text)
        assert f"<code>{name}</code>" in html, (name, html)
    assert "8 items (no [pull] map rule matches), every one named here" in text


def test_stdin_a_pull_runs_output_piped_to_mstm_alert_names_every_unmapped_item(
        tmp_path: Path, sshd: LoopbackSshd, inbox: Inbox) -> None:
    env = pull_stream(tmp_path / "stream", sshd)
    run = env.run("mstm-send", "--once", "--execute")
    assert run.returncode == 0, run.stderr
    assert (env.target / "ny79" / MAPPED / "frame 0001.img").exists()
    for name in UNMAPPED:
        assert f"{name} is not fetched" in run.stderr

    g = configure(tmp_path / "mail", inbox.port)
    r = alert(g, "--stdin", stdin=run.stderr)  # as in: mstm-send ... 2>&1 | mstm-alert --stdin

    assert r.returncode == 0, r.stderr
    (mail,) = inbox.wait(1)
    text = text_of(mail)
    assert_every_name_in(text, html_of(mail))
    assert "more like this" not in text
    assert "(sync)" in mail["Subject"]


def test_stdin_other_alike_events_are_still_folded_into_more_like_this(
        tmp_path: Path, inbox: Inbox) -> None:
    lines = [f"mstm-send: error: proj1: failed run/{i}.dat after 3 attempt(s): bad checksum"
             for i in range(20)]
    lines += [f"mstm-send: warn: sync: {n} is not fetched: no [pull] map rule matches"
              for n in UNMAPPED]
    r = alert(configure(tmp_path, inbox.port), "--stdin", stdin="\n".join(lines) + "\n")
    assert r.returncode == 0, r.stderr
    (mail,) = inbox.wait(1)
    text = text_of(mail)
    assert text.count("bad checksum") == 1 and "19 more like this" in text
    assert_every_name_in(text, html_of(mail))


def test_thousands_of_unmapped_items_name_the_first_thousand_then_count_the_rest(
        tmp_path: Path, inbox: Inbox) -> None:
    lines = [f"mstm-send: warn: sync: {30000 + i}a is not fetched: no [pull] map rule matches"
             for i in range(1500)]
    r = alert(configure(tmp_path, inbox.port), "--stdin", stdin="\n".join(lines) + "\n")
    assert r.returncode == 0, r.stderr
    (mail,) = inbox.wait(1)
    text = text_of(mail).replace("\r\n", "\n")
    assert "1500 items (no [pull] map rule matches), the first 1000 named here" in text
    assert "\n    30999a\n" in text and "31000a" not in text.replace(
        "30000a is not fetched", "")
    assert "... and 500 more, not listed here" in text


# --------------------------------------------------------------------------- the journal


def test_follow_names_every_unmapped_item_under_a_real_journald() -> None:
    need_root()
    for program in ("unshare", "mount", "journalctl", JOURNALD, SSHD, "rsync", "ssh"):
        need(program)
    env = {**os.environ, INSIDE: "1", "PYTHONDONTWRITEBYTECODE": "1"}
    argv = ["unshare", "--mount", "--propagation", "private", sys.executable, "-m", "pytest",
            "-v", "-p", "no:cacheprovider", "-o", "addopts=", "-o", "python_functions=scenario_*",
            "--rootdir", str(ROOT), __file__]
    r = subprocess.run(argv, cwd=ROOT, env=env, capture_output=True, text=True, timeout=180)
    print(r.stdout, r.stderr)
    assert r.returncode == 0, r.stdout + r.stderr
    assert " 1 passed" in r.stdout, r.stdout


def scenario_a_pull_logging_to_the_journal_gets_every_unmapped_item_named_by_follow(
        journald: None, tmp_path: Path, inbox: Inbox, follows: list[Follow],
        sshd: LoopbackSshd) -> None:
    env = pull_stream(tmp_path / "stream", sshd)
    g = configure(tmp_path / "mail", inbox.port, email_timer=1.5)
    follows.append(Follow(g, tmp_path))
    stream = journal_stream("mstm-send")  # as systemd gives a service its stderr
    st = os.fstat(stream.fileno())
    run_env = {k: v for k, v in os.environ.items() if k not in ("NOTIFY_SOCKET", INSIDE)}
    run_env["JOURNAL_STREAM"] = f"{st.st_dev}:{st.st_ino}"
    run = subprocess.run(env.command("mstm-send", "--once", "--execute"), env=run_env,
                         stdout=subprocess.DEVNULL, stderr=stream.fileno(), timeout=120)
    stream.close()
    assert run.returncode == 0
    (mail,) = inbox.wait(1, timeout=30)
    assert_every_name_in(text_of(mail), html_of(mail))
    fields = subprocess.run(["journalctl", "--no-pager", "-o", "json", "MSTM_EVENT=unmapped"],
                            capture_output=True, text=True, check=True).stdout
    assert fields.count('"MSTM_EVENT":"unmapped"') == len(UNMAPPED)  # native, with fields
    assert follows[0].stop() == 0
