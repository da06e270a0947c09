"""Aggregate scores over seeds and tasks: interquartile mean, stratified bootstrap CIs, P(X > Y).

Reliable few-run RL evaluation (Agarwal et al., "Deep Reinforcement Learning at the Edge of the
Statistical Precipice", NeurIPS 2021, the ``rliable`` library) in a few lines of NumPy:

* :func:`iqm`: the interquartile mean of all ``runs x tasks`` scores (the mean of the middle 50 %,
  25 % trimmed on each side, as ``scipy.stats.trim_mean(x, 0.25)`` and rliable's
  ``aggregate_iqm``);
* :func:`interval_estimate`: a point estimate and a percentile confidence interval from a
  *stratified* bootstrap: runs are resampled with replacement within each task (column), as
  rliable's ``get_interval_estimates`` with ``arch``'s ``StratifiedBootstrap``;
* :func:`probability_of_improvement`: the probability that a run of X beats a run of Y on a
  task, averaged over tasks (ties count one half: the Mann-Whitney U statistic over ``n * m``),
  and :func:`poi_interval_estimate`, its CI with X and Y resampled independently per task.

Scores are arrays ``[runs, tasks]`` (a 1-d array is one task). ``test/test_stats.py`` checks the
point estimates against rliable's and the intervals against rliable's up to bootstrap noise.
"""
from __future__ import annotations

from typing import Callable

import numpy as np

__all__ = ["interval_estimate", "iqm", "poi_interval_estimate", "probability_of_improvement", "stratified_bootstrap"]


def _as_scores(scores: np.ndarray | list, name: str = "scores") -> np.ndarray:
    x = np.asarray(scores, dtype=np.float64)
    if x.ndim == 1:
        x = x[:, None]
    if x.ndim != 2 or x.shape[0] < 1 or x.shape[1] < 1:
        raise ValueError(f"{name} must be a non-empty [runs, tasks] array, got shape {list(x.shape)}")
    if not np.isfinite(x).all():
        raise ValueError(f"{name} holds non-finite values: {x[~np.isfinite(x)][:5].tolist()}")
    return x


def iqm(scores: np.ndarray | list) -> float:
    """Interquartile mean of every score (25 % trimmed from each end of the sorted scores).

    Args:
        scores (array): ``[runs, tasks]`` (or ``[runs]``).

    Examples:
        >>> from torchrl_depeff.stats import iqm
        >>> iqm([1.0, 2.0, 3.0, 4.0, 100.0, -50.0, 2.5, 3.5])
        2.75
    """
    x = np.sort(_as_scores(scores).ravel())
    n = x.size
    cut = int(0.25 * n)  # scipy.stats.trim_mean(x, 0.25): int(proportion * n) from each end
    return float(x[cut:n - cut].mean())


def stratified_bootstrap(
    scores: np.ndarray | list,
    statistic: Callable[[np.ndarray], float],
    *,
    reps: int = 2000,
    seed: int = 0,
) -> np.ndarray:
    """``reps`` values of ``statistic`` on stratified resamples (runs resampled within each task).

    Examples:
        >>> import numpy as np
        >>> from torchrl_depeff.stats import iqm, stratified_bootstrap
        >>> draws = stratified_bootstrap(np.arange(10.0), iqm, reps=200, seed=0)
        >>> draws.shape, bool(draws.min() >= 0 and draws.max() <= 9)
        ((200,), True)
    """
    x = _as_scores(scores)
    if not isinstance(reps, int) or reps < 1:
        raise ValueError(f"reps must be an int >= 1, got {reps!r}")
    runs, tasks = x.shape
    rng = np.random.default_rng(seed)
    idx = rng.integers(0, runs, size=(reps, runs, tasks))  # per task, an independent resample of runs
    resampled = np.take_along_axis(np.broadcast_to(x, (reps, runs, tasks)), idx, axis=1)
    return np.array([statistic(r) for r in resampled])


def interval_estimate(
    scores: np.ndarray | list,
    statistic: Callable[[np.ndarray], float] = iqm,
    *,
    reps: int = 2000,
    confidence: float = 0.95,
    seed: int = 0,
) -> tuple[float, float, float]:
    """``(point, low, high)``: ``statistic(scores)`` and its percentile stratified-bootstrap CI.

    Examples:
        >>> from torchrl_depeff.stats import interval_estimate
        >>> point, low, high = interval_estimate([[1.0], [2.0], [3.0], [4.0], [5.0]], reps=500)
        >>> point, low <= point <= high
        (3.0, True)
    """
    if not 0.0 < confidence < 1.0:
        raise ValueError(f"confidence must be in (0, 1), got {confidence!r}")
    draws = stratified_bootstrap(scores, statistic, reps=reps, seed=seed)
    alpha = (1.0 - confidence) / 2
    low, high = np.percentile(draws, [100 * alpha, 100 * (1 - alpha)])
    return float(statistic(_as_scores(scores))), float(low), float(high)


def probability_of_improvement(x: np.ndarray | list, y: np.ndarray | list) -> float:
    """``P(X > Y)`` per task (ties count 1/2), averaged over tasks (Agarwal et al. 2021, sec. 4.3).

    Args:
        x (array): ``[runs_x, tasks]`` scores of algorithm X.
        y (array): ``[runs_y, tasks]`` scores of algorithm Y (same tasks).

    Examples:
        >>> from torchrl_depeff.stats import probability_of_improvement
        >>> probability_of_improvement([3.0, 4.0], [1.0, 3.0])
        0.875
    """
    a, b = _as_scores(x, "x"), _as_scores(y, "y")
    if a.shape[1] != b.shape[1]:
        raise ValueError(f"x and y must have the same tasks, got {a.shape[1]} and {b.shape[1]} columns")
    greater = (a[:, None, :] > b[None, :, :]).mean(axis=(0, 1))
    ties = (a[:, None, :] == b[None, :, :]).mean(axis=(0, 1))
    return float((greater + 0.5 * ties).mean())


def poi_interval_estimate(
    x: np.ndarray | list, y: np.ndarray | list, *, reps: int = 2000, confidence: float = 0.95, seed: int = 0
) -> tuple[float, float, float]:
    """``(point, low, high)`` of :func:`probability_of_improvement`; X and Y resampled independently per task.

    Examples:
        >>> from torchrl_depeff.stats import poi_interval_estimate
        >>> point, low, high = poi_interval_estimate([5.0, 6.0, 7.0], [1.0, 2.0, 3.0], reps=200)
        >>> point, low, high
        (1.0, 1.0, 1.0)
    """
    a, b = _as_scores(x, "x"), _as_scores(y, "y")
    if not 0.0 < confidence < 1.0:
        raise ValueError(f"confidence must be in (0, 1), got {confidence!r}")
    rng = np.random.default_rng(seed)
    draws = np.empty(reps)
    for r in range(reps):  # bootstrap replicates (not samples): each one vectorised
        ia = rng.integers(0, a.shape[0], size=a.shape)
        ib = rng.integers(0, b.shape[0], size=b.shape)
        draws[r] = probability_of_improvement(np.take_along_axis(a, ia, 0), np.take_along_axis(b, ib, 0))
    alpha = (1.0 - confidence) / 2
    low, high = np.percentile(draws, [100 * alpha, 100 * (1 - alpha)])
    return probability_of_improvement(a, b), float(low), float(high)
