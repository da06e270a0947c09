"""MUSBO: Model-based Uncertainty regularized and Sample efficient Batch Optimization (Su et al.).

MUSBO (https://arxiv.org/abs/2102.11448, Alg. 1) is BREMEN's deployment loop with model
uncertainty put to work in three places, so :class:`MUSBO` subclasses
:class:`~torchrl_depeff.algorithms.bremen.BREMEN` and overrides only those phases:

* ``collect`` (Alg. 1 line 3, App. E eq. (22)): from the second deployment on, the deployed
  action is ``a = tanh(mu(s)) + const + N(0, U(s, a))`` with ``const ~ N(0, 0.1^2)`` and ``U``
  from the labeler (:class:`~torchrl_depeff.modules.ExplorationUncertainty` followed by
  :class:`~torchrl_depeff.modules.UncertaintyActionNoise`), deployed with
  ``ExplorationType.DETERMINISTIC`` so that the policy contributes its mean only. The first
  deployment uses BREMEN's random initial policy ("at the first deployment, a random policy is
  used for data collection", sec. 5).
* ``fit`` (Alg. 1 lines 4-5, App. F): the BREMEN dynamics ensemble ``T_hat`` (N = 5) and then
  the separate uncertainty labeler ``P_hat`` (:class:`~torchrl_depeff.modules.UncertaintyLabeler`,
  K = 3 PNN, 2 x 1024, Adam 1e-3, 85/15 split, patience 3) are refitted on all deployment data
  (warm start).
* ``bc`` (eq. (11)): BC on all data (``D_all`` in eq. 11), each row weighted by its eq. (9) label.
* ``optimize`` (eq. (12)-(13)): every imaginary rollout is labelled with the squared disagreement
  of a random labeler pair (:class:`~torchrl_depeff.modules.LabelerDisagreement`, one pair per
  rollout) and the TRPO step uses
  :class:`~torchrl_depeff.objectives.UncertaintyWeightedTRPOLoss` (``exp(-alpha d^2)``,
  ``alpha = 0.028``).
* ``evaluate``: BREMEN's evaluation plus the analysis metrics of :mod:`torchrl_depeff.metrics`
  (novelty of the new batch vs earlier data, energy distance and trajectory MSE of open-loop
  model rollouts vs the new real trajectories), logged under
  :data:`~torchrl_depeff.metrics.METRIC_NAMES`.

Choices where the paper is silent or ambiguous (each is a :class:`MUSBOConfig` field):

* **Exploration variance** (``exploration_mode``): eq. (22) writes ``N(0, U_hat)`` with the
  eq. (9) *support* ``U_hat`` (1 = well-known region) but App. E says the noise should steer
  the agent to "low support (or un-visited) regions". Default ``"support"``: the equation as
  printed. ``"error"`` (the labeler's clipped expected error ``1 - U_hat``, the text's reading)
  was measured worse: on HalfCheetah at the quick preset (3 deployments x 4000 samples, seeds
  0 and 1) the raw-state-space error exceeds eq. (9)'s clip almost everywhere, the variance
  averages 0.999 (noise std ~1 on actions in ``[-1, 1]``) and the deployed returns fall to
  -700..-900, while ``"support"`` deployed sane policies (171.6 / 713.9 and 956.2 / -233.2 in
  deployments 2 / 3) and ended at eval returns 912.9 and 1382.7 (BREMEN, same seeds and
  samples: 351.0 and -455.4). With ``"support"`` the labeler term is small there (variance
  about 0.003): the deployment noise is mostly ``const``.
* **const noise** (``exploration_const_std = 0.1``): App. E/F call 0.01 the *variance* of
  ``const``, so its std is 0.1; ``U`` is read as a variance as well ("another Gaussian noise with
  variance equal to U", App. E).
* **All-zero BC weights**: when every eq. (9) label of the BC data is 0 (all errors >= 1, e.g. an
  early labeler in a large raw state space) eq. (11) is 0 for any policy; BC then falls back to
  uniform weights (logged as ``bc/uniform_fallback``) rather than keeping the untrained network.
* **BC data** (``bc_data = "all"``): eq. (11) sums over ``D_all``; BREMEN clones the latest batch.
* **Early stopping patience** (``dynamics_patience = 3``): App. F uses 3 for ``T_hat``, ``P_hat``
  and BC alike.
* **Labeler data**: issue 6 / App. F fit ``P_hat`` on all deployment data (sec. 3.2 could be
  read as "earlier batches only"); we fit on all data, after the dynamics model.
* **Table 2** sets ``L``, rollout length and ``delta``; other values are BREMEN's (App. F:
  "we used the exact parameters as Matsushima et al."), gamma 0.99 and GAE lambda 0.95 (0.97 for
  Ant). ``cheetah_run`` uses delta 0.05 (Table 2), unlike BREMEN's 0.1.
* **Metrics cost**: novelty compares at most ``metrics_max_states`` random states of each side;
  trajectory metrics use ``metrics_num_trajectories`` real windows of ``metrics_horizon`` steps
  cut from the new batch (whole windows inside one trajectory) and the dynamics ensemble's mean.
"""
from __future__ import annotations

import copy
import math
from dataclasses import dataclass, replace
from typing import Any

import torch
from tensordict import TensorDict, TensorDictBase
from tensordict.nn import TensorDictModuleBase, TensorDictSequential
from torchrl._utils import logger as torchrl_logger
from torchrl.envs.utils import ExplorationType

from torchrl_depeff.algorithms.bremen import BREMEN, BREMENConfig
from torchrl_depeff.metrics import deployment_metrics
from torchrl_depeff.modules.actors import UncertaintyActionNoise
from torchrl_depeff.modules.labeler import (
    bc_weights,
    ExplorationUncertainty,
    LabelerDisagreement,
    UncertaintyLabeler,
)
from torchrl_depeff.objectives.uw_trpo import UncertaintyWeightedTRPOLoss

__all__ = [
    "MUSBOConfig",
    "MUSBO",
    "MUSBO_PAPER_HYPERPARAMETERS",
    "MUSBO_VARIANTS",
    "BUDGETS",
    "DropKeys",
    "deployment_analysis",
]

#: MUSBO Table 2 (``L`` = TRPO iterations per deployment, rollout length, TRPO's delta), with the
#: number of deployments of sec. 5 and the GAE lambda of App. F.
MUSBO_PAPER_HYPERPARAMETERS: dict[str, dict[str, Any]] = {
    "ant": dict(iterations_per_deployment=2000, rollout_length=250, max_kl=0.05, num_deployments=5, gae_lambda=0.97),
    "halfcheetah": dict(iterations_per_deployment=2000, rollout_length=250, max_kl=0.1, num_deployments=5, gae_lambda=0.95),
    "hopper": dict(iterations_per_deployment=6000, rollout_length=1000, max_kl=0.05, num_deployments=10, gae_lambda=0.95),
    "walker2d": dict(iterations_per_deployment=2000, rollout_length=1000, max_kl=0.05, num_deployments=10, gae_lambda=0.95),
    "cheetah_run": dict(iterations_per_deployment=2000, rollout_length=250, max_kl=0.05, num_deployments=5, gae_lambda=0.95),
}

#: total real samples of the two experiment settings of sec. 5 (``deployment_size = budget / I``)
BUDGETS: dict[str, int] = {"250k": 250_000, "500k": 500_000}

#: MUSBO without one of its three uses of uncertainty (ablations, sec. 5)
MUSBO_VARIANTS: dict[str, dict[str, Any]] = {
    "musbo": {},
    "no_exploration": {"uncertainty_exploration": False},  # BREMEN's stationary deployment noise
    "no_weighted_bc": {"weighted_bc": False},  # plain eq. (3) BC on all data
    "no_uw_trpo": {"alpha": 0.0},  # every eq. (12) weight is 1: plain TRPO
}

_EXPLORATION_MODES = ("error", "support")
_UNCERTAINTY_IS = ("variance", "std")
_MEMBER_REDUCTIONS = ("equation", "max_error")
_PAIR_MODES = ("per_trajectory", "per_call", "per_row")


@dataclass
class MUSBOConfig(BREMENConfig):
    """:class:`~torchrl_depeff.algorithms.bremen.BREMENConfig` plus MUSBO's knobs (App. E, F).

    Defaults are MUSBO's HalfCheetah values (Table 2, App. F). Fields changed from BREMEN:
    ``bc_data="all"`` (eq. (11) sums over ``D_all``) and ``dynamics_patience=3`` (App. F).

    Args:
        labeler_size (int): ``K`` of the labeler PNN ensemble, ``>= 2``. Defaults to 3.
        labeler_num_cells (tuple): labeler hidden sizes. Defaults to ``(1024, 1024)``.
        labeler_lr (float): labeler Adam learning rate. Defaults to ``1e-3``.
        labeler_batch_size (int): labeler minibatch. Defaults to 256.
        labeler_max_epochs (int): labeler epoch cap per fit. Defaults to 100.
        labeler_patience (int): labeler early stopping patience. Defaults to 3.
        labeler_member_reduction (str): eq. (9) member choice, ``"equation"`` or ``"max_error"``
            (see :func:`~torchrl_depeff.modules.support_from_predictions`).
        alpha (float): eq. (12) temperature, ``>= 0``. Defaults to 0.028 (App. F).
        disagreement_pair (str): eq. (12) pair draw, ``"per_trajectory"`` (default),
            ``"per_call"`` or ``"per_row"``.
        weighted_bc (bool): eq. (11) weights (``False``: plain BC on ``bc_data``). Defaults to ``True``.
        bc_weight_normalize (bool): rescale BC weights to mean 1 (not in the paper). Defaults to ``False``.
        uncertainty_exploration (bool): eq. (22) deployment noise (``False``: BREMEN's). Defaults
            to ``True``.
        exploration_mode (str): ``"support"`` (default, eq. (22) as printed) or ``"error"``
            (see module doc).
        exploration_aleatoric (bool): count the labeler's predicted variance in the eq. (22)
            expected error (see :class:`~torchrl_depeff.modules.ExplorationUncertainty`).
            Defaults to ``True``.
        exploration_const_std (float): std of ``const`` in eq. (22). Defaults to 0.1.
        exploration_uncertainty_is (str): ``"variance"`` (default) or ``"std"``.
        metrics (bool): compute the analysis metrics in ``evaluate``. Defaults to ``True``.
        metrics_max_states (int): states per side for the novelty score. Defaults to 2000.
        metrics_num_trajectories (int): real windows for energy distance / MSE. Defaults to 32.
        metrics_horizon (int): steps per window. Defaults to 50.
        **BREMENConfig fields**: see :class:`~torchrl_depeff.algorithms.bremen.BREMENConfig`.

    Examples:
        >>> from torchrl_depeff.algorithms.musbo import MUSBOConfig
        >>> cfg = MUSBOConfig.paper("walker2d", budget="250k")
        >>> cfg.iterations_per_deployment, cfg.rollout_length, cfg.max_kl, cfg.deployment_size
        (2000, 1000, 0.05, 25000)
        >>> MUSBOConfig().variant("no_uw_trpo").alpha
        0.0
        >>> MUSBOConfig(alpha=-1.0)
        Traceback (most recent call last):
        ...
        ValueError: alpha must be a finite number >= 0, got -1.0
    """

    bc_data: str = "all"
    dynamics_patience: int = 3
    labeler_size: int = 3
    labeler_num_cells: tuple[int, ...] = (1024, 1024)
    labeler_lr: float = 1e-3
    labeler_batch_size: int = 256
    labeler_max_epochs: int = 100
    labeler_patience: int = 3
    labeler_member_reduction: str = "equation"
    alpha: float = 0.028
    disagreement_pair: str = "per_trajectory"
    weighted_bc: bool = True
    bc_weight_normalize: bool = False
    uncertainty_exploration: bool = True
    exploration_mode: str = "support"
    exploration_aleatoric: bool = True
    exploration_const_std: float = 0.1
    exploration_uncertainty_is: str = "variance"
    metrics: bool = True
    metrics_max_states: int = 2000
    metrics_num_trajectories: int = 32
    metrics_horizon: int = 50

    def __post_init__(self) -> None:
        super().__post_init__()
        self.labeler_num_cells = tuple(int(c) for c in self.labeler_num_cells)
        if not isinstance(self.labeler_size, int) or isinstance(self.labeler_size, bool) or self.labeler_size < 2:
            raise ValueError(
                f"labeler_size (K) must be an int >= 2 (MUSBO eq. 12 samples a pair of labeler "
                f"members), got {self.labeler_size!r}"
            )
        for name in (
            "labeler_batch_size", "labeler_max_epochs", "labeler_patience", "metrics_max_states",
            "metrics_num_trajectories", "metrics_horizon",
        ):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ValueError(f"{name} must be >= 1, got {value!r}")
        if not (isinstance(self.alpha, (int, float)) and math.isfinite(self.alpha) and self.alpha >= 0):
            raise ValueError(f"alpha must be a finite number >= 0, got {self.alpha!r}")
        if not (isinstance(self.labeler_lr, (int, float)) and math.isfinite(self.labeler_lr) and self.labeler_lr > 0):
            raise ValueError(f"labeler_lr must be a finite number > 0, got {self.labeler_lr!r}")
        if not (math.isfinite(self.exploration_const_std) and self.exploration_const_std >= 0):
            raise ValueError(f"exploration_const_std must be >= 0, got {self.exploration_const_std!r}")
        choices = {
            "exploration_mode": _EXPLORATION_MODES,
            "exploration_uncertainty_is": _UNCERTAINTY_IS,
            "labeler_member_reduction": _MEMBER_REDUCTIONS,
            "disagreement_pair": _PAIR_MODES,
        }
        for name, valid in choices.items():
            if getattr(self, name) not in valid:
                raise ValueError(f"{name} must be one of {list(valid)}, got {getattr(self, name)!r}")

    @classmethod
    def paper(cls, task: str, budget: str | None = "500k", **overrides: Any) -> MUSBOConfig:
        """Table 2 values of ``task`` with ``deployment_size = budget / num_deployments``.

        Args:
            task (str): one of :data:`MUSBO_PAPER_HYPERPARAMETERS`.
            budget (str, optional): ``"250k"`` or ``"500k"`` (sec. 5); ``None`` keeps the
                default ``deployment_size``.
            **overrides: any other field.

        Examples:
            >>> from torchrl_depeff.algorithms.musbo import MUSBOConfig
            >>> MUSBOConfig.paper("ant").deployment_size, MUSBOConfig.paper("ant").gae_lambda
            (100000, 0.97)
        """
        if task not in MUSBO_PAPER_HYPERPARAMETERS:
            raise ValueError(f"unknown task {task!r}; valid names are {sorted(MUSBO_PAPER_HYPERPARAMETERS)}")
        values = dict(MUSBO_PAPER_HYPERPARAMETERS[task])
        if budget is not None:
            if budget not in BUDGETS:
                raise ValueError(f"unknown budget {budget!r}; valid budgets are {sorted(BUDGETS)}")
            values["deployment_size"] = BUDGETS[budget] // values["num_deployments"]
        return cls(task=task, **{**values, **overrides})

    def variant(self, name: str) -> MUSBOConfig:
        """This config with the overrides of an ablation of :data:`MUSBO_VARIANTS`.

        Examples:
            >>> from torchrl_depeff.algorithms.musbo import MUSBOConfig
            >>> MUSBOConfig().variant("no_exploration").uncertainty_exploration
            False
        """
        if name not in MUSBO_VARIANTS:
            raise ValueError(f"unknown variant {name!r}; valid names are {sorted(MUSBO_VARIANTS)}")
        return replace(self, **MUSBO_VARIANTS[name])


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


def _trajectory_windows(data: TensorDictBase, horizon: int, max_windows: int, generator: torch.Generator) -> TensorDictBase | None:
    """``[N, horizon]`` windows of consecutive steps, each inside one recorded trajectory.

    Trajectories are identified by ``("collector", "traj_ids")`` (rows of one trajectory are in
    time order within the flat batch); without ids the rows are taken to be in time order.
    """
    data = data.reshape(-1)
    n = data.shape[0]
    traj = data.get(("collector", "traj_ids"), None)
    if traj is None:
        traj = torch.cat([torch.zeros(1, dtype=torch.long), data.get(("next", "done")).reshape(n)[:-1].long().cumsum(0)])
    traj = traj.reshape(n).long()
    order = torch.sort(traj, stable=True).indices
    sorted_ids = traj[order]
    # position of every (sorted) row inside its trajectory
    new = torch.ones(n, dtype=torch.bool)
    new[1:] = sorted_ids[1:] != sorted_ids[:-1]
    starts = torch.nonzero(new).squeeze(-1)
    seg = torch.cumsum(new.long(), 0) - 1
    pos = torch.arange(n) - starts[seg]
    lengths = torch.diff(torch.cat([starts, torch.tensor([n])]))
    ok = (pos % horizon == 0) & (pos + horizon <= lengths[seg])
    first = torch.nonzero(ok).squeeze(-1)
    if first.numel() == 0:
        return None
    pick = first[torch.randperm(first.numel(), generator=generator)[:max_windows]]
    idx = order[pick.unsqueeze(-1) + torch.arange(horizon)]
    return data[idx]


def deployment_analysis(
    algo: BREMEN, *, max_states: int = 2000, num_trajectories: int = 32, horizon: int = 50
) -> dict[str, float]:
    """MUSBO sec. 5 analysis of the latest deployment of any BREMEN-family run.

    * ``metrics/novelty`` (Table 1): :func:`~torchrl_depeff.metrics.novelty_score` of up to
      ``max_states`` random states of the latest batch against up to ``max_states`` random states
      of all earlier batches (absent for the first deployment);
    * ``metrics/energy_distance`` and ``metrics/trajectory_mse`` (Fig. 6): open-loop rollouts of
      the dynamics ensemble's mean from the start state of ``num_trajectories`` real windows of
      ``horizon`` steps of the latest batch, replaying the recorded actions.

    Works for :class:`~torchrl_depeff.algorithms.bremen.BREMEN` too (only ``buffers``,
    ``ensemble``, ``task`` and ``config.seed`` are read), so both algorithms are measured alike.

    Args:
        algo (BREMEN): a run with at least one deployment in its buffers.

    Keyword Args:
        max_states (int): states per side for the novelty score. Defaults to 2000.
        num_trajectories (int): real windows. Defaults to 32.
        horizon (int): steps per window. Defaults to 50.

    Examples:
        >>> import tempfile
        >>> from torchrl_depeff.algorithms.bremen import BREMEN, BREMENConfig
        >>> from torchrl_depeff.algorithms.musbo import deployment_analysis
        >>> cfg = BREMENConfig(deployment_size=200, iterations_per_deployment=1, rollout_length=5,
        ...     trpo_batch_size=20, ensemble_size=2, ensemble_num_cells=(16,), policy_num_cells=(8,),
        ...     dynamics_max_epochs=2, bc_max_epochs=2, eval_episodes=0, collect_frames_per_batch=100)
        >>> algo = BREMEN(cfg, data_root=tempfile.mkdtemp())
        >>> _ = algo.deployment_step()
        >>> sorted(deployment_analysis(algo, horizon=5, num_trajectories=4))
        ['metrics/energy_distance', 'metrics/trajectory_mse']
    """
    k = algo.buffers.num_deployments - 1
    if k < 0:
        raise ValueError("deployment_analysis needs at least one deployment in algo.buffers")
    g = torch.Generator().manual_seed(algo.config.seed + 101 * (k + 1))
    latest = algo.buffers.as_tensordict("latest").reshape(-1)
    d = algo.task.observation_dim
    device = next(algo.ensemble.parameters()).device
    previous = new = None
    if k >= 1:
        earlier = torch.cat([algo.buffers.as_tensordict(i)["observation"].reshape(-1, d) for i in range(k)])
        previous = earlier[torch.randperm(earlier.shape[0], generator=g)[:max_states]].to(device)
        new = latest["observation"][torch.randperm(latest.shape[0], generator=g)[:max_states]].to(device)
    windows = _trajectory_windows(latest, horizon, num_trajectories, g)
    values = deployment_metrics(
        new_batch=new, previous_data=previous, model=algo.ensemble,
        real_trajectories=windows.to(device) if windows is not None else None,
    )
    return {f"metrics/{name}": value for name, value in values.items()}


class MUSBO(BREMEN):
    """MUSBO's deployment loop (Alg. 1): BREMEN plus the uncertainty labeler in three places.

    Same constructor, phases, checkpointing and resume as
    :class:`~torchrl_depeff.algorithms.bremen.BREMEN`; adds :attr:`labeler` (the PNN ``P_hat``)
    and :attr:`disagreement` (eq. (12) labels of imaginary rollouts). See the module doc for what
    each phase changes. The offline mode (:meth:`run_offline`) also works: fit, weighted BC, UW-TRPO.

    Args:
        config (MUSBOConfig): hyper-parameters.

    Keyword Args:
        **kwargs: as for :class:`~torchrl_depeff.algorithms.bremen.BREMEN` (``data_root``,
            ``env``, ``eval_env``, ``logger``, ``progress``, ``checkpoint_fn``,
            ``collect_kwargs``; the latter must not set ``exploration`` / ``exploration_type``,
            which MUSBO owns).

    Examples:
        >>> import tempfile
        >>> from torchrl_depeff.algorithms.musbo import MUSBO, MUSBOConfig
        >>> cfg = MUSBOConfig(deployment_size=200, iterations_per_deployment=1, rollout_length=5,
        ...     trpo_batch_size=20, ensemble_size=2, ensemble_num_cells=(16,), policy_num_cells=(8,),
        ...     labeler_num_cells=(16,), dynamics_max_epochs=2, labeler_max_epochs=2, bc_max_epochs=2,
        ...     eval_episodes=1, eval_max_steps=10, collect_frames_per_batch=100,
        ...     metrics_horizon=5, metrics_num_trajectories=4)
        >>> algo = MUSBO(cfg, data_root=tempfile.mkdtemp())
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
        cfg = config
        o, a = self.task.observation_dim, self.task.action_dim
        # MUSBO App. F: K = 3 PNN, 2 x 1024, Adam 1e-3, 85/15 split, patience 3
        self.labeler = UncertaintyLabeler(
            o, a, num_members=cfg.labeler_size, num_cells=cfg.labeler_num_cells,
            member_reduction=cfg.labeler_member_reduction, lr=cfg.labeler_lr,
            batch_size=cfg.labeler_batch_size, holdout_ratio=cfg.holdout_ratio,
            patience=cfg.labeler_patience, max_epochs=cfg.labeler_max_epochs, seed=cfg.seed + 2,
        ).to(self.device)
        self.labeler_generator = torch.Generator().manual_seed(cfg.seed + 3)
        self.disagreement = LabelerDisagreement(
            self.labeler, pair=cfg.disagreement_pair, generator=self.labeler_generator,
        )
        self.labeler_fitted = False

    # ------------------------------------------------------------------ eq. (22)
    def make_exploration(self) -> TensorDictModuleBase:
        """The eq. (22) deployment noise: labeler variance, ``const + N(0, U)``, helper key dropped.

        Reads the deterministic action ``tanh(mu(s))`` (deploy with
        ``ExplorationType.DETERMINISTIC``) and writes the noisy ``"action"``; the variance is
        written to ``"exploration_variance"`` and deleted again, so the stored rows keep BREMEN's
        keys.

        Examples:
            >>> import tempfile
            >>> from tensordict import TensorDict
            >>> from torchrl_depeff.algorithms.musbo import MUSBO, MUSBOConfig
            >>> algo = MUSBO(MUSBOConfig(labeler_num_cells=(8,), ensemble_num_cells=(8,)),
            ...              data_root=tempfile.mkdtemp())
            >>> td = TensorDict(observation=torch.zeros(5, 17), action=torch.zeros(5, 6), batch_size=[5])
            >>> sorted(algo.make_exploration()(td).keys())
            ['action', 'observation']
        """
        cfg = self.config
        key = "exploration_variance"
        return TensorDictSequential(
            ExplorationUncertainty(
                self.labeler, mode=cfg.exploration_mode, aleatoric=cfg.exploration_aleatoric, out_key=key,
            ),
            UncertaintyActionNoise(
                cfg.exploration_const_std, uncertainty_key=key, uncertainty_is=cfg.exploration_uncertainty_is,
            ),
            DropKeys(key),
        )

    def collect(self) -> dict[str, float]:
        """Alg. 1 line 3 with eq. (22) noise from the labeler (deployment 0: BREMEN's random policy)."""
        cfg = self.config
        use = cfg.uncertainty_exploration and self.deployment > 0
        if use and not self.labeler_fitted:
            raise RuntimeError("eq. (22) exploration needs a fitted labeler: run fit_model first")
        saved = dict(self.collect_kwargs)
        if use:
            exploration = self.make_exploration()
            if self.device.type != "cpu":
                exploration = copy.deepcopy(exploration).to("cpu")
            self.collect_kwargs.update(exploration=exploration, exploration_type=ExplorationType.DETERMINISTIC)
        try:
            out = super().collect()
        finally:
            self.collect_kwargs = saved
        out["deployment/uncertainty_exploration"] = float(use)
        if use:
            # mean eq. (22) variance over the states the deployed policy visited (at its mean action)
            latest = self.buffers.as_tensordict("latest").reshape(-1)
            g = torch.Generator().manual_seed(cfg.seed + 17 * (self.deployment + 1))
            idx = torch.randperm(latest.shape[0], generator=g)[: cfg.metrics_max_states]
            probe = TensorDict(
                {"observation": latest["observation"][idx], "action": latest["loc"][idx]}, [idx.numel()]
            ).to(self.device)
            var = ExplorationUncertainty(
                self.labeler, mode=cfg.exploration_mode, aleatoric=cfg.exploration_aleatoric,
            )(probe)["uncertainty"]
            out["deployment/exploration_variance"] = float(var.mean())
        return out

    # ------------------------------------------------------------------ fit
    def fit_model(self) -> dict[str, float]:
        """Alg. 1 lines 4-5: refit ``T_hat`` (eq. 1) then the labeler ``P_hat`` (eq. 10) on all data."""
        out = super().fit_model()
        result = self.labeler.fit(self._dataset("all"))
        self.labeler_fitted = True
        out["labeler/holdout_loss"] = float(result.holdout_loss.mean())
        out["labeler/epochs"] = float(result.epochs)
        return out

    # ------------------------------------------------------------------ eq. (11)
    def _bc_weights(self, data: TensorDictBase) -> tuple[TensorDictBase, str | None, dict[str, float]]:
        """Eq. (11) weights for BREMEN's BC phase (BC network, sigma reset, Alg. 1 line 6).

        The eq. (9) labels go to ``"uncertainty"`` and the weights to ``"bc_weight"``. If every
        weight is 0 (every eq. (9) error >= 1) BC would not move: it clones with uniform weights
        instead, with a warning and ``bc/uniform_fallback = 1``.
        """
        cfg = self.config
        if not self.labeler_fitted:
            raise RuntimeError("weighted BC (eq. 11) needs a fitted labeler: run fit_model first")
        if not cfg.weighted_bc:
            return data, None, {}
        data = self.labeler(data)  # eq. (9) -> "uncertainty"
        bc_weights(data, normalize=cfg.bc_weight_normalize)  # eq. (11) -> "bc_weight"
        weight_key = "bc_weight"
        out = {"bc/weight_mean": float(data["bc_weight"].mean())}
        if not bool((data["bc_weight"] > 0).any()):
            torchrl_logger.warning(
                f"deployment {self.deployment}: every eq. (11) BC weight is 0 (labeler errors >= 1); "
                "cloning with uniform weights instead"
            )
            weight_key = None
        out["bc/uniform_fallback"] = float(weight_key is None)
        return data, weight_key, out

    # ------------------------------------------------------------------ eq. (12)-(13)
    def _make_trpo_loss(self, **kwargs: Any) -> UncertaintyWeightedTRPOLoss:
        """Eq. (13): :class:`UncertaintyWeightedTRPOLoss` (BREMEN's GAE and trust region around it)."""
        cfg = self.config
        return UncertaintyWeightedTRPOLoss(
            self.actor, self.baseline, alpha=cfg.alpha, normalize_advantage=cfg.normalize_advantage, **kwargs,
        )

    def label_rollout(self, rollout: TensorDictBase) -> TensorDictBase:
        """Eq. (12): write ``d^2`` of a random labeler pair (one per rollout) as ``"uncertainty"``."""
        if not self.labeler_fitted:
            raise RuntimeError("eq. (12) labels need a fitted labeler: run fit_model first")
        return self.disagreement(rollout)

    def policy_batch(self) -> TensorDictBase:
        """One imaginary batch with its eq. (12) labels."""
        return self.label_rollout(self.imaginary_rollout())

    def _batch_metrics(self, loss: UncertaintyWeightedTRPOLoss, rollout: TensorDictBase) -> dict[str, float]:
        """Mean and min of the eq. (12) weights of the batch."""
        weight = loss.uncertainty_weight(rollout)
        return {
            "train/uncertainty_weight": float(weight.mean()),
            "train/uncertainty_weight_min": float(weight.min()),
        }

    # ------------------------------------------------------------------ metrics
    def analysis_metrics(self) -> dict[str, float]:
        """Sec. 5 metrics of the latest deployment (see :func:`deployment_analysis`)."""
        cfg = self.config
        return deployment_analysis(
            self, max_states=cfg.metrics_max_states, num_trajectories=cfg.metrics_num_trajectories,
            horizon=cfg.metrics_horizon,
        )

    def evaluate(self) -> dict[str, float]:
        """BREMEN's evaluation plus :meth:`analysis_metrics` (when ``metrics`` is on)."""
        out = super().evaluate()
        if self.config.metrics and not self._offline:
            out.update(self.analysis_metrics())
        return out

    # ------------------------------------------------------------------ checkpoints
    def state_dict(self) -> dict[str, Any]:
        """BREMEN's state plus the labeler (ensemble, trainer) and its pair RNG."""
        state = super().state_dict()
        state["labeler"] = self.labeler.state_dict()
        state["labeler_trainer"] = self.labeler.trainer.state_dict()
        state["labeler_fitted"] = self.labeler_fitted
        state["rng"]["labeler_pairs"] = self.labeler_generator.get_state()
        return state

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore :meth:`state_dict` output (refuses a different config, as BREMEN)."""
        if "labeler" not in state:
            raise KeyError("checkpoint has no 'labeler' entry: it was not written by MUSBO")
        super().load_state_dict(state)
        self.labeler.load_state_dict(state["labeler"])
        self.labeler.trainer.load_state_dict(state["labeler_trainer"])
        self.labeler_fitted = bool(state["labeler_fitted"])
        self.labeler_generator.set_state(state["rng"]["labeler_pairs"])
        if not self.labeler_fitted:
            torchrl_logger.info("resumed MUSBO before the first labeler fit")
