"""TorchRL ``LossModule``s: dynamics, TRPO (BREMEN), UW-TRPO (MUSBO), weighted BC, AWAC (MB2PO)."""
from __future__ import annotations

from torchrl_depeff.objectives.awac import AWACLoss
from torchrl_depeff.objectives.bc import BCLoss, train_bc, WeightedBCLoss
from torchrl_depeff.objectives.dynamics import EnsembleDynamicsLoss
from torchrl_depeff.objectives.trpo import trpo_step, TRPOLoss
from torchrl_depeff.objectives.uw_trpo import UncertaintyWeight, UncertaintyWeightedTRPOLoss

__all__ = [
    "AWACLoss",
    "BCLoss",
    "EnsembleDynamicsLoss",
    "TRPOLoss",
    "UncertaintyWeight",
    "UncertaintyWeightedTRPOLoss",
    "WeightedBCLoss",
    "train_bc",
    "trpo_step",
]
