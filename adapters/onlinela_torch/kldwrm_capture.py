r"""KLD-WRM's local statistics: this step's Kronecker factors ``(A_loc, G_loc)``, captured and reduced.

Q and QE need the curvature of the current batch alone, ``F_k ≈ G_loc ⊗
A_loc``, next to the preconditioner's exponential averages.
:class:`LocalStatistics` hooks the preconditioned layers (a forward hook for
the activation rows, a tensor hook for the output-gradient rows), keeps each
factor thin while it has fewer rows than columns (:class:`Accumulator`,
:class:`LocalFactor`) and, under ``torch.distributed``, reduces the factors
and QE's exact-KL gradients over the ranks (one all-reduce each), weighted by
each rank's share of the global batch.  Internal to
:class:`~onlinela_torch.KLDWRM` (docs/kldwrm.rst).
"""

from __future__ import annotations

import functools
import math
import time
from collections.abc import Mapping, MutableMapping
from typing import TYPE_CHECKING, Any

import torch
import torch.distributed as dist
from torch import nn

from .compiled import eager_hook
from .layer import KFACLayer
from .modules import LayerHelper, g_scale

if TYPE_CHECKING:
    from .preconditioner import KFACPreconditioner

__all__: list[str] = []


class LocalFactor:
    """One step's Kronecker factor ``L = XᵀX``, kept thin (rows ``X`` of shape (R, d)) or dense (d, d).

    Thin when ``R < d`` (memory ``O(R d)``, products ``O(R d m)``), dense otherwise.
    """

    __slots__ = ("rows", "gram")

    def __init__(self, rows: torch.Tensor | None = None, gram: torch.Tensor | None = None) -> None:
        self.rows = rows
        self.gram = gram

    def dense(self, dtype: torch.dtype) -> torch.Tensor:
        """``L`` as a (d, d) tensor of ``dtype``."""
        if self.gram is not None:
            return self.gram.to(dtype)
        X = self.rows.to(dtype)
        return X.T @ X

    def left(self, S: torch.Tensor) -> torch.Tensor:
        """``L S`` for ``S`` of shape (d, m)."""
        if self.gram is not None:
            return self.gram.to(S.dtype) @ S
        X = self.rows.to(S.dtype)
        return X.T @ (X @ S)

    def right(self, S: torch.Tensor) -> torch.Tensor:
        """``S L`` for ``S`` of shape (m, d)."""
        if self.gram is not None:
            return S @ self.gram.to(S.dtype)
        X = self.rows.to(S.dtype)
        return (S @ X.T) @ X

    def finite(self) -> torch.Tensor:
        """A 0-d bool tensor (no device sync)."""
        return torch.isfinite(self.gram if self.gram is not None else self.rows).all()

    def state_dict(self) -> dict[str, torch.Tensor | None]:
        """``{"rows", "gram"}`` (references; one of them is None)."""
        return {"rows": self.rows, "gram": self.gram}

    @classmethod
    def from_state(cls, sd: Mapping[str, Any], device: torch.device) -> LocalFactor:
        """A copy on ``device`` of a factor saved by :meth:`state_dict`."""

        def load(t: torch.Tensor | None) -> torch.Tensor | None:
            return None if t is None else t.to(device, copy=True)

        return cls(load(sd["rows"]), load(sd["gram"]))


class Accumulator:
    """Rows of one factor over the micro-batches of a step; switches to a Gram once ``R >= d``."""

    def __init__(self, dim: int, dtype: torch.dtype) -> None:
        self.dim = dim
        self.dtype = dtype
        self.rows: list[torch.Tensor] = []
        self.n_rows = 0
        self.gram: torch.Tensor | None = None

    def add(self, rows: torch.Tensor) -> None:
        """Append rows of shape (R, dim) (cast to the accumulator's dtype)."""
        rows = rows.detach().to(self.dtype)
        self.n_rows += rows.shape[0]
        if self.gram is None and self.n_rows < self.dim:
            self.rows.append(rows)
            return
        if self.gram is None:
            self.gram = torch.zeros(self.dim, self.dim, dtype=self.dtype, device=rows.device)
            for r in self.rows:
                self.gram.add_(r.T @ r)
            self.rows = []
        self.gram.add_(rows.T @ rows)

    def finish(self, scale: float) -> LocalFactor | None:
        """``scale · Σ rowsᵀ rows`` as a :class:`LocalFactor`, None when nothing was captured."""
        if self.gram is not None:
            return LocalFactor(gram=self.gram * scale)
        if not self.rows:
            return None
        return LocalFactor(rows=torch.cat(self.rows, 0) * math.sqrt(scale))


class Capture:
    """This step's activation and output-gradient rows of one layer."""

    def __init__(self, helper: LayerHelper, dtype: torch.dtype) -> None:
        self.A = Accumulator(helper.a_dim, dtype)
        self.G = Accumulator(helper.g_dim, dtype)
        self.samples = 0


class LocalStatistics:
    """Captures this step's ``(A_loc, G_loc)`` of every preconditioned layer, reduced over ranks when distributed.

    Parameters
    ----------
    preconditioner : KFACPreconditioner
        Supplies the layers, ``factor_dtype``, ``grad_scaler`` and ``loss_reduction``.
    seconds : mutable mapping
        Timings; the hooks' time is added to ``seconds["statistics"]``.
    distributed : bool
        Reduce the statistics over the ranks of ``group``.
    group : ProcessGroup or None
        The ``torch.distributed`` group (None: the default group).

    Notes
    -----
    The hooks are registered at construction, eagerly under ``torch.compile``
    (:func:`~onlinela_torch.compiled.eager_hook`: compile the model before
    building KLD-WRM).  Memory per layer and step ``min(R d, d²)`` per factor.
    """

    def __init__(
        self,
        preconditioner: KFACPreconditioner,
        seconds: MutableMapping[str, float],
        *,
        distributed: bool,
        group: dist.ProcessGroup | None,
    ) -> None:
        self.preconditioner = preconditioner
        self.seconds = seconds
        self.distributed = distributed
        self.group = group
        self._captures: dict[str, Capture] = {}
        layers = preconditioner.layers
        # eager under torch.compile (a graph break, no per-step recompilation)
        hook = eager_hook(self._forward_hook)
        self._handles = [layer.module.register_forward_hook(hook) for layer in layers.values()]
        self._by_module = {layer.module: layer for layer in layers.values()}

    @property
    def _device(self) -> torch.device:
        """The device of the first preconditioned layer's weight (where the reductions run)."""
        return next(iter(self.preconditioner.layers.values())).module.weight.device

    def remove_hooks(self) -> None:
        """Detach the capture hooks from the model."""
        for h in self._handles:
            h.remove()
        self._handles = []

    def clear(self) -> None:
        """Drop the rows captured so far."""
        self._captures = {}

    # ------------------------------------------------------------------ hooks
    def _forward_hook(self, module: nn.Module, inputs: tuple, output: Any) -> None:
        recording = module.training and torch.is_grad_enabled()
        if not (recording and isinstance(output, torch.Tensor) and output.requires_grad):
            return
        t0 = time.perf_counter()
        layer = self._by_module[module]
        cap = self._captures.get(layer.name)
        if cap is None:
            cap = self._captures[layer.name] = Capture(layer.helper, self.preconditioner.factor_dtype)
        x = inputs[0].detach()
        cap.A.add(layer.helper.a_rows(x))
        cap.samples += layer.helper.batch_size(x)
        output.register_hook(functools.partial(self._grad_hook, layer, cap))
        self.seconds["statistics"] += time.perf_counter() - t0

    def _grad_hook(self, layer: KFACLayer, cap: Capture, grad: torch.Tensor) -> None:
        t0 = time.perf_counter()
        rows = layer.helper.g_rows(grad.detach())
        scaler = self.preconditioner.grad_scaler
        if scaler is not None:
            rows = rows / float(scaler.get_scale())
        cap.G.add(rows)
        self.seconds["statistics"] += time.perf_counter() - t0

    # ------------------------------------------------------------------ this step's factors
    def finish(self) -> dict[str, tuple[LocalFactor, LocalFactor]]:
        """``(A_loc, G_loc)`` per layer from this step's rows, in the preconditioner's scaling; clears the rows."""
        if self.distributed:
            return self._reduce_captures()
        out = {}
        reduction = self.preconditioner.loss_reduction
        for name, cap in self._captures.items():
            if not cap.A.n_rows or not cap.G.n_rows:
                continue
            A = cap.A.finish(1.0 / cap.A.n_rows)
            G = cap.G.finish(g_scale(cap.samples, reduction))
            if A is not None and G is not None:
                out[name] = (A, G)
        self._captures = {}
        return out

    def _reduce_captures(self) -> dict[str, tuple[LocalFactor, LocalFactor]]:
        r"""Distributed: the global batch's ``(A_loc, G_loc)`` from every rank's rows, by one all-reduce.

        Rank ``p`` contributes ``R_p A_p = Σ xxᵀ`` (its ``R_p`` activation rows)
        and ``n_p G_p`` (its ``n_p`` samples), so ``A = Σ_p R_p A_p / Σ_p R_p`` and
        ``G = Σ_p n_p G_p / Σ_p n_p`` are what one process computes on the
        concatenated batch (for a mean loss each rank's output gradients are
        those of its own mean, which the weights ``n_p`` undo).  Every layer
        takes part on every rank (zeros where nothing was captured), so the
        collective is the same everywhere; cost ``Σ (d_A² + d_G²)`` elements.
        """
        reduction = self.preconditioner.loss_reduction
        dtype = self.preconditioner.factor_dtype
        layers = self.preconditioner.layers
        device = self._device
        parts = []
        for name, layer in layers.items():
            cap = self._captures.get(name)
            dA, dG = layer.helper.a_dim, layer.helper.g_dim
            if cap is None or not cap.A.n_rows or not cap.G.n_rows:
                parts += [torch.zeros(2, dtype=dtype, device=device), torch.zeros(dA * dA + dG * dG, dtype=dtype, device=device)]
                continue
            A = cap.A.finish(1.0).dense(dtype)
            G = cap.G.finish(cap.samples * g_scale(cap.samples, reduction)).dense(dtype)
            counts = torch.tensor([cap.A.n_rows, cap.samples], dtype=dtype, device=device)
            parts += [counts, A.reshape(-1), G.reshape(-1)]
        flat = torch.cat(parts)
        dist.all_reduce(flat, group=self.group)
        self._captures = {}
        out, offset = {}, 0
        for name, layer in layers.items():
            dA, dG = layer.helper.a_dim, layer.helper.g_dim
            rows, samples = flat[offset : offset + 2].tolist()
            A = flat[offset + 2 : offset + 2 + dA * dA].view(dA, dA)
            G = flat[offset + 2 + dA * dA : offset + 2 + dA * dA + dG * dG].view(dG, dG)
            offset += 2 + dA * dA + dG * dG
            if rows > 0 and samples > 0:
                out[name] = (LocalFactor(gram=A / rows), LocalFactor(gram=G / samples))
        return out

    # ------------------------------------------------------------------ QE's reductions
    def row_share(self, rows: int) -> float:
        """Distributed QE: this rank's fraction of the global batch's output rows (one all-reduce)."""
        total = torch.tensor([float(rows)], dtype=torch.float64, device=self._device)
        dist.all_reduce(total, group=self.group)
        return rows / float(total)

    def reduce_kl_grads(self, grads: list[torch.Tensor], share: float) -> list[torch.Tensor]:
        """Distributed QE: ``Σ_p share_p ∇KL_p`` (``share_p`` = the rank's fraction of the batch rows), one all-reduce."""
        flat = torch.cat([g.reshape(-1) for g in grads]) * share
        dist.all_reduce(flat, group=self.group)
        out, offset = [], 0
        for g in grads:
            out.append(flat[offset : offset + g.numel()].view_as(g))
            offset += g.numel()
        return out
