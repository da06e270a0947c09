"""Collect one deployment with a frozen copy of the policy (BREMEN Alg. 1, lines 3-4).

A *deployment* (BREMEN Sec. 3) is one fixed data-collection policy run in the real environment for
``B`` transitions (App. F.2). The deployed policy must stay fixed while the learner keeps training,
so collection always runs a frozen deep copy (:func:`freeze_policy`), identified by a sha256 of its
weights (:func:`policy_hash`).

Choice: :func:`collect_deployment` returns ``(data, info)``: ``data`` is a plain TensorDict of
exactly ``num_transitions`` rows (``[B]``, batch dims flattened) and ``info`` a JSON-serialisable
dict (``policy_hash`` of the frozen policy, exploration module excluded, ``deployment``, ``policy_version``, ``num_transitions``, ``seconds``,
``transitions_per_s``) that is meant to be passed as ``metadata`` to
:meth:`~torchrl_depeff.data.deployments.DeploymentReplayBuffers.add_deployment`. Non-tensor
metadata inside the TensorDict would not survive the memory-mapped storage cleanly.
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
from torchrl.envs import EnvBase
from torchrl.envs.utils import ExplorationType

__all__ = ["freeze_policy", "policy_hash", "collect_deployment", "DeploymentCollector"]


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


def _deployed(policy: nn.Module, exploration: nn.Module | None) -> tuple[nn.Module, nn.Module]:
    frozen = freeze_policy(policy)
    if exploration is None:
        return frozen, frozen
    if not isinstance(exploration, TensorDictModuleBase):
        raise TypeError(
            f"exploration must be a TensorDictModuleBase, got {type(exploration).__name__}"
        )
    return frozen, TensorDictSequential(frozen, freeze_policy(exploration))


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
) -> TensorDictBase:
    if collector == "single":
        env_batch = env.batch_size.numel() if isinstance(env, EnvBase) else 1
    elif collector == "multisync":
        if isinstance(env, EnvBase) or not callable(env):
            raise TypeError(
                "collector='multisync' needs env to be a zero-argument env factory (e.g. "
                f"torchrl.envs.EnvCreator), got {type(env).__name__}"
            )
        env_batch = num_workers
    else:
        raise ValueError(f"collector must be 'single' or 'multisync', got {collector!r}")
    # Every batch is a whole number of steps of every env, so round up to a multiple of env_batch.
    fpb = int(frames_per_batch) if frames_per_batch is not None else min(num_transitions, 1000)
    if fpb < 1:
        raise ValueError(f"frames_per_batch must be >= 1, got {frames_per_batch}")
    fpb = -(-fpb // env_batch) * env_batch
    num_batches = -(-num_transitions // fpb)
    kwargs = dict(
        frames_per_batch=fpb,
        total_frames=num_batches * fpb,
        exploration_type=exploration_type,
        auto_register_policy_transforms=False,
    )
    if collector == "single":
        if seed is not None and isinstance(env, EnvBase):
            env.set_seed(int(seed))  # before the collector's first reset
        coll = Collector(env, deployed, **kwargs)
    else:
        coll = MultiSyncCollector([env] * num_workers, deployed, cat_results=0, **kwargs)
    if seed is not None:
        coll.set_seed(int(seed))
        coll.reset()  # restart every env from the seeded state
    bar = None
    if progress:
        import tqdm

        bar = tqdm.tqdm(total=num_transitions, desc="deployment", unit="transition")
    parts, collected = [], 0
    try:
        for batch in coll:
            batch = batch.reshape(-1)
            parts.append(batch.clone())
            collected += batch.shape[0]
            if bar is not None:
                bar.update(min(batch.shape[0], num_transitions - (collected - batch.shape[0])))
            if collected >= num_transitions:
                break
    finally:
        coll.shutdown()
        if bar is not None:
            bar.close()
    return torch.cat(parts, 0)[:num_transitions]


def collect_deployment(
    policy: nn.Module,
    env: EnvBase | Callable[[], EnvBase],
    num_transitions: int,
    *,
    exploration: TensorDictModuleBase | None = None,
    deployment: int,
    policy_version: int,
    collector: Literal["single", "multisync"] = "single",
    num_workers: int = 1,
    frames_per_batch: int | None = None,
    exploration_type: ExplorationType = ExplorationType.RANDOM,
    progress: bool = False,
    seed: int | None = None,
) -> tuple[TensorDictBase, dict]:
    """Collect exactly ``num_transitions`` real transitions with a frozen copy of ``policy``.

    The deployed module is ``freeze_policy(policy)`` followed by ``exploration`` (if given; e.g.
    BREMEN's stationary ``N(0, 0.1^2)`` noise on a deterministic mean), run through a TorchRL
    :class:`~torchrl.collectors.Collector` (``collector="single"``) or
    :class:`~torchrl.collectors.MultiSyncCollector` (``"multisync"``, ``num_workers`` processes).
    Batched envs (``env.batch_size == [n]``) work: batches are rounded to whole env steps, the
    ``[n, T]`` output is flattened and the surplus of the last batch dropped, so the row count is
    exactly ``num_transitions``. Rows get ``"deployment"`` and ``"policy_version"`` (int64 ``[B]``).

    Choice: ``exploration_type`` defaults to ``RANDOM``: a :class:`ProbabilisticActor` samples its
    action, which for BREMEN's actor *is* the stationary deployment noise (App. F.1). Pass
    ``ExplorationType.DETERMINISTIC`` to deploy the mean (and add noise via ``exploration``).

    Args:
        policy (nn.Module): the learner's policy (a TensorDict module); it is deep-copied, never
            used or modified by the collection.
        env (EnvBase | Callable[[], EnvBase]): real env (or factory; a factory is required for
            ``"multisync"``).
        num_transitions (int): ``B``, the deployment size.

    Keyword Args:
        exploration (TensorDictModuleBase, optional): module appended after the policy.
        deployment (int): deployment index stored in every row.
        policy_version (int): policy version stored in every row.
        collector (str): ``"single"`` (default) or ``"multisync"``.
        num_workers (int): worker processes for ``"multisync"``. Defaults to ``1``.
        frames_per_batch (int, optional): collector batch size. Defaults to ``min(B, 1000)``.
        exploration_type (ExplorationType): see above. Defaults to ``RANDOM``.
        progress (bool): show a tqdm bar. Defaults to ``False``.
        seed (int, optional): seeds the env(s) (``set_seed``) and, inside a forked RNG scope, the
            torch RNG used by the policy / exploration, leaving the caller's RNG untouched.

    Returns:
        tuple[TensorDictBase, dict]: the ``[B]`` transitions and the info dict (see module doc).

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
    """
    if int(num_transitions) < 1:
        raise ValueError(f"num_transitions must be >= 1, got {num_transitions}")
    if int(num_workers) < 1:
        raise ValueError(f"num_workers must be >= 1, got {num_workers}")
    num_transitions = int(num_transitions)
    frozen, deployed = _deployed(policy, exploration)
    digest = policy_hash(frozen)
    start = time.perf_counter()
    with torch.random.fork_rng(devices=[]):
        if seed is not None:
            torch.manual_seed(int(seed))
        data = _run_collection(
            deployed,
            env,
            num_transitions,
            collector=collector,
            num_workers=int(num_workers),
            frames_per_batch=frames_per_batch,
            exploration_type=exploration_type,
            progress=progress,
            seed=seed,
        )
    seconds = time.perf_counter() - start
    n = data.shape[0]
    data.set("deployment", torch.full((n,), int(deployment), dtype=torch.int64))
    data.set("policy_version", torch.full((n,), int(policy_version), dtype=torch.int64))
    info = {
        "policy_hash": digest,
        "deployment": int(deployment),
        "policy_version": int(policy_version),
        "num_transitions": n,
        "exploration": None if exploration is None else type(exploration).__name__,
        "collector": collector,
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
            ``frames_per_batch``, ``exploration_type``, ``progress``).

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

    def collect(self, num_transitions: int, *, seed: int | None = None) -> tuple[TensorDictBase, dict]:
        """Run one deployment of ``num_transitions`` with the deployed copy."""
        data, info = collect_deployment(
            self.frozen_policy,
            self.env,
            num_transitions,
            exploration=self.exploration,
            deployment=self.deployment,
            policy_version=self.policy_version,
            seed=seed,
            **self.collect_kwargs,
        )
        self.deployment += 1
        return data, info
