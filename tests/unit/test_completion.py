"""Shell completion (completion/, issue 14, 6): bash really completes options and the
stream names of the configuration; the zsh scripts parse; the shipped scripts are what
click generates for the commands as they are now."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
from tests.conftest import need

ROOT = Path(__file__).resolve().parents[2]
COMPLETION = ROOT / "completion"
BINDIR = Path(sys.executable).parent
COMMANDS = ("mstm-scan", "mstm-send", "mstm-receive", "mstm-diskwatch", "mstm-alert")
STREAMS = ("alpha", "beta", "gamma.raw")


def complete_var(command: str) -> str:
    return "_" + command.upper().replace("-", "_") + "_COMPLETE"


@pytest.fixture
def config(tmp_path: Path) -> Path:
    etc = tmp_path / "etc"
    etc.mkdir()
    (etc / "global.ini").write_text(f"[global]\ndata_stream_list = {' '.join(STREAMS)}\n"
                                    f"spool_base_dir = {tmp_path / 'spool'}\n")
    for name in STREAMS:
        (etc / f"{name}.ini").write_text(
            f"[data_stream]\ndirectory = {tmp_path / name}\n"
            "[outgoing]\ntarget_host = example.org\ntarget_dir = /x\ntransfer_mode = move\n")
    return etc / "global.ini"


def bash_complete(command: str, words: list[str], env: dict[str, str]) -> list[str]:
    """COMPREPLY after TAB at the end of *words* (the last one being completed)."""
    bash = need("bash")
    script = COMPLETION / "bash" / command
    func = "_" + command.replace("-", "_") + "_completion"
    quoted = " ".join("'" + w.replace("'", "'\\''") + "'" for w in [command, *words])
    program = (f"source {script}\n"
               f"COMP_WORDS=({quoted}); COMP_CWORD={len(words)}\n"
               f"{func} {command}\n"
               'printf "%s\\n" "${COMPREPLY[@]}"\n')
    r = subprocess.run([bash, "--norc", "--noprofile", "-c", program], capture_output=True,
                       text=True, env=env, timeout=60)
    assert r.returncode == 0, r.stderr
    return [line for line in r.stdout.splitlines() if line]


def shell_env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k != "MSTM_CONFIG"}
    env["PATH"] = f"{BINDIR}:{env.get('PATH', '/usr/bin:/bin')}"
    return {**env, **extra}


@pytest.mark.parametrize("command", ["mstm-send", "mstm-scan", "mstm-receive"])
def test_bash_completes_the_stream_names_of_the_configuration(command: str,
                                                              config: Path) -> None:
    env = shell_env(MSTM_CONFIG=str(config))
    assert bash_complete(command, ["--once", ""], env) == list(STREAMS)
    assert bash_complete(command, ["g"], env) == ["gamma.raw"]


def test_bash_completes_stream_names_from_the_file_given_with_config(config: Path) -> None:
    env = shell_env()  # no MSTM_CONFIG: only --config says where
    assert bash_complete("mstm-send", ["--config", str(config), "--status", "a"],
                         env) == ["alpha"]


def test_an_unreadable_configuration_completes_no_stream_and_prints_nothing(
        tmp_path: Path) -> None:
    env = shell_env(MSTM_CONFIG=str(tmp_path / "missing.ini"))
    assert bash_complete("mstm-send", [""], env) == []


@pytest.mark.parametrize(("command", "typed", "expected"), [
    ("mstm-send", "--re", "--retry-failed"),
    ("mstm-send", "--max", "--max-wait"),
    ("mstm-scan", "--print", "--print0"),
    ("mstm-receive", "--po", "--poll"),
    ("mstm-diskwatch", "--dr", "--dry-run"),
    ("mstm-alert", "--ch", "--check"),
])
def test_bash_completes_the_options_of_every_command(command: str, typed: str,
                                                     expected: str, config: Path) -> None:
    assert expected in bash_complete(command, [typed], shell_env(MSTM_CONFIG=str(config)))


@pytest.mark.parametrize("command", COMMANDS)
def test_the_zsh_scripts_parse_and_are_autoloadable(command: str) -> None:
    zsh = need("zsh")
    script = COMPLETION / "zsh" / f"_{command}"
    assert script.read_text().startswith(f"#compdef {command}\n")
    r = subprocess.run([zsh, "-n", str(script)], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr


@pytest.mark.parametrize("shell", ["bash", "zsh"])
@pytest.mark.parametrize("command", COMMANDS)
def test_the_shipped_scripts_are_what_click_generates_now(command: str, shell: str) -> None:
    r = subprocess.run([str(BINDIR / command)], capture_output=True, text=True,
                       env={**os.environ, complete_var(command): f"{shell}_source"})
    assert r.returncode == 0, r.stderr
    shipped = COMPLETION / shell / (command if shell == "bash" else f"_{command}")
    assert shipped.read_text() == r.stdout, (
        f"{shipped} is out of date: regenerate it as completion/README.md says")
