"""Tests for BREMEN behaviour datasets (noise variants), atomic save/load, validation, loaders."""
from __future__ import annotations

import re
import sys

import h5py
import numpy as np
import pytest
import torch
from tensordict import TensorDict
from tensordict.nn import TensorDictModule
from torchrl.envs import GymEnv

from torchrl_depeff.collectors import collect_behaviour_dataset
from torchrl_depeff.data import datasets as ds
from torchrl_depeff.data.datasets import (
    load_behaviour_dataset,
    load_d4rl_hdf5,
    load_minari,
    save_behaviour_dataset,
    validate_offline_dataset,
)

N = 1000  # Pendulum-v1: action bounds [-2, 2]


def make_pi_b() -> TensorDictModule:
    """Deterministic behaviour policy with actions well inside [-2, 2]."""
    torch.manual_seed(0)
    net = torch.nn.Linear(3, 1)
    with torch.no_grad():
        net.weight.mul_(0.3)
        net.bias.zero_()
    return TensorDictModule(net, ["observation"], ["action"])


def pi_b_actions(pi_b, data):
    with torch.no_grad():
        return pi_b(data.select("observation").clone())["action"]


def transitions(n: int = 6) -> TensorDict:
    return TensorDict(
        {
            "observation": torch.randn(n, 3),
            "action": torch.randn(n, 1),
            "next": {
                "observation": torch.randn(n, 3),
                "reward": torch.randn(n, 1),
                "done": torch.zeros(n, 1, dtype=torch.bool),
            },
        },
        batch_size=[n],
    )


@pytest.fixture(scope="module")
def pi_b():
    return make_pi_b()


class TestNoiseVariants:
    @pytest.mark.parametrize("noise,eps", [("eps1", 0.1), ("eps3", 0.3)])
    def test_epsilon_fraction(self, pi_b, noise, eps):
        data = collect_behaviour_dataset(pi_b, GymEnv("Pendulum-v1"), N, noise=noise, seed=0)
        mode = data["behaviour_mode"]
        assert data.batch_size == (N,)
        assert mode.bincount().tolist() == [400, 400, 200]
        assert mode.tolist() == sorted(mode.tolist())  # pi_b, then noisy, then uniform
        differs = (data["action"] - pi_b_actions(pi_b, data)).abs().squeeze(-1) > 1e-6
        assert not differs[mode == 0].any()  # pi_b part is pi_b exactly
        frac = differs[mode == 1].float().mean().item()
        # binomial(400, eps): 4 standard deviations
        assert abs(frac - eps) < 4 * (eps * (1 - eps) / 400) ** 0.5
        assert differs[mode == 2].all()
        uniform = data["action"][mode == 2]
        assert uniform.abs().max() <= 2.0 and uniform.var().item() == pytest.approx(16 / 12, rel=0.25)

    @pytest.mark.parametrize("noise,sigma", [("gaussian1", 0.1), ("gaussian3", 0.3)])
    def test_gaussian_std(self, pi_b, noise, sigma):
        data = collect_behaviour_dataset(pi_b, GymEnv("Pendulum-v1"), N, noise=noise, seed=1)
        mode = data["behaviour_mode"]
        delta = (data["action"] - pi_b_actions(pi_b, data)).squeeze(-1)
        assert delta[mode == 0].abs().max() < 1e-6
        noisy = delta[mode == 1]
        assert noisy.std().item() == pytest.approx(sigma, rel=0.15)
        assert abs(noisy.mean().item()) < 4 * sigma / 20
        assert data["action"].abs().max() <= 2.0  # clipped to the bounds

    def test_random_and_none(self, pi_b):
        rand = collect_behaviour_dataset(pi_b, GymEnv("Pendulum-v1"), 300, noise="random", seed=0)
        assert (rand["behaviour_mode"] == 2).all()
        assert rand["action"].min() < -1.5 and rand["action"].max() > 1.5
        clean = collect_behaviour_dataset(pi_b, GymEnv("Pendulum-v1"), 50, noise=None, seed=0)
        assert (clean["behaviour_mode"] == 0).all()
        torch.testing.assert_close(clean["action"], pi_b_actions(pi_b, clean))

    def test_seed_reproducible(self, pi_b):
        a = collect_behaviour_dataset(pi_b, GymEnv("Pendulum-v1"), 60, noise="gaussian3", seed=4)
        b = collect_behaviour_dataset(pi_b, GymEnv("Pendulum-v1"), 60, noise="gaussian3", seed=4)
        c = collect_behaviour_dataset(pi_b, GymEnv("Pendulum-v1"), 60, noise="gaussian3", seed=5)
        torch.testing.assert_close(a["action"], b["action"])
        assert not torch.allclose(a["action"], c["action"])

    def test_bad_noise(self, pi_b):
        with pytest.raises(ValueError, match="eps2"):
            collect_behaviour_dataset(pi_b, GymEnv("Pendulum-v1"), 10, noise="eps2")


class TestSaveLoad:
    def test_collect_with_path_roundtrip(self, pi_b, tmp_path):
        data = collect_behaviour_dataset(
            pi_b, GymEnv("Pendulum-v1"), 40, noise="eps1", seed=0, path=tmp_path / "ds"
        )
        loaded = load_behaviour_dataset(tmp_path / "ds")
        assert loaded.batch_size == (40,)
        for key in data.keys(True, True):
            assert torch.equal(loaded[key], data[key]), key
        with pytest.raises(FileExistsError):
            save_behaviour_dataset(data, tmp_path / "ds")

    def test_interrupted_save_leaves_nothing(self, tmp_path, monkeypatch):
        def boom(self, path):
            raise KeyboardInterrupt("killed")

        monkeypatch.setattr(ds.TensorDictReplayBuffer, "dumps", boom)
        with pytest.raises(KeyboardInterrupt):
            save_behaviour_dataset(transitions(), tmp_path / "ds")
        assert list(tmp_path.iterdir()) == []
        monkeypatch.undo()
        save_behaviour_dataset(transitions(), tmp_path / "ds")
        assert load_behaviour_dataset(tmp_path / "ds").batch_size == (6,)

    def test_load_missing(self, tmp_path):
        with pytest.raises(FileNotFoundError, match="metadata"):
            load_behaviour_dataset(tmp_path)


class TestValidate:
    def test_valid_dataset_passes_unchanged(self):
        td = transitions()
        before = td.clone()
        validate_offline_dataset(td)  # raises on any problem
        assert (td == before).all()

    @pytest.mark.parametrize(
        "mutate,err,match",
        [
            (lambda td: td.exclude("action"), KeyError, "action"),
            (lambda td: td.exclude(("next", "reward")), KeyError, "reward"),
            (lambda td: td.set(("next", "reward"), torch.full((6, 1), float("nan"))), ValueError, "reward"),
            (lambda td: td.set(("next", "reward"), torch.zeros(6, 2)), ValueError, "reward"),
            (lambda td: td.set(("next", "done"), torch.zeros(6, 1)), ValueError, "bool"),
            (lambda td: td.set(("next", "observation"), torch.zeros(6, 4)), ValueError, "observation"),
            (lambda td: td.reshape(2, 3), ValueError, "1-D"),
        ],
    )
    def test_errors(self, mutate, err, match):
        with pytest.raises(err, match=match):
            validate_offline_dataset(mutate(transitions()))


class TestD4RL:
    def _write(self, path, with_next: bool):
        n = 6
        obs = np.arange(n * 2, dtype=np.float32).reshape(n, 2)
        with h5py.File(path, "w") as f:
            f.create_dataset("observations", data=obs)
            f.create_dataset("actions", data=np.full((n, 1), 0.5, np.float32))
            f.create_dataset("rewards", data=np.arange(n, dtype=np.float32))
            f.create_dataset("terminals", data=np.array([0, 0, 1, 0, 0, 0], bool))
            f.create_dataset("timeouts", data=np.array([0, 0, 0, 0, 1, 0], bool))
            f.create_dataset("infos/qpos", data=np.zeros((n, 3), np.float32))
            if with_next:
                f.create_dataset("next_observations", data=obs + 100)
        return obs

    def test_with_next_observations(self, tmp_path):
        obs = self._write(tmp_path / "d.hdf5", with_next=True)
        td = load_d4rl_hdf5(tmp_path / "d.hdf5")
        validate_offline_dataset(td)
        assert td.batch_size == (6,)
        torch.testing.assert_close(td["next", "observation"], torch.from_numpy(obs + 100))
        assert td["next", "reward"].squeeze(-1).tolist() == [0, 1, 2, 3, 4, 5]
        assert td["next", "terminated"].squeeze(-1).tolist() == [False, False, True, False, False, False]
        assert td["next", "truncated"].squeeze(-1).tolist() == [False, False, False, False, True, False]
        assert td["next", "done"].squeeze(-1).tolist() == [False, False, True, False, True, False]

    def test_without_next_observations(self, tmp_path):
        obs = self._write(tmp_path / "d.hdf5", with_next=False)
        td = load_d4rl_hdf5(tmp_path / "d.hdf5")
        # row 4 (timeout: successor starts a new episode) and row 5 (last) are dropped
        assert td["next", "reward"].squeeze(-1).tolist() == [0, 1, 2, 3]
        torch.testing.assert_close(td["next", "observation"], torch.from_numpy(obs[1:5]))
        torch.testing.assert_close(td["observation"], torch.from_numpy(obs[:4]))

    def test_missing_key(self, tmp_path):
        with h5py.File(tmp_path / "bad.hdf5", "w") as f:
            f.create_dataset("observations", data=np.zeros((3, 2), np.float32))
        with pytest.raises(KeyError, match="actions"):
            load_d4rl_hdf5(tmp_path / "bad.hdf5")


    @pytest.mark.parametrize("key", ["observations", "actions", "rewards", "next_observations"])
    @pytest.mark.parametrize("value", [np.nan, np.inf])
    def test_nonfinite_refused_naming_key_and_rows(self, tmp_path, key, value):
        self._write(tmp_path / "d.hdf5", with_next=True)
        with h5py.File(tmp_path / "d.hdf5", "r+") as f:
            data = f[key][()]
            data[[1, 3]] = value
            del f[key]
            f.create_dataset(key, data=data)
        with pytest.raises(ValueError, match=rf"d\.hdf5: dataset '{key}' has non-finite values \(NaN/inf\) in 2 of 6 rows \(first: row 1\)"):
            load_d4rl_hdf5(tmp_path / "d.hdf5")

    def test_empty_and_ragged_refused(self, tmp_path):
        with h5py.File(tmp_path / "e.hdf5", "w") as f:
            for key in ("observations", "actions", "rewards", "terminals"):
                f.create_dataset(key, data=np.zeros((0, 2), np.float32))
        with pytest.raises(ValueError, match=r"e\.hdf5 holds no rows"):
            load_d4rl_hdf5(tmp_path / "e.hdf5")
        self._write(tmp_path / "r.hdf5", with_next=True)
        with h5py.File(tmp_path / "r.hdf5", "r+") as f:
            del f["rewards"]
            f.create_dataset("rewards", data=np.zeros(5, np.float32))
        with pytest.raises(ValueError, match=r"'rewards' in .*r\.hdf5 has shape \[5\], expected 6 rows"):
            load_d4rl_hdf5(tmp_path / "r.hdf5")


class TestNonFiniteEveryKey:
    @pytest.mark.parametrize("key", ["observation", "action", ("next", "observation"), ("next", "reward"), "extra"])
    def test_validate_offline_dataset_names_key(self, key):
        td = transitions(8).set("extra", torch.zeros(8, 2))
        td[key][2] = float("nan")
        with pytest.raises(ValueError, match=rf"non-finite values \(NaN/inf\) in key {re.escape(repr(key))}: 1 of 8 rows \(first: row 2\)"):
            validate_offline_dataset(td)


class TestMovedCollectBehaviourDataset:
    def test_old_name_warns_and_is_the_same_function(self):
        import torchrl_depeff.data as data_pkg
        from torchrl_depeff import collectors

        with pytest.warns(FutureWarning, match="torchrl_depeff.collectors.collect_behaviour_dataset"):
            old = data_pkg.collect_behaviour_dataset
        assert old is collectors.collect_behaviour_dataset
        with pytest.raises(AttributeError, match="no_such_name"):
            data_pkg.no_such_name


class TestMinari:
    def test_missing_minari_raises_clear_import_error(self, monkeypatch, tmp_path):
        monkeypatch.setitem(sys.modules, "minari", None)  # import minari -> ImportError
        with pytest.raises(ImportError, match=r"torchrl_depeff\[minari\]"):
            load_minari("mujoco/halfcheetah/medium-v0", tmp_path)
