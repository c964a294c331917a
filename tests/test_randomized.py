"""Randomized range finder, SVD, PSD eigensolvers, adaptive rank and error estimate
(algorithms.md §3, §7.7, §7.8) on every backend of the ``xp`` fixture.

Tolerance conventions (``eps`` = machine epsilon of the dtype under test, ``λ_1`` = the
largest eigenvalue, ``k = min(r + l, d)`` the sketch size):

* eigenvalue/reconstruction identities that hold exactly in exact arithmetic are checked
  to ``c · sqrt(d·k) · eps · λ_1`` with ``c = 50``: the error of ``O(k)`` backward-stable
  kernels of size ``d``, plus the Nyström shift ``ν = sqrt(d)·eps·||AQ||_F <= sqrt(d k) eps λ_1``;
* orthonormality uses :func:`~onlinela.testing.assert_orthonormal` (``10 sqrt(d) eps``);
* statistical statements (HMT) compare sample means over 12 seeds with the expectation bound.
"""

from __future__ import annotations

import logging
import math

import numpy as np
import pytest
from hypothesis import given, strategies as st

from onlinela import (
    LowRankPSD,
    adaptive_randomized_eigh,
    estimate_spectral_error,
    randomized_eigh,
    randomized_range_finder,
    randomized_svd,
)
from onlinela.randomized import METHODS
from onlinela.testing import assert_allclose_dtype, assert_orthonormal, assert_same_subspace, to_numpy
from onlinela.testing import strategies as ost

C_EXACT = 50.0  # the constant c in c * sqrt(d k) * eps * λ_1 (see module docstring)


def _eps(xp, dtype) -> float:
    return float(np.finfo(np.float32 if dtype == xp.float32 else np.float64).eps)


def _np(x) -> np.ndarray:
    return to_numpy(x).astype(np.float64)


def _dense(M: LowRankPSD) -> np.ndarray:
    U, w = _np(M.eigvecs), _np(M.eigvals)
    return (U * w[..., None, :]) @ np.swapaxes(U, -1, -2)


def _err(A, M: LowRankPSD) -> float:
    """||A - M||_2 in float64 from the (float32 or float64) arrays."""
    return float(np.max(np.linalg.norm(_np(A) - _dense(M), 2, axis=(-2, -1))))


def _spd(d: int, lam: np.ndarray, seed: int) -> np.ndarray:
    Q = np.linalg.qr(np.random.default_rng(seed).standard_normal((d, d)))[0]
    A = (Q * lam) @ Q.T
    return (A + A.T) / 2


# --------------------------------------------------------------------------- dense oracle and invariants


@given(data=st.data())
def test_eigh_invariants_against_dense_oracle(xp, data):
    case = data.draw(ost.psd_cases(xp, dims=st.integers(2, 40)))
    A, lam = case.matrix, case.eigvals
    d = lam.shape[0]
    r = data.draw(st.integers(1, d), label="rank")
    l = data.draw(st.integers(0, 12), label="oversample")
    q = data.draw(st.integers(0, 3), label="n_iter")
    method = data.draw(st.sampled_from(METHODS), label="method")
    M = randomized_eigh(A, r, oversample=l, n_iter=q, method=method, rng=data.draw(st.integers(0, 2**16)))

    assert isinstance(M, LowRankPSD)
    assert M.eigvecs.shape == (d, r) and M.eigvals.shape == (r,)
    assert M.dtype == A.dtype and type(M.eigvecs) is type(A)
    w = _np(M.eigvals)
    assert np.all(w >= 0) and np.all(w[:-1] >= w[1:]), "eigenvalues must be >= 0 and descending"
    assert_orthonormal(M.eigvecs)
    tol = C_EXACT * math.sqrt(d * min(r + l, d)) * _eps(xp, A.dtype) * lam[0]
    # Ritz values / Nyström / singular values of QᵀA never exceed the true eigenvalues (interlacing)
    assert np.all(w <= lam[:r] + tol), (w, lam[:r])
    err = _err(A, M)
    lam_next = lam[r] if r < d else 0.0
    assert err >= lam_next - tol, "Eckart–Young: no rank-r matrix is closer than λ_{r+1}"
    assert err <= lam[0] + tol
    # the approximation is symmetric PSD by construction (U diag(w) Uᵀ with w >= 0)
    assert np.linalg.eigvalsh(_dense(M)).min() >= -tol


@given(data=st.data())
def test_full_sketch_is_exact(xp, data):
    """rank + oversample >= d clips the sketch to d: the basis is complete and the result exact."""
    case = data.draw(ost.psd_cases(xp, dims=st.integers(2, 30)))
    A, lam = case.matrix, case.eigvals
    d = lam.shape[0]
    r = data.draw(st.integers(1, d))
    method = data.draw(st.sampled_from(METHODS))
    M = randomized_eigh(A, r, oversample=d, n_iter=data.draw(st.integers(0, 2)), method=method, rng=1)
    tol = C_EXACT * d * _eps(xp, A.dtype) * lam[0]
    assert_allclose_dtype(M.eigvals, lam[:r], scale=lam[0], factor=C_EXACT * math.sqrt(d))
    assert abs(_err(A, M) - (lam[r] if r < d else 0.0)) <= tol


@given(data=st.data())
def test_exact_on_low_rank_input(xp, data):
    """rank(A) <= r + l: the sketch captures range(A), so eigenvalues are exact and the
    rank-r error is exactly λ_{r+1} (0 when rank(A) <= r) — for every method, even q = 0."""
    d = data.draw(st.integers(6, 40))
    r = data.draw(st.integers(1, d - 2))
    l = data.draw(st.integers(0, d - r))
    s = data.draw(st.integers(1, r + l))
    lam = np.zeros(d)
    lam[:s] = np.sort(np.random.default_rng(data.draw(st.integers(0, 2**16))).uniform(0.1, 1.0, s))[::-1]
    dtype = data.draw(st.sampled_from([xp.float32, xp.float64]))
    A = xp.asarray(_spd(d, lam, data.draw(st.integers(0, 2**16))), dtype=dtype)
    method = data.draw(st.sampled_from(METHODS))
    M = randomized_eigh(A, r, oversample=l, n_iter=data.draw(st.integers(0, 2)), method=method, rng=2)
    k = min(r + l, d)
    tol = C_EXACT * math.sqrt(d * k) * _eps(xp, dtype) * lam[0] * 10  # x10: rank-deficient sketches
    assert np.max(np.abs(_np(M.eigvals) - lam[:r])) <= tol
    assert abs(_err(A, M) - lam[r]) <= tol
    assert_orthonormal(M.eigvecs)


# --------------------------------------------------------------------------- Halko–Martinsson–Tropp, statistically


@pytest.mark.parametrize("lam", [0.8 ** np.arange(80), 1.0 / (1.0 + np.arange(80))], ids=["geometric", "polynomial"])
def test_hmt_expected_error_bound_and_power_iterations_help(xp, lam):
    """HMT Thm 10.6 (q = 0): E||A - QQᵀA|| <= (1 + sqrt(r/(l-1))) λ_{r+1} + e sqrt(r+l)/l (Σ_{j>r} λ_j²)^{1/2}.
    The Rayleigh–Ritz methods then satisfy ||A - Â_r|| <= λ_{r+1} + 2 ||A - QQᵀA||, and the mean
    error over seeds decreases with q for every method."""
    d, r, l = 80, 8, 5
    A = xp.asarray(_spd(d, lam, 7), dtype=xp.float64)
    bound = (1 + math.sqrt(r / (l - 1))) * lam[r] + math.e * math.sqrt(r + l) / l * math.sqrt(np.sum(lam[r:] ** 2))
    seeds = range(12)
    An = _np(A)
    rf = [np.linalg.norm(An - (Q := _np(randomized_range_finder(A, r + l, n_iter=0, rng=s))) @ (Q.T @ An), 2) for s in seeds]
    assert np.mean(rf) <= bound
    slack = 1e-10 * lam[0]
    for method in METHODS:
        means = [np.mean([_err(A, randomized_eigh(A, r, oversample=l, n_iter=q, method=method, rng=s)) for s in seeds]) for q in (0, 1, 2)]
        if method in ("subspace", "krylov"):  # span(K) ⊇ span(AΩ): the range-finder bound transfers
            assert means[0] <= lam[r] + 2 * bound
        assert means[1] <= means[0] + slack and means[2] <= means[1] + slack, (method, means)
        assert means[2] <= 1.5 * lam[r] + slack, (method, means)


# --------------------------------------------------------------------------- reproducibility, dtype, device, stacks


@pytest.mark.parametrize("method", METHODS)
def test_seed_reproducibility(xp, method):
    A = xp.asarray(_spd(30, 0.8 ** np.arange(30), 0), dtype=xp.float32)
    a = randomized_eigh(A, 5, method=method, n_iter=0, rng=3)
    b = randomized_eigh(A, 5, method=method, n_iter=0, rng=3)
    c = randomized_eigh(A, 5, method=method, n_iter=0, rng=np.random.default_rng(3))
    e = randomized_eigh(A, 5, method=method, n_iter=0, rng=4)
    assert np.array_equal(to_numpy(a.eigvecs), to_numpy(b.eigvecs))
    assert np.array_equal(to_numpy(a.eigvals), to_numpy(b.eigvals))
    assert np.array_equal(to_numpy(a.eigvals), to_numpy(c.eigvals)), "an int seed and Generator(seed) agree"
    assert not np.array_equal(to_numpy(a.eigvals), to_numpy(e.eigvals))
    assert np.array_equal(to_numpy(randomized_range_finder(A, 4, rng=5)), to_numpy(randomized_range_finder(A, 4, rng=5)))
    assert estimate_spectral_error(A, a, rng=6) == estimate_spectral_error(A, a, rng=6)


@pytest.mark.parametrize("dtype", ["float32", "float64"])
def test_dtype_namespace_and_device_preserved(xp, dtype):
    dt = getattr(xp, dtype)
    kwargs = {}
    if xp.__name__ == "array_api_strict":  # a non-default device proves sketches are drawn there
        kwargs["device"] = xp.Device("device1")
    A = xp.asarray(_spd(24, 0.7 ** np.arange(24), 1), dtype=dt, **kwargs)
    dev = A.device
    for method in METHODS:
        M = randomized_eigh(A, 4, method=method, rng=0)
        assert M.dtype == dt and M.eigvals.dtype == dt and M.device == dev and type(M.eigvecs) is type(A)
    U, s, Vh = randomized_svd(A, 4, rng=0)
    Q = randomized_range_finder(A, 4, rng=0)
    M = adaptive_randomized_eigh(A, 0.1, rng=0)
    for x in (U, s, Vh, Q, M.eigvecs, M.eigvals):
        assert x.dtype == dt and x.device == dev
    assert isinstance(estimate_spectral_error(A, M, rng=0), float)


@pytest.mark.parametrize("method", METHODS)
def test_batched_stack_matches_loop(xp, method):
    # a clear gap at r (λ_r / λ_{r+1} = 1e4): every method is accurate, so batch and loop agree
    rng = np.random.default_rng(5)
    d, r = 20, 3
    lams = [np.r_[rng.uniform(1, 2, r), 1e-4 * rng.uniform(0, 1, d - r)] for _ in range(3)]
    stack = np.stack([_spd(d, np.sort(lam)[::-1], i) for i, lam in enumerate(lams)])
    A = xp.asarray(stack, dtype=xp.float64)
    Mb = randomized_eigh(A, r, n_iter=2, method=method, rng=0)
    assert Mb.eigvecs.shape == (3, d, r) and Mb.eigvals.shape == (3, r)
    assert_orthonormal(Mb.eigvecs)
    for i in range(3):
        Mi = randomized_eigh(A[i, ...], r, n_iter=2, method=method, rng=i)
        assert_allclose_dtype(Mb.eigvals[i, ...], Mi.eigvals, factor=1e8)  # both within ~1e-8 of λ
        assert_same_subspace(Mb.eigvecs[i, ...], Mi.eigvecs, tol=1e-6)
    ests = [estimate_spectral_error(A[i, ...], LowRankPSD(Mb.eigvecs[i, ...], Mb.eigvals[i, ...]), rng=0) for i in range(3)]
    assert estimate_spectral_error(A, Mb, rng=0) == pytest.approx(max(ests), rel=1e-6, abs=1e-12)
    U, s, Vh = randomized_svd(A, r, rng=0)
    assert U.shape == (3, d, r) and s.shape == (3, r) and Vh.shape == (3, r, d)
    assert randomized_range_finder(A, r, rng=0).shape == (3, d, r)
    Ma = adaptive_randomized_eigh(A, 1e-3, rng=0, block_size=2)
    assert Ma.rank == r and _err(A, Ma) <= 1e-3 * max(l.max() for l in lams)


# --------------------------------------------------------------------------- randomized SVD and range finder


@given(data=st.data())
def test_randomized_svd_against_numpy(xp, data):
    m = data.draw(st.integers(2, 30))
    n = data.draw(st.integers(2, 30))
    p = min(m, n)
    rng = np.random.default_rng(data.draw(st.integers(0, 2**16)))
    sig = np.sort(rng.uniform(0, 1, p) ** 3)[::-1] * 10.0
    s_rank = data.draw(st.integers(1, p))
    sig[s_rank:] = 0.0 if data.draw(st.booleans()) else sig[s_rank:]
    U0 = np.linalg.qr(rng.standard_normal((m, p)))[0]
    V0 = np.linalg.qr(rng.standard_normal((n, p)))[0]
    An = (U0 * sig) @ V0.T
    dtype = data.draw(st.sampled_from([xp.float32, xp.float64]))
    A = xp.asarray(An, dtype=dtype)
    r = data.draw(st.integers(1, p))
    l = data.draw(st.integers(0, 5))
    U, s, Vh = randomized_svd(A, r, oversample=l, n_iter=data.draw(st.integers(0, 2)), rng=0)
    assert U.shape == (m, r) and s.shape == (r,) and Vh.shape == (r, n) and U.dtype == dtype
    assert_orthonormal(U)
    assert_orthonormal(xp.matrix_transpose(Vh) if hasattr(xp, "matrix_transpose") else Vh.T)
    sn = _np(s)
    true = np.linalg.svd(An, compute_uv=False)
    k = min(r + l, p)
    tol = C_EXACT * math.sqrt(max(m, n) * k) * _eps(xp, dtype) * true[0]
    assert np.all(sn[:-1] >= sn[1:]) and np.all(sn >= 0) and np.all(sn <= true[:r] + tol)
    err = np.linalg.norm(An - (_np(U) * sn) @ _np(Vh), 2)
    nxt = true[r] if r < p else 0.0
    assert err >= nxt - tol
    if np.count_nonzero(true > tol) <= k:  # rank(A) <= r + l: exact
        assert np.max(np.abs(sn - true[:r])) <= 10 * tol and abs(err - nxt) <= 10 * tol


@given(data=st.data())
def test_range_finder_orthonormal_and_captures_low_rank_range(xp, data):
    m = data.draw(st.integers(3, 30))
    n = data.draw(st.integers(3, 30))
    s = data.draw(st.integers(1, min(m, n)))
    size = data.draw(st.integers(s, min(m, n)))
    rng = np.random.default_rng(data.draw(st.integers(0, 2**16)))
    An = rng.standard_normal((m, s)) @ rng.standard_normal((s, n))
    dtype = data.draw(st.sampled_from([xp.float32, xp.float64]))
    Q = randomized_range_finder(xp.asarray(An, dtype=dtype), size, n_iter=data.draw(st.integers(0, 2)), rng=1)
    assert Q.shape == (m, size) and Q.dtype == dtype
    assert_orthonormal(Q)
    q = _np(Q)
    resid = np.linalg.norm(An - q @ (q.T @ An), 2)
    assert resid <= C_EXACT * 10 * math.sqrt(max(m, n) * size) * _eps(xp, dtype) * np.linalg.norm(An, 2)


# --------------------------------------------------------------------------- adaptive rank and error estimate


@given(data=st.data())
def test_adaptive_meets_tolerance_against_true_error(xp, data):
    case = data.draw(ost.psd_cases(xp, dims=st.integers(2, 60)))
    A, lam = case.matrix, case.eigvals
    d = lam.shape[0]
    tol = data.draw(st.floats(1e-3, 0.5))
    block = data.draw(st.sampled_from([1, 4, 32]))
    M = adaptive_randomized_eigh(A, tol, rng=data.draw(st.integers(0, 2**16)), block_size=block)
    rounding = C_EXACT * math.sqrt(d) * _eps(xp, A.dtype) * lam[0]
    err = _err(A, M)
    assert err <= tol * lam[0] + rounding, (err / lam[0], tol, M.rank)
    # Eckart–Young: a rank-r error <= tol·λ_1 needs every λ_j with j > r below it
    needed = int(np.sum(lam > tol * lam[0] + 2 * rounding))
    assert needed <= M.rank <= d
    assert_orthonormal(M.eigvecs)
    w = _np(M.eigvals)
    assert np.all(w >= 0) and np.all(w[:-1] >= w[1:])


def test_adaptive_stops_at_max_rank_and_logs(xp, caplog):
    A = xp.asarray(_spd(40, 0.9 ** np.arange(40), 2), dtype=xp.float64)
    with caplog.at_level(logging.WARNING, logger="onlinela.randomized"):
        M = adaptive_randomized_eigh(A, 1e-6, max_rank=7, rng=0, block_size=3)
    assert M.rank == 7
    assert any("max_rank=7" in rec.getMessage() for rec in caplog.records)


@given(data=st.data())
def test_estimate_spectral_error_within_factor_of_truth(xp, data):
    case = data.draw(ost.psd_cases(xp, dims=st.integers(2, 60)))
    A, lam = case.matrix, case.eigvals
    d = lam.shape[0]
    r = data.draw(st.integers(1, d))
    M = randomized_eigh(A, r, n_iter=data.draw(st.integers(0, 2)), method=data.draw(st.sampled_from(METHODS)), rng=0)
    true = _err(A, M)
    est = estimate_spectral_error(A, M, n_iter=data.draw(st.integers(3, 10)), rng=data.draw(st.integers(0, 2**16)))
    rounding = C_EXACT * math.sqrt(d) * _eps(xp, A.dtype) * lam[0]
    # Ritz values never exceed ||E||; block Lanczos of depth >= 3 lands within a factor 2
    assert est <= true + rounding
    assert est >= true / 2 - rounding


# --------------------------------------------------------------------------- bad input


def _good(xp, d=6):
    return xp.asarray(_spd(d, 0.5 ** np.arange(d), 0), dtype=xp.float64)


def _call(fn, A, **kw):
    if fn is randomized_eigh:
        return randomized_eigh(A, kw.pop("rank", 2), **kw)
    if fn is randomized_svd:
        return randomized_svd(A, kw.pop("rank", 2), **kw)
    if fn is randomized_range_finder:
        return randomized_range_finder(A, kw.pop("size", 2), **kw)
    if fn is adaptive_randomized_eigh:
        return adaptive_randomized_eigh(A, kw.pop("tol", 0.1), **kw)
    return estimate_spectral_error(A, _approx_for(A), **kw)


def _approx_for(A) -> LowRankPSD:
    """A valid rank-2 approximation matching ``A`` where ``A`` is sensible (its checks come first)."""
    import array_api_compat

    try:
        xp = array_api_compat.array_namespace(A)
    except TypeError:
        import array_api_compat.numpy as xp
    shape = getattr(A, "shape", ())
    d = int(shape[-1]) if len(shape) >= 2 and shape[-1] >= 2 else 6
    dt = A.dtype if getattr(A, "dtype", None) in (xp.float32, xp.float64) else xp.float64
    kw = {"device": A.device} if hasattr(A, "device") and array_api_compat.is_array_api_obj(A) else {}
    return LowRankPSD(xp.asarray(np.eye(d, 2), dtype=dt, **kw), xp.ones((2,), dtype=dt, **kw))


ALL = [randomized_eigh, randomized_svd, randomized_range_finder, adaptive_randomized_eigh, estimate_spectral_error]
SYMMETRIC = [randomized_eigh, adaptive_randomized_eigh, estimate_spectral_error]


@pytest.mark.parametrize("fn", ALL, ids=lambda f: f.__name__)
def test_rejects_bad_arrays(xp, fn):
    A = to_numpy(_good(xp))
    bad_nan = A.copy()
    bad_nan[1, 2] = bad_nan[2, 1] = np.nan
    bad_inf = A.copy()
    bad_inf[0, 0] = np.inf
    for arr, exc, match in [
        (A.astype(np.int64), TypeError, "`A`.*real floating"),
        (np.zeros((0, 0)), ValueError, "`A` must not be empty"),
        (np.ones(4), ValueError, "`A` must have at least 2 dimensions"),
        (bad_nan, ValueError, "`A` must be finite"),
        (bad_inf, ValueError, "`A` must be finite"),
    ]:
        with pytest.raises(exc, match=match):
            _call(fn, xp.asarray(arr))
    with pytest.raises(TypeError, match="`A`"):
        _call(fn, [[1.0, 0.0], [0.0, 1.0]])
    if xp.__name__ != "array_api_strict" or hasattr(xp, "complex128"):
        with pytest.raises(TypeError, match="`A`.*complex"):
            _call(fn, xp.asarray(A.astype(np.complex128)))


@pytest.mark.parametrize("fn", SYMMETRIC, ids=lambda f: f.__name__)
def test_rejects_non_square_and_asymmetric(xp, fn):
    A = to_numpy(_good(xp))
    with pytest.raises(ValueError, match="`A` must be square"):
        _call(fn, xp.asarray(A[:, :4]))
    asym = A.copy()
    asym[0, 3] += 1e-3  # far above 100 sqrt(d) eps(float64) * max|A|
    with pytest.raises(ValueError, match="`A` must be symmetric"):
        _call(fn, xp.asarray(asym))
    # ... while float32 round-off asymmetry is accepted (dtype-derived tolerance)
    tiny = A.astype(np.float32)
    tiny[0, 3] *= 1 + 4 * np.finfo(np.float32).eps
    _call(fn, xp.asarray(tiny))


@pytest.mark.parametrize(
    "kwargs, exc, match",
    [
        (dict(rank=0), ValueError, "`rank` must satisfy 1 <= rank <= 6"),
        (dict(rank=7), ValueError, "`rank` must satisfy 1 <= rank <= 6"),
        (dict(rank=2.0), TypeError, "`rank` must be an int"),
        (dict(oversample=-1), ValueError, "`oversample` must satisfy 0 <= oversample"),
        (dict(n_iter=-1), ValueError, "`n_iter` must satisfy 0 <= n_iter"),
        (dict(n_iter=1.5), TypeError, "`n_iter` must be an int"),
        (dict(method="lanczos"), ValueError, "`method` must be one of"),
        (dict(method=None), ValueError, "`method` must be one of"),
        (dict(rng=-1), ValueError, "`rng`"),
        (dict(rng="seed"), TypeError, "`rng`"),
        (dict(rng=True), TypeError, "`rng`"),
    ],
)
def test_randomized_eigh_rejects_bad_arguments(xp, kwargs, exc, match):
    with pytest.raises(exc, match=match):
        _call(randomized_eigh, _good(xp), **kwargs)


def test_oversample_beyond_dimension_is_clipped(xp):
    M = randomized_eigh(_good(xp), 6, oversample=100, rng=0)
    assert M.rank == 6


@pytest.mark.parametrize(
    "fn, kwargs, exc, match",
    [
        (randomized_svd, dict(rank=0), ValueError, "`rank` must satisfy 1 <= rank <= 4"),
        (randomized_svd, dict(rank=5), ValueError, "`rank` must satisfy 1 <= rank <= 4"),
        (randomized_svd, dict(oversample=-2), ValueError, "`oversample`"),
        (randomized_svd, dict(n_iter=-1), ValueError, "`n_iter`"),
        (randomized_svd, dict(rng=1.5), TypeError, "`rng`"),
        (randomized_range_finder, dict(size=0), ValueError, "`size` must satisfy 1 <= size <= 4"),
        (randomized_range_finder, dict(size=5), ValueError, "`size` must satisfy 1 <= size <= 4"),
        (randomized_range_finder, dict(n_iter=-1), ValueError, "`n_iter`"),
    ],
)
def test_rectangular_functions_reject_bad_arguments(xp, fn, kwargs, exc, match):
    A = xp.asarray(np.random.default_rng(0).standard_normal((6, 4)))
    with pytest.raises(exc, match=match):
        _call(fn, A, **kwargs)


@pytest.mark.parametrize(
    "kwargs, exc, match",
    [
        (dict(tol=0.0), ValueError, r"`tol` must be a finite number in \(0.0, 1.0\)"),
        (dict(tol=1.0), ValueError, "`tol` must be a finite number in"),
        (dict(tol=-0.1), ValueError, "`tol`"),
        (dict(tol=float("nan")), ValueError, "`tol`"),
        (dict(tol="0.1"), TypeError, "`tol` must be a real number"),
        (dict(max_rank=0), ValueError, "`max_rank` must satisfy 1 <= max_rank <= 6"),
        (dict(max_rank=7), ValueError, "`max_rank`"),
        (dict(block_size=0), ValueError, "`block_size`"),
        (dict(n_iter=-1), ValueError, "`n_iter`"),
        (dict(est_iter=0), ValueError, "`est_iter`"),
        (dict(rng="x"), TypeError, "`rng`"),
    ],
)
def test_adaptive_rejects_bad_arguments(xp, kwargs, exc, match):
    with pytest.raises(exc, match=match):
        _call(adaptive_randomized_eigh, _good(xp), **kwargs)


def test_estimate_rejects_bad_arguments(xp):
    A = _good(xp)
    M = randomized_eigh(A, 2, rng=0)
    with pytest.raises(TypeError, match="`approx` must be a LowRankPSD"):
        estimate_spectral_error(A, A)
    with pytest.raises(TypeError, match="`approx` must have the dtype"):
        estimate_spectral_error(xp.astype(A, xp.float32), M)
    with pytest.raises(ValueError, match="`approx` must describe matrices of shape"):
        estimate_spectral_error(_good(xp, 7), M)
    with pytest.raises(ValueError, match="`n_iter`"):
        estimate_spectral_error(A, M, n_iter=0)
    with pytest.raises(ValueError, match="`block_size`"):
        estimate_spectral_error(A, M, block_size=0)
    with pytest.raises(TypeError, match="`rng`"):
        estimate_spectral_error(A, M, rng=object())


def test_estimate_rejects_mixed_namespaces_and_devices():
    import array_api_strict as xps
    import torch

    A = np.eye(5)
    M = LowRankPSD(torch.eye(5, 2, dtype=torch.float64), torch.ones(2, dtype=torch.float64))
    with pytest.raises(TypeError, match="one array library"):
        estimate_spectral_error(A, M)
    As = xps.asarray(A)
    Ms = LowRankPSD(xps.asarray(np.eye(5, 2), device=xps.Device("device1")), xps.ones((2,), dtype=xps.float64, device=xps.Device("device1")))
    with pytest.raises(ValueError, match="`approx` is on device"):
        estimate_spectral_error(As, Ms)


def test_nystrom_rejects_indefinite_input(xp):
    A = xp.asarray(_spd(30, np.linspace(-1.0, 1.0, 30), 3), dtype=xp.float64)
    with pytest.raises(ValueError, match="positive semidefinite"):
        randomized_eigh(A, 4, method="nystrom", n_iter=0, rng=0)
    # the Rayleigh–Ritz methods clip negative Ritz values instead
    M = randomized_eigh(A, 4, method="subspace", rng=0)
    assert float(to_numpy(M.eigvals).min()) >= 0


def test_tiled_symmetry_and_finiteness_check(xp):
    """d > 2 tiles: the tiled O(d^2) pass must equal max|A - Aᵀ| and catch NaN/Inf and asymmetry anywhere."""
    from onlinela import _validation as V

    d = 2 * 256 + 37  # not a multiple of any tile size
    rng = np.random.default_rng(0)
    X = rng.standard_normal((d, 20))
    S = X @ X.T
    for dt in (xp.float32, xp.float64):
        A = np.stack([S, 2 * S])
        A[1, 530, 7] += 0.25
        Ax = xp.asarray(A, dtype=dt)
        An = to_numpy(Ax).astype(np.float64)
        assert V._max_asymmetry(xp, Ax) == pytest.approx(np.max(np.abs(An - np.swapaxes(An, -1, -2))), rel=1e-6)
        with pytest.raises(ValueError, match="`A` must be symmetric"):
            randomized_eigh(Ax, 3, rng=0)
        for bad in (np.nan, np.inf):
            B_ = np.stack([S, S])
            B_[0, 3, 540] = bad
            with pytest.raises(ValueError, match="`A` must be finite"):
                randomized_eigh(xp.asarray(B_, dtype=dt), 3, rng=0)
        M = randomized_eigh(xp.asarray(np.stack([S, S]), dtype=dt), 3, rng=0)
        assert M.eigvecs.shape == (2, d, 3)


# --------------------------------------------------------------------------- the default method ("auto")
# The Lanczos path runs for d > 256 (below it the default is a dense eigh); d = 300 keeps these fast.


def test_auto_default_is_exact_on_low_rank_input(xp):
    """Rank-8 PSD input, r = 8: the Krylov space of a rank-8 matrix is its range, so the default
    must reproduce A to rounding (c = 50 as in the module docstring, k = the basis size <= 4r)."""
    d, r = 300, 8
    X = np.random.default_rng(1).standard_normal((d, r))
    A = xp.asarray(X @ X.T, dtype=xp.float64)
    M = randomized_eigh(A, r, rng=0)
    lam1 = float(np.linalg.eigvalsh(X @ X.T)[-1])
    assert _err(A, M) <= C_EXACT * math.sqrt(d * 4 * r) * _eps(xp, A.dtype) * lam1
    assert_orthonormal(M.eigvecs)


@pytest.mark.parametrize("seed", [0, 1, 2])
@pytest.mark.parametrize("alpha", [0.5, 1.0])
def test_auto_default_within_the_documented_factor_of_optimal(xp, seed, alpha):
    """Slowly decaying spectra λ_j = j^-alpha (flatter than most EA factors): the default stops
    once its residual test passes, which the docs claim keeps the error within 1.2 λ_{r+1}."""
    d, r = 320, 20
    lam = (1.0 + np.arange(d)) ** -alpha
    A = xp.asarray(_spd(d, lam, seed), dtype=xp.float64)
    M = randomized_eigh(A, r, rng=seed)
    assert M.rank == r
    assert _err(A, M) <= 1.2 * lam[r]
    assert_orthonormal(M.eigvecs)


def test_auto_rejects_n_iter_and_old_defaults_stay_reachable(xp):
    A = xp.asarray(_spd(300, 0.9 ** np.arange(300), 3), dtype=xp.float64)
    with pytest.raises(ValueError, match="`n_iter` must be None for method='auto'"):
        randomized_eigh(A, 5, n_iter=2)
    old = randomized_eigh(A, 5, method="subspace", oversample=10, n_iter=2, rng=4)
    implicit = randomized_eigh(A, 5, method="subspace", rng=4)  # None -> l = 10, q = 2
    assert np.array_equal(_np(old.eigvals), _np(implicit.eigvals))
    assert np.array_equal(_np(old.eigvecs), _np(implicit.eigvecs))


def test_check_inputs_false_gives_the_checked_result(xp):
    A = xp.asarray(_spd(300, 0.8 ** np.arange(300), 5), dtype=xp.float32)
    for method in ("auto",) + METHODS:
        a = randomized_eigh(A, 6, method=method, rng=7)
        b = randomized_eigh(A, 6, method=method, rng=7, check_inputs=False)
        assert np.array_equal(_np(a.eigvals), _np(b.eigvals)), method
        assert np.array_equal(_np(a.eigvecs), _np(b.eigvecs)), method


def test_adaptive_default_lanczos_path_meets_tolerance(xp):
    """d = 300 > 256 takes the Lanczos growth; the true error must meet tol·λ_1."""
    d = 300
    lam = 0.93 ** np.arange(d)
    A = xp.asarray(_spd(d, lam, 6), dtype=xp.float64)
    for tol in (0.3, 0.05, 0.01):
        M = adaptive_randomized_eigh(A, tol, rng=1)
        assert _err(A, M) <= tol * lam[0]
        assert int(np.sum(lam > tol * lam[0])) <= M.rank
        assert_orthonormal(M.eigvecs)


# --------------------------------------------------------------------------- issue 15 item 6


@given(data=st.data())
def test_svd_method_clips_negative_eigenvalues_of_indefinite_input(xp, data):
    """A symmetric indefinite input: a singular triplet with uᵀv < 0 is an eigenvalue -s.
    With a full sketch (k = d) the triplets are exact, so the returned eigenvalues must be
    the top-r singular values with the negative eigenvalues' replaced by 0, re-sorted."""
    d = data.draw(st.integers(3, 12))
    r = data.draw(st.integers(1, d))
    mags = np.array(data.draw(st.lists(st.floats(0.5, 10.0), min_size=d, max_size=d, unique=True)))
    signs = np.array(data.draw(st.lists(st.sampled_from([-1.0, 1.0]), min_size=d, max_size=d)))
    lam = mags * signs
    A = xp.asarray(_spd(d, lam, data.draw(st.integers(0, 99))), dtype=xp.float64)
    M = randomized_eigh(A, r, method="svd", oversample=d, n_iter=1, rng=0)
    top = lam[np.argsort(-np.abs(lam))][:r]  # the r largest singular values' eigenvalues
    expect = np.sort(np.maximum(top, 0.0))[::-1]
    tol = C_EXACT * d * _eps(xp, A.dtype) * np.max(mags)
    np.testing.assert_allclose(_np(M.eigvals), expect, atol=tol, rtol=0)


_SCALES = [1e153, 1e200, 1e300, 1e-150, 1e-300]


@pytest.mark.parametrize("method", ("auto",) + METHODS)
@given(data=st.data())
def test_every_method_handles_extreme_scales(xp, method, data):
    """Entries near the float64 limits: the Gram matrices of the sketch would overflow or
    underflow without the exact power-of-two rescaling; the eigenvalues must be ``s·λ(A)``
    to the relative accuracy of the unscaled problem (full sketch: c = 50)."""
    d = data.draw(st.integers(4, 20))
    r = data.draw(st.integers(1, d))
    s = data.draw(st.sampled_from(_SCALES))
    lam = np.sort(np.array(data.draw(st.lists(st.floats(0.1, 1.0), min_size=d, max_size=d))))[::-1]
    A = xp.asarray(_spd(d, lam, data.draw(st.integers(0, 99))) * s, dtype=xp.float64)
    kw = {} if method == "auto" else dict(oversample=d, n_iter=1)
    M = randomized_eigh(A, r, method=method, rng=0, **kw)
    w = _np(M.eigvals) / s
    assert np.all(np.isfinite(w))
    np.testing.assert_allclose(w, lam[:r], atol=C_EXACT * d * _eps(xp, A.dtype), rtol=0)


@given(data=st.data())
def test_adaptive_handles_extreme_scales(xp, data):
    d = data.draw(st.integers(4, 20))
    s = data.draw(st.sampled_from(_SCALES))
    lam = 0.5 ** np.arange(d)
    A = xp.asarray(_spd(d, lam, data.draw(st.integers(0, 99))) * s, dtype=xp.float64)
    M = adaptive_randomized_eigh(A, 0.1, rng=0)
    np.testing.assert_allclose(_np(M.eigvals) / s, lam[: M.rank], atol=C_EXACT * d * _eps(xp, A.dtype), rtol=0)


def test_auto_default_on_a_stack(xp):
    """A (2, d, d) stack shares the basis growth (the residual test must pass for every member):
    each member's error is within the documented 1.2 λ_{r+1} of its own spectrum."""
    d, r = 300, 12
    lams = [(1.0 + np.arange(d)) ** -0.7, 0.97 ** np.arange(d)]
    A = xp.asarray(np.stack([_spd(d, lam, i) for i, lam in enumerate(lams)]), dtype=xp.float64)
    M = randomized_eigh(A, r, rng=3)
    assert tuple(M.eigvecs.shape) == (2, d, r)
    U, w = _np(M.eigvecs), _np(M.eigvals)
    for i, lam in enumerate(lams):
        E = _np(A)[i] - (U[i] * w[i]) @ U[i].T
        assert np.linalg.norm(E, 2) <= 1.2 * lam[r]


# --------------------------------------------------------------------------- issue 14: the Lanczos block step and EA factors


@given(data=st.data())
def test_next_krylov_block_is_orthonormal_orthogonal_and_spans_the_residual(xp, data):
    """The default's block step (one Gram–Schmidt pass with the known coefficient, CholeskyQR2,
    verification, robust fallback): ``X`` orthonormal and orthogonal to ``K`` to the verification
    tolerance ``10 sqrt(d) eps``, and ``range([K X]) ⊇ range(W)`` whenever ``W`` is not in
    ``range(K)``: the residual of ``W`` after projecting on ``[K X]`` is at rounding level
    ``c sqrt(d) eps ||W||`` (c = 50).  Rank-deficient ``W`` (repeated columns) takes the
    fallback and must satisfy the same."""
    from onlinela import _backend as B
    from onlinela.randomized import _next_krylov_block

    d = data.draw(st.integers(20, 60))
    k = data.draw(st.integers(1, d // 3))
    b = data.draw(st.integers(1, d // 3))
    dup = data.draw(st.booleans())
    seed = data.draw(st.integers(0, 2**16))
    rng = np.random.default_rng(seed)
    K = np.linalg.qr(rng.standard_normal((d, k)))[0]
    W = rng.standard_normal((d, b)) * np.logspace(0, -3, b)
    if dup and b > 1:
        W[:, -1] = W[:, 0]
    for dtype in (xp.float32, xp.float64):
        Kx, Wx = xp.asarray(K, dtype=dtype), xp.asarray(W, dtype=dtype)
        X = _next_krylov_block(xp, Kx, Wx, B.mT(xp, Kx) @ Wx, np.random.default_rng(seed))
        eps = _eps(xp, dtype)
        assert tuple(X.shape) == (d, b)
        assert_orthonormal(X)
        Xn = _np(X)
        assert np.max(np.abs(K.T @ Xn)) <= 10 * math.sqrt(d) * eps
        Q = np.concatenate([K, Xn], axis=1)
        resid = W - Q @ (Q.T @ W)
        assert np.linalg.norm(resid) <= C_EXACT * math.sqrt(d) * eps * np.linalg.norm(W)


def _ea_factor(d: int, *, steps: int, s: int, decay: float, alpha: float, seed: int) -> np.ndarray:
    """An EA factor like those of benchmarks/randomized_eigh.py: ``M_k = ρ M_{k-1} + (1-ρ) X_k X_kᵀ``
    with ``s`` columns per increment drawn from a power-law latent covariance in a random basis."""
    rng = np.random.default_rng(seed)
    Q = np.linalg.qr(rng.standard_normal((d, d)))[0]
    sigma = (1.0 + np.arange(d)) ** -alpha
    M = np.zeros((d, d))
    for _ in range(steps):
        X = Q @ (sigma[:, None] * rng.standard_normal((d, s))) / math.sqrt(s)
        M = decay * M + (1 - decay) * (X @ X.T)
    return (M + M.T) / 2


@pytest.mark.parametrize("decay, s, alpha", [(0.9, 32, 0.3), (0.95, 64, 0.5), (0.99, 16, 0.8)])
def test_auto_default_within_the_documented_factor_on_ea_factors(xp, decay, s, alpha):
    """The default call on EA-built factors (the workload it was calibrated on) meets the
    accuracy the docs promise, ``||A - Â_r||_2 <= 1.2 λ_{r+1}``, in float32 and float64; the
    float32 run may add rounding ``c sqrt(d) eps λ_1`` (c = 50) to the bound."""
    d, r = 320, 24
    A = _ea_factor(d, steps=40, s=s, decay=decay, alpha=alpha, seed=int(100 * decay) + s)
    lam = np.linalg.eigvalsh(A)[::-1]
    for dtype in (xp.float32, xp.float64):
        M = randomized_eigh(xp.asarray(A, dtype=dtype), r, rng=0)
        assert M.rank == r
        assert _err(A, M) <= 1.2 * lam[r] + C_EXACT * math.sqrt(d) * _eps(xp, dtype) * lam[0]
        assert_orthonormal(M.eigvecs)
