"""Dynamics-ensemble speed figures, one JSON line per figure, all measured in the same run.

Run: ``python benchmarks/bench_ensemble.py`` (add ``--quick`` for a short smoke run).

Figures:
  * ``gemm``: float32 GEMM throughput of a matmul sized like the BREMEN hidden layer.
  * ``layer_variants``: fwd+bwd of one 1024x1024 ensemble layer for several kernel layouts.
  * ``train_step``: forward+backward+Adam of an ensemble train step at BREMEN size
    (5 x [23 -> 1024 -> 1024 -> 17] ReLU, 1000 rows per member) and MB2PO size
    (5 x [23 -> 4 x 200 -> 36] swish, 256 rows per member) for our EnsembleMLP
    (bmm / loop / auto), a Python loop over 5 nn.Sequential, and torch.vmap over stacked params.
  * ``grouped_predict``: ``DynamicsEnsemble.predict(member_index=...)`` grouped_mm vs padded vs
    loop vs computing every member then gathering.
  * ``fit_precision``: ``EnsembleTrainer.fit`` with ``matmul_precision="ieee"`` vs ``"bf16"``
    (where the CPU has native bfloat16) on 8 000 random-action HalfCheetah-v5 transitions, same
    seeds: wall time and the best holdout loss of each, at the quick and BREMEN sizes.
  * ``trainer_step``: ``EnsembleTrainer``'s epoch (shuffle, minibatch gather, forward, loss,
    backward, fused Adam) per step, at the quick (5 x [23 -> 2 x 200 -> 17]), MB2PO
    (5 x [23 -> 4 x 200 swish -> 36], Gaussian NLL) and BREMEN (5 x [23 -> 2 x 1024 -> 17])
    sizes, batch 256 per member, against the generic step (autograd into ``.grad``, then
    ``optimizer.step()``), the implementation before issue 15 (tensordict
    minibatches through ``EnsembleDynamicsLoss``), the big-GEMM rate and the time of the step's
    matrix products alone at their own shapes (forward, weight and input gradients), and (with
    native bfloat16) the same step with ``matmul_precision="bf16"``.
  * ``holdout_score``: ``EnsembleTrainer._holdout_mse`` (every member on every holdout row, once
    per epoch) on 3 000 rows at the quick, MB2PO and BREMEN sizes, against the same call with the
    previous settings (16 MB row chunks, out-of-place ReLUs), interleaved; both scores compared
    bit for bit.
Each figure is one function ``bench_<name>(args) -> list[dict]`` so more can be added.
"""
from __future__ import annotations

import argparse
import copy
import json
import time
from typing import Callable

import torch
from torch import nn
from torch.func import functional_call, stack_module_state

from tensordict import TensorDict

from torchrl_depeff.modules.ensemble import DynamicsEnsemble, EnsembleMLP
from torchrl_depeff.trainers.dynamics import EnsembleTrainer, _cpu_matmul_precision, _native_bf16

E = 5
SIZES = {
    # name: (in, hidden, out, activation, rows per member)
    "bremen": (23, (1024, 1024), 17, nn.ReLU, 1000),
    "mb2po": (23, (200, 200, 200, 200), 36, nn.SiLU, 256),
}



def _adam(params) -> torch.optim.Optimizer:
    """The same optimiser for every variant: fused Adam, as ``EnsembleTrainer`` uses."""
    return torch.optim.Adam(params, lr=1e-3, fused=True)

def _timeit(fn: Callable[[], object], min_time: float, warmup: int = 3) -> float:
    """Seconds per call of one function (see :func:`_time_group`)."""
    return _time_group({"fn": fn}, min_time, warmup)["fn"]


def _time_group(
    fns: dict[str, Callable[[], object]], min_time: float, warmup: int = 3, rounds: int = 5
) -> dict[str, float]:
    """Seconds per call of several functions, measured round-robin so they share conditions.

    This 2-core machine is shared with other jobs, so a single block of calls can be slowed
    by an order of magnitude (an OpenMP barrier waiting for a descheduled thread costs a
    scheduler quantum). Each function is warmed up (at least ``warmup`` calls and
    ``min_time / 2`` seconds: the first tens of train steps of a fresh process are slower),
    then timed in ``rounds`` interleaved blocks of about ``min_time / rounds`` seconds; the
    reported figure is the fastest block (least-disturbed), as ``timeit`` recommends.
    """
    reps = {}
    for name, fn in fns.items():
        t_end = time.perf_counter() + min_time / 2
        done = 0
        while done < warmup or time.perf_counter() < t_end:
            fn()
            done += 1
        t0 = time.perf_counter()
        fn()
        one = max(time.perf_counter() - t0, 1e-6)
        reps[name] = max(1, int(min_time / rounds / one))
    best = {name: float("inf") for name in fns}
    for _ in range(rounds):
        for name, fn in fns.items():
            t0 = time.perf_counter()
            for _ in range(reps[name]):
                fn()
            best[name] = min(best[name], (time.perf_counter() - t0) / reps[name])
    return best


def _emit(record: dict) -> dict:
    print(json.dumps(record), flush=True)
    return record


def _mlp_flops(in_f: int, hidden: tuple[int, ...], out_f: int, rows: int) -> float:
    sizes = [in_f, *hidden, out_f]
    return 2.0 * rows * sum(a * b for a, b in zip(sizes[:-1], sizes[1:]))


# ----------------------------------------------------------------------------- figures
def bench_gemm(args: argparse.Namespace) -> list[dict]:
    """float32 GEMM throughput, [1000, 1024] @ [1024, 1024] (the BREMEN hidden layer)."""
    a, b = torch.randn(1000, 1024), torch.randn(1024, 1024)
    sec = _timeit(lambda: a @ b, args.min_time)
    gflops = 2 * 1000 * 1024 * 1024 / sec / 1e9
    return [_emit({"figure": "gemm", "shape": [1000, 1024, 1024], "gflops": round(gflops, 2)})]


def bench_layer_variants(args: argparse.Namespace, gemm_gflops: float) -> list[dict]:
    """fwd+bwd of one ensemble layer 1024 -> 1024, per-member input [5, 1000, 1024]."""
    n, d = 1000, 1024
    x = torch.randn(E, n, d, requires_grad=True)
    w = torch.randn(E, d, d, requires_grad=True)  # [E, in, out]
    wt = torch.randn(E, d, d, requires_grad=True)  # [E, out, in] (nn.Linear layout)
    b = torch.randn(E, 1, d, requires_grad=True)
    g = torch.randn(E, n, d)
    variants = {
        "baddbmm_[E,in,out]": lambda: torch.baddbmm(b, x, w),
        "bmm+bias_[E,in,out]": lambda: torch.bmm(x, w) + b,
        "baddbmm_[E,out,in]^T": lambda: torch.baddbmm(b, x, wt.transpose(1, 2)),
        "loop_addmm_[E,in,out]": lambda: torch.stack([torch.addmm(b[e], x[e], w[e]) for e in range(E)]),
        "loop_linear_[E,out,in]": lambda: torch.stack(
            [nn.functional.linear(x[e], wt[e], b[e, 0]) for e in range(E)]
        ),
    }
    flops = 3 * 2.0 * E * n * d * d
    out = []
    secs = _time_group({name: (lambda fn=fn: fn().backward(g)) for name, fn in variants.items()}, args.min_time)
    for name, sec in secs.items():
        out.append(_emit({
            "figure": "layer_variants", "variant": name, "ms": round(sec * 1e3, 3),
            "gflops": round(flops / sec / 1e9, 2), "frac_gemm": round(flops / sec / 1e9 / gemm_gflops, 3),
        }))
    return out


def _make_train_steps(size: str) -> tuple[dict[str, Callable[[], None]], float]:
    in_f, hidden, out_f, act, rows = SIZES[size]
    x = torch.randn(E, rows, in_f)
    y = torch.randn(E, rows, out_f)
    steps: dict[str, Callable[[], None]] = {}

    def ours(kernel: str) -> Callable[[], None]:
        torch.manual_seed(0)
        mlp = EnsembleMLP(E, in_f, out_f, num_cells=hidden, activation_class=act, kernel=kernel)
        opt = _adam(mlp.parameters())

        def step() -> None:
            opt.zero_grad(set_to_none=True)
            loss = 0.5 * (mlp(x, member_first=True) - y).pow(2).sum(-1).mean(-1).sum()
            loss.backward()
            opt.step()
        return step

    for kernel in ("bmm", "loop", "auto"):
        steps[f"ours_{kernel}"] = ours(kernel)

    def make_seq() -> nn.Sequential:
        sizes = [in_f, *hidden, out_f]
        layers: list[nn.Module] = []
        for i, (a, b) in enumerate(zip(sizes[:-1], sizes[1:])):
            layers.append(nn.Linear(a, b))
            if i < len(sizes) - 2:
                layers.append(act())
        return nn.Sequential(*layers)

    members = [make_seq() for _ in range(E)]
    opt_loop = _adam([p for m in members for p in m.parameters()])

    def loop_step() -> None:
        opt_loop.zero_grad(set_to_none=True)
        loss = sum(0.5 * (m(x[e]) - y[e]).pow(2).sum(-1).mean() for e, m in enumerate(members))
        loss.backward()
        opt_loop.step()
    steps["loop_sequential"] = loop_step

    params, buffers = stack_module_state([make_seq() for _ in range(E)])
    base = copy.deepcopy(members[0]).to("meta")
    opt_vmap = _adam(list(params.values()))

    def call(p, b, xe):
        return functional_call(base, (p, b), (xe,))

    vcall = torch.vmap(call)

    def vmap_step() -> None:
        opt_vmap.zero_grad(set_to_none=True)
        loss = 0.5 * (vcall(params, buffers, x) - y).pow(2).sum(-1).mean(-1).sum()
        loss.backward()
        opt_vmap.step()
    steps["vmap"] = vmap_step
    flops = 3 * E * _mlp_flops(in_f, hidden, out_f, rows)  # fwd + bwd (2x fwd); Adam excluded
    return steps, flops


def bench_train_step(args: argparse.Namespace, gemm_gflops: float) -> list[dict]:
    """Train-step throughput at BREMEN and MB2PO sizes, ours vs alternatives."""
    records = []
    a, b = torch.randn(1000, 1024), torch.randn(1024, 1024)
    for size in SIZES:
        steps, flops = _make_train_steps(size)
        # the GEMM reference is re-timed inside the same round-robin group, so the fractions
        # compare figures taken under the same machine load
        secs = _time_group({"gemm": lambda: a @ b, **steps}, args.min_time)
        gemm_gflops = max(gemm_gflops, 2 * 1000 * 1024 * 1024 / secs.pop("gemm") / 1e9)
        records.append(_emit({"figure": "gemm_in_group", "size": size, "gflops": round(gemm_gflops, 2)}))
        for name, sec in secs.items():
            gf = flops / sec / 1e9
            records.append(_emit({
                "figure": "train_step", "size": size, "impl": name, "steps_per_s": round(1 / sec, 2),
                "gflops": round(gf, 2), "frac_gemm": round(gf / gemm_gflops, 3),
            }))
        best_alt = min(secs["loop_sequential"], secs["vmap"])
        records.append(_emit({
            "figure": "train_step_ratio", "size": size,
            "ours_auto_speed_over_best_alternative": round(best_alt / secs["ours_auto"], 3),
        }))
    return records


def bench_grouped_predict(args: argparse.Namespace) -> list[dict]:
    """predict(member_index=...) at BREMEN size, 10k rows: kernels vs full+gather."""
    torch.manual_seed(0)
    n = 10_000 if not args.quick else 2_000
    model = DynamicsEnsemble(17, 6, num_members=E, num_cells=(1024, 1024))
    obs, act = torch.randn(n, 17), torch.randn(n, 6)
    idx = torch.randint(E, (n,))

    def full_gather() -> torch.Tensor:
        loc = model.predict(obs, act).loc
        return loc.gather(0, idx[None, :, None].expand(1, n, 17))[0]

    def grouped(kind: str) -> Callable[[], torch.Tensor]:
        def fn() -> torch.Tensor:
            model.grouped_kernel = kind
            return model.predict(obs, act, member_index=idx).loc
        return fn

    records = []
    with torch.no_grad():
        fns = {"grouped_mm": grouped("grouped_mm"), "padded": grouped("padded"), "loop": grouped("loop"),
               "full_gather": full_gather}
        for name, sec in _time_group(fns, args.min_time).items():
            records.append(_emit({"figure": "grouped_predict", "impl": name, "rows": n,
                                  "ms": round(sec * 1e3, 3)}))
    model.grouped_kernel = "auto"
    return records


TRAINER_SIZES = {
    # name: (hidden, activation, probabilistic + reward head)
    "quick": ((200, 200), nn.ReLU, False),
    "mb2po": ((200, 200, 200, 200), nn.SiLU, True),
    "bremen": ((1024, 1024), nn.ReLU, False),
}


def _reference_epoch(trainer: EnsembleTrainer, train: TensorDict) -> None:
    """EnsembleTrainer._train_epoch before issue 15: tensordict minibatches through the loss."""
    n = train.shape[0]
    perms = torch.rand(E, n, generator=trainer._generator).argsort(dim=1)
    for start in range(0, n, trainer.batch_size):
        out = trainer.loss_module(train[perms[:, start : start + trainer.batch_size]])
        trainer.optimizer.zero_grad(set_to_none=True)
        out["loss_dynamics"].backward()
        trainer.optimizer.step()


def _gemm_bound(sizes: list[int], b: int) -> Callable[[], None]:
    """The matrix products of one train step alone: forward, weight gradient, input gradient
    (not for the first layer, whose input needs no gradient), as batched matmuls."""
    ops = []
    for i, (a, o) in enumerate(zip(sizes[:-1], sizes[1:])):
        x, w, g = torch.randn(E, b, a), torch.randn(E, a, o), torch.randn(E, b, o)
        ops.append((torch.bmm, x, w))
        ops.append((torch.bmm, x.transpose(1, 2), g))
        if i:
            ops.append((torch.bmm, g, w.transpose(1, 2)))

    def run() -> None:
        for fn, p, q in ops:
            fn(p, q)
    return run


def bench_trainer_step(args: argparse.Namespace, gemm_gflops: float) -> list[dict]:
    """EnsembleTrainer epoch time per step, new vs previous implementation vs GEMM bounds."""
    records = []
    b, steps = 256, (8 if args.quick else 40)
    n = b * steps
    a, big = torch.randn(1000, 1024), torch.randn(1024, 1024)
    for size, (hidden, act, prob) in TRAINER_SIZES.items():
        torch.manual_seed(0)
        obs, action = torch.randn(n, 17), torch.randn(n, 6)
        data = TensorDict({"observation": obs, "action": action, ("next", "observation"): obs + 0.1 * torch.randn(n, 17),
                           ("next", "reward"): torch.randn(n, 1)}, [n])
        trainers = {}
        for name in ("new", "generic", "previous"):
            torch.manual_seed(0)
            model = DynamicsEnsemble(17, 6, num_members=E, num_cells=hidden, activation=act, probabilistic=prob,
                                     predict_reward=prob)
            trainer = EnsembleTrainer(model, batch_size=b, max_epochs=1)
            if name == "generic":  # the step before the direct path: autograd into .grad, optimizer.step()
                trainer._step_plan = lambda x: None
            prepared = trainer._prepare(data)
            model.fit_normalizers(obs, action, data["next", "observation"], data["next", "reward"] if prob else None)
            trainers[name] = (trainer, prepared, trainer._normalized(prepared))
        sizes = [23, *hidden, trainers["new"][0].ensemble.network.out_features]
        fns = {
            "gemm": lambda: a @ big,
            "shape_gemm_bound": (lambda run=_gemm_bound(sizes, b): [run() for _ in range(steps)]),
            "new": (lambda t=trainers["new"]: t[0]._train_epoch(t[2])),
            "generic": (lambda t=trainers["generic"]: t[0]._train_epoch(t[2])),
            "previous": (lambda t=trainers["previous"]: _reference_epoch(t[0], t[1])),
        }
        if _native_bf16():  # the "new" trainer's step with bfloat16 products (what fit(matmul_precision="bf16") runs)
            fns["bf16"] = lambda t=trainers["new"]: _bf16_epoch(t[0], t[2])
        secs = _time_group(fns, args.min_time, warmup=2, rounds=5)
        big_gflops = max(gemm_gflops, 2 * 1000 * 1024 * 1024 / secs.pop("gemm") / 1e9)
        flops = 3 * E * _mlp_flops(sizes[0], tuple(hidden), sizes[-1], b)  # fwd + bwd (2x fwd), per step
        bound = secs.pop("shape_gemm_bound") / steps
        rec = {"figure": "trainer_step", "size": size, "batch_per_member": b, "gemm_gflops": round(big_gflops, 2),
               "shape_gemm_bound_ms": round(bound * 1e3, 3),
               "shape_gemm_bound_frac_gemm": round(flops / bound / 1e9 / big_gflops, 3)}
        for name, sec in secs.items():
            per_step = sec / steps
            rec[f"{name}_ms_per_step"] = round(per_step * 1e3, 3)
            rec[f"{name}_frac_gemm"] = round(flops / per_step / 1e9 / big_gflops, 3)
        rec["new_over_previous_speed"] = round(secs["previous"] / secs["new"], 3)
        rec["new_over_generic_speed"] = round(secs["generic"] / secs["new"], 3)
        rec["new_frac_of_shape_bound"] = round(bound * steps / secs["new"], 3)
        if "bf16" in secs:
            rec["bf16_over_new_speed"] = round(secs["new"] / secs["bf16"], 3)
        records.append(_emit(rec))
    return records


def _bf16_epoch(trainer: EnsembleTrainer, train: tuple[torch.Tensor, torch.Tensor]) -> None:
    with _cpu_matmul_precision("bf16"):
        trainer._train_epoch(train)


def bench_fit_precision(args: argparse.Namespace) -> list[dict]:
    """Whole fits in float32 and with bfloat16 products: time and holdout loss, same data and seeds."""
    if not _native_bf16():
        return [_emit({"figure": "fit_precision", "skipped": "no native bfloat16 on this CPU"})]
    from torchrl_depeff.envs import make_vector_env

    env = make_vector_env("halfcheetah", 8)
    env.set_seed(0)
    torch.manual_seed(0)
    data = env.rollout(200 if args.quick else 1000).reshape(-1)  # random actions
    records = []
    for size, (hidden, epochs) in {"quick": ((200, 200), 50), "bremen": ((1024, 1024), 10)}.items():
        rec: dict = {"figure": "fit_precision", "size": size, "rows": data.shape[0], "epochs": epochs}
        for precision in ("ieee", "bf16"):
            secs, losses = 0.0, []
            for seed in range(1 if args.quick else 3):
                torch.manual_seed(seed)
                model = DynamicsEnsemble(17, 6, num_members=E, num_cells=hidden)
                trainer = EnsembleTrainer(model, batch_size=256, max_epochs=2 if args.quick else epochs,
                                          patience=1000, seed=seed, matmul_precision=precision)
                t0 = time.perf_counter()
                losses.append(trainer.fit(data).holdout_loss.mean().item())
                secs += time.perf_counter() - t0
            rec[f"{precision}_fit_s"] = round(secs, 2)
            rec[f"{precision}_holdout_loss"] = [round(v, 6) for v in losses]
        rec["bf16_over_ieee_speed"] = round(rec["ieee_fit_s"] / rec["bf16_fit_s"], 3)
        rec["bf16_over_ieee_holdout"] = round(sum(rec["bf16_holdout_loss"]) / sum(rec["ieee_holdout_loss"]), 4)
        records.append(_emit(rec))
    return records


def bench_holdout_score(args: argparse.Namespace) -> list[dict]:
    """The per-epoch holdout score, current settings vs 16 MB chunks and out-of-place ReLUs."""
    from torchrl_depeff.modules.ensemble import EnsembleMLP

    records = []
    current = EnsembleTrainer._holdout_mse

    def previous(trainer: EnsembleTrainer, holdout: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
        # the score before: 16 MB row chunks (_chunk_rows) and out-of-place activations
        x, y = holdout
        ens = trainer.ensemble
        width = max(layer.out_features for layer in ens.network.layers)
        hooked = EnsembleMLP._hooked
        EnsembleMLP._hooked = lambda self: True  # as if hooked: no in-place activation
        try:
            with torch.no_grad():
                means = [ens._split_heads(ens.network(part, member_first=False, kernel="bmm"),
                                          ens.max_logvar, ens.min_logvar)[0]
                         for part in x.split(trainer._chunk_rows(width))]
        finally:
            EnsembleMLP._hooked = hooked
        mean = means[0] if len(means) == 1 else torch.cat(means, 1)
        return (mean - y).pow(2).mean((1, 2))

    sizes = {"quick": ((200, 200), nn.ReLU, False), "mb2po": ((200,) * 4, nn.SiLU, True),
             "bremen": ((1024, 1024), nn.ReLU, False)}
    rows = 3000
    for size, (hidden, act, prob) in sizes.items():
        torch.manual_seed(0)
        model = DynamicsEnsemble(17, 6, num_members=E, num_cells=hidden, activation=act, probabilistic=prob,
                                  predict_reward=prob)
        trainer = EnsembleTrainer(model)
        out = model.network.out_features
        holdout = (torch.randn(rows, 23), torch.randn(rows, out // 2 if prob else out))
        times = _time_group({"current": lambda: current(trainer, holdout),
                             "previous": lambda: previous(trainer, holdout)}, args.min_time)
        records.append(_emit({
            "figure": "holdout_score", "size": size, "rows": rows,
            "current_ms": round(times["current"] * 1e3, 2), "previous_ms": round(times["previous"] * 1e3, 2),
            "speedup": round(times["previous"] / times["current"], 2),
            "bitwise_equal": bool(torch.equal(current(trainer, holdout), previous(trainer, holdout))),
        }))
    return records


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="short timing blocks (smoke run)")
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    parser.add_argument("--only", default=None, help="comma-separated figure names")
    args = parser.parse_args()
    args.min_time = 0.2 if args.quick else 2.0
    if args.threads:
        torch.set_num_threads(args.threads)
    only = set(args.only.split(",")) if args.only else None
    _emit({"figure": "config", "threads": torch.get_num_threads(), "torch": torch.__version__,
           "quick": args.quick})
    gemm = bench_gemm(args)[0]["gflops"]
    if only is None or "layer_variants" in only:
        bench_layer_variants(args, gemm)
    if only is None or "train_step" in only:
        bench_train_step(args, gemm)
    if only is None or "grouped_predict" in only:
        bench_grouped_predict(args)
    if only is None or "trainer_step" in only:
        bench_trainer_step(args, gemm)
    if only is None or "fit_precision" in only:
        bench_fit_precision(args)
    if only is None or "holdout_score" in only:
        bench_holdout_score(args)


if __name__ == "__main__":
    main()
