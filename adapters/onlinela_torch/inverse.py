"""Damped Kronecker inverses of factor snapshots: the pure functions every curvature path applies.

``apply_inverse`` (both damping conventions, complements of low-rank factors),
``damped_solve`` (one side), ``factor_scale`` (the scale the relative damping
multiplies).  Used by :class:`~onlinela_torch.KFACPreconditioner`, KLD-WRM and
the curvature blocks; no state.
"""

from __future__ import annotations

import math
from typing import Literal

import torch

from .factors import FactorEigen

__all__ = ["apply_inverse", "damped_solve", "factor_scale"]

def apply_inverse(
    G: FactorEigen,
    A: FactorEigen,
    X: torch.Tensor,
    damping: float,
    convention: Literal["product", "factor"],
    complement: Literal["zero", "min"] = "zero",
    scale: Literal["max", "mean"] = "max",
) -> torch.Tensor:
    r"""Damped Kronecker inverse applied to a gradient matrix ``X`` of shape ``(d_G, d_A)``.

    Each factor is ``U diag(w) Uᵀ + c (I - UUᵀ)`` with ``c = 0`` (``"zero"``, the
    papers) or ``c = min(w)`` (``"min"``) on the directions a low-rank
    decomposition did not compute; full-rank factors have no complement.

    * ``"product"``: ``(A ⊗ G + λ' I)⁻¹ vec(X)`` with ``λ' = λ · max eig G · max eig A``:
      the eigenvector ``u_i v_jᵀ`` of ``A ⊗ G`` is divided by ``g_i a_j + λ'``,
      ``V = U_G[(U_Gᵀ X U_A) ⊘ (g aᵀ + λ')]U_Aᵀ`` for full-rank factors (the
      K-FAC baseline), plus the three complement blocks otherwise.
    * ``"factor"``: ``(G + μ_G I)⁻¹ X (A + μ_A I)⁻¹`` with ``μ_X = √λ · max eig X``,
      each side by :func:`damped_solve`.  The square root gives the damped
      product ``(A + μ_A I) ⊗ (G + μ_G I)`` the same floor ``λ · max eig A · max eig G``
      as the product convention, so one ``λ`` means the same strength in both.

    Cost ``O(d_G d_A (r_G + r_A))``.  Computed in the factors' dtype; returned in ``X``'s.
    """
    Xi = X.to(G.approx.dtype)
    if convention == "factor":
        rel = math.sqrt(damping)
        V = damped_solve(G, Xi, rel * factor_scale(G, scale, complement), complement)
        return damped_solve(A, V, rel * factor_scale(A, scale, complement), complement, side="right").to(X.dtype)
    lam = damping * factor_scale(G, scale, complement) * factor_scale(A, scale, complement)
    UG, dG, UA, dA = G.approx.eigvecs, G.approx.eigvals, A.approx.eigvecs, A.approx.eigvals
    P = UG.T @ Xi  # (r_G, d_A)
    Cm = P @ UA  # (r_G, r_A)
    V = UG @ (Cm / (dG[:, None] * dA[None, :] + lam)) @ UA.T
    fullG, fullA = G.approx.rank == G.approx.dim, A.approx.rank == A.approx.dim
    if fullG and fullA:
        return V.to(X.dtype)
    cG, cA = _complement(G, complement), _complement(A, complement)
    if not fullA:  # G-span x A-complement
        V = V + UG @ ((P - Cm @ UA.T) / (dG[:, None] * cA + lam))
    Q = Xi @ UA  # (d_G, r_A)
    if not fullG:  # G-complement x A-span
        V = V + ((Q - UG @ Cm) / (cG * dA[None, :] + lam)) @ UA.T
    if not (fullG or fullA):  # both complements
        V = V + (Xi - UG @ P - Q @ UA.T + UG @ Cm @ UA.T) / (cG * cA + lam)
    return V.to(X.dtype)


def damped_solve(
    e: FactorEigen,
    X: torch.Tensor,
    mu: float,
    complement: Literal["zero", "min"] = "zero",
    *,
    side: Literal["left", "right"] = "left",
) -> torch.Tensor:
    r"""``(M + μI)⁻¹ X`` (``side="left"``) or ``X (M + μI)⁻¹`` (``"right"``) for a factor snapshot.

    The torch fast path of :meth:`onlinela.LowRankPSD.solve`:
    ``U[(w+μ)⁻¹ − (c+μ)⁻¹]UᵀX + (c+μ)⁻¹X`` with the last two terms fused in one
    ``addmm`` (one pass over ``X`` instead of three), ``c`` the complement
    eigenvalue (0, or ``min(w)`` for ``"min"``; none at full rank).

    Parameters
    ----------
    e : FactorEigen
        The factor, ``d × d`` with ``r`` stored eigenpairs.
    X : Tensor of shape (d, k) (left) or (k, d) (right)
        In the factor's dtype.
    mu : float > 0
        Absolute damping ``μ``.

    Returns
    -------
    Tensor of ``X``'s shape.  Cost ``O(d r k)``.
    """
    U, w = e.approx.eigvecs, e.approx.eigvals
    inv = 1.0 / (w + mu)
    if e.approx.rank == e.approx.dim:
        if side == "left":
            return U @ (inv[:, None] * (U.T @ X))
        return ((X @ U) * inv) @ U.T
    cp = 1.0 / (_complement(e, complement) + mu)
    coef = inv - cp
    if side == "left":
        return torch.addmm(X, U, coef[:, None] * (U.T @ X), beta=cp)
    return torch.addmm(X, (X @ U) * coef, U.T, beta=cp)


def factor_scale(e: FactorEigen, how: Literal["max", "mean"] = "max", complement: str = "min") -> float:
    """The damping scale of a factor: its largest eigenvalue, or its mean eigenvalue ``tr(M)/d``.

    The mean counts the complement eigenvalue on the ``d - r`` directions a
    low-rank decomposition did not compute.  Cached on the snapshot (one host
    read per decomposition).
    """
    if how == "max":
        return e.max_eig
    cached = _MEAN_EIG.get(id(e))
    if cached is not None and cached[0] is e:
        return cached[1]
    d, r = e.approx.dim, e.approx.rank
    value = (float(e.approx.eigvals.sum()) + (d - r) * _complement(e, complement)) / d
    _MEAN_EIG[id(e)] = (e, value)
    if len(_MEAN_EIG) > 4096:
        _MEAN_EIG.pop(next(iter(_MEAN_EIG)))
    return value


_MEAN_EIG: dict[int, tuple[FactorEigen, float]] = {}


def _complement(e: FactorEigen, complement: str) -> float:
    """Eigenvalue of the directions outside ``span(U)``: 0 or ``min(w)`` (a float, so no device sync)."""
    return e.min_eig if complement == "min" else 0.0
