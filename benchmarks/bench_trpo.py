"""TRPO cost at BREMEN policy size (obs 17, act 6, 2x200 tanh MLP) on a 50,000-sample batch.

Prints JSON lines, every ratio from figures measured in the same run:

* ``gemm``: the best fp32 GEMM rate on the policy's matrix shapes (forward and backward GEMMs of
  the 200 x 200 hidden layer at 50 000 rows), and ``gradient_gemm_fraction``: the GEMM-implied
  time of one surrogate gradient (its matmul FLOPs at that rate) over its measured time;
* ``gradient``: one gradient of the surrogate (``TRPOLoss.loss_and_kl`` + ``autograd.grad``);
* ``fvp_<method>``: one Fisher-vector product (``mlp``: the hand-written MLP passes,
  ``gauss_newton``: autograd closed form, ``double_backward``: Hessian of the KL) and its setup
  (once per step), with their max abs difference to ``double_backward`` on the same vector;
* ``fvp_mlp_cache`` / ``trpo_update_mlp_cache``: the ``mlp`` product with
  ``jacobian_cache=True`` (the per-state first-layer Jacobian built once per step; off by
  default since 2026-12-03, when it measured slower on this project's host);
* ``trpo_update_<method>``: one full update via ``trpo_step`` (gradient, 10 CG iterations, line
  search) from the same starting parameters, in gradients of time (target <= 12 with the default
  ``fisher="auto"`` = ``mlp``), and the cosine between its step and the ``double_backward`` one.

``--keep-heap`` sets glibc's ``M_MMAP_THRESHOLD``/``M_TRIM_THRESHOLD`` to 1 GiB / 2 GiB (through
``mallopt``) before torch allocates: with the defaults every freed tensor above 32 MiB is returned
to the OS and the next one of that size page-faults its whole buffer again (a 50 000 x 200 float32
activation is 40 MB), which costs this VM about 18 ms per such tensor. It is the allocator setting
PyTorch's CPU tuning guide gets with jemalloc/tcmalloc; the figures are reported with and
without it.

Usage: PYTHONPATH=. python benchmarks/bench_trpo.py [--batch 50000] [--threads 1] [--repeats 3] [--keep-heap]
"""
from __future__ import annotations

import argparse
import contextlib
import ctypes
import functools
import json
import sys
import time

import torch
from tensordict import TensorDict

from torchrl_depeff.modules.actors import make_gaussian_actor
import torchrl_depeff.objectives.trpo as trpo_module
from torchrl_depeff.objectives.trpo import TRPOLoss, trpo_step
from torchrl_depeff.optim.fisher import mlp_gaussian_fvp
from torchrl_depeff.optim.trust_region import ConjugateGradientTrustRegion

METHODS = ("mlp", "gauss_newton", "double_backward")


@contextlib.contextmanager
def _jacobian_cache():
    """``fisher="mlp"`` with ``jacobian_cache=True`` (benchmark only: the loss calls the module-level name)."""
    trpo_module.mlp_gaussian_fvp = functools.partial(mlp_gaussian_fvp, jacobian_cache=True)
    try:
        yield
    finally:
        trpo_module.mlp_gaussian_fvp = mlp_gaussian_fvp


def _best(fn, repeats: int) -> float:
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return min(times)


def _gemm_rate(n: int, h: int, o: int, a: int, repeats: int) -> float:
    """Best FLOP/s over the forward/backward GEMM shapes of the hidden layers."""
    x, w = torch.randn(n, h), torch.randn(h, h)
    g, xin, w1 = torch.randn(n, h), torch.randn(n, o), torch.randn(h, o)
    shapes = [
        (lambda: x @ w.T, 2 * n * h * h),  # forward
        (lambda: g @ w, 2 * n * h * h),  # input gradient
        (lambda: g.T @ x, 2 * n * h * h),  # weight gradient
    ]
    for fn, _ in shapes:
        fn()
    return max(flops / _best(fn, repeats) for fn, flops in shapes)


def _gradient_flops(n: int, o: int, h: int, a: int) -> int:
    fwd = 2 * n * (o * h + h * h + h * a)
    bwd = 2 * n * (o * h) + 4 * n * (h * h) + 4 * n * (h * a)  # no input gradient for layer 1
    return fwd + bwd


def _keep_heap() -> None:
    libc = ctypes.CDLL("libc.so.6")
    m_trim_threshold, m_mmap_threshold = -1, -3
    if not (libc.mallopt(m_mmap_threshold, 1 << 30) and libc.mallopt(m_trim_threshold, (1 << 31) - 1)):
        raise RuntimeError("mallopt failed")


def main() -> None:
    if "--keep-heap" in sys.argv:
        _keep_heap()
    parser = argparse.ArgumentParser()
    parser.add_argument("--batch", type=int, default=50_000)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--keep-heap", action="store_true")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    n, o, h, a = args.batch, 17, 200, 6
    actor = make_gaussian_actor(o, a, num_cells=(h, h), learn_sigma=True, sigma=0.5)
    with torch.no_grad():
        td = actor(TensorDict(observation=torch.randn(n, o), batch_size=[n]))
    td["advantage"] = (td["action"] - td["loc"])[:, :1]
    loss = TRPOLoss(actor)
    opts = {m: ConjugateGradientTrustRegion(loss, max_kl=0.01, cg_iters=10, fisher=m) for m in METHODS}
    params = opts["mlp"].params
    common = {"batch": n, "threads": args.threads, "policy": f"{o}-{h}-{h}-{a}", "keep_heap": args.keep_heap,
              "num_params": sum(p.numel() for p in params)}

    rate = _gemm_rate(n, h, o, a, args.repeats + 2)
    flops = _gradient_flops(n, o, h, a)

    def grad_once():
        torch.autograd.grad(loss.loss_and_kl(td)[0], params)

    grad_once()
    t_grad = _best(grad_once, args.repeats)
    print(json.dumps({"name": "gemm", "gflops": round(rate / 1e9, 1), **common}))
    print(json.dumps({"name": "gradient", "seconds": round(t_grad, 4), "gemm_implied_seconds": round(flops / rate, 4),
                      "gradient_gemm_fraction": round(flops / rate / t_grad, 3), "target": 0.6, **common}))

    v = torch.randn(sum(p.numel() for p in params), generator=torch.Generator().manual_seed(1))
    ref = loss.make_fisher_vector_product(td, params, damping=0.1, method="double_backward")(v)
    for m in (*METHODS, "mlp_cache"):
        method = "mlp" if m == "mlp_cache" else m
        with _jacobian_cache() if m == "mlp_cache" else contextlib.nullcontext():
            fvp = loss.make_fisher_vector_product(td, params, damping=0.1, method=method)
            out = fvp(v)
            t_fvp = _best(lambda: fvp(v), args.repeats)
            t_setup = _best(lambda: loss.make_fisher_vector_product(td, params, damping=0.1, method=method),
                            args.repeats)
        print(json.dumps({"name": f"fvp_{m}", "seconds": round(t_fvp, 4), "setup_seconds": round(t_setup, 4),
                          "fvp_over_gradient": round(t_fvp / t_grad, 3),
                          "max_abs_diff_vs_double_backward": float((out - ref).abs().max()),
                          "max_abs": float(ref.abs().max()), **common}))

    saved = [p.detach().clone() for p in params]

    def restore():
        with torch.no_grad():
            for p, s in zip(params, saved):
                p.copy_(s)

    steps = {}
    for m in (*reversed(METHODS), "mlp_cache"):  # double_backward first: the reference step
        def full_update(m=m):
            restore()
            return trpo_step(loss, opts["mlp" if m == "mlp_cache" else m], td)

        with _jacobian_cache() if m == "mlp_cache" else contextlib.nullcontext():
            info = full_update()
            steps[m] = torch.cat([(p.detach() - s).reshape(-1) for p, s in zip(params, saved)])
            t_update = _best(full_update, args.repeats)
        cos = torch.nn.functional.cosine_similarity(steps[m], steps["double_backward"], dim=0)
        print(json.dumps({"name": f"trpo_update_{m}", "seconds": round(t_update, 4), "cg_iters": 10,
                          "accepted": bool(info["accepted"]), "step_fraction": float(info["step_fraction"]),
                          "kl": float(info["kl"]), "update_over_gradient": round(t_update / t_grad, 2),
                          "target": 12.0, "cosine_to_double_backward_step": round(float(cos), 6), **common}))
    restore()


if __name__ == "__main__":
    main()
