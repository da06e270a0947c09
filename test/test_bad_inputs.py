"""Bad inputs to the storage, data, collection and real-env API: each gets a clear error naming it.

Part of issue 16's catalogue (the algorithms and CLIs are in
``test/algorithms/test_bad_inputs_algorithms.py``). Each case asserts the exception type and that
the message names the bad value or path; the storage cases also check that nothing on disk
changed (hash of every file before and after).
"""
from __future__ import annotations

import functools
import hashlib
import json
import re
from pathlib import Path

import h5py
import numpy as np
import pytest
import torch
from tensordict import TensorDict
from tensordict.nn import TensorDictModule, TensorDictModuleBase
from torchrl.data import Bounded, RandomSampler, Unbounded
from torchrl.envs import GymEnv

from torchrl_depeff.collectors import collect_behaviour_dataset, collect_deployment
from torchrl_depeff.data import (
    ClippedGaussianAction,
    DamagedDeploymentError,
    DeploymentReplayBuffers,
    EpsilonUniformAction,
    UniformRandomAction,
    load_behaviour_dataset,
    load_d4rl_hdf5,
    save_behaviour_dataset,
    validate_offline_dataset,
)
from torchrl_depeff.data.episodes import episode_index, trajectory_windows
from torchrl_depeff.envs.tasks import get_task, make_env
from torchrl_depeff.envs.vector import make_vector_env
from torchrl_depeff.io import (
    atomic_save,
    atomic_write_text,
    CheckpointError,
    load_checkpoint,
    write_json_atomic,
)


def digest(root: Path) -> dict[str, str]:
    root = Path(root)
    files = [root] if root.is_file() else sorted(p for p in root.rglob("*") if p.is_file())
    return {str(p): hashlib.sha256(p.read_bytes()).hexdigest() for p in files}


def transitions(n: int = 8, obs_dim: int = 3, act_dim: int = 2) -> TensorDict:
    return TensorDict(
        {
            "observation": torch.randn(n, obs_dim),
            "action": torch.rand(n, act_dim) * 2 - 1,
            "next": {
                "observation": torch.randn(n, obs_dim),
                "reward": torch.randn(n, 1),
                "done": torch.zeros(n, 1, dtype=torch.bool),
            },
        },
        batch_size=[n],
    )


@pytest.fixture
def run(tmp_path):
    """A deployments root holding two committed deployments."""
    root = tmp_path / "deployments"
    bufs = DeploymentReplayBuffers(root)
    bufs.add_deployment(transitions(10), policy_version=0)
    bufs.add_deployment(transitions(6), policy_version=1)
    return root


# ============================================================================ io
class TestIO:
    def test_missing_checkpoint(self, tmp_path):
        with pytest.raises(FileNotFoundError, match=re.escape(str(tmp_path / "nope.pt"))):
            load_checkpoint(tmp_path / "nope.pt")

    @pytest.mark.parametrize(
        "content, size",
        [(b"", "0 bytes"), (b"PK\x03\x04 truncated zip", "18 bytes"), (b"not a checkpoint at all", "23 bytes")],
        ids=["zero_bytes", "truncated_zip", "garbage"],
    )
    def test_damaged_checkpoint(self, tmp_path, content, size):
        path = tmp_path / "checkpoint.pt"
        path.write_bytes(content)
        before = digest(tmp_path)
        with pytest.raises(CheckpointError, match=rf"{re.escape(str(path))} \({size}\) is damaged.*remove it"):
            load_checkpoint(path)
        assert digest(tmp_path) == before

    def test_save_onto_a_directory(self, tmp_path):
        (tmp_path / "ckpt").mkdir()
        with pytest.raises(IsADirectoryError, match=re.escape(str(tmp_path / "ckpt"))):
            atomic_save({"a": 1}, tmp_path / "ckpt")

    def test_text_must_be_str(self, tmp_path):
        with pytest.raises(TypeError, match="got bytes"):
            atomic_write_text(b"abc", tmp_path / "t.txt")
        assert not (tmp_path / "t.txt").exists()

    def test_unserialisable_json_leaves_file(self, tmp_path):
        path = write_json_atomic({"ok": 1}, tmp_path / "m.json")
        before = digest(tmp_path)
        with pytest.raises(TypeError, match="set"):
            write_json_atomic({"bad": {1, 2}}, path)
        assert digest(tmp_path) == before


# ============================================================================ deployment storage
class TestDeploymentStorage:
    @pytest.mark.parametrize(
        "kwargs, error, match",
        [
            ({"batch_size": 0}, ValueError, "batch_size must be >= 1, got 0"),
            ({"batch_size": "8"}, TypeError, "batch_size must be an int, got '8'"),
            ({"on_damaged": "ignore"}, ValueError, "on_damaged must be 'raise' or 'skip', got 'ignore'"),
            ({"sampler": RandomSampler()}, TypeError, "sampler must be a Sampler class"),
        ],
        ids=["batch_size_0", "batch_size_str", "on_damaged", "sampler_instance"],
    )
    def test_constructor(self, run, kwargs, error, match):
        before = digest(run)
        with pytest.raises(error, match=match):
            DeploymentReplayBuffers(run, **kwargs)
        assert digest(run) == before

    def test_root_is_a_file(self, tmp_path):
        path = tmp_path / "deployments"
        path.write_text("x")
        with pytest.raises(NotADirectoryError, match=re.escape(str(path))):
            DeploymentReplayBuffers(path)
        assert path.read_text() == "x"

    @pytest.mark.parametrize(
        "make, kwargs, error, match",
        [
            (lambda: transitions(0), {}, ValueError, r"data is empty \(batch_size=\(0,\)\)"),
            (lambda: transitions().exclude("action"), {}, KeyError, r"required key \W+action\W+ missing"),
            (lambda: transitions().exclude(("next", "done")), {}, KeyError, r"required key \(\W+next\W+ \W+done\W+\) missing"),
            (lambda: transitions().set(("next", "reward"), torch.full((8, 1), float("nan"))), {}, ValueError, r"key \('next', 'reward'\): 8 of 8 rows"),
            (lambda: transitions(obs_dim=4), {}, ValueError, r"key 'observation': shape \[4\]"),
            (lambda: transitions().set("extra", torch.zeros(8)), {}, ValueError, r"keys not in the run's deployments: \['extra'\]"),
            (lambda: transitions().apply(lambda x: x.double() if x.is_floating_point() else x), {}, ValueError, "dtype float64"),
            (lambda: {"observation": torch.zeros(3)}, {}, TypeError, "got dict"),
            (transitions, {"policy_version": "1"}, TypeError, "policy_version must be an int, got '1'"),
            (transitions, {"metadata": ["a"]}, TypeError, "metadata must be a dict or None, got list"),
            (transitions, {"metadata": {"when": object()}}, TypeError, "object"),
        ],
        ids=["empty", "no_action", "no_done", "nan_reward", "obs_shape", "extra_key", "float64", "not_td",
             "policy_version_str", "metadata_list", "metadata_unserialisable"],
    )
    def test_add_deployment_refused_and_disk_unchanged(self, run, make, kwargs, error, match):
        bufs = DeploymentReplayBuffers(run)
        before = digest(run)
        with pytest.raises(error, match=match):
            bufs.add_deployment(make(), **{"policy_version": 2, **kwargs})
        assert digest(run) == before and bufs.num_deployments == 2

    @pytest.mark.parametrize(
        "call, error, match",
        [
            (lambda b: b.sample(which="nope"), ValueError, "which must be 'all' or 'latest', got 'nope'"),
            (lambda b: b.sample(0), ValueError, "batch_size must be >= 1, got 0"),
            (lambda b: b.metadata(5), IndexError, r"deployment 5 out of range \(2 stored\)"),
            (lambda b: b.buffer("0"), TypeError, "deployment index must be an int, got '0'"),
            (lambda b: b.as_tensordict("first"), ValueError, "got 'first'"),
        ],
        ids=["which", "sample_0", "metadata_index", "buffer_str", "as_tensordict"],
    )
    def test_reading(self, run, call, error, match):
        bufs = DeploymentReplayBuffers(run)
        before = digest(run)
        with pytest.raises(error, match=match):
            call(bufs)
        assert digest(run) == before

    def test_damaged_deployment_named(self, run):
        column = run / "deployment_0001" / "storage" / "next" / "reward.memmap"
        column.write_bytes(column.read_bytes()[:-4])
        before = digest(run)
        with pytest.raises(DamagedDeploymentError, match=r"deployment_0001: storage/next/reward\.memmap: size 20 bytes, 24 recorded"):
            DeploymentReplayBuffers(run)
        assert digest(run) == before

    def test_not_contiguous(self, run):
        (run / "deployment_0001").rename(run / "deployment_0003")
        before = digest(run)
        with pytest.raises(ValueError, match=r"not contiguous from 0: \[0, 3\]"):
            DeploymentReplayBuffers(run)
        assert digest(run) == before

    def test_unreadable_metadata(self, run):
        (run / "deployment_0000" / "metadata.json").write_text("{not json")
        before = digest(run)
        with pytest.raises(DamagedDeploymentError, match=r"deployment_0000: metadata\.json: unreadable \(9 bytes"):
            DeploymentReplayBuffers(run)
        assert digest(run) == before


# ============================================================================ datasets
class TestDatasets:
    @pytest.mark.parametrize(
        "mutate, error, match",
        [
            (lambda td: td.set(("next", "observation"), torch.zeros(8, 4)), ValueError,
             r"\('next', 'observation'\) has shape \[8, 4\], expected \[8, 3\]"),
            (lambda td: td.set(("next", "done"), torch.zeros(8, 1)), ValueError, r"\('next', 'done'\) must be bool, got torch\.float32"),
            (lambda td: td.set(("next", "reward"), torch.zeros(8, 2)), ValueError, r"\('next', 'reward'\) must have shape \[8, 1\], got \[8, 2\]"),
            (lambda td: td.set("observation", torch.full((8, 3), float("inf"))), ValueError, r"in key 'observation': 8 of 8 rows"),
            (lambda td: td.reshape(2, 4), ValueError, r"1-D batch \[N\], got \[2, 4\]"),
        ],
        ids=["next_obs_shape", "done_dtype", "reward_shape", "inf_obs", "2d_batch"],
    )
    def test_validate_offline_dataset(self, mutate, error, match):
        with pytest.raises(error, match=match):
            validate_offline_dataset(mutate(transitions()))

    def test_save_onto_existing_path(self, tmp_path):
        path = save_behaviour_dataset(transitions(), tmp_path / "ds")
        before = digest(tmp_path)
        with pytest.raises(FileExistsError, match=re.escape(str(path))):
            save_behaviour_dataset(transitions(), path)
        assert digest(tmp_path) == before

    def test_save_nan_dataset_writes_nothing(self, tmp_path):
        td = transitions()
        td["action"][3, 1] = float("nan")
        with pytest.raises(ValueError, match=r"key 'action': 1 of 8 rows \(first: row 3\)"):
            save_behaviour_dataset(td, tmp_path / "ds")
        assert list(tmp_path.iterdir()) == []

    def test_load_missing_dataset(self, tmp_path):
        with pytest.raises(FileNotFoundError, match=re.escape(str(tmp_path / "ds"))):
            load_behaviour_dataset(tmp_path / "ds")

    def test_d4rl_missing_file(self, tmp_path):
        with pytest.raises(FileNotFoundError, match=re.escape(str(tmp_path / "d.hdf5"))):
            load_d4rl_hdf5(tmp_path / "d.hdf5")

    def _d4rl(self, path, **override):
        n = 5
        arrays = {
            "observations": np.zeros((n, 3), np.float32), "actions": np.zeros((n, 2), np.float32),
            "rewards": np.ones(n, np.float32), "terminals": np.zeros(n, bool), "timeouts": np.zeros(n, bool),
        }
        arrays.update(override)
        with h5py.File(path, "w") as f:
            for key, value in arrays.items():
                if value is not None:
                    f.create_dataset(key, data=value)
        return path

    def test_d4rl_nan_observations(self, tmp_path):
        obs = np.zeros((5, 3), np.float32)
        obs[2:4, 1] = np.nan
        path = self._d4rl(tmp_path / "d.hdf5", observations=obs)
        before = digest(path)
        with pytest.raises(ValueError, match=r"d\.hdf5: dataset 'observations' has non-finite values \(NaN/inf\) in 2 of 5 rows \(first: row 2\)"):
            load_d4rl_hdf5(path)
        assert digest(path) == before

    def test_d4rl_missing_key(self, tmp_path):
        path = self._d4rl(tmp_path / "d.hdf5", actions=None)
        with pytest.raises(KeyError, match=r"lacks the dataset 'actions'"):
            load_d4rl_hdf5(path)

    def test_d4rl_ragged(self, tmp_path):
        path = self._d4rl(tmp_path / "d.hdf5", rewards=np.ones(4, np.float32))
        with pytest.raises(ValueError, match=r"'rewards' .* has shape \[4\], expected 5 rows"):
            load_d4rl_hdf5(path)

    @pytest.mark.parametrize(
        "build, error, match",
        [
            (lambda: EpsilonUniformAction(1.5, Bounded(-1.0, 1.0, shape=(2,))), ValueError, r"epsilon must be in \[0, 1\], got 1\.5"),
            (lambda: ClippedGaussianAction(-0.1, Bounded(-1.0, 1.0, shape=(2,))), ValueError, "sigma must be >= 0, got -0.1"),
            (lambda: UniformRandomAction(Unbounded(shape=(2,)))(TensorDict(batch_size=[3])), TypeError, "action_spec must be bounded"),
        ],
        ids=["epsilon", "sigma", "unbounded_spec"],
    )
    def test_noise_modules(self, build, error, match):
        with pytest.raises(error, match=match):
            build()


# ============================================================================ episodes
class TestEpisodes:
    def test_no_keys_to_segment(self):
        with pytest.raises(KeyError, match=r"neither \('collector', 'traj_ids'\) nor \('next', 'done'\)"):
            episode_index(TensorDict({"observation": torch.zeros(3, 1)}, [3]))

    @pytest.mark.parametrize("horizon", [0, 2.5])
    def test_bad_horizon(self, horizon):
        with pytest.raises(ValueError, match=f"horizon must be an int >= 1, got {horizon}"):
            trajectory_windows(transitions(), horizon, 4)


# ============================================================================ collection
class ConstantAction(TensorDictModuleBase):
    def __init__(self, value: float, act_dim: int = 1) -> None:
        super().__init__()
        self.value, self.act_dim = value, act_dim
        self.in_keys, self.out_keys = ["observation"], ["action"]

    def forward(self, td):
        td["action"] = torch.full((*td["observation"].shape[:-1], self.act_dim), self.value)
        return td


def _linear_policy():
    return TensorDictModule(torch.nn.Linear(3, 1), ["observation"], ["action"])


class TestCollection:
    @pytest.mark.parametrize(
        "kwargs, error, match",
        [
            ({"num_transitions": 0}, ValueError, "num_transitions must be >= 1, got 0"),
            ({"collector": "spark"}, ValueError, "collector must be one of .*got 'spark'"),
            ({"num_workers": 0}, ValueError, "num_workers must be >= 1, got 0"),
            ({"max_retries": -1}, ValueError, "max_retries must be >= 0, got -1"),
            ({"action_tolerance": -0.5}, ValueError, "action_tolerance must be >= 0 or None, got -0.5"),
            ({"exploration": torch.nn.Identity()}, TypeError, "exploration must be a TensorDictModuleBase, got Identity"),
            ({"collector": "multisync"}, TypeError, "picklable zero-argument env factory.*got GymEnv"),
        ],
        ids=["num_transitions", "collector", "num_workers", "max_retries", "tolerance", "exploration", "multisync_instance"],
    )
    def test_arguments(self, kwargs, error, match):
        args = {"num_transitions": 10, "deployment": 0, "policy_version": 0, **kwargs}
        n = args.pop("num_transitions")
        with pytest.raises(error, match=match):
            collect_deployment(_linear_policy(), GymEnv("Pendulum-v1"), n, **args)

    def test_nan_policy_not_collected(self):
        with pytest.raises(ValueError, match=r"deployment 7: 10 non-finite value\(s\) in key 'action' \(first: nan in row 0\)"):
            collect_deployment(ConstantAction(float("nan")), GymEnv("Pendulum-v1"), 10, deployment=7,
                               policy_version=0, frames_per_batch=10)

    def test_out_of_bounds_policy_not_collected(self):
        with pytest.raises(ValueError, match=r"deployment 1: 20 action value\(s\) outside the env's bounds \[-2, 2\].*first: 50\.0"):
            collect_deployment(ConstantAction(50.0), GymEnv("Pendulum-v1"), 20, deployment=1, policy_version=0,
                               frames_per_batch=10)

    def test_nan_policy_into_deployment_buffers_nothing_stored(self, run):
        """The whole path: a diverged policy's deployment never reaches the disk."""
        before = digest(run)
        with pytest.raises(ValueError, match="non-finite"):
            data, info = collect_deployment(ConstantAction(float("nan")), GymEnv("Pendulum-v1"), 10, deployment=2,
                                            policy_version=2, frames_per_batch=10)
            DeploymentReplayBuffers(run).add_deployment(data, policy_version=2, metadata=info)
        assert digest(run) == before

    @pytest.mark.parametrize(
        "kwargs, error, match",
        [
            ({"noise": "eps2"}, ValueError, "noise must be one of .*got 'eps2'"),
            ({"num_transitions": 0}, ValueError, "num_transitions must be >= 1, got 0"),
            ({"env": functools.partial(GymEnv, "Pendulum-v1")}, TypeError, "env must be a torchrl EnvBase, got partial"),
        ],
        ids=["noise", "size", "env_factory"],
    )
    def test_behaviour_dataset(self, kwargs, error, match):
        args = {"env": GymEnv("Pendulum-v1"), "num_transitions": 10, **kwargs}
        with pytest.raises(error, match=match):
            collect_behaviour_dataset(_linear_policy(), args.pop("env"), args.pop("num_transitions"), **args)

    def test_behaviour_dataset_onto_existing_path(self, tmp_path):
        path = save_behaviour_dataset(transitions(), tmp_path / "ds")
        before = digest(tmp_path)
        with pytest.raises(FileExistsError, match=re.escape(str(path))):
            collect_behaviour_dataset(_linear_policy(), GymEnv("Pendulum-v1"), 5, noise="random", path=path)
        assert digest(tmp_path) == before


# ============================================================================ real envs
class TestRealEnvs:
    @pytest.mark.parametrize("name", ["hoppr", "HalfCheetah-v5", ""])
    def test_unknown_task(self, name):
        with pytest.raises(ValueError, match=f"unknown task {name!r}"):
            get_task(name)
        with pytest.raises(ValueError, match=f"unknown task {name!r}"):
            make_env(name)

    def test_nan_action_in_make_env(self):
        env = make_env("hopper")
        td = env.reset()
        td["action"] = torch.tensor([float("nan"), 0.0, 0.0])
        with pytest.raises(ValueError, match=r"task 'hopper': refusing to step the real env with 1 non-finite action value\(s\) \(first: nan at index \[0\]\)"):
            env.step(td)

    @pytest.mark.parametrize("backend", ["native", "gym_wrapper"])
    def test_inf_action_in_vector_env(self, backend):
        env = make_vector_env("hopper", 2, backend=backend)
        td = env.reset()
        td["action"] = torch.zeros(2, 3)
        td["action"][1, 0] = float("inf")
        with pytest.raises(ValueError, match=r"task 'hopper'.*first: inf at index \[1, 0\]"):
            env.step(td)

    @pytest.mark.parametrize(
        "kwargs, match",
        [
            ({"num_envs": 0}, "num_envs must be an int >= 1, got 0"),
            ({"num_envs": True}, "num_envs must be an int >= 1, got True"),
            ({"num_envs": 2.0}, r"num_envs must be an int >= 1, got 2\.0"),
            ({"autoreset_mode": "next_step"}, "autoreset_mode must be one of .*got 'next_step'"),
            ({"backend": "async"}, "backend must be one of .*got 'async'"),
            ({"max_episode_steps": 0}, "max_episode_steps must be >= 1, got 0"),
            ({"task_name": "hoppr"}, "unknown task 'hoppr'"),
        ],
        ids=["num_envs_0", "num_envs_bool", "num_envs_float", "autoreset", "backend", "max_steps", "task"],
    )
    def test_make_vector_env(self, kwargs, match):
        args = {"task_name": "hopper", "num_envs": 2, **kwargs}
        with pytest.raises(ValueError, match=match):
            make_vector_env(args.pop("task_name"), args.pop("num_envs"), **args)
