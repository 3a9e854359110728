"""Shared fixtures: a real sshd on loopback and a stream configured against it.

A test that needs a program the machine lacks skips on a laptop, but under CI=true the
skip becomes a failure: no capability counts as tested by a skip.
"""

from __future__ import annotations

import os
import shutil
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
from tests.harness.sshd import SSHD, LoopbackSshd
from tests.harness.streams import StreamEnv

# No test writes into the machine's node_exporter directory (the default metrics_dir):
# a configuration that wants metrics files says where (mstm.overview.metrics).
os.environ.setdefault("MSTM_METRICS_DIR", "")

# Hostile-source tests build trees 1,000+ levels deep; pytest removes old base
# temporary directories with shutil.rmtree, which recurses once per level.
sys.setrecursionlimit(max(sys.getrecursionlimit(), 20_000))


def need(program: str) -> str:
    path = shutil.which(program) or (program if os.path.exists(program) else None)
    if path:
        return path
    message = f"{program} is not installed"
    if os.environ.get("CI") == "true":
        pytest.fail(f"{message} (CI=true: a skipped capability is an untested one)")
    pytest.skip(message)


def need_root() -> None:
    if os.geteuid() != 0:
        if os.environ.get("CI") == "true":
            pytest.fail("this test needs root (CI=true: a skip is not allowed)")
        pytest.skip("needs root")


@pytest.fixture(scope="session")
def sshd(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LoopbackSshd]:
    need(SSHD)
    need("rsync")
    need("ssh")
    server = LoopbackSshd(root=tmp_path_factory.mktemp("sshd")).start()
    yield server
    server.cleanup()


@pytest.fixture
def fresh_sshd(tmp_path: Path) -> Iterator[LoopbackSshd]:
    """An sshd of the test's own, for tests that stop or pause it."""
    need(SSHD)
    need("rsync")
    server = LoopbackSshd(root=tmp_path / "sshd").start()
    yield server
    server.cleanup()


@pytest.fixture
def stream(tmp_path: Path, sshd: LoopbackSshd) -> StreamEnv:
    return StreamEnv.create(tmp_path, sshd)


@pytest.fixture
def bindir() -> Path:
    return Path(sys.executable).parent


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo[None]):  # type: ignore[no-untyped-def]
    """Under CI=true a skip is a failure: no capability is "tested" by a skip."""
    outcome = yield
    report = outcome.get_result()
    if os.environ.get("CI") == "true" and report.skipped and not hasattr(report, "wasxfail"):
        report.outcome = "failed"
        reason = report.longrepr[2] if isinstance(report.longrepr, tuple) else report.longrepr
        report.longrepr = f"skipped under CI=true, which counts as a failure: {reason}"
