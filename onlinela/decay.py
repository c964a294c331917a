r"""Spectral decay of exponential-average (EA) matrices, and what it buys a damped inverse.

An EA Kronecker factor is

.. math:: M_k = \rho^k M_0 + (1-\rho) \sum_{i=1}^{k} \rho^{k-i} C_i ,

with ``C_i`` PSD of rank ``<= s`` and norm ``<= K`` (``M_0`` PSD).  The
functions here bound its eigenvalues a priori (:func:`ea_eigenvalue_bound`,
Weyl), from the actual stream (:func:`ea_stream_eigenvalue_bound`, never
looser), turn a bound into a rank (:func:`ea_rank_for_tolerance`,
:func:`ea_rank_for_inverse_error`) and give the spectral-norm error of
treating the tail as zero inside ``(M + μI)^{-1}`` (:func:`damped_inverse_error`).

All take Python scalars (or sequences of them) and return Python numbers;
proofs are in ``docs/math/decay.rst``.
"""

from __future__ import annotations

import math
import numbers
from typing import Sequence

from . import _validation as V

__all__ = [
    "damped_inverse_error",
    "ea_eigenvalue_bound",
    "ea_rank_for_inverse_error",
    "ea_rank_for_tolerance",
    "ea_stream_eigenvalue_bound",
]


def _decay(decay: float) -> float:
    return V.check_real(decay, "decay", low=0.0, high=1.0, low_open=True, high_open=True)


def ea_eigenvalue_bound(
    index: int,
    *,
    decay: float,
    increment_rank: int,
    increment_norm: float,
    init_norm: float = 0.0,
    steps: int | None = None,
) -> float:
    r"""A priori bound on the ``index``-th largest eigenvalue of an EA matrix (Weyl).

    .. math::

       \lambda_j(M_k) \le \rho^{m} \max(K, \|M_0\|_2), \qquad m = \lfloor (j-1)/s \rfloor .

    The ``(1-ρ)`` normalisation of the EA cancels exactly against the geometric
    sum of the older increments: everything but the last ``m`` increments has
    norm ``<= ρ^m [ρ^{k-m} ||M_0|| + (1 - ρ^{k-m}) K]``, a convex combination of
    ``||M_0||`` and ``K`` scaled by ``ρ^m`` -- no ``(1-ρ)`` and no ``1/(1-ρ)``
    factor appears (an *unnormalised* sum ``M_k = ρ M_{k-1} + C_k`` would
    carry ``K/(1-ρ)`` instead).

    Parameters
    ----------
    index : int >= 1
        ``j``, 1-based (``j = 1`` is the largest eigenvalue).
    decay : float in (0, 1)
        ``ρ``.
    increment_rank : int >= 1
        ``s >= rank(C_i)`` for every increment (``n`` for a Linear layer's
        factor, ``n·|T|`` for a conv layer's).
    increment_norm : float >= 0
        ``K >= ||C_i||_2`` for every increment.
    init_norm : float >= 0
        ``||M_0||_2`` (0: the EA starts from zero).
    steps : int >= 0, optional
        ``k``, the number of increments averaged so far.  When given, the
        sharper form ``ρ^m [ρ^{k-m} ||M_0|| + (1-ρ^{k-m}) K]`` is returned for
        ``m <= k`` and ``ρ^k ||M_0||`` for ``m > k``.

    Returns
    -------
    float
        The bound; ``0.0`` once the index exceeds the rank of ``M_k``
        (``M_0 = 0`` and ``j > k s``).

    Notes
    -----
    Assumptions: ``M_0`` and every ``C_i`` symmetric PSD.  With
    ``steps=None`` and ``init_norm > 0`` the bound assumes at least ``m``
    increments have been averaged (``k >= m``); for a shorter stream the
    initial matrix has not decayed yet (pass ``steps``).  With ``init_norm = 0``
    it holds for every ``k``.  The bound does not depend on the dimension
    ``d``: the decay happens over a width-independent number of modes.
    """
    j = V.check_int(index, "index", low=1)
    rho = _decay(decay)
    s = V.check_int(increment_rank, "increment_rank", low=1)
    K = V.check_real(increment_norm, "increment_norm", low=0.0)
    m0 = V.check_real(init_norm, "init_norm", low=0.0)
    m = (j - 1) // s
    if steps is None:
        return rho**m * max(K, m0)
    k = V.check_int(steps, "steps", low=0)
    if m > k:
        return rho**k * m0
    return rho**m * (rho ** (k - m) * m0 + (1.0 - rho ** (k - m)) * K)


def _as_list(values: float | Sequence[float] | None, name: str, length: int | None, *, integer: bool) -> list:
    if values is None:
        return []
    if isinstance(values, numbers.Number) and not isinstance(values, bool):
        if length is None:
            raise ValueError(f"`{name}` must be a sequence when its length cannot be inferred")
        values = [values] * length
    try:
        out = list(values)
    except TypeError:
        raise TypeError(f"`{name}` must be a number or a sequence of numbers, got {type(values).__name__}") from None
    if length is not None and len(out) != length:
        raise ValueError(f"`{name}` must have one entry per increment ({length}), got {len(out)}")
    if integer:
        return [V.check_int(v, name, low=0) for v in out]
    return [V.check_real(v, name, low=0.0) for v in out]


def ea_stream_eigenvalue_bound(
    index: int,
    *,
    decay: float,
    increment_norms: Sequence[float],
    increment_ranks: int | Sequence[int],
    increment_traces: Sequence[float] | None = None,
    init_norm: float = 0.0,
    init_trace: float | None = None,
) -> float:
    r"""Stream-aware bound on the ``index``-th eigenvalue of ``M_k``; never looser than Weyl's.

    Uses the actual per-increment norms ``K_i`` (and, if given, traces ``T_i``
    and ranks ``s_i``) of the ``k`` increments averaged so far.  For every
    split ``m`` (the last ``m`` increments, of total rank
    ``ρ_m = s_{k-m+1} + ... + s_k <= j - 1``) Weyl's inequality gives
    ``λ_j(M_k) <= λ_{j - ρ_m}(B_m)`` for the older part ``B_m``, and

    .. math::

       \lambda_{b}(B_m) \le \min\Big( \rho^k \|M_0\| + (1-\rho)\sum_{i \le k-m} \rho^{k-i} K_i ,\;
       \frac{\rho^k \operatorname{tr} M_0 + (1-\rho)\sum_{i \le k-m} \rho^{k-i} T_i}{b} \Big),
       \quad b = j - \rho_m ;

    the bound is the minimum over all admissible ``m``.

    Parameters
    ----------
    index : int >= 1
        ``j``, 1-based.
    decay : float in (0, 1)
        ``ρ``.
    increment_norms : sequence of float >= 0, oldest first
        ``K_i >= ||C_i||_2``; its length is the number of steps ``k``.
    increment_ranks : int or sequence of int >= 0
        ``s_i >= rank(C_i)`` (one int for all).
    increment_traces : sequence of float >= 0, optional
        ``T_i >= tr(C_i)`` (for ``C_i = X_i X_iᵀ``: ``||X_i||_F^2``).
    init_norm : float >= 0
        ``||M_0||_2``.
    init_trace : float >= 0, optional
        ``tr(M_0)``; needed for the trace term when ``init_norm > 0``.

    Returns
    -------
    float
        A bound ``<= ea_eigenvalue_bound(index, decay=ρ, increment_rank=max s_i,
        increment_norm=max K_i, init_norm=init_norm, steps=k)`` (and so also
        ``<=`` the ``steps=None`` form whenever that one is valid).

    Notes
    -----
    Assumptions: ``M_0`` and every ``C_i`` symmetric PSD; the EA is the
    normalised one above.  Cost ``O(k)``.  The trace term pays off when the
    increments are far from rank-one-dominated: it converts the mass of the old
    increments into a bound that decreases like ``1/b`` in the index.
    """
    j = V.check_int(index, "index", low=1)
    rho = _decay(decay)
    norms = _as_list(increment_norms, "increment_norms", None, integer=False)
    k = len(norms)
    ranks = _as_list(increment_ranks, "increment_ranks", k, integer=True)
    traces = _as_list(increment_traces, "increment_traces", k, integer=False) if increment_traces is not None else None
    m0 = V.check_real(init_norm, "init_norm", low=0.0)
    t0 = None
    if init_trace is not None:
        t0 = V.check_real(init_trace, "init_trace", low=0.0)
        if t0 < m0 * (1 - 1e-12):
            raise ValueError(f"`init_trace` must be >= `init_norm` (trace >= norm of a PSD matrix), got {t0} < {m0}")
    elif m0 == 0.0:
        t0 = 0.0
    # tails over the oldest k - m increments, m = 0..k:  tail[m] = (1-ρ) Σ_{i<=k-m} ρ^{k-i} K_i
    norm_tail = [0.0] * (k + 1)
    tr_tail = [0.0] * (k + 1)
    acc_n = acc_t = 0.0
    for i in range(1, k + 1):  # after adding increment i, it is the tail for m = k - i
        w = (1.0 - rho) * rho ** (k - i)
        acc_n += w * norms[i - 1]
        if traces is not None:
            acc_t += w * traces[i - 1]
        norm_tail[k - i] = acc_n
        tr_tail[k - i] = acc_t
    init_w = rho**k
    best = math.inf
    used = 0  # total rank of the last m increments
    for m in range(0, k + 1):
        if m:
            used += ranks[k - m]
            if used > j - 1:
                break
        b = j - used
        bound = init_w * m0 + norm_tail[m]
        if traces is not None and t0 is not None:
            bound = min(bound, (init_w * t0 + tr_tail[m]) / b)
        best = min(best, bound)
    # the uniform (Weyl) bound with K = max K_i, s = max s_i, steps = k is also valid:
    # taking the minimum makes "never looser" hold exactly, not just up to rounding
    weyl = ea_eigenvalue_bound(
        j,
        decay=rho,
        increment_rank=max([1] + ranks),
        increment_norm=max([0.0] + norms),
        init_norm=m0,
        steps=k,
    )
    return float(min(best, weyl))


def ea_rank_for_tolerance(tol: float, *, decay: float, increment_rank: int) -> int:
    r"""Smallest ``m`` for which the a priori bound guarantees ``λ_{m+1} <= tol · max(K, ||M_0||)``.

    From :func:`ea_eigenvalue_bound`, ``λ_{m+1} <= ρ^{⌊m/s⌋} max(K, ||M_0||)``,
    so ``m = s · ⌈log(tol) / log(ρ)⌉`` (0 when ``tol >= 1``).  For
    ``ρ = 0.95, tol = 0.03, s = 256`` this is 17,664: the a priori bound is
    loose, measured EA spectra decay much faster (see
    :func:`ea_stream_eigenvalue_bound` for a bound that uses the stream).

    Parameters
    ----------
    tol : float > 0
        Relative tolerance.
    decay : float in (0, 1)
        ``ρ``.
    increment_rank : int >= 1
        ``s``.

    Returns
    -------
    int
        The rank ``m`` (``m`` eigenpairs kept; the ``(m+1)``-th is below tolerance).

    Notes
    -----
    Same assumptions as :func:`ea_eigenvalue_bound` (with ``k >= m`` steps
    when ``M_0 != 0``).
    """
    tol = V.check_real(tol, "tol", low=0.0, low_open=True)
    rho = _decay(decay)
    s = V.check_int(increment_rank, "increment_rank", low=1)
    if tol >= 1.0:
        return 0
    t = max(0, math.ceil(math.log(tol) / math.log(rho)))
    while t > 0 and rho ** (t - 1) <= tol:  # guard the rounding of the logarithms
        t -= 1
    while rho**t > tol:
        t += 1
    return s * t


def damped_inverse_error(next_eigval: float, damping: float) -> float:
    r"""``||(M + μI)^{-1} - (M_r + μI)^{-1}||_2`` when ``M_r`` keeps the top ``r`` eigenpairs of ``M``.

    .. math:: \frac{\lambda_{r+1}}{\mu(\mu + \lambda_{r+1})}

    The two inverses share eigenvectors; they differ only on the discarded
    directions, by ``1/μ - 1/(μ+λ_j) = λ_j / (μ(μ+λ_j))``, increasing in
    ``λ_j``.  The value is exact (not just a bound) for the exact top-``r``
    truncation; with an upper bound on ``λ_{r+1}`` (e.g. from
    :func:`ea_eigenvalue_bound`) it is an upper bound.  Relative to
    ``||(M+μI)^{-1}||_2 <= 1/μ`` it is ``λ_{r+1}/(μ+λ_{r+1}) < 1``.

    Parameters
    ----------
    next_eigval : float >= 0
        ``λ_{r+1}`` (or an upper bound on it).
    damping : float > 0
        ``μ``.

    Returns
    -------
    float
    """
    lam = V.check_real(next_eigval, "next_eigval", low=0.0)
    mu = V.check_real(damping, "damping", low=0.0, low_open=True)
    return lam / (mu * (mu + lam))


def ea_rank_for_inverse_error(
    error: float,
    *,
    damping: float,
    decay: float,
    increment_rank: int,
    increment_norm: float,
    init_norm: float = 0.0,
) -> int:
    r"""Smallest rank whose a priori bound guarantees ``||(M+μI)^{-1} - (M_r+μI)^{-1}||_2 <= error``.

    Inverts :func:`damped_inverse_error` (``λ/(μ(μ+λ)) <= ε`` iff
    ``λ <= ε μ^2 / (1 - ε μ)``, always when ``ε μ >= 1``) and feeds the
    threshold to :func:`ea_rank_for_tolerance`.

    Parameters
    ----------
    error : float > 0
        Target spectral-norm error of the damped inverse (absolute; the
        inverse itself has norm ``<= 1/μ``).
    damping : float > 0
        ``μ``.
    decay, increment_rank, increment_norm, init_norm
        As in :func:`ea_eigenvalue_bound`.

    Returns
    -------
    int
        A rank ``r`` such that keeping the top ``r`` eigenpairs of any EA
        matrix satisfying the assumptions of :func:`ea_eigenvalue_bound` (with
        at least ``r / s`` steps when ``M_0 != 0``) meets ``error``.
    """
    eps = V.check_real(error, "error", low=0.0, low_open=True)
    mu = V.check_real(damping, "damping", low=0.0, low_open=True)
    rho = _decay(decay)
    s = V.check_int(increment_rank, "increment_rank", low=1)
    K = V.check_real(increment_norm, "increment_norm", low=0.0)
    m0 = V.check_real(init_norm, "init_norm", low=0.0)
    scale = max(K, m0)
    if eps * mu >= 1.0 or scale == 0.0:
        return 0
    lam_star = eps * mu * mu / (1.0 - eps * mu)
    return ea_rank_for_tolerance(lam_star / scale, decay=rho, increment_rank=s)
