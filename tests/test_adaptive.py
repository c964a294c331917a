"""Adaptive damping, the quadratic-model step, the preconditioner under an outside optimizer, warm-up.

Tolerances: float64 products on models with a few hundred parameters agree
to ~1e-12 relative; we allow ``1e3·eps(float64)·P`` with ``P`` the parameter
count (stated per test).  float32 training comparisons use ``1e2·eps(float32)``
relative on parameters of norm O(1).
"""

from __future__ import annotations

import logging
import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call, jacrev

from onlinela_torch import KFAC, RSKFAC, KFACPreconditioner
from onlinela_torch.quadratic import AdaptiveDamping, curvature_products, lm_adjust, solve_step


def _tiny(seed: int = 0, dtype: torch.dtype = torch.float64) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 2)).to(dtype)


def _flat(vs):
    return torch.cat([v.reshape(-1) for v in vs])


# ---------------------------------------------------------------- Levenberg–Marquardt rule
def test_lm_rule_moves_damping_the_right_way():
    cfg = AdaptiveDamping(interval=5)
    w = cfg.factor
    assert w == pytest.approx((19 / 20) ** 5)
    lam = 1e-2
    assert lm_adjust(lam, 0.1, cfg) == pytest.approx(lam / w)  # too optimistic a model: more damping
    assert lm_adjust(lam, -3.0, cfg) == pytest.approx(lam / w)  # the loss went up
    assert lm_adjust(lam, float("nan"), cfg) == pytest.approx(lam / w)
    assert lm_adjust(lam, 0.9, cfg) == pytest.approx(lam * w)  # the model is good: less damping
    assert lm_adjust(lam, 0.5, cfg) == lam
    assert lm_adjust(cfg.max_damping, 0.0, cfg) == cfg.max_damping  # clamped
    assert lm_adjust(cfg.min_damping, 1.0, cfg) == cfg.min_damping


def test_adaptive_damping_config_is_validated():
    with pytest.raises(ValueError, match="interval"):
        AdaptiveDamping(interval=0)
    with pytest.raises(ValueError, match="omega"):
        AdaptiveDamping(omega=1.5)


def test_lm_increases_damping_when_steps_overshoot():
    """A far too large lr makes the loss rise: ρ < 1/4 on every LM step, so the damping grows."""
    torch.manual_seed(0)
    model = _tiny(dtype=torch.float32)
    x, y = torch.randn(64, 3), torch.randn(64, 2)
    opt = KFAC(model, lr=50.0, momentum=0.0, adaptive_damping=AdaptiveDamping(interval=1), kl_clip=None)
    start = opt.preconditioner.damping_at(0)

    def closure():
        opt.zero_grad()
        loss = F.mse_loss(model(x), y)
        loss.backward()
        return loss

    for _ in range(6):
        opt.step(closure)
    st = opt.stats()["optimizer"]
    assert st["lm_updates"] == 6
    assert opt.preconditioner.damping_at(opt.preconditioner.steps) > start


# ---------------------------------------------------------------- the 2x2 solve against a dense curvature
def _dense_ggn(model, x, y):
    names = [n for n, _ in model.named_parameters()]
    shapes = [p.shape for _, p in model.named_parameters()]
    theta = _flat([p.detach() for p in model.parameters()])

    def unflat(t):
        out, i = {}, 0
        for n, s in zip(names, shapes):
            k = math.prod(s)
            out[n] = t[i : i + k].reshape(s)
            i += k
        return out

    f = lambda t: functional_call(model, unflat(t), (x,)).reshape(-1)  # noqa: E731
    J = jacrev(f)(theta)  # (n*C, P)
    H = torch.eye(J.shape[0], dtype=J.dtype) * (2.0 / J.shape[0])  # Hessian of mse_loss(mean) in the outputs
    return J.T @ H @ J


@pytest.mark.parametrize("with_prev", [False, True])
def test_alpha_mu_equal_the_closed_form_solve_on_a_dense_curvature(with_prev):
    model = _tiny()
    x, y = torch.randn(7, 3, dtype=torch.float64), torch.randn(7, 2, dtype=torch.float64)
    params = list(model.parameters())
    P = sum(p.numel() for p in params)
    gen = torch.Generator().manual_seed(1)
    delta = [torch.randn(p.shape, generator=gen, dtype=p.dtype) for p in params]
    prev = [torch.randn(p.shape, generator=gen, dtype=p.dtype) for p in params] if with_prev else None
    lam = 0.3
    out = model(x)
    loss = F.mse_loss(out, y)
    g = torch.autograd.grad(loss, params, retain_graph=True)
    vecs = [delta] + ([prev] if with_prev else [])
    fv = curvature_products(loss, params, vecs, outputs=out)
    cv = [[f + lam * v for f, v in zip(fvi, vi)] for fvi, vi in zip(fv, vecs)]
    sol = solve_step(g, delta, cv[0], prev, cv[1] if with_prev else None)

    C = _dense_ggn(model, x, y) + lam * torch.eye(P, dtype=torch.float64)
    D = torch.stack([_flat(delta)] + ([_flat(prev)] if with_prev else []), 1)  # (P, 1 or 2)
    M = D.T @ C @ D
    b = D.T @ _flat(g)
    coef = torch.linalg.solve(M, -b)
    tol = 1e3 * torch.finfo(torch.float64).eps * P
    assert sol.alpha == pytest.approx(float(coef[0]), rel=tol, abs=tol)
    if with_prev:
        assert sol.mu == pytest.approx(float(coef[1]), rel=tol, abs=tol)
        assert sol.fallback is None
    else:
        assert sol.mu == 0.0 and sol.fallback == "no_previous"
    q = 0.5 * coef @ M @ coef + coef @ b
    assert sol.predicted == pytest.approx(float(q), rel=tol, abs=tol)
    assert sol.predicted < 0


def test_hessian_products_match_torch_func():
    model = _tiny()
    x, y = torch.randn(5, 3, dtype=torch.float64), torch.randn(5, 2, dtype=torch.float64)
    params = list(model.parameters())
    loss = F.mse_loss(model(x), y)
    grads = torch.autograd.grad(loss, params, create_graph=True)
    v = [torch.randn_like(p) for p in params]
    (hv,) = curvature_products(loss, params, [v], grads=grads)
    # dense Hessian by finite-free double differentiation of the flat gradient
    flat_g = _flat(grads)
    H = torch.stack([_flat(torch.autograd.grad(flat_g[i], params, retain_graph=True)) for i in range(flat_g.numel())])
    tol = 1e3 * torch.finfo(torch.float64).eps * flat_g.numel()
    torch.testing.assert_close(_flat(hv), H @ _flat(v), rtol=tol, atol=tol)


def test_solve_step_reports_an_indefinite_model():
    g = [torch.tensor([1.0])]
    d = [torch.tensor([1.0])]
    sol = solve_step(g, d, [torch.tensor([-1.0])])
    assert sol.fallback == "indefinite" and sol.alpha == 0.0 and sol.mu == 0.0


# ---------------------------------------------------------------- lr="auto"
def test_auto_step_trains_and_reports_its_cost():
    torch.manual_seed(0)
    model = _tiny(dtype=torch.float32)
    x = torch.randn(128, 3)
    y = torch.sin(x @ torch.randn(3, 2))
    opt = RSKFAC(model, lr="auto", adaptive_damping=AdaptiveDamping())
    first = None
    for _ in range(40):
        def closure():
            out = model(x)
            return F.mse_loss(out, y), out

        loss = float(opt.step(closure))
        first = loss if first is None else first
    with torch.no_grad():
        final = float(F.mse_loss(model(x), y))
    assert final < 0.5 * first
    st = opt.stats()["optimizer"]
    assert st["lr"] == "auto" and st["seconds_quadratic"] > 0 and st["lm_updates"] >= 7
    assert all(math.isfinite(float(v)) for v in st["last"].values())


def test_auto_step_needs_a_closure_that_does_not_call_backward():
    model = _tiny(dtype=torch.float32)
    x, y = torch.randn(8, 3), torch.randn(8, 2)
    opt = KFAC(model, lr="auto")
    with pytest.raises(ValueError, match="closure"):
        opt.step()

    def bad():
        loss = F.mse_loss(model(x), y)
        loss.backward()
        return loss

    with pytest.raises(ValueError, match="without calling"):
        opt.step(bad)
    with pytest.raises(ValueError, match="'auto'"):
        KFAC(model, lr="fast")


def test_optimizer_classes_need_a_model_and_say_why():
    model = _tiny(dtype=torch.float32)
    with pytest.raises(TypeError, match="hooks the model"):
        KFAC(model.parameters(), lr=0.1)
    opt = KFAC(model, lr=0.1, params=[{"params": list(model.parameters()), "lr": 0.05}])
    assert opt.param_groups[0]["lr"] == 0.05
    st = opt.stats()["optimizer"]
    assert st["weight_decay_active"] and st["weight_decay_start"] == 0


# ---------------------------------------------------------------- under an outside optimizer
def test_lr_and_momentum_are_read_from_the_optimizer_and_follow_a_scheduler():
    model = _tiny(dtype=torch.float32)
    sgd = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    pre = KFACPreconditioner(model, optimizer=sgd)
    assert pre.effective_lr(0) == pytest.approx(0.1 / (1 - 0.9))
    sched = torch.optim.lr_scheduler.StepLR(sgd, step_size=1, gamma=0.5)
    sgd.step()  # no gradients: changes nothing, but keeps the documented optimizer-then-scheduler order
    sched.step()
    assert pre.effective_lr(1) == pytest.approx(0.05 / (1 - 0.9))
    plain = KFACPreconditioner(_tiny(dtype=torch.float32), lr=0.2)
    assert plain.effective_lr(0) == 0.2
    with pytest.raises(TypeError, match="optimizer"):
        KFACPreconditioner(model, optimizer="sgd")


def test_warmup_refreshes_decompositions_geometrically():
    x = torch.randn(16, 3)
    counts = {}
    for warm in (True, False):
        model = _tiny(dtype=torch.float32)
        pre = KFACPreconditioner(model, warmup=warm, inv_update_freq=50, factor_update_freq=10)
        for _ in range(50):
            model.zero_grad()
            model(x).square().sum().backward()
            pre.step()
        counts[warm] = len(pre.layers["0"].A.errors)
    # warm-up: after 4 and 16 steps (steps 3, 15), none at step 0; without it: step 0 only
    assert counts == {True: 2, False: 1}


@pytest.mark.parametrize("graft", ["unit", "element"])
def test_unit_grafting_makes_the_step_invariant_to_the_loss_scale(graft):
    """graft="unit" / "element": a loss multiplied by 100 (or summed instead of averaged) gives the same parameters."""
    x = torch.randn(32, 3)
    y = torch.randn(32, 2)
    finals = []
    for scale in (1.0, 100.0):
        model = _tiny(dtype=torch.float32)
        sgd = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
        pre = KFACPreconditioner(model, optimizer=sgd, graft=graft, kl_clip=None)
        for _ in range(25):
            sgd.zero_grad()
            (scale * F.mse_loss(model(x), y)).backward()
            pre.step()
            sgd.step()
        finals.append(torch.cat([p.detach().reshape(-1) for p in model.parameters()]))
    tol = 1e3 * torch.finfo(torch.float32).eps
    torch.testing.assert_close(finals[0], finals[1], rtol=tol, atol=tol)


def test_element_grafting_gives_every_layer_the_same_per_entry_step_rms():
    """graft="element": on the first step (where the running RMS of ``‖g_l‖`` is ``‖g_l‖`` itself) each
    layer's written ``[dW | db]`` and each block tensor has RMS per entry ``ELEMENT_SCALE`` exactly, whatever
    its size; "unit" gives each of them norm 1 instead.  Tolerance: 1e3 float32 eps (the per-layer scale
    coefficients are float32 whatever the parameters' dtype, ``scaling.direction_scales``)."""
    from onlinela_torch.scaling import ELEMENT_SCALE

    x = torch.randn(16, 3, dtype=torch.float64)
    rms = {}
    for graft in ("unit", "element"):
        torch.manual_seed(0)
        model = nn.Sequential(nn.Linear(3, 40), nn.LayerNorm(40), nn.Tanh(), nn.Linear(40, 2)).double()
        pre = KFACPreconditioner(model, graft=graft, kl_clip=None)
        (10.0 * model(x).square().sum()).backward()
        pre.step()
        layers = [torch.cat([m.weight.grad.reshape(-1), m.bias.grad.reshape(-1)]) for m in (model[0], model[3])]
        block = [model[1].weight.grad, model[1].bias.grad]
        rms[graft] = [float(v.norm() / v.numel() ** 0.5) for v in layers + block]
        norms = [float(v.norm()) for v in layers + block]
        if graft == "unit":
            assert norms == pytest.approx([1.0] * 4, rel=1e3 * torch.finfo(torch.float32).eps)
    assert rms["element"] == pytest.approx([ELEMENT_SCALE] * 4, rel=1e3 * torch.finfo(torch.float32).eps)
    assert max(rms["unit"]) / min(rms["unit"]) > 2  # the sizes differ (164, 82, 40, 40 entries): "unit" does not equalise them


# ---------------------------------------------------------------- no silent no-ops, shapes, logs
def test_silent_no_ops_are_warned_and_counted():
    model = _tiny(dtype=torch.float32)
    pre = KFACPreconditioner(model)
    x = torch.randn(8, 3)
    model(x).sum().backward()
    assert pre.step()
    g = model[0].weight.grad.clone()
    assert pre.step()  # a second call leaves the preconditioned gradient alone
    assert torch.equal(model[0].weight.grad, g)
    model.zero_grad(set_to_none=True)
    assert pre.step() is False  # no backward since the last step
    model.eval()
    model(x).sum().backward()
    pre.step()
    w = pre.stats()["warnings"]
    assert w["repeated_step"] == 1 and w["no_gradient"] == 1 and w["no_statistics"] == 1


def test_an_extra_forward_without_backward_does_not_enter_the_statistics():
    x, x_log = torch.randn(16, 3), 10 * torch.randn(16, 3)
    As = []
    for extra in (False, True):
        model = _tiny(dtype=torch.float32)
        pre = KFACPreconditioner(model)
        loss = model(x).square().sum()
        if extra:
            model(x_log)  # e.g. a logging forward in train mode with grad enabled
        loss.backward()
        pre.step()
        As.append(pre.layers["0"].A.ea.clone())
        if extra:
            assert pre.stats()["layers"]["0"]["counters"]["unused_forward"] == 1
    torch.testing.assert_close(As[0], As[1], rtol=0, atol=0)


def test_load_state_dict_checks_every_factor_shape_and_names_the_layer():
    def mk(h):
        torch.manual_seed(0)
        return nn.Sequential(nn.Linear(8, h), nn.Tanh(), nn.Linear(h, 3))

    small, big = mk(16), mk(32)
    pre = KFACPreconditioner(small)
    small(torch.randn(5, 8)).sum().backward()
    pre.step()
    other = KFACPreconditioner(big)
    before = other.state_dict()
    with pytest.raises(ValueError, match="layer '0'.*dimension 32"):
        other.load_state_dict(pre.state_dict())
    assert other.state_dict()["steps"] == before["steps"]  # nothing was changed


def test_a_nan_storm_logs_once_then_rarely(caplog):
    model = _tiny(dtype=torch.float32)
    pre = KFACPreconditioner(model)
    x = torch.full((4, 3), float("nan"))
    with caplog.at_level(logging.WARNING, logger="onlinela_torch"):
        for _ in range(200):
            model.zero_grad()
            model(x).sum().backward()
            assert pre.step() is False
    lines = [r for r in caplog.records if "non-finite gradient" in r.getMessage()]
    assert len(lines) == 3  # occurrences 1, 100 and 200
    assert pre.stats()["warnings"]["nonfinite_gradient"] == 200
    assert len(caplog.records) <= 10
