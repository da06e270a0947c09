"""Advantage-weighted actor-critic (AWAC, Nair et al. 2020), as used by MB2PO.

AWAC https://arxiv.org/abs/2006.09359 ; MB2PO (Villaflor & Dolan) Sec. 4.2 and App. 7.1 use it for
offline pre-training and for model-based fine-tuning: ``alpha = 1``, batch 1024, clipped double-Q,
advantage estimated with 10 policy samples and the exponential weight clamped at 20.
"""
from __future__ import annotations

import math
import warnings
from dataclasses import dataclass
from typing import Any

import torch
from tensordict import TensorDict, TensorDictBase, TensorDictParams
from tensordict.nn import dispatch, TensorDictModule, TensorDictModuleBase
from tensordict.utils import NestedKey
from torchrl.objectives.common import LossModule

from torchrl_depeff.objectives._keys import LazyKeys
from torchrl.objectives.utils import _vmap_func, dispatch_value_estimator, ValueEstimators

__all__ = ["AWACLoss"]

_TARGETS = ("min", "quantile")
_REDUCTIONS = ("mean", "sum", "none")
_CRITIC_KERNELS = ("auto", "vmap", "loop")


def _get(td: TensorDictBase, key: NestedKey) -> torch.Tensor:
    value = td.get(key, default=None)
    if value is None:
        raise KeyError(f"key {key!r} not found in the input TensorDict (keys: {list(td.keys(True, True))})")
    return value


def _check_number(name: str, value: Any) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise ValueError(f"{name} must be a finite number, got {value!r}")
    return float(value)


class AWACLoss(LazyKeys, LossModule):
    r"""AWAC actor and clipped double-Q critic losses.

    Actor (MB2PO eq. 9, AWAC eq. 12):
    :math:`\mathcal{L}_\pi = -\mathbb{E}_{(s,a)\sim D}[\log\pi_\theta(a|s)\, w(s,a)]`,
    :math:`w = \min(\exp((Q(s,a) - V(s))/\lambda),\ w_{\max})`, computed without gradient (the
    weights are regression targets; no gradient reaches the critics). ``Q`` uses the online
    critics (as in AWAC and CORL) aggregated over the ensemble like the target (``min`` or
    quantile); :math:`V(s) = \frac1N\sum_{i\le N} Q(s, a_i)`, :math:`a_i\sim\pi(\cdot|s)`, with
    ``N = num_value_samples`` (MB2PO App. 7.1: "the advantage was estimated with 10 samples").

    Critic (MB2PO eq. 1 with clipped double-Q, Fujimoto et al. 2018):
    :math:`\mathcal{L}_Q = \sum_i (Q_i(s,a) - y)^2`,
    :math:`y = r + \gamma (1 - \text{terminated}) \operatorname{agg}_j Q^{\text{targ}}_j(s', a')`,
    :math:`a'\sim\pi(\cdot|s')`, computed without gradient (none reaches the actor). Truncated
    transitions bootstrap (only ``terminated`` stops it).

    Choices where MB2PO is ambiguous:

    * **Clamp.** MB2PO Sec. 4.2 "clamp the exponential term to be at most 20", following
      Peng et al. (AWR, weight clip 20) and Wang et al. (CRR): the clamp is on the *weight*,
      ``max_weight = 20`` (not on the exponent, which would allow weights up to ``e^20``).
      CORL uses 100.
    * **Quantile target.** MB2PO's critic outputs 100 return quantiles (QR-DQN). This loss keeps
      scalar critics; ``target="quantile"`` instead takes the ``target_quantile``-quantile of the
      ``num_qvalue_nets`` ensemble values (``torch.quantile``, linear interpolation), a tunable
      pessimism between ``min`` (q = 0) and the median (q = 0.5). Default ``q = 0.25``
      (our choice; the paper gives none). Invertible value transforms are not implemented.
    * **Critic loss scale.** Squared TD errors are summed over ensemble members, then reduced over
      the batch (like TorchRL's SAC/IQL), so each member gets its own unscaled MSE gradient.
    * **Discount.** The one-step target goes through TorchRL's TD(0) estimator
      (``value_estimator.value_estimate`` with the aggregated next-state value, as TorchRL's SAC
      and IQL do): set ``gamma`` with ``make_value_estimator(ValueEstimators.TD0, gamma=...)``
      (default ``0.99``). The constructor's ``gamma=`` is deprecated.

    Speed (exact, the maths is unchanged): :meth:`forward` evaluates the online critics at the
    dataset pairs once, with gradient, and uses the detached values for the advantage's
    ``Q(s, a)`` (calling :meth:`actor_loss` and :meth:`qvalue_loss` separately evaluates them
    twice). ``critic_kernel`` picks how the ``num_qvalue_nets`` critics are evaluated:
    ``"vmap"`` (one :func:`torch.vmap` call over the stacked parameters, TorchRL's default) or
    ``"loop"`` (each critic on its own parameter slice, results stacked). ``"auto"`` uses
    ``"loop"`` on CPU and ``"vmap"`` elsewhere: on CPU the vmapped linear layers become
    ``bmm`` + a separate bias ``add`` over ``[E, N, 256]`` activations that no longer fit in
    cache: measured 0.80-0.81x of a plain per-critic PyTorch update at MB2PO's sizes, against
    1.00-1.03x for ``"loop"`` (two runs of ``benchmarks/bench_awac.py``, numbers in
    benchmarks/README.md); with 2 critics the loop has no launch overhead to save. The
    off-CPU choice is TorchRL's default and was not measured (no GPU was available).

    Target critics: ``target_qvalue_network_params`` are created by ``convert_to_functional``;
    update them with :class:`torchrl.objectives.SoftUpdate` (MB2PO: ``tau = 5e-3``) or
    :class:`~torchrl.objectives.HardUpdate`. The actor has no target copy.

    Args:
        actor_network (TensorDictModuleBase): stochastic policy with ``get_dist`` (e.g. a
            :class:`~torchrl.modules.ProbabilisticActor`, or
            :func:`torchrl_depeff.modules.mixture.make_gmm_actor`).
        qvalue_network (TensorDictModule): ``Q(s, a)`` writing ``"state_action_value"`` ``[*B, 1]``;
            it is copied ``num_qvalue_nets`` times with independently re-sampled parameters.

    Keyword Args:
        num_qvalue_nets (int): critic ensemble size (clipped double-Q: 2). Defaults to ``2``.
        awac_lambda (float): temperature :math:`\lambda` (MB2PO's :math:`\alpha`), ``> 0``.
            Defaults to ``1.0``.
        max_weight (float): upper clamp of the weights. Defaults to ``20.0``.
        target (str): ``"min"`` (clipped double-Q) or ``"quantile"``. Defaults to ``"min"``.
        target_quantile (float): quantile level in ``[0, 1]`` for ``target="quantile"``.
            Defaults to ``0.25``.
        num_value_samples (int): policy samples used for ``V(s)``. Defaults to ``10``.
        reduction (str): ``"mean"``, ``"sum"`` or ``"none"``. Defaults to ``"mean"``.
        critic_kernel (str): ``"auto"``, ``"vmap"`` or ``"loop"`` (see above; same values and
            gradients). Defaults to ``"auto"``.
        gamma (float, deprecated): discount in ``[0, 1]``; use :meth:`make_value_estimator`.
        check_inputs (bool, deprecated): ignored; :meth:`forward` never synchronises with the
            host, call :meth:`check_inputs` on a batch to validate it (NaN/inf, missing keys).

    Keys: ``set_keys(action=...)`` renames the dataset action and the entry the critics read it
    from (it must be one of ``qvalue_network.in_keys``); the critics' output is read from
    ``state_action_value``, which follows the critic's single out-key when it has one (TorchRL's
    :class:`~torchrl.modules.ValueOperator` writes ``"state_value"`` when its in-keys do not
    contain ``"action"``). Coefficients (``awac_lambda``, ``max_weight``, ``target_quantile``)
    are registered buffers.

    Output keys: ``"loss_actor"``, ``"loss_qvalue"`` and detached diagnostics ``"weight_mean"``,
    ``"weight_max"``, ``"clamp_fraction"``, ``"advantage_mean"``, ``"q_value_mean"``,
    ``"target_value_mean"``.

    Examples:
        >>> from torchrl_depeff.objectives.awac import AWACLoss
        >>> from tensordict import TensorDict
        >>> from tensordict.nn import TensorDictModule
        >>> from torchrl.modules import MLP, ValueOperator
        >>> from torchrl_depeff.modules.mixture import make_gmm_actor
        >>> actor = make_gmm_actor(3, 2, num_cells=(16,))
        >>> qnet = ValueOperator(MLP(in_features=5, out_features=1, num_cells=[16]),
        ...                      in_keys=["observation", "action"])
        >>> loss = AWACLoss(actor, qnet)
        >>> td = TensorDict({
        ...     "observation": torch.randn(8, 3), "action": torch.rand(8, 2) * 2 - 1,
        ...     "next": {"observation": torch.randn(8, 3), "reward": torch.randn(8, 1),
        ...              "done": torch.zeros(8, 1, dtype=torch.bool),
        ...              "terminated": torch.zeros(8, 1, dtype=torch.bool)}}, batch_size=[8])
        >>> out = loss(td)
        >>> out["loss_actor"].shape, out["loss_qvalue"].shape, bool(out["weight_max"] <= 20)
        (torch.Size([]), torch.Size([]), True)
        >>> from torchrl.objectives import SoftUpdate
        >>> from torchrl.objectives.utils import ValueEstimators
        >>> _ = loss.make_value_estimator(ValueEstimators.TD0, gamma=0.9)
        >>> updater = SoftUpdate(loss, tau=5e-3)
    """

    @dataclass
    class _AcceptedKeys:
        """Configurable entries (observation keys come from the networks' ``in_keys``).

        Attributes:
            action (NestedKey): dataset action. Defaults to ``"action"``.
            reward (NestedKey): reward, read under ``"next"``. Defaults to ``"reward"``.
            done (NestedKey): done flag under ``"next"`` (not used by the target: truncation
                bootstraps). Defaults to ``"done"``.
            terminated (NestedKey): termination flag under ``"next"``. Defaults to ``"terminated"``.
            state_action_value (NestedKey): critic output. Defaults to ``"state_action_value"``.
            value (NestedKey): next-state value handed to the TD(0) estimator. Defaults to
                ``"state_value"``.
            value_target (NestedKey): TD target of the estimator. Defaults to ``"value_target"``.
        """

        action: NestedKey = "action"
        reward: NestedKey = "reward"
        done: NestedKey = "done"
        terminated: NestedKey = "terminated"
        state_action_value: NestedKey = "state_action_value"
        value: NestedKey = "state_value"
        value_target: NestedKey = "value_target"

    default_keys = _AcceptedKeys
    tensor_keys: _AcceptedKeys
    default_value_estimator = ValueEstimators.TD0
    SUPPORTED_VALUE_ESTIMATORS = (ValueEstimators.TD0,)
    _DEFAULT_OUT_KEYS = (
        "loss_actor",
        "loss_qvalue",
        "weight_mean",
        "weight_max",
        "clamp_fraction",
        "advantage_mean",
        "q_value_mean",
        "target_value_mean",
    )
    awac_lambda: torch.Tensor
    max_weight: torch.Tensor
    target_quantile: torch.Tensor

    actor_network: TensorDictModuleBase
    qvalue_network: TensorDictModule
    actor_network_params: TensorDictParams
    qvalue_network_params: TensorDictParams
    target_actor_network_params: TensorDictParams
    target_qvalue_network_params: TensorDictParams

    def __init__(
        self,
        actor_network: TensorDictModuleBase,
        qvalue_network: TensorDictModule,
        *,
        num_qvalue_nets: int = 2,
        awac_lambda: float = 1.0,
        max_weight: float = 20.0,
        target: str = "min",
        target_quantile: float = 0.25,
        num_value_samples: int = 10,
        reduction: str = "mean",
        critic_kernel: str = "auto",
        gamma: float | None = None,
        check_inputs: bool | None = None,
    ) -> None:
        awac_lambda = _check_number("awac_lambda", awac_lambda)
        max_weight = _check_number("max_weight", max_weight)
        target_quantile = _check_number("target_quantile", target_quantile)
        if not awac_lambda > 0:
            raise ValueError(f"awac_lambda must be > 0, got {awac_lambda}")
        if not max_weight > 0:
            raise ValueError(f"max_weight must be > 0, got {max_weight}")
        if target not in _TARGETS:
            raise ValueError(f"target must be one of {_TARGETS}, got {target!r}")
        if not 0.0 <= target_quantile <= 1.0:
            raise ValueError(f"target_quantile must be in [0, 1], got {target_quantile}")
        for name, value in (("num_qvalue_nets", num_qvalue_nets), ("num_value_samples", num_value_samples)):
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be an int >= 1, got {value!r}")
        if gamma is not None:
            if isinstance(gamma, bool) or not isinstance(gamma, (int, float)) or not 0.0 <= gamma <= 1.0:
                raise ValueError(f"gamma must be in [0, 1], got {gamma!r}")
            warnings.warn(
                "AWACLoss(gamma=...) is deprecated: use loss.make_value_estimator(ValueEstimators.TD0, gamma=...)",
                FutureWarning, stacklevel=2,
            )
        if check_inputs is not None:
            warnings.warn(
                "AWACLoss(check_inputs=...) is deprecated and ignored: forward never synchronises with the host; "
                "call loss.check_inputs(batch) to validate a batch",
                FutureWarning, stacklevel=2,
            )
        if reduction not in _REDUCTIONS:
            raise ValueError(f"reduction must be one of {_REDUCTIONS}, got {reduction!r}")
        if critic_kernel not in _CRITIC_KERNELS:
            raise ValueError(f"critic_kernel must be one of {_CRITIC_KERNELS}, got {critic_kernel!r}")
        if not hasattr(actor_network, "get_dist"):
            raise TypeError(
                f"actor_network needs get_dist (e.g. ProbabilisticActor), got {type(actor_network).__name__}"
            )
        self._in_keys = None
        self._out_keys = None
        super().__init__()
        self.convert_to_functional(actor_network, "actor_network", create_target_params=False)
        self.convert_to_functional(
            qvalue_network, "qvalue_network", num_qvalue_nets, create_target_params=True
        )
        self.num_qvalue_nets = int(num_qvalue_nets)
        self.register_coeff_buffer("awac_lambda", awac_lambda)
        self.register_coeff_buffer("max_weight", max_weight)
        self.register_coeff_buffer("target_quantile", target_quantile)
        self._quantile = target_quantile  # fixed at construction, like ``target``
        self.target = target
        self.num_value_samples = int(num_value_samples)
        self.reduction = reduction
        self.critic_kernel = critic_kernel
        self._follow_critic_out_key()
        if gamma is not None:  # deprecated path
            self.make_value_estimator(ValueEstimators.TD0, gamma=float(gamma))
        # one call evaluates every critic: params stacked on dim 0 -> outputs [E, *B, 1]
        self._vmap_qvalue = _vmap_func(
            self.qvalue_network, (None, 0), randomness=self.vmap_randomness
        )

    # ------------------------------------------------------------------ keys
    def _follow_critic_out_key(self) -> None:
        out = list(self.qvalue_network.out_keys)
        if self.tensor_keys.state_action_value not in out and len(out) == 1:
            self.tensor_keys.state_action_value = out[0]

    def _check_critic_keys(self) -> None:
        k = self.tensor_keys
        if k.action not in self.qvalue_network.in_keys:
            raise ValueError(
                f"the action key {k.action!r} is not an input of qvalue_network (in_keys "
                f"{list(self.qvalue_network.in_keys)}): set_keys(action=...) names the entry the critics read "
                "the action from"
            )
        if k.state_action_value not in self.qvalue_network.out_keys:
            raise ValueError(
                f"qvalue_network writes {list(self.qvalue_network.out_keys)}, not the state_action_value key "
                f"{k.state_action_value!r}: use set_keys(state_action_value=...)"
            )

    def _set_in_keys(self) -> None:
        k = self.tensor_keys
        obs = self._obs_keys()
        keys = [*obs, k.action, ("next", k.reward), ("next", k.done), ("next", k.terminated)]
        keys += [("next", key) for key in obs]
        self._in_keys = list(dict.fromkeys(keys))

    def _default_out_keys(self) -> list[NestedKey]:
        return list(self._DEFAULT_OUT_KEYS)

    def _estimator_keys(self) -> dict[str, NestedKey]:
        k = self.tensor_keys
        return {"value": k.value, "value_target": k.value_target, "reward": k.reward, "done": k.done,
                "terminated": k.terminated}

    def _forward_value_estimator_keys(self, **kwargs: Any) -> None:
        if getattr(self, "_value_estimator", None) is not None:
            self._value_estimator.set_keys(**self._estimator_keys())
        self._in_keys = None
        if "action" in kwargs or "state_action_value" in kwargs:
            self._check_critic_keys()

    def make_value_estimator(self, value_type: ValueEstimators | None = None, **hyperparams: Any) -> AWACLoss:
        """Build the one-step TD(0) estimator of the critic target; the only place to set ``gamma``.

        Examples:
            >>> from torchrl.modules import MLP, ValueOperator
            >>> from torchrl.objectives.utils import ValueEstimators
            >>> from torchrl_depeff.modules.mixture import make_gmm_actor
            >>> from torchrl_depeff.objectives.awac import AWACLoss
            >>> qnet = ValueOperator(MLP(in_features=5, out_features=1, num_cells=[8]), in_keys=["observation", "action"])
            >>> loss = AWACLoss(make_gmm_actor(3, 2, num_cells=(8,)), qnet)
            >>> round(float(loss.make_value_estimator(ValueEstimators.TD0, gamma=0.9).value_estimator.gamma), 6)
            0.9
        """
        value_type, hp = self._prepare_value_estimator_kwargs(value_type, **hyperparams)
        if value_type is None:
            return self
        hp.pop("value_network", None)
        dispatch_value_estimator(
            self, value_type, supported=self.SUPPORTED_VALUE_ESTIMATORS,
            tensor_keys=self._estimator_keys(), value_network=None, **hp,
        )
        return self

    # --------------------------------------------------------------- helpers
    def _obs_keys(self) -> list[NestedKey]:
        k = self.tensor_keys
        keys = [*self.actor_network.in_keys, *[key for key in self.qvalue_network.in_keys if key != k.action]]
        return list(dict.fromkeys(keys))

    def _validate(self, tensordict: TensorDictBase, *, next_too: bool) -> None:
        """Key presence (no host sync)."""
        k = self.tensor_keys
        keys = [*self._obs_keys(), k.action]
        if next_too:
            keys += [("next", k.reward), ("next", k.done), ("next", k.terminated)]
            keys += [("next", key) for key in self._obs_keys()]
        for key in keys:
            _get(tensordict, key)

    def check_inputs(self, tensordict: TensorDictBase) -> None:
        """Raise a clear error for a batch the loss cannot use (one host sync per call).

        Raises:
            KeyError: an entry the loss reads is missing (named).
            ValueError: an entry holds NaN/inf values (named).
        """
        if not isinstance(tensordict, TensorDictBase):
            raise TypeError(f"expected a TensorDictBase, got {type(tensordict).__name__}")
        self._check_critic_keys()
        self._validate(tensordict, next_too=True)
        names = [key for key in self.in_keys if tensordict.get(key).is_floating_point()]
        if not names:
            return
        finite = torch.stack([torch.isfinite(tensordict.get(key)).all() for key in names]).tolist()
        bad = [key for key, ok in zip(names, finite) if not ok]
        if bad:
            raise ValueError(f"AWACLoss: entries {bad} contain NaN or inf values")

    def _aggregate(self, q: torch.Tensor) -> torch.Tensor:
        """Ensemble values ``[E, *B]`` -> ``[*B]`` (clipped double-Q or ensemble quantile)."""
        if self.target == "min":
            return q.min(0).values
        return torch.quantile(q, self._quantile, dim=0)  # python float: no host sync

    def _qvalues(self, td_obs: TensorDictBase, action: torch.Tensor, params: TensorDictBase) -> torch.Tensor:
        """All critics at ``(s, a)``: ``[E, *B]``."""
        k = self.tensor_keys
        if k.action not in self.qvalue_network.in_keys:
            self._check_critic_keys()
        td_q = td_obs.select(*self.qvalue_network.in_keys, strict=False).copy()
        td_q.set(k.action, action)
        kernel = self.critic_kernel
        if kernel == "auto":
            kernel = "loop" if action.device.type == "cpu" else "vmap"
        if kernel == "vmap":
            out = _get(self._vmap_qvalue(td_q, params), k.state_action_value)
        else:
            # unbind: the backward stacks the E slice gradients once (no full-size zero
            # gradient per member as indexing would build)
            values = []
            for member_params in params.unbind(0):
                with member_params.to_module(self.qvalue_network):
                    values.append(_get(self.qvalue_network(td_q.copy()), k.state_action_value))
            out = torch.stack(values)
        return out.squeeze(-1)

    def _dist(self, td_obs: TensorDictBase) -> torch.distributions.Distribution:
        td_in = td_obs.select(*self.actor_network.in_keys, strict=False).copy()
        with self.actor_network_params.to_module(self.actor_network):
            return self.actor_network.get_dist(td_in)

    # ---------------------------------------------------------------- losses
    def actor_loss(self, tensordict: TensorDictBase) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """Weighted log-likelihood of dataset actions (MB2PO eq. 9); returns ``(loss, diagnostics)``."""
        self._validate(tensordict, next_too=False)
        return self._actor_loss(tensordict, None)

    def qvalue_loss(self, tensordict: TensorDictBase) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """Clipped double-Q TD loss (MB2PO eq. 1 + Sec. 2.1); returns ``(loss, diagnostics)``."""
        self._validate(tensordict, next_too=True)
        return self._qvalue_loss(tensordict, None)

    def _actor_loss(
        self, tensordict: TensorDictBase, member_q: torch.Tensor | None
    ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        # member_q: the online critics at the dataset pairs, [E, *B], already detached
        k = self.tensor_keys
        action = tensordict.get(k.action)
        td_obs = tensordict.select(*self._obs_keys(), strict=False)
        dist = self._dist(td_obs)
        log_prob = dist.log_prob(action)  # [*B]
        with torch.no_grad():
            if member_q is None:
                member_q = self._qvalues(td_obs, action, self.qvalue_network_params)
            q = self._aggregate(member_q)  # [*B]
            n = self.num_value_samples
            pi_actions = dist.sample((n,))  # [N, *B, d]
            td_rep = td_obs.unsqueeze(0).expand(n, *td_obs.batch_size)
            value = self._aggregate(
                self._qvalues(td_rep, pi_actions, self.qvalue_network_params)
            ).mean(0)  # V(s), [*B]
            advantage = q - value
            weight = torch.exp(advantage / self.awac_lambda).clamp_max(self.max_weight)
        if log_prob.shape != weight.shape:
            raise ValueError(
                f"actor log-prob shape {tuple(log_prob.shape)} does not match the batch {tuple(weight.shape)}"
            )
        loss = self._reduce_loss(-weight * log_prob, tensordict)  # MB2PO eq. (9)
        info = {
            "weight_mean": weight.mean(),
            "weight_max": weight.max(),
            "clamp_fraction": (weight >= self.max_weight).float().mean(),
            "advantage_mean": advantage.mean(),
        }
        return loss, info

    def _qvalue_loss(
        self, tensordict: TensorDictBase, pred: torch.Tensor | None
    ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        # pred: the online critics at the dataset pairs, [E, *B], with gradient
        k = self.tensor_keys
        next_td = tensordict.get("next")
        reward = next_td.get(k.reward)
        with torch.no_grad():
            next_obs = next_td.select(*self._obs_keys(), strict=False)
            next_action = self._dist(next_obs).sample()
            next_q = self._aggregate(
                self._qvalues(next_obs, next_action, self.target_qvalue_network_params)
            )  # [*B]
            # TD(0) through TorchRL's estimator: r + gamma * (1 - terminated) * next value
            target_value = self.value_estimator.value_estimate(
                tensordict, next_value=next_q.reshape(reward.shape).to(reward.dtype)
            ).reshape(next_q.shape)
        if pred is None:
            td_obs = tensordict.select(*self._obs_keys(), strict=False)
            pred = self._qvalues(td_obs, tensordict.get(k.action), self.qvalue_network_params)  # [E, *B]
        loss = self._reduce_loss((pred - target_value).pow(2).sum(0), tensordict)
        info = {"q_value_mean": pred.detach().mean(), "target_value_mean": target_value.mean()}
        return loss, info

    @dispatch
    def forward(self, tensordict: TensorDictBase) -> TensorDictBase:
        """Both losses and diagnostics in a new TensorDict; the input is not modified.

        The online critics run once at the dataset pairs: with gradient for the TD loss, and
        detached for the actor's advantage (same values as :meth:`actor_loss` computes).
        """
        self._validate(tensordict, next_too=True)
        k = self.tensor_keys
        td_obs = tensordict.select(*self._obs_keys(), strict=False)
        pred = self._qvalues(td_obs, tensordict.get(k.action), self.qvalue_network_params)  # [E, *B]
        loss_actor, info_actor = self._actor_loss(tensordict, pred.detach())
        loss_qvalue, info_q = self._qvalue_loss(tensordict, pred)
        out = {"loss_actor": loss_actor, "loss_qvalue": loss_qvalue}
        out.update({key: value.detach() for key, value in {**info_actor, **info_q}.items()})
        return TensorDict(out, batch_size=[])
