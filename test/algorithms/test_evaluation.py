"""RealEnvEvaluation: batched episodes give the returns and lengths of sequential ones."""
from __future__ import annotations

import functools

import pytest
import torch
from tensordict.nn import TensorDictModule

from torchrl_depeff.algorithms.components import RealEnvEvaluation
from torchrl_depeff.envs import make_env, make_vector_env
from torchrl_depeff.envs.tasks import get_task
from torchrl_depeff.modules.actors import make_gaussian_actor


def _evaluators(task: str, episodes: int, max_steps: int, **kwargs):
    sequential = RealEnvEvaluation(lambda: make_env(task), episodes=episodes, max_steps=max_steps, seed=3, **kwargs)
    batched = RealEnvEvaluation(lambda: make_env(task), episodes=episodes, max_steps=max_steps, seed=3,
                                make_batched_env=functools.partial(make_vector_env, task), **kwargs)
    return sequential, batched


class _Elementwise(torch.nn.Module):
    # a policy whose batched output equals its row-by-row output bit for bit (no matmul)
    def __init__(self, act_dim: int) -> None:
        super().__init__()
        self.act_dim = act_dim

    def forward(self, observation: torch.Tensor) -> torch.Tensor:
        return torch.tanh(3.0 * observation[..., : self.act_dim] - 0.5)


class TestBatchedEvaluation:
    @pytest.mark.parametrize("task,max_steps", [("halfcheetah", 200), ("hopper", 1000)])
    def test_exact_for_a_rowwise_policy(self, task, max_steps):
        # seeding, stepping, the first-done cut and the sums equal the sequential episodes exactly
        spec = get_task(task)
        policy = TensorDictModule(_Elementwise(spec.action_dim), in_keys=["observation"], out_keys=["action"])
        sequential, batched = _evaluators(task, 3, max_steps)
        r_seq, l_seq = sequential.returns(policy)
        r_bat, l_bat = batched.returns(policy)
        assert torch.equal(r_seq, r_bat) and torch.equal(l_seq, l_bat)
        assert len(set(r_seq.tolist())) == 3  # each copy its own seed
        if task == "hopper":
            # terminations at different steps before the cap: each return stops at its first done
            assert (l_seq < max_steps).all() and len(set(l_seq.tolist())) > 1
        else:
            assert (l_seq == max_steps).all()
        assert torch.equal(batched.returns(policy)[0], r_bat)  # a second call repeats them

    def test_mlp_policy_differs_only_by_rounding(self):
        # a matmul over 3 rows rounds differently from one row: short episodes stay close
        torch.manual_seed(0)
        actor = make_gaussian_actor(17, 6, num_cells=(16,))
        sequential, batched = _evaluators("halfcheetah", 3, 30)
        r_seq, l_seq = sequential.returns(actor)
        r_bat, l_bat = batched.returns(actor)
        torch.testing.assert_close(r_bat, r_seq, rtol=1e-3, atol=1e-2)
        assert torch.equal(l_seq, l_bat)

    def test_wrong_batch_size_is_refused(self):
        ev = RealEnvEvaluation(lambda: make_env("hopper"), episodes=3, max_steps=10, seed=0,
                               make_batched_env=lambda n: make_vector_env("hopper", n + 1))
        actor = make_gaussian_actor(11, 3, num_cells=(8,))
        with pytest.raises(ValueError, match=r"batch size \[4\], expected \[3\]"):
            ev.returns(actor)


class TestBatchedEvaluationConfig:
    """``evaluation.batched``: the BREMEN-family loops evaluate in one batched env when asked."""

    def test_loop_uses_the_batched_env(self, tmp_path):
        from torchrl_depeff.algorithms.bremen import BREMEN, BREMENConfig

        cfg = BREMENConfig.tiny().override({"evaluation.episodes": 2, "evaluation.max_steps": 30})
        plain = BREMEN(cfg, data_root=tmp_path / "plain")
        batched = BREMEN(cfg.override({"evaluation.batched": True}), data_root=tmp_path / "batched")
        assert plain.evaluator._make_batched_env is None
        assert batched.evaluator._make_batched_env is not None
        r_plain, l_plain = plain.evaluator.returns(plain.actor)
        r_bat, l_bat = batched.evaluator.returns(batched.actor)  # the same seeded initial policy
        assert batched.evaluator._batched_env is not None and tuple(batched.evaluator._batched_env.batch_size) == (2,)
        assert batched.evaluator._env is None  # the one-episode env was never built
        torch.testing.assert_close(r_bat, r_plain, rtol=1e-3, atol=1e-2)
        assert torch.equal(l_bat, l_plain)

    def test_refused_where_it_cannot_apply(self, tmp_path):
        from torchrl_depeff.algorithms.bremen import BREMEN, BREMENConfig
        from torchrl_depeff.algorithms.mb2po import MB2POConfig

        with pytest.raises(ValueError, match="evaluation.batched"):
            BREMENConfig.tiny().override({"evaluation.batched": "yes"})
        with pytest.raises(ValueError, match="evaluation.batched=True is not supported by MB2PO"):
            MB2POConfig().override({"evaluation.batched": True})
        cfg = BREMENConfig.tiny().override({"evaluation.batched": True})
        with pytest.raises(ValueError, match="cannot use the eval_env given"):
            BREMEN(cfg, data_root=tmp_path, eval_env=make_env("halfcheetah"))


def _hooked(actor):
    """A copy of ``actor`` with a no-op forward hook: the plain-tensor call does not apply (``env.rollout`` runs)."""
    import copy

    actor = copy.deepcopy(actor)
    actor.register_forward_hook(lambda *args: None)
    return actor


class TestPlainEpisodes:
    """One-copy native env + deterministic actor: episodes without tensordicts, the rollout's returns."""

    @staticmethod
    def _count_plain(monkeypatch) -> list:
        calls = []
        original = RealEnvEvaluation._plain_episode

        def spy(self, *args):
            calls.append(1)
            return original(self, *args)

        monkeypatch.setattr(RealEnvEvaluation, "_plain_episode", spy)
        return calls

    @pytest.mark.parametrize("task,max_steps", [("halfcheetah", 300), ("hopper", 1000)])
    def test_equal_to_the_tensordict_rollout(self, task, max_steps, monkeypatch):
        spec = get_task(task)
        torch.manual_seed(1)
        actor = make_gaussian_actor(spec.observation_dim, spec.action_dim, num_cells=(64, 64))
        with torch.no_grad():  # a policy that moves: large enough weights to reach terminations
            for p in actor.parameters():
                p.mul_(3.0)
        calls = self._count_plain(monkeypatch)
        fast = RealEnvEvaluation(lambda: make_vector_env(task, 1), episodes=3, max_steps=max_steps, seed=3)
        r_fast, l_fast = fast.returns(actor)
        assert len(calls) == 3
        # the same env through env.rollout (a wrapped policy), and make_env's GymEnv stack
        r_roll, l_roll = fast.returns(_hooked(actor))
        assert len(calls) == 3
        r_gym, l_gym = RealEnvEvaluation(lambda: make_env(task), episodes=3, max_steps=max_steps, seed=3).returns(actor)
        assert torch.equal(r_fast, r_roll) and torch.equal(l_fast, l_roll)
        assert torch.equal(r_fast, r_gym) and torch.equal(l_fast, l_gym)
        assert len(set(r_fast.tolist())) == 3
        if task == "hopper":
            assert (l_fast < max_steps).all()  # terminations: each episode stops at its first done
        else:
            assert (l_fast == max_steps).all()
        assert torch.equal(fast.returns(actor)[0], r_fast)  # reseeded: a second call repeats them

    def test_max_steps_cap(self):
        actor = make_gaussian_actor(17, 6, num_cells=(8,))
        fast = RealEnvEvaluation(lambda: make_vector_env("halfcheetah", 1), episodes=1, max_steps=7, seed=0)
        r, lengths = fast.returns(actor)
        r_roll, _ = fast.returns(_hooked(actor))
        assert lengths.tolist() == [7.0] and torch.equal(r, r_roll)

    def test_where_it_does_not_apply(self, monkeypatch):
        from torchrl.envs import StepCounter, TransformedEnv

        calls = self._count_plain(monkeypatch)
        actor = make_gaussian_actor(17, 6, num_cells=(8,))
        for make in (lambda: make_env("halfcheetah"), lambda: make_vector_env("halfcheetah", 2),
                     lambda: TransformedEnv(make_vector_env("halfcheetah", 1).base_env, StepCounter())):
            RealEnvEvaluation(make, episodes=1, max_steps=5, seed=0).returns(actor)
        # sampling actions: the rollout's random stream
        RealEnvEvaluation(lambda: make_vector_env("halfcheetah", 1), episodes=1, max_steps=5, seed=0,
                          deterministic=False).returns(actor)
        assert calls == []

    def test_nan_action_is_refused(self):
        actor = make_gaussian_actor(17, 6, num_cells=(8,))
        with torch.no_grad():
            next(actor.parameters()).fill_(float("nan"))
        fast = RealEnvEvaluation(lambda: make_vector_env("halfcheetah", 1), episodes=1, max_steps=5, seed=0)
        with pytest.raises(ValueError, match="NaN"):
            fast.returns(actor)

    def test_bremen_evaluates_this_way_by_default(self, tmp_path, monkeypatch):
        from torchrl_depeff.algorithms.bremen import BREMEN, BREMENConfig
        from torchrl_depeff.envs.vector import NativeVectorEnv

        calls = self._count_plain(monkeypatch)
        cfg = BREMENConfig.tiny().override({"evaluation.episodes": 2, "evaluation.max_steps": 20})
        algo = BREMEN(cfg, data_root=tmp_path)
        r, _ = algo.evaluator.returns(algo.actor)
        assert isinstance(algo.evaluator.env.base_env, NativeVectorEnv) and len(calls) == 2
        r_gym, _ = RealEnvEvaluation(lambda: make_env(cfg.task), episodes=2, max_steps=20, seed=cfg.seed).returns(algo.actor)
        assert torch.equal(r, r_gym)


class TestDeterministicCall:
    def test_equal_to_the_actor(self):
        from tensordict import TensorDict
        from torchrl.envs.utils import ExplorationType, set_exploration_type
        from torchrl.modules import ProbabilisticActor, TanhNormal
        from tensordict.nn import NormalParamExtractor
        from torchrl_depeff.envs.model_env import _deterministic_call

        torch.manual_seed(0)
        gaussian = make_gaussian_actor(5, 2, num_cells=(16, 16))
        net = torch.nn.Sequential(torch.nn.Linear(5, 4), NormalParamExtractor())
        tanh = ProbabilisticActor(TensorDictModule(net, in_keys=["observation"], out_keys=["loc", "scale"]),
                                  in_keys=["loc", "scale"], distribution_class=TanhNormal, return_log_prob=True)
        obs = torch.randn(7, 5)
        for actor in (gaussian, tanh):
            call = _deterministic_call(actor)
            with set_exploration_type(ExplorationType.DETERMINISTIC):
                expected = actor(TensorDict({"observation": obs}, [7]))["action"]
            assert torch.equal(call(obs), expected)
        with set_exploration_type(ExplorationType.RANDOM):  # deterministic whatever the context
            assert torch.equal(_deterministic_call(gaussian)(obs), _deterministic_call(gaussian)(obs))

    def test_none_for_other_policies(self):
        from torchrl_depeff.envs.model_env import _deterministic_call

        actor = make_gaussian_actor(5, 2, num_cells=(8,))
        assert _deterministic_call(TensorDictModule(torch.nn.Linear(5, 2), in_keys=["observation"],
                                                    out_keys=["action"])) is None
        assert _deterministic_call(actor, in_key="obs") is None  # reads another key
        assert _deterministic_call(actor, out_key="act") is None
        actor.register_forward_hook(lambda *a: None)
        assert _deterministic_call(actor) is None


class TestEnvRewardEvaluation:
    """``reward_key="env_reward"``: gym's own reward (MB2PO's D4RL scores) on the native env."""

    @pytest.mark.parametrize("task", ["halfcheetah", "hopper"])
    def test_equal_to_make_native_env(self, task, monkeypatch):
        from torchrl_depeff.algorithms.mb2po import make_native_env
        from torchrl_depeff.modules.mixture import make_gmm_actor

        spec = get_task(task)
        torch.manual_seed(0)
        actor = make_gmm_actor(spec.observation_dim, spec.action_dim, num_components=3, num_cells=(32, 32))
        calls = TestPlainEpisodes._count_plain(monkeypatch)
        kw = dict(episodes=2, max_steps=300, seed=3)
        fast = RealEnvEvaluation(lambda: make_vector_env(task, 1), reward_key="env_reward", **kw)
        r_fast, l_fast = fast.returns(actor)
        assert len(calls) == 2  # the GMM actor takes the plain path too
        r_roll, l_roll = fast.returns(_hooked(actor))  # the rollout on the same env, the same key
        r_gym, l_gym = RealEnvEvaluation(lambda: make_native_env(task), **kw).returns(actor)
        assert torch.equal(r_fast, r_roll) and torch.equal(l_fast, l_roll)
        assert torch.equal(r_fast, r_gym) and torch.equal(l_fast, l_gym)
        # and not the task (Table 3) reward
        r_task, _ = RealEnvEvaluation(lambda: make_vector_env(task, 1), **kw).returns(actor)
        assert not torch.equal(r_task, r_fast)

    def test_bad_reward_key(self):
        with pytest.raises(TypeError, match="reward_key"):
            RealEnvEvaluation(lambda: make_env("hopper"), episodes=1, max_steps=5, seed=0, reward_key=("next", 1))
        ev = RealEnvEvaluation(lambda: make_vector_env("hopper", 1), episodes=1, max_steps=5, seed=0, reward_key="nope")
        with pytest.raises(KeyError, match="nope"):
            ev.returns(make_gaussian_actor(11, 3, num_cells=(8,)))
