"""The block interface: context validation, capture gating, sampled Fisher, registry, coverage report."""

from __future__ import annotations

import logging

import pytest
import torch
from torch import nn

from onlinela_torch import blocks as B

DT = torch.float64


def lin_block(ctx, d_in=3, d_out=2):
    torch.manual_seed(0)
    lin = nn.Linear(d_in, d_out).to(DT)
    ctx.watch(lin)
    blk = B.block_for("lin", lin, ctx)
    blk.attach()
    return lin, blk


@pytest.mark.parametrize(
    "kw,word",
    [
        (dict(fisher="fake"), "fisher"),
        (dict(loss_reduction="avg"), "loss_reduction"),
        (dict(loss_terms="tokens"), "loss_terms"),
        (dict(damping_convention="both"), "damping_convention"),
        (dict(complement="one"), "complement"),
        (dict(factor_decay=1.0), "factor_decay"),
        (dict(factor_dtype=torch.float16), "factor_dtype"),
    ],
)
def test_context_rejects_bad_settings_naming_them(kw, word):
    with pytest.raises(ValueError, match=word):
        B.BlockContext(**kw)
    with pytest.raises(TypeError, match="plan"):
        B.BlockContext(plan=3)


def test_capture_only_in_training_with_grad_on_statistics_steps():
    flags = {"ea": True}
    ctx = B.BlockContext(plan=lambda: B.StepFlags(ea=flags["ea"]), factor_dtype=DT, inv_dtype=DT)
    lin, blk = lin_block(ctx)
    x = torch.randn(4, 3, dtype=DT)
    lin.eval()
    lin(x).sum().backward()
    lin.train()
    with torch.no_grad():
        lin(x)
    flags["ea"] = False
    lin(x).sum().backward()
    assert blk.factors.A.rows == 0 and blk.factors.G.state is None
    flags["ea"] = True
    lin(x).sum().backward()
    assert blk.factors.A.rows == 4
    blk.detach()
    lin(x).sum().backward()
    assert blk.factors.A.rows == 4


def test_no_capture_inside_torch_func_transforms():
    from torch.func import functional_call, grad

    ctx = B.BlockContext(factor_dtype=DT, inv_dtype=DT)
    lin, blk = lin_block(ctx)
    params = {k: v.detach() for k, v in lin.named_parameters()}
    grad(lambda p: functional_call(lin, p, (torch.randn(4, 3, dtype=DT),)).sum())(params)
    assert blk.factors.A.rows == 0 and blk.factors.A.state is None


def test_sampled_backward_weights_rows_and_the_real_backward_is_ignored_for_true_fisher(caplog):
    ctx = B.BlockContext(fisher="true", grad_scale=lambda: 4.0, factor_dtype=DT, inv_dtype=DT)
    lin, blk = lin_block(ctx)
    x = torch.randn(5, 3, dtype=DT)
    out = lin(x)
    v = torch.randn_like(out)
    ctx.sampling = 0.25
    torch.autograd.grad(out, [lin.weight], grad_outputs=v, retain_graph=True)
    ctx.sampling = None
    out.sum().backward()  # the real loss: not in G for fisher="true"
    blk.update(decompose=True, damping=1e-3, step=0)
    rows = v * (0.25**0.5) / 4.0
    torch.testing.assert_close(blk.factors.G.state.dense(), 5 * rows.T @ rows, rtol=1e-12, atol=1e-14)
    # a statistics step without any sampled backward is counted and logged
    lin(x).sum().backward()
    with caplog.at_level(logging.WARNING):
        blk.update(decompose=True, damping=1e-3, step=1)
    assert blk.counters["missing_fisher"] == 1 and "no sampled-label backward" in caplog.text


class Scale(nn.Module):
    """y = s ⊙ x: a custom layer for the registry tests."""

    def __init__(self, d):
        super().__init__()
        self.s = nn.Parameter(torch.ones(d, dtype=DT))

    def forward(self, x):
        return self.s * x


class ScaleBlock(B.CurvatureBlock):
    """Diagonal empirical Fisher of ``s`` (the docs/layers.rst example, verbatim in substance)."""

    kind = "scale"

    def __init__(self, name, module, ctx):
        super().__init__(name, module, ctx)
        self.stat = B.TensorEA(module.s.shape, ctx.factor_decay, ctx.factor_dtype, module.s.device)

    def params(self):
        return [(f"{self.name}.s", self.module.s)]

    def _attach(self):
        return [self.module.register_forward_hook(self._hook)]

    def _hook(self, module, inputs, output):
        if module.training and torch.is_grad_enabled() and self.ctx.capturing():
            x = inputs[0].detach()
            self._record_call(x.shape[0])
            def on_grad(g):
                w = self.ctx.output_weight()  # None: not part of the statistics
                if w is not None:
                    self.stat.add(((w * g * x) ** 2).sum(0))

            output.register_hook(on_grad)

    def _update(self, *, decompose, damping, step):
        if not self.stat.update(self.ctx.g_scale(self._terms)):
            self._skip(step, "non-finite statistics")
        if decompose:
            self.stat.refresh()

    def _discard(self):
        self.stat.discard()

    @property
    def has_curvature(self):
        return self.stat.snapshot is not None

    def _precondition(self, grads, damping):
        F_ = self.stat.snapshot
        return {self.module.s: grads[self.module.s] / (F_ + damping * F_.max())}

    def _state(self):
        return self.stat.state_dict()

    def _load(self, state):
        self.stat.load_state_dict(state, f"block {self.name!r}")

    def _dims(self):
        return {"s": self.module.s.numel()}


def test_register_block_for_a_custom_layer_and_mro_lookup():
    model = nn.Sequential(Scale(3), nn.PReLU().to(DT))
    bs = B.build_blocks(model, B.BlockContext())
    assert not bs.blocks and {u.name for u in bs.uncovered} == {"0.s", "1.weight"}
    assert all("no curvature block is registered" in u.why for u in bs.uncovered)
    B.register_block(Scale, ScaleBlock)
    try:
        ctx = B.BlockContext(factor_dtype=DT, inv_dtype=DT)
        ctx.watch(model)
        bs = B.build_blocks(model, ctx)
        bs.attach()
        x = torch.randn(4, 3, dtype=DT)
        model(x).sum().backward()
        bs.update(decompose=True, damping=1e-3, step=0)
        new = bs.precondition(1e-3)
        a = model[1].weight.detach()
        g = torch.where(x > 0, torch.ones_like(x), a)  # output gradient of Scale (s = 1) through PReLU
        Fs = 4 * ((g * x) ** 2).sum(0)  # loss_reduction "mean" with M = 4: M Σ_n (g_n x_n)²
        torch.testing.assert_close(new[model[0].s], model[0].s.grad / (Fs + 1e-3 * Fs.max()))
        assert bs.stats()["blocks"]["0"]["kind"] == "scale" and [u.name for u in bs.uncovered] == ["1.weight"]

        class SubScale(Scale):
            pass

        assert isinstance(B.block_for("x", SubScale(2), ctx), ScaleBlock)  # via the MRO
        assert isinstance(B.block_for("x", type("MyLinear", (nn.Linear,), {})(2, 2), ctx), B.LinearBlock)
    finally:
        del B.base._REGISTRY[Scale]
    with pytest.raises(TypeError, match="module_type"):
        B.register_block(int, ScaleBlock)
    with pytest.raises(TypeError, match="factory"):
        B.register_block(Scale, "not callable")


def test_unsupported_configurations_and_selection_are_reported_with_reasons():
    model = nn.Sequential(nn.Conv1d(4, 4, 3, groups=2), nn.Conv2d(2, 2, 3, padding_mode="circular"), nn.Linear(2, 2))
    bs = B.build_blocks(model, B.BlockContext(), select=lambda name, m: name != "2")
    why = {u.name: u.why for u in bs.uncovered}
    assert "groups=2" in why["0.weight"] and "circular" in why["1.weight"] and why["2.weight"] == "not selected"
    assert not bs.blocks
    frozen = nn.Linear(2, 2).requires_grad_(False)
    assert B.block_or_reason("f", frozen, B.BlockContext()) == (None, "")


def test_block_set_helpers_precondition_everything_once():
    torch.manual_seed(1)
    model = nn.Sequential(nn.Linear(3, 4), nn.LayerNorm(4), nn.Linear(4, 2)).to(DT)
    ctx = B.BlockContext(factor_dtype=DT, inv_dtype=DT)
    ctx.watch(model)
    bs = B.build_blocks(model, ctx)
    bs.attach()
    assert len(bs.fisher_params()) == 3  # one weight per block triggers its output hook
    model(torch.randn(6, 3, dtype=DT)).square().mean().backward()
    bs.update(decompose=True, damping=1e-3, step=0)
    new = bs.precondition(1e-3)
    assert set(new) == set(model.parameters())
    assert all(not torch.equal(new[p], p.grad) for p in model.parameters())
    st = bs.stats()
    assert st["blocks"]["0"]["dims"] == {"A": 4, "G": 4} and st["uncovered"] == [] and st["shared"] == []
    with pytest.raises(ValueError, match="the state holds blocks"):
        bs.load_state_dict({"0": st})
