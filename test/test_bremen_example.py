"""examples/bremen: config composition, tiny runs, resume after SIGKILL, refusal, learning (slow)."""
from __future__ import annotations

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
from hydra.errors import ConfigCompositionException
from omegaconf.errors import ValidationError

from examples.bremen.bremen import train
from torchrl_depeff.algorithms.bremen import BREMENConfig, PAPER_HYPERPARAMETERS, VARIANTS
from torchrl_depeff.algorithms.hydra_configs import register_configs
from torchrl_depeff.data import DeploymentReplayBuffers
from torchrl_depeff.envs import TASK_NAMES

ROOT = Path(__file__).resolve().parents[1]
EXAMPLE = ROOT / "examples" / "bremen"

# the smoke preset, with B = 300 and 8 imaginary rollouts of 5 steps
TINY = ["preset=smoke", "bremen.deployment.size=300", "bremen.trpo.iterations=3", "bremen.trpo.batch_size=40",
        "bremen.evaluation.max_steps=20", "bremen.model.max_epochs=3"]


def _compose(*overrides: str):
    register_configs()
    with initialize_config_dir(config_dir=str(EXAMPLE), version_base="1.3"):
        return compose(config_name="config", overrides=list(overrides))


def _config(*overrides: str) -> BREMENConfig:
    return BREMENConfig.from_dict(OmegaConf.to_container(_compose(*overrides).bremen, resolve=True))


def _normalise(history: list[dict]) -> list[dict]:
    return [
        {k: ("nan" if isinstance(v, float) and math.isnan(v) else v) for k, v in h.items() if not k.startswith("time/")}
        for h in history
    ]


class TestConfig:
    @pytest.mark.parametrize("task", TASK_NAMES)
    def test_paper_preset_is_the_library_table(self, task):
        cfg = _config(f"task={task}", "preset=paper")
        assert cfg == BREMENConfig.paper(task)
        quick = _config(f"task={task}")
        assert quick.task == task and quick.deployment.size < cfg.deployment.size
        assert quick == BREMENConfig.preset(task, "quick")

    def test_table4_reaches_the_cli(self):
        # BREMEN Table 4, Hopper column, as the CLI builds it
        cfg = _config("task=hopper", "preset=paper")
        assert (cfg.trpo.iterations, cfg.deployment.num_deployments, cfg.imagination.rollout_length) == (6000, 10, 1000)
        assert (cfg.trpo.max_kl, cfg.trpo.gamma, cfg.trpo.gae_lambda, cfg.policy.sigma) == (0.05, 0.99, 0.95, 0.1)
        assert set(PAPER_HYPERPARAMETERS) <= set(TASK_NAMES)

    def test_overrides_and_variant(self):
        cfg = _config("variant=me_trpo", "bremen.trpo.max_kl=0.02", "seed=3", "bremen.model.num_cells=[64,64]")
        assert (cfg.bc.reinit, cfg.trpo.max_kl, cfg.seed, cfg.name) == (False, 0.02, 3, "me_trpo")
        assert cfg.model.num_cells == (64, 64)
        for variant in VARIANTS:
            assert _config(f"variant={variant}") == BREMENConfig.preset("halfcheetah", "quick").variant(variant)

    @pytest.mark.parametrize(
        "override, error, match",
        [
            ("bremen.trpo.max_kl=abc", ValidationError, "max_kl"),  # type-checked by the schema
            ("bremen.trpo.check_kl=maybe", ValidationError, "check_kl"),
            ("bremen.model.lr=true", ValidationError, "lr"),
            ("bremen.trpo.kl=0.1", ConfigCompositionException, "kl"),  # unknown key
            ("preset=huge", ConfigCompositionException, "huge"),
            ("variant=sac", ConfigCompositionException, "sac"),
            ("task=pong", ConfigCompositionException, "pong"),
        ],
    )
    def test_bad_overrides_refused_at_composition(self, override, error, match):
        with pytest.raises((error, ConfigCompositionException), match=match):
            _compose(override)

    @pytest.mark.parametrize(
        "override, match",
        [("bremen.deployment.size=0", "deployment.size"), ("bremen.trpo.iterations=-2", "trpo.iterations"),
         ("bremen.trpo.max_kl=inf", "trpo.max_kl"), ("bremen.trpo.gamma=nan", "trpo.gamma"),
         ("mode=online", "online"), ("seed=abc", "seed")],
    )
    def test_bad_values_named(self, override, match):
        # ValidationError (OmegaConf, at interpolation) is a ValueError too
        with pytest.raises(ValueError, match=match):
            _config(override)


def test_tiny_run_outputs_and_refuses_other_config(tmp_path):
    out = tmp_path / "run"
    history = train(_compose(*TINY, f"output_dir={out}"))
    assert [h["deployment/count"] for h in history] == [1, 2]
    for name in ("checkpoint.pt", "metrics.json", "returns.png", "summary.md"):
        assert (out / name).is_file(), name
    assert json.loads((out / "metrics.json").read_text())[-1]["deployment/samples"] == 600
    assert list((out / "logs" / "bremen").rglob("return_mean.csv")), "CSV logger wrote no eval return"
    ckpt = torch.load(out / "checkpoint.pt", weights_only=True)
    assert ckpt["counters"]["deployment"] == 2
    # same directory, different config: refused with the differing keys named, nothing deleted
    with pytest.raises(ValueError, match="trpo.max_kl"):
        train(_compose(*TINY, f"output_dir={out}", "bremen.trpo.max_kl=0.3"))
    assert DeploymentReplayBuffers(out / "deployments").num_deployments == 2
    # rerunning the finished run is a no-op resume
    assert _normalise(train(_compose(*TINY, f"output_dir={out}"))) == _normalise(history)
    # a checkpoint written before model.matmul_precision and evaluation.batched existed resumes
    # (an absent field counts as its default: None, False); another value than the default does not
    del ckpt["config"]["model"]["matmul_precision"], ckpt["config"]["evaluation"]["batched"]
    torch.save(ckpt, out / "checkpoint.pt")
    assert _normalise(train(_compose(*TINY, f"output_dir={out}"))) == _normalise(history)
    with pytest.raises(ValueError, match=r"evaluation.batched=False->True"):
        train(_compose(*TINY, f"output_dir={out}", "bremen.evaluation.batched=true"))
    # an offline run on the finished deployments directory: refused (mode differs), metrics.json kept
    before = (out / "metrics.json").read_bytes()
    with pytest.raises(ValueError, match="mode"):
        train(_compose(*TINY, f"output_dir={out}", "mode=offline", "offline.generate_size=300"))
    assert (out / "metrics.json").read_bytes() == before


def test_offline_mode(tmp_path):
    out = tmp_path / "off"
    history = train(_compose(*TINY, f"output_dir={out}", "mode=offline", "offline.generate_size=300",
                             "offline.generate_noise=eps1", "bremen.trpo.iterations=2"))
    assert len(history) == 1 and math.isfinite(history[0]["eval/return_mean"])
    assert (out / "offline_dataset").exists()


def test_offline_dataset_from_a_trained_policy(tmp_path):
    """Alg. 2 datasets (App. G.4) from a partially trained policy: a BREMEN run's checkpoint."""
    train(_compose(*TINY, f"output_dir={tmp_path / 'online'}", "bremen.deployment.num_deployments=1"))
    out = tmp_path / "off"
    history = train(_compose(*TINY, f"output_dir={out}", "mode=offline", "offline.generate_size=300",
                             f"offline.behaviour_policy={tmp_path / 'online' / 'checkpoint.pt'}",
                             "bremen.trpo.iterations=1"))
    assert len(history) == 1
    data = DeploymentReplayBuffers(out / "deployments").as_tensordict(0)
    assert data["action"].abs().max() <= 1.0  # the behaviour policy's actions are clipped to the bounds


def _cmd(out: Path, extra: tuple[str, ...] = ()) -> list[str]:
    overrides = [*TINY, "bremen.deployment.num_deployments=3", "bremen.trpo.iterations=8"]
    return [sys.executable, "-m", "examples.bremen.bremen", f"output_dir={out}", "logger.backend=none", *overrides, *extra]


def _run(cmd: list[str], cwd: Path = ROOT) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    return subprocess.run(cmd, cwd=cwd, env=env, check=True, capture_output=True, timeout=600)


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


def test_runs_as_a_file_from_another_directory(tmp_path):
    """``python path/to/examples/bremen/bremen.py`` works outside the repository root."""
    out = tmp_path / "elsewhere"
    cmd = [sys.executable, str(EXAMPLE / "bremen.py"), f"output_dir={out}", "logger.backend=none", *TINY,
           "bremen.deployment.num_deployments=1"]
    _run(cmd, cwd=tmp_path)
    assert json.loads((out / "metrics.json").read_text())[0]["deployment/count"] == 1


@pytest.mark.slow
def test_quick_preset_learns_halfcheetah(tmp_path):
    """The README main command's quick preset clearly beats the random first deployment."""
    history = train(_compose(f"output_dir={tmp_path / 'quick'}", "logger.backend=none"))
    first = history[0]["deployment/return_mean"]
    final = history[-1]["eval/return_mean"]
    assert final > first + 250, (first, final)


def test_readme_own_script_runs(tmp_path, capsys):
    """README's "BREMEN in your own script" block runs as written (smoke preset, a temp run_dir)."""
    text = (ROOT / "README.md").read_text()
    section = text[text.index("### BREMEN in your own script"):]
    code = section[section.index("```python") + len("```python"):section.index("```", section.index("```python") + 9)]
    assert 'preset("halfcheetah", "quick")' in code and "algo.end_deployment()" in code
    code = code.replace('"quick"', '"smoke"').replace('"runs/my_bremen"', repr(str(tmp_path / "mine")))
    code = code.replace('"trpo.iterations": 20', '"trpo.iterations": 2')
    exec(compile(code, "README.md", "exec"), {})
    assert len(capsys.readouterr().out.strip().splitlines()) == 3  # one line per deployment
    assert json.loads((tmp_path / "mine" / "metrics.json").read_text())[-1]["deployment/count"] == 3
