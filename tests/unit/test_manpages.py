"""The man pages: each builds (pandoc), lints clean (`man --warnings`), has the usual
sections, and agrees with the code: every option of every command's --help, every
setting of the configuration schema, every exit code and every MESSAGE_ID."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
from tests.conftest import need

from mstm import errors
from mstm.config import SCHEMA
from mstm.log import MESSAGE_IDS

ROOT = Path(__file__).resolve().parents[2]
BIN = Path(sys.executable).parent
COMMANDS = ("mstm-scan", "mstm-send", "mstm-receive", "mstm-diskwatch", "mstm-alert")
PAGES = (*(f"{c}.1" for c in COMMANDS), "mstm.conf.5", "mstm-protocol.7", "mstm.7")
# man-db renders without a terminal as plain text; C.UTF-8 keeps "-" a plain hyphen.
MAN_ENV = {**os.environ, "LC_ALL": "C.UTF-8", "MANWIDTH": "100", "MAN_KEEP_FORMATTING": ""}


@pytest.fixture(scope="module")
def built(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    need("make")
    need("pandoc")
    r = subprocess.run(["make", "-s", "-C", str(ROOT), "man"], capture_output=True, text=True)
    assert r.returncode == 0, r.stdout + r.stderr
    pages = {name: ROOT / "build" / "man" / name for name in PAGES}
    for name, path in pages.items():
        assert path.is_file(), f"{name} was not built"
    return pages


def render(page: Path) -> str:
    need("man")
    r = subprocess.run(["man", "-E", "UTF-8", "-l", str(page)], capture_output=True, text=True,
                       env=MAN_ENV, check=True)
    return r.stdout


def section(text: str, title: str) -> str:
    """The body of one top-level section of a rendered page."""
    m = re.search(rf"^{re.escape(title)}\n(.*?)(?=^\S|\Z)", text, re.M | re.S)
    assert m, f"no section {title}"
    return m.group(1)


def help_options(command: str) -> set[str]:
    """Every option string that `COMMAND --help` lists (e.g. -0, --print0, --config)."""
    r = subprocess.run([str(BIN / command), "--help"], capture_output=True, text=True, check=True)
    options_part = r.stdout.split("Options:", 1)[1]
    found: set[str] = set()
    for line in options_part.splitlines():
        m = re.match(r"\s+(-.*?)(?:\s{2,}|$)", line)
        if m:
            found.update(re.findall(r"(?<![\w-])(--?[A-Za-z0-9][\w-]*)", m.group(1)))
    assert "--help" in found and "--config" in found, r.stdout
    return found


def test_every_page_builds_and_man_warnings_print_nothing(built: dict[str, Path]) -> None:
    need("man")
    for name, page in built.items():
        r = subprocess.run(["man", "--warnings", "-E", "UTF-8", "-l", str(page)],
                           capture_output=True, text=True, env=MAN_ENV)
        assert r.returncode == 0 and r.stderr == "", f"{name}:\n{r.stderr}"
        assert len(r.stdout) > 500, name


@pytest.mark.parametrize("command", COMMANDS)
def test_every_option_in_help_appears_in_the_commands_page(built: dict[str, Path],
                                                           command: str) -> None:
    text = render(built[f"{command}.1"])
    options = section(text, "OPTIONS")
    missing = [o for o in sorted(help_options(command))
               if not re.search(rf"(?<![\w-]){re.escape(o)}(?![\w-])", options)]
    assert not missing, f"{command}(1) OPTIONS lacks {missing}"


def test_pages_have_the_usual_sections(built: dict[str, Path]) -> None:
    for name, page in built.items():
        text = render(page)
        wanted = ["NAME", "DESCRIPTION", "SEE ALSO"]
        if name.endswith(".1"):
            wanted += ["SYNOPSIS", "OPTIONS", "EXIT STATUS", "FILES", "EXAMPLES"]
        if name in ("mstm.7", "mstm.conf.5"):
            wanted += ["FILES", "EXAMPLES"]
        for title in wanted:
            assert re.search(rf"^{title}$", text, re.M), f"{name}: no {title} section"
        name_line = " ".join(section(text, "NAME").split())
        assert name_line.startswith(name.rsplit(".", 1)[0] + " - "), f"{name}: {name_line!r}"


def test_mstm_conf_page_documents_every_setting_with_its_default(built: dict[str, Path]) -> None:
    text = section(render(built["mstm.conf.5"]), "SETTINGS")
    parts = re.split(r"^   \[(\w+)\]$", text, flags=re.M)  # subsection headings
    by_section = dict(zip(parts[1::2], parts[2::2], strict=True))
    assert list(by_section) == list(SCHEMA)
    for sect, keys in SCHEMA.items():
        part = by_section[sect]
        for key, spec in keys.items():
            assert re.search(rf"^\s+{re.escape(key)}\b", part, re.M), f"[{sect}] {key} missing"
            plain = spec.default is not None and "$(" not in spec.default and spec.default
            if plain and not spec.ignored and not spec.refused and len(spec.default) < 30:
                assert f"(default: {spec.default})" in " ".join(part.split()), \
                    f"[{sect}] {key}: default {spec.default!r} missing"


def test_the_settings_of_mstm_conf_are_generated_from_the_schema() -> None:
    template = (ROOT / "man" / "mstm.conf.5.md.in").read_text()
    assert template.count("@SETTINGS@") == 1
    for sect in SCHEMA:
        assert f"[{sect}]\n" not in template.split("# SETTINGS")[1].split("# EXAMPLES")[0]


def test_mstm7_exit_status_lists_every_exit_code_of_errors_py(built: dict[str, Path]) -> None:
    exit_status = section(render(built["mstm.7"]), "EXIT STATUS")
    codes = {v for k, v in vars(errors).items() if k.startswith("EXIT_") and isinstance(v, int)}
    assert codes >= {0, 1, 2, 69, 70, 75, 78}
    for code in codes:
        assert re.search(rf"^ +{code}(\s|$)", exit_status, re.M), f"exit status {code} missing"


def test_every_message_id_is_in_mstm7_and_in_the_journal_catalog(built: dict[str, Path]) -> None:
    text = render(built["mstm.7"])
    catalog = (ROOT / "conf" / "mstm.catalog").read_text()
    catalog_ids = re.findall(r"^-- ([0-9a-f]{32})$", catalog, re.M)
    assert sorted(catalog_ids) == sorted(MESSAGE_IDS.values())
    for name, mid in MESSAGE_IDS.items():
        assert re.search(rf"^\s+{name} {mid}$", text, re.M), f"{name} {mid} not in mstm(7)"


def test_see_also_names_only_pages_that_exist(built: dict[str, Path]) -> None:
    ours = {name.rsplit(".", 1)[0] + f"({name.rsplit('.', 1)[1]})" for name in PAGES}
    for name, page in built.items():
        for ref in re.findall(r"\b(mstm[\w.-]*\(\d\))", render(page)):
            assert ref in ours, f"{name} refers to {ref}, which does not exist"
