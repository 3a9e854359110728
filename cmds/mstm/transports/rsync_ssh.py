"""rsync over one persistent ssh connection (MiStaMover's `rsync_ssh`).

One rsync run per batch (`--files-from - --from0`: names travel NUL-separated on stdin,
never on a command line), over the stream's ControlMaster connection, into the
directory the sender names: without the arrival monitor that is the batch's staging
directory `<target_dir>/.mstm-staging/<batch>/` (base.staging_dir), with it the arrival
monitor's batch directory.  Nothing goes to a final name during a transfer: `inspect`
(staged=<batch>) hashes what the staging directory holds, and only the items the sender
verified are moved into place by `publish` -- a rename for a file item, a merge for a
directory item (see _STAGE_PY) -- then `discard` removes the rest.  A source rewritten
while rsync read it therefore leaves the target with its old, verified content, or
nothing new.  An interrupted file is kept in `<target_dir>/.mstm-partial/` (an absolute
`--partial-dir`, shared by every batch: rsync takes it as the basis of the next
attempt), and `open` creates both directories with mode 0700 and removes staging batch
directories a killed sender left (only names of the exact shape mstm's batch ids have,
unchanged for a day).

Modes and ownership at the target: rsync runs with `--perms --chmod=a-st`, so files and
directories get their source's permission bits *without* setuid, setgid and sticky;
`publish` clears those bits again (fchmod) on everything it moves into place and
creates, and stream.py's receiver does the same, so they never survive even when the
remote user is root.  rsync is never given -o/-g (nor -a): everything belongs to the
remote user.  It is never given -D/--devices/--specials either (`--no-devices
--no-specials` are explicit): no device file or FIFO is ever created at the target, and
`publish` refuses an item whose staged tree holds one.

Durability: rsync never fsyncs, and a hash computed at the target is read from its page
cache, so a match proves nothing about what a crash of the target would leave.  Since
the sender deletes a source (move mode) as soon as `inspect` reported a match, `inspect`
first makes the target's filesystem durable -- one syncfs(2) per call (`sync -f`,
coreutils >= 8.24; plain sync(1) where `-f` is unknown) -- and only then computes the
sizes and hashes, in the same round trip.  A failed syncfs (a writeback error) answers
nothing and raises TargetUnavailable: no source goes.  `publish` ends with a syncfs too
(an item is reported published only if it succeeded), so the renames are on disk
before their sources go.

Hashing at the target: python3's hashlib (OpenSSL, which uses the CPU's SHA extensions:
3-4x faster than coreutils' sha256sum here) when the target has python3, else sha256sum.
The python hasher walks from the directory's descriptor with O_NOFOLLOW (no link
followed); the sha256sum fallback resolves paths as the shell does.  The answer is
untrusted input: `parse_inspect` accepts only well-formed records.

Large files (file items of `stream_min` bytes, 64 MiB by default) do not go through
rsync but through stream.py, one at a time over the same connection, into the same
staging directory: hashed, written back and fdatasync'd at the target while they
arrive, resumable after an interruption (their partial data waits in `.mstm-partial/`).
The digest the target computed while writing is remembered with the file's (size,
mtime, inode); the next `inspect` of that file answers it without reading the file
again as long as those three still hold at the target, and hashes the file otherwise.
A target without python3 (or one that refuses an item) gets those files through rsync.
Sources are read by rsync itself (what it read is proven by the sender's comparison of
the target's sha256 with its own, taken through safefs) and by stream.py through
safefs.open_regular (no link followed below the stream directory).

Windows left: none under a final name for unverified data.  Without python3 at the
target, `publish` checks each existing path component with `[ -L ]` before it uses it;
a component swapped for a link between that check and the `mv` is followed (only the
remote user or root can write there).  Publishing a directory item is one rename per
file it brings into an existing directory (a reader may see some of its files before
the others), one rename in all for a directory new at the target.
"""

from __future__ import annotations

import contextlib
import logging
import os
import subprocess
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
    staging_dir,
)
from mstm.transports.common import Monitor, Throttle, chunk_size, run_watched
from mstm.transports.rsync import PROGRESS_FORMAT, run_rsync
from mstm.transports.ssh import SshConnection
from mstm.transports.stream import (
    CHUNK,
    STREAM_MIN,
    Stream,
    StreamBroken,
    Streamed,
    StreamItemError,
    StreamUnavailable,
)

log = logging.getLogger("mstm.rsync")

PARTIAL = ".mstm-partial"  # beside .mstm-staging in target_dir; rsync and stream.py
# What rsync does to modes on the way (tested with 3.2.7 and 3.5): setuid, setgid and
# sticky never reach the target.
CHMOD = "--chmod=a-st"
# rsync exit codes that mean the connection, not an item, failed
CONNECTION_CODES = frozenset({5, 10, 12, 30, 35, 255})
_SPLIT = b"--mstm-split--"

# One round trip per batch: the names arrive NUL-separated on stdin.  First the target
# filesystem is made durable (one syncfs: rsync never fsyncs, and the sender may delete
# the source as soon as we answer); then sizes, the split mark, and sha256 of each
# regular file ("digest  name", NUL-terminated, as `sha256sum -z` prints it).  A failed
# syncfs (a writeback error) answers nothing at all: exit 7.  The hashes come from
# python3's hashlib (OpenSSL, SHA extensions: 3-4x coreutils here) when the target has
# python3, else from sha256sum.
_INSPECT_SCRIPT = r"""
cd -- "$1" || exit 3
t=$(mktemp) || exit 3
trap 'rm -f "$t"' EXIT
cat > "$t"
if ! e=$(LC_ALL=C sync -f -- . 2>&1); then
  case "$e" in
    *option*|*operand*|*sage*) sync ;;
    *) printf '%s\n' "$e" >&2; exit 7 ;;
  esac
fi
if command -v python3 >/dev/null 2>&1 && python3 -I -c "$2" "$t" 2>/dev/null; then
  exit 0
fi
xargs -0 -r -a "$t" stat --printf='%s %n\0' -- 2>/dev/null
printf '%s\0' '--mstm-split--'
xargs -0 -r -a "$t" sha256sum -z -- 2>/dev/null
exit 0
"""

# The target's hasher, given the file of NUL-separated names: sizes (lstat, like stat(1)),
# the split mark, then "digest  name" of each regular file, all in one write at the end
# so that a failure leaves nothing half-said (the script then falls back to sha256sum).
# Names stay bytes throughout.  Python 3.4+ syntax (-I), 1 MiB reads into one buffer.
# Each name is reached from the directory's descriptor, no symbolic link followed.
# After a record "/" (never a relative path) come pairs "size mtime_ns inode digest",
# name: what stream.py's receiver reported for a file it wrote; that digest is answered
# without reading the file only while its size, mtime and inode are still those.
_HASH_PY = r"""
import hashlib, os, stat, sys
recs = open(sys.argv[1], "rb").read().split(b"\0")
cut = recs.index(b"/") if b"/" in recs else len(recs)
names, extra, known = [n for n in recs[:cut] if n], recs[cut + 1:], {}
for i in range(0, len(extra) - 1, 2):
    w = extra[i].split()
    if len(w) == 4 and all(x.isdigit() for x in w[:3]):
        known[extra[i + 1]] = (int(w[0]), int(w[1]), int(w[2]), w[3])
sizes, sums = [], []
buf = bytearray(1 << 20)
view = memoryview(buf)
DIRF = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW
here = os.open(b".", DIRF)
cache = [None, None]  # the last parent (path, descriptor): names come sorted by directory

def parent(n):
    parts = n.split(b"/")
    if any(p in (b"", b".", b"..") for p in parts):
        raise OSError("not a normalised relative path")
    key = b"/".join(parts[:-1])
    if cache[0] != key:
        if cache[1] is not None:
            os.close(cache[1])
        cache[0] = cache[1] = None
        fd = os.open(b".", DIRF, dir_fd=here)
        try:
            for p in parts[:-1]:  # no symbolic link followed on the way
                nfd = os.open(p, DIRF, dir_fd=fd)
                os.close(fd)
                fd = nfd
        except OSError:
            os.close(fd)
            raise
        cache[0], cache[1] = key, fd
    return cache[1], parts[-1]

for n in names:
    try:
        pfd, base = parent(n)
        st = os.stat(base, dir_fd=pfd, follow_symlinks=False)
        sizes.append(str(st.st_size).encode() + b" " + n + b"\0")
        k = known.get(n)
        if k and stat.S_ISREG(st.st_mode) and (st.st_size, st.st_mtime_ns, st.st_ino) == k[:3]:
            sums.append(k[3] + b"  " + n + b"\0")
            continue
        if not stat.S_ISREG(st.st_mode):
            continue
        fd = os.open(base, os.O_RDONLY | os.O_NONBLOCK | os.O_NOFOLLOW, dir_fd=pfd)
    except OSError:
        continue
    try:
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            continue
        h = hashlib.sha256()
        while True:
            k = os.readv(fd, [buf])
            if not k:
                break
            h.update(view[:k])
        sums.append(h.hexdigest().encode() + b"  " + n + b"\0")
    except OSError:
        continue
    finally:
        os.close(fd)
out = sys.stdout.buffer
out.write(b"".join(sizes) + b"--mstm-split--\0" + b"".join(sums))
out.flush()
"""

# The target's side of open / publish / discard, run as `python3 -I -c` (Python 3.4+,
# names as bytes throughout) from descriptors of the target directory: no symbolic link
# at the target is ever followed (one on the way is an error for the item), no recursion
# or path-length limit (a tree 1,000 levels deep works).  argv: target_dir, mode, batch.
#   open:    creates .mstm-staging and .mstm-partial (mode 0700) and removes staging
#            batch directories of the exact shape mstm's batch ids have (never anything
#            else) in which nothing changed for a day (a killed sender's leftovers);
#   publish: stdin "F<relpath>\0" (file item) or "D<relpath>\0" (directory item); each
#            item is first planned (every conflict found, nothing changed but the staged
#            copy's mode bits), then applied: missing parents made with the staged
#            parents' modes, a file renamed over its final name, a directory merged (a
#            directory missing at the target renamed whole with RENAME_NOREPLACE, every
#            file or link renamed over a same-named non-directory, nothing else touched);
#            then one syncfs.  Answers "O|E\0relpath\0reason\0" per item.
#   discard: removes .mstm-staging/<batch> bottom-up from descriptors.
# Every run ends its answer with "MSTM-OK\n": anything else means it did not finish.
_STAGE_PY = r"""
import ctypes, errno, os, re, stat, sys, time
try:
    import resource
    _s, _h = resource.getrlimit(resource.RLIMIT_NOFILE)
    if _h == resource.RLIM_INFINITY or _h > _s:
        resource.setrlimit(resource.RLIMIT_NOFILE, (_h if _h != resource.RLIM_INFINITY
                                                    else 1 << 20, _h))
except (ImportError, ValueError, OSError):
    pass
CLOEXEC = getattr(os, "O_CLOEXEC", 0)
DIRF = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | CLOEXEC
REGF = os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | CLOEXEC
STAGING, PARTIAL = b".mstm-staging", b".mstm-partial"
OURS = re.compile(b"\\A[0-9]{8}T[0-9]{12}-[0-9a-f]{12}\\Z")
BATCH = re.compile(b"\\A[0-9A-Za-z][0-9A-Za-z_-]{0,63}\\Z")
DAY = 86400
out = sys.stdout.buffer
target, mode = os.fsencode(sys.argv[1]), sys.argv[2]
batch = os.fsencode(sys.argv[3]) if len(sys.argv) > 3 else b""

class Refused(Exception):
    pass

def lstat_at(fd, name):
    try:
        return os.stat(name, dir_fd=fd, follow_symlinks=False)
    except FileNotFoundError:
        return None

def clean_mode(fd, name, st):
    # setuid, setgid and sticky never survive (nor any bit above 0o777)
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
    # iterative, from descriptors, nothing followed: no depth or PATH_MAX limit
    st = lstat_at(pfd, name)
    if st is None:
        return
    if not stat.S_ISDIR(st.st_mode):
        os.unlink(name, dir_fd=pfd)
        return
    first = os.open(name, DIRF, dir_fd=pfd)
    stack = [[pfd, name, first, None]]
    try:
        while stack:
            top = stack[-1]
            if top[3] is None:
                try:
                    os.fchmod(top[2], 0o700)  # a read-only directory we made
                except OSError:
                    pass
                top[3] = os.listdir(top[2])
            if top[3]:
                n = top[3].pop()
                st = lstat_at(top[2], n)
                if st is None:
                    continue
                if stat.S_ISDIR(st.st_mode):
                    stack.append([top[2], n, os.open(n, DIRF, dir_fd=top[2]), None])
                else:
                    try:
                        os.unlink(n, dir_fd=top[2])
                    except FileNotFoundError:
                        pass
                continue
            stack.pop()
            os.close(top[2])
            try:
                os.rmdir(top[1], dir_fd=top[0])
            except FileNotFoundError:
                pass
    finally:
        for top in stack:
            os.close(top[2])

def newest(pfd, name):
    # the newest mtime in a tree (iterative, nothing followed)
    best = lstat_at(pfd, name).st_mtime
    stack = [os.open(name, DIRF, dir_fd=pfd)]
    todo = [os.listdir(stack[0])]
    try:
        while stack:
            if not todo[-1]:
                os.close(stack.pop())
                todo.pop()
                continue
            n = todo[-1].pop()
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
    try:
        os.mkdir(name, 0o700, dir_fd=tfd)
    except FileExistsError:
        pass
    fd = os.open(name, DIRF, dir_fd=tfd)
    try:
        if stat.S_IMODE(os.fstat(fd).st_mode) != 0o700:
            os.fchmod(fd, 0o700)
    except OSError:
        pass
    return fd

def do_open(tfd):
    # staging and partial directories, private; stale batches of killed senders removed
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
    # descend through real directories only (no link followed); missing -> None,
    # unless create gives the modes to make them with
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
                raise Refused("%s at the target is %s" % (
                    os.fsdecode(b"/".join(parts[:i + 1])),
                    "a symbolic link" if stat.S_ISLNK(st.st_mode) else "not a directory"))
            nfd = os.open(p, DIRF, dir_fd=fd)
            os.close(fd)
            fd = nfd
        return fd
    except BaseException:
        if fd is not None:
            try:
                os.close(fd)
            except OSError:
                pass
        raise

def kind(st):
    m = st.st_mode
    if stat.S_ISDIR(m):
        return "d"
    if stat.S_ISREG(m) or stat.S_ISLNK(m):
        return "f"
    return "x"

def plan(sfd, tfd, rel, is_dir):
    # What publishing one item takes, or Refused: nothing is changed here but the
    # staged copy's modes.  Returns (parents to create: [(part, mode)], moves: [(rel,
    # whole directory?)]).
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
            raise Refused("staged as something else than a %s" % ("directory" if is_dir
                                                                 else "regular file"))
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
        raise Refused("%s at the target is %s" % (os.fsdecode(rel), "a symbolic link"
                      if stat.S_ISLNK(tst.st_mode) else "not a directory"))
    return modes, check_tree(sfd, rel, tfd)

def check_tree(sfd, rel, tfd):
    # walk the staged tree (iteratively); compare with the target where it exists
    moves = []
    sroot = walk_to(sfd, rel.split(b"/"))
    troot = walk_to(tfd, rel.split(b"/")) if tfd is not None else None
    stack = [(rel, sroot, troot, os.listdir(sroot))]
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
                raise Refused("%s is not a regular file, directory or link"
                              % os.fsdecode(sub))
            clean_mode(s, n, st)
            tst = lstat_at(t, n) if t is not None else None
            if k == "d":
                nt = None
                if t is not None and tst is None:
                    moves.append((sub, True))
                elif tst is not None:
                    if not stat.S_ISDIR(tst.st_mode):
                        raise Refused("%s at the target is %s" % (os.fsdecode(sub),
                                      "a symbolic link" if stat.S_ISLNK(tst.st_mode)
                                      else "not a directory"))
                    nt = os.open(n, DIRF, dir_fd=t)
                ns = os.open(n, DIRF, dir_fd=s)
                stack.append((sub, ns, nt, os.listdir(ns)))
                continue
            if tst is not None and kind(tst) == "d":
                raise Refused("%s is a directory at the target" % os.fsdecode(sub))
            if t is not None:
                moves.append((sub, False))
    finally:
        for r, s, t, names in stack:
            os.close(s)
            if t is not None:
                os.close(t)
    return moves

try:
    _renameat2 = ctypes.CDLL(None, use_errno=True).renameat2
except (OSError, AttributeError):
    _renameat2 = None

def move(sd, td, name, noreplace):
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
    parts = rel.split(b"/")
    made = walk_to(tfd, parts[:-1], create=modes)
    os.close(made)
    cache = {}
    try:
        for m, whole in moves:
            mp = m.split(b"/")
            key = b"/".join(mp[:-1])
            if key not in cache:
                for fd in cache.values():
                    os.close(fd[0])
                    os.close(fd[1])
                cache.clear()
                sd = walk_to(sfd, mp[:-1])
                td = walk_to(tfd, mp[:-1])
                if sd is None or td is None:
                    raise Refused("%s vanished" % os.fsdecode(key))
                cache[key] = (sd, td)
            sd, td = cache[key]
            st = lstat_at(sd, mp[-1])
            if st is None:
                raise Refused("%s vanished from staging" % os.fsdecode(m))
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
        for fd in cache.values():
            os.close(fd[0])
            os.close(fd[1])

def do_publish(tfd):
    recs = sys.stdin.buffer.read().split(b"\0")
    answers = []
    try:
        stg = os.open(STAGING, DIRF, dir_fd=tfd)
        sfd = os.open(batch, DIRF, dir_fd=stg)
        os.close(stg)
    except OSError as e:
        sfd, why = None, "no staging directory: %s" % e.strerror
    for r in recs:
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

def do_discard(tfd):
    try:
        stg = os.open(STAGING, DIRF, dir_fd=tfd)
    except FileNotFoundError:
        return
    try:
        rmtree_at(stg, batch)
    finally:
        os.close(stg)

if batch and not BATCH.match(batch):
    sys.exit(4)
if mode == "open":
    os.makedirs(target, exist_ok=True)
tfd = os.open(target, os.O_RDONLY | os.O_DIRECTORY | CLOEXEC)
if mode == "open":
    do_open(tfd)
elif mode == "publish":
    do_publish(tfd)
elif mode == "discard":
    do_discard(tfd)
out.write(b"MSTM-OK\n")
out.flush()
"""

# The same without python3 at the target (POSIX sh and GNU find/coreutils).  Its checks
# are by path: between its `[ -L ]` test of a component and the `mv`/`mkdir` that uses
# it, a component swapped for a symbolic link (by the remote user or root at the target,
# the only ones who can write there) would be followed.  The python3 program has no such
# window.
_STAGE_SH = r"""
S=.mstm-staging
if [ "$2" = open ]; then mkdir -p -- "$1" || exit 3; fi
cd -- "$1" || exit 3
case "$3" in ''|*[!0-9A-Za-z_-]*) [ "$2" = open ] || exit 4;; esac
case "$2" in
open)
  for d in .mstm-partial "$S"; do [ -L "$d" ] || mkdir -p -m 700 -- "$d"; done
  [ -L "$S" ] || find "$S" -mindepth 1 -maxdepth 1 -type d -mmin +1440 \
      -regextype posix-extended -regex "$S/[0-9]{8}T[0-9]{12}-[0-9a-f]{12}" -print0 |
    xargs -0 -r sh -c 'for d do
      [ -z "$(find "$d" -mmin -1440 -print -quit)" ] && rm -rf -- "$d"; done' sh
  ;;
discard)
  [ -L "$S" ] || rm -rf -- "$S/$3"
  ;;
publish)
  if [ -L "$S" ] || [ -L "$S/$3" ]; then exit 3; fi
  t=$(mktemp) || exit 3
  trap 'rm -f "$t"' EXIT
  xargs -0 -r sh -c '
  s=$1 t=$2; shift 2
  onway() {  # a link, or a non-directory, among the existing components of $1
    p=""; r=$1
    while [ -n "$r" ]; do
      case $r in */*) c=${r%%/*}; r=${r#*/};; *) c=$r; r="";; esac
      p=${p:+$p/}$c
      if [ -L "$p" ] || { [ -e "$p" ] && [ ! -d "$p" ]; }; then return 0; fi
    done
    return 1
  }
  for a do
    k=${a%"${a#?}"} n=${a#?}
    case "/$n/" in *//*|*/./*|*/../*) printf "E\0%s\0bad name\0" "$n"; continue;; esac
    d=$(dirname -- "$n")
    if [ "$d" != . ] && onway "$d"; then
      printf "E\0%s\0a link or a file on the way at the target\0" "$n"; continue; fi
    if [ "$k" = F ]; then
      if [ -L "$s/$n" ] || [ ! -f "$s/$n" ] || { [ -d "$n" ] && [ ! -L "$n" ]; }; then
        printf "E\0%s\0type conflict\0" "$n"; continue; fi
      chmod a-st -- "$s/$n" && mkdir -p -- "$d" && mv -T -f -- "$s/$n" "$n" &&
        printf "O\0%s\0\0" "$n" || printf "E\0%s\0cannot move into place\0" "$n"
      continue
    fi
    if [ -L "$n" ] || { [ -e "$n" ] && [ ! -d "$n" ]; } || [ -L "$s/$n" ] || [ ! -d "$s/$n" ]; then
      printf "E\0%s\0type conflict\0" "$n"; continue; fi
    (cd -- "$s" && find "./$n" \( -type d -printf "d%p\0" \) -o \
        \( \( -type f -o -type l \) -printf "f%p\0" \) -o -printf "x%p\0") > "$t"
    bad=$(xargs -0 -r -a "$t" sh -c "for e do k=\${e%\"\${e#?}\"} p=\${e#?}
      case \$k in
        d) if [ -L \"\$p\" ] || { [ -e \"\$p\" ] && [ ! -d \"\$p\" ]; }; then echo x; fi;;
        f) if [ -d \"\$p\" ] && [ ! -L \"\$p\" ]; then echo x; fi;;
        *) echo x;;
      esac; done" sh)
    if [ -n "$bad" ]; then printf "E\0%s\0type conflict\0" "$n"; continue; fi
    chmod -R a-st -- "$s/$n" && mkdir -p -- "$d" &&
    xargs -0 -r -a "$t" sh -c "s=\$1; shift; for e do k=\${e%\"\${e#?}\"} p=\${e#?}
      if [ \$k = d ]; then
        [ -d \"\$p\" ] || mkdir -m \"\$(stat -c %a -- \"\$s/\$p\")\" -- \"\$p\" || exit 255
      else mv -T -f -- \"\$s/\$p\" \"\$p\" || exit 255; fi; done" sh "$s" &&
      printf "O\0%s\0\0" "$n" || printf "E\0%s\0cannot move into place\0" "$n"
  done' sh "$S/$3" "$t"
  sync -f -- . 2>/dev/null || sync
  ;;
esac
echo MSTM-OK
"""

# Runs the python3 program when the target has python3, else the sh one; stdin is kept
# in a file first so that either reads it whole.
_STAGE_SCRIPT = r"""
i=$(mktemp) || exit 3
trap 'rm -f "$i"' EXIT
cat > "$i"
if command -v python3 >/dev/null 2>&1; then
  python3 -I -c "$4" "$1" "$2" "$3" < "$i"
  exit $?
fi
sh -c "$5" sh "$1" "$2" "$3" < "$i"
"""


# Create one small file atomically: a hidden temporary name, then rename.
_PUT_SCRIPT = r"""
cd -- "$1" || exit 3
umask 027
t=".$2.tmp.$$"
cat > "$t" && mv -f -- "$t" "$2" || { rm -f -- "$t"; exit 1; }
"""

# Wait (up to $3 looks: 10 ms apart for the first 20, then 50 ms -- `_looks`) for a file
# to appear; print at most $4 bytes of it.
_AWAIT_SCRIPT = r"""
cd -- "$1" 2>/dev/null || exit 3
n=0
while [ ! -e "$2" ]; do
  n=$((n+1)); [ "$n" -gt "$3" ] && exit 4
  if [ "$n" -le 20 ]; then sleep 0.01; else sleep 0.05; fi
done
head -c "$4" -- "$2"
"""

# The whole handshake in one round trip (remote shells can be slow to start): create the
# control file atomically (from stdin, when $2 is set), wait up to $5 looks (as above)
# for the receipt $3, print at most $6 bytes of it, then create the thank-you $4 with
# content $7.  Exit 4: not there yet (call again with $2 empty).
_EXCHANGE_SCRIPT = r"""
cd -- "$1" 2>/dev/null || exit 3
umask 027
if [ -n "$2" ]; then
  t=".$2.tmp.$$"
  cat > "$t" && mv -f -- "$t" "$2" || { rm -f -- "$t"; exit 5; }
fi
n=0
while [ ! -e "$3" ]; do
  n=$((n+1)); [ "$n" -gt "$5" ] && exit 4
  if [ "$n" -le 20 ]; then sleep 0.01; else sleep 0.05; fi
done
head -c "$6" -- "$3" || exit 6
t=".$4.tmp.$$"
printf '%s' "$7" > "$t" && mv -f -- "$t" "$4"
exit 0
"""


class RsyncSsh:
    name = "rsync_ssh"

    def __init__(self, *, conn: SshConnection, source_dir: Path, target_dir: str,
                 rsync_cmd: str = "rsync", stall_seconds: float = 120.0, bwlimit: int = 0,
                 stop_file: str = ".stop", stop_dirs: Sequence[str] = (),
                 follow_symlinks: bool = False, stream_min: int | None = STREAM_MIN) -> None:
        self.conn = conn
        self.source_dir = source_dir
        self.target_dir = target_dir.rstrip("/") or "/"
        self.rsync_cmd = rsync_cmd
        self.stall_seconds = stall_seconds
        self.bwlimit = bwlimit
        self.stop_file = stop_file
        self.stop_dirs = list(stop_dirs) or [self.target_dir]
        # a stream of file items (never directory items) whose symbolic links are sent
        # as the files they point to; see rsync_argv
        self.follow_symlinks = follow_symlinks
        # file items of stream_min bytes or more go through stream.py (None: never)
        self.stream_min = stream_min
        self._can_stream = True  # until the target turns out to have no python3
        # (directory at the target, relpath) -> what the target reported having written
        self._streamed: dict[tuple[str, str], Streamed] = {}

    @property
    def partial_dir(self) -> str:
        """Where interrupted files wait for the next attempt (absolute: every batch has
        a staging directory of its own, and rsync resolves a relative one from there)."""
        return f"{self.target_dir.rstrip('/')}/{PARTIAL}"

    # -- connection -------------------------------------------------------------
    def open(self) -> None:
        fresh = not self.conn.alive()
        self.conn.open()
        if fresh:
            # staging and partial directories private (0700), killed senders'
            # leftovers removed; a failure here is not fatal (rsync --mkpath still works)
            r = self._stage("open", "")
            for line in r.stdout.splitlines():
                if line.startswith(b"R "):
                    log.info("removed a staging batch left for a day: %r", line[2:])
            if not r.stdout.endswith(b"MSTM-OK\n"):
                log.debug("preparing %s on the target: %s", self.target_dir,
                          _last_line(r.stderr))

    def _stage(self, mode: str, batch: str, names: bytes = b"", timeout: float = 600.0
               ) -> subprocess.CompletedProcess[bytes]:
        return self.conn.run(["sh", "-c", _STAGE_SCRIPT, "sh", self.target_dir, mode, batch,
                              _STAGE_PY, _STAGE_SH], input=names, timeout=timeout)

    def close(self) -> None:
        self.conn.close()

    def alive(self) -> bool:
        return self.conn.alive()

    # -- transfer ---------------------------------------------------------------
    def rsync_argv(self, dest: str, *, force: bool) -> list[str]:
        # Symbolic links: by default they travel as links (--links; in practice only
        # inside directory items, since the scanner never queues a link then).  With
        # follow_symlinks (file items only) a link is sent as the file it points to
        # (--copy-links), and nothing is recursed into (--no-dirs instead of
        # --recursive): a link turned into a link to a directory since the scan is
        # skipped by rsync, never copied as a whole tree.
        # Modes: --perms with --chmod=a-st (no setuid/setgid/sticky), never -o/-g/-D.
        links = (["--copy-links", "--no-dirs"] if self.follow_symlinks
                 else ["--recursive", "--links"])
        argv = [
            self.rsync_cmd,
            *links, "--perms", CHMOD, "--times",
            "--no-devices", "--no-specials",
            "--from0", "--files-from=-",
            "--secluded-args",
            "--mkpath",
            f"--partial-dir={self.partial_dir}",
            f"--timeout={max(1, int(self.stall_seconds))}",
            PROGRESS_FORMAT,
            "--rsh", self.conn.rsync_rsh(),
        ]
        if force:
            argv.append("--ignore-times")
        if self.bwlimit:
            argv.append(f"--bwlimit={self.bwlimit}")
        host = self.conn.target.host
        if ":" in host:
            host = f"[{host}]"
        argv += ["--", f"{self.source_dir}/", f"{host}:{dest}/"]
        return argv

    def send(self, items: Sequence[Item], *, progress: Progress | None = None,
             should_stop: ShouldStop | None = None, tick: Callable[[], None] | None = None,
             dest: str | None = None) -> SendResult:
        """Transfer *items* into *dest* (a staging batch directory, or the arrival
        monitor's): one rsync run, plus stream.py for large files.  Nothing is sent to
        a final name here; see the module's docstring."""
        if dest is None:
            raise ValueError("rsync_ssh sends into a staging (or incoming) directory only")
        dest = dest.rstrip("/") or "/"
        result = SendResult()
        items = list(items)
        big = [i for i in items if not i.is_dir and self.stream_min is not None
               and i.size >= self.stream_min and self._can_stream]
        if big:
            fallback = self._stream(big, dest, result, progress=progress,
                                    should_stop=should_stop, tick=tick)
            if result.stopped or not self.conn.alive():
                return result
            chosen = {id(i) for i in big}
            items = [i for i in items if id(i) not in chosen] + fallback
        if not items:
            return result
        r = self._run(items, dest, progress=progress, should_stop=should_stop, tick=tick,
                      done_files=result.files, done_bytes=result.bytes)
        result.files += r.files
        result.bytes += r.bytes
        if r.exit_code and not result.exit_code:
            result.exit_code, result.error = r.exit_code, r.error
        result.stopped = result.stopped or r.stopped
        if not r.stopped and (r.exit_code in CONNECTION_CODES or r.exit_code < 0):
            # stalled (30) or broken: never ask the target over this connection again
            # (it may hang until ssh's keepalive gives up); the sender sees it closed
            # and backs off without counting an attempt against the items
            self.conn.close()
        return result

    def _final_for(self, dest: str) -> str:
        """The target directory whose staging directory *dest* is ("" for another
        directory, e.g. the arrival monitor's): stream.py looks there for a file
        already complete under its final name."""
        base = self.target_dir.rstrip("/")
        return self.target_dir if dest.startswith(f"{base}/{STAGING}/") else ""

    def _stream(self, items: list[Item], dest: str, result: SendResult, *,
                progress: Progress | None, should_stop: ShouldStop | None,
                tick: Callable[[], None] | None) -> list[Item]:
        """Send large files one by one through stream.py; adds to *result*, returns the
        items to hand to rsync instead (the target refused to stream them)."""
        base = (result.files, result.bytes)
        fallback: list[Item] = []
        current: list[Stream] = []
        aborted: list[bool] = []

        def report(files: int, nbytes: int) -> None:
            assert progress is not None
            progress(base[0] + files, base[1] + nbytes)

        def abort() -> None:
            aborted.append(True)
            for s in current:
                s.abort()

        final = self._final_for(dest)
        part = self.partial_dir if final else ""

        def work(m: Monitor) -> SendResult:
            r = SendResult()
            try:
                root = safefs.open_root(self.source_dir)
            except OSError as err:
                r.exit_code, r.error = 23, f"cannot open the stream directory: {err.strerror}"
                return r
            try:
                return each(m, r, root)
            finally:
                os.close(root)

        def each(m: Monitor, r: SendResult, root: int) -> SendResult:
            for n, item in enumerate(items):
                if not self._can_stream:
                    fallback.extend(items[n:])
                    break
                s = Stream(self.conn)
                current[:] = [s]
                try:
                    got = s.send(root, item.relpath, dest=dest, force=item.force,
                                 monitor=m, chunk=chunk_size(self.bwlimit, largest=CHUNK),
                                 follow_symlinks=self.follow_symlinks, final=final,
                                 partial=part)
                except StreamUnavailable as err:
                    log.info("cannot stream large files to %s (%s); rsync sends them",
                             self.conn.target.host, err)
                    self._can_stream = False
                    fallback.extend(items[n:])
                    break
                except StreamItemError as err:
                    log.info("%r: not streamed (%s); rsync sends it",
                             os.fsencode(item.relpath), err)
                    fallback.append(item)
                    continue
                except StreamBroken as err:
                    r.exit_code, r.error = 12, f"stream: {err}"
                    break
                self._streamed[(dest, item.relpath)] = got
                if got.offset == got.size:
                    log.info("%r: already complete at the target; not sent again",
                             os.fsencode(item.relpath))
                elif got.offset:
                    log.info("%r: resumed at byte %d of %d", os.fsencode(item.relpath),
                             got.offset, got.size)
                m.file_done()
            r.files, r.bytes = m.files, m.bytes
            return r

        monitor = Monitor(progress=report if progress else None, throttle=Throttle(self.bwlimit))
        r = run_watched(work, monitor=monitor, stall_seconds=self.stall_seconds, abort=abort,
                        should_stop=should_stop, tick=tick)
        if aborted and not r.stopped:
            r.exit_code = 30  # like rsync's --timeout: the connection is not to be trusted
        result.files += r.files
        result.bytes += r.bytes
        if r.exit_code and not result.exit_code:
            result.exit_code, result.error = r.exit_code, r.error
        result.stopped = result.stopped or r.stopped
        if r.exit_code in CONNECTION_CODES:
            self.conn.close()
        return fallback

    def _run(self, items: Sequence[Item], dest: str, *, progress: Progress | None,
             should_stop: ShouldStop | None, tick: Callable[[], None] | None,
             done_files: int, done_bytes: int) -> SendResult:
        argv = self.rsync_argv(dest, force=any(i.force for i in items))
        names = b"".join(os.fsencode(i.relpath) + b"\0" for i in items)
        log.debug("rsync: %d items to %s", len(items), dest)
        run = run_rsync(argv, names, progress=progress, should_stop=should_stop, tick=tick,
                        done=(done_files, done_bytes))
        error = run.stderr_tail.decode("utf-8", "replace").strip()
        if run.exit_code:
            log.debug("rsync exited %s: %s", run.exit_code, error)
        return SendResult(files=run.files, bytes=run.sent_bytes,
                          error=_summarise(error, run.exit_code), exit_code=run.exit_code,
                          stopped=run.stopped)

    # -- verification -----------------------------------------------------------
    def inspect(self, relpaths: Sequence[str], *, staged: str | None = None
                ) -> dict[str, RemoteFile]:
        if not relpaths:
            return {}
        base = staging_dir(self.target_dir, staged) if staged else self.target_dir
        names = b"".join(os.fsencode(p) + b"\0" for p in relpaths)
        hints = [f"{got.size} {got.mtime_ns} {got.ino} {got.sha256}".encode() + b"\0"
                 + os.fsencode(p) + b"\0" for p in relpaths
                 if (got := self._streamed.pop((base, p), None)) is not None]
        if hints:
            names += b"/\0" + b"".join(hints)
        # the target reads every byte (and flushes them first): allow for a slow disk,
        # 20 MB/s, on top of a fixed 600 s and 10 ms a name (sizes from our own sources)
        timeout = 600.0 + len(relpaths) * 0.01 + self._local_bytes(relpaths) / 20e6
        r = self.conn.run(["sh", "-c", _INSPECT_SCRIPT, "sh", base, _HASH_PY], input=names,
                          timeout=timeout)
        if r.returncode == 7:
            # the target could not write its data back to disk: nothing it holds may be
            # trusted to survive a crash, so no source may go; the stream backs off
            raise TargetUnavailable(
                "cannot make the files durable at the target (syncfs failed): "
                + _last_line(r.stderr))
        return parse_inspect(r.stdout)

    def _local_bytes(self, relpaths: Sequence[str]) -> int:
        total = 0
        base = os.fsencode(self.source_dir)
        for p in relpaths:
            with contextlib.suppress(OSError):
                total += os.stat(os.path.join(base, os.fsencode(p))).st_size
        return total

    def publish(self, items: Sequence[Item], *, staged: str) -> dict[str, str]:
        """Move the verified *items* of batch *staged* into place (file: rename;
        directory: merge), then syncfs; {relpath: error} for those that were not."""
        if not items:
            return {}
        names = b"".join((b"D" if i.is_dir else b"F") + os.fsencode(i.relpath) + b"\0"
                         for i in items)
        r = self._stage("publish", staged, names,
                        timeout=600.0 + len(items) * 0.05)
        if not r.stdout.endswith(b"MSTM-OK\n"):
            why = f"publishing failed at the target: {_last_line(r.stderr)}"
            return {i.relpath: why for i in items}
        answers = parse_publish(r.stdout[:-len(b"MSTM-OK\n")])
        errors: dict[str, str] = {}
        for i in items:
            ok, why = answers.get(i.relpath, (False, "no answer from the target"))
            if not ok:
                errors[i.relpath] = why or "could not be moved into place at the target"
        return errors

    def discard(self, staged: str) -> None:
        """Remove what is left of batch *staged*'s staging directory (best effort)."""
        try:
            r = self._stage("discard", staged)
        except TargetUnavailable as err:
            log.info("could not remove staging batch %s: %s", staged, err)
            return
        if not r.stdout.endswith(b"MSTM-OK\n"):
            log.info("could not remove staging batch %s: %s", staged, _last_line(r.stderr))

    def put_file(self, directory: str, name: str, data: bytes) -> None:
        r = self.conn.run(["sh", "-c", _PUT_SCRIPT, "sh", directory, name], input=data,
                          timeout=120)
        if r.returncode != 0:
            raise OSError(f"cannot write {name} in {directory} on the target: "
                          f"{r.stderr.decode('utf-8', 'replace').strip()}")

    def await_file(self, directory: str, name: str, *, timeout: float, max_bytes: int,
                   tick: Callable[[], None] | None = None,
                   should_stop: ShouldStop | None = None) -> bytes | None:
        deadline = time.monotonic() + timeout
        while True:
            left = deadline - time.monotonic()
            if left <= 0 or (should_stop and should_stop()):
                return None
            # wait on the target in slices, so the watchdog and shutdown are served
            slice_ = min(left, 10.0)
            r = self.conn.run(["sh", "-c", _AWAIT_SCRIPT, "sh", directory, name,
                               str(_looks(slice_)), str(max_bytes)],
                              timeout=slice_ + 30)
            if r.returncode == 0:
                return r.stdout
            if tick:
                tick()

    def exchange(self, directory: str, *, put: tuple[str, bytes], await_name: str,
                 then_put: tuple[str, bytes], timeout: float, max_bytes: int,
                 tick: Callable[[], None] | None = None,
                 should_stop: ShouldStop | None = None) -> bytes | None:
        deadline = time.monotonic() + timeout
        first = True
        while True:
            left = deadline - time.monotonic()
            if left <= 0 or (should_stop and should_stop()):
                return None
            slice_ = min(left, 10.0)
            r = self.conn.run(
                ["sh", "-c", _EXCHANGE_SCRIPT, "sh", directory, put[0] if first else "",
                 await_name, then_put[0], str(_looks(slice_)), str(max_bytes),
                 then_put[1].decode("ascii")],
                input=put[1] if first else b"", timeout=slice_ + 30)
            if r.returncode == 5:
                raise OSError(f"cannot write {put[0]} in {directory} on the target: "
                              f"{r.stderr.decode('utf-8', 'replace').strip()}")
            first = False
            if r.returncode == 0:
                return r.stdout
            if tick:
                tick()

    def stop_file_present(self) -> str | None:
        for d in self.stop_dirs:
            r = self.conn.run(["test", "-e", f"{d}/{self.stop_file}"], timeout=30)
            if r.returncode == 0:
                return f"{self.stop_file} on target ({d})"
        return None


def parse_inspect(out: bytes) -> dict[str, RemoteFile]:
    """Parse the inspect script's output; anything malformed is simply not trusted."""
    sizes: dict[str, int] = {}
    hashes: dict[str, str] = {}
    records = out.split(b"\0")
    try:
        split = records.index(_SPLIT)
    except ValueError:
        return {}
    for rec in records[:split]:
        size, sep, name = rec.partition(b" ")
        if sep and size.isdigit():
            sizes[os.fsdecode(name)] = int(size)
    for rec in records[split + 1:]:
        if len(rec) > 66 and rec[64:66] in (b"  ", b" *"):
            digest = rec[:64].decode("ascii", "replace").lower()
            if all(c in "0123456789abcdef" for c in digest):
                hashes[os.fsdecode(rec[66:])] = digest
    return {name: RemoteFile(size=size, sha256=hashes.get(name)) for name, size in sizes.items()}


def parse_publish(out: bytes) -> dict[str, tuple[bool, str]]:
    """The publish program's answers: relpath -> (published, reason)."""
    recs = out.split(b"\0")
    found: dict[str, tuple[bool, str]] = {}
    for n in range(0, len(recs) - 2, 3):
        kind, rel, why = recs[n:n + 3]
        if kind in (b"O", b"E") and rel:
            found[os.fsdecode(rel)] = (kind == b"O", why.decode("utf-8", "replace")[:300])
    return found


def _looks(seconds: float) -> int:
    """How many looks the polling scripts make in about *seconds*: the first 20 are
    10 ms apart (a receipt usually comes quickly), the rest 50 ms."""
    if seconds <= 0.2:
        return max(1, int(seconds / 0.01))
    return 20 + int((seconds - 0.2) / 0.05)


def _last_line(data: bytes) -> str:
    lines = [ln.strip() for ln in data.decode("utf-8", "replace").splitlines() if ln.strip()]
    return lines[-1] if lines else "no reason given"


def _summarise(error: str, code: int | None) -> str:
    lines = [ln for ln in error.splitlines() if ln.strip()]
    meaningful = [ln for ln in lines if not ln.startswith("rsync error:")] or lines
    text = meaningful[-1] if meaningful else ""
    return f"rsync exit {code}: {text}" if code else text
