"""Helpers of the BREMEN example: config assembly, logger, metrics file, Fig. 2 plot."""
from __future__ import annotations

import json
import math
import os
import tempfile
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf

from torchrl_depeff.algorithms.bremen import BREMENConfig, VARIANTS

# ====================================================================
# Config
# --------------------------------------------------------------------


def make_bremen_config(cfg: DictConfig) -> BREMENConfig:
    """Preset values of the task (``paper`` = Table 4, ``quick``), the variant, then ``bremen.*``."""
    if cfg.preset not in ("quick", "paper"):
        raise ValueError(f"unknown preset {cfg.preset!r}; valid presets are ['paper', 'quick']")
    if cfg.variant not in VARIANTS:
        raise ValueError(f"unknown variant {cfg.variant!r}; valid variants are {sorted(VARIANTS)}")
    preset = OmegaConf.to_container(cfg.task[cfg.preset], resolve=True)
    user = {k: v for k, v in OmegaConf.to_container(cfg.bremen, resolve=True).items() if v is not None}
    values = {**preset, **VARIANTS[cfg.variant], **user}
    return BREMENConfig.from_dict({"task": cfg.task.name, "seed": int(cfg.seed), "device": str(cfg.device), **values})


# ====================================================================
# Logging
# --------------------------------------------------------------------


def make_logger(cfg: DictConfig, output_dir: Path):
    """A torchrl logger writing under ``output_dir/logs`` (``None`` for ``backend=none``)."""
    backend = cfg.logger.backend
    exp_name = "bremen"
    log_dir = str(output_dir / "logs")
    if backend == "none":
        return None
    if backend == "csv":
        from torchrl.record.loggers import CSVLogger

        return CSVLogger(exp_name=exp_name, log_dir=log_dir)
    if backend == "tensorboard":
        from torchrl.record.loggers import TensorboardLogger

        return TensorboardLogger(exp_name=exp_name, log_dir=log_dir)
    if backend == "wandb":
        from torchrl.record.loggers import WandbLogger

        return WandbLogger(exp_name=exp_name, save_dir=log_dir, project=cfg.logger.project)
    raise ValueError(f"unknown logger backend {backend!r}; valid: csv, tensorboard, wandb, none")


def write_json_atomic(obj: Any, path: Path) -> None:
    """Write JSON to ``path`` through a temp file + ``os.replace`` (never half-written)."""
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    with os.fdopen(fd, "w") as f:
        json.dump(obj, f, indent=1, allow_nan=True)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


# ====================================================================
# Report: Fig. 2-style plot and summary table
# --------------------------------------------------------------------


def plot_returns(history: list[dict[str, float]], deployment_size: int, path: Path, title: str) -> Path:
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
    ax.plot([d[0] for d in dep], [d[1] for d in dep], "s", color="tab:gray",
            label="deployed policy, in its own data")
    for s in samples:
        ax.axvline(s - deployment_size, color="k", linestyle=":", linewidth=0.8)
    ax.set_xlabel("real transitions")
    ax.set_ylabel("return (BREMEN Table 3 reward)")
    ax.set_title(title)
    ax.legend(loc="best", fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def summary_table(history: list[dict[str, float]]) -> str:
    """Markdown table, one row per deployment."""
    cols = [
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
    return markdown_table(history, cols)


def markdown_table(history: list[dict[str, float]], cols: list[tuple[str, str, str]]) -> str:
    """Markdown table, one row per deployment; ``cols``: (metric key, header, format)."""
    lines = ["| " + " | ".join(c[1] for c in cols) + " |", "|" + "---|" * len(cols)]
    for h in history:
        cells = [fmt.format(h[key]) if key in h else "-" for key, _, fmt in cols]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)
