"""Gaussian actors and exploration noise for BREMEN and MUSBO.

BREMEN (Matsushima et al., 2020, App. F.1/F.2) uses a 2x200 MLP policy whose mean is squashed by
``tanh`` and a *stationary* Gaussian noise: ``a_t = tanh(mu(s_t)) + eps``, ``eps ~ N(0, 0.1^2)``.
The noise is added after the squashing, so the action is not bounded; the real environment clips.
MUSBO eq. (22) replaces the stationary noise by an uncertainty-scaled one at deployment time.
"""
from __future__ import annotations

import math
from typing import Sequence

import torch
from tensordict import TensorDictBase
from tensordict.nn import InteractionType, TensorDictModule, TensorDictModuleBase
from tensordict.utils import NestedKey
from torch import nn
from torchrl.modules import IndependentNormal, ProbabilisticActor

__all__ = [
    "GaussianPolicyNet",
    "make_gaussian_actor",
    "GaussianActionNoise",
    "UncertaintyActionNoise",
]


def _mlp(in_dim: int, out_dim: int, num_cells: Sequence[int], activation: type[nn.Module]) -> nn.Sequential:
    layers: list[nn.Module] = []
    last = in_dim
    for cells in num_cells:
        layers += [nn.Linear(last, int(cells)), activation()]
        last = int(cells)
    layers.append(nn.Linear(last, out_dim))
    return nn.Sequential(*layers)


class GaussianPolicyNet(nn.Module):
    """Observation ``[*B, obs]`` -> ``(loc, scale)`` with ``loc = tanh(mlp(s))`` ``[*B, act]``.

    BREMEN App. F.1: ``a_t = tanh(mu(s_t)) + eps`` with stationary ``eps ~ N(0, sigma^2)``,
    ``sigma = 0.1``. With ``learn_sigma=False`` the log-std is a *buffer* (saved in the state dict,
    never trained); with ``learn_sigma=True`` it is a state-independent ``nn.Parameter`` of shape
    ``[act]`` (the rllab/TRPO ``GaussianMLPPolicy`` convention, BREMEN's learned-sigma variant).

    Choice: hidden activation defaults to ``nn.Tanh``, the rllab ``GaussianMLPPolicy`` default
    that BREMEN's TRPO code builds on; the paper does not state it.

    Args:
        observation_dim (int): observation size.
        action_dim (int): action size.
        num_cells (Sequence[int]): hidden layer widths. Defaults to ``(200, 200)``.
        activation (type[nn.Module]): hidden activation class. Defaults to ``nn.Tanh``.
        sigma (float): initial (or fixed) standard deviation, ``> 0``. Defaults to ``0.1``.
        learn_sigma (bool): make the log-std a parameter. Defaults to ``False``.
        normalize_observations (bool): feed ``(s - obs_loc) / obs_scale`` to the MLP, with the two
            statistics as buffers (identity until :meth:`set_observation_stats`), as BREMEN's
            reference code normalises policy inputs with the data's statistics. Defaults to ``False``
            (the state dict then has no such buffers).

    Examples:
        >>> from torchrl_depeff.modules.actors import GaussianPolicyNet
        >>> net = GaussianPolicyNet(3, 2, num_cells=(8,))
        >>> loc, scale = net(torch.randn(5, 3))
        >>> loc.shape, scale.shape, bool(loc.abs().max() < 1), round(float(scale[0, 0]), 4)
        (torch.Size([5, 2]), torch.Size([5, 2]), True, 0.1)
    """

    def __init__(
        self,
        observation_dim: int,
        action_dim: int,
        num_cells: Sequence[int] = (200, 200),
        activation: type[nn.Module] = nn.Tanh,
        sigma: float = 0.1,
        learn_sigma: bool = False,
        normalize_observations: bool = False,
    ) -> None:
        super().__init__()
        if observation_dim < 1 or action_dim < 1:
            raise ValueError(
                f"observation_dim and action_dim must be >= 1, got {observation_dim}, {action_dim}"
            )
        if not sigma > 0:
            raise ValueError(f"sigma must be > 0, got {sigma}")
        self.observation_dim = int(observation_dim)
        self.action_dim = int(action_dim)
        self.learn_sigma = bool(learn_sigma)
        self.mean_net = _mlp(observation_dim, action_dim, num_cells, activation)
        log_std = torch.full((action_dim,), math.log(sigma))
        if learn_sigma:
            self.log_std = nn.Parameter(log_std)
        else:
            self.register_buffer("log_std", log_std)
        self.normalize_observations = bool(normalize_observations)
        if self.normalize_observations:
            self.register_buffer("obs_loc", torch.zeros(observation_dim))
            self.register_buffer("obs_scale", torch.ones(observation_dim))

    def normalize_inputs(self, observation: torch.Tensor) -> torch.Tensor:
        """The MLP's input: ``observation`` itself, or ``(s - obs_loc) / obs_scale`` when normalising."""
        if not self.normalize_observations:
            return observation
        return (observation - self.obs_loc) / self.obs_scale

    @torch.no_grad()
    def set_observation_stats(self, observations: torch.Tensor, *, min_scale: float = 1e-6) -> None:
        """Set the input normaliser to the mean and std of ``observations`` ``[N, obs]``.

        Examples:
            >>> from torchrl_depeff.modules.actors import GaussianPolicyNet
            >>> net = GaussianPolicyNet(2, 1, num_cells=(4,), normalize_observations=True)
            >>> net.set_observation_stats(torch.tensor([[1.0, 10.0], [3.0, 30.0]]))
            >>> net.normalize_inputs(torch.tensor([[2.0, 20.0]])).tolist()
            [[0.0, 0.0]]
        """
        if not self.normalize_observations:
            raise RuntimeError("this policy network was built with normalize_observations=False")
        x = observations.reshape(-1, self.observation_dim)
        if x.shape[0] < 2 or not bool(torch.isfinite(x).all()):
            raise ValueError(f"observation statistics need >= 2 finite rows, got shape {list(x.shape)}")
        self.obs_loc.copy_(x.mean(0))
        self.obs_scale.copy_(x.std(0).clamp_min(min_scale))

    def forward(self, observation: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        loc = torch.tanh(self.mean_net(self.normalize_inputs(observation)))  # BREMEN App. F.1: tanh(mu(s))
        scale = self.log_std.exp().expand_as(loc)
        return loc, scale

    @torch.no_grad()
    def set_sigma(self, sigma: float) -> None:
        """Set the standard deviation of every action dimension to ``sigma`` (``> 0``).

        Examples:
            >>> from torchrl_depeff.modules.actors import GaussianPolicyNet
            >>> net = GaussianPolicyNet(3, 2, num_cells=(8,))
            >>> net.set_sigma(1.0)
            >>> float(net(torch.zeros(1, 3))[1][0, 0])
            1.0
        """
        if not sigma > 0:
            raise ValueError(f"sigma must be > 0, got {sigma}")
        self.log_std.fill_(math.log(sigma))

    @torch.no_grad()
    def load_mean_from(self, bc_net: nn.Module) -> None:
        """Copy the mean MLP from a behaviour-cloning network with the same architecture.

        ``bc_net`` may be another :class:`GaussianPolicyNet` (its ``mean_net`` is used) or a plain
        ``nn.Sequential`` with the same layout as :attr:`mean_net`. Together with
        ``set_sigma(1.0)`` this is BREMEN Alg. 1 line 6, "re-initialise
        ``pi_theta0 = Normal(pi_beta_hat, 1)``".

        Args:
            bc_net (nn.Module): source network.

        Examples:
            >>> from torchrl_depeff.modules.actors import GaussianPolicyNet
            >>> bc, pi = GaussianPolicyNet(3, 2, num_cells=(8,)), GaussianPolicyNet(3, 2, num_cells=(8,))
            >>> pi.load_mean_from(bc); pi.set_sigma(1.0)
            >>> s = torch.randn(4, 3)
            >>> torch.equal(pi(s)[0], bc(s)[0]), float(pi(s)[1].mean())
            (True, 1.0)
        """
        source = bc_net.mean_net if isinstance(bc_net, GaussianPolicyNet) else bc_net
        src_state = source.state_dict()
        dst_state = self.mean_net.state_dict()
        if src_state.keys() != dst_state.keys() or any(
            src_state[k].shape != dst_state[k].shape for k in dst_state
        ):
            raise ValueError(
                "bc_net architecture does not match the mean network: "
                f"{ {k: tuple(v.shape) for k, v in src_state.items()} } vs "
                f"{ {k: tuple(v.shape) for k, v in dst_state.items()} }"
            )
        self.mean_net.load_state_dict(src_state)
        if isinstance(bc_net, GaussianPolicyNet) and self.normalize_observations and bc_net.normalize_observations:
            self.obs_loc.copy_(bc_net.obs_loc)
            self.obs_scale.copy_(bc_net.obs_scale)


def make_gaussian_actor(
    observation_dim: int,
    action_dim: int,
    *,
    num_cells: Sequence[int] = (200, 200),
    sigma: float = 0.1,
    learn_sigma: bool = False,
    activation: type[nn.Module] = nn.Tanh,
    action_spec=None,
    normalize_observations: bool = False,
) -> ProbabilisticActor:
    """BREMEN's Gaussian policy as a :class:`~torchrl.modules.ProbabilisticActor`.

    Reads ``"observation"`` and writes ``"loc"``, ``"scale"``, ``"action"`` and
    ``"action_log_prob"`` (TorchRL 0.14's default log-prob key, shape ``[*B]``). Outside an
    exploration-type context it samples (``default_interaction_type=RANDOM``). The distribution is
    :class:`~torchrl.modules.IndependentNormal` (a ``Normal`` with one event dim): the action is
    ``tanh(mu(s)) + eps`` and is *not* squashed after the noise (BREMEN App. F.1); the real
    environment clips it.

    Args:
        observation_dim (int): observation size.
        action_dim (int): action size.

    Keyword Args:
        num_cells (Sequence[int]): hidden widths. Defaults to ``(200, 200)``.
        sigma (float): stationary / initial std. Defaults to ``0.1``.
        learn_sigma (bool): learn a state-independent log-std. Defaults to ``False``.
        activation (type[nn.Module]): hidden activation. Defaults to ``nn.Tanh``.
        action_spec (TensorSpec, optional): stored on the actor as its spec (not used to clip).
        normalize_observations (bool): normalise the inputs (see :class:`GaussianPolicyNet`).

    Examples:
        >>> from torchrl_depeff.modules.actors import GaussianPolicyNet, make_gaussian_actor
        >>> from tensordict import TensorDict
        >>> actor = make_gaussian_actor(3, 2, num_cells=(8,))
        >>> td = actor(TensorDict(observation=torch.randn(5, 3), batch_size=[5]))
        >>> sorted(td.keys()), td["action_log_prob"].shape
        (['action', 'action_log_prob', 'loc', 'observation', 'scale'], torch.Size([5]))
        >>> isinstance(actor.module[0].module, GaussianPolicyNet)
        True
        >>> bool((td["action"] != td["loc"]).all())
        True
    """
    net = GaussianPolicyNet(
        observation_dim, action_dim, num_cells=num_cells, activation=activation,
        sigma=sigma, learn_sigma=learn_sigma, normalize_observations=normalize_observations,
    )
    module = TensorDictModule(net, in_keys=["observation"], out_keys=["loc", "scale"])
    return ProbabilisticActor(
        module,
        in_keys=["loc", "scale"],
        out_keys=["action"],
        spec=action_spec,
        distribution_class=IndependentNormal,
        return_log_prob=True,
        # sample by default: TRPO needs stochastic actions; use
        # ``set_exploration_type(ExplorationType.DETERMINISTIC)`` to act with the mean.
        default_interaction_type=InteractionType.RANDOM,
    )


def _normal_like(x: torch.Tensor, generator: torch.Generator | None) -> torch.Tensor:
    return torch.randn(x.shape, dtype=x.dtype, device=x.device, generator=generator)


class GaussianActionNoise(TensorDictModuleBase):
    """Stationary deployment noise ``a <- a + N(0, sigma^2)`` (BREMEN App. F.1).

    Apply it after a deterministic mean actor (e.g. ``loc`` copied to ``"action"``); the result is
    not clipped.

    Args:
        sigma (float): noise std, ``>= 0``. Defaults to ``0.1``.
        action_key (NestedKey): entry to perturb in place. Defaults to ``"action"``.
        generator (torch.Generator, optional): source of randomness.

    Examples:
        >>> from torchrl_depeff.modules.actors import GaussianActionNoise
        >>> from tensordict import TensorDict
        >>> noise = GaussianActionNoise(0.1, generator=torch.Generator().manual_seed(0))
        >>> td = noise(TensorDict(action=torch.zeros(10000, 2), batch_size=[10000]))
        >>> round(float(td["action"].std()), 1)
        0.1
    """

    def __init__(
        self,
        sigma: float = 0.1,
        action_key: NestedKey = "action",
        generator: torch.Generator | None = None,
    ) -> None:
        super().__init__()
        if not sigma >= 0:
            raise ValueError(f"sigma must be >= 0, got {sigma}")
        self.sigma = float(sigma)
        self.action_key = action_key
        self.generator = generator
        self.in_keys = [action_key]
        self.out_keys = [action_key]

    def forward(self, tensordict: TensorDictBase) -> TensorDictBase:
        if self.action_key not in tensordict.keys(include_nested=True):
            raise KeyError(f"action key {self.action_key!r} not found in the tensordict")
        action = tensordict.get(self.action_key)
        tensordict.set(self.action_key, action + self.sigma * _normal_like(action, self.generator))
        return tensordict


class UncertaintyActionNoise(TensorDictModuleBase):
    """MUSBO eq. (22) exploration: ``a <- a + const + N(0, U(s, a))``.

    ``const ~ N(0, const_std^2)`` is drawn per action entry and ``U`` is read from
    ``uncertainty_key`` with shape ``[*B, 1]`` (or ``[*B]``), broadcast over action dimensions.

    Choice: ``U`` is interpreted as a *variance* (noise std ``sqrt(U)``), so that
    ``uncertainty_is="variance"`` turns the labeler's squared disagreement into a std on the scale
    of the state error; the paper writes ``N(0, sigma = U)`` and ``const ~ N(0, sigma = 0.01)``.
    Pass ``uncertainty_is="std"`` and ``const_std=0.01`` for the literal reading. The default
    ``const_std=0.1`` reads the brief's ``N(0, 0.01)`` as a variance.

    Args:
        const_std (float): std of the constant perturbation, ``>= 0``. Defaults to ``0.1``.
        uncertainty_key (NestedKey): entry holding ``U``. Defaults to ``"uncertainty"``.
        action_key (NestedKey): entry to perturb. Defaults to ``"action"``.
        uncertainty_is (str): ``"variance"`` or ``"std"``. Defaults to ``"variance"``.
        generator (torch.Generator, optional): source of randomness.

    Examples:
        >>> from torchrl_depeff.modules.actors import UncertaintyActionNoise
        >>> from tensordict import TensorDict
        >>> noise = UncertaintyActionNoise(0.0, generator=torch.Generator().manual_seed(0))
        >>> td = TensorDict(action=torch.zeros(10000, 2), uncertainty=torch.full((10000, 1), 0.04),
        ...                 batch_size=[10000])
        >>> round(float(noise(td)["action"].var()), 2)
        0.04
    """

    def __init__(
        self,
        const_std: float = 0.1,
        uncertainty_key: NestedKey = "uncertainty",
        action_key: NestedKey = "action",
        uncertainty_is: str = "variance",
        generator: torch.Generator | None = None,
    ) -> None:
        super().__init__()
        if not const_std >= 0:
            raise ValueError(f"const_std must be >= 0, got {const_std}")
        if uncertainty_is not in ("variance", "std"):
            raise ValueError(f"uncertainty_is must be 'variance' or 'std', got {uncertainty_is!r}")
        self.const_std = float(const_std)
        self.uncertainty_key = uncertainty_key
        self.action_key = action_key
        self.uncertainty_is = uncertainty_is
        self.generator = generator
        self.in_keys = [action_key, uncertainty_key]
        self.out_keys = [action_key]

    def forward(self, tensordict: TensorDictBase) -> TensorDictBase:
        keys = tensordict.keys(include_nested=True)
        for key in (self.action_key, self.uncertainty_key):
            if key not in keys:
                raise KeyError(f"key {key!r} not found in the tensordict")
        action = tensordict.get(self.action_key)
        u = tensordict.get(self.uncertainty_key)
        if u.shape == action.shape[:-1]:
            u = u.unsqueeze(-1)
        if u.shape[:-1] != action.shape[:-1] or u.shape[-1] not in (1, action.shape[-1]):
            raise ValueError(
                f"{self.uncertainty_key!r} of shape {tuple(u.shape)} does not broadcast to the "
                f"action shape {tuple(action.shape)}"
            )
        std = u.clamp_min(0).sqrt() if self.uncertainty_is == "variance" else u
        # MUSBO eq. (22): a = tanh(mu(s)) + const + N(0, U)
        noise = self.const_std * _normal_like(action, self.generator)
        noise = noise + std * _normal_like(action, self.generator)
        tensordict.set(self.action_key, action + noise)
        return tensordict
