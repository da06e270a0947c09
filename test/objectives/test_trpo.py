from __future__ import annotations

import math
import time

import gymnasium as gym
import numpy as np
import pytest
import torch
from tensordict import TensorDict
from tensordict.nn import TensorDictModule
from torch import nn
from torchrl.envs.utils import ExplorationType, set_exploration_type
from torchrl.objectives.utils import ValueEstimators
from torchrl.objectives.value.functional import generalized_advantage_estimate

from torchrl_depeff.modules.actors import make_gaussian_actor
from torchrl_depeff.modules.baselines import LinearFeatureBaseline
from torchrl_depeff.objectives.trpo import TRPOLoss, trpo_step
from torchrl_depeff.optim.trust_region import ConjugateGradientTrustRegion


def _actor(obs=3, act=2, seed=0, **kw):
    torch.manual_seed(seed)
    kw.setdefault("num_cells", (16,))
    return make_gaussian_actor(obs, act, **kw)


def _critic(obs=3, seed=1):
    torch.manual_seed(seed)
    return TensorDictModule(nn.Sequential(nn.Linear(obs, 16), nn.Tanh(), nn.Linear(16, 1)),
                            in_keys=["observation"], out_keys=["state_value"])


def _batch(actor, n=32, obs=3, seed=0):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        td = actor(TensorDict(observation=torch.randn(n, obs, generator=g), batch_size=[n]))
    td["advantage"] = torch.randn(n, 1, generator=g)
    return td


def _rollout(actor, b=4, t=12, obs=3, seed=0):
    """[b, t] imaginary-like rollout with next entries for the value estimator."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        td = actor(TensorDict(observation=torch.randn(b, t, obs, generator=g), batch_size=[b, t]))
    td["next", "observation"] = torch.randn(b, t, obs, generator=g)
    td["next", "reward"] = torch.randn(b, t, 1, generator=g)
    term = torch.zeros(b, t, 1, dtype=torch.bool)
    term[0, 5] = True
    done = term.clone()
    done[:, -1] = True
    td["next", "terminated"] = term
    td["next", "done"] = done
    return td


def _perturbed(actor, scale=0.3, seed=5):
    torch.manual_seed(seed)
    with torch.no_grad():
        for p in actor.parameters():
            p.add_(scale * torch.randn_like(p))


def _closed_form_kl(mu_p, s_p, mu_q, s_q):  # KL(p || q), summed over action dims
    return (torch.log(s_q / s_p) + (s_p**2 + (mu_p - mu_q) ** 2) / (2 * s_q**2) - 0.5).sum(-1)


def test_kl_direction_is_new_given_old_closed_form():
    actor = _actor(learn_sigma=True, sigma=0.5)
    td = _batch(actor)
    loss = TRPOLoss(actor)
    _perturbed(actor)
    with torch.no_grad():
        new_loc, new_scale = actor.module[0].module(td["observation"])
    expected = _closed_form_kl(new_loc, new_scale, td["loc"], td["scale"]).mean()
    reverse = _closed_form_kl(td["loc"], td["scale"], new_loc, new_scale).mean()
    got = loss.kl(td)
    assert got.requires_grad
    torch.testing.assert_close(got.detach(), expected, rtol=1e-5, atol=1e-6)
    assert not torch.allclose(got.detach(), reverse, rtol=1e-3)
    torch.testing.assert_close(loss(td)["kl"], expected, rtol=1e-5, atol=1e-6)


def test_surrogate_value_and_sign():
    actor = _actor()
    td = _batch(actor)
    loss = TRPOLoss(actor, normalize_advantage=False)
    _perturbed(actor, 0.1)
    with torch.no_grad():
        loc, scale = actor.module[0].module(td["observation"])
    lp = torch.distributions.Normal(loc, scale).log_prob(td["action"]).sum(-1)
    ratio = (lp - td["action_log_prob"]).exp()
    expected = -(ratio * td["advantage"].squeeze(-1)).mean()
    out = loss(td)
    torch.testing.assert_close(out["loss_objective"].detach(), expected, rtol=1e-5, atol=1e-6)
    ess = ratio.sum() ** 2 / ratio.pow(2).sum() / ratio.numel()
    torch.testing.assert_close(out["ess"], ess, rtol=1e-5, atol=1e-6)
    # normalised advantages: mean 0, std 1
    out_n = TRPOLoss(actor)(td)
    a = td["advantage"].squeeze(-1)
    a = (a - a.mean()) / (a.std() + 1e-8)
    torch.testing.assert_close(out_n["loss_objective"].detach(), -(ratio * a).mean(), rtol=1e-5, atol=1e-6)


def test_gae_matches_functional():
    actor, critic = _actor(), _critic()
    td = _rollout(actor)
    loss = TRPOLoss(actor, critic)
    loss.make_value_estimator(ValueEstimators.GAE, gamma=0.9, lmbda=0.8)
    out = loss.compute_advantage(td)
    with torch.no_grad():
        v = critic.module(td["observation"])
        nv = critic.module(td["next", "observation"])
    adv, target = generalized_advantage_estimate(
        0.9, 0.8, v, nv, td["next", "reward"], td["next", "done"], td["next", "terminated"], time_dim=-2)
    torch.testing.assert_close(out["advantage"], adv, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(out["value_target"], target, rtol=1e-5, atol=1e-6)
    assert "advantage" not in td.keys()
    # default estimator is GAE with BREMEN's gamma / lambda
    loss2 = TRPOLoss(actor, critic)
    loss2.make_value_estimator()
    assert loss2.value_type == ValueEstimators.GAE
    out2 = loss2.compute_advantage(td)
    adv2, _ = generalized_advantage_estimate(
        0.99, 0.95, v, nv, td["next", "reward"], td["next", "done"], td["next", "terminated"], time_dim=-2)
    torch.testing.assert_close(out2["advantage"], adv2, rtol=1e-5, atol=1e-6)


def test_gradient_reaches_actor_not_critic():
    actor, critic = _actor(), _critic()
    td = _rollout(actor)
    loss = TRPOLoss(actor, critic)
    loss.make_value_estimator(ValueEstimators.GAE, gamma=0.9, lmbda=0.8)
    _perturbed(actor, 0.05)
    loss(td)["loss_objective"].backward()
    grads = [p.grad for p in loss.actor_network_params.values(True, True) if p.requires_grad]
    assert len(grads) == 4
    assert all(g is not None and g.abs().sum() > 0 for g in grads)
    assert all(p.grad is None for p in critic.parameters())


def test_set_keys_rejects_unknown_and_renames():
    actor = _actor()
    loss = TRPOLoss(actor)
    with pytest.raises(ValueError, match="not_a_key"):
        loss.set_keys(not_a_key="x")
    td = _batch(actor)
    td.rename_key_("advantage", "adv")
    with pytest.raises(KeyError, match="advantage"):
        loss(td)
    loss.set_keys(advantage="adv")
    assert "loss_objective" in loss(td).keys()


@pytest.mark.parametrize("reduction,shape", [("none", (32,)), ("mean", ()), ("sum", ())])
def test_reductions(reduction, shape):
    actor = _actor()
    td = _batch(actor)
    out = TRPOLoss(actor, reduction=reduction, entropy_coeff=0.01)(td)
    with pytest.warns(FutureWarning, match="entropy_coeff"):  # the former keyword still works
        old = TRPOLoss(actor, reduction=reduction, entropy_coef=0.01)(td)
    torch.testing.assert_close(old["loss_entropy"], out["loss_entropy"])
    assert out["loss_objective"].shape == shape
    assert out["loss_entropy"].shape == shape
    if reduction == "sum":
        mean = TRPOLoss(actor, reduction="mean")(td)["loss_objective"]
        torch.testing.assert_close(out["loss_objective"], mean * 32)


def test_state_dict_round_trip():
    actor = _actor(learn_sigma=True, seed=0)
    td = _batch(actor)
    _perturbed(actor)
    loss = TRPOLoss(actor)
    other = TRPOLoss(_actor(learn_sigma=True, seed=1))
    assert not torch.allclose(loss(td)["loss_objective"], other(td)["loss_objective"])
    other.load_state_dict(loss.state_dict())
    a, b = loss(td), other(td)
    for key in a.keys():
        torch.testing.assert_close(a[key], b[key])


def test_input_not_mutated():
    actor, critic = _actor(), _critic()
    td = _rollout(actor)
    _perturbed(actor, 0.2)
    before = td.clone()
    loss = TRPOLoss(actor, critic)
    loss.make_value_estimator(ValueEstimators.GAE, gamma=0.9, lmbda=0.8)
    loss(td)
    loss.kl(td)
    assert set(td.keys(True, True)) == set(before.keys(True, True))
    assert (td == before).all()


def test_validation_errors():
    # validation lives in check_inputs (called once per step by trpo_step), not in forward
    actor = _actor()
    td = _batch(actor)
    loss = TRPOLoss(actor)
    opt = ConjugateGradientTrustRegion(loss)
    bad = td.clone()
    bad["advantage"][3] = float("nan")
    with pytest.raises(ValueError, match="advantage"):
        loss.check_inputs(bad)
    with pytest.raises(ValueError, match="advantage"):
        trpo_step(loss, opt, bad)
    bad = td.clone()
    bad["action_log_prob"][0] = float("inf")
    with pytest.raises(ValueError, match="action_log_prob"):
        loss.check_inputs(bad)
    with pytest.raises(KeyError, match="scale"):
        loss(td.exclude("scale"))
    with pytest.raises(KeyError, match="scale"):
        loss.check_inputs(td.exclude("scale"))
    with pytest.raises(KeyError, match="advantage"):
        loss(td.exclude("advantage"))
    with pytest.raises(TypeError, match="get_dist"):
        TRPOLoss(TensorDictModule(nn.Linear(3, 2), in_keys=["observation"], out_keys=["action"]))
    with pytest.raises(ValueError, match="reference_actor"):
        TRPOLoss(actor, kl_to_reference_coef=0.1)
    with pytest.raises(ValueError, match="reduction"):
        TRPOLoss(actor, reduction="max")


def test_explicit_kl_reference_ablation():
    bc = _actor(seed=3, learn_sigma=True, sigma=0.4)
    actor = _actor(seed=0, learn_sigma=True, sigma=0.5)
    td = _batch(actor)
    coef = 0.7
    loss = TRPOLoss(actor, kl_to_reference_coef=coef, reference_actor=bc, normalize_advantage=False)
    _perturbed(actor, 0.1)
    with torch.no_grad():
        loc, scale = actor.module[0].module(td["observation"])
        rloc, rscale = bc.module[0].module(td["observation"])
    lp = torch.distributions.Normal(loc, scale).log_prob(td["action"]).sum(-1)
    ratio = (lp - td["action_log_prob"]).exp()
    expected = coef * (ratio * _closed_form_kl(loc, scale, rloc, rscale)).mean()
    out = loss(td)
    torch.testing.assert_close(out["loss_kl_reference"].detach(), expected, rtol=1e-5, atol=1e-6)
    # frozen: later changes of the BC actor do not move the reference, no grads into it
    _perturbed(bc, 1.0, seed=9)
    torch.testing.assert_close(loss(td)["loss_kl_reference"].detach(), expected, rtol=1e-5, atol=1e-6)
    out["loss_kl_reference"].backward()
    assert all(p.grad is None for p in loss.reference_actor.parameters())
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in loss.actor_network_params.values(True, True))
    # moving towards the reference lowers the penalty
    assert "loss_kl_reference" not in TRPOLoss(actor)(td).keys()


def test_trpo_step_respects_delta_and_improves():
    actor = _actor(learn_sigma=True, sigma=0.5)
    td = _batch(actor, n=256)
    td["advantage"] = (td["action"] - td["loc"])[:, :1]  # rewards moving the mean up in dim 0
    loss = TRPOLoss(actor)
    before = loss(td)["loss_objective"].detach()
    loc_before = td["loc"][:, 0].mean()
    opt = ConjugateGradientTrustRegion(loss.actor_network_params, max_kl=0.01)
    info = trpo_step(loss, opt, td)
    assert bool(info["accepted"])
    assert float(loss.kl(td).detach()) <= 0.01
    assert loss(td)["loss_objective"].detach() < before
    with torch.no_grad():
        assert actor.module[0].module(td["observation"])[0][:, 0].mean() > loc_before
    # step on the user's actor (parameters are shared with the loss)
    assert not torch.allclose(actor.module[0].module(td["observation"])[0], td["loc"])


# ----------------------------------------------------------------------- learning test
def _collect(envs, actor, horizon, seed):
    n = len(envs)
    obs_dim = envs[0].observation_space.shape[0]
    obs = np.stack([e.reset(seed=seed + i)[0] for i, e in enumerate(envs)])
    steps = np.zeros(n, dtype=np.int64)
    rows = {k: [] for k in ("obs", "step", "act", "lp", "loc", "scale", "nobs", "nstep", "rew", "term")}
    ep_returns, running = [], np.zeros(n)
    for _ in range(horizon):
        with torch.no_grad():
            td = actor(TensorDict(observation=torch.as_tensor(obs, dtype=torch.float32), batch_size=[n]))
        act = td["action"].numpy()
        nobs, rew, term = np.empty_like(obs), np.empty(n), np.zeros(n, dtype=bool)
        for i, e in enumerate(envs):
            o, r, te, tr, _ = e.step(np.clip(act[i], -3, 3))
            nobs[i], rew[i], term[i] = o, r, te
        running += rew
        rows["obs"].append(obs.copy()); rows["step"].append(steps.copy())
        rows["act"].append(act); rows["lp"].append(td["action_log_prob"].numpy())
        rows["loc"].append(td["loc"].numpy()); rows["scale"].append(td["scale"].numpy())
        rows["nobs"].append(nobs.copy()); rows["nstep"].append(steps + 1)
        rows["rew"].append(rew.copy()); rows["term"].append(term.copy())
        obs, steps = nobs, steps + 1
        for i in np.flatnonzero(term):
            ep_returns.append(running[i]); running[i] = 0
            obs[i] = envs[i].reset()[0]; steps[i] = 0
    t = lambda k, dt=torch.float32: torch.as_tensor(np.stack(rows[k], 1), dtype=dt)  # noqa: E731
    td = TensorDict(observation=t("obs"), step_count=t("step").unsqueeze(-1), action=t("act"),
                    action_log_prob=t("lp"), loc=t("loc"), scale=t("scale"), batch_size=[n, horizon])
    term = t("term", torch.bool).unsqueeze(-1)
    done = term.clone(); done[:, -1] = True
    td["next"] = TensorDict(observation=t("nobs"), step_count=t("nstep").unsqueeze(-1),
                            reward=t("rew").unsqueeze(-1), terminated=term, done=done,
                            batch_size=[n, horizon])
    return td, ep_returns


def _evaluate(env, actor, episodes=3, max_steps=200):
    total = 0.0
    for ep in range(episodes):
        obs, _ = env.reset(seed=1000 + ep)
        for _ in range(max_steps):
            with torch.no_grad():
                loc = actor.module[0].module(torch.as_tensor(obs, dtype=torch.float32))[0]
            obs, r, term, trunc, _ = env.step(np.clip(loc.numpy(), -3, 3))
            total += r
            if term or trunc:
                break
    return total / episodes


def test_trpo_learns_inverted_pendulum():
    torch.set_num_threads(1)
    start = time.time()
    envs = [gym.make("InvertedPendulum-v5") for _ in range(8)]
    eval_env = gym.make("InvertedPendulum-v5")
    actor = _actor(obs=4, act=1, seed=0, num_cells=(32, 32), learn_sigma=True, sigma=0.5)
    baseline = LinearFeatureBaseline(4)
    loss = TRPOLoss(actor, baseline)
    loss.make_value_estimator(ValueEstimators.GAE, gamma=0.99, lmbda=0.95)
    opt = ConjugateGradientTrustRegion(loss.actor_network_params, max_kl=0.05)
    initial = _evaluate(eval_env, actor)
    accepted = 0
    for it in range(12):
        td, _ = _collect(envs, actor, 100, seed=10 * it)
        baseline.fit(td, gamma=0.99)
        info = trpo_step(loss, opt, td)
        accepted += int(info["accepted"])
        assert float(info["kl"]) <= 0.05 or not bool(info["accepted"])
    final = _evaluate(eval_env, actor)
    assert accepted >= 8
    assert final > 3 * initial and final >= 50, (initial, final)
    assert time.time() - start < 60
