"""Tests for the batched real env: true final observations, time-limit flags, specs, rewards."""
from __future__ import annotations

import gymnasium as gym
import numpy as np
import pytest
import torch
from torchrl.collectors import Collector
from torchrl.envs.utils import check_env_specs

from torchrl_depeff.envs.tasks import get_task
from torchrl_depeff.envs.vector import AUTORESET_MODES, BACKENDS, NativeVectorEnv, make_vector_env

torch.set_num_threads(1)


def _collect(env, steps: int, seed: int) -> "TensorDict":  # noqa: F821
    """Random-action data through the same Collector path a deployment uses: ``[N, steps]``."""
    torch.manual_seed(seed)
    coll = Collector(
        env, None, frames_per_batch=steps * env.batch_size.numel(), total_frames=-1,
        auto_register_policy_transforms=False,
    )
    try:
        batch = next(iter(coll))
    finally:
        coll.shutdown()
    return batch


def _replay_check(task_name: str, data, seed: int, limit: int, mode: str) -> dict:
    """Replays every sub-env's recorded actions in a plain gymnasium env; returns counts."""
    task = get_task(task_name)
    n, steps = data.batch_size
    acts = data["action"].double().numpy()
    all_done = data["next", "done"].reshape(n, steps).all(0).numpy()
    counts = {"terminated": 0, "truncated": 0}
    for i in range(n):
        genv = gym.make(task.gym_id, max_episode_steps=limit, **task.gym_kwargs)
        genv.reset(seed=seed + i)  # set_seed
        obs, _ = genv.reset()  # the collector's first reset
        np.testing.assert_allclose(data["observation"][i, 0].numpy(), obs, atol=1e-5)
        for t in range(steps):
            nxt, rew, term, trunc, _ = genv.step(acts[i, t])
            # the recorded next observation is the true one, also at episode ends
            np.testing.assert_allclose(data["next", "observation"][i, t].numpy(), nxt, atol=1e-5, rtol=1e-5)
            assert bool(data["next", "terminated"][i, t]) == term, (i, t)
            assert bool(data["next", "truncated"][i, t]) == trunc, (i, t)
            assert bool(data["next", "done"][i, t]) == (term or trunc), (i, t)
            np.testing.assert_allclose(float(data["next", "env_reward"][i, t]), rew, rtol=1e-5, atol=1e-5)
            counts["terminated"] += int(term)
            counts["truncated"] += int(trunc)
            if term or trunc:
                nxt, _ = genv.reset()
                if mode == "same_step" and all_done[t]:
                    nxt, _ = genv.reset()  # documented TorchRL quirk: every sub-env ended together
                if t + 1 < steps:
                    # the next row starts the new episode (and is not the final observation)
                    assert not np.allclose(data["observation"][i, t + 1].numpy(), data["next", "observation"][i, t].numpy())
            if t + 1 < steps:
                np.testing.assert_allclose(data["observation"][i, t + 1].numpy(), nxt, atol=1e-5, rtol=1e-5)
    return counts


# (backend, autoreset_mode); the native backend resets finished sub-envs itself ("disabled")
CONFIGS = [("native", "disabled")] + [("gym_wrapper", m) for m in AUTORESET_MODES]


@pytest.mark.parametrize("backend,mode", CONFIGS)
def test_specs_and_shapes(backend, mode):
    env = make_vector_env("hopper", 3, seed=0, autoreset_mode=mode, backend=backend)
    check_env_specs(env)
    assert env.batch_size == (3,)
    assert env.observation_spec["observation"].shape == (3, 11)
    assert env.observation_spec["observation"].dtype == torch.float32
    assert env.full_action_spec["action"].shape == (3, 3)


@pytest.mark.parametrize("backend,mode", CONFIGS)
def test_final_observation_and_flags_staggered(backend, mode):
    """Hopper: terminations at different steps in different sub-envs, plus a short time limit."""
    env = make_vector_env("hopper", 3, seed=3, autoreset_mode=mode, max_episode_steps=14, backend=backend)
    data = _collect(env, 120, seed=0)
    counts = _replay_check("hopper", data, seed=3, limit=14, mode=mode)
    assert counts["terminated"] > 0 and counts["truncated"] > 0, counts
    # TaskReward used the true final observation too
    task = get_task("hopper")
    r = task.reward_fn(data["observation"], data["action"], data["next", "observation"])
    torch.testing.assert_close(data["next", "reward"], r.to(data["next", "reward"].dtype))


@pytest.mark.parametrize("backend,mode", CONFIGS)
def test_time_limit_1000_halfcheetah(backend, mode):
    """The real 1000-step limit: truncated (not terminated) exactly at step 1000, true final obs."""
    env = make_vector_env("halfcheetah", 2, seed=11, autoreset_mode=mode, backend=backend)
    data = _collect(env, 1003, seed=1)
    done = data["next", "done"].squeeze(-1)
    assert done.sum().item() == 2 and done[:, 999].all()
    assert data["next", "truncated"].squeeze(-1)[:, 999].all()
    assert not data["next", "terminated"].any()
    _replay_check("halfcheetah", data, seed=11, limit=1000, mode=mode)
    task = get_task("halfcheetah")
    r = task.reward_fn(data["observation"], data["action"], data["next", "observation"])
    torch.testing.assert_close(data["next", "reward"], r.to(data["next", "reward"].dtype))


@pytest.mark.parametrize("backend", BACKENDS)
def test_seed_reproducible(backend):
    a = _collect(make_vector_env("hopper", 2, seed=5, backend=backend), 30, seed=0)
    b = _collect(make_vector_env("hopper", 2, seed=5, backend=backend), 30, seed=0)
    c = _collect(make_vector_env("hopper", 2, seed=6, backend=backend), 30, seed=0)
    torch.testing.assert_close(a["next", "observation"], b["next", "observation"])
    assert not torch.allclose(a["observation"][:, 0], c["observation"][:, 0])
    # sub-envs are seeded differently (seed + i)
    assert not torch.allclose(a["observation"][0, 0], a["observation"][1, 0])


def test_bad_args():
    with pytest.raises(ValueError, match="num_envs"):
        make_vector_env("hopper", 0)
    with pytest.raises(ValueError, match="next_step"):
        make_vector_env("hopper", 2, autoreset_mode="next_step")
    with pytest.raises(ValueError, match="bogus"):
        make_vector_env("bogus", 2)
    with pytest.raises(ValueError, match="max_episode_steps"):
        make_vector_env("hopper", 2, max_episode_steps=0)
    with pytest.raises(ValueError, match="bogus_backend"):
        make_vector_env("hopper", 2, backend="bogus_backend")
    with pytest.raises(TypeError, match="Box"):
        venv = gym.vector.SyncVectorEnv([lambda: gym.make("CartPole-v1")])
        NativeVectorEnv(venv, get_task("hopper").reward_fn)


def test_native_default_and_type():
    env = make_vector_env("hopper", 2, seed=0)
    assert isinstance(env.base_env, NativeVectorEnv)
    assert len(env.transform) == 0  # no DoubleToFloat/TaskReward: done inside the native env


def test_native_rows_match_gym_wrapper_rows():
    """Same seed, same actions: both backends give the same rows (keys, dtypes, values)."""
    native = make_vector_env("hopper", 3, seed=7, max_episode_steps=12)
    old = make_vector_env("hopper", 3, seed=7, max_episode_steps=12, backend="gym_wrapper", autoreset_mode="disabled")
    torch.manual_seed(0)
    actions = torch.rand(3, 40, 3) * 2 - 1
    outs = []
    for env in (native, old):
        td = env.reset()
        rows = []
        for t in range(40):
            td.set("action", actions[:, t])
            row, td = env.step_and_maybe_reset(td)
            rows.append(row.clone())
        outs.append(torch.stack(rows, 1))
    a, b = outs
    assert set(a.keys(True, True)) == set(b.keys(True, True))
    for key in b.keys(True, True):
        assert a.get(key).dtype == b.get(key).dtype, key
        torch.testing.assert_close(a.get(key), b.get(key), rtol=1e-5, atol=1e-5, msg=lambda m, k=key: f"{k}: {m}")
    assert a["next", "done"].any()  # episode ends (time limit or termination) were exercised
    # the task reward, not the env reward, is in "reward"
    assert not torch.allclose(a["next", "reward"], a["next", "env_reward"])


def test_native_partial_reset_only_resets_masked():
    env = NativeVectorEnv(
        gym.vector.SyncVectorEnv([lambda: gym.make("Hopper-v5")] * 3), get_task("hopper").reward_fn
    )
    env.set_seed(0)
    td = env.reset()
    td.set("action", torch.zeros(3, 3))
    nxt = env.step(td)["next"]
    mask = torch.tensor([[False], [True], [False]])
    out = env.reset(nxt.clone().set("_reset", mask))
    # untouched sub-envs keep their current observation, the masked one starts a new episode
    torch.testing.assert_close(out["observation"][[0, 2]], nxt["observation"][[0, 2]])
    assert not torch.allclose(out["observation"][1], nxt["observation"][1])
    assert not out["done"].any()


@pytest.mark.parametrize("backend", ["native", "gym_wrapper"])
def test_nonfinite_action_refused(backend):
    env = make_vector_env("hopper", 2, seed=0, backend=backend)
    td = env.reset()
    td["action"] = torch.zeros(2, 3)
    td["action"][1, 2] = float("nan")
    with pytest.raises(ValueError, match=r"task 'hopper': refusing to step the real env with 1 non-finite .*index \[1, 2\]"):
        env.step(td)
