"""Damped Kronecker inverses of factor snapshots: the pure functions every curvature path applies.

``apply_inverse`` (both damping conventions, complements of low-rank factors),
``damped_solve`` (one side), ``factor_scale`` (the scale the relative damping
multiplies).  Used by :class:`~onlinela_torch.KFACPreconditioner`, KLD-WRM and
the curvature blocks.  What depends only on a snapshot and its damping (the
eigenvalue coefficients, the dense damped inverse of a factor, the mean
eigenvalue) is cached on the snapshot (:attr:`FactorEigen.cache`) under the
damping it was computed for, so a damping that changes every step (a
schedule, adaptive damping) recomputes it and never reads a stale one.
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
    *,
    reuse: int = 1,
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

    Parameters
    ----------
    reuse : int >= 1
        How many calls the caller expects to make with these snapshots and
        this damping (e.g. the steps until the next decomposition under a
        constant damping); it lets :func:`damped_solve` amortise forming a
        dense damped inverse.  It changes the cost, never the result beyond
        round-off.

    Cost ``O(d_G d_A (r_G + r_A))`` (``"factor"``: ``O(d_G d_A (d_G + d_A))`` per
    side where that is cheaper, see :func:`damped_solve`).  Computed in the
    factors' dtype; returned in ``X``'s.
    """
    Xi = X if X.dtype == G.approx.dtype else X.to(G.approx.dtype)
    if convention == "factor":
        rel = math.sqrt(damping)
        V = damped_solve(G, Xi, rel * factor_scale(G, scale, complement), complement, reuse=reuse)
        V = damped_solve(A, V, rel * factor_scale(A, scale, complement), complement, side="right", reuse=reuse)
        return V if V.dtype == X.dtype else V.to(X.dtype)
    lam = damping * factor_scale(G, scale, complement) * factor_scale(A, scale, complement)
    UG, dG, UA, dA = G.approx.eigvecs, G.approx.eigvals, A.approx.eigvecs, A.approx.eigvals
    fullG, fullA = G.approx.rank == G.approx.dim, A.approx.rank == A.approx.dim
    P = UG.T @ Xi  # (r_G, d_A)
    Cm = P @ UA  # (r_G, r_A)
    if fullG and fullA:  # the K-FAC baseline: four products, the weighting in place
        V = UG @ Cm.mul_(_product_weights(G, A, lam)) @ UA.T
        return V if V.dtype == X.dtype else V.to(X.dtype)
    V = UG @ (Cm * _product_weights(G, A, lam)) @ UA.T
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
    reuse: int = 1,
) -> torch.Tensor:
    r"""``(M + μI)⁻¹ X`` (``side="left"``) or ``X (M + μI)⁻¹`` (``"right"``) for a factor snapshot.

    The torch fast path of :meth:`onlinela.LowRankPSD.solve`:
    ``U[(w+μ)⁻¹ − (c+μ)⁻¹]UᵀX + (c+μ)⁻¹X`` with the last two terms fused in one
    ``addmm`` (one pass over ``X`` instead of three), ``c`` the complement
    eigenvalue (0, or ``min(w)`` for ``"min"``; none at full rank).  When the
    dense damped inverse ``(M + μI)⁻¹`` (``d × d``, formed once per snapshot
    and ``μ`` at cost ``d² r``) is cheaper to apply, ``d² k`` against
    ``2 d r k`` for ``k`` columns with the forming cost spread over ``reuse``
    calls, it is applied instead: the same operator, different round-off.

    Parameters
    ----------
    e : FactorEigen
        The factor, ``d × d`` with ``r`` stored eigenpairs.
    X : Tensor of shape (d, k) (left) or (k, d) (right)
        In the factor's dtype.
    mu : float > 0
        Absolute damping ``μ``.
    reuse : int >= 1
        Expected calls with this snapshot and ``μ`` (see :func:`apply_inverse`).

    Returns
    -------
    Tensor of ``X``'s shape.  Cost ``O(d k min(2r, d + d r / reuse))``.
    """
    U = e.approx.eigvecs
    d, r = e.approx.dim, e.approx.rank
    k = X.shape[1] if side == "left" else X.shape[0]
    if _dense_pays(d, r, k, reuse):
        Minv = _dense_inverse(e, mu, complement)
        return Minv @ X if side == "left" else X @ Minv
    coef, cp = _solve_coefficients(e, mu, complement)
    if cp is None:
        if side == "left":
            return U @ (coef[:, None] * (U.T @ X))
        return ((X @ U) * coef) @ U.T
    if side == "left":
        return torch.addmm(X, U, coef[:, None] * (U.T @ X), beta=cp)
    return torch.addmm(X, (X @ U) * coef, U.T, beta=cp)


def _dense_pays(d: int, r: int, k: int, reuse: int = 1) -> bool:
    """Whether applying a dense ``d × d`` damped inverse to ``k`` vectors beats the rank-``r`` eigenbasis products.

    Dense: ``d² k`` multiply-adds plus ``d² r / reuse`` for forming it;
    eigenbasis: ``2 d r k``.  So only factors with ``r > d / 2`` (full-rank
    ones in practice) ever use the dense inverse.
    """
    return d * k + d * r / max(reuse, 1) < 2 * r * k


def _solve_coefficients(e: FactorEigen, mu: float, complement: str) -> tuple[torch.Tensor, float | None]:
    """``(w+μ)⁻¹`` (full rank) or ``(w+μ)⁻¹ − (c+μ)⁻¹`` and ``(c+μ)⁻¹``, cached on the snapshot per ``μ``."""
    key = ("coef", mu, complement)
    hit = e.cache.get("coef")
    if hit is not None and hit[0] == key:
        return hit[1]
    inv = 1.0 / (e.approx.eigvals + mu)
    if e.approx.rank == e.approx.dim:
        out: tuple[torch.Tensor, float | None] = (inv, None)
    else:
        cp = 1.0 / (_complement(e, complement) + mu)
        out = (inv - cp, cp)
    e.cache["coef"] = (key, out)
    return out


def _dense_inverse(e: FactorEigen, mu: float, complement: str) -> torch.Tensor:
    """``(M + μI)⁻¹ = U diag(coef) Uᵀ (+ (c+μ)⁻¹ I)`` as a dense ``d × d`` matrix, cached on the snapshot per ``μ``."""
    key = ("dense", mu, complement)
    hit = e.cache.get("dense")
    if hit is not None and hit[0] == key:
        return hit[1]
    coef, cp = _solve_coefficients(e, mu, complement)
    U = e.approx.eigvecs
    Minv = (U * coef) @ U.T
    if cp is not None:
        Minv.diagonal().add_(cp)
    e.cache["dense"] = (key, Minv)
    return Minv


def _product_weights(G: FactorEigen, A: FactorEigen, lam: float) -> torch.Tensor:
    """``1 ⊘ (g aᵀ + λ')`` of the product convention, cached on ``G``'s snapshot per ``(A, λ')``."""
    hit = G.cache.get("product")
    if hit is not None and hit[0] is A and hit[1] == lam:
        return hit[2]
    W = torch.reciprocal(G.approx.eigvals[:, None] * A.approx.eigvals[None, :] + lam)
    G.cache["product"] = (A, lam, W)
    return W


def factor_scale(e: FactorEigen, how: Literal["max", "mean"] = "max", complement: str = "min") -> float:
    """The damping scale of a factor: its largest eigenvalue, or its mean eigenvalue ``tr(M)/d``.

    The mean counts the complement eigenvalue on the ``d - r`` directions a
    low-rank decomposition did not compute.  Cached on the snapshot (one host
    read per decomposition).
    """
    if how == "max":
        return e.max_eig
    key = ("mean", complement)
    hit = e.cache.get("mean")
    if hit is not None and hit[0] == key:
        return hit[1]
    d, r = e.approx.dim, e.approx.rank
    value = (float(e.approx.eigvals.sum()) + (d - r) * _complement(e, complement)) / d
    e.cache["mean"] = (key, value)
    return value


def _complement(e: FactorEigen, complement: str) -> float:
    """Eigenvalue of the directions outside ``span(U)``: 0 or ``min(w)`` (a float, so no device sync)."""
    return e.min_eig if complement == "min" else 0.0
