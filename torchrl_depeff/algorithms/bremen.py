"""BREMEN: Behavior-Regularized Model-ENsemble (Matsushima et al., ICLR 2021).

Recursive deployments (BREMEN Alg. 1) and the offline mode (Alg. 2), built only from the package
pieces: :class:`~torchrl_depeff.modules.DynamicsEnsemble` + :class:`~torchrl_depeff.trainers.
EnsembleTrainer` (eq. 1), :func:`~torchrl_depeff.objectives.train_bc` (eq. 3),
:class:`~torchrl_depeff.envs.EnsembleModelEnv` (eq. 2), :class:`~torchrl_depeff.objectives.TRPOLoss`
+ :class:`~torchrl_depeff.optim.ConjugateGradientTrustRegion` (eq. 4 / eq. 6),
:class:`~torchrl_depeff.modules.LinearFeatureBaseline` with GAE, and the deployment tools
(:func:`~torchrl_depeff.collectors.collect_deployment`,
:class:`~torchrl_depeff.data.DeploymentReplayBuffers`, :class:`~torchrl_depeff.collectors.DeploymentGate`).

One deployment (:meth:`BREMEN.deployment_step`) runs five phases, each followed by a call to the
``checkpoint_fn`` callback, so that a killed run resumes at the phase (or TRPO iteration block) it
was in: ``collect`` -> ``fit`` -> ``bc`` -> ``optimize`` -> ``evaluate``.

Choices where the paper is silent or ambiguous (each is a :class:`BREMENConfig` field):

* **BC re-initialisation noise.** Alg. 1 line 6 writes ``pi_theta0 = Normal(pi_beta_hat, 1)``
  while App. F.2 says the stationary ``sigma = 0.1`` noise was "used for all our experiments",
  both in imaginary rollouts and in data collection. With a stationary (not learned) sigma the two
  cannot both hold, so ``bc_init_sigma`` defaults to ``None`` = keep ``sigma`` (0.1): the paper
  preset follows App. F.2, the setting its reported results used. ``bc_init_sigma=1.0`` gives the
  literal Alg. 1 line 6 (with ``learn_sigma=True`` TRPO can then shrink it).
* **Policy hidden activation**: ReLU, as in BREMEN's reference configs (``"activation": "relu"``);
  the paper does not state it.
* **Start states of imaginary rollouts**: ``"first"`` (default; the first state of every recorded
  episode), ``"reset"`` (fresh resets of the real env, as the reference code samples them) or
  ``"all"`` (any dataset state, MBPO style).
* **Baseline update order**: advantages use the baseline fitted on the previous iteration's
  rollouts, then the baseline is refitted on the current ones (rllab / BREMEN reference order).
  GAE bootstraps with the baseline at truncation (TorchRL's GAE; rllab used 0).
* **Evaluation** uses the policy mean (no noise), ``eval_episodes`` episodes with fixed seeds in a
  separate env instance; evaluation episodes are not deployments and are never added to the data.
* **Gate**: finite parameters and in-bounds mean actions on dataset states are checked before
  every deployment after the first; a KL bound (``gate_max_kl``) is off by default because the
  paper does not bound the distance between deployed policies.
"""
from __future__ import annotations

import copy
import functools
import math
import time
from dataclasses import asdict, dataclass, field, fields, replace
from pathlib import Path
from typing import Any, Callable, Literal

import torch
from tensordict import TensorDict, TensorDictBase
from torch import nn
from torchrl._utils import logger as torchrl_logger
from torchrl.envs import EnvBase, TransformedEnv
from torchrl.envs.utils import ExplorationType, set_exploration_type
from torchrl.modules import ProbabilisticActor
from torchrl.objectives.utils import ValueEstimators

from torchrl_depeff.algorithms.common import config_diff, episode_start_states
from torchrl_depeff.collectors.deployment import collect_deployment, freeze_policy, policy_hash
from torchrl_depeff.collectors.gate import DeploymentGate, DeploymentRefused, gaussian_kl
from torchrl_depeff.data.datasets import validate_offline_dataset
from torchrl_depeff.data.deployments import DeploymentReplayBuffers
from torchrl_depeff.envs.model_env import EnsembleModelEnv
from torchrl_depeff.envs.penalties import HardUncertaintyPenalty, SoftUncertaintyPenalty
from torchrl_depeff.envs.tasks import get_task, make_env, TASK_NAMES
from torchrl_depeff.envs.vector import make_vector_env
from torchrl_depeff.modules.actors import GaussianPolicyNet, make_gaussian_actor
from torchrl_depeff.modules.baselines import LinearFeatureBaseline
from torchrl_depeff.modules.ensemble import DynamicsEnsemble
from torchrl_depeff.objectives.bc import train_bc
from torchrl_depeff.objectives.trpo import TRPOLoss, trpo_step
from torchrl_depeff.optim.trust_region import ConjugateGradientTrustRegion
from torchrl_depeff.trainers.dynamics import EnsembleTrainer

__all__ = ["BREMENConfig", "BREMEN", "PAPER_HYPERPARAMETERS", "VARIANTS", "PHASES"]

#: BREMEN Table 4 (deployment-efficient settings) per task; ``deployment_size`` is the 200K of
#: Fig. 4 / Fig. 8-10. cheetah_run (App. G.5) reuses HalfCheetah's values; fetch_reach and
#: hand_reach (not in Table 4) use 50-step rollouts, their episode length.
PAPER_HYPERPARAMETERS: dict[str, dict[str, Any]] = {
    "halfcheetah": dict(iterations_per_deployment=2000, num_deployments=5, rollout_length=250, max_kl=0.1, gae_lambda=0.95),
    "cheetah_run": dict(iterations_per_deployment=2000, num_deployments=5, rollout_length=250, max_kl=0.1, gae_lambda=0.95),
    "ant": dict(iterations_per_deployment=2000, num_deployments=5, rollout_length=250, max_kl=0.05, gae_lambda=0.97),
    "hopper": dict(iterations_per_deployment=6000, num_deployments=10, rollout_length=1000, max_kl=0.05, gae_lambda=0.95),
    "walker2d": dict(iterations_per_deployment=2000, num_deployments=10, rollout_length=1000, max_kl=0.05, gae_lambda=0.95),
    "fetch_reach": dict(iterations_per_deployment=2000, num_deployments=5, rollout_length=50, max_kl=0.05, gae_lambda=0.95),
    "hand_reach": dict(iterations_per_deployment=2000, num_deployments=5, rollout_length=50, max_kl=0.05, gae_lambda=0.95),
}

#: the paper's ablations and baselines (Sec. 5.3, App. E) as config overrides
VARIANTS: dict[str, dict[str, Any]] = {
    "bremen": {},
    "me_trpo": {"bc_reinit": False},  # no BC re-initialisation (ME-TRPO under the same budget)
    "explicit_kl": {"bc_reinit": False, "explicit_kl_coef": 0.1},  # eq. (6), no BC init (App. G.3)
    "mopo": {"penalty": "mopo"},  # App. E soft penalty
    "morel": {"penalty": "morel"},  # App. E hard penalty
    "recursive_bc": {"policy_optimization": False},  # deploy the BC policy of the latest data
}

PHASES: tuple[str, ...] = ("collect", "fit", "bc", "optimize", "evaluate")

_ACTIVATIONS: dict[str, type[nn.Module]] = {"relu": nn.ReLU, "tanh": nn.Tanh, "silu": nn.SiLU}


@dataclass
class BREMENConfig:
    """Every knob of a BREMEN run, with BREMEN's HalfCheetah values (Table 4, App. F) by default.

    Use :meth:`paper` for another task's Table 4 values and :meth:`variant` for the ablations.

    Args:
        task (str): task name (:data:`~torchrl_depeff.envs.TASK_NAMES`). Defaults to ``"halfcheetah"``.
        num_deployments (int): ``I`` of Alg. 1. Defaults to 5.
        deployment_size (int): ``B``, transitions per deployment. Defaults to 200,000.
        iterations_per_deployment (int): ``T``, TRPO iterations per deployment. Defaults to 2000.
        rollout_length (int): imaginary rollout horizon. Defaults to 250.
        trpo_batch_size (int): imaginary transitions per TRPO iteration (App. F.1: 50,000); the
            model env runs ``trpo_batch_size // rollout_length`` rollouts in parallel.
        max_kl (float): ``delta`` of eq. (4). Defaults to 0.1.
        gamma (float): discount. Defaults to 0.99.
        gae_lambda (float): GAE lambda. Defaults to 0.95.
        cg_iterations (int), cg_damping (float): conjugate gradient settings (10, 0.1).
        check_kl (bool): reject line-search steps violating ``max_kl`` (BREMEN's code does not;
            ``False`` reproduces it). Defaults to ``True``.
        line_search_steps (int), accept_ratio (float): backtracking settings (10, 0.1).
        normalize_advantage (bool): standardise advantages. Defaults to ``True``.
        sigma (float): stationary policy noise (App. F.2). Defaults to 0.1.
        learn_sigma (bool): learned state-independent std instead. Defaults to ``False``.
        bc_init_sigma (float, optional): std after BC re-init; ``None`` keeps ``sigma`` (see module doc).
        policy_num_cells (tuple): policy hidden sizes. Defaults to ``(200, 200)`` (App. F.1).
        policy_activation (str): ``"relu"``, ``"tanh"`` or ``"silu"``. Defaults to ``"relu"``.
        ensemble_size (int): ``K``. Defaults to 5.
        ensemble_num_cells (tuple): dynamics hidden sizes. Defaults to ``(1024, 1024)`` (App. F.1).
        dynamics_lr (float), dynamics_batch_size (int), dynamics_max_epochs (int),
        dynamics_patience (int), holdout_ratio (float): model fit (Adam 1e-3, 85/15 split).
        bc_lr (float), bc_batch_size (int), bc_max_epochs (int), bc_patience (int): eq. (3)
            fitting (Adam 5e-4, batch 256, App. F.1; early stopping patience 3).
        bc_data (str): ``"latest"`` (Alg. 1: the last deployment only) or ``"all"`` (the reference
            code's ``all_bc`` option).
        bc_reinit (bool): re-initialise the policy from BC after every deployment (``False``: the
            ME-TRPO ablation). Defaults to ``True``.
        explicit_kl_coef (float): ``alpha`` of eq. (6); ``0`` disables. Defaults to 0.
        policy_optimization (bool): run TRPO (``False``: recursive BC baseline). Defaults to ``True``.
        penalty (str): ``"none"``, ``"mopo"`` (soft, App. E) or ``"morel"`` (hard, App. E).
        mopo_coef (float): soft penalty coefficient (0.1, App. E).
        morel_threshold (float), morel_reward (float): hard penalty (3.0, -5.0, App. E).
        member_selection (str): model member per step (eq. 2: ``"per_step"``).
        start_states (str): ``"first"``, ``"reset"`` or ``"all"`` (see module doc).
        num_reset_states (int): pool size for ``start_states="reset"``. Defaults to 1000.
        eval_episodes (int): evaluation episodes after each deployment. Defaults to 3 (reference
            code's ``num_path_onpol``); ``0`` disables evaluation.
        eval_max_steps (int, optional): cap on evaluation episode length (default: the task's).
        collect_frames_per_batch (int): collector batch. Defaults to 1000.
        num_envs (int): sub-envs stepped together in each collector process (a gymnasium
            ``SyncVectorEnv``, :func:`~torchrl_depeff.envs.make_vector_env`). Defaults to 1.
        collector (str): ``"single"`` (in-process), ``"multisync"`` (TorchRL multi-process) or
            ``"ray"`` (TorchRL Ray collector), see :func:`~torchrl_depeff.collectors.collect_deployment`.
        num_workers (int): collector processes for ``"multisync"`` / ``"ray"``. Defaults to 1.
        gate_max_kl (float, optional): deployment gate bound on ``KL(new || deployed)``.
        gate_on_fail (str): ``"raise"`` (stop the run) or ``"fallback"`` (redeploy the last policy).
        log_interval (int): TRPO iterations between ``train/*`` log lines. Defaults to 50.
        checkpoint_interval (int): TRPO iterations between checkpoints. Defaults to 100.
        seed (int): seed of everything. Defaults to 0.
        device (str): device of the ensemble, model env and policy. Defaults to ``"cpu"``.

    Examples:
        >>> from torchrl_depeff.algorithms.bremen import BREMENConfig
        >>> cfg = BREMENConfig.paper("hopper")
        >>> cfg.iterations_per_deployment, cfg.num_deployments, cfg.rollout_length, cfg.max_kl
        (6000, 10, 1000, 0.05)
        >>> BREMENConfig().variant("me_trpo").bc_reinit
        False
        >>> BREMENConfig(deployment_size=0)
        Traceback (most recent call last):
        ...
        ValueError: deployment_size must be >= 1, got 0
    """

    task: str = "halfcheetah"
    num_deployments: int = 5
    deployment_size: int = 200_000
    iterations_per_deployment: int = 2000
    rollout_length: int = 250
    trpo_batch_size: int = 50_000
    max_kl: float = 0.1
    gamma: float = 0.99
    gae_lambda: float = 0.95
    cg_iterations: int = 10
    cg_damping: float = 0.1
    check_kl: bool = True
    line_search_steps: int = 10
    accept_ratio: float = 0.1
    normalize_advantage: bool = True
    sigma: float = 0.1
    learn_sigma: bool = False
    bc_init_sigma: float | None = None
    policy_num_cells: tuple[int, ...] = (200, 200)
    policy_activation: str = "relu"
    ensemble_size: int = 5
    ensemble_num_cells: tuple[int, ...] = (1024, 1024)
    dynamics_lr: float = 1e-3
    dynamics_batch_size: int = 1000
    dynamics_max_epochs: int = 200
    dynamics_patience: int = 5
    holdout_ratio: float = 0.15
    bc_lr: float = 5e-4
    bc_batch_size: int = 256
    bc_max_epochs: int = 100
    bc_patience: int = 3
    bc_data: str = "latest"
    bc_reinit: bool = True
    explicit_kl_coef: float = 0.0
    policy_optimization: bool = True
    penalty: str = "none"
    mopo_coef: float = 0.1
    morel_threshold: float = 3.0
    morel_reward: float = -5.0
    member_selection: str = "per_step"
    start_states: str = "first"
    num_reset_states: int = 1000
    eval_episodes: int = 3
    eval_max_steps: int | None = None
    collect_frames_per_batch: int = 1000
    num_envs: int = 1
    collector: str = "single"
    num_workers: int = 1
    gate_max_kl: float | None = None
    gate_on_fail: str = "raise"
    log_interval: int = 50
    checkpoint_interval: int = 100
    seed: int = 0
    device: str = "cpu"

    def __post_init__(self) -> None:
        self.policy_num_cells = tuple(int(c) for c in self.policy_num_cells)
        self.ensemble_num_cells = tuple(int(c) for c in self.ensemble_num_cells)
        if self.task not in TASK_NAMES:
            raise ValueError(f"unknown task {self.task!r}; valid names are {list(TASK_NAMES)}")
        for name in (
            "num_deployments", "deployment_size", "iterations_per_deployment", "rollout_length",
            "trpo_batch_size", "cg_iterations", "line_search_steps", "ensemble_size",
            "dynamics_batch_size", "dynamics_max_epochs", "dynamics_patience", "bc_batch_size",
            "bc_max_epochs", "bc_patience", "num_reset_states", "collect_frames_per_batch",
            "num_envs", "num_workers",
            "log_interval", "checkpoint_interval",
        ):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ValueError(f"{name} must be >= 1, got {value!r}")
        if self.trpo_batch_size < self.rollout_length:
            raise ValueError(
                f"trpo_batch_size ({self.trpo_batch_size}) must be >= rollout_length "
                f"({self.rollout_length}): at least one imaginary rollout per iteration"
            )
        for name in ("max_kl", "sigma", "dynamics_lr", "bc_lr"):
            value = getattr(self, name)
            if not (isinstance(value, (int, float)) and math.isfinite(value) and value > 0):
                raise ValueError(f"{name} must be a finite number > 0, got {value!r}")
        for name in ("gamma", "gae_lambda"):
            value = getattr(self, name)
            if not 0.0 <= value <= 1.0:
                raise ValueError(f"{name} must be in [0, 1], got {value!r}")
        if not 0.0 <= self.holdout_ratio < 1.0:
            raise ValueError(f"holdout_ratio must be in [0, 1), got {self.holdout_ratio!r}")
        if not self.cg_damping >= 0:
            raise ValueError(f"cg_damping must be >= 0, got {self.cg_damping!r}")
        if not 0.0 < self.accept_ratio < 1.0:
            raise ValueError(f"accept_ratio must be in (0, 1), got {self.accept_ratio!r}")
        if self.bc_init_sigma is not None and not self.bc_init_sigma > 0:
            raise ValueError(f"bc_init_sigma must be > 0 or None, got {self.bc_init_sigma!r}")
        if not self.explicit_kl_coef >= 0:
            raise ValueError(f"explicit_kl_coef must be >= 0, got {self.explicit_kl_coef!r}")
        if not self.mopo_coef >= 0 or not self.morel_threshold > 0:
            raise ValueError(
                f"mopo_coef must be >= 0 and morel_threshold > 0, got {self.mopo_coef!r}, {self.morel_threshold!r}"
            )
        choices = {
            "policy_activation": tuple(_ACTIVATIONS),
            "bc_data": ("latest", "all"),
            "penalty": ("none", "mopo", "morel"),
            "member_selection": ("per_step", "per_sample", "per_trajectory", "mean"),
            "start_states": ("first", "reset", "all"),
            "gate_on_fail": ("raise", "fallback"),
            "collector": ("single", "multisync", "ray"),
        }
        for name, valid in choices.items():
            if getattr(self, name) not in valid:
                raise ValueError(f"{name} must be one of {list(valid)}, got {getattr(self, name)!r}")
        if self.eval_episodes < 0:
            raise ValueError(f"eval_episodes must be >= 0, got {self.eval_episodes!r}")
        if self.eval_max_steps is not None and self.eval_max_steps < 1:
            raise ValueError(f"eval_max_steps must be >= 1 or None, got {self.eval_max_steps!r}")
        if self.gate_max_kl is not None and not self.gate_max_kl > 0:
            raise ValueError(f"gate_max_kl must be > 0 or None, got {self.gate_max_kl!r}")

    @classmethod
    def paper(cls, task: str, **overrides: Any) -> BREMENConfig:
        """Table 4 values of ``task`` (plus App. F defaults), then ``overrides``.

        Examples:
            >>> from torchrl_depeff.algorithms.bremen import BREMENConfig
            >>> BREMENConfig.paper("ant").gae_lambda
            0.97
        """
        if task not in PAPER_HYPERPARAMETERS:
            raise ValueError(f"unknown task {task!r}; valid names are {sorted(PAPER_HYPERPARAMETERS)}")
        return cls(task=task, **{**PAPER_HYPERPARAMETERS[task], **overrides})

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> BREMENConfig:
        """Build from a flat dict (e.g. a hydra config), naming unknown keys.

        Examples:
            >>> from torchrl_depeff.algorithms.bremen import BREMENConfig
            >>> BREMENConfig.from_dict({"task": "hopper", "max_kl": 0.05}).max_kl
            0.05
        """
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(values) - known)
        if unknown:
            raise KeyError(f"unknown BREMENConfig keys {unknown}")
        return cls(**values)

    def variant(self, name: str) -> BREMENConfig:
        """This config with the overrides of an ablation / baseline of :data:`VARIANTS`."""
        if name not in VARIANTS:
            raise ValueError(f"unknown variant {name!r}; valid names are {sorted(VARIANTS)}")
        return replace(self, **VARIANTS[name])

    def make_actor(self, *, learn_sigma: bool | None = None) -> ProbabilisticActor:
        """The policy BREMEN trains and deploys for this config (``tanh(mu(s)) + N(0, sigma^2)``).

        One constructor for :class:`BREMEN`'s actor, its behaviour-cloning actor and anyone
        rebuilding a checkpoint's actor (``actor`` entry of :meth:`BREMEN.state_dict`).

        Args:
            learn_sigma (bool, optional): overrides ``self.learn_sigma`` (BC trains the mean
                only). Defaults to ``None`` (the config's value).

        Examples:
            >>> from torchrl_depeff.algorithms.bremen import BREMENConfig
            >>> actor = BREMENConfig(policy_num_cells=(8,)).make_actor()
            >>> from tensordict import TensorDict
            >>> actor(TensorDict({"observation": torch.randn(3, 17)}, [3]))["action"].shape
            torch.Size([3, 6])
        """
        task = get_task(self.task)
        return make_gaussian_actor(
            task.observation_dim, task.action_dim, num_cells=self.policy_num_cells, sigma=self.sigma,
            learn_sigma=self.learn_sigma if learn_sigma is None else learn_sigma,
            activation=_ACTIVATIONS[self.policy_activation],
        )

    def to_dict(self) -> dict[str, Any]:
        """Flat dict of the fields (tuples as lists), as stored in checkpoints."""
        return {k: list(v) if isinstance(v, tuple) else v for k, v in asdict(self).items()}


def _default_env(cfg: BREMENConfig) -> EnvBase | Callable[[], EnvBase]:
    """The deployment env of a config: one env, a vector env, or a factory for worker processes."""
    if cfg.num_envs > 1:
        factory = functools.partial(make_vector_env, cfg.task, cfg.num_envs)
    else:
        factory = functools.partial(make_env, cfg.task)
    return factory() if cfg.collector == "single" else factory


def _completed_episode_returns(
    reward: torch.Tensor, done: torch.Tensor, traj_ids: torch.Tensor | None = None
) -> torch.Tensor:
    """Undiscounted returns of the episodes that end (``done``) inside a flat batch.

    Episodes are grouped by ``traj_ids`` when given (collector output, any row order), otherwise
    the rows must be in time order and an episode ends at each ``done``.

    Examples:
        >>> from torchrl_depeff.algorithms.bremen import _completed_episode_returns
        >>> r = torch.tensor([1.0, 2.0, 3.0, 4.0, 5.0]); d = torch.tensor([0, 1, 0, 1, 0]).bool()
        >>> _completed_episode_returns(r, d).tolist()
        [3.0, 7.0]
        >>> _completed_episode_returns(r, d, traj_ids=torch.tensor([0, 0, 1, 1, 2])).tolist()
        [3.0, 7.0]
    """
    if traj_ids is None:
        episode = torch.cat([done.new_zeros(1, dtype=torch.long), done[:-1].long().cumsum(0)])
    else:
        _, episode = torch.unique(traj_ids.reshape(-1), return_inverse=True)
    n = int(episode.max()) + 1
    sums = torch.zeros(n, dtype=reward.dtype).index_add_(0, episode, reward)
    ended = torch.zeros(n, dtype=torch.long).index_add_(0, episode, done.long()) > 0
    return sums[ended]


def _mean_kl(p: nn.Module, q: nn.Module, states: TensorDictBase) -> float:
    """Mean ``KL(p || q)`` of two Gaussian actors over ``states`` (BREMEN Fig. 4 / Fig. 13)."""
    with torch.no_grad(), set_exploration_type(ExplorationType.DETERMINISTIC):
        a = p(states.clone())
        b = q(states.clone())
    return float(gaussian_kl(a["loc"], a["scale"], b["loc"], b["scale"]).mean())


class BREMEN:
    """BREMEN's deployment loop (Alg. 1) and offline mode (Alg. 2).

    The learner's state (policy, ensemble, trainer, baseline, counters, RNG states, history) is in
    :meth:`state_dict`; the deployment data lives on disk in :attr:`buffers`
    (a :class:`~torchrl_depeff.data.DeploymentReplayBuffers` at ``data_root``). Construct, then
    either ``load_state_dict(ckpt)`` to resume or start fresh; call :meth:`deployment_step`
    ``num_deployments`` times (or :meth:`run`).

    Args:
        config (BREMENConfig): hyper-parameters.

    Keyword Args:
        data_root (str | Path): directory of the deployment buffers (reloaded if present).
        env (EnvBase | Callable[[], EnvBase], optional): the real env used for deployments (or a
            factory for multi-process collection). Defaults to ``make_env(config.task)``.
        eval_env (EnvBase, optional): env for evaluation episodes. Defaults to
            ``make_env(config.task)`` (a separate instance).
        logger (torchrl Logger, optional): receives scalars (``log_scalar(name, value, step)``).
        progress (bool): tqdm bars for collection, model fit and TRPO. Defaults to ``False``.
        checkpoint_fn (Callable[[BREMEN], None], optional): called after every phase and every
            ``checkpoint_interval`` TRPO iterations (e.g. to :func:`~torchrl_depeff.algorithms.
            common.atomic_save` :meth:`state_dict`).
        collect_kwargs (dict, optional): extra arguments of :func:`collect_deployment`
            (e.g. ``exploration``, ``max_retries``, ``ray_address``); they override the config.

    Examples:
        >>> import tempfile
        >>> from torchrl_depeff.algorithms.bremen import BREMEN, BREMENConfig
        >>> cfg = BREMENConfig(deployment_size=200, iterations_per_deployment=1, rollout_length=5,
        ...     trpo_batch_size=20, ensemble_size=2, ensemble_num_cells=(16,), policy_num_cells=(8,),
        ...     dynamics_max_epochs=2, bc_max_epochs=2, eval_episodes=1, eval_max_steps=10,
        ...     collect_frames_per_batch=100)
        >>> algo = BREMEN(cfg, data_root=tempfile.mkdtemp())
        >>> metrics = algo.deployment_step()
        >>> metrics["deployment/count"], metrics["deployment/samples"], len(algo.buffers)
        (1, 200, 200)
    """

    def __init__(
        self,
        config: BREMENConfig,
        *,
        data_root: str | Path,
        env: EnvBase | Callable[[], EnvBase] | None = None,
        eval_env: EnvBase | None = None,
        logger: Any | None = None,
        progress: bool = False,
        checkpoint_fn: Callable[[BREMEN], None] | None = None,
        collect_kwargs: dict[str, Any] | None = None,
    ) -> None:
        if not isinstance(config, BREMENConfig):
            raise TypeError(f"config must be a BREMENConfig, got {type(config).__name__}")
        self.config = cfg = config
        self.task = get_task(cfg.task)
        self.device = torch.device(cfg.device)
        self.logger = logger
        self.progress = bool(progress)
        self.checkpoint_fn = checkpoint_fn
        self.collect_kwargs = dict(collect_kwargs or {})
        torch.manual_seed(cfg.seed)

        self.env = env if env is not None else _default_env(cfg)
        self._eval_env = eval_env
        self.buffers = DeploymentReplayBuffers(data_root)

        o, a = self.task.observation_dim, self.task.action_dim
        self.actor = cfg.make_actor().to(self.device)
        self.ensemble = DynamicsEnsemble(
            o, a, num_members=cfg.ensemble_size, num_cells=cfg.ensemble_num_cells,
        ).to(self.device)
        self.trainer = EnsembleTrainer(
            self.ensemble, lr=cfg.dynamics_lr, batch_size=cfg.dynamics_batch_size,
            holdout_ratio=cfg.holdout_ratio, max_epochs=cfg.dynamics_max_epochs,
            patience=cfg.dynamics_patience, logger=logger, progress=self.progress, seed=cfg.seed,
        )
        self.baseline = LinearFeatureBaseline(o, time_key="model_step_count").to(self.device)
        # the BC policy pi_beta_hat (eq. 3) and its frozen copy used as eq. (6)'s reference
        self.bc_actor: nn.Module | None = None
        # the policy currently deployed in the real env (frozen copy) and the gate
        self.deployed_actor: nn.Module | None = None
        self.gate = DeploymentGate(
            max_kl=cfg.gate_max_kl, action_spec=self._action_spec(), on_fail=cfg.gate_on_fail,
        )
        self.model_generator = torch.Generator(device=self.device).manual_seed(cfg.seed + 1)
        # counters: ``deployment`` = index of the deployment being processed
        self.deployment = 0
        self.policy_version = 0
        self.phase = PHASES[0]
        self.iteration = 0  # TRPO iterations done in the current deployment
        self.total_iterations = 0
        self.history: list[dict[str, float]] = []
        self._metrics: dict[str, float] = {}
        self._start_states: torch.Tensor | None = None
        self._model_env: EnvBase | None = None
        self._offline = False
        if self.buffers.num_deployments:
            torchrl_logger.info(
                f"{self.buffers.num_deployments} deployment(s) found under {data_root}; load a "
                "checkpoint with load_state_dict to resume the run that wrote them"
            )

    # ------------------------------------------------------------------ helpers
    def _action_spec(self):
        env = self.env if isinstance(self.env, EnvBase) else None
        spec = env.action_spec if env is not None else make_env(self.config.task).action_spec
        return spec[(0,) * (spec.ndim - 1)] if spec.ndim > 1 else spec

    @property
    def eval_env(self) -> EnvBase:
        if self._eval_env is None:
            self._eval_env = make_env(self.config.task)
        return self._eval_env

    @property
    def policy_net(self) -> GaussianPolicyNet:
        """The :class:`GaussianPolicyNet` inside :attr:`actor`."""
        return self.actor.module[0].module

    def _log(self, values: dict[str, float], step: int) -> None:
        if self.logger is None:
            return
        for name, value in values.items():
            self.logger.log_scalar(name, float(value), step=step)

    def _checkpoint(self) -> None:
        if self.checkpoint_fn is not None:
            self.checkpoint_fn(self)

    def _set_phase(self, phase: str) -> None:
        self.phase = phase
        self._checkpoint()

    def _dataset(self, which: str = "all") -> TensorDict:
        return self.buffers.as_tensordict(which).to(self.device)

    def _kl_states(self, which: str = "latest", max_states: int = 5000) -> TensorDict:
        data = self._dataset(which)
        n = data.shape[0]
        g = torch.Generator().manual_seed(self.config.seed + 7919 * (self.deployment + 1))
        idx = torch.randperm(n, generator=g)[: min(n, max_states)].to(self.device)
        return TensorDict({"observation": data["observation"][idx]}, batch_size=[idx.numel()])

    # ------------------------------------------------------------------ phases
    def collect(self) -> dict[str, float]:
        """Alg. 1 lines 3: deploy (a frozen copy of) the policy and collect ``B`` transitions.

        From the second deployment on, the :class:`DeploymentGate` checks the candidate first; on
        failure the run stops (:class:`DeploymentRefused`) or the last deployed policy is reused.
        If the deployment is already on disk (a run killed after writing it), it is reused after
        checking that it was collected by the same policy.
        """
        cfg = self.config
        k = self.deployment
        candidate = self.actor
        version = self.policy_version
        gate_info: dict[str, float] = {}
        if self.deployed_actor is not None:
            states = self._kl_states("latest")
            report = self.gate.check(self.actor, self.deployed_actor, states)
            gate_info = {"gate/passed": float(report.passed)}
            if report.kl is not None:
                gate_info["gate/kl"] = report.kl
            if report.fallback:
                torchrl_logger.warning(f"deployment {k}: gate refused the new policy, redeploying the last one")
                candidate = self.deployed_actor
            else:
                version = self.policy_version + 1
        digest = policy_hash(candidate)
        if self.buffers.num_deployments > k:
            meta = self.buffers.metadata(k)
            if meta.get("policy_hash") != digest:
                raise RuntimeError(
                    f"deployment {k} on disk was collected by policy {meta.get('policy_hash')!r}, "
                    f"but this run would deploy {digest!r}: the data directory belongs to another run"
                )
            torchrl_logger.info(f"deployment {k} already on disk (resumed run): not collected again")
            n = int(meta["num_rows"])
        else:
            policy = candidate if self.device.type == "cpu" else copy.deepcopy(candidate).to("cpu")
            kwargs = dict(
                frames_per_batch=cfg.collect_frames_per_batch, collector=cfg.collector,
                num_workers=cfg.num_workers,
            )
            kwargs.update(self.collect_kwargs)
            data, info = collect_deployment(
                policy, self.env, cfg.deployment_size, deployment=k, policy_version=version,
                progress=self.progress, seed=cfg.seed + 1000 * (k + 1), **kwargs,
            )
            info["policy_hash"] = digest
            self.buffers.add_deployment(data, policy_version=version, metadata=info)
            n = data.shape[0]
        # return of the deployed (noisy) policy in its own data: completed episodes only
        latest = self.buffers.as_tensordict("latest")
        done = latest.get(("next", "done")).reshape(-1)
        reward = latest.get(("next", "reward")).reshape(-1)
        traj = latest.get(("collector", "traj_ids"), None)
        episode_returns = _completed_episode_returns(reward, done, traj)
        deploy_return = float(episode_returns.mean()) if episode_returns.numel() else math.nan
        if n != cfg.deployment_size:
            raise RuntimeError(f"deployment {k} holds {n} transitions, expected {cfg.deployment_size}")
        self.deployed_actor = freeze_policy(candidate)
        self.policy_version = version
        return {
            **gate_info,
            "deployment/policy_version": float(version),
            "deployment/return_mean": deploy_return,
            "deployment/episodes": float(episode_returns.numel()),
        }

    def fit_model(self) -> dict[str, float]:
        """Alg. 1 line 4: refit the ensemble on all deployments (warm start), eq. (1)."""
        result = self.trainer.fit(self._dataset("all"))
        out = {"model/holdout_loss": float(result.holdout_loss.mean()), "model/epochs": float(result.epochs)}
        for i, v in enumerate(result.holdout_loss.tolist()):
            out[f"model/holdout_loss_m{i}"] = v
        return out

    def behaviour_clone(self) -> dict[str, float]:
        """Alg. 1 lines 5-6: BC on the latest deployment (eq. 3), then re-initialise the policy."""
        cfg = self.config
        data = self._dataset(cfg.bc_data)
        validate_offline_dataset(data)
        data, weight_key, out = self._bc_weights(data)
        bc = cfg.make_actor(learn_sigma=False).to(self.device)
        info = train_bc(
            bc, data, lr=cfg.bc_lr, batch_size=cfg.bc_batch_size, holdout_ratio=cfg.holdout_ratio,
            max_epochs=cfg.bc_max_epochs, patience=cfg.bc_patience, loss_type="mse",
            weight_key=weight_key, seed=cfg.seed + self.deployment,
        )
        sigma = cfg.bc_init_sigma if cfg.bc_init_sigma is not None else cfg.sigma
        bc.module[0].module.set_sigma(sigma)
        self.bc_actor = freeze_policy(bc)
        if cfg.bc_reinit or not cfg.policy_optimization:
            # pi_theta0 = Normal(pi_beta_hat, sigma) (Alg. 1 line 6; sigma: see module doc)
            self.policy_net.load_mean_from(bc.module[0].module)
            self.policy_net.set_sigma(sigma)
        out.update({"bc/holdout_loss": float(info["holdout_loss"]), "bc/epochs": float(info["epochs"])})
        return out

    def _bc_weights(self, data: TensorDictBase) -> tuple[TensorDictBase, str | None, dict[str, float]]:
        """Per-sample BC weights (hook): BREMEN's eq. (3) is unweighted.

        Returns the data (possibly with a weight entry), the weight key (``None``: unweighted) and
        metrics to log. MUSBO overrides it with eq. (11).
        """
        return data, None, {}

    def _start_state_pool(self) -> torch.Tensor:
        cfg = self.config
        if cfg.start_states == "first":
            return episode_start_states(self._dataset("all"))["observation"]
        if cfg.start_states == "all":
            return self._dataset("all")["observation"]
        # "reset": fresh resets of the real env (BREMEN's reference code)
        env = make_env(cfg.task)
        env.set_seed(cfg.seed + 31 * (self.deployment + 1))
        return torch.stack([env.reset()["observation"] for _ in range(cfg.num_reset_states)]).to(self.device)

    def make_model_env(self, start_states: torch.Tensor | None = None) -> EnvBase:
        """The imaginary MDP of eq. (2) (with the App. E penalty transform when configured)."""
        cfg = self.config
        if start_states is None:
            start_states = self._start_state_pool()
        self._start_states = start_states
        uncertainty = {"none": (), "mopo": ("ensemble_std",), "morel": ("disagreement",)}[cfg.penalty]
        env = EnsembleModelEnv.from_env(
            self.env if isinstance(self.env, EnvBase) else make_env(cfg.task),
            self.ensemble,
            task=self.task,
            start_states=TensorDict({"observation": start_states}, [start_states.shape[0]]),
            batch_size=cfg.trpo_batch_size // cfg.rollout_length,
            member_selection=cfg.member_selection,
            max_episode_steps=cfg.rollout_length,
            uncertainty=uncertainty,
            device=self.device,
            generator=self.model_generator,
        )
        if cfg.penalty == "mopo":
            env = TransformedEnv(env, SoftUncertaintyPenalty(cfg.mopo_coef, uncertainty_key="model_ensemble_std"))
        elif cfg.penalty == "morel":
            env = TransformedEnv(env, HardUncertaintyPenalty(cfg.morel_threshold, cfg.morel_reward))
        self._model_env = env
        return env

    def _loss(self) -> tuple[TRPOLoss, ConjugateGradientTrustRegion]:
        cfg = self.config
        kwargs = {}
        if cfg.explicit_kl_coef > 0:
            if self.bc_actor is None:
                raise RuntimeError("explicit_kl_coef > 0 needs the BC policy: run behaviour_clone first")
            kwargs = dict(kl_to_reference_coef=cfg.explicit_kl_coef, reference_actor=self.bc_actor)
        loss = self._make_trpo_loss(**kwargs)
        loss.make_value_estimator(ValueEstimators.GAE, gamma=cfg.gamma, lmbda=cfg.gae_lambda)
        optim = ConjugateGradientTrustRegion(
            loss.actor_network_params, max_kl=cfg.max_kl, damping=cfg.cg_damping,
            cg_iters=cfg.cg_iterations, backtrack_iters=cfg.line_search_steps,
            accept_ratio=cfg.accept_ratio, check_kl=cfg.check_kl,
        )
        return loss, optim

    def _make_trpo_loss(self, **kwargs: Any) -> TRPOLoss:
        """The eq. (4) loss (hook; MUSBO returns eq. (13)'s uncertainty-weighted one)."""
        return TRPOLoss(self.actor, self.baseline, normalize_advantage=self.config.normalize_advantage, **kwargs)

    def imaginary_rollout(self) -> TensorDictBase:
        """Eq. (2): ``trpo_batch_size // rollout_length`` rollouts of ``rollout_length`` steps."""
        if self._model_env is None:
            self.make_model_env()
        with torch.no_grad(), set_exploration_type(ExplorationType.RANDOM):
            return self._model_env.rollout(
                self.config.rollout_length, self.actor, break_when_any_done=False, auto_cast_to_device=False,
            )

    def trpo_iteration(self, loss: TRPOLoss, optim: ConjugateGradientTrustRegion) -> dict[str, float]:
        """Alg. 1 lines 8-9: one imaginary batch, GAE with the linear baseline, one eq. (4) step."""
        rollout = self.policy_batch()
        info = trpo_step(loss, optim, rollout)
        self.baseline.fit(rollout, gamma=self.config.gamma)
        ret = rollout.get(("next", "reward")).sum(-2).mean()
        return {
            "train/imaginary_return": float(ret),
            "train/trpo_kl": float(info["kl"]),
            "train/trpo_accepted": float(info["accepted"]),
            "train/trpo_improvement": float(info["improvement"]),
            **self._batch_metrics(loss, rollout),
        }

    def policy_batch(self) -> TensorDictBase:
        """The batch of one TRPO iteration (hook): :meth:`imaginary_rollout` (MUSBO adds labels)."""
        return self.imaginary_rollout()

    def _batch_metrics(self, loss: TRPOLoss, rollout: TensorDictBase) -> dict[str, float]:
        """Extra per-iteration metrics of a TRPO batch (hook; none for BREMEN)."""
        return {}

    def optimize_policy(self, iterations: int | None = None) -> dict[str, float]:
        """Alg. 1 line 7-9: ``T`` TRPO iterations on imaginary rollouts (resumable)."""
        cfg = self.config
        total = cfg.iterations_per_deployment if iterations is None else int(iterations)
        if not cfg.policy_optimization:
            return {}
        self.make_model_env()
        loss, optim = self._loss()
        kl_states = self._kl_states("latest")
        bar = None
        if self.progress:
            import tqdm

            bar = tqdm.tqdm(total=total, initial=self.iteration, desc=f"TRPO (deployment {self.deployment})", unit="it")
        window: list[dict[str, float]] = []
        last: dict[str, float] = {}
        try:
            while self.iteration < total:
                stats = self.trpo_iteration(loss, optim)
                window.append(stats)
                self.iteration += 1
                self.total_iterations += 1
                if bar is not None:
                    bar.update(1)
                    bar.set_postfix(imag_return=f"{stats['train/imaginary_return']:.1f}", kl=f"{stats['train/trpo_kl']:.3g}")
                if self.iteration % cfg.log_interval == 0 or self.iteration == total:
                    last = {k: sum(w[k] for w in window) / len(window) for k in window[0]}
                    last["train/trpo_accept_rate"] = last.pop("train/trpo_accepted")
                    last["train/kl_to_deployed"] = _mean_kl(self.actor, self.deployed_actor, kl_states) if self.deployed_actor is not None else math.nan
                    if self.bc_actor is not None:
                        last["train/kl_to_bc"] = _mean_kl(self.actor, self.bc_actor, kl_states)
                    self._log(last, self.total_iterations)
                    window = []
                if self.iteration % cfg.checkpoint_interval == 0 and self.iteration < total:
                    self._checkpoint()
        finally:
            if bar is not None:
                bar.close()
        invalid = int(self._model_env.base_env.num_invalid if isinstance(self._model_env, TransformedEnv) else self._model_env.num_invalid)
        last["model/invalid_predictions"] = float(invalid)
        return last

    def evaluate(self) -> dict[str, float]:
        """Real-env return of the policy mean (not a deployment: nothing is stored)."""
        cfg = self.config
        if cfg.eval_episodes == 0:
            return {}
        env = self.eval_env
        max_steps = cfg.eval_max_steps or self.task.max_episode_steps
        policy = self.actor if self.device.type == "cpu" else copy.deepcopy(self.actor).to("cpu")
        returns = []
        for ep in range(cfg.eval_episodes):
            env.set_seed(cfg.seed + 10_000 + ep)
            with torch.no_grad(), set_exploration_type(ExplorationType.DETERMINISTIC):
                td = env.rollout(max_steps, policy, break_when_any_done=True)
            returns.append(td.get(("next", "reward")).sum())
        r = torch.stack(returns)
        return {
            "eval/return_mean": float(r.mean()),
            "eval/return_std": float(r.std(correction=0)),
            "eval/episodes": float(cfg.eval_episodes),
        }

    # ------------------------------------------------------------------ loops
    def deployment_step(self) -> dict[str, float]:
        """Run (or finish, after a resume) one deployment of Alg. 1; returns its metrics.

        Metrics: ``eval/return_mean``/``std``, ``deployment/count`` (deployments so far),
        ``deployment/samples`` (real transitions so far), ``model/holdout_loss`` (+ per member),
        ``train/kl_to_deployed`` (``KL(pi || pi_deployed)`` on the latest deployment's states,
        Fig. 4), ``train/kl_to_bc``, ``train/imaginary_return``, TRPO acceptance, and
        ``time/*`` seconds per phase.
        """
        if self._offline:
            raise RuntimeError("this BREMEN instance ran offline (Alg. 2); create a new one for deployments")
        timers = {}
        for phase, fn in (
            ("collect", self.collect),
            ("fit", self.fit_model),
            ("bc", self.behaviour_clone),
            ("optimize", self.optimize_policy),
            ("evaluate", self.evaluate),
        ):
            if PHASES.index(phase) < PHASES.index(self.phase):
                continue
            t0 = time.perf_counter()
            self._metrics.update(fn())
            timers[f"time/{phase}_s"] = time.perf_counter() - t0
            nxt = PHASES.index(phase) + 1
            if nxt < len(PHASES):
                self._metrics.update(timers)
                self._set_phase(PHASES[nxt])
        self._metrics.update(timers)
        metrics = dict(self._metrics)
        metrics["deployment/count"] = self.deployment + 1
        metrics["deployment/samples"] = len(self.buffers)
        self.history.append(metrics)
        self._log({k: v for k, v in metrics.items()}, step=len(self.buffers))
        self.deployment += 1
        self.iteration = 0
        self._metrics = {}
        self._model_env = None
        self._set_phase(PHASES[0])
        return metrics

    def run(self) -> list[dict[str, float]]:
        """Deployments until ``num_deployments`` are done; returns :attr:`history`."""
        while self.deployment < self.config.num_deployments:
            self.deployment_step()
        return self.history

    def run_offline(self, dataset: TensorDictBase, iterations: int | None = None) -> dict[str, float]:
        """Alg. 2: fit the model and BC on a fixed dataset, then ``T`` TRPO iterations.

        The dataset is validated (keys, finiteness) and stored as deployment 0 (policy version
        ``-1``: not collected by this run). No further deployment happens.

        Args:
            dataset (TensorDictBase): transitions (``observation``, ``action``, ``("next", ...)``).
            iterations (int, optional): ``T``. Defaults to ``iterations_per_deployment``.
        """
        validate_offline_dataset(dataset)
        if self.buffers.num_deployments == 0:
            self.buffers.add_deployment(dataset.reshape(-1), policy_version=-1, metadata={"source": "offline"})
        self._offline = True
        metrics: dict[str, float] = {}
        metrics.update(self.fit_model())
        metrics.update(self.behaviour_clone())
        metrics.update(self.optimize_policy(iterations))
        metrics.update(self.evaluate())
        metrics["deployment/samples"] = len(self.buffers)
        self.history.append(metrics)
        self._log(metrics, step=self.total_iterations)
        return metrics

    # ------------------------------------------------------------------ checkpoints
    def state_dict(self) -> dict[str, Any]:
        """Everything needed to resume (the deployment data stays in :attr:`buffers`).

        Only tensors, numbers, strings, lists and dicts: loadable with ``weights_only=True``.
        """
        return {
            "config": self.config.to_dict(),
            "actor": self.actor.state_dict(),
            "deployed_actor": None if self.deployed_actor is None else self.deployed_actor.state_dict(),
            "bc_actor": None if self.bc_actor is None else self.bc_actor.state_dict(),
            "ensemble": self.ensemble.state_dict(),
            "trainer": self.trainer.state_dict(),
            "baseline": self.baseline.state_dict(),
            "counters": {
                "deployment": self.deployment,
                "policy_version": self.policy_version,
                "phase": self.phase,
                "iteration": self.iteration,
                "total_iterations": self.total_iterations,
                "num_deployments_on_disk": self.buffers.num_deployments,
            },
            "metrics": dict(self._metrics),
            "history": [dict(h) for h in self.history],
            "rng": {"torch": torch.get_rng_state(), "model": self.model_generator.get_state()},
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore :meth:`state_dict` output; refuses a checkpoint of a different config.

        ``num_deployments`` may differ (extending a finished run); any other differing key raises
        ``ValueError`` naming it.
        """
        diff = config_diff(state["config"], self.config.to_dict(), ignore=("num_deployments",))
        if diff:
            raise ValueError(
                "checkpoint was written with a different config; differing keys (saved, current): "
                + ", ".join(f"{k}={v[0]!r}->{v[1]!r}" for k, v in diff.items())
            )
        counters = state["counters"]
        if self.buffers.num_deployments < counters["num_deployments_on_disk"]:
            raise RuntimeError(
                f"checkpoint expects {counters['num_deployments_on_disk']} deployments on disk, "
                f"found {self.buffers.num_deployments} under {self.buffers.root}"
            )
        self.actor.load_state_dict(state["actor"])
        self.ensemble.load_state_dict(state["ensemble"])
        self.trainer.load_state_dict(state["trainer"])
        self.baseline.load_state_dict(state["baseline"])
        for attr in ("deployed_actor", "bc_actor"):
            if state[attr] is None:
                setattr(self, attr, None)
                continue
            module = freeze_policy(self.actor)
            module.load_state_dict(state[attr])
            setattr(self, attr, module)
        self.deployment = int(counters["deployment"])
        self.policy_version = int(counters["policy_version"])
        self.phase = str(counters["phase"])
        self.iteration = int(counters["iteration"])
        self.total_iterations = int(counters["total_iterations"])
        self._metrics = dict(state["metrics"])
        self.history = [dict(h) for h in state["history"]]
        torch.set_rng_state(state["rng"]["torch"])
        self.model_generator.set_state(state["rng"]["model"])
        self._model_env = None

