"""Safe filesystem primitives: the one way mstm opens, walks, hashes and deletes a source.

Any component of an item's path may be swapped for a symbolic link (or a directory
moved away) between the scan, the hash, the transfer and the deletion.  Nothing outside
a stream's directory may ever be read, sent or deleted because of that, so every access
below a stream directory goes through this module:

* :func:`open_beneath` resolves a relative path from the stream directory's descriptor
  with ``openat2(2)`` and ``RESOLVE_BENEATH | RESOLVE_NO_SYMLINKS | RESOLVE_NO_MAGICLINKS``
  (Linux 5.6+): the kernel refuses any symbolic link on the way (ELOOP) and any escape
  (EXDEV).  Where the kernel has no ``openat2`` (ENOSYS), or a concurrent rename made it
  give up (EAGAIN), the path is walked one component at a time from the directory
  descriptor with ``O_NOFOLLOW | O_DIRECTORY``: the same guarantee, more system calls.
* :func:`open_regular` opens the regular file of an item for reading; FIFOs, devices
  and sockets are refused before they are opened (nothing blocks, no device is
  touched), and a file swapped between the check and the open is refused too.  Only
  the *last* component may be a symbolic link, and only when the stream has
  ``follow_symlinks`` (its caller then judges the link's owner).
* :func:`walk` lists a tree below the stream directory from descriptors, iteratively:
  no recursion limit, no PATH_MAX limit (a tree 1,000 levels deep works), nothing
  followed.
* :func:`prune` deletes, bottom-up and from descriptors, exactly the entries a
  predicate accepts, then the directories left empty; anything added meanwhile stays.

It also holds the primitives that remove whatever is in a tree, rename without
replacing and flush a filesystem (:func:`remove_tree`, :func:`rename_noreplace`,
:func:`syncfs`), which mstm-receive and the transports' staging areas use.  It is one
module of some 770 lines on purpose: issue 12 asks for exactly one place where a path below
a stream (or a target) directory is resolved, so that no second copy can drift.

The stream directory itself may be reached through a symbolic link (an admin's choice,
made in the configuration); nothing below it ever is.  Paths are ``str`` decoded with
:func:`os.fsdecode` (surrogateescape), "/"-separated and relative; ``os.fsencode`` gives
back the exact bytes of names that are not UTF-8.
"""

from __future__ import annotations

import ctypes
import errno
import logging
import os
import resource
import stat
from collections.abc import Callable, Iterator
from contextlib import contextmanager, suppress
from dataclasses import dataclass, field
from pathlib import Path

_log = logging.getLogger("mstm.safefs")

DIR_FLAGS = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC
READ_FLAGS = os.O_RDONLY | os.O_CLOEXEC | os.O_NOCTTY | os.O_NONBLOCK

# linux/openat2.h
_RESOLVE_NO_MAGICLINKS = 0x02
_RESOLVE_NO_SYMLINKS = 0x04
_RESOLVE_BENEATH = 0x08
_SYS_OPENAT2 = 437  # the same number on every architecture (asm-generic, 5.6+)


class _OpenHow(ctypes.Structure):
    _fields_ = [("flags", ctypes.c_uint64), ("mode", ctypes.c_uint64),
                ("resolve", ctypes.c_uint64)]


_libc = ctypes.CDLL(None, use_errno=True)
_syscall = _libc.syscall
_syscall.restype = ctypes.c_long
_openat2_works: bool | None = None  # None: not tried yet


def _openat2(dir_fd: int, path: bytes, flags: int, mode: int) -> int | None:
    """openat2 with the strict resolve flags; None where the kernel cannot do it."""
    global _openat2_works
    if _openat2_works is False:
        return None
    how = _OpenHow(flags, mode if flags & os.O_CREAT else 0,
                   _RESOLVE_BENEATH | _RESOLVE_NO_SYMLINKS | _RESOLVE_NO_MAGICLINKS)
    for _ in range(8):
        fd = _syscall(_SYS_OPENAT2, ctypes.c_int(dir_fd), ctypes.c_char_p(path),
                      ctypes.byref(how), ctypes.c_size_t(ctypes.sizeof(how)))
        if fd >= 0:
            _openat2_works = True
            return int(fd)
        err = ctypes.get_errno()
        if err == errno.EAGAIN:  # a rename raced the lookup: ask again, then walk instead
            continue
        if err in (errno.ENOSYS, errno.EPERM) and _openat2_works is None:
            _openat2_works = False  # no openat2, or a seccomp filter forbids it
            return None
        if err == errno.EXDEV:
            raise OSError(errno.ELOOP, "path leads out of the stream directory",
                          os.fsdecode(path))
        raise OSError(err, os.strerror(err), os.fsdecode(path))
    return None


def split(relpath: str | bytes) -> list[bytes]:
    """The components of a normalised relative path; ValueError for anything else
    ("", absolute, ".", "..", empty components, NUL)."""
    raw = os.fsencode(relpath)
    parts = raw.split(b"/")
    if not raw or b"\0" in raw or any(p in (b"", b".", b"..") for p in parts):
        raise ValueError(f"not a normalised relative path: {os.fsdecode(raw)!r}")
    return parts


def open_root(directory: str | bytes | Path) -> int:
    """A descriptor of a stream directory (which may itself be reached through a link)."""
    return os.open(directory, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)


@contextmanager
def opened_root(directory: str | bytes | Path) -> Iterator[int]:
    fd = open_root(directory)
    try:
        yield fd
    finally:
        os.close(fd)


def open_beneath(root_fd: int, relpath: str | bytes, flags: int = DIR_FLAGS,
                 mode: int = 0o600) -> int:
    """Open *relpath* below the directory *root_fd*, following no symbolic link at all
    (OSError ELOOP for a link anywhere on the way, ENOTDIR for a non-directory, ENOENT).

    "" or "." opens the root itself again.  The caller closes the descriptor.
    """
    flags |= os.O_CLOEXEC | os.O_NOFOLLOW
    raw = os.fsencode(relpath)
    if raw in (b"", b"."):
        return os.open(".", flags, dir_fd=root_fd)
    parts = split(raw)
    fd = _openat2(root_fd, raw, flags, mode)
    if fd is not None:
        return fd
    cur = root_fd
    try:
        for part in parts[:-1]:
            below = os.open(part, DIR_FLAGS, dir_fd=cur)
            if cur != root_fd:
                os.close(cur)
            cur = below
        return os.open(parts[-1], flags, mode, dir_fd=cur)
    finally:
        if cur != root_fd:
            os.close(cur)


def open_parent(root_fd: int, relpath: str) -> tuple[int, str]:
    """A descriptor of the directory holding *relpath* (reached with no link followed),
    and the last name.  ValueError for a path that is not normalised."""
    parts = split(relpath)
    parent = b"/".join(parts[:-1])
    return open_beneath(root_fd, parent, DIR_FLAGS), os.fsdecode(parts[-1])


def lstat_beneath(root_fd: int, relpath: str) -> os.stat_result:
    """lstat of *relpath* below *root_fd*, with no link followed on the way."""
    dir_fd, name = open_parent(root_fd, relpath)
    try:
        return os.stat(name, dir_fd=dir_fd, follow_symlinks=False)
    finally:
        os.close(dir_fd)


def makedirs_beneath(root_fd: int, relpath: str, mode: int = 0o755) -> None:
    """Create directory *relpath* below *root_fd* and its missing parents, one component
    at a time from descriptors; an existing component that is a link (or not a
    directory) raises OSError (ELOOP, ENOTDIR) instead of being followed."""
    if relpath in ("", "."):
        return
    cur = root_fd
    try:
        for part in split(relpath):
            try:
                os.mkdir(part, mode, dir_fd=cur)
            except FileExistsError:
                pass
            below = os.open(part, DIR_FLAGS, dir_fd=cur)
            if cur != root_fd:
                os.close(cur)
            cur = below
    finally:
        if cur != root_fd:
            os.close(cur)


def special_reason(mode: int) -> str:
    """What a non-regular, non-directory file is, in words for a log line."""
    if stat.S_ISLNK(mode):
        return "symbolic link"
    if stat.S_ISFIFO(mode):
        return "FIFO (named pipe)"
    if stat.S_ISSOCK(mode):
        return "socket"
    if stat.S_ISBLK(mode):
        return "block device"
    if stat.S_ISCHR(mode):
        return "character device"
    return f"unsupported file type (mode {mode:o})"


def open_regular_at(dir_fd: int, name: str, *, follow_symlinks: bool = False,
                    shown: str | None = None) -> int:
    """A read-only descriptor of the regular file *name* in directory *dir_fd*.

    The name is a symbolic link only with *follow_symlinks* (else OSError ELOOP).
    Anything but a regular file is refused before it is opened; a file swapped between
    that check and the open is refused too (EAGAIN).  Errors name *shown*.
    """
    shown = name if shown is None else shown
    st = os.stat(name, dir_fd=dir_fd, follow_symlinks=follow_symlinks)
    link = os.stat(name, dir_fd=dir_fd, follow_symlinks=False) if follow_symlinks else st
    if stat.S_ISLNK(st.st_mode):
        raise OSError(errno.ELOOP, "a symbolic link (follow_symlinks is off)", shown)
    if not stat.S_ISREG(st.st_mode):
        what = "a directory" if stat.S_ISDIR(st.st_mode) else special_reason(st.st_mode)
        raise OSError(errno.EINVAL, f"not a regular file: {what}", shown)
    flags = READ_FLAGS if follow_symlinks else READ_FLAGS | os.O_NOFOLLOW
    fd = os.open(name, flags, dir_fd=dir_fd)
    try:
        now = os.fstat(fd)
        if (now.st_dev, now.st_ino) != (st.st_dev, st.st_ino) or not stat.S_ISREG(now.st_mode):
            raise OSError(errno.EAGAIN, "replaced while it was being opened", shown)
        if stat.S_ISLNK(link.st_mode) and not link_owner_ok(link, now):
            # judged on the file actually opened: a link retargeted after any earlier
            # check still cannot lead to another owner's file
            raise OSError(errno.EPERM, "a symbolic link to a file of another owner", shown)
        os.set_blocking(fd, True)
    except BaseException:
        os.close(fd)
        raise
    return fd


def link_owner_ok(link: os.stat_result, target: os.stat_result) -> bool:
    """May a symbolic link be followed to *target* (follow_symlinks = true)?  Only if the
    link belongs to the file's owner, or to root: whoever can write the stream's directory
    must not be able to have mstm send a file it cannot read itself (mstm's own ssh key,
    /etc/shadow), the rule of the kernel's fs.protected_symlinks, applied to reading."""
    return link.st_uid in (target.st_uid, 0)


def open_regular(root_fd: int, relpath: str, *, follow_symlinks: bool = False) -> int:
    """A read-only descriptor of item file *relpath* below *root_fd*: no component but
    the last is ever followed, the last only with *follow_symlinks*; see
    :func:`open_regular_at`."""
    try:
        dir_fd, name = open_parent(root_fd, relpath)
    except OSError as err:
        raise OSError(err.errno, err.strerror, relpath) from err
    try:
        return open_regular_at(dir_fd, name, follow_symlinks=follow_symlinks, shown=relpath)
    finally:
        os.close(dir_fd)


# -- versions --------------------------------------------------------------------------
@dataclass(frozen=True)
class Version:
    """What identifies one version of a file: size and mtime (what the scanner queued),
    and ctime, device and inode (what a rewrite with the mtime put back, or a rename
    over it, cannot keep)."""

    size: int
    mtime_ns: int
    ctime_ns: int = 0
    dev: int = 0
    ino: int = 0

    @classmethod
    def of(cls, st: os.stat_result) -> Version:
        return cls(st.st_size, st.st_mtime_ns, st.st_ctime_ns, st.st_dev, st.st_ino)

    def same_file(self, st: os.stat_result) -> str | None:
        """None if *st* is this very version, else what differs, in words."""
        if (st.st_dev, st.st_ino) != (self.dev, self.ino):
            return "replaced by another file"
        if (st.st_size, st.st_mtime_ns) != (self.size, self.mtime_ns):
            return "other size or mtime"
        if st.st_ctime_ns != self.ctime_ns:
            return "changed (its ctime moved)"
        return None


# -- walking -----------------------------------------------------------------------------
@dataclass(frozen=True)
class Entry:
    relpath: str  # relative to the root, "/"-separated
    st: os.stat_result  # lstat: links are never followed
    depth: int  # 0 for the top of the walk

    @property
    def is_dir(self) -> bool:
        return stat.S_ISDIR(self.st.st_mode)

    @property
    def is_file(self) -> bool:
        return stat.S_ISREG(self.st.st_mode)


@dataclass
class _Frame:
    name: str  # the last component (the top frame: the top's relative path, maybe "")
    fd: int
    names: list[str]  # entries still to visit, last first
    st: os.stat_result


def _rel(stack: list[_Frame], name: str | None = None) -> str:
    """The relative path of the directory on top of *stack* (or of *name* in it): built
    when needed, never stored per level, so a deep tree of long names costs memory in
    proportion to its depth, not to its depth squared."""
    parts = [f.name for f in stack if f.name]
    if name is not None:
        parts.append(name)
    return "/".join(parts)


def _fd_headroom(depth: int) -> None:
    """A walk holds one descriptor per level: make room for deep trees."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    want = depth + 256
    if soft != resource.RLIM_INFINITY and want > soft:
        new = want * 2 if hard == resource.RLIM_INFINITY else min(hard, want * 2)
        if new > soft:
            resource.setrlimit(resource.RLIMIT_NOFILE, (new, hard))


def _frame(root_fd: int, top: str, parent: _Frame | None, name: str,
           mount: tuple[int, str | None] | None = None) -> _Frame:
    """The frame of *top* (below *root_fd*) or of directory *name* in *parent*.  With
    *mount* (the top's device and mount id), a directory on another file system or mount
    (a mount point: a disk, a bind mount of a directory elsewhere) raises OSError EXDEV:
    a walk never crosses into it."""
    fd = (open_beneath(root_fd, top, DIR_FLAGS) if parent is None
          else os.open(name, DIR_FLAGS, dir_fd=parent.fd))
    try:
        st = os.fstat(fd)
        if mount is not None and (st.st_dev != mount[0] or mount_id(fd) != mount[1]):
            raise OSError(errno.EXDEV, "a mount point: never crossed", top)
        names = os.listdir(fd)
    except BaseException:
        os.close(fd)
        raise
    return _Frame(top if parent is None else name, fd, sorted(names, reverse=True), st)


def walk(root_fd: int, top: str = "", *, on_error: Callable[[str, OSError], None] | None = None
         ) -> Iterator[Entry]:
    """Every entry below directory *top* (relative to *root_fd*; "" is the root), the
    top's own entry first, each directory before its contents, names sorted.

    Nothing is followed: a symbolic link is listed as a link.  A directory that
    vanishes, or turns into a link, while the walk is in it is passed to *on_error*
    (default: raise), and so is an entry that vanished between the listing and its
    lstat (default: left out), and a mount point (EXDEV: listed, never entered).  One
    descriptor is held per level, never a path, so depth and path length are unlimited.
    """
    stack: list[_Frame] = []
    try:
        first = _frame(root_fd, top, None, "")
        mount = (first.st.st_dev, mount_id(first.fd))
        stack.append(first)
        yield Entry(top, first.st, 0)
        while stack:
            frame = stack[-1]
            if not frame.names:
                os.close(stack.pop().fd)
                continue
            name = frame.names.pop()
            rel = _rel(stack, name)
            try:
                st = os.stat(name, dir_fd=frame.fd, follow_symlinks=False)
            except FileNotFoundError as err:  # vanished since the listing
                if on_error is not None:
                    on_error(rel, err)
                continue
            entry = Entry(rel, st, len(stack))
            yield entry
            if entry.is_dir:
                _fd_headroom(len(stack) + 1)
                try:
                    stack.append(_frame(root_fd, rel, frame, name, mount))
                except OSError as err:
                    if on_error is None:
                        raise
                    on_error(rel, err)
    finally:
        for frame in stack:
            os.close(frame.fd)


def regular_files(root_fd: int, top: str) -> list[Entry]:
    """The regular files below directory *top*, sorted by path; links are not listed."""
    return sorted((e for e in walk(root_fd, top) if e.is_file), key=lambda e: e.relpath)


# -- deleting ------------------------------------------------------------------------------
_SAMPLE = 10  # names kept of what a prune refused or failed: a tree may be huge


@dataclass
class Pruned:
    removed: int = 0  # entries removed, directories included
    kept: int = 0  # entries the predicate refused
    kept_sample: list[str] = field(default_factory=list)  # the first few of them
    errors: list[tuple[str, str]] = field(default_factory=list)  # (relpath, why), first few
    failed: int = 0  # removals that failed

    def keep(self, rel: str) -> None:
        self.kept += 1
        if len(self.kept_sample) < _SAMPLE:
            self.kept_sample.append(rel)

    def error(self, rel: str, err: OSError) -> None:
        self.failed += 1
        if len(self.errors) < _SAMPLE:
            self.errors.append((rel, err.strerror or str(err)))


def prune(root_fd: int, top: str, remove: Callable[[str, os.stat_result], bool]) -> Pruned:
    """Remove below *root_fd* the entries of tree *top* that *remove(relpath, lstat)*
    accepts (never a directory: those go only when left empty), then every directory
    of the tree that is left empty, *top* included, bottom-up.

    Descriptor-based and iterative (no recursion or path-length limit, nothing
    followed: a link is removed as a link, never what it points to).  *top* may also
    name a single file or link, which is then the only candidate.
    """
    out = Pruned()
    try:
        dir_fd, name = open_parent(root_fd, top)
    except FileNotFoundError:
        return out
    try:
        st = os.stat(name, dir_fd=dir_fd, follow_symlinks=False)
        if not stat.S_ISDIR(st.st_mode):
            if remove(top, st):
                os.unlink(name, dir_fd=dir_fd)
                out.removed += 1
            else:
                out.keep(top)
            return out
    except FileNotFoundError:
        return out
    except OSError as err:
        out.error(top, err)
        return out
    finally:
        os.close(dir_fd)

    stack: list[_Frame] = [_frame(root_fd, top, None, "")]
    mount = (stack[0].st.st_dev, mount_id(stack[0].fd))
    try:
        while stack:
            frame = stack[-1]
            if frame.names:
                name = frame.names.pop()
                rel = _rel(stack, name)
                try:
                    st = os.stat(name, dir_fd=frame.fd, follow_symlinks=False)
                    if stat.S_ISDIR(st.st_mode):
                        _fd_headroom(len(stack) + 1)
                        try:
                            stack.append(_frame(root_fd, rel, frame, name, mount))
                        except OSError as err:
                            if err.errno != errno.EXDEV:
                                raise
                            out.keep(rel)  # a mount point: what is below is not ours
                    elif remove(rel, st):
                        os.unlink(name, dir_fd=frame.fd)
                        out.removed += 1
                    else:
                        out.keep(rel)
                except FileNotFoundError:
                    continue
                except OSError as err:
                    out.error(rel, err)
                continue
            rel = _rel(stack)
            stack.pop()
            os.close(frame.fd)
            try:
                if stack:
                    os.rmdir(frame.name, dir_fd=stack[-1].fd)
                else:
                    pfd, pname = open_parent(root_fd, top)
                    try:
                        os.rmdir(pname, dir_fd=pfd)
                    finally:
                        os.close(pfd)
                out.removed += 1
            except OSError as err:
                if err.errno not in (errno.ENOTEMPTY, errno.EEXIST, errno.ENOENT):
                    out.error(rel, err)
    finally:
        for frame in stack:
            os.close(frame.fd)
    return out


# -- removing whatever is there, renaming without replacing, syncing (mstm-receive and the
# transports' staging areas) -------------------------------------------------------------
def _load_renameat2() -> Callable[[int, bytes, int, bytes, int], int] | None:
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        fn = libc.renameat2
    except (OSError, AttributeError):
        return None
    fn.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p,
                   ctypes.c_uint]
    fn.restype = ctypes.c_int
    return fn  # type: ignore[no-any-return]


_renameat2 = _load_renameat2()
_RENAME_NOREPLACE = 1


def _load_syncfs() -> Callable[[int], int] | None:
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        fn = libc.syncfs
    except (OSError, AttributeError):
        return None
    fn.argtypes = [ctypes.c_int]
    fn.restype = ctypes.c_int
    return fn  # type: ignore[no-any-return]


_syncfs_fn = _load_syncfs()


def syncfs(fd: int) -> bool:
    """syncfs(2): flush the file system *fd* is on (every file's data and metadata), not
    every file system like sync(2).  False if it is not available or failed."""
    if _syncfs_fn is None:
        return False
    if _syncfs_fn(fd) == 0:
        return True
    _log.debug("syncfs failed: %s; flushing file by file", os.strerror(ctypes.get_errno()))
    return False


def rename_noreplace(src: str, dst: str, *, src_dir_fd: int, dst_dir_fd: int) -> None:
    """Rename that never replaces an existing *dst* (FileExistsError instead).

    renameat2(RENAME_NOREPLACE) where the file system has it.  Else a directory is
    renamed over an empty directory made for it (mkdir fails if *dst* exists; a
    directory someone filled meanwhile is never replaced: ENOTEMPTY), and anything else
    is hard-linked, then unlinked (link(2) never replaces); only where a file system has
    neither, a file is checked for, then renamed.
    """
    if _renameat2 is not None:
        if _renameat2(src_dir_fd, os.fsencode(src), dst_dir_fd, os.fsencode(dst),
                      _RENAME_NOREPLACE) == 0:
            return
        e = ctypes.get_errno()
        if e not in (errno.EINVAL, errno.ENOSYS, errno.EOPNOTSUPP):
            raise OSError(e, os.strerror(e), dst)
    if stat.S_ISDIR(os.stat(src, dir_fd=src_dir_fd, follow_symlinks=False).st_mode):
        _rename_dir_noreplace(src, dst, src_dir_fd=src_dir_fd, dst_dir_fd=dst_dir_fd)
        return
    try:
        os.link(src, dst, src_dir_fd=src_dir_fd, dst_dir_fd=dst_dir_fd, follow_symlinks=False)
    except OSError as err:
        if err.errno not in (errno.EPERM, errno.EOPNOTSUPP, errno.EMLINK):
            raise
        # last resort (no hard links either): check, then rename
        try:
            os.stat(dst, dir_fd=dst_dir_fd, follow_symlinks=False)
        except FileNotFoundError:
            os.rename(src, dst, src_dir_fd=src_dir_fd, dst_dir_fd=dst_dir_fd)
            return
        raise FileExistsError(errno.EEXIST, os.strerror(errno.EEXIST), dst) from None
    os.unlink(src, dir_fd=src_dir_fd)


def _rename_dir_noreplace(src: str, dst: str, *, src_dir_fd: int, dst_dir_fd: int) -> None:
    """Directory *src* to *dst* without renameat2: over a placeholder made for it."""
    os.mkdir(dst, 0o700, dir_fd=dst_dir_fd)  # FileExistsError: dst is taken, left alone
    try:
        os.rename(src, dst, src_dir_fd=src_dir_fd, dst_dir_fd=dst_dir_fd)
    except OSError as err:
        if err.errno in (errno.ENOTEMPTY, errno.EEXIST):  # filled by someone else meanwhile
            raise FileExistsError(errno.EEXIST, os.strerror(errno.EEXIST), dst) from None
        with suppress(OSError):
            os.rmdir(dst, dir_fd=dst_dir_fd)  # our placeholder, still empty
        raise


def open_dir(parts: list[str], root_fd: int, *, create: bool = False,
             mode: int = 0o777) -> int:
    """A descriptor of root/parts..., every component opened with O_NOFOLLOW.

    With *create*, missing components are made (mode *mode*, less the umask, and never
    a setuid, setgid or sticky bit: not even the setgid bit a directory inherits from
    its parent).  A symbolic link or a non-directory anywhere raises OSError (ELOOP or
    ENOTDIR).  An existing directory is used as it is.
    """
    fd = os.dup(root_fd)
    try:
        for part in parts:
            mkdirs = 3 if create else 0  # it may be removed between mkdir and open: again
            made = False
            while True:
                try:  # mostly it exists: open first, make it only if missing
                    child = os.open(part, DIR_FLAGS, dir_fd=fd)
                    break
                except FileNotFoundError:
                    if not mkdirs:
                        raise
                mkdirs -= 1
                try:
                    os.mkdir(part, mode, dir_fd=fd)
                    made = True
                except FileExistsError:
                    pass
            if made:
                plain_mode(child)
            os.close(fd)
            fd = child
        return fd
    except BaseException:
        os.close(fd)
        raise


def plain_mode(fd: int) -> int:
    """Clear the setuid, setgid and sticky bits of *fd* (keep only rwx); its new mode.
    OSError if they are set and cannot be cleared (not our file)."""
    mode = stat.S_IMODE(os.fstat(fd).st_mode)
    if mode & 0o7000:
        os.fchmod(fd, mode & 0o777)
    return mode & 0o777


def _open_removable_dir(name: str, dir_fd: int) -> int:
    """dir_fd/name opened (no-follow) to empty it; a directory we may not search (mode
    000, ours) is given mode 0700 first, through a descriptor of that very directory."""
    try:
        return os.open(name, DIR_FLAGS, dir_fd=dir_fd)
    except PermissionError:
        pass
    path_fd = os.open(name, os.O_PATH | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC,
                      dir_fd=dir_fd)
    try:
        os.chmod(f"/proc/self/fd/{path_fd}", 0o700)  # this inode, whatever its path
    finally:
        os.close(path_fd)
    return os.open(name, DIR_FLAGS, dir_fd=dir_fd)


def remove_tree(name: str, dir_fd: int, tick: Callable[[], object] | None = None) -> None:
    """Remove dir_fd/name whatever it is (a file, a link, a FIFO, a device, a tree).

    Iterative and descriptor-based: each directory is opened with O_NOFOLLOW relative to
    its parent's descriptor and emptied with unlinkat(2), so there is no recursion and no
    path-length limit (a tree 1,000 levels deep with 255-byte names goes), a symbolic link
    is removed as a link, never followed, and a FIFO or device is never opened.  Only the
    names of the current directories are held, one descriptor per level.  A directory on
    another file system or mount (a mount point) is never entered.  What cannot be
    removed is skipped and the first such error raised (OSError) once the rest is gone;
    *tick* is called every 1000 entries.
    """
    try:
        os.unlink(name, dir_fd=dir_fd)
        return
    except FileNotFoundError:
        return
    except OSError as err:
        if err.errno not in (errno.EISDIR, errno.EPERM):
            raise
    try:
        top = _open_removable_dir(name, dir_fd)
    except FileNotFoundError:
        return
    except OSError as err:
        if err.errno in (errno.ENOTDIR, errno.ELOOP):  # replaced meanwhile by a non-dir
            with suppress(FileNotFoundError):
                os.unlink(name, dir_fd=dir_fd)
            return
        raise
    first_error: OSError | None = None
    # each level: its descriptor, its name in the level above, names left to remove,
    # and whether it was listed again once emptied (entries created meanwhile)
    stack: list[tuple[int, str, list[str], bool]] = []
    count = 0
    try:
        top_st = os.fstat(top)
        mount = mount_id(top)
        stack.append((top, name, os.listdir(top), False))
        while stack:
            fd, here, names, relisted = stack[-1]
            if names:
                entry = names.pop()
                count += 1
                if tick is not None and count % 1000 == 0:
                    tick()
                try:
                    os.unlink(entry, dir_fd=fd)
                    continue
                except FileNotFoundError:
                    continue
                except OSError as err:
                    if err.errno not in (errno.EISDIR, errno.EPERM):
                        first_error = first_error or err
                        continue
                try:
                    _fd_headroom(len(stack) + 1)
                    child = _open_removable_dir(entry, fd)
                except FileNotFoundError:
                    continue
                except OSError as err:
                    if err.errno in (errno.ENOTDIR, errno.ELOOP):
                        names.append(entry)  # replaced by a non-directory: unlink it
                    else:
                        first_error = first_error or err
                    continue
                try:
                    st = os.fstat(child)
                    foreign = st.st_dev != top_st.st_dev or (
                        mount is not None and mount_id(child) != mount)
                    listing = [] if foreign else os.listdir(child)
                except OSError as err:
                    os.close(child)
                    first_error = first_error or err
                    continue
                if foreign:
                    os.close(child)
                    first_error = first_error or OSError(
                        errno.EXDEV, "a mount point: left alone", entry)
                    continue
                stack.append((child, entry, listing, False))
                continue
            if not relisted:
                try:
                    more = os.listdir(fd)
                except OSError:
                    more = []
                if more:
                    stack[-1] = (fd, here, more, True)
                    continue
            stack.pop()
            os.close(fd)
            try:
                os.rmdir(here, dir_fd=stack[-1][0] if stack else dir_fd)
            except FileNotFoundError:
                pass
            except OSError as err:
                first_error = first_error or err
    finally:
        for fd, *_ in stack:
            os.close(fd)
    if first_error is not None:
        raise first_error


def mount_id(fd: int) -> str | None:
    """The mount a descriptor is on (Linux /proc), None if unknown."""
    try:
        with open(f"/proc/self/fdinfo/{fd}") as f:
            for line in f:
                if line.startswith("mnt_id:"):
                    return line.split()[1]
    except OSError:
        pass
    return None

