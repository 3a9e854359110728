"""`make demo`: a real stream, end to end, on this one machine.

Starts a throwaway sshd on 127.0.0.1 (its own host key and client key, in a temporary
directory; the machine's ssh set-up is untouched), writes a global.ini and two stream
files from the examples in conf/, then runs `mstm-send --once` for a move stream and a
mirror stream and prints what moved where.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

HERE = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(HERE))

from tests.harness.sshd import LoopbackSshd  # noqa: E402

BIN = Path(sys.executable).parent


def say(text: str) -> None:
    print(f"\n== {text}", flush=True)


def tree(root: Path) -> list[str]:
    return sorted(str(p.relative_to(root)) for p in root.rglob("*") if p.is_file())


def main() -> int:
    work = Path(tempfile.mkdtemp(prefix="mstm-demo-"))
    sshd = LoopbackSshd(root=work / "sshd").start()
    try:
        say(f"a throwaway sshd listens on 127.0.0.1:{sshd.port} (keys in {sshd.root})")
        etc = work / "etc"
        etc.mkdir()
        (work / "spool").mkdir()
        streams = {"moving": "move", "mirroring": "mirror"}
        (etc / "global.ini").write_text(
            "[global]\n"
            f"data_stream_list = {' '.join(streams)}\n"
            f"spool_base_dir = {work / 'spool'}\n"
            f"runtime_dir = {work / 'run'}\n")
        for name, mode in streams.items():
            src = work / "outgoing" / name
            (src / "run 1").mkdir(parents=True)
            for i in range(3):
                (src / f"obs-{i}.nc").write_bytes(os.urandom(64 * 1024))
            (src / "run 1" / "notes with spaces.txt").write_text("hello\n")
            (etc / f"{name}.ini").write_text(
                "[data_stream]\n"
                f"directory = {src}\n"
                "settle_seconds = 0\n\n"
                "[outgoing]\n"
                "target_host = 127.0.0.1\n"
                f"target_port = {sshd.port}\n"
                f"target_dir = {work / 'remote' / name}\n"
                f"transfer_mode = {mode}\n\n"
                "[rsync_ssh]\n"
                f"identity_file = {sshd.client_key}\n"
                f"known_hosts = {sshd.known_hosts}\n")
        print(f"configuration: {etc}/global.ini, moving.ini, mirroring.ini")

        for name, mode in streams.items():
            src = work / "outgoing" / name
            dst = work / "remote" / name
            say(f"stream '{name}' ({mode}): mstm-send --once --json {name}")
            print(f"before: source {src} holds {tree(src)}")
            r = subprocess.run([str(BIN / "mstm-send"), "--config", str(etc / "global.ini"),
                                "--once", "--json", name], capture_output=True, text=True,
                               check=False)
            sys.stderr.write(r.stderr)
            if r.returncode != 0:
                print(f"mstm-send exited {r.returncode}")
                return 1
            summary = json.loads(r.stdout)
            for item in summary["items"]:
                print(f"  delivered {item['path']!r:40} {item['bytes']:>7} bytes  "
                      f"sha256 {item['sha256'][:16]}… verified at the target")
            print(f"after:  source {src} holds {tree(src)}")
            print(f"        target {dst} holds {tree(dst)}")
            verdict = "sources deleted after verification" if mode == "move" else \
                "sources kept (mirror never deletes)"
            print(f"=> {summary['delivered']} items, {summary['delivered_bytes']} bytes in "
                  f"{summary['seconds']} s; {verdict}")

        say("a second mirror run sends nothing: the target is already current")
        r = subprocess.run([str(BIN / "mstm-send"), "--config", str(etc / "global.ini"),
                            "--once", "--json", "mirroring"], capture_output=True, text=True,
                           check=False)
        print(f"delivered {json.loads(r.stdout)['delivered']} items")
        say("done; everything was in " + str(work) + " and is now removed")
        return 0
    finally:
        sshd.cleanup()
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
