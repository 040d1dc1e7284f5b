"""The package's import structure, read from the source (``ast``; nothing is imported).

* No cycle among module-level imports. An import of ``a.b.c`` also runs the ``__init__`` of
  ``a.b``, so it counts as an import of that package too (unless the importer lives in
  it); ``if TYPE_CHECKING:`` imports do not run and do not count.
* Layers: app -> decoding -> patching -> features (nn, cache, prune, quant) -> ops ->
  kernels | _C | reference, with the utilities where :data:`ALLOWED` puts them. A module
  imports, at module level, only from its own group and the groups listed for it.
* No function-local imports, except those in :data:`LOCAL_IMPORTS_ALLOWED` (each with its
  reason): a local import that only dodges a cycle hides a layering error.
* No callable-module tricks (``sys.modules[__name__].__class__ = ...``) and no options
  registered as an import side effect (``register_transform(...)`` at module level).
"""

from __future__ import annotations

import ast
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PKG = "sentinel_kernels"
# The top-level kernels/ folder is shipped as sentinel_kernels.kernels (pyproject.toml).
SOURCES = {PKG: ROOT / "python" / PKG, f"{PKG}.kernels": ROOT / "kernels"}
#: Modules without Python source: the C++ extension (csrc/).
NATIVE = {f"{PKG}._C"}

#: Module groups: the first name below the package (``sentinel_kernels.nn.attention`` is in
#: ``nn``), the package itself is ``root``.
FEATURES = {"nn", "cache", "prune", "quant"}
_UTILS = {"hf_compat", "settings", "_backend", "_lazy"}
_BELOW_OPS = {"kernels", "_C", "reference"}
_CORE = FEATURES | {"ops"} | _BELOW_OPS | _UTILS

#: Groups each group may import at module level (besides itself).
ALLOWED: dict[str, set[str]] = {
    # the package imports ops / nn.attention eagerly only when torch / transformers are
    # already loaded (custom ops and the "sentinel" attention must exist right away)
    "root": {"ops", "nn", "_lazy"},
    "app": {"serve", "decoding", "patching", "models", "eval", "knn"} | _CORE,
    # the engine and server: above the decode loop (its sampling), below the command line
    "serve": {"decoding", "patching", "models", "knn"} | _CORE,
    "decoding": {"patching", "knn"} | _CORE,
    "patching": _CORE,
    # model loading and evaluation: above the features they load/measure, below the apps
    "models": _CORE,
    "eval": {"knn"} | _CORE,
    # k-NN retrieval (kNN-LM datastores, FAISS): used by decoding and evaluation, uses
    # only the kernels' layer and the utilities
    "knn": {"ops"} | _UTILS,
    # one layer: features may use each other (the cycle check keeps that acyclic)
    **{g: _CORE for g in FEATURES},
    "ops": _BELOW_OPS | _UTILS,
    "kernels": {"settings"},
    "reference": {"settings"},
    "_C": set(),
    "_backend": {"settings", "_C"},
    "hf_compat": {"settings"},
    "settings": set(),
    "_lazy": set(),
}

#: Third-party modules that may be imported inside functions anywhere: optional or heavy,
#: and imported only where needed, so that ``import sentinel_kernels`` and ``sk.ops`` pull
#: in neither (Triton is optional on CPU installs; matplotlib draws charts only; tqdm shows
#: progress only; transformers and its ``packaging`` version checks load only where a
#: transformers model is in hand; gguf reads GGUF checkpoints only).
OPTIONAL_DEPS = {"triton", "matplotlib", "tqdm", "transformers", "packaging", "gguf"}

#: ``(importing module prefix, imported module prefix)``: the package's own function-local
#: imports that are allowed, and why.
LOCAL_IMPORTS_ALLOWED: dict[tuple[str, str], str] = {
    (PKG, f"{PKG}._C"): "the C++ extension is optional (not built on every install): "
    "imported where used, failures reported",
    (f"{PKG}.ops", f"{PKG}.kernels"): "the Triton kernels need triton (optional): the ops "
    "import them on the first Triton dispatch",
    (f"{PKG}.app.cli", "torch"): "torch-free CLI --help: subcommands import torch when run",
    (f"{PKG}.app.cli", f"{PKG}.app.demo"): "torch-free CLI --help (the demo imports torch)",
    (f"{PKG}.app.cli", f"{PKG}.models"): "torch-free CLI --help (models imports torch)",
    (f"{PKG}.app.bench_serve", "httpx"): "httpx is loaded only when bench-serve runs",
    (f"{PKG}.knn.index", "faiss"): "the device search runs without faiss (a GPU machine may "
    "lack the wheel): faiss loads when a FAISS index is built or loaded",
    (f"{PKG}.app.cli", "uvicorn"): "the server stack loads only for `serve`",
    (f"{PKG}.app.cli", f"{PKG}.serve"): "torch-free CLI --help (the engine imports torch)",
    (f"{PKG}.app.cli", f"{PKG}.patching"): "torch-free CLI --help (patching imports torch)",
    (f"{PKG}.app.args", "torch"): "torch-free CLI --help: --device is checked when run",
    (f"{PKG}.app.profile.command", "torch"): "torch-free CLI --help",
    (f"{PKG}.app.profile.command", f"{PKG}.models"): "torch-free CLI --help",
    (f"{PKG}.app.args", f"{PKG}.knn"): "torch-free CLI --help (datastores import torch "
    "and faiss; loaded when --knn-datastore is used)",
    (f"{PKG}.app.profile.command", f"{PKG}.app.profile."): "torch-free CLI --help "
    "(breakdown/export import torch)",
}


@dataclass(frozen=True)
class Module:
    name: str
    path: Path
    is_package: bool
    tree: ast.Module


def _modules() -> dict[str, Module]:
    found: dict[str, Module] = {}
    for prefix, folder in SOURCES.items():
        for path in sorted(folder.rglob("*.py")):
            parts = [*prefix.split("."), *path.relative_to(folder).with_suffix("").parts]
            is_package = parts[-1] == "__init__"
            if is_package:
                parts = parts[:-1]
            name = ".".join(parts)
            found[name] = Module(name, path, is_package, ast.parse(path.read_text(), str(path)))
    return found


MODULES = _modules()


def group(name: str) -> str:
    """The layering group of module ``name`` (``"root"`` for the package itself)."""
    parts = name.split(".")
    return "root" if len(parts) == 1 else parts[1]


def _is_type_checking(test: ast.expr) -> bool:
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING"
    )


def _module_level(body: list[ast.stmt]) -> Iterator[ast.stmt]:
    """Statements run when the module is imported (class bodies included; function bodies
    and ``if TYPE_CHECKING:`` blocks not)."""
    for stmt in body:
        yield stmt
        if isinstance(stmt, ast.If):
            if not _is_type_checking(stmt.test):
                yield from _module_level(stmt.body)
            yield from _module_level(stmt.orelse)
        elif isinstance(stmt, (ast.Try, ast.With)):
            yield from _module_level(stmt.body)
            for handler in getattr(stmt, "handlers", []):
                yield from _module_level(handler.body)
            yield from _module_level(getattr(stmt, "orelse", []))
            yield from _module_level(getattr(stmt, "finalbody", []))
        elif isinstance(stmt, ast.ClassDef):
            yield from _module_level(stmt.body)


def _targets(mod: Module, node: ast.Import | ast.ImportFrom) -> list[tuple[str, str]]:
    """``(imported module, imported name or "")`` pairs of an import statement (absolute
    names; ``from pkg import sub`` gives the submodule when there is one)."""
    if isinstance(node, ast.Import):
        return [(alias.name, "") for alias in node.names]
    if node.level:
        base = mod.name.split(".") if mod.is_package else mod.name.split(".")[:-1]
        base = base[: len(base) - (node.level - 1)]
        source = ".".join(base + ([node.module] if node.module else []))
    else:
        source = node.module or ""
    out = []
    for alias in node.names:
        sub = f"{source}.{alias.name}"
        out.append((sub, "") if sub in MODULES or sub in NATIVE else (source, alias.name))
    return out


def _edges(mod: Module, stmts: Iterator[ast.stmt]) -> Iterator[tuple[str, str, int]]:
    """Package modules imported by ``stmts``: ``(module, name, line)``, each imported
    module's packages included (their ``__init__`` runs first) except ``mod``'s own."""
    own = {".".join(mod.name.split(".")[:i]) for i in range(1, mod.name.count(".") + 1)}
    for stmt in stmts:
        if not isinstance(stmt, (ast.Import, ast.ImportFrom)):
            continue
        for target, name in _targets(mod, stmt):
            if target.split(".")[0] != PKG:
                continue
            parts = target.split(".")
            for i in range(2, len(parts)):
                parent = ".".join(parts[:i])
                if parent not in own and parent in MODULES:
                    yield parent, "", stmt.lineno
            yield target, name, stmt.lineno


def _graph() -> dict[str, set[str]]:
    graph: dict[str, set[str]] = {name: set() for name in MODULES}
    for mod in MODULES.values():
        for target, _, _ in _edges(mod, _module_level(mod.tree.body)):
            # the package root runs first and imports downwards only: an edge into it
            # (``from .. import __version__``) cannot close a cycle
            if target != PKG and target != mod.name:
                graph[mod.name].add(target)
    return graph


def _cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    out: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in sorted(graph.get(v, ())):
            if w not in graph:
                continue
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
                out.append(sorted(comp))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return out


def test_sources_found():
    assert f"{PKG}.ops" in MODULES and f"{PKG}.kernels.attention" in MODULES
    assert {group(m) for m in MODULES} <= set(ALLOWED), {group(m) for m in MODULES}


def test_no_import_cycle():
    cycles = _cycles(_graph())
    assert not cycles, "module-level import cycles:\n" + "\n".join(" <-> ".join(c) for c in cycles)


def test_layer_order():
    bad = []
    for mod in MODULES.values():
        src = group(mod.name)
        for target, name, line in _edges(mod, _module_level(mod.tree.body)):
            dst = group(target)
            if target == PKG:
                if name != "__version__":
                    bad.append(f"{mod.path.name}:{line} {mod.name} imports {name} from {PKG}")
            elif dst != src and dst not in ALLOWED[src]:
                bad.append(f"{mod.path.name}:{line} {mod.name} ({src}) -> {target} ({dst})")
    assert not bad, "imports against the layer order:\n" + "\n".join(bad)


def _allowed_local(importer: str, target: str) -> bool:
    if target.split(".")[0] in OPTIONAL_DEPS:
        return True
    return any(
        importer.startswith(who) and (target == what or target.startswith(what))
        for who, what in LOCAL_IMPORTS_ALLOWED
    )


def _local_imports(mod: Module) -> Iterator[tuple[int, str]]:
    seen: set[int] = set()
    for fn in ast.walk(mod.tree):
        if not isinstance(fn, (ast.FunctionDef, ast.AsyncFunctionDef)):
            continue
        for node in ast.walk(fn):
            if isinstance(node, (ast.Import, ast.ImportFrom)) and id(node) not in seen:
                seen.add(id(node))
                for target, _ in _targets(mod, node):
                    yield node.lineno, target


def test_no_function_local_imports():
    bad = sorted(
        {
            f"{mod.path.relative_to(ROOT)}:{line} imports {target} inside a function"
            for mod in MODULES.values()
            for line, target in _local_imports(mod)
            if not _allowed_local(mod.name, target)
        }
    )
    assert not bad, (
        "function-local imports (move them to the top of the module, or add a reason to "
        "LOCAL_IMPORTS_ALLOWED):\n" + "\n".join(bad)
    )


def _is_sys_modules(node: ast.expr) -> bool:
    return (
        isinstance(node, ast.Subscript)
        and isinstance(node.value, ast.Attribute)
        and node.value.attr == "modules"
        and isinstance(node.value.value, ast.Name)
        and node.value.value.id == "sys"
    )


@pytest.mark.parametrize("name", sorted(MODULES))
def test_no_callable_module_or_import_time_registration(name):
    mod = MODULES[name]
    for node in ast.walk(mod.tree):
        if isinstance(node, ast.Assign):
            for target in node.targets:
                assert not (
                    isinstance(target, ast.Attribute)
                    and target.attr == "__class__"
                    and _is_sys_modules(target.value)
                ), f"{mod.path}:{node.lineno}: sys.modules[...].__class__ assignment"
    for stmt in _module_level(mod.tree.body):
        call = stmt.value if isinstance(stmt, ast.Expr) else None
        if isinstance(call, ast.Call):
            func = call.func
            fname = func.attr if isinstance(func, ast.Attribute) else getattr(func, "id", "")
            assert fname not in ("register_transform", "register_replacement"), (
                f"{mod.path}:{stmt.lineno}: a patch option registered at import time; "
                "declare it in sentinel_kernels.patching.options.OPTIONS"
            )
