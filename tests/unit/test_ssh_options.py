"""The ssh argv mstm builds: a port only when one is written, the admin's ssh config with
-F, and a ControlPath that always fits in a Unix socket's name (issue 14, section 7)."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from mstm.config import load_stream
from mstm.errors import ConfigError
from mstm.send import Sender
from mstm.spool import Spool
from mstm.transports.base import TransportOptions
from mstm.transports.memory import MemoryTransport
from mstm.transports.sftp import Sftp
from mstm.transports.ssh import (
    CONTROL_PATH_MAX,
    RUNTIME_DIR_MAX,
    SshConnection,
    SshTarget,
    control_base,
)
from mstm.transports.ssh_config import host_entry


def opened(target: SshTarget, runtime_dir: Path | None = None) -> SshConnection:
    conn = SshConnection(target, runtime_dir=runtime_dir)
    conn._dir = "/run/mstm/mstm-ssh-abcdefgh"  # what open() makes
    return conn


def test_without_a_port_ssh_gets_no_p_option_and_the_host_is_named_without_one() -> None:
    t = SshTarget(host="archive-alias")
    assert "-p" not in opened(t).options()
    assert t.where == "archive-alias"


def test_a_written_port_is_given_with_p() -> None:
    t = SshTarget(host="h", port=2222)
    opts = opened(t).options()
    assert opts[opts.index("-p") + 1] == "2222"
    assert t.where == "h:2222"


def test_an_ssh_config_file_is_given_with_capital_f_first() -> None:
    opts = opened(SshTarget(host="h", config_file=Path("/etc/mstm/ssh_config"))).options()
    assert opts[:2] == ["-F", "/etc/mstm/ssh_config"]
    assert "-F" not in opened(SshTarget(host="h")).options()


def test_a_percent_sign_in_the_control_path_reaches_ssh_escaped() -> None:
    conn = opened(SshTarget(host="h"))
    conn._dir = "/run/100%/mstm-ssh-abcdefgh"
    assert "ControlPath=/run/100%%/mstm-ssh-abcdefgh/c" in conn.options()


def test_the_runtime_dir_is_used_up_to_the_limit_and_a_longer_one_falls_back(
        tmp_path: Path) -> None:
    base = tmp_path if len(str(tmp_path)) < 60 else Path("/tmp")
    fits = base / ("a" * (RUNTIME_DIR_MAX - len(str(base)) - 1))
    longer = base / ("b" * (RUNTIME_DIR_MAX - len(str(base))))
    assert (len(str(fits)), len(str(longer))) == (RUNTIME_DIR_MAX, RUNTIME_DIR_MAX + 1)
    try:
        assert control_base(fits) == str(fits)
        fallback = control_base(longer)
        assert fallback != str(longer)
        assert len(os.fsencode(fallback)) + len("/mstm-ssh-12345678/c") <= CONTROL_PATH_MAX
    finally:
        for d in (fits, longer):
            if d.exists():
                d.rmdir()


def test_a_runtime_dir_with_a_single_quote_falls_back_as_rsync_e_cannot_carry_it(
        tmp_path: Path) -> None:
    quoted = tmp_path / "it's"
    assert control_base(quoted) != str(quoted)


def test_the_sender_names_its_peer_without_a_port_when_none_is_written(tmp_path: Path) -> None:
    (tmp_path / "src").mkdir()
    (tmp_path / "spool").mkdir()
    (tmp_path / "global.ini").write_text(
        f"[global]\ndata_stream_list = p\nspool_base_dir = {tmp_path}/spool\n")
    (tmp_path / "p.ini").write_text(
        f"[data_stream]\ndirectory = {tmp_path}/src\n[outgoing]\ntarget_host = alias\n"
        "target_dir = /in\ntransfer_mode = mirror\n")
    s = load_stream("p", tmp_path / "global.ini")
    spool = Spool(s.spool_dir, lease_seconds=60).open()
    transport = MemoryTransport(TransportOptions(source_dir=s.directory, target_dir="/in"))
    assert Sender(s, spool=spool, transport=transport).peer == "rsync_ssh://alias/in"


def test_sftp_takes_hostname_port_and_user_of_the_alias_where_its_own_settings_say_none(
        tmp_path: Path) -> None:
    config = tmp_path / "ssh_config"
    config.write_text("Host arch\n    HostName 192.0.2.7\n    Port 2222\n    User bob\n")
    options = TransportOptions(source_dir=tmp_path, target_dir="/in")
    s = Sftp(options, host="arch", ssh_config=config)
    assert (s.host, s.port, s.username) == ("192.0.2.7", 2222, "bob")
    written = Sftp(options, host="arch", port=22, username="alice", ssh_config=config)
    assert (written.host, written.port, written.username) == ("192.0.2.7", 22, "alice")
    other = Sftp(options, host="elsewhere", ssh_config=config)
    assert (other.host, other.port) == ("elsewhere", 22)


def test_an_ssh_config_that_does_not_parse_is_a_configuration_error_for_sftp(
        tmp_path: Path) -> None:
    bad = tmp_path / "ssh_config"
    bad.write_text("Host arch\n    Port\n")
    with pytest.raises(ConfigError) as info:
        host_entry("arch", bad)
    assert (info.value.section, info.value.key) == ("sftp", "ssh_config")


@pytest.mark.parametrize("port", ["abc", "0", "65536", "22x", "٣"])
def test_a_port_in_the_ssh_config_that_is_no_port_is_a_configuration_error_for_sftp(
        tmp_path: Path, port: str) -> None:
    """Not an internal error (exit 70) at the first transfer: exit 78, naming the key."""
    config = tmp_path / "ssh_config"
    config.write_text(f"Host arch\n    Port {port}\n", encoding="utf-8")
    options = TransportOptions(source_dir=tmp_path, target_dir="/in")
    with pytest.raises(ConfigError) as info:
        Sftp(options, host="arch", ssh_config=config)
    assert (info.value.section, info.value.key) == ("sftp", "ssh_config")
    assert "expected a number from 1 to 65535" in info.value.message
