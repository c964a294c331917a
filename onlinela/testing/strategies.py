"""Hypothesis strategies for symmetric PSD matrices, low-rank factors and EA streams.

Every strategy is bound to an array namespace ``xp`` (``numpy``,
``array_api_strict``, ``array_api_compat.torch``, ...) and builds its arrays
there, in the requested dtype.  Matrices are generated in float64 from a seed
drawn by hypothesis (so failures shrink to a reproducible seed) and cast once
at the end; the exact spectrum is returned alongside where a test needs an
oracle.

Spectrum kinds (``kind``):

``"geometric"``   ``λ_i = s · q^i`` with ``q ∈ [0.3, 0.95]`` (the EA decay regime)
``"polynomial"``  ``λ_i = s · (i+1)^{-p}`` with ``p ∈ [0.5, 3]`` (slow decay)
``"exact_rank"``  ``k`` random eigenvalues in ``[0.1 s, s]``, the rest exactly 0
``"clustered"``   a few distinct values, each repeated (tests of degenerate eigenspaces)
"""

from __future__ import annotations

from types import ModuleType
from typing import Any, NamedTuple, Sequence

import numpy as np
from hypothesis import strategies as st

from ..lowrank import LowRankPSD

__all__ = [
    "SPECTRUM_KINDS",
    "STREAM_STYLES",
    "EAStream",
    "PSDCase",
    "ea_streams",
    "low_rank_psd",
    "psd_cases",
    "psd_matrices",
    "spectra",
]

SPECTRUM_KINDS = ("geometric", "polynomial", "exact_rank", "clustered")
STREAM_STYLES = ("independent", "correlated", "low_rank", "spiky")


class PSDCase(NamedTuple):
    """A generated PSD matrix with its exact eigendecomposition (float64 NumPy oracles)."""

    matrix: Any  # (d, d) in the requested namespace and dtype
    eigvals: np.ndarray  # (d,) float64, descending
    eigvecs: np.ndarray  # (d, d) float64, orthonormal, column i pairs with eigvals[i]


class EAStream(NamedTuple):
    """A stream of PSD increments ``C_i = X_i X_iᵀ`` for an EA ``M_k = ρ M_{k-1} + (1-ρ) C_k``."""

    decay: float  # ρ in (0, 1)
    increments: list  # X_i, each (d, s) in the requested namespace and dtype
    increment_rank: int  # s
    increment_norm: float  # K >= max_i ||X_i X_iᵀ||_2 (exact, from float64)
    increment_norms: tuple = ()  # ||X_i X_iᵀ||_2 per increment (float64, before the cast)
    increment_traces: tuple = ()  # tr(X_i X_iᵀ) = ||X_i||_F^2 per increment (float64, before the cast)


def _dtype(xp: ModuleType, dtype: Any) -> Any:
    return xp.float64 if dtype is None else dtype


def _dtypes(xp: ModuleType, dtypes: Sequence[Any] | None) -> st.SearchStrategy:
    return st.sampled_from(list(dtypes) if dtypes is not None else [xp.float32, xp.float64])


@st.composite
def spectra(
    draw: st.DrawFn,
    dim: int,
    *,
    kinds: Sequence[str] = SPECTRUM_KINDS,
    min_scale: float = 1e-2,
    max_scale: float = 1e2,
) -> np.ndarray:
    """Descending, non-negative float64 eigenvalues of length ``dim`` with a prescribed decay ``kind``."""
    for k in kinds:
        if k not in SPECTRUM_KINDS:
            raise ValueError(f"`kinds` entries must be among {SPECTRUM_KINDS}, got {k!r}")
    kind = draw(st.sampled_from(list(kinds)))
    scale = 10.0 ** draw(st.floats(np.log10(min_scale), np.log10(max_scale)))
    i = np.arange(dim, dtype=np.float64)
    if kind == "geometric":
        lam = scale * draw(st.floats(0.3, 0.95)) ** i
    elif kind == "polynomial":
        lam = scale * (i + 1.0) ** (-draw(st.floats(0.5, 3.0)))
    elif kind == "exact_rank":
        k = draw(st.integers(1, dim))
        seed = draw(st.integers(0, 2**32 - 1))
        lam = np.zeros(dim)
        lam[:k] = scale * np.random.default_rng(seed).uniform(0.1, 1.0, k)
    else:  # clustered
        n_clusters = draw(st.integers(1, min(4, dim)))
        values = scale * np.sort(np.random.default_rng(draw(st.integers(0, 2**32 - 1))).uniform(0.05, 1.0, n_clusters))
        lam = np.repeat(values[::-1], int(np.ceil(dim / n_clusters)))[:dim]
    return np.sort(lam)[::-1].copy()


def _orthogonal(rng: np.random.Generator, d: int, k: int) -> np.ndarray:
    q, r = np.linalg.qr(rng.standard_normal((d, k)))
    return q * np.sign(np.diag(r))  # Haar-distributed


@st.composite
def psd_cases(
    draw: st.DrawFn,
    xp: ModuleType,
    *,
    dims: st.SearchStrategy[int] = st.integers(2, 48),
    dtypes: Sequence[Any] | None = None,
    kinds: Sequence[str] = SPECTRUM_KINDS,
    eigvals: np.ndarray | None = None,
) -> PSDCase:
    """A :class:`PSDCase`: a random-eigenbasis PSD matrix with a known spectrum.

    ``eigvals`` fixes the spectrum (then ``dims`` and ``kinds`` are ignored).
    """
    if eigvals is not None:
        lam = np.sort(np.asarray(eigvals, dtype=np.float64))[::-1].copy()
    else:
        lam = draw(spectra(draw(dims), kinds=kinds))
    d = lam.shape[0]
    dtype = draw(_dtypes(xp, dtypes))
    Q = _orthogonal(np.random.default_rng(draw(st.integers(0, 2**32 - 1))), d, d)
    A = (Q * lam) @ Q.T
    A = (A + A.T) / 2
    return PSDCase(xp.asarray(A, dtype=dtype), lam, Q)


def psd_matrices(
    xp: ModuleType,
    *,
    dims: st.SearchStrategy[int] = st.integers(2, 48),
    dtypes: Sequence[Any] | None = None,
    kinds: Sequence[str] = SPECTRUM_KINDS,
) -> st.SearchStrategy:
    """Symmetric PSD matrices ``(d, d)`` in ``xp`` with a prescribed spectrum kind (see module doc)."""
    return psd_cases(xp, dims=dims, dtypes=dtypes, kinds=kinds).map(lambda c: c.matrix)


@st.composite
def low_rank_psd(
    draw: st.DrawFn,
    xp: ModuleType,
    *,
    dims: st.SearchStrategy[int] = st.integers(2, 48),
    ranks: st.SearchStrategy[int] | None = None,
    dtypes: Sequence[Any] | None = None,
    kinds: Sequence[str] = ("geometric", "polynomial", "clustered"),
) -> LowRankPSD:
    """A :class:`~onlinela.LowRankPSD` with orthonormal ``U`` (d, r) and descending eigenvalues.

    ``ranks`` defaults to ``integers(0, d)``.
    """
    d = draw(dims)
    r = draw(ranks if ranks is not None else st.integers(0, d))
    r = min(r, d)
    dtype = draw(_dtypes(xp, dtypes))
    lam = draw(spectra(max(r, 1), kinds=kinds))[:r]
    U = _orthogonal(np.random.default_rng(draw(st.integers(0, 2**32 - 1))), d, r)
    return LowRankPSD(xp.asarray(U, dtype=dtype), xp.asarray(lam, dtype=dtype))


@st.composite
def ea_streams(
    draw: st.DrawFn,
    xp: ModuleType,
    dim: int,
    *,
    lengths: st.SearchStrategy[int] = st.integers(1, 30),
    ranks: st.SearchStrategy[int] = st.integers(1, 6),
    decays: st.SearchStrategy[float] = st.floats(0.5, 0.99),
    dtype: Any = None,
    correlated: st.SearchStrategy[bool] = st.booleans(),
    dtypes: Sequence[Any] | None = None,
    styles: Sequence[str] | None = None,
) -> EAStream:
    """An :class:`EAStream` of rank-``s`` increments ``X_i`` of shape ``(dim, s)``.

    With ``correlated``, increments share a slowly rotating dominant subspace
    (as activations of a trained layer do); otherwise they are independent
    Gaussians with random column scales spanning two orders of magnitude.

    ``dtypes`` (a list to draw from) overrides ``dtype``.  ``styles`` (a list
    drawn from :data:`STREAM_STYLES`) overrides ``correlated``: ``"independent"``
    and ``"correlated"`` as above; ``"low_rank"``: every increment lies in one
    fixed subspace of dimension ``<= s`` (rank-deficient increments, and later
    increments add no new directions -- the no-growth path of a Brand update);
    ``"spiky"``: one column per increment dominates the others by up to
    ``10^3`` (a large dynamic range inside each increment).
    """
    n = draw(lengths)
    s = min(draw(ranks), dim)
    rho = draw(decays)
    rng = np.random.default_rng(draw(st.integers(0, 2**32 - 1)))
    dt = draw(_dtypes(xp, dtypes)) if dtypes is not None else _dtype(xp, dtype)
    if styles is not None:
        for k in styles:
            if k not in STREAM_STYLES:
                raise ValueError(f"`styles` entries must be among {STREAM_STYLES}, got {k!r}")
        style = draw(st.sampled_from(list(styles)))
    else:
        style = "correlated" if draw(correlated) else "independent"
    xs, norm = [], 0.0
    if style == "low_rank":
        k = draw(st.integers(1, s))
        basis = _orthogonal(rng, dim, k)
        for _ in range(n):
            xs.append(basis @ rng.standard_normal((k, s)) * 10.0 ** rng.uniform(-1, 0.5) / np.sqrt(s))
    elif style == "spiky":
        for _ in range(n):
            X = rng.standard_normal((dim, s)) / np.sqrt(dim) * 10.0 ** rng.uniform(-3, 0, s)
            X[:, rng.integers(s)] *= 10.0 ** rng.uniform(0, 1.5)
            xs.append(X)
    elif style == "correlated":
        k = max(1, min(dim, 2 * s))
        basis = _orthogonal(rng, dim, k)
        for _ in range(n):
            basis = _orthogonal(np.random.default_rng(rng.integers(2**32)), dim, k) * 0.05 + basis
            basis, _ = np.linalg.qr(basis)
            X = basis @ (rng.standard_normal((k, s)) * np.geomspace(1.0, 0.1, k)[:, None])
            X += 0.01 * rng.standard_normal((dim, s))
            xs.append(X)
    else:
        for _ in range(n):
            xs.append(rng.standard_normal((dim, s)) * 10.0 ** rng.uniform(-1, 1, s) / np.sqrt(dim))
    norms = tuple(float(np.linalg.norm(X, 2) ** 2) for X in xs)
    traces = tuple(float(np.sum(X * X)) for X in xs)
    norm = max(norms, default=0.0)
    return EAStream(rho, [xp.asarray(X, dtype=dt) for X in xs], s, norm, norms, traces)
