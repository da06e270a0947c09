"""Plots of per-deployment metrics read back from TorchRL ``CSVLogger`` directories.

``CSVLogger(exp_name, log_dir)`` writes every scalar ``name`` to
``<log_dir>/<exp_name>/scalars/<name>.csv``, one ``step,value`` line per call, no header (a
``/`` in the name makes a sub-folder). :func:`plot_metrics` draws one panel per metric with one
line per run, e.g. BREMEN and MUSBO side by side (MUSBO Fig. 6 / Table 1), skipping runs that
did not log a metric.
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Mapping, Sequence

from torchrl._utils import logger as torchrl_logger

from torchrl_depeff.metrics import METRIC_NAMES

__all__ = ["read_scalar_csv", "plot_metrics"]


def read_scalar_csv(run_dir: str | os.PathLike[str], name: str) -> tuple[list[float], list[float]]:
    """Read scalar ``name`` of a CSVLogger experiment directory.

    A run that was resumed appends to the file, so a step may appear more than once: the last
    value written for a step wins. Steps are returned sorted.

    Args:
        run_dir (str or PathLike): ``<log_dir>/<exp_name>``.
        name (str): scalar name as logged (``"metrics/novelty"``).

    Returns:
        ``(steps, values)``; both empty if the file does not exist.

    Examples:
        >>> import tempfile
        >>> from torchrl.record.loggers import CSVLogger
        >>> from torchrl_depeff.metrics_plots import read_scalar_csv
        >>> tmp = tempfile.mkdtemp()
        >>> logger = CSVLogger("musbo", log_dir=tmp)
        >>> for k, v in enumerate([0.99, 0.95]):
        ...     logger.log_scalar("metrics/novelty", v, step=k + 1)
        >>> read_scalar_csv(f"{tmp}/musbo", "metrics/novelty")
        ([1.0, 2.0], [0.99, 0.95])
    """
    path = Path(run_dir) / "scalars" / f"{name}.csv"
    if not path.is_file():
        return [], []
    by_step: dict[float, float] = {}
    with open(path) as f:
        for lineno, line in enumerate(f, 1):
            line = line.strip()
            if not line:
                continue
            parts = line.split(",")
            if len(parts) != 2:
                raise ValueError(f"{path}:{lineno}: expected 'step,value', got {line!r}")
            by_step[float(parts[0])] = float(parts[1])
    steps = sorted(by_step)
    return steps, [by_step[s] for s in steps]


def plot_metrics(
    runs: Mapping[str, str | os.PathLike[str]],
    out_path: str | os.PathLike[str],
    metrics: Sequence[str] | None = None,
    *,
    xlabel: str = "deployment",
) -> Path:
    """One panel per metric across deployments, one line per run (matplotlib, Agg backend).

    Args:
        runs (Mapping[str, PathLike]): label -> CSVLogger run directory ``<log_dir>/<exp_name>``,
            e.g. ``{"BREMEN": ..., "MUSBO": ...}``. Missing directories or metrics are skipped
            (logged at info level).
        out_path (str or PathLike): image file to write (format from the suffix).
        metrics (sequence of str, optional): scalar names. Defaults to the values of
            :data:`torchrl_depeff.metrics.METRIC_NAMES`.

    Keyword Args:
        xlabel (str): x-axis label. Defaults to ``"deployment"``.

    Returns:
        the written path.

    Raises:
        FileNotFoundError: if no run holds any of the metrics.

    Examples:
        >>> import tempfile
        >>> from torchrl.record.loggers import CSVLogger
        >>> from torchrl_depeff.metrics_plots import plot_metrics
        >>> tmp = tempfile.mkdtemp()
        >>> for algo, base in (("bremen", 0.9), ("musbo", 0.8)):
        ...     logger = CSVLogger(algo, log_dir=tmp)
        ...     for k in range(2, 5):
        ...         logger.log_scalar("metrics/novelty", base + 0.01 * k, step=k)
        >>> runs = {"BREMEN": f"{tmp}/bremen", "MUSBO": f"{tmp}/musbo"}
        >>> path = plot_metrics(runs, f"{tmp}/m.png", ["metrics/novelty"])
        >>> path.is_file()
        True
    """
    import matplotlib

    matplotlib.use("Agg")
    from matplotlib import pyplot as plt

    if not runs:
        raise ValueError("runs is empty: give at least one label -> run directory")
    names = list(METRIC_NAMES.values()) if metrics is None else list(metrics)
    if not names:
        raise ValueError("metrics is empty")
    series: dict[str, dict[str, tuple[list[float], list[float]]]] = {}
    for name in names:
        for label, run_dir in runs.items():
            steps, values = read_scalar_csv(run_dir, name)
            if steps:
                series.setdefault(name, {})[label] = (steps, values)
            else:
                torchrl_logger.info(f"plot_metrics: no {name!r} in run {label!r} ({run_dir})")
    if not series:
        raise FileNotFoundError(
            f"none of the metrics {names} was found in the runs {dict(runs)} (expected "
            f"<run_dir>/scalars/<name>.csv)"
        )
    shown = [n for n in names if n in series]
    fig, axes = plt.subplots(1, len(shown), figsize=(4.5 * len(shown), 3.5), squeeze=False)
    for ax, name in zip(axes[0], shown):
        for label, (steps, values) in series[name].items():
            ax.plot(steps, values, marker="o", label=label)
        ax.set_title(name)
        ax.set_xlabel(xlabel)
        ax.grid(alpha=0.3)
        ax.legend()
    fig.tight_layout()
    out = Path(out_path)
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out)
    plt.close(fig)
    return out
