"""The Levenberg–Marquardt bookkeeping of the K-FAC optimizers (quadratic.LevenbergMarquardt).

What tests/test_adaptive.py does not reach: a due step without a closure, and
the rule's counters and last values across ``state_dict`` / ``load_state_dict``
(the rule holds the optimizer's dicts, so a restore must keep them shared).
Exact comparisons: the same float64 operations on the same inputs.
"""

from __future__ import annotations

import logging

import torch
import torch.nn.functional as F
from torch import nn

from onlinela_torch import KFAC, AdaptiveDamping

INTERVAL, STEPS = 2, 5


def _setup(seed: int = 0) -> tuple[nn.Module, torch.Tensor, torch.Tensor]:
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Linear(5, 4), nn.Tanh(), nn.Linear(4, 3)).double()
    return model, torch.randn(16, 5, dtype=torch.float64), torch.randint(0, 3, (16,))


def test_a_due_step_without_closure_skips_the_rule_counts_it_and_warns_once(caplog):
    model, x, y = _setup()
    opt = KFAC(model, lr=0.1, adaptive_damping=AdaptiveDamping(interval=INTERVAL))
    damping0 = opt.stats()["optimizer"]["damping"]
    with caplog.at_level(logging.WARNING, logger="onlinela_torch"):
        for _ in range(STEPS):
            opt.zero_grad()
            F.cross_entropy(model(x), y).backward()
            opt.step()
    st = opt.stats()["optimizer"]
    due = sum(1 for k in range(STEPS) if k % INTERVAL == 0)
    assert st["lm_skipped"] == due > 1 and st["lm_updates"] == 0
    assert st["damping"] == damping0 and st["last"] == {}
    assert caplog.text.count("adaptive_damping needs step(closure)") == 1


def _train(opt: KFAC, model: nn.Module, x: torch.Tensor, y: torch.Tensor, steps: int) -> None:
    for _ in range(steps):
        def closure() -> torch.Tensor:
            opt.zero_grad()
            loss = F.cross_entropy(model(x), y)
            loss.backward()
            return loss

        opt.step(closure)


def test_the_rule_continues_bitwise_after_a_restore():
    """Run 2·STEPS steps, or STEPS, a restore into a fresh optimizer, STEPS more: same damping, counters, parameters."""
    model, x, y = _setup()
    opt = KFAC(model, lr=0.1, adaptive_damping=AdaptiveDamping(interval=INTERVAL))
    _train(opt, model, x, y, 2 * STEPS)

    model2, _, _ = _setup()
    opt2 = KFAC(model2, lr=0.1, adaptive_damping=AdaptiveDamping(interval=INTERVAL))
    _train(opt2, model2, x, y, STEPS)
    sd = opt2.state_dict()
    model3, _, _ = _setup()
    model3.load_state_dict(model2.state_dict())
    opt3 = KFAC(model3, lr=0.1, adaptive_damping=AdaptiveDamping(interval=INTERVAL))
    opt3.load_state_dict(sd)
    _train(opt3, model3, x, y, STEPS)

    a, b = opt.stats()["optimizer"], opt3.stats()["optimizer"]
    assert a["lm_updates"] == b["lm_updates"] == sum(1 for k in range(2 * STEPS) if k % INTERVAL == 0)
    for key in ("damping", "last", "lm_skipped", "auto_fallback"):
        assert a[key] == b[key], key
    for p, q in zip(model.parameters(), model3.parameters()):
        assert torch.equal(p, q)
