"""D4RL normalised scores (Fu et al. 2020), the metric of MB2PO Table 1.

``score = 100 * (R - R_random) / (R_expert - R_random)``: 0 is a uniform random policy, 100 a fully
trained SAC policy (MB2PO Table 1 caption). The reference returns are D4RL's
``d4rl/infos.py`` ``REF_MIN_SCORE`` / ``REF_MAX_SCORE`` of the Gym-MuJoCo tasks; they are the same
for every dataset of a robot (random, medium, medium-replay = "mixed", medium-expert, expert) and
every dataset version (v0, v1, v2), so they are keyed here by robot only.
"""
from __future__ import annotations

import torch

__all__ = ["REF_MIN_SCORE", "REF_MAX_SCORE", "d4rl_reference_returns", "d4rl_normalized_score"]

#: undiscounted episode return of a uniform random policy (d4rl ``infos.REF_MIN_SCORE``)
REF_MIN_SCORE: dict[str, float] = {
    "halfcheetah": -280.178953,
    "hopper": -20.272305,
    "walker2d": 1.629008,
}
#: undiscounted episode return of a fully trained SAC policy (d4rl ``infos.REF_MAX_SCORE``)
REF_MAX_SCORE: dict[str, float] = {
    "halfcheetah": 12135.0,
    "hopper": 3234.3,
    "walker2d": 4592.3,
}


def d4rl_reference_returns(task: str) -> tuple[float, float]:
    """``(min, max)`` reference returns of a task.

    Args:
        task (str): a robot (``"halfcheetah"``, ``"hopper"``, ``"walker2d"``) or a dataset name
            starting with one (``"hopper-medium-v2"``, ``"walker2d-mixed"``), case-insensitive.

    Examples:
        >>> from torchrl_depeff.data.scores import d4rl_reference_returns
        >>> d4rl_reference_returns("hopper-medium-expert-v2")
        (-20.272305, 3234.3)
    """
    if not isinstance(task, str):
        raise TypeError(f"task must be a str, got {type(task).__name__}")
    robot = task.lower().split("-")[0]
    if robot not in REF_MIN_SCORE:
        raise ValueError(
            f"no D4RL reference returns for task {task!r}; known robots: {sorted(REF_MIN_SCORE)}"
        )
    return REF_MIN_SCORE[robot], REF_MAX_SCORE[robot]


def d4rl_normalized_score(task: str, returns: float | torch.Tensor) -> float | torch.Tensor:
    """D4RL normalised score ``100 * (R - min) / (max - min)``.

    Args:
        task (str): see :func:`d4rl_reference_returns`.
        returns (float or torch.Tensor): undiscounted episode return(s) ``R``; a tensor is
            normalised element-wise and a tensor is returned.

    Examples:
        >>> from torchrl_depeff.data.scores import d4rl_normalized_score
        >>> d4rl_normalized_score("halfcheetah", -280.178953)
        0.0
        >>> round(d4rl_normalized_score("walker2d-medium-v2", 4592.3), 6)
        100.0
        >>> d4rl_normalized_score("hopper", torch.tensor([-20.272305, 3234.3]))
        tensor([  0., 100.])
    """
    low, high = d4rl_reference_returns(task)
    if isinstance(returns, torch.Tensor):
        if not returns.is_floating_point():
            returns = returns.to(torch.get_default_dtype())
        return 100.0 * (returns - low) / (high - low)
    return 100.0 * (float(returns) - low) / (high - low)
