r"""Randomized low-rank approximation of matrices and of symmetric PSD matrices.

Halko, Martinsson & Tropp (2011) range finder and SVD, and five eigensolvers
for a symmetric positive semidefinite (PSD) ``A`` (RS-KFAC / SRE-KFAC, Puiu
2022; Nyström, Tropp et al. 2017 and Frangella et al. 2021; block Krylov,
Musco & Musco 2015):

``"auto"``      the default: block Lanczos with blocks of ``max(16, r/3)``
                columns, grown until every top-``r`` Ritz pair has residual
                ``<= 0.15 θ_{r+1}`` (dense ``eigh`` for small ``d``).

``"subspace"``  symmetric randomized EVD: ``Q = orth(A^{q+1} Ω)`` by subspace
                iteration, Rayleigh–Ritz ``eigh(QᵀAQ)``.
``"nystrom"``   ``Q = orth(A^q Ω)``, ``Y = AQ``, the shifted Nyström
                approximation ``Y (QᵀY)⁻¹ Yᵀ``: one product fewer than
                ``"subspace"`` for the same range, and never larger than ``A``.
``"svd"``       the randomized SVD of ``A`` (``(AAᵀ)^q AΩ``); the right singular
                vectors and singular values are the eigenpairs (RS-KFAC).
``"krylov"``    block Lanczos: Rayleigh–Ritz on ``[AΩ, A²Ω, ..., A^{q+1}Ω]``
                (same products as ``"subspace"``, gap-free convergence).

Conventions shared by every function here:

* ``n_iter = q`` counts the power (subspace) iterations that *follow* the first
  product ``AΩ``; between products the block is re-conditioned by one
  Cholesky-QR pass (a power iteration needs the span, not exact
  orthonormality), so float32 neither under- nor overflows; bases that feed a
  Rayleigh–Ritz step or are returned are orthonormalised to working precision
  (CholeskyQR2, Householder fallback).
* The sketch has ``k = min(rank + oversample, d)`` columns: asking for more
  columns than the dimension clips the sketch to ``d`` (the basis is then
  complete and the result exact up to rounding).
* Results live in the input's namespace, device and dtype; the Gaussian test
  matrix is drawn on the array's device from ``rng`` (``None``, an ``int``
  seed or a ``numpy.random.Generator``) through
  :func:`onlinela._backend.standard_normal`, so a seed reproduces the result on
  a given backend.
* Leading axes ``(..., d, d)`` are a stack of independent matrices sharing one
  rank.
* Public functions validate their arguments and delegate to private bodies
  (``_randomized_eigh`` ...) that internal callers use without re-validating.

See ``docs/math/randomized.rst`` for the error bounds and costs.
"""

from __future__ import annotations

import logging
import math
from types import ModuleType
from typing import Any

import numpy as np

from . import _backend as B
from . import _validation as V
from .lowrank import LowRankPSD

__all__ = [
    "adaptive_randomized_eigh",
    "estimate_spectral_error",
    "randomized_eigh",
    "randomized_range_finder",
    "randomized_svd",
]

logger = logging.getLogger(__name__)

METHODS = ("subspace", "nystrom", "svd", "krylov")  # the fixed-sketch methods (take l and q)
ALL_METHODS = ("auto",) + METHODS


# =========================================================================== validation


def _check_matrix(A: Any, *, psd: bool) -> tuple[ModuleType, int, int]:
    """Namespace and shape checks; symmetric PSD inputs also get the O(d^2) symmetry check."""
    if psd:
        xp, d = V.check_psd_input(A, "A")
        return xp, d, d
    xp = B.get_namespace(A, names=("A",))
    V.check_float_array(A, "A", xp)
    return xp, int(A.shape[-2]), int(A.shape[-1])


def _check_iter(n_iter: Any, name: str = "n_iter", low: int = 0) -> int:
    return V.check_int(n_iter, name, low=low)


def _check_method(method: Any) -> str:
    if not isinstance(method, str) or method not in ALL_METHODS:
        raise ValueError(f"`method` must be one of {ALL_METHODS}, got {method!r}")
    return method


def _check_rng(rng: Any) -> np.random.Generator:
    return B.default_rng(rng)


# =========================================================================== building blocks


def _sketch(xp: ModuleType, A: Any, k: int, gen: np.random.Generator) -> Any:
    """Gaussian test matrix Ω of shape (..., n, k) for ``A`` of shape (..., m, n), on A's device."""
    shape = tuple(A.shape[:-2]) + (int(A.shape[-1]), k)
    return B.standard_normal(xp, shape, dtype=A.dtype, device=B.device(A), rng=gen)


def _orth(xp: ModuleType, Y: Any) -> Any:
    """Orthonormal basis of ``range(Y)`` to working precision (CholeskyQR2, Householder fallback)."""
    return B.qr(xp, Y)


def _orth_fast(xp: ModuleType, Y: Any) -> Any:
    """A well-conditioned basis of ``range(Y)``: one Cholesky-QR pass, ``Y R⁻¹`` with ``RᵀR = YᵀY``.

    Its columns are orthonormal only up to ``O(eps·cond(Y)²)``, which is all a
    power iteration or a Nyström test matrix needs (they depend on the span,
    not on orthonormality); half the cost of :func:`_orth`.  Falls back to it
    when the Cholesky factorisation breaks down (``cond(Y)² ≳ 1/eps``).
    """
    try:
        R = xp.linalg.cholesky(B.mT(xp, Y) @ Y, upper=True)
        if bool(xp.all(xp.isfinite(R))):  # then Y R⁻¹ is finite too (Y is)
            return B._solve_upper_right(xp, Y, R)
    except Exception as exc:  # LinAlgError (numpy), torch._C._LinAlgError, ...
        logger.debug("one-pass Cholesky-QR failed (%s); using CholeskyQR2/Householder", exc)
    return _orth(xp, Y)


def _range_finder(xp: ModuleType, A: Any, size: int, n_iter: int, gen: np.random.Generator) -> Any:
    """HMT Algorithm 4.4: ``orth((AAᵀ)^q AΩ)`` with re-orthonormalisation; 2q+1 products."""
    Y = A @ _sketch(xp, A, size, gen)
    At = B.mT(xp, A)
    for _ in range(n_iter):  # intermediate bases need only be well conditioned
        Y = A @ _orth_fast(xp, At @ _orth_fast(xp, Y))
    return _orth(xp, Y)


def _small_svd_of_tall(xp: ModuleType, M: Any) -> tuple[Any, Any, Any]:
    """Thin SVD of a tall (..., n, k) matrix through its QR: ``M = Q R``, ``R = W S Zᵀ``.

    All ``O(n k^2)`` work is BLAS-3 (CholeskyQR2); only the ``k × k`` SVD is LAPACK.
    Returns ``(Q W, S, Zᵀ)``.
    """
    Q = _orth(xp, M)
    R = B.mT(xp, Q) @ M  # exact even when the QR fell back (range(M) ⊆ range(Q))
    W, S, Zh = B.svd_thin(xp, R)
    return Q @ W, S, Zh


def _randomized_svd(
    xp: ModuleType, A: Any, rank: int, oversample: int, n_iter: int, gen: np.random.Generator
) -> tuple[Any, Any, Any]:
    """Unvalidated body of :func:`randomized_svd`."""
    m, n = int(A.shape[-2]), int(A.shape[-1])
    k = min(rank + oversample, m, n)
    Q = _range_finder(xp, A, k, n_iter, gen)  # (..., m, k)
    Bt = B.mT(xp, A) @ Q  # (..., n, k) = (QᵀA)ᵀ
    Vk, S, Wh = _small_svd_of_tall(xp, Bt)  # Bt = Vk S Wh  =>  QᵀA = Whᵀ S Vkᵀ
    U = Q @ B.mT(xp, Wh)
    return U[..., :rank], S[..., :rank], B.mT(xp, Vk[..., :rank])


def _subspace_basis(xp: ModuleType, A: Any, k: int, n_iter: int, gen: np.random.Generator) -> Any:
    """``orth(A^{q+1} Ω)`` for symmetric ``A`` by subspace iteration (q+1 products)."""
    Y = A @ _sketch(xp, A, k, gen)
    for _ in range(n_iter):  # intermediate bases need only be well conditioned
        Y = A @ _orth_fast(xp, Y)
    return _orth(xp, Y)


def _eigh_subspace(xp: ModuleType, A: Any, rank: int, k: int, n_iter: int, gen: np.random.Generator) -> LowRankPSD:
    Q = _subspace_basis(xp, A, k, n_iter, gen)
    T = B.mT(xp, Q) @ (A @ Q)  # Rayleigh quotient, (..., k, k)
    w, W = B.eigh(xp, T)  # descending, symmetrised, float64 retry
    U = Q @ W[..., :rank]
    return LowRankPSD.unchecked(U, _clip0(xp, w[..., :rank]))


def _clip0(xp: ModuleType, w: Any) -> Any:
    return xp.where(w > 0, w, xp.zeros_like(w))


def _eigh_svd(xp: ModuleType, A: Any, rank: int, oversample: int, n_iter: int, gen: np.random.Generator) -> LowRankPSD:
    """Right singular vectors and singular values; a triplet with ``uᵀv < 0`` is a negative
    eigenvalue (``A v = -s v``): it is clipped to 0 and the pairs re-sorted (only then)."""
    U, s, Vh = _randomized_svd(xp, A, rank, oversample, n_iter, gen)
    Vt = B.mT(xp, Vh)
    neg = xp.sum(U * Vt, axis=-2) < 0  # (..., rank)
    if not bool(xp.any(neg)):
        return LowRankPSD.unchecked(Vt, s)
    w = xp.where(neg, xp.zeros_like(s), s)
    order = xp.argsort(w, axis=-1, descending=True, stable=True)
    perm = xp.astype(xp.arange(rank, device=B.device(s))[:, None] == order[..., None, :], s.dtype)  # exact 0/1
    return LowRankPSD.unchecked(Vt @ perm, (w[..., None, :] @ perm)[..., 0, :])


def _eigh_nystrom(xp: ModuleType, A: Any, rank: int, k: int, n_iter: int, gen: np.random.Generator) -> LowRankPSD:
    r"""Shifted Nyström approximation with test matrix ``Q = orth(A^q Ω)`` (q+1 products).

    ``A⟨Q⟩ = Y (QᵀY)⁻¹ Yᵀ`` with ``Y = AQ``.  For stability it is formed for
    ``A + νI`` (``ν = sqrt(d)·eps·||Y||_F``), whose core ``Qᵀ(A+νI)Q`` is
    positive definite, and ``ν`` is subtracted from the eigenvalues.
    """
    d = int(A.shape[-1])
    Om = _sketch(xp, A, k, gen)
    # The test matrix needs a well-conditioned basis, not an orthonormal one (the Nyström
    # formula holds for any full-rank Q), so one Cholesky-QR pass per power iteration suffices.
    Q = _orth_fast(xp, Om) if n_iter == 0 else _orth_fast(xp, A @ Om)
    for _ in range(n_iter - 1):
        Q = _orth_fast(xp, A @ Q)
    Y = A @ Q
    nu = math.sqrt(d) * B.eps(xp, A.dtype) * xp.linalg.vector_norm(Y, axis=(-2, -1))  # (...,)
    nu = nu[..., None, None]
    Ynu = Y + nu * Q  # (A + νI) Q
    core = B.symmetrize(xp, B.mT(xp, Q) @ Ynu)  # Qᵀ(A + νI)Q, (..., k, k), positive definite
    Bm = _right_solve_cholesky(xp, Ynu, core)  # Ynu C^{-T}:  B Bᵀ = Ynu core⁻¹ Ynuᵀ = (A+νI)⟨Q⟩
    # Eigenpairs of B Bᵀ from the k × k Gram BᵀB = Z Σ² Zᵀ:  U = B Z Σ⁻¹ (the top r columns).
    # Rounding in the Gram perturbs U's orthonormality by O(eps·sqrt(d)·σ_1²/σ_r²); one more
    # Cholesky-QR pass on the d × r block restores it (it changes U diag(w) Uᵀ by O(eps·sqrt(d)·λ_1)).
    s2, Z = B.eigh(xp, B.symmetrize(xp, B.mT(xp, Bm) @ Bm))
    s2 = s2[..., :rank]
    # Directions with s2 <= eps·s2_max (all of them for A = 0) carry no energy: they get a zero
    # column here, which the re-orthonormalisation completes to an orthonormal basis.
    tiny = B.eps(xp, A.dtype) * s2[..., :1]
    pos = s2 > tiny
    inv_s = xp.where(pos, 1.0 / xp.sqrt(xp.where(pos, s2, xp.ones_like(s2))), xp.zeros_like(s2))
    U = _reorthonormalise(xp, Bm @ (Z[..., :rank] * inv_s[..., None, :]))
    return LowRankPSD.unchecked(U, _clip0(xp, s2 - nu[..., 0]))


def _reorthonormalise(xp: ModuleType, U: Any) -> Any:
    """Make nearly orthonormal columns orthonormal to working precision, as cheaply as possible.

    ``G = UᵀU``: if ``max|G - I| <= 5 sqrt(d) eps`` (what CholeskyQR2 accepts) ``U`` is
    returned; if ``max|G - I| < 0.1`` one Cholesky-QR pass with this ``G`` is exact to
    ``O(eps)`` (its error is ``eps·cond(U)²``); otherwise CholeskyQR2 / Householder.
    """
    r = int(U.shape[-1])
    if r == 0:
        return U
    G = B.mT(xp, U) @ U
    err = float(xp.max(xp.abs(G - xp.eye(r, dtype=U.dtype, device=B.device(U)))))
    if err <= 5.0 * math.sqrt(max(int(U.shape[-2]), r)) * B.eps(xp, U.dtype):
        return U
    if err < 0.1:
        try:
            R = xp.linalg.cholesky(B.symmetrize(xp, G), upper=True)
            if bool(xp.all(xp.isfinite(R))):
                return B._solve_upper_right(xp, U, R)
        except Exception as exc:
            logger.debug("re-orthonormalisation by Cholesky-QR failed (%s)", exc)
    return _orth(xp, U)


def _right_solve_cholesky(xp: ModuleType, Y: Any, core: Any) -> Any:
    """``Y C^{-T}`` where ``core = C Cᵀ`` (lower Cholesky); eigen-based fallback when the core is not PD.

    A core that is not numerically positive definite after the shift means the
    input is indefinite (``ValueError``) or round-off beat the shift (then the
    pseudo-inverse square root over the eigenvalues above the shift is used).
    """
    try:
        C = xp.linalg.cholesky(core)
        if bool(xp.all(xp.isfinite(C))):
            return B._solve_upper_right(xp, Y, B.mT(xp, C))
    except Exception as exc:  # LinAlgError (numpy), torch._C._LinAlgError, ...
        logger.debug("Nyström core Cholesky failed (%s); using its eigendecomposition", exc)
    w, Wv = B.eigh(xp, core)
    top = w[..., :1]
    k = int(core.shape[-1])
    tol = 10.0 * k * B.eps(xp, core.dtype) * top
    if bool(xp.any(w[..., -1:] < -1e3 * tol)):
        raise ValueError(
            "`A` must be positive semidefinite for method='nystrom': its sketch QᵀAQ has eigenvalue "
            f"{float(xp.min(w)):.3g} (largest {float(xp.max(top)):.3g}); use method='subspace' for indefinite input"
        )
    keep = w > tol
    inv_sqrt = xp.where(keep, 1.0 / xp.sqrt(xp.where(keep, w, xp.ones_like(w))), xp.zeros_like(w))
    return (Y @ Wv) * inv_sqrt[..., None, :]


def _eigh_krylov(xp: ModuleType, A: Any, rank: int, k: int, n_iter: int, gen: np.random.Generator) -> LowRankPSD:
    r"""Block Lanczos (randomized block Krylov) with Rayleigh–Ritz; q+2 products, basis (q+1)k.

    ``K = orth[AΩ, A²Ω, ..., A^{q+1}Ω]`` built block by block with full
    re-orthogonalisation (block CGS2); the images ``AK`` come out of the same
    products, so Rayleigh–Ritz ``eigh(KᵀAK)`` costs no extra product.  Its error
    converges like ``1/q²`` instead of ``1/q`` with no dependence on the gap at
    ``r`` (Musco & Musco 2015), which matters for the flat tails of EA factors.
    """
    d = int(A.shape[-1])
    blocks = [_orth(xp, A @ _sketch(xp, A, k, gen))]
    images: list[Any] = []
    ncols = k
    for i in range(n_iter + 1):
        images.append(A @ blocks[-1])
        if i == n_iter or ncols >= d:
            break
        width = min(k, d - ncols)  # the basis never exceeds d columns (then it is complete)
        blocks.append(_next_block(xp, xp.concat(blocks, axis=-1), images[-1][..., :width], gen))
        ncols += width
    K = xp.concat(blocks, axis=-1)  # orthonormal: every block is verified against the previous ones
    AK = xp.concat(images, axis=-1)
    T = B.mT(xp, K) @ AK
    w, W = B.eigh(xp, T)
    return LowRankPSD.unchecked(K @ W[..., :rank], _clip0(xp, w[..., :rank]))


def _next_block(xp: ModuleType, K: Any, W: Any, gen: np.random.Generator) -> Any:
    """Orthonormal block spanning ``(I - KKᵀ)W``, orthogonal to the orthonormal ``K``.

    One classical Gram–Schmidt pass and a QR, then *verified*: ``KᵀX`` is
    formed and, where it exceeds ``10 sqrt(d) eps``, the pass is repeated
    ("twice is enough", Kahan–Parlett / Giraud et al.).  Where the block
    vanishes (the Krylov space is invariant, e.g. for exactly low-rank ``A``)
    it continues with fresh random directions, which keeps the basis valid.
    """
    d = int(K.shape[-2])
    eps = B.eps(xp, W.dtype)
    tol = 10.0 * math.sqrt(d) * eps

    def project(Y: Any) -> Any:
        return Y - K @ (B.mT(xp, K) @ Y)

    Y = project(W)
    tiny = (xp.linalg.vector_norm(Y, axis=(-2, -1)) <= 1e3 * eps * xp.linalg.vector_norm(W, axis=(-2, -1)))[..., None, None]
    if bool(xp.any(tiny)):
        R = B.standard_normal(xp, tuple(W.shape), dtype=W.dtype, device=B.device(W), rng=gen)
        Y = xp.where(tiny, project(R), Y)
    X = _orth(xp, Y)
    for _ in range(2):
        C = B.mT(xp, K) @ X
        if float(xp.max(xp.abs(C))) <= tol:
            return X
        X = _orth(xp, X - K @ C)
    if float(xp.max(xp.abs(B.mT(xp, K) @ X))) <= tol:
        return X
    # partial deflation left junk inside span(K): continue with random directions instead
    logger.debug("block Krylov: block not orthogonal to the basis after re-orthogonalisation; restarting it")
    R = project(project(B.standard_normal(xp, tuple(W.shape), dtype=W.dtype, device=B.device(W), rng=gen)))
    return _orth(xp, project(_orth(xp, R)))


# The default method ("auto"), chosen by benchmarks/randomized_eigh.py on EA factors (d = 1024-4096,
# several decays, increment ranks and latent power laws): block Lanczos with narrow blocks grows its
# basis until every top-r Ritz pair has a residual below _AUTO_RES_TOL·θ_{r+1}; measured, that puts
# the error within 1.15× of λ_{r+1} (docs/math/randomized.rst, "The default").
_AUTO_RES_TOL = 0.15
_DEFAULT_OVERSAMPLE = 10  # l and q of the fixed-sketch methods when not given (the RS/SRE-KFAC papers')
_DEFAULT_N_ITER = 2
# the residual test (one eigh of T) runs when the basis first reaches 1.5r, 2r and 2.3r columns and
# after every block from 2.3r on: fast-decaying factors stop early, flat ones pay few failed tests
_AUTO_CHECKS = (2.0, 2.3)
_AUTO_MIN_BLOCK = 16  # narrower products run far below GEMM peak
_AUTO_DENSE_DIM = 256  # at or below this d (or when 3r >= d) a dense eigh is cheaper and exact
_AUTO_MAX_FACTOR = 4  # the basis never exceeds 4r columns (then the result is returned, logged)


def _auto_block(rank: int, d: int) -> int:
    """Block width of the default method: ``r/3`` (at least 16, at most ``d``)."""
    return max(1, min(d, max(_AUTO_MIN_BLOCK, -(-rank // 3))))


def _eigh_dense(xp: ModuleType, A: Any, rank: int) -> LowRankPSD:
    w, W = B.eigh(xp, A)
    return LowRankPSD.unchecked(W[..., :rank], _clip0(xp, w[..., :rank]))


def _eigh_auto(xp: ModuleType, A: Any, rank: int, max_basis: int | None, gen: np.random.Generator) -> LowRankPSD:
    r"""The default: block Lanczos with blocks of ``b = max(16, r/3)`` and an a-posteriori stop.

    The basis ``K = orth[AΩ, A²Ω, ...]`` grows one block at a time (:func:`_grow_lanczos`).
    When it first reaches ``2r`` and ``2.3r`` columns, and after every block beyond, the Ritz pairs ``(θ_i, u_i)`` of ``T = KᵀAK``
    are tested: by the block-Krylov relation ``AK = KT + N Bᵀ E_lastᵀ`` (``N`` the next
    block, ``B = NᵀAK_last``) the residual ``||A u_i - θ_i u_i|| = ||B w_i^{last}||`` costs a
    ``b × b`` product; the basis stops growing when every ``i <= r`` has residual
    ``<= 0.15 θ_{r+1}`` (or at ``max_basis`` columns, default ``4r``; or when it is complete).
    Products: one per block plus one, ``b`` columns each.
    """
    d = int(A.shape[-1])
    if d <= _AUTO_DENSE_DIM or 3 * rank >= d:
        return _eigh_dense(xp, A, rank)
    cap = min(d, _AUTO_MAX_FACTOR * rank if max_basis is None else max_basis)

    found: dict[str, Any] = {}

    checks = [math.ceil(f * rank) for f in _AUTO_CHECKS]

    def accept(K: Any, T: Any, nxt: Any, image: Any, last: int, ncols: int) -> bool:
        if ncols <= rank or (ncols < cap and not _due(checks, ncols, last)):
            return False
        ok, found["eig"] = _ritz_converged(xp, T, nxt, image, rank, last)
        return ok

    K, T, ok = _grow_lanczos(xp, A, _auto_block(rank, d), cap, gen, accept)
    if not ok:
        logger.debug("randomized_eigh(auto): basis reached %d columns before the residual test passed", cap)
    logger.debug("randomized_eigh(auto): rank %d, basis %d columns", rank, int(K.shape[-1]))
    w, W = found["eig"] if ok and "eig" in found and int(found["eig"][0].shape[-1]) == int(T.shape[-1]) else B.eigh(xp, T)
    return LowRankPSD.unchecked(K @ W[..., :rank], _clip0(xp, w[..., :rank]))


def _next_krylov_block(xp: ModuleType, K: Any, W: Any, KtW: Any, gen: np.random.Generator) -> Any:
    """The Lanczos block step: ``X = orth((I - KKᵀ)W)`` from the known coefficient ``KᵀW`` (a
    column of ``T``) by one classical Gram–Schmidt pass and CholeskyQR2, verified
    (``max|KᵀX| <= 10 sqrt(d) eps``).  If the verification fails, its product ``KᵀX`` is the
    coefficient of a second pass, accepted without another verification when it removes less
    than half of the block's norm ("twice is enough", Kahan–Parlett).  A vanishing block (an
    invariant Krylov space), a failed CholeskyQR2 (rank-deficient block) or a second pass that
    cancels is handed to :func:`_next_block`, which repeats passes or continues randomly.
    Cost: two or three ``(d × n)·(n × b)`` products and one or two CholeskyQR2."""
    eps = B.eps(xp, W.dtype)
    Y = W - K @ KtW
    tiny = xp.linalg.vector_norm(Y, axis=(-2, -1)) <= 1e3 * eps * xp.linalg.vector_norm(W, axis=(-2, -1))
    if bool(xp.any(tiny)):
        return _next_block(xp, K, W, gen)
    X = B._cholesky_qr2(xp, Y)
    if X is None:
        return _next_block(xp, K, W, gen)
    C = B.mT(xp, K) @ X
    if float(xp.max(xp.abs(C))) <= 10.0 * math.sqrt(int(K.shape[-2])) * eps:
        return X
    Z = X - K @ C
    kept = xp.linalg.vector_norm(Z, axis=(-2, -1)) >= 0.5 * math.sqrt(int(X.shape[-1]))  # ||X||_F = sqrt(b)
    X2 = B._cholesky_qr2(xp, Z) if bool(xp.all(kept)) else None
    return X2 if X2 is not None else _next_block(xp, K, X, gen)


def _grow_lanczos(xp: ModuleType, A: Any, b: int, cap: int, gen: np.random.Generator, accept: Any) -> tuple[Any, Any, bool]:
    """Grow ``K = orth[AΩ, A²Ω, ...]`` (blocks of ``b``) and ``T = KᵀAK`` until
    ``accept(K, T, next_block, last_image, last_width, ncols)`` holds, ``cap`` columns are reached
    or the basis is complete.  One product ``A·block`` per block: its image gives ``T``'s new
    block column, which is also the Gram–Schmidt coefficient of the next block
    (:func:`_next_krylov_block`).  The basis lives in one preallocated buffer (no copies as it
    grows).  Returns ``(K, T, accepted)``."""
    d = int(A.shape[-1])
    width = min(b, d)
    Kb = xp.zeros(tuple(A.shape[:-2]) + (d, min(d, cap + b)), dtype=A.dtype, device=B.device(A))
    Kb[..., :width] = _orth(xp, A @ _sketch(xp, A, width, gen))
    image = A @ Kb[..., :width]
    T = B.mT(xp, Kb[..., :width]) @ image
    KtI = T  # Kᵀ·image: T's last block column, and the Gram–Schmidt coefficient of the next block
    ncols, last = width, width
    while True:
        K = Kb[..., :ncols]
        if ncols >= d:
            return K, T, True
        width = min(b, d - ncols, int(Kb.shape[-1]) - ncols)
        nxt = _next_krylov_block(xp, K, image[..., :width], KtI[..., :width], gen)
        if accept(K, T, nxt, image, last, ncols) or width == 0:
            return K, T, True
        if ncols >= cap:
            return K, T, False
        Kb[..., ncols : ncols + width] = nxt
        image = A @ nxt
        KtI = B.mT(xp, Kb[..., : ncols + width]) @ image  # [C; D]: Kᵀ A nxt and nxtᵀ A nxt
        C = KtI[..., :ncols, :]
        T = xp.concat([xp.concat([T, C], axis=-1), xp.concat([B.mT(xp, C), KtI[..., ncols:, :]], axis=-1)], axis=-2)
        last = width
        ncols += width


def _due(checks: list[int], ncols: int, last: int) -> bool:
    """Is a residual test due at ``ncols`` columns?  At the first block reaching each of
    ``checks`` (ascending), and after every block past the last of them."""
    if ncols >= checks[-1]:
        return True
    return any(ncols - last < c <= ncols for c in checks)


def _ritz_converged(xp: ModuleType, T: Any, nxt: Any, image: Any, rank: int, last: int, eig: Any = None) -> tuple[bool, Any]:
    """Do the top-``rank`` Ritz pairs of ``T`` have residuals ``<= _AUTO_RES_TOL·θ_{rank+1}``?
    Returns ``(answer, (w, W))`` (the eigendecomposition of ``T``, or ``eig`` when given)."""
    w, W = B.eigh(xp, T) if eig is None else eig
    Bn = B.mT(xp, nxt) @ image  # (..., b', last): the coupling of the last block to the next
    R = Bn @ W[..., -last:, :rank]
    res = xp.sqrt(xp.sum(R * R, axis=-2))  # (..., rank)
    floor = 10.0 * math.sqrt(int(nxt.shape[-2])) * B.eps(xp, T.dtype) * w[..., :1]
    bound = _AUTO_RES_TOL * xp.maximum(w[..., rank : rank + 1], xp.zeros_like(floor)) + floor
    return bool(xp.all(res <= bound)), (w, W)


def _randomized_eigh(
    xp: ModuleType,
    A: Any,
    rank: int,
    oversample: int,
    n_iter: int,
    method: str,
    gen: np.random.Generator,
) -> LowRankPSD:
    """Unvalidated body of :func:`randomized_eigh` (internal callers: validated arguments only).

    Inputs outside the dtype's safe range (:func:`onlinela._backend.pow2_exponent`, judged by
    ``max|diag A|``, which bounds ``max|A|`` for PSD input) are scaled by an exact power of two
    first and the eigenvalues scaled back, so every method handles entries up to the dtype's
    maximum (the Gram matrices of the sketches would overflow otherwise).
    """
    k = _scale_exponent(xp, A)
    if k:
        M = _randomized_eigh(xp, B.scale_pow2(A, k), rank, oversample, n_iter, method, gen)
        return LowRankPSD.unchecked(M.eigvecs, B.scale_pow2(M.eigvals, -k))
    d = int(A.shape[-1])
    if method == "auto":
        return _eigh_auto(xp, A, rank, None if oversample is None else min(d, rank + oversample), gen)
    k = min(rank + oversample, d)
    if method == "subspace":
        return _eigh_subspace(xp, A, rank, k, n_iter, gen)
    if method == "nystrom":
        return _eigh_nystrom(xp, A, rank, k, n_iter, gen)
    if method == "krylov":
        return _eigh_krylov(xp, A, rank, k, n_iter, gen)
    return _eigh_svd(xp, A, rank, oversample, n_iter, gen)


def _scale_exponent(xp: ModuleType, A: Any) -> int:
    """The power-of-two rescaling exponent of a symmetric ``A`` (0 inside the safe range)."""
    m = float(xp.max(xp.abs(B.diagonal(xp, A))))
    if m == 0:  # indefinite or zero: the diagonal says nothing, use the entries (O(d^2), rare)
        m = float(xp.max(xp.abs(A)))
    return B.pow2_exponent(xp, m, A.dtype)


# --------------------------------------------------------------------------- error estimation


def _residual_apply(A: Any, approx: LowRankPSD) -> Any:
    return lambda X: A @ X - approx.matmul(X)


def _block_krylov_norm(
    xp: ModuleType,
    apply: Any,
    like: Any,
    n_iter: int,
    gen: np.random.Generator,
    block: int = 4,
) -> Any:
    r"""Estimate ``||E||_2`` of a symmetric operator ``E`` (``apply(X) = E X``) for each matrix of a stack.

    Block Lanczos with full re-orthogonalisation: the block Krylov basis
    ``K = [X, EX, ..., E^{n-1}X]`` (``block`` random start vectors, ``n_iter``
    applications of ``E``) and the Ritz values ``θ = eig(KᵀEK)``; the estimate
    is ``max|θ|``, which never exceeds ``||E||_2`` beyond rounding (Ritz values
    interlace the spectrum).  Returns an array of shape ``like.shape[:-2]``.
    """
    d = int(like.shape[-1])
    batch = tuple(like.shape[:-2])
    dtype, dev = like.dtype, B.device(like)
    b = min(block, d)
    X = _orth(xp, B.standard_normal(xp, batch + (d, b), dtype=dtype, device=dev, rng=gen))
    basis, images = [X], []
    ncols = b
    for i in range(n_iter):
        images.append(apply(basis[-1]))
        if i == n_iter - 1 or ncols >= d:
            break
        width = min(b, d - ncols)
        basis.append(_next_block(xp, xp.concat(basis, axis=-1), images[-1][..., :width], gen))
        ncols += width
    K = xp.concat(basis, axis=-1)
    T = B.symmetrize(xp, B.mT(xp, K) @ xp.concat(images, axis=-1))
    theta = xp.linalg.eigvalsh(T)
    return xp.max(xp.abs(theta), axis=-1)


def _estimate_spectral_error(
    xp: ModuleType, A: Any, approx: LowRankPSD, n_iter: int, gen: np.random.Generator, block: int = 4
) -> Any:
    """Per-matrix estimates of ``||A - approx||_2`` (array of shape ``A.shape[:-2]``)."""
    return _block_krylov_norm(xp, _residual_apply(A, approx), A, n_iter, gen, block)


# --------------------------------------------------------------------------- adaptive rank


def _adaptive_randomized_eigh(
    xp: ModuleType,
    A: Any,
    tol: float,
    max_rank: int,
    block_size: int,
    n_iter: int,
    gen: np.random.Generator,
    est_iter: int = 10,
) -> LowRankPSD:
    """Unvalidated body of :func:`adaptive_randomized_eigh` (rescaled as :func:`_randomized_eigh`)."""
    k = _scale_exponent(xp, A)
    if k:
        M = _adaptive_randomized_eigh(xp, B.scale_pow2(A, k), tol, max_rank, block_size, n_iter, gen, est_iter)
        return LowRankPSD.unchecked(M.eigvecs, B.scale_pow2(M.eigvals, -k))
    if n_iter is None:
        return _adaptive_lanczos(xp, A, tol, max_rank, block_size, gen, est_iter)
    return _adaptive_range_finder(xp, A, tol, max_rank, block_size or 32, n_iter, gen, est_iter)


_ADAPTIVE_BLOCK = 64  # default block width of adaptive_randomized_eigh (its rank is not known up front)
_ADAPTIVE_MARGIN = 1.15  # the rank is chosen so that 1.15·θ_{r+1} <= tol·θ_1 (the default's error factor)


def _adaptive_lanczos(
    xp: ModuleType, A: Any, tol: float, max_rank: int, block_size: int | None, gen: np.random.Generator, est_iter: int
) -> LowRankPSD:
    """Default body of :func:`adaptive_randomized_eigh`: the Lanczos growth of the default
    :func:`randomized_eigh`, with the rank read off the Ritz values as the basis grows."""
    d = int(A.shape[-1])
    if d <= _AUTO_DENSE_DIM:
        w, W = B.eigh(xp, A)
        w = _clip0(xp, w)
        return _warn_max_rank(xp, LowRankPSD.unchecked(W, w), _rank_for(xp, w, tol, 1.0, max_rank), max_rank, tol)
    b = min(d, block_size or _ADAPTIVE_BLOCK)
    cap = min(d, _AUTO_MAX_FACTOR * max_rank)
    found: dict[str, Any] = {"next_test": 0}

    def accept(K: Any, T: Any, nxt: Any, image: Any, last: int, ncols: int) -> bool:
        # The rank read off the Ritz values grows with the basis (they interlace upwards), so
        # no test can pass before the basis holds 2r columns for the last r read: skip the eigh.
        if ncols < min(found["next_test"], cap):
            return False
        w, W = B.eigh(xp, T)
        r = min(_rank_for(xp, w, tol, _ADAPTIVE_MARGIN, max_rank), max_rank)
        found["next_test"] = 2 * r
        if ncols <= r or ncols < min(2 * r, cap):
            return False
        ok, _ = _ritz_converged(xp, T, nxt, image, r, last, eig=(w, W))
        if not ok:
            return False
        approx = LowRankPSD.unchecked(K @ W[..., :r], _clip0(xp, w[..., :r]))
        if ncols < d and not bool(xp.all(_estimate_spectral_error(xp, A, approx, est_iter, gen) <= tol * w[..., 0])):
            return False  # the a-posteriori estimate (a lower bound) disagrees: grow on
        found.update(approx=approx, r=r)
        return True

    K, T, ok = _grow_lanczos(xp, A, b, cap, gen, accept)
    if ok and "approx" in found:
        return found["approx"]
    w, W = B.eigh(xp, T)
    r = _rank_for(xp, w, tol, 1.0 if int(K.shape[-1]) >= d else _ADAPTIVE_MARGIN, max_rank)
    keep = min(r, max_rank)
    approx = LowRankPSD.unchecked(K @ W[..., :keep], _clip0(xp, w[..., :keep]))
    if r <= max_rank and int(K.shape[-1]) < d:
        logger.warning("adaptive_randomized_eigh: basis cap %d reached before the residual test passed", cap)
    return _warn_max_rank(xp, approx, r, max_rank, tol)


def _rank_for(xp: ModuleType, w: Any, tol: float, margin: float, max_rank: int) -> int:
    """Smallest ``r >= 1`` with ``margin·w_{r+1} <= tol·w_1`` for every matrix of the stack
    (``max_rank + 1`` when even ``r = max_rank`` fails; ``w`` descending)."""
    target = tol * w[..., :1]
    r = max(1, int(xp.max(xp.sum(xp.astype(margin * w > target, xp.int64), axis=-1))))
    return min(r, max_rank + 1)


def _warn_max_rank(xp: ModuleType, approx: LowRankPSD, r: int, max_rank: int, tol: float) -> LowRankPSD:
    if r > max_rank:
        logger.warning("adaptive_randomized_eigh: max_rank=%d reached before the tolerance tol=%.3g", max_rank, tol)
        r = max_rank
    return approx.truncate(min(r, approx.rank))


def _adaptive_range_finder(
    xp: ModuleType,
    A: Any,
    tol: float,
    max_rank: int,
    block_size: int,
    n_iter: int,
    gen: np.random.Generator,
    est_iter: int = 10,
) -> LowRankPSD:
    """The pre-0.2 :func:`adaptive_randomized_eigh` (``n_iter`` an int): blocked range finder."""
    d = int(A.shape[-1])
    batch = tuple(A.shape[:-2])
    basis: list[Any] = []
    images: list[Any] = []
    k = 0
    while True:
        b = min(block_size, max_rank - k)
        Y = A @ _sketch(xp, A, b, gen)
        Kq = xp.concat(basis, axis=-1) if basis else None
        for it in range(n_iter + 1):
            if Kq is not None:
                for _ in range(2):
                    Y = Y - Kq @ (B.mT(xp, Kq) @ Y)
            Z = _orth(xp, Y)
            if Kq is not None:  # re-project: QR of a nearly-deflated block can leak along Kq
                Z = _orth(xp, Z - Kq @ (B.mT(xp, Kq) @ Z))
            if it < n_iter:
                Y = A @ Z
        basis.append(Z)
        images.append(A @ Z)
        k += b
        Q = xp.concat(basis, axis=-1)
        T = B.mT(xp, Q) @ xp.concat(images, axis=-1)
        w, W = B.eigh(xp, T)
        w = _clip0(xp, w)
        approx = LowRankPSD.unchecked(Q @ W, w)
        target = tol * w[..., 0]  # θ_1 <= ||A||_2: conservative
        if k >= d:  # complete basis: exact up to rounding
            err = xp.zeros(batch, dtype=A.dtype, device=B.device(A))
            met = True
        else:
            met, err = _confirmed_error(xp, A, approx, target, est_iter, gen)
        logger.debug("adaptive_randomized_eigh: rank %d, max estimated error/||A|| %.3g", k, _max_ratio(xp, err, w))
        if met or k >= max_rank:
            break
    if not met:
        logger.warning(
            "adaptive_randomized_eigh: max_rank=%d reached with estimated error %.3g * ||A|| > tol=%.3g",
            max_rank,
            _max_ratio(xp, err, w),
            tol,
        )
        return approx
    # Truncation.  Ranks r with θ_{r+1} > tol·θ_1 cannot meet the target (Eckart–Young:
    # error >= λ_{r+1} >= θ_{r+1}); rank r_hi, the smallest with err + θ_{r+1} <= target, meets it
    # by the triangle inequality.  The smallest acceptable rank in between is found by bisection on
    # confirmed estimates of the truncated error (usually the first candidate, r_lo, succeeds).
    r_lo = max(1, int(xp.max(xp.sum(xp.astype(w > target[..., None], xp.int64), axis=-1))))
    slack = target - err
    r_hi = max(1, int(xp.max(xp.sum(xp.astype(w > slack[..., None], xp.int64), axis=-1))))
    if r_lo >= r_hi:
        return approx.truncate(r_hi) if r_hi < k else approx
    lo, hi, cand = r_lo - 1, r_hi, r_lo  # lo fails, hi succeeds
    for _ in range(4):
        if _confirmed_error(xp, A, approx.truncate(cand), target, est_iter, gen)[0]:
            hi = cand
        else:
            lo = cand
        if hi - lo <= 1:
            break
        cand = (lo + hi) // 2
    return approx.truncate(hi) if hi < k else approx


def _confirmed_error(
    xp: ModuleType, A: Any, approx: LowRankPSD, target: Any, est_iter: int, gen: np.random.Generator
) -> tuple[bool, Any]:
    """Is the estimated error <= target for every matrix?  A pass is confirmed by a second,
    independent estimate of twice the depth (the max of the two is used), since Ritz estimates
    can only err low."""
    err = _estimate_spectral_error(xp, A, approx, est_iter, gen)
    if not bool(xp.all(err <= target)):
        return False, err
    err = xp.maximum(err, _estimate_spectral_error(xp, A, approx, 2 * est_iter, gen))
    return bool(xp.all(err <= target)), err


def _max_ratio(xp: ModuleType, err: Any, w: Any) -> float:
    top = w[..., 0]
    ratio = err / xp.where(top > 0, top, xp.ones_like(top))
    return float(xp.max(ratio))


# =========================================================================== public API


def randomized_range_finder(A: Any, size: int, *, n_iter: int = 2, rng: Any = None) -> Any:
    r"""Orthonormal basis of an approximate range of ``A`` (Halko–Martinsson–Tropp, Alg. 4.4).

    ``Q = orth((A Aᵀ)^q A Ω)`` with a Gaussian ``Ω`` of ``size`` columns and
    re-orthonormalisation after every product, so that ``||A - Q QᵀA||_2`` is
    close to ``σ_{size+1}(A)`` when the spectrum decays.

    Parameters
    ----------
    A : array, shape (..., m, n)
        Real float32 or float64 matrix (any array-API namespace), finite, non-empty;
        need not be symmetric.  Leading axes are a stack.
    size : int
        Number of basis vectors, ``1 <= size <= min(m, n)``.  (Pass ``rank +
        oversample`` for the usual oversampled basis.)
    n_iter : int, default 2
        Power iterations ``q >= 0`` after the first product ``AΩ``.
    rng : None, int or numpy.random.Generator
        Source of the Gaussian test matrix (drawn on ``A``'s device).

    Returns
    -------
    Q : array, shape (..., m, size)
        Orthonormal columns, in ``A``'s namespace, device and dtype.

    Raises
    ------
    TypeError
        ``A`` not a real floating array; ``size``/``n_iter`` not ints; bad ``rng``.
    ValueError
        ``A`` empty, non-finite or of fewer than 2 axes; ``size`` or ``n_iter`` out of range.

    Notes
    -----
    Cost: ``2q + 1`` products ``(m × n)·(n × size)``, i.e. ``O(m n size (2q+1))``,
    plus ``2q + 1`` CholeskyQR2 factorisations ``O((m+n) size^2)``.
    The expected error with ``size = r + l`` (``l >= 2``) and ``q = 0`` is at most
    ``(1 + sqrt(r/(l-1))) σ_{r+1} + e sqrt(r+l)/l · (Σ_{j>r} σ_j^2)^{1/2}``
    (HMT Theorem 10.6); every power iteration sharpens it towards ``σ_{r+1}``.
    """
    xp, m, n = _check_matrix(A, psd=False)
    size = V.check_int(size, "size", low=1, high=min(m, n), what="min(m, n) of `A`")
    n_iter = _check_iter(n_iter)
    gen = _check_rng(rng)
    return _range_finder(xp, A, size, n_iter, gen)


def randomized_svd(A: Any, rank: int, *, oversample: int = 10, n_iter: int = 2, rng: Any = None) -> tuple[Any, Any, Any]:
    r"""Randomized truncated SVD ``A ≈ U diag(s) Vh`` (Halko–Martinsson–Tropp, Alg. 4.4 + 5.1).

    Parameters
    ----------
    A : array, shape (..., m, n)
        Real float32 or float64 matrix, finite, non-empty; leading axes are a stack.
    rank : int
        Number of singular triplets returned, ``1 <= rank <= min(m, n)``.
    oversample : int, default 10
        Extra sketch columns ``l >= 0``; the sketch has ``k = min(rank + l, m, n)``
        columns (clipped to the dimension, where the result is exact up to rounding).
    n_iter : int, default 2
        Power iterations ``q >= 0`` (each applies ``Aᵀ`` then ``A``, with re-orthonormalisation).
    rng : None, int or numpy.random.Generator
        Source of the Gaussian test matrix.

    Returns
    -------
    U : array, shape (..., m, rank)
        Orthonormal left singular vectors.
    s : array, shape (..., rank)
        Singular values, descending, ``>= 0``.
    Vh : array, shape (..., rank, n)
        Orthonormal right singular vectors (rows).
        All in ``A``'s namespace, device and dtype.

    Raises
    ------
    TypeError, ValueError
        As :func:`randomized_range_finder`; ``rank``/``oversample`` out of range.

    Notes
    -----
    Cost: ``2q + 2`` products with ``k`` columns, ``O(m n k (q+1))``, plus
    ``O((m+n) k^2 + k^3)`` for the QR factorisations and the ``k × k`` SVD (the
    ``n × k`` matrix ``(QᵀA)ᵀ`` is factored by CholeskyQR2 first, so no LAPACK
    call touches a long matrix).
    """
    xp, m, n = _check_matrix(A, psd=False)
    rank = V.check_int(rank, "rank", low=1, high=min(m, n), what="min(m, n) of `A`")
    oversample = _check_iter(oversample, "oversample")
    n_iter = _check_iter(n_iter)
    gen = _check_rng(rng)
    return _randomized_svd(xp, A, rank, oversample, n_iter, gen)


def randomized_eigh(
    A: Any,
    rank: int,
    *,
    oversample: int | None = None,
    n_iter: int | None = None,
    method: str = "auto",
    rng: Any = None,
    check_inputs: bool = True,
) -> LowRankPSD:
    r"""Top-``rank`` eigenpairs of a symmetric PSD matrix by a randomized method.

    Parameters
    ----------
    A : array, shape (..., d, d)
        Symmetric positive semidefinite, real float32 or float64, finite,
        non-empty (any array-API namespace).  Symmetry is checked
        (``max|A - Aᵀ| <= 100 sqrt(d) eps · max|A|``); definiteness is assumed
        (``"subspace"`` and ``"svd"`` clip negative Ritz values to 0;
        ``"nystrom"`` raises ``ValueError`` when its sketch reveals a clearly
        negative eigenvalue).  Leading axes are a stack sharing ``rank``.
    rank : int
        ``r``, the number of eigenpairs, ``1 <= r <= d``.
    oversample : int or None, default None
        ``l >= 0``; the sketch has ``k = min(r + l, d)`` columns.  ``None``
        means 10 for the fixed-sketch methods; for ``method="auto"`` it caps
        the grown basis at ``r + l`` columns (``None``: ``4r``).
    n_iter : int or None, default None
        ``q >= 0`` power (subspace) iterations after the first product ``AΩ``
        (``None``: 2).  Must be ``None`` for ``method="auto"``.
        Fast-decaying EA spectra need few; slowly decaying ones more (the
        RS-KFAC papers use ``q = 3–4`` with ``"subspace"``).
    method : {"auto", "subspace", "nystrom", "svd", "krylov"}, default "auto"
        ``"auto"`` (the default since 0.2; before it was ``"subspace"`` with
        ``l = 10, q = 2``, reachable by passing those three arguments): for
        ``d <= 256`` or ``3r >= d`` a dense ``eigh`` (exact, and cheaper
        there); otherwise block Lanczos with blocks of ``b = max(16, ⌈r/3⌉)``
        columns whose basis grows until every top-``r`` Ritz pair has residual
        ``||Au - θu|| <= 0.15·θ_{r+1}`` (tested at ``2r`` and ``2.3r``
        columns and after every block beyond, from quantities the iteration
        already has; at most ``4r`` columns).  On the EA factors of
        ``benchmarks/randomized_eigh.py`` it stops at 2–2.7r columns, within
        1.2× of the optimal error ``λ_{r+1}``.
        ``"subspace"`` (SRE): ``Q = orth(A^{q+1}Ω)``, Rayleigh–Ritz
        ``eigh(QᵀAQ)``; ``q + 2`` products.
        ``"nystrom"``: ``Q = orth(A^q Ω)``, ``Y = AQ``, shifted Nyström
        ``Y(QᵀY)⁻¹Yᵀ``; ``q + 1`` products, so at equal ``q`` it spans the same
        range as ``"subspace"`` with one product fewer; eigenvalues are
        ``max(σ² - ν, 0)`` with ``ν = sqrt(d)·eps·||AQ||_F``.
        ``"svd"`` (RS): randomized SVD (:func:`randomized_svd`), right singular
        vectors as eigenvectors; ``2q + 2`` products.  A singular triplet whose
        left and right vectors point in opposite directions is a negative
        eigenvalue of an indefinite input: its eigenvalue is clipped to 0 (as
        every other method clips negative Ritz values), and the pairs re-sorted.
        ``"krylov"`` (an extension): block Lanczos, Rayleigh–Ritz on
        ``[AΩ, ..., A^{q+1}Ω]``; ``q + 2`` products, a ``(q+1)(r+l)``-square
        eigenproblem, gap-free convergence.
    rng : None, int or numpy.random.Generator
        Source of the Gaussian test matrix (drawn on ``A``'s device); a seed
        reproduces the result on a backend.
    check_inputs : bool, default True
        ``False`` skips every check above (the ``O(d^2)`` symmetry/finiteness
        pass included): the unchecked fast path for callers that guarantee the
        contract (``rank``, ``oversample``, ``n_iter`` valid ints, ``method``
        valid, ``A`` finite symmetric).  Invalid input then gives undefined
        results instead of an error.

    Returns
    -------
    LowRankPSD
        ``eigvecs`` (..., d, r) orthonormal, ``eigvals`` (..., r) descending and
        ``>= 0``, complement 0; ``A``'s namespace, device and dtype (float32
        stays float32: no promotion except the guarded float64 retry of a
        failed small ``eigh``).

    Raises
    ------
    TypeError
        ``A`` not an array, integer/complex/low-precision dtype; ``rank``,
        ``oversample``, ``n_iter`` not ints; ``rng`` not a seed or Generator.
    ValueError
        ``A`` not square, not symmetric, non-finite, empty; ``rank`` outside
        ``[1, d]``; negative ``oversample``/``n_iter``; unknown ``method``.

    Notes
    -----
    Cost ``O(d^2 (r+l)(q+1) + d (r+l)^2 + (r+l)^3)``: ``(q+2)``, ``(q+1)``,
    ``(2q+2)`` or ``(q+2)`` dense products ``(d × d)·(d × (r+l))`` for subspace,
    Nyström, SVD and Krylov, BLAS-3 Cholesky-QR for every re-orthonormalisation,
    one ``(r+l)``-square eigensolver (``(q+1)(r+l)`` for Krylov), and one
    ``O(d^2)`` validation pass (symmetry and finiteness together).  Memory ``O(d (r+l))`` beyond
    ``A``.  ``"auto"``: ``k/b + 1`` products of ``b`` columns for a final basis
    of ``k`` columns (``2r <= k <= 4r``), block Gram–Schmidt ``O(d k^2)`` and
    one ``k``-square ``eigh`` per residual test (2–3 tests typically).
    The error satisfies ``||A - U diag(w) Uᵀ||_2 >= λ_{r+1}``
    (Eckart–Young) and, in expectation, the Halko–Martinsson–Tropp bound (see
    ``docs/math/randomized.rst``).

    Examples
    --------
    >>> import numpy as np
    >>> from onlinela import randomized_eigh
    >>> X = np.random.default_rng(0).standard_normal((100, 5))
    >>> M = randomized_eigh(X @ X.T, 5, rng=0)
    >>> M.eigvecs.shape, M.eigvals.shape
    ((100, 5), (5,))
    """
    if V.check_bool(check_inputs, "check_inputs"):
        xp, d, _ = _check_matrix(A, psd=True)
        rank = V.check_int(rank, "rank", low=1, high=d, what="the matrix dimension d")
        if oversample is not None:
            oversample = _check_iter(oversample, "oversample")
        if n_iter is not None:
            n_iter = _check_iter(n_iter)
        method = _check_method(method)
        if method == "auto" and n_iter is not None:
            raise ValueError("`n_iter` must be None for method='auto' (it grows its Krylov basis until converged)")
        gen = _check_rng(rng)
    else:
        xp, gen = B.get_namespace(A), B.default_rng(rng)
    if method != "auto":
        oversample = _DEFAULT_OVERSAMPLE if oversample is None else oversample
        n_iter = _DEFAULT_N_ITER if n_iter is None else n_iter
    return _randomized_eigh(xp, A, rank, oversample, n_iter, method, gen)


def adaptive_randomized_eigh(
    A: Any,
    tol: float,
    *,
    max_rank: int | None = None,
    rng: Any = None,
    block_size: int | None = None,
    n_iter: int | None = None,
    est_iter: int = 10,
) -> LowRankPSD:
    r"""Randomized PSD eigendecomposition whose rank grows until ``||A - approx||_2 <= tol·||A||_2`` (estimated).

    Default (``n_iter=None``, since 0.2): the block Lanczos growth of the default
    :func:`randomized_eigh` (blocks of ``block_size`` columns, default 64).  After
    every block the rank is read off the Ritz values ``θ`` of ``KᵀAK``: the
    smallest ``r`` with ``1.15·θ_{r+1} <= tol·θ_1`` (``θ_1 <= ||A||_2``, so the test
    is conservative in the norm).  The basis stops growing when it has ``2r``
    columns, every top-``r`` Ritz pair has residual ``<= 0.15·θ_{r+1}`` (the stop
    of the default :func:`randomized_eigh`) and :func:`estimate_spectral_error`
    (``est_iter`` block-Lanczos steps) confirms ``tol``.  Its cost is then that of
    the fixed-rank default call at the rank it returns plus one estimate
    (``benchmarks/randomized_eigh.py`` measures the ratio).  For ``d <= 256`` a
    dense ``eigh`` gives the exact smallest rank.

    ``n_iter`` an int selects the pre-0.2 algorithm, a blocked adaptive range
    finder: blocks of ``block_size`` (default 32) Gaussian vectors, each refined by
    ``n_iter`` power iterations orthogonal to the basis so far, are appended to an
    orthonormal basis ``Q``; after each block the Rayleigh–Ritz approximation is
    formed and its error estimated against ``tol·θ_1``; finally the smallest rank
    ``r`` with ``estimate + θ_{r+1} <= tol·θ_1`` is kept.

    Parameters
    ----------
    A : array, shape (..., d, d)
        Symmetric PSD, real float32/float64, finite, non-empty; a stack is grown
        until every matrix meets ``tol`` and shares the final rank.
    tol : float
        Relative spectral-norm tolerance, ``0 < tol < 1``.
    max_rank : int, optional
        Upper limit ``1 <= max_rank <= d`` (default ``d``).  If it is reached
        first, the rank-``max_rank`` approximation is returned and a warning is
        logged (``logging``, logger ``onlinela.randomized``).
    rng : None, int or numpy.random.Generator
        Source of the Gaussian blocks and estimator start vectors.
    block_size : int, optional
        Columns added per step (``>= 1``; default 64, or 32 with an int ``n_iter``).
    n_iter : int, optional
        ``None`` (default): the Lanczos growth above.  An int ``>= 0``: the
        pre-0.2 range finder with that many power iterations per block.
    est_iter : int, default 10
        Block-Lanczos steps of each error estimate (``>= 1``).

    Returns
    -------
    LowRankPSD
        Rank ``r <= max_rank`` eigenpairs, descending, ``>= 0``; ``A``'s
        namespace, device and dtype.

    Raises
    ------
    TypeError, ValueError
        As :func:`randomized_eigh`; ``tol`` outside ``(0, 1)``; ``max_rank``,
        ``block_size``, ``n_iter``, ``est_iter`` out of range.

    Notes
    -----
    Cost of the default for a final basis of ``k`` columns in ``s = ⌈k/b⌉``
    blocks: ``O(d^2 k + d k^2 + s k^3)`` (one product per block, block CGS2, one
    ``eigh`` of ``T`` per block once the basis has ``2b`` columns) plus one
    estimate per accepted candidate, ``O(est_iter·d^2·4)``.  The pre-0.2 range
    finder: ``O(d^2 k (q+2) + s d^2 · 4·est_iter + d k^2 s + k^3 s)``.  The estimate is a
    lower bound of the true error up to rounding (Ritz values), accurate to a
    few percent on decaying spectra; see ``docs/math/randomized.rst``.
    """
    xp, d, _ = _check_matrix(A, psd=True)
    tol = V.check_real(tol, "tol", low=0.0, high=1.0, low_open=True, high_open=True)
    max_rank = d if max_rank is None else V.check_int(max_rank, "max_rank", low=1, high=d, what="the matrix dimension d")
    block_size = None if block_size is None else V.check_int(block_size, "block_size", low=1)
    n_iter = None if n_iter is None else _check_iter(n_iter)
    est_iter = _check_iter(est_iter, "est_iter", low=1)
    gen = _check_rng(rng)
    return _adaptive_randomized_eigh(xp, A, tol, max_rank, block_size, n_iter, gen, est_iter)


def estimate_spectral_error(A: Any, approx: LowRankPSD, *, n_iter: int = 10, rng: Any = None, block_size: int = 4) -> float:
    r"""A-posteriori estimate of ``||A - approx||_2`` by block Lanczos on the residual.

    The residual ``E = A - approx`` is applied as ``AX - approx.matmul(X)``
    (never formed).  A random block of ``block_size`` vectors generates the
    Krylov space ``span[X, EX, ..., E^{n_iter-1}X]``, orthonormalised fully;
    the estimate is the largest ``|θ|`` over the Ritz values ``θ`` of ``E`` on it.

    Parameters
    ----------
    A : array, shape (..., d, d)
        Symmetric, real float32/float64, finite, non-empty.
    approx : LowRankPSD
        Same namespace, device, dtype, ``d`` and stack shape as ``A``.
    n_iter : int, default 10
        Applications of ``E`` (``>= 1``).
    rng : None, int or numpy.random.Generator
        Source of the start block.
    block_size : int, default 4
        Start vectors (``>= 1``).

    Returns
    -------
    float
        The estimate; for a stack, the **maximum** over the stack.  It is a
        lower bound of ``||A - approx||_2`` up to rounding (Ritz values interlace
        the spectrum) and exact when the Krylov space is invariant (e.g.
        ``block_size·n_iter >= d``); on decaying residual spectra it is
        typically within a few percent.

    Raises
    ------
    TypeError
        ``approx`` not a :class:`LowRankPSD`, dtype mismatch, mixed namespaces.
    ValueError
        Shape mismatch, devices differ, invalid ``A``, ``n_iter`` or ``block_size`` < 1.

    Notes
    -----
    Cost ``O(n_iter · (d^2 b + d r b) + d (n_iter b)^2)`` with ``b = block_size``.
    """
    xp, d, _ = _check_matrix(A, psd=True)
    if not isinstance(approx, LowRankPSD):
        raise TypeError(f"`approx` must be a LowRankPSD, got {type(approx).__name__}")
    B.get_namespace(A, approx.eigvecs, names=("A", "approx"))
    if approx.dtype != A.dtype:
        raise TypeError(f"`approx` must have the dtype of `A` ({A.dtype}), got {approx.dtype}")
    if approx.dim != d or approx.batch_shape != tuple(A.shape[:-2]):
        raise ValueError(
            f"`approx` must describe matrices of shape {tuple(A.shape)}, got dimension {approx.dim} "
            f"and stack shape {approx.batch_shape}"
        )
    n_iter = _check_iter(n_iter, low=1)
    block_size = V.check_int(block_size, "block_size", low=1)
    gen = _check_rng(rng)
    est = _estimate_spectral_error(xp, A, approx, n_iter, gen, block_size)
    return float(xp.max(est))
