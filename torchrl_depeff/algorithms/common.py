"""Pieces shared by the deployment loops: config checks, start states, the logger factory.

``atomic_save``, ``load_checkpoint`` and ``write_json_atomic`` are re-exported from
:mod:`torchrl_depeff.io`, the package's one atomic writer, and ``episode_start_states`` /
``completed_episode_returns`` from :mod:`torchrl_depeff.data.episodes`, the one episode
segmentation (kept importable from here).
"""
from __future__ import annotations

from pathlib import Path
from typing import Any, Mapping

from torchrl.record.loggers import get_logger

from torchrl_depeff.data.episodes import completed_episode_returns, episode_start_states
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
    saved: Mapping[str, Any], current: Mapping[str, Any], *, ignore: tuple[str, ...] = (),
    defaults: Mapping[str, Any] | None = None,
) -> dict[str, tuple[Any, Any]]:
    """Keys whose values differ between two flat config dicts: ``{key: (saved, current)}``.

    Sequences are compared as lists (a tuple saved and reloaded as a list is the same value).

    Args:
        saved (Mapping): config stored with a run.
        current (Mapping): config of the new invocation.

    Keyword Args:
        ignore (tuple[str, ...]): keys not compared.
        defaults (Mapping, optional): the config class's default values: a key absent from
            ``saved`` (a field added after the run was saved) counts as its default there, what
            the code that saved it did without the field.

    Examples:
        >>> from torchrl_depeff.algorithms.common import config_diff
        >>> config_diff({"a": 1, "b": (2, 3)}, {"a": 2, "b": [2, 3], "c": 0})
        {'a': (1, 2), 'c': (None, 0)}
        >>> config_diff({"a": 1}, {"a": 1, "c": False}, defaults={"a": 0, "c": False})
        {}
        >>> config_diff({"a": 1}, {"a": 1, "c": True}, defaults={"a": 0, "c": False})
        {'c': (False, True)}
    """

    def norm(v: Any) -> Any:
        return list(v) if isinstance(v, (tuple, list)) else v

    defaults = defaults or {}
    out = {}
    for key in sorted(set(saved) | set(current)):
        if key in ignore:
            continue
        a, b = saved.get(key, defaults.get(key)), current.get(key)
        if norm(a) != norm(b):
            out[key] = (a, b)
    return out


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
