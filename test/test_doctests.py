"""Run every library docstring's ``Examples:`` block as a doctest."""
from __future__ import annotations

import doctest
import importlib
import pkgutil

import pytest
import torch

import torchrl_depeff


def _library_modules() -> list[str]:
    return sorted(
        info.name
        for info in pkgutil.walk_packages(torchrl_depeff.__path__, prefix="torchrl_depeff.")
    )


@pytest.mark.parametrize("module_name", _library_modules())
def test_docstring_examples(module_name: str) -> None:
    module = importlib.import_module(module_name)
    torch.manual_seed(0)
    finder = doctest.DocTestFinder(exclude_empty=True)
    runner = doctest.DocTestRunner(optionflags=doctest.ELLIPSIS | doctest.NORMALIZE_WHITESPACE)
    for test in finder.find(module, module_name, globs={"torch": torch}):
        runner.run(test)
    result = runner.summarize(verbose=False)
    assert result.failed == 0, f"{result.failed} doctest example(s) failed in {module_name}"



def test_every_subpackage_imports_first_in_a_fresh_interpreter() -> None:
    """Each subpackage must import on its own, as a user's first import: catches import cycles
    that the shared test process hides once another package has been imported. (Importing a
    leaf module runs its package ``__init__`` first, so packages cover their modules.)"""
    import subprocess
    import sys

    names = sorted(
        info.name
        for info in pkgutil.iter_modules(torchrl_depeff.__path__, prefix="torchrl_depeff.")
        if info.ispkg
    )
    assert len(names) >= 6, names
    procs = {
        name: subprocess.Popen(
            [sys.executable, "-c", f"import {name}"], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
        )
        for name in names
    }
    failed = {}
    for name, proc in procs.items():
        _, err = proc.communicate(timeout=300)
        if proc.returncode:
            failed[name] = err.strip().splitlines()[-1]
    assert not failed, f"subpackages that fail as a first import: {failed}"
