"""Fisher-vector products for TRPO's conjugate-gradient step (BREMEN eq. (4), MUSBO eq. (13)).

TRPO solves ``(F + damping I) x = -g`` where ``F`` is the Hessian, at ``theta = theta_k``, of the
mean ``KL(pi_theta || pi_theta_k)``. For a policy that is a fixed bijection of a diagonal
Gaussian ``N(mu_theta(s), sigma_theta(s)^2)`` (a Gaussian, a ``tanh``-squashed ``TanhNormal``:
the KL is invariant under the common bijection) that Hessian has a closed form,
``F = J^T M J`` with ``J`` the Jacobian of ``(mu, log sigma)`` with respect to ``theta`` and ``M``
the Gaussian Fisher, ``1 / sigma^2`` for ``mu`` and ``2`` for ``log sigma`` per action dimension,
divided by the number of states (the KL's second-order term at ``theta = theta_k``; the
first-order term vanishes there). Three ways to multiply by it, all exact:

* :func:`mlp_gaussian_fvp`: hand-written forward (tangent) and backward passes through an
  ``nn.Sequential`` MLP of ``nn.Linear`` and element-wise activations with a ``tanh``-squashed
  mean and a state-independent log-std (:class:`~torchrl_depeff.modules.actors.GaussianPolicyNet`,
  BREMEN's ``tanh(mu(s)) + N(0, sigma^2)``), fusing the tangent GEMMs; about 4 GEMMs of the
  hidden layer per product against 3 for a gradient;
* :func:`gauss_newton_fvp`: any differentiable ``(loc, scale)``, through autograd: a
  Jacobian-vector product (double-vjp trick on a graph built once) and a vector-Jacobian product;
* :func:`double_backward_fvp`: the Hessian of any differentiable KL (the reference, and the
  fallback for distributions without a Gaussian core).

Every product returns ``(F + damping I) v`` on the flat parameter vector (the concatenation of
``params`` in order); parameters the policy does not reach get ``damping * v``.
"""
from __future__ import annotations

from typing import Callable, Sequence

import torch
from torch import nn

from torchrl_depeff.modules.actors import GaussianPolicyNet

__all__ = ["double_backward_fvp", "gauss_newton_fvp", "mlp_gaussian_fvp", "split_flat"]

FVP = Callable[[torch.Tensor], torch.Tensor]

_ELEMENTWISE = (
    nn.Tanh, nn.ReLU, nn.ELU, nn.LeakyReLU, nn.SiLU, nn.Sigmoid, nn.Softplus, nn.GELU,
    nn.Identity, nn.Mish, nn.SELU, nn.CELU,
)


def split_flat(v: torch.Tensor, params: Sequence[torch.Tensor]) -> list[torch.Tensor]:
    """Views of the flat vector ``v`` shaped like each of ``params``.

    Examples:
        >>> from torchrl_depeff.optim.fisher import split_flat
        >>> [t.shape for t in split_flat(torch.arange(7.0), [torch.zeros(2, 2), torch.zeros(3)])]
        [torch.Size([2, 2]), torch.Size([3])]
    """
    out, offset = [], 0
    for p in params:
        n = p.numel()
        out.append(v[offset : offset + n].view_as(p))
        offset += n
    if offset != v.numel():
        raise ValueError(f"vector of size {v.numel()} does not match {offset} parameter entries")
    return out


def _flat(tensors: Sequence[torch.Tensor | None], params: Sequence[torch.Tensor]) -> torch.Tensor:
    return torch.cat(
        [(t if t is not None else torch.zeros_like(p)).reshape(-1) for t, p in zip(tensors, params)]
    )


def double_backward_fvp(kl: torch.Tensor, params: Sequence[torch.Tensor], *, damping: float = 0.0) -> FVP:
    """``v -> (H + damping I) v`` with ``H`` the Hessian of the scalar ``kl`` (double backward).

    The gradient graph is built once and reused for every product.

    Args:
        kl (Tensor): differentiable scalar (the mean KL).
        params (Sequence[Tensor]): parameters, in flat-vector order.

    Keyword Args:
        damping (float): added multiple of the identity. Defaults to ``0``.

    Examples:
        >>> from torchrl_depeff.optim.fisher import double_backward_fvp
        >>> w = torch.zeros(2, requires_grad=True)
        >>> fvp = double_backward_fvp(0.5 * (torch.tensor([1.0, 3.0]) * w ** 2).sum(), [w], damping=0.1)
        >>> fvp(torch.ones(2)).tolist()
        [1.100000023841858, 3.0999999046325684]
    """
    params = list(params)
    grads = torch.autograd.grad(kl, params, create_graph=True, allow_unused=True)
    used = [i for i, g in enumerate(grads) if g is not None and g.requires_grad]
    used_params = [params[i] for i in used]

    def fvp(v: torch.Tensor) -> torch.Tensor:
        parts = split_flat(v, params)
        if not used:
            return damping * v
        gvp = sum((grads[i] * parts[i].detach()).sum() for i in used)
        hv = torch.autograd.grad(gvp, used_params, retain_graph=True, allow_unused=True)
        full: list[torch.Tensor | None] = [None] * len(params)
        for i, h in zip(used, hv):
            full[i] = h
        return _flat(full, params) + damping * v

    return fvp


def gauss_newton_fvp(
    loc: torch.Tensor,
    scale: torch.Tensor,
    params: Sequence[torch.Tensor],
    *,
    damping: float = 0.0,
) -> FVP:
    r"""Closed-form Gaussian Fisher product ``(J^T M J + damping I) v`` through autograd.

    ``loc`` and ``scale`` (``[*B, d]``, in the graph of ``params``) describe the diagonal
    Gaussian of each of the ``n = prod(B)`` states; ``M`` is ``1 / (n scale^2)`` for ``loc`` and
    ``2 / n`` for ``log scale``: the Hessian at ``theta = theta_k`` of the mean over states of
    ``KL(N_theta || N_theta_k)`` summed over action dimensions. ``J v`` uses the double-vjp trick
    (the graph of ``J^T u`` is built once with ``create_graph``), ``J^T w`` a plain backward.

    Args:
        loc (Tensor): Gaussian means ``[*B, d]``.
        scale (Tensor): Gaussian standard deviations ``[*B, d]``.
        params (Sequence[Tensor]): parameters, in flat-vector order.

    Keyword Args:
        damping (float): added multiple of the identity. Defaults to ``0``.

    Examples:
        >>> from torchrl_depeff.optim.fisher import gauss_newton_fvp
        >>> mu, log_sigma = torch.zeros(1, requires_grad=True), torch.zeros(1, requires_grad=True)
        >>> loc, scale = mu.expand(4, 1), log_sigma.exp().expand(4, 1)  # N(mu, e^{2 log_sigma}), 4 states
        >>> gauss_newton_fvp(loc, scale, [mu, log_sigma])(torch.ones(2)).tolist()  # diag(1, 2)
        [1.0, 2.0]
    """
    params = list(params)
    if loc.shape != scale.shape:
        scale = scale.expand_as(loc)
    n = max(loc[..., 0].numel(), 1)
    outputs, metrics = [], []
    if loc.requires_grad:
        outputs.append(loc)
        metrics.append((1.0 / (n * scale.detach().pow(2))))
    if scale.requires_grad:
        outputs.append(scale.log())
        metrics.append(torch.full_like(loc, 2.0 / n).detach())
    if not outputs:
        return lambda v: damping * v
    dummies = [torch.zeros_like(o, requires_grad=True) for o in outputs]
    jt_u = torch.autograd.grad(outputs, params, dummies, create_graph=True, allow_unused=True)
    used = [i for i, g in enumerate(jt_u) if g is not None and g.requires_grad]
    used_params = [params[i] for i in used]

    def fvp(v: torch.Tensor) -> torch.Tensor:
        parts = split_flat(v, params)
        if not used:
            return damping * v
        jv = torch.autograd.grad(
            [jt_u[i] for i in used], dummies, [parts[i].detach() for i in used],
            retain_graph=True, allow_unused=True,
        )
        w = [m * (j if j is not None else torch.zeros_like(m)) for m, j in zip(metrics, jv)]
        fv = torch.autograd.grad(outputs, used_params, w, retain_graph=True, allow_unused=True)
        full: list[torch.Tensor | None] = [None] * len(params)
        for i, f in zip(used, fv):
            full[i] = f
        return _flat(full, params) + damping * v

    return fvp


def _mlp_layers(net: GaussianPolicyNet) -> tuple[list[nn.Linear], list[nn.Module]] | None:
    """Split ``net.mean_net`` into linear layers and the activations between them, or ``None``."""
    modules = list(net.mean_net)
    if not modules or len(modules) % 2 != 1:
        return None
    linears, acts = modules[0::2], modules[1::2]
    if not all(type(m) is nn.Linear for m in linears):
        return None
    if not all(isinstance(a, _ELEMENTWISE) for a in acts):
        return None
    return linears, acts


@torch.no_grad()
def _activation_and_slope(act: nn.Module, z: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    if isinstance(act, nn.Tanh):
        h = torch.tanh(z)
        return h, 1.0 - h * h
    if isinstance(act, nn.ReLU):
        return torch.relu(z), (z > 0).to(z.dtype)
    if isinstance(act, nn.Identity):
        return z, torch.ones_like(z)
    with torch.enable_grad():
        zz = z.detach().requires_grad_(True)
        h = act(zz)
        (slope,) = torch.autograd.grad(h.sum(), zz)
    return h.detach(), slope


def mlp_gaussian_fvp(
    net: GaussianPolicyNet,
    observation: torch.Tensor,
    params: Sequence[torch.Tensor],
    *,
    damping: float = 0.0,
    jacobian_cache: bool = False,
) -> FVP | None:
    r"""Exact Fisher product of :class:`~torchrl_depeff.modules.actors.GaussianPolicyNet`.

    The policy is ``N(tanh(f_theta(s)), diag(exp(2 log_std)))`` with ``f`` an MLP (BREMEN App.
    F.1). Its Fisher at the current parameters is ``J^T M J`` with ``J`` the Jacobian of
    ``tanh(f(s))`` (the ``tanh`` slope ``1 - loc^2`` included) and ``M = 1 / (n sigma^2)``, plus
    ``2 I`` on the (learned) log-std, with no cross term. Each product runs one tangent pass
    (``J v``, the two GEMMs of a layer fused into one) and one backward pass (``J^T w``) on
    activations stored once, at the cost of about four hidden-layer GEMMs.

    With ``jacobian_cache=True`` (MLPs with at least two hidden layers), the per-state Jacobian
    of ``loc`` with respect to the first hidden layer's output, ``[n, h_0, act]``, is computed
    once (``act`` GEMMs of the second layer's size) and each product reads it twice instead of
    running the second layer's tangent and input-gradient GEMMs: two hidden-layer GEMMs per
    product instead of four, but a memory-bound ``n x h_0 x act`` tensor (240 MB at BREMEN's
    50 000 states and 200-200 policy) built and read at every TRPO step. Off by default: on this
    project's CPU host of 2026-12-03 the cache made the BREMEN-size update slower (setup about
    2 s, each product 0.39 s against 0.32 s without it; ``benchmarks/bench_trpo.py``); it paid
    on an earlier host with faster memory.

    Must be called while ``params`` are the tensors ``net`` uses (e.g. inside
    ``loss.actor_network_params.to_module(actor)``); entries of ``params`` that are not ``net``'s
    make it return ``None`` (use :func:`gauss_newton_fvp` then), ``net`` tensors missing from
    ``params`` are held fixed.

    Args:
        net (GaussianPolicyNet): the policy network.
        observation (Tensor): states ``[*B, obs]``.
        params (Sequence[Tensor]): parameters, in flat-vector order.

    Keyword Args:
        damping (float): added multiple of the identity. Defaults to ``0``.
        jacobian_cache (bool): cache the first-layer Jacobian (see above). Defaults to ``False``.

    Returns:
        The product, or ``None`` when the network is not an MLP of ``nn.Linear`` and element-wise
        activations or ``params`` holds tensors outside it.

    Examples:
        >>> from torchrl_depeff.modules.actors import GaussianPolicyNet
        >>> from torchrl_depeff.optim.fisher import gauss_newton_fvp, mlp_gaussian_fvp
        >>> net = GaussianPolicyNet(3, 2, num_cells=(8,), learn_sigma=True).double()
        >>> obs, params = torch.randn(5, 3, dtype=torch.float64), list(net.parameters())
        >>> v = torch.randn(sum(p.numel() for p in params), dtype=torch.float64)
        >>> torch.allclose(mlp_gaussian_fvp(net, obs, params)(v), gauss_newton_fvp(*net(obs), params)(v))
        True
    """
    params = list(params)
    layers = _mlp_layers(net)
    if layers is None:
        return None
    linears, acts = layers
    index = {id(p): i for i, p in enumerate(params)}
    owned = [lin.weight for lin in linears] + [lin.bias for lin in linears if lin.bias is not None]
    log_std = net.log_std if net.learn_sigma else None
    known = {id(t) for t in owned} | ({id(log_std)} if log_std is not None else set())
    if any(id(p) not in known for p in params):
        return None

    x = net.normalize_inputs(observation.reshape(-1, observation.shape[-1])).to(linears[0].weight.dtype)
    n = x.shape[0]
    with torch.no_grad():
        inputs, slopes = [x], []
        h = x
        for i, lin in enumerate(linears):
            z = torch.nn.functional.linear(h, lin.weight, lin.bias)
            if i < len(acts):
                h, slope = _activation_and_slope(acts[i], z)
                inputs.append(h)
                slopes.append(slope)
            else:
                loc = torch.tanh(z)  # GaussianPolicyNet: loc = tanh(mean_net(s))
                slopes.append(1.0 - loc * loc)
        sigma2 = net.log_std.detach().exp().pow(2)
        metric = 1.0 / (n * sigma2)  # [act], state-independent sigma

    def _slot(t: torch.Tensor | None) -> int | None:
        return None if t is None else index.get(id(t))

    w_idx = [_slot(lin.weight) for lin in linears]
    b_idx = [_slot(lin.bias) for lin in linears]
    s_idx = _slot(log_std)
    num = len(linears)
    first_used = w_idx[0] is not None or b_idx[0] is not None
    h0 = linears[0].out_features
    kt = None
    if jacobian_cache and num >= 3 and first_used:
        with torch.no_grad():  # d loc / d h_0 per state: [n, h_0, act], the 2 GEMMs per product it saves
            jac = slopes[-1].unsqueeze(-1) * linears[-1].weight  # d loc / d h_{L-2}: [n, act, h]
            for i in range(num - 2, 0, -1):
                jac = jac.mul_(slopes[i].unsqueeze(1))  # d loc / d z_i
                jac = (jac.reshape(-1, jac.shape[-1]) @ linears[i].weight).view(n, -1, linears[i].in_features)
            kt = jac.transpose(1, 2).contiguous()
            del jac

    def _tangent(parts: list[torch.Tensor], start: int) -> torch.Tensor | None:
        # t_l = slope_l * (W_l t_{l-1} + dW_l h_{l-1} + db_l), with a zero tangent entering layer `start`
        t = None
        for i in range(start, num):
            lin = linears[i]
            dw = parts[w_idx[i]] if w_idx[i] is not None else None
            db = parts[b_idx[i]] if b_idx[i] is not None else None
            if dw is not None:
                s = inputs[i] @ dw.T if db is None else torch.addmm(db, inputs[i], dw.T)
                if t is not None:
                    s.addmm_(t, lin.weight.T)
            elif t is not None:
                s = t @ lin.weight.T if db is None else torch.addmm(db, t, lin.weight.T)
            elif db is not None:
                s = db.expand(n, lin.out_features).clone()
            else:
                continue  # zero tangent so far
            t = s.mul_(slopes[i])
        return t

    @torch.no_grad()
    def fvp(v: torch.Tensor) -> torch.Tensor:
        parts = split_flat(v, params)
        out: list[torch.Tensor | None] = [None] * len(params)
        if kt is None:
            jv = _tangent(parts, 0)
            stop = 0  # back-propagate down to the first layer
        else:
            dw, db = (parts[w_idx[0]] if w_idx[0] is not None else None), (parts[b_idx[0]] if b_idx[0] is not None else None)
            s0 = (x @ dw.T if db is None else torch.addmm(db, x, dw.T)) if dw is not None else db.expand(n, h0).clone()
            t0 = s0.mul_(slopes[0])
            jv = torch.bmm(t0.unsqueeze(1), kt).squeeze(1)  # first layer through the cached Jacobian
            rest = _tangent(parts, 1)
            if rest is not None:
                jv = jv + rest
            stop = 1
        if jv is None:
            jv = torch.zeros(n, slopes[-1].shape[-1], dtype=x.dtype, device=x.device)
        wm = jv * metric  # M J v
        g = wm * slopes[-1]  # backward seed at the output pre-activation
        for i in range(num - 1, stop - 1, -1):
            lin = linears[i]
            if w_idx[i] is not None:
                out[w_idx[i]] = g.T @ inputs[i]
            if b_idx[i] is not None:
                out[b_idx[i]] = g.sum(0)
            if i > stop and any(j is not None for j in w_idx[stop:i] + b_idx[stop:i]):
                g = (g @ lin.weight).mul_(slopes[i - 1])
            else:
                break
        if kt is not None:
            g0 = torch.bmm(wm.unsqueeze(1), kt.transpose(1, 2)).squeeze(1).mul_(slopes[0])
            if w_idx[0] is not None:
                out[w_idx[0]] = g0.T @ x
            if b_idx[0] is not None:
                out[b_idx[0]] = g0.sum(0)
        if s_idx is not None:
            out[s_idx] = 2.0 * parts[s_idx]  # Fisher of log sigma: 2 per dimension (mean over states)
        return _flat(out, params) + damping * v

    return fvp
