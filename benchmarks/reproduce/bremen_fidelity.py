"""Fidelity measurements for BREMEN's paper preset: BC re-init std (Alg. 1 vs App. F.2), policy input normalisation.

Alg. 1 line 6 re-initialises ``pi_theta0 = Normal(pi_beta_hat, 1)`` while App. F.2 keeps the
stationary ``sigma = 0.1``; BREMEN's reference code normalises the policy's inputs, the paper does
not say. Same seeds and samples for the three configurations on HalfCheetah:

* ``BREMEN`` (``bc.init_sigma = None``: keep sigma = 0.1, the package default),
* ``BREMEN-sigma1`` (``bc.init_sigma = 1.0``: Alg. 1 line 6 as printed),
* ``BREMEN-obsnorm`` (``policy.normalize_observations = True``).

    python -m benchmarks.reproduce.bremen_fidelity --seeds 5 --reuse runs/reproduce/bremen_fig2
    python -m benchmarks.reproduce.bremen_fidelity --quick
"""
from __future__ import annotations

import json
import time

from benchmarks.reproduce.bremen_fig2 import SCALES
from benchmarks.reproduce.common import Job, parse_args, ROOT, RESULTS, run_jobs, summarize, write_results
from torchrl_depeff.algorithms import BREMENConfig

CLAIM = "bremen_fidelity"
TASKS = ("halfcheetah",)
SETTINGS = {"BREMEN": {}, "BREMEN-sigma1": {"bc.init_sigma": 1.0}, "BREMEN-obsnorm": {"policy.normalize_observations": True}}
COMPARISONS = [("BREMEN", "BREMEN-sigma1"), ("BREMEN-obsnorm", "BREMEN")]


def main() -> None:
    args = parse_args(__doc__.splitlines()[0])
    scale = "quick" if args.quick else "full"
    out = args.out or ROOT / "runs" / "reproduce" / (CLAIM + ("-quick" if args.quick else ""))
    jobs = [Job(CLAIM, name, task, seed, "bremen",
                BREMENConfig.preset(task, "quick").override({**SCALES[scale], **setting, "seed": seed}).to_dict())
            for task in TASKS for seed in range(args.seeds) for name, setting in SETTINGS.items()]
    t0 = time.perf_counter()
    records = run_jobs(jobs, out, parallel=args.jobs, reuse=args.reuse)
    summary = summarize(records, comparisons=COMPARISONS)
    meta = {"scale": scale, "settings": SETTINGS, "seeds": args.seeds, "parallel_jobs": args.jobs,
            "wall_s_this_invocation": round(time.perf_counter() - t0, 1)}
    where = args.results or (out if args.quick else RESULTS)
    paths = write_results(CLAIM, records, summary, meta, where, "BREMEN fidelity: BC re-init std and input normalisation")
    print(json.dumps({"claim": CLAIM, "paths": {k: str(v) for k, v in paths.items()}, "poi": summary["poi"]}))


if __name__ == "__main__":
    main()
