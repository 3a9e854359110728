"""The house's layers (docs/design.md, Layout): which package may import which.

Read from the source with ast, so a new import that runs the wrong way fails here, not
in a reader's head.
"""

from __future__ import annotations

import ast
from collections import defaultdict
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[2] / "cmds" / "mstm"

# The pieces everything may use; they use no stage.
SHARED = {"errors", "log", "notify", "runloop", "safefs", "openfiles", "watch", "backoff",
          "pause", "protocol", "config", "humanize", "smallfiles"}

# What each stage may import besides SHARED.  Nothing imports cli.
ALLOWED: dict[str, set[str]] = {
    "spool": set(),
    "scan": {"spool"},
    "transports": set(),
    "send": {"scan", "spool", "transports"},
    "receive": set(),
    "pull": {"send", "transports"},
    "diskwatch": {"spool"},
    "alert": set(),
    # every stream at a glance: reads what the stages keep; only the command line uses it
    "overview": {"spool", "pull", "receive", "diskwatch", "send"},
}


def _top(module: str) -> str | None:
    parts = module.split(".")
    return parts[1] if len(parts) > 1 and parts[0] == "mstm" else None


def import_graph() -> dict[str, set[str]]:
    """{top-level name below mstm: the top-level names its modules import}."""
    graph: dict[str, set[str]] = defaultdict(set)
    for path in PACKAGE.rglob("*.py"):
        if "remote" in path.relative_to(PACKAGE).parts:
            continue  # programs for a target: they import nothing of mstm (checked below)
        own = path.relative_to(PACKAGE).parts[0].removesuffix(".py")
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            names: list[str] = []
            if isinstance(node, ast.ImportFrom) and node.module:
                names = [node.module]
                if node.module == "mstm":
                    names = [f"mstm.{a.name}" for a in node.names]
            elif isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            for name in names:
                top = _top(name)
                if top and top != own and top != "__version__":
                    graph[own].add(top)
    return graph


def test_no_package_imports_one_that_imports_it() -> None:
    graph = import_graph()
    state: dict[str, int] = {}

    def visit(node: str, path: list[str]) -> None:
        state[node] = 1
        for nxt in sorted(graph.get(node, ())):
            assert state.get(nxt) != 1, f"import cycle: {' -> '.join([*path, node, nxt])}"
            if nxt not in state:
                visit(nxt, [*path, node])
        state[node] = 2

    for node in sorted(graph):
        if node not in state:
            visit(node, [])


def test_each_stage_imports_only_the_stages_before_it_and_the_shared_pieces() -> None:
    graph = import_graph()
    for stage, allowed in ALLOWED.items():
        wrong = graph.get(stage, set()) - allowed - SHARED
        assert not wrong, f"mstm.{stage} imports {sorted(wrong)}"


def test_the_shared_pieces_import_no_stage() -> None:
    graph = import_graph()
    for piece in SHARED:
        wrong = graph.get(piece, set()) - SHARED
        assert not wrong, f"mstm.{piece} imports {sorted(wrong)}"


def test_only_the_command_line_imports_the_overview() -> None:
    graph = import_graph()
    assert sorted(name for name, deps in graph.items() if "overview" in deps) == ["cli"]


def test_nothing_imports_the_command_line() -> None:
    graph = import_graph()
    assert [name for name, deps in graph.items() if "cli" in deps] == []


def test_the_programs_run_at_a_target_import_nothing_of_mstm() -> None:
    for path in (PACKAGE / "transports" / "remote").glob("*.py"):
        if path.name == "__init__.py":
            continue
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, ast.ImportFrom):
                assert not (node.module or "").startswith("mstm"), path.name
            elif isinstance(node, ast.Import):
                assert not any(a.name.startswith("mstm") for a in node.names), path.name
