"""Collect a behaviour dataset for offline RL (BREMEN App. G.4) in the real env.

The noise variants (:data:`~torchrl_depeff.data.datasets.NOISE_VARIANTS`), the noise modules and
the dataset storage live in :mod:`torchrl_depeff.data.datasets`; this module runs them in the real
env through :func:`~torchrl_depeff.collectors.deployment.collect_deployment` (layering: collectors
use data, never the reverse). Moved from ``torchrl_depeff.data`` (issue 14), where the old name
still works with a ``FutureWarning``.
"""
from __future__ import annotations

from pathlib import Path
from typing import Literal

import torch
from tensordict import TensorDict
from torch import nn
from torchrl.envs import EnvBase

from torchrl_depeff.collectors.deployment import collect_deployment
from torchrl_depeff.data.datasets import (
    _bounds,
    ClippedGaussianAction,
    EpsilonUniformAction,
    NOISE_VARIANTS,
    save_behaviour_dataset,
    UniformRandomAction,
)

__all__ = ["collect_behaviour_dataset"]


def collect_behaviour_dataset(
    policy: nn.Module,
    env: EnvBase,
    num_transitions: int,
    *,
    noise: Literal["eps1", "eps3", "gaussian1", "gaussian3", "random"] | None = None,
    seed: int = 0,
    path: str | Path | None = None,
    frames_per_batch: int | None = None,
) -> TensorDict:
    """Collect a BREMEN App. G.4 behaviour dataset of exactly ``num_transitions`` rows.

    See the module docstring for the paper's definition of each variant and the choices made.

    Args:
        policy (nn.Module): behaviour policy ``pi_b`` (TensorDict module writing ``"action"``).
        env (EnvBase): real env with a bounded ``action_spec``.
        num_transitions (int): dataset size ``N``.

    Keyword Args:
        noise (str | None): ``"eps1"``, ``"eps3"``, ``"gaussian1"``, ``"gaussian3"``, ``"random"``
            or ``None`` (pure ``pi_b``).
        seed (int): seeds env and noise (part ``i`` uses ``seed + i``). Defaults to ``0``.
        path (str | Path, optional): if given, also saved there atomically as a TorchRL buffer
            (:func:`save_behaviour_dataset`).
        frames_per_batch (int, optional): forwarded to the collector.

    Returns:
        TensorDict: ``[N]`` transitions with ``"behaviour_mode"`` (0/1/2, int64).

    Examples:
        >>> from torchrl.envs import GymEnv
        >>> from tensordict.nn import TensorDictModule
        >>> from torchrl_depeff.collectors import collect_behaviour_dataset
        >>> pi_b = TensorDictModule(torch.nn.Linear(3, 1), ["observation"], ["action"])
        >>> td = collect_behaviour_dataset(pi_b, GymEnv("Pendulum-v1"), 25, noise="eps1")
        >>> td.batch_size, td["behaviour_mode"].bincount().tolist()
        (torch.Size([25]), [10, 10, 5])
    """
    if noise not in NOISE_VARIANTS:
        raise ValueError(f"noise must be one of {list(NOISE_VARIANTS)}, got {noise!r}")
    n = int(num_transitions)
    if n < 1:
        raise ValueError(f"num_transitions must be >= 1, got {num_transitions}")
    if not isinstance(env, EnvBase):
        raise TypeError(f"env must be a torchrl EnvBase, got {type(env).__name__}")
    f_b, f_noisy, _, kind, scale = NOISE_VARIANTS[noise]
    n_b = int(round(f_b * n))
    n_noisy = int(round(f_noisy * n))
    sizes = (n_b, n_noisy, n - n_b - n_noisy)
    spec = env.action_spec
    _bounds(spec, torch.zeros(()))  # validate early
    noise_module = None
    if kind == "eps":
        noise_module = EpsilonUniformAction(scale, spec)
    elif kind == "gaussian":
        noise_module = ClippedGaussianAction(scale, spec)
    parts = []
    for mode, size in enumerate(sizes):
        if size == 0:
            continue
        if mode == 2:
            part_policy, exploration = UniformRandomAction(spec), None
        else:
            part_policy, exploration = policy, (noise_module if mode == 1 else None)
        data, _ = collect_deployment(
            part_policy, env, size, exploration=exploration, deployment=0, policy_version=0,
            frames_per_batch=frames_per_batch, seed=int(seed) + mode,
        )
        data.set("behaviour_mode", torch.full((size,), mode, dtype=torch.int64))
        parts.append(data.exclude("deployment", "policy_version"))
    keys = set.intersection(*(set(p.keys(True, True)) for p in parts))
    out = torch.cat([p.select(*keys) for p in parts], 0)
    if path is not None:
        save_behaviour_dataset(out, path, metadata={"noise": noise, "seed": int(seed)})
    return out
