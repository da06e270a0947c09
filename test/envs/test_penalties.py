"""Tests for the MOPO / MOReL / MB2PO uncertainty penalties (BREMEN App. E)."""
from __future__ import annotations

import math
from typing import NamedTuple

import pytest
import torch
from tensordict import TensorDict
from torch import nn
from torchrl.data import Bounded, Unbounded
from torchrl.envs import TransformedEnv
from torchrl.envs.utils import check_env_specs, step_mdp

from torchrl_depeff.envs.model_env import EnsembleModelEnv
from torchrl_depeff.envs.penalties import HardUncertaintyPenalty, SoftUncertaintyPenalty
from torchrl_depeff.modules.ensemble import DynamicsEnsemble

OBS, ACT = 3, 2


class _Pred(NamedTuple):
    loc: torch.Tensor
    scale: torch.Tensor | None
    reward: torch.Tensor | None


class RowScaledEnsemble(nn.Module):
    """Stand-in: member i predicts obs + offsets[i] * w and std scales[i] * w, w = |obs[..., 0]|."""

    def __init__(self, offsets=(0.0, 1.0, 2.0), scales=(0.5, 1.5, 1.0)):
        super().__init__()
        self.register_buffer("offsets", torch.tensor(offsets))
        self.register_buffer("scales", torch.tensor(scales))
        self.num_members, self.observation_dim, self.action_dim = len(offsets), OBS, ACT
        self.probabilistic, self.predict_reward = True, False
        self.register_buffer("elite_indices", torch.arange(len(offsets)))

    def predict(self, observation, action, member_index=None):
        w = observation[..., :1].abs()  # per-row uncertainty level
        off = self.offsets.view(-1, *([1] * observation.dim()))
        sc = self.scales.view(-1, *([1] * observation.dim()))
        loc = observation.unsqueeze(0) + off * w
        scale = (sc * w).expand_as(loc)
        if member_index is not None:
            idx = member_index.unsqueeze(0).unsqueeze(-1).expand(1, *loc.shape[1:])
            return _Pred(loc.gather(0, idx)[0], scale.gather(0, idx)[0], None)
        return _Pred(loc, scale, None)


def _env(model=None, **kwargs):
    start = torch.zeros(8, OBS)
    start[:, 0] = torch.arange(8, dtype=torch.float32) * 0.5  # w in {0, 0.5, ..., 3.5}
    kwargs.setdefault("member_selection", "mean")
    kwargs.setdefault("uncertainty", ("disagreement", "std_norm", "cov_frobenius"))
    return EnsembleModelEnv(
        model if model is not None else RowScaledEnsemble(),
        observation_spec=Unbounded(OBS),
        action_spec=Bounded(-1.0, 1.0, (ACT,)),
        reward_fn=lambda o, a, n: torch.ones(*n.shape[:-1], 1),
        start_states=TensorDict({"observation": start}, [8]),
        batch_size=64,
        **kwargs,
    )


def _one_step(env):
    td = env.reset()
    td["action"] = torch.zeros(64, ACT)
    return td, env.step(td)["next"]


class TestSoft:
    @pytest.mark.parametrize("key,factor", [("model_std_norm", 1.5), ("model_cov_frobenius", 2.25),
                                            ("model_disagreement", 2.0)])
    def test_values(self, key, factor):
        coef = 0.3
        env = TransformedEnv(_env(), SoftUncertaintyPenalty(coef, uncertainty_key=key))
        td, out = _one_step(env)
        w = td["observation"][:, :1].abs()
        # std_norm: max_i ||scale_i w 1||_2 = 1.5 w sqrt(o); Frobenius: max_i ||(scale_i w)^2 1|| = 2.25 w^2 sqrt(o)
        # disagreement: |2 - 0| w sqrt(o)
        power = 2 if key == "model_cov_frobenius" else 1
        u = factor * w.pow(power) * math.sqrt(OBS)
        assert torch.allclose(out[key], u, atol=1e-5)
        assert torch.allclose(out["penalty"], coef * u, atol=1e-5)
        assert torch.allclose(out["reward"], 1.0 - coef * u, atol=1e-5)  # subtracted, not added

    def test_bremen_default_coef(self):
        assert SoftUncertaintyPenalty().coef == 0.1

    def test_check_env_specs(self):
        env = TransformedEnv(_env(member_selection="per_sample"), SoftUncertaintyPenalty(0.1))
        check_env_specs(env)
        ro = env.rollout(3)
        assert torch.allclose(ro["next", "penalty"], 0.1 * ro["next", "model_std_norm"])
        assert (env.reset()["penalty"] == 0).all()

    def test_bad_coef(self):
        with pytest.raises(ValueError, match="-0.5"):
            SoftUncertaintyPenalty(-0.5)

    def test_missing_key(self):
        env = _env(uncertainty=("disagreement",))
        with pytest.raises(KeyError, match="model_std_norm"):
            TransformedEnv(env, SoftUncertaintyPenalty(0.1)).observation_spec

    def test_real_ensemble(self):
        model = DynamicsEnsemble(OBS, ACT, num_members=3, num_cells=(8,), probabilistic=True)
        env = TransformedEnv(_env(model, member_selection="per_step"),
                             SoftUncertaintyPenalty(0.1, uncertainty_key="model_cov_frobenius"))
        check_env_specs(env)


class TestHard:
    def test_values(self):
        threshold = 3.0
        env = TransformedEnv(_env(), HardUncertaintyPenalty(threshold, -5.0))
        td, out = _one_step(env)
        u = 2.0 * td["observation"][:, :1].abs() * math.sqrt(OBS)
        halt = u > threshold
        assert halt.any() and (~halt).any()
        assert torch.allclose(out["model_disagreement"], u, atol=1e-5)
        assert torch.equal(out["reward"], torch.where(halt, torch.tensor(-5.0), torch.tensor(1.0)))
        assert torch.equal(out["terminated"], halt) and torch.equal(out["done"], halt)

    def test_strict_threshold(self):
        t = HardUncertaintyPenalty(3.0, -5.0)
        td = TensorDict({"reward": torch.zeros(3, 1), "model_disagreement": torch.tensor([[2.9], [3.0], [3.1]]),
                         "terminated": torch.zeros(3, 1, dtype=torch.bool),
                         "done": torch.zeros(3, 1, dtype=torch.bool)}, [3])
        out = t._step(td.clone(), td)
        assert out["terminated"].squeeze(-1).tolist() == [False, False, True]
        assert out["reward"].squeeze(-1).tolist() == [0.0, 0.0, -5.0]

    def test_halted_rows_frozen_next_step(self):
        env = TransformedEnv(_env(), HardUncertaintyPenalty(3.0, -5.0))
        td = env.reset()
        td["action"] = torch.zeros(64, ACT)
        out = env.step(td)
        halt = out["next", "terminated"].squeeze(-1)
        assert halt.any()

        nxt = step_mdp(out)
        nxt["action"] = torch.zeros(64, ACT)
        out2 = env.step(nxt)["next"]
        assert torch.equal(out2["observation"][halt], nxt["observation"][halt])
        assert (out2["reward"][halt] == 0).all()  # frozen rows: zero reward, no second -5
        assert out2["terminated"][halt].all()

    def test_check_env_specs(self):
        for mode in ("per_step", "per_sample", "per_trajectory", "mean"):
            env = TransformedEnv(_env(member_selection=mode), HardUncertaintyPenalty())
            check_env_specs(env)

    @pytest.mark.parametrize("bad", [0.0, -1.0])
    def test_bad_threshold(self, bad):
        with pytest.raises(ValueError, match="threshold"):
            HardUncertaintyPenalty(bad)
