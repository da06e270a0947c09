"""Analysis metrics of MUSBO's ablations (sec. 4-5, Table 1, Fig. 6), usable alone.

* :func:`novelty_score`: cosine score of a deployment's batch against all earlier data
  (MUSBO Table 1; lower = more novel).
* :func:`energy_distance`: energy distance between two samples, e.g. imaginary vs real
  trajectories (MUSBO Fig. 6, left).
* :func:`trajectory_mse`: per-step MSE of model rollouts that start from a real start state
  and replay the recorded actions (MUSBO Fig. 6, right).

:data:`METRIC_NAMES` holds the scalar names under which a deployment loop should log them
(:mod:`torchrl_depeff.metrics_plots` reads them back from CSVLogger directories).
"""
from __future__ import annotations

from typing import Callable, Union

import torch
from tensordict import TensorDictBase
from tensordict.utils import NestedKey
from torch.nn import functional as F

from torchrl_depeff.data.episodes import trajectory_windows

__all__ = [
    "deployment_analysis",
    "METRIC_NAMES",
    "novelty_score",
    "energy_distance",
    "trajectory_mse",
    "deployment_metrics",
]

METRIC_NAMES: dict[str, str] = {
    "novelty": "metrics/novelty",
    "energy_distance": "metrics/energy_distance",
    "trajectory_mse": "metrics/trajectory_mse",
}
"""Logger scalar names of the metrics (one value per deployment, step = deployment index)."""

_Data = Union[torch.Tensor, TensorDictBase]


def _as_matrix(data: _Data, key: NestedKey, name: str) -> torch.Tensor:
    if isinstance(data, TensorDictBase):
        value = data.get(key, default=None)
        if value is None:
            raise KeyError(f"{name}: key {key!r} not found (keys: {list(data.keys(True, True))})")
        data = value
    if not isinstance(data, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor or a TensorDict, got {type(data).__name__}")
    if data.dim() == 0:
        raise ValueError(f"{name} must have at least one dimension, got a scalar")
    if data.dim() == 1:
        data = data.unsqueeze(-1)  # 1-D samples
    data = data.reshape(-1, data.shape[-1])
    if data.shape[0] == 0:
        raise ValueError(f"{name} is empty (shape {tuple(data.shape)})")
    return data


def novelty_score(
    new_batch: _Data,
    previous_data: _Data,
    *,
    key: NestedKey = "observation",
    chunk_size: int = 4096,
) -> torch.Tensor:
    r"""Cosine score of a new batch against all previous data (MUSBO Table 1).

    MUSBO sec. 4: "for each state observation in the current batch :math:`B^{(i)}`, we measure the
    aggregated cosine score against each state observation in the previous aggregated batches,
    averaged over the number of transitions". Choice: the aggregation over previous states is the
    **maximum** cosine similarity (the nearest previous state in angle), so the score is

    .. math:: \frac{1}{|B^{(i)}|}\sum_{s\in B^{(i)}} \max_{s'\in B^{(1)}\cup\dots\cup B^{(i-1)}} \cos(s, s').

    It is 1 when every new state was already seen (identical batches) and decreases as the batch
    holds states unlike earlier ones; Table 1 reports 0.99-0.86. The mean cosine over all pairs
    would not be 1 for identical batches. A zero vector has cosine 0 with everything.

    Cost: ``|B^(i)| x |previous|`` dot products, computed in ``chunk_size`` x ``chunk_size``
    matrix-product blocks with a running max (memory ``O(chunk_size^2)``); subsample
    ``previous_data`` for very large buffers.

    Args:
        new_batch (torch.Tensor or TensorDict): ``[*N, d]`` states (or a TensorDict holding them
            under ``key``).
        previous_data (torch.Tensor or TensorDict): ``[*M, d]`` states of earlier deployments.

    Keyword Args:
        key (NestedKey): entry read from TensorDicts. Defaults to ``"observation"``.
        chunk_size (int): block size. Defaults to ``4096``.

    Returns:
        a scalar tensor in ``[-1, 1]``.

    Examples:
        >>> from torchrl_depeff.metrics import novelty_score
        >>> x = torch.randn(100, 5)
        >>> round(float(novelty_score(x, x)), 4)
        1.0
        >>> prev = torch.tensor([[0.0, 2.0], [1.0, 1.0]])
        >>> round(float(novelty_score(torch.tensor([[1.0, 0.0]]), prev)), 4)  # nearest: cos 45 deg
        0.7071
    """
    if not isinstance(chunk_size, int) or chunk_size < 1:
        raise ValueError(f"chunk_size must be a positive int, got {chunk_size!r}")
    new = _as_matrix(new_batch, key, "new_batch")
    prev = _as_matrix(previous_data, key, "previous_data")
    if new.shape[-1] != prev.shape[-1]:
        raise ValueError(
            f"new_batch has {new.shape[-1]} features but previous_data has {prev.shape[-1]}"
        )
    new = F.normalize(new.to(prev.dtype), dim=-1)
    prev = F.normalize(prev, dim=-1)
    best = []
    for new_chunk in new.split(chunk_size):
        running = new_chunk.new_full((new_chunk.shape[0],), -2.0)
        for prev_chunk in prev.split(chunk_size):
            running = torch.maximum(running, (new_chunk @ prev_chunk.T).amax(-1))
        best.append(running)
    return torch.cat(best).clamp(-1.0, 1.0).mean()


def _mean_pairwise_distance(x: torch.Tensor, y: torch.Tensor, chunk_size: int) -> torch.Tensor:
    total = x.new_zeros(())
    for x_chunk in x.split(chunk_size):
        for y_chunk in y.split(chunk_size):
            total = total + torch.cdist(x_chunk, y_chunk).sum()
    return total / (x.shape[0] * y.shape[0])


def energy_distance(
    x: _Data,
    y: _Data,
    *,
    squared: bool = False,
    key: NestedKey = "observation",
    chunk_size: int = 4096,
) -> torch.Tensor:
    r"""Energy distance between the samples ``x`` and ``y`` (MUSBO Fig. 6, left).

    .. math:: D^2 = 2\,\mathbb E\lVert X - Y\rVert - \mathbb E\lVert X - X'\rVert - \mathbb E\lVert Y - Y'\rVert

    with Euclidean norms. Choice: the **V-statistic** (every pair, including ``i = j``, divided by
    ``n^2``): it is the energy distance of the two empirical distributions, hence always
    ``>= 0`` and exactly 0 for identical samples (the unbiased U-statistic, which drops
    ``i = j``, is negative for identical samples). Like :func:`scipy.stats.energy_distance` the
    square root ``D`` is returned unless ``squared=True``; for 1-D samples the two agree.
    Computed in float64 with blocked :func:`torch.cdist` (memory ``O(chunk_size^2)``).

    Rows are samples: ``[N, d]`` (``[N]`` for scalars); extra leading dims are flattened into
    samples, so a rollout ``[N, T, d]`` compares the state distributions. To compare whole
    trajectories as points, pass ``[N, T * d]``.

    Args:
        x (torch.Tensor or TensorDict): first sample ``[*N, d]`` (TensorDict: read at ``key``).
        y (torch.Tensor or TensorDict): second sample ``[*M, d]``.

    Keyword Args:
        squared (bool): return ``D^2`` instead of ``D``. Defaults to ``False``.
        key (NestedKey): entry read from TensorDicts. Defaults to ``"observation"``.
        chunk_size (int): block size of the distance matrices. Defaults to ``4096``.

    Returns:
        a float64 scalar tensor.

    Examples:
        >>> from torchrl_depeff.metrics import energy_distance
        >>> x = torch.randn(50, 3)
        >>> float(energy_distance(x, x))
        0.0
        >>> # 1-D: 2*E|X-Y| - E|X-X'| - E|Y-Y'| = 2*1 - 0 - 0 for points 0 and 1
        >>> float(energy_distance(torch.tensor([0.0]), torch.tensor([1.0]), squared=True))
        2.0
    """
    if not isinstance(chunk_size, int) or chunk_size < 1:
        raise ValueError(f"chunk_size must be a positive int, got {chunk_size!r}")
    xs = _as_matrix(x, key, "x").to(torch.float64)
    ys = _as_matrix(y, key, "y").to(torch.float64)
    if xs.shape[-1] != ys.shape[-1]:
        raise ValueError(f"x has {xs.shape[-1]} features but y has {ys.shape[-1]}")
    exy = _mean_pairwise_distance(xs, ys, chunk_size)
    exx = _mean_pairwise_distance(xs, xs, chunk_size)
    eyy = _mean_pairwise_distance(ys, ys, chunk_size)
    d2 = (2.0 * exy - exx - eyy).clamp_min(0.0)  # rounding can give -1e-16
    return d2 if squared else d2.sqrt()


def _model_step_fn(
    model: object, member: str | int
) -> Callable[[torch.Tensor, torch.Tensor], torch.Tensor]:
    ensemble = getattr(model, "world_model", model)  # EnsembleModelEnv holds the ensemble
    if hasattr(ensemble, "predict") and hasattr(ensemble, "num_members"):
        num_members = int(ensemble.num_members)
        if member != "mean" and not (isinstance(member, int) and 0 <= member < num_members):
            raise ValueError(
                f"member must be 'mean' or an int in [0, {num_members}), got {member!r}"
            )

        def step(obs: torch.Tensor, act: torch.Tensor) -> torch.Tensor:
            loc = ensemble.predict(obs, act).loc  # [E, *B, d]
            return loc.mean(0) if member == "mean" else loc[member]

        return step
    if callable(model):
        return model  # (obs, action) -> next obs
    raise TypeError(
        f"model must be a DynamicsEnsemble, an EnsembleModelEnv or a callable (obs, action) -> "
        f"next_obs, got {type(model).__name__}"
    )


@torch.no_grad()
def trajectory_mse(
    model: object,
    real_trajectories: TensorDictBase,
    *,
    member: str | int = "mean",
) -> torch.Tensor:
    r"""Per-step MSE of open-loop model rollouts against real trajectories (MUSBO Fig. 6, right).

    From the real start state ``s_0`` of every trajectory, the model is stepped with the
    *recorded* actions, ``s_hat_{t+1} = f(s_hat_t, a_t)`` (its own predictions fed back), and
    compared with the real ``s_{t+1}``:
    ``mse[t] = mean over trajectories and state dims of (s_hat_{t+1} - s_{t+1})^2``.

    Choices: the prediction is deterministic, the mean of the members' means
    (``member="mean"``) or one member's mean (``member=k``), so the metric measures model error
    and not sampling noise. Steps after a real episode ended (``("next", "done")`` earlier in the
    row) are excluded: the state that follows belongs to a new episode. A step with no valid
    trajectory is NaN. Each step is one batched call over all trajectories (the time loop is
    inherent to a rollout).

    Args:
        model: a :class:`~torchrl_depeff.modules.DynamicsEnsemble`, an
            :class:`~torchrl_depeff.envs.EnsembleModelEnv` (its ``world_model`` is used) or a
            callable ``(observation, action) -> next_observation``.
        real_trajectories (TensorDictBase): ``[N, T]`` (or ``[T]``) with ``"observation"``,
            ``"action"``, ``("next", "observation")`` and optionally ``("next", "done")``.

    Keyword Args:
        member (str or int): ``"mean"`` or a member index. Defaults to ``"mean"``.

    Returns:
        ``[T]`` per-step MSE (float).

    Examples:
        >>> from tensordict import TensorDict
        >>> from torchrl_depeff.metrics import trajectory_mse
        >>> obs0, actions = torch.zeros(4, 1, 2), torch.ones(4, 3, 2)
        >>> real_obs = obs0 + actions.cumsum(1)  # s_{t+1} = s_t + a_t
        >>> traj = TensorDict({"observation": torch.cat([obs0, real_obs[:, :-1]], 1),
        ...                    "action": actions, ("next", "observation"): real_obs}, [4, 3])
        >>> trajectory_mse(lambda s, a: s + a, traj)  # a perfect model
        tensor([0., 0., 0.])
        >>> trajectory_mse(lambda s, a: s + 2 * a, traj)  # error grows by 1 per step and dim
        tensor([1., 4., 9.])
    """
    pred, real, valid = _open_loop(model, real_trajectories, member)
    err = (pred - real).pow(2).mean(-1).to(torch.float32)  # [N, T]
    count = valid.sum(0)
    total = torch.where(valid, err, torch.zeros_like(err)).sum(0)
    return torch.where(count > 0, total / count.clamp_min(1), torch.full_like(total, float("nan")))


def _open_loop(
    model: object, real_trajectories: TensorDictBase, member: str | int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Predicted and real next states ``[N, T, d]`` and the validity mask ``[N, T]``."""
    if not isinstance(real_trajectories, TensorDictBase):
        raise TypeError(
            f"real_trajectories must be a TensorDict, got {type(real_trajectories).__name__}"
        )
    td = real_trajectories
    if td.batch_dims == 1:
        td = td.unsqueeze(0)
    if td.batch_dims != 2:
        raise ValueError(
            "real_trajectories must have batch [N, T] or [T], got "
            f"{tuple(real_trajectories.batch_size)}"
        )
    step = _model_step_fn(model, member)
    keys = ("observation", "action", ("next", "observation"))
    for k in keys:
        if k not in td.keys(include_nested=True):
            raise KeyError(f"trajectory metrics: key {k!r} not found in real_trajectories")
    obs, actions, next_obs = (td.get(k) for k in keys)
    done = td.get(("next", "done"), None)
    N, T = td.batch_size
    if done is None:
        valid = torch.ones(N, T, dtype=torch.bool, device=obs.device)
    else:
        done = done.reshape(N, T).to(torch.bool)
        # valid at t iff no episode end strictly before t
        ended_before = torch.cat([done.new_zeros(N, 1), done[:, :-1]], 1).cumsum(1) > 0
        valid = ~ended_before
    state = obs[:, 0]
    preds = []
    with torch.no_grad():
        for t in range(T):
            state = step(state, actions[:, t])  # open loop: the model's own state is fed back
            preds.append(state)
    return torch.stack(preds, 1), next_obs, valid


def deployment_metrics(
    *,
    new_batch: _Data | None = None,
    previous_data: _Data | None = None,
    model: object | None = None,
    real_trajectories: TensorDictBase | None = None,
    member: str | int = "mean",
    logger: object | None = None,
    step: int | None = None,
) -> dict[str, float]:
    """Compute (and optionally log) one deployment's metrics; each is skipped without its inputs.

    * ``"novelty"``: :func:`novelty_score` of ``new_batch`` against ``previous_data``;
    * ``"energy_distance"``: :func:`energy_distance` between the states of open-loop model
      rollouts (start state and actions of ``real_trajectories``, as in :func:`trajectory_mse`)
      and the real next states, steps after an episode end excluded. Choice: the paper's
      "fictitious rollouts" of Fig. 6 are generated this way so that both sets share start states
      and actions and only the model differs;
    * ``"trajectory_mse"``: mean over steps of :func:`trajectory_mse`.

    Values are logged under :data:`METRIC_NAMES` with ``logger.log_scalar(name, value, step=step)``.

    Keyword Args:
        new_batch, previous_data: states of this deployment and of the earlier ones.
        model: dynamics model (see :func:`trajectory_mse`).
        real_trajectories (TensorDictBase): ``[N, T]`` real rollouts.
        member (str or int): model member used for the rollouts. Defaults to ``"mean"``.
        logger (torchrl Logger, optional): receives the scalars.
        step (int, optional): logging step, e.g. the deployment index.

    Returns:
        dict of the computed metric values (floats).

    Examples:
        >>> from tensordict import TensorDict
        >>> from torchrl_depeff.metrics import deployment_metrics
        >>> obs = torch.randn(3, 1, 2).expand(3, 5, 2)  # a system that stays where it is
        >>> traj = TensorDict({"observation": obs, "action": torch.zeros(3, 5, 2),
        ...                    ("next", "observation"): obs}, [3, 5])
        >>> out = deployment_metrics(new_batch=obs, previous_data=obs, model=lambda s, a: s,
        ...                          real_trajectories=traj)  # a perfect model
        >>> {k: round(v, 4) for k, v in out.items()}
        {'novelty': 1.0, 'energy_distance': 0.0, 'trajectory_mse': 0.0}
        >>> out = deployment_metrics(model=lambda s, a: s + 1, real_trajectories=traj)
        >>> round(out["trajectory_mse"], 4)  # errors 1, 4, 9, 16, 25 per dim
        11.0
    """
    out: dict[str, float] = {}
    if new_batch is not None and previous_data is not None:
        out["novelty"] = float(novelty_score(new_batch, previous_data))
    if model is not None and real_trajectories is not None:
        pred, real, valid = _open_loop(model, real_trajectories, member)
        if bool(valid.any()):
            out["energy_distance"] = float(energy_distance(pred[valid], real[valid]))
        mse = trajectory_mse(model, real_trajectories, member=member)
        out["trajectory_mse"] = float(mse.nanmean())
    if logger is not None:
        for name, value in out.items():
            logger.log_scalar(METRIC_NAMES[name], value, step=step)
    return out


def deployment_analysis(
    buffers: object,
    model: object,
    *,
    seed: int = 0,
    max_states: int = 2000,
    num_trajectories: int = 32,
    horizon: int = 50,
) -> dict[str, float]:
    """MUSBO sec. 5 analysis of the latest deployment of a run's buffers, for any algorithm.

    * ``metrics/novelty`` (Table 1): :func:`novelty_score` of up to ``max_states`` random states
      of the latest batch against up to ``max_states`` random states of all earlier batches
      (absent for the first deployment);
    * ``metrics/energy_distance`` and ``metrics/trajectory_mse`` (Fig. 6): open-loop rollouts of
      ``model``'s mean from the start state of ``num_trajectories`` real windows of ``horizon``
      steps of the latest batch, replaying the recorded actions.

    Args:
        buffers (DeploymentReplayBuffers): the run's data (at least one deployment).
        model (DynamicsEnsemble): the dynamics model.

    Keyword Args:
        seed (int): seed of the random state / window draws (``seed + 101 * (k + 1)``).
        max_states (int): states per side for the novelty score. Defaults to 2000.
        num_trajectories (int): real windows. Defaults to 32.
        horizon (int): steps per window. Defaults to 50.

    Examples:
        >>> import tempfile
        >>> from torchrl_depeff.algorithms import BREMEN, BREMENConfig
        >>> from torchrl_depeff.metrics import deployment_analysis
        >>> algo = BREMEN(BREMENConfig.tiny(), data_root=tempfile.mkdtemp())
        >>> _ = algo.deployment_step()
        >>> sorted(deployment_analysis(algo.buffers, algo.ensemble, horizon=5, num_trajectories=4))
        ['metrics/energy_distance', 'metrics/trajectory_mse']
    """
    k = buffers.num_deployments - 1
    if k < 0:
        raise ValueError("deployment_analysis needs at least one deployment in the buffers")
    g = torch.Generator().manual_seed(seed + 101 * (k + 1))
    latest = buffers.as_tensordict("latest").reshape(-1)
    d = latest.get("observation").shape[-1]
    device = next(model.parameters()).device
    previous = new = None
    if k >= 1:
        earlier = torch.cat([buffers.as_tensordict(i)["observation"].reshape(-1, d) for i in range(k)])
        previous = earlier[torch.randperm(earlier.shape[0], generator=g)[:max_states]].to(device)
        new = latest["observation"][torch.randperm(latest.shape[0], generator=g)[:max_states]].to(device)
    windows = trajectory_windows(latest, horizon, num_trajectories, g)
    values = deployment_metrics(
        new_batch=new, previous_data=previous, model=model,
        real_trajectories=windows.to(device) if windows is not None else None,
    )
    return {f"metrics/{name}": value for name, value in values.items()}
