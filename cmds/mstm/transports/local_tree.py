"""The descriptor-level pieces of the local transport (local.py): nothing is ever followed.

Directories made below a descriptor one component at a time (`makedirs_at`,
`target_dir_at`), a staged directory merged into the target's (`merge_tree`), a file
looked at and hashed through no link (`look_at`), and the fsyncs that make publishing
durable (`keep_dirty` collects the directories to fsync, `fsync_fd`, `fsync_dir`).
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import os
import resource
import stat
from collections.abc import Callable, Sequence

from mstm import safefs
from mstm.transports.base import RemoteFile
from mstm.transports.common import ItemProblem, Monitor

DIR_FLAGS = safefs.DIR_FLAGS
_HASH_BLOCK = 1 << 20


def fd_headroom(want: int) -> None:
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    want += 256
    if soft != resource.RLIM_INFINITY and want > soft:
        new = want * 2 if hard == resource.RLIM_INFINITY else min(hard, want * 2)
        if new > soft:
            resource.setrlimit(resource.RLIMIT_NOFILE, (new, hard))


def makedirs_at(base_fd: int, parts: Sequence[bytes], mode: int,
                 created: Callable[[int], None] | None = None) -> int:
    """A descriptor of base/parts..., each missing directory made with *mode*, no link
    followed (ELOOP for a link on the way, ENOTDIR for a file).  *created(parent_fd)*
    is told of each directory that got a new entry."""
    cur = os.open(".", DIR_FLAGS, dir_fd=base_fd)
    try:
        for part in parts:
            try:
                below = os.open(part, DIR_FLAGS, dir_fd=cur)
            except FileNotFoundError:
                with contextlib.suppress(FileExistsError):
                    os.mkdir(part, mode, dir_fd=cur)
                    if created is not None:
                        created(cur)
                below = os.open(part, DIR_FLAGS, dir_fd=cur)
            os.close(cur)
            cur = below
    except BaseException:
        os.close(cur)
        raise
    return cur


def keep_dirty(fd: int, dirty: dict[tuple[int, int], int]) -> None:
    """Remember directory *fd* for the fsync at the end of publish (takes it over)."""
    st = os.fstat(fd)
    key = (st.st_dev, st.st_ino)
    if key in dirty:
        os.close(fd)
    else:
        dirty[key] = fd


def target_dir_at(root: int, parts: Sequence[bytes], relpath: str,
                   dirty: dict[tuple[int, int], int]) -> int:
    """The target directory holding an item (made if missing), no link followed."""
    try:
        return makedirs_at(root, parts, 0o777,
                            created=lambda fd: keep_dirty(os.dup(fd), dirty))
    except OSError as err:
        if err.errno in (errno.ELOOP, errno.ENOTDIR):
            what = "a symbolic link" if err.errno == errno.ELOOP else "not a directory"
            raise ItemProblem(f"{relpath}: a component of its directory at the target is "
                              f"{what}; left as it is") from None
        raise


def kind_words(mode: int) -> str:
    if stat.S_ISDIR(mode):
        return "a directory"
    if stat.S_ISREG(mode):
        return "a file"
    return f"a {safefs.special_reason(mode)}"


def lstat_at(dir_fd: int, name: bytes) -> os.stat_result | None:
    try:
        return os.stat(name, dir_fd=dir_fd, follow_symlinks=False)
    except FileNotFoundError:
        return None


def refuse_dir(dir_fd: int, name: bytes, relpath: str, what: str) -> None:
    st = lstat_at(dir_fd, name)
    if st is not None and stat.S_ISDIR(st.st_mode):
        raise ItemProblem(f"{relpath}: the target has a directory where the item has {what}; "
                          f"left as it is")


def merge_tree(src_parent: int, dst_parent: int, name: bytes, relpath: str,
                dirty: dict[tuple[int, int], int] | None, mon: Monitor) -> list[str]:
    """Merge staged directory *name* of *src_parent* into *dst_parent*: with *dirty*
    None only look for conflicts; else move things (and note the touched directories).
    Iterative, two descriptors per level, nothing followed.  The conflicts, in words."""
    apply = dirty is not None
    problems: list[str] = []
    # a frame: (staged dir fd, target dir fd, relpath, names still to do)
    frames: list[tuple[int, int, str, list[bytes]]] = []

    def enter(sp: int, dp: int, child: bytes, rel: str) -> None:
        st = lstat_at(dp, child)
        if st is None:
            if not apply:
                return
            try:  # moved in whole unless something is there already
                safefs.rename_noreplace(os.fsdecode(child), os.fsdecode(child),
                                        src_dir_fd=sp, dst_dir_fd=dp)
            except FileExistsError:
                pass
            else:
                assert dirty is not None
                keep_dirty(os.dup(dp), dirty)
                return
            st = lstat_at(dp, child)
            if st is None:
                problems.append(f"{rel}: vanished at the target during the merge")
                return
        if not stat.S_ISDIR(st.st_mode):
            problems.append(f"{rel}: the target has {kind_words(st.st_mode)} where the item has a "
                            f"directory; left as it is")
            return
        fd_headroom(2 * len(frames) + 64)
        s_fd = os.open(child, DIR_FLAGS, dir_fd=sp)
        try:
            d_fd = os.open(child, DIR_FLAGS, dir_fd=dp)
        except BaseException:
            os.close(s_fd)
            raise
        frames.append((s_fd, d_fd, rel, sorted(map(os.fsencode, os.listdir(s_fd)), reverse=True)))

    try:
        enter(src_parent, dst_parent, name, relpath)
        while frames:
            s_fd, d_fd, rel, names = frames[-1]
            if not names:
                frames.pop()
                os.close(s_fd)
                if apply:
                    assert dirty is not None
                    keep_dirty(d_fd, dirty)
                else:
                    os.close(d_fd)
                continue
            child = names.pop()
            crel = f"{rel}/{os.fsdecode(child)}"
            sst = os.stat(child, dir_fd=s_fd, follow_symlinks=False)
            if stat.S_ISDIR(sst.st_mode):
                enter(s_fd, d_fd, child, crel)
                continue
            if not stat.S_ISREG(sst.st_mode):
                continue  # never staged by us: not brought
            tst = lstat_at(d_fd, child)
            if tst is not None and stat.S_ISDIR(tst.st_mode):
                problems.append(f"{crel}: the target has a directory where the item has a "
                                f"file; left as it is")
            elif apply:
                os.rename(child, child, src_dir_fd=s_fd, dst_dir_fd=d_fd)
            mon.alive_now()
    finally:
        for s_fd, d_fd, _rel, _names in frames:
            os.close(s_fd)
            os.close(d_fd)
    return problems


def look_at(base_fd: int, relpath: str, mon: Monitor) -> RemoteFile | None:
    """What *relpath* below *base_fd* is, through no link: None if missing (or a link,
    or anything but a file or directory)."""
    try:
        dir_fd, name = safefs.open_parent(base_fd, relpath)
    except (FileNotFoundError, NotADirectoryError, ValueError):
        return None
    except OSError as err:
        if err.errno == errno.ELOOP:
            return None
        raise
    try:
        st = lstat_at(dir_fd, os.fsencode(name))
        if st is None:
            return None
        if stat.S_ISDIR(st.st_mode):
            return RemoteFile(size=0, sha256=None)
        if not stat.S_ISREG(st.st_mode):
            return None
        fd = os.open(name, os.O_RDONLY | os.O_CLOEXEC | os.O_NOFOLLOW | os.O_NONBLOCK,
                     dir_fd=dir_fd)
    finally:
        os.close(dir_fd)
    try:
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            return None
        with contextlib.suppress(OSError, AttributeError):
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        h = hashlib.sha256()
        size = 0
        while chunk := os.read(fd, _HASH_BLOCK):
            h.update(chunk)
            size += len(chunk)
            mon.alive_now()
        return RemoteFile(size=size, sha256=h.hexdigest())
    finally:
        os.close(fd)


def fsync_fd(fd: int) -> None:
    try:
        os.fsync(fd)
    except OSError as err:
        if err.errno not in (errno.EINVAL, errno.EBADF):  # some file systems refuse
            raise


def fsync_dir(path: bytes) -> None:
    try:
        fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    except OSError:
        return
    try:
        fsync_fd(fd)
    finally:
        os.close(fd)
