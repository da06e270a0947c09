"""README main job (BREMEN quick preset) end to end: this checkout vs an earlier commit, interleaved.

    git worktree add /tmp/baseline <commit>
    python benchmarks/bench_quick_preset.py --baseline /tmp/baseline --rounds 2

Both run ``python -m examples.bremen.bremen`` (the quick preset, seed 0, logger off, each in its
own fresh output directory) from their own tree with the same interpreter and environment,
alternating baseline / current for ``--rounds`` rounds (the machine is shared: interleaving puts
both under the same load). One JSON line per run (wall seconds, load average, final table) and a
summary line with the ratio baseline / current of the best times and of the medians.
``--opt-in OVERRIDE...`` adds a third run per round, this checkout with those overrides (e.g.
``bremen.model.matmul_precision=bf16``), reported as ``current+opt_in``.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def run(tree: Path, out: Path, extra: list[str]) -> tuple[float, list[dict]]:
    cmd = [sys.executable, "-m", "examples.bremen.bremen", f"output_dir={out}", "logger.backend=none", *extra]
    env = {**os.environ, "PYTHONPATH": str(tree)}
    t0 = time.perf_counter()
    subprocess.run(cmd, cwd=tree, env=env, check=True, capture_output=True)
    seconds = time.perf_counter() - t0
    return seconds, json.loads((out / "metrics.json").read_text())


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--baseline", type=Path, required=True, help="a worktree of the earlier commit")
    p.add_argument("--rounds", type=int, default=2)
    p.add_argument("--extra", nargs="*", default=[], help="extra overrides for both runs")
    p.add_argument("--opt-in", nargs="*", default=[], help="overrides of a third run of this checkout")
    args = p.parse_args()
    variants = [("baseline", args.baseline.resolve(), []), ("current", ROOT, [])]
    if args.opt_in:
        variants.append(("current+opt_in", ROOT, args.opt_in))
    times: dict[str, list[float]] = {name: [] for name, _, _ in variants}
    tables = {}
    with tempfile.TemporaryDirectory() as tmp:
        for r in range(args.rounds):
            for name, tree, own in variants:
                seconds, history = run(tree, Path(tmp) / f"{name}-{r}", [*args.extra, *own])
                times[name].append(seconds)
                tables[name] = [{k: h.get(k) for k in ("deployment/count", "deployment/return_mean", "eval/return_mean")}
                                for h in history]
                print(json.dumps({"figure": "run", "tree": name, "round": r, "seconds": round(seconds, 1),
                                  "load_avg_1min": round(os.getloadavg()[0], 2), "final_eval": history[-1].get("eval/return_mean")}),
                      flush=True)
    summary = {
        "figure": "summary",
        "best_s": {k: round(min(v), 1) for k, v in times.items()},
        "median_s": {k: round(statistics.median(v), 1) for k, v in times.items()},
        "speedup_best": round(min(times["baseline"]) / min(times["current"]), 2),
        "speedup_median": round(statistics.median(times["baseline"]) / statistics.median(times["current"]), 2),
        **({"opt_in": args.opt_in,
            "opt_in_speedup_best": round(min(times["baseline"]) / min(times["current+opt_in"]), 2),
            "opt_in_speedup_median": round(statistics.median(times["baseline"]) / statistics.median(times["current+opt_in"]), 2)}
           if args.opt_in else {}),
        "tables": tables,
        "commit_baseline": subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=args.baseline, capture_output=True,
                                          text=True).stdout.strip(),
        "commit_current": subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True,
                                         text=True).stdout.strip(),
    }
    print(json.dumps(summary), flush=True)


if __name__ == "__main__":
    main()
