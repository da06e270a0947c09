"""Behaviour cloning (the pretrain phase of every BREMEN/MUSBO deployment): train_bc's two loss paths.

Run from the repository root: ``python -m benchmarks.bench_bc`` (seconds on 2 cores), ``--rows``,
``--epochs``, ``--rounds``, ``--threads N``, ``--weighted`` (MUSBO eq. 11 weights).

The actor is the one BREMEN's quick preset clones (``BREMENConfig.preset("halfcheetah",
"quick").make_actor(learn_sigma=False)``: 17-64-64-6, ``tanh`` mean, fixed sigma), the data a
synthetic deployment of ``--rows`` transitions with the ~20 entries a real one holds (the
collector's, the env's and the deployed policy's). :func:`~torchrl_depeff.objectives.train_bc`
runs with BREMEN's settings (Adam 5e-4, minibatches of 256, 15 % holdout) for exactly
``--epochs`` epochs (patience = epochs: the same work every round) in two ways, interleaved:

* ``plain``: the default, the loss on plain tensors (``WeightedBCLoss._plain_loss``);
* ``tensordict``: the same call with ``_plain_loss`` refused, i.e. ``WeightedBCLoss.forward`` on
  a TensorDict minibatch (of the entries the loss reads) every step.

One JSON line per path: the best of ``--rounds`` rounds (seconds and milliseconds per Adam step),
then the speed ratio and whether both paths ended with the same parameters bit for bit (they must).
"""
from __future__ import annotations

import argparse
import json
import time
from unittest import mock

import torch
from tensordict import TensorDict

from torchrl_depeff.algorithms import BREMENConfig
from torchrl_depeff.objectives.bc import train_bc, WeightedBCLoss


def _deployment(rows: int, seed: int = 0) -> TensorDict:
    """A deployment-shaped dataset: 17-dim observations, actions from a noisy tanh-linear behaviour."""
    g = torch.Generator().manual_seed(seed)
    obs = torch.randn(rows, 17, generator=g)
    behaviour = torch.randn(17, 6, generator=g) * 0.3
    action = (torch.tanh(obs @ behaviour) + 0.1 * torch.randn(rows, 6, generator=g)).clamp(-1, 1)
    flag = torch.zeros(rows, 1, dtype=torch.bool)
    return TensorDict(
        {
            "observation": obs, "action": action, "loc": torch.tanh(obs @ behaviour),
            "scale": torch.full((rows, 6), 0.1), "action_log_prob": torch.randn(rows, generator=g),
            "env_reward": torch.randn(rows, 1, generator=g), "done": flag, "terminated": flag.clone(),
            "truncated": flag.clone(), "deployment": torch.zeros(rows, dtype=torch.long),
            "policy_version": torch.zeros(rows, dtype=torch.long), "index": torch.arange(rows),
            "next": {
                "observation": torch.randn(rows, 17, generator=g), "reward": torch.randn(rows, 1, generator=g),
                "env_reward": torch.randn(rows, 1, generator=g), "done": flag.clone(),
                "terminated": flag.clone(), "truncated": flag.clone(),
            },
            "collector": {"traj_ids": torch.arange(rows) // 1000},
            "weight": torch.rand(rows, generator=g),
        },
        batch_size=[rows],
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=4000, help="transitions (the quick preset's B)")
    parser.add_argument("--epochs", type=int, default=20)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    parser.add_argument("--weighted", action="store_true", help="MUSBO eq. (11) per-row weights")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    cfg = BREMENConfig.preset("halfcheetah", "quick")
    data = _deployment(args.rows)
    kwargs = dict(lr=cfg.bc.lr, batch_size=cfg.bc.batch_size, holdout_ratio=cfg.bc.holdout_ratio,
                  max_epochs=args.epochs, patience=args.epochs, weight_key="weight" if args.weighted else None)
    n_train = args.rows - int(args.rows * cfg.bc.holdout_ratio)
    steps = args.epochs * -(-n_train // cfg.bc.batch_size)
    print(json.dumps({"figure": "config", "threads": torch.get_num_threads(), "torch": torch.__version__,
                      "rows": args.rows, "epochs": args.epochs, "adam_steps": steps, "weighted": args.weighted}))

    def run(path: str) -> tuple[float, torch.nn.Module]:
        torch.manual_seed(0)
        actor = cfg.make_actor(learn_sigma=False)
        if path == "plain":
            start = time.perf_counter()
            train_bc(actor, data, **kwargs)
        else:
            with mock.patch.object(WeightedBCLoss, "_plain_loss", lambda self: None):
                start = time.perf_counter()
                train_bc(actor, data, **kwargs)
        return time.perf_counter() - start, actor

    best: dict[str, float] = {}
    actors: dict[str, torch.nn.Module] = {}
    for _ in range(args.rounds):
        for path in ("plain", "tensordict"):
            sec, actors[path] = run(path)
            best[path] = min(best.get(path, float("inf")), sec)
    for path, sec in best.items():
        print(json.dumps({"figure": "train_bc", "path": path, "seconds": round(sec, 3),
                          "ms_per_step": round(sec / steps * 1e3, 3)}))
    same = all(torch.equal(a, b) for a, b in zip(actors["plain"].state_dict().values(),
                                                 actors["tensordict"].state_dict().values()))
    print(json.dumps({"figure": "summary", "plain_over_tensordict_speed": round(best["tensordict"] / best["plain"], 2),
                      "bitwise_equal_parameters": same}))


if __name__ == "__main__":
    main()
