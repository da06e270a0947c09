"""TRPO cost at BREMEN policy size (obs 17, act 6, 2x200 tanh MLP) on a 50,000-sample batch.

Prints JSON lines: one gradient of the surrogate, one Fisher-vector product (double backward of
the mean KL, graph built once), their ratio (target <= 3), and a full TRPO update (gradient, 10 CG
iterations, line search) via ``trpo_step``.

Usage: python benchmarks/bench_trpo.py [--batch 50000] [--threads 1] [--repeats 3]
"""
from __future__ import annotations

import argparse
import json
import time

import torch
from tensordict import TensorDict

from torchrl_depeff.modules.actors import make_gaussian_actor
from torchrl_depeff.objectives.trpo import TRPOLoss, trpo_step
from torchrl_depeff.optim.trust_region import ConjugateGradientTrustRegion


def _best(fn, repeats: int) -> float:
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return min(times)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--batch", type=int, default=50_000)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    actor = make_gaussian_actor(17, 6, num_cells=(200, 200), learn_sigma=True, sigma=0.5)
    with torch.no_grad():
        td = actor(TensorDict(observation=torch.randn(args.batch, 17), batch_size=[args.batch]))
    td["advantage"] = (td["action"] - td["loc"])[:, :1]
    loss = TRPOLoss(actor)
    opt = ConjugateGradientTrustRegion(loss.actor_network_params, max_kl=0.01, cg_iters=10)
    params = opt.params
    common = {"batch": args.batch, "threads": args.threads, "policy": "17-200-200-6",
              "num_params": sum(p.numel() for p in params)}

    def grad_once():
        torch.autograd.grad(loss(td)["loss_objective"], params)

    grad_once()
    t_grad = _best(grad_once, args.repeats)

    # perturb so the KL Hessian is evaluated away from a trivial point, as within CG
    fvp = opt.fisher_vector_product(lambda: loss.kl(td))
    v = torch.randn(sum(p.numel() for p in params))
    fvp(v)
    t_fvp = _best(lambda: fvp(v), args.repeats)
    t_fvp_setup = _best(lambda: opt.fisher_vector_product(lambda: loss.kl(td)), args.repeats)

    print(json.dumps({"name": "gradient", "seconds": round(t_grad, 4), **common}))
    print(json.dumps({"name": "fisher_vector_product", "seconds": round(t_fvp, 4), **common}))
    print(json.dumps({"name": "fvp_graph_setup", "seconds": round(t_fvp_setup, 4), **common}))
    print(json.dumps({"name": "fvp_over_gradient", "ratio": round(t_fvp / t_grad, 3), "target": 3.0, **common}))

    saved = [p.detach().clone() for p in params]

    def full_update():
        with torch.no_grad():
            for p, s in zip(params, saved):
                p.copy_(s)
        return trpo_step(loss, opt, td)

    info = full_update()
    t_update = _best(full_update, args.repeats)
    print(json.dumps({"name": "trpo_update", "seconds": round(t_update, 4), "cg_iters": 10,
                      "accepted": bool(info["accepted"]),
                      "step_fraction": float(info["step_fraction"]),
                      "update_over_gradient": round(t_update / t_grad, 2), **common}))


if __name__ == "__main__":
    main()
