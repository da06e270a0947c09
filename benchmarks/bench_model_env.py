"""EnsembleModelEnv rollout throughput vs a bare Python loop over ``ensemble.predict``.

Run: ``python benchmarks/bench_model_env.py`` (``--quick`` for a smoke run).

Both sides do the same work per step: a linear-tanh policy, one ensemble prediction with the
same member selection (``per_step``: only the member drawn
for the whole batch is evaluated; ``per_sample``:
``predict(member_index=...)``; ``mean``: every member averaged; ``per_sample+disagreement``:
every member, gather, and the pairwise-disagreement uncertainty), Gaussian noise for a
probabilistic ensemble, HalfCheetah reward and no termination. Timing is interleaved and
best-of-rounds (the machine is shared). One JSON line per configuration, with
``ratio = env transitions/s / bare-loop transitions/s`` (target >= 0.8).
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
from torchrl.data import Bounded, Unbounded

from torchrl_depeff.envs.model_env import EnsembleModelEnv
from torchrl_depeff.envs.rewards import halfcheetah_reward, no_termination
from torchrl_depeff.modules.ensemble import DynamicsEnsemble

OBS, ACT = 17, 6


def _time_group(fns: dict[str, Callable[[], object]], rounds: int) -> dict[str, float]:
    for fn in fns.values():  # warm-up
        fn()
    best = {name: float("inf") for name in fns}
    names = list(fns)
    for r in range(rounds):
        for name in names if r % 2 == 0 else names[::-1]:  # alternate order each round
            fn = fns[name]
            t0 = time.perf_counter()
            fn()
            best[name] = min(best[name], time.perf_counter() - t0)
    return best


def _bare_loop(model, policy_net, start, steps, mode, gen):
    obs = start[torch.randint(start.shape[0], (B_ROWS[0],), generator=gen)]
    E = model.num_members
    for _ in range(steps):
        action = policy_net(obs)
        if mode == "per_sample":
            idx = torch.randint(E, obs.shape[:-1], generator=gen)
            pred = model.predict(obs, action, member_index=idx)
            loc, scale = pred.loc, pred.scale
        elif mode == "per_step":
            idx = torch.randint(E, (1,), generator=gen).expand(obs.shape[:-1])
            pred = model.predict(obs, action, member_index=idx)
            loc, scale = pred.loc, pred.scale
        else:
            pred = model.predict(obs, action)
            if mode == "mean":
                loc, scale = pred.loc.mean(0), None
            else:  # per_sample + disagreement
                idx = torch.randint(E, obs.shape[:-1], generator=gen)
                x = pred.loc.movedim(0, -2)
                _ = torch.cdist(x, x, compute_mode="donot_use_mm_for_euclid_dist").flatten(-2).amax(-1)
                g = idx[None, :, None].expand(1, *pred.loc.shape[1:])
                loc, scale = pred.loc.gather(0, g)[0], pred.scale.gather(0, g)[0]
        nxt = loc + scale * torch.randn(loc.shape, generator=gen) if scale is not None else loc
        _ = halfcheetah_reward(obs, action, nxt)
        _ = no_termination(obs, action, nxt)
        obs = nxt
    return obs


B_ROWS = [10_000]


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--batch", type=int, default=10_000)
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    batch = 1000 if args.quick else args.batch
    steps = 3 if args.quick else args.steps
    rounds = 2 if args.quick else 7
    B_ROWS[0] = batch
    torch.manual_seed(0)
    model = DynamicsEnsemble(OBS, ACT, num_members=5, num_cells=(200, 200), probabilistic=True)
    policy_net = nn.Sequential(nn.Linear(OBS, ACT), nn.Tanh())
    policy = TensorDictModule(policy_net, in_keys=["observation"], out_keys=["action"])
    start = torch.randn(50_000, OBS)
    configs = [("per_step", ()), ("per_sample", ()), ("mean", ()), ("per_sample", ("disagreement",))]
    for mode, unc in configs:
        env = EnsembleModelEnv(
            model, observation_spec=Unbounded(OBS), action_spec=Bounded(-1.0, 1.0, (ACT,)),
            reward_fn=halfcheetah_reward, termination_fn=no_termination,
            start_states=TensorDict({"observation": start}, [start.shape[0]]), batch_size=batch,
            member_selection=mode, uncertainty=unc, max_episode_steps=1000,
        )
        env.set_seed(0)
        gen = torch.Generator().manual_seed(0)
        bare_mode = "per_sample_unc" if unc else mode

        def run_env(env=env):
            with torch.no_grad():
                env.rollout(steps, policy, break_when_any_done=False)

        def run_bare(bare_mode=bare_mode, gen=gen):
            with torch.no_grad():
                _bare_loop(model, policy_net, start, steps, bare_mode, gen)

        best = _time_group({"env": run_env, "bare": run_bare}, rounds)
        n = batch * steps
        rec = {
            "figure": "model_env_rollout",
            "member_selection": mode,
            "uncertainty": list(unc),
            "batch": batch,
            "steps": steps,
            "ensemble": "5 x 2 x 200 probabilistic",
            "threads": args.threads,
            "env_transitions_per_s": round(n / best["env"]),
            "bare_transitions_per_s": round(n / best["bare"]),
            "ratio": round(best["bare"] / best["env"], 3),
        }
        print(json.dumps(rec), flush=True)


if __name__ == "__main__":
    main()
