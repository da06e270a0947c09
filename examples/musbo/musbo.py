"""MUSBO: recursive deployments (Alg. 1) with the uncertainty labeler (eq. 9-13, 22).

Run from the repository root: ``python -m examples.musbo.musbo`` (quick preset, HalfCheetah-v5,
2 CPU cores, minutes). ``task=hopper preset=paper budget=250k`` uses Table 2 with 250k real
samples; ``variant=no_exploration`` etc. the ablations. Output in ``output_dir``: the deployment
buffers (``deployments/``), ``checkpoint.pt`` (after every phase), ``metrics.json`` (one entry per
deployment), CSV logs (``logs/``), ``returns.png``, ``metrics.png`` (novelty, energy distance,
trajectory MSE per deployment), ``summary.md`` and, with ``compare_with=<BREMEN output_dir>``,
``comparison.png``. Rerunning the same command resumes; a different config on the same
``output_dir`` is refused.
"""
from __future__ import annotations

import logging
import sys
from pathlib import Path

import hydra
import torch
import tqdm
from omegaconf import DictConfig, OmegaConf

from examples.musbo.utils import (
    load_history,
    make_logger,
    make_musbo_config,
    metrics_table,
    plot_comparison,
    plot_returns,
    summary_table,
    write_json_atomic,
)
from torchrl_depeff.algorithms import atomic_save, load_checkpoint
from torchrl_depeff.algorithms.musbo import MUSBO
from torchrl_depeff.collectors import DeploymentRefused
from torchrl_depeff.metrics import METRIC_NAMES
from torchrl_depeff.metrics_plots import plot_metrics

log = logging.getLogger("musbo")


def train(cfg: DictConfig) -> list[dict[str, float]]:
    torch.set_num_threads(max(1, torch.get_num_threads()))
    config = make_musbo_config(cfg)
    output_dir = Path(cfg.output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    ckpt = output_dir / "checkpoint.pt"

    # Create logger and algorithm (real env, ensemble, labeler, policy, buffers)
    logger = make_logger(cfg, output_dir)
    algo = MUSBO(
        config,
        data_root=output_dir / "deployments",
        logger=logger,
        progress=True,
        checkpoint_fn=lambda a: atomic_save(a.state_dict(), ckpt),
    )
    if ckpt.exists():
        algo.load_state_dict(load_checkpoint(ckpt))  # refuses a different config, naming keys
        log.info("resuming %s at deployment %d, phase %s", output_dir, algo.deployment, algo.phase)

    # Recursive deployments (Alg. 1)
    with tqdm.tqdm(total=config.num_deployments, initial=algo.deployment, desc="deployments", unit="deployment") as bar:
        while algo.deployment < config.num_deployments:
            metrics = algo.deployment_step()
            write_json_atomic(algo.history, output_dir / "metrics.json")
            bar.update(1)
            log.info(
                "deployment %d: %d samples, deployed return %.1f, eval return %.1f +- %.1f, novelty %.3f",
                metrics["deployment/count"], metrics["deployment/samples"],
                metrics.get("deployment/return_mean", float("nan")),
                metrics.get("eval/return_mean", float("nan")), metrics.get("eval/return_std", float("nan")),
                metrics.get("metrics/novelty", float("nan")),
            )

    # Report
    budget = f", {cfg.budget} samples" if cfg.preset == "paper" else ""
    title = f"MUSBO {cfg.variant} on {config.task} ({cfg.preset} preset{budget}, seed {config.seed})"
    plot_returns(algo.history, config.deployment_size, output_dir / "returns.png", title)
    # the CSV logger of examples.bremen.utils.make_logger writes under logs/bremen
    csv_dir = output_dir / "logs" / "bremen"
    if cfg.logger.backend == "csv" and config.metrics:
        try:
            plot_metrics({"MUSBO": csv_dir}, output_dir / "metrics.png", list(METRIC_NAMES.values()),
                         xlabel="real transitions")
        except FileNotFoundError as err:
            log.warning("no metrics plot: %s", err)
    if cfg.compare_with is not None:
        runs = {"BREMEN": load_history(cfg.compare_with), "MUSBO": algo.history}
        plot_comparison(runs, output_dir / "comparison.png", f"BREMEN vs MUSBO on {config.task}")
    text = f"# {title}\n\n{summary_table(algo.history)}\n\n## Uncertainty and analysis metrics\n\n{metrics_table(algo.history)}\n"
    (output_dir / "summary.md").write_text(text)
    log.info("summary:\n%s", text)
    log.info("outputs in %s (returns.png, metrics.png, summary.md, metrics.json, logs/)", output_dir)
    return algo.history


@hydra.main(config_path=".", config_name="config", version_base="1.3")
def main(cfg: DictConfig) -> None:
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    log.info("config:\n%s", OmegaConf.to_yaml(cfg, resolve=True))
    try:
        train(cfg)
    except DeploymentRefused as err:
        log.error("deployment refused by the gate, run stopped (checkpoint kept): %s", err)
        sys.exit(2)


if __name__ == "__main__":
    main()
