"""TorchRL/TensorDict components for deployment-efficient model-based reinforcement learning.

Implements the building blocks of BREMEN (Matsushima et al., 2021), MUSBO (Su et al., 2022)
and MB2PO (Rafailov et al., 2021): dynamics ensembles, a model-based TorchRL environment,
trust-region policy objectives and deployment tooling.
"""
from __future__ import annotations

__version__ = "0.1.0"
