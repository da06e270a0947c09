"""EnsembleModelEnv rollout throughput vs a bare stacked-weight loop vs the GEMM rate (issue 15).

Run from the repository root: ``python -m benchmarks.bench_model_env`` (``--quick`` for a
smoke run; ``--rows``, ``--steps``, ``--threads``, ``--rounds``, ``--only quick,bremen``).

Three timings per configuration, interleaved round-robin in one process, best of rounds:

* ``env``: ``EnsembleModelEnv.rollout(steps, policy, break_when_any_done=False)`` (the fast
  tensor loop; its output equals TorchRL's generic loop, see ``test/envs/test_model_env_fast.py``),
  HalfCheetah dims (obs 17, act 6), HalfCheetah reward, ``no_termination``;
* ``bare``: a hand-written loop over the same steps doing only the arithmetic: the policy,
  the input normaliser, the stacked-weight ensemble forward with the same member selection
  (``per_step``: the drawn member's weight slices, one ``addmm`` per layer; ``per_sample``:
  rows sorted by member, one ``grouped_mm`` per layer over the stacked ``[E, in, out]``
  weights; ``per_sample+disagreement`` / ``mean``: every member, one ``baddbmm`` per layer),
  the target denormaliser, noise for probabilistic members, the reward. No validity check,
  counters, reset draws or output recording;
* ``gemm``: the matrix products alone at the same shapes, ``addmm`` of
  ``[rows, in] x [in, out]`` for each layer of one member (every member for the all-member
  modes): the rate this machine's GEMM throughput allows for that arithmetic.

* ``floor``: the tensor operations a step of the env needs beyond the bare arithmetic, timed
  alone at the same shapes (non-finite row check, keeping the previous observation there,
  zeroing their reward, step count, truncation, done, drawing the start state a reset would use,
  and the automatic reset of done rows): ``env_over_bare_bound = bare / (bare + floor)`` is what
  the env could reach if its Python cost were zero.

With ``--policy-call``, ``policy_call``: BREMEN's imagination rollout with its sampling Gaussian
actor, the plain-tensor call of the fast loop against the same actor called through a
tensordict (see :func:`bench_policy_call`).

With ``--compile`` one more figure, ``compile_bookkeeping``: that step bookkeeping as one
function, eager vs ``torch.compile`` (time per call, compile seconds, and whether the compiled
function returns the same values on a batch with a non-finite row).

Each JSON line has transitions/s of the three, ``env_over_bare`` (target >= 0.9) and
``bare_over_gemm`` (target >= 0.5), and the GEMM GFLOP/s at those shapes.
"""
from __future__ import annotations

import argparse
import json
import time
from typing import Callable

import torch
from tensordict import TensorDict
from tensordict.nn import TensorDictModule
from torch import nn
from torch.nn import functional as F
from torchrl.data import Bounded, Unbounded

from torchrl_depeff.envs.model_env import EnsembleModelEnv
from torchrl_depeff.envs.rewards import halfcheetah_reward, no_termination
from torchrl_depeff.modules.actors import make_gaussian_actor
from torchrl_depeff.modules.ensemble import DynamicsEnsemble

OBS, ACT, E = 17, 6, 5
SIZES = {"quick": (200, 200), "bremen": (1024, 1024)}


def _time_group(fns: dict[str, Callable[[], object]], rounds: int) -> dict[str, float]:
    """Best-of-``rounds`` seconds per call, the functions interleaved (alternating order)."""
    for fn in fns.values():  # warm-up
        fn()
        fn()
    best = {name: float("inf") for name in fns}
    names = list(fns)
    for r in range(rounds):
        for name in names if r % 2 == 0 else names[::-1]:
            t0 = time.perf_counter()
            fns[name]()
            best[name] = min(best[name], time.perf_counter() - t0)
    return best


def _stacked(model: DynamicsEnsemble) -> tuple[list[torch.Tensor], list[torch.Tensor], list[torch.Tensor]]:
    """Stacked weights ``[E, in, out]``, biases ``[E, out]`` and 16-byte aligned weight copies."""
    ws = [layer.weight.detach() for layer in model.network.layers]
    bs = [layer.bias.detach()[:, 0] for layer in model.network.layers]
    aligned = []
    for w in ws:
        pad = (-w.shape[-1]) % 4
        aligned.append(F.pad(w, (0, pad))[..., : w.shape[-1]] if pad else w)
    return ws, bs, aligned


def _bare_loop(model, policy, start, steps, rows, mode, gen):
    ws, bs, aligned = _stacked(model)
    inn, tn = model.input_normalizer, model.target_normalizer
    acts = list(model.network.activations)
    members = torch.arange(E)
    probabilistic = model.probabilistic
    obs = start[torch.randint(start.shape[0], (rows,), generator=gen)]
    for _ in range(steps):
        action = policy(obs)
        x = (torch.cat([obs, action], -1) - inn.loc) / inn.scale
        if mode == "per_step":
            e = torch.randint(E, (1,), generator=gen)
            h = x
            for i, (w, b) in enumerate(zip(ws, bs)):
                if i:
                    h = acts[i - 1](h)
                h = torch.addmm(b.index_select(0, e)[0], h, w.index_select(0, e)[0])
        elif mode == "per_sample":
            idx = torch.randint(E, (rows,), generator=gen)
            sorted_idx, perm = torch.sort(idx, stable=True)
            offs = torch.searchsorted(sorted_idx, members, right=True).to(torch.int32)
            h = F.pad(x.index_select(0, perm), (0, 1))[:, : x.shape[1]]
            for i, (w, b) in enumerate(zip(aligned, bs)):
                if i:
                    h = acts[i - 1](h)
                h = F.grouped_mm(h, w, offs=offs) + b.index_select(0, sorted_idx)
            h = torch.empty_like(h).index_copy_(0, perm, h)
        else:  # every member: one batched matmul per layer
            h = x.expand(E, *x.shape)
            for i, (w, b) in enumerate(zip(ws, bs)):
                if i:
                    h = acts[i - 1](h)
                h = torch.baddbmm(b[:, None], h, w)
            if mode == "mean":
                h = h.mean(0)
            else:  # per_sample + disagreement
                loc_all = obs + (h[..., :OBS] * tn.scale[:OBS] + tn.loc[:OBS])
                d = torch.cdist(loc_all.movedim(0, 1), loc_all.movedim(0, 1), compute_mode="donot_use_mm_for_euclid_dist")
                _ = d.flatten(-2).amax(-1)
                idx = torch.randint(E, (rows,), generator=gen)
                h = h.gather(0, idx[None, :, None].expand(1, *h.shape[1:]))[0]
        if probabilistic:
            mean, raw = h.chunk(2, -1)
            target = mean * tn.scale + tn.loc
            loc = obs + target[:, :OBS]
            scale = torch.exp(0.5 * raw[:, :OBS]) * tn.scale[:OBS]  # (log-var bounds omitted)
            nxt = loc + scale * torch.randn(loc.shape, generator=gen) if mode != "mean" else loc
        else:
            nxt = obs + (h * tn.scale + tn.loc)[:, :OBS]
        _ = halfcheetah_reward(obs, action, nxt)
        obs = nxt
    return obs


def _gemm_chain(sizes: list[int], rows: int, members: int) -> tuple[Callable[[], object], float]:
    xs = [torch.randn(rows, i) for i in sizes[:-1]]
    ws = [torch.randn(members, i, o) for i, o in zip(sizes[:-1], sizes[1:])]
    bs = [torch.randn(members, o) for o in sizes[1:]]

    def chain() -> None:
        for x, w, b in zip(xs, ws, bs):
            for e in range(members):
                torch.addmm(b[e], x, w[e])

    flops = 2.0 * rows * members * sum(i * o for i, o in zip(sizes[:-1], sizes[1:]))
    return chain, flops


def _bookkeeping_floor(rows: int, pool: torch.Tensor) -> Callable[[], None]:
    obs, nxt, reward = torch.randn(rows, OBS), torch.randn(rows, OBS), torch.randn(rows, 1)
    step_count = torch.zeros(rows, 1, dtype=torch.long)
    zeros = torch.zeros_like(step_count)

    def floor() -> None:
        invalid = (nxt * 0).sum(-1, keepdim=True) != 0
        n = torch.where(invalid, obs, nxt)
        reward.masked_fill(invalid, 0.0)
        sc = step_count + 1
        done = invalid | (sc >= 1000)
        start = pool.index_select(0, torch.randint(pool.shape[0], (rows,)))
        torch.where(done, start, n)
        torch.where(done, zeros, sc)
    return floor


def _config(size: str, mode: str, unc: tuple[str, ...], args, policy_kind: str, probabilistic: bool) -> dict:
    torch.manual_seed(0)
    cells = SIZES[size]
    model = DynamicsEnsemble(OBS, ACT, num_members=E, num_cells=cells, probabilistic=probabilistic)
    start = torch.randn(50_000, OBS)
    model.fit_normalizers(start[:5000], torch.rand(5000, ACT) * 2 - 1, start[:5000] + 0.1 * torch.randn(5000, OBS))
    if policy_kind == "linear":
        policy_net: Callable = nn.Sequential(nn.Linear(OBS, ACT), nn.Tanh())
        policy = TensorDictModule(policy_net, in_keys=["observation"], out_keys=["action"])
    else:  # BREMEN's Gaussian actor (quick preset: 64-64 tanh); the bare loop runs its network
        # and draws the Gaussian noise on plain tensors (no log-probability: nothing recorded)
        policy = make_gaussian_actor(OBS, ACT, num_cells=(64, 64))
        net = policy.module[0].module

        def policy_net(obs, net=net):
            loc, scale = net(obs)
            return loc + scale * torch.randn(loc.shape)

    env = EnsembleModelEnv(
        model, observation_spec=Unbounded(OBS), action_spec=Bounded(-1.0, 1.0, (ACT,)),
        reward_fn=halfcheetah_reward, termination_fn=no_termination,
        start_states=TensorDict({"observation": start}, [start.shape[0]]), batch_size=args.rows,
        member_selection=mode, uncertainty=unc, max_episode_steps=1000,
    )
    env.set_seed(0)
    assert env._fast_rollout_ok(policy, None, {"break_when_any_done": False})
    gen = torch.Generator().manual_seed(0)
    bare_mode = "per_sample_unc" if unc else mode
    sizes = [OBS + ACT, *cells, model.network.out_features]
    gemm, gemm_flops = _gemm_chain(sizes, args.rows, E if (unc or mode == "mean") else 1)

    def run_env() -> None:
        with torch.no_grad():
            env.rollout(args.steps, policy, break_when_any_done=False)

    def run_bare() -> None:
        with torch.no_grad():
            _bare_loop(model, policy_net, start, args.steps, args.rows, bare_mode, gen)

    def run_gemm() -> None:
        for _ in range(args.steps):
            gemm()

    floor = _bookkeeping_floor(args.rows, start)

    def run_floor() -> None:
        for _ in range(args.steps):
            floor()

    best = _time_group({"env": run_env, "bare": run_bare, "gemm": run_gemm, "floor": run_floor}, args.rounds)
    n = args.rows * args.steps
    return {
        "figure": "model_env_rollout",
        "ensemble": f"{E} x {'-'.join(map(str, cells))} {'probabilistic' if probabilistic else 'deterministic'}",
        "member_selection": mode,
        "uncertainty": list(unc),
        "policy": policy_kind,
        "rows": args.rows,
        "steps": args.steps,
        "threads": torch.get_num_threads(),
        "env_transitions_per_s": round(n / best["env"]),
        "bare_transitions_per_s": round(n / best["bare"]),
        "gemm_transitions_per_s": round(n / best["gemm"]),
        "gemm_gflops": round(gemm_flops * args.steps / best["gemm"] / 1e9, 2),
        "env_over_bare": round(best["bare"] / best["env"], 3),
        "bare_over_gemm": round(best["gemm"] / best["bare"], 3),
        "env_over_gemm": round(best["gemm"] / best["env"], 3),
        "floor_us_per_step": round(best["floor"] / args.steps * 1e6, 1),
        "env_over_bare_bound": round(best["bare"] / (best["bare"] + best["floor"]), 3),
    }


def _bookkeeping(obs, next_obs, reward, step_count, start, max_steps: int):
    invalid = (next_obs * 0).sum(-1, keepdim=True) != 0
    next_obs = torch.where(invalid, obs, next_obs)
    reward = reward.masked_fill(invalid, 0.0)
    step_count = step_count + 1
    done = invalid | (step_count >= max_steps)
    return (next_obs, reward, done, step_count, torch.where(done, start, next_obs),
            torch.where(done, torch.zeros_like(step_count), step_count))


def bench_compile(rows: int) -> dict:
    obs, nxt, reward = torch.randn(rows, OBS), torch.randn(rows, OBS), torch.randn(rows, 1)
    nxt[3, 2] = float("nan")
    sc, start = torch.randint(0, 999, (rows, 1)), torch.randn(rows, OBS)
    t0 = time.perf_counter()
    compiled = torch.compile(_bookkeeping, dynamic=False)
    with torch.no_grad():
        out_c = compiled(obs, nxt, reward, sc, start, 1000)
        compile_s = time.perf_counter() - t0
        out_e = _bookkeeping(obs, nxt, reward, sc, start, 1000)
        same = all(torch.equal(a, b) for a, b in zip(out_c, out_e))

        def many(fn):
            return lambda: [fn(obs, nxt, reward, sc, start, 1000) for _ in range(200)]

        best = _time_group({"eager": many(_bookkeeping), "compiled": many(compiled)}, 7)
    return {"figure": "compile_bookkeeping", "rows": rows, "eager_us": round(best["eager"] / 200 * 1e6, 1),
            "compiled_us": round(best["compiled"] / 200 * 1e6, 1), "compile_s": round(compile_s, 1),
            "same_values": same}


def bench_policy_call(args) -> list[dict]:
    """A sampling ``ProbabilisticActor`` in the fast loop: plain-tensor call vs tensordict call.

    BREMEN's imagination env (5 x 200-200 deterministic members, ``per_step``, no uncertainty,
    HalfCheetah reward) and its 64-64 Gaussian actor, at the quick preset's shape (50 rows x 100
    steps, ``trpo.batch_size=5000``) and at 200 rows x 50 steps; ``tensordict_call`` forces the
    call through a tensordict (the fast loop before the plain-tensor path) by disabling
    ``_probabilistic_call``. Both give the same rollout (``test/envs/test_model_env_fast.py``).
    """
    import torchrl_depeff.envs.model_env as model_env_module

    out = []
    original = model_env_module._probabilistic_call
    for rows, steps in ((50, 100), (200, 50)):
        torch.manual_seed(0)
        model = DynamicsEnsemble(OBS, ACT, num_members=E, num_cells=SIZES["quick"], probabilistic=False)
        start = torch.randn(50_000, OBS)
        model.fit_normalizers(start[:5000], torch.rand(5000, ACT) * 2 - 1, start[:5000] + 0.1 * torch.randn(5000, OBS))
        env = EnsembleModelEnv(
            model, observation_spec=Unbounded(OBS), action_spec=Bounded(-1.0, 1.0, (ACT,)),
            reward_fn=halfcheetah_reward, termination_fn=no_termination,
            start_states=TensorDict({"observation": start}, [start.shape[0]]), batch_size=rows,
            member_selection="per_step", uncertainty=(), max_episode_steps=1000,
        )
        actor = make_gaussian_actor(OBS, ACT, num_cells=(64, 64), learn_sigma=True)
        steps = 5 if args.quick else steps

        def rollout(plain: bool, env=env, actor=actor, steps=steps) -> None:
            model_env_module._probabilistic_call = original if plain else (lambda policy, in_keys: None)
            try:
                with torch.no_grad():
                    env.rollout(steps, actor, break_when_any_done=False)
            finally:
                model_env_module._probabilistic_call = original

        best = _time_group({"plain": lambda: rollout(True), "tensordict": lambda: rollout(False)}, args.rounds)
        out.append({
            "figure": "policy_call", "rows": rows, "steps": steps, "threads": torch.get_num_threads(),
            "plain_tensor_ms_per_rollout": round(best["plain"] * 1e3, 2),
            "tensordict_call_ms_per_rollout": round(best["tensordict"] * 1e3, 2),
            "speedup": round(best["tensordict"] / best["plain"], 2),
        })
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="smoke run (few rounds, few steps)")
    parser.add_argument("--rows", type=int, default=200, help="parallel rollouts (rows per step)")
    parser.add_argument("--steps", type=int, default=50)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--rounds", type=int, default=9)
    parser.add_argument("--only", default="quick,bremen", help="ensemble sizes: quick,bremen")
    parser.add_argument("--compile", action="store_true", help="also time torch.compile of the bookkeeping")
    parser.add_argument("--policy-call", action="store_true",
                        help="also time a ProbabilisticActor's plain-tensor call against its tensordict call")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    if args.quick:
        args.steps, args.rounds = 5, 2
    print(json.dumps({"figure": "config", "threads": torch.get_num_threads(), "torch": torch.__version__,
                      "rows": args.rows, "steps": args.steps, "rounds": args.rounds}), flush=True)
    configs = [
        ("per_step", (), "linear", False),
        ("per_sample", (), "linear", False),
        ("per_sample", ("disagreement",), "linear", False),
        ("mean", (), "linear", False),
        ("per_sample", (), "linear", True),
        ("per_sample", (), "gaussian_actor", False),
    ]
    for size in [s for s in args.only.split(",") if s]:
        for mode, unc, policy_kind, probabilistic in configs:
            print(json.dumps(_config(size, mode, unc, args, policy_kind, probabilistic)), flush=True)
    if args.compile:
        print(json.dumps(bench_compile(args.rows)), flush=True)
    if args.policy_call:
        for line in bench_policy_call(args):
            print(json.dumps(line), flush=True)


if __name__ == "__main__":
    main()
