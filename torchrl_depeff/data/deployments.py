"""One on-disk replay buffer per deployment (BREMEN Alg. 1, lines 3-5).

BREMEN (Matsushima et al., 2020, Alg. 1) collects ``B`` transitions per deployment with a frozen
policy (App. F.2: ``B = 100k`` or ``200k``), fits the dynamics ensemble on *all* the data gathered
so far (``D <- D U D_tau``, eq. 1) and re-initialises the policy by behaviour cloning on the data
of the *latest* deployment only (eq. 3). :class:`DeploymentReplayBuffers` keeps each deployment in
its own TorchRL :class:`~torchrl.data.LazyMemmapStorage` under ``root/deployment_{k:04d}/`` so that

* ``latest()`` is the BC dataset and ``all()`` / ``sample(which="all")`` the dynamics dataset;
* a crash during a write never leaves a partial deployment: each deployment is written into a
  hidden temporary directory under ``root`` and moved into place with one atomic
  :func:`os.replace` once the data and ``metadata.json`` are on disk;
* constructing on an existing root reloads every complete deployment and deletes leftover
  temporary directories (they are never loaded);
* every deployment is *verified* when it is loaded: at commit time ``metadata.json`` records the
  number of rows, the shape and dtype of every key (``"specs"``) and the size and SHA-256 of
  every stored file (``"files"``); on load each file is re-hashed and the storage checked
  against the specs. A damaged deployment is reported by name (directory, key or file, what is
  wrong) in a :class:`DamagedDeploymentError`, or, with ``on_damaged="skip"``, left out with a
  warning and listed in :attr:`DeploymentReplayBuffers.damaged`; it is never used silently.
  :func:`verify_deployment` checks one directory without loading it;
* a deployment whose keys, per-key shapes or dtypes differ from the run's is refused before
  anything is written, naming the difference.

Compatibility: deployments written before the integrity record (``metadata.json`` without
``"files"``, ``integrity`` < 1) still load; their storage is checked against the shapes they
recorded, and a warning notes that their content is unverified (no checksum exists to compare
with).

Choice: one writer per root. Leftover temporary directories are assumed to come from a crashed
writer and are removed at construction; do not point two live writers at one root.
"""
from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import time
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Literal

import torch
from tensordict import TensorDict, TensorDictBase
from torchrl._utils import logger as torchrl_logger
from torchrl.data import (
    LazyMemmapStorage,
    RandomSampler,
    ReplayBufferEnsemble,
    TensorDictReplayBuffer,
)
from torchrl.data.replay_buffers.samplers import Sampler

from torchrl_depeff.io import fsync_directory, write_json_atomic

__all__ = [
    "DamagedDeploymentError",
    "DeploymentDamage",
    "DeploymentReplayBuffers",
    "INTEGRITY_VERSION",
    "REQUIRED_KEYS",
    "validate_transitions",
    "verify_deployment",
]

REQUIRED_KEYS: tuple = (
    "observation",
    "action",
    ("next", "observation"),
    ("next", "reward"),
    ("next", "done"),
)
_DIR_RE = re.compile(r"^deployment_(\d{4,})$")
_TMP_PREFIX = ".tmp-deployment_"
#: version of the integrity record written into ``metadata.json`` (``"integrity"``)
INTEGRITY_VERSION = 1
#: columns written by the buffers themselves (not part of the run's data specs)
_OWN_KEYS = ("deployment", "policy_version", "index")
_ADVICE = (
    "restore the directory from a backup, or move it out of {root} and the deployments after it "
    "(the run then resumes from the last complete deployment), or load the others with "
    "DeploymentReplayBuffers(root, on_damaged='skip') to inspect them"
)


@dataclass(frozen=True)
class DeploymentDamage:
    """One problem found in a stored deployment.

    Attributes:
        deployment (int): deployment index (from the directory name).
        path (Path): the deployment directory.
        where (str): the key (``"next/observation"``) or stored file (``"storage/action.memmap"``)
            that is wrong, or ``"metadata.json"``.
        problem (str): what is wrong (expected vs found).
    """

    deployment: int
    path: Path
    where: str
    problem: str

    def __str__(self) -> str:
        return f"{self.path.name}: {self.where}: {self.problem}"


class DamagedDeploymentError(ValueError):
    """Stored deployments failed verification; :attr:`damage` lists every problem found."""

    def __init__(self, message: str, damage: list[DeploymentDamage]) -> None:
        super().__init__(message)
        self.damage = list(damage)


def _key_name(key: Any) -> str:
    return "/".join((key,) if isinstance(key, str) else key)


def _dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def _specs(td: TensorDictBase) -> dict[str, dict[str, Any]]:
    """``{key: {"shape": per-row shape, "dtype": name}}`` of the data columns of ``td`` (``[N]``)."""
    return {
        _key_name(key): {"shape": list(v.shape[1:]), "dtype": _dtype_name(v.dtype)}
        for key, v in td.items(include_nested=True, leaves_only=True)
        if _key_name(key) not in _OWN_KEYS
    }


def _spec_difference(run: dict[str, dict[str, Any]], new: dict[str, dict[str, Any]]) -> list[str]:
    out = []
    missing, extra = sorted(set(run) - set(new)), sorted(set(new) - set(run))
    if missing:
        out.append(f"keys missing from the new data: {missing}")
    if extra:
        out.append(f"keys not in the run's deployments: {extra}")
    for key in sorted(set(run) & set(new)):
        a, b = run[key], new[key]
        if a != b:
            out.append(
                f"key {key!r}: shape {b['shape']} dtype {b['dtype']} in the new data, "
                f"shape {a['shape']} dtype {a['dtype']} in the run"
            )
    return out


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 22):
            digest.update(chunk)
    return digest.hexdigest()


def _stored_files(path: Path) -> list[Path]:
    """Every file of a deployment directory except its ``metadata.json``."""
    return sorted(p for p in path.rglob("*") if p.is_file() and p != path / "metadata.json")


def _deployment_index(path: Path) -> int:
    m = _DIR_RE.match(path.name)
    return int(m.group(1)) if m else -1


def _read_metadata(path: Path) -> tuple[dict[str, Any] | None, list[DeploymentDamage]]:
    k = _deployment_index(path)
    meta_path = path / "metadata.json"
    if not meta_path.is_file():
        return None, [DeploymentDamage(k, path, "metadata.json", "file is missing")]
    try:
        meta = json.loads(meta_path.read_text())
        int(meta["num_rows"])
    except (ValueError, KeyError, TypeError) as err:
        return None, [DeploymentDamage(
            k, path, "metadata.json", f"unreadable ({meta_path.stat().st_size} bytes; {type(err).__name__}: {err})"
        )]
    return meta, []


def verify_deployment(path: str | Path) -> list[DeploymentDamage]:
    """Check one stored deployment directory against the integrity record of its ``metadata.json``.

    Every file listed under ``"files"`` must exist with its recorded size and SHA-256. Deployments
    written before the integrity record (no ``"files"``) cannot be checked this way and give no
    damage here (:class:`DeploymentReplayBuffers` still checks their storage against their shapes).

    Args:
        path (str | Path): a ``deployment_{k:04d}`` directory.

    Returns:
        list[DeploymentDamage]: the problems found (empty: the deployment is intact).

    Examples:
        >>> import tempfile
        >>> from tensordict import TensorDict
        >>> from torchrl_depeff.data.deployments import DeploymentReplayBuffers, verify_deployment
        >>> td = TensorDict({"observation": torch.zeros(4, 3), "action": torch.zeros(4, 1),
        ...     "next": {"observation": torch.zeros(4, 3), "reward": torch.zeros(4, 1),
        ...              "done": torch.zeros(4, 1, dtype=torch.bool)}}, batch_size=[4])
        >>> bufs = DeploymentReplayBuffers(tempfile.mkdtemp())
        >>> _ = bufs.add_deployment(td, policy_version=0)
        >>> verify_deployment(bufs.root / "deployment_0000")
        []
        >>> column = bufs.root / "deployment_0000" / "storage" / "action.memmap"
        >>> _ = column.write_bytes(column.read_bytes()[:8])  # truncate one column
        >>> [str(d) for d in verify_deployment(bufs.root / "deployment_0000")]
        ['deployment_0000: storage/action.memmap: size 8 bytes, 16 recorded at commit (truncated or overwritten)']
    """
    path = Path(path)
    meta, damage = _read_metadata(path)
    if meta is None:
        return damage
    k = _deployment_index(path)
    for rel, record in sorted((meta.get("files") or {}).items()):
        file = path / rel
        if not file.is_file():
            damage.append(DeploymentDamage(k, path, rel, "file is missing"))
            continue
        size = file.stat().st_size
        if size != int(record["size"]):
            damage.append(DeploymentDamage(
                k, path, rel, f"size {size} bytes, {record['size']} recorded at commit (truncated or overwritten)"
            ))
        elif _sha256(file) != record["sha256"]:
            damage.append(DeploymentDamage(
                k, path, rel, f"SHA-256 differs from the one recorded at commit (content corrupted, {size} bytes)"
            ))
    return damage


def validate_transitions(data: TensorDictBase, required_keys: tuple = REQUIRED_KEYS) -> None:
    """Check that ``data`` holds the transition keys and only finite floating-point values.

    Args:
        data (TensorDictBase): transitions with batch ``[*B]``.
        required_keys (tuple): keys that must be present. Defaults to :data:`REQUIRED_KEYS`.

    Raises:
        TypeError: ``data`` is not a TensorDict.
        KeyError: a required key is missing (the message names it).
        ValueError: empty data, or a NaN/inf in a floating-point entry (the message names the key).

    Examples:
        >>> from tensordict import TensorDict
        >>> from torchrl_depeff.data.deployments import validate_transitions
        >>> td = TensorDict({"observation": torch.zeros(2, 3), "action": torch.zeros(2, 1),
        ...     "next": {"observation": torch.zeros(2, 3), "reward": torch.zeros(2, 1),
        ...              "done": torch.zeros(2, 1, dtype=torch.bool)}}, batch_size=[2])
        >>> validate_transitions(td)
        >>> td["action"][0, 0] = float("nan")
        >>> validate_transitions(td)
        Traceback (most recent call last):
            ...
        ValueError: non-finite values (NaN/inf) in key 'action': 1 of 2 rows (first: row 0)
    """
    if not isinstance(data, TensorDictBase):
        raise TypeError(f"data must be a TensorDictBase, got {type(data).__name__}")
    if data.batch_size.numel() == 0:  # TensorDict.numel() is at least 1
        raise ValueError(f"data is empty (batch_size={tuple(data.batch_size)})")
    keys = set(data.keys(include_nested=True, leaves_only=True))
    for key in required_keys:
        if key not in keys:
            raise KeyError(f"required key {key!r} missing from data (keys: {sorted(map(str, keys))})")
    n = data.batch_size.numel()
    for key, value in data.items(include_nested=True, leaves_only=True):
        if isinstance(value, torch.Tensor) and value.is_floating_point():
            finite = torch.isfinite(value)
            if not bool(finite.all()):
                name = key if isinstance(key, str) else tuple(key)
                bad_rows = ~finite.reshape(n, -1).all(-1)
                raise ValueError(
                    f"non-finite values (NaN/inf) in key {name!r}: {int(bad_rows.sum())} of {n} rows "
                    f"(first: row {int(bad_rows.nonzero()[0, 0])})"
                )


def _make_sampler(sampler: Callable[[], Sampler] | type[Sampler] | None) -> Sampler:
    if sampler is None:
        return RandomSampler()
    if isinstance(sampler, Sampler):
        raise TypeError(
            "sampler must be a Sampler class or a zero-argument factory (each deployment buffer "
            f"needs its own sampler), got the instance {sampler!r}"
        )
    return sampler()


class _FlatReplayBufferEnsemble(ReplayBufferEnsemble):
    """A :class:`~torchrl.data.ReplayBufferEnsemble` whose samples are flat ``[batch]`` like a single buffer's.

    The ensemble stacks one sub-sample per buffer draw (``[num_buffer_sampled, rows]``); with one
    row per draw that is ``[batch, 1]``, while a single deployment's buffer gives ``[batch]``.
    Flattening makes the two sample paths of :class:`DeploymentReplayBuffers` return the same
    shapes.
    """

    def sample(self, batch_size: int | None = None, return_info: bool = False) -> Any:
        out = super().sample(batch_size, return_info=return_info)
        if return_info:
            sample, info = out
            flat_info = info.reshape(-1) if isinstance(info, TensorDictBase) else info
            return sample.reshape(-1), flat_info
        return out.reshape(-1)


class DeploymentReplayBuffers:
    """Per-deployment on-disk TorchRL buffers with an aggregate view (BREMEN Alg. 1).

    Every row is tagged with ``"deployment"`` (int64 ``[N]``) and ``"policy_version"`` (int64
    ``[N]``). Multi-dimensional batches (e.g. ``[num_envs, T]`` from a batched env) are flattened to
    ``[N]`` before writing.

    Args:
        root (str | Path): directory holding ``deployment_{k:04d}/`` sub-directories; created if
            needed; existing complete deployments are reloaded.

    Keyword Args:
        batch_size (int): default sample size. Defaults to ``256``.
        sampler (type | Callable[[], Sampler] | None): factory building the sampler of each
            per-deployment buffer (``latest()``). ``None`` = :class:`~torchrl.data.RandomSampler`.
        device (torch.device | str): device the samples are moved to (storage stays on disk,
            CPU). Defaults to ``"cpu"``.
        on_damaged (str): what to do with stored deployments that fail verification:
            ``"raise"`` (default) raises :class:`DamagedDeploymentError` naming every damaged
            deployment, file/key and problem; ``"skip"`` loads the intact ones, logs a warning
            per damaged one and lists them in :attr:`damaged` (appending is then refused until
            they are restored or moved away, so the indices on disk stay contiguous).

    Raises:
        DamagedDeploymentError: a stored deployment is damaged (``on_damaged="raise"``).

    Attributes:
        damaged (list[DeploymentDamage]): problems of the deployments skipped at load
            (``on_damaged="skip"``; empty otherwise).
        unverified (list[int]): deployments written before integrity records (no checksum),
            loaded after a shape check only.

    Examples:
        >>> import tempfile
        >>> from tensordict import TensorDict
        >>> from torchrl_depeff.data.deployments import DeploymentReplayBuffers
        >>> def make(n):
        ...     return TensorDict({"observation": torch.randn(n, 3), "action": torch.randn(n, 1),
        ...         "next": {"observation": torch.randn(n, 3), "reward": torch.randn(n, 1),
        ...                  "done": torch.zeros(n, 1, dtype=torch.bool)}}, batch_size=[n])
        >>> root = tempfile.mkdtemp()
        >>> bufs = DeploymentReplayBuffers(root, batch_size=4)
        >>> bufs.add_deployment(make(10), policy_version=0)
        0
        >>> bufs.add_deployment(make(6), policy_version=1, metadata={"policy_hash": "abc"})
        1
        >>> bufs.num_deployments, len(bufs), len(bufs.latest())
        (2, 16, 6)
        >>> bufs.sample()["deployment"].shape
        torch.Size([4])
        >>> bufs.as_tensordict("all")["policy_version"].bincount().tolist()
        [10, 6]
        >>> DeploymentReplayBuffers(root).metadata(1)["policy_hash"]
        'abc'
    """

    def __init__(
        self,
        root: str | Path,
        *,
        batch_size: int = 256,
        sampler: Callable[[], Sampler] | type[Sampler] | None = None,
        device: torch.device | str = "cpu",
        on_damaged: Literal["raise", "skip"] = "raise",
    ) -> None:
        if on_damaged not in ("raise", "skip"):
            raise ValueError(f"on_damaged must be 'raise' or 'skip', got {on_damaged!r}")
        if isinstance(batch_size, bool) or not isinstance(batch_size, int):
            raise TypeError(f"batch_size must be an int, got {batch_size!r}")
        if int(batch_size) < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        self.root = Path(root)
        if self.root.exists() and not self.root.is_dir():
            raise NotADirectoryError(f"deployments root {self.root} exists and is not a directory")
        self.root.mkdir(parents=True, exist_ok=True)
        self.batch_size = int(batch_size)
        self._sampler_factory = sampler
        _make_sampler(sampler)  # validate early
        self.out_device = torch.device(device)
        self._buffers: list[TensorDictReplayBuffer] = []
        self._metadata: list[dict[str, Any]] = []
        self._ids: list[int] = []
        self.damaged: list[DeploymentDamage] = []
        self.unverified: list[int] = []
        self._on_damaged = on_damaged
        self._reload()

    # ------------------------------------------------------------------ disk layout
    def _dir(self, k: int) -> Path:
        return self.root / f"deployment_{k:04d}"

    def _reload(self) -> None:
        for entry in sorted(self.root.iterdir()):
            if entry.name.startswith(_TMP_PREFIX):
                torchrl_logger.warning(f"removing incomplete deployment write {entry}")
                shutil.rmtree(entry, ignore_errors=True)
        found = sorted(
            int(m.group(1)) for e in self.root.iterdir() if e.is_dir() and (m := _DIR_RE.match(e.name))
        )
        if found != list(range(len(found))):
            raise ValueError(f"deployments under {self.root} are not contiguous from 0: {found}")
        run_specs: dict[str, dict[str, Any]] | None = None
        for k in found:
            path = self._dir(k)
            damage = verify_deployment(path)
            rb = meta = None
            if not damage:
                meta, _ = _read_metadata(path)
                rb, damage = self._open_checked(path, meta)
            if not damage and run_specs is not None:
                damage = [DeploymentDamage(k, path, "specs", d)
                          for d in _spec_difference(run_specs, _specs(rb.storage._storage))]
            if damage:
                self.damaged.extend(damage)
                continue
            if "files" not in meta:
                self.unverified.append(k)
            run_specs = run_specs if run_specs is not None else _specs(rb.storage._storage)
            self._buffers.append(rb)
            self._metadata.append(meta)
            self._ids.append(k)
        if self.unverified:
            torchrl_logger.warning(
                f"deployments {self.unverified} under {self.root} were written before integrity records "
                "(no checksum in metadata.json): loaded after a shape check only, their content is unverified"
            )
        if self.damaged:
            names = sorted({d.path.name for d in self.damaged})
            message = (
                f"{len(names)} damaged deployment(s) under {self.root}: "
                + "; ".join(str(d) for d in self.damaged)
                + ". " + _ADVICE.format(root=self.root) + "."
            )
            if self._on_damaged == "raise":
                raise DamagedDeploymentError(message, self.damaged)
            torchrl_logger.warning(f"{message} Loaded the {len(self._buffers)} intact deployment(s) only.")

    def _open_checked(
        self, path: Path, meta: dict[str, Any]
    ) -> tuple[TensorDictReplayBuffer | None, list[DeploymentDamage]]:
        """Open a deployment's storage and check it against ``meta`` (rows, keys, shapes, dtypes)."""
        k = _deployment_index(path)
        try:
            rb = self._open(path, int(meta["num_rows"]))
        except Exception as err:  # noqa: BLE001 - any unreadable storage is damage, named
            return None, [DeploymentDamage(k, path, "storage", f"cannot be loaded ({type(err).__name__}: {err})")]
        damage = []
        n = int(meta["num_rows"])
        if len(rb) != n:
            damage.append(DeploymentDamage(k, path, "storage", f"{len(rb)} rows, {n} recorded at commit"))
        stored = _specs(rb.storage._storage)
        if "specs" in meta:
            recorded = meta["specs"]
        else:  # written before integrity records: only the per-row shapes are known
            recorded = {key: {"shape": shape} for key, shape in meta.get("shapes", {}).items()
                        if key not in _OWN_KEYS}
            stored = {key: {"shape": v["shape"]} for key, v in stored.items()}
        for key in sorted(set(recorded) | set(stored)):
            if key not in stored:
                damage.append(DeploymentDamage(k, path, key, "key recorded at commit is missing from the storage"))
            elif key not in recorded:
                damage.append(DeploymentDamage(k, path, key, "key in the storage was not recorded at commit"))
            elif recorded[key] != stored[key]:
                damage.append(DeploymentDamage(
                    k, path, key, f"stored as {stored[key]}, recorded at commit as {recorded[key]}"
                ))
        return (None if damage else rb), damage

    def _open(self, path: Path, size: int) -> TensorDictReplayBuffer:
        rb = TensorDictReplayBuffer(
            storage=LazyMemmapStorage(
                size, scratch_dir=path / "storage", existsok=True, auto_cleanup=False
            ),
            sampler=_make_sampler(self._sampler_factory),
            batch_size=self.batch_size,
        )
        rb.loads(path)  # scratch_dir == saved path: memory-maps in place, no copy
        return rb

    @property
    def specs(self) -> dict[str, dict[str, Any]] | None:
        """The run's data specs ``{key: {"shape": per-row shape, "dtype": name}}`` (``None`` before the first deployment)."""
        if not self._buffers:
            return None
        return _specs(self._buffers[0].storage._storage)

    @property
    def deployment_ids(self) -> list[int]:
        """On-disk indices of the loaded deployments (``0..n-1`` unless damaged ones were skipped)."""
        return list(self._ids)

    # ------------------------------------------------------------------ writing
    def add_deployment(
        self,
        data: TensorDictBase,
        *,
        policy_version: int,
        metadata: dict[str, Any] | None = None,
    ) -> int:
        """Write one deployment's transitions atomically and return its index ``k``.

        Args:
            data (TensorDictBase): transitions ``[*B]`` with :data:`REQUIRED_KEYS`; ``*B`` is
                flattened. Existing ``"deployment"``/``"policy_version"`` entries are overwritten.

        Keyword Args:
            policy_version (int): version of the deployed policy, stored in every row.
            metadata (dict, optional): JSON-serialisable extras (e.g. ``{"policy_hash": ...}``),
                merged into ``metadata.json`` with ``deployment``, ``policy_version``, ``num_rows``,
                ``created_unix``/``created_utc`` and the keys/shapes.

        Returns:
            int: the deployment index.

        Raises:
            ValueError: empty data, non-finite values (key named), keys/shapes/dtypes that differ
                from the run's deployments (difference named), or damaged deployments were skipped
                at load (they must be restored or moved away first). Nothing is written then.
        """
        validate_transitions(data)
        if metadata is not None and not isinstance(metadata, dict):
            raise TypeError(f"metadata must be a dict or None, got {type(metadata).__name__}")
        if isinstance(policy_version, bool) or not isinstance(policy_version, int):
            raise TypeError(f"policy_version must be an int, got {policy_version!r}")
        if self.damaged:
            names = sorted({d.path.name for d in self.damaged})
            raise ValueError(
                f"cannot append to {self.root}: damaged deployment(s) {names} were skipped at load; "
                + _ADVICE.format(root=self.root)
            )
        k = self.num_deployments
        new_specs = _specs(data.reshape(-1))
        run_specs = self.specs
        if run_specs is not None:
            difference = _spec_difference(run_specs, new_specs)
            if difference:
                raise ValueError(
                    f"deployment {k} does not match the specs of the run under {self.root}: "
                    + "; ".join(difference)
                )
        data = data.reshape(-1).to("cpu")
        n = data.shape[0]
        data = data.clone()  # never write into the caller's data
        data.set("deployment", torch.full((n,), k, dtype=torch.int64))
        data.set("policy_version", torch.full((n,), int(policy_version), dtype=torch.int64))
        now = time.time()
        meta: dict[str, Any] = dict(metadata or {})
        meta.update(
            deployment=k,
            policy_version=int(policy_version),
            num_rows=n,
            created_unix=now,
            created_utc=time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(now)),
            shapes={
                "/".join((key,) if isinstance(key, str) else key): list(v.shape[1:])
                for key, v in data.items(include_nested=True, leaves_only=True)
            },
            specs=new_specs,
        )
        json.dumps(meta)  # fail before touching the disk if not serialisable
        tmp = self.root / f"{_TMP_PREFIX}{k:04d}-{os.getpid()}-{uuid.uuid4().hex[:8]}"
        tmp.mkdir()
        try:
            self._write(tmp, data, meta)
            os.replace(tmp, self._dir(k))  # atomic on POSIX: all or nothing
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
        fsync_directory(self.root)
        self._buffers.append(self._open(self._dir(k), n))
        self._metadata.append(meta)
        self._ids.append(k)
        return k

    def _write(self, tmp: Path, data: TensorDictBase, meta: dict[str, Any]) -> None:
        rb = TensorDictReplayBuffer(
            storage=LazyMemmapStorage(
                data.shape[0], scratch_dir=tmp / "storage", existsok=True, auto_cleanup=False
            ),
            batch_size=self.batch_size,
        )
        rb.extend(data)
        rb.dumps(tmp)
        files = {}
        for file in _stored_files(tmp):
            with open(file, "rb+") as f:
                os.fsync(f.fileno())  # the data is durable before the commit rename
            files[file.relative_to(tmp).as_posix()] = {"size": file.stat().st_size, "sha256": _sha256(file)}
        meta.update(integrity=INTEGRITY_VERSION, files=files)
        write_json_atomic(meta, tmp / "metadata.json")

    # ------------------------------------------------------------------ reading
    @property
    def num_deployments(self) -> int:
        """Number of complete deployments on disk."""
        return len(self._buffers)

    def __len__(self) -> int:
        return sum(len(rb) for rb in self._buffers)

    def _check_nonempty(self) -> None:
        if not self._buffers:
            raise ValueError(f"no deployment stored under {self.root} yet")

    def latest(self) -> TensorDictReplayBuffer:
        """The latest deployment's buffer (BREMEN eq. 3: BC data)."""
        self._check_nonempty()
        return self._buffers[-1]

    def buffer(self, k: int) -> TensorDictReplayBuffer:
        """Deployment ``k``'s buffer."""
        return self._buffers[self._index(k)]

    def all(self) -> TensorDictReplayBuffer | ReplayBufferEnsemble:
        """A view over all deployments (dynamics data, BREMEN eq. 1).

        One deployment: its buffer. Several: a :class:`~torchrl.data.ReplayBufferEnsemble` whose
        buffer probabilities are proportional to the deployment sizes (uniform over rows in
        expectation; one buffer draw per row of the constructor's ``batch_size``, so a
        ``view.sample(n)`` needs ``n`` to be a multiple of it). Its samples are flat ``[n]``
        like a single buffer's (and like :meth:`sample`). It is slow: measured
        37 ms per 256-row sample over 5 x 100k rows on this 2-core CPU, against 1.3 ms for
        :meth:`sample`, the vectorised one-draw alternative to use in training loops.
        """
        self._check_nonempty()
        if len(self._buffers) == 1:
            return self._buffers[0]
        sizes = torch.tensor([len(rb) for rb in self._buffers], dtype=torch.float64)
        return _FlatReplayBufferEnsemble(
            *self._buffers,
            p=(sizes / sizes.sum()).tolist(),
            batch_size=self.batch_size,
            num_buffer_sampled=self.batch_size,  # one buffer draw per row: uniform over rows
        )

    def _index(self, k: int) -> int:
        if not isinstance(k, int) or isinstance(k, bool):
            raise TypeError(f"deployment index must be an int, got {k!r}")
        if not -self.num_deployments <= k < self.num_deployments:
            raise IndexError(f"deployment {k} out of range ({self.num_deployments} stored)")
        return k % self.num_deployments

    def sample(
        self,
        batch_size: int | None = None,
        which: Literal["all", "latest"] = "all",
        *,
        generator: torch.Generator | None = None,
    ) -> TensorDict:
        """Sample rows uniformly (with replacement) from all deployments or the latest one.

        One index draw over the concatenated row range; rows are gathered with one indexing op
        per deployment (no per-sample loop).

        Args:
            batch_size (int, optional): defaults to the constructor's ``batch_size``.
            which (str): ``"all"`` or ``"latest"``.

        Keyword Args:
            generator (torch.Generator, optional): RNG for the index draw.
        """
        self._check_nonempty()
        bs = self.batch_size if batch_size is None else int(batch_size)
        if bs < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        if which == "latest":
            buffers = self._buffers[-1:]
        elif which == "all":
            buffers = self._buffers
        else:
            raise ValueError(f"which must be 'all' or 'latest', got {which!r}")
        sizes = torch.tensor([len(rb) for rb in buffers])
        ends = sizes.cumsum(0)
        idx = torch.randint(int(ends[-1]), (bs,), generator=generator)
        dep = torch.searchsorted(ends, idx, right=True)
        local = idx - (ends - sizes)[dep]
        order = torch.argsort(dep, stable=True)
        counts = torch.bincount(dep, minlength=len(buffers)).tolist()
        parts = [
            rb.storage[loc] for rb, loc, c in zip(buffers, local[order].split(counts), counts) if c
        ]
        out = torch.cat(parts, 0)[torch.argsort(order)]  # back to the drawn order
        return out.to(self.out_device)

    def as_tensordict(self, which: Literal["all", "latest"] | int = "all") -> TensorDict:
        """Rows concatenated in memory ``[N]`` (for model fitting)."""
        self._check_nonempty()
        if which == "all":
            buffers = self._buffers
        elif which == "latest":
            buffers = self._buffers[-1:]
        elif isinstance(which, int) and not isinstance(which, bool):
            buffers = [self._buffers[self._index(which)]]
        else:
            raise ValueError(f"which must be 'all', 'latest' or an int, got {which!r}")
        tds = [rb.storage[: len(rb)] for rb in buffers]
        return torch.cat(tds, 0).to(self.out_device)

    def metadata(self, k: int) -> dict[str, Any]:
        """The ``metadata.json`` of deployment ``k`` (policy hash, sizes, timestamps...)."""
        return dict(self._metadata[self._index(k)])

    def __repr__(self) -> str:
        return (
            f"{type(self).__name__}(root={str(self.root)!r}, num_deployments="
            f"{self.num_deployments}, rows={len(self)})"
        )
