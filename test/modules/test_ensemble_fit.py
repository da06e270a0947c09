from __future__ import annotations

import copy
import re

import pytest
import torch
from tensordict import TensorDict

from torchrl_depeff.modules.ensemble import DynamicsEnsemble
from torchrl_depeff.trainers.dynamics import EnsembleTrainer, FitResult

OBS, ACT = 3, 2


def _linear_data(n=600, noise=0.0, reward=False, seed=0) -> TensorDict:
    g = torch.Generator().manual_seed(seed)
    A = torch.tensor([[0.9, 0.1, 0.0], [0.0, 0.8, 0.2], [0.1, 0.0, 0.7]])
    B = torch.tensor([[0.5, 0.0], [0.0, 0.3], [0.2, -0.4]])
    obs = torch.randn(n, OBS, generator=g)
    act = torch.randn(n, ACT, generator=g)
    nxt = obs @ A.T + act @ B.T + noise * torch.randn(n, OBS, generator=g)
    td = TensorDict({"observation": obs, "action": act, ("next", "observation"): nxt}, [n])
    if reward:
        td["next", "reward"] = (obs.sum(-1, keepdim=True) - act.pow(2).sum(-1, keepdim=True))
    return td


def _model(**kwargs) -> DynamicsEnsemble:
    kw = dict(num_members=3, num_cells=(32, 32))
    kw.update(kwargs)
    return DynamicsEnsemble(OBS, ACT, **kw)


class _ListLogger:
    def __init__(self):
        self.records = []

    def log_scalar(self, name, value, step=None):
        self.records.append((name, value, step))


class TestEnsembleTrainer:
    def test_fits_linear_system(self):
        model = _model(predict_reward=True)
        trainer = EnsembleTrainer(model, lr=3e-3, batch_size=64, max_epochs=40, patience=40)
        data = _linear_data(reward=True)
        result = trainer.fit(data)
        assert isinstance(result, FitResult)
        assert result.holdout_loss.shape == (3,) and result.best_epoch.shape == (3,)
        assert (result.holdout_loss < 0.02).all(), result.holdout_loss  # normalised MSE; 1.0 = predicting the mean
        # in data units on fresh data, every member predicts the next state accurately
        test = _linear_data(n=200, reward=True, seed=1)
        pred = model.predict(test["observation"], test["action"])
        err = (pred.loc - test["next", "observation"]).pow(2).mean((1, 2))
        var = (test["next", "observation"] - test["observation"]).var(0).mean()
        assert (err < 0.05 * var).all(), err

    def test_probabilistic_nll_fit_learns_noise_level(self):
        torch.manual_seed(0)
        model = _model(probabilistic=True)
        trainer = EnsembleTrainer(model, lr=3e-3, batch_size=64, max_epochs=60, patience=60)
        assert trainer.loss_module.loss_type == "nll"
        data = _linear_data(n=800, noise=0.3)
        trainer.fit(data)
        pred = model.predict(data["observation"][:200], data["action"][:200])
        # true noise std is 0.3 per dimension; a well-fit Gaussian head should be in the ballpark
        assert 0.15 < pred.scale.mean().item() < 0.6, pred.scale.mean()

    def test_early_stopping_restores_each_members_best(self):
        torch.manual_seed(0)
        snapshots: list[list[torch.Tensor]] = []

        class Corrupting(EnsembleTrainer):
            def _train_epoch(self, train):
                loss = super()._train_epoch(train)
                if len(snapshots) >= 3:  # from the 4th epoch on, member 1 is wrecked every epoch
                    with torch.no_grad():
                        for p in self.ensemble.parameters():
                            p[1].add_(torch.randn_like(p[1]))
                snapshots.append([p.detach().clone() for p in self.ensemble.parameters()])
                return loss

        model = _model()
        trainer = Corrupting(model, lr=3e-3, batch_size=64, max_epochs=12, patience=3)
        result = trainer.fit(_linear_data(n=400))
        assert result.best_epoch[1] <= 2
        assert result.best_epoch[0] > result.best_epoch[1] and result.best_epoch[2] > result.best_epoch[1]
        for e in range(3):
            snap = snapshots[int(result.best_epoch[e])]
            for p, s in zip(model.parameters(), snap):
                torch.testing.assert_close(p[e], s[e], rtol=0, atol=0)
        # reported holdout losses are those of the restored parameters
        data = trainer._prepare(_linear_data(n=400))
        perm = torch.randperm(400, generator=torch.Generator().manual_seed(0))
        holdout = data[perm[: int(0.15 * 400)]]
        torch.testing.assert_close(trainer.evaluate(holdout), result.holdout_loss)

    def test_stops_when_all_members_stall(self):
        model = _model()
        trainer = EnsembleTrainer(model, lr=0.0, batch_size=64, max_epochs=50, patience=2)
        result = trainer.fit(_linear_data(n=200))
        assert result.epochs == 3  # epoch 0 sets the best, epochs 1-2 do not improve
        assert (result.best_epoch == 0).all()

    def test_elites_are_lowest_holdout(self):
        torch.manual_seed(0)
        model = _model(num_members=4, num_elites=2)
        trainer = EnsembleTrainer(model, batch_size=64, max_epochs=3)
        result = trainer.fit(_linear_data(n=300))
        expected = torch.topk(result.holdout_loss, 2, largest=False).indices.sort().values
        assert result.elites.tolist() == expected.tolist() == model.elite_indices.tolist()

    @pytest.mark.parametrize("key", ["observation", ("next", "observation"), ("next", "reward")])
    def test_nan_raises_with_key_and_count(self, key):
        model = _model(predict_reward=True)
        data = _linear_data(n=50, reward=True)
        data.get(key)[3, 0] = float("nan")
        data.get(key)[7, 0] = float("inf")
        with pytest.raises(ValueError, match=re.escape(f"2 non-finite (NaN/inf) values in {key!r}")):
            EnsembleTrainer(model).fit(data)

    def test_flattens_extra_batch_dims_and_refits_normalizers(self):
        model = _model()
        data = _linear_data(n=240).reshape(4, 60)
        data["observation"] += 5.0
        EnsembleTrainer(model, max_epochs=1, batch_size=64).fit(data)
        flat = data.reshape(-1)
        x = torch.cat([flat["observation"], flat["action"]], -1)
        torch.testing.assert_close(model.input_normalizer.loc, x.mean(0))

    def test_member_permutations_differ(self):
        trainer = EnsembleTrainer(_model(), batch_size=1000, max_epochs=1)
        seen = []
        orig = trainer.loss_module.forward

        def spy(td):
            seen.append(td["observation"].clone())
            return orig(td)

        trainer.loss_module.forward = spy
        trainer.fit(_linear_data(n=100))
        obs = seen[0]  # [E, n_train, d]
        assert obs.shape[:2] == (3, 85)
        assert not torch.equal(obs[0], obs[1]) and not torch.equal(obs[1], obs[2])
        # each member sees every training row exactly once per epoch
        torch.testing.assert_close(obs[0].sum(0), obs[1].sum(0))

    def test_logger_and_warm_start_state_dict(self):
        logger = _ListLogger()
        model = _model()
        trainer = EnsembleTrainer(model, batch_size=64, max_epochs=2, patience=5, logger=logger)
        trainer.fit(_linear_data(n=200))
        names = {r[0] for r in logger.records}
        assert names == {f"model/{k}_loss_m{i}" for k in ("train", "holdout") for i in range(3)}
        assert sorted({r[2] for r in logger.records}) == [1, 2]
        state = copy.deepcopy(trainer.state_dict())
        step_count = float(trainer.optimizer.state_dict()["state"][0]["step"])
        assert step_count == trainer.total_steps > 0
        # second fit continues counters and the Adam state (warm start)
        trainer.fit(_linear_data(n=200, seed=3))
        assert trainer.optimizer.state_dict()["state"][0]["step"] > step_count
        assert max(r[2] for r in logger.records) == 4
        # restore into a fresh trainer on the same model
        fresh = EnsembleTrainer(model, batch_size=64, max_epochs=2)
        fresh.load_state_dict(state)
        assert fresh.total_epochs == 2 and fresh.total_steps == state["total_steps"]
        assert fresh.optimizer.state_dict()["state"][0]["step"] == step_count
        with pytest.raises(KeyError, match="optimizer"):
            fresh.load_state_dict({})

    def test_validation(self):
        with pytest.raises(ValueError, match="holdout_ratio"):
            EnsembleTrainer(_model(), holdout_ratio=1.0)
        with pytest.raises(ValueError, match="patience"):
            EnsembleTrainer(_model(), patience=0)
        with pytest.raises(KeyError, match="action"):
            EnsembleTrainer(_model()).fit(_linear_data(n=20).exclude("action"))
