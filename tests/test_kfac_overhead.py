"""The lean per-step paths of the preconditioner give the results of the plain ones (up to round-off).

Cached dense damped inverses against the eigenbasis products (and a damping
that changes between calls), the product-convention weights, the cheap
finiteness test, the batched graft / unit-scale / RMS-clip coefficients, the
fused gradient writes and the single-copy convolution patch rows.
"""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given
from hypothesis import strategies as st
from torch import nn

from onlinela import LowRankPSD
from onlinela_torch import FactorEigen, KFACPreconditioner, apply_inverse, damped_solve
from onlinela_torch import scaling
from onlinela_torch.factors import all_finite
from onlinela_torch.inverse import _dense_pays
from onlinela_torch.modules import Conv2dHelper

DT = torch.float64
# float64 products of O(1) orthonormal factors and O(10) condition numbers: round-off ~ d * eps
TOL = dict(rtol=1e-10, atol=1e-10)


def _eigen(d: int, r: int, seed: int, dtype: torch.dtype = DT) -> FactorEigen:
    g = torch.Generator().manual_seed(seed)
    U = torch.linalg.qr(torch.randn(d, d, generator=g, dtype=DT))[0][:, :r]
    w = torch.sort(torch.rand(r, generator=g, dtype=DT) * 3 + 0.05, descending=True).values
    return FactorEigen(LowRankPSD(U.to(dtype), w.to(dtype)), float(w[0]), float(w[-1]))


@given(d=st.integers(2, 9), data=st.data(), side=st.sampled_from(["left", "right"]),
       complement=st.sampled_from(["zero", "min"]), mu=st.floats(1e-3, 2.0))
def test_dense_damped_inverse_equals_the_eigenbasis_solve(d, data, side, complement, mu):
    r = data.draw(st.integers(1, d))
    k = data.draw(st.integers(1, 7))
    e = _eigen(d, r, seed=d * 31 + r)
    X = torch.randn((d, k) if side == "left" else (k, d), dtype=DT, generator=torch.Generator().manual_seed(k))
    eig = damped_solve(e, X, mu, complement, side=side, reuse=1)  # r <= d: never dense at reuse 1 when k small
    dense = damped_solve(_eigen(d, r, seed=d * 31 + r), X, mu, complement, side=side, reuse=10**9)
    torch.testing.assert_close(dense, eig, **TOL)


def test_the_cost_model_uses_the_dense_inverse_only_above_half_rank():
    assert _dense_pays(100, 100, 50, reuse=50)  # full rank, reused: d k + d²/50 < 2 d k
    assert not _dense_pays(100, 100, 50, reuse=1)  # formed every call: d k + d² > 2 d k for k < d
    assert not _dense_pays(100, 40, 10**6, reuse=10**6)  # r < d/2: the rank-r products are always cheaper
    assert _dense_pays(100, 60, 10**6, reuse=10**6)


def test_a_cached_inverse_is_never_applied_under_another_damping():
    e = _eigen(6, 6, seed=1)
    X = torch.randn(6, 4, dtype=DT, generator=torch.Generator().manual_seed(2))
    for mu in (0.1, 0.5, 0.1):  # a schedule that changes every step, then comes back
        got = damped_solve(e, X, mu, "min", reuse=10**6)
        ref = torch.linalg.solve((e.approx.eigvecs * e.approx.eigvals) @ e.approx.eigvecs.T + mu * torch.eye(6, dtype=DT), X)
        torch.testing.assert_close(got, ref, **TOL)


@pytest.mark.parametrize("lam", [0.01, 0.3])
def test_product_weights_follow_the_damping_and_the_other_factor(lam):
    G, A1, A2 = _eigen(5, 5, 1), _eigen(4, 4, 2), _eigen(4, 4, 3)
    X = torch.randn(5, 4, dtype=DT, generator=torch.Generator().manual_seed(4))
    for A in (A1, A2, A1):
        for damping in (lam, 2 * lam):
            got = apply_inverse(G, A, X, damping, "product")
            K = torch.kron((A.approx.eigvecs * A.approx.eigvals) @ A.approx.eigvecs.T,
                           (G.approx.eigvecs * G.approx.eigvals) @ G.approx.eigvecs.T)
            K = K + damping * G.max_eig * A.max_eig * torch.eye(20, dtype=DT)
            ref = torch.linalg.solve(K, X.T.reshape(-1)).reshape(4, 5).T
            torch.testing.assert_close(got, ref, **TOL)


def test_all_finite_is_exact_also_when_the_sum_overflows():
    assert all_finite(torch.empty(0))
    assert all_finite(torch.full((10,), 3e38))  # the sum overflows to inf: the exact test answers
    for bad in (math.nan, math.inf, -math.inf):
        x = torch.ones(7)
        x[3] = bad
        assert not all_finite(x)
    x = torch.ones(4)
    x[0], x[1] = math.inf, -math.inf  # inf - inf = nan: still caught
    assert not all_finite(x)


def test_a_finite_gradient_whose_norm_overflows_is_not_skipped():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 2))
    pre = KFACPreconditioner(model, method="kfac", inv_update_freq=1)
    model(torch.randn(8, 3)).square().sum().backward()
    model[2].bias.grad.fill_(2e19)  # finite; its squares overflow float32
    assert pre.step()
    assert pre.stats()["skipped_steps"] == 0


def test_direction_scales_graft_unit_and_rms_clip():
    g = [torch.randn(3, 4), torch.randn(5)]
    v = [torch.randn(3, 4), torch.zeros(5)]
    ng = scaling.norms(g)
    c = scaling.direction_scales(v, ng, None, graft="sgd", rms_clip=None)
    torch.testing.assert_close(torch.linalg.vector_norm(v[0] * c[0]), ng[0])
    assert float(c[1]) == 0.0  # a zero direction stays zero
    cu = scaling.direction_scales(v, ng, [2.0, 0.0], graft="unit", rms_clip=None)
    torch.testing.assert_close(cu[0], c[0] / 2.0)
    assert scaling.direction_scales(v, ng, None, graft=None, rms_clip=None) is None
    big = [100 * torch.ones(4), 1e-3 * torch.ones(4)]
    cr = scaling.direction_scales(big, scaling.norms(big), None, graft=None, rms_clip=0.5)
    torch.testing.assert_close(cr, torch.tensor([0.5 / 100, 1.0]))


def test_write_all_matches_a_loop_also_with_a_shared_destination():
    a, b = torch.zeros(2, 3), torch.zeros(4)
    src = [torch.ones(2, 3), torch.full((4,), 2.0)]
    scaling.write_all([a, b], src, [torch.tensor(3.0), torch.tensor(0.5)])
    assert torch.equal(a, torch.full((2, 3), 3.0)) and torch.equal(b, torch.ones(4))
    c = torch.zeros(3)
    scaling.write_all([c, c], [torch.ones(3), torch.full((3,), 5.0)], None)  # the last write wins, as in a loop
    assert torch.equal(c, torch.full((3,), 5.0))


@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("stride,padding", [(1, 1), (2, 0), (1, "same")])
def test_conv_patch_rows_are_the_unfolded_patches(bias, stride, padding):
    conv = nn.Conv2d(3, 4, 3, stride=1 if padding == "same" else stride, padding=padding, bias=bias)
    x = torch.randn(2, 3, 7, 6)
    rows = Conv2dHelper(conv).a_rows(x)
    if padding == "same":
        x, padding = F.pad(x, conv._reversed_padding_repeated_twice), 0
    cols = F.unfold(x, 3, padding=padding, stride=conv.stride)
    ref = cols.transpose(1, 2).reshape(-1, cols.shape[1])
    if bias:
        ref = torch.cat([ref, torch.ones(ref.shape[0], 1)], 1)
    assert torch.equal(rows, ref)


@pytest.mark.parametrize("method", ["kfac", "rs-kfac", "b-kfac"])
def test_steps_with_and_without_dense_inverses_agree(method, monkeypatch):
    """The cost model changes which formula runs, not the step (float64, so round-off ~1e-12)."""
    import onlinela_torch.inverse as inverse

    formed = []
    real = inverse._dense_inverse

    def counting(*a, **k):
        formed.append(1)
        return real(*a, **k)

    def run(force_eigen: bool) -> list[torch.Tensor]:
        monkeypatch.setattr(inverse, "_dense_inverse", counting)
        if force_eigen:
            monkeypatch.setattr(inverse, "_dense_pays", lambda *a, **k: False)
        torch.manual_seed(0)
        model = nn.Sequential(nn.Linear(5, 6), nn.Tanh(), nn.Linear(6, 3)).to(DT)
        pre = KFACPreconditioner(model, method=method, factor_dtype=DT, inv_dtype=DT, rank=4)
        opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
        g = torch.Generator().manual_seed(1)
        for _ in range(12):
            x = torch.randn(16, 5, generator=g, dtype=DT)
            opt.zero_grad()
            model(x).square().mean().backward()
            pre.step()
            opt.step()
        monkeypatch.undo()
        return [p.detach().clone() for p in model.parameters()]

    fast = run(False)
    assert bool(formed) == (method != "kfac")  # the factor convention formed dense inverses (full-rank factors)
    for a, b in zip(fast, run(True)):
        torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-11)
