"""Deployment: frozen-policy collection in the real env, behaviour datasets and the pre-deployment gate."""
from __future__ import annotations

from torchrl_depeff.collectors.behaviour import collect_behaviour_dataset
from torchrl_depeff.collectors.deployment import (
    ACTION_TOLERANCE,
    action_bounds,
    collect_deployment,
    DeploymentCollectionError,
    DeploymentCollector,
    freeze_policy,
    policy_hash,
    validate_deployment_data,
)
from torchrl_depeff.collectors.gate import DeploymentGate, DeploymentRefused, GateReport, gaussian_kl

__all__ = [
    "ACTION_TOLERANCE",
    "DeploymentCollectionError",
    "DeploymentCollector",
    "DeploymentGate",
    "DeploymentRefused",
    "GateReport",
    "action_bounds",
    "collect_behaviour_dataset",
    "collect_deployment",
    "freeze_policy",
    "gaussian_kl",
    "policy_hash",
    "validate_deployment_data",
]
