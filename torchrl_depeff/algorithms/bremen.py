"""BREMEN: Behavior-Regularized Model-ENsemble (Matsushima et al., ICLR 2021).

Recursive deployments (BREMEN Alg. 1) and the offline mode (Alg. 2) as a configuration of the
:class:`~torchrl_depeff.algorithms.loop.DeploymentLoop`: a frozen policy collects ``B`` real
transitions (:class:`~torchrl_depeff.algorithms.components.RealEnvDeployments`), the ``K``
deterministic dynamics models are refitted on all data (eq. 1,
:class:`~torchrl_depeff.algorithms.components.EnsembleFit`), the policy is re-initialised from
behaviour cloning of the latest deployment (eq. 3, Alg. 1 l. 6,
:class:`~torchrl_depeff.algorithms.components.BehaviourCloning`) and improved by ``T`` TRPO steps
on imaginary rollouts (eq. 2 + 4, :class:`~torchrl_depeff.algorithms.components.ImaginaryTRPO`).

This module holds BREMEN's own choices: its config (:class:`BREMENConfig`, with Table 4 in
:data:`PAPER_HYPERPARAMETERS`, the only copy in the repository), the paper's ablations and
baselines (:data:`VARIANTS`) and the wiring of the loop (:class:`BREMEN`).

Choices where the paper is silent or ambiguous (each is a :class:`BREMENConfig` field):

* **BC re-initialisation noise** (``bc.init_sigma``). Alg. 1 line 6 writes
  ``pi_theta0 = Normal(pi_beta_hat, 1)`` while App. F.2 says the stationary ``sigma = 0.1`` noise
  was "used for all our experiments", both in imaginary rollouts and in data collection. With a
  stationary (not learned) sigma the two cannot both hold, so ``init_sigma`` defaults to ``None``
  = keep ``policy.sigma`` (0.1): the paper preset follows App. F.2, the setting its reported
  results used. ``bc.init_sigma=1.0`` gives the literal Alg. 1 line 6.
* **Policy hidden activation**: ReLU, as in BREMEN's reference configs; the paper does not state it.
* **Start states of imaginary rollouts** (``imagination.start_states``): ``"first"`` (default; the
  first state of every recorded episode), ``"reset"`` (fresh resets of the real env, as the
  reference code samples them) or ``"all"`` (any dataset state, MBPO style).
* **Baseline update order**: advantages use the baseline fitted on the previous iteration's
  rollouts, then the baseline is refitted on the current ones (rllab / BREMEN reference order).
  GAE bootstraps with the baseline at truncation (TorchRL's GAE; rllab used 0).
* **Evaluation** uses the policy mean (no noise), ``evaluation.episodes`` episodes with fixed
  seeds in a separate env instance; evaluation episodes are not deployments.
  ``evaluation.every_iterations`` also evaluates during the TRPO phase (``curve/eval_return_it{k}``,
  the axes of the offline Fig. 14).
* **Gate**: finite parameters and in-bounds mean actions on dataset states are checked before
  every deployment after the first; a KL bound (``deployment.gate_max_kl``) is off by default
  because the paper does not bound the distance between deployed policies.
* **Tasks outside Table 4**: ``cheetah_run`` (App. G.5) reuses HalfCheetah's row;
  ``fetch_reach`` and ``hand_reach`` follow Fig. 3 (10 deployments of 25 000 transitions) with
  50-step rollouts (their episode length) and Table 4's Ant/Hopper/Walker2d step size 0.05.
"""
from __future__ import annotations

import functools
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import torch
from tensordict import TensorDictBase
from torch import nn
from torchrl.envs import EnvBase
from torchrl.modules import ProbabilisticActor

from torchrl_depeff.algorithms.components import (
    BehaviourCloning,
    EnsembleFit,
    ImaginaryTRPO,
    OfflineDataset,
    RealEnvDeployments,
    RealEnvEvaluation,
    trpo_loss_factory,
)
from torchrl_depeff.algorithms.config import (
    apply_preset,
    apply_table_row,
    BCConfig,
    check_choice,
    check_int,
    ConfigBase,
    DeploymentConfig,
    EvalConfig,
    ImaginationConfig,
    ModelConfig,
    PolicyConfig,
    TRPOConfig,
)
from torchrl_depeff.algorithms.loop import DeploymentLoop, PHASES
from torchrl_depeff.collectors.gate import DeploymentGate
from torchrl_depeff.data.deployments import DeploymentReplayBuffers
from torchrl_depeff.envs.tasks import get_task, make_env, TASK_NAMES
from torchrl_depeff.envs.vector import make_vector_env
from torchrl_depeff.modules.actors import GaussianPolicyNet, make_gaussian_actor
from torchrl_depeff.modules.ensemble import DynamicsEnsemble
from torchrl_depeff.trainers.dynamics import EnsembleTrainer

__all__ = [
    "BREMEN",
    "BREMENConfig",
    "PAPER_HYPERPARAMETERS",
    "PHASES",
    "PRESETS",
    "TABLE4_COLUMNS",
    "VARIANTS",
]

ACTIVATION_MODULES: dict[str, type[nn.Module]] = {"relu": nn.ReLU, "tanh": nn.Tanh, "silu": nn.SiLU}

# ====================================================================
# BREMEN Table 4 (the only copy) and the presets built on it
# --------------------------------------------------------------------

#: BREMEN Table 4, "Hyper-parameters of BREMEN in deployment-efficient settings", as printed
#: (one row per task, the paper's column names).
PAPER_HYPERPARAMETERS: dict[str, dict[str, float | int]] = {
    "ant": {"iteration_per_batch": 2000, "deployment": 5, "total_iteration": 10_000, "rollouts_length": 250,
            "max_step_size": 0.05, "discount_factor": 0.99, "gae_lambda": 0.97, "stationary_noise": 0.1},
    "halfcheetah": {"iteration_per_batch": 2000, "deployment": 5, "total_iteration": 10_000, "rollouts_length": 250,
                    "max_step_size": 0.1, "discount_factor": 0.99, "gae_lambda": 0.95, "stationary_noise": 0.1},
    "hopper": {"iteration_per_batch": 6000, "deployment": 10, "total_iteration": 60_000, "rollouts_length": 1000,
               "max_step_size": 0.05, "discount_factor": 0.99, "gae_lambda": 0.95, "stationary_noise": 0.1},
    "walker2d": {"iteration_per_batch": 2000, "deployment": 10, "total_iteration": 20_000, "rollouts_length": 1000,
                 "max_step_size": 0.05, "discount_factor": 0.99, "gae_lambda": 0.95, "stationary_noise": 0.1},
}

#: where each Table 4 column goes in :class:`BREMENConfig` (``total_iteration`` is derived:
#: ``iteration_per_batch * deployment``, checked by the tests, not a setting)
TABLE4_COLUMNS: dict[str, str | tuple[str, ...]] = {
    "iteration_per_batch": "trpo.iterations",
    "deployment": "deployment.num_deployments",
    "total_iteration": (),
    "rollouts_length": "imagination.rollout_length",
    "max_step_size": "trpo.max_kl",
    "discount_factor": "trpo.gamma",
    "gae_lambda": "trpo.gae_lambda",
    "stationary_noise": "policy.sigma",
}

#: paper presets of the tasks that Table 4 does not list (see the module doc)
_OTHER_PAPER_TASKS: dict[str, dict[str, Any]] = {
    "cheetah_run": {},  # App. G.5: HalfCheetah's row
    "fetch_reach": {"deployment.num_deployments": 10, "deployment.size": 25_000,
                    "imagination.rollout_length": 50, "trpo.max_kl": 0.05},  # Fig. 3
    "hand_reach": {"deployment.num_deployments": 10, "deployment.size": 25_000,
                   "imagination.rollout_length": 50, "trpo.max_kl": 0.05},  # Fig. 3
}

#: our presets (not the paper's): ``quick`` runs in minutes on 2 CPU cores (the README's main
#: job), ``smoke`` in seconds (tests, installation checks). Values are applied over the paper
#: preset of the task.
PRESETS: dict[str, dict[str, Any]] = {
    "quick": {
        # 4 HalfCheetah sub-envs of 1000 steps each: the same 4 episodes per deployment as one env,
        # collected about 3x faster (DESIGN.md: deploy across a batch of environments)
        "deployment.size": 4000, "deployment.num_deployments": 5, "deployment.num_envs": 4, "trpo.iterations": 60,
        "imagination.rollout_length": 100, "trpo.batch_size": 5000, "model.num_cells": (200, 200),
        "policy.num_cells": (64, 64), "model.max_epochs": 50, "model.batch_size": 256,
        "evaluation.episodes": 2, "log_interval": 20, "checkpoint_interval": 20,
    },
    "smoke": {
        "deployment.size": 200, "deployment.num_deployments": 2, "deployment.frames_per_batch": 100,
        "trpo.iterations": 2, "imagination.rollout_length": 5, "trpo.batch_size": 20,
        "model.num_members": 2, "model.num_cells": (16,), "model.max_epochs": 2, "model.batch_size": 64,
        "policy.num_cells": (8,), "bc.max_epochs": 2, "evaluation.episodes": 1,
        "evaluation.max_steps": 10, "log_interval": 1, "checkpoint_interval": 1,
    },
}
#: per-task adjustments of a preset (episode length 50: shorter rollouts, smaller deployments)
_PRESET_TASK_ADJUSTMENTS: dict[str, dict[str, dict[str, Any]]] = {
    "quick": {t: {"deployment.size": 2000, "imagination.rollout_length": 50} for t in ("fetch_reach", "hand_reach")},
}

#: the paper's ablations and baselines (Sec. 5.3, App. E) as config overrides
VARIANTS: dict[str, dict[str, Any]] = {
    "bremen": {},
    "me_trpo": {"bc.reinit": False},  # no BC re-initialisation (ME-TRPO under the same budget)
    # sec. 5.3 / App. G.3: explicit KL penalty on value, no BC init; by default (trpo.explicit_kl_mode
    # = "reward") the penalty enters the rewards before GAE as in the reference code ("surrogate":
    # eq. (6) read literally)
    "explicit_kl": {"bc.reinit": False, "trpo.explicit_kl_coef": 0.1},
    "mopo": {"imagination.penalty": "mopo"},  # App. E soft penalty
    "morel": {"imagination.penalty": "morel"},  # App. E hard penalty
    "recursive_bc": {"trpo.enabled": False},  # deploy the BC policy of the latest data
}


def _table_defaults(section: str, cls: type) -> Callable[[], Any]:
    """Default factory of a section: its fields from HalfCheetah's Table 4 row, the rest default."""

    def make() -> Any:
        values = {}
        for column, value in PAPER_HYPERPARAMETERS["halfcheetah"].items():
            paths = TABLE4_COLUMNS[column]
            for path in (paths,) if isinstance(paths, str) else paths:
                head, _, tail = path.partition(".")
                if head == section:
                    values[tail] = value
        return cls(**values)

    return make


# ====================================================================
# Config
# --------------------------------------------------------------------


@dataclass
class BREMENConfig(ConfigBase):
    """Every knob of a BREMEN run; ``BREMENConfig()`` is HalfCheetah's Table 4 row plus App. F.

    Use :meth:`paper` for another task's row, :meth:`preset` for ``"quick"``/``"smoke"``,
    :meth:`variant` for the ablations and :meth:`override` for anything else
    (``cfg.override({"trpo.max_kl": 0.05})``).

    Args:
        task (str): task name (:data:`~torchrl_depeff.envs.TASK_NAMES`). Defaults to ``"halfcheetah"``.
        name (str): the variant's name (:data:`VARIANTS`). Defaults to ``"bremen"``.
        mode (str): ``"deployments"`` (Alg. 1) or ``"offline"`` (Alg. 2: one fixed dataset, ``T`` =
            ``trpo.iterations``; the paper's offline runs use 6250 iterations, App. G).
        deployment (DeploymentConfig): ``I``, ``B``, collection backend, gate.
        model (ModelConfig): the ``K`` dynamics models and their fit (App. F.1: 5 x 2 x 1024).
        policy (PolicyConfig): ``tanh(mu(s)) + N(0, sigma^2)`` (App. F.1-F.2: 2 x 200, sigma 0.1).
        bc (BCConfig): eq. (3) and the Alg. 1 l. 6 re-initialisation.
        imagination (ImaginationConfig): eq. (2) rollouts, App. E penalties.
        trpo (TRPOConfig): eq. (4) / eq. (6) and GAE.
        evaluation (EvalConfig): real-env evaluation after each deployment.
        log_interval (int): TRPO iterations between ``train/*`` logs. Defaults to 50.
        checkpoint_interval (int): TRPO iterations between checkpoints. Defaults to 100.
        seed (int): seed of everything. Defaults to 0.
        device (str): device of the ensemble, model env and policy. Defaults to ``"cpu"``.

    Examples:
        >>> from torchrl_depeff.algorithms.bremen import BREMENConfig
        >>> cfg = BREMENConfig.paper("hopper")
        >>> cfg.trpo.iterations, cfg.deployment.num_deployments, cfg.imagination.rollout_length, cfg.trpo.max_kl
        (6000, 10, 1000, 0.05)
        >>> BREMENConfig().variant("me_trpo").bc.reinit
        False
        >>> BREMENConfig().override({"deployment.size": 0})
        Traceback (most recent call last):
        ...
        ValueError: deployment.size must be an int >= 1, got 0
    """

    task: str = "halfcheetah"
    name: str = "bremen"
    mode: str = "deployments"
    deployment: DeploymentConfig = field(default_factory=_table_defaults("deployment", DeploymentConfig))
    model: ModelConfig = field(default_factory=ModelConfig)
    policy: PolicyConfig = field(default_factory=_table_defaults("policy", PolicyConfig))
    bc: BCConfig = field(default_factory=BCConfig)
    imagination: ImaginationConfig = field(default_factory=_table_defaults("imagination", ImaginationConfig))
    trpo: TRPOConfig = field(default_factory=_table_defaults("trpo", TRPOConfig))
    evaluation: EvalConfig = field(default_factory=EvalConfig)
    log_interval: int = 50
    checkpoint_interval: int = 100
    seed: int = 0
    device: str = "cpu"

    #: flat field names of torchrl_depeff 0.1 -> paths (``from_dict`` still accepts them)
    _LEGACY_KEYS = {
        "num_deployments": "deployment.num_deployments", "deployment_size": "deployment.size",
        "iterations_per_deployment": "trpo.iterations", "rollout_length": "imagination.rollout_length",
        "trpo_batch_size": "trpo.batch_size", "max_kl": "trpo.max_kl", "gamma": "trpo.gamma",
        "gae_lambda": "trpo.gae_lambda", "cg_iterations": "trpo.cg_iterations", "cg_damping": "trpo.cg_damping",
        "check_kl": "trpo.check_kl", "line_search_steps": "trpo.line_search_steps",
        "accept_ratio": "trpo.accept_ratio", "normalize_advantage": "trpo.normalize_advantage",
        "sigma": "policy.sigma", "learn_sigma": "policy.learn_sigma", "bc_init_sigma": "bc.init_sigma",
        "policy_num_cells": "policy.num_cells", "policy_activation": "policy.activation",
        "ensemble_size": "model.num_members", "ensemble_num_cells": "model.num_cells",
        "dynamics_lr": "model.lr", "dynamics_batch_size": "model.batch_size",
        "dynamics_max_epochs": "model.max_epochs", "dynamics_patience": "model.patience",
        "holdout_ratio": ("model.holdout_ratio", "bc.holdout_ratio"), "bc_lr": "bc.lr",
        "bc_batch_size": "bc.batch_size", "bc_max_epochs": "bc.max_epochs", "bc_patience": "bc.patience",
        "bc_data": "bc.data", "bc_reinit": "bc.reinit", "explicit_kl_coef": "trpo.explicit_kl_coef",
        "policy_optimization": "trpo.enabled", "penalty": "imagination.penalty",
        "mopo_coef": "imagination.mopo_coef", "morel_threshold": "imagination.morel_threshold",
        "morel_reward": "imagination.morel_reward", "member_selection": "imagination.member_selection",
        "start_states": "imagination.start_states", "num_reset_states": "imagination.num_reset_states",
        "eval_episodes": "evaluation.episodes", "eval_max_steps": "evaluation.max_steps",
        "collect_frames_per_batch": "deployment.frames_per_batch", "num_envs": "deployment.num_envs",
        "collector": "deployment.collector", "num_workers": "deployment.num_workers",
        "gate_max_kl": "deployment.gate_max_kl", "gate_on_fail": "deployment.gate_on_fail",
    }

    def _check(self, prefix: str) -> None:
        check_choice(self.task, "task", TASK_NAMES)
        check_choice(self.mode, "mode", ("deployments", "offline"))
        for name in ("log_interval", "checkpoint_interval", ):
            check_int(getattr(self, name), name)
        check_int(self.seed, "seed", minimum=0)
        if not isinstance(self.device, str) or not self.device:
            raise ValueError(f"device must be a device string such as 'cpu' or 'cuda', got {self.device!r}")
        try:
            torch.device(self.device)
        except RuntimeError as err:
            raise ValueError(f"device {self.device!r} is not a torch device ({err})") from err
        if self.trpo.batch_size < self.imagination.rollout_length:
            raise ValueError(
                f"trpo.batch_size ({self.trpo.batch_size}) must be >= imagination.rollout_length "
                f"({self.imagination.rollout_length}): at least one imaginary rollout per iteration"
            )

    # ------------------------------------------------------------------ presets
    @classmethod
    def paper(cls, task: str, **overrides: Any) -> BREMENConfig:
        """Table 4 values of ``task`` (plus App. F defaults), then ``overrides`` (dotted paths).

        Examples:
            >>> from torchrl_depeff.algorithms.bremen import BREMENConfig
            >>> BREMENConfig.paper("ant").trpo.gae_lambda
            0.97
            >>> BREMENConfig.paper("hopper", **{"trpo.max_kl": 0.1}).trpo.max_kl
            0.1
        """
        if task not in TASK_NAMES:
            raise ValueError(f"unknown task {task!r}; valid names are {list(TASK_NAMES)}")
        cfg = cls(task=task)
        if task in PAPER_HYPERPARAMETERS:
            cfg = apply_table_row(cfg, PAPER_HYPERPARAMETERS[task], TABLE4_COLUMNS)
        else:
            cfg = cfg.override(_OTHER_PAPER_TASKS[task])
        return cfg.override(overrides) if overrides else cfg

    @classmethod
    def preset(cls, task: str, preset: str = "paper", **overrides: Any) -> BREMENConfig:
        """``"paper"`` (:meth:`paper`), or one of :data:`PRESETS` applied over it.

        Examples:
            >>> from torchrl_depeff.algorithms.bremen import BREMENConfig
            >>> cfg = BREMENConfig.preset("halfcheetah", "quick")
            >>> cfg.deployment.size, cfg.trpo.iterations, cfg.trpo.max_kl
            (4000, 60, 0.1)
        """
        presets = {name: {**values, **_PRESET_TASK_ADJUSTMENTS.get(name, {}).get(task, {})}
                   for name, values in PRESETS.items()}
        return apply_preset(cls.paper(task), preset, presets, overrides)

    @classmethod
    def tiny(cls, **overrides: Any) -> BREMENConfig:
        """The ``smoke`` preset on HalfCheetah (seconds): ``BREMENConfig.preset("halfcheetah", "smoke")``."""
        return cls.preset("halfcheetah", "smoke", **overrides)

    def variant(self, name: str) -> BREMENConfig:
        """This config with the overrides of an ablation / baseline of :data:`VARIANTS`.

        Examples:
            >>> from torchrl_depeff.algorithms.bremen import BREMENConfig
            >>> cfg = BREMENConfig().variant("explicit_kl")
            >>> cfg.name, cfg.bc.reinit, cfg.trpo.explicit_kl_coef
            ('explicit_kl', False, 0.1)
        """
        variants = self.variants()
        if name not in variants:
            raise ValueError(f"unknown variant {name!r}; valid names are {sorted(variants)}")
        return self.override({**variants[name], "name": name})

    @classmethod
    def variants(cls) -> dict[str, dict[str, Any]]:
        """The named ablations of this algorithm."""
        return VARIANTS

    # ------------------------------------------------------------------ builders
    def make_actor(self, *, learn_sigma: bool | None = None) -> ProbabilisticActor:
        """The policy BREMEN trains and deploys for this config (``tanh(mu(s)) + N(0, sigma^2)``).

        One constructor for :class:`BREMEN`'s actor, its behaviour-cloning actor and anyone
        rebuilding a checkpoint's actor.

        Args:
            learn_sigma (bool, optional): overrides ``policy.learn_sigma`` (BC trains the mean
                only). Defaults to ``None`` (the config's value).

        Examples:
            >>> from tensordict import TensorDict
            >>> from torchrl_depeff.algorithms.bremen import BREMENConfig
            >>> actor = BREMENConfig().override({"policy.num_cells": (8,)}).make_actor()
            >>> actor(TensorDict({"observation": torch.randn(3, 17)}, [3]))["action"].shape
            torch.Size([3, 6])
        """
        task = get_task(self.task)
        p = self.policy
        return make_gaussian_actor(
            task.observation_dim, task.action_dim, num_cells=p.num_cells, sigma=p.sigma,
            learn_sigma=p.learn_sigma if learn_sigma is None else learn_sigma,
            activation=ACTIVATION_MODULES[p.activation], normalize_observations=p.normalize_observations,
        )

    def make_ensemble(self, model: ModelConfig | None = None) -> DynamicsEnsemble:
        """The dynamics ensemble of ``model`` (default: ``self.model``) for this task."""
        task = get_task(self.task)
        m = self.model if model is None else model
        return DynamicsEnsemble(
            task.observation_dim, task.action_dim, num_members=m.num_members, num_cells=m.num_cells,
            activation=ACTIVATION_MODULES[m.activation], probabilistic=m.probabilistic,
            predict_reward=m.predict_reward, num_elites=m.num_elites,
        )


def make_trainer(ensemble: DynamicsEnsemble, model: ModelConfig, *, seed: int, logger: Any = None,
                 progress: bool = False, loss_type: str | None = None) -> EnsembleTrainer:
    """The :class:`~torchrl_depeff.trainers.EnsembleTrainer` of a :class:`ModelConfig`."""
    return EnsembleTrainer(
        ensemble, lr=model.lr, weight_decay=model.weight_decay, batch_size=model.batch_size,
        holdout_ratio=model.holdout_ratio, max_epochs=model.max_epochs, patience=model.patience,
        loss_type=loss_type, logger=logger, progress=progress, seed=seed, matmul_precision=model.matmul_precision,
    )


def default_env(cfg: BREMENConfig) -> EnvBase | Callable[[], EnvBase]:
    """The deployment env of a config: one env, a vector env, or a factory for worker processes."""
    d = cfg.deployment
    if d.num_envs > 1:
        factory = functools.partial(make_vector_env, cfg.task, d.num_envs)
    else:
        factory = functools.partial(make_env, cfg.task)
    return factory() if d.collector == "single" else factory


def check_env(env: EnvBase, task: str) -> None:
    """Refuse a real env whose observation/action sizes are not the task's (naming both)."""
    spec = get_task(task)
    if "observation" not in env.observation_spec.keys():
        raise ValueError(f"the env has no 'observation' entry (keys {list(env.observation_spec.keys())}); task "
                         f"{task!r} needs an observation of size {spec.observation_dim}")
    obs = env.observation_spec["observation"].shape[-1:]
    act = env.action_spec.shape[-1:]
    if (tuple(obs), tuple(act)) != ((spec.observation_dim,), (spec.action_dim,)):
        raise ValueError(
            f"the env's observation/action sizes ({list(obs)}, {list(act)}) are not task {task!r}'s "
            f"([{spec.observation_dim}], [{spec.action_dim}]): pass an env of this task or change config.task"
        )


def _action_spec(env: EnvBase | Callable[[], EnvBase], task: str):
    spec = env.action_spec if isinstance(env, EnvBase) else make_env(task).action_spec
    return spec[(0,) * (spec.ndim - 1)] if spec.ndim > 1 else spec


# ====================================================================
# The loop
# --------------------------------------------------------------------


class BREMEN(DeploymentLoop):
    """BREMEN's deployment loop (Alg. 1) and offline mode (Alg. 2): a configured :class:`DeploymentLoop`.

    The learner's state (policy, ensemble, trainer, baseline, counters, RNG states, history) is in
    :meth:`state_dict`; the deployment data lives on disk in :attr:`buffers`. With ``run_dir`` the
    loop writes ``checkpoint.pt`` after every phase and ``metrics.json`` after every deployment,
    and resumes from them when constructed again on the same directory.

    Args:
        config (BREMENConfig): hyper-parameters.

    Keyword Args:
        run_dir (str | Path, optional): output directory (``deployments/``, ``checkpoint.pt``,
            ``metrics.json``); resumed if it holds a checkpoint.
        data_root (str | Path, optional): directory of the deployment buffers when no
            ``run_dir`` is given (no automatic checkpoints then).
        env (EnvBase | Callable[[], EnvBase], optional): the real env used for deployments (or a
            factory for multi-process collection). Defaults to ``make_env(config.task)``.
        eval_env (EnvBase, optional): env for evaluation episodes. Defaults to a separate
            ``make_vector_env(config.task, 1)``: the rows of ``make_env(config.task)`` (same
            reset states, steps and Table 3 reward, bit for bit), whose deterministic episodes
            :class:`~torchrl_depeff.algorithms.components.RealEnvEvaluation` runs without
            tensordicts.
        logger (torchrl Logger, optional): receives scalars (``log_scalar(name, value, step)``).
        progress (bool): tqdm bars for collection, model fit and TRPO. Defaults to ``False``.
        checkpoint_fn (Callable[[BREMEN], None], optional): called at every checkpoint.
        collect_kwargs (dict, optional): extra arguments of
            :func:`~torchrl_depeff.collectors.collect_deployment` (``max_retries``, ``ray_address``...).
        dataset (TensorDictBase, optional): the fixed dataset of ``mode="offline"`` (Alg. 2).
        dataset_source (str): a label of the dataset stored with it (e.g. its path).
        resume (bool): load ``run_dir/checkpoint.pt`` if present. Defaults to ``True``.

    Examples:
        >>> import tempfile
        >>> from torchrl_depeff.algorithms.bremen import BREMEN, BREMENConfig
        >>> algo = BREMEN(BREMENConfig.tiny(), run_dir=tempfile.mkdtemp())
        >>> metrics = algo.deployment_step()
        >>> metrics["deployment/count"], metrics["deployment/samples"], len(algo.buffers)
        (1, 200, 200)
    """

    def __init__(
        self,
        config: BREMENConfig,
        *,
        run_dir: str | Path | None = None,
        data_root: str | Path | None = None,
        env: EnvBase | Callable[[], EnvBase] | None = None,
        eval_env: EnvBase | None = None,
        logger: Any | None = None,
        progress: bool = False,
        checkpoint_fn: Callable[[DeploymentLoop], None] | None = None,
        collect_kwargs: dict[str, Any] | None = None,
        dataset: TensorDictBase | None = None,
        dataset_source: str = "offline",
        resume: bool = True,
    ) -> None:
        if not isinstance(config, BREMENConfig):
            raise TypeError(f"config must be a {BREMENConfig.__name__}, got {type(config).__name__}")
        parts = self._build(config, env=env, eval_env=eval_env, logger=logger, progress=progress,
                            collect_kwargs=collect_kwargs, run_dir=run_dir, data_root=data_root)
        num_deployments = config.deployment.num_deployments
        if config.mode == "offline":
            if dataset is None:
                raise ValueError("mode='offline' (Alg. 2) needs a dataset: BREMEN(cfg, dataset=..., ...)")
            parts["source"] = OfflineDataset(dataset, source=dataset_source)
            num_deployments = 1
        elif dataset is not None:
            raise ValueError("a dataset is only used with mode='offline' (Alg. 2); this config has mode='deployments'")
        super().__init__(config, num_deployments=num_deployments, run_dir=run_dir, checkpoint_fn=checkpoint_fn,
                         logger=logger, progress=progress, device=config.device, **parts)
        if resume:
            self.resume()

    # ------------------------------------------------------------------ wiring
    @staticmethod
    def _buffers(run_dir: str | Path | None, data_root: str | Path | None) -> DeploymentReplayBuffers:
        if run_dir is None and data_root is None:
            raise ValueError("give run_dir (outputs, checkpoints, resume) or data_root (deployment data only)")
        if run_dir is not None and data_root is not None:
            raise ValueError("give run_dir or data_root, not both (run_dir/deployments holds the data)")
        return DeploymentReplayBuffers(Path(run_dir) / "deployments" if run_dir is not None else data_root)

    @classmethod
    def _build(cls, cfg: BREMENConfig, *, env, eval_env, logger, progress, collect_kwargs, run_dir,
               data_root, exploration=None, extra_models=None, bc_weighting=None, loss_factory=None,
               rollout_labeller=None, batch_metrics=None, analyses=(), labeler=None) -> dict[str, Any]:
        """Build the strategies of a BREMEN-family loop; MUSBO passes its own strategies."""
        task = get_task(cfg.task)
        device = torch.device(cfg.device)
        torch.manual_seed(cfg.seed)
        env = env if env is not None else default_env(cfg)
        if isinstance(env, EnvBase):
            check_env(env, cfg.task)
        if isinstance(eval_env, EnvBase):
            check_env(eval_env, cfg.task)
        buffers = cls._buffers(run_dir, data_root)
        actor = cfg.make_actor().to(device)
        ensemble = cfg.make_ensemble().to(device)
        trainer = make_trainer(ensemble, cfg.model, seed=cfg.seed, logger=logger, progress=progress)
        models: dict[str, Any] = {"dynamics": EnsembleFit(ensemble, trainer)}
        if extra_models is not None:
            models.update(extra_models(cfg, device, logger))
        d = cfg.deployment
        gate = DeploymentGate(max_kl=d.gate_max_kl, action_spec=_action_spec(env, cfg.task), on_fail=d.gate_on_fail)
        kwargs = dict(frames_per_batch=d.frames_per_batch, collector=d.collector, num_workers=d.num_workers)
        kwargs.update(collect_kwargs or {})
        source = RealEnvDeployments(env, actor, size=d.size, gate=gate, seed=cfg.seed, exploration=exploration,
                                    progress=progress, **kwargs)
        sigma = cfg.bc.init_sigma if cfg.bc.init_sigma is not None else cfg.policy.sigma
        initializer = BehaviourCloning(
            functools.partial(cfg.make_actor, learn_sigma=False), lr=cfg.bc.lr, batch_size=cfg.bc.batch_size,
            holdout_ratio=cfg.bc.holdout_ratio, max_epochs=cfg.bc.max_epochs, patience=cfg.bc.patience,
            data=cfg.bc.data, sigma=sigma, reinit=cfg.bc.reinit or not cfg.trpo.enabled, weighting=bc_weighting,
            seed=cfg.seed,
        )
        improver = None
        if cfg.trpo.enabled:
            improver = ImaginaryTRPO(
                task, ensemble, trpo=cfg.trpo, imagination=cfg.imagination, real_env=env,
                loss_factory=loss_factory or trpo_loss_factory(
                    normalize_advantage=cfg.trpo.normalize_advantage, explicit_kl_coef=cfg.trpo.explicit_kl_coef,
                    explicit_kl_mode=cfg.trpo.explicit_kl_mode),
                rollout_labeller=rollout_labeller, batch_metrics=batch_metrics, seed=cfg.seed,
                log_interval=cfg.log_interval, checkpoint_interval=cfg.checkpoint_interval, make_env=make_env,
                device=device, eval_every=cfg.evaluation.every_iterations,
            )
        if cfg.evaluation.batched and eval_env is not None:
            raise ValueError("evaluation.batched=True builds its own batched evaluation env "
                             "(make_vector_env); it cannot use the eval_env given: pass one or the other")
        evaluator = RealEnvEvaluation(
            (lambda: eval_env) if eval_env is not None else functools.partial(make_vector_env, cfg.task, 1),
            episodes=cfg.evaluation.episodes, max_steps=cfg.evaluation.max_steps or task.max_episode_steps,
            seed=cfg.seed, analyses=analyses,
            make_batched_env=functools.partial(make_vector_env, cfg.task) if cfg.evaluation.batched else None,
        )
        return dict(actor=actor, buffers=buffers, source=source, models=models, initializer=initializer,
                    improver=improver, evaluator=evaluator)

    # ------------------------------------------------------------------ Alg. 2
    def run_offline(self, dataset: TensorDictBase, iterations: int | None = None) -> dict[str, float]:
        """Alg. 2 on a loop built for deployments: switch it to ``mode="offline"`` and run it.

        Kept for scripts written for torchrl_depeff 0.1; new code builds
        ``BREMEN(cfg.override(mode="offline"), dataset=dataset, run_dir=...)`` and calls
        :meth:`deployment_step` (resumable). Refused once the loop has deployments.

        Args:
            dataset (TensorDictBase): transitions (``observation``, ``action``, ``("next", ...)``).
            iterations (int, optional): ``T``. Defaults to ``trpo.iterations``.
        """
        if self.config.mode != "offline":
            if self.deployment > 0 or self.buffers.num_deployments or self.phase != PHASES[0]:
                raise RuntimeError(
                    f"this BREMEN loop already holds deployments under {self.buffers.root}: an offline "
                    "(Alg. 2) run needs its own directory"
                )
            self.source = OfflineDataset(dataset)
            self.num_deployments = 1
        values: dict[str, Any] = {"mode": "offline"}
        if iterations is not None:
            values["trpo.iterations"] = int(iterations)
        self.config = self.config.override(values)
        if self.improver is not None:
            self.improver.trpo = self.config.trpo
        if self.deployment >= 1:
            return self.history[-1]
        return self.deployment_step()

    # ------------------------------------------------------------------ shortcuts (stable names)
    @property
    def ensemble(self) -> DynamicsEnsemble:
        """The dynamics ensemble (eq. 1)."""
        return self.models["dynamics"].ensemble

    @property
    def trainer(self) -> EnsembleTrainer:
        """The dynamics ensemble's trainer."""
        return self.models["dynamics"].trainer

    @property
    def baseline(self):
        """The linear value baseline of the TRPO phase (``None`` without policy optimisation)."""
        return None if self.improver is None else self.improver.baseline

    @property
    def gate(self) -> DeploymentGate:
        """The pre-deployment gate."""
        return self.source.gate

    @property
    def env(self):
        """The real deployment env (or its factory)."""
        return self.source.env

    @property
    def task(self):
        """The task spec of the config."""
        return get_task(self.config.task)

    @property
    def policy_net(self) -> GaussianPolicyNet:
        """The :class:`GaussianPolicyNet` inside :attr:`actor`."""
        return self.actor.module[0].module

    @property
    def deployed_actor(self) -> nn.Module | None:
        """The frozen policy currently deployed (``None`` before the first deployment)."""
        return self.deployed_policy

    @property
    def bc_actor(self) -> nn.Module | None:
        """The frozen behaviour-cloned policy of the latest deployment (eq. 3)."""
        return self.reference_policy

    @property
    def policy_version(self) -> int:
        """Version of the deployed policy (bumped by every deployment that passed the gate)."""
        return self.source.policy_version if hasattr(self.source, "policy_version") else -1

    def behaviour_clone(self) -> dict[str, float]:
        """The pretrain phase (BC, eq. 3, and the re-initialisation of Alg. 1 l. 6)."""
        return self.pretrain()

    def make_model_env(self, start_states: torch.Tensor | None = None) -> EnvBase:
        """The imaginary MDP of eq. (2) on the current data (with the App. E penalty when configured)."""
        if self.improver is None:
            raise RuntimeError("this configuration has no policy optimisation (trpo.enabled=False)")
        return self.improver.make_model_env(self, start_states)

    def imaginary_rollout(self) -> TensorDictBase:
        """Eq. (2): one TRPO batch of imaginary rollouts of the current policy."""
        if self.improver.model_env is None:
            self.make_model_env()
        return self.improver.imaginary_rollout(self.actor)


