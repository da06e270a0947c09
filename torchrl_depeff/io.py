"""The package's one atomic writer and checkpoint reader.

Every file the library writes that a later run reads back (checkpoints, ``metrics.json``, run
specs, figures) goes through :func:`atomic_save`, :func:`atomic_write_text`,
:func:`atomic_write_bytes` or :func:`write_json_atomic`:
the content is written to a temporary file in the destination's directory, flushed and
``fsync``-ed, renamed over the destination with :func:`os.replace` (atomic on POSIX), and the
directory itself is ``fsync``-ed so the rename survives a power loss. A crash therefore leaves
either the previous file or the new one, never a truncated mix.

:func:`atomic_save` also keeps the file it replaces as ``<name>.prev`` (e.g.
``checkpoint.pt.prev``): if the newest checkpoint is later found damaged on disk (a zero-byte,
truncated or bit-flipped file), :func:`load_checkpoint` falls back to it with a warning naming
both files.

Checkpoints are plain nested dicts of tensors, numbers, strings, lists and dicts, loaded with
``torch.load(path, weights_only=True)`` on CPU (no pickled Python objects).

This module imports nothing from the rest of the package (layering, issue 14).
"""
from __future__ import annotations

import json
import os
import tempfile
import warnings
from pathlib import Path
from typing import Any, Callable, IO

import torch

__all__ = [
    "CheckpointError",
    "atomic_save",
    "atomic_write_bytes",
    "atomic_write_text",
    "fsync_directory",
    "load_checkpoint",
    "previous_path",
    "write_json_atomic",
]

#: suffix of the previous good file kept by :func:`atomic_save`
PREVIOUS_SUFFIX = ".prev"


class CheckpointError(ValueError):
    """A checkpoint file is missing its content, truncated or corrupted (names the file and its size)."""


def previous_path(path: str | Path) -> Path:
    """Where :func:`atomic_save` keeps the file it replaced: ``<path>.prev``.

    Examples:
        >>> from torchrl_depeff.io import previous_path
        >>> previous_path("run/checkpoint.pt").name
        'checkpoint.pt.prev'
    """
    path = Path(path)
    return path.with_name(path.name + PREVIOUS_SUFFIX)


def fsync_directory(directory: str | Path) -> None:
    """``fsync`` a directory so that renames and new entries in it survive a power loss.

    A no-op on platforms or filesystems that do not support it.

    Examples:
        >>> import tempfile
        >>> from torchrl_depeff.io import fsync_directory
        >>> fsync_directory(tempfile.mkdtemp())
    """
    try:
        dir_fd = os.open(directory, os.O_RDONLY)
    except OSError:  # pragma: no cover - platforms without directory fds
        return
    try:
        os.fsync(dir_fd)
    except OSError:  # pragma: no cover - some filesystems refuse fsync on directories
        pass
    finally:
        os.close(dir_fd)


def _atomic_write(path: str | Path, write: Callable[[IO], None], mode: str, *, keep_previous: bool) -> Path:
    path = Path(path)
    if path.exists() and path.is_dir():
        raise IsADirectoryError(f"cannot write a file to {path}: it is a directory")
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, mode) as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        if keep_previous and path.is_file() and path.stat().st_size > 0:
            _keep_previous(path)
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
    fsync_directory(path.parent)
    return path


def _keep_previous(path: Path) -> None:
    """Make ``path.prev`` a copy of ``path`` (a hard link when the filesystem allows) atomically."""
    prev = previous_path(path)
    tmp = prev.with_name(f".{prev.name}.tmp")
    if os.path.lexists(tmp):
        os.unlink(tmp)
    try:
        os.link(path, tmp)
    except OSError:  # filesystems without hard links: copy the bytes
        with open(path, "rb") as src, open(tmp, "wb") as dst:
            while chunk := src.read(1 << 20):
                dst.write(chunk)
            dst.flush()
            os.fsync(dst.fileno())
    os.replace(tmp, prev)


def atomic_save(obj: Any, path: str | Path, *, keep_previous: bool = True) -> Path:
    """``torch.save(obj)`` to ``path`` atomically, keeping the replaced file as ``<path>.prev``.

    Args:
        obj: object to save; keep it ``weights_only``-loadable (tensors, containers, numbers, str).
        path (str | Path): destination file; its directory is created if needed.

    Keyword Args:
        keep_previous (bool): keep the file being replaced as ``<path>.prev`` (the fallback of
            :func:`load_checkpoint`). Defaults to ``True``.

    Returns:
        Path: the destination.

    Examples:
        >>> import tempfile, os, torch
        >>> from torchrl_depeff.io import atomic_save, load_checkpoint
        >>> path = os.path.join(tempfile.mkdtemp(), "ckpt.pt")
        >>> _ = atomic_save({"w": torch.ones(2), "step": 3}, path)
        >>> _ = atomic_save({"w": torch.ones(2), "step": 4}, path)
        >>> load_checkpoint(path)["step"], load_checkpoint(path + ".prev")["step"]
        (4, 3)
    """
    return _atomic_write(path, lambda f: torch.save(obj, f), "wb", keep_previous=keep_previous)


def atomic_write_text(text: str, path: str | Path) -> Path:
    """Write ``text`` to ``path`` atomically (temp file in the same directory, fsync, ``os.replace``).

    Args:
        text (str): content (UTF-8).
        path (str | Path): destination file; its directory is created if needed.

    Returns:
        Path: the destination.

    Examples:
        >>> import tempfile, os
        >>> from torchrl_depeff.io import atomic_write_text
        >>> path = atomic_write_text("hello\\n", os.path.join(tempfile.mkdtemp(), "a.txt"))
        >>> path.read_text()
        'hello\\n'
    """
    if not isinstance(text, str):
        raise TypeError(f"atomic_write_text writes a str, got {type(text).__name__}")
    return _atomic_write(path, lambda f: f.write(text), "w", keep_previous=False)


def atomic_write_bytes(data: bytes, path: str | Path) -> Path:
    """Write ``data`` to ``path`` atomically (e.g. a figure rendered with ``fig.savefig(BytesIO())``).

    Args:
        data (bytes): content.
        path (str | Path): destination file; its directory is created if needed.

    Returns:
        Path: the destination.

    Examples:
        >>> import tempfile, os
        >>> from torchrl_depeff.io import atomic_write_bytes
        >>> atomic_write_bytes(b"PNG", os.path.join(tempfile.mkdtemp(), "f.png")).read_bytes()
        b'PNG'
    """
    if not isinstance(data, (bytes, bytearray, memoryview)):
        raise TypeError(f"atomic_write_bytes writes bytes, got {type(data).__name__}")
    return _atomic_write(path, lambda f: f.write(data), "wb", keep_previous=False)


def write_json_atomic(obj: Any, path: str | Path) -> Path:
    """Write ``obj`` as JSON to ``path`` atomically (NaN and infinities allowed, as JSON5 does).

    Args:
        obj: JSON-serialisable object.
        path (str | Path): destination file.

    Returns:
        Path: the destination.

    Examples:
        >>> import tempfile, os, json
        >>> from torchrl_depeff.io import write_json_atomic
        >>> path = write_json_atomic([{"a": float("nan")}], os.path.join(tempfile.mkdtemp(), "m.json"))
        >>> value = json.loads(path.read_text())[0]["a"]
        >>> value != value  # NaN
        True
    """
    # serialise first: an object JSON cannot encode raises before anything is written
    text = json.dumps(obj, indent=1, allow_nan=True)
    return atomic_write_text(text, path)


def _describe(path: Path) -> str:
    try:
        return f"{path} ({path.stat().st_size} bytes)"
    except OSError:
        return f"{path} (missing)"


def _try_load(path: Path) -> tuple[Any, str | None]:
    """``(state, None)`` or ``(None, reason)`` for a file that cannot be loaded."""
    if not path.is_file():
        return None, "the file does not exist" if not path.exists() else "it is not a regular file"
    if path.stat().st_size == 0:
        return None, "the file is empty (a write was interrupted or the disk is full)"
    try:
        return torch.load(path, map_location="cpu", weights_only=True), None
    except Exception as err:  # noqa: BLE001 - truncated, corrupted or not a torch file at all
        return None, " ".join(f"{type(err).__name__}: {err}".split())  # one line


def load_checkpoint(path: str | Path, *, fallback: bool = True) -> Any:
    """Load a checkpoint written by :func:`atomic_save` (``weights_only=True``, on CPU).

    A missing, zero-byte, truncated or corrupted file raises :class:`CheckpointError` naming the
    file, its size and what to do. When ``<path>.prev`` (the previous checkpoint, kept by
    :func:`atomic_save`) loads, it is returned instead, with a warning naming both files.

    Args:
        path (str | Path): checkpoint file.

    Keyword Args:
        fallback (bool): use ``<path>.prev`` when ``path`` is damaged. Defaults to ``True``.

    Raises:
        FileNotFoundError: neither ``path`` nor ``<path>.prev`` exists.
        CheckpointError: ``path`` (and ``<path>.prev`` if present) cannot be loaded.

    Examples:
        >>> import tempfile, os, warnings
        >>> from torchrl_depeff.io import atomic_save, load_checkpoint
        >>> path = os.path.join(tempfile.mkdtemp(), "c.pt")
        >>> _ = atomic_save({"a": [1, 2]}, path)
        >>> load_checkpoint(path)
        {'a': [1, 2]}
        >>> _ = atomic_save({"a": [3]}, path)
        >>> _ = open(path, "wb").close()  # the newest checkpoint is damaged (0 bytes)
        >>> with warnings.catch_warnings(record=True) as caught:
        ...     warnings.simplefilter("always")
        ...     state = load_checkpoint(path)
        >>> state, "c.pt.prev" in str(caught[0].message)
        ({'a': [1, 2]}, True)
    """
    path = Path(path)
    prev = previous_path(path)
    if not path.exists() and not (fallback and prev.exists()):
        raise FileNotFoundError(f"no checkpoint at {path}")
    state, reason = _try_load(path)
    if reason is None:
        return state
    advice = (
        "remove it to restart the run (data saved next to it, e.g. the deployments/ directory, is "
        "not affected and is reused), or restore the file from a backup"
    )
    if fallback and prev.exists():
        prev_state, prev_reason = _try_load(prev)
        if prev_reason is None:
            warnings.warn(
                f"checkpoint {_describe(path)} is damaged and cannot be loaded ({reason}); "
                f"using the previous checkpoint {_describe(prev)} instead: the run resumes from there",
                RuntimeWarning,
                stacklevel=2,
            )
            return prev_state
        raise CheckpointError(
            f"checkpoint {_describe(path)} is damaged and cannot be loaded ({reason}), and so is the "
            f"previous checkpoint {_describe(prev)} ({prev_reason}); {advice}"
        )
    raise CheckpointError(f"checkpoint {_describe(path)} is damaged and cannot be loaded ({reason}); {advice}")
