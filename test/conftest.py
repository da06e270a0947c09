"""Shared pytest configuration: deterministic seeds and small thread counts for the 2-core CI."""
from __future__ import annotations

import os

import pytest
import torch



def pytest_configure(config: pytest.Config) -> None:
    torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))


@pytest.fixture(autouse=True)
def _seed() -> None:
    torch.manual_seed(0)
