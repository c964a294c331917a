r"""Brand's online eigen-update of an exponential average, and the Rayleigh–Ritz refresh.

The state is an immutable :class:`~onlinela.LowRankPSD` ``M ≈ U diag(w) Uᵀ``
(``U`` of shape ``(..., d, r)``).  :func:`brand_update` returns the exact
eigendecomposition of ``decay·M + (1 - decay)·X Xᵀ`` restricted to
``span([U X])`` at cost ``O(d (r+n)^2 + (r+n)^3)`` -- linear in ``d``, the
``d × d`` matrix is never formed.  :func:`rayleigh_ritz_refresh` is the B-KFAC-c
correction against a dense factor, and :func:`empty_lowrank` gives the two
start states (rank 0, or the identity-initialised one of the B-KFAC paper).

The math, the cost model and the proofs are in ``docs/math/online.rst``.
"""

from __future__ import annotations

import logging
import math
from types import ModuleType
from typing import Any, Sequence

from . import _backend as B
from . import _validation as V
from .lowrank import LowRankPSD

__all__ = ["brand_update", "empty_lowrank", "rayleigh_ritz_refresh"]

logger = logging.getLogger(__name__)

# ----------------------------------------------------------------------------- tolerances
# All thresholds are multiples of eps(dtype) scaled by the problem size; the
# constants were calibrated on float32/float64 streams (see docs/math/online.rst,
# "Numerical safeguards") and leave a >= 10x margin over the measured round-off.
_C_RES = 64.0  # Gram resolution: eigenvalues below _C_RES*eps*lambda_max are "unresolved"
_C_DROP = 16.0  # residual directions carrying <= _C_DROP*eps*sqrt(r+n)*||X|| are noise
_C_ORTH = 4.0  # block accepted as orthonormal when max|QᵀQ - I|, max|UᵀQ| <= _C_ORTH*eps*sqrt(d)
_C_DRIFT = 8.0  # re-orthonormalise U when the estimated ||UᵀU - I||_F > _C_DRIFT*eps*sqrt(d)*sqrt(r)
_MAX_PASSES = 4  # block Gram-Schmidt passes (2 in practice; 3 for nearly dependent X)
_N_PROBES = 4  # Gaussian probe vectors of the drift estimate (cost 4 d r _N_PROBES flops)
_PROBE_SEED = 0x5EED
_FILL_SEED = 0xB8A4D


# ----------------------------------------------------------------------------- start states


def empty_lowrank(
    dim: int,
    *,
    rank: int = 0,
    xp: ModuleType | None = None,
    like: Any = None,
    dtype: Any = None,
    device: Any = None,
    batch_shape: Sequence[int] = (),
    complement: float = 0.0,
) -> LowRankPSD:
    r"""A start state for building an exponential average by :func:`brand_update` alone.

    ``rank=0`` (default) gives the **empty** state: ``U`` of shape
    ``(*batch_shape, dim, 0)``, ``M = complement·I``.  The first update then
    returns exactly ``(1 - decay)·X Xᵀ`` (plus ``decay·complement·I``), with
    rank equal to the numerical rank of ``X``, and the rank grows by at most
    ``n`` per update until it reaches ``dim`` or the ``rank`` cap passed to
    :func:`brand_update`.

    ``rank=r > 0`` gives the **identity-initialised** state of the B-KFAC paper:
    ``U = I[:, :r]`` (the first ``r`` columns of the identity) with eigenvalues
    equal to ``complement`` (``0`` by default, as in the paper).  It represents
    the same matrix ``complement·I`` as the empty state but has a fixed rank
    ``r`` from the start, so ``brand_update(..., rank=r)`` keeps every state at
    exactly ``r`` columns (fixed shapes for compiled or batched hot loops).

    To model the usual K-FAC initialisation ``M_0 = I``, pass
    ``complement=1.0``: :func:`brand_update` decays it exactly (the complement
    is ``decay^k`` after ``k`` updates), the representable form of the paper's
    "missing identity becomes a ``ρ^{n_upd}`` term in the damping".  With the
    default ``complement=0`` the EA starts from ``M_0 = 0`` and the identity,
    if wanted, is added as damping by the caller.

    Parameters
    ----------
    dim : int >= 1
        ``d``, the matrix dimension.
    rank : int, 0 <= rank <= dim
        Number of identity columns (0: the empty state).
    xp : array namespace, optional
        Namespace of the arrays (default: that of ``like``, else NumPy).
    like : array, optional
        Take the namespace, dtype and device from this array.
    dtype : dtype, optional
        Real floating dtype (default: ``like.dtype``, else float64).
    device : device, optional
        Default: ``like``'s device, else the namespace default.
    batch_shape : tuple of int
        Leading batch axes of a stack of states.
    complement : float >= 0
        Eigenvalue of the directions outside ``span(U)`` (see :class:`~onlinela.LowRankPSD`).

    Returns
    -------
    LowRankPSD
        ``eigvecs`` of shape ``(*batch_shape, dim, rank)``, ``eigvals`` of shape
        ``(*batch_shape, rank)`` all equal to ``complement``.
    """
    dim = V.check_int(dim, "dim", low=1)
    rank = V.check_int(rank, "rank", low=0, high=dim, what="the matrix dimension `dim`")
    if not isinstance(batch_shape, (tuple, list)):
        raise TypeError(f"`batch_shape` must be a tuple of ints, got {type(batch_shape).__name__}")
    batch = tuple(V.check_int(b, "batch_shape", low=0) for b in batch_shape)
    if like is not None:
        if xp is not None:
            raise TypeError("pass either `xp` or `like`, not both")
        xp = B.get_namespace(like, names=("like",))
        dtype = like.dtype if dtype is None else dtype
        device = B.device(like) if device is None else device
    if xp is None:
        import array_api_compat.numpy as xp  # noqa: PLC0415
    dtype = xp.float64 if dtype is None else dtype
    if dtype not in (xp.float32, xp.float64):
        raise TypeError(f"`dtype` must be float32 or float64 of the namespace, got {dtype}")
    V.check_real(complement, "complement", low=0.0)
    U = xp.eye(dim, rank, dtype=dtype, device=device)
    w = xp.full(batch + (rank,), float(complement), dtype=dtype, device=device)
    if batch:
        U = xp.zeros(batch + (dim, rank), dtype=dtype, device=device) + U
    return LowRankPSD.unchecked(U, w, float(complement))


# ----------------------------------------------------------------------------- Brand update


def brand_update(
    approx: LowRankPSD, X: Any, *, decay: float, rank: int | None = None, check_inputs: bool = True
) -> LowRankPSD:
    r"""Brand's online update: the eigendecomposition of ``decay·M + (1-decay)·X Xᵀ``.

    With ``M = U diag(w) Uᵀ (+ c (I - UUᵀ))`` given by ``approx``, returns the
    *exact* eigendecomposition of ``ρ M + (1-ρ) X Xᵀ`` restricted to
    ``span([U X])`` (B-KFAC, algorithms.md §4): ``P = UᵀX``, residual
    ``X - U P`` orthonormalised to ``Q`` (rank-revealing, re-orthogonalised
    against ``U``), the ``(r+k) × (r+k)`` core
    ``K = ρ diag(w) ⊕ ρc I + (1-ρ) [P; R][P; R]ᵀ``, ``eigh(K) = W S Wᵀ``,
    ``U' = [U Q] W``, eigenvalues ``S``.

    Parameters
    ----------
    approx : LowRankPSD
        Current state, ``eigvecs`` of shape ``(..., d, r)`` (``r`` may be 0,
        see :func:`empty_lowrank`).
    X : array, shape (..., d, n)
        New data columns, already scaled (e.g. ``a_b / sqrt(n)``), so that the
        increment is ``X Xᵀ``; same namespace, device, dtype and batch shape as
        ``approx``; finite.
    decay : float in (0, 1)
        ``ρ``, the weight of the old average.
    rank : int >= 0, optional
        Keep only the top ``rank`` eigenpairs.  ``None`` keeps all ``r + k``.
    check_inputs : bool, default True
        ``False`` skips the argument checks (types, namespaces, dtypes, shapes,
        ``decay``, ``rank``): the unchecked fast path for hot loops whose
        arguments are valid by construction.  Non-finite data is still refused
        (that check is part of the update, ``O(d n)``).

    Returns
    -------
    LowRankPSD
        Rank ``min(rank, r + k)`` where ``k <= n`` is the numerical rank of the
        part of ``X`` outside ``span(U)``: directions carrying less than
        ``16·eps·sqrt(r+n)·||X||_2`` are round-off and dropped, so an ``X``
        inside ``span(U)`` does not grow the rank.  Orthonormal ``eigvecs``,
        descending eigenvalues ``>= 0``, same dtype and device (float32 stays
        float32).  The complement value ``c`` (a float) becomes ``ρ c``;
        ``"min"`` is kept as is (it is a solve-time convention).

    Raises
    ------
    ValueError
        ``decay`` outside (0, 1), ``rank < 0``, ``X`` with the wrong number of
        rows or batch shape, or non-finite ``X`` (the input state is never
        modified; no state is returned).
    TypeError
        ``approx`` not a :class:`LowRankPSD`, ``X`` from another array library
        or of another dtype.

    Notes
    -----
    Cost ``O(d (r+n)^2 + (r+n)^3)`` flops, memory ``O(d (r+n))``: four
    ``d × (r+n) × n``-sized GEMMs (projection, residual, Gram, scaling), one
    check GEMM ``[U Q]ᵀ Q``, one GEMM ``[U Q] W`` and two small ``eigh``
    (``n × n`` and ``(r+k) × (r+k)``); no Python loop over ``d``, no float64
    promotion.  Orthonormality of ``U`` is monitored every call with a
    4-column Gaussian probe (``O(d r)``); when ``||UᵀU - I||_F`` exceeds
    ``8·eps·sqrt(d r)`` the basis is re-orthonormalised *inside* the update by
    folding ``(UᵀU)^{-1/2}`` into the small matrices (one extra ``d r^2``
    Gram).  Rank-deficient residuals take one or two extra Gram-Schmidt passes.

    Examples
    --------
    >>> import numpy as np
    >>> from onlinela import brand_update, empty_lowrank
    >>> rng = np.random.default_rng(0)
    >>> M = empty_lowrank(100)
    >>> for _ in range(5):
    ...     M = brand_update(M, rng.standard_normal((100, 8)) / np.sqrt(8), decay=0.9, rank=20)
    >>> M.rank
    20
    """
    if not V.check_bool(check_inputs, "check_inputs"):
        return _brand_update(approx, X, decay, rank)
    if not isinstance(approx, LowRankPSD):
        raise TypeError(f"`approx` must be a LowRankPSD, got {type(approx).__name__}")
    xp = B.get_namespace(approx.eigvecs, X, names=("approx", "X"))
    decay = V.check_real(decay, "decay", low=0.0, high=1.0, low_open=True, high_open=True)
    V.check_float_array(X, "X", xp, finite=False)
    if X.dtype != approx.dtype:
        raise TypeError(f"`X` must have the dtype of `approx` ({approx.dtype}), got {X.dtype}")
    if X.shape[-2] != approx.dim:
        raise ValueError(
            f"`X` must have {approx.dim} rows (the dimension d of `approx`), got shape {tuple(X.shape)}"
        )
    if tuple(X.shape[:-2]) != approx.batch_shape:
        raise ValueError(
            f"`X` must have the batch shape {approx.batch_shape} of `approx`, got shape {tuple(X.shape)}"
        )
    if rank is not None:
        rank = V.check_int(rank, "rank", low=0)
    return _brand_update(approx, X, decay, rank, xp=xp)


def _brand_update(
    approx: LowRankPSD, X: Any, decay: float, rank: int | None = None, *, xp: ModuleType | None = None
) -> LowRankPSD:
    """:func:`brand_update` without argument validation (for hot loops).

    Still refuses to build a state from non-finite data: ``X`` (``O(d n)``)
    and the ``(r+k)``-square core are checked and ``ValueError`` is raised.
    """
    U, w = approx.eigvecs, approx.eigvals
    xp = xp or B.get_namespace(U)
    if not B._finite(xp, X):
        raise ValueError("`X` must be finite (no NaN or Inf); the state was not updated")
    k = _scale_exponent(xp, approx, X)
    if k:  # exact power-of-two rescaling: (2^k X)(2^k X)ᵀ and 4^k M, scaled back by 4^-k
        comp = approx.complement if isinstance(approx.complement, str) else B.scale_pow2(float(approx.complement), 2 * k)
        scaled = LowRankPSD.unchecked(U, B.scale_pow2(w, 2 * k), comp)
        out = _brand_update(scaled, B.scale_pow2(X, k), decay, rank, xp=xp)
        back = out.complement if isinstance(out.complement, str) else B.scale_pow2(float(out.complement), -2 * k)
        return LowRankPSD.unchecked(out.eigvecs, B.scale_pow2(out.eigvals, -2 * k), back)
    dt, dev = U.dtype, B.device(U)
    d, r, n = int(U.shape[-2]), int(U.shape[-1]), int(X.shape[-1])
    batch = tuple(U.shape[:-2])
    eps = B.eps(xp, dt)
    rho = float(decay)
    comp = approx.complement

    # 0. orthonormality of U: cheap probe, re-orthonormalise implicitly if it drifted.
    T = L = None  # U~ = U T is orthonormal and U = U~ L  (None: T = L = I)
    if r:
        drift = _drift_estimate(xp, U)
        if drift > _C_DRIFT * eps * math.sqrt(d * r):
            logger.debug("brand_update: ||UᵀU - I||_F ≈ %.2e, re-orthonormalising", drift)
            T, L = _orthonormaliser(xp, B.mT(xp, U) @ U, eps)

    # 1. projection onto span(U) and residual: X = U~ P + Z C
    P = B.mT(xp, U) @ X
    if T is not None:
        P = B.mT(xp, T) @ P
    Z = X - U @ (P if T is None else T @ P) if r else X
    C = None  # None means the identity
    xnorm = None
    UZ = None
    converged = False
    for it in range(_MAX_PASSES):
        if it:
            # check pass: one GEMM gives U~ᵀZ and ZᵀZ
            UZ = xp.concat([U, Z], axis=-1) if r else Z
            H = B.mT(xp, UZ) @ Z
            S, G = H[..., :r, :], H[..., r:, :]
            if T is not None:
                S = B.mT(xp, T) @ S
            k = int(Z.shape[-1])
            eye = xp.eye(k, dtype=dt, device=dev)
            err = _maxabs(xp, G - eye)
            if r:
                err = max(err, _maxabs(xp, S))
            if err <= _C_ORTH * eps * math.sqrt(d) or k == 0:
                converged = True
                break
            if r:  # re-orthogonalise against U~
                Z = Z - U @ (S if T is None else T @ S)
                P = P + S @ C
                G = B.mT(xp, Z) @ Z
        else:
            G = B.mT(xp, Z) @ Z
        Z, C, xnorm = _svqb_step(xp, Z, G, C, P, xnorm, r=r, n=n, d=d, eps=eps, seed=it)
    if not converged:
        logger.warning(
            "brand_update: residual basis not orthonormal after %d passes; "
            "the next update will re-orthonormalise", _MAX_PASSES
        )
        UZ = xp.concat([U, Z], axis=-1) if r else Z
    k = int(Z.shape[-1])

    # 2. core K = rho (L diag(w) Lᵀ ⊕ c I_k) + (1 - rho) F Fᵀ,  F = [P; C]
    F = xp.concat([P, C], axis=-2) if r else C
    K = (1.0 - rho) * (F @ B.mT(xp, F))
    cval = float(comp) if not isinstance(comp, str) else 0.0
    if L is None:
        diag = w if not cval else xp.concat([w, xp.full(batch + (k,), cval, dtype=dt, device=dev)], axis=-1)
        if diag.shape[-1] < r + k:
            diag = xp.concat([diag, xp.zeros(batch + (r + k - diag.shape[-1],), dtype=dt, device=dev)], axis=-1)
        K = K + rho * B.diag_embed(xp, diag)
    else:
        top = (L * w[..., None, :]) @ B.mT(xp, L)
        K = K + rho * _blockdiag(xp, top, cval * xp.eye(k, dtype=dt, device=dev) if k else None, batch)
    if not B._finite(xp, K):
        raise ValueError("`X` (or the state) must be finite (no NaN or Inf); the state was not updated")

    # 3. eigh of the core, truncate, rotate with one GEMM
    s, W = B.eigh(xp, K)
    s = xp.maximum(s, xp.zeros_like(s))
    keep = r + k if rank is None else min(int(rank), r + k)
    s, W = s[..., :keep], W[..., :, :keep]
    if T is not None:
        W = xp.concat([T @ W[..., :r, :], W[..., r:, :]], axis=-2)
    if UZ is None:
        UZ = xp.concat([U, Z], axis=-1) if r else Z
    Unew = UZ @ W
    newc: float | str = comp if isinstance(comp, str) else rho * cval
    return LowRankPSD.unchecked(Unew, s, newc)


def _scale_exponent(xp: ModuleType, approx: LowRankPSD, X: Any) -> int:
    """Power-of-two exponent for ``X`` that brings ``max(max|X|, sqrt(max w), sqrt(c))`` into the
    safe range (0 inside it): ``ZᵀZ`` and the core are squares of ``X``'s scale.  Cost ``O(d n)``."""
    m = _maxabs(xp, X)
    if approx.rank:
        m = max(m, math.sqrt(max(_maxabs(xp, approx.eigvals), 0.0)))
    if not isinstance(approx.complement, str):
        m = max(m, math.sqrt(float(approx.complement)))
    return B.pow2_exponent(xp, m, X.dtype)


def _maxabs(xp: ModuleType, a: Any) -> float:
    if any(int(s) == 0 for s in a.shape):
        return 0.0
    return float(xp.max(xp.abs(a)))


def _drift_estimate(xp: ModuleType, U: Any) -> float:
    r"""Estimate ``max_batch ||UᵀU - I||_F`` with a Gaussian probe ``G`` (r × 4).

    ``E||(UᵀU - I) g||^2 = ||UᵀU - I||_F^2`` for a standard Gaussian ``g``, so
    ``sqrt(r)·||(UᵀU - I)G||_F / ||G||_F`` estimates the Frobenius norm (an
    upper bound of the spectral norm).  Cost ``4 d r p`` flops.
    """
    r = int(U.shape[-1])
    g = B.standard_normal(xp, (r, _N_PROBES), dtype=U.dtype, device=B.device(U), rng=_PROBE_SEED)
    E = B.mT(xp, U) @ (U @ g) - g
    num = xp.sum(E * E, axis=(-2, -1))
    den = float(xp.sum(g * g))
    return math.sqrt(float(xp.max(num)) * r / den)


def _orthonormaliser(xp: ModuleType, gram: Any, eps: float) -> tuple[Any, Any]:
    """``T, L`` with ``U T`` orthonormal and ``U = (U T) L``, from ``gram = UᵀU`` (SVQB)."""
    lam, Vg = B.eigh(xp, gram)
    floor = xp.maximum(lam[..., :1] * eps, xp.full_like(lam[..., :1], xp.finfo(gram.dtype).smallest_normal))
    lam = xp.maximum(lam, floor)
    sq = xp.sqrt(lam)
    T = Vg / sq[..., None, :]
    L = sq[..., :, None] * B.mT(xp, Vg)
    return T, L


def _svqb_step(
    xp: ModuleType,
    Z: Any,
    G: Any,
    C: Any | None,
    P: Any,
    xnorm: Any | None,
    *,
    r: int,
    n: int,
    d: int,
    eps: float,
    seed: int,
) -> tuple[Any, Any, Any]:
    r"""One rank-revealing SVQB pass: ``Z ← Z V Λ_c^{-1/2}``, ``C ← Λ_c^{1/2} Vᵀ C``.

    ``ZᵀZ = G = V Λ Vᵀ``.  Eigenvalues below the Gram's resolution
    ``_C_RES·eps·λ_max`` are clamped there (the direction is kept, scaled to
    norm <= ~1, and resolved by the next pass).  Directions whose contribution
    ``||z_i||·||C_i||`` to ``X`` is below ``_C_DROP·eps·sqrt(r+n)·||X||`` are
    dropped.  In a stack every member keeps ``k`` = the largest number of
    surviving directions; a member with fewer keeps its next-best columns with
    zero coefficients (replaced by random columns when too short), which the
    next pass orthonormalises, so shapes stay uniform.  Returns ``(Z, C, xnorm)``.
    """
    dt, dev = Z.dtype, B.device(Z)
    m = int(Z.shape[-1])
    batch = tuple(Z.shape[:-2])
    lam, Vg = B.eigh(xp, G)
    zero = xp.zeros_like(lam[..., :1])
    lam1 = xp.maximum(lam[..., :1], zero)
    if xnorm is None:  # ||X||_2^2 <= ||P||_F^2 + ||Z||_2^2 (first pass: Z = X - U P)
        px = xp.sum(P * P, axis=(-2, -1))[..., None] if r else zero
        xnorm = xp.sqrt(px + lam1)
    floor = xp.maximum(_C_RES * eps * lam1, xp.full_like(lam1, xp.finfo(dt).smallest_normal))
    lamc = xp.maximum(lam, floor)
    sq = xp.sqrt(lamc)
    Cn = sq[..., :, None] * (B.mT(xp, Vg) if C is None else B.mT(xp, Vg) @ C)
    znorm = xp.sqrt(xp.maximum(lam, xp.zeros_like(lam)) / lamc)
    contrib = xp.sqrt(xp.sum(Cn * Cn, axis=-1)) * znorm
    tau = _C_DROP * eps * math.sqrt(r + n) * xnorm
    keep = contrib > tau
    count = xp.sum(xp.astype(keep, xp.int64), axis=-1)
    k = min(int(xp.max(count)) if count.ndim else int(count), max(d - r, 0), m)
    M = Vg / sq[..., None, :]
    all_kept = k == m and bool(xp.all(keep))
    if not all_kept:
        order = xp.argsort(contrib, axis=-1, descending=True, stable=True)[..., :k]
        perm = xp.astype(xp.arange(m, device=dev)[:, None] == order[..., None, :], dt)
        M = M @ perm
        Cn = B.mT(xp, perm) @ Cn
    Znew = Z @ M
    if not all_kept and k and bool(xp.any(count < k)):
        # A stack member with fewer genuine directions than the widest keeps its next-best
        # columns as zero-weight fillers; fillers too short to be normalised stably are
        # replaced by random columns.  The next pass orthonormalises them against U and the rest.
        slot = xp.arange(k, device=dev) >= count[..., None]  # (..., k): non-genuine slots
        Cn = xp.where(slot[..., :, None], xp.zeros_like(Cn), Cn)
        short = slot & ((znorm[..., None, :] @ perm)[..., 0, :] < 0.5)
        if bool(xp.any(short)):
            fill = B.standard_normal(xp, batch + (d, k), dtype=dt, device=dev, rng=_FILL_SEED + seed)
            Znew = xp.where(short[..., None, :], fill / math.sqrt(d), Znew)
    return Znew, Cn, xnorm


def _blockdiag(xp: ModuleType, A: Any, Bm: Any | None, batch: tuple[int, ...]) -> Any:
    if Bm is None:
        return A
    ra, rb = int(A.shape[-1]), int(Bm.shape[-1])
    dt, dev = A.dtype, B.device(A)
    Bm = xp.zeros(batch + (rb, rb), dtype=dt, device=dev) + Bm
    top = xp.concat([A, xp.zeros(batch + (ra, rb), dtype=dt, device=dev)], axis=-1)
    bot = xp.concat([xp.zeros(batch + (rb, ra), dtype=dt, device=dev), Bm], axis=-1)
    return xp.concat([top, bot], axis=-2)


# ----------------------------------------------------------------------------- Rayleigh-Ritz refresh


def rayleigh_ritz_refresh(
    approx: LowRankPSD, A: Any, *, fraction: float = 0.2, rng: Any = None, check_inputs: bool = True
) -> LowRankPSD:
    r"""Partial Rayleigh–Ritz refresh of a low-rank state against the dense factor (B-KFAC-c).

    Picks ``m = ceil(fraction·r)`` of the ``r`` columns at random (the same
    columns for every member of a stack), ``U_s``, solves the small eigenproblem
    ``U_sᵀ A U_s = W S Wᵀ`` and replaces ``U_s ← U_s W`` and their eigenvalues
    by ``S`` (clipped at 0), then re-sorts all eigenpairs descending.  The
    subspace is unchanged, so ``U`` stays orthonormal; for that subspace the
    Ritz pairs are optimal, hence neither the residual ``||A U - U diag(w)||_F``
    nor ``||A - U diag(w) Uᵀ||_F`` can increase (proof in
    ``docs/math/online.rst``).

    Parameters
    ----------
    approx : LowRankPSD
        State with ``eigvecs`` (..., d, r).
    A : array, shape (..., d, d)
        The dense symmetric PSD factor the state approximates (same namespace,
        device, dtype and batch shape).
    fraction : float in (0, 1]
        ``φ``, the fraction of columns refreshed (the paper uses 0.2).
    rng : None, int or numpy.random.Generator
        Chooses the columns; the same seed gives the same columns.
    check_inputs : bool, default True
        ``False`` skips every argument check (the ``O(d^2)`` symmetry pass
        included): the unchecked fast path for hot loops whose arguments are
        valid by construction.  Invalid arguments then give undefined results.

    Returns
    -------
    LowRankPSD
        Same rank and complement; same namespace, dtype and device.

    Notes
    -----
    Cost ``O(d^2 m + d m^2 + m^3 + d r^2)``: the product ``A U_s`` dominates
    (it needs the dense factor, so B-KFAC-c is not memory-linear); the
    ``d r^2`` term is the exact permutation that re-sorts the pairs.
    """
    if not V.check_bool(check_inputs, "check_inputs"):
        return _rayleigh_ritz_refresh(approx, A, fraction, rng)
    if not isinstance(approx, LowRankPSD):
        raise TypeError(f"`approx` must be a LowRankPSD, got {type(approx).__name__}")
    xp = B.get_namespace(approx.eigvecs, A, names=("approx", "A"))
    V.check_float_array(A, "A", xp)
    d = V.check_square(A, "A")
    if A.dtype != approx.dtype:
        raise TypeError(f"`A` must have the dtype of `approx` ({approx.dtype}), got {A.dtype}")
    if d != approx.dim:
        raise ValueError(f"`A` must be {approx.dim} x {approx.dim} (the dimension of `approx`), got {tuple(A.shape)}")
    if tuple(A.shape[:-2]) != approx.batch_shape:
        raise ValueError(f"`A` must have the batch shape {approx.batch_shape} of `approx`, got {tuple(A.shape)}")
    V.check_symmetric(A, "A", xp)
    fraction = V.check_real(fraction, "fraction", low=0.0, high=1.0, low_open=True)
    gen = B.default_rng(rng)
    return _rayleigh_ritz_refresh(approx, A, fraction, gen, xp=xp)


def _rayleigh_ritz_refresh(
    approx: LowRankPSD, A: Any, fraction: float, rng: Any, *, xp: ModuleType | None = None
) -> LowRankPSD:
    """:func:`rayleigh_ritz_refresh` without validation; ``rng`` a numpy Generator."""
    U, w = approx.eigvecs, approx.eigvals
    xp = xp or B.get_namespace(U)
    r = int(U.shape[-1])
    if r == 0:
        return approx
    dt, dev = U.dtype, B.device(U)
    m = min(r, max(1, math.ceil(fraction * r - 1e-9)))
    chosen = sorted(int(i) for i in B.default_rng(rng).choice(r, size=m, replace=False))
    rest = [i for i in range(r) if i not in set(chosen)]
    idx_s = xp.asarray(chosen, device=dev)
    Us = xp.take(U, idx_s, axis=-1)
    Bs = B.mT(xp, Us) @ (A @ Us)
    s, W = B.eigh(xp, Bs)
    s = xp.maximum(s, xp.zeros_like(s))
    Us = Us @ W
    if rest:
        idx_r = xp.asarray(rest, device=dev)
        Uall = xp.concat([Us, xp.take(U, idx_r, axis=-1)], axis=-1)
        wall = xp.concat([s, xp.take(w, idx_r, axis=-1)], axis=-1)
    else:
        Uall, wall = Us, s
    order = xp.argsort(wall, axis=-1, descending=True, stable=True)
    perm = xp.astype(xp.arange(r, device=dev)[:, None] == order[..., None, :], dt)  # exact 0/1
    Unew = Uall @ perm
    wnew = (wall[..., None, :] @ perm)[..., 0, :]
    return LowRankPSD.unchecked(Unew, wnew, approx.complement)
