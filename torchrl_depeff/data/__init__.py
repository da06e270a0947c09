"""Data: per-deployment replay buffers, behaviour datasets and offline dataset loaders."""
from __future__ import annotations

from torchrl_depeff.data.datasets import (
    ClippedGaussianAction,
    collect_behaviour_dataset,
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
    DeploymentReplayBuffers,
    REQUIRED_KEYS,
    validate_transitions,
)

__all__ = [
    "ClippedGaussianAction",
    "DeploymentReplayBuffers",
    "EpsilonUniformAction",
    "NOISE_VARIANTS",
    "REF_MAX_SCORE",
    "REF_MIN_SCORE",
    "REQUIRED_KEYS",
    "UniformRandomAction",
    "collect_behaviour_dataset",
    "d4rl_normalized_score",
    "d4rl_reference_returns",
    "load_behaviour_dataset",
    "load_d4rl_hdf5",
    "load_minari",
    "save_behaviour_dataset",
    "validate_offline_dataset",
    "validate_transitions",
]
