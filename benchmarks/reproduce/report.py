"""README "Results" table from the committed results: claim | paper | ours | verdict.

Reads ``docs/results/<claim>.json`` (written by the claim commands) so that no number in the
README is typed by hand; the paper's numbers are quoted below with their table or figure.

    python -m benchmarks.reproduce.report                 # prints the markdown table
    python -m benchmarks.reproduce.report --results DIR   # from another results directory
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

from benchmarks.reproduce.common import RESULTS, verdict

#: the papers' side, quoted (mean +- std over the papers' seeds)
PAPER = {
    "bremen_fig2": "Fig. 2 (5-10 deployments, 5 seeds): recursive BREMEN above ME-TRPO, recursive BC and the "
                   "KL-penalty ablation at equal deployments and samples (curves, no table)",
    "bremen_table1": "Table 1, HalfCheetah 50K: BREMEN 5823 +- 146, BC 4230 +- 49, ME-TRPO -73 +- 95; Table 7 "
                     "(1M): eps1 7585 / 3788 / 1009, gaussian1 7928 / 4142 / 1275",
    "musbo_sec5": "Fig. 3-5 (5-10 deployments of 25k-100k, 3 seeds): MUSBO above BREMEN (on Hopper only in "
                  "deployments 8-9); the no-exploration ablation is ours (sec. 5 measures novelty, not return)",
    "mb2po_table1": "Table 1, halfcheetah-mixed (D4RL score): AWAC 42.3 +- 0.3, AWAC + MB2PO 55.6 +- 0.6",
    "bremen_fidelity": "Alg. 1 l. 6 writes Normal(pi_beta, 1) for the BC re-init; App. F.2 uses sigma = 0.1; the "
                       "reference code normalises policy inputs",
}
CLAIM_NAMES = {"bremen_fig2": "BREMEN Fig. 2 / sec. 5.2", "bremen_table1": "BREMEN Table 1 (offline)",
               "musbo_sec5": "MUSBO sec. 5", "mb2po_table1": "MB2PO Table 1", "bremen_fidelity": "BREMEN fidelity"}


def _behaviour(meta: dict[str, Any]) -> str:
    """The behaviour policy in words: its return and how it was trained (threshold, deployments)."""
    b = meta.get("behaviour") or {}
    ret = f"eval {meta['behaviour_policy_eval_return']:.0f}"
    if "deployments" not in b:
        return f"a partially trained BREMEN policy ({ret})"
    how = f"{b['deployments']} deployments, {b['samples']} samples"
    if b.get("threshold") is None:
        return f"a BREMEN policy after {how} ({ret})"
    reached = "reached" if b["threshold_reached"] else "not reached"
    return f"a BREMEN policy trained to eval >= {b['threshold']:.0f} ({reached}: {ret} after {how})"


def _scale(claim: str, meta: dict[str, Any]) -> str:
    seeds = f"{meta['seeds']} seeds"
    if claim in ("bremen_fig2", "musbo_sec5", "bremen_fidelity"):
        n = meta.get("overrides", {}).get("deployment.num_deployments", 3)
        return f"{seeds}, quick preset cut to {n} deployments x 4000 transitions (60 TRPO iterations each)"
    if claim == "bremen_table1":
        return (f"{seeds}, {meta['dataset_size']} transitions from {_behaviour(meta)}, "
                f"{meta['offline']['trpo.iterations']} TRPO iterations")
    if claim == "mb2po_table1":
        return (f"{seeds}, {meta['dataset_size']} eps3 transitions around {_behaviour(meta)}, "
                f"{meta['mb2po']['awac.pretrain_steps']} AWAC steps, "
                f"{meta['mb2po'].get('finetune.iterations', 'preset')} fine-tuning iterations")
    return seeds


def _ours(summary: dict[str, Any]) -> str:
    keys = [k for k in summary["final"][0] if k not in ("iqm", "ci_low", "ci_high", "seeds", "mean", "scores")]
    cells = []
    for row in summary["final"]:
        label = " ".join(str(row[k]) for k in keys)
        cells.append(f"{label} {row['iqm']:.0f} [{row['ci_low']:.0f}, {row['ci_high']:.0f}]"
                     if abs(row["iqm"]) >= 100 else f"{label} {row['iqm']:.1f} [{row['ci_low']:.1f}, {row['ci_high']:.1f}]")
    return "; ".join(cells)


def _iterations(summary: dict[str, Any]) -> str:
    """Where the return goes during policy optimisation (``iteration_curves``): start, best and end IQM."""
    curves = summary.get("iteration_curves") or []
    keys = [k for k in (curves[0] if curves else {}) if k not in ("iteration", "iqm", "ci_low", "ci_high", "seeds")]
    cells = []
    for label in sorted({tuple(c[k] for k in keys) for c in curves}, key=str):
        pts = sorted((c["iteration"], c["iqm"]) for c in curves if tuple(c[k] for k in keys) == label)
        best = max(pts, key=lambda kv: kv[1])
        cells.append(f"{' '.join(str(v) for v in label)} {pts[0][1]:.0f} (k={pts[0][0]}), "
                     f"{best[1]:.0f} (k={best[0]}, highest), {pts[-1][1]:.0f} (k={pts[-1][0]})")
    return ("; IQM after k TRPO iterations: " + "; ".join(cells)) if cells else ""


def _verdicts(summary: dict[str, Any]) -> str:
    return "; ".join(f"P({p['x']} > {p['y']}) = {p['poi']:.2f} [{p['ci_low']:.2f}, {p['ci_high']:.2f}]: {verdict(p)}"
                     for p in summary["poi"])


def table(results: Path = RESULTS) -> str:
    """The markdown table over every claim whose ``<claim>.json`` is in ``results``."""
    lines = ["| claim | paper | ours: final IQM [95 % CI] | scale | verdict (probability of improvement) |",
             "|---|---|---|---|---|"]
    for claim, name in CLAIM_NAMES.items():
        path = results / f"{claim}.json"
        if not path.exists():
            continue
        summary = json.loads(path.read_text())
        lines.append(f"| {name} | {PAPER[claim]} | {_ours(summary)}{_iterations(summary)} | {_scale(claim, summary['meta'])} | "
                     f"{_verdicts(summary)} |")
    return "\n".join(lines)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--results", type=Path, default=RESULTS)
    print(table(p.parse_args().results))


if __name__ == "__main__":
    main()
