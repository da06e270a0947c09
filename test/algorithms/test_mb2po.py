"""MB2PO (Alg. 1): batch mixing, branched rollouts, penalty, errors, end-to-end, checkpointing.

The GMM actor's log-prob against a direct mixture-formula reference is tested in
``test/modules/test_mixture.py`` and not repeated here.
"""
from __future__ import annotations

import math

import pytest
import torch
from tensordict import TensorDict

from torchrl_depeff.algorithms.mb2po import MB2PO, MB2POConfig, TRAIN_KEYS
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


def _config(**kwargs) -> MB2POConfig:
    base = dict(
        batch_size=32, num_cells=(16,), model_cells=(16,), num_members=3, num_elites=2,
        model_max_epochs=2, model_samples_per_iteration=24, omega=0.5, horizon=3,
        retain_iterations=2, awac_steps_per_iteration=2, num_value_samples=2, pretrain_steps=2,
        num_components=2,
    )
    base.update(kwargs)
    return MB2POConfig(**base)


class TestConfig:
    def test_defaults_follow_the_paper(self):
        cfg = MB2POConfig()
        assert (cfg.awac_lambda, cfg.batch_size, cfg.tau, cfg.max_weight) == (1.0, 1024, 5e-3, 20.0)
        assert cfg.num_cells == (256,) * 4 and cfg.num_components == 5
        assert cfg.model_cells == (200,) * 4 and cfg.model_activation == "swish"
        assert (cfg.omega, cfg.horizon, cfg.penalty_coef) == (0.8, 1, 1.0)
        assert (cfg.retain_iterations, cfg.awac_steps_per_iteration, cfg.num_iterations) == (100, 1000, 500)
        assert cfg.model_samples_per_iteration == 1_000_000
        assert MB2POConfig(horizon=5, model_samples_per_iteration=10).rollouts_per_iteration == 2

    @pytest.mark.parametrize(
        "kwargs, name",
        [
            ({"omega": -0.1}, "omega"),
            ({"omega": 1.5}, "omega"),
            ({"horizon": 0}, "horizon"),
            ({"penalty_coef": -1.0}, "penalty_coef"),
            ({"awac_lambda": 0.0}, "awac_lambda"),
            ({"num_elites": 6}, "num_elites"),
            ({"retain_iterations": 0}, "retain_iterations"),
            ({"model_activation": "tanh"}, "model_activation"),
            ({"gamma": 1.5}, "gamma"),
            ({"target": "mean"}, "target"),
            ({"target_quantile": 1.2}, "target_quantile"),
            ({"tau": 0.0}, "tau"),
            ({"batch_size": 0}, "batch_size"),
        ],
    )
    def test_bad_values_raise_naming_them(self, kwargs, name):
        with pytest.raises(ValueError, match=name):
            MB2POConfig(**kwargs)


def test_quantile_target_runs():
    algo = MB2PO(_dataset(), _config(target="quantile", target_quantile=0.1, num_qvalue_nets=3))
    out = algo.pretrain(2)
    assert algo.loss_module.target == "quantile" and math.isfinite(out["pretrain/loss_qvalue"])


class TestBadInput:
    def test_missing_key(self):
        data = _dataset().exclude(("next", "reward"))
        with pytest.raises(KeyError, match="reward"):
            MB2PO(data, _config())

    def test_non_finite(self):
        data = _dataset()
        data["observation"][3, 1] = float("nan")
        with pytest.raises(ValueError, match="observation"):
            MB2PO(data, _config())

    def test_ensemble_without_reward_head(self):
        model = DynamicsEnsemble(OBS, ACT, num_members=2, num_cells=(8,), probabilistic=True)
        with pytest.raises(ValueError, match="reward head"):
            MB2PO(_dataset(), _config(), ensemble=model)

    def test_deterministic_ensemble(self):
        model = DynamicsEnsemble(OBS, ACT, num_members=2, num_cells=(8,), predict_reward=True)
        with pytest.raises(ValueError, match="probabilistic"):
            MB2PO(_dataset(), _config(), ensemble=model)

    def test_wrong_config_type_and_order_errors(self):
        with pytest.raises(TypeError, match="MB2POConfig"):
            MB2PO(_dataset(), {"omega": 0.5})
        algo = MB2PO(_dataset(), _config())
        with pytest.raises(RuntimeError, match="fit_model"):
            algo.collect_model_rollouts()
        with pytest.raises(RuntimeError, match="model buffer is empty"):
            algo.sample_mixed_batch()
        with pytest.raises(ValueError, match="num_steps"):
            algo.pretrain(-1)


class TestMixedBatches:
    @pytest.mark.parametrize("omega", [0.0, 0.05, 0.3, 0.8, 1.0])
    def test_real_share_and_origin_tags(self, omega):
        data = _dataset(300)
        batch_size = 200
        algo = MB2PO(data, _config(omega=omega, batch_size=batch_size))
        # model rows marked by a negative first feature and is_real False
        n_model = 500
        fake = _dataset(n_model, seed=1)
        fake["observation"][:, 0] = -10.0 - torch.arange(n_model, dtype=torch.float32)
        fake.set("is_real", torch.zeros(n_model, dtype=torch.bool))
        algo.model_buffer.extend(fake.select(*TRAIN_KEYS))
        real_markers = set(data["observation"][:, 0].tolist())
        fractions = []
        for _ in range(20):
            batch = algo.sample_mixed_batch()
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
        algo = MB2PO(_dataset(), _config(retain_iterations=2))
        algo.fit_model()
        chunks = [algo.collect_model_rollouts() for _ in range(3)]
        rows = algo.rows_per_iteration
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
        algo = MB2PO(data, _config(horizon=h, model_samples_per_iteration=40))
        algo.fit_model()
        rows = algo.collect_model_rollouts()
        assert rows.shape == (40,) and not bool(rows["is_real"].any())
        lengths = self._check_trajectories(rows, data, 10, h)
        assert lengths == [h] * 10  # no termination function: every trajectory runs h steps

    def test_stop_at_termination(self):
        data = _dataset()
        h = 3

        def terminate(obs, action, next_obs):
            return (action[..., :1] > 0.0)

        algo = MB2PO(data, _config(horizon=h, model_samples_per_iteration=60), termination_fn=terminate)
        algo.fit_model()
        rows = algo.collect_model_rollouts()
        lengths = self._check_trajectories(rows, data, 20, h, terminate)
        assert any(n < h for n in lengths) and any(n == h for n in lengths)
        assert bool(rows["next", "terminated"].any())


class TestRolloutChunks:
    def test_rollouts_collected_in_memory_chunks(self):
        data = _dataset()
        # 8 rollouts per iteration, at most 3 per model-env call: 3 calls of 3 rollouts x 3 steps
        algo = MB2PO(data, _config(horizon=3, model_samples_per_iteration=24, rollout_batch_size=3))
        assert (algo.rollouts_per_call, algo.calls_per_iteration, algo.rows_per_iteration) == (3, 3, 27)
        algo.fit_model()
        rows = algo.collect_model_rollouts()
        assert rows.shape == (27,) and len(algo.model_buffer) == 27
        TestRollouts._check_trajectories(rows, data, 9, 3)


class TestPenalty:
    # hand-built per-member stds; member 2 (the largest) is not an elite
    SIGMAS = torch.tensor([[0.5, 1.0, 2.0], [1.5, 0.1, 0.3], [3.0, 3.0, 3.0]])

    def _rollout_rows(self, lam, **kwargs):
        data = _dataset()
        cfg = _config(penalty_coef=lam, horizon=1, model_samples_per_iteration=8, num_members=3,
                      num_elites=2, **kwargs)
        algo = MB2PO(data, cfg)
        algo.fit_model()
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
        return algo, algo.collect_model_rollouts()

    @pytest.mark.parametrize("reading", ["std_norm", "cov_frobenius"])
    def test_penalty_is_lambda_max_frobenius_over_elites(self, reading):
        lam = 0.7
        algo, rows = self._rollout_rows(lam, penalty_uncertainty=reading)
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
        assert MB2POConfig().penalty_uncertainty == "std_norm"
        _, rows = self._rollout_rows(1.0)
        expected = self.SIGMAS[:2].norm(dim=-1).max()  # elites 0 and 1: sqrt(5.25) = 2.29
        variance_reading = self.SIGMAS[:2].pow(2).norm(dim=-1).max()  # 4.27
        assert not math.isclose(expected.item(), variance_reading.item())
        torch.testing.assert_close(rows["next", "penalty"], torch.full((8, 1), expected.item()))
        torch.testing.assert_close(rows["next", "reward"], torch.full((8, 1), 2.0 - expected.item()))

    def test_bad_reading_and_old_checkpoints(self):
        with pytest.raises(ValueError, match="penalty_uncertainty"):
            _config(penalty_uncertainty="variance")
        # a checkpoint written before the option existed used the covariance reading
        state = MB2PO(_dataset(), _config(penalty_uncertainty="cov_frobenius")).state_dict()
        del state["config"]["penalty_uncertainty"]
        MB2PO(_dataset(), _config(penalty_uncertainty="cov_frobenius")).load_state_dict(state)
        with pytest.raises(ValueError, match="penalty_uncertainty"):
            MB2PO(_dataset(), _config()).load_state_dict(state)


class TestPenaltyDrivesCritic:
    def test_larger_penalty_lowers_q_on_model_data(self):
        """omega = 0: the critics learn only from penalised model rows, so a large lambda must
        lower the learned Q-values (catches a sign error anywhere along the pipeline)."""
        data = _dataset()
        q_means = {}
        for lam in (0.0, 1000.0):  # u = max_i ||sigma_i||_2 is about 0.09 here
            algo = MB2PO(data, _config(omega=0.0, penalty_coef=lam, awac_steps_per_iteration=30,
                                       horizon=1, model_samples_per_iteration=64, seed=1,
                                       critic_lr=3e-3))
            algo.fit_model()
            algo.train(2)
            with torch.no_grad():
                out = algo.loss_module(algo.sample_mixed_batch())
            q_means[lam] = out["q_value_mean"].item()
        assert q_means[1000.0] < q_means[0.0] - 1.0, q_means


def _run_tiny(tmp_path=None):
    from torchrl_depeff.data.datasets import collect_behaviour_dataset
    from torchrl_depeff.envs.tasks import make_env

    env = make_env("halfcheetah")
    data = collect_behaviour_dataset(None, env, 300, noise="random", seed=0)
    cfg = MB2POConfig(
        batch_size=64, num_cells=(32, 32), model_cells=(32, 32), num_members=3, num_elites=2,
        model_max_epochs=3, model_samples_per_iteration=100, omega=0.5, horizon=2,
        retain_iterations=3, awac_steps_per_iteration=5, num_value_samples=3, num_iterations=2,
        seed=3,
    )
    return env, data, cfg


class TestEndToEnd:
    def test_tiny_run_and_checkpoint_round_trip(self, tmp_path):
        env, data, cfg = _run_tiny()
        algo = MB2PO(data, cfg)
        pre = algo.pretrain(10)
        assert algo.pretrain_steps_done == 10 and math.isfinite(pre["pretrain/loss_qvalue"])
        actor_before = [p.detach().clone() for p in algo.actor.parameters()]
        target_before = algo.loss_module.target_qvalue_network_params.clone()
        history = algo.train()
        assert len(history) == 2 and algo.iteration == 2 and algo.finetune_steps_done == 10
        assert len(algo.model_buffer) == 2 * algo.rows_per_iteration == 200
        for m in history:
            assert all(math.isfinite(v) for v in m.values()), m
            assert m["finetune/penalty"] > 0  # the penalty is applied to model rows
        # fine-tuning moved the actor and the target critics
        assert any(not torch.equal(a, b.detach()) for a, b in zip(actor_before, algo.actor.parameters()))
        assert not torch.equal(
            target_before.flatten_keys()["module.0.weight"],
            algo.loss_module.target_qvalue_network_params.flatten_keys()["module.0.weight"],
        )
        ev = algo.evaluate(env, num_episodes=1, max_steps=20)
        assert ev["eval/episode_length"] == 20 and math.isfinite(ev["eval/return_mean"])

        # checkpoint: atomic-style save, weights_only load, identical continuation
        path = tmp_path / "ckpt.pt"
        torch.save(algo.state_dict(), path)
        state = torch.load(path, weights_only=True)
        other = MB2PO(data, cfg)
        other.load_state_dict(state)
        assert (other.iteration, other.pretrain_steps_done, other.finetune_steps_done) == (2, 10, 10)
        assert len(other.model_buffer) == len(algo.model_buffer)
        torch.testing.assert_close(other.model_buffer[:]["observation"], algo.model_buffer[:]["observation"])
        assert torch.equal(other.ensemble.elite_indices, algo.ensemble.elite_indices)
        obs = data["observation"][:5]
        torch.testing.assert_close(
            other.loss_module.actor_network(TensorDict({"observation": obs}, [5]))["loc"],
            algo.loss_module.actor_network(TensorDict({"observation": obs}, [5]))["loc"],
        )
        # (the actor calls above sampled actions: restore the saved RNG for both runs)
        torch.set_rng_state(state["torch_rng"])
        other.finetune_iteration()
        torch.set_rng_state(state["torch_rng"])
        algo.finetune_iteration()
        for a, b in zip(algo.loss_module.parameters(), other.loss_module.parameters()):
            torch.testing.assert_close(a, b)
        torch.testing.assert_close(algo.model_buffer[:]["observation"], other.model_buffer[:]["observation"])

    def test_load_rejects_other_config(self):
        algo = MB2PO(_dataset(), _config())
        state = algo.state_dict()
        other = MB2PO(_dataset(), _config(omega=0.25))
        with pytest.raises(ValueError, match="omega"):
            other.load_state_dict(state)
        with pytest.raises(KeyError, match="loss_module"):
            other.load_state_dict({k: v for k, v in state.items() if k != "loss_module"})


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


_PAPER_TABLE = {  # MB2PO App. 7.3 (alpha, omega, h, lambda); walker2d-mixed is our choice
    "halfcheetah-random": (1.0, 0.8, 5, 1.0), "hopper-random": (1.0, 0.8, 1, 1.0),
    "walker2d-random": (1.0, 0.8, 1, 1.0), "halfcheetah-medium": (1.0, 0.8, 5, 1.0),
    "hopper-medium": (1.0, 0.8, 1, 1.0), "walker2d-medium": (1.0, 0.8, 1, 1.0),
    "halfcheetah-expert": (2.0, 0.8, 1, 1.0), "hopper-expert": (2.0, 0.8, 1, 1.0),
    "walker2d-expert": (2.0, 0.8, 1, 1.0), "halfcheetah-medium-expert": (2.0, 0.8, 1, 1.0),
    "hopper-medium-expert": (2.0, 0.8, 1, 1.0), "walker2d-medium-expert": (2.0, 0.8, 1, 1.0),
    "halfcheetah-mixed": (1.0, 0.01, 5, 1.0), "hopper-mixed": (1.0, 0.01, 1, 1.0),
    "walker2d-mixed": (1.0, 0.01, 1, 1.0),
}


@pytest.mark.parametrize("preset", ["paper", "quick"])
def test_example_config_per_task_and_dataset(preset):
    import sys
    from pathlib import Path

    root = Path(__file__).resolve().parents[2]
    if str(root) not in sys.path:
        sys.path.insert(0, str(root))
    from hydra import compose, initialize_config_dir

    from examples.mb2po.utils import build_config, DATASETS, TASKS

    assert len(TASKS) * len(DATASETS) == len(_PAPER_TABLE)
    with initialize_config_dir(config_dir=str(root / "examples" / "mb2po"), version_base=None):
        for task in TASKS:
            for dataset in DATASETS:
                cfg = compose("config", overrides=[f"task={task}", f"dataset={dataset}", f"preset={preset}"])
                c = build_config(cfg)
                assert (c.awac_lambda, c.omega, c.horizon, c.penalty_coef) == _PAPER_TABLE[f"{task}-{dataset}"]
                if preset == "paper":
                    assert (c.pretrain_steps, c.num_iterations, c.awac_steps_per_iteration) == (500_000, 500, 1000)
                    assert (c.model_samples_per_iteration, c.retain_iterations, c.batch_size) == (1_000_000, 100, 1024)
                    assert c.num_cells == (256,) * 4 and c.model_cells == (200,) * 4


def test_example_runs_and_resumes(tmp_path):
    import json
    import sys
    from pathlib import Path

    root = Path(__file__).resolve().parents[2]
    if str(root) not in sys.path:
        sys.path.insert(0, str(root))
    from hydra import compose, initialize_config_dir

    from examples.mb2po.mb2po import run

    tiny = [
        f"output_dir={tmp_path}", "presets.quick.num_transitions=300", "presets.quick.pretrain_steps=6",
        "presets.quick.eval_every_pretrain_steps=3", "presets.quick.eval_every_iterations=1",
        "presets.quick.eval_max_steps=10", "presets.quick.model_max_epochs=1", "presets.quick.batch_size=32",
        "presets.quick.num_cells=[16]", "presets.quick.model_cells=[16]", "presets.quick.num_value_samples=2",
        "presets.quick.model_samples_per_iteration=50", "presets.quick.awac_steps_per_iteration=3",
    ]
    with initialize_config_dir(config_dir=str(root / "examples" / "mb2po"), version_base=None):
        first = run(compose("config", overrides=[*tiny, "presets.quick.num_iterations=1"]))
        assert (first["pretrain_steps"], first["iterations"]) == (6, 1)
        for name in ("checkpoint.pt", "learning_curve.png", "summary.json", "dataset/metadata.json"):
            assert (tmp_path / name).exists(), name
        assert not list(tmp_path.glob("*.tmp"))  # atomic writes leave no temporary file
        ckpt = torch.load(tmp_path / "checkpoint.pt", weights_only=True)
        assert ckpt["algo"]["iteration"] == 1 and len(ckpt["history"]) == 3  # 2 AWAC + 1 MB2PO evals
        assert (tmp_path / "mb2po" / "scalars").is_dir()
        # resume with a larger budget: no pre-training again, one more iteration
        second = run(compose("config", overrides=[*tiny, "presets.quick.num_iterations=2"]))
        assert (second["pretrain_steps"], second["iterations"]) == (6, 2)
        history = json.loads((tmp_path / "summary.json").read_text())["history"]
        assert [h["phase"] for h in history] == ["pretrain", "pretrain", "finetune", "finetune"]
        assert second["awac_score"] == first["awac_score"]


class TestBehaviourPolicyFromBREMEN:
    """``examples/mb2po/utils.behaviour_policy`` loads a BREMEN example checkpoint's actor."""

    @staticmethod
    def _utils():
        import sys
        from pathlib import Path

        root = Path(__file__).resolve().parents[2]
        if str(root) not in sys.path:
            sys.path.insert(0, str(root))
        from examples.mb2po import utils

        return utils

    @staticmethod
    def _bremen_checkpoint(tmp_path, **overrides):
        from torchrl_depeff.algorithms.bremen import BREMEN, BREMENConfig

        # non-default activation and a learned, non-default std: a rebuild ignoring the config
        # (make_gaussian_actor's defaults) would give other actions or another noise scale
        kwargs = dict(
            policy_num_cells=(8, 8), policy_activation="silu", learn_sigma=True, sigma=0.7,
            ensemble_size=2, ensemble_num_cells=(8,), eval_episodes=0, seed=3,
        )
        kwargs.update(overrides)
        algo = BREMEN(BREMENConfig(**kwargs), data_root=tmp_path / "bremen")
        with torch.no_grad():
            algo.policy_net.log_std.copy_(torch.linspace(-0.5, 0.5, 6))
            for p in algo.policy_net.mean_net.parameters():
                p.mul_(3.0)  # saturate tanh(mu) for some rows: the clip must not alter the mean
        path = tmp_path / "checkpoint.pt"
        torch.save(algo.state_dict(), path)  # the real checkpoint format of the BREMEN example
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
        from torchrl_depeff.data.datasets import collect_behaviour_dataset

        utils = self._utils()
        _, path = self._bremen_checkpoint(tmp_path)
        env = utils.make_real_env("halfcheetah", 0)
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
        state["config"]["policy_num_cells"] = [16, 16]  # actor no longer matches its config
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
