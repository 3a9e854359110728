"""mstm.safefs, the one module through which every source is opened, walked, hashed and
deleted: nothing below a stream directory is ever reached through a symbolic link, FIFOs
and devices are never opened, and trees of any depth work."""

from __future__ import annotations

import errno
import os
import subprocess
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest
from tests.conftest import need_root

from mstm import safefs


def write(path: Path, data: bytes = b"x") -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)


@pytest.fixture(params=["openat2", "component walk"])
def resolver(request: pytest.FixtureRequest) -> Iterator[str]:
    """Every test runs with the kernel's openat2 and with the O_NOFOLLOW walk it falls
    back to where the kernel has none."""
    saved = safefs._openat2_works
    safefs._openat2_works = None if request.param == "openat2" else False
    yield request.param
    safefs._openat2_works = saved


def deep(top: Path, depth: int, name: str = "dddddddd") -> Path:
    """A chain of *depth* directories below *top* (built from descriptors: the path is
    longer than PATH_MAX); returns the relative path of a file at the bottom."""
    top.mkdir(parents=True, exist_ok=True)
    fd = os.open(top, os.O_RDONLY | os.O_DIRECTORY)
    for _ in range(depth):
        os.mkdir(name, dir_fd=fd)
        below = os.open(name, os.O_RDONLY | os.O_DIRECTORY, dir_fd=fd)
        os.close(fd)
        fd = below
    f = os.open("bottom.dat", os.O_WRONLY | os.O_CREAT, 0o644, dir_fd=fd)
    os.write(f, b"bottom")
    os.close(f)
    os.close(fd)
    return "/".join([name] * depth + ["bottom.dat"])


def test_open_regular_reads_through_a_last_link_only_when_following(
        tmp_path: Path, resolver: str) -> None:
    write(tmp_path / "real.dat", b"content")
    (tmp_path / "link").symlink_to("real.dat")
    with safefs.opened_root(tmp_path) as root:
        fd = safefs.open_regular(root, "link", follow_symlinks=True)
        try:
            assert os.read(fd, 100) == b"content"
        finally:
            os.close(fd)
        with pytest.raises(OSError) as err:
            safefs.open_regular(root, "link", follow_symlinks=False)
    assert err.value.errno == errno.ELOOP and err.value.filename == "link"


@pytest.mark.parametrize("follow", [False, True])
def test_a_directory_on_the_way_swapped_for_a_link_is_never_followed(
        tmp_path: Path, resolver: str, follow: bool) -> None:
    write(tmp_path / "outside" / "secret.dat", b"secret")
    write(tmp_path / "stream" / "real" / "a.dat", b"a")
    (tmp_path / "stream" / "sub").symlink_to(tmp_path / "outside")
    (tmp_path / "stream" / "rel").symlink_to("../outside")
    (tmp_path / "stream" / "real" / "up").symlink_to("..")
    with safefs.opened_root(tmp_path / "stream") as root:
        for path in ("sub/secret.dat", "rel/secret.dat", "real/up/real/a.dat"):
            with pytest.raises(OSError) as err:
                safefs.open_regular(root, path, follow_symlinks=follow)
            assert err.value.errno in (errno.ELOOP, errno.ENOTDIR, errno.EXDEV), path
            with pytest.raises(OSError):
                safefs.open_parent(root, path)
        for bad in ("../outside/secret.dat", "/etc/passwd", "a//b", "./a", "", "a/", "a\0b"):
            with pytest.raises(ValueError):
                safefs.open_regular(root, bad)


def test_open_regular_refuses_fifos_devices_directories_and_dangling_links_without_hanging(
        tmp_path: Path, resolver: str) -> None:
    os.mkfifo(tmp_path / "pipe")
    (tmp_path / "to-pipe").symlink_to("pipe")
    (tmp_path / "to-null").symlink_to("/dev/null")
    (tmp_path / "to-dir").symlink_to(tmp_path)
    (tmp_path / "dangling").symlink_to("nowhere")
    (tmp_path / "loop").symlink_to("loop")
    root = safefs.open_root(tmp_path)

    def refused(name: str) -> OSError:
        result: list[BaseException] = []

        def attempt() -> None:
            try:
                os.close(safefs.open_regular(root, name, follow_symlinks=True))
            except BaseException as e:  # handed to the test
                result.append(e)

        t = threading.Thread(target=attempt, daemon=True)
        t.start()
        t.join(10)
        assert not t.is_alive(), f"opening {name} hung"
        assert len(result) == 1 and isinstance(result[0], OSError), name
        assert result[0].filename == name  # a local error, naming the item
        return result[0]

    try:
        assert "FIFO" in str(refused("pipe")) and "FIFO" in str(refused("to-pipe"))
        assert "character device" in str(refused("to-null"))
        assert "a directory" in str(refused("to-dir"))
        assert refused("dangling").errno == errno.ENOENT
        assert refused("loop").errno == errno.ELOOP
    finally:
        os.close(root)


def test_the_stream_directory_itself_may_be_reached_through_a_link(
        tmp_path: Path, resolver: str) -> None:
    write(tmp_path / "real" / "sub" / "a.dat")
    (tmp_path / "stream").symlink_to(tmp_path / "real")  # the configured directory
    with safefs.opened_root(tmp_path / "stream") as root:
        fd, name = safefs.open_parent(root, "sub/a.dat")
        try:
            assert name == "a.dat" and os.stat(name, dir_fd=fd).st_size == 1
        finally:
            os.close(fd)


def test_walk_lists_links_as_links_and_never_enters_them(tmp_path: Path, resolver: str) -> None:
    write(tmp_path / "outside" / "secret.dat")
    write(tmp_path / "s" / "run" / "b" / "f")
    (tmp_path / "s" / "run" / "a").symlink_to(tmp_path / "outside")
    with safefs.opened_root(tmp_path / "s") as root:
        seen = [(e.relpath, e.depth, e.is_dir) for e in safefs.walk(root, "run")]
    assert seen == [("run", 0, True), ("run/a", 1, False), ("run/b", 1, True),
                    ("run/b/f", 2, False)]


def test_a_tree_1500_levels_deep_is_walked_and_pruned(tmp_path: Path, resolver: str) -> None:
    rel = deep(tmp_path / "s" / "top", 1500)
    with safefs.opened_root(tmp_path / "s") as root:
        files = safefs.regular_files(root, "top")
        assert [e.relpath for e in files] == [f"top/{rel}"]
        pruned = safefs.prune(root, "top", lambda _rel, _st: True)
    assert not pruned.errors and pruned.removed == 1502
    assert not (tmp_path / "s" / "top").exists()


def test_prune_removes_exactly_what_it_is_told_then_the_directories_left_empty(
        tmp_path: Path, resolver: str) -> None:
    for rel in ("run/a", "run/sub/b", "run/sub2/c", "run/late"):
        write(tmp_path / rel)
    (tmp_path / "outside").mkdir()
    write(tmp_path / "outside" / "keep")
    (tmp_path / "run" / "sub2" / "ln").symlink_to(tmp_path / "outside")
    verified = {"run/a", "run/sub/b", "run/sub2/c"}
    with safefs.opened_root(tmp_path) as root:
        pruned = safefs.prune(root, "run", lambda rel, _st: rel in verified)
    assert pruned.kept == 2 and sorted(pruned.kept_sample) == ["run/late", "run/sub2/ln"]
    assert sorted(os.listdir(tmp_path / "run")) == ["late", "sub2"]
    assert (tmp_path / "outside" / "keep").exists()  # a link is removed as a link at most



def test_a_followed_link_is_judged_by_the_owner_of_the_file_actually_opened(
        tmp_path: Path, resolver: str) -> None:
    """A link of another user is retargeted, after every earlier check, to a file it does
    not own (an attacker's decoy first, /etc/shadow then): the open itself refuses it."""
    need_root()  # a link owned by another user
    secret = tmp_path / "secret"
    secret.write_bytes(b"root's")
    os.chown(secret, 0, 0)
    decoy = tmp_path / "s" / "decoy"
    write(decoy, b"decoy")
    os.chown(decoy, 1000, 1000)
    (tmp_path / "s" / "data.dat").symlink_to(decoy)
    os.chown(tmp_path / "s" / "data.dat", 1000, 1000, follow_symlinks=False)
    with safefs.opened_root(tmp_path / "s") as root:
        os.close(safefs.open_regular(root, "data.dat", follow_symlinks=True))  # its own file
        (tmp_path / "s" / "data.dat").unlink()
        (tmp_path / "s" / "data.dat").symlink_to(secret)
        os.chown(tmp_path / "s" / "data.dat", 1000, 1000, follow_symlinks=False)
        with pytest.raises(OSError) as err:
            safefs.open_regular(root, "data.dat", follow_symlinks=True)
    assert err.value.errno == errno.EPERM and "another owner" in str(err.value)


def test_a_mount_point_inside_a_tree_is_never_walked_into_nor_pruned(
        tmp_path: Path, resolver: str) -> None:
    """A bind mount of a directory outside the stream (same file system, so the same
    st_dev: the mount id tells) inside a directory item."""
    need_root()
    write(tmp_path / "outside" / "precious", b"p")
    write(tmp_path / "s" / "run" / "a")
    (tmp_path / "s" / "run" / "mnt").mkdir()
    subprocess.run(["mount", "--bind", str(tmp_path / "outside"),
                    str(tmp_path / "s" / "run" / "mnt")], check=True)
    try:
        with safefs.opened_root(tmp_path / "s") as root:
            with pytest.raises(OSError) as err:
                list(safefs.walk(root, "run"))
            assert err.value.errno == errno.EXDEV
            seen = [e.relpath for e in safefs.walk(root, "run", on_error=lambda r, e: None)]
            assert "run/mnt/precious" not in seen
            pruned = safefs.prune(root, "run", lambda _rel, _st: True)
        assert pruned.kept_sample == ["run/mnt"]
        assert (tmp_path / "outside" / "precious").read_bytes() == b"p"
    finally:
        subprocess.run(["umount", str(tmp_path / "s" / "run" / "mnt")], check=False)


# -- rename without replacing, where the file system has no renameat2 ------------------
@pytest.fixture(params=["renameat2", "no renameat2", "no renameat2, no hard links"])
def rename_support(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> str:
    if request.param != "renameat2":
        monkeypatch.setattr(safefs, "_renameat2", None)
    if request.param.endswith("no hard links"):
        def no_link(*args: object, **kwargs: object) -> None:
            raise OSError(errno.EPERM, "Operation not permitted")
        monkeypatch.setattr(safefs.os, "link", no_link)
    return str(request.param)


def _rename(top: Path, src: str, dst: str) -> None:
    fd = os.open(top, os.O_RDONLY | os.O_DIRECTORY)
    try:
        safefs.rename_noreplace(src, dst, src_dir_fd=fd, dst_dir_fd=fd)
    finally:
        os.close(fd)


@pytest.mark.parametrize("taken_by", ["a file", "an empty directory", "a full directory"])
def test_rename_noreplace_never_replaces_what_is_there(tmp_path: Path, rename_support: str,
                                                       taken_by: str) -> None:
    (tmp_path / "src").mkdir()
    write(tmp_path / "src" / "f", b"ours")
    write(tmp_path / "file", b"mine")
    dst = tmp_path / "dst"
    if taken_by == "a file":
        write(dst, b"theirs")
    else:
        dst.mkdir()
        if taken_by == "a full directory":
            write(dst / "g", b"theirs")
    before = sorted(p.name for p in dst.iterdir()) if dst.is_dir() else dst.read_bytes()
    for src in ("src", "file"):
        with pytest.raises(FileExistsError):
            _rename(tmp_path, src, "dst")
    after = sorted(p.name for p in dst.iterdir()) if dst.is_dir() else dst.read_bytes()
    assert after == before
    assert (tmp_path / "src" / "f").read_bytes() == b"ours"
    assert (tmp_path / "file").read_bytes() == b"mine"


def test_rename_noreplace_moves_a_directory_or_a_file_to_a_free_name(
        tmp_path: Path, rename_support: str) -> None:
    (tmp_path / "src").mkdir(mode=0o750)
    write(tmp_path / "src" / "f", b"ours")
    write(tmp_path / "file", b"mine")
    _rename(tmp_path, "src", "moved")
    _rename(tmp_path, "file", "moved-file")
    assert (tmp_path / "moved" / "f").read_bytes() == b"ours"
    assert (tmp_path / "moved").stat().st_mode & 0o777 == 0o750  # the directory itself
    assert (tmp_path / "moved-file").read_bytes() == b"mine"
    assert not (tmp_path / "src").exists() and not (tmp_path / "file").exists()


def test_without_renameat2_a_directory_filled_while_we_rename_is_left_to_its_owner(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The placeholder made for a directory is filled by someone else before our rename:
    theirs stays, ours stays where it was, and the caller hears the name is taken."""
    monkeypatch.setattr(safefs, "_renameat2", None)
    (tmp_path / "src").mkdir()
    write(tmp_path / "src" / "f", b"ours")
    real_rename = os.rename

    def someone_fills_it_first(src: str, dst: str, **kw: int) -> None:
        write(tmp_path / "dst" / "theirs", b"theirs")
        real_rename(src, dst, **kw)

    monkeypatch.setattr(safefs.os, "rename", someone_fills_it_first)
    with pytest.raises(FileExistsError):
        _rename(tmp_path, "src", "dst")
    assert (tmp_path / "dst" / "theirs").read_bytes() == b"theirs"
    assert (tmp_path / "src" / "f").read_bytes() == b"ours"
