"""VMAS as a real environment: many vectorised worlds, one joint single-agent interface (issue 8).

A deployment (BREMEN Alg. 1, line 4) can run in a `VMAS <https://github.com/proroklab/VectorizedMultiAgentSimulator>`_
scenario through TorchRL's :class:`~torchrl.envs.libs.vmas.VmasEnv`: ``num_envs`` worlds are
stepped as one batched torch computation, so a deployment of ``B`` transitions costs
``B / num_envs`` simulator calls. :class:`JointAgentsEnv` turns the multi-agent env into the
single-agent interface every other component of this package expects:

* ``"observation"`` ``[*B, n_agents * obs_dim]``: the agents' observations concatenated in
  agent order (agent 0 first); the dynamics ensemble models this joint vector.
* ``"action"`` ``[*B, n_agents * act_dim]``: one joint action, split back into per-agent
  actions (agent ``i`` gets columns ``[i * act_dim, (i + 1) * act_dim)``).
* ``"reward"`` ``[*B, 1]``: the mean of the agents' rewards (choice: for the shared-reward
  scenarios used here every agent receives the same team reward, and the mean is that value;
  for per-agent rewards it is the team average, which keeps the scale of one agent's reward).
* ``"terminated"`` is the scenario's own termination; ``"truncated"`` is set by this wrapper's
  time limit ``max_episode_steps`` (choice: VMAS's ``max_steps`` would report the time limit as
  ``terminated``, which would make value targets stop bootstrapping at the horizon).

Model env rewards (:data:`VMAS_TASKS`):

* ``"balance"``: :func:`balance_reward` is VMAS's dense term ``100 * (d_t - d_{t+1})`` with ``d``
  the package-to-goal distance, read from the joint observation (agent 0's columns 8-9 hold
  ``package_pos - goal_pos``); it equals the real reward on every step that does not end the
  episode. Not modelled: the ``-10`` fall penalty, paid on the terminal step when the line or
  the package touches the floor (its geometry is not in the observation in closed form), and the
  scenario's terminations (no ``termination_fn``: model rollouts run to the horizon).
* ``"navigation"``: the reward includes collision penalties and a goal bonus that depend on the
  lidar/agent geometry, so no reward function is given: build the ensemble with
  ``DynamicsEnsemble(..., predict_reward=True)`` and pass ``reward_fn=None`` (the model env then
  uses the ensemble's reward head).

Limits for multi-agent use: the ensemble and the policy see the *joint* observation (a
centralised, fully observed controller; the per-agent partial observability of VMAS is not
kept); one shared team reward; one joint policy (no per-agent policies, no parameter sharing
across agents, no decentralised execution); the joint dimension grows linearly with the number of
agents; only scenarios whose agents form one homogeneous group (``group_map == {"agents":
[...]}``, same observation and action shapes) are supported; continuous actions only.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable

import torch
from tensordict import TensorDict, TensorDictBase
from torchrl.data import Bounded, Categorical, Composite, Unbounded
from torchrl.envs import EnvBase

__all__ = [
    "JointAgentsEnv",
    "VmasTaskSpec",
    "VMAS_TASKS",
    "balance_reward",
    "make_vmas_env",
]

Fn = Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]

#: VMAS balance: shaping factor of the package-to-goal distance (vmas/scenarios/balance.py)
BALANCE_SHAPING = 100.0
#: columns of ``package_pos - goal_pos`` in one balance agent's 16-dim observation
BALANCE_PACKAGE_GOAL = slice(8, 10)


def balance_reward(
    observation: torch.Tensor, action: torch.Tensor, next_observation: torch.Tensor
) -> torch.Tensor:
    """Dense VMAS ``balance`` reward ``100 * (||p_t - g|| - ||p_{t+1} - g||)`` from joint observations.

    ``p - g`` (package minus goal position) is the same in every agent's observation; agent 0's
    copy (columns 8-9 of the joint vector) is used. The ``-10`` fall penalty of the terminal step
    is not included (see the module doc).

    Args:
        observation (torch.Tensor): joint observation ``[*B, n_agents * 16]``.
        action (torch.Tensor): joint action ``[*B, n_agents * 2]`` (unused).
        next_observation (torch.Tensor): joint next observation ``[*B, n_agents * 16]``.

    Returns:
        torch.Tensor: ``[*B, 1]``.

    Examples:
        >>> import torch
        >>> from torchrl_depeff.envs.vmas_task import balance_reward
        >>> obs, nxt = torch.zeros(2, 48), torch.zeros(2, 48)
        >>> obs[:, 8] = 0.5; nxt[:, 8] = 0.4  # the package got 0.1 closer to the goal
        >>> balance_reward(obs, torch.zeros(2, 6), nxt)
        tensor([[10.0000],
                [10.0000]])
    """
    d_t = torch.linalg.vector_norm(observation[..., BALANCE_PACKAGE_GOAL], dim=-1, keepdim=True)
    d_next = torch.linalg.vector_norm(next_observation[..., BALANCE_PACKAGE_GOAL], dim=-1, keepdim=True)
    return BALANCE_SHAPING * (d_t - d_next)


@dataclass(frozen=True)
class VmasTaskSpec:
    """A VMAS task: scenario, model-env reward / termination and episode length.

    Args:
        scenario (str): VMAS scenario name.
        reward_fn (callable, optional): ``(obs, action, next_obs) -> [*B, 1]`` on joint vectors;
            ``None``: the ensemble must predict the reward (``predict_reward=True``).
        termination_fn (callable, optional): ``None``: model rollouts never terminate.
        max_episode_steps (int): time limit (BenchMARL's VMAS horizon, 100).
        scenario_kwargs (dict): default scenario kwargs.

    Examples:
        >>> from torchrl_depeff.envs.vmas_task import VMAS_TASKS
        >>> VMAS_TASKS["navigation"].reward_fn is None, VMAS_TASKS["balance"].max_episode_steps
        (True, 100)
    """

    scenario: str
    reward_fn: Fn | None = None
    termination_fn: Fn | None = None
    max_episode_steps: int = 100
    scenario_kwargs: tuple[tuple[str, Any], ...] = ()


#: supported VMAS tasks
VMAS_TASKS: dict[str, VmasTaskSpec] = {
    "balance": VmasTaskSpec("balance", reward_fn=balance_reward),
    "navigation": VmasTaskSpec("navigation", reward_fn=None),
}


class JointAgentsEnv(EnvBase):
    """Single-agent view of a one-group multi-agent TorchRL env (joint observation and action).

    See the module doc for the layout, the reward reduction and the limits. The wrapper owns
    the time limit: a per-world step counter sets ``"truncated"`` at ``max_episode_steps``.

    Args:
        base (EnvBase): a multi-agent env with one group (e.g. ``VmasEnv``) exposing
            ``(group, "observation")`` ``[*B, n, o]``, ``(group, "action")`` ``[*B, n, a]``
            (bounded, continuous) and ``(group, "reward")`` ``[*B, n, 1]``.

    Keyword Args:
        group (str): the agents' group name. Defaults to ``"agents"``.
        max_episode_steps (int, optional): time limit; ``None`` for none. Defaults to ``100``.

    Examples:
        >>> import torch
        >>> from torchrl.envs.libs.vmas import VmasEnv
        >>> from torchrl_depeff.envs.vmas_task import JointAgentsEnv
        >>> env = JointAgentsEnv(VmasEnv("balance", num_envs=8, continuous_actions=True), max_episode_steps=5)
        >>> env.observation_spec["observation"].shape, env.action_spec.shape
        (torch.Size([8, 48]), torch.Size([8, 6]))
        >>> td = env.rollout(6, break_when_any_done=False)
        >>> td["next", "reward"].shape, td["next", "truncated"][:, 4].all().item()
        (torch.Size([8, 6, 1]), True)
    """

    def __init__(self, base: EnvBase, *, group: str = "agents", max_episode_steps: int | None = 100) -> None:
        if not isinstance(base, EnvBase):
            raise TypeError(f"base must be a torchrl EnvBase, got {type(base).__name__}")
        group_map = getattr(base, "group_map", None)
        if group_map is not None and set(group_map) != {group}:
            raise ValueError(
                f"JointAgentsEnv needs one agent group {group!r}, the env has groups {sorted(group_map)} "
                "(heterogeneous agents are not supported)"
            )
        if max_episode_steps is not None and (
            not isinstance(max_episode_steps, int) or max_episode_steps < 1
        ):
            raise ValueError(f"max_episode_steps must be a positive int or None, got {max_episode_steps!r}")
        batch_size = base.batch_size
        nb = len(batch_size)
        obs_spec = base.observation_spec.get((group, "observation"), None)
        act_spec = base.full_action_spec.get((group, "action"), None)
        if obs_spec is None or act_spec is None:
            raise KeyError(f"base env has no ({group!r}, 'observation') or ({group!r}, 'action') spec")
        if not isinstance(act_spec, Bounded) or act_spec.dtype not in (torch.float32, torch.float64):
            raise TypeError(
                f"JointAgentsEnv needs bounded continuous actions, got {type(act_spec).__name__} "
                f"({act_spec.dtype}); build the VMAS env with continuous_actions=True"
            )
        if obs_spec.ndim != nb + 2 or act_spec.ndim != nb + 2:
            raise ValueError(
                f"expected per-agent specs [*batch, n_agents, dim], got observation {list(obs_spec.shape)} "
                f"and action {list(act_spec.shape)}"
            )
        super().__init__(device=base.device, batch_size=batch_size)
        self.base = base
        self.group = group
        self.max_episode_steps = max_episode_steps
        self.n_agents = int(obs_spec.shape[nb])
        self.agent_observation_dim = int(obs_spec.shape[-1])
        self.agent_action_dim = int(act_spec.shape[-1])
        joint_obs = self.n_agents * self.agent_observation_dim
        joint_act = self.n_agents * self.agent_action_dim
        dev = base.device
        self.observation_spec = Composite(
            observation=Unbounded((*batch_size, joint_obs), dtype=obs_spec.dtype, device=dev),
            shape=batch_size,
            device=dev,
        )
        self.action_spec = Bounded(
            act_spec.space.low.reshape(*batch_size, joint_act),
            act_spec.space.high.reshape(*batch_size, joint_act),
            (*batch_size, joint_act),
            dtype=act_spec.dtype,
            device=dev,
        )
        self.reward_spec = Unbounded((*batch_size, 1), dtype=torch.float32, device=dev)
        self.done_spec = Composite(
            done=Categorical(2, (*batch_size, 1), dtype=torch.bool, device=dev),
            terminated=Categorical(2, (*batch_size, 1), dtype=torch.bool, device=dev),
            truncated=Categorical(2, (*batch_size, 1), dtype=torch.bool, device=dev),
            shape=batch_size,
            device=dev,
        )
        self._step_count = torch.zeros((*batch_size, 1), dtype=torch.int64, device=dev)

    def _joint_obs(self, td: TensorDictBase) -> torch.Tensor:
        obs = td.get((self.group, "observation"))
        return obs.reshape(*obs.shape[: obs.ndim - 2], -1)

    def _reset(self, tensordict: TensorDictBase | None = None, **kwargs) -> TensorDictBase:
        mask = None if tensordict is None else tensordict.get("_reset", None)
        base_in = None
        if mask is not None:
            base_in = TensorDict({"_reset": mask}, batch_size=self.batch_size, device=mask.device)
            # zero the counters of the worlds being reset, keep the others
            self._step_count = self._step_count.masked_fill(mask.reshape(self._step_count.shape), 0)
        else:
            self._step_count = torch.zeros_like(self._step_count)
        out = self.base._reset(base_in)
        terminated = out.get("terminated").reshape(self._step_count.shape)
        truncated = torch.zeros_like(terminated)
        return TensorDict(
            {
                "observation": self._joint_obs(out),
                "done": terminated | truncated,
                "terminated": terminated,
                "truncated": truncated,
            },
            batch_size=self.batch_size,
            device=out.device,
        )

    def _step(self, tensordict: TensorDictBase) -> TensorDictBase:
        action = tensordict.get("action")
        per_agent = action.reshape(*action.shape[:-1], self.n_agents, self.agent_action_dim)
        base_in = TensorDict({(self.group, "action"): per_agent}, batch_size=self.batch_size, device=action.device)
        out = self.base._step(base_in)
        reward = out.get((self.group, "reward")).mean(-2)  # team mean over agents, [*B, 1]
        terminated = out.get("terminated").reshape(self._step_count.shape)
        self._step_count = self._step_count + 1
        if self.max_episode_steps is None:
            truncated = torch.zeros_like(terminated)
        else:
            truncated = self._step_count >= self.max_episode_steps
        return TensorDict(
            {
                "observation": self._joint_obs(out),
                "reward": reward.to(torch.float32),
                "done": terminated | truncated,
                "terminated": terminated,
                "truncated": truncated,
            },
            batch_size=self.batch_size,
            device=out.device,
        )

    def _set_seed(self, seed: int | None) -> None:
        self.base.set_seed(seed)


def make_vmas_env(
    task_name: str,
    num_envs: int,
    *,
    seed: int | None = None,
    device: torch.device | str = "cpu",
    max_episode_steps: int | None = None,
    **scenario_kwargs: Any,
) -> JointAgentsEnv:
    """Builds the real env of a VMAS task: ``num_envs`` vectorised worlds, joint interface.

    Args:
        task_name (str): a key of :data:`VMAS_TASKS` (``"balance"`` or ``"navigation"``).
        num_envs (int): number of vectorised worlds (the env's batch size).

    Keyword Args:
        seed (int, optional): seeds VMAS (``env.set_seed``).
        device (torch.device or str, optional): simulation device. Defaults to ``"cpu"``.
        max_episode_steps (int, optional): time limit; defaults to the task's (100).
        **scenario_kwargs: VMAS scenario kwargs (e.g. ``n_agents=2``).

    Returns:
        JointAgentsEnv: batch ``[num_envs]``, flat ``"observation"`` and ``"action"``.

    Examples:
        >>> from torchrl.envs.utils import check_env_specs
        >>> from torchrl_depeff.envs.vmas_task import make_vmas_env
        >>> env = make_vmas_env("navigation", 16, seed=0, n_agents=2)
        >>> env.batch_size, env.observation_spec["observation"].shape[-1], env.action_spec.shape[-1]
        (torch.Size([16]), 36, 4)
        >>> check_env_specs(env)
    """
    try:
        from torchrl.envs.libs.vmas import VmasEnv
        import vmas  # noqa: F401
    except ImportError as err:
        raise ImportError("make_vmas_env needs vmas (pip install 'vmas>=1.4,<2')") from err
    if task_name not in VMAS_TASKS:
        raise ValueError(f"unknown VMAS task {task_name!r}; valid names are {sorted(VMAS_TASKS)}")
    if not isinstance(num_envs, int) or isinstance(num_envs, bool) or num_envs < 1:
        raise ValueError(f"num_envs must be an int >= 1, got {num_envs!r}")
    task = VMAS_TASKS[task_name]
    kwargs = {**dict(task.scenario_kwargs), **scenario_kwargs}
    base = VmasEnv(task.scenario, num_envs=num_envs, continuous_actions=True, device=device, **kwargs)
    limit = task.max_episode_steps if max_episode_steps is None else max_episode_steps
    env = JointAgentsEnv(base, max_episode_steps=limit)
    if seed is not None:
        env.set_seed(int(seed))
    return env
