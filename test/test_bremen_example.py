"""examples/bremen: config composition, tiny runs, resume after SIGKILL, refusal, learning (slow)."""
from __future__ import annotations

import dataclasses
import json
import math
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf

from examples.bremen.bremen import train
from examples.bremen.utils import make_bremen_config
from torchrl_depeff.algorithms.bremen import BREMENConfig, PAPER_HYPERPARAMETERS
from torchrl_depeff.data import DeploymentReplayBuffers
from torchrl_depeff.envs import TASK_NAMES

ROOT = Path(__file__).resolve().parents[1]
EXAMPLE = ROOT / "examples" / "bremen"

TINY = [
    "bremen.deployment_size=300",
    "bremen.num_deployments=2",
    "bremen.iterations_per_deployment=3",
    "bremen.rollout_length=5",
    "bremen.trpo_batch_size=40",
    "bremen.ensemble_size=2",
    "bremen.ensemble_num_cells=[16]",
    "bremen.policy_num_cells=[8]",
    "bremen.dynamics_max_epochs=3",
    "bremen.bc_max_epochs=2",
    "bremen.eval_episodes=1",
    "bremen.eval_max_steps=20",
    "bremen.collect_frames_per_batch=100",
    "bremen.log_interval=1",
    "bremen.checkpoint_interval=1",
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
    @pytest.mark.parametrize("task", TASK_NAMES)
    def test_paper_preset_is_table4(self, task):
        cfg = make_bremen_config(_compose(f"task={task}", "preset=paper"))
        for key, value in PAPER_HYPERPARAMETERS[task].items():
            assert getattr(cfg, key) == value, key
        assert cfg == BREMENConfig.paper(task)
        quick = make_bremen_config(_compose(f"task={task}"))
        assert quick.task == task and quick.deployment_size < cfg.deployment_size

    def test_yaml_lists_every_config_field(self):
        cfg = _compose()
        fields = {f.name for f in dataclasses.fields(BREMENConfig)} - {"task", "seed", "device"}
        assert set(cfg.bremen.keys()) == fields

    def test_overrides_and_variant(self):
        cfg = make_bremen_config(_compose("variant=me_trpo", "bremen.max_kl=0.02", "seed=3"))
        assert (cfg.bc_reinit, cfg.max_kl, cfg.seed) == (False, 0.02, 3)

    @pytest.mark.parametrize(
        "override, match",
        [("preset=huge", "huge"), ("variant=sac", "sac"), ("bremen.deployment_size=0", "deployment_size"),
         ("bremen.iterations_per_deployment=-2", "iterations_per_deployment")],
    )
    def test_bad_config_named(self, override, match):
        with pytest.raises(ValueError, match=match):
            make_bremen_config(_compose(override))

    def test_unknown_task(self):
        with pytest.raises(Exception, match="pong"):
            _compose("task=pong")


def test_tiny_run_outputs_and_refuses_other_config(tmp_path):
    out = tmp_path / "run"
    history = train(_compose(*TINY, f"output_dir={out}"))
    assert [h["deployment/count"] for h in history] == [1, 2]
    for name in ("checkpoint.pt", "metrics.json", "returns.png", "summary.md"):
        assert (out / name).is_file(), name
    assert json.loads((out / "metrics.json").read_text())[-1]["deployment/samples"] == 600
    scalars = list((out / "logs").rglob("eval/return_mean.csv")) or list((out / "logs").rglob("*return_mean*"))
    assert scalars, "CSV logger wrote no eval return"
    ckpt = torch.load(out / "checkpoint.pt", weights_only=True)
    assert ckpt["counters"]["deployment"] == 2
    # same directory, different config: refused with the differing keys named, nothing deleted
    with pytest.raises(ValueError, match="max_kl"):
        train(_compose(*TINY, f"output_dir={out}", "bremen.max_kl=0.3"))
    assert DeploymentReplayBuffers(out / "deployments").num_deployments == 2
    # rerunning the finished run is a no-op resume
    assert _normalise(train(_compose(*TINY, f"output_dir={out}"))) == _normalise(history)


def test_offline_mode(tmp_path):
    out = tmp_path / "off"
    history = train(_compose(*TINY, f"output_dir={out}", "mode=offline", "offline.generate_size=300",
                             "offline.generate_noise=eps1", "offline.iterations=2"))
    assert len(history) == 1 and math.isfinite(history[0]["eval/return_mean"])
    assert (out / "offline_dataset").exists()


def _cmd(out: Path, extra: tuple[str, ...] = ()) -> list[str]:
    overrides = [o.replace("num_deployments=2", "num_deployments=3").replace("iterations_per_deployment=3", "iterations_per_deployment=8") for o in TINY]
    return [sys.executable, "-m", "examples.bremen.bremen", f"output_dir={out}", "logger.backend=none", *overrides, *extra]


def _run(cmd: list[str]) -> None:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    subprocess.run(cmd, cwd=ROOT, env=env, check=True, capture_output=True, timeout=600)


def test_sigkill_then_resume_matches_uninterrupted(tmp_path):
    """Kill the example at a random point after its first checkpoint, rerun: same data, same metrics."""
    ref = tmp_path / "ref"
    _run(_cmd(ref))
    rng = random.Random(1234)
    out = tmp_path / "killed"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    killed = False
    for attempt in range(4):
        proc = subprocess.Popen(_cmd(out), cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        deadline = time.time() + 300
        while not (out / "checkpoint.pt").exists() and proc.poll() is None and time.time() < deadline:
            time.sleep(0.05)
        time.sleep(rng.uniform(0.0, 2.0) / (attempt + 1))
        if proc.poll() is None:
            os.kill(proc.pid, signal.SIGKILL)
            proc.wait()
            killed = True
            break
        proc.wait()
    assert killed, "the run always finished before the kill"
    _run(_cmd(out))  # resume
    a = DeploymentReplayBuffers(ref / "deployments")
    b = DeploymentReplayBuffers(out / "deployments")
    assert a.num_deployments == b.num_deployments == 3
    assert (a.as_tensordict("all") == b.as_tensordict("all")).all()
    ha = json.loads((ref / "metrics.json").read_text())
    hb = json.loads((out / "metrics.json").read_text())
    assert _normalise(ha) == _normalise(hb)


@pytest.mark.slow
def test_quick_preset_learns_halfcheetah(tmp_path):
    """The README main command's quick preset clearly beats the random first deployment."""
    history = train(_compose(f"output_dir={tmp_path / 'quick'}", "logger.backend=none"))
    first = history[0]["deployment/return_mean"]
    final = history[-1]["eval/return_mean"]
    assert final > first + 250, (first, final)
