"""MB2PO (Alg. 1): batch mixing, branched rollouts, penalty, errors, end-to-end, checkpointing.

The GMM actor's log-prob against a direct mixture-formula reference is tested in
``test/modules/test_mixture.py`` and not repeated here.
"""
from __future__ import annotations

import math
import tempfile

import pytest
import torch
from tensordict import TensorDict

from torchrl_depeff.algorithms.mb2po import MB2PO, MB2POConfig, MB2PO_PAPER_HYPERPARAMETERS, TRAIN_KEYS
from torchrl_depeff.modules.ensemble import DynamicsEnsemble, EnsemblePrediction

OBS, ACT = 3, 2


@pytest.fixture(autouse=True)
def _one_thread():
    # tiny networks: one thread is faster than two on the shared 2-core CI (no spin contention)
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def _dataset(n: int = 200, seed: int = 0) -> TensorDict:
    g = torch.Generator().manual_seed(seed)
    obs = torch.randn(n, OBS, generator=g)
    # a unique marker per row: obs[:, 0] = 10 + row index, so a row's origin is recognisable
    obs[:, 0] = 10.0 + torch.arange(n, dtype=torch.float32)
    act = torch.rand(n, ACT, generator=g) * 2 - 1
    nxt = obs + 0.1 * torch.cat([act, act[:, :1]], -1)
    return TensorDict(
        {
            "observation": obs,
            "action": act,
            "next": {
                "observation": nxt,
                "reward": -act.pow(2).sum(-1, keepdim=True),
                "done": torch.zeros(n, 1, dtype=torch.bool),
                "terminated": torch.zeros(n, 1, dtype=torch.bool),
            },
        },
        batch_size=[n],
    )


def _config(overrides: dict | None = None) -> MB2POConfig:
    """Tiny networks and budgets (dotted-path ``overrides`` on top); no real-env evaluation."""
    base = {
        "awac.batch_size": 32, "policy.num_cells": (16,), "awac.critic_num_cells": (16,), "model.num_cells": (16,),
        "model.num_members": 3, "model.num_elites": 2, "model.max_epochs": 2,
        "finetune.model_samples_per_iteration": 24, "finetune.omega": 0.5, "finetune.horizon": 3,
        "finetune.retain_iterations": 2, "finetune.awac_steps_per_iteration": 2, "awac.num_value_samples": 2,
        "awac.pretrain_steps": 2, "policy.num_components": 2, "finetune.iterations": 1, "evaluation.episodes": 0,
    }
    return MB2POConfig().override({**base, **(overrides or {})})


def _algo(overrides: dict | None = None, data: TensorDict | None = None, **kwargs) -> MB2PO:
    return MB2PO(_config(overrides), dataset=_dataset() if data is None else data, data_root=tempfile.mkdtemp(),
                 **kwargs)


def _fitted(overrides: dict | None = None, data: TensorDict | None = None, **kwargs) -> MB2PO:
    """An MB2PO loop after its collect and fit phases, its fine-tuning strategy prepared."""
    algo = _algo(overrides, data, **kwargs)
    algo.collect()
    algo.fit_model()
    algo.improver.prepare(algo)
    return algo


class TestConfig:
    def test_defaults_follow_the_paper(self):
        cfg = MB2POConfig()
        a, m, f = cfg.awac, cfg.model, cfg.finetune
        assert (a.awac_lambda, a.batch_size, a.tau, a.max_weight) == (1.0, 1024, 5e-3, 20.0)
        assert cfg.policy.num_cells == (256,) * 4 and cfg.policy.num_components == 5
        assert a.critic_num_cells == (256,) * 4 and (a.actor_lr, a.critic_lr, a.actor_weight_decay) == (3e-4, 3e-4, 1e-4)
        assert m.num_cells == (200,) * 4 and m.activation == "silu" and m.probabilistic and m.predict_reward
        assert (m.lr, m.weight_decay, m.batch_size) == (1e-3, 1e-4, 256)
        assert (f.retain_iterations, f.awac_steps_per_iteration, f.iterations) == (100, 1000, 500)
        assert f.model_samples_per_iteration == 1_000_000 and a.pretrain_steps == 500_000
        assert cfg == MB2POConfig.paper("halfcheetah", "mixed")
        assert MB2POConfig().override({"finetune.horizon": 5, "finetune.model_samples_per_iteration": 10}).finetune.rollouts_per_iteration == 2

    @pytest.mark.parametrize(
        "overrides, name",
        [
            ({"finetune.omega": -0.1}, "finetune.omega"),
            ({"finetune.omega": 1.5}, "finetune.omega"),
            ({"finetune.horizon": 0}, "finetune.horizon"),
            ({"finetune.penalty_coef": -1.0}, "finetune.penalty_coef"),
            ({"finetune.penalty_uncertainty": "variance"}, "finetune.penalty_uncertainty"),
            ({"awac.awac_lambda": 0.0}, "awac.awac_lambda"),
            ({"model.num_elites": 6}, "model.num_elites"),
            ({"finetune.retain_iterations": 0}, "finetune.retain_iterations"),
            ({"model.activation": "gelu"}, "model.activation"),
            ({"awac.gamma": 1.5}, "awac.gamma"),
            ({"awac.target": "mean"}, "awac.target"),
            ({"awac.target_quantile": 1.2}, "awac.target_quantile"),
            ({"awac.tau": 0.0}, "awac.tau"),
            ({"awac.batch_size": 0}, "awac.batch_size"),
            ({"awac.pretrain_steps": -1}, "awac.pretrain_steps"),
            ({"model.probabilistic": False}, "model.probabilistic"),
            ({"dataset": "replay"}, "replay"),
        ],
    )
    def test_bad_values_raise_naming_them(self, overrides, name):
        with pytest.raises(ValueError, match=name):
            MB2POConfig().override(overrides)

    def test_legacy_flat_keys(self):
        with pytest.warns(FutureWarning, match="omega -> finetune.omega"):
            cfg = MB2POConfig.from_dict({"omega": 0.3, "num_cells": [8]})
        assert cfg.finetune.omega == 0.3 and cfg.policy.num_cells == cfg.awac.critic_num_cells == (8,)


def test_quantile_target_runs():
    algo = _algo({"awac.target": "quantile", "awac.target_quantile": 0.1, "awac.num_qvalue_nets": 3})
    algo.collect()
    algo.fit_model()
    out = algo.pretrain()
    assert algo.loss_module.target == "quantile" and out["pretrain/steps"] == 2


class TestBadInput:
    def test_missing_key(self):
        data = _dataset().exclude(("next", "reward"))
        with pytest.raises(KeyError, match="reward"):
            _algo(data=data)

    def test_non_finite(self):
        data = _dataset()
        data["observation"][3, 1] = float("nan")
        with pytest.raises(ValueError, match="observation"):
            _algo(data=data)

    def test_ensemble_without_reward_head(self):
        model = DynamicsEnsemble(OBS, ACT, num_members=2, num_cells=(8,), probabilistic=True)
        with pytest.raises(ValueError, match="reward head"):
            _algo(ensemble=model)

    def test_deterministic_ensemble(self):
        model = DynamicsEnsemble(OBS, ACT, num_members=2, num_cells=(8,), predict_reward=True)
        with pytest.raises(ValueError, match="probabilistic"):
            _algo(ensemble=model)

    def test_data_of_another_task_needs_an_eval_env(self):
        with pytest.raises(ValueError, match="eval_env"):
            MB2PO(_config({"evaluation.episodes": 1}), dataset=_dataset(), data_root=tempfile.mkdtemp())

    def test_default_evaluation_is_make_native_env(self, monkeypatch):
        # no eval_env: a one-copy native env scored on gym's own reward, bit for bit make_native_env
        from torchrl_depeff.algorithms.components import RealEnvEvaluation
        from torchrl_depeff.algorithms.mb2po import make_native_env
        from torchrl_depeff.collectors import collect_behaviour_dataset
        from torchrl_depeff.envs.tasks import make_env

        data = collect_behaviour_dataset(None, make_env("halfcheetah"), 50, noise="random", seed=0)
        algo = MB2PO(_config({"evaluation.episodes": 2, "evaluation.max_steps": 40}), dataset=data,
                     data_root=tempfile.mkdtemp())
        assert algo.evaluator.reward_key == "env_reward"
        r, lengths = algo.evaluator.returns(algo.actor)
        ref = RealEnvEvaluation(lambda: make_native_env("halfcheetah"), episodes=2, max_steps=40, seed=algo.config.seed)
        r_ref, l_ref = ref.returns(algo.actor)
        assert torch.equal(r, r_ref) and torch.equal(lengths, l_ref) and lengths.tolist() == [40.0, 40.0]

    def test_wrong_config_type_and_order_errors(self):
        with pytest.raises(TypeError, match="MB2POConfig"):
            MB2PO({"omega": 0.5}, dataset=_dataset(), data_root=tempfile.mkdtemp())
        with pytest.raises(TypeError, match="0.1's signature"):
            MB2PO(_dataset(), dataset=_dataset(), data_root=tempfile.mkdtemp())
        algo = _algo()
        with pytest.raises(RuntimeError, match="collect phase"):
            algo.improver.collect_model_rollouts(algo)
        algo.collect()
        with pytest.raises(RuntimeError, match="fit phase"):
            algo.improver.collect_model_rollouts(algo)
        with pytest.raises(RuntimeError, match="prepare"):
            algo.improver.sample_mixed_batch()
        algo.fit_model()
        algo.improver.prepare(algo)
        with pytest.raises(RuntimeError, match="model buffer is empty"):
            algo.improver.sample_mixed_batch()
        with pytest.raises(RuntimeError, match="'optimize'.*before phase 'pretrain'"):
            algo.optimize_policy()


class TestMixedBatches:
    @pytest.mark.parametrize("omega", [0.0, 0.05, 0.3, 0.8, 1.0])
    def test_real_share_and_origin_tags(self, omega):
        data = _dataset(300)
        batch_size = 200
        algo = _fitted({"finetune.omega": omega, "awac.batch_size": batch_size}, data)
        # model rows marked by a negative first feature and is_real False
        n_model = 500
        fake = _dataset(n_model, seed=1)
        fake["observation"][:, 0] = -10.0 - torch.arange(n_model, dtype=torch.float32)
        fake.set("is_real", torch.zeros(n_model, dtype=torch.bool))
        algo.model_buffer.extend(fake.select(*TRAIN_KEYS))
        real_markers = set(data["observation"][:, 0].tolist())
        fractions = []
        for _ in range(20):
            batch = algo.improver.sample_mixed_batch()
            assert batch.shape == (batch_size,)
            is_real = batch["is_real"]
            marker = batch["observation"][:, 0]
            # the tag matches where the row came from
            assert bool((marker[is_real] >= 10).all()) and bool((marker[~is_real] <= -10).all())
            assert set(marker[is_real].tolist()) <= real_markers
            # real rows are dataset rows, complete (next obs of the same row)
            idx = (marker[is_real] - 10).long()
            torch.testing.assert_close(batch["next", "observation"][is_real], data["next", "observation"][idx])
            fractions.append(is_real.float().mean().item())
        mean = sum(fractions) / len(fractions)
        # exact per-batch count round(omega * B): the share is omega up to rounding
        assert abs(mean - omega) <= 0.5 / batch_size + 1e-9
        # both parts are sampled (not the same rows every time) when present
        if 0 < omega < 1:
            assert len(set(marker[~is_real].tolist())) > 1

    def test_model_buffer_keeps_last_iterations(self):
        algo = _fitted({"finetune.retain_iterations": 2})
        chunks = [algo.improver.collect_model_rollouts(algo) for _ in range(3)]
        rows = algo.improver.rows_per_iteration
        assert all(c.shape == (rows,) for c in chunks)
        assert len(algo.model_buffer) == 2 * rows
        stored = algo.model_buffer[:]
        stored_keys = {tuple(x) for x in stored["next", "observation"].tolist()}
        assert not bool(stored["is_real"].any())
        for c in chunks[1:]:
            assert {tuple(x) for x in c["next", "observation"].tolist()} <= stored_keys
        assert not ({tuple(x) for x in chunks[0]["next", "observation"].tolist()} & stored_keys)


class TestRollouts:
    @staticmethod
    def _check_trajectories(rows, data, num_rollouts, h, terminate=None):
        ro = rows.reshape(num_rollouts, h)  # rows are stored rollout-major: [R, h]
        dataset_states = {tuple(x) for x in data["observation"].tolist()}
        done = ro["next", "done"].squeeze(-1)
        term = ro["next", "terminated"].squeeze(-1)
        lengths = []
        for r in range(num_rollouts):
            length = 0
            for t in range(h):
                starts = t == 0 or bool(done[r, t - 1])
                if starts:
                    # every trajectory starts from a dataset state
                    assert tuple(ro["observation"][r, t].tolist()) in dataset_states
                    length = 0
                else:
                    # inside a trajectory the state continues from the previous next state
                    torch.testing.assert_close(ro["observation"][r, t], ro["next", "observation"][r, t - 1])
                length += 1
                assert length <= h
                if terminate is not None:
                    step = (ro["observation"][r, t], ro["action"][r, t], ro["next", "observation"][r, t])
                    expected = bool(terminate(*step))
                    assert bool(term[r, t]) == expected
                if bool(done[r, t]):
                    # a trajectory ends by termination or by reaching h steps
                    assert bool(term[r, t]) or length == h
                    lengths.append(length)
                else:
                    assert length < h
        return lengths

    def test_start_from_dataset_and_stop_at_h(self):
        data = _dataset()
        h = 4
        algo = _fitted({"finetune.horizon": h, "finetune.model_samples_per_iteration": 40}, data)
        rows = algo.improver.collect_model_rollouts(algo)
        assert rows.shape == (40,) and not bool(rows["is_real"].any())
        lengths = self._check_trajectories(rows, data, 10, h)
        assert lengths == [h] * 10  # no termination function: every trajectory runs h steps

    def test_stop_at_termination(self):
        data = _dataset()
        h = 3

        def terminate(obs, action, next_obs):
            return (action[..., :1] > 0.0)

        algo = _fitted({"finetune.horizon": h, "finetune.model_samples_per_iteration": 60}, data, termination_fn=terminate)
        rows = algo.improver.collect_model_rollouts(algo)
        lengths = self._check_trajectories(rows, data, 20, h, terminate)
        assert any(n < h for n in lengths) and any(n == h for n in lengths)
        assert bool(rows["next", "terminated"].any())


class TestRolloutChunks:
    def test_rollouts_collected_in_memory_chunks(self):
        data = _dataset()
        # 8 rollouts per iteration, at most 3 per model-env call: 3 calls of 3 rollouts x 3 steps
        algo = _fitted({"finetune.horizon": 3, "finetune.model_samples_per_iteration": 24, "finetune.rollout_batch_size": 3}, data)
        imp = algo.improver
        assert (imp.rollouts_per_call, imp.calls_per_iteration, imp.rows_per_iteration) == (3, 3, 27)
        rows = imp.collect_model_rollouts(algo)
        assert rows.shape == (27,) and len(algo.model_buffer) == 27
        TestRollouts._check_trajectories(rows, data, 9, 3)


class TestPenalty:
    # hand-built per-member stds; member 2 (the largest) is not an elite
    SIGMAS = torch.tensor([[0.5, 1.0, 2.0], [1.5, 0.1, 0.3], [3.0, 3.0, 3.0]])

    def _rollout_rows(self, lam, **kwargs):
        data = _dataset()
        algo = _fitted({"finetune.penalty_coef": lam, "finetune.horizon": 1, "finetune.model_samples_per_iteration": 8,
                        "model.num_members": 3, "model.num_elites": 2, **kwargs}, data)
        ens = algo.ensemble
        ens.elite_indices.copy_(torch.tensor([0, 1]))
        sigmas = self.SIGMAS

        def fake_predict(observation, action, member_index=None, *, member_first=False):
            b = observation.shape[:-1]
            loc = observation.expand(3, *observation.shape)
            scale = sigmas.view(3, *([1] * len(b)), OBS).expand(3, *b, OBS)
            reward = torch.full((3, *b, 1), 2.0)
            return EnsemblePrediction(loc, scale, reward)

        ens.predict = fake_predict
        return algo, algo.improver.collect_model_rollouts(algo)

    @pytest.mark.parametrize("reading", ["std_norm", "cov_frobenius"])
    def test_penalty_is_lambda_max_frobenius_over_elites(self, reading):
        lam = 0.7
        algo, rows = self._rollout_rows(lam, **{"finetune.penalty_uncertainty": reading})
        # std reading: Sigma_i = diag(sigma_i), ||Sigma_i||_F = ||sigma_i||_2 (MB2PO text, MOPO);
        # covariance reading: Sigma_i = diag(sigma_i^2), ||Sigma_i||_F = ||sigma_i^2||_2
        power = 1 if reading == "std_norm" else 2
        frob = torch.stack([torch.linalg.matrix_norm(torch.diag(s.pow(power)), "fro") for s in self.SIGMAS])
        expected = lam * frob[:2].max()
        assert not math.isclose(expected.item(), lam * frob.max().item())
        torch.testing.assert_close(rows["next", "penalty"], torch.full((8, 1), expected.item()))
        # penalised reward r~ = r - lambda * max_i ||Sigma_i||_F (reward head says 2.0)
        torch.testing.assert_close(rows["next", "reward"], torch.full((8, 1), 2.0 - expected.item()))
        stored = algo.model_buffer[:]
        torch.testing.assert_close(stored["next", "reward"], rows["next", "reward"])

    def test_default_penalty_is_the_largest_std_norm(self):
        """Default: u = max_i ||sigma_i||_2 (MB2PO Sec. 4.3 "largest predicted standard deviation",
        MOPO's implementation), not the norm of the variances (3.4x larger on HalfCheetah)."""
        assert MB2POConfig().finetune.penalty_uncertainty == "std_norm"
        _, rows = self._rollout_rows(1.0)
        expected = self.SIGMAS[:2].norm(dim=-1).max()  # elites 0 and 1: sqrt(5.25) = 2.29
        variance_reading = self.SIGMAS[:2].pow(2).norm(dim=-1).max()  # 4.27
        assert not math.isclose(expected.item(), variance_reading.item())
        torch.testing.assert_close(rows["next", "penalty"], torch.full((8, 1), expected.item()))
        torch.testing.assert_close(rows["next", "reward"], torch.full((8, 1), 2.0 - expected.item()))

    def test_reading_is_part_of_the_checkpointed_config(self, tmp_path):
        algo = MB2PO(_config({"finetune.penalty_uncertainty": "cov_frobenius"}), dataset=_dataset(), run_dir=tmp_path)
        state = algo.state_dict()
        with pytest.raises(ValueError, match="finetune.penalty_uncertainty"):
            MB2PO(_config(), dataset=_dataset(), data_root=tmp_path / "deployments").load_state_dict(state)


class TestPenaltyDrivesCritic:
    def test_larger_penalty_lowers_q_on_model_data(self):
        """omega = 0: the critics learn only from penalised model rows, so a large lambda must
        lower the learned Q-values (catches a sign error anywhere along the pipeline)."""
        data = _dataset()
        q_means = {}
        for lam in (0.0, 1000.0):  # u = max_i ||sigma_i||_2 is about 0.09 here
            algo = _algo({"finetune.omega": 0.0, "finetune.penalty_coef": lam, "finetune.awac_steps_per_iteration": 30,
                          "finetune.horizon": 1, "finetune.model_samples_per_iteration": 64, "seed": 1,
                          "awac.critic_lr": 3e-3, "finetune.iterations": 2, "awac.pretrain_steps": 0}, data)
            algo.collect()
            algo.fit_model()
            algo.pretrain()
            algo.optimize_policy()
            with torch.no_grad():
                out = algo.loss_module(algo.improver.sample_mixed_batch())
            q_means[lam] = out["q_value_mean"].item()
        assert q_means[1000.0] < q_means[0.0] - 1.0, q_means


def _run_tiny():
    from torchrl_depeff.collectors import collect_behaviour_dataset
    from torchrl_depeff.envs.tasks import make_env

    env = make_env("halfcheetah")
    data = collect_behaviour_dataset(None, env, 300, noise="random", seed=0)
    cfg = MB2POConfig().override({
        "awac.batch_size": 64, "policy.num_cells": (32, 32), "awac.critic_num_cells": (32, 32),
        "model.num_cells": (32, 32), "model.num_members": 3, "model.num_elites": 2, "model.max_epochs": 3,
        "finetune.model_samples_per_iteration": 100, "finetune.omega": 0.5, "finetune.horizon": 2,
        "finetune.retain_iterations": 3, "finetune.awac_steps_per_iteration": 5, "awac.num_value_samples": 3,
        "finetune.iterations": 2, "awac.pretrain_steps": 10, "evaluation.episodes": 1, "evaluation.max_steps": 20,
        "evaluation.every_pretrain_steps": 5, "evaluation.every_iterations": 1, "seed": 3,
    })
    return env, data, cfg


class TestEndToEnd:
    def test_tiny_run_and_checkpoint_round_trip(self, tmp_path):
        env, data, cfg = _run_tiny()
        algo = MB2PO(cfg, dataset=data, run_dir=tmp_path / "run", eval_env=env)
        algo.collect()
        algo.fit_model()
        pre = algo.pretrain()
        assert algo.learner.pretrain_steps_done == 10 and pre["pretrain/steps"] == 10
        assert math.isfinite(pre["pretrain/eval_return"])
        actor_before = [p.detach().clone() for p in algo.actor.parameters()]
        target_before = algo.loss_module.target_qvalue_network_params.clone()
        last = algo.optimize_policy()
        imp = algo.improver
        assert imp.iteration == 2 and algo.learner.finetune_steps_done == 10
        assert len(algo.model_buffer) == 2 * imp.rows_per_iteration == 200
        assert all(math.isfinite(v) for v in last.values()), last
        assert last["finetune/penalty"] > 0  # the penalty is applied to model rows
        # fine-tuning moved the actor and the target critics
        assert any(not torch.equal(a, b.detach()) for a, b in zip(actor_before, algo.actor.parameters()))
        assert not torch.equal(
            target_before.flatten_keys()["module.0.weight"],
            algo.loss_module.target_qvalue_network_params.flatten_keys()["module.0.weight"],
        )
        ev = algo.evaluate()
        assert ev["eval/episode_length"] == 20 and math.isfinite(ev["eval/return_mean"])
        assert math.isfinite(ev["eval/normalized_score"])
        algo.end_deployment()
        # evaluations recorded during the long phases: 2 of AWAC (every 5 of 10 steps), 1 of MB2PO
        assert [c["phase"] for c in algo.curve] == ["pretrain", "pretrain", "finetune"]
        summary = algo.summary()
        assert summary["awac_score"] == algo.curve[1]["score"] and summary["iterations"] == 2

        # checkpoint: weights_only load, identical continuation
        state = torch.load(tmp_path / "run" / "checkpoint.pt", weights_only=True)
        other = MB2PO(cfg, dataset=data, run_dir=tmp_path / "run", eval_env=env)  # resumed
        assert (other.improver.iteration, other.learner.pretrain_steps_done, other.learner.finetune_steps_done) == (2, 10, 10)
        assert other.deployment == 1 and other.curve == algo.curve
        assert len(other.model_buffer) == len(algo.model_buffer)
        torch.testing.assert_close(other.model_buffer[:]["observation"], algo.model_buffer[:]["observation"])
        assert torch.equal(other.ensemble.elite_indices, algo.ensemble.elite_indices)
        obs = data["observation"][:5]
        torch.testing.assert_close(
            other.loss_module.actor_network(TensorDict({"observation": obs}, [5]))["loc"],
            algo.loss_module.actor_network(TensorDict({"observation": obs}, [5]))["loc"],
        )
        # (the actor calls above sampled actions: restore the saved RNG for both runs)
        other.improver.prepare(other)
        torch.set_rng_state(state["rng"]["torch"])
        other.improver.iterate(other)
        torch.set_rng_state(state["rng"]["torch"])
        algo.improver.iterate(algo)
        for a, b in zip(algo.loss_module.parameters(), other.loss_module.parameters()):
            torch.testing.assert_close(a, b)
        torch.testing.assert_close(algo.model_buffer[:]["observation"], other.model_buffer[:]["observation"])

    def test_load_rejects_other_config_and_dataset(self, tmp_path):
        algo = MB2PO(_config(), dataset=_dataset(), run_dir=tmp_path)
        algo.collect()
        state = algo.state_dict()
        other = MB2PO(_config({"finetune.omega": 0.25}), dataset=_dataset(), data_root=tmp_path / "x")
        with pytest.raises(ValueError, match="finetune.omega"):
            other.load_state_dict(state)
        bad = dict(state, strategies={**state["strategies"], "initializer": {}})
        with pytest.raises(KeyError, match="loss_module"):
            MB2PO(_config(), dataset=_dataset(), data_root=tmp_path / "deployments").load_state_dict(bad)
        # the same run directory with another dataset (one row changed): refused by name
        changed = _dataset()
        changed["action"][7] = 0.0
        with pytest.raises(ValueError, match="fingerprint"):
            MB2PO(_config(), dataset=changed, run_dir=tmp_path).collect()


class TestD4RLScores:
    def test_reference_values_and_formula(self):
        from torchrl_depeff.data.scores import d4rl_normalized_score, REF_MAX_SCORE, REF_MIN_SCORE

        # d4rl/infos.py REF_MIN_SCORE / REF_MAX_SCORE (identical for every dataset of a robot)
        assert REF_MIN_SCORE == {"halfcheetah": -280.178953, "hopper": -20.272305, "walker2d": 1.629008}
        assert REF_MAX_SCORE == {"halfcheetah": 12135.0, "hopper": 3234.3, "walker2d": 4592.3}
        r = 3000.0
        expected = 100 * (r - 1.629008) / (4592.3 - 1.629008)
        assert d4rl_normalized_score("walker2d-medium-v2", r) == pytest.approx(expected)
        assert d4rl_normalized_score("Hopper", -20.272305) == pytest.approx(0.0)
        out = d4rl_normalized_score("halfcheetah-mixed", torch.tensor([-280.178953, 12135.0, 5927.4105]))
        torch.testing.assert_close(out, torch.tensor([0.0, 100.0, 50.0]))
        assert d4rl_normalized_score("hopper", torch.tensor([3234])).dtype == torch.float32

    def test_unknown_task(self):
        from torchrl_depeff.data.scores import d4rl_normalized_score

        with pytest.raises(ValueError, match="ant"):
            d4rl_normalized_score("ant-medium-v2", 1.0)
        with pytest.raises(TypeError, match="str"):
            d4rl_normalized_score(3, 1.0)


_PAPER_TABLE = {  # MB2PO App. 7.3 as printed: (alpha, omega, h, lambda)
    "halfcheetah-random": (1.0, 0.8, 5, 1.0), "hopper-random": (1.0, 0.8, 1, 1.0),
    "walker2d-random": (1.0, 0.8, 1, 1.0), "halfcheetah-medium": (1.0, 0.8, 5, 1.0),
    "hopper-medium": (1.0, 0.8, 1, 1.0), "walker2d-medium": (1.0, 0.8, 1, 1.0),
    "halfcheetah-expert": (2.0, 0.8, 1, 1.0), "hopper-expert": (2.0, 0.8, 1, 1.0),
    "walker2d-expert": (2.0, 0.8, 1, 1.0), "halfcheetah-medium-expert": (2.0, 0.8, 1, 1.0),
    "hopper-medium-expert": (2.0, 0.8, 1, 1.0), "walker2d-medium-expert": (2.0, 0.8, 1, 1.0),
    "halfcheetah-mixed": (1.0, 0.01, 5, 1.0), "hopper-mixed": (1.0, 0.01, 1, 1.0),
    "walker2d-mixed": (1.0, 0.01, 1, 1.0),
}


def test_paper_table_is_app_7_3():
    table = {k: (v["alpha"], v["omega"], v["h"], v["lambda"]) for k, v in MB2PO_PAPER_HYPERPARAMETERS.items()}
    assert table == _PAPER_TABLE
    for key, (alpha, omega, h, lam) in _PAPER_TABLE.items():
        task, dataset = key.split("-", 1)
        cfg = MB2POConfig.paper(task, dataset)
        assert (cfg.awac.awac_lambda, cfg.finetune.omega, cfg.finetune.horizon, cfg.finetune.penalty_coef) == (alpha, omega, h, lam)


@pytest.mark.parametrize("preset", ["paper", "quick"])
def test_example_config_per_task_and_dataset(preset):
    from pathlib import Path

    from hydra import compose, initialize_config_dir
    from omegaconf import OmegaConf

    from torchrl_depeff.algorithms.hydra_configs import register_configs

    register_configs()
    root = Path(__file__).resolve().parents[2]
    with initialize_config_dir(config_dir=str(root / "examples" / "mb2po"), version_base="1.3"):
        for key, row in _PAPER_TABLE.items():
            task, dataset = key.split("-", 1)
            cfg = compose("config", overrides=[f"task={task}", f"dataset={dataset}", f"preset={preset}"])
            c = MB2POConfig.from_dict(OmegaConf.to_container(cfg.mb2po, resolve=True))
            assert (c.awac.awac_lambda, c.finetune.omega, c.finetune.horizon, c.finetune.penalty_coef) == row
            assert (c.task, c.dataset) == (task, dataset)
            if preset == "paper":
                assert c == MB2POConfig.paper(task, dataset)
                assert (c.awac.pretrain_steps, c.finetune.iterations, c.finetune.awac_steps_per_iteration) == (500_000, 500, 1000)


def test_example_runs_and_resumes(tmp_path):
    import json
    from pathlib import Path

    from hydra import compose, initialize_config_dir

    from examples.mb2po.mb2po import train

    root = Path(__file__).resolve().parents[2]
    tiny = [f"output_dir={tmp_path}", "preset=smoke", "data.num_transitions=300", "mb2po.awac.pretrain_steps=6",
            "mb2po.evaluation.every_pretrain_steps=3"]
    with initialize_config_dir(config_dir=str(root / "examples" / "mb2po"), version_base="1.3"):
        first = train(compose("config", overrides=[*tiny, "mb2po.finetune.iterations=1"]))
        summary = json.loads((tmp_path / "summary.json").read_text())["summary"]
        assert (summary["pretrain_steps"], summary["iterations"]) == (6, 1) and len(first) == 1
        for name in ("checkpoint.pt", "learning_curve.png", "summary.json", "metrics.json", "dataset/metadata.json"):
            assert (tmp_path / name).exists(), name
        assert not list(tmp_path.glob("*.tmp*"))  # atomic writes leave no temporary file
        assert (tmp_path / "logs" / "mb2po" / "scalars").is_dir()
        # rerun of the finished run: a no-op resume with the same result
        again = train(compose("config", overrides=[*tiny, "mb2po.finetune.iterations=1"]))
        assert again == first
        # another budget on the same directory: the config differs, refused naming the key
        with pytest.raises(ValueError, match="finetune.iterations"):
            train(compose("config", overrides=[*tiny, "mb2po.finetune.iterations=2"]))
        # another dataset size on the same directory: refused naming the option
        with pytest.raises(ValueError, match="num_transitions=300->400"):
            train(compose("config", overrides=[*tiny, "data.num_transitions=400", "mb2po.finetune.iterations=1"]))
        # type-checked overrides
        with pytest.raises(Exception, match="omega"):
            compose("config", overrides=[*tiny, "mb2po.finetune.omega=abc"])


class TestBehaviourPolicyFromBREMEN:
    """``examples/mb2po/utils.behaviour_policy`` loads a BREMEN example checkpoint's actor."""

    @staticmethod
    def _utils():
        from examples.mb2po import utils

        return utils

    @staticmethod
    def _bremen_checkpoint(tmp_path, **overrides):
        from torchrl_depeff.algorithms.bremen import BREMEN, BREMENConfig

        # non-default activation and a learned, non-default std: a rebuild ignoring the config
        # (make_gaussian_actor's defaults) would give other actions or another noise scale
        values = {
            "policy.num_cells": (8, 8), "policy.activation": "silu", "policy.learn_sigma": True,
            "policy.sigma": 0.7, "model.num_members": 2, "model.num_cells": (8,), "evaluation.episodes": 0,
            "seed": 3, **overrides,
        }
        algo = BREMEN(BREMENConfig().override(values), run_dir=tmp_path / "bremen")
        with torch.no_grad():
            algo.policy_net.log_std.copy_(torch.linspace(-0.5, 0.5, 6))
            for p in algo.policy_net.mean_net.parameters():
                p.mul_(3.0)  # saturate tanh(mu) for some rows: the clip must not alter the mean
        path = tmp_path / "checkpoint.pt"
        torch.save(algo.state_dict(), path)  # the checkpoint format of the BREMEN example
        return algo, path

    def test_actions_equal_bremen_actor(self, tmp_path):
        from torchrl.envs.utils import ExplorationType, set_exploration_type

        utils = self._utils()
        algo, path = self._bremen_checkpoint(tmp_path)
        pi_b = utils.behaviour_policy("halfcheetah", 0, str(path))
        obs = TensorDict(observation=torch.randn(64, 17) * 3, batch_size=[64])
        with torch.no_grad(), set_exploration_type(ExplorationType.DETERMINISTIC):
            ours = pi_b(obs.clone())["action"]
            ref = algo.actor(obs.clone())["action"]
        assert torch.equal(ours, ref)
        assert ours.abs().max() > 0.99  # saturated rows are compared too
        # sampling (as collect_behaviour_dataset deploys it): BREMEN's sample, clipped to [-1, 1]
        with torch.no_grad(), set_exploration_type(ExplorationType.RANDOM):
            torch.manual_seed(5)
            ours = pi_b(obs.clone())
            torch.manual_seed(5)
            ref = algo.actor(obs.clone())
        assert torch.equal(ours["scale"], ref["scale"])  # the learned std was loaded
        assert torch.allclose(ref["scale"][0], torch.linspace(-0.5, 0.5, 6).exp())
        assert (ref["action"].abs() > 1).any()
        assert torch.equal(ours["action"], ref["action"].clamp(-1.0, 1.0))

    def test_collects_a_dataset(self, tmp_path):
        from torchrl_depeff.collectors import collect_behaviour_dataset

        utils = self._utils()
        _, path = self._bremen_checkpoint(tmp_path)
        from torchrl_depeff.algorithms.mb2po import make_native_env

        env = make_native_env("halfcheetah", 0)
        data = collect_behaviour_dataset(utils.behaviour_policy("halfcheetah", 0, str(path)), env, 30, noise="eps3")
        assert data.batch_size == torch.Size([30]) and data["action"].abs().max() <= 1.0
        assert data["behaviour_mode"].bincount().tolist() == [12, 12, 6]

    def test_errors(self, tmp_path):
        utils = self._utils()
        algo, path = self._bremen_checkpoint(tmp_path)
        with pytest.raises(ValueError, match="'hopper'.*observation 11, action 3"):
            utils.behaviour_policy("hopper", 0, str(path))
        with pytest.raises(ValueError, match="Walker2d-v5"):  # same sizes, another env
            utils.behaviour_policy("walker2d", 0, str(path))
        with pytest.raises(FileNotFoundError, match="nope.pt"):
            utils.behaviour_policy("halfcheetah", 0, str(tmp_path / "nope.pt"))
        (tmp_path / "text.pt").write_text("not a checkpoint")
        with pytest.raises(ValueError, match="weights_only"):
            utils.behaviour_policy("halfcheetah", 0, str(tmp_path / "text.pt"))
        torch.save({"weights": torch.zeros(3)}, tmp_path / "other.pt")
        with pytest.raises(ValueError, match="neither a BREMEN checkpoint"):
            utils.behaviour_policy("halfcheetah", 0, str(tmp_path / "other.pt"))
        state = algo.state_dict()
        state["config"]["policy"]["num_cells"] = [16, 16]  # actor no longer matches its config
        torch.save(state, tmp_path / "mismatch.pt")
        with pytest.raises(ValueError, match="'actor' does not match its config"):
            utils.behaviour_policy("halfcheetah", 0, str(tmp_path / "mismatch.pt"))
        state["config"] = {"no_such_field": 1}
        torch.save(state, tmp_path / "badcfg.pt")
        with pytest.raises(ValueError, match="not a valid BREMENConfig"):
            utils.behaviour_policy("halfcheetah", 0, str(tmp_path / "badcfg.pt"))

    def test_gmm_state_dict_still_loads(self, tmp_path):
        from torchrl.envs.utils import ExplorationType, set_exploration_type

        from torchrl_depeff.modules.mixture import make_gmm_actor

        utils = self._utils()
        gmm = make_gmm_actor(17, 6)
        torch.save(gmm.state_dict(), tmp_path / "gmm.pt")
        pi_b = utils.behaviour_policy("halfcheetah", 0, str(tmp_path / "gmm.pt"))
        obs = TensorDict(observation=torch.randn(8, 17), batch_size=[8])
        with torch.no_grad(), set_exploration_type(ExplorationType.DETERMINISTIC):
            assert torch.equal(pi_b(obs.clone())["action"], gmm(obs.clone())["action"])
