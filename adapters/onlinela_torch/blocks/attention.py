"""``nn.MultiheadAttention``: Kronecker blocks for the q/k/v projections and ``out_proj``.

torch runs attention through ``F.multi_head_attention_forward``, which calls
the projection weights directly, so hooks on ``out_proj`` never fire and the
packed ``in_proj_weight`` is invisible to module hooks.  :meth:`attach`
therefore replaces the module's ``forward`` (an instance attribute; the class
is untouched) by one that computes the same function with explicit
``F.linear`` calls for the four projections, capturing their inputs and
output gradients, and ``F.scaled_dot_product_attention`` (or the explicit
softmax when ``need_weights``) for the core.  It mirrors torch's slow path
step by step (``batch_first`` both ways, unbatched inputs, bool/float
``attn_mask`` and ``key_padding_mask``, ``is_causal``, ``need_weights`` and
``average_attn_weights``, dropout, ``bias_k``/``bias_v``, ``add_zero_attn``,
separate ``kdim``/``vdim`` weights), so outputs agree with the original
module (float64 to round-off).  :meth:`detach` restores the original forward.

Outside capture (eval mode, ``torch.no_grad()``, or a step without
statistics) the replacement calls the original forward, so inference keeps
torch's fused fast path; ``nn.TransformerEncoderLayer`` only takes its own
fast path (``torch._transformer_encoder_layer_fwd``, which bypasses
``self_attn``) when not training and without grad, i.e. never when
statistics are captured.

Curvature: each projection ``P ∈ {q, k, v, out}`` is its own Kronecker
block ``A_P ⊗ G_P``: ``A_P`` from the rows of its input (query / key / value /
the heads' concatenated output), ``G_P`` from its output gradients, every
position a row (``mode="expand"``, default) or, per sample, the mean input
row and the summed output-gradient row (``mode="reduce"``, as
:class:`~onlinela_torch.blocks.LinearBlock`).  The loss terms ``M`` are the query positions
(``N L`` for ``loss_terms="positions"``, ``N`` for ``"samples"``) for all four.
The packed ``in_proj_weight`` gradient ``(3E, E)`` is preconditioned slice by
slice; the cross-projection correlations are not modelled.
"""

from __future__ import annotations

import math
from typing import Any, Literal

import torch
import torch.nn.functional as F
from torch import nn

from ..compiled import eager_hook
from .base import BlockContext, CurvatureBlock, capture_allowed, register_block
from .kronecker import KroneckerFactors, weight_matrix

__all__ = ["MultiheadAttentionBlock"]

_PROJ = ("q", "k", "v", "out")


class _Restore:
    """Handle restoring the module's ``forward`` attribute."""

    def __init__(self, module: nn.Module, previous: Any) -> None:
        self.module, self.previous = module, previous

    def remove(self) -> None:
        if self.previous is None:
            self.module.__dict__.pop("forward", None)
        else:
            self.module.forward = self.previous


def _canonical(mask: torch.Tensor | None, dtype: torch.dtype, name: str) -> torch.Tensor | None:
    """Bool masks (True = masked) become additive float masks with ``-inf``, as torch does."""
    if mask is None:
        return None
    if mask.dtype == torch.bool:
        return torch.zeros_like(mask, dtype=dtype).masked_fill_(mask, float("-inf"))
    if not torch.is_floating_point(mask):
        raise TypeError(f"`{name}` must be a bool or floating tensor, got {mask.dtype}")
    return mask


class MultiheadAttentionBlock(CurvatureBlock):
    """Curvature of ``nn.MultiheadAttention``'s projections (module docstring).

    Covered parameters: ``in_proj_weight`` (or ``q_proj_weight``,
    ``k_proj_weight``, ``v_proj_weight``), ``in_proj_bias``, ``out_proj.weight``,
    ``out_proj.bias``.  ``bias_k`` / ``bias_v`` are not covered (plain gradient).

    Notes
    -----
    Cost per statistics step ``O(N (L + 2S + L) E²)`` for the four Gram
    matrices; memory four pairs of ``(E+1)²`` and ``E²`` factors; per
    preconditioning ``O(E³)`` per projection (full rank).
    """

    kind = "attention"

    def __init__(
        self, name: str, module: nn.MultiheadAttention, ctx: BlockContext, mode: Literal["expand", "reduce"] = "expand"
    ) -> None:
        if mode not in ("expand", "reduce"):
            raise ValueError(f"`mode` must be 'expand' or 'reduce', got {mode!r}")
        super().__init__(name, module, ctx)
        self.mode = mode
        m = module
        E = m.embed_dim
        b_in = int(m.in_proj_bias is not None)
        b_out = int(m.out_proj.bias is not None)
        dev = m.out_proj.weight.device
        base = name or "<model>"
        in_dims = {"q": E, "k": m.kdim, "v": m.vdim, "out": E}
        self.factors = {
            p: KroneckerFactors(ctx, in_dims[p] + (b_out if p == "out" else b_in), E, f"{base}/{p}", dev) for p in _PROJ
        }
        self._orig: Any = None

    # ------------------------------------------------------------------ parameters
    def _named(self) -> list[tuple[str, nn.Parameter | None]]:
        m = self.module
        if m._qkv_same_embed_dim:
            ins = [("in_proj_weight", m.in_proj_weight)]
        else:
            ins = [(f"{p}_proj_weight", getattr(m, f"{p}_proj_weight")) for p in "qkv"]
        return ins + [("in_proj_bias", m.in_proj_bias), ("out_proj.weight", m.out_proj.weight), ("out_proj.bias", m.out_proj.bias)]

    def params(self) -> list[tuple[str, nn.Parameter]]:  # noqa: D102
        pre = f"{self.name}." if self.name else ""
        return [(pre + n, p) for n, p in self._named() if p is not None and p.requires_grad]

    def fisher_params(self) -> list[nn.Parameter]:  # noqa: D102
        m = self.module
        ws = [m.in_proj_weight] if m._qkv_same_embed_dim else [m.q_proj_weight, m.k_proj_weight, m.v_proj_weight]
        return [p for p in ws + [m.out_proj.weight] if p.requires_grad]

    def _weights(self) -> dict[str, tuple[torch.Tensor, torch.Tensor | None]]:
        """``(W_P, b_P)`` of the four projections (views into the packed parameters)."""
        m = self.module
        b = [None] * 3 if m.in_proj_bias is None else list(m.in_proj_bias.chunk(3))
        if m._qkv_same_embed_dim:
            W = list(m.in_proj_weight.chunk(3))
        else:
            W = [m.q_proj_weight, m.k_proj_weight, m.v_proj_weight]
        out = {p: (W[i], b[i]) for i, p in enumerate("qkv")}
        out["out"] = (m.out_proj.weight, m.out_proj.bias)
        return out

    def _owners(self, proj: str) -> tuple[nn.Parameter, nn.Parameter | None, slice]:
        """The parameters holding projection ``proj``'s weight and bias, and its rows in them."""
        m = self.module
        if proj == "out":
            return m.out_proj.weight, m.out_proj.bias, slice(None)
        i = "qkv".index(proj)
        rows = slice(i * m.embed_dim, (i + 1) * m.embed_dim)
        w = m.in_proj_weight if m._qkv_same_embed_dim else getattr(m, f"{proj}_proj_weight")
        return w, m.in_proj_bias, rows

    # ------------------------------------------------------------------ capture
    def _attach(self) -> list[Any]:
        previous = self.module.__dict__.get("forward")
        self._orig = self.module.forward
        self.module.forward = eager_hook(self._forward)  # under torch.compile the captured forward runs eagerly
        return [_Restore(self.module, previous)]

    def _linear(self, proj: str, x: torch.Tensor, w: torch.Tensor, b: torch.Tensor | None, n: int) -> torch.Tensor:
        """``F.linear`` with capture; ``x`` is ``(positions, n, d)`` or ``(positions·n, d)`` position-major."""
        out = F.linear(x, w, b)
        if out.requires_grad:
            t0 = self.ctx.timer()
            rows = x.detach().reshape(-1, x.shape[-1])
            if self.mode == "reduce":  # per sample: the mean input row
                rows = rows.reshape(-1, n, rows.shape[-1]).mean(0)
            if b is not None:
                rows = torch.cat([rows, rows.new_ones(rows.shape[0], 1)], 1)
            self.factors[proj].A.add(rows)
            out.register_hook(lambda g, proj=proj: self._grad_hook(proj, g, n))
            self.seconds["statistics"] += self.ctx.timer() - t0
        return out

    def _grad_hook(self, proj: str, grad: torch.Tensor, n: int) -> None:
        w = self.ctx.output_weight()
        if w is None or not self.ctx.capturing():
            return
        t0 = self.ctx.timer()
        rows = grad.detach().reshape(-1, grad.shape[-1])
        if self.mode == "reduce":  # per sample: the summed output gradient
            rows = rows.reshape(-1, n, rows.shape[-1]).sum(0)
        self.factors[proj].G.add(rows * w if w != 1.0 else rows)
        self.seconds["statistics"] += self.ctx.timer() - t0

    def _forward(
        self,
        query: torch.Tensor,
        key: torch.Tensor,
        value: torch.Tensor,
        key_padding_mask: torch.Tensor | None = None,
        need_weights: bool = True,
        attn_mask: torch.Tensor | None = None,
        average_attn_weights: bool = True,
        is_causal: bool = False,
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        m = self.module
        if not capture_allowed(m, self.ctx) or query.is_nested:
            return self._orig(query, key, value, key_padding_mask=key_padding_mask, need_weights=need_weights,
                              attn_mask=attn_mask, average_attn_weights=average_attn_weights, is_causal=is_causal)
        is_batched = query.dim() == 3
        kpm = _canonical(key_padding_mask, query.dtype, "key_padding_mask")
        am = _canonical(attn_mask, query.dtype, "attn_mask")
        if m.batch_first and is_batched:
            query, key, value = (t.transpose(1, 0) for t in (query, key, value))
        if not is_batched:
            query, key, value = (t.unsqueeze(1) for t in (query, key, value))
            kpm = None if kpm is None else kpm.unsqueeze(0)
        L, N, E = query.shape
        if is_causal and am is None:
            raise RuntimeError("Need attn_mask if specifying the is_causal hint (as torch's MultiheadAttention).")
        causal = is_causal and kpm is None and not need_weights
        if causal:
            am = None
        positions = self.ctx.loss_terms == "positions"
        self._record_call((L * N if positions else N) if is_batched else (L if positions else 1))
        W = self._weights()
        q = self._linear("q", query, *W["q"], N)
        k = self._linear("k", key, *W["k"], N)
        v = self._linear("v", value, *W["v"], N)
        heads, weights = _attention_core(m, q, k, v, am, kpm, need_weights, average_attn_weights, causal)
        out = self._linear("out", heads, *W["out"], N).view(L, N, E)
        if not is_batched:
            return out.squeeze(1), None if weights is None else weights.squeeze(0)
        return (out.transpose(1, 0) if m.batch_first else out), weights

    # ------------------------------------------------------------------ statistics
    def _update(self, *, decompose: bool, damping: float, step: int) -> None:
        ok = [f.update(self._terms, decompose=decompose, damping=damping, step=step) for f in self.factors.values()]
        if not all(ok):
            self._missing_fisher(step)

    def _discard(self) -> None:
        for f in self.factors.values():
            f.discard()

    def statistics_holders(self) -> list[Any]:  # noqa: D102
        return [h for p in _PROJ for h in self.factors[p].holders()]

    @property
    def has_curvature(self) -> bool:  # noqa: D102
        return any(f.ready() for f in self.factors.values())

    def _precondition(self, grads, damping):
        E = self.module.embed_dim
        new: dict[nn.Parameter, torch.Tensor] = {}  # packed parameters, filled slice by slice
        for p in _PROJ:
            f = self.factors[p]
            if not f.ready():
                continue
            w_param, b_param, rows = self._owners(p)
            shared = p != "out"  # the bias (and packed weight) hold all three of q, k, v
            gw = self._slice(w_param, rows, grads, new, shared=shared and self.module._qkv_same_embed_dim)
            gb = None if b_param is None else self._slice(b_param, rows, grads, new, shared=shared)
            V = f.apply(weight_matrix(gw, gb, E), damping)
            n_w = V.shape[1] - int(gb is not None)
            gw.copy_(V[:, :n_w].reshape(gw.shape))
            if gb is not None:
                gb.copy_(V[:, n_w])
        out = dict(grads)
        out.update({p: t for p, t in new.items() if p in grads})
        return out

    @staticmethod
    def _slice(param, rows, grads, new, *, shared: bool) -> torch.Tensor:
        """A writable slice of the new gradient of ``param`` (zeros when it has no gradient)."""
        if param not in new:
            g = grads.get(param)
            new[param] = torch.zeros_like(param) if g is None else g.clone()
        return new[param][rows] if shared else new[param]

    # ------------------------------------------------------------------ state
    def _state(self) -> dict[str, Any]:
        return {p: f.state_dict() for p, f in self.factors.items()}

    def _load(self, state: dict[str, Any]) -> None:
        if set(state) != set(_PROJ):
            raise ValueError(f"block {self.name!r}: the checkpoint holds projections {sorted(state)}, expected {list(_PROJ)}")
        for p, f in self.factors.items():
            f.load_state_dict(state[p], self.name)

    def _dims(self) -> dict[str, int]:
        return {f"{p}/{w}": getattr(f, w).dim for p, f in self.factors.items() for w in ("A", "G")}

    def _extra_stats(self) -> dict[str, Any]:
        return {"mode": self.mode, "factors": {p: f.stats() for p, f in self.factors.items()}}


def _attention_core(
    m: nn.MultiheadAttention,
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    am: torch.Tensor | None,
    kpm: torch.Tensor | None,
    need_weights: bool,
    average_attn_weights: bool,
    causal: bool,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Attention of projected ``q (L, N, E)``, ``k, v (S, N, E)`` as torch's slow path: heads ``(L·N, E)`` and weights.

    ``am``: additive float mask ``(L, S)`` or ``(N·H, L, S)``; ``kpm``: additive ``(N, S)``.
    """
    L, N, E = q.shape
    H = m.num_heads
    hd = E // H
    if am is not None:
        if am.dim() == 2:
            if am.shape != (L, k.shape[0]):
                raise RuntimeError(f"The shape of the 2D attn_mask is {tuple(am.shape)}, but should be {(L, k.shape[0])}.")
            am = am.unsqueeze(0)
        elif am.dim() != 3:
            raise RuntimeError(f"attn_mask's dimension {am.dim()} is not supported")
    if m.bias_k is not None and m.bias_v is not None:
        k = torch.cat([k, m.bias_k.repeat(1, N, 1)])
        v = torch.cat([v, m.bias_v.repeat(1, N, 1)])
        am = None if am is None else F.pad(am, (0, 1))
        kpm = None if kpm is None else F.pad(kpm, (0, 1))
    q = q.reshape(L, N * H, hd).transpose(0, 1)
    k = k.reshape(k.shape[0], N * H, hd).transpose(0, 1)
    v = v.reshape(v.shape[0], N * H, hd).transpose(0, 1)
    if m.add_zero_attn:
        zeros = k.new_zeros(N * H, 1, hd)
        k, v = torch.cat([k, zeros], 1), torch.cat([v, zeros], 1)
        am = None if am is None else F.pad(am, (0, 1))
        kpm = None if kpm is None else F.pad(kpm, (0, 1))
    S = k.shape[1]
    if kpm is not None:
        kpm = kpm.reshape(N, 1, 1, S).expand(-1, H, -1, -1).reshape(N * H, 1, S)
        am = kpm if am is None else am + kpm
    p_drop = m.dropout if m.training else 0.0
    if not need_weights:
        if am is not None:
            am = am.unsqueeze(0) if am.size(0) == 1 and am.dim() == 3 else am.view(N, H, -1, S)
        o = F.scaled_dot_product_attention(q.view(N, H, L, hd), k.view(N, H, S, hd), v.view(N, H, S, hd), am, p_drop, causal)
        return o.permute(2, 0, 1, 3).contiguous().view(N * L, E), None
    qs = q * math.sqrt(1.0 / float(hd))
    scores = torch.baddbmm(am, qs, k.transpose(-2, -1)) if am is not None else torch.bmm(qs, k.transpose(-2, -1))
    weights = torch.softmax(scores, dim=-1)
    if p_drop > 0.0:
        weights = F.dropout(weights, p=p_drop)
    heads = torch.bmm(weights, v).transpose(0, 1).reshape(L * N, E)
    weights = weights.view(N, H, L, S)
    return heads, (weights.mean(dim=1) if average_attn_weights else weights)


def _mha_factory(name: str, module: nn.MultiheadAttention, ctx: BlockContext) -> MultiheadAttentionBlock | str:
    if module.embed_dim % module.num_heads:
        return f"MultiheadAttention with embed_dim {module.embed_dim} not divisible by num_heads {module.num_heads}"
    return MultiheadAttentionBlock(name, module, ctx)


register_block(nn.MultiheadAttention, _mha_factory)
