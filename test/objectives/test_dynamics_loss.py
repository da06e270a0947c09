from __future__ import annotations

import math
import re

import pytest
import torch
from tensordict import TensorDict

from torchrl_depeff.modules.ensemble import DynamicsEnsemble
from torchrl_depeff.objectives.dynamics import EnsembleDynamicsLoss

E = 3


def _model(**kwargs) -> DynamicsEnsemble:
    kw = dict(num_members=E, num_cells=(16,))
    kw.update(kwargs)
    model = DynamicsEnsemble(4, 2, **kw)
    obs, act = torch.randn(50, 4) * 2, torch.randn(50, 2)
    model.fit_normalizers(obs, act, obs + torch.randn(50, 4), torch.randn(50, 1) if model.predict_reward else None)
    return model


def _data(batch=(10,), reward=True) -> TensorDict:
    td = TensorDict(
        {"observation": torch.randn(*batch, 4), "action": torch.randn(*batch, 2),
         ("next", "observation"): torch.randn(*batch, 4)},
        batch_size=batch,
    )
    if reward:
        td["next", "reward"] = torch.randn(*batch, 1)
    return td


def _target(model, td):
    r = td.get(("next", "reward")) if model.predict_reward else None
    return model.normalized_target(td["observation"], td["next", "observation"], r)


class TestEnsembleDynamicsLoss:
    def test_mse_is_sum_over_members_of_member_means(self):
        model = _model(predict_reward=True)
        td = _data()
        out = EnsembleDynamicsLoss(model)(td)
        mean, _ = model.forward_normalized(td["observation"], td["action"])
        target = _target(model, td)
        per_member = torch.stack([0.5 * (mean[e] - target).pow(2).sum(-1).mean() for e in range(E)])
        torch.testing.assert_close(out["member_loss"], per_member)
        torch.testing.assert_close(out["loss_dynamics"], per_member.sum())
        torch.testing.assert_close(out["mse"], (mean - target).pow(2).mean((1, 2)))
        assert not out["member_loss"].requires_grad and out["loss_dynamics"].requires_grad

    def test_nll_against_hand_computation(self):
        model = _model(probabilistic=True)
        with torch.no_grad():
            model.max_logvar.add_(torch.randn_like(model.max_logvar) * 0.1)
        coef = 0.05
        td = _data(batch=(2, 5), reward=False)
        out = EnsembleDynamicsLoss(model, loss_type="nll", logvar_bound_coef=coef, member_first=False)(td)
        mean, log_var = model.forward_normalized(td["observation"], td["action"])
        target = _target(model, td)
        expected = []
        for e in range(E):
            var = log_var[e].exp()
            nll = 0.5 * ((target - mean[e]) ** 2 / var + log_var[e] + math.log(2 * math.pi))
            # the same as torch.distributions
            ref = -torch.distributions.Normal(mean[e], var.sqrt()).log_prob(target)
            torch.testing.assert_close(nll, ref, atol=1e-4, rtol=1e-4)
            data_term = nll.sum(-1).mean()
            expected.append(
                data_term + coef * (model.max_logvar[e].sum() - model.min_logvar[e].sum())
            )
            torch.testing.assert_close(out["member_loss"][e], data_term.detach())
        torch.testing.assert_close(out["loss_dynamics"], torch.stack(expected).sum())

    def test_per_member_batches(self):
        model = _model(predict_reward=True)
        td = _data(batch=(E, 7))
        out = EnsembleDynamicsLoss(model)(td)  # [E, B] inferred as per-member
        for e in range(E):
            mean, _ = model.forward_normalized(td["observation"][e], td["action"][e])
            ref = 0.5 * (mean[e] - _target(model, td[e])).pow(2).sum(-1).mean()
            torch.testing.assert_close(out["member_loss"][e], ref)

    def test_member_gradient_independent_of_others(self):
        # grad on member 1's slices equals the grad of member 1's own loss; member 1's rows only
        # reach member 1
        model = _model(probabilistic=True)
        loss = EnsembleDynamicsLoss(model, loss_type="nll")
        td = _data(batch=(E, 8), reward=False)
        loss(td)["loss_dynamics"].backward()
        grads = [p.grad.clone() for p in model.parameters()]
        model.zero_grad()
        td2 = td.clone()
        td2["next", "observation"][0] += 10.0  # change member 0's targets only
        loss(td2)["loss_dynamics"].backward()
        for g, p in zip(grads, model.parameters()):
            torch.testing.assert_close(p.grad[1:], g[1:])
            assert not torch.allclose(p.grad[0], g[0])

    def test_gradient_reaches_model_parameters(self):
        model = _model(probabilistic=True, predict_reward=True)
        EnsembleDynamicsLoss(model, loss_type="nll")(_data())["loss_dynamics"].backward()
        for name, p in model.named_parameters():
            assert p.grad is not None and p.grad.abs().sum() > 0, name

    def test_input_untouched(self):
        td = _data()
        before = td.clone()
        EnsembleDynamicsLoss(_model(predict_reward=True))(td)
        assert set(td.keys(True, True)) == set(before.keys(True, True))
        assert (td == before).all()

    @pytest.mark.parametrize("key", ["observation", "action", ("next", "observation"), ("next", "reward")])
    def test_nan_raises_with_key(self, key):
        td = _data()
        td.get(key)[3, 0] = float("nan")
        with pytest.raises(ValueError, match=re.escape(repr(key))):
            EnsembleDynamicsLoss(_model(predict_reward=True))(td)

    def test_check_finite_off_skips_check(self):
        td = _data()
        td["observation"][0, 0] = float("nan")
        out = EnsembleDynamicsLoss(_model(predict_reward=True), check_finite=False)(td)
        assert torch.isnan(out["loss_dynamics"])

    def test_set_keys(self):
        model = _model()
        loss = EnsembleDynamicsLoss(model)
        with pytest.raises(ValueError, match="not_a_key"):
            loss.set_keys(not_a_key="x")
        td = _data(reward=False)
        td.rename_key_("observation", "obs")
        loss.set_keys(observation="obs", next_observation=("next", "obs"))
        td.rename_key_(("next", "observation"), ("next", "obs"))
        assert loss(td)["loss_dynamics"].shape == ()

    def test_validation(self):
        with pytest.raises(ValueError, match="probabilistic"):
            EnsembleDynamicsLoss(_model(), loss_type="nll")
        with pytest.raises(ValueError, match="huber"):
            EnsembleDynamicsLoss(_model(), loss_type="huber")
        with pytest.raises(KeyError, match="reward"):
            EnsembleDynamicsLoss(_model(predict_reward=True))(_data(reward=False))
