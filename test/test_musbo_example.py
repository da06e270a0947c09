"""examples/musbo: config composition (Table 2 presets, budgets), tiny runs, resume, refusal."""
from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf
from hydra.errors import ConfigCompositionException

from examples.musbo.musbo import train
from torchrl_depeff.algorithms.hydra_configs import register_configs
from torchrl_depeff.algorithms.musbo import BUDGETS, MUSBO_PAPER_HYPERPARAMETERS, MUSBO_VARIANTS, MUSBOConfig
from torchrl_depeff.data import DeploymentReplayBuffers

ROOT = Path(__file__).resolve().parents[1]
EXAMPLE = ROOT / "examples" / "musbo"
TASKS = ("halfcheetah", "ant", "cheetah_run", "hopper", "walker2d")

TINY = ["preset=smoke", "musbo.deployment.size=300", "musbo.trpo.batch_size=40", "musbo.evaluation.max_steps=20"]


def _compose(*overrides: str):
    register_configs()
    with initialize_config_dir(config_dir=str(EXAMPLE), version_base="1.3"):
        return compose(config_name="config", overrides=list(overrides))


def _config(*overrides: str) -> MUSBOConfig:
    return MUSBOConfig.from_dict(OmegaConf.to_container(_compose(*overrides).musbo, resolve=True))


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
        cfg = _config(f"task={task}", "preset=paper", f"budget={budget}")
        L, H, delta, I = self.TABLE2[task]
        assert (cfg.trpo.iterations, cfg.imagination.rollout_length, cfg.trpo.max_kl, cfg.deployment.num_deployments) == (L, H, delta, I)
        # sec. 5: B = 100k / 50k (5 deployments), 50k / 25k (10 deployments)
        assert cfg.deployment.size == {"500k": 500_000, "250k": 250_000}[budget] // I
        assert cfg.trpo.gae_lambda == (0.97 if task == "ant" else 0.95)
        assert (cfg.uncertainty.alpha, cfg.labeler.num_members, cfg.labeler.lr, cfg.bc.lr) == (0.028, 3, 1e-3, 5e-4)
        assert cfg == MUSBOConfig.paper(task, budget=budget)
        quick = _config(f"task={task}")
        assert quick.task == task and quick.deployment.size < cfg.deployment.size

    def test_presets_cover_every_paper_task(self):
        assert set(TASKS) == set(MUSBO_PAPER_HYPERPARAMETERS) and set(BUDGETS) == {"250k", "500k"}

    def test_overrides_and_variant(self):
        cfg = _config("variant=no_exploration", "musbo.uncertainty.alpha=0.05", "seed=3")
        assert (cfg.exploration.enabled, cfg.uncertainty.alpha, cfg.seed, cfg.name) == (False, 0.05, 3, "no_exploration")
        for variant in MUSBO_VARIANTS:
            assert _config(f"variant={variant}") == MUSBOConfig.preset("halfcheetah", "quick").variant(variant)

    @pytest.mark.parametrize(
        "override, match",
        [("musbo.uncertainty.alpha=-1.0", "uncertainty.alpha"), ("musbo.labeler.num_members=1", "labeler.num_members"),
         ("musbo.deployment.size=0", "deployment.size")],
    )
    def test_bad_values_named(self, override, match):
        with pytest.raises(ValueError, match=match):
            _config(override)

    @pytest.mark.parametrize("override", ["preset=huge", "variant=sac", "budget=1m", "musbo.alpha=0.1",
                                          "musbo.uncertainty.alpha=abc"])
    def test_bad_overrides_refused_at_composition(self, override):
        with pytest.raises(Exception, match=override.split("=")[1] if "alpha" not in override else "alpha"):
            _compose(override)
        with pytest.raises(ConfigCompositionException):
            _compose("budget=1m")


def test_tiny_run_outputs_resume_and_refusal(tmp_path):
    torch.set_num_threads(1)
    out = tmp_path / "run"
    # one deployment, then the same run extended to two (resume from the checkpoint)
    first = train(_compose(*TINY, f"output_dir={out}", "musbo.deployment.num_deployments=1"))
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
    assert list((out / "logs" / "musbo").rglob("novelty.csv")), "CSV logger wrote no novelty under logs/musbo"
    assert "novelty (Table 1)" in (out / "summary.md").read_text()
    ckpt = torch.load(out / "checkpoint.pt", weights_only=True)
    assert ckpt["counters"]["deployment"] == 2 and ckpt["strategies"]["model.labeler"]["fitted"]
    # same directory, different config: refused with the differing key named, nothing deleted
    with pytest.raises(ValueError, match="uncertainty.alpha"):
        train(_compose(*TINY, f"output_dir={out}", "musbo.uncertainty.alpha=0.3"))
    assert DeploymentReplayBuffers(out / "deployments").num_deployments == 2
    # rerunning the finished run is a no-op resume
    assert _normalise(train(_compose(*TINY, f"output_dir={out}"))) == _normalise(history)
