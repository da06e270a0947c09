"""Deployment backends: in-process batched env, MultiSync workers, Ray actors; failures and errors.

Each backend must return exactly B rows, all produced by the frozen weights (checked by replaying
the recorded observations through a reference copy), ship the weights once per deployment, and
never hand out a partial deployment when a worker dies.
"""
from __future__ import annotations

import functools
import os

import pytest
import torch
from tensordict import TensorDictBase
from tensordict.nn import NormalParamExtractor, TensorDictModule
from torchrl.collectors import MultiSyncCollector
from torchrl.envs import GymEnv, Transform, TransformedEnv
from torchrl.envs.utils import ExplorationType, set_exploration_type
from torchrl.modules import IndependentNormal, ProbabilisticActor

from torchrl_depeff.collectors.deployment import (
    BACKENDS,
    DeploymentCollectionError,
    collect_deployment,
    freeze_policy,
    policy_hash,
)
from torchrl_depeff.envs.vector import make_vector_env

HERE = os.path.dirname(os.path.abspath(__file__))


def make_actor(obs_dim: int, act_dim: int, seed: int = 0) -> ProbabilisticActor:
    """Stand-in for BREMEN's Gaussian actor (loc, scale, sampled action)."""
    torch.manual_seed(seed)
    net = torch.nn.Sequential(
        torch.nn.Linear(obs_dim, 32), torch.nn.Tanh(), torch.nn.Linear(32, 2 * act_dim), NormalParamExtractor()
    )
    return ProbabilisticActor(
        TensorDictModule(net, ["observation"], ["loc", "scale"]),
        in_keys=["loc", "scale"],
        out_keys=["action"],
        distribution_class=IndependentNormal,
        return_log_prob=True,
    )


def assert_produced_by(reference: torch.nn.Module, data: TensorDictBase, deterministic: bool) -> None:
    """Replays the recorded observations through ``reference``: same mean (and action)."""
    with set_exploration_type(ExplorationType.DETERMINISTIC), torch.no_grad():
        replay = reference(data.select("observation").clone())
    torch.testing.assert_close(replay["loc"], data["loc"])
    torch.testing.assert_close(replay["scale"], data["scale"])
    if deterministic:
        torch.testing.assert_close(replay["action"], data["action"])
    else:  # sampled around the frozen mean
        assert not torch.allclose(data["action"], data["loc"])
        z = (data["action"] - data["loc"]) / data["scale"]
        assert 0.7 < z.std().item() < 1.3


class TrainLearnerEveryStep(Transform):
    """The learner keeps training while the deployment is collected: every env step changes the
    learner's parameters (after ``collect_deployment`` took its frozen copy, unlike a free-running
    thread, which could change them before the copy is taken)."""

    def __init__(self, learner: torch.nn.Module) -> None:
        super().__init__()
        self.learner = [learner]  # not a submodule of the env
        self.steps = 0

    def _step(self, tensordict: TensorDictBase, next_tensordict: TensorDictBase) -> TensorDictBase:
        self.steps += 1
        with torch.no_grad():
            for p in self.learner[0].parameters():
                p.add_(0.01)
        return next_tensordict


class DieAfter(Transform):
    """Makes the env fail after ``n`` steps: ``os._exit`` (a killed worker) or an exception."""

    def __init__(self, n: int, how: str, marker: str | None = None) -> None:
        super().__init__()
        self.n, self.how, self.marker, self.count = n, how, marker, 0

    def _step(self, tensordict: TensorDictBase, next_tensordict: TensorDictBase) -> TensorDictBase:
        self.count += 1
        if self.count >= self.n:
            if self.marker is not None:
                if os.path.exists(self.marker):
                    return next_tensordict  # only the first attempt dies
                open(self.marker, "w").close()
            if self.how == "exit":
                os._exit(3)
            raise RuntimeError("env blew up")
        return next_tensordict


class DyingPendulum:
    """Picklable env factory whose env dies after ``n`` steps (``marker``: only once overall)."""

    def __init__(self, n: int, how: str, marker: str | None = None) -> None:
        self.n, self.how, self.marker = n, how, marker

    def __call__(self) -> TransformedEnv:
        return TransformedEnv(GymEnv("Pendulum-v1"), DieAfter(self.n, self.how, self.marker))


def count_weight_updates(monkeypatch, cls) -> list:
    calls = []
    original = cls.update_policy_weights_

    def counted(self, *args, **kwargs):
        calls.append(1)
        return original(self, *args, **kwargs)

    monkeypatch.setattr(cls, "update_policy_weights_", counted)
    return calls


# ---------------------------------------------------------------------------------------------
# config errors (fast)


def test_unknown_backend_names_it():
    with pytest.raises(ValueError, match="'kubernetes'"):
        collect_deployment(
            make_actor(3, 1), GymEnv("Pendulum-v1"), 5, deployment=0, policy_version=0, collector="kubernetes"
        )
    assert BACKENDS == ("single", "multisync", "ray")
    with pytest.raises(TypeError, match="factory"):
        collect_deployment(
            make_actor(3, 1), GymEnv("Pendulum-v1"), 5, deployment=0, policy_version=0, collector="ray"
        )
    with pytest.raises(ValueError, match="max_retries"):
        collect_deployment(make_actor(3, 1), GymEnv("Pendulum-v1"), 5, deployment=0, policy_version=0, max_retries=-1)


def test_unreachable_ray_address():
    ray = pytest.importorskip("ray")
    if ray.is_initialized():  # pragma: no cover - only if another test left Ray running
        pytest.skip("Ray already initialised in this process")
    factory = functools.partial(GymEnv, "Pendulum-v1")
    with pytest.raises(ConnectionError, match="127.0.0.1:1"):
        collect_deployment(
            make_actor(3, 1), factory, 5, deployment=0, policy_version=0, collector="ray",
            ray_address="127.0.0.1:1",
        )
    with pytest.raises(ValueError, match="ray_address"):
        collect_deployment(
            make_actor(3, 1), factory, 5, deployment=0, policy_version=0, collector="ray",
            ray_address="not-an-address",
        )
    assert not ray.is_initialized()


# ---------------------------------------------------------------------------------------------
# in-process batched env


@pytest.mark.parametrize("deterministic", [True, False])
def test_single_vector_env_exact_b_frozen_weights(deterministic):
    actor = make_actor(17, 6)
    reference = freeze_policy(actor)
    trainer = TrainLearnerEveryStep(actor)
    env = TransformedEnv(make_vector_env("halfcheetah", 4, seed=0), trainer)
    data, info = collect_deployment(
        actor, env, 203, deployment=2, policy_version=5, frames_per_batch=64, seed=0,
        exploration_type=ExplorationType.DETERMINISTIC if deterministic else ExplorationType.RANDOM,
    )
    assert trainer.steps >= 203 // 4  # the learner changed throughout the collection
    assert data.batch_size == (203,) and info["num_transitions"] == 203
    assert data["deployment"].tolist() == [2] * 203 and data["policy_version"].tolist() == [5] * 203
    assert info["policy_hash"] == policy_hash(reference) != policy_hash(actor)
    assert_produced_by(reference, data, deterministic)
    # rows come from the 4 sub-envs (not 4 copies of one)
    assert data["observation"].unique(dim=0).shape[0] == 203


def test_single_env_error_is_raised_no_partial_result():
    with pytest.raises(RuntimeError, match="env blew up"):
        collect_deployment(
            make_actor(3, 1), DyingPendulum(30, "raise")(), 100, deployment=0, policy_version=0,
            frames_per_batch=10,
        )


# ---------------------------------------------------------------------------------------------
# MultiSync worker processes


def test_multisync_exact_b_frozen_weights_shipped_once(monkeypatch):
    calls = count_weight_updates(monkeypatch, MultiSyncCollector)
    actor = make_actor(17, 6, seed=1)
    reference = freeze_policy(actor)
    factory = functools.partial(make_vector_env, "halfcheetah", 2, max_episode_steps=30)
    data, info = collect_deployment(
        actor, factory, 157, deployment=1, policy_version=3, collector="multisync", num_workers=2,
        frames_per_batch=40, exploration_type=ExplorationType.DETERMINISTIC, seed=0,
    )
    assert data.batch_size == (157,) and info["collector"] == "multisync" and info["attempts"] == 1
    assert (data["deployment"] == 1).all() and (data["policy_version"] == 3).all()
    assert_produced_by(reference, data, deterministic=True)
    assert len(calls) == 1  # once, at deployment start
    # the 2 workers ran different envs (differently seeded), not one env twice
    assert data["observation"].unique(dim=0).shape[0] == 157
    assert data["next", "truncated"].any()  # crossed the 30-step limit inside the workers


@pytest.mark.parametrize("how", ["exit", pytest.param("raise", marks=pytest.mark.slow)])
def test_multisync_dead_worker_fails_cleanly(how):
    with pytest.raises(DeploymentCollectionError, match="no partial deployment") as excinfo:
        collect_deployment(
            make_actor(3, 1), DyingPendulum(25, how), 200, deployment=4, policy_version=0,
            collector="multisync", num_workers=2, frames_per_batch=20,
        )
    assert "deployment 4" in str(excinfo.value) and excinfo.value.__cause__ is not None


@pytest.mark.slow  # two collector start-ups (~30 s on 2 cores)
def test_multisync_retry_restarts_whole_deployment(tmp_path):
    marker = str(tmp_path / "died_once")
    actor = make_actor(3, 1)
    data, info = collect_deployment(
        actor, DyingPendulum(25, "exit", marker), 120, deployment=0, policy_version=0,
        collector="multisync", num_workers=2, frames_per_batch=20, max_retries=1,
        exploration_type=ExplorationType.DETERMINISTIC,
    )
    assert os.path.exists(marker) and info["attempts"] == 2
    assert data.batch_size == (120,)
    assert_produced_by(freeze_policy(actor), data, deterministic=True)


# ---------------------------------------------------------------------------------------------
# Ray actors (local instance)


@pytest.fixture(scope="module")
def local_ray():
    ray = pytest.importorskip("ray")
    if not ray.is_initialized():
        # actors import this test module (DyingPendulum) by name: put its folder on their path
        path = os.pathsep.join([HERE, os.environ.get("PYTHONPATH", "")]).rstrip(os.pathsep)
        ray.init(
            num_cpus=2, include_dashboard=False, log_to_driver=False,
            runtime_env={"env_vars": {"PYTHONPATH": path}},
        )
    yield ray
    ray.shutdown()


def test_ray_exact_b_frozen_weights_shipped_once(local_ray, monkeypatch):
    from torchrl.collectors.distributed import RayCollector

    calls = count_weight_updates(monkeypatch, RayCollector)
    factory = functools.partial(make_vector_env, "halfcheetah", 2, max_episode_steps=30)
    actor = make_actor(17, 6, seed=2)
    reference = freeze_policy(actor)
    data, info = collect_deployment(
        actor, factory, 130, deployment=0, policy_version=4, collector="ray", num_workers=2,
        frames_per_batch=40, ray_remote_config={"num_cpus": 1},
        exploration_type=ExplorationType.DETERMINISTIC, seed=0,
    )
    assert data.batch_size == (130,) and info["collector"] == "ray" and info["attempts"] == 1
    assert (data["deployment"] == 0).all() and (data["policy_version"] == 4).all()
    assert info["policy_hash"] == policy_hash(reference)
    assert_produced_by(reference, data, deterministic=True)
    assert len(calls) == 1  # once, at deployment start
    assert local_ray.is_initialized()  # left running for the next deployment


@pytest.mark.slow  # two Ray collector start-ups (~35 s on 2 cores)
def test_ray_next_deployment_uses_new_weights(local_ray):
    factory = functools.partial(make_vector_env, "halfcheetah", 2, max_episode_steps=30)
    actor = make_actor(17, 6, seed=2)
    kwargs = dict(collector="ray", num_workers=2, frames_per_batch=40, ray_remote_config={"num_cpus": 1})
    ref0 = freeze_policy(actor)
    d0, i0 = collect_deployment(
        actor, factory, 60, deployment=0, policy_version=0, exploration_type=ExplorationType.DETERMINISTIC,
        seed=0, **kwargs,
    )
    assert_produced_by(ref0, d0, deterministic=True)
    # the learner trains; the next deployment must use the new weights, not stale actor copies
    with torch.no_grad():
        for p in actor.parameters():
            p.mul_(-1.5).add_(0.1)
    ref1 = freeze_policy(actor)
    d1, i1 = collect_deployment(actor, factory, 50, deployment=1, policy_version=1, seed=1, **kwargs)
    assert d1.batch_size == (50,) and (d1["deployment"] == 1).all()
    assert i1["policy_hash"] == policy_hash(ref1) != i0["policy_hash"]
    assert_produced_by(ref1, d1, deterministic=False)


@pytest.mark.slow  # a third Ray collector start-up
def test_ray_dead_worker_fails_cleanly(local_ray):
    with pytest.raises(DeploymentCollectionError, match="ray"):
        collect_deployment(
            make_actor(3, 1), DyingPendulum(25, "exit"), 200, deployment=7, policy_version=0,
            collector="ray", num_workers=2, frames_per_batch=20, ray_remote_config={"num_cpus": 1},
        )
