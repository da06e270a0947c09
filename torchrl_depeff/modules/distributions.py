"""KL divergence, entropy and deterministic actions of policy distributions.

One place for the questions the losses, the deployment gate and the algorithms ask of a policy
distribution, whatever its class:

* :func:`policy_kl`: per-state ``KL(p || q)``; torch's closed form when one is registered
  (:func:`torchrl.modules.distributions.utils.has_analytic_kl`), a Monte-Carlo estimate otherwise
  (e.g. TorchRL's :class:`~torchrl.modules.TanhNormal`, our
  :class:`~torchrl_depeff.modules.mixture.TanhGaussianMixture`);
* :func:`mean_policy_kl`: the mean of :func:`policy_kl` over a batch of states for two actors
  (BREMEN Fig. 4 / Fig. 13 diagnostics, the deployment gate);
* :func:`policy_entropy`: closed form or Monte-Carlo;
* :func:`deterministic_action`: the action the policy executes in deterministic mode
  (``deterministic_sample``: ``tanh(loc)`` for a ``TanhNormal``, the mean for a Gaussian);
* :func:`diagonal_gaussian_params`: the diagonal Gaussian a distribution is a fixed bijection
  of, if any (used by the closed-form Fisher-vector products of
  :mod:`torchrl_depeff.optim.fisher`).
"""
from __future__ import annotations

import torch
from tensordict import TensorDictBase
from tensordict.nn import TensorDictModuleBase
from torch import distributions as D
from torchrl.envs.utils import ExplorationType, set_exploration_type
from torchrl.modules import TanhNormal
from torchrl.modules.distributions.utils import has_analytic_entropy, has_analytic_kl

__all__ = [
    "deterministic_action",
    "diagonal_gaussian_params",
    "mean_policy_kl",
    "policy_entropy",
    "policy_kl",
]


def _check_num_samples(num_samples: int) -> int:
    if isinstance(num_samples, bool) or not isinstance(num_samples, int) or num_samples < 1:
        raise ValueError(f"num_samples must be an int >= 1, got {num_samples!r}")
    return num_samples


def _rsample_and_log_prob(dist: D.Distribution, n: int) -> tuple[torch.Tensor, torch.Tensor]:
    shape = torch.Size((n,))
    if hasattr(dist, "rsample_and_log_prob"):  # TanhNormal: scores the exact pre-tanh draw
        return dist.rsample_and_log_prob(shape)
    if dist.has_rsample:
        x = dist.rsample(shape)
    else:
        x = dist.sample(shape)
    return x, dist.log_prob(x)


def policy_kl(p: D.Distribution, q: D.Distribution, *, num_samples: int = 16) -> torch.Tensor:
    r"""Per-state ``KL(p || q)``, batch shape ``[*B]`` (summed over the action's event dims).

    Closed form when torch registers one for the pair (Gaussians, ``Independent`` wrappers),
    otherwise the Monte-Carlo estimate :math:`\frac1S\sum_s \log p(x_s) - \log q(x_s)` with
    :math:`x_s \sim p` drawn with ``rsample`` when available (the estimate is then differentiable
    with respect to the parameters of ``p`` through the pathwise gradient). For a
    :class:`~torchrl.modules.TanhNormal` ``p`` the draw is scored at its exact pre-tanh value.

    Args:
        p (Distribution): first argument (the KL is an expectation under ``p``).
        q (Distribution): second argument.

    Keyword Args:
        num_samples (int): Monte-Carlo draws per state (only used without a closed form).
            Defaults to ``16``.

    Examples:
        >>> from torchrl.modules import IndependentNormal, TanhNormal
        >>> from torchrl_depeff.modules.distributions import policy_kl
        >>> p = IndependentNormal(torch.zeros(3, 2), torch.ones(3, 2))
        >>> q = IndependentNormal(torch.ones(3, 2), torch.ones(3, 2))
        >>> policy_kl(p, q).tolist()
        [1.0, 1.0, 1.0]
        >>> torch.manual_seed(0)  # doctest: +ELLIPSIS
        <torch._C.Generator object at ...>
        >>> tp, tq = TanhNormal(torch.zeros(4000, 2), torch.ones(4000, 2)), TanhNormal(torch.ones(4000, 2), torch.ones(4000, 2))
        >>> round(float(policy_kl(tp, tq, num_samples=4).mean()), 1)  # same bijection: the base KL, 1.0
        1.0
    """
    _check_num_samples(num_samples)
    if has_analytic_kl(p, q):
        return D.kl_divergence(p, q)
    x, log_p = _rsample_and_log_prob(p, num_samples)
    return (log_p - q.log_prob(x)).mean(0)


def policy_entropy(dist: D.Distribution, *, num_samples: int = 16) -> torch.Tensor:
    """Per-state entropy ``[*B]``: closed form when the class has one, else ``-E[log p(x)]``.

    Args:
        dist (Distribution): the policy distribution.

    Keyword Args:
        num_samples (int): Monte-Carlo draws per state. Defaults to ``16``.

    Examples:
        >>> import math
        >>> from torchrl.modules import IndependentNormal
        >>> from torchrl_depeff.modules.distributions import policy_entropy
        >>> e = policy_entropy(IndependentNormal(torch.zeros(2, 3), torch.ones(2, 3)))
        >>> torch.allclose(e, torch.full((2,), 1.5 * math.log(2 * math.pi * math.e)))
        True
    """
    _check_num_samples(num_samples)
    if has_analytic_entropy(dist):
        return dist.entropy()
    _, log_p = _rsample_and_log_prob(dist, num_samples)
    return -log_p.mean(0)


def deterministic_action(dist: D.Distribution) -> torch.Tensor:
    """The action a policy executes in deterministic mode, ``[*B, d]``.

    ``deterministic_sample`` if the distribution defines it (TorchRL's ``TanhNormal``:
    ``tanh`` of the pre-tanh location, mapped to the action bounds; our mixture: the most likely
    component's squashed mean), else the mean.

    Examples:
        >>> from torchrl.modules import TanhNormal
        >>> from torchrl_depeff.modules.distributions import deterministic_action
        >>> deterministic_action(TanhNormal(torch.full((1, 2), 3.0), torch.ones(1, 2))).abs().max() < 1
        tensor(True)
    """
    sample = getattr(dist, "deterministic_sample", None)
    if sample is None:
        sample = dist.mean
    return sample


def diagonal_gaussian_params(dist: D.Distribution) -> tuple[torch.Tensor, torch.Tensor] | None:
    """``(loc, scale)`` of the diagonal Gaussian ``dist`` is a fixed bijection of, or ``None``.

    ``Normal``, ``Independent(Normal)`` (TorchRL's ``IndependentNormal``) and TorchRL's
    ``TanhNormal`` (its pre-tanh base, after the optional ``tanh_loc`` rescaling). Two such
    distributions built by the same module share the bijection, so their KL equals the KL of
    these Gaussians and the Fisher information of the policy is the Gaussian one in
    ``(loc, log scale)``: ``1 / scale**2`` and ``2`` per action dimension.

    Examples:
        >>> from torchrl.modules import IndependentNormal, TanhNormal
        >>> from torchrl_depeff.modules.distributions import diagonal_gaussian_params
        >>> loc, scale = diagonal_gaussian_params(TanhNormal(torch.zeros(2, 3), torch.ones(2, 3)))
        >>> loc.shape, diagonal_gaussian_params(torch.distributions.Categorical(logits=torch.zeros(3)))
        (torch.Size([2, 3]), None)
    """
    if isinstance(dist, TanhNormal):
        base = dist.root_dist
        return base.loc, base.scale
    inner = dist.base_dist if isinstance(dist, D.Independent) else dist
    if type(inner) is D.Normal:
        if isinstance(dist, D.Independent) and dist.reinterpreted_batch_ndims != 1:
            return None
        return inner.loc, inner.scale
    return None


def _get_dist(actor: TensorDictModuleBase, states: TensorDictBase) -> D.Distribution:
    if not hasattr(actor, "get_dist"):
        raise TypeError(
            f"actor must expose get_dist (e.g. a ProbabilisticActor), got {type(actor).__name__}"
        )
    return actor.get_dist(states.copy())


@torch.no_grad()
def mean_policy_kl(
    actor_p: TensorDictModuleBase,
    actor_q: TensorDictModuleBase,
    states: TensorDictBase,
    *,
    num_samples: int = 16,
) -> torch.Tensor:
    """Mean over ``states`` of ``KL(pi_p(.|s) || pi_q(.|s))`` (no gradient), a 0-dim tensor.

    Closed form when torch has one for the pair of distributions, Monte-Carlo otherwise
    (:func:`policy_kl`). BREMEN eq. (4) constrains ``KL(pi_theta || pi_theta_k)``: pass the new
    policy first.

    Args:
        actor_p (TensorDictModuleBase): first policy, with ``get_dist``.
        actor_q (TensorDictModuleBase): second policy, with ``get_dist``.
        states (TensorDictBase): states ``[*B]`` with the actors' input keys (not modified).

    Keyword Args:
        num_samples (int): Monte-Carlo draws per state without a closed form. Defaults to ``16``.

    Examples:
        >>> from tensordict import TensorDict
        >>> from torchrl_depeff.modules.actors import make_gaussian_actor
        >>> from torchrl_depeff.modules.distributions import mean_policy_kl
        >>> a, b = make_gaussian_actor(3, 2, num_cells=(8,)), make_gaussian_actor(3, 2, num_cells=(8,))
        >>> s = TensorDict(observation=torch.randn(16, 3), batch_size=[16])
        >>> float(mean_policy_kl(a, a, s)), bool(mean_policy_kl(a, b, s) > 0)
        (0.0, True)
    """
    _check_num_samples(num_samples)
    if not isinstance(states, TensorDictBase):
        raise TypeError(f"states must be a TensorDictBase, got {type(states).__name__}")
    with set_exploration_type(ExplorationType.DETERMINISTIC):
        p = _get_dist(actor_p, states)
        q = _get_dist(actor_q, states)
    return policy_kl(p, q, num_samples=num_samples).mean()
