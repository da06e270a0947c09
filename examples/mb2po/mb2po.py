"""MB2PO (Villaflor, Dolan and Schneider): AWAC pre-training, then conservative model-based fine-tuning.

Run ``python -m examples.mb2po.mb2po`` from the repository root, or
``python path/to/examples/mb2po/mb2po.py`` from anywhere (quick preset, a few minutes on one CPU
thread, on a dataset generated locally), or e.g. ``task=hopper dataset=medium preset=paper
data.source=d4rl data.path=/data/hopper_medium-v2.hdf5``. Outputs in ``output_dir``, as the BREMEN
example: ``deployments/`` (the dataset, stored once), ``checkpoint.pt`` (after every phase, every
evaluation of the pre-training and every fine-tuning iteration), ``metrics.json``,
``logs/mb2po/``, ``learning_curve.png`` and ``summary.json`` (AWAC and AWAC + MB2PO scores).
Rerunning the same command resumes; another config or dataset on the same ``output_dir`` is refused.
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

from examples.mb2po.utils import dataset_summary, load_or_make_dataset, plot_learning_curve
from torchrl_depeff.algorithms import MB2PO, MB2POConfig, write_json_atomic
from torchrl_depeff.algorithms.common import make_logger
from torchrl_depeff.algorithms.hydra_configs import register_configs

log = logging.getLogger("mb2po")
register_configs()  # MB2POConfig and the App. 7.3 presets, for the defaults list of config.yaml


def train(cfg: DictConfig) -> list[dict[str, float]]:
    if cfg.threads:
        torch.set_num_threads(int(cfg.threads))
    config = MB2POConfig.from_dict(OmegaConf.to_container(cfg.mb2po, resolve=True))  # an MB2POConfig: types and ranges checked
    run_dir = Path(cfg.output_dir)
    run_dir.mkdir(parents=True, exist_ok=True)

    # The offline dataset D_beta (D4RL, Minari or generated locally), the logger and the loop
    dataset, source = load_or_make_dataset(cfg, run_dir)
    log.info("dataset %s: %s", source, dataset_summary(dataset))
    logger = make_logger(cfg.logger.backend, run_dir, "mb2po", project=cfg.logger.project)
    algo = MB2PO(config, dataset=dataset, dataset_source=source, run_dir=run_dir, logger=logger, progress=True)

    # ALGO LOGIC: MB2PO Alg. 1 (one offline "deployment")
    with tqdm.tqdm(total=algo.num_deployments, initial=algo.deployment, desc="MB2PO", unit="run") as bar:
        while algo.deployment < algo.num_deployments:
            algo.collect()          # D_beta, stored once (a rerun with another dataset is refused)
            algo.fit_model()        # N probabilistic models of next state and reward (App. 7.2)
            algo.pretrain()         # l. 1: AWAC on D_beta alone, evaluated every evaluation.every_pretrain_steps
            algo.optimize_policy()  # K iterations: h-step rollouts in the conservative MDP (eq. 3),
                                    # then AWAC on omega-mixed batches (eq. 11)
            algo.evaluate()         # real env, native reward, D4RL normalised score
            algo.end_deployment()
            bar.update(1)

    # Report
    summary = algo.summary()
    title = f"MB2PO {config.task}-{config.dataset} ({cfg.preset.name} preset, seed {config.seed})"
    plot_learning_curve(algo.curve, run_dir / "learning_curve.png", title)
    write_json_atomic({"summary": summary, "curve": algo.curve}, run_dir / "summary.json")
    log.info("summary: %s", summary)
    return algo.history


@hydra.main(config_path=".", config_name="config", version_base="1.3")
def main(cfg: DictConfig) -> None:
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    log.info("config:\n%s", OmegaConf.to_yaml(cfg, resolve=True))
    train(cfg)


if __name__ == "__main__":
    main()
