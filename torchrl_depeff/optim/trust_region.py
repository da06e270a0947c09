"""Conjugate-gradient trust-region step (TRPO, used by BREMEN eq. (4) and MUSBO eq. (13)).

The natural-gradient direction ``x = (F + damping I)^{-1} (-g)`` is found by conjugate gradient
with Fisher-vector products, scaled to the trust-region boundary ``sqrt(2 delta / x^T F x) x``,
then a backtracking line search accepts the largest fraction whose actual improvement is at least
``accept_ratio`` of the linear prediction *and* whose KL is within ``delta``.

Fisher-vector products (:mod:`torchrl_depeff.optim.fisher`): built on a
:class:`~torchrl_depeff.objectives.TRPOLoss`, the optimiser asks the loss for the closed-form
Gaussian Fisher product (``fisher="auto"``: the hand-written MLP passes for
:class:`~torchrl_depeff.modules.actors.GaussianPolicyNet`, the autograd Gauss-Newton product for
other Gaussian or ``TanhNormal`` actors, the double backward of the KL otherwise); built on bare
parameters with closures, it takes the double backward of ``kl_fn``.
"""
from __future__ import annotations

import math
from typing import Any, Callable, Iterable

import torch
from tensordict import TensorDict, TensorDictBase
from torchrl._utils import logger as torchrl_logger

from torchrl_depeff.optim.fisher import _flat, double_backward_fvp

__all__ = ["conjugate_gradient", "ConjugateGradientTrustRegion", "FISHER_METHODS"]

FISHER_METHODS = ("auto", "mlp", "gauss_newton", "double_backward")


def _cg(
    fvp: Callable[[torch.Tensor], torch.Tensor], b: torch.Tensor, iters: int, residual_tol: float
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    x = torch.zeros_like(b)
    r = b.clone()
    p = b.clone()
    rdotr = r.dot(r)
    for _ in range(iters):
        # A Python early-exit on the residual is the standard CG stopping rule; one scalar sync
        # per CG iteration (not per sample).
        if float(rdotr) < residual_tol:
            break
        Ap = fvp(p)
        alpha = rdotr / p.dot(Ap)
        x = x + alpha * p
        r = r - alpha * Ap
        new_rdotr = r.dot(r)
        p = r + (new_rdotr / rdotr) * p
        rdotr = new_rdotr
    return x, r, rdotr


def conjugate_gradient(
    fvp: Callable[[torch.Tensor], torch.Tensor],
    b: torch.Tensor,
    iters: int = 10,
    residual_tol: float = 1e-10,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Solve ``A x = b`` for a symmetric positive-definite ``A`` given only ``v -> A v``.

    Args:
        fvp (Callable[[Tensor], Tensor]): matrix-vector product ``v -> A v`` on flat vectors.
        b (Tensor): right-hand side, shape ``[n]``.
        iters (int): maximum number of iterations. Defaults to ``10``.
        residual_tol (float): stop once ``||r||^2`` falls below it. Defaults to ``1e-10``.

    Returns:
        ``(x, residual)`` where ``residual = ||b - A x||^2`` as tracked by the recursion.

    Examples:
        >>> from torchrl_depeff.optim.trust_region import conjugate_gradient
        >>> A = torch.tensor([[4.0, 1.0], [1.0, 3.0]], dtype=torch.float64)
        >>> b = torch.tensor([1.0, 2.0], dtype=torch.float64)
        >>> x, res = conjugate_gradient(lambda v: A @ v, b)
        >>> torch.allclose(A @ x, b), bool(res < 1e-10)
        (True, True)
    """
    if isinstance(iters, bool) or not isinstance(iters, int) or iters < 1:
        raise ValueError(f"iters must be an int >= 1, got {iters!r}")
    x, _, rdotr = _cg(fvp, b, iters, residual_tol)
    return x, rdotr


def _is_loss(obj: Any) -> bool:
    return hasattr(obj, "actor_network_params") and hasattr(obj, "trpo_closures")


class ConjugateGradientTrustRegion:
    """TRPO's natural-gradient step with a KL-checked backtracking line search.

    Args:
        params (TRPOLoss, Iterable[Tensor] or TensorDictBase): the loss to optimise (its
            ``actor_network_params`` are updated: the recommended form), or actor parameters
            (``loss.actor_network_params``, ``actor.parameters()``,
            ``TensorDict.from_module(actor)``); only those with ``requires_grad`` are updated.
            :func:`~torchrl_depeff.objectives.trpo_step` refuses parameters that are not the
            loss's.

    Keyword Args:
        max_kl (float): trust-region radius ``delta`` (> 0). Defaults to ``0.01``.
        damping (float): Tikhonov damping added to the Fisher (>= 0). Defaults to ``0.1``.
        cg_iters (int): conjugate-gradient iterations. Defaults to ``10``.
        backtrack_iters (int): line-search trials. Defaults to ``10``.
        backtrack_ratio (float): step shrink factor in ``(0, 1)``. Defaults to ``0.5``.
        accept_ratio (float): minimal actual/expected improvement (>= 0). Defaults to ``0.1``.
        check_kl (bool): also require ``kl <= max_kl`` in the line search. BREMEN's reference
            code skips this check (``check_kl=False``); the default keeps it. Defaults to ``True``.
        fisher (str): Fisher-vector product used with a loss: ``"auto"`` (the fastest exact one
            for the actor), ``"mlp"``, ``"gauss_newton"`` or ``"double_backward"`` (see
            :mod:`torchrl_depeff.optim.fisher`). Defaults to ``"auto"``.

    ``x^T (F + damping I) x`` for the step length is read from the conjugate-gradient recursion
    (``x^T (b - r)``, exact up to rounding) instead of one more Fisher product.

    Examples:
        >>> from torchrl_depeff.optim.trust_region import ConjugateGradientTrustRegion
        >>> w = torch.nn.Parameter(torch.zeros(2))
        >>> opt = ConjugateGradientTrustRegion([w], max_kl=0.01, damping=0.1)
        >>> info = opt.step(lambda: -(w * torch.tensor([1.0, 2.0])).sum(),
        ...                 lambda: 0.5 * (w ** 2).sum())
        >>> bool(info["accepted"]), round(float(info["kl"]), 4)
        (True, 0.0091)

    With ``damping=0`` and an exactly quadratic KL the full step lands on ``kl == max_kl`` up to
    rounding, and the strict ``kl <= max_kl`` check may then take the next (halved) fraction.
    """

    def __init__(
        self,
        params: Any,
        *,
        max_kl: float = 0.01,
        damping: float = 0.1,
        cg_iters: int = 10,
        backtrack_iters: int = 10,
        backtrack_ratio: float = 0.5,
        accept_ratio: float = 0.1,
        check_kl: bool = True,
        fisher: str = "auto",
    ) -> None:
        for name, value in (("max_kl", max_kl), ("damping", damping), ("backtrack_ratio", backtrack_ratio),
                            ("accept_ratio", accept_ratio)):
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
                raise ValueError(f"{name} must be a finite number, got {value!r}")
        if not max_kl > 0:
            raise ValueError(f"max_kl (delta) must be > 0, got {max_kl}")
        if not damping >= 0:
            raise ValueError(f"damping must be >= 0, got {damping}")
        for name, value in (("cg_iters", cg_iters), ("backtrack_iters", backtrack_iters)):
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be an int >= 1, got {value!r}")
        if not 0 < backtrack_ratio < 1:
            raise ValueError(f"backtrack_ratio must be in (0, 1), got {backtrack_ratio}")
        if not accept_ratio >= 0:
            raise ValueError(f"accept_ratio must be >= 0, got {accept_ratio}")
        if fisher not in FISHER_METHODS:
            raise ValueError(f"fisher must be one of {FISHER_METHODS}, got {fisher!r}")
        self.loss = None
        if _is_loss(params):
            self.loss = params
            params = params.actor_network_params
        if isinstance(params, TensorDictBase):
            params = params.values(include_nested=True, leaves_only=True)
        if isinstance(params, torch.Tensor):
            raise TypeError("params must be an iterable of tensors (got a single tensor: wrap it in a list)")
        seen: set[int] = set()
        self.params: list[torch.Tensor] = []
        for p in params:
            if not isinstance(p, torch.Tensor):
                raise TypeError(f"params must hold tensors, got {type(p).__name__}")
            if p.requires_grad and id(p) not in seen:
                seen.add(id(p))
                self.params.append(p)
        if not self.params:
            raise ValueError("params holds no tensor that requires grad")
        self.max_kl = float(max_kl)
        self.damping = float(damping)
        self.cg_iters = int(cg_iters)
        self.backtrack_iters = int(backtrack_iters)
        self.backtrack_ratio = float(backtrack_ratio)
        self.accept_ratio = float(accept_ratio)
        self.check_kl = bool(check_kl)
        self.fisher = fisher

    @torch.no_grad()
    def _set_flat(self, flat: torch.Tensor) -> None:
        offset = 0
        for p in self.params:
            n = p.numel()
            p.copy_(flat[offset : offset + n].view_as(p))
            offset += n

    @torch.no_grad()
    def _restore(self, saved: list[torch.Tensor]) -> None:
        for p, s in zip(self.params, saved):
            p.copy_(s)

    def fisher_vector_product(
        self, kl_fn: Callable[[], torch.Tensor]
    ) -> Callable[[torch.Tensor], torch.Tensor]:
        """Return ``v -> (F + damping I) v`` with ``F`` the Hessian of ``kl_fn()`` at the params.

        The KL gradient graph is built once and reused for every product (double backward).
        """
        return double_backward_fvp(kl_fn(), self.params, damping=self.damping)

    def step(
        self,
        loss_fn: Callable[[], torch.Tensor] | TensorDictBase,
        kl_fn: Callable[[], torch.Tensor] | None = None,
        *,
        fvp_fn: Callable[[], Callable[[torch.Tensor], torch.Tensor]] | None = None,
        loss_and_kl_fn: Callable[[], tuple[torch.Tensor, torch.Tensor]] | None = None,
    ) -> TensorDictBase:
        """One trust-region update.

        Args:
            loss_fn (Callable[[], Tensor] or TensorDictBase): surrogate loss to *minimise*
                (negative surrogate, BREMEN eq. (4)), evaluated at the current parameters; or,
                for an optimiser built on a loss, the rollout batch (then this is
                :func:`~torchrl_depeff.objectives.trpo_step`).
            kl_fn (Callable[[], Tensor], optional): differentiable mean KL between the current
                and the old (fixed) policy; zero with zero gradient at the starting point.
                Required unless ``fvp_fn`` and ``loss_and_kl_fn`` are both given.

        Keyword Args:
            fvp_fn (Callable[[], Callable], optional): builds ``v -> (F + damping I) v`` at the
                current parameters (called once per step, after the gradient). Defaults to the
                double backward of ``kl_fn``.
            loss_and_kl_fn (Callable[[], tuple[Tensor, Tensor]], optional): loss and KL from one
                policy evaluation, used by the line search. Defaults to ``loss_fn`` and ``kl_fn``.

        Returns:
            A TensorDict of scalar diagnostics (on the parameters' device): ``kl``,
            ``improvement``, ``expected_improvement``, ``step_fraction``, ``cg_residual``,
            ``accepted`` (bool), ``loss_before``, ``loss_after``. A rejected step leaves the
            parameters bit-identical and is logged at warning level.
        """
        if isinstance(loss_fn, TensorDictBase):
            if self.loss is None:
                raise TypeError(
                    "step(tensordict) needs an optimiser built on a loss: ConjugateGradientTrustRegion(loss, ...)"
                )
            return self.step(**self.loss.trpo_closures(loss_fn, self))
        if not callable(loss_fn):
            raise TypeError(f"loss_fn must be callable or a TensorDict, got {type(loss_fn).__name__}")
        if kl_fn is None and (fvp_fn is None or loss_and_kl_fn is None):
            raise TypeError("kl_fn is required unless both fvp_fn and loss_and_kl_fn are given")
        saved = [p.detach().clone() for p in self.params]
        loss = loss_fn()
        if not isinstance(loss, torch.Tensor) or loss.ndim != 0:
            raise ValueError(
                f"loss_fn must return a scalar tensor, got {type(loss).__name__} of shape "
                f"{tuple(getattr(loss, 'shape', ()))}"
            )
        grads = torch.autograd.grad(loss, self.params, allow_unused=True)
        g = _flat(grads, self.params).detach()
        loss_before = loss.detach()
        dev = g.device
        nan = torch.tensor(float("nan"), device=dev)

        def info(accepted, kl, imp, exp_imp, frac, res, loss_after) -> TensorDictBase:
            f32 = lambda t: torch.as_tensor(t, device=dev).detach().to(torch.float32)  # noqa: E731
            return TensorDict(
                {
                    "accepted": torch.tensor(bool(accepted), device=dev),
                    "kl": f32(kl),
                    "improvement": f32(imp),
                    "expected_improvement": f32(exp_imp),
                    "step_fraction": f32(frac),
                    "cg_residual": f32(res),
                    "loss_before": f32(loss_before),
                    "loss_after": f32(loss_after),
                },
                batch_size=[],
            )

        finite, gmax = torch.stack([(torch.isfinite(g).all() & torch.isfinite(loss_before)).to(g.dtype),
                                    g.abs().max()]).tolist()
        if not finite:
            torchrl_logger.warning("TRPO step rejected: non-finite loss or gradient; parameters unchanged.")
            return info(False, nan, nan, nan, 0.0, nan, loss_before)
        if gmax == 0.0:
            return info(False, 0.0, 0.0, 0.0, 0.0, 0.0, loss_before)

        fvp = fvp_fn() if fvp_fn is not None else self.fisher_vector_product(kl_fn)
        b = -g
        x, r, residual = _cg(fvp, b, self.cg_iters, 1e-10)
        x = x.detach()
        shs = x.dot(b - r.detach())  # x^T (F + damping I) x from the CG recursion
        ok_x, shs_value = torch.stack([torch.isfinite(x).all().to(x.dtype), shs]).tolist()
        if not (ok_x and math.isfinite(shs_value) and shs_value > 0):
            torchrl_logger.warning(
                f"TRPO step rejected: non-finite or non-positive curvature x^T F x={shs_value}; "
                "parameters unchanged."
            )
            return info(False, nan, nan, nan, 0.0, residual, loss_before)
        full_step = torch.sqrt(2 * self.max_kl / shs) * x  # TRPO: sqrt(2 delta / x^T F x) x
        expected_full = -g.dot(full_step)  # linear prediction of the loss decrease, > 0
        old_flat = torch.cat([s.reshape(-1) for s in saved])

        frac = 1.0
        last = (nan, nan, nan, loss_before)
        with torch.no_grad():
            for _ in range(self.backtrack_iters):
                self._set_flat(old_flat + frac * full_step)
                if loss_and_kl_fn is not None:
                    new_loss, kl = loss_and_kl_fn()
                else:
                    new_loss, kl = loss_fn(), kl_fn()
                new_loss, kl = new_loss.detach(), kl.detach()
                improvement = loss_before - new_loss
                expected = expected_full * frac
                ratio = improvement / expected
                ok = (torch.isfinite(new_loss) & torch.isfinite(kl) & (improvement > 0)
                      & (ratio > self.accept_ratio))
                if self.check_kl:
                    ok = ok & (kl <= self.max_kl)
                last = (kl, improvement, expected, new_loss)
                if bool(ok):  # one host sync per trial
                    return info(True, kl, improvement, expected, frac, residual, new_loss)
                frac *= self.backtrack_ratio
        self._restore(saved)
        kl, improvement, expected, new_loss = last
        torchrl_logger.warning(
            "TRPO line search rejected every step (last kl=%.3g, max_kl=%.3g, improvement=%.3g, "
            "expected=%.3g); parameters restored." % (float(kl), self.max_kl, float(improvement), float(expected))
        )
        return info(False, kl, improvement, expected, 0.0, residual, loss_before)
