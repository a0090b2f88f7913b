"""The shape of the code: no import cycle inside dast/, no function with more than 8 parameters."""

from __future__ import annotations

import ast
from pathlib import Path

DAST = Path(__file__).resolve().parents[1] / "dast"
MAX_PARAMS = 8


def _modules() -> dict[str, Path]:
    out = {}
    for f in DAST.rglob("*.py"):
        parts = list(f.relative_to(DAST.parent).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts = parts[:-1]
        out[".".join(parts)] = f
    return out


def _resolve(name: str, mods: dict[str, Path]) -> str | None:
    while name and name not in mods:
        name = name.rpartition(".")[0]
    return name or None


def import_graph() -> dict[str, set[str]]:
    """Module -> the dast modules it imports anywhere (top level, TYPE_CHECKING blocks, functions)."""
    mods = _modules()
    graph: dict[str, set[str]] = {}
    for mod, path in mods.items():
        deps: set[str | None] = set()
        package = mod if path.name == "__init__.py" else mod.rpartition(".")[0]
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, ast.Import):
                deps.update(_resolve(a.name, mods) for a in node.names if a.name.split(".")[0] == "dast")
            elif isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:
                    up = package
                    for _ in range(node.level - 1):
                        up = up.rpartition(".")[0]
                    base = f"{up}.{base}" if base else up
                if base.split(".")[0] != "dast":
                    continue
                for a in node.names:
                    full = f"{base}.{a.name}"
                    deps.add(_resolve(full, mods) if full in mods else _resolve(base, mods))
        graph[mod] = {d for d in deps if d is not None and d != mod}
    return graph


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected components with more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in sorted(graph.get(v, ())):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                found.append(sorted(comp))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return found


def test_the_cycle_finder_finds_a_cycle() -> None:
    assert cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]
    assert cycles({"a": {"b"}, "b": set()}) == []


def test_no_import_cycle_inside_dast() -> None:
    graph = import_graph()
    assert "dast.training.loop" in graph["dast.training.pipeline"]  # the graph sees real imports
    assert cycles(graph) == []


def _counted_params(fn: ast.FunctionDef | ast.AsyncFunctionDef) -> list[str]:
    """Parameters that count: all but self/cls and keyword-only config objects (``...Config``)."""
    a = fn.args
    names = [x.arg for x in a.posonlyargs + a.args if x.arg not in ("self", "cls")]
    names += [x.arg for x in a.kwonlyargs if not (x.annotation is not None and "Config" in ast.unparse(x.annotation))]
    names += [f"*{a.vararg.arg}"] if a.vararg else []
    names += [f"**{a.kwarg.arg}"] if a.kwarg else []
    return names


def test_no_function_in_dast_takes_more_than_eight_parameters() -> None:
    long = []
    for path in sorted(DAST.rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)) and len(_counted_params(node)) > MAX_PARAMS:
                long.append(f"{path.relative_to(DAST.parent)}:{node.lineno} {node.name}")
    assert long == []


def test_the_parameter_count_skips_self_and_keyword_only_configs() -> None:
    fn = ast.parse("def f(self, a, b=1, *args, c, cfg: SelfTrainingConfig, **kw): pass").body[0]
    assert isinstance(fn, ast.FunctionDef)
    assert _counted_params(fn) == ["a", "b", "c", "*args", "**kw"]
