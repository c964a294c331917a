"""K-FAC factor statistics against dense oracles (algorithms.md §1, §7.10).

* Conv2d (KFC) factors and gradient matrix against an explicit loop over patches.
* One data point: the empirical-Fisher and exact-Fisher (GGN) blocks of every
  layer, computed densely with ``torch.func``, equal ``A ⊗ G`` exactly.
* Deep linear network + MSE: K-FAC with the exact Fisher equals the GGN block
  over a whole batch.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call, grad, hessian, jacrev

from onlinela_torch import AdaptiveRank, KFACPreconditioner
from onlinela_torch.factors import RandomizedFactor, as_rank_policy
from onlinela_torch.modules import Conv2dHelper, LinearHelper, helper_for


DT = torch.float64
# torch.func imports torch.jit.script internally, which warns on this torch
pytestmark = pytest.mark.filterwarnings("ignore:`torch.jit.script` is deprecated:DeprecationWarning")


def _precond(model, **kw):
    opts = dict(method="kfac", factor_update_freq=1, inv_update_freq=1, kl_clip=None, factor_dtype=DT, inv_dtype=DT)
    opts.update(kw)
    return KFACPreconditioner(model, **opts)


def _vec(mat: torch.Tensor) -> torch.Tensor:
    """Column-major vec of a (g_dim, a_dim) matrix: the order in which A ⊗ G acts."""
    return mat.T.reshape(-1)


def _layer_matrix(d: dict, name: str) -> torch.Tensor:
    """[dW | db] from a dict of parameter-shaped tensors (leading dims allowed)."""
    w, b = d[f"{name}.weight"], d.get(f"{name}.bias")
    w = w.reshape(*w.shape[: w.ndim - 2], w.shape[-2], -1) if w.ndim > 2 else w
    return w if b is None else torch.cat([w, b[..., None]], -1)


# ---------------------------------------------------------------------------- Conv2d
@pytest.mark.filterwarnings("ignore:Using padding='same'")
@pytest.mark.parametrize(
    "kw",
    [
        dict(stride=1, padding=0, dilation=1, bias=True),
        dict(stride=2, padding=1, dilation=1, bias=False),
        dict(stride=(1, 2), padding=(2, 1), dilation=(2, 1), bias=True),
        dict(stride=1, padding="same", dilation=1, bias=True),
    ],
)
def test_conv2d_factors_and_grad_match_patch_loop(kw):
    torch.manual_seed(0)
    conv = nn.Conv2d(2, 3, kernel_size=(3, 2), **kw).to(DT)
    model = nn.Sequential(conv, nn.Flatten())
    pre = _precond(model)
    x = torch.randn(2, 2, 6, 5, dtype=DT)
    out = model(x)
    loss = (out.sin()).mean()
    loss.backward()
    h = pre.layers["0"].helper
    assert isinstance(h, Conv2dHelper)
    grad_mat = h.grad_matrix().clone()
    pre.step()

    # explicit loop over output positions
    c = conv
    kh, kw_ = c.kernel_size
    dh, dw = c.dilation
    sh, sw = c.stride
    if isinstance(c.padding, str):
        xp = F.pad(x, c._reversed_padding_repeated_twice)
    else:
        xp = F.pad(x, (c.padding[1], c.padding[1], c.padding[0], c.padding[0]))
    y = conv(x)
    go = torch.autograd.grad(y.sin().mean(), y)[0]
    n, _, Ho, Wo = y.shape
    patches, gos = [], []
    for b in range(n):
        for i in range(Ho):
            for j in range(Wo):
                p = xp[b, :, i * sh : i * sh + dh * (kh - 1) + 1 : dh, j * sw : j * sw + dw * (kw_ - 1) + 1 : dw]
                p = p.reshape(-1)
                if c.bias is not None:
                    p = torch.cat([p, p.new_ones(1)])
                patches.append(p)
                gos.append(go[b, :, i, j])
    P, Gr = torch.stack(patches), torch.stack(gos)
    A_ref = P.T @ P / (n * Ho * Wo)
    G_ref = n * Gr.T @ Gr  # mean loss: per-sample gradient is n * go, G = (1/n) sum_b sum_t
    torch.testing.assert_close(pre.layers["0"].A.dense(), A_ref, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(pre.layers["0"].G.dense(), G_ref, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(grad_mat, Gr.T @ P, rtol=1e-10, atol=1e-12)


def test_unsupported_conv_is_skipped_with_warning_and_named_selection_errors():
    model = nn.Sequential(nn.Conv2d(4, 4, 3, groups=2), nn.Flatten(), nn.Linear(4, 2))
    with pytest.warns(UserWarning, match="groups=2"):
        pre = KFACPreconditioner(model)
    assert list(pre.layers) == ["2"]
    with pytest.raises(ValueError, match="groups=2"):
        KFACPreconditioner(model, layers=["0"])
    helper, reason = helper_for(nn.ReLU())
    assert helper is None and "ReLU" in reason


def test_linear_bias_folding_and_grad_roundtrip():
    lin = nn.Linear(3, 2).to(DT)
    h = LinearHelper(lin)
    assert (h.a_dim, h.g_dim) == (4, 2)
    x = torch.randn(5, 7, 3, dtype=DT)  # extra leading dim: every position is a row
    rows = h.a_rows(x)
    assert rows.shape == (35, 4) and torch.all(rows[:, -1] == 1)
    lin(x).sum().backward()
    m = h.grad_matrix()
    torch.testing.assert_close(m[:, :3], lin.weight.grad)
    torch.testing.assert_close(m[:, 3], lin.bias.grad)
    h.set_grad_matrix(2 * m)
    torch.testing.assert_close(lin.bias.grad, 2 * m[:, 3])


# ---------------------------------------------------------------------------- §7.10 one data point
def _mlp():
    torch.manual_seed(1)
    return nn.Sequential(nn.Linear(4, 5), nn.Tanh(), nn.Linear(5, 3, bias=False), nn.Tanh(), nn.Linear(3, 3)).to(DT)


@pytest.mark.parametrize("fisher", ["empirical", "exact"])
def test_single_point_blocks_equal_kronecker_factors(fisher):
    model = _mlp()
    params = {k: v.detach() for k, v in model.named_parameters()}
    x = torch.randn(1, 4, dtype=DT)
    y = torch.tensor([2])

    def out_fn(p):
        return functional_call(model, p, (x,))

    def loss_fn(p):
        return F.cross_entropy(out_fn(p), y)

    pre = _precond(model, fisher=fisher)
    out = model(x)
    if fisher == "exact":
        pre.fisher_backward(out, likelihood="categorical")
    F.cross_entropy(out, y).backward()
    pre.step()

    if fisher == "empirical":
        g = grad(loss_fn)(params)
    else:
        J = jacrev(out_fn)(params)  # d out / d params, leading dims (1, C)
        H = hessian(lambda z: F.cross_entropy(z, y))(out_fn(params))[0, :, 0, :]  # (C, C) = diag(p) - p p^T
    for name in ("0", "2", "4"):
        layer = pre.layers[name]
        K = torch.kron(layer.A.dense(), layer.G.dense())
        if fisher == "empirical":
            v = _vec(_layer_matrix(g, name))
            block = torch.outer(v, v)
        else:
            Jl = _layer_matrix(J, name)[0]  # (C, g_dim, a_dim)
            Jv = torch.stack([_vec(Jl[c]) for c in range(Jl.shape[0])])  # (C, p)
            block = Jv.T @ H @ Jv
        torch.testing.assert_close(K, block, rtol=1e-9, atol=1e-12)


def test_single_point_bernoulli_exact_block_is_the_ggn():
    # sigmoid outputs with a summed binary cross-entropy (an autoencoder's loss): the loss
    # Hessian in the logits is diag(p (1 - p)), so the exact-Fisher block is J^T diag(p(1-p)) J
    model = _mlp()
    params = {k: v.detach() for k, v in model.named_parameters()}
    x = torch.randn(1, 4, dtype=DT)
    target = torch.tensor([[1.0, 0.0, 1.0]], dtype=DT)

    def out_fn(p):
        return functional_call(model, p, (x,))

    pre = _precond(model, fisher="exact")
    out = model(x)
    pre.fisher_backward(out, likelihood="bernoulli")
    F.binary_cross_entropy_with_logits(out, target, reduction="sum").backward()
    pre.step()
    J = jacrev(out_fn)(params)
    H = hessian(lambda z: F.binary_cross_entropy_with_logits(z, target, reduction="sum"))(out_fn(params))[0, :, 0, :]
    p = torch.sigmoid(out.detach())[0]
    torch.testing.assert_close(H, torch.diag(p * (1 - p)), rtol=1e-12, atol=1e-14)
    for name in ("0", "2", "4"):
        layer = pre.layers[name]
        Jl = _layer_matrix(J, name)[0]
        Jv = torch.stack([_vec(Jl[c]) for c in range(Jl.shape[0])])
        torch.testing.assert_close(torch.kron(layer.A.dense(), layer.G.dense()), Jv.T @ H @ Jv, rtol=1e-9, atol=1e-12)


def test_deep_linear_mse_kfac_is_exact_over_a_batch():
    torch.manual_seed(2)
    model = nn.Sequential(nn.Linear(5, 4), nn.Linear(4, 4, bias=False), nn.Linear(4, 3)).to(DT)
    params = {k: v.detach() for k, v in model.named_parameters()}
    n = 7
    x = torch.randn(n, 5, dtype=DT)
    y = torch.randn(n, 3, dtype=DT)
    pre = _precond(model, fisher="exact")
    out = model(x)
    pre.fisher_backward(out, likelihood="gaussian")
    (0.5 * ((out - y) ** 2).sum(1).mean()).backward()
    pre.step()
    J = jacrev(lambda p: functional_call(model, p, (x,)))(params)  # (n, C, ...)
    for name in ("0", "1", "2"):
        Jl = _layer_matrix(J, name)  # (n, C, g, a)
        Jv = torch.stack([torch.stack([_vec(Jl[b, c]) for c in range(3)]) for b in range(n)])  # (n, C, p)
        ggn = torch.einsum("bcp,bcq->pq", Jv, Jv) / n
        layer = pre.layers[name]
        torch.testing.assert_close(torch.kron(layer.A.dense(), layer.G.dense()), ggn, rtol=1e-9, atol=1e-12)


@pytest.mark.parametrize("likelihood", ["categorical", "bernoulli"])
def test_true_fisher_monte_carlo_approaches_exact(likelihood):
    model = _mlp()
    x = torch.randn(16, 4, dtype=DT)
    Gs = {}
    for fisher, n_samples in (("exact", 1), ("true", 4000)):
        pre = _precond(model, fisher=fisher, seed=3)
        out = model(x)
        pre.fisher_backward(out, likelihood=likelihood, n_samples=n_samples)
        pre.step()
        Gs[fisher] = pre.layers["4"].G.dense()
        pre.remove_hooks()
    err = (Gs["true"] - Gs["exact"]).norm() / Gs["exact"].norm()
    assert err < 0.1


def test_gradient_accumulation_gives_the_full_batch_factors():
    model = _mlp()
    x, y = torch.randn(12, 4, dtype=DT), torch.randint(0, 3, (12,))
    pre = _precond(model)
    F.cross_entropy(model(x), y).backward()
    pre.step()
    full = {n: (l.A.dense(), l.G.dense()) for n, l in pre.layers.items()}
    pre.remove_hooks()
    model.zero_grad()
    pre2 = _precond(model)
    for part in (slice(0, 4), slice(4, 12)):  # unequal micro-batches, loss scaled to the full-batch mean
        w = (part.stop - part.start) / 12
        (F.cross_entropy(model(x[part]), y[part]) * w).backward()
    pre2.step()
    for n, layer in pre2.layers.items():
        torch.testing.assert_close(layer.A.dense(), full[n][0], rtol=1e-10, atol=1e-12)
        torch.testing.assert_close(layer.G.dense(), full[n][1], rtol=1e-10, atol=1e-12)


# ------------------------------------------------------------------ exact eigh where it is cheaper than the sketch
@settings(max_examples=100, deadline=None)
@given(d=st.integers(8, 5000), k=st.integers(2, 600), q=st.integers(0, 6), extra=st.integers(1, 500))
def test_exact_is_cheaper_is_monotone(d, k, q, extra):
    """Wider factors favour the sketch; more sketch columns or iterations favour eigh."""
    from onlinela_torch.factors import exact_is_cheaper

    for m in ("svd", "subspace", "nystrom"):
        if not exact_is_cheaper(d, k, m, q):
            assert not exact_is_cheaper(d + extra, k, m, q)
        if exact_is_cheaper(d, k, m, q):
            assert exact_is_cheaper(d, k + extra, m, q) and exact_is_cheaper(d, k, m, q + 1)


@pytest.mark.parametrize("rank, kind_of_result", [(220, "exact"), (AdaptiveRank(), "sketch")])
def test_a_randomized_factor_takes_eigh_where_it_is_cheaper(rank, kind_of_result):
    # d = 257 and r + l = 230 < d: a sketch is possible, but eigh costs less (257 < 3.3 * 230)
    policy = as_rank_policy(rank)
    f = RandomizedFactor(257, method="svd", oversample=10, n_iter=3, decay=0.9, rank=policy, dtype=torch.float64,
                         inv_dtype=torch.float64, device=torch.device("cpu"), rng=np.random.default_rng(0), name="f")
    X = torch.randn(300, 257, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    f.accumulate(X)
    f.update_ea(1.0 / 300, step=0)
    f.refresh(decompose=True, overwrite=False, damping=1e-2, step=0)
    expected = 257 if kind_of_result == "exact" else min(policy.initial, 257)
    assert f.eigen.approx.rank == expected
    if kind_of_result == "exact":  # the full decomposition reproduces the debiased EA to round-off
        U, w = f.eigen.approx.eigvecs, f.eigen.approx.eigvals
        tol = 100 * 257 * torch.finfo(torch.float64).eps * float(w[0])
        torch.testing.assert_close((U * w) @ U.T, f.dense(), rtol=0, atol=tol)
