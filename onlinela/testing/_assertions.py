"""Assertions whose tolerances derive from dtype and problem size."""

from __future__ import annotations

from typing import Any

import array_api_compat
import numpy as np

__all__ = ["assert_allclose_dtype", "assert_orthonormal", "assert_same_subspace", "default_tolerance", "to_numpy"]


def to_numpy(x: Any) -> np.ndarray:
    """Copy any array-API array (numpy, torch, cupy, array-api-strict, ...) to a NumPy array on the host."""
    if isinstance(x, np.ndarray) or np.isscalar(x):
        return np.asarray(x)
    if array_api_compat.is_torch_array(x):
        return x.detach().cpu().numpy()
    if array_api_compat.is_cupy_array(x):
        return x.get()
    try:
        return np.from_dlpack(x)
    except Exception:
        return np.from_dlpack(array_api_compat.to_device(x, "cpu"))


def _eps(dtype: Any) -> float:
    name = str(dtype).rsplit(".", 1)[-1]
    return float(np.finfo(np.dtype(name)).eps)


def default_tolerance(dtype: Any, dim: int, *, factor: float = 10.0) -> float:
    """``factor * sqrt(dim) * eps(dtype)``: the relative error of a backward-stable kernel
    of size ``dim`` (inner products accumulate ``O(sqrt(dim))`` rounding errors on average)."""
    return factor * float(np.sqrt(max(dim, 1))) * _eps(dtype)


def assert_allclose_dtype(
    actual: Any,
    desired: Any,
    *,
    dim: int | None = None,
    factor: float = 10.0,
    scale: float | None = None,
    err_msg: str = "",
) -> None:
    """Assert ``max|actual - desired| <= default_tolerance(dtype, dim, factor) * scale``.

    Parameters
    ----------
    actual, desired : arrays of the same shape (any array-API namespace)
    dim : int, optional
        Problem size driving error growth; default the last axis length.
    factor : float
        The constant ``c`` in ``c * sqrt(dim) * eps``.
    scale : float, optional
        Magnitude the error is relative to; default ``max|desired|`` (at least 1e-30).
    err_msg : str
        Added to the failure message.
    """
    dtype = getattr(actual, "dtype", np.float64)
    a, b = to_numpy(actual).astype(np.float64), to_numpy(desired).astype(np.float64)
    if a.shape != b.shape:
        raise AssertionError(f"shape mismatch: {a.shape} vs {b.shape}. {err_msg}")
    dim = int(dim if dim is not None else (a.shape[-1] if a.ndim else 1))
    ref = float(scale) if scale is not None else max(float(np.max(np.abs(b))) if b.size else 0.0, 1e-30)
    tol = default_tolerance(dtype, dim, factor=factor) * ref
    err = float(np.max(np.abs(a - b))) if a.size else 0.0
    if not err <= tol:
        raise AssertionError(
            f"max abs error {err:.3e} exceeds {factor} * sqrt({dim}) * eps({dtype}) * {ref:.3e} = {tol:.3e}. {err_msg}"
        )


def assert_orthonormal(Q: Any, *, factor: float = 10.0, err_msg: str = "") -> None:
    """Assert ``max|QᵀQ - I| <= factor * sqrt(d) * eps(dtype)`` for ``Q`` of shape (..., d, r)."""
    q = to_numpy(Q).astype(np.float64)
    r = q.shape[-1]
    gram = np.swapaxes(q, -1, -2) @ q
    err = float(np.max(np.abs(gram - np.eye(r)))) if r else 0.0
    tol = default_tolerance(Q.dtype, q.shape[-2], factor=factor)
    if not err <= tol:
        raise AssertionError(f"max|QᵀQ - I| = {err:.3e} exceeds {tol:.3e}. {err_msg}")


def assert_same_subspace(U1: Any, U2: Any, *, tol: float, err_msg: str = "") -> None:
    """Assert the column spans of ``U1`` and ``U2`` (orthonormal, (d, r)) agree, sign- and rotation-free.

    Checks ``sin θ_max = ||U1 U1ᵀ - U2 U2ᵀ||_2 <= tol``, the largest principal angle.
    """
    a, b = to_numpy(U1).astype(np.float64), to_numpy(U2).astype(np.float64)
    if a.shape != b.shape:
        raise AssertionError(f"shape mismatch: {a.shape} vs {b.shape}. {err_msg}")
    diff = a @ np.swapaxes(a, -1, -2) - b @ np.swapaxes(b, -1, -2)
    sin = float(np.max(np.linalg.norm(diff, ord=2, axis=(-2, -1)))) if a.shape[-1] else 0.0
    if not sin <= tol:
        raise AssertionError(f"subspaces differ: sin(largest principal angle) = {sin:.3e} > {tol:.3e}. {err_msg}")
