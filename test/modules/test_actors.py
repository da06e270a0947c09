from __future__ import annotations

import math

import pytest
import torch
from tensordict import TensorDict
from torch import nn
from torchrl.envs.utils import ExplorationType, set_exploration_type

from torchrl_depeff.modules.actors import (
    GaussianActionNoise,
    GaussianPolicyNet,
    UncertaintyActionNoise,
    make_gaussian_actor,
)


def test_policy_net_shapes_and_squashing():
    net = GaussianPolicyNet(17, 6)
    assert [m.out_features for m in net.mean_net if isinstance(m, nn.Linear)] == [200, 200, 6]
    loc, scale = net(torch.randn(11, 17) * 100)
    assert loc.shape == scale.shape == (11, 6)
    assert loc.abs().max() <= 1
    torch.testing.assert_close(scale, torch.full((11, 6), 0.1))


def test_stationary_sigma_is_buffer_learned_sigma_is_parameter():
    fixed = GaussianPolicyNet(3, 2, num_cells=(4,))
    assert "log_std" not in dict(fixed.named_parameters())
    assert "log_std" in dict(fixed.named_buffers())
    learned = GaussianPolicyNet(3, 2, num_cells=(4,), learn_sigma=True, sigma=0.3)
    assert "log_std" in dict(learned.named_parameters())
    _, scale = learned(torch.randn(5, 3))
    scale.sum().backward()
    assert learned.log_std.grad is not None and learned.log_std.grad.abs().sum() > 0
    # state independent
    torch.testing.assert_close(scale, torch.full((5, 2), 0.3))


@pytest.mark.parametrize("sigma", [0.0, -1.0])
def test_bad_sigma(sigma):
    with pytest.raises(ValueError, match="sigma"):
        GaussianPolicyNet(3, 2, sigma=sigma)
    with pytest.raises(ValueError, match="sigma"):
        GaussianPolicyNet(3, 2).set_sigma(sigma)


def test_bc_reinit_gives_normal_bc_mean_1():
    torch.manual_seed(0)
    bc = GaussianPolicyNet(5, 3, num_cells=(16, 16), sigma=0.2)
    actor = make_gaussian_actor(5, 3, num_cells=(16, 16), sigma=0.1)
    net = actor.module[0].module
    obs = torch.randn(64, 5)
    assert not torch.allclose(net(obs)[0], bc(obs)[0])
    net.load_mean_from(bc)
    net.set_sigma(1.0)
    td = actor(TensorDict(observation=obs, batch_size=[64]))
    torch.testing.assert_close(td["loc"], bc(obs)[0])
    torch.testing.assert_close(td["scale"], torch.ones(64, 3))
    dist = actor.get_dist(TensorDict(observation=obs, batch_size=[64]))
    torch.testing.assert_close(dist.stddev, torch.ones(64, 3))
    # a plain Sequential with the same layout also works; a different one is refused
    net.load_mean_from(bc.mean_net)
    with pytest.raises(ValueError, match="architecture"):
        net.load_mean_from(GaussianPolicyNet(5, 3, num_cells=(8,)))


def test_actor_keys_log_prob_and_unsquashed_noise():
    torch.manual_seed(0)
    actor = make_gaussian_actor(3, 2, num_cells=(8,), sigma=2.0)
    td = actor(TensorDict(observation=torch.randn(2000, 3), batch_size=[2000]))
    for key in ("loc", "scale", "action", "action_log_prob"):
        assert key in td.keys()
    # action is tanh(mu) + eps, not squashed: with sigma=2 many actions leave [-1, 1]
    assert (td["action"].abs() > 1).float().mean() > 0.3
    expected = torch.distributions.Normal(td["loc"], td["scale"]).log_prob(td["action"]).sum(-1)
    torch.testing.assert_close(td["action_log_prob"], expected)
    # deterministic exploration type acts with the mean
    with set_exploration_type(ExplorationType.DETERMINISTIC):
        td2 = actor(TensorDict(observation=td["observation"], batch_size=[2000]))
    torch.testing.assert_close(td2["action"], td2["loc"])


def test_gaussian_action_noise_statistics_and_generator():
    td = TensorDict(action=torch.full((20000, 3), 0.5), batch_size=[20000])
    out = GaussianActionNoise(0.1, generator=torch.Generator().manual_seed(1))(td.clone())
    noise = out["action"] - 0.5
    assert abs(float(noise.mean())) < 0.003
    assert abs(float(noise.var()) - 0.01) < 0.0005
    out2 = GaussianActionNoise(0.1, generator=torch.Generator().manual_seed(1))(td.clone())
    assert torch.equal(out["action"], out2["action"])
    with pytest.raises(KeyError, match="act"):
        GaussianActionNoise(0.1, action_key="act")(td.clone())
    with pytest.raises(ValueError, match="sigma"):
        GaussianActionNoise(-0.1)


def test_uncertainty_action_noise_variance_per_row():
    n = 20000
    u = torch.cat([torch.full((n, 1), 0.04), torch.full((n, 1), 0.25)])
    td = TensorDict(action=torch.zeros(2 * n, 2), uncertainty=u, batch_size=[2 * n])
    out = UncertaintyActionNoise(const_std=0.1, generator=torch.Generator().manual_seed(0))(td.clone())
    a = out["action"]
    # variance = const_std^2 + U per row
    assert abs(float(a[:n].var()) - (0.01 + 0.04)) < 0.003
    assert abs(float(a[n:].var()) - (0.01 + 0.25)) < 0.01
    # literal reading: U is a std
    out = UncertaintyActionNoise(const_std=0.0, uncertainty_is="std",
                                 generator=torch.Generator().manual_seed(0))(td.clone())
    assert abs(float(out["action"][:n].std()) - 0.04) < 0.002
    # zero uncertainty and zero const -> unchanged
    td0 = TensorDict(action=torch.ones(4, 2), uncertainty=torch.zeros(4), batch_size=[4])
    assert torch.equal(UncertaintyActionNoise(0.0)(td0)["action"], torch.ones(4, 2))


def test_uncertainty_action_noise_missing_key():
    td = TensorDict(action=torch.zeros(3, 2), batch_size=[3])
    with pytest.raises(KeyError, match="model_disagreement"):
        UncertaintyActionNoise(uncertainty_key="model_disagreement")(td)
    with pytest.raises(ValueError, match="uncertainty_is"):
        UncertaintyActionNoise(uncertainty_is="var")
