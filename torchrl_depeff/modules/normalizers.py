"""Feature normalisers kept as buffers so that they travel with ``state_dict``."""
from __future__ import annotations

import torch
from torch import nn

__all__ = ["Normalizer"]


class Normalizer(nn.Module):
    """Per-feature affine normaliser ``(x - loc) / scale`` with statistics stored as buffers.

    The statistics are recomputed from scratch by :meth:`fit` (no running average): in the
    deployment loop the dynamics model is refit on all the data gathered so far, so the
    normaliser is refit on the same data (MB2PO App.: inputs normalised as
    :math:`(x - \\mu_x) / \\sigma_x` from the dataset statistics).

    Constant features (standard deviation ``<= eps``, e.g. a joint that never moves in the
    data) get ``scale = 1`` so that normalising them never divides by zero and they are only
    centred.

    Args:
        dim (int): number of features (size of the last dimension).
        eps (float, optional): standard deviations at or below this value are treated as
            zero and replaced by ``1``. Defaults to ``1e-8``.

    Examples:
        >>> from torchrl_depeff.modules.normalizers import Normalizer
        >>> norm = Normalizer(3)
        >>> x = torch.tensor([[0.0, 1.0, 5.0], [2.0, 3.0, 5.0]])
        >>> norm.fit(x)
        >>> norm.loc, norm.scale
        (tensor([1., 2., 5.]), tensor([1., 1., 1.]))
        >>> torch.allclose(norm.denormalize(norm.normalize(x)), x)
        True
    """

    loc: torch.Tensor
    scale: torch.Tensor

    def __init__(self, dim: int, eps: float = 1e-8) -> None:
        super().__init__()
        if not isinstance(dim, int) or dim < 1:
            raise ValueError(f"Normalizer dim must be a positive int, got {dim!r}")
        if eps < 0:
            raise ValueError(f"Normalizer eps must be >= 0, got {eps}")
        self.dim = dim
        self.eps = float(eps)
        self.register_buffer("loc", torch.zeros(dim))
        self.register_buffer("scale", torch.ones(dim))

    def _check_dim(self, x: torch.Tensor, name: str) -> None:
        if x.shape[-1:] != (self.dim,):
            raise ValueError(
                f"Normalizer expected {name} with last dimension {self.dim}, got shape {tuple(x.shape)}"
            )

    @torch.no_grad()
    def fit(self, x: torch.Tensor) -> None:
        """Recompute ``loc``/``scale`` from data ``x`` of shape ``[..., dim]`` (in place).

        Args:
            x (torch.Tensor): data, any leading batch shape.

        Raises:
            ValueError: if the last dimension differs from ``dim``, if ``x`` is empty, or if it
                contains NaN/inf values (the message gives their count).
        """
        self._check_dim(x, "x")
        flat = x.reshape(-1, self.dim)
        if flat.shape[0] == 0:
            raise ValueError("Normalizer.fit got an empty tensor")
        bad = int((~torch.isfinite(flat)).sum())
        if bad:
            raise ValueError(f"Normalizer.fit got {bad} non-finite (NaN/inf) values")
        flat = flat.to(self.loc.dtype)
        loc = flat.mean(0)
        std = flat.std(0, unbiased=False)
        scale = torch.where(std > self.eps, std, torch.ones_like(std))
        self.loc.copy_(loc)
        self.scale.copy_(scale)

    def normalize(self, x: torch.Tensor) -> torch.Tensor:
        """Map ``x`` ``[..., dim]`` to ``(x - loc) / scale``."""
        return (x - self.loc) / self.scale

    def denormalize(self, x: torch.Tensor) -> torch.Tensor:
        """Inverse of :meth:`normalize`: ``x * scale + loc``."""
        return x * self.scale + self.loc

    def denormalize_scale(self, s: torch.Tensor) -> torch.Tensor:
        """Map a standard deviation in normalised units back to data units: ``s * scale``."""
        return s * self.scale

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Alias of :meth:`normalize`."""
        return self.normalize(x)

    def extra_repr(self) -> str:
        return f"dim={self.dim}, eps={self.eps}"
