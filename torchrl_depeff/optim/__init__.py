"""Optimisers: conjugate-gradient trust region (TRPO)."""
from __future__ import annotations

from torchrl_depeff.optim.trust_region import conjugate_gradient, ConjugateGradientTrustRegion

__all__ = ["ConjugateGradientTrustRegion", "conjugate_gradient"]
