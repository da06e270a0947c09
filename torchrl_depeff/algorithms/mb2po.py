r"""MB2PO: AWAC pre-training, then conservative model-based fine-tuning (MB2PO Alg. 1).

Villaflor, Dolan and Schneider, "Fine-tuning offline reinforcement learning with model-based
policy optimization" (MB2PO). The algorithm (Alg. 1, App. 7.1-7.3), as a configuration of the
:class:`~torchrl_depeff.algorithms.loop.DeploymentLoop` with a single, offline "deployment":

* collect: the offline dataset :math:`D_\beta` is stored once as deployment 0
  (:class:`~torchrl_depeff.algorithms.components.OfflineDataset`);
* fit: an ensemble of ``N`` probabilistic dynamics models (next state and reward) on
  :math:`D_\beta` (:class:`~torchrl_depeff.algorithms.components.EnsembleFit`, elites set);
* pretrain: a tanh Gaussian-mixture actor and clipped double-Q critics trained with AWAC on
  :math:`D_\beta` alone (:class:`AWACPretraining`);
* optimize: ``K`` iterations (:class:`ConservativeFinetuning`): ``h``-step branched rollouts
  from dataset states with the current actor in the conservative MDP
  :math:`\tilde r = \hat r - \lambda \max_i \lVert\Sigma_i\rVert_F` (MB2PO eq. 3 / Alg. 1; by
  default :math:`\Sigma_i` is read as the predicted standard deviations, as in the paper's text
  and MOPO's code: see ``finetune.penalty_uncertainty``), stored in a buffer that keeps the last
  ``n = 100`` iterations, then AWAC steps on batches holding an :math:`\omega` share of real rows
  and :math:`1-\omega` model rows (:class:`OmegaMixing`, MB2PO eq. 11);
* evaluate: real-env returns (the env's native reward) and the D4RL normalised score.

This module holds MB2PO's own choices: :class:`MB2POConfig`, the App. 7.3 table
(:data:`MB2PO_PAPER_HYPERPARAMETERS`, the only copy) and the strategies above.

Choices where the paper is silent or ambiguous:

* **Batch mixing.** Each AWAC batch holds exactly ``round(omega * batch_size)`` real rows and the
  rest model rows (Alg. 1 "draw omega portion of the samples from D_beta"), each part drawn
  uniformly with replacement from its buffer; rows carry ``"is_real"``.
* **Termination inside rollouts.** Alg. 1 rolls exactly ``h`` steps. With a termination function
  (hopper, walker2d) a row that terminates is restarted by the env from a fresh dataset state for
  the remaining steps (TorchRL partial reset), so every iteration adds the same number of rows
  (``rollouts * h``) and "the last N iterations" stay exact in the circular buffer.
* **Reward.** The chosen member's predicted reward mean (App. 7.2: the models output the reward).
* **Critic target** bootstraps through truncations (only ``terminated`` stops it).
* A dataset without ``("next", "terminated")`` (D4RL ``terminals`` missing) treats every
  ``done`` as a termination.
* **Penalty reading** (``finetune.penalty_uncertainty``): ``"std_norm"`` (default):
  :math:`\max_i \lVert\sigma_i\rVert_2` (MB2PO Sec. 4.3 "the largest predicted standard
  deviation", MOPO's code); ``"cov_frobenius"``: the literal covariance reading
  :math:`\max_i \lVert\sigma_i^2\rVert_2`. Measured on a local HalfCheetah "mixed" run (20000
  rows, 30 model epochs): the covariance reading gave a penalty of about 12 per step against
  rewards of about -0.3 and drove the return from -4 to -262 in 5 iterations; the std reading
  gave about 3.5 per step and -19.
* **Elites**: 5 of 5 (the paper trains 5 models and does not mention elites).
* **Model fit length**: early stopping on a 15 % holdout (``model.max_epochs`` caps it); the
  paper states 100000 gradient steps instead.
* **Evaluation** is BREMEN's: the policy's deterministic action (``tanh`` of the most likely
  component's mean), episode ``i`` seeded with ``seed + 10_000 + i``.
"""
from __future__ import annotations

import functools
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, ClassVar

import torch
from tensordict import TensorDict, TensorDictBase
from torch import nn
from torchrl._utils import logger as torchrl_logger
from torchrl.data import Bounded, LazyTensorStorage, TensorDictReplayBuffer, Unbounded
from torchrl.envs import DoubleToFloat, EnvBase, ExplorationType, GymEnv, set_exploration_type, TransformedEnv
from torchrl.modules import MLP, ValueOperator
from torchrl.objectives import SoftUpdate
from torchrl.objectives.utils import ValueEstimators

from torchrl_depeff.algorithms.bremen import ACTIVATION_MODULES, make_trainer
from torchrl_depeff.algorithms.components import EnsembleFit, OfflineDataset, RealEnvEvaluation
from torchrl_depeff.algorithms.config import (
    apply_preset,
    apply_table_row,
    check_cells,
    check_choice,
    check_float,
    check_int,
    ConfigBase,
    EvalConfig,
    ModelConfig,
    Section,
)
from torchrl_depeff.algorithms.loop import DeploymentLoop
from torchrl_depeff.data.datasets import validate_offline_dataset
from torchrl_depeff.data.deployments import DeploymentReplayBuffers
from torchrl_depeff.data.scores import d4rl_normalized_score
from torchrl_depeff.envs.model_env import EnsembleModelEnv, UNCERTAINTY_KEYS
from torchrl_depeff.envs.penalties import SoftUncertaintyPenalty
from torchrl_depeff.envs.tasks import get_task
from torchrl_depeff.envs.vector import make_vector_env
from torchrl_depeff.modules.ensemble import DynamicsEnsemble
from torchrl_depeff.modules.mixture import make_gmm_actor
from torchrl_depeff.objectives.awac import AWACLoss

__all__ = [
    "AWACLearner",
    "AWACPretraining",
    "ConservativeFinetuning",
    "DATASETS",
    "MB2PO",
    "MB2POConfig",
    "MB2PO_PAPER_HYPERPARAMETERS",
    "OmegaMixing",
    "TABLE_COLUMNS",
    "TRAIN_KEYS",
    "make_native_env",
    "prepare_dataset",
]

#: entries kept for training, for real and model rows alike ("is_real" tags the origin)
TRAIN_KEYS: tuple = (
    "observation",
    "action",
    ("next", "observation"),
    ("next", "reward"),
    ("next", "terminated"),
    ("next", "done"),
    "is_real",
)

#: D4RL dataset names of MB2PO Table 1
DATASETS: tuple[str, ...] = ("random", "medium", "mixed", "medium-expert", "expert")

# ====================================================================
# MB2PO App. 7.3 (the only copy)
# --------------------------------------------------------------------

#: MB2PO App. 7.3 table as printed: AWAC temperature ``alpha``, real share ``omega``, rollout
#: length ``h`` and penalty ``lambda`` per "task-dataset".
MB2PO_PAPER_HYPERPARAMETERS: dict[str, dict[str, float | int]] = {
    "halfcheetah-random": {"alpha": 1.0, "omega": 0.8, "h": 5, "lambda": 1.0},
    "hopper-random": {"alpha": 1.0, "omega": 0.8, "h": 1, "lambda": 1.0},
    "walker2d-random": {"alpha": 1.0, "omega": 0.8, "h": 1, "lambda": 1.0},
    "halfcheetah-medium": {"alpha": 1.0, "omega": 0.8, "h": 5, "lambda": 1.0},
    "hopper-medium": {"alpha": 1.0, "omega": 0.8, "h": 1, "lambda": 1.0},
    "walker2d-medium": {"alpha": 1.0, "omega": 0.8, "h": 1, "lambda": 1.0},
    "halfcheetah-expert": {"alpha": 2.0, "omega": 0.8, "h": 1, "lambda": 1.0},
    "hopper-expert": {"alpha": 2.0, "omega": 0.8, "h": 1, "lambda": 1.0},
    "walker2d-expert": {"alpha": 2.0, "omega": 0.8, "h": 1, "lambda": 1.0},
    "halfcheetah-medium-expert": {"alpha": 2.0, "omega": 0.8, "h": 1, "lambda": 1.0},
    "hopper-medium-expert": {"alpha": 2.0, "omega": 0.8, "h": 1, "lambda": 1.0},
    "walker2d-medium-expert": {"alpha": 2.0, "omega": 0.8, "h": 1, "lambda": 1.0},
    "halfcheetah-mixed": {"alpha": 1.0, "omega": 0.01, "h": 5, "lambda": 1.0},
    "hopper-mixed": {"alpha": 1.0, "omega": 0.01, "h": 1, "lambda": 1.0},
    "walker2d-mixed": {"alpha": 1.0, "omega": 0.01, "h": 1, "lambda": 1.0},
}

#: where each App. 7.3 column goes in :class:`MB2POConfig`
TABLE_COLUMNS: dict[str, str] = {
    "alpha": "awac.awac_lambda",
    "omega": "finetune.omega",
    "h": "finetune.horizon",
    "lambda": "finetune.penalty_coef",
}

#: our presets over the paper's values: ``quick`` (minutes on one CPU thread), ``smoke`` (seconds)
MB2PO_PRESETS: dict[str, dict[str, Any]] = {
    "quick": {
        "awac.pretrain_steps": 1500, "finetune.iterations": 10, "finetune.model_samples_per_iteration": 2000,
        "finetune.awac_steps_per_iteration": 100, "finetune.retain_iterations": 5,
        "finetune.rollout_batch_size": 2000, "awac.batch_size": 256, "policy.num_cells": (64, 64),
        "awac.critic_num_cells": (64, 64), "awac.num_value_samples": 4, "model.num_cells": (64, 64),
        "model.max_epochs": 15, "evaluation.episodes": 1, "evaluation.every_pretrain_steps": 500,
        "evaluation.every_iterations": 5,
    },
    "smoke": {
        "awac.pretrain_steps": 4, "finetune.iterations": 2, "finetune.model_samples_per_iteration": 64,
        "finetune.awac_steps_per_iteration": 2, "finetune.retain_iterations": 2,
        "finetune.rollout_batch_size": 64, "awac.batch_size": 32, "policy.num_cells": (16,),
        "awac.critic_num_cells": (16,), "awac.num_value_samples": 2, "model.num_members": 3,
        "model.num_elites": 2, "model.num_cells": (16,), "model.max_epochs": 2, "evaluation.episodes": 1,
        "evaluation.max_steps": 10, "evaluation.every_pretrain_steps": 2, "evaluation.every_iterations": 1,
    },
}


# ====================================================================
# Config
# --------------------------------------------------------------------


@dataclass
class MixturePolicyConfig(Section):
    """The 5-head tanh Gaussian-mixture policy (App. 7.1: 4 x 256 ReLU)."""

    num_cells: tuple[int, ...] = (256, 256, 256, 256)
    num_components: int = 5

    def _check(self, prefix: str) -> None:
        self.num_cells = check_cells(self.num_cells, f"{prefix}.num_cells")
        check_int(self.num_components, f"{prefix}.num_components")


@dataclass
class AWACConfig(Section):
    """AWAC (App. 7.1, the AWAC paper's values).

    Args:
        awac_lambda (float): temperature (MB2PO's ``alpha``; App. 7.3: 1 or 2).
        batch_size (int): AWAC batch (1024).
        actor_lr, critic_lr (float): 3e-4.
        actor_weight_decay (float): 1e-4.
        tau (float): soft target update (5e-3).
        gamma (float): discount (0.99).
        num_qvalue_nets (int): clipped double-Q critics (2).
        target (str): ``"min"`` (clipped double-Q) or ``"quantile"``.
        target_quantile (float): quantile level of ``target="quantile"``.
        num_value_samples (int): policy samples for ``V(s)`` (App. 7.1: 10).
        max_weight (float): clamp of the exponential weight (Sec. 4.2: 20).
        critic_num_cells (tuple of int): critic hidden sizes (App. 7.1: 4 x 256).
        pretrain_steps (int): AWAC steps on the dataset alone (Sec. 5: 500000).
    """

    awac_lambda: float = 1.0
    batch_size: int = 1024
    actor_lr: float = 3e-4
    critic_lr: float = 3e-4
    actor_weight_decay: float = 1e-4
    tau: float = 5e-3
    gamma: float = 0.99
    num_qvalue_nets: int = 2
    target: str = "min"
    target_quantile: float = 0.5
    num_value_samples: int = 10
    max_weight: float = 20.0
    critic_num_cells: tuple[int, ...] = (256, 256, 256, 256)
    pretrain_steps: int = 500_000

    def _check(self, prefix: str) -> None:
        check_float(self.awac_lambda, f"{prefix}.awac_lambda", gt=0)
        for name in ("batch_size", "num_qvalue_nets", "num_value_samples"):
            check_int(getattr(self, name), f"{prefix}.{name}")
        check_int(self.pretrain_steps, f"{prefix}.pretrain_steps", minimum=0)
        for name in ("actor_lr", "critic_lr", "max_weight"):
            check_float(getattr(self, name), f"{prefix}.{name}", gt=0)
        check_float(self.actor_weight_decay, f"{prefix}.actor_weight_decay", ge=0)
        check_float(self.tau, f"{prefix}.tau", gt=0, le=1)
        check_float(self.gamma, f"{prefix}.gamma", ge=0, le=1)
        check_choice(self.target, f"{prefix}.target", ("min", "quantile"))
        check_float(self.target_quantile, f"{prefix}.target_quantile", ge=0, le=1)
        self.critic_num_cells = check_cells(self.critic_num_cells, f"{prefix}.critic_num_cells")


@dataclass
class FinetuneConfig(Section):
    """MB2PO's fine-tuning iterations (Alg. 1, App. 7.3).

    Args:
        omega (float): real share per AWAC batch, in ``[0, 1]``.
        horizon (int): rollout length ``h`` (App. 7.3: 1 or 5).
        penalty_coef (float): ``lambda >= 0`` (App. 7.3: 1).
        penalty_uncertainty (str): ``"std_norm"`` or ``"cov_frobenius"`` (see the module doc).
        iterations (int): fine-tuning iterations (500).
        model_samples_per_iteration (int): imagined transitions per iteration (1e6):
            ``ceil(samples / h)`` rollouts of ``h`` steps.
        rollout_batch_size (int): parallel rollouts per model-env call (memory bound).
        retain_iterations (int): iterations kept in the model buffer (100).
        awac_steps_per_iteration (int): AWAC steps per iteration (1000).
    """

    omega: float = 0.8
    horizon: int = 1
    penalty_coef: float = 1.0
    penalty_uncertainty: str = "std_norm"
    iterations: int = 500
    model_samples_per_iteration: int = 1_000_000
    rollout_batch_size: int = 50_000
    retain_iterations: int = 100
    awac_steps_per_iteration: int = 1000

    def _check(self, prefix: str) -> None:
        check_float(self.omega, f"{prefix}.omega", ge=0, le=1)
        check_int(self.horizon, f"{prefix}.horizon")
        check_float(self.penalty_coef, f"{prefix}.penalty_coef", ge=0)
        check_choice(self.penalty_uncertainty, f"{prefix}.penalty_uncertainty", ("std_norm", "cov_frobenius"))
        for name in ("model_samples_per_iteration", "rollout_batch_size", "retain_iterations"):
            check_int(getattr(self, name), f"{prefix}.{name}")
        for name in ("iterations", "awac_steps_per_iteration"):
            check_int(getattr(self, name), f"{prefix}.{name}", minimum=0)

    @property
    def rollouts_per_iteration(self) -> int:
        """``ceil(model_samples_per_iteration / horizon)`` branched rollouts per iteration."""
        return math.ceil(self.model_samples_per_iteration / self.horizon)


@dataclass
class MB2POEvalConfig(EvalConfig):
    """Evaluation of MB2PO (10 episodes of 1000 steps) and its cadence inside the long phases.

    Args:
        every_pretrain_steps (int): AWAC pre-training steps between evaluations (and checkpoints).
        every_iterations (int): fine-tuning iterations between evaluations.
    """

    episodes: int = 10
    max_steps: int | None = 1000
    every_pretrain_steps: int = 50_000
    every_iterations: int = 25
    _every_needs_episodes: ClassVar[bool] = False  # episodes = 0 turns evaluation off; the cadences stay valid

    def _check(self, prefix: str) -> None:
        super()._check(prefix)
        if self.batched:
            raise ValueError(f"{prefix}.batched=True is not supported by MB2PO: its evaluation env "
                             "(make_native_env) scores the env's own reward for the D4RL score; use False")
        check_int(self.every_pretrain_steps, f"{prefix}.every_pretrain_steps")
        check_int(self.every_iterations, f"{prefix}.every_iterations")


def _mb2po_model() -> ModelConfig:
    # MB2PO App. 7.2: 5 probabilistic models, 4 x 200 swish, reward head, Adam 1e-3, wd 1e-4, batch 256
    return ModelConfig(num_members=5, num_cells=(200, 200, 200, 200), activation="silu", probabilistic=True,
                       predict_reward=True, num_elites=5, lr=1e-3, weight_decay=1e-4, batch_size=256, max_epochs=100)


@dataclass
class MB2POConfig(ConfigBase):
    """Hyper-parameters of MB2PO; defaults are the paper's (App. 7.1-7.3), halfcheetah-mixed row.

    Args:
        task (str): ``"halfcheetah"``, ``"hopper"`` or ``"walker2d"``.
        dataset (str): D4RL dataset name (:data:`DATASETS`); selects the App. 7.3 row in :meth:`paper`.
        name (str): run label. Defaults to ``"mb2po"``.
        policy (MixturePolicyConfig): the GMM actor.
        awac (AWACConfig): AWAC (pre-training and fine-tuning).
        model (ModelConfig): the dynamics ensemble (App. 7.2).
        finetune (FinetuneConfig): the MB2PO iterations.
        evaluation (MB2POEvalConfig): real-env evaluation.
        seed (int): seed of the networks, the buffers' sampling and the model env.
        device (str): device of networks and buffers.

    Examples:
        >>> from torchrl_depeff.algorithms.mb2po import MB2POConfig
        >>> cfg = MB2POConfig.paper("hopper", "medium")
        >>> cfg.awac.awac_lambda, cfg.finetune.omega, cfg.finetune.horizon
        (1.0, 0.8, 1)
        >>> cfg.override({"finetune.omega": 1.5})
        Traceback (most recent call last):
        ...
        ValueError: finetune.omega must be a finite number >= 0 and <= 1, got 1.5
    """

    task: str = "halfcheetah"
    dataset: str = "mixed"
    name: str = "mb2po"
    policy: MixturePolicyConfig = field(default_factory=MixturePolicyConfig)
    awac: AWACConfig = field(default_factory=AWACConfig)
    model: ModelConfig = field(default_factory=_mb2po_model)
    finetune: FinetuneConfig = field(default_factory=lambda: FinetuneConfig(omega=0.01, horizon=5))
    evaluation: MB2POEvalConfig = field(default_factory=MB2POEvalConfig)
    seed: int = 0
    device: str = "cpu"

    _LEGACY_KEYS = {
        "awac_lambda": "awac.awac_lambda", "batch_size": "awac.batch_size", "actor_lr": "awac.actor_lr",
        "critic_lr": "awac.critic_lr", "actor_weight_decay": "awac.actor_weight_decay", "tau": "awac.tau",
        "gamma": "awac.gamma", "num_qvalue_nets": "awac.num_qvalue_nets", "target": "awac.target",
        "target_quantile": "awac.target_quantile", "num_value_samples": "awac.num_value_samples",
        "max_weight": "awac.max_weight", "num_cells": ("policy.num_cells", "awac.critic_num_cells"),
        "num_components": "policy.num_components", "pretrain_steps": "awac.pretrain_steps",
        "num_members": "model.num_members", "num_elites": "model.num_elites", "model_cells": "model.num_cells",
        "model_activation": "model.activation", "model_lr": "model.lr", "model_weight_decay": "model.weight_decay",
        "model_batch_size": "model.batch_size", "model_max_epochs": "model.max_epochs",
        "model_holdout_ratio": "model.holdout_ratio", "omega": "finetune.omega", "horizon": "finetune.horizon",
        "penalty_coef": "finetune.penalty_coef", "penalty_uncertainty": "finetune.penalty_uncertainty",
        "num_iterations": "finetune.iterations",
        "model_samples_per_iteration": "finetune.model_samples_per_iteration",
        "rollout_batch_size": "finetune.rollout_batch_size", "retain_iterations": "finetune.retain_iterations",
        "awac_steps_per_iteration": "finetune.awac_steps_per_iteration",
    }

    def _check(self, prefix: str) -> None:
        check_choice(self.task, "task", ("halfcheetah", "hopper", "walker2d"))
        check_choice(self.dataset, "dataset", DATASETS)
        check_int(self.seed, "seed", minimum=0)
        if not (self.model.probabilistic and self.model.predict_reward):
            raise ValueError(
                "model.probabilistic and model.predict_reward must be True: the conservative MDP uses the "
                "models' reward and their max_i ||Sigma_i||_F (MB2PO App. 7.2, Alg. 1)"
            )

    @classmethod
    def paper(cls, task: str, dataset: str = "mixed", **overrides: Any) -> MB2POConfig:
        """App. 7.1-7.2 values with the App. 7.3 row of ``task-dataset``, then ``overrides``.

        Examples:
            >>> from torchrl_depeff.algorithms.mb2po import MB2POConfig
            >>> MB2POConfig.paper("halfcheetah", "expert").awac.awac_lambda
            2.0
        """
        key = f"{task}-{dataset}"
        if key not in MB2PO_PAPER_HYPERPARAMETERS:
            raise ValueError(f"no MB2PO hyper-parameters for {key!r}; known: {sorted(MB2PO_PAPER_HYPERPARAMETERS)}")
        cfg = apply_table_row(cls(task=task, dataset=dataset), MB2PO_PAPER_HYPERPARAMETERS[key], TABLE_COLUMNS)
        return cfg.override(overrides) if overrides else cfg

    @classmethod
    def preset(cls, task: str, dataset: str = "mixed", preset: str = "paper", **overrides: Any) -> MB2POConfig:
        """``"paper"`` (:meth:`paper`) or one of ``quick``/``smoke`` over it.

        Examples:
            >>> from torchrl_depeff.algorithms.mb2po import MB2POConfig
            >>> MB2POConfig.preset("hopper", "medium", "quick").awac.pretrain_steps
            1500
        """
        return apply_preset(cls.paper(task, dataset), preset, MB2PO_PRESETS, overrides)

    @classmethod
    def tiny(cls, **overrides: Any) -> MB2POConfig:
        """The ``smoke`` preset on halfcheetah-mixed (seconds)."""
        return cls.preset("halfcheetah", "mixed", "smoke", **overrides)

    @property
    def num_real_per_batch(self) -> int:
        """Real rows per AWAC batch, ``round(omega * batch_size)``."""
        return int(round(self.finetune.omega * self.awac.batch_size))


# ====================================================================
# Data
# --------------------------------------------------------------------


def prepare_dataset(dataset: TensorDictBase) -> TensorDict:
    """Validated ``[N]`` float32 copy holding :data:`TRAIN_KEYS` (``is_real=True``).

    Examples:
        >>> from tensordict import TensorDict
        >>> from torchrl_depeff.algorithms.mb2po import prepare_dataset
        >>> n = 4
        >>> td = TensorDict({"observation": torch.zeros(n, 3, dtype=torch.float64), "action": torch.zeros(n, 2),
        ...                  "next": {"observation": torch.zeros(n, 3), "reward": torch.zeros(n, 1),
        ...                           "done": torch.zeros(n, 1, dtype=torch.bool)}}, [n])
        >>> out = prepare_dataset(td)
        >>> out["observation"].dtype, out["next", "reward"].shape, out["next", "terminated"].shape
        (torch.float32, torch.Size([4, 1]), torch.Size([4, 1]))
    """
    if not isinstance(dataset, TensorDictBase):
        raise TypeError(f"dataset must be a TensorDict, got {type(dataset).__name__}")
    validate_offline_dataset(dataset)  # keys, [N] batch, shapes, NaN/inf (names the entry)
    n = dataset.shape[0]
    terminated = dataset.get(("next", "terminated"), None)
    if terminated is None:
        # choice: without a termination flag every "done" is treated as a termination
        terminated = dataset.get(("next", "done"))
    return TensorDict(
        {
            "observation": dataset.get("observation").float(),
            "action": dataset.get("action").float(),
            "next": {
                "observation": dataset.get(("next", "observation")).float(),
                "reward": dataset.get(("next", "reward")).float().reshape(n, 1),
                "terminated": terminated.bool().reshape(n, 1),
                "done": dataset.get(("next", "done")).bool().reshape(n, 1),
            },
            "is_real": torch.ones(n, dtype=torch.bool),
        },
        batch_size=[n],
    )


def make_native_env(task: str, seed: int | None = None) -> TransformedEnv:
    """The real gymnasium env of ``task`` with its *native* reward (the D4RL scores' reward).

    :func:`torchrl_depeff.envs.make_env` replaces the reward by BREMEN's Table 3 reward; D4RL's
    reference returns are in gym's own reward, so MB2PO's datasets and evaluation use ``GymEnv``.

    Examples:
        >>> from torchrl_depeff.algorithms.mb2po import make_native_env
        >>> make_native_env("hopper").action_spec.shape
        torch.Size([3])
    """
    spec = get_task(task)
    env = TransformedEnv(GymEnv(spec.gym_id, **spec.gym_kwargs), DoubleToFloat())
    if seed is not None:
        env.set_seed(seed)
    return env


class OmegaMixing:
    """MB2PO eq. (11) data mixing: ``round(omega * B)`` dataset rows, then the rest model rows.

    Both parts are drawn uniformly (with replacement) by their replay buffer's sampler.

    Args:
        omega (float): real share in ``[0, 1]``.
        batch_size (int): ``B``.
    """

    def __init__(self, omega: float, batch_size: int) -> None:
        self.omega = float(omega)
        self.num_real = int(round(omega * batch_size))
        self.num_model = int(batch_size) - self.num_real

    def sample(self, real: TensorDictReplayBuffer, model: TensorDictReplayBuffer) -> TensorDict:
        """One mixed batch (rows keep ``"is_real"``)."""
        parts = []
        if self.num_real > 0:
            parts.append(real.sample(self.num_real).select(*TRAIN_KEYS))
        if self.num_model > 0:
            if len(model) == 0:
                raise RuntimeError(
                    f"the model buffer is empty but omega={self.omega} asks for {self.num_model} model rows: "
                    "collect model rollouts first"
                )
            parts.append(model.sample(self.num_model).select(*TRAIN_KEYS))
        return torch.cat(parts, 0) if len(parts) > 1 else parts[0]


# ====================================================================
# AWAC learner, pre-training and conservative fine-tuning
# --------------------------------------------------------------------


class AWACLearner:
    """The AWAC networks, optimisers and target updater shared by pre-training and fine-tuning.

    Actor: the loop's GMM actor; critics: ``num_qvalue_nets`` copies of a ReLU
    :class:`~torchrl.modules.ValueOperator` in :class:`~torchrl_depeff.objectives.AWACLoss`
    (clipped double-Q, weight clamp); Adam for actor (weight decay) and critics;
    :class:`~torchrl.objectives.SoftUpdate`. ``curve`` records the evaluations made during the
    long phases (``phase``, ``grad_steps``, ``iteration``, ``return``, ``score``).
    """

    def __init__(self, actor: nn.Module, config: MB2POConfig, observation_dim: int, action_dim: int,
                 device: torch.device) -> None:
        a = config.awac
        qnet = ValueOperator(
            MLP(in_features=observation_dim + action_dim, out_features=1, num_cells=list(a.critic_num_cells),
                activation_class=nn.ReLU),
            in_keys=["observation", "action"],
        ).to(device)
        self.loss_module = AWACLoss(
            actor, qnet, num_qvalue_nets=a.num_qvalue_nets, awac_lambda=a.awac_lambda, max_weight=a.max_weight,
            target=a.target, target_quantile=a.target_quantile, num_value_samples=a.num_value_samples,
        )
        self.loss_module.make_value_estimator(ValueEstimators.TD0, gamma=a.gamma)
        self.target_updater = SoftUpdate(self.loss_module, tau=a.tau)
        self.actor_optimizer = torch.optim.Adam(
            list(self.loss_module.actor_network_params.values(True, True)), lr=a.actor_lr,
            weight_decay=a.actor_weight_decay,
        )
        self.critic_optimizer = torch.optim.Adam(
            list(self.loss_module.qvalue_network_params.values(True, True)), lr=a.critic_lr
        )
        self.pretrain_steps_done = 0
        self.finetune_steps_done = 0
        self.curve: list[dict[str, float]] = []

    def step(self, batch: TensorDictBase) -> TensorDictBase:
        """One actor + critic Adam step and a soft target update (MB2PO eq. 9 and eq. 1)."""
        out = self.loss_module(batch)
        self.actor_optimizer.zero_grad(set_to_none=True)
        self.critic_optimizer.zero_grad(set_to_none=True)
        # the actor loss has no gradient path to the critics and vice versa (AWACLoss)
        (out["loss_actor"] + out["loss_qvalue"]).backward()
        self.actor_optimizer.step()
        self.critic_optimizer.step()
        self.target_updater.step()
        return out

    def record(self, loop: Any, phase: str, iteration: int) -> dict[str, float]:
        """Evaluate with the loop's evaluator, log at the AWAC gradient step, append to :attr:`curve`."""
        metrics = loop.evaluator.run(loop)
        steps = self.pretrain_steps_done + self.finetune_steps_done
        self.curve.append({"phase": phase, "grad_steps": steps, "iteration": iteration,
                           "return": metrics.get("eval/return_mean", math.nan),
                           "score": metrics.get("eval/normalized_score", math.nan)})
        loop.log({f"{phase}/{k.split('/', 1)[1]}": v for k, v in metrics.items()}, steps)
        torchrl_logger.info(f"[{phase}] step {steps}: return {self.curve[-1]['return']:.1f}, "
                            f"score {self.curve[-1]['score']:.1f}")
        return metrics

    def state_dict(self) -> dict[str, Any]:
        return {
            "loss_module": self.loss_module.state_dict(),
            "actor_optimizer": self.actor_optimizer.state_dict(),
            "critic_optimizer": self.critic_optimizer.state_dict(),
            "pretrain_steps_done": self.pretrain_steps_done,
            "finetune_steps_done": self.finetune_steps_done,
            "curve": [dict(c) for c in self.curve],
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.loss_module.load_state_dict(state["loss_module"])
        self.actor_optimizer.load_state_dict(state["actor_optimizer"])
        self.critic_optimizer.load_state_dict(state["critic_optimizer"])
        self.pretrain_steps_done = int(state["pretrain_steps_done"])
        self.finetune_steps_done = int(state["finetune_steps_done"])
        self.curve = [dict(c) for c in state["curve"]]


def _real_buffer(loop: Any) -> TensorDictReplayBuffer:
    data = loop.buffers.as_tensordict(0).select(*TRAIN_KEYS).to(loop.device)
    rb = TensorDictReplayBuffer(storage=LazyTensorStorage(data.shape[0], device=loop.device))
    rb.extend(data)
    return rb


class AWACPretraining:
    """Pretrain phase of MB2PO Alg. 1 (first line): AWAC on the offline dataset alone.

    Resumable: the loop checkpoints (and the learner evaluates) every
    ``evaluation.every_pretrain_steps`` steps.
    """

    def __init__(self, learner: AWACLearner, *, steps: int, batch_size: int, every: int) -> None:
        self.learner = learner
        self.steps = int(steps)
        self.batch_size = int(batch_size)
        self.every = int(every)
        self.real_buffer: TensorDictReplayBuffer | None = None

    def run(self, loop: Any) -> dict[str, float]:
        self.real_buffer = _real_buffer(loop)
        learner = self.learner
        bar = None
        if loop.progress:
            import tqdm

            bar = tqdm.tqdm(total=self.steps, initial=learner.pretrain_steps_done, desc="AWAC pre-training",
                            unit="step")
        out = None
        try:
            while learner.pretrain_steps_done < self.steps:
                out = learner.step(self.real_buffer.sample(self.batch_size).select(*TRAIN_KEYS))
                learner.pretrain_steps_done += 1
                if bar is not None:
                    bar.update(1)
                if learner.pretrain_steps_done % self.every == 0 or learner.pretrain_steps_done == self.steps:
                    loop.log({f"pretrain/{k}": v.item() for k, v in out.items()}, learner.pretrain_steps_done)
                    learner.record(loop, "pretrain", 0)
                    loop.checkpoint()
        finally:
            if bar is not None:
                bar.close()
        last = [c for c in learner.curve if c["phase"] == "pretrain"]
        metrics = {"pretrain/steps": float(learner.pretrain_steps_done)}
        if last:
            metrics.update({"pretrain/eval_return": last[-1]["return"], "pretrain/eval_score": last[-1]["score"]})
        return metrics

    def state_dict(self) -> dict[str, Any]:
        return self.learner.state_dict()

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.learner.load_state_dict(state)


class ConservativeFinetuning:
    """Optimize phase of MB2PO Alg. 1: model rollouts in the conservative MDP + mixed AWAC steps.

    Args:
        learner (AWACLearner): the AWAC networks (shared with pre-training).
        ensemble (DynamicsEnsemble): the fitted dynamics (probabilistic, reward head).

    Keyword Args:
        config (MB2POConfig): settings (``finetune``, ``awac.batch_size``, ``evaluation``).
        termination_fn (callable, optional): the task's ``(obs, action, next_obs) -> done``.
        action_low, action_high (float): action bounds of the model env.
        mixing (OmegaMixing): real/model share of each batch.
    """

    def __init__(self, learner: AWACLearner, ensemble: DynamicsEnsemble, *, config: MB2POConfig,
                 termination_fn: Callable | None, action_low: float, action_high: float,
                 mixing: OmegaMixing, device: torch.device) -> None:
        self.learner = learner
        self.ensemble = ensemble
        self.config = config
        self.termination_fn = termination_fn
        self.action_low = float(action_low)
        self.action_high = float(action_high)
        self.mixing = mixing
        self.device = device
        f = config.finetune
        self.rollouts_per_call = min(f.rollout_batch_size, f.rollouts_per_iteration)
        self.calls_per_iteration = math.ceil(f.rollouts_per_iteration / self.rollouts_per_call)
        self.rows_per_iteration = self.calls_per_iteration * self.rollouts_per_call * f.horizon
        self.model_buffer = TensorDictReplayBuffer(
            storage=LazyTensorStorage(f.retain_iterations * self.rows_per_iteration, device=device)
        )
        self.real_buffer: TensorDictReplayBuffer | None = None
        self.model_env: EnsembleModelEnv | None = None
        self.generator = torch.Generator(device=device).manual_seed(config.seed + 1)
        self.iteration = 0
        self.include_model_buffer = True

    def prepare(self, loop: Any) -> None:
        """Build the real-data buffer and the conservative MDP (needs the dataset and a fitted model)."""
        if loop.buffers.num_deployments == 0:
            raise RuntimeError("the dataset is not stored yet: run the collect phase first")
        if not loop.models["dynamics"].fitted:
            raise RuntimeError("the dynamics ensemble is not fitted: run the fit phase (fit_model) first")
        if self.real_buffer is None:
            self.real_buffer = _real_buffer(loop)
        if self.model_env is None:
            self.make_model_env(loop)

    def make_model_env(self, loop: Any) -> EnsembleModelEnv:
        """The conservative MDP of MB2PO Alg. 1 / eq. (3) over the ensemble's elites."""
        f = self.config.finetune
        o, a = self.ensemble.observation_dim, self.ensemble.action_dim
        base = EnsembleModelEnv(
            self.ensemble,
            observation_spec=Unbounded(o, device=self.device),
            action_spec=Bounded(self.action_low, self.action_high, (a,), device=self.device),
            reward_fn=None,  # the ensemble's reward head (MB2PO App. 7.2)
            termination_fn=self.termination_fn,
            start_states=loop.buffers.as_tensordict(0).select("observation").to(self.device),  # s_1 ~ D_beta
            batch_size=self.rollouts_per_call,
            member_selection="per_sample",  # Alg. 1: a uniformly drawn model per row and step
            max_episode_steps=f.horizon,
            uncertainty=(f.penalty_uncertainty,),
            elites_only=True,
            # MB2PO Alg. 1 / eq. (3): r~ = r - lambda * max_i ||Sigma_i||_F (see finetune.penalty_uncertainty),
            # fused into the step (the env keeps its fast rollout loop)
            penalty=SoftUncertaintyPenalty(f.penalty_coef, UNCERTAINTY_KEYS[f.penalty_uncertainty]),
            device=self.device,
            generator=self.generator,
        )
        self.model_env = base
        return self.model_env

    def collect_model_rollouts(self, loop: Any) -> TensorDict:
        """``h``-step branched rollouts of the current actor in the conservative MDP (Alg. 1).

        Returns the ``[rows_per_iteration]`` transitions (``"is_real"`` False), already added to
        :attr:`model_buffer`.
        """
        self.prepare(loop)
        h = self.config.finetune.horizon
        parts = []
        with torch.no_grad(), set_exploration_type(ExplorationType.RANDOM):
            for _ in range(self.calls_per_iteration):  # memory chunks, not samples
                parts.append(self.model_env.rollout(h, loop.actor, break_when_any_done=False).reshape(-1))
        data = torch.cat(parts, 0) if len(parts) > 1 else parts[0]
        data.set("is_real", torch.zeros(data.shape[0], dtype=torch.bool, device=data.device))
        rows = data.select(*TRAIN_KEYS, ("next", "penalty"))
        self.model_buffer.extend(rows.exclude(("next", "penalty")))
        return rows

    def sample_mixed_batch(self) -> TensorDict:
        """An AWAC batch of :class:`OmegaMixing` (MB2PO Alg. 1, eq. 11)."""
        if self.real_buffer is None:
            raise RuntimeError("no real-data buffer yet: call prepare(loop) (or run the optimize phase) first")
        return self.mixing.sample(self.real_buffer, self.model_buffer)

    def iterate(self, loop: Any) -> dict[str, float]:
        """One MB2PO iteration: model rollouts, then ``awac_steps_per_iteration`` mixed AWAC steps."""
        rows = self.collect_model_rollouts(loop)
        metrics = {
            "finetune/model_reward": rows.get(("next", "reward")).mean().item(),
            "finetune/penalty": rows.get(("next", "penalty")).mean().item(),
            "finetune/terminated_fraction": rows.get(("next", "terminated")).float().mean().item(),
            "finetune/model_buffer_size": float(len(self.model_buffer)),
        }
        out = None
        for _ in range(self.config.finetune.awac_steps_per_iteration):
            out = self.learner.step(self.sample_mixed_batch())
            self.learner.finetune_steps_done += 1
        if out is not None:
            metrics.update({f"finetune/{k}": v.item() for k, v in out.items()})
        self.iteration += 1
        loop.log(metrics, self.iteration)
        return metrics

    def run(self, loop: Any) -> dict[str, float]:
        self.prepare(loop)
        total = self.config.finetune.iterations
        every = self.config.evaluation.every_iterations
        bar = None
        if loop.progress:
            import tqdm

            bar = tqdm.tqdm(total=total, initial=self.iteration, desc="MB2PO fine-tuning", unit="it")
        metrics: dict[str, float] = {}
        try:
            while self.iteration < total:
                metrics = self.iterate(loop)
                if bar is not None:
                    bar.update(1)
                if self.iteration % every == 0 and self.iteration < total:
                    self.learner.record(loop, "finetune", self.iteration)
                loop.checkpoint()
        finally:
            if bar is not None:
                bar.close()
        return metrics

    def state_dict(self) -> dict[str, Any]:
        state: dict[str, Any] = {"iteration": self.iteration, "generator": self.generator.get_state()}
        if self.include_model_buffer and len(self.model_buffer) > 0:
            state["model_buffer"] = self.model_buffer.state_dict()
        return state

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.iteration = int(state["iteration"])
        self.generator.set_state(state["generator"])
        self.model_env = None
        if "model_buffer" in state:
            self.model_buffer.load_state_dict(state["model_buffer"])


# ====================================================================
# The loop
# --------------------------------------------------------------------


class MB2PO(DeploymentLoop):
    r"""MB2PO (Alg. 1) as a :class:`~torchrl_depeff.algorithms.loop.DeploymentLoop` with one offline deployment.

    Phases: ``collect`` (store the dataset), ``fit`` (dynamics ensemble), ``pretrain`` (AWAC),
    ``optimize`` (MB2PO iterations), ``evaluate`` (real env, D4RL score). With ``run_dir`` the
    loop checkpoints after every phase, every ``evaluation.every_pretrain_steps`` AWAC steps and
    every fine-tuning iteration, and resumes from ``run_dir/checkpoint.pt``.

    Args:
        config (MB2POConfig): hyper-parameters.

    Keyword Args:
        dataset (TensorDictBase): offline transitions ``[N]`` with ``"observation"``,
            ``"action"``, ``("next", "observation")``, ``("next", "reward")``, ``("next", "done")``
            (and optionally ``("next", "terminated")``), validated (missing keys, NaN/inf).
        run_dir (str | Path, optional): output directory (data, checkpoint, metrics).
        data_root (str | Path, optional): data directory when no ``run_dir`` is given.
        eval_env (EnvBase, optional): evaluation env (its ``"reward"`` is scored). Defaults to
            ``make_vector_env(config.task, 1)`` scored on ``"env_reward"``: the rows and reward of
            :func:`make_native_env` bit for bit (gym's own reward, the D4RL scores' one), whose
            deterministic episodes run without tensordicts.
        termination_fn (callable, optional): ``(obs, action, next_obs) -> bool [*B, 1]``.
            Defaults to the task's.
        action_low, action_high (float): action bounds of the model env. Default to ``-1``/``1``.
        ensemble (DynamicsEnsemble, optional): a prebuilt ensemble (probabilistic, reward head).
        logger (torchrl Logger, optional): receives scalars (``pretrain/*``, ``model/*``, ``finetune/*``).
        progress (bool): tqdm bars. Defaults to ``False``.
        checkpoint_fn (callable, optional): called at every checkpoint.
        dataset_source (str): label of the dataset stored with it.
        resume (bool): load ``run_dir/checkpoint.pt`` if present. Defaults to ``True``.

    Examples:
        >>> import tempfile
        >>> from tensordict import TensorDict
        >>> from torchrl_depeff.algorithms.mb2po import MB2PO, MB2POConfig
        >>> n = 64
        >>> obs = torch.randn(n, 17)
        >>> data = TensorDict({"observation": obs, "action": torch.rand(n, 6) * 2 - 1,
        ...     "next": {"observation": obs + 0.1, "reward": torch.randn(n, 1),
        ...              "done": torch.zeros(n, 1, dtype=torch.bool)}}, [n])
        >>> algo = MB2PO(MB2POConfig.tiny(), dataset=data, run_dir=tempfile.mkdtemp())
        >>> metrics = algo.deployment_step()
        >>> len(algo.improver.model_buffer)  # 2 iterations of ceil(64 / h) rollouts of h = 5 steps
        130
    """

    def __init__(
        self,
        config: MB2POConfig,
        *,
        dataset: TensorDictBase,
        run_dir: str | Path | None = None,
        data_root: str | Path | None = None,
        eval_env: EnvBase | None = None,
        termination_fn: Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor] | None = None,
        action_low: float = -1.0,
        action_high: float = 1.0,
        ensemble: DynamicsEnsemble | None = None,
        logger: Any | None = None,
        progress: bool = False,
        checkpoint_fn: Callable[[DeploymentLoop], None] | None = None,
        dataset_source: str = "offline",
        resume: bool = True,
    ) -> None:
        if isinstance(config, TensorDictBase):
            raise TypeError(
                "MB2PO(dataset, config) was torchrl_depeff 0.1's signature: use MB2PO(config, dataset=..., run_dir=...)"
            )
        if not isinstance(config, MB2POConfig):
            raise TypeError(f"config must be an MB2POConfig, got {type(config).__name__}")
        if not action_low < action_high:
            raise ValueError(f"action_low must be < action_high, got {action_low}, {action_high}")
        if (run_dir is None) == (data_root is None):
            raise ValueError("give exactly one of run_dir (outputs, checkpoints, resume) or data_root")
        device = torch.device(config.device)
        data = prepare_dataset(dataset)
        o, a = data.get("observation").shape[-1], data.get("action").shape[-1]
        task = get_task(config.task)
        task_data = (o, a) == (task.observation_dim, task.action_dim)
        if not task_data and eval_env is None and config.evaluation.episodes > 0:
            raise ValueError(
                f"the dataset's observation/action sizes ({o}, {a}) are not task {config.task!r}'s "
                f"({task.observation_dim}, {task.action_dim}): pass eval_env= (an env of this data) or set "
                "evaluation.episodes=0"
            )
        torch.manual_seed(config.seed)
        actor = make_gmm_actor(o, a, num_components=config.policy.num_components,
                               num_cells=config.policy.num_cells).to(device)
        learner = AWACLearner(actor, config, o, a, device)
        if ensemble is None:
            m = config.model
            ensemble = DynamicsEnsemble(
                o, a, num_members=m.num_members, num_cells=m.num_cells, activation=ACTIVATION_MODULES[m.activation],
                probabilistic=True, predict_reward=True, num_elites=m.num_elites,
            )
        if not isinstance(ensemble, DynamicsEnsemble):
            raise TypeError(f"ensemble must be a DynamicsEnsemble, got {type(ensemble).__name__}")
        if not ensemble.predict_reward:
            raise ValueError(
                "MB2PO needs an ensemble with a reward head (predict_reward=True): the conservative "
                "MDP uses the model's reward (MB2PO App. 7.2)"
            )
        if not ensemble.probabilistic:
            raise ValueError("MB2PO needs a probabilistic ensemble (probabilistic=True) for the max_i ||Sigma_i||_F penalty")
        if ensemble.observation_dim != o or ensemble.action_dim != a:
            raise ValueError(
                f"ensemble dims (observation {ensemble.observation_dim}, action {ensemble.action_dim}) "
                f"do not match the dataset ({o}, {a})"
            )
        ensemble = ensemble.to(device)
        trainer = make_trainer(ensemble, config.model, seed=config.seed, logger=logger, progress=progress)
        buffers = DeploymentReplayBuffers(Path(run_dir) / "deployments" if run_dir is not None else data_root)
        ev = config.evaluation
        evaluator = RealEnvEvaluation(
            # default: the rows of make_native_env (gym's own reward as float32, its flags), bit
            # for bit, on a one-copy native env whose deterministic episodes skip tensordicts
            (lambda: eval_env) if eval_env is not None else functools.partial(make_vector_env, config.task, 1),
            episodes=ev.episodes, max_steps=ev.max_steps or task.max_episode_steps, seed=config.seed,
            reward_key="reward" if eval_env is not None else "env_reward",
            score_fn=(lambda r: float(d4rl_normalized_score(config.task, r))) if task_data else None,
        )
        improver = ConservativeFinetuning(
            learner, ensemble, config=config,
            termination_fn=termination_fn if termination_fn is not None or not task_data else task.termination_fn,
            action_low=action_low, action_high=action_high,
            mixing=OmegaMixing(config.finetune.omega, config.awac.batch_size), device=device,
        )
        super().__init__(
            config, actor=actor, buffers=buffers, source=OfflineDataset(data, source=dataset_source),
            models={"dynamics": EnsembleFit(ensemble, trainer, per_member=False)},
            initializer=AWACPretraining(learner, steps=config.awac.pretrain_steps, batch_size=config.awac.batch_size,
                                        every=ev.every_pretrain_steps),
            improver=improver, evaluator=evaluator, num_deployments=1, run_dir=run_dir,
            checkpoint_fn=checkpoint_fn, logger=logger, progress=progress, device=device,
        )
        self.learner = learner
        if resume:
            self.resume()

    # ------------------------------------------------------------------ shortcuts
    @property
    def ensemble(self) -> DynamicsEnsemble:
        return self.models["dynamics"].ensemble

    @property
    def loss_module(self) -> AWACLoss:
        return self.learner.loss_module

    @property
    def model_buffer(self) -> TensorDictReplayBuffer:
        return self.improver.model_buffer

    @property
    def curve(self) -> list[dict[str, float]]:
        """Evaluations during pre-training and fine-tuning (phase, grad_steps, iteration, return, score)."""
        return self.learner.curve

    def summary(self) -> dict[str, Any]:
        """AWAC-only and final scores of a finished run (MB2PO Table 1's two columns)."""
        pre = [c for c in self.curve if c["phase"] == "pretrain"]
        final = self.history[-1] if self.history else {}
        return {
            "task": self.config.task, "dataset": self.config.dataset, "seed": self.config.seed,
            "awac_score": pre[-1]["score"] if pre else None,
            "awac_return": pre[-1]["return"] if pre else None,
            "mb2po_score": final.get("eval/normalized_score"), "mb2po_return": final.get("eval/return_mean"),
            "pretrain_steps": self.learner.pretrain_steps_done, "iterations": self.improver.iteration,
        }

