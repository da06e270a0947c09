"""Uncertainty penalties for model-based rollouts, as TorchRL transforms.

* :class:`SoftUncertaintyPenalty`: ``r <- r - coef * u`` (MOPO; MB2PO with
  ``u = max_i ||Sigma_i||_F``; BREMEN App. E soft penalty with ``coef = 0.1`` on the max std).
* :class:`HardUncertaintyPenalty`: where ``u > threshold``, ``r <- penalty_reward`` and the
  episode terminates (MOReL; BREMEN App. E: threshold 3.0 on the max pairwise disagreement,
  reward -5).

Both read the uncertainty entries written by
:class:`~torchrl_depeff.envs.model_env.EnsembleModelEnv` in ``("next", uncertainty_key)``.
"""
from __future__ import annotations

import torch
from tensordict import TensorDictBase
from torchrl.data import Composite, TensorSpec, Unbounded
from torchrl.envs.transforms import Transform

__all__ = ["SoftUncertaintyPenalty", "HardUncertaintyPenalty"]


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
        coef = float(coef)
        if not coef >= 0.0:
            raise ValueError(f"coef must be >= 0, got {coef}")
        super().__init__(in_keys=[uncertainty_key, reward_key], out_keys=[reward_key, penalty_key])
        self.coef = coef
        self.uncertainty_key = uncertainty_key
        self.reward_key = reward_key
        self.penalty_key = penalty_key

    def _step(self, tensordict: TensorDictBase, next_tensordict: TensorDictBase) -> TensorDictBase:
        u = next_tensordict.get(self.uncertainty_key)
        reward = next_tensordict.get(self.reward_key)
        penalty = self.coef * u.reshape(reward.shape).to(reward.dtype)
        next_tensordict.set(self.reward_key, reward - penalty)  # MOPO: r~ = r - lambda * u
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
        threshold = float(threshold)
        if not threshold > 0.0:
            raise ValueError(f"threshold must be > 0, got {threshold}")
        super().__init__(
            in_keys=[uncertainty_key, reward_key], out_keys=[reward_key, "terminated", "done"]
        )
        self.threshold = threshold
        self.penalty_reward = float(penalty_reward)
        self.uncertainty_key = uncertainty_key
        self.reward_key = reward_key

    def _step(self, tensordict: TensorDictBase, next_tensordict: TensorDictBase) -> TensorDictBase:
        reward = next_tensordict.get(self.reward_key)
        u = next_tensordict.get(self.uncertainty_key).reshape(reward.shape)
        halt = u > self.threshold  # MOReL: HALT when disagreement exceeds the threshold
        next_tensordict.set(
            self.reward_key, torch.where(halt, torch.full_like(reward, self.penalty_reward), reward)
        )
        for key in ("terminated", "done"):
            flag = next_tensordict.get(key)
            next_tensordict.set(key, flag | halt.reshape(flag.shape))
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
