"""Bad inputs to the algorithms' public API and the example CLIs: each gets a clear error naming it.

Part of issue 16's catalogue (the other parts live next to the code they test:
``test/test_bad_inputs.py``, ``test/envs/test_bad_inputs_model.py``,
``test/objectives/test_bad_inputs_losses.py``). Storage cases also check that nothing on disk
changed.
"""
from __future__ import annotations

import hashlib
from pathlib import Path

import pytest

from hydra import compose, initialize_config_dir
from hydra.errors import ConfigCompositionException
from omegaconf import OmegaConf
from omegaconf.errors import ValidationError
from torchrl.envs import GymEnv

from torchrl_depeff.algorithms import BREMEN, BREMENConfig, MB2POConfig, MUSBO, MUSBOConfig
from torchrl_depeff.algorithms.hydra_configs import register_configs

ROOT = Path(__file__).resolve().parents[2]


def _digest(root: Path) -> str:
    h = hashlib.sha256()
    for path in sorted(p for p in root.rglob("*") if p.is_file()):
        h.update(str(path.relative_to(root)).encode())
        h.update(path.read_bytes())
    return h.hexdigest()


@pytest.mark.parametrize(
    "overrides, error, match",
    [
        ({"trpo.max_kl": -0.1}, ValueError, r"trpo\.max_kl.*-0\.1"),
        ({"trpo.max_kl": float("nan")}, ValueError, r"trpo\.max_kl.*nan"),
        ({"trpo.cg_damping": float("inf")}, ValueError, r"trpo\.cg_damping.*inf"),
        ({"model.lr": True}, ValueError, r"model\.lr.*True"),
        ({"bc.lr": "fast"}, ValueError, r"bc\.lr.*fast"),
        ({"deployment.num_deployments": 2.5}, ValueError, r"deployment\.num_deployments.*2\.5"),
        ({"deployment.collector": "spark"}, ValueError, r"deployment\.collector.*spark"),
        ({"policy.num_cells": ()}, ValueError, r"policy\.num_cells"),
        ({"policy.num_cells": (64, 0)}, ValueError, r"policy\.num_cells.*0"),
        ({"imagination.member_selection": "best"}, ValueError, r"imagination\.member_selection.*best"),
        ({"evaluation.episodes": -1}, ValueError, r"evaluation\.episodes.*-1"),
        ({"seed": -3}, ValueError, r"seed.*-3"),
        ({"device": "gpu0"}, ValueError, r"gpu0"),
        ({"policy.sigma": 0.0}, ValueError, r"policy\.sigma.*0\.0"),
        ({"trpo.optimizer": "adam"}, KeyError, r"trpo\.optimizer"),
        ({"trpo.max_kl.value": 1.0}, KeyError, r"max_kl"),
    ],
)
def test_bremen_config_values(overrides, error, match):
    with pytest.raises(error, match=match):
        BREMENConfig().override(overrides)


@pytest.mark.parametrize(
    "build, error, match",
    [
        (lambda: MUSBOConfig().override({"labeler.num_members": 1}), ValueError, r"labeler\.num_members"),
        (lambda: MUSBOConfig().override({"exploration.const_std": float("nan")}), ValueError, r"exploration\.const_std"),
        (lambda: MB2POConfig().override({"finetune.omega": 2.0}), ValueError, r"finetune\.omega.*2\.0"),
        (lambda: MB2POConfig().override({"awac.tau": float("inf")}), ValueError, r"awac\.tau.*inf"),
        (lambda: MB2POConfig.paper("ant", "medium"), ValueError, r"ant-medium"),
        (lambda: MUSBOConfig.paper("hopper", budget="1m"), ValueError, r"1m"),
        (lambda: BREMENConfig.preset("hopper", "huge"), ValueError, r"huge"),
        (lambda: BREMENConfig().variant("sac"), ValueError, r"sac"),
        (lambda: BREMENConfig.from_dict({"trpo": {"kl": 0.1}}), KeyError, r"trpo\.kl"),
        (lambda: BREMENConfig.from_dict({"trpo": 0.1}), TypeError, r"trpo"),
    ],
)
def test_other_configs(build, error, match):
    with pytest.raises(error, match=match):
        build()


class TestConstructorsAndPhases:
    def test_wrong_config_type(self, tmp_path):
        with pytest.raises(TypeError, match="BREMENConfig, got dict"):
            BREMEN({"task": "hopper"}, run_dir=tmp_path)
        with pytest.raises(TypeError, match="MUSBOConfig, got BREMENConfig"):
            MUSBO(BREMENConfig.tiny(), run_dir=tmp_path)

    def test_run_dir_and_data_root(self, tmp_path):
        with pytest.raises(ValueError, match="run_dir"):
            BREMEN(BREMENConfig.tiny())
        with pytest.raises(ValueError, match="not both"):
            BREMEN(BREMENConfig.tiny(), run_dir=tmp_path, data_root=tmp_path / "d")

    def test_env_of_another_task(self, tmp_path):
        # a Pendulum env for the HalfCheetah task: refused by name before anything runs
        with pytest.raises(ValueError, match=r"\(\[3\], \[1\]\).*'halfcheetah'.*\(\[17\], \[6\]\)"):
            BREMEN(BREMENConfig.tiny(), run_dir=tmp_path, env=GymEnv("Pendulum-v1"))

    def test_phase_out_of_order(self, tmp_path):
        algo = BREMEN(BREMENConfig.tiny(), run_dir=tmp_path)
        with pytest.raises(RuntimeError, match="'fit'.*before phase 'collect'"):
            algo.fit_model()
        with pytest.raises(RuntimeError, match="not finished"):
            algo.end_deployment()

    def test_changed_config_on_a_run_dir_leaves_the_disk_unchanged(self, tmp_path):
        BREMEN(BREMENConfig.tiny().override({"deployment.num_deployments": 1}), run_dir=tmp_path).run()
        before = _digest(tmp_path)
        with pytest.raises(ValueError, match=r"policy\.sigma=0\.1->0\.3"):
            BREMEN(BREMENConfig.tiny().override({"deployment.num_deployments": 1, "policy.sigma": 0.3}), run_dir=tmp_path)
        assert _digest(tmp_path) == before

    def test_corrupt_checkpoint_is_named(self, tmp_path):
        algo = BREMEN(BREMENConfig.tiny(), run_dir=tmp_path)
        algo.collect()
        (tmp_path / "checkpoint.pt").write_bytes(b"")  # a zero-byte checkpoint
        with pytest.raises(ValueError, match="checkpoint.pt.*0 bytes.*damaged"):
            BREMEN(BREMENConfig.tiny(), run_dir=tmp_path)


def _compose(example: str, *overrides: str):
    register_configs()
    with initialize_config_dir(config_dir=str(ROOT / "examples" / example), version_base="1.3"):
        return compose(config_name="config", overrides=list(overrides))


@pytest.mark.parametrize(
    "example, override, error, match",
    [
        ("bremen", "bremen.trpo.max_kl=abc", ValidationError, "abc"),
        ("bremen", "bremen.trpo.check_kl=maybe", ValidationError, "maybe"),
        ("bremen", "bremen.deployment.size=1.5", ValidationError, "1.5"),
        ("bremen", "bremen.max_kl=0.1", ConfigCompositionException, "max_kl"),
        ("musbo", "musbo.exploration.enabled=sometimes", ValidationError, "sometimes"),
        ("musbo", "budget=1m", ConfigCompositionException, "1m"),
        ("mb2po", "mb2po.finetune.horizon=abc", ValidationError, "abc"),
        ("mb2po", "dataset=replay", ConfigCompositionException, "replay"),
        ("mb2po", "task=ant", ConfigCompositionException, "ant"),
    ],
)
def test_cli_overrides_are_type_checked(example, override, error, match):
    with pytest.raises((error, ConfigCompositionException), match=match):
        cfg = _compose(example, override)
        OmegaConf.to_container(cfg, resolve=True)


@pytest.mark.parametrize(
    "example, override, match",
    [("bremen", "seed=abc", "seed"), ("bremen", "mode=online", "online"), ("mb2po", "mb2po.finetune.omega=1.5", "omega")],
)
def test_cli_values_are_range_checked(example, override, match):
    from examples.bremen.bremen import train as bremen_train
    from examples.mb2po.mb2po import train as mb2po_train

    train = {"bremen": bremen_train, "mb2po": mb2po_train}[example]
    with pytest.raises(ValueError, match=match):
        train(_compose(example, "preset=smoke", override))



