"""Batched real envs: a gymnasium ``SyncVectorEnv`` of a task, wrapped for TorchRL.

One TorchRL env step costs far more than one gymnasium step (TensorDict overhead, see
``/work/shared/DESIGN.md`` "Collection speed"), so a deployment (BREMEN Alg. 1, line 4) steps a
batch of ``num_envs`` environments in one process: the per-step overhead is paid once per batch.

The env built by :func:`make_vector_env` has batch size ``[num_envs]`` and the same transforms as
:func:`~torchrl_depeff.envs.tasks.make_env` (``DoubleToFloat`` then
:class:`~torchrl_depeff.envs.tasks.TaskReward`), so its rows are interchangeable with the
single-env ones (BREMEN App. F.1 Table 3 rewards).

Choice (auto-reset mode): gymnasium >= 1.1 vector envs auto-reset in one of three modes.
``NEXT_STEP`` (gymnasium's default) is refused by TorchRL 0.14's ``GymWrapper``. Two modes are
handled correctly, both verified against a plain gymnasium env replaying the same actions
(``test/envs/test_vector_env.py``): ``("next", "observation")`` at an episode end is the true final
observation, never the reset one, ``terminated``/``truncated`` match gymnasium's flags at the time
limit and at terminations, and the next row's ``"observation"`` is the new episode's first one.

* ``"same_step"`` (default): gymnasium resets a finished sub-env inside ``step`` and reports the
  final observation in ``info["final_obs"]``; TorchRL's ``terminal_obs_reader`` and
  ``VecGymEnvTransform`` swap it back into ``("next", "observation")``. Quirk seen on TorchRL 0.14:
  when *every* sub-env ends on the same step (all hit the time limit together, as in HalfCheetah),
  TorchRL resets them once more, so the new episodes start from a second reset draw. This only
  changes which valid initial state is used; transitions stay consistent.
* ``"disabled"``: no gymnasium auto-reset; TorchRL resets finished sub-envs through
  ``reset(options={"reset_mask": ...})``, as for any batched TorchRL env. No per-step Python loop
  over sub-envs to read ``final_obs``, so it is faster (measured in ``benchmarks/bench_collect.py``).

Seeding: ``seed`` goes to ``env.set_seed``, i.e. ``SyncVectorEnv.reset(seed=seed)``, which seeds
sub-env ``i`` with ``seed + i``.
"""
from __future__ import annotations

from typing import Any, Literal

import torch
from torchrl.envs import DoubleToFloat, GymWrapper, TransformedEnv
from torchrl.envs.transforms import Compose

from torchrl_depeff.envs.tasks import TaskReward, _register_robotics, get_task

__all__ = ["make_vector_env", "AUTORESET_MODES"]

#: accepted ``autoreset_mode`` values
AUTORESET_MODES: tuple[str, ...] = ("same_step", "disabled")


class _SubEnvFactory:
    """Picklable zero-argument factory of one gymnasium sub-env (needed by ``SyncVectorEnv``)."""

    def __init__(self, gym_id: str, gym_kwargs: dict[str, Any]) -> None:
        self.gym_id = gym_id
        self.gym_kwargs = gym_kwargs

    def __call__(self):
        import gymnasium as gym

        genv = gym.make(self.gym_id, **self.gym_kwargs)
        if isinstance(genv.observation_space, gym.spaces.Dict):
            genv = gym.wrappers.FlattenObservation(genv)
        return genv


def make_vector_env(
    task_name: str,
    num_envs: int,
    *,
    seed: int | None = None,
    device: torch.device | str = "cpu",
    autoreset_mode: Literal["same_step", "disabled"] = "same_step",
    max_episode_steps: int | None = None,
    **gym_kwargs: Any,
) -> TransformedEnv:
    """Builds a batched real env of ``num_envs`` copies of a task (batch size ``[num_envs]``).

    Each sub-env is ``gym.make(task.gym_id, max_episode_steps=..., **task.gym_kwargs,
    **gym_kwargs)`` (dict observations flattened), stepped in-process by a gymnasium
    ``SyncVectorEnv``, wrapped by ``GymWrapper`` and followed by ``DoubleToFloat`` and
    :class:`~torchrl_depeff.envs.tasks.TaskReward` (the original reward kept in
    ``("next", "env_reward")``).

    Args:
        task_name (str): task name (:data:`~torchrl_depeff.envs.tasks.TASK_NAMES`).
        num_envs (int): number of sub-envs (``>= 1``).

    Keyword Args:
        seed (int, optional): if given, ``env.set_seed(seed)`` (sub-env ``i`` gets ``seed + i``).
        device (torch.device or str, optional): env device. Defaults to ``"cpu"``.
        autoreset_mode (str, optional): ``"same_step"`` (default) or ``"disabled"`` (see module
            doc; both verified correct, ``"disabled"`` is faster).
        max_episode_steps (int, optional): time limit; defaults to the task's
            ``max_episode_steps`` (1000 for MuJoCo locomotion).
        **gym_kwargs: extra ``gym.make`` kwargs (override the task's).

    Returns:
        TransformedEnv: batch size ``[num_envs]``, ``"observation"`` ``[num_envs, obs_dim]``
        float32, ``"action"`` ``[num_envs, act_dim]``.

    Examples:
        >>> from torchrl.envs.utils import check_env_specs
        >>> from torchrl_depeff.envs.vector import make_vector_env
        >>> env = make_vector_env("halfcheetah", 4, seed=0)
        >>> env.batch_size, env.observation_spec["observation"].shape
        (torch.Size([4]), torch.Size([4, 17]))
        >>> td = env.rollout(3)
        >>> td["next", "observation"].shape, td["next", "reward"].dtype
        (torch.Size([4, 3, 17]), torch.float32)
        >>> check_env_specs(env)
    """
    import gymnasium as gym

    task = get_task(task_name)
    if not isinstance(num_envs, int) or isinstance(num_envs, bool) or num_envs < 1:
        raise ValueError(f"num_envs must be an int >= 1, got {num_envs!r}")
    if autoreset_mode not in AUTORESET_MODES:
        raise ValueError(f"autoreset_mode must be one of {list(AUTORESET_MODES)}, got {autoreset_mode!r}")
    limit = task.max_episode_steps if max_episode_steps is None else int(max_episode_steps)
    if limit < 1:
        raise ValueError(f"max_episode_steps must be >= 1, got {max_episode_steps!r}")
    if task.robotics:
        _register_robotics()
    kwargs = {"max_episode_steps": limit, **task.gym_kwargs, **gym_kwargs}
    mode = {
        "same_step": gym.vector.AutoresetMode.SAME_STEP,
        "disabled": gym.vector.AutoresetMode.DISABLED,
    }[autoreset_mode]
    factory = _SubEnvFactory(task.gym_id, kwargs)
    venv = gym.vector.SyncVectorEnv([factory] * num_envs, autoreset_mode=mode)
    base = GymWrapper(venv, device=device)
    obs_shape = base.observation_spec["observation"].shape
    if obs_shape[-1] != task.observation_dim:
        raise ValueError(
            f"task {task_name!r} expects observation_dim {task.observation_dim}, env gives shape {list(obs_shape)}"
        )
    transforms = [DoubleToFloat(), TaskReward(task.reward_fn)]
    if isinstance(base, TransformedEnv):  # "same_step": GymWrapper added a VecGymEnvTransform
        env = base
        for t in transforms:
            env.append_transform(t)
    else:
        env = TransformedEnv(base, Compose(*transforms))
    if seed is not None:
        env.set_seed(int(seed))
    return env
