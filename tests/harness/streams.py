"""A stream configured in a temporary directory, pointed at a loopback sshd."""

from __future__ import annotations

import hashlib
import os
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path

from tests.harness.sshd import LoopbackSshd

BIN = Path(sys.executable).parent


@dataclass
class StreamEnv:
    root: Path
    sshd: LoopbackSshd
    name: str = "proj1"
    settings: dict[str, dict[str, str]] = field(default_factory=dict)
    # write metrics_dir into global.ini (the benchmarks' --before runs older code, which
    # does not know the key: they turn it off and set $MSTM_METRICS_DIR instead)
    metrics: bool = True

    @property
    def source(self) -> Path:
        return self.root / "source"

    @property
    def target(self) -> Path:
        return self.root / "target"

    @property
    def spool(self) -> Path:
        return self.root / "spool" / self.name

    @property
    def global_ini(self) -> Path:
        return self.root / "etc" / "global.ini"

    @classmethod
    def create(cls, root: Path, sshd: LoopbackSshd, name: str = "proj1", *,
               metrics: bool = True, **sections: dict[str, str]) -> StreamEnv:
        env = cls(root=root, sshd=sshd, name=name, metrics=metrics)
        env.source.mkdir(parents=True, exist_ok=True)
        env.target.mkdir(parents=True, exist_ok=True)
        (root / "spool").mkdir(parents=True, exist_ok=True)
        (root / "metrics").mkdir(parents=True, exist_ok=True)  # the .prom files
        env.configure(**sections)
        return env

    def configure(self, **sections: dict[str, str]) -> None:
        base: dict[str, dict[str, str]] = {
            "data_stream": {"directory": str(self.source), "settle_seconds": "0"},
            "outgoing": {
                "target_host": "127.0.0.1", "target_port": str(self.sshd.port),
                "target_dir": str(self.target), "transfer_mode": "move",
                "retry_backoff": "0.2", "retry_backoff_max": "1", "connect_timeout": "5",
            },
            "rsync_ssh": {"identity_file": str(self.sshd.client_key),
                          "known_hosts": str(self.sshd.known_hosts)},
        }
        for layer in (self.settings, sections):  # earlier settings, then these, key by key
            for section, values in layer.items():
                base.setdefault(section, {}).update(values)
        self.settings = base
        etc = self.global_ini.parent
        etc.mkdir(parents=True, exist_ok=True)
        self.global_ini.write_text(
            "[global]\n"
            f"data_stream_list = {self.name}\n"
            f"spool_base_dir = {self.root / 'spool'}\n"
            f"runtime_dir = {self.root / 'run'}\n"
            + (f"metrics_dir = {self.root / 'metrics'}\n" if self.metrics else "")
            + "general_poll_interval = 0.5\n")
        text = ""
        for section, values in base.items():
            text += f"[{section}]\n" + "".join(f"{k} = {v}\n" for k, v in values.items()) + "\n"
        (etc / f"{self.name}.ini").write_text(text)

    def command(self, tool: str, *args: str) -> list[str]:
        return [str(BIN / tool), "--config", str(self.global_ini), *args, self.name]

    def run(self, tool: str, *args: str, timeout: float = 300) -> subprocess.CompletedProcess[str]:
        return subprocess.run(self.command(tool, *args), capture_output=True, text=True,
                              timeout=timeout, check=False)

    def popen(self, tool: str, *args: str, **kw: object) -> subprocess.Popen[bytes]:
        return subprocess.Popen(self.command(tool, *args), **kw)  # type: ignore[call-overload,no-any-return]

    # -- data helpers ------------------------------------------------------------
    def put(self, relpath: str | bytes, data: bytes, *, age: float | None = None) -> Path:
        p = os.path.join(os.fsencode(self.source), os.fsencode(relpath))
        os.makedirs(os.path.dirname(p), exist_ok=True)
        with open(p, "wb") as f:
            f.write(data)
        return Path(os.fsdecode(p))

    def files(self, where: Path) -> dict[bytes, str]:
        """Every file below *where* (bytes relpath -> sha256), hidden ones included."""
        out: dict[bytes, str] = {}
        base = os.fsencode(where)
        for dirpath, _dirs, names in os.walk(base):
            for n in names:
                p = os.path.join(dirpath, n)
                try:
                    with open(p, "rb") as f:
                        out[os.path.relpath(p, base)] = hashlib.sha256(f.read()).hexdigest()
                except FileNotFoundError:  # a temporary file that came and went
                    continue
        return out


def rsync_wrapper(path: Path, log: Path) -> Path:
    """An `rsync` that records each run's --files-from list, then runs the real rsync."""
    path.write_text(f"""#!{sys.executable}
import os, subprocess, sys, time
data = sys.stdin.buffer.read()
with open({str(log)!r}, "ab") as f:
    f.write(b"RUN %d %d\\0" % (os.getppid(), len(data.split(b"\\0")[:-1])) + data)
p = subprocess.run(["rsync", *sys.argv[1:]], input=data)
sys.exit(p.returncode)
""")
    path.chmod(0o755)
    return path


def wrapper_senders(log: Path) -> set[int]:
    """The pids of the mstm-send processes that started the wrapped rsync runs."""
    if not log.exists():
        return set()
    return {int(rec.split()[1]) for rec in log.read_bytes().split(b"\0")
            if rec.startswith(b"RUN ")}


def wrapper_runs(log: Path) -> list[list[bytes]]:
    """The lists of names each wrapped rsync run was given."""
    if not log.exists():
        return []
    runs: list[list[bytes]] = []
    for rec in log.read_bytes().split(b"\0"):
        if rec.startswith(b"RUN "):
            runs.append([])
        elif rec:
            runs[-1].append(rec)
    return runs
