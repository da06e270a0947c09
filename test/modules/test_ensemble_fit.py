from __future__ import annotations

import copy
import re

import pytest
import torch
from tensordict import TensorDict

from torchrl_depeff.modules.ensemble import DynamicsEnsemble
from torchrl_depeff.trainers import dynamics
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
        orig = trainer._train_step

        def spy(x, y):
            seen.append(x.clone())  # normalised inputs [E, b, o + a]
            return orig(x, y)

        trainer._train_step = spy
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
        with pytest.raises(ValueError, match="empty data"):
            EnsembleTrainer(_model()).fit(_linear_data(n=0))

    def test_float64_data_is_cast_to_the_ensemble_dtype(self):
        data = _linear_data(n=200)
        torch.manual_seed(0)
        a = EnsembleTrainer(_model(), max_epochs=2, batch_size=64)
        torch.manual_seed(0)
        b = EnsembleTrainer(_model(), max_epochs=2, batch_size=64)
        ra, rb = a.fit(data), b.fit(data.apply(lambda x: x.double()))
        assert torch.equal(ra.holdout_loss, rb.holdout_loss)
        assert a.ensemble.network.layers[0].weight.dtype == torch.float32


class _ReferenceTrainer(EnsembleTrainer):
    """The implementation before issue 15 (tensordict minibatches through EnsembleDynamicsLoss,
    holdout through forward_normalized with the network's own kernel), for exactness tests."""

    def _train_epoch(self, train):
        E, n = self.ensemble.num_members, train.shape[0]
        perms = torch.rand(E, n, generator=self._generator).argsort(dim=1).to(train.device)
        total = torch.zeros(E, device=train.device)
        for start in range(0, n, self.batch_size):
            idx = perms[:, start : start + self.batch_size]
            out = self.loss_module(train[idx])
            self.optimizer.zero_grad(set_to_none=True)
            out["loss_dynamics"].backward()
            self.grads.append([p.grad.clone() for p in self.ensemble.parameters()])
            self.optimizer.step()
            total += out["member_loss"] * idx.shape[1]
            self.total_steps += 1
        return total / n

    @torch.no_grad()
    def evaluate(self, data):
        ens = self.ensemble
        mean, _ = ens.forward_normalized(data.get("observation"), data.get("action"))
        reward = data.get(("next", "reward")) if ens.predict_reward else None
        target = ens.normalized_target(data.get("observation"), data.get(("next", "observation")), reward)
        return (mean - target).pow(2).mean(tuple(range(1, mean.dim())))

    def fit(self, data):
        data = self._prepare(data)
        n = data.shape[0]
        ens = self.ensemble
        E = ens.num_members
        perm = torch.randperm(n, generator=torch.Generator().manual_seed(self.seed))
        n_hold = min(int(self.holdout_ratio * n), self.max_holdout)
        holdout = data[perm[:n_hold]] if n_hold > 0 else None
        train = data[perm[n_hold:]]
        holdout = train if holdout is None else holdout
        ens.fit_normalizers(data.get("observation"), data.get("action"), data.get(("next", "observation")),
                            data.get(("next", "reward")) if ens.predict_reward else None)
        params = list(ens.parameters())
        snapshots = [p.detach().clone() for p in params]
        best = torch.full((E,), float("inf"))
        best_train = torch.full((E,), float("nan"))
        best_epoch = torch.zeros(E, dtype=torch.long)
        since = torch.zeros(E, dtype=torch.long)
        epochs = 0
        for epoch in range(self.max_epochs):
            train_loss = self._train_epoch(train)
            hold_loss = self.evaluate(holdout)
            epochs = epoch + 1
            improved = (best - hold_loss) / best.abs() > self.improvement_threshold
            improved = improved | torch.isinf(best) & torch.isfinite(hold_loss)
            self._snapshot(params, snapshots, improved)
            best = torch.where(improved, hold_loss, best)
            best_train = torch.where(improved, train_loss, best_train)
            best_epoch = torch.where(improved, torch.full_like(best_epoch, epoch), best_epoch)
            since = torch.where(improved, torch.zeros_like(since), since + 1)
            if bool((since >= self.patience).all()):
                break
        self._restore(params, snapshots)
        elites = ens.set_elites(best).clone()
        return FitResult(best_train, best, epochs, best_epoch, elites)


_SIZES = {
    # BREMEN quick preset: deterministic 2 x 200; MB2PO: probabilistic, reward head, 4 x 200 swish;
    # a 512-wide member loop (the CPU "auto" kernel of BREMEN's 2 x 1024) kept small for speed
    "quick": dict(num_cells=(200, 200)),
    "mb2po": dict(num_cells=(200, 200, 200, 200), activation=torch.nn.SiLU, probabilistic=True,
                  predict_reward=True, num_elites=3),
    "member_loop": dict(num_cells=(512, 512)),
}


class TestFastTrainerIsExact:
    @pytest.mark.parametrize("size", sorted(_SIZES))
    def test_losses_gradients_and_fitted_parameters(self, size):
        kw = dict(num_members=3 if size == "member_loop" else 4, **_SIZES[size])
        data = _linear_data(n=300 if size == "member_loop" else 700, noise=0.05, reward=True, seed=2)
        torch.manual_seed(0)
        fast_model = _model(**kw)
        ref_model = copy.deepcopy(fast_model)
        fast = EnsembleTrainer(fast_model, batch_size=64, max_epochs=3, patience=2, weight_decay=1e-4, seed=4)
        ref = _ReferenceTrainer(ref_model, batch_size=64, max_epochs=3, patience=2, weight_decay=1e-4, seed=4)
        ref.grads = []
        fast_grads = []
        # gradients: recorded just before each Adam step (optimizer.step() on the first epoch,
        # which initialises the Adam state; the direct fused step afterwards)
        orig_opt_step, orig_adam_step = fast.optimizer.step, fast._adam_step
        plans = []

        def opt_step(*a, **k):
            fast_grads.append([p.grad.clone() for p in fast_model.parameters()])
            return orig_opt_step(*a, **k)

        def adam_step(plan, grads):
            plans.append(plan.manual_backward)
            fast_grads.append([g.clone() for g in grads])
            return orig_adam_step(plan, grads)

        fast.optimizer.step = opt_step
        fast._adam_step = adam_step
        for round_ in range(2):  # a second fit: warm-started Adam state, refit normalisers
            rf, rr = fast.fit(data), ref.fit(data)
            assert rf.epochs == rr.epochs and torch.equal(rf.elites, rr.elites)
            assert torch.equal(rf.holdout_loss, rr.holdout_loss)
            assert torch.equal(rf.train_loss, rr.train_loss)
            assert torch.equal(rf.best_epoch, rr.best_epoch)
        assert len(fast_grads) == len(ref.grads) > 0
        for gf, gr in zip(fast_grads, ref.grads):
            for a, b in zip(gf, gr):
                assert torch.equal(a, b)
        for (name, a), b in zip(fast_model.state_dict().items(), ref_model.state_dict().values()):
            assert torch.equal(a, b), name
        assert fast.total_steps == ref.total_steps
        # the fast step ran after the first epoch: hand-written backward for the deterministic
        # ReLU bmm ensemble, autograd (then the direct fused Adam) for the others
        assert len(fast_grads) == fast.total_steps and 0 < len(plans) < fast.total_steps
        assert set(plans) == {size == "quick"}


class TestDirectStep:
    """The step without autograd bookkeeping or optimizer.step()'s Python: same numbers, right path."""

    @staticmethod
    def _batch(model, b, seed=0):
        g = torch.Generator().manual_seed(seed)
        E, d_in = model.num_members, model.network.in_features
        return torch.randn(E, b, d_in, generator=g), torch.randn(E, b, model.network.out_features, generator=g)

    @pytest.mark.parametrize("num_cells", [(16,), (32, 24), (8, 8, 8)])
    @pytest.mark.parametrize("b", [1, 37, 256, 1000])
    def test_hand_written_gradients_equal_autograd(self, num_cells, b):
        torch.manual_seed(0)
        model = _model(num_cells=num_cells)
        trainer = EnsembleTrainer(model, batch_size=b)
        x, y = self._batch(model, b)
        member_loss, grads = trainer._mse_relu_loss_and_grads(x, y)
        ref_loss, total = trainer._member_loss(x, y)
        ref = torch.autograd.grad(total.sum(), list(model.parameters()))
        assert torch.equal(member_loss, ref_loss.detach())
        assert len(grads) == len(ref)
        for g, r, p in zip(grads, ref, model.parameters()):
            assert g.shape == p.shape and torch.equal(g, r)
        # not a vacuous comparison: the gradients are non-zero and member-specific
        assert all(bool(g.abs().sum() > 0) for g in grads)
        assert not torch.equal(grads[0][0], grads[0][1])

    def test_direct_adam_equals_optimizer_step(self):
        torch.manual_seed(0)
        model = _model(num_cells=(16, 16))
        twin = copy.deepcopy(model)
        trainer = EnsembleTrainer(model, lr=3e-3, weight_decay=1e-2, batch_size=32)
        opt = torch.optim.Adam(twin.parameters(), lr=3e-3, weight_decay=1e-2, fused=True)
        for k in range(6):
            x, y = self._batch(model, 32, seed=k)
            if k == 3:  # a changed learning rate is read at the next step
                trainer.optimizer.param_groups[0]["lr"] = 1e-3
                opt.param_groups[0]["lr"] = 1e-3
            trainer._plan = trainer._step_plan(x)
            assert (trainer._plan is None) == (k == 0)  # the first step initialises the Adam state
            trainer._train_step(x, y)
            opt.zero_grad(set_to_none=True)
            out = twin.network(x, member_first=True)
            (0.5 * (out - y).pow(2).sum(-1).mean((1,))).sum().backward()
            opt.step()
            for a, b in zip(model.parameters(), twin.parameters()):
                assert torch.equal(a, b)
        sa, sb = trainer.optimizer.state_dict(), opt.state_dict()
        for i in sb["state"]:
            for key in ("step", "exp_avg", "exp_avg_sq"):
                assert torch.equal(sa["state"][i][key], sb["state"][i][key])

    def test_resumed_trainer_continues_bit_for_bit(self):
        data = _linear_data(n=300, seed=5)
        torch.manual_seed(0)
        straight = EnsembleTrainer(_model(num_cells=(32, 32)), batch_size=64, max_epochs=3, seed=1)
        resumed_model = copy.deepcopy(straight.ensemble)
        first = EnsembleTrainer(resumed_model, batch_size=64, max_epochs=3, seed=1)
        straight.fit(data), first.fit(data)
        state = copy.deepcopy(first.state_dict())
        model_state = copy.deepcopy(resumed_model.state_dict())
        fresh_model = _model(num_cells=(32, 32))
        fresh_model.load_state_dict(model_state)
        fresh = EnsembleTrainer(fresh_model, batch_size=64, max_epochs=3, seed=1)
        fresh.load_state_dict(state)  # new state tensors: the direct step must read these
        straight.fit(data), fresh.fit(data)
        for a, b in zip(straight.ensemble.state_dict().values(), fresh_model.state_dict().values()):
            assert torch.equal(a, b)

    def test_generic_path_when_the_direct_step_does_not_apply(self):
        x = torch.zeros(3, 8, OBS + ACT)

        def plan(trainer):
            trainer.fit(_linear_data(n=100))  # initialises the Adam state
            return trainer._step_plan(x)

        assert plan(EnsembleTrainer(_model(), batch_size=32, max_epochs=1)).manual_backward
        swish = plan(EnsembleTrainer(_model(activation=torch.nn.SiLU), batch_size=32, max_epochs=1))
        assert swish is not None and not swish.manual_backward  # autograd, then the direct Adam
        prob = plan(EnsembleTrainer(_model(probabilistic=True), batch_size=32, max_epochs=1))
        assert prob is not None and not prob.manual_backward
        assert plan(EnsembleTrainer(_model(probabilistic=True), loss_type="mse", batch_size=32, max_epochs=1)) is None
        sgd = EnsembleTrainer(_model(), batch_size=32, max_epochs=1)
        sgd.optimizer = torch.optim.SGD(sgd.ensemble.parameters(), lr=0.1)
        assert plan(sgd) is None
        foreach = EnsembleTrainer(_model(), batch_size=32, max_epochs=1)
        foreach.optimizer = torch.optim.Adam(foreach.ensemble.parameters(), lr=1e-3)
        assert plan(foreach) is None
        hooked = EnsembleTrainer(_model(), batch_size=32, max_epochs=1)
        calls = []
        hooked.ensemble.network.register_forward_hook(lambda *a: calls.append(1))
        hooked_plan = plan(hooked)
        assert hooked_plan is not None and not hooked_plan.manual_backward and calls
        frozen = EnsembleTrainer(_model(), batch_size=32, max_epochs=1)
        frozen.ensemble.network.layers[0].bias.requires_grad_(False)
        assert plan(frozen) is None
        before = frozen.ensemble.network.layers[0].bias.detach().clone()
        frozen.fit(_linear_data(n=100))
        assert torch.equal(frozen.ensemble.network.layers[0].bias, before)  # frozen stays frozen
        pre = EnsembleTrainer(_model(), batch_size=32, max_epochs=1)
        pre.optimizer.register_step_pre_hook(lambda *a: None)
        assert plan(pre) is None


_NATIVE_BF16 = dynamics._native_bf16()
needs_bf16 = pytest.mark.skipif(not _NATIVE_BF16, reason="this CPU has no native bfloat16 (AMX / AVX512-BF16)")


class TestMatmulPrecision:
    """``EnsembleTrainer(matmul_precision=...)``: scoped to ``fit``, validated, and really applied."""

    @staticmethod
    def _fit(precision, data=None, **kwargs):
        data = _linear_data(n=800, noise=0.05) if data is None else data
        torch.manual_seed(0)
        model = _model(num_cells=(64, 64))
        trainer = EnsembleTrainer(model, batch_size=64, max_epochs=4, patience=10, matmul_precision=precision,
                                  **kwargs)
        return model, trainer.fit(data)

    def test_bad_values_are_refused(self, monkeypatch):
        with pytest.raises(ValueError, match="'fp16'"):
            EnsembleTrainer(_model(), matmul_precision="fp16")
        monkeypatch.setattr(dynamics, "_native_bf16", lambda: False)
        with pytest.raises(ValueError, match="native bfloat16"):
            EnsembleTrainer(_model(), matmul_precision="bf16")
        EnsembleTrainer(_model(), matmul_precision="ieee")  # always available

    def test_setting_is_scoped_to_fit(self, monkeypatch):
        monkeypatch.setattr(dynamics, "_native_bf16", lambda: True)
        seen = []
        trainer = EnsembleTrainer(_model(), batch_size=64, max_epochs=2, matmul_precision="bf16")
        epoch = trainer._train_epoch
        holdout = trainer._holdout_mse

        def record_epoch(train):
            seen.append(("train", torch.backends.mkldnn.matmul.fp32_precision))
            return epoch(train)

        def record_holdout(data):
            seen.append(("holdout", torch.backends.mkldnn.matmul.fp32_precision))
            return holdout(data)

        monkeypatch.setattr(trainer, "_train_epoch", record_epoch)
        monkeypatch.setattr(trainer, "_holdout_mse", record_holdout)
        before = torch.backends.mkldnn.matmul.fp32_precision
        trainer.fit(_linear_data(n=200))
        assert seen == [("train", "bf16"), ("holdout", "bf16")] * 2
        assert torch.backends.mkldnn.matmul.fp32_precision == before
        bad = _linear_data(n=200)
        bad["observation"][3, 1] = float("nan")
        with pytest.raises(ValueError, match="non-finite"):
            trainer.fit(bad)
        assert torch.backends.mkldnn.matmul.fp32_precision == before  # restored after an error too
        seen.clear()
        untouched = EnsembleTrainer(_model(), batch_size=64, max_epochs=1)
        monkeypatch.setattr(untouched, "_train_epoch", record_epoch)
        untouched.fit(_linear_data(n=200))
        assert seen == [("train", before)]

    def test_bf16_refuses_parameters_off_cpu(self, monkeypatch):
        monkeypatch.setattr(dynamics, "_native_bf16", lambda: True)
        trainer = EnsembleTrainer(_model(), batch_size=64, max_epochs=1, matmul_precision="bf16")
        trainer.ensemble.to("meta")
        with pytest.raises(ValueError, match="CPU .*meta"):
            trainer.fit(_linear_data(n=200))

    def test_ieee_is_the_default_arithmetic(self):
        model_none, res_none = self._fit(None)
        model_ieee, res_ieee = self._fit("ieee")
        assert torch.equal(res_none.holdout_loss, res_ieee.holdout_loss)
        for a, b in zip(model_none.parameters(), model_ieee.parameters()):
            assert torch.equal(a, b)

    @needs_bf16
    def test_bf16_rounds_differently_and_fits_as_well(self):
        model_ieee, res_ieee = self._fit("ieee")
        model_bf16, res_bf16 = self._fit("bf16")
        assert not all(torch.equal(a, b) for a, b in zip(model_ieee.parameters(), model_bf16.parameters()))
        # same data, seed and steps: the fit quality is float32's within a few percent
        ratio = res_bf16.holdout_loss / res_ieee.holdout_loss
        assert ((ratio > 0.8) & (ratio < 1.25)).all(), ratio
        # "ieee" forces float32 products even when torch's global setting says bf16
        # (the data made before: under a global bf16 setting its own `obs @ A.T` rounds too)
        data = _linear_data(n=800, noise=0.05)
        settings = torch.backends.mkldnn.matmul
        previous = settings.fp32_precision
        settings.fp32_precision = "bf16"
        try:
            _, res_forced = self._fit("ieee", data=data)
        finally:
            settings.fp32_precision = previous
        assert torch.equal(res_forced.holdout_loss, res_ieee.holdout_loss)

    def test_config_field_reaches_the_trainer(self, monkeypatch):
        from torchrl_depeff.algorithms import BREMENConfig
        from torchrl_depeff.algorithms.bremen import make_trainer

        monkeypatch.setattr(dynamics, "_native_bf16", lambda: True)
        cfg = BREMENConfig.preset("halfcheetah", "smoke").override({"model.matmul_precision": "bf16"})
        trainer = make_trainer(cfg.make_ensemble(), cfg.model, seed=0)
        assert trainer.matmul_precision == "bf16"
        assert make_trainer(cfg.make_ensemble(), BREMENConfig().model, seed=0).matmul_precision is None
        with pytest.raises(ValueError, match="model.matmul_precision must be one of .*'fp16'"):
            BREMENConfig().override({"model.matmul_precision": "fp16"})


class TestHoldoutScore:
    """The per-epoch holdout score: row chunks and in-place ReLUs give the plain forward's numbers."""

    @pytest.mark.parametrize("probabilistic,activation", [(False, torch.nn.ReLU), (True, torch.nn.SiLU)])
    def test_chunked_in_place_score(self, probabilistic, activation, monkeypatch):
        from torchrl_depeff.modules.ensemble import EnsembleMLP

        torch.manual_seed(0)
        model = DynamicsEnsemble(17, 6, num_members=5, num_cells=(200, 200), probabilistic=probabilistic,
                                 activation=activation)
        trainer = EnsembleTrainer(model)
        x, y = torch.randn(3000, 23), torch.randn(3000, 17)
        chunks = []
        network_forward = EnsembleMLP.forward

        def spy(self, inp, *args, **kwargs):
            chunks.append(inp.shape[0])
            return network_forward(self, inp, *args, **kwargs)

        monkeypatch.setattr(EnsembleMLP, "forward", spy)
        score = trainer._holdout_mse((x, y))
        assert chunks == [1000, 1000, 1000]  # 1 M activation entries per chunk at 5 x 200
        # in place or not, bit for bit (a forward hook turns the in-place ReLUs off)
        handle = model.network.activations[0].register_forward_hook(lambda *args: None)
        assert torch.equal(trainer._holdout_mse((x, y)), score)
        handle.remove()
        # every member on every row, no chunks, autograd on (no in-place activations)
        with torch.enable_grad():
            mean = model._split_heads(network_forward(model.network, x, member_first=False, kernel="bmm"),
                                      model.max_logvar, model.min_logvar)[0]
        expected = (mean.detach() - y).pow(2).mean((1, 2))
        torch.testing.assert_close(score, expected, rtol=1e-6, atol=0)
        assert score.shape == (5,) and len(set(score.tolist())) == 5  # one score per member

    def test_in_place_relu_keeps_hooked_outputs(self):
        # a forward hook on a layer sees (and may keep) its output: no in-place ReLU then
        torch.manual_seed(0)
        model = DynamicsEnsemble(3, 2, num_members=2, num_cells=(8,))
        kept = []
        model.network.layers[0].register_forward_hook(lambda mod, inp, out: kept.append(out))
        with torch.no_grad():
            model.network(torch.randn(4, 5), member_first=False, kernel="bmm")
        assert (kept[0] < 0).any()  # the pre-activation, not overwritten by the ReLU
