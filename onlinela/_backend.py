"""The one place that dispatches on the array backend.

Everything in :mod:`onlinela` works on any array-API array through
``array-api-compat``.  This module infers the namespace once, handles devices
and dtypes, draws reproducible random sketches on the array's device, and holds
the native fast paths (LAPACK ``evd`` eigensolver, Cholesky-QR) where a backend
has them.  It never imports torch or cupy: when an array *is* a torch tensor or
a cupy array, the already-imported module is taken from :data:`sys.modules`.
"""

from __future__ import annotations

import logging
import math
import sys
from types import ModuleType
from typing import Any

import array_api_compat
import numpy as np

__all__: list[str] = []  # private module

logger = logging.getLogger(__name__)

RNGLike = "None | int | numpy.random.Generator"


# --------------------------------------------------------------------------- namespace


def get_namespace(*arrays: Any, names: tuple[str, ...] | None = None) -> ModuleType:
    """Return the common array-API namespace of ``arrays``.

    Raises ``TypeError`` naming the arguments when they come from different
    libraries (or are not arrays), and ``ValueError`` when they live on
    different devices.
    """
    names = names or tuple(f"argument {i}" for i in range(len(arrays)))
    for a, n in zip(arrays, names):
        if not array_api_compat.is_array_api_obj(a):
            raise TypeError(f"`{n}` must be an array-API array (numpy, cupy, torch, ...), got {type(a).__name__}")
        if getattr(a, "is_meta", False):
            raise ValueError(f"`{n}` is a torch 'meta' tensor (shape only, no data); pass a tensor with data")
    try:
        xp = array_api_compat.array_namespace(*arrays)
    except TypeError as exc:
        kinds = ", ".join(f"`{n}`: {type(a).__module__}.{type(a).__name__}" for a, n in zip(arrays, names))
        raise TypeError(f"arrays must come from one array library; got {kinds}") from exc
    if len(arrays) > 1:
        d0 = array_api_compat.device(arrays[0])
        for a, n in zip(arrays[1:], names[1:]):
            if array_api_compat.device(a) != d0:
                raise ValueError(
                    f"`{n}` is on device {array_api_compat.device(a)!r} but `{names[0]}` is on {d0!r}; "
                    "move them to one device"
                )
    return xp


def device(x: Any) -> Any:
    """The device of array ``x``."""
    return array_api_compat.device(x)


def is_numpy(xp: ModuleType) -> bool:
    return array_api_compat.is_numpy_namespace(xp)


def is_torch(xp: ModuleType) -> bool:
    return array_api_compat.is_torch_namespace(xp)


def is_cupy(xp: ModuleType) -> bool:
    return array_api_compat.is_cupy_namespace(xp)


def _torch() -> ModuleType:
    return sys.modules["torch"]


def _cupy() -> ModuleType:
    return sys.modules["cupy"]


def eps(xp: ModuleType, dtype: Any) -> float:
    """Machine epsilon of ``dtype``."""
    return float(xp.finfo(dtype).eps)


def to_float(x: Any) -> float:
    """A 0-d array (or Python number) as a Python float."""
    return float(x)


def mT(xp: ModuleType, a: Any) -> Any:
    """Transpose of the last two axes."""
    return xp.matrix_transpose(a) if hasattr(xp, "matrix_transpose") else xp.linalg.matrix_transpose(a)


def diag_embed(xp: ModuleType, v: Any) -> Any:
    """(..., k) -> (..., k, k) diagonal matrices."""
    k = v.shape[-1]
    eye = xp.eye(k, dtype=v.dtype, device=device(v))
    return v[..., :, None] * eye


def diagonal(xp: ModuleType, a: Any) -> Any:
    """(..., k, k) -> (..., k) diagonals."""
    return xp.linalg.diagonal(a) if hasattr(xp, "linalg") else xp.diagonal(a)


def flip_last(xp: ModuleType, a: Any) -> Any:
    """Reverse the last axis (the order of eigenpairs)."""
    return xp.flip(a, axis=-1)


def symmetrize(xp: ModuleType, a: Any) -> Any:
    return (a + mT(xp, a)) / 2


# --------------------------------------------------------------------------- randomness


def default_rng(rng: Any) -> np.random.Generator:
    """Normalise ``rng`` (None, int seed, or ``numpy.random.Generator``)."""
    if rng is None or isinstance(rng, (int, np.integer)) and not isinstance(rng, bool):
        if rng is not None and int(rng) < 0:
            raise ValueError(f"`rng` must be None, a non-negative int seed or a numpy.random.Generator, got {rng}")
        return np.random.default_rng(rng)
    if isinstance(rng, np.random.Generator):
        return rng
    raise TypeError(
        f"`rng` must be None, a non-negative int seed or a numpy.random.Generator, got {type(rng).__name__}"
    )


def standard_normal(xp: ModuleType, shape: tuple[int, ...], *, dtype: Any, device: Any, rng: Any) -> Any:
    """Gaussian sketch of ``shape`` in ``dtype`` on ``device``, reproducible from ``rng``.

    NumPy draws from the generator directly; torch and cupy draw on the array's
    device from a generator seeded by ``rng`` (so no host-to-device copy of a
    large sketch); other namespaces draw on the host and transfer.
    """
    gen = default_rng(rng)
    if is_numpy(xp):
        return gen.standard_normal(shape, dtype=np.float32 if dtype == np.float32 else np.float64)
    seed = int(gen.integers(0, 2**63 - 1))
    if is_torch(xp):
        torch = _torch()
        g = torch.Generator(device=device)
        g.manual_seed(seed)
        return torch.randn(shape, generator=g, dtype=dtype, device=device)
    if is_cupy(xp):
        cp = _cupy()
        with cp.cuda.Device(device):
            return cp.random.default_rng(seed).standard_normal(shape, dtype=dtype)
    host = np.random.default_rng(seed).standard_normal(shape)
    return xp.asarray(host, dtype=dtype, device=device)


# --------------------------------------------------------------------------- guarded numerics


def pow2_exponent(xp: ModuleType, value: float, dtype: Any) -> int:
    """``k`` such that ``2**k · value`` is near 1 when ``value`` lies outside the safe window
    ``[2**(emin/4), 2**(emax/4)]`` of ``dtype`` (float64: about 1e-77 to 1e77, float32: 5e-10 to
    4e9), else 0.  Scaling by a power of two is exact, so a rescaled computation gives the
    unscaled one's digits wherever the latter neither overflows nor underflows; Gram matrices
    (squares of the data) stay representable inside the window.  0 for ``value`` 0 or non-finite.
    """
    if not value > 0 or value == float("inf"):
        return 0
    fi = np.finfo(np.float32 if dtype == xp.float32 else np.float64)
    _, e = math.frexp(value)
    if fi.minexp / 4 <= e <= fi.maxexp / 4:
        return 0
    return -e


def scale_pow2(a: Any, k: int) -> Any:
    """``a · 2**k`` exactly, in ``a``'s dtype (two factors, so that ``2**k`` itself never overflows it)."""
    h = k // 2
    return a * 2.0**h * 2.0 ** (k - h)


def _finite(xp: ModuleType, a: Any) -> bool:
    return bool(xp.all(xp.isfinite(a)))


def eigh(xp: ModuleType, a: Any) -> tuple[Any, Any]:
    """Symmetric eigendecomposition, eigenvalues *descending*.

    Symmetrises the input, uses LAPACK ``syevd`` (divide and conquer) through
    the backend, and retries in float64 when the solver fails or returns
    non-finite values (float32 ``eigh`` can fail to converge on clustered
    spectra).  Returns ``(w, V)`` in the input's dtype and device; ``a`` may be
    a stack ``(..., k, k)``.  Cost ``O(k^3)`` per matrix.
    """
    a = symmetrize(xp, a)
    try:
        w, v = xp.linalg.eigh(a)
        ok = _finite(xp, w) and _finite(xp, v)
    except Exception as exc:  # LinAlgError (numpy/cupy), torch._C._LinAlgError, ...
        logger.debug("eigh failed in %s (%s); retrying in float64", a.dtype, exc)
        ok = False
    if not ok:
        if a.dtype == xp.float64:
            raise np.linalg.LinAlgError("eigh failed in float64; is the input finite?")
        w, v = xp.linalg.eigh(xp.astype(a, xp.float64))
        w, v = xp.astype(w, a.dtype), xp.astype(v, a.dtype)
    return flip_last(xp, w), flip_last(xp, v)


def qr(xp: ModuleType, y: Any) -> Any:
    """Orthonormal basis ``Q`` (..., d, k) of the columns of ``y`` (..., d, k), d >= k.

    Fast path: CholeskyQR2 (two Gram/Cholesky passes, all BLAS-3), accurate to
    working precision whenever ``cond(y)`` is below ``eps**-1/2``; falls back to
    Householder QR when the Cholesky factorisation fails or the result is not
    orthonormal.  Cost ``O(d k^2)``.
    """
    q = _cholesky_qr2(xp, y)
    if q is not None:
        return q
    return xp.linalg.qr(y)[0]


def _cholesky_qr2(xp: ModuleType, y: Any) -> Any | None:
    k = y.shape[-1]
    if k == 0:
        return y
    # accept what assert_orthonormal accepts (10 sqrt(d) eps) with a factor-2 margin; a looser
    # test (it was 100 k eps: 3e-3 in float32 at k = 230) let rank-deficient inputs through
    tol = 5.0 * max(y.shape[-2], k) ** 0.5 * eps(xp, y.dtype)
    q = y
    for _ in range(2):
        gram = mT(xp, q) @ q
        try:
            r = xp.linalg.cholesky(gram, upper=True)
        except Exception:
            return None
        if not _finite(xp, r):
            return None
        q = _solve_upper_right(xp, q, r)
    err = q.shape[-1] and float(xp.max(xp.abs(mT(xp, q) @ q - xp.eye(k, dtype=q.dtype, device=device(q)))))
    if not err <= tol or not np.isfinite(err):
        return None
    return q


def _solve_upper_right(xp: ModuleType, b: Any, r: Any) -> Any:
    """``b @ inv(r)`` for upper-triangular ``r``."""
    if is_numpy(xp):
        # inv(R) (k x k) + one GEMM: ~4x faster than a triangular solve with a tall (d, k) b,
        # and accurate enough for CholeskyQR (whose result is checked).  NumPy's own LAPACK,
        # not scipy's: alternating two OpenBLAS thread pools makes both spin against each other.
        try:
            rinv = np.linalg.inv(r)
        except np.linalg.LinAlgError:
            return b * np.nan  # singular R: CholeskyQR must fail over
        return b @ rinv
    if is_torch(xp):
        return _torch().linalg.solve_triangular(r, b, upper=True, left=False)
    # generic: solve R^T X^T = B^T
    return mT(xp, xp.linalg.solve(mT(xp, r), mT(xp, b)))


def svd_thin(xp: ModuleType, a: Any) -> tuple[Any, Any, Any]:
    """Thin SVD ``(U, s, Vh)`` with float64 retry on failure."""
    try:
        u, s, vh = xp.linalg.svd(a, full_matrices=False)
        if _finite(xp, s):
            return u, s, vh
    except Exception as exc:
        logger.debug("svd failed in %s (%s); retrying in float64", a.dtype, exc)
    if a.dtype == xp.float64:
        raise np.linalg.LinAlgError("svd failed in float64; is the input finite?")
    u, s, vh = xp.linalg.svd(xp.astype(a, xp.float64), full_matrices=False)
    return xp.astype(u, a.dtype), xp.astype(s, a.dtype), xp.astype(vh, a.dtype)
