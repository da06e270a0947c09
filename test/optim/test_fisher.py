"""Closed-form Fisher-vector products against the double backward of the KL (values and steps)."""
from __future__ import annotations

import pytest
import torch
from tensordict import TensorDict
from tensordict.nn import NormalParamExtractor, TensorDictModule
from torch import nn
from torch.distributions import kl_divergence, Normal
from torchrl.envs.utils import ExplorationType, set_exploration_type
from torchrl.modules import IndependentNormal, MLP, ProbabilisticActor, TanhNormal

from torchrl_depeff.modules.actors import make_gaussian_actor
from torchrl_depeff.objectives import trpo_step, TRPOLoss
from torchrl_depeff.optim import ConjugateGradientTrustRegion
from torchrl_depeff.optim.fisher import double_backward_fvp, gauss_newton_fvp, mlp_gaussian_fvp
from torchrl_depeff.optim.trust_region import _cg

OBS, ACT = 4, 3


def _gaussian(seed=0, **kw):
    torch.manual_seed(seed)
    kw.setdefault("num_cells", (8, 8))
    return make_gaussian_actor(OBS, ACT, **kw).double()


def _extractor_actor(seed=0, dist=IndependentNormal):
    """TorchRL recipe with a state-dependent scale (NormalParamExtractor)."""
    torch.manual_seed(seed)
    net = nn.Sequential(MLP(in_features=OBS, out_features=2 * ACT, num_cells=[8]), NormalParamExtractor())
    kwargs = {"low": -torch.ones(ACT), "high": torch.ones(ACT)} if dist is TanhNormal else {}
    return ProbabilisticActor(TensorDictModule(net, ["observation"], ["loc", "scale"]), in_keys=["loc", "scale"],
                              distribution_class=dist, distribution_kwargs=kwargs, return_log_prob=True).double()


def _batch(actor, n=16, seed=0):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad(), set_exploration_type(ExplorationType.RANDOM):
        td = actor(TensorDict(observation=torch.randn(n, OBS, generator=g, dtype=torch.float64), batch_size=[n]))
    td["advantage"] = torch.randn(n, 1, generator=g, dtype=torch.float64)
    return td


def _vectors(params, k=3):
    n = sum(p.numel() for p in params)
    return [torch.randn(n, generator=torch.Generator().manual_seed(s), dtype=torch.float64) for s in range(k)]


def _base_kl(loss, td):
    """Closed-form KL of the pre-tanh Gaussians: the exact KL of two TanhNormals (same bijection)."""
    new = loss._new_dist(td.copy())
    return kl_divergence(Normal(new.root_dist.loc, new.root_dist.scale), Normal(td["loc"], td["scale"])).sum(-1).mean()


@pytest.mark.parametrize(
    "kw",
    [dict(learn_sigma=False), dict(learn_sigma=True, sigma=0.3), dict(learn_sigma=True, activation=nn.ReLU),
     dict(learn_sigma=True, num_cells=(6, 5, 7), activation=nn.ELU)],
    ids=["fixed-sigma", "learned-sigma", "relu", "deep-elu"],
)
def test_mlp_and_gauss_newton_equal_double_backward(kw):
    actor = _gaussian(**kw)
    td = _batch(actor)
    loss = TRPOLoss(actor)
    params = [p for p in loss.actor_network_params.values(True, True) if p.requires_grad]
    fvps = {m: loss.make_fisher_vector_product(td, params, damping=0.1, method=m)
            for m in ("mlp", "gauss_newton", "double_backward")}
    for v in _vectors(params):
        ref = fvps["double_backward"](v)
        for m in ("mlp", "gauss_newton"):
            torch.testing.assert_close(fvps[m](v), ref, rtol=1e-9, atol=1e-11, msg=m)
    assert all(not fvps["mlp"](v).requires_grad for v in _vectors(params, 1))  # detached products


def test_gauss_newton_state_dependent_scale():
    actor = _extractor_actor()
    td = _batch(actor)
    loss = TRPOLoss(actor)
    params = list(loss.actor_network_params.values(True, True))
    assert loss._policy_net() is None  # not the make_gaussian_actor structure: no MLP fast path
    gn = loss.make_fisher_vector_product(td, params, method="auto")
    ref = loss.make_fisher_vector_product(td, params, method="double_backward")
    for v in _vectors(params):
        torch.testing.assert_close(gn(v), ref(v), rtol=1e-9, atol=1e-11)
    with pytest.raises(ValueError, match="make_gaussian_actor"):
        loss.make_fisher_vector_product(td, params, method="mlp")


def test_tanh_normal_fisher_is_the_base_gaussian_hessian():
    actor = _extractor_actor(dist=TanhNormal)
    td = _batch(actor)
    loss = TRPOLoss(actor)
    params = list(loss.actor_network_params.values(True, True))
    gn = loss.make_fisher_vector_product(td, params, method="auto")  # Gauss-Newton through the base
    ref = double_backward_fvp(_base_kl(loss, td), params)
    for v in _vectors(params):
        torch.testing.assert_close(gn(v), ref(v), rtol=1e-9, atol=1e-11)


@pytest.mark.parametrize("cache", [True, False])
@pytest.mark.parametrize("cells", [(8, 8), (6, 5, 7), (9,)])
def test_mlp_fvp_with_and_without_the_jacobian_cache(cache, cells):
    actor = _gaussian(learn_sigma=True, num_cells=cells, activation=nn.Tanh)
    net = actor.module[0].module
    obs = torch.randn(11, OBS, dtype=torch.float64)
    params = list(net.parameters())
    loc, scale = net(obs)
    ref = gauss_newton_fvp(loc, scale, params, damping=0.05)
    fvp = mlp_gaussian_fvp(net, obs, params, damping=0.05, jacobian_cache=cache)
    for v in _vectors(params):
        torch.testing.assert_close(fvp(v), ref(v), rtol=1e-9, atol=1e-11)
    # the first layer alone (the cached Jacobian's only user) and the layers above it alone
    for sub in ([net.mean_net[0].weight, net.mean_net[0].bias], params[2:]):
        fvp = mlp_gaussian_fvp(net, obs, sub, jacobian_cache=cache)
        ref = gauss_newton_fvp(loc, scale, sub)
        for v in _vectors(sub, 2):
            torch.testing.assert_close(fvp(v), ref(v), rtol=1e-9, atol=1e-11)


def test_mlp_fvp_refuses_foreign_params():
    actor = _gaussian(learn_sigma=True)
    net = actor.module[0].module
    obs = torch.randn(5, OBS, dtype=torch.float64)
    assert mlp_gaussian_fvp(net, obs, list(net.parameters()) + [torch.zeros(2, requires_grad=True)]) is None
    # a subset is fine: the other tensors are held fixed
    sub = [net.mean_net[0].weight]
    v = torch.randn(sub[0].numel(), dtype=torch.float64)
    loc, scale = net(obs)
    torch.testing.assert_close(mlp_gaussian_fvp(net, obs, sub)(v), gauss_newton_fvp(loc, scale, sub)(v))


@pytest.mark.parametrize("kw", [dict(learn_sigma=True, sigma=0.4), dict(learn_sigma=False)])
def test_full_update_identical_in_direction(kw):
    steps = {}
    for method in ("mlp", "gauss_newton", "double_backward"):
        actor = _gaussian(seed=1, **kw)
        td = _batch(actor, n=64, seed=2)
        td["advantage"] = (td["action"] - td["loc"])[:, :1]
        loss = TRPOLoss(actor)
        opt = ConjugateGradientTrustRegion(loss, max_kl=0.01, fisher=method)
        before = [p.detach().clone() for p in opt.params]
        info = trpo_step(loss, opt, td)
        assert bool(info["accepted"]) and float(info["kl"]) <= 0.01
        steps[method] = torch.cat([(p.detach() - b).reshape(-1) for p, b in zip(opt.params, before)])
        # the updated parameters carry no autograd history and no stale .grad
        assert all(not p.grad_fn and p.grad is None for p in opt.params)
        assert not any(v.requires_grad for v in info.values())
    for method in ("mlp", "gauss_newton"):
        torch.testing.assert_close(steps[method], steps["double_backward"], rtol=1e-7, atol=1e-10, msg=method)


def test_cg_curvature_from_the_recursion_equals_an_explicit_product():
    gen = torch.Generator().manual_seed(0)
    m = torch.randn(20, 20, generator=gen, dtype=torch.float64)
    a = m @ m.T + 0.1 * torch.eye(20, dtype=torch.float64)
    b = torch.randn(20, generator=gen, dtype=torch.float64)
    x, r, _ = _cg(lambda v: a @ v, b, 10, 1e-10)
    torch.testing.assert_close(x.dot(b - r), x.dot(a @ x), rtol=1e-8, atol=1e-10)


def test_kl_direction_new_given_old():
    actor = _gaussian(learn_sigma=True, sigma=0.5)
    td = _batch(actor)
    loss = TRPOLoss(actor)
    with torch.no_grad():
        for p in actor.parameters():
            p.add_(0.2 * torch.randn_like(p))
        loc, scale = actor.module[0].module(td["observation"])
    forward = kl_divergence(Normal(loc, scale), Normal(td["loc"], td["scale"])).sum(-1).mean()
    reverse = kl_divergence(Normal(td["loc"], td["scale"]), Normal(loc, scale)).sum(-1).mean()
    torch.testing.assert_close(loss.kl(td).detach(), forward)  # BREMEN eq. (4): KL(pi_theta || pi_theta_k)
    assert not torch.allclose(loss.kl(td).detach(), reverse, rtol=1e-3)
