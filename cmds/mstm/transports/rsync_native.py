"""rsync_native: an rsync daemon (`rsync://[user@]host:port/module/path`).

One rsync run per batch (`--files-from - --from0`: names travel NUL-separated on stdin,
never on a command line), one TCP connection to the daemon per run.  `target_dir` is a
path inside the module ("/" is the module's top).  The daemon password comes from
`[rsync_native] password_file` or the systemd credential `rsync-password` and reaches
rsync only through `RSYNC_PASSWORD` in the child's environment -- never an argument,
never a log line.

What it guarantees:

* **Nothing unverified under a final name** (a daemon cannot rename on request): every
  item, file or directory, is sent into the batch's staging directory
  `<target_dir>/.mstm-staging/<batch>/` (one rsync run); `inspect(staged=batch)`
  checks it there; `publish` then has the daemon *hard-link* each verified staged file
  into its final place (a second run, `--link-dest=.mstm-staging/<batch>`), fed from a
  local scratch tree of empty sparse files carrying exactly the attributes (size,
  mtime, mode) the verified version had -- never from the live source, so a source
  rewritten since cannot slip through.  A dry run of that second run comes first: an
  item for which rsync would transfer any data instead of linking (or copying locally
  from the staged file), or whose paths have another type at the target (a file, a
  link or a directory where the item has something else), is not published (error).
  `discard` empties the staging batch with a run of `--delete` from an empty directory
  and removes the batch directory itself (`--remove-source-files` is not needed).
  **Windows left**: (1) between the dry run and the real run, a staged file altered or
  a path's type changed at the target (only by the daemon's user, or whoever writes its
  module directly) would make rsync transfer the scratch file's zeros, or replace a
  link or empty directory, under a final name -- the real run's itemized output reports
  it (error for the item), but it has happened; (2) a final file that already has the
  verified version's size, mtime and mode is taken to be it (rsync's quick check);
  (3) the daemon's links are not fsynced (rsync has no way to ask): after a crash of
  the target a published name may be missing again -- never wrong, the staged copy is
  then gone too, and the next attempt sends it again; (4) a directory item's files
  appear one by one.  Interrupted files are kept in the batch's own `.mstm-partial/`
  (a daemon makes an absolute `--partial-dir` relative to each directory), so a
  transfer cut off is not resumed by the next batch: it starts again.
* **Merging, modes, ownership**: rsync never deletes at the target (no --delete) so a
  directory item is merged into an existing one; `--chmod=a-st` clears setuid, setgid
  and sticky on everything sent and linked; no -o/-g (files belong to the daemon's
  user), no -D (`--no-devices --no-specials`): no device or FIFO is ever created.
* **Verification** (`inspect`, in the staging directory) -- better than sizes alone,
  without reading the data back over the network: size from the daemon's listing
  (`--list-only`), then a dry run with `--checksum` in which *the daemon* computes
  rsync's whole-file checksum
  (xxh128 or MD5, whichever both sides prefer) of every file (staged) and
  compares it with the same checksum of the local source.  When they agree the file
  is reported with the sha256 of the local source, computed here around that dry run
  (and only if the source did not change meanwhile); when they differ, sha256 is None
  (a mismatch).  So the proof is "the target holds a file with the same 128-bit
  checksum as the source whose sha256 is X", not a sha256 computed on the target; an
  rsync daemon cannot be asked for one.
* **Durability**: rsync does not fsync by default, and the daemon's checksum in
  `inspect` may be computed from its page cache, so a match would prove nothing about
  what a crash of the target leaves -- and the sender deletes a source (move mode) on a
  match.  Hence every transfer runs with `--fsync` (rsync >= 3.2.4, here and at the
  daemon): the daemon's receiver fsyncs each file before renaming it into place.  The
  local rsync is asked once (`rsync --help`); a daemon that refuses the option (older,
  or `refuse options = fsync`) is remembered and sent to without it.  Either way a
  warning is logged once that durability at the target is not guaranteed.  (The
  renames themselves are not fsynced: after a crash a file could be back under rsync's
  temporary name, its data intact, never lost.)
* **bwlimit** is rsync's `--bwlimit`; **connect_timeout** is `--contimeout`;
  **stall_seconds** is `--timeout` (no data for that long ends the run with exit 30);
  a connection-level exit (5, 10, 12, 30, 35, or a signal) marks the transport dead so
  the sender backs off and retries the batch.
"""

from __future__ import annotations

import hashlib
import logging
import os
import re
import shutil
import stat
import subprocess
import tempfile
import time
from collections.abc import Callable, Sequence
from pathlib import Path

from mstm import safefs
from mstm.errors import TargetUnavailable
from mstm.transports.base import (
    STAGING,
    Item,
    Progress,
    RemoteFile,
    SendResult,
    ShouldStop,
    TransportOptions,
    staging_dir,
)
from mstm.transports.common import read_secret
from mstm.transports.rsync import PROGRESS_TAG, run_rsync, summarise, timeouts, transfer_argv
from mstm.transports.ssh import spawn

log = logging.getLogger("mstm.rsync_native")

PARTIAL = ".mstm-partial"
CONNECTION_CODES = frozenset({5, 10, 12, 30, 35, 255})
_ESCAPE = re.compile(rb"\\#([0-7]{3})")
_HASH_BLOCK = 1 << 20
# rsync program -> does it know --fsync (3.2.4+)?  Asked once per program.
_FSYNC_SUPPORT: dict[str, bool] = {}
_WARNED: set[str] = set()


def supports_fsync(rsync_cmd: str) -> bool:
    """Does this rsync program know `--fsync`?  (Its --help, asked once.)"""
    known = _FSYNC_SUPPORT.get(rsync_cmd)
    if known is None:
        try:
            r = subprocess.run([rsync_cmd, "--help"], capture_output=True, timeout=30,
                               check=False)
            known = b"--fsync" in r.stdout
        except (OSError, subprocess.SubprocessError):
            known = False
        _FSYNC_SUPPORT[rsync_cmd] = known
    return known


def _warn_once(key: str, message: str, *args: object) -> None:
    if key not in _WARNED:
        _WARNED.add(key)
        log.warning(message, *args)


def unescape(name: bytes) -> bytes:
    """rsync prints unprintable bytes of a name as \\#ooo (octal)."""
    return _ESCAPE.sub(lambda m: bytes([int(m.group(1), 8)]), name)


def parse_listing(out: bytes) -> dict[str, int]:
    """Regular files of `rsync --list-only` output: name -> size."""
    found: dict[str, int] = {}
    for line in out.split(b"\n"):
        if not line.startswith(b"-"):
            continue
        parts = line.split(None, 4)
        if len(parts) < 5:
            continue
        digits = parts[1].replace(b",", b"").replace(b".", b"").replace(b"'", b"")
        if digits.isdigit():
            found[os.fsdecode(unescape(parts[4]))] = int(digits)
    return found


def parse_types(out: bytes) -> dict[str, str]:
    """Every entry of `rsync --list-only` output: name -> "d", "l", "f" or "x"."""
    found: dict[str, str] = {}
    for line in out.split(b"\n"):
        parts = line.split(None, 4)
        if len(parts) < 5 or len(parts[0]) != 10:
            continue
        name = parts[4].split(b" -> ", 1)[0] if line.startswith(b"l") else parts[4]
        found[os.fsdecode(unescape(name))] = {"d": "d", "l": "l", "-": "f"}.get(
            chr(line[0]), "x")
    return found


def parse_itemized_all(out: bytes) -> dict[str, str]:
    """A `-ii` run's itemized lines: name -> the 11 flag characters."""
    found: dict[str, str] = {}
    for line in out.split(b"\n"):
        if line.startswith(PROGRESS_TAG) and len(line) > len(PROGRESS_TAG) + 12:
            body = line[len(PROGRESS_TAG):]
            found[os.fsdecode(unescape(body[12:])).rstrip("/")] = body[:11].decode(
                "ascii", "replace")
    return found


def parse_itemized(out: bytes) -> dict[str, bool]:
    """A `-n -c -ii` dry run: name -> content identical (True) or not (False)."""
    result: dict[str, bool] = {}
    for line in out.split(b"\n"):
        if not line.startswith(PROGRESS_TAG):
            continue
        body = line[len(PROGRESS_TAG):]
        flags, name = body[:11], body[12:]  # %i is 11 characters (spaces for "same")
        if flags[1:2] != b"f" or not name:
            continue
        result[os.fsdecode(unescape(name))] = flags[:1] == b"." and b"+" not in flags
    return result


class RsyncNative:
    name = "rsync_native"

    def __init__(self, options: TransportOptions, *, host: str, port: int = 873,
                 module: str, username: str | None = None,
                 password_file: Path | None = None, rsync_cmd: str = "rsync") -> None:
        self.host = host
        self.port = port
        self.module = module
        self.target_dir = self._inside(options.target_dir)
        self.source_dir = options.source_dir
        self.username = username
        self.password_file = password_file
        self.rsync_cmd = rsync_cmd
        self.connect_timeout = options.connect_timeout
        self.stall_seconds = options.stall_seconds
        self.bwlimit = options.bwlimit
        self.stop_file = options.stop_file
        self.stop_dirs = [self._inside(d) for d in options.stop_dirs] or [self.target_dir]
        # file items that are symbolic links go as the files they point to (rsync_argv)
        self.follow_symlinks = options.follow_symlinks
        self._alive = False
        self._env: dict[str, str] | None = None
        # (batch, relpath) -> the source version inspect verified in that batch's staging
        self._verified: dict[tuple[str, str], tuple[int, int, int]] = {}
        self._fsync = supports_fsync(rsync_cmd)
        if not self._fsync:
            _warn_once(f"local {rsync_cmd}", "%s has no --fsync (rsync < 3.2.4): durability "
                       "of files at rsync_native targets is not guaranteed", rsync_cmd)

    @staticmethod
    def _inside(path: str) -> str:
        """A target path as a path inside the module: no leading or trailing '/'."""
        return path.strip("/")

    def url(self, path: str = "") -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        user = f"{self.username}@" if self.username else ""
        inside = "/".join(p for p in (self.module, path.strip("/")) if p)
        return f"rsync://{user}{host}:{self.port}/{inside}"

    @property
    def peer(self) -> str:
        return f"rsync://{self.host}:{self.port}/{self.module}"

    def env(self) -> dict[str, str]:
        if self._env is None:
            env = {k: v for k, v in os.environ.items() if k != "RSYNC_PASSWORD"}
            secret = read_secret(self.password_file, "rsync-password", section="rsync_native")
            if secret is not None:
                env["RSYNC_PASSWORD"] = secret
            self._env = env
        return self._env

    def _base_argv(self) -> list[str]:
        return [self.rsync_cmd, *timeouts(self.stall_seconds, self.connect_timeout)]

    def _run(self, argv: list[str], *, input: bytes = b"", timeout: float | None = None
             ) -> subprocess.CompletedProcess[bytes]:
        proc = spawn(argv, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                     stderr=subprocess.PIPE, env=self.env())
        try:
            out, err = proc.communicate(input, timeout=timeout or (
                self.connect_timeout + self.stall_seconds + 30))
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.communicate()
            self._alive = False
            raise TargetUnavailable(f"{self.peer}: rsync did not finish in time") from None
        if proc.returncode in CONNECTION_CODES or proc.returncode < 0:
            self._alive = False
            raise TargetUnavailable(f"{self.peer}: {summarise(err, proc.returncode)}")
        return subprocess.CompletedProcess(argv, proc.returncode, out, err)

    # -- connection -------------------------------------------------------------
    def open(self) -> None:
        """Ask the daemon for the target directory: reachable and authenticated."""
        if self._alive:
            return
        r = self._run([*self._base_argv(), "--list-only", "--dirs", "--",
                       self.url(self.target_dir) if self.target_dir else self.url() + "/"],
                      timeout=self.connect_timeout + 30)
        if r.returncode not in (0, 23):  # 23: target_dir not made yet; --mkpath will
            raise TargetUnavailable(f"{self.peer}: {summarise(r.stderr, r.returncode)}")
        self._alive = True

    def close(self) -> None:
        self._alive = False

    def alive(self) -> bool:
        return self._alive

    # -- transfer ---------------------------------------------------------------
    def rsync_argv(self, dest: str, *, force: bool, dirs: bool = False) -> list[str]:
        # as rsync_ssh's: with follow_symlinks the file items' links go as the files they
        # point to, nothing recursed into (unless the batch has directory items, whose
        # links travel as links).  Modes: --perms --chmod=a-st; never -o/-g/-D.
        return transfer_argv(
            self.rsync_cmd, str(self.source_dir), self.url(dest),
            connect_timeout=self.connect_timeout, stall_seconds=self.stall_seconds,
            copy_links=self.follow_symlinks and not dirs, chmod="a-st", partial_dir=PARTIAL,
            mkpath=True, fsync=self._fsync, ignore_times=force, bwlimit=self.bwlimit)

    def send(self, items: Sequence[Item], *, progress: Progress | None = None,
             should_stop: ShouldStop | None = None, tick: Callable[[], None] | None = None,
             dest: str | None = None) -> SendResult:
        if dest is None:
            raise ValueError("rsync_native sends into a staging (or incoming) directory only")
        items = list(items)
        if not items:
            return SendResult()
        r = self._transfer(items, self._inside(dest), dirs=any(i.is_dir for i in items),
                           progress=progress, should_stop=should_stop, tick=tick,
                           done=(0, 0))
        if not r.stopped and (r.exit_code in CONNECTION_CODES or r.exit_code < 0):
            self._alive = False
        return r

    def _transfer(self, items: Sequence[Item], dest: str, *, dirs: bool,
                  progress: Progress | None, should_stop: ShouldStop | None,
                  tick: Callable[[], None] | None, done: tuple[int, int]) -> SendResult:
        argv = self.rsync_argv(dest, force=any(i.force for i in items), dirs=dirs)
        names = b"".join(os.fsencode(i.relpath) + b"\0" for i in items)
        run = run_rsync(argv, names, env=self.env(), progress=progress,
                        should_stop=should_stop, tick=tick, done=done)
        if self._fsync and run.exit_code in (1, 4) and _refuses_fsync(run.stderr_tail):
            # an rsync daemon older than 3.2.4: send without, and say so once
            self._fsync = False
            _warn_once(f"daemon {self.peer}", "%s refuses --fsync (rsync < 3.2.4): "
                       "durability of files at this target is not guaranteed", self.peer)
            return self._transfer(items, dest, dirs=dirs, progress=progress,
                                  should_stop=should_stop, tick=tick, done=done)
        if run.exit_code:
            log.debug("rsync exited %s: %s", run.exit_code,
                      run.stderr_tail.decode("utf-8", "replace"))
        return SendResult(files=run.files, bytes=run.file_bytes, error=run.error,
                          exit_code=run.exit_code, stopped=run.stopped)

    # -- verification -----------------------------------------------------------
    def inspect(self, relpaths: Sequence[str], *, staged: str | None = None
                ) -> dict[str, RemoteFile]:
        """Sizes from the daemon's listing; content by the daemon's own checksum compared
        with the source's (see the module's docstring), under the final names or in
        batch *staged*'s staging directory.  A directory is present with sha256 None."""
        if not relpaths:
            return {}
        base = self._inside(staging_dir(self.target_dir, staged)) if staged \
            else self.target_dir
        names = b"".join(os.fsencode(p) + b"\0" for p in relpaths)
        with tempfile.TemporaryDirectory(prefix="mstm-rsync-") as scratch:
            listing = self._run([*self._base_argv(), "--list-only", "--from0",
                                 "--files-from=-", "--", self.url(base) + "/",
                                 os.path.join(scratch, "none") + "/"], input=names)
        sizes = parse_listing(listing.stdout)
        types = parse_types(listing.stdout)
        dirs = {p: RemoteFile(size=0, sha256=None) for p in relpaths if types.get(p) == "d"}
        present = [p for p in relpaths if p in sizes]
        if not present:
            return dirs
        before = {p: _version(self.source_dir, p, self.follow_symlinks) for p in present}
        # (a followed link is compared as the file it points to, as it was sent)
        follow = ["--copy-links", "--no-dirs"] if self.follow_symlinks else ["--recursive"]
        check = self._run([*self._base_argv(), "--dry-run", "--checksum", "-ii",
                           *follow, "--from0", "--files-from=-",
                           f"--out-format={PROGRESS_TAG.decode()}%i %n", "--",
                           f"{self.source_dir}/", self.url(base) + "/"],
                          input=b"".join(os.fsencode(p) + b"\0" for p in present))
        same = parse_itemized(check.stdout)
        found: dict[str, RemoteFile] = dict(dirs)
        for p in present:
            digest = None
            version = before[p]
            if same.get(p) and version is not None:
                digest = _sha256(self.source_dir, p, version, self.follow_symlinks)
                if digest is not None and staged:
                    # what publish will link: exactly this version's attributes
                    self._verified[(staged, p)] = version
            found[p] = RemoteFile(size=sizes[p], sha256=digest)
        return found

    # -- publishing: the daemon hard-links the verified staged files into place -------
    def publish(self, items: Sequence[Item], *, staged: str) -> dict[str, str]:
        if not items:
            return {}
        errors: dict[str, str] = {}
        with tempfile.TemporaryDirectory(prefix="mstm-publish-") as scratch:
            ok: list[Item] = []
            for item in items:
                why = self._scratch(item, staged, scratch)
                if why:
                    errors[item.relpath] = why
                else:
                    ok.append(item)
            if ok:
                errors |= self._link_into_place(ok, staged, scratch)
        for key in [k for k in self._verified if k[0] == staged]:
            del self._verified[key]
        return errors

    def _scratch(self, item: Item, staged: str, scratch: str) -> str:
        """Build *item* in *scratch* as empty sparse files with the verified versions'
        attributes (links as the source has them); an error text, or ""."""
        out = os.fsencode(scratch)
        try:
            with safefs.opened_root(self.source_dir) as root:
                entries = (list(safefs.walk(root, item.relpath)) if item.is_dir
                           else [safefs.Entry(item.relpath,
                                              safefs.lstat_beneath(root, item.relpath), 0)])
                for e in entries:
                    path = os.path.join(out, os.fsencode(e.relpath))
                    os.makedirs(os.path.dirname(path), exist_ok=True)
                    if e.is_dir:
                        os.makedirs(path, exist_ok=True)
                        os.chmod(path, stat.S_IMODE(e.st.st_mode) & 0o777 | 0o700)
                    elif stat.S_ISLNK(e.st.st_mode) and item.is_dir:
                        dfd, name = safefs.open_parent(root, e.relpath)
                        try:
                            os.symlink(os.readlink(name, dir_fd=dfd), path)
                        finally:
                            os.close(dfd)
                    elif e.is_file or (stat.S_ISLNK(e.st.st_mode) and self.follow_symlinks):
                        version = self._verified.get((staged, e.relpath))
                        if version is None:
                            return f"{os.fsencode(e.relpath)!r} was not verified in staging"
                        size, mtime_ns, _ = version
                        with open(path, "wb") as f:
                            f.truncate(size)
                        os.chmod(path, stat.S_IMODE(e.st.st_mode) & 0o777)
                        os.utime(path, ns=(mtime_ns, mtime_ns))
                    else:
                        return f"{os.fsencode(e.relpath)!r}: {safefs.special_reason(e.st.st_mode)}"
        except (OSError, ValueError) as err:
            return f"cannot read the source: {getattr(err, 'strerror', None) or err}"
        return ""

    def _link_into_place(self, items: list[Item], staged: str, scratch: str
                         ) -> dict[str, str]:
        names = b"".join(os.fsencode(i.relpath) + b"\0" for i in items)
        link = f"--link-dest={STAGING}/{staged}"
        argv = [*self._base_argv(), "--recursive", "--links", "--perms", "--chmod=a-st",
                "--times", "--no-devices", "--no-specials", "--from0", "--files-from=-",
                "--mkpath", link, "-ii", f"--out-format={PROGRESS_TAG.decode()}%i %n", "--",
                scratch + "/", self.url(self.target_dir) + "/"]
        errors: dict[str, str] = {}

        def owner(name: str) -> Item | None:
            return next((i for i in items if name == i.relpath
                         or name.startswith(i.relpath + "/")), None)

        # 1. what is at the target now: a path of another type is a conflict
        with tempfile.TemporaryDirectory(prefix="mstm-rsync-") as none:
            there = parse_types(self._run(
                [*self._base_argv(), "--list-only", "--recursive", "--from0",
                 "--files-from=-", "--", self.url(self.target_dir) + "/", none + "/x/"],
                input=names).stdout)
        mine: dict[str, str] = {}
        for dirpath, dirnames, filenames in os.walk(scratch):
            for n in dirnames + filenames:
                full = os.path.join(dirpath, n)
                rel = os.path.relpath(full, scratch)
                mine[rel] = "d" if os.path.isdir(full) and not os.path.islink(full) else "f"
        for rel, k in mine.items():
            have = there.get(rel)
            if have is not None and (have == "d") != (k == "d"):
                item = owner(rel)
                if item is not None:
                    errors.setdefault(item.relpath, f"{rel} is of another type at the target")
        # parents of each item at the target: real directories only
        for i in items:
            parts = i.relpath.split("/")
            for depth in range(1, len(parts)):
                if there.get("/".join(parts[:depth])) not in (None, "d"):
                    errors.setdefault(i.relpath, "a link or a file on the way at the target")
        # 2. a dry run: anything but a link (h), a local copy (c) or nothing to do is refused
        dry = self._run([*argv[:1], "--dry-run", *argv[1:]], input=names)
        for name, flags in parse_itemized_all(dry.stdout).items():
            item = owner(name)
            if item is not None and flags[1:2] == "f" and flags[:1] not in ("h", "c", "."):
                errors.setdefault(item.relpath, f"{name}: not the verified staged copy")
        if dry.returncode not in (0, 23, 24):
            return {i.relpath: errors.get(i.relpath) or summarise(dry.stderr, dry.returncode)
                    for i in items}
        good = [i for i in items if i.relpath not in errors]
        if not good:
            return errors
        # 3. the real run, for the items that passed
        run = self._run(argv, input=b"".join(os.fsencode(i.relpath) + b"\0" for i in good))
        for name, flags in parse_itemized_all(run.stdout).items():
            item = owner(name)
            if item is not None and flags[1:2] == "f" and flags[:1] not in ("h", "c", "."):
                errors.setdefault(item.relpath, f"{name}: sent, not linked (changed at the "
                                  "target meanwhile)")
        if run.returncode:
            for i in good:
                errors.setdefault(i.relpath, summarise(run.stderr, run.returncode))
        return errors

    def discard(self, staged: str) -> None:
        """Empty batch *staged*'s staging directory (`--delete` from an empty directory,
        which removes no link's target, at any depth) and remove it."""
        with tempfile.TemporaryDirectory(prefix="mstm-rsync-") as empty:
            where = self._inside(staging_dir(self.target_dir, staged))
            try:
                r = self._run([*self._base_argv(), "--recursive", "--delete", "--force",
                               "--", empty + "/", self.url(where) + "/"])
                if r.returncode == 0:
                    # the now empty batch directory: a run that deletes just it
                    self._run([*self._base_argv(), "--recursive", "--delete",
                               f"--include=/{staged}", "--exclude=*", "--",
                               empty + "/", self.url(self._inside(
                                   f"{self.target_dir}/{STAGING}")) + "/"])
            except TargetUnavailable as err:
                log.info("could not remove staging batch %s: %s", staged, err)

    # -- small files (the arrival monitor's handshake) ---------------------------
    def put_file(self, directory: str, name: str, data: bytes) -> None:
        with tempfile.TemporaryDirectory(prefix="mstm-rsync-") as scratch:
            path = os.path.join(os.fsencode(scratch), os.fsencode(name))
            with open(path, "wb") as f:
                f.write(data)
            r = self._run([*self._base_argv(), "--mkpath", "--from0", "--files-from=-",
                           "--", scratch + "/", self.url(self._inside(directory)) + "/"],
                          input=os.fsencode(name) + b"\0")
        if r.returncode:
            raise OSError(f"cannot write {name} in {directory} on {self.peer}: "
                          f"{summarise(r.stderr, r.returncode)}")

    def await_file(self, directory: str, name: str, *, timeout: float, max_bytes: int,
                   tick: Callable[[], None] | None = None,
                   should_stop: ShouldStop | None = None) -> bytes | None:
        deadline = time.monotonic() + timeout
        scratch = tempfile.mkdtemp(prefix="mstm-rsync-")
        try:
            while True:
                # a daemon will not open a file named by --files-from here (it reports
                # it vanished), so the name is in the URL; --secluded-args keeps the
                # daemon from globbing it
                r = self._run([*self._base_argv(), "--secluded-args", "--",
                               self.url(f"{self._inside(directory)}/{name}"), scratch + "/"])
                got = os.path.join(os.fsencode(scratch), os.fsencode(name))
                if r.returncode == 0 and os.path.exists(got):
                    with open(got, "rb") as f:
                        return f.read(max_bytes)
                if time.monotonic() >= deadline or (should_stop and should_stop()):
                    return None
                if tick:
                    tick()
                time.sleep(0.5)
        finally:
            shutil.rmtree(scratch, ignore_errors=True)

    def stop_file_present(self) -> str | None:
        for d in self.stop_dirs:
            r = self._run([*self._base_argv(), "--list-only", "--secluded-args", "--",
                           self.url(f"{d}/{self.stop_file}")], timeout=60)
            if r.returncode == 0 and r.stdout.strip():
                return f"{self.stop_file} on target ({d or '/'})"
        return None


def _version(source: Path, relpath: str, follow: bool) -> tuple[int, int, int] | None:
    """(size, mtime, ctime) of a source, reached through safefs (no link followed below
    the stream directory; the item's own link only with follow_symlinks)."""
    try:
        with safefs.opened_root(source) as root:
            fd = safefs.open_regular(root, relpath, follow_symlinks=follow)
    except (OSError, ValueError):
        return None
    try:
        st = os.fstat(fd)
    finally:
        os.close(fd)
    return st.st_size, st.st_mtime_ns, st.st_ctime_ns


def _sha256(source: Path, relpath: str, before: tuple[int, int, int], follow: bool
            ) -> str | None:
    """The source's sha256, if it is still the version the daemon's checksum matched;
    read through safefs, never from outside the stream directory."""
    h = hashlib.sha256()
    try:
        with safefs.opened_root(source) as root:
            fd = safefs.open_regular(root, relpath, follow_symlinks=follow)
        with open(fd, "rb", buffering=0) as f:
            while chunk := f.read(_HASH_BLOCK):
                h.update(chunk)
    except (OSError, ValueError):
        return None
    return h.hexdigest() if _version(source, relpath, follow) == before else None


def _refuses_fsync(stderr: bytes) -> bool:
    """Did the daemon reject --fsync: an unknown option (rsync < 3.2.4), or one its
    configuration refuses (`refuse options`)?  Both end the run with exit 4 (or 1)."""
    return any(b"--fsync" in line and (b"unknown option" in line or b"refuse" in line)
               for line in stderr.splitlines())
