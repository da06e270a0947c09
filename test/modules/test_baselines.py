from __future__ import annotations

import numpy as np
import pytest
import torch
from tensordict import TensorDict

from torchrl.objectives.value.functional import reward2go

from torchrl_depeff.modules.baselines import LinearFeatureBaseline, discounted_returns


def _loop_returns(reward, done, gamma):  # the former implementation: backward recursion over time
    out, running = torch.empty_like(reward), torch.zeros_like(reward.select(-2, 0))
    not_done = (~done).to(reward.dtype)
    for t in range(reward.shape[-2] - 1, -1, -1):
        running = reward.select(-2, t) + gamma * not_done.select(-2, t) * running
        out.select(-2, t).copy_(running)
    return out


def _rollout(b=6, t=30, obs_dim=3, seed=0):
    g = torch.Generator().manual_seed(seed)
    td = TensorDict(observation=torch.randn(b, t, obs_dim, generator=g) * 3, batch_size=[b, t])
    td["step_count"] = torch.arange(t).expand(b, t).unsqueeze(-1)
    td["next", "reward"] = torch.randn(b, t, 1, generator=g)
    done = torch.zeros(b, t, 1, dtype=torch.bool)
    done[:, 12] = True
    td["next", "done"] = done
    return td


def test_discounted_returns_hand_computed():
    r = torch.tensor([1.0, 2.0, 3.0, 4.0]).view(1, 4, 1)
    d = torch.tensor([False, False, True, False]).view(1, 4, 1)
    with pytest.warns(FutureWarning, match="reward2go"):
        out = discounted_returns(r, d, 0.9).flatten()
    torch.testing.assert_close(out, torch.tensor([1 + 0.9 * (2 + 0.9 * 3), 2 + 0.9 * 3, 3.0, 4.0]))


@pytest.mark.parametrize("gamma", [0.0, 0.5, 0.99, 1.0])
def test_reward2go_equals_the_former_loop(gamma):
    td = _rollout(b=4, t=300)
    td["next", "done"][1, ::37] = True
    r, d = td["next", "reward"], td["next", "done"]
    if gamma > 0:  # torchrl's reward2go needs gamma > 0; the wrapper handles 0
        torch.testing.assert_close(reward2go(r, d, gamma, time_dim=-2), _loop_returns(r, d, gamma), rtol=1e-4, atol=1e-4)
    with pytest.warns(FutureWarning):
        torch.testing.assert_close(discounted_returns(r, d, gamma), _loop_returns(r, d, gamma), rtol=1e-4, atol=1e-4)


def test_fit_equals_numpy_lstsq_on_ridge_system():
    td = _rollout()
    base = LinearFeatureBaseline(3, reg_coeff=1e-3)
    coeffs = base.fit(td, gamma=0.95)
    phi = base.features(td["observation"], td["step_count"]).reshape(-1, 10).double().numpy()
    y = _loop_returns(td["next", "reward"], td["next", "done"], 0.95).reshape(-1).double().numpy()
    # ridge as an augmented least-squares problem: [Phi; sqrt(reg) I] w = [y; 0]
    a = np.concatenate([phi, np.sqrt(1e-3) * np.eye(10)])
    rhs = np.concatenate([y, np.zeros(10)])
    expected = np.linalg.lstsq(a, rhs, rcond=None)[0]
    np.testing.assert_allclose(coeffs.double().numpy(), expected, rtol=1e-4, atol=1e-5)
    out = base(td.clone())
    assert out["state_value"].shape == (6, 30, 1)
    np.testing.assert_allclose(out["state_value"].reshape(-1).double().numpy(), phi @ expected,
                               rtol=1e-4, atol=1e-4)


def test_features_clip_and_time_scale():
    base = LinearFeatureBaseline(1)
    phi = base.features(torch.tensor([[-30.0]]), torch.tensor([[200]]))
    torch.testing.assert_close(phi, torch.tensor([[-10.0, 100.0, 2.0, 4.0, 8.0, 1.0]]))


def test_fit_recovers_synthetic_value():
    g = torch.Generator().manual_seed(1)
    obs = torch.rand(5000, 2, generator=g) * 4 - 2
    t = torch.randint(0, 300, (5000, 1), generator=g)
    base = LinearFeatureBaseline(2)
    phi = base.features(obs, t)
    true_w = torch.randn(8, generator=g)
    base.fit_features(phi, phi @ true_w)
    torch.testing.assert_close(base.coeffs, true_w, rtol=1e-3, atol=1e-3)


def test_fallback_time_index_and_errors():
    td = _rollout()
    del td["step_count"]
    base = LinearFeatureBaseline(3)
    base.fit(td)  # uses position along time as step index
    td_with = _rollout()
    base2 = LinearFeatureBaseline(3)
    base2.fit(td_with)
    torch.testing.assert_close(base.coeffs, base2.coeffs)
    with pytest.raises(KeyError, match="reward"):
        LinearFeatureBaseline(3).fit(TensorDict(observation=torch.zeros(2, 3, 3), batch_size=[2, 3]))
    with pytest.raises(ValueError, match="reg_coeff"):
        LinearFeatureBaseline(3, reg_coeff=0.0)
    with pytest.raises(ValueError, match="observation_dim"):
        base.features(torch.zeros(2, 4), torch.zeros(2, 1))


def test_ill_conditioned_increases_reg():
    base = LinearFeatureBaseline(1, reg_coeff=1e-12)
    phi = base.features(torch.zeros(10, 1), torch.zeros(10, 1))  # rank-1 features
    coeffs = base.fit_features(phi, torch.ones(10))
    assert torch.isfinite(coeffs).all()
    torch.testing.assert_close(phi @ coeffs, torch.ones(10), rtol=1e-3, atol=1e-3)


def test_time_key_is_an_in_key_for_value_estimators():
    # GAE selects the critic's in_keys: the step index must survive that selection
    base = LinearFeatureBaseline(3)
    assert base.in_keys == ["observation", "step_count"]
    td = _rollout()
    base.fit(td)
    full = base(td.clone())["state_value"]
    selected = base(td.select(*base.in_keys))["state_value"]
    torch.testing.assert_close(full, selected)
    td_late = td.clone()
    td_late["step_count"] = td_late["step_count"] + 100
    assert not torch.allclose(base(td_late.select(*base.in_keys))["state_value"], full)
    assert LinearFeatureBaseline(3, time_key=None).in_keys == ["observation"]
