"""TRPO surrogate and KL (BREMEN eq. (4)) and the explicit-KL ablation (BREMEN eq. (6)).

Presented in BREMEN, Matsushima et al. 2020, https://arxiv.org/abs/2006.03647, sec. 4.2 and App. C.
"""
from __future__ import annotations

import copy
from dataclasses import dataclass

import torch
from tensordict import TensorDict, TensorDictBase, TensorDictParams
from tensordict.nn import TensorDictModule, dispatch
from tensordict.utils import NestedKey
from torch.distributions import Distribution, kl_divergence
from torchrl.modules import IndependentNormal
from torchrl.objectives.common import LossModule
from torchrl.objectives.utils import ValueEstimators, dispatch_value_estimator

__all__ = ["TRPOLoss", "trpo_step"]


class TRPOLoss(LossModule):
    r"""TRPO surrogate objective, mean KL for the trust region, and BREMEN's explicit-KL ablation.

    ``loss_objective = -E[ pi_theta(a|s) / pi_theta_k(a|s) * A(s, a) ]`` (BREMEN eq. (4)); the
    old policy ``pi_theta_k`` is rebuilt from the ``"loc"``/``"scale"`` recorded at rollout time and
    the old log-prob is read from ``"action_log_prob"``.

    **KL direction.** :meth:`kl` and the ``"kl"`` diagnostic use ``KL(pi_theta || pi_theta_k)``, the
    direction written in BREMEN eq. (4) (original TRPO uses ``KL(pi_old || pi)``; both have the same
    value, gradient (zero) and Hessian at ``theta = theta_k``, so the natural-gradient step is
    unchanged and only the line-search check differs at third order).

    **Explicit-KL ablation** (``kl_to_reference_coef > 0``, BREMEN eq. (6)): the surrogate becomes
    ``E[ratio * (A - alpha * KL(pi_theta(.|s) || pi_ref(.|s)))]``; the penalty part is returned as
    ``"loss_kl_reference" = alpha * E[ratio * KL(pi_theta || pi_ref)]`` (the ratio keeps the
    importance weighting of eq. (6); both factors are differentiable). The reference (behaviour
    cloned) actor is deep-copied and frozen at construction.

    **Advantages.** Taken from ``"advantage"`` if present, otherwise computed with the value
    estimator (GAE by default, ``gamma=0.99, lmbda=0.95``, BREMEN Table 4) from the critic under
    ``torch.no_grad`` (the critic gets no gradient from this loss; BREMEN fits a linear baseline by
    least squares, see :class:`~torchrl_depeff.modules.baselines.LinearFeatureBaseline`). With
    ``normalize_advantage`` they are standardised over the batch.

    Args:
        actor_network (ProbabilisticActor): Gaussian policy exposing ``get_dist`` and writing
            ``"loc"``/``"scale"`` (e.g. :func:`~torchrl_depeff.modules.actors.make_gaussian_actor`).
        critic_network (TensorDictModule, optional): state-value module writing ``"state_value"``.

    Keyword Args:
        entropy_coef (float): entropy bonus weight; ``> 0`` adds ``"loss_entropy"``. Defaults to 0.
        normalize_advantage (bool): standardise advantages. Defaults to ``True``.
        reduction (str): ``"mean"``, ``"sum"`` or ``"none"``. Defaults to ``"mean"``.
        kl_to_reference_coef (float): ``alpha`` of BREMEN eq. (6), ``>= 0``. Defaults to 0.
        reference_actor (ProbabilisticActor, optional): frozen reference policy; required when
            ``kl_to_reference_coef > 0``.

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
        ['entropy', 'ess', 'kl', 'loss_objective']
        >>> float(out["kl"]), round(float(out["ess"]), 4)
        (0.0, 1.0)
    """

    @dataclass
    class _AcceptedKeys:
        """Tensordict keys read by :class:`TRPOLoss` (change them with :meth:`set_keys`).

        Attributes:
            advantage: advantage, ``[*B, 1]``. Defaults to ``"advantage"``.
            value_target: value target written by the estimator. Defaults to ``"value_target"``.
            value: critic output. Defaults to ``"state_value"``.
            action: action taken. Defaults to ``"action"``.
            sample_log_prob: old log-prob, ``[*B]``. Defaults to ``"action_log_prob"``.
            loc: old policy mean. Defaults to ``"loc"``.
            scale: old policy std. Defaults to ``"scale"``.
            reward, done, terminated: for the value estimator (under ``"next"``).
        """

        advantage: NestedKey = "advantage"
        value_target: NestedKey = "value_target"
        value: NestedKey = "state_value"
        action: NestedKey = "action"
        sample_log_prob: NestedKey = "action_log_prob"
        loc: NestedKey = "loc"
        scale: NestedKey = "scale"
        reward: NestedKey = "reward"
        done: NestedKey = "done"
        terminated: NestedKey = "terminated"

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
    actor_network_params: TensorDictParams
    target_actor_network_params: TensorDictParams

    def __init__(
        self,
        actor_network: TensorDictModule,
        critic_network: TensorDictModule | None = None,
        *,
        entropy_coef: float = 0.0,
        normalize_advantage: bool = True,
        reduction: str = "mean",
        kl_to_reference_coef: float = 0.0,
        reference_actor: TensorDictModule | None = None,
    ) -> None:
        super().__init__()
        if not hasattr(actor_network, "get_dist"):
            raise TypeError(
                f"actor_network must expose get_dist (a ProbabilisticActor), got {type(actor_network).__name__}"
            )
        if reduction not in ("mean", "sum", "none"):
            raise ValueError(f"reduction must be 'mean', 'sum' or 'none', got {reduction!r}")
        if not entropy_coef >= 0:
            raise ValueError(f"entropy_coef must be >= 0, got {entropy_coef}")
        if not kl_to_reference_coef >= 0:
            raise ValueError(f"kl_to_reference_coef must be >= 0, got {kl_to_reference_coef}")
        if kl_to_reference_coef > 0 and reference_actor is None:
            raise ValueError("kl_to_reference_coef > 0 requires a reference_actor")
        if reference_actor is not None and not hasattr(reference_actor, "get_dist"):
            raise TypeError(
                f"reference_actor must expose get_dist, got {type(reference_actor).__name__}"
            )
        self.convert_to_functional(actor_network, "actor_network")
        self.critic_network = critic_network
        if reference_actor is not None:
            reference_actor = copy.deepcopy(reference_actor)
            reference_actor.requires_grad_(False)
        self.reference_actor = reference_actor
        self.entropy_coef = float(entropy_coef)
        self.normalize_advantage = bool(normalize_advantage)
        self.reduction = reduction
        self.kl_to_reference_coef = float(kl_to_reference_coef)

    @property
    def in_keys(self) -> list[NestedKey]:
        k = self.tensor_keys
        keys = [k.action, k.sample_log_prob, k.loc, k.scale, k.advantage]
        keys += [key for key in self.actor_network.in_keys if key not in keys]
        return keys

    @property
    def out_keys(self) -> list[str]:
        keys = ["loss_objective", "kl", "entropy", "ess"]
        if self.entropy_coef > 0:
            keys.append("loss_entropy")
        if self.kl_to_reference_coef > 0:
            keys += ["loss_kl_reference", "kl_reference"]
        return keys

    # ------------------------------------------------------------------ value estimation
    def make_value_estimator(self, value_type: ValueEstimators | None = None, **hyperparams):
        """Build the advantage estimator (GAE, ``gamma=0.99, lmbda=0.95`` by default).

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
            self,
            value_type,
            supported=self.SUPPORTED_VALUE_ESTIMATORS,
            tensor_keys={
                "advantage": self.tensor_keys.advantage,
                "value": self.tensor_keys.value,
                "value_target": self.tensor_keys.value_target,
                "reward": self.tensor_keys.reward,
                "done": self.tensor_keys.done,
                "terminated": self.tensor_keys.terminated,
            },
            **hp,
        )
        return self

    @property
    def critic_network(self) -> TensorDictModule | None:
        return self._critic_network

    @critic_network.setter
    def critic_network(self, value: TensorDictModule | None) -> None:
        if value is None:
            self._critic_network = None
        else:
            self.add_module("_critic_network", value)

    def compute_advantage(self, tensordict: TensorDictBase) -> TensorDictBase:
        """Return a shallow copy of ``tensordict`` holding the advantage (input untouched).

        Uses the stored ``"advantage"`` if present, otherwise the value estimator with the critic
        (no gradient). Raises ``KeyError`` naming the advantage key when neither is available.
        """
        td = tensordict.clone(False)
        key = self.tensor_keys.advantage
        if key in td.keys(include_nested=True):
            return td
        if self.critic_network is None:
            raise KeyError(
                f"advantage key {key!r} not found in the tensordict and no critic_network was given"
            )
        with torch.no_grad():
            self.value_estimator(td)
        return td

    # ------------------------------------------------------------------ distributions
    def _check_keys(self, td: TensorDictBase, names: tuple[str, ...]) -> None:
        keys = td.keys(include_nested=True)
        missing = [getattr(self.tensor_keys, n) for n in names if getattr(self.tensor_keys, n) not in keys]
        if missing:
            raise KeyError(f"TRPOLoss: keys {missing} not found in the input tensordict")

    def _old_dist(self, td: TensorDictBase) -> Distribution:
        self._check_keys(td, ("loc", "scale"))
        return IndependentNormal(td.get(self.tensor_keys.loc), td.get(self.tensor_keys.scale))

    def _new_dist(self, td: TensorDictBase) -> Distribution:
        with self.actor_network_params.to_module(self.actor_network):
            return self.actor_network.get_dist(td.clone(False))

    def _reference_dist(self, td: TensorDictBase) -> Distribution:
        with torch.no_grad():
            return self.reference_actor.get_dist(td.clone(False))

    def kl(self, tensordict: TensorDictBase) -> torch.Tensor:
        """Differentiable mean ``KL(pi_theta || pi_theta_k)`` (BREMEN eq. (4) constraint).

        ``pi_theta_k`` is built from the stored ``"loc"``/``"scale"``; the KL is summed over
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
        old = self._old_dist(tensordict)
        new = self._new_dist(tensordict)
        return kl_divergence(new, old).mean()

    # ------------------------------------------------------------------ hooks
    def _sample_weight(self, td: TensorDictBase) -> torch.Tensor | None:
        """Per-sample surrogate weight ``[*B]`` (``None`` for plain TRPO)."""
        return None

    @dispatch
    def forward(self, tensordict: TensorDictBase) -> TensorDictBase:
        keys = self.tensor_keys
        td = self.compute_advantage(tensordict)
        self._check_keys(td, ("action", "sample_log_prob", "loc", "scale"))
        old = self._old_dist(td)  # read before the actor overwrites loc/scale in its copy
        new = self._new_dist(td)

        advantage = td.get(keys.advantage)
        action = td.get(keys.action)
        old_log_prob = td.get(keys.sample_log_prob)
        if advantage.ndim == td.batch_dims + 1 and advantage.shape[-1] == 1:
            advantage = advantage.squeeze(-1)
        if old_log_prob.ndim == td.batch_dims + 1 and old_log_prob.shape[-1] == 1:
            old_log_prob = old_log_prob.squeeze(-1)
        # validation (one host sync per call): non-finite inputs would poison the CG step
        if not bool(torch.isfinite(advantage).all()):
            raise ValueError(f"non-finite values in advantage {keys.advantage!r}")
        if not bool(torch.isfinite(old_log_prob).all()):
            raise ValueError(f"non-finite values in old log-prob {keys.sample_log_prob!r}")
        advantage = advantage.detach()
        if self.normalize_advantage and advantage.numel() > 1:
            advantage = (advantage - advantage.mean()) / (advantage.std() + 1e-8)

        log_prob = new.log_prob(action)
        ratio = (log_prob - old_log_prob).exp()
        surrogate = ratio * advantage  # BREMEN eq. (4) objective
        weight = self._sample_weight(td)
        if weight is not None:
            surrogate = surrogate * weight  # MUSBO eq. (13)
        out = TensorDict(
            {"loss_objective": self._reduce_loss(-surrogate, td)}, batch_size=[]
        )
        kl = kl_divergence(new, old)  # KL(pi_theta || pi_theta_k), BREMEN eq. (4)
        entropy = new.entropy()
        out.set("kl", kl.mean().detach())
        out.set("entropy", entropy.mean().detach())
        r = ratio.detach()
        out.set("ess", (r.sum() ** 2 / r.pow(2).sum() / r.numel()))
        if self.entropy_coef > 0:
            out.set("loss_entropy", self._reduce_loss(-self.entropy_coef * entropy, td))
        if self.kl_to_reference_coef > 0:
            ref = self._reference_dist(td)
            kl_ref = kl_divergence(new, ref)  # KL(pi_theta || pi_beta), BREMEN eq. (6)
            out.set(
                "loss_kl_reference",
                self._reduce_loss(self.kl_to_reference_coef * ratio * kl_ref, td),
            )
            out.set("kl_reference", kl_ref.mean().detach())
        if weight is not None:
            out.set("uncertainty_weight", weight.mean().detach())
        return out


def trpo_step(loss_module: TRPOLoss, optimizer, tensordict: TensorDictBase) -> TensorDictBase:
    """One TRPO update: wire the loss and KL closures into a trust-region optimizer.

    Advantages are computed once (``compute_advantage``), then ``loss_fn`` returns the sum of all
    ``loss_*`` terms (scalar; ``reduction`` must not be ``"none"``) and ``kl_fn`` returns
    :meth:`TRPOLoss.kl`.

    Args:
        loss_module (TRPOLoss): the loss.
        optimizer (ConjugateGradientTrustRegion): built on ``loss_module.actor_network_params``.
        tensordict (TensorDictBase): rollout batch (not modified).

    Returns:
        The optimizer diagnostics plus ``loss_objective_before``.

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
        >>> info = trpo_step(loss, ConjugateGradientTrustRegion(loss.actor_network_params, max_kl=0.01), td)
        >>> bool(info["accepted"]), float(info["kl"]) <= 0.01
        (True, True)
    """
    if loss_module.reduction == "none":
        raise ValueError("trpo_step needs a scalar loss; got reduction='none'")
    td = loss_module.compute_advantage(tensordict)

    def loss_fn() -> torch.Tensor:
        out = loss_module(td)
        return sum(v for k, v in out.items() if k.startswith("loss_"))

    def kl_fn() -> torch.Tensor:
        return loss_module.kl(td)

    info = optimizer.step(loss_fn, kl_fn)
    return info
