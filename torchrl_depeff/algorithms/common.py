"""Pieces shared by the deployment loops: config checks, start states, the logger factory.

``atomic_save``, ``load_checkpoint`` and ``write_json_atomic`` are re-exported from
:mod:`torchrl_depeff.io`, the package's one atomic writer (kept importable from here).
"""
from __future__ import annotations

from pathlib import Path
from typing import Any, Mapping

import torch
from tensordict import TensorDict, TensorDictBase
from torchrl.record.loggers import get_logger

from torchrl_depeff.io import atomic_save, load_checkpoint, write_json_atomic

__all__ = [
    "atomic_save",
    "completed_episode_returns",
    "config_diff",
    "episode_start_states",
    "load_checkpoint",
    "make_logger",
    "write_json_atomic",
]


def config_diff(
    saved: Mapping[str, Any], current: Mapping[str, Any], *, ignore: tuple[str, ...] = ()
) -> dict[str, tuple[Any, Any]]:
    """Keys whose values differ between two flat config dicts: ``{key: (saved, current)}``.

    Sequences are compared as lists (a tuple saved and reloaded as a list is the same value).

    Args:
        saved (Mapping): config stored with a run.
        current (Mapping): config of the new invocation.

    Keyword Args:
        ignore (tuple[str, ...]): keys not compared.

    Examples:
        >>> from torchrl_depeff.algorithms.common import config_diff
        >>> config_diff({"a": 1, "b": (2, 3)}, {"a": 2, "b": [2, 3], "c": 0})
        {'a': (1, 2), 'c': (None, 0)}
    """

    def norm(v: Any) -> Any:
        return list(v) if isinstance(v, (tuple, list)) else v

    out = {}
    for key in sorted(set(saved) | set(current)):
        if key in ignore:
            continue
        a, b = saved.get(key), current.get(key)
        if norm(a) != norm(b):
            out[key] = (a, b)
    return out


def episode_start_states(data: TensorDictBase) -> TensorDict:
    """The first observation of every episode recorded in ``data`` (``[N]`` transitions).

    Episodes are identified by ``("collector", "traj_ids")`` (written by TorchRL collectors),
    together with ``"deployment"`` when present (trajectory ids restart in every deployment); a
    trajectory's first row is its start. Without trajectory ids (e.g. an offline dataset), row
    0 and every row that follows a ``("next", "done")`` row are starts, which assumes the rows
    are in time order.

    Args:
        data (TensorDictBase): transitions with ``"observation"``.

    Returns:
        TensorDict: ``{"observation": [S, o]}`` with batch ``[S]``.

    Examples:
        >>> from tensordict import TensorDict
        >>> from torchrl_depeff.algorithms.common import episode_start_states
        >>> done = torch.tensor([False, True, False, False, True, False]).unsqueeze(-1)
        >>> td = TensorDict({"observation": torch.arange(6.0).unsqueeze(-1),
        ...                  ("next", "done"): done}, [6])
        >>> episode_start_states(td)["observation"].squeeze(-1).tolist()
        [0.0, 2.0, 5.0]
    """
    data = data.reshape(-1)
    n = data.shape[0]
    if n == 0:
        raise ValueError("cannot take episode start states from empty data")
    obs = data.get("observation")
    traj = data.get(("collector", "traj_ids"), None)
    if traj is not None:
        ids = traj.reshape(n).long()
        dep = data.get("deployment", None)
        key = torch.stack([dep.reshape(n).long(), ids], -1) if dep is not None else ids.unsqueeze(-1)
        _, inverse = torch.unique(key, dim=0, return_inverse=True)
        positions = torch.arange(n, device=obs.device)
        first = torch.full((int(inverse.max()) + 1,), n, dtype=torch.long, device=obs.device)
        first = first.scatter_reduce(0, inverse, positions, reduce="amin")
        first = first.sort().values
    else:
        if ("next", "done") not in data.keys(include_nested=True):
            raise KeyError("data has neither ('collector', 'traj_ids') nor ('next', 'done')")
        done = data.get(("next", "done")).reshape(n)
        start = torch.zeros(n, dtype=torch.bool, device=obs.device)
        start[0] = True
        start[1:] = done[:-1]
        first = start.nonzero().squeeze(-1)
    return TensorDict({"observation": obs[first]}, batch_size=[first.numel()])


def completed_episode_returns(data: TensorDictBase) -> torch.Tensor:
    """Undiscounted returns of the episodes that end (``("next", "done")``) inside ``data``.

    Episodes are grouped by ``("collector", "traj_ids")`` when present (collector output, any row
    order), otherwise the rows must be in time order and an episode ends at each ``done``.

    Examples:
        >>> from tensordict import TensorDict
        >>> from torchrl_depeff.algorithms.common import completed_episode_returns
        >>> td = TensorDict({("next", "reward"): torch.tensor([1.0, 2.0, 3.0, 4.0, 5.0]).unsqueeze(-1),
        ...                  ("next", "done"): torch.tensor([0, 1, 0, 1, 0]).bool().unsqueeze(-1)}, [5])
        >>> completed_episode_returns(td).tolist()
        [3.0, 7.0]
    """
    data = data.reshape(-1)
    done = data.get(("next", "done")).reshape(-1)
    reward = data.get(("next", "reward")).reshape(-1)
    traj = data.get(("collector", "traj_ids"), None)
    if traj is None:
        episode = torch.cat([done.new_zeros(1, dtype=torch.long), done[:-1].long().cumsum(0)])
    else:
        _, episode = torch.unique(traj.reshape(-1), return_inverse=True)
    n = int(episode.max()) + 1
    sums = torch.zeros(n, dtype=reward.dtype).index_add_(0, episode, reward)
    ended = torch.zeros(n, dtype=torch.long).index_add_(0, episode, done.long()) > 0
    return sums[ended]


LOGGER_BACKENDS: tuple[str, ...] = ("csv", "tensorboard", "wandb", "mlflow", "none")


def make_logger(backend: str, run_dir: str | Path, name: str, *, project: str | None = None) -> Any:
    """TorchRL's logger of ``backend`` writing under ``run_dir/logs/<name>`` (``None`` for ``"none"``).

    The one logger factory of the package's examples and benchmarks: TorchRL's
    :func:`~torchrl.record.loggers.get_logger` with the run layout (``logs/<algorithm>/``).

    Args:
        backend (str): ``"csv"``, ``"tensorboard"``, ``"wandb"``, ``"mlflow"`` or ``"none"``.
        run_dir (str | Path): the run's output directory.
        name (str): experiment name (the algorithm: ``"bremen"``, ``"musbo"``, ``"mb2po"``).

    Keyword Args:
        project (str, optional): wandb project.

    Examples:
        >>> import tempfile
        >>> from torchrl_depeff.algorithms.common import make_logger
        >>> logger = make_logger("csv", tempfile.mkdtemp(), "bremen")
        >>> logger.log_scalar("eval/return_mean", 1.0, step=0)
        >>> make_logger("none", "unused", "bremen") is None
        True
    """
    if backend not in LOGGER_BACKENDS:
        raise ValueError(f"logger backend must be one of {list(LOGGER_BACKENDS)}, got {backend!r}")
    if backend == "none":
        return None
    kwargs = {"wandb_kwargs": {"project": project}} if backend == "wandb" and project else {}
    return get_logger(backend, logger_name=str(Path(run_dir) / "logs"), experiment_name=name, **kwargs)
