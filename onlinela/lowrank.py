"""Low-rank symmetric PSD matrices ``M ≈ U diag(w) Uᵀ + c (I - U Uᵀ)``."""

from __future__ import annotations

from dataclasses import dataclass
from types import ModuleType
from typing import Any

from . import _backend as B
from . import _validation as V

__all__ = ["LowRankPSD"]


@dataclass(frozen=True, eq=False)
class LowRankPSD:
    r"""A symmetric PSD matrix stored by its dominant eigenpairs.

    Represents

    .. math:: M = U \operatorname{diag}(w) U^T + c\,(I - U U^T),

    the top-``r`` eigenpairs ``(w, U)`` of a ``d × d`` matrix plus one value
    ``c`` (``complement``) for the ``d - r`` remaining directions (0 by default:
    the truncated matrix; ``"min"`` uses ``min(w)``, the variant that treats the
    unknown tail as flat at the smallest kept eigenvalue).

    Parameters
    ----------
    eigvecs : array, shape (..., d, r)
        Orthonormal columns ``U`` (not checked: orthonormality costs as much as
        a solve; use :func:`onlinela.testing.assert_orthonormal`).  Any leading
        batch axes describe a stack of matrices.
    eigvals : array, shape (..., r)
        Eigenvalues ``w``, descending and ``>= 0``; same dtype as ``eigvecs``.
    complement : float >= 0 or "min", default 0.0
        Eigenvalue assumed for the orthogonal complement of ``span(U)``.

    Notes
    -----
    Storage ``O(d r)``; every operation costs ``O(d r k)`` for ``k`` right-hand
    sides: the ``d × d`` matrix is never formed (except by :meth:`to_dense`).
    Arrays stay in their namespace, device and dtype (float32 stays float32).
    Instances are immutable: methods return new objects.
    """

    eigvecs: Any
    eigvals: Any
    complement: float | str = 0.0

    def __post_init__(self) -> None:
        xp = B.get_namespace(self.eigvecs, self.eigvals, names=("eigvecs", "eigvals"))
        U, w = self.eigvecs, self.eigvals
        V.check_float_array(U, "eigvecs", xp, min_ndim=0)
        if U.ndim < 2:
            raise ValueError(f"`eigvecs` must have shape (..., d, r), got shape {tuple(U.shape)}")
        if U.shape[-2] == 0:
            raise ValueError(f"`eigvecs` must have d >= 1 rows, got shape {tuple(U.shape)}")
        if w.dtype != U.dtype:
            raise TypeError(f"`eigvals` must have the dtype of `eigvecs` ({U.dtype}), got {w.dtype}")
        if tuple(w.shape) != tuple(U.shape[:-2]) + (U.shape[-1],):
            raise ValueError(
                f"`eigvals` must have shape {tuple(U.shape[:-2]) + (U.shape[-1],)} to match `eigvecs` "
                f"of shape {tuple(U.shape)}, got {tuple(w.shape)}"
            )
        if U.shape[-1] > U.shape[-2]:
            raise ValueError(f"`eigvecs` must have at most d columns (r <= d), got shape {tuple(U.shape)}")
        V.check_float_array(w, "eigvals", xp, min_ndim=0)
        if w.shape[-1] > 0:
            if not bool(xp.all(w >= 0)):
                raise ValueError("`eigvals` must be >= 0 (clip round-off negatives of a PSD matrix to 0)")
            if w.shape[-1] > 1 and not bool(xp.all(w[..., :-1] >= w[..., 1:])):
                raise ValueError("`eigvals` must be sorted in descending order (flip the output of eigh)")
        _check_complement(self.complement)

    @classmethod
    def unchecked(cls, eigvecs: Any, eigvals: Any, complement: float | str = 0.0) -> LowRankPSD:
        """Construct without validation: the fast path for callers that guarantee the contract.

        Same parameters as the class; nothing is checked (no namespace, dtype,
        shape, sign or order check, no host synchronisation), so a violation
        gives wrong results later instead of an error here.  Cost ``O(1)``.
        """
        obj = object.__new__(cls)
        object.__setattr__(obj, "eigvecs", eigvecs)
        object.__setattr__(obj, "eigvals", eigvals)
        object.__setattr__(obj, "complement", complement)
        return obj

    # ------------------------------------------------------------------ properties
    @property
    def xp(self) -> ModuleType:
        """The array namespace of the factors."""
        return B.get_namespace(self.eigvecs)

    @property
    def dim(self) -> int:
        """``d``, the matrix dimension."""
        return int(self.eigvecs.shape[-2])

    @property
    def rank(self) -> int:
        """``r``, the number of stored eigenpairs."""
        return int(self.eigvecs.shape[-1])

    @property
    def dtype(self) -> Any:
        return self.eigvecs.dtype

    @property
    def device(self) -> Any:
        return B.device(self.eigvecs)

    @property
    def batch_shape(self) -> tuple[int, ...]:
        return tuple(self.eigvecs.shape[:-2])

    def _complement_value(self) -> Any:
        """``c`` as a float, or an array of shape (..., 1, 1) for ``"min"``."""
        if self.complement == "min":
            if self.rank == 0:
                return 0.0
            return self.eigvals[..., -1:][..., None]
        return float(self.complement)

    # ------------------------------------------------------------------ operations
    def to_dense(self) -> Any:
        """The dense matrix, shape (..., d, d).  Cost ``O(d^2 r)``; memory ``O(d^2)``."""
        xp = self.xp
        eye = xp.eye(self.dim, dtype=self.dtype, device=self.device)
        if self.batch_shape:
            eye = xp.broadcast_to(eye, self.batch_shape + eye.shape)
        return self.damped_power(eye, 1.0)

    def matmul(self, X: Any) -> Any:
        """``M @ X`` for ``X`` of shape (..., d, k) or (d,).  Cost ``O(d r k)``."""
        return self.damped_power(X, 1.0)

    def solve(self, X: Any, damping: float) -> Any:
        r"""``(M + damping·I)⁻¹ X`` in ``O(d r k)`` via the spectral-complement identity.

        .. math:: (M + \mu I)^{-1} X = U[(w+\mu)^{-1} - (c+\mu)^{-1}]U^T X + (c+\mu)^{-1} X.

        Parameters
        ----------
        X : array, shape (..., d, k) or (d,)
            Right-hand sides, same namespace, device and dtype as the factor.
        damping : float >= 0
            ``μ``.  ``damping + c`` must be positive unless ``r == d``, and
            ``damping + min(w)`` must be positive (otherwise ``M + μI`` is singular).

        Returns
        -------
        array, shape of ``X``
            Its spectral norm operator satisfies ``||(M+μI)⁻¹|| <= 1/μ``.
        """
        return self.damped_power(X, -1.0, damping)

    def damped_power(self, X: Any, power: float, damping: float = 0.0) -> Any:
        r"""``(M + damping·I)^power X`` for any real ``power`` (e.g. ``-1``, ``-1/2``, ``1``).

        Uses ``U[(w+μ)^p - (c+μ)^p]UᵀX + (c+μ)^p X``: two thin GEMMs, cost
        ``O(d r k)``.  Negative powers need ``w + μ > 0`` and (when ``r < d``)
        ``c + μ > 0``; ``ValueError`` otherwise.
        """
        xp = self.xp
        damping = V.check_real(damping, "damping", low=0.0)
        power = V.check_real(power, "power")
        X, vector = self._check_rhs(X, xp)
        c = self._complement_value()
        if power < 0:
            self._check_invertible(xp, c, damping)
        U = self.eigvecs
        w = self.eigvals
        cpow = (c + damping) ** power if self.rank < self.dim else 0.0
        scale = (w + damping) ** power  # (..., r)
        P = B.mT(xp, U) @ X  # (..., r, k)
        if isinstance(cpow, float):
            coef = scale - cpow
        else:  # "min" complement: cpow has shape (..., 1, 1)
            coef = scale - cpow[..., 0]
        Y = U @ (coef[..., :, None] * P)
        if self.rank < self.dim:
            Y = Y + cpow * X
        return Y[..., 0] if vector else Y

    def _check_rhs(self, X: Any, xp: ModuleType) -> tuple[Any, bool]:
        B.get_namespace(self.eigvecs, X, names=("eigvecs", "X"))
        if X.dtype != self.dtype:
            raise TypeError(f"`X` must have the factor's dtype {self.dtype}, got {X.dtype}")
        if X.ndim == 0:
            raise ValueError("`X` must have shape (d,) or (..., d, k), got a 0-d array")
        vector = X.ndim == 1
        if vector:
            X = X[:, None]
        if X.shape[-2] != self.dim:
            raise ValueError(f"`X` must have {self.dim} rows (the matrix dimension d), got shape {tuple(X.shape)}")
        if not B._finite(xp, X):
            raise ValueError("`X` must be finite (no NaN or Inf)")
        return X, vector

    def _check_invertible(self, xp: ModuleType, c: Any, damping: float) -> None:
        if damping > 0:
            return
        if self.rank < self.dim and (float(xp.min(c)) if not isinstance(c, float) else c) <= 0:
            raise ValueError(
                "`damping` must be > 0 when the complement eigenvalue is 0 and rank < dim: M + damping*I is singular"
            )
        if self.rank and float(xp.min(self.eigvals)) <= 0:
            raise ValueError("`damping` must be > 0: the factor has a zero eigenvalue, so M + damping*I is singular")

    def truncate(self, rank: int) -> LowRankPSD:
        """Keep the top ``rank`` eigenpairs (``0 <= rank <= self.rank``).  Cost ``O(1)`` (views)."""
        rank = V.check_int(rank, "rank", low=0, high=self.rank, what="the current rank")
        return LowRankPSD.unchecked(self.eigvecs[..., :rank], self.eigvals[..., :rank], self.complement)


def _check_complement(c: Any) -> None:
    if isinstance(c, str):
        if c != "min":
            raise ValueError(f"`complement` must be a float >= 0 or 'min', got {c!r}")
        return
    V.check_real(c, "complement", low=0.0)
