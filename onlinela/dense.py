"""The guarded dense symmetric eigendecomposition every exact path of onlinela uses."""

from __future__ import annotations

from typing import Any

from . import _backend as B
from . import _validation as V

__all__ = ["eigh"]


def eigh(A: Any, *, check_inputs: bool = True) -> tuple[Any, Any]:
    """Eigenpairs of a symmetric matrix (or stack), eigenvalues *descending*.

    Parameters
    ----------
    A : array of shape (..., d, d)
        Real float32 or float64, symmetric (it is symmetrised); any array-API
        backend.
    check_inputs : bool
        Validate ``A`` (finite, square, real floating); ``False`` is the
        unchecked fast path for callers that already know it (the adapters'
        per-step decompositions).

    Returns
    -------
    w : array of shape (..., d)
        Eigenvalues, descending, in ``A``'s dtype and device.
    U : array of shape (..., d, d)
        Orthonormal eigenvectors (columns), same order.

    Notes
    -----
    LAPACK ``syevd`` through the backend; a float32 failure (or non-finite
    output) is retried in float64 and cast back; a float64 failure raises
    ``numpy.linalg.LinAlgError``.  Cost ``O(d³)`` per matrix.
    """
    V.check_bool(check_inputs, "check_inputs")
    xp = B.get_namespace(A)
    if check_inputs:
        V.check_float_array(A, "A", xp, min_ndim=2)
        V.check_square(A, "A")
    return B.eigh(xp, A)
