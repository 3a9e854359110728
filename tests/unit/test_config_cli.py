"""Broken configurations: each is one ConfigError naming file, section, key and reason,
both from the API and from the installed command (`mstm-send --config G --check S`:
exit 78, exactly one line on stderr, never a traceback)."""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import pytest

from mstm.config import load_stream
from mstm.errors import EXIT_CONFIG, ConfigError

MSTM_SEND = Path(sys.executable).parent / "mstm-send"


class Conf:
    """A valid global file and stream file under a temporary directory, to be broken."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.data = root / "data" / "proj1"
        self.data.mkdir(parents=True)
        (root / "spool").mkdir()
        self.global_file = root / "global.ini"
        self.write_global = True
        self.glob: dict[str, dict[str, str]] = {"global": {
            "data_stream_list": "proj1",
            "spool_base_dir": str(root / "spool"),
            "runtime_dir": str(root / "run"),
        }}
        self.stream: dict[str, dict[str, str]] = {
            "data_stream": {"directory": str(self.data)},
            "outgoing": {"target_host": "archive.example.org", "target_dir": "/archive/proj1",
                         "transfer_mode": "move"},
        }
        self.stream_text: str | None = None  # raw text instead of self.stream

    @property
    def stream_file(self) -> Path:
        return self.root / "proj1.ini"

    def write(self) -> None:
        if self.write_global:
            self.global_file.write_text(_ini(self.glob))
        self.stream_file.write_text(
            _ini(self.stream) if self.stream_text is None else self.stream_text)


def _ini(sections: dict[str, dict[str, str]]) -> str:
    return "".join(f"[{section}]\n" + "".join(f"{k} = {v}\n" for k, v in keys.items()) + "\n"
                   for section, keys in sections.items())


@pytest.fixture(autouse=True)
def _clean_env(monkeypatch: pytest.MonkeyPatch) -> None:
    for var in ("MSTM_CONFIG", "RUNTIME_DIRECTORY", "JOURNAL_STREAM"):
        monkeypatch.delenv(var, raising=False)


@dataclass(frozen=True)
class Broken:
    edit: Callable[[Conf], None]
    file: str  # which file the error names: "global", "stream" or "missing"
    section: str | None
    key: str | None
    reason: str  # a part of the reason
    stream: str = "proj1"


def _missing_global(c: Conf) -> None:
    c.global_file = c.root / "missing.ini"
    c.write_global = False


def _directory_under_a_file(c: Conf) -> None:
    (c.root / "plain").write_text("not a directory\n")
    c.stream["data_stream"]["directory"] = str(c.root / "plain" / "proj1")


def _directory_unreadable(c: Conf) -> None:
    c.data.chmod(0)


def _cycle(c: Conf) -> None:
    c.glob["global"].update(a="$(global:b)", b="$(global:a)")
    c.stream["outgoing"]["target_dir"] = "/archive/$(global:a)"


def _levels(c: Conf) -> None:
    c.glob["disk_space_monitor"] = {"level_good": "1000", "level_low": "1500"}


def _set(where: str, section: str, key: str, value: str) -> Callable[[Conf], None]:
    def edit(c: Conf) -> None:
        (c.glob if where == "global" else c.stream).setdefault(section, {})[key] = value
    return edit


def _unset(section: str, key: str) -> Callable[[Conf], None]:
    def edit(c: Conf) -> None:
        del c.stream[section][key]
    return edit


def _raw_stream(text: str) -> Callable[[Conf], None]:
    def edit(c: Conf) -> None:
        c.stream_text = text.format(data=c.data)
    return edit


def _also(*edits: Callable[[Conf], None]) -> Callable[[Conf], None]:
    def edit(c: Conf) -> None:
        for e in edits:
            e(c)
    return edit


def _deny_access_as_root(monkeypatch: pytest.MonkeyPatch, name: str) -> bool:
    """Root reads any directory, so for the unreadable case fake what access(2) says."""
    if name != "directory_unreadable" or os.geteuid() != 0:
        return False
    import mstm.config

    real = os.access

    def access(path: object, mode: int, **kw: object) -> bool:  # directories: denied
        return False if os.path.isdir(path) else real(path, mode)  # type: ignore[arg-type]

    monkeypatch.setattr(mstm.config.os, "access", access)
    return True

BROKEN = {
    "missing_global_file": Broken(_missing_global, "missing", None, None, "cannot read"),
    "syntax_error": Broken(_raw_stream("[data_stream]\ndirectory {data}\n"), "stream",
                           None, None, "line 2: cannot parse"),
    "no_section_header": Broken(_raw_stream("directory = {data}\n"), "stream", None, None,
                                "line 1"),
    "duplicate_key": Broken(_raw_stream("[data_stream]\ndirectory = {data}\n"
                                        "directory = {data}\n"),
                            "stream", "data_stream", "directory", "line 3: key given twice"),
    "unknown_key_with_hint": Broken(_set("stream", "outgoing", "target_hots", "x"), "stream",
                                    "outgoing", "target_hots",
                                    "unknown key (did you mean 'target_host'?)"),
    "key_in_wrong_section": Broken(_set("stream", "data_stream", "target_port", "22"),
                                   "stream", "data_stream", "target_port",
                                   "it belongs in [outgoing]"),
    "unknown_section_with_hint": Broken(_set("stream", "outgong", "retry_count", "3"),
                                        "stream", "outgong", None,
                                        "unknown section (did you mean 'outgoing'?)"),
    "wrong_int": Broken(_set("stream", "outgoing", "retry_count", "three"), "stream",
                        "outgoing", "retry_count",
                        "expected an integer from 0 to 1000000, got 'three'"),
    "negative_int_in_stream_overriding_global": Broken(
        _also(_set("global", "outgoing", "retry_count", "3"),
              _set("stream", "outgoing", "retry_count", "-1")),
        "stream", "outgoing", "retry_count", "got '-1'"),
    "port_out_of_range": Broken(_set("stream", "outgoing", "target_port", "70000"), "stream",
                                "outgoing", "target_port", "from 1 to 65535"),
    "wrong_bool": Broken(_set("stream", "data_stream", "deletion_enabled", "maybe"), "stream",
                         "data_stream", "deletion_enabled", "expected true or false"),
    "wrong_duration": Broken(_set("stream", "data_stream", "settle_seconds", "5 weeks"),
                             "stream", "data_stream", "settle_seconds", "a duration"),
    "wrong_duration_in_global_file": Broken(
        _set("global", "global", "general_poll_interval", "soon"), "global", "global",
        "general_poll_interval", "got 'soon'"),
    "wrong_size": Broken(_set("stream", "outgoing", "batch_max_bytes", "10Q"), "stream",
                         "outgoing", "batch_max_bytes", "a size in bytes"),
    "bad_enum_with_hint": Broken(_set("stream", "outgoing", "transfer_mode", "moove"),
                                 "stream", "outgoing", "transfer_mode",
                                 "expected one of move, mirror, got 'moove' "
                                 "(did you mean 'move'?)"),
    "protocol_unknown": Broken(
        _set("stream", "outgoing", "transfer_protocol", "sftpp"), "stream", "outgoing",
        "transfer_protocol", "got 'sftpp' (did you mean 'sftp'?)"),
    "rsync_native_without_module": Broken(
        _set("stream", "outgoing", "transfer_protocol", "rsync_native"), "stream",
        "rsync_native", "module", "is required with transfer_protocol rsync_native"),
    "missing_target_dir": Broken(_unset("outgoing", "target_dir"), "stream", "outgoing",
                                 "target_dir", "is required"),
    "relative_target_dir": Broken(_set("stream", "outgoing", "target_dir", "archive"),
                                  "stream", "outgoing", "target_dir", "an absolute path"),
    "missing_target_host": Broken(_unset("outgoing", "target_host"), "stream", "outgoing",
                                  "target_host", "is required"),
    "missing_transfer_mode": Broken(_unset("outgoing", "transfer_mode"), "stream", "outgoing",
                                    "transfer_mode", "MiStaMover defaulted to move"),
    "stop_file_with_slash": Broken(_set("stream", "outgoing", "stop_file", "run/.stop"),
                                   "stream", "outgoing", "stop_file", "a plain file name"),
    "directory_does_not_exist": Broken(
        _set("stream", "data_stream", "directory", "/nonexistent/proj1"), "stream",
        "data_stream", "directory", "/nonexistent/proj1: No such file or directory"),
    "directory_under_a_regular_file": Broken(_directory_under_a_file, "stream", "data_stream",
                                             "directory", "Not a directory"),
    "directory_unreadable": Broken(_directory_unreadable, "stream", "data_stream", "directory",
                                   "not readable"),
    "interpolation_to_missing_key": Broken(
        _set("stream", "outgoing", "target_dir", "$(global:archive_root)/proj1"),
        "stream", "outgoing", "target_dir", "$(global:archive_root) refers to a key that is"
        " not set"),
    "interpolation_to_misspelt_key": Broken(
        _also(_set("global", "global", "archive_root", "/data"),
              _set("stream", "outgoing", "target_dir", "$(global:archive_rot)/proj1")),
        "global", "global", "archive_root", "is $(global:archive_rot) a misspelling?"),
    "interpolation_cycle": Broken(_cycle, "global", "global", "b",
                                  "interpolation cycle: $(global:a) -> $(global:b) -> "
                                  "$(global:a)"),
    "stream_not_in_data_stream_list": Broken(lambda c: None, "global", "global",
                                             "data_stream_list", "'proj2' is not listed",
                                             stream="proj2"),
    "stream_file_missing": Broken(_set("global", "global", "data_stream_list", "proj1 proj2"),
                                  "global", "global", "data_stream_list",
                                  "no file for stream 'proj2'", stream="proj2"),
    "bad_stream_name": Broken(_set("global", "global", "data_stream_list", "proj1, bad/name"),
                              "global", "global", "data_stream_list",
                              "'bad/name' is not a valid stream name"),
    "name_differs_from_listed_name": Broken(_set("stream", "data_stream", "name", "proj9"),
                                            "stream", "data_stream", "name",
                                            "differs from the stream's name 'proj1'"),
    "spool_dir_inside_directory": Broken(
        lambda c: c.stream["data_stream"].update(spool_dir=str(c.data / "spool")), "stream",
        "data_stream", "spool_dir", "inside the stream's directory"),
    "spool_dir_parent_missing": Broken(
        _set("stream", "data_stream", "spool_dir", "/nonexistent/spool/proj1"), "stream",
        "data_stream", "spool_dir", "parent directory /nonexistent/spool does not exist"),
    "password_in_email": Broken(_set("stream", "email", "password", "hunter2"), "stream",
                                "email", "password", "use password_file or a systemd credential"),
    "level_low_not_below_level_good": Broken(_levels, "global", "disk_space_monitor",
                                             "level_low",
                                             "level_low (1500) must be below level_good (1000)"),
    "ready_marker_without_name": Broken(_set("stream", "data_stream", "ready_marker", "DONE"),
                                        "stream", "data_stream", "ready_marker",
                                        "containing {name}"),
    "identity_file_missing": Broken(
        _set("stream", "rsync_ssh", "identity_file", "/nonexistent/id_ed25519"), "stream",
        "rsync_ssh", "identity_file", "not a readable file"),
    "starttls_and_ssl": Broken(_also(_set("global", "email", "starttls", "yes"),
                                     _set("global", "email", "ssl", "yes")),
                               "global", "email", "ssl", "cannot both be on"),
}

CASES = [pytest.param(name, id=name) for name in BROKEN]


def _check_in_process(conf: Conf, stream: str) -> subprocess.CompletedProcess[str]:
    """The same command, run in this process (so a monkeypatch applies)."""
    from click.testing import CliRunner

    from mstm.cli.send import main

    r = CliRunner().invoke(main, ["--config", str(conf.global_file), "--check", stream])
    return subprocess.CompletedProcess([], r.exit_code, r.stdout, r.stderr)


def _check(conf: Conf, stream: str) -> subprocess.CompletedProcess[str]:
    """Run the installed `mstm-send --config GLOBAL --check STREAM`."""
    assert MSTM_SEND.exists(), f"{MSTM_SEND} is not installed (pip install -e .)"
    env = {k: v for k, v in os.environ.items()
           if k not in ("MSTM_CONFIG", "RUNTIME_DIRECTORY", "JOURNAL_STREAM")}
    return subprocess.run(
        [str(MSTM_SEND), "--config", str(conf.global_file), "--check", stream],
        capture_output=True, text=True, env=env, cwd=conf.root, timeout=60, check=False)


def _prepare(tmp_path: Path, name: str) -> tuple[Conf, Broken, Path]:
    conf = Conf(tmp_path)
    case = BROKEN[name]
    case.edit(conf)
    conf.write()
    expected = {"global": conf.global_file, "stream": conf.stream_file,
                "missing": conf.global_file}[case.file]
    return conf, case, expected


def test_there_are_at_least_twelve_broken_configuration_cases() -> None:
    assert len(BROKEN) >= 12


@pytest.mark.parametrize("name", CASES)
def test_broken_configuration_raises_config_error_naming_file_section_key_and_reason(
        tmp_path: Path, name: str, monkeypatch: pytest.MonkeyPatch) -> None:
    conf, case, expected_file = _prepare(tmp_path, name)
    _deny_access_as_root(monkeypatch, name)
    with pytest.raises(ConfigError) as info:
        load_stream(case.stream, conf.global_file)
    err = info.value
    assert (err.file, err.section, err.key) == (str(expected_file), case.section, case.key)
    assert case.reason in err.reason
    assert "\n" not in str(err)
    assert err.exit_code == EXIT_CONFIG


@pytest.mark.parametrize("name", CASES)
def test_broken_configuration_makes_mstm_send_check_exit_78_with_one_line_on_stderr(
        tmp_path: Path, name: str, monkeypatch: pytest.MonkeyPatch) -> None:
    conf, case, expected_file = _prepare(tmp_path, name)
    if _deny_access_as_root(monkeypatch, name):
        result = _check_in_process(conf, case.stream)
    else:
        result = _check(conf, case.stream)
    assert "Traceback" not in result.stderr
    lines = result.stderr.splitlines()
    assert len(lines) == 1, result.stderr
    line = lines[0]
    assert str(expected_file) in line
    if case.section:
        assert f"[{case.section}]" + (f" {case.key}" if case.key else "") in line
    assert case.reason in line
    assert result.returncode == EXIT_CONFIG, result.stderr


def test_valid_configuration_makes_mstm_send_check_exit_0(tmp_path: Path) -> None:
    conf = Conf(tmp_path)
    conf.write()
    result = _check(conf, "proj1")
    assert result.returncode == 0, result.stderr
    assert "Traceback" not in result.stderr
