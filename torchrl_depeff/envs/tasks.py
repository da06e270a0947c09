"""Benchmark task definitions: gym ids, reward/termination functions and real-env factories.

The real env built by :func:`make_env` has its reward replaced by the task's ``reward_fn``
applied to ``(observation, action, next_observation)`` (the original reward is kept in
``("next", "env_reward")``), so that returns in the real env and in an
:class:`~torchrl_depeff.envs.model_env.EnsembleModelEnv` using the same ``reward_fn`` are
comparable (BREMEN App. F.1 Table 3).
"""
from __future__ import annotations

import functools
from dataclasses import dataclass, field
from typing import Any, Callable

import torch
from tensordict import TensorDictBase
from torchrl.data import Composite, TensorSpec, Unbounded
from torchrl.envs import DoubleToFloat, GymWrapper, TransformedEnv
from torchrl.envs.transforms import Compose, Transform

from torchrl_depeff.envs import rewards as R

__all__ = ["TaskSpec", "TaskReward", "check_finite_action", "get_task", "make_env", "TASK_NAMES"]

Fn = Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]


@dataclass(frozen=True)
class TaskSpec:
    """A benchmark task.

    Args:
        name (str): task name (see :data:`TASK_NAMES`).
        gym_id (str): gymnasium id.
        gym_kwargs (dict): extra ``gym.make`` kwargs.
        reward_fn (callable): ``(obs, action, next_obs) -> [*B, 1]``.
        termination_fn (callable): ``(obs, action, next_obs) -> bool [*B, 1]``.
        max_episode_steps (int): time limit of the real env.
        observation_dim (int): flat observation size.
        action_dim (int): action size.
        robotics (bool): needs gymnasium-robotics (dict observations flattened in gymnasium's
            sorted key order ``achieved_goal, desired_goal, observation``).

    Examples:
        >>> from torchrl_depeff.envs.tasks import get_task
        >>> get_task("hopper").observation_dim
        11
    """

    name: str
    gym_id: str
    gym_kwargs: dict[str, Any] = field(default_factory=dict)
    reward_fn: Fn = R.halfcheetah_reward
    termination_fn: Fn = R.no_termination
    max_episode_steps: int = 1000
    observation_dim: int = 0
    action_dim: int = 0
    robotics: bool = False


def _fetch_reach_reward(observation: torch.Tensor, action: torch.Tensor, next_observation: torch.Tensor) -> torch.Tensor:
    # FetchReach flattened obs: achieved_goal [0:3], desired_goal [3:6], observation [6:16]
    return R.goal_reach_reward(next_observation, slice(0, 3), slice(3, 6), 0.05)


def _hand_reach_reward(observation: torch.Tensor, action: torch.Tensor, next_observation: torch.Tensor) -> torch.Tensor:
    # HandReach flattened obs: achieved_goal [0:15], desired_goal [15:30], observation [30:93]
    return R.goal_reach_reward(next_observation, slice(0, 15), slice(15, 30), 0.01)


_TASKS: dict[str, TaskSpec] = {
    "halfcheetah": TaskSpec("halfcheetah", "HalfCheetah-v5", {}, R.halfcheetah_reward, R.no_termination, 1000, 17, 6),
    "cheetah_run": TaskSpec("cheetah_run", "HalfCheetah-v5", {}, R.cheetah_run_reward, R.no_termination, 1000, 17, 6),
    "hopper": TaskSpec("hopper", "Hopper-v5", {}, R.hopper_reward, R.hopper_termination, 1000, 11, 3),
    "walker2d": TaskSpec("walker2d", "Walker2d-v5", {}, R.walker2d_reward, R.walker2d_termination, 1000, 17, 6),
    "ant": TaskSpec(
        "ant",
        "Ant-v5",
        {"include_cfrc_ext_in_observation": False, "terminate_when_unhealthy": False},
        R.ant_reward,
        R.no_termination,
        1000,
        27,
        8,
    ),
    "fetch_reach": TaskSpec("fetch_reach", "FetchReach-v4", {}, _fetch_reach_reward, R.no_termination, 50, 16, 4, True),
    "hand_reach": TaskSpec("hand_reach", "HandReach-v3", {}, _hand_reach_reward, R.no_termination, 50, 93, 20, True),
}

#: valid task names
TASK_NAMES: tuple[str, ...] = tuple(_TASKS)


def get_task(name: str) -> TaskSpec:
    """Returns the :class:`TaskSpec` of a task.

    Args:
        name (str): one of :data:`TASK_NAMES`.

    Examples:
        >>> from torchrl_depeff.envs.tasks import get_task
        >>> get_task("ant").gym_kwargs["include_cfrc_ext_in_observation"]
        False
    """
    if name not in _TASKS:
        raise ValueError(f"unknown task {name!r}; valid names are {list(TASK_NAMES)}")
    return _TASKS[name]


class TaskReward(Transform):
    """Replaces the env reward by ``reward_fn(observation, action, next_observation)``.

    The original reward is moved to ``("next", "env_reward")``. The action is the one given to
    the env (gymnasium MuJoCo envs compute their control cost on the unclipped action too).

    A non-finite action (NaN/inf, e.g. from a diverged policy) is refused before the env is
    stepped with it (MuJoCo would otherwise return NaN observations and rewards): one
    ``isfinite`` check on the action per step.

    Args:
        reward_fn (callable): ``(obs, action, next_obs) -> [*B, 1]``.

    Keyword Args:
        name (str, optional): task name used in error messages.

    Examples:
        >>> from torchrl_depeff.envs.tasks import get_task, make_env
        >>> env = make_env("halfcheetah")
        >>> td = env.rollout(3)
        >>> r = get_task("halfcheetah").reward_fn(td["observation"], td["action"], td["next", "observation"])
        >>> torch.allclose(td["next", "reward"], r)
        True
    """

    def __init__(self, reward_fn: Fn, *, name: str | None = None) -> None:
        super().__init__(in_keys=["observation", "action", "reward"], out_keys=["reward", "env_reward"])
        self.reward_fn = reward_fn
        self.name = name

    def _inv_call(self, tensordict: TensorDictBase) -> TensorDictBase:
        action = tensordict.get("action", None)
        if action is not None:
            check_finite_action(action, self.name)
        return super()._inv_call(tensordict)

    def _step(self, tensordict: TensorDictBase, next_tensordict: TensorDictBase) -> TensorDictBase:
        env_reward = next_tensordict.get("reward")
        reward = self.reward_fn(
            tensordict.get("observation"), tensordict.get("action"), next_tensordict.get("observation")
        )
        next_tensordict.set("env_reward", env_reward)
        next_tensordict.set("reward", reward.reshape(env_reward.shape).to(env_reward.dtype))
        return next_tensordict

    def _reset(self, tensordict: TensorDictBase, tensordict_reset: TensorDictBase) -> TensorDictBase:
        spec = self.parent.full_reward_spec["reward"]
        tensordict_reset.set("env_reward", torch.zeros(spec.shape, dtype=spec.dtype, device=tensordict_reset.device))
        return tensordict_reset

    def transform_observation_spec(self, observation_spec: TensorSpec) -> TensorSpec:
        spec = self.parent.full_reward_spec["reward"] if self.parent is not None else None
        if isinstance(observation_spec, Composite) and spec is not None:
            observation_spec["env_reward"] = Unbounded(shape=spec.shape, dtype=spec.dtype, device=spec.device)
        return observation_spec

    def transform_reward_spec(self, reward_spec: TensorSpec) -> TensorSpec:
        spec = reward_spec["reward"] if isinstance(reward_spec, Composite) else reward_spec
        new = Unbounded(shape=spec.shape, dtype=spec.dtype, device=spec.device)
        if isinstance(reward_spec, Composite):
            reward_spec["reward"] = new
            return reward_spec
        return new


def check_finite_action(action: torch.Tensor, task: str | None = None) -> None:
    """Raise a ``ValueError`` if ``action`` holds NaN/inf (the real env must never be stepped with it).

    Args:
        action (torch.Tensor): the action about to be stepped.
        task (str, optional): task name for the message.

    Raises:
        ValueError: names the task, the number of non-finite entries and the first one.

    Examples:
        >>> from torchrl_depeff.envs.tasks import check_finite_action
        >>> check_finite_action(torch.zeros(2, 3))
        >>> check_finite_action(torch.tensor([[0.0, float("nan")]]), "hopper")
        Traceback (most recent call last):
            ...
        ValueError: task 'hopper': refusing to step the real env with 1 non-finite action value(s) (first: nan at index [0, 1]); the policy produced NaN/inf (check its weights and inputs)
    """
    finite = torch.isfinite(action)
    if bool(finite.all()):
        return
    bad = (~finite).nonzero()
    first = bad[0].tolist()
    where = f"task {task!r}: " if task is not None else ""
    raise ValueError(
        f"{where}refusing to step the real env with {bad.shape[0]} non-finite action value(s) "
        f"(first: {action[tuple(first)].item()} at index {first}); the policy produced NaN/inf "
        "(check its weights and inputs)"
    )


@functools.lru_cache(maxsize=1)
def _register_robotics() -> None:
    import gymnasium as gym
    import gymnasium_robotics

    gym.register_envs(gymnasium_robotics)


def make_env(
    name: str, *, device: torch.device | str = "cpu", from_pixels: bool = False, **kwargs: Any
) -> TransformedEnv:
    """Builds the real TorchRL env of a task.

    A gymnasium env (``gym.make(task.gym_id, **task.gym_kwargs, **kwargs)``, with its own
    ``TimeLimit`` of ``max_episode_steps``), dict observations flattened into one
    ``"observation"`` vector (gymnasium-robotics tasks), wrapped by ``GymWrapper``, then
    ``DoubleToFloat`` and :class:`TaskReward`.

    Args:
        name (str): task name (:data:`TASK_NAMES`).

    Keyword Args:
        device (torch.device or str, optional): env device. Defaults to ``"cpu"``.
        from_pixels (bool, optional): also return ``"pixels"`` (needs a working MuJoCo
            renderer; untested here). Defaults to ``False``.
        **kwargs: extra ``gym.make`` kwargs (override the task's).

    Examples:
        >>> from torchrl_depeff.envs.tasks import make_env
        >>> env = make_env("hopper")
        >>> env.observation_spec["observation"].shape, env.action_spec.shape
        (torch.Size([11]), torch.Size([3]))
    """
    import gymnasium as gym

    task = get_task(name)
    if task.robotics:
        _register_robotics()
    gym_kwargs = {**task.gym_kwargs, **kwargs}
    if from_pixels:
        gym_kwargs.setdefault("render_mode", "rgb_array")
    genv = gym.make(task.gym_id, **gym_kwargs)
    if isinstance(genv.observation_space, gym.spaces.Dict):
        genv = gym.wrappers.FlattenObservation(genv)
    base = GymWrapper(genv, device=device, from_pixels=from_pixels, pixels_only=False)
    obs_shape = base.observation_spec["observation"].shape
    if obs_shape[-1] != task.observation_dim:
        raise ValueError(
            f"task {name!r} expects observation_dim {task.observation_dim}, env gives shape {list(obs_shape)}"
        )
    return TransformedEnv(base, Compose(DoubleToFloat(), TaskReward(task.reward_fn, name=name)))
