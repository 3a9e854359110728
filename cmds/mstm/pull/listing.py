"""The remote listing of a pull stream, and the checks every remote name passes.

One remote command (:func:`listing_argv`, GNU find) lists the whole tree below
source_dir, NUL-separated; :func:`parse_listing` turns it into one :class:`RemoteItem`
per entry directly inside source_dir, with the signature of its tree.  Remote names
are untrusted: :func:`refuse_name` says why one is never fetched, :func:`item_path`
builds a local path only from a name that passed, proven to lie directly inside its
folder.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from mstm.errors import TargetUnavailable

MAX_NAME_BYTES = 255
_NUMBER = re.compile(rb"\d+(\.\d+)?")


class ListingError(TargetUnavailable):
    """The remote listing failed or could not be trusted."""


@dataclass(frozen=True)
class RemoteItem:
    """One entry directly inside source_dir, with what its tree looked like."""

    raw: bytes  # the name as the remote host gave it
    kind: str  # find's %y of the entry itself: d, f, l, ... ("" if it was not listed)
    entries: int  # entries in its tree, itself included
    bytes: int  # total size of its regular files
    mtime: float  # newest mtime in its tree
    mtime_text: str  # the same, exactly as listed

    @property
    def name(self) -> str:
        return os.fsdecode(self.raw)

    @property
    def signature(self) -> str:
        return f"entries={self.entries} bytes={self.bytes} mtime={self.mtime_text}"


def listing_argv(source_dir: str) -> list[str]:
    """The remote command: every entry below source_dir, four NUL-terminated fields each
    (path relative to source_dir, type, mtime, size).  GNU find on the remote host."""
    return ["env", "LC_ALL=C", "find", "-H", source_dir.rstrip("/") + "/", "-mindepth", "1",
            "-printf", "%P\\0%y\\0%T@\\0%s\\0"]


def parse_listing(out: bytes) -> list[RemoteItem]:
    """The items of a listing, in name order; a malformed record rejects it all."""
    fields_ = out.split(b"\0")
    if fields_ and fields_[-1] == b"":
        fields_.pop()
    if len(fields_) % 4:
        raise ListingError("malformed remote listing (not four fields per entry)")
    acc: dict[bytes, list[Any]] = {}  # name -> [kind, entries, bytes, mtime, mtime_text]
    for i in range(0, len(fields_), 4):
        path, kind, mtime, size = fields_[i:i + 4]
        if not path or not _NUMBER.fullmatch(mtime) or not size.isdigit() or len(kind) != 1:
            raise ListingError(f"malformed remote listing (entry {i // 4 + 1})")
        top, sep, _rest = path.partition(b"/")
        a = acc.setdefault(top, ["", 0, 0, -1.0, "0"])
        if not sep:
            a[0] = kind.decode("ascii", "replace")
        a[1] += 1
        if kind == b"f":
            a[2] += int(size)
        value = float(mtime)
        if value > a[3]:
            a[3], a[4] = value, mtime.decode("ascii")
    return [RemoteItem(raw=name, kind=a[0], entries=a[1], bytes=a[2], mtime=a[3],
                       mtime_text=a[4]) for name, a in sorted(acc.items())]


def refuse_name(raw: bytes) -> str | None:
    """Why a remote name is never fetched, or None if it is safe to use as a file name."""
    if not raw:
        return "empty name"
    if len(raw) > MAX_NAME_BYTES:
        return f"name longer than {MAX_NAME_BYTES} bytes"
    if b"/" in raw or b"\0" in raw:
        return "name holds '/' or NUL"
    if raw.startswith(b"."):
        return "name starts with '.'"
    try:
        name = raw.decode("utf-8")
    except UnicodeDecodeError:
        return "name is not UTF-8"
    if not name.isprintable():
        return "name holds a control or unprintable character"
    return None


def item_path(folder: Path, raw: bytes) -> Path:
    """*folder*/NAME, proven to lie directly inside *folder* (the name was checked)."""
    if refuse_name(raw) is not None:
        raise ValueError(f"unsafe name {raw!r}")
    path = Path(os.path.normpath(os.path.join(folder, os.fsdecode(raw))))
    if path.parent != Path(os.path.normpath(folder)):
        raise ValueError(f"{raw!r} escapes {folder}")
    return path
