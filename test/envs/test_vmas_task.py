"""VMAS task: joint-observation real env and the ensemble model env built from it (issue 8)."""
from __future__ import annotations

import pytest
import torch
from tensordict import TensorDict
from torchrl.envs.utils import check_env_specs

pytest.importorskip("vmas")

from torchrl.envs.libs.vmas import VmasEnv  # noqa: E402

from torchrl_depeff.envs.model_env import EnsembleModelEnv  # noqa: E402
from torchrl_depeff.envs.vmas_task import (  # noqa: E402
    VMAS_TASKS,
    JointAgentsEnv,
    balance_reward,
    make_vmas_env,
)
from torchrl_depeff.modules.ensemble import DynamicsEnsemble  # noqa: E402


@pytest.fixture(autouse=True)
def _one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def test_real_env_joint_layout_matches_per_agent_env():
    """Joint obs = per-agent obs concatenated in agent order; joint action split the same way."""
    env = make_vmas_env("balance", 6, seed=3)
    ref = VmasEnv("balance", num_envs=6, continuous_actions=True)
    ref.set_seed(3)
    check_env_specs(env)
    assert env.n_agents == 3 and env.observation_spec["observation"].shape == (6, 48)
    env.set_seed(3)  # VMAS draws resets from the global torch RNG: seed right before each reset
    td = env.reset()
    ref.set_seed(3)
    td_ref = ref.reset()
    torch.testing.assert_close(td["observation"], td_ref["agents", "observation"].reshape(6, 48))
    torch.testing.assert_close(td["observation"][:, 16:32], td_ref["agents", "observation"][:, 1])
    # agent i must get columns [2i, 2i+2): give each agent a different push and compare
    action = torch.tensor([[1.0, 0.0, 0.0, 1.0, -1.0, -1.0]]).expand(6, 6).clone() * 0.5
    out = env.step(td.set("action", action))
    out_ref = ref.step(td_ref.set(("agents", "action"), action.reshape(6, 3, 2)))
    torch.testing.assert_close(out["next", "observation"], out_ref["next", "agents", "observation"].reshape(6, 48))
    torch.testing.assert_close(out["next", "reward"], out_ref["next", "agents", "reward"].mean(-2))
    # velocities of the agents follow their own action columns (obs cols 2:4 of each agent)
    vel = out["next", "observation"].reshape(6, 3, 16)[..., 2:4]
    assert (vel[:, 0, 0] > 0).all() and (vel[:, 2, 0] < 0).all()  # x pushes of agents 0 and 2
    assert (vel[:, 1, 1] > vel[:, 0, 1] + 0.01).all()  # only agent 1 pushed up


def test_time_limit_is_truncation_not_termination():
    env = make_vmas_env("navigation", 4, seed=0, max_episode_steps=3, n_agents=2)
    td = env.rollout(7, break_when_any_done=False)
    trunc = td["next", "truncated"].squeeze(-1)
    # steps 3 and 6 hit the limit (counter reset by the auto-reset after step 3)
    assert trunc[:, 2].all() and trunc[:, 5].all() and not trunc[:, [0, 1, 3, 4]].any()
    assert td["next", "done"].squeeze(-1)[:, 2].all()
    assert not td["next", "terminated"].any()  # navigation never terminates by itself
    # the auto-reset after the limit starts new episodes: observations jump
    assert not torch.allclose(td["observation"][:, 3], td["next", "observation"][:, 2])


def test_balance_reward_matches_real_dense_reward():
    """reward_fn on recorded joint transitions = the real reward wherever no fall happens."""
    env = make_vmas_env("balance", 32, seed=1)
    torch.manual_seed(0)
    td = env.rollout(20, break_when_any_done=False)  # random joint actions
    obs, act, nxt = td["observation"], td["action"], td["next", "observation"]
    real = td["next", "reward"]
    model = balance_reward(obs, act, nxt)
    keep = ~td["next", "done"]
    assert keep.sum() > 300
    torch.testing.assert_close(model[keep], real[keep], rtol=1e-4, atol=1e-4)
    assert real[keep].abs().max() > 1e-3  # the dense term is not trivially zero
    # sign: moving the package closer to the goal is rewarded
    closer = nxt.clone()
    closer[..., 8:10] = 0.5 * obs[..., 8:10]
    assert (balance_reward(obs, act, closer) >= 0).all()


@pytest.mark.parametrize("task", ["balance", "navigation"])
def test_model_env_from_vmas_passes_check_env_specs(task):
    real = make_vmas_env(task, 8, seed=0, n_agents=2)
    spec = VMAS_TASKS[task]
    o = real.observation_spec["observation"].shape[-1]
    a = real.action_spec.shape[-1]
    ensemble = DynamicsEnsemble(o, a, num_members=3, num_cells=(16,), predict_reward=spec.reward_fn is None)
    starts = real.rollout(5, break_when_any_done=False)["next", "observation"].reshape(-1, o)
    model_env = EnsembleModelEnv.from_env(
        real,
        ensemble,
        reward_fn=spec.reward_fn,
        termination_fn=spec.termination_fn,
        start_states=TensorDict({"observation": starts}, [starts.shape[0]]),
        batch_size=64,
        max_episode_steps=spec.max_episode_steps,
    )
    check_env_specs(real)
    check_env_specs(model_env)
    ro = model_env.rollout(4)
    assert ro["next", "observation"].shape == (64, 4, o) and ro["action"].shape == (64, 4, a)
    # model rollouts start from real joint observations
    start = ro["observation"][:, 0]
    assert ((start[:, None] - starts[None]).abs().amax(-1).min(-1).values == 0).all()
    if spec.reward_fn is not None:
        torch.testing.assert_close(
            ro["next", "reward"], spec.reward_fn(ro["observation"], ro["action"], ro["next", "observation"])
        )


def test_bad_input_is_named():
    with pytest.raises(ValueError, match="'football'"):
        make_vmas_env("football", 4)
    with pytest.raises(ValueError, match="num_envs"):
        make_vmas_env("balance", 0)
    with pytest.raises(TypeError, match="continuous"):
        JointAgentsEnv(VmasEnv("balance", num_envs=2, continuous_actions=False))
    with pytest.raises(ValueError, match="max_episode_steps"):
        JointAgentsEnv(VmasEnv("balance", num_envs=2, continuous_actions=True), max_episode_steps=0)


def test_deployment_runs_in_vmas_worlds():
    """A deployment (collect_deployment, in-process) steps 64 VMAS worlds: exactly B joint rows."""
    from tensordict.nn import TensorDictModule
    from torchrl.envs.utils import ExplorationType

    from torchrl_depeff.collectors.deployment import collect_deployment, freeze_policy

    env = make_vmas_env("balance", 64, seed=0)
    torch.manual_seed(0)
    policy = TensorDictModule(torch.nn.Sequential(torch.nn.Linear(48, 6), torch.nn.Tanh()), ["observation"], ["action"])
    data, info = collect_deployment(
        policy, env, 1000, deployment=0, policy_version=2, frames_per_batch=640, seed=0,
        exploration_type=ExplorationType.DETERMINISTIC,
    )
    assert data.batch_size == (1000,) and info["num_transitions"] == 1000
    assert data["observation"].shape == (1000, 48) and data["action"].shape == (1000, 6)
    assert (data["policy_version"] == 2).all()
    with torch.no_grad():
        torch.testing.assert_close(freeze_policy(policy)(data.select("observation").clone())["action"], data["action"])
    # rows come from many different worlds, and the real reward is the balance team reward
    assert data["observation"].unique(dim=0).shape[0] == 1000
    keep = ~data["next", "done"]
    torch.testing.assert_close(
        balance_reward(data["observation"], data["action"], data["next", "observation"])[keep],
        data["next", "reward"][keep], rtol=1e-4, atol=1e-4,
    )
