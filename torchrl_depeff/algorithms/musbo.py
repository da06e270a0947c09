"""MUSBO: Model-based Uncertainty regularized and Sample efficient Batch Optimization (Su et al.).

MUSBO (https://arxiv.org/abs/2102.11448, Alg. 1) is BREMEN's deployment loop with model
uncertainty put to work in three places. Here it is the same
:class:`~torchrl_depeff.algorithms.loop.DeploymentLoop` as BREMEN with five MUSBO strategies:

* collect (Alg. 1 line 3, App. E eq. (22)), :class:`LabelerExploration`: from the second
  deployment on, the deployed action is ``a = tanh(mu(s)) + const + N(0, U(s, a))`` with
  ``const ~ N(0, 0.1^2)`` and ``U`` from the labeler
  (:class:`~torchrl_depeff.modules.ExplorationUncertainty` then
  :class:`~torchrl_depeff.modules.UncertaintyActionNoise`), the policy run with
  ``ExplorationType.DETERMINISTIC`` so that it contributes its mean only. The first deployment
  uses BREMEN's random initial policy ("at the first deployment, a random policy is used for data
  collection", sec. 5).
* fit (Alg. 1 lines 4-5, App. F), :class:`LabelerFit`: after the dynamics ensemble ``T_hat``
  (N = 5), the separate uncertainty labeler ``P_hat`` (K = 3 PNN, 2 x 1024, Adam 1e-3, 85/15
  split, patience 3) is refitted on all deployment data (warm start).
* pretrain (eq. (11)), :class:`LabelerBCWeights`: BC on all data (``D_all`` in eq. 11), each row
  weighted by its eq. (9) label.
* optimize (eq. (12)-(13)): every imaginary rollout is labelled with the squared disagreement of a
  random labeler pair (:class:`~torchrl_depeff.modules.LabelerDisagreement`, one pair per
  rollout) and the TRPO step uses :class:`~torchrl_depeff.objectives.UncertaintyWeightedTRPOLoss`
  (``exp(-alpha d^2)``, ``alpha = 0.028``).
* evaluate: BREMEN's evaluation plus the analysis metrics of
  :func:`~torchrl_depeff.metrics.deployment_analysis` (novelty of the new batch vs earlier data,
  energy distance and trajectory MSE of open-loop model rollouts vs the new real trajectories).

Choices where the paper is silent or ambiguous (each is a :class:`MUSBOConfig` field):

* **Exploration variance** (``exploration.mode``): eq. (22) writes ``N(0, U_hat)`` with the
  eq. (9) *support* ``U_hat`` (1 = well-known region) but App. E says the noise should steer
  the agent to "low support (or un-visited) regions". Default ``"support"``: the equation as
  printed. ``"error"`` (the labeler's clipped expected error ``1 - U_hat``, the text's reading)
  was measured worse: on HalfCheetah at the quick preset (3 deployments x 4000 samples, seeds
  0 and 1) the raw-state-space error exceeds eq. (9)'s clip almost everywhere, the variance
  averages 0.999 (noise std ~1 on actions in ``[-1, 1]``) and the deployed returns fall to
  -700..-900, while ``"support"`` deployed sane policies and ended at eval returns 912.9 and
  1382.7 (BREMEN, same seeds and samples: 351.0 and -455.4). With ``"support"`` the labeler term
  is small there (variance about 0.003): the deployment noise is mostly ``const``.
* **const noise** (``exploration.const_std = 0.1``): App. E/F call 0.01 the *variance* of
  ``const``, so its std is 0.1; ``U`` is read as a variance as well ("another Gaussian noise with
  variance equal to U", App. E).
* **All-zero BC weights**: when every eq. (9) label of the BC data is 0 (all errors >= 1, e.g. an
  early labeler in a large raw state space) eq. (11) is 0 for any policy; BC then falls back to
  uniform weights (logged as ``bc/uniform_fallback``) rather than keeping the untrained network.
* **BC data** (``bc.data = "all"``): eq. (11) sums over ``D_all``; BREMEN clones the latest batch.
* **Imaginary rollouts** (``imagination.member_selection = "per_trajectory"``): sec. 4 samples one
  dynamics model and rolls the whole fictitious trajectory out with it (Alg. 1's MBRL training
  draws it per iteration; the text per trajectory: we follow the text, one member per rollout,
  drawn at reset); BREMEN draws a member every step (eq. 2).
* **Early stopping patience** (``model.patience = 3``): App. F uses 3 for ``T_hat``, ``P_hat``
  and BC alike.
* **Labeler data**: App. F fits ``P_hat`` on all deployment data (sec. 3.2 could be read as
  "earlier batches only"); we fit on all data, after the dynamics model.
* **Table 2** sets ``L``, rollout length and ``delta``; other values are BREMEN's (App. F:
  "we used the exact parameters as Matsushima et al."), gamma 0.99 and GAE lambda 0.95 (0.97 for
  Ant). ``cheetah_run`` uses delta 0.05 (Table 2), unlike BREMEN's 0.1.
* **Metrics cost**: novelty compares at most ``analysis.max_states`` random states of each side;
  trajectory metrics use ``analysis.num_trajectories`` real windows of ``analysis.horizon`` steps
  cut from the new batch (whole windows inside one trajectory) and the dynamics ensemble's mean.
"""
from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import Any, Callable

import torch
from tensordict import TensorDict, TensorDictBase
from tensordict.nn import TensorDictModuleBase, TensorDictSequential
from torch import nn
from torchrl._utils import logger as torchrl_logger
from torchrl.envs.utils import ExplorationType

from torchrl_depeff.algorithms.bremen import (
    _table_defaults,
    ACTIVATION_MODULES,
    BREMEN,
    BREMENConfig,
    make_trainer,
    PRESETS as BREMEN_PRESETS,
)
from torchrl_depeff.algorithms.components import EnsembleFit
from torchrl_depeff.algorithms.config import (
    apply_preset,
    apply_table_row,
    BCConfig,
    check_bool,
    check_choice,
    check_float,
    check_int,
    ImaginationConfig,
    ModelConfig,
    Section,
)
from torchrl_depeff.algorithms.loop import DeploymentLoop
from torchrl_depeff.envs.tasks import get_task
from torchrl_depeff.metrics import deployment_analysis as _deployment_analysis
from torchrl_depeff.modules.actors import UncertaintyActionNoise
from torchrl_depeff.modules.labeler import (
    bc_weights,
    ExplorationUncertainty,
    LabelerDisagreement,
    UncertaintyLabeler,
)
from torchrl_depeff.objectives.uw_trpo import UncertaintyWeightedTRPOLoss

__all__ = [
    "BUDGETS",
    "DropKeys",
    "LabelerBCWeights",
    "LabelerExploration",
    "LabelerFit",
    "MUSBO",
    "MUSBOConfig",
    "MUSBO_PAPER_HYPERPARAMETERS",
    "MUSBO_VARIANTS",
    "TABLE2_COLUMNS",
    "deployment_analysis",
]

# ====================================================================
# MUSBO Table 2 (the only copy) and sec. 5's budgets
# --------------------------------------------------------------------

#: MUSBO Table 2 as printed: ``L`` (TRPO iterations per deployment), rollout length and TRPO's
#: ``delta``, per task; the deployments ``I`` of sec. 5 and the GAE lambda of App. F (BREMEN's)
#: complete each row.
MUSBO_PAPER_HYPERPARAMETERS: dict[str, dict[str, float | int]] = {
    "ant": {"L": 2000, "rollout_length": 250, "delta": 0.05, "deployments": 5, "gae_lambda": 0.97},
    "halfcheetah": {"L": 2000, "rollout_length": 250, "delta": 0.1, "deployments": 5, "gae_lambda": 0.95},
    "hopper": {"L": 6000, "rollout_length": 1000, "delta": 0.05, "deployments": 10, "gae_lambda": 0.95},
    "walker2d": {"L": 2000, "rollout_length": 1000, "delta": 0.05, "deployments": 10, "gae_lambda": 0.95},
    "cheetah_run": {"L": 2000, "rollout_length": 250, "delta": 0.05, "deployments": 5, "gae_lambda": 0.95},
}

#: where each Table 2 column goes in :class:`MUSBOConfig`
TABLE2_COLUMNS: dict[str, str] = {
    "L": "trpo.iterations",
    "rollout_length": "imagination.rollout_length",
    "delta": "trpo.max_kl",
    "deployments": "deployment.num_deployments",
    "gae_lambda": "trpo.gae_lambda",
}

#: total real samples of the two experiment settings of sec. 5 (``deployment.size = budget / I``)
BUDGETS: dict[str, int] = {"250k": 250_000, "500k": 500_000}

#: MUSBO without one of its three uses of uncertainty (ablations, sec. 5)
MUSBO_VARIANTS: dict[str, dict[str, Any]] = {
    "musbo": {},
    "no_exploration": {"exploration.enabled": False},  # BREMEN's stationary deployment noise
    "no_weighted_bc": {"uncertainty.weighted_bc": False},  # plain eq. (3) BC on all data
    "no_uw_trpo": {"uncertainty.alpha": 0.0},  # every eq. (12) weight is 1: plain TRPO
}

#: our presets over Table 2 (``quick``: minutes on 2 cores; ``smoke``: seconds)
MUSBO_PRESETS: dict[str, dict[str, Any]] = {
    "quick": {**BREMEN_PRESETS["quick"], "labeler.num_cells": (200, 200), "labeler.max_epochs": 50,
              "analysis.max_states": 1000, "analysis.num_trajectories": 16},
    "smoke": {**BREMEN_PRESETS["smoke"], "labeler.num_cells": (16,), "labeler.max_epochs": 2,
              "analysis.horizon": 5, "analysis.num_trajectories": 4},
}


# ====================================================================
# Config
# --------------------------------------------------------------------


@dataclass
class UncertaintyConfig(Section):
    """How MUSBO uses the labeler's labels (eq. 9, 11, 12).

    Args:
        member_reduction (str): eq. (9) member choice, ``"equation"`` or ``"max_error"``
            (see :func:`~torchrl_depeff.modules.support_from_predictions`).
        alpha (float): eq. (12) temperature, ``>= 0``. Defaults to 0.028 (App. F).
        disagreement_pair (str): eq. (12) pair draw, ``"per_trajectory"``, ``"per_call"`` or ``"per_row"``.
        weighted_bc (bool): eq. (11) weights (``False``: plain BC on ``bc.data``).
        bc_weight_normalize (bool): rescale BC weights to mean 1 (not in the paper).
    """

    member_reduction: str = "equation"
    alpha: float = 0.028
    disagreement_pair: str = "per_trajectory"
    weighted_bc: bool = True
    bc_weight_normalize: bool = False

    def _check(self, prefix: str) -> None:
        check_choice(self.member_reduction, f"{prefix}.member_reduction", ("equation", "max_error"))
        check_float(self.alpha, f"{prefix}.alpha", ge=0)
        check_choice(self.disagreement_pair, f"{prefix}.disagreement_pair", ("per_trajectory", "per_call", "per_row"))
        check_bool(self.weighted_bc, f"{prefix}.weighted_bc")
        check_bool(self.bc_weight_normalize, f"{prefix}.bc_weight_normalize")


@dataclass
class ExplorationConfig(Section):
    """Eq. (22) deployment noise ``const + N(0, U)`` (App. E).

    Args:
        enabled (bool): eq. (22) noise from the second deployment on (``False``: BREMEN's).
        mode (str): ``"support"`` (eq. 22 as printed) or ``"error"`` (see the module doc).
        aleatoric (bool): count the labeler's predicted variance in the expected error.
        const_std (float): std of ``const`` (App. E: variance 0.01).
        uncertainty_is (str): ``"variance"`` or ``"std"``.
    """

    enabled: bool = True
    mode: str = "support"
    aleatoric: bool = True
    const_std: float = 0.1
    uncertainty_is: str = "variance"

    def _check(self, prefix: str) -> None:
        check_bool(self.enabled, f"{prefix}.enabled")
        check_choice(self.mode, f"{prefix}.mode", ("support", "error"))
        check_bool(self.aleatoric, f"{prefix}.aleatoric")
        check_float(self.const_std, f"{prefix}.const_std", ge=0)
        check_choice(self.uncertainty_is, f"{prefix}.uncertainty_is", ("variance", "std"))


@dataclass
class AnalysisConfig(Section):
    """MUSBO sec. 5 analysis metrics after each deployment (novelty, energy distance, MSE).

    Args:
        enabled (bool): compute them. Defaults to ``True``.
        max_states (int): states per side for the novelty score. Defaults to 2000.
        num_trajectories (int): real windows for energy distance / MSE. Defaults to 32.
        horizon (int): steps per window. Defaults to 50.
    """

    enabled: bool = True
    max_states: int = 2000
    num_trajectories: int = 32
    horizon: int = 50

    def _check(self, prefix: str) -> None:
        check_bool(self.enabled, f"{prefix}.enabled")
        for name in ("max_states", "num_trajectories", "horizon"):
            check_int(getattr(self, name), f"{prefix}.{name}")


def _imagination_defaults() -> ImaginationConfig:
    # MUSBO sec. 4: "to generate a fictitious trajectory, we first randomly sample a model i ... and
    # then we roll-out the trajectory": one member per imaginary trajectory
    return replace(_table_defaults("imagination", ImaginationConfig)(), member_selection="per_trajectory")


def _labeler_defaults() -> ModelConfig:
    # MUSBO App. F: K = 3 PNN, 2 x 1024, Adam 1e-3, batch 256, 85/15 split, patience 3
    return ModelConfig(num_members=3, probabilistic=True, batch_size=256, max_epochs=100, patience=3)


@dataclass
class MUSBOConfig(BREMENConfig):
    """:class:`~torchrl_depeff.algorithms.bremen.BREMENConfig` plus MUSBO's sections (App. E, F).

    Defaults are MUSBO's HalfCheetah values (Table 2, App. F). Changed from BREMEN:
    ``bc.data="all"`` (eq. (11) sums over ``D_all``), ``model.patience=3`` (App. F) and
    ``imagination.member_selection="per_trajectory"`` (sec. 4: one sampled model per fictitious
    trajectory; BREMEN redraws a member every step).

    Args:
        labeler (ModelConfig): the labeler PNN ``P_hat`` (``num_members >= 2``).
        uncertainty (UncertaintyConfig): eq. (9), (11), (12) settings.
        exploration (ExplorationConfig): eq. (22) deployment noise.
        analysis (AnalysisConfig): sec. 5 analysis metrics.
        **BREMENConfig fields**: see :class:`~torchrl_depeff.algorithms.bremen.BREMENConfig`.

    Examples:
        >>> from torchrl_depeff.algorithms.musbo import MUSBOConfig
        >>> cfg = MUSBOConfig.paper("walker2d", budget="250k")
        >>> cfg.trpo.iterations, cfg.imagination.rollout_length, cfg.trpo.max_kl, cfg.deployment.size
        (2000, 1000, 0.05, 25000)
        >>> MUSBOConfig().variant("no_uw_trpo").uncertainty.alpha
        0.0
        >>> MUSBOConfig().override({"uncertainty.alpha": -1.0})
        Traceback (most recent call last):
        ...
        ValueError: uncertainty.alpha must be a finite number >= 0, got -1.0
    """

    name: str = "musbo"
    model: ModelConfig = field(default_factory=lambda: ModelConfig(patience=3))
    bc: BCConfig = field(default_factory=lambda: BCConfig(data="all"))
    imagination: ImaginationConfig = field(default_factory=_imagination_defaults)
    labeler: ModelConfig = field(default_factory=_labeler_defaults)
    uncertainty: UncertaintyConfig = field(default_factory=UncertaintyConfig)
    exploration: ExplorationConfig = field(default_factory=ExplorationConfig)
    analysis: AnalysisConfig = field(default_factory=AnalysisConfig)

    _LEGACY_KEYS = {
        **BREMENConfig._LEGACY_KEYS,
        "holdout_ratio": ("model.holdout_ratio", "bc.holdout_ratio", "labeler.holdout_ratio"),
        "labeler_size": "labeler.num_members", "labeler_num_cells": "labeler.num_cells",
        "labeler_lr": "labeler.lr", "labeler_batch_size": "labeler.batch_size",
        "labeler_max_epochs": "labeler.max_epochs", "labeler_patience": "labeler.patience",
        "labeler_member_reduction": "uncertainty.member_reduction", "alpha": "uncertainty.alpha",
        "disagreement_pair": "uncertainty.disagreement_pair", "weighted_bc": "uncertainty.weighted_bc",
        "bc_weight_normalize": "uncertainty.bc_weight_normalize",
        "uncertainty_exploration": "exploration.enabled", "exploration_mode": "exploration.mode",
        "exploration_aleatoric": "exploration.aleatoric", "exploration_const_std": "exploration.const_std",
        "exploration_uncertainty_is": "exploration.uncertainty_is", "metrics": "analysis.enabled",
        "metrics_max_states": "analysis.max_states", "metrics_num_trajectories": "analysis.num_trajectories",
        "metrics_horizon": "analysis.horizon",
    }

    def _check(self, prefix: str) -> None:
        super()._check(prefix)
        if self.labeler.num_members < 2:
            raise ValueError(
                f"labeler.num_members (K) must be an int >= 2 (MUSBO eq. 12 samples a pair of labeler "
                f"members), got {self.labeler.num_members!r}"
            )
        if not self.labeler.probabilistic:
            raise ValueError("labeler.probabilistic must be True: the labeler is a PNN (MUSBO eq. 10)")

    @classmethod
    def paper(cls, task: str, budget: str | None = "500k", **overrides: Any) -> MUSBOConfig:
        """Table 2 values of ``task`` with ``deployment.size = budget / deployments``.

        Args:
            task (str): one of :data:`MUSBO_PAPER_HYPERPARAMETERS`.
            budget (str, optional): ``"250k"`` or ``"500k"`` (sec. 5); ``None`` keeps the
                default ``deployment.size``.
            **overrides: dotted config paths.

        Examples:
            >>> from torchrl_depeff.algorithms.musbo import MUSBOConfig
            >>> cfg = MUSBOConfig.paper("ant")
            >>> cfg.deployment.size, cfg.trpo.gae_lambda
            (100000, 0.97)
        """
        if task not in MUSBO_PAPER_HYPERPARAMETERS:
            raise ValueError(f"unknown task {task!r}; valid names are {sorted(MUSBO_PAPER_HYPERPARAMETERS)}")
        row = MUSBO_PAPER_HYPERPARAMETERS[task]
        cfg = apply_table_row(cls(task=task), row, TABLE2_COLUMNS)
        if budget is not None:
            if budget not in BUDGETS:
                raise ValueError(f"unknown budget {budget!r}; valid budgets are {sorted(BUDGETS)}")
            cfg = cfg.override({"deployment.size": BUDGETS[budget] // int(row["deployments"])})
        return cfg.override(overrides) if overrides else cfg

    @classmethod
    def preset(cls, task: str, preset: str = "paper", budget: str | None = "500k", **overrides: Any) -> MUSBOConfig:
        """``"paper"`` (:meth:`paper` with ``budget``) or one of ``quick``/``smoke`` over it.

        Examples:
            >>> from torchrl_depeff.algorithms.musbo import MUSBOConfig
            >>> MUSBOConfig.preset("hopper", "quick").labeler.num_cells
            (200, 200)
        """
        return apply_preset(cls.paper(task, budget=budget), preset, MUSBO_PRESETS, overrides)

    @classmethod
    def tiny(cls, **overrides: Any) -> MUSBOConfig:
        """The ``smoke`` preset on HalfCheetah (seconds)."""
        return cls.preset("halfcheetah", "smoke", **overrides)

    @classmethod
    def variants(cls) -> dict[str, dict[str, Any]]:
        return MUSBO_VARIANTS


# ====================================================================
# MUSBO's strategies
# --------------------------------------------------------------------


class DropKeys(TensorDictModuleBase):
    """Delete entries from a TensorDict in place (keeps helper entries out of the stored data).

    Args:
        *keys (str): entries to delete; missing ones are ignored.

    Examples:
        >>> from tensordict import TensorDict
        >>> from torchrl_depeff.algorithms.musbo import DropKeys
        >>> td = TensorDict(a=torch.zeros(2), b=torch.ones(2), batch_size=[2])
        >>> list(DropKeys("b")(td).keys())
        ['a']
    """

    def __init__(self, *keys: str) -> None:
        super().__init__()
        self.keys_to_drop = list(keys)
        self.in_keys = list(keys)
        self.out_keys = []

    def forward(self, tensordict: TensorDictBase) -> TensorDictBase:
        for key in self.keys_to_drop:
            if key in tensordict.keys():
                del tensordict[key]
        return tensordict


class LabelerFit(EnsembleFit):
    """Fit phase, second half (MUSBO Alg. 1 l. 5, eq. 10): refit the labeler ``P_hat`` on all data."""

    def __init__(self, labeler: UncertaintyLabeler, trainer: Any) -> None:
        super().__init__(labeler.ensemble, trainer, prefix="labeler", per_member=False)
        self.labeler = labeler

    def require_fitted(self, what: str) -> None:
        """Raise ``RuntimeError`` naming ``what`` if the labeler was never fitted."""
        if not self.fitted:
            raise RuntimeError(f"{what} needs a fitted labeler: run the fit phase first")


class LabelerExploration:
    """Collect-phase strategy of MUSBO eq. (22): ``const + N(0, U)`` from the second deployment on.

    Args:
        labeler_fit (LabelerFit): the labeler and whether it is fitted.
        config (ExplorationConfig): eq. (22) settings.

    Keyword Args:
        probe_states (int): states of the new deployment on which the mean variance is reported.
        seed (int): seed of the probe draw.
    """

    KEY = "exploration_variance"

    def __init__(self, labeler_fit: LabelerFit, config: ExplorationConfig, *, probe_states: int, seed: int) -> None:
        self.labeler_fit = labeler_fit
        self.config = config
        self.probe_states = int(probe_states)
        self.seed = int(seed)

    def active(self, loop: Any) -> bool:
        return self.config.enabled and loop.deployment > 0

    def make_module(self) -> TensorDictModuleBase:
        """Reads ``tanh(mu(s))`` as ``"action"`` and writes the noisy ``"action"``; the helper key is dropped."""
        cfg = self.config
        return TensorDictSequential(
            ExplorationUncertainty(self.labeler_fit.labeler, mode=cfg.mode, aleatoric=cfg.aleatoric, out_key=self.KEY),
            UncertaintyActionNoise(cfg.const_std, uncertainty_key=self.KEY, uncertainty_is=cfg.uncertainty_is),
            DropKeys(self.KEY),
        )

    def module(self, loop: Any) -> tuple[nn.Module | None, ExplorationType]:
        if not self.active(loop):
            return None, ExplorationType.RANDOM
        self.labeler_fit.require_fitted("eq. (22) exploration")
        module = self.make_module()
        param = next(iter(self.labeler_fit.labeler.parameters()))
        if param.device.type != "cpu":
            import copy

            module = copy.deepcopy(module).to("cpu")
        return module, ExplorationType.DETERMINISTIC

    def metrics(self, loop: Any) -> dict[str, float]:
        use = self.active(loop)
        out = {"deployment/uncertainty_exploration": float(use)}
        if use:
            # mean eq. (22) variance over the states the deployed policy visited (at its mean action)
            latest = loop.buffers.as_tensordict("latest").reshape(-1)
            g = torch.Generator().manual_seed(self.seed + 17 * (loop.deployment + 1))
            idx = torch.randperm(latest.shape[0], generator=g)[: self.probe_states]
            probe = TensorDict(
                {"observation": latest["observation"][idx], "action": latest["loc"][idx]}, [idx.numel()]
            ).to(loop.device)
            cfg = self.config
            var = ExplorationUncertainty(self.labeler_fit.labeler, mode=cfg.mode, aleatoric=cfg.aleatoric)(probe)
            out["deployment/exploration_variance"] = float(var["uncertainty"].mean())
        return out


class LabelerBCWeights:
    """BC weighting of MUSBO eq. (11): each row weighted by its eq. (9) label (uniform fallback).

    The eq. (9) labels go to ``"uncertainty"`` and the weights to ``"bc_weight"``. If every weight
    is 0 (every eq. (9) error >= 1) BC would not move: it clones with uniform weights instead, with
    a warning and ``bc/uniform_fallback = 1``.
    """

    def __init__(self, labeler_fit: LabelerFit, *, normalize: bool) -> None:
        self.labeler_fit = labeler_fit
        self.normalize = bool(normalize)

    def __call__(self, loop: Any, data: TensorDictBase) -> tuple[TensorDictBase, str | None, dict[str, float]]:
        self.labeler_fit.require_fitted("weighted BC (eq. 11)")
        data = self.labeler_fit.labeler(data)  # eq. (9) -> "uncertainty"
        bc_weights(data, normalize=self.normalize)  # eq. (11) -> "bc_weight"
        weight_key: str | None = "bc_weight"
        out = {"bc/weight_mean": float(data["bc_weight"].mean())}
        if not bool((data["bc_weight"] > 0).any()):
            torchrl_logger.warning(
                f"deployment {loop.deployment}: every eq. (11) BC weight is 0 (labeler errors >= 1); "
                "cloning with uniform weights instead"
            )
            weight_key = None
        out["bc/uniform_fallback"] = float(weight_key is None)
        return data, weight_key, out


class _RolloutLabels:
    """Eq. (12) labels of imaginary rollouts (the optimize phase's rollout labeller)."""

    def __init__(self, labeler_fit: LabelerFit, disagreement: LabelerDisagreement) -> None:
        self.labeler_fit = labeler_fit
        self.disagreement = disagreement

    def __call__(self, rollout: TensorDictBase) -> TensorDictBase:
        self.labeler_fit.require_fitted("eq. (12) labels")
        return self.disagreement(rollout)


def _uw_loss_factory(alpha: float, normalize_advantage: bool) -> Callable[..., UncertaintyWeightedTRPOLoss]:
    def make(actor: nn.Module, baseline: nn.Module, reference: nn.Module | None) -> UncertaintyWeightedTRPOLoss:
        return UncertaintyWeightedTRPOLoss(actor, baseline, alpha=alpha, normalize_advantage=normalize_advantage)

    return make


def _uw_batch_metrics(loss: UncertaintyWeightedTRPOLoss, rollout: TensorDictBase) -> dict[str, float]:
    """Mean and min of the eq. (12) weights of the batch."""
    weight = loss.uncertainty_weight(rollout)
    return {"train/uncertainty_weight": float(weight.mean()), "train/uncertainty_weight_min": float(weight.min())}


class _Analysis:
    """MUSBO sec. 5 analysis metrics of the latest deployment (not for offline runs)."""

    def __init__(self, config: AnalysisConfig, seed: int) -> None:
        self.config = config
        self.seed = seed

    def __call__(self, loop: Any) -> dict[str, float]:
        if not self.config.enabled or loop.config.mode == "offline":
            return {}
        c = self.config
        return _deployment_analysis(loop.buffers, loop.models["dynamics"].ensemble, seed=self.seed,
                                    max_states=c.max_states, num_trajectories=c.num_trajectories, horizon=c.horizon)


# ====================================================================
# The loop
# --------------------------------------------------------------------


class MUSBO(BREMEN):
    """MUSBO's deployment loop (Alg. 1): BREMEN's loop with the labeler's five strategies.

    Same constructor, phases, checkpointing and resume as
    :class:`~torchrl_depeff.algorithms.bremen.BREMEN` (it only changes the wiring); adds
    :attr:`labeler` (the PNN ``P_hat``) and :attr:`disagreement` (eq. (12) labels of imaginary
    rollouts). The offline mode also works: fit, weighted BC, UW-TRPO.

    Args:
        config (MUSBOConfig): hyper-parameters.

    Keyword Args:
        **kwargs: as for :class:`~torchrl_depeff.algorithms.bremen.BREMEN` (``collect_kwargs``
            must not set ``exploration`` / ``exploration_type``, which MUSBO owns).

    Examples:
        >>> import tempfile
        >>> from torchrl_depeff.algorithms.musbo import MUSBO, MUSBOConfig
        >>> algo = MUSBO(MUSBOConfig.tiny(), run_dir=tempfile.mkdtemp())
        >>> metrics = algo.deployment_step()
        >>> metrics["deployment/count"], "labeler/holdout_loss" in metrics, "train/uncertainty_weight" in metrics
        (1, True, True)
    """

    def __init__(self, config: MUSBOConfig, **kwargs: Any) -> None:
        if not isinstance(config, MUSBOConfig):
            raise TypeError(f"config must be a MUSBOConfig, got {type(config).__name__}")
        owned = {"exploration", "exploration_type"} & set(kwargs.get("collect_kwargs") or {})
        if owned:
            raise ValueError(f"collect_kwargs must not set {sorted(owned)}: MUSBO sets them (eq. 22)")
        super().__init__(config, **kwargs)

    @classmethod
    def _build(cls, cfg: MUSBOConfig, **kwargs: Any) -> dict[str, Any]:
        state: dict[str, Any] = {}

        def extra_models(cfg: MUSBOConfig, device: torch.device, logger: Any) -> dict[str, Any]:
            task = get_task(cfg.task)
            m = cfg.labeler
            labeler = UncertaintyLabeler(
                task.observation_dim, task.action_dim, num_members=m.num_members, num_cells=m.num_cells,
                member_reduction=cfg.uncertainty.member_reduction, activation=ACTIVATION_MODULES[m.activation],
            ).to(device)
            trainer = make_trainer(labeler.ensemble, m, seed=cfg.seed + 2, loss_type="nll")
            state["fit"] = LabelerFit(labeler, trainer)
            return {"labeler": state["fit"]}

        parts = super()._build(cfg, extra_models=extra_models, **kwargs)
        fit: LabelerFit = state["fit"]
        u = cfg.uncertainty
        generator = torch.Generator().manual_seed(cfg.seed + 3)
        disagreement = LabelerDisagreement(fit.labeler, pair=u.disagreement_pair, generator=generator)
        parts["source"].exploration = LabelerExploration(
            fit, cfg.exploration, probe_states=cfg.analysis.max_states, seed=cfg.seed,
        )
        if u.weighted_bc:
            parts["initializer"].weighting = LabelerBCWeights(fit, normalize=u.bc_weight_normalize)
        improver = parts["improver"]
        if improver is not None:
            improver.loss_factory = _uw_loss_factory(u.alpha, cfg.trpo.normalize_advantage)
            improver.rollout_labeller = _RolloutLabels(fit, disagreement)
            improver.batch_metrics = _uw_batch_metrics
            improver.disagreement = disagreement
        parts["evaluator"].analyses.append(_Analysis(cfg.analysis, cfg.seed))
        return parts

    # ------------------------------------------------------------------ shortcuts
    @property
    def labeler(self) -> UncertaintyLabeler:
        """The uncertainty labeler ``P_hat`` (eq. 9-10)."""
        return self.models["labeler"].labeler

    @property
    def labeler_fitted(self) -> bool:
        """Whether the labeler has been fitted at least once."""
        return self.models["labeler"].fitted

    @property
    def disagreement(self) -> LabelerDisagreement:
        """Eq. (12) labels of imaginary rollouts."""
        return self.improver.rollout_labeller.disagreement

    def make_exploration(self) -> TensorDictModuleBase:
        """The eq. (22) deployment noise module (labeler variance, ``const + N(0, U)``, helper key dropped).

        Examples:
            >>> import tempfile
            >>> from tensordict import TensorDict
            >>> from torchrl_depeff.algorithms.musbo import MUSBO, MUSBOConfig
            >>> algo = MUSBO(MUSBOConfig.tiny(), data_root=tempfile.mkdtemp())
            >>> td = TensorDict(observation=torch.zeros(5, 17), action=torch.zeros(5, 6), batch_size=[5])
            >>> sorted(algo.make_exploration()(td).keys())
            ['action', 'observation']
        """
        return self.source.exploration.make_module()

    def label_rollout(self, rollout: TensorDictBase) -> TensorDictBase:
        """Eq. (12): write ``d^2`` of a random labeler pair (one per rollout) as ``"uncertainty"``."""
        return self.improver.rollout_labeller(rollout)

    def analysis_metrics(self) -> dict[str, float]:
        """Sec. 5 metrics of the latest deployment (see :func:`~torchrl_depeff.metrics.deployment_analysis`)."""
        c = self.config.analysis
        return _deployment_analysis(self.buffers, self.ensemble, seed=self.config.seed, max_states=c.max_states,
                                    num_trajectories=c.num_trajectories, horizon=c.horizon)

    # the labeler pair RNG lives outside the strategies' own state
    def state_dict(self) -> dict[str, Any]:
        state = super().state_dict()
        state["rng"]["labeler_pairs"] = self.disagreement.generator.get_state() if self.improver else None
        return state

    def load_state_dict(self, state: dict[str, Any]) -> None:
        super().load_state_dict(state)
        if self.improver is not None and state["rng"].get("labeler_pairs") is not None:
            self.disagreement.generator.set_state(state["rng"]["labeler_pairs"])


def deployment_analysis(algo: DeploymentLoop, *, max_states: int = 2000, num_trajectories: int = 32,
                        horizon: int = 50) -> dict[str, float]:
    """MUSBO sec. 5 analysis of the latest deployment of a BREMEN-family run.

    Deprecated location: call :func:`torchrl_depeff.metrics.deployment_analysis` with the run's
    buffers and dynamics ensemble. Kept for scripts of torchrl_depeff 0.1.

    Examples:
        >>> import tempfile
        >>> from torchrl_depeff.algorithms import BREMEN, BREMENConfig
        >>> from torchrl_depeff.algorithms.musbo import deployment_analysis
        >>> algo = BREMEN(BREMENConfig.tiny(), data_root=tempfile.mkdtemp())
        >>> _ = algo.deployment_step()
        >>> sorted(deployment_analysis(algo, horizon=5, num_trajectories=4))
        ['metrics/energy_distance', 'metrics/trajectory_mse']
    """
    return _deployment_analysis(algo.buffers, algo.models["dynamics"].ensemble, seed=algo.config.seed,
                                max_states=max_states, num_trajectories=num_trajectories, horizon=horizon)

