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

* **Nothing unverified under a final name.**  The sender sends every item (file or
  directory) into ``<target_dir>/.mstm-staging/<batch>/`` (both made mode 0700),
  verifies it there (`inspect`) and only then has it `publish`ed: a file is renamed
  over its final name with `posix-rename@openssh.com` (atomic replace; plain SFTP
  rename plus remove where the server lacks it).  A file rewritten while it was being
  sent is refused at once (its size, mtime or ctime moved); in any case the sender's
  hash would not match, so it is never published.  `discard` removes what is left of a
  batch (``rm -rf`` over exec where the account may run commands, else an iterative
  SFTP walk); `open` removes the batches a killed sender left (batch-shaped names only,
  nothing in them changed for a day).  There is no fsync over SFTP (OpenSSH's
  `fsync@openssh.com` is not exposed by paramiko): where the account may run
  commands, the target runs ``syncfs`` before the check and after the renames of
  `publish`; where it may not, a crash of the *target host* may lose what its page
  cache held.
* **Directory items are merged** (the same rules as local.py): a directory the target
  lacks is renamed in whole (OpenSSH's plain rename refuses an existing name), into an
  existing one each file is renamed over a same-named non-directory, and nothing else
  there is touched or removed; type conflicts (and links where a directory is needed)
  are looked for first and fail the item with nothing changed.
* **Links at the target**: SFTP has no no-follow open, so every existing component
  of a path below target_dir is `lstat`'d first (the staging directory, each parent of
  an item, each directory merged into) and a symbolic link fails the item.  The
  window: a component swapped for a link *between* that lstat and the following
  request (open, mkdir, rename) is followed by the server.  Only an account that can
  write in target_dir can do that; the staging batch itself is 0700.
* **The source is read only through** :mod:`mstm.safefs` (no link below the stream
  directory followed; a directory item walked from descriptors); a directory item
  holding a symbolic link, FIFO, socket or device fails as a whole and nothing of that
  kind is ever created at the target.
* **Modes and ownership**: a file gets its source's permission bits ``& 0o777``, a
  directory of a directory item ``(mode & 0o777) | 0o700``, directories above an
  item the server's default; setuid, setgid and sticky bits never survive (also as
  root).  Ownership is never copied: files belong to the account that writes them.
  The mtime is kept (whole seconds).
* **Verification** (`inspect`), strongest first: with `[sftp] remote_checksum` (the
  default), size and sha256 computed *on the target* by python3 over an exec channel
  of the same connection, every path resolved from a descriptor with ``O_NOFOLLOW``;
  when the account cannot run commands (an sftp-only account, `ForceCommand
  internal-sftp`) or has no python3, and `[sftp] verify_readback` is on (the default),
  the file is read back over SFTP (after the lstat of its components) and hashed here;
  with both off, only the size is known and `sha256` is None.  A directory is
  reported present with ``sha256=None``.
* **bwlimit** paces the write loop; **connect_timeout** bounds TCP connect, the ssh
  banner and authentication; **stall_seconds**: no chunk written for that long (the
  server stopped, or trickling) closes the connection, and the sender retries later.
* The host key is always checked against `known_hosts` (an unknown or changed key is
  refused, never added); only key authentication is used, never a password.

The stateless SFTP requests are in sftp_requests.py; what stays here (some 650 lines)
is the one class whose methods share a connection's state (the directories known to
exist, whether the account may run commands, the batches not yet discarded).
"""

from __future__ import annotations

import contextlib
import errno
import getpass
import logging
import os
import posixpath
import shlex
import socket
import stat
import threading
import time
from collections.abc import Callable, Sequence
from pathlib import Path

import paramiko

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
    dir_mode,
    file_mode,
    note_item_errors,
    open_source_root,
    poll_until,
    run_watched,
    staged_rel,
    staging_batch,
)
from mstm.transports.publish import publish_item
from mstm.transports.remote import program
from mstm.transports.sftp_requests import (
    SftpTree,
    bjoin,
    bpath,
    feed,
    lstat,
    parse_inspect,
    read_back,
    reason,
    replace,
    rmtree,
    tree_attrs,
)
from mstm.transports.ssh_config import config_port, host_entry

log = logging.getLogger("mstm.sftp")
logging.getLogger("paramiko").setLevel(logging.WARNING)

_CHUNK = 256 * 1024
_CONNECTION_ERRORS = (paramiko.SSHException, EOFError, socket.error, OSError)


class Sftp:
    name = "sftp"

    def __init__(self, options: TransportOptions, *, host: str, port: int | None = None,
                 username: str | None = None, identity_file: Path | None = None,
                 known_hosts: Path | None = None, ssh_config: Path | None = None,
                 remote_checksum: bool = True, verify_readback: bool = True) -> None:
        # as OpenSSH's ssh would: target_host may be a Host alias of the ssh configuration,
        # whose HostName, Port and User apply where the stream's configuration says none
        entry = host_entry(host, ssh_config)
        self.host = str(entry.get("hostname") or host)
        self.port = port or config_port(entry.get("port"), host, ssh_config)
        self.username = username or str(entry.get("user") or "") or getpass.getuser()
        self.identity_file = identity_file
        self.known_hosts = known_hosts
        self.source = os.fsencode(options.source_dir)
        self.target = bpath(options.target_dir.rstrip("/") or "/")
        self.connect_timeout = options.connect_timeout
        self.stall_seconds = options.stall_seconds
        self.bwlimit = options.bwlimit
        self.stop_file = options.stop_file
        self.stop_dirs = [bpath(d) for d in options.stop_dirs] or [self.target]
        self.remote_checksum = remote_checksum
        self.verify_readback = verify_readback
        self.follow_symlinks = options.follow_symlinks  # file items: a link goes as its file
        self._client: paramiko.SSHClient | None = None
        self._sftp: paramiko.SFTPClient | None = None
        self._dirs: set[bytes] = set()
        self._exec_ok: bool | None = None if remote_checksum else False
        self._lock = threading.Lock()
        self._unfinished: set[str] = set()  # staging batches sent into, not discarded yet

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
            raise TargetUnavailable(f"sftp to {self.peer} failed: {reason(err)}") from None
        self._client, self._sftp = client, sftp
        self._dirs = set()
        for batch in sorted(self._unfinished):
            with contextlib.suppress(OSError, paramiko.SSHException, TargetUnavailable):
                self.discard(batch)
        try:
            self._clean_stale(sftp)
        except (OSError, paramiko.SSHException, UnicodeDecodeError) as err:
            log.warning("%s: cannot clean old staging batches: %s", self.peer, reason(err))

    def _clean_stale(self, sftp: paramiko.SFTPClient) -> None:
        """Remove the staging batches a killed sender left: batch-shaped names only,
        nothing in them changed for a day."""
        staging = bjoin(self.target, STAGING.encode())
        st = lstat(sftp, staging)
        if st is None or not stat.S_ISDIR(st.st_mode or 0):
            return
        limit = time.time() - STALE_SECONDS
        for entry in sftp.listdir_attr(staging):  # type: ignore[arg-type]
            name = entry.filename
            if not OUR_BATCH_RE.match(name) or name in self._unfinished or \
                    not stat.S_ISDIR(entry.st_mode or 0) or (entry.st_mtime or 0) > limit:
                continue
            if all((e.st_mtime or 0) <= limit
                   for e in tree_attrs(sftp, bjoin(staging, bpath(name)))):
                log.info("%s: removing the abandoned staging batch %s", self.peer, name)
                self.discard(name)

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
        """Send *items* into *dest* (a staging batch, or the arrival monitor's batch
        directory), directories as trees.  Without *dest*, file items go straight to
        target_dir (a hidden name, then a rename) and directory items are refused."""
        sftp = self._sftp_or_raise()
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
                root = self._prepare_dest(sftp, dest, private=private is not None)
                for item in items:
                    try:
                        if item.is_dir and dest is None:
                            raise ItemProblem("a directory item needs a staging batch")
                        if item.is_dir:
                            self._send_tree(sftp, src_fd, item, root, mon)
                        else:
                            self._send_item_file(sftp, src_fd, item, root, mon,
                                                 direct=dest is None,
                                                 private=private is not None)
                    except ItemProblem as err:
                        result.item_errors[item.relpath] = str(err)
                    except _CONNECTION_ERRORS as err:
                        if not self.alive() or not isinstance(err, OSError) or \
                                isinstance(err, TimeoutError):
                            raise
                        result.item_errors[item.relpath] = reason(err)
            except ItemProblem as err:
                for item in items:
                    result.item_errors[item.relpath] = str(err)
            except _CONNECTION_ERRORS as err:
                self.close()
                result.error = f"sftp to {self.peer}: {reason(err)}"
                result.exit_code = 1
            finally:
                os.close(src_fd)
            result.files, result.bytes = mon.files, mon.bytes
            return result

        result = run_watched(work, monitor=monitor, stall_seconds=self.stall_seconds,
                             abort=self.close, should_stop=should_stop, tick=tick)
        return note_item_errors(result)

    def _prepare_dest(self, sftp: paramiko.SFTPClient, dest: str | None, *,
                      private: bool) -> bytes:
        """Make *dest* (0700 for a staging batch), checking that no component below
        target_dir is a symbolic link; its path."""
        if dest is None:
            return self.target
        raw = bpath(dest).rstrip(b"/") or b"/"
        prefix = self.target.rstrip(b"/") + b"/"
        if raw.startswith(prefix):
            base, rel = self.target, raw[len(prefix):]
        else:  # the arrival monitor's incoming directory (configured: may be a link)
            base, rel = posixpath.split(raw)
            self._makedirs(sftp, base)
        for part in rel.split(b"/") if rel else []:
            base = bjoin(base, part)
            self._ensure_dir(sftp, base, 0o700 if private else 0o777, dest)
        return base

    def _ensure_dir(self, sftp: paramiko.SFTPClient, path: bytes, mode: int,
                    shown: str) -> None:
        """*path* is a directory (made with *mode* if missing), not a link: else
        ItemProblem (the lstat-then-use window is in the module docstring)."""
        if path in self._dirs:
            return
        st = lstat(sftp, path)
        if st is None:
            try:
                sftp.mkdir(path, mode)  # type: ignore[arg-type]
            except OSError:
                pass  # made meanwhile by someone else?  Looked at below
            st = lstat(sftp, path)
        if st is None or stat.S_ISLNK(st.st_mode or 0):
            raise ItemProblem(f"{shown}: {os.fsdecode(path)} is a symbolic link at the target "
                              f"(never followed); left as it is" if st is not None else
                              f"{shown}: cannot make {os.fsdecode(path)}")
        if not stat.S_ISDIR(st.st_mode or 0):
            raise ItemProblem(f"{shown}: {os.fsdecode(path)} is not a directory at the "
                              f"target; left as it is")
        self._dirs.add(path)

    def _makedirs(self, sftp: paramiko.SFTPClient, path: bytes) -> None:
        """The configured directories (incoming, handshake): made if missing, as given."""
        if path in self._dirs or path in (b"/", b""):
            return
        try:
            st = sftp.stat(path)  # type: ignore[arg-type]
        except FileNotFoundError:
            self._makedirs(sftp, posixpath.dirname(path))
            try:
                sftp.mkdir(path, 0o755)  # type: ignore[arg-type]
            except OSError:
                st = sftp.stat(path)  # type: ignore[arg-type]
                if not stat.S_ISDIR(st.st_mode or 0):
                    raise
        else:
            if not stat.S_ISDIR(st.st_mode or 0):
                raise NotADirectoryError(errno.ENOTDIR, "not a directory",
                                         os.fsdecode(path))
        self._dirs.add(path)

    def _send_item_file(self, sftp: paramiko.SFTPClient, src_fd: int, item: Item,
                        root: bytes, mon: Monitor, *, direct: bool, private: bool) -> None:
        parts = safefs.split(item.relpath)
        parent = root
        for part in parts[:-1]:
            parent = bjoin(parent, part)
            self._ensure_dir(sftp, parent, 0o700 if private else 0o777, item.relpath)
        self._send_file(sftp, src_fd, item.relpath, bjoin(parent, parts[-1]), mon,
                        follow=self.follow_symlinks, direct=direct)

    def _send_file(self, sftp: paramiko.SFTPClient, src_fd: int, relpath: str, dst: bytes,
                   mon: Monitor, *, follow: bool, direct: bool = False) -> None:
        """Send source file *relpath* (read through safefs) to *dst*; *direct*: through
        a hidden name renamed over it."""
        mon.start_file(relpath)
        try:
            fd = safefs.open_regular(src_fd, relpath, follow_symlinks=follow)
        except OSError as err:
            raise ItemProblem(f"{relpath}: cannot be read safely: {err.strerror or err}"
                              ) from None
        with open(fd, "rb") as fin:
            st = os.fstat(fd)
            parent = posixpath.dirname(dst)
            tmp = bjoin(parent, b"." + posixpath.basename(dst) + b".mstm-part") \
                if direct else dst
            with sftp.open(tmp, "wb") as remote:  # type: ignore[call-overload]
                remote.set_pipelined(True)
                size = chunk_size(self.bwlimit, _CHUNK)
                while data := fin.read(size):
                    remote.write(data)
                    mon.advance(len(data))
            changed = safefs.Version.of(st).same_file(os.fstat(fd))
        if changed:
            with contextlib.suppress(OSError):
                sftp.remove(tmp)  # type: ignore[arg-type]
            raise ItemProblem(f"{relpath}: the source changed while it was being sent "
                              f"({changed})")
        sftp.chmod(tmp, file_mode(st.st_mode))  # type: ignore[arg-type]
        sftp.utime(tmp, (st.st_atime, st.st_mtime))  # type: ignore[arg-type]
        if tmp != dst:
            replace(sftp, tmp, dst)
        mon.file_done()

    def _send_tree(self, sftp: paramiko.SFTPClient, src_fd: int, item: Item, root: bytes,
                   mon: Monitor) -> None:
        """A directory item, walked with :func:`mstm.safefs.walk` (nothing followed)."""
        parts = safefs.split(item.relpath)
        parent = root
        for part in parts[:-1]:
            parent = bjoin(parent, part)
            self._ensure_dir(sftp, parent, 0o700, item.relpath)
        try:
            for entry in safefs.walk(src_fd, item.relpath):
                dst = bjoin(root, bpath(entry.relpath))
                if entry.is_dir:
                    sftp.mkdir(dst, 0o700)  # type: ignore[arg-type]
                    sftp.chmod(dst, dir_mode(entry.st.st_mode))  # type: ignore[arg-type]
                elif entry.is_file:
                    self._send_file(sftp, src_fd, entry.relpath, dst, mon, follow=False)
                else:
                    raise ItemProblem(
                        f"{entry.relpath} is a {safefs.special_reason(entry.st.st_mode)}: a "
                        f"directory item carries only regular files and directories")
                mon.alive_now()
        except (NotADirectoryError, FileNotFoundError) as err:
            if err.filename is not None and not isinstance(err.filename, bytes) and \
                    not str(err.filename).startswith("/"):
                raise ItemProblem(f"{item.relpath}: cannot be read safely: "
                                  f"{err.strerror or err}") from None
            raise
        except OSError as err:
            if err.errno == errno.ELOOP:
                raise ItemProblem(f"{item.relpath}: a symbolic link on the way in the source "
                                  f"(never followed)") from None
            raise

    # -- verification -----------------------------------------------------------
    def inspect(self, relpaths: Sequence[str], *, staged: str | None = None
                ) -> dict[str, RemoteFile]:
        if not relpaths:
            return {}
        sftp = self._sftp_or_raise()
        base = self._staged_path(staged) if staged is not None else self.target

        def look(mon: Monitor) -> dict[str, RemoteFile]:
            try:
                if self._exec_ok is not False:
                    found = self._remote_sums(base, relpaths, mon)
                    if found is not None:
                        return found
                return self._stat_and_read(sftp, base, relpaths, mon)
            except (paramiko.SSHException, EOFError, OSError) as err:
                if not self.alive():
                    raise TargetUnavailable(f"sftp to {self.peer}: {reason(err)}") from None
                raise

        return call_watched(look, stall_seconds=self.stall_seconds, abort=self.close,
                            what=f"verifying at {self.peer}")

    def _staged_path(self, staged: str) -> bytes:
        return bjoin(self.target, bpath(staged_rel(staged)))

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
            feeder = threading.Thread(target=feed, args=(chan, stdin), daemon=True)
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
        """Sizes and sha256 computed on the target (no link followed); None when this
        account cannot run python3 there."""
        names = b"".join(bpath(p) + b"\0" for p in relpaths)
        try:
            status, out = self._exec(["python3", "-I", "-c", program("sftp_inspect.py"),
                                      os.fsdecode(base)], names, mon)
        except paramiko.ChannelException as err:  # exec refused by the server
            log.info("%s: cannot run commands (%s); verifying by reading back", self.peer,
                     err)
            self._exec_ok = False
            return None
        found = parse_inspect(out) if status == 0 else None
        if found is None:
            if self._exec_ok is None:
                log.info("%s: no usable python3 over ssh (exit %s); verifying by reading "
                         "back", self.peer, status)
            self._exec_ok = False
            return None
        self._exec_ok = True
        return found

    def _stat_and_read(self, sftp: paramiko.SFTPClient, base: bytes,
                       relpaths: Sequence[str], mon: Monitor) -> dict[str, RemoteFile]:
        found: dict[str, RemoteFile] = {}
        dirs: dict[bytes, bool] = {}  # a component below base: a real directory?
        for rel in relpaths:
            try:
                parts = safefs.split(rel)
            except ValueError:
                continue
            where, ok = base, True
            for part in parts[:-1]:
                where = bjoin(where, part)
                if where not in dirs:
                    st = lstat(sftp, where)
                    dirs[where] = st is not None and stat.S_ISDIR(st.st_mode or 0)
                ok = ok and dirs[where]
            path = bjoin(base, bpath(rel))
            st = lstat(sftp, path) if ok else None
            if st is None:
                continue
            if stat.S_ISDIR(st.st_mode or 0):
                found[rel] = RemoteFile(size=0, sha256=None)
            elif stat.S_ISREG(st.st_mode or 0):
                digest = read_back(sftp, path, st.st_size or 0, mon) \
                    if self.verify_readback else None
                found[rel] = RemoteFile(size=st.st_size or 0, sha256=digest)
            mon.alive_now()
        return found

    # -- publishing -------------------------------------------------------------
    def publish(self, items: Sequence[Item], *, staged: str) -> dict[str, str]:
        """Rename the verified *items* of batch *staged* into place: files replace,
        directories merge, a link on the way fails the item (see the module docstring)."""
        if not items:
            return {}
        sftp = self._sftp_or_raise()
        stage = self._staged_path(staged)
        self._dirs = set()

        tree = SftpTree(sftp, lambda path, shown: self._ensure_dir(sftp, path, 0o777, shown))

        def work(mon: Monitor) -> dict[str, str]:
            errors: dict[str, str] = {}
            for item in items:
                try:
                    publish_item(tree, item, stage=stage, target=self.target)
                except ItemProblem as err:
                    errors[item.relpath] = str(err)
                except (OSError, paramiko.SSHException, UnicodeDecodeError) as err:
                    if not self.alive():
                        raise TargetUnavailable(f"sftp to {self.peer}: {reason(err)}"
                                                ) from None
                    errors[item.relpath] = f"could not be moved into place: {reason(err)}"
                mon.alive_now()
            if self._exec_ok:  # the renames durable: syncfs of the target's file system
                with contextlib.suppress(paramiko.SSHException, OSError):
                    self._exec(["python3", "-I", "-c", program("sftp_inspect.py"),
                                os.fsdecode(self.target)], b"", mon)
            return errors

        return call_watched(work, stall_seconds=self.stall_seconds, abort=self.close,
                            what=f"publishing at {self.peer}")

    def discard(self, staged: str) -> None:
        sftp = self._sftp_or_raise()
        path = self._staged_path(staged)

        def work(mon: Monitor) -> None:
            if self._exec_ok is not False:
                with contextlib.suppress(paramiko.SSHException, OSError):
                    if self._exec(["rm", "-rf", "--", os.fsdecode(path)], b"", mon)[0] == 0:
                        return
            try:
                rmtree(sftp, path, mon)
            except (OSError, UnicodeDecodeError) as err:
                log.warning("%s: could not remove %s: %s", self.peer, os.fsdecode(path),
                            reason(err))

        call_watched(work, stall_seconds=self.stall_seconds, abort=self.close,
                     what=f"discarding at {self.peer}")
        self._unfinished.discard(staged)

    # -- small files (the arrival monitor's handshake) ---------------------------
    def put_file(self, directory: str, name: str, data: bytes) -> None:
        sftp = self._sftp_or_raise()
        d = bpath(directory)
        self._makedirs(sftp, d)
        final = bjoin(d, bpath(name))
        tmp = bjoin(d, b"." + bpath(name) + b".mstm-part")
        with sftp.open(tmp, "wb") as f:
            f.write(data)
        replace(sftp, tmp, final)

    def await_file(self, directory: str, name: str, *, timeout: float, max_bytes: int,
                   tick: Callable[[], None] | None = None,
                   should_stop: ShouldStop | None = None) -> bytes | None:
        sftp = self._sftp_or_raise()
        path = bjoin(bpath(directory), bpath(name))

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
                sftp.lstat(bjoin(d, bpath(self.stop_file)))
            except FileNotFoundError:
                continue
            except (OSError, paramiko.SSHException) as err:
                if not self.alive():
                    raise TargetUnavailable(f"sftp to {self.peer}: {reason(err)}") from None
                continue
            return f"{self.stop_file} on target ({os.fsdecode(d)})"
        return None
