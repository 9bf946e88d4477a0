"""The import graph of the packages, read from the source (ast), against docs/DESIGN.md's table: no
cycle between modules (imports inside functions count), and no import upward.

An import inside a function hides an edge from a reader but not from this test, so a cycle cannot
be made to pass by moving an import into a function.
"""

from __future__ import annotations

import ast
import os
from collections import defaultdict

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PACKAGES = ("data_pipeline", "model_zoo", "pretrain", "evals", "cluster")

# Which packages a package may import (docs/DESIGN.md, "Packages and who may import whom"). The
# command line (pretrain/cli.py) sees every package; data_pipeline.storage sees none.
MAY_IMPORT = {
    "data_pipeline.storage": set(),
    "model_zoo": {"model_zoo", "data_pipeline.storage"},
    "data_pipeline": {"data_pipeline", "model_zoo"},
    "pretrain": {"pretrain", "model_zoo", "data_pipeline"},
    "evals": {"evals", "model_zoo", "data_pipeline"},
    "cluster": {"cluster", "pretrain", "evals", "data_pipeline"},
}
for _allowed in MAY_IMPORT.values():       # the storage seam is below everything else
    if _allowed:
        _allowed.add("data_pipeline.storage")
# The modules of pretrain that evals uses: loading a run directory or step folder as a package
# (resolve), the sampling an eval measures (sample) and the process group of a sharded eval
# (distributed). Nothing else of pretrain (the Trainer, DeepSpeed, objectives) reaches evals.
EVALS_MAY_USE = {"pretrain.resolve", "pretrain.sample", "pretrain.distributed"}
COMMAND = "pretrain.cli"


def _modules() -> dict[str, str]:
    out = {}
    for pkg in PACKAGES:
        for root, _dirs, files in os.walk(os.path.join(ROOT, pkg)):
            for f in files:
                if f.endswith(".py"):
                    path = os.path.join(root, f)
                    mod = os.path.relpath(path, ROOT)[:-3].replace(os.sep, ".")
                    out[mod.removesuffix(".__init__")] = path
    return out


def _known(name: str, mods: dict[str, str]) -> str | None:
    while name and name not in mods:
        name = name.rpartition(".")[0]
    return name or None


def import_graph() -> dict[str, set[str]]:
    """Module -> the project modules it imports (at any level of the file)."""
    mods = _modules()
    edges: dict[str, set[str]] = defaultdict(set)
    for mod, path in mods.items():
        package = mod if path.endswith("__init__.py") else mod.rpartition(".")[0]
        for node in ast.walk(ast.parse(open(path).read(), path)):
            targets: list[str] = []
            if isinstance(node, ast.Import):
                targets = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:
                    parts = package.split(".")
                    base = ".".join(parts[:len(parts) - node.level + 1] + ([node.module] if node.module else []))
                subs = [f"{base}.{a.name}" for a in node.names if f"{base}.{a.name}" in mods]
                targets = subs + ([base] if len(subs) < len(node.names) else [])
            for t in targets:
                known = _known(t, mods)
                if known and known != mod:
                    edges[mod].add(known)
    return edges


def _cycles(edges: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components of more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on: set[str] = set()
    out: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on.add(v)
        for w in sorted(edges.get(v, ())):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                out.append(sorted(comp))

    for v in sorted(edges):
        if v not in index:
            visit(v)
    return out


def _area(mod: str) -> str:
    return "data_pipeline.storage" if mod.startswith("data_pipeline.storage") else mod.split(".")[0]


def test_the_packages_import_without_a_cycle():
    edges = import_graph()
    assert len(edges) > 40                       # the walk found the packages
    assert _cycles(edges) == []


def test_no_package_imports_one_above_it():
    bad = []
    for mod, targets in import_graph().items():
        if mod == COMMAND:
            continue
        for t in sorted(targets):
            if _area(mod) == "evals" and _area(t) == "pretrain":
                if t not in EVALS_MAY_USE:
                    bad.append(f"{mod} -> {t} (evals may use only {sorted(EVALS_MAY_USE)} of pretrain)")
            elif _area(t) not in MAY_IMPORT[_area(mod)] and _area(t) != _area(mod):
                bad.append(f"{mod} -> {t}")
    assert bad == []


# The one DeepSpeed adapter (docs/DESIGN.md): every other module reaches DeepSpeed through it.
DEEPSPEED_ADAPTER = "pretrain.runtime"


def deepspeed_imports(path: str) -> list[int]:
    """The lines of ``path`` that import ``deepspeed`` or one of its modules (at any level of the
    file, inside functions too)."""
    def ours(name: str | None) -> bool:
        return bool(name) and (name == "deepspeed" or name.startswith("deepspeed."))

    lines = []
    for node in ast.walk(ast.parse(open(path).read(), path)):
        if isinstance(node, ast.Import) and any(ours(a.name) for a in node.names):
            lines.append(node.lineno)
        elif isinstance(node, ast.ImportFrom) and not node.level and ours(node.module):
            lines.append(node.lineno)
    return sorted(lines)


def test_only_the_runtime_adapter_imports_deepspeed():
    mods = _modules()
    bad = [f"{mod} (line {', '.join(map(str, lines))})" for mod, path in sorted(mods.items())
           if mod != DEEPSPEED_ADAPTER and (lines := deepspeed_imports(path))]
    assert bad == [], f"only {DEEPSPEED_ADAPTER} may import deepspeed; also imported by: {'; '.join(bad)}"
    assert deepspeed_imports(mods[DEEPSPEED_ADAPTER])          # the walk sees its function-level imports


def test_the_checker_sees_cycles_and_upward_imports_inside_functions():
    """The rules above are not vacuous: a cycle through a function-level import is found."""
    edges = {"a.x": {"a.y"}, "a.y": {"a.z"}, "a.z": {"a.x"}, "b": {"a.x"}}
    assert _cycles(edges) == [["a.x", "a.y", "a.z"]]
    src = "def f():\n    from pretrain.trainer import Trainer\n"
    node = ast.parse(src).body[0].body[0]
    assert isinstance(node, ast.ImportFrom) and node.module == "pretrain.trainer"   # walked by import_graph


def test_the_deepspeed_checker_sees_every_form(tmp_path):
    src = ("import os\nfrom . import deepspeed_like\n"
           "def f():\n    import deepspeed\n    from deepspeed.utils import x\n    import deepspeed.comm as c\n"
           "    from deepspeedish import y\n")
    path = tmp_path / "m.py"
    path.write_text(src)
    assert deepspeed_imports(str(path)) == [4, 5, 6]
