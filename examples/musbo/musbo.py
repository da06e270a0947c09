"""MUSBO (Su et al.): recursive deployments (Alg. 1) with the uncertainty labeler (eq. 9-13, 22).

Run ``python -m examples.musbo.musbo`` from the repository root, or
``python path/to/examples/musbo/musbo.py`` from anywhere (quick preset: HalfCheetah-v5, 2 CPU
cores, minutes). ``task=hopper preset=paper budget=250k`` uses Table 2 with 250k real samples;
``variant=no_exploration`` etc. the ablations. Outputs in ``output_dir``, as BREMEN's example:
``deployments/``, ``checkpoint.pt``, ``metrics.json``, ``logs/musbo/``, ``returns.png``,
``metrics.png`` (novelty, energy distance, trajectory MSE), ``summary.md`` and, with
``compare_with=<BREMEN output_dir>``, ``comparison.png``. Rerunning the same command resumes.
"""
from __future__ import annotations

import logging
import sys
from pathlib import Path

if __package__ in (None, ""):  # run as a file: make the repository importable from anywhere
    sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

import hydra
import torch
import tqdm
from omegaconf import DictConfig, OmegaConf

from examples.musbo.utils import write_report
from torchrl_depeff.algorithms import MUSBO, MUSBOConfig
from torchrl_depeff.algorithms.common import make_logger
from torchrl_depeff.algorithms.hydra_configs import register_configs
from torchrl_depeff.collectors import DeploymentRefused

log = logging.getLogger("musbo")
register_configs()  # MUSBOConfig and the Table 2 presets, for the defaults list of config.yaml


def train(cfg: DictConfig) -> list[dict[str, float]]:
    if cfg.threads:
        torch.set_num_threads(int(cfg.threads))
    config = MUSBOConfig.from_dict(OmegaConf.to_container(cfg.musbo, resolve=True))  # a MUSBOConfig: types and ranges checked
    if config.mode != "deployments":
        raise ValueError(f"the MUSBO example runs Alg. 1 only (mode=deployments), got mode={config.mode!r}")
    run_dir = Path(cfg.output_dir)
    run_dir.mkdir(parents=True, exist_ok=True)

    # Create the logger and the loop (real env, dynamics ensemble T_hat, labeler P_hat, policy,
    # buffers); a run_dir holding a checkpoint is resumed (a different config is refused)
    logger = make_logger(cfg.logger.backend, run_dir, "musbo", project=cfg.logger.project)
    algo = MUSBO(config, run_dir=run_dir, logger=logger, progress=True)

    # ALGO LOGIC: MUSBO Alg. 1
    with tqdm.tqdm(total=algo.num_deployments, initial=algo.deployment, desc="deployments", unit="deployment") as bar:
        while algo.deployment < algo.num_deployments:
            algo.collect()          # l. 3: deploy pi with eq. (22) noise const + N(0, U) (random policy first)
            algo.fit_model()        # l. 4-5: refit T_hat (eq. 1), then the labeler P_hat (eq. 10), all data
            algo.pretrain()         # l. 6: BC on D_all weighted by the eq. (9) labels, eq. (11)
            algo.optimize_policy()  # l. 7-9: UW-TRPO on imaginary rollouts labelled by eq. (12), eq. (13)
            algo.evaluate()         # policy mean in the real env + sec. 5 analysis metrics
            metrics = algo.end_deployment()
            bar.update(1)
            log.info(
                "deployment %d: %d samples, deployed return %.1f, eval return %.1f +- %.1f, novelty %.3f",
                metrics["deployment/count"], metrics["deployment/samples"],
                metrics.get("deployment/return_mean", float("nan")),
                metrics.get("eval/return_mean", float("nan")), metrics.get("eval/return_std", float("nan")),
                metrics.get("metrics/novelty", float("nan")),
            )

    # Report
    budget = f", {cfg.budget.name} samples" if cfg.preset.name == "paper" else ""
    title = f"MUSBO {config.name} on {config.task} ({cfg.preset.name} preset{budget}, seed {config.seed})"
    text = write_report(algo.history, config, run_dir, title, cfg.compare_with, cfg.logger.backend == "csv")
    log.info("summary:\n%s\noutputs in %s", text, run_dir)
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
