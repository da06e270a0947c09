"""Our TRPO update against sb3-contrib's ``TRPO.train()`` on the same HalfCheetah-v5 batch.

One batch of 2048 steps is collected once with sb3-contrib's own rollout machinery
(``collect_rollouts``, GAE with gamma 0.99, lambda 0.95) and handed to both sides:

* ``sb3``: ``TRPO("MlpPolicy")`` (64-64 tanh policy with a state-independent log-std),
  ``model.train()``: surrogate + KL gradient, ``cg_max_steps=10`` conjugate-gradient iterations
  with double-backward Hessian-vector products, backtracking line search (<= 10 trials), and the
  critic fit (``n_critic_updates`` epochs of Adam on minibatches of 128; 0 for the actor-only
  figure). It rebuilds the old distribution with one extra forward pass.
* ``ours``: ``make_gaussian_actor(17, 6, num_cells=(64, 64), learn_sigma=True, sigma=1.0)``
  (same layer sizes and log-std; BREMEN's mean is ``tanh``-squashed, one extra element-wise op),
  one forward to store the old policy's ``loc``/``scale``/log-prob (what a collector would have
  written: timed here to match sb3's extra pass), ``trpo_step`` with 10 CG iterations (default
  ``fisher="auto"``: the closed-form MLP Fisher product), and, for the critic figure, the same
  number of Adam steps on a 64-64 ``ValueOperator`` regressing the same returns in minibatches of
  128 (``nn.functional.mse_loss`` on the ``ValueOperator``'s MLP, fused Adam).

Both sides start every repetition from the same saved parameters (same work each time), timed
in interleaved rounds, 1 torch thread; the figure is the median over rounds of ours / sb3.

Usage: PYTHONPATH=. python benchmarks/bench_trpo_sb3.py [--rounds 7] [--threads 1] [--critic-epochs 10]
"""
from __future__ import annotations

import argparse
import copy
import json
import statistics
import time

import gymnasium as gym
import torch
from sb3_contrib import TRPO
from tensordict import TensorDict
from torch import nn
from torchrl.modules import MLP, ValueOperator

from torchrl_depeff.modules.actors import make_gaussian_actor
from torchrl_depeff.objectives import trpo_step, TRPOLoss
from torchrl_depeff.optim import ConjugateGradientTrustRegion


def _sb3_model(env_id: str, seed: int, critic_epochs: int) -> TRPO:  # noqa: D103
    return TRPO("MlpPolicy", gym.make(env_id), n_steps=2048, batch_size=128, cg_max_steps=10,
                line_search_max_iter=10, n_critic_updates=critic_epochs, target_kl=0.01, seed=seed, device="cpu")


def _collect(model: TRPO) -> None:
    _, callback = model._setup_learn(total_timesteps=2048, callback=None)
    callback.on_training_start(locals(), globals())
    model.collect_rollouts(model.env, callback, model.rollout_buffer, n_rollout_steps=model.n_steps)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--env", default="HalfCheetah-v5")
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--critic-epochs", type=int, default=10)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)

    model = _sb3_model(args.env, 0, 0)
    _collect(model)
    buf = model.rollout_buffer
    obs = torch.as_tensor(buf.observations.reshape(2048, -1), dtype=torch.float32)
    act = torch.as_tensor(buf.actions.reshape(2048, -1), dtype=torch.float32)
    adv = torch.as_tensor(buf.advantages.reshape(2048, 1), dtype=torch.float32)
    ret = torch.as_tensor(buf.returns.reshape(2048, 1), dtype=torch.float32)
    o, a = obs.shape[-1], act.shape[-1]

    actor = make_gaussian_actor(o, a, num_cells=(64, 64), learn_sigma=True, sigma=1.0)
    critic = ValueOperator(MLP(in_features=o, out_features=1, num_cells=[64, 64], activation_class=nn.Tanh),
                           in_keys=["observation"])
    loss = TRPOLoss(actor)
    opt = ConjugateGradientTrustRegion(loss, max_kl=0.01, cg_iters=10, backtrack_iters=10)
    critic_opt = torch.optim.Adam(critic.parameters(), lr=1e-3, fused=True)
    saved = {"actor": copy.deepcopy(actor.state_dict()), "critic": copy.deepcopy(critic.state_dict()),
             "critic_opt": copy.deepcopy(critic_opt.state_dict()),
             "sb3": copy.deepcopy(model.policy.state_dict()),
             "sb3_opt": copy.deepcopy(model.policy.optimizer.state_dict())}
    gen = torch.Generator().manual_seed(0)

    def ours(critic_epochs: int) -> TensorDict:
        with torch.no_grad():  # the old policy's parameters, as a collector would have stored them
            td = actor(TensorDict(observation=obs, batch_size=[2048]))
        td.set("action", act)
        td.set("action_log_prob", actor.get_dist(td.clone()).log_prob(act).detach())
        td.set("advantage", adv)
        info = trpo_step(loss, opt, td)
        for _ in range(critic_epochs):
            for idx in torch.randperm(2048, generator=gen).split(128):
                value = critic.module(obs[idx])  # the ValueOperator's MLP, without TensorDict plumbing
                critic_loss = nn.functional.mse_loss(value, ret[idx])
                critic_opt.zero_grad()
                critic_loss.backward()
                critic_opt.step()
        return info

    def restore(e: int) -> None:
        actor.load_state_dict(saved["actor"])
        critic.load_state_dict(saved["critic"])
        critic_opt.load_state_dict(saved["critic_opt"])
        model.n_critic_updates = e
        model.policy.load_state_dict(saved["sb3"])
        model.policy.optimizer.load_state_dict(saved["sb3_opt"])

    def timed(fn) -> float:
        t0 = time.perf_counter()
        fn()
        return time.perf_counter() - t0

    common = {"env": args.env, "batch": 2048, "policy": f"{o}-64-64-{a}", "cg_iters": 10, "threads": args.threads}
    for e in (0, args.critic_epochs):
        restore(e)
        ours(e), model.train()  # warm-up
        t_ours, t_sb3, ratios = [], [], []
        for _ in range(args.rounds):
            restore(e)
            to = timed(lambda: ours(e))
            restore(e)
            ts = timed(model.train)
            t_ours.append(to)
            t_sb3.append(ts)
            ratios.append(to / ts)
        restore(e)
        info = ours(e)
        print(json.dumps({"name": "trpo_update" if e == 0 else "trpo_update_with_critic",
                          "critic_fit_included": e > 0, "critic_epochs": e,
                          "ours_seconds": round(statistics.median(t_ours), 4),
                          "sb3_seconds": round(statistics.median(t_sb3), 4),
                          "ours_over_sb3": round(statistics.median(ratios), 3),
                          "ratio_min_max": [round(min(ratios), 3), round(max(ratios), 3)], "target": 0.5,
                          "ours_accepted": bool(info["accepted"]), "ours_kl": float(info["kl"]), **common}))
    restore(0)


if __name__ == "__main__":
    main()
