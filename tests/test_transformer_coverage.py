"""One step of the K-FAC family on a small causal transformer rewrites every parameter's gradient.

Attention (packed q/k/v and out_proj), embeddings and LayerNorms go through
their curvature blocks, the Linear layers through the Kronecker path; nothing
is left uncovered.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from onlinela_torch import KFACPreconditioner
from onlinela_torch.models import TinyCausalLM


@pytest.mark.parametrize("method", ["kfac", "rs-kfac", "b-kfac"])
def test_one_step_rewrites_every_parameter_of_a_tiny_lm(method):
    torch.manual_seed(0)
    model = TinyCausalLM(vocab_size=20, d_model=16, n_layers=1, n_heads=2, context=12)
    sgd = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    pre = KFACPreconditioner(model, method=method, optimizer=sgd, rank=8)
    x = torch.randint(0, 20, (4, 13))
    for _ in range(2):  # the second step has curvature everywhere
        sgd.zero_grad()
        F.cross_entropy(model(x[:, :-1]).reshape(-1, 20), x[:, 1:].reshape(-1)).backward()
        before = {n: p.grad.clone() for n, p in model.named_parameters()}
        assert pre.step()
        sgd.step()
    changed = [n for n, p in model.named_parameters() if not torch.equal(p.grad, before[n])]
    total = sum(p.numel() for p in model.parameters())
    frac = sum(p.numel() for n, p in model.named_parameters() if n in changed) / total
    assert frac >= 0.95, sorted(set(before) - set(changed))
    assert pre.stats()["uncovered"] == []
    assert all(torch.isfinite(p).all() for p in model.parameters())
