"""The lazily computed ``in_keys`` / ``out_keys`` of the package's losses (TorchRL's pattern, once)."""
from __future__ import annotations

from tensordict.utils import NestedKey

__all__ = ["LazyKeys"]


class LazyKeys:
    """``in_keys`` built by ``_set_in_keys()`` and ``out_keys`` by ``_default_out_keys()`` on first use.

    Both have setters (TorchRL's losses let users override them); ``_in_keys`` / ``_out_keys`` are
    reset to ``None`` when ``set_keys`` changes the tensordict keys.
    """

    _in_keys: list[NestedKey] | None = None
    _out_keys: list[NestedKey] | None = None

    def _set_in_keys(self) -> None:  # pragma: no cover - every loss defines it
        raise NotImplementedError

    def _default_out_keys(self) -> list[NestedKey]:  # pragma: no cover - every loss defines it
        raise NotImplementedError

    @property
    def in_keys(self) -> list[NestedKey]:
        if self._in_keys is None:
            self._set_in_keys()
        return self._in_keys

    @in_keys.setter
    def in_keys(self, values: list[NestedKey]) -> None:
        self._in_keys = values

    @property
    def out_keys(self) -> list[NestedKey]:
        if self._out_keys is None:
            self._out_keys = self._default_out_keys()
        return self._out_keys

    @out_keys.setter
    def out_keys(self, values: list[NestedKey]) -> None:
        self._out_keys = values
