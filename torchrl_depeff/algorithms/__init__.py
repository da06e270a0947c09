"""Deployment loops built from the package pieces: BREMEN (Alg. 1 and 2)."""
from __future__ import annotations

from torchrl_depeff.algorithms.bremen import BREMEN, BREMENConfig, PAPER_HYPERPARAMETERS, PHASES, VARIANTS
from torchrl_depeff.algorithms.common import atomic_save, config_diff, episode_start_states, load_checkpoint

__all__ = [
    "BREMEN",
    "BREMENConfig",
    "PAPER_HYPERPARAMETERS",
    "PHASES",
    "VARIANTS",
    "atomic_save",
    "config_diff",
    "episode_start_states",
    "load_checkpoint",
]
