"""Scenario 5, hostile input: hostile file names at the source, a symlink pointing outside
the source, a FIFO and a device file in the source, and a hostile peer writing FIFOs,
devices, symlinks and garbage handshake files into the receiver's incoming area while
real batches flow.  Nothing hangs (every command runs under a timeout), nothing outside
the stream's directories is read or written, and the audit is clean.
"""

from __future__ import annotations

import os
import random
import stat
import time
from pathlib import Path

import pytest
from tests.conftest import need_root
from tests.harness.audit import Ledger, TargetObserver, audit
from tests.harness.sshd import LoopbackSshd
from tests.harness.streams import StreamEnv
from tests.torture.rig import PROFILE, Daemon, Daemons, ReceiverConf, wait_until

pytestmark = pytest.mark.integration

NAMES = [
    b"new\nline.dat",
    b"-leading-dash.dat",
    b"--rsh=touch PWNED",
    b"--rsh=sh -c 'touch PWNED2'",
    b"-e sh x.dat",
    b"quote'single\"double.dat",
    b"back\\slash %41 %.dat",
    b"non-utf8-\xff\xfe\x80.dat",
    b"tab\tand\rcr.dat",
    b"star*glob?[1].dat",
    "ünïcødé-日本.dat".encode(),
    b"x" * 255,
    b"-" + b"y" * 254,
    b"deep/" * 1 + b"a.dat",
]


def _deep(depth: int) -> bytes:
    return b"/".join(b"level-%02d" % i for i in range(depth)) + b"/bottom.dat"


def test_hostile_names_symlinks_fifos_devices_and_a_hostile_peer(tmp_path: Path,
                                                                 sshd: LoopbackSshd) -> None:
    need_root()  # mknod of a device file
    rng = random.Random(PROFILE.seed + 500)
    env = StreamEnv.create(tmp_path / "src", sshd, name="hostile")
    rx = ReceiverConf(tmp_path / "rx", env.target)
    env.configure(outgoing={"target_uses_arrival_monitor": "true",
                            "receipt_file_poll_interval": "0.1",
                            "receipt_file_poll_count": "150", "batch_max_items": "7",
                            "retry_count": "2", "retry_backoff": "0.1"})
    ledger = Ledger(env.source)
    names = [*NAMES, _deep(60), b"d" * 200 + b"/" + b"e" * 255, b"-dir/--rsh=x/-f.dat"]
    names += [b"bulk/-%03d\n%s" % (i, bytes([rng.randrange(0x80, 0x100)])) for i in range(40)]
    for n in names:
        ledger.put(n, rng.randrange(0, 5000))
    # not items: a symlink out of the source, a FIFO, a device file, a socket-like mess
    outside = tmp_path / "outside-secret.dat"
    outside.write_bytes(b"secret" * 100)
    src = os.fsencode(env.source)
    os.symlink(outside, os.path.join(src, b"link-to-outside.dat"))
    os.symlink(b"/etc", os.path.join(src, b"link-to-etc"))
    os.mkfifo(os.path.join(src, b"a-fifo.dat"))
    os.mknod(os.path.join(src, b"a-device.dat"), 0o600 | stat.S_IFCHR, os.makedev(1, 3))
    specials = [b"link-to-outside.dat", b"link-to-etc", b"a-fifo.dat", b"a-device.dat"]

    with Daemons() as daemons, TargetObserver(ledger, env.target) as observer:
        daemons.add(Daemon("mstm-receive", rx.argv("-v", "--follow"),
                           tmp_path / "receive.log")).start()
        incoming = env.target / ".mstm-incoming"
        wait_until(incoming.exists, 10)
        # the hostile peer: specials and garbage in the incoming area
        inc = os.fsencode(incoming)
        os.mkfifo(os.path.join(inc, b"20260101T000000000000-aaaaaaaaaaaa.mstm-ctrl"))
        os.mknod(os.path.join(inc, b"20260101T000000000000-bbbbbbbbbbbb.mstm-ctrl"),
                 0o600 | stat.S_IFCHR, os.makedev(1, 3))
        os.symlink(b"/etc/passwd",
                   os.path.join(inc, b"20260101T000000000000-cccccccccccc.mstm-ctrl"))
        garbage = [b"", b"mstm-control 1\n", b"mstm-control 1\nbatch ../../x\nend\n",
                   os.urandom(3000), b"mstm-thanks 1\nbatch 20260101T000000000000-"
                   b"dddddddddddd\nend\n"]
        for k, g in enumerate(garbage):
            (incoming / f"20260101T00000000000{k}-eeeeeeeeeeee.mstm-ctrl").write_bytes(g)
        t0 = time.monotonic()
        first = env.run("mstm-send", "-vv", "--once", "--json", timeout=180)
        took = time.monotonic() - t0
        daemons.stop_all()
        observer.stop()
        skipped_logged = [s for s in specials if os.fsdecode(s) in first.stderr]
        rlog = (tmp_path / "receive.log").read_text(errors="replace")
        quarantined = len(os.listdir(incoming / ".quarantine")) if \
            (incoming / ".quarantine").exists() else 0
        res = audit("hostile", ledger, target=env.target, spool_dirs=[env.spool],
                    observer=observer,
                    extra={"names": len(names), "specials": len(specials),
                           "skipped-logged": len(skipped_logged),
                           "peer-garbage": len(garbage) + 3, "quarantined": quarantined,
                           "seconds": round(took, 1), "seed": PROFILE.seed + 500})
    assert first.returncode == 0, first.stderr[-5000:] + rlog[-3000:]
    res.check(all_delivered=True)
    # nothing but regular files at the target; the specials are not there
    # (the peer's own junk is moved to .mstm-incoming/.quarantine, not published)
    for dirpath, dirs, files in os.walk(os.fsencode(env.target)):
        dirs[:] = [d for d in dirs if d != b".mstm-incoming"]
        for f in files + dirs:
            p = os.path.join(dirpath, f)
            assert not os.path.islink(p), f"a symbolic link at the target: {p!r}"
            assert stat.S_ISREG(os.lstat(p).st_mode) or stat.S_ISDIR(os.lstat(p).st_mode), p
    assert not os.path.lexists(env.target / "link-to-outside.dat")
    assert outside.read_bytes() == b"secret" * 100, "the file outside the source changed"
    assert all(os.path.lexists(os.path.join(src, s)) for s in specials)
    assert set(skipped_logged) == set(specials), f"not logged as skipped: {specials}"
    assert not any(Path(p, "PWNED").exists() for p in (env.root, tmp_path, Path.cwd()))
    assert not any(Path(p, "PWNED2").exists() for p in (env.root, tmp_path, Path.cwd()))
    assert took < 60, f"the run took {took:.0f} s: did something hang?"
    assert quarantined >= len(garbage), rlog[-3000:]
