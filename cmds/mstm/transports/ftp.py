"""ftp and ftps: the standard library's ftplib, one control connection per stream.

`ftps` is explicit FTP over TLS (RFC 4217: `AUTH TLS`, then `PROT P` so the data
connections are encrypted too); the server's certificate is checked against
`[ftp] ca_file` (or the system's CAs) and must name `target_host`.  `[ftp] tls = true`
does the same for `ftp`.  The password comes from `[ftp] password_file` or the systemd
credential `ftp-password`, and is never logged.

What it guarantees:

* **Nothing unverified under a final name.**  The sender sends every item (file or
  directory) into ``<target_dir>/.mstm-staging/<batch>/`` (`STOR` of each file, `MKD`
  of each directory), verifies it there and only then has it `publish`ed: renamed
  (`RNFR`/`RNTO`) over its final name (where a server refuses to rename over an
  existing file, the old one is deleted first: a short moment with no file, never a
  partial one).  A file rewritten while it was being sent is refused at once; in any
  case the sender's hash would not match, so it is never published.  `discard`
  removes what is left of a batch (iteratively, `DELE`/`RMD`); `open` removes batches
  a killed sender left (batch-shaped names only, nothing in them modified for a day,
  as `MLSD` tells; a server without `MLSD` keeps them).  FTP has no fsync: a crash of
  the target host may lose what its page cache held, also after `publish`.
* **Directory items are merged** (the same rules as local.py), file by file: a
  directory the target lacks is renamed in whole, into an existing one each file is
  renamed over a same-named non-directory, nothing else there is touched or removed;
  type conflicts are looked for first and fail the item with nothing changed.
  Directory items used to travel as one Zip64 archive published as ``<name>.zip``;
  that cannot merge (an FTP server cannot unpack, and a second delivery would replace
  the first archive), so they now travel as trees, in staging as everywhere else.
* **Links at the target**: FTP has no lstat and no no-follow open; the type of every
  existing component below target_dir is read from `LIST` of its parent (``ls -l``
  form: a leading ``l`` is a link) and a link fails the item.  Windows: a component
  swapped for a link between that `LIST` and the following command is followed by the
  server; a server whose `LIST` is not ``ls -l``-like, or hides dot files (the
  staging directory), cannot show links, and then none is detected.
* **The source is read only through** :mod:`mstm.safefs`; a directory item holding a
  symbolic link, FIFO, socket or device fails as a whole (FTP could not create them
  anyway), and nothing of that kind is created.
* **Modes and ownership**: FTP has no portable chmod (`SITE CHMOD` is not used):
  files and directories get the server's default mode, so setuid, setgid and sticky
  bits never arrive; ownership is the FTP account's.  The mtime is kept where the
  server has `MFMT`.
* **Verification** (`inspect`): the type from `LIST`, the size from `SIZE`; with
  `[ftp] verify_readback` (the default) the file is read back (`RETR`) and its sha256
  computed here, which proves the bytes the server serves (FTP has no standard remote
  checksum; `HASH`/`XSHA256` are rare extensions and not used).  Without readback only
  sizes are known and sha256 is None, which does not prove the content.  A directory
  is reported present with ``sha256=None``.
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
import logging
import os
import posixpath
import socket
import ssl
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import BinaryIO

from mstm import safefs
from mstm.errors import TargetUnavailable
from mstm.protocol import OUR_BATCH_RE
from mstm.transports.base import (
    STAGING,
    Item,
    Progress,
    RemoteFile,
    SendResult,
    ShouldStop,
    TransportOptions,
)
from mstm.transports.common import (
    STALE_SECONDS,
    ItemProblem,
    Monitor,
    Throttle,
    call_watched,
    chunk_size,
    note_item_errors,
    open_source_root,
    poll_until,
    read_secret,
    run_watched,
    staged_rel,
    staging_batch,
)
from mstm.transports.ftp_commands import (
    LOST,
    LOST_ONLY,
    FtpTree,
    NameNotSendable,
    file_size,
    ftp_name,
    kind_below,
    listing,
    reason,
    rename_over,
    rmtree,
)
from mstm.transports.publish import publish_item

log = logging.getLogger("mstm.ftp")

_CHUNK = 256 * 1024
_READ_CHUNK = 1 << 20
_IDLE_CHECK = 20.0  # seconds idle after which the control connection is NOOP'd first


class Ftp:
    def __init__(self, options: TransportOptions, *, host: str, port: int = 21,
                 username: str = "anonymous", password_file: Path | None = None,
                 tls: bool = False, ca_file: Path | None = None, passive: bool = True,
                 verify_readback: bool = True) -> None:
        self.name = "ftps" if tls else "ftp"
        self.host = host
        self.port = port
        self.username = username
        self.password_file = password_file
        self.tls = tls
        self.ca_file = ca_file
        self.passive = passive
        self.source = options.source_dir
        self.target = options.target_dir.rstrip("/") or "/"
        self.connect_timeout = options.connect_timeout
        self.stall_seconds = options.stall_seconds
        self.bwlimit = options.bwlimit
        self.stop_file = options.stop_file
        self.stop_dirs = [d.rstrip("/") or "/" for d in options.stop_dirs] or [self.target]
        self.verify_readback = verify_readback
        self.follow_symlinks = options.follow_symlinks  # file items: a link goes as its file
        self._ftp: ftplib.FTP | None = None
        self._data: socket.socket | None = None  # the data connection in use, if any
        self._dirs: set[str] = set()
        self._last_used = 0.0
        self._unfinished: set[str] = set()  # staging batches sent into, not discarded yet
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
        except (*LOST, ftplib.error_perm, ssl.SSLError) as err:
            with contextlib.suppress(Exception):
                ftp.close()
            raise TargetUnavailable(f"{self.peer}: {reason(err)}") from None
        ftp.timeout = self.stall_seconds  # for the data connections from now on
        if ftp.sock is not None:
            ftp.sock.settimeout(self.stall_seconds)
        self._ftp = ftp
        self._dirs = set()
        self._last_used = time.monotonic()
        for batch in sorted(self._unfinished):
            with contextlib.suppress(*LOST, ftplib.error_perm, TargetUnavailable):
                self.discard(batch)
        try:
            self._clean_stale(ftp)
        except (*LOST, ftplib.error_perm) as err:
            log.warning("%s: cannot clean old staging batches: %s", self.peer, reason(err))

    def _clean_stale(self, ftp: ftplib.FTP) -> None:
        """Remove the staging batches a killed sender left: batch-shaped names only,
        nothing in them modified for a day (MLSD's modify facts)."""
        staging = posixpath.join(self.target, STAGING)
        if listing(ftp, self.target).get(STAGING, "d") != "d":
            return
        limit = time.strftime("%Y%m%d%H%M%S", time.gmtime(time.time() - STALE_SECONDS))
        try:
            entries = list(ftp.mlsd(staging, facts=["type", "modify"]))
        except ftplib.error_perm:
            return
        for name, facts in entries:
            if not OUR_BATCH_RE.match(name) or name in self._unfinished or \
                    facts.get("type") != "dir" or facts.get("modify", "9") > limit:
                continue
            todo, fresh = [posixpath.join(staging, name)], False
            while todo and not fresh:
                here = todo.pop()
                for n, f in ftp.mlsd(here, facts=["type", "modify"]):
                    if f.get("type") in ("cdir", "pdir"):
                        continue
                    fresh = fresh or f.get("modify", "9") > limit
                    if f.get("type") == "dir":
                        todo.append(posixpath.join(here, n))
            if not fresh:
                log.info("%s: removing the abandoned staging batch %s", self.peer, name)
                self.discard(name)

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
            except (*LOST, ftplib.error_perm):
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
        """Send *items* into *dest* (a staging batch, or the arrival monitor's batch
        directory), directories as trees.  Without *dest*, file items go straight to
        target_dir (a hidden name, then a rename) and directory items are refused."""
        try:
            ftp = self._conn()
        except TargetUnavailable as err:
            return SendResult(error=err.message, exit_code=1)
        monitor = Monitor(progress=progress, throttle=Throttle(self.bwlimit))
        private = staging_batch(self.target, dest)
        if private:
            self._unfinished.add(private)
        self._dirs = set()

        def work(mon: Monitor) -> SendResult:
            result = SendResult()
            src = open_source_root(self.source, items, result)
            if src is None:
                return result
            src_fd: int = src
            try:
                root = self._prepare_dest(ftp, dest)
                for item in items:
                    try:
                        if item.is_dir and dest is None:
                            raise ItemProblem("a directory item needs a staging batch")
                        if item.is_dir:
                            self._send_tree(ftp, src_fd, item, root, mon)
                        else:
                            parts = safefs.split(item.relpath)
                            parent = root
                            for part in parts[:-1]:
                                parent = posixpath.join(parent, os.fsdecode(part))
                                self._ensure_dir(ftp, parent, item.relpath)
                            self._send_file(ftp, src_fd, item.relpath,
                                            posixpath.join(root, item.relpath), mon,
                                            follow=self.follow_symlinks, direct=dest is None)
                    except (NameNotSendable, ItemProblem) as err:
                        result.item_errors[item.relpath] = str(err)
                    except ftplib.error_perm as err:
                        result.item_errors[item.relpath] = reason(err)
            except (NameNotSendable, ItemProblem, ftplib.error_perm) as err:
                for item in items:
                    result.item_errors[item.relpath] = reason(err)
            except LOST as err:
                self._cut()
                result.error = f"{self.peer}: {reason(err)}"
                result.exit_code = 1
            finally:
                os.close(src_fd)
            result.files, result.bytes = mon.files, mon.bytes
            return result

        result = run_watched(work, monitor=monitor, stall_seconds=self.stall_seconds,
                             abort=self._cut, should_stop=should_stop, tick=tick)
        self._last_used = time.monotonic()
        return note_item_errors(result)

    def _prepare_dest(self, ftp: ftplib.FTP, dest: str | None) -> str:
        if dest is None:
            return self.target
        raw = ftp_name(dest.rstrip("/") or "/")
        prefix = self.target.rstrip("/") + "/"
        if raw.startswith(prefix):
            base, rel = self.target, raw[len(prefix):]
        else:  # the arrival monitor's incoming directory, as configured
            base, rel = posixpath.split(raw)
            self._makedirs(ftp, base)
        for part in rel.split("/") if rel else []:
            base = posixpath.join(base, part)
            self._ensure_dir(ftp, base, dest)
        return base

    def _ensure_dir(self, ftp: ftplib.FTP, path: str, shown: str) -> None:
        """*path* is a directory (made if missing), not a link as LIST shows it."""
        if path in self._dirs:
            return
        parent, name = posixpath.split(path)
        kind = listing(ftp, parent).get(name)
        if kind is None:
            with contextlib.suppress(ftplib.error_perm):
                ftp.mkd(ftp_name(path))
            kind = listing(ftp, parent).get(name, "d")  # a server hiding dot files
        if kind == "l":
            raise ItemProblem(f"{shown}: {path} is a symbolic link at the target (never "
                              f"followed); left as it is")
        if kind != "d":
            raise ItemProblem(f"{shown}: {path} is not a directory at the target; left as "
                              f"it is")
        self._dirs.add(path)

    def _makedirs(self, ftp: ftplib.FTP, path: str) -> None:
        if path in self._dirs or path in ("/", ""):
            return
        self._makedirs(ftp, posixpath.dirname(path))
        try:
            ftp.mkd(ftp_name(path))
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

    def _send_file(self, ftp: ftplib.FTP, src_fd: int, relpath: str, remote: str,
                   mon: Monitor, *, follow: bool, direct: bool = False) -> None:
        mon.start_file(relpath)
        remote = ftp_name(remote)
        try:
            fd = safefs.open_regular(src_fd, relpath, follow_symlinks=follow)
        except OSError as err:
            raise ItemProblem(f"{relpath}: cannot be read safely: {err.strerror or err}"
                              ) from None
        with open(fd, "rb") as f:
            self._send_open_file(ftp, f, relpath, remote, mon, direct=direct)

    def _send_open_file(self, ftp: ftplib.FTP, f: BinaryIO, relpath: str, remote: str,
                        mon: Monitor, *, direct: bool) -> None:
        st = os.fstat(f.fileno())
        parent, base = posixpath.split(remote)
        tmp = posixpath.join(parent, f".{base}.mstm-part") if direct else remote
        step = chunk_size(self.bwlimit, _CHUNK)
        self._upload(ftp, f"STOR {tmp}", iter(lambda: f.read(step), b""), mon)
        changed = safefs.Version.of(st).same_file(os.fstat(f.fileno()))
        if changed:
            with contextlib.suppress(ftplib.error_perm):
                ftp.delete(tmp)
            raise ItemProblem(f"{relpath}: the source changed while it was being sent "
                              f"({changed})")
        with contextlib.suppress(ftplib.error_perm, ftplib.error_reply):
            stamp = time.strftime("%Y%m%d%H%M%S", time.gmtime(st.st_mtime))
            ftp.sendcmd(f"MFMT {stamp} {tmp}")  # keep the mtime where the server can
        if tmp != remote:
            rename_over(ftp, tmp, remote)
        mon.file_done()

    def _send_tree(self, ftp: ftplib.FTP, src_fd: int, item: Item, root: str,
                   mon: Monitor) -> None:
        """A directory item, walked with :func:`mstm.safefs.walk` (nothing followed)."""
        parts = safefs.split(item.relpath)
        parent = root
        for part in parts[:-1]:
            parent = posixpath.join(parent, os.fsdecode(part))
            self._ensure_dir(ftp, parent, item.relpath)
        try:
            entries = safefs.walk(src_fd, item.relpath)
            for entry in entries:
                remote = ftp_name(posixpath.join(root, entry.relpath))
                if entry.is_dir:
                    ftp.mkd(remote)
                    self._dirs.add(remote)
                elif entry.is_file:
                    self._send_file(ftp, src_fd, entry.relpath, remote, mon, follow=False)
                else:
                    raise ItemProblem(
                        f"{entry.relpath} is a {safefs.special_reason(entry.st.st_mode)}: a "
                        f"directory item carries only regular files and directories")
                mon.alive_now()
        except OSError as err:
            if isinstance(err, LOST_ONLY) or err.filename is None:
                raise
            raise ItemProblem(f"{item.relpath}: cannot be read safely: "
                              f"{err.strerror or err}") from None

    # -- verification -----------------------------------------------------------
    def inspect(self, relpaths: Sequence[str], *, staged: str | None = None
                ) -> dict[str, RemoteFile]:
        if not relpaths:
            return {}
        ftp = self._conn()
        base = self._staged_path(staged) if staged is not None else self.target

        def look(mon: Monitor) -> dict[str, RemoteFile]:
            try:
                found: dict[str, RemoteFile] = {}
                listings: dict[str, dict[str, str]] = {}
                for rel in relpaths:
                    try:
                        path = ftp_name(posixpath.join(base, rel))
                        kind = kind_below(ftp, base, rel, listings)
                    except (NameNotSendable, ValueError):
                        continue
                    if kind == "d":
                        found[rel] = RemoteFile(size=0, sha256=None)
                    elif kind == "f":
                        size = file_size(ftp, path)
                        if size is not None:
                            digest = self._read_back(ftp, path, mon) \
                                if self.verify_readback else None
                            found[rel] = RemoteFile(size=size, sha256=digest)
                    mon.alive_now()
                return found
            except LOST as err:
                self._cut()
                raise TargetUnavailable(f"{self.peer}: {reason(err)}") from None

        result = call_watched(look, stall_seconds=self.stall_seconds, abort=self._cut,
                              what=f"verifying at {self.peer}")
        self._last_used = time.monotonic()
        return result

    def _staged_path(self, staged: str) -> str:
        return posixpath.join(self.target, staged_rel(staged))

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

    # -- publishing -------------------------------------------------------------
    def publish(self, items: Sequence[Item], *, staged: str) -> dict[str, str]:
        """Rename the verified *items* of batch *staged* into place: files replace,
        directories merge, a link on the way fails the item (see the module docstring)."""
        if not items:
            return {}
        ftp = self._conn()
        stage = self._staged_path(staged)
        self._dirs = set()

        tree = FtpTree(ftp, lambda path, shown: self._ensure_dir(ftp, path, shown))

        def work(mon: Monitor) -> dict[str, str]:
            errors: dict[str, str] = {}
            for item in items:
                try:
                    publish_item(tree, item, stage=stage, target=self.target)
                except (NameNotSendable, ItemProblem) as err:
                    errors[item.relpath] = str(err)
                except ftplib.error_perm as err:
                    errors[item.relpath] = f"could not be moved into place: {reason(err)}"
                except LOST as err:
                    self._cut()
                    raise TargetUnavailable(f"{self.peer}: {reason(err)}") from None
                mon.alive_now()
            return errors

        result = call_watched(work, stall_seconds=self.stall_seconds, abort=self._cut,
                              what=f"publishing at {self.peer}")
        self._last_used = time.monotonic()
        return result

    def discard(self, staged: str) -> None:
        ftp = self._conn()
        path = self._staged_path(staged)

        def work(mon: Monitor) -> None:
            try:
                rmtree(ftp, path, mon)
            except ftplib.error_perm as err:
                log.warning("%s: could not remove %s: %s", self.peer, path, reason(err))
            except LOST as err:
                self._cut()
                raise TargetUnavailable(f"{self.peer}: {reason(err)}") from None

        call_watched(work, stall_seconds=self.stall_seconds, abort=self._cut,
                     what=f"discarding at {self.peer}")
        self._last_used = time.monotonic()
        self._unfinished.discard(staged)

    # -- small files (the arrival monitor's handshake) ---------------------------
    def put_file(self, directory: str, name: str, data: bytes) -> None:
        ftp = self._conn()
        d = directory.rstrip("/") or "/"
        try:
            self._makedirs(ftp, ftp_name(d))
            final = ftp_name(posixpath.join(d, name))
            tmp = posixpath.join(d, f".{name}.mstm-part")
            self._upload(ftp, f"STOR {tmp}", iter([data]), Monitor())
            rename_over(ftp, tmp, final)
        except (*LOST, ftplib.error_perm, NameNotSendable) as err:
            raise OSError(f"cannot write {name} in {directory} on {self.peer}: "
                          f"{reason(err)}") from None

    def await_file(self, directory: str, name: str, *, timeout: float, max_bytes: int,
                   tick: Callable[[], None] | None = None,
                   should_stop: ShouldStop | None = None) -> bytes | None:
        path = ftp_name(posixpath.join(directory, name))

        def look() -> bytes | None:
            ftp = self._conn()
            try:
                if file_size(ftp, path) is None:
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
            except LOST as err:
                self._cut()
                raise TargetUnavailable(f"{self.peer}: {reason(err)}") from None

        return poll_until(look, timeout=timeout, interval=0.2, tick=tick,
                          should_stop=should_stop)

    def stop_file_present(self) -> str | None:
        ftp = self._conn()
        for d in self.stop_dirs:
            try:
                if file_size(ftp, ftp_name(posixpath.join(d, self.stop_file))) is not None:
                    return f"{self.stop_file} on target ({d})"
            except LOST as err:
                self._cut()
                raise TargetUnavailable(f"{self.peer}: {reason(err)}") from None
        return None
