"""docs/design.md can be followed in the tree: every `file.py: name` it cites exists.

The design page names files and the functions in them along the path of a transfer; a
rename that forgets the page fails here instead of misleading the next reader.
"""

from __future__ import annotations

import ast
import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
PACKAGE = ROOT / "cmds" / "mstm"
DESIGN = ROOT / "docs" / "design.md"

# `send/sender.py: Sender.run_once`, `transports/rsync.py: transfer_argv, run_rsync`,
# `runloop.py`, `tests/unit/test_layers.py`
CITED = re.compile(r"`((?:[\w]+/)*[\w]+\.(?:py|sh))(?::\s*([\w.]+(?:,\s*[\w.]+)*))?`")


def _defined(path: Path) -> set[str]:
    """Top-level functions and classes of *path*, and Class.method for their methods."""
    names: set[str] = set()
    for node in ast.parse(path.read_text(encoding="utf-8")).body:
        if isinstance(node, (ast.FunctionDef, ast.ClassDef)):
            names.add(node.name)
        if isinstance(node, ast.ClassDef):
            names.update(f"{node.name}.{item.name}" for item in node.body
                         if isinstance(item, (ast.FunctionDef, ast.AsyncFunctionDef)))
    return names


def _resolve(cited: str) -> Path | None:
    for base in (PACKAGE, PACKAGE / "transports", ROOT):
        if (base / cited).is_file():
            return base / cited
    return None


def test_every_file_and_name_the_design_page_cites_exists() -> None:
    text = DESIGN.read_text(encoding="utf-8")
    cited = CITED.findall(text)
    assert len(cited) > 30, "the design page should walk the tree file by file"
    missing: list[str] = []
    for file, names in cited:
        path = _resolve(file)
        if path is None:
            missing.append(file)
            continue
        if names and path.suffix == ".py":
            defined = _defined(path)
            missing += [f"{file}: {n}" for n in re.split(r",\s*", names) if n not in defined]
    assert not missing, f"docs/design.md cites what the tree does not have: {missing}"


def test_every_class_and_method_the_design_page_cites_is_defined() -> None:
    """`Sender._deliver`, `Receiver._on_thanks`, ...: some class of that name in the
    package defines that method."""
    methods: dict[str, set[str]] = {}
    for path in PACKAGE.rglob("*.py"):
        for name in _defined(path):
            cls, _, method = name.partition(".")
            if method:
                methods.setdefault(cls, set()).add(method)
    cited = re.findall(r"`([A-Z]\w+)\.(\w+)`", DESIGN.read_text(encoding="utf-8"))
    assert len(cited) > 5
    missing = [f"{c}.{m}" for c, m in cited if m not in methods.get(c, set())]
    assert not missing, f"docs/design.md cites methods the tree does not have: {missing}"


def test_the_layout_names_every_package_of_the_tree() -> None:
    text = DESIGN.read_text(encoding="utf-8")
    packages = sorted(p.name for p in PACKAGE.iterdir()
                      if p.is_dir() and (p / "__init__.py").exists())
    absent = [p for p in packages if f"  {p}/" not in text]
    assert not absent, f"docs/design.md's layout lacks {absent}"
