"""Data: per-deployment replay buffers, behaviour datasets and offline dataset loaders.

``collect_behaviour_dataset`` moved to :mod:`torchrl_depeff.collectors` (it runs the real env;
``data`` stands alone, issue 14). ``torchrl_depeff.data.collect_behaviour_dataset`` still works
and emits a ``FutureWarning`` naming the new place.
"""
from __future__ import annotations

import warnings
from typing import Any

from torchrl_depeff.data.datasets import (
    ClippedGaussianAction,
    EpsilonUniformAction,
    load_behaviour_dataset,
    load_d4rl_hdf5,
    load_minari,
    NOISE_VARIANTS,
    save_behaviour_dataset,
    UniformRandomAction,
    validate_offline_dataset,
)
from torchrl_depeff.data.scores import (
    d4rl_normalized_score,
    d4rl_reference_returns,
    REF_MAX_SCORE,
    REF_MIN_SCORE,
)
from torchrl_depeff.data.deployments import (
    DamagedDeploymentError,
    DeploymentDamage,
    DeploymentReplayBuffers,
    REQUIRED_KEYS,
    validate_transitions,
    verify_deployment,
)

__all__ = [
    "ClippedGaussianAction",
    "DamagedDeploymentError",
    "DeploymentDamage",
    "DeploymentReplayBuffers",
    "EpsilonUniformAction",
    "NOISE_VARIANTS",
    "REF_MAX_SCORE",
    "REF_MIN_SCORE",
    "REQUIRED_KEYS",
    "UniformRandomAction",
    "d4rl_normalized_score",
    "d4rl_reference_returns",
    "load_behaviour_dataset",
    "load_d4rl_hdf5",
    "load_minari",
    "save_behaviour_dataset",
    "validate_offline_dataset",
    "validate_transitions",
    "verify_deployment",
]


def __getattr__(name: str) -> Any:
    """Deprecation shim: moved names still resolve, with a ``FutureWarning`` naming the new place."""
    if name == "collect_behaviour_dataset":
        warnings.warn(
            "torchrl_depeff.data.collect_behaviour_dataset moved to torchrl_depeff.collectors."
            "collect_behaviour_dataset; import it from there (the old name will be removed)",
            FutureWarning,
            stacklevel=2,
        )
        from torchrl_depeff.collectors.behaviour import collect_behaviour_dataset

        return collect_behaviour_dataset
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
