"""mstm.config: how the global file and the stream files become validated dataclasses.

Broken configurations, each checked through the API and through `mstm-send --check`,
are in test_config_cli.py.
"""

from __future__ import annotations

import dataclasses
import logging
import re
import shutil
import socket
from pathlib import Path

import pytest

from mstm.config import (
    SCHEMA,
    GlobalConfig,
    Kind,
    StreamConfig,
    default_config_path,
    load_all,
    load_global,
    load_stream,
)
from mstm.errors import ConfigError

REPO = Path(__file__).resolve().parents[2]
Sections = dict[str, dict[str, str]]


class Conf:
    """A global file and stream files under tmp_path, written on demand."""

    def __init__(self, root: Path) -> None:
        self.root = root
        (root / "spool").mkdir()
        self.global_file = root / "global.ini"
        self.glob: Sections = {"global": {
            "data_stream_list": "proj1",
            "spool_base_dir": str(root / "spool"),
        }}
        self.streams: dict[str, Sections] = {}
        self.add_stream("proj1")

    def add_stream(self, name: str) -> Sections:
        directory = self.root / "data" / name
        directory.mkdir(parents=True, exist_ok=True)
        self.streams[name] = {
            "data_stream": {"directory": str(directory)},
            "outgoing": {"target_host": "archive.example.org",
                         "target_dir": f"/archive/{name}", "transfer_mode": "move"},
        }
        return self.streams[name]

    def set(self, where: str, section: str, key: str, value: str) -> None:
        """Set a key in the global file (where="global") or in a stream's file."""
        sections = self.glob if where == "global" else self.streams[where]
        sections.setdefault(section, {})[key] = value

    def write(self) -> Path:
        self.global_file.write_text(ini(self.glob))
        for name, sections in self.streams.items():
            (self.root / f"{name}.ini").write_text(ini(sections))
        return self.global_file

    def stream(self, name: str = "proj1") -> StreamConfig:
        return load_stream(name, self.write())

    def error(self, name: str = "proj1") -> ConfigError:
        with pytest.raises(ConfigError) as info:
            self.stream(name)
        return info.value


def ini(sections: Sections) -> str:
    return "".join(f"[{section}]\n" + "".join(f"{k} = {v}\n" for k, v in keys.items()) + "\n"
                   for section, keys in sections.items())


@pytest.fixture(autouse=True)
def _clean_env(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("MSTM_CONFIG", raising=False)
    monkeypatch.delenv("RUNTIME_DIRECTORY", raising=False)


@pytest.fixture
def conf(tmp_path: Path) -> Conf:
    return Conf(tmp_path)


# --------------------------------------------------------------------------- finding files


def test_default_config_path_prefers_explicit_then_mstm_config_then_etc(
        monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    assert default_config_path() == Path("/etc/mstm/global.ini")
    monkeypatch.setenv("MSTM_CONFIG", str(tmp_path / "env.ini"))
    assert default_config_path() == tmp_path / "env.ini"
    assert default_config_path(tmp_path / "cli.ini") == tmp_path / "cli.ini"


def test_load_global_reads_mstm_config_when_no_path_is_given(
        conf: Conf, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("MSTM_CONFIG", str(conf.write()))
    assert load_global().path == conf.global_file


def test_missing_global_file_is_a_config_error_naming_it(tmp_path: Path) -> None:
    with pytest.raises(ConfigError) as info:
        load_global(tmp_path / "nope.ini")
    assert info.value.file == str(tmp_path / "nope.ini")
    assert "No such file or directory" in info.value.reason


def test_global_file_that_is_a_directory_is_a_config_error(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="cannot read"):
        load_global(tmp_path)


def test_file_that_is_not_utf8_is_a_config_error_with_its_line(tmp_path: Path) -> None:
    path = tmp_path / "global.ini"
    path.write_bytes(b"[global]\ndata_stream_list = \xff\n")
    with pytest.raises(ConfigError, match="line 2: not valid UTF-8"):
        load_global(path)


def test_duplicate_section_is_a_config_error_with_its_line(tmp_path: Path) -> None:
    path = tmp_path / "global.ini"
    path.write_text("[global]\ndata_stream_list =\n[global]\n")
    with pytest.raises(ConfigError) as info:
        load_global(path)
    assert (info.value.section, info.value.reason) == ("global", "line 3: section given twice")


def test_default_section_has_no_special_meaning(conf: Conf) -> None:
    conf.glob["DEFAULT"] = {"retry_count": "5"}
    conf.write()
    with pytest.raises(ConfigError, match=r"\[DEFAULT\]: unknown section"):
        load_global(conf.global_file)


def test_stream_file_is_found_as_name_ini_then_ds_name_ini_then_dataset_name_ini(
        conf: Conf) -> None:
    conf.write()
    stream_text = (conf.root / "proj1.ini").read_text()
    (conf.root / "proj1.ini").unlink()
    (conf.root / "dataset_proj1.ini").write_text(stream_text)
    assert load_stream("proj1", conf.global_file).stream_file == conf.root / "dataset_proj1.ini"
    (conf.root / "ds_proj1.ini").write_text(stream_text)
    assert load_stream("proj1", conf.global_file).stream_file == conf.root / "ds_proj1.ini"
    (conf.root / "proj1.ini").write_text(stream_text)
    assert load_stream("proj1", conf.global_file).stream_file == conf.root / "proj1.ini"


def test_stream_files_are_looked_for_in_config_dir(conf: Conf) -> None:
    conf.write()
    elsewhere = conf.root / "streams"
    elsewhere.mkdir()
    (conf.root / "proj1.ini").rename(elsewhere / "proj1.ini")
    conf.set("global", "global", "config_dir", str(elsewhere))
    conf.global_file.write_text(ini(conf.glob))
    assert load_stream("proj1", conf.global_file).stream_file == elsewhere / "proj1.ini"


@pytest.mark.parametrize("mode", [0o644, 0o600, 0o444, 0o400])
def test_stream_file_mode_does_not_matter(conf: Conf, mode: int) -> None:
    conf.write()
    (conf.root / "proj1.ini").chmod(mode)
    assert load_stream("proj1", conf.global_file).name == "proj1"


def test_stream_named_global_does_not_take_the_global_file_as_its_own(conf: Conf) -> None:
    conf.set("global", "global", "data_stream_list", "global")
    with pytest.raises(ConfigError, match="no file for stream 'global'"):
        load_stream("global", conf.write())


# --------------------------------------------------------------------------- the global file


def test_load_global_fills_in_defaults(tmp_path: Path) -> None:
    path = tmp_path / "global.ini"
    path.write_text("[global]\ndata_stream_list = a b\n")
    g = load_global(path)
    assert isinstance(g, GlobalConfig)
    assert g.path == path
    assert g.config_dir == tmp_path
    assert g.data_stream_list == ("a", "b")
    assert g.general_poll_interval == 3
    assert g.spool_base_dir == Path("/var/spool/mstm")
    assert g.runtime_dir == Path("/run/mstm")
    assert g.log_level == "INFO"
    dsm = g.disk_space_monitor
    assert (dsm.base_priority, dsm.level_good, dsm.level_low, dsm.level_vlow) == (
        100, "1500", "1000", "500")
    assert dsm.poll_interval == 60
    email = g.email
    assert email.sender.startswith("mstm@")
    assert (email.recipient, email.subject, email.smarthost, email.port) == (
        (), "mstm alert", "localhost", 25)
    assert (email.threshold, email.starttls, email.ssl) == ("ERROR", False, False)
    assert (email.username, email.password_file, email.email_timer) == (None, None, 300)


def test_runtime_dir_defaults_to_systemds_runtime_directory(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("RUNTIME_DIRECTORY", "/run/mstm-send:/run/other")
    path = tmp_path / "global.ini"
    path.write_text("[global]\ndata_stream_list =\n")
    assert load_global(path).runtime_dir == Path("/run/mstm-send")


def test_data_stream_list_may_be_empty_but_must_be_present(tmp_path: Path) -> None:
    path = tmp_path / "global.ini"
    path.write_text("[global]\ndata_stream_list =\n")
    assert load_global(path).data_stream_list == ()
    path.write_text("[global]\ngeneral_poll_interval = 3\n")
    with pytest.raises(ConfigError) as info:
        load_global(path)
    assert (info.value.section, info.value.key) == ("global", "data_stream_list")
    assert info.value.reason.startswith("is required")


def test_data_stream_list_is_separated_by_commas_and_or_spaces(tmp_path: Path) -> None:
    path = tmp_path / "global.ini"
    path.write_text("[global]\ndata_stream_list = a, b c,d\n  e.1\n")
    assert load_global(path).data_stream_list == ("a", "b", "c", "d", "e.1")


def test_load_global_does_not_validate_stream_files(conf: Conf) -> None:
    conf.set("global", "global", "data_stream_list", "proj1 proj2")
    conf.write()
    (conf.root / "proj2.ini").write_text("[outgoing]\nretry_count = many\n")
    assert load_global(conf.global_file).data_stream_list == ("proj1", "proj2")


def test_global_config_is_frozen(conf: Conf) -> None:
    g = load_global(conf.write())
    with pytest.raises(dataclasses.FrozenInstanceError):
        g.log_level = "DEBUG"  # type: ignore[misc]


# --------------------------------------------------------------------------- merging


def test_stream_value_overrides_global_value_in_same_section(conf: Conf) -> None:
    conf.set("global", "outgoing", "retry_count", "5")
    conf.set("proj1", "outgoing", "retry_count", "7")
    assert conf.stream().outgoing.retry_count == 7


def test_global_value_applies_when_the_stream_file_does_not_set_it(conf: Conf) -> None:
    conf.set("global", "outgoing", "retry_count", "5")
    assert conf.stream().outgoing.retry_count == 5


def test_override_is_key_by_key_not_section_by_section(conf: Conf) -> None:
    conf.set("global", "outgoing", "retry_count", "5")
    conf.set("global", "outgoing", "bwlimit", "1000")
    conf.set("proj1", "outgoing", "retry_count", "7")
    out = conf.stream().outgoing
    assert (out.retry_count, out.bwlimit) == (7, 1000)


def test_same_key_in_different_sections_is_a_different_setting(conf: Conf) -> None:
    conf.set("proj1", "incoming", "stop_file", ".pause")
    stream = conf.stream()
    assert (stream.incoming.stop_file, stream.outgoing.stop_file) == (".pause", ".stop")


def test_stream_values_fill_in_stream_defaults(conf: Conf) -> None:
    s = conf.stream()
    assert (s.name, s.global_file, s.stream_file) == (
        "proj1", conf.global_file, conf.root / "proj1.ini")
    assert (s.transfer_unit, s.status, s.running) == ("file", "RUNNING", True)
    assert (s.priority, s.deletion_enabled, s.settle_seconds) == (100, False, 5)
    assert s.spool_dir == conf.root / "spool" / "proj1"
    assert s.ignore_patterns == ("*.part", "*.tmp", "*.swp", "*~", "#*#")
    assert (s.ready_marker, s.follow_symlinks, s.poll_interval, s.log_level) == (
        None, False, 3, "INFO")
    out = s.outgoing
    assert (out.target_host, out.target_port, out.target_dir) == (
        "archive.example.org", None, "/archive/proj1")  # no port: ssh's config decides
    assert (out.transfer_protocol, out.transfer_mode) == ("rsync_ssh", "move")
    assert (out.retry_count, out.retry_backoff, out.retry_backoff_max) == (3, 2, 600)
    assert (out.batch_max_items, out.batch_max_bytes) == (10000, 64 * 1024**3)
    assert (out.connect_timeout, out.stall_seconds, out.lease_seconds) == (15, 120, 300)
    assert (out.stop_file, out.stop_file_poll_interval, out.bwlimit) == (".stop", 30, 0)
    assert (out.receipt_file_poll_count, out.receipt_file_poll_interval) == (100, 5)
    assert (out.control_file_extension, out.receipt_file_extension,
            out.thankyou_file_extension) == ("mstm-ctrl", "mstm-rcpt", "mstm-thanks")
    assert out.target_uses_arrival_monitor is False
    r = s.rsync_ssh
    assert (r.cmd, r.ssh_cmd, r.username, r.identity_file, r.known_hosts) == (
        "rsync", "ssh", None, None, None)
    assert not hasattr(r, "use_checksum") and not hasattr(r, "check_size")
    i = s.incoming
    assert (i.require_arrival_monitor, i.control_file_extension, i.thankyou_file_extension,
            i.stop_file) == (False, "mstm-ctrl", "mstm-thanks", ".stop")


def test_incoming_keys_default_to_an_area_inside_the_directory_and_refuse_overwrites(
        conf: Conf) -> None:
    i = conf.stream().incoming
    assert i.incoming_dir == conf.root / "data" / "proj1" / ".mstm-incoming"
    assert (i.receipt_file_extension, i.overwrite, i.max_control_bytes) == (
        "mstm-rcpt", False, 8 * 1024**2)


def test_incoming_keys_are_read_and_checked(conf: Conf, tmp_path: Path) -> None:
    for key, value in {"incoming_dir": str(tmp_path / "in"), "overwrite": "yes",
                       "receipt_file_extension": "rcpt", "max_control_bytes": "1M"}.items():
        conf.set("proj1", "incoming", key, value)
    i = conf.stream().incoming
    assert (i.incoming_dir, i.overwrite, i.receipt_file_extension, i.max_control_bytes) == (
        tmp_path / "in", True, "rcpt", 1024**2)
    conf.set("proj1", "incoming", "incoming_dir", "relative/in")
    assert conf.error().key == "incoming_dir"


def test_incoming_extensions_must_tell_the_handshake_files_apart(conf: Conf) -> None:
    conf.set("proj1", "incoming", "receipt_file_extension", "mstm-ctrl")
    assert conf.error().section == "incoming"
    conf.set("proj1", "incoming", "receipt_file_extension", "x.mstm-thanks")
    assert "apart" in conf.error().reason


def test_a_receive_only_stream_needs_no_outgoing_section(conf: Conf) -> None:
    del conf.streams["proj1"]["outgoing"]
    assert conf.error().section == "outgoing"  # a sender needs it
    s = load_stream("proj1", conf.write(), role="receive")
    assert (s.outgoing.target_host, s.outgoing.target_dir, s.outgoing.transfer_mode) == (
        "", "", "")
    assert s.incoming.incoming_dir == s.directory / ".mstm-incoming"
    conf.set("proj1", "outgoing", "retry_count", "many")  # what is written is still checked
    with pytest.raises(ConfigError) as info:
        load_stream("proj1", conf.write(), role="receive")
    assert info.value.key == "retry_count"


def test_a_receive_only_stream_loads_a_complete_outgoing_section_as_usual(conf: Conf) -> None:
    s = load_stream("proj1", conf.write(), role="receive")
    assert (s.outgoing.target_host, s.outgoing.transfer_mode) == ("archive.example.org", "move")


def test_priority_defaults_to_base_priority(conf: Conf) -> None:
    conf.set("global", "disk_space_monitor", "base_priority", "42")
    assert conf.stream().priority == 42
    conf.set("proj1", "data_stream", "priority", "200")
    assert conf.stream().priority == 200


def test_poll_interval_defaults_to_general_poll_interval(conf: Conf) -> None:
    conf.set("global", "global", "general_poll_interval", "7")
    assert conf.stream().poll_interval == 7


def test_spool_dir_defaults_to_spool_base_dir_and_stream_name(conf: Conf) -> None:
    (conf.root / "queues").mkdir()
    conf.set("global", "global", "spool_base_dir", str(conf.root / "queues"))
    assert conf.stream().spool_dir == conf.root / "queues" / "proj1"


def test_transfer_mode_is_accepted_from_rsync_ssh_section_as_mistamover_had_it(
        conf: Conf) -> None:
    del conf.streams["proj1"]["outgoing"]["transfer_mode"]
    conf.set("proj1", "rsync_ssh", "transfer_mode", "mirror")
    assert conf.stream().outgoing.transfer_mode == "mirror"


def test_outgoing_transfer_mode_wins_over_rsync_ssh_transfer_mode(conf: Conf) -> None:
    conf.set("proj1", "rsync_ssh", "transfer_mode", "mirror")
    assert conf.stream().outgoing.transfer_mode == "move"


def test_broken_stream_file_of_another_stream_does_not_stop_this_one(conf: Conf) -> None:
    conf.set("global", "global", "data_stream_list", "proj1 proj2")
    conf.write()
    (conf.root / "proj2.ini").write_text("this is not an ini file\n")
    assert load_stream("proj1", conf.global_file).name == "proj1"


def test_load_all_returns_every_listed_stream(conf: Conf) -> None:
    conf.set("global", "global", "data_stream_list", "proj1 proj2")
    conf.add_stream("proj2")
    g, streams = load_all(conf.write())
    assert g.data_stream_list == ("proj1", "proj2")
    assert list(streams) == ["proj1", "proj2"]
    assert streams["proj2"].directory == conf.root / "data" / "proj2"


def test_load_all_raises_for_a_broken_stream(conf: Conf) -> None:
    conf.set("global", "global", "data_stream_list", "proj1 proj2")
    conf.add_stream("proj2")
    conf.set("proj2", "outgoing", "retry_count", "many")
    with pytest.raises(ConfigError) as info:
        load_all(conf.write())
    assert info.value.file == str(conf.root / "proj2.ini")


def test_stream_config_is_frozen_and_running_follows_status(conf: Conf) -> None:
    conf.set("proj1", "data_stream", "status", "Stopped")
    s = conf.stream()
    assert (s.status, s.running) == ("STOPPED", False)
    with pytest.raises(dataclasses.FrozenInstanceError):
        s.status = "RUNNING"  # type: ignore[misc]


def test_name_may_be_written_when_it_equals_the_listed_name(conf: Conf) -> None:
    conf.set("proj1", "data_stream", "name", "proj1")
    assert conf.stream().name == "proj1"


# --------------------------------------------------------------------------- interpolation


def test_interpolation_reaches_across_files_and_nests(conf: Conf) -> None:
    conf.set("global", "global", "top", str(conf.root))
    conf.set("global", "global", "data", "$(global:top)/data")
    conf.set("proj1", "data_stream", "directory", "$(global:data)/proj1")
    assert conf.stream().directory == conf.root / "data" / "proj1"


def test_interpolation_sees_the_stream_files_override(conf: Conf) -> None:
    conf.set("global", "outgoing", "target_dir", "/archive/$(outgoing:sub)")
    conf.set("global", "outgoing", "sub", "shared")
    conf.set("proj1", "outgoing", "sub", "mine")
    del conf.streams["proj1"]["outgoing"]["target_dir"]
    assert conf.stream().outgoing.target_dir == "/archive/mine"


def test_global_file_may_refer_to_each_streams_own_name(conf: Conf) -> None:
    conf.set("global", "outgoing", "target_dir", "/archive/$(data_stream:name)")
    del conf.streams["proj1"]["outgoing"]["target_dir"]
    assert conf.stream().outgoing.target_dir == "/archive/proj1"


def test_interpolation_of_an_unset_key_uses_its_default(conf: Conf) -> None:
    conf.set("proj1", "outgoing", "target_dir", "/archive/$(global:general_poll_interval)")
    assert conf.stream().outgoing.target_dir == "/archive/3"


def test_reference_to_a_key_defined_later_in_the_file_works(conf: Conf) -> None:
    conf.glob["global"] = {"top": "$(global:later)", **conf.glob["global"],
                           "later": str(conf.root)}
    conf.set("proj1", "data_stream", "directory", "$(global:top)/data/proj1")
    assert conf.stream().directory == conf.root / "data" / "proj1"


def test_dollar_without_parenthesis_is_plain_text(conf: Conf) -> None:
    conf.set("global", "email", "subject", "$USER owes $5 (see $(email:smarthost))")
    assert load_global(conf.write()).email.subject == "$USER owes $5 (see localhost)"


@pytest.mark.parametrize("text", ["$(top)/x", "$(global:)/x", "$(global:top/x"])
def test_malformed_reference_is_an_error_naming_its_key(conf: Conf, text: str) -> None:
    conf.set("proj1", "outgoing", "target_dir", text)
    err = conf.error()
    assert (err.section, err.key) == ("outgoing", "target_dir")
    assert "malformed reference" in err.reason


def test_user_variable_is_allowed_when_referenced(conf: Conf) -> None:
    conf.set("global", "global", "homedir", str(conf.root))
    conf.set("proj1", "data_stream", "directory", "$(global:homedir)/data/proj1")
    assert conf.stream().directory == conf.root / "data" / "proj1"


def test_user_variable_referenced_only_by_another_streams_file_is_allowed(conf: Conf) -> None:
    conf.set("global", "global", "data_stream_list", "proj1 proj2")
    conf.set("global", "global", "top", str(conf.root))
    conf.add_stream("proj2")
    conf.set("proj2", "data_stream", "directory", "$(global:top)/data/proj2")
    conf.write()
    assert load_global(conf.global_file).data_stream_list == ("proj1", "proj2")
    assert load_stream("proj1", conf.global_file).name == "proj1"


def test_section_of_user_variables_is_allowed_when_every_key_is_referenced(
        conf: Conf) -> None:
    conf.glob["paths"] = {"top": str(conf.root)}
    conf.set("proj1", "data_stream", "directory", "$(paths:top)/data/proj1")
    assert conf.stream().directory == conf.root / "data" / "proj1"


def test_unreferenced_user_variable_is_an_unknown_key(conf: Conf) -> None:
    conf.set("global", "global", "homedir", "/home/me")
    err = conf.error()
    assert (err.file, err.section, err.key) == (str(conf.global_file), "global", "homedir")
    assert err.reason == "unknown key"


def test_unknown_key_error_names_file_section_key_and_suggests_closest(conf: Conf) -> None:
    conf.set("proj1", "data_stream", "setle_seconds", "5")
    err = conf.error()
    assert (err.file, err.section, err.key) == (str(conf.root / "proj1.ini"), "data_stream",
                                                "setle_seconds")
    assert err.reason == "unknown key (did you mean 'settle_seconds'?)"
    assert str(err) == (f"{conf.root / 'proj1.ini'}: [data_stream] setle_seconds:"
                        " unknown key (did you mean 'settle_seconds'?)")


def test_key_names_are_case_insensitive(conf: Conf) -> None:
    conf.set("proj1", "outgoing", "Retry_Count", "9")
    assert conf.stream().outgoing.retry_count == 9


# --------------------------------------------------------------------------- value types


@pytest.mark.parametrize(("text", "value"), [
    ("true", True), ("True", True), ("YES", True), ("on", True), ("1", True),
    ("false", False), ("False", False), ("no", False), ("Off", False), ("0", False)])
def test_booleans_accept_mistamover_and_common_spellings(
        conf: Conf, text: str, value: bool) -> None:
    conf.set("proj1", "data_stream", "deletion_enabled", text)
    assert conf.stream().deletion_enabled is value


@pytest.mark.parametrize(("text", "seconds"), [
    ("90", 90), ("1.5", 1.5), ("90s", 90), ("5m", 300), ("2h", 7200), ("5 M", 300)])
def test_durations_accept_plain_seconds_and_s_m_h_suffixes(
        conf: Conf, text: str, seconds: float) -> None:
    conf.set("proj1", "data_stream", "settle_seconds", text)
    assert conf.stream().settle_seconds == seconds


@pytest.mark.parametrize(("text", "size"), [
    ("4096", 4096), ("10K", 10 * 1024), ("4M", 4 * 1024**2), ("2G", 2 * 1024**3),
    ("1T", 1024**4), ("1.5k", 1536), ("10KiB", 10240)])
def test_sizes_use_binary_multiples(conf: Conf, text: str, size: int) -> None:
    conf.set("proj1", "outgoing", "batch_max_bytes", text)
    assert conf.stream().outgoing.batch_max_bytes == size


def test_lists_are_separated_by_commas_and_or_whitespace(conf: Conf) -> None:
    conf.set("proj1", "data_stream", "ignore_patterns", "*.tmp, *.part  core.*")
    conf.set("global", "email", "recipient", "a@example.org,b@example.org")
    conf.write()
    assert conf.stream().ignore_patterns == ("*.tmp", "*.part", "core.*")
    assert load_global(conf.global_file).email.recipient == ("a@example.org", "b@example.org")


def test_choices_are_case_insensitive_and_stored_in_canonical_case(conf: Conf) -> None:
    conf.set("proj1", "outgoing", "transfer_mode", "MIRROR")
    conf.set("proj1", "data_stream", "transfer_unit", "Dir")
    conf.set("global", "logging", "log_level", "debug")
    s = conf.stream()
    assert (s.outgoing.transfer_mode, s.transfer_unit, s.log_level) == ("mirror", "dir", "DEBUG")


def test_empty_value_means_the_default(conf: Conf) -> None:
    conf.set("proj1", "outgoing", "retry_count", "")
    conf.set("proj1", "data_stream", "priority", "")
    conf.set("proj1", "rsync_ssh", "username", "")
    s = conf.stream()
    assert (s.outgoing.retry_count, s.priority, s.rsync_ssh.username) == (3, 100, None)


def test_ready_marker_is_a_template_with_name(conf: Conf) -> None:
    assert conf.stream().ready_marker is None
    conf.set("proj1", "data_stream", "ready_marker", "{name}.done")
    assert conf.stream().ready_marker == "{name}.done"
    conf.set("proj1", "data_stream", "ready_marker", "{name}.{other}")
    assert "only {name}" in conf.error().reason


@pytest.mark.parametrize(("good", "low", "vlow"), [
    ("1500", "1000", "500"), ("20%", "10%", "5%"), ("10%", "2000", "1%"), ("2000", "50%", "0")])
def test_disk_levels_are_megabytes_or_percentages(
        conf: Conf, good: str, low: str, vlow: str) -> None:
    conf.glob["disk_space_monitor"] = {"level_good": good, "level_low": low, "level_vlow": vlow}
    dsm = load_global(conf.write()).disk_space_monitor
    assert (dsm.level_good, dsm.level_low, dsm.level_vlow) == (good, low, vlow)


@pytest.mark.parametrize(("levels", "key"), [
    ({"level_good": "10%", "level_low": "20%", "level_vlow": "5%"}, "level_low"),
    ({"level_low": "400"}, "level_low"),  # below the default level_vlow of 500
    ({"level_good": "900"}, "level_good"),  # below the default level_low of 1000
    ({"level_vlow": "150%"}, "level_vlow"),
    ({"level_vlow": "-5"}, "level_vlow")])
def test_disk_levels_out_of_order_or_malformed_name_the_written_key(
        conf: Conf, levels: dict[str, str], key: str) -> None:
    conf.glob["disk_space_monitor"] = levels
    with pytest.raises(ConfigError) as info:
        load_global(conf.write())
    assert (info.value.section, info.value.key) == ("disk_space_monitor", key)


def test_retry_backoff_max_below_retry_backoff_is_an_error(conf: Conf) -> None:
    conf.set("proj1", "outgoing", "retry_backoff", "10m")
    conf.set("proj1", "outgoing", "retry_backoff_max", "1m")
    assert conf.error().key == "retry_backoff_max"


def test_lease_seconds_must_be_at_least_ten(conf: Conf) -> None:
    conf.set("proj1", "outgoing", "lease_seconds", "9")
    assert conf.error().key == "lease_seconds"
    conf.set("proj1", "outgoing", "lease_seconds", "10")
    assert conf.stream().outgoing.lease_seconds == 10


def test_target_host_may_not_look_like_an_option(conf: Conf) -> None:
    conf.set("proj1", "outgoing", "target_host", "-oProxyCommand=x")
    assert conf.error().key == "target_host"


def test_identity_file_and_known_hosts_are_checked_when_set(conf: Conf) -> None:
    key = conf.root / "id_ed25519"
    key.write_text("key\n")
    hosts = conf.root / "known_hosts"
    hosts.write_text("")
    conf.set("proj1", "rsync_ssh", "identity_file", str(key))
    conf.set("proj1", "rsync_ssh", "known_hosts", str(hosts))
    r = conf.stream().rsync_ssh
    assert (r.identity_file, r.known_hosts) == (key, hosts)
    conf.set("proj1", "rsync_ssh", "known_hosts", str(conf.root / "nope"))
    assert conf.error().key == "known_hosts"


def test_email_password_file_is_accepted_and_password_refused(conf: Conf) -> None:
    conf.set("global", "email", "password_file", "/etc/mstm/smtp-password")
    conf.set("global", "email", "username", "mstm")
    g = load_global(conf.write())
    assert (g.email.password_file, g.email.username) == (Path("/etc/mstm/smtp-password"),
                                                         "mstm")
    conf.set("global", "email", "password", "")
    with pytest.raises(ConfigError) as info:
        load_global(conf.write())
    assert (info.value.section, info.value.key) == ("email", "password")
    assert "password_file" in info.value.reason


def test_email_from_becomes_sender_and_empty_means_mstm_at_this_host(conf: Conf) -> None:
    conf.set("global", "email", "from", "mstm@example.org")
    assert load_global(conf.write()).email.sender == "mstm@example.org"
    conf.set("global", "email", "from", "")
    assert load_global(conf.write()).email.sender == f"mstm@{socket.gethostname()}"


def test_ignored_mistamover_keys_load_with_a_warning(
        conf: Conf, caplog: pytest.LogCaptureFixture) -> None:
    conf.glob["logging"] = {"base_log_dir": "/tmp/log", "port": "2000"}
    with caplog.at_level(logging.WARNING, logger="mstm.config"):
        conf.stream()
    warnings = [r.getMessage() for r in caplog.records if r.name == "mstm.config"]
    assert any("[logging] base_log_dir: ignored" in w for w in warnings)
    assert any("[logging] port: ignored" in w for w in warnings)
    assert len(warnings) == 2  # once each, though the global file is read for the stream too


def test_use_checksum_and_check_size_are_accepted_and_said_to_be_ignored(
        conf: Conf, caplog: pytest.LogCaptureFixture) -> None:
    """Nothing reads them: mstm verifies sha256 at the target whatever rsync does."""
    conf.glob["rsync_ssh"] = {"use_checksum": "false", "check_size": "no"}
    with caplog.at_level(logging.WARNING, logger="mstm.config"):
        conf.stream()
    warnings = [r.getMessage() for r in caplog.records if r.name == "mstm.config"]
    assert any("[rsync_ssh] use_checksum: ignored" in w for w in warnings)
    assert any("[rsync_ssh] check_size: ignored" in w for w in warnings)


def test_warnings_are_not_logged_when_the_configuration_is_broken(
        conf: Conf, caplog: pytest.LogCaptureFixture) -> None:
    conf.glob["logging"] = {"port": "2000"}
    conf.set("proj1", "outgoing", "retry_count", "many")
    with caplog.at_level(logging.WARNING, logger="mstm.config"):
        conf.error()
    assert not [r for r in caplog.records if r.name == "mstm.config"]


def test_mistamover_example_configuration_loads(tmp_path: Path) -> None:
    """The global and data stream files of MiStaMover's getting-started guide."""
    (tmp_path / "work" / "outgoing" / "my_outputs").mkdir(parents=True)
    (tmp_path / "spool").mkdir()
    (tmp_path / "global.ini").write_text(f"""\
[global]
homedir = {tmp_path}
top = {tmp_path}/work
base_data_dir = $(global:top)/data
config_dir = $(global:homedir)
base_incoming_dir = $(global:base_data_dir)/incoming
data_stream_list = my_outputs
general_poll_interval = 3
spool_base_dir = {tmp_path}/spool

[incoming]
require_arrival_monitor = False
control_file_extension = mistamover-ctrl-bes
thankyou_file_extension = mistamover-thanks-bes
stop_file = .stop

[outgoing]
transfer_protocol = rsync_ssh
control_file_extension = mistamover-ctrl-bss
receipt_file_extension = mistamover-rcpt-bss
thankyou_file_extension = mistamover-thanks-bss
target_uses_arrival_monitor = True
retry_count = 3
receipt_file_poll_count = 100
receipt_file_poll_interval = 5
always_zip = False
dir_size_limit = 1000.
stop_file = .stop
stop_file_poll_interval = 600

[logging]
base_log_dir = $(global:homedir)/mistamover/log
log_level = INFO
port = 2000

[email]
from = mistamover@localhost
#threshold = ERROR
threshold = CRITICAL
recipient = me@localhost
subject = Error from MiStaMover
smarthost = localhost

[rsync_ssh]
transfer_mode = move
cmd = /usr/bin/rsync

[disk_space_monitor]
base_priority = 100
# thresholds in MB - description in lib/DiskSpaceMonitor.py
level_good = 1500
level_low = 1000
level_vlow = 500
poll_interval = 60
""")
    (tmp_path / "dataset_my_outputs.ini").write_text("""\
[data_stream]
priority = 200
name = my_outputs
transfer_unit = file
status = RUNNING
directory = $(global:top)/outgoing/my_outputs

[incoming]
require_arrival_monitor = False

[outgoing]
target_host = localhost
transfer_protocol = rsync_ssh
target_uses_arrival_monitor = False
target_dir = $(global:top)/remote/my_outputs

[rsync_ssh]
username = ME
transfer_mode = mirror
use_checksum = True
check_size = True
""")
    s = load_stream("my_outputs", tmp_path / "global.ini")
    assert (s.priority, s.outgoing.transfer_mode, s.rsync_ssh.username) == (200, "mirror", "ME")
    assert s.outgoing.target_dir == f"{tmp_path}/work/remote/my_outputs"
    assert s.outgoing.stop_file_poll_interval == 600


# --------------------------------------------------------------------------- the examples


def _example_copy(tmp_path: Path) -> Path:
    """conf/global.ini and conf/proj1.ini copied, with paths that exist here."""
    data = tmp_path / "data" / "outgoing" / "proj1"
    data.mkdir(parents=True)
    (tmp_path / "spool").mkdir()
    global_text = (REPO / "conf" / "global.ini").read_text()
    global_text = global_text.replace(
        "\n[global]\n", f"\n[global]\nspool_base_dir = {tmp_path / 'spool'}\n", 1)
    (tmp_path / "global.ini").write_text(global_text)
    stream_text = (REPO / "conf" / "proj1.ini").read_text()
    assert "/data/outgoing/proj1" in stream_text
    (tmp_path / "proj1.ini").write_text(stream_text.replace("/data/outgoing/proj1", str(data)))
    return tmp_path / "global.ini"


def test_example_files_load_cleanly(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    g, streams = load_all(_example_copy(tmp_path))
    s = streams["proj1"]
    assert g.data_stream_list == ("proj1",)
    assert (s.outgoing.transfer_protocol, s.outgoing.transfer_mode) == ("rsync_ssh", "move")
    assert s.directory == tmp_path / "data" / "outgoing" / "proj1"
    assert not [r for r in caplog.records if r.name == "mstm.config"]


def test_example_stream_file_shows_how_to_mirror(tmp_path: Path) -> None:
    global_file = _example_copy(tmp_path)
    stream_file = tmp_path / "proj1.ini"
    text = stream_file.read_text()
    assert "#transfer_mode = mirror" in text
    stream_file.write_text(text.replace("transfer_mode = move\n", "")
                           .replace("#transfer_mode = mirror", "transfer_mode = mirror"))
    assert load_stream("proj1", global_file).outgoing.transfer_mode == "mirror"


def test_example_global_file_uncommented_sets_only_the_defaults(tmp_path: Path) -> None:
    """Every '#key = value' line of conf/global.ini shows the true default."""
    text = (REPO / "conf" / "global.ini").read_text()
    for section, key, shown in _documented(text):
        spec = SCHEMA[section][key]
        if spec.default is not None and "$(" not in spec.default and shown:
            kind: Kind = spec.kind
            assert kind.parse(shown) == kind.parse(spec.default), (section, key, shown)


def _documented(text: str) -> list[tuple[str, str, str]]:
    """(section, key, value) of every 'key = value' line, commented out or not."""
    found = []
    section = ""
    for line in text.splitlines():
        header = re.fullmatch(r"\[(\w+)\]", line)
        if header:
            section = header.group(1)
            continue
        setting = re.fullmatch(r"#?(\w+) =\s*(.*)", line)
        if setting and section:
            found.append((section, setting.group(1), setting.group(2)))
    return found


def test_every_schema_key_is_documented_in_the_example_global_file() -> None:
    documented = {(s, k) for s, k, _ in _documented((REPO / "conf" / "global.ini").read_text())}
    missing = [f"[{s}] {k}" for s, keys in SCHEMA.items() for k in keys
               if (s, k) not in documented]
    assert not missing
    unknown = [f"[{s}] {k}" for s, k in documented if k not in SCHEMA.get(s, {})]
    assert not unknown


def test_every_schema_key_has_a_doc_and_a_default_that_parses() -> None:
    for section, keys in SCHEMA.items():
        for key, spec in keys.items():
            assert spec.doc, (section, key)
            if spec.default is not None and "$(" not in spec.default:
                spec.kind.parse(spec.default)


def test_example_files_are_found_next_to_each_other(tmp_path: Path) -> None:
    shutil.copy(REPO / "conf" / "global.ini", tmp_path / "global.ini")
    assert load_global(tmp_path / "global.ini").config_dir == tmp_path


# --------------------------------------------------------------------------- limits (#12)


def test_every_duration_the_schema_allows_is_safe_for_sleep_waits_and_timedelta() -> None:
    import datetime
    import threading

    from mstm.config import MAX_SECONDS, Seconds

    durations = [(s, k, spec.kind) for s, keys in SCHEMA.items() for k, spec in keys.items()
                 if isinstance(spec.kind, Seconds)]
    assert len(durations) >= 10
    for section, key, kind in durations:
        longest = kind.parse(f"{kind.max:.0f}")
        assert longest <= MAX_SECONDS <= threading.TIMEOUT_MAX, (section, key)
        datetime.datetime.now() + datetime.timedelta(seconds=longest)  # no OverflowError
        with pytest.raises(ValueError, match="at most 1 year"):
            kind.parse(f"{MAX_SECONDS + 1}")


def test_the_largest_integers_and_sizes_fit_where_they_are_used() -> None:
    import datetime

    from mstm.config import MAX_SIZE, Int, Size

    assert Size().parse("1024T") == MAX_SIZE == 1 << 50
    assert Size().parse("1.5K") == 1536  # exact, no float rounding
    assert Size().parse("1099511627775") == (1 << 40) - 1
    days = SCHEMA["pull"]["max_age_days"].kind
    assert isinstance(days, Int)
    datetime.datetime.now() - datetime.timedelta(days=days.max)
    for keys in SCHEMA.values():
        for spec in keys.values():
            if isinstance(spec.kind, Int):
                assert -(2**31) < spec.kind.min <= spec.kind.max < 2**31


def test_a_long_bad_value_is_quoted_shortened() -> None:
    from mstm.config import show

    assert show("x" * 1000) == "'" + "x" * 60 + "'... (1000 characters)"
    assert show("short") == "'short'"


def test_an_error_no_check_foresaw_names_the_key_and_is_still_a_config_error(
        conf: Conf, monkeypatch: pytest.MonkeyPatch) -> None:
    from mstm import config

    def boom(self: object, text: str) -> object:
        raise OverflowError("cannot convert float infinity to integer")

    monkeypatch.setattr(config.Size, "parse", boom)
    err = conf.error()
    assert (err.section, err.key) in {("outgoing", "batch_max_bytes"),
                                      ("incoming", "max_control_bytes")}
    assert "OverflowError" in err.reason and "\n" not in str(err)


def test_a_reference_chain_within_the_depth_limit_still_works(conf: Conf) -> None:
    conf.glob["global"].update({f"k{i}": f"$(global:k{i + 1})" for i in range(20)})
    conf.glob["global"]["k20"] = "/archive/deep"
    conf.set("proj1", "outgoing", "target_dir", "$(global:k0)")
    assert conf.stream().outgoing.target_dir == "/archive/deep"


@pytest.mark.parametrize("marker", ["{name}.done", ".{name}.ok", "DONE-{name}", "{name}~"])
def test_ready_markers_that_are_plain_names_with_name_once_are_accepted(
        conf: Conf, marker: str) -> None:
    conf.set("proj1", "data_stream", "ready_marker", marker)
    assert conf.stream().ready_marker == marker


def test_a_good_password_file_is_accepted_with_one_trailing_newline(conf: Conf) -> None:
    pw = conf.root / "pw"
    pw.write_text("s3cret\n")
    conf.set("proj1", "outgoing", "transfer_protocol", "rsync_native")
    conf.streams["proj1"]["rsync_native"] = {"module": "m", "password_file": str(pw)}
    assert conf.stream().rsync_native.password_file == pw
