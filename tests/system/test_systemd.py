"""Issue 4, "done when" 1: the installed units under a real systemd and a real journald.

This test runs tests/system/systemd_scenarios.py with pytest inside a private mount
namespace (`unshare -m`), so that the tmpfs mounts it needs never touch the machine;
the scenarios print their own results (pytest -v) into this test's output.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
from tests.conftest import need, need_root
from tests.harness.sshd import SSHD

pytestmark = pytest.mark.system

HERE = Path(__file__).resolve().parent
ROOT = HERE.parents[1]
SCENARIOS = HERE / "systemd_scenarios.py"
TIMEOUT = 240


def test_the_installed_units_under_a_real_systemd_and_journald() -> None:
    need_root()
    for program in ("unshare", "mount", "make", "pandoc", "systemctl", "journalctl",
                    "/lib/systemd/systemd", "/lib/systemd/systemd-journald", SSHD, "ssh",
                    "rsync"):
        need(program)
    if not Path("/srv").is_dir():
        pytest.fail("/srv is needed as a mount point inside the test's namespace")

    env = {**os.environ, "MSTM_SYSTEMD_SANDBOX": "1", "PYTHONDONTWRITEBYTECODE": "1"}
    argv = ["unshare", "--mount", "--propagation", "private", sys.executable, "-m", "pytest",
            "-v", "-p", "no:cacheprovider", "-o", "addopts=", "--durations=0",
            "--rootdir", str(ROOT), str(SCENARIOS)]
    proc = subprocess.Popen(argv, cwd=ROOT, env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, start_new_session=True)
    try:
        output, _ = proc.communicate(timeout=TIMEOUT)
    except subprocess.TimeoutExpired:
        proc.send_signal(signal.SIGINT)  # pytest still runs the teardown: stops what it started
        try:
            output, _ = proc.communicate(timeout=60)
        except subprocess.TimeoutExpired:
            proc.kill()
            output, _ = proc.communicate()
        pytest.fail(f"the scenarios took more than {TIMEOUT} s:\n{output}")
    print(output)
    assert proc.returncode == 0, output
