"""BREMEN Fig. 2 / sec. 5.2: recursive BREMEN vs ME-TRPO vs recursive BC vs the explicit-KL ablation.

Same deployments and samples for all four (BREMEN Alg. 1; ME-TRPO: no BC re-initialisation;
recursive BC: deploy the BC policy of the latest data; explicit KL: sec. 5.3, the KL penalty on
value without BC initialisation), on HalfCheetah and Hopper.

    python -m benchmarks.reproduce.bremen_fig2 --seeds 5      # the committed result (docs/results/)
    python -m benchmarks.reproduce.bremen_fig2 --quick        # smoke run (tests), not a result
"""
from __future__ import annotations

import json
import platform
import time
from pathlib import Path

from benchmarks.reproduce.common import Job, parse_args, ROOT, RESULTS, run_jobs, summarize, write_results
from torchrl_depeff.algorithms import BREMENConfig

CLAIM = "bremen_fig2"
ALGORITHMS = {"BREMEN": "bremen", "ME-TRPO": "me_trpo", "BC": "recursive_bc", "explicit-KL": "explicit_kl"}
TASKS = ("halfcheetah", "hopper")
COMPARISONS = [("BREMEN", "ME-TRPO"), ("BREMEN", "BC"), ("BREMEN", "explicit-KL")]

#: the scale of the committed result and the smoke scale, applied over the "quick" preset of each
#: task. Full: the quick preset cut to 3 deployments x 4000 transitions (60 TRPO iterations of 5000
#: imagined transitions each): one run takes about 2 minutes on one thread, the 40 runs about 45
#: minutes two at a time (the 5 deployments of the quick preset itself took about 4 minutes a run).
SCALES = {
    "full": {"deployment.num_deployments": 3},
    "quick": {"deployment.num_deployments": 2, "deployment.size": 300, "deployment.frames_per_batch": 100,
              "trpo.iterations": 2, "trpo.batch_size": 200, "imagination.rollout_length": 10,
              "model.num_members": 2, "model.num_cells": (16,), "model.max_epochs": 2, "policy.num_cells": (8,),
              "bc.max_epochs": 2, "evaluation.episodes": 1, "evaluation.max_steps": 20},
}


def make_config(task: str, variant: str, scale: str, seed: int) -> BREMENConfig:
    return BREMENConfig.preset(task, "quick").override(SCALES[scale]).variant(variant).override(seed=seed)


def main() -> None:
    args = parse_args(__doc__.splitlines()[0])
    scale = "quick" if args.quick else "full"
    out = args.out or ROOT / "runs" / "reproduce" / (CLAIM + ("-quick" if args.quick else ""))
    jobs = [Job(CLAIM, name, task, seed, "bremen", make_config(task, variant, scale, seed).to_dict())
            for task in TASKS for seed in range(args.seeds) for name, variant in ALGORITHMS.items()]
    t0 = time.perf_counter()
    records = run_jobs(jobs, out, parallel=args.jobs, reuse=args.reuse)
    summary = summarize(records, comparisons=COMPARISONS)
    meta = {"scale": scale, "overrides": {k: list(v) if isinstance(v, tuple) else v for k, v in SCALES[scale].items()},
            "preset": "quick", "seeds": args.seeds, "parallel_jobs": args.jobs, "torch_threads": 1,
            "wall_s_this_invocation": round(time.perf_counter() - t0, 1), "machine": platform.processor() or platform.machine()}
    where = args.results or (out if args.quick else RESULTS)
    paths = write_results(CLAIM, records, summary, meta, where, "BREMEN Fig. 2 / sec. 5.2 (deployment-constrained, IQM over seeds)")
    print(json.dumps({"claim": CLAIM, "paths": {k: str(v) for k, v in paths.items()}, "poi": summary["poi"]}))


if __name__ == "__main__":
    main()
