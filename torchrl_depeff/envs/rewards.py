"""Batched reward and termination functions of the benchmark tasks (BREMEN App. F.1, Table 3).

Every function has the signature ``fn(observation, action, next_observation)`` with
``observation``/``next_observation`` ``[*B, o]`` and ``action`` ``[*B, a]`` and returns
``[*B, 1]`` (float for rewards, bool for terminations). Rewards are computed from
``next_observation`` (the state reached by the transition) and the action as given to the env.

Observation layouts (gymnasium v5, ``exclude_current_positions_from_observation=True``):
``obs = qpos[1:] + qvel`` (Ant: ``qpos[2:] + qvel``), so the root x-velocity ``xdot = qvel[0]``
sits at index ``nq - 1`` (Ant: ``nq - 2``):

============  ====  ==============  ====================
env           nq    xdot index      z / angle index
============  ====  ==============  ====================
HalfCheetah   9     8               --
Hopper        6     5               0 / 1
Walker2d      9     8               0 / 1
Ant (27-dim)  15    13              0 / --
============  ====  ==============  ====================

Hopper and Walker2d clip velocities in the observation to ``[-10, 10]``; ``xdot`` is the
clipped value. BREMEN's Table 3 uses ``xdot`` (a velocity) whereas gymnasium's reward uses
the finite-difference displacement ``(x' - x) / dt``; we follow Table 3 so model and real
returns are computed by the same function.
"""
from __future__ import annotations

import math

import torch

__all__ = [
    "HALFCHEETAH_XDOT",
    "HOPPER_XDOT",
    "WALKER2D_XDOT",
    "ANT_XDOT",
    "halfcheetah_reward",
    "cheetah_run_reward",
    "hopper_reward",
    "walker2d_reward",
    "ant_reward",
    "hopper_termination",
    "walker2d_termination",
    "no_termination",
    "goal_reach_reward",
]

HALFCHEETAH_XDOT = 8
HOPPER_XDOT = 5
WALKER2D_XDOT = 8
ANT_XDOT = 13


def _sq_norm(action: torch.Tensor) -> torch.Tensor:
    return action.pow(2).sum(-1, keepdim=True)


def halfcheetah_reward(
    observation: torch.Tensor, action: torch.Tensor, next_observation: torch.Tensor
) -> torch.Tensor:
    r"""HalfCheetah (Table 3): :math:`r = \dot x - 0.1\lVert a\rVert^2`.

    Args:
        observation (torch.Tensor): ``[*B, 17]`` (unused).
        action (torch.Tensor): ``[*B, 6]``.
        next_observation (torch.Tensor): ``[*B, 17]``.

    Examples:
        >>> from torchrl_depeff.envs.rewards import halfcheetah_reward
        >>> obs = torch.zeros(2, 17); obs[:, 8] = torch.tensor([1.0, 2.0])
        >>> halfcheetah_reward(obs, torch.ones(2, 6), obs).squeeze(-1)
        tensor([0.4000, 1.4000])
    """
    xdot = next_observation[..., HALFCHEETAH_XDOT : HALFCHEETAH_XDOT + 1]
    return xdot - 0.1 * _sq_norm(action)  # BREMEN Table 3


def cheetah_run_reward(
    observation: torch.Tensor, action: torch.Tensor, next_observation: torch.Tensor
) -> torch.Tensor:
    r"""Cheetah-run on HalfCheetah (BREMEN App. G.5): :math:`r = \mathrm{clip}(0.1\dot x, 0, 1)`.

    The paper gives ``0.1 xdot`` for ``0 <= xdot <= 10`` and ``1`` above; ``xdot < 0`` is not
    specified: we follow dm_control's ``tolerance`` (linear sigmoid, margin 10) which gives
    ``0`` for backward motion. No control cost.

    Args:
        observation (torch.Tensor): ``[*B, 17]`` (unused).
        action (torch.Tensor): ``[*B, 6]`` (unused).
        next_observation (torch.Tensor): ``[*B, 17]``.

    Examples:
        >>> from torchrl_depeff.envs.rewards import cheetah_run_reward
        >>> obs = torch.zeros(3, 17); obs[:, 8] = torch.tensor([-1.0, 5.0, 12.0])
        >>> cheetah_run_reward(obs, torch.ones(3, 6), obs).squeeze(-1)
        tensor([0.0000, 0.5000, 1.0000])
    """
    xdot = next_observation[..., HALFCHEETAH_XDOT : HALFCHEETAH_XDOT + 1]
    return (0.1 * xdot).clamp(0.0, 1.0)  # BREMEN App. G.5


def hopper_reward(
    observation: torch.Tensor, action: torch.Tensor, next_observation: torch.Tensor
) -> torch.Tensor:
    r"""Hopper (Table 3): :math:`r = \dot x - 0.001\lVert a\rVert^2 + 1`.

    Args:
        observation (torch.Tensor): ``[*B, 11]`` (unused).
        action (torch.Tensor): ``[*B, 3]``.
        next_observation (torch.Tensor): ``[*B, 11]``.

    Examples:
        >>> from torchrl_depeff.envs.rewards import hopper_reward
        >>> obs = torch.zeros(1, 11); obs[:, 5] = 2.0
        >>> hopper_reward(obs, torch.ones(1, 3), obs)
        tensor([[2.9970]])
    """
    xdot = next_observation[..., HOPPER_XDOT : HOPPER_XDOT + 1]
    return xdot - 1e-3 * _sq_norm(action) + 1.0  # BREMEN Table 3


def walker2d_reward(
    observation: torch.Tensor, action: torch.Tensor, next_observation: torch.Tensor
) -> torch.Tensor:
    r"""Walker2d (Table 3): :math:`r = \dot x - 0.001\lVert a\rVert^2 + 1`.

    Args:
        observation (torch.Tensor): ``[*B, 17]`` (unused).
        action (torch.Tensor): ``[*B, 6]``.
        next_observation (torch.Tensor): ``[*B, 17]``.

    Examples:
        >>> from torchrl_depeff.envs.rewards import walker2d_reward
        >>> obs = torch.zeros(1, 17); obs[:, 8] = 2.0
        >>> walker2d_reward(obs, torch.ones(1, 6), obs)
        tensor([[2.9940]])
    """
    xdot = next_observation[..., WALKER2D_XDOT : WALKER2D_XDOT + 1]
    return xdot - 1e-3 * _sq_norm(action) + 1.0  # BREMEN Table 3


def ant_reward(
    observation: torch.Tensor, action: torch.Tensor, next_observation: torch.Tensor
) -> torch.Tensor:
    r"""Ant (Table 3): :math:`r = \dot x - 0.1\lVert a\rVert^2 - 3(z - 0.57)^2 + 1`.

    Args:
        observation (torch.Tensor): ``[*B, 27]`` (unused; 27-dim obs without contact forces).
        action (torch.Tensor): ``[*B, 8]``.
        next_observation (torch.Tensor): ``[*B, 27]``; ``z = obs[0]``, ``xdot = obs[13]``.

    Examples:
        >>> from torchrl_depeff.envs.rewards import ant_reward
        >>> obs = torch.zeros(1, 27); obs[:, 13] = 1.0; obs[:, 0] = 0.57
        >>> ant_reward(obs, torch.zeros(1, 8), obs)
        tensor([[2.]])
    """
    xdot = next_observation[..., ANT_XDOT : ANT_XDOT + 1]
    z = next_observation[..., 0:1]
    return xdot - 0.1 * _sq_norm(action) - 3.0 * (z - 0.57).pow(2) + 1.0  # BREMEN Table 3


def hopper_termination(
    observation: torch.Tensor,
    action: torch.Tensor,
    next_observation: torch.Tensor,
    healthy_state_range: tuple[float, float] = (-100.0, 100.0),
    healthy_z_range: tuple[float, float] = (0.7, math.inf),
    healthy_angle_range: tuple[float, float] = (-0.2, 0.2),
) -> torch.Tensor:
    """Hopper-v5 termination: ``not is_healthy`` of the next state (strict bounds).

    gymnasium's ``is_healthy``: ``z = qpos[1]`` in ``(0.7, inf)``, ``angle = qpos[2]`` in
    ``(-0.2, 0.2)`` and every entry of ``state_vector()[2:] = (qpos[2:], qvel)`` in
    ``(-100, 100)``, all with strict inequalities (a NaN entry is unhealthy). In the observation
    these are ``obs[0]``, ``obs[1]`` and ``obs[1:]``. Caveat: the observation clips ``qvel`` to
    ``[-10, 10]`` whereas gymnasium checks the unclipped ``qvel``, so a velocity above 100 in
    the simulator cannot be seen here (it never happens in normal play).

    Args:
        observation (torch.Tensor): ``[*B, 11]`` (unused).
        action (torch.Tensor): ``[*B, 3]`` (unused).
        next_observation (torch.Tensor): ``[*B, 11]``.
        healthy_state_range, healthy_z_range, healthy_angle_range: gymnasium's defaults.

    Examples:
        >>> from torchrl_depeff.envs.rewards import hopper_termination
        >>> obs = torch.zeros(2, 11); obs[:, 0] = torch.tensor([1.25, 0.7])
        >>> hopper_termination(obs, torch.zeros(2, 3), obs).squeeze(-1)
        tensor([False,  True])
    """
    z = next_observation[..., 0:1]
    angle = next_observation[..., 1:2]
    state = next_observation[..., 1:]
    healthy_state = ((state > healthy_state_range[0]) & (state < healthy_state_range[1])).all(-1, keepdim=True)
    healthy_z = (z > healthy_z_range[0]) & (z < healthy_z_range[1])
    healthy_angle = (angle > healthy_angle_range[0]) & (angle < healthy_angle_range[1])
    return ~(healthy_state & healthy_z & healthy_angle)


def walker2d_termination(
    observation: torch.Tensor,
    action: torch.Tensor,
    next_observation: torch.Tensor,
    healthy_z_range: tuple[float, float] = (0.8, 2.0),
    healthy_angle_range: tuple[float, float] = (-1.0, 1.0),
) -> torch.Tensor:
    """Walker2d-v5 termination: ``not is_healthy`` of the next state (strict bounds).

    gymnasium's ``is_healthy``: ``z = qpos[1]`` in ``(0.8, 2.0)`` and ``angle = qpos[2]`` in
    ``(-1, 1)``, strict inequalities (no state-range check, unlike Hopper). In the observation
    ``z = obs[0]`` and ``angle = obs[1]``.

    Args:
        observation (torch.Tensor): ``[*B, 17]`` (unused).
        action (torch.Tensor): ``[*B, 6]`` (unused).
        next_observation (torch.Tensor): ``[*B, 17]``.
        healthy_z_range, healthy_angle_range: gymnasium's defaults.

    Examples:
        >>> from torchrl_depeff.envs.rewards import walker2d_termination
        >>> obs = torch.zeros(3, 17); obs[:, 0] = torch.tensor([1.25, 0.8, 2.0])
        >>> walker2d_termination(obs, torch.zeros(3, 6), obs).squeeze(-1)
        tensor([False,  True,  True])
    """
    z = next_observation[..., 0:1]
    angle = next_observation[..., 1:2]
    healthy_z = (z > healthy_z_range[0]) & (z < healthy_z_range[1])
    healthy_angle = (angle > healthy_angle_range[0]) & (angle < healthy_angle_range[1])
    return ~(healthy_z & healthy_angle)


def no_termination(
    observation: torch.Tensor, action: torch.Tensor, next_observation: torch.Tensor
) -> torch.Tensor:
    """Never terminates (HalfCheetah, Ant without termination, goal-reaching tasks).

    Args:
        observation (torch.Tensor): ``[*B, o]`` (unused).
        action (torch.Tensor): ``[*B, a]`` (unused).
        next_observation (torch.Tensor): ``[*B, o]``.

    Examples:
        >>> from torchrl_depeff.envs.rewards import no_termination
        >>> no_termination(torch.zeros(2, 3), torch.zeros(2, 1), torch.zeros(2, 3)).squeeze(-1)
        tensor([False, False])
    """
    return torch.zeros(*next_observation.shape[:-1], 1, dtype=torch.bool, device=next_observation.device)


def goal_reach_reward(
    next_observation: torch.Tensor,
    achieved_slice: slice,
    desired_slice: slice,
    distance_threshold: float,
) -> torch.Tensor:
    """Sparse goal reward of gymnasium-robotics ``compute_reward``: ``-(||ag - g|| > eps)``.

    Args:
        next_observation (torch.Tensor): ``[*B, o]`` flattened observation.
        achieved_slice (slice): location of ``achieved_goal`` in the observation.
        desired_slice (slice): location of ``desired_goal``.
        distance_threshold (float): ``eps`` (FetchReach 0.05, HandReach 0.01).

    Examples:
        >>> from torchrl_depeff.envs.rewards import goal_reach_reward
        >>> obs = torch.tensor([[0.0, 0.0, 0.03, 0.0], [0.0, 0.0, 0.1, 0.0]])
        >>> goal_reach_reward(obs, slice(0, 2), slice(2, 4), 0.05).squeeze(-1)
        tensor([ 0., -1.])
    """
    d = (next_observation[..., achieved_slice] - next_observation[..., desired_slice]).norm(dim=-1, keepdim=True)
    # gymnasium-robotics compute_reward (sparse): -(d > distance_threshold)
    return torch.where(d > distance_threshold, -1.0, 0.0).to(next_observation.dtype)
