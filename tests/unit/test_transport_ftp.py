"""ftp: what names FTP can carry, and the streamed Zip64 archive of a directory item."""

from __future__ import annotations

import socket
import threading
import zipfile
from pathlib import Path

import pytest

from mstm.transports.common import Monitor
from mstm.transports.ftp import NameNotSendable, _ftp_name, _SocketWriter, _walk


def test_names_ftp_cannot_carry_are_refused_not_mangled() -> None:
    assert _ftp_name("/in/ünïcødé with space.dat") == "/in/ünïcødé with space.dat"
    with pytest.raises(NameNotSendable, match="line break"):
        _ftp_name("/in/new\nline")
    with pytest.raises(NameNotSendable, match="UTF-8"):
        _ftp_name("/in/" + b"\xff".decode("utf-8", "surrogateescape"))


def test_a_directory_streams_as_a_zip64_archive_through_a_socket(tmp_path: Path) -> None:
    """The archive is written to an unseekable stream (the data connection), with data
    descriptors, and is still a valid archive (the 70,000-entry Zip64 case is in
    tests/integration/test_transport_e2e.py)."""
    top = tmp_path / "src" / "tree"
    (top / "sub").mkdir(parents=True)
    (top / "sub" / "a.dat").write_bytes(b"a" * 100)
    (top / "b.dat").write_bytes(b"b")
    (top / "empty").mkdir()
    a, b = socket.socketpair()
    received = bytearray()

    def drain() -> None:
        while data := b.recv(65536):
            received.extend(data)

    reader = threading.Thread(target=drain)
    reader.start()
    writer = _SocketWriter(a, Monitor(), 4096)
    with zipfile.ZipFile(writer, "w", allowZip64=True) as zf:
        for rel, kind in _walk(bytes(top), "tree"):
            if kind == "dir":
                zf.writestr(rel + "/", b"")
            else:
                zf.write(tmp_path / "src" / rel, rel)
    writer.flush()
    a.close()
    reader.join()
    out = tmp_path / "tree.zip"
    out.write_bytes(bytes(received))
    with zipfile.ZipFile(out) as zf:
        assert zf.testzip() is None
        assert zf.read("tree/sub/a.dat") == b"a" * 100
        assert sorted(zf.namelist()) == ["tree/b.dat", "tree/empty/", "tree/sub/",
                                         "tree/sub/a.dat"]
