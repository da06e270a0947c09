"""One episode segmentation for the whole package: episode ids, start states, returns, windows.

Transitions ``[N]`` come either from TorchRL collectors, whose rows carry
``("collector", "traj_ids")`` (trajectory ids, restarting in every deployment, so they are
combined with ``"deployment"`` when present; rows of one trajectory may be interleaved with
other trajectories' rows, e.g. from a batched env, but are in time order among themselves), or
from offline datasets without ids, whose rows are taken to be in time order: an episode ends at
each ``("next", "done")`` row and the next row starts a new one.

:func:`episode_index` maps every row to its episode (``0..E-1``, in the order of the sorted
``(deployment, traj_id)`` pairs, or of time without ids); :func:`episode_start_states`,
:func:`completed_episode_returns` and :func:`trajectory_windows` are built on it, vectorised (no
Python loop over rows or episodes). Used by the deployment loop (BREMEN Alg. 1 imaginary rollouts
start from real start states; the real return of each deployment) and by the MUSBO sec. 5
analysis (open-loop windows, Fig. 6).
"""
from __future__ import annotations

import torch
from tensordict import TensorDict, TensorDictBase

__all__ = [
    "completed_episode_returns",
    "episode_index",
    "episode_start_states",
    "trajectory_windows",
]

TRAJ_KEY = ("collector", "traj_ids")
DONE_KEY = ("next", "done")


def _flat(data: TensorDictBase) -> TensorDictBase:
    if not isinstance(data, TensorDictBase):
        raise TypeError(f"data must be a TensorDictBase, got {type(data).__name__}")
    if data.batch_dims == 1:
        return data
    # flatten (not reshape(-1), which fails on an empty batch in tensordict)
    return data.reshape(-1) if data.batch_dims == 0 else data.flatten(0, -1)


def episode_index(data: TensorDictBase) -> torch.Tensor:
    """The episode of every row: a ``LongTensor [N]`` with values ``0..E-1``.

    With ``("collector", "traj_ids")``: one episode per distinct ``(deployment, traj_id)`` pair
    (``traj_id`` alone without ``"deployment"``), numbered in sorted pair order. Without ids: rows
    are in time order, row 0 starts episode 0 and every row following a ``("next", "done")`` row
    starts the next episode.

    Args:
        data (TensorDictBase): transitions (any batch shape, flattened to ``[N]``).

    Raises:
        KeyError: ``data`` has neither ``("collector", "traj_ids")`` nor ``("next", "done")``.

    Examples:
        >>> from tensordict import TensorDict
        >>> from torchrl_depeff.data.episodes import episode_index
        >>> done = torch.tensor([False, True, False, False, True, False]).unsqueeze(-1)
        >>> episode_index(TensorDict({("next", "done"): done}, [6])).tolist()
        [0, 0, 1, 1, 1, 2]
        >>> ids = torch.tensor([3, 5, 3, 5, 0, 0])
        >>> dep = torch.tensor([0, 0, 0, 0, 1, 1])
        >>> episode_index(TensorDict({("collector", "traj_ids"): ids, "deployment": dep}, [6])).tolist()
        [0, 1, 0, 1, 2, 2]
    """
    data = _flat(data)
    n = data.shape[0]
    traj = data.get(TRAJ_KEY, None)
    if traj is not None:
        ids = traj.reshape(n).long()
        dep = data.get("deployment", None)
        if dep is None:
            _, inverse = torch.unique(ids, return_inverse=True)
        else:
            key = torch.stack([dep.reshape(n).long(), ids], -1)
            _, inverse = torch.unique(key, dim=0, return_inverse=True)
        return inverse.reshape(n)
    if DONE_KEY not in data.keys(include_nested=True):
        raise KeyError(
            f"cannot segment episodes: data has neither {TRAJ_KEY} nor {DONE_KEY} "
            f"(keys: {sorted(map(str, data.keys(True, True)))})"
        )
    done = data.get(DONE_KEY).reshape(n).long()
    return torch.cat([done.new_zeros(min(n, 1)), done[:-1].cumsum(0)])


def _first_rows(episode: torch.Tensor) -> torch.Tensor:
    """Row of the first transition of every episode, in increasing row order."""
    n = episode.shape[0]
    positions = torch.arange(n, device=episode.device)
    first = torch.full((int(episode.max()) + 1,), n, dtype=torch.long, device=episode.device)
    first = first.scatter_reduce(0, episode, positions, reduce="amin")
    return first.sort().values


def episode_start_states(data: TensorDictBase) -> TensorDict:
    """The first observation of every episode in ``data`` (see :func:`episode_index`).

    Args:
        data (TensorDictBase): transitions with ``"observation"``.

    Returns:
        TensorDict: ``{"observation": [S, o]}`` with batch ``[S]``, in the order the episodes
        start in ``data``.

    Raises:
        ValueError: ``data`` is empty.

    Examples:
        >>> from tensordict import TensorDict
        >>> from torchrl_depeff.data.episodes import episode_start_states
        >>> done = torch.tensor([False, True, False, False, True, False]).unsqueeze(-1)
        >>> td = TensorDict({"observation": torch.arange(6.0).unsqueeze(-1),
        ...                  ("next", "done"): done}, [6])
        >>> episode_start_states(td)["observation"].squeeze(-1).tolist()
        [0.0, 2.0, 5.0]
    """
    data = _flat(data)
    if data.shape[0] == 0:
        raise ValueError("cannot take episode start states from empty data")
    if "observation" not in data.keys():
        raise KeyError(f"data has no 'observation' (keys: {sorted(map(str, data.keys(True, True)))})")
    first = _first_rows(episode_index(data))
    return TensorDict({"observation": data.get("observation")[first]}, batch_size=[first.numel()])


def completed_episode_returns(data: TensorDictBase) -> torch.Tensor:
    """Undiscounted returns of the episodes that end (a ``("next", "done")`` row) inside ``data``.

    Episodes cut by the end of the data (no ``done`` yet) are left out.

    Args:
        data (TensorDictBase): transitions with ``("next", "reward")`` and ``("next", "done")``.

    Returns:
        torch.Tensor: ``[E_done]`` returns, in :func:`episode_index` order (empty for empty data).

    Examples:
        >>> from tensordict import TensorDict
        >>> from torchrl_depeff.data.episodes import completed_episode_returns
        >>> td = TensorDict({("next", "reward"): torch.tensor([1.0, 2.0, 3.0, 4.0, 5.0]).unsqueeze(-1),
        ...                  ("next", "done"): torch.tensor([0, 1, 0, 1, 0]).bool().unsqueeze(-1)}, [5])
        >>> completed_episode_returns(td).tolist()
        [3.0, 7.0]
    """
    data = _flat(data)
    for key in (("next", "reward"), DONE_KEY):
        if key not in data.keys(include_nested=True):
            raise KeyError(f"completed_episode_returns needs {key}, missing from data")
    reward = data.get(("next", "reward")).reshape(-1)
    done = data.get(DONE_KEY).reshape(-1)
    if reward.shape[0] != data.shape[0]:
        raise ValueError(f"('next', 'reward') must hold one value per row, got shape {list(reward.shape)}")
    if data.shape[0] == 0:
        return reward.new_zeros(0)
    episode = episode_index(data)
    count = int(episode.max()) + 1
    sums = torch.zeros(count, dtype=reward.dtype, device=reward.device).index_add_(0, episode, reward)
    ended = torch.zeros(count, dtype=torch.long, device=reward.device).index_add_(0, episode, done.long()) > 0
    return sums[ended]


def trajectory_windows(
    data: TensorDictBase,
    horizon: int,
    max_windows: int,
    generator: torch.Generator | None = None,
) -> TensorDictBase | None:
    """Up to ``max_windows`` random non-overlapping windows of ``horizon`` consecutive steps of one episode.

    Each episode is cut into consecutive windows from its first row (steps ``0..h-1``,
    ``h..2h-1``, ...; a shorter tail is dropped); ``max_windows`` of all the windows are drawn
    without replacement with one ``torch.randperm(num_windows, generator=generator)``.

    Args:
        data (TensorDictBase): transitions ``[N]`` (see :func:`episode_index`).
        horizon (int): steps per window, ``>= 1``.
        max_windows (int): how many windows at most, ``>= 1``.
        generator (torch.Generator, optional): RNG of the draw.

    Returns:
        TensorDictBase | None: ``[n, horizon]`` (time along dim 1), or ``None`` when no episode
        has ``horizon`` steps.

    Examples:
        >>> from tensordict import TensorDict
        >>> from torchrl_depeff.data.episodes import trajectory_windows
        >>> ids = torch.tensor([0, 1] * 6)  # two interleaved trajectories of 6 steps
        >>> td = TensorDict({"observation": torch.arange(12.0), ("collector", "traj_ids"): ids}, [12])
        >>> w = trajectory_windows(td, 3, 10, torch.Generator().manual_seed(0))
        >>> w.batch_size, sorted(w["observation"].tolist())
        (torch.Size([4, 3]), [[0.0, 2.0, 4.0], [1.0, 3.0, 5.0], [6.0, 8.0, 10.0], [7.0, 9.0, 11.0]])
        >>> trajectory_windows(td, 7, 10) is None
        True
    """
    if isinstance(horizon, bool) or not isinstance(horizon, int) or horizon < 1:
        raise ValueError(f"horizon must be an int >= 1, got {horizon!r}")
    if isinstance(max_windows, bool) or not isinstance(max_windows, int) or max_windows < 1:
        raise ValueError(f"max_windows must be an int >= 1, got {max_windows!r}")
    data = _flat(data)
    n = data.shape[0]
    if n == 0:
        return None
    episode = episode_index(data).cpu()
    order = torch.sort(episode, stable=True).indices  # rows grouped by episode, time order kept
    sorted_ids = episode[order]
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
