"""Behaviour datasets for offline RL (BREMEN App. G.4) and local D4RL / Minari loading.

The collection itself, :func:`~torchrl_depeff.collectors.collect_behaviour_dataset`, lives in
:mod:`torchrl_depeff.collectors` (it runs the real env); this module holds the noise variants,
the dataset storage, validation and the loaders.

BREMEN's offline experiments (App. G.4, Table 7) collect 1M transitions per dataset with a
partially trained behaviour policy ``pi_b`` and one of five noise variants, quoted from the paper:

* **eps1**: "40 % of the dataset is collected by data-collection policy (partially trained SAC
  policy) pi_b, 40 % of the dataset is collected by epsilon greedy policy with epsilon = 0.1 to
  take a random action, and 20 % of dataset is collected by an uniformly random policy."
* **eps3**: "Same as eps1, 40 % ... by pi_b, 40 % ... epsilon greedy policy with epsilon = 0.3,
  and 20 % ... uniformly random policy."
* **gaussian1**: "40 % ... by pi_b, 40 % is collected by the policy with adding zero-mean Gaussian
  noise N(0, 0.1^2) to each action sampled from pi_b, and 20 % ... uniformly random policy."
* **gaussian3**: "40 % ... by pi_b, 40 % ... with zero-mean Gaussian noise N(0, 0.3^2), and 20 %
  ... uniformly random policy."
* **random**: "All of the dataset is collected by an uniformly random policy."

``noise=None`` collects everything with ``pi_b``.

Choices (the paper is silent on them):

* the three parts are collected one after the other (``pi_b`` rows first, then the noisy rows,
  then the uniform rows), with ``round(0.4 N)``, ``round(0.4 N)`` and the remainder rows; each row
  carries ``"behaviour_mode"`` (int64: 0 = ``pi_b``, 1 = noisy ``pi_b``, 2 = uniform);
* epsilon-greedy replaces the *whole* action vector, with probability ``epsilon`` per step, by a
  uniform sample from the action bounds (the usual continuous-control reading of "take a random
  action");
* Gaussian-noised actions are clipped to the action bounds, so the stored action is the one the
  environment executes; epsilon and uniform actions are within the bounds by construction;
* ``pi_b``'s action is *sampled* (``ExplorationType.RANDOM``), as in "each action sampled from
  pi_b".
"""
from __future__ import annotations

import json
import os
import shutil
import uuid
from pathlib import Path

import torch
from tensordict import TensorDict, TensorDictBase
from tensordict.nn import TensorDictModuleBase
from torchrl.data import LazyMemmapStorage, TensorDictReplayBuffer

from torchrl_depeff.data.deployments import validate_transitions
from torchrl_depeff.io import fsync_directory, write_json_atomic

__all__ = [
    "NOISE_VARIANTS",
    "EpsilonUniformAction",
    "ClippedGaussianAction",
    "UniformRandomAction",
    "save_behaviour_dataset",
    "load_behaviour_dataset",
    "validate_offline_dataset",
    "load_d4rl_hdf5",
    "load_minari",
]

# name -> (fraction pi_b, fraction noisy, fraction uniform, noise kind, noise scale); BREMEN App. G.4
NOISE_VARIANTS: dict = {
    None: (1.0, 0.0, 0.0, None, 0.0),
    "eps1": (0.4, 0.4, 0.2, "eps", 0.1),
    "eps3": (0.4, 0.4, 0.2, "eps", 0.3),
    "gaussian1": (0.4, 0.4, 0.2, "gaussian", 0.1),
    "gaussian3": (0.4, 0.4, 0.2, "gaussian", 0.3),
    "random": (0.0, 0.0, 1.0, None, 0.0),
}


def _bounds(action_spec, like: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    space = getattr(action_spec, "space", None)
    low, high = getattr(space, "low", None), getattr(space, "high", None)
    if not isinstance(low, torch.Tensor) or not isinstance(high, torch.Tensor):
        raise TypeError(f"action_spec must be bounded (space.low/high), got {action_spec!r}")
    limit = torch.finfo(low.dtype).max if low.is_floating_point() else float("inf")
    if not bool((low.abs() < limit).all() and (high.abs() < limit).all()):  # Unbounded: +-dtype max
        raise TypeError(
            f"action_spec must be bounded with finite low/high, got low={low.tolist()}, high={high.tolist()}"
        )
    return low.to(like), high.to(like)


class EpsilonUniformAction(TensorDictModuleBase):
    """With probability ``epsilon`` per step, replace the action by a uniform one (BREMEN G.4).

    Args:
        epsilon (float): replacement probability in ``[0, 1]``.
        action_spec (TensorSpec): bounded action spec.
        action_key (NestedKey): action entry. Defaults to ``"action"``.

    Examples:
        >>> from tensordict import TensorDict
        >>> from torchrl.data import Bounded
        >>> from torchrl_depeff.data.datasets import EpsilonUniformAction
        >>> mod = EpsilonUniformAction(0.3, Bounded(-1.0, 1.0, shape=(2,)))
        >>> td = mod(TensorDict(action=torch.full((10000, 2), 5.0), batch_size=[10000]))
        >>> round((td["action"] != 5.0).all(-1).float().mean().item(), 1)
        0.3
    """

    def __init__(self, epsilon: float, action_spec, action_key="action") -> None:
        super().__init__()
        if not 0.0 <= epsilon <= 1.0:
            raise ValueError(f"epsilon must be in [0, 1], got {epsilon}")
        self.epsilon, self.action_spec, self.action_key = float(epsilon), action_spec, action_key
        self.in_keys, self.out_keys = [action_key], [action_key]

    def forward(self, tensordict: TensorDictBase) -> TensorDictBase:
        action = tensordict.get(self.action_key)
        low, high = _bounds(self.action_spec, action)
        uniform = low + (high - low) * torch.rand_like(action)
        replace = torch.rand(action.shape[:-1] + (1,), device=action.device) < self.epsilon
        tensordict.set(self.action_key, torch.where(replace, uniform, action))
        return tensordict


class ClippedGaussianAction(TensorDictModuleBase):
    """``a <- clip(a + N(0, sigma^2), low, high)`` (BREMEN G.4 gaussian1/gaussian3).

    Args:
        sigma (float): noise std ``>= 0``.
        action_spec (TensorSpec): bounded action spec.
        action_key (NestedKey): action entry. Defaults to ``"action"``.

    Examples:
        >>> from tensordict import TensorDict
        >>> from torchrl.data import Bounded
        >>> from torchrl_depeff.data.datasets import ClippedGaussianAction
        >>> mod = ClippedGaussianAction(0.1, Bounded(-1.0, 1.0, shape=(1,)))
        >>> td = mod(TensorDict(action=torch.zeros(10000, 1), batch_size=[10000]))
        >>> round(td["action"].std().item(), 2)
        0.1
    """

    def __init__(self, sigma: float, action_spec, action_key="action") -> None:
        super().__init__()
        if not sigma >= 0:
            raise ValueError(f"sigma must be >= 0, got {sigma}")
        self.sigma, self.action_spec, self.action_key = float(sigma), action_spec, action_key
        self.in_keys, self.out_keys = [action_key], [action_key]

    def forward(self, tensordict: TensorDictBase) -> TensorDictBase:
        action = tensordict.get(self.action_key)
        low, high = _bounds(self.action_spec, action)
        noisy = action + self.sigma * torch.randn_like(action)
        tensordict.set(self.action_key, torch.maximum(torch.minimum(noisy, high), low))
        return tensordict


class UniformRandomAction(TensorDictModuleBase):
    """The uniformly random policy: writes ``U(low, high)`` actions for the batch of ``tensordict``.

    Args:
        action_spec (TensorSpec): bounded action spec (shape ``[..., act]``).
        action_key (NestedKey): action entry. Defaults to ``"action"``.

    Examples:
        >>> from tensordict import TensorDict
        >>> from torchrl.data import Bounded
        >>> from torchrl_depeff.data.datasets import UniformRandomAction
        >>> td = UniformRandomAction(Bounded(-2.0, 2.0, shape=(3,)))(TensorDict(batch_size=[5000]))
        >>> td["action"].shape, round(td["action"].abs().max().item()), round(td["action"].var().item(), 1)
        (torch.Size([5000, 3]), 2, 1.3)
    """

    def __init__(self, action_spec, action_key="action") -> None:
        super().__init__()
        self.action_spec, self.action_key = action_spec, action_key
        self.in_keys, self.out_keys = [], [action_key]

    def forward(self, tensordict: TensorDictBase) -> TensorDictBase:
        low, high = _bounds(self.action_spec, torch.zeros((), dtype=self.action_spec.dtype))
        shape = tensordict.batch_size + low.shape[-1:]
        tensordict.set(self.action_key, low + (high - low) * torch.rand(shape, dtype=low.dtype))
        return tensordict


def save_behaviour_dataset(data: TensorDictBase, path: str | Path, *, metadata: dict | None = None) -> Path:
    """Save ``data`` ``[N]`` as a TorchRL memmap buffer at ``path``, atomically.

    The buffer is written to a temporary sibling directory and moved with :func:`os.replace`;
    an existing ``path`` is an error (never half-overwritten).

    Args:
        data (TensorDictBase): transitions (validated with :func:`validate_offline_dataset`).
        path (str | Path): destination directory (must not exist).

    Keyword Args:
        metadata (dict, optional): JSON extras stored in ``metadata.json``.

    Returns:
        Path: ``path``.
    """
    validate_offline_dataset(data)
    path = Path(path)
    if path.exists():
        raise FileExistsError(f"dataset path {path} already exists")
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.parent / f".tmp-{path.name}-{os.getpid()}-{uuid.uuid4().hex[:8]}"
    tmp.mkdir()
    data = data.reshape(-1)
    try:
        rb = TensorDictReplayBuffer(
            storage=LazyMemmapStorage(
                data.shape[0], scratch_dir=tmp / "storage", existsok=True, auto_cleanup=False
            )
        )
        rb.extend(data.to("cpu"))
        rb.dumps(tmp)
        meta = dict(metadata or {}, num_rows=int(data.shape[0]))
        write_json_atomic(meta, tmp / "metadata.json")
        os.replace(tmp, path)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    fsync_directory(path.parent)
    return path


def load_behaviour_dataset(path: str | Path) -> TensorDict:
    """Load a dataset written by :func:`save_behaviour_dataset` (memory-mapped, ``[N]``).

    Args:
        path (str | Path): dataset directory.

    Examples:
        >>> import tempfile, os
        >>> from tensordict import TensorDict
        >>> from torchrl_depeff.data.datasets import save_behaviour_dataset, load_behaviour_dataset
        >>> td = TensorDict({"observation": torch.randn(4, 2), "action": torch.randn(4, 1),
        ...     "next": {"observation": torch.randn(4, 2), "reward": torch.randn(4, 1),
        ...              "done": torch.zeros(4, 1, dtype=torch.bool)}}, batch_size=[4])
        >>> p = save_behaviour_dataset(td, os.path.join(tempfile.mkdtemp(), "ds"))
        >>> bool((load_behaviour_dataset(p)["action"] == td["action"]).all())
        True
    """
    path = Path(path)
    meta_file = path / "metadata.json"
    if not meta_file.exists():
        raise FileNotFoundError(f"no behaviour dataset at {path} (missing metadata.json)")
    with open(meta_file) as f:
        n = int(json.load(f)["num_rows"])
    rb = TensorDictReplayBuffer(
        storage=LazyMemmapStorage(n, scratch_dir=path / "storage", existsok=True, auto_cleanup=False)
    )
    rb.loads(path)
    return rb.storage[:n]


def validate_offline_dataset(td: TensorDictBase) -> None:
    """Check an offline dataset: keys, finiteness and shapes; raise naming the problem.

    Requires ``observation``, ``action``, ``("next", "observation")``, ``("next", "reward")`` and
    ``("next", "done")``; a 1-D batch ``[N]``; ``next/observation`` shaped like ``observation``;
    ``reward`` and ``done`` shaped ``[N, 1]``; ``done`` boolean; no NaN/inf.

    Args:
        td (TensorDictBase): the dataset.

    Raises:
        TypeError, KeyError, ValueError: with the offending key in the message.

    Examples:
        >>> from tensordict import TensorDict
        >>> from torchrl_depeff.data.datasets import validate_offline_dataset
        >>> td = TensorDict({"observation": torch.randn(4, 2), "action": torch.randn(4, 1),
        ...     "next": {"observation": torch.randn(4, 3), "reward": torch.randn(4, 1),
        ...              "done": torch.zeros(4, 1, dtype=torch.bool)}}, batch_size=[4])
        >>> validate_offline_dataset(td)
        Traceback (most recent call last):
            ...
        ValueError: ('next', 'observation') has shape [4, 3], expected [4, 2] like 'observation'
    """
    validate_transitions(td)
    if td.batch_dims != 1:
        raise ValueError(f"offline dataset must have a 1-D batch [N], got {list(td.batch_size)}")
    n = td.shape[0]
    obs, nobs = td.get("observation"), td.get(("next", "observation"))
    if nobs.shape != obs.shape:
        raise ValueError(
            f"('next', 'observation') has shape {list(nobs.shape)}, expected {list(obs.shape)} "
            "like 'observation'"
        )
    if td.get("action").ndim != 2:
        raise ValueError(f"'action' must be [N, act], got {list(td.get('action').shape)}")
    for key in (("next", "reward"), ("next", "done")):
        if tuple(td.get(key).shape) != (n, 1):
            raise ValueError(f"{key} must have shape [{n}, 1], got {list(td.get(key).shape)}")
    if td.get(("next", "done")).dtype != torch.bool:
        raise ValueError(f"('next', 'done') must be bool, got {td.get(('next', 'done')).dtype}")


def load_d4rl_hdf5(path: str | Path) -> TensorDict:
    """Read a local D4RL-format HDF5 file into TorchRL transitions ``[N]``.

    TorchRL's :class:`~torchrl.data.datasets.D4RLExperienceReplay` only reads datasets it downloads
    (or gets from the ``d4rl`` package), so this reads the file with ``h5py`` and follows the same
    key conventions: ``observations -> "observation"``, ``actions -> "action"``,
    ``rewards -> ("next", "reward")``, ``terminals -> ("next", "terminated")``,
    ``timeouts -> ("next", "truncated")``, ``("next", "done") = terminated | truncated``,
    ``next_observations -> ("next", "observation")``. Groups other than those (``infos/``,
    ``metadata/``) are ignored.

    Choice: without ``next_observations`` (raw D4RL files), the next observation is the following
    row's observation, and rows whose successor starts a new episode (``timeouts`` true) or that
    are last in the file are dropped, as ``d4rl.qlearning_dataset`` does. Terminal rows are kept
    (their next observation is unused by value targets).

    Args:
        path (str | Path): the ``.hdf5`` file.

    Examples:
        >>> import tempfile, os, h5py, numpy as np
        >>> from torchrl_depeff.data.datasets import load_d4rl_hdf5
        >>> p = os.path.join(tempfile.mkdtemp(), "d.hdf5")
        >>> with h5py.File(p, "w") as f:
        ...     _ = f.create_dataset("observations", data=np.zeros((5, 3), np.float32))
        ...     _ = f.create_dataset("actions", data=np.zeros((5, 2), np.float32))
        ...     _ = f.create_dataset("rewards", data=np.ones(5, np.float32))
        ...     _ = f.create_dataset("terminals", data=np.zeros(5, bool))
        ...     _ = f.create_dataset("timeouts", data=np.array([0, 1, 0, 0, 0], bool))
        >>> td = load_d4rl_hdf5(p)
        >>> td.batch_size, td["next", "reward"].shape
        (torch.Size([3]), torch.Size([3, 1]))
    """
    try:
        import h5py
    except ImportError as err:  # pragma: no cover - h5py is a test/minari dependency
        raise ImportError("load_d4rl_hdf5 needs h5py: pip install 'torchrl_depeff[minari]'") from err
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"no such HDF5 file: {path}")
    with h5py.File(path, "r") as f:
        for key in ("observations", "actions", "rewards", "terminals"):
            if key not in f:
                raise KeyError(f"D4RL file {path} lacks the dataset {key!r} (has {sorted(f.keys())})")
        raw = {k: torch.as_tensor(f[k][()]) for k in
               ("observations", "actions", "rewards", "terminals", "timeouts", "next_observations")
               if k in f}
    obs = raw["observations"].float()
    n = obs.shape[0]
    if n == 0:
        raise ValueError(f"D4RL file {path} holds no rows ('observations' has shape {list(obs.shape)})")
    for key, value in raw.items():
        if value.ndim == 0 or value.shape[0] != n:
            raise ValueError(f"D4RL dataset {key!r} in {path} has shape {list(value.shape)}, expected {n} rows")
        if value.is_floating_point():
            bad_rows = ~torch.isfinite(value).reshape(n, -1).all(-1)
            if bool(bad_rows.any()):
                count, first = int(bad_rows.sum()), int(bad_rows.nonzero()[0, 0])
                raise ValueError(
                    f"D4RL file {path}: dataset {key!r} has non-finite values (NaN/inf) in {count} of {n} rows "
                    f"(first: row {first}); the file is damaged or was written from a diverged run, and it is "
                    "not loaded (drop or repair those rows first)"
                )
    terminated = raw["terminals"].bool().reshape(n, 1)
    truncated = raw.get("timeouts", torch.zeros(n, dtype=torch.bool)).bool().reshape(n, 1)
    if "next_observations" in raw:
        next_obs = raw["next_observations"].float()
        keep = torch.arange(n)
    else:
        next_obs = torch.cat([obs[1:], obs[-1:]], 0)
        valid = ~truncated.squeeze(-1)
        valid[-1] = False
        keep = valid.nonzero().squeeze(-1)
    action = raw["actions"].float()
    if action.ndim == 1:
        action = action.unsqueeze(-1)
    td = TensorDict(
        {
            "observation": obs,
            "action": action,
            "next": {
                "observation": next_obs,
                "reward": raw["rewards"].float().reshape(n, 1),
                "terminated": terminated,
                "truncated": truncated,
                "done": terminated | truncated,
            },
        },
        batch_size=[n],
    )
    td = td[keep]
    validate_offline_dataset(td)
    return td


def load_minari(dataset_id: str, root: str | Path, *, batch_size: int = 256):
    """Load a local Minari dataset through TorchRL's ``MinariExperienceReplay``.

    Uses ``load_from_local_minari=True`` (nothing is downloaded): the dataset must already be in
    the local Minari datasets directory. ``minari`` is an optional dependency, imported lazily.

    Args:
        dataset_id (str): e.g. ``"mujoco/halfcheetah/medium-v0"``.
        root (str | Path): where TorchRL stores its processed copy.

    Keyword Args:
        batch_size (int): sample size of the returned buffer. Defaults to ``256``.

    Returns:
        torchrl.data.datasets.MinariExperienceReplay

    Raises:
        ImportError: ``minari`` is not installed (install the ``[minari]`` extra).

    Examples:
        >>> import importlib.util
        >>> from torchrl_depeff.data.datasets import load_minari
        >>> if importlib.util.find_spec("minari") is None:
        ...     try:
        ...         load_minari("mujoco/halfcheetah/medium-v0", "/tmp/x")
        ...     except ImportError as err:
        ...         print("minari" in str(err))
        ... else:
        ...     print(True)
        True
    """
    try:
        import minari  # noqa: F401
    except ImportError as err:
        raise ImportError(
            "load_minari needs the optional 'minari' package: pip install 'torchrl_depeff[minari]'"
        ) from err
    from torchrl.data.datasets import MinariExperienceReplay

    return MinariExperienceReplay(
        dataset_id, batch_size, root=str(root), download=False, load_from_local_minari=True
    )
