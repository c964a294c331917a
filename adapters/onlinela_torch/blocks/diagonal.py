"""Exponential average of a small curvature tensor (a diagonal, or per-channel 2×2 blocks).

Used by the blocks whose curvature is not a pair of big Kronecker factors:
the token-count ``A`` of :class:`~onlinela_torch.blocks.EmbeddingBlock` and
the scale-and-shift statistics of :class:`~onlinela_torch.blocks.ScaleShiftBlock`.
Same conventions as the Kronecker factors: ``M_k = ρ M_{k-1} + (1-ρ) C_k``
from zero, debiased by ``1/(1-ρ^k)``; the snapshot that preconditioning uses
is refreshed on decomposition steps only; a non-finite increment is skipped.
"""

from __future__ import annotations

from typing import Any

import torch

__all__ = ["TensorEA"]


class TensorEA:
    """EA of a fixed-shape statistics tensor.

    Parameters
    ----------
    shape : tuple of int
    decay : float
        ``ρ``.
    dtype : torch.dtype
    device : torch.device
    """

    def __init__(self, shape: tuple[int, ...], decay: float, dtype: torch.dtype, device: torch.device) -> None:
        self.shape, self.decay, self.dtype, self.device = tuple(shape), decay, dtype, device
        self.pending: torch.Tensor | None = None
        self.ea: torch.Tensor | None = None
        self.count = 0
        self.snapshot: torch.Tensor | None = None  # debiased EA at the last decomposition step

    def add(self, increment: torch.Tensor) -> None:
        """Add to this step's pending sum (shape ``shape``)."""
        inc = increment.detach().to(self.dtype)
        self.pending = inc.clone() if self.pending is None else self.pending.add_(inc)

    def update(self, scale: float) -> bool:
        """Fold ``scale · pending`` into the EA; False (nothing changed) when it is not finite."""
        C, self.pending = self.pending, None
        if C is None:
            return True
        if not bool(torch.isfinite(C).all()):
            return False
        C = C.mul_(scale * (1 - self.decay))
        self.ea = C if self.ea is None else self.ea.mul_(self.decay).add_(C)
        self.count += 1
        return True

    def refresh(self) -> None:
        """Take the debiased snapshot (a decomposition step)."""
        if self.ea is not None:
            self.snapshot = self.ea / (1.0 - self.decay**self.count)

    def discard(self) -> None:
        self.pending = None

    def state_dict(self) -> dict[str, Any]:
        return {"ea": self.ea, "count": self.count, "snapshot": self.snapshot}

    def load_state_dict(self, sd: dict[str, Any], what: str) -> None:
        """Restore; a shape mismatch raises ValueError naming ``what``."""
        for key in ("ea", "snapshot"):
            t = sd[key]
            if t is not None and tuple(t.shape) != self.shape:
                raise ValueError(f"{what}: {key} has shape {self.shape}, the checkpoint {tuple(t.shape)}")
        self.ea = None if sd["ea"] is None else sd["ea"].to(self.device, self.dtype, copy=True)
        self.snapshot = None if sd["snapshot"] is None else sd["snapshot"].to(self.device, self.dtype, copy=True)
        self.count = int(sd["count"])
        self.pending = None
