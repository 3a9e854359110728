"""The configuration of the transports: their sections, defaults and checks."""

from __future__ import annotations

from pathlib import Path

import pytest

from mstm.config import load_stream
from mstm.errors import ConfigError
from mstm.transports import make_transport


def write(tmp_path: Path, protocol: str, extra: str = "") -> Path:
    (tmp_path / "src").mkdir(exist_ok=True)
    (tmp_path / "spool").mkdir(exist_ok=True)
    g = tmp_path / "global.ini"
    g.write_text(f"[global]\ndata_stream_list = p\nspool_base_dir = {tmp_path}/spool\n")
    host = "" if protocol == "local" else "target_host = archive.example.org\n"
    (tmp_path / "p.ini").write_text(
        f"[data_stream]\ndirectory = {tmp_path}/src\n"
        f"[outgoing]\n{host}target_dir = /in\ntransfer_mode = mirror\n"
        f"transfer_protocol = {protocol}\n{extra}")
    return g


@pytest.mark.parametrize(("protocol", "port", "cls"), [
    # None: no port is given, the ssh configuration's Port for the host decides (else 22)
    ("rsync_ssh", None, "RsyncSsh"), ("sftp", None, "Sftp"), ("ftp", 21, "Ftp"),
    ("ftps", 21, "Ftp"), ("local", None, "Local")])
def test_each_protocol_has_its_default_port_and_its_transport(
        tmp_path: Path, protocol: str, port: int | None, cls: str) -> None:
    s = load_stream("p", write(tmp_path, protocol))
    assert s.outgoing.target_port == port
    assert type(make_transport(s)).__name__ == cls


def test_rsync_native_needs_a_module_and_defaults_to_port_873(tmp_path: Path) -> None:
    with pytest.raises(ConfigError) as info:
        load_stream("p", write(tmp_path, "rsync_native"))
    assert (info.value.section, info.value.key) == ("rsync_native", "module")
    s = load_stream("p", write(tmp_path, "rsync_native", "[rsync_native]\nmodule = data\n"))
    assert (s.outgoing.target_port, s.rsync_native.module) == (873, "data")
    assert type(make_transport(s)).__name__ == "RsyncNative"


def test_a_written_port_wins(tmp_path: Path) -> None:
    s = load_stream("p", write(tmp_path, "ftp", "target_port = 2121\n"))
    assert s.outgoing.target_port == 2121


def test_ftps_always_uses_tls_and_ftp_only_when_asked(tmp_path: Path) -> None:
    assert load_stream("p", write(tmp_path, "ftps")).ftp.tls is True
    assert load_stream("p", write(tmp_path, "ftp")).ftp.tls is False
    assert load_stream("p", write(tmp_path, "ftp", "[ftp]\ntls = yes\n")).ftp.tls is True
    assert make_transport(load_stream("p", write(tmp_path, "ftps"))).name == "ftps"


def test_ftp_and_sftp_defaults(tmp_path: Path) -> None:
    s = load_stream("p", write(tmp_path, "sftp"))
    assert (s.sftp.remote_checksum, s.sftp.verify_readback, s.sftp.username) == (
        True, True, None)
    f = load_stream("p", write(tmp_path, "ftp")).ftp
    assert (f.username, f.passive, f.verify_readback, f.password_file) == (
        "anonymous", True, True, None)


@pytest.mark.parametrize(("section", "key"), [
    ("ftp", "password_file"), ("rsync_native", "password_file"), ("ftp", "ca_file"),
    ("sftp", "identity_file")])
def test_a_file_setting_must_name_a_readable_file(tmp_path: Path, section: str,
                                                  key: str) -> None:
    with pytest.raises(ConfigError) as info:
        load_stream("p", write(tmp_path, "ftp", f"[{section}]\n{key} = /nonexistent/x\n"))
    assert (info.value.section, info.value.key) == (section, key)
    assert "not a readable file" in info.value.reason


@pytest.mark.parametrize("section", ["ftp", "rsync_native"])
def test_a_password_in_the_configuration_is_refused_and_not_repeated(
        tmp_path: Path, section: str) -> None:
    with pytest.raises(ConfigError) as info:
        load_stream("p", write(tmp_path, "ftp", f"[{section}]\npassword = hunter2\n"))
    assert "password_file" in info.value.reason and "hunter2" not in str(info.value)
