"""nn.MultiheadAttention block: the swapped forward equals torch's, and its factors match their definitions.

Equality with the original module is checked in float64 to round-off
(``atol=1e-12`` on O(1) outputs) for ``batch_first`` both ways, unbatched
inputs, bool/float masks, ``is_causal``, ``need_weights``, separate
``kdim``/``vdim``, ``bias_k``/``bias_v`` and ``add_zero_attn``; dropout under
the same seed.  The factors are checked on one sequence against an
independent functional attention written here with ``torch.autograd``:
``A_P`` is the mean of the projection's input rows ``[x; 1][x; 1]ᵀ`` and ``G_P = M Σ_t δ_t δ_tᵀ``
with ``δ_t`` the gradient of the loss at the projection's output.
"""

from __future__ import annotations

import copy
import itertools
import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from onlinela_torch import blocks as B

DT = torch.float64
TOL = dict(rtol=1e-10, atol=1e-12)


def make_ctx(**kw):
    return B.BlockContext(factor_dtype=DT, inv_dtype=DT, **kw)


CASES = list(itertools.product([True, False], [True, False], [None, (5, 7)], [True, False], ["none", "causal", "padding", "both"]))


@pytest.mark.parametrize("batch_first,bias,kv,need_weights,masks", CASES[::3] + [(True, True, None, False, "causal")])
def test_forward_and_gradients_equal_torch(batch_first, bias, kv, need_weights, masks):
    torch.manual_seed(0)
    E, H, N, L = 8, 2, 3, 4
    kw = {} if kv is None else dict(kdim=kv[0], vdim=kv[1])
    m = nn.MultiheadAttention(E, H, bias=bias, batch_first=batch_first, **kw).to(DT)
    ref = copy.deepcopy(m)
    blk = B.block_for("attn", m, make_ctx())
    blk.attach()

    def shape(n, l_, e):
        return (n, l_, e) if batch_first else (l_, n, e)

    q = torch.randn(shape(N, L, E), dtype=DT)
    k = v = q if kv is None else None
    if kv is not None:
        k, v = torch.randn(shape(N, L, kv[0]), dtype=DT), torch.randn(shape(N, L, kv[1]), dtype=DT)
    causal = masks in ("causal", "both")
    am = nn.Transformer.generate_square_subsequent_mask(L, dtype=DT) if causal else None
    pm = None
    if masks in ("padding", "both"):
        pm = torch.zeros(N, L, dtype=torch.bool)
        pm[0, -1] = pm[2, -2:] = True
        if am is not None:  # same mask types: float
            pm = torch.zeros(N, L, dtype=DT).masked_fill(pm, float("-inf"))
    args = dict(key_padding_mask=pm, attn_mask=am, need_weights=need_weights, is_causal=causal)
    o1, w1 = m(q, k, v, **args)
    o2, w2 = ref(q, k, v, **args)
    torch.testing.assert_close(o1, o2, **TOL)
    assert (w1 is None) == (w2 is None)
    if w1 is not None:
        torch.testing.assert_close(w1, w2, **TOL)
    gout = torch.randn_like(o1)
    (o1 * gout).sum().backward()
    (o2 * gout).sum().backward()
    for (name, p1), (_, p2) in zip(m.named_parameters(), ref.named_parameters()):
        torch.testing.assert_close(p1.grad, p2.grad, rtol=1e-10, atol=1e-11, msg=name)
    assert sum(f.A.rows for f in blk.factors.values()) > 0
    blk.detach()
    assert "forward" not in m.__dict__


@pytest.mark.parametrize("extra", [dict(add_bias_kv=True), dict(add_zero_attn=True), dict(add_bias_kv=True, add_zero_attn=True)])
def test_bias_kv_zero_attn_and_unbatched_inputs_equal_torch(extra):
    torch.manual_seed(1)
    m = nn.MultiheadAttention(6, 3, **extra).to(DT)
    ref = copy.deepcopy(m)
    B.block_for("a", m, make_ctx()).attach()
    x = torch.randn(5, 6, dtype=DT)  # unbatched (L, E)
    am = torch.triu(torch.ones(5, 5, dtype=torch.bool), 1)
    for nw in (True, False):
        torch.testing.assert_close(m(x, x, x, attn_mask=am, need_weights=nw)[0], ref(x, x, x, attn_mask=am, need_weights=nw)[0], **TOL)


@pytest.mark.parametrize("need_weights", [True, False])
def test_dropout_draws_the_same_random_numbers_as_torch(need_weights):
    torch.manual_seed(2)
    m = nn.MultiheadAttention(8, 2, dropout=0.3, batch_first=True).to(DT)
    ref = copy.deepcopy(m)
    B.block_for("a", m, make_ctx()).attach()
    x = torch.randn(2, 6, 8, dtype=DT)
    torch.manual_seed(5)
    o1 = m(x, x, x, need_weights=need_weights)[0]
    torch.manual_seed(5)
    o2 = ref(x, x, x, need_weights=need_weights)[0]
    torch.testing.assert_close(o1, o2, **TOL)
    assert not torch.allclose(o1, m.eval()(x, x, x)[0])  # dropout did act


def _encoder_layers():
    torch.manual_seed(3)
    enc = nn.TransformerEncoderLayer(8, 2, dim_feedforward=16, dropout=0.0, batch_first=True, norm_first=True).to(DT)
    dec = nn.TransformerDecoderLayer(8, 2, dim_feedforward=16, dropout=0.0, batch_first=False).to(DT)
    return enc, dec


def test_inside_encoder_and_decoder_layers_training_takes_the_hooked_path():
    enc, dec = _encoder_layers()
    refs = copy.deepcopy(enc), copy.deepcopy(dec)
    ctx = make_ctx()
    blocks = {}
    for tag, layer in (("enc", enc), ("dec", dec)):
        bs = B.build_blocks(layer, ctx)
        bs.attach()
        blocks[tag] = bs
    assert {"self_attn"} <= set(blocks["enc"].blocks) and {"self_attn", "multihead_attn"} <= set(blocks["dec"].blocks)
    assert "self_attn.out_proj" not in blocks["enc"].blocks  # covered by the attention block
    x = torch.randn(2, 5, 8, dtype=DT)
    mem = torch.randn(4, 2, 8, dtype=DT)
    mask = nn.Transformer.generate_square_subsequent_mask(5, dtype=DT)
    torch.testing.assert_close(enc(x, src_mask=mask, is_causal=True), refs[0](x, src_mask=mask, is_causal=True), **TOL)
    tgt = x.transpose(0, 1)
    torch.testing.assert_close(dec(tgt, mem, tgt_mask=mask, tgt_is_causal=True), refs[1](tgt, mem, tgt_mask=mask, tgt_is_causal=True), **TOL)
    assert blocks["enc"].blocks["self_attn"].factors["out"].A.rows == 10
    cross = blocks["dec"].blocks["multihead_attn"].factors
    assert cross["q"].A.rows == 10 and cross["k"].A.rows == 8  # key/value rows from the memory


def test_eval_and_no_grad_do_not_capture_and_keep_torch_results():
    enc, _ = _encoder_layers()
    ref = copy.deepcopy(enc).eval()
    bs = B.build_blocks(enc, make_ctx())
    bs.attach()
    enc.eval()
    x = torch.randn(2, 5, 8, dtype=DT)
    with torch.no_grad():  # the encoder layer may take its fused fast path: same function, other kernels
        torch.testing.assert_close(enc(x), ref(x), rtol=1e-9, atol=1e-10)
    enc.train()
    with torch.no_grad():
        enc(x)
    assert all(f.A.rows == 0 for f in bs.blocks["self_attn"].factors.values())


def _functional_attention(x, W, b, Wo, bo, H, mask):
    """Self-attention written from its definition; returns the output and the projection outputs (retained)."""
    L, E = x.shape
    hd = E // H
    projs = [x @ W[i * E : (i + 1) * E].T + b[i * E : (i + 1) * E] for i in range(3)]
    for p in projs:
        p.retain_grad()
    q, k, v = (p.reshape(L, H, hd).transpose(0, 1) for p in projs)
    att = torch.softmax(q @ k.transpose(1, 2) / math.sqrt(hd) + mask, -1)
    heads = (att @ v).transpose(0, 1).reshape(L, E)
    heads.retain_grad()
    out = heads @ Wo.T + bo
    out.retain_grad()
    return out, projs, heads


@pytest.mark.parametrize("mode", ["expand", "reduce"])
def test_factors_match_an_independent_attention_on_one_sequence(mode):
    torch.manual_seed(4)
    E, H, L = 6, 2, 5
    m = nn.MultiheadAttention(E, H, batch_first=True).to(DT)
    ctx = make_ctx()
    ctx.watch(m)
    blk = B.MultiheadAttentionBlock("a", m, ctx, mode=mode)
    blk.attach()
    x = torch.randn(1, L, E, dtype=DT)
    mask = nn.Transformer.generate_square_subsequent_mask(L, dtype=DT)
    y = torch.randn(1, L, E, dtype=DT)
    loss_fn = lambda o: ((o - y) ** 2).sum(-1).mean()  # noqa: E731  mean over M = L positions
    loss_fn(m(x, x, x, attn_mask=mask, need_weights=False, is_causal=True)[0]).backward()
    blk.update(decompose=True, damping=1e-3, step=0)
    W, b = m.in_proj_weight.detach().clone().requires_grad_(), m.in_proj_bias.detach()
    out, projs, heads = _functional_attention(x[0], W, b, m.out_proj.weight.detach(), m.out_proj.bias.detach(), H, mask)
    loss_fn(out[None]).backward()
    ones = torch.ones(L, 1, dtype=DT)
    inputs = {"q": x[0], "k": x[0], "v": x[0], "out": heads.detach()}
    deltas = {"q": projs[0].grad, "k": projs[1].grad, "v": projs[2].grad, "out": out.grad}
    for p in ("q", "k", "v", "out"):
        a = torch.cat([inputs[p], ones], 1)
        f = blk.factors[p]
        if mode == "expand":
            torch.testing.assert_close(f.A.state.dense(), a.T @ a / L, **TOL)
            torch.testing.assert_close(f.G.state.dense(), L * deltas[p].T @ deltas[p], **TOL)
        else:  # one sample: the mean input row and the summed output gradient
            abar, dsum = a.mean(0), deltas[p].sum(0)
            torch.testing.assert_close(f.A.state.dense(), torch.outer(abar, abar), **TOL)
            torch.testing.assert_close(f.G.state.dense(), L * torch.outer(dsum, dsum), **TOL)
        # the captured rows rebuild this projection's gradient slice: Σ_t δ_t āᵀ
        rows = slice(None) if p == "out" else slice("qkv".index(p) * E, ("qkv".index(p) + 1) * E)
        gw = m.out_proj.weight.grad if p == "out" else m.in_proj_weight.grad[rows]
        torch.testing.assert_close((deltas[p].T @ a)[:, :E], gw, **TOL)


@pytest.mark.parametrize("convention", ["product", "factor"])
def test_precondition_applies_each_projection_to_its_slice(convention):
    torch.manual_seed(5)
    m = nn.MultiheadAttention(4, 2, batch_first=True).to(DT)
    ctx = make_ctx(damping_convention=convention)
    blk = B.block_for("a", m, ctx)
    blk.attach()
    x = torch.randn(3, 6, 4, dtype=DT)
    m(x, x, x)[0].square().mean().backward()
    blk.update(decompose=True, damping=1e-2, step=0)
    new = blk.precondition(1e-2)
    assert set(new) == {p for _, p in blk.params()}
    for i, p in enumerate("qkv"):
        sl = slice(4 * i, 4 * i + 4)
        X = torch.cat([m.in_proj_weight.grad[sl], m.in_proj_bias.grad[sl, None]], 1)
        ref = blk.factors[p].apply(X, 1e-2)
        torch.testing.assert_close(torch.cat([new[m.in_proj_weight][sl], new[m.in_proj_bias][sl, None]], 1), ref, **TOL)
        assert not torch.allclose(ref, X)
    X = torch.cat([m.out_proj.weight.grad, m.out_proj.bias.grad[:, None]], 1)
    torch.testing.assert_close(torch.cat([new[m.out_proj.weight], new[m.out_proj.bias][:, None]], 1), blk.factors["out"].apply(X, 1e-2), **TOL)


def test_state_dict_round_trip_and_shape_check():
    torch.manual_seed(6)
    m = nn.MultiheadAttention(4, 2).to(DT)
    blk = B.block_for("a", m, make_ctx())
    blk.attach()
    x = torch.randn(5, 2, 4, dtype=DT)
    m(x, x, x)[0].sum().backward()
    blk.update(decompose=True, damping=1e-3, step=0)
    other = B.block_for("a", nn.MultiheadAttention(4, 2).to(DT), make_ctx())
    other.load_state_dict(blk.state_dict())
    torch.testing.assert_close(other.factors["v"].G.state.dense(), blk.factors["v"].G.state.dense(), rtol=0, atol=0)
    wide = B.block_for("a", nn.MultiheadAttention(6, 2).to(DT), make_ctx())
    with pytest.raises(ValueError, match="block 'a'"):
        wide.load_state_dict(blk.state_dict())
