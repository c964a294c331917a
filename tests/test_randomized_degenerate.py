"""randomized_eigh on degenerate PSD input: the zero matrix and ranks below the request.

A K-factor of a dead layer is exactly zero, and early EA factors have rank below
the requested one; every method must return finite, orthonormal eigenvectors and
the exact (zero) tail.
"""

from __future__ import annotations

import numpy as np
import pytest

from onlinela import randomized_eigh
from onlinela.testing import assert_allclose_dtype, assert_orthonormal, to_numpy


@pytest.mark.parametrize("method", ["subspace", "nystrom", "svd"])
@pytest.mark.parametrize("true_rank", [0, 2])
def test_degenerate_input_gives_finite_orthonormal_exact_factors(xp, method, true_rank):
    d, rank = 30, 8
    rng = np.random.default_rng(true_rank)
    V = np.linalg.qr(rng.standard_normal((d, max(true_rank, 1))))[0][:, :true_rank]
    lam = np.array([3.0, 1.0])[:true_rank]
    A = (V * lam) @ V.T
    for dtype in (xp.float32, xp.float64):
        approx = randomized_eigh(xp.asarray(A, dtype=dtype), rank, oversample=3, n_iter=1, method=method, rng=0)
        assert bool(xp.all(xp.isfinite(approx.eigvecs)))
        assert_orthonormal(approx.eigvecs)
        expected = np.zeros(rank)
        expected[:true_rank] = lam
        # exact-rank input is recovered exactly: error c·sqrt(d)·eps·λ1 with c = 100 (a few GEMMs and an eigh)
        assert_allclose_dtype(approx.eigvals, expected, dim=d, factor=100.0, scale=3.0)
        assert_allclose_dtype(approx.to_dense(), A, dim=d, factor=100.0, scale=3.0)
