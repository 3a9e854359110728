"""ftp and ftps: the standard library's ftplib, one control connection per stream.

`ftps` is explicit FTP over TLS (RFC 4217: `AUTH TLS`, then `PROT P` so the data
connections are encrypted too); the server's certificate is checked against
`[ftp] ca_file` (or the system's CAs) and must name `target_host`.  `[ftp] tls = true`
does the same for `ftp`.  The password comes from `[ftp] password_file` or the systemd
credential `ftp-password`, and is never logged.

What it guarantees:

* **Nothing half-written under a final name.**  Each file is stored (`STOR`) as a
  hidden `.<name>.mstm-part` beside its final name, then renamed (`RNFR`/`RNTO`) over
  the final name (where a server refuses to rename over an existing file, the old one
  is deleted first: a short moment with no file, never a partial one).  An interrupted
  upload is resumed (`APPE`) from that file's length next time, unless the sender
  forces a full re-send after a failed check.  FTP has no fsync: a crash of the target
  host may lose what its page cache held.
* **Directory items** travel as one Zip archive: streamed while it is made (no local
  copy), uncompressed (`ZIP_STORED`), Zip64 throughout (members over 4 GiB, archives
  over 4 GiB, more than 65,535 entries), empty directories and symbolic links kept
  (Info-ZIP convention).  It is written to `<target_dir>/.mstm-staging/<name>.zip`,
  verified, and renamed by `publish` to `<target_dir>/<name>.zip`: the target holds
  `<name>.zip`, not a directory (unpacking it is for whoever reads it, e.g. mstm-receive).
  When the sender sends into a batch directory of its own (the arrival monitor's
  `dest`), directories go as plain trees instead (`MKD` and one `STOR` per file; FTP
  cannot make a symbolic link, so links inside them are left out there).  Links inside
  directory items are never followed.
* **Symbolic links as file items** (`follow_symlinks = true`): the file a link points to
  is sent (and so verified); otherwise a source that is a link is refused (the scanner
  never queues one then).  Only regular files are ever opened.
* **Verification** (`inspect`): the size from `SIZE`; with `[ftp] verify_readback`
  (the default) the file is read back (`RETR`) and its sha256 computed here, which
  proves the bytes the server now serves under the final name (FTP has no standard
  remote checksum; `HASH`/`XSHA256` are rare extensions and not used).  For an archive
  every member is read back and hashed (and its CRC-32 checked), so the check is per
  file, exactly as for files sent one by one.  Without readback only sizes are known
  and sha256 is None, which does not prove the content.
* **bwlimit** paces the upload loop; **connect_timeout** bounds the TCP connect, TLS
  and login; **stall_seconds**: an upload or read-back that completes no chunk for that
  long has its connections shut down, and the sender retries later.
* Names must be valid UTF-8 without CR or LF (FTP commands are text lines): any other
  name fails that item, with a reason, and is never sent under a mangled name.
"""

from __future__ import annotations

import contextlib
import ftplib
import hashlib
import io
import logging
import os
import posixpath
import secrets
import socket
import ssl
import stat
import threading
import time
import zipfile
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import BinaryIO

from mstm.errors import TargetUnavailable
from mstm.scan import open_regular
from mstm.transports.base import Item, Progress, RemoteFile, SendResult, ShouldStop
from mstm.transports.common import (
    STAGING,
    Monitor,
    Throttle,
    call_watched,
    chunk_size,
    note_item_errors,
    poll_until,
    read_secret,
    run_watched,
)

log = logging.getLogger("mstm.ftp")

_CHUNK = 256 * 1024
_READ_CHUNK = 1 << 20
_SKIP_LIMIT = 4 << 20  # a forward seek this short reads on instead of a new RETR
_IDLE_CHECK = 20.0  # seconds idle after which the control connection is NOOP'd first
# what a broken connection looks like to ftplib
_LOST = (OSError, EOFError, ftplib.error_temp, ftplib.error_reply, ftplib.error_proto)


class NameNotSendable(ValueError):
    pass


def _ftp_name(path: str) -> str:
    """A path as FTP can carry it: UTF-8, no CR/LF; else NameNotSendable."""
    if "\r" in path or "\n" in path:
        raise NameNotSendable("the name holds a line break, which FTP cannot carry")
    try:
        path.encode("utf-8")
    except UnicodeEncodeError:
        raise NameNotSendable("the name is not valid UTF-8, which FTP needs") from None
    return path


class Ftp:
    def __init__(self, *, host: str, port: int = 21, username: str = "anonymous",
                 password_file: Path | None = None, tls: bool = False,
                 ca_file: Path | None = None, passive: bool = True, source_dir: Path,
                 target_dir: str, connect_timeout: float = 15.0, stall_seconds: float = 120.0,
                 bwlimit: int = 0, stop_file: str = ".stop", stop_dirs: Sequence[str] = (),
                 verify_readback: bool = True, follow_symlinks: bool = False) -> None:
        self.name = "ftps" if tls else "ftp"
        self.host = host
        self.port = port
        self.username = username
        self.password_file = password_file
        self.tls = tls
        self.ca_file = ca_file
        self.passive = passive
        self.source = source_dir
        self.target = target_dir.rstrip("/") or "/"
        self.connect_timeout = connect_timeout
        self.stall_seconds = stall_seconds
        self.bwlimit = bwlimit
        self.stop_file = stop_file
        self.stop_dirs = [d.rstrip("/") or "/" for d in stop_dirs] or [self.target]
        self.verify_readback = verify_readback
        self.follow_symlinks = follow_symlinks  # file items: a link goes as its file
        self._ftp: ftplib.FTP | None = None
        self._data: socket.socket | None = None  # the data connection in use, if any
        self._dirs: set[str] = set()
        self._last_used = 0.0
        self._archives: dict[str, str] = {}  # dir item relpath -> its staged archive
        self._lock = threading.Lock()

    @property
    def peer(self) -> str:
        return f"{self.name}://{self.username}@{self.host}:{self.port}"

    # -- connection -------------------------------------------------------------
    def open(self) -> None:
        if self.alive():
            return
        self.close()
        password = read_secret(self.password_file, "ftp-password", section="ftp")
        if password is None:
            password = "mstm@" if self.username in ("anonymous", "ftp") else ""
        ftp: ftplib.FTP
        if self.tls:
            context = ssl.create_default_context(
                cafile=str(self.ca_file) if self.ca_file else None)
            ftp = ftplib.FTP_TLS(context=context, timeout=self.connect_timeout)
        else:
            ftp = ftplib.FTP(timeout=self.connect_timeout)
        ftp.encoding = "utf-8"
        try:
            ftp.connect(self.host, self.port, timeout=self.connect_timeout)
            if isinstance(ftp, ftplib.FTP_TLS):
                ftp.auth()
            ftp.login(self.username, password)
            if isinstance(ftp, ftplib.FTP_TLS):
                ftp.prot_p()
            ftp.set_pasv(self.passive)
            ftp.voidcmd("TYPE I")
            with contextlib.suppress(ftplib.error_perm, ftplib.error_reply):
                ftp.sendcmd("OPTS UTF8 ON")
        except (*_LOST, ftplib.error_perm, ssl.SSLError) as err:
            with contextlib.suppress(Exception):
                ftp.close()
            raise TargetUnavailable(f"{self.peer}: {_reason(err)}") from None
        ftp.timeout = self.stall_seconds  # for the data connections from now on
        if ftp.sock is not None:
            ftp.sock.settimeout(self.stall_seconds)
        self._ftp = ftp
        self._dirs = set()
        self._last_used = time.monotonic()

    def close(self) -> None:
        self._abort()
        ftp, self._ftp = self._ftp, None
        if ftp is not None:
            with contextlib.suppress(Exception):
                ftp.close()

    def _abort(self) -> None:
        """Shut the connections down from any thread: a blocked call fails at once."""
        for sock in (self._data, self._ftp.sock if self._ftp else None):
            if sock is not None:
                with contextlib.suppress(OSError):
                    sock.shutdown(socket.SHUT_RDWR)

    def _cut(self) -> None:
        self._abort()
        self._ftp = None

    def alive(self) -> bool:
        return self._ftp is not None and self._ftp.sock is not None

    def _conn(self) -> ftplib.FTP:
        """The open connection, checked with NOOP after a pause (servers drop idle ones)
        and opened again if it was dropped."""
        if self._ftp is not None and time.monotonic() - self._last_used > _IDLE_CHECK:
            try:
                self._ftp.voidcmd("NOOP")
            except (*_LOST, ftplib.error_perm):
                self.close()
        if self._ftp is None:
            self.open()
        assert self._ftp is not None
        self._last_used = time.monotonic()
        return self._ftp

    # -- transfer ---------------------------------------------------------------
    def send(self, items: Sequence[Item], *, progress: Progress | None = None,
             should_stop: ShouldStop | None = None, tick: Callable[[], None] | None = None,
             dest: str | None = None) -> SendResult:
        """Send *items* under target_dir (directories as archives into the staging area),
        or all of them, directories as trees, into *dest*."""
        try:
            ftp = self._conn()
        except TargetUnavailable as err:
            return SendResult(error=err.message, exit_code=1)
        root = (dest.rstrip("/") or "/") if dest is not None else self.target
        monitor = Monitor(progress=progress, throttle=Throttle(self.bwlimit))

        def work(mon: Monitor) -> SendResult:
            result = SendResult()
            for item in items:
                try:
                    if item.is_dir and dest is None:
                        self._send_archive(ftp, item, mon)
                    elif item.is_dir:
                        self._send_tree(ftp, item, root, mon)
                    else:
                        self._send_file(ftp, item.relpath, posixpath.join(root, item.relpath),
                                        mon, force=item.force)
                except NameNotSendable as err:
                    result.item_errors[item.relpath] = str(err)
                except ftplib.error_perm as err:
                    result.item_errors[item.relpath] = _reason(err)
                except _LOST as err:
                    if isinstance(err, OSError) and err.filename is not None:
                        result.item_errors[item.relpath] = _reason(err)  # the local side
                        continue
                    self._cut()
                    result.error = f"{self.peer}: {_reason(err)}"
                    result.exit_code = 1
                    break
            result.files, result.bytes = mon.files, mon.bytes
            return result

        result = run_watched(work, monitor=monitor, stall_seconds=self.stall_seconds,
                             abort=self._cut, should_stop=should_stop, tick=tick)
        self._last_used = time.monotonic()
        return note_item_errors(result)

    def _makedirs(self, ftp: ftplib.FTP, path: str) -> None:
        if path in self._dirs or path in ("/", ""):
            return
        self._makedirs(ftp, posixpath.dirname(path))
        try:
            ftp.mkd(_ftp_name(path))
        except ftplib.error_perm:
            try:  # it exists already (as a directory?)
                ftp.cwd(path)
            finally:
                with contextlib.suppress(ftplib.error_perm):
                    ftp.cwd("/")
        self._dirs.add(path)

    def _upload(self, ftp: ftplib.FTP, command: str, chunks: Iterator[bytes], mon: Monitor,
                rest: int | None = None) -> None:
        conn = ftp.transfercmd(command, rest)
        self._data = conn
        try:
            for data in chunks:
                conn.sendall(data)
                mon.advance(len(data))
            if isinstance(conn, ssl.SSLSocket):
                conn.unwrap()
        finally:
            self._data = None
            conn.close()
        ftp.voidresp()

    def _send_file(self, ftp: ftplib.FTP, relpath: str, remote: str, mon: Monitor, *,
                   force: bool, staged: bool = False) -> None:
        remote = _ftp_name(remote)
        src = os.path.join(os.fsencode(self.source), os.fsencode(relpath))
        # a file of a directory item (staged) is never read through a link
        with open(open_regular(src, follow_symlinks=self.follow_symlinks and not staged),
                  "rb") as f:
            self._send_open_file(ftp, f, remote, mon, force=force, staged=staged)

    def _send_open_file(self, ftp: ftplib.FTP, f: BinaryIO, remote: str, mon: Monitor, *,
                        force: bool, staged: bool) -> None:
        st = os.fstat(f.fileno())
        parent, base = posixpath.split(remote)
        self._makedirs(ftp, parent)
        tmp = remote if staged else posixpath.join(parent, f".{base}.mstm-part")
        offset = 0
        if not force and not staged:
            with contextlib.suppress(ftplib.error_perm, ftplib.error_reply):
                size = ftp.size(tmp)
                if size is not None and 0 < size < st.st_size:
                    offset = size
        f.seek(offset)
        if offset:
            log.debug("resuming %s at %d bytes", remote, offset)
        step = chunk_size(self.bwlimit, _CHUNK)
        self._upload(ftp, f"APPE {tmp}" if offset else f"STOR {tmp}",
                     iter(lambda: f.read(step), b""), mon)
        with contextlib.suppress(ftplib.error_perm, ftplib.error_reply):
            stamp = time.strftime("%Y%m%d%H%M%S", time.gmtime(st.st_mtime))
            ftp.sendcmd(f"MFMT {stamp} {tmp}")  # keep the mtime where the server can
        if tmp != remote:
            _rename_over(ftp, tmp, remote)
        mon.file_done()

    def _send_tree(self, ftp: ftplib.FTP, item: Item, root: str, mon: Monitor) -> None:
        top = os.path.join(os.fsencode(self.source), os.fsencode(item.relpath))
        self._makedirs(ftp, _ftp_name(posixpath.join(root, item.relpath)))
        for rel, kind in _walk(top, item.relpath):
            remote = posixpath.join(root, rel)
            if kind == "dir":
                self._makedirs(ftp, _ftp_name(remote))
            elif kind == "file":
                self._send_file(ftp, rel, remote, mon, force=True, staged=True)
            mon.alive_now()

    def _send_archive(self, ftp: ftplib.FTP, item: Item, mon: Monitor) -> None:
        remote = _ftp_name(posixpath.join(self.target, STAGING, item.relpath + ".zip"))
        self._makedirs(ftp, posixpath.dirname(remote))
        top = os.path.join(os.fsencode(self.source), os.fsencode(item.relpath))
        prefix = posixpath.dirname(item.relpath)
        conn = ftp.transfercmd(f"STOR {remote}")
        self._data = conn
        try:
            writer = _SocketWriter(conn, mon, chunk_size(self.bwlimit, _CHUNK))
            with zipfile.ZipFile(writer, "w", compression=zipfile.ZIP_STORED,
                                 allowZip64=True) as zf:
                top_name = posixpath.basename(item.relpath)
                zf.writestr(zipfile.ZipInfo(_ftp_name(top_name) + "/"), b"")
                for rel, kind in _walk(top, item.relpath):
                    arcname = posixpath.relpath(rel, prefix) if prefix else rel
                    _ftp_name(arcname)
                    path = os.path.join(os.fsencode(self.source), os.fsencode(rel))
                    if kind == "dir":
                        zf.writestr(zipfile.ZipInfo(arcname + "/"), b"")
                    elif kind == "link":
                        info = zipfile.ZipInfo(arcname)
                        info.external_attr = (stat.S_IFLNK | 0o777) << 16
                        zf.writestr(info, os.readlink(path))
                    else:
                        info = zipfile.ZipInfo.from_file(os.fsdecode(path), arcname)
                        info.compress_type = zipfile.ZIP_STORED
                        with open(path, "rb") as src, zf.open(info, "w") as out:
                            while chunk := src.read(_READ_CHUNK):
                                out.write(chunk)
                        mon.file_done()
                    mon.alive_now()
            writer.flush()
            if isinstance(conn, ssl.SSLSocket):
                conn.unwrap()
        finally:
            self._data = None
            conn.close()
        ftp.voidresp()
        self._archives[item.relpath] = remote

    # -- verification -----------------------------------------------------------
    def inspect(self, relpaths: Sequence[str], *, staged: bool = False) -> dict[str, RemoteFile]:
        if not relpaths:
            return {}
        ftp = self._conn()

        def look(mon: Monitor) -> dict[str, RemoteFile]:
            try:
                if staged:
                    return self._inspect_archives(ftp, relpaths, mon)
                found: dict[str, RemoteFile] = {}
                for rel in relpaths:
                    try:
                        path = _ftp_name(posixpath.join(self.target, rel))
                    except NameNotSendable:
                        continue
                    size = _size(ftp, path)
                    if size is None:
                        continue
                    digest = self._read_back(ftp, path, mon) if self.verify_readback else None
                    found[rel] = RemoteFile(size=size, sha256=digest)
                    mon.alive_now()
                return found
            except _LOST as err:
                self._cut()
                raise TargetUnavailable(f"{self.peer}: {_reason(err)}") from None

        result = call_watched(look, stall_seconds=self.stall_seconds, abort=self._cut,
                              what=f"verifying at {self.peer}")
        self._last_used = time.monotonic()
        return result

    def _read_back(self, ftp: ftplib.FTP, path: str, mon: Monitor) -> str:
        h = hashlib.sha256()
        conn = ftp.transfercmd(f"RETR {path}")
        self._data = conn
        try:
            while data := conn.recv(_READ_CHUNK):
                h.update(data)
                mon.alive_now()
            if isinstance(conn, ssl.SSLSocket):
                with contextlib.suppress(OSError, ValueError):
                    conn.unwrap()
        finally:
            self._data = None
            conn.close()
        ftp.voidresp()
        return h.hexdigest()

    def _archive_of(self, ftp: ftplib.FTP, relpath: str) -> tuple[str, str] | None:
        """(item relpath, staged archive path) holding *relpath*."""
        parts = relpath.split("/")
        for i in range(len(parts) - 1, 0, -1):
            item = "/".join(parts[:i])
            if item in self._archives:
                return item, self._archives[item]
        for i in range(len(parts) - 1, 0, -1):
            item = "/".join(parts[:i])
            remote = posixpath.join(self.target, STAGING, item + ".zip")
            with contextlib.suppress(NameNotSendable):
                if _size(ftp, _ftp_name(remote)) is not None:
                    return item, remote
        return None

    def _inspect_archives(self, ftp: ftplib.FTP, relpaths: Sequence[str], mon: Monitor
                          ) -> dict[str, RemoteFile]:
        wanted: dict[tuple[str, str], list[str]] = {}
        for rel in relpaths:
            where = self._archive_of(ftp, rel)
            if where is not None:
                wanted.setdefault(where, []).append(rel)
        found: dict[str, RemoteFile] = {}
        for (item, remote), rels in wanted.items():
            size = _size(ftp, remote)
            if size is None:
                continue
            prefix = posixpath.dirname(item)
            members = self._read_archive(ftp, remote, size, mon)
            for rel in rels:
                arcname = posixpath.relpath(rel, prefix) if prefix else rel
                if arcname in members:
                    found[rel] = members[arcname]
        return found

    def _read_archive(self, ftp: ftplib.FTP, remote: str, size: int, mon: Monitor
                      ) -> dict[str, RemoteFile]:
        """Every regular member of a remote archive: size and sha256 of what it holds.
        The central directory is read from the end, then the members in order in one
        pass; a member whose CRC-32 does not match is reported without a sha256."""
        raw = _RemoteReader(self, ftp, remote, size, mon)
        members: dict[str, RemoteFile] = {}
        try:
            with io.BufferedReader(raw, buffer_size=_READ_CHUNK) as buffered, \
                    zipfile.ZipFile(buffered) as zf:
                infos = sorted(zf.infolist(), key=lambda i: i.header_offset)
                for info in infos:
                    if info.is_dir() or stat.S_ISLNK(info.external_attr >> 16):
                        continue
                    h = hashlib.sha256()
                    n = 0
                    digest: str | None
                    try:
                        with zf.open(info) as member:
                            while chunk := member.read(_READ_CHUNK):
                                h.update(chunk)
                                n += len(chunk)
                                mon.alive_now()
                        digest = h.hexdigest()
                    except zipfile.BadZipFile:
                        digest = None
                    members[info.filename] = RemoteFile(size=n, sha256=digest)
        except zipfile.BadZipFile as err:
            log.warning("%s: %s is not a readable archive: %s", self.peer, remote, err)
            return {}
        finally:
            raw.finish()
        return members

    def publish(self, items: Sequence[Item]) -> dict[str, str]:
        errors: dict[str, str] = {}
        ftp = self._conn()
        for item in items:
            if not item.is_dir:
                continue
            try:
                staged = self._archives.get(item.relpath) or _ftp_name(
                    posixpath.join(self.target, STAGING, item.relpath + ".zip"))
                final = _ftp_name(posixpath.join(self.target, item.relpath + ".zip"))
                self._makedirs(ftp, posixpath.dirname(final))
                old = None
                if _size(ftp, final) is not None:
                    old = posixpath.join(self.target, STAGING,
                                         f".replaced.{secrets.token_hex(6)}.zip")
                    ftp.rename(final, old)
                try:
                    ftp.rename(staged, final)
                except ftplib.error_perm:
                    if old:
                        ftp.rename(old, final)
                    raise
                if old:
                    with contextlib.suppress(ftplib.error_perm):
                        ftp.delete(old)
                self._archives.pop(item.relpath, None)
            except (NameNotSendable, ftplib.error_perm) as err:
                errors[item.relpath] = f"could not be moved into place: {_reason(err)}"
            except _LOST as err:
                self._cut()
                raise TargetUnavailable(f"{self.peer}: {_reason(err)}") from None
        return errors

    # -- small files (the arrival monitor's handshake) ---------------------------
    def put_file(self, directory: str, name: str, data: bytes) -> None:
        ftp = self._conn()
        d = directory.rstrip("/") or "/"
        try:
            self._makedirs(ftp, _ftp_name(d))
            final = _ftp_name(posixpath.join(d, name))
            tmp = posixpath.join(d, f".{name}.mstm-part")
            self._upload(ftp, f"STOR {tmp}", iter([data]), Monitor())
            _rename_over(ftp, tmp, final)
        except (*_LOST, ftplib.error_perm, NameNotSendable) as err:
            raise OSError(f"cannot write {name} in {directory} on {self.peer}: "
                          f"{_reason(err)}") from None

    def await_file(self, directory: str, name: str, *, timeout: float, max_bytes: int,
                   tick: Callable[[], None] | None = None,
                   should_stop: ShouldStop | None = None) -> bytes | None:
        path = _ftp_name(posixpath.join(directory, name))

        def look() -> bytes | None:
            ftp = self._conn()
            try:
                if _size(ftp, path) is None:
                    return None
                out = bytearray()
                conn = ftp.transfercmd(f"RETR {path}")
                try:
                    while len(out) < max_bytes and (data := conn.recv(1 << 16)):
                        out += data
                finally:
                    conn.close()
                with contextlib.suppress(ftplib.error_temp, ftplib.error_perm):
                    ftp.voidresp()
                return bytes(out[:max_bytes])
            except _LOST as err:
                self._cut()
                raise TargetUnavailable(f"{self.peer}: {_reason(err)}") from None

        return poll_until(look, timeout=timeout, interval=0.2, tick=tick,
                          should_stop=should_stop)

    def stop_file_present(self) -> str | None:
        ftp = self._conn()
        for d in self.stop_dirs:
            try:
                if _size(ftp, _ftp_name(posixpath.join(d, self.stop_file))) is not None:
                    return f"{self.stop_file} on target ({d})"
            except _LOST as err:
                self._cut()
                raise TargetUnavailable(f"{self.peer}: {_reason(err)}") from None
        return None


class _SocketWriter:
    """A write-only stream onto a data connection, paced and counted (zipfile's output)."""

    def __init__(self, conn: socket.socket, mon: Monitor, step: int) -> None:
        self.conn = conn
        self.mon = mon
        self.step = step
        self.buf = bytearray()

    def write(self, data: bytes) -> int:
        self.buf += data
        while len(self.buf) >= self.step:
            self._send(bytes(self.buf[:self.step]))
            del self.buf[:self.step]
        return len(data)

    def close(self) -> None:
        self.flush()

    def flush(self) -> None:
        if self.buf:
            self._send(bytes(self.buf))
            self.buf.clear()

    def _send(self, data: bytes) -> None:
        self.conn.sendall(data)
        self.mon.advance(len(data))


class _RemoteReader(io.RawIOBase):
    """A seekable, read-only view of a remote file: each jump is a `REST n` + `RETR`,
    reading on is the same data connection (short forward jumps read through)."""

    def __init__(self, owner: Ftp, ftp: ftplib.FTP, path: str, size: int,
                 mon: Monitor) -> None:
        super().__init__()
        self.owner = owner
        self.ftp = ftp
        self.path = path
        self.size = size
        self.mon = mon
        self.pos = 0
        self.stream_pos = 0
        self.conn: socket.socket | None = None

    def readable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return True

    def tell(self) -> int:
        return self.pos

    def seek(self, offset: int, whence: int = io.SEEK_SET) -> int:
        if whence == io.SEEK_SET:
            self.pos = offset
        elif whence == io.SEEK_CUR:
            self.pos += offset
        else:
            self.pos = self.size + offset
        self.pos = max(0, self.pos)
        return self.pos

    def readinto(self, buffer: bytearray | memoryview) -> int:  # type: ignore[override]
        if self.pos >= self.size:
            return 0
        if self.conn is not None and not (
                self.stream_pos <= self.pos <= self.stream_pos + _SKIP_LIMIT):
            self._stop()
        if self.conn is None:
            self.conn = self.ftp.transfercmd(f"RETR {self.path}", self.pos or None)
            self.owner._data = self.conn
            self.stream_pos = self.pos
        while self.stream_pos < self.pos:  # read through a short gap
            skipped = self.conn.recv(min(_READ_CHUNK, self.pos - self.stream_pos))
            if not skipped:
                raise EOFError("archive ended early")
            self.stream_pos += len(skipped)
        view = memoryview(buffer)
        n = self.conn.recv_into(view, min(len(view), self.size - self.pos))
        if n == 0:
            raise EOFError(f"{self.path}: the server sent less than its SIZE")
        self.pos += n
        self.stream_pos += n
        self.mon.alive_now()
        return n

    def _stop(self) -> None:
        """End the current RETR early: close the data connection, take the reply."""
        conn, self.conn = self.conn, None
        self.owner._data = None
        if conn is None:
            return
        conn.close()
        try:
            self.ftp.voidresp()  # 226 if it had all been sent, else 426/451 "aborted"
        except (ftplib.error_temp, ftplib.error_perm):
            pass

    def finish(self) -> None:
        self._stop()


def _walk(top: bytes, relpath: str) -> Iterator[tuple[str, str]]:
    """Everything below a directory item, parents first: (relpath, dir|file|link)."""
    base_len = len(top) - len(os.fsencode(relpath))
    for dirpath, dirnames, filenames in os.walk(top):
        dirnames.sort()
        for name in sorted(dirnames) + sorted(filenames):
            path = os.path.join(dirpath, name)
            rel = os.fsdecode(path[base_len:])
            st = os.lstat(path)
            if stat.S_ISLNK(st.st_mode):
                yield rel, "link"
            elif stat.S_ISDIR(st.st_mode):
                yield rel, "dir"
            elif stat.S_ISREG(st.st_mode):
                yield rel, "file"


def _size(ftp: ftplib.FTP, path: str) -> int | None:
    """SIZE of a file, None if there is none (550)."""
    try:
        size = ftp.size(path)
    except ftplib.error_perm:
        return None
    return size


def _rename_over(ftp: ftplib.FTP, tmp: str, final: str) -> None:
    try:
        ftp.rename(tmp, final)
    except ftplib.error_perm:
        with contextlib.suppress(ftplib.error_perm):
            ftp.delete(final)
        ftp.rename(tmp, final)


def _reason(err: BaseException) -> str:
    text = getattr(err, "strerror", None) or str(err) or type(err).__name__
    return str(text).strip()
