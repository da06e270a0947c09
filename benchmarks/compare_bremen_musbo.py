"""Slow comparison: BREMEN vs MUSBO at equal real samples (MUSBO sec. 5 claim, reduced scale).

MUSBO's claim (sec. 5, Fig. 3) is that at the same deployment budget (``I`` deployments of ``B``
real transitions each) MUSBO's learned policy returns at least as much as BREMEN's. This script
runs both algorithms on one task with the same seeds and the same budget and prints the
evaluation return of each deployment's learned policy, so the claim can be checked:

* both configs come from the ``quick`` presets of ``examples/bremen`` and ``examples/musbo``
  (through their config helpers :func:`examples.bremen.utils.make_bremen_config` and
  :func:`examples.musbo.utils.make_musbo_config`), with ``--num-deployments`` and
  ``--batch-size`` (``deployment_size``, i.e. ``B``) forced identical on both;
* ``num_deployments * deployment_size`` of the two configs is checked equal (``ValueError``
  otherwise) and printed; every other shared :class:`BREMENConfig` field that differs between the
  two (by design: MUSBO's ``bc_data="all"`` and ``dynamics_patience=3``, App. F) is printed too;
* ``--musbo-variant`` runs one of MUSBO's ablations (sec. 5) instead of full MUSBO;
* MUSBO's analysis metrics (novelty, energy distance, trajectory MSE) are off by default
  (``--metrics`` turns them on): they only report, never train, and cost minutes on a CPU.

Output: one JSON line per (algorithm, seed, deployment) with ``eval/return_mean``, then a
markdown table (mean over seeds per deployment, both algorithms) and the final-deployment
difference ``MUSBO - BREMEN`` (mean and per seed). Everything is also written to
``<output-dir>/results.json``.

This is SLOW (not a test): at the quick presets one BREMEN deployment takes about one minute on
one core of the 2-core dev machine and one MUSBO deployment a bit more (labeler fits).
Run (from the repository root)::

    flock /tmp/cpu.lock python benchmarks/compare_bremen_musbo.py --seeds 2 --num-deployments 3

A few seeds and deployments at the quick preset are far too few to separate the two algorithms
statistically; read the output as a check that the comparison runs at equal samples, not as a
reproduction of the paper's figure.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import math
import sys
import tempfile
import time
from pathlib import Path

import torch
from omegaconf import OmegaConf

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # for examples.*

from examples.bremen.utils import make_bremen_config  # noqa: E402
from examples.musbo.utils import make_musbo_config  # noqa: E402
from torchrl_depeff.algorithms.bremen import BREMEN, BREMENConfig  # noqa: E402
from torchrl_depeff.algorithms.musbo import MUSBO, MUSBO_VARIANTS, MUSBOConfig  # noqa: E402

#: MUSBO-only diagnostics copied into the JSON lines when present (eq. 22 noise, eq. 11, eq. 12)
EXTRA_KEYS = ("deployment/exploration_variance", "bc/weight_mean", "train/uncertainty_weight",
              "labeler/holdout_loss", "model/holdout_loss")
TASKS = sorted(p.stem for p in (ROOT / "examples" / "musbo" / "task").glob("*.yaml"))


def make_configs(task: str, seed: int, num_deployments: int, batch_size: int,
                 metrics: bool, musbo_variant: str = "musbo") -> tuple[BREMENConfig, MUSBOConfig]:
    """The BREMEN and MUSBO quick-preset configs of ``task`` with the same budget and seed."""
    budget = {"num_deployments": num_deployments, "deployment_size": batch_size}
    bremen_cfg = make_bremen_config(OmegaConf.create({
        "task": OmegaConf.load(ROOT / "examples" / "bremen" / "task" / f"{task}.yaml"),
        "preset": "quick", "variant": "bremen", "seed": seed, "device": "cpu", "bremen": budget,
    }))
    musbo_cfg = make_musbo_config(OmegaConf.create({
        "task": OmegaConf.load(ROOT / "examples" / "musbo" / "task" / f"{task}.yaml"),
        "preset": "quick", "variant": musbo_variant, "budget": "500k", "seed": seed,
        "device": "cpu",
        "musbo": {**budget, "metrics": metrics},
    }))
    # equal samples: the whole point of the comparison
    b_total = bremen_cfg.num_deployments * bremen_cfg.deployment_size
    m_total = musbo_cfg.num_deployments * musbo_cfg.deployment_size
    if b_total != m_total or bremen_cfg.num_deployments != musbo_cfg.num_deployments:
        raise ValueError(
            f"unequal budgets: BREMEN {bremen_cfg.num_deployments} x "
            f"{bremen_cfg.deployment_size} = {b_total}, "
            f"MUSBO {musbo_cfg.num_deployments} x {musbo_cfg.deployment_size} = {m_total}"
        )
    if bremen_cfg.seed != musbo_cfg.seed:
        raise ValueError(f"unequal seeds: BREMEN {bremen_cfg.seed}, MUSBO {musbo_cfg.seed}")
    return bremen_cfg, musbo_cfg


def shared_field_differences(a: BREMENConfig, b: BREMENConfig) -> dict[str, tuple]:
    """BREMENConfig fields whose values differ between ``a`` and ``b``."""
    return {
        f.name: (getattr(a, f.name), getattr(b, f.name))
        for f in dataclasses.fields(BREMENConfig)
        if getattr(a, f.name) != getattr(b, f.name)
    }


def run(algo_cls: type[BREMEN], config: BREMENConfig, data_root: Path, name: str) -> list[dict]:
    """Run every deployment of one algorithm; one JSON line per deployment."""
    torch.manual_seed(config.seed)
    algo = algo_cls(config, data_root=data_root)
    rows = []
    t0 = time.perf_counter()
    while algo.deployment < config.num_deployments:
        m = algo.deployment_step()
        row = {
            "algo": name, "seed": config.seed, "deployment": int(m["deployment/count"]),
            "samples": int(m["deployment/samples"]),
            "eval_return_mean": m.get("eval/return_mean", math.nan),
            "eval_return_std": m.get("eval/return_std", math.nan),
            "deployed_return_mean": m.get("deployment/return_mean", math.nan),
            "elapsed_s": round(time.perf_counter() - t0, 1),
        }
        row.update({k: m[k] for k in EXTRA_KEYS if k in m})
        rows.append(row)
        print(json.dumps(row), flush=True)
    return rows


def _mean(xs: list[float]) -> float:
    return sum(xs) / len(xs)


def summarise(rows: list[dict], num_deployments: int, batch_size: int, seeds: list[int]) -> dict:
    """Mean over seeds per deployment and the final-deployment difference MUSBO - BREMEN."""
    def ret(algo: str, seed: int, dep: int) -> float:
        return next(r["eval_return_mean"] for r in rows
                    if r["algo"] == algo and r["seed"] == seed and r["deployment"] == dep)

    table = []
    for dep in range(1, num_deployments + 1):
        b = _mean([ret("BREMEN", s, dep) for s in seeds])
        m = _mean([ret("MUSBO", s, dep) for s in seeds])
        table.append({"deployment": dep, "samples": dep * batch_size, "bremen": b, "musbo": m,
                      "diff": m - b})
    last = num_deployments
    per_seed = {s: ret("MUSBO", s, last) - ret("BREMEN", s, last) for s in seeds}
    return {"table": table, "final_diff_mean": _mean(list(per_seed.values())),
            "final_diff_per_seed": per_seed}


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--task", default="halfcheetah", choices=TASKS)
    parser.add_argument("--seeds", type=int, default=2, help="seeds 0 .. N-1, the same for both")
    parser.add_argument("--num-deployments", type=int, default=3)
    parser.add_argument("--batch-size", type=int, default=4000,
                        help="real transitions per deployment (B)")
    parser.add_argument("--output-dir", default=None, help="default: a temporary directory")
    parser.add_argument("--metrics", action="store_true", help="MUSBO analysis metrics (slower)")
    parser.add_argument("--musbo-variant", default="musbo", choices=sorted(MUSBO_VARIANTS),
                        help="MUSBO ablation (sec. 5), e.g. no_exploration: BREMEN's noise")
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args(argv)
    if args.seeds < 1 or args.num_deployments < 1 or args.batch_size < 1:
        raise ValueError(f"--seeds, --num-deployments, --batch-size must be >= 1, got "
                         f"{args.seeds}, {args.num_deployments}, {args.batch_size}")
    torch.set_num_threads(args.threads)
    out = Path(args.output_dir or tempfile.mkdtemp(prefix="compare_bremen_musbo_"))
    out.mkdir(parents=True, exist_ok=True)
    seeds = list(range(args.seeds))

    rows: list[dict] = []
    for seed in seeds:
        bremen_cfg, musbo_cfg = make_configs(args.task, seed, args.num_deployments,
                                             args.batch_size, args.metrics, args.musbo_variant)
        print(json.dumps({
            "seed": seed, "task": args.task,
            "bremen_samples": f"{bremen_cfg.num_deployments} x {bremen_cfg.deployment_size} = "
                              f"{bremen_cfg.num_deployments * bremen_cfg.deployment_size}",
            "musbo_samples": f"{musbo_cfg.num_deployments} x {musbo_cfg.deployment_size} = "
                             f"{musbo_cfg.num_deployments * musbo_cfg.deployment_size}",
            "shared_fields_differing": {
                k: [str(v[0]), str(v[1])]
                for k, v in shared_field_differences(bremen_cfg, musbo_cfg).items()
            },
        }), flush=True)
        rows += run(BREMEN, bremen_cfg, out / f"bremen-seed{seed}", "BREMEN")
        rows += run(MUSBO, musbo_cfg, out / f"musbo-seed{seed}", "MUSBO")

    summary = summarise(rows, args.num_deployments, args.batch_size, seeds)
    lines = [
        f"{args.task}, quick presets, MUSBO variant {args.musbo_variant}, "
        f"{args.num_deployments} deployments x {args.batch_size} samples, "
        f"seeds {seeds}: eval return (mean over seeds)",
        "| deployment | real samples | BREMEN | MUSBO | MUSBO - BREMEN |",
        "|---|---|---|---|---|",
    ]
    for r in summary["table"]:
        lines.append(f"| {r['deployment']} | {r['samples']} | {r['bremen']:.1f} | "
                     f"{r['musbo']:.1f} | {r['diff']:+.1f} |")
    per_seed = ", ".join(f"seed {s}: {d:+.1f}" for s, d in summary["final_diff_per_seed"].items())
    lines.append(f"final deployment MUSBO - BREMEN: {summary['final_diff_mean']:+.1f} ({per_seed})")
    print("\n".join(lines), flush=True)
    result = {"args": vars(args), "rows": rows, **summary}
    (out / "results.json").write_text(json.dumps(result, indent=1))
    return result


if __name__ == "__main__":
    main()
