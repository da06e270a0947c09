"""Policies read back from checkpoints (datasets from partially trained behaviour policies)."""
from __future__ import annotations

import warnings
from pathlib import Path

import torch
from tensordict.nn import TensorDictModule, TensorDictSequential
from torch import nn

from torchrl_depeff.algorithms.bremen import BREMENConfig
from torchrl_depeff.algorithms.musbo import MUSBOConfig
from torchrl_depeff.envs.tasks import get_task, make_env

__all__ = ["load_policy"]


class _ClipAction(nn.Module):
    """``action -> clamp(action, low, high)``: the action the real env executes (MuJoCo clips)."""

    def __init__(self, low: torch.Tensor, high: torch.Tensor) -> None:
        super().__init__()
        self.register_buffer("low", low.clone())
        self.register_buffer("high", high.clone())

    def forward(self, action: torch.Tensor) -> torch.Tensor:
        return torch.clamp(action, self.low, self.high)


def load_policy(path: str | Path, *, task: str | None = None, clip: bool = True) -> nn.Module:
    """The policy of a BREMEN (or MUSBO) checkpoint, rebuilt as :class:`BREMEN` builds it.

    Used to generate datasets with a *partially trained* behaviour policy (BREMEN App. G.4, MB2PO's
    D4RL-like datasets). Reads checkpoints of this version (``config`` + ``actor``) and of
    torchrl_depeff 0.1 (flat config keys). Choice: with ``clip`` the noisy action is clamped to the
    action bounds, the action the real env executes (BREMEN deploys it unclipped and MuJoCo clips
    it), so datasets never store actions outside the bounds. Sampling follows the exploration type
    (random by default, as BREMEN deploys it).

    Args:
        path (str | Path): checkpoint file (``torch.load(..., weights_only=True)``).

    Keyword Args:
        task (str, optional): the task the policy will act in; its gym env and sizes must match
            the checkpoint's. Defaults to the checkpoint's task.
        clip (bool): clamp actions to the task's bounds. Defaults to ``True``.

    Raises:
        FileNotFoundError: no file at ``path``. ValueError: not a BREMEN checkpoint, or a policy of
        another gym env / observation / action size than ``task``.

    Examples:
        >>> import tempfile, os
        >>> from tensordict import TensorDict
        >>> from torchrl_depeff.algorithms.checkpoints import load_policy
        >>> from torchrl_depeff.algorithms.bremen import BREMENConfig
        >>> cfg = BREMENConfig().override({"policy.num_cells": (8,)})
        >>> path = os.path.join(tempfile.mkdtemp(), "ckpt.pt")
        >>> torch.save({"config": cfg.to_dict(), "actor": cfg.make_actor().state_dict()}, path)
        >>> pi = load_policy(path)
        >>> td = pi(TensorDict(observation=torch.randn(4, 17), batch_size=[4]))
        >>> td["action"].shape, bool(td["action"].abs().max() <= 1)
        (torch.Size([4, 6]), True)
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"behaviour policy checkpoint {str(path)!r} does not exist")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # noqa: BLE001 - any unreadable file gets the same clear message
        raise ValueError(f"{path}: not a torch file loadable with weights_only=True ({err})") from err
    if not isinstance(state, dict) or "config" not in state or "actor" not in state:
        keys = sorted(state)[:8] if isinstance(state, dict) else type(state).__name__
        raise ValueError(f"{path}: not a BREMEN checkpoint (expected 'config' and 'actor' entries), got {keys}")
    cls: type[BREMENConfig] = MUSBOConfig if state.get("algorithm") == "MUSBO" else BREMENConfig
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", FutureWarning)  # flat configs of torchrl_depeff 0.1
            cfg = cls.from_dict(dict(state["config"]))
    except (KeyError, TypeError, ValueError) as err:
        raise ValueError(f"{path}: 'config' is not a valid {cls.__name__} ({err})") from err
    target = get_task(task or cfg.task)
    saved = get_task(cfg.task)
    sizes = lambda t: (t.gym_id, t.observation_dim, t.action_dim)  # noqa: E731
    if sizes(saved) != sizes(target):
        raise ValueError(
            f"{path}: BREMEN policy of task {cfg.task!r} ({saved.gym_id}, observation {saved.observation_dim}, "
            f"action {saved.action_dim}) cannot act in task {target.name!r} ({target.gym_id}, observation "
            f"{target.observation_dim}, action {target.action_dim})"
        )
    actor = cfg.make_actor()
    try:
        actor.load_state_dict(state["actor"])
    except RuntimeError as err:
        raise ValueError(f"{path}: 'actor' does not match its config ({err})") from err
    if not clip:
        return actor
    spec = make_env(target.name).action_spec
    clamp = TensorDictModule(_ClipAction(spec.space.low, spec.space.high), in_keys=["action"], out_keys=["action"])
    return TensorDictSequential(actor, clamp)
