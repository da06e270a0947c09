"""Calls of TensorDict modules on plain tensors, where they are exactly the module's own call.

Private helpers shared by the imaginary rollouts (:mod:`torchrl_depeff.envs.model_env`) and
behaviour cloning (:func:`torchrl_depeff.objectives.train_bc`): each accepts only modules whose
tensordict call it reproduces op for op (same values, same random stream) and returns
``None``/``False`` for anything else, so the caller keeps the tensordict call there.
"""
from __future__ import annotations

from typing import Any

import torch
from tensordict.nn import (
    CompositeDistribution,
    ProbabilisticTensorDictModule,
    ProbabilisticTensorDictSequential,
    skip_existing,
    TensorDictModule,
)
from tensordict.utils import unravel_key
from torch import nn
from torchrl.modules.tensordict_module.probabilistic import (
    SafeProbabilisticModule,
    SafeProbabilisticTensorDictSequential,
)


def _plain_tdmodule(policy: Any) -> bool:
    # a TensorDictModule whose call is exactly ``module(*in_tensors) -> out tensors``
    return (
        type(policy) is TensorDictModule
        and isinstance(policy.module, nn.Module)
        and policy.method is None
        and not policy.method_kwargs
        and not policy._get_kwargs
        and policy._kwargs is None
        and policy.inplace is True
        and not policy._forward_hooks
        and not policy._forward_pre_hooks
        and not nn.modules.module._global_forward_hooks
        and not nn.modules.module._global_forward_pre_hooks
        and not skip_existing()
        and list(getattr(policy, "out_keys_source", policy.out_keys)) == list(policy.out_keys)
        and "_" not in policy.out_keys
    )


def _call_plain(module: nn.Module, inputs: list[torch.Tensor], out_keys: list) -> dict:
    # what a plain TensorDictModule writes: ``module(*inputs)`` under its out_keys
    out = module(*inputs)
    if not isinstance(out, tuple):
        out = (out,)
    if len(out) != len(out_keys):
        raise RuntimeError(f"policy returned {len(out)} tensors for out_keys {out_keys}")
    return dict(zip(out_keys, out))


#: the forward methods whose logic the plain calls reproduce (a subclass overriding ``forward``
#: keeps the tensordict call)
_PROB_SEQ_FORWARDS = (ProbabilisticTensorDictSequential.forward, SafeProbabilisticTensorDictSequential.forward)


def _plain_probabilistic_parts(policy: Any) -> tuple[list, Any] | None:
    """``(networks, last)`` of a probabilistic actor whose call the plain calls of
    :mod:`torchrl_depeff.envs.model_env` (sampling, deterministic) and ``WeightedBCLoss._plain_loss``
    (its networks only) reproduce without tensordicts, else ``None``.

    A :class:`~tensordict.nn.ProbabilisticTensorDictSequential` (e.g. TorchRL's
    ``ProbabilisticActor``, not a subclass overriding ``forward``) made of plain
    :class:`~tensordict.nn.TensorDictModule` networks and one last probabilistic module with
    one sample key, a plain distribution class, and none of: spec projection, generators,
    caches, several samples, composite distributions or outputs, hooks.
    """
    if not isinstance(policy, ProbabilisticTensorDictSequential) or type(policy).forward not in _PROB_SEQ_FORWARDS:
        return None
    *nets, last = list(policy.module)
    if (
        not nets
        or not all(_plain_tdmodule(m) for m in nets)
        or policy.return_composite
        or getattr(policy, "_select_before_return", False)
        or policy.inplace not in (None, True)
        or policy._forward_hooks
        or policy._forward_pre_hooks
        or type(last) not in (SafeProbabilisticModule, ProbabilisticTensorDictModule)
        or getattr(last, "safe", False)
        or last._forward_hooks
        or last._forward_pre_hooks
        or last.num_samples is not None
        or last._generator is not None
        or last._generator_key is not None
        or last.cache_dist
        or len(last.dist_sample_keys) != 1
        or not isinstance(last.distribution_class, type)
        or issubclass(last.distribution_class, CompositeDistribution)
    ):
        return None
    steps = [
        (m.module, [unravel_key(k) for k in m.in_keys], [unravel_key(k) for k in m.out_keys]) for m in nets
    ]
    return steps, last
