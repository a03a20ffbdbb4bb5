"""The package's import rules, checked on its source (``ast``), not hoped for.

- ``probes`` and ``hessian`` work on any ``nn.Module``: they never import the
  zoo (``norms``, ``models``).
- Readers stay readers: ``plotting`` imports only ``results``, ``properties``
  and itself (and ``errors``); ``properties`` imports only ``results``.
- Nothing in the library imports ``cli``.
- No import circles between modules.
- Imports sit at the top of a module; one inside a function is for an
  optional dependency only (:data:`OPTIONAL`).
"""

from __future__ import annotations

import ast
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1] / "normprobe"
#: third-party packages that may be imported inside a function (installed only on request)
OPTIONAL = {"ray"}
#: other imports left inside a function, each for a reason (never a normprobe module)
DEFERRED = {
    # scikit-learn takes about a second to import; only the digits loader needs it
    ("normprobe.data.digits", "sklearn.datasets"),
    # torch's own submodules, imported where the weight-norm parametrizations are read
    ("normprobe.hessian.hvp", "torch.nn.utils.parametrizations"),
    ("normprobe.hessian.hvp", "torch.nn.utils.weight_norm"),
    # the CLI loads the plotting stack (matplotlib, seaborn, scipy.stats: about 1.5 s) only
    # for the commands that draw, so `normprobe analyze` starts without it
    ("normprobe.cli", "normprobe.plotting"),
    ("normprobe.cli", "normprobe.figureset"),
    # and each command the library it runs (torch, pandas, scipy: about 3 s), so that
    # `normprobe --help` and a wrong argument answer at once (tests/test_startup.py)
    ("normprobe.cli", "normprobe.analyze"),
    ("normprobe.cli", "normprobe.data"),
    ("normprobe.cli", "normprobe.models"),
    ("normprobe.cli", "normprobe.norms"),
    ("normprobe.cli", "normprobe.results"),
    ("normprobe.cli", "normprobe.zoo_measures"),
    # TensorBoard is optional: its writer is loaded only when a monitor is asked to log to it
    ("normprobe.integrations.tensorboard", "torch.utils.tensorboard"),
}
#: the modules that may import what readers may not (the upper layer)
READER_ALLOWED = {"normprobe.results", "normprobe.properties", "normprobe.errors"}


@dataclass(frozen=True)
class Import:
    importer: str  # dotted module name
    target: str  # dotted module name (a normprobe module, or a top-level third-party name)
    line: int
    in_function: bool


def _module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT.parent).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def _is_module(dotted: str) -> bool:
    base = ROOT.parent.joinpath(*dotted.split("."))
    return base.with_suffix(".py").exists() or (base / "__init__.py").exists()


def _imports(path: Path) -> Iterator[Import]:
    name = _module_name(path)
    tree = ast.parse(path.read_text(), filename=str(path))
    functions = (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda)

    def walk(node: ast.AST, in_function: bool) -> Iterator[Import]:
        for child in ast.iter_child_nodes(node):
            inside = in_function or isinstance(child, functions)
            if isinstance(child, ast.Import):
                for alias in child.names:
                    yield Import(name, alias.name, child.lineno, inside)
            elif isinstance(child, ast.ImportFrom) and child.module and child.level == 0:
                targets = [child.module]
                for alias in child.names:  # `from normprobe import executors`: a module
                    if _is_module(f"{child.module}.{alias.name}"):
                        targets.append(f"{child.module}.{alias.name}")
                for target in targets if len(targets) == 1 else targets[1:]:
                    yield Import(name, target, child.lineno, inside)
            yield from walk(child, inside)

    yield from walk(tree, False)


def _all_imports() -> list[Import]:
    return [i for path in sorted(ROOT.rglob("*.py")) for i in _imports(path)]


IMPORTS = _all_imports()


def _internal(imports: list[Import]) -> list[Import]:
    return [i for i in imports if i.target == "normprobe" or i.target.startswith("normprobe.")]


def _under(module: str, package: str) -> bool:
    return module == package or module.startswith(package + ".")


def _violations(importers: str, forbidden: tuple[str, ...]) -> list[str]:
    return [
        f"{i.importer}:{i.line} imports {i.target}"
        for i in _internal(IMPORTS)
        if _under(i.importer, importers) and any(_under(i.target, f) for f in forbidden)
    ]


def test_the_parser_sees_the_package() -> None:
    importers = {i.importer for i in IMPORTS}
    assert {"normprobe.analyze", "normprobe.run", "normprobe.probes.capture"} <= importers
    assert any(i.target == "normprobe.run" for i in IMPORTS)


@pytest.mark.parametrize("package", ["normprobe.probes", "normprobe.hessian"])
def test_probes_and_hessian_never_import_the_zoo(package: str) -> None:
    assert _violations(package, ("normprobe.norms", "normprobe.models")) == []


def test_plotting_reads_results_only() -> None:
    bad = [
        f"{i.importer}:{i.line} imports {i.target}"
        for i in _internal(IMPORTS)
        if _under(i.importer, "normprobe.plotting")
        and not _under(i.target, "normprobe.plotting")
        and i.target not in READER_ALLOWED
    ]
    assert bad == []


def test_properties_reads_results_only() -> None:
    bad = [
        f"{i.importer}:{i.line} imports {i.target}"
        for i in _internal(IMPORTS)
        if i.importer == "normprobe.properties"
        and i.target not in {"normprobe.results", "normprobe.errors"}
    ]
    assert bad == []


def test_nothing_in_the_library_imports_the_cli() -> None:
    bad = [
        f"{i.importer}:{i.line}"
        for i in _internal(IMPORTS)
        if i.target == "normprobe.cli" and i.importer != "normprobe.__main__"
    ]
    assert bad == []


def _cycle(edges: dict[str, set[str]]) -> list[str] | None:
    """One import circle in ``edges`` (module -> modules it imports), or None."""
    state: dict[str, int] = {}  # 1: on the current path, 2: done
    path: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        path.append(node)
        for nxt in sorted(edges.get(node, ())):
            if state.get(nxt) == 1:
                return path[path.index(nxt) :] + [nxt]
            if nxt not in state and (found := visit(nxt)) is not None:
                return found
        path.pop()
        state[node] = 2
        return None

    for node in sorted(edges):
        if node not in state and (found := visit(node)) is not None:
            return found
    return None


def test_no_import_circles() -> None:
    edges: dict[str, set[str]] = {}
    for i in _internal(IMPORTS):
        # a package's __init__ importing its own submodules is how packages work, not a circle
        if i.importer != i.target and not _under(i.importer, i.target):
            edges.setdefault(i.importer, set()).add(i.target)
    assert _cycle(edges) is None, " -> ".join(_cycle(edges) or [])


def test_the_cycle_finder_finds_one() -> None:
    assert _cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert _cycle({"a": {"b"}, "b": set()}) is None


def test_imports_sit_at_the_top_except_optional_dependencies() -> None:
    inside = [
        f"{i.importer}:{i.line} imports {i.target} inside a function"
        for i in IMPORTS
        if i.in_function
        and i.target.split(".")[0] not in OPTIONAL
        and (i.importer, i.target) not in DEFERRED
    ]
    assert inside == []
    # otherwise a normprobe module is never imported inside a function: that is how circles
    # hide (and the circle test above counts the deferred imports too)
    assert not any(
        i.in_function and (i.importer, i.target) not in DEFERRED for i in _internal(IMPORTS)
    )
