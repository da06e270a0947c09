"""Neural-network modules: dynamics ensembles, normalisers, actors, baselines."""
from __future__ import annotations

from torchrl_depeff.modules.actors import (
    GaussianActionNoise,
    GaussianPolicyNet,
    make_gaussian_actor,
    UncertaintyActionNoise,
)
from torchrl_depeff.modules.baselines import discounted_returns, LinearFeatureBaseline
from torchrl_depeff.modules.ensemble import (
    DynamicsEnsemble,
    EnsembleLinear,
    EnsembleMLP,
    EnsemblePrediction,
)
from torchrl_depeff.modules.mixture import GMMPolicyNet, make_gmm_actor, TanhGaussianMixture
from torchrl_depeff.modules.normalizers import Normalizer

__all__ = [
    "DynamicsEnsemble",
    "EnsembleLinear",
    "EnsembleMLP",
    "EnsemblePrediction",
    "GMMPolicyNet",
    "GaussianActionNoise",
    "GaussianPolicyNet",
    "LinearFeatureBaseline",
    "Normalizer",
    "TanhGaussianMixture",
    "UncertaintyActionNoise",
    "discounted_returns",
    "make_gaussian_actor",
    "make_gmm_actor",
]
