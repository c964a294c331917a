r"""``nn.Embedding``: a diagonal token-count factor ``A`` and a dense (or low-rank) ``G``.

The weight ``W`` has shape ``(V, D)`` (``num_embeddings × embedding_dim``);
position ``r`` with token ``t_r`` contributes ``e_{t_r} g_rᵀ`` to the gradient,
so (K-FAC-expand over positions, as kfac-jax and ASDL do):

* ``A = (1/R) Σ_r e_{t_r} e_{t_r}ᵀ = diag(counts) / R`` — exactly diagonal, stored as a
  vector of length ``V``; positions holding ``padding_idx`` (whose gradient
  torch drops) are left out of the counts and of ``G``;
* ``G = s Σ_r g_r g_rᵀ`` (``D × D``) from ``ctx.make_factor``, so a wide
  embedding gets the orchestrator's randomized / Brand factor.

Preconditioning ``(A ⊗ G)`` in the weight's layout (rows: tokens):

* ``"factor"``: ``V = diag(1/(a + μ_A)) dW (G + μ_G I)⁻¹``, ``μ = √λ · max``;
* ``"product"``: ``V_{ij}`` in ``G``'s eigenbasis divided by ``a_i g_j + λ · max a · max g``.

Cost per statistics step ``O(R D²)``; per preconditioning ``O(V D r_G)``.
Rows of never-seen tokens have a zero gradient and stay zero; with tied
input/output embeddings (see :func:`~onlinela_torch.blocks.build_blocks`)
the output layer's block preconditions the shared matrix.
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import nn

from ..compiled import eager_hook
from .base import BlockContext, CurvatureBlock, capture_allowed, register_block
from .diagonal import TensorEA
from .kronecker import FactorSlot

__all__ = ["EmbeddingBlock"]


class EmbeddingBlock(CurvatureBlock):
    """Curvature of ``nn.Embedding.weight`` (module docstring)."""

    kind = "embedding"

    def __init__(self, name: str, module: nn.Embedding, ctx: BlockContext) -> None:
        super().__init__(name, module, ctx)
        dev = module.weight.device
        self.A = TensorEA((module.num_embeddings,), ctx.factor_decay, ctx.factor_dtype, dev)
        self.G = FactorSlot(ctx, module.embedding_dim, f"{name or '<model>'}/G", dev)
        self._rows = 0

    def params(self) -> list[tuple[str, nn.Parameter]]:  # noqa: D102
        w = self.module.weight
        return [(f"{self.name}.weight" if self.name else "weight", w)] if w.requires_grad else []

    # ------------------------------------------------------------------ capture
    def _attach(self) -> list[Any]:
        return [self.module.register_forward_hook(eager_hook(self._forward_hook))]

    def _forward_hook(self, module: nn.Embedding, inputs: tuple, output: Any) -> None:
        if not (capture_allowed(module, self.ctx) and isinstance(output, torch.Tensor) and output.requires_grad):
            return
        t0 = self.ctx.timer()
        idx = inputs[0].detach()
        flat = idx.reshape(-1)
        keep = None if module.padding_idx is None else flat != module.padding_idx
        counts = torch.bincount(flat if keep is None else flat[keep], minlength=module.num_embeddings)
        self.A.add(counts)
        self._rows += flat.numel()
        terms = idx.numel() if self.ctx.loss_terms == "positions" else (int(idx.shape[0]) if idx.ndim >= 2 else 1)
        self._record_call(terms)
        output.register_hook(lambda g: self._grad_hook(g, keep))
        self.seconds["statistics"] += self.ctx.timer() - t0

    def _grad_hook(self, grad: torch.Tensor, keep: torch.Tensor | None) -> None:
        w = self.ctx.output_weight()
        if w is None or not self.ctx.capturing():
            return
        t0 = self.ctx.timer()
        rows = grad.detach().reshape(-1, grad.shape[-1])
        if keep is not None:
            rows = rows[keep]
        if rows.shape[0]:
            self.G.add(rows * w if w != 1.0 else rows)
        self.seconds["statistics"] += self.ctx.timer() - t0

    # ------------------------------------------------------------------ statistics
    def _update(self, *, decompose: bool, damping: float, step: int) -> None:
        p = self.ctx.plan()
        if self._rows and self.ctx.fisher != "empirical" and not self.G.pending:
            self._missing_fisher(step)
        if p.ea and self._rows and not self.A.update(1.0 / self._rows):
            self._skip(step, "non-finite token counts")
        self.A.discard()
        self.G.update(self.ctx.g_scale(self._terms), decompose=decompose, damping=damping, step=step)
        if decompose:
            self.A.refresh()

    def _discard(self) -> None:
        self._rows = 0
        self.A.discard()
        self.G.discard()

    def statistics_holders(self) -> list[Any]:  # noqa: D102
        return [self.A, self.G]

    @property
    def has_curvature(self) -> bool:  # noqa: D102
        a, e = self.A.snapshot, self.G.eigen
        return a is not None and e is not None and e.max_eig > 0 and bool(a.max() > 0)

    def _precondition(self, grads, damping):
        w = self.module.weight
        if w not in grads or not self.has_curvature:
            return dict(grads)
        e = self.G.eigen
        X = grads[w].to(e.approx.dtype)
        a = self.A.snapshot.to(e.approx.dtype)
        a_max = float(a.max())
        U, g = e.approx.eigvecs, e.approx.eigvals
        if self.ctx.damping_convention == "factor":
            rel = math.sqrt(damping)
            from ..inverse import damped_solve  # the one implementation

            V = damped_solve(e, X, rel * e.max_eig, self.ctx.complement, side="right") / (a + rel * a_max)[:, None]
        else:
            lam = damping * a_max * e.max_eig
            P = X @ U  # (V, r)
            V = (P / (a[:, None] * g[None, :] + lam)) @ U.T
            if e.approx.rank < e.approx.dim:
                c = e.min_eig if self.ctx.complement == "min" else 0.0  # eigenvalue outside span(U)
                V = V + (X - P @ U.T) / (a[:, None] * c + lam)
        return {w: V.to(grads[w].dtype)}

    # ------------------------------------------------------------------ state
    def _state(self) -> dict[str, Any]:
        return {"A": self.A.state_dict(), "G": self.G.state_dict()}

    def _load(self, state: dict[str, Any]) -> None:
        self.A.load_state_dict(state["A"], f"block {self.name!r}: token counts")
        self.G.load_state_dict(state["G"], self.name)

    def _dims(self) -> dict[str, int]:
        return {"A": self.module.num_embeddings, "G": self.module.embedding_dim}

    def _extra_stats(self) -> dict[str, Any]:
        return {"factors": {"A": {"kind": "diagonal", "dim": self.module.num_embeddings}, "G": self.G.stats()}}


def _embedding_factory(name: str, module: nn.Embedding, ctx: BlockContext) -> EmbeddingBlock | str:
    if module.sparse:
        return "Embedding with sparse=True is not supported (sparse gradients)"
    if module.scale_grad_by_freq:
        return "Embedding with scale_grad_by_freq=True is not supported (its gradient is not A ⊗ G structured)"
    return EmbeddingBlock(name, module, ctx)


register_block(nn.Embedding, _embedding_factory)
