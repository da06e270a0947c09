"""AWAC update throughput (MB2PO App. 7.1 sizes) and MB2PO branched-rollout throughput.

Figures (one JSON line each):

* ``awac_update_ours``: AWAC steps/s of :class:`~torchrl_depeff.algorithms.MB2PO`'s update
  (``AWACLoss`` with its default ``critic_kernel="auto"``, a per-critic loop on CPU, + Adam for
  actor and critics + ``SoftUpdate``); ``awac_update_ours_vmap`` the same with
  ``critic_kernel="vmap"`` (TorchRL's vmapped critics), timed in the same interleaved rounds;
* ``awac_update_reference``: the same update written as a plain single-file PyTorch
  implementation below (a GMM actor, separate Q networks evaluated in a Python loop, Adam, a
  parameter loop for the soft update), same network sizes and batch;
* ``awac_update_speedup``: ours / reference, measured in the same run with interleaved rounds
  (median over rounds);
* ``gemm_bound``: the matrix-multiply FLOPs of one update (counted from the layer sizes: ours
  runs the online critics at the dataset pairs once, the reference twice), the best fp32 GEMM
  rate measured on this machine for the update's layer shapes, and the resulting lower bound on
  the time of *any* implementation of the same update; ``max_speedup_vs_reference`` =
  reference time / that bound (what a perfect implementation with zero non-GEMM cost would get);
* ``branched_rollout``: imagined transitions/s of ``MB2PO.collect_model_rollouts`` (5-member
  4 x 200 swish probabilistic ensemble, elites, per-sample members, cov-Frobenius penalty,
  the 4 x 256 GMM actor), buffer insertion included.

Run: ``python benchmarks/bench_awac.py`` (defaults: HalfCheetah sizes, obs 17, act 6, batch 1024,
4 x 256, 10 value samples, 2 critics). ``--quick`` for a small smoke run.
"""
from __future__ import annotations

import argparse
import copy
import json
import math
import statistics
import time

import torch
from tensordict import TensorDict
from torch import nn
from torch.nn import functional as F

from torchrl_depeff.algorithms.mb2po import MB2PO, MB2POConfig, TRAIN_KEYS


# ----------------------------------------------------------------------------- reference
class RefActor(nn.Module):
    """Plain tanh-GMM policy: MLP -> logits [B, K], loc [B, K, d], scale [B, K, d]."""

    def __init__(self, obs_dim: int, act_dim: int, cells: list[int], k: int) -> None:
        super().__init__()
        layers, last = [], obs_dim
        for c in cells:
            layers += [nn.Linear(last, c), nn.ReLU()]
            last = c
        layers.append(nn.Linear(last, k * (1 + 2 * act_dim)))
        self.net = nn.Sequential(*layers)
        self.k, self.d = k, act_dim

    def forward(self, obs):
        out = self.net(obs)
        logits = out[..., : self.k]
        rest = out[..., self.k :].reshape(*out.shape[:-1], self.k, 2 * self.d)
        loc, log_std = rest[..., : self.d], rest[..., self.d :]
        return logits, loc, log_std.clamp(-5.0, 2.0).exp()


def ref_log_prob(logits, loc, scale, action):
    a = action.clamp(-1 + 1e-6, 1 - 1e-6)
    u = torch.atanh(a)
    diff = (u.unsqueeze(-2) - loc) / scale
    log_n = (-0.5 * diff.pow(2) - scale.log() - 0.5 * math.log(2 * math.pi)).sum(-1)
    log_mix = torch.logsumexp(torch.log_softmax(logits, -1) + log_n, -1)
    log_det = (2.0 * (math.log(2.0) - u - F.softplus(-2.0 * u))).sum(-1)
    return log_mix - log_det


def ref_sample(logits, loc, scale, n: int | None = None):
    if n is not None:
        logits = logits.expand(n, *logits.shape)
        loc = loc.expand(n, *loc.shape)
        scale = scale.expand(n, *scale.shape)
    idx = torch.distributions.Categorical(logits=logits).sample()
    gi = idx[..., None, None].expand(*idx.shape, 1, loc.shape[-1])
    mu, sd = loc.gather(-2, gi).squeeze(-2), scale.gather(-2, gi).squeeze(-2)
    return torch.tanh(mu + sd * torch.randn_like(mu)).clamp(-1 + 1e-6, 1 - 1e-6)


def ref_q(obs_dim: int, act_dim: int, cells: list[int]) -> nn.Module:
    layers, last = [], obs_dim + act_dim
    for c in cells:
        layers += [nn.Linear(last, c), nn.ReLU()]
        last = c
    layers.append(nn.Linear(last, 1))
    return nn.Sequential(*layers)


class ReferenceAWAC:
    """Straightforward AWAC update: same maths as ``AWACLoss`` (min over critics, V from
    ``n_v`` policy samples, weight clamp 20, one-step clipped double-Q target)."""

    def __init__(self, obs_dim, act_dim, cells, k=5, n_q=2, n_v=10, lam=1.0, gamma=0.99, tau=5e-3):
        self.actor = RefActor(obs_dim, act_dim, cells, k)
        self.qs = [ref_q(obs_dim, act_dim, cells) for _ in range(n_q)]
        self.targets = [copy.deepcopy(q) for q in self.qs]
        self.actor_opt = torch.optim.Adam(self.actor.parameters(), lr=3e-4, weight_decay=1e-4)
        self.q_opt = torch.optim.Adam([p for q in self.qs for p in q.parameters()], lr=3e-4)
        self.n_v, self.lam, self.gamma, self.tau = n_v, lam, gamma, tau

    def min_q(self, nets, obs, act):
        x = torch.cat([obs, act], -1)
        return torch.stack([q(x).squeeze(-1) for q in nets]).min(0).values

    def step(self, obs, act, rew, nobs, term):
        logits, loc, scale = self.actor(obs)
        log_prob = ref_log_prob(logits, loc, scale, act)
        with torch.no_grad():
            q = self.min_q(self.qs, obs, act)
            pi_a = ref_sample(logits, loc, scale, self.n_v)  # [n_v, B, d]
            v = self.min_q(self.qs, obs.expand(self.n_v, *obs.shape), pi_a).mean(0)
            w = torch.exp((q - v) / self.lam).clamp_max(20.0)
        actor_loss = -(w * log_prob).mean()
        with torch.no_grad():
            nl, nloc, nsc = self.actor(nobs)
            na = ref_sample(nl, nloc, nsc)
            y = rew + self.gamma * (1.0 - term) * self.min_q(self.targets, nobs, na)
        x = torch.cat([obs, act], -1)
        q_loss = sum((qn(x).squeeze(-1) - y).pow(2) for qn in self.qs).mean()
        self.actor_opt.zero_grad()
        self.q_opt.zero_grad()
        (actor_loss + q_loss).backward()
        self.actor_opt.step()
        self.q_opt.step()
        with torch.no_grad():
            for q, t in zip(self.qs, self.targets):
                for p, tp in zip(q.parameters(), t.parameters()):
                    tp.mul_(1 - self.tau).add_(p, alpha=self.tau)


# ----------------------------------------------------------------------------- helpers
def synthetic_dataset(n: int, obs_dim: int, act_dim: int, seed: int = 0) -> TensorDict:
    g = torch.Generator().manual_seed(seed)
    obs = torch.randn(n, obs_dim, generator=g)
    act = torch.rand(n, act_dim, generator=g) * 2 - 1
    w = torch.randn(act_dim, obs_dim, generator=g) * 0.1
    nxt = obs + act @ w + 0.01 * torch.randn(n, obs_dim, generator=g)
    return TensorDict(
        {
            "observation": obs,
            "action": act,
            "next": {
                "observation": nxt,
                "reward": nxt[:, :1] - 0.1 * act.pow(2).sum(-1, keepdim=True),
                "done": torch.zeros(n, 1, dtype=torch.bool),
                "terminated": torch.zeros(n, 1, dtype=torch.bool),
            },
        },
        batch_size=[n],
    )


def copy_weights_and_check(algo: MB2PO, ref: ReferenceAWAC, batch: TensorDict) -> dict[str, float]:
    """Load our parameters into the reference and compare the deterministic parts of the update.

    Checks that the two implementations compute the same thing: the actor log-prob of dataset
    actions, the clipped double-Q value ``min_i Q_i(s, a)`` and the target value of a fixed next
    action (the policy samples themselves use different random streams).
    """
    with torch.no_grad():
        ours_net = algo.actor.module[0].module.mlp
        for src, dst in zip(ours_net.parameters(), ref.actor.net.parameters()):
            dst.copy_(src)
        flat = algo.loss_module.qvalue_network_params.flatten_keys()
        flat_t = algo.loss_module.target_qvalue_network_params.flatten_keys()
        for i, (q, t) in enumerate(zip(ref.qs, ref.targets)):
            for name, p in q.named_parameters():
                p.copy_(flat[f"module.{name}"][i])
            for name, p in t.named_parameters():
                p.copy_(flat_t[f"module.{name}"][i])
        obs, act = batch["observation"], batch["action"]
        logits, loc, scale = ref.actor(obs)
        lp_ref = ref_log_prob(logits, loc, scale, act)
        lp_ours = algo.loss_module._dist(batch.select("observation")).log_prob(act)
        q_ref = ref.min_q(ref.qs, obs, act)
        q_ours = algo.loss_module._aggregate(
            algo.loss_module._qvalues(batch.select("observation"), act, algo.loss_module.qvalue_network_params)
        )
        qt_ref = ref.min_q(ref.targets, obs, act)
        qt_ours = algo.loss_module._aggregate(
            algo.loss_module._qvalues(batch.select("observation"), act, algo.loss_module.target_qvalue_network_params)
        )
    return {
        "max_abs_log_prob_diff": (lp_ref - lp_ours).abs().max().item(),
        "max_abs_q_diff": (q_ref - q_ours).abs().max().item(),
        "max_abs_target_q_diff": (qt_ref - qt_ours).abs().max().item(),
    }


def mlp_macs(sizes: list[int]) -> int:
    return sum(i * o for i, o in zip(sizes[:-1], sizes[1:]))


def update_gemm_flops(o: int, a: int, cells: list[int], k: int, n_q: int, n_v: int, b: int, *, reuse: bool) -> float:
    """Matrix-multiply FLOPs (2 per multiply-add) of one AWAC update.

    Forward passes: actor at s (with grad) and s'; critics at (s, a) with grad, at (s, a_i) for
    ``n_v`` policy samples, target critics at (s', a'); the reference also re-runs the online
    critics at (s, a) without grad (``reuse=False``). A backward pass costs two GEMMs per layer
    (weight and input gradients) except the input gradient of the first layer.
    """
    actor = mlp_macs([o, *cells, k * (1 + 2 * a)])
    critic = mlp_macs([o + a, *cells, 1])
    fwd = b * (2 * actor) + n_q * b * critic * (1 + n_v + 1 + (0 if reuse else 1))
    bwd = b * (2 * actor - o * cells[0]) + n_q * b * (2 * critic - (o + a) * cells[0])
    return 2.0 * (fwd + bwd)


def best_gemm_rate(shapes: list[tuple[int, int, int]], repeats: int = 5) -> float:
    """Highest fp32 ``addmm`` FLOP/s measured over ``shapes`` (``[m, k] @ [k, n]``)."""
    best = 0.0
    for m, kk, n in shapes:
        x, w, bias = torch.randn(m, kk), torch.randn(kk, n), torch.randn(n)
        torch.addmm(bias, x, w)
        reps = max(1, int(2e9 // (2 * m * kk * n)))
        for _ in range(repeats):
            t0 = time.perf_counter()
            for _ in range(reps):
                torch.addmm(bias, x, w)
            best = max(best, reps * 2.0 * m * kk * n / (time.perf_counter() - t0))
    return best


def time_steps(fn, steps: int) -> float:
    t0 = time.perf_counter()
    for _ in range(steps):
        fn()
    return steps / (time.perf_counter() - t0)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--obs-dim", type=int, default=17)
    parser.add_argument("--act-dim", type=int, default=6)
    parser.add_argument("--batch-size", type=int, default=1024)
    parser.add_argument("--num-cells", type=int, nargs="+", default=[256, 256, 256, 256])
    parser.add_argument("--num-value-samples", type=int, default=10)
    parser.add_argument("--steps", type=int, default=10, help="AWAC steps per timing round")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--rollouts", type=int, default=10_000, help="parallel branched rollouts")
    parser.add_argument("--horizon", type=int, default=5)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--quick", action="store_true")
    args = parser.parse_args(argv)
    if args.quick:
        args.batch_size, args.num_cells, args.steps, args.rounds, args.rollouts = 128, [32, 32], 3, 2, 500
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    o, a, b = args.obs_dim, args.act_dim, args.batch_size
    data = synthetic_dataset(max(4 * b, 5000), o, a)
    cfg = MB2POConfig(
        batch_size=b, num_cells=tuple(args.num_cells), num_value_samples=args.num_value_samples,
        model_max_epochs=1, omega=1.0, horizon=args.horizon,
        model_samples_per_iteration=args.rollouts * args.horizon, rollout_batch_size=args.rollouts,
        retain_iterations=2,
        model_cells=(200, 200, 200, 200) if not args.quick else (32, 32),
    )
    algo = MB2PO(data, cfg)
    ref = ReferenceAWAC(o, a, args.num_cells, k=cfg.num_components, n_v=args.num_value_samples)
    batch = algo.real_buffer.sample(b).select(*TRAIN_KEYS)
    obs, act = batch["observation"], batch["action"]
    rew = batch["next", "reward"].squeeze(-1)
    nobs = batch["next", "observation"]
    term = batch["next", "terminated"].squeeze(-1).float()

    # same batch for both (sampling excluded; it is timed separately below)
    loss = algo.loss_module

    def ours():
        loss.critic_kernel = "auto"
        algo._awac_step(batch)

    def ours_vmap():
        loss.critic_kernel = "vmap"
        algo._awac_step(batch)

    def reference():
        ref.step(obs, act, rew, nobs, term)

    check = copy_weights_and_check(algo, ref, batch)
    print(json.dumps({"figure": "reference_check", **check}))
    if max(check.values()) > 1e-3:
        raise RuntimeError(f"the reference does not compute the same update as ours: {check}")
    ours(), ours_vmap(), reference()  # warm-up
    r_ours, r_vmap, r_ref, ratios, ratios_vmap = [], [], [], [], []
    for _ in range(args.rounds):  # interleaved rounds: all see the same machine load
        so = time_steps(ours, args.steps)
        sv = time_steps(ours_vmap, args.steps)
        sr = time_steps(reference, args.steps)
        r_ours.append(so)
        r_vmap.append(sv)
        r_ref.append(sr)
        ratios.append(so / sr)
        ratios_vmap.append(sv / sr)
    loss.critic_kernel = "auto"
    common = {"batch_size": b, "num_cells": args.num_cells, "num_value_samples": args.num_value_samples,
              "num_qvalue_nets": 2, "threads": args.threads, "rounds": args.rounds, "steps_per_round": args.steps}
    print(json.dumps({"figure": "awac_update_ours", "steps_per_s": statistics.median(r_ours),
                      "critic_kernel": "auto (loop on CPU)", **common}))
    print(json.dumps({"figure": "awac_update_ours_vmap", "steps_per_s": statistics.median(r_vmap),
                      "ratio_vs_reference": statistics.median(ratios_vmap), **common}))
    print(json.dumps({"figure": "awac_update_reference", "steps_per_s": statistics.median(r_ref), **common}))
    print(json.dumps({"figure": "awac_update_speedup", "ratio": statistics.median(ratios),
                      "ratio_min": min(ratios), "ratio_max": max(ratios), **common}))

    # lower bound of any implementation of the same update: its GEMM FLOPs at the best rate
    cells, n_v = list(args.num_cells), args.num_value_samples
    shapes = [(b, cells[0], cells[0]), (n_v * b, cells[0], cells[0]), (b, o + a, cells[0])]
    rate = best_gemm_rate(shapes)
    k = cfg.num_components
    flops_ours = update_gemm_flops(o, a, cells, k, 2, n_v, b, reuse=True)
    flops_ref = update_gemm_flops(o, a, cells, k, 2, n_v, b, reuse=False)
    bound_s = flops_ours / rate
    ref_s = 1.0 / statistics.median(r_ref)
    print(json.dumps({
        "figure": "gemm_bound", "gemm_gflop_per_update_ours": flops_ours / 1e9,
        "gemm_gflop_per_update_reference": flops_ref / 1e9, "best_gemm_gflop_per_s": rate / 1e9,
        "lower_bound_s_per_update": bound_s, "reference_s_per_update": ref_s,
        "ours_s_per_update": 1.0 / statistics.median(r_ours),
        "max_speedup_vs_reference": ref_s / bound_s, **common,
    }))

    # mixed-batch sampling cost (two torchrl buffers + cat)
    model_rows = data[: 2 * b].clone().set("is_real", torch.zeros(2 * b, dtype=torch.bool))
    algo.model_buffer.extend(model_rows.select(*TRAIN_KEYS))
    algo._num_real, algo._num_model = int(round(0.8 * b)), b - int(round(0.8 * b))
    algo.sample_mixed_batch()
    sps = time_steps(algo.sample_mixed_batch, 20)
    print(json.dumps({"figure": "mixed_batch_sampling", "batches_per_s": sps, "batch_size": b, "omega": 0.8}))

    # branched rollouts (MB2PO Alg. 1 inner loops)
    algo.fit_model()
    algo.collect_model_rollouts()  # warm-up
    n_rounds = max(1, args.rounds // 2)
    t0 = time.perf_counter()
    for _ in range(n_rounds):
        algo.collect_model_rollouts()
    dt = time.perf_counter() - t0
    print(json.dumps({
        "figure": "branched_rollout", "transitions_per_s": n_rounds * algo.rows_per_iteration / dt,
        "rollouts": args.rollouts, "horizon": args.horizon, "model_cells": list(cfg.model_cells),
        "num_members": cfg.num_members, "threads": args.threads,
    }))


if __name__ == "__main__":
    main()
