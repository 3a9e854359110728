"""Issue 14, 6: `mstm-send --check` warns when the sandbox it runs in cannot write what
move mode must delete (a real read-only bind mount in a private mount namespace), and
a command run as root never leaves root-owned records in a spool another user owns
(a real chown, to a throwaway uid)."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest
from tests.conftest import need, need_root

BINDIR = Path(sys.executable).parent
OWNER = 4242  # no such user is needed: only the number


@pytest.fixture
def base() -> Iterator[Path]:
    """A directory every user can reach (pytest's own are 0700): the owner of the spool
    must read the configuration and reach the spool."""
    path = Path(tempfile.mkdtemp(prefix="mstm-own-"))
    path.chmod(0o755)
    yield path
    shutil.rmtree(path, ignore_errors=True)


def configure(base: Path, mode: str = "move") -> Path:
    etc = base / "etc"
    etc.mkdir()
    (base / "src").mkdir()
    (base / "target").mkdir()
    (base / "spool").mkdir()
    (etc / "global.ini").write_text(f"[global]\ndata_stream_list = proj\n"
                                    f"spool_base_dir = {base / 'spool'}\n")
    (etc / "proj.ini").write_text(
        f"[data_stream]\ndirectory = {base / 'src'}\nsettle_seconds = 0\n"
        f"[outgoing]\ntransfer_protocol = local\ntarget_dir = {base / 'target'}\n"
        f"transfer_mode = {mode}\n")
    return etc / "global.ini"


def mstm(*args: str, config: Path, wrap: list[str] | None = None
         ) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "MSTM_CONFIG": str(config)}
    env.pop("JOURNAL_STREAM", None)  # messages on stderr, as on a terminal
    return subprocess.run([*(wrap or []), str(BINDIR / args[0]), *args[1:]], env=env,
                          capture_output=True, text=True, timeout=120)


def read_only(path: Path) -> list[str]:
    """Run the command in a private mount namespace where *path* is a read-only bind
    mount of itself, as ProtectSystem=strict makes it in a unit."""
    need("unshare")
    need("mount")
    return ["unshare", "--mount", "--propagation", "private", "sh", "-c",
            'mount --bind "$0" "$0" && mount -o remount,bind,ro "$0" && shift 0 && exec "$@"',
            str(path)]


# ----------------------------------------------------------------- --check and the sandbox


def test_check_warns_when_move_mode_could_not_delete_here_and_still_exits_0(
        base: Path) -> None:
    need_root()
    config = configure(base)
    r = mstm("mstm-send", "--check", "proj", config=config, wrap=read_only(base / "src"))
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip() == f"{base / 'etc/proj.ini'}: ok"
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1, r.stderr  # one warning line
    line = lines[0]
    assert f"cannot write {base / 'src'}: it is on a read-only mount here" in line
    assert "move mode deletes delivered sources" in line
    assert "systemctl daemon-reload" in line and f"ReadWritePaths={base / 'src'}" in line
    assert "mstm-send-once@proj" in line


def test_check_is_silent_where_the_directory_is_writable(base: Path) -> None:
    config = configure(base)
    r = mstm("mstm-send", "--check", "proj", config=config)
    assert r.returncode == 0 and r.stderr == "", r.stderr


def test_check_does_not_warn_for_a_mirror_stream_which_never_deletes(base: Path) -> None:
    need_root()
    config = configure(base, mode="mirror")
    r = mstm("mstm-send", "--check", "proj", config=config, wrap=read_only(base / "src"))
    assert r.returncode == 0 and r.stderr == "", r.stderr


def test_a_move_run_under_that_read_only_mount_does_not_lose_the_source(
        base: Path) -> None:
    """What the warning is about: delivered, then not deleted (parked, exit 1); the
    source stays (nothing lost)."""
    need_root()
    config = configure(base)
    (base / "src" / "a.dat").write_bytes(b"payload")
    r = mstm("mstm-send", "--once", "proj", config=config, wrap=read_only(base / "src"))
    assert r.returncode == 1, r.stderr
    assert (base / "src" / "a.dat").read_bytes() == b"payload"


# ----------------------------------------------------------------- root on another's spool


def owned_by_root(where: Path) -> list[str]:
    return [str(p) for p in [where, *where.rglob("*")] if p.lstat().st_uid == 0]


@pytest.fixture
def foreign_spool(base: Path) -> Path:
    """The stream's spool, created by its owner (uid 4242), with one item queued."""
    need_root()
    config = configure(base)
    (base / "src" / "a.dat").write_bytes(b"x")
    spool = base / "spool"
    os.chown(spool, OWNER, OWNER)
    r = mstm("mstm-scan", "--once", "proj", config=config,
             wrap=["setpriv", f"--reuid={OWNER}", f"--regid={OWNER}", "--clear-groups"])
    assert r.returncode == 0, r.stderr
    assert (spool / "proj").stat().st_uid == OWNER
    return config


@pytest.mark.parametrize("args", [
    ("mstm-send", "--once", "proj"),
    ("mstm-send", "--follow", "proj"),
    ("mstm-send", "--retry-failed", "proj"),
    ("mstm-send", "--no-scan", "proj"),
    ("mstm-scan", "--once", "proj"),
    ("mstm-scan", "--follow", "proj"),
])
def test_root_refuses_to_write_a_spool_another_user_owns_and_says_how(
        args: tuple[str, ...], foreign_spool: Path, base: Path) -> None:
    need("setpriv")
    r = mstm(*args, config=foreign_spool)
    assert r.returncode == 77, (r.returncode, r.stderr)  # EX_NOPERM
    lines = r.stderr.strip().splitlines()
    assert lines[0].startswith(f"{args[0]}: {base / 'spool' / 'proj'} belongs to uid 4242,"
                               " not root"), r.stderr
    assert lines[1] == (f"{args[0]}: hint: run it as that user: setpriv --reuid=4242"
                        f" --regid=4242 --clear-groups -- {' '.join(args)}")
    assert owned_by_root(base / "spool") == []
    assert (base / "src" / "a.dat").exists() and not (base / "target/a.dat").exists()


def test_a_spool_not_created_yet_is_judged_by_its_base_directory(base: Path) -> None:
    need_root()
    config = configure(base)
    os.chown(base / "spool", OWNER, OWNER)
    r = mstm("mstm-send", "--once", "proj", config=config)
    assert r.returncode == 77 and f"{base / 'spool'} belongs to uid 4242" in r.stderr
    assert not (base / "spool" / "proj").exists()


def test_a_named_owner_is_named_with_runuser(base: Path) -> None:
    need_root()
    import pwd

    nobody = pwd.getpwnam("nobody")
    config = configure(base)
    os.chown(base / "spool", nobody.pw_uid, nobody.pw_gid)
    r = mstm("mstm-scan", "proj", config=config)
    assert r.returncode == 77
    assert r.stderr.strip().splitlines()[1] == (
        "mstm-scan: hint: run it as that user: runuser -u nobody -- mstm-scan proj")


@pytest.mark.parametrize("args", [
    ("mstm-send", "--check", "proj"),
    ("mstm-send", "--status", "proj"),
    ("mstm-scan", "--check", "proj"),
    ("mstm-scan", "--print", "proj"),
])
def test_read_only_commands_run_as_root_and_leave_the_ownership_intact(
        args: tuple[str, ...], foreign_spool: Path, base: Path) -> None:
    r = mstm(*args, config=foreign_spool)
    assert r.returncode == 0, r.stderr
    assert owned_by_root(base / "spool") == []


def test_the_owner_itself_is_not_refused(foreign_spool: Path, base: Path) -> None:
    os.chown(base / "src", OWNER, OWNER)
    os.chown(base / "target", OWNER, OWNER)
    os.chown(base / "src" / "a.dat", OWNER, OWNER)
    r = mstm("mstm-send", "--once", "proj", config=foreign_spool,
             wrap=["setpriv", f"--reuid={OWNER}", f"--regid={OWNER}", "--clear-groups"])
    assert r.returncode == 0, r.stderr
    assert (base / "target" / "a.dat").read_bytes() == b"x"
    assert owned_by_root(base / "spool") == []
