"""Time-varying linear feature baseline (rllab / TRPO), BREMEN's value baseline for GAE.

Features ``phi(o, t) = [clip(o), clip(o)^2, t, t^2, t^3, 1]`` with ``clip`` to ``[-10, 10]`` and
``t = step index / 100`` (rllab ``LinearFeatureBaseline``), fitted every iteration by ridge
regression to discounted returns-to-go.
"""
from __future__ import annotations

import warnings

import torch
from tensordict import TensorDictBase
from tensordict.nn import TensorDictModuleBase
from tensordict.utils import NestedKey
from torchrl.objectives.value.functional import reward2go

__all__ = ["LinearFeatureBaseline", "discounted_returns"]


def discounted_returns(reward: torch.Tensor, done: torch.Tensor, gamma: float) -> torch.Tensor:
    """Deprecated: TorchRL's :func:`~torchrl.objectives.value.functional.reward2go` (same values).

    Returns-to-go ``R_t = r_t + gamma (1 - done_t) R_{t+1}`` along dim ``-2`` of ``[*B, T, 1]``;
    the return is cut after a ``done`` step and at the end of the batch.

    Examples:
        >>> import warnings
        >>> from torchrl_depeff.modules.baselines import discounted_returns
        >>> r = torch.ones(1, 4, 1)
        >>> d = torch.tensor([False, True, False, False]).view(1, 4, 1)
        >>> with warnings.catch_warnings():
        ...     warnings.simplefilter("ignore")
        ...     discounted_returns(r, d, 0.5).flatten().tolist()
        [1.5, 1.0, 1.5, 1.0]
    """
    warnings.warn(
        "discounted_returns is deprecated: use torchrl.objectives.value.functional.reward2go(reward, done, gamma)",
        FutureWarning, stacklevel=2,
    )
    return _returns_to_go(reward, done, gamma)


def _returns_to_go(reward: torch.Tensor, done: torch.Tensor, gamma: float) -> torch.Tensor:
    if isinstance(gamma, bool) or not isinstance(gamma, (int, float)) or not 0 <= gamma <= 1:
        raise ValueError(f"gamma must be in [0, 1], got {gamma!r}")
    if reward.shape != done.shape:
        raise ValueError(f"reward shape {tuple(reward.shape)} != done shape {tuple(done.shape)}")
    if reward.ndim < 2:
        raise ValueError(f"reward must be [*B, T, 1] (time at dim -2), got shape {tuple(reward.shape)}")
    if gamma == 0:  # reward2go's geometric kernel is empty for gamma = 0
        return reward.clone()
    return reward2go(reward, done.bool(), gamma, time_dim=-2)


class LinearFeatureBaseline(TensorDictModuleBase):
    """Linear state-value baseline on hand-made time-varying features.

    ``V(o, t) = phi(o, t)^T w`` with ``phi = [clip(o,-10,10), clip(o,-10,10)^2, t, t^2, t^3, 1]``
    and ``t = step / 100``. ``w`` solves ``(Phi^T Phi + reg I) w = Phi^T R`` in float64; if the
    solution is not finite, ``reg`` is multiplied by 10 (up to 5 times), as rllab does.

    The step index is read from ``time_key`` (TorchRL's ``StepCounter`` writes
    ``"step_count"``); if absent, the position along the last batch dimension is used, which
    assumes every row of a ``[*B, T]`` batch starts a trajectory at ``t = 0``.

    Args:
        observation_dim (int): observation size.
        reg_coeff (float): ridge coefficient, ``> 0``. Defaults to ``1e-5``.
        observation_key (NestedKey): input observation. Defaults to ``"observation"``.
        time_key (NestedKey, optional): step index; ``None`` always uses the position along the
            last batch dim. Defaults to ``"step_count"``. Keep it in the rollout (and under
            ``"next"``) when the baseline serves a value estimator, which only passes ``in_keys``.
        out_key (NestedKey): output value ``[*B, 1]``. Defaults to ``"state_value"``.

    Examples:
        >>> from torchrl_depeff.modules.baselines import LinearFeatureBaseline
        >>> from tensordict import TensorDict
        >>> b = LinearFeatureBaseline(3)
        >>> td = TensorDict(observation=torch.randn(4, 10, 3), batch_size=[4, 10])
        >>> td["next", "reward"] = torch.ones(4, 10, 1)
        >>> td["next", "done"] = torch.zeros(4, 10, 1, dtype=torch.bool)
        >>> _ = b.fit(td, gamma=0.0)
        >>> torch.allclose(b(td)["state_value"], torch.ones(4, 10, 1), atol=1e-3)
        True
    """

    def __init__(
        self,
        observation_dim: int,
        reg_coeff: float = 1e-5,
        observation_key: NestedKey = "observation",
        time_key: NestedKey | None = "step_count",
        out_key: NestedKey = "state_value",
    ) -> None:
        super().__init__()
        if observation_dim < 1:
            raise ValueError(f"observation_dim must be >= 1, got {observation_dim}")
        if not reg_coeff > 0:
            raise ValueError(f"reg_coeff must be > 0, got {reg_coeff}")
        self.observation_dim = int(observation_dim)
        self.reg_coeff = float(reg_coeff)
        self.observation_key = observation_key
        self.time_key = time_key
        self.out_key = out_key
        # the time key must be an in_key: value estimators select in_keys before calling us
        self.in_keys = [observation_key] + ([time_key] if time_key is not None else [])
        self.out_keys = [out_key]
        self.register_buffer("coeffs", torch.zeros(self.feature_dim))

    @property
    def feature_dim(self) -> int:
        return 2 * self.observation_dim + 4

    def features(self, observation: torch.Tensor, step: torch.Tensor) -> torch.Tensor:
        """``[*B, obs]`` and ``[*B, 1]`` step index -> features ``[*B, 2 * obs + 4]``.

        Examples:
            >>> from torchrl_depeff.modules.baselines import LinearFeatureBaseline
            >>> b = LinearFeatureBaseline(2)
            >>> b.features(torch.tensor([[20.0, -1.0]]), torch.tensor([[50]])).tolist()
            [[10.0, -1.0, 100.0, 1.0, 0.5, 0.25, 0.125, 1.0]]
        """
        if observation.shape[-1] != self.observation_dim:
            raise ValueError(
                f"observation last dim {observation.shape[-1]} != observation_dim {self.observation_dim}"
            )
        o = observation.clamp(-10.0, 10.0)
        t = step.to(o.dtype) / 100.0
        if t.shape != o.shape[:-1] + (1,):
            t = t.reshape(o.shape[:-1] + (1,))
        return torch.cat([o, o * o, t, t * t, t * t * t, torch.ones_like(t)], dim=-1)

    def _step(self, td: TensorDictBase) -> torch.Tensor:
        step = td.get(self.time_key, None) if self.time_key is not None else None
        if step is not None:
            return step
        if td.batch_dims == 0:
            return torch.zeros(1, device=td.device)
        T = td.batch_size[-1]
        pos = torch.arange(T, device=td.get(self.observation_key).device)
        return pos.expand(td.batch_size).unsqueeze(-1)

    def _features_td(self, td: TensorDictBase) -> torch.Tensor:
        if self.observation_key not in td.keys(include_nested=True):
            raise KeyError(f"observation key {self.observation_key!r} not found in the tensordict")
        return self.features(td.get(self.observation_key), self._step(td))

    @torch.no_grad()
    def fit_features(self, features: torch.Tensor, returns: torch.Tensor) -> torch.Tensor:
        """Ridge regression of ``returns`` ``[N]`` (or ``[N, 1]``) on ``features`` ``[N, F]``.

        Returns the coefficients (also stored in :attr:`coeffs`).
        """
        phi = features.reshape(-1, self.feature_dim).double()
        y = returns.reshape(-1).double()
        if phi.shape[0] != y.shape[0]:
            raise ValueError(f"{phi.shape[0]} feature rows but {y.shape[0]} returns")
        gram = phi.T @ phi
        rhs = phi.T @ y
        eye = torch.eye(self.feature_dim, dtype=gram.dtype, device=gram.device)
        reg = self.reg_coeff
        coeffs = None
        for _ in range(5):
            sol = torch.linalg.solve(gram + reg * eye, rhs)
            if bool(torch.isfinite(sol).all()):
                coeffs = sol
                break
            reg *= 10.0
        if coeffs is None:
            raise ValueError("LinearFeatureBaseline.fit: no finite solution (non-finite features or returns?)")
        self.coeffs.copy_(coeffs.to(self.coeffs.dtype))
        return self.coeffs

    @torch.no_grad()
    def fit(self, tensordict: TensorDictBase, gamma: float = 0.99) -> torch.Tensor:
        """Fit to discounted returns-to-go computed per trajectory along the last batch dim.

        Reads ``("next", "reward")`` and ``("next", "done")`` from a ``[*B, T]`` tensordict; the
        return is cut at ``done`` (and at the end of the batch).

        Args:
            tensordict (TensorDictBase): rollout batch with a time dimension last.
            gamma (float): discount. Defaults to ``0.99``.
        """
        if tensordict.batch_dims < 1:
            raise ValueError("fit needs a tensordict with a time dimension (batch_dims >= 1)")
        for key in (("next", "reward"), ("next", "done")):
            if key not in tensordict.keys(include_nested=True):
                raise KeyError(f"key {key!r} not found in the tensordict")
        reward = tensordict.get(("next", "reward"))
        done = tensordict.get(("next", "done"))
        returns = _returns_to_go(reward, done, gamma)  # TorchRL's reward2go
        return self.fit_features(self._features_td(tensordict), returns)

    def forward(self, tensordict: TensorDictBase) -> TensorDictBase:
        phi = self._features_td(tensordict)
        value = phi @ self.coeffs.to(phi.dtype)
        tensordict.set(self.out_key, value.unsqueeze(-1))
        return tensordict
