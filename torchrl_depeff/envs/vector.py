"""Batched real envs: a gymnasium ``SyncVectorEnv`` of a task, wrapped for TorchRL.

One TorchRL env step costs far more than one gymnasium step (TensorDict overhead, see
``/work/shared/DESIGN.md`` "Collection speed"), so a deployment (BREMEN Alg. 1, line 4) steps a
batch of ``num_envs`` environments in one process: the per-step overhead is paid once per batch.

The env built by :func:`make_vector_env` has batch size ``[num_envs]`` and the same transforms as
:func:`~torchrl_depeff.envs.tasks.make_env` (``DoubleToFloat`` then
:class:`~torchrl_depeff.envs.tasks.TaskReward`), so its rows are interchangeable with the
single-env ones (BREMEN App. F.1 Table 3 rewards).

Backends (``make_vector_env(..., backend=...)``):

* ``"native"`` (default): :class:`NativeVectorEnv`, our lean ``EnvBase`` that owns a gymnasium
  ``SyncVectorEnv`` with auto-reset disabled, steps its sub-envs into preallocated numpy buffers,
  converts once to float32 torch, computes the task reward in torch on the batch and resets only
  finished sub-envs through TorchRL's ``"_reset"`` mask. Measured faster than ``GymWrapper``
  (``benchmarks/bench_collect.py``, 2 cores, 2026-11-23, two runs: ``collect_deployment`` at 128
  envs 1.68x / 1.47x a plain single-env loop, vs 1.47x / 1.20x for ``"gym_wrapper"`` with
  ``"disabled"`` and 1.24x for ``"same_step"``; a profile at
  64 envs puts over 90 % of ``NativeVectorEnv._step`` inside the gymnasium sub-env steps). The
  ``autoreset_mode`` argument does not apply to it.
* ``"gym_wrapper"``: TorchRL's ``GymWrapper`` + ``DoubleToFloat`` + ``TaskReward``, described
  below.

Choice (auto-reset mode, ``"gym_wrapper"`` backend): gymnasium >= 1.1 vector envs auto-reset in one of three modes.
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

from typing import Any, Callable, Literal

import numpy as np
import torch
from tensordict import TensorDict, TensorDictBase
from torchrl.data import Bounded, Categorical, Composite, Unbounded
from torchrl.envs import DoubleToFloat, EnvBase, GymWrapper, TransformedEnv
from torchrl.envs.transforms import Compose

from torchrl_depeff.envs.tasks import _register_robotics, check_finite_action, get_task, TaskReward

__all__ = ["make_vector_env", "NativeVectorEnv", "AUTORESET_MODES", "BACKENDS"]

Fn = Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]

#: accepted ``autoreset_mode`` values
AUTORESET_MODES: tuple[str, ...] = ("same_step", "disabled")

#: accepted ``backend`` values of :func:`make_vector_env`
BACKENDS: tuple[str, ...] = ("native", "gym_wrapper")


class NativeVectorEnv(EnvBase):
    """A lean batched TorchRL env that owns a gymnasium ``SyncVectorEnv`` (auto-reset disabled).

    Per batched step it does the minimum: one Python loop calling each sub-env's ``step`` into
    preallocated numpy buffers (the loop ``SyncVectorEnv.step`` runs, without its per-step info
    merging, which costs a dict update per sub-env and key), one numpy -> float32 torch conversion
    per entry, and the task reward computed in torch on the whole batch (BREMEN App. F.1
    Table 3), so neither ``DoubleToFloat`` nor :class:`~torchrl_depeff.envs.tasks.TaskReward` is
    needed. Specs are built once. Finished sub-envs are reset by TorchRL's ``"_reset"`` mask
    (only those sub-envs are reset), so ``("next", "observation")`` at an episode end is the true
    final observation and ``terminated``/``truncated`` are gymnasium's own flags.

    Rows are interchangeable with :func:`~torchrl_depeff.envs.tasks.make_env`'s: the same keys
    (``"observation"``, ``"env_reward"``, ``"reward"``, ``"done"``, ``"terminated"``,
    ``"truncated"``), dtypes (float32 observations/rewards, bool flags) and reward; the original
    env reward is kept in ``("next", "env_reward")``.

    Seeding (same as ``GymWrapper`` on a ``SyncVectorEnv``): ``set_seed(seed)`` resets sub-env
    ``i`` with ``seed + i``.

    Choice: the sub-envs are stepped directly (``venv.envs[i].step``) rather than through
    ``SyncVectorEnv.step``: measured faster (``benchmarks/bench_collect.py``), and with auto-reset
    disabled both do exactly the same gymnasium calls. The ``SyncVectorEnv`` is kept as the owner
    of the sub-envs (spaces, ``close``).

    Args:
        venv (gymnasium.vector.SyncVectorEnv): the vector env (its ``single_observation_space``
            a flat ``Box``, its ``single_action_space`` a ``Box``).
        reward_fn (callable): ``(obs, action, next_obs) -> [*B, 1]``, the task reward.

    Keyword Args:
        device (torch.device or str, optional): env device. Defaults to ``"cpu"``.
        name (str, optional): task name used in error messages.

    Raises:
        ValueError: at :meth:`step`, an action holding NaN/inf (the sub-envs are not stepped).

    Examples:
        >>> import gymnasium as gym
        >>> from torchrl.envs.utils import check_env_specs
        >>> from torchrl_depeff.envs.tasks import get_task
        >>> from torchrl_depeff.envs.vector import NativeVectorEnv
        >>> venv = gym.vector.SyncVectorEnv([lambda: gym.make("HalfCheetah-v5")] * 3)
        >>> env = NativeVectorEnv(venv, get_task("halfcheetah").reward_fn)
        >>> env.batch_size
        torch.Size([3])
        >>> check_env_specs(env, seed=0)
        >>> env.rollout(5)["next", "reward"].shape
        torch.Size([3, 5, 1])
    """

    def __init__(
        self, venv: Any, reward_fn: Fn, *, device: torch.device | str = "cpu", name: str | None = None
    ) -> None:
        import gymnasium as gym

        n = int(venv.num_envs)
        super().__init__(device=device, batch_size=torch.Size([n]))
        obs_space, act_space = venv.single_observation_space, venv.single_action_space
        if not isinstance(obs_space, gym.spaces.Box) or len(obs_space.shape) != 1:
            raise TypeError(f"NativeVectorEnv needs a flat Box observation space, got {obs_space!r}")
        if not isinstance(act_space, gym.spaces.Box) or len(act_space.shape) != 1:
            raise TypeError(f"NativeVectorEnv needs a flat Box action space, got {act_space!r}")
        self._venv = venv
        self._envs = list(venv.envs)
        self.reward_fn = reward_fn
        self.name = name
        obs_dim, act_dim = obs_space.shape[0], act_space.shape[0]
        dev = self.device
        self.observation_spec = Composite(
            observation=Unbounded(shape=(n, obs_dim), dtype=torch.float32, device=dev),
            env_reward=Unbounded(shape=(n, 1), dtype=torch.float32, device=dev),
            shape=(n,),
            device=dev,
        )
        self.action_spec = Bounded(
            low=torch.as_tensor(act_space.low, dtype=torch.float32).expand(n, act_dim).clone(),
            high=torch.as_tensor(act_space.high, dtype=torch.float32).expand(n, act_dim).clone(),
            shape=(n, act_dim),
            dtype=torch.float32,
            device=dev,
        )
        self.reward_spec = Unbounded(shape=(n, 1), dtype=torch.float32, device=dev)
        self.done_spec = Composite(
            done=Categorical(2, shape=(n, 1), dtype=torch.bool, device=dev),
            terminated=Categorical(2, shape=(n, 1), dtype=torch.bool, device=dev),
            truncated=Categorical(2, shape=(n, 1), dtype=torch.bool, device=dev),
            shape=(n,),
            device=dev,
        )
        # preallocated numpy buffers the sub-env loop writes into
        self._obs = np.zeros((n, obs_dim), dtype=np.float64)
        self._rew = np.zeros((n,), dtype=np.float64)
        self._term = np.zeros((n,), dtype=np.bool_)
        self._trunc = np.zeros((n,), dtype=np.bool_)
        self._zeros_reward = torch.zeros((n, 1), dtype=torch.float32, device=dev)
        self._zeros_flag = torch.zeros((n, 1), dtype=torch.bool, device=dev)
        self._is_cpu = dev is None or torch.device(dev).type == "cpu"

    def _to(self, x: torch.Tensor) -> torch.Tensor:
        return x if self._is_cpu else x.to(self.device)

    def step_tensors(
        self, observation: torch.Tensor, action: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """One batched step without tensordicts: what :meth:`step` computes, as tensors.

        Steps every sub-env with ``action`` and computes the task reward on
        ``(observation, action, next_observation)``; :meth:`step` calls it and packs the
        result (so the two give the same values). For loops that own their bookkeeping, e.g.
        :class:`~torchrl_depeff.algorithms.components.RealEnvEvaluation`'s episodes. Finished
        sub-envs are not reset (reset them through :meth:`reset`).

        Args:
            observation (torch.Tensor): the sub-envs' current observations ``[n, obs_dim]``
                (the reward reads them).
            action (torch.Tensor): ``[n, act_dim]``.

        Returns:
            ``(next_observation [n, obs_dim], reward [n, 1], env_reward [n, 1],
            terminated [n, 1], truncated [n, 1])``, float32 and bool, on the env's device.

        Raises:
            ValueError: ``action`` holds NaN/inf (the sub-envs are not stepped).

        Examples:
            >>> from torchrl_depeff.envs.vector import make_vector_env
            >>> env = make_vector_env("halfcheetah", 2, seed=0)
            >>> obs = env.reset()["observation"]
            >>> next_obs, reward, _, terminated, truncated = env.base_env.step_tensors(obs, torch.zeros(2, 6))
            >>> next_obs.shape, reward.shape, terminated.dtype
            (torch.Size([2, 17]), torch.Size([2, 1]), torch.bool)
        """
        act = action.detach().cpu().numpy()
        if not np.isfinite(act).all():  # never step MuJoCo with NaN/inf (NaN rewards follow)
            check_finite_action(action, self.name)
        obs, rew, term, trunc = self._obs, self._rew, self._term, self._trunc
        for i, env in enumerate(self._envs):  # the sub-env loop SyncVectorEnv.step runs too
            obs[i], rew[i], term[i], trunc[i], _ = env.step(act[i])
        next_obs = self._to(torch.from_numpy(obs).to(torch.float32))
        env_reward = self._to(torch.from_numpy(rew).to(torch.float32).unsqueeze(-1))
        terminated = self._to(torch.from_numpy(term.copy()).unsqueeze(-1))
        truncated = self._to(torch.from_numpy(trunc.copy()).unsqueeze(-1))
        # BREMEN App. F.1 Table 3: the task reward on (s_t, a_t, s_{t+1}), batched in torch
        reward = self.reward_fn(observation, action, next_obs).reshape(env_reward.shape).to(torch.float32)
        return next_obs, reward, env_reward, terminated, truncated

    def _step(self, tensordict: TensorDictBase) -> TensorDictBase:
        next_obs, reward, env_reward, terminated, truncated = self.step_tensors(
            tensordict.get("observation"), tensordict.get("action")
        )
        return TensorDict._new_unsafe(
            {
                "observation": next_obs,
                "reward": reward,
                "env_reward": env_reward,
                "done": terminated | truncated,
                "terminated": terminated,
                "truncated": truncated,
            },
            batch_size=self.batch_size,
            device=self.device,
        )

    def _reset_envs(self, mask: np.ndarray | None, seed: int | None) -> None:
        obs = self._obs
        for i, env in enumerate(self._envs):
            if mask is None or mask[i]:
                obs[i], _ = env.reset(seed=None if seed is None else seed + i)

    def _reset(self, tensordict: TensorDictBase | None = None, **kwargs: Any) -> TensorDictBase:
        mask = None
        if tensordict is not None:
            reset = tensordict.get("_reset", None)
            if reset is not None:
                mask = reset.reshape(self.batch_size).cpu().numpy()
        self._reset_envs(mask, None)
        return TensorDict._new_unsafe(
            {
                "observation": self._to(torch.from_numpy(self._obs).to(torch.float32)),
                "env_reward": self._zeros_reward.clone(),
                "done": self._zeros_flag.clone(),
                "terminated": self._zeros_flag.clone(),
                "truncated": self._zeros_flag.clone(),
            },
            batch_size=self.batch_size,
            device=self.device,
        )

    def _set_seed(self, seed: int | None) -> None:
        # as GymWrapper on a SyncVectorEnv: reset every sub-env, sub-env i with seed + i
        self._reset_envs(None, None if seed is None else int(seed))

    def close(self, *, raise_if_closed: bool = True) -> None:
        """Closes the sub-envs, then the TorchRL env."""
        venv = getattr(self, "_venv", None)
        if venv is not None:
            venv.close()
        super().close(raise_if_closed=raise_if_closed)


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
    backend: Literal["native", "gym_wrapper"] = "native",
    **gym_kwargs: Any,
) -> TransformedEnv:
    """Builds a batched real env of ``num_envs`` copies of a task (batch size ``[num_envs]``).

    Each sub-env is ``gym.make(task.gym_id, max_episode_steps=..., **task.gym_kwargs,
    **gym_kwargs)`` (dict observations flattened), stepped in-process by a gymnasium
    ``SyncVectorEnv``. Two backends give the same rows (keys, dtypes, task reward, the original
    reward kept in ``("next", "env_reward")``, true final observations, gymnasium's flags):

    * ``"native"`` (default, faster): :class:`NativeVectorEnv` (auto-reset disabled, finished
      sub-envs reset through TorchRL's ``"_reset"`` mask, reward computed in torch), inside a
      ``TransformedEnv`` with no transform so the return type is the same. ``autoreset_mode`` is
      ignored: it behaves as ``"disabled"`` (the all-done double-reset quirk never happens).
    * ``"gym_wrapper"``: ``GymWrapper`` followed by ``DoubleToFloat`` and
      :class:`~torchrl_depeff.envs.tasks.TaskReward`, auto-reset per ``autoreset_mode``.

    Args:
        task_name (str): task name (:data:`~torchrl_depeff.envs.tasks.TASK_NAMES`).
        num_envs (int): number of sub-envs (``>= 1``).

    Keyword Args:
        seed (int, optional): if given, ``env.set_seed(seed)`` (sub-env ``i`` gets ``seed + i``).
        device (torch.device or str, optional): env device. Defaults to ``"cpu"``.
        autoreset_mode (str, optional): ``"same_step"`` (default) or ``"disabled"`` (see module
            doc; both verified correct, ``"disabled"`` is faster). Used by the
            ``"gym_wrapper"`` backend only.
        max_episode_steps (int, optional): time limit; defaults to the task's
            ``max_episode_steps`` (1000 for MuJoCo locomotion).
        backend (str, optional): ``"native"`` (default) or ``"gym_wrapper"`` (see above).
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
        >>> old = make_vector_env("halfcheetah", 4, seed=0, backend="gym_wrapper")
        >>> torch.allclose(old.reset()["observation"], make_vector_env("halfcheetah", 4, seed=0).reset()["observation"])
        True
    """
    import gymnasium as gym

    task = get_task(task_name)
    if not isinstance(num_envs, int) or isinstance(num_envs, bool) or num_envs < 1:
        raise ValueError(f"num_envs must be an int >= 1, got {num_envs!r}")
    if autoreset_mode not in AUTORESET_MODES:
        raise ValueError(f"autoreset_mode must be one of {list(AUTORESET_MODES)}, got {autoreset_mode!r}")
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {list(BACKENDS)}, got {backend!r}")
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
    if backend == "native":
        venv = gym.vector.SyncVectorEnv([factory] * num_envs, autoreset_mode=gym.vector.AutoresetMode.DISABLED)
        native = NativeVectorEnv(venv, task.reward_fn, device=device, name=task_name)
        obs_shape = native.observation_spec["observation"].shape
        if obs_shape[-1] != task.observation_dim:
            raise ValueError(
                f"task {task_name!r} expects observation_dim {task.observation_dim}, env gives shape {list(obs_shape)}"
            )
        env = TransformedEnv(native)
        if seed is not None:
            env.set_seed(int(seed))
        return env
    venv = gym.vector.SyncVectorEnv([factory] * num_envs, autoreset_mode=mode)
    base = GymWrapper(venv, device=device)
    obs_shape = base.observation_spec["observation"].shape
    if obs_shape[-1] != task.observation_dim:
        raise ValueError(
            f"task {task_name!r} expects observation_dim {task.observation_dim}, env gives shape {list(obs_shape)}"
        )
    transforms = [DoubleToFloat(), TaskReward(task.reward_fn, name=task_name)]
    if isinstance(base, TransformedEnv):  # "same_step": GymWrapper added a VecGymEnvTransform
        env = base
        for t in transforms:
            env.append_transform(t)
    else:
        env = TransformedEnv(base, Compose(*transforms))
    if seed is not None:
        env.set_seed(int(seed))
    return env
