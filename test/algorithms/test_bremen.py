"""BREMEN Alg. 1 / Alg. 2 loop: tiny end-to-end runs, resume, gate, variants, bad input."""
from __future__ import annotations

import math

import pytest
import torch
from tensordict import TensorDict
from torchrl.envs.utils import ExplorationType, set_exploration_type

from torchrl_depeff.algorithms.bremen import BREMEN, BREMENConfig, PAPER_HYPERPARAMETERS, VARIANTS
from torchrl_depeff.algorithms.common import atomic_save, episode_start_states, load_checkpoint
from torchrl_depeff.collectors.deployment import policy_hash
from torchrl_depeff.collectors.gate import DeploymentRefused
from torchrl_depeff.data.datasets import collect_behaviour_dataset
from torchrl_depeff.envs.tasks import make_env

B = 200


def tiny(**kw) -> BREMENConfig:
    base = dict(
        deployment_size=B, num_deployments=2, iterations_per_deployment=2, rollout_length=5,
        trpo_batch_size=20, ensemble_size=2, ensemble_num_cells=(16,), policy_num_cells=(8,),
        dynamics_max_epochs=2, dynamics_batch_size=64, bc_max_epochs=2, eval_episodes=1,
        eval_max_steps=10, collect_frames_per_batch=100, log_interval=1, checkpoint_interval=1,
    )
    base.update(kw)
    return BREMENConfig(**base)


def _strip_time(metrics: dict) -> dict:
    # NaN (e.g. no completed episode in a tiny deployment) compares equal to itself here
    return {k: ("nan" if isinstance(v, float) and math.isnan(v) else v)
            for k, v in metrics.items() if not k.startswith("time/")}


class TestConfig:
    @pytest.mark.parametrize(
        "kw, match",
        [
            ({"deployment_size": 0}, "deployment_size"),
            ({"iterations_per_deployment": -1}, "iterations_per_deployment"),
            ({"task": "pong"}, "pong"),
            ({"max_kl": 0.0}, "max_kl"),
            ({"penalty": "cql"}, "cql"),
            ({"rollout_length": 10, "trpo_batch_size": 5}, "trpo_batch_size"),
            ({"gamma": 1.5}, "gamma"),
            ({"start_states": "random"}, "random"),
        ],
    )
    def test_bad_values_are_named(self, kw, match):
        with pytest.raises(ValueError, match=match):
            BREMENConfig(**kw)

    def test_from_dict_unknown_key(self):
        with pytest.raises(KeyError, match="deployments"):
            BREMENConfig.from_dict({"deployments": 3})

    def test_paper_table4(self):
        # BREMEN Table 4
        hop = BREMENConfig.paper("hopper")
        assert (hop.iterations_per_deployment, hop.num_deployments, hop.rollout_length) == (6000, 10, 1000)
        assert (hop.max_kl, hop.gae_lambda, hop.sigma, hop.gamma) == (0.05, 0.95, 0.1, 0.99)
        assert BREMENConfig.paper("halfcheetah").max_kl == 0.1
        assert BREMENConfig.paper("ant").gae_lambda == 0.97
        assert BREMENConfig.paper("walker2d").num_deployments == 10
        cfg = BREMENConfig()
        assert (cfg.trpo_batch_size, cfg.policy_num_cells, cfg.ensemble_num_cells) == (50_000, (200, 200), (1024, 1024))
        assert (cfg.dynamics_lr, cfg.bc_lr, cfg.bc_batch_size) == (1e-3, 5e-4, 256)
        with pytest.raises(ValueError, match="pong"):
            BREMENConfig.paper("pong")

    def test_variants(self):
        assert BREMENConfig().variant("me_trpo").bc_reinit is False
        ekl = BREMENConfig().variant("explicit_kl")
        assert ekl.explicit_kl_coef > 0 and not ekl.bc_reinit
        assert BREMENConfig().variant("mopo").penalty == "mopo"
        assert set(VARIANTS) >= {"bremen", "me_trpo", "explicit_kl", "mopo", "morel", "recursive_bc"}
        with pytest.raises(ValueError, match="sac"):
            BREMENConfig().variant("sac")


def test_episode_start_states_traj_ids():
    # two deployments, trajectory ids restart in each; rows out of time order
    obs = torch.arange(8.0).unsqueeze(-1)
    td = TensorDict(
        {
            "observation": obs,
            "deployment": torch.tensor([0, 0, 0, 0, 1, 1, 1, 1]),
            ("collector", "traj_ids"): torch.tensor([1, 0, 0, 1, 0, 0, 1, 1]),
        },
        [8],
    )
    assert episode_start_states(td)["observation"].squeeze(-1).tolist() == [0.0, 1.0, 4.0, 6.0]


class TestDeploymentLoop:
    def test_two_deployments_end_to_end(self, tmp_path):
        algo = BREMEN(tiny(), data_root=tmp_path / "data")
        hashes = []
        m0 = algo.deployment_step()
        hashes.append(algo.buffers.metadata(0)["policy_hash"])
        # the deployed copy is frozen: training changed the learner, not the deployed copy
        assert policy_hash(algo.deployed_actor) == hashes[0]
        assert policy_hash(algo.actor) != hashes[0]
        m1 = algo.deployment_step()
        hashes.append(algo.buffers.metadata(1)["policy_hash"])
        assert algo.buffers.num_deployments == 2
        assert [len(algo.buffers.buffer(k)) for k in range(2)] == [B, B]
        data = algo.buffers.as_tensordict("all")
        assert data["deployment"].bincount().tolist() == [B, B]
        assert data["policy_version"].unique().tolist() == [0, 1]
        assert hashes[0] != hashes[1]
        assert m0["deployment/count"] == 1 and m1["deployment/count"] == 2
        assert m1["deployment/samples"] == 2 * B
        for m in (m0, m1):
            for key in ("eval/return_mean", "model/holdout_loss", "train/imaginary_return", "train/kl_to_bc"):
                assert math.isfinite(m[key]), key
        assert math.isfinite(m1["train/kl_to_deployed"])
        assert len(algo.history) == 2 and algo.deployment == 2

    def test_bc_reinit_sets_policy_mean_to_bc(self, tmp_path):
        algo = BREMEN(tiny(bc_init_sigma=1.0), data_root=tmp_path)
        algo.collect()
        algo.fit_model()
        algo.behaviour_clone()
        states = TensorDict(observation=torch.randn(32, 17), batch_size=[32])
        with torch.no_grad(), set_exploration_type(ExplorationType.DETERMINISTIC):
            pi = algo.actor(states.clone())
            bc = algo.bc_actor(states.clone())
        torch.testing.assert_close(pi["loc"], bc["loc"])
        # Alg. 1 line 6 literal: Normal(pi_beta_hat, 1)
        torch.testing.assert_close(pi["scale"], torch.ones_like(pi["scale"]))

    def test_no_bc_reinit_keeps_policy(self, tmp_path):
        algo = BREMEN(tiny().variant("me_trpo"), data_root=tmp_path)
        algo.collect()
        algo.fit_model()
        before = policy_hash(algo.actor)
        algo.behaviour_clone()
        assert policy_hash(algo.actor) == before  # ME-TRPO: the BC net is not copied in

    def test_trpo_moves_policy_within_trust_region(self, tmp_path):
        algo = BREMEN(tiny(iterations_per_deployment=1, max_kl=0.01), data_root=tmp_path)
        algo.collect()
        algo.fit_model()
        algo.behaviour_clone()
        before = policy_hash(algo.actor)
        stats = algo.optimize_policy()
        assert policy_hash(algo.actor) != before
        assert stats["train/trpo_kl"] <= 0.01 + 1e-6

    def test_recursive_bc_deploys_bc_policy(self, tmp_path):
        algo = BREMEN(tiny().variant("recursive_bc"), data_root=tmp_path)
        m = algo.deployment_step()
        assert "train/imaginary_return" not in m
        states = TensorDict(observation=torch.randn(16, 17), batch_size=[16])
        with torch.no_grad(), set_exploration_type(ExplorationType.DETERMINISTIC):
            torch.testing.assert_close(algo.actor(states.clone())["loc"], algo.bc_actor(states.clone())["loc"])

    @pytest.mark.parametrize("variant", ["explicit_kl", "mopo", "morel"])
    def test_variants_run(self, tmp_path, variant):
        algo = BREMEN(tiny(num_deployments=1).variant(variant), data_root=tmp_path)
        m = algo.deployment_step()
        assert math.isfinite(m["train/imaginary_return"])
        if variant == "mopo":
            ro = algo.imaginary_rollout()
            assert (ro["next", "penalty"] >= 0).all()
            torch.testing.assert_close(ro["next", "penalty"], 0.1 * ro["next", "model_ensemble_std"])

    def test_start_states_first_are_episode_starts(self, tmp_path):
        algo = BREMEN(tiny(start_states="first", rollout_length=3), data_root=tmp_path)
        algo.collect()
        algo.fit_model()
        pool = algo._start_state_pool()
        data = algo.buffers.as_tensordict("all")
        # the only episode of 200 steps: one start state, the first observation
        assert pool.shape == (1, 17)
        torch.testing.assert_close(pool[0], data["observation"][0])
        env = algo.make_model_env()
        td = env.reset()
        assert torch.equal(td["observation"], pool.expand_as(td["observation"]))


class TestResume:
    def test_interrupted_run_resumes_identically(self, tmp_path):
        cfg = tiny()
        ref = BREMEN(cfg, data_root=tmp_path / "ref")
        ref.run()

        ckpt = tmp_path / "run" / "ckpt.pt"
        calls = {"n": 0}

        class Crash(Exception):
            pass

        def save_then_crash(algo):
            atomic_save(algo.state_dict(), ckpt)
            calls["n"] += 1
            if calls["n"] == 6:  # mid second deployment's first phases
                raise Crash

        algo = BREMEN(cfg, data_root=tmp_path / "run" / "data", checkpoint_fn=save_then_crash)
        with pytest.raises(Crash):
            algo.run()
        resumed = BREMEN(cfg, data_root=tmp_path / "run" / "data")
        state = load_checkpoint(ckpt)
        resumed.load_state_dict(state)
        resumed.run()
        a = ref.buffers.as_tensordict("all")
        b = resumed.buffers.as_tensordict("all")
        assert (a == b).all()
        assert [_strip_time(h) for h in ref.history] == [_strip_time(h) for h in resumed.history]
        assert policy_hash(ref.actor) == policy_hash(resumed.actor)

    def test_checkpoint_is_weights_only(self, tmp_path):
        algo = BREMEN(tiny(num_deployments=1), data_root=tmp_path / "d")
        algo.run()
        path = atomic_save(algo.state_dict(), tmp_path / "c.pt")
        state = torch.load(path, weights_only=True)
        assert state["counters"]["deployment"] == 1

    def test_different_config_refused(self, tmp_path):
        algo = BREMEN(tiny(num_deployments=1), data_root=tmp_path / "d")
        algo.run()
        state = algo.state_dict()
        other = BREMEN(tiny(num_deployments=1, max_kl=0.5, sigma=0.2), data_root=tmp_path / "d")
        with pytest.raises(ValueError, match="max_kl.*sigma|sigma.*max_kl"):
            other.load_state_dict(state)
        # more deployments is allowed (extending a run)
        BREMEN(tiny(num_deployments=3), data_root=tmp_path / "d").load_state_dict(state)

    def test_data_of_another_run_refused(self, tmp_path):
        BREMEN(tiny(num_deployments=1), data_root=tmp_path / "d").run()
        other = BREMEN(tiny(num_deployments=1, seed=1), data_root=tmp_path / "d")
        with pytest.raises(RuntimeError, match="another run"):
            other.collect()


class TestGate:
    def _after_first(self, tmp_path, **kw):
        algo = BREMEN(tiny(**kw), data_root=tmp_path)
        algo.deployment_step()
        return algo

    def test_nan_policy_refused(self, tmp_path):
        algo = self._after_first(tmp_path)
        with torch.no_grad():
            next(algo.actor.parameters()).fill_(float("nan"))
        with pytest.raises(DeploymentRefused, match="non-finite"):
            algo.collect()
        assert algo.buffers.num_deployments == 1  # nothing collected

    def test_fallback_redeploys_last_policy(self, tmp_path):
        algo = self._after_first(tmp_path, gate_on_fail="fallback")
        deployed = policy_hash(algo.deployed_actor)
        with torch.no_grad():
            next(algo.actor.parameters()).fill_(float("nan"))
        info = algo.collect()
        assert info["gate/passed"] == 0.0
        assert algo.buffers.metadata(1)["policy_hash"] == deployed
        assert algo.buffers.as_tensordict(1)["policy_version"].unique().tolist() == [0]

    def test_over_kl_refused(self, tmp_path):
        algo = self._after_first(tmp_path, gate_max_kl=1e-3)
        with torch.no_grad():
            algo.policy_net.mean_net[-1].bias.add_(0.5)
        with pytest.raises(DeploymentRefused, match="KL"):
            algo.collect()


def test_offline_alg2(tmp_path):
    env = make_env("halfcheetah")
    from torchrl_depeff.modules.actors import make_gaussian_actor

    dataset = collect_behaviour_dataset(make_gaussian_actor(17, 6, num_cells=(8,)), env, 300, noise="eps3", seed=0)
    algo = BREMEN(tiny(), data_root=tmp_path)
    m = algo.run_offline(dataset, iterations=2)
    assert algo.buffers.num_deployments == 1 and len(algo.buffers) == 300
    assert math.isfinite(m["eval/return_mean"]) and math.isfinite(m["train/imaginary_return"])
    with pytest.raises(RuntimeError, match="offline"):
        algo.deployment_step()
    bad = dataset.clone()
    bad["observation"][3, 0] = float("nan")
    with pytest.raises(ValueError, match="observation"):
        BREMEN(tiny(), data_root=tmp_path / "x").run_offline(bad)


def test_paper_table_covers_every_task():
    from torchrl_depeff.envs.tasks import TASK_NAMES

    assert set(PAPER_HYPERPARAMETERS) == set(TASK_NAMES)


def test_vector_env_deployment(tmp_path):
    # 4 sub-envs in one process: still exactly B rows, episode starts taken per sub-env
    algo = BREMEN(tiny(num_envs=4, num_deployments=1), data_root=tmp_path)
    assert algo.env.batch_size == torch.Size([4])
    m = algo.deployment_step()
    assert len(algo.buffers) == B and math.isfinite(m["train/imaginary_return"])
    assert algo._start_state_pool().shape[0] >= 4
