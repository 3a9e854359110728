"""Debian's prometheus-node-exporter, run as another user as Debian runs it (user
prometheus; here uid 65534), reads the metrics files mstm writes under the units'
UMask=0027, in mstm's own directory or through a symbolic link root made in Debian's
textfile directory (mstm(7), METRICS: user mstm never writes Debian's directory)."""

from __future__ import annotations

import os
import shutil
import subprocess
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest
from tests.conftest import need, need_root
from tests.harness.node_exporter import NodeExporter

from mstm.config import load_stream
from mstm.overview.metrics import TextFile, file_name, stream_families
from mstm.overview.snapshot import push_snapshot
from mstm.spool import ItemRecord, Spool

NOBODY = 65534


class NodeExporterAs(NodeExporter):
    """node_exporter as uid 65534, as Debian runs it as user prometheus."""

    def __init__(self, textfile_dir: Path, log: Path) -> None:
        super().__init__(textfile_dir, log, run_as=[
            need("setpriv"), f"--reuid={NOBODY}", f"--regid={NOBODY}", "--clear-groups",
            "--"])


@pytest.fixture
def world() -> Iterator[Path]:
    """A directory every user may pass through (pytest's basetemp is root's, 0700)."""
    need_root()
    d = Path(tempfile.mkdtemp(prefix="mstm-m2-int-"))
    d.chmod(0o755)
    try:
        yield d
    finally:
        shutil.rmtree(d)


def write_metrics(world: Path) -> Path:
    """A push stream with one queued item; its metrics file written, as the units run
    it, under umask 0027, into <world>/mstm/metrics (0755, as tmpfiles makes it)."""
    metrics = world / "mstm" / "metrics"
    metrics.mkdir(parents=True)
    metrics.chmod(0o755)
    (world / "mstm").chmod(0o751)
    site = world / "site"
    (site / "src").mkdir(parents=True)
    (site / "spool").mkdir()
    (site / "global.ini").write_text(
        f"[global]\ndata_stream_list = proj1\nspool_base_dir = {site / 'spool'}\n"
        f"runtime_dir = {site / 'run'}\nmetrics_dir = {metrics}\n")
    (site / "proj1.ini").write_text(
        f"[data_stream]\ndirectory = {site / 'src'}\n[outgoing]\ntransfer_protocol = local\n"
        f"target_dir = {site / 'dst'}\ntransfer_mode = mirror\n")
    cfg = load_stream("proj1", site / "global.ini")
    with Spool(cfg.spool_dir) as spool:
        spool.enqueue([ItemRecord("a", 123, 1)])
    old = os.umask(0o027)
    try:
        f = TextFile(cfg.metrics_dir, file_name("send", "proj1"))
        assert f.write(lambda: stream_families([push_snapshot(cfg)]))
    finally:
        os.umask(old)
    return metrics / "mstm_send_proj1.prom"


def test_node_exporter_as_another_user_reads_a_file_written_under_umask_027(
        world: Path, tmp_path: Path) -> None:
    prom = write_metrics(world)
    exporter = NodeExporterAs(prom.parent, tmp_path / "node_exporter.log")
    try:
        got = exporter.scrape()
    finally:
        exporter.stop()
    assert got[("node_textfile_scrape_error", ())] == 0, (tmp_path / "node_exporter.log"
                                                           ).read_text()
    assert got[("mstm_queue_items", (("stream", "proj1"),))] == 1
    assert got[("mstm_queue_bytes", (("stream", "proj1"),))] == 123


def test_node_exporter_reads_mstm_files_through_a_link_root_made_in_debians_directory(
        world: Path, tmp_path: Path) -> None:
    """Keeping Debian's textfile directory: root links mstm's file into it (ln -s), and
    node_exporter, as another user, reads through the link; its mtime is the file's, so
    MstmMetricsStale sees a dead writer."""
    prom = write_metrics(world)
    debian = world / "prometheus" / "node-exporter"  # root's, 0755, as Debian makes it
    debian.mkdir(parents=True)
    (debian / "apt.prom").write_text("# HELP apt_upgrades_pending x\n"
                                     "# TYPE apt_upgrades_pending gauge\n"
                                     "apt_upgrades_pending 0\n")
    subprocess.run(["ln", "-s", str(prom), str(debian) + "/"], check=True)
    assert (debian / prom.name).is_symlink()
    exporter = NodeExporterAs(debian, tmp_path / "node_exporter.log")
    try:
        got = exporter.scrape()
    finally:
        exporter.stop()
    assert got[("node_textfile_scrape_error", ())] == 0, (tmp_path / "node_exporter.log"
                                                           ).read_text()
    assert got[("mstm_queue_items", (("stream", "proj1"),))] == 1
    assert got[("apt_upgrades_pending", ())] == 0  # Debian's own files still scraped
    mtimes = {dict(labels)["file"]: v for (name, labels), v in got.items()
              if name == "node_textfile_mtime_seconds"}
    [mine] = [f for f in mtimes if "mstm_" in f]  # what MstmMetricsStale matches
    assert mtimes[mine] == pytest.approx(prom.stat().st_mtime, abs=1)
