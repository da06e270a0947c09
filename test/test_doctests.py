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
