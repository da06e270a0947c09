"""Slow comparison: AWAC alone vs AWAC + MB2PO fine-tuning (MB2PO Table 1 protocol, reduced).

Both runs use the same seed (same network initialisation and the same pre-training batches) on
one locally generated "mixed" dataset (``collect_behaviour_dataset`` with the eps3 variant around
the behaviour policy of ``examples/mb2po/utils.behaviour_policy``: the random 2 x 64 GMM stand-in,
or with ``--behaviour-policy PATH`` a saved policy, e.g. a BREMEN example ``checkpoint.pt``)
and the paper's mixed-dataset hyper-parameters (App. 7.3: alpha 1, omega 0.01, lambda 1; h = 5
for halfcheetah, 1 otherwise):

* ``awac``: AWAC for ``pretrain_steps + iterations * awac_steps_per_iteration`` steps (the same
  number of gradient steps as the MB2PO run), then evaluated;
* ``awac_pretrained``: the MB2PO run's starting point (AWAC after ``pretrain_steps``);
* ``mb2po``: AWAC for ``pretrain_steps``, dynamics fit, then ``iterations`` MB2PO iterations.

Prints one JSON line per figure (D4RL normalised scores and returns), first the dataset's own
quality (``<task>-mixed/dataset``: mean return of its complete episodes, overall and per
behaviour mode 0 = pi_b, 1 = eps-greedy pi_b, 2 = uniform, in gym's native reward). Paper scale
is far beyond a CPU; the defaults take tens of minutes on 2 cores, ``--reduced`` a few minutes.
Local scores are not comparable with the paper's D4RL numbers (different behaviour policy).

Run: ``python benchmarks/compare_awac_mb2po.py --reduced [--behaviour-policy PATH]``.
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # for examples.mb2po.utils

from examples.mb2po.utils import behaviour_policy, LOCAL_NOISE, make_real_env  # noqa: E402
from torchrl_depeff.algorithms.mb2po import MB2PO, MB2POConfig  # noqa: E402
from torchrl_depeff.collectors import collect_behaviour_dataset  # noqa: E402
from torchrl_depeff.data.scores import d4rl_normalized_score  # noqa: E402
from torchrl_depeff.envs.tasks import get_task  # noqa: E402


def dataset_returns(data, task: str) -> dict:
    """Mean undiscounted return of the dataset's complete episodes, overall and per behaviour mode.

    Episodes end at ``("next", "done")``; a change of ``behaviour_mode`` also starts a new one
    (the modes are collected one after the other), and an episode cut by that change or by the
    end of the data is not complete and is left out.
    """
    reward = data.get(("next", "reward")).reshape(-1)
    done = data.get(("next", "done")).reshape(-1)
    mode = data.get("behaviour_mode").reshape(-1)
    new = torch.zeros_like(done)
    new[1:] = done[:-1] | (mode[1:] != mode[:-1])
    episode = new.long().cumsum(0)
    n = int(episode[-1]) + 1
    returns = torch.zeros(n, dtype=torch.float64).index_add_(0, episode, reward.double())
    complete = torch.zeros(n, dtype=torch.bool)
    complete[episode[done]] = True
    ep_mode = torch.zeros(n, dtype=torch.long).index_copy_(0, episode, mode)
    out = {
        "episodes": int(complete.sum()),
        "return_mean": float(returns[complete].mean()) if complete.any() else None,
    }
    ret = out["return_mean"]
    out["normalized_score"] = None if ret is None else float(d4rl_normalized_score(task, ret))
    for m in ep_mode.unique().tolist():
        sel = complete & (ep_mode == m)
        out[f"mode{m}_return_mean"] = float(returns[sel].mean()) if sel.any() else None
    out["reward_mean_per_step"] = float(reward.mean())
    return out


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--task", default="halfcheetah", choices=["halfcheetah", "hopper", "walker2d"])
    parser.add_argument("--num-transitions", type=int, default=50_000)
    parser.add_argument("--pretrain-steps", type=int, default=5_000)
    parser.add_argument("--iterations", type=int, default=20)
    parser.add_argument("--awac-steps-per-iteration", type=int, default=250)
    parser.add_argument("--model-samples", type=int, default=50_000, help="imagined transitions per iteration")
    parser.add_argument("--batch-size", type=int, default=256)
    parser.add_argument("--num-cells", type=int, nargs="+", default=[256, 256])
    parser.add_argument("--model-cells", type=int, nargs="+", default=[200, 200, 200, 200])
    parser.add_argument(
        "--model-max-epochs", type=int, default=30,
        help="epoch cap of the dynamics fit (early stopping on a holdout; the paper: 100 000 steps)",
    )
    parser.add_argument("--eval-episodes", type=int, default=5)
    parser.add_argument("--eval-max-steps", type=int, default=1000)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--penalty-uncertainty", default="std_norm", choices=["std_norm", "cov_frobenius"],
        help="u(s, a) of the MB2PO penalty: max_i ||sigma_i||_2 (default) or max_i ||sigma_i^2||_2",
    )
    parser.add_argument(
        "--behaviour-policy", default=None, metavar="PATH",
        help="BREMEN example checkpoint or GMM actor state_dict (default: random 2 x 64 GMM stand-in)",
    )
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--reduced", action="store_true", help="tiny sizes, a few minutes")
    args = parser.parse_args(argv)
    if args.reduced:
        args.num_transitions, args.pretrain_steps, args.iterations = 3000, 200, 3
        args.awac_steps_per_iteration, args.model_samples, args.batch_size = 50, 2000, 128
        args.num_cells, args.model_cells, args.eval_episodes, args.eval_max_steps = [64, 64], [64, 64], 1, 200
        args.model_max_epochs = 5
    torch.set_num_threads(args.threads)
    t0 = time.perf_counter()

    env = make_real_env(args.task, args.seed)
    data = collect_behaviour_dataset(
        behaviour_policy(args.task, args.seed, args.behaviour_policy), env, args.num_transitions,
        noise=LOCAL_NOISE["mixed"], seed=args.seed,
    )
    common = {"seed": args.seed, "behaviour_policy": args.behaviour_policy, "model_max_epochs": args.model_max_epochs}
    quality = dataset_returns(data, args.task)
    print(json.dumps({"figure": f"{args.task}-mixed/dataset", **quality, **common}), flush=True)
    h = 5 if args.task == "halfcheetah" else 1
    cfg = MB2POConfig(
        awac_lambda=1.0, omega=0.01, horizon=h, penalty_coef=1.0,  # MB2PO App. 7.3, "-mixed"
        batch_size=args.batch_size, num_cells=tuple(args.num_cells), model_cells=tuple(args.model_cells),
        pretrain_steps=args.pretrain_steps, num_iterations=args.iterations,
        awac_steps_per_iteration=args.awac_steps_per_iteration,
        model_samples_per_iteration=args.model_samples, rollout_batch_size=min(args.model_samples, 50_000),
        retain_iterations=100, model_max_epochs=args.model_max_epochs, seed=args.seed,
        penalty_uncertainty=args.penalty_uncertainty,
    )
    termination_fn = get_task(args.task).termination_fn
    eval_env = make_real_env(args.task, args.seed + 100)
    results = {}

    def report(name: str, algo: MB2PO) -> None:
        m = algo.evaluate(eval_env, args.eval_episodes, max_steps=args.eval_max_steps)
        score = float(d4rl_normalized_score(args.task, m["eval/return_mean"]))
        results[name] = score
        print(json.dumps({
            "figure": f"{args.task}-mixed/{name}", "normalized_score": score,
            "return_mean": m["eval/return_mean"], "return_std": m["eval/return_std"],
            "grad_steps": algo.pretrain_steps_done + algo.finetune_steps_done,
            "penalty_uncertainty": args.penalty_uncertainty, **common,
        }), flush=True)

    total = args.pretrain_steps + args.iterations * args.awac_steps_per_iteration
    awac = MB2PO(data, cfg, termination_fn=termination_fn)
    awac.pretrain(total, progress=True)
    report("awac", awac)

    mb2po = MB2PO(data, cfg, termination_fn=termination_fn)  # same seed: same init and batches
    mb2po.pretrain(args.pretrain_steps, progress=True)
    report("awac_pretrained", mb2po)
    mb2po.fit_model()
    mb2po.train(progress=True)
    report("mb2po", mb2po)
    print(json.dumps({
        "figure": f"{args.task}-mixed/mb2po_minus_awac", "delta": results["mb2po"] - results["awac"],
        "wall_s": time.perf_counter() - t0, **common,
    }))
    return results


if __name__ == "__main__":
    main()
