"""A ``torch.compile``-d model trains as the eager one, without recompilations per step, and checkpoints port.

Dynamo's ``backend="eager"`` (graph capture without code generation, no C
compiler needed, seconds on CPU) is what the capture hooks interact with;
inductor changes only the kernels.
"""

from __future__ import annotations

import logging

import pytest
import torch
from torch import nn

from onlinela_torch import KFACPreconditioner
from onlinela_torch.compiled import clean_name


def _model() -> nn.Module:
    torch.manual_seed(0)
    layers: list[nn.Module] = []
    for _ in range(10):  # more layers than Dynamo's recompile limit (8): a per-layer or per-step guard would hit it
        layers += [nn.Linear(6, 6), nn.Tanh()]
    return nn.Sequential(*layers, nn.LayerNorm(6), nn.Linear(6, 3))


def _train(compiled: str | None, steps: int = 12, state=None):
    model = _model()
    if compiled == "before":
        run = torch.compile(model, backend="eager")
        pre = KFACPreconditioner(run, method="rs-kfac", factor_update_freq=2, inv_update_freq=4)
    else:
        pre = KFACPreconditioner(model, method="rs-kfac", factor_update_freq=2, inv_update_freq=4)
        run = torch.compile(model, backend="eager") if compiled == "after" else model
    if state is not None:
        pre.load_state_dict(state)
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    g = torch.Generator().manual_seed(1)
    for _ in range(steps):
        x = torch.randn(16, 6, generator=g)
        opt.zero_grad()
        run(x).square().mean().backward()
        pre.step()
        opt.step()
    return [p.detach().clone() for p in model.parameters()], pre


@pytest.mark.parametrize("when", ["before", "after"])
def test_compiled_model_trains_as_eager_without_recompile_limit(when, caplog):
    torch._dynamo.reset()
    ref, pre_eager = _train(None)
    with caplog.at_level(logging.WARNING, logger="torch._dynamo"):
        got, pre = _train(when)
    assert "recompile_limit" not in caplog.text and "cache_size_limit" not in caplog.text
    for a, b in zip(ref, got):  # the same operations in the same order: equal up to float32 round-off
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
    assert list(pre.layers) == list(pre_eager.layers)  # no "_orig_mod." in the names
    assert set(pre.blocks.blocks) == set(pre_eager.blocks.blocks)
    assert pre.stats()["step"] == 12 and pre.stats()["skipped_steps"] == 0


def test_checkpoints_port_between_compiled_and_eager():
    torch._dynamo.reset()
    _, pre_compiled = _train("before", steps=6)
    _, pre_eager = _train(None, steps=6)
    sd = pre_compiled.state_dict()
    assert set(sd["layers"]) == set(pre_eager.state_dict()["layers"])
    _, resumed = _train(None, steps=2, state=sd)  # loads without a name mismatch
    assert resumed.steps == 8


def test_clean_name_drops_only_the_wrapper_segments():
    assert clean_name("_orig_mod.0") == "0"
    assert clean_name("encoder._orig_mod.layers.1") == "encoder.layers.1"
    assert clean_name("_orig_mod") == ""
    assert clean_name("my_orig_mod.0") == "my_orig_mod.0"
