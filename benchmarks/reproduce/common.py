"""Shared machinery of the reproduction commands: run seeds in parallel, JSON lines, IQM + CIs, plots.

Every claim command (``python -m benchmarks.reproduce.<claim>``) builds a list of :class:`Job`
(algorithm x task x seed, each a full config), runs them ``--jobs`` at a time in worker
processes with one torch thread each, and appends one JSON line per algorithm x task x seed x
deployment to ``<out>/results.jsonl``. A job's run directory (``<out>/runs/<job>``) holds the
loop's checkpoint, so an interrupted command resumes every unfinished job where it stopped and
skips finished ones (their lines are already in the file).

Aggregation (:func:`summarize`): for every algorithm and task, the interquartile mean over seeds
of the final evaluation return with a 95 % stratified-bootstrap CI (:mod:`torchrl_depeff.stats`),
the same per deployment for the plot, and for each pairwise claim the probability of improvement
(averaged over tasks) with its CI. Offline claims (one "deployment") that evaluate during policy
optimisation (``evaluation.every_iterations``) also get the IQM per iteration, BREMEN Fig. 14's
axes, and plot that instead. Results go to ``docs/results/<claim>.{json,md,png}``.
"""
from __future__ import annotations

import argparse
import hashlib
import json
import math
import multiprocessing as mp
import os
import time
import traceback
from dataclasses import dataclass, field
from io import BytesIO
from pathlib import Path
from typing import Any, Callable

import numpy as np

from torchrl_depeff.io import atomic_write_bytes, atomic_write_text
from torchrl_depeff.stats import interval_estimate, iqm, poi_interval_estimate

ROOT = Path(__file__).resolve().parents[2]
RESULTS = ROOT / "docs" / "results"

__all__ = ["CURVE_PREFIX", "Job", "iteration_curves", "parse_args", "plot", "run_jobs", "summarize", "write_results"]

#: per-iteration evaluations of the optimize phase (``evaluation.every_iterations``)
CURVE_PREFIX = "curve/eval_return_it"


@dataclass
class Job:
    """One run: ``algorithm`` (a label) on ``task`` with ``seed``, built by ``kind`` from ``config``.

    ``kind``: ``"bremen"``, ``"musbo"``, ``"bremen_offline"`` or ``"mb2po"``; ``config`` is the
    algorithm config's ``to_dict()``; ``extra`` holds kind-specific inputs (dataset spec).
    """

    claim: str
    algorithm: str
    task: str
    seed: int
    kind: str
    config: dict[str, Any]
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def fingerprint(self) -> str:
        """SHA-256 of what the job computes (kind, config, extra): a finished record is reused only if it matches."""
        blob = json.dumps({"kind": self.kind, "config": self.config, "extra": self.extra}, sort_keys=True, default=str)
        return hashlib.sha256(blob.encode()).hexdigest()[:16]

    @property
    def name(self) -> str:
        extra = "-".join(f"{k}{v}" for k, v in sorted(self.extra.get("label", {}).items()))
        return f"{self.algorithm}-{self.task}{'-' + extra if extra else ''}-s{self.seed}"


def parse_args(description: str, default_seeds: int = 5) -> argparse.Namespace:
    """``--seeds N`` (default 5), ``--quick`` (smoke scale, seconds), ``--jobs`` (parallel runs), ``--out``."""
    p = argparse.ArgumentParser(description=description)
    p.add_argument("--seeds", type=int, default=default_seeds, help="seeds per algorithm and task")
    p.add_argument("--quick", action="store_true", help="smoke run: tiny scale, for the tests (not a result)")
    p.add_argument("--jobs", type=int, default=2, help="runs in parallel (one torch thread each)")
    p.add_argument("--out", type=Path, default=None, help="output directory (default: runs/reproduce/<claim>)")
    p.add_argument("--reuse", type=Path, default=None,
                   help="another claim's output directory: its finished jobs with the same name and config are reused")
    p.add_argument("--results", type=Path, default=None,
                   help="where the JSON/plot/markdown go (default: docs/results; --quick: the output directory)")
    args = p.parse_args()
    if args.seeds < 1 or args.jobs < 1:
        p.error(f"--seeds and --jobs must be >= 1, got {args.seeds}, {args.jobs}")
    return args


# ====================================================================
# Running
# --------------------------------------------------------------------


def _run_job(job: Job, run_dir: str) -> list[dict[str, Any]]:
    """Run one job to the end in this (worker) process; returns its per-deployment records."""
    import torch

    torch.set_num_threads(1)
    from benchmarks.reproduce import runners

    history, extra = runners.RUNNERS[job.kind](job, Path(run_dir))
    out = []
    for h in history:
        rec = {"claim": job.claim, "algorithm": job.algorithm, "task": job.task, "seed": job.seed,
               **job.extra.get("label", {}), "deployment": int(h.get("deployment/count", 1)),
               "samples": int(h.get("deployment/samples", 0))}
        rec.update({k: (v if isinstance(v, (int, float)) and math.isfinite(v) else None)
                    for k, v in h.items() if isinstance(v, (int, float))})
        rec.update(extra)
        out.append(rec)
    return out


def _worker(job: Job, run_dir: str, queue: Any) -> None:
    try:
        queue.put((job.name, _run_job(job, run_dir), None))
    except BaseException:  # noqa: BLE001 - reported to the parent, which re-raises
        queue.put((job.name, None, traceback.format_exc()))


def _read(results: Path) -> list[dict]:
    return [json.loads(line) for line in results.read_text().splitlines()] if results.exists() else []


def run_jobs(jobs: list[Job], out: Path, *, parallel: int = 2, reuse: Path | None = None,
             log: Callable[[str], None] = print) -> list[dict]:
    """Run every job not already in ``out/results.jsonl`` (``parallel`` at a time); return the jobs' records.

    A job counts as done when its name is in the file with the same :attr:`Job.fingerprint`; the
    same name with another fingerprint (the claim's scale or config changed) is refused: remove the
    output directory or use another ``--out``. ``reuse``: another claim's output directory whose
    finished jobs with equal name and fingerprint are copied (tagged ``reused_from``) instead of
    being run again, e.g. the BREMEN runs that two claims share.
    """
    out.mkdir(parents=True, exist_ok=True)
    results = out / "results.jsonl"
    wanted = {j.name: j.fingerprint for j in jobs}
    stale = sorted({r["job"] for r in _read(results) if r["job"] in wanted and r.get("fingerprint") != wanted[r["job"]]})
    if stale:
        raise ValueError(f"{results} holds {stale} from another config or scale; remove {out} or use another --out")
    if reuse is not None:
        have = {r["job"] for r in _read(results)}
        copied = [dict(r, reused_from=str(reuse)) for r in _read(Path(reuse) / "results.jsonl")
                  if wanted.get(r["job"]) == r.get("fingerprint") and r["job"] not in have]
        if copied:
            with results.open("a") as f:
                f.writelines(json.dumps(r) + "\n" for r in copied)
                f.flush()
                os.fsync(f.fileno())  # as durable as the records of jobs run here
            log(f"reused {len({r['job'] for r in copied})} finished jobs from {reuse}")
    done = {r["job"] for r in _read(results)}
    todo = [j for j in jobs if j.name not in done]
    log(f"{len(jobs)} jobs, {len(jobs) - len(todo)} already done, {len(todo)} to run, {parallel} at a time")

    def save(name: str, records: list[dict]) -> None:
        with results.open("a") as f:
            for rec in records:
                f.write(json.dumps({"job": name, "fingerprint": wanted[name], **rec}) + "\n")
            f.flush()
            os.fsync(f.fileno())

    t0 = time.perf_counter()
    if parallel == 1:  # in this process, one after the other (no worker start-up cost)
        for job in todo:
            start = time.perf_counter()
            save(job.name, _run_job(job, str(out / "runs" / job.name)))
            log(f"done {job.name} in {time.perf_counter() - start:.0f} s ({time.perf_counter() - t0:.0f} s elapsed)")
        return [r for r in _read(results) if r["job"] in wanted]
    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    running: dict[str, tuple[Any, float]] = {}
    pending = list(todo)
    while pending or running:
        while pending and len(running) < parallel:
            job = pending.pop(0)
            proc = ctx.Process(target=_worker, args=(job, str(out / "runs" / job.name), queue))
            proc.start()
            running[job.name] = (proc, time.perf_counter())
        name, records, error = queue.get()
        proc, start = running.pop(name)
        proc.join()
        if error is not None:
            for other, _ in running.values():
                other.terminate()
            raise RuntimeError(f"job {name} failed:\n{error}")
        save(name, records)
        log(f"done {name} in {time.perf_counter() - start:.0f} s ({time.perf_counter() - t0:.0f} s elapsed)")
    return [r for r in _read(results) if r["job"] in wanted]


# ====================================================================
# Aggregation
# --------------------------------------------------------------------


def _group(records: list[dict], keys: tuple[str, ...]) -> dict[tuple, list[dict]]:
    out: dict[tuple, list[dict]] = {}
    for r in records:
        out.setdefault(tuple(r.get(k) for k in keys), []).append(r)
    return out


def _last_per_seed(rows: list[dict]) -> dict[int, dict]:
    """Each seed's record of its last deployment."""
    last: dict[int, dict] = {}
    for r in rows:
        if r["seed"] not in last or r["deployment"] > last[r["seed"]]["deployment"]:
            last[r["seed"]] = r
    return last


def final_scores(records: list[dict], metric: str, group: tuple[str, ...] = ("algorithm", "task")) -> dict[tuple, np.ndarray]:
    """Per group, the ``metric`` of each seed's last deployment, ``[seeds]`` (seed order)."""
    out = {}
    for key, rows in _group(records, group).items():
        last = _last_per_seed(rows)
        vals = [last[s].get(metric) for s in sorted(last)]
        out[key] = np.array([v for v in vals if v is not None], dtype=np.float64)
    return out


def iteration_curves(records: list[dict], *, iterations: int, metric: str = "eval/return_mean",
                     group: tuple[str, ...] = ("algorithm", "task"), reps: int = 1000) -> list[dict[str, Any]]:
    """IQM [95 % CI] over seeds of the return after ``k`` policy-optimisation iterations, per group.

    ``k`` runs over the ``curve/eval_return_it{k}`` keys of each seed's last record and ends with
    ``k = iterations``, that record's ``metric`` (the evaluation after the phase). Groups whose
    records have no curve keys are left out.
    """
    out = []
    for key, rows in _group(records, group).items():
        points: dict[int, list[float]] = {}
        for r in _last_per_seed(rows).values():
            ks = {int(k[len(CURVE_PREFIX):]): v for k, v in r.items() if k.startswith(CURVE_PREFIX) and v is not None}
            if not ks:
                continue
            if r.get(metric) is not None:
                ks[int(iterations)] = r[metric]
            for k, v in ks.items():
                points.setdefault(k, []).append(v)
        for k in sorted(points):
            x = np.array(points[k], dtype=np.float64)
            point, low, high = interval_estimate(x, iqm, reps=reps)
            out.append({**dict(zip(group, key)), "iteration": k, "iqm": point, "ci_low": low, "ci_high": high,
                        "seeds": int(x.size)})
    return sorted(out, key=lambda c: ([str(c[g]) for g in group], c["iteration"]))


def summarize(
    records: list[dict],
    *,
    metric: str = "eval/return_mean",
    comparisons: list[tuple[str, str]] = (),
    group: tuple[str, ...] = ("algorithm", "task"),
    reps: int = 2000,
    iterations: int | None = None,
) -> dict[str, Any]:
    """IQM [95 % CI] of the final ``metric`` per group, per-deployment curves and pairwise POIs.

    With ``iterations`` (the optimize phase's length), also :func:`iteration_curves`.
    """
    finals = final_scores(records, metric, group)
    table = []
    for key, x in sorted(finals.items(), key=lambda kv: [str(v) for v in kv[0]]):
        point, low, high = interval_estimate(x, iqm, reps=reps) if x.size else (math.nan,) * 3
        table.append({**dict(zip(group, key)), "iqm": point, "ci_low": low, "ci_high": high, "seeds": int(x.size),
                      "mean": float(x.mean()) if x.size else math.nan, "scores": x.tolist()})
    curves = []
    for key, rows in _group(records, (*group, "deployment")).items():
        x = np.array([r[metric] for r in rows if r.get(metric) is not None])
        if x.size:
            point, low, high = interval_estimate(x, iqm, reps=min(reps, 1000))
            curves.append({**dict(zip((*group, "deployment"), key)), "samples": rows[0]["samples"], "iqm": point,
                           "ci_low": low, "ci_high": high, "seeds": int(x.size)})
    pois = []
    tasks = sorted({k[1] for k in finals}) if len(group) > 1 else [None]
    for a, b in comparisons:
        xa = [finals.get((a, t)) if t is not None else finals.get((a,)) for t in tasks]
        xb = [finals.get((b, t)) if t is not None else finals.get((b,)) for t in tasks]
        if any(v is None or v.size == 0 for v in xa + xb):
            continue
        n = min(v.size for v in xa + xb)
        A = np.stack([v[:n] for v in xa], 1)
        B = np.stack([v[:n] for v in xb], 1)
        point, low, high = poi_interval_estimate(A, B, reps=reps)
        pois.append({"x": a, "y": b, "tasks": tasks, "poi": point, "ci_low": low, "ci_high": high, "seeds": n})
    out = {"metric": metric, "final": table, "curves": curves, "poi": pois}
    if iterations is not None:
        out["iteration_curves"] = iteration_curves(records, iterations=iterations, metric=metric, group=group,
                                                   reps=min(reps, 1000))
    return out


def verdict(poi: dict[str, Any]) -> str:
    """Plain-words verdict of a pairwise claim "x beats y" from its POI CI."""
    if poi["ci_low"] > 0.5:
        return "reproduced"
    if poi["ci_high"] < 0.5:
        return "reversed"
    return "not reproduced (CI includes 0.5)"


Series = list[tuple[str, list[float], list[float], list[float], list[float]]]


def _save_panels(panels: list[tuple[str, Series, list[tuple[str, float]]]], path: Path, title: str, xlabel: str,
                 ylabel: str) -> Path:
    """One panel per ``(panel title, [(label, xs, iqm, ci_low, ci_high)], [(label, level)])``: lines + CI bands."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(panels), figsize=(5 * len(panels), 3.6), squeeze=False)
    for ax, (name, series, levels) in zip(axes[0], panels):
        for label, xs, ys, lo, hi in series:
            ax.plot(xs, ys, "o-", label=label)
            ax.fill_between(xs, lo, hi, alpha=0.2)
        for label, level in levels:
            ax.axhline(level, ls="--", color="gray", label=label)
        ax.set_title(name)
        ax.set_xlabel(xlabel)
        ax.set_ylabel(ylabel)
        ax.legend(fontsize=7)
    fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    buffer = BytesIO()
    fig.savefig(buffer, dpi=110, format="png")
    plt.close(fig)
    return atomic_write_bytes(buffer.getvalue(), path)


def _series(rows: list[dict], label_of: Callable[[dict], str], x: str) -> Series:
    out = []
    for label in sorted({label_of(c) for c in rows}):
        pts = sorted((c[x], c["iqm"], c["ci_low"], c["ci_high"]) for c in rows if label_of(c) == label)
        out.append((label, *map(list, zip(*pts))))
    return out


def plot(summary: dict[str, Any], path: Path, title: str, group: tuple[str, ...] = ("algorithm", "task")) -> Path:
    """IQM of ``metric`` (with the 95 % CI band) per deployment, one panel per task.

    With ``iteration_curves`` (offline claims): against policy-optimisation iterations instead, one
    panel per value of ``group[1:]``, groups without iterations (BC) as dashed levels.
    """
    ylabel = summary["metric"] + " (IQM, 95 % CI)"
    curves = summary.get("iteration_curves")
    if curves:
        keys = group[1:]
        panels = []
        for panel in sorted({tuple(c[g] for g in keys) for c in curves}, key=str):
            rows = [c for c in curves if tuple(c[g] for g in keys) == panel]
            with_curve = {c[group[0]] for c in rows}
            levels = [(f"{r[group[0]]} (no policy iterations)", r["iqm"]) for r in summary["final"]
                      if tuple(r[g] for g in keys) == panel and r[group[0]] not in with_curve]
            panels.append((" ".join(f"{g} {v}" for g, v in zip(keys, panel)),
                           _series(rows, lambda c: str(c[group[0]]), "iteration"), levels))
        return _save_panels(panels, path, title, "policy-optimisation iterations", ylabel)
    curves = summary["curves"]
    panels = []
    for task in sorted({c.get("task") for c in curves}, key=str):
        rows = [c for c in curves if c.get("task") == task]
        label_of = lambda c: " ".join(str(c[g]) for g in group if g != "task")  # noqa: E731
        panels.append((str(task), _series(rows, label_of, "samples"), []))
    return _save_panels(panels, path, title, "real transitions", ylabel)


def markdown(summary: dict[str, Any], group: tuple[str, ...] = ("algorithm", "task")) -> str:
    """Tables of the final IQMs and of the pairwise probabilities of improvement."""
    lines = ["| " + " | ".join(group) + " | IQM [95 % CI] | mean | seeds |", "|" + "---|" * (len(group) + 3)]
    for row in summary["final"]:
        lines.append("| " + " | ".join(str(row[g]) for g in group)
                     + f" | {row['iqm']:.1f} [{row['ci_low']:.1f}, {row['ci_high']:.1f}] | {row['mean']:.1f} | {row['seeds']} |")
    if summary["poi"]:
        lines += ["", "| claim | P(X > Y) [95 % CI] | seeds | verdict |", "|---|---|---|---|"]
        for p in summary["poi"]:
            lines.append(f"| {p['x']} > {p['y']} | {p['poi']:.2f} [{p['ci_low']:.2f}, {p['ci_high']:.2f}] | "
                         f"{p['seeds']} | {verdict(p)} |")
    curves = summary.get("iteration_curves") or []
    if curves:
        ks = sorted({c["iteration"] for c in curves})
        lines += ["", "IQM of the evaluation return after k policy-optimisation iterations (k = 0: before the first):",
                  "", "| " + " | ".join(group) + " | " + " | ".join(f"k={k}" for k in ks) + " |",
                  "|" + "---|" * (len(group) + len(ks))]
        for label in sorted({tuple(c[g] for g in group) for c in curves}, key=str):
            at = {c["iteration"]: c["iqm"] for c in curves if tuple(c[g] for g in group) == label}
            lines.append("| " + " | ".join(str(v) for v in label) + " | "
                         + " | ".join(f"{at[k]:.0f}" if k in at else "" for k in ks) + " |")
    return "\n".join(lines)


def write_results(claim: str, records: list[dict], summary: dict[str, Any], meta: dict[str, Any], where: Path,
                  title: str, group: tuple[str, ...] = ("algorithm", "task")) -> dict[str, Path]:
    """``<claim>.jsonl`` (the records), ``<claim>.json`` (summary + meta), ``.md`` and ``.png``."""
    where.mkdir(parents=True, exist_ok=True)
    paths = {k: where / f"{claim}.{k}" for k in ("jsonl", "json", "md", "png")}
    atomic_write_text("".join(json.dumps(r) + "\n" for r in records), paths["jsonl"])
    atomic_write_text(json.dumps({"claim": claim, "meta": meta, **summary}, indent=1), paths["json"])
    atomic_write_text(f"# {title}\n\n{json.dumps(meta)}\n\n{markdown(summary, group)}\n", paths["md"])
    plot(summary, paths["png"], title, group)
    return paths



