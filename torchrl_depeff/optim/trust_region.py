"""Conjugate-gradient trust-region step (TRPO, used by BREMEN eq. (4) and MUSBO eq. (13)).

The natural-gradient direction ``x = F^{-1} (-g)`` is found by conjugate gradient with
Fisher-vector products ``F v = d/dtheta (grad KL . v) + damping * v`` (double backward of the mean
KL), scaled to the trust-region boundary ``sqrt(2 delta / x^T F x) x``, then a backtracking line
search accepts the largest fraction whose actual improvement is at least ``accept_ratio`` of the
linear prediction *and* whose KL is within ``delta``.
"""
from __future__ import annotations

import math
from typing import Callable, Iterable

import torch
from tensordict import TensorDict, TensorDictBase
from torchrl._utils import logger as torchrl_logger

__all__ = ["conjugate_gradient", "ConjugateGradientTrustRegion"]


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
    if iters < 1:
        raise ValueError(f"iters must be >= 1, got {iters}")
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
    return x, rdotr


def _flat(tensors: Iterable[torch.Tensor | None], like: list[torch.Tensor]) -> torch.Tensor:
    return torch.cat(
        [
            (t if t is not None else torch.zeros_like(p)).reshape(-1)
            for t, p in zip(tensors, like)
        ]
    )


class ConjugateGradientTrustRegion:
    """TRPO's natural-gradient step with a KL-checked backtracking line search.

    Args:
        params (Iterable[Tensor] or TensorDictBase): actor parameters (e.g.
            ``actor.parameters()`` or ``TensorDict.from_module(actor)``); only those with
            ``requires_grad`` are updated.

    Keyword Args:
        max_kl (float): trust-region radius ``delta`` (> 0). Defaults to ``0.01``.
        damping (float): Tikhonov damping added to the Fisher (>= 0). Defaults to ``0.1``.
        cg_iters (int): conjugate-gradient iterations. Defaults to ``10``.
        backtrack_iters (int): line-search trials. Defaults to ``10``.
        backtrack_ratio (float): step shrink factor in ``(0, 1)``. Defaults to ``0.5``.
        accept_ratio (float): minimal actual/expected improvement. Defaults to ``0.1``.
        check_kl (bool): also require ``kl <= max_kl`` in the line search. BREMEN's reference
            code skips this check (``check_kl=False``); the default keeps it. Defaults to ``True``.

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
        params: Iterable[torch.Tensor] | TensorDictBase,
        *,
        max_kl: float = 0.01,
        damping: float = 0.1,
        cg_iters: int = 10,
        backtrack_iters: int = 10,
        backtrack_ratio: float = 0.5,
        accept_ratio: float = 0.1,
        check_kl: bool = True,
    ) -> None:
        if not max_kl > 0:
            raise ValueError(f"max_kl (delta) must be > 0, got {max_kl}")
        if not damping >= 0:
            raise ValueError(f"damping must be >= 0, got {damping}")
        if cg_iters < 1:
            raise ValueError(f"cg_iters must be >= 1, got {cg_iters}")
        if backtrack_iters < 1:
            raise ValueError(f"backtrack_iters must be >= 1, got {backtrack_iters}")
        if not 0 < backtrack_ratio < 1:
            raise ValueError(f"backtrack_ratio must be in (0, 1), got {backtrack_ratio}")
        if isinstance(params, TensorDictBase):
            params = params.values(include_nested=True, leaves_only=True)
        seen: set[int] = set()
        self.params: list[torch.Tensor] = []
        for p in params:
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
        kl = kl_fn()
        grads = torch.autograd.grad(kl, self.params, create_graph=True, allow_unused=True)
        used = [p for p, g in zip(self.params, grads) if g is not None]
        flat_grad_kl = torch.cat([g.reshape(-1) for g in grads if g is not None])

        def fvp(v: torch.Tensor) -> torch.Tensor:
            # keep only the entries of v that belong to params reached by the KL
            offset, parts = 0, []
            for p, g in zip(self.params, grads):
                n = p.numel()
                if g is not None:
                    parts.append(v[offset : offset + n])
                offset += n
            gvp = flat_grad_kl.dot(torch.cat(parts).detach())
            hv = torch.autograd.grad(gvp, used, retain_graph=True)
            it = iter(hv)
            full = _flat([next(it) if g is not None else None for g in grads], self.params)
            return full + self.damping * v

        return fvp

    def step(
        self,
        loss_fn: Callable[[], torch.Tensor],
        kl_fn: Callable[[], torch.Tensor],
    ) -> TensorDictBase:
        """One trust-region update.

        Args:
            loss_fn (Callable[[], Tensor]): surrogate loss to *minimise* (negative surrogate,
                BREMEN eq. (4)), evaluated at the current parameters.
            kl_fn (Callable[[], Tensor]): differentiable mean KL between the old (fixed) and the
                current policy; zero with zero gradient at the starting point.

        Returns:
            A TensorDict of scalar diagnostics: ``kl``, ``improvement``, ``expected_improvement``,
            ``step_fraction``, ``cg_residual``, ``accepted`` (bool), ``loss_before``, ``loss_after``.
            A rejected step leaves the parameters bit-identical and is logged at warning level.
        """
        saved = [p.detach().clone() for p in self.params]
        loss = loss_fn()
        grads = torch.autograd.grad(loss, self.params, allow_unused=True)
        g = _flat(grads, self.params).detach()
        loss_before = loss.detach()
        nan = torch.tensor(float("nan"))

        def info(accepted, kl, imp, exp_imp, frac, res, loss_after) -> TensorDictBase:
            return TensorDict(
                {
                    "accepted": torch.tensor(bool(accepted)),
                    "kl": torch.as_tensor(kl, dtype=torch.float32).detach().cpu(),
                    "improvement": torch.as_tensor(imp, dtype=torch.float32).detach().cpu(),
                    "expected_improvement": torch.as_tensor(exp_imp, dtype=torch.float32).detach().cpu(),
                    "step_fraction": torch.as_tensor(frac, dtype=torch.float32).cpu(),
                    "cg_residual": torch.as_tensor(res, dtype=torch.float32).detach().cpu(),
                    "loss_before": loss_before.float().cpu(),
                    "loss_after": torch.as_tensor(loss_after, dtype=torch.float32).detach().cpu(),
                },
                batch_size=[],
            )

        if not (torch.isfinite(g).all() and torch.isfinite(loss_before)):
            torchrl_logger.warning("TRPO step rejected: non-finite loss or gradient; parameters unchanged.")
            return info(False, nan, nan, nan, 0.0, nan, loss_before)
        if float(g.abs().max()) == 0.0:
            return info(False, 0.0, 0.0, 0.0, 0.0, 0.0, loss_before)

        fvp = self.fisher_vector_product(kl_fn)
        x, residual = conjugate_gradient(fvp, -g, iters=self.cg_iters)
        shs = x.dot(fvp(x)).detach()  # x^T F x
        x = x.detach()
        if not (torch.isfinite(x).all() and torch.isfinite(shs) and float(shs) > 0):
            torchrl_logger.warning(
                f"TRPO step rejected: non-finite or non-positive curvature x^T F x={float(shs)}; "
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
                new_loss = loss_fn().detach()
                kl = kl_fn().detach()
                improvement = loss_before - new_loss
                expected = expected_full * frac
                ratio = improvement / expected
                ok = bool(
                    torch.isfinite(new_loss)
                    and torch.isfinite(kl)
                    and improvement > 0
                    and ratio > self.accept_ratio
                    and (not self.check_kl or kl <= self.max_kl)
                )
                last = (kl, improvement, expected, new_loss)
                if ok:
                    return info(True, kl, improvement, expected, frac, residual, new_loss)
                frac *= self.backtrack_ratio
        self._restore(saved)
        kl, improvement, expected, new_loss = last
        torchrl_logger.warning(
            "TRPO line search rejected every step (last kl=%.3g, max_kl=%.3g, improvement=%.3g, "
            "expected=%.3g); parameters restored." % (float(kl), self.max_kl, float(improvement), float(expected))
        )
        return info(False, kl, improvement, expected, 0.0, residual, loss_before)
