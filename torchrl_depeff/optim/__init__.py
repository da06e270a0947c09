"""Optimisers: conjugate-gradient trust region (TRPO) and its Fisher-vector products."""
from __future__ import annotations

from torchrl_depeff.optim.fisher import double_backward_fvp, gauss_newton_fvp, mlp_gaussian_fvp
from torchrl_depeff.optim.trust_region import conjugate_gradient, ConjugateGradientTrustRegion, FISHER_METHODS

__all__ = [
    "ConjugateGradientTrustRegion",
    "FISHER_METHODS",
    "conjugate_gradient",
    "double_backward_fvp",
    "gauss_newton_fvp",
    "mlp_gaussian_fvp",
]
