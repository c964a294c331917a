"""Kronecker curvature blocks (Linear expand/reduce, Conv1d, Conv2d) against dense torch.func references.

The recipe of "KFAC From Scratch" (Dangel et al. 2025; algorithms.md §7.10):

* one data point: the empirical-Fisher and exact-Fisher (GGN) blocks, computed
  densely with ``torch.func``, equal ``A ⊗ G`` exactly;
* K-FAC-expand on sequences is exact for a position-wise deep linear network
  with a square loss (Eschenhagen et al. 2023), over a whole batch;
* K-FAC-reduce is exact for one sequence through a linear weight-sharing
  layer followed by a mean over positions, where expand is not;
* weight sharing, gradient accumulation, the damped inverses and checkpoints.

All in float64; tolerances ``rtol=1e-9`` (a few hundred ulps of the O(1)
entries after ~10 accumulated products).
"""

from __future__ import annotations

import logging

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call, grad, hessian, jacrev

from onlinela_torch import blocks as B
from onlinela_torch.factors import RandomizedFactor, as_rank_policy

DT = torch.float64
TOL = dict(rtol=1e-9, atol=1e-12)
pytestmark = pytest.mark.filterwarnings("ignore:`torch.jit.script` is deprecated:DeprecationWarning")


def make_ctx(**kw) -> B.BlockContext:
    opts = dict(factor_dtype=DT, inv_dtype=DT)
    opts.update(kw)
    return B.BlockContext(**opts)


def attach(model: nn.Module, ctx: B.BlockContext, **kw) -> B.BlockSet:
    ctx.watch(model)
    bs = B.build_blocks(model, ctx, **kw)
    bs.attach()
    return bs


def sampled_backward(ctx, outputs, params, vecs, scale):
    """The orchestrator's exact-Fisher backward: each square-root column of the loss Hessian, weight 1."""
    ctx.sampling = 1.0
    try:
        for v in vecs:
            torch.autograd.grad(outputs, params, grad_outputs=v * scale, retain_graph=True, allow_unused=True)
    finally:
        ctx.sampling = None


def categorical_roots(logits):
    p = torch.softmax(logits.detach(), -1)
    eye = torch.eye(p.shape[-1], dtype=p.dtype)
    return [p[..., c : c + 1].sqrt() * (p - eye[c]) for c in range(p.shape[-1])]


def kron_block(block) -> torch.Tensor:
    """``A ⊗ G`` of a Kronecker block from its debiased dense EAs (column-major vec of [W | b])."""
    f = block.factors
    return torch.kron(f.A.state.dense(), f.G.state.dense())


def vec(mat):
    return mat.T.reshape(-1)


def layer_matrix(d, name, lead=0):
    """[dW | db] from a dict of parameter-shaped tensors with ``lead`` leading dims (e.g. a Jacobian's)."""
    w, b = d[f"{name}.weight"], d.get(f"{name}.bias")
    w = w.reshape(*w.shape[: lead + 1], -1)
    return w if b is None else torch.cat([w, b[..., None]], -1)


def mlp():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(4, 5), nn.Tanh(), nn.Linear(5, 3), nn.Sigmoid(), nn.Linear(3, 3, bias=False)).to(DT)


# ---------------------------------------------------------------------------- one data point
@pytest.mark.parametrize("fisher", ["empirical", "exact"])
def test_single_point_linear_blocks_equal_the_dense_fisher_and_ggn(fisher):
    model = mlp()
    params = {k: v.detach() for k, v in model.named_parameters()}
    x, y = torch.randn(1, 4, dtype=DT), torch.tensor([2])
    ctx = make_ctx(fisher=fisher)
    bs = attach(model, ctx)
    out = model(x)
    if fisher == "exact":
        sampled_backward(ctx, out, bs.fisher_params(), categorical_roots(out), 1.0)
    F.cross_entropy(out, y).backward()
    bs.update(decompose=True, damping=1e-3, step=0)
    bs.detach()  # no capture inside the torch.func references

    def out_fn(p):
        return functional_call(model, p, (x,))

    g = grad(lambda p: F.cross_entropy(out_fn(p), y))(params)
    J = jacrev(out_fn)(params)
    H = hessian(lambda z: F.cross_entropy(z, y))(out_fn(params))[0, :, 0, :]
    for name in ("0", "2", "4"):
        if fisher == "empirical":
            v = vec(layer_matrix(g, name))
            ref = torch.outer(v, v)
        else:
            Jl = layer_matrix(J, name, lead=2)[0]
            Jv = torch.stack([vec(Jl[c]) for c in range(Jl.shape[0])])
            ref = Jv.T @ H @ Jv
        torch.testing.assert_close(kron_block(bs.blocks[name]), ref, **TOL)


@pytest.mark.parametrize("kw", [dict(stride=1, padding=0), dict(stride=2, padding=1, dilation=2), dict(padding="same")])
def test_conv1d_factors_match_an_explicit_patch_loop_and_rebuild_the_gradient(kw):
    torch.manual_seed(1)
    conv = nn.Conv1d(2, 3, kernel_size=3, **kw).to(DT)
    model = nn.Sequential(conv, nn.Flatten())
    ctx = make_ctx(loss_reduction="sum")
    bs = attach(model, ctx)
    n, L = 2, 7
    x = torch.randn(n, 2, L, dtype=DT)
    out = conv(x)
    out.retain_grad()
    (out.sin().sum()).backward()
    bs.update(decompose=True, damping=1e-3, step=0)
    # explicit patches: position t of sample b sees x[b, :, t*s - p + j*d] (zero outside)
    s, d = conv.stride[0], conv.dilation[0]
    pad = (conv._reversed_padding_repeated_twice[0] if isinstance(conv.padding, str) else conv.padding[0])
    L_out = out.shape[-1]
    rows, grows = [], []
    for b in range(n):
        for t in range(L_out):
            patch = torch.zeros(2, 3, dtype=DT)
            for j in range(3):
                i = t * s - pad + j * d
                if 0 <= i < L:
                    patch[:, j] = x[b, :, i]
            rows.append(torch.cat([patch.reshape(-1), torch.ones(1, dtype=DT)]))
            grows.append(out.grad[b, :, t])
    Ar, Gr = torch.stack(rows), torch.stack(grows)
    blk = bs.blocks["0"]
    torch.testing.assert_close(blk.factors.A.state.dense(), Ar.T @ Ar / Ar.shape[0], **TOL)
    torch.testing.assert_close(blk.factors.G.state.dense(), Gr.T @ Gr / n, **TOL)  # sum loss: (1/n) Σ g gᵀ
    dW = Gr.T @ Ar  # the gradient is Σ_rows g āᵀ
    torch.testing.assert_close(dW, layer_matrix({"w.weight": conv.weight.grad, "w.bias": conv.bias.grad}, "w"), **TOL)


def test_conv1d_single_point_single_position_is_exact():
    torch.manual_seed(2)
    model = nn.Sequential(nn.Conv1d(2, 3, kernel_size=5), nn.Flatten(), nn.Tanh(), nn.Linear(3, 4)).to(DT)
    params = {k: v.detach() for k, v in model.named_parameters()}
    x, y = torch.randn(1, 2, 5, dtype=DT), torch.tensor([1])
    bs = attach(model, make_ctx())
    F.cross_entropy(model(x), y).backward()
    bs.update(decompose=True, damping=1e-3, step=0)
    bs.detach()
    g = grad(lambda p: F.cross_entropy(functional_call(model, p, (x,)), y))(params)
    for name in ("0", "3"):
        v = vec(layer_matrix(g, name))
        torch.testing.assert_close(kron_block(bs.blocks[name]), torch.outer(v, v), **TOL)


def test_conv2d_block_matches_the_preconditioner_helper_factors():
    from onlinela_torch.modules import Conv2dHelper

    torch.manual_seed(3)
    conv = nn.Conv2d(2, 3, 3, padding=1).to(DT)
    bs = attach(nn.Sequential(conv), make_ctx())
    x = torch.randn(2, 2, 5, 5, dtype=DT)
    out = conv(x)
    out.retain_grad()
    out.square().mean().backward()
    bs.update(decompose=True, damping=1e-3, step=0)
    h = Conv2dHelper(conv)
    blk = bs.blocks["0"]
    torch.testing.assert_close(blk.factors.A.state.dense(), h.a_factor(x, DT), **TOL)
    torch.testing.assert_close(blk.factors.G.state.dense(), h.g_factor(out.grad, 2, "mean", DT), **TOL)


# ---------------------------------------------------------------------------- sequences: expand / reduce
def test_expand_is_exact_for_a_positionwise_deep_linear_network_with_mse():
    torch.manual_seed(4)
    model = nn.Sequential(nn.Linear(5, 4), nn.Linear(4, 4, bias=False), nn.Linear(4, 3)).to(DT)
    params = {k: v.detach() for k, v in model.named_parameters()}
    N, T, C = 3, 4, 3
    x, y = torch.randn(N, T, 5, dtype=DT), torch.randn(N, T, C, dtype=DT)
    ctx = make_ctx(fisher="exact")
    bs = attach(model, ctx)
    out = model(x)
    M = N * T  # one loss term per position (loss_terms="positions")
    eye = torch.eye(C, dtype=DT)
    sampled_backward(ctx, out, bs.fisher_params(), [eye[c].expand_as(out) for c in range(C)], 1.0 / M)
    (0.5 * ((out - y) ** 2).sum(-1).mean()).backward()
    bs.update(decompose=True, damping=1e-3, step=0)
    bs.detach()
    J = jacrev(lambda p: functional_call(model, p, (x,)))(params)  # (N, T, C, ...)
    for name in ("0", "1", "2"):
        Jl = layer_matrix(J, name, lead=3).reshape(M, C, *layer_matrix(J, name, lead=3).shape[-2:])
        Jv = torch.stack([torch.stack([vec(Jl[m, c]) for c in range(C)]) for m in range(M)])
        ggn = torch.einsum("mcp,mcq->pq", Jv, Jv) / M  # GGN of the mean loss
        assert bs.blocks[name].mode == "expand"
        torch.testing.assert_close(kron_block(bs.blocks[name]), ggn, **TOL)


def _pooled_model():
    class Pooled(nn.Module):
        def __init__(self):
            super().__init__()
            self.inner = nn.Linear(4, 5)
            self.out = nn.Linear(5, 3)

        def forward(self, x):
            return self.out(torch.tanh(self.inner(x).mean(1)))

    torch.manual_seed(5)
    return Pooled().to(DT)


@pytest.mark.parametrize("fisher", ["empirical", "exact"])
def test_reduce_is_exact_for_one_sequence_through_a_linear_weight_sharing_layer(fisher):
    model = _pooled_model()
    params = {k: v.detach() for k, v in model.named_parameters()}
    x, y = torch.randn(1, 6, 4, dtype=DT), torch.tensor([0])
    ctx = make_ctx(fisher=fisher, loss_terms="samples")
    ctx.watch(model)
    blocks = {mode: B.LinearBlock("inner", model.inner, ctx, mode=mode) for mode in ("reduce", "expand")}
    for b in blocks.values():
        b.attach()
    out = model(x)
    if fisher == "exact":
        sampled_backward(ctx, out, [model.inner.weight], categorical_roots(out), 1.0)
    F.cross_entropy(out, y).backward()
    for b in blocks.values():
        b.update(decompose=True, damping=1e-3, step=0)
        b.detach()

    def out_fn(p):
        return functional_call(model, p, (x,))

    if fisher == "empirical":
        v = vec(layer_matrix(grad(lambda p: F.cross_entropy(out_fn(p), y))(params), "inner"))
        ref = torch.outer(v, v)
    else:
        Jl = layer_matrix(jacrev(out_fn)(params), "inner", lead=2)[0]
        Jv = torch.stack([vec(Jl[c]) for c in range(3)])
        ref = Jv.T @ hessian(lambda z: F.cross_entropy(z, y))(out_fn(params))[0, :, 0, :] @ Jv
    torch.testing.assert_close(kron_block(blocks["reduce"]), ref, **TOL)
    # expand is not exact here: its A averages the rows' outer products instead of the mean row's
    assert (kron_block(blocks["expand"]) - ref).norm() > 1e-3 * ref.norm()


def test_reduce_factors_use_the_mean_input_and_summed_output_gradient_per_sequence():
    torch.manual_seed(6)
    lin = nn.Linear(3, 2).to(DT)
    ctx = make_ctx()
    ctx.watch(lin)
    blk = B.LinearBlock("lin", lin, ctx, mode="reduce")
    blk.attach()
    N, T = 4, 5
    x = torch.randn(N, T, 3, dtype=DT)
    out = lin(x)
    out.retain_grad()
    out.cos().mean().backward()
    blk.update(decompose=True, damping=1e-3, step=0)
    abar = torch.cat([x.mean(1), torch.ones(N, 1, dtype=DT)], 1)
    ghat = out.grad.sum(1)
    torch.testing.assert_close(blk.factors.A.state.dense(), abar.T @ abar / N, **TOL)
    torch.testing.assert_close(blk.factors.G.state.dense(), (N * T) * ghat.T @ ghat, **TOL)  # mean over N·T terms
    assert blk.stats()["mode"] == "reduce"


# ---------------------------------------------------------------------------- weight sharing, accumulation
def test_a_module_called_twice_enters_every_call_but_counts_the_samples_once():
    torch.manual_seed(7)
    lin = nn.Linear(3, 3).to(DT)

    class Twice(nn.Module):
        def __init__(self):
            super().__init__()
            self.lin = lin

        def forward(self, x):
            return self.lin(torch.tanh(self.lin(x)))

    model = Twice()
    ctx = make_ctx()
    bs = attach(model, ctx)
    outs = []
    def keep(m, i, o):
        o.retain_grad()
        outs.append((i[0].detach(), o))

    lin.register_forward_hook(keep)
    N = 5
    x = torch.randn(N, 3, dtype=DT)
    model(x).square().sum(1).mean().backward()
    bs.update(decompose=True, damping=1e-3, step=0)
    a = torch.cat([torch.cat([i, torch.ones(N, 1, dtype=DT)], 1) for i, _ in outs])
    g = torch.cat([o.grad for _, o in outs])
    blk = bs.blocks["lin"]
    torch.testing.assert_close(blk.factors.A.state.dense(), a.T @ a / (2 * N), **TOL)
    torch.testing.assert_close(blk.factors.G.state.dense(), N * g.T @ g, **TOL)  # M = N, not 2N


def test_gradient_accumulation_counts_the_samples_of_every_forward():
    model = mlp()
    x = torch.randn(6, 4, dtype=DT)
    y = torch.tensor([0, 1, 2, 0, 1, 2])
    Gs = {}
    for parts in (1, 2):
        ctx = make_ctx()
        bs = attach(model, ctx)
        for xb, yb in zip(x.chunk(parts), y.chunk(parts)):
            (F.cross_entropy(model(xb), yb) / parts).backward()
        bs.update(decompose=True, damping=1e-3, step=0)
        Gs[parts] = [(b.factors.A.state.dense(), b.factors.G.state.dense()) for b in bs.blocks.values()]
        bs.detach()
        model.zero_grad()
    for (A1, G1), (A2, G2) in zip(Gs[1], Gs[2]):
        torch.testing.assert_close(A1, A2, **TOL)
        torch.testing.assert_close(G1, G2, **TOL)


# ---------------------------------------------------------------------------- preconditioning
@pytest.mark.parametrize("convention", ["product", "factor"])
def test_precondition_is_the_damped_kronecker_solve_and_writes_nothing(convention):
    model = mlp()
    ctx = make_ctx(damping_convention=convention)
    bs = attach(model, ctx)
    x, y = torch.randn(8, 4, dtype=DT), torch.randint(0, 3, (8,))
    F.cross_entropy(model(x), y).backward()
    before = {p: p.grad.clone() for p in model.parameters()}
    assert all(v is p.grad for p, v in bs.precondition(1e-2).items())  # no curvature yet: unchanged
    bs.update(decompose=True, damping=1e-2, step=0)
    lam = 1e-2
    new = bs.precondition(lam)
    for p in model.parameters():
        assert torch.equal(p.grad, before[p])
    for name in ("0", "2"):
        blk = bs.blocks[name]
        A, G = blk.factors.A.state.dense(), blk.factors.G.state.dense()
        lin = blk.module
        X = torch.cat([lin.weight.grad, lin.bias.grad[:, None]], 1)
        if convention == "product":
            lam_p = lam * torch.linalg.eigvalsh(A).max() * torch.linalg.eigvalsh(G).max()
            K = torch.kron(A, G) + lam_p * torch.eye(A.shape[0] * G.shape[0], dtype=DT)
            ref = torch.linalg.solve(K, vec(X)).reshape(A.shape[0], G.shape[0]).T
        else:
            mu = lam**0.5
            GA = G + mu * torch.linalg.eigvalsh(G).max() * torch.eye(G.shape[0], dtype=DT)
            AA = A + mu * torch.linalg.eigvalsh(A).max() * torch.eye(A.shape[0], dtype=DT)
            ref = torch.linalg.solve(GA, X) @ torch.linalg.inv(AA)
        torch.testing.assert_close(torch.cat([new[lin.weight], new[lin.bias][:, None]], 1), ref, rtol=1e-8, atol=1e-10)


def test_low_rank_factors_come_from_the_context_factory():
    made = []

    def maker(dim, name, *, rows, device, kind=None):
        made.append((name, dim, rows))
        return RandomizedFactor(
            dim, method="svd", oversample=2, n_iter=2, decay=0.9, rank=as_rank_policy(2), dtype=DT,
            inv_dtype=DT, device=device, rng=np.random.default_rng(0), name=name,
        )

    torch.manual_seed(8)
    lin = nn.Linear(12, 10).to(DT)
    bs = attach(nn.Sequential(lin), make_ctx(make_factor=maker))
    lin(torch.randn(16, 12, dtype=DT)).square().mean().backward()
    bs.update(decompose=True, damping=1e-3, step=0)
    st = bs.blocks["0"].stats()["factors"]
    assert sorted(made) == [("0/A", 13, 16), ("0/G", 10, 16)]
    assert st["A"]["kind"] == st["G"]["kind"] == "randomized" and st["A"]["rank"] == 2 and st["G"]["rank"] == 2


# ---------------------------------------------------------------------------- robustness, state
def test_non_finite_statistics_are_skipped_and_counted(caplog):
    model = mlp()
    bs = attach(model, make_ctx())
    x = torch.randn(4, 4, dtype=DT)
    x[0, 0] = float("nan")
    with caplog.at_level(logging.WARNING):
        model(x).sum().backward()
        bs.update(decompose=True, damping=1e-3, step=0)
    blk = bs.blocks["0"]
    assert blk.factors.A.state.skipped["statistics"] == 1 and blk.factors.A.state.ea is None
    assert "non-finite" in caplog.text


def test_state_dict_round_trip_and_mismatches_name_the_block():
    model = mlp()
    bs = attach(model, make_ctx())
    model(torch.randn(5, 4, dtype=DT)).sum().backward()
    bs.update(decompose=True, damping=1e-3, step=0)
    sd = bs.state_dict()
    other = B.build_blocks(mlp(), make_ctx())
    other.load_state_dict(sd)
    for name, b in other.blocks.items():
        torch.testing.assert_close(b.factors.G.state.dense(), bs.blocks[name].factors.G.state.dense(), rtol=0, atol=0)
    wrong = B.build_blocks(nn.Sequential(nn.Linear(4, 6), nn.Tanh(), nn.Linear(6, 3), nn.Sigmoid(), nn.Linear(3, 3, bias=False)).to(DT), make_ctx())
    with pytest.raises(ValueError, match="block '0'"):
        wrong.load_state_dict(sd)
    with pytest.raises(ValueError, match="'conv1d' block|'linear'"):
        other.blocks["0"].load_state_dict({**sd["0"], "kind": "conv1d"})


def test_unbatched_conv_inputs_count_one_sample():
    torch.manual_seed(9)
    for conv, x in ((nn.Conv1d(3, 2, 2), torch.randn(3, 5, dtype=DT)), (nn.Conv2d(3, 2, 2), torch.randn(3, 4, 4, dtype=DT))):
        conv = conv.to(DT)
        blk = B.block_for("c", conv, make_ctx())
        blk.attach()
        out = conv(x)
        out.retain_grad()
        out.square().sum().backward()
        assert blk._terms == 1
        blk.update(decompose=True, damping=1e-3, step=0)
        g = out.grad.reshape(2, -1).T
        torch.testing.assert_close(blk.factors.G.state.dense(), g.T @ g, **TOL)  # M = 1
