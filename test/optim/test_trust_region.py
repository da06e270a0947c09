from __future__ import annotations

import math

import pytest
import torch
from tensordict import TensorDict
from torch.distributions import Normal, kl_divergence
from torch.func import functional_call

from torchrl_depeff.modules.actors import GaussianPolicyNet
from torchrl_depeff.optim.trust_region import ConjugateGradientTrustRegion, conjugate_gradient


def _spd(n: int, gen: torch.Generator) -> torch.Tensor:
    m = torch.randn(n, n, generator=gen, dtype=torch.float64)
    return m @ m.T + n * torch.eye(n, dtype=torch.float64)


@pytest.mark.parametrize("seed", range(5))
def test_cg_matches_solve(seed):
    gen = torch.Generator().manual_seed(seed)
    a = _spd(12, gen)
    b = torch.randn(12, generator=gen, dtype=torch.float64)
    x, res = conjugate_gradient(lambda v: a @ v, b, iters=50, residual_tol=1e-20)
    torch.testing.assert_close(x, torch.linalg.solve(a, b), rtol=1e-8, atol=1e-10)
    assert res < 1e-16


def test_cg_rejects_bad_iters():
    with pytest.raises(ValueError, match="iters"):
        conjugate_gradient(lambda v: v, torch.ones(2), iters=0)


@pytest.mark.parametrize("kwargs,match", [({"max_kl": 0.0}, "max_kl"), ({"max_kl": -1.0}, "max_kl"),
                                          ({"damping": -0.1}, "damping")])
def test_bad_hyperparameters(kwargs, match):
    with pytest.raises(ValueError, match=match):
        ConjugateGradientTrustRegion([torch.nn.Parameter(torch.zeros(1))], **kwargs)


def _tiny_policy(seed=0, learn_sigma=True):
    torch.manual_seed(seed)
    return GaussianPolicyNet(3, 2, num_cells=(4,), learn_sigma=learn_sigma, sigma=0.5).double()


def test_fvp_matches_explicit_hessian():
    net = _tiny_policy()
    obs = torch.randn(7, 3, dtype=torch.float64)
    with torch.no_grad():
        old_loc, old_scale = net(obs)
    names = [n for n, _ in net.named_parameters()]
    shapes = [p.shape for _, p in net.named_parameters()]
    flat0 = torch.cat([p.detach().reshape(-1) for p in net.parameters()])

    def mean_kl_flat(flat):
        params, off = {}, 0
        for n, s in zip(names, shapes):
            params[n] = flat[off:off + s.numel()].view(s)
            off += s.numel()
        loc, scale = functional_call(net, params, (obs,))
        return kl_divergence(Normal(old_loc, old_scale), Normal(loc, scale)).sum(-1).mean()

    hess = torch.autograd.functional.hessian(mean_kl_flat, flat0)

    def kl_fn():
        loc, scale = net(obs)
        return kl_divergence(Normal(old_loc, old_scale), Normal(loc, scale)).sum(-1).mean()

    damping = 0.1
    opt = ConjugateGradientTrustRegion(net.parameters(), damping=damping)
    fvp = opt.fisher_vector_product(kl_fn)
    for seed in range(3):
        v = torch.randn(flat0.numel(), generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
        torch.testing.assert_close(fvp(v), hess @ v + damping * v, rtol=1e-7, atol=1e-9)


def test_quadratic_step_equals_natural_gradient():
    gen = torch.Generator().manual_seed(3)
    n = 6
    a = _spd(n, gen)
    g = torch.randn(n, generator=gen, dtype=torch.float64)
    w0 = torch.randn(n, generator=gen, dtype=torch.float64)
    w = torch.nn.Parameter(w0.clone())
    delta = 0.02
    opt = ConjugateGradientTrustRegion([w], max_kl=delta, damping=0.0, cg_iters=50, check_kl=False)
    info = opt.step(lambda: g.dot(w), lambda: 0.5 * (w - w0.detach()) @ a @ (w - w0.detach()))
    nat = -torch.linalg.solve(a, g)
    expected = w0 + math.sqrt(2 * delta / float(nat @ a @ nat)) * nat
    assert bool(info["accepted"])
    assert float(info["step_fraction"]) == 1.0
    torch.testing.assert_close(w.detach(), expected, rtol=1e-8, atol=1e-10)
    # the step lands on the trust-region boundary
    assert abs(float(info["kl"]) - delta) < 1e-6
    torch.testing.assert_close(info["improvement"], info["expected_improvement"], rtol=1e-5, atol=1e-7)
    # the step decreases the loss (sign check)
    assert g.dot(w.detach()) < g.dot(w0)


def test_line_search_rejects_kl_violation_bit_identical():
    torch.manual_seed(0)
    w = torch.nn.Parameter(torch.randn(5))
    w0 = w.detach().clone()
    saved = w.detach().clone()
    c = torch.randn(5)

    def kl_fn():  # second order is 0.5||d||^2 but quartic term explodes the true KL
        d = w - w0
        return 0.5 * d.pow(2).sum() + 1e4 * d.pow(2).sum() ** 2

    opt = ConjugateGradientTrustRegion([w], max_kl=0.01, damping=0.0, backtrack_iters=3)
    info = opt.step(lambda: c.dot(w), kl_fn)
    assert not bool(info["accepted"])
    assert float(info["kl"]) > 0.01
    assert float(info["step_fraction"]) == 0.0
    assert torch.equal(w.detach(), saved)
    # the same problem with check_kl=False (BREMEN reference code) accepts the step
    opt2 = ConjugateGradientTrustRegion([w], max_kl=0.01, damping=0.0, backtrack_iters=3, check_kl=False)
    assert bool(opt2.step(lambda: c.dot(w), kl_fn)["accepted"])
    assert not torch.equal(w.detach(), saved)


def test_line_search_rejects_worse_loss():
    w = torch.nn.Parameter(torch.ones(3))
    saved = w.detach().clone()
    # the linear model says "decrease", the true loss increases everywhere away from w=1
    loss_fn = lambda: w.sum() + 1e3 * (w - 1).pow(2).sum()  # noqa: E731
    opt = ConjugateGradientTrustRegion([w], max_kl=0.5, damping=0.0, backtrack_iters=2)
    info = opt.step(loss_fn, lambda: 0.5 * (w - saved).pow(2).sum())
    assert not bool(info["accepted"])
    assert torch.equal(w.detach(), saved)


def test_nan_gradient_leaves_parameters_unchanged():
    w = torch.nn.Parameter(torch.randn(4))
    saved = w.detach().clone()
    opt = ConjugateGradientTrustRegion([w])
    info = opt.step(lambda: (w * torch.tensor([1.0, float("nan"), 0.0, 1.0])).sum(),
                    lambda: 0.5 * (w - saved).pow(2).sum())
    assert not bool(info["accepted"])
    assert torch.equal(w.detach(), saved)
    info = opt.step(lambda: (w * float("inf")).sum(), lambda: 0.5 * (w - saved).pow(2).sum())
    assert not bool(info["accepted"])
    assert torch.equal(w.detach(), saved)


def test_tensordict_params():
    net = _tiny_policy(learn_sigma=False).float()
    params = TensorDict.from_module(net)
    obs = torch.randn(16, 3)
    with torch.no_grad():
        old_loc, old_scale = net(obs)
    target = torch.randn(16, 2)
    before = [p.detach().clone() for p in net.parameters()]
    opt = ConjugateGradientTrustRegion(params, max_kl=0.01)

    def kl_fn():
        loc, scale = net(obs)
        return kl_divergence(Normal(old_loc, old_scale), Normal(loc, scale)).sum(-1).mean()

    info = opt.step(lambda: (net(obs)[0] - target).pow(2).mean(), kl_fn)
    assert bool(info["accepted"])
    assert any(not torch.equal(b, p) for b, p in zip(before, net.parameters()))
    assert float(info["kl"]) <= 0.01
    # the log-std buffer is not a trainable parameter and stays put
    assert torch.allclose(net.log_std, torch.full((2,), math.log(0.5)))


def test_property_never_accepts_kl_above_delta():
    gen = torch.Generator().manual_seed(0)
    accepted = 0
    for trial in range(200):
        torch.manual_seed(trial)
        net = GaussianPolicyNet(2, 1, num_cells=(4,), learn_sigma=True, sigma=0.3)
        obs = torch.randn(16, 2, generator=gen) * 2
        act = torch.randn(16, 1, generator=gen)
        adv = torch.randn(16, generator=gen)
        with torch.no_grad():
            old_loc, old_scale = net(obs)
            old_lp = Normal(old_loc, old_scale).log_prob(act).sum(-1)
        delta = float(10 ** torch.empty(1).uniform_(-4, -0.5, generator=gen))
        damping = float(torch.empty(1).uniform_(0.0, 0.2, generator=gen))

        def loss_fn():
            loc, scale = net(obs)
            return -((Normal(loc, scale).log_prob(act).sum(-1) - old_lp).exp() * adv).mean()

        def kl_fn():
            loc, scale = net(obs)
            return kl_divergence(Normal(old_loc, old_scale), Normal(loc, scale)).sum(-1).mean()

        opt = ConjugateGradientTrustRegion(net.parameters(), max_kl=delta, damping=damping, cg_iters=5)
        info = opt.step(loss_fn, kl_fn)
        with torch.no_grad():
            true_kl = float(kl_fn())
        if bool(info["accepted"]):
            accepted += 1
            assert true_kl <= delta, (trial, true_kl, delta)
            assert float(info["improvement"]) > 0
        else:
            assert true_kl == 0.0
    assert accepted > 150  # the search is not vacuous


def test_rejection_is_logged_at_warning():
    import logging

    from torchrl._utils import logger as torchrl_logger

    records = []

    class _Capture(logging.Handler):
        def emit(self, record):
            records.append(record)

    handler = _Capture(level=logging.WARNING)
    torchrl_logger.addHandler(handler)
    try:
        w = torch.nn.Parameter(torch.ones(2))
        ConjugateGradientTrustRegion([w]).step(lambda: (w * float("nan")).sum(), lambda: w.pow(2).sum())
    finally:
        torchrl_logger.removeHandler(handler)
    assert any(r.levelno == logging.WARNING and "rejected" in r.getMessage() for r in records)
