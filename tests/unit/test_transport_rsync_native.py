"""rsync_native's parsing of rsync's output, and where its password goes."""

from __future__ import annotations

from pathlib import Path

import pytest

from mstm.transports.base import TransportOptions
from mstm.transports.rsync_native import RsyncNative, parse_itemized, parse_listing, unescape


def test_rsync_escapes_are_undone() -> None:
    assert unescape(b"a b\\#012c") == b"a b\nc"
    assert unescape(b"plain") == b"plain"


def test_the_listing_gives_sizes_of_regular_files_with_digit_groups() -> None:
    out = (b"drwxr-xr-x          4,096 2026/01/01 12:00:00 .\n"
           b"-rw-r--r--      1,234,567 2026/01/01 12:00:00 a b\\#012c \xc3\xbc\n"
           b"-rw-r--r--              5 2026/01/01 12:00:00 with  two spaces\n"
           b"lrwxrwxrwx              3 2026/01/01 12:00:00 link -> x\n")
    assert parse_listing(out) == {"a b\nc ü": 1234567, "with  two spaces": 5}


def test_the_checksum_dry_run_tells_identical_from_different() -> None:
    out = (b"mstm-xfer:.f          same name\n"
           b"mstm-xfer:.f..t...... same content, other time\n"
           b"mstm-xfer:<fc.T...... differs\n"
           b"mstm-xfer:<f+++++++++ new\n"
           b"mstm-xfer:cd+++++++++ dir/\n")
    assert parse_itemized(out) == {"same name": True, "same content, other time": True,
                                   "differs": False, "new": False}


def make(tmp_path: Path, *, bwlimit: int = 0, follow_symlinks: bool = False,
         **kw: object) -> RsyncNative:
    options = TransportOptions(source_dir=tmp_path, target_dir="/in/proj1/", bwlimit=bwlimit,
                               follow_symlinks=follow_symlinks)
    return RsyncNative(options, host="archive.example.org", port=8730, module="data",
                       username="mstm", **kw)  # type: ignore[arg-type]


def test_the_password_travels_in_the_environment_never_on_the_command_line(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("RSYNC_PASSWORD", "inherited-must-not-leak")
    monkeypatch.delenv("CREDENTIALS_DIRECTORY", raising=False)
    pw = tmp_path / "pw"
    pw.write_text("s3cret\n")
    t = make(tmp_path, password_file=pw, bwlimit=100)
    argv = t.rsync_argv("in/proj1", force=False)
    assert not any("s3cret" in a for a in argv)
    assert t.env()["RSYNC_PASSWORD"] == "s3cret"
    assert argv[-1] == "rsync://mstm@archive.example.org:8730/data/in/proj1/"
    assert "--bwlimit=100" in argv and "--files-from=-" in argv and "--from0" in argv


def test_without_a_password_file_the_systemd_credential_is_used(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    creds = tmp_path / "creds"
    creds.mkdir()
    (creds / "rsync-password").write_text("from-credential")
    monkeypatch.setenv("CREDENTIALS_DIRECTORY", str(creds))
    monkeypatch.delenv("RSYNC_PASSWORD", raising=False)
    assert make(tmp_path).env()["RSYNC_PASSWORD"] == "from-credential"
    monkeypatch.delenv("CREDENTIALS_DIRECTORY")
    assert "RSYNC_PASSWORD" not in make(tmp_path).env()


def test_target_dir_is_a_path_inside_the_module(tmp_path: Path) -> None:
    t = make(tmp_path)
    assert t.url(t.target_dir) == "rsync://mstm@archive.example.org:8730/data/in/proj1"
    top = RsyncNative(TransportOptions(source_dir=tmp_path, target_dir="/"), host="::1",
                      module="m")
    assert top.url(top.target_dir) == "rsync://[::1]:873/m"


def test_fsync_is_asked_for_when_the_local_rsync_knows_it(tmp_path: Path) -> None:
    from mstm.transports import rsync_native

    fake = tmp_path / "old-rsync"
    fake.write_text("#!/bin/sh\necho '--fuzzy, -y   find similar file for basis'\n")
    fake.chmod(0o755)
    rsync_native._FSYNC_SUPPORT.clear()
    old = make(tmp_path, rsync_cmd=str(fake))
    assert "--fsync" not in old.rsync_argv("in", force=False)
    new = tmp_path / "new-rsync"
    new.write_text("#!/bin/sh\necho ' --fsync                  fsync every written file'\n")
    new.chmod(0o755)
    assert "--fsync" in make(tmp_path, rsync_cmd=str(new)).rsync_argv("in", force=False)
    fake.write_text("#!/bin/sh\necho --fsync\n")  # asked once per program, then cached
    assert "--fsync" not in make(tmp_path, rsync_cmd=str(fake)).rsync_argv("in", force=False)


def test_a_daemon_refusing_fsync_is_recognised() -> None:
    from mstm.transports.rsync_native import _refuses_fsync

    assert _refuses_fsync(b"rsync: The server is configured to refuse --fsync\n"
                          b"rsync error: requested action not supported (code 4)\n")
    assert _refuses_fsync(b"rsync: on remote machine: --fsync: unknown option\n")
    assert not _refuses_fsync(b"rsync: write failed on \"x\": No space left on device (28)\n")


def test_rsync_never_creates_devices_fifos_setuid_bits_or_foreign_owners(tmp_path: Path
                                                                          ) -> None:
    for dirs in (False, True):
        argv = make(tmp_path, follow_symlinks=True).rsync_argv("in/.mstm-staging/b", force=False,
                                                               dirs=dirs)
        assert "--chmod=a-st" in argv and "--perms" in argv
        assert {"--no-devices", "--no-specials"} <= set(argv)
        for bad in ("-D", "--devices", "--specials", "--copy-devices", "--write-devices",
                    "-a", "--archive", "-o", "-g", "--owner", "--group", "--super",
                    "--delete", "--delay-updates"):
            assert bad not in argv


def test_send_refuses_to_write_anywhere_but_a_staging_directory(tmp_path: Path) -> None:
    from mstm.transports.base import Item

    with pytest.raises(ValueError):
        make(tmp_path).send([Item("a", 1)])


def test_the_listing_tells_directories_links_and_files_apart() -> None:
    from mstm.transports.rsync_native import parse_types

    out = (b"drwxr-xr-x          4,096 2026/01/01 12:00:00 run42\n"
           b"lrwxrwxrwx              3 2026/01/01 12:00:00 run42/l -> x\n"
           b"-rw-r--r--              5 2026/01/01 12:00:00 run42/a b\n"
           b"prw-r--r--              0 2026/01/01 12:00:00 fifo\n")
    assert parse_types(out) == {"run42": "d", "run42/l": "l", "run42/a b": "f", "fifo": "x"}


def test_the_source_digest_behind_a_daemon_match_is_never_read_from_outside_the_stream(
        tmp_path: Path) -> None:
    """inspect vouches for a daemon's checksum match with the source's own sha256: a
    directory of the stream swapped for a link out of it yields no digest at all."""
    from mstm.transports.rsync_native import _sha256, _version

    src, outside = tmp_path / "src", tmp_path / "outside"
    (src / "sub").mkdir(parents=True)
    (src / "sub" / "a.dat").write_bytes(b"public")
    version = _version(src, "sub/a.dat", False)
    assert version is not None and _sha256(src, "sub/a.dat", version, False)
    outside.mkdir()
    (outside / "a.dat").write_bytes(b"secret")
    (src / "sub" / "a.dat").unlink()
    (src / "sub").rmdir()
    (src / "sub").symlink_to(outside)
    assert _version(src, "sub/a.dat", True) is None
    assert _sha256(src, "sub/a.dat", version, True) is None
