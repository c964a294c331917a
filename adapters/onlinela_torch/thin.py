"""The thin-factor gradient path of Linear layers (``low_rank_grad``): pure functions of a layer's captured rows.

For a Linear layer the minibatch gradient is ``Goᵀ Ā`` (output gradients
``Go`` and inputs ``Ā`` of the captured batch, ``n`` rows each), so the
per-factor damped inverse applies to it through the thin factors:
``[(G+μ_G)⁻¹ Goᵀ] [(A+μ_A)⁻¹ Āᵀ]ᵀ``, ``O((d_in+d_out)(r+n)n)`` for the solves
instead of ``O(d_in d_out r)``.  A random probe checks each step that the
gradient really is that product (gradient accumulation, weight decay added to
``p.grad`` or clipping break it); the dense path is used otherwise.
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING

import torch

from .inverse import damped_solve, factor_scale

if TYPE_CHECKING:
    from .factors import FactorEigen
    from .layer import KFACLayer

__all__: list[str] = []


def candidate(layer: KFACLayer) -> bool:
    """Captured rows pair up and the thin path is cheaper than the dense one."""
    if not layer.low_rank_grad or not layer.thin_a or len(layer.thin_g) != len(layer.thin_a):
        return False
    eA = None if layer.A is None else layer.A.eigen
    eG = None if layer.G is None else layer.G.eigen
    if eA is None or eG is None:
        return False
    n = sum(r.shape[0] for r in layer.thin_a)
    a, gd = layer.helper.a_dim, layer.helper.g_dim
    rA, rG = eA.approx.rank, eG.approx.rank
    return 2 * a * gd * n + 4 * n * (gd * rG + a * rA) < 4 * a * gd * (rA + rG)


def probe_error(layer: KFACLayer, g: torch.Tensor, seed: int) -> torch.Tensor:
    """Relative mismatch ``‖g z - Σ Goᵀ(Ā z)‖ / ‖g z‖`` for a random probe ``z`` (0-dim).  Cost ``O(d_in d_out)``."""
    gen = torch.Generator().manual_seed(seed)
    z = torch.randn(g.shape[1], generator=gen).to(device=g.device, dtype=torch.float32)
    ref = g.float() @ z
    thin = sum(layer.thin_g[i].float().T @ (a.float() @ z) for i, a in enumerate(layer.thin_a))
    return (ref - thin).norm() / ref.norm().clamp_min(torch.finfo(torch.float32).tiny)


def probe_tol(layer: KFACLayer) -> float:
    """Probe tolerance: float32 round-off, looser for rows captured in a 16-bit dtype."""
    eps = max(torch.finfo(r.dtype).eps for r in layer.thin_a)
    return max(1e-4, 4 * eps)


def apply(
    layer: KFACLayer, eG: FactorEigen, eA: FactorEigen, lam: float, dtype: torch.dtype, scale: str, complement: str
) -> torch.Tensor:
    """``[(G+μ_G)⁻¹ Goᵀ] [(A+μ_A)⁻¹ Āᵀ]ᵀ`` in ``dtype``: solves ``O((d_in+d_out) r n)``, product ``O(d_in d_out n)``."""
    Ab = torch.cat(layer.thin_a, 0).to(dtype)
    Go = torch.cat([layer.thin_g[i] for i in range(len(layer.thin_a))], 0).to(dtype)
    mu = math.sqrt(lam)
    L = damped_solve(eG, Go.T, mu * factor_scale(eG, scale, complement), complement)
    R = damped_solve(eA, Ab.T, mu * factor_scale(eA, scale, complement), complement)
    return L @ R.T
