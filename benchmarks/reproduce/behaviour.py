"""Behaviour policies and datasets of the offline claims: a partially trained BREMEN run, then data.

BREMEN sec. 5.1 (following Wu et al., 2019) collects its offline datasets with a policy trained
online "to a certain cumulative reward threshold" (SAC to 4 000 on HalfCheetah), App. G.1 calls it
"partially trained"; MB2PO's D4RL datasets come from a medium policy's training. Here the behaviour
policy is recursive BREMEN (the quick preset, seed 1000, not one of the evaluated seeds) run
deployment by deployment until its evaluation return reaches ``threshold`` or ``max_deployments``
are spent (:func:`trained_policy`; whether the threshold was reached is returned, not assumed).
The run directory is keyed by the config, so the two offline claims share one behaviour run and a
crashed one resumes. :func:`dataset` collects a noise variant with its checkpoint (cached on disk,
refused if the cached one was made with other settings or another checkpoint).
"""
from __future__ import annotations

import fcntl
import hashlib
import json
from pathlib import Path
from typing import Any

import torch

from torchrl_depeff.algorithms import BREMEN, BREMENConfig
from torchrl_depeff.algorithms.checkpoints import load_policy
from torchrl_depeff.collectors import collect_behaviour_dataset
from torchrl_depeff.data import load_behaviour_dataset
from torchrl_depeff.envs import make_env

__all__ = ["dataset", "file_sha256", "root_for", "trained_policy"]


def root_for(args: Any, out: Path) -> Path:
    """Where behaviour runs live: shared by the claims (``runs/reproduce/behaviour``) unless ``--quick``/``--out``."""
    if args.quick or args.out is not None:
        return out / "behaviour"
    return out.parent / "behaviour"


def file_sha256(path: Path) -> str:
    """SHA-256 of a file's bytes (identifies the behaviour checkpoint a dataset was made with)."""
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


def trained_policy(root: Path, config: BREMENConfig, *, threshold: float | None,
                   max_deployments: int) -> tuple[Path, dict[str, Any]]:
    """Recursive BREMEN with ``config`` until ``eval/return_mean >= threshold`` or ``max_deployments``.

    Args:
        root: parent of the run directory ``<root>/<task>-<config hash>`` (resumed if present).
        config: the behaviour run's config (its ``deployment.num_deployments`` is replaced by
            ``max_deployments``).
        threshold: evaluation return at which training stops; ``None``: run every deployment.
        max_deployments: most deployments to spend.

    Returns:
        The checkpoint path and a summary: ``eval_return`` of the last deployment, ``deployments``,
        ``samples``, ``threshold``, ``threshold_reached``, ``checkpoint_sha256``.
    """
    config = config.override({"deployment.num_deployments": max_deployments})
    key = hashlib.sha256(json.dumps({"config": config.to_dict(), "threshold": threshold},
                                    sort_keys=True).encode()).hexdigest()[:12]
    run_dir = Path(root) / f"{config.task}-{key}"
    run_dir.mkdir(parents=True, exist_ok=True)
    torch.set_num_threads(2)
    with open(run_dir / ".lock", "w") as lock:  # two claims started at once share one run
        fcntl.flock(lock, fcntl.LOCK_EX)
        algo = BREMEN(config, run_dir=run_dir)

        def reached() -> bool:
            return threshold is not None and bool(algo.history) and algo.history[-1]["eval/return_mean"] >= threshold

        while algo.deployment < max_deployments and not reached():
            algo.deployment_step()
        last = algo.history[-1]
        ckpt = run_dir / "checkpoint.pt"
        return ckpt, {"eval_return": last["eval/return_mean"], "deployments": algo.deployment,
                      "samples": int(last.get("deployment/samples", 0)), "threshold": threshold,
                      "threshold_reached": reached(), "max_deployments": max_deployments,
                      "checkpoint_sha256": file_sha256(ckpt)}


def dataset(path: Path, checkpoint: Path, *, task: str, size: int, noise: str, seed: int, env_factory=None) -> Path:
    """``size`` transitions of ``noise`` (App. G.1 variants) with the checkpoint's policy, saved at ``path``."""
    spec = {"checkpoint": str(checkpoint), "checkpoint_sha256": file_sha256(checkpoint), "task": task,
            "size": size, "noise": noise, "seed": seed}
    spec_file = path.with_suffix(".spec.json")
    if (path / "metadata.json").exists():
        saved = json.loads(spec_file.read_text()) if spec_file.exists() else None
        if saved != spec:
            raise ValueError(f"{path} holds another dataset ({saved}); expected {spec}: remove it or use another --out")
        return path
    policy = load_policy(checkpoint, task=task)
    env = env_factory() if env_factory is not None else make_env(task)
    collect_behaviour_dataset(policy, env, size, noise=noise, seed=seed, path=path)
    spec_file.write_text(json.dumps(spec))
    load_behaviour_dataset(path)  # written and readable
    return path
