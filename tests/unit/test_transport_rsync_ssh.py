"""rsync_ssh's target-side programs and its strict reading of what the target answers."""

from __future__ import annotations

import hashlib
import os
import subprocess
import sys
from pathlib import Path

from mstm.transports.base import TransportOptions
from mstm.transports.remote import program
from mstm.transports.rsync_ssh import RsyncSsh, _looks, parse_inspect, parse_publish
from mstm.transports.ssh import SshConnection, SshTarget
from mstm.transports.stream import header, parse_done

NAMES = [b"plain", b"with space", b"new\nline", b"-leading-dash", b"--rsh=x",
         b"non-utf8-\xff\xfe", b"back\\slash", b"sub/dir/f"]


def run_hasher(cwd: Path, stdin: bytes) -> bytes:
    names = cwd / ".names"
    names.write_bytes(stdin)
    r = subprocess.run([sys.executable, "-I", "-c", program("hasher.py"), str(names)], cwd=cwd,
                       capture_output=True, check=True, timeout=30)
    return r.stdout


def test_the_inspect_script_syncs_before_anything_is_hashed() -> None:
    script = program("inspect.sh")
    sync = script.index("sync -f -- .")
    assert sync < script.index("python3")
    assert sync < script.index("sha256sum")
    assert sync < script.index("stat --printf")


def test_the_python_hasher_answers_like_sha256sum_for_hostile_names(tmp_path: Path) -> None:
    want = {}
    for i, n in enumerate(NAMES):
        p = os.path.join(os.fsencode(tmp_path), n)
        os.makedirs(os.path.dirname(p), exist_ok=True)
        data = os.urandom(i * 1000 + (3 << 20) * (i == 2))
        with open(p, "wb") as f:
            f.write(data)
        want[os.fsdecode(n)] = (len(data), hashlib.sha256(data).hexdigest())
    os.mkfifo(tmp_path / "fifo")  # never opened for reading: no hang
    (tmp_path / "dir").mkdir()
    out = run_hasher(tmp_path, b"".join(n + b"\0" for n in [*NAMES, b"fifo", b"dir", b"gone"]))
    got = parse_inspect(out)
    assert {k: (v.size, v.sha256) for k, v in got.items() if k in want} == want
    assert got["fifo"].sha256 is None and got["dir"].sha256 is None and "gone" not in got
    # the same answer as coreutils gives
    ref = subprocess.run(["sha256sum", "-z", "--", *[os.fsdecode(n) for n in NAMES]],
                         cwd=tmp_path, capture_output=True, check=True).stdout
    assert out.split(b"--mstm-split--\0")[1] == ref


def test_a_streamed_digest_is_answered_only_while_size_mtime_and_inode_hold(
        tmp_path: Path) -> None:
    p = tmp_path / "f"
    p.write_bytes(b"content")
    st = p.stat()
    claimed = "ab" * 32
    hint = f"{st.st_size} {st.st_mtime_ns} {st.st_ino} {claimed}".encode()
    stdin = b"f\0/\0" + hint + b"\0f\0"
    assert parse_inspect(run_hasher(tmp_path, stdin))["f"].sha256 == claimed
    os.utime(p, ns=(st.st_atime_ns, st.st_mtime_ns + 1))
    real = hashlib.sha256(b"content").hexdigest()
    assert parse_inspect(run_hasher(tmp_path, stdin))["f"].sha256 == real


def test_parse_inspect_trusts_nothing_malformed() -> None:
    good = "a" * 64
    out = (b"5 ok\0x bad-size\0" + b"--mstm-split--\0"
           + good.encode() + b"  ok\0" + b"z" * 64 + b"  bad-size\0short  x\0")
    got = parse_inspect(out)
    assert set(got) == {"ok"} and got["ok"].sha256 == good
    assert parse_inspect(b"5 ok\0") == {}  # no split mark: nothing
    assert parse_inspect(b"") == {}


def test_the_polling_scripts_look_often_at_first() -> None:
    assert _looks(0.05) == 5
    assert _looks(0.2) == 20
    assert _looks(10.0) == 20 + 196
    assert _looks(0) == 1


def test_the_stream_header_carries_names_as_data() -> None:
    h = header("/t dir/.mstm-staging/b", "a\nb", size=5, mode=0o640, mtime_ns=7, force=True,
               final="/t dir", partial="/t dir/.mstm-partial")
    first, rest = h.split(b"\n", 1)
    assert first == b"MSTM-STREAM-2 22 3 6 20 5 416 7 1"
    assert rest == b"/t dir/.mstm-staging/ba\nb/t dir/t dir/.mstm-partial"


def _transport(tmp_path: Path, **kw: object) -> RsyncSsh:
    conn = SshConnection(SshTarget(host="archive.example.org"))
    return RsyncSsh(TransportOptions(source_dir=tmp_path, target_dir="/data/in/"), conn=conn,
                    **kw)  # type: ignore[arg-type]


def test_rsync_never_creates_devices_fifos_setuid_bits_or_foreign_owners(tmp_path: Path
                                                                          ) -> None:
    t = _transport(tmp_path)
    t.conn._dir = str(tmp_path)  # a control path, without connecting
    for follow in (False, True):
        t.follow_symlinks = follow
        argv = t.rsync_argv("/data/in/.mstm-staging/b", force=False)
        assert "--chmod=a-st" in argv and "--perms" in argv
        assert {"--no-devices", "--no-specials"} <= set(argv)
        for bad in ("-D", "--devices", "--specials", "--copy-devices", "--write-devices",
                    "-a", "--archive", "-o", "-g", "--owner", "--group", "--super",
                    "--fake-super", "-A", "-X"):
            assert bad not in argv
        assert not [a for a in argv[:argv.index("--")] if a.startswith("-") and
                    not a.startswith("--") and "D" in a]
        assert "--partial-dir=/data/in/.mstm-partial" in argv  # absolute: shared by batches
        assert argv[-1] == "archive.example.org:/data/in/.mstm-staging/b/"


def test_send_refuses_to_write_anywhere_but_a_staging_directory(tmp_path: Path) -> None:
    import pytest

    from mstm.transports.base import Item

    with pytest.raises(ValueError):
        _transport(tmp_path).send([Item("a", 1)])


def test_parse_publish_reads_one_answer_per_item() -> None:
    out = b"O\0a b\0\0E\0run42\0run42/sub at the target is a symbolic link\0E\0\0x\0"
    assert parse_publish(out) == {"a b": (True, ""),
                                  "run42": (False, "run42/sub at the target is a symbolic link")}


def run_stage(target: Path, mode: str, batch: str, stdin: bytes = b"") -> bytes:
    r = subprocess.run([sys.executable, "-I", "-c", program("stage.py"), str(target), mode,
                        batch],
                       input=stdin, capture_output=True, check=True, timeout=60)
    assert r.stdout.endswith(b"MSTM-OK\n"), r.stderr
    return r.stdout[:-8]


def test_the_publish_program_merges_and_never_follows_a_link(tmp_path: Path) -> None:
    target, outside = tmp_path / "t", tmp_path / "outside"
    outside.mkdir()
    staged = target / ".mstm-staging" / "b1"
    for rel, data in (("run/a", b"a"), ("run/sub/b", b"b"), ("f", b"f"), ("w/x", b"x"),
                      ("deep/new/y", b"y")):
        p = staged / rel
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_bytes(data)
    (staged / "run/a").chmod(0o4755)
    (target / "run/sub").mkdir(parents=True)
    (target / "run/theirs").write_bytes(b"theirs")
    (target / "w").symlink_to(outside)
    names = b"".join([b"Drun\0", b"Ff\0", b"Fw/x\0", b"Ddeep\0"])
    got = parse_publish(run_stage(target, "publish", "b1", names))
    assert got["run"] == got["f"] == got["deep"] == (True, "")
    assert not got["w/x"][0] and "symbolic link" in got["w/x"][1]
    assert os.listdir(outside) == []
    assert (target / "run/theirs").read_bytes() == b"theirs"
    assert (target / "run/sub/b").read_bytes() == b"b" and (target / "deep/new/y").exists()
    assert (target / "run/a").stat().st_mode & 0o7777 == 0o755
    run_stage(target, "discard", "b1")
    assert os.listdir(target / ".mstm-staging") == []


def test_parse_done_accepts_one_well_formed_line_only() -> None:
    d = "0a" * 32
    assert parse_done(f"DONE {d} 5 7 9\n".encode()) == (d, 5, 7, 9)
    for bad in (f"DONE {d} 5 7\n", f"DONE {d.upper()} 5 7 9", f"DONE {d} 5 7 9 extra",
                f"DONE {d} -5 7 9", "ERROR no"):
        assert parse_done(bad.encode()) is None
