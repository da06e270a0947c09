"""EnsembleModelEnv's fast rollout loop gives exactly TorchRL's generic rollout (issue 15)."""
from __future__ import annotations

import sys

import pytest
import torch
from tensordict import TensorDict
from tensordict.nn import TensorDictModule
from torch import nn
from torchrl.data import Bounded, Unbounded
from torchrl.envs import TransformedEnv
from torchrl.envs.transforms import Compose

from torchrl_depeff.envs.model_env import EnsembleModelEnv, model_rollout
from torchrl_depeff.envs.penalties import HardUncertaintyPenalty, SoftUncertaintyPenalty
from torchrl_depeff.modules.actors import make_gaussian_actor
from torchrl_depeff.modules.ensemble import DynamicsEnsemble, MemberPredictor

OBS, ACT = 5, 2
MODES = ["per_step", "per_sample", "per_trajectory", "mean"]


def _model(probabilistic=True, predict_reward=False, num_elites=None):
    torch.manual_seed(0)
    model = DynamicsEnsemble(OBS, ACT, num_members=4, num_cells=(16, 16), probabilistic=probabilistic,
                             predict_reward=predict_reward, num_elites=num_elites)
    obs, act = torch.randn(256, OBS), torch.randn(256, ACT)
    model.fit_normalizers(obs, act, obs + 0.3 * torch.randn(256, OBS),
                          torch.randn(256, 1) if predict_reward else None)
    return model


def _env(model, **kwargs):
    kwargs.setdefault("reward_fn", lambda o, a, n: n[..., :1] - 0.1 * a.pow(2).sum(-1, keepdim=True))
    # terminations (and truncations at 4 steps) inside the rollout exercise the automatic resets
    kwargs.setdefault("termination_fn", lambda o, a, n: n[..., :1] > 1.0)
    kwargs.setdefault("max_episode_steps", 4)
    kwargs.setdefault("batch_size", 12)
    kwargs.setdefault("uncertainty", ())
    start = torch.randn(40, OBS, generator=torch.Generator().manual_seed(5))
    return EnsembleModelEnv(model, observation_spec=Unbounded(OBS), action_spec=Bounded(-1.0, 1.0, (ACT,)),
                            start_states=TensorDict({"observation": start}, [40]), **kwargs)


def _linear_policy():
    torch.manual_seed(1)
    return TensorDictModule(nn.Sequential(nn.Linear(OBS, ACT), nn.Tanh()), in_keys=["observation"],
                            out_keys=["action"])


def _assert_same(a, b):
    assert set(a.keys(True, True)) == set(b.keys(True, True))
    assert a.batch_size == b.batch_size and a.names == b.names
    for key in a.keys(True, True):
        x, y = a.get(key), b.get(key)
        assert x.dtype == y.dtype and x.shape == y.shape, key
        assert torch.equal(x, y), key


def _assert_rollouts_equal(make_env, policy, steps=10, seed=3, runner=None):
    """Two rollouts in a row per path (the second starts from the first's leftover state)."""
    outs = []
    for fast in (True, False):
        env = make_env()
        base = env.base_env if isinstance(env, TransformedEnv) else env
        base.fast_rollout = fast
        base.set_seed(seed)
        torch.manual_seed(11)  # the policy's samples use the global RNG
        run = runner or (lambda e, n: e.rollout(n, policy, break_when_any_done=False))
        ros = [run(env, steps), run(env, steps - 3)]
        outs.append((ros, base._generator.get_state(), torch.get_rng_state(), int(base.num_invalid),
                     int(base.num_out_of_bounds_actions)))
    (fast_ros, *fast_state), (gen_ros, *gen_state) = outs
    for f, g in zip(fast_ros, gen_ros):
        _assert_same(f, g)
    assert torch.equal(fast_state[0], gen_state[0]), "env generator consumed differently"
    assert torch.equal(fast_state[1], gen_state[1]), "global RNG consumed differently"
    assert fast_state[2:] == gen_state[2:]
    return fast_ros[0]


class TestFastEqualsGeneric:
    @pytest.mark.parametrize("mode", MODES)
    @pytest.mark.parametrize("uncertainty", [(), ("disagreement", "std_norm", "cov_frobenius", "ensemble_std")])
    def test_modes_and_uncertainties(self, mode, uncertainty):
        model = _model()
        ro = _assert_rollouts_equal(lambda: _env(model, member_selection=mode, uncertainty=uncertainty), _linear_policy())
        done = ro["next", "done"]
        assert done.any() and (~done).any()  # resets happened inside the rollout
        assert ro["next", "terminated"].any() and ro["next", "truncated"].any()

    @pytest.mark.parametrize("mode", ["per_step", "per_sample", "per_trajectory"])
    def test_elites_deterministic_reward_head(self, mode):
        model = _model(probabilistic=False, predict_reward=True, num_elites=2)
        model.set_elites(torch.tensor([0.3, 0.1, 0.5, 0.2]))
        _assert_rollouts_equal(lambda: _env(model, member_selection=mode, elites_only=True, reward_fn=None,
                               uncertainty=("disagreement",)), _linear_policy())

    def test_probabilistic_actor_and_batch_dims(self):
        model = _model()
        actor = make_gaussian_actor(OBS, ACT, num_cells=(8,), sigma=0.5)
        ro = _assert_rollouts_equal(lambda: _env(model, member_selection="per_sample", batch_size=(3, 4),
                                    uncertainty=("std_norm",)), actor)
        assert ro["action_log_prob"].shape == (3, 4, 10)
        assert ro["next", "observation"].shape == (3, 4, 10, OBS)

    def test_probabilistic_actor_without_tensordicts(self):
        # a sampling ProbabilisticActor runs its network and distribution on plain tensors ...
        env = _env(_model(), member_selection="per_step")
        actor = make_gaussian_actor(OBS, ACT, num_cells=(8,), learn_sigma=True, sigma=0.5)
        call = env._policy_caller(actor)
        assert call.__qualname__.startswith("_probabilistic_call")
        built = []
        init = TensorDict.__init__

        def counting(self, *args, **kwargs):
            built.append(1)
            init(self, *args, **kwargs)

        TensorDict.__init__ = counting
        try:
            out = call({"observation": torch.randn(12, OBS)})
        finally:
            TensorDict.__init__ = init
        assert built == []  # no tensordict built
        assert list(out) == ["observation", "loc", "scale", "action", "action_log_prob"]
        # ... with the values of the tensordict call (same draw, same log-probability)
        obs = torch.randn(12, OBS)
        torch.manual_seed(4)
        fast = call({"observation": obs})
        torch.manual_seed(4)
        ref = actor(TensorDict(observation=obs, batch_size=[12]))
        for key in ("loc", "scale", "action", "action_log_prob"):
            assert torch.equal(fast[key], ref[key]), key
        assert fast["action_log_prob"].requires_grad  # gradients flow as through the tensordict call
        # and the whole rollout equals TorchRL's loop with that actor
        _assert_rollouts_equal(lambda: _env(_model(), member_selection="per_step"), actor)

    @pytest.mark.parametrize("case", ["deterministic", "safe_spec", "no_log_prob", "tanh_normal"])
    def test_probabilistic_actor_variants(self, case):
        from tensordict.nn import InteractionType, NormalParamExtractor, set_interaction_type
        from torchrl.modules import ProbabilisticActor, TanhNormal

        env_fn = lambda: _env(_model(), member_selection="per_sample")  # noqa: E731
        if case in ("deterministic", "safe_spec", "no_log_prob"):
            actor = make_gaussian_actor(OBS, ACT, num_cells=(8,), sigma=0.5)
            if case == "safe_spec":
                net = actor.module[0]
                actor = ProbabilisticActor(net, in_keys=["loc", "scale"], out_keys=["action"],
                                           spec=Bounded(-0.2, 0.2, (ACT,)), safe=True,
                                           distribution_class=actor.module[-1].distribution_class,
                                           return_log_prob=True)
            elif case == "no_log_prob":
                actor = ProbabilisticActor(actor.module[0], in_keys=["loc", "scale"], out_keys=["action"],
                                           distribution_class=actor.module[-1].distribution_class,
                                           default_interaction_type=InteractionType.RANDOM)
        else:
            torch.manual_seed(3)
            net = TensorDictModule(nn.Sequential(nn.Linear(OBS, 2 * ACT), NormalParamExtractor()),
                                   in_keys=["observation"], out_keys=["loc", "scale"])
            actor = ProbabilisticActor(net, in_keys=["loc", "scale"], out_keys=["action"],
                                       distribution_class=TanhNormal, return_log_prob=True,
                                       default_interaction_type=InteractionType.RANDOM)
        fast_expected = case == "tanh_normal"
        if case == "deterministic":
            with set_interaction_type(InteractionType.DETERMINISTIC):
                call = env_fn()._policy_caller(actor)
                assert not call.__qualname__.startswith("_probabilistic_call")
                ro = _assert_rollouts_equal(env_fn, actor)
            assert torch.equal(ro["action"], ro["loc"])
            return
        call = env_fn()._policy_caller(actor)
        assert call.__qualname__.startswith("_probabilistic_call") == fast_expected
        ro = _assert_rollouts_equal(env_fn, actor)
        if case == "safe_spec":
            assert ro["action"].abs().max() <= 0.2  # the projection of the tensordict call was kept
        if case == "tanh_normal":
            assert "action_log_prob" in ro.keys() and ro["action"].abs().max() <= 1.0

    def test_generic_policy_without_direct_call(self):
        # a TensorDictModule subclass is called through a tensordict, not unwrapped
        class Sub(TensorDictModule):
            pass

        torch.manual_seed(1)
        policy = Sub(nn.Linear(OBS, ACT), in_keys=["observation"], out_keys=["action"])
        _assert_rollouts_equal(lambda: _env(_model(), member_selection="per_step"), policy)

    @pytest.mark.parametrize("action_bounds", ["pass", "clip"])
    def test_out_of_bounds_actions(self, action_bounds):
        torch.manual_seed(1)
        policy = TensorDictModule(nn.Linear(OBS, ACT), in_keys=["observation"], out_keys=["action"])
        with torch.no_grad():
            policy.module.weight.mul_(5.0)
        _assert_rollouts_equal(lambda: _env(_model(), member_selection="per_sample", action_bounds=action_bounds), policy)

    @pytest.mark.parametrize("penalty", ["soft", "hard", "both"])
    def test_penalties_fused_transformed_and_model_rollout(self, penalty):
        model = _model()

        def make(kind):
            p = {"soft": [SoftUncertaintyPenalty(0.5, "model_std_norm")],
                 "hard": [HardUncertaintyPenalty(0.19, -5.0)],
                 "both": [SoftUncertaintyPenalty(0.5, "model_std_norm"), HardUncertaintyPenalty(0.19, -5.0)]}[kind]
            return p

        unc = ("disagreement", "std_norm")

        def fused():
            return _env(model, member_selection="per_sample", uncertainty=unc, penalty=make(penalty))

        def wrapped():
            parts = make(penalty)
            return TransformedEnv(_env(model, member_selection="per_sample", uncertainty=unc),
                                  Compose(*parts) if len(parts) > 1 else parts[0])

        policy = _linear_policy()
        ro_fused = _assert_rollouts_equal(fused, policy)  # fused fast == fused generic
        # wrapped: model_rollout's fast loop == TransformedEnv's generic loop
        ro_wrapped = _assert_rollouts_equal(wrapped, policy, runner=lambda e, n: model_rollout(e, n, policy, break_when_any_done=False))
        _assert_same(ro_fused, ro_wrapped)  # and the fused env == the transformed env
        if penalty != "hard":
            torch.testing.assert_close(ro_fused["next", "penalty"], 0.5 * ro_fused["next", "model_std_norm"])
        if penalty != "soft":
            halt = ro_fused["next", "model_disagreement"] > 0.19
            assert halt.any()
            assert (ro_fused["next", "reward"][halt] == -5.0).all() and ro_fused["next", "terminated"][halt].all()

    @pytest.mark.parametrize("mode,uncertainty", [("per_step", ()), ("per_sample", ()),
                                                  ("per_trajectory", ()), ("per_sample", ("disagreement",))])
    def test_fast_path_is_taken_and_no_host_sync(self, monkeypatch, mode, uncertainty):
        env = _env(_model(), member_selection=mode, uncertainty=uncertainty)
        steps = []
        original = EnsembleModelEnv._step
        monkeypatch.setattr(EnsembleModelEnv, "_step", lambda self, td: steps.append(1) or original(self, td))
        policy = _linear_policy()
        with torch.no_grad():
            ro = env.rollout(6, policy, break_when_any_done=False)
        assert steps == [] and ro["next", "done"].any()  # no TorchRL step machinery, resets done
        reset_td = env.reset()  # the initial reset may synchronise (it is not a step)
        names = ("item", "tolist", "__bool__", "__int__", "__float__", "__index__", "cpu", "numpy")
        originals = {n: getattr(torch.Tensor, n) for n in names}
        sync_calls: list[str] = []
        cpu_member_reads: list[str] = []
        # the one read allowed: MemberPredictor's 0-d member index on CPU (its own code path; on
        # other devices it uses index_select and never reads the index)
        cpu_only_reader = MemberPredictor._member.__code__

        def recording(name):
            def method(self, *args, **kwargs):
                if sys._getframe(1).f_code is cpu_only_reader and self.device.type == "cpu":
                    cpu_member_reads.append(name)
                else:
                    sync_calls.append(name)
                return originals[name](self, *args, **kwargs)
            return method

        try:
            for n in names:
                setattr(torch.Tensor, n, recording(n))
            with torch.no_grad():
                ro = env._fast_rollout(8, policy, env.penalties, reset=lambda: reset_td)
        finally:
            for n, m in originals.items():
                setattr(torch.Tensor, n, m)
        assert sync_calls == [], sync_calls
        # per_step reads its drawn member once per step (the other modes pass a [B] index)
        assert len(cpu_member_reads) == (8 if mode == "per_step" else 0)
        assert ro["next", "observation"].shape == (12, 8, OBS)

    def test_generic_fallbacks(self):
        env = _env(_model(), member_selection="per_sample")
        policy = _linear_policy()
        assert env._fast_rollout_ok(policy, None, {"break_when_any_done": False})
        assert not env._fast_rollout_ok(policy, None, {})  # TorchRL's default breaks when done
        assert not env._fast_rollout_ok(policy, print, {"break_when_any_done": False})
        assert not env._fast_rollout_ok(policy, None, {"break_when_any_done": False, "tensordict": env.reset()})
        assert not env._fast_rollout_ok(lambda td: td, None, {"break_when_any_done": False})
        reads_action = TensorDictModule(nn.Linear(ACT, ACT), in_keys=["action"], out_keys=["action"])
        assert not env._fast_rollout_ok(reads_action, None, {"break_when_any_done": False})
        # the generic loop still works for all of them
        assert env.rollout(3, policy)["next", "observation"].shape[1] <= 3

    @pytest.mark.parametrize("algo", ["bremen_mopo", "bremen_morel", "mb2po"])
    def test_algorithm_setups_through_model_rollout(self, algo):
        from torchrl_depeff.modules.mixture import make_gmm_actor

        if algo == "mb2po":
            model = _model(probabilistic=True, predict_reward=True, num_elites=3)
            model.set_elites(torch.tensor([0.2, 0.1, 0.9, 0.3]))
            kw = dict(member_selection="per_sample", uncertainty=("std_norm",), elites_only=True, reward_fn=None)
            transform = SoftUncertaintyPenalty(1.0, "model_std_norm")
            torch.manual_seed(2)
            policy = make_gmm_actor(OBS, ACT, num_cells=(8,), num_components=3)
        else:
            model = _model(probabilistic=False)
            unc = "ensemble_std" if algo == "bremen_mopo" else "disagreement"
            kw = dict(member_selection="per_step", uncertainty=(unc,))
            transform = (SoftUncertaintyPenalty(0.1, "model_ensemble_std") if algo == "bremen_mopo"
                         else HardUncertaintyPenalty(0.2, -5.0))
            policy = make_gaussian_actor(OBS, ACT, num_cells=(8,), sigma=0.3)

        def make():
            return TransformedEnv(_env(model, **kw), transform.clone())

        _assert_rollouts_equal(make, policy, runner=lambda e, n: model_rollout(e, n, policy, break_when_any_done=False))
