"""Helpers of the BREMEN example: the Alg. 2 dataset and the report."""
from __future__ import annotations

import logging
from pathlib import Path

import torch
from omegaconf import DictConfig

from torchrl_depeff.algorithms import BREMENConfig
from torchrl_depeff.algorithms.checkpoints import load_policy
from torchrl_depeff.collectors import collect_behaviour_dataset
from torchrl_depeff.data import load_behaviour_dataset, load_d4rl_hdf5
from torchrl_depeff.envs import make_env
from torchrl_depeff.metrics_plots import BREMEN_COLUMNS, markdown_table, plot_returns

log = logging.getLogger(__name__)

# ====================================================================
# Alg. 2 dataset
# --------------------------------------------------------------------


def offline_dataset(cfg: DictConfig, config: BREMENConfig, run_dir: Path):
    """Alg. 2's dataset: a saved behaviour dataset, a D4RL-format HDF5 file, or a generated one.

    A generated dataset (BREMEN App. G.4) is collected once with ``offline.behaviour_policy``
    (a BREMEN checkpoint: a partially trained policy, as the paper's datasets) or, without it, an
    untrained seeded policy, and cached in ``run_dir/offline_dataset``.
    """
    path = cfg.offline.dataset
    if path is not None:
        path = Path(path)
        return load_d4rl_hdf5(path) if path.suffix in (".hdf5", ".h5") else load_behaviour_dataset(path)
    target = run_dir / "offline_dataset"
    if target.exists():
        return load_behaviour_dataset(target)
    if cfg.offline.behaviour_policy is not None:
        policy = load_policy(cfg.offline.behaviour_policy, task=config.task)
    else:
        with torch.random.fork_rng():
            torch.manual_seed(config.seed + 12345)
            policy = config.make_actor()
    log.info("generating a %s dataset of %d transitions", cfg.offline.generate_noise, cfg.offline.generate_size)
    return collect_behaviour_dataset(policy, make_env(config.task), int(cfg.offline.generate_size),
                                     noise=cfg.offline.generate_noise, seed=config.seed, path=target)


# ====================================================================
# Report
# --------------------------------------------------------------------


def write_report(history: list[dict[str, float]], config: BREMENConfig, run_dir: Path, title: str) -> str:
    """``returns.png`` (BREMEN Fig. 2 style) and ``summary.md``; returns the table."""
    plot_returns(history, config.deployment.size, run_dir / "returns.png", title)
    table = markdown_table(history, BREMEN_COLUMNS)
    (run_dir / "summary.md").write_text(f"# {title}\n\n{table}\n")
    return table
