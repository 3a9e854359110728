"""The target's hasher for sftp's `inspect`, run over the connection's exec channel.

``python3 -I -c <this file> <directory>``, the names (relative to the directory)
NUL-separated on stdin.  First one syncfs of the directory's filesystem (os.sync where
syncfs is missing), so that what is answered is durable; with no names that is all it
does (sftp's `publish` runs it so).  The answer, NUL-separated: "mstm-inspect 1", then
"D 0 - name" per directory and "F size sha256 name" per regular file (anything else,
or missing, is left out), then "end".  Every name is reached from the directory's
descriptor with O_NOFOLLOW: no symbolic link is followed.  Standard library only,
Python 3.4+ (types in comments, for mypy only).
"""

import hashlib
import os
import stat
import sys

# Types are in comments, for mypy only: typing is not imported at run time (3.5+; ruff does
# not read type comments, vermin does not know MYPY is False here).
MYPY = False
if MYPY:  # pragma: no cover
    from typing import List, Optional  # noqa: F401  # novm

D = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | getattr(os, "O_CLOEXEC", 0)


def syncfs(fd):
    # type: (int) -> None
    try:
        import ctypes

        ctypes.CDLL(None).syncfs(fd)
    except Exception:
        os.sync()


def record(root, rel):
    # type: (int, bytes) -> Optional[bytes]
    """The answer's record for *rel* below *root*, or None (missing, not a normalised
    relative path, neither a directory nor a regular file, a link on the way)."""
    parts = rel.split(b"/")
    if not rel or any(p in (b"", b".", b"..") for p in parts):
        return None
    fds = []  # type: List[int]
    try:
        cur = root
        for p in parts[:-1]:
            cur = os.open(p, D, dir_fd=cur)
            fds.append(cur)
        st = os.stat(parts[-1], dir_fd=cur, follow_symlinks=False)
        if stat.S_ISDIR(st.st_mode):
            return b"D 0 - " + rel
        if stat.S_ISREG(st.st_mode):
            fd = os.open(parts[-1], os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK, dir_fd=cur)
            fds.append(fd)
            h = hashlib.sha256()
            n = 0
            while True:
                b = os.read(fd, 1 << 20)
                if not b:
                    break
                h.update(b)
                n += len(b)
            return b"F " + str(n).encode() + b" " + h.hexdigest().encode() + b" " + rel
    except OSError:
        pass
    finally:
        for f in fds:
            os.close(f)
    return None


def answer(root, names):
    # type: (int, bytes) -> bytes
    """The whole answer for the NUL-separated *names* below *root*."""
    out = [b"mstm-inspect 1"]
    for rel in names.split(b"\0"):
        rec = record(root, rel)
        if rec is not None:
            out.append(rec)
    out.append(b"end")
    return b"\0".join(out) + b"\0"


def main(argv):
    # type: (List[str]) -> None
    w = sys.stdout.buffer.write
    try:
        root = os.open(os.fsencode(argv[1]), os.O_RDONLY | os.O_DIRECTORY)
    except OSError:
        w(b"mstm-inspect 1\0end\0")
        sys.exit(0)
    syncfs(root)
    w(answer(root, sys.stdin.buffer.read()))


if __name__ == "__main__":
    main(sys.argv)
