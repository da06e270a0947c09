"""examples/musbo: config composition (Table 2 presets, budgets), tiny runs, resume, refusal."""
from __future__ import annotations

import dataclasses
import json
import math
from pathlib import Path

import pytest
import torch
from hydra import compose, initialize_config_dir

from examples.musbo.musbo import train
from examples.musbo.utils import make_musbo_config
from torchrl_depeff.algorithms.musbo import BUDGETS, MUSBO_PAPER_HYPERPARAMETERS, MUSBOConfig
from torchrl_depeff.data import DeploymentReplayBuffers

ROOT = Path(__file__).resolve().parents[1]
EXAMPLE = ROOT / "examples" / "musbo"
TASKS = ("halfcheetah", "ant", "cheetah_run", "hopper", "walker2d")

TINY = [
    "musbo.deployment_size=300",
    "musbo.num_deployments=2",
    "musbo.iterations_per_deployment=2",
    "musbo.rollout_length=5",
    "musbo.trpo_batch_size=40",
    "musbo.ensemble_size=2",
    "musbo.ensemble_num_cells=[16]",
    "musbo.labeler_num_cells=[16]",
    "musbo.policy_num_cells=[8]",
    "musbo.dynamics_max_epochs=2",
    "musbo.labeler_max_epochs=2",
    "musbo.bc_max_epochs=2",
    "musbo.eval_episodes=1",
    "musbo.eval_max_steps=20",
    "musbo.collect_frames_per_batch=100",
    "musbo.metrics_horizon=5",
    "musbo.metrics_num_trajectories=4",
    "musbo.log_interval=1",
    "musbo.checkpoint_interval=1",
]


def _compose(*overrides: str):
    with initialize_config_dir(config_dir=str(EXAMPLE), version_base="1.3"):
        return compose(config_name="config", overrides=list(overrides))


def _normalise(history: list[dict]) -> list[dict]:
    return [
        {k: ("nan" if isinstance(v, float) and math.isnan(v) else v) for k, v in h.items() if not k.startswith("time/")}
        for h in history
    ]


class TestConfig:
    # MUSBO Table 2: (L, rollout length, delta); deployments: sec. 5
    TABLE2 = {
        "ant": (2000, 250, 0.05, 5), "halfcheetah": (2000, 250, 0.1, 5), "hopper": (6000, 1000, 0.05, 10),
        "walker2d": (2000, 1000, 0.05, 10), "cheetah_run": (2000, 250, 0.05, 5),
    }

    @pytest.mark.parametrize("task", TASKS)
    @pytest.mark.parametrize("budget", ["250k", "500k"])
    def test_paper_preset_is_table2(self, task, budget):
        cfg = make_musbo_config(_compose(f"task={task}", "preset=paper", f"budget={budget}"))
        L, H, delta, I = self.TABLE2[task]
        assert (cfg.iterations_per_deployment, cfg.rollout_length, cfg.max_kl, cfg.num_deployments) == (L, H, delta, I)
        # sec. 5: B = 100k / 50k (5 deployments), 50k / 25k (10 deployments)
        assert cfg.deployment_size == {"500k": 500_000, "250k": 250_000}[budget] // I
        assert cfg.gae_lambda == (0.97 if task == "ant" else 0.95)
        assert (cfg.alpha, cfg.labeler_size, cfg.labeler_lr, cfg.bc_lr) == (0.028, 3, 1e-3, 5e-4)
        assert cfg == MUSBOConfig.paper(task, budget=budget)
        quick = make_musbo_config(_compose(f"task={task}"))
        assert quick.task == task and quick.deployment_size < cfg.deployment_size

    def test_presets_cover_every_paper_task(self):
        assert set(TASKS) == set(MUSBO_PAPER_HYPERPARAMETERS) and set(BUDGETS) == {"250k", "500k"}

    def test_yaml_lists_every_config_field(self):
        cfg = _compose()
        fields = {f.name for f in dataclasses.fields(MUSBOConfig)} - {"task", "seed", "device"}
        assert set(cfg.musbo.keys()) == fields

    def test_overrides_and_variant(self):
        cfg = make_musbo_config(_compose("variant=no_exploration", "musbo.alpha=0.05", "seed=3"))
        assert (cfg.uncertainty_exploration, cfg.alpha, cfg.seed) == (False, 0.05, 3)

    @pytest.mark.parametrize(
        "override, match",
        [("preset=huge", "huge"), ("variant=sac", "sac"), ("musbo.alpha=-1.0", "alpha"),
         ("musbo.labeler_size=1", "labeler_size"), ("musbo.deployment_size=0", "deployment_size")],
    )
    def test_bad_config_named(self, override, match):
        with pytest.raises(ValueError, match=match):
            make_musbo_config(_compose(override))

    def test_bad_budget_named(self):
        with pytest.raises(ValueError, match="1m"):
            make_musbo_config(_compose("preset=paper", "budget=1m"))


def test_tiny_run_outputs_resume_and_refusal(tmp_path):
    torch.set_num_threads(1)
    out = tmp_path / "run"
    # one deployment, then the same run extended to two (resume from the checkpoint)
    first = train(_compose(*TINY, f"output_dir={out}", "musbo.num_deployments=1"))
    assert len(first) == 1 and "metrics/novelty" not in first[0]
    fake_bremen = tmp_path / "bremen"
    fake_bremen.mkdir()
    (fake_bremen / "metrics.json").write_text(json.dumps(
        [{"deployment/samples": 300 * (k + 1), "eval/return_mean": float(k)} for k in range(2)]
    ))
    history = train(_compose(*TINY, f"output_dir={out}", f"compare_with={fake_bremen}"))
    assert [h["deployment/count"] for h in history] == [1, 2]
    assert _normalise(history[:1]) == _normalise(first)
    assert history[1]["deployment/uncertainty_exploration"] == 1.0
    assert 0.0 < history[1]["metrics/novelty"] <= 1.0 + 1e-6
    for name in ("checkpoint.pt", "metrics.json", "returns.png", "metrics.png", "summary.md", "comparison.png"):
        assert (out / name).is_file(), name
    assert json.loads((out / "metrics.json").read_text())[-1]["deployment/samples"] == 600
    assert list((out / "logs").rglob("novelty.csv")), "CSV logger wrote no novelty"
    assert "novelty (Table 1)" in (out / "summary.md").read_text()
    ckpt = torch.load(out / "checkpoint.pt", weights_only=True)
    assert ckpt["counters"]["deployment"] == 2 and ckpt["labeler_fitted"]
    # same directory, different config: refused with the differing key named, nothing deleted
    with pytest.raises(ValueError, match="alpha"):
        train(_compose(*TINY, f"output_dir={out}", "musbo.alpha=0.3"))
    assert DeploymentReplayBuffers(out / "deployments").num_deployments == 2
    # rerunning the finished run is a no-op resume
    assert _normalise(train(_compose(*TINY, f"output_dir={out}"))) == _normalise(history)
