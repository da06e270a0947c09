"""Batched imaginary rollouts over a dynamics ensemble (BREMEN eq. (2), MOPO, MOReL, MB2PO)."""
from __future__ import annotations

from typing import Any, Callable, Sequence

import torch
from tensordict import TensorDict, TensorDictBase
from torch import nn
from torchrl.data import Bounded, Categorical, Composite, TensorSpec, Unbounded
from torchrl.envs import EnvBase
from torchrl.envs.model_based import ModelBasedEnvBase

__all__ = ["EnsembleModelEnv", "UNCERTAINTY_KEYS", "MEMBER_SELECTIONS"]

#: uncertainty name accepted by ``EnsembleModelEnv(uncertainty=...)`` -> output key
UNCERTAINTY_KEYS: dict[str, str] = {
    "disagreement": "model_disagreement",
    "std_norm": "model_std_norm",
    "cov_frobenius": "model_cov_frobenius",
    "ensemble_std": "model_ensemble_std",
}
MEMBER_SELECTIONS: tuple[str, ...] = ("per_step", "per_sample", "per_trajectory", "mean")

RewardFn = Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]

_STEP_COUNT_KEY = "model_step_count"
_MEMBER_KEY = "model_member"


def _expand_spec(spec: TensorSpec, batch_size: torch.Size, feature_dim: int, name: str) -> TensorSpec:
    shape = spec.shape
    if shape == torch.Size([*batch_size, feature_dim]):
        return spec.clone()
    if shape != torch.Size([feature_dim]):
        raise ValueError(
            f"{name} spec must have shape [{feature_dim}] or [*batch_size, {feature_dim}] = "
            f"{[*batch_size, feature_dim]}, got {list(shape)}"
        )
    return spec.expand(*batch_size, feature_dim).clone()


class EnsembleModelEnv(ModelBasedEnvBase):
    r"""Imaginary MDP defined by a dynamics ensemble (BREMEN sec. 4.1, eq. (2)).

    Each step maps ``(observation, action)`` to a next observation drawn from an ensemble
    member, computes ``reward_fn(obs, action, next_obs)`` (or the ensemble's reward head) and
    ``termination_fn(obs, action, next_obs)``, and optionally writes the ensemble's
    uncertainty ``[*B, 1]`` under:

    * ``"model_disagreement"``: :math:`\max_{i,j}\lVert\mu_i - \mu_j\rVert_2` (MOReL, BREMEN
      App. E hard penalty),
    * ``"model_std_norm"``: :math:`\max_i\lVert\sigma_i\rVert_2` (MOPO soft penalty; also
      :class:`~torchrl_depeff.algorithms.MB2PO`'s default reading of its penalty, "the largest
      predicted standard deviation", see ``MB2POConfig.penalty_uncertainty``),
    * ``"model_cov_frobenius"``: :math:`\max_i\lVert\Sigma_i\rVert_F = \max_i\lVert\sigma_i^2
      \rVert_2` for diagonal covariances :math:`\Sigma_i` (MB2PO Alg. 1 read literally, with
      :math:`\Sigma_i` the covariance: ``MB2POConfig(penalty_uncertainty="cov_frobenius")``),
    * ``"model_ensemble_std"``: :math:`\max_k \operatorname{std}_i(\mu_{i,k})`, the largest
      across-member standard deviation of the predicted next state (BREMEN App. E soft penalty,
      "the maximum standard deviation of the model ensembles", for deterministic members).

    Member selection (``member_selection``):

    * ``"per_step"``: one member drawn for the whole batch at every step (BREMEN's code),
    * ``"per_sample"``: an independent member per row and step (MBPO / MOPO),
    * ``"per_trajectory"``: a member per row drawn at reset and kept (mbrl-lib
      ``fixed_model``); stored in the state entry ``"model_member"``,
    * ``"mean"``: the average of the member means (mbrl-lib ``expectation``); no noise is
      sampled in this mode even for a probabilistic ensemble.

    With ``elites_only=True`` members are drawn from ``ensemble.elite_indices`` and the mean
    and uncertainties are computed over the elites only (MB2PO uses elites everywhere). In
    ``"per_trajectory"`` mode the members are drawn at reset: reset the env after the elites
    change (a stored member that is no longer an elite would be mapped to the first elite when
    uncertainties are requested).

    For a probabilistic ensemble the next observation is sampled as
    ``loc + scale * N(0, 1)`` from the chosen member (PETS / MBPO trajectory sampling); the
    reward head (when used) contributes its mean. A deterministic ensemble gives ``loc``.
    Random draws use the env's generator (see :meth:`set_seed`) so rollouts are reproducible.

    Actions are passed to the ensemble and to ``reward_fn`` as given, as a gymnasium MuJoCo
    env does (its control cost uses the unclipped action); the policy is responsible for
    staying inside ``action_spec``.

    Rows whose previous step terminated (root ``"terminated"`` entry, which a
    :class:`~torchrl.envs.TransformedEnv` penalty may also set) are frozen: same observation,
    zero reward and uncertainty, still terminated. Rows whose predicted observation is not
    finite (diverging model) are not clipped: they are marked terminated with zero reward,
    keep their previous observation, and are counted in :attr:`num_invalid` (a cumulative
    tensor over the env's life, read it after the rollout; reading it inside ``_step`` would
    synchronise the device).

    The ensemble is evaluated under ``torch.no_grad()``: no gradient flows through the model
    (BREMEN / MB2PO optimise the policy with TRPO / AWAC on the imagined data, not by
    backpropagating through the dynamics).

    The state also holds ``"model_step_count"`` ``[*B, 1]``; ``truncated`` becomes ``True``
    when it reaches ``max_episode_steps``.

    Args:
        ensemble (nn.Module): a ``DynamicsEnsemble``-like module with ``num_members``,
            ``observation_dim``, ``action_dim``, ``probabilistic``, ``predict_reward``,
            ``elite_indices`` and ``predict(observation, action, member_index=None)``.

    Keyword Args:
        observation_spec (TensorSpec or Composite): spec of ``"observation"`` (shape ``[o]`` or
            ``[*batch_size, o]``), or a Composite holding it under ``"observation"``.
        action_spec (TensorSpec or Composite): spec of ``"action"`` (``[a]`` or
            ``[*batch_size, a]``).
        reward_fn (callable, optional): ``(obs, action, next_obs) -> [*B, 1]``. If ``None`` the
            ensemble must predict the reward.
        termination_fn (callable, optional): ``(obs, action, next_obs) -> bool [*B, 1]``.
            ``None`` never terminates.
        start_states (TensorDict or ReplayBuffer): start observations (``"observation"``
            ``[N, o]``), sampled uniformly at (partial) reset.
        batch_size (int or torch.Size): number of parallel imaginary rollouts.
        member_selection (str, optional): see above. Defaults to ``"per_step"``.
        max_episode_steps (int, optional): truncation horizon. Defaults to ``1000``.
        uncertainty (sequence of str, optional): among ``"disagreement"``, ``"std_norm"``,
            ``"cov_frobenius"``, ``"ensemble_std"``. Defaults to ``("disagreement",)``.
        elites_only (bool, optional): draw members from ``elite_indices``. Defaults to ``False``.
        device (torch.device, optional): env device. Defaults to the ensemble's device.
        generator (torch.Generator, optional): RNG for member draws, noise and start states.
            Defaults to the global RNG until :meth:`set_seed` is called.

    Examples:
        >>> from torchrl_depeff.envs.model_env import EnsembleModelEnv
        >>> from tensordict import TensorDict
        >>> from torchrl.data import Bounded, Unbounded
        >>> from torchrl.envs.utils import check_env_specs
        >>> from torchrl_depeff.modules.ensemble import DynamicsEnsemble
        >>> model = DynamicsEnsemble(3, 2, num_members=4, num_cells=(16,), probabilistic=True)
        >>> env = EnsembleModelEnv(
        ...     model, observation_spec=Unbounded(3), action_spec=Bounded(-1.0, 1.0, (2,)),
        ...     reward_fn=lambda o, a, n: -n.pow(2).sum(-1, keepdim=True),
        ...     start_states=TensorDict({"observation": torch.randn(100, 3)}, [100]),
        ...     batch_size=8, member_selection="per_sample", uncertainty=("disagreement", "std_norm"))
        >>> check_env_specs(env)
        >>> ro = env.rollout(5)
        >>> ro["next", "observation"].shape, ro["next", "model_std_norm"].shape
        (torch.Size([8, 5, 3]), torch.Size([8, 5, 1]))
    """

    def __init__(
        self,
        ensemble: nn.Module,
        *,
        observation_spec: TensorSpec,
        action_spec: TensorSpec,
        reward_fn: RewardFn | None = None,
        termination_fn: RewardFn | None = None,
        start_states: Any,
        batch_size: int | Sequence[int] | torch.Size,
        member_selection: str = "per_step",
        max_episode_steps: int = 1000,
        uncertainty: Sequence[str] = ("disagreement",),
        elites_only: bool = False,
        device: torch.device | str | None = None,
        generator: torch.Generator | None = None,
    ) -> None:
        for attr in ("num_members", "observation_dim", "action_dim", "probabilistic", "predict_reward", "predict"):
            if not hasattr(ensemble, attr):
                raise TypeError(f"ensemble {type(ensemble).__name__} has no attribute {attr!r}")
        if member_selection not in MEMBER_SELECTIONS:
            raise ValueError(
                f"member_selection must be one of {MEMBER_SELECTIONS}, got {member_selection!r}"
            )
        if isinstance(uncertainty, str):
            uncertainty = (uncertainty,)
        uncertainty = tuple(uncertainty)
        for name in uncertainty:
            if name not in UNCERTAINTY_KEYS:
                raise ValueError(
                    f"unknown uncertainty {name!r}; valid names are {sorted(UNCERTAINTY_KEYS)}"
                )
            if name not in ("disagreement", "ensemble_std") and not ensemble.probabilistic:
                raise ValueError(
                    f"uncertainty {name!r} needs a probabilistic ensemble (scale), but "
                    f"ensemble.probabilistic is False"
                )
        if reward_fn is None and not ensemble.predict_reward:
            raise ValueError(
                "reward_fn is None and the ensemble does not predict the reward "
                "(predict_reward=False): pass a reward_fn"
            )
        if not isinstance(max_episode_steps, int) or max_episode_steps < 1:
            raise ValueError(f"max_episode_steps must be a positive int, got {max_episode_steps!r}")
        if isinstance(batch_size, int):
            batch_size = (batch_size,)
        batch_size = torch.Size(batch_size)
        if len(batch_size) == 0 or any(b < 1 for b in batch_size):
            raise ValueError(f"batch_size must be non-empty with positive sizes, got {list(batch_size)}")
        if device is None:
            param = next(iter(ensemble.parameters()), None)
            device = param.device if param is not None else torch.device("cpu")
        super().__init__(ensemble, device=device, batch_size=batch_size)
        self.reward_fn = reward_fn
        self.termination_fn = termination_fn
        self.member_selection = member_selection
        self.max_episode_steps = max_episode_steps
        self.uncertainty = uncertainty
        self.uncertainty_keys = tuple(UNCERTAINTY_KEYS[n] for n in uncertainty)
        self.elites_only = bool(elites_only)
        self._generator = generator
        self.num_invalid = torch.zeros((), dtype=torch.long, device=self.device)

        self._start_states = self._check_start_states(start_states, ensemble.observation_dim)

        o, a = ensemble.observation_dim, ensemble.action_dim
        if isinstance(observation_spec, Composite):
            if "observation" not in observation_spec.keys():
                raise KeyError("observation_spec Composite has no 'observation' entry")
            observation_spec = observation_spec["observation"]
        if isinstance(action_spec, Composite):
            if "action" not in action_spec.keys():
                raise KeyError("action_spec Composite has no 'action' entry")
            action_spec = action_spec["action"]
        obs_spec = _expand_spec(observation_spec, batch_size, o, "observation").to(self.device)
        act_spec = _expand_spec(action_spec, batch_size, a, "action").to(self.device)
        obs_entries: dict[str, TensorSpec] = {
            "observation": obs_spec,
            _STEP_COUNT_KEY: Bounded(
                0, max_episode_steps, shape=(*batch_size, 1), dtype=torch.int64, device=self.device
            ),
        }
        if member_selection == "per_trajectory":
            obs_entries[_MEMBER_KEY] = Bounded(
                0, ensemble.num_members - 1, shape=batch_size, dtype=torch.int64, device=self.device
            )
        for key in self.uncertainty_keys:
            obs_entries[key] = Unbounded(shape=(*batch_size, 1), dtype=obs_spec.dtype, device=self.device)
        self.observation_spec = Composite(obs_entries, shape=batch_size, device=self.device)
        self.action_spec = act_spec
        self.reward_spec = Unbounded(shape=(*batch_size, 1), dtype=obs_spec.dtype, device=self.device)
        self.done_spec = Composite(
            {
                k: Categorical(2, shape=(*batch_size, 1), dtype=torch.bool, device=self.device)
                for k in ("done", "terminated", "truncated")
            },
            shape=batch_size,
            device=self.device,
        )

    # ------------------------------------------------------------------ construction helpers
    @staticmethod
    def _check_start_states(start_states: Any, observation_dim: int) -> Any:
        if isinstance(start_states, TensorDictBase):
            if "observation" not in start_states.keys():
                raise KeyError("start_states has no 'observation' entry")
            obs = start_states.get("observation")
            if obs.ndim != 2 or obs.shape[0] == 0 or obs.shape[1] != observation_dim:
                raise ValueError(
                    f"start_states['observation'] must be a non-empty [N, {observation_dim}] tensor, "
                    f"got shape {list(obs.shape)}"
                )
            return obs
        if hasattr(start_states, "sample") and hasattr(start_states, "__len__"):
            if len(start_states) == 0:
                raise ValueError("start_states replay buffer is empty")
            return start_states
        raise TypeError(
            f"start_states must be a TensorDict or a ReplayBuffer, got {type(start_states).__name__}"
        )

    @classmethod
    def from_env(
        cls,
        real_env: EnvBase,
        ensemble: nn.Module,
        *,
        task: Any = None,
        reward_fn: RewardFn | None = None,
        termination_fn: RewardFn | None = None,
        start_states: Any,
        batch_size: int | Sequence[int] | torch.Size,
        **kwargs: Any,
    ) -> EnsembleModelEnv:
        """Builds a model env with the specs of a real TorchRL env.

        ``reward_fn`` / ``termination_fn`` / ``max_episode_steps`` default to the task's
        (a :class:`~torchrl_depeff.envs.tasks.TaskSpec` or a task name).

        Args:
            real_env (EnvBase): env with a single flat ``"observation"`` entry.
            ensemble (nn.Module): see :class:`EnsembleModelEnv`.

        Keyword Args:
            task (TaskSpec or str, optional): task giving reward/termination functions.
            reward_fn, termination_fn, start_states, batch_size: see the class.
            **kwargs: forwarded to the constructor.

        Examples:
            >>> from torchrl_depeff.envs.model_env import EnsembleModelEnv
            >>> from tensordict import TensorDict
            >>> from torchrl_depeff.envs.tasks import make_env
            >>> from torchrl_depeff.modules.ensemble import DynamicsEnsemble
            >>> real = make_env("halfcheetah")
            >>> model = DynamicsEnsemble(17, 6, num_members=2, num_cells=(8,))
            >>> env = EnsembleModelEnv.from_env(real, model, task="halfcheetah",
            ...     start_states=TensorDict({"observation": torch.zeros(4, 17)}, [4]), batch_size=3)
            >>> env.rollout(2)["next", "reward"].shape
            torch.Size([3, 2, 1])
        """
        if task is not None:
            if isinstance(task, str):
                from torchrl_depeff.envs.tasks import get_task

                task = get_task(task)
            reward_fn = reward_fn if reward_fn is not None else task.reward_fn
            termination_fn = termination_fn if termination_fn is not None else task.termination_fn
            kwargs.setdefault("max_episode_steps", task.max_episode_steps)
        obs_full = real_env.observation_spec
        if "observation" not in obs_full.keys():
            raise KeyError(
                f"real_env must have an 'observation' entry, got keys {list(obs_full.keys(True, True))}"
            )
        nb = len(real_env.batch_size)
        obs_spec = obs_full["observation"]
        act_spec = real_env.action_spec
        if obs_spec.ndim - nb != 1:
            raise ValueError(
                f"real_env 'observation' must be a flat vector, got shape {list(obs_spec.shape)}"
            )
        if nb:
            obs_spec = obs_spec[(0,) * nb]
            act_spec = act_spec[(0,) * nb]
        if obs_spec.shape[-1] != ensemble.observation_dim or act_spec.shape[-1] != ensemble.action_dim:
            raise ValueError(
                f"ensemble dims (observation {ensemble.observation_dim}, action {ensemble.action_dim}) "
                f"do not match real_env specs (observation {list(obs_spec.shape)}, "
                f"action {list(act_spec.shape)})"
            )
        return cls(
            ensemble,
            observation_spec=obs_spec,
            action_spec=act_spec,
            reward_fn=reward_fn,
            termination_fn=termination_fn,
            start_states=start_states,
            batch_size=batch_size,
            **kwargs,
        )

    # ------------------------------------------------------------------ RNG
    def _set_seed(self, seed: int | None) -> None:
        gen = torch.Generator(device=self.device)
        if seed is None:
            gen.seed()
        else:
            gen.manual_seed(int(seed))
        self._generator = gen

    def _randint(self, high: int, shape: Sequence[int]) -> torch.Tensor:
        return torch.randint(high, tuple(shape), generator=self._generator, device=self.device)

    def _draw_members(self, shape: Sequence[int]) -> torch.Tensor:
        if self.elites_only:
            elites = self.world_model.elite_indices.to(self.device)
            return elites[self._randint(elites.numel(), shape)]
        return self._randint(self.world_model.num_members, shape)

    # ------------------------------------------------------------------ reset
    def _sample_start(self, n: int) -> torch.Tensor:
        if isinstance(self._start_states, torch.Tensor):
            idx = self._randint(self._start_states.shape[0], (n,))
            return self._start_states.to(self.device)[idx]
        rb = self._start_states
        size = len(rb)
        if size == 0:
            raise ValueError("start_states replay buffer is empty")
        idx = self._randint(size, (n,)).to("cpu")
        return rb[idx].get("observation").to(self.device)

    def _reset(self, tensordict: TensorDictBase | None = None, **kwargs: Any) -> TensorDictBase:
        B = self.batch_size
        n = B.numel()
        obs_spec = self.observation_spec["observation"]
        obs = self._sample_start(n).reshape(*B, -1).to(obs_spec.dtype)
        out = {
            "observation": obs,
            _STEP_COUNT_KEY: torch.zeros(*B, 1, dtype=torch.int64, device=self.device),
        }
        if self.member_selection == "per_trajectory":
            out[_MEMBER_KEY] = self._draw_members(B)
        for key in self.uncertainty_keys:
            out[key] = torch.zeros(*B, 1, dtype=obs.dtype, device=self.device)
        false = torch.zeros(*B, 1, dtype=torch.bool, device=self.device)
        out.update(done=false, terminated=false.clone(), truncated=false.clone())
        # rows not flagged by "_reset" are restored by EnvBase.reset (_update_during_reset)
        return TensorDict(out, batch_size=B, device=self.device)

    # ------------------------------------------------------------------ step
    def _uncertainties(
        self, loc: torch.Tensor, scale: torch.Tensor | None
    ) -> dict[str, torch.Tensor]:
        # loc, scale: [E', *B, o] (E' = elites when elites_only)
        out = {}
        for name in self.uncertainty:
            if name == "disagreement":
                # MOReL / BREMEN App. E: max_{i,j} ||mu_i - mu_j||_2
                x = loc.movedim(0, -2)  # [*B, E, o]
                flat = x.reshape(-1, *x.shape[-2:])
                d = torch.cdist(flat, flat, compute_mode="donot_use_mm_for_euclid_dist")
                u = d.flatten(-2).amax(-1).reshape(*x.shape[:-2], 1)
            elif name == "ensemble_std":
                # BREMEN App. E soft penalty with deterministic members: the largest (over state
                # dims) standard deviation of the member predictions, max_k std_i(mu_{i,k})
                u = loc.std(0, correction=0).amax(-1, keepdim=True)
            elif name == "std_norm":
                # MOPO: max_i ||sigma_i||_2
                u = scale.norm(dim=-1, keepdim=True).amax(0)
            else:
                # MB2PO: max_i ||Sigma_i||_F, diagonal Sigma_i = diag(sigma_i^2)
                u = scale.pow(2).norm(dim=-1, keepdim=True).amax(0)
            out[UNCERTAINTY_KEYS[name]] = u
        return out

    @staticmethod
    def _gather(x: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
        # x [E, *B, d], idx [*B] -> [*B, d]
        index = idx.unsqueeze(0).unsqueeze(-1).expand(1, *x.shape[1:])
        return x.gather(0, index).squeeze(0)

    def _predict(
        self, obs: torch.Tensor, action: torch.Tensor, tensordict: TensorDictBase
    ) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor | None, dict[str, torch.Tensor]]:
        model = self.world_model
        B = obs.shape[:-1]
        mode = self.member_selection
        need_all = bool(self.uncertainty) or mode == "mean"
        if not need_all:
            # one member per row without evaluating every member for every row; "per_step"
            # draws a single member for the whole batch (BREMEN eq. 2), so only it is evaluated
            if mode == "per_trajectory":
                idx = tensordict.get(_MEMBER_KEY)
            elif mode == "per_step":
                idx = self._draw_members((1,)).expand(B)
            else:
                idx = self._draw_members(B)
            pred = model.predict(obs, action, member_index=idx)
            return pred.loc, pred.scale, pred.reward, {}
        pred = model.predict(obs, action)
        loc, scale, reward = pred.loc, pred.scale, pred.reward
        if self.elites_only:
            elites = model.elite_indices.to(self.device)
            loc = loc.index_select(0, elites)
            scale = scale.index_select(0, elites) if scale is not None else None
            reward = reward.index_select(0, elites) if reward is not None else None
        unc = self._uncertainties(loc, scale)
        if mode == "mean":
            return loc.mean(0), None, reward.mean(0) if reward is not None else None, unc
        if self.elites_only:
            # positions inside the elite subset
            n_e = loc.shape[0]
            if mode == "per_trajectory":
                member = tensordict.get(_MEMBER_KEY)
                pos = (model.elite_indices.to(self.device) == member.unsqueeze(-1)).long().argmax(-1)
            elif mode == "per_step":
                pos = self._randint(n_e, (1,)).expand(B)
            else:
                pos = self._randint(n_e, B)
        else:
            if mode == "per_trajectory":
                pos = tensordict.get(_MEMBER_KEY)
            elif mode == "per_step":
                pos = self._randint(loc.shape[0], (1,)).expand(B)
            else:
                pos = self._randint(loc.shape[0], B)
        loc = self._gather(loc, pos)
        scale = self._gather(scale, pos) if scale is not None else None
        reward = self._gather(reward, pos) if reward is not None else None
        return loc, scale, reward, unc

    def _step(self, tensordict: TensorDictBase) -> TensorDictBase:
        obs = tensordict.get("observation")
        action = tensordict.get("action")
        B = obs.shape[:-1]
        prev_term = tensordict.get("terminated", None)
        if prev_term is None:
            prev_term = torch.zeros(*B, 1, dtype=torch.bool, device=obs.device)
        with torch.no_grad():
            loc, scale, pred_reward, unc = self._predict(obs, action, tensordict)
        if scale is not None and self.member_selection != "mean":
            noise = torch.randn(loc.shape, generator=self._generator, device=loc.device, dtype=loc.dtype)
            next_obs = loc + scale * noise
        else:
            next_obs = loc
        invalid = ~torch.isfinite(next_obs).all(-1, keepdim=True)
        next_obs = torch.where(invalid, obs, next_obs)
        # BREMEN eq. (2): rewards/termination of the imaginary MDP from (s, a, s')
        if self.reward_fn is not None:
            reward = self.reward_fn(obs, action, next_obs)
        else:
            reward = pred_reward
        reward = reward.reshape(*B, 1).to(obs.dtype)
        if self.termination_fn is not None:
            terminated = self.termination_fn(obs, action, next_obs).reshape(*B, 1).to(torch.bool)
        else:
            terminated = torch.zeros(*B, 1, dtype=torch.bool, device=obs.device)
        terminated = terminated | invalid
        self.num_invalid.add_(invalid.sum())
        # frozen rows: previously terminated rows stay put
        frozen = prev_term.reshape(*B, 1).to(torch.bool)
        step_count = tensordict.get(_STEP_COUNT_KEY) + (~frozen).long()
        next_obs = torch.where(frozen, obs, next_obs)
        reward = torch.where(frozen | invalid, torch.zeros_like(reward), reward)
        terminated = terminated | frozen
        truncated = step_count >= self.max_episode_steps
        out = {
            "observation": next_obs,
            _STEP_COUNT_KEY: step_count,
            "reward": reward,
            "terminated": terminated,
            "truncated": truncated,
            "done": terminated | truncated,
        }
        if self.member_selection == "per_trajectory":
            out[_MEMBER_KEY] = tensordict.get(_MEMBER_KEY)
        for key, value in unc.items():
            out[key] = torch.where(frozen, torch.zeros_like(value), value).to(obs.dtype)
        return TensorDict(out, batch_size=B, device=self.device)
