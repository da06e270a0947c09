"""MUSBO sec. 5: MUSBO vs BREMEN at equal samples and deployments, plus MUSBO without eq. (22) exploration.

    python -m benchmarks.reproduce.musbo_sec5 --seeds 5 --reuse runs/reproduce/bremen_fig2
    python -m benchmarks.reproduce.musbo_sec5 --quick
"""
from __future__ import annotations

import json
import time

from benchmarks.reproduce.common import Job, parse_args, ROOT, RESULTS, run_jobs, summarize, write_results
from torchrl_depeff.algorithms import BREMENConfig, MUSBOConfig

CLAIM = "musbo_sec5"
TASKS = ("halfcheetah", "hopper")
COMPARISONS = [("MUSBO", "BREMEN"), ("MUSBO", "MUSBO-no-exploration")]

#: shared by the three algorithms (over their "quick" presets): same deployments, samples, TRPO budget
SCALES = {
    # the quick presets cut to 3 deployments x 4000 transitions: the scale of bremen_fig2, whose
    # BREMEN runs are the same jobs (same config and seed; ``--reuse`` copies them)
    "full": {"deployment.num_deployments": 3},
    "quick": {"deployment.num_deployments": 2, "deployment.size": 300, "deployment.frames_per_batch": 100,
              "trpo.iterations": 2, "trpo.batch_size": 200, "imagination.rollout_length": 10,
              "model.num_members": 2, "model.num_cells": (16,), "model.max_epochs": 2, "policy.num_cells": (8,),
              "bc.max_epochs": 2, "evaluation.episodes": 1, "evaluation.max_steps": 20},
}
_MUSBO_ONLY = {"quick": {"labeler.num_cells": (16,), "labeler.max_epochs": 2, "analysis.horizon": 5,
                         "analysis.num_trajectories": 4}, "full": {}}


def main() -> None:
    args = parse_args(__doc__.splitlines()[0])
    scale = "quick" if args.quick else "full"
    out = args.out or ROOT / "runs" / "reproduce" / (CLAIM + ("-quick" if args.quick else ""))
    jobs = []
    for task in TASKS:
        for seed in range(args.seeds):
            musbo = MUSBOConfig.preset(task, "quick").override({**SCALES[scale], **_MUSBO_ONLY[scale], "seed": seed})
            bremen = BREMENConfig.preset(task, "quick").override({**SCALES[scale], "seed": seed})
            jobs += [Job(CLAIM, "MUSBO", task, seed, "musbo", musbo.to_dict()),
                     Job(CLAIM, "MUSBO-no-exploration", task, seed, "musbo", musbo.variant("no_exploration").to_dict()),
                     Job(CLAIM, "BREMEN", task, seed, "bremen", bremen.to_dict())]
    t0 = time.perf_counter()
    records = run_jobs(jobs, out, parallel=args.jobs, reuse=args.reuse)
    summary = summarize(records, comparisons=COMPARISONS)
    meta = {"scale": scale, "overrides": {k: list(v) if isinstance(v, tuple) else v for k, v in SCALES[scale].items()},
            "seeds": args.seeds, "parallel_jobs": args.jobs, "wall_s_this_invocation": round(time.perf_counter() - t0, 1)}
    where = args.results or (out if args.quick else RESULTS)
    paths = write_results(CLAIM, records, summary, meta, where, "MUSBO sec. 5 vs BREMEN (equal samples and deployments)")
    print(json.dumps({"claim": CLAIM, "paths": {k: str(v) for k, v in paths.items()}, "poi": summary["poi"]}))


if __name__ == "__main__":
    main()
