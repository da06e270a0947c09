"""The package's layering, stated once and checked on the import graph (no lazy imports to dodge it).

``io`` imports nothing from the package; ``data`` stands alone (``io`` only); ``modules`` and
``envs`` import nothing above them; ``objectives`` and ``optim`` import only ``modules`` (and each
other); ``trainers`` fit modules with objectives; ``collectors`` use ``data`` (and the modules and
envs they deploy); ``metrics`` reads modules and data; ``algorithms`` composes everything. Every
``import`` statement counts, module-level or inside a function; the only exception is a
module-level ``__getattr__`` in a package ``__init__`` (a deprecation shim for a moved name).
"""
from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

import torchrl_depeff

PACKAGE = Path(torchrl_depeff.__file__).resolve().parent

#: layer -> the layers it may import (besides itself)
ALLOWED: dict[str, set[str]] = {
    "io": set(),
    "stats": set(),
    "data": {"io"},
    "modules": {"io"},
    "envs": {"modules", "io"},
    "objectives": {"modules", "optim", "io"},
    "optim": {"modules", "objectives", "io"},
    "trainers": {"modules", "objectives", "optim", "data", "io"},
    "collectors": {"data", "modules", "envs", "io"},
    "metrics": {"modules", "data", "io"},
    "metrics_plots": {"metrics", "modules", "data", "io"},
    "algorithms": {"io", "data", "modules", "envs", "objectives", "optim", "trainers", "collectors", "metrics",
                   "metrics_plots"},
}


def _layer(module: str) -> str:
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else "__root__"


def _imports(path: Path) -> list[tuple[str, int, bool]]:
    """``(imported torchrl_depeff module, line, inside a deprecation __getattr__)`` of a file."""
    tree = ast.parse(path.read_text())
    shims = set()
    if path.name == "__init__.py":
        for node in tree.body:
            if isinstance(node, ast.FunctionDef) and node.name == "__getattr__":
                shims |= {id(n) for n in ast.walk(node)}
    package = ".".join(("torchrl_depeff", *path.relative_to(PACKAGE).with_suffix("").parts))
    if path.name == "__init__.py":
        package = package.rsplit(".", 1)[0]
    out = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:  # relative import
                base = package.rsplit(".", node.level - 1)[0] if node.level > 1 else package
                names = [f"{base}.{node.module}" if node.module else base]
            else:
                names = [node.module or ""]
        else:
            continue
        out += [(n, node.lineno, id(node) in shims) for n in names if n.startswith("torchrl_depeff.")]
    return out


def _files():
    return sorted(PACKAGE.rglob("*.py"))


def test_every_layer_is_known():
    layers = {_layer(".".join(("torchrl_depeff", *f.relative_to(PACKAGE).with_suffix("").parts))) for f in _files()}
    assert layers - {"__root__", "__init__"} <= set(ALLOWED), layers - set(ALLOWED)


@pytest.mark.parametrize("path", _files(), ids=lambda p: str(p.relative_to(PACKAGE)))
def test_imports_follow_the_layering(path):
    module = ".".join(("torchrl_depeff", *path.relative_to(PACKAGE).with_suffix("").parts))
    layer = _layer(module)
    if layer in ("__root__", "__init__"):
        return
    bad = []
    for imported, line, shim in _imports(path):
        target = _layer(imported)
        if shim or target == layer:
            continue
        if target not in ALLOWED[layer]:
            bad.append(f"line {line}: {imported} ({layer} may import {sorted(ALLOWED[layer])})")
    assert not bad, f"{module} breaks the layering: {bad}"


def test_low_layers_load_nothing_above_them():
    """``import torchrl_depeff.modules, torchrl_depeff.envs`` in a fresh interpreter loads no higher layer."""
    code = (
        "import sys, torchrl_depeff.modules, torchrl_depeff.envs; "
        "print(sorted({m.split('.')[1] for m in sys.modules if m.startswith('torchrl_depeff.')}))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    loaded = set(ast.literal_eval(out.strip().splitlines()[-1]))
    assert not loaded & {"trainers", "objectives", "collectors", "algorithms", "optim"}, loaded


def test_every_subpackage_imports_first_in_a_fresh_interpreter():
    """Each subpackage imports on its own, as a user's first import."""
    import pkgutil

    names = sorted(i.name for i in pkgutil.iter_modules(torchrl_depeff.__path__, prefix="torchrl_depeff.") if i.ispkg)
    procs = {n: subprocess.Popen([sys.executable, "-c", f"import {n}"], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                 text=True) for n in names}
    failed = {}
    for name, proc in procs.items():
        _, err = proc.communicate(timeout=300)
        if proc.returncode:
            failed[name] = err.strip().splitlines()[-1]
    assert not failed, failed
