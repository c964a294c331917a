"""Brand's online update and the Rayleigh–Ritz refresh (algorithms.md §4, §7.1–7.3).

Oracles are dense float64 NumPy computations from the *cast* inputs (so the
oracle sees exactly the numbers the backend saw).  Tolerances: a backward-stable
kernel of size ``m`` has relative error ``c * sqrt(m) * eps(dtype)``; the
constant ``c`` is stated at each assertion (see ``onlinela.testing.default_tolerance``).
"""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, strategies as st

from onlinela import LowRankPSD, brand_update, empty_lowrank, rayleigh_ritz_refresh
from onlinela.testing import assert_allclose_dtype, assert_orthonormal, to_numpy
from onlinela.testing import strategies as ost


def _np(a) -> np.ndarray:
    return to_numpy(a).astype(np.float64)


def _dense(M: LowRankPSD) -> np.ndarray:
    U, w = _np(M.eigvecs), _np(M.eigvals)
    return (U * w[..., None, :]) @ np.swapaxes(U, -1, -2)


def _eps(dtype) -> float:
    return float(np.finfo(np.float32 if "float32" in str(dtype) else np.float64).eps)


def _check_state(M: LowRankPSD, xp, dtype) -> None:
    assert M.dtype == dtype
    assert type(M.eigvecs) is type(xp.zeros(1, dtype=dtype))
    w = _np(M.eigvals)
    assert np.all(w >= 0) and np.all(w[..., :-1] >= w[..., 1:]), w
    # max|UᵀU - I| <= c sqrt(d) eps with c = 20: LAPACK's float64 eigh alone returns vectors
    # orthonormal to ~10-20 eps (measured), and the rotation [U Q] W adds a few eps
    assert_orthonormal(M.eigvecs, factor=20.0)


@given(data=st.data(), n=st.integers(1, 6), decay=st.floats(0.05, 0.99))
def test_brand_exact_without_truncation(xp, data, n, decay):
    """§7.1: no truncation reproduces decay*M + (1-decay) X Xᵀ to machine precision."""
    M = data.draw(ost.low_rank_psd(xp, dims=st.integers(2, 40)))
    seed = data.draw(st.integers(0, 2**32 - 1))
    X = np.random.default_rng(seed).standard_normal((M.dim, n)) * 10.0 ** data.draw(st.floats(-2, 2))
    Xb = xp.asarray(X, dtype=M.dtype)
    out = brand_update(M, Xb, decay=decay)
    _check_state(out, xp, M.dtype)
    Xd = _np(Xb)
    expected = decay * _dense(M) + (1 - decay) * Xd @ Xd.T
    # the rank grows by the numerical rank of the residual (I - UUᵀ)X: every direction far above
    # the drop threshold (16 eps sqrt(r+n) ||X||) is kept, none far below it
    U = _np(M.eigvecs)
    sv = np.linalg.svd(Xd - U @ (U.T @ Xd), compute_uv=False)
    thresh = 16.0 * _eps(M.dtype) * np.sqrt(M.rank + n) * np.linalg.norm(Xd, 2)
    assert int(np.sum(sv > 100 * thresh)) <= out.rank - M.rank <= int(np.sum(sv > 0.01 * thresh))
    scale = decay * float(np.max(_np(M.eigvals), initial=0.0)) + (1 - decay) * np.linalg.norm(Xd, 2) ** 2
    # c = 20: eigh of the (r+n) core plus two GEMMs of inner size <= d
    assert_allclose_dtype(out.to_dense(), expected, dim=M.dim, factor=20.0, scale=scale)


@given(data=st.data(), decay=st.floats(0.1, 0.99), n_in=st.integers(1, 5), n_out=st.integers(0, 3))
def test_no_rank_growth_inside_span(xp, data, decay, n_in, n_out):
    """§7.2: columns inside span(U) add no rank; genuinely new ones add exactly one each."""
    M = data.draw(ost.low_rank_psd(xp, dims=st.integers(8, 40), ranks=st.integers(1, 5)))
    rng = np.random.default_rng(data.draw(st.integers(0, 2**32 - 1)))
    U = M.eigvecs
    inside = U @ xp.asarray(rng.standard_normal((M.rank, n_in)), dtype=M.dtype)  # in span(U) up to rounding
    X = xp.concat([inside, xp.asarray(rng.standard_normal((M.dim, n_out)), dtype=M.dtype)], axis=-1)
    out = brand_update(M, X, decay=decay)
    assert out.rank == M.rank + n_out
    _check_state(out, xp, M.dtype)
    Xd = _np(X)
    expected = decay * _dense(M) + (1 - decay) * Xd @ Xd.T
    scale = decay * float(_np(M.eigvals)[0]) + (1 - decay) * np.linalg.norm(Xd, 2) ** 2
    # c = 20 * sqrt(r+n): dropped round-off directions carry <= 16 eps sqrt(r+n) ||X||
    assert_allclose_dtype(
        out.to_dense(), expected, dim=M.dim, factor=20.0 * np.sqrt(M.rank + n_in + n_out), scale=scale
    )


@given(data=st.data(), n=st.integers(1, 6), decay=st.floats(0.1, 0.99))
def test_truncation_error_bounded_by_next_core_eigenvalue(xp, data, n, decay):
    """§7.3: ||decay M + (1-decay) X Xᵀ - M'||_2 <= s_{t+1} of the core, for the top-t truncation."""
    M = data.draw(ost.low_rank_psd(xp, dims=st.integers(6, 40), ranks=st.integers(1, 8)))
    X = xp.asarray(np.random.default_rng(data.draw(st.integers(0, 2**32 - 1))).standard_normal((M.dim, n)), dtype=M.dtype)
    full = brand_update(M, X, decay=decay)
    t = data.draw(st.integers(0, full.rank - 1))
    trunc = brand_update(M, X, decay=decay, rank=t)
    assert trunc.rank == t
    _check_state(trunc, xp, M.dtype)
    Xd = _np(X)
    exact = decay * _dense(M) + (1 - decay) * Xd @ Xd.T
    err = np.linalg.norm(exact - _dense(trunc), 2)
    s = _np(full.eigvals)
    tol = 20.0 * np.sqrt(M.dim) * _eps(M.dtype) * s[0]  # c = 20, relative to the top eigenvalue
    assert err <= s[t] + tol
    assert err >= s[t] - tol  # the truncation is the best rank-t approximation inside span([U X])
    # and the kept pairs are the top-t pairs of the untruncated update
    assert_allclose_dtype(trunc.eigvals, s[:t], dim=M.dim, factor=20.0, scale=s[0])


@pytest.mark.parametrize("dtype_name", ["float32", "float64"])
def test_long_stream_tracks_dense_ea(xp, dtype_name):
    """Hundreds of truncated updates: U stays orthonormal, the dense EA minus the state is PSD
    with norm <= sum_i decay^(k-i) * s_{r+1}^(i) (the discarded core eigenvalues), and the
    untruncated state tracks the dense EA to accumulated round-off."""
    dtype = getattr(xp, dtype_name)
    d, r, n, decay, steps = 12, 4, 2, 0.9, 300
    eps = _eps(dtype)
    rng = np.random.default_rng(7)
    basis = np.linalg.qr(rng.standard_normal((d, d)))[0]
    trunc, full = empty_lowrank(d, rank=r, xp=xp, dtype=dtype), empty_lowrank(d, xp=xp, dtype=dtype)
    dense = np.zeros((d, d))
    bound = 0.0
    for k in range(steps):
        # correlated activations: a decaying spectrum in a fixed basis, partly inside span(U)
        X = basis @ (rng.standard_normal((d, n)) * np.geomspace(1.0, 1e-2, d)[:, None])
        if k % 5 == 0:
            X[:, :1] = _np(trunc.eigvecs[..., :1])
        Xb = xp.asarray(X, dtype=dtype)
        Xd = _np(Xb)
        dense = decay * dense + (1 - decay) * Xd @ Xd.T
        step = brand_update(trunc, Xb, decay=decay, check_inputs=False)
        s = _np(step.eigvals)
        bound = decay * bound + (s[r] if s.size > r else 0.0)
        trunc = step.truncate(r)
        full = brand_update(full, Xb, decay=decay)
        if k % 50 == 49:
            assert_orthonormal(trunc.eigvecs, factor=20.0)  # c = 20 as in _check_state: no drift
            assert_orthonormal(full.eigvecs, factor=20.0)
    scale = np.linalg.norm(dense, 2)
    diff = dense - _dense(trunc)
    # accumulated round-off of `steps` updates, damped by decay: c = 20 / (1 - decay)
    tol = 20.0 / (1 - decay) * np.sqrt(d) * eps * scale
    assert trunc.rank == r
    assert np.linalg.norm(diff, 2) <= bound + tol
    assert np.linalg.eigvalsh(diff).min() >= -tol  # truncation only ever discards PSD mass
    assert full.rank == d
    assert np.abs(dense - _dense(full)).max() <= tol


def test_batched_stack_matches_loop(xp):
    rng = np.random.default_rng(3)
    d, r, n = 14, 3, 3
    U = np.stack([np.linalg.qr(rng.standard_normal((d, r)))[0] for _ in range(3)])
    w = np.sort(rng.uniform(0.1, 2.0, (3, r)), axis=-1)[..., ::-1].copy()
    X = rng.standard_normal((3, d, n))
    X[1] = U[1] @ rng.standard_normal((r, n))  # member 1: inside span(U) -> no new directions
    X[2, :, 2] = X[2, :, 0] * 2.0  # member 2: rank-deficient X
    for dtype in (xp.float32, xp.float64):
        Mb = LowRankPSD(xp.asarray(U, dtype=dtype), xp.asarray(w, dtype=dtype))
        out = brand_update(Mb, xp.asarray(X, dtype=dtype), decay=0.8)
        assert out.eigvecs.shape == (3, d, r + n)  # the widest member sets the shape
        _check_state(out, xp, dtype)
        dense_b = _dense(out)
        for i in range(3):
            Mi = LowRankPSD(xp.asarray(U[i], dtype=dtype), xp.asarray(w[i], dtype=dtype))
            oi = brand_update(Mi, xp.asarray(X[i], dtype=dtype), decay=0.8)
            assert oi.rank == (r + n, r, r + n - 1)[i]
            # c = 40 (a tolerance of the backend's dtype, although the oracles are float64 arrays)
            assert np.abs(dense_b[i] - _dense(oi)).max() <= 40.0 * np.sqrt(d) * _eps(dtype) * np.abs(_dense(oi)).max()
            assert_allclose_dtype(out.eigvals[i, ...][: oi.rank], oi.eigvals, dim=d, factor=40.0)
            assert np.all(_np(out.eigvals[i, ...][oi.rank :]) <= 40.0 * np.sqrt(d) * _eps(dtype) * _np(oi.eigvals)[0])
        # truncation of a stack
        tr = brand_update(Mb, xp.asarray(X, dtype=dtype), decay=0.8, rank=2)
        assert tr.eigvecs.shape == (3, d, 2)


@given(data=st.data())
def test_empty_and_identity_starts_build_the_ea(xp, data):
    """From the empty state (rank 0) updates alone rebuild the dense EA; the identity-initialised
    state keeps a fixed rank; complement=1 (eigenvalues 1 too) models M_0 = I exactly."""
    stream = data.draw(ost.ea_streams(xp, 10, lengths=st.integers(1, 8), ranks=st.integers(1, 3), dtypes=[xp.float32, xp.float64], styles=ost.STREAM_STYLES))
    dtype = stream.increments[0].dtype
    d, rho = 10, stream.decay
    empty = empty_lowrank(d, like=stream.increments[0])
    ident = empty_lowrank(d, rank=4, xp=xp, dtype=dtype, complement=1.0)
    assert empty.rank == 0 and ident.rank == 4 and _np(ident.eigvecs)[:4, :4].tolist() == np.eye(4).tolist()
    assert_allclose_dtype(ident.to_dense(), np.eye(d), factor=1.0)  # represents M_0 = I exactly
    dense = np.zeros((d, d))
    for X in stream.increments:
        Xd = _np(X)
        dense = rho * dense + (1 - rho) * Xd @ Xd.T
        empty = brand_update(empty, X, decay=rho)
        ident = brand_update(ident, X, decay=rho, rank=4)
        assert ident.rank == 4
    k = len(stream.increments)
    _check_state(empty, xp, dtype)
    assert empty.rank <= min(d, k * stream.increment_rank)
    scale = max(np.linalg.norm(dense, 2), 1e-30)
    assert_allclose_dtype(empty.to_dense(), dense, dim=d, factor=20.0 * k, scale=scale)
    assert ident.complement == pytest.approx(rho**k)
    # the identity-initialised state holds the EA of M_0 = I restricted to 4 modes; its
    # top eigenvalues can only underestimate those of rho^k I + dense (Cauchy interlacing)
    top = np.linalg.eigvalsh(rho**k * np.eye(d) + dense)[::-1][:4]
    # truncation lowers eigenvalues to the complement, so the state is below the EA in Loewner order
    exact = rho**k * np.eye(d) + dense
    tol = 20.0 * k * np.sqrt(d) * _eps(dtype) * np.linalg.norm(exact, 2)
    assert np.all(_np(ident.eigvals) <= top + tol)
    assert np.linalg.eigvalsh(exact - _np(ident.to_dense())).min() >= -tol


def test_complement_is_decayed_exactly(xp):
    rng = np.random.default_rng(5)
    d, n = 9, 2
    M = empty_lowrank(d, xp=xp, complement=2.0)
    dense = 2.0 * np.eye(d)
    for _ in range(4):
        X = rng.standard_normal((d, n))
        dense = 0.7 * dense + 0.3 * X @ X.T
        M = brand_update(M, xp.asarray(X), decay=0.7)
    assert M.complement == pytest.approx(2.0 * 0.7**4)
    assert_allclose_dtype(M.to_dense(), dense, factor=20.0)


def test_drifted_basis_is_reorthonormalised(xp):
    """A basis that lost orthonormality is repaired inside the update; the result is the
    update of the matrix U diag(w) Uᵀ that the drifted factor represents."""
    rng = np.random.default_rng(11)
    d, r, n = 60, 8, 3
    U = np.linalg.qr(rng.standard_normal((d, r)))[0] + 1e-4 * rng.standard_normal((d, r))
    w = np.sort(rng.uniform(0.5, 2.0, r))[::-1].copy()
    X = rng.standard_normal((d, n))
    for dtype in (xp.float32, xp.float64):
        M = LowRankPSD(xp.asarray(U, dtype=dtype), xp.asarray(w, dtype=dtype))
        out = brand_update(M, xp.asarray(X, dtype=dtype), decay=0.9)
        _check_state(out, xp, dtype)
        Ud, Xd = _np(M.eigvecs), _np(xp.asarray(X, dtype=dtype))
        expected = 0.9 * (Ud * _np(M.eigvals)) @ Ud.T + 0.1 * Xd @ Xd.T
        assert_allclose_dtype(out.to_dense(), expected, dim=d, factor=20.0)


def test_nonfinite_X_raises_and_never_builds_a_state(xp):
    rng = np.random.default_rng(0)
    M = LowRankPSD(xp.asarray(np.linalg.qr(rng.standard_normal((8, 3)))[0]), xp.asarray([3.0, 2.0, 1.0], dtype=xp.float64))
    before = (_np(M.eigvecs).copy(), _np(M.eigvals).copy())
    for bad in (np.nan, np.inf, -np.inf):
        X = rng.standard_normal((8, 2))
        X[3, 1] = bad
        with pytest.raises(ValueError, match="`X` must be finite"):
            brand_update(M, xp.asarray(X), decay=0.9)
        with pytest.raises(ValueError, match="finite"):  # the unvalidated hot-loop path refuses too
            brand_update(M, xp.asarray(X), decay=0.9, check_inputs=False)
    assert np.array_equal(_np(M.eigvecs), before[0]) and np.array_equal(_np(M.eigvals), before[1])


@given(data=st.data(), fraction=st.floats(0.05, 1.0))
def test_refresh_never_increases_rayleigh_quotient_error(xp, data, fraction):
    case = data.draw(ost.psd_cases(xp, dims=st.integers(4, 30)))
    A = case.matrix
    d = A.shape[-1]
    r = data.draw(st.integers(1, d - 1))
    rng = np.random.default_rng(data.draw(st.integers(0, 2**32 - 1)))
    # a perturbed basis of the top-r subspace with stale eigenvalues
    U0 = np.linalg.qr(case.eigvecs[:, :r] + 0.3 * rng.standard_normal((d, r)))[0]
    w0 = np.sort(rng.uniform(0, 1, r) * case.eigvals[0])[::-1].copy()
    M = LowRankPSD(xp.asarray(U0, dtype=A.dtype), xp.asarray(w0, dtype=A.dtype))
    out = rayleigh_ritz_refresh(M, A, fraction=fraction, rng=rng)
    _check_state(out, xp, A.dtype)
    Ad = _np(A)

    def resid(S: LowRankPSD) -> tuple[float, float]:
        U, w = _np(S.eigvecs), _np(S.eigvals)
        return np.linalg.norm(Ad @ U - U * w), np.linalg.norm(Ad - (U * w) @ U.T)

    tol = 20.0 * np.sqrt(d) * _eps(A.dtype) * max(case.eigvals[0], 1e-30)  # c = 20
    (r0, f0), (r1, f1) = resid(M), resid(out)
    assert r1 <= r0 + tol and f1 <= f0 + tol
    # the subspace is unchanged, so the captured trace tr(UᵀAU) is too
    U1 = _np(out.eigvecs)
    assert np.trace(U1.T @ Ad @ U1) == pytest.approx(np.trace(U0.T @ Ad @ U0), abs=tol * r)
    assert np.abs(U1 @ U1.T - _np(M.eigvecs) @ _np(M.eigvecs).T).max() <= tol / max(case.eigvals[0], 1e-30)
    if fraction == 1.0:  # full Rayleigh–Ritz: the Ritz values are the projected matrix's eigenvalues
        assert_allclose_dtype(out.eigvals, np.linalg.eigvalsh(U0.T @ Ad @ U0)[::-1].clip(0), dim=d, factor=20.0)


def test_refresh_batched_and_reproducible(xp):
    rng = np.random.default_rng(2)
    d, r = 10, 5
    Q = np.linalg.qr(rng.standard_normal((2, d, d)))[0]
    lam = np.sort(rng.uniform(0.1, 3.0, (2, d)), axis=-1)[..., ::-1]
    A = (Q * lam[..., None, :]) @ np.swapaxes(Q, -1, -2)
    A = (A + np.swapaxes(A, -1, -2)) / 2
    U0 = np.linalg.qr(Q[..., :r] + 0.2 * rng.standard_normal((2, d, r)))[0]
    M = LowRankPSD(xp.asarray(U0), xp.asarray(np.ones((2, r))))
    a = rayleigh_ritz_refresh(M, xp.asarray(A), fraction=0.4, rng=9)
    b = rayleigh_ritz_refresh(M, xp.asarray(A), fraction=0.4, rng=9)
    assert np.array_equal(_np(a.eigvecs), _np(b.eigvecs))
    for i in range(2):
        ai = rayleigh_ritz_refresh(LowRankPSD(M.eigvecs[i, ...], M.eigvals[i, ...]), xp.asarray(A[i]), fraction=0.4, rng=9)
        assert_allclose_dtype(_dense(a)[i], _dense(ai), factor=20.0)


# ----------------------------------------------------------------------------- bad input


def _state(xp, dtype=None, d=6, r=2):
    dtype = dtype or xp.float64
    return LowRankPSD(xp.asarray(np.eye(d, r), dtype=dtype), xp.asarray([2.0, 1.0][:r], dtype=dtype))


@pytest.mark.parametrize("decay", [0.0, 1.0, -0.5, 1.5, float("nan")])
def test_brand_rejects_bad_decay(xp, decay):
    with pytest.raises(ValueError, match="`decay`"):
        brand_update(_state(xp), xp.ones((6, 2), dtype=xp.float64), decay=decay)


def test_brand_rejects_bad_arguments(xp):
    M = _state(xp)
    X = xp.ones((6, 2), dtype=xp.float64)
    with pytest.raises(ValueError, match="`X` must have 6 rows"):
        brand_update(M, xp.ones((5, 2), dtype=xp.float64), decay=0.9)
    with pytest.raises(ValueError, match="`X` must have the batch shape"):
        brand_update(M, xp.ones((2, 6, 2), dtype=xp.float64), decay=0.9)
    with pytest.raises(ValueError, match="`rank` must satisfy 0 <= rank"):
        brand_update(M, X, decay=0.9, rank=-1)
    with pytest.raises(TypeError, match="`rank` must be an int"):
        brand_update(M, X, decay=0.9, rank=2.5)
    with pytest.raises(TypeError, match="`X` must have the dtype"):
        brand_update(M, xp.ones((6, 2), dtype=xp.float32), decay=0.9)
    with pytest.raises(TypeError, match="`X` must have a real floating dtype"):
        brand_update(M, xp.ones((6, 2), dtype=xp.int64), decay=0.9)
    with pytest.raises(TypeError, match="`approx` must be a LowRankPSD"):
        brand_update(M.eigvecs, X, decay=0.9)
    with pytest.raises(TypeError, match="`decay` must be a real number"):
        brand_update(M, X, decay="0.9")
    assert brand_update(M, X, decay=0.9, rank=0).rank == 0


def test_brand_and_refresh_reject_mixed_namespaces():
    torch = pytest.importorskip("torch")
    M = LowRankPSD(np.eye(6, 2), np.array([2.0, 1.0]))
    with pytest.raises(TypeError, match="one array library"):
        brand_update(M, torch.ones((6, 2), dtype=torch.float64), decay=0.9)
    with pytest.raises(TypeError, match="one array library"):
        rayleigh_ritz_refresh(M, torch.eye(6, dtype=torch.float64))
    with pytest.raises(TypeError, match="`X` must be an array-API array"):
        brand_update(M, [[1.0, 2.0]] * 6, decay=0.9)


@pytest.mark.parametrize("fraction", [0.0, -0.1, 1.01, float("inf")])
def test_refresh_rejects_bad_fraction(xp, fraction):
    with pytest.raises(ValueError, match="`fraction`"):
        rayleigh_ritz_refresh(_state(xp), xp.eye(6, dtype=xp.float64), fraction=fraction)


def test_refresh_rejects_bad_matrix(xp):
    M = _state(xp)
    with pytest.raises(ValueError, match="`A` must be 6 x 6"):
        rayleigh_ritz_refresh(M, xp.eye(5, dtype=xp.float64))
    with pytest.raises(TypeError, match="`A` must have the dtype"):
        rayleigh_ritz_refresh(M, xp.eye(6, dtype=xp.float32))
    with pytest.raises(ValueError, match="`A` must be symmetric"):
        rayleigh_ritz_refresh(M, xp.asarray(np.triu(np.ones((6, 6)))))
    with pytest.raises(ValueError, match="`A` must be finite"):
        rayleigh_ritz_refresh(M, xp.asarray(np.full((6, 6), np.nan)))
    with pytest.raises(TypeError, match="`rng`"):
        rayleigh_ritz_refresh(M, xp.eye(6, dtype=xp.float64), rng="seed")


def test_empty_lowrank_rejects_bad_arguments(xp):
    with pytest.raises(ValueError, match="`dim`"):
        empty_lowrank(0, xp=xp)
    with pytest.raises(ValueError, match="`rank` must satisfy 0 <= rank <= 4"):
        empty_lowrank(4, rank=5, xp=xp)
    with pytest.raises(TypeError, match="`dtype`"):
        empty_lowrank(4, xp=xp, dtype=xp.int64)
    with pytest.raises(ValueError, match="`complement`"):
        empty_lowrank(4, xp=xp, complement=-1.0)
    with pytest.raises(TypeError, match="either `xp` or `like`"):
        empty_lowrank(4, xp=xp, like=xp.ones(3))
    S = empty_lowrank(5, rank=2, xp=xp, dtype=xp.float32, batch_shape=(3,))
    assert S.eigvecs.shape == (3, 5, 2) and S.eigvals.shape == (3, 2) and S.dtype == xp.float32


@given(data=st.data(), scale=st.sampled_from([1e150, 1e155, 1e-140, 1e-150]))
def test_brand_update_handles_extreme_scales(xp, data, scale):
    """Entries >= 1e155 (or tiny) in X: ZᵀZ and the core would overflow (underflow) without
    the exact power-of-two rescaling (issue 15, item 6).  Two updates from the empty state
    must give the eigenvalues of (ρ(1-ρ) + (1-ρ)) X Xᵀ (the same X twice), which are
    representable, to the unscaled problem's accuracy (c = 50, size d)."""
    d = data.draw(st.integers(3, 12))
    n = data.draw(st.integers(1, 3))
    Y = np.random.default_rng(data.draw(st.integers(0, 99))).uniform(0.5, 1.0, (d, n)) / np.sqrt(d * n)
    decay = 0.999
    X = xp.asarray(Y * scale, dtype=xp.float64)
    M = brand_update(brand_update(empty_lowrank(d, like=X), X, decay=decay), X, decay=decay)
    ref = np.linalg.eigvalsh((decay * (1 - decay) + (1 - decay)) * (Y @ Y.T))[::-1][: M.rank]
    w = _np(M.eigvals) / scale / scale
    assert np.all(np.isfinite(w))
    np.testing.assert_allclose(w, ref, atol=50 * d * _eps(M.dtype) * ref[0], rtol=0)


def test_check_inputs_false_gives_the_checked_result(xp):
    rng = np.random.default_rng(3)
    M = empty_lowrank(20, like=xp.asarray(np.zeros((1,))))
    for _ in range(3):
        X = xp.asarray(rng.standard_normal((20, 4)))
        a = brand_update(M, X, decay=0.9, rank=6)
        b = brand_update(M, X, decay=0.9, rank=6, check_inputs=False)
        assert np.array_equal(_np(a.eigvals), _np(b.eigvals)) and np.array_equal(_np(a.eigvecs), _np(b.eigvecs))
        M = a
    A = xp.asarray((lambda Z: Z @ Z.T)(rng.standard_normal((20, 20))))
    a = rayleigh_ritz_refresh(M, A, fraction=0.5, rng=1)
    b = rayleigh_ritz_refresh(M, A, fraction=0.5, rng=1, check_inputs=False)
    assert np.array_equal(_np(a.eigvals), _np(b.eigvals)) and np.array_equal(_np(a.eigvecs), _np(b.eigvecs))
