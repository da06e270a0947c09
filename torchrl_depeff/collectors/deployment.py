"""Collect one deployment with a frozen copy of the policy (BREMEN Alg. 1, lines 3-4).

A *deployment* (BREMEN Sec. 3) is one fixed data-collection policy run in the real environment for
``B`` transitions (App. F.2). The deployed policy must stay fixed while the learner keeps training,
so collection always runs a frozen deep copy (:func:`freeze_policy`), identified by a sha256 of its
weights (:func:`policy_hash`).

Choice: :func:`collect_deployment` returns ``(data, info)``: ``data`` is a plain TensorDict of
exactly ``num_transitions`` rows (``[B]``, batch dims flattened) and ``info`` a JSON-serialisable
dict (``policy_hash`` of the frozen policy, exploration module excluded, ``deployment``,
``policy_version``, ``num_transitions``, ``exploration``, ``collector``, ``num_workers``,
``attempts``, ``seconds``, ``transitions_per_s``) that is meant to be passed as ``metadata`` to
:meth:`~torchrl_depeff.data.deployments.DeploymentReplayBuffers.add_deployment`. Non-tensor
metadata inside the TensorDict would not survive the memory-mapped storage cleanly.

Data checks: nothing non-finite or far out of range is handed out as a deployment. Before
returning, :func:`collect_deployment` checks every floating-point entry for NaN/inf and the actions
against the env's bounds (:func:`validate_deployment_data`), and raises a ``ValueError`` naming the
deployment, the key, the count and the first bad value. Choice (tolerance): BREMEN deploys
``tanh(mu) + N(0, 0.1^2)`` unclipped (App. F.1, the env clips), which legitimately leaves
``[-1, 1]`` by a few tenths; an action is refused only beyond ``action_tolerance`` times the bound
range outside the bounds (default ``3.0``: outside ``[-7, 7]`` for ``[-1, 1]``). BREMEN's noise
never gets there, nor in practice does an unsquashed Gaussian policy of unit std (TorchRL's usual
initial scale: at least 6 standard deviations from a mean inside the bounds, about one value in
10^9), while a policy whose output is off in scale (e.g. ``10.0``) is refused. Any stochastic
policy can be collected unchecked with ``action_tolerance=None``; NaN/inf are always refused.

Scale-out (issue 8): the same call collects in-process from a batched env (``"single"``, e.g.
:func:`~torchrl_depeff.envs.vector.make_vector_env`), in worker processes (``"multisync"``) or on
Ray actors (``"ray"``, local or a cluster via ``ray_address``), selected by config only.
"""
from __future__ import annotations

import copy
import hashlib
import time
from typing import Callable, Literal

import torch
from tensordict import TensorDictBase
from tensordict.nn import TensorDictModuleBase, TensorDictSequential
from torch import nn
from torchrl.collectors import Collector, MultiSyncCollector
from torchrl._utils import logger as torchrl_logger
from torchrl.envs import EnvBase
from torchrl.envs.utils import ExplorationType

__all__ = [
    "ACTION_TOLERANCE",
    "BACKENDS",
    "DeploymentCollectionError",
    "DeploymentCollector",
    "action_bounds",
    "collect_deployment",
    "freeze_policy",
    "policy_hash",
    "validate_deployment_data",
]

#: default ``action_tolerance`` of :func:`collect_deployment`: fraction of the bound range
#: ``high - low`` by which a collected action may lie outside the env's bounds
ACTION_TOLERANCE: float = 3.0


def freeze_policy(policy: nn.Module) -> nn.Module:
    """Deep copy of ``policy`` with ``requires_grad=False`` everywhere, in eval mode.

    Args:
        policy (nn.Module): the learner's policy (left untouched).

    Examples:
        >>> from torchrl_depeff.collectors.deployment import freeze_policy
        >>> net = torch.nn.Linear(2, 1)
        >>> frozen = freeze_policy(net)
        >>> frozen is net, frozen.training, any(p.requires_grad for p in frozen.parameters())
        (False, False, False)
        >>> _ = net.weight.data.add_(1.0)
        >>> bool(torch.equal(frozen.weight, net.weight))
        False
    """
    if not isinstance(policy, nn.Module):
        raise TypeError(f"policy must be an nn.Module, got {type(policy).__name__}")
    frozen = copy.deepcopy(policy)
    frozen.requires_grad_(False)
    frozen.eval()
    return frozen


def policy_hash(policy: nn.Module) -> str:
    """sha256 (hex) over every parameter and buffer: name, dtype, shape and bytes, sorted by name.

    Args:
        policy (nn.Module): module to fingerprint.

    Examples:
        >>> from torchrl_depeff.collectors.deployment import freeze_policy, policy_hash
        >>> _ = torch.manual_seed(0); a = torch.nn.Linear(2, 1)
        >>> b = freeze_policy(a)
        >>> policy_hash(a) == policy_hash(b), len(policy_hash(a))
        (True, 64)
        >>> _ = b.bias.add_(1e-3)
        >>> policy_hash(a) == policy_hash(b)
        False
    """
    if not isinstance(policy, nn.Module):
        raise TypeError(f"policy must be an nn.Module, got {type(policy).__name__}")
    h = hashlib.sha256()
    for name, tensor in sorted(policy.state_dict(keep_vars=False).items()):
        if not isinstance(tensor, torch.Tensor):
            continue
        t = tensor.detach().to("cpu").contiguous()
        h.update(f"{name}|{t.dtype}|{tuple(t.shape)}|".encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def action_bounds(env: EnvBase | Callable[[], EnvBase]) -> tuple[torch.Tensor, torch.Tensor] | None:
    """Per-dimension ``(low, high)`` of an env's ``"action"`` spec, or ``None`` if unknown or unbounded.

    A batched env's ``[*batch, act_dim]`` bounds are reduced to ``[act_dim]`` (widest over the
    batch). An env factory gives ``None`` (it is not built just to read its spec).

    Examples:
        >>> from torchrl.envs import GymEnv
        >>> from torchrl_depeff.collectors.deployment import action_bounds
        >>> action_bounds(GymEnv("Pendulum-v1"))
        (tensor([-2.]), tensor([2.]))
    """
    if not isinstance(env, EnvBase):
        return None
    spec = env.full_action_spec.get("action", None) if "action" in env.full_action_spec.keys() else None
    space = getattr(spec, "space", None)
    low, high = getattr(space, "low", None), getattr(space, "high", None)
    if not isinstance(low, torch.Tensor) or not isinstance(high, torch.Tensor) or low.ndim == 0:
        return None
    low = low.detach().to("cpu", torch.float32).reshape(-1, low.shape[-1]).amin(0)
    high = high.detach().to("cpu", torch.float32).reshape(-1, high.shape[-1]).amax(0)
    if not bool(torch.isfinite(low).all() and torch.isfinite(high).all()):
        return None
    return low, high


def _first_bad(value: torch.Tensor, bad: torch.Tensor) -> tuple[int, float, int]:
    """``(count, first bad value, its row)`` of a boolean mask over ``value`` (rows first)."""
    flat = bad.reshape(bad.shape[0], -1)
    rows = flat.any(-1)
    row = int(rows.nonzero()[0, 0])
    col = int(flat[row].nonzero()[0, 0])
    return int(bad.sum()), float(value.reshape(value.shape[0], -1)[row, col]), row


def validate_deployment_data(
    data: TensorDictBase,
    *,
    deployment: int,
    bounds: tuple[torch.Tensor, torch.Tensor] | None = None,
    action_tolerance: float | None = ACTION_TOLERANCE,
    action_key: str = "action",
) -> None:
    """Refuse collected transitions holding NaN/inf, or actions far outside the env's bounds.

    Vectorised: one ``isfinite`` reduction per floating-point entry and one bound comparison on
    the actions.

    Args:
        data (TensorDictBase): collected rows ``[B]``.

    Keyword Args:
        deployment (int): deployment index, for the message.
        bounds (tuple[Tensor, Tensor], optional): per-dimension action ``(low, high)``; ``None``
            skips the bound check.
        action_tolerance (float, optional): an action is refused when it lies more than
            ``action_tolerance * (high - low)`` outside ``[low, high]``; ``None`` skips the bound
            check. Defaults to :data:`ACTION_TOLERANCE`.
        action_key (str): the action entry. Defaults to ``"action"``.

    Raises:
        ValueError: names the deployment, the key, the number of bad values and the first one.

    Examples:
        >>> from tensordict import TensorDict
        >>> from torchrl_depeff.collectors.deployment import validate_deployment_data
        >>> td = TensorDict({"action": torch.tensor([[0.5], [1.2], [10.0]])}, [3])
        >>> bounds = (torch.tensor([-1.0]), torch.tensor([1.0]))
        >>> validate_deployment_data(td[:2], deployment=0, bounds=bounds)  # 1.2: within tolerance
        >>> validate_deployment_data(td, deployment=3, bounds=bounds)
        Traceback (most recent call last):
            ...
        ValueError: deployment 3: 1 action value(s) outside the env's bounds [-1, 1] by more than the tolerance 3 x (high - low) (first: 10.0 in row 2); the deployment is not stored. Check the policy's output scale, or pass action_tolerance=None to collect anyway
    """
    for key, value in data.items(include_nested=True, leaves_only=True):
        if isinstance(value, torch.Tensor) and value.is_floating_point() and value.numel():
            finite = torch.isfinite(value)
            if not bool(finite.all()):
                count, first, row = _first_bad(value, ~finite.reshape(value.shape[0], -1))
                name = key if isinstance(key, str) else "/".join(key)
                raise ValueError(
                    f"deployment {deployment}: {count} non-finite value(s) in key {name!r} (first: {first} in "
                    f"row {row}); the deployment is not stored. A NaN/inf policy output or observation "
                    "means a diverged policy or a broken env: check the policy's weights and inputs"
                )
    if bounds is None or action_tolerance is None or action_key not in data.keys():
        return
    if float(action_tolerance) < 0:
        raise ValueError(f"action_tolerance must be >= 0 or None, got {action_tolerance!r}")
    action = data.get(action_key)
    low, high = (b.to(action.device, action.dtype) for b in bounds)
    if action.shape[-1:] != low.shape[-1:]:
        raise ValueError(
            f"deployment {deployment}: action of shape {list(action.shape[1:])} does not match the env's "
            f"action bounds of shape {list(low.shape)}"
        )
    margin = float(action_tolerance) * (high - low)
    outside = (action < low - margin) | (action > high + margin)
    if bool(outside.any()):
        count, first, row = _first_bad(action, outside)
        lo = low.tolist() if low.numel() > 1 and not bool((low == low[0]).all()) else f"{float(low[0]):g}"
        hi = high.tolist() if high.numel() > 1 and not bool((high == high[0]).all()) else f"{float(high[0]):g}"
        raise ValueError(
            f"deployment {deployment}: {count} action value(s) outside the env's bounds [{lo}, {hi}] by more "
            f"than the tolerance {float(action_tolerance):g} x (high - low) (first: {first} in row {row}); the "
            "deployment is not stored. Check the policy's output scale, or pass action_tolerance=None to "
            "collect anyway"
        )


def _deployed(policy: nn.Module, exploration: nn.Module | None) -> tuple[nn.Module, nn.Module]:
    frozen = freeze_policy(policy)
    if exploration is None:
        return frozen, frozen
    if not isinstance(exploration, TensorDictModuleBase):
        raise TypeError(
            f"exploration must be a TensorDictModuleBase, got {type(exploration).__name__}"
        )
    return frozen, TensorDictSequential(frozen, freeze_policy(exploration))


#: accepted ``collector`` (backend) names of :func:`collect_deployment`
BACKENDS: tuple[str, ...] = ("single", "multisync", "ray")

_RAY_PROBE_TIMEOUT_S = 5.0


class DeploymentCollectionError(RuntimeError):
    """A deployment could not be collected (a worker died or failed); nothing was returned.

    Raised by :func:`collect_deployment` for the ``"multisync"`` and ``"ray"`` backends once
    ``max_retries`` restarts are used up. The original error is chained (``__cause__``).

    Examples:
        >>> from torchrl_depeff.collectors.deployment import DeploymentCollectionError
        >>> issubclass(DeploymentCollectionError, RuntimeError)
        True
    """


def _check_ray_address(address: str, timeout: float = _RAY_PROBE_TIMEOUT_S) -> None:
    """Fails fast (``ConnectionError``) if ``host:port`` / ``ray://host:port`` is unreachable."""
    import socket

    if address in ("auto", "local"):
        return
    hostport = address.split("://", 1)[1] if "://" in address else address
    hostport = hostport.split("/", 1)[0]
    host, sep, port = hostport.rpartition(":")
    if not sep or not host or not port.isdigit():
        raise ValueError(
            f"ray_address must be 'auto', 'local', 'host:port' or 'ray://host:port', got {address!r}"
        )
    try:
        with socket.create_connection((host.strip("[]"), int(port)), timeout=timeout):
            pass
    except OSError as err:
        raise ConnectionError(
            f"cannot reach the Ray cluster at ray_address={address!r} ({type(err).__name__}: {err}); "
            "start it with `ray start --head` or fix the address"
        ) from err


def _ensure_ray(ray_address: str | None, ray_init_config: dict | None) -> None:
    """Connects to (or starts) Ray once per process, so that it outlives each deployment."""
    try:
        import ray
    except ImportError as err:
        raise ImportError(
            "collector='ray' needs ray (pip install 'ray>=2.40'); it is not installed"
        ) from err
    if ray.is_initialized():
        return
    config = dict(ray_init_config or {})
    if ray_address is not None:
        _check_ray_address(ray_address)
        config["address"] = ray_address
    config.setdefault("include_dashboard", False)
    config.setdefault("log_to_driver", False)
    try:
        ray.init(**config)
    except ConnectionError as err:
        raise ConnectionError(f"cannot connect to Ray at ray_address={ray_address!r}: {err}") from err


def _frames_per_batch(
    frames_per_batch: int | None, num_transitions: int, multiple: int
) -> int:
    fpb = int(frames_per_batch) if frames_per_batch is not None else min(num_transitions, 1000)
    if fpb < 1:
        raise ValueError(f"frames_per_batch must be >= 1, got {frames_per_batch}")
    # Every batch is a whole number of steps of every env (or worker): round up.
    return -(-fpb // multiple) * multiple


def _make_collector(
    deployed: nn.Module,
    env: EnvBase | Callable[[], EnvBase],
    num_transitions: int,
    *,
    collector: str,
    num_workers: int,
    frames_per_batch: int | None,
    exploration_type: ExplorationType,
    seed: int | None,
    ray_remote_config: dict | None,
):
    common = dict(exploration_type=exploration_type, auto_register_policy_transforms=False)
    if collector == "single":
        if not isinstance(env, EnvBase):
            env = env()
        fpb = _frames_per_batch(frames_per_batch, num_transitions, env.batch_size.numel())
        if seed is not None:
            env.set_seed(int(seed))  # before the collector's first reset
        coll = Collector(env, deployed, frames_per_batch=fpb, total_frames=-1, **common)
        if seed is not None:
            coll.set_seed(int(seed))
            coll.reset()  # restart every env from the seeded state
        return coll
    fpb = _frames_per_batch(frames_per_batch, num_transitions, num_workers)
    if collector == "multisync":
        coll = MultiSyncCollector(
            [env] * num_workers, deployed, cat_results=0, frames_per_batch=fpb, total_frames=-1, **common
        )
        if seed is not None:
            coll.set_seed(int(seed))
            coll.reset()
        # the frozen weights, shipped once at deployment start (issue 8); never updated after
        coll.update_policy_weights_(deployed)
        return coll
    # collector == "ray" (Ray already initialised by _run_collection)
    from torchrl.collectors.distributed import RayCollector

    remote = {"num_cpus": 1} if ray_remote_config is None else dict(ray_remote_config)
    coll = RayCollector(
        [env] * num_workers,
        deployed,
        frames_per_batch=fpb,
        total_frames=2**62,  # effectively unbounded: we stop after B transitions
        sync=True,
        exploration_type=exploration_type,
        collector_kwargs={"auto_register_policy_transforms": False},
        remote_configs=remote,
    )
    if seed is not None:
        coll.set_seed(int(seed))
    coll.update_policy_weights_(deployed)  # shipped once per deployment (issue 8)
    return coll


def _shutdown(coll, collector: str) -> None:
    try:
        if collector == "ray":
            coll.shutdown(shutdown_ray=False)
        else:
            coll.shutdown()
    except Exception as err:  # a dead worker can make shutdown fail too; the real error is raised
        torchrl_logger.warning(f"collector shutdown after a failure raised {type(err).__name__}: {err}")


def _gather(coll, num_transitions: int, bar) -> TensorDictBase:
    parts, collected = [], 0
    for batch in coll:
        batch = batch.reshape(-1)
        parts.append(batch.clone())
        if bar is not None:
            bar.update(min(batch.shape[0], num_transitions - collected))
        collected += batch.shape[0]
        if collected >= num_transitions:
            break
    if collected < num_transitions:
        raise RuntimeError(f"the collector stopped after {collected} of {num_transitions} transitions")
    return torch.cat(parts, 0)[:num_transitions]


def _run_collection(
    deployed: nn.Module,
    env: EnvBase | Callable[[], EnvBase],
    num_transitions: int,
    *,
    collector: str,
    num_workers: int,
    frames_per_batch: int | None,
    exploration_type: ExplorationType,
    progress: bool,
    seed: int | None,
    deployment: int,
    max_retries: int,
    ray_address: str | None,
    ray_init_config: dict | None,
    ray_remote_config: dict | None,
) -> tuple[TensorDictBase, int]:
    """Returns exactly ``num_transitions`` rows and the number of attempts, or raises."""
    if collector not in BACKENDS:
        raise ValueError(f"collector must be one of {list(BACKENDS)}, got {collector!r}")
    if collector == "single":
        if not isinstance(env, EnvBase) and not callable(env):
            raise TypeError(f"env must be an EnvBase or an env factory, got {type(env).__name__}")
    elif isinstance(env, EnvBase) or not callable(env):
        raise TypeError(
            f"collector={collector!r} needs env to be a picklable zero-argument env factory (e.g. "
            f"torchrl.envs.EnvCreator or functools.partial(make_vector_env, ...)), got {type(env).__name__}"
        )
    if collector == "ray":
        _ensure_ray(ray_address, ray_init_config)  # config errors are raised, not retried
    bar = None
    if progress:
        import tqdm

        bar = tqdm.tqdm(total=num_transitions, desc=f"deployment {deployment}", unit="transition")
    attempts = 0
    try:
        while True:
            attempts += 1
            coll = None
            try:
                coll = _make_collector(
                    deployed,
                    env,
                    num_transitions,
                    collector=collector,
                    num_workers=num_workers,
                    frames_per_batch=frames_per_batch,
                    exploration_type=exploration_type,
                    seed=seed,
                    ray_remote_config=ray_remote_config,
                )
                return _gather(coll, num_transitions, bar), attempts
            except Exception as err:
                if collector == "single":
                    raise  # in-process: the env's / policy's own error, nothing to restart
                if attempts > max_retries:
                    raise DeploymentCollectionError(
                        f"deployment {deployment}: collector={collector!r} with {num_workers} worker(s) "
                        f"failed after {attempts} attempt(s) ({type(err).__name__}: {err}); "
                        "no partial deployment was returned"
                    ) from err
                torchrl_logger.warning(
                    f"deployment {deployment}: attempt {attempts} failed ({type(err).__name__}: {err}); "
                    "discarding its transitions and restarting the whole deployment"
                )
                if bar is not None:
                    bar.reset()
            finally:
                if coll is not None:
                    _shutdown(coll, collector)
    finally:
        if bar is not None:
            bar.close()


def collect_deployment(
    policy: nn.Module,
    env: EnvBase | Callable[[], EnvBase],
    num_transitions: int,
    *,
    exploration: TensorDictModuleBase | None = None,
    deployment: int,
    policy_version: int,
    collector: Literal["single", "multisync", "ray"] = "single",
    num_workers: int = 1,
    frames_per_batch: int | None = None,
    exploration_type: ExplorationType = ExplorationType.RANDOM,
    progress: bool = False,
    seed: int | None = None,
    max_retries: int = 0,
    ray_address: str | None = None,
    ray_init_config: dict | None = None,
    ray_remote_config: dict | None = None,
    action_tolerance: float | None = ACTION_TOLERANCE,
    bounds: tuple[torch.Tensor, torch.Tensor] | None = None,
) -> tuple[TensorDictBase, dict]:
    """Collect exactly ``num_transitions`` real transitions with a frozen copy of ``policy``.

    The deployed module is ``freeze_policy(policy)`` followed by ``exploration`` (if given; e.g.
    BREMEN's stationary ``N(0, 0.1^2)`` noise on a deterministic mean). Backends (``collector``):

    * ``"single"`` (default): one in-process :class:`~torchrl.collectors.Collector`. Give it a
      batched env (e.g. :func:`~torchrl_depeff.envs.vector.make_vector_env`): one TorchRL step
      then advances ``n`` envs, which is what makes in-process collection fast.
    * ``"multisync"``: :class:`~torchrl.collectors.MultiSyncCollector`, ``num_workers`` processes.
    * ``"ray"``: TorchRL's :class:`~torchrl.collectors.distributed.RayCollector` with
      ``num_workers`` remote collectors (``sync=True``). Ray is initialised once per process if
      it is not already (``ray_address``, ``ray_init_config``; an unreachable address raises
      ``ConnectionError`` after a 5 s TCP probe instead of hanging) and left running afterwards.

    Every backend builds its collector from the frozen copy for this deployment only and ships
    its weights once, at deployment start (``update_policy_weights_``), never during collection:
    whatever the learner does meanwhile, every row comes from the same weights (BREMEN Alg. 1,
    line 4). Batches are rounded to whole env (worker) steps, ``[*env_batch, T]`` outputs are
    flattened, the surplus of the last batch dropped, so the row count is exactly
    ``num_transitions``. Rows get ``"deployment"`` and ``"policy_version"`` (int64 ``[B]``).

    Failures: the transitions are accumulated locally and returned only when all ``B`` are there,
    so a failure never yields a partial deployment. For ``"multisync"``/``"ray"`` a worker that
    dies or raises makes the whole deployment restart from scratch up to ``max_retries`` times,
    then :class:`DeploymentCollectionError` (a ``RuntimeError``) is raised. ``"single"``
    re-raises the env's/policy's own exception.

    Choice: ``exploration_type`` defaults to ``RANDOM``: a :class:`ProbabilisticActor` samples its
    action, which for BREMEN's actor *is* the stationary deployment noise (App. F.1). Pass
    ``ExplorationType.DETERMINISTIC`` to deploy the mean (and add noise via ``exploration``).

    Args:
        policy (nn.Module): the learner's policy (a TensorDict module); it is deep-copied, never
            used or modified by the collection.
        env (EnvBase | Callable[[], EnvBase]): real env or factory (a picklable factory is required
            for ``"multisync"`` and ``"ray"``; each worker builds its own env, possibly batched).
        num_transitions (int): ``B``, the deployment size.

    Keyword Args:
        exploration (TensorDictModuleBase, optional): module appended after the policy.
        deployment (int): deployment index stored in every row.
        policy_version (int): policy version stored in every row.
        collector (str): backend, one of :data:`BACKENDS`. Defaults to ``"single"``.
        num_workers (int): worker processes / Ray actors. Defaults to ``1``.
        frames_per_batch (int, optional): collector batch size (all workers together). Defaults
            to ``min(B, 1000)``.
        exploration_type (ExplorationType): see above. Defaults to ``RANDOM``.
        progress (bool): show a tqdm bar. Defaults to ``False``.
        seed (int, optional): seeds the env(s) (``set_seed``) and, inside a forked RNG scope, the
            torch RNG used by the policy / exploration in this process, leaving the caller's RNG
            untouched. For ``"ray"`` the seed applies from the workers' next env reset.
        max_retries (int): full restarts after a worker failure. Defaults to ``0``.
        ray_address (str, optional): ``"auto"``, ``"host:port"`` or ``"ray://host:port"``;
            ``None`` starts a local Ray instance. Ignored if Ray is already initialised.
        ray_init_config (dict, optional): extra ``ray.init`` kwargs (e.g. ``{"num_cpus": 2}``).
        ray_remote_config (dict, optional): Ray actor options per worker. Defaults to
            ``{"num_cpus": 1}``.
        action_tolerance (float, optional): collected actions more than ``action_tolerance *
            (high - low)`` outside the env's bounds are refused (see module doc); ``None``
            disables the bound check (never the NaN/inf check). Defaults to
            :data:`ACTION_TOLERANCE`.
        bounds (tuple[Tensor, Tensor], optional): per-dimension action ``(low, high)``; defaults
            to :func:`action_bounds` of ``env`` (``None`` for a factory: pass them to get the
            bound check with ``"multisync"``/``"ray"``).

    Raises:
        ValueError: bad arguments, or collected data with NaN/inf values or out-of-bound actions
            (deployment, key, count and first bad value named; nothing is returned).

    Returns:
        tuple[TensorDictBase, dict]: the ``[B]`` transitions and the info dict (see module doc;
        also ``"attempts"`` and ``"num_workers"``).

    Examples:
        >>> from torchrl.envs import GymEnv
        >>> from tensordict.nn import TensorDictModule
        >>> from torchrl_depeff.collectors.deployment import collect_deployment, policy_hash
        >>> env = GymEnv("Pendulum-v1")
        >>> policy = TensorDictModule(torch.nn.Linear(3, 1), ["observation"], ["action"])
        >>> data, info = collect_deployment(policy, env, 50, deployment=0, policy_version=0, seed=0,
        ...                                 frames_per_batch=16)
        >>> data.batch_size, data["deployment"].unique().tolist(), info["policy_hash"] == policy_hash(policy)
        (torch.Size([50]), [0], True)
        >>> from torchrl_depeff.envs.vector import make_vector_env
        >>> vec = make_vector_env("halfcheetah", 4, seed=0)
        >>> policy = TensorDictModule(torch.nn.Sequential(torch.nn.Linear(17, 6), torch.nn.Tanh()),
        ...                           ["observation"], ["action"])
        >>> data, info = collect_deployment(policy, vec, 30, deployment=1, policy_version=1, seed=0)
        >>> data.batch_size, info["collector"], info["attempts"]
        (torch.Size([30]), 'single', 1)
        >>> wild = TensorDictModule(lambda obs: obs[..., :6] * 0 + 10.0, ["observation"], ["action"])
        >>> collect_deployment(wild, vec, 8, deployment=2, policy_version=2)
        Traceback (most recent call last):
            ...
        ValueError: deployment 2: 48 action value(s) outside the env's bounds [-1, 1] by more than the tolerance 3 x (high - low) (first: 10.0 in row 0); ...
    """
    if int(num_transitions) < 1:
        raise ValueError(f"num_transitions must be >= 1, got {num_transitions}")
    if int(num_workers) < 1:
        raise ValueError(f"num_workers must be >= 1, got {num_workers}")
    if int(max_retries) < 0:
        raise ValueError(f"max_retries must be >= 0, got {max_retries}")
    if collector not in BACKENDS:
        raise ValueError(f"collector must be one of {list(BACKENDS)}, got {collector!r}")
    if action_tolerance is not None and not float(action_tolerance) >= 0:  # also refuses NaN
        raise ValueError(f"action_tolerance must be >= 0 or None, got {action_tolerance!r}")
    num_transitions = int(num_transitions)
    if bounds is None:
        bounds = action_bounds(env)
    frozen, deployed = _deployed(policy, exploration)
    digest = policy_hash(frozen)
    start = time.perf_counter()
    with torch.random.fork_rng(devices=[]):
        if seed is not None:
            torch.manual_seed(int(seed))
        data, attempts = _run_collection(
            deployed,
            env,
            num_transitions,
            collector=collector,
            num_workers=int(num_workers),
            frames_per_batch=frames_per_batch,
            exploration_type=exploration_type,
            progress=progress,
            seed=seed,
            deployment=int(deployment),
            max_retries=int(max_retries),
            ray_address=ray_address,
            ray_init_config=ray_init_config,
            ray_remote_config=ray_remote_config,
        )
    seconds = time.perf_counter() - start
    n = data.shape[0]
    if n != num_transitions:  # guard: never hand out a partial deployment
        raise DeploymentCollectionError(f"collected {n} rows instead of {num_transitions}")
    validate_deployment_data(data, deployment=int(deployment), bounds=bounds, action_tolerance=action_tolerance)
    data.set("deployment", torch.full((n,), int(deployment), dtype=torch.int64))
    data.set("policy_version", torch.full((n,), int(policy_version), dtype=torch.int64))
    info = {
        "policy_hash": digest,
        "deployment": int(deployment),
        "policy_version": int(policy_version),
        "num_transitions": n,
        "exploration": None if exploration is None else type(exploration).__name__,
        "collector": collector,
        "num_workers": int(num_workers),
        "attempts": attempts,
        "seconds": seconds,
        "transitions_per_s": n / max(seconds, 1e-9),
    }
    return data, info


class DeploymentCollector:
    """Stateful deployments: a frozen copy refreshed only by an explicit :meth:`deploy`.

    ``deploy(policy)`` copies the learner's weights into the frozen copy with
    ``load_state_dict`` (choice: each :meth:`collect` builds a fresh collector from the frozen copy,
    so no long-lived collector needs ``update_policy_weights_``) and bumps ``policy_version``; :meth:`collect` runs one deployment
    with the current frozen copy and bumps ``deployment``. Training the learner between the two
    never changes what is collected.

    Args:
        policy (nn.Module): initial policy (deployed immediately as version 0).
        env (EnvBase | Callable[[], EnvBase]): real env or factory.

    Keyword Args:
        exploration (TensorDictModuleBase, optional): appended after the policy.
        **collect_kwargs: forwarded to :func:`collect_deployment` (``collector``, ``num_workers``,
            ``frames_per_batch``, ``exploration_type``, ``progress``, ``max_retries``,
            ``ray_address``, ``ray_init_config``, ``ray_remote_config``).

    Examples:
        >>> from torchrl.envs import GymEnv
        >>> from tensordict.nn import TensorDictModule
        >>> from torchrl_depeff.collectors.deployment import DeploymentCollector, policy_hash
        >>> policy = TensorDictModule(torch.nn.Linear(3, 1), ["observation"], ["action"])
        >>> dc = DeploymentCollector(policy, GymEnv("Pendulum-v1"), frames_per_batch=10)
        >>> data, info = dc.collect(20, seed=0)
        >>> _ = policy.module.weight.data.add_(1.0)  # learner trains: deployed copy unchanged
        >>> dc.policy_hash == info["policy_hash"], dc.deploy(policy) == policy_hash(policy)
        (True, True)
        >>> dc.collect(20)[0]["policy_version"].unique().tolist(), dc.deployment
        ([1], 2)
    """

    def __init__(
        self,
        policy: nn.Module,
        env: EnvBase | Callable[[], EnvBase],
        *,
        exploration: TensorDictModuleBase | None = None,
        **collect_kwargs,
    ) -> None:
        self.env = env
        self.exploration = exploration
        self.collect_kwargs = collect_kwargs
        self.frozen_policy = freeze_policy(policy)
        self.policy_version = 0
        self.deployment = 0

    @property
    def policy_hash(self) -> str:
        """Hash of the currently deployed (frozen) policy, exploration excluded."""
        return policy_hash(self.frozen_policy)

    def deploy(self, policy: nn.Module) -> str:
        """Copy ``policy``'s weights into the frozen copy; return the new hash."""
        state = policy.state_dict()
        mine = self.frozen_policy.state_dict()
        if set(state) != set(mine):
            raise KeyError(
                f"policy state_dict keys differ from the deployed policy's: "
                f"{sorted(set(state) ^ set(mine))}"
            )
        with torch.no_grad():
            self.frozen_policy.load_state_dict(state)
        self.policy_version += 1
        return self.policy_hash

    def collect(
        self,
        num_transitions: int,
        *,
        seed: int | None = None,
        deployment: int | None = None,
        exploration: TensorDictModuleBase | None = None,
        exploration_type: ExplorationType | None = None,
    ) -> tuple[TensorDictBase, dict]:
        """Run one deployment of ``num_transitions`` with the deployed copy.

        Args:
            num_transitions (int): ``B``.

        Keyword Args:
            seed (int, optional): collector seed.
            deployment (int, optional): index written to the rows (default: the internal
                counter, bumped by every call).
            exploration (TensorDictModuleBase, optional): exploration of this deployment only
                (default: the constructor's).
            exploration_type (ExplorationType, optional): how the policy is run for this
                deployment (default: the constructor's, else ``RANDOM``).
        """
        kwargs = dict(self.collect_kwargs)
        if exploration_type is not None:
            kwargs["exploration_type"] = exploration_type
        k = self.deployment if deployment is None else int(deployment)
        data, info = collect_deployment(
            self.frozen_policy,
            self.env,
            num_transitions,
            exploration=self.exploration if exploration is None else exploration,
            deployment=k,
            policy_version=self.policy_version,
            seed=seed,
            **kwargs,
        )
        self.deployment = k + 1
        return data, info

    def state_dict(self) -> dict:
        """The deployed weights and the counters (``weights_only``-loadable)."""
        return {
            "frozen_policy": self.frozen_policy.state_dict(),
            "policy_version": self.policy_version,
            "deployment": self.deployment,
        }

    def load_state_dict(self, state: dict) -> None:
        """Restore :meth:`state_dict` output."""
        with torch.no_grad():
            self.frozen_policy.load_state_dict(state["frozen_policy"])
        self.policy_version = int(state["policy_version"])
        self.deployment = int(state["deployment"])
