"""Helpers of the MUSBO example: config assembly, BREMEN-vs-MUSBO plot, metrics table.

Logger, atomic JSON, the Fig. 2-style return plot and the summary table are BREMEN's
(:mod:`examples.bremen.utils`), imported rather than copied.
"""
from __future__ import annotations

import json
import math
from pathlib import Path

from omegaconf import DictConfig, OmegaConf

from examples.bremen.utils import (
    make_logger,
    markdown_table,
    plot_returns,
    summary_table,
    write_json_atomic,
)
from torchrl_depeff.algorithms.musbo import BUDGETS, MUSBO_VARIANTS, MUSBOConfig

__all__ = [
    "make_musbo_config",
    "make_logger",
    "plot_returns",
    "summary_table",
    "write_json_atomic",
    "metrics_table",
    "plot_comparison",
]

# ====================================================================
# Config
# --------------------------------------------------------------------


def make_musbo_config(cfg: DictConfig) -> MUSBOConfig:
    """Preset values of the task (``paper`` = Table 2 + ``budget``, ``quick``), the variant, then ``musbo.*``."""
    if cfg.preset not in ("quick", "paper"):
        raise ValueError(f"unknown preset {cfg.preset!r}; valid presets are ['paper', 'quick']")
    if cfg.variant not in MUSBO_VARIANTS:
        raise ValueError(f"unknown variant {cfg.variant!r}; valid variants are {sorted(MUSBO_VARIANTS)}")
    preset = OmegaConf.to_container(cfg.task[cfg.preset], resolve=True)
    if cfg.preset == "paper":
        budget = str(cfg.budget)
        if budget not in BUDGETS:
            raise ValueError(f"unknown budget {budget!r}; valid budgets are {sorted(BUDGETS)}")
        # MUSBO sec. 5: B = 100k/50k (5 deployments) or 50k/25k (10 deployments)
        preset["deployment_size"] = BUDGETS[budget] // int(preset["num_deployments"])
    user = {k: v for k, v in OmegaConf.to_container(cfg.musbo, resolve=True).items() if v is not None}
    values = {**preset, **MUSBO_VARIANTS[cfg.variant], **user}
    return MUSBOConfig.from_dict({"task": cfg.task.name, "seed": int(cfg.seed), "device": str(cfg.device), **values})


# ====================================================================
# Report
# --------------------------------------------------------------------


def metrics_table(history: list[dict[str, float]]) -> str:
    """Markdown table of the MUSBO-specific numbers, one row per deployment."""
    cols = [
        ("deployment/count", "deployment", "{:.0f}"),
        ("deployment/exploration_variance", "expl. variance (eq. 22)", "{:.3g}"),
        ("labeler/holdout_loss", "labeler holdout", "{:.4f}"),
        ("bc/weight_mean", "BC weight (eq. 11)", "{:.3g}"),
        ("train/uncertainty_weight", "TRPO weight (eq. 12)", "{:.3g}"),
        ("metrics/novelty", "novelty (Table 1)", "{:.3f}"),
        ("metrics/energy_distance", "energy distance", "{:.3g}"),
        ("metrics/trajectory_mse", "trajectory MSE", "{:.3g}"),
    ]
    return markdown_table(history, cols)


def plot_comparison(runs: dict[str, list[dict[str, float]]], path: Path, title: str) -> Path:
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
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def load_history(output_dir: str | Path) -> list[dict[str, float]]:
    """``metrics.json`` of a BREMEN or MUSBO example run."""
    path = Path(output_dir) / "metrics.json"
    if not path.is_file():
        raise FileNotFoundError(f"no metrics.json in {output_dir} (compare_with must be a run's output_dir)")
    return json.loads(path.read_text())
