"""The shape of the code, checked on the code: the import graph has no circles and points down
the stages (pipeline -> budgets -> exporters -> runtime), functions stay short, CLI commands only
parse, call and print, and the model contract (I/O names, crop -> model input) is defined once.

Every checker also runs on a small made-up package that breaks its rule, so none can pass by
finding nothing.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

FLM = Path(__file__).resolve().parents[1] / "flm"
STAGES = ("flm.pipeline", "flm.budgets", "flm.exporters", "flm.runtime")  # in order; others are shared or top
MAX_FUNCTION_LINES, MAX_COMMAND_BODY_LINES = 60, 25


def modules(root: Path) -> dict[str, Path]:
    package = root.name
    found = {}
    for path in root.rglob("*.py"):
        parts = (package, *path.relative_to(root).with_suffix("").parts)
        found[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
    return found


def imports(root: Path) -> dict[str, set[str]]:
    """{module: the package modules it imports}, deferred (in-function) imports included."""
    mods = modules(root)
    graph = {m: set() for m in mods}
    for name, path in mods.items():
        package = name if path.name == "__init__.py" else name.rpartition(".")[0]
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:
                    up = package.split(".")[: len(package.split(".")) - node.level + 1]
                    base = ".".join(up + ([base] if base else []))
                targets = [f"{base}.{a.name}" if f"{base}.{a.name}" in mods else base for a in node.names]
            elif isinstance(node, ast.Import):
                targets = [a.name for a in node.names]
            else:
                continue
            graph[name] |= {t for t in targets if t in mods and t != name}
    return graph


def circles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected groups of more than one module (Tarjan)."""
    index, low, stack, on, found = {}, {}, [], set(), []

    def visit(v):
        index[v] = low[v] = len(index)
        stack.append(v)
        on.add(v)
        for w in graph[v]:
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            group = []
            while True:
                w = stack.pop()
                on.discard(w)
                group.append(w)
                if w == v:
                    break
            if len(group) > 1:
                found.append(sorted(group))

    for v in graph:
        if v not in index:
            visit(v)
    return found


def stage_of(module: str, stages=STAGES) -> int | None:
    return next((k for k, s in enumerate(stages) if module == s or module.startswith(s + ".")), None)


def upward_imports(graph, stages=STAGES) -> list[str]:
    """Imports from an earlier stage into a later one's code (e.g. runtime code by the pipeline), and
    any stage importing the command line."""
    bad = []
    for m, targets in graph.items():
        for t in targets:
            a, b = stage_of(m, stages), stage_of(t, stages)
            if (a is not None and b is not None and b > a) or (a is not None and t.endswith(".cli")):
                bad.append(f"{m} -> {t}")
    return bad


def is_command(fn: ast.FunctionDef) -> bool:
    """A CLI command: its parameters are declared with typer.Option / typer.Argument."""
    return any("typer." in ast.unparse(d) for d in [*fn.args.defaults, *fn.args.kw_defaults] if d is not None)


def long_functions(root: Path) -> list[str]:
    too_long = []
    for path in root.rglob("*.py"):
        for fn in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if not isinstance(fn, (ast.FunctionDef, ast.AsyncFunctionDef)):
                continue
            total = fn.end_lineno - fn.lineno + 1
            body = fn.body[1:] if ast.get_docstring(fn) else fn.body
            body_lines = body[-1].end_lineno - body[0].lineno + 1 if body else 0
            if total > MAX_FUNCTION_LINES or (is_command(fn) and body_lines > MAX_COMMAND_BODY_LINES):
                too_long.append(f"{path.name}:{fn.name} ({total} lines, body {body_lines})")
    return too_long


def definitions(root: Path, names: set[str]) -> dict[str, list[str]]:
    """{name: modules that define it (a module-level assignment or a function)}."""
    found = {n: [] for n in names}
    for mod, path in modules(root).items():
        for node in ast.parse(path.read_text(encoding="utf-8")).body:
            targets = ([t.id for t in node.targets if isinstance(t, ast.Name)] if isinstance(node, ast.Assign)
                       else [node.target.id] if isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name)
                       else [node.name] if isinstance(node, ast.FunctionDef) else [])
            for t in targets:
                if t in found:
                    found[t].append(mod)
    return found


# --------------------------------------------------------------------------- flm itself


def test_no_import_circles():
    assert circles(imports(FLM)) == []


def test_imports_point_down_the_stages():
    graph = imports(FLM)
    assert any(stage_of(t) == 0 for t in graph["flm.exporters.commands"] | graph["flm.exporters.parity"])
    assert upward_imports(graph) == []


def test_runtime_needs_no_training_export_or_cli_code():
    graph = imports(FLM)
    runtime = {t for m, ts in graph.items() if stage_of(m) == 3 for t in ts}
    assert runtime and not {t for t in runtime if stage_of(t) in (0, 1, 2) or t == "flm.cli"}


def test_functions_are_short_and_commands_thin():
    assert long_functions(FLM) == []


def test_the_model_contract_is_defined_once():
    names = {"INPUT", "LANDMARKS", "HEATMAPS", "CONFIDENCE", "INPUT_NAME", "to_model_input", "swap_channels",
             "scheme_index"}
    found = definitions(FLM, names)
    assert found["to_model_input"] == ["flm.geometry"] and found["swap_channels"] == ["flm.geometry"]
    assert {n: m for n, m in found.items() if n not in ("to_model_input", "swap_channels", "INPUT_NAME")} == \
        {n: ["flm.spec"] for n in names - {"to_model_input", "swap_channels", "INPUT_NAME"}}
    assert found["INPUT_NAME"] == []


# --------------------------------------------------------------------------- negative controls


@pytest.fixture()
def bad_package(tmp_path):
    """A package that breaks every rule once."""
    root = tmp_path / "flm"
    for folder in ("pipeline", "runtime"):
        (root / folder).mkdir(parents=True)
        (root / folder / "__init__.py").write_text("")
    (root / "__init__.py").write_text("")
    (root / "a.py").write_text("def f():\n    from flm import b\n")
    (root / "b.py").write_text("from . import a\nINPUT = 'input'\n")
    (root / "pipeline" / "train.py").write_text("from flm.runtime import player\n")
    (root / "runtime" / "player.py").write_text("INPUT = 'x'\n" + "def long():\n" + "    x = 1\n" * 70)
    (root / "cli.py").write_text("import typer\n\ndef cmd(a: int = typer.Option(1)):\n    '''doc'''\n"
                                 + "    a += 1\n" * 30)
    return root


def test_the_checkers_find_what_they_look_for(bad_package):
    graph = imports(bad_package)
    assert circles(graph) == [["flm.a", "flm.b"]]
    assert upward_imports(graph) == ["flm.pipeline.train -> flm.runtime.player"]
    assert sorted(long_functions(bad_package)) == ["cli.py:cmd (32 lines, body 30)", "player.py:long (71 lines, body 70)"]
    assert sorted(definitions(bad_package, {"INPUT"})["INPUT"]) == ["flm.b", "flm.runtime.player"]
