"""sftp: OpenSSH's sftp subsystem, through paramiko, over one ssh connection per stream.

Why paramiko and not OpenSSH's `sftp` program driven by pexpect or `-b` batch files:
a batch file is a line-oriented script, so a file name holding a newline cannot be
written into it at all, and other names need quoting rules of sftp's own; error
handling is "stop at the first failing line" or "ignore all" (`-` prefix), with no
per-file answer to parse except human-readable text; there is no stat that returns
numbers, no posix-rename choice, and driving the interactive prompt with pexpect means
scraping that text.  paramiko speaks the protocol itself: names are bytes (any byte but
NUL and '/'), every request has a typed status, `stat` returns sizes and times,
`posix-rename@openssh.com` replaces a file atomically, writes are pipelined, and one
authenticated connection carries the whole batch, the verification and, where the
account may run commands, an exec channel for `sha256sum` beside the sftp channel.

What it guarantees:

* **Nothing half-written under a final name.**  Each file is written to a hidden
  `.<name>.mstm-part` beside its final name, then given the source's mode and mtime and
  renamed over the final name with `posix-rename@openssh.com` (atomic replace; plain
  SFTP rename plus remove where the server lacks it).  An interrupted upload is
  resumed from that file's length next time (unless the sender forces a full re-send
  after a failed check, which then truncates it).  There is no fsync over SFTP
  (OpenSSH's `fsync@openssh.com` is not exposed by paramiko): a crash of the *target
  host* may lose what its page cache held; mstm verifies what the server then serves.
* **Directory items** are written into `<target_dir>/.mstm-staging/<name>` and renamed
  into place by `publish` after verification (a directory already there is replaced).
  Symbolic links inside them are recreated as links (SFTP `symlink`), never followed.
* **Symbolic links as file items** (`follow_symlinks = true`): the file a link points to
  is sent (and so verified); otherwise a source that is a link is refused (the scanner
  never queues one then).  Only regular files are ever opened.
* **Verification** (`inspect`), strongest first: with `[sftp] remote_checksum` (the
  default), size (`stat`) and sha256 computed *on the target* by `sha256sum` from the
  file under its final name, over an exec channel of the same connection; when the
  account cannot run commands (an sftp-only account, `ForceCommand internal-sftp`) or
  has no `sha256sum`, and `[sftp] verify_readback` is on (the default), the file is read
  back over SFTP and hashed here -- this proves the bytes the server serves, at the cost
  of reading them again; with both off, only the size is known and `sha256` is None.
* **Quick check**: a file whose target already has the source's size and mtime (whole
  seconds, SFTP's resolution) is not sent again unless the sender forces it.
* **bwlimit** paces the write loop; **connect_timeout** bounds TCP connect, the ssh
  banner and authentication; **stall_seconds**: no chunk written for that long (the
  server stopped, or trickling) closes the connection, and the sender retries later.
* The host key is always checked against `known_hosts` (an unknown or changed key is
  refused, never added); only key authentication is used, never a password.
"""

from __future__ import annotations

import contextlib
import errno
import getpass
import logging
import os
import posixpath
import secrets
import shlex
import socket
import stat
import threading
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, BinaryIO

import paramiko

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
    run_watched,
)
from mstm.transports.rsync_ssh import _INSPECT_SCRIPT, _SPLIT, parse_inspect

log = logging.getLogger("mstm.sftp")
logging.getLogger("paramiko").setLevel(logging.WARNING)

_CHUNK = 256 * 1024
_READ_CHUNK = 1 << 20
_CONNECTION_ERRORS = (paramiko.SSHException, EOFError, socket.error, OSError)


def _b(path: str) -> bytes:
    return os.fsencode(path)


def _join(*parts: bytes) -> bytes:
    return posixpath.join(*parts)


class Sftp:
    name = "sftp"

    def __init__(self, *, host: str, port: int = 22, username: str | None = None,
                 identity_file: Path | None = None, known_hosts: Path | None = None,
                 source_dir: Path, target_dir: str, connect_timeout: float = 15.0,
                 stall_seconds: float = 120.0, bwlimit: int = 0, stop_file: str = ".stop",
                 stop_dirs: Sequence[str] = (), remote_checksum: bool = True,
                 verify_readback: bool = True, follow_symlinks: bool = False) -> None:
        self.host = host
        self.port = port
        self.username = username or getpass.getuser()
        self.identity_file = identity_file
        self.known_hosts = known_hosts
        self.source = os.fsencode(source_dir)
        self.target = _b(target_dir.rstrip("/") or "/")
        self.connect_timeout = connect_timeout
        self.stall_seconds = stall_seconds
        self.bwlimit = bwlimit
        self.stop_file = stop_file
        self.stop_dirs = [_b(d) for d in stop_dirs] or [self.target]
        self.remote_checksum = remote_checksum
        self.verify_readback = verify_readback
        self.follow_symlinks = follow_symlinks  # file items: a link goes as its file
        self._client: paramiko.SSHClient | None = None
        self._sftp: paramiko.SFTPClient | None = None
        self._dirs: set[bytes] = set()
        self._exec_ok: bool | None = None if remote_checksum else False
        self._lock = threading.Lock()

    @property
    def peer(self) -> str:
        return f"{self.username}@{self.host}:{self.port}"

    # -- connection -------------------------------------------------------------
    def open(self) -> None:
        if self.alive():
            return
        self.close()
        client = paramiko.SSHClient()
        try:
            if self.known_hosts:
                client.load_host_keys(str(self.known_hosts))
            else:
                client.load_system_host_keys()
        except OSError as err:
            raise TargetUnavailable(f"cannot read known_hosts: {err}") from None
        client.set_missing_host_key_policy(paramiko.RejectPolicy())
        try:
            client.connect(
                self.host, self.port, username=self.username,
                key_filename=str(self.identity_file) if self.identity_file else None,
                look_for_keys=self.identity_file is None, allow_agent=False,
                timeout=self.connect_timeout, banner_timeout=self.connect_timeout,
                auth_timeout=self.connect_timeout, channel_timeout=self.connect_timeout)
            transport = client.get_transport()
            assert transport is not None
            transport.set_keepalive(10)
            sftp = client.open_sftp()
            channel = sftp.get_channel()
            assert channel is not None
            channel.settimeout(self.stall_seconds)
        except (paramiko.SSHException, EOFError, OSError) as err:
            client.close()
            raise TargetUnavailable(f"sftp to {self.peer} failed: {_reason(err)}") from None
        self._client, self._sftp = client, sftp
        self._dirs = set()

    def close(self) -> None:
        client, self._client, self._sftp = self._client, None, None
        if client is not None:
            with contextlib.suppress(Exception):
                client.close()

    def alive(self) -> bool:
        client = self._client
        if client is None:
            return False
        transport = client.get_transport()
        return transport is not None and transport.is_active()

    def _sftp_or_raise(self) -> paramiko.SFTPClient:
        if self._sftp is None or not self.alive():
            raise TargetUnavailable(f"sftp connection to {self.peer} is closed")
        return self._sftp

    # -- transfer ---------------------------------------------------------------
    def send(self, items: Sequence[Item], *, progress: Progress | None = None,
             should_stop: ShouldStop | None = None, tick: Callable[[], None] | None = None,
             dest: str | None = None) -> SendResult:
        """Send *items* under target_dir (directories into the staging area), or all of
        them, directories as trees, into *dest*."""
        sftp = self._sftp_or_raise()
        root = _b(dest.rstrip("/") or "/") if dest is not None else self.target
        monitor = Monitor(progress=progress, throttle=Throttle(self.bwlimit))

        def work(mon: Monitor) -> SendResult:
            result = SendResult()
            for item in items:
                try:
                    if item.is_dir:
                        tree = root if dest is not None else _join(root, STAGING.encode())
                        self._send_tree(sftp, item, tree, mon)
                    else:
                        self._send_file(sftp, _join(self.source, _b(item.relpath)),
                                        _join(root, _b(item.relpath)), mon,
                                        force=item.force, staged=False)
                except _CONNECTION_ERRORS as err:
                    if not self.alive() or not isinstance(err, OSError) or \
                            isinstance(err, TimeoutError):
                        self.close()
                        result.error = f"sftp to {self.peer}: {_reason(err)}"
                        result.exit_code = 1
                        break
                    result.item_errors[item.relpath] = _reason(err)
            result.files, result.bytes = mon.files, mon.bytes
            return result

        result = run_watched(work, monitor=monitor, stall_seconds=self.stall_seconds,
                             abort=self.close, should_stop=should_stop, tick=tick)
        return note_item_errors(result)

    def _makedirs(self, sftp: paramiko.SFTPClient, path: bytes) -> None:
        if path in self._dirs or path in (b"/", b""):
            return
        try:
            st = sftp.stat(path)
        except FileNotFoundError:
            self._makedirs(sftp, posixpath.dirname(path))
            try:
                sftp.mkdir(path, 0o755)
            except OSError:
                # made meanwhile by someone else?  Then fine; else the real error
                st = sftp.stat(path)
                if not stat.S_ISDIR(st.st_mode or 0):
                    raise
        else:
            if not stat.S_ISDIR(st.st_mode or 0):
                raise NotADirectoryError(errno.ENOTDIR, "not a directory",
                                         os.fsdecode(path))
        self._dirs.add(path)

    def _send_file(self, sftp: paramiko.SFTPClient, src: bytes, dst: bytes, mon: Monitor,
                   *, force: bool, staged: bool) -> None:
        # a file of a directory item (staged) is never read through a link
        with open(open_regular(src, follow_symlinks=self.follow_symlinks and not staged),
                  "rb") as fin:
            self._send_open_file(sftp, fin, dst, mon, force=force, staged=staged)

    def _send_open_file(self, sftp: paramiko.SFTPClient, fin: BinaryIO, dst: bytes,
                        mon: Monitor, *, force: bool, staged: bool) -> None:
        st = os.fstat(fin.fileno())
        if not force:
            with contextlib.suppress(OSError):
                t = sftp.lstat(dst)
                if stat.S_ISREG(t.st_mode or 0) and t.st_size == st.st_size and \
                        t.st_mtime == int(st.st_mtime):
                    return
        parent = posixpath.dirname(dst)
        self._makedirs(sftp, parent)
        tmp = dst if staged else _join(parent, b"." + posixpath.basename(dst) + b".mstm-part")
        offset = 0
        if not force and not staged:
            with contextlib.suppress(OSError):
                partial = sftp.lstat(tmp)
                if stat.S_ISREG(partial.st_mode or 0) and 0 < (partial.st_size or 0) < st.st_size:
                    offset = partial.st_size or 0
        if offset:
            log.debug("resuming %s at %d bytes", os.fsdecode(dst), offset)
            remote = sftp.open(tmp, "r+b")
            remote.seek(offset)
            fin.seek(offset)
        else:
            remote = sftp.open(tmp, "wb")
        with remote:
            remote.set_pipelined(True)
            size = chunk_size(self.bwlimit, _CHUNK)
            while data := fin.read(size):
                remote.write(data)
                mon.advance(len(data))
        sftp.chmod(tmp, stat.S_IMODE(st.st_mode))
        sftp.utime(tmp, (st.st_atime, st.st_mtime))
        if tmp != dst:
            _replace(sftp, tmp, dst)
        mon.file_done()

    def _send_tree(self, sftp: paramiko.SFTPClient, item: Item, tree: bytes,
                   mon: Monitor) -> None:
        rel = _b(item.relpath)
        src_root = _join(self.source, rel)
        dst_root = _join(tree, rel)
        self._makedirs(sftp, dst_root)
        for dirpath, dirnames, filenames in os.walk(src_root):
            sub = os.path.relpath(dirpath, src_root)
            out_dir = posixpath.normpath(_join(dst_root, sub))
            for d in dirnames:
                p = os.path.join(dirpath, d)
                if os.path.islink(p):
                    _replace_link(sftp, os.readlink(p), _join(out_dir, d))
                else:
                    self._makedirs(sftp, _join(out_dir, d))
            for f in filenames:
                p = os.path.join(dirpath, f)
                lst = os.lstat(p)
                if stat.S_ISLNK(lst.st_mode):
                    _replace_link(sftp, os.readlink(p), _join(out_dir, f))
                elif stat.S_ISREG(lst.st_mode):
                    self._send_file(sftp, p, _join(out_dir, f), mon, force=item.force,
                                    staged=True)
            mon.alive_now()

    # -- verification -----------------------------------------------------------
    def inspect(self, relpaths: Sequence[str], *, staged: bool = False) -> dict[str, RemoteFile]:
        if not relpaths:
            return {}
        sftp = self._sftp_or_raise()
        base = _join(self.target, STAGING.encode()) if staged else self.target

        def look(mon: Monitor) -> dict[str, RemoteFile]:
            try:
                if self._exec_ok is not False:
                    found = self._remote_sums(base, relpaths, mon)
                    if found is not None:
                        return found
                return self._stat_and_read(sftp, base, relpaths, mon)
            except (paramiko.SSHException, EOFError, OSError) as err:
                if not self.alive():
                    raise TargetUnavailable(f"sftp to {self.peer}: {_reason(err)}") from None
                raise

        return call_watched(look, stall_seconds=self.stall_seconds, abort=self.close,
                            what=f"verifying at {self.peer}")

    def _exec(self, argv: Sequence[str], stdin: bytes, mon: Monitor | None = None
              ) -> tuple[int, bytes]:
        """Run a command over the connection's exec channel: (exit status, stdout)."""
        client = self._client
        transport = client.get_transport() if client else None
        if transport is None:
            raise TargetUnavailable(f"sftp connection to {self.peer} is closed")
        chan = transport.open_session(timeout=self.connect_timeout)
        try:
            chan.settimeout(self.stall_seconds)
            chan.exec_command(shlex.join(argv))
            feeder = threading.Thread(target=_feed, args=(chan, stdin), daemon=True)
            feeder.start()
            out = bytearray()
            while True:
                try:
                    data = chan.recv(1 << 16)
                except TimeoutError:
                    if chan.exit_status_ready():
                        break
                    raise
                if not data:
                    break
                out += data
                if mon:
                    mon.alive_now()
            status = chan.recv_exit_status()
            feeder.join(timeout=5)
            return status, bytes(out)
        finally:
            chan.close()

    def _remote_sums(self, base: bytes, relpaths: Sequence[str], mon: Monitor
                     ) -> dict[str, RemoteFile] | None:
        """sha256sum on the target; None when this account cannot run it."""
        names = b"".join(_b(p) + b"\0" for p in relpaths)
        try:
            status, out = self._exec(["sh", "-c", _INSPECT_SCRIPT, "sh", os.fsdecode(base)],
                                     names, mon)
        except paramiko.ChannelException as err:  # exec refused by the server
            log.info("%s: cannot run commands (%s); verifying by reading back", self.peer,
                     err)
            self._exec_ok = False
            return None
        if status == 3:  # the directory itself is missing: nothing is there
            return {}
        if status != 0 or _SPLIT not in out:
            if self._exec_ok is None:
                log.info("%s: no usable sha256sum over ssh (exit %s); verifying by reading "
                         "back", self.peer, status)
            self._exec_ok = False
            return None
        self._exec_ok = True
        return parse_inspect(out)

    def _stat_and_read(self, sftp: paramiko.SFTPClient, base: bytes,
                       relpaths: Sequence[str], mon: Monitor) -> dict[str, RemoteFile]:
        found: dict[str, RemoteFile] = {}
        for rel in relpaths:
            path = _join(base, _b(rel))
            try:
                st = sftp.lstat(path)
            except FileNotFoundError:
                continue
            if not stat.S_ISREG(st.st_mode or 0):
                continue
            digest = _read_back(sftp, path, st.st_size or 0, mon) \
                if self.verify_readback else None
            found[rel] = RemoteFile(size=st.st_size or 0, sha256=digest)
            mon.alive_now()
        return found

    def publish(self, items: Sequence[Item]) -> dict[str, str]:
        sftp = self._sftp_or_raise()
        errors: dict[str, str] = {}
        staging = _join(self.target, STAGING.encode())
        for item in items:
            if not item.is_dir:
                continue
            final = _join(self.target, _b(item.relpath))
            staged = _join(staging, _b(item.relpath))
            old: bytes | None = None
            try:
                self._makedirs(sftp, posixpath.dirname(final))
                with contextlib.suppress(FileNotFoundError):
                    sftp.lstat(final)
                    old = _join(staging, b".replaced." + secrets.token_hex(6).encode())
                    sftp.rename(final, old)
                try:
                    sftp.rename(staged, final)
                except OSError:
                    if old:
                        sftp.rename(old, final)
                        old = None
                    raise
            except (OSError, paramiko.SSHException) as err:
                if not self.alive():
                    raise TargetUnavailable(f"sftp to {self.peer}: {_reason(err)}") from None
                errors[item.relpath] = f"could not be moved into place: {_reason(err)}"
                continue
            if old:
                self._remove_tree(sftp, old)
        return errors

    def _remove_tree(self, sftp: paramiko.SFTPClient, path: bytes) -> None:
        if self._exec_ok:
            with contextlib.suppress(Exception):
                if self._exec(["rm", "-rf", "--", os.fsdecode(path)], b"")[0] == 0:
                    return
        try:
            _rmtree(sftp, path)
        except (OSError, UnicodeDecodeError) as err:
            log.warning("%s: could not remove the replaced %s: %s", self.peer,
                        os.fsdecode(path), _reason(err))

    # -- small files (the arrival monitor's handshake) ---------------------------
    def put_file(self, directory: str, name: str, data: bytes) -> None:
        sftp = self._sftp_or_raise()
        d = _b(directory)
        self._makedirs(sftp, d)
        final = _join(d, _b(name))
        tmp = _join(d, b"." + _b(name) + b".mstm-part")
        with sftp.open(tmp, "wb") as f:
            f.write(data)
        _replace(sftp, tmp, final)

    def await_file(self, directory: str, name: str, *, timeout: float, max_bytes: int,
                   tick: Callable[[], None] | None = None,
                   should_stop: ShouldStop | None = None) -> bytes | None:
        sftp = self._sftp_or_raise()
        path = _join(_b(directory), _b(name))

        def look() -> bytes | None:
            try:
                with sftp.open(path, "rb") as f:
                    data: bytes = f.read(max_bytes)
                    return data
            except FileNotFoundError:
                return None

        return poll_until(look, timeout=timeout, interval=0.1, tick=tick,
                          should_stop=should_stop)

    def stop_file_present(self) -> str | None:
        sftp = self._sftp_or_raise()
        for d in self.stop_dirs:
            try:
                sftp.lstat(_join(d, _b(self.stop_file)))
            except FileNotFoundError:
                continue
            except (OSError, paramiko.SSHException) as err:
                if not self.alive():
                    raise TargetUnavailable(f"sftp to {self.peer}: {_reason(err)}") from None
                continue
            return f"{self.stop_file} on target ({os.fsdecode(d)})"
        return None


def _feed(chan: paramiko.Channel, data: bytes) -> None:
    with contextlib.suppress(Exception):
        chan.sendall(data)
    with contextlib.suppress(Exception):
        chan.shutdown_write()


def _replace(sftp: paramiko.SFTPClient, tmp: bytes, dst: bytes) -> None:
    """Rename *tmp* over *dst* atomically where the server can (posix-rename)."""
    try:
        sftp.posix_rename(tmp, dst)
        return
    except OSError:
        pass
    except paramiko.SSHException:
        pass
    with contextlib.suppress(FileNotFoundError):
        sftp.remove(dst)
    sftp.rename(tmp, dst)


def _replace_link(sftp: paramiko.SFTPClient, target: bytes, path: bytes) -> None:
    with contextlib.suppress(FileNotFoundError):
        sftp.remove(path)
    sftp.symlink(os.fsdecode(target), path)  # type: ignore[arg-type]


def _read_back(sftp: paramiko.SFTPClient, path: bytes, size: int, mon: Monitor) -> str:
    import hashlib

    h = hashlib.sha256()
    with sftp.open(path, "rb") as f:
        f.prefetch(size)
        while data := f.read(_READ_CHUNK):
            h.update(data)
            mon.alive_now()
    return h.hexdigest()


def _rmtree(sftp: paramiko.SFTPClient, path: bytes) -> None:
    for entry in sftp.listdir_attr(path):  # type: ignore[arg-type]
        child = _join(path, _b(entry.filename))
        if stat.S_ISDIR(entry.st_mode or 0):
            _rmtree(sftp, child)
        else:
            sftp.remove(child)
    sftp.rmdir(path)


def _reason(err: BaseException) -> str:
    text: Any = getattr(err, "strerror", None) or str(err) or type(err).__name__
    return str(text)
