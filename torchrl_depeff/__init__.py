"""TorchRL/TensorDict components for deployment-efficient model-based reinforcement learning.

Implements the building blocks of BREMEN (Matsushima et al., ICLR 2021), MUSBO (Su et al., 2022)
and MB2PO (Villaflor, Dolan and Schneider, "Fine-tuning offline reinforcement learning with
model-based policy optimization"): dynamics ensembles, a model-based TorchRL environment,
trust-region and advantage-weighted policy objectives, deployment tooling, and one composable
deployment loop (:class:`torchrl_depeff.algorithms.DeploymentLoop`) that the three algorithms
configure.
"""
from __future__ import annotations

__version__ = "0.2.0"
