"""Publishing a verified item over a protocol that has paths but no descriptors (sftp, ftp).

Both move an item from its staging batch into place with the same rules (local.py's,
see base.Transport.publish): every directory above the item is made where missing and
must not be a link; a file item is renamed over its final name unless a directory has
that name; a directory item is *merged* -- a directory the target lacks is renamed in
whole, into an existing one each file is renamed over a same-named non-directory, and
nothing else there is touched -- after a first walk that looks for every type conflict
and, if it finds one, fails the item with nothing changed.

What differs between the protocols (how a type is learnt, how a file replaces another)
is behind :class:`TargetTree`; paths are bytes for sftp and str for ftp.
"""

from __future__ import annotations

import os
from typing import Protocol, TypeVar

from mstm import safefs
from mstm.transports.base import Item
from mstm.transports.common import ItemProblem

P = TypeVar("P", str, bytes)


class TargetTree(Protocol[P]):
    """The operations on the target that publishing needs."""

    # what `rename` raises when the server refuses (the new name exists, say)
    refused: tuple[type[Exception], ...]

    def kind(self, path: P) -> str | None:
        """"d" (directory), "f" (regular file), "l" (symbolic link), "o" (anything else)
        or None (missing) for *path*, never following a link."""

    def entries(self, directory: P) -> dict[str, str]:
        """name -> kind (as `kind`) of the entries of *directory*."""

    def child(self, directory: P, name: str) -> P:
        """The path of entry *name* of *directory*."""

    def path(self, base: P, relpath: str) -> P:
        """The path of *relpath* below *base*."""

    def ensure_dir(self, path: P, shown: str) -> None:
        """*path* is a directory (made if missing), not a link; else ItemProblem naming
        *shown*."""

    def rename(self, src: P, dst: P) -> None:
        """Rename *src* to *dst*, which does not exist (a directory moved in whole)."""

    def replace(self, src: P, dst: P) -> None:
        """Rename file *src* over *dst* (atomically where the server can)."""


def publish_item(tree: TargetTree[P], item: Item, *, stage: P, target: P) -> None:
    """Move *item* from the staging directory *stage* into *target*; ItemProblem (with
    nothing changed for a conflict found beforehand) when it may not be."""
    parts = safefs.split(item.relpath)
    parent = target
    for part in parts[:-1]:
        parent = tree.child(parent, os.fsdecode(part))
        tree.ensure_dir(parent, item.relpath)
    src = tree.path(stage, item.relpath)
    dst = tree.path(target, item.relpath)
    if item.is_dir:
        problems = merge(tree, src, dst, item.relpath, apply=False)
        if problems:
            raise ItemProblem("; ".join(problems[:3]))
        problems = merge(tree, src, dst, item.relpath, apply=True)
        if problems:
            raise ItemProblem("changed at the target during the merge: " +
                              "; ".join(problems[:3]))
    else:
        if tree.kind(dst) == "d":
            raise ItemProblem(f"{item.relpath}: the target has a directory where the item "
                              f"has a file; left as it is")
        tree.replace(src, dst)


def merge(tree: TargetTree[P], src: P, dst: P, relpath: str, *, apply: bool) -> list[str]:
    """Merge staged directory *src* into *dst*; with *apply* False only look for
    conflicts.  Iterative.  The conflicts, in words."""
    problems: list[str] = []
    todo = [(src, dst, relpath)]
    while todo:
        s, d, rel = todo.pop()
        kind = tree.kind(d)
        if kind is None:
            if not apply:
                continue
            try:
                tree.rename(s, d)
                continue
            except tree.refused:
                kind = tree.kind(d)  # made meanwhile?
                if kind is None:
                    raise
        if kind != "d":
            what = "a symbolic link" if kind == "l" else "a file"
            problems.append(f"{rel}: the target has {what} where the item has a directory; "
                            f"left as it is")
            continue
        there = tree.entries(d)
        for name, ckind in sorted(tree.entries(s).items()):
            cs, cd = tree.child(s, name), tree.child(d, name)
            crel = f"{rel}/{name}"
            if ckind == "d":
                todo.append((cs, cd, crel))
            elif ckind == "f":
                if there.get(name) == "d":
                    problems.append(f"{crel}: the target has a directory where the item has "
                                    f"a file; left as it is")
                elif apply:
                    tree.replace(cs, cd)
    return problems
