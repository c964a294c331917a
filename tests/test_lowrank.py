"""LowRankPSD: dense oracle, the inverse identity (algorithms.md §7.4, §7.8), bad input."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, strategies as st

from onlinela import LowRankPSD
from onlinela.testing import assert_allclose_dtype, to_numpy
from onlinela.testing import strategies as ost


def _dense(M: LowRankPSD) -> np.ndarray:
    U, w = to_numpy(M.eigvecs).astype(np.float64), to_numpy(M.eigvals).astype(np.float64)
    c = (w[-1] if w.size else 0.0) if M.complement == "min" else float(M.complement)
    return (U * w) @ U.T + c * (np.eye(U.shape[0]) - U @ U.T)


@given(data=st.data(), damping=st.floats(1e-3, 10.0), k=st.integers(1, 5), complement=st.sampled_from([0.0, 0.5, "min"]))
def test_solve_matches_dense_solve(xp, data, damping, k, complement):
    M0 = data.draw(ost.low_rank_psd(xp))
    M = LowRankPSD(M0.eigvecs, M0.eigvals, complement)
    rng = np.random.default_rng(0)
    X = rng.standard_normal((M.dim, k))
    dense = _dense(M) + damping * np.eye(M.dim)
    expected = np.linalg.solve(dense, X)
    got = M.solve(xp.asarray(X, dtype=M.dtype), damping)
    # (M+μI)^-1 has norm <= 1/μ; relative accuracy degrades with cond = (λ1+μ)/μ.
    cond = np.linalg.cond(dense)
    assert_allclose_dtype(got, expected, factor=10.0 * cond, scale=float(np.abs(expected).max()) + 1e-30)
    # round trip: (M + μI) @ solve = X
    back = M.matmul(got) + damping * got
    assert_allclose_dtype(back, X, factor=10.0 * cond)


@given(data=st.data())
def test_to_dense_and_matmul_match_oracle(xp, data):
    M = data.draw(ost.low_rank_psd(xp))
    D = _dense(M)
    assert_allclose_dtype(M.to_dense(), D, dim=max(M.rank, 1))
    X = np.random.default_rng(1).standard_normal((M.dim, 3))
    assert_allclose_dtype(M.matmul(xp.asarray(X, dtype=M.dtype)), D @ X, dim=M.dim, scale=np.abs(D).max() * np.abs(X).max() * M.dim**0.5 + 1e-30)


@given(data=st.data(), damping=st.floats(1e-4, 1.0))
def test_inverse_norm_bounded_by_inverse_damping(xp, data, damping):
    M = data.draw(ost.low_rank_psd(xp))
    eye = xp.eye(M.dim, dtype=M.dtype)
    inv = to_numpy(M.solve(eye, damping)).astype(np.float64)
    eps = float(np.finfo(np.float32 if M.dtype == xp.float32 else np.float64).eps)
    assert np.linalg.norm(inv, 2) <= (1.0 / damping) * (1 + 100 * M.dim * eps)


@given(data=st.data())
def test_full_basis_solve_is_exact(xp, data):
    case = data.draw(ost.psd_cases(xp, dims=st.integers(2, 24)))
    M = LowRankPSD(xp.asarray(case.eigvecs, dtype=case.matrix.dtype), xp.asarray(case.eigvals, dtype=case.matrix.dtype))
    mu = 0.1 * case.eigvals[0] + 1e-3
    X = np.random.default_rng(2).standard_normal((M.dim, 2))
    expected = np.linalg.solve(to_numpy(case.matrix).astype(np.float64) + mu * np.eye(M.dim), X)
    cond = (case.eigvals[0] + mu) / mu
    assert_allclose_dtype(M.solve(xp.asarray(X, dtype=M.dtype), mu), expected, factor=10.0 * cond)


def test_batched_stack_matches_loop(xp):
    rng = np.random.default_rng(3)
    U = np.stack([np.linalg.qr(rng.standard_normal((12, 4)))[0] for _ in range(3)])
    w = np.sort(rng.uniform(0.1, 2.0, (3, 4)), axis=-1)[..., ::-1].copy()
    X = rng.standard_normal((3, 12, 2))
    Mb = LowRankPSD(xp.asarray(U), xp.asarray(w))
    out = to_numpy(Mb.solve(xp.asarray(X), 0.3))
    for i in range(3):
        ref = to_numpy(LowRankPSD(xp.asarray(U[i]), xp.asarray(w[i])).solve(xp.asarray(X[i]), 0.3))
        assert_allclose_dtype(out[i], ref)
    assert Mb.to_dense().shape == (3, 12, 12)


def test_truncate_keeps_top_pairs(xp):
    rng = np.random.default_rng(4)
    U = np.linalg.qr(rng.standard_normal((10, 5)))[0]
    M = LowRankPSD(xp.asarray(U, dtype=xp.float64), xp.asarray([5.0, 4.0, 3.0, 2.0, 1.0], dtype=xp.float64))
    T = M.truncate(2)
    assert T.rank == 2 and T.dim == 10
    assert_allclose_dtype(T.eigvals, np.array([5.0, 4.0]))
    assert M.truncate(0).rank == 0
    with pytest.raises(ValueError, match="rank"):
        M.truncate(6)


def test_dtype_and_namespace_preserved(xp):
    U = xp.asarray(np.eye(6, 2), dtype=xp.float32)
    M = LowRankPSD(U, xp.asarray([2.0, 1.0], dtype=xp.float32))
    out = M.solve(xp.ones((6, 3), dtype=xp.float32), 0.5)
    assert out.dtype == xp.float32
    assert type(out) is type(U)
    assert M.solve(xp.ones((6,), dtype=xp.float32), 0.5).shape == (6,)


@pytest.mark.parametrize(
    "kwargs, exc, match",
    [
        (dict(eigvals=[1.0, 2.0]), ValueError, "descending"),
        (dict(eigvals=[1.0, -1.0]), ValueError, ">= 0"),
        (dict(eigvals=[1.0]), ValueError, "shape"),
        (dict(eigvals=[1.0, np.nan]), ValueError, "finite"),
        (dict(complement=-1.0), ValueError, "complement"),
        (dict(complement="max"), ValueError, "complement"),
    ],
)
def test_constructor_rejects_bad_input(xp, kwargs, exc, match):
    kwargs = dict(kwargs)
    U = xp.asarray(np.eye(4, 2), dtype=xp.float64)
    w = xp.asarray(kwargs.pop("eigvals", [2.0, 1.0]), dtype=xp.float64)
    with pytest.raises(exc, match=match):
        LowRankPSD(U, w, **kwargs)


def test_rejects_integer_mixed_dtype_and_wrong_rhs(xp):
    with pytest.raises(TypeError, match="eigvecs"):
        LowRankPSD(xp.asarray([[1, 0], [0, 1]]), xp.asarray([1, 1]))
    M = LowRankPSD(xp.asarray(np.eye(4, 2), dtype=xp.float64), xp.asarray([2.0, 1.0], dtype=xp.float64))
    with pytest.raises(TypeError, match="dtype"):
        M.solve(xp.ones((4, 1), dtype=xp.float32), 0.1)
    with pytest.raises(ValueError, match="rows"):
        M.solve(xp.ones((5, 1), dtype=xp.float64), 0.1)
    with pytest.raises(ValueError, match="damping"):
        M.solve(xp.ones((4, 1), dtype=xp.float64), -0.1)
    with pytest.raises(ValueError, match="singular"):
        M.solve(xp.ones((4, 1), dtype=xp.float64), 0.0)


def test_rejects_mixed_namespaces():
    import torch

    with pytest.raises(TypeError, match="one array library"):
        LowRankPSD(np.eye(4, 2), torch.tensor([2.0, 1.0], dtype=torch.float64))


@given(
    data=st.data(),
    bad=st.sampled_from([float("nan"), float("inf"), -float("inf")]),
    op=st.sampled_from(["solve", "matmul", "damped_power"]),
)
def test_nonfinite_rhs_is_rejected_by_name(xp, data, bad, op):
    """Inf/NaN anywhere in X (matrix or vector right-hand side) raises instead of
    propagating NaN through the O(d r k) products (issue 15, item 6)."""
    d = data.draw(st.integers(2, 12))
    r = data.draw(st.integers(1, d))
    k = data.draw(st.integers(0, 3))  # 0: a vector right-hand side
    M = LowRankPSD(xp.asarray(np.eye(d, r)), xp.asarray(np.linspace(2.0, 1.0, r)))
    X = np.ones((d,) if k == 0 else (d, k))
    X.flat[data.draw(st.integers(0, X.size - 1))] = bad
    call = {"solve": lambda Y: M.solve(Y, 0.1), "matmul": M.matmul, "damped_power": lambda Y: M.damped_power(Y, -0.5, 0.1)}
    with pytest.raises(ValueError, match="`X` must be finite"):
        call[op](xp.asarray(X))


def test_unchecked_constructor_skips_validation_and_computes_the_same(xp):
    U = xp.asarray(np.eye(5, 2))
    w = xp.asarray(np.array([3.0, 1.0]))
    X = xp.asarray(np.arange(10.0).reshape(5, 2))
    checked, fast = LowRankPSD(U, w), LowRankPSD.unchecked(U, w)
    assert np.array_equal(to_numpy(checked.solve(X, 0.5)), to_numpy(fast.solve(X, 0.5)))
    # what the checked constructor rejects, the unchecked one accepts (the caller's contract)
    with pytest.raises(ValueError, match="descending"):
        LowRankPSD(U, xp.asarray(np.array([1.0, 3.0])))
    assert LowRankPSD.unchecked(U, xp.asarray(np.array([1.0, 3.0]))).rank == 2
