"""Tests for task reward/termination functions against the real gymnasium envs (BREMEN Table 3)."""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from torchrl_depeff.envs import rewards as R
from torchrl_depeff.envs.tasks import TASK_NAMES, TaskSpec, get_task, make_env

try:
    import gymnasium_robotics  # noqa: F401

    _ROBOTICS = True
except Exception:  # pragma: no cover - depends on the environment
    _ROBOTICS = False

LOCOMOTION = ["halfcheetah", "cheetah_run", "hopper", "walker2d", "ant"]
ROBOTICS = ["fetch_reach", "hand_reach"]


def _params(names):
    marks = [] if _ROBOTICS else [pytest.mark.skip(reason="gymnasium-robotics failed to import")]
    return [pytest.param(n, marks=marks if n in ROBOTICS else []) for n in names]


@pytest.mark.parametrize("name", _params(list(TASK_NAMES)))
def test_real_env_reward_and_termination(name):
    task = get_task(name)
    env = make_env(name)
    env.set_seed(0)
    torch.manual_seed(0)
    steps = 300 if name not in ROBOTICS else 120
    ro = env.rollout(steps, break_when_any_done=False)
    obs, act, nxt = ro["observation"], ro["action"], ro["next", "observation"]
    assert obs.shape[-1] == task.observation_dim and act.shape[-1] == task.action_dim
    r = task.reward_fn(obs, act, nxt)
    assert r.shape == (steps, 1)
    assert torch.allclose(ro["next", "reward"], r)
    term = task.termination_fn(obs, act, nxt)
    assert term.dtype == torch.bool and term.shape == (steps, 1)
    assert torch.equal(term, ro["next", "terminated"])
    if name in ("hopper", "walker2d"):
        assert term.sum() >= 2  # random actions fall over: the check above is not vacuous
    if name in ROBOTICS:
        # sparse reward equals gymnasium-robotics compute_reward (kept as env_reward)
        assert torch.equal(ro["next", "reward"], ro["next", "env_reward"])
        assert (ro["next", "env_reward"] <= 0).all()


@pytest.mark.parametrize("name", ["halfcheetah", "hopper", "walker2d"])  # Ant: gym adds contact cost, no z term
def test_table3_reward_tracks_gym_reward(name):
    # gym uses (x' - x) / dt, Table 3 uses qvel[0]; control costs are identical, so the
    # difference is small relative to the reward's spread
    env = make_env(name)
    env.set_seed(1)
    ro = env.rollout(200, break_when_any_done=False)
    ours, gym_r = ro["next", "reward"].squeeze(-1), ro["next", "env_reward"].squeeze(-1)
    corr = torch.corrcoef(torch.stack([ours, gym_r]))[0, 1]
    assert corr > 0.8, corr


@pytest.mark.parametrize(
    "gym_id,idx,kwargs",
    [("HalfCheetah-v5", R.HALFCHEETAH_XDOT, {}), ("Hopper-v5", R.HOPPER_XDOT, {}),
     ("Walker2d-v5", R.WALKER2D_XDOT, {}),
     ("Ant-v5", R.ANT_XDOT, {"include_cfrc_ext_in_observation": False})],
)
def test_xdot_index_is_root_velocity(gym_id, idx, kwargs):
    import gymnasium as gym

    env = gym.make(gym_id, **kwargs)
    env.reset(seed=0)
    rng = np.random.default_rng(0)
    for _ in range(20):
        obs, *_ = env.step(rng.uniform(-1, 1, env.action_space.shape))
        qvel0 = env.unwrapped.data.qvel[0]
        np.testing.assert_allclose(obs[idx], np.clip(qvel0, -10, 10), rtol=0, atol=1e-12)
    if gym_id.startswith("Ant"):
        assert obs.shape == (27,)
        np.testing.assert_allclose(obs[0], env.unwrapped.data.qpos[2])


def _gym_healthy_agreement(gym_id, term_fn, z_lo, z_hi, a_lo, a_hi, n=400, joint_scale=1.0):
    import gymnasium as gym

    env = gym.make(gym_id)
    env.reset(seed=0)
    u = env.unwrapped
    rng = np.random.default_rng(0)
    z_vals = np.concatenate([[z_lo, np.nextafter(z_lo, np.inf), np.nextafter(z_lo, -np.inf)],
                             [] if math.isinf(z_hi) else [z_hi, np.nextafter(z_hi, -np.inf), np.nextafter(z_hi, np.inf)]])
    a_vals = np.array([a_lo, a_hi, np.nextafter(a_lo, np.inf), np.nextafter(a_hi, -np.inf),
                       np.nextafter(a_lo, -np.inf), np.nextafter(a_hi, np.inf)])
    mismatches, n_term = 0, 0
    for i in range(n):
        qpos = u.init_qpos.copy()
        qvel = rng.uniform(-5, 5, u.model.nv)
        qpos[1] = rng.choice(z_vals) if i % 2 == 0 else rng.uniform(z_lo - 0.2, z_lo + 0.4)
        qpos[2] = rng.choice(a_vals) if i % 3 == 0 else rng.uniform(a_lo * 1.3, a_hi * 1.3)
        qpos[3:] = rng.uniform(-1, 1, qpos[3:].shape) * joint_scale
        u.set_state(qpos, qvel)
        obs = torch.as_tensor(u._get_obs(), dtype=torch.float64).unsqueeze(0)
        ours = bool(term_fn(obs, torch.zeros(1, u.action_space.shape[0]), obs).item())
        gym_term = not u.is_healthy
        n_term += gym_term
        mismatches += ours != gym_term
    return mismatches, n_term


def test_hopper_termination_matches_gym_is_healthy():
    mism, n_term = _gym_healthy_agreement("Hopper-v5", R.hopper_termination, 0.7, math.inf, -0.2, 0.2,
                                          joint_scale=150.0)
    assert mism == 0
    assert 50 < n_term < 400


def test_walker2d_termination_matches_gym_is_healthy():
    mism, n_term = _gym_healthy_agreement("Walker2d-v5", R.walker2d_termination, 0.8, 2.0, -1.0, 1.0)
    assert mism == 0
    assert 50 < n_term < 400


def _obs(dim, **entries):
    o = torch.zeros(1, dim, dtype=torch.float64)
    for k, v in entries.items():
        o[0, int(k[1:])] = v
    return o


@pytest.mark.parametrize(
    "entries,terminated",
    [({"i0": 1.25}, False), ({"i0": 0.7}, True), ({"i0": math.nextafter(0.7, 1)}, False),
     ({"i0": math.inf}, True), ({"i0": math.nan}, True),
     ({"i0": 1.25, "i1": 0.2}, True), ({"i0": 1.25, "i1": -0.2}, True),
     ({"i0": 1.25, "i1": math.nextafter(0.2, 0)}, False), ({"i0": 1.25, "i1": math.nextafter(-0.2, 0)}, False),
     ({"i0": 1.25, "i4": 100.0}, True), ({"i0": 1.25, "i4": -100.0}, True), ({"i0": 1.25, "i4": 99.99}, False),
     ({"i0": 1.25, "i10": 100.0}, True)],
)
def test_hopper_boundaries(entries, terminated):
    o = _obs(11, **entries)
    assert bool(R.hopper_termination(o, torch.zeros(1, 3), o)) is terminated


@pytest.mark.parametrize(
    "entries,terminated",
    [({"i0": 1.25}, False), ({"i0": 0.8}, True), ({"i0": 2.0}, True), ({"i0": math.nextafter(2.0, 0)}, False),
     ({"i0": math.nextafter(0.8, 1)}, False), ({"i0": 1.25, "i1": 1.0}, True), ({"i0": 1.25, "i1": -1.0}, True),
     ({"i0": 1.25, "i1": -0.999}, False), ({"i0": 1.25, "i5": 500.0}, False), ({"i0": math.nan}, True)],
)
def test_walker2d_boundaries(entries, terminated):
    o = _obs(17, **entries)
    assert bool(R.walker2d_termination(o, torch.zeros(1, 6), o)) is terminated


def test_reward_formulas():
    a = torch.tensor([[1.0, -2.0, 0.0, 0.0, 0.0, 0.0]])  # ||a||^2 = 5
    o = torch.zeros(1, 17)
    o[0, 8] = 3.0
    assert torch.allclose(R.halfcheetah_reward(o, a, o), torch.tensor([[3.0 - 0.5]]))
    assert torch.allclose(R.walker2d_reward(o, a, o), torch.tensor([[3.0 - 0.005 + 1.0]]))
    # reward uses next_observation, not observation
    assert torch.allclose(R.halfcheetah_reward(torch.zeros(1, 17), a, o), torch.tensor([[2.5]]))
    ant = torch.zeros(1, 27)
    ant[0, 13], ant[0, 0] = 2.0, 0.77
    a8 = torch.ones(1, 8)
    assert torch.allclose(R.ant_reward(ant, a8, ant), torch.tensor([[2.0 - 0.8 - 3.0 * 0.04 + 1.0]]))
    h = torch.zeros(1, 11)
    h[0, 5] = -1.0
    assert torch.allclose(R.hopper_reward(h, torch.ones(1, 3), h), torch.tensor([[-1.0 - 0.003 + 1.0]]))


def test_cheetah_run_reward():
    xs = torch.tensor([-3.0, 0.0, 2.5, 10.0, 15.0])
    o = torch.zeros(5, 17)
    o[:, 8] = xs
    r = R.cheetah_run_reward(o, torch.ones(5, 6), o).squeeze(-1)
    assert torch.allclose(r, torch.tensor([0.0, 0.0, 0.25, 1.0, 1.0]))


def test_goal_reach_reward_threshold_strict():
    o = torch.tensor([[0.0, 0.0, 0.0, 0.05, 0.0, 0.0], [0.0, 0.0, 0.0, 0.0501, 0.0, 0.0]], dtype=torch.float64)
    r = R.goal_reach_reward(o, slice(0, 3), slice(3, 6), 0.05).squeeze(-1)
    assert r.tolist() == [0.0, -1.0]


def test_get_task_unknown():
    with pytest.raises(ValueError, match="halfcheetah"):
        get_task("cartpole")


def test_task_spec_fields():
    t = get_task("ant")
    assert isinstance(t, TaskSpec)
    assert t.gym_kwargs == {"include_cfrc_ext_in_observation": False, "terminate_when_unhealthy": False}
    assert (t.observation_dim, t.action_dim) == (27, 8)
    assert get_task("hopper").termination_fn is R.hopper_termination
    assert get_task("halfcheetah").termination_fn is R.no_termination


def test_make_env_kwargs_override():
    env = make_env("halfcheetah", ctrl_cost_weight=0.5)
    assert env.base_env._env.unwrapped._ctrl_cost_weight == 0.5


@pytest.mark.parametrize("value", [float("nan"), float("inf")])
def test_nonfinite_action_refused_before_the_step(value):
    env = make_env("hopper")
    td = env.reset()
    td["action"] = torch.tensor([0.0, value, 0.0])
    with pytest.raises(ValueError, match=r"task 'hopper': refusing to step the real env with 1 non-finite .*index \[1\]"):
        env.step(td)
    td["action"] = torch.zeros(3)
    assert torch.isfinite(env.step(td)["next", "reward"]).all()  # the env is still usable
