"""Deployment collection throughput on HalfCheetah-v5 (issue 8, DESIGN.md "Collection speed").

Run: ``python benchmarks/bench_collect.py`` (full, ~4 min on 2 cores), ``--quick`` (smoke run,
~1.5 min, not for the record), ``--only single`` / ``--only workers`` (one half). On a shared
machine wrap it in the CPU lock: ``flock /tmp/cpu.lock python benchmarks/bench_collect.py``.

The same policy everywhere: a 17-64-64-6 tanh MLP (deterministic mean) plus stationary
``N(0, 0.1^2)`` deployment noise (BREMEN App. F.1), evaluated by torch with 1 thread.

Figures, one JSON line each (transitions per second, ``tps``; every line carries the 1-min load
average):

* ``plain_loop``: a plain single-env gymnasium loop (obs -> torch -> policy -> numpy -> step,
  reset on done): the baseline a user would write by hand.
* ``single_vector``: ``collect_deployment(collector="single")`` on
  ``make_vector_env("halfcheetah", n, backend=...)`` for each ``--num-envs``, each ``--backends``
  (``"native"``: our lean ``NativeVectorEnv``, auto-reset mode not used; ``"gym_wrapper"``: TorchRL's
  ``GymWrapper`` + transforms, once per auto-reset mode in ``--modes``), end to end
  (env construction excluded, collector construction included), ``ratio`` = tps / plain_loop tps
  (target >= 1.5); ``single_vector_best`` names the best configuration.
* ``raw_vector_loop``: a hand-written loop over a gymnasium ``SyncVectorEnv`` of ``--raw-num-envs``
  envs with one batched policy call per step, no TorchRL: the ceiling of in-process batching
  (the MuJoCo steps still run one after the other), reported to locate the gap, not a target.
* ``multisync_workers_steady``: ``MultiSyncCollector`` with 1 and 2 worker processes, each stepping
  a ``make_vector_env`` of ``--worker-envs`` envs, timed over batches 2..``--batches`` (process
  start-up and the first batch excluded, shutdown excluded), 1 and 2 workers interleaved over
  ``--rounds`` rounds, best round of each; ``ratio`` = 2 workers / 1 worker, target >= 1.7.
* ``multisync_workers_end_to_end``: the same through ``collect_deployment(collector="multisync")``
  for ``--e2e-steps`` transitions (default 100k, half of BREMEN's 200k deployment), start-up and
  shutdown included.

Timing: the machine is shared, so plain_loop and single_vector are timed interleaved over
``--rounds`` rounds and the best round of each is reported; ratios come from the same run.
"""
from __future__ import annotations

import argparse
import functools
import json
import os
import time

import torch
from tensordict import TensorDictBase
from tensordict.nn import TensorDictModule, TensorDictModuleBase, TensorDictSequential
from torch import nn
from torchrl.collectors import MultiSyncCollector
from torchrl.envs.utils import ExplorationType

from torchrl_depeff.collectors.deployment import collect_deployment, freeze_policy
from torchrl_depeff.envs.vector import make_vector_env

OBS, ACT, SIGMA = 17, 6, 0.1


class GaussianNoise(TensorDictModuleBase):
    """Stationary deployment noise ``a + N(0, sigma^2)`` (BREMEN App. F.1)."""

    def __init__(self, sigma: float) -> None:
        super().__init__()
        self.sigma = sigma
        self.in_keys, self.out_keys = ["action"], ["action"]

    def forward(self, td: TensorDictBase) -> TensorDictBase:
        td.set("action", td.get("action") + self.sigma * torch.randn_like(td.get("action")))
        return td


def make_net() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(OBS, 64), nn.Tanh(), nn.Linear(64, 64), nn.Tanh(), nn.Linear(64, ACT))


def plain_loop(net: nn.Module, steps: int) -> float:
    """Transitions/s of a hand-written single-env gymnasium loop with the same policy."""
    import gymnasium as gym

    env = gym.make("HalfCheetah-v5")
    obs, _ = env.reset(seed=0)
    t0 = time.perf_counter()
    with torch.no_grad():
        for _ in range(steps):
            a = net(torch.as_tensor(obs, dtype=torch.float32))
            a = a + SIGMA * torch.randn_like(a)
            obs, _, term, trunc, _ = env.step(a.numpy())
            if term or trunc:
                obs, _ = env.reset()
    return steps / (time.perf_counter() - t0)


def raw_vector_loop(net: nn.Module, num_envs: int, steps: int) -> float:
    """Transitions/s of a hand-written batched loop: gymnasium SyncVectorEnv + one batched policy call.

    No TorchRL at all (``SAME_STEP`` auto-reset): the ceiling of in-process batching on this machine.
    """
    import gymnasium as gym

    venv = gym.vector.SyncVectorEnv(
        [functools.partial(gym.make, "HalfCheetah-v5")] * num_envs,
        autoreset_mode=gym.vector.AutoresetMode.SAME_STEP,
    )
    obs, _ = venv.reset(seed=0)
    n = max(1, steps // num_envs)
    t0 = time.perf_counter()
    with torch.no_grad():
        for _ in range(n):
            a = net(torch.as_tensor(obs, dtype=torch.float32))
            a = a + SIGMA * torch.randn_like(a)
            obs, _, _, _, _ = venv.step(a.numpy())
    tps = n * num_envs / (time.perf_counter() - t0)
    venv.close()
    return tps


def single_vector(
    policy: nn.Module, noise: nn.Module, num_envs: int, mode: str, steps: int, backend: str = "native"
) -> float:
    """Transitions/s of one in-process deployment on a batched env (collector start-up included)."""
    env = make_vector_env("halfcheetah", num_envs, seed=0, autoreset_mode=mode, backend=backend)
    t0 = time.perf_counter()
    data, _ = collect_deployment(
        policy, env, steps, exploration=noise, deployment=0, policy_version=0,
        exploration_type=ExplorationType.DETERMINISTIC, frames_per_batch=min(steps, 50 * num_envs),
    )
    tps = data.shape[0] / (time.perf_counter() - t0)
    env.close()
    return tps


def multisync_steady(
    deployed: nn.Module, workers: int, worker_envs: int, mode: str, batches: int, steps_per_batch: int
) -> float:
    """Steady-state transitions/s of a MultiSyncCollector (start-up, first batch, shutdown excluded)."""
    factory = functools.partial(make_vector_env, "halfcheetah", worker_envs, autoreset_mode=mode)
    coll = MultiSyncCollector(
        [factory] * workers, deployed, frames_per_batch=workers * worker_envs * steps_per_batch,
        total_frames=-1, cat_results=0, exploration_type=ExplorationType.DETERMINISTIC,
        auto_register_policy_transforms=False,
    )
    n, t0, t1 = 0, None, None
    try:
        for i, batch in enumerate(coll):
            if i == 1:  # the first batch includes worker start-up and warm-up
                t0 = time.perf_counter()
            elif i > 1:
                n += batch.numel()
            if i == batches:
                t1 = time.perf_counter()  # before shutdown, which takes seconds
                break
    finally:
        coll.shutdown()
    return n / (t1 - t0)


def _load() -> float:
    return round(os.getloadavg()[0], 2)


def emit(rec: dict) -> None:
    rec["load_avg_1min"] = _load()
    print(json.dumps(rec), flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="smoke run (~1.5 min, not for the record)")
    parser.add_argument("--num-envs", type=int, nargs="+", default=[16, 32, 64, 128])
    parser.add_argument("--modes", nargs="+", default=["same_step", "disabled"])
    parser.add_argument("--backends", nargs="+", default=["native", "gym_wrapper"], choices=["native", "gym_wrapper"])
    parser.add_argument("--steps", type=int, default=20_000, help="transitions per single_vector timing")
    parser.add_argument("--raw-num-envs", type=int, default=64, help="envs of the raw_vector_loop ceiling")
    parser.add_argument("--worker-envs", type=int, default=16)
    parser.add_argument("--batches", type=int, default=12, help="multisync batches (first one not timed)")
    parser.add_argument("--e2e-steps", type=int, default=100_000, help="transitions per end-to-end deployment")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--only", choices=["single", "workers"], default=None)
    args = parser.parse_args()
    torch.set_num_threads(1)
    if args.quick:
        args.steps, args.rounds, args.batches, args.e2e_steps = 3_000, 1, 3, 12_000
    steps, rounds = args.steps, args.rounds
    net = make_net()
    policy = TensorDictModule(net, ["observation"], ["action"])
    noise = GaussianNoise(SIGMA)
    emit({
        "figure": "config", "quick": args.quick, "torch_threads": torch.get_num_threads(),
        "cpu_count": os.cpu_count(), "torch": torch.__version__,
    })

    if args.only in (None, "single"):
        # plain loop vs in-process batched collection, interleaved rounds, best of rounds
        best: dict[str, float] = {}
        plain_steps = max(steps // 4, 500)
        # (backend, auto-reset mode): the native backend has no auto-reset mode
        configs = [("native", "disabled")] if "native" in args.backends else []
        if "gym_wrapper" in args.backends:
            configs += [("gym_wrapper", mode) for mode in args.modes]
        for _ in range(rounds):
            best["plain"] = max(best.get("plain", 0.0), plain_loop(net, plain_steps))
            best["raw"] = max(best.get("raw", 0.0), raw_vector_loop(net, args.raw_num_envs, steps))
            for backend, mode in configs:
                for n in args.num_envs:
                    key = f"{backend}/{mode}/{n}" if backend == "gym_wrapper" else f"native/{n}"
                    best[key] = max(best.get(key, 0.0), single_vector(policy, noise, n, mode, steps, backend))
        emit({"figure": "plain_loop", "tps": round(best["plain"], 1), "steps": plain_steps, "rounds": rounds})
        for backend, mode in configs:
            for n in args.num_envs:
                tps = best[f"{backend}/{mode}/{n}" if backend == "gym_wrapper" else f"native/{n}"]
                emit({
                    "figure": "single_vector", "backend": backend,
                    "autoreset_mode": mode if backend == "gym_wrapper" else None, "num_envs": n,
                    "steps": steps, "rounds": rounds, "tps": round(tps, 1), "ratio": round(tps / best["plain"], 3),
                    "target": 1.5,
                })
        emit({
            "figure": "raw_vector_loop", "num_envs": args.raw_num_envs, "steps": steps, "rounds": rounds,
            "tps": round(best["raw"], 1), "ratio": round(best["raw"] / best["plain"], 3),
            "note": "ceiling of in-process batching without TorchRL (not a target)",
        })
        key = max((k for k in best if k not in ("plain", "raw")), key=best.get)
        emit({
            "figure": "single_vector_best", "config": key, "ratio": round(best[key] / best["plain"], 3),
            "target": 1.5, "met": best[key] / best["plain"] >= 1.5,
        })

    if args.only in (None, "workers"):
        # 2 workers vs 1 (steady state, start-up excluded), then end to end through collect_deployment
        mode = args.modes[-1]
        deployed = TensorDictSequential(freeze_policy(policy), noise)
        spb = 50  # env steps per worker per batch
        steady: dict[int, float] = {}
        for _ in range(rounds):  # interleaved, best round of each
            for w in (1, 2):
                tps = multisync_steady(deployed, w, args.worker_envs, mode, args.batches, spb)
                steady[w] = max(steady.get(w, 0.0), tps)
        emit({
            "figure": "multisync_workers_steady", "backend": "native (make_vector_env default)",
            "autoreset_mode": mode, "worker_envs": args.worker_envs,
            "timed_batches": args.batches - 1, "rounds": rounds, "tps_1_worker": round(steady[1], 1),
            "tps_2_workers": round(steady[2], 1), "ratio": round(steady[2] / steady[1], 3), "target": 1.7,
            "met": steady[2] / steady[1] >= 1.7,
        })
        e2e = {}
        for w in (1, 2):
            factory = functools.partial(make_vector_env, "halfcheetah", args.worker_envs, autoreset_mode=mode)
            _, info = collect_deployment(
                policy, factory, args.e2e_steps, exploration=noise, deployment=0, policy_version=0,
                collector="multisync", num_workers=w, frames_per_batch=w * args.worker_envs * spb,
                exploration_type=ExplorationType.DETERMINISTIC,
            )
            e2e[w] = info["transitions_per_s"]
        emit({
            "figure": "multisync_workers_end_to_end", "autoreset_mode": mode, "worker_envs": args.worker_envs,
            "steps": args.e2e_steps, "tps_1_worker": round(e2e[1], 1), "tps_2_workers": round(e2e[2], 1),
            "ratio": round(e2e[2] / e2e[1], 3), "target": 1.7, "met": e2e[2] / e2e[1] >= 1.7,
        })


if __name__ == "__main__":
    main()
