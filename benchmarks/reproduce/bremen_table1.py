"""BREMEN Table 1 / Table 7: offline BREMEN vs BC vs offline ME-TRPO on a generated HalfCheetah dataset.

The dataset (sec. 5.1, App. G.1) is collected by a *partially trained* policy: recursive BREMEN
(quick preset, seed 1000) trained until its evaluation return reaches 1 000 (the paper trains SAC
to 4 000; :mod:`benchmarks.reproduce.behaviour`, shared with ``mb2po_table1``) with two noise
variants (``eps1``, ``gaussian1``); each algorithm then runs Alg. 2 on it:
BREMEN (model, BC initialisation, TRPO), BC (the BC policy alone) and offline ME-TRPO (model and
TRPO, no BC initialisation). The two TRPO algorithms are also evaluated every 20 of their 200
iterations (``evaluation.every_iterations``): the return against policy iterations, the axes of
the paper's Fig. 14, shows where the final policy came from (the verdict is on the final one).

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
        # the quick preset until the evaluation return reaches 1 000 (at most 10 x 4 000 samples; with
        # 1 500 the run peaked at 1 337 after 6 deployments, then fell to 165 at the 10th)
        "behaviour": {"threshold": 1000.0, "max_deployments": 10},
        "dataset_size": 50_000,
        # evaluated every 20 TRPO iterations as well: the return against iterations (Fig. 14's axes)
        "offline": {"trpo.iterations": 200, "model.max_epochs": 30, "bc.data": "all", "evaluation.every_iterations": 20},
    },
    "quick": {
        "behaviour": {"threshold": None, "max_deployments": 1},
        "dataset_size": 300,
        "offline": {"trpo.iterations": 2, "deployment.size": 300, "imagination.rollout_length": 10,
                    "trpo.batch_size": 200, "evaluation.every_iterations": 1},
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
    ckpt, beh = behaviour.trained_policy(behaviour.root_for(args, out), base.override({"seed": 1000}), **s["behaviour"])
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
                                {"dataset": str(data[noise]), "behaviour_sha256": beh["checkpoint_sha256"],
                                 "label": {"noise": noise}}))
    records = run_jobs(jobs, out, parallel=args.jobs, reuse=args.reuse)
    group = ("algorithm", "noise")
    summary = summarize(records, comparisons=COMPARISONS, group=group, iterations=s["offline"]["trpo.iterations"])
    meta = {"scale": scale, "behaviour_policy_eval_return": beh["eval_return"], "behaviour": beh,
            "dataset_size": s["dataset_size"], "offline": s["offline"], "seeds": args.seeds,
            "parallel_jobs": args.jobs, "wall_s_this_invocation": round(time.perf_counter() - t0, 1)}
    where = args.results or (out if args.quick else RESULTS)
    paths = write_results(CLAIM, records, summary, meta, where,
                          f"BREMEN Table 1 (offline, {TASK}, {s['dataset_size']} transitions)", group=group)
    print(json.dumps({"claim": CLAIM, "paths": {k: str(v) for k, v in paths.items()}, "poi": summary["poi"]}))


if __name__ == "__main__":
    main()
