"""Symbolic links in a stream's directory, end to end over every transport.

With ``follow_symlinks = true`` a link to a regular file is an item: the file it points
to is sent, verified at the target and, in move mode, only the link is deleted -- never
the file it points to, which may lie outside the stream directory.  A link to a
directory, a dangling link and a loop are skipped, with nothing crashing.  With the
default ``follow_symlinks = false`` no link is ever sent or touched.
"""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from tests.harness.servers import make_stream
from tests.harness.sshd import LoopbackSshd
from tests.harness.streams import StreamEnv
from tests.integration.test_transport_e2e import PROTOCOLS, start_target, stop_target

pytestmark = pytest.mark.integration

POINTED_TO = b"the content the link points to\n" * 300


@pytest.fixture(params=["rsync_ssh", *PROTOCOLS])
def env(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Any]:
    """A stream sending with each transport; rsync_ssh against the shared loopback sshd."""
    if request.param == "rsync_ssh":
        sshd: LoopbackSshd = request.getfixturevalue("sshd")
        # short: ssh's control socket lives below it (a Unix socket path is short)
        yield StreamEnv.create(Path(tempfile.mkdtemp(prefix="fl", dir=sshd.root.parent)), sshd)
        return
    target = start_target(request.param, tmp_path)
    try:
        yield make_stream(tmp_path / "stream", target)
    finally:
        stop_target(target)


def links(env: Any, outside: Path) -> None:
    """A regular file, a link to a file outside the stream, a link to a directory
    outside, a dangling link and a loop, in the stream's directory."""
    outside.mkdir()
    (outside / "data.dat").write_bytes(POINTED_TO)
    (outside / "dir").mkdir()
    (outside / "dir" / "secret").write_bytes(b"never sent")
    env.put("plain.dat", b"plain")
    os.makedirs(env.source / "sub")
    os.symlink(outside / "data.dat", env.source / "sub" / "link.dat")
    os.symlink(outside / "dir", env.source / "to-dir")
    os.symlink(outside / "nowhere", env.source / "dangling")
    os.symlink("loop-b", env.source / "loop-a")
    os.symlink("loop-a", env.source / "loop-b")


def at_target(env: Any) -> dict[str, str]:
    """Everything under the target's final names: relpath -> sha256, or "->" + link."""
    out: dict[str, str] = {}
    root = env.target
    for dirpath, dirnames, names in os.walk(root):
        dirnames[:] = [d for d in dirnames if not d.startswith(".mstm")]
        for n in [*names, *(d for d in dirnames if os.path.islink(os.path.join(dirpath, d)))]:
            p = os.path.join(dirpath, n)
            rel = os.path.relpath(p, root)
            if os.path.islink(p):
                out[rel] = "->" + os.readlink(p)
            else:
                with open(p, "rb") as f:
                    out[rel] = hashlib.sha256(f.read()).hexdigest()
    return out


def send(env: Any) -> dict[str, Any]:
    r = env.run("mstm-send", "--once", "--json", "-vv")
    assert r.returncode == 0, r.stderr[-3000:]
    out: dict[str, Any] = json.loads(r.stdout)
    return out


def test_a_followed_link_delivers_its_file_and_move_deletes_only_the_link(
        env: Any, tmp_path: Path) -> None:
    env.configure(data_stream={"follow_symlinks": "true"}, outgoing={"retry_count": "0"})
    outside = tmp_path / "outside"
    links(env, outside)

    s = send(env)

    assert s["delivered"] == 2 and s["failed"] == [] and s["skipped"] == []
    assert at_target(env) == {"plain.dat": hashlib.sha256(b"plain").hexdigest(),
                              "sub/link.dat": hashlib.sha256(POINTED_TO).hexdigest()}
    # move mode: the link went, what it points to stayed
    assert not os.path.lexists(env.source / "sub" / "link.dat")
    assert (outside / "data.dat").read_bytes() == POINTED_TO
    assert (outside / "dir" / "secret").read_bytes() == b"never sent"
    # the links that are not items are left alone
    for name in ("to-dir", "dangling", "loop-a", "loop-b"):
        assert os.path.islink(env.source / name), name


def test_a_followed_link_in_mirror_mode_is_sent_once_and_kept(env: Any, tmp_path: Path
                                                                ) -> None:
    env.configure(data_stream={"follow_symlinks": "true"},
                  outgoing={"transfer_mode": "mirror", "retry_count": "0"})
    links(env, tmp_path / "outside")

    first = send(env)
    second = send(env)

    assert first["delivered"] == 2 and second["delivered"] == 0
    assert os.path.islink(env.source / "sub" / "link.dat")
    assert at_target(env)["sub/link.dat"] == hashlib.sha256(POINTED_TO).hexdigest()


def test_links_are_neither_sent_nor_touched_when_not_followed(env: Any, tmp_path: Path
                                                              ) -> None:
    outside = tmp_path / "outside"
    links(env, outside)  # follow_symlinks is off by default

    s = send(env)

    assert s["delivered"] == 1 and s["failed"] == []
    assert at_target(env) == {"plain.dat": hashlib.sha256(b"plain").hexdigest()}
    for name in ("sub/link.dat", "to-dir", "dangling", "loop-a", "loop-b"):
        assert os.path.islink(env.source / name), name
    assert (outside / "data.dat").read_bytes() == POINTED_TO


def test_mstm_scan_queues_a_followed_link_for_a_no_scan_sender(env: Any, tmp_path: Path
                                                               ) -> None:
    env.configure(data_stream={"follow_symlinks": "true"}, outgoing={"retry_count": "0"})
    outside = tmp_path / "outside"
    links(env, outside)

    scan = env.run("mstm-scan", "--once")
    r = env.run("mstm-send", "--once", "--no-scan", "--json")

    assert scan.returncode == 0 and r.returncode == 0, scan.stderr + r.stderr
    assert json.loads(r.stdout)["delivered"] == 2
    assert not os.path.lexists(env.source / "sub" / "link.dat")
    assert (outside / "data.dat").read_bytes() == POINTED_TO


def test_a_link_retargeted_to_a_directory_after_the_scan_is_never_sent_as_a_tree(
        env: Any, tmp_path: Path) -> None:
    env.configure(data_stream={"follow_symlinks": "true"},
                  outgoing={"retry_count": "0", "retry_backoff": "0.1"})
    outside = tmp_path / "outside"
    links(env, outside)
    assert env.run("mstm-scan", "--once").returncode == 0
    os.unlink(env.source / "sub" / "link.dat")
    os.symlink(outside / "dir", env.source / "sub" / "link.dat")

    r = env.run("mstm-send", "--once", "--no-scan", "--json")

    assert r.returncode in (0, 1), r.stderr[-3000:]
    assert not any("secret" in k for k in at_target(env)), at_target(env)
    assert os.path.islink(env.source / "sub" / "link.dat")
    assert (outside / "dir" / "secret").read_bytes() == b"never sent"


def test_scan_print_lists_a_followed_link_and_deletes_nothing(env: Any, tmp_path: Path
                                                              ) -> None:
    env.configure(data_stream={"follow_symlinks": "true"})
    links(env, tmp_path / "outside")

    r = subprocess.run(env.command("mstm-scan", "--once", "-0"), capture_output=True,
                       check=False)

    assert r.returncode == 0, r.stderr
    printed = sorted(os.path.relpath(os.fsdecode(p), env.source)
                     for p in r.stdout.split(b"\0") if p)
    assert printed == ["plain.dat", "sub/link.dat"]
    assert os.path.islink(env.source / "sub" / "link.dat")


def test_a_queued_link_that_became_a_loop_is_skipped_not_a_crash(tmp_path: Path) -> None:
    target = start_target("local", tmp_path)
    env = make_stream(tmp_path / "stream", target)
    env.configure(data_stream={"follow_symlinks": "true"})
    (tmp_path / "outside.dat").write_bytes(POINTED_TO)
    os.symlink(tmp_path / "outside.dat", env.source / "l.dat")
    assert env.run("mstm-scan", "--once").returncode == 0
    os.unlink(env.source / "l.dat")
    os.symlink("l.dat", env.source / "l.dat")  # now a loop

    r = env.run("mstm-send", "--once", "--no-scan", "--json")

    assert r.returncode == 0, r.stderr[-3000:]
    assert json.loads(r.stdout)["skipped"][0]["path"] == "l.dat"
    assert (tmp_path / "outside.dat").read_bytes() == POINTED_TO
