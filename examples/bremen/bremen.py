"""BREMEN (Matsushima et al., ICLR 2021): recursive deployments (Alg. 1) or offline (Alg. 2).

Run ``python -m examples.bremen.bremen`` from the repository root, or
``python path/to/examples/bremen/bremen.py`` from anywhere (quick preset: HalfCheetah-v5, 2 CPU
cores, minutes). ``task=hopper preset=paper`` uses Table 4; ``variant=me_trpo`` etc. the paper's
ablations; ``mode=offline`` is Alg. 2. Outputs in ``output_dir``: ``deployments/`` (one buffer per
deployment), ``checkpoint.pt`` (after every phase), ``metrics.json`` (one entry per deployment),
``logs/bremen/`` (TorchRL logger), ``returns.png`` (Fig. 2 style) and ``summary.md``. Rerunning the
same command resumes; a different config on the same ``output_dir`` is refused.
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

from examples.bremen.utils import offline_dataset, write_report
from torchrl_depeff.algorithms import BREMEN, BREMENConfig
from torchrl_depeff.algorithms.common import make_logger
from torchrl_depeff.algorithms.hydra_configs import register_configs
from torchrl_depeff.collectors import DeploymentRefused

log = logging.getLogger("bremen")
register_configs()  # BREMENConfig and the Table 4 presets, for the defaults list of config.yaml


def train(cfg: DictConfig) -> list[dict[str, float]]:
    if cfg.threads:
        torch.set_num_threads(int(cfg.threads))
    config = BREMENConfig.from_dict(OmegaConf.to_container(cfg.bremen, resolve=True))  # a BREMENConfig: types and ranges checked
    run_dir = Path(cfg.output_dir)
    run_dir.mkdir(parents=True, exist_ok=True)

    # Create the logger and the loop (real env, K dynamics models, policy, buffers); a run_dir
    # holding a checkpoint is resumed (a different config is refused, naming the keys)
    logger = make_logger(cfg.logger.backend, run_dir, "bremen", project=cfg.logger.project)
    dataset = offline_dataset(cfg, config, run_dir) if config.mode == "offline" else None
    algo = BREMEN(config, run_dir=run_dir, logger=logger, progress=True, dataset=dataset)

    # ALGO LOGIC: BREMEN Alg. 1 (Alg. 2 with mode=offline: a single "deployment" of the dataset)
    with tqdm.tqdm(total=algo.num_deployments, initial=algo.deployment, desc="deployments", unit="deployment") as bar:
        while algo.deployment < algo.num_deployments:
            algo.collect()          # l. 3: deploy a frozen copy of pi (gate first), collect B transitions
            algo.fit_model()        # l. 4: refit the K dynamics models on all data, eq. (1)
            algo.pretrain()         # l. 5-6: BC on the latest data, eq. (3); pi_0 = Normal(pi_beta_hat, sigma)
            algo.optimize_policy()  # l. 7-9: T TRPO steps on imaginary rollouts, eq. (2) + (4)
            algo.evaluate()         # the policy mean in a separate real env (not a deployment)
            metrics = algo.end_deployment()  # history, logger, metrics.json, checkpoint
            bar.update(1)
            log.info(
                "deployment %d: %d samples, deployed return %.1f, eval return %.1f +- %.1f",
                metrics["deployment/count"], metrics["deployment/samples"],
                metrics.get("deployment/return_mean", float("nan")),
                metrics.get("eval/return_mean", float("nan")), metrics.get("eval/return_std", float("nan")),
            )

    # Report
    title = f"BREMEN {config.name} on {config.task} ({cfg.preset.name} preset, {config.mode}, seed {config.seed})"
    table = write_report(algo.history, config, run_dir, title)
    log.info("summary:\n%s\noutputs in %s", table, run_dir)
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
