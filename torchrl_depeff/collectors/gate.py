"""Safety gate run before a new policy is deployed to the real system.

BREMEN's deployments are expensive and rare (Alg. 1), so a broken policy must never reach the real
environment. :class:`DeploymentGate` checks, on states from the dataset:

1. every parameter and buffer of the new policy is finite;
2. the *deterministic action the policy executes* (the distribution's ``deterministic_sample``:
   the mean of a Gaussian, ``tanh(loc)`` of a ``TanhNormal``; the deterministic-mode ``"action"``
   or ``"loc"`` of a module without ``get_dist``) lies inside the action spec's bounds;
3. the mean ``KL(pi_new || pi_prev)`` over the states is at most ``max_kl``: the same direction as
   BREMEN's trust-region constraint (eq. 4, ``KL(pi_theta || pi_theta_k)``); closed form when torch
   has one, Monte-Carlo otherwise (:func:`~torchrl_depeff.modules.distributions.mean_policy_kl`,
   e.g. ``TanhNormal``);
4. the model-predicted return is at least ``min_model_return`` (if both are given).

A failure is logged (``torchrl_logger.warning``) and either raises :class:`DeploymentRefused`
(``on_fail="raise"``) or returns a report with ``fallback=True``, telling the caller to keep the
last deployed policy.
"""
from __future__ import annotations

import warnings
from dataclasses import dataclass, field
from typing import Literal

import torch
from tensordict import TensorDictBase
from tensordict.utils import NestedKey
from torch import nn
from torchrl._utils import logger as torchrl_logger
from torch.distributions import kl_divergence, Normal
from torchrl.envs.utils import ExplorationType, set_exploration_type

from torchrl_depeff.modules.distributions import deterministic_action, mean_policy_kl

__all__ = ["DeploymentGate", "GateReport", "DeploymentRefused", "gaussian_kl"]


def gaussian_kl(
    loc_p: torch.Tensor, scale_p: torch.Tensor, loc_q: torch.Tensor, scale_q: torch.Tensor
) -> torch.Tensor:
    """Deprecated: ``torch.distributions.kl_divergence(Normal(loc_p, scale_p), Normal(loc_q, scale_q)).sum(-1)``.

    ``KL(N(loc_p, scale_p^2) || N(loc_q, scale_q^2))`` summed over the last (action) dim. For two
    policies use :func:`~torchrl_depeff.modules.distributions.mean_policy_kl`.

    Args:
        loc_p, scale_p (torch.Tensor): first distribution ``[*B, d]``.
        loc_q, scale_q (torch.Tensor): second distribution ``[*B, d]``.

    Returns:
        torch.Tensor: ``[*B]``.

    Examples:
        >>> import warnings
        >>> from torchrl_depeff.collectors.gate import gaussian_kl
        >>> z, o = torch.zeros(1, 1), torch.ones(1, 1)
        >>> with warnings.catch_warnings():
        ...     warnings.simplefilter("ignore")
        ...     gaussian_kl(z, o, z + 1, o).tolist(), round(gaussian_kl(z, o, z, 2 * o).item(), 4)
        ([0.5], 0.3181)
    """
    warnings.warn(
        "gaussian_kl is deprecated: use torch.distributions.kl_divergence(Normal(...), Normal(...)).sum(-1), "
        "or torchrl_depeff.modules.mean_policy_kl(actor_p, actor_q, states) for two policies",
        FutureWarning, stacklevel=2,
    )
    return kl_divergence(Normal(loc_p, scale_p), Normal(loc_q, scale_q)).sum(-1)


@dataclass
class GateReport:
    """Outcome of :meth:`DeploymentGate.check`.

    Attributes:
        passed (bool): every check passed.
        reasons (list[str]): one line per failed check.
        kl (float | None): mean ``KL(new || previous)`` over the states (``None`` if not measured).
        bounds_violation_fraction (float | None): fraction of states whose deterministic action
            leaves the action bounds in at least one dimension.
        nonfinite_parameters (list[str]): names of parameters/buffers holding NaN/inf.
        model_return (float | None): the model return that was checked.
        fallback (bool): the caller should keep (fall back to) the last deployed policy.
    """

    passed: bool
    reasons: list[str] = field(default_factory=list)
    kl: float | None = None
    bounds_violation_fraction: float | None = None
    nonfinite_parameters: list[str] = field(default_factory=list)
    model_return: float | None = None
    fallback: bool = False


class DeploymentRefused(RuntimeError):
    """Raised by :class:`DeploymentGate` with ``on_fail="raise"``; ``.report`` holds the details."""

    def __init__(self, report: GateReport) -> None:
        super().__init__("deployment refused: " + "; ".join(report.reasons))
        self.report = report


class DeploymentGate:
    """Checks a candidate policy before deployment (see module docstring).

    Keyword Args:
        max_kl (float | None): bound on the mean ``KL(pi_new || pi_prev)``; ``None`` skips the check.
        action_spec (TensorSpec | None): bounded spec (``.space.low``/``.space.high``); ``None``
            skips the bounds check.
        check_finite (bool): check parameters and outputs for NaN/inf. Defaults to ``True``.
        min_model_return (float, optional): floor on the model-predicted return.
        on_fail (str): ``"raise"`` (default) or ``"fallback"``.
        max_violation_fraction (float): tolerated fraction of out-of-bounds states. Defaults to ``0``.
        bounds_tolerance (float): slack added to the bounds. Defaults to ``1e-6``.
        loc_key, scale_key, action_key (NestedKey): policy output keys (used for modules without
            ``get_dist``).
        kl_num_samples (int): Monte-Carlo draws per state for policies whose KL has no closed
            form. Defaults to ``64``.

    Examples:
        >>> from tensordict import TensorDict
        >>> from tensordict.nn import TensorDictModule
        >>> from torchrl.data import Bounded
        >>> from torchrl_depeff.collectors.gate import DeploymentGate
        >>> spec = Bounded(-1.0, 1.0, shape=(1,))
        >>> def actor(shift):
        ...     net = torch.nn.Linear(2, 1)
        ...     torch.nn.init.zeros_(net.weight); torch.nn.init.constant_(net.bias, shift)
        ...     return TensorDictModule(lambda o: (net(o), torch.ones_like(net(o))), ["observation"],
        ...                             ["loc", "scale"])
        >>> gate = DeploymentGate(max_kl=0.1, action_spec=spec, on_fail="fallback")
        >>> states = TensorDict(observation=torch.randn(8, 2), batch_size=[8])
        >>> gate.check(actor(0.1), actor(0.0), states).passed
        True
        >>> report = gate.check(actor(0.9), actor(0.0), states)
        >>> report.passed, report.fallback, round(report.kl, 3)
        (False, True, 0.405)
    """

    def __init__(
        self,
        *,
        max_kl: float | None,
        action_spec=None,
        check_finite: bool = True,
        min_model_return: float | None = None,
        on_fail: Literal["raise", "fallback"] = "raise",
        max_violation_fraction: float = 0.0,
        bounds_tolerance: float = 1e-6,
        loc_key: NestedKey = "loc",
        scale_key: NestedKey = "scale",
        action_key: NestedKey = "action",
        kl_num_samples: int = 64,
    ) -> None:
        if max_kl is not None and not max_kl > 0:
            raise ValueError(f"max_kl must be > 0 or None, got {max_kl}")
        if on_fail not in ("raise", "fallback"):
            raise ValueError(f"on_fail must be 'raise' or 'fallback', got {on_fail!r}")
        if not 0.0 <= max_violation_fraction <= 1.0:
            raise ValueError(f"max_violation_fraction must be in [0, 1], got {max_violation_fraction}")
        if action_spec is not None and not hasattr(getattr(action_spec, "space", None), "low"):
            raise TypeError(f"action_spec must be a bounded spec with space.low/high, got {action_spec!r}")
        self.max_kl = max_kl
        self.action_spec = action_spec
        self.check_finite = bool(check_finite)
        self.min_model_return = min_model_return
        self.on_fail = on_fail
        self.max_violation_fraction = float(max_violation_fraction)
        self.bounds_tolerance = float(bounds_tolerance)
        if isinstance(kl_num_samples, bool) or not isinstance(kl_num_samples, int) or kl_num_samples < 1:
            raise ValueError(f"kl_num_samples must be an int >= 1, got {kl_num_samples!r}")
        self.loc_key, self.scale_key, self.action_key = loc_key, scale_key, action_key
        self.kl_num_samples = kl_num_samples

    def _outputs(self, policy: nn.Module, states: TensorDictBase) -> TensorDictBase:
        with torch.no_grad(), set_exploration_type(ExplorationType.DETERMINISTIC):
            return policy(states.clone())

    def _deterministic_action(self, policy: nn.Module, states: TensorDictBase) -> torch.Tensor:
        """The action the policy executes in deterministic mode (post-squashing), ``[*B, d]``."""
        if hasattr(policy, "get_dist"):
            with torch.no_grad(), set_exploration_type(ExplorationType.DETERMINISTIC):
                return deterministic_action(policy.get_dist(states.clone()))
        out = self._outputs(policy, states)
        keys = out.keys(include_nested=True)
        for key in (self.action_key, self.loc_key):
            if key in keys:
                return out.get(key)
        raise KeyError(f"the policy wrote neither {self.action_key!r} nor {self.loc_key!r}")

    def _mean_kl(self, policy: nn.Module, previous: nn.Module, states: TensorDictBase) -> float:
        # KL(pi_new || pi_prev), the direction of BREMEN eq. (4)'s trust region
        if hasattr(policy, "get_dist") and hasattr(previous, "get_dist"):
            return float(mean_policy_kl(policy, previous, states, num_samples=self.kl_num_samples))
        out, prev = self._outputs(policy, states), self._outputs(previous, states)
        for td, who in ((out, "policy"), (prev, "previous_policy")):
            for key in (self.loc_key, self.scale_key):
                if key not in td.keys(include_nested=True):
                    raise KeyError(f"{who} did not write {key!r}, needed for the KL check")
        p = Normal(out.get(self.loc_key), out.get(self.scale_key))
        q = Normal(prev.get(self.loc_key), prev.get(self.scale_key))
        return float(kl_divergence(p, q).sum(-1).mean())

    def check(
        self,
        policy: nn.Module,
        previous_policy: nn.Module | None,
        states: TensorDictBase,
        model_return: float | None = None,
    ) -> GateReport:
        """Run every check on ``policy`` (``previous_policy=None``: first deployment, no KL check).

        Args:
            policy (nn.Module): candidate (TensorDict module writing ``loc``/``scale``/``action``).
            previous_policy (nn.Module | None): the last deployed policy.
            states (TensorDictBase): dataset states ``[*B]`` with the policy's input keys.
            model_return (float, optional): model-predicted return of ``policy``.

        Returns:
            GateReport: ``passed=True``, or (``on_fail="fallback"``) ``fallback=True``.

        Raises:
            DeploymentRefused: a check failed and ``on_fail="raise"``.
        """
        if not isinstance(states, TensorDictBase):
            raise TypeError(f"states must be a TensorDictBase, got {type(states).__name__}")
        report = GateReport(passed=True, model_return=model_return)
        reasons = report.reasons
        if self.check_finite:
            report.nonfinite_parameters = [
                name
                for name, t in list(policy.named_parameters()) + list(policy.named_buffers())
                if t.is_floating_point() and not bool(torch.isfinite(t).all())
            ]
            if report.nonfinite_parameters:
                reasons.append(f"non-finite parameters: {report.nonfinite_parameters}")
        mean = self._deterministic_action(policy, states)
        if self.check_finite and not bool(torch.isfinite(mean).all()):
            reasons.append("non-finite deterministic actions on the dataset states")
        if self.action_spec is not None:
            low = self.action_spec.space.low.to(mean) - self.bounds_tolerance
            high = self.action_spec.space.high.to(mean) + self.bounds_tolerance
            outside = ((mean < low) | (mean > high) | ~torch.isfinite(mean)).reshape(-1, mean.shape[-1])
            frac = outside.any(-1).float().mean().item()
            report.bounds_violation_fraction = frac
            if frac > self.max_violation_fraction:
                reasons.append(
                    f"deterministic action outside the action bounds on {frac:.1%} of states "
                    f"(allowed {self.max_violation_fraction:.1%})"
                )
        if self.max_kl is not None and previous_policy is not None:
            kl = self._mean_kl(policy, previous_policy, states)
            report.kl = kl
            if not kl <= self.max_kl:  # also catches NaN
                reasons.append(f"mean KL(new || previous) = {kl:.4g} > max_kl = {self.max_kl:.4g}")
        if self.min_model_return is not None and model_return is not None:
            if not float(model_return) >= self.min_model_return:
                reasons.append(
                    f"model return {float(model_return):.4g} < min_model_return "
                    f"{self.min_model_return:.4g}"
                )
        if reasons:
            report.passed = False
            torchrl_logger.warning("deployment gate failed: " + "; ".join(reasons))
            if self.on_fail == "raise":
                raise DeploymentRefused(report)
            report.fallback = True
        return report
