"""The reproduction commands (benchmarks/reproduce): each --quick run ends with its JSON, plot and table."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

ROOT = Path(__file__).resolve().parents[1]

# claim -> (algorithms, groups (tasks / noise variants / sweep settings), deployments per run)
CLAIMS = {
    "bremen_fig2": ({"BREMEN", "ME-TRPO", "BC", "explicit-KL"}, 2, 2),
    "bremen_table1": ({"BREMEN", "BC", "ME-TRPO"}, 2, 1),
    "musbo_sec5": ({"MUSBO", "MUSBO-no-exploration", "BREMEN"}, 2, 2),
    "mb2po_table1": ({"AWAC+MB2PO", "AWAC"}, 2, 1),
    "bremen_fidelity": ({"BREMEN", "BREMEN-sigma1", "BREMEN-obsnorm"}, 1, 2),
}


@pytest.mark.parametrize("claim", sorted(CLAIMS))
def test_quick_run(claim, tmp_path):
    algorithms, groups, deployments = CLAIMS[claim]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", f"benchmarks.reproduce.{claim}", "--quick", "--seeds", "1", "--jobs", "1",
           "--out", str(tmp_path)]
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    for ext in ("json", "jsonl", "md", "png"):
        assert (tmp_path / f"{claim}.{ext}").is_file(), ext
    records = [json.loads(line) for line in (tmp_path / f"{claim}.jsonl").read_text().splitlines()]
    assert {r["algorithm"] for r in records} == algorithms
    assert len(records) == len(algorithms) * groups * deployments  # one line per algorithm x group x seed x deployment
    summary = json.loads((tmp_path / f"{claim}.json").read_text())
    assert summary["meta"]["scale"] == "quick" and summary["poi"]
    for row in summary["final"]:
        assert row["ci_low"] <= row["iqm"] <= row["ci_high"] and row["seeds"] == 1
    if claim == "bremen_table1":  # evaluated during TRPO: k = 0, 1 and the end (2 iterations)
        ks = {(c["algorithm"], c["iteration"]) for c in summary["iteration_curves"]}
        assert ks == {(a, k) for a in ("BREMEN", "ME-TRPO") for k in (0, 1, 2)}
    # the README table row is generated from the same JSON
    from benchmarks.reproduce import report

    row = report.table(tmp_path).splitlines()[2]
    assert row.startswith(f"| {report.CLAIM_NAMES[claim]} |") and "seeds" in row
    assert row.count("P(") == len(summary["poi"])
    assert ("IQM after k TRPO iterations: BREMEN eps1" in row) == (claim == "bremen_table1")
    # a rerun finds every job done and recomputes nothing
    again = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert again.returncode == 0 and "0 to run" in again.stdout


def test_iteration_curves_are_the_iqm_per_iteration_ending_with_the_final_evaluation():
    from benchmarks.reproduce.common import iteration_curves
    from torchrl_depeff.stats import iqm

    rows = [{"algorithm": "A", "seed": s, "deployment": 1, "curve/eval_return_it0": float(s),
             "curve/eval_return_it10": 10.0 + s, "eval/return_mean": 100.0 * (s + 1)} for s in range(5)]
    rows.append({"algorithm": "BC", "seed": 0, "deployment": 1, "eval/return_mean": 7.0})  # no curve: left out
    rows.append({"algorithm": "A", "seed": 0, "deployment": 0, "curve/eval_return_it0": -1e9})  # not the last record
    curves = iteration_curves(rows, iterations=20, group=("algorithm",), reps=200)
    assert [(c["algorithm"], c["iteration"], c["seeds"]) for c in curves] == [("A", 0, 5), ("A", 10, 5), ("A", 20, 5)]
    expected = [iqm(np.arange(5.0)), iqm(10.0 + np.arange(5.0)), iqm(100.0 * np.arange(1, 6.0))]
    assert [c["iqm"] for c in curves] == pytest.approx(expected)
    assert all(c["ci_low"] <= c["iqm"] <= c["ci_high"] for c in curves)


# --------------------------------------------------------------------------------------------------
# run_jobs: finished jobs are recognised by name *and* config fingerprint, and can be reused


@pytest.fixture
def fake_runner(monkeypatch):
    """A job kind that records which seeds ran and returns one deployment's metrics."""
    from benchmarks.reproduce import runners

    ran = []

    def fake(job, run_dir):
        ran.append((job.algorithm, job.seed))
        return [{"deployment/count": 1, "deployment/samples": 10, "eval/return_mean": float(job.config["x"])}], {}

    monkeypatch.setitem(runners.RUNNERS, "fake", fake)
    return ran


def _jobs(x, algorithm="A", seeds=(0, 1)):
    from benchmarks.reproduce.common import Job

    return [Job("claim", algorithm, "task", s, "fake", {"x": x}) for s in seeds]


def test_run_jobs_refuses_a_changed_config(fake_runner, tmp_path):
    from benchmarks.reproduce.common import run_jobs

    records = run_jobs(_jobs(1.0), tmp_path, parallel=1, log=lambda _: None)
    assert [r["eval/return_mean"] for r in records] == [1.0, 1.0] and len(fake_runner) == 2
    assert run_jobs(_jobs(1.0), tmp_path, parallel=1, log=lambda _: None) == records and len(fake_runner) == 2
    with pytest.raises(ValueError, match=r"A-task-s0.*another config or scale"):
        run_jobs(_jobs(2.0), tmp_path, parallel=1, log=lambda _: None)


def test_run_jobs_reuses_only_identical_jobs_and_returns_only_its_own(fake_runner, tmp_path):
    from benchmarks.reproduce.common import run_jobs

    run_jobs(_jobs(1.0) + _jobs(5.0, algorithm="B"), tmp_path / "other", parallel=1, log=lambda _: None)
    fake_runner.clear()
    # A (same config) is copied, B is not asked for, C runs
    records = run_jobs(_jobs(1.0) + _jobs(3.0, algorithm="C"), tmp_path / "mine", parallel=1,
                       reuse=tmp_path / "other", log=lambda _: None)
    assert fake_runner == [("C", 0), ("C", 1)]
    assert sorted({r["algorithm"] for r in records}) == ["A", "C"]
    assert all(r["reused_from"] == str(tmp_path / "other") for r in records if r["algorithm"] == "A")
    # a job of the same name but another config in the reused directory is run, not copied
    fake_runner.clear()
    records = run_jobs(_jobs(4.0, algorithm="B"), tmp_path / "third", parallel=1, reuse=tmp_path / "other",
                       log=lambda _: None)
    assert fake_runner == [("B", 0), ("B", 1)] and {r["eval/return_mean"] for r in records} == {4.0}


# --------------------------------------------------------------------------------------------------
# behaviour policies of the offline claims: trained to a return threshold, datasets tied to the checkpoint


class _FakeBREMEN:
    """Stands in for BREMEN: deployment ``k`` evaluates to ``returns[k]``; records every constructed run."""

    returns = [10.0, 900.0, 1600.0, 2000.0]
    built: list = []

    def __init__(self, config, run_dir):
        self.config, self.run_dir = config, run_dir
        self.deployment, self.history = 0, []
        _FakeBREMEN.built.append(self)

    def deployment_step(self):
        self.history.append({"eval/return_mean": self.returns[self.deployment],
                             "deployment/samples": 100.0 * (self.deployment + 1)})
        self.deployment += 1
        (self.run_dir / "checkpoint.pt").write_bytes(f"policy {self.deployment}".encode())


@pytest.mark.parametrize("threshold, max_deployments, deployments, reached", [
    (1500.0, 10, 3, True),    # stops at the first deployment at or over the threshold
    (5000.0, 2, 2, False),    # never reached: every allowed deployment, reported as not reached
    (None, 4, 4, False),      # no threshold: every deployment
])
def test_trained_policy_stops_at_the_threshold(monkeypatch, tmp_path, threshold, max_deployments, deployments, reached):
    from benchmarks.reproduce import behaviour
    from torchrl_depeff.algorithms import BREMENConfig

    monkeypatch.setattr(behaviour, "BREMEN", _FakeBREMEN)
    _FakeBREMEN.built = []
    cfg = BREMENConfig.preset("halfcheetah", "smoke").override({"seed": 1000})
    ckpt, info = behaviour.trained_policy(tmp_path, cfg, threshold=threshold, max_deployments=max_deployments)
    run = _FakeBREMEN.built[-1]
    assert run.deployment == deployments == info["deployments"]
    assert run.config.deployment.num_deployments == max_deployments
    assert info["threshold_reached"] is reached
    assert info["eval_return"] == _FakeBREMEN.returns[deployments - 1]
    assert info["checkpoint_sha256"] == behaviour.file_sha256(ckpt) and ckpt.parent.parent == tmp_path
    # another threshold is another run directory (a cached run is never reused for other settings)
    behaviour.trained_policy(tmp_path, cfg, threshold=123.0, max_deployments=max_deployments)
    assert _FakeBREMEN.built[-1].run_dir != run.run_dir


def test_dataset_refuses_one_made_with_another_checkpoint(tmp_path):
    from benchmarks.reproduce import behaviour

    ckpt = tmp_path / "checkpoint.pt"
    ckpt.write_bytes(b"policy 1")
    path = tmp_path / "eps1"
    path.mkdir()
    (path / "metadata.json").write_text("{}")
    spec = {"checkpoint": str(ckpt), "checkpoint_sha256": behaviour.file_sha256(ckpt), "task": "halfcheetah",
            "size": 10, "noise": "eps1", "seed": 0}
    path.with_suffix(".spec.json").write_text(json.dumps(spec))
    assert behaviour.dataset(path, ckpt, task="halfcheetah", size=10, noise="eps1", seed=0) == path  # cached
    ckpt.write_bytes(b"policy 2")  # retrained behaviour policy, same path
    with pytest.raises(ValueError, match="holds another dataset"):
        behaviour.dataset(path, ckpt, task="halfcheetah", size=10, noise="eps1", seed=0)
