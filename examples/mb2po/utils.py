"""Helpers of the MB2PO example: datasets, real env, config, checkpoints, learning curve."""
from __future__ import annotations

import json
import math
import os
from pathlib import Path
from typing import Any

import torch
from tensordict import TensorDict, TensorDictBase
from torchrl.envs import DoubleToFloat, GymEnv, TransformedEnv

from torchrl_depeff.algorithms.mb2po import MB2PO, MB2POConfig
from torchrl_depeff.data.datasets import (
    collect_behaviour_dataset,
    load_behaviour_dataset,
    load_d4rl_hdf5,
    load_minari,
)
from torchrl_depeff.data.scores import d4rl_normalized_score
from torchrl_depeff.envs.tasks import get_task
from torchrl_depeff.modules.mixture import make_gmm_actor

TASKS = ("halfcheetah", "hopper", "walker2d")
DATASETS = ("random", "medium", "mixed", "medium-expert", "expert")

#: local stand-ins for the D4RL datasets: noise variant of ``collect_behaviour_dataset`` around
#: the behaviour policy (BREMEN App. G.4 variants). "mixed" (D4RL: the medium policy's whole
#: replay buffer) is approximated by eps3 (40 % pi_b, 40 % eps-greedy 0.3, 20 % uniform), the
#: widest non-random coverage; "medium-expert" by gaussian1 (two action distributions).
LOCAL_NOISE: dict[str, str | None] = {
    "random": "random",
    "medium": None,
    "mixed": "eps3",
    "medium-expert": "gaussian1",
    "expert": None,
}


def make_real_env(task: str, seed: int = 0) -> TransformedEnv:
    """The real gymnasium env of ``task`` with its *native* reward (the D4RL scores' reward).

    :func:`torchrl_depeff.envs.make_env` replaces the reward by BREMEN's Table 3 reward; D4RL's
    reference returns are in gym's own reward, so datasets and evaluation use ``GymEnv`` here.
    """
    spec = get_task(task)
    env = TransformedEnv(GymEnv(spec.gym_id, **spec.gym_kwargs), DoubleToFloat())
    env.set_seed(seed)
    return env


def behaviour_policy(task: str, seed: int, path: str | None = None) -> torch.nn.Module:
    """The behaviour policy of locally generated datasets.

    With ``path`` (a ``state_dict`` of a ``make_gmm_actor`` with the default sizes saved by
    ``torch.save``), that actor; otherwise a stand-in: a randomly initialised (seeded) 2 x 64
    GMM actor. The stand-in is not a "medium" or "expert" policy: local scores are not
    comparable to the paper's D4RL numbers.
    """
    spec = get_task(task)
    if path:
        actor = make_gmm_actor(spec.observation_dim, spec.action_dim)
        actor.load_state_dict(torch.load(path, weights_only=True))
        return actor
    with torch.random.fork_rng():
        torch.manual_seed(seed + 12345)
        return make_gmm_actor(spec.observation_dim, spec.action_dim, num_cells=(64, 64))


def load_or_make_dataset(cfg: Any, out_dir: Path) -> TensorDict:
    """The offline dataset of the run: D4RL HDF5, local Minari, or generated and cached locally."""
    source = cfg.data.source
    if source == "d4rl":
        if not cfg.data.path:
            raise ValueError("data.source=d4rl needs data.path (a local D4RL .hdf5 file)")
        return load_d4rl_hdf5(cfg.data.path)
    if source == "minari":
        if not cfg.data.minari_id:
            raise ValueError("data.source=minari needs data.minari_id")
        rb = load_minari(cfg.data.minari_id, cfg.data.path or str(out_dir / "minari"))
        data = rb[:]
        return data.exclude(*[k for k in ("index",) if k in data.keys()])
    if source != "local":
        raise ValueError(f"data.source must be 'local', 'd4rl' or 'minari', got {source!r}")
    if cfg.dataset not in LOCAL_NOISE:
        raise ValueError(f"dataset must be one of {list(LOCAL_NOISE)}, got {cfg.dataset!r}")
    path = out_dir / "dataset"
    if (path / "metadata.json").exists():
        return load_behaviour_dataset(path).clone()
    env = make_real_env(cfg.task, cfg.seed)
    policy = behaviour_policy(cfg.task, cfg.seed, cfg.data.get("behaviour_policy_path"))
    data = collect_behaviour_dataset(
        policy, env, int(cfg.data.num_transitions), noise=LOCAL_NOISE[cfg.dataset], seed=cfg.seed, path=path
    )
    env.close()
    return data


def build_config(cfg: Any) -> MB2POConfig:
    """``MB2POConfig`` from the preset and the paper's per-dataset alpha / omega / h / lambda."""
    key = f"{cfg.task}-{cfg.dataset}"
    if key not in cfg.paper_hparams:
        raise ValueError(f"no MB2PO hyper-parameters for {key!r}; known: {sorted(cfg.paper_hparams)}")
    hp = cfg.paper_hparams[key]
    from omegaconf import OmegaConf

    preset = OmegaConf.to_container(cfg.presets[cfg.preset], resolve=True)
    known = set(MB2POConfig.__dataclass_fields__)
    kwargs = {k: tuple(v) if isinstance(v, list) else v for k, v in preset.items() if k in known}
    kwargs.update(
        awac_lambda=float(hp.alpha), omega=float(hp.omega), horizon=int(hp.h),
        penalty_coef=float(hp["lambda"]), seed=int(cfg.seed),
    )
    return MB2POConfig(**kwargs)


def evaluate_score(algo: MB2PO, env: Any, task: str, episodes: int, max_steps: int) -> dict[str, float]:
    """Real-env returns and the D4RL normalised score."""
    metrics = algo.evaluate(env, episodes, max_steps=max_steps)
    metrics["eval/normalized_score"] = float(d4rl_normalized_score(task, metrics["eval/return_mean"]))
    return metrics


def save_checkpoint(state: dict, path: Path) -> None:
    """Atomic save: write ``path.tmp`` then ``os.replace`` (a crash never leaves half a file)."""
    tmp = path.with_name(path.name + ".tmp")
    torch.save(state, tmp)
    os.replace(tmp, path)


def load_checkpoint(path: Path) -> dict | None:
    """The checkpoint at ``path`` (``weights_only=True``), or ``None`` if there is none."""
    if not path.exists():
        return None
    return torch.load(path, weights_only=True)


def plot_learning_curve(history: list[dict], path: Path, title: str) -> None:
    """Normalised score against AWAC gradient steps (pre-training then fine-tuning), PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    for phase, style in (("pretrain", "o-"), ("finetune", "s-")):
        pts = [(h["grad_steps"], h["score"]) for h in history if h["phase"] == phase]
        if pts:
            xs, ys = zip(*pts)
            ax.plot(xs, ys, style, label="AWAC" if phase == "pretrain" else "MB2PO fine-tuning")
    ax.set_xlabel("AWAC gradient steps")
    ax.set_ylabel("D4RL normalised score")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    tmp = path.with_name(path.stem + ".tmp.png")
    fig.savefig(tmp, dpi=100)
    plt.close(fig)
    os.replace(tmp, path)


def write_json(obj: Any, path: Path) -> None:
    """Atomic JSON write."""
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "w") as f:
        json.dump(obj, f, indent=2)
    os.replace(tmp, path)


def finite(x: float) -> bool:
    """``True`` for a finite float."""
    return isinstance(x, float) and math.isfinite(x)


def dataset_summary(data: TensorDictBase) -> dict[str, float]:
    """Size and mean reward of a dataset."""
    return {"rows": float(data.shape[0]), "reward_mean": data.get(("next", "reward")).float().mean().item()}
