"""TorchRL-style tests of TRPOLoss, UncertaintyWeightedTRPOLoss, AWACLoss and WeightedBCLoss.

Shaped like ``pytorch/rl``'s ``test/objectives/test_*.py``: keys and ``set_keys`` (every key renamed,
propagation to the networks, unknown keys rejected), input immutability, which parameters each
``loss_*`` reaches, reduction shapes, state-dict round trips that compare outputs, vmap paths,
``torch.compile`` on CPU, TorchRL ``TanhNormal`` actors, and a plain TorchRL PPO-style pipeline
with ``TRPOLoss`` in place of ``ClipPPOLoss``.
"""
from __future__ import annotations

import math

import pytest
import torch
from tensordict import TensorDict
from tensordict.nn import NormalParamExtractor, TensorDictModule
from torch import nn
from torch.distributions import kl_divergence, Normal
from torchrl.envs.utils import ExplorationType, set_exploration_type
from torchrl.modules import MLP, ProbabilisticActor, TanhNormal, ValueOperator
from torchrl.objectives.utils import ValueEstimators
from torchrl.objectives.value.functional import generalized_advantage_estimate

from torchrl_depeff.modules.actors import make_gaussian_actor
from torchrl_depeff.modules.mixture import make_gmm_actor
from torchrl_depeff.objectives import (
    AWACLoss,
    trpo_step,
    TRPOLoss,
    UncertaintyWeightedTRPOLoss,
    WeightedBCLoss,
)
from torchrl_depeff.optim import ConjugateGradientTrustRegion

OBS, ACT = 3, 2


# ----------------------------------------------------------------------------- helpers
def gaussian_actor(seed=0, **kw):
    torch.manual_seed(seed)
    kw.setdefault("num_cells", (16,))
    kw.setdefault("learn_sigma", True)
    kw.setdefault("sigma", 0.5)
    return make_gaussian_actor(OBS, ACT, **kw)


def tanh_actor(seed=0, low=-1.0, high=1.0):
    """TorchRL's recipe: MLP -> NormalParamExtractor -> TanhNormal (state-dependent scale)."""
    torch.manual_seed(seed)
    net = nn.Sequential(MLP(in_features=OBS, out_features=2 * ACT, num_cells=[16]), NormalParamExtractor())
    return ProbabilisticActor(
        TensorDictModule(net, in_keys=["observation"], out_keys=["loc", "scale"]),
        in_keys=["loc", "scale"], distribution_class=TanhNormal,
        distribution_kwargs={"low": torch.full((ACT,), low), "high": torch.full((ACT,), high)},
        return_log_prob=True,
    )


def value_net(seed=1, obs_key="observation", out_key="state_value"):
    torch.manual_seed(seed)
    return ValueOperator(MLP(in_features=OBS, out_features=1, num_cells=[16]), in_keys=[obs_key], out_keys=[out_key])


def qvalue_net(seed=2, action_key="action"):
    torch.manual_seed(seed)
    return ValueOperator(MLP(in_features=OBS + ACT, out_features=1, num_cells=[16]), in_keys=["observation", action_key])


def perturb(module, scale=0.1, seed=5):
    torch.manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            p.add_(scale * torch.randn_like(p))


def rollout(actor, b=4, t=10, seed=0):
    """``[b, t]`` rollout with the actor's stored distribution parameters and ``next`` entries."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad(), set_exploration_type(ExplorationType.RANDOM):
        td = actor(TensorDict(observation=torch.randn(b, t, OBS, generator=g), batch_size=[b, t]))
    td["next", "observation"] = torch.randn(b, t, OBS, generator=g)
    td["next", "reward"] = torch.randn(b, t, 1, generator=g)
    term = torch.zeros(b, t, 1, dtype=torch.bool)
    term[0, 4] = True
    done = term.clone()
    done[:, -1] = True
    td["next", "terminated"], td["next", "done"] = term, done
    return td


def transitions(batch=(8,), seed=1):
    g = torch.Generator().manual_seed(seed)
    term = torch.rand(*batch, 1, generator=g) < 0.3
    return TensorDict(
        {"observation": torch.randn(*batch, OBS, generator=g), "action": torch.rand(*batch, ACT, generator=g) * 1.8 - 0.9,
         "next": {"observation": torch.randn(*batch, OBS, generator=g), "reward": torch.randn(*batch, 1, generator=g),
                  "done": term.clone(), "terminated": term}},
        batch_size=batch,
    )


def rename(td, mapping):
    td = td.clone()
    for old, new in mapping.items():
        td.rename_key_(old, new)
    return td


def leaves(params):
    return list(params.values(include_nested=True, leaves_only=True))


# ----------------------------------------------------------------------------- TRPO
class TestTRPO:
    def _loss(self, actor=None, critic=True, **kw):
        actor = actor if actor is not None else gaussian_actor()
        loss = TRPOLoss(actor, value_net() if critic else None, **kw)
        loss.make_value_estimator(ValueEstimators.GAE, gamma=0.9, lmbda=0.8)
        return loss

    def test_keys(self):
        loss = self._loss(critic_coeff=1.0, entropy_coeff=0.01)
        out = loss(rollout(loss.actor_network))
        assert set(out.keys()) == set(loss.out_keys)
        assert {"loss_objective", "loss_critic", "loss_entropy", "kl", "kl_approx", "ESS", "entropy"} <= set(out.keys())
        assert {"observation", "loc", "scale", "action", "action_log_prob", ("next", "reward"),
                ("next", "done"), ("next", "terminated"), ("next", "observation")} <= set(loss.in_keys)
        for key, value in out.items():
            if not key.startswith("loss_"):
                assert not value.requires_grad, key

    def test_out_keys_setter(self):
        loss = self._loss()
        loss.out_keys = ["loss_objective"]
        assert loss.out_keys == ["loss_objective"]
        assert loss.select_out_keys("loss_objective") is loss

    def test_set_keys_every_key_renamed(self):
        actor = gaussian_actor()
        td = rollout(actor)
        perturb(actor, 0.05)
        ref = self._loss(actor, critic_coeff=1.0)(td)
        mapping = {"action": "act", "action_log_prob": "old_lp", ("next", "reward"): ("next", "rew"),
                   ("next", "done"): ("next", "fin"), ("next", "terminated"): ("next", "term")}
        renamed = rename(td, mapping)
        loss = self._loss(actor, critic_coeff=1.0)
        loss.set_keys(action="act", sample_log_prob="old_lp", reward="rew", done="fin", terminated="term",
                      advantage="adv", value_target="vt")
        out = loss(renamed)
        for key in ("loss_objective", "loss_critic", "kl", "ESS"):
            torch.testing.assert_close(out[key], ref[key])
        assert {"act", "old_lp", ("next", "rew"), ("next", "fin"), ("next", "term")} <= set(loss.in_keys)
        assert loss.value_estimator.tensor_keys.reward == "rew"
        # a precomputed advantage under its renamed key is used as is
        adv_td = renamed.clone()
        adv_td["adv"] = torch.ones(4, 10, 1)
        loss2 = self._loss(actor, critic=False, normalize_advantage=False)
        loss2.set_keys(action="act", sample_log_prob="old_lp", advantage="adv")
        assert "adv" in loss2.in_keys
        lw = loss2(adv_td)["loss_objective"]
        with torch.no_grad():
            ratio = (actor.get_dist(td.clone()).log_prob(td["action"]) - td["action_log_prob"]).exp()
        torch.testing.assert_close(lw, -ratio.mean())

    def test_set_keys_value_propagates_to_critic_output(self):
        actor = gaussian_actor()
        td = rollout(actor)
        loss = TRPOLoss(actor, value_net(out_key="v"))
        loss.set_keys(value="v")
        loss.make_value_estimator(ValueEstimators.GAE, gamma=0.9, lmbda=0.8)
        out = loss.compute_advantage(td)
        with torch.no_grad():
            v = loss.critic_network(td.clone())["v"]
        assert torch.isfinite(out["advantage"]).all() and not torch.allclose(out["value_target"], v)

    def test_set_keys_rejects_unknown(self):
        with pytest.raises(ValueError, match="not_a_key"):
            self._loss().set_keys(not_a_key="x")

    def test_input_untouched(self):
        for mode in ("surrogate", "reward"):
            actor = gaussian_actor()
            td = rollout(actor)
            perturb(actor)
            before = td.clone()
            loss = self._loss(actor, critic_coeff=1.0, kl_to_reference_coef=0.3, reference_actor=gaussian_actor(9),
                              kl_to_reference_mode=mode)
            loss(td)
            loss.kl(td)
            loss.loss_and_kl(td)
            trpo_step(loss, ConjugateGradientTrustRegion(loss), td)
            assert set(td.keys(True, True)) == set(before.keys(True, True))
            assert (td == before).all()

    def test_grad_isolation(self):
        loss = self._loss(critic_coeff=1.0)
        td = rollout(loss.actor_network)
        perturb(loss.actor_network, 0.05)
        out = loss(td)
        out["loss_objective"].backward()
        assert all(p.grad is None for p in leaves(loss.critic_network_params))
        assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in leaves(loss.actor_network_params))
        loss.zero_grad(set_to_none=True)
        loss(td)["loss_critic"].backward()
        assert all(p.grad is None for p in leaves(loss.actor_network_params))
        assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in leaves(loss.critic_network_params))

    @pytest.mark.parametrize("reduction", ["none", "mean", "sum"])
    def test_reduction_shapes(self, reduction):
        loss = self._loss(reduction=reduction, entropy_coeff=0.01, critic_coeff=1.0)
        out = loss(rollout(loss.actor_network))
        shape = (4, 10) if reduction == "none" else ()
        for key in ("loss_objective", "loss_entropy", "loss_critic"):
            assert out[key].shape == shape, key

    def test_state_dict_roundtrip(self):
        a = self._loss(gaussian_actor(0), critic_coeff=0.5, entropy_coeff=0.02)
        b = self._loss(gaussian_actor(1), critic_coeff=0.5, entropy_coeff=0.02)
        td = rollout(gaussian_actor(0))
        assert not torch.allclose(a(td)["loss_objective"], b(td)["loss_objective"])
        assert "entropy_coeff" in dict(a.named_buffers()) and "critic_coeff" in dict(a.named_buffers())
        b.load_state_dict(a.state_dict())
        for key, value in a(td).items():
            torch.testing.assert_close(value, b(td)[key], msg=key)

    def test_dispatch_kwargs(self):
        loss = self._loss(critic=False)
        td = rollout(loss.actor_network)
        td["advantage"] = torch.randn(4, 10, 1)
        kwargs = {"_".join(k) if isinstance(k, tuple) else k: td.get(k) for k in loss.in_keys}
        outs = loss(**kwargs)
        torch.testing.assert_close(outs[loss.out_keys.index("loss_objective")], loss(td)["loss_objective"])

    def test_vmap_over_batches_equals_loop(self):
        loss = self._loss(critic=False, normalize_advantage=False)
        td = rollout(loss.actor_network, b=3, t=5)
        td["advantage"] = torch.randn(3, 5, 1)
        perturb(loss.actor_network, 0.1)
        vmapped = torch.vmap(lambda x: loss(x)["loss_objective"])(td)
        looped = torch.stack([loss(td[i])["loss_objective"] for i in range(3)])
        torch.testing.assert_close(vmapped, looped)

    def test_uw_trpo_is_a_weighted_configuration(self):
        actor = gaussian_actor()
        td = rollout(actor, b=2, t=6)
        td["advantage"] = torch.randn(2, 6, 1)
        td["uncertainty"] = torch.rand(2, 6, 1) * 20
        perturb(actor)
        uw = UncertaintyWeightedTRPOLoss(actor, alpha=0.1, reduction="none")
        plain = TRPOLoss(actor, reduction="none")
        w = torch.exp(-0.1 * td["uncertainty"].squeeze(-1))
        torch.testing.assert_close(uw(td)["loss_objective"], plain(td)["loss_objective"] * w)
        # MUSBO eq. (13): mean over samples of U * surrogate; TorchRL's weighted mean divides by sum(U)
        per = plain(td)["loss_objective"]
        mean_uw = UncertaintyWeightedTRPOLoss(actor, alpha=0.1)(td)["loss_objective"]
        torch.testing.assert_close(mean_uw, (per * w).mean())
        weighted = TRPOLoss(actor, sample_weight_normalization="weights")
        weighted.set_keys(sample_weight="w")
        td["w"] = w
        torch.testing.assert_close(weighted(td)["loss_objective"], (per * w).sum() / w.sum())
        assert weighted(td)["w"] == w.mean()

    def test_explicit_kl_reward_mode(self):
        actor, ref = gaussian_actor(0), gaussian_actor(7, sigma=0.3)
        td = rollout(actor)
        alpha = 2.0
        loss = self._loss(actor, kl_to_reference_coef=alpha, reference_actor=ref, kl_to_reference_mode="reward")
        out = loss.compute_advantage(td)
        with torch.no_grad():
            pk, pr = actor.get_dist(td.clone()), ref.get_dist(td.clone())
            kl = kl_divergence(pk, pr).unsqueeze(-1)  # KL(pi_k || pi_ref) on the rollout states
            v = loss.critic_network(td.clone())["state_value"]
            nv = loss.critic_network(td["next"].clone())["state_value"]

        def gae(reward):
            return generalized_advantage_estimate(0.9, 0.8, v, nv, reward, td["next", "done"],
                                                  td["next", "terminated"], time_dim=-2)[0]

        torch.testing.assert_close(out["next", "kl_to_reference"], kl)
        torch.testing.assert_close(out["next", "reward"], td["next", "reward"] - alpha * kl)
        torch.testing.assert_close(out["advantage"], gae(td["next", "reward"] - alpha * kl), rtol=1e-5, atol=1e-5)
        wrong_sign = gae(td["next", "reward"] + alpha * kl)
        assert not torch.allclose(out["advantage"], wrong_sign, atol=1e-3)
        res = loss(td)
        assert "loss_kl_reference" not in res.keys()
        torch.testing.assert_close(res["kl_reference"], kl.mean())
        assert "advantage" not in td.keys()
        pre = td.clone()
        pre["advantage"] = torch.zeros(4, 10, 1)
        with pytest.raises(ValueError, match="penalize_reward"):
            loss(pre)

    def test_explicit_kl_surrogate_mode_sign(self):
        actor, ref = gaussian_actor(0), gaussian_actor(7, sigma=0.3)
        td = rollout(actor)
        td["advantage"] = torch.zeros(4, 10, 1)
        perturb(actor, 0.1)
        loss = TRPOLoss(actor, kl_to_reference_coef=0.5, reference_actor=ref, normalize_advantage=False)
        with torch.no_grad():
            new = actor.get_dist(td.clone())
            ratio = (new.log_prob(td["action"]) - td["action_log_prob"]).exp()
            kl_ref = kl_divergence(new, ref.get_dist(td.clone()))
        out = loss(td)
        torch.testing.assert_close(out["loss_kl_reference"].detach(), 0.5 * (ratio * kl_ref).mean())
        assert out["loss_kl_reference"] > 0  # a penalty: minimising it moves pi towards pi_ref

    def test_tanh_normal_actor_monte_carlo_kl(self):
        actor = tanh_actor()
        td = rollout(actor, b=8, t=25)
        loss = TRPOLoss(actor, samples_mc_kl=64)
        td["advantage"] = (td["action"] - td["loc"].tanh())[..., :1]
        perturb(actor, 0.05)
        torch.manual_seed(0)
        kl = loss.kl(td)
        with torch.no_grad():
            new = actor.get_dist(td.clone())
        exact = kl_divergence(Normal(new.root_dist.loc, new.root_dist.scale),
                              Normal(td["loc"], td["scale"])).sum(-1).mean()  # same bijection
        assert kl.requires_grad
        assert abs(float(kl) - float(exact)) < 0.1 * float(exact) + 1e-4
        out = loss(td)
        assert torch.isfinite(out["entropy"]) and torch.isfinite(out["loss_objective"])
        td = rollout(actor, b=8, t=25, seed=3)  # collected by the current policy (theta = theta_k)
        td["advantage"] = (td["action"] - td["loc"].tanh())[..., :1]
        opt = ConjugateGradientTrustRegion(loss, max_kl=0.01)
        info = trpo_step(loss, opt, td)
        assert bool(info["accepted"]) and float(info["kl"]) <= 0.01

    def test_compile(self):
        actor = gaussian_actor()
        td = rollout(actor)
        loss = self._loss(actor, critic_coeff=1.0, kl_to_reference_coef=0.2, reference_actor=gaussian_actor(3))
        perturb(actor, 0.05)
        eager = loss(td)
        compiled = torch.compile(loss, backend="aot_eager")(td)
        for key in ("loss_objective", "loss_critic", "kl", "ESS"):
            torch.testing.assert_close(compiled[key], eager[key], msg=key)


# ----------------------------------------------------------------------------- AWAC
class TestAWAC:
    def test_set_keys_action_with_critic_reading_it(self):
        # issue 16: set_keys(action="act") with a critic reading "act" failed with a NoneType TypeError
        td = transitions()
        ref = AWACLoss(make_gmm_actor(OBS, ACT, num_cells=(16,)), qvalue_net())
        loss = AWACLoss(make_gmm_actor(OBS, ACT, num_cells=(16,)), qvalue_net(action_key="act"))
        loss.set_keys(action="act")
        loss.load_state_dict(ref.state_dict())
        torch.manual_seed(0)
        a = ref(td)
        torch.manual_seed(0)
        b = loss(rename(td, {"action": "act"}))
        for key in ("loss_actor", "loss_qvalue", "weight_mean", "target_value_mean"):
            torch.testing.assert_close(a[key], b[key], msg=key)
        assert "act" in loss.in_keys and "action" not in loss.in_keys

    def test_set_keys_every_key_renamed(self):
        td = transitions()
        ref = AWACLoss(make_gmm_actor(OBS, ACT, num_cells=(16,)), qvalue_net())
        loss = AWACLoss(make_gmm_actor(OBS, ACT, num_cells=(16,)), qvalue_net(action_key="act"))
        loss.load_state_dict(ref.state_dict())
        loss.set_keys(action="act", reward="rew", done="fin", terminated="term")
        renamed = rename(td, {"action": "act", ("next", "reward"): ("next", "rew"), ("next", "done"): ("next", "fin"),
                              ("next", "terminated"): ("next", "term")})
        torch.manual_seed(1)
        a = ref(td)
        torch.manual_seed(1)
        b = loss(renamed)
        for key in ("loss_actor", "loss_qvalue", "target_value_mean"):
            torch.testing.assert_close(a[key], b[key], msg=key)

    def test_set_keys_action_not_read_by_critic_rejected(self):
        loss = AWACLoss(make_gmm_actor(OBS, ACT, num_cells=(16,)), qvalue_net())
        with pytest.raises(ValueError, match="'act'"):
            loss.set_keys(action="act")

    def test_set_keys_rejects_unknown(self):
        with pytest.raises(ValueError, match="not_a_key"):
            AWACLoss(make_gmm_actor(OBS, ACT, num_cells=(16,)), qvalue_net()).set_keys(not_a_key="x")

    def test_make_value_estimator_sets_gamma(self):
        td = transitions(batch=(32,))
        loss = AWACLoss(gaussian_actor(), qvalue_net(), num_value_samples=1)
        loss.make_value_estimator(ValueEstimators.TD0, gamma=0.5)
        torch.manual_seed(3)
        _, info = loss.qvalue_loss(td)
        torch.manual_seed(3)
        with torch.no_grad():
            a_next = loss.actor_network.get_dist(td["next"].select("observation").copy()).sample()
            q = loss._qvalues(td["next"].select("observation"), a_next, loss.target_qvalue_network_params).min(0).values
        y = td["next", "reward"].squeeze(-1) + 0.5 * (~td["next", "terminated"].squeeze(-1)).float() * q
        torch.testing.assert_close(info["target_value_mean"], y.mean())
        with pytest.raises(NotImplementedError, match="GAE"):
            loss.make_value_estimator(ValueEstimators.GAE)

    def test_coefficients_are_buffers_and_roundtrip(self):
        a = AWACLoss(gaussian_actor(0), qvalue_net(2), awac_lambda=0.5, max_weight=5.0)
        b = AWACLoss(gaussian_actor(1), qvalue_net(3))
        assert {"awac_lambda", "max_weight", "target_quantile"} <= set(dict(a.named_buffers()))
        td = transitions()
        b.load_state_dict(a.state_dict())
        assert float(b.awac_lambda) == 0.5 and float(b.max_weight) == 5.0
        torch.manual_seed(0)
        out_a = a(td)
        torch.manual_seed(0)
        out_b = b(td)
        for key in out_a.keys():
            torch.testing.assert_close(out_a[key], out_b[key])

    def test_grad_isolation_and_input_untouched(self):
        loss, td = AWACLoss(tanh_actor(), qvalue_net()), transitions()
        before = td.clone()
        out = loss(td)
        assert (td == before).all() and set(td.keys(True, True)) == set(before.keys(True, True))
        out["loss_actor"].backward()
        assert all(p.grad is None for p in leaves(loss.qvalue_network_params))
        assert all(p.grad is not None for p in leaves(loss.actor_network_params))
        loss.zero_grad(set_to_none=True)
        loss(td)["loss_qvalue"].backward()
        assert all(p.grad is None for p in leaves(loss.actor_network_params))
        assert all(p.grad is None for p in leaves(loss.target_qvalue_network_params))

    def test_out_keys_setter_and_dispatch(self):
        loss = AWACLoss(gaussian_actor(), qvalue_net())
        loss.out_keys = ["loss_actor", "loss_qvalue"]
        assert loss.out_keys == ["loss_actor", "loss_qvalue"]
        td = transitions()
        kwargs = {"_".join(k) if isinstance(k, tuple) else k: td.get(k) for k in loss.in_keys}
        torch.manual_seed(0)
        loss_actor, loss_qvalue = loss(**kwargs)[:2]
        assert loss_actor.shape == () and loss_qvalue.shape == ()

    def test_compile(self):
        loss, td = AWACLoss(gaussian_actor(), qvalue_net(), critic_kernel="loop"), transitions()
        torch.manual_seed(0)
        eager = loss(td)
        torch.manual_seed(0)
        compiled = torch.compile(loss, backend="aot_eager")(td)
        for key in ("loss_qvalue", "q_value_mean"):
            torch.testing.assert_close(compiled[key], eager[key], msg=key)
        assert torch.isfinite(compiled["loss_actor"])


# ----------------------------------------------------------------------------- weighted BC
class TestWeightedBC:
    def test_keys_and_set_keys(self):
        actor = gaussian_actor()
        td = transitions()
        td["u"] = torch.rand(8)
        loss = WeightedBCLoss(actor, weight_key="u")
        assert set(loss.in_keys) == {"observation", "action", "u"}
        assert set(loss(td).keys()) == set(loss.out_keys) == {"loss_weighted_bc", "mse"}
        renamed = rename(td, {"action": "expert", "u": "w"})
        other = WeightedBCLoss(actor)
        other.set_keys(action="expert", weight="w")
        torch.testing.assert_close(other(renamed)["loss_weighted_bc"], loss(td)["loss_weighted_bc"])
        with pytest.raises(ValueError, match="not_a_key"):
            loss.set_keys(not_a_key="x")
        with pytest.raises(ValueError, match="'mean'"):  # loc must be written by the actor
            loss.set_keys(loc="mean")

    def test_vmap_and_compile(self):
        actor = gaussian_actor()
        td = transitions(batch=(3, 4))
        loss = WeightedBCLoss(actor)
        vmapped = torch.vmap(lambda x: loss(x)["loss_weighted_bc"])(td)
        looped = torch.stack([loss(td[i])["loss_weighted_bc"] for i in range(3)])
        torch.testing.assert_close(vmapped, looped)
        compiled = torch.compile(loss, backend="aot_eager")(td)
        torch.testing.assert_close(compiled["loss_weighted_bc"], loss(td)["loss_weighted_bc"])


# ----------------------------------------------------------------------------- TorchRL pipeline
def test_trpo_in_a_torchrl_ppo_style_pipeline():
    """GymEnv -> Collector -> GAE -> replay buffer, TRPOLoss in place of ClipPPOLoss, TanhNormal actor."""
    from torchrl.collectors import Collector
    from torchrl.data import LazyTensorStorage, ReplayBuffer
    from torchrl.data.replay_buffers.samplers import SamplerWithoutReplacement
    from torchrl.envs import GymEnv
    from torchrl.objectives.value import GAE

    torch.manual_seed(0)
    env = GymEnv("Pendulum-v1")
    env.set_seed(0)
    obs_dim, act_spec = env.observation_spec["observation"].shape[-1], env.action_spec
    actor = ProbabilisticActor(
        TensorDictModule(nn.Sequential(MLP(in_features=obs_dim, out_features=2 * act_spec.shape[-1], num_cells=[32]),
                                       NormalParamExtractor()), in_keys=["observation"], out_keys=["loc", "scale"]),
        in_keys=["loc", "scale"], spec=act_spec, distribution_class=TanhNormal,
        distribution_kwargs={"low": act_spec.space.low, "high": act_spec.space.high}, return_log_prob=True,
    )
    critic = ValueOperator(MLP(in_features=obs_dim, out_features=1, num_cells=[32]), in_keys=["observation"])
    frames = 200
    collector = Collector(env, actor, frames_per_batch=frames, total_frames=3 * frames)
    advantage = GAE(gamma=0.99, lmbda=0.95, value_network=critic, average_gae=False)
    buffer = ReplayBuffer(storage=LazyTensorStorage(frames), sampler=SamplerWithoutReplacement(), batch_size=50)
    loss = TRPOLoss(actor, critic, critic_coeff=1.0)  # was: ClipPPOLoss(actor, critic)
    trust_region = ConjugateGradientTrustRegion(loss, max_kl=0.02)
    critic_optim = torch.optim.Adam(loss.critic_network_params.values(True, True), lr=1e-2)
    infos, critic_losses = [], []
    for data in collector:
        with torch.no_grad():
            advantage(data)
        info = trpo_step(loss, trust_region, data)  # natural-gradient step on the whole batch
        infos.append(info)
        buffer.extend(data.reshape(-1))
        epoch = []
        for batch in buffer:  # the critic regresses the GAE value target, PPO-style minibatches
            loss_critic = loss(batch)["loss_critic"]
            critic_optim.zero_grad()
            loss_critic.backward()
            critic_optim.step()
            epoch.append(float(loss_critic))
        critic_losses.append(sum(epoch) / len(epoch))
    collector.shutdown()
    assert len(infos) == 3
    assert any(bool(i["accepted"]) for i in infos)
    for i in infos:
        assert float(i["kl"]) <= 0.02 or not bool(i["accepted"])
    assert all(math.isfinite(c) for c in critic_losses)
