"""Torture scenarios: print every audit line at the end of the run, whatever -q says."""

from __future__ import annotations

import pytest
from tests.harness.audit import AUDIT_LINES
from tests.torture.rig import PROFILE


def pytest_report_header(config: pytest.Config) -> str:
    return (f"torture: profile={PROFILE.name} iterations={PROFILE.iterations} "
            f"seconds={PROFILE.seconds:g} seed={PROFILE.seed}")


def pytest_terminal_summary(terminalreporter: pytest.TerminalReporter) -> None:
    if AUDIT_LINES:
        terminalreporter.section(f"torture audits (profile {PROFILE.name}, "
                                 f"seed {PROFILE.seed})")
        for line in AUDIT_LINES:
            terminalreporter.write_line(line)
