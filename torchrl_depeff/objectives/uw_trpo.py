"""MUSBO's uncertainty-weighted TRPO loss (MUSBO eq. (12)-(13)).

MUSBO (https://arxiv.org/abs/2102.11448) labels every imaginary transition with
``U(s_t, a_t) = exp(-alpha * ||s_hat^(i)_{t+1} - s_hat^(j)_{t+1}||_2^2)`` (eq. (12)), the
disagreement of the next states predicted by two members ``i, j`` sampled from the
uncertainty-labeler ensemble, and maximises ``E[ratio * A * U]`` under the usual trust region
(eq. (13)).
"""
from __future__ import annotations

import torch
from tensordict import TensorDictBase
from tensordict.nn import TensorDictModule
from tensordict.utils import NestedKey

from torchrl_depeff.objectives.trpo import TRPOLoss

__all__ = ["UncertaintyWeightedTRPOLoss"]


class UncertaintyWeightedTRPOLoss(TRPOLoss):
    r"""TRPO surrogate weighted per sample by ``exp(-alpha * d^2)`` (MUSBO eq. (12)-(13)).

    The ``uncertainty`` entry may hold either

    * the squared disagreement ``d^2 = ||s_hat^(i) - s_hat^(j)||_2^2``, shape ``[*B]`` or
      ``[*B, 1]`` (the sum of squares over the state dimension, as written in eq. (12)), or
    * the predictions of the labeler members, shape ``[*B, E, d]`` with ``E >= 2`` (member-last in
      the batch dims, DEVELOPING.md); then ``d^2`` uses members 0 and 1, so the caller (or the
      labeler) is expected to have put the randomly sampled pair ``(i, j)`` first.

    The weight is computed under ``torch.no_grad`` (a target, no gradient flows through it) and
    its batch mean is reported, detached, as ``"uncertainty_weight"``. The KL constraint is not
    weighted (eq. (13)).

    Args:
        actor_network (ProbabilisticActor): Gaussian policy.
        critic_network (TensorDictModule, optional): state-value module.

    Keyword Args:
        alpha (float): temperature ``alpha >= 0`` (MUSBO uses ``0.028``). Defaults to ``0.028``.
        uncertainty_key (NestedKey): entry read. Defaults to ``"uncertainty"``.
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
        actor_network: TensorDictModule,
        critic_network: TensorDictModule | None = None,
        *,
        alpha: float = 0.028,
        uncertainty_key: NestedKey = "uncertainty",
        **kwargs,
    ) -> None:
        if not alpha >= 0:
            raise ValueError(f"alpha must be >= 0, got {alpha}")
        super().__init__(actor_network, critic_network, **kwargs)
        self.alpha = float(alpha)
        self.uncertainty_key = uncertainty_key

    @property
    def in_keys(self) -> list[NestedKey]:
        return super().in_keys + [self.uncertainty_key]

    @property
    def out_keys(self) -> list[str]:
        return super().out_keys + ["uncertainty_weight"]

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
        if self.uncertainty_key not in tensordict.keys(include_nested=True):
            raise KeyError(
                f"uncertainty key {self.uncertainty_key!r} not found in the tensordict"
            )
        u = tensordict.get(self.uncertainty_key).detach()
        nb = tensordict.batch_dims
        if u.ndim == nb + 2:
            if u.shape[-2] < 2:
                raise ValueError(
                    f"{self.uncertainty_key!r} of shape {tuple(u.shape)} holds fewer than 2 members"
                )
            sq_dist = (u[..., 0, :] - u[..., 1, :]).pow(2).sum(-1)
        elif u.ndim == nb + 1 and u.shape[-1] == 1:
            sq_dist = u.squeeze(-1)
        elif u.ndim == nb:
            sq_dist = u
        else:
            raise ValueError(
                f"{self.uncertainty_key!r} of shape {tuple(u.shape)} is neither [*B], [*B, 1] nor "
                f"[*B, E, d] for batch size {tuple(tensordict.batch_size)}"
            )
        return torch.exp(-self.alpha * sq_dist)  # MUSBO eq. (12)

    def _sample_weight(self, td: TensorDictBase) -> torch.Tensor:
        return self.uncertainty_weight(td)
