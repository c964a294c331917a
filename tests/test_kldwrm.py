"""Tests for onlinela_torch.kldwrm: the wake identity, the variants' relations, training, state, robustness."""

from __future__ import annotations

import copy
import io
import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from onlinela import LowRankPSD
from onlinela_torch import KLDWRM, KLDWRMConfig, FactorEigen
from onlinela_torch.data import load_digits
from onlinela_torch.kldwrm_capture import LocalFactor
from onlinela_torch.kldwrm_wake import augment_factor
from onlinela_torch.models import SmallCNN


@pytest.fixture(scope="module")
def digits():
    return load_digits()


def _mlp(seed: int, d_in: int = 6, hidden: int = 5, d_out: int = 3, dtype=torch.float64) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(d_in, hidden), nn.Tanh(), nn.Linear(hidden, d_out)).to(dtype)


def _batches(seed: int, n_steps: int, n: int, d_in: int, d_out: int, dtype=torch.float64):
    gen = torch.Generator().manual_seed(seed)
    return [
        (torch.randn(n, d_in, generator=gen, dtype=dtype), torch.randint(0, d_out, (n,), generator=gen))
        for _ in range(n_steps)
    ]


def _run(model, opt, kld, batches, *, lrs=None):
    for k, (x, y) in enumerate(batches):
        if lrs is not None:
            for g in opt.param_groups:
                g["lr"] = lrs[k]
        opt.zero_grad()
        F.cross_entropy(model(x), y).backward()
        kld.step(closure=lambda x=x: model(x))
        opt.step()


def _params(model):
    return [p.detach().clone() for p in model.parameters()]


# ---------------------------------------------------------------------------------- §7.9
@pytest.mark.parametrize("rho", [0.33, 0.8])
def test_so_recursion_is_the_closed_form_wake_minimiser(rho):
    """SO's recursive step equals argmin_θ g_kᵀ(θ-θ_k) + 1/(2 lr_k) Σ_i w_ki ‖θ-θ_i‖²_{F_i} at every step.

    One Linear layer, squared loss, exact Gaussian Fisher: F_i = A_i ⊗ I exactly
    (G ≡ I), so K-FAC's EA is the EA of the F_i.  No clipping, damping 1e-12,
    statistics and decompositions every step, a changing learning rate, no graft (natural-gradient length).
    Weights: the debiased EA's, w_ki = (1-ρ) ρ^(k-i) / (1-ρ^(k+1)).
    """
    d_in, d_out, n, steps = 4, 3, 9, 8
    torch.manual_seed(0)
    lin = nn.Linear(d_in, d_out).double()
    opt = torch.optim.SGD(lin.parameters(), lr=0.1)
    kld = KLDWRM(
        lin, opt, variant="so", config=KLDWRMConfig(rho=rho, rms_clip=None), damping=1e-12, kl_clip=None, graft=None,
        factor_update_freq=1, inv_update_freq=1, fisher="exact",
        factor_dtype=torch.float64, inv_dtype=torch.float64,
    )
    gen = torch.Generator().manual_seed(1)
    lrs = [0.1, 0.05, 0.2, 0.2, 0.07, 0.3, 0.15, 0.1]
    thetas, A, grads = [], [], []
    for k in range(steps):
        x = torch.randn(n, d_in, generator=gen, dtype=torch.float64)
        y = torch.randn(n, d_out, generator=gen, dtype=torch.float64)
        opt.param_groups[0]["lr"] = lrs[k]
        theta = torch.cat([lin.weight, lin.bias[:, None]], 1).detach().clone()
        xb = torch.cat([x, torch.ones(n, 1, dtype=torch.float64)], 1)
        thetas.append(theta)
        A.append(xb.T @ xb / n)
        grads.append((theta @ xb.T - y.T) @ xb / n)
        opt.zero_grad()
        out = lin(x)
        kld.preconditioner.fisher_backward(out, likelihood="gaussian")
        (0.5 * ((out - y) ** 2).sum(1).mean()).backward()
        assert kld.step()
        opt.step()
        # closed form: Θ Σ w_i A_i = Σ w_i Θ_i A_i - lr_k g_k
        w = [(1 - rho) * rho ** (k - i) / (1 - rho ** (k + 1)) for i in range(k + 1)]
        M = sum(wi * Ai for wi, Ai in zip(w, A))
        rhs = sum(wi * Ti @ Ai for wi, Ti, Ai in zip(w, thetas, A)) - lrs[k] * grads[k]
        expected = torch.linalg.solve(M, rhs.T).T
        got = torch.cat([lin.weight, lin.bias[:, None]], 1).detach()
        torch.testing.assert_close(got, expected, rtol=1e-8, atol=1e-10)


# ------------------------------------------------------------------------- Q: dense oracle
def test_q_step_matches_a_dense_kronecker_oracle():
    """Q's direction is ((M̄_A + lr A_loc) ⊗ (M̄_G + lr G_loc) + λ'I)⁻¹ ĝ, ĝ = g - β(g_prev + G_loc' S A_loc')."""
    d_in, d_out, n, rho, lam = 4, 3, 7, 0.5, 1e-3
    torch.manual_seed(0)
    lin = nn.Linear(d_in, d_out).double()
    opt = torch.optim.SGD(lin.parameters(), lr=0.1)
    kld = KLDWRM(
        lin, opt, variant="q", config=KLDWRMConfig(rho=rho, rms_clip=None), damping=lam, kl_clip=None, graft=None,
        factor_update_freq=1, inv_update_freq=1, factor_dtype=torch.float64, inv_dtype=torch.float64,
    )
    layer = kld.preconditioner.layers[""]
    gen = torch.Generator().manual_seed(3)
    lrs = [0.1, 0.2, 0.05, 0.1]
    prev = None
    for k, lr in enumerate(lrs):
        x = torch.randn(n, d_in, generator=gen, dtype=torch.float64)
        y = torch.randint(0, d_out, (n,), generator=gen)
        opt.param_groups[0]["lr"] = lr
        theta = torch.cat([lin.weight, lin.bias[:, None]], 1).detach().clone()
        opt.zero_grad()
        out = lin(x)
        F.cross_entropy(out, y).backward()
        g = torch.cat([lin.weight.grad, lin.bias.grad[:, None]], 1).clone()
        xb = torch.cat([x, torch.ones(n, 1, dtype=torch.float64)], 1)
        delta = (torch.softmax(out.detach(), 1) - F.one_hot(y, d_out)) / n  # captured output gradients
        A_loc, G_loc = xb.T @ xb / n, n * delta.T @ delta
        kld.step()
        count = k + 1
        ghat = g
        if prev is not None:
            c_ratio = (1 - rho ** (count - 1)) / (1 - rho**count)
            beta = rho * prev["lr"] / lr * c_ratio
            S = theta - prev["theta"]
            ghat = g - beta * (prev["g"] + prev["G"] @ S @ prev["A"])
        MA = layer.A.dense().double() + lr * A_loc
        MG = layer.G.dense().double() + lr * G_loc
        lam_p = lam * torch.linalg.eigvalsh(MA).max() * torch.linalg.eigvalsh(MG).max()
        K = torch.kron(MA, MG) + lam_p * torch.eye(MA.shape[0] * MG.shape[0], dtype=torch.float64)
        u = torch.linalg.solve(K, ghat.T.reshape(-1)).reshape(MA.shape[0], MG.shape[0]).T  # vec column-major
        got = torch.cat([lin.weight.grad, lin.bias.grad[:, None]], 1)
        torch.testing.assert_close(got, u, rtol=1e-7, atol=1e-10)
        prev = {"theta": theta, "g": g, "A": A_loc, "G": G_loc, "lr": lr}
        opt.step()


def test_low_rank_augmentation_by_brand_equals_the_dense_sum():
    """Q's augmented low-rank factor (Brand path) represents U w Uᵀ + c(I - UUᵀ) + α XᵀX."""
    torch.manual_seed(0)
    d, r, R, alpha = 41, 5, 8, 0.3
    U = torch.linalg.qr(torch.randn(d, r, dtype=torch.float64))[0]
    w = torch.tensor([5.0, 4.0, 2.0, 1.0, 0.5], dtype=torch.float64)
    e = FactorEigen(LowRankPSD.unchecked(U, w), 5.0, 0.5)
    X = torch.randn(R, d, dtype=torch.float64)
    out = augment_factor(e, LocalFactor(rows=X), alpha, "min")
    assert out.approx.rank == r + R < d
    P = out.approx.eigvecs @ out.approx.eigvecs.T
    dense = (out.approx.eigvecs * out.approx.eigvals) @ out.approx.eigvecs.T + out.min_eig * (torch.eye(d, dtype=torch.float64) - P)
    expected = (U * w) @ U.T + 0.5 * (torch.eye(d, dtype=torch.float64) - U @ U.T) + alpha * X.T @ X
    torch.testing.assert_close(dense, expected, rtol=1e-10, atol=1e-10)
    # a Gram (conv-like) local factor takes the dense path and is exact too
    out = augment_factor(e, LocalFactor(gram=X.T @ X), alpha, "min")
    assert out.approx.rank == d
    torch.testing.assert_close((out.approx.eigvecs * out.approx.eigvals) @ out.approx.eigvecs.T, expected)


# ------------------------------------------------------------------------ variant relations
def _cnn_run(variant, config, digits, *, steps=8, method="kfac", seed=0, **kw):
    torch.manual_seed(seed)
    model = SmallCNN(image_size=8, dropout=0.0)
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    kld = KLDWRM(model, opt, variant=variant, method=method, config=config,
                 factor_update_freq=2, inv_update_freq=2, **kw)
    gen = torch.Generator().manual_seed(seed)
    batches = []
    for _ in range(steps):
        idx = torch.randint(0, digits.x_train.shape[0], (32,), generator=gen)
        batches.append((digits.x_train[idx], digits.y_train[idx]))
    _run(model, opt, kld, batches)
    return model, kld


def test_q_without_local_curvature_is_so(digits):
    cfg = dict(rho=0.4, rms_clip=None)
    so, _ = _cnn_run("so", KLDWRMConfig(**cfg), digits)
    q, _ = _cnn_run("q", KLDWRMConfig(local_curvature=0.0, **cfg), digits)
    for a, b in zip(so.parameters(), q.parameters()):
        assert torch.equal(a, b)
    q1, _ = _cnn_run("q", KLDWRMConfig(**cfg), digits)  # and the local term does matter
    assert not all(torch.equal(a, b) for a, b in zip(so.parameters(), q1.parameters()))


def test_qe_with_zero_inner_steps_is_q(digits):
    q, _ = _cnn_run("q", KLDWRMConfig(), digits)
    qe, _ = _cnn_run("qe", KLDWRMConfig(inner_steps=0), digits)
    for a, b in zip(q.parameters(), qe.parameters()):
        assert torch.equal(a, b)
    qe7, kld = _cnn_run("qe", KLDWRMConfig(), digits)
    assert not all(torch.equal(a, b) for a, b in zip(q.parameters(), qe7.parameters()))
    assert kld.stats()["seconds"]["inner"] > 0


def test_qe_writes_the_inner_displacement_and_restores_the_model(digits):
    """After step(), the model is back at θ_k in train mode, and θ_k - lr·p.grad is the inner loop's end point."""
    torch.manual_seed(0)
    model = SmallCNN(image_size=8)
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    kld = KLDWRM(model, opt, variant="qe", factor_update_freq=1, inv_update_freq=1)
    x, y = digits.x_train[:32], digits.y_train[:32]
    for _ in range(3):
        before = _params(model)
        opt.zero_grad()
        F.cross_entropy(model(x), y).backward()
        kld.step(closure=lambda: model(x))
        assert model.training
        for a, b in zip(before, model.parameters()):
            assert torch.equal(a, b)
        assert all(torch.isfinite(p.grad).all() for p in model.parameters())
        opt.step()
    # the stored networks are bounded: n_stored - 1 snapshots between steps
    assert len(kld.state_dict()["history"]) == kld.config.n_stored - 1


# -------------------------------------------------------------------------------- training
@pytest.mark.parametrize("variant", ["so", "q", "qe"])
def test_each_variant_trains_the_small_cnn(variant, digits):
    torch.manual_seed(0)
    model = SmallCNN(image_size=8)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)  # the defaults' layer steps are ~lr long (graft="unit")
    kld = KLDWRM(model, opt, variant=variant)
    xe, ye = digits.x_train[:400], digits.y_train[:400]

    def eval_loss():
        model.eval()
        with torch.no_grad():
            out = F.cross_entropy(model(xe), ye).item()
        model.train()
        return out

    start = eval_loss()
    gen = torch.Generator().manual_seed(0)
    for _ in range(50):
        idx = torch.randint(0, digits.x_train.shape[0], (64,), generator=gen)
        x, y = digits.x_train[idx], digits.y_train[idx]
        opt.zero_grad()
        F.cross_entropy(model(x), y).backward()
        assert kld.step(closure=lambda x=x: model(x))
        opt.step()
    end = eval_loss()
    assert end < 0.9 * start, (start, end)
    st = kld.stats()
    assert st["variant"] == variant and st["skipped_steps"] == 0 and st["step"] == 50


@pytest.mark.parametrize("variant", ["so", "q", "qe"])
@pytest.mark.parametrize("method", ["rs-kfac", "b-kfac"])
def test_low_rank_backends(variant, method):
    """Low-rank curvature backends: Brand-eligible Linear factors (r + n < d), thin local statistics."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(60, 40), nn.ReLU(), nn.Linear(40, 5))
    opt = torch.optim.SGD(model.parameters(), lr=0.2)  # the defaults' layer steps are ~lr long (graft="unit")
    kld = KLDWRM(model, opt, variant=variant, method=method, rank=6, factor_update_freq=1, inv_update_freq=2)
    gen = torch.Generator().manual_seed(0)
    W = torch.randn(60, 5, generator=gen)
    xs = torch.randn(256, 60, generator=gen)
    ys = (xs @ W).argmax(1)
    loss0 = F.cross_entropy(model(xs), ys).item()
    for _ in range(60):
        idx = torch.randint(0, 256, (12,), generator=gen)
        x, y = xs[idx], ys[idx]
        opt.zero_grad()
        F.cross_entropy(model(x), y).backward()
        assert kld.step(closure=lambda x=x: model(x))
        opt.step()
    assert F.cross_entropy(model(xs), ys).item() < 0.9 * loss0
    kinds = {f["kind"] for layer in kld.stats()["layers"].values() for f in (layer["A"], layer["G"])}
    assert kinds & ({"brand"} if method == "b-kfac" else {"randomized"})


# ------------------------------------------------------------------------------ state dict
@pytest.mark.parametrize("variant", ["so", "q", "qe"])
def test_state_dict_round_trip_continues_identically(variant):
    def build():
        model = _mlp(0, dtype=torch.float32)
        opt = torch.optim.SGD(model.parameters(), lr=0.1)
        kld = KLDWRM(model, opt, variant=variant, method="kfac", factor_update_freq=2, inv_update_freq=3)
        return model, opt, kld

    batches = _batches(0, 12, 16, 6, 3, dtype=torch.float32)
    model, opt, kld = build()
    _run(model, opt, kld, batches[:6])
    buf = io.BytesIO()
    torch.save({"model": model.state_dict(), "opt": opt.state_dict(), "kld": kld.state_dict()}, buf)
    _run(model, opt, kld, batches[6:])
    buf.seek(0)
    ckpt = torch.load(buf, weights_only=False)
    model2, opt2, kld2 = build()
    model2.load_state_dict(ckpt["model"])
    opt2.load_state_dict(ckpt["opt"])
    kld2.load_state_dict(ckpt["kld"])
    _run(model2, opt2, kld2, batches[6:])
    for a, b in zip(model.parameters(), model2.parameters()):
        assert torch.equal(a, b)
    with pytest.raises(ValueError, match="variant"):
        m3 = _mlp(0, dtype=torch.float32)
        other = KLDWRM(m3, torch.optim.SGD(m3.parameters(), lr=0.1), variant="so" if variant != "so" else "q")
        other.load_state_dict(copy.deepcopy(ckpt["kld"]))


# ------------------------------------------------------------------------------ robustness
@pytest.mark.parametrize("variant", ["so", "q", "qe"])
def test_non_finite_gradient_is_skipped_and_counted(variant, caplog):
    model = _mlp(0, dtype=torch.float32)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    kld = KLDWRM(model, opt, variant=variant, factor_update_freq=1, inv_update_freq=1)
    batches = _batches(1, 6, 16, 6, 3, dtype=torch.float32)
    _run(model, opt, kld, batches[:3])
    x, y = batches[3]
    opt.zero_grad()
    F.cross_entropy(model(x), y).backward()
    model[0].weight.grad[0, 0] = math.nan
    before = _params(model)
    assert kld.step(closure=lambda: model(x)) is False
    assert all(p.grad is None for p in model.parameters())
    opt.step()
    for a, b in zip(before, model.parameters()):
        assert torch.equal(a, b)
    assert kld.stats()["skipped_steps"] == 1
    assert "skipped" in caplog.text

    def finite(obj):
        if isinstance(obj, torch.Tensor):
            return bool(torch.isfinite(obj).all()) if obj.is_floating_point() else True
        if isinstance(obj, dict):
            return all(finite(v) for v in obj.values())
        if isinstance(obj, (list, tuple)):
            return all(finite(v) for v in obj)
        return True

    assert finite(kld.state_dict())
    _run(model, opt, kld, batches[4:])
    assert all(torch.isfinite(p).all() for p in model.parameters())


# ---------------------------------------------------------------------------- bad arguments
def test_bad_arguments_name_the_argument():
    model = _mlp(0, dtype=torch.float32)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    with pytest.raises(ValueError, match="`variant`"):
        KLDWRM(model, opt, variant="sq")
    for rho in (0.0, 1.0, 1.5, -0.1):
        with pytest.raises(ValueError, match="`rho`"):
            KLDWRMConfig(rho=rho)
    with pytest.raises(ValueError, match="`inner_steps`"):
        KLDWRMConfig(inner_steps=-1)
    with pytest.raises(ValueError, match="`n_stored`"):
        KLDWRMConfig(n_stored=0)
    with pytest.raises(TypeError, match="`optimizer`"):
        KLDWRM(model, model.parameters())
    with pytest.raises(ValueError, match="`optimizer`"):
        KLDWRM(model, torch.optim.SGD(model[2].parameters(), lr=0.1))
    with pytest.raises(TypeError, match="`lr`"):
        KLDWRM(model, opt, lr=0.1)
    with pytest.raises(TypeError, match="`factor_decay`"):
        KLDWRM(model, opt, factor_decay=0.9)
    with pytest.raises(ValueError, match="`fisher`"):
        KLDWRM(model, opt, variant="q", fisher="true")
    with pytest.raises(ValueError, match="`method`"):
        KLDWRM(model, opt, method="shampoo")
    kld = KLDWRM(model, opt, variant="qe")
    x = torch.randn(4, 6)
    F.cross_entropy(model(x), torch.zeros(4, dtype=torch.long)).backward()
    with pytest.raises(ValueError, match="`closure`"):
        kld.step()
    with pytest.raises(TypeError, match="`closure`"):
        kld.step(closure=lambda: model(x).sum())


def test_registry_builds_and_steps_the_variants(digits):
    from onlinela_torch import experiment as ex

    specs = ex.available_optimizers()
    for variant in ("so", "q", "qe"):
        name = f"kld-wrm-{variant}"
        assert name in specs
        torch.manual_seed(0)
        model = SmallCNN(image_size=8)
        stepper = ex.build_stepper(name, model, lr=0.05, momentum=0.0, task=ex.TASKS["digits-cnn"])
        assert isinstance(stepper.curvature, KLDWRM) and stepper.curvature.variant == variant
        x, y = digits.x_train[:32], digits.y_train[:32]
        F.cross_entropy(model(x), y).backward()
        stepper.step(lambda: model(x))
        stepper.zero_grad()
        assert ex.phase_seconds(stepper.stats())["preconditioning"] > 0


@pytest.mark.parametrize("lr", [0.1, 0.01])
def test_qe_inner_loop_stays_finite_at_large_learning_rates(lr, digits):
    """The QE inner loop is held to the Q step's radius: finite at lr 0.1 and 0.01 on an MLP (it diverged before)."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Flatten(), nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 10))
    opt = torch.optim.SGD(model.parameters(), lr=lr)
    kld = KLDWRM(model, opt, variant="qe", factor_update_freq=2, inv_update_freq=4)
    gen = torch.Generator().manual_seed(0)
    for _ in range(30):
        idx = torch.randint(0, digits.x_train.shape[0], (64,), generator=gen)
        x, y = digits.x_train[idx], digits.y_train[idx]
        opt.zero_grad()
        F.cross_entropy(model(x), y).backward()
        kld.step(closure=lambda x=x: model(x))
        opt.step()
    assert all(bool(torch.isfinite(p).all()) for p in model.parameters())
    st = kld.stats()
    assert st["inner_fallbacks"] == 0 and st["skipped_steps"] == 0


def test_kldwrm_on_a_compiled_model_trains_as_eager_without_recompile_limit(caplog):
    """KLDWRM built on ``torch.compile(model)`` (backend "eager": graph capture, no C compiler) gives the eager
    parameters up to float32 round-off of reordered kernels, with no recompile-limit warning from its hooks."""
    import logging

    torch._dynamo.reset()
    results = []
    for compiled in (False, True):
        torch.manual_seed(0)
        layers: list[nn.Module] = []
        for _ in range(10):  # more layers than Dynamo's recompile limit (8)
            layers += [nn.Linear(6, 6), nn.Tanh()]
        model = nn.Sequential(*layers, nn.Linear(6, 3))
        run = torch.compile(model, backend="eager") if compiled else model
        opt = torch.optim.SGD(model.parameters(), lr=0.05)
        kld = KLDWRM(run, opt, variant="q", factor_update_freq=2, inv_update_freq=4)
        g = torch.Generator().manual_seed(1)
        with caplog.at_level(logging.WARNING, logger="torch._dynamo"):
            for _ in range(12):
                x = torch.randn(16, 6, generator=g)
                opt.zero_grad()
                run(x).square().mean().backward()
                kld.step()
                opt.step()
        results.append([p.detach().clone() for p in model.parameters()])
    assert "recompile_limit" not in caplog.text and "cache_size_limit" not in caplog.text
    for a, b in zip(*results):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
