"""The systemd units in units/*.in, rendered by the Makefile: valid, documented, hardened.

They are rendered with @bindir@ pointing at this checkout's commands, so that
`systemd-analyze verify` also checks that every ExecStart= names a real executable.
"""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest
from tests.conftest import need

ROOT = Path(__file__).resolve().parents[2]
TEMPLATES = sorted((ROOT / "units").glob("*.in"))
LONG_RUNNING = ("mstm-stream@.service", "mstm-receive@.service", "mstm-diskwatch.service",
                "mstm-alert.service")


@pytest.fixture(scope="module")
def rendered(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    need("make")
    out = tmp_path_factory.mktemp("units")
    bindir = Path(sys.executable).parent
    subprocess.run(["make", "-s", "-C", str(ROOT), "units", f"UNIT_BUILD={out}",
                    f"BINDIR={bindir}"], check=True, capture_output=True, text=True)
    units = {p.name: p for p in sorted(out.iterdir())
             if p.is_file() and not p.name.startswith(".")}
    assert sorted(units) == sorted(t.name.removesuffix(".in") for t in TEMPLATES)
    return units


def settings(unit: Path) -> dict[str, list[str]]:
    """Every Key=value of a unit file (all sections), in order, comments left out."""
    found: dict[str, list[str]] = {}
    for line in unit.read_text().splitlines():
        line = line.strip()
        if not line or line.startswith(("#", ";", "[")):
            continue
        key, _, value = line.partition("=")
        found.setdefault(key.strip(), []).append(value.strip())
    return found


def test_the_expected_units_are_shipped() -> None:
    assert {t.name for t in TEMPLATES} == {
        "mstm-stream@.service.in", "mstm-receive@.service.in", "mstm-diskwatch.service.in",
        "mstm-alert@.service.in", "mstm-alert.service.in", "mstm-send-once@.service.in",
        "mstm-send-once@.timer.in"}


def test_every_unit_passes_systemd_analyze_verify_in_system_mode(rendered: dict[str, Path]
                                                                 ) -> None:
    analyze = need("systemd-analyze")
    r = subprocess.run([analyze, "--system", "verify", "--man=no", *map(str, rendered.values())],
                       capture_output=True, text=True, cwd=next(iter(rendered.values())).parent)
    assert r.returncode == 0 and r.stdout + r.stderr == "", r.stdout + r.stderr


def test_every_unit_has_documentation_naming_pages_that_exist(rendered: dict[str, Path]) -> None:
    pages = {p.name.removesuffix(".md").removesuffix(".md.in")
             for p in (ROOT / "man").glob("*.md*")}
    for name, unit in rendered.items():
        docs = " ".join(settings(unit).get("Documentation", []))
        refs = re.findall(r"man:(mstm[\w.-]*)\((\d)\)", docs)
        assert refs, f"{name}: no Documentation=man:mstm...(N)"
        for page, section in refs:
            assert f"{page}.{section}" in pages, f"{name}: man:{page}({section}) does not exist"


def test_services_are_hardened_and_report_failures_to_mstm_alert(rendered: dict[str, Path]
                                                                 ) -> None:
    analyze = need("systemd-analyze")
    for name, unit in rendered.items():
        if not name.endswith(".service"):
            continue
        s = settings(unit)
        assert s.get("User") == ["mstm"], name
        for key, value in (("ProtectSystem", "strict"), ("NoNewPrivileges", "yes"),
                           ("PrivateTmp", "yes"), ("ProtectHome", "yes"),
                           ("CapabilityBoundingSet", ""),
                           ("SystemCallFilter", "@system-service")):
            assert value in s.get(key, []), f"{name}: {key}={value} missing"
        assert s.get("RestrictAddressFamilies"), name
        if not name.startswith("mstm-alert@"):
            assert s.get("OnFailure") == ["mstm-alert@%n.service"], name
        # exposure 0.0 (safe) .. 10.0 (unsafe); --threshold is in tenths
        r = subprocess.run([analyze, "security", "--offline=yes", "--threshold=20",
                            "--no-pager", str(unit)], capture_output=True, text=True)
        assert r.returncode == 0, f"{name}: exposure above 2.0\n{r.stdout[-400:]}"


def test_long_running_services_notify_and_are_watched(rendered: dict[str, Path]) -> None:
    for name in LONG_RUNNING:
        s = settings(rendered[name])
        assert s["Type"] == ["notify"], name
        assert s.get("WatchdogSec"), name
        assert s["Restart"] == ["on-failure"], name
        assert s.get("RestartSec"), name
    stream = settings(rendered["mstm-stream@.service"])
    assert stream["ExecStart"] == [f"{Path(sys.executable).parent}/mstm-send --follow %i"]
    assert stream["RuntimeDirectory"] == ["mstm/%i"]


def test_every_line_an_admin_may_relax_is_commented(rendered: dict[str, Path]) -> None:
    lines = rendered["mstm-stream@.service"].read_text().splitlines()
    for key in ("ProtectSystem=", "ProtectHome=", "PrivateTmp=", "ReadWritePaths=",
                "CapabilityBoundingSet=", "SystemCallFilter=", "User=", "WatchdogSec=",
                "RestrictAddressFamilies="):
        i = next(i for i, line in enumerate(lines) if line.startswith(key))
        assert lines[i - 1].startswith("#"), f"{key} has no comment above it"


def test_the_once_timer_is_persistent_randomized_and_hourly(rendered: dict[str, Path]) -> None:
    timer = settings(rendered["mstm-send-once@.timer"])
    assert timer["OnCalendar"] == ["hourly"]
    assert timer["Persistent"] == ["true"]
    assert timer.get("RandomizedDelaySec")
    once = settings(rendered["mstm-send-once@.service"])
    assert once["Type"] == ["oneshot"]
    assert once["ExecStart"] == [f"{Path(sys.executable).parent}/mstm-send --once %i"]


def test_the_one_off_run_has_a_bounded_start_timeout_and_says_how_to_raise_it(
        rendered: dict[str, Path]) -> None:
    """A run that never ends would block the timer's next runs forever (issue 14, 4)."""
    unit = rendered["mstm-send-once@.service"]
    once = settings(unit)
    assert once["TimeoutStartSec"] == ["12h"]
    analyze = need("systemd-analyze")
    r = subprocess.run([analyze, "timespan", "12h"], capture_output=True, text=True)
    assert r.returncode == 0 and "43200000000" in r.stdout, r.stdout  # 12 h in µs
    lines = unit.read_text().splitlines()
    i = next(i for i, line in enumerate(lines) if line.startswith("TimeoutStartSec="))
    comment = " ".join(line for line in lines[i - 10:i] if line.startswith("#"))
    assert "TimeoutStartSec=" in comment and "drop-in" in comment  # how to raise it
    assert "resumes" in comment  # and that nothing is lost


def test_the_generator_is_rendered_with_the_venv_python_and_the_global_file(
        tmp_path: Path) -> None:
    need("make")
    subprocess.run(["make", "-s", "-C", str(ROOT), "units", f"UNIT_BUILD={tmp_path}",
                    "PKGLIBDIR=/opt/x/lib/mstm", "SYSCONFDIR=/etc/x"], check=True,
                   capture_output=True, text=True)
    text = (tmp_path / "generator" / "mstm-generator").read_text()
    assert text.splitlines()[0] == "#!/opt/x/lib/mstm/bin/python3 -I"
    assert 'default_config="/etc/x/mstm/global.ini"' in text
