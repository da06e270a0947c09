"""Tests for frozen-policy deployment collection (exact size, frozen copy, replayable actions)."""
from __future__ import annotations

import weakref

import pytest
import torch
from tensordict import TensorDictBase
from tensordict.nn import NormalParamExtractor, TensorDictModule, TensorDictModuleBase
from torchrl.envs import EnvCreator, GymEnv
from torchrl.envs.utils import ExplorationType, set_exploration_type
from torchrl.modules import IndependentNormal, ProbabilisticActor

from torchrl_depeff.collectors.deployment import (
    DeploymentCollector,
    collect_deployment,
    freeze_policy,
    policy_hash,
)


def make_actor(obs_dim: int = 3, act_dim: int = 1) -> ProbabilisticActor:
    """Tiny stand-in for BREMEN's Gaussian actor: writes loc, scale, action."""
    net = torch.nn.Sequential(torch.nn.Linear(obs_dim, 2 * act_dim), NormalParamExtractor())
    module = TensorDictModule(net, ["observation"], ["loc", "scale"])
    return ProbabilisticActor(
        module,
        in_keys=["loc", "scale"],
        out_keys=["action"],
        distribution_class=IndependentNormal,
        return_log_prob=True,
    )


class Sabotage(TensorDictModuleBase):
    """Exploration stand-in that "trains" the learner at every step (concurrent learner updates)."""

    def __init__(self, learner: torch.nn.Module) -> None:
        super().__init__()
        self.in_keys, self.out_keys = ["action"], ["action"]
        self._learner = weakref.ref(learner)  # deepcopy keeps weakrefs: points at the real learner

    def forward(self, td: TensorDictBase) -> TensorDictBase:
        with torch.no_grad():
            for p in self._learner().parameters():
                p.add_(0.5)
        return td


class AddNoise(TensorDictModuleBase):
    def __init__(self, sigma: float) -> None:
        super().__init__()
        self.sigma = sigma
        self.in_keys, self.out_keys = ["action"], ["action"]

    def forward(self, td: TensorDictBase) -> TensorDictBase:
        td["action"] = td["action"] + self.sigma * torch.randn_like(td["action"])
        return td


class TestFreezeAndHash:
    def test_freeze(self):
        actor = make_actor()
        frozen = freeze_policy(actor)
        assert not any(p.requires_grad for p in frozen.parameters())
        assert all(p.requires_grad for p in actor.parameters()) and actor.training
        assert not frozen.training
        for a, b in zip(actor.parameters(), frozen.parameters()):
            assert a.data_ptr() != b.data_ptr() and torch.equal(a, b)

    def test_hash_stable_and_sensitive(self):
        actor = make_actor()
        h = policy_hash(actor)
        assert h == policy_hash(freeze_policy(actor)) == policy_hash(actor)
        with torch.no_grad():
            next(actor.parameters())[0, 0] += 1e-6
        assert policy_hash(actor) != h
        with pytest.raises(TypeError, match="nn.Module"):
            policy_hash(lambda td: td)


class TestCollectDeployment:
    @pytest.mark.parametrize("num,fpb", [(37, 10), (20, None), (5, 64)])
    def test_exactly_b(self, num, fpb):
        data, info = collect_deployment(
            make_actor(), GymEnv("Pendulum-v1"), num, deployment=3, policy_version=7,
            frames_per_batch=fpb, seed=0,
        )
        assert data.batch_size == (num,) and info["num_transitions"] == num
        assert data["deployment"].dtype == torch.int64
        assert data["deployment"].tolist() == [3] * num
        assert data["policy_version"].tolist() == [7] * num
        for key in ["observation", "action", ("next", "observation"), ("next", "reward"), ("next", "done")]:
            assert key in data.keys(True)

    def test_exactly_b_batched_env(self):
        env = GymEnv("Pendulum-v1", num_envs=3)
        assert env.batch_size == (3,)
        data, _ = collect_deployment(
            make_actor(), env, 37, deployment=0, policy_version=0, frames_per_batch=10, seed=0
        )
        assert data.batch_size == (37,) and data["observation"].shape == (37, 3)
        assert data["deployment"].shape == (37,)

    def test_frozen_copy_and_replay_reproduces_actions(self):
        actor = make_actor()
        reference = freeze_policy(actor)
        h0 = policy_hash(actor)
        data, info = collect_deployment(
            actor, GymEnv("Pendulum-v1"), 30, exploration=Sabotage(actor), deployment=0,
            policy_version=0, frames_per_batch=10, exploration_type=ExplorationType.DETERMINISTIC,
            seed=1,
        )
        # the learner was modified 30 times during collection...
        assert policy_hash(actor) != h0
        # ...but the deployed copy was not: the recorded hash is the pre-collection one and the
        # recorded actions are exactly the original policy's deterministic actions.
        assert info["policy_hash"] == h0
        with set_exploration_type(ExplorationType.DETERMINISTIC), torch.no_grad():
            replay = reference(data.select("observation").clone())
        torch.testing.assert_close(replay["action"], data["action"])
        torch.testing.assert_close(data["loc"], data["action"])
        with set_exploration_type(ExplorationType.DETERMINISTIC), torch.no_grad():
            modified = actor(data.select("observation").clone())
        assert not torch.allclose(modified["action"], data["action"])

    def test_seeded_exploration_reproducible_and_noise_scale(self):
        actor = make_actor()
        kwargs = dict(
            exploration=AddNoise(0.1), deployment=0, policy_version=0, frames_per_batch=100,
            exploration_type=ExplorationType.DETERMINISTIC,
        )
        a, _ = collect_deployment(actor, GymEnv("Pendulum-v1"), 200, seed=5, **kwargs)
        b, _ = collect_deployment(actor, GymEnv("Pendulum-v1"), 200, seed=5, **kwargs)
        torch.testing.assert_close(a["action"], b["action"])
        torch.testing.assert_close(a["observation"], b["observation"])
        noise = a["action"] - a["loc"]
        assert 0.08 < noise.std().item() < 0.12 and abs(noise.mean().item()) < 0.03
        # caller RNG untouched by the seeded collection
        torch.manual_seed(123)
        x = torch.rand(3)
        torch.manual_seed(123)
        collect_deployment(actor, GymEnv("Pendulum-v1"), 10, seed=5, **kwargs)
        torch.testing.assert_close(torch.rand(3), x)

    def test_bad_args(self):
        with pytest.raises(ValueError, match="num_transitions"):
            collect_deployment(make_actor(), GymEnv("Pendulum-v1"), 0, deployment=0, policy_version=0)
        with pytest.raises(ValueError, match="bogus"):
            collect_deployment(
                make_actor(), GymEnv("Pendulum-v1"), 4, deployment=0, policy_version=0, collector="bogus"
            )
        with pytest.raises(TypeError, match="factory"):
            collect_deployment(
                make_actor(), GymEnv("Pendulum-v1"), 4, deployment=0, policy_version=0,
                collector="multisync",
            )

    @pytest.mark.slow  # spawns 2 worker processes (~14 s on 2 cores)
    def test_multisync_exactly_b(self):
        data, info = collect_deployment(
            make_actor(), EnvCreator(lambda: GymEnv("Pendulum-v1")), 45, deployment=1,
            policy_version=2, collector="multisync", num_workers=2, frames_per_batch=20, seed=0,
        )
        assert data.batch_size == (45,) and info["collector"] == "multisync"
        assert (data["deployment"] == 1).all() and (data["policy_version"] == 2).all()


class TestDeploymentCollector:
    def test_deploy_is_the_only_refresh(self):
        actor = make_actor()
        dc = DeploymentCollector(
            actor, GymEnv("Pendulum-v1"), frames_per_batch=10,
            exploration_type=ExplorationType.DETERMINISTIC,
        )
        h0 = dc.policy_hash
        d0, i0 = dc.collect(10, seed=0)
        with torch.no_grad():
            for p in actor.parameters():
                p.mul_(-2.0).add_(0.3)
        assert dc.policy_hash == h0  # training the learner did not touch the deployed copy
        d1, i1 = dc.collect(10, seed=0)
        torch.testing.assert_close(d0["action"], d1["action"])
        assert i1["policy_hash"] == h0 and d1["deployment"].unique().tolist() == [1]
        h1 = dc.deploy(actor)
        assert h1 == policy_hash(actor) != h0 and dc.policy_version == 1
        d2, i2 = dc.collect(10, seed=0)
        assert i2["policy_hash"] == h1 and d2["policy_version"].unique().tolist() == [1]
        assert not torch.allclose(d2["action"], d0["action"])
        with pytest.raises(KeyError):
            dc.deploy(torch.nn.Linear(3, 1))


class ConstantAction(TensorDictModuleBase):
    """A policy writing a constant action (NaN or far out of bounds) after a real observation."""

    def __init__(self, value: float, act_dim: int = 1, at_step: int = 0) -> None:
        super().__init__()
        self.value, self.act_dim, self.at_step, self.calls = value, act_dim, at_step, 0
        self.in_keys, self.out_keys = ["observation"], ["action"]

    def forward(self, td: TensorDictBase) -> TensorDictBase:
        obs = td["observation"]
        value = self.value if self.calls >= self.at_step else 0.0
        self.calls += 1
        td["action"] = torch.full((*obs.shape[:-1], self.act_dim), value)
        return td


class TestDataChecks:
    """Non-finite or far out-of-range values never become a deployment (issue 16)."""

    @pytest.mark.parametrize("value", [float("nan"), float("inf"), -float("inf")])
    def test_nonfinite_policy_refused(self, value):
        env = GymEnv("Pendulum-v1")  # a plain GymEnv: nothing refuses NaN before the data check
        with pytest.raises(ValueError, match=r"deployment 4: \d+ non-finite value\(s\) in key 'action'"):
            collect_deployment(ConstantAction(value, at_step=3), env, 20, deployment=4, policy_version=0,
                               frames_per_batch=10)

    def test_far_out_of_bounds_refused(self):
        from torchrl_depeff.envs.vector import make_vector_env

        env = make_vector_env("hopper", 2, seed=0)
        with pytest.raises(ValueError, match=r"deployment 2: 30 action value\(s\) outside the env's bounds \[-1, 1\].*first: 10\.0"):
            collect_deployment(ConstantAction(10.0, act_dim=3), env, 10, deployment=2, policy_version=0)
        data, _ = collect_deployment(ConstantAction(10.0, act_dim=3), env, 10, deployment=2, policy_version=0,
                                     action_tolerance=None)  # the check can be switched off
        assert (data["action"] == 10.0).all()

    def test_nan_policy_refused_by_the_task_env(self):
        from torchrl_depeff.envs.tasks import make_env

        with pytest.raises(ValueError, match=r"task 'hopper': refusing to step the real env with 3 non-finite"):
            collect_deployment(ConstantAction(float("nan"), act_dim=3), make_env("hopper"), 10, deployment=0,
                               policy_version=0)

    def test_bremen_noise_is_collected(self):
        """tanh(mu) + N(0, 0.1^2) leaves [-1, 1] slightly: within the tolerance."""
        from torchrl_depeff.envs.vector import make_vector_env

        env = make_vector_env("hopper", 4, seed=0)
        data, _ = collect_deployment(ConstantAction(1.0, act_dim=3), env, 400, deployment=0, policy_version=0,
                                     exploration=AddNoise(0.1), seed=0)
        assert data["action"].max() > 1.0  # the noise did leave the bounds, and it was kept
        assert data.batch_size == (400,)

    def test_explicit_bounds_and_bad_tolerance(self):
        env = GymEnv("Pendulum-v1")
        with pytest.raises(ValueError, match=r"bounds \[-0\.5, 0\.5\]"):
            collect_deployment(ConstantAction(5.0), env, 10, deployment=0, policy_version=0, frames_per_batch=10,
                               bounds=(torch.tensor([-0.5]), torch.tensor([0.5])))
        for bad in (-1.0, float("nan")):
            with pytest.raises(ValueError, match="action_tolerance"):
                collect_deployment(ConstantAction(0.0), env, 10, deployment=0, policy_version=0,
                                   action_tolerance=bad)

    def test_action_bounds(self):
        from torchrl_depeff.collectors.deployment import action_bounds
        from torchrl_depeff.envs.vector import make_vector_env

        low, high = action_bounds(make_vector_env("hopper", 3))
        assert low.tolist() == [-1.0] * 3 and high.tolist() == [1.0] * 3
        assert action_bounds(lambda: GymEnv("Pendulum-v1")) is None  # a factory is not built
