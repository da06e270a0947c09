"""Model-based quick demo: fit a dynamics ensemble on HalfCheetah-v5 data, roll out in the model.

Run: ``python -m examples.model_env_demo`` (CPU, a few minutes).

1. collect random-policy transitions in the real env (HalfCheetah-v5 with BREMEN's Table 3 reward),
2. fit a 5-member deterministic ensemble (BREMEN eq. 1) with early stopping on a 15 % holdout,
3. roll a random policy out in :class:`~torchrl_depeff.envs.EnsembleModelEnv` from recorded start
   states, one random member per step (BREMEN eq. 2), and compare the imaginary per-step reward with
   the real one and the model's open-loop error on held-out real trajectories.
"""
from __future__ import annotations

import argparse
import logging
import time

import torch
import tqdm
from tensordict import TensorDict

from torchrl_depeff.envs import EnsembleModelEnv, make_env
from torchrl_depeff.modules import DynamicsEnsemble
from torchrl_depeff.trainers import EnsembleTrainer

log = logging.getLogger("model_env_demo")


def collect_random(env, num_steps: int, episode_length: int) -> TensorDict:
    """Collect ``num_steps`` random-action transitions, ``episode_length`` steps per episode."""
    chunks = []
    with tqdm.tqdm(total=num_steps, desc="collect (random policy)", unit="step") as bar:
        while sum(c.numel() for c in chunks) < num_steps:
            steps = min(episode_length, num_steps - sum(c.numel() for c in chunks))
            chunks.append(env.rollout(steps, break_when_any_done=False))
            bar.update(steps)
    return torch.cat(chunks, 0)


def main(argv: list[str] | None = None) -> dict[str, float]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--task", default="halfcheetah")
    parser.add_argument("--num-steps", type=int, default=10_000, help="real transitions")
    parser.add_argument("--episode-length", type=int, default=1000)
    parser.add_argument("--num-cells", type=int, nargs="+", default=[200, 200])
    parser.add_argument("--num-members", type=int, default=5)
    parser.add_argument("--max-epochs", type=int, default=30)
    parser.add_argument("--rollouts", type=int, default=1000, help="parallel imaginary rollouts")
    parser.add_argument("--horizon", type=int, default=100)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    torch.manual_seed(args.seed)

    # Create env
    env = make_env(args.task)
    env.set_seed(args.seed)

    # Collect data
    t0 = time.perf_counter()
    data = collect_random(env, args.num_steps, args.episode_length)
    real_reward = data["next", "reward"].mean().item()

    # Fit the ensemble (BREMEN eq. 1)
    obs_dim = data["observation"].shape[-1]
    act_dim = data["action"].shape[-1]
    ensemble = DynamicsEnsemble(
        obs_dim, act_dim, num_members=args.num_members, num_cells=tuple(args.num_cells)
    )
    trainer = EnsembleTrainer(ensemble, max_epochs=args.max_epochs, progress=True, seed=args.seed)
    fit = trainer.fit(data)
    log.info("holdout MSE per member (normalised): %s", [round(x, 4) for x in fit.holdout_loss.tolist()])

    # Imaginary rollouts (BREMEN eq. 2), start states = recorded observations
    model_env = EnsembleModelEnv.from_env(
        env,
        ensemble,
        task=args.task,
        start_states=data.select("observation"),
        batch_size=args.rollouts,
        member_selection="per_step",
        uncertainty=("disagreement",),
    )
    model_env.set_seed(args.seed)
    with torch.no_grad():
        imagined = model_env.rollout(args.horizon, break_when_any_done=False)
    model_reward = imagined["next", "reward"].mean().item()
    disagreement = imagined["next", "model_disagreement"].mean().item()
    metrics = {
        "real/reward_per_step": real_reward,
        "model/reward_per_step": model_reward,
        "model/disagreement": disagreement,
        "model/holdout_loss": fit.holdout_loss.mean().item(),
        "model/epochs": float(fit.epochs),
        "time/total_s": time.perf_counter() - t0,
    }
    for key, value in metrics.items():
        log.info("%-26s %10.4f", key, value)
    return metrics


if __name__ == "__main__":
    main()
