"""Helpers of the MB2PO example: the offline dataset (D4RL, Minari or generated) and the report."""
from __future__ import annotations

import json
import logging
import math
from io import BytesIO
from pathlib import Path
from typing import Any

import torch
from omegaconf import DictConfig
from tensordict import TensorDictBase
from tensordict.nn import TensorDictModuleBase

from torchrl_depeff.algorithms.checkpoints import load_policy
from torchrl_depeff.algorithms.mb2po import make_native_env
from torchrl_depeff.collectors import collect_behaviour_dataset
from torchrl_depeff.data import load_behaviour_dataset, load_d4rl_hdf5, load_minari
from torchrl_depeff.envs.tasks import get_task
from torchrl_depeff.io import atomic_write_bytes, write_json_atomic
from torchrl_depeff.modules.mixture import make_gmm_actor

log = logging.getLogger(__name__)

#: local stand-ins for the D4RL datasets: noise variant of ``collect_behaviour_dataset`` around
#: the behaviour policy (BREMEN App. G.4 variants). "mixed" (D4RL: the medium policy's whole
#: replay buffer) is approximated by eps3 (40 % pi_b, 40 % eps-greedy 0.3, 20 % uniform), the
#: widest non-random coverage; "medium-expert" by gaussian1 (two action distributions).
LOCAL_NOISE: dict[str, str | None] = {
    "random": "random", "medium": None, "mixed": "eps3", "medium-expert": "gaussian1", "expert": None,
}
#: size of a generated dataset per preset when ``data.num_transitions`` is null
LOCAL_SIZES: dict[str, int] = {"paper": 1_000_000, "quick": 5000, "smoke": 300}

# ====================================================================
# Dataset
# --------------------------------------------------------------------


def behaviour_policy(task: str, seed: int, path: str | None = None) -> TensorDictModuleBase:
    """The behaviour policy ``pi_b`` of locally generated datasets (reads ``"observation"``, writes ``"action"``).

    ``path``: a BREMEN/MUSBO checkpoint (its actor, clipped to the action bounds, see
    :func:`~torchrl_depeff.algorithms.checkpoints.load_policy`) or a ``state_dict`` of a
    default-size ``make_gmm_actor``. Without ``path``: a seeded random 2 x 64 GMM actor, which
    is not a "medium" or "expert" policy (local scores are then not comparable to D4RL's).
    """
    spec = get_task(task)
    if not path:
        with torch.random.fork_rng():
            torch.manual_seed(seed + 12345)
            return make_gmm_actor(spec.observation_dim, spec.action_dim, num_cells=(64, 64))
    if not Path(path).is_file():
        raise FileNotFoundError(f"behaviour policy file {path!r} does not exist")
    try:
        state = torch.load(path, weights_only=True)
    except Exception as err:  # noqa: BLE001 - any unreadable file gets the same clear message
        raise ValueError(f"{path}: not a torch file loadable with weights_only=True ({err})") from err
    if isinstance(state, dict) and "config" in state and "actor" in state:
        return load_policy(path, task=task)
    actor = make_gmm_actor(spec.observation_dim, spec.action_dim)
    if not isinstance(state, dict) or set(state) != set(actor.state_dict()):
        keys = sorted(state)[:8] if isinstance(state, dict) else type(state).__name__
        raise ValueError(
            f"{path}: neither a BREMEN checkpoint (keys 'config' and 'actor') nor a state_dict of a "
            f"default-size make_gmm_actor; its keys: {keys}"
        )
    try:
        actor.load_state_dict(state)
    except RuntimeError as err:
        raise ValueError(f"{path}: GMM actor state_dict does not fit task {task!r} ({err})") from err
    return actor


def dataset_spec(cfg: DictConfig) -> dict[str, Any]:
    """What identifies the run's dataset (checked on every rerun of the same output_dir)."""
    d = cfg.data
    spec: dict[str, Any] = {"source": d.source, "task": cfg.task.name, "dataset": cfg.dataset.name}
    if d.source == "local":
        size = d.num_transitions if d.num_transitions is not None else LOCAL_SIZES[cfg.preset.name]
        spec.update(num_transitions=int(size), noise=LOCAL_NOISE[cfg.dataset.name],
                    behaviour_policy=d.behaviour_policy, seed=int(cfg.seed))
    else:
        spec.update(path=d.path, minari_id=d.minari_id)
    return spec


def load_or_make_dataset(cfg: DictConfig, run_dir: Path) -> tuple[TensorDictBase, str]:
    """The offline dataset ``D_beta`` and a label of its source.

    A generated ("local") dataset is cached in ``run_dir/dataset``; a rerun whose data options
    differ from the cached dataset's is refused, naming the differences.
    """
    spec = dataset_spec(cfg)
    spec_path = run_dir / "dataset_spec.json"
    if spec_path.exists():
        saved = json.loads(spec_path.read_text())
        diff = {k: (saved.get(k), spec.get(k)) for k in sorted(set(saved) | set(spec)) if saved.get(k) != spec.get(k)}
        if diff:
            raise ValueError(
                f"{run_dir} was run with another dataset; differing data options (saved -> current): "
                + ", ".join(f"{k}={a!r}->{b!r}" for k, (a, b) in diff.items()) + ". Use a new output_dir."
            )
    d = cfg.data
    if d.source == "d4rl":
        if not d.path:
            raise ValueError("data.source=d4rl needs data.path (a local D4RL .hdf5 file)")
        data, label = load_d4rl_hdf5(d.path), str(d.path)
    elif d.source == "minari":
        if not d.minari_id:
            raise ValueError("data.source=minari needs data.minari_id")
        rb = load_minari(d.minari_id, d.path or str(run_dir / "minari"))
        data, label = rb[:].exclude("index"), f"minari:{d.minari_id}"
    elif d.source == "local":
        if cfg.dataset.name not in LOCAL_NOISE:
            raise ValueError(f"dataset must be one of {list(LOCAL_NOISE)}, got {cfg.dataset.name!r}")
        path = run_dir / "dataset"
        if (path / "metadata.json").exists():
            data = load_behaviour_dataset(path).clone()
        else:
            env = make_native_env(cfg.task.name, int(cfg.seed))
            policy = behaviour_policy(cfg.task.name, int(cfg.seed), d.behaviour_policy)
            data = collect_behaviour_dataset(policy, env, spec["num_transitions"], noise=spec["noise"],
                                             seed=int(cfg.seed), path=path)
            env.close()
        label = f"local:{cfg.task.name}-{cfg.dataset.name}"
    else:
        raise ValueError(f"data.source must be 'local', 'd4rl' or 'minari', got {d.source!r}")
    write_json_atomic(spec, spec_path)
    return data, label


# ====================================================================
# Report
# --------------------------------------------------------------------


def plot_learning_curve(curve: list[dict], path: Path, title: str) -> None:
    """Normalised score against AWAC gradient steps (pre-training then fine-tuning), PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    for phase, style in (("pretrain", "o-"), ("finetune", "s-")):
        pts = [(h["grad_steps"], h["score"]) for h in curve if h["phase"] == phase]
        if pts:
            xs, ys = zip(*pts)
            ax.plot(xs, ys, style, label="AWAC" if phase == "pretrain" else "MB2PO fine-tuning")
    ax.set_xlabel("AWAC gradient steps")
    ax.set_ylabel("D4RL normalised score")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    buffer = BytesIO()
    fig.savefig(buffer, dpi=100, format="png")
    plt.close(fig)
    atomic_write_bytes(buffer.getvalue(), path)


def dataset_summary(data: TensorDictBase) -> dict[str, float]:
    """Size and mean reward of a dataset."""
    reward = data.get(("next", "reward")).float()
    return {"rows": float(data.shape[0]), "reward_mean": float(reward.mean()) if reward.numel() else math.nan}




