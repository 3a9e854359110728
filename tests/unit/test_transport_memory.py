"""The memory transport keeps the Transport contract (transports/base.py), and agrees with
the local transport on a real file system: the sender's tests against it mean something."""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

import pytest

from mstm.errors import TargetUnavailable
from mstm.protocol import new_batch_id
from mstm.transports.base import Item, RemoteFile, TransportOptions, staging_dir
from mstm.transports.local import Local
from mstm.transports.memory import MemoryTransport


def make(tmp_path: Path) -> tuple[MemoryTransport, Path]:
    src = tmp_path / "src"
    src.mkdir()
    t = MemoryTransport(TransportOptions(source_dir=src, target_dir="/t"))
    t.open()
    return t, src


def test_a_batch_is_staged_inspected_published_and_discarded(tmp_path: Path) -> None:
    t, src = make(tmp_path)
    (src / "d").mkdir()
    (src / "d" / "a.dat").write_bytes(b"x" * 10)
    batch = new_batch_id()
    r = t.send([Item("d/a.dat", 10)], dest=staging_dir("/t", batch))
    assert (r.files, r.bytes, r.error) == (1, 10, "")
    assert t.final_files() == {}  # nothing under its final name before publish
    got = t.inspect(["d/a.dat", "d", "missing"], staged=batch)
    assert got == {"d/a.dat": RemoteFile(10, hashlib.sha256(b"x" * 10).hexdigest()),
                   "d": RemoteFile(0, None)}
    assert t.publish([Item("d/a.dat", 10)], staged=batch) == {}
    t.discard(batch)
    assert t.final_files() == {"d/a.dat": b"x" * 10}
    assert t.staged() == []
    assert t.inspect(["d/a.dat"])["d/a.dat"].size == 10


def test_nothing_is_followed_at_the_source_or_at_the_target(tmp_path: Path) -> None:
    t, src = make(tmp_path)
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "a.dat").write_bytes(b"secret")
    (src / "sub").symlink_to(tmp_path / "out")
    r = t.send([Item("sub/a.dat", 6)], dest=staging_dir("/t", "b1"))
    assert "sub/a.dat" in r.item_errors and t.staged() == [".mstm-staging/b1"]
    t.symlink("l", "/t/real")
    t.put("real/f", b"1")
    assert t.inspect(["l/f", "real/f"]).keys() == {"real/f"}


def test_faults_and_the_connection(tmp_path: Path) -> None:
    t, src = make(tmp_path)
    for n in ("a", "b"):
        (src / n).write_bytes(n.encode())
    t.faults.unreachable = "refused"
    with pytest.raises(TargetUnavailable, match="refused"):
        t.open()
    assert not t.alive()
    t.faults.unreachable = None
    t.open()
    t.faults.die_in_send = 1
    r = t.send([Item("a", 1), Item("b", 1)], dest=staging_dir("/t", "b1"))
    assert r.error and not t.alive() and t.staged() == [".mstm-staging/b1", ".mstm-staging/b1/a"]
    with pytest.raises(TargetUnavailable):
        t.inspect(["a"], staged="b1")
    t.open()
    t.faults.corrupt.add("a")
    t.faults.drop.add("b")
    t.send([Item("a", 1), Item("b", 1)], dest=staging_dir("/t", "b2"))
    got = t.inspect(["a", "b"], staged="b2")
    assert got.keys() == {"a"} and got["a"].sha256 != hashlib.sha256(b"a").hexdigest()
    t.faults.publish_errors["a"] = "EIO"
    assert t.publish([Item("a", 1)], staged="b2") == {"a": "EIO"}
    seen: list[str] = []
    t.faults.between = lambda: seen.append("hook")
    t.send([Item("a", 1)], dest=staging_dir("/t", "b3"))
    t.inspect(["a"], staged="b3")
    t.inspect(["a"], staged="b3")
    assert seen == ["hook"]  # once per batch


def test_the_stop_file_and_the_small_files(tmp_path: Path) -> None:
    t, _src = make(tmp_path)
    assert t.stop_file_present() is None
    t.put(".stop", b"")
    assert t.stop_file_present()
    t.put_file("/in", "c.ctl", b"control")
    assert t.await_file("/in", "c.ctl", timeout=0, max_bytes=3) == b"con"
    assert t.await_file("/in", "none", timeout=0.02, max_bytes=3) is None


# -- the same publish on a real file system (the local transport) and in memory ---------
SCENARIOS: dict[str, tuple[dict[str, str | None], list[tuple[str, str]]]] = {
    "file_over_file": ({"f": "old"}, [("f", "file")]),
    "file_where_dir": ({"f/x": "in a dir"}, [("f", "file")]),
    "file_below_a_file": ({"p": "a file"}, [("p/f", "file")]),
    "dir_merged": ({"d/keep": "k", "d/a": "old a", "d/s/": None}, [("d", "dir")]),
    "dir_where_file": ({"d": "a file"}, [("d", "dir")]),
    "file_in_dir_where_target_has_dir": ({"d/a/x": "deep"}, [("d", "dir")]),
    "dir_in_dir_where_target_has_file": ({"d/s": "a file"}, [("d", "dir")]),
    "link_on_the_way": ({"d": "->/elsewhere"}, [("d", "dir")]),
    "link_replaced_by_file": ({"f": "->nowhere"}, [("f", "file")]),
}


def _source(src: Path) -> None:
    (src / "f").write_bytes(b"new f")
    (src / "p").mkdir()
    (src / "p" / "f").write_bytes(b"new p/f")
    (src / "d" / "s").mkdir(parents=True)
    (src / "d" / "a").write_bytes(b"new a")
    (src / "d" / "s" / "b").write_bytes(b"new b")
    (src / "d" / "e").mkdir()


def _tree(top: Path) -> dict[str, str | None]:
    out: dict[str, str | None] = {}
    for d, dirs, names in os.walk(top):
        rel = os.path.relpath(d, top)
        if rel.startswith(".mstm-staging"):
            continue
        for n in dirs:
            p = Path(d) / n
            if p.is_symlink():
                out[os.path.normpath(f"{rel}/{n}")] = "->" + os.readlink(p)
            elif not n.startswith(".mstm-staging"):
                out[os.path.normpath(f"{rel}/{n}") + "/"] = None
        for n in names:
            p = Path(d) / n
            out[os.path.normpath(f"{rel}/{n}")] = ("->" + os.readlink(p) if p.is_symlink()
                                                  else p.read_bytes().decode())
    return out


def _memory_tree(t: MemoryTransport) -> dict[str, str | None]:
    out: dict[str, str | None] = {rel: data.decode() for rel, data in t.final_files().items()}
    out.update({d + "/": None for d in t.final_dirs()})
    out.update({p[len(t.target_dir) + 1:]: "->" + to for p, to in t.links.items()})
    return out


@pytest.mark.parametrize("name", sorted(SCENARIOS))
def test_publish_agrees_with_the_local_transport(tmp_path: Path, name: str) -> None:
    before, items = SCENARIOS[name]
    src, dst = tmp_path / "src", tmp_path / "dst"
    src.mkdir()
    dst.mkdir()
    _source(src)
    mem = MemoryTransport(TransportOptions(source_dir=src, target_dir=str(dst)))
    for rel, what in before.items():
        path = dst / rel.rstrip("/")
        path.parent.mkdir(parents=True, exist_ok=True)
        if what is None:
            path.mkdir()
            mem.mkdir(rel.rstrip("/"))
        elif what.startswith("->"):
            path.symlink_to(what[2:])
            mem.symlink(rel, what[2:])
        else:
            path.write_bytes(what.encode())
            mem.put(rel, what.encode())
    assert _memory_tree(mem) == _tree(dst)
    its = [Item(rel, 0, kind == "dir") for rel, kind in items]
    results = []
    for t in (Local(TransportOptions(source_dir=src, target_dir=str(dst))), mem):
        t.open()
        batch = new_batch_id()
        r = t.send(its, dest=staging_dir(str(dst), batch))
        assert not r.item_errors
        results.append(set(t.publish(its, staged=batch)))
        t.discard(batch)
    assert results[0] == results[1], "the memory transport's publish errs where Local does not"
    assert _memory_tree(mem) == _tree(dst)
