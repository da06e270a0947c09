"""Tanh-squashed Gaussian-mixture policy (MB2PO App. 7.1: "a 5-head tanh squashed GMM").

MB2PO (Villaflor & Dolan, "Fine-tuning offline RL with model-based policy optimization") represents
its policy by a mixture of ``K = 5`` diagonal Gaussians whose samples are squashed by ``tanh``;
the policy and the Q-networks are ``[256, 256, 256, 256]`` ReLU MLPs. AWAC never differentiates through samples of the
policy (MB2PO Sec. 4.2: "it does not rely on the reparametrization trick"), so only an exact
``log_prob`` is required for training; ``rsample`` is still provided for other uses.
"""
from __future__ import annotations

import math
from typing import Sequence

import torch
from tensordict.nn import InteractionType, TensorDictModule
from torch import distributions as D, nn
from torch.nn import functional as F
from torchrl.modules import ProbabilisticActor

__all__ = ["TanhGaussianMixture", "GMMPolicyNet", "make_gmm_actor"]

_LOG2 = math.log(2.0)


def _tanh_log_abs_det_jacobian(pre_tanh: torch.Tensor) -> torch.Tensor:
    """``log(1 - tanh(u)^2) = 2 (log 2 - u - softplus(-2u))``, stable for large ``|u|``."""
    return 2.0 * (_LOG2 - pre_tanh - F.softplus(-2.0 * pre_tanh))


class TanhGaussianMixture(D.Distribution):
    r"""Mixture of ``K`` diagonal Gaussians, squashed by ``tanh``.

    .. math::
        \pi(a|s) = \sum_k w_k\, \mathcal{N}(\operatorname{atanh} a; \mu_k, \sigma_k)
                   \prod_j (1 - a_j^2)^{-1},\qquad w = \operatorname{softmax}(\text{logits}).

    Choices (MB2PO only names the policy class):

    * ``log_prob`` is exact: ``logsumexp_k(log w_k + log N(u; mu_k, sigma_k)) - sum_j log(1 - a_j^2)``
      with ``u = atanh(a)``. Actions are clamped to ``|a| <= 1 - eps`` (``eps`` = ``1e-6`` for
      float32, ``1e-12`` for float64) before ``atanh``, so dataset actions on the boundary (or
      samples saturated by rounding) give finite log-probabilities. The Jacobian uses the stable
      identity ``log(1 - tanh(u)^2) = 2 (log 2 - u - softplus(-2u))``.
    * ``rsample`` draws the component index from ``Categorical(logits)`` *without* a gradient (a
      discrete choice has no reparameterisation) and then ``tanh(mu_k + sigma_k * eps)`` with
      ``eps ~ N(0, I)``: gradients reach the chosen component's ``loc`` and ``scale`` but never the
      ``logits``. Samples are clamped to ``|a| <= 1 - eps`` so they lie in the open interval
      ``(-1, 1)`` even where float32 ``tanh`` rounds to ``+-1``. AWAC does not need ``rsample`` (it only uses ``log_prob``); SAC-style uses would need
      a score-function term for the weights.
    * ``deterministic_sample`` (also ``mode`` and ``mean`` here) is ``tanh`` of the mean of the most
      likely component. The true mixture mean, ``E[tanh(u)]``, has no closed form and averaging
      modes of a multi-modal policy can land between them, in a region the data never visited.
    * ``entropy`` is not implemented.

    Args:
        logits (torch.Tensor): unnormalised component log-weights ``[*B, K]``.
        loc (torch.Tensor): pre-tanh component means ``[*B, K, d]``.
        scale (torch.Tensor): pre-tanh component standard deviations ``[*B, K, d]``, ``> 0``.

    Examples:
        >>> from torchrl_depeff.modules.mixture import TanhGaussianMixture
        >>> logits, loc, scale = torch.zeros(4, 3), torch.zeros(4, 3, 2), torch.ones(4, 3, 2)
        >>> dist = TanhGaussianMixture(logits, loc, scale)
        >>> a = dist.sample((7,))
        >>> a.shape, bool(a.abs().max() < 1), dist.log_prob(a).shape
        (torch.Size([7, 4, 2]), True, torch.Size([7, 4]))
        >>> dist.deterministic_sample.shape
        torch.Size([4, 2])
    """

    arg_constraints: dict = {}
    support = D.constraints.interval(-1.0, 1.0)
    has_rsample = True

    def __init__(self, logits: torch.Tensor, loc: torch.Tensor, scale: torch.Tensor) -> None:
        if loc.ndim < 2 or loc.shape != scale.shape:
            raise ValueError(
                f"loc and scale must share a shape [*B, K, d], got loc {tuple(loc.shape)} "
                f"and scale {tuple(scale.shape)}"
            )
        if logits.shape != loc.shape[:-1]:
            raise ValueError(
                f"logits must have shape [*B, K] = {tuple(loc.shape[:-1])}, got {tuple(logits.shape)}"
            )
        self.logits = logits
        self.loc = loc
        self.scale = scale
        self._eps = 1e-12 if loc.dtype == torch.float64 else 1e-6
        super().__init__(
            batch_shape=logits.shape[:-1], event_shape=loc.shape[-1:], validate_args=False
        )

    @property
    def num_components(self) -> int:
        """Number of mixture components ``K``."""
        return self.logits.shape[-1]

    def log_prob(self, value: torch.Tensor) -> torch.Tensor:
        """Exact log-density of actions ``value`` ``[*S, *B, d]`` -> ``[*S, *B]``."""
        bound = 1.0 - self._eps
        value = value.clamp(-bound, bound)
        pre_tanh = torch.atanh(value)  # [*S, *B, d]
        u = pre_tanh.unsqueeze(-2)  # [*S, *B, 1, d]
        var = self.scale.pow(2)
        # diagonal Gaussian log-density of every component, summed over action dims: [*S, *B, K]
        log_normal = -0.5 * (
            (u - self.loc).pow(2) / var + 2.0 * self.scale.log() + math.log(2.0 * math.pi)
        ).sum(-1)
        log_w = torch.log_softmax(self.logits, dim=-1)
        log_mix = torch.logsumexp(log_w + log_normal, dim=-1)
        return log_mix - _tanh_log_abs_det_jacobian(pre_tanh).sum(-1)

    def _component_index(self, sample_shape: torch.Size) -> torch.Tensor:
        with torch.no_grad():
            return D.Categorical(logits=self.logits).sample(sample_shape)  # [*S, *B]

    def rsample(self, sample_shape: torch.Size | Sequence[int] = torch.Size()) -> torch.Tensor:
        """Reparameterised draw given a (non-differentiable) component choice ``[*S, *B, d]``."""
        sample_shape = torch.Size(sample_shape)
        idx = self._component_index(sample_shape)  # [*S, *B]
        shape = sample_shape + self.loc.shape  # [*S, *B, K, d]
        gather_idx = idx[..., None, None].expand(*idx.shape, 1, self.loc.shape[-1])
        loc = self.loc.expand(shape).gather(-2, gather_idx).squeeze(-2)
        scale = self.scale.expand(shape).gather(-2, gather_idx).squeeze(-2)
        bound = 1.0 - self._eps  # float32 tanh rounds to +-1 beyond |u| ~ 9; keep samples inside
        return torch.tanh(loc + scale * torch.randn_like(loc)).clamp(-bound, bound)

    def sample(self, sample_shape: torch.Size | Sequence[int] = torch.Size()) -> torch.Tensor:
        """Draw without gradient, ``[*S, *B, d]``."""
        with torch.no_grad():
            return self.rsample(sample_shape)

    @property
    def deterministic_sample(self) -> torch.Tensor:
        """``tanh`` of the mean of the most likely component, ``[*B, d]``."""
        idx = self.logits.argmax(-1)  # [*B]
        gather_idx = idx[..., None, None].expand(*idx.shape, 1, self.loc.shape[-1])
        return torch.tanh(self.loc.gather(-2, gather_idx).squeeze(-2))

    @property
    def mode(self) -> torch.Tensor:
        """Same as :attr:`deterministic_sample` (see the class docstring)."""
        return self.deterministic_sample

    @property
    def mean(self) -> torch.Tensor:
        """Same as :attr:`deterministic_sample` (see the class docstring)."""
        return self.deterministic_sample


class GMMPolicyNet(nn.Module):
    """Observation ``[*B, obs]`` -> mixture parameters ``(logits [*B, K], loc, scale [*B, K, d])``.

    Choice: the log-std is clamped to ``[log_std_min, log_std_max] = [-5, 2]`` (the usual
    SAC/AWAC bounds for tanh policies; MB2PO does not state them) so that ``log_prob`` of
    dataset actions cannot blow up through a collapsing ``scale``.

    Args:
        observation_dim (int): observation size.
        action_dim (int): action size ``d``.
        num_components (int): mixture size ``K``. Defaults to ``5`` (MB2PO App. 7.1).
        num_cells (Sequence[int]): hidden widths. Defaults to ``(256, 256, 256, 256)`` (MB2PO App. 7.1).
        activation (type[nn.Module]): hidden activation. Defaults to ``nn.ReLU`` (MB2PO App. 7.1).
        log_std_min (float): lower log-std bound. Defaults to ``-5.0``.
        log_std_max (float): upper log-std bound. Defaults to ``2.0``.

    Examples:
        >>> from torchrl_depeff.modules.mixture import GMMPolicyNet
        >>> net = GMMPolicyNet(3, 2, num_components=4, num_cells=(8,))
        >>> logits, loc, scale = net(torch.randn(6, 3))
        >>> logits.shape, loc.shape, scale.shape
        (torch.Size([6, 4]), torch.Size([6, 4, 2]), torch.Size([6, 4, 2]))
    """

    def __init__(
        self,
        observation_dim: int,
        action_dim: int,
        num_components: int = 5,
        num_cells: Sequence[int] = (256, 256, 256, 256),
        activation: type[nn.Module] = nn.ReLU,
        log_std_min: float = -5.0,
        log_std_max: float = 2.0,
    ) -> None:
        super().__init__()
        if observation_dim < 1 or action_dim < 1:
            raise ValueError(
                f"observation_dim and action_dim must be >= 1, got {observation_dim}, {action_dim}"
            )
        if num_components < 1:
            raise ValueError(f"num_components must be >= 1, got {num_components}")
        if not log_std_min < log_std_max:
            raise ValueError(f"log_std_min must be < log_std_max, got {log_std_min}, {log_std_max}")
        self.action_dim = int(action_dim)
        self.num_components = int(num_components)
        self.log_std_min = float(log_std_min)
        self.log_std_max = float(log_std_max)
        layers: list[nn.Module] = []
        last = int(observation_dim)
        for cells in num_cells:
            layers += [nn.Linear(last, int(cells)), activation()]
            last = int(cells)
        layers.append(nn.Linear(last, self.num_components * (1 + 2 * self.action_dim)))
        self.mlp = nn.Sequential(*layers)

    def forward(self, observation: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        k, d = self.num_components, self.action_dim
        out = self.mlp(observation)
        logits = out[..., :k]
        loc, log_std = out[..., k:].unflatten(-1, (k, 2 * d)).chunk(2, dim=-1)
        scale = log_std.clamp(self.log_std_min, self.log_std_max).exp()
        return logits, loc, scale


def make_gmm_actor(
    observation_dim: int,
    action_dim: int,
    *,
    num_components: int = 5,
    num_cells: Sequence[int] = (256, 256, 256, 256),
    activation: type[nn.Module] = nn.ReLU,
    observation_key: str = "observation",
    default_interaction_type: InteractionType = InteractionType.RANDOM,
) -> ProbabilisticActor:
    """MB2PO's tanh Gaussian-mixture actor as a TorchRL :class:`ProbabilisticActor`.

    Writes ``"logits"`` ``[*B, K]``, ``"loc"`` and ``"scale"`` ``[*B, K, d]``, ``"action"``
    ``[*B, d]`` and its log-probability ``"action_log_prob"`` ``[*B]``.

    Choice: ``default_interaction_type`` is ``RANDOM`` (the mixture is meant to be sampled during
    data collection); wrap evaluation in ``set_exploration_type(ExplorationType.DETERMINISTIC)`` to
    get ``tanh`` of the most likely component's mean.

    Args:
        observation_dim (int): observation size.
        action_dim (int): action size.
        num_components (int): number of mixture heads. Defaults to ``5`` (MB2PO App. 7.1).
        num_cells (Sequence[int]): hidden widths. Defaults to ``(256, 256, 256, 256)`` (MB2PO App. 7.1).
        activation (type[nn.Module]): hidden activation. Defaults to ``nn.ReLU``.
        observation_key (str): input key. Defaults to ``"observation"``.
        default_interaction_type (InteractionType): how ``"action"`` is produced outside
            ``set_exploration_type``. Defaults to ``InteractionType.RANDOM``.

    Examples:
        >>> from torchrl_depeff.modules.mixture import make_gmm_actor
        >>> from tensordict import TensorDict
        >>> actor = make_gmm_actor(3, 2, num_cells=(16,))
        >>> td = actor(TensorDict({"observation": torch.randn(5, 3)}, batch_size=[5]))
        >>> td["logits"].shape, td["loc"].shape, td["action"].shape, td["action_log_prob"].shape
        (torch.Size([5, 5]), torch.Size([5, 5, 2]), torch.Size([5, 2]), torch.Size([5]))
        >>> bool(td["action"].abs().max() < 1)
        True
    """
    net = GMMPolicyNet(
        observation_dim,
        action_dim,
        num_components=num_components,
        num_cells=num_cells,
        activation=activation,
    )
    module = TensorDictModule(net, in_keys=[observation_key], out_keys=["logits", "loc", "scale"])
    return ProbabilisticActor(
        module,
        in_keys=["logits", "loc", "scale"],
        out_keys=["action"],
        distribution_class=TanhGaussianMixture,
        return_log_prob=True,
        default_interaction_type=default_interaction_type,
    )
