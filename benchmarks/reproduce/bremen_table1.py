"""BREMEN Table 1 / Table 7: offline BREMEN vs BC vs offline ME-TRPO on a generated HalfCheetah dataset.

The dataset (App. G.4) is collected by a *partially trained* BREMEN policy (a short recursive run,
cached) with two noise variants (``eps1``, ``gaussian1``); each algorithm then runs Alg. 2 on it:
BREMEN (model, BC initialisation, TRPO), BC (the BC policy alone) and offline ME-TRPO (model and
TRPO, no BC initialisation).

    python -m benchmarks.reproduce.bremen_table1 --seeds 5
    python -m benchmarks.reproduce.bremen_table1 --quick
"""
from __future__ import annotations

import json
import time
from pathlib import Path

from benchmarks.reproduce import behaviour
from benchmarks.reproduce.common import Job, parse_args, ROOT, RESULTS, run_jobs, summarize, write_results
from torchrl_depeff.algorithms import BREMENConfig

CLAIM = "bremen_table1"
TASK = "halfcheetah"
NOISES = ("eps1", "gaussian1")
ALGORITHMS = {"BREMEN": "bremen", "BC": "recursive_bc", "ME-TRPO": "me_trpo"}
COMPARISONS = [("BREMEN", "BC"), ("BREMEN", "ME-TRPO")]

SCALES = {
    "full": {
        "behaviour": {"deployment.num_deployments": 2, "deployment.size": 4000, "trpo.iterations": 40},
        "dataset_size": 50_000,
        "offline": {"trpo.iterations": 200, "model.max_epochs": 30, "bc.data": "all"},
    },
    "quick": {
        "behaviour": {"deployment.num_deployments": 1},
        "dataset_size": 300,
        "offline": {"trpo.iterations": 2, "deployment.size": 300, "imagination.rollout_length": 10,
                    "trpo.batch_size": 200},
    },
}


def main() -> None:
    args = parse_args(__doc__.splitlines()[0])
    scale = "quick" if args.quick else "full"
    s = SCALES[scale]
    out = args.out or ROOT / "runs" / "reproduce" / (CLAIM + ("-quick" if args.quick else ""))
    t0 = time.perf_counter()
    # 1. a partially trained behaviour policy (BREMEN, seed 1000: not one of the evaluated seeds)
    base = BREMENConfig.preset(TASK, "smoke" if args.quick else "quick")
    ckpt, last = behaviour.trained_policy(out / "behaviour", base.override({**s["behaviour"], "seed": 1000}))
    # 2. the two datasets (App. G.4 noise variants)
    data = {noise: behaviour.dataset(out / "datasets" / noise, ckpt, task=TASK, size=s["dataset_size"], noise=noise,
                                     seed=2000) for noise in NOISES}
    # 3. Alg. 2 for every algorithm, noise variant and seed
    jobs = []
    for noise in NOISES:
        for seed in range(args.seeds):
            for name, variant in ALGORITHMS.items():
                cfg = base.override({**s["offline"], "mode": "offline", "seed": seed}).variant(variant)
                jobs.append(Job(CLAIM, name, TASK, seed, "bremen_offline", cfg.to_dict(),
                                {"dataset": str(data[noise]), "label": {"noise": noise}}))
    records = run_jobs(jobs, out, parallel=args.jobs, reuse=args.reuse)
    group = ("algorithm", "noise")
    summary = summarize(records, comparisons=COMPARISONS, group=group)
    meta = {"scale": scale, "behaviour_policy_eval_return": last.get("eval/return_mean"),
            "behaviour": s["behaviour"], "dataset_size": s["dataset_size"], "offline": s["offline"], "seeds": args.seeds,
            "parallel_jobs": args.jobs, "wall_s_this_invocation": round(time.perf_counter() - t0, 1)}
    where = args.results or (out if args.quick else RESULTS)
    paths = write_results(CLAIM, records, summary, meta, where,
                          f"BREMEN Table 1 (offline, {TASK}, {s['dataset_size']} transitions)", group=group)
    print(json.dumps({"claim": CLAIM, "paths": {k: str(v) for k, v in paths.items()}, "poi": summary["poi"]}))


if __name__ == "__main__":
    main()
