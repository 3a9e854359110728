"""The programs run at a target (mstm.transports.remote), called directly on a tmp tree."""

from __future__ import annotations

import ast
import hashlib
import io
import os
import stat
import subprocess
import sys
from pathlib import Path

import pytest

from mstm.transports import stream
from mstm.transports.remote import hasher, program, sftp_inspect, stage, stream_receiver
from mstm.transports.rsync_ssh import parse_inspect, parse_publish
from mstm.transports.sftp_requests import parse_inspect as parse_sftp_inspect

PROGRAMS = ["hasher.py", "stage.py", "stream_receiver.py", "sftp_inspect.py"]
SCRIPTS = ["inspect.sh", "stage.sh", "run_stage.sh", "put.sh", "await.sh", "exchange.sh"]


def test_the_programs_need_no_python_newer_than_3_4() -> None:
    """A target's python3 may be 3.4 (Debian 9, Ubuntu 16.04, SLES 12, CentOS 7's python34):
    no newer syntax or library call (vermin knows which version brought each; annotations,
    were there any, are judged as if evaluated).  The typing import that only mypy sees is
    marked "# novm"; the next test checks that it never runs."""
    vermin = Path(sys.executable).with_name("vermin")
    if not vermin.exists():
        pytest.skip("vermin is not installed (pip install -e '.[test]')")
    paths = [str(Path(stage.__file__).with_name(n)) for n in PROGRAMS]
    run = subprocess.run([str(vermin), "--target=3.4-", "--violations", "--no-tips",
                          "--eval-annotations", *paths],
                         capture_output=True, text=True, check=False)
    assert run.returncode == 0, run.stdout + run.stderr


def _is_mypy_only(node: ast.stmt) -> bool:
    """``if MYPY:``, whose body only mypy sees: it never runs (MYPY = False)."""
    return (isinstance(node, ast.If) and isinstance(node.test, ast.Name)
            and node.test.id == "MYPY")


@pytest.mark.parametrize("name", PROGRAMS)
def test_the_programs_type_only_in_comments_and_never_import_typing(name: str) -> None:
    """Python 3.4 has no typing module and evaluates annotations: types are comments
    (mypy reads them), typing is imported only under ``if MYPY:`` with MYPY = False,
    and there is no "from __future__ import annotations" (3.7+)."""
    tree = ast.parse(program(name), name)
    assert any(isinstance(n, ast.Assign) and [ast.unparse(t) for t in n.targets] == ["MYPY"]
               and isinstance(n.value, ast.Constant) and n.value.value is False
               for n in tree.body)
    assert not any(isinstance(n, ast.Assign) and "MYPY" in map(ast.unparse, n.targets)
                   and not (isinstance(n.value, ast.Constant) and n.value.value is False)
                   for n in ast.walk(tree))
    mypy_only = {id(n) for top in tree.body if _is_mypy_only(top)
                 for s in top.body for n in ast.walk(s)}
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom):
            assert node.module != "__future__", ast.unparse(node)
        modules = ([a.name for a in node.names] if isinstance(node, ast.Import)
                   else [node.module or ""] if isinstance(node, ast.ImportFrom) else [])
        if any(m == "typing" or m.startswith("typing.") for m in modules):
            assert id(node) in mypy_only, f"{name}:{node.lineno}: typing imported at run time"
        if isinstance(node, ast.AnnAssign):
            pytest.fail(f"{name}:{node.lineno}: a variable annotation")
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
            args = node.args
            every = [*args.posonlyargs, *args.args, *args.kwonlyargs, args.vararg, args.kwarg]
            assert node.returns is None and all(a is None or a.annotation is None
                                                for a in every), \
                f"{name}:{node.lineno}: an annotation (a type comment instead)"


def test_the_stream_receivers_header_has_the_fields_mypy_sees() -> None:
    """Header is collections.namedtuple at run time and typing.NamedTuple for mypy: the
    same fields in the same order."""
    tree = ast.parse(program("stream_receiver.py"))
    typed = [n for top in tree.body if _is_mypy_only(top) for n in top.body
             if isinstance(n, ast.Assign) and ast.unparse(n.targets[0]) == "Header"]
    assert len(typed) == 1 and isinstance(typed[0].value, ast.Call)
    pairs = typed[0].value.args[1]  # NamedTuple("Header", [("dest", bytes), ...])
    assert isinstance(pairs, ast.List)
    fields = tuple(ast.literal_eval(p.elts[0]) for p in pairs.elts if isinstance(p, ast.Tuple))
    assert len(fields) == len(pairs.elts) == 8
    assert fields == stream_receiver.Header._fields


def sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def dirfd(path: Path) -> int:
    return os.open(path, os.O_RDONLY | os.O_DIRECTORY)


@pytest.mark.parametrize("name", PROGRAMS)
def test_each_program_is_sent_as_its_module_text_and_runs_only_as_a_script(name: str) -> None:
    text = program(name)
    ast.parse(text, name, feature_version=(3, 4))  # what a target's python3 may be
    assert 'if __name__ == "__main__":' in text
    assert "import mstm" not in text and "from mstm" not in text


@pytest.mark.parametrize("name", SCRIPTS)
def test_each_shell_script_parses(name: str) -> None:
    subprocess.run(["sh", "-n", "-c", program(name)], check=True)


def test_the_hasher_answers_sizes_the_split_mark_and_digests(tmp_path: Path) -> None:
    (tmp_path / "sub").mkdir()
    (tmp_path / "a b").write_bytes(b"one")
    (tmp_path / "sub" / "c").write_bytes(b"three")
    (tmp_path / "link").symlink_to("a b")
    names, known = hasher.read_request(b"a b\0sub/c\0link\0sub\0gone\0")
    assert known == {}
    fd = dirfd(tmp_path)
    try:
        out = hasher.answer(fd, names, known)
    finally:
        os.close(fd)
    sizes, sums = out.split(b"--mstm-split--\0")
    assert sizes.startswith(b"3 a b\0" + b"5 sub/c\0")
    assert sums == (sha(b"one").encode() + b"  a b\0" + sha(b"three").encode() + b"  sub/c\0")
    got = parse_inspect(out)
    assert got["a b"].sha256 == sha(b"one") and got["link"].sha256 is None
    assert "gone" not in got


def test_the_hasher_never_follows_a_link_on_the_way(tmp_path: Path) -> None:
    outside = tmp_path / "outside"
    outside.mkdir()
    (outside / "f").write_bytes(b"secret")
    (tmp_path / "t").mkdir()
    (tmp_path / "t" / "via").symlink_to(outside)
    fd = dirfd(tmp_path / "t")
    try:
        assert parse_inspect(hasher.answer(fd, [b"via/f", b"../outside/f"], {})) == {}
    finally:
        os.close(fd)


def test_the_hasher_reads_the_streamed_digests_after_the_slash_record() -> None:
    names, known = hasher.read_request(b"f\0/\0" + b"5 7 9 " + b"ab" * 32 + b"\0f\0")
    assert names == [b"f"] and known == {b"f": (5, 7, 9, b"ab" * 32)}


def staged_tree(target: Path, batch: str, files: dict[str, bytes]) -> None:
    for rel, data in files.items():
        p = target / ".mstm-staging" / batch / rel
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_bytes(data)


def publish(target: Path, batch: bytes, request: bytes) -> dict[str, tuple[bool, str]]:
    out = io.BytesIO()
    fd = dirfd(target)
    try:
        stage.do_publish(fd, batch, request, out)
    finally:
        os.close(fd)
    return parse_publish(out.getvalue())


def test_open_makes_private_staging_and_partial_directories_and_removes_stale_batches(
        tmp_path: Path) -> None:
    target = tmp_path / "t"
    target.mkdir()
    old, young = "20240101T000000000000-0123456789ab", "20240101T000000000000-aaaaaaaaaaaa"
    other = "x"
    staged_tree(target, old, {"f": b"f"})
    staged_tree(target, young, {"f": b"f"})
    staged_tree(target, other, {"f": b"f"})
    for name in (old, other):
        for p in (target / ".mstm-staging" / name / "f", target / ".mstm-staging" / name):
            os.utime(p, (1, 1))
    out = io.BytesIO()
    fd = dirfd(target)
    try:
        stage.do_open(fd, out)
    finally:
        os.close(fd)
    assert out.getvalue() == b"R " + old.encode() + b"\n"
    assert sorted(os.listdir(target / ".mstm-staging")) == sorted([young, other])
    for d in (".mstm-staging", ".mstm-partial"):
        assert stat.S_IMODE((target / d).stat().st_mode) == 0o700


def test_publish_renames_files_merges_directories_and_clears_setuid(tmp_path: Path) -> None:
    target = tmp_path / "t"
    staged_tree(target, "b1", {"f": b"new", "run/a": b"a", "run/sub/b": b"b"})
    (target / ".mstm-staging/b1/run/a").chmod(0o4755)
    (target / "f").write_bytes(b"old")
    (target / "run").mkdir()
    (target / "run/theirs").write_bytes(b"theirs")
    got = publish(target, b"b1", b"Ff\0Drun\0")
    assert got == {"f": (True, ""), "run": (True, "")}
    assert (target / "f").read_bytes() == b"new"
    assert (target / "run/theirs").read_bytes() == b"theirs"
    assert (target / "run/sub/b").read_bytes() == b"b"
    assert (target / "run/a").stat().st_mode & 0o7777 == 0o755


def test_publish_refuses_a_symlink_on_the_way_and_changes_nothing(tmp_path: Path) -> None:
    target, outside = tmp_path / "t", tmp_path / "outside"
    outside.mkdir()
    staged_tree(target, "b1", {"w/x": b"x", "d/y": b"y"})
    (target / "w").symlink_to(outside)
    (target / "d").symlink_to(outside)
    got = publish(target, b"b1", b"Fw/x\0Dd\0")
    assert got == {"w/x": (False, "w at the target is a symbolic link"),
                   "d": (False, "d at the target is a symbolic link")}
    assert os.listdir(outside) == []


def test_publish_refuses_a_type_conflict_and_a_fifo(tmp_path: Path) -> None:
    target = tmp_path / "t"
    staged_tree(target, "b1", {"f/x": b"x", "p/ok": b"ok"})
    os.mkfifo(target / ".mstm-staging/b1/p/fifo")
    (target / "f").write_bytes(b"a file where the item is a directory")
    got = publish(target, b"b1", b"Df\0Dp\0Fmissing\0")
    assert got["f"] == (False, "f at the target is not a directory")
    assert got["p"] == (False, "p/fifo is not a regular file, directory or link")
    assert got["missing"] == (False, "not in the staging directory")
    assert not (target / "p").exists()


def test_publish_without_the_staging_batch_answers_each_item(tmp_path: Path) -> None:
    target = tmp_path / "t"
    target.mkdir()
    got = publish(target, b"b9", b"Fa\0Db\0")
    assert got == {"a": (False, "no staging directory: No such file or directory"),
                   "b": (False, "no staging directory: No such file or directory")}


def test_discard_removes_the_batch_and_never_follows_a_link(tmp_path: Path) -> None:
    target, outside = tmp_path / "t", tmp_path / "outside"
    outside.mkdir()
    (outside / "keep").write_bytes(b"keep")
    staged_tree(target, "b1", {"deep/er/f": b"f"})
    (target / ".mstm-staging/b1/deep/link").symlink_to(outside)
    (target / ".mstm-staging/b1/deep/er").chmod(0o500)
    fd = dirfd(target)
    try:
        stage.do_discard(fd, b"b1")
    finally:
        os.close(fd)
    assert os.listdir(target / ".mstm-staging") == []
    assert (outside / "keep").read_bytes() == b"keep"


def test_the_stage_program_refuses_a_batch_of_another_shape(tmp_path: Path) -> None:
    r = subprocess.run([sys.executable, "-I", "-c", program("stage.py"), str(tmp_path),
                        "discard", "../x"], capture_output=True, check=False)
    assert r.returncode == 4 and r.stdout == b""


def test_the_sftp_hasher_answers_files_and_directories_only(tmp_path: Path) -> None:
    (tmp_path / "d").mkdir()
    (tmp_path / "d/f").write_bytes(b"data")
    (tmp_path / "l").symlink_to("d/f")
    (tmp_path / "via").symlink_to("d")
    fd = dirfd(tmp_path)
    try:
        out = sftp_inspect.answer(fd, b"d\0d/f\0l\0via/f\0gone\0../x\0")
    finally:
        os.close(fd)
    assert out == (b"mstm-inspect 1\0D 0 - d\0F 4 " + sha(b"data").encode() + b" d/f\0end\0")
    assert parse_sftp_inspect(out) is not None


def test_the_stream_receiver_refuses_names_that_are_not_plain(tmp_path: Path) -> None:
    def h(dest: bytes, rel: bytes, final: bytes = b"", part: bytes = b""
          ) -> stream_receiver.Header:
        return stream_receiver.Header(dest, rel, final, part, 1, 0o644, 0, False)

    assert not stream_receiver.refused(h(b"/t/.mstm-staging/b", b"a/b c", b"/t", b"/t/p"))
    for bad in (h(b"rel", b"a"), h(b"/t", b"/a"), h(b"/t", b"a/../b"), h(b"/t", b"a//b"),
                h(b"/t", b"a\0b"), h(b"/t", b"a", final=b"rel"), h(b"/t", b"a", part=b"p")):
        assert stream_receiver.refused(bad)


def test_the_stream_receiver_writes_hashes_and_renames_one_file(tmp_path: Path) -> None:
    data = os.urandom(3 << 20)
    dest, part = tmp_path / "t/.mstm-staging/b", tmp_path / "t/.mstm-partial"
    head = stream.header(str(dest), "sub/f", size=len(data), mode=0o4640, mtime_ns=7 * 10**9,
                         force=False, final=str(tmp_path / "t"), partial=str(part))
    r = subprocess.run([sys.executable, "-I", "-c", program("stream_receiver.py")],
                       input=head + data, capture_output=True, check=True, timeout=60)
    lines = r.stdout.splitlines()
    assert lines[0] == b"OFFSET 0"
    done = stream.parse_done(lines[-1])
    assert done is not None and done[:3] == (sha(data), len(data), 7 * 10**9)
    st = (dest / "sub/f").stat()
    assert (dest / "sub/f").read_bytes() == data and st.st_mode & 0o7777 == 0o640
    assert os.listdir(part) == []


def test_the_stream_receiver_answers_error_for_a_bad_header() -> None:
    r = subprocess.run([sys.executable, "-I", "-c", program("stream_receiver.py")],
                       input=b"HELLO 1 2\n", capture_output=True, check=False, timeout=60)
    assert (r.returncode, r.stdout) == (1, b"ERROR bad header\n")
