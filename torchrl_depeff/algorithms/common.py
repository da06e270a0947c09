"""Pieces shared by the deployment loops: atomic checkpoints, config checks, start states.

Checkpoints are plain nested dicts of tensors, numbers, strings, lists and dicts, so that
``torch.load(path, weights_only=True)`` loads them (no pickled Python objects). They are written
to a temporary file in the same directory, flushed to disk and renamed over the target
(``os.replace`` is atomic on POSIX): a crash leaves either the previous checkpoint or the new
one, never a truncated file.
"""
from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path
from typing import Any, Mapping

import torch
from tensordict import TensorDict, TensorDictBase
from torchrl.record.loggers import get_logger

__all__ = [
    "atomic_save",
    "completed_episode_returns",
    "config_diff",
    "episode_start_states",
    "load_checkpoint",
    "make_logger",
    "write_json_atomic",
]


def atomic_save(obj: Any, path: str | Path) -> Path:
    """``torch.save(obj)`` to ``path`` atomically (temp file, fsync, ``os.replace``).

    Args:
        obj: object to save; keep it ``weights_only``-loadable (tensors, containers, numbers, str).
        path (str | Path): destination file; its directory is created if needed.

    Returns:
        Path: the destination.

    Examples:
        >>> import tempfile, os
        >>> from torchrl_depeff.algorithms.common import atomic_save, load_checkpoint
        >>> path = os.path.join(tempfile.mkdtemp(), "ckpt.pt")
        >>> _ = atomic_save({"w": torch.ones(2), "step": 3}, path)
        >>> load_checkpoint(path)["step"]
        3
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            torch.save(obj, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
    dir_fd = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(dir_fd)  # make the rename itself durable
    finally:
        os.close(dir_fd)
    return path


def load_checkpoint(path: str | Path) -> dict[str, Any]:
    """Load a checkpoint written by :func:`atomic_save` with ``weights_only=True`` on CPU.

    Args:
        path (str | Path): checkpoint file.

    Examples:
        >>> import tempfile, os
        >>> from torchrl_depeff.algorithms.common import atomic_save, load_checkpoint
        >>> path = os.path.join(tempfile.mkdtemp(), "c.pt")
        >>> _ = atomic_save({"a": [1, 2]}, path)
        >>> load_checkpoint(path)
        {'a': [1, 2]}
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"no checkpoint at {path}")
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # noqa: BLE001 - truncated, zero-byte or corrupted files
        raise ValueError(
            f"checkpoint {path} ({path.stat().st_size} bytes) is damaged and cannot be loaded "
            f"({type(err).__name__}: {err}); remove it to restart from the deployments on disk"
        ) from err


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


def write_json_atomic(obj: Any, path: str | Path) -> Path:
    """Write ``obj`` as JSON to ``path`` through a temp file + fsync + ``os.replace`` (NaN allowed).

    Examples:
        >>> import tempfile, os, json
        >>> from torchrl_depeff.algorithms.common import write_json_atomic
        >>> path = write_json_atomic([{"a": float("nan")}], os.path.join(tempfile.mkdtemp(), "m.json"))
        >>> json.loads(path.read_text())[0]["a"] != json.loads(path.read_text())[0]["a"]  # NaN
        True
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "w") as f:
            json.dump(obj, f, indent=1, allow_nan=True)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
    return path


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
