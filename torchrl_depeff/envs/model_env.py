"""Batched imaginary rollouts over a dynamics ensemble (BREMEN eq. (2), MOPO, MOReL, MB2PO)."""
from __future__ import annotations

from typing import Any, Callable, Sequence

import torch
from tensordict import TensorDict, TensorDictBase
from tensordict.nn import InteractionType, TensorDictModuleBase
from tensordict.nn.probabilistic import interaction_type
from tensordict.utils import unravel_key
from torch import nn
from torchrl._utils import logger as torchrl_logger
from torchrl.data import Bounded, Categorical, Composite, TensorSpec, Unbounded
from torchrl.envs import EnvBase, TransformedEnv
from torchrl.envs.model_based import ModelBasedEnvBase
from torchrl.envs.transforms import Compose, Transform
from torchrl.modules.distributions.utils import sample_and_log_prob

from torchrl_depeff.envs.penalties import HardUncertaintyPenalty, SoftUncertaintyPenalty
from torchrl_depeff.envs.rewards import no_termination
from torchrl_depeff.envs.tasks import get_task
from torchrl_depeff.modules._plain import _call_plain, _plain_probabilistic_parts, _plain_tdmodule
from torchrl_depeff.modules.ensemble import DynamicsEnsemble

__all__ = [
    "ACTION_BOUNDS",
    "EnsembleModelEnv",
    "MEMBER_SELECTIONS",
    "UNCERTAINTY_KEYS",
    "model_rollout",
]

#: uncertainty name accepted by ``EnsembleModelEnv(uncertainty=...)`` -> output key
UNCERTAINTY_KEYS: dict[str, str] = {
    "disagreement": "model_disagreement",
    "std_norm": "model_std_norm",
    "cov_frobenius": "model_cov_frobenius",
    "ensemble_std": "model_ensemble_std",
}
MEMBER_SELECTIONS: tuple[str, ...] = ("per_step", "per_sample", "per_trajectory", "mean")
#: what ``EnsembleModelEnv(action_bounds=...)`` does with actions outside ``action_spec``
ACTION_BOUNDS: tuple[str, ...] = ("pass", "clip", "check")

RewardFn = Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]
Penalty = SoftUncertaintyPenalty | HardUncertaintyPenalty

_STEP_COUNT_KEY = "model_step_count"
_MEMBER_KEY = "model_member"
_DONE_KEYS = ("done", "terminated", "truncated")
# EnvBase.rollout keyword arguments the fast path accepts, with the values it accepts
_FAST_ROLLOUT_DEFAULTS: dict[str, Any] = {
    "auto_reset": True,
    "auto_cast_to_device": False,
    "break_when_all_done": None,
    "tensordict": None,
    "set_truncated": False,
    "out": None,
    "storing_device": None,
    "set_state": None,
    "actions": None,
}


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


def _model_dtype(ensemble: nn.Module) -> torch.dtype:
    for t in (*ensemble.parameters(), *ensemble.buffers()):
        if t.is_floating_point():
            return t.dtype
    return torch.get_default_dtype()


def _cast_spec(spec: TensorSpec, dtype: torch.dtype, name: str) -> TensorSpec:
    if not spec.dtype.is_floating_point:
        raise TypeError(f"{name} spec must have a floating dtype (the ensemble regresses floats), got {spec.dtype}")
    if spec.dtype != dtype:
        torchrl_logger.info(f"EnsembleModelEnv: {name} spec cast from {spec.dtype} to the ensemble's {dtype}")
        spec = spec.to(dtype)
    return spec


def _non_finite_rows(x: torch.Tensor) -> tuple[int, int]:
    """(number of rows of ``x [N, d]`` with a NaN/inf, index of the first one): one host read."""
    bad = ~torch.isfinite(x).all(-1)
    count = int(bad.sum())
    return count, (int(bad.nonzero()[0, 0]) if count else -1)


def _penalties_of(transform: Transform) -> list[Penalty] | None:
    """The penalty transforms of a TransformedEnv's transform, or None if it holds anything else."""
    parts = list(transform) if isinstance(transform, Compose) else [transform]
    if all(type(t) in (SoftUncertaintyPenalty, HardUncertaintyPenalty) for t in parts):
        return parts
    return None


def _dist_builder(last: Any) -> Callable[[dict], Any]:
    # ``distribution_class(**params, **distribution_kwargs)``, as the probabilistic module builds it
    dist_cls, dist_kwargs = last.distribution_class, dict(last.distribution_kwargs)
    params = [
        (k[-1] if isinstance(k, tuple) else k, unravel_key(td_key))
        for k, td_key in zip(last.dist_keys, last.in_keys)
    ]
    return lambda out: dist_cls(**{name: out[key] for name, key in params}, **dist_kwargs)


def _probabilistic_call(policy: Any, in_keys: list) -> Callable[[dict], dict] | None:
    """``root entries -> written entries`` of a sampling probabilistic actor without tensordicts.

    For an actor :func:`_plain_probabilistic_parts` accepts whose probabilistic module samples
    (interaction type ``RANDOM``, now or by default) and returns its log-probability. The call
    runs the same networks, builds the same distribution
    (``distribution_class(**params, **distribution_kwargs)``) and draws from it with TorchRL's own
    ``sample_and_log_prob``, so values and the random stream are those of ``policy(td)``; it
    only skips the tensordict plumbing (which took about 40 % of a rollout step with BREMEN's
    64-64 actor at 50 rows). Any other setting (deterministic interaction, no log-probability)
    returns ``None``: the tensordict call runs.
    """
    parts = _plain_probabilistic_parts(policy)
    if parts is None:
        return None
    steps, last = parts
    if not last.return_log_prob or (interaction_type() or last.default_interaction_type) is not InteractionType.RANDOM:
        return None
    build = _dist_builder(last)
    sample_key, log_prob_key = unravel_key(last.dist_sample_keys[0]), unravel_key(last.log_prob_key)

    def call(root: dict) -> dict:
        out = {k: root[k] for k in in_keys}
        for module, ins, outs in steps:
            out.update(_call_plain(module, [out[k] for k in ins], outs))
        dist = build(out)
        sample, log_prob = sample_and_log_prob(dist, reparameterize=dist.has_rsample)
        out[sample_key] = sample
        out[log_prob_key] = log_prob
        return out

    return call


def _deterministic_call(
    policy: nn.Module, in_key: str = "observation", out_key: str = "action"
) -> Callable[[torch.Tensor], torch.Tensor] | None:
    """``observation -> action`` of a probabilistic actor in ``DETERMINISTIC`` mode, without tensordicts.

    For an actor that reads only ``in_key`` and samples ``out_key`` (a
    :class:`~torchrl.modules.ProbabilisticActor` of plain ``TensorDictModule`` networks, e.g.
    :func:`~torchrl_depeff.modules.actors.make_gaussian_actor`'s): runs the same networks, builds
    the same distribution and takes the action the probabilistic module takes under
    ``set_exploration_type(ExplorationType.DETERMINISTIC)`` (its own ``_dist_sample``, e.g. the
    Gaussian's mean), so the action equals ``policy(td)[out_key]`` bit for bit; the
    log-probability, which an evaluation discards, is not computed. Returns ``None`` for any
    other policy (use the tensordict call).

    Args:
        policy (nn.Module): the actor.
        in_key (str): the only key it may read. Defaults to ``"observation"``.
        out_key (str): its sample key. Defaults to ``"action"``.

    Examples:
        >>> from tensordict import TensorDict
        >>> from torchrl.envs.utils import ExplorationType, set_exploration_type
        >>> from torchrl_depeff.envs.model_env import _deterministic_call
        >>> from torchrl_depeff.modules.actors import make_gaussian_actor
        >>> actor = make_gaussian_actor(17, 6, num_cells=(8,))
        >>> act = _deterministic_call(actor)
        >>> obs = torch.randn(3, 17)
        >>> with set_exploration_type(ExplorationType.DETERMINISTIC):
        ...     expected = actor(TensorDict({"observation": obs}, [3]))["action"]
        >>> torch.equal(act(obs), expected)
        True
    """
    parts = _plain_probabilistic_parts(policy)
    if parts is None:
        return None
    steps, last = parts
    if [unravel_key(k) for k in policy.in_keys] != [in_key] or unravel_key(last.dist_sample_keys[0]) != out_key:
        return None
    build = _dist_builder(last)

    def call(observation: torch.Tensor) -> torch.Tensor:
        out = {in_key: observation}
        for module, ins, outs in steps:
            out.update(_call_plain(module, [out[k] for k in ins], outs))
        return last._dist_sample(build(out), interaction_type=InteractionType.DETERMINISTIC)

    return call


class _StepContext:
    """What a step reads from the env and its ensemble, looked up once (per rollout in the fast
    loop, per step in ``_step``)."""

    __slots__ = (
        "batch_size", "numel", "device", "dtype", "generator", "mode", "need_all", "elites",
        "draw_high", "model", "predictor", "action_dim", "low", "high", "clip", "reward_fn",
        "termination_fn", "max_steps", "penalties", "pool", "pool_size", "per_trajectory", "own_predict",
    )


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

    * ``"per_step"``: one member drawn for the whole batch at every step (BREMEN's code); only
      that member is evaluated,
    * ``"per_sample"``: an independent member per row and step (MBPO / MOPO); each row is
      evaluated by its member only (one grouped GEMM per layer, see
      :class:`~torchrl_depeff.modules.DynamicsEnsemble`),
    * ``"per_trajectory"``: a member per row drawn at reset and kept (mbrl-lib
      ``fixed_model``); stored in the state entry ``"model_member"``,
    * ``"mean"``: the average of the member means (mbrl-lib ``expectation``); no noise is
      sampled in this mode even for a probabilistic ensemble.

    Uncertainty outputs and ``"mean"`` need every member on every row (one batched matmul per
    layer). With ``elites_only=True`` members are drawn from ``ensemble.elite_indices`` and
    the mean and uncertainties are computed over the elites only (MB2PO uses elites
    everywhere). In ``"per_trajectory"`` mode the members are drawn at reset: reset the env
    after the elites change (a stored member that is no longer an elite would be mapped to the
    first elite when uncertainties are requested).

    For a probabilistic ensemble the next observation is sampled as
    ``loc + scale * N(0, 1)`` from the chosen member (PETS / MBPO trajectory sampling); the
    reward head (when used) contributes its mean. A deterministic ensemble gives ``loc``.
    Random draws use the env's generator (see :meth:`set_seed`) so rollouts are reproducible.

    **Penalties.** ``penalty`` takes :class:`~torchrl_depeff.envs.SoftUncertaintyPenalty` /
    :class:`~torchrl_depeff.envs.HardUncertaintyPenalty` objects and applies them inside the
    step (same arithmetic, same specs and entries as wrapping the env in a
    :class:`~torchrl.envs.TransformedEnv` with them, and the same rollouts for a seed).

    **Fast rollout.** :meth:`rollout` runs the steps as a tensor loop (no per-step
    TensorDict, step_mdp or reset bookkeeping, no host synchronisation) when it can give
    exactly what TorchRL's generic loop gives: a
    :class:`~tensordict.nn.TensorDictModuleBase` policy reading only state entries,
    ``break_when_any_done=False``, no ``callback``/``tensordict``/``out``/``set_truncated``,
    start states given as a TensorDict, and the env not subclassed in ``_step``/``_reset``.
    Otherwise (or with ``fast_rollout=False``) it is TorchRL's loop. The two give the same
    values and draw the same random numbers for the same seed (tested). To make automatic
    resets inside a rollout synchronisation-free, every step draws the start state (and
    ``"per_trajectory"`` member) a row would get if it were reset after it; a partial reset
    (``"_reset"`` entry) uses these draws. For a ``TransformedEnv`` over this env with only
    penalty transforms, :func:`model_rollout` gives the fast path as well. Inside it, a plain
    :class:`~tensordict.nn.TensorDictModule` policy is called on its tensors, and so is a
    sampling ``ProbabilisticActor`` (plain networks, then the same distribution class and
    TorchRL's ``sample_and_log_prob``: 1.4x faster rollouts with BREMEN's 64-64 actor at 50 rows,
    1.2x at 200, ``benchmarks/bench_model_env.py --policy-call``); other policies get a tensordict.

    **Inputs.** The env works in the ensemble's floating dtype: specs given in another
    floating dtype (e.g. float64 from a plain gymnasium env without ``DoubleToFloat``), start
    states, reset observations and actions are cast to it. Non-finite start states are refused
    with a ``ValueError`` at construction (TensorDict pool), at sampling (replay buffer) and at
    :meth:`reset` with given observations; they are not checked per step. Actions are handled by
    ``action_bounds``: ``"pass"`` (default) gives them to the ensemble and ``reward_fn`` as
    given, as a gymnasium MuJoCo env's control cost does (BREMEN App. F.1: the policy's
    Gaussian actions are not squashed); ``"clip"`` clamps them to a bounded ``action_spec``
    first (the rollout still records the policy's action); ``"check"`` passes them but
    :meth:`rollout` raises a ``ValueError`` after the rollout if any was out of bounds. In every
    mode the rows with an action outside a bounded ``action_spec`` (or NaN) are counted in
    :attr:`num_out_of_bounds_actions`, a device tensor read after the rollout.

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
    when it reaches ``max_episode_steps``. :meth:`reset` with a tensordict holding
    ``"observation"`` (and no ``"_reset"`` mask) starts from those observations (TorchRL's
    world-model convention; ``set_state=False`` ignores them, ``set_state=True`` also applies
    them to the rows of a ``"_reset"`` mask); otherwise start states are sampled.

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
        penalty (penalty transform or sequence of them, optional): applied in order inside
            the step (see above). Defaults to ``None``.
        action_bounds (str, optional): ``"pass"``, ``"clip"`` or ``"check"`` (see above).
            Defaults to ``"pass"``.
        fast_rollout (bool, optional): allow the fast rollout path. Defaults to ``True``.

    Examples:
        >>> from torchrl_depeff.envs.model_env import EnsembleModelEnv
        >>> from tensordict import TensorDict
        >>> from torchrl.data import Bounded, Unbounded
        >>> from torchrl.envs.utils import check_env_specs
        >>> from torchrl_depeff.envs.penalties import SoftUncertaintyPenalty
        >>> from torchrl_depeff.modules.ensemble import DynamicsEnsemble
        >>> model = DynamicsEnsemble(3, 2, num_members=4, num_cells=(16,), probabilistic=True)
        >>> env = EnsembleModelEnv(
        ...     model, observation_spec=Unbounded(3), action_spec=Bounded(-1.0, 1.0, (2,)),
        ...     reward_fn=lambda o, a, n: -n.pow(2).sum(-1, keepdim=True),
        ...     start_states=TensorDict({"observation": torch.randn(100, 3)}, [100]),
        ...     batch_size=8, member_selection="per_sample", uncertainty=("disagreement", "std_norm"),
        ...     penalty=SoftUncertaintyPenalty(0.1, "model_std_norm"))
        >>> check_env_specs(env)
        >>> ro = env.rollout(5)
        >>> ro["next", "observation"].shape, ro["next", "model_std_norm"].shape
        (torch.Size([8, 5, 3]), torch.Size([8, 5, 1]))
        >>> torch.allclose(ro["next", "penalty"], 0.1 * ro["next", "model_std_norm"])
        True
    """

    # reset(td, set_state=True) restores the given observations
    _supports_set_state = True

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
        penalty: Penalty | Sequence[Penalty] | None = None,
        action_bounds: str = "pass",
        fast_rollout: bool = True,
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
        if isinstance(max_episode_steps, bool) or not isinstance(max_episode_steps, int) or max_episode_steps < 1:
            raise ValueError(f"max_episode_steps must be a positive int, got {max_episode_steps!r}")
        if action_bounds not in ACTION_BOUNDS:
            raise ValueError(f"action_bounds must be one of {ACTION_BOUNDS}, got {action_bounds!r}")
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
        self.action_bounds = action_bounds
        self.fast_rollout = bool(fast_rollout)
        self._generator = generator
        self._dtype = _model_dtype(ensemble)
        self._is_dynamics_ensemble = isinstance(ensemble, DynamicsEnsemble)
        self.num_invalid = torch.zeros((), dtype=torch.long, device=self.device)
        self.num_out_of_bounds_actions = torch.zeros((), dtype=torch.long, device=self.device)
        # start state / member a row would get if reset after the latest step (see _reset)
        self._pending_reset: tuple[torch.Tensor | None, torch.Tensor, torch.Tensor | None] | None = None

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
        dtype = self._dtype
        obs_spec = _cast_spec(_expand_spec(observation_spec, batch_size, o, "observation"), dtype, "observation")
        act_spec = _cast_spec(_expand_spec(action_spec, batch_size, a, "action"), dtype, "action")
        obs_spec = obs_spec.to(self.device)
        act_spec = act_spec.to(self.device)
        if isinstance(act_spec, Bounded):
            self._action_low, self._action_high = act_spec.space.low, act_spec.space.high
        else:
            self._action_low = self._action_high = None
        if action_bounds != "pass" and self._action_low is None:
            raise ValueError(
                f"action_bounds={action_bounds!r} needs a Bounded action_spec, got {type(act_spec).__name__}"
            )
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
            obs_entries[key] = Unbounded(shape=(*batch_size, 1), dtype=dtype, device=self.device)
        self.penalties = self._check_penalties(penalty)
        for p in self.penalties:
            if isinstance(p, SoftUncertaintyPenalty):
                obs_entries[p.penalty_key] = Unbounded(shape=(*batch_size, 1), dtype=dtype, device=self.device)
        self.observation_spec = Composite(obs_entries, shape=batch_size, device=self.device)
        self.action_spec = act_spec
        self.reward_spec = Unbounded(shape=(*batch_size, 1), dtype=dtype, device=self.device)
        self.done_spec = Composite(
            {
                k: Categorical(2, shape=(*batch_size, 1), dtype=torch.bool, device=self.device)
                for k in _DONE_KEYS
            },
            shape=batch_size,
            device=self.device,
        )

    # ------------------------------------------------------------------ construction helpers
    def _check_penalties(self, penalty: Any) -> tuple[Penalty, ...]:
        if penalty is None:
            return ()
        if isinstance(penalty, Compose):
            penalty = list(penalty)
        elif isinstance(penalty, Transform):
            penalty = [penalty]
        penalties = tuple(penalty)
        seen: set[str] = set()
        for p in penalties:
            if type(p) not in (SoftUncertaintyPenalty, HardUncertaintyPenalty):
                raise TypeError(
                    f"penalty must be SoftUncertaintyPenalty / HardUncertaintyPenalty objects, got "
                    f"{type(p).__name__} (wrap the env in a TransformedEnv for other transforms)"
                )
            if p.parent is not None:
                raise ValueError(f"penalty {p} is already attached to an env: pass a fresh (or cloned) one")
            if p.uncertainty_key not in self.uncertainty_keys:
                raise KeyError(
                    f"penalty uncertainty_key {p.uncertainty_key!r} is not produced by the env "
                    f"(uncertainty keys: {list(self.uncertainty_keys)})"
                )
            if p.reward_key != "reward":
                raise ValueError(f"penalty reward_key must be 'reward' for EnsembleModelEnv, got {p.reward_key!r}")
            if isinstance(p, SoftUncertaintyPenalty):
                reserved = {"observation", _STEP_COUNT_KEY, _MEMBER_KEY, "reward", *_DONE_KEYS, *self.uncertainty_keys}
                if p.penalty_key in seen or p.penalty_key in reserved:
                    raise ValueError(f"penalty_key {p.penalty_key!r} is already used by the env")
                seen.add(p.penalty_key)
        return penalties

    def _check_start_states(self, start_states: Any, observation_dim: int) -> Any:
        if isinstance(start_states, TensorDictBase):
            if "observation" not in start_states.keys():
                raise KeyError("start_states has no 'observation' entry")
            obs = start_states.get("observation")
            if obs.ndim != 2 or obs.shape[0] == 0 or obs.shape[1] != observation_dim:
                raise ValueError(
                    f"start_states['observation'] must be a non-empty [N, {observation_dim}] tensor, "
                    f"got shape {list(obs.shape)}"
                )
            if not obs.dtype.is_floating_point:
                raise TypeError(f"start_states['observation'] must be floating, got dtype {obs.dtype}")
            count, first = _non_finite_rows(obs)
            if count:
                raise ValueError(
                    f"start_states['observation'] has {count} non-finite (NaN/inf) rows, the first is row "
                    f"{first}: {obs[first].tolist()}"
                )
            return obs.to(device=self.device, dtype=self._dtype)
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
        (a :class:`~torchrl_depeff.envs.tasks.TaskSpec` or a task name). Specs in another
        floating dtype than the ensemble's (a plain float64 gymnasium env) are cast to the
        ensemble's dtype (see the class docstring).

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
        self._pending_reset = None

    def _context(self, predictor: Any = None) -> _StepContext:
        ctx = _StepContext()
        model = self.world_model
        ctx.batch_size = self.batch_size
        ctx.numel = ctx.batch_size.numel()
        ctx.device = self.device
        ctx.dtype = self._dtype
        ctx.generator = self._generator
        ctx.mode = self.member_selection
        ctx.need_all = bool(self.uncertainty) or ctx.mode == "mean"
        ctx.elites = model.elite_indices.to(ctx.device) if self.elites_only else None
        ctx.draw_high = ctx.elites.numel() if self.elites_only else model.num_members
        ctx.model = model
        # DynamicsEnsemble's own predict (not one replaced on the instance, e.g. by a test)
        ctx.own_predict = self._is_dynamics_ensemble and "predict" not in model.__dict__
        ctx.predictor = predictor if ctx.own_predict else None
        ctx.action_dim = model.action_dim
        ctx.low, ctx.high = self._action_low, self._action_high
        ctx.clip = self.action_bounds == "clip"
        ctx.reward_fn = self.reward_fn
        # no_termination never terminates: its all-False tensor is dropped (same values)
        ctx.termination_fn = None if self.termination_fn is no_termination else self.termination_fn
        ctx.max_steps = self.max_episode_steps
        ctx.penalties = self.penalties
        pool = self._start_states
        ctx.pool = pool if isinstance(pool, torch.Tensor) else None
        ctx.pool_size = self._pool_size()
        ctx.per_trajectory = ctx.mode == "per_trajectory"
        return ctx

    def _randint(self, high: int, shape: Sequence[int], ctx: _StepContext | None = None) -> torch.Tensor:
        if ctx is None:
            return torch.randint(high, tuple(shape), generator=self._generator, device=self.device)
        return torch.randint(high, tuple(shape), generator=ctx.generator, device=ctx.device)

    def _draw_members(self, shape: Sequence[int], ctx: _StepContext | None = None) -> torch.Tensor:
        ctx = self._context() if ctx is None else ctx
        draw = self._randint(ctx.draw_high, shape, ctx)
        return draw if ctx.elites is None else ctx.elites[draw]

    # ------------------------------------------------------------------ reset
    def _pool_size(self) -> int:
        pool = self._start_states
        return pool.shape[0] if isinstance(pool, torch.Tensor) else len(pool)

    def _start_from_indices(self, idx: torch.Tensor) -> torch.Tensor:
        """Start observations ``[n, o]`` of pool rows ``idx`` (a replay buffer is checked here)."""
        pool = self._start_states
        if isinstance(pool, torch.Tensor):
            return pool.index_select(0, idx)
        obs = pool[idx.to("cpu")].get("observation").to(device=self.device, dtype=self._dtype)
        count, first = _non_finite_rows(obs)
        if count:
            raise ValueError(
                f"start_states replay buffer returned {count} non-finite (NaN/inf) start states, the first: "
                f"{obs[first].tolist()}"
            )
        return obs

    def _draw_reset(self, ctx: _StepContext | None = None) -> tuple[torch.Tensor, torch.Tensor | None]:
        # RNG order of a reset: start rows, then the per_trajectory members
        ctx = self._context() if ctx is None else ctx
        if ctx.pool_size == 0:
            raise ValueError("start_states replay buffer is empty")
        idx = self._randint(ctx.pool_size, (ctx.numel,), ctx)
        member = self._draw_members(ctx.batch_size, ctx) if ctx.per_trajectory else None
        return idx, member

    def _resolve_set_state(
        self, set_state: bool | None, tensordict: TensorDictBase | None, select_reset_only: bool
    ) -> bool | None:
        # world-model convention: reset(td) starts from td's observations unless told otherwise;
        # TorchRL's auto-resets (select_reset_only) never pass observations
        if set_state is None and not select_reset_only:
            return None
        return super()._resolve_set_state(set_state, tensordict, select_reset_only)

    def _reset(self, tensordict: TensorDictBase | None = None, **kwargs: Any) -> TensorDictBase:
        B = self.batch_size
        set_state = kwargs.get("set_state", None)
        partial = tensordict is not None and "_reset" in tensordict.keys()
        given = None
        if tensordict is not None and set_state is not False and "observation" in tensordict.keys():
            if set_state is True or not partial:
                given = tensordict.get("observation")
        if set_state is True and given is None:
            raise ValueError("reset(..., set_state=True) needs an 'observation' entry in the tensordict")
        member = None
        if given is not None:
            obs = self._check_given_observation(given)
            if self.member_selection == "per_trajectory":
                member = tensordict.get(_MEMBER_KEY, None)
                member = self._draw_members(B) if member is None else member.to(self.device).reshape(B)
        elif partial and self._pending_reset is not None:
            # the draws of the latest step (so that a reset inside a rollout needs no extra draw)
            obs, idx, member = self._pending_reset
            if obs is None:
                obs = self._start_from_indices(idx).reshape(*B, -1)
        else:
            idx, member = self._draw_reset()
            obs = self._start_from_indices(idx).reshape(*B, -1)
        self._pending_reset = None
        out = {
            "observation": obs,
            _STEP_COUNT_KEY: torch.zeros(*B, 1, dtype=torch.int64, device=self.device),
        }
        if self.member_selection == "per_trajectory":
            out[_MEMBER_KEY] = member
        for key in self._zero_state_keys():
            out[key] = torch.zeros(*B, 1, dtype=self._dtype, device=self.device)
        false = torch.zeros(*B, 1, dtype=torch.bool, device=self.device)
        out.update(done=false, terminated=false.clone(), truncated=false.clone())
        # rows not flagged by "_reset" are restored by EnvBase.reset (_update_during_reset)
        return TensorDict(out, batch_size=B, device=self.device)

    def _zero_state_keys(self) -> list[str]:
        """State entries that are zero after a reset: uncertainties and soft penalties."""
        return [*self.uncertainty_keys, *(p.penalty_key for p in self.penalties if isinstance(p, SoftUncertaintyPenalty))]

    def _check_given_observation(self, obs: torch.Tensor) -> torch.Tensor:
        B, o = self.batch_size, self.world_model.observation_dim
        if obs.shape != torch.Size([*B, o]):
            raise ValueError(f"reset observation must have shape {[*B, o]}, got {list(obs.shape)}")
        if not obs.dtype.is_floating_point:
            raise TypeError(f"reset observation must be floating, got dtype {obs.dtype}")
        count, first = _non_finite_rows(obs.reshape(-1, o))
        if count:
            raise ValueError(
                f"reset observation has {count} non-finite (NaN/inf) rows, the first is flat row {first}: "
                f"{obs.reshape(-1, o)[first].tolist()}"
            )
        return obs.to(device=self.device, dtype=self._dtype)

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
        self, ctx: _StepContext, obs: torch.Tensor, action: torch.Tensor, member: torch.Tensor | None
    ) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor | None, dict[str, torch.Tensor]]:
        model = ctx.model
        B = obs.shape[:-1]
        mode = ctx.mode
        if not ctx.need_all:
            # one member per row without evaluating every member for every row; "per_step"
            # draws a single member for the whole batch (BREMEN eq. 2), so only it is evaluated
            if mode == "per_trajectory":
                idx = member
            else:
                # per_step: one member for all rows, a 0-d index for a DynamicsEnsemble (stand-ins
                # get it expanded to [*B]); per_sample: one per row
                idx = torch.randint(
                    ctx.draw_high, (1,) if mode == "per_step" else B, generator=ctx.generator, device=ctx.device
                )
                if ctx.elites is not None:
                    idx = ctx.elites[idx]
                if mode == "per_step":
                    idx = idx.reshape(()) if ctx.predictor is not None else idx.expand(B)
            if ctx.predictor is not None:
                # DynamicsEnsemble.predict(member_index=idx) with its tensors bound once
                pred = ctx.predictor(obs, action, idx)
            else:
                pred = model.predict(obs, action, member_index=idx)
            return pred.loc, pred.scale, pred.reward, {}
        if ctx.own_predict:
            # every member on every row: one batched matmul per layer (no loop over members)
            pred = model.predict(obs, action, kernel="bmm")
        else:
            pred = model.predict(obs, action)
        loc, scale, reward = pred.loc, pred.scale, pred.reward
        if ctx.elites is not None:
            elites = ctx.elites
            loc = loc.index_select(0, elites)
            scale = scale.index_select(0, elites) if scale is not None else None
            reward = reward.index_select(0, elites) if reward is not None else None
        unc = self._uncertainties(loc, scale)
        if mode == "mean":
            return loc.mean(0), None, reward.mean(0) if reward is not None else None, unc
        if ctx.elites is not None:
            # positions inside the elite subset
            n_e = loc.shape[0]
            if mode == "per_trajectory":
                pos = (ctx.elites == member.unsqueeze(-1)).long().argmax(-1)
            elif mode == "per_step":
                pos = self._randint(n_e, (1,), ctx).expand(B)
            else:
                pos = self._randint(n_e, B, ctx)
        else:
            if mode == "per_trajectory":
                pos = member
            elif mode == "per_step":
                pos = self._randint(loc.shape[0], (1,), ctx).expand(B)
            else:
                pos = self._randint(loc.shape[0], B, ctx)
        loc = self._gather(loc, pos)
        scale = self._gather(scale, pos) if scale is not None else None
        reward = self._gather(reward, pos) if reward is not None else None
        return loc, scale, reward, unc

    def _transition(
        self,
        ctx: _StepContext,
        obs: torch.Tensor,
        action: torch.Tensor,
        step_count: torch.Tensor,
        member: torch.Tensor | None,
        prev_term: torch.Tensor | None,
        count: bool = True,
    ) -> dict[str, torch.Tensor]:
        """One imaginary step on plain tensors (the work of ``_step`` and of the fast rollout).

        ``prev_term`` ``[*B, 1]`` freezes terminated rows (``None``: no row is terminated, as
        in every step of a rollout). Also draws the start states of a reset after this step.
        With ``count=False`` the counters (:attr:`num_invalid`,
        :attr:`num_out_of_bounds_actions`) are left to the caller, which gets the step's
        invalid-row mask under ``"_invalid"``. Returns the ``"next"`` entries.
        """
        B = obs.shape[:-1]
        if action.shape[-1] != ctx.action_dim:
            raise ValueError(f"action last dim must be {ctx.action_dim}, got shape {list(action.shape)}")
        if action.dtype != ctx.dtype:
            action = action.to(ctx.dtype)
        if ctx.low is not None:
            if count:
                self._count_out_of_bounds(action)
            if ctx.clip:
                action = torch.clamp(action, ctx.low, ctx.high)
        with torch.no_grad():
            loc, scale, pred_reward, unc = self._predict(ctx, obs, action, member)
            if scale is not None and ctx.mode != "mean":
                noise = torch.randn(loc.shape, generator=ctx.generator, device=loc.device, dtype=loc.dtype)
                next_obs = loc + scale * noise
            else:
                next_obs = loc
            # a row with a non-finite entry: x * 0 is NaN exactly for +-inf / NaN entries
            invalid = (next_obs * 0).sum(-1, keepdim=True) != 0
            next_obs = torch.where(invalid, obs, next_obs)
            # BREMEN eq. (2): rewards/termination of the imaginary MDP from (s, a, s')
            if ctx.reward_fn is not None:
                reward = ctx.reward_fn(obs, action, next_obs)
            else:
                reward = pred_reward
            reward = reward.reshape(*B, 1).to(obs.dtype)
            if ctx.termination_fn is not None:
                terminated = ctx.termination_fn(obs, action, next_obs).reshape(*B, 1).to(torch.bool)
                terminated = terminated | invalid
            else:
                terminated = invalid
            if count:
                self.num_invalid.add_(invalid.sum())
            if prev_term is None:
                step_count = step_count + 1
                reward = reward.masked_fill(invalid, 0.0)
            else:
                # frozen rows: previously terminated rows stay put
                frozen = prev_term.reshape(*B, 1).to(torch.bool)
                step_count = step_count + (~frozen).long()
                next_obs = torch.where(frozen, obs, next_obs)
                reward = reward.masked_fill(frozen | invalid, 0.0)
                terminated = terminated | frozen
                unc = {k: v.masked_fill(frozen, 0.0) for k, v in unc.items()}
            truncated = step_count >= ctx.max_steps
            done = terminated | truncated
            out = {"observation": next_obs, _STEP_COUNT_KEY: step_count}
            if ctx.per_trajectory:
                out[_MEMBER_KEY] = member
            for key, value in unc.items():
                out[key] = value.to(obs.dtype)
            for p in ctx.penalties:
                u = out[p.uncertainty_key]
                if isinstance(p, SoftUncertaintyPenalty):
                    reward, out[p.penalty_key] = p.apply(reward, u)
                else:
                    reward, terminated, done = p.apply(reward, u, terminated, done)
            out["reward"] = reward
            out["terminated"] = terminated
            out["truncated"] = truncated
            out["done"] = done
            # the start state (and member) of every row were it reset after this step: drawn
            # now, so that an automatic reset inside a rollout costs no host synchronisation
            idx, new_member = self._draw_reset(ctx)
            start = ctx.pool.index_select(0, idx).reshape(obs.shape) if ctx.pool is not None else None
            self.__dict__["_pending_reset"] = (start, idx, new_member)  # (no nn.Module.__setattr__)
            if not count:
                out["_invalid"] = invalid
        return out

    def _count_out_of_bounds(self, action: torch.Tensor) -> None:
        # rows with an action entry outside a bounded action_spec (or NaN), counted on device
        outside = (action < self._action_low) | (action > self._action_high) | (action != action)
        self.num_out_of_bounds_actions.add_(outside.any(-1).sum())

    def _step(self, tensordict: TensorDictBase) -> TensorDictBase:
        obs = tensordict.get("observation")
        B = obs.shape[:-1]
        prev_term = tensordict.get("terminated", None)
        if prev_term is None:
            prev_term = torch.zeros(*B, 1, dtype=torch.bool, device=obs.device)
        with torch.no_grad():  # the kernel the fast loop uses (it runs without gradients)
            predictor = self.world_model.member_predictor(self.device) if self._is_dynamics_ensemble else None
        out = self._transition(
            self._context(predictor),
            obs,
            tensordict.get("action"),
            tensordict.get(_STEP_COUNT_KEY),
            tensordict.get(_MEMBER_KEY) if self.member_selection == "per_trajectory" else None,
            prev_term,
        )
        return TensorDict(out, batch_size=B, device=self.device)

    # ------------------------------------------------------------------ rollout
    def rollout(
        self,
        max_steps: int,
        policy: Callable[[TensorDictBase], TensorDictBase] | None = None,
        callback: Callable[..., Any] | None = None,
        **kwargs: Any,
    ) -> TensorDictBase:
        """TorchRL's :meth:`~torchrl.envs.EnvBase.rollout`, run as a tensor loop when possible.

        Same arguments and output as :meth:`torchrl.envs.EnvBase.rollout`. The fast loop (see
        the class docstring) is used when ``policy`` is a
        :class:`~tensordict.nn.TensorDictModuleBase` reading only state entries,
        ``break_when_any_done=False`` and the other options keep their defaults; it gives the
        same tensordict and consumes the same random numbers as the generic loop. With
        ``action_bounds="check"`` a ``ValueError`` is raised after the rollout if an action
        was outside ``action_spec``.

        Args:
            max_steps (int): number of steps.
            policy (callable, optional): the policy (``None``: random actions, generic loop).
            callback (callable, optional): see TorchRL (generic loop).

        Keyword Args:
            **kwargs: TorchRL's rollout keyword arguments.

        Returns:
            the ``[*batch_size, max_steps]`` rollout.

        Examples:
            >>> from torchrl_depeff.envs.model_env import EnsembleModelEnv
            >>> from tensordict import TensorDict
            >>> from tensordict.nn import TensorDictModule
            >>> from torchrl.data import Bounded, Unbounded
            >>> from torchrl_depeff.modules.ensemble import DynamicsEnsemble
            >>> model = DynamicsEnsemble(3, 2, num_members=4, num_cells=(16,), probabilistic=True)
            >>> env = EnsembleModelEnv(
            ...     model, observation_spec=Unbounded(3), action_spec=Bounded(-1.0, 1.0, (2,)),
            ...     reward_fn=lambda o, a, n: -n.pow(2).sum(-1, keepdim=True),
            ...     start_states=TensorDict({"observation": torch.randn(100, 3)}, [100]),
            ...     batch_size=8, member_selection="per_sample", uncertainty=())
            >>> policy = TensorDictModule(torch.nn.Linear(3, 2), in_keys=["observation"], out_keys=["action"])
            >>> _ = env.set_seed(0)
            >>> fast = env.rollout(4, policy, break_when_any_done=False)
            >>> env.fast_rollout = False
            >>> _ = env.set_seed(0)
            >>> generic = env.rollout(4, policy, break_when_any_done=False)
            >>> (fast == generic).all()
            True
        """
        before = self.num_out_of_bounds_actions.clone() if self.action_bounds == "check" else None
        if self._fast_rollout_ok(policy, callback, kwargs):
            out = self._fast_rollout(max_steps, policy, self.penalties, reset=self.reset)
        else:
            out = super().rollout(max_steps, policy, callback, **kwargs)
        if before is not None:
            self._raise_if_out_of_bounds(before, out)
        return out

    def _raise_if_out_of_bounds(self, before: torch.Tensor, rollout: TensorDictBase) -> None:
        count = int(self.num_out_of_bounds_actions - before)  # one host read per rollout
        if count:
            action = rollout.get("action").reshape(-1, self.world_model.action_dim).to(self._dtype)
            low, high = self._action_low.reshape(-1)[: action.shape[-1]], self._action_high.reshape(-1)[: action.shape[-1]]
            bad = ~((action >= low) & (action <= high)).all(-1)
            first = action[bad][0].tolist() if bool(bad.any()) else "n/a"
            raise ValueError(
                f"{count} rows of actions were outside action_spec bounds [{low.tolist()}, {high.tolist()}] "
                f"(or NaN) during this rollout (action_bounds='check'); the first: {first}"
            )

    def _fast_rollout_ok(self, policy: Any, callback: Any, kwargs: dict[str, Any]) -> bool:
        if not self.fast_rollout or callback is not None or policy is None:
            return False
        if kwargs.get("break_when_any_done", None) is not False:
            return False
        for key, value in kwargs.items():
            if key in ("break_when_any_done", "return_contiguous", "trust_policy"):
                continue
            if key not in _FAST_ROLLOUT_DEFAULTS:
                return False
            default = _FAST_ROLLOUT_DEFAULTS[key]
            if key == "break_when_all_done" and value is False:
                continue
            if value is not default and not (type(value) is bool and type(default) is bool and value == default):
                return False
        if not isinstance(self._start_states, torch.Tensor):
            return False
        cls = type(self)
        if cls._step is not EnsembleModelEnv._step or cls._reset is not EnsembleModelEnv._reset:
            return False
        if getattr(self, "_post_step_mdp_hooks", None) is not None:
            return False
        return self._policy_caller(policy) is not None

    def _state_keys(self) -> list[str]:
        keys = ["observation", _STEP_COUNT_KEY]
        if self.member_selection == "per_trajectory":
            keys.append(_MEMBER_KEY)
        return [*keys, *self._zero_state_keys(), *_DONE_KEYS]

    def _policy_caller(self, policy: Any) -> Callable[[dict], dict] | None:
        """``root entries -> written entries`` for the fast loop, or None if not exact."""
        if not isinstance(policy, TensorDictModuleBase):
            return None
        try:
            in_keys = [unravel_key(k) for k in policy.in_keys]
        except Exception:  # noqa: BLE001 - exotic modules: generic loop
            return None
        if not set(in_keys) <= set(self._state_keys()):
            return None
        if _plain_tdmodule(policy):
            module, out_keys = policy.module, [unravel_key(k) for k in policy.out_keys]

            def call(root: dict) -> dict:
                return _call_plain(module, [root[k] for k in in_keys], out_keys)

            return call
        sampler = _probabilistic_call(policy, in_keys)
        if sampler is not None:
            return sampler
        B, device = self.batch_size, self.device

        def call_td(root: dict) -> dict:
            td = TensorDict({k: root[k] for k in in_keys}, batch_size=B, device=device)
            out = policy(td)
            out = td if out is None else out
            return {k: out.get(k) for k in out.keys(True, True)}

        return call_td

    def _fast_rollout(
        self,
        max_steps: int,
        policy: TensorDictModuleBase,
        penalties: Sequence[Penalty],
        reset: Callable[[], TensorDictBase],
    ) -> TensorDictBase:
        """The rollout as a tensor loop; ``penalties`` are applied after the env's own."""
        if max_steps < 1:
            raise ValueError(f"max_steps must be >= 1, got {max_steps}")
        call = self._policy_caller(policy)
        extra = [p for p in penalties if p not in self.penalties]
        with torch.no_grad():
            predictor = self.world_model.member_predictor(self.device) if self._is_dynamics_ensemble else None
        return self._fast_loop(max_steps, call, extra, reset, predictor)

    def _fast_loop(
        self,
        max_steps: int,
        call: Callable[[dict], dict],
        extra: list[Penalty],
        reset: Callable[[], TensorDictBase],
        predictor: Any,
    ) -> TensorDictBase:
        B = self.batch_size
        td0 = reset()
        ctx = self._context(predictor)
        # entries that a reset sets to zero: uncertainties and the soft penalties' entries
        zero_keys = self._zero_state_keys() + [p.penalty_key for p in extra if isinstance(p, SoftUncertaintyPenalty)]
        state = {k: td0.get(k) for k in [*self._state_keys(), *zero_keys]}
        zeros_step = torch.zeros(*B, 1, dtype=torch.int64, device=self.device)
        per_trajectory = self.member_selection == "per_trajectory"
        false = torch.zeros(*B, 1, dtype=torch.bool, device=self.device)
        for key in _DONE_KEYS:
            state[key] = false  # always False at the root of a non-stopping rollout
        transition, pending = self._transition, self.__dict__
        where = torch.where
        roots: dict[Any, list[torch.Tensor]] = {}
        nexts: dict[Any, list[torch.Tensor]] = {}
        invalids: list[torch.Tensor] = []
        root_lists = next_lists = None
        member = None
        last = max_steps - 1
        for t in range(max_steps):
            root = {**state, **call(state)}
            if per_trajectory:
                member = root[_MEMBER_KEY]
            nxt = transition(ctx, root["observation"], root["action"], root[_STEP_COUNT_KEY], member, None, False)
            invalids.append(nxt.pop("_invalid"))
            for p in extra:
                u = nxt[p.uncertainty_key]
                if isinstance(p, SoftUncertaintyPenalty):
                    nxt["reward"], nxt[p.penalty_key] = p.apply(nxt["reward"], u)
                else:
                    nxt["reward"], nxt["terminated"], nxt["done"] = p.apply(
                        nxt["reward"], u, nxt["terminated"], nxt["done"]
                    )
            if root_lists is None:  # the keys of the first step (the same at every step)
                root_lists = [(k, roots.setdefault(k, [])) for k in root if k not in _DONE_KEYS]
                next_lists = [(k, nexts.setdefault(k, [])) for k in nxt]
            for k, lst in root_lists:
                lst.append(root[k])
            for k, lst in next_lists:
                lst.append(nxt[k])
            if t == last:
                break
            # step_mdp + automatic partial reset of the done rows, without host synchronisation
            # (TorchRL's loop resets only when a row is done; the values are the same)
            done = nxt["done"]
            start, _, new_member = pending["_pending_reset"]
            state = {
                "observation": where(done, start, nxt["observation"]),
                _STEP_COUNT_KEY: where(done, zeros_step, nxt[_STEP_COUNT_KEY]),
                "done": false,
                "terminated": false,
                "truncated": false,
            }
            if per_trajectory:
                state[_MEMBER_KEY] = where(done.reshape(B), new_member, nxt[_MEMBER_KEY])
            for k in zero_keys:
                state[k] = nxt[k].masked_fill(done, 0.0)
        dim = len(B)
        shape = torch.Size([*B, max_steps])
        source = {k: torch.stack(v, dim) for k, v in roots.items()}
        for key in _DONE_KEYS:
            source[key] = torch.zeros(*shape, 1, dtype=torch.bool, device=self.device)
        # the counters of the generic loop, once per rollout instead of once per step
        self.num_invalid.add_(torch.stack(invalids).sum())
        if self._action_low is not None:
            actions = source["action"]
            self._count_out_of_bounds(actions.to(self._dtype).movedim(dim, 0))
        source["next"] = TensorDict._new_unsafe(
            {k: torch.stack(v, dim) for k, v in nexts.items()}, batch_size=shape, device=self.device
        )
        out = TensorDict._new_unsafe(source, batch_size=shape, device=self.device)
        out.refine_names(..., "time")
        return out


def model_rollout(
    env: EnvBase,
    max_steps: int,
    policy: Callable[[TensorDictBase], TensorDictBase] | None = None,
    callback: Callable[..., Any] | None = None,
    **kwargs: Any,
) -> TensorDictBase:
    """``env.rollout(...)`` with the fast path also for penalty-wrapped model envs.

    For a :class:`~torchrl.envs.TransformedEnv` whose base env is an
    :class:`EnsembleModelEnv` and whose transforms are only
    :class:`~torchrl_depeff.envs.SoftUncertaintyPenalty` /
    :class:`~torchrl_depeff.envs.HardUncertaintyPenalty` (BREMEN App. E, MB2PO), runs the
    model env's fast loop with the penalties applied in the step; the result equals
    ``env.rollout(...)`` for the same seed. Any other env (or options the fast loop does not
    cover) is passed to ``env.rollout``.

    Args:
        env (EnvBase): the env.
        max_steps (int): number of steps.
        policy (callable, optional): the policy.
        callback (callable, optional): see TorchRL.

    Keyword Args:
        **kwargs: TorchRL's rollout keyword arguments.

    Returns:
        the rollout tensordict.

    Examples:
        >>> from torchrl_depeff.envs.model_env import EnsembleModelEnv, model_rollout
        >>> from torchrl_depeff.envs.penalties import SoftUncertaintyPenalty
        >>> from tensordict import TensorDict
        >>> from tensordict.nn import TensorDictModule
        >>> from torchrl.data import Bounded, Unbounded
        >>> from torchrl.envs import TransformedEnv
        >>> from torchrl_depeff.modules.ensemble import DynamicsEnsemble
        >>> model = DynamicsEnsemble(3, 2, num_members=4, num_cells=(16,), probabilistic=True)
        >>> base = EnsembleModelEnv(
        ...     model, observation_spec=Unbounded(3), action_spec=Bounded(-1.0, 1.0, (2,)),
        ...     reward_fn=lambda o, a, n: -n.pow(2).sum(-1, keepdim=True),
        ...     start_states=TensorDict({"observation": torch.randn(100, 3)}, [100]),
        ...     batch_size=8, member_selection="per_sample", uncertainty=("std_norm",))
        >>> env = TransformedEnv(base, SoftUncertaintyPenalty(0.1, "model_std_norm"))
        >>> policy = TensorDictModule(torch.nn.Linear(3, 2), in_keys=["observation"], out_keys=["action"])
        >>> _ = base.set_seed(0)
        >>> fast = model_rollout(env, 4, policy, break_when_any_done=False)
        >>> _ = base.set_seed(0)
        >>> (fast == env.rollout(4, policy, break_when_any_done=False)).all()
        True
    """
    base = env.base_env if type(env) is TransformedEnv else None
    if not isinstance(base, EnsembleModelEnv):
        return env.rollout(max_steps, policy, callback, **kwargs)
    before = base.num_out_of_bounds_actions.clone() if base.action_bounds == "check" else None
    penalties = _penalties_of(env.transform)
    if penalties is not None and base._fast_rollout_ok(policy, callback, kwargs):
        out = base._fast_rollout(max_steps, policy, [*base.penalties, *penalties], reset=env.reset)
    else:
        out = env.rollout(max_steps, policy, callback, **kwargs)
    if before is not None:
        base._raise_if_out_of_bounds(before, out)
    return out
