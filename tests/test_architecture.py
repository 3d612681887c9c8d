"""The module graph stays a tree-like DAG: no import circle among align/ modules, counting imports inside functions
(docs/architecture.md)."""

import ast
from pathlib import Path

from conftest import ROOT


def module_graph() -> dict[str, set[str]]:
    files = {}
    for f in (ROOT / "align").rglob("*.py"):
        parts = f.relative_to(ROOT).with_suffix("").parts
        name = ".".join(parts[:-1] if parts[-1] == "__init__" else parts)
        files[name] = f
    graph = {}
    for name, f in files.items():
        deps = set()
        for node in ast.walk(ast.parse(f.read_text())):
            if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("align"):
                for alias in node.names:
                    full = f"{node.module}.{alias.name}"
                    deps.add(full if full in files else node.module)
            elif isinstance(node, ast.Import):
                deps |= {a.name for a in node.names if a.name.startswith("align")}
        graph[name] = {d for d in deps if d in files and d not in (name, "align")}
    return graph


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    found, done = [], set()

    def visit(node, path):
        for nxt in sorted(graph[node]):
            if nxt in path:
                found.append(path[path.index(nxt):] + [nxt])
            elif nxt not in done:
                visit(nxt, path + [nxt])
        done.add(node)

    for node in sorted(graph):
        if node not in done:
            visit(node, [node])
    return found


def test_no_import_circle_among_align_modules():
    graph = module_graph()
    assert "align.stages.sft" in graph and "align.runs" in graph["align.stages.sft"]
    assert cycles(graph) == []


def test_the_cycle_finder_finds_a_cycle():
    assert cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == [["a", "b", "c", "a"]]
    assert cycles({"a": {"b"}, "b": set()}) == []


# issue #31: each file readable in one sitting, each function on one screen
MAX_FILE_LINES, MAX_FUNCTION_LINES = 400, 60


def test_files_and_functions_stay_short():
    too_long = []
    for f in sorted((ROOT / "align").rglob("*.py")):
        text = f.read_text()
        name = f.relative_to(ROOT)
        if len(text.splitlines()) > MAX_FILE_LINES:
            too_long.append(f"{name}: {len(text.splitlines())} lines")
        for node in ast.walk(ast.parse(text)):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                length = node.end_lineno - node.lineno + 1
                if length > MAX_FUNCTION_LINES:
                    too_long.append(f"{name}:{node.lineno} {node.name}: {length} lines")
    assert too_long == [], f"over {MAX_FILE_LINES} lines a file or {MAX_FUNCTION_LINES} a function: {too_long}"


def test_stages_import_no_other_stage_and_not_the_cli():
    graph = module_graph()
    stages = {m for m in graph if m.startswith("align.stages.")}
    bad = {m: sorted(d for d in graph[m] if d in stages or d == "align.__main__") for m in stages}
    assert {m: d for m, d in bad.items() if d} == {}
    library = [m for m in graph if not m.startswith("align.stages") and m != "align.__main__"]
    assert not [m for m in library if "align.__main__" in graph[m]]
