r"""Scale-and-shift blocks for ``nn.LayerNorm``, ``nn.RMSNorm``, ``nn.BatchNorm1d/2d/3d`` and ``nn.GroupNorm``.

The affine output ``y = γ ⊙ x̂ + β`` has, for sample ``n`` and channel ``c``,
the per-sample gradients ``s^γ_{n,c} = Σ_p x̂_{n,c,p} g_{n,c,p}`` and
``s^β_{n,c} = Σ_p g_{n,c,p}`` (sums over the non-channel positions ``p`` of
the sample; ``g`` the captured output gradient).  The hooks capture ``x̂``
(recomputed from the input without affine, as the layer normalises in
training mode) and ``g``; the statistics are, with ``s = ctx.g_scale(M)``:

* ``mode="diagonal"`` (default): ``F_γ = s Σ_n (s^γ_n)²`` and ``F_β = s Σ_n (s^β_n)²``
  (the diagonal of the empirical/sampled Fisher of the per-sample gradients);
  preconditioned ``v = g / (F + μ)``;
* ``mode="full"``: per channel the ``2 × 2`` matrix ``s Σ_n [s^γ; s^β][s^γ; s^β]ᵀ``,
  preconditioned by a batched 2×2 solve with ``F_c + μ I``,

with ``μ = λ · max`` (the largest diagonal entry / eigenvalue of the block),
the block analogue of the Kronecker damping.  "Channels" are the
``normalized_shape`` elements of a LayerNorm/RMSNorm and dimension 1 of a
BatchNorm/GroupNorm input; for BatchNorm the ``s_n`` are the per-sample
*contributions* to the batch gradient (the batch statistics couple the
samples).  Cost ``O(N C P)`` per statistics step, ``O(C)`` per preconditioning.
"""

from __future__ import annotations

import math
from typing import Any, Literal

import torch
import torch.nn.functional as F
from torch import nn

from ..compiled import eager_hook
from .base import BlockContext, CurvatureBlock, capture_allowed, register_block
from .diagonal import TensorEA

__all__ = ["ScaleShiftBlock"]

_NORMS: tuple[type, ...] = (nn.LayerNorm, nn.RMSNorm, nn.GroupNorm, nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d)


class ScaleShiftBlock(CurvatureBlock):
    """Curvature of a normalisation layer's ``weight`` (γ) and ``bias`` (β) (module docstring).

    Parameters
    ----------
    name, module, ctx
        As :class:`CurvatureBlock`; ``module`` is one of the supported norms with affine parameters.
    mode : {"diagonal", "full"}
        Diagonal Fisher, or per-channel 2×2 blocks of ``(γ_c, β_c)`` (needs both).
    """

    kind = "scale-shift"

    def __init__(self, name: str, module: nn.Module, ctx: BlockContext, mode: Literal["diagonal", "full"] = "diagonal") -> None:
        if mode not in ("diagonal", "full"):
            raise ValueError(f"`mode` must be 'diagonal' or 'full', got {mode!r}")
        super().__init__(name, module, ctx)
        self.has_bias = getattr(module, "bias", None) is not None
        self.mode = mode if self.has_bias else "diagonal"
        C = module.weight.numel()
        shape = (C, 2, 2) if self.mode == "full" else (1 + int(self.has_bias), C)
        self.stat = TensorEA(shape, ctx.factor_decay, ctx.factor_dtype, module.weight.device)
        self._captured = False

    def params(self) -> list[tuple[str, nn.Parameter]]:  # noqa: D102
        pre = f"{self.name}." if self.name else ""
        out = [(pre + "weight", self.module.weight)] + ([(pre + "bias", self.module.bias)] if self.has_bias else [])
        return [(n, p) for n, p in out if p.requires_grad]

    def fisher_params(self) -> list[nn.Parameter]:  # noqa: D102  (one suffices: both see the same output)
        return [p for _, p in self.params()][:1]

    # ------------------------------------------------------------------ capture
    def _attach(self) -> list[Any]:
        return [self.module.register_forward_hook(eager_hook(self._forward_hook))]

    def _normalized(self, x: torch.Tensor) -> tuple[torch.Tensor, int]:
        """``x̂`` as ``(N, C, P)`` and the call's loss terms ``M``."""
        m = self.module
        if isinstance(m, (nn.LayerNorm, nn.RMSNorm)):
            ns = tuple(m.normalized_shape)
            xh = F.layer_norm(x, ns, None, None, m.eps) if isinstance(m, nn.LayerNorm) else F.rms_norm(x, ns, None, m.eps)
            lead = x.shape[: x.ndim - len(ns)]
            n = int(lead[0]) if lead else 1
            terms = math.prod(lead) if self.ctx.loss_terms == "positions" else n
            return xh.reshape(n, -1, math.prod(ns)).transpose(1, 2), terms
        if isinstance(m, nn.GroupNorm):
            xh = F.group_norm(x, m.num_groups, None, None, m.eps)
        else:
            xh = F.batch_norm(x, None, None, None, None, True, 0.0, m.eps)
        return xh.reshape(xh.shape[0], xh.shape[1], -1), int(xh.shape[0])

    def _forward_hook(self, module: nn.Module, inputs: tuple, output: Any) -> None:
        if not (capture_allowed(module, self.ctx) and isinstance(output, torch.Tensor) and output.requires_grad):
            return
        t0 = self.ctx.timer()
        with torch.no_grad():
            xh, terms = self._normalized(inputs[0].detach())
        self._record_call(terms)
        self._captured = True
        output.register_hook(lambda g: self._grad_hook(g, xh))
        self.seconds["statistics"] += self.ctx.timer() - t0

    def _grad_hook(self, grad: torch.Tensor, xh: torch.Tensor) -> None:
        w = self.ctx.output_weight()
        if w is None or not self.ctx.capturing():
            return
        t0 = self.ctx.timer()
        g = grad.detach()
        if isinstance(self.module, (nn.LayerNorm, nn.RMSNorm)):
            g = g.reshape(xh.shape[0], -1, xh.shape[1]).transpose(1, 2)
        else:
            g = g.reshape(xh.shape)
        g = g.to(self.ctx.factor_dtype) * w
        s_g = (xh.to(g.dtype) * g).sum(-1)  # (N, C)
        parts = [s_g, g.sum(-1)] if self.has_bias else [s_g]
        if self.mode == "full":
            S = torch.stack(parts, -1)  # (N, C, 2)
            self.stat.add(torch.einsum("nci,ncj->cij", S, S))
        else:
            self.stat.add(torch.stack([p.square().sum(0) for p in parts]))
        self.seconds["statistics"] += self.ctx.timer() - t0

    # ------------------------------------------------------------------ statistics
    def _update(self, *, decompose: bool, damping: float, step: int) -> None:
        if self._captured and self.ctx.fisher != "empirical" and self.stat.pending is None:
            self._missing_fisher(step)
        if self.ctx.plan().ea and not self.stat.update(self.ctx.g_scale(self._terms)):
            self._skip(step, "non-finite per-sample gradients")
        self.stat.discard()
        if decompose:
            self.stat.refresh()

    def _discard(self) -> None:
        self._captured = False
        self.stat.discard()

    def statistics_holders(self) -> list[Any]:  # noqa: D102
        return [self.stat]

    @property
    def has_curvature(self) -> bool:  # noqa: D102
        return self.stat.snapshot is not None and bool(self.stat.snapshot.max() > 0)

    def _precondition(self, grads, damping):
        if not self.has_curvature:
            return dict(grads)
        m = self.module
        Fs = self.stat.snapshot.to(self.ctx.inv_dtype)
        ps = [m.weight] + ([m.bias] if self.has_bias else [])
        G = torch.stack([
            (grads[p] if p in grads else torch.zeros_like(p)).reshape(-1).to(Fs.dtype) for p in ps
        ])  # (1|2, C)
        if self.mode == "full":
            mu = damping * float(torch.linalg.eigvalsh(Fs).max())
            eye = torch.eye(2, dtype=Fs.dtype, device=Fs.device)
            V = torch.linalg.solve(Fs + mu * eye, G.T.unsqueeze(-1)).squeeze(-1).T
        else:
            V = G / (Fs + damping * float(Fs.max()))
        return {p: V[i].reshape(p.shape).to(grads[p].dtype) for i, p in enumerate(ps) if p in grads}

    # ------------------------------------------------------------------ state
    def _state(self) -> dict[str, Any]:
        return {"mode": self.mode, "stat": self.stat.state_dict()}

    def _load(self, state: dict[str, Any]) -> None:
        if state["mode"] != self.mode:
            raise ValueError(f"block {self.name!r}: the checkpoint holds mode {state['mode']!r}, this block {self.mode!r}")
        self.stat.load_state_dict(state["stat"], f"block {self.name!r}")

    def _dims(self) -> dict[str, int]:
        return {"channels": self.module.weight.numel()}

    def _extra_stats(self) -> dict[str, Any]:
        return {"mode": self.mode}


def _norm_factory(name: str, module: nn.Module, ctx: BlockContext) -> ScaleShiftBlock | str:
    if getattr(module, "weight", None) is None:  # only a bias (LayerNorm(bias=True) cannot be): not modelled
        return f"{type(module).__name__} with a bias but no weight is not supported"
    return ScaleShiftBlock(name, module, ctx)


for _cls in _NORMS:
    register_block(_cls, _norm_factory)
