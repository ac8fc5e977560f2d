"""The package's import structure: `run.py --help` loads no torch, and flmm_model has no import cycle."""

from __future__ import annotations

import ast
import json
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
PACKAGE = REPO / "flmm_model"

# Runs in a fresh interpreter: every help text (top level, then each command) is printed, and after each the heavy
# libraries must still be absent from sys.modules.
_HELP_SCRIPT = """
import json, sys
sys.path.insert(0, {repo!r})
import run
report = []
for argv in [["--help"]] + [[name, "--help"] for name in run.COMMANDS]:
    status = run.cli(argv)
    report.append({{"argv": argv, "status": status,
                    "loaded": sorted(m for m in ("torch", "transformers") if m in sys.modules)}})
print("REPORT " + json.dumps(report))
"""


def test_every_help_answers_without_torch_or_transformers():
    done = subprocess.run([sys.executable, "-c", _HELP_SCRIPT.format(repo=str(REPO))], cwd=REPO,
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    report_line = [line for line in done.stdout.splitlines() if line.startswith("REPORT ")]
    assert len(report_line) == 1, done.stdout[-2000:]
    report = json.loads(report_line[0].removeprefix("REPORT "))
    commands = {"train", "eval", "predict", "chat", "demo", "convert-sam", "cache-sam", "cache-lmm",
                "pretrain-lmm"}
    assert {entry["argv"][0] for entry in report[1:]} == commands
    for entry in report:
        assert entry["status"] == 0, entry
        assert entry["loaded"] == [], f"run.py {' '.join(entry['argv'])} imported {entry['loaded']}"
    # The help texts were printed: the top-level one lists the commands, each command's its own usage line.
    assert "usage: run.py" in done.stdout
    for name in commands:
        assert f"usage: run.py {name}" in done.stdout, name
    assert "config keys (type, default)" in done.stdout  # the schema epilog (config_loader) was built


def _module_name(path: Path) -> str:
    parts = list(path.relative_to(REPO).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def _modules() -> dict[str, Path]:
    return {_module_name(path): path for path in sorted(PACKAGE.rglob("*.py"))}


def _is_type_checking(test: ast.expr) -> bool:
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING")


def _lazy_exports(tree: ast.AST) -> dict[str, str]:
    """A package `__init__`'s module-level `_EXPORTS = {"Name": "flmm_model.module", ...}` (its lazy names)."""
    for node in getattr(tree, "body", []):
        if (isinstance(node, ast.Assign) and any(isinstance(t, ast.Name) and t.id == "_EXPORTS" for t in node.targets)
                and isinstance(node.value, ast.Dict)):
            pairs = zip(node.value.keys, node.value.values, strict=True)
            return {ast.literal_eval(k): ast.literal_eval(v) for k, v in pairs}
    return {}


def _imports(tree: ast.AST, *, module: str, is_package: bool, known: set[str],
             lazy: dict[str, dict[str, str]] | None = None) -> set[str]:
    """flmm_model modules that `module` imports anywhere (module level, functions, classes), except under
    `if TYPE_CHECKING:`. `from a import b` counts as an import of `a.b` when that is a module, of the module that
    defines `b` when `a` exports it lazily (`lazy[a][b]`, from its `_EXPORTS`), else of `a`."""
    lazy = lazy or {}
    found: set[str] = set()
    package = module if is_package else module.rpartition(".")[0]

    def visit(node: ast.AST) -> None:
        if isinstance(node, ast.If) and _is_type_checking(node.test):
            for child in node.orelse:
                visit(child)
            return
        if isinstance(node, ast.Import):
            for alias in node.names:
                if alias.name in known:
                    found.add(alias.name)
        elif isinstance(node, ast.ImportFrom):
            if node.level:  # relative import
                base_parts = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join(base_parts + ([node.module] if node.module else []))
            else:
                base = node.module or ""
            for alias in node.names:
                if f"{base}.{alias.name}" in known:
                    found.add(f"{base}.{alias.name}")
                elif alias.name in lazy.get(base, {}):
                    found.add(lazy[base][alias.name])
                elif base in known:
                    found.add(base)
        for child in ast.iter_child_nodes(node):
            visit(child)

    visit(tree)
    found.discard(module)
    return found


def import_graph() -> dict[str, set[str]]:
    """module -> the flmm_model modules it imports (see `_imports`)."""
    trees = {name: ast.parse(path.read_text(), filename=str(path)) for name, path in _modules().items()}
    lazy = {name: _lazy_exports(tree) for name, tree in trees.items()}
    return {name: _imports(tree, module=name, is_package=_modules()[name].name == "__init__.py", known=set(trees),
                           lazy=lazy)
            for name, tree in trees.items()}


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One cycle of the graph as [a, b, ..., a], or None when it is acyclic (iterative depth-first search)."""
    state: dict[str, int] = {}  # 1 = on the current path, 2 = done
    for root in sorted(graph):
        if state.get(root):
            continue
        path = [root]
        stack = [iter(sorted(graph[root]))]
        state[root] = 1
        while stack:
            child = next(stack[-1], None)
            if child is None:
                state[path.pop()] = 2
                stack.pop()
            elif state.get(child) == 1:
                return path[path.index(child):] + [child]
            elif not state.get(child):
                state[child] = 1
                path.append(child)
                stack.append(iter(sorted(graph.get(child, ()))))
    return None


def test_cycle_finder_on_hand_made_graphs():
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": set()}) is None
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b", "c"}, "b": {"c"}, "c": set(), "d": {"d2"}, "d2": {"d"}}) == ["d", "d2", "d"]


def test_import_graph_sees_function_level_and_submodule_imports(tmp_path):
    source = ("from typing import TYPE_CHECKING\n"
              "from flmm_model import data\n"
              "from flmm_model.data import Collator\n"
              "if TYPE_CHECKING:\n    from flmm_model.model import FrozenQwenSAM\n"
              "def f():\n    import flmm_model.metrics\n    from flmm_model.recipes import train\n")
    known = {"flmm_model", "flmm_model.data", "flmm_model.model", "flmm_model.metrics", "flmm_model.recipes",
             "flmm_model.recipes.train"}
    found = _imports(ast.parse(source), module="flmm_model.x", is_package=False, known=known)
    assert found == {"flmm_model.data", "flmm_model.metrics", "flmm_model.recipes.train"}
    # A lazily exported name counts as an import of the module that defines it.
    lazy = {"flmm_model.data": {"Collator": "flmm_model.data.loader"}}
    found = _imports(ast.parse(source), module="flmm_model.x", is_package=False,
                     known=known | {"flmm_model.data.loader"}, lazy=lazy)
    assert found == {"flmm_model.data", "flmm_model.data.loader", "flmm_model.metrics", "flmm_model.recipes.train"}


def test_package_has_no_import_cycle():
    graph = import_graph()
    assert "flmm_model.model" in graph and "flmm_model.data.kinds" in graph  # the walk found the package
    cycle = find_cycle(graph)
    assert cycle is None, "import cycle: " + " -> ".join(cycle)


def test_no_lazy_public_name_shadows_a_submodule():
    """A package that exports a name lazily loses it when a submodule of the same name is imported (Python sets the
    submodule as the package's attribute): `flmm_model.data.collate` would turn from the function into the module."""
    import importlib

    for package in ("flmm_model", "flmm_model.data"):
        module = importlib.import_module(package)
        folder = Path(module.__file__).parent
        submodules = {path.stem for path in folder.glob("*.py")} | {path.name for path in folder.iterdir()
                                                                  if (path / "__init__.py").is_file()}
        assert not set(module._EXPORTS) & submodules, (package, sorted(set(module._EXPORTS) & submodules))
