"""Plots of per-deployment metrics read back from TorchRL ``CSVLogger`` directories.

``CSVLogger(exp_name, log_dir)`` writes every scalar ``name`` to
``<log_dir>/<exp_name>/scalars/<name>.csv``, one ``step,value`` line per call, no header (a
``/`` in the name makes a sub-folder). :func:`plot_metrics` draws one panel per metric with one
line per run, e.g. BREMEN and MUSBO side by side (MUSBO Fig. 6 / Table 1), skipping runs that
did not log a metric.
"""
from __future__ import annotations

import math
import os
from pathlib import Path
from typing import Mapping, Sequence

from torchrl._utils import logger as torchrl_logger

from torchrl_depeff.metrics import METRIC_NAMES

__all__ = [
    "BREMEN_COLUMNS",
    "MUSBO_COLUMNS",
    "markdown_table",
    "plot_comparison",
    "plot_metrics",
    "plot_returns",
    "read_scalar_csv",
]


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


#: columns of the per-deployment table of a BREMEN run: (metric key, header, format)
BREMEN_COLUMNS: list[tuple[str, str, str]] = [
    ("deployment/count", "deployment", "{:.0f}"),
    ("deployment/samples", "samples", "{:.0f}"),
    ("deployment/return_mean", "deployed return", "{:.1f}"),
    ("eval/return_mean", "eval return", "{:.1f}"),
    ("eval/return_std", "eval std", "{:.1f}"),
    ("model/holdout_loss", "model holdout", "{:.4f}"),
    ("train/imaginary_return", "imaginary return", "{:.1f}"),
    ("train/kl_to_deployed", "KL(pi||deployed)", "{:.3g}"),
    ("train/kl_to_bc", "KL(pi||BC)", "{:.3g}"),
]

#: extra columns of a MUSBO run (uncertainty and sec. 5 analysis metrics)
MUSBO_COLUMNS: list[tuple[str, str, str]] = [
    ("deployment/count", "deployment", "{:.0f}"),
    ("deployment/exploration_variance", "expl. variance (eq. 22)", "{:.3g}"),
    ("labeler/holdout_loss", "labeler holdout", "{:.4f}"),
    ("bc/weight_mean", "BC weight (eq. 11)", "{:.3g}"),
    ("train/uncertainty_weight", "TRPO weight (eq. 12)", "{:.3g}"),
    ("metrics/novelty", "novelty (Table 1)", "{:.3f}"),
    ("metrics/energy_distance", "energy distance", "{:.3g}"),
    ("metrics/trajectory_mse", "trajectory MSE", "{:.3g}"),
]


def markdown_table(history: Sequence[Mapping[str, float]], cols: Sequence[tuple[str, str, str]]) -> str:
    """Markdown table, one row per deployment; ``cols``: (metric key, header, format).

    Examples:
        >>> from torchrl_depeff.metrics_plots import markdown_table
        >>> print(markdown_table([{"a": 1.0}], [("a", "A", "{:.1f}"), ("b", "B", "{:.1f}")]))
        | A | B |
        |---|---|
        | 1.0 | - |
    """
    lines = ["| " + " | ".join(c[1] for c in cols) + " |", "|" + "---|" * len(cols)]
    for h in history:
        cells = [fmt.format(h[key]) if key in h else "-" for key, _, fmt in cols]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def _save(fig, path: Path) -> Path:
    import matplotlib.pyplot as plt

    path = Path(path)
    tmp = path.with_name(f".{path.stem}.tmp{path.suffix}")
    fig.savefig(tmp, dpi=120)
    plt.close(fig)
    os.replace(tmp, path)
    return path


def plot_returns(history: Sequence[Mapping[str, float]], deployment_size: int, path: str | os.PathLike[str],
                 title: str) -> Path:
    """Eval return vs real samples with dotted lines at deployments (BREMEN Fig. 2 style).

    Each deployment ``k`` contributes two points: the return of the deployed (noisy) policy in
    the data it collected, at the start of that deployment's samples, and the evaluation return
    of the policy learned from it (mean +- std over episodes), at the end.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    samples = [h["deployment/samples"] for h in history]
    ev = [h.get("eval/return_mean", math.nan) for h in history]
    sd = [h.get("eval/return_std", 0.0) for h in history]
    ax.plot(samples, ev, "o-", color="tab:purple", label="evaluation (policy mean)")
    ax.fill_between(samples, [m - s for m, s in zip(ev, sd)], [m + s for m, s in zip(ev, sd)],
                    color="tab:purple", alpha=0.2)
    dep = [(s - deployment_size, h.get("deployment/return_mean", math.nan)) for s, h in zip(samples, history)]
    ax.plot([d[0] for d in dep], [d[1] for d in dep], "s", color="tab:gray", label="deployed policy, in its own data")
    for s in samples:
        ax.axvline(s - deployment_size, color="k", linestyle=":", linewidth=0.8)
    ax.set_xlabel("real transitions")
    ax.set_ylabel("return")
    ax.set_title(title, fontsize=9)  # long run names fit the 6-inch figure
    ax.legend(loc="best", fontsize=8)
    fig.tight_layout()
    return _save(fig, Path(path))


def plot_comparison(runs: Mapping[str, Sequence[Mapping[str, float]]], path: str | os.PathLike[str], title: str) -> Path:
    """Evaluation return per real sample, one line per run (e.g. BREMEN and MUSBO)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    for label, history in runs.items():
        x = [h["deployment/samples"] for h in history]
        y = [h.get("eval/return_mean", math.nan) for h in history]
        ax.plot(x, y, "o-", label=label)
    ax.set_xlabel("real transitions")
    ax.set_ylabel("evaluation return")
    ax.set_title(title)
    ax.legend(loc="best", fontsize=8)
    fig.tight_layout()
    return _save(fig, Path(path))
