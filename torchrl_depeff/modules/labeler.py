"""MUSBO's uncertainty labeler and the per-sample uncertainty weights it feeds.

MUSBO (Su et al., https://arxiv.org/abs/2102.11448) trains, next to the BREMEN dynamics ensemble
``T_hat``, a *separate* ensemble of ``K`` probabilistic networks ``P_hat`` (sec. 3.2, App. F:
``K = 3``, 2 x 1024, Adam ``1e-3``, 85/15 split, early stopping after 3 epochs without holdout
improvement) and uses it in three places:

* eq. (9), labelled data: ``U_hat(a, s) = max_i 1 - clip(||s_{t+1} - s_hat^(i)_{t+1}||_2^2, 0, 1)``,
  written as ``"uncertainty"`` by :class:`UncertaintyLabeler`;
* eq. (11), behaviour cloning: the weights ``U_hat(a_t, s_t)`` (:func:`bc_weights`);
* eq. (22), deployment (no ground truth yet): the noise variance of the exploration action,
  written by :class:`ExplorationUncertainty` for
  :class:`~torchrl_depeff.modules.UncertaintyActionNoise`;
* eq. (12), imaginary rollouts (no ground truth): the squared disagreement
  ``||s_hat^(i)_{t+1} - s_hat^(j)_{t+1}||_2^2`` of a random pair ``(i, j)`` of labeler members,
  written by :class:`LabelerDisagreement` where
  :class:`~torchrl_depeff.objectives.UncertaintyWeightedTRPOLoss` reads it and turns it into
  ``exp(-alpha * d^2)`` (:func:`disagreement_weight`).

All labels are computed under ``torch.no_grad``: they are targets/weights, and the paper never
differentiates through them, so no gradient reaches the labeler from the policy losses.
"""
from __future__ import annotations

from typing import Any, Sequence

import torch
from tensordict import TensorDictBase
from tensordict.nn import TensorDictModuleBase
from tensordict.utils import NestedKey
from torch import nn

from torchrl_depeff.modules.ensemble import DynamicsEnsemble

__all__ = [
    "UncertaintyLabeler",
    "LabelerDisagreement",
    "ExplorationUncertainty",
    "support_from_predictions",
    "expected_sq_error",
    "pair_sq_disagreement",
    "disagreement_weight",
    "bc_weights",
]

_MEMBER_REDUCTIONS = ("equation", "max_error")
_EXPLORATION_MODES = ("error", "support")
_PAIR_MODES = ("per_call", "per_trajectory", "per_row")
_DISAGREEMENT_KERNELS = ("auto", "grouped", "all_members")


def _get(td: TensorDictBase, key: NestedKey, what: str) -> torch.Tensor:
    value = td.get(key, default=None)
    if value is None:
        raise KeyError(
            f"{what} key {key!r} not found in the tensordict (keys: {list(td.keys(True, True))})"
        )
    return value


def support_from_predictions(
    predictions: torch.Tensor,
    next_observation: torch.Tensor,
    *,
    member_reduction: str = "equation",
) -> torch.Tensor:
    r"""MUSBO eq. (9): :math:`\hat U(a,s) = \max_i 1 - \mathrm{clip}(\lVert s_{t+1} - \hat s^{(i)}_{t+1}\rVert_2^2, 0, 1)`.

    The squared error is summed over the state dimensions (eq. 9 writes the squared L2 norm), in
    the raw (unnormalised) state space, clipped to ``[0, 1]`` and subtracted from 1, so
    ``U_hat`` is in ``[0, 1]`` and equals 1 where a member predicts the next state exactly
    (high support) and 0 where every error is ``>= 1``.

    The paper is ambiguous about which member counts: eq. (9) puts the ``max`` over members
    outside ``1 - clip(.)`` (= the *smallest* error), while the text below it says "we take the
    maximum prediction error out of the K ensembles". ``member_reduction="equation"`` (default,
    the equation as printed) gives ``max_i (1 - clip(e_i, 0, 1)) = 1 - clip(min_i e_i, 0, 1)``;
    ``"max_error"`` (the text) gives ``1 - clip(max_i e_i, 0, 1)``, a more conservative weight.

    Args:
        predictions (torch.Tensor): member predictions of the next state ``[K, *B, d]``.
        next_observation (torch.Tensor): observed next state ``[*B, d]``.

    Keyword Args:
        member_reduction (str): ``"equation"`` or ``"max_error"`` (see above). Defaults to
            ``"equation"``.

    Returns:
        ``U_hat`` of shape ``[*B, 1]``.

    Examples:
        >>> from torchrl_depeff.modules.labeler import support_from_predictions
        >>> preds = torch.tensor([[[0.5, 0.0]], [[2.0, 0.0]]])  # K=2, B=1, d=2
        >>> s_next = torch.zeros(1, 2)  # squared errors 0.25 and 4.0
        >>> support_from_predictions(preds, s_next)  # max_i 1 - clip(e_i) = 1 - 0.25
        tensor([[0.7500]])
        >>> support_from_predictions(preds, s_next, member_reduction="max_error")  # 1 - clip(4)
        tensor([[0.]])
    """
    if member_reduction not in _MEMBER_REDUCTIONS:
        raise ValueError(
            f"member_reduction must be one of {_MEMBER_REDUCTIONS}, got {member_reduction!r}"
        )
    if predictions.dim() < 2 or predictions.shape[1:] != next_observation.shape:
        raise ValueError(
            f"predictions must be [K, *B, d] with [*B, d] = next_observation shape "
            f"{tuple(next_observation.shape)}, got {tuple(predictions.shape)}"
        )
    # [K, *B, 1]
    sq_err = (next_observation.unsqueeze(0) - predictions).pow(2).sum(-1, keepdim=True)
    # MUSBO eq. (9)
    if member_reduction == "equation":
        return (1.0 - sq_err.clamp(0.0, 1.0)).amax(0)
    return 1.0 - sq_err.amax(0).clamp(0.0, 1.0)


def expected_sq_error(loc: torch.Tensor, scale: torch.Tensor | None = None) -> torch.Tensor:
    r"""Expected eq. (9) error of each member when the ground truth is unknown: ``[K, *B, 1]``.

    The unknown next state is replaced by a draw from the labeler's own predictive distribution,
    the uniform mixture of the ``K`` Gaussians ``N(mu_k, diag(sigma_k^2))``:

    .. math:: \mathbb E_{s'}\lVert s' - \mu_i\rVert_2^2 = \frac1K\sum_k \left(\lVert\mu_k - \mu_i\rVert_2^2 + \lVert\sigma_k\rVert_2^2\right),

    epistemic (member disagreement) plus aleatoric (predicted variance) error.

    Args:
        loc (torch.Tensor): member means ``[K, *B, d]``.
        scale (torch.Tensor, optional): member standard deviations ``[K, *B, d]``; ``None``
            counts no aleatoric part.

    Examples:
        >>> from torchrl_depeff.modules.labeler import expected_sq_error
        >>> loc = torch.tensor([[[0.0]], [[2.0]]])  # K=2, B=1, d=1
        >>> expected_sq_error(loc).flatten().tolist()  # (0 + 4) / 2 for both members
        [2.0, 2.0]
        >>> expected_sq_error(loc, torch.ones_like(loc)).flatten().tolist()
        [3.0, 3.0]
    """
    diff2 = (loc.unsqueeze(0) - loc.unsqueeze(1)).pow(2).sum(-1, keepdim=True)  # [K, K, *B, 1]
    err = diff2.mean(1)
    if scale is not None:
        err = err + scale.pow(2).sum(-1, keepdim=True).mean(0, keepdim=True)
    return err


def pair_sq_disagreement(
    predictions: torch.Tensor, i: torch.Tensor | int, j: torch.Tensor | int
) -> torch.Tensor:
    r"""Squared disagreement :math:`\lVert\hat s^{(i)} - \hat s^{(j)}\rVert_2^2` of MUSBO eq. (12).

    Args:
        predictions (torch.Tensor): member predictions ``[K, *B, d]``.
        i (int or torch.LongTensor): first member, an int or a ``[*B]`` index broadcastable to
            the batch shape (one member per row).
        j (int or torch.LongTensor): second member, same convention.

    Returns:
        ``[*B, 1]``, summed over the state dimension.

    Examples:
        >>> from torchrl_depeff.modules.labeler import pair_sq_disagreement
        >>> preds = torch.tensor([[[0.0, 0.0]], [[1.0, 2.0]], [[9.0, 9.0]]])  # K=3, B=1, d=2
        >>> pair_sq_disagreement(preds, 0, 1)
        tensor([[5.]])
    """
    K, batch, d = predictions.shape[0], predictions.shape[1:-1], predictions.shape[-1]

    def pick(idx: torch.Tensor | int) -> torch.Tensor:
        if isinstance(idx, int):
            if not 0 <= idx < K:
                raise ValueError(f"member index {idx} out of range for {K} members")
            return predictions[idx]
        index = idx.to(predictions.device).long().expand(batch)
        return predictions.gather(0, index[None, ..., None].expand(1, *batch, d)).squeeze(0)

    return (pick(i) - pick(j)).pow(2).sum(-1, keepdim=True)


def disagreement_weight(sq_disagreement: torch.Tensor, alpha: float = 0.028) -> torch.Tensor:
    r"""MUSBO eq. (12) weight :math:`\exp(-\alpha\, d^2)`, computed without gradient.

    The same formula :class:`~torchrl_depeff.objectives.UncertaintyWeightedTRPOLoss` applies to the
    entry :class:`LabelerDisagreement` writes; exposed for inspection and hand checks.

    Args:
        sq_disagreement (torch.Tensor): ``d^2 >= 0`` of any shape.
        alpha (float): temperature ``>= 0`` (MUSBO App. F: ``0.028``). Defaults to ``0.028``.

    Examples:
        >>> from torchrl_depeff.modules.labeler import disagreement_weight
        >>> disagreement_weight(torch.tensor([0.0, 1.0]), alpha=2.0)
        tensor([1.0000, 0.1353])
    """
    if not alpha >= 0:
        raise ValueError(f"alpha must be >= 0, got {alpha}")
    return torch.exp(-float(alpha) * sq_disagreement.detach())  # MUSBO eq. (12)


def bc_weights(
    tensordict: TensorDictBase,
    *,
    uncertainty_key: NestedKey = "uncertainty",
    weight_key: NestedKey = "bc_weight",
    normalize: bool = False,
) -> TensorDictBase:
    r"""MUSBO eq. (11) weights: ``weight = U_hat(a_t, s_t)``, written in place as ``[*B, 1]``.

    Eq. (11) is :math:`\min_\beta \frac{1}{|D|}\sum \hat U(a_t,s_t)\,\tfrac12\lVert a_t - \hat\pi_\beta(s_t)\rVert^2`;
    :class:`~torchrl_depeff.objectives.WeightedBCLoss` supplies the ``1/2`` and ``1/|D|``, so the weight
    of a row is ``U_hat`` itself (read from ``uncertainty_key``, written by
    :class:`UncertaintyLabeler`), detached. Pass ``weight_key`` to
    :func:`~torchrl_depeff.objectives.train_bc`.

    ``normalize=True`` (not in the paper) divides the weights by their mean so that the loss
    keeps the scale of unweighted BC (a fixed learning rate then behaves the same whatever the
    overall level of ``U_hat``); a batch whose weights are all 0 is left at 0.

    Args:
        tensordict (TensorDictBase): data holding ``uncertainty_key`` ``[*B, 1]`` or ``[*B]``.

    Keyword Args:
        uncertainty_key (NestedKey): entry holding ``U_hat``. Defaults to ``"uncertainty"``.
        weight_key (NestedKey): entry written. Defaults to ``"bc_weight"``.
        normalize (bool): rescale to mean 1. Defaults to ``False``.

    Returns:
        the same tensordict, with ``weight_key`` set.

    Examples:
        >>> from tensordict import TensorDict
        >>> from torchrl_depeff.modules.labeler import bc_weights
        >>> td = TensorDict(uncertainty=torch.tensor([[1.0], [0.25], [0.0]]), batch_size=[3])
        >>> bc_weights(td)["bc_weight"].flatten().tolist()
        [1.0, 0.25, 0.0]
        >>> bc_weights(td, normalize=True)["bc_weight"].flatten()
        tensor([2.4000, 0.6000, 0.0000])
    """
    u = _get(tensordict, uncertainty_key, "uncertainty").detach()
    if u.shape == tensordict.batch_size:
        u = u.unsqueeze(-1)
    if u.shape != (*tensordict.batch_size, 1):
        raise ValueError(
            f"{uncertainty_key!r} must have shape {(*tensordict.batch_size, 1)} or "
            f"{tuple(tensordict.batch_size)}, got {tuple(u.shape)}"
        )
    if u.numel() and not bool(((u >= 0) & (u <= 1)).all()):
        raise ValueError(
            f"{uncertainty_key!r} must hold finite eq. (9) values in [0, 1], got min "
            f"{float(u.min())} and max {float(u.max())}"
        )
    weight = u.clone()  # MUSBO eq. (11)
    if normalize:
        weight = weight / weight.mean().clamp_min(torch.finfo(weight.dtype).tiny)
    tensordict.set(weight_key, weight)
    return tensordict


class UncertaintyLabeler(TensorDictModuleBase):
    r"""MUSBO's uncertainty labeler ``P_hat`` (sec. 3.2, eq. (9)-(10), App. F).

    A separate probabilistic ensemble (PNN, Chua et al. 2018) of ``K`` members, distinct from the
    dynamics ensemble ``T_hat`` so that errors of one do not propagate to the other. It is a pure
    module: fit its :attr:`ensemble` with the Gaussian NLL of eq. (10) by
    :class:`~torchrl_depeff.trainers.EnsembleTrainer` (MUSBO App. F: Adam ``1e-3``, batch 256,
    85/15 holdout, per-member early stopping with patience 3), e.g.
    ``EnsembleTrainer(labeler.ensemble, loss_type="nll", patience=3).fit(data)``.

    :meth:`forward` reads ``"observation"``, ``"action"`` and ``("next", "observation")`` and
    writes ``"uncertainty"`` ``[*B, 1]`` = ``U_hat`` of eq. (9) (see
    :func:`support_from_predictions` for the ``member_reduction`` choice). Choices: the
    prediction ``s_hat^(i)`` of a PNN member is its *mean* (eq. 9 uses a point prediction); the
    error is measured in the raw state space, as written. Rows are processed in chunks of
    ``chunk_size`` (bounded memory on large datasets; every chunk is one batched ensemble
    call). The labels carry no gradient.

    Which data to fit is the caller's choice: the paper's sec. 3.2 fits ``P_hat`` on batches
    ``B(1..i-1)`` and labels the newest batch ``B(i)`` (its errors then measure novelty), while
    App. F fits it on all deployment data (what :class:`~torchrl_depeff.algorithms.MUSBO` does).

    Args:
        observation_dim (int): state size ``d``.
        action_dim (int): action size.
        num_members (int): ``K >= 2`` (eq. (12) needs a pair). Defaults to ``3``.
        num_cells (sequence of int): hidden sizes. Defaults to ``(1024, 1024)``.

    Keyword Args:
        member_reduction (str): ``"equation"`` or ``"max_error"``. Defaults to ``"equation"``.
        activation (type): hidden activation. Defaults to ``nn.ReLU``.
        uncertainty_key (NestedKey): entry written. Defaults to ``"uncertainty"``.
        chunk_size (int): rows per batched call in :meth:`forward`. Defaults to ``65536``.

    Examples:
        >>> from tensordict import TensorDict
        >>> from torchrl_depeff.modules.labeler import UncertaintyLabeler
        >>> from torchrl_depeff.trainers import EnsembleTrainer
        >>> labeler = UncertaintyLabeler(3, 1, num_members=3, num_cells=(16,))
        >>> obs, act = torch.randn(64, 3), torch.randn(64, 1)
        >>> data = TensorDict({"observation": obs, "action": act,
        ...                    ("next", "observation"): obs + 0.1 * act}, [64])
        >>> result = EnsembleTrainer(labeler.ensemble, loss_type="nll", max_epochs=2).fit(data)
        >>> u = labeler(data)["uncertainty"]
        >>> u.shape, bool(((u >= 0) & (u <= 1)).all()), u.requires_grad
        (torch.Size([64, 1]), True, False)
    """

    _MOVED = ("lr", "batch_size", "holdout_ratio", "patience", "max_epochs", "seed", "logger")

    def __init__(
        self,
        observation_dim: int,
        action_dim: int,
        num_members: int = 3,
        num_cells: Sequence[int] = (1024, 1024),
        *,
        member_reduction: str = "equation",
        activation: type[nn.Module] = nn.ReLU,
        uncertainty_key: NestedKey = "uncertainty",
        chunk_size: int = 65536,
        **fit_kwargs: Any,
    ) -> None:
        super().__init__()
        unknown = sorted(set(fit_kwargs) - set(self._MOVED))
        if unknown:
            raise TypeError(f"UncertaintyLabeler got unexpected keyword arguments {unknown}")
        if fit_kwargs:
            raise TypeError(
                f"UncertaintyLabeler no longer fits itself: {sorted(fit_kwargs)} are arguments of "
                "torchrl_depeff.trainers.EnsembleTrainer(labeler.ensemble, loss_type='nll', ...)"
            )
        if not isinstance(num_members, int) or num_members < 2:
            raise ValueError(
                "the uncertainty labeler needs num_members K >= 2 (MUSBO eq. 12 samples a pair), "
                f"got {num_members!r}"
            )
        if member_reduction not in _MEMBER_REDUCTIONS:
            raise ValueError(
                f"member_reduction must be one of {_MEMBER_REDUCTIONS}, got {member_reduction!r}"
            )
        if not isinstance(chunk_size, int) or chunk_size < 1:
            raise ValueError(f"chunk_size must be a positive int, got {chunk_size!r}")
        self.member_reduction = member_reduction
        self.chunk_size = chunk_size
        self.uncertainty_key = uncertainty_key
        self.in_keys = ["observation", "action", ("next", "observation")]
        self.out_keys = [uncertainty_key]
        # MUSBO App. F: K = 3 PNN, 2 x 1024
        self.ensemble = DynamicsEnsemble(
            observation_dim, action_dim, num_members=num_members, num_cells=num_cells,
            activation=activation, probabilistic=True, predict_reward=False,
        )

    @property
    def num_members(self) -> int:
        """Ensemble size ``K``."""
        return self.ensemble.num_members

    def fit(self, data: TensorDictBase) -> Any:
        """Removed: the labeler is a pure module (see the class doc)."""
        raise AttributeError(
            "UncertaintyLabeler.fit was removed: fit the labeler with "
            "torchrl_depeff.trainers.EnsembleTrainer(labeler.ensemble, loss_type='nll', ...).fit(data)"
        )

    @torch.no_grad()
    def predict(self, observation: torch.Tensor, action: torch.Tensor) -> torch.Tensor:
        """Member mean predictions of the next state ``[K, *B, d]`` (chunked, no gradient).

        Examples:
            >>> from torchrl_depeff.modules.labeler import UncertaintyLabeler
            >>> labeler = UncertaintyLabeler(3, 1, num_members=2, num_cells=(8,))
            >>> labeler.predict(torch.randn(5, 4, 3), torch.randn(5, 4, 1)).shape
            torch.Size([2, 5, 4, 3])
        """
        batch = observation.shape[:-1]
        obs = observation.reshape(-1, observation.shape[-1])
        act = action.reshape(-1, action.shape[-1])
        if obs.shape[0] != act.shape[0]:
            raise ValueError(
                f"observation batch {tuple(batch)} does not match action batch "
                f"{tuple(action.shape[:-1])}"
            )
        outs = [
            self.ensemble.predict(o, a).loc
            for o, a in zip(obs.split(self.chunk_size), act.split(self.chunk_size))
        ]
        loc = torch.cat(outs, dim=1) if outs else obs.new_empty(self.num_members, 0, obs.shape[-1])
        return loc.reshape(self.num_members, *batch, observation.shape[-1])

    @torch.no_grad()
    def forward(self, tensordict: TensorDictBase) -> TensorDictBase:
        """Write ``U_hat`` of eq. (9), ``[*B, 1]``, under ``uncertainty_key`` (no gradient)."""
        obs = _get(tensordict, "observation", "observation")
        act = _get(tensordict, "action", "action")
        next_obs = _get(
            tensordict, ("next", "observation"), "next observation (eq. 9 needs the ground truth)"
        )
        preds = self.predict(obs, act)
        u = support_from_predictions(preds, next_obs, member_reduction=self.member_reduction)
        tensordict.set(self.uncertainty_key, u)
        return tensordict


class LabelerDisagreement(TensorDictModuleBase):
    r"""MUSBO eq. (12) labels for imaginary rollouts: squared disagreement of a random labeler pair.

    Reads ``"observation"`` and ``"action"`` (no ground-truth next state exists in a model
    rollout), draws two distinct members ``i != j`` of the labeler uniformly and writes
    ``d^2 = ||s_hat^(i)_{t+1} - s_hat^(j)_{t+1}||_2^2`` ``[*B, 1]`` (no gradient) under
    ``out_key``, the ``"uncertainty"`` entry that
    :class:`~torchrl_depeff.objectives.UncertaintyWeightedTRPOLoss` reads in its ``[*B, 1]``
    form and maps to ``exp(-alpha * d^2)`` (eq. 12-13). Writing ``d^2`` rather than the weight
    keeps ``alpha`` in one place, the loss.

    Pair sampling (``pair``): the paper samples "two models (i, j)" for "the generated fictitious
    trajectory". ``"per_trajectory"`` (default) draws a pair for every index of all batch dims but
    the last one (a rollout TensorDict is ``[*N, T]``, time last); with a single batch dim it is
    the same as ``"per_call"``, one pair for the whole call. ``"per_row"`` draws a pair for every
    row.

    Evaluation (``kernel``): ``"grouped"`` evaluates only the two drawn members of each row,
    two ``predict(..., member_index=...)`` calls (``2N`` row-member evaluations instead of
    ``K N``); ``"all_members"`` evaluates all ``K`` members in one batched call and gathers the
    pair. ``"auto"``: ``"grouped"`` on CPU, ``"all_members"`` on CUDA. Measured on this
    project's 2-core CPU (paper size K = 3, 2 x 1024, 20k rows, ``pair="per_row"``, machine
    shared and loaded): grouped 1.7 s vs 2.9 s best of 9 (1.4x by median). On CUDA the grouped
    path would use the padded kernel, which runs ``K`` x the rows of the largest group, wasteful
    when a single pair covers the whole batch; that choice is not measured (no GPU here).

    Args:
        labeler (UncertaintyLabeler): the fitted labeler.

    Keyword Args:
        pair (str): ``"per_trajectory"``, ``"per_call"`` or ``"per_row"``. Defaults to
            ``"per_trajectory"``.
        out_key (NestedKey): entry written. Defaults to ``"uncertainty"``.
        generator (torch.Generator, optional): RNG for the pair draws.
        kernel (str): ``"auto"``, ``"grouped"`` or ``"all_members"``. Defaults to ``"auto"``.

    Examples:
        >>> from tensordict import TensorDict
        >>> from torchrl_depeff.modules.labeler import UncertaintyLabeler, LabelerDisagreement
        >>> labeler = UncertaintyLabeler(3, 1, num_members=3, num_cells=(8,))
        >>> label = LabelerDisagreement(labeler, generator=torch.Generator().manual_seed(0))
        >>> rollout = TensorDict({"observation": torch.randn(4, 5, 3),
        ...                       "action": torch.randn(4, 5, 1)}, [4, 5])
        >>> d2 = label(rollout)["uncertainty"]
        >>> d2.shape, bool((d2 >= 0).all())
        (torch.Size([4, 5, 1]), True)
    """

    def __init__(
        self,
        labeler: UncertaintyLabeler,
        *,
        pair: str = "per_trajectory",
        out_key: NestedKey = "uncertainty",
        generator: torch.Generator | None = None,
        kernel: str = "auto",
    ) -> None:
        super().__init__()
        if not isinstance(labeler, UncertaintyLabeler):
            raise TypeError(f"labeler must be an UncertaintyLabeler, got {type(labeler).__name__}")
        if pair not in _PAIR_MODES:
            raise ValueError(f"pair must be one of {_PAIR_MODES}, got {pair!r}")
        if kernel not in _DISAGREEMENT_KERNELS:
            raise ValueError(f"kernel must be one of {_DISAGREEMENT_KERNELS}, got {kernel!r}")
        self.labeler = labeler
        self.pair = pair
        self.kernel = kernel
        self.out_key = out_key
        self.generator = generator
        self.in_keys = ["observation", "action"]
        self.out_keys = [out_key]

    def sample_pair(self, shape: Sequence[int]) -> tuple[torch.Tensor, torch.Tensor]:
        """Two index tensors of ``shape`` with ``i != j`` everywhere, uniform over ordered pairs.

        Examples:
            >>> from torchrl_depeff.modules.labeler import UncertaintyLabeler, LabelerDisagreement
            >>> label = LabelerDisagreement(UncertaintyLabeler(2, 1, num_members=3, num_cells=(4,)))
            >>> i, j = label.sample_pair((1000,))
            >>> bool((i != j).all()), sorted(i.unique().tolist())
            (True, [0, 1, 2])
        """
        K = self.labeler.num_members
        i = torch.randint(K, tuple(shape), generator=self.generator)
        j = (i + 1 + torch.randint(K - 1, tuple(shape), generator=self.generator)) % K
        return i, j

    @torch.no_grad()
    def forward(self, tensordict: TensorDictBase) -> TensorDictBase:
        obs = _get(tensordict, "observation", "observation")
        act = _get(tensordict, "action", "action")
        batch = obs.shape[:-1]
        if self.pair == "per_row":
            shape = tuple(batch)
        elif self.pair == "per_trajectory" and len(batch) >= 2:
            shape = (*batch[:-1], 1)
        else:
            shape = (1,) * len(batch)
        i, j = (idx.to(obs.device).expand(batch) for idx in self.sample_pair(shape))
        kernel = self.kernel
        if kernel == "auto":
            kernel = "all_members" if obs.is_cuda else "grouped"
        if kernel == "all_members":
            d2 = pair_sq_disagreement(self.labeler.predict(obs, act), i, j)  # MUSBO eq. (12)
        else:
            ens, chunk = self.labeler.ensemble, self.labeler.chunk_size
            flat = [x.reshape(-1, x.shape[-1]) for x in (obs, act)]
            parts = []
            for o, a, ic, jc in zip(
                flat[0].split(chunk),
                flat[1].split(chunk),
                i.reshape(-1).split(chunk),
                j.reshape(-1).split(chunk),
            ):
                s_i = ens.predict(o, a, member_index=ic).loc
                s_j = ens.predict(o, a, member_index=jc).loc
                parts.append((s_i - s_j).pow(2).sum(-1, keepdim=True))  # MUSBO eq. (12)
            d2 = torch.cat(parts) if parts else obs.new_zeros(0, 1)
            d2 = d2.reshape(*batch, 1)
        tensordict.set(self.out_key, d2)
        return tensordict


class ExplorationUncertainty(TensorDictModuleBase):
    r"""MUSBO eq. (22) noise variance at deployment, from the labeler, before the next state exists.

    Eq. (22) acts with ``a = tanh(mu(s)) + const + N(0, U_hat(a, s))`` but eq. (9)'s ``U_hat``
    needs the true next state, unknown when acting. Choice: each member's error is replaced by
    its expectation under the labeler's own predictive mixture (:func:`expected_sq_error`),
    then clipped to ``[0, 1]`` as in eq. (9), at the pre-noise action read from ``action_key``
    (``tanh(mu(s))``; the small ``const`` perturbation, std 0.01 in the paper, is ignored).

    ``mode`` picks what becomes the variance:

    * ``"support"`` (default): ``U_hat = 1 - clip(e, 0, 1)``, eq. (22) as printed (largest
      noise where the data support is high);
    * ``"error"``: ``clip(e, 0, 1)``, the clipped expected error (``1 - U_hat``), so the noise
      is largest where the labeler is unsure, as the text reads ("taking the actions which lead
      to maximal prediction error ... leads to novel experience discovery"). Measured on
      HalfCheetah at MUSBO's quick scale, it saturates at the clip (std ~1 noise) and wrecks the
      deployments (see :mod:`torchrl_depeff.algorithms.musbo`).

    Members are combined as in eq. (9) (``member_reduction="equation"``: the best member, i.e.
    the smallest error; ``"max_error"``: the largest), taken from the labeler. Write it before
    :class:`~torchrl_depeff.modules.UncertaintyActionNoise`, which reads ``"uncertainty"`` as a
    variance by default. No gradient.

    Args:
        labeler (UncertaintyLabeler): the fitted labeler.

    Keyword Args:
        mode (str): ``"support"`` or ``"error"``. Defaults to ``"support"``.
        aleatoric (bool): include the members' predicted variance in the expected error
            (:func:`expected_sq_error`). ``False`` keeps only the epistemic part (member
            disagreement). Measured on HalfCheetah at the MUSBO quick preset (4000 samples per
            deployment), both settings put the raw-state-space error above eq. (9)'s clip at 1
            almost everywhere (mean variance 0.999 and 1.0), i.e. noise of std ~1 on actions in
            ``[-1, 1]``. Defaults to ``True``.
        action_key (NestedKey): action at which ``U`` is evaluated. Defaults to ``"action"``.
        out_key (NestedKey): entry written, ``[*B, 1]``. Defaults to ``"uncertainty"``.

    Examples:
        >>> from tensordict import TensorDict
        >>> from torchrl_depeff.modules.actors import UncertaintyActionNoise
        >>> from torchrl_depeff.modules.labeler import UncertaintyLabeler, ExplorationUncertainty
        >>> labeler = UncertaintyLabeler(3, 1, num_members=3, num_cells=(8,))
        >>> td = TensorDict(observation=torch.randn(6, 3), action=torch.zeros(6, 1), batch_size=[6])
        >>> td = ExplorationUncertainty(labeler)(td)
        >>> u = td["uncertainty"]
        >>> u.shape, bool(((u >= 0) & (u <= 1)).all())
        (torch.Size([6, 1]), True)
        >>> UncertaintyActionNoise(const_std=0.01)(td)["action"].shape
        torch.Size([6, 1])
    """

    def __init__(
        self,
        labeler: UncertaintyLabeler,
        *,
        mode: str = "support",
        aleatoric: bool = True,
        action_key: NestedKey = "action",
        out_key: NestedKey = "uncertainty",
    ) -> None:
        super().__init__()
        if not isinstance(labeler, UncertaintyLabeler):
            raise TypeError(f"labeler must be an UncertaintyLabeler, got {type(labeler).__name__}")
        if mode not in _EXPLORATION_MODES:
            raise ValueError(f"mode must be one of {_EXPLORATION_MODES}, got {mode!r}")
        self.labeler = labeler
        self.mode = mode
        self.aleatoric = bool(aleatoric)
        self.action_key = action_key
        self.out_key = out_key
        self.in_keys = ["observation", action_key]
        self.out_keys = [out_key]

    @torch.no_grad()
    def forward(self, tensordict: TensorDictBase) -> TensorDictBase:
        obs = _get(tensordict, "observation", "observation")
        act = _get(tensordict, self.action_key, "action")
        batch = obs.shape[:-1]
        ens = self.labeler.ensemble
        flat_obs, flat_act = obs.reshape(-1, obs.shape[-1]), act.reshape(-1, act.shape[-1])
        errs = []
        chunk = self.labeler.chunk_size
        for o, a in zip(flat_obs.split(chunk), flat_act.split(chunk)):
            pred = ens.predict(o, a)
            errs.append(expected_sq_error(pred.loc, pred.scale if self.aleatoric else None))  # [K, n, 1]
        err = torch.cat(errs, 1) if errs else flat_obs.new_zeros(self.labeler.num_members, 0, 1)
        err = err.reshape(self.labeler.num_members, *batch, 1).clamp(0.0, 1.0)  # eq. (9) clip
        # member choice as in eq. (9): "equation" = best member (smallest error)
        err = err.amin(0) if self.labeler.member_reduction == "equation" else err.amax(0)
        # MUSBO eq. (22): variance of the exploration noise
        tensordict.set(self.out_key, err if self.mode == "error" else 1.0 - err)
        return tensordict
