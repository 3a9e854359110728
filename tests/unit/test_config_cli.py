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
    import mstm.config.build

    real = os.access

    def access(path: object, mode: int, **kw: object) -> bool:  # directories: denied
        return False if os.path.isdir(path) else real(path, mode)  # type: ignore[arg-type]

    monkeypatch.setattr(mstm.config.build.os, "access", access)
    return True

def _local_target(where: str) -> Callable[[Conf], None]:
    """transfer_protocol = local with target_dir *where* ("inside", "around", "same")
    the stream directory."""
    def edit(c: Conf) -> None:
        target = {"inside": c.data / "out", "around": c.data.parent, "same": c.data}[where]
        c.stream["outgoing"].update(transfer_protocol="local", target_dir=str(target))
    return edit


BROKEN = {
    "local_target_inside_the_stream": Broken(_local_target("inside"), "stream", "outgoing",
                                             "target_dir", "lie one inside the other"),
    "local_target_around_the_stream": Broken(_local_target("around"), "stream", "outgoing",
                                             "target_dir", "lie one inside the other"),
    "local_target_is_the_stream": Broken(_local_target("same"), "stream", "outgoing",
                                         "target_dir", "lie one inside the other"),
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


# --------------------------------------------------------------------------- hostile values
# Issue #12, class 7: values that once escaped as ValueError, OverflowError,
# RecursionError or OSError (exit 70 with a traceback under -vv), or hung, or were
# accepted and crashed later (time.sleep, timedelta).  Each must be one ConfigError.

HUGE = "9" * 400
SECRET = "hunter2-SECRET"


def _chain(n: int, where: str = "target_dir") -> Callable[[Conf], None]:
    def edit(c: Conf) -> None:
        c.glob["global"].update({f"k{i}": f"$(global:k{i + 1})" for i in range(n)})
        c.glob["global"][f"k{n}"] = "/x"
        c.stream["outgoing"][where] = "$(global:k0)"
    return edit


def _doubling(c: Conf) -> None:  # each level doubles the text: 2**30 characters
    c.glob["global"].update({f"k{i}": f"$(global:k{i + 1})$(global:k{i + 1})"
                             for i in range(30)})
    c.glob["global"]["k30"] = "xy"
    c.stream["outgoing"]["target_dir"] = "/$(global:k0)"


def _global_is(kind: str) -> Callable[[Conf], None]:
    def edit(c: Conf) -> None:
        c.write_global = False
        odd = c.root / "odd.ini"
        if kind == "directory":
            odd.mkdir()
        elif kind == "fifo":
            os.mkfifo(odd)
        elif kind == "loop":
            os.symlink(c.root / "loop2.ini", odd)
            os.symlink(odd, c.root / "loop2.ini")
        elif kind == "huge":
            odd.write_bytes(b"#" * (2 << 20))
        elif kind == "latin1":
            odd.write_bytes(b"[global]\ndata_stream_list = proj1\n# caf\xe9\n")
        elif kind == "nul":
            odd.write_bytes(b"[global]\ndata_stream_list = proj1\x00\n")
        c.global_file = odd
    return edit


def _stream_is(kind: str) -> Callable[[Conf], None]:
    def edit(c: Conf) -> None:
        c.stream_text = ""
        original = c.write

        def write() -> None:
            original()
            c.stream_file.unlink()
            if kind == "fifo":
                os.mkfifo(c.stream_file)
            elif kind == "directory":
                c.stream_file.mkdir()
            elif kind == "loop":
                os.symlink(c.root / "loop2.ini", c.stream_file)
                os.symlink(c.stream_file, c.root / "loop2.ini")
            elif kind == "latin1":
                c.stream_file.write_bytes(b"[data_stream]\ndirectory = /caf\xe9\n")
        c.write = write  # type: ignore[method-assign]
    return edit


def _password(section: str, content: bytes | str) -> Callable[[Conf], None]:
    def edit(c: Conf) -> None:
        pw = c.root / "pw"
        if content == "fifo":
            os.mkfifo(pw)
        elif content == "directory":
            pw.mkdir()
        else:
            assert isinstance(content, bytes)
            pw.write_bytes(content)
        if section == "email":
            c.glob["email"] = {"username": "mstm", "password_file": str(pw)}
        else:
            c.stream["outgoing"]["transfer_protocol"] = "rsync_native"
            c.stream["rsync_native"] = {"module": "data", "username": "u",
                                        "password_file": str(pw)}
    return edit


def _h(where: str, section: str, key: str, value: str, reason: str) -> Broken:
    file = "global" if where == "global" else "stream"
    return Broken(_set(where, section, key, value), file, section, key, reason)


YEAR = "at most 1 year"
HOSTILE: dict[str, Broken] = {
    # durations: anything later given to time.sleep, select, waits or timedelta
    **{f"duration_{key}_{label}": _h("stream", section, key, value, reason)
       for section, key in (("data_stream", "settle_seconds"), ("data_stream", "poll_interval"),
                            ("outgoing", "retry_backoff"), ("outgoing", "connect_timeout"),
                            ("outgoing", "stall_seconds"), ("outgoing", "lease_seconds"),
                            ("incoming", "abandoned_batch_seconds"))
       for label, value, reason in (("400_digits", HUGE, YEAR), ("1e30", "1e30", YEAR),
                                    ("1e308", "1e308", YEAR), ("inf", "inf", YEAR),
                                    ("nan", "nan", YEAR), ("negative", "-5", YEAR),
                                    ("over_a_year", "8761h", YEAR))},
    "duration_email_timer_huge": _h("global", "logging", "email_timer", HUGE, YEAR),
    "duration_email_timeout_1e30": _h("global", "email", "timeout", "1e30", YEAR),
    "duration_diskwatch_poll_huge": _h("global", "disk_space_monitor", "poll_interval",
                                       "99999999999999999999h", YEAR),
    "duration_general_poll_huge": _h("global", "global", "general_poll_interval", HUGE, YEAR),
    # integers
    "int_400_digits": _h("stream", "outgoing", "retry_count", HUGE, "from 0 to 1000000"),
    "int_5000_digits": _h("stream", "outgoing", "batch_max_items", "9" * 5000,
                          "(5000 characters)"),
    "int_float_text": _h("stream", "outgoing", "retry_count", "1e3", "got '1e3'"),
    "int_underscores": _h("stream", "outgoing", "retry_count", "1_000", "got '1_000'"),
    "int_priority_huge": _h("stream", "data_stream", "priority", "1" + "0" * 30,
                            "from -1000000000 to 1000000000"),
    "int_negative_bwlimit": _h("stream", "outgoing", "bwlimit", "-1", "from 0 to"),
    "int_max_age_days_overflows_timedelta": _h("stream", "pull", "max_age_days", "1000000000",
                                               "from 0 to 36500"),
    "number_inf": _h("stream", "outgoing", "dir_size_limit", "inf", "got 'inf'"),
    "number_1e400": _h("stream", "outgoing", "dir_size_limit", "1e400", "got '1e400'"),
    "level_huge": _h("global", "disk_space_monitor", "level_good", HUGE, "at most"),
    # ports
    **{f"port_{label}": _h("stream", "outgoing", "target_port", value, "from 1 to 65535")
       for label, value in (("0", "0"), ("65536", "65536"), ("negative", "-22"),
                            ("huge", HUGE), ("float", "22.0"))},
    "port_email": _h("global", "email", "port", "70000", "from 1 to 65535"),
    # sizes
    "size_tib_overflow": _h("stream", "outgoing", "batch_max_bytes",
                            "99999999999999999999999 TiB", "too large: at most 1024T"),
    "size_exponent": _h("stream", "outgoing", "batch_max_bytes", "1e400k", "a size in bytes"),
    "size_400_digits": _h("stream", "outgoing", "batch_max_bytes", HUGE, "a size in bytes"),
    "size_just_over": _h("stream", "outgoing", "batch_max_bytes", "1025T", "too large"),
    "size_control_file": _h("stream", "incoming", "max_control_bytes", "2G", "at most 1G"),
    # references
    "reference_chain_400": Broken(_chain(400), "global", "global", "k31",
                                  "references nested more than 32 deep"),
    "reference_chain_400_to_a_path": Broken(_chain(400, "target_incoming_dir"), "global",
                                            "global", "k31", "nested more than 32 deep"),
    "reference_doubling": Broken(_doubling, "global", "global", "k14",
                                 "longer than 65536 characters"),
    "reference_to_itself": _h("stream", "outgoing", "target_dir", "/a/$(outgoing:target_dir)",
                              "interpolation cycle: $(outgoing:target_dir) -> "
                              "$(outgoing:target_dir)"),
    "reference_missing_section": _h("stream", "outgoing", "target_dir", "$(nowhere:x)",
                                    "refers to a key that is not set"),
    "reference_unclosed": _h("stream", "outgoing", "target_dir", "/a/$(global",
                             "malformed reference"),
    "reference_empty": _h("stream", "outgoing", "target_dir", "/a/$()", "malformed reference"),
    "reference_no_key": _h("stream", "outgoing", "target_dir", "/a/$(global:)",
                           "malformed reference"),
    # paths
    "path_quoted": _h("stream", "data_stream", "directory", '"/data/proj1"',
                      "values are not quoted"),
    "path_single_quoted": _h("stream", "data_stream", "spool_dir", "'/var/spool'",
                             "values are not quoted"),
    "path_relative_directory": _h("stream", "data_stream", "directory", "data/proj1",
                                  "an absolute path"),
    "path_relative_spool_dir": _h("stream", "data_stream", "spool_dir", "spool",
                                  "an absolute path"),
    "path_relative_identity_file": _h("stream", "rsync_ssh", "identity_file", "id_ed25519",
                                      "an absolute path"),
    "path_newline": _h("stream", "data_stream", "spool_dir", "/var/spool\n  mstm",
                       "may not contain control characters"),
    "path_tab": _h("stream", "data_stream", "directory", "/data/a\tb", "control characters"),
    "path_too_long": _h("stream", "data_stream", "spool_dir", "/" + "a/" * 2100,
                        "at most 4095 bytes"),
    "path_component_too_long": _h("stream", "rsync_ssh", "identity_file", "/" + "k" * 300,
                                  "component is at most 255 bytes"),
    "target_dir_dotdot": _h("stream", "outgoing", "target_dir", "/archive/../etc",
                            "may not contain '..'"),
    "target_dir_quoted": _h("stream", "outgoing", "target_dir", "'/archive'",
                            "values are not quoted"),
    "target_dir_newline": _h("stream", "outgoing", "target_dir", "/archive\n  x",
                             "control characters"),
    "stop_file_newline": _h("stream", "outgoing", "stop_file", ".stop\n  x",
                            "control characters"),
    "host_quoted": _h("stream", "outgoing", "target_host", '"archive"', "not quoted"),
    "subject_newline": _h("global", "email", "subject", "alert\n  Bcc: x@example.org",
                          "control characters"),
    # password files: never shown
    **{f"password_{section}_{label}": Broken(_password(section, content),
                                             "global" if section == "email" else "stream",
                                             section, "password_file", reason)
       for section in ("email", "rsync_native")
       for label, content, reason in (
           ("two_lines", f"{SECRET}\n{SECRET}\n".encode(), "more than one line"),
           ("binary", b"\xff\xfe" + SECRET.encode(), "not UTF-8"),
           ("nul", SECRET.encode() + b"\0\n", "control character"),
           ("carriage_return", SECRET.encode() + b"\r\n", "control character"),
           ("huge", SECRET.encode() * 1000, "too large"),
           ("fifo", "fifo", "FIFO"),
           ("directory", "directory", "a directory"))},
    "password_rsync_native_empty": Broken(_password("rsync_native", b"\n"), "stream",
                                          "rsync_native", "password_file", "is empty"),
    # ready_marker: only the literal {name}
    **{f"ready_marker_{label}": _h("stream", "data_stream", "ready_marker", value, reason)
       for label, value, reason in (
           ("index", "{0}", "only {name} may appear in braces"),
           ("attribute", "{name.__class__}", "only {name} may appear in braces"),
           ("conversion", "{name!r}", "only {name} may appear in braces"),
           ("format_spec", "{name:>300}", "only {name} may appear in braces"),
           ("open_brace", "{name}{", "only {name} may appear in braces"),
           ("close_brace", "}{name}", "only {name} may appear in braces"),
           ("escaped", "{{name}}", "only {name} may appear in braces"),
           ("misspelt", "{nam}.done", "only {name} may appear in braces"),
           ("twice", "{name}{name}", "exactly once"),
           ("climbs", "{name}/../x", "no '/'"),
           ("absolute", "/tmp/{name}.done", "no '/'"),
           ("alone", "{name}", "add something"),
           ("too_long", "{name}" + "x" * 200, "too long"))},
    # stream names
    **{f"stream_name_{label}": _h("global", "global", "data_stream_list", f"proj1 {value}",
                                  reason)
       for label, value, reason in (("slash", "a/b", "not a valid stream name"),
                                    ("dots", "..", "not a valid stream name"),
                                    ("hidden", ".x", "not a valid stream name"),
                                    ("dash", "-x", "not a valid stream name"),
                                    ("duplicate", "proj1", "listed twice"),
                                    ("300_characters", "x" * 300, "at most 100 characters"),
                                    ("255_characters", "y" * 255, "at most 100 characters"))},
    # files
    "global_is_a_directory": Broken(_global_is("directory"), "missing", None, None,
                                    "is a directory"),
    "global_is_a_fifo": Broken(_global_is("fifo"), "missing", None, None, "is a FIFO"),
    "global_is_a_symlink_loop": Broken(_global_is("loop"), "missing", None, None,
                                       "Too many levels of symbolic links"),
    "global_is_huge": Broken(_global_is("huge"), "missing", None, None, "too large"),
    "global_not_utf8": Broken(_global_is("latin1"), "missing", None, None,
                              "line 3: not valid UTF-8"),
    "global_nul_byte": Broken(_global_is("nul"), "missing", None, None, "line 2: a NUL byte"),
    "stream_file_is_a_fifo": Broken(_stream_is("fifo"), "stream", None, None, "is a FIFO"),
    "stream_file_is_a_directory": Broken(_stream_is("directory"), "stream", None, None,
                                         "is a directory"),
    "stream_file_is_a_symlink_loop": Broken(_stream_is("loop"), "stream", None, None,
                                            "Too many levels of symbolic links"),
    "stream_file_not_utf8": Broken(_stream_is("latin1"), "stream", None, None,
                                   "line 2: not valid UTF-8"),
    "duplicate_section": Broken(_raw_stream("[data_stream]\ndirectory = {data}\n"
                                            "[data_stream]\nstatus = RUNNING\n"),
                                "stream", "data_stream", None, "line 3: section given twice"),
    "duplicate_key_differing_case": Broken(_raw_stream("[data_stream]\ndirectory = {data}\n"
                                                       "DIRECTORY = {data}\n"),
                                           "stream", "data_stream", "directory",
                                           "key given twice"),
}
HOSTILE_CASES = [pytest.param(name, id=name) for name in HOSTILE]
# a few of them through the real executable too: no traceback, no hang, exit 78
SUBPROCESS_CASES = ["duration_settle_seconds_400_digits", "size_tib_overflow",
                    "reference_chain_400", "reference_doubling", "password_email_two_lines",
                    "global_is_a_fifo", "stream_file_is_a_fifo", "stream_name_255_characters",
                    "ready_marker_attribute", "global_not_utf8"]


def _prepare_hostile(tmp_path: Path, name: str) -> tuple[Conf, Broken, Path]:
    BROKEN[name] = HOSTILE[name]
    try:
        return _prepare(tmp_path, name)
    finally:
        del BROKEN[name]


def _assert_one_line(result: subprocess.CompletedProcess[str], case: Broken,
                     expected_file: Path) -> None:
    assert "Traceback" not in result.stderr
    lines = result.stderr.splitlines()
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith("mstm-")
    assert str(expected_file) in lines[0]
    if case.section:
        assert f"[{case.section}]" + (f" {case.key}" if case.key else "") in lines[0]
    assert case.reason in lines[0], lines[0]
    assert SECRET not in result.stderr
    assert len(lines[0]) < 600, "a value is quoted shortened"
    assert result.returncode == EXIT_CONFIG, result.stderr


@pytest.mark.parametrize("name", HOSTILE_CASES)
def test_hostile_value_is_a_config_error_naming_file_section_key_and_reason(
        tmp_path: Path, name: str) -> None:
    conf, case, expected_file = _prepare_hostile(tmp_path, name)
    with pytest.raises(ConfigError) as info:
        load_stream(case.stream, conf.global_file)
    err = info.value
    assert (err.file, err.section, err.key) == (str(expected_file), case.section, case.key)
    assert case.reason in err.reason
    assert "\n" not in str(err) and SECRET not in str(err)


@pytest.mark.parametrize("name", HOSTILE_CASES)
def test_hostile_value_makes_check_exit_78_with_one_line(tmp_path: Path, name: str) -> None:
    conf, case, expected_file = _prepare_hostile(tmp_path, name)
    _assert_one_line(_check_in_process(conf, case.stream), case, expected_file)


@pytest.mark.parametrize("name", SUBPROCESS_CASES)
def test_hostile_value_makes_the_installed_command_exit_78_without_traceback(
        tmp_path: Path, name: str) -> None:
    conf, case, expected_file = _prepare_hostile(tmp_path, name)
    _assert_one_line(_check(conf, case.stream), case, expected_file)


def _run(command: str, args: list[str]) -> subprocess.CompletedProcess[str]:
    from click.testing import CliRunner

    module = {"mstm-scan": "scan", "mstm-send": "send", "mstm-receive": "receive",
              "mstm-diskwatch": "diskwatch", "mstm-alert": "alert"}[command]
    main = __import__(f"mstm.cli.{module}", fromlist=["main"]).main
    r = CliRunner().invoke(main, args)
    return subprocess.CompletedProcess([], r.exit_code, r.stdout, r.stderr)


EVERY_COMMAND = [("mstm-scan", ["--check", "proj1"]), ("mstm-send", ["--check", "proj1"]),
                 ("mstm-receive", ["--check", "proj1"]), ("mstm-diskwatch", ["--once"]),
                 ("mstm-alert", ["--check"])]


@pytest.mark.parametrize(("command", "args"), EVERY_COMMAND, ids=[c for c, _ in EVERY_COMMAND])
@pytest.mark.parametrize("name", ["global_is_a_fifo", "global_is_a_directory",
                                  "duration_email_timer_huge", "password_email_binary",
                                  "stream_name_300_characters", "reference_doubling"])
def test_every_command_reports_a_bad_global_file_in_one_line_with_78(
        tmp_path: Path, command: str, args: list[str], name: str) -> None:
    conf, case, expected_file = _prepare_hostile(tmp_path, name)
    if name == "reference_doubling":  # in the global file itself
        conf.glob["email"] = {"subject": "$(global:k0)"}
        conf.write()
        case = Broken(case.edit, "global", "global", "k14", case.reason)
    result = _run(command, ["--config", str(conf.global_file), *args])
    _assert_one_line(result, case, expected_file)


@pytest.mark.parametrize("command", ["mstm-send", "mstm-receive", "mstm-diskwatch",
                                     "mstm-alert"])
def test_every_installed_command_says_a_missing_global_file_in_one_line_with_78(
        tmp_path: Path, command: str) -> None:
    args = dict(EVERY_COMMAND)[command]
    r = subprocess.run([str(MSTM_SEND.parent / command), "--config", "/nonexistent/g.ini",
                        *args], capture_output=True, text=True, timeout=60, check=False)
    assert r.returncode == EXIT_CONFIG, r.stderr
    assert r.stderr == f"{command}: /nonexistent/g.ini: cannot read: No such file or directory\n"


def test_a_config_error_with_a_hint_is_still_one_line(capsys: pytest.CaptureFixture[str]) -> None:
    from mstm.cli.common import run_command

    def body() -> int:
        raise ConfigError("is wrong", file="/etc/mstm/g.ini", section="email", key="port",
                          hint="write a number\nfrom 1 to 65535")

    with pytest.raises(SystemExit) as info:
        run_command("mstm-alert", body)
    assert info.value.code == EXIT_CONFIG
    err = capsys.readouterr().err
    assert err == ("mstm-alert: /etc/mstm/g.ini: [email] port: is wrong (hint: write a number"
                   " from 1 to 65535)\n")
