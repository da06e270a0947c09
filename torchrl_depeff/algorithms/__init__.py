"""Deployment loops built from the package pieces: BREMEN (Alg. 1 and 2), MUSBO and MB2PO."""
from __future__ import annotations

from torchrl_depeff.algorithms.bremen import BREMEN, BREMENConfig, PAPER_HYPERPARAMETERS, PHASES, VARIANTS
from torchrl_depeff.algorithms.common import atomic_save, config_diff, episode_start_states, load_checkpoint
from torchrl_depeff.algorithms.mb2po import MB2PO, MB2POConfig
from torchrl_depeff.algorithms.musbo import (
    BUDGETS,
    deployment_analysis,
    MUSBO,
    MUSBO_PAPER_HYPERPARAMETERS,
    MUSBO_VARIANTS,
    MUSBOConfig,
)

__all__ = [
    "BREMEN",
    "BREMENConfig",
    "BUDGETS",
    "MB2PO",
    "MB2POConfig",
    "MUSBO",
    "MUSBOConfig",
    "MUSBO_PAPER_HYPERPARAMETERS",
    "MUSBO_VARIANTS",
    "PAPER_HYPERPARAMETERS",
    "PHASES",
    "VARIANTS",
    "atomic_save",
    "config_diff",
    "deployment_analysis",
    "episode_start_states",
    "load_checkpoint",
]
