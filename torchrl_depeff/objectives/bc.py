"""Behaviour cloning: BREMEN eq. (3) and MUSBO's uncertainty-weighted variant, eq. (11).

BREMEN (https://arxiv.org/abs/2006.03647) re-initialises its policy after every deployment by
cloning the data with a fixed-variance Gaussian, i.e. least squares on the mean (eq. 3), with
Adam at lr ``5e-4`` and batch 256 (App. F). MUSBO weights each squared error by the uncertainty
coefficient ``U(a_t, s_t)`` (eq. 11) and trains on an 85/15 split with early stopping after 3
epochs without validation improvement (App. F).
"""
from __future__ import annotations

import copy
import math
import warnings
from dataclasses import dataclass
from typing import Any, Callable

import torch
from tensordict import TensorDict, TensorDictBase, TensorDictParams, unravel_key
from tensordict.nn import dispatch, ProbabilisticTensorDictSequential, TensorDictModuleBase
from tensordict.utils import NestedKey
from torchrl._utils import logger as torchrl_logger
from torchrl.objectives.common import LossModule

from torchrl_depeff.modules._plain import _call_plain, _plain_probabilistic_parts, _plain_tdmodule
from torchrl_depeff.objectives._keys import LazyKeys

__all__ = ["BCLoss", "WeightedBCLoss", "train_bc"]

_LOSS_TYPES = ("mse", "log_prob")
_REDUCTIONS = ("mean", "sum", "none")


def _get(td: TensorDictBase, key: NestedKey) -> torch.Tensor:
    value = td.get(key, default=None)
    if value is None:
        raise KeyError(f"key {key!r} not found in the input TensorDict (keys: {list(td.keys(True, True))})")
    return value


def _same_memory(a: torch.Tensor, b: torch.Tensor) -> bool:
    return a is b or (
        a.data_ptr() == b.data_ptr() and a.shape == b.shape and a.stride() == b.stride()
        and a.dtype == b.dtype and a.device == b.device
    )


def _half_squared_error(action: torch.Tensor, loc: torch.Tensor) -> torch.Tensor:
    # BREMEN eq. (3): 1/2 ||a - mu(s)||^2 summed over action dimensions, [*B]
    return 0.5 * (action - loc).pow(2).sum(-1)


class WeightedBCLoss(LazyKeys, LossModule):
    r"""(Weighted) behaviour-cloning loss (BREMEN eq. (3), MUSBO eq. (11)).

    ``loss_type="mse"`` is BREMEN eq. (3), :math:`\tfrac12\|a_t - \mu_\beta(s_t)\|_2^2` summed over
    action dimensions, where :math:`\mu_\beta` is the deterministic mean the actor writes under
    ``loc`` (fixed variance, so the Gaussian NLL reduces to this up to constants). The actor may
    be a :class:`~torchrl.modules.ProbabilisticActor` or any module writing ``loc``.
    ``loss_type="log_prob"`` is :math:`-\log\pi_\beta(a_t|s_t)` (needs ``actor.get_dist``), for
    actors with learned variance or mixtures.

    With the ``weight`` key set (``weight_key=`` or ``set_keys(weight=...)``), each row is
    multiplied by the (detached) weight read from that entry, MUSBO eq. (11):
    :math:`\frac{1}{|D|}\sum \hat U(a_t,s_t)\,\tfrac12\|a_t-\hat\pi_\beta(s_t)\|^2`.
    Choice: ``reduction="mean"`` divides by the number of rows, as eq. (11) does, not by the sum
    of the weights (TorchRL's ``_reduce_loss(weights=...)`` convention), so scaling all weights
    scales the loss.

    Named apart from :class:`torchrl.objectives.BCLoss` (TorchRL's plain behaviour cloning, key
    ``"loss_bc"``); :class:`BCLoss` here is a deprecated alias that keeps the old key.
    :meth:`forward` never synchronises with the host: validate a batch with :meth:`check_inputs`.

    Args:
        actor_network (TensorDictModuleBase): the policy to clone.

    Keyword Args:
        loss_type (str): ``"mse"`` or ``"log_prob"``. Defaults to ``"mse"``.
        weight_key (NestedKey, optional): per-sample weight entry ``[*B]`` or ``[*B, 1]``
            (sets the ``weight`` key). Defaults to ``None`` (unweighted).
        reduction (str): ``"mean"``, ``"sum"`` or ``"none"``. Defaults to ``"mean"``.
        check_inputs (bool, deprecated): ignored (see :meth:`check_inputs`).

    Output keys: ``"loss_weighted_bc"`` and the detached, unweighted diagnostic ``"mse"``
    (mean of :math:`\tfrac12\|a-\mu\|^2`; for ``"log_prob"`` ``mu`` is the distribution's
    ``deterministic_sample``).

    Examples:
        >>> from torchrl_depeff.objectives.bc import WeightedBCLoss
        >>> from tensordict import TensorDict
        >>> from tensordict.nn import TensorDictModule
        >>> actor = TensorDictModule(torch.nn.Linear(3, 2), in_keys=["observation"], out_keys=["loc"])
        >>> loss = WeightedBCLoss(actor, weight_key="uncertainty")
        >>> td = TensorDict({"observation": torch.randn(8, 3), "action": torch.rand(8, 2),
        ...                  "uncertainty": torch.rand(8)}, batch_size=[8])
        >>> out = loss(td)
        >>> sorted(out.keys()), out["loss_weighted_bc"].shape
        (['loss_weighted_bc', 'mse'], torch.Size([]))
    """

    @dataclass
    class _AcceptedKeys:
        """Configurable entries.

        Attributes:
            action (NestedKey): dataset action. Defaults to ``"action"``.
            loc (NestedKey): actor mean written by the actor (one of its ``out_keys``).
                Defaults to ``"loc"``.
            weight (NestedKey, optional): per-sample weight (MUSBO eq. 11). Defaults to ``None``.
        """

        action: NestedKey = "action"
        loc: NestedKey = "loc"
        weight: NestedKey | None = None

    default_keys = _AcceptedKeys
    tensor_keys: _AcceptedKeys
    _loss_key = "loss_weighted_bc"

    actor_network: TensorDictModuleBase
    actor_network_params: TensorDictParams
    target_actor_network_params: TensorDictParams

    def __init__(
        self,
        actor_network: TensorDictModuleBase,
        *,
        loss_type: str = "mse",
        weight_key: NestedKey | None = None,
        reduction: str = "mean",
        check_inputs: bool | None = None,
    ) -> None:
        if loss_type not in _LOSS_TYPES:
            raise ValueError(f"loss_type must be one of {_LOSS_TYPES}, got {loss_type!r}")
        if reduction not in _REDUCTIONS:
            raise ValueError(f"reduction must be one of {_REDUCTIONS}, got {reduction!r}")
        if not isinstance(actor_network, TensorDictModuleBase):
            raise TypeError(f"actor_network must be a TensorDictModuleBase, got {type(actor_network).__name__}")
        if loss_type == "log_prob" and not hasattr(actor_network, "get_dist"):
            raise TypeError(
                f"loss_type='log_prob' needs an actor with get_dist (e.g. ProbabilisticActor), "
                f"got {type(actor_network).__name__}"
            )
        if check_inputs is not None:
            warnings.warn(
                f"{type(self).__name__}(check_inputs=...) is deprecated and ignored: forward never synchronises "
                "with the host; call loss.check_inputs(batch) to validate a batch",
                FutureWarning, stacklevel=2,
            )
        self._in_keys = None
        self._out_keys = None
        super().__init__()
        self.convert_to_functional(actor_network, "actor_network")
        self.loss_type = loss_type
        self.reduction = reduction
        if weight_key is not None:
            self.set_keys(weight=weight_key)

    def _set_in_keys(self) -> None:
        keys = [*self.actor_network.in_keys, self.tensor_keys.action]
        if self.tensor_keys.weight is not None:
            keys.append(self.tensor_keys.weight)
        self._in_keys = list(dict.fromkeys(keys))

    def _default_out_keys(self) -> list[NestedKey]:
        return [self._loss_key, "mse"]

    def _forward_value_estimator_keys(self, **kwargs: Any) -> None:
        self._in_keys = None  # no value estimator; the keys feed in_keys
        if "loc" in kwargs and self.loss_type == "mse" and self.tensor_keys.loc not in self.actor_network.out_keys:
            raise ValueError(
                f"the loc key {self.tensor_keys.loc!r} is not written by the actor (out_keys "
                f"{list(self.actor_network.out_keys)})"
            )

    def check_inputs(self, tensordict: TensorDictBase) -> None:
        """Raise a clear error for a batch the loss cannot use (one host sync per call).

        Raises:
            KeyError: an entry the loss reads is missing (named).
            ValueError: an entry holds NaN/inf values (named).
        """
        if not isinstance(tensordict, TensorDictBase):
            raise TypeError(f"expected a TensorDictBase, got {type(tensordict).__name__}")
        values = [(key, _get(tensordict, key)) for key in self.in_keys]
        floats = [(key, v) for key, v in values if v.is_floating_point()]
        if not floats:
            return
        finite = torch.stack([torch.isfinite(v).all() for _, v in floats]).tolist()
        bad = [key for (key, _), ok in zip(floats, finite) if not ok]
        if bad:
            raise ValueError(f"{type(self).__name__}: entries {bad} contain NaN or inf values")

    @dispatch
    def forward(self, tensordict: TensorDictBase) -> TensorDictBase:
        """Compute the loss (and the ``"mse"`` diagnostic) without writing into the input."""
        keys = self.tensor_keys
        action = _get(tensordict, keys.action)
        for key in self.actor_network.in_keys:
            _get(tensordict, key)
        td_in = tensordict.select(*self.actor_network.in_keys, strict=False).copy()

        with self.actor_network_params.to_module(self.actor_network):
            if self.loss_type == "mse":
                # eq. (3) needs the mean only: a probabilistic actor runs its deterministic part
                # (the same ops for the mean, no distribution, sample or log-prob)
                net = self.actor_network
                run = net.get_dist_params if isinstance(net, ProbabilisticTensorDictSequential) else net
                loc = run(td_in).get(keys.loc, default=None)
                if loc is None:
                    raise KeyError(f"the actor did not write the mean entry {keys.loc!r}")
            else:
                dist = self.actor_network.get_dist(td_in)
                neg_log_prob = -dist.log_prob(action)  # [*B]
                loc = getattr(dist, "deterministic_sample", None)
                if loc is None:
                    loc = dist.mean
        if loc.shape != action.shape:
            raise ValueError(
                f"actor mean {keys.loc!r} has shape {tuple(loc.shape)}, the action "
                f"{keys.action!r} has shape {tuple(action.shape)}"
            )
        half_sq = _half_squared_error(action, loc)
        per_sample = half_sq if self.loss_type == "mse" else neg_log_prob
        if keys.weight is not None:
            per_sample = self._weighted(per_sample, _get(tensordict, keys.weight))
        loss = self._reduce_loss(per_sample, tensordict)
        return TensorDict({self._loss_key: loss, "mse": half_sq.detach().mean()}, batch_size=[])

    def _weighted(self, per_sample: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
        # MUSBO eq. (11): mean over rows of U * loss (the weight detached)
        weight = weight.detach()
        if weight.shape == per_sample.shape + (1,):
            weight = weight.squeeze(-1)
        if weight.shape != per_sample.shape:
            raise ValueError(
                f"weight {self.tensor_keys.weight!r} must have shape {tuple(per_sample.shape)} (or with a "
                f"trailing 1), got {tuple(weight.shape)}"
            )
        return weight * per_sample

    def _plain_loss(self) -> Callable[[dict], torch.Tensor] | None:
        """``entries -> loss`` of :meth:`forward` on plain tensors, or ``None`` where it would differ.

        For ``loss_type="mse"`` and an actor whose networks :mod:`torchrl_depeff.modules._plain`
        calls exactly (a plain ``TensorDictModule``, or the plain networks before the
        probabilistic module of a ``ProbabilisticActor``, which is all
        :meth:`~tensordict.nn.ProbabilisticTensorDictSequential.get_dist_params` runs), whose
        parameters and buffers are the loss's own tensors (so ``to_module`` swaps nothing in):
        the same networks and arithmetic as :meth:`forward`, without the tensordict plumbing,
        the parameter swap and the ``"mse"`` diagnostic, i.e. the same loss bit for bit and the
        same gradients. ``entries`` maps :attr:`in_keys` (unravelled) to tensors; the loss-mask
        entries :meth:`_reduce_loss` looks up are not read, so a caller whose data holds one
        must use :meth:`forward`. Used by :func:`train_bc`.
        """
        net = self.actor_network
        if self.loss_type != "mse":
            return None
        if isinstance(net, ProbabilisticTensorDictSequential):
            parts = _plain_probabilistic_parts(net)
            if parts is None or type(net).get_dist_params is not ProbabilisticTensorDictSequential.get_dist_params:
                return None
            steps = parts[0]
        elif _plain_tdmodule(net):
            steps = [(net.module, [unravel_key(k) for k in net.in_keys], [unravel_key(k) for k in net.out_keys])]
        else:
            return None
        # the loss's parameters must be the network's own objects (their .grad is what the
        # optimiser reads); a buffer may be another tensor over the same memory
        own = dict(self.actor_network_params.flatten_keys(".").items())
        params, buffers = dict(net.named_parameters()), dict(net.named_buffers())
        if own.keys() != params.keys() | buffers.keys():
            return None
        if any(own[k] is not v for k, v in params.items()) or not all(
            _same_memory(own[k], v) for k, v in buffers.items()
        ):
            return None
        keys = self.tensor_keys
        loc_key, action_key = unravel_key(keys.loc), unravel_key(keys.action)
        weight_key = None if keys.weight is None else unravel_key(keys.weight)
        if all(loc_key not in outs for _, _, outs in steps):
            return None
        in_keys = [unravel_key(k) for k in net.in_keys]

        def loss(entries: dict) -> torch.Tensor:
            out = {k: entries[k] for k in in_keys}
            for module, ins, outs in steps:
                out.update(_call_plain(module, [out[k] for k in ins], outs))
            per_sample = _half_squared_error(entries[action_key], out[loc_key])
            if weight_key is not None:
                per_sample = self._weighted(per_sample, entries[weight_key])
            return self._reduce_loss(per_sample, None)

        return loss


class BCLoss(WeightedBCLoss):
    """Deprecated alias of :class:`WeightedBCLoss` writing the former key ``"loss_bc"``.

    Renamed because :class:`torchrl.objectives.BCLoss` is TorchRL's plain behaviour-cloning loss
    with the same name and output key.

    Examples:
        >>> import warnings
        >>> from tensordict.nn import TensorDictModule
        >>> from torchrl_depeff.objectives.bc import BCLoss
        >>> with warnings.catch_warnings(record=True) as caught:
        ...     warnings.simplefilter("always")
        ...     loss = BCLoss(TensorDictModule(torch.nn.Linear(3, 2), ["observation"], ["loc"]))
        >>> loss.out_keys, caught[0].category.__name__
        (['loss_bc', 'mse'], 'FutureWarning')
    """

    _loss_key = "loss_bc"

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        warnings.warn(
            "torchrl_depeff.objectives.BCLoss is deprecated (its name and 'loss_bc' key clash with "
            "torchrl.objectives.BCLoss): use WeightedBCLoss, which writes 'loss_weighted_bc'",
            FutureWarning, stacklevel=2,
        )
        super().__init__(*args, **kwargs)


def train_bc(
    actor: TensorDictModuleBase,
    data: TensorDictBase,
    *,
    lr: float = 5e-4,
    batch_size: int = 256,
    holdout_ratio: float = 0.15,
    max_epochs: int = 100,
    patience: int = 3,
    weight_key: NestedKey | None = None,
    loss_type: str = "mse",
    progress: bool = False,
    seed: int = 0,
) -> dict[str, Any]:
    """Fit ``actor`` to ``data`` by (weighted) behaviour cloning, in place.

    BREMEN Alg. 1 line 5 / MUSBO Alg. 1 line 6: Adam (lr ``5e-4``, BREMEN App. F and MUSBO App. F),
    minibatches of 256 (BREMEN App. F), a random ``holdout_ratio`` split (MUSBO App. F: 85 % / 15 %)
    and early stopping once the holdout loss has not improved for ``patience`` consecutive epochs
    (MUSBO App. F: 3).

    Choices: the holdout loss is the same (weighted) BC loss as the training one; at the end the
    parameters of the best holdout epoch are restored (the papers do not say; restoring avoids
    returning an over-fitted policy); with ``holdout_ratio=0`` (or fewer than 2 rows) there is no
    early stopping and all ``max_epochs`` run. An epoch is one pass over the training split in a
    fresh random order (the last partial minibatch is kept).

    Speed: only the entries the loss reads are indexed per minibatch, and for the ``"mse"`` loss of
    an actor made of plain ``TensorDictModule`` networks the loss runs on their tensors
    (``WeightedBCLoss._plain_loss``), which gives :meth:`WeightedBCLoss.forward`'s values and
    gradients bit for bit; any other actor, or data holding a loss-mask entry, runs ``forward``.

    Args:
        actor (TensorDictModuleBase): policy to train, modified in place.
        data (TensorDictBase): transitions with the actor's input keys, ``"action"`` and, if
            ``weight_key`` is set, the weights. Any batch shape (flattened).
        lr (float): Adam learning rate. Defaults to ``5e-4``.
        batch_size (int): minibatch size. Defaults to ``256``.
        holdout_ratio (float): fraction held out for early stopping, in ``[0, 1)``. Defaults to ``0.15``.
        max_epochs (int): maximum number of epochs. Defaults to ``100``.
        patience (int): epochs without holdout improvement before stopping. Defaults to ``3``.
        weight_key (NestedKey, optional): per-sample weights (MUSBO eq. 11). Defaults to ``None``.
        loss_type (str): ``"mse"`` or ``"log_prob"``, see :class:`WeightedBCLoss`. Defaults to ``"mse"``.
        progress (bool): log the losses of every epoch. Defaults to ``False``.
        seed (int): seed of the split and minibatch order. Defaults to ``0``.

    Returns:
        dict with ``"epochs"`` (int), ``"train_loss"`` (last epoch's mean), ``"holdout_loss"``
        (best), ``"holdout_losses"`` (list per epoch), ``"best_epoch"`` and ``"stopped_early"``.

    Examples:
        >>> from torchrl_depeff.objectives.bc import train_bc
        >>> from tensordict import TensorDict
        >>> from tensordict.nn import TensorDictModule
        >>> _ = torch.manual_seed(0)
        >>> actor = TensorDictModule(torch.nn.Linear(3, 2), in_keys=["observation"], out_keys=["loc"])
        >>> obs = torch.randn(512, 3)
        >>> data = TensorDict({"observation": obs, "action": obs[:, :2] * 0.5}, batch_size=[512])
        >>> info = train_bc(actor, data, lr=1e-2, max_epochs=50)
        >>> info["holdout_loss"] < 0.01
        True
    """
    if not 0.0 <= holdout_ratio < 1.0:
        raise ValueError(f"holdout_ratio must be in [0, 1), got {holdout_ratio}")
    if batch_size < 1 or max_epochs < 1 or patience < 1:
        raise ValueError(
            f"batch_size, max_epochs and patience must be >= 1, got {batch_size}, {max_epochs}, {patience}"
        )
    if not lr > 0:
        raise ValueError(f"lr must be > 0, got {lr}")
    if data.batch_dims == 0 or data.batch_size.numel() == 0:
        # (TensorDict.numel() is 1 for a [0] batch: check the batch size itself)
        raise ValueError(f"train_bc got empty data (batch_size={list(data.batch_size)}): nothing to clone")
    data = data.reshape(-1)
    n = data.shape[0]
    fast_loss = WeightedBCLoss(actor, loss_type=loss_type, weight_key=weight_key)
    fast_loss.check_inputs(data)  # keys and finite values, once (one host sync)
    # only the entries the loss reads (its in_keys and the loss-mask entries TorchRL's
    # _reduce_loss looks up) are split and indexed every minibatch: a deployment's data holds
    # ~20 entries, each one an index op per step otherwise (same rows, same losses)
    present = set(data.keys(True, True))
    mask_keys = [k for k in fast_loss._loss_mask_keys() if unravel_key(k) in present]
    data = data.select(*fast_loss.in_keys, *mask_keys)
    fast_loss(data[:1])  # shapes
    generator = torch.Generator().manual_seed(seed)
    perm = torch.randperm(n, generator=generator)
    n_hold = int(math.floor(n * holdout_ratio)) if n >= 2 else 0
    holdout, train = data[perm[:n_hold]], data[perm[n_hold:]]
    loss_key = fast_loss._loss_key
    plain = None if mask_keys else fast_loss._plain_loss()
    if plain is not None:
        # the loss on plain tensors (WeightedBCLoss._plain_loss: the same bits, 1.3-1.4x faster
        # steps at BREMEN's BC shape, benchmarks/bench_bc.py)
        train_entries = {unravel_key(k): train.get(k) for k in fast_loss.in_keys}
        hold_entries = {unravel_key(k): holdout.get(k) for k in fast_loss.in_keys}

        def batch_loss(idx: torch.Tensor) -> torch.Tensor:
            return plain({k: v[idx] for k, v in train_entries.items()})

        def holdout_loss() -> torch.Tensor:
            return plain(hold_entries)
    else:

        def batch_loss(idx: torch.Tensor) -> torch.Tensor:
            return fast_loss(train[idx])[loss_key]

        def holdout_loss() -> torch.Tensor:
            return fast_loss(holdout)[loss_key]

    params = list(fast_loss.parameters())
    optim = torch.optim.Adam(params, lr=lr)
    n_train = train.shape[0]

    best, best_epoch, best_state, since_best = math.inf, -1, None, 0
    holdout_losses: list[float] = []
    train_loss, epoch, stopped_early = math.nan, 0, False
    for epoch in range(1, max_epochs + 1):
        order = torch.randperm(n_train, generator=generator)
        total = 0.0
        for start in range(0, n_train, batch_size):
            idx = order[start : start + batch_size]
            loss = batch_loss(idx)
            optim.zero_grad(set_to_none=True)
            loss.backward()
            optim.step()
            total += float(loss.detach()) * idx.shape[0]
        train_loss = total / n_train
        if n_hold > 0:
            with torch.no_grad():
                hold = float(holdout_loss())
            holdout_losses.append(hold)
            if hold < best:
                best, best_epoch, since_best = hold, epoch, 0
                best_state = copy.deepcopy(actor.state_dict())
            else:
                since_best += 1
        if progress:
            torchrl_logger.info(
                f"train_bc epoch {epoch}: train {train_loss:.5f} holdout "
                f"{holdout_losses[-1] if holdout_losses else float('nan'):.5f}"
            )
        if n_hold > 0 and since_best >= patience:
            stopped_early = True
            break
    if best_state is not None:
        actor.load_state_dict(best_state)
    return {
        "epochs": epoch,
        "train_loss": train_loss,
        "holdout_loss": best if n_hold > 0 else math.nan,
        "holdout_losses": holdout_losses,
        "best_epoch": best_epoch if n_hold > 0 else epoch,
        "stopped_early": stopped_early,
    }
