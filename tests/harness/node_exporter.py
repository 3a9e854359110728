"""Debian's prometheus-node-exporter on 127.0.0.1, its textfile collector only, scraped
over HTTP (the metrics tests, issue 14)."""

from __future__ import annotations

import subprocess
import time
import urllib.request
from collections.abc import Sequence
from pathlib import Path

from prometheus_client.parser import text_string_to_metric_families
from tests.conftest import need
from tests.harness.sshd import free_port

NODE_EXPORTER = "/usr/bin/prometheus-node-exporter"

Samples = dict[tuple[str, tuple[tuple[str, str], ...]], float]


class NodeExporter:
    """node_exporter reading *textfile_dir*; *run_as* prefixes its command line (for
    example setpriv to another user, as Debian runs it as user prometheus)."""

    def __init__(self, textfile_dir: Path, log: Path, run_as: Sequence[str] = ()) -> None:
        self.port = free_port()
        self.log = log
        self.proc = subprocess.Popen(
            [*run_as, need(NODE_EXPORTER), "--collector.disable-defaults",
             "--collector.textfile", f"--collector.textfile.directory={textfile_dir}",
             f"--web.listen-address=127.0.0.1:{self.port}"],
            stdout=subprocess.DEVNULL, stderr=log.open("wb"))
        deadline = time.monotonic() + 20
        while True:
            try:
                self.scrape()
                return
            except OSError:
                if self.proc.poll() is not None or time.monotonic() > deadline:
                    raise AssertionError(f"node_exporter did not start: {log.read_text()}"
                                         ) from None
                time.sleep(0.1)

    def scrape(self) -> Samples:
        """Every sample served: (name, sorted labels) -> value."""
        with urllib.request.urlopen(f"http://127.0.0.1:{self.port}/metrics", timeout=5) as r:
            text = r.read().decode("utf-8")
        out = {}
        for family in text_string_to_metric_families(text):
            for s in family.samples:
                out[(s.name, tuple(sorted(s.labels.items())))] = s.value
        return out

    def stop(self) -> None:
        self.proc.terminate()
        self.proc.wait(timeout=10)
