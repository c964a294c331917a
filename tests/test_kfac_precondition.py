"""Preconditioned gradients against dense Kronecker references (algorithms.md §1, §7.5, §7.8).

``kfac`` with both damping conventions, the low-rank complement formulas of
:func:`onlinela_torch.apply_inverse`, randomized and Brand methods at full
rank, the thin-factor (low-rank gradient) path and its fall-back, and the
descent property ``<v, g> > 0`` of every method.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from onlinela import LowRankPSD
from onlinela_torch import FactorEigen, KFACPreconditioner, apply_inverse
from onlinela_torch.preconditioner import METHODS


DT = torch.float64


def _dense(e: FactorEigen, complement: str) -> torch.Tensor:
    U, w = e.approx.eigvecs, e.approx.eigvals
    c = e.min_eig if (complement == "min" and e.approx.rank < e.approx.dim) else 0.0
    return (U * w) @ U.T + c * (torch.eye(U.shape[0], dtype=U.dtype) - U @ U.T)


def _kron_reference(G: torch.Tensor, A: torch.Tensor, X: torch.Tensor, lam: float, convention: str, gmax, amax):
    if convention == "product":
        K = torch.kron(A, G) + lam * gmax * amax * torch.eye(A.shape[0] * G.shape[0], dtype=A.dtype)
        return torch.linalg.solve(K, X.T.reshape(-1)).reshape(A.shape[0], G.shape[0]).T
    # per-factor: mu_X = sqrt(lam) * max eig X (the same floor lam * max A * max G as the product convention)
    iG = torch.linalg.inv(G + lam**0.5 * gmax * torch.eye(G.shape[0], dtype=G.dtype))
    iA = torch.linalg.inv(A + lam**0.5 * amax * torch.eye(A.shape[0], dtype=A.dtype))
    return iG @ X @ iA


def _random_eigen(d: int, r: int, seed: int) -> FactorEigen:
    g = torch.Generator().manual_seed(seed)
    U = torch.linalg.qr(torch.randn(d, d, generator=g, dtype=DT))[0][:, :r]
    w = torch.sort(torch.rand(r, generator=g, dtype=DT) * 3 + 0.05, descending=True).values
    return FactorEigen(LowRankPSD(U, w), float(w[0]), float(w[-1]))


@pytest.mark.parametrize("convention", ["product", "factor"])
@pytest.mark.parametrize("complement", ["zero", "min"])
@pytest.mark.parametrize("ranks", [(6, 5), (3, 5), (6, 2), (4, 3)])
def test_apply_inverse_matches_dense_kronecker_solve(convention, complement, ranks):
    dG, dA = 6, 5
    G, A = _random_eigen(dG, ranks[0], 1), _random_eigen(dA, ranks[1], 2)
    X = torch.randn(dG, dA, dtype=DT, generator=torch.Generator().manual_seed(3))
    lam = 0.03
    got = apply_inverse(G, A, X, lam, convention, complement)
    ref = _kron_reference(_dense(G, complement), _dense(A, complement), X, lam, convention, G.max_eig, A.max_eig)
    torch.testing.assert_close(got, ref, rtol=1e-10, atol=1e-10)


def _mlp(seed=0, widths=(6, 9, 7, 4)):
    torch.manual_seed(seed)
    layers = []
    for i, (a, b) in enumerate(zip(widths[:-1], widths[1:])):
        layers += [nn.Linear(a, b)] + ([nn.Tanh()] if i < len(widths) - 2 else [])
    return nn.Sequential(*layers).to(DT)


def _opts(**kw):
    o = dict(factor_update_freq=1, inv_update_freq=1, kl_clip=None, factor_dtype=DT, inv_dtype=DT, damping=0.02,
             graft=None)  # the exact damped inverse, unscaled
    o.update(kw)
    return o


@pytest.mark.parametrize("convention", ["product", "factor"])
def test_kfac_step_equals_kronecker_reference(convention):
    model = _mlp()
    pre = KFACPreconditioner(model, method="kfac", damping_convention=convention, factor_decay=0.7, **_opts())
    for step in range(3):  # the EA mixes three batches
        model.zero_grad()
        x, y = torch.randn(10, 6, dtype=DT), torch.randint(0, 4, (10,))
        F.cross_entropy(model(x), y).backward()
        grads = {n: l.helper.grad_matrix().clone() for n, l in pre.layers.items()}
        pre.step()
    for name, layer in pre.layers.items():
        A, G = layer.A.dense(), layer.G.dense()
        amax, gmax = torch.linalg.eigvalsh(A).max(), torch.linalg.eigvalsh(G).max()
        ref = _kron_reference(G, A, grads[name], 0.02, convention, gmax, amax)
        torch.testing.assert_close(layer.helper.grad_matrix(), ref, rtol=1e-9, atol=1e-11)


@pytest.mark.parametrize("method", ["rs-kfac", "sre-kfac", "nystrom-kfac"])
def test_randomized_methods_exact_on_low_rank_factors(method):
    # one batch of 5 rows: every factor has rank <= 5 < r = 8 < d - l, so the sketch is exact; the A factors
    # (d = 61, 49) are wide enough that the sketch is cheaper than eigh (factors.exact_is_cheaper), so it runs
    model = _mlp(widths=(60, 48, 20))
    pre = KFACPreconditioner(model, method=method, rank=8, oversample=4, complement="zero", **_opts())
    x, y = torch.randn(5, 60, dtype=DT), torch.randint(0, 20, (5,))
    F.cross_entropy(model(x), y).backward()
    grads = {n: l.helper.grad_matrix().clone() for n, l in pre.layers.items()}
    pre.step()
    for name, layer in pre.layers.items():
        assert layer.A.kind == "randomized" and layer.A.eigen.approx.rank == 8  # the low-rank path ran
        A, G = layer.A.dense(), layer.G.dense()
        ref = _kron_reference(G, A, grads[name], 0.02, "factor", torch.linalg.eigvalsh(G).max(), torch.linalg.eigvalsh(A).max())
        torch.testing.assert_close(layer.helper.grad_matrix(), ref, rtol=1e-8, atol=1e-9)


def _run_fixed_params(model, method, batches, **kw):
    """Preconditioned grads of the last batch; parameters are never updated."""
    pre = KFACPreconditioner(model, method=method, **_opts(**kw))
    for x, y in batches:
        model.zero_grad()
        F.cross_entropy(model(x), y).backward()
        pre.step()
    out = {n: l.helper.grad_matrix().clone() for n, l in pre.layers.items()}
    pre.remove_hooks()
    return out, pre


@pytest.mark.parametrize("method", ["b-kfac", "br-kfac", "b-kfac-c"])
@pytest.mark.parametrize("low_rank_grad", [True, False])
def test_brand_methods_at_full_rank_equal_per_factor_kfac(method, low_rank_grad):
    # d = 40 factors, 4 rows per step, r = 30: Brand-eligible (r + s < d); 3 updates reach rank 12 <= r
    model = _mlp(widths=(39, 40, 40))
    gen = torch.Generator().manual_seed(5)
    batches = [(torch.randn(4, 39, dtype=DT, generator=gen), torch.randint(0, 40, (4,), generator=gen)) for _ in range(3)]
    ref, _ = _run_fixed_params(model, "kfac", batches, damping_convention="factor", factor_decay=0.8)
    got, pre = _run_fixed_params(
        model, method, batches, rank=30, complement="zero", factor_decay=0.8, low_rank_grad=low_rank_grad
    )
    for name, layer in pre.layers.items():
        assert layer.A.kind in ("brand", "brand+dense") and layer.G.kind in ("brand", "brand+dense")
        assert layer.counters["low_rank_grad"] == (3 if low_rank_grad else 0)
        torch.testing.assert_close(got[name], ref[name], rtol=1e-8, atol=1e-9)


def test_low_rank_grad_falls_back_when_gradient_is_not_the_batch_gradient():
    model = _mlp(widths=(39, 40, 40))
    pre = KFACPreconditioner(model, method="b-kfac", **_opts(rank=30))
    x, y = torch.randn(4, 39, dtype=DT), torch.randint(0, 40, (4,))
    F.cross_entropy(model(x), y).backward()
    pre.step()
    assert pre.layers["0"].counters["low_rank_grad"] == 1
    # weight decay folded into the gradient: the thin factors no longer describe it
    model.zero_grad()
    F.cross_entropy(model(x), y).backward()
    for p in model.parameters():
        p.grad.add_(p, alpha=1e-2)
    expected = pre.precondition({n: l.helper.grad_matrix() for n, l in pre.layers.items()})
    pre.step()
    assert pre.layers["0"].counters["low_rank_grad_fallback"] == 1
    for name, layer in pre.layers.items():
        torch.testing.assert_close(layer.helper.grad_matrix(), expected[name], rtol=1e-9, atol=1e-11)
    # no zero_grad(): the new batch gradient lands on top of the previous step's direction
    F.cross_entropy(model(x), y).backward()
    pre.step()
    assert pre.layers["0"].counters["low_rank_grad_fallback"] == 2
    # two captured micro-batches accumulated: still the plain gradient, thin path used
    model.zero_grad()
    for part in (slice(0, 2), slice(2, 4)):
        (F.cross_entropy(model(x[part]), y[part]) / 2).backward()
    pre.step()
    assert pre.layers["0"].counters["low_rank_grad"] == 2


@pytest.mark.parametrize("method", METHODS)
def test_preconditioned_direction_is_a_descent_direction(method):
    model = _mlp(widths=(12, 32, 16, 5)).float()
    pre = KFACPreconditioner(model, method=method, rank=6, oversample=2, factor_update_freq=1, inv_update_freq=2)
    for _ in range(4):
        model.zero_grad()
        x, y = torch.randn(8, 12), torch.randint(0, 5, (8,))
        F.cross_entropy(model(x), y).backward()
        g = [p.grad.clone() for p in model.parameters()]
        assert pre.step()
        inner = sum(float((p.grad * gi).sum()) for p, gi in zip(model.parameters(), g))
        assert inner > 0
        assert np.isfinite(inner)


@pytest.mark.parametrize("method", METHODS)
def test_conv_net_steps_are_finite_descent_directions(method):
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Conv2d(1, 4, 3, padding=1), nn.ReLU(), nn.Conv2d(4, 6, 3, stride=2), nn.ReLU(), nn.Flatten(), nn.Linear(6 * 3 * 3, 5)
    )
    pre = KFACPreconditioner(model, method=method, rank=8, oversample=2, factor_update_freq=1, inv_update_freq=2)
    for _ in range(3):
        model.zero_grad()
        x, y = torch.randn(4, 1, 8, 8), torch.randint(0, 5, (4,))
        F.cross_entropy(model(x), y).backward()
        g = [p.grad.clone() for p in model.parameters()]
        assert pre.step()
        assert all(torch.isfinite(p.grad).all() for p in model.parameters())
        assert sum(float((p.grad * gi).sum()) for p, gi in zip(model.parameters(), g)) > 0
    assert pre.layers["0"].A.kind in ("dense", "randomized")  # conv increments are too wide for Brand
