"""The target's hasher for rsync_ssh's `inspect`: sizes and sha256 of the named files.

Run at the target by ``inspect.sh`` as ``python3 -I -c <this file> <names file>`` in the
directory the names are relative to.  The names file holds NUL-separated names; after
a record "/" (never a relative path) come pairs "size mtime_ns inode digest", name:
what stream_receiver.py reported for a file it wrote, whose digest is answered without
reading the file only while its size, mtime and inode are still those.

The answer: "size name\\0" per name (lstat, like stat(1)), the split mark, then
"digest  name\\0" per regular file (as ``sha256sum -z`` prints it), all in one write at
the end so that a failure leaves nothing half-said (inspect.sh then falls back to
sha256sum).  Names stay bytes throughout, 1 MiB reads go into one buffer, and each name
is reached from the directory's descriptor, no symbolic link followed.  Standard
library only, Python 3.4+ (types in comments, for mypy only).
"""

import hashlib
import os
import stat
import sys

# Types are in comments, for mypy only: typing is not imported at run time (3.5+; ruff does
# not read type comments, vermin does not know MYPY is False here).
MYPY = False
if MYPY:  # pragma: no cover
    from typing import Dict, List, Optional, Tuple  # noqa: F401  # novm

SPLIT = b"--mstm-split--"
DIRF = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW

def read_request(data):
    # type: (bytes) -> Tuple[List[bytes], Dict[bytes, Tuple[int, int, int, bytes]]]
    """The names to answer for, and the digests stream_receiver.py reported."""
    recs = data.split(b"\0")
    cut = recs.index(b"/") if b"/" in recs else len(recs)
    names, extra = [n for n in recs[:cut] if n], recs[cut + 1:]
    known = {}  # type: Dict[bytes, Tuple[int, int, int, bytes]]
    for i in range(0, len(extra) - 1, 2):
        w = extra[i].split()
        if len(w) == 4 and all(x.isdigit() for x in w[:3]):
            known[extra[i + 1]] = (int(w[0]), int(w[1]), int(w[2]), w[3])
    return names, known


class _Parents:
    """The last parent directory reached (path, descriptor): names come sorted by
    directory, so most names reuse it."""

    def __init__(self, here):
        # type: (int) -> None
        self.here = here
        self.key = None  # type: Optional[bytes]
        self.fd = None  # type: Optional[int]

    def parent(self, n):
        # type: (bytes) -> Tuple[int, bytes]
        parts = n.split(b"/")
        if any(p in (b"", b".", b"..") for p in parts):
            raise OSError("not a normalised relative path")
        key = b"/".join(parts[:-1])
        if self.key != key or self.fd is None:
            self.close()
            fd = os.open(b".", DIRF, dir_fd=self.here)
            try:
                for p in parts[:-1]:  # no symbolic link followed on the way
                    nfd = os.open(p, DIRF, dir_fd=fd)
                    os.close(fd)
                    fd = nfd
            except OSError:
                os.close(fd)
                raise
            self.key, self.fd = key, fd
        return self.fd, parts[-1]

    def close(self):
        # type: () -> None
        if self.fd is not None:
            os.close(self.fd)
        self.key = self.fd = None


def answer(here, names, known):
    # type: (int, List[bytes], Dict[bytes, Tuple[int, int, int, bytes]]) -> bytes
    """Sizes, the split mark and digests of *names* below the directory *here*."""
    sizes = []  # type: List[bytes]
    sums = []  # type: List[bytes]
    buf = bytearray(1 << 20)
    view = memoryview(buf)
    parents = _Parents(here)
    try:
        for n in names:
            try:
                pfd, base = parents.parent(n)
                st = os.stat(base, dir_fd=pfd, follow_symlinks=False)
                sizes.append(str(st.st_size).encode() + b" " + n + b"\0")
                k = known.get(n)
                if k and stat.S_ISREG(st.st_mode) and \
                        (st.st_size, st.st_mtime_ns, st.st_ino) == k[:3]:
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
                    got = os.readv(fd, [buf])
                    if not got:
                        break
                    h.update(view[:got])
                sums.append(h.hexdigest().encode() + b"  " + n + b"\0")
            except OSError:
                continue
            finally:
                os.close(fd)
    finally:
        parents.close()
    return b"".join(sizes) + SPLIT + b"\0" + b"".join(sums)


def main(argv):
    # type: (List[str]) -> None
    with open(argv[1], "rb") as f:
        names, known = read_request(f.read())
    here = os.open(b".", DIRF)
    out = sys.stdout.buffer
    out.write(answer(here, names, known))
    out.flush()


if __name__ == "__main__":
    main(sys.argv)
