"""rsync_ssh's target-side programs and its strict reading of what the target answers."""

from __future__ import annotations

import hashlib
import os
import subprocess
import sys
from pathlib import Path

from mstm.transports.rsync_ssh import _HASH_PY, _INSPECT_SCRIPT, _looks, parse_inspect
from mstm.transports.stream import header, parse_done

NAMES = [b"plain", b"with space", b"new\nline", b"-leading-dash", b"--rsh=x",
         b"non-utf8-\xff\xfe", b"back\\slash", b"sub/dir/f"]


def run_hasher(cwd: Path, stdin: bytes) -> bytes:
    names = cwd / ".names"
    names.write_bytes(stdin)
    r = subprocess.run([sys.executable, "-I", "-c", _HASH_PY, str(names)], cwd=cwd,
                       capture_output=True, check=True, timeout=30)
    return r.stdout


def test_the_inspect_script_syncs_before_anything_is_hashed() -> None:
    sync = _INSPECT_SCRIPT.index("sync -f -- .")
    assert sync < _INSPECT_SCRIPT.index("python3")
    assert sync < _INSPECT_SCRIPT.index("sha256sum")
    assert sync < _INSPECT_SCRIPT.index("stat --printf")


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
    h = header("/t dir", "a\nb", size=5, mode=0o640, mtime_ns=7, force=True)
    first, rest = h.split(b"\n", 1)
    assert first == b"MSTM-STREAM-1 6 3 5 416 7 1" and rest == b"/t dira\nb"


def test_parse_done_accepts_one_well_formed_line_only() -> None:
    d = "0a" * 32
    assert parse_done(f"DONE {d} 5 7 9\n".encode()) == (d, 5, 7, 9)
    for bad in (f"DONE {d} 5 7\n", f"DONE {d.upper()} 5 7 9", f"DONE {d} 5 7 9 extra",
                f"DONE {d} -5 7 9", "ERROR no"):
        assert parse_done(bad.encode()) is None
