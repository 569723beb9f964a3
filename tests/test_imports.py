"""The package's import graph is one-way: each sub-package imports only from those below it, and
no module imports itself back through others (imports inside functions included)."""

import ast
from pathlib import Path

from tests.helpers import REPO

PACKAGE = REPO / "gpt_recipes"
# Lowest first. A unit is a sub-package, or a module at the top of the package.
LAYERS = [
    {"__init__", "console", "errors", "args", "foreign_flags", "faults", "folders"},
    {"parallel"},
    {"ds_config", "ds_config_keys"},
    {"data"},
    {"models"},
    {"checkpoints"},
    {"metrics"},
    {"train"},
    {"runner", "pretrained", "launch"},
]


def module_name(path: Path) -> str:
    parts = path.relative_to(REPO).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imports_of(path: Path, modules: set[str]) -> set[str]:
    """The package's modules that `path` imports, wherever in the file."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found |= {a.name for a in node.names if a.name.startswith("gpt_recipes")}
        elif isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("gpt_recipes"):
            assert node.level == 0, f"{path}: relative import"
            for alias in node.names:  # `from gpt_recipes.data import sft` names a module
                sub = f"{node.module}.{alias.name}"
                found.add(sub if sub in modules else node.module)
    return found & modules


def graph() -> dict[str, set[str]]:
    files = {module_name(p): p for p in PACKAGE.rglob("*.py")}
    return {name: imports_of(path, set(files)) - {name} for name, path in files.items()}


def unit(module: str) -> str:
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else "__init__"


def layer(module: str) -> int:
    return next(i for i, units in enumerate(LAYERS) if unit(module) in units)


def test_every_unit_has_a_layer():
    units = {unit(m) for m in graph()}
    assert units == set().union(*LAYERS), "a new sub-package or top-level module needs a place in LAYERS"


def upward_imports(edges: dict[str, set[str]]) -> list[str]:
    return [f"{m} -> {d}" for m, deps in edges.items() for d in deps if layer(d) > layer(m) and unit(d) != unit(m)]


def find_cycle(edges: dict[str, set[str]]) -> list[str] | None:
    state: dict[str, int] = {}  # 1: on the current path, 2: done

    def visit(node: str, path: list[str]) -> list[str] | None:
        state[node] = 1
        for dep in sorted(edges.get(node, ())):
            if state.get(dep) == 1:
                return [*path, node, dep]
            if dep not in state and (cycle := visit(dep, [*path, node])):
                return cycle
        state[node] = 2
        return None

    for start in sorted(edges):
        if start not in state and (cycle := visit(start, [])):
            return cycle[cycle.index(cycle[-1]):]
    return None


def test_imports_point_down():
    upward = upward_imports(graph())
    assert not upward, "\n".join(upward)


def test_no_cycles():
    cycle = find_cycle(graph())
    assert cycle is None, " -> ".join(cycle)


def test_the_checks_see_a_violation():
    edges = graph()
    assert edges["gpt_recipes.runner"] >= {"gpt_recipes.train.loop", "gpt_recipes.data.mixture"}
    edges["gpt_recipes.data.tokens"] = edges["gpt_recipes.data.tokens"] | {"gpt_recipes.train.loop"}
    assert upward_imports(edges) == ["gpt_recipes.data.tokens -> gpt_recipes.train.loop"]
    assert find_cycle(edges) is not None
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == ["a", "b", "c", "a"]
