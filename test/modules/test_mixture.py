"""Tests for the tanh Gaussian-mixture distribution and MB2PO's GMM actor."""
from __future__ import annotations

import math

import pytest
import torch
from tensordict import TensorDict
from tensordict.nn import InteractionType, set_interaction_type
from torch import distributions as D

from torchrl_depeff.modules.mixture import GMMPolicyNet, TanhGaussianMixture, make_gmm_actor


def _params(batch=(4,), k=3, d=2, dtype=torch.float64, requires_grad=False):
    torch.manual_seed(0)
    logits = torch.randn(*batch, k, dtype=dtype)
    loc = torch.randn(*batch, k, d, dtype=dtype)
    scale = torch.rand(*batch, k, d, dtype=dtype) + 0.2
    if requires_grad:
        for t in (logits, loc, scale):
            t.requires_grad_(True)
    return logits, loc, scale


def _reference(logits, loc, scale):
    base = D.Independent(D.Normal(loc, scale), 1)
    squashed = D.TransformedDistribution(base, [D.TanhTransform()])
    return D.MixtureSameFamily(D.Categorical(logits=logits), squashed)


class TestTanhGaussianMixture:
    def test_log_prob_matches_mixture_same_family(self):
        logits, loc, scale = _params(batch=(5, 4))
        dist = TanhGaussianMixture(logits, loc, scale)
        a = torch.rand(7, 5, 4, 2, dtype=torch.float64) * 1.8 - 0.9
        torch.testing.assert_close(dist.log_prob(a), _reference(logits, loc, scale).log_prob(a))

    def test_log_prob_by_hand_single_component(self):
        # K=1, d=1: log N(atanh a; mu, s) - log(1 - a^2)
        dist = TanhGaussianMixture(
            torch.zeros(1, 1, dtype=torch.float64),
            torch.full((1, 1, 1), 0.3, dtype=torch.float64),
            torch.full((1, 1, 1), 0.5, dtype=torch.float64),
        )
        a = torch.tensor([[0.6]], dtype=torch.float64)
        u = math.atanh(0.6)
        expected = (
            -0.5 * ((u - 0.3) / 0.5) ** 2 - math.log(0.5) - 0.5 * math.log(2 * math.pi)
            - math.log(1 - 0.36)
        )
        assert dist.log_prob(a).item() == pytest.approx(expected, rel=1e-10)

    def test_log_prob_direct_mixture_formula_five_components(self):
        # MB2PO's 5-component actor: log sum_k w_k prod_j N(atanh a_j; mu_kj, s_kj) / (1 - a_j^2),
        # written out with scalar math (no torch.distributions) for every row
        logits, loc, scale = _params(batch=(6,), k=5, d=3)
        a = torch.rand(6, 3, dtype=torch.float64) * 1.8 - 0.9
        lp = TanhGaussianMixture(logits, loc, scale).log_prob(a)
        for b in range(6):
            w = [math.exp(x) for x in logits[b].tolist()]
            w = [x / sum(w) for x in w]
            density = 0.0
            for k in range(5):
                comp = w[k]
                for j in range(3):
                    u, mu, s = math.atanh(a[b, j].item()), loc[b, k, j].item(), scale[b, k, j].item()
                    comp *= math.exp(-0.5 * ((u - mu) / s) ** 2) / (s * math.sqrt(2 * math.pi))
                    comp /= 1 - a[b, j].item() ** 2
                density += comp
            assert lp[b].item() == pytest.approx(math.log(density), rel=1e-9)

    def test_log_prob_mixture_weights_matter(self):
        # two well separated components: log-prob near component 0 changes with its weight
        loc = torch.tensor([[[-1.0], [1.0]]], dtype=torch.float64)
        scale = torch.full_like(loc, 0.1)
        a = torch.tanh(torch.tensor([[-1.0]], dtype=torch.float64))
        lp_heavy = TanhGaussianMixture(torch.tensor([[2.0, 0.0]], dtype=torch.float64), loc, scale).log_prob(a)
        lp_light = TanhGaussianMixture(torch.tensor([[0.0, 2.0]], dtype=torch.float64), loc, scale).log_prob(a)
        w_heavy, w_light = torch.softmax(torch.tensor([2.0, 0.0]), 0)[0], torch.softmax(torch.tensor([0.0, 2.0]), 0)[0]
        assert (lp_heavy - lp_light).item() == pytest.approx(math.log(w_heavy / w_light), abs=1e-6)

    def test_log_prob_finite_at_boundary(self):
        logits, loc, scale = _params(dtype=torch.float32)
        dist = TanhGaussianMixture(logits, loc, scale)
        a = torch.tensor([[1.0, -1.0], [0.9999999, -0.9999999], [1.0, 0.0], [0.0, 0.0]])
        lp = dist.log_prob(a)
        assert torch.isfinite(lp).all()

    def test_samples_in_open_interval_and_shapes(self):
        logits, loc, scale = _params(batch=(3,), k=5, d=4, dtype=torch.float32)
        dist = TanhGaussianMixture(logits, loc * 3, scale)
        s = dist.sample((1000,))
        assert s.shape == (1000, 3, 4)
        assert (s.abs() < 1).all()
        assert torch.isfinite(dist.log_prob(s)).all()

    def test_sample_distribution_matches_reference_mean(self):
        logits, loc, scale = _params(batch=(2,), k=3, d=2)
        dist = TanhGaussianMixture(logits, loc, scale)
        torch.manual_seed(1)
        ours = dist.sample((20000,)).mean(0)
        ref = _reference(logits, loc, scale).sample((20000,)).mean(0)
        torch.testing.assert_close(ours, ref, atol=0.03, rtol=0)

    def test_rsample_gradients_reach_loc_and_scale_not_logits(self):
        logits, loc, scale = _params(requires_grad=True)
        dist = TanhGaussianMixture(logits, loc, scale)
        dist.rsample((16,)).sum().backward()
        assert loc.grad is not None and loc.grad.abs().sum() > 0
        assert scale.grad is not None and scale.grad.abs().sum() > 0
        assert logits.grad is None

    def test_log_prob_gradients_reach_all_params(self):
        logits, loc, scale = _params(requires_grad=True)
        dist = TanhGaussianMixture(logits, loc, scale)
        dist.log_prob(torch.zeros(4, 2, dtype=torch.float64)).sum().backward()
        for t in (logits, loc, scale):
            assert t.grad.abs().sum() > 0

    def test_deterministic_sample_is_tanh_of_most_likely_mean(self):
        logits = torch.tensor([[0.0, 3.0, 1.0]])
        loc = torch.tensor([[[0.1, 0.2], [0.5, -0.7], [2.0, 2.0]]])
        dist = TanhGaussianMixture(logits, loc, torch.ones_like(loc))
        torch.testing.assert_close(dist.deterministic_sample, torch.tanh(loc[:, 1]))
        torch.testing.assert_close(dist.mode, dist.deterministic_sample)

    def test_bad_shapes_raise(self):
        with pytest.raises(ValueError, match="logits"):
            TanhGaussianMixture(torch.zeros(4, 2), torch.zeros(4, 3, 2), torch.ones(4, 3, 2))
        with pytest.raises(ValueError, match="scale"):
            TanhGaussianMixture(torch.zeros(4, 3), torch.zeros(4, 3, 2), torch.ones(4, 3, 1))


class TestGMMActor:
    def test_actor_outputs_and_log_prob_consistent(self):
        actor = make_gmm_actor(3, 2, num_components=5, num_cells=(16, 16))
        td = actor(TensorDict({"observation": torch.randn(6, 3)}, batch_size=[6]))
        assert td["logits"].shape == (6, 5)
        assert td["loc"].shape == td["scale"].shape == (6, 5, 2)
        assert td["action"].shape == (6, 2) and (td["action"].abs() < 1).all()
        assert (td["scale"] > 0).all()
        ref = _reference(td["logits"].double(), td["loc"].double(), td["scale"].double())
        torch.testing.assert_close(
            td["action_log_prob"].double(), ref.log_prob(td["action"].double()), atol=1e-3, rtol=1e-4
        )

    def test_default_architecture_follows_mb2po(self):
        net = GMMPolicyNet(4, 2)
        linears = [m for m in net.mlp if isinstance(m, torch.nn.Linear)]
        assert [m.out_features for m in linears[:-1]] == [256, 256, 256, 256]
        assert linears[-1].out_features == 5 * (1 + 2 * 2)
        assert isinstance(net.mlp[1], torch.nn.ReLU)

    def test_deterministic_interaction(self):
        actor = make_gmm_actor(3, 2, num_cells=(16,))
        obs = TensorDict({"observation": torch.randn(6, 3)}, batch_size=[6])
        with set_interaction_type(InteractionType.DETERMINISTIC):
            a1 = actor(obs.clone())["action"]
            a2 = actor(obs.clone())["action"]
        torch.testing.assert_close(a1, a2)
        dist = actor.get_dist(obs.clone())
        torch.testing.assert_close(a1, dist.deterministic_sample)

    def test_log_std_clamped(self):
        net = GMMPolicyNet(3, 2, num_cells=(8,))
        with torch.no_grad():
            net.mlp[-1].bias.fill_(100.0)
        _, _, scale = net(torch.zeros(1, 3))
        torch.testing.assert_close(scale, torch.full_like(scale, math.exp(2.0)))

    def test_bad_args_raise(self):
        with pytest.raises(ValueError, match="num_components"):
            GMMPolicyNet(3, 2, num_components=0)
        with pytest.raises(ValueError, match="action_dim"):
            GMMPolicyNet(3, 0)
