"""Uncertainty penalties for model-based rollouts, as TorchRL transforms.

* :class:`SoftUncertaintyPenalty`: ``r <- r - coef * u`` (MOPO; MB2PO with
  ``u = max_i ||Sigma_i||_F``; BREMEN App. E soft penalty with ``coef = 0.1`` on the max std).
* :class:`HardUncertaintyPenalty`: where ``u > threshold``, ``r <- penalty_reward`` and the
  episode terminates (MOReL; BREMEN App. E: threshold 3.0 on the max pairwise disagreement,
  reward -5).

Both read the uncertainty entries written by
:class:`~torchrl_depeff.envs.model_env.EnsembleModelEnv` in ``("next", uncertainty_key)``.
Either wrap the env, ``TransformedEnv(env, SoftUncertaintyPenalty(...))``, or pass the
transform to the env itself, ``EnsembleModelEnv(..., penalty=SoftUncertaintyPenalty(...))``:
the env then applies the same arithmetic (:meth:`SoftUncertaintyPenalty.apply`,
:meth:`HardUncertaintyPenalty.apply`) inside its step, so its fast rollout path covers the
penalty; both give identical rollouts for the same seed.
"""
from __future__ import annotations

import math

import torch
from tensordict import TensorDictBase
from torchrl.data import Composite, TensorSpec, Unbounded
from torchrl.envs.transforms import Transform

__all__ = ["SoftUncertaintyPenalty", "HardUncertaintyPenalty"]


def _check_key(name: str, key: object) -> None:
    if not isinstance(key, str) or not key:
        raise TypeError(f"{name} must be a non-empty str, got {key!r}")


class SoftUncertaintyPenalty(Transform):
    r"""Soft uncertainty penalty :math:`\tilde r = r - \lambda u` (MOPO sec. 4, MB2PO sec. 4).

    Writes the subtracted amount :math:`\lambda u` to ``("next", "penalty")`` (``[*B, 1]``,
    declared in the observation spec; ``0`` after reset).

    Args:
        coef (float, optional): :math:`\lambda \ge 0`. Defaults to ``0.1`` (BREMEN App. E).
        uncertainty_key (str, optional): uncertainty entry. Defaults to ``"model_std_norm"``
            (MOPO); use ``"model_cov_frobenius"`` for MB2PO.

    Keyword Args:
        reward_key (str, optional): reward entry. Defaults to ``"reward"``.
        penalty_key (str, optional): output entry. Defaults to ``"penalty"``.

    Examples:
        >>> from torchrl_depeff.envs.penalties import SoftUncertaintyPenalty
        >>> from tensordict import TensorDict
        >>> t = SoftUncertaintyPenalty(0.5)
        >>> td = TensorDict({"reward": torch.ones(2, 1), "model_std_norm": torch.tensor([[2.0], [0.0]])}, [2])
        >>> t._step(td.clone(), td)["reward"].squeeze(-1)
        tensor([0., 1.])
    """

    def __init__(
        self,
        coef: float = 0.1,
        uncertainty_key: str = "model_std_norm",
        *,
        reward_key: str = "reward",
        penalty_key: str = "penalty",
    ) -> None:
        if isinstance(coef, bool) or not isinstance(coef, (int, float)):
            raise TypeError(f"coef must be a float, got {coef!r}")
        coef = float(coef)
        if not (math.isfinite(coef) and coef >= 0.0):
            raise ValueError(f"coef must be a finite float >= 0, got {coef}")
        _check_key("uncertainty_key", uncertainty_key)
        super().__init__(in_keys=[uncertainty_key, reward_key], out_keys=[reward_key, penalty_key])
        self.coef = coef
        self.uncertainty_key = uncertainty_key
        self.reward_key = reward_key
        self.penalty_key = penalty_key

    def apply(self, reward: torch.Tensor, uncertainty: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Penalised reward and penalty on plain tensors (the transform's arithmetic).

        Args:
            reward (torch.Tensor): ``[*B, 1]``.
            uncertainty (torch.Tensor): ``[*B, 1]`` (any shape with as many elements).

        Returns:
            ``(reward - coef * u, coef * u)``.

        Examples:
            >>> from torchrl_depeff.envs.penalties import SoftUncertaintyPenalty
            >>> SoftUncertaintyPenalty(0.5).apply(torch.ones(2, 1), torch.tensor([[2.0], [0.0]]))[0].squeeze(-1)
            tensor([0., 1.])
        """
        penalty = self.coef * uncertainty.reshape(reward.shape).to(reward.dtype)
        return reward - penalty, penalty  # MOPO: r~ = r - lambda * u

    def _step(self, tensordict: TensorDictBase, next_tensordict: TensorDictBase) -> TensorDictBase:
        reward, penalty = self.apply(
            next_tensordict.get(self.reward_key), next_tensordict.get(self.uncertainty_key)
        )
        next_tensordict.set(self.reward_key, reward)
        next_tensordict.set(self.penalty_key, penalty)
        return next_tensordict

    def _reset(self, tensordict: TensorDictBase, tensordict_reset: TensorDictBase) -> TensorDictBase:
        spec = self.parent.full_reward_spec[self.reward_key]
        tensordict_reset.set(
            self.penalty_key,
            torch.zeros(spec.shape, dtype=spec.dtype, device=tensordict_reset.device),
        )
        return tensordict_reset

    def transform_observation_spec(self, observation_spec: TensorSpec) -> TensorSpec:
        if not isinstance(observation_spec, Composite):
            raise TypeError(f"expected a Composite observation spec, got {type(observation_spec).__name__}")
        if self.uncertainty_key not in observation_spec.keys():
            raise KeyError(
                f"uncertainty_key {self.uncertainty_key!r} is not produced by the env "
                f"(observation keys: {list(observation_spec.keys())})"
            )
        u_spec = observation_spec[self.uncertainty_key]
        observation_spec[self.penalty_key] = Unbounded(
            shape=u_spec.shape, dtype=u_spec.dtype, device=u_spec.device
        )
        return observation_spec

    def transform_reward_spec(self, reward_spec: TensorSpec) -> TensorSpec:
        # the penalised reward is unbounded below
        if isinstance(reward_spec, Composite):
            spec = reward_spec[self.reward_key]
            reward_spec[self.reward_key] = Unbounded(shape=spec.shape, dtype=spec.dtype, device=spec.device)
            return reward_spec
        return Unbounded(shape=reward_spec.shape, dtype=reward_spec.dtype, device=reward_spec.device)


class HardUncertaintyPenalty(Transform):
    r"""Hard uncertainty penalty of MOReL (BREMEN App. E).

    Where :math:`u > \text{threshold}` (strict): ``reward <- penalty_reward`` and
    ``terminated = done = True`` (the HALT state of MOReL). Other rows are unchanged. The
    reward spec becomes unbounded; done specs are unchanged (already boolean).

    Args:
        threshold (float, optional): disagreement threshold (> 0). Defaults to ``3.0``.
        penalty_reward (float, optional): reward of the halting transition. Defaults to ``-5.0``.
        uncertainty_key (str, optional): Defaults to ``"model_disagreement"``.

    Keyword Args:
        reward_key (str, optional): Defaults to ``"reward"``.

    Examples:
        >>> from torchrl_depeff.envs.penalties import HardUncertaintyPenalty
        >>> from tensordict import TensorDict
        >>> t = HardUncertaintyPenalty(3.0, -5.0)
        >>> td = TensorDict({"reward": torch.ones(2, 1), "model_disagreement": torch.tensor([[3.5], [3.0]]),
        ...                  "terminated": torch.zeros(2, 1, dtype=torch.bool),
        ...                  "done": torch.zeros(2, 1, dtype=torch.bool)}, [2])
        >>> out = t._step(td.clone(), td)
        >>> out["reward"].squeeze(-1), out["terminated"].squeeze(-1)
        (tensor([-5.,  1.]), tensor([ True, False]))
    """

    def __init__(
        self,
        threshold: float = 3.0,
        penalty_reward: float = -5.0,
        uncertainty_key: str = "model_disagreement",
        *,
        reward_key: str = "reward",
    ) -> None:
        for name, value in (("threshold", threshold), ("penalty_reward", penalty_reward)):
            if isinstance(value, bool) or not isinstance(value, (int, float)):
                raise TypeError(f"{name} must be a float, got {value!r}")
            if not math.isfinite(float(value)):
                raise ValueError(f"{name} must be finite, got {value}")
        threshold = float(threshold)
        if not threshold > 0.0:
            raise ValueError(f"threshold must be > 0, got {threshold}")
        _check_key("uncertainty_key", uncertainty_key)
        super().__init__(
            in_keys=[uncertainty_key, reward_key], out_keys=[reward_key, "terminated", "done"]
        )
        self.threshold = threshold
        self.penalty_reward = float(penalty_reward)
        self.uncertainty_key = uncertainty_key
        self.reward_key = reward_key

    def apply(
        self,
        reward: torch.Tensor,
        uncertainty: torch.Tensor,
        terminated: torch.Tensor,
        done: torch.Tensor,
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Halted reward, terminated and done on plain tensors (the transform's arithmetic).

        Args:
            reward (torch.Tensor): ``[*B, 1]``.
            uncertainty (torch.Tensor): ``[*B, 1]``.
            terminated (torch.Tensor): bool ``[*B, 1]``.
            done (torch.Tensor): bool ``[*B, 1]``.

        Returns:
            ``(reward, terminated, done)`` with halted rows (``u > threshold``) set to
            ``penalty_reward`` / ``True`` / ``True``.

        Examples:
            >>> from torchrl_depeff.envs.penalties import HardUncertaintyPenalty
            >>> f = torch.zeros(2, 1, dtype=torch.bool)
            >>> r, t, d = HardUncertaintyPenalty(3.0, -5.0).apply(torch.ones(2, 1), torch.tensor([[3.5], [3.0]]), f, f)
            >>> r.squeeze(-1), t.squeeze(-1)
            (tensor([-5.,  1.]), tensor([ True, False]))
        """
        u = uncertainty.reshape(reward.shape)
        halt = u > self.threshold  # MOReL: HALT when disagreement exceeds the threshold
        reward = torch.where(halt, torch.full_like(reward, self.penalty_reward), reward)
        return reward, terminated | halt.reshape(terminated.shape), done | halt.reshape(done.shape)

    def _step(self, tensordict: TensorDictBase, next_tensordict: TensorDictBase) -> TensorDictBase:
        reward, terminated, done = self.apply(
            next_tensordict.get(self.reward_key),
            next_tensordict.get(self.uncertainty_key),
            next_tensordict.get("terminated"),
            next_tensordict.get("done"),
        )
        next_tensordict.set(self.reward_key, reward)
        next_tensordict.set("terminated", terminated)
        next_tensordict.set("done", done)
        return next_tensordict

    def _reset(self, tensordict: TensorDictBase, tensordict_reset: TensorDictBase) -> TensorDictBase:
        return tensordict_reset

    def transform_observation_spec(self, observation_spec: TensorSpec) -> TensorSpec:
        if isinstance(observation_spec, Composite) and self.uncertainty_key not in observation_spec.keys():
            raise KeyError(
                f"uncertainty_key {self.uncertainty_key!r} is not produced by the env "
                f"(observation keys: {list(observation_spec.keys())})"
            )
        return observation_spec

    def transform_reward_spec(self, reward_spec: TensorSpec) -> TensorSpec:
        if isinstance(reward_spec, Composite):
            spec = reward_spec[self.reward_key]
            reward_spec[self.reward_key] = Unbounded(shape=spec.shape, dtype=spec.dtype, device=spec.device)
            return reward_spec
        return Unbounded(shape=reward_spec.shape, dtype=reward_spec.dtype, device=reward_spec.device)
