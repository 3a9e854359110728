"""The target's side of stream.py: one large file from stdin, hashed and flushed as it comes.

Run at the target as ``python3 -I -c <this file>`` over ssh.  stdin brings a header
line "MSTM-STREAM-2 <8 numbers>" (the lengths of the destination directory, relative
path, final directory and partial directory, then size, mode, mtime_ns and force),
those four names as data, and -- after this program answered "OFFSET <n>" -- the file's
bytes from offset n.  The answer ends with "DONE <sha256> <size> <mtime_ns> <inode>"
once the file is flushed and renamed into the destination directory; "AT <n>" lines
say it is still alive, "BUSY" that an earlier transfer of this file still runs here,
"ERROR <why>" an item problem.  stream.py's docstring tells the whole story (temporary
name, resume, the complete copy under its final name).

Exit 0 after DONE; 1 after ERROR or BUSY (the caller may fall back to rsync after an
ERROR); 2 when the data ended early (the sender went away: the partial file is kept,
flushed).  Names stay bytes throughout; standard library only, Python 3.4+ (types in
comments, for mypy only).
"""

import collections
import contextlib
import ctypes
import fcntl
import hashlib
import os
import queue
import stat
import sys
import threading

# Types are in comments, for mypy only: typing is not imported at run time (3.5+; ruff does
# not read type comments, vermin does not know MYPY is False here).
MYPY = False
if MYPY:  # pragma: no cover
    from typing import Any, List, NamedTuple, NoReturn, Optional, Tuple  # noqa: F401  # novm

MAGIC = b"MSTM-STREAM-2"
CHUNK, STEP, XATTR = 1 << 20, 8 << 20, "user.mstm.version"
DIRF = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC


if MYPY:  # pragma: no cover
    Header = NamedTuple("Header", [
        ("dest", bytes),  # the directory the file goes to (absolute)
        ("rel", bytes),  # its path relative to dest
        ("final", bytes),  # where a complete copy may already be ("" = nowhere)
        ("part", bytes),  # the partial directory ("" = beside the file)
        ("size", int),
        ("mode", int),
        ("mtime_ns", int),
        ("force", bool),  # start from zero, look for no complete copy
    ])
else:  # the same fields (tests/unit/test_transport_remote.py)
    Header = collections.namedtuple(
        "Header", ["dest", "rel", "final", "part", "size", "mode", "mtime_ns", "force"])


def say(*words):
    # type: (*bytes) -> None
    out = sys.stdout.buffer
    out.write(b" ".join(words) + b"\n")
    out.flush()


def fail(why):
    # type: (str) -> NoReturn
    say(b"ERROR", why.encode("utf-8", "replace").replace(b"\n", b" "))
    sys.exit(1)


def readn(n):
    # type: (int) -> bytes
    """*n* bytes of stdin, unbuffered (os.read): nothing read ahead of the data can be
    lost.  Exit 2 at its end."""
    data = b""
    while len(data) < n:
        more = os.read(0, n - len(data))
        if not more:
            sys.exit(2)
        data += more
    return data


def read_header():
    # type: () -> Header
    """The header from stdin; ERROR for a malformed one or a name refused."""
    line = b""
    while not line.endswith(b"\n") and len(line) < 256:
        line += readn(1)
    head = line.split()
    if len(head) != 9 or head[0] != MAGIC or not all(w.isdigit() for w in head[1:]):
        fail("bad header")
    ldest, lrel, lfinal, lpart, size, mode, mtime_ns, force = [int(w) for w in head[1:]]
    h = Header(readn(ldest), readn(lrel), readn(lfinal), readn(lpart), size, mode,
               mtime_ns, bool(force))
    if not refused(h):
        return h
    fail("refused name")


def refused(h):
    # type: (Header) -> bool
    """Is a name of *h* unacceptable (not absolute, not relative, NUL, "..")?"""
    parts = h.rel.split(b"/")
    return not h.dest.startswith(b"/") or h.rel.startswith(b"/") or \
        b"\0" in h.dest + h.rel + h.final + h.part or \
        any(p in (b"", b".", b"..") for p in parts) or \
        any(d and not d.startswith(b"/") for d in (h.final, h.part))


def open_parent(dest, parts):
    # type: (bytes, List[bytes]) -> int
    """The directory the file goes to, made where missing (no link followed below
    *dest*)."""
    try:
        os.makedirs(dest, exist_ok=True)
        dfd = os.open(dest, os.O_RDONLY | os.O_DIRECTORY)
        for p in parts[:-1]:
            with contextlib.suppress(FileExistsError):
                os.mkdir(p, 0o777, dir_fd=dfd)
            nfd = os.open(p, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW, dir_fd=dfd)
            os.close(dfd)
            dfd = nfd
    except OSError as e:
        fail("cannot make the directory: %s" % (e.strerror,))
    return dfd


def temp_place(h, dfd, base):
    # type: (Header, int, bytes) -> Tuple[int, bytes]
    """Where the partial data waits: (directory descriptor, name).  In the target's
    partial directory (private, shared by every batch: an interrupted file resumes in
    the next batch) under a name derived from the final directory and the relative
    path; else (no partial directory) beside the file."""
    if h.part:
        tmp = b"." + hashlib.sha256((h.final or h.dest) + b"\0" + h.rel).hexdigest()[:40] \
            .encode() + b".mstm-stream"
        try:
            with contextlib.suppress(FileExistsError):
                os.mkdir(h.part, 0o700)
            return os.open(h.part, DIRF), tmp
        except OSError as e:
            fail("cannot open the partial directory: %s" % (e.strerror,))
    base_tmp = base[:150] + hashlib.sha256(base).hexdigest()[:16].encode() \
        if len(base) > 200 else base
    return dfd, b"." + base_tmp + b".mstm-stream"


def already_here(h, dfd, pfd, tmp):
    # type: (Header, int, int, bytes) -> bool
    """The file under its final name (in *final*, reached with no link followed) is this
    version, complete (a cut came between its publication and our answer, or the same
    version is sent again): hash it, flush it, hard-link it into the destination
    directory (the sender verifies and publishes that name: a rename onto itself) and
    answer without a transfer."""
    if not h.final:
        return False
    parts = h.rel.split(b"/")
    base = parts[-1]
    try:
        qfd = os.open(h.final, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
        try:
            for p in parts[:-1]:
                nfd = os.open(p, DIRF, dir_fd=qfd)
                os.close(qfd)
                qfd = nfd
            ffd = os.open(base, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK, dir_fd=qfd)
        except OSError:
            os.close(qfd)
            return False
    except OSError:
        return False
    try:
        fst = os.fstat(ffd)
        if not stat.S_ISREG(fst.st_mode) or (fst.st_size, fst.st_mtime_ns) != \
                (h.size, h.mtime_ns):
            return False
        hh = hashlib.sha256()
        buf = bytearray(CHUNK)
        done = 0
        while True:
            k = os.readv(ffd, [buf])
            if not k:
                break
            hh.update(memoryview(buf)[:k])
            done += k
            if done % (64 << 20) == 0:
                say(b"AT", str(done).encode())  # still alive
        os.fsync(ffd)
        fst = os.fstat(ffd)
        if fst.st_size != h.size:
            return False
        if fst.st_mode & 0o7000:
            os.fchmod(ffd, stat.S_IMODE(fst.st_mode) & 0o777)
        with contextlib.suppress(FileNotFoundError):
            os.unlink(base, dir_fd=dfd)
        os.link(base, base, src_dir_fd=qfd, dst_dir_fd=dfd, follow_symlinks=False)
        lst = os.stat(base, dir_fd=dfd, follow_symlinks=False)
        if (lst.st_dev, lst.st_ino) != (fst.st_dev, fst.st_ino):
            return False
        os.fsync(dfd)
    except OSError:
        return False
    finally:
        os.close(ffd)
        os.close(qfd)
    with contextlib.suppress(OSError):
        os.unlink(tmp, dir_fd=pfd)  # any partial copy of it is garbage now
    say(b"OFFSET", str(h.size).encode())
    say(b"DONE", hh.hexdigest().encode(), str(fst.st_size).encode(),
        str(fst.st_mtime_ns).encode(), str(fst.st_ino).encode())
    return True


def resume(h, fd, hasher):
    # type: (Header, int, Any) -> int
    """How many bytes of the temporary file *fd* are kept (hashed into *hasher*): those
    of an interrupted transfer of the same version, re-read (never trusted)."""
    version = ("%s %s" % (h.size, h.mtime_ns)).encode()
    have = 0
    if not h.force:
        try:
            if os.getxattr(fd, XATTR) == version:
                have = min(os.fstat(fd).st_size, h.size)
        except OSError:
            have = 0
    buf = bytearray(CHUNK)
    view = memoryview(buf)
    got = 0
    while got < have:
        k = os.readv(fd, [view[:min(CHUNK, have - got)]])
        if not k:
            break
        hasher.update(view[:k])
        got += k
        if got % (64 << 20) == 0:
            say(b"AT", str(got).encode())  # still alive: re-reading a large partial file
    have = got
    try:
        os.ftruncate(fd, have)
        os.lseek(fd, have, os.SEEK_SET)
    except OSError as e:
        fail("cannot prepare the temporary file: %s" % (e.strerror,))
    with contextlib.suppress(OSError):  # no user xattrs here: an interruption restarts
        os.setxattr(fd, XATTR, version)
    return have


def _sync_file_range():
    # type: () -> Any
    try:
        sfr = ctypes.CDLL(None, use_errno=True).sync_file_range
        sfr.argtypes = [ctypes.c_int, ctypes.c_longlong, ctypes.c_longlong, ctypes.c_uint]
        return sfr
    except (OSError, AttributeError):
        return None


def receive(h, fd, hasher, have):
    # type: (Header, int, Any, int) -> Tuple[int, List[OSError]]
    """Write stdin's next ``size - have`` bytes to *fd* (hashed, their writeback started
    every STEP bytes) from a writer thread; (bytes missing at the end of the data,
    the write errors)."""
    sfr = _sync_file_range()
    with contextlib.suppress(OSError, ValueError):
        fcntl.fcntl(0, 1031, CHUNK)  # F_SETPIPE_SZ: fewer, larger reads from sshd
    say(b"OFFSET", str(have).encode())
    q = queue.Queue(8)  # type: queue.Queue[Optional[bytes]]
    err = []  # type: List[OSError]

    def writer():
        # type: () -> None
        pos, flushed, said = have, have, have
        while True:
            data = q.get()
            if data is None:
                return
            if err:
                continue
            try:
                mv = memoryview(data)
                while mv:
                    mv = mv[os.write(fd, mv):]
                hasher.update(data)
                pos += len(data)
                if pos - flushed >= STEP:
                    # start writeback of the new range; wait for the one before it, so
                    # at most ~2 steps are dirty and the final fdatasync is short
                    if sfr is not None:
                        sfr(fd, flushed, pos - flushed, 2)
                        if flushed - have >= STEP:
                            sfr(fd, flushed - STEP, STEP, 1 | 2 | 4)
                    else:
                        os.fdatasync(fd)
                    flushed = pos
                if pos - said >= 64 << 20:
                    say(b"AT", str(pos).encode())
                    said = pos
            except OSError as e:
                err.append(e)

    t = threading.Thread(target=writer)
    t.start()
    left = h.size - have
    while left > 0:
        data = os.read(0, min(CHUNK, left))
        if not data:
            break
        left -= len(data)
        q.put(data)
    q.put(None)
    t.join()
    return left, err


def main():
    # type: () -> None
    h = read_header()
    parts = h.rel.split(b"/")
    base = parts[-1]
    dfd = open_parent(h.dest, parts)
    pfd, tmp = temp_place(h, dfd, base)
    try:
        fd = os.open(tmp, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600,
                     dir_fd=pfd)
    except OSError as e:
        fail("cannot create the temporary file: %s" % (e.strerror,))
    if not stat.S_ISREG(os.fstat(fd).st_mode):
        fail("the temporary name is not a regular file")
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        say(b"BUSY")  # an earlier transfer of this file still runs here: not an item error
        sys.exit(1)
    if not h.force and already_here(h, dfd, pfd, tmp):
        sys.exit(0)
    hasher = hashlib.sha256()
    have = resume(h, fd, hasher)
    left, err = receive(h, fd, hasher, have)
    if err:
        with contextlib.suppress(OSError):
            os.unlink(tmp, dir_fd=pfd)  # a full disk should not stay full of a partial file
        fail("cannot write: %s" % (err[0].strerror,))
    if left:
        os.fdatasync(fd)  # keep what came, for the next attempt
        sys.exit(2)
    try:
        os.fdatasync(fd)
        os.fchmod(fd, h.mode & 0o777)  # never setuid, setgid or sticky
        os.utime(fd, ns=(h.mtime_ns, h.mtime_ns))
        with contextlib.suppress(OSError):
            os.removexattr(fd, XATTR)
        os.rename(tmp, base, src_dir_fd=pfd, dst_dir_fd=dfd)
        os.fsync(dfd)
        st = os.fstat(fd)
    except OSError as e:
        fail("cannot finish: %s" % (e.strerror,))
    say(b"DONE", hasher.hexdigest().encode(), str(st.st_size).encode(),
        str(st.st_mtime_ns).encode(), str(st.st_ino).encode())


if __name__ == "__main__":
    main()
