"""One paper-scale BREMEN HalfCheetah deployment phase, timed end to end per phase (issue 8).

Run on a GPU machine: ``python benchmarks/bench_bremen_gpu.py --device cuda`` (paper scale:
BREMEN Table 4 / App. F for HalfCheetah: a 200k-transition deployment, a 5 x [1024, 1024]
ensemble fitted to early stopping, BC, then 2000 TRPO iterations of 50k imaginary transitions
(200 rollouts of 250 steps), and a 3-episode evaluation).

Without CUDA (or with ``--reduced``) it runs a clearly reduced version and says so: the same
networks (ensemble 5 x [1024, 1024], policy [200, 200]) but ``deployment_size`` / 10,
``trpo_batch_size`` / 10, ``iterations_per_deployment`` 2000 -> ``--cpu-iterations`` (20),
``dynamics_max_epochs`` and ``bc_max_epochs`` capped at 3, one evaluation episode. Every JSON
line then carries ``"reduced": true`` and the ``"reduction"`` factors; the per-iteration TRPO
time is also printed with a linear extrapolation to 2000 iterations at the *reduced* batch
(labelled ``extrapolated``, not a measurement). On a shared CPU machine wrap it in the lock:
``flock /tmp/cpu.lock python benchmarks/bench_bremen_gpu.py``.

Figures, one JSON line each: ``config``; ``phase`` (``collect``, ``fit``, ``bc``, ``optimize``,
``evaluate``: seconds, with CUDA synchronised before each clock read, plus the phase's metrics);
``total`` (sum of the phases, the end-to-end deployment time). ``--num-envs`` real envs are
stepped in one process for the collection (``make_vector_env``, BREMEN's ``num_envs`` field).
"""
from __future__ import annotations

import argparse
import json
import math
import os
import tempfile
import time

import torch

from torchrl_depeff.algorithms.bremen import BREMEN, PAPER_HYPERPARAMETERS, BREMENConfig

#: reduction applied on CPU: (divisor of deployment_size, divisor of trpo_batch_size, epoch cap)
CPU_REDUCTION = {"deployment_size_div": 10, "trpo_batch_size_div": 10, "max_epochs_cap": 3, "eval_episodes": 1}


def _sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def _load() -> float:
    return round(os.getloadavg()[0], 2)


def _finite(metrics: dict) -> dict:
    return {k: (round(v, 5) if isinstance(v, float) and math.isfinite(v) else None if isinstance(v, float) else v)
            for k, v in metrics.items()}


def make_config(device: str, reduced: bool, cpu_iterations: int, num_envs: int, seed: int) -> tuple[BREMENConfig, dict]:
    """BREMEN's HalfCheetah preset (Table 4), reduced on CPU; returns the config and the reduction."""
    paper = BREMENConfig.paper("halfcheetah", device=device, seed=seed).override(
        {"deployment.num_envs": num_envs, "deployment.frames_per_batch": 50 * num_envs})
    if not reduced:
        return paper, {}
    r = CPU_REDUCTION
    cfg = paper.override({
        "deployment.size": paper.deployment.size // r["deployment_size_div"],
        "trpo.batch_size": paper.trpo.batch_size // r["trpo_batch_size_div"],
        "trpo.iterations": cpu_iterations,
        "model.max_epochs": min(paper.model.max_epochs, r["max_epochs_cap"]),
        "bc.max_epochs": min(paper.bc.max_epochs, r["max_epochs_cap"]),
        "evaluation.episodes": r["eval_episodes"],
        "log_interval": max(1, cpu_iterations),
        "checkpoint_interval": 10**9,
    })
    reduction = {
        "deployment.size": [paper.deployment.size, cfg.deployment.size],
        "trpo.batch_size": [paper.trpo.batch_size, cfg.trpo.batch_size],
        "trpo.iterations": [paper.trpo.iterations, cfg.trpo.iterations],
        "model.max_epochs": [paper.model.max_epochs, cfg.model.max_epochs],
        "bc.max_epochs": [paper.bc.max_epochs, cfg.bc.max_epochs],
        "evaluation.episodes": [paper.evaluation.episodes, cfg.evaluation.episodes],
    }
    return cfg, reduction


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--reduced", action="store_true", help="force the reduced setting on any device")
    parser.add_argument("--cpu-iterations", type=int, default=20, help="TRPO iterations of the reduced run")
    parser.add_argument("--num-envs", type=int, default=32)
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's)")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        raise SystemExit("--device cuda was requested but torch.cuda.is_available() is False")
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    reduced = args.reduced or not args.device.startswith("cuda")
    cfg, reduction = make_config(args.device, reduced, args.cpu_iterations, args.num_envs, args.seed)
    base = {"reduced": reduced, "device": args.device}
    if reduced:
        base["reduction"] = reduction
    gpu = torch.cuda.get_device_name() if args.device.startswith("cuda") else None
    print(json.dumps({
        "figure": "config", **base, "gpu": gpu, "torch": torch.__version__, "torch_threads": torch.get_num_threads(),
        "paper_preset": PAPER_HYPERPARAMETERS["halfcheetah"], "config": cfg.to_dict(), "load_avg_1min": _load(),
        "note": None if not reduced else "REDUCED run (no CUDA or --reduced): not the paper-scale timing",
    }), flush=True)

    with tempfile.TemporaryDirectory() as root:
        algo = BREMEN(cfg, data_root=root)
        total = 0.0
        phases = (
            ("collect", algo.collect),
            ("fit", algo.fit_model),
            ("pretrain", algo.pretrain),
            ("optimize", algo.optimize_policy),
            ("evaluate", algo.evaluate),
        )
        for name, fn in phases:  # the phases of BREMEN.deployment_step, one clock each
            _sync(args.device)
            t0 = time.perf_counter()
            metrics = fn()
            _sync(args.device)
            seconds = time.perf_counter() - t0
            total += seconds
            rec = {"figure": "phase", "phase": name, "seconds": round(seconds, 3), **base,
                   "metrics": _finite(metrics), "load_avg_1min": _load()}
            if name == "optimize" and cfg.trpo.iterations > 0:
                per_it = seconds / cfg.trpo.iterations
                rec["seconds_per_iteration"] = round(per_it, 4)
                rec["imaginary_transitions_per_s"] = round(cfg.trpo.batch_size / per_it, 1)
                if reduced:
                    rec["extrapolated_seconds_2000_iterations_at_reduced_batch"] = round(2000 * per_it, 1)
            if name == "collect":
                rec["transitions_per_s"] = round(cfg.deployment.size / seconds, 1)
            print(json.dumps(rec), flush=True)
        print(json.dumps({"figure": "total", "seconds": round(total, 3), **base, "load_avg_1min": _load()}),
              flush=True)


if __name__ == "__main__":
    main()
