"""BREMEN: recursive deployments (Alg. 1) or offline (Alg. 2).

Run from the repository root: ``python -m examples.bremen.bremen`` (quick preset, HalfCheetah-v5,
2 CPU cores, minutes). ``task=hopper preset=paper`` uses Table 4; ``variant=me_trpo`` etc. the
paper's ablations; ``mode=offline`` Alg. 2 on a dataset. Output in ``output_dir``: the deployment
buffers (``deployments/``), ``checkpoint.pt`` (after every phase), ``metrics.json`` (one entry per
deployment), CSV logs (``logs/``), ``returns.png`` (Fig. 2 style) and ``summary.md``. Rerunning the
same command resumes; a different config on the same ``output_dir`` is refused.
"""
from __future__ import annotations

import logging
import sys
from pathlib import Path

import hydra
import torch
import tqdm
from omegaconf import DictConfig, OmegaConf

from examples.bremen.utils import make_bremen_config, make_logger, plot_returns, summary_table, write_json_atomic
from torchrl_depeff.algorithms import atomic_save, BREMEN, load_checkpoint
from torchrl_depeff.collectors import DeploymentRefused
from torchrl_depeff.data import collect_behaviour_dataset, load_behaviour_dataset, load_d4rl_hdf5
from torchrl_depeff.envs import make_env
from torchrl_depeff.modules import make_gaussian_actor

log = logging.getLogger("bremen")


def load_offline_dataset(cfg: DictConfig, output_dir: Path):
    """Alg. 2 dataset: a saved behaviour dataset, a D4RL-format HDF5 file, or a generated one."""
    path = cfg.offline.dataset
    if path is None:
        target = output_dir / "offline_dataset"
        if target.exists():
            return load_behaviour_dataset(target)
        env = make_env(cfg.task.name)
        policy = make_gaussian_actor(env.observation_spec["observation"].shape[-1], env.action_spec.shape[-1])
        log.info("generating a %s dataset of %d transitions", cfg.offline.generate_noise, cfg.offline.generate_size)
        return collect_behaviour_dataset(
            policy, env, int(cfg.offline.generate_size), noise=cfg.offline.generate_noise,
            seed=int(cfg.seed), path=target,
        )
    path = Path(path)
    if path.suffix in (".hdf5", ".h5"):
        return load_d4rl_hdf5(path)
    return load_behaviour_dataset(path)


def train(cfg: DictConfig) -> list[dict[str, float]]:
    torch.set_num_threads(max(1, torch.get_num_threads()))
    config = make_bremen_config(cfg)
    output_dir = Path(cfg.output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    ckpt = output_dir / "checkpoint.pt"

    # Create logger and algorithm (real env, ensemble, policy, buffers)
    logger = make_logger(cfg, output_dir)
    algo = BREMEN(
        config,
        data_root=output_dir / "deployments",
        logger=logger,
        progress=True,
        checkpoint_fn=lambda a: atomic_save(a.state_dict(), ckpt),
    )
    if ckpt.exists():
        algo.load_state_dict(load_checkpoint(ckpt))  # refuses a different config, naming keys
        log.info("resuming %s at deployment %d, phase %s", output_dir, algo.deployment, algo.phase)

    if cfg.mode == "offline":
        dataset = load_offline_dataset(cfg, output_dir)
        metrics = algo.run_offline(dataset, iterations=cfg.offline.iterations)
        write_json_atomic(algo.history, output_dir / "metrics.json")
        log.info("offline BREMEN: eval return %.1f", metrics.get("eval/return_mean", float("nan")))
        return algo.history
    if cfg.mode != "deployments":
        raise ValueError(f"unknown mode {cfg.mode!r}; valid: deployments, offline")

    # Recursive deployments (Alg. 1)
    with tqdm.tqdm(total=config.num_deployments, initial=algo.deployment, desc="deployments", unit="deployment") as bar:
        while algo.deployment < config.num_deployments:
            metrics = algo.deployment_step()
            write_json_atomic(algo.history, output_dir / "metrics.json")
            bar.update(1)
            log.info(
                "deployment %d: %d samples, deployed return %.1f, eval return %.1f +- %.1f",
                metrics["deployment/count"], metrics["deployment/samples"],
                metrics.get("deployment/return_mean", float("nan")),
                metrics.get("eval/return_mean", float("nan")), metrics.get("eval/return_std", float("nan")),
            )

    # Report
    title = f"BREMEN {cfg.variant} on {config.task} ({cfg.preset} preset, seed {config.seed})"
    plot_returns(algo.history, config.deployment_size, output_dir / "returns.png", title)
    table = summary_table(algo.history)
    (output_dir / "summary.md").write_text(f"# {title}\n\n{table}\n")
    log.info("summary:\n%s", table)
    log.info("outputs in %s (returns.png, summary.md, metrics.json, logs/)", output_dir)
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
