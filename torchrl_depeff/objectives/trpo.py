"""TRPO surrogate and KL (BREMEN eq. (4)) and the explicit-KL ablation (BREMEN eq. (6)).

Presented in BREMEN, Matsushima et al. 2020, https://arxiv.org/abs/2006.03647, sec. 4.2 and App. C;
TRPO: Schulman et al. 2015, https://arxiv.org/abs/1502.05477.
"""
from __future__ import annotations

import copy
import warnings
from dataclasses import dataclass
from typing import Any, Callable

import torch
from tensordict import TensorDict, TensorDictBase, TensorDictParams
from tensordict.nn import (
    dispatch,
    ProbabilisticTensorDictModule,
    TensorDictModule,
    TensorDictModuleBase,
)
from tensordict.utils import NestedKey
from torch.distributions import Distribution
from torchrl.modules import IndependentNormal
from torchrl.objectives.common import LossModule
from torchrl.objectives.utils import distance_loss, ValueEstimators, dispatch_value_estimator

from torchrl_depeff.modules.actors import GaussianPolicyNet
from torchrl_depeff.modules.distributions import (
    diagonal_gaussian_params,
    policy_entropy,
    policy_kl,
)
from torchrl_depeff.optim.fisher import double_backward_fvp, gauss_newton_fvp, mlp_gaussian_fvp
from torchrl_depeff.objectives._keys import LazyKeys

__all__ = ["TRPOLoss", "trpo_step", "KL_TO_REFERENCE_MODES"]

KL_TO_REFERENCE_MODES = ("surrogate", "reward")
_REDUCTIONS = ("mean", "sum", "none")
_WEIGHT_NORMALIZATIONS = ("weights", "batch")
_FISHER = ("auto", "mlp", "gauss_newton", "double_backward")


def _check_coeff(name: str, value: Any, *, allow_none: bool = False) -> float | None:
    if value is None and allow_none:
        return None
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not value >= 0 or value == float("inf"):
        raise ValueError(f"{name} must be a finite number >= 0, got {value!r}")
    return float(value)


def _squeeze_feature(x: torch.Tensor, batch_dims: int) -> torch.Tensor:
    """``[*B, 1]`` -> ``[*B]`` (static shape check, no host sync)."""
    if x.ndim == batch_dims + 1 and x.shape[-1] == 1:
        return x.squeeze(-1)
    return x


class TRPOLoss(LazyKeys, LossModule):
    r"""TRPO surrogate objective, KL trust region and BREMEN's explicit-KL ablation.

    Presented in TRPO (https://arxiv.org/abs/1502.05477) and used by BREMEN
    (https://arxiv.org/abs/2006.03647, eq. (4)) and MUSBO (https://arxiv.org/abs/2102.11448,
    eq. (13), see :class:`~torchrl_depeff.objectives.UncertaintyWeightedTRPOLoss`):

    .. math::
        \mathcal{L} = -\mathbb{E}\Big[\frac{\pi_\theta(a|s)}{\pi_{\theta_k}(a|s)} A(s, a)\Big],
        \qquad \text{s.t. } \mathbb{E}_s\big[\mathrm{KL}(\pi_\theta(\cdot|s)\,\|\,\pi_{\theta_k}(\cdot|s))\big] \le \delta.

    The old policy :math:`\pi_{\theta_k}` is rebuilt from the distribution parameters stored at
    rollout time with ``actor_network.build_dist_from_params`` (the keys the actor's
    distribution module reads, e.g. ``"loc"``/``"scale"``), so any TorchRL distribution works
    (``IndependentNormal``, ``TanhNormal``, ...); the old log-prob is read from
    ``sample_log_prob``. The loss is meant to be minimised by a trust-region step
    (:func:`trpo_step` with :class:`~torchrl_depeff.optim.ConjugateGradientTrustRegion`), not by
    a first-order optimiser.

    **KL direction and estimator.** :meth:`kl` and the ``"kl"`` diagnostic use
    ``KL(pi_theta || pi_theta_k)``, the direction written in BREMEN eq. (4) (TRPO writes
    ``KL(pi_old || pi)``; both have the same value, gradient (zero) and Hessian at
    ``theta = theta_k``, so the natural-gradient step is the same and only the line-search check
    differs at third order). Closed form when torch registers one for the pair, otherwise a
    Monte-Carlo estimate with ``samples_mc_kl`` reparameterised draws from ``pi_theta``
    (:func:`~torchrl_depeff.modules.distributions.policy_kl`; e.g. ``TanhNormal``). The
    Fisher-vector products of the step are exact either way
    (:meth:`make_fisher_vector_product`).

    **Explicit KL to a reference policy** (BREMEN sec. 5.3, ``kl_to_reference_coef = alpha > 0``),
    two readings selected by ``kl_to_reference_mode``:

    * ``"surrogate"`` (eq. (6) read literally): the surrogate becomes
      ``E[ratio * (A - alpha KL(pi_theta(.|s) || pi_ref(.|s)))]``; the penalty part is returned as
      ``"loss_kl_reference" = alpha * E[ratio * KL(pi_theta || pi_ref)]`` (both factors
      differentiable).
    * ``"reward"`` (BREMEN's reference code, "KL penalty on value"): the per-step
      ``KL(pi_theta_k(.|s_t) || pi_ref(.|s_t))`` on the rollout states is subtracted, times
      ``alpha``, from ``("next", "reward")`` before the value estimator computes the advantages
      (:meth:`penalize_reward`); no extra loss term. The advantage must then come from this loss
      (:meth:`compute_advantage`, or :meth:`penalize_reward` before your own estimator).

    The reference (behaviour-cloned) actor is deep-copied and frozen at construction.

    **Advantages.** Taken from ``advantage`` if present, otherwise computed with the value
    estimator (GAE, ``gamma=0.99, lmbda=0.95`` by default, BREMEN Table 4; change them only with
    :meth:`make_value_estimator`) from the critic with detached parameters. With
    ``normalize_advantage`` they are standardised over the batch.

    **Per-sample weights.** With the ``sample_weight`` key set (``set_keys``), the surrogate of
    each sample is weighted by that (detached) entry through
    ``_reduce_loss(..., weights=w)``: ``sum(w l) / sum(w)`` for ``reduction="mean"`` (TorchRL's
    convention, ``sample_weight_normalization="weights"``) or ``sum(w l) / n``
    (``"batch"``, an expectation of the weighted surrogate as MUSBO eq. (13) writes it). A
    ``sample_weight_module`` (e.g. :class:`~torchrl_depeff.objectives.uw_trpo.UncertaintyWeight`)
    can compute the weights from the batch inside :meth:`forward`. The KL is never weighted.

    **No host synchronisation in** :meth:`forward`: input validation (keys, shapes, finite
    values) is :meth:`check_inputs`, called once per step by :func:`trpo_step`.

    Args:
        actor_network (ProbabilisticTensorDictSequential): stochastic policy with ``get_dist``
            and ``build_dist_from_params`` (e.g. a :class:`~torchrl.modules.ProbabilisticActor`,
            :func:`~torchrl_depeff.modules.actors.make_gaussian_actor`).
        critic_network (TensorDictModule, optional): state-value module writing the ``value`` key
            (e.g. :class:`~torchrl_depeff.modules.baselines.LinearFeatureBaseline` or a
            :class:`~torchrl.modules.ValueOperator`).

    Keyword Args:
        entropy_coeff (float): entropy bonus weight; ``> 0`` adds ``"loss_entropy"``. Defaults to 0.
        critic_coeff (float, optional): weight of the critic regression ``"loss_critic"``
            (``loss_critic_type`` distance to ``value_target``); ``None`` adds no critic loss
            (BREMEN fits its linear baseline by least squares). Defaults to ``None``.
        loss_critic_type (str): ``"l2"``, ``"l1"`` or ``"smooth_l1"``. Defaults to ``"l2"``.
        normalize_advantage (bool): standardise advantages. Defaults to ``True``.
        reduction (str): ``"mean"``, ``"sum"`` or ``"none"``. Defaults to ``"mean"``.
        kl_to_reference_coef (float): ``alpha`` of the explicit KL, ``>= 0``. Defaults to 0.
        reference_actor (ProbabilisticTensorDictSequential, optional): reference policy; required
            when ``kl_to_reference_coef > 0``.
        kl_to_reference_mode (str): ``"surrogate"`` or ``"reward"`` (see above). Defaults to
            ``"surrogate"``.
        samples_mc_kl (int): Monte-Carlo draws per state for KLs without a closed form.
            Defaults to ``16``.
        samples_mc_entropy (int): Monte-Carlo draws per state for entropies without a closed
            form. Defaults to ``1``.
        sample_weight_module (TensorDictModuleBase, optional): writes the ``sample_weight`` entry
            from the batch (run under ``no_grad`` on a copy). Defaults to ``None``.
        sample_weight_normalization (str): ``"weights"`` or ``"batch"`` (see above). Defaults to
            ``"weights"``.
        entropy_coef (float, deprecated): old name of ``entropy_coeff``.

    Output keys (``out_keys``): ``"loss_objective"``, the detached diagnostics ``"kl"``,
    ``"kl_approx"`` (``mean(log pi_k - log pi_theta)``), ``"ESS"`` (effective sample size of
    the ratios over the batch size; ``"ess"`` is the same tensor under its former name),
    ``"entropy"``, and when configured ``"loss_entropy"``, ``"loss_critic"``,
    ``"loss_kl_reference"``, ``"kl_reference"`` and the mean of the sample weights (under the
    last name of the weight key).

    Examples:
        >>> from torchrl_depeff.objectives.trpo import TRPOLoss
        >>> from tensordict import TensorDict
        >>> from torchrl_depeff.modules.actors import make_gaussian_actor
        >>> actor = make_gaussian_actor(3, 2, num_cells=(8,))
        >>> with torch.no_grad():
        ...     td = actor(TensorDict(observation=torch.randn(10, 3), batch_size=[10]))
        >>> td["advantage"] = torch.randn(10, 1)
        >>> loss = TRPOLoss(actor)
        >>> out = loss(td)
        >>> sorted(out.keys())
        ['ESS', 'entropy', 'ess', 'kl', 'kl_approx', 'loss_objective']
        >>> float(out["kl"]), round(float(out["ESS"]), 4)
        (0.0, 1.0)
    """

    @dataclass
    class _AcceptedKeys:
        """Tensordict keys read by :class:`TRPOLoss` (change them with :meth:`set_keys`).

        Attributes:
            advantage: advantage, ``[*B, 1]``. Defaults to ``"advantage"``.
            value_target: value target written by the estimator. Defaults to ``"value_target"``.
            value: critic output. Defaults to ``"state_value"``.
            action: action taken. Defaults to the actor's sample key (``"action"``).
            sample_log_prob: old log-prob, ``[*B]``. Defaults to the actor's log-prob key
                (``"action_log_prob"``).
            reward, done, terminated: for the value estimator (under ``"next"``).
            sample_weight: per-sample surrogate weight ``[*B]`` or ``[*B, 1]``; ``None``: none.
            kl_to_reference: per-step ``KL(pi_k || pi_ref)`` written under ``"next"`` by
                :meth:`penalize_reward` (``kl_to_reference_mode="reward"``). Defaults to
                ``"kl_to_reference"``.
        """

        advantage: NestedKey = "advantage"
        value_target: NestedKey = "value_target"
        value: NestedKey = "state_value"
        action: NestedKey = "action"
        sample_log_prob: NestedKey = "action_log_prob"
        reward: NestedKey = "reward"
        done: NestedKey = "done"
        terminated: NestedKey = "terminated"
        sample_weight: NestedKey | None = None
        kl_to_reference: NestedKey = "kl_to_reference"

    tensor_keys: _AcceptedKeys
    default_keys = _AcceptedKeys
    default_value_estimator = ValueEstimators.GAE
    SUPPORTED_VALUE_ESTIMATORS = (
        ValueEstimators.TD0,
        ValueEstimators.TD1,
        ValueEstimators.TDLambda,
        ValueEstimators.GAE,
    )

    actor_network: TensorDictModule
    critic_network: TensorDictModule
    actor_network_params: TensorDictParams
    critic_network_params: TensorDictParams
    target_actor_network_params: TensorDictParams
    target_critic_network_params: TensorDictParams
    reference_actor: TensorDictModuleBase
    sample_weight_module: TensorDictModuleBase
    entropy_coeff: torch.Tensor
    critic_coeff: torch.Tensor
    kl_to_reference_coef: torch.Tensor

    def __init__(
        self,
        actor_network: TensorDictModuleBase,
        critic_network: TensorDictModuleBase | None = None,
        *,
        entropy_coeff: float = 0.0,
        critic_coeff: float | None = None,
        loss_critic_type: str = "l2",
        normalize_advantage: bool = True,
        reduction: str = "mean",
        kl_to_reference_coef: float = 0.0,
        reference_actor: TensorDictModuleBase | None = None,
        kl_to_reference_mode: str = "surrogate",
        samples_mc_kl: int = 16,
        samples_mc_entropy: int = 1,
        sample_weight_module: TensorDictModuleBase | None = None,
        sample_weight_normalization: str = "weights",
        entropy_coef: float | None = None,
    ) -> None:
        if entropy_coef is not None:
            warnings.warn(
                "TRPOLoss(entropy_coef=...) is deprecated, use entropy_coeff=... (TorchRL's name)",
                FutureWarning, stacklevel=2,
            )
            entropy_coeff = entropy_coef
        if not hasattr(actor_network, "get_dist") or not hasattr(actor_network, "build_dist_from_params"):
            raise TypeError(
                "actor_network must expose get_dist and build_dist_from_params (a ProbabilisticActor / "
                f"ProbabilisticTensorDictSequential), got {type(actor_network).__name__}"
            )
        if reduction not in _REDUCTIONS:
            raise ValueError(f"reduction must be one of {_REDUCTIONS}, got {reduction!r}")
        entropy_coeff = _check_coeff("entropy_coeff", entropy_coeff)
        critic_coeff = _check_coeff("critic_coeff", critic_coeff, allow_none=True)
        kl_to_reference_coef = _check_coeff("kl_to_reference_coef", kl_to_reference_coef)
        if kl_to_reference_mode not in KL_TO_REFERENCE_MODES:
            raise ValueError(
                f"kl_to_reference_mode must be one of {KL_TO_REFERENCE_MODES}, got {kl_to_reference_mode!r}"
            )
        if kl_to_reference_coef > 0 and reference_actor is None:
            raise ValueError(
                f"kl_to_reference_coef={kl_to_reference_coef} > 0 requires a reference_actor"
            )
        if reference_actor is not None and not hasattr(reference_actor, "get_dist"):
            raise TypeError(
                f"reference_actor must expose get_dist, got {type(reference_actor).__name__}"
            )
        if critic_coeff is not None and critic_network is None:
            raise ValueError(f"critic_coeff={critic_coeff} needs a critic_network")
        if loss_critic_type not in ("l1", "l2", "smooth_l1"):
            raise ValueError(f"loss_critic_type must be 'l1', 'l2' or 'smooth_l1', got {loss_critic_type!r}")
        for name, value in (("samples_mc_kl", samples_mc_kl), ("samples_mc_entropy", samples_mc_entropy)):
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be an int >= 1, got {value!r}")
        if sample_weight_normalization not in _WEIGHT_NORMALIZATIONS:
            raise ValueError(
                f"sample_weight_normalization must be one of {_WEIGHT_NORMALIZATIONS}, "
                f"got {sample_weight_normalization!r}"
            )
        if sample_weight_module is not None and not isinstance(sample_weight_module, torch.nn.Module):
            raise TypeError(
                f"sample_weight_module must be a TensorDictModuleBase, got {type(sample_weight_module).__name__}"
            )
        self._in_keys = None
        self._out_keys = None
        super().__init__()
        self.convert_to_functional(actor_network, "actor_network")
        if critic_network is not None:
            self.convert_to_functional(critic_network, "critic_network")
        else:
            self.critic_network = None
            self.critic_network_params = None
            self.target_critic_network_params = None
        if reference_actor is not None:
            reference_actor = copy.deepcopy(reference_actor)
            reference_actor.requires_grad_(False)
        self.reference_actor = reference_actor
        self.sample_weight_module = sample_weight_module
        self.register_coeff_buffer("entropy_coeff", entropy_coeff)
        self.register_coeff_buffer("critic_coeff", critic_coeff)
        self.register_coeff_buffer("kl_to_reference_coef", kl_to_reference_coef)
        # structure is fixed at construction (no tensor-valued branching in forward)
        self._has_entropy = entropy_coeff > 0
        self._has_critic_loss = critic_coeff is not None
        self._has_kl_reference = kl_to_reference_coef > 0
        self.kl_to_reference_mode = kl_to_reference_mode
        self.loss_critic_type = loss_critic_type
        self.normalize_advantage = bool(normalize_advantage)
        self.reduction = reduction
        self.samples_mc_kl = int(samples_mc_kl)
        self.samples_mc_entropy = int(samples_mc_entropy)
        self.sample_weight_normalization = sample_weight_normalization
        try:  # read the action / log-prob keys from the actor, as TorchRL's PPOLoss does
            self.set_keys(action=actor_network.dist_sample_keys[0], sample_log_prob=actor_network.log_prob_keys[0])
        except (AttributeError, IndexError):
            pass

    # ------------------------------------------------------------------ keys
    def _dist_module(self) -> ProbabilisticTensorDictModule:
        for module in reversed(list(self.actor_network.modules())):
            if isinstance(module, ProbabilisticTensorDictModule):
                return module
        raise RuntimeError("the actor holds no ProbabilisticTensorDictModule")

    def _set_in_keys(self) -> None:
        k = self.tensor_keys
        keys: list[NestedKey] = [*self.actor_network.in_keys, *self._dist_module().in_keys, k.action, k.sample_log_prob]
        if self.critic_network is not None:
            keys += list(self.critic_network.in_keys)
            keys += [("next", key) for key in self.critic_network.in_keys]
            keys += [("next", k.reward), ("next", k.done), ("next", k.terminated)]
        else:
            keys.append(k.advantage)
        if k.sample_weight is not None and self.sample_weight_module is None:
            keys.append(k.sample_weight)
        if self.sample_weight_module is not None:
            keys += list(self.sample_weight_module.in_keys)
        if self._has_kl_reference and self.kl_to_reference_mode == "reward":
            keys.append(("next", k.reward))
        self._in_keys = list(dict.fromkeys(keys))

    def _default_out_keys(self) -> list[NestedKey]:
        keys: list[NestedKey] = ["loss_objective", "kl", "kl_approx", "ESS", "ess", "entropy"]
        if self._has_entropy:
            keys.append("loss_entropy")
        if self._has_critic_loss:
            keys.append("loss_critic")
        if self._has_kl_reference:
            if self.kl_to_reference_mode == "surrogate":
                keys.append("loss_kl_reference")
            keys.append("kl_reference")
        if self.tensor_keys.sample_weight is not None:
            keys.append(self._weight_diagnostic_key())
        return keys

    def _weight_diagnostic_key(self) -> str:
        key = self.tensor_keys.sample_weight
        return key if isinstance(key, str) else key[-1]

    def _forward_value_estimator_keys(self, **kwargs: Any) -> None:
        if getattr(self, "_value_estimator", None) is not None:
            self._value_estimator.set_keys(**self._estimator_keys())
        self._in_keys = None
        self._out_keys = None

    def _estimator_keys(self) -> dict[str, NestedKey]:
        k = self.tensor_keys
        return {
            "advantage": k.advantage, "value": k.value, "value_target": k.value_target,
            "reward": k.reward, "done": k.done, "terminated": k.terminated,
        }

    # ------------------------------------------------------------------ value estimation
    def make_value_estimator(self, value_type: ValueEstimators | None = None, **hyperparams: Any) -> TRPOLoss:
        """Build the advantage estimator (GAE, ``gamma=0.99, lmbda=0.95`` by default).

        The only place where ``gamma`` and ``lmbda`` are set.

        Examples:
            >>> from torchrl.objectives.utils import ValueEstimators
            >>> from torchrl_depeff.objectives.trpo import TRPOLoss
            >>> from torchrl_depeff.modules.actors import make_gaussian_actor
            >>> loss = TRPOLoss(make_gaussian_actor(3, 2, num_cells=(8,)))
            >>> loss.make_value_estimator(ValueEstimators.GAE, gamma=0.9, lmbda=0.5).value_type.name
            'GAE'
        """
        if value_type is None:
            value_type = self.default_value_estimator
        if value_type == ValueEstimators.GAE:
            hyperparams = {"gamma": 0.99, "lmbda": 0.95, **hyperparams}
        value_type, hp = self._prepare_value_estimator_kwargs(value_type, **hyperparams)
        if value_type is None:
            return self
        dispatch_value_estimator(
            self, value_type, supported=self.SUPPORTED_VALUE_ESTIMATORS,
            tensor_keys=self._estimator_keys(), **hp,
        )
        return self

    @torch.no_grad()
    def penalize_reward(self, tensordict: TensorDictBase) -> TensorDictBase:
        r"""Shallow copy with ``("next", reward) - alpha * KL(pi_k(.|s_t) || pi_ref(.|s_t))``.

        BREMEN's reference-code reading of sec. 5.3 ("KL penalty on value",
        ``kl_to_reference_mode="reward"``): the per-step KL between the rollout policy (rebuilt
        from the stored distribution parameters) and the reference policy on the rollout states
        ``s_t`` is written to ``("next", kl_to_reference)`` ``[*B, 1]`` and, times
        ``kl_to_reference_coef``, subtracted from the reward of the same step. Idempotent: a batch
        that already holds the KL entry is returned unchanged.

        Examples:
            >>> from tensordict import TensorDict
            >>> from torchrl_depeff.modules.actors import make_gaussian_actor
            >>> from torchrl_depeff.objectives.trpo import TRPOLoss
            >>> actor, ref = make_gaussian_actor(3, 2, num_cells=(8,)), make_gaussian_actor(3, 2, num_cells=(8,))
            >>> with torch.no_grad():
            ...     td = actor(TensorDict(observation=torch.randn(4, 5, 3), batch_size=[4, 5]))
            >>> td["next", "reward"] = torch.zeros(4, 5, 1)
            >>> loss = TRPOLoss(actor, kl_to_reference_coef=0.5, reference_actor=ref, kl_to_reference_mode="reward")
            >>> out = loss.penalize_reward(td)
            >>> torch.allclose(out["next", "reward"], -0.5 * out["next", "kl_to_reference"]), bool((out["next", "reward"] < 0).all())
            (True, True)
        """
        if self.reference_actor is None:
            raise RuntimeError("penalize_reward needs a reference_actor (kl_to_reference_coef > 0)")
        k = self.tensor_keys
        td = tensordict.copy()
        kl_key = ("next", k.kl_to_reference)
        if kl_key in td.keys(include_nested=True):
            return td
        old = self._old_dist(td)
        ref = self.reference_actor.get_dist(td.copy())
        kl = policy_kl(old, ref, num_samples=self.samples_mc_kl)  # [*B]
        reward = td.get(("next", k.reward))
        kl = kl.reshape(reward.shape).to(reward.dtype)
        td.set(kl_key, kl)
        td.set(("next", k.reward), reward - self.kl_to_reference_coef.to(reward.dtype) * kl)
        return td

    def compute_advantage(self, tensordict: TensorDictBase) -> TensorDictBase:
        """Shallow copy of ``tensordict`` holding the advantage (and value target); input untouched.

        Uses the stored ``advantage`` if present, otherwise the value estimator with the
        critic's detached parameters. With ``kl_to_reference_mode="reward"`` the rewards are
        penalised first (:meth:`penalize_reward`). Raises ``KeyError`` naming the advantage key
        when there is neither an advantage nor a critic.
        """
        k = self.tensor_keys
        td = tensordict.copy()
        keys = td.keys(include_nested=True)
        reward_mode = self._has_kl_reference and self.kl_to_reference_mode == "reward"
        if reward_mode and ("next", k.kl_to_reference) not in keys:
            if k.advantage in keys:
                raise ValueError(
                    f"kl_to_reference_mode='reward' but the batch already holds an advantage {k.advantage!r} "
                    f"computed without the KL penalty (no ('next', {k.kl_to_reference!r}) entry): drop it and let "
                    "the loss compute it, or call loss.penalize_reward(batch) before your value estimator"
                )
            td = self.penalize_reward(td)
            keys = td.keys(include_nested=True)
        if k.advantage in keys:
            return td
        if self.critic_network is None:
            raise KeyError(
                f"advantage key {k.advantage!r} not found in the tensordict and no critic_network was given"
            )
        with torch.no_grad():
            self.value_estimator(
                td,
                params=self.critic_network_params.detach(),
                target_params=self.target_critic_network_params,
            )
        return td

    # ------------------------------------------------------------------ distributions
    def _old_dist(self, td: TensorDictBase) -> Distribution:
        dist_keys = self._dist_module().in_keys
        keys = td.keys(include_nested=True)
        missing = [key for key in dist_keys if key not in keys]
        if missing:
            raise KeyError(
                f"TRPOLoss: the old policy's distribution parameters {missing} were not found in the batch "
                "(store the actor's distribution parameters at rollout time)"
            )
        return self.actor_network.build_dist_from_params(td)

    def _new_dist(self, td: TensorDictBase) -> Distribution:
        with self.actor_network_params.to_module(self.actor_network):
            return self.actor_network.get_dist(td)

    def kl(self, tensordict: TensorDictBase) -> torch.Tensor:
        """Differentiable mean ``KL(pi_theta || pi_theta_k)`` (BREMEN eq. (4) constraint).

        ``pi_theta_k`` is rebuilt from the stored distribution parameters; the KL is summed over
        action dimensions and averaged over the batch.

        Examples:
            >>> from torchrl_depeff.objectives.trpo import TRPOLoss
            >>> from tensordict import TensorDict
            >>> from torchrl_depeff.modules.actors import make_gaussian_actor
            >>> actor = make_gaussian_actor(3, 2, num_cells=(8,))
            >>> with torch.no_grad():
            ...     td = actor(TensorDict(observation=torch.randn(4, 3), batch_size=[4]))
            >>> float(TRPOLoss(actor).kl(td).detach())
            0.0
        """
        td = tensordict.copy()
        old = self._old_dist(td)
        new = self._new_dist(td)
        return policy_kl(new, old, num_samples=self.samples_mc_kl).mean()

    # ------------------------------------------------------------------ loss terms
    def _advantage(self, td: TensorDictBase) -> torch.Tensor:
        advantage = _squeeze_feature(td.get(self.tensor_keys.advantage), td.batch_dims).detach()
        if self.normalize_advantage and advantage.numel() > 1:
            advantage = (advantage - advantage.mean()) / (advantage.std() + 1e-8)
        return advantage

    def _weights(self, td: TensorDictBase) -> torch.Tensor | None:
        key = self.tensor_keys.sample_weight
        if key is None:
            return None
        if self.sample_weight_module is not None and key not in td.keys(include_nested=True):
            with torch.no_grad():
                self.sample_weight_module(td)
        return _squeeze_feature(td.get(key), td.batch_dims).detach()

    def _terms(self, tensordict: TensorDictBase, *, diagnostics: bool) -> tuple[TensorDict, torch.Tensor]:
        """Loss terms (and diagnostics) from one actor pass; returns ``(out, per-state kl)``."""
        k = self.tensor_keys
        td = self.compute_advantage(tensordict)  # shallow copy, input untouched
        old = self._old_dist(td)  # read before the actor overwrites the parameters in its copy
        advantage = self._advantage(td)
        weights = self._weights(td)
        new = self._new_dist(td)
        old_log_prob = _squeeze_feature(td.get(k.sample_log_prob), td.batch_dims).detach()
        log_prob = new.log_prob(td.get(k.action))
        log_weight = log_prob - old_log_prob
        ratio = log_weight.exp()
        surrogate = ratio * advantage  # BREMEN eq. (4) objective
        out = TensorDict({}, batch_size=[])
        if weights is None:
            out.set("loss_objective", self._reduce_loss(-surrogate, td))
        elif self.sample_weight_normalization == "weights":
            out.set("loss_objective", self._reduce_loss(-surrogate, td, weights=weights.to(surrogate.dtype)))
        else:  # MUSBO eq. (13): E[U * ratio * A]
            out.set("loss_objective", self._reduce_loss(-surrogate * weights, td))
        kl = policy_kl(new, old, num_samples=self.samples_mc_kl)  # KL(pi_theta || pi_theta_k), eq. (4)
        if self._has_entropy or diagnostics:
            entropy = policy_entropy(new, num_samples=self.samples_mc_entropy)
            if self._has_entropy:
                out.set("loss_entropy", self._reduce_loss(-self.entropy_coeff * entropy, td))
        if self._has_kl_reference:
            if self.kl_to_reference_mode == "surrogate":
                with torch.no_grad():
                    ref = self.reference_actor.get_dist(td.copy())
                kl_ref = policy_kl(new, ref, num_samples=self.samples_mc_kl)  # KL(pi_theta || pi_ref), eq. (6)
                out.set("loss_kl_reference", self._reduce_loss(self.kl_to_reference_coef * ratio * kl_ref, td))
                if diagnostics:
                    out.set("kl_reference", kl_ref.detach().mean())
            elif diagnostics:
                out.set("kl_reference", td.get(("next", k.kl_to_reference)).detach().mean())
        if self._has_critic_loss and diagnostics:
            out.set("loss_critic", self._critic_loss(td))
        if diagnostics:
            n = log_weight.numel()
            lw = log_weight.detach().reshape(-1)
            out.set("kl", kl.detach().mean())
            out.set("kl_approx", (-lw).mean())
            ess = (2 * lw.logsumexp(0) - (2 * lw).logsumexp(0)).exp() / n  # (sum r)^2 / sum r^2 / n
            out.set("ESS", ess)
            out.set("ess", ess)  # former name
            out.set("entropy", entropy.detach().mean())
            if weights is not None:
                out.set(self._weight_diagnostic_key(), weights.mean())
        return out, kl

    def _critic_loss(self, td: TensorDictBase) -> torch.Tensor:
        k = self.tensor_keys
        target = td.get(k.value_target)
        with self.critic_network_params.to_module(self.critic_network):
            value = self.critic_network(td.select(*self.critic_network.in_keys, strict=False).copy()).get(k.value)
        return self._reduce_loss(
            self.critic_coeff * distance_loss(target, value, loss_function=self.loss_critic_type).squeeze(-1), td
        )

    @dispatch
    def forward(self, tensordict: TensorDictBase) -> TensorDictBase:
        """Loss terms and detached diagnostics in a new TensorDict; the input is not modified."""
        out, _ = self._terms(tensordict, diagnostics=True)
        return out

    def loss_and_kl(self, tensordict: TensorDictBase) -> tuple[torch.Tensor, torch.Tensor]:
        """Sum of the actor's ``loss_*`` terms and the mean KL, from one actor pass.

        What a TRPO line-search trial evaluates (``loss_critic`` is left out: it does not depend
        on the actor).

        Examples:
            >>> from tensordict import TensorDict
            >>> from torchrl_depeff.modules.actors import make_gaussian_actor
            >>> from torchrl_depeff.objectives.trpo import TRPOLoss
            >>> actor = make_gaussian_actor(3, 2, num_cells=(8,))
            >>> with torch.no_grad():
            ...     td = actor(TensorDict(observation=torch.randn(6, 3), batch_size=[6]))
            >>> td["advantage"] = torch.randn(6, 1)
            >>> loss, kl = TRPOLoss(actor).loss_and_kl(td)
            >>> loss.shape, float(kl)
            (torch.Size([]), 0.0)
        """
        if self.reduction == "none":
            raise ValueError("loss_and_kl needs a scalar loss; got reduction='none'")
        out, kl = self._terms(tensordict, diagnostics=False)
        total = sum(v for key, v in out.items() if key.startswith("loss_"))
        return total, kl.mean()

    # ------------------------------------------------------------------ validation
    def check_inputs(self, tensordict: TensorDictBase) -> None:
        """Raise a clear error for a batch :meth:`forward` cannot use (one host sync per call).

        Checks that the action, old log-prob, old distribution parameters, actor inputs and the
        advantage (or the critic's inputs and rewards) are present, shaped ``[*B, ...]``, and finite.

        Raises:
            KeyError: a key is missing (named).
            ValueError: a shape does not match the batch, or an entry holds NaN/inf (named).
        """
        if not isinstance(tensordict, TensorDictBase):
            raise TypeError(f"expected a TensorDictBase, got {type(tensordict).__name__}")
        k = self.tensor_keys
        keys = tensordict.keys(include_nested=True)
        needed = [k.action, k.sample_log_prob, *self._dist_module().in_keys, *self.actor_network.in_keys]
        if k.advantage in keys:
            needed.append(k.advantage)
        elif self.critic_network is not None:
            needed += [("next", k.reward), ("next", k.done), ("next", k.terminated)]
        else:
            raise KeyError(f"advantage key {k.advantage!r} not found in the tensordict and no critic_network was given")
        if k.sample_weight is not None and self.sample_weight_module is None:
            needed.append(k.sample_weight)
        if self.sample_weight_module is not None:
            needed += list(self.sample_weight_module.in_keys)
        missing = [key for key in dict.fromkeys(needed) if key not in keys]
        if missing:
            raise KeyError(f"TRPOLoss: keys {missing} not found in the input tensordict")
        batch = tuple(tensordict.batch_size)
        if tensordict.batch_dims == 0:
            raise ValueError("TRPOLoss needs a batch of samples, got a tensordict with batch_size []")
        flags, names = [], []
        for key in dict.fromkeys(needed):
            value = tensordict.get(key)
            if tuple(value.shape[: len(batch)]) != batch:
                raise ValueError(f"entry {key!r} of shape {tuple(value.shape)} does not match the batch {batch}")
            if value.is_floating_point():
                flags.append(torch.isfinite(value).all())
                names.append(key)
        if flags:
            finite = torch.stack(flags).tolist()
            bad = [name for name, ok in zip(names, finite) if not ok]
            if bad:
                raise ValueError(f"TRPOLoss: entries {bad} contain NaN or inf values")

    # ------------------------------------------------------------------ trust region
    def _policy_net(self) -> tuple[GaussianPolicyNet, NestedKey] | None:
        """``(net, observation key)`` if the actor is :func:`make_gaussian_actor`'s structure."""
        modules = list(getattr(self.actor_network, "module", []))
        if len(modules) != 2 or not isinstance(modules[0], TensorDictModule):
            return None
        net, dist_module = modules[0].module, modules[1]
        if not isinstance(net, GaussianPolicyNet) or not isinstance(dist_module, ProbabilisticTensorDictModule):
            return None
        if dist_module.distribution_class is not IndependentNormal or dist_module.distribution_kwargs:
            return None
        if list(modules[0].out_keys) != list(dist_module.in_keys) or len(modules[0].in_keys) != 1:
            return None
        return net, modules[0].in_keys[0]

    def make_fisher_vector_product(
        self,
        tensordict: TensorDictBase,
        params: list[torch.Tensor],
        *,
        damping: float = 0.0,
        method: str = "auto",
    ) -> Callable[[torch.Tensor], torch.Tensor]:
        """``v -> (F + damping I) v`` at the current actor parameters (flat over ``params``).

        ``method``: ``"mlp"`` (:func:`~torchrl_depeff.optim.fisher.mlp_gaussian_fvp`, actors
        from :func:`~torchrl_depeff.modules.actors.make_gaussian_actor`), ``"gauss_newton"``
        (:func:`~torchrl_depeff.optim.fisher.gauss_newton_fvp`, any actor whose distribution is a
        fixed bijection of a diagonal Gaussian, e.g. ``TanhNormal``), ``"double_backward"``
        (Hessian of :meth:`kl`), or ``"auto"``: the first that applies, in that order. The
        closed forms equal the Hessian of the KL at ``theta = theta_k`` (the rollout policy).
        """
        if method not in _FISHER:
            raise ValueError(f"method must be one of {_FISHER}, got {method!r}")
        td = tensordict.copy()
        if method in ("auto", "mlp"):
            found = self._policy_net()
            fvp = None
            if found is not None:
                net, obs_key = found
                with self.actor_network_params.to_module(self.actor_network):
                    fvp = mlp_gaussian_fvp(net, td.get(obs_key), params, damping=damping)
            if fvp is not None:
                return fvp
            if method == "mlp":
                raise ValueError(
                    "fisher='mlp' needs an actor built by make_gaussian_actor whose parameters are the "
                    "optimised ones; use fisher='gauss_newton' or 'auto'"
                )
        if method in ("auto", "gauss_newton"):
            new = self._new_dist(td)
            core = diagonal_gaussian_params(new)
            if core is not None:
                return gauss_newton_fvp(core[0], core[1], params, damping=damping)
            if method == "gauss_newton":
                raise ValueError(
                    f"fisher='gauss_newton' needs a Gaussian (or TanhNormal) policy, got {type(new).__name__}"
                )
        return double_backward_fvp(self.kl(td), params, damping=damping)

    def trpo_closures(self, tensordict: TensorDictBase, optimizer: Any, *, check_inputs: bool = True) -> dict[str, Callable]:
        """The closures :meth:`ConjugateGradientTrustRegion.step` takes for one TRPO update.

        Checks that the optimiser updates this loss's actor parameters, validates the batch once
        (:meth:`check_inputs`), computes the advantages once, and returns ``loss_fn`` (sum of the
        actor's ``loss_*`` terms), ``kl_fn`` (:meth:`kl`), ``fvp_fn``
        (:meth:`make_fisher_vector_product` with the optimiser's ``fisher`` and ``damping``) and
        ``loss_and_kl_fn`` (:meth:`loss_and_kl`, one actor pass per line-search trial).
        """
        if self.reduction == "none":
            raise ValueError("trpo_step needs a scalar loss; got reduction='none'")
        own = {id(p) for p in self.actor_network_params.values(include_nested=True, leaves_only=True)}
        params = getattr(optimizer, "params", None)
        if params is None:
            raise TypeError(f"optimizer must be a ConjugateGradientTrustRegion, got {type(optimizer).__name__}")
        foreign = [tuple(p.shape) for p in params if id(p) not in own]
        if foreign:
            raise ValueError(
                f"the optimizer updates {len(foreign)} of its {len(params)} tensors (shapes {foreign[:4]}) that are "
                "not this loss's actor_network_params, so its steps would not move the policy the loss evaluates: "
                "build it with ConjugateGradientTrustRegion(loss, ...) (or loss.actor_network_params)"
            )
        if check_inputs:
            self.check_inputs(tensordict)
        td = self.compute_advantage(tensordict)
        method = getattr(optimizer, "fisher", "double_backward")
        damping = optimizer.damping
        return {
            "loss_fn": lambda: self.loss_and_kl(td)[0],
            "kl_fn": lambda: self.kl(td),
            "fvp_fn": lambda: self.make_fisher_vector_product(td, params, damping=damping, method=method),
            "loss_and_kl_fn": lambda: self.loss_and_kl(td),
        }


def trpo_step(
    loss_module: TRPOLoss, optimizer: Any, tensordict: TensorDictBase, *, check_inputs: bool = True
) -> TensorDictBase:
    """One TRPO update of ``loss_module``'s actor (BREMEN eq. (4)) by ``optimizer``.

    Advantages are computed once (:meth:`TRPOLoss.compute_advantage`); the line search evaluates
    the loss and the KL in one actor pass per trial; the Fisher-vector products are the closed-form
    Gaussian ones where they apply (the optimiser's ``fisher``).

    Args:
        loss_module (TRPOLoss): the loss.
        optimizer (ConjugateGradientTrustRegion): built on ``loss_module`` (or on its
            ``actor_network_params``); other parameters raise ``ValueError``.
        tensordict (TensorDictBase): rollout batch (not modified).

    Keyword Args:
        check_inputs (bool): validate the batch first (:meth:`TRPOLoss.check_inputs`, one host
            sync). Defaults to ``True``.

    Returns:
        The optimiser's diagnostics (``kl``, ``accepted``, ``improvement``, ...).

    Examples:
        >>> from torchrl_depeff.objectives.trpo import TRPOLoss, trpo_step
        >>> from tensordict import TensorDict
        >>> from torchrl_depeff.modules.actors import make_gaussian_actor
        >>> from torchrl_depeff.optim.trust_region import ConjugateGradientTrustRegion
        >>> actor = make_gaussian_actor(3, 2, num_cells=(8,), learn_sigma=True)
        >>> with torch.no_grad():
        ...     td = actor(TensorDict(observation=torch.randn(64, 3), batch_size=[64]))
        >>> td["advantage"] = td["action"][:, :1] - td["loc"][:, :1]
        >>> loss = TRPOLoss(actor)
        >>> info = trpo_step(loss, ConjugateGradientTrustRegion(loss, max_kl=0.01), td)
        >>> bool(info["accepted"]), float(info["kl"]) <= 0.01
        (True, True)
    """
    if not isinstance(loss_module, TRPOLoss):
        raise TypeError(f"loss_module must be a TRPOLoss, got {type(loss_module).__name__}")
    if not isinstance(tensordict, TensorDictBase):
        raise TypeError(f"tensordict must be a TensorDictBase, got {type(tensordict).__name__}")
    return optimizer.step(**loss_module.trpo_closures(tensordict, optimizer, check_inputs=check_inputs))
