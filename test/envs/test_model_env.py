"""Tests for EnsembleModelEnv (BREMEN eq. 2 imaginary MDP)."""
from __future__ import annotations

import math
from typing import NamedTuple

import pytest
import torch
from tensordict import TensorDict
from torch import nn
from torchrl.data import Bounded, LazyTensorStorage, ReplayBuffer, Unbounded
from torchrl.envs.utils import check_env_specs

from torchrl_depeff.envs.model_env import EnsembleModelEnv
from torchrl_depeff.modules.ensemble import DynamicsEnsemble

MODES = ["per_step", "per_sample", "per_trajectory", "mean"]
OBS, ACT = 3, 2


class _Pred(NamedTuple):
    loc: torch.Tensor
    scale: torch.Tensor | None
    reward: torch.Tensor | None


class OffsetEnsemble(nn.Module):
    """Stand-in: member i predicts obs + offsets[i] (same offset in every dim)."""

    def __init__(self, offsets=(1.0, 2.0, 3.0, 4.0), probabilistic=False, predict_reward=False, scales=None,
                 elites=None):
        super().__init__()
        self.register_buffer("offsets", torch.tensor(offsets))
        self.num_members = len(offsets)
        self.observation_dim, self.action_dim = OBS, ACT
        self.probabilistic, self.predict_reward = probabilistic, predict_reward
        scales = scales if scales is not None else [0.1 * (i + 1) for i in range(self.num_members)]
        self.register_buffer("scales", torch.tensor(scales))
        self.register_buffer("elite_indices", torch.tensor(elites if elites is not None else range(self.num_members)))
        self.calls: list[bool] = []  # True when called with member_index
        self.nan_rows: torch.Tensor | None = None

    def predict(self, observation, action, member_index=None):
        self.calls.append(member_index is not None)
        if member_index is None:
            off = self.offsets.view(-1, *([1] * observation.dim()))
            loc = observation.unsqueeze(0) + off
            scale = self.scales.view(-1, *([1] * observation.dim())).expand_as(loc) if self.probabilistic else None
            reward = (10.0 * off).expand(*loc.shape[:-1], 1) if self.predict_reward else None
        else:
            off = self.offsets[member_index].unsqueeze(-1)
            loc = observation + off
            scale = self.scales[member_index].unsqueeze(-1).expand_as(loc) if self.probabilistic else None
            reward = 10.0 * off if self.predict_reward else None
        if self.nan_rows is not None:
            loc = torch.where(self.nan_rows.unsqueeze(-1), torch.full_like(loc, float("nan")), loc)
        return _Pred(loc, scale, reward)


def _start(n=50):
    return TensorDict({"observation": torch.randn(n, OBS)}, [n])


def _reward(o, a, n):
    return n.sum(-1, keepdim=True)


def _env(model=None, **kwargs):
    kwargs.setdefault("reward_fn", _reward)
    kwargs.setdefault("start_states", _start())
    kwargs.setdefault("batch_size", 16)
    kwargs.setdefault("uncertainty", ())
    return EnsembleModelEnv(
        model if model is not None else OffsetEnsemble(),
        observation_spec=Unbounded(OBS),
        action_spec=Bounded(-1.0, 1.0, (ACT,)),
        **kwargs,
    )


def _deltas(ro):
    return ro["next", "observation"] - ro["observation"]  # [B, T, o]


class TestSpecs:
    @pytest.mark.parametrize("mode", MODES)
    @pytest.mark.parametrize("uncertainty", [(), ("disagreement", "std_norm", "cov_frobenius")])
    def test_check_env_specs_standin(self, mode, uncertainty):
        env = _env(OffsetEnsemble(probabilistic=True), member_selection=mode, uncertainty=uncertainty)
        check_env_specs(env)

    @pytest.mark.parametrize("mode", MODES)
    def test_check_env_specs_real_ensemble(self, mode):
        model = DynamicsEnsemble(OBS, ACT, num_members=3, num_cells=(8,), probabilistic=True, num_elites=2)
        env = _env(model, member_selection=mode, uncertainty=("disagreement", "std_norm", "cov_frobenius"),
                   elites_only=True, batch_size=(2, 3))
        check_env_specs(env)
        ro = env.rollout(3)
        assert ro["next", "model_cov_frobenius"].shape == (2, 3, 3, 1)


class TestMemberSelection:
    def test_per_step_one_member_per_step(self):
        env = _env(member_selection="per_step")
        ro = env.rollout(30, break_when_any_done=False)
        d = _deltas(ro)  # [B, T, o]
        # every row and every dim moved by the same offset at each step
        assert torch.allclose(d, d[:1, :, :1].expand_as(d))
        assert set(d[0, :, 0].round().tolist()) <= {1.0, 2.0, 3.0, 4.0}
        assert len(set(d[0, :, 0].round().tolist())) > 1  # member redrawn across steps

    def test_per_step_without_uncertainty_evaluates_one_member(self):
        model = OffsetEnsemble()
        env = _env(model, member_selection="per_step", batch_size=32)
        env.rollout(4, break_when_any_done=False)
        # every call went through member_index, i.e. only the drawn member was evaluated
        assert model.calls and all(model.calls)

    def test_per_sample_rows_differ(self):
        model = OffsetEnsemble()
        env = _env(model, member_selection="per_sample", batch_size=64)
        ro = env.rollout(3)
        d = _deltas(ro)[..., 0]  # [B, T]
        for t in range(3):
            assert len(set(d[:, t].round().tolist())) == 4
        # no uncertainty requested: only one member per row evaluated
        assert model.calls and all(model.calls)

    def test_per_sample_with_uncertainty_uses_all_members(self):
        model = OffsetEnsemble()
        env = _env(model, member_selection="per_sample", batch_size=64, uncertainty=("disagreement",))
        ro = env.rollout(2)
        assert not any(model.calls)
        assert len(set(_deltas(ro)[:, 0, 0].round().tolist())) == 4

    @pytest.mark.parametrize("uncertainty", [(), ("disagreement",)])
    def test_per_trajectory_keeps_member(self, uncertainty):
        model = OffsetEnsemble()
        env = _env(model, member_selection="per_trajectory", batch_size=64, uncertainty=uncertainty)
        ro = env.rollout(6)
        d = _deltas(ro)[..., 0]  # [B, T]
        assert torch.allclose(d, d[:, :1].expand_as(d))
        member = ro["model_member"][:, 0]
        assert torch.allclose(d[:, 0], model.offsets[member])
        assert len(set(member.tolist())) > 1

    def test_mean_is_average(self):
        env = _env(OffsetEnsemble(probabilistic=True), member_selection="mean")
        ro = env.rollout(3)
        assert torch.allclose(_deltas(ro), torch.full_like(_deltas(ro), 2.5))

    @pytest.mark.parametrize("mode", ["per_step", "per_sample", "per_trajectory"])
    @pytest.mark.parametrize("uncertainty", [(), ("disagreement",)])
    def test_elites_only(self, mode, uncertainty):
        env = _env(OffsetEnsemble(elites=[1, 3]), member_selection=mode, elites_only=True, batch_size=64,
                   uncertainty=uncertainty)
        ro = env.rollout(10)
        assert set(_deltas(ro)[..., 0].round().flatten().tolist()) <= {2.0, 4.0}
        if uncertainty:  # disagreement among elites only: |2 - 4| * sqrt(o)
            assert torch.allclose(ro["next", "model_disagreement"], torch.tensor(2.0 * math.sqrt(OBS)))

    def test_elites_only_mean(self):
        env = _env(OffsetEnsemble(elites=[0, 3]), member_selection="mean", elites_only=True)
        assert torch.allclose(_deltas(env.rollout(2)), torch.tensor(2.5))

    @pytest.mark.parametrize("mode", MODES)
    def test_set_seed_reproducible(self, mode):
        model = OffsetEnsemble(probabilistic=True)
        start = _start()
        envs = [_env(model, member_selection=mode, start_states=start) for _ in range(2)]
        outs = []
        for env in envs:
            env.set_seed(7)
            torch.manual_seed(123)  # different global RNG state must not matter
            outs.append(env.rollout(4)["next", "observation"])
            torch.manual_seed(456)
        assert torch.equal(outs[0], outs[1])
        envs[0].set_seed(8)
        if mode != "mean":
            assert not torch.equal(envs[0].rollout(4)["next", "observation"], outs[0])

    def test_noise_std_matches_member_scale(self):
        model = OffsetEnsemble(offsets=(0.0, 0.0), probabilistic=True, scales=[0.2, 0.2])
        env = _env(model, member_selection="per_step", batch_size=5000)
        d = _deltas(env.rollout(1))
        assert abs(d.std().item() - 0.2) < 0.02
        assert abs(d.mean().item()) < 0.02


class TestUncertainty:
    def test_values(self):
        scales = [0.5, 2.0, 1.0, 0.1]
        env = _env(OffsetEnsemble(probabilistic=True, scales=scales), member_selection="mean",
                   uncertainty=("disagreement", "std_norm", "cov_frobenius"))
        ro = env.rollout(2)
        # max pairwise ||mu_i - mu_j|| = |4 - 1| * sqrt(o)
        assert torch.allclose(ro["next", "model_disagreement"], torch.tensor(3.0 * math.sqrt(OBS)))
        # max_i ||sigma_i|| = 2 * sqrt(o); max_i ||Sigma_i||_F = 4 * sqrt(o)
        assert torch.allclose(ro["next", "model_std_norm"], torch.tensor(2.0 * math.sqrt(OBS)))
        assert torch.allclose(ro["next", "model_cov_frobenius"], torch.tensor(4.0 * math.sqrt(OBS)))

    def test_ensemble_std_deterministic(self):
        # offsets 1..4 in every dim: population std over members = sqrt(1.25); the max over dims
        # is the same; a deterministic ensemble is enough (BREMEN App. E soft penalty)
        env = _env(OffsetEnsemble(offsets=(1.0, 2.0, 3.0, 4.0)), member_selection="per_step",
                   uncertainty=("ensemble_std",))
        ro = env.rollout(2)
        assert torch.allclose(ro["next", "model_ensemble_std"], torch.tensor(math.sqrt(1.25)))
        env = _env(OffsetEnsemble(offsets=(2.0, 2.0, 2.0, 2.0)), uncertainty=("ensemble_std",))
        assert torch.count_nonzero(env.rollout(2)["next", "model_ensemble_std"]) == 0

    def test_disagreement_real_ensemble_matches_loop(self):
        model = DynamicsEnsemble(OBS, ACT, num_members=4, num_cells=(8,))
        env = _env(model, member_selection="mean", uncertainty=("disagreement",), batch_size=7)
        td = env.reset()
        td["action"] = torch.rand(7, ACT) * 2 - 1
        out = env.step(td)
        loc = model.predict(td["observation"], td["action"]).loc
        ref = torch.stack([(loc[i] - loc[j]).norm(dim=-1) for i in range(4) for j in range(4)]).amax(0)
        assert torch.allclose(out["next", "model_disagreement"].squeeze(-1), ref, atol=1e-5)
        assert torch.allclose(out["next", "observation"], loc.mean(0), atol=1e-6)


class TestDynamics:
    def test_terminated_rows_stay_terminal(self):
        env = _env(termination_fn=lambda o, a, n: n[..., :1] > 100.0, member_selection="mean")
        td = env.reset()
        td["observation"][:4] = 200.0
        td["action"] = torch.zeros(16, ACT)
        out = env.step(td)["next"]
        assert out["terminated"][:4].all() and not out["terminated"][4:].any()
        # step again from the terminal state: frozen
        nxt = out.clone()
        nxt["action"] = torch.zeros(16, ACT)
        out2 = env.step(nxt)["next"]
        assert torch.equal(out2["observation"][:4], out["observation"][:4])
        assert (out2["reward"][:4] == 0).all()
        assert out2["terminated"][:4].all() and out2["done"][:4].all()
        assert torch.allclose(out2["observation"][4:], out["observation"][4:] + 2.5)
        assert torch.equal(out2["model_step_count"][:4], out["model_step_count"][:4])

    def test_truncation(self):
        env = _env(max_episode_steps=3, member_selection="per_step")
        ro = env.rollout(7, break_when_any_done=False)
        tr = ro["next", "truncated"][..., 0]
        assert tr[:, 2].all() and tr[:, 5].all()
        assert not tr[:, [0, 1, 3, 4, 6]].any()
        assert torch.equal(ro["next", "done"], ro["next", "truncated"])
        assert ro["next", "model_step_count"][0, :, 0].tolist() == [1, 2, 3, 1, 2, 3, 1]

    def test_reset_samples_only_start_states(self):
        start = _start(5)
        env = _env(start_states=start, batch_size=200)
        obs = env.reset()["observation"]
        match = (obs.unsqueeze(1) == start["observation"].unsqueeze(0)).all(-1)  # [B, 5]
        assert match.any(-1).all()
        assert match.any(0).sum() >= 4  # uniform: (almost) all start states used

    def test_partial_reset(self):
        env = _env(start_states=_start(5), member_selection="mean")
        td = env.reset()
        td["action"] = torch.zeros(16, ACT)
        td = env.step(td)["next"].clone()
        moved = td["observation"].clone()
        reset_mask = torch.zeros(16, 1, dtype=torch.bool)
        reset_mask[:3] = True
        td["_reset"] = reset_mask
        out = env.reset(td)
        assert torch.equal(out["observation"][3:], moved[3:])
        assert (out["model_step_count"][:3] == 0).all() and (out["model_step_count"][3:] == 1).all()
        start = env._start_states
        assert (out["observation"][:3].unsqueeze(1) == start.unsqueeze(0)).all(-1).any(-1).all()

    def test_replay_buffer_start_states(self):
        rb = ReplayBuffer(storage=LazyTensorStorage(100))
        data = _start(10)
        rb.extend(data)
        env = _env(start_states=rb)
        obs = env.reset()["observation"]
        assert (obs.unsqueeze(1) == data["observation"].unsqueeze(0)).all(-1).any(-1).all()

    def test_reward_from_ensemble(self):
        env = _env(OffsetEnsemble(predict_reward=True), reward_fn=None, member_selection="per_sample")
        ro = env.rollout(3)
        assert torch.allclose(ro["next", "reward"], 10.0 * _deltas(ro)[..., :1])

    def test_reward_fn_gets_obs_action_next(self):
        seen = {}

        def rf(o, a, n):
            seen["args"] = (o, a, n)
            return (n - o).sum(-1, keepdim=True) + a.sum(-1, keepdim=True)

        env = _env(reward_fn=rf, member_selection="mean")
        ro = env.rollout(2)
        expected = _deltas(ro).sum(-1, keepdim=True) + ro["action"].sum(-1, keepdim=True)
        assert torch.allclose(ro["next", "reward"], expected)

    def test_nan_prediction_terminates(self):
        model = OffsetEnsemble()
        nan_rows = torch.zeros(16, dtype=torch.bool)
        nan_rows[[2, 5]] = True
        model.nan_rows = nan_rows
        env = _env(model, member_selection="per_sample")
        td = env.reset()
        td["action"] = torch.zeros(16, ACT)
        out = env.step(td)["next"]
        assert out["terminated"][nan_rows].all() and not out["terminated"][~nan_rows].any()
        assert torch.isfinite(out["observation"]).all()
        assert torch.equal(out["observation"][nan_rows], td["observation"][nan_rows])
        assert (out["reward"][nan_rows] == 0).all()
        assert int(env.num_invalid) == 2

    def test_large_batch_real_ensemble(self):
        model = DynamicsEnsemble(17, 6, num_members=5, num_cells=(32, 32))
        env = EnsembleModelEnv(model, observation_spec=Unbounded(17), action_spec=Bounded(-1.0, 1.0, (6,)),
                               reward_fn=lambda o, a, n: n[..., :1], start_states=TensorDict(
                                   {"observation": torch.randn(1000, 17)}, [1000]),
                               batch_size=10_000, member_selection="per_sample")
        with torch.no_grad():
            ro = env.rollout(3)
        assert ro["next", "observation"].shape == (10_000, 3, 17)
        assert torch.isfinite(ro["next", "observation"]).all()


_HOST_SYNC_METHODS = ("item", "tolist", "numpy", "cpu", "__bool__", "__float__", "__int__", "__index__")


class TestScale:
    """Issue 8: 10^5 parallel start states, and no host round-trip (``.item()``, ``.cpu()``,
    tensor-valued ``if``) inside a model-env step, so a CUDA rollout never syncs per step."""

    @pytest.mark.parametrize("mode", MODES)
    def test_hundred_thousand_rollouts_step_without_host_sync(self, mode):
        model = DynamicsEnsemble(17, 6, num_members=5, num_cells=(32, 32))
        env = EnsembleModelEnv(
            model, observation_spec=Unbounded(17), action_spec=Bounded(-1.0, 1.0, (6,)),
            reward_fn=lambda o, a, n: n[..., :1] - a.pow(2).sum(-1, keepdim=True),
            start_states=TensorDict({"observation": torch.randn(1000, 17)}, [1000]),
            batch_size=100_000, member_selection=mode, uncertainty=("disagreement",),
            max_episode_steps=50,
        )
        td = env.reset()
        td["action"] = torch.rand(100_000, 6) * 2 - 1
        with torch.no_grad():
            env.step(td)  # warm-up outside the recorder
        calls: list[str] = []
        originals = {name: getattr(torch.Tensor, name) for name in _HOST_SYNC_METHODS}

        def recording(name):
            def method(self, *args, **kwargs):
                calls.append(name)
                return originals[name](self, *args, **kwargs)

            return method

        try:
            for name in _HOST_SYNC_METHODS:
                setattr(torch.Tensor, name, recording(name))
            with torch.no_grad():
                out = env.step(td)
        finally:
            for name, original in originals.items():
                setattr(torch.Tensor, name, original)
        assert calls == [], f"host sync inside EnsembleModelEnv.step ({mode}): {calls}"
        nxt = out["next"]
        assert nxt["observation"].shape == (100_000, 17)
        assert nxt["model_disagreement"].shape == (100_000, 1)
        assert torch.isfinite(nxt["observation"]).all() and torch.isfinite(nxt["reward"]).all()
        # the recorder itself works (a tensor-valued branch is caught)
        setattr(torch.Tensor, "__bool__", recording("__bool__"))
        try:
            bool(torch.ones(()))
        finally:
            setattr(torch.Tensor, "__bool__", originals["__bool__"])
        assert calls == ["__bool__"]


class TestErrors:
    def test_empty_start_states(self):
        with pytest.raises(ValueError, match="non-empty"):
            _env(start_states=TensorDict({"observation": torch.zeros(0, OBS)}, [0]))
        with pytest.raises(ValueError, match="empty"):
            _env(start_states=ReplayBuffer(storage=LazyTensorStorage(10)))

    def test_unknown_selection(self):
        with pytest.raises(ValueError, match="random_model"):
            _env(member_selection="random_model")

    def test_unknown_uncertainty(self):
        with pytest.raises(ValueError, match="std_norm"):
            _env(uncertainty=("variance",))

    def test_std_needs_probabilistic(self):
        with pytest.raises(ValueError, match="probabilistic"):
            _env(uncertainty=("std_norm",))

    def test_missing_reward(self):
        with pytest.raises(ValueError, match="reward_fn"):
            _env(reward_fn=None)

    def test_spec_dim_mismatch(self):
        with pytest.raises(ValueError, match=r"\[4\]"):
            EnsembleModelEnv(OffsetEnsemble(), observation_spec=Unbounded(4), action_spec=Unbounded(ACT),
                             reward_fn=_reward, start_states=_start(), batch_size=2)

    def test_from_env_dim_mismatch(self):
        from torchrl_depeff.envs.tasks import make_env

        real = make_env("hopper")
        model = DynamicsEnsemble(17, 6, num_members=2, num_cells=(8,))
        with pytest.raises(ValueError, match=r"observation 17.*\[11\]"):
            EnsembleModelEnv.from_env(real, model, task="hopper", start_states=_start(), batch_size=2)

    def test_from_env_task(self):
        from torchrl_depeff.envs.tasks import get_task, make_env

        real = make_env("hopper")
        model = DynamicsEnsemble(11, 3, num_members=2, num_cells=(8,))
        start = TensorDict({"observation": torch.zeros(4, 11)}, [4])
        env = EnsembleModelEnv.from_env(real, model, task="hopper", start_states=start, batch_size=5)
        assert env.termination_fn is get_task("hopper").termination_fn
        assert env.max_episode_steps == 1000
        check_env_specs(env)


class TestResetFromGivenStates:
    def test_reset_uses_given_observations(self):
        env = _env(member_selection="mean")
        given = torch.randn(16, OBS)
        out = env.reset(TensorDict({"observation": given}, [16]))
        assert torch.equal(out["observation"], given)
        assert (out["model_step_count"] == 0).all()
        ro = env.rollout(3, tensordict=TensorDict({"observation": given}, [16]), break_when_any_done=False)
        assert torch.equal(ro["observation"][:, 0], given)  # rollout(tensordict=...) starts there
        # set_state=False ignores them: a sampled start state instead
        out = env.reset(TensorDict({"observation": given}, [16]), set_state=False)
        assert not torch.equal(out["observation"], given)
        start = env._start_states
        assert (out["observation"].unsqueeze(1) == start.unsqueeze(0)).all(-1).any(-1).all()

    def test_partial_reset_samples_unless_set_state(self):
        env = _env(member_selection="mean")
        given = torch.full((16, OBS), 7.0)
        mask = torch.zeros(16, 1, dtype=torch.bool)
        mask[:2] = True
        td = TensorDict({"observation": given, "_reset": mask}, [16])
        out = env.reset(td.clone())
        assert (out["observation"][:2] != 7.0).all() and (out["observation"][2:] == 7.0).all()
        given2 = torch.full((16, OBS), 9.0)
        out = env.reset(TensorDict({"observation": given2, "_reset": mask}, [16]), set_state=True)
        assert (out["observation"] == 9.0).all()

    def test_per_trajectory_member_from_the_tensordict(self):
        env = _env(member_selection="per_trajectory")
        member = torch.tensor([3] * 16)
        out = env.reset(TensorDict({"observation": torch.zeros(16, OBS), "model_member": member}, [16]))
        assert torch.equal(out["model_member"], member)


class TestDtypesAndBounds:
    def test_float64_gym_env_is_cast_to_the_ensemble_dtype(self):
        from torchrl.envs import GymEnv

        real = GymEnv("HalfCheetah-v5")  # float64 observations, no DoubleToFloat
        assert real.observation_spec["observation"].dtype == torch.float64
        model = DynamicsEnsemble(17, 6, num_members=2, num_cells=(8,))
        start = TensorDict({"observation": real.reset()["observation"].expand(4, 17).clone()}, [4])
        env = EnsembleModelEnv.from_env(real, model, task="halfcheetah", start_states=start, batch_size=3)
        assert env.observation_spec["observation"].dtype == torch.float32
        assert env.action_spec.dtype == torch.float32 and env.reward_spec.dtype == torch.float32
        check_env_specs(env)
        ro = env.rollout(3, lambda td: td.set("action", torch.zeros(3, 6, dtype=torch.float64)))
        assert ro["next", "observation"].dtype == torch.float32 and torch.isfinite(ro["next", "reward"]).all()

    @pytest.mark.parametrize("bounds", ["pass", "clip"])
    def test_out_of_bounds_actions(self, bounds):
        seen = {}

        def rf(o, a, n):
            seen["a"] = a
            return n[..., :1]

        env = _env(reward_fn=rf, action_bounds=bounds, member_selection="mean")
        td = env.reset()
        action = torch.zeros(16, ACT)
        action[:3, 0] = 5.0
        action[3, 1] = float("nan")
        td["action"] = action
        env.step(td)
        assert int(env.num_out_of_bounds_actions) == 4  # rows 0-2 above the bound, row 3 NaN
        if bounds == "clip":
            assert seen["a"][:3, 0].eq(1.0).all()
        else:
            assert seen["a"][:3, 0].eq(5.0).all()

    def test_replay_buffer_nan_start_state_refused_at_reset(self):
        rb = ReplayBuffer(storage=LazyTensorStorage(10))
        obs = torch.randn(10, OBS)
        obs[:, 0] = float("nan")
        rb.extend(TensorDict({"observation": obs}, [10]))
        env = _env(start_states=rb)
        with pytest.raises(ValueError, match="replay buffer returned 16 non-finite"):
            env.reset()
