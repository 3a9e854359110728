"""The linters are part of the suite: ruff and strict mypy must be clean."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
BIN = Path(sys.executable).parent


def test_ruff_finds_nothing_in_the_code_and_tests() -> None:
    r = subprocess.run([str(BIN / "ruff"), "check", "cmds", "tests", "demo"], cwd=ROOT,
                       capture_output=True, text=True, check=False)
    assert r.returncode == 0, r.stdout + r.stderr


def test_mypy_strict_finds_nothing_in_the_package() -> None:
    r = subprocess.run([str(BIN / "mypy")], cwd=ROOT, capture_output=True, text=True,
                       check=False)
    assert r.returncode == 0, r.stdout + r.stderr


def test_no_shell_is_ever_used_to_run_a_program() -> None:
    hits = [f"{p}:{n}" for p in (ROOT / "cmds").rglob("*.py")
            for n, line in enumerate(p.read_text().splitlines(), 1)
            if "shell=True" in line.replace(" ", "") or "os.system(" in line]
    assert hits == []
