"""The reproduction commands (benchmarks/reproduce): each --quick run ends with its JSON, plot and table."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

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
    # a rerun finds every job done and recomputes nothing
    again = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert again.returncode == 0 and "0 to run" in again.stdout
