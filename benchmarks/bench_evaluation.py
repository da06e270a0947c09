"""Real-env evaluation (the evaluate phase of every deployment): three ways to run the same episodes.

Run from the repository root: ``python -m benchmarks.bench_evaluation`` (~1 min on 2 cores),
``--episodes 2 5``, ``--max-steps 1000``, ``--rounds 3``, ``--threads N``.

The policy is BREMEN's 17-64-64-6 Gaussian actor (``make_gaussian_actor``, seed 0, untrained),
evaluated deterministically (its mean) on HalfCheetah-v5 by
:class:`~torchrl_depeff.algorithms.components.RealEnvEvaluation`, episode ``i`` seeded with
``10_000 + i``:

* ``make_env``: ``make_env("halfcheetah")`` (GymEnv + DoubleToFloat + TaskReward), one
  ``env.rollout`` per episode (the default before the one-copy native env);
* ``native_plain``: ``make_vector_env("halfcheetah", 1)``, BREMEN's default now: each episode
  runs without tensordicts (the actor's deterministic plain call, ``NativeVectorEnv.step_tensors``);
* ``batched``: ``make_batched_env=make_vector_env``: the episodes side by side in one batched
  env, one ``env.rollout``.

One JSON line per figure: the best of ``--rounds`` interleaved rounds (seconds per evaluation),
each variant's speed relative to ``make_env`` and whether its returns equal ``make_env``'s bit
for bit (``native_plain`` must; ``batched`` rounds the policy's matmul over several rows).
"""
from __future__ import annotations

import argparse
import functools
import json
import os
import time

import torch

from torchrl_depeff.algorithms.components import RealEnvEvaluation
from torchrl_depeff.envs import make_env, make_vector_env
from torchrl_depeff.modules.actors import make_gaussian_actor

TASK = "halfcheetah"


def _evaluators(episodes: int, max_steps: int) -> dict[str, RealEnvEvaluation]:
    kw = dict(episodes=episodes, max_steps=max_steps, seed=0)
    return {
        "make_env": RealEnvEvaluation(functools.partial(make_env, TASK), **kw),
        "native_plain": RealEnvEvaluation(functools.partial(make_vector_env, TASK, 1), **kw),
        "batched": RealEnvEvaluation(functools.partial(make_env, TASK), **kw,
                                     make_batched_env=functools.partial(make_vector_env, TASK)),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--episodes", type=int, nargs="+", default=[2, 5])
    parser.add_argument("--max-steps", type=int, default=1000)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    actor = make_gaussian_actor(17, 6, num_cells=(64, 64))
    print(json.dumps({"figure": "config", "threads": torch.get_num_threads(), "torch": torch.__version__,
                      "max_steps": args.max_steps, "rounds": args.rounds,
                      "load_avg_1min": round(os.getloadavg()[0], 2)}), flush=True)
    for episodes in args.episodes:
        evaluators = _evaluators(episodes, args.max_steps)
        for ev in evaluators.values():
            ev.returns(actor)  # builds the env (not timed)
        best = {name: float("inf") for name in evaluators}
        returns = {}
        for _ in range(args.rounds):
            for name, ev in evaluators.items():
                t0 = time.perf_counter()
                returns[name] = ev.returns(actor)[0]
                best[name] = min(best[name], time.perf_counter() - t0)
        for name in evaluators:
            print(json.dumps({
                "figure": "evaluation", "variant": name, "episodes": episodes, "seconds": round(best[name], 3),
                "speed_vs_make_env": round(best["make_env"] / best[name], 2),
                "returns_equal_make_env": bool(torch.equal(returns[name], returns["make_env"])),
                "return_mean": round(float(returns[name].mean()), 3),
                "load_avg_1min": round(os.getloadavg()[0], 2),
            }), flush=True)


if __name__ == "__main__":
    main()
