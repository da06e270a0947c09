"""Behaviour policies and datasets of the offline claims: a (partially) trained BREMEN run, then data.

BREMEN App. G.4 and MB2PO's D4RL datasets are collected by a partially trained policy, not an
untrained network. :func:`trained_policy` trains one with the BREMEN example's loop (cached: its
run directory resumes) and returns its checkpoint; :func:`dataset` collects a noise variant with
it (cached on disk, refused if the cached one was made with other settings).
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch

from torchrl_depeff.algorithms import BREMEN, BREMENConfig
from torchrl_depeff.algorithms.checkpoints import load_policy
from torchrl_depeff.collectors import collect_behaviour_dataset
from torchrl_depeff.data import load_behaviour_dataset
from torchrl_depeff.envs import make_env

__all__ = ["dataset", "trained_policy"]


def trained_policy(run_dir: Path, config: BREMENConfig) -> tuple[Path, dict[str, Any]]:
    """Train (or resume) BREMEN with ``config`` in ``run_dir``; the checkpoint and its last metrics."""
    torch.set_num_threads(2)
    history = BREMEN(config, run_dir=run_dir).run()
    return run_dir / "checkpoint.pt", history[-1]


def dataset(path: Path, checkpoint: Path, *, task: str, size: int, noise: str, seed: int, env_factory=None) -> Path:
    """``size`` transitions of ``noise`` (App. G.4 variants) with the checkpoint's policy, saved at ``path``."""
    spec = {"checkpoint": str(checkpoint), "task": task, "size": size, "noise": noise, "seed": seed}
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
