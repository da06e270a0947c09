"""BREMEN Alg. 1 / Alg. 2 loop: tiny end-to-end runs, resume, gate, variants, bad input."""
from __future__ import annotations

import math

import pytest
import torch
from tensordict import TensorDict
from torchrl.envs.utils import ExplorationType, set_exploration_type

from torchrl_depeff.algorithms.bremen import BREMEN, BREMENConfig, PAPER_HYPERPARAMETERS, VARIANTS
from torchrl_depeff.algorithms.common import atomic_save, episode_start_states, load_checkpoint
from torchrl_depeff.algorithms.loop import PHASES
from torchrl_depeff.collectors.deployment import policy_hash
from torchrl_depeff.collectors.gate import DeploymentRefused
from torchrl_depeff.collectors import collect_behaviour_dataset
from torchrl_depeff.envs.tasks import make_env

B = 200


def tiny(overrides: dict | None = None, **kw) -> BREMENConfig:
    """The smoke preset (B = 200, 2 deployments, 2 TRPO iterations) with dotted-path overrides."""
    return BREMENConfig.tiny().override(overrides or {}, **kw)


def _strip_time(metrics: dict) -> dict:
    # NaN (e.g. no completed episode in a tiny deployment) compares equal to itself here
    return {k: ("nan" if isinstance(v, float) and math.isnan(v) else v)
            for k, v in metrics.items() if not k.startswith("time/")}


class TestConfig:
    @pytest.mark.parametrize(
        "overrides, match",
        [
            ({"deployment.size": 0}, "deployment.size"),
            ({"trpo.iterations": -1}, "trpo.iterations"),
            ({"task": "pong"}, "pong"),
            ({"trpo.max_kl": 0.0}, "trpo.max_kl"),
            ({"trpo.max_kl": float("inf")}, "trpo.max_kl"),
            ({"imagination.penalty": "cql"}, "cql"),
            ({"imagination.rollout_length": 10, "trpo.batch_size": 5}, "trpo.batch_size"),
            ({"trpo.gamma": 1.5}, "trpo.gamma"),
            ({"imagination.start_states": "random"}, "random"),
            ({"model.lr": True}, "model.lr"),
            ({"bc.reinit": "maybe"}, "bc.reinit"),
            ({"mode": "online"}, "online"),
        ],
    )
    def test_bad_values_are_named(self, overrides, match):
        with pytest.raises(ValueError, match=match):
            BREMENConfig().override(overrides)

    def test_unknown_keys(self):
        with pytest.raises(KeyError, match="deployments"):
            BREMENConfig.from_dict({"deployments": 3})
        with pytest.raises(KeyError, match="trpo.kl"):
            BREMENConfig().override({"trpo.kl": 0.1})

    def test_legacy_flat_keys_still_accepted(self):
        with pytest.warns(FutureWarning, match="max_kl -> trpo.max_kl"):
            cfg = BREMENConfig.from_dict({"max_kl": 0.05, "ensemble_size": 3, "holdout_ratio": 0.2})
        assert (cfg.trpo.max_kl, cfg.model.num_members) == (0.05, 3)
        assert cfg.model.holdout_ratio == cfg.bc.holdout_ratio == 0.2

    def test_dict_round_trip(self):
        cfg = tiny().variant("explicit_kl")
        assert BREMENConfig.from_dict(cfg.to_dict()) == cfg

    def test_paper_table4(self):
        # BREMEN Table 4
        hop = BREMENConfig.paper("hopper")
        assert (hop.trpo.iterations, hop.deployment.num_deployments, hop.imagination.rollout_length) == (6000, 10, 1000)
        assert (hop.trpo.max_kl, hop.trpo.gae_lambda, hop.policy.sigma, hop.trpo.gamma) == (0.05, 0.95, 0.1, 0.99)
        assert BREMENConfig.paper("halfcheetah").trpo.max_kl == 0.1
        assert BREMENConfig.paper("ant").trpo.gae_lambda == 0.97
        assert BREMENConfig.paper("walker2d").deployment.num_deployments == 10
        cfg = BREMENConfig()
        assert cfg == BREMENConfig.paper("halfcheetah")
        assert (cfg.trpo.batch_size, cfg.policy.num_cells, cfg.model.num_cells) == (50_000, (200, 200), (1024, 1024))
        assert (cfg.model.lr, cfg.bc.lr, cfg.bc.batch_size) == (1e-3, 5e-4, 256)
        with pytest.raises(ValueError, match="pong"):
            BREMENConfig.paper("pong")

    def test_fig3_robotics_preset(self):
        # BREMEN Fig. 3: 10 deployments of 25k transitions on the reaching tasks
        for task in ("fetch_reach", "hand_reach"):
            cfg = BREMENConfig.paper(task)
            assert (cfg.deployment.num_deployments, cfg.deployment.size) == (10, 25_000)

    def test_variants(self):
        assert BREMENConfig().variant("me_trpo").bc.reinit is False
        ekl = BREMENConfig().variant("explicit_kl")
        assert ekl.trpo.explicit_kl_coef > 0 and not ekl.bc.reinit and ekl.name == "explicit_kl"
        assert BREMENConfig().variant("mopo").imagination.penalty == "mopo"
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
        algo = BREMEN(tiny({"bc.init_sigma": 1.0}), data_root=tmp_path)
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
        algo = BREMEN(tiny({"trpo.iterations": 1, "trpo.max_kl": 0.01}), data_root=tmp_path)
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

    @pytest.mark.parametrize("mode", ["reward", "surrogate"])
    def test_explicit_kl_readings(self, tmp_path, mode, monkeypatch):
        """Sec. 5.3: "reward" (reference code) penalises the rewards before GAE; "surrogate" is eq. (6)."""
        import torchrl_depeff.algorithms.components as components_mod

        cfg = tiny({"deployment.num_deployments": 1, "trpo.explicit_kl_mode": mode}).variant("explicit_kl")
        assert cfg.trpo.explicit_kl_mode == mode  # the variant keeps an explicit choice
        algo = BREMEN(cfg, data_root=tmp_path)
        seen = []
        real = components_mod.trpo_step

        def spy(loss, optim, td):
            seen.append((loss.kl_to_reference_mode, td))
            return real(loss, optim, td)

        monkeypatch.setattr(components_mod, "trpo_step", spy)
        algo.deployment_step()
        assert seen and all(m == mode for m, _ in seen)
        td = seen[-1][1]
        penalised = ("next", "kl_to_reference") in td.keys(include_nested=True)
        assert penalised == (mode == "reward")
        if penalised:  # the penalty is alpha * KL >= 0, subtracted
            assert bool((td["next", "kl_to_reference"] >= 0).all())
        assert BREMENConfig().variant("explicit_kl").trpo.explicit_kl_mode == "reward"

    @pytest.mark.parametrize("variant", ["explicit_kl", "mopo", "morel"])
    def test_variants_run(self, tmp_path, variant):
        algo = BREMEN(tiny({"deployment.num_deployments": 1}).variant(variant), data_root=tmp_path)
        m = algo.deployment_step()
        assert math.isfinite(m["train/imaginary_return"])
        if variant == "mopo":
            ro = algo.imaginary_rollout()
            assert (ro["next", "penalty"] >= 0).all()
            torch.testing.assert_close(ro["next", "penalty"], 0.1 * ro["next", "model_ensemble_std"])

    def test_start_states_first_are_episode_starts(self, tmp_path):
        algo = BREMEN(tiny({"imagination.start_states": "first", "imagination.rollout_length": 3}), data_root=tmp_path)
        algo.collect()
        algo.fit_model()
        pool = algo.improver.start_state_pool(algo)
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
            if calls["n"] == 9:  # second deployment, right after its fit phase
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
        algo = BREMEN(tiny({"deployment.num_deployments": 1}), data_root=tmp_path / "d")
        algo.run()
        path = atomic_save(algo.state_dict(), tmp_path / "c.pt")
        state = torch.load(path, weights_only=True)
        assert state["counters"]["deployment"] == 1

    def test_different_config_refused(self, tmp_path):
        algo = BREMEN(tiny({"deployment.num_deployments": 1}), data_root=tmp_path / "d")
        algo.run()
        state = algo.state_dict()
        other = BREMEN(tiny({"deployment.num_deployments": 1, "trpo.max_kl": 0.5, "policy.sigma": 0.2}), data_root=tmp_path / "d")
        with pytest.raises(ValueError, match="max_kl.*sigma|sigma.*max_kl"):
            other.load_state_dict(state)
        # more deployments is allowed (extending a run)
        BREMEN(tiny({"deployment.num_deployments": 3}), data_root=tmp_path / "d").load_state_dict(state)

    def test_data_of_another_run_refused(self, tmp_path):
        BREMEN(tiny({"deployment.num_deployments": 1}), data_root=tmp_path / "d").run()
        other = BREMEN(tiny({"deployment.num_deployments": 1}, seed=1), data_root=tmp_path / "d")
        with pytest.raises(RuntimeError, match="another run"):
            other.collect()


class TestGate:
    def _after_first(self, tmp_path, **kw):
        algo = BREMEN(tiny(kw), data_root=tmp_path)
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
        algo = self._after_first(tmp_path, **{"deployment.gate_on_fail": "fallback"})
        deployed = policy_hash(algo.deployed_actor)
        with torch.no_grad():
            next(algo.actor.parameters()).fill_(float("nan"))
        info = algo.collect()
        assert info["gate/passed"] == 0.0
        assert algo.buffers.metadata(1)["policy_hash"] == deployed
        assert algo.buffers.as_tensordict(1)["policy_version"].unique().tolist() == [0]

    def test_over_kl_refused(self, tmp_path):
        algo = self._after_first(tmp_path, **{"deployment.gate_max_kl": 1e-3})
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


@pytest.fixture(scope="module")
def dataset():
    from torchrl_depeff.modules.actors import make_gaussian_actor

    return collect_behaviour_dataset(make_gaussian_actor(17, 6, num_cells=(8,)), make_env("halfcheetah"), 300,
                                     noise="eps1", seed=0)


class TestOfflineRuns:
    def test_resumes_and_refuses_another_dataset(self, tmp_path, dataset):
        cfg = tiny(mode="offline")
        first = BREMEN(cfg, run_dir=tmp_path, dataset=dataset).run()
        assert len(first) == 1 and first[0]["deployment/samples"] == 300
        # rerun: resumed, nothing recomputed
        again = BREMEN(cfg, run_dir=tmp_path, dataset=dataset)
        assert again.deployment == 1 and _strip_time(again.run()[0]) == _strip_time(first[0])
        # another dataset of the same size in the same directory: refused, naming both fingerprints
        other = dataset.clone()
        other["observation"] += 1.0
        fresh = BREMEN(cfg, data_root=tmp_path / "deployments", dataset=other)
        with pytest.raises(ValueError, match="fingerprint"):
            fresh.collect()

    def test_evaluation_during_trpo(self, tmp_path, dataset):
        """``evaluation.every_iterations``: the Fig. 14 curve is the policy after exactly k TRPO steps."""
        cfg = tiny({"trpo.iterations": 4, "evaluation.every_iterations": 2}, mode="offline")
        h = BREMEN(cfg, run_dir=tmp_path / "curve", dataset=dataset).run()[0]
        curve = {k: v for k, v in h.items() if k.startswith("curve/")}
        assert sorted(curve) == ["curve/eval_return_it0", "curve/eval_return_it2"]
        # k = 0 is the BC re-initialised policy: the BC baseline's evaluation (same BC seed)
        bc = BREMEN(tiny({"trpo.iterations": 4}, mode="offline").variant("recursive_bc"), run_dir=tmp_path / "bc",
                    dataset=dataset).run()[0]
        assert curve["curve/eval_return_it0"] == bc["eval/return_mean"]
        # k = 2 is the policy after two steps: the final evaluation of a 2-iteration run
        two = BREMEN(tiny({"trpo.iterations": 2}, mode="offline"), run_dir=tmp_path / "two", dataset=dataset).run()[0]
        assert curve["curve/eval_return_it2"] == two["eval/return_mean"]
        assert two["eval/return_mean"] != curve["curve/eval_return_it0"]  # the steps changed the policy
        # evaluating during the phase changes nothing else (no RNG drawn, same TRPO steps)
        plain = BREMEN(tiny({"trpo.iterations": 4}, mode="offline"), run_dir=tmp_path / "plain", dataset=dataset).run()[0]
        assert _strip_time(plain) == {k: v for k, v in _strip_time(h).items() if not k.startswith("curve/")}

    def test_evaluation_during_trpo_resumes(self, tmp_path, dataset, monkeypatch):
        from torchrl_depeff.algorithms.components import ImaginaryTRPO

        cfg = tiny({"trpo.iterations": 4, "evaluation.every_iterations": 1, "checkpoint_interval": 1}, mode="offline")
        ref = BREMEN(cfg, run_dir=tmp_path / "ref", dataset=dataset).run()[0]
        iterate = ImaginaryTRPO.iterate

        class Crash(Exception):
            pass

        def crash_at_3(self, loop, loss, optim):
            if self.iteration == 3:
                raise Crash
            return iterate(self, loop, loss, optim)

        monkeypatch.setattr(ImaginaryTRPO, "iterate", crash_at_3)
        with pytest.raises(Crash):
            BREMEN(cfg, run_dir=tmp_path / "run", dataset=dataset).run()
        monkeypatch.setattr(ImaginaryTRPO, "iterate", iterate)
        resumed = BREMEN(cfg, run_dir=tmp_path / "run", dataset=dataset)
        # the checkpoint after step 3 holds k = 0..2; k = 3 is evaluated again after the resume
        assert sorted(resumed.improver.curve) == [0, 1, 2] and resumed.improver.iteration == 3
        assert _strip_time(resumed.run()[0]) == _strip_time(ref)

    def test_evaluation_during_trpo_needs_episodes(self):
        with pytest.raises(ValueError, match=r"evaluation.every_iterations=2 needs evaluation.episodes > 0"):
            tiny({"evaluation.every_iterations": 2, "evaluation.episodes": 0})
        with pytest.raises(ValueError, match="every_iterations must be an int >= 1, got 0"):
            tiny({"evaluation.every_iterations": 0})

    def test_mode_mismatch_refused(self, tmp_path, dataset):
        BREMEN(tiny({"deployment.num_deployments": 1}), run_dir=tmp_path).run()
        # an offline run on the directory of a finished Alg. 1 run: the config differs in mode
        with pytest.raises(ValueError, match="mode='deployments'->'offline'"):
            BREMEN(tiny({"deployment.num_deployments": 1}, mode="offline"), run_dir=tmp_path, dataset=dataset)
        with pytest.raises(ValueError, match="needs a dataset"):
            BREMEN(tiny(mode="offline"), run_dir=tmp_path / "new")
        with pytest.raises(ValueError, match="only used with mode='offline'"):
            BREMEN(tiny(), run_dir=tmp_path / "new2", dataset=dataset)


class TestPhases:
    def test_order_is_enforced_and_done_phases_are_skipped(self, tmp_path):
        algo = BREMEN(tiny({"deployment.num_deployments": 1}), run_dir=tmp_path)
        with pytest.raises(RuntimeError, match="'optimize'.*before phase 'collect'"):
            algo.optimize_policy()
        collected = algo.collect()
        assert algo.phase == PHASES[1]
        # a phase that already ran returns its stored metrics without running again
        assert algo.collect() == collected and algo.buffers.num_deployments == 1
        with pytest.raises(RuntimeError, match="not finished"):
            algo.end_deployment()

    def test_run_dir_resumes_in_the_constructor(self, tmp_path):
        algo = BREMEN(tiny(), run_dir=tmp_path)
        algo.collect()
        algo.fit_model()
        resumed = BREMEN(tiny(), run_dir=tmp_path)
        assert (resumed.deployment, resumed.phase) == (0, "pretrain")
        for key, value in algo.ensemble.state_dict().items():
            assert torch.equal(resumed.ensemble.state_dict()[key], value), key
        history = resumed.run()
        assert [h["deployment/count"] for h in history] == [1, 2]
        assert (tmp_path / "metrics.json").is_file()

    def test_old_checkpoint_format_refused(self, tmp_path):
        algo = BREMEN(tiny(), run_dir=tmp_path)
        old = {"config": {"max_kl": 0.1}, "counters": {"deployment": 1}}  # torchrl_depeff 0.1 layout
        with pytest.raises(ValueError, match="torchrl_depeff 0.1"):
            algo.load_state_dict(old)

    def test_checkpoint_of_another_algorithm_refused(self, tmp_path):
        from torchrl_depeff.algorithms.musbo import MUSBO, MUSBOConfig

        state = BREMEN(tiny(), run_dir=tmp_path / "b").state_dict()
        with pytest.raises(ValueError, match="written by BREMEN, not MUSBO"):
            MUSBO(MUSBOConfig.tiny(), run_dir=tmp_path / "m").load_state_dict(state)


def test_paper_table_covers_every_task():
    from torchrl_depeff.envs.tasks import TASK_NAMES

    # Table 4 covers the four MuJoCo tasks; every other task has a documented paper preset
    assert set(PAPER_HYPERPARAMETERS) == {"ant", "halfcheetah", "hopper", "walker2d"}
    for task in TASK_NAMES:
        assert BREMENConfig.paper(task).task == task


def test_vector_env_deployment(tmp_path):
    # 4 sub-envs in one process: still exactly B rows, episode starts taken per sub-env
    algo = BREMEN(tiny({"deployment.num_envs": 4, "deployment.num_deployments": 1}), data_root=tmp_path)
    assert algo.env.batch_size == torch.Size([4])
    m = algo.deployment_step()
    assert len(algo.buffers) == B and math.isfinite(m["train/imaginary_return"])
    assert algo.improver.start_state_pool(algo).shape[0] >= 4


class TestObservationNormalisation:
    def test_bc_sets_the_statistics_and_the_learner_copies_them(self, tmp_path):
        algo = BREMEN(tiny({"policy.normalize_observations": True, "deployment.num_deployments": 1}), data_root=tmp_path)
        algo.collect()
        algo.fit_model()
        algo.pretrain()
        data = algo.buffers.as_tensordict("latest")["observation"]
        net = algo.policy_net
        torch.testing.assert_close(net.obs_loc, data.mean(0))
        torch.testing.assert_close(net.obs_scale, data.std(0).clamp_min(1e-6))
        torch.testing.assert_close(algo.bc_actor.module[0].module.obs_loc, net.obs_loc)
        # the policy reads normalised inputs: the same action as its MLP on (s - mean) / std
        s = data[:5]
        with torch.no_grad():
            expected = torch.tanh(net.mean_net((s - data.mean(0)) / data.std(0).clamp_min(1e-6)))
            torch.testing.assert_close(net(s)[0], expected)
        m = algo.optimize_policy()
        assert math.isfinite(m["train/imaginary_return"])

    def test_analytic_fisher_accounts_for_the_normaliser(self):
        from torchrl_depeff.modules.actors import GaussianPolicyNet
        from torchrl_depeff.optim.fisher import double_backward_fvp, mlp_gaussian_fvp

        torch.manual_seed(0)
        net = GaussianPolicyNet(4, 2, num_cells=(8,), learn_sigma=True, normalize_observations=True).double()
        obs = torch.randn(64, 4, dtype=torch.float64) * 5 + 3
        net.set_observation_stats(obs)
        params = [p for p in net.parameters()]
        fvp = mlp_gaussian_fvp(net, obs, params)
        assert fvp is not None
        loc0, scale0 = (t.detach() for t in net(obs))
        loc, scale = net(obs)
        kl = (torch.log(scale / scale0) + (scale0 ** 2 + (loc0 - loc) ** 2) / (2 * scale ** 2) - 0.5).sum(-1).mean()
        ref = double_backward_fvp(kl, params)
        v = torch.randn(sum(p.numel() for p in params), dtype=torch.float64)
        torch.testing.assert_close(fvp(v), ref(v))
