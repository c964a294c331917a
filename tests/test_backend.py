"""_backend: reproducible sketches, guarded eigh/qr, namespace and device checks."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, strategies as st

from onlinela import _backend as B
from onlinela.testing import assert_allclose_dtype, assert_orthonormal, to_numpy
from onlinela.testing import strategies as ost


def test_standard_normal_reproducible_and_on_device(xp):
    x = xp.zeros((3,), dtype=xp.float32)
    a = B.standard_normal(xp, (5, 4), dtype=xp.float32, device=B.device(x), rng=7)
    b = B.standard_normal(xp, (5, 4), dtype=xp.float32, device=B.device(x), rng=7)
    c = B.standard_normal(xp, (5, 4), dtype=xp.float32, device=B.device(x), rng=8)
    assert a.dtype == xp.float32 and B.device(a) == B.device(x)
    assert np.array_equal(to_numpy(a), to_numpy(b))
    assert not np.array_equal(to_numpy(a), to_numpy(c))


@pytest.mark.parametrize("bad", [-1, 1.5, "seed", True])
def test_default_rng_rejects_bad_rng(bad):
    with pytest.raises((TypeError, ValueError), match="rng"):
        B.default_rng(bad)


@given(data=st.data())
def test_eigh_descending_matches_oracle(xp, data):
    case = data.draw(ost.psd_cases(xp, dims=st.integers(1, 30)))
    w, V = B.eigh(xp, case.matrix)
    wn = to_numpy(w)
    assert np.all(wn[:-1] >= wn[1:])
    # eigenvalues are perfectly conditioned: |dλ| <= ||dA|| ~ c sqrt(d) eps ||A||, c = 10
    assert_allclose_dtype(w, case.eigvals, dim=case.matrix.shape[0], scale=case.eigvals[0])
    assert_orthonormal(V)


@given(data=st.data(), k=st.integers(1, 12))
def test_qr_orthonormal_and_spans_input(xp, data, k):
    d = data.draw(st.integers(k, 40))
    dtype = data.draw(st.sampled_from([xp.float32, xp.float64]))
    cond_exp = data.draw(st.integers(0, 12))  # up to cond 1e12: forces the Householder fallback
    rng = np.random.default_rng(data.draw(st.integers(0, 2**16)))
    Y = np.linalg.qr(rng.standard_normal((d, k)))[0] * np.logspace(0, -cond_exp, k) @ np.linalg.qr(rng.standard_normal((k, k)))[0]
    Q = B.qr(xp, xp.asarray(Y, dtype=dtype))
    assert Q.shape == (d, k) and Q.dtype == dtype
    assert_orthonormal(Q)
    q = to_numpy(Q).astype(np.float64)
    # the top singular direction of Y is captured whatever the conditioning
    u1 = np.linalg.svd(Y, full_matrices=False)[0][:, 0]
    assert np.linalg.norm(u1 - q @ (q.T @ u1)) <= 1e3 * np.sqrt(d) * np.finfo(np.float32 if dtype == xp.float32 else np.float64).eps


def test_eigh_retries_in_float64(monkeypatch):
    import array_api_compat.numpy as xp

    calls = []
    real = xp.linalg.eigh

    def flaky(a):
        calls.append(a.dtype)
        if a.dtype == np.float32:
            raise np.linalg.LinAlgError("did not converge")
        return real(a)

    class Linalg:
        eigh = staticmethod(flaky)

    class NS:
        pass

    ns = NS()
    ns.__dict__.update({k: getattr(xp, k) for k in ("float32", "float64", "astype", "matrix_transpose", "flip", "all", "isfinite")})
    ns.linalg = Linalg
    A = np.diag(np.array([3.0, 1.0, 2.0], dtype=np.float32))
    w, V = B.eigh(ns, A)
    assert calls == [np.float32, np.float64]
    assert w.dtype == np.float32 and np.allclose(w, [3.0, 2.0, 1.0])


def test_get_namespace_errors():
    import torch

    with pytest.raises(TypeError, match="`b`"):
        B.get_namespace(np.ones(2), [1.0], names=("a", "b"))
    with pytest.raises(TypeError, match="one array library"):
        B.get_namespace(np.ones(2), torch.ones(2), names=("a", "b"))


@given(data=st.data())
def test_public_eigh_reconstructs_and_is_descending(xp, data):
    """onlinela.eigh (the public guarded eigh): U diag(w) Uᵀ = A to c·sqrt(d)·eps·||A|| (c = 10), checked or not."""
    import onlinela

    case = data.draw(ost.psd_cases(xp, dims=st.integers(1, 24)))
    for check in (True, False):
        w, U = onlinela.eigh(case.matrix, check_inputs=check)
        wn, Un = to_numpy(w), to_numpy(U)
        assert np.all(wn[:-1] >= wn[1:])
        assert_orthonormal(U)
        assert_allclose_dtype(xp.asarray((Un * wn) @ Un.T), to_numpy(case.matrix), dim=case.matrix.shape[0],
                              scale=max(float(case.eigvals[0]), 1e-30))
