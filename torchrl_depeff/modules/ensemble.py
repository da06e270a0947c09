"""Vectorised ensembles of MLPs and the dynamics-model ensemble (BREMEN / MUSBO / MB2PO).

All ensemble tensors are member-first, ``[E, *B, d]``. In a TensorDict whose batch is ``*B``
per-member entries are written member-last in the batch dims, ``[*B, E, d]``.
"""
from __future__ import annotations

import math
from typing import Callable, NamedTuple, Sequence

import torch
from tensordict import TensorDictBase
from tensordict.nn import TensorDictModuleBase
from tensordict.utils import NestedKey
from torch import nn
from torch.nn import functional as F

from torchrl_depeff.modules.normalizers import Normalizer

__all__ = [
    "EnsembleLinear",
    "EnsembleMLP",
    "DynamicsEnsemble",
    "EnsemblePrediction",
    "MemberPredictor",
]

_KERNELS = ("auto", "bmm", "loop")
_GROUPED_KERNELS = ("auto", "grouped_mm", "gather", "padded", "loop")
_INT_DTYPES = (torch.int64, torch.int32, torch.int16, torch.int8, torch.uint8)
_HAS_GROUPED_MM = hasattr(F, "grouped_mm")

# Measured on the 2-core AMD EPYC CPU this project runs on (benchmarks/bench_ensemble.py,
# forward+backward+Adam, see benchmarks/README.md): a per-member loop is at least as fast as
# one ``baddbmm`` once a layer has this many weights per member (the 1024x1024 BREMEN layer;
# 14% faster with 2 threads), while ``baddbmm`` wins for small layers (200x200, MB2PO) where
# the per-call overhead of E separate GEMMs dominates.
_CPU_LOOP_MIN_WEIGHTS = 512 * 512


def _auto_cpu_kernel(in_features: int, out_features: int) -> str:
    return "loop" if in_features * out_features >= _CPU_LOOP_MIN_WEIGHTS else "bmm"


def _split_members(
    x: torch.Tensor, num_members: int, in_features: int, member_first: bool | None, owner: str
) -> tuple[bool, torch.Size, torch.Tensor]:
    """``(member_first, batch, x2)``: ``x2`` is ``[E, N, in]`` (member-first input) or ``[N, in]``.

    A ``[E, *B, in]`` input is member-first when ``member_first`` says so, or by default when its
    leading dim is ``E`` and it has at least 3 dims; otherwise ``[*B, in]`` is shared by all members.
    """
    if x.shape[-1] != in_features:
        raise ValueError(f"{owner} expected last dim {in_features}, got shape {tuple(x.shape)}")
    if member_first is None:
        member_first = x.dim() >= 3 and x.shape[0] == num_members
    if member_first:
        if x.shape[0] != num_members:
            raise ValueError(
                f"per-member input must have {num_members} members in dim 0, got shape {tuple(x.shape)}"
            )
        return True, x.shape[1:-1], x.reshape(num_members, -1, in_features)
    return False, x.shape[:-1], x.reshape(-1, in_features)


def _activate(act: nn.Module, x: torch.Tensor, inplace: bool) -> torch.Tensor:
    # ``act(x)``, overwriting ``x`` for the elementwise activations whose in-place kernels give
    # the same values (ReLU, SiLU) when ``inplace``
    if inplace:
        if type(act) is nn.ReLU:
            return x.relu_()
        if type(act) is nn.SiLU:
            return torch.nn.functional.silu(x, inplace=True)
    return act(x)


class EnsembleLinear(nn.Module):
    """``E`` independent affine maps ``y_e = x_e W_e + b_e`` evaluated together.

    Weights are stored as ``weight [E, in, out]`` and ``bias [E, 1, out]``. The input is either
    shared by all members, ``[*B, in]`` (it is never copied ``E`` times by the ``"loop"``
    kernel and only expanded, stride 0, by ``"bmm"``), or per member, ``[E, *B, in]``. The
    output is always ``[E, *B, out]``.

    Each member is initialised independently exactly like :class:`torch.nn.Linear`
    (Kaiming-uniform with ``a=sqrt(5)``, which is ``U(-1/sqrt(in), 1/sqrt(in))`` for the
    weight, and the same bound for the bias): every element is an independent draw.

    Kernels:
        * ``"bmm"``: one batched matmul (``torch.baddbmm``) over all members.
        * ``"loop"``: a loop over the ``E`` members, each an ``addmm`` on its stored weight
          slice (never a loop over samples), stacked into ``[E, N, out]``.
        * ``"auto"``: ``"bmm"`` on CUDA; on CPU ``"loop"`` when ``in * out >= 512 * 512``
          and ``"bmm"`` otherwise. The rule was measured on this project's 2-core CPU with
          ``benchmarks/bench_ensemble.py`` (numbers in ``benchmarks/README.md``): small
          layers (200 x 200) run faster batched; for a 1024 x 1024 layer the two are within
          the machine's noise, and the gain of the loop at BREMEN size comes from running a
          member's whole MLP on cache-sized activations (``EnsembleMLP(kernel="loop")``).

    Args:
        num_members (int): ensemble size ``E`` (>= 1).
        in_features (int): input size.
        out_features (int): output size.
        bias (bool, optional): learn a bias. Defaults to ``True``.
        kernel (str, optional): ``"auto"``, ``"bmm"`` or ``"loop"``. Defaults to ``"auto"``.

    Examples:
        >>> from torchrl_depeff.modules.ensemble import EnsembleLinear
        >>> layer = EnsembleLinear(5, 3, 2)
        >>> layer(torch.randn(5, 10, 3)).shape  # per-member input
        torch.Size([5, 10, 2])
        >>> layer(torch.randn(7, 10, 3), member_first=False).shape  # shared input
        torch.Size([5, 7, 10, 2])
    """

    def __init__(
        self,
        num_members: int,
        in_features: int,
        out_features: int,
        bias: bool = True,
        kernel: str = "auto",
    ) -> None:
        super().__init__()
        for name, value in (
            ("num_members", num_members),
            ("in_features", in_features),
            ("out_features", out_features),
        ):
            if not isinstance(value, int) or value < 1:
                raise ValueError(f"EnsembleLinear {name} must be a positive int, got {value!r}")
        if kernel not in _KERNELS:
            raise ValueError(f"EnsembleLinear kernel must be one of {_KERNELS}, got {kernel!r}")
        self.num_members = num_members
        self.in_features = in_features
        self.out_features = out_features
        self.kernel = kernel
        self._cpu_kernel = (
            _auto_cpu_kernel(in_features, out_features) if kernel == "auto" else kernel
        )
        self.weight = nn.Parameter(torch.empty(num_members, in_features, out_features))
        if bias:
            self.bias = nn.Parameter(torch.empty(num_members, 1, out_features))
        else:
            self.register_parameter("bias", None)
        self.reset_parameters()

    @torch.no_grad()
    def reset_parameters(self) -> None:
        """Re-draw every member's weight and bias from ``U(-1/sqrt(in), 1/sqrt(in))``."""
        bound = 1.0 / math.sqrt(self.in_features)
        self.weight.uniform_(-bound, bound)
        if self.bias is not None:
            self.bias.uniform_(-bound, bound)

    def _resolve_kernel(self, x: torch.Tensor) -> str:
        if self.kernel == "auto" and x.is_cuda:
            return "bmm"
        return self._cpu_kernel

    def forward(
        self, x: torch.Tensor, member_first: bool | None = None, *, kernel: str | None = None
    ) -> torch.Tensor:
        """Apply every member.

        Args:
            x (torch.Tensor): ``[E, *B, in]`` (per member) or ``[*B, in]`` (shared).
            member_first (bool, optional): whether dim 0 of ``x`` indexes members. ``None``
                (default) infers it: per member iff ``x.dim() >= 3`` and ``x.shape[0] == E``.
                Pass it explicitly whenever a shared batch could start with ``E``.

        Keyword Args:
            kernel (str, optional): ``"bmm"`` or ``"loop"`` for this call only; ``None`` uses
                the layer's kernel.

        Returns:
            ``[E, *B, out]``.
        """
        E = self.num_members
        member_first, batch, x2 = _split_members(x, E, self.in_features, member_first, "EnsembleLinear")
        kernel = self._resolve_kernel(x) if kernel is None else kernel
        if kernel == "loop":
            # unbind (not weight[e]): its backward stacks the E slice gradients once instead
            # of materialising a full-size [E, in, out] zero gradient per member
            weights = self.weight.unbind(0)
            biases = self.bias.unbind(0) if self.bias is not None else None
            xs = x2.unbind(0) if member_first else None
            outs = []
            for e in range(E):
                xe = xs[e] if member_first else x2
                if biases is None:
                    outs.append(xe @ weights[e])
                else:
                    outs.append(torch.addmm(biases[e], xe, weights[e]))
            out = torch.stack(outs)
        else:
            if not member_first:
                x2 = x2.expand(E, *x2.shape)
            if self.bias is None:
                out = torch.bmm(x2, self.weight)
            else:
                out = torch.baddbmm(self.bias, x2, self.weight)
        return out.reshape(E, *batch, self.out_features)

    def forward_member(self, x: torch.Tensor, member: int) -> torch.Tensor:
        """Apply member ``member`` only, ``[N, in] -> [N, out]``."""
        if self.bias is None:
            return x @ self.weight[member]
        return torch.addmm(self.bias[member], x, self.weight[member])

    def extra_repr(self) -> str:
        return (
            f"num_members={self.num_members}, in_features={self.in_features}, "
            f"out_features={self.out_features}, bias={self.bias is not None}, kernel={self.kernel!r}"
        )


class EnsembleMLP(nn.Module):
    """An ensemble of ``E`` independent MLPs made of :class:`EnsembleLinear` layers.

    Args:
        num_members (int): ensemble size ``E``.
        in_features (int): input size.
        out_features (int): output size.
        num_cells (sequence of int, optional): hidden sizes. Defaults to ``(200, 200)``.
        activation_class (type, optional): hidden activation (e.g. ``nn.ReLU`` for BREMEN,
            ``nn.SiLU`` = swish for MB2PO). Defaults to ``nn.ReLU``.
        kernel (str, optional): ``"bmm"``: layer by layer, one ``baddbmm`` per layer over all
            members. ``"loop"``: a loop over the ``E`` members, each running its whole MLP on
            its own activations with ``addmm`` on unbound parameter slices (the activations of
            one member stay cache-sized; the slices' gradients are stacked once per parameter).
            ``"auto"``: ``"bmm"`` on CUDA; on CPU ``"loop"`` if some layer has
            ``in * out >= 512 * 512`` weights, else ``"bmm"``. Measured with
            ``benchmarks/bench_ensemble.py`` on this project's 2-core CPU (README there):
            with 2 threads at BREMEN size (2 x 1024, fwd+bwd+Adam) the member loop took
            221 ms/step vs 255 ms for ``baddbmm`` (a loop over ``nn.Sequential``: 216 ms);
            with 1 thread both are within 3%. At MB2PO size (4 x 200) ``baddbmm`` is as fast
            as or faster than the loop (1.0-1.3x over runs). Defaults to ``"auto"``.

    Examples:
        >>> from torchrl_depeff.modules.ensemble import EnsembleMLP
        >>> mlp = EnsembleMLP(3, 4, 2, num_cells=(8, 8))
        >>> mlp(torch.randn(10, 4), member_first=False).shape
        torch.Size([3, 10, 2])
        >>> mlp(torch.randn(3, 10, 4), member_first=True).shape
        torch.Size([3, 10, 2])
    """

    def __init__(
        self,
        num_members: int,
        in_features: int,
        out_features: int,
        num_cells: Sequence[int] = (200, 200),
        activation_class: type[nn.Module] = nn.ReLU,
        kernel: str = "auto",
    ) -> None:
        super().__init__()
        sizes = [in_features, *list(num_cells), out_features]
        if kernel not in _KERNELS:
            raise ValueError(f"EnsembleMLP kernel must be one of {_KERNELS}, got {kernel!r}")
        self.num_members = num_members
        self.in_features = in_features
        self.out_features = out_features
        self.kernel = kernel
        # "auto" on CPU: member loop when the largest layer is big (see EnsembleLinear)
        self._cpu_kernel = max(
            (_auto_cpu_kernel(i, o) for i, o in zip(sizes[:-1], sizes[1:])), key=lambda k: k == "loop"
        )
        self.layers = nn.ModuleList(
            EnsembleLinear(num_members, i, o, kernel="bmm" if kernel == "auto" else kernel)
            for i, o in zip(sizes[:-1], sizes[1:])
        )
        self.activations = nn.ModuleList(activation_class() for _ in range(len(sizes) - 2))

    def _resolve_kernel(self, x: torch.Tensor) -> str:
        if self.kernel == "auto":
            return "bmm" if x.is_cuda else self._cpu_kernel
        return self.kernel

    def forward(
        self, x: torch.Tensor, member_first: bool | None = None, *, kernel: str | None = None
    ) -> torch.Tensor:
        """``[*B, in]`` (shared) or ``[E, *B, in]`` (per member) -> ``[E, *B, out]``.

        ``member_first`` is interpreted as in :meth:`EnsembleLinear.forward`; ``kernel``
        (``"bmm"`` or ``"loop"``) overrides the module's kernel for this call.
        """
        kernel = self._resolve_kernel(x) if kernel is None else kernel
        if kernel == "bmm":
            x = self.layers[0](x, member_first=member_first, kernel="bmm")
            # without autograd (holdout scores, predictions) a ReLU / SiLU overwrites the layer
            # output it reads, a tensor nothing else holds: the same values without a second
            # [E, N, h] buffer (1.2-1.3x faster holdout scores at 600-3000 rows x 5 x 200-200,
            # where the activations outgrow the caches). Hooks see the usual tensors.
            inplace = not torch.is_grad_enabled() and not self._hooked()
            for act, layer in zip(self.activations, self.layers[1:]):
                x = layer(_activate(act, x, inplace), member_first=True, kernel="bmm")
            return x
        return self._member_loop(x, member_first)

    def _hooked(self) -> bool:
        # a forward hook could keep a layer output that an in-place activation would change
        mod = nn.modules.module
        if mod._global_forward_hooks or mod._global_forward_pre_hooks:
            return True
        return any(m._forward_hooks or m._forward_pre_hooks for m in self.modules())

    def _member_loop(self, x: torch.Tensor, member_first: bool | None) -> torch.Tensor:
        # "loop": each member runs its whole MLP on its own [N, d] activations, which stay
        # cache-sized, on unbound parameter slices (one stacked gradient per parameter).
        E = self.num_members
        member_first, batch, x2 = _split_members(x, E, self.in_features, member_first, "EnsembleMLP")
        xs = x2.unbind(0) if member_first else [x2] * E
        weights = [layer.weight.unbind(0) for layer in self.layers]
        biases = [layer.bias.unbind(0) if layer.bias is not None else None for layer in self.layers]
        outs = []
        for e in range(E):
            h = xs[e]
            for i in range(len(self.layers)):
                if i > 0:
                    h = self.activations[i - 1](h)
                b = biases[i]
                h = h @ weights[i][e] if b is None else torch.addmm(b[e], h, weights[i][e])
            outs.append(h)
        return torch.stack(outs).reshape(E, *batch, self.out_features)

    def forward_member(self, x: torch.Tensor, member: int) -> torch.Tensor:
        """Run member ``member`` only on ``[N, in]`` -> ``[N, out]``."""
        x = self.layers[0].forward_member(x, member)
        for act, layer in zip(self.activations, self.layers[1:]):
            x = layer.forward_member(act(x), member)
        return x


class EnsemblePrediction(NamedTuple):
    """Denormalised ensemble prediction (``scale``/``reward`` are ``None`` when absent)."""

    loc: torch.Tensor
    scale: torch.Tensor | None
    reward: torch.Tensor | None


class DynamicsEnsemble(TensorDictModuleBase):
    r"""Ensemble of dynamics models predicting normalised state deltas (and optionally rewards).

    Deterministic (BREMEN sec. 4.1 / App. F.1: ``K`` models, 2 x 1024 ReLU, trained with eq.
    (1)) or probabilistic (MUSBO App. F, MB2PO: diagonal Gaussian over next state and reward,
    4 x 200 swish). The network input is ``[observation, action]`` normalised by
    ``input_normalizer``; the target is ``[next_obs - obs, reward]`` normalised by
    ``target_normalizer`` (both fit with :meth:`fit_normalizers`).

    Probabilistic heads output a mean and a log-variance; the log-variance is soft-bounded
    with learnable per-member ``max_logvar`` / ``min_logvar`` parameters (Chua et al. 2018,
    PETS, App. A.1):

    .. math::
        \log\sigma^2 = l_{\max} - \mathrm{softplus}(l_{\max} - h), \quad
        \log\sigma^2 \leftarrow l_{\min} + \mathrm{softplus}(\log\sigma^2 - l_{\min}).

    The bounds are kept per member (``[E, 1, d_out]``, unlike PETS's shared ones) so that a
    member's loss sends gradients to that member's parameters only.

    ``predict(..., member_index=idx)`` evaluates one member per row without computing every
    member for every row (``idx`` ``[*B]``; a 0-d ``idx`` uses one member for the whole batch,
    BREMEN's per-step draw). Kernels (``grouped_kernel``):

    * ``"grouped_mm"``: rows are sorted by member (stable sort) and every layer is one
      :func:`torch.nn.functional.grouped_mm` over the member-sorted rows with the stacked
      ``[E, in, out]`` weights (the MoE grouped GEMM): no Python loop over members, no host
      synchronisation, and each row costs one member's FLOPs. Weight copies padded to the
      kernel's 16-byte row alignment are cached per parameter version.
    * ``"gather"``: every member on every row (one batched matmul per layer), then the row's
      member is gathered: ``E`` times the FLOPs, but no sort and no host synchronisation.
    * ``"padded"``: rows packed into an ``[E, max_rows, d]`` block (one host read of
      ``max_rows``).
    * ``"loop"``: a Python loop over members on their own rows (host reads of the counts).
    * ``"auto"``: ``"grouped_mm"`` on CPU (the fastest here, see ``benchmarks/README.md``),
      or ``"loop"`` when a gradient is needed (``grouped_mm`` has no CPU backward; the model
      env always evaluates under ``no_grad``), and ``"gather"`` on other devices, where
      ``grouped_mm`` is a bfloat16-only kernel (a choice, not measured: no GPU was available).

    Dtype: inputs must have the ensemble's floating dtype (a clear ``TypeError`` otherwise);
    :class:`~torchrl_depeff.envs.EnsembleModelEnv` and
    :class:`~torchrl_depeff.trainers.EnsembleTrainer` cast their data to it.

    Args:
        observation_dim (int): observation size.
        action_dim (int): action size.
        num_members (int, optional): ensemble size ``E``. Defaults to ``5``.
        num_cells (sequence of int, optional): hidden sizes. Defaults to ``(1024, 1024)``.
        activation (type, optional): hidden activation class. Defaults to ``nn.ReLU``.
        probabilistic (bool, optional): Gaussian heads. Defaults to ``False``.
        predict_reward (bool, optional): also predict the reward. Defaults to ``False``.
        min_log_var (float, optional): initial ``min_logvar``. Defaults to ``-10.0``.
        max_log_var (float, optional): initial ``max_logvar``. Defaults to ``0.5``.
        num_elites (int, optional): number of elite members (MB2PO); defaults to all.

    Keyword Args:
        kernel (str, optional): kernel of the :class:`EnsembleLinear` layers. Defaults to ``"auto"``.
        grouped_kernel (str, optional): ``"auto"``, ``"grouped_mm"``, ``"gather"``,
            ``"padded"`` or ``"loop"``, how ``member_index`` is evaluated (see above).
            Defaults to ``"auto"``.
        in_keys (sequence of NestedKey, optional): observation and action keys read by
            :meth:`forward`. Defaults to ``["observation", "action"]``.
        out_keys (sequence of NestedKey, optional): keys written by :meth:`forward`, one per
            output (``loc`` [, ``scale``] [, ``reward``]). Defaults to ``["loc"]`` (+
            ``"scale"`` if probabilistic, + ``"reward"`` if ``predict_reward``); pass other
            names (e.g. ``[("model", "loc"), ("model", "scale")]``) to keep them apart from a
            policy's ``"loc"``/``"scale"``.

    Examples:
        >>> from tensordict import TensorDict
        >>> from torchrl_depeff.modules.ensemble import DynamicsEnsemble
        >>> model = DynamicsEnsemble(3, 2, num_members=4, num_cells=(16,), probabilistic=True,
        ...                          predict_reward=True)
        >>> td = TensorDict({"observation": torch.randn(10, 3), "action": torch.randn(10, 2)}, [10])
        >>> out = model(td)
        >>> out["loc"].shape, out["scale"].shape, out["reward"].shape
        (torch.Size([10, 4, 3]), torch.Size([10, 4, 3]), torch.Size([10, 4, 1]))
        >>> pred = model.predict(td["observation"], td["action"])
        >>> pred.loc.shape
        torch.Size([4, 10, 3])
        >>> idx = torch.randint(4, (10,))
        >>> model.predict(td["observation"], td["action"], member_index=idx).loc.shape
        torch.Size([10, 3])
        >>> model.predict(td["observation"], td["action"], member_index=torch.tensor(2)).loc.shape
        torch.Size([10, 3])
        >>> keyed = DynamicsEnsemble(3, 2, num_members=4, num_cells=(16,), probabilistic=True,
        ...                          out_keys=[("model", "loc"), ("model", "scale")])
        >>> keyed(td.clone())["model", "scale"].shape
        torch.Size([10, 4, 3])
    """

    elite_indices: torch.Tensor

    def __init__(
        self,
        observation_dim: int,
        action_dim: int,
        num_members: int = 5,
        num_cells: Sequence[int] = (1024, 1024),
        activation: type[nn.Module] = nn.ReLU,
        probabilistic: bool = False,
        predict_reward: bool = False,
        min_log_var: float = -10.0,
        max_log_var: float = 0.5,
        num_elites: int | None = None,
        *,
        kernel: str = "auto",
        grouped_kernel: str = "auto",
        in_keys: Sequence[NestedKey] | None = None,
        out_keys: Sequence[NestedKey] | None = None,
    ) -> None:
        super().__init__()
        if not isinstance(num_members, int) or num_members < 1:
            raise ValueError(f"num_members must be an int >= 1, got {num_members!r}")
        for name, value in (("observation_dim", observation_dim), ("action_dim", action_dim)):
            if not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be a positive int, got {value!r}")
        if any((not isinstance(c, int)) or c < 1 for c in num_cells):
            raise ValueError(f"num_cells must be positive ints, got {tuple(num_cells)!r}")
        if num_elites is None:
            num_elites = num_members
        if not 1 <= num_elites <= num_members:
            raise ValueError(f"num_elites must be in [1, {num_members}], got {num_elites}")
        if min_log_var >= max_log_var:
            raise ValueError(
                f"min_log_var ({min_log_var}) must be smaller than max_log_var ({max_log_var})"
            )
        if grouped_kernel not in _GROUPED_KERNELS:
            raise ValueError(
                f"grouped_kernel must be one of {_GROUPED_KERNELS}, got {grouped_kernel!r}"
            )
        self.observation_dim = observation_dim
        self.action_dim = action_dim
        self.num_members = num_members
        self.probabilistic = bool(probabilistic)
        self.predict_reward = bool(predict_reward)
        self.num_elites = num_elites
        self.grouped_kernel = grouped_kernel
        self.target_dim = observation_dim + int(self.predict_reward)
        n_out = 1 + int(self.probabilistic) + int(self.predict_reward)
        if in_keys is None:
            in_keys = ["observation", "action"]
        if out_keys is None:
            out_keys = (
                ["loc"] + (["scale"] if self.probabilistic else []) + (["reward"] if self.predict_reward else [])
            )
        in_keys, out_keys = list(in_keys), list(out_keys)
        if len(in_keys) != 2:
            raise ValueError(f"in_keys must name the observation and the action (2 keys), got {in_keys!r}")
        if len(out_keys) != n_out:
            raise ValueError(
                f"out_keys must have {n_out} entries (loc"
                + (", scale" if self.probabilistic else "")
                + (", reward" if self.predict_reward else "")
                + f"), got {out_keys!r}"
            )
        self.in_keys = in_keys
        self.out_keys = out_keys
        # grouped_mm's 16-byte aligned weight copies: layer -> (data_ptr, version, copy)
        self._gmm_cache: dict[int, tuple[int, int, torch.Tensor]] = {}
        self.input_normalizer = Normalizer(observation_dim + action_dim)
        self.target_normalizer = Normalizer(self.target_dim)
        self.network = EnsembleMLP(
            num_members,
            observation_dim + action_dim,
            self.target_dim * (2 if self.probabilistic else 1),
            num_cells=num_cells,
            activation_class=activation,
            kernel=kernel,
        )
        if self.probabilistic:
            self.max_logvar = nn.Parameter(torch.full((num_members, 1, self.target_dim), float(max_log_var)))
            self.min_logvar = nn.Parameter(torch.full((num_members, 1, self.target_dim), float(min_log_var)))
        else:
            self.register_parameter("max_logvar", None)
            self.register_parameter("min_logvar", None)
        self.register_buffer("elite_indices", torch.arange(num_elites))

    # ------------------------------------------------------------------ checks
    def _check_inputs(
        self, observation: torch.Tensor, action: torch.Tensor, member_first: bool
    ) -> None:
        if observation.shape[-1] != self.observation_dim:
            raise ValueError(
                f"observation last dim must be {self.observation_dim}, got shape {tuple(observation.shape)}"
            )
        if action.shape[-1] != self.action_dim:
            raise ValueError(
                f"action last dim must be {self.action_dim}, got shape {tuple(action.shape)}"
            )
        if observation.shape[:-1] != action.shape[:-1]:
            raise ValueError(
                f"observation batch shape {tuple(observation.shape[:-1])} does not match "
                f"action batch shape {tuple(action.shape[:-1])}"
            )
        if member_first and (observation.dim() < 2 or observation.shape[0] != self.num_members):
            raise ValueError(
                f"member_first inputs need {self.num_members} members in dim 0, got shape {tuple(observation.shape)}"
            )
        dtype = self.network.layers[0].weight.dtype
        for name, value in (("observation", observation), ("action", action)):
            if value.dtype != dtype:
                raise TypeError(
                    f"{name} dtype {value.dtype} does not match the ensemble's {dtype}: cast the "
                    f"inputs (e.g. wrap a gym env in DoubleToFloat) or convert the ensemble with .to({value.dtype})"
                )

    # ------------------------------------------------------------------ normalised space
    def _bound_logvar(self, raw: torch.Tensor, max_logvar: torch.Tensor, min_logvar: torch.Tensor) -> torch.Tensor:
        # PETS (Chua et al. 2018, App. A.1) soft bounds
        log_var = max_logvar - F.softplus(max_logvar - raw)
        return min_logvar + F.softplus(log_var - min_logvar)

    def _split_heads(
        self, out: torch.Tensor, max_logvar: torch.Tensor | None, min_logvar: torch.Tensor | None
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        if not self.probabilistic:
            return out, None
        mean, raw = out.chunk(2, dim=-1)
        return mean, self._bound_logvar(raw, max_logvar, min_logvar)

    def _net_input(self, observation: torch.Tensor, action: torch.Tensor) -> torch.Tensor:
        return self.input_normalizer.normalize(torch.cat([observation, action], dim=-1))

    def forward_normalized(
        self,
        observation: torch.Tensor,
        action: torch.Tensor,
        *,
        member_first: bool = False,
        kernel: str | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Mean and log-variance of the normalised target, ``[E, *B, d_out]`` each.

        Args:
            observation (torch.Tensor): ``[*B, obs_dim]`` (shared) or ``[E, *B, obs_dim]``.
            action (torch.Tensor): ``[*B, act_dim]`` or ``[E, *B, act_dim]``.

        Keyword Args:
            member_first (bool, optional): whether inputs are per member. Defaults to ``False``.
            kernel (str, optional): :class:`EnsembleMLP` kernel for this call (``"bmm"`` or
                ``"loop"``); ``None`` uses the network's.

        Returns:
            ``(mean, log_var)``; ``log_var`` is ``None`` for a deterministic ensemble.
        """
        self._check_inputs(observation, action, member_first)
        x = self._net_input(observation, action)
        E = self.num_members
        batch = x.shape[1:-1] if member_first else x.shape[:-1]
        x = x.reshape(E, -1, x.shape[-1]) if member_first else x.reshape(-1, x.shape[-1])
        out = self.network(x, member_first=member_first, kernel=kernel)  # [E, N, d]
        mean, log_var = self._split_heads(out, self.max_logvar, self.min_logvar)
        mean = mean.reshape(E, *batch, self.target_dim)
        if log_var is not None:
            log_var = log_var.reshape(E, *batch, self.target_dim)
        return mean, log_var

    def normalized_target(
        self,
        observation: torch.Tensor,
        next_observation: torch.Tensor,
        reward: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Normalised regression target ``[next_obs - obs, reward]``, ``[..., d_out]``.

        Args:
            observation (torch.Tensor): ``[..., obs_dim]``.
            next_observation (torch.Tensor): ``[..., obs_dim]``.
            reward (torch.Tensor, optional): ``[..., 1]`` (or ``[...]``); required iff
                ``predict_reward``.
        """
        return self.target_normalizer.normalize(self._raw_target(observation, next_observation, reward))

    def _raw_target(
        self,
        observation: torch.Tensor,
        next_observation: torch.Tensor,
        reward: torch.Tensor | None,
    ) -> torch.Tensor:
        if next_observation.shape != observation.shape:
            raise ValueError(
                f"next_observation shape {tuple(next_observation.shape)} differs from "
                f"observation shape {tuple(observation.shape)}"
            )
        delta = next_observation - observation
        if not self.predict_reward:
            return delta
        if reward is None:
            raise ValueError("predict_reward=True but no reward was given")
        if reward.shape == observation.shape[:-1]:
            reward = reward.unsqueeze(-1)
        if reward.shape != (*observation.shape[:-1], 1):
            raise ValueError(
                f"reward must have shape {(*observation.shape[:-1], 1)}, got {tuple(reward.shape)}"
            )
        return torch.cat([delta, reward.to(delta.dtype)], dim=-1)

    @torch.no_grad()
    def fit_normalizers(
        self,
        observation: torch.Tensor,
        action: torch.Tensor,
        next_observation: torch.Tensor,
        reward: torch.Tensor | None = None,
    ) -> None:
        """Refit both normalisers on a dataset (any batch shape).

        Args:
            observation (torch.Tensor): ``[..., obs_dim]``.
            action (torch.Tensor): ``[..., act_dim]``.
            next_observation (torch.Tensor): ``[..., obs_dim]``.
            reward (torch.Tensor, optional): ``[..., 1]``; required iff ``predict_reward``.
        """
        self._check_inputs(observation, action, False)
        self.input_normalizer.fit(torch.cat([observation, action], dim=-1))
        self.target_normalizer.fit(self._raw_target(observation, next_observation, reward))

    # ------------------------------------------------------------------ data space
    def _to_prediction(
        self, observation: torch.Tensor, mean: torch.Tensor, log_var: torch.Tensor | None
    ) -> EnsemblePrediction:
        target = self.target_normalizer.denormalize(mean)
        d = self.observation_dim
        loc = observation + target[..., :d]
        reward = target[..., d:] if self.predict_reward else None
        scale = None
        if log_var is not None:
            scale = self.target_normalizer.denormalize_scale(torch.exp(0.5 * log_var))[..., :d]
        return EnsemblePrediction(loc, scale, reward)

    def predict(
        self,
        observation: torch.Tensor,
        action: torch.Tensor,
        member_index: torch.Tensor | None = None,
        *,
        member_first: bool = False,
        kernel: str | None = None,
    ) -> EnsemblePrediction:
        """Denormalised next-observation mean (obs + delta), std and reward mean.

        Args:
            observation (torch.Tensor): ``[*B, obs_dim]`` (or ``[E, *B, obs_dim]`` with
                ``member_first=True``).
            action (torch.Tensor): matching actions.
            member_index (torch.LongTensor, optional): ``[*B]`` member used for each row, or a
                0-d tensor: one member for every row. If given, outputs are ``[*B, d]`` and
                each row is evaluated by its member only (see ``grouped_kernel``).

        Keyword Args:
            member_first (bool, optional): per-member inputs (without ``member_index``).
            kernel (str, optional): :class:`EnsembleMLP` kernel (``"bmm"``/``"loop"``) of the
                all-member evaluation (without ``member_index``); ``None`` uses the network's.

        Returns:
            :class:`EnsemblePrediction` with ``[E, *B, d]`` tensors (``[*B, d]`` with
            ``member_index``).
        """
        if member_index is None:
            mean, log_var = self.forward_normalized(
                observation, action, member_first=member_first, kernel=kernel
            )
            return self._to_prediction(observation, mean, log_var)
        if member_first:
            raise ValueError("member_index cannot be combined with member_first=True")
        self._check_inputs(observation, action, False)
        if member_index.dtype not in _INT_DTYPES:
            raise TypeError(f"member_index must be an integer tensor, got dtype {member_index.dtype}")
        batch = observation.shape[:-1]
        if member_index.dim() != 0 and member_index.shape != batch:
            raise ValueError(
                f"member_index shape {tuple(member_index.shape)} must equal the batch shape "
                f"{tuple(batch)} (or be 0-d: one member for every row)"
            )
        return self.member_predictor(observation.device)(observation, action, member_index.long())

    def _resolve_grouped_kernel(self, device: torch.device) -> str:
        grouped = self.grouped_kernel
        if grouped == "auto":
            if device.type != "cpu":
                return "gather"
            needs_grad = torch.is_grad_enabled() and self.network.layers[0].weight.requires_grad
            # grouped_mm has no CPU backward: a differentiable call uses the member loop
            return "grouped_mm" if _HAS_GROUPED_MM and not needs_grad else "loop"
        return grouped

    def forward_members(
        self, x: torch.Tensor, member_index: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Normalised-space mean and log-variance of each row under its own member.

        Args:
            x (torch.Tensor): normalised network input ``[N, obs_dim + act_dim]``.
            member_index (torch.LongTensor): ``[N]`` member of each row, or 0-d (one member
                for every row).

        Returns:
            ``(mean [N, d_out], log_var [N, d_out] or None)``, evaluated with
            ``grouped_kernel`` (see the class docstring).

        Examples:
            >>> from torchrl_depeff.modules.ensemble import DynamicsEnsemble
            >>> model = DynamicsEnsemble(3, 2, num_members=4, num_cells=(8,), probabilistic=True)
            >>> x, idx = torch.randn(6, 5), torch.tensor([3, 0, 0, 2, 1, 3])
            >>> with torch.no_grad():
            ...     mean, log_var = model.forward_members(x, idx)
            ...     full, _ = model.network(x, member_first=False).chunk(2, -1)
            >>> torch.allclose(mean, full[idx, torch.arange(6)], atol=1e-6)
            True
        """
        return self.member_predictor(x.device).forward(x, member_index)

    def member_predictor(self, device: torch.device | str | None = None) -> MemberPredictor:
        """``predict(observation, action, member_index)`` with the ensemble's tensors bound once.

        :meth:`predict` with ``member_index`` builds one per call; a loop calling it many
        times (a model rollout) builds it once, saving the per-call attribute lookups. The
        kernel (``grouped_kernel``, resolved for ``device`` and the current grad mode) and the
        aligned weight copies of ``"grouped_mm"`` are fixed when it is built: build a new one
        after the parameters change. It performs the same operations as :meth:`predict`, so
        the results are identical.

        Args:
            device (torch.device, optional): device of the inputs. Defaults to the parameters'.

        Returns:
            a :class:`MemberPredictor`.

        Examples:
            >>> from torchrl_depeff.modules.ensemble import DynamicsEnsemble
            >>> model = DynamicsEnsemble(3, 2, num_members=4, num_cells=(8,))
            >>> obs, act, idx = torch.randn(6, 3), torch.randn(6, 2), torch.randint(4, (6,))
            >>> with torch.no_grad():
            ...     step = model.member_predictor()
            ...     torch.equal(step(obs, act, idx).loc, model.predict(obs, act, member_index=idx).loc)
            True
        """
        weight = self.network.layers[0].weight
        device = weight.device if device is None else torch.device(device)
        kind = self._resolve_grouped_kernel(device)
        if kind == "grouped_mm":
            if not _HAS_GROUPED_MM:
                raise RuntimeError("grouped_kernel='grouped_mm' needs torch.nn.functional.grouped_mm (torch >= 2.8)")
            if torch.is_grad_enabled() and weight.requires_grad:
                raise RuntimeError(
                    "grouped_kernel='grouped_mm' is inference-only (no CPU backward): call it under "
                    "torch.no_grad() or use grouped_kernel='auto' / 'loop' / 'gather'"
                )
        return MemberPredictor(self, kind, device)

    def _grouped_padded(
        self, x: torch.Tensor, idx: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        E, N = self.num_members, x.shape[0]
        sorted_idx, perm = torch.sort(idx, stable=True)
        counts = torch.bincount(idx, minlength=E)
        offsets = counts.cumsum(0) - counts
        pos = torch.arange(N, device=x.device) - offsets[sorted_idx]
        max_rows = int(counts.max()) if N > 0 else 0
        padded = x.new_zeros(E, max_rows, x.shape[-1])
        padded[sorted_idx, pos] = x[perm]
        out = self.network(padded, member_first=True)  # [E, max_rows, d]
        mean, log_var = self._split_heads(out, self.max_logvar, self.min_logvar)
        mean_rows = mean.new_empty(N, mean.shape[-1])
        mean_rows[perm] = mean[sorted_idx, pos]
        if log_var is None:
            return mean_rows, None
        lv_rows = log_var.new_empty(N, log_var.shape[-1])
        lv_rows[perm] = log_var[sorted_idx, pos]
        return mean_rows, lv_rows

    def _grouped_loop(
        self, x: torch.Tensor, idx: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        E, N = self.num_members, x.shape[0]
        sorted_idx, perm = torch.sort(idx, stable=True)
        counts = torch.bincount(idx, minlength=E).tolist()
        width = self.network.out_features
        out = x.new_empty(N, width)
        start = 0
        for e in range(E):
            rows = perm[start : start + counts[e]]
            start += counts[e]
            if counts[e] == 0:
                continue
            out[rows] = self.network.forward_member(x[rows], e)
        if not self.probabilistic:
            return out, None
        mean, raw = out.chunk(2, dim=-1)
        return mean, self._bound_logvar(raw, self.max_logvar[idx, 0], self.min_logvar[idx, 0])

    def forward(self, tensordict: TensorDictBase) -> TensorDictBase:
        """Write ``out_keys``: loc ``[*B, E, obs_dim]`` (+ scale, reward ``[*B, E, 1]``).

        Reads the observation and action from ``in_keys``; the outputs go to ``out_keys``
        in the order loc [, scale] [, reward] (defaults ``"loc"``, ``"scale"``, ``"reward"``).
        """
        if len(self.in_keys) != 2:
            raise ValueError(f"in_keys must name the observation and the action, got {self.in_keys!r}")
        observation = tensordict.get(self.in_keys[0])
        action = tensordict.get(self.in_keys[1])
        pred = self.predict(observation, action)
        values = [pred.loc] + [v for v in (pred.scale, pred.reward) if v is not None]
        if len(self.out_keys) != len(values):
            raise ValueError(
                f"out_keys {self.out_keys!r} must have {len(values)} entries (loc"
                + (", scale" if pred.scale is not None else "")
                + (", reward" if pred.reward is not None else "")
                + ")"
            )
        for key, value in zip(self.out_keys, values):
            tensordict.set(key, value.movedim(0, -2))
        return tensordict

    # ------------------------------------------------------------------ elites
    @torch.no_grad()
    def set_elites(self, holdout_losses: torch.Tensor) -> torch.Tensor:
        """Keep the ``num_elites`` members with the lowest holdout loss (NaN counts as worst).

        Args:
            holdout_losses (torch.Tensor): ``[E]``.

        Returns:
            the new ``elite_indices`` (sorted ascending by member index).
        """
        if holdout_losses.shape != (self.num_members,):
            raise ValueError(
                f"holdout_losses must have shape ({self.num_members},), got {tuple(holdout_losses.shape)}"
            )
        losses = torch.nan_to_num(holdout_losses.detach().float(), nan=float("inf"))
        elites = torch.topk(losses, self.num_elites, largest=False).indices.sort().values
        self.elite_indices.copy_(elites.to(self.elite_indices.device))
        return self.elite_indices


def _activation_fn(module: nn.Module) -> Callable[[torch.Tensor], torch.Tensor]:
    """The functional form of a standard activation module (same values, no module call)."""
    kind = type(module)
    if kind is nn.ReLU:
        return torch.relu
    if kind is nn.SiLU:
        return F.silu
    if kind is nn.Tanh:
        return torch.tanh
    return module


def _gmm_weight(ensemble: DynamicsEnsemble, position: int, weight: torch.Tensor) -> torch.Tensor:
    """``weight`` with rows at a 16-byte multiple stride, as ``grouped_mm`` reads them.

    A weight whose ``out_features`` is not a multiple of 16 bytes is copied into padded storage
    (viewed back at its true shape) and cached until the parameter changes (its version counter
    moves at every in-place update, its data pointer when it is replaced).
    """
    align = 16 // weight.element_size()
    if weight.stride(-1) == 1 and weight.stride(-2) % align == 0:
        return weight
    entry = ensemble._gmm_cache.get(position)
    if entry is not None and entry[0] == weight.data_ptr() and entry[1] == weight._version:
        return entry[2]
    width = weight.shape[-1]
    with torch.no_grad():
        padded = F.pad(weight.detach(), (0, (-width) % align))[..., :width]
    ensemble._gmm_cache[position] = (weight.data_ptr(), weight._version, padded)
    return padded


def _aligned_rows(x: torch.Tensor) -> torch.Tensor:
    align = 16 // x.element_size()
    if x.stride(-1) == 1 and x.stride(0) % align == 0:
        return x
    width = x.shape[-1]
    return F.pad(x, (0, (-width) % align))[:, :width]


class MemberPredictor:
    """Per-row member evaluation of a :class:`DynamicsEnsemble` (see
    :meth:`DynamicsEnsemble.member_predictor`); ``__call__`` has the signature of
    ``predict(observation, action, member_index)``.

    Kernels: a 0-d ``member_index`` runs one ``addmm`` per layer on the member's weight
    slices (on CPU, views of the member's slices kept from its first call without autograd,
    picked with one host read of the index; elsewhere an ``index_select`` copy, so the index
    never travels to the host); ``"grouped_mm"`` sorts the rows by member and runs one
    :func:`torch.nn.functional.grouped_mm` per layer; ``"gather"``
    evaluates every member on every row (one ``baddbmm`` per layer) and gathers; ``"padded"`` /
    ``"loop"`` use :class:`DynamicsEnsemble`'s packed block / member loop.

    Args:
        ensemble (DynamicsEnsemble): the ensemble.
        kind (str): resolved kernel, ``"grouped_mm"``, ``"gather"``, ``"padded"`` or ``"loop"``.
        device (torch.device): device of the inputs.

    Examples:
        >>> from torchrl_depeff.modules.ensemble import DynamicsEnsemble, MemberPredictor
        >>> model = DynamicsEnsemble(3, 2, num_members=4, num_cells=(8,), probabilistic=True)
        >>> with torch.no_grad():
        ...     pred = MemberPredictor(model, "grouped_mm", torch.device("cpu"))(
        ...         torch.randn(5, 3), torch.randn(5, 2), torch.tensor(1))
        >>> pred.loc.shape, pred.scale.shape
        (torch.Size([5, 3]), torch.Size([5, 3]))
    """

    __slots__ = (
        "ensemble", "kind", "weights", "biases", "aligned", "acts", "in_loc", "in_scale", "t_loc",
        "t_scale", "obs_dim", "probabilistic", "predict_reward", "max_logvar", "min_logvar", "members",
        "on_cpu", "inplace", "member_views",
    )

    def __init__(self, ensemble: DynamicsEnsemble, kind: str, device: torch.device) -> None:
        net = ensemble.network
        self.ensemble = ensemble
        self.kind = kind
        self.weights = [layer.weight for layer in net.layers]
        self.biases = [layer.bias[:, 0] for layer in net.layers]  # [E, out]
        self.aligned = (
            [_gmm_weight(ensemble, i, w) for i, w in enumerate(self.weights)] if kind == "grouped_mm" else None
        )
        self.acts = [_activation_fn(a) for a in net.activations]
        self.in_loc, self.in_scale = ensemble.input_normalizer.loc, ensemble.input_normalizer.scale
        self.t_loc, self.t_scale = ensemble.target_normalizer.loc, ensemble.target_normalizer.scale
        self.obs_dim = ensemble.observation_dim
        self.probabilistic = ensemble.probabilistic
        self.predict_reward = ensemble.predict_reward
        self.max_logvar = ensemble.max_logvar[:, 0] if ensemble.probabilistic else None  # [E, d]
        self.min_logvar = ensemble.min_logvar[:, 0] if ensemble.probabilistic else None
        self.members = torch.arange(ensemble.num_members, device=device)
        self.on_cpu = torch.device(device).type == "cpu"
        self.inplace = not torch.is_grad_enabled()
        # on CPU, each member's (weight, bias) views per layer and its log-variance bounds, taken
        # at its first use without autograd: a 0-d member index then costs one host read per call
        # instead of a narrow + select per tensor and layer (the same views, same products)
        self.member_views: list | None = [None] * ensemble.num_members if self.on_cpu else None

    def _member(self, member: torch.Tensor) -> int:
        # a 0-d CPU index as a Python int (reading a CPU tensor does not synchronise a device)
        m = int(member)
        if not 0 <= m < len(self.member_views):
            raise IndexError(f"member_index {m} out of range for {len(self.member_views)} members")
        return m

    def _views(self, m: int) -> tuple[list, tuple[torch.Tensor, torch.Tensor] | None]:
        # ([(weight [in, out], bias [out])], (max_logvar [d], min_logvar [d]) or None) of member m;
        # kept only when made without autograd (a view made under no_grad carries no gradient)
        keep = not torch.is_grad_enabled()
        views = self.member_views[m] if keep else None
        if views is None:
            layers = [(w[m], b[m]) for w, b in zip(self.weights, self.biases)]
            bounds = (self.max_logvar[m], self.min_logvar[m]) if self.probabilistic else None
            views = (layers, bounds)
            if keep:
                self.member_views[m] = views
        return views

    def _split(
        self, h: torch.Tensor, member: torch.Tensor, bounds: tuple[torch.Tensor, torch.Tensor] | None = None
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        # bounds: a 0-d CPU member's (max_logvar, min_logvar) views from _views
        if not self.probabilistic:
            return h, None
        mean, raw = h.chunk(2, dim=-1)
        if bounds is not None:
            hi, lo = bounds
        elif member.dim() == 0:
            sel = member.view(1)
            hi, lo = self.max_logvar.index_select(0, sel)[0], self.min_logvar.index_select(0, sel)[0]
        else:
            hi, lo = self.max_logvar.index_select(0, member), self.min_logvar.index_select(0, member)
        return mean, self.ensemble._bound_logvar(raw, hi, lo)

    def _act(self, i: int, h: torch.Tensor) -> torch.Tensor:
        act = self.acts[i]
        if self.inplace and act is torch.relu:
            return h.relu_()
        return act(h)

    def forward(self, x: torch.Tensor, member: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Normalised mean and log-variance ``[N, d_out]`` of rows ``x`` ``[N, in]``."""
        if member.dim() == 0 and self.kind in ("grouped_mm", "gather"):
            h = x
            if self.on_cpu:
                layers, bounds = self._views(self._member(member))
                for i, (w, b) in enumerate(layers):
                    if i:
                        h = self._act(i - 1, h)
                    h = torch.addmm(b, h, w)
                return self._split(h, member, bounds)
            sel = member.view(1)
            for i, (w, b) in enumerate(zip(self.weights, self.biases)):
                if i:
                    h = self._act(i - 1, h)
                h = torch.addmm(b.index_select(0, sel)[0], h, w.index_select(0, sel)[0])
            return self._split(h, member)
        if member.dim() == 0:
            member = member.expand(x.shape[0])
        if self.kind == "grouped_mm":
            # MoE-style grouped GEMM: rows sorted by member, offs[e] = end of member e's rows
            sorted_idx, perm = torch.sort(member, stable=True)
            offs = torch.searchsorted(sorted_idx, self.members, right=True).to(torch.int32)
            h = x.index_select(0, perm)
            for i, (w, b) in enumerate(zip(self.aligned, self.biases)):
                if i:
                    h = self._act(i - 1, h)
                h = F.grouped_mm(_aligned_rows(h), w, offs=offs)
                h = h.add_(b.index_select(0, sorted_idx)) if self.inplace else h + b.index_select(0, sorted_idx)
            # back to the input row order
            h = torch.empty_like(h).index_copy_(0, perm, h)
            return self._split(h, member)
        if self.kind == "gather":
            out = self.ensemble.network(x, member_first=False, kernel="bmm")  # [E, N, d]
            return self._split(out.gather(0, member.view(1, -1, 1).expand(1, *out.shape[1:]))[0], member)
        if self.kind == "padded":
            return self.ensemble._grouped_padded(x, member)
        return self.ensemble._grouped_loop(x, member)

    def __call__(self, observation: torch.Tensor, action: torch.Tensor, member_index: torch.Tensor) -> EnsemblePrediction:
        """``predict(observation, action, member_index=member_index)`` (no input checks)."""
        batch = observation.shape[:-1]
        x = (torch.cat([observation, action], dim=-1) - self.in_loc) / self.in_scale  # input normaliser
        x = x.reshape(-1, x.shape[-1])
        mean, log_var = self.forward(x, member_index if member_index.dim() == 0 else member_index.reshape(-1))
        if len(batch) != 1:
            mean = mean.reshape(*batch, mean.shape[-1])
            log_var = log_var.reshape(*batch, log_var.shape[-1]) if log_var is not None else None
        # DynamicsEnsemble._to_prediction with the bound tensors
        target = mean * self.t_scale + self.t_loc
        d = self.obs_dim
        loc = observation + target[..., :d]
        reward = target[..., d:] if self.predict_reward else None
        scale = None
        if log_var is not None:
            scale = (torch.exp(0.5 * log_var) * self.t_scale)[..., :d]
        return EnsemblePrediction(loc, scale, reward)
