"""Environments: the ensemble model env, uncertainty penalties, task definitions, batched real envs."""
from __future__ import annotations

from torchrl_depeff.envs import rewards
from torchrl_depeff.envs.model_env import ACTION_BOUNDS, EnsembleModelEnv, MEMBER_SELECTIONS, model_rollout, UNCERTAINTY_KEYS
from torchrl_depeff.envs.penalties import HardUncertaintyPenalty, SoftUncertaintyPenalty
from torchrl_depeff.envs.tasks import get_task, make_env, TASK_NAMES, TaskReward, TaskSpec
from torchrl_depeff.envs.vector import AUTORESET_MODES, make_vector_env, NativeVectorEnv
from torchrl_depeff.envs.vmas_task import (
    balance_reward,
    JointAgentsEnv,
    make_vmas_env,
    VMAS_TASKS,
    VmasTaskSpec,
)

__all__ = [
    "ACTION_BOUNDS",
    "model_rollout",
    "AUTORESET_MODES",
    "EnsembleModelEnv",
    "HardUncertaintyPenalty",
    "JointAgentsEnv",
    "MEMBER_SELECTIONS",
    "NativeVectorEnv",
    "SoftUncertaintyPenalty",
    "TASK_NAMES",
    "TaskReward",
    "TaskSpec",
    "UNCERTAINTY_KEYS",
    "VMAS_TASKS",
    "VmasTaskSpec",
    "balance_reward",
    "get_task",
    "make_env",
    "make_vector_env",
    "make_vmas_env",
    "rewards",
]
