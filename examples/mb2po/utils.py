"""Helpers of the MB2PO example: datasets, real env, config, checkpoints, learning curve."""
from __future__ import annotations

import json
import math
import os
from pathlib import Path
from typing import Any

import torch
from tensordict import TensorDict, TensorDictBase
from tensordict.nn import TensorDictModule, TensorDictModuleBase, TensorDictSequential
from torchrl._utils import logger as torchrl_logger
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


class _ClipAction(torch.nn.Module):
    """``action -> clamp(action, low, high)``: the action the real env executes (MuJoCo clips)."""

    def __init__(self, low: torch.Tensor, high: torch.Tensor) -> None:
        super().__init__()
        self.register_buffer("low", low.clone())
        self.register_buffer("high", high.clone())

    def forward(self, action: torch.Tensor) -> torch.Tensor:
        return torch.clamp(action, self.low, self.high)


def _bremen_behaviour_policy(task: str, checkpoint: dict, path: str) -> TensorDictModuleBase:
    """The actor of a BREMEN checkpoint, rebuilt as :class:`BREMEN` builds it, then clipped."""
    from torchrl_depeff.algorithms.bremen import BREMENConfig

    spec = get_task(task)
    try:
        cfg = BREMENConfig.from_dict(dict(checkpoint["config"]))
    except (KeyError, TypeError, ValueError) as err:
        raise ValueError(f"{path}: 'config' is not a valid BREMENConfig ({err})") from err
    saved = get_task(cfg.task)
    # walker2d and halfcheetah share sizes (17 / 6): the gym env must match too
    sizes = lambda t: (t.gym_id, t.observation_dim, t.action_dim)  # noqa: E731
    if sizes(saved) != sizes(spec):
        raise ValueError(
            f"{path}: BREMEN policy of task {cfg.task!r} ({saved.gym_id}, observation "
            f"{saved.observation_dim}, action {saved.action_dim}) cannot act in task {task!r} "
            f"({spec.gym_id}, observation {spec.observation_dim}, action {spec.action_dim})"
        )
    if cfg.task != task:
        torchrl_logger.warning(f"{path}: BREMEN policy trained on {cfg.task!r} used for {task!r}")
    actor = cfg.make_actor()  # BREMEN's own constructor (no observation normalisation: BREMEN has none)
    try:
        actor.load_state_dict(checkpoint["actor"])
    except RuntimeError as err:
        raise ValueError(f"{path}: 'actor' does not match its config ({err})") from err
    env = make_real_env(task)
    action_spec = env.action_spec
    env.close()
    clip = TensorDictModule(
        _ClipAction(action_spec.space.low, action_spec.space.high), in_keys=["action"], out_keys=["action"]
    )
    return TensorDictSequential(actor, clip)


def behaviour_policy(task: str, seed: int, path: str | None = None) -> TensorDictModuleBase:
    """The behaviour policy ``pi_b`` of locally generated datasets (reads ``"observation"``,
    writes ``"action"``; usable by :func:`collect_behaviour_dataset`).

    ``path`` (optional) is read with ``torch.load(weights_only=True)`` and may hold:

    * a BREMEN example checkpoint (a dict with ``"config"`` and ``"actor"`` keys, as written by
      :meth:`BREMEN.state_dict <torchrl_depeff.algorithms.bremen.BREMEN.state_dict>`): its
      actor, rebuilt with ``make_gaussian_actor`` and the checkpoint's ``BREMENConfig`` exactly
      as BREMEN builds it (``tanh(mu(s)) + N(0, sigma^2)``, no observation normalisation), so
      its deterministic action is BREMEN's. Choice: a clip to the env's action bounds follows
      the actor: BREMEN deploys the noisy action unclipped and MuJoCo clips it, so without the
      clip the dataset would store actions outside ``[-1, 1]`` that the env never executed
      (``collect_behaviour_dataset`` clips its Gaussian noise for the same reason). Sampling
      follows the exploration type (random by default, as BREMEN deploys it).
    * a ``state_dict`` of a ``make_gmm_actor`` with the default sizes (4 x 256, 5 heads).

    Without ``path``: a stand-in, a randomly initialised (seeded) 2 x 64 GMM actor. The stand-in
    is not a "medium" or "expert" policy: local scores are not comparable to the paper's D4RL
    numbers.

    Args:
        task (str): task name (``TASKS``); fixes the observation and action sizes.
        seed (int): seed of the random stand-in (unused with ``path``).
        path (str, optional): BREMEN checkpoint or GMM ``state_dict`` file.

    Raises:
        FileNotFoundError: ``path`` does not exist.
        ValueError: ``path`` is neither format, or its policy was trained on another gym env or
            has other observation / action sizes than ``task``.

    Examples:
        >>> import tempfile, torch
        >>> from tensordict import TensorDict
        >>> from torchrl_depeff.algorithms.bremen import BREMENConfig
        >>> from torchrl_depeff.modules.actors import make_gaussian_actor
        >>> bremen_actor = make_gaussian_actor(17, 6, num_cells=(8,), activation=torch.nn.ReLU)
        >>> ckpt = {"config": BREMENConfig(policy_num_cells=(8,)).to_dict(), "actor": bremen_actor.state_dict()}
        >>> path = tempfile.mktemp(suffix=".pt"); torch.save(ckpt, path)
        >>> pi_b = behaviour_policy("halfcheetah", 0, path)
        >>> td = pi_b(TensorDict(observation=torch.randn(4, 17), batch_size=[4]))
        >>> td["action"].shape, bool(td["action"].abs().max() <= 1)
        (torch.Size([4, 6]), True)
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
    if not isinstance(state, dict):
        raise ValueError(
            f"{path}: expected a dict (BREMEN checkpoint or state_dict), got {type(state).__name__}"
        )
    if "config" in state and "actor" in state:
        return _bremen_behaviour_policy(task, state, str(path))
    actor = make_gmm_actor(spec.observation_dim, spec.action_dim)
    expected = set(actor.state_dict())
    if set(state) != expected:
        raise ValueError(
            f"{path}: neither a BREMEN checkpoint (keys 'config' and 'actor') nor a state_dict of a "
            f"default-size make_gmm_actor; its keys: {sorted(state)[:8]}"
        )
    try:
        actor.load_state_dict(state)
    except RuntimeError as err:
        raise ValueError(f"{path}: GMM actor state_dict does not fit task {task!r} ({err})") from err
    return actor


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
