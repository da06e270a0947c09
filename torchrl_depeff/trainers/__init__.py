"""Training routines (fit loops) of torchrl_depeff."""
from __future__ import annotations

from torchrl_depeff.trainers.dynamics import EnsembleTrainer, FitResult

__all__ = ["EnsembleTrainer", "FitResult"]
