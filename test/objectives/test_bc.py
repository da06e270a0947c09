"""Tests for WeightedBCLoss (BREMEN eq. 3, MUSBO eq. 11) and train_bc."""
from __future__ import annotations

import math

import pytest
import torch
from tensordict import TensorDict
from tensordict.nn import TensorDictModule
from torch import nn
from torchrl.modules import IndependentNormal, ProbabilisticActor

from torchrl_depeff.objectives.bc import BCLoss, WeightedBCLoss, train_bc


class _LocScale(nn.Module):
    """Stand-in for the BREMEN Gaussian actor: loc = tanh(linear(s)), fixed scale 0.1."""

    def __init__(self, obs_dim: int, act_dim: int) -> None:
        super().__init__()
        self.linear = nn.Linear(obs_dim, act_dim)

    def forward(self, obs):
        loc = torch.tanh(self.linear(obs))
        return loc, torch.full_like(loc, 0.1)


def _loc_actor(obs_dim=3, act_dim=2, seed=0):
    torch.manual_seed(seed)
    return TensorDictModule(nn.Linear(obs_dim, act_dim), in_keys=["observation"], out_keys=["loc"])


def _prob_actor(obs_dim=3, act_dim=2, seed=0):
    torch.manual_seed(seed)
    module = TensorDictModule(_LocScale(obs_dim, act_dim), in_keys=["observation"], out_keys=["loc", "scale"])
    return ProbabilisticActor(
        module, in_keys=["loc", "scale"], distribution_class=IndependentNormal, return_log_prob=True
    )


def _data(batch=(8,), obs_dim=3, act_dim=2, seed=1):
    g = torch.Generator().manual_seed(seed)
    return TensorDict(
        {
            "observation": torch.randn(*batch, obs_dim, generator=g),
            "action": torch.rand(*batch, act_dim, generator=g) * 2 - 1,
            "uncertainty": torch.rand(*batch, generator=g),
        },
        batch_size=batch,
    )


class TestWeightedBCLoss:
    def test_mse_equals_hand_value(self):
        actor, td = _loc_actor(), _data()
        out = WeightedBCLoss(actor)(td)
        with torch.no_grad():
            mu = actor.module(td["observation"])
        expected = (0.5 * (td["action"] - mu).pow(2).sum(-1)).mean()
        torch.testing.assert_close(out["loss_weighted_bc"], expected)
        torch.testing.assert_close(out["mse"], expected)
        assert out["loss_weighted_bc"].requires_grad and not out["mse"].requires_grad

    def test_mse_with_probabilistic_actor_reads_loc(self):
        actor, td = _prob_actor(), _data()
        out = WeightedBCLoss(actor)(td)
        with torch.no_grad():
            mu = torch.tanh(actor.module[0].module.linear(td["observation"]))
        torch.testing.assert_close(out["loss_weighted_bc"], (0.5 * (td["action"] - mu).pow(2).sum(-1)).mean())

    def test_mse_skips_the_distribution(self, monkeypatch):
        # eq. (3) reads the mean only: no distribution is built, no sample drawn, same value and gradients
        actor, td = _prob_actor(), _data()
        loss = WeightedBCLoss(actor)
        full = actor(td.select("observation").clone())
        expected = (0.5 * (td["action"] - full["loc"]).pow(2).sum(-1)).mean()
        grads_full = torch.autograd.grad(expected, list(actor.parameters()))

        def refuse(*args, **kwargs):
            raise AssertionError("the mse loss built the action distribution")

        monkeypatch.setattr(IndependentNormal, "__init__", refuse)
        rng = torch.get_rng_state()
        out = loss(td)["loss_weighted_bc"]
        assert torch.equal(torch.get_rng_state(), rng)
        assert torch.equal(out, expected)
        for a, b in zip(torch.autograd.grad(out, list(loss.parameters())), grads_full):
            assert torch.equal(a, b)
        with pytest.raises(AssertionError, match="built the action distribution"):
            WeightedBCLoss(actor, loss_type="log_prob")(td)  # the log-prob loss needs it

    def test_log_prob_equals_gaussian_nll(self):
        actor, td = _prob_actor(), _data()
        out = WeightedBCLoss(actor, loss_type="log_prob")(td)
        with torch.no_grad():
            mu = torch.tanh(actor.module[0].module.linear(td["observation"]))
        nll = -torch.distributions.Normal(mu, 0.1).log_prob(td["action"]).sum(-1)
        torch.testing.assert_close(out["loss_weighted_bc"], nll.mean())
        # with fixed variance, NLL = mse / sigma^2 + const (sign check)
        const = td["action"].shape[-1] * (math.log(0.1) + 0.5 * math.log(2 * math.pi))
        torch.testing.assert_close(out["loss_weighted_bc"], out["mse"] / 0.01 + const)

    def test_log_prob_with_gmm_actor(self):
        from torchrl_depeff.modules.mixture import make_gmm_actor

        torch.manual_seed(0)
        actor, td = make_gmm_actor(3, 2, num_cells=(16,)), _data()
        out = WeightedBCLoss(actor, loss_type="log_prob", weight_key="uncertainty")(td)
        dist = actor.get_dist(td.select("observation").copy())
        expected = (td["uncertainty"] * -dist.log_prob(td["action"])).mean()
        torch.testing.assert_close(out["loss_weighted_bc"], expected)
        mse = (0.5 * (td["action"] - dist.deterministic_sample).pow(2).sum(-1)).mean()
        torch.testing.assert_close(out["mse"], mse.detach())
        with pytest.raises(ValueError, match="shape"):  # "loc" is [*B, K, d]: no mse on a mixture
            WeightedBCLoss(actor)(td)

    def test_weighted_equals_hand_weighted(self):
        actor, td = _loc_actor(), _data()
        out = WeightedBCLoss(actor, weight_key="uncertainty")(td)
        with torch.no_grad():
            mu = actor.module(td["observation"])
        per = 0.5 * (td["action"] - mu).pow(2).sum(-1)
        torch.testing.assert_close(out["loss_weighted_bc"], (td["uncertainty"] * per).mean())  # MUSBO eq. (11)
        td2 = td.clone()
        td2["uncertainty"] = td["uncertainty"].unsqueeze(-1)  # trailing 1 accepted
        torch.testing.assert_close(WeightedBCLoss(actor, weight_key="uncertainty")(td2)["loss_weighted_bc"], out["loss_weighted_bc"])

    def test_zero_weight_rows_give_zero_gradient(self):
        actor = _loc_actor()
        td = _data(batch=(6,))
        td["uncertainty"] = torch.tensor([1.0, 0.0, 0.5, 0.0, 2.0, 1.0])
        loss = WeightedBCLoss(actor, weight_key="uncertainty", reduction="none")
        grads = []
        for i in range(6):
            actor.zero_grad()
            loss(td)["loss_weighted_bc"][i].backward()
            grads.append(actor.module.weight.grad.abs().sum().item())
        assert grads[1] == 0.0 and grads[3] == 0.0
        assert all(grads[i] > 0 for i in (0, 2, 4, 5))
        # and the mean loss equals the mean over the non-zero rows only (divided by all rows)
        actor.zero_grad()
        WeightedBCLoss(actor, weight_key="uncertainty")(td)["loss_weighted_bc"].backward()
        full = actor.module.weight.grad.clone()
        actor.zero_grad()
        WeightedBCLoss(actor, weight_key="uncertainty")(td[torch.tensor([0, 2, 4, 5])])["loss_weighted_bc"].backward()
        torch.testing.assert_close(full, actor.module.weight.grad * 4 / 6)

    def test_weights_detached(self):
        actor, td = _loc_actor(), _data()
        w = torch.rand(8, requires_grad=True)
        td["uncertainty"] = w
        WeightedBCLoss(actor, weight_key="uncertainty")(td)["loss_weighted_bc"].backward()
        assert w.grad is None
        assert actor.module.weight.grad.abs().sum() > 0

    @pytest.mark.parametrize("reduction", ["none", "mean", "sum"])
    def test_reduction_shapes(self, reduction):
        td = _data(batch=(4, 5))
        out = WeightedBCLoss(_loc_actor(), reduction=reduction)(td)
        assert out["loss_weighted_bc"].shape == ((4, 5) if reduction == "none" else ())
        if reduction == "sum":
            mean = WeightedBCLoss(_loc_actor())(td)["loss_weighted_bc"]
            torch.testing.assert_close(out["loss_weighted_bc"], mean * 20)

    def test_set_keys_rejects_unknown(self):
        with pytest.raises(ValueError, match="not_a_key"):
            WeightedBCLoss(_loc_actor()).set_keys(not_a_key="x")

    def test_set_keys_action(self):
        td = _data()
        td["expert_action"] = td["action"] * 0.5
        loss = WeightedBCLoss(_loc_actor())
        loss.set_keys(action="expert_action")
        ref = WeightedBCLoss(_loc_actor())(td.set("action", td["expert_action"]))
        torch.testing.assert_close(loss(td)["loss_weighted_bc"], ref["loss_weighted_bc"])

    @pytest.mark.parametrize("key", ["observation", "action", "uncertainty"])
    def test_missing_key_raises_keyerror(self, key):
        td = _data().exclude(key)
        with pytest.raises(KeyError, match=key):
            WeightedBCLoss(_loc_actor(), weight_key="uncertainty")(td)

    @pytest.mark.parametrize("key", ["observation", "action", "uncertainty"])
    @pytest.mark.parametrize("bad", [float("nan"), float("inf")])
    def test_non_finite_raises_valueerror(self, key, bad):
        td = _data()
        td[key][1] = bad
        with pytest.raises(ValueError, match=key):  # explicit validation: forward never syncs
            WeightedBCLoss(_loc_actor(), weight_key="uncertainty").check_inputs(td)
        with pytest.raises(ValueError, match=key):  # train_bc validates its data once
            train_bc(_loc_actor(), td, weight_key="uncertainty", max_epochs=1)

    def test_bad_args(self):
        with pytest.raises(ValueError, match="loss_type"):
            WeightedBCLoss(_loc_actor(), loss_type="l3")
        with pytest.raises(ValueError, match="reduction"):
            WeightedBCLoss(_loc_actor(), reduction="max")
        with pytest.raises(TypeError, match="get_dist"):
            WeightedBCLoss(_loc_actor(), loss_type="log_prob")
        with pytest.raises(ValueError, match="shape"):
            WeightedBCLoss(_loc_actor(act_dim=3))(_data())

    def test_input_untouched(self):
        td = _data()
        before = td.clone()
        WeightedBCLoss(_prob_actor(), loss_type="log_prob")(td)
        WeightedBCLoss(_prob_actor())(td)
        assert set(td.keys(True, True)) == set(before.keys(True, True))
        assert (td == before).all()

    def test_state_dict_roundtrip(self):
        a, b, td = WeightedBCLoss(_loc_actor(seed=0)), WeightedBCLoss(_loc_actor(seed=1)), _data()
        assert not torch.allclose(a(td)["loss_weighted_bc"], b(td)["loss_weighted_bc"])
        b.load_state_dict(a.state_dict())
        torch.testing.assert_close(a(td)["loss_weighted_bc"], b(td)["loss_weighted_bc"])


class TestTrainBC:
    def _linear_data(self, n=600, seed=0):
        g = torch.Generator().manual_seed(seed)
        obs = torch.randn(n, 3, generator=g)
        w = torch.tensor([[0.5, -0.3], [0.2, 0.4], [-0.1, 0.1]])
        return TensorDict({"observation": obs, "action": obs @ w}, batch_size=[n]), w

    def test_recovers_linear_policy(self):
        data, w = self._linear_data()
        actor = _loc_actor()
        info = train_bc(actor, data, lr=3e-2, batch_size=128, max_epochs=100, patience=5)
        torch.testing.assert_close(actor.module.weight.detach().T, w, atol=2e-2, rtol=0)
        assert info["holdout_loss"] < 1e-3
        assert info["epochs"] <= 100 and len(info["holdout_losses"]) == info["epochs"]

    def test_early_stopping_and_restore_best(self):
        # pure-noise targets: the holdout loss cannot keep improving, so training stops early
        g = torch.Generator().manual_seed(3)
        data = TensorDict(
            {"observation": torch.randn(200, 3, generator=g), "action": torch.randn(200, 2, generator=g)},
            batch_size=[200],
        )
        actor = _loc_actor()
        info = train_bc(actor, data, lr=5e-2, batch_size=16, max_epochs=300, patience=3)
        assert info["stopped_early"] and info["epochs"] < 300
        assert info["epochs"] - info["best_epoch"] == 3
        assert info["holdout_loss"] == min(info["holdout_losses"])
        # the restored actor reproduces the best holdout loss
        n_hold = int(200 * 0.15)
        perm = torch.randperm(200, generator=torch.Generator().manual_seed(0))
        with torch.no_grad():
            hold = WeightedBCLoss(actor)(data[perm[:n_hold]])["loss_weighted_bc"].item()
        assert hold == pytest.approx(info["holdout_loss"], rel=1e-5)

    def test_weighted_training_follows_weights(self):
        # two behaviours for the same states; weights select the first one
        g = torch.Generator().manual_seed(0)
        obs = torch.randn(400, 3, generator=g)
        good, bad = obs[:, :2] * 0.5, -obs[:, :2] * 0.5
        data = TensorDict(
            {
                "observation": torch.cat([obs, obs]),
                "action": torch.cat([good, bad]),
                "uncertainty": torch.cat([torch.ones(400), torch.zeros(400)]),
            },
            batch_size=[800],
        )
        actor = _loc_actor()
        train_bc(actor, data, lr=3e-2, batch_size=256, max_epochs=40, patience=40, weight_key="uncertainty")
        with torch.no_grad():
            err = (actor.module(obs) - good).pow(2).mean()
        assert err < 1e-3

    def test_bad_args(self):
        data, _ = self._linear_data(n=10)
        with pytest.raises(ValueError, match="holdout_ratio"):
            train_bc(_loc_actor(), data, holdout_ratio=1.0)
        with pytest.raises(KeyError, match="uncertainty"):
            train_bc(_loc_actor(), data, weight_key="uncertainty")


def test_bcloss_is_a_deprecated_alias_with_the_old_key():
    td = _data()
    with pytest.warns(FutureWarning, match="WeightedBCLoss"):
        old = BCLoss(_loc_actor(seed=0))
    new = WeightedBCLoss(_loc_actor(seed=0))
    torch.testing.assert_close(old(td)["loss_bc"], new(td)["loss_weighted_bc"])
    assert isinstance(old, WeightedBCLoss) and "loss_bc" in old.out_keys


class TestPlainBCLoss:
    """``WeightedBCLoss._plain_loss`` (train_bc's loss on plain tensors) is ``forward`` bit for bit."""

    @staticmethod
    def _gaussian_actor(learn_sigma: bool, seed: int = 0):
        from torchrl_depeff.modules.actors import make_gaussian_actor

        torch.manual_seed(seed)
        return make_gaussian_actor(3, 2, num_cells=(16, 16), learn_sigma=learn_sigma)

    def _actors(self):
        return {
            "linear": _loc_actor(),
            "prob": _prob_actor(),
            "gaussian_fixed_sigma": self._gaussian_actor(False),
            "gaussian_learned_sigma": self._gaussian_actor(True),
        }

    @pytest.mark.parametrize("weighted", [False, True])
    def test_values_and_gradients_bitwise(self, weighted):
        td = _data(batch=(64,))
        for name, actor in self._actors().items():
            loss = WeightedBCLoss(actor, weight_key="uncertainty" if weighted else None)
            plain = loss._plain_loss()
            assert plain is not None, name
            entries = {k: td.get(k) for k in loss.in_keys}
            params = list(loss.parameters())
            ref = loss(td)["loss_weighted_bc"]
            trained = [p for p in params if p.requires_grad]
            ref_grads = torch.autograd.grad(ref, trained, allow_unused=True)
            got = plain(entries)
            got_grads = torch.autograd.grad(got, trained, allow_unused=True)
            assert torch.equal(got, ref), name
            # the mean's parameters get gradients (a learned log-std none, on both paths)
            assert sum(g is not None for g in got_grads) >= 2, name
            for a, b in zip(got_grads, ref_grads):
                assert (a is None and b is None) or torch.equal(a, b), name

    def test_refused_where_it_would_differ(self):
        assert WeightedBCLoss(_prob_actor(), loss_type="log_prob")._plain_loss() is None
        hooked = _loc_actor()
        hooked.register_forward_hook(lambda mod, args, out: out)
        assert WeightedBCLoss(hooked)._plain_loss() is None

        class _Rescaled(ProbabilisticActor):
            def get_dist_params(self, tensordict, *args, **kwargs):
                out = super().get_dist_params(tensordict, *args, **kwargs)
                out["loc"] = out["loc"] * 2
                return out

        custom = _prob_actor()
        custom = _Rescaled(custom.module[0], in_keys=["loc", "scale"], distribution_class=IndependentNormal)
        assert WeightedBCLoss(custom)._plain_loss() is None

    @pytest.mark.parametrize("weighted", [False, True])
    def test_train_bc_same_parameters_as_the_tensordict_path(self, weighted, monkeypatch):
        data = _data(batch=(700,), seed=4)
        data["extra"] = torch.randn(700, 5)  # entries the loss does not read are dropped
        data["next"] = TensorDict({"observation": torch.randn(700, 3)}, [700])
        kwargs = dict(lr=1e-2, batch_size=64, max_epochs=15, patience=3,
                      weight_key="uncertainty" if weighted else None)
        calls = []
        original = WeightedBCLoss._plain_loss

        def spy(self):
            out = original(self)
            calls.append(out is not None)
            return out

        monkeypatch.setattr(WeightedBCLoss, "_plain_loss", spy)
        fast = self._gaussian_actor(False, seed=3)
        info_fast = train_bc(fast, data, **kwargs)
        assert calls == [True]
        monkeypatch.setattr(WeightedBCLoss, "_plain_loss", lambda self: None)
        slow = self._gaussian_actor(False, seed=3)
        info_slow = train_bc(slow, data, **kwargs)
        assert info_fast == info_slow
        for (name, a), b in zip(fast.named_parameters(), slow.parameters()):
            assert torch.equal(a, b), name

    def test_a_loss_mask_entry_keeps_the_tensordict_path(self, monkeypatch):
        data = _data(batch=(200,))
        data["collector", "mask"] = torch.arange(200) % 2 == 0

        def refuse(self):
            raise AssertionError("the plain loss does not read loss masks")

        monkeypatch.setattr(WeightedBCLoss, "_plain_loss", refuse)
        info = train_bc(_loc_actor(), data, lr=1e-2, batch_size=64, max_epochs=2)
        assert info["epochs"] == 2
