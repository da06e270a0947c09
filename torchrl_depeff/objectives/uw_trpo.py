"""MUSBO's uncertainty-weighted TRPO loss (MUSBO eq. (12)-(13)): a configuration of TRPOLoss.

MUSBO (https://arxiv.org/abs/2102.11448) labels every imaginary transition with
``U(s_t, a_t) = exp(-alpha * ||s_hat^(i)_{t+1} - s_hat^(j)_{t+1}||_2^2)`` (eq. (12)), the
disagreement of the next states predicted by two members ``i, j`` sampled from the
uncertainty-labeler ensemble, and maximises ``E[ratio * A * U]`` under the usual trust region
(eq. (13)). Here the weight is a small TensorDict module, :class:`UncertaintyWeight`, and the loss is
:class:`~torchrl_depeff.objectives.TRPOLoss` with that module as its ``sample_weight_module``.
"""
from __future__ import annotations

import math

import torch
from tensordict import TensorDictBase
from tensordict.nn import TensorDictModuleBase
from tensordict.utils import NestedKey

from torchrl_depeff.objectives.trpo import TRPOLoss

__all__ = ["UncertaintyWeight", "UncertaintyWeightedTRPOLoss"]


class UncertaintyWeight(TensorDictModuleBase):
    r"""Writes ``exp(-alpha * d^2)`` (MUSBO eq. (12)) from an uncertainty entry, without gradient.

    The ``in_key`` entry may hold either

    * the squared disagreement ``d^2 = ||s_hat^(i) - s_hat^(j)||_2^2``, shape ``[*B]`` or
      ``[*B, 1]`` (the sum of squares over the state dimension, as written in eq. (12)), or
    * the predictions of the labeler members, shape ``[*B, E, d]`` with ``E >= 2`` (member-last in
      the batch dims, DEVELOPING.md); then ``d^2`` uses members 0 and 1, so the caller (or the
      labeler) is expected to have put the randomly sampled pair ``(i, j)`` first.

    Args:
        alpha (float): temperature ``alpha >= 0`` (MUSBO uses ``0.028``). Defaults to ``0.028``.
        in_key (NestedKey): entry read. Defaults to ``"uncertainty"``.
        out_key (NestedKey): weight written, ``[*B]``. Defaults to ``"uncertainty_weight"``.

    Examples:
        >>> import math
        >>> from tensordict import TensorDict
        >>> from torchrl_depeff.objectives.uw_trpo import UncertaintyWeight
        >>> td = UncertaintyWeight(0.5)(TensorDict(uncertainty=torch.tensor([[0.0], [2.0]]), batch_size=[2]))
        >>> torch.allclose(td["uncertainty_weight"], torch.tensor([1.0, math.exp(-1.0)]))
        True
    """

    def __init__(
        self, alpha: float = 0.028, in_key: NestedKey = "uncertainty", out_key: NestedKey = "uncertainty_weight"
    ) -> None:
        super().__init__()
        if isinstance(alpha, bool) or not isinstance(alpha, (int, float)) or not 0 <= alpha < math.inf:
            raise ValueError(f"alpha must be a finite number >= 0, got {alpha!r}")
        self.register_buffer("alpha", torch.tensor(float(alpha), dtype=torch.float64))
        self.in_keys = [in_key]
        self.out_keys = [out_key]

    @torch.no_grad()
    def weight(self, tensordict: TensorDictBase) -> torch.Tensor:
        """Per-sample weight ``[*B]`` of ``tensordict`` (MUSBO eq. (12))."""
        key = self.in_keys[0]
        if key not in tensordict.keys(include_nested=True):
            raise KeyError(f"uncertainty key {key!r} not found in the tensordict")
        u = tensordict.get(key).detach()
        nb = tensordict.batch_dims
        if u.ndim == nb + 2:
            if u.shape[-2] < 2:
                raise ValueError(f"{key!r} of shape {tuple(u.shape)} holds fewer than 2 members")
            sq_dist = (u[..., 0, :] - u[..., 1, :]).pow(2).sum(-1)
        elif u.ndim == nb + 1 and u.shape[-1] == 1:
            sq_dist = u.squeeze(-1)
        elif u.ndim == nb:
            sq_dist = u
        else:
            raise ValueError(
                f"{key!r} of shape {tuple(u.shape)} is neither [*B], [*B, 1] nor "
                f"[*B, E, d] for batch size {tuple(tensordict.batch_size)}"
            )
        return torch.exp(-self.alpha.to(sq_dist.dtype) * sq_dist)  # MUSBO eq. (12)

    def forward(self, tensordict: TensorDictBase) -> TensorDictBase:
        tensordict.set(self.out_keys[0], self.weight(tensordict))
        return tensordict


class UncertaintyWeightedTRPOLoss(TRPOLoss):
    r"""TRPO surrogate weighted per sample by ``exp(-alpha * d^2)`` (MUSBO eq. (12)-(13)).

    A configuration of :class:`~torchrl_depeff.objectives.TRPOLoss`: the weights come from an
    :class:`UncertaintyWeight` module (``sample_weight_module``) writing ``"uncertainty_weight"``
    (the ``sample_weight`` key), computed under ``torch.no_grad`` (a target, no gradient flows
    through it); the weighted surrogate is averaged over the batch, ``E[U * ratio * A]``
    (``sample_weight_normalization="batch"``, eq. (13)); the KL constraint is not weighted. Its
    batch mean is reported, detached, as ``"uncertainty_weight"``.

    Args:
        actor_network (ProbabilisticActor): stochastic policy.
        critic_network (TensorDictModule, optional): state-value module.

    Keyword Args:
        alpha (float): temperature ``alpha >= 0`` (MUSBO uses ``0.028``). Defaults to ``0.028``.
        uncertainty_key (NestedKey): entry read (see :class:`UncertaintyWeight`). Defaults to
            ``"uncertainty"``.
        **kwargs: forwarded to :class:`~torchrl_depeff.objectives.trpo.TRPOLoss`.

    Examples:
        >>> from torchrl_depeff.objectives.uw_trpo import UncertaintyWeightedTRPOLoss
        >>> from tensordict import TensorDict
        >>> from torchrl_depeff.modules.actors import make_gaussian_actor
        >>> actor = make_gaussian_actor(3, 2, num_cells=(8,))
        >>> with torch.no_grad():
        ...     td = actor(TensorDict(observation=torch.randn(4, 3), batch_size=[4]))
        >>> td["advantage"] = torch.randn(4, 1)
        >>> td["uncertainty"] = torch.zeros(4, 1)
        >>> out = UncertaintyWeightedTRPOLoss(actor)(td)
        >>> float(out["uncertainty_weight"])
        1.0
    """

    def __init__(
        self,
        actor_network: TensorDictModuleBase,
        critic_network: TensorDictModuleBase | None = None,
        *,
        alpha: float = 0.028,
        uncertainty_key: NestedKey = "uncertainty",
        **kwargs,
    ) -> None:
        weight_module = UncertaintyWeight(alpha, in_key=uncertainty_key)
        kwargs.setdefault("sample_weight_normalization", "batch")
        super().__init__(actor_network, critic_network, sample_weight_module=weight_module, **kwargs)
        self.set_keys(sample_weight=weight_module.out_keys[0])

    @property
    def alpha(self) -> float:
        """The eq. (12) temperature."""
        return float(self.sample_weight_module.alpha)

    @property
    def uncertainty_key(self) -> NestedKey:
        """The entry the eq. (12) weight is computed from."""
        return self.sample_weight_module.in_keys[0]

    @torch.no_grad()
    def uncertainty_weight(self, tensordict: TensorDictBase) -> torch.Tensor:
        """Per-sample weight ``exp(-alpha * d^2)`` of shape ``[*B]`` (MUSBO eq. (12)).

        Examples:
            >>> from torchrl_depeff.objectives.uw_trpo import UncertaintyWeightedTRPOLoss
            >>> from tensordict import TensorDict
            >>> from torchrl_depeff.modules.actors import make_gaussian_actor
            >>> loss = UncertaintyWeightedTRPOLoss(make_gaussian_actor(3, 2, num_cells=(8,)), alpha=0.5)
            >>> td = TensorDict(uncertainty=torch.tensor([[0.0], [2.0]]), batch_size=[2])
            >>> loss.uncertainty_weight(td).tolist() == [1.0, float(torch.exp(torch.tensor(-1.0)))]
            True
        """
        return self.sample_weight_module.weight(tensordict)
