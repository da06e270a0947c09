from __future__ import annotations

import math

import pytest
import torch
from tensordict import TensorDict

from torchrl_depeff.modules.actors import make_gaussian_actor
from torchrl_depeff.objectives.trpo import TRPOLoss
from torchrl_depeff.objectives.uw_trpo import UncertaintyWeightedTRPOLoss


def _setup(n=8, seed=0):
    torch.manual_seed(seed)
    actor = make_gaussian_actor(3, 2, num_cells=(8,), learn_sigma=True, sigma=0.5)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        td = actor(TensorDict(observation=torch.randn(n, 3, generator=g), batch_size=[n]))
    td["advantage"] = torch.randn(n, 1, generator=g)
    td["uncertainty"] = torch.rand(n, 1, generator=g) * 50
    return actor, td


def _perturb(actor):
    with torch.no_grad():
        for p in actor.parameters():
            p.add_(0.1 * torch.randn_like(p))


def test_weights_hand_computed():
    actor, _ = _setup()
    loss = UncertaintyWeightedTRPOLoss(actor)  # alpha = 0.028 (MUSBO)
    assert loss.alpha == 0.028
    td = TensorDict(uncertainty=torch.tensor([[0.0], [10.0], [100.0]]), batch_size=[3])
    expected = [1.0, math.exp(-0.28), math.exp(-2.8)]
    torch.testing.assert_close(loss.uncertainty_weight(td), torch.tensor(expected))
    # member predictions [*B, E, d]: squared L2 distance of members 0 and 1, summed over d
    preds = torch.zeros(2, 3, 2)
    preds[0, 1] = torch.tensor([1.0, 2.0])  # d^2 = 5
    preds[1, 0] = torch.tensor([3.0, 0.0])  # d^2 = 9
    preds[1, 2] = torch.tensor([100.0, 100.0])  # member 2 is ignored
    td = TensorDict(uncertainty=preds, batch_size=[2])
    torch.testing.assert_close(loss.uncertainty_weight(td), torch.tensor([math.exp(-0.14), math.exp(-0.252)]))


def test_surrogate_is_weighted_and_weights_send_no_gradient():
    actor, td = _setup()
    td["uncertainty"].requires_grad_(True)
    uw = UncertaintyWeightedTRPOLoss(actor, alpha=0.05, reduction="none")
    plain = TRPOLoss(actor, reduction="none")
    _perturb(actor)
    out_uw, out = uw(td), plain(td)
    w = torch.exp(-0.05 * td["uncertainty"].detach().squeeze(-1))
    torch.testing.assert_close(out_uw["loss_objective"], out["loss_objective"] * w)
    assert out_uw["uncertainty_weight"].shape == ()
    torch.testing.assert_close(out_uw["uncertainty_weight"], w.mean())
    assert not out_uw["uncertainty_weight"].requires_grad
    out_uw["loss_objective"].sum().backward()
    assert td["uncertainty"].grad is None
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in uw.actor_network_params.values(True, True))
    # KL is not weighted (eq. 13)
    torch.testing.assert_close(out_uw["kl"], out["kl"])


def test_alpha_zero_equals_trpo_and_validation():
    actor, td = _setup()
    _perturb(actor)
    torch.testing.assert_close(UncertaintyWeightedTRPOLoss(actor, alpha=0.0)(td)["loss_objective"],
                               TRPOLoss(actor)(td)["loss_objective"])
    with pytest.raises(ValueError, match="alpha"):
        UncertaintyWeightedTRPOLoss(actor, alpha=-0.1)
    with pytest.raises(KeyError, match="model_disagreement"):
        UncertaintyWeightedTRPOLoss(actor, uncertainty_key="model_disagreement")(td)
    bad = td.clone()
    bad["uncertainty"] = torch.zeros(8, 1, 3, 4)
    with pytest.raises(ValueError, match="uncertainty"):
        UncertaintyWeightedTRPOLoss(actor)(bad)
    before = td.clone()
    UncertaintyWeightedTRPOLoss(actor)(td)
    assert set(td.keys()) == set(before.keys()) and (td == before).all()
