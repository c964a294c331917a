"""Embedding and scale-and-shift blocks against dense references; tied embeddings.

* Embedding: ``A = diag(counts)/R`` without ``padding_idx``, ``G = M Σ g gᵀ``;
  one token is exact against the dense Fisher block; the damped inverse
  equals a dense solve with ``diag(a) ⊗ G`` (row-major vec, tokens first).
* LayerNorm / GroupNorm / RMSNorm: per-sample gradients of (γ, β) from
  ``torch.func.vmap(grad)`` give the diagonal and per-channel 2×2
  statistics; BatchNorm against its per-sample contributions ``Σ_p x̂ g``.

float64; ``rtol=1e-9``.
"""

from __future__ import annotations

import logging

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call, grad, vmap

from onlinela_torch import blocks as B
from onlinela_torch.models import TinyCausalLM

DT = torch.float64
TOL = dict(rtol=1e-9, atol=1e-12)
pytestmark = pytest.mark.filterwarnings("ignore:`torch.jit.script` is deprecated:DeprecationWarning")


def make_ctx(**kw):
    return B.BlockContext(factor_dtype=DT, inv_dtype=DT, **kw)


def attached(model, ctx):
    ctx.watch(model)
    bs = B.build_blocks(model, ctx)
    bs.attach()
    return bs


# ---------------------------------------------------------------------------- embedding
def test_embedding_factors_are_token_counts_and_output_gradients_without_padding():
    torch.manual_seed(0)
    emb = nn.Embedding(7, 3, padding_idx=1).to(DT)
    bs = attached(nn.Sequential(emb), make_ctx())
    idx = torch.tensor([[0, 1, 2, 2], [5, 1, 0, 2]])
    out = emb(idx)
    out.retain_grad()
    w = torch.randn(2, 4, 3, dtype=DT)
    (out * w).sum(-1).square().mean().backward()
    bs.update(decompose=True, damping=1e-3, step=0)
    blk = bs.blocks["0"]
    counts = torch.zeros(7, dtype=DT)
    for t in idx.reshape(-1).tolist():
        if t != 1:
            counts[t] += 1
    torch.testing.assert_close(blk.A.snapshot, counts / idx.numel(), **TOL)
    g = out.grad.reshape(-1, 3)[idx.reshape(-1) != 1]
    torch.testing.assert_close(blk.G.state.dense(), idx.numel() * g.T @ g, **TOL)  # mean over M = 8 positions
    assert torch.count_nonzero(emb.weight.grad[1]) == 0


def test_single_token_embedding_block_is_the_dense_fisher():
    torch.manual_seed(1)
    model = nn.Sequential(nn.Embedding(5, 3), nn.Tanh(), nn.Linear(3, 4)).to(DT)
    bs = attached(model, make_ctx())
    x, y = torch.tensor([[3]]), torch.tensor([2])
    F.cross_entropy(model(x).reshape(1, 4), y).backward()
    bs.update(decompose=True, damping=1e-3, step=0)
    bs.detach()
    params = {k: v.detach() for k, v in model.named_parameters()}
    g = grad(lambda p: F.cross_entropy(functional_call(model, p, (x,)).reshape(1, 4), y))(params)["0.weight"]
    v = g.reshape(-1)  # row-major: tokens (A side) first
    blk = bs.blocks["0"]
    torch.testing.assert_close(torch.kron(torch.diag(blk.A.snapshot), blk.G.state.dense()), torch.outer(v, v), **TOL)


@pytest.mark.parametrize("convention", ["product", "factor"])
def test_embedding_precondition_is_the_dense_damped_solve(convention):
    torch.manual_seed(2)
    emb = nn.Embedding(6, 4).to(DT)
    ctx = make_ctx(damping_convention=convention)
    bs = attached(nn.Sequential(emb), ctx)
    idx = torch.randint(0, 5, (8, 3))  # token 5 never seen
    emb(idx).sin().sum(-1).square().mean().backward()
    bs.update(decompose=True, damping=1e-2, step=0)
    blk = bs.blocks["0"]
    a, G = blk.A.snapshot, blk.G.state.dense()
    X = emb.weight.grad
    lam = 1e-2
    if convention == "product":
        K = torch.kron(torch.diag(a), G) + lam * a.max() * torch.linalg.eigvalsh(G).max() * torch.eye(24, dtype=DT)
        ref = torch.linalg.solve(K, X.reshape(-1)).reshape(6, 4)
    else:
        mu = lam**0.5
        ref = (X @ torch.linalg.inv(G + mu * torch.linalg.eigvalsh(G).max() * torch.eye(4, dtype=DT))) / (a + mu * a.max())[:, None]
    new = blk.precondition(lam)[emb.weight]
    torch.testing.assert_close(new, ref, rtol=1e-8, atol=1e-12)
    assert torch.count_nonzero(new[5]) == 0


def test_tied_embedding_is_preconditioned_by_the_output_layer_and_reported(caplog):
    torch.manual_seed(3)
    model = TinyCausalLM(11, d_model=8, n_layers=1, n_heads=2, context=6, tie_weights=True)
    with caplog.at_level(logging.WARNING):
        bs = B.build_blocks(model, B.BlockContext())
    assert bs.shared == [("tok.weight", "head", "tok")]
    assert "tok" not in bs.blocks and model.tok.weight in dict((p, n) for n, p in bs.blocks["head"].params())
    assert "shared by blocks tok (embedding) and head (linear)" in caplog.text
    assert bs.uncovered == []
    untied = B.build_blocks(TinyCausalLM(11, d_model=8, n_layers=1, n_heads=2, context=6), B.BlockContext())
    assert untied.shared == [] and untied.blocks["tok"].kind == "embedding"


def test_unsupported_embedding_options_are_reported():
    for kw, word in ((dict(sparse=True), "sparse"), (dict(scale_grad_by_freq=True), "scale_grad_by_freq")):
        bs = B.build_blocks(nn.Sequential(nn.Embedding(4, 2, **kw)), B.BlockContext())
        assert not bs.blocks and len(bs.uncovered) == 1 and word in bs.uncovered[0].why


# ---------------------------------------------------------------------------- norms
def _norm_case(kind):
    torch.manual_seed(4)
    if kind == "layer":
        return nn.LayerNorm(4).to(DT), torch.randn(3, 5, 4, dtype=DT), 15
    if kind == "rms":
        return nn.RMSNorm(4).to(DT), torch.randn(3, 5, 4, dtype=DT), 15
    return nn.GroupNorm(2, 4).to(DT), torch.randn(3, 4, 2, 3, dtype=DT), 3


@pytest.mark.parametrize("kind", ["layer", "rms", "group"])
@pytest.mark.parametrize("mode", ["diagonal", "full"])
@pytest.mark.parametrize("reduction", ["mean", "sum"])
def test_norm_statistics_are_the_per_sample_gradient_second_moments(kind, mode, reduction):
    norm, x, M = _norm_case(kind)
    with torch.no_grad():
        norm.weight.normal_()
        if getattr(norm, "bias", None) is not None:
            norm.bias.normal_()
    target = torch.randn_like(x)
    ctx = make_ctx(loss_reduction=reduction)
    ctx.watch(norm)
    blk = B.ScaleShiftBlock("n", norm, ctx, mode=mode)
    blk.attach()
    red = (lambda t: t.sum() / M) if reduction == "mean" else (lambda t: t.sum())
    loss_terms = lambda out: ((out - target) ** 2 * torch.cos(out)).reshape(out.shape[0], -1, 1)  # noqa: E731
    red(loss_terms(norm(x))).backward()
    blk.update(decompose=True, damping=1e-3, step=0)
    blk.detach()
    params = {k: v.detach() for k, v in norm.named_parameters()}

    def per_sample(p, xi, ti):  # the sample's share of the loss, with the same reduction
        out = functional_call(norm, p, (xi[None],))
        return red(((out - ti[None]) ** 2 * torch.cos(out)))

    g = vmap(grad(per_sample), in_dims=(None, 0, 0))(params, x, target)
    S = torch.stack([g["weight"].reshape(x.shape[0], -1)] + ([g["bias"].reshape(x.shape[0], -1)] if "bias" in g else []), -1)
    scale = M if reduction == "mean" else 1.0 / M
    has_bias = "bias" in g
    if mode == "full" and has_bias:
        ref = scale * torch.einsum("nci,ncj->cij", S, S)
    else:
        ref = scale * S.square().sum(0).T
    torch.testing.assert_close(blk.stat.snapshot, ref, **TOL)
    assert blk.mode == (mode if has_bias else "diagonal")


def test_batchnorm_statistics_use_the_batch_normalised_input():
    torch.manual_seed(5)
    bn = nn.BatchNorm2d(3).to(DT)
    ctx = make_ctx()
    ctx.watch(bn)
    blk = B.ScaleShiftBlock("bn", bn, ctx)
    blk.attach()
    x = torch.randn(4, 3, 2, 2, dtype=DT)
    out = bn(x)
    out.retain_grad()
    out.sin().mean().backward()
    blk.update(decompose=True, damping=1e-3, step=0)
    xh = (x - x.mean((0, 2, 3), keepdim=True)) / (x.var((0, 2, 3), unbiased=False, keepdim=True) + bn.eps).sqrt()
    s_g = (xh * out.grad).sum((2, 3))
    s_b = out.grad.sum((2, 3))
    torch.testing.assert_close(s_g.sum(0), bn.weight.grad, **TOL)  # contributions add up to the gradient
    torch.testing.assert_close(blk.stat.snapshot, 4 * torch.stack([s_g.square().sum(0), s_b.square().sum(0)]), **TOL)


@pytest.mark.parametrize("mode", ["diagonal", "full"])
def test_norm_precondition_solves_with_the_damped_statistics(mode):
    norm, x, _ = _norm_case("layer")
    blk = B.ScaleShiftBlock("n", norm, make_ctx(), mode=mode)
    blk.attach()
    norm(x).sin().square().mean().backward()
    assert blk.precondition(0.1)[norm.weight] is norm.weight.grad  # before the first update: unchanged
    blk.update(decompose=True, damping=0.1, step=0)
    new = blk.precondition(0.1)
    Fs = blk.stat.snapshot
    g = torch.stack([norm.weight.grad, norm.bias.grad])
    if mode == "diagonal":
        ref = g / (Fs + 0.1 * Fs.max())
    else:
        mu = 0.1 * torch.linalg.eigvalsh(Fs).max()
        ref = torch.stack([torch.linalg.solve(Fs[c] + mu * torch.eye(2, dtype=DT), g[:, c]) for c in range(4)], 1)
    torch.testing.assert_close(torch.stack([new[norm.weight], new[norm.bias]]), ref, **TOL)


def test_norm_without_affine_parameters_gets_no_block_and_no_report():
    bs = B.build_blocks(nn.Sequential(nn.LayerNorm(3, elementwise_affine=False), nn.BatchNorm1d(3, affine=False)), B.BlockContext())
    assert not bs.blocks and not bs.uncovered
