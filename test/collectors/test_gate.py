"""Tests for DeploymentGate: refusals (NaN, bounds, KL, model return) and a passing policy."""
from __future__ import annotations

import logging

import pytest
import torch
from tensordict import TensorDict
from tensordict.nn import NormalParamExtractor, TensorDictModule
from torch.distributions import Normal, kl_divergence
from torchrl._utils import logger as torchrl_logger
from torchrl.data import Bounded
from torchrl.modules import IndependentNormal, ProbabilisticActor, TanhNormal

from torchrl_depeff.collectors.deployment import freeze_policy
from torchrl_depeff.collectors.gate import DeploymentGate, DeploymentRefused, GateReport, gaussian_kl

OBS, ACT = 4, 2
SPEC = Bounded(-1.0, 1.0, shape=(ACT,))


def make_actor(seed: int = 0) -> ProbabilisticActor:
    torch.manual_seed(seed)
    net = torch.nn.Sequential(torch.nn.Linear(OBS, 2 * ACT), NormalParamExtractor())
    with torch.no_grad():
        net[0].weight.mul_(0.1)
        net[0].bias.zero_()
    return ProbabilisticActor(
        TensorDictModule(net, ["observation"], ["loc", "scale"]),
        in_keys=["loc", "scale"], out_keys=["action"], distribution_class=IndependentNormal,
    )


def states(n: int = 64) -> TensorDict:
    return TensorDict(observation=torch.randn(n, OBS), batch_size=[n])


def shift_loc(actor, delta: float):
    new = freeze_policy(actor)
    with torch.no_grad():
        new.module[0].module[0].bias[:ACT] += delta  # loc half of the NormalParamExtractor input
    return new


def make_tanh_actor(seed: int = 0, shift: float = 3.0) -> ProbabilisticActor:
    """TorchRL TanhNormal policy whose pre-tanh ``loc`` (about ``shift``) is outside [-1, 1]."""
    torch.manual_seed(seed)
    net = torch.nn.Sequential(torch.nn.Linear(OBS, 2 * ACT), NormalParamExtractor())
    with torch.no_grad():
        net[0].weight.mul_(0.1)
        net[0].bias.zero_()
        net[0].bias[:ACT] += shift
    return ProbabilisticActor(
        TensorDictModule(net, ["observation"], ["loc", "scale"]),
        in_keys=["loc", "scale"], out_keys=["action"], distribution_class=TanhNormal,
        distribution_kwargs={"low": SPEC.space.low, "high": SPEC.space.high},
    )


class TestGaussianKL:
    def test_matches_torch_and_direction(self):
        lp, sp = torch.randn(5, 3), torch.rand(5, 3) + 0.2
        lq, sq = torch.randn(5, 3), torch.rand(5, 3) + 0.2
        ref = kl_divergence(Normal(lp, sp), Normal(lq, sq)).sum(-1)
        with pytest.warns(FutureWarning, match="kl_divergence"):
            got = gaussian_kl(lp, sp, lq, sq)
        torch.testing.assert_close(got, ref)
        rev = kl_divergence(Normal(lq, sq), Normal(lp, sp)).sum(-1)
        with pytest.warns(FutureWarning):
            assert not torch.allclose(gaussian_kl(lp, sp, lq, sq), rev)


class TestTanhNormalPolicy:
    def test_in_bounds_tanh_policy_passes_although_loc_is_outside(self):
        actor = make_tanh_actor()
        s = states()
        with torch.no_grad():
            out = actor(s.clone())
        assert (out["loc"].abs() > 1).all()  # the pre-tanh location the former gate checked
        report = DeploymentGate(max_kl=None, action_spec=SPEC).check(actor, None, s)
        assert report.passed and report.bounds_violation_fraction == 0.0

    def test_monte_carlo_kl_of_tanh_policies(self):
        old = make_tanh_actor(shift=0.0)
        new = shift_loc(old, 0.5)
        s = states(256)
        torch.manual_seed(0)
        report = DeploymentGate(max_kl=10.0, action_spec=SPEC, kl_num_samples=256).check(new, old, s)
        # same tanh bijection: the KL equals the KL of the pre-tanh Gaussians
        with torch.no_grad():
            o, n = old(s.clone()), new(s.clone())
        exact = kl_divergence(Normal(n["loc"], n["scale"]), Normal(o["loc"], o["scale"])).sum(-1).mean()
        assert report.kl == pytest.approx(exact.item(), rel=0.05)
        refused = DeploymentGate(max_kl=0.5 * exact.item(), action_spec=SPEC, on_fail="fallback").check(new, old, s)
        assert not refused.passed and any("KL" in r for r in refused.reasons)


class TestDeploymentGate:
    def test_passes_good_policy(self):
        old = make_actor()
        new = shift_loc(old, 0.01)
        report = DeploymentGate(max_kl=0.05, action_spec=SPEC).check(new, old, states(), model_return=10.0)
        assert isinstance(report, GateReport)
        assert report.passed and not report.fallback and report.reasons == []
        assert report.bounds_violation_fraction == 0.0
        assert 0 < report.kl < 0.05

    def test_first_deployment_skips_kl(self):
        report = DeploymentGate(max_kl=1e-9, action_spec=SPEC).check(make_actor(), None, states())
        assert report.passed and report.kl is None

    def test_refuses_nan_parameters(self):
        old = make_actor()
        bad = freeze_policy(old)
        with torch.no_grad():
            bad.module[0].module[0].weight[0, 0] = float("nan")
        with pytest.raises(DeploymentRefused, match="non-finite") as exc:
            DeploymentGate(max_kl=None, action_spec=SPEC).check(bad, old, states())
        assert exc.value.report.nonfinite_parameters == ["module.0.module.0.weight"]
        assert not exc.value.report.passed

    def test_refuses_out_of_bounds(self):
        old = make_actor()
        bad = shift_loc(old, 3.0)  # loc ~ 3 outside [-1, 1]
        gate = DeploymentGate(max_kl=None, action_spec=SPEC, on_fail="fallback")
        report = gate.check(bad, old, states())
        assert not report.passed and report.fallback
        assert report.bounds_violation_fraction == 1.0
        assert any("bounds" in r for r in report.reasons)
        # a partial violation is measured as a fraction of states
        half = freeze_policy(old)
        with torch.no_grad():
            half.module[0].module[0].weight.zero_()
            half.module[0].module[0].weight[0, 0] = 100.0  # loc_0 = 100 * obs_0
        s = states(200)
        s["observation"][:, 0] = torch.linspace(-1, 1, 200)
        rep = gate.check(half, None, s)
        expected = ((100 * s["observation"][:, 0]).abs() > 1 + 1e-6).float().mean().item()
        assert rep.bounds_violation_fraction == pytest.approx(expected)
        tolerant = DeploymentGate(max_kl=None, action_spec=SPEC, max_violation_fraction=1.0)
        assert tolerant.check(half, None, s).passed

    def test_refuses_over_kl(self):
        old = make_actor()
        new = shift_loc(old, 0.5)
        gate = DeploymentGate(max_kl=0.05, action_spec=SPEC, on_fail="fallback")
        s = states()
        report = gate.check(new, old, s)
        assert not report.passed and report.fallback
        # reference: torch's KL(new || old), summed over action dims, mean over states
        with torch.no_grad():
            o, n = old(s.clone()), new(s.clone())
        expected = kl_divergence(Normal(n["loc"], n["scale"]), Normal(o["loc"], o["scale"])).sum(-1).mean()
        assert report.kl == pytest.approx(expected.item(), rel=1e-4)
        assert any("KL" in r for r in report.reasons)

    def test_refuses_low_model_return_and_logs(self):
        old = make_actor()
        gate = DeploymentGate(max_kl=1.0, action_spec=SPEC, min_model_return=0.0)
        records: list[logging.LogRecord] = []
        handler = logging.Handler(logging.WARNING)
        handler.emit = records.append
        torchrl_logger.addHandler(handler)  # torchrl's logger does not propagate (no caplog)
        try:
            with pytest.raises(DeploymentRefused, match="model return"):
                gate.check(old, old, states(), model_return=-5.0)
        finally:
            torchrl_logger.removeHandler(handler)
        assert len(records) == 1 and "model return -5" in records[0].getMessage()
        assert records[0].levelno == logging.WARNING
        assert gate.check(old, old, states(), model_return=5.0).passed

    def test_states_not_modified(self):
        old = make_actor()
        s = states()
        DeploymentGate(max_kl=1.0, action_spec=SPEC).check(shift_loc(old, 0.01), old, s)
        assert set(s.keys()) == {"observation"}

    def test_bad_construction(self):
        with pytest.raises(ValueError, match="max_kl"):
            DeploymentGate(max_kl=-1.0, action_spec=SPEC)
        with pytest.raises(ValueError, match="explode"):
            DeploymentGate(max_kl=0.1, action_spec=SPEC, on_fail="explode")
        with pytest.raises(KeyError, match="loc"):
            det = TensorDictModule(torch.nn.Linear(OBS, ACT), ["observation"], ["action"])
            DeploymentGate(max_kl=0.1, action_spec=SPEC).check(det, det, states())
