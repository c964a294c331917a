"""Kronecker-factored blocks: ``nn.Linear`` (expand / reduce), ``nn.Conv1d``, ``nn.Conv2d``.

The gradient of a weight (with the bias folded in as a last column) is the
matrix ``dW`` of shape ``(g_dim, a_dim)``; its curvature block is
approximated by ``A ⊗ G`` and preconditioned by the orchestrator's damped
Kronecker inverse ``ctx.kron_solve`` (algorithms.md §1).  The factors are
:class:`~onlinela_torch.factors.FactorState` objects made by
``ctx.make_factor``, so the orchestrator's method (dense, randomized, Brand)
applies to them.
"""

from __future__ import annotations

import abc
import logging
import math
from typing import Any, Literal

import torch
from torch import nn

from ..factors import FactorEigen, FactorState
from ..modules import Conv1dHelper, Conv2dHelper, LayerHelper, LinearHelper
from ..compiled import eager_hook
from .base import BlockContext, CurvatureBlock, capture_allowed, register_block

__all__ = [
    "Conv1dBlock",
    "Conv2dBlock",
    "FactorSlot",
    "KroneckerBlock",
    "KroneckerFactors",
    "LinearBlock",
]

logger = logging.getLogger(__name__)


# =========================================================================== factor slots
class FactorSlot:
    """One Kronecker factor of a block: created by ``ctx.make_factor`` at its first rows, then fed and refreshed.

    Parameters
    ----------
    ctx : BlockContext
    dim : int
        Factor dimension ``d``.
    name : str
        For logs and the factory (e.g. ``"layers.0.self_attn/q/A"``).
    device : torch.device
    """

    def __init__(self, ctx: BlockContext, dim: int, name: str, device: torch.device) -> None:
        self.ctx, self.dim, self.name, self.device = ctx, dim, name, device
        self.state: FactorState | None = None
        self.rows = 0  # rows accumulated this step

    def add(self, rows: torch.Tensor) -> None:
        """Accumulate ``(R, d)`` rows into the pending increment (as the step's plan says)."""
        p = self.ctx.plan()
        if self.state is None:
            self.state = self.ctx.make_factor(self.dim, self.name, rows=int(rows.shape[0]), device=self.device)
        self.state.accumulate(rows, ea=bool(p.ea), brand=bool(p.brand))
        self.rows += int(rows.shape[0])

    @property
    def pending(self) -> bool:
        return self.state is not None and self.state.has_pending

    def update(self, scale: float, *, decompose: bool, damping: float, step: int) -> None:
        """EA / Brand update with ``scale`` (when rows are pending), then the scheduled decomposition."""
        p = self.ctx.plan()
        f = self.state
        if f is None:
            return
        rel = math.sqrt(damping)
        if f.has_pending:
            if p.ea:
                f.update_ea(scale, step=step)
            if p.brand:
                f.update_brand(scale, correct=bool(p.correct), damping=rel, step=step)
        f.discard_pending()
        f.refresh(decompose=decompose, overwrite=bool(p.overwrite), damping=rel, step=step)

    def discard(self) -> None:
        self.rows = 0
        if self.state is not None:
            self.state.discard_pending()

    @property
    def eigen(self) -> FactorEigen | None:
        return None if self.state is None else self.state.eigen

    def state_dict(self) -> dict[str, Any] | None:
        return None if self.state is None else self.state.state_dict()

    def load_state_dict(self, sd: dict[str, Any] | None, block: str) -> None:
        self.state = None
        if sd is None:
            return
        ea, eig = sd.get("ea"), sd.get("eigen")
        shapes = [tuple(ea.shape)] if isinstance(ea, torch.Tensor) else []
        if eig is not None:
            shapes.append((tuple(eig["eigvecs"].shape)[0],) * 2)
        if any(s != (self.dim, self.dim) for s in shapes):
            raise ValueError(f"block {block!r}: factor {self.name} has dimension {self.dim}, the checkpoint {shapes}")
        self.state = self.ctx.make_factor(self.dim, self.name, rows=1, device=self.device, kind=sd["kind"])
        self.state.load_state_dict(sd)

    def stats(self) -> dict[str, Any] | None:
        return None if self.state is None else self.state.summary()


class KroneckerFactors:
    """The pair ``(A, G)`` of one weight matrix ``(g_dim, a_dim)``: statistics and damped inverse."""

    def __init__(self, ctx: BlockContext, a_dim: int, g_dim: int, name: str, device: torch.device) -> None:
        self.A = FactorSlot(ctx, a_dim, f"{name}/A", device)
        self.G = FactorSlot(ctx, g_dim, f"{name}/G", device)
        self.ctx = ctx

    def update(self, terms: int, *, decompose: bool, damping: float, step: int) -> bool:
        """Fold the step in (``A/R``, ``G·g_scale(M)``); False when ``G`` statistics were expected but missing."""
        captured = self.A.rows > 0
        missing = captured and self.ctx.fisher != "empirical" and not self.G.pending
        a_scale = 1.0 / max(self.A.rows, 1)
        self.A.update(a_scale, decompose=decompose, damping=damping, step=step)
        self.G.update(self.ctx.g_scale(terms), decompose=decompose, damping=damping, step=step)
        return not missing

    def discard(self) -> None:
        self.A.discard()
        self.G.discard()

    def holders(self) -> list[FactorSlot]:
        """``[A, G]`` (:meth:`CurvatureBlock.statistics_holders`)."""
        return [self.A, self.G]

    def ready(self) -> bool:
        eA, eG = self.A.eigen, self.G.eigen
        return eA is not None and eG is not None and eA.max_eig > 0 and eG.max_eig > 0

    def apply(self, X: torch.Tensor, damping: float) -> torch.Tensor:
        """The damped inverse applied to ``X`` of shape ``(g_dim, a_dim)``, or ``X`` itself when not :meth:`ready`."""
        if not self.ready():
            return X
        return self.ctx.kron_solve(self.G.eigen, self.A.eigen, X, damping)

    def state_dict(self) -> dict[str, Any]:
        return {"A": self.A.state_dict(), "G": self.G.state_dict()}

    def load_state_dict(self, sd: dict[str, Any], block: str) -> None:
        self.A.load_state_dict(sd["A"], block)
        self.G.load_state_dict(sd["G"], block)

    def stats(self) -> dict[str, Any]:
        return {"A": self.A.stats(), "G": self.G.stats()}


def weight_matrix(weight: torch.Tensor, bias: torch.Tensor | None, rows: int) -> torch.Tensor:
    """``[W | b]`` of shape ``(rows, numel(W)/rows (+1))`` (a view of ``W`` without bias)."""
    g = weight.reshape(rows, -1)
    if bias is None:
        return g
    return torch.cat([g, bias.reshape(-1, 1).to(g.dtype)], dim=1)


def split_matrix(
    mat: torch.Tensor, weight: nn.Parameter, bias: nn.Parameter | None, grads: dict[nn.Parameter, torch.Tensor]
) -> dict[nn.Parameter, torch.Tensor]:
    """Inverse of :func:`weight_matrix` for the parameters present in ``grads``."""
    out = {}
    n_w = mat.shape[1] - int(bias is not None)
    if weight in grads:
        out[weight] = mat[:, :n_w].reshape(weight.shape).to(grads[weight].dtype)
    if bias is not None and bias in grads:
        out[bias] = mat[:, n_w].reshape(bias.shape).to(grads[bias].dtype)
    return out


def grads_matrix(
    weight: nn.Parameter, bias: nn.Parameter | None, grads: dict[nn.Parameter, torch.Tensor], rows: int
) -> torch.Tensor:
    """``[dW | db]`` from ``grads`` (a missing one counts as zero)."""
    w = grads.get(weight)
    if w is None:
        w = torch.zeros_like(weight)
    b = None
    if bias is not None:
        b = grads.get(bias)
        b = torch.zeros_like(bias) if b is None else b
    return weight_matrix(w, b, rows)


# =========================================================================== blocks
class KroneckerBlock(CurvatureBlock):
    """``A ⊗ G`` for a module with ``weight`` (and optional ``bias``) described by a :class:`LayerHelper`.

    Capture: a forward hook reads the input (``A`` rows) and registers a hook
    on the output tensor (``G`` rows).  A module called ``k`` times per
    forward contributes the rows of every call to ``A`` and ``G``, while the
    loss terms ``M`` are counted once per forward pass: this is K-FAC-expand
    over the calls (Eschenhagen et al. 2023), exact when the calls' output
    gradients are independent of their inputs.

    Parameters
    ----------
    name, module, ctx
        As :class:`CurvatureBlock`.
    helper : LayerHelper
        Rows and dimensions of the layer type.  Subclasses say how many loss
        terms one call has (``_call_terms``).

    Notes
    -----
    Cost per statistics step ``O(R (a_dim² + g_dim²))``; per decomposition
    that of the factor strategy; per preconditioning ``O(g_dim a_dim (g_dim + a_dim))``
    (full rank).  Memory ``O(a_dim² + g_dim²)`` (dense factors).
    """

    kind = "kronecker"

    def __init__(self, name: str, module: nn.Module, ctx: BlockContext, helper: LayerHelper) -> None:
        super().__init__(name, module, ctx)
        self.helper = helper
        self.factors = KroneckerFactors(ctx, helper.a_dim, helper.g_dim, name or "<model>", module.weight.device)

    def params(self) -> list[tuple[str, nn.Parameter]]:  # noqa: D102
        out = [(f"{self.name}.weight" if self.name else "weight", self.module.weight)]
        if self.helper.has_bias:
            out.append((f"{self.name}.bias" if self.name else "bias", self.module.bias))
        return [(n, p) for n, p in out if p.requires_grad]

    def fisher_params(self) -> list[nn.Parameter]:  # noqa: D102
        return [p for _, p in self.params()][:1]

    # ------------------------------------------------------------------ capture
    def _attach(self) -> list[Any]:
        return [self.module.register_forward_hook(eager_hook(self._forward_hook))]

    def _forward_hook(self, module: nn.Module, inputs: tuple, output: Any) -> None:
        if not (capture_allowed(module, self.ctx) and isinstance(output, torch.Tensor) and output.requires_grad):
            return
        t0 = self.ctx.timer()
        x = inputs[0].detach()
        self.factors.A.add(self._a_rows(x))
        self._record_call(self._call_terms(x))
        output.register_hook(self._grad_hook)
        self.seconds["statistics"] += self.ctx.timer() - t0

    def _grad_hook(self, grad: torch.Tensor) -> None:
        w = self.ctx.output_weight()
        if w is None or not self.ctx.capturing():
            return
        t0 = self.ctx.timer()
        rows = self._g_rows(grad.detach())
        self.factors.G.add(rows * w if w != 1.0 else rows)
        self.seconds["statistics"] += self.ctx.timer() - t0

    def _a_rows(self, x: torch.Tensor) -> torch.Tensor:
        return self.helper.a_rows(x)

    def _g_rows(self, grad: torch.Tensor) -> torch.Tensor:
        return self.helper.g_rows(grad)

    @abc.abstractmethod
    def _call_terms(self, x: torch.Tensor) -> int:
        """Loss terms ``M`` of one call with input ``x`` (each layer type says)."""

    # ------------------------------------------------------------------ statistics
    def _update(self, *, decompose: bool, damping: float, step: int) -> None:
        if not self.factors.update(self._terms, decompose=decompose, damping=damping, step=step):
            self._missing_fisher(step)

    def _discard(self) -> None:
        self.factors.discard()

    def statistics_holders(self) -> list[Any]:  # noqa: D102
        return list(self.factors.holders())

    @property
    def has_curvature(self) -> bool:  # noqa: D102
        return self.factors.ready()

    def _precondition(self, grads, damping):
        m = self.module
        bias = m.bias if self.helper.has_bias else None
        if not self.factors.ready():
            if self.factors.A.eigen is not None and self.factors.G.eigen is not None:
                self.counters["degenerate"] += 1
            return dict(grads)
        X = grads_matrix(m.weight, bias, grads, self.helper.g_dim)
        return split_matrix(self.factors.apply(X, damping), m.weight, bias, grads)

    # ------------------------------------------------------------------ state
    def _state(self) -> dict[str, Any]:
        return self.factors.state_dict()

    def _load(self, state: dict[str, Any]) -> None:
        self.factors.load_state_dict(state, self.name)

    def _dims(self) -> dict[str, int]:
        return {"A": self.helper.a_dim, "G": self.helper.g_dim}

    def _extra_stats(self) -> dict[str, Any]:
        return {"factors": self.factors.stats()}


class LinearBlock(KroneckerBlock):
    r"""``nn.Linear`` on inputs ``(N, ..., d_in)``: K-FAC-expand or K-FAC-reduce (Eschenhagen et al. 2023).

    With ``R`` positions per sample (the dimensions between the batch and the
    feature dimension; ``R = 1`` for 2-D inputs, where both modes are plain K-FAC):

    * ``mode="expand"``: every position is a row: ``A = (1/(NR)) Σ_{n,r} ā ā ᵀ``,
      ``G = s Σ_{n,r} g gᵀ``.  Exact (up to the ``A`` normalisation) when the
      per-position curvature of the output does not depend on the position,
      e.g. a position-wise deep linear network with a square loss.
    * ``mode="reduce"``: ``ā_n`` = mean of the sample's input rows, ``ĝ_n`` =
      sum of its output-gradient rows; ``A = (1/N) Σ_n ā_n ā_nᵀ``,
      ``G = s Σ_n ĝ_n ĝ_nᵀ``.  Exact for a single sequence whose output
      gradients are the same at every position (a linear weight-sharing
      layer followed by a mean/sum over positions); ``R`` times fewer rows.

    ``s = ctx.g_scale(M)`` with ``M`` the loss terms (``N R`` for
    ``loss_terms="positions"``, ``N`` for ``"samples"``).
    """

    kind = "linear"

    def __init__(self, name: str, module: nn.Linear, ctx: BlockContext, mode: Literal["expand", "reduce"] = "expand") -> None:
        if mode not in ("expand", "reduce"):
            raise ValueError(f"`mode` must be 'expand' or 'reduce', got {mode!r}")
        super().__init__(name, module, ctx, LinearHelper(module))
        self.mode = mode

    def _a_rows(self, x: torch.Tensor) -> torch.Tensor:
        if self.mode == "reduce" and x.ndim > 2:
            return self.helper._append_ones(x.reshape(x.shape[0], -1, x.shape[-1]).mean(1))
        return self.helper.a_rows(x)

    def _g_rows(self, grad: torch.Tensor) -> torch.Tensor:
        if self.mode == "reduce" and grad.ndim > 2:
            return grad.reshape(grad.shape[0], -1, grad.shape[-1]).sum(1)
        return self.helper.g_rows(grad)

    def _call_terms(self, x: torch.Tensor) -> int:
        if x.ndim < 2:
            return 1
        return math.prod(x.shape[:-1]) if self.ctx.loss_terms == "positions" else int(x.shape[0])

    def _extra_stats(self) -> dict[str, Any]:
        return {"mode": self.mode, **super()._extra_stats()}


class Conv1dBlock(KroneckerBlock):
    """``nn.Conv1d`` (``groups=1``, zero padding): KFC patch expansion, ``A`` over ``N L_out`` rows, ``M = N``."""

    kind = "conv1d"

    def __init__(self, name: str, module: nn.Conv1d, ctx: BlockContext) -> None:
        super().__init__(name, module, ctx, Conv1dHelper(module))

    def _call_terms(self, x: torch.Tensor) -> int:
        return int(x.shape[0]) if x.ndim == 3 else 1  # (N, C, L) or unbatched (C, L)


class Conv2dBlock(KroneckerBlock):
    """``nn.Conv2d`` (``groups=1``, zero padding): KFC (Grosse & Martens 2016), as the preconditioner's helper."""

    kind = "conv2d"

    def __init__(self, name: str, module: nn.Conv2d, ctx: BlockContext) -> None:
        super().__init__(name, module, ctx, Conv2dHelper(module))

    def _call_terms(self, x: torch.Tensor) -> int:
        return int(x.shape[0]) if x.ndim == 4 else 1  # (N, C, H, W) or unbatched (C, H, W)


def _conv_reason(module: nn.Module) -> str:
    if module.groups != 1:
        return f"{type(module).__name__} with groups={module.groups} is not supported (KFC needs groups=1)"
    if module.padding_mode != "zeros":
        return f"{type(module).__name__} with padding_mode={module.padding_mode!r} is not supported (needs 'zeros')"
    return ""


def _linear_factory(name: str, module: nn.Linear, ctx: BlockContext) -> LinearBlock:
    return LinearBlock(name, module, ctx)


def _conv1d_factory(name: str, module: nn.Conv1d, ctx: BlockContext) -> Conv1dBlock | str:
    return _conv_reason(module) or Conv1dBlock(name, module, ctx)


def _conv2d_factory(name: str, module: nn.Conv2d, ctx: BlockContext) -> Conv2dBlock | str:
    return _conv_reason(module) or Conv2dBlock(name, module, ctx)


register_block(nn.Linear, _linear_factory)
register_block(nn.Conv1d, _conv1d_factory)
register_block(nn.Conv2d, _conv2d_factory)
