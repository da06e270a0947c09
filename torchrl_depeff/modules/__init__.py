"""Neural-network modules: dynamics ensembles, normalisers, actors, baselines."""
from __future__ import annotations

from torchrl_depeff.modules.actors import (
    GaussianActionNoise,
    GaussianPolicyNet,
    make_gaussian_actor,
    UncertaintyActionNoise,
)
from torchrl_depeff.modules.baselines import discounted_returns, LinearFeatureBaseline
from torchrl_depeff.modules.distributions import (
    deterministic_action,
    diagonal_gaussian_params,
    mean_policy_kl,
    policy_entropy,
    policy_kl,
)
from torchrl_depeff.modules.ensemble import (
    DynamicsEnsemble,
    EnsembleLinear,
    EnsembleMLP,
    EnsemblePrediction,
    MemberPredictor,
)
from torchrl_depeff.modules.labeler import (
    bc_weights,
    disagreement_weight,
    expected_sq_error,
    ExplorationUncertainty,
    LabelerDisagreement,
    pair_sq_disagreement,
    support_from_predictions,
    UncertaintyLabeler,
)
from torchrl_depeff.modules.mixture import GMMPolicyNet, make_gmm_actor, TanhGaussianMixture
from torchrl_depeff.modules.normalizers import Normalizer

__all__ = [
    "DynamicsEnsemble",
    "EnsembleLinear",
    "EnsembleMLP",
    "EnsemblePrediction",
    "MemberPredictor",
    "ExplorationUncertainty",
    "GMMPolicyNet",
    "GaussianActionNoise",
    "GaussianPolicyNet",
    "LabelerDisagreement",
    "LinearFeatureBaseline",
    "Normalizer",
    "TanhGaussianMixture",
    "UncertaintyActionNoise",
    "UncertaintyLabeler",
    "bc_weights",
    "deterministic_action",
    "diagonal_gaussian_params",
    "disagreement_weight",
    "discounted_returns",
    "expected_sq_error",
    "make_gaussian_actor",
    "make_gmm_actor",
    "mean_policy_kl",
    "pair_sq_disagreement",
    "policy_entropy",
    "policy_kl",
    "support_from_predictions",
]
