"""ftp: what names FTP can carry, and how LIST tells a link from a directory."""

from __future__ import annotations

from collections.abc import Callable

import pytest

from mstm.transports.ftp_commands import NameNotSendable, ftp_name, kind_below, listing


def test_names_ftp_cannot_carry_are_refused_not_mangled() -> None:
    assert ftp_name("/in/ünïcødé with space.dat") == "/in/ünïcødé with space.dat"
    with pytest.raises(NameNotSendable, match="line break"):
        ftp_name("/in/new\nline")
    with pytest.raises(NameNotSendable, match="UTF-8"):
        ftp_name("/in/" + b"\xff".decode("utf-8", "surrogateescape"))


class FakeFtp:
    """LIST answers in the ls -l form (pyftpdlib, vsftpd, proftpd)."""

    listings = {
        "/t": ["drwxr-xr-x   2 u g 4096 Dec 03 14:01 run42",
               "lrwxrwxrwx   1 u g    9 Dec 03 14:01 deep -> /elsewhere",
               "-rw-r--r--   1 u g   10 Dec 03 14:01 a file with  spaces.dat",
               "prw-r--r--   1 u g    0 Dec 03 14:01 fifo",
               "total 12"],
        "/t/run42": ["-rw-r--r--   1 u g 1 Jan 01  2020 x"],
    }
    commands: list[str] = []

    def retrlines(self, cmd: str, callback: Callable[[str], None]) -> None:
        for line in self.listings.get(cmd.split(" ", 1)[1], []):
            callback(line)

    def voidcmd(self, cmd: str) -> None:
        self.commands.append(cmd)


def test_list_tells_links_directories_and_files_apart() -> None:
    ftp = FakeFtp()
    assert listing(ftp, "/t") == {"run42": "d", "deep": "l",  # type: ignore[arg-type]
                                   "a file with  spaces.dat": "f", "fifo": "o"}
    assert ftp.commands[-1] == "TYPE I"  # binary again after the listing
    seen: dict[str, dict[str, str]] = {}
    assert kind_below(ftp, "/t", "run42/x", seen) == "f"  # type: ignore[arg-type]
    assert kind_below(ftp, "/t", "run42", seen) == "d"  # type: ignore[arg-type]
    assert kind_below(ftp, "/t", "deep/f.dat", seen) is None  # type: ignore[arg-type]
    assert kind_below(ftp, "/t", "deep", seen) == "l"  # type: ignore[arg-type]
