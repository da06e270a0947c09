"""Fit routine of the dynamics ensemble: holdout split, per-member early stopping, elites."""
from __future__ import annotations

import contextlib
import math
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import torch
import tqdm
from tensordict import TensorDict, TensorDictBase
from torch.nn.modules import module as _torch_module
from torch.optim import optimizer as _torch_optimizer
from torchrl._utils import logger as torchrl_logger

from torchrl_depeff.modules.ensemble import DynamicsEnsemble
from torchrl_depeff.objectives.dynamics import _LOG_2PI, EnsembleDynamicsLoss

__all__ = ["EnsembleTrainer", "FitResult"]

_OBS, _ACT, _NEXT_OBS, _REWARD = "observation", "action", ("next", "observation"), ("next", "reward")

#: ``EnsembleTrainer(matmul_precision=...)`` values (``None``: torch's own setting)
MATMUL_PRECISIONS = ("ieee", "bf16")


def _native_bf16() -> bool:
    """Whether oneDNN runs bfloat16 products natively on this CPU (AMX / AVX512-BF16)."""
    return bool(torch.backends.mkldnn.is_available() and torch.ops.mkldnn._is_mkldnn_bf16_supported())


def _check_matmul_precision(value: str | None) -> None:
    if value is None:
        return
    if value not in MATMUL_PRECISIONS:
        raise ValueError(f"matmul_precision must be None or one of {list(MATMUL_PRECISIONS)}, got {value!r}")
    if value == "bf16" and not _native_bf16():
        raise ValueError(
            "matmul_precision='bf16' needs oneDNN and a CPU with native bfloat16 (AVX512-BF16 or AMX); "
            "this machine has none (it would run emulated, slower than float32): use None or 'ieee'"
        )


@contextlib.contextmanager
def _cpu_matmul_precision(value: str | None) -> Iterator[None]:
    """``torch.backends.mkldnn.matmul.fp32_precision = value`` inside the block (``None``: untouched)."""
    if value is None:
        yield
        return
    settings = torch.backends.mkldnn.matmul
    previous = settings.fp32_precision
    settings.fp32_precision = value
    try:
        yield
    finally:
        settings.fp32_precision = previous


@dataclass
class _StepPlan:
    """How :meth:`EnsembleTrainer._train_step` runs during one epoch (see ``_step_plan``)."""

    optimizer: torch.optim.Adam
    params: list[torch.Tensor]
    manual_backward: bool


def _global_optimizer_hooks() -> bool:
    return bool(getattr(_torch_optimizer, "_global_optimizer_pre_hooks", None)
                or getattr(_torch_optimizer, "_global_optimizer_post_hooks", None))


def _has_module_hooks(module: torch.nn.Module) -> bool:
    names = ("_global_forward_hooks", "_global_forward_pre_hooks", "_global_backward_hooks",
             "_global_backward_pre_hooks")
    if any(getattr(_torch_module, name, None) for name in names):
        return True
    return any(m._forward_hooks or m._forward_pre_hooks or m._backward_hooks or m._backward_pre_hooks
               for m in module.modules())


@dataclass
class FitResult:
    """Outcome of :meth:`EnsembleTrainer.fit`.

    Attributes:
        train_loss (torch.Tensor): ``[E]`` mean training loss of each member during its best epoch.
        holdout_loss (torch.Tensor): ``[E]`` best holdout loss of each member (that of the
            restored parameters).
        epochs (int): number of epochs run.
        best_epoch (torch.Tensor): ``[E]`` 0-based epoch whose parameters each member kept.
        elites (torch.Tensor): elite member indices after the fit.
    """

    train_loss: torch.Tensor
    holdout_loss: torch.Tensor
    epochs: int
    best_epoch: torch.Tensor
    elites: torch.Tensor


class EnsembleTrainer:
    """Fits a :class:`~torchrl_depeff.modules.DynamicsEnsemble` on a transition dataset.

    Procedure of one :meth:`fit` call (BREMEN Alg. 1 line 4 / App. F.1, MUSBO App. F, MBPO):

    1. flatten the data to ``[N]`` (cast to the ensemble's dtype, e.g. float64 gym data to
       float32); raise ``ValueError`` for empty data and naming the key and count of NaN/inf;
    2. holdout split by a permutation seeded with ``seed`` (the same data gives the same split),
       ``min(int(holdout_ratio * N), max_holdout)`` rows held out (85/15 by default, MUSBO
       App. F). With ``holdout_ratio=0`` the training set is used for early stopping;
    3. refit both normalisers on ALL the data (train + holdout);
    4. epochs of Adam steps in which every member sees its own independently shuffled
       permutation of the training set, in ``[E, batch_size]`` minibatches (one batched step
       for all members, the arithmetic of :class:`EnsembleDynamicsLoss` with per-member
       batches). Inputs and targets are normalised once per fit and each chunk of minibatches
       is gathered at once into contiguous ``[E, batch_size, d]`` blocks, so a step is the
       network, the loss, the backward and a fused Adam update (no tensordict, no
       normaliser; the same numbers as running ``EnsembleDynamicsLoss`` on tensordict
       minibatches, tested). On CPU, after the first step the gradients go straight to the fused
       Adam kernel on the optimiser's own state (``optimizer.step()``'s Python and ``.grad``
       bookkeeping skipped), and a deterministic ReLU ensemble with the MSE loss has its
       backward written out with autograd's kernels (no graph); both bit for bit the generic
       path, which runs for custom optimisers, hooks or frozen parameters;
    5. after each epoch, the per-member holdout loss, every member on every holdout row in one
       batched matmul per layer (row chunks, no loop over members). The holdout score is the
       per-member mean squared error in normalised target space for both deterministic and
       probabilistic ensembles (as MBPO does: it does not reward a member for inflating its
       variance);
    6. per-member early stopping: a member improves when its holdout loss drops by more than
       1% relative to its best so far (MBPO's threshold ``(best - cur) / |best| > 0.01``); its
       parameters are then snapshotted. Training stops once every member has gone ``patience``
       epochs without improvement (or after ``max_epochs``), and each member's best parameter
       slices are restored with one masked copy per parameter tensor;
    7. elites = the ``num_elites`` members with the lowest best holdout loss.

    The Adam optimiser persists across calls (warm start across deployments) and is part of
    :meth:`state_dict`, with the epoch/step counters and the shuffling generator.

    Args:
        ensemble (DynamicsEnsemble): model to fit (its parameters must all be member-first ``[E, ...]``).

    Keyword Args:
        lr (float): Adam learning rate. Defaults to ``1e-3`` (BREMEN App. F.1, MB2PO).
        weight_decay (float): Adam weight decay (MB2PO uses ``1e-4``). Defaults to ``0.0``.
        batch_size (int): rows per member per step. Defaults to ``256``.
        holdout_ratio (float): fraction held out, in ``[0, 1)``. Defaults to ``0.15``.
        max_epochs (int): epoch cap per call. Defaults to ``100``.
        patience (int): epochs without improvement before a member stops. Defaults to ``5``.
        max_holdout (int): cap on the holdout size. Defaults to ``5000``.
        loss_type (str, optional): ``"mse"`` or ``"nll"``; defaults to ``"nll"`` for a
            probabilistic ensemble, ``"mse"`` otherwise.
        logger (torchrl Logger, optional): receives ``model/train_loss_m{i}`` and
            ``model/holdout_loss_m{i}`` every epoch (step = epochs run over all calls).
        progress (bool): tqdm progress bar over epochs. Defaults to ``False``.
        seed (int): seed of the holdout split and of the shuffling generator. Defaults to ``0``.
        matmul_precision (str, optional): float32 matrix-product precision on CPU during
            :meth:`fit` (training steps and holdout scores), set through
            ``torch.backends.mkldnn.matmul.fp32_precision`` (process-wide: other threads'
            products too, while ``fit`` runs) and restored afterwards: ``"bf16"`` rounds the
            factors of every product to bfloat16 (8 significant bits) and accumulates in float32
            on the CPU's bfloat16 units (AMX / AVX512-BF16), like TF32 on a GPU; parameters,
            gradients, Adam and the loss stay float32. Measured on a 2-core Xeon with AMX
            (``benchmarks/bench_ensemble.py``, ``trainer_step`` and ``fit_precision``): fits 1.4x
            faster at the quick preset's 5 x 200-200 and 1.8x at BREMEN's 5 x 1024-1024, holdout
            loss within 1 % of float32's. ``"ieee"`` forces float32 products; ``None``
            (default) leaves torch's setting (``torch.set_float32_matmul_precision``) alone.
            ``"bf16"`` raises ``ValueError`` on a CPU without native bfloat16, and at
            :meth:`fit` for parameters not on CPU (the setting is oneDNN's).

    Examples:
        >>> from tensordict import TensorDict
        >>> from torchrl_depeff.modules.ensemble import DynamicsEnsemble
        >>> from torchrl_depeff.trainers.dynamics import EnsembleTrainer
        >>> model = DynamicsEnsemble(3, 1, num_members=3, num_cells=(32,), num_elites=2)
        >>> obs, act = torch.randn(200, 3), torch.randn(200, 1)
        >>> data = TensorDict({"observation": obs, "action": act,
        ...                    ("next", "observation"): obs + 0.1 * act}, [200])
        >>> trainer = EnsembleTrainer(model, max_epochs=3, batch_size=64)
        >>> result = trainer.fit(data)
        >>> result.holdout_loss.shape, result.elites.numel(), result.epochs
        (torch.Size([3]), 2, 3)
    """

    def __init__(
        self,
        ensemble: DynamicsEnsemble,
        *,
        lr: float = 1e-3,
        weight_decay: float = 0.0,
        batch_size: int = 256,
        holdout_ratio: float = 0.15,
        max_epochs: int = 100,
        patience: int = 5,
        max_holdout: int = 5000,
        loss_type: str | None = None,
        logger: Any | None = None,
        progress: bool = False,
        seed: int = 0,
        matmul_precision: str | None = None,
    ) -> None:
        if not isinstance(ensemble, DynamicsEnsemble):
            raise TypeError(f"ensemble must be a DynamicsEnsemble, got {type(ensemble).__name__}")
        for name, value in (("batch_size", batch_size), ("max_epochs", max_epochs), ("patience", patience),
                            ("max_holdout", max_holdout), ("seed", seed)):
            if isinstance(value, bool) or not isinstance(value, int):
                raise TypeError(f"{name} must be an int, got {value!r}")
        for name, value in (("lr", lr), ("weight_decay", weight_decay), ("holdout_ratio", holdout_ratio)):
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
                raise ValueError(f"{name} must be a finite float, got {value!r}")
        if lr < 0:
            raise ValueError(f"lr must be >= 0, got {lr}")
        if weight_decay < 0:
            raise ValueError(f"weight_decay must be >= 0, got {weight_decay}")
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        if not 0.0 <= holdout_ratio < 1.0:
            raise ValueError(f"holdout_ratio must be in [0, 1), got {holdout_ratio}")
        if max_epochs < 1:
            raise ValueError(f"max_epochs must be >= 1, got {max_epochs}")
        if patience < 1:
            raise ValueError(f"patience must be >= 1, got {patience}")
        if max_holdout < 1:
            raise ValueError(f"max_holdout must be >= 1, got {max_holdout}")
        _check_matmul_precision(matmul_precision)
        if loss_type is None:
            loss_type = "nll" if ensemble.probabilistic else "mse"
        E = ensemble.num_members
        for name, p in ensemble.named_parameters():
            if p.dim() == 0 or p.shape[0] != E:
                raise ValueError(
                    f"parameter {name!r} of shape {tuple(p.shape)} is not member-first with {E} members"
                )
        self.ensemble = ensemble
        self.loss_module = EnsembleDynamicsLoss(
            ensemble, loss_type=loss_type, member_first=True, check_finite=False
        )
        # fused Adam: one kernel over each stacked [E, ...] tensor (about 4x faster than the
        # foreach path at BREMEN size on CPU, see benchmarks/README.md)
        self.optimizer = torch.optim.Adam(
            ensemble.parameters(), lr=lr, weight_decay=weight_decay, fused=True
        )
        self.batch_size = batch_size
        self.holdout_ratio = holdout_ratio
        self.max_epochs = max_epochs
        self.patience = patience
        self.max_holdout = max_holdout
        self.logger = logger
        self.progress = progress
        self.seed = seed
        self.matmul_precision = matmul_precision
        self.improvement_threshold = 0.01
        self._generator = torch.Generator().manual_seed(seed)
        self.total_epochs = 0
        self.total_steps = 0
        self.num_fits = 0
        self._plan: _StepPlan | None = None

    # ------------------------------------------------------------------ data
    def _prepare(self, data: TensorDictBase) -> TensorDict:
        if data.batch_dims == 0:
            raise ValueError("fit needs data with at least one batch dimension, got batch_size=()")
        if data.batch_size.numel() == 0:
            raise ValueError(
                f"fit got empty data (batch_size={list(data.batch_size)}, 0 transitions): collect "
                "transitions before fitting the ensemble"
            )
        data = data.reshape(-1)
        keys = [_OBS, _ACT, _NEXT_OBS] + ([_REWARD] if self.ensemble.predict_reward else [])
        param = next(self.ensemble.parameters())
        out = {}
        for key in keys:
            value = data.get(key, None)
            if value is None:
                raise KeyError(f"fit: key {key!r} not found in data")
            bad = int((~torch.isfinite(value)).sum())
            if bad:
                raise ValueError(f"fit: {bad} non-finite (NaN/inf) values in {key!r}")
            # the ensemble's dtype (e.g. float64 data of a plain gym env -> float32)
            out[key] = value.to(device=param.device, dtype=param.dtype)
        if self.ensemble.predict_reward and out[_REWARD].shape == out[_OBS].shape[:-1]:
            out[_REWARD] = out[_REWARD].unsqueeze(-1)
        return TensorDict(out, batch_size=data.batch_size, device=param.device)

    # ------------------------------------------------------------------ epoch pieces
    @torch.no_grad()
    def _normalized(self, data: TensorDictBase) -> tuple[torch.Tensor, torch.Tensor]:
        """Normalised network inputs ``[N, o + a]`` and targets ``[N, d_out]`` of ``data``.

        Elementwise, so rows gathered from them equal the normalisation of gathered rows: the
        minibatches never go through a tensordict or the normalisers again.
        """
        ens = self.ensemble
        x = ens._net_input(data.get(_OBS), data.get(_ACT))
        reward = data.get(_REWARD) if ens.predict_reward else None
        return x, ens.normalized_target(data.get(_OBS), data.get(_NEXT_OBS), reward)

    def _chunk_rows(self, width: int) -> int:
        # rows per member gathered at once: whole minibatches, about 16 MB per chunk
        E, b = self.ensemble.num_members, self.batch_size
        return max(b, (4_000_000 // max(1, E * width)) // b * b)

    def _train_epoch(self, train: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
        """One epoch on normalised ``(inputs, targets)``; returns the mean training loss ``[E]``."""
        x_all, y_all = train
        E, n, b = self.ensemble.num_members, x_all.shape[0], self.batch_size
        self._plan = self._step_plan(x_all)
        if self._plan is not None:
            self.optimizer.zero_grad(set_to_none=True)  # no stale .grad next to the direct steps
        # independent permutation per member: argsort of iid uniforms, one call for all members
        perms = torch.rand(E, n, generator=self._generator).argsort(dim=1).to(x_all.device)
        total = torch.zeros(E, device=x_all.device)
        chunk = self._chunk_rows(x_all.shape[1] + y_all.shape[1])
        for begin in range(0, n, chunk):
            idx = perms[:, begin : begin + chunk]  # [E, c]
            full = idx.shape[1] // b
            if full:
                # [steps, E, b]: every minibatch a contiguous [E, b, d] block, one gather per chunk
                blocks = idx[:, : full * b].reshape(E, full, b).transpose(0, 1)
                xs, ys = x_all[blocks], y_all[blocks]
                for k in range(full):
                    total += self._train_step(xs[k], ys[k]) * b
            if idx.shape[1] > full * b:
                rest = idx[:, full * b :]
                total += self._train_step(x_all[rest], y_all[rest]) * rest.shape[1]
        return total / n

    def _train_step(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """One Adam step on per-member minibatches ``x [E, b, in]``, ``y [E, b, d]``.

        The arithmetic of :class:`~torchrl_depeff.objectives.EnsembleDynamicsLoss` (member
        first) on pre-normalised rows; returns the detached per-member data term ``[E]``.
        """
        plan = self._plan
        if plan is None:
            # a custom optimiser, frozen or hooked parameters: autograd into .grad, optimizer.step()
            member_loss, total = self._member_loss(x, y)
            self.optimizer.zero_grad(set_to_none=True)
            total.sum().backward()
            self.optimizer.step()
        else:
            if plan.manual_backward:
                member_loss, grads = self._mse_relu_loss_and_grads(x, y)
            else:
                member_loss, total = self._member_loss(x, y)
                grads = torch.autograd.grad(total.sum(), plan.params)
            self._adam_step(plan, grads)
        self.total_steps += 1
        return member_loss.detach()

    def _member_loss(self, x: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Per-member data term ``[E]`` and the per-member objective ``[E]`` it is part of."""
        ens = self.ensemble
        mean, log_var = ens._split_heads(ens.network(x, member_first=True), ens.max_logvar, ens.min_logvar)
        sq = (mean - y).pow(2)  # [E, b, d]
        if self.loss_module.loss_type == "mse":
            # BREMEN eq. (1): 1/2 ||y - f_i(s, a)||^2, averaged over rows
            member_loss = 0.5 * sq.sum(-1).mean((1,))
            return member_loss, member_loss
        # Gaussian NLL (PETS eq. 2), + PETS App. A.1 log-variance bound penalty
        nll = 0.5 * (sq * torch.exp(-log_var) + log_var + _LOG_2PI).sum(-1)
        member_loss = nll.mean((1,))
        bound = ens.max_logvar.sum((1, 2)) - ens.min_logvar.sum((1, 2))  # [E]
        return member_loss, member_loss + self.loss_module.logvar_bound_coef * bound

    @torch.no_grad()
    def _mse_relu_loss_and_grads(
        self, x: torch.Tensor, y: torch.Tensor
    ) -> tuple[torch.Tensor, list[torch.Tensor]]:
        """BREMEN eq. (1) and its gradients for a ReLU ensemble, by hand (no autograd graph).

        The forward and backward kernels autograd would run, in its order and on the same
        layouts (``baddbmm`` per layer; ``bmm`` with the transposed weight / activation for the
        input / weight gradients; ``threshold_backward`` on the ReLU output; the bias gradient
        summed over rows; the loss gradient ``(0.5 / b) * (2 * diff)``), so the gradients are
        bitwise those of ``backward()``; without graph bookkeeping, autograd nodes or gradient
        accumulation the step is 1.17-1.21x faster at the quick preset's 5 x 200-200 (1 and 2
        threads, with the direct Adam step; ``benchmarks/bench_ensemble.py``). Returns the data term ``[E]`` and the gradients in
        :meth:`~torch.nn.Module.parameters` order.
        """
        layers = self.ensemble.network.layers
        hs = [x]  # inputs of each layer (ReLU outputs after the first)
        h = x
        last = len(layers) - 1
        for i, layer in enumerate(layers):
            h = torch.baddbmm(layer.bias, h, layer.weight)
            if i < last:
                h = h.relu_()  # in place: relu(z) is z where z > 0, the same values
            hs.append(h)
        diff = h - y
        member_loss = 0.5 * diff.pow(2).sum(-1).mean((1,))
        # d/d out of sum_e 0.5 * mean_rows sum_d diff^2: autograd's (0.5 / b) * (2 * diff)
        scale = torch.full((), 0.5, dtype=diff.dtype, device=diff.device).div_(diff.shape[1])
        g = (diff * 2.0).mul_(scale)
        grads: list[torch.Tensor] = [None] * (2 * len(layers))  # type: ignore[list-item]
        for i in range(last, -1, -1):
            grads[2 * i] = torch.bmm(hs[i].transpose(1, 2), g)  # weight [E, in, out]
            grads[2 * i + 1] = g.sum(1, keepdim=True)  # bias [E, 1, out]
            if i:
                g = torch.ops.aten.threshold_backward(torch.bmm(g, layers[i].weight.transpose(1, 2)), hs[i], 0)
        return member_loss, grads

    @staticmethod
    def _adam_step(plan: _StepPlan, grads: list[torch.Tensor] | tuple[torch.Tensor, ...]) -> None:
        """``optimizer.step()`` of the trainer's fused Adam with ``grads``, without its Python.

        The calls ``torch.optim.Adam(fused=True).step()`` makes for one CPU float group
        (``_foreach_add_`` of the step counters, then ``torch._fused_adam_``) on the optimiser's
        own state tensors, read at every step (a ``load_state_dict`` replaces them) with the
        group's current hyper-parameters: the same parameters and state bit for bit (tested).
        """
        opt = plan.optimizer
        group = opt.param_groups[0]
        states = [opt.state[p] for p in plan.params]
        steps = [s["step"] for s in states]
        torch._foreach_add_(steps, 1)
        beta1, beta2 = group["betas"]
        torch._fused_adam_(
            plan.params, list(grads), [s["exp_avg"] for s in states], [s["exp_avg_sq"] for s in states], [], steps,
            amsgrad=False, lr=group["lr"], beta1=beta1, beta2=beta2, weight_decay=group["weight_decay"],
            eps=group["eps"], maximize=False, grad_scale=None, found_inf=None,
        )

    def _step_plan(self, x: torch.Tensor) -> _StepPlan | None:
        """How the steps of an epoch on minibatches like ``x`` run (``None``: the generic path).

        The direct fused-Adam step needs CPU parameters, the trainer's own ``torch.optim.Adam(fused=True)``
        (one group holding exactly the ensemble's parameters, no amsgrad/maximize/capturable/
        differentiable/decoupled weight decay, a float learning rate, state initialised by a
        first regular step, no optimiser hooks) and parameters that all require grad and carry
        no hooks; the hand-written backward additionally a deterministic ensemble fitted with
        the MSE loss whose network runs the ``bmm`` kernel on ``x`` with ``nn.ReLU``
        activations, biases and no module hooks.
        """
        opt = self.optimizer
        ens = self.ensemble
        params = list(ens.parameters())
        if type(opt) is not torch.optim.Adam or len(opt.param_groups) != 1 or not hasattr(torch, "_fused_adam_"):
            return None
        if any(p.device.type != "cpu" for p in params):
            return None  # measured and tested on CPU only (no GPU was lent to check it on CUDA)
        group = opt.param_groups[0]
        if (not group.get("fused") or group.get("amsgrad") or group.get("maximize") or group.get("capturable")
                or group.get("differentiable") or group.get("decoupled_weight_decay")
                or isinstance(group["lr"], torch.Tensor) or isinstance(group["betas"][0], torch.Tensor)):
            return None
        if len(group["params"]) != len(params) or any(a is not b for a, b in zip(group["params"], params)):
            return None
        if opt._optimizer_step_pre_hooks or opt._optimizer_step_post_hooks or _global_optimizer_hooks():
            return None
        if any(not p.requires_grad or p._backward_hooks or getattr(p, "_post_accumulate_grad_hooks", None)
               for p in params):
            return None
        if any(not {"step", "exp_avg", "exp_avg_sq"} <= set(opt.state.get(p, ())) for p in params):
            return None  # the first step initialises the state through optimizer.step()
        net = ens.network
        if self.loss_module.loss_type == "mse" and ens.probabilistic:
            return None  # the log-variance bounds get no gradient: Adam skips them, as optimizer.step() does
        layer_params = [t for layer in net.layers for t in (layer.weight, layer.bias)]
        manual = (
            self.loss_module.loss_type == "mse"
            and net._resolve_kernel(x) == "bmm"
            and all(type(a) is torch.nn.ReLU for a in net.activations)
            and all(layer.bias is not None for layer in net.layers)
            and len(layer_params) == len(params) and all(a is b for a, b in zip(layer_params, params))
            and not _has_module_hooks(net)
        )
        return _StepPlan(optimizer=opt, params=params, manual_backward=manual)

    @torch.no_grad()
    def _holdout_mse(self, holdout: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
        # every member on every row, one batched matmul per layer (no loop over members), in row
        # chunks that keep the [E, rows, hidden] activations small
        x, y = holdout
        ens = self.ensemble
        width = max(layer.out_features for layer in ens.network.layers)
        # ~1 M activation entries (4 MB) per layer and chunk: cache-sized, 1.75x faster than
        # 16 MB chunks at 3000 rows x 5 x 200-200 and the same bits (each row's products do not
        # depend on the other rows of its chunk); no change at BREMEN's 1024-1024 (compute-bound)
        rows = max(256, 1_000_000 // (ens.num_members * width))
        means = [
            ens._split_heads(ens.network(part, member_first=False, kernel="bmm"), ens.max_logvar, ens.min_logvar)[0]
            for part in x.split(rows)
        ]
        mean = means[0] if len(means) == 1 else torch.cat(means, 1)
        return (mean - y).pow(2).mean((1, 2))

    @torch.no_grad()
    def evaluate(self, data: TensorDictBase) -> torch.Tensor:
        """Per-member mean squared error ``[E]`` in normalised target space on ``data`` ``[N]``."""
        return self._holdout_mse(self._normalized(data))

    # ------------------------------------------------------------------ fit
    def fit(self, data: TensorDictBase) -> FitResult:
        """Fit the ensemble on ``data`` (observation, action, ("next", "observation") [, reward]).

        Args:
            data (TensorDictBase): transitions, any batch shape (flattened to ``[N]``).

        Returns:
            :class:`FitResult`.
        """
        if self.matmul_precision == "bf16":
            device = next(self.ensemble.parameters()).device
            if device.type != "cpu":
                raise ValueError(
                    f"matmul_precision='bf16' is a CPU (oneDNN) setting, the ensemble is on {device}: use None "
                    "(and torch.backends.cuda.matmul.allow_tf32 on a GPU)"
                )
        with _cpu_matmul_precision(self.matmul_precision):
            return self._fit(data)

    def _fit(self, data: TensorDictBase) -> FitResult:
        data = self._prepare(data)
        n = data.shape[0]
        ens = self.ensemble
        E = ens.num_members
        split_gen = torch.Generator().manual_seed(self.seed)
        perm = torch.randperm(n, generator=split_gen).to(data.device)
        n_hold = min(int(self.holdout_ratio * n), self.max_holdout)
        if n - n_hold < 1:
            raise ValueError(f"fit needs at least one training row, got N={n} and {n_hold} held out")
        # normalisers on ALL data, every call
        ens.fit_normalizers(
            data.get(_OBS), data.get(_ACT), data.get(_NEXT_OBS),
            data.get(_REWARD) if ens.predict_reward else None,
        )
        # normalised once per fit; epochs gather rows of these tensors
        x_all, y_all = self._normalized(data)
        train_rows = perm[n_hold:]
        train = (x_all[train_rows], y_all[train_rows])
        holdout = (x_all[perm[:n_hold]], y_all[perm[:n_hold]]) if n_hold > 0 else train
        params = [p for p in ens.parameters()]
        snapshots = [p.detach().clone() for p in params]
        device = params[0].device
        best = torch.full((E,), float("inf"), device=device)
        best_train = torch.full((E,), float("nan"), device=device)
        best_epoch = torch.zeros(E, dtype=torch.long, device=device)
        since = torch.zeros(E, dtype=torch.long, device=device)
        epochs = 0
        bar = tqdm.trange(self.max_epochs, disable=not self.progress, desc="dynamics fit")
        for epoch in bar:
            train_loss = self._train_epoch(train)
            hold_loss = self._holdout_mse(holdout)
            epochs = epoch + 1
            self.total_epochs += 1
            improved = (best - hold_loss) / best.abs() > self.improvement_threshold
            improved = improved | torch.isinf(best) & torch.isfinite(hold_loss)
            self._snapshot(params, snapshots, improved)
            best = torch.where(improved, hold_loss, best)
            best_train = torch.where(improved, train_loss, best_train)
            best_epoch = torch.where(improved, torch.full_like(best_epoch, epoch), best_epoch)
            since = torch.where(improved, torch.zeros_like(since), since + 1)
            self._log(train_loss, hold_loss)
            if self.progress:
                bar.set_postfix(holdout=f"{hold_loss.mean().item():.4g}")
            if bool((since >= self.patience).all()):
                break
        self._restore(params, snapshots)
        elites = ens.set_elites(best).clone()
        self.num_fits += 1
        torchrl_logger.debug(
            f"dynamics fit {self.num_fits}: {epochs} epochs, holdout {best.tolist()}, elites {elites.tolist()}"
        )
        return FitResult(
            train_loss=best_train.detach(),
            holdout_loss=best.detach(),
            epochs=epochs,
            best_epoch=best_epoch,
            elites=elites,
        )

    @staticmethod
    @torch.no_grad()
    def _snapshot(params: list[torch.Tensor], snapshots: list[torch.Tensor], mask: torch.Tensor) -> None:
        # vectorised per-member copy: one masked select per parameter tensor, no loop over members
        for p, s in zip(params, snapshots):
            m = mask.view(-1, *([1] * (p.dim() - 1)))
            s.copy_(torch.where(m, p, s))

    @staticmethod
    @torch.no_grad()
    def _restore(params: list[torch.Tensor], snapshots: list[torch.Tensor]) -> None:
        for p, s in zip(params, snapshots):
            p.copy_(s)

    def _log(self, train_loss: torch.Tensor, hold_loss: torch.Tensor) -> None:
        if self.logger is None:
            return
        for i, (tr, ho) in enumerate(zip(train_loss.tolist(), hold_loss.tolist())):
            self.logger.log_scalar(f"model/train_loss_m{i}", tr, step=self.total_epochs)
            self.logger.log_scalar(f"model/holdout_loss_m{i}", ho, step=self.total_epochs)

    # ------------------------------------------------------------------ checkpoints
    def state_dict(self) -> dict[str, Any]:
        """Optimizer state, counters and the shuffling generator state (not the model)."""
        return {
            "optimizer": self.optimizer.state_dict(),
            "total_epochs": self.total_epochs,
            "total_steps": self.total_steps,
            "num_fits": self.num_fits,
            "generator": self._generator.get_state(),
        }

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Restore what :meth:`state_dict` saved."""
        missing = {"optimizer", "total_epochs", "total_steps", "num_fits", "generator"} - set(state_dict)
        if missing:
            raise KeyError(f"EnsembleTrainer.load_state_dict: missing entries {sorted(missing)}")
        self.optimizer.load_state_dict(state_dict["optimizer"])
        self.total_epochs = int(state_dict["total_epochs"])
        self.total_steps = int(state_dict["total_steps"])
        self.num_fits = int(state_dict["num_fits"])
        self._generator.set_state(state_dict["generator"])
