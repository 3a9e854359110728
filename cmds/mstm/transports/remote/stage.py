"""The target's side of rsync_ssh's open / publish / discard of a staging batch.

Run at the target by ``run_stage.sh`` as ``python3 -I -c <this file> <target_dir> <mode>
<batch>`` (stage.sh does the same where there is no python3).  Names are bytes
throughout; everything is done from descriptors of the target directory: no symbolic
link at the target is ever followed (one on the way is an error for the item), no
recursion or path-length limit (a tree 1,000 levels deep works).

* open: creates .mstm-staging and .mstm-partial (mode 0700) and removes staging batch
  directories of the exact shape mstm's batch ids have (never anything else) in which
  nothing changed for a day (a killed sender's leftovers), answering "R <name>" for each.
* publish: stdin "F<relpath>\\0" (file item) or "D<relpath>\\0" (directory item); each
  item is first planned (every conflict found, nothing changed but the staged copy's
  mode bits), then applied: missing parents made with the staged parents' modes, a file
  renamed over its final name, a directory merged (a directory missing at the target
  renamed whole with RENAME_NOREPLACE, every file or link renamed over a same-named
  non-directory, nothing else touched); then one syncfs.  Answers
  "O|E\\0relpath\\0reason\\0" per item.
* discard: removes .mstm-staging/<batch> bottom-up from descriptors.

Every run ends its answer with "MSTM-OK\\n": anything else means it did not finish.  A
batch name of any other shape than mstm's ends the program with exit 4.  Standard
library only, Python 3.4+ (types in comments, for mypy only).
"""

import contextlib
import ctypes
import errno
import os
import re
import stat
import sys
import time

# Types are in comments, for mypy only: typing is not imported at run time (3.5+; ruff does
# not read type comments, vermin does not know MYPY is False here).
MYPY = False
if MYPY:  # pragma: no cover
    from typing import IO, Any, Dict, List, Optional, Tuple  # noqa: F401  # novm

CLOEXEC = getattr(os, "O_CLOEXEC", 0)
DIRF = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | CLOEXEC
REGF = os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | CLOEXEC
STAGING, PARTIAL = b".mstm-staging", b".mstm-partial"
OURS = re.compile(b"\\A[0-9]{8}T[0-9]{12}-[0-9a-f]{12}\\Z")
BATCH = re.compile(b"\\A[0-9A-Za-z][0-9A-Za-z_-]{0,63}\\Z")
DAY = 86400


class Refused(Exception):
    """An item that may not be published, and why."""


def raise_nofile_limit():
    # type: () -> None
    """As many open descriptors as allowed: a deep tree is walked from descriptors."""
    try:
        import resource

        soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
        if hard == resource.RLIM_INFINITY or hard > soft:
            resource.setrlimit(resource.RLIMIT_NOFILE,
                               (hard if hard != resource.RLIM_INFINITY else 1 << 20, hard))
    except (ImportError, ValueError, OSError):
        pass


def lstat_at(fd, name):
    # type: (int, bytes) -> Optional[os.stat_result]
    try:
        return os.stat(name, dir_fd=fd, follow_symlinks=False)
    except FileNotFoundError:
        return None


def clean_mode(fd, name, st):
    # type: (int, bytes, os.stat_result) -> None
    """setuid, setgid and sticky never survive (nor any bit above 0o777)."""
    if st.st_mode & 0o7000 == 0 or not (stat.S_ISREG(st.st_mode) or stat.S_ISDIR(st.st_mode)):
        return
    f = os.open(name, DIRF if stat.S_ISDIR(st.st_mode) else REGF, dir_fd=fd)
    try:
        now = os.fstat(f)
        if (now.st_dev, now.st_ino) == (st.st_dev, st.st_ino):
            os.fchmod(f, stat.S_IMODE(now.st_mode) & 0o777)
    finally:
        os.close(f)


def rmtree_at(pfd, name):
    # type: (int, bytes) -> None
    """Remove *name* in *pfd*: iterative, from descriptors, nothing followed, no depth or
    PATH_MAX limit."""
    st = lstat_at(pfd, name)
    if st is None:
        return
    if not stat.S_ISDIR(st.st_mode):
        os.unlink(name, dir_fd=pfd)
        return
    first = os.open(name, DIRF, dir_fd=pfd)
    # each level: [parent fd, name, fd, names left to remove (None: not listed yet)]
    stack = [[pfd, name, first, None]]  # type: List[List[Any]]
    try:
        while stack:
            top = stack[-1]
            if top[3] is None:
                with contextlib.suppress(OSError):
                    os.fchmod(top[2], 0o700)  # a read-only directory we made
                top[3] = os.listdir(top[2])
            if top[3]:
                n = os.fsencode(top[3].pop())
                st = lstat_at(top[2], n)
                if st is None:
                    continue
                if stat.S_ISDIR(st.st_mode):
                    stack.append([top[2], n, os.open(n, DIRF, dir_fd=top[2]), None])
                else:
                    with contextlib.suppress(FileNotFoundError):
                        os.unlink(n, dir_fd=top[2])
                continue
            stack.pop()
            os.close(top[2])
            with contextlib.suppress(FileNotFoundError):
                os.rmdir(top[1], dir_fd=top[0])
    finally:
        for top in stack:
            os.close(top[2])


def newest(pfd, name):
    # type: (int, bytes) -> float
    """The newest mtime in a tree (iterative, nothing followed)."""
    top = lstat_at(pfd, name)
    assert top is not None
    best = top.st_mtime
    stack = [os.open(name, DIRF, dir_fd=pfd)]
    todo = [os.listdir(stack[0])]
    try:
        while stack:
            if not todo[-1]:
                os.close(stack.pop())
                todo.pop()
                continue
            n = os.fsencode(todo[-1].pop())
            st = lstat_at(stack[-1], n)
            if st is None:
                continue
            best = max(best, st.st_mtime)
            if stat.S_ISDIR(st.st_mode):
                fd = os.open(n, DIRF, dir_fd=stack[-1])
                stack.append(fd)
                todo.append(os.listdir(fd))
    finally:
        for fd in stack:
            os.close(fd)
    return best


def private_dir(tfd, name):
    # type: (int, bytes) -> int
    with contextlib.suppress(FileExistsError):
        os.mkdir(name, 0o700, dir_fd=tfd)
    fd = os.open(name, DIRF, dir_fd=tfd)
    try:
        if stat.S_IMODE(os.fstat(fd).st_mode) != 0o700:
            os.fchmod(fd, 0o700)
    except OSError:
        pass
    return fd


def do_open(tfd, out):
    # type: (int, IO[bytes]) -> None
    """Staging and partial directories, private; stale batches of killed senders
    removed (each named on *out*)."""
    for name in (PARTIAL, STAGING):
        fd = private_dir(tfd, name)
        if name == PARTIAL:
            os.close(fd)
            continue
        try:
            now = time.time()
            for n in os.listdir(fd):
                b = os.fsencode(n)
                st = lstat_at(fd, b)
                if not OURS.match(b) or st is None or not stat.S_ISDIR(st.st_mode) \
                        or now - st.st_mtime <= DAY:
                    continue
                try:
                    if now - newest(fd, b) > DAY:
                        rmtree_at(fd, b)
                        out.write(b"R " + b + b"\n")
                except OSError:
                    pass
        finally:
            os.close(fd)


def walk_to(root, parts, create=None):
    # type: (int, List[bytes], Optional[List[int]]) -> Optional[int]
    """Descend from *root* through real directories only (no link followed); a missing
    one -> None, unless *create* gives the modes to make them with."""
    fd = os.open(b".", DIRF, dir_fd=root)
    try:
        for i, p in enumerate(parts):
            st = lstat_at(fd, p)
            if st is None and create is not None:
                os.mkdir(p, 0o700, dir_fd=fd)
                nfd = os.open(p, DIRF, dir_fd=fd)
                os.fchmod(nfd, create[i] & 0o777)
                os.close(fd)
                fd = nfd
                continue
            if st is None:
                os.close(fd)
                return None
            if not stat.S_ISDIR(st.st_mode):
                what = "a symbolic link" if stat.S_ISLNK(st.st_mode) else "not a directory"
                raise Refused("%s at the target is %s"
                              % (os.fsdecode(b"/".join(parts[:i + 1])), what))
            nfd = os.open(p, DIRF, dir_fd=fd)
            os.close(fd)
            fd = nfd
        return fd
    except BaseException:
        with contextlib.suppress(OSError):
            os.close(fd)
        raise


def kind(st):
    # type: (os.stat_result) -> str
    m = st.st_mode
    if stat.S_ISDIR(m):
        return "d"
    if stat.S_ISREG(m) or stat.S_ISLNK(m):
        return "f"
    return "x"


def plan(sfd, tfd, rel, is_dir):
    # type: (int, int, bytes, bool) -> Tuple[List[int], List[Tuple[bytes, bool]]]
    """What publishing one item takes, or Refused: nothing is changed here but the
    staged copy's modes.  Returns (modes of the parents to create, moves: [(rel, whole
    directory?)])."""
    parts = rel.split(b"/")
    if any(p in (b"", b".", b"..") for p in parts) or rel.startswith(b"/"):
        raise Refused("not a relative path")
    sp = walk_to(sfd, parts[:-1])
    if sp is None:
        raise Refused("not in the staging directory")
    try:
        st = lstat_at(sp, parts[-1])
        if st is None:
            raise Refused("not in the staging directory")
        if is_dir != stat.S_ISDIR(st.st_mode) or (not is_dir and not stat.S_ISREG(st.st_mode)):
            what = "directory" if is_dir else "regular file"
            raise Refused("staged as something else than a %s" % (what,))
        modes = []
        sd = os.open(b".", DIRF, dir_fd=sfd)
        for p in parts[:-1]:
            nsd = os.open(p, DIRF, dir_fd=sd)
            os.close(sd)
            sd = nsd
            modes.append(stat.S_IMODE(os.fstat(sd).st_mode))
        os.close(sd)
        clean_mode(sp, parts[-1], st)
    finally:
        os.close(sp)
    tp = walk_to(tfd, parts[:-1])  # Refused for a link or a file on the way
    if tp is None:
        if is_dir:
            check_tree(sfd, rel, None)
        return modes, [(rel, True)]
    try:
        tst = lstat_at(tp, parts[-1])
    finally:
        os.close(tp)
    if not is_dir:
        if tst is not None and kind(tst) == "d":
            raise Refused("a directory at the target has its name")
        return modes, [(rel, False)]
    if tst is None:
        # a new directory: moved whole, after a look for what may never be published
        check_tree(sfd, rel, None)
        return modes, [(rel, True)]
    if not stat.S_ISDIR(tst.st_mode):
        what = "a symbolic link" if stat.S_ISLNK(tst.st_mode) else "not a directory"
        raise Refused("%s at the target is %s" % (os.fsdecode(rel), what))
    return modes, check_tree(sfd, rel, tfd)


def check_tree(sfd, rel, tfd):
    # type: (int, bytes, Optional[int]) -> List[Tuple[bytes, bool]]
    """Walk the staged tree *rel* (iteratively), comparing it with the target's where
    that exists; the moves that merge it, or Refused."""
    moves = []  # type: List[Tuple[bytes, bool]]
    sroot = walk_to(sfd, rel.split(b"/"))
    assert sroot is not None
    troot = walk_to(tfd, rel.split(b"/")) if tfd is not None else None
    stack = []  # type: List[Tuple[bytes, int, Optional[int], List[str]]]
    stack.append((rel, sroot, troot, os.listdir(sroot)))
    try:
        while stack:
            r, s, t, names = stack[-1]
            if not names:
                stack.pop()
                os.close(s)
                if t is not None:
                    os.close(t)
                continue
            n = os.fsencode(names.pop())
            sub = r + b"/" + n
            st = lstat_at(s, n)
            if st is None:
                continue
            k = kind(st)
            if k == "x":
                raise Refused("%s is not a regular file, directory or link" % (os.fsdecode(sub),))
            clean_mode(s, n, st)
            tst = lstat_at(t, n) if t is not None else None
            if k == "d":
                nt = None
                if t is not None and tst is None:
                    moves.append((sub, True))
                elif t is not None and tst is not None:
                    if not stat.S_ISDIR(tst.st_mode):
                        what = ("a symbolic link" if stat.S_ISLNK(tst.st_mode)
                                else "not a directory")
                        raise Refused("%s at the target is %s" % (os.fsdecode(sub), what))
                    nt = os.open(n, DIRF, dir_fd=t)
                ns = os.open(n, DIRF, dir_fd=s)
                stack.append((sub, ns, nt, os.listdir(ns)))
                continue
            if tst is not None and kind(tst) == "d":
                raise Refused("%s is a directory at the target" % (os.fsdecode(sub),))
            if t is not None:
                moves.append((sub, False))
    finally:
        for _r, s, t, _names in stack:
            os.close(s)
            if t is not None:
                os.close(t)
    return moves


def _load_renameat2():
    # type: () -> Any
    try:
        return ctypes.CDLL(None, use_errno=True).renameat2
    except (OSError, AttributeError):
        return None


_renameat2 = _load_renameat2()


def move(sd, td, name, noreplace):
    # type: (int, int, bytes, bool) -> None
    if noreplace and _renameat2 is not None:
        if _renameat2(sd, name, td, name, 1) == 0:  # RENAME_NOREPLACE
            return
        e = ctypes.get_errno()
        if e not in (errno.EINVAL, errno.ENOSYS):
            raise OSError(e, os.strerror(e))
    if noreplace and lstat_at(td, name) is not None:
        raise OSError(errno.EEXIST, "appeared meanwhile")
    os.rename(name, name, src_dir_fd=sd, dst_dir_fd=td)


def apply(sfd, tfd, rel, modes, moves):
    # type: (int, int, bytes, List[int], List[Tuple[bytes, bool]]) -> None
    """Make the planned item's missing parents, then its moves."""
    parts = rel.split(b"/")
    made = walk_to(tfd, parts[:-1], create=modes)
    assert made is not None
    os.close(made)
    cache = {}  # type: Dict[bytes, Tuple[int, int]]
    try:
        for m, whole in moves:
            mp = m.split(b"/")
            key = b"/".join(mp[:-1])
            if key not in cache:
                for fds in cache.values():
                    os.close(fds[0])
                    os.close(fds[1])
                cache.clear()
                sd = walk_to(sfd, mp[:-1])
                td = walk_to(tfd, mp[:-1])
                if sd is None or td is None:
                    raise Refused("%s vanished" % (os.fsdecode(key),))
                cache[key] = (sd, td)
            sd, td = cache[key]
            st = lstat_at(sd, mp[-1])
            if st is None:
                raise Refused("%s vanished from staging" % (os.fsdecode(m),))
            restore = None
            if whole and stat.S_ISDIR(st.st_mode) and not st.st_mode & stat.S_IWUSR:
                restore = stat.S_IMODE(st.st_mode)  # moving a directory rewrites its ".."
                f = os.open(mp[-1], DIRF, dir_fd=sd)
                os.fchmod(f, restore | stat.S_IWUSR)
                os.close(f)
            move(sd, td, mp[-1], whole and stat.S_ISDIR(st.st_mode))
            if restore is not None:
                f = os.open(mp[-1], DIRF, dir_fd=td)
                os.fchmod(f, restore)
                os.close(f)
    finally:
        for fds in cache.values():
            os.close(fds[0])
            os.close(fds[1])


def do_publish(tfd, batch, request, out):
    # type: (int, bytes, bytes, IO[bytes]) -> None
    """Publish the items *request* names from staging batch *batch*; one answer per
    item on *out*, after the syncfs that makes the renames durable."""
    answers = []  # type: List[Tuple[bytes, bytes, str]]
    sfd = None  # type: Optional[int]
    try:
        stg = os.open(STAGING, DIRF, dir_fd=tfd)
        sfd = os.open(batch, DIRF, dir_fd=stg)
        os.close(stg)
    except OSError as e:
        sfd, why = None, "no staging directory: %s" % (e.strerror,)
    for r in request.split(b"\0"):
        if len(r) < 2 or r[:1] not in (b"F", b"D"):
            continue
        rel = r[1:]
        if sfd is None:
            answers.append((b"E", rel, why))
            continue
        try:
            modes, moves = plan(sfd, tfd, rel, r[:1] == b"D")
            apply(sfd, tfd, rel, modes, moves)
            answers.append((b"O", rel, ""))
        except Refused as e:
            answers.append((b"E", rel, str(e)))
        except OSError as e:
            answers.append((b"E", rel, "%s: %s" % (e.strerror or e,
                                                     os.fsdecode(e.filename or b""))))
    if sfd is not None:
        os.close(sfd)
    # the renames are durable before any source may go
    ok = True
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        if libc.syncfs(tfd) != 0:
            ok = False
    except (OSError, AttributeError):
        os.sync()
    for k, rel, why in answers:
        if k == b"O" and not ok:
            k, why = b"E", "the renames could not be made durable (syncfs failed)"
        out.write(k + b"\0" + rel + b"\0" + why.encode("utf-8", "replace") + b"\0")


def do_discard(tfd, batch):
    # type: (int, bytes) -> None
    try:
        stg = os.open(STAGING, DIRF, dir_fd=tfd)
    except FileNotFoundError:
        return
    try:
        rmtree_at(stg, batch)
    finally:
        os.close(stg)


def main(argv):
    # type: (List[str]) -> None
    raise_nofile_limit()
    out = sys.stdout.buffer
    target, mode = os.fsencode(argv[1]), argv[2]
    batch = os.fsencode(argv[3]) if len(argv) > 3 else b""
    if batch and not BATCH.match(batch):
        sys.exit(4)
    if mode == "open":
        os.makedirs(target, exist_ok=True)
    tfd = os.open(target, os.O_RDONLY | os.O_DIRECTORY | CLOEXEC)
    if mode == "open":
        do_open(tfd, out)
    elif mode == "publish":
        do_publish(tfd, batch, sys.stdin.buffer.read(), out)
    elif mode == "discard":
        do_discard(tfd, batch)
    out.write(b"MSTM-OK\n")
    out.flush()


if __name__ == "__main__":
    main(sys.argv)
