"""The package's import graph: no cycles among module-level imports, and no function-level import of a bgd_det
module except the two deliberate lazy ones (issue 25: no imports inside functions that exist to dodge a cycle)."""
import ast
import graphlib
from pathlib import Path
from typing import Dict, List, Set

REPO = Path(__file__).resolve().parents[1]
PACKAGE = REPO / "bgd_det"
# Deferred on purpose: `import bgd_det` stays light; the op's toolchain loads on the first use of the op.
LAZY_IMPORTS = {("bgd_det/__init__.py", "checkpoint"), ("bgd_det/ops/__init__.py", "_build")}


def _modules() -> Dict[str, Path]:
    """Dotted module name -> file, for every module of the package (a package is its ``__init__``)."""
    out = {}
    for path in sorted(PACKAGE.rglob("*.py")):
        parts = list(path.relative_to(REPO).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts.pop()
        out[".".join(parts)] = path
    return out


def _target(module: str, path: Path, node: ast.ImportFrom) -> str:
    """The dotted module a ``from ... import`` names, relative imports resolved against ``module``."""
    if not node.level:
        return node.module or ""
    package = module.split(".") if path.name == "__init__.py" else module.split(".")[:-1]
    base = package[: len(package) - (node.level - 1)]
    return ".".join(base + ([node.module] if node.module else []))


def _edges(module: str, path: Path, nodes: List[ast.AST], modules: Dict[str, Path]) -> Set[str]:
    """The package modules the import statements among ``nodes`` load (a name imported from a package counts as its
    submodule when there is one)."""
    deps = set()
    for node in nodes:
        if isinstance(node, ast.ImportFrom):
            target = _target(module, path, node)
            deps.update(c for c in [target] + [f"{target}.{a.name}" for a in node.names] if c in modules)
        elif isinstance(node, ast.Import):
            deps.update(a.name for a in node.names if a.name in modules)
    deps.discard(module)
    return deps


def _module_level(tree: ast.Module) -> List[ast.AST]:
    """Statements run at import time: the body, including inside module-level ``if`` / ``try``, not functions."""
    out, stack = [], list(tree.body)
    while stack:
        node = stack.pop()
        out.append(node)
        if isinstance(node, (ast.If, ast.Try, ast.ExceptHandler)):
            stack.extend(ast.iter_child_nodes(node))
    return out


def find_cycle(graph: Dict[str, Set[str]]) -> List[str]:
    """One cycle of ``graph`` (``[a, b, ..., a]``, from :mod:`graphlib`), or [] when it has none."""
    try:
        tuple(graphlib.TopologicalSorter(graph).static_order())
    except graphlib.CycleError as err:
        return list(err.args[1])
    return []


def test_cycle_finder_reports_a_cycle_and_not_a_chain():
    cycle = find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}})
    assert cycle[0] == cycle[-1] and sorted(cycle[1:]) == ["a", "b", "c"]
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": set()}) == []


def test_module_level_imports_have_no_cycle():
    modules = _modules()
    graph = {m: _edges(m, p, _module_level(ast.parse(p.read_text())), modules) for m, p in modules.items()}
    assert len(graph) > 40 and sum(map(len, graph.values())) > 100  # the walk saw the package
    assert find_cycle(graph) == []


def test_no_function_level_import_of_the_package_but_the_lazy_ones():
    modules = _modules()
    found = set()
    for path in modules.values():
        tree = ast.parse(path.read_text())
        for fn in ast.walk(tree):
            if isinstance(fn, (ast.FunctionDef, ast.AsyncFunctionDef)):
                for node in ast.walk(fn):
                    if isinstance(node, ast.ImportFrom) and (node.level or (node.module or "").startswith("bgd_det")):
                        found.add((str(path.relative_to(REPO)), node.module or ""))
                    elif isinstance(node, ast.Import) and any(a.name.startswith("bgd_det") for a in node.names):
                        found.add((str(path.relative_to(REPO)), node.names[0].name))
    assert found == LAZY_IMPORTS
