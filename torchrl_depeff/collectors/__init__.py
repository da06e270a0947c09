"""Deployment: frozen-policy collection in the real env and the pre-deployment gate."""
from __future__ import annotations

from torchrl_depeff.collectors.deployment import (
    collect_deployment,
    DeploymentCollector,
    freeze_policy,
    policy_hash,
)
from torchrl_depeff.collectors.gate import DeploymentGate, DeploymentRefused, GateReport, gaussian_kl

__all__ = [
    "DeploymentCollector",
    "DeploymentGate",
    "DeploymentRefused",
    "GateReport",
    "collect_deployment",
    "freeze_policy",
    "gaussian_kl",
    "policy_hash",
]
