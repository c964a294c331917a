"""KFACPreconditioner and optimizer classes: checkpoints, robustness, validation, composability."""

from __future__ import annotations

import importlib
import io
import logging

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from onlinela_torch import (
    BKFAC,
    BKFACC,
    BRKFAC,
    KFAC,
    RSKFAC,
    SREKFAC,
    AdaptiveRank,
    BrandConfig,
    ErrorTargetRank,
    KFACPreconditioner,
    NystromKFAC,
)
from onlinela_torch.preconditioner import METHODS


OPT_CLASSES = {
    "kfac": KFAC,
    "rs-kfac": RSKFAC,
    "sre-kfac": SREKFAC,
    "nystrom-kfac": NystromKFAC,
    "b-kfac": BKFAC,
    "br-kfac": BRKFAC,
    "b-kfac-c": BKFACC,
}
FAST = dict(factor_update_freq=2, inv_update_freq=4, rank=12, oversample=3, n_iter=1, brand=BrandConfig(correction_period=1))


def _mlp(seed=0):
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(10, 40), nn.Tanh(), nn.Linear(40, 40), nn.ReLU(), nn.Linear(40, 4))


def _batch(step, n=8):
    g = torch.Generator().manual_seed(1000 + step)
    return torch.randn(n, 10, generator=g), torch.randint(0, 4, (n,), generator=g)


def _all_finite(obj) -> bool:
    if isinstance(obj, torch.Tensor):
        return bool(torch.isfinite(obj).all()) if obj.is_floating_point() else True
    if isinstance(obj, dict):
        return all(_all_finite(v) for v in obj.values())
    if isinstance(obj, (list, tuple)):
        return all(_all_finite(v) for v in obj)
    return True


# ---------------------------------------------------------------------------- checkpoints
def _train(opt, model, steps, start=0, fisher=False):
    for k in range(start, steps):
        x, y = _batch(k)
        opt.zero_grad()
        out = model(x)
        if fisher:
            opt.preconditioner.fisher_backward(out)
        F.cross_entropy(out, y).backward()
        opt.step()


@pytest.mark.parametrize("method", METHODS)
def test_state_dict_round_trip_continues_bitwise(method):
    cls = OPT_CLASSES[method]
    fisher = method == "rs-kfac"  # also checks the label-sampling RNG
    kw = dict(FAST, fisher="true" if fisher else "empirical", momentum=0.5)
    model = _mlp()
    opt = cls(model, lr=0.05, **kw)
    _train(opt, model, 7, fisher=fisher)
    buf = io.BytesIO()
    torch.save({"model": model.state_dict(), "opt": opt.state_dict()}, buf)
    _train(opt, model, 15, start=7, fisher=fisher)
    expected = [p.detach().clone() for p in model.parameters()]

    buf.seek(0)
    ck = torch.load(buf, weights_only=False)
    model2 = _mlp(seed=99)
    opt2 = cls(model2, lr=0.05, **kw)
    model2.load_state_dict(ck["model"])
    opt2.load_state_dict(ck["opt"])
    _train(opt2, model2, 15, start=7, fisher=fisher)
    for a, b in zip(expected, model2.parameters()):
        assert torch.equal(a, b)
    assert opt2.preconditioner.stats()["step"] == 15


def test_load_state_dict_rejects_a_different_method():
    pre = KFACPreconditioner(_mlp(), method="kfac")
    with pytest.raises(ValueError, match="method 'kfac'"):
        KFACPreconditioner(_mlp(), method="rs-kfac").load_state_dict(pre.state_dict())


# ---------------------------------------------------------------------------- robustness
@pytest.mark.parametrize("method", ["kfac", "sre-kfac", "b-kfac", "b-kfac-c"])
def test_nan_gradient_and_nan_statistics_are_skipped_and_counted(method, caplog):
    model = _mlp()
    pre = KFACPreconditioner(model, method=method, **FAST)
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    x, y = _batch(0)
    F.cross_entropy(model(x), y).backward()
    assert pre.step()
    opt.step()
    # 1. NaN in one gradient entry after backward
    opt.zero_grad()
    F.cross_entropy(model(x), y).backward()
    model[2].weight.grad[0, 0] = float("nan")
    before = [p.detach().clone() for p in model.parameters()]
    with caplog.at_level(logging.WARNING, logger="onlinela_torch"):
        assert not pre.step()
    assert all(p.grad is None for p in model.parameters())
    opt.step()  # SGD skips parameters without gradient: nothing moves
    assert all(torch.equal(a, b) for a, b in zip(before, model.parameters()))
    assert "non-finite gradient" in caplog.text
    # 2. NaN in the data: statistics and gradients non-finite (a statistics step)
    opt.zero_grad()
    x_bad = x.clone()
    x_bad[0, 0] = float("nan")
    F.cross_entropy(model(x_bad), y).backward()
    assert not pre.step()
    s = pre.stats()
    assert s["skipped_steps"] == 2
    assert sum(l["A"]["skipped"]["statistics"] for l in s["layers"].values()) >= 1
    assert _all_finite(pre.state_dict())
    # 3. training goes on
    opt.zero_grad()
    F.cross_entropy(model(x), y).backward()
    assert pre.step()
    assert all(torch.isfinite(p.grad).all() for p in model.parameters())


@pytest.mark.parametrize("method", METHODS)
def test_dead_layer_and_rank_deficient_factors_give_finite_steps(method):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 30), nn.ReLU(), nn.Linear(30, 30, bias=False), nn.Linear(30, 3))
    with torch.no_grad():  # layer 0 outputs -1: after the ReLU layer 2 sees all-zero activations
        model[0].weight.zero_()
        model[0].bias.fill_(-1.0)
    pre = KFACPreconditioner(model, method=method, **FAST)
    for k in range(5):
        model.zero_grad()
        x, y = torch.randn(2, 6), torch.randint(0, 3, (2,))  # 2 samples: factors of rank <= 3
        F.cross_entropy(model(x), y).backward()
        assert pre.step()
        assert all(torch.isfinite(p.grad).all() for p in model.parameters() if p.grad is not None)
    assert pre.layers["2"].counters["degenerate"] >= 1
    assert _all_finite(pre.state_dict())


# ---------------------------------------------------------------------------- validation
@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(factor_decay=1.0), "factor_decay"),
        (dict(factor_decay=0.0), "factor_decay"),
        (dict(damping=-1e-3), "damping"),
        (dict(damping=0.0), "damping"),
        (dict(rank=0), "rank"),
        (dict(rank=-5), "rank"),
        (dict(factor_update_freq=0), "factor_update_freq"),
        (dict(inv_update_freq=-1), "inv_update_freq"),
        (dict(method="shampoo"), "method"),
        (dict(kl_clip=0.0), "kl_clip"),
        (dict(fisher="sampled"), "fisher"),
        (dict(oversample=-1), "oversample"),
        (dict(layers="0"), "layers"),
        (dict(brand=BrandConfig(overwrite_period=1), damping_convention="sum"), "damping_convention"),
    ],
)
def test_bad_constructor_arguments_are_rejected(kwargs, match):
    with pytest.raises((ValueError, TypeError), match=match):
        KFACPreconditioner(_mlp(), **kwargs)


def test_bad_configs_and_models_are_rejected():
    with pytest.raises(ValueError, match="correction_period"):
        BrandConfig(correction_period=0)
    with pytest.raises(ValueError, match="no supported layer"):
        KFACPreconditioner(nn.Sequential(nn.ReLU(), nn.PReLU()))
    assert list(KFACPreconditioner(nn.Sequential(nn.ReLU(), nn.BatchNorm1d(3))).blocks.blocks) == ["1"]
    with pytest.raises(ValueError, match="no supported layer"):
        KFACPreconditioner(_mlp(), skip_layers=[nn.Linear])
    with pytest.raises(ValueError, match="factor_update_freq"):
        pre = KFACPreconditioner(_mlp(), factor_update_freq=lambda k: 0)
        _mlp()(torch.randn(2, 10))
        pre.step()
    with pytest.raises(TypeError, match="sets `method`"):
        KFAC(_mlp(), method="rs-kfac")
    model = _mlp()
    pre = KFACPreconditioner(model, fisher="true")
    with pytest.raises(ValueError, match="`likelihood` must be 'categorical', 'bernoulli' or 'gaussian'"):
        pre.fisher_backward(model(torch.randn(2, 10)), likelihood="poisson")


def test_layer_selection_by_name_and_type():
    model = _mlp()
    assert list(KFACPreconditioner(model, layers=["0", "4"]).layers) == ["0", "4"]
    assert list(KFACPreconditioner(model, skip_layers=["2"]).layers) == ["0", "4"]
    assert list(KFACPreconditioner(model, layers=[nn.Linear], skip_layers=["[02]"]).layers) == ["4"]


# ---------------------------------------------------------------------------- composability
def test_optimizer_composes_with_lr_scheduler_and_weight_decay_modes():
    model = _mlp()
    opt = KFAC(model, lr=0.1, weight_decay=1e-2, weight_decay_start=3, **FAST)
    sched = torch.optim.lr_scheduler.StepLR(opt, step_size=2, gamma=0.5)
    for k in range(6):
        _train(opt, model, k + 1, start=k)
        sched.step()
    # the KL clip reads the scheduled lr (and the momentum) from the optimizer
    assert opt.preconditioner.effective_lr(0) == pytest.approx(0.1 * 0.5**3 / (1 - opt.param_groups[0]["momentum"]))
    before = KFAC(_mlp(), lr=0.1, weight_decay=1e-2, weight_decay_mode="before", **FAST)
    _train(before, before.preconditioner.model, 3)
    with pytest.raises(ValueError, match="weight_decay_mode"):
        KFAC(_mlp(), weight_decay_mode="never")


def test_autocast_bfloat16_keeps_float32_factors():
    model = _mlp()
    pre = KFACPreconditioner(model, method="sre-kfac", **FAST)
    for k in range(3):
        model.zero_grad()
        x, y = _batch(k)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            loss = F.cross_entropy(model(x), y)
        loss.backward()
        assert pre.step()
    for layer in pre.layers.values():
        assert layer.A.ea.dtype == torch.float32 and layer.G.ea.dtype == torch.float32
        assert torch.isfinite(layer.A.ea).all() and torch.isfinite(layer.G.ea).all()
    assert all(p.grad.dtype == torch.float32 and torch.isfinite(p.grad).all() for p in model.parameters())


def test_grad_scaler_scale_is_removed_from_the_statistics():
    class Scaler:
        def get_scale(self):
            return 1024.0

    x, y = _batch(0)
    Gs = []
    for scaler, mult in ((None, 1.0), (Scaler(), 1024.0)):
        model = _mlp()
        pre = KFACPreconditioner(model, grad_scaler=scaler, **FAST)
        (F.cross_entropy(model(x), y) * mult).backward()
        pre.step()
        Gs.append(pre.layers["4"].G.dense())
    torch.testing.assert_close(Gs[0], Gs[1], rtol=1e-5, atol=0)


def test_schedules_rank_policies_and_stats():
    model = _mlp()
    pre = KFACPreconditioner(
        model,
        method="rs-kfac",
        factor_update_freq=lambda k: 1 if k < 4 else 2,
        inv_update_freq=2,
        damping=lambda k: 1e-2 / (1 + k),
        rank=AdaptiveRank(start=20, step=5, min_rank=5, max_rank=35),
        oversample=2,
    )
    for k in range(8):
        _train_step(model, pre, k)
    s = pre.stats()
    f = s["layers"]["2"]["A"]
    assert f["kind"] == "randomized" and f["target_rank"] != 20 and f["error"] is not None
    assert set(s["seconds"]) == {"statistics", "decomposition", "preconditioning"}
    assert all(v > 0 for v in s["seconds"].values())
    pre2 = KFACPreconditioner(_mlp(), method="b-kfac", rank=ErrorTargetRank(tol=0.2, start=8, min_rank=2), oversample=2)
    for k in range(3):
        _train_step(pre2.model, pre2, k)
    assert pre2.stats()["layers"]["2"]["G"]["kind"] == "brand"


def _train_step(model, pre, k):
    model.zero_grad()
    x, y = _batch(k)
    F.cross_entropy(model(x), y).backward()
    assert pre.step()


def test_true_fisher_without_fisher_backward_is_counted():
    model = _mlp()
    pre = KFACPreconditioner(model, fisher="true", **FAST)
    _train_step(model, pre, 0)
    assert pre.layers["0"].counters["missing_fisher"] == 1
    assert pre.layers["0"].G is None  # no G statistics: the layer keeps its plain gradient


def test_eigh_failure_retries_in_float64_then_skips(monkeypatch, caplog):
    model = _mlp()
    pre = KFACPreconditioner(model, method="kfac", factor_update_freq=1, inv_update_freq=1)
    _train_step(model, pre, 0)
    good = pre.layers["2"].A.eigen
    real_eigh = torch.linalg.eigh
    calls = []

    def flaky(a, *args, **kw):  # float32 fails, float64 works
        calls.append(a.dtype)
        if a.dtype == torch.float32:
            raise torch.linalg.LinAlgError("simulated convergence failure")
        return real_eigh(a, *args, **kw)

    compat_linalg = importlib.import_module("array_api_compat.torch.linalg")  # onlinela's eigh goes through it
    monkeypatch.setattr(compat_linalg, "eigh", flaky)
    _train_step(model, pre, 1)
    assert torch.float64 in calls and pre.layers["2"].A.eigen is not good
    assert pre.layers["2"].A.eigen.approx.dtype == torch.float32
    assert pre.stats()["layers"]["2"]["A"]["skipped"]["decomposition"] == 0

    def broken(a, *args, **kw):
        raise torch.linalg.LinAlgError("simulated failure in every dtype")

    monkeypatch.setattr(compat_linalg, "eigh", broken)
    kept = pre.layers["2"].A.eigen
    with caplog.at_level(logging.WARNING, logger="onlinela_torch"):
        _train_step(model, pre, 2)
    assert pre.layers["2"].A.eigen is kept  # the last good decomposition stays in use
    assert pre.stats()["layers"]["2"]["A"]["skipped"]["decomposition"] == 1
    assert "skipped the decomposition" in caplog.text


def test_rank_policy_rules():
    ad = AdaptiveRank(start=100, step=10, min_rank=20, max_rank=120, window=2)
    assert ad.next_rank(0, 100, None, [], 1e-3) == 100
    assert ad.next_rank(5, 100, None, [0.01, 0.02], 1e-3) == 90  # mean 0.015 < 0.033 - 0.007: shrink
    assert ad.next_rank(5, 100, None, [0.9, 0.06], 1e-3) == 110  # last two: mean 0.48 > 0.053: grow
    assert ad.next_rank(5, 115, None, [0.9], 1e-3) == 120  # capped at max_rank
    assert ad.next_rank(5, 100, None, [0.03], 1e-3) == 100  # inside the band
    et = ErrorTargetRank(tol=0.1, start=8, min_rank=1, max_rank=50, growth=2.0)
    w = torch.tensor([1.0, 0.5, 0.05, 0.01, 0.001], dtype=torch.float64)
    # damping 0.1: mu = 0.1; e_j = w_j / (mu + w_j) = [.91, .83, .33, .09, .01]: keep 3 pairs
    assert et.next_rank(1, 5, w, [], 0.1) == 3
    assert et.next_rank(1, 5, w[:3], [], 0.1) == 10  # the computed spectrum is too short: grow
    with pytest.raises(ValueError, match="min_rank <= start"):
        AdaptiveRank(start=5, min_rank=10)
