"""Per-layer state of the Kronecker path: the helper, the two factors, captured rows, counters, timings."""

from __future__ import annotations

from collections.abc import Iterator

import torch
from torch import nn

from .factors import FactorState
from .modules import LayerHelper

__all__ = ["KFACLayer"]


class KFACLayer:
    """Per-layer state: helper, the two factors, captured rows, counters and timings.

    Read-only for users; reach it through :attr:`KFACPreconditioner.layers`.

    Attributes
    ----------
    name : str
        The module's name in ``model.named_modules()``.
    module : torch.nn.Module
    helper : onlinela_torch.modules.LayerHelper
    A, G : FactorState or None
        The activation and gradient factors (created at the first captured batch,
        when the increment rank ``s`` that decides Brand eligibility is known).
    low_rank_grad : bool
        Whether the thin-factor gradient path may be used for this layer.
    seconds : dict
        Seconds spent in ``"statistics"``, ``"decomposition"``, ``"preconditioning"``.
    counters : dict
        ``"low_rank_grad"`` (steps preconditioned through the thin factors),
        ``"low_rank_grad_fallback"`` (captured but the gradient did not match),
        ``"degenerate"`` (steps left unpreconditioned: a factor is all zero),
        ``"missing_fisher"`` (statistics steps without sampled-label gradients),
        ``"unused_forward"`` (forward passes captured on a statistics step
        whose output gradient never arrived before :meth:`KFACPreconditioner.step`,
        e.g. an extra forward for logging: dropped, not counted in the factors).
    """

    def __init__(self, index: int, name: str, module: nn.Module, helper: LayerHelper, low_rank_grad: bool) -> None:
        self.index = index
        self.name = name
        self.module = module
        self.helper = helper
        self.low_rank_grad = low_rank_grad
        self.A: FactorState | None = None
        self.G: FactorState | None = None
        self.seconds = {"statistics": 0.0, "decomposition": 0.0, "preconditioning": 0.0}
        self.counters = {"low_rank_grad": 0, "low_rank_grad_fallback": 0, "degenerate": 0, "missing_fisher": 0, "unused_forward": 0}
        # per-step capture buffers
        self.a_rows_seen = 0
        self.samples_seen = 0
        self.thin_a: list[torch.Tensor] = []
        self.thin_g: dict[int, torch.Tensor] = {}
        # A rows of forwards whose backward has not run yet (committed by the first output-gradient hook)
        self.pending_a: dict[int, tuple[torch.Tensor, int]] = {}
        self.calls = 0
        self.written: tuple[int, int] | None = None  # (id, _version) of the weight gradient step() wrote

    def factors(self) -> Iterator[tuple[str, FactorState]]:
        """The existing factors as ``("A", state), ("G", state)``."""
        for key in ("A", "G"):
            f = getattr(self, key)
            if f is not None:
                yield key, f

    def reset_capture(self) -> None:
        self.a_rows_seen = 0
        self.samples_seen = 0
        self.thin_a = []
        self.thin_g = {}
        self.pending_a = {}
        self.calls = 0
        for _, f in self.factors():
            f.discard_pending()
