"""The Brand-eligibility cost model (``onlinela_torch.brand_cost``) and its use by the preconditioner.

The model's penalties are fitted by ``benchmarks/brand_cost.py`` (timings live
there, never here); these tests check the model's structure — the necessary
``r + s < d`` condition, monotonicity in every period and in the batch, the
flop terms against direct counts — and that the preconditioner picks, counts
and logs the strategy it says.
"""

from __future__ import annotations

import logging

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

from onlinela_torch import BrandConfig, BrandCostModel, KFACPreconditioner
from onlinela_torch import factory
from onlinela_torch.brand_cost import brand_terms, ea_flops, randomized_terms

dims = st.integers(16, 20000)
ranks = st.integers(1, 400)
rows = st.integers(1, 1024)
periods = st.integers(1, 200)
penalty = st.floats(1.0, 20.0)


def _pays(model, d, r, s, t_b=10, t_u=10, t_i=50, keeps_dense=False):
    return model.pays(d, r, s, t_brand=t_b, t_updt=t_u, t_inv=t_i, oversample=10, n_iter=3, keeps_dense=keeps_dense)


@settings(max_examples=200, deadline=None)
@given(d=dims, r=ranks, s=rows, e=penalty, q=penalty, a=penalty)
def test_brand_never_pays_when_the_update_does_not_reduce_the_dimension(d, r, s, e, q, a):
    model = BrandCostModel(eigh_penalty=e, qr_penalty=q, ea_penalty=a)
    if r + s >= d:
        assert not _pays(model, d, r, s)


@settings(max_examples=200, deadline=None)
@given(d=dims, r=ranks, s=rows, t_b=periods, t_i=periods, extra=st.integers(1, 100))
def test_the_choice_is_monotone_in_the_periods(d, r, s, t_b, t_i, extra):
    """Rarer Brand updates only help Brand; rarer decompositions only help the fallback."""
    model = BrandCostModel()
    if _pays(model, d, r, s, t_b=t_b, t_i=t_i):
        assert _pays(model, d, r, s, t_b=t_b + extra, t_i=t_i)
    if not _pays(model, d, r, s, t_b=t_b, t_i=t_i):
        assert not _pays(model, d, r, s, t_b=t_b, t_i=t_i + extra)


@settings(max_examples=200, deadline=None)
@given(d=dims, r=ranks, s=rows, e=penalty)
def test_a_costlier_eigh_never_turns_the_choice_to_brand(d, r, s, e):
    if not _pays(BrandCostModel(eigh_penalty=e), d, r, s):
        assert not _pays(BrandCostModel(eigh_penalty=e + 1.0), d, r, s)


@settings(max_examples=100, deadline=None)
@given(d=dims, r=ranks, s=rows)
def test_keeping_the_dense_ea_only_removes_its_cost_from_the_fallback(d, r, s):
    model = BrandCostModel()
    kw = dict(t_updt=10, t_inv=50, oversample=10, n_iter=3)
    full = model.fallback_step(d, r, s, **kw)
    kept = model.fallback_step(d, r, s, keeps_dense=True, **kw)
    assert full - kept == pytest.approx(model.ea_penalty * ea_flops(d, s) / 10, rel=1e-12)


def test_flop_terms_count_the_kernels():
    d, r, s, k = 100, 7, 3, 10
    gemm, small = brand_terms(d, r, s)
    # UᵀX, X - UP: 2drs each; residual Gram + orthogonality check 2ds(r + 2s); rotation [U Q] W: 2d(r+s)²
    assert gemm == 2 * d * r * s * 2 + 2 * d * s * (r + 2 * s) + 2 * d * k * k
    assert small == 9 * (k**3 + s**3)
    assert ea_flops(d, s) == 2 * d * d * s + 2 * d * d
    g, q = randomized_terms(d, 20, oversample=5, n_iter=2)  # k = 25 columns, 6 products, 6 QRs + one SVD
    assert g == 2 * d * d * 25 * 6 and q == 4 * d * 25 * 25 * 6 + 9 * 25**3
    assert randomized_terms(30, 28, oversample=10, n_iter=0)[0] == 2 * 30 * 30 * 30 * 2  # k capped at d


def test_the_papers_regimes():
    """Wide factors with small increments pay (the B-KFAC papers' d ≈ 16k); d ≈ 1000 with s = 256 does not."""
    model = BrandCostModel()
    assert _pays(model, 16385, 220, 32)
    assert _pays(model, 4096, 64, 128)
    assert not _pays(model, 1025, 220, 256)


@pytest.mark.parametrize("name", ["eigh_penalty", "qr_penalty", "ea_penalty", "margin"])
@pytest.mark.parametrize("bad", [0.5, -1.0, float("nan"), "3", True])
def test_penalties_are_validated(name, bad):
    with pytest.raises(ValueError, match=name):
        BrandCostModel(**{name: bad})


def test_brand_config_rejects_a_non_model():
    with pytest.raises(TypeError, match="brand.cost"):
        BrandConfig(cost=3.0)


def _precond(width: int, batch: int, **brand):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(width, 8), nn.Tanh(), nn.Linear(8, 3))
    pre = KFACPreconditioner(model, method="b-kfac", rank=64, brand=BrandConfig(**brand))
    x = torch.randn(batch, width)
    F.cross_entropy(model(x), torch.randint(0, 3, (batch,))).backward()
    pre.step()
    return pre


def test_the_preconditioner_keeps_each_factor_by_the_cheaper_strategy(caplog, monkeypatch):
    # A of layer "0": d = 1025, r = 64, s = 512: r + s < d, but the Brand update costs more per step
    monkeypatch.setattr(factory, "_REPORTED", set())  # as in a fresh process: the first fallback is at INFO
    with caplog.at_level(logging.INFO, logger="onlinela_torch.preconditioner"):
        pre = _precond(1024, 512)
    assert pre.layers["0"].A.kind == "randomized"
    counts = pre.stats()["brand"]
    assert counts["randomized_cost"] >= 1 and counts["randomized_rank"] >= 1  # the 8- and 9-dimensional factors
    assert sum(counts.values()) == 4
    info = [r for r in caplog.records if r.levelno == logging.INFO and "kept by randomized" in r.getMessage()]
    assert len(info) == 2 and any("costs more per step" in r.getMessage() for r in info)  # once per reason
    caplog.clear()
    with caplog.at_level(logging.INFO, logger="onlinela_torch.preconditioner"):
        _precond(1024, 512)  # the same fallbacks again: counted, not logged at INFO
    assert not [r for r in caplog.records if "kept by randomized" in r.getMessage()]
    # the papers' rule keeps it by Brand updates
    assert _precond(1024, 512, cost=None).layers["0"].A.kind == "brand"
    # few rows per update: Brand pays
    wide = _precond(4096, 32)
    assert wide.layers["0"].A.kind == "brand" and wide.stats()["brand"]["brand"] == 1


def test_the_brand_counts_describe_the_restored_factors():
    pre = _precond(4096, 32)
    state = pre.state_dict()
    assert pre.stats()["brand"] == {"brand": 1, "randomized_rank": 3}
    pre.load_state_dict(state)  # the same preconditioner: counts are not doubled
    assert pre.stats()["brand"] == {"brand": 1, "randomized_restored": 3}
    fresh = _precond(4096, 32)
    fresh.load_state_dict(state)
    assert fresh.stats()["brand"] == {"brand": 1, "randomized_restored": 3}


def test_block_factors_of_a_distributed_preconditioner_keep_the_dense_ea():
    """Averaged block statistics are Grams: where a Brand update would pay, a block factor runs randomized instead."""
    pre = _precond(64, 8)
    maker = pre._factors
    before = dict(pre.stats()["brand"])
    assert maker.for_block(4096, "wide/G", rows=8, device=torch.device("cpu")).kind == "brand"  # single process
    maker.dense_blocks = True  # what DistributedKFACPreconditioner sets
    assert maker.for_block(4096, "wide/G", rows=8, device=torch.device("cpu")).kind == "randomized"
    after = pre.stats()["brand"]
    assert after["brand"] == before.get("brand", 0) + 1 and after["randomized_distributed"] == 1


@settings(max_examples=100, deadline=None)
@given(d=dims, r=ranks, s=rows)
def test_an_exact_fallback_is_priced_as_a_dense_eigh(d, r, s):
    model = BrandCostModel()
    kw = dict(t_updt=10, t_inv=50, oversample=10, n_iter=3)
    exact = model.fallback_step(d, r, s, exact=True, **kw)
    ea = model.ea_penalty * ea_flops(d, s) / 10
    assert exact - ea == pytest.approx(model.eigh_penalty * 9.0 * d**3 / 50, rel=1e-12)


def test_a_distributed_preconditioner_refuses_a_saved_brand_block_factor():
    maker = _precond(64, 8)._factors
    maker.dense_blocks = True
    with pytest.raises(ValueError, match="Brand state"):
        maker.for_block(4096, "wide/G", rows=8, device=torch.device("cpu"), kind="brand")
