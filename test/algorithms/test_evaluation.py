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
