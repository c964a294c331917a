"""``EAFactorRecorder`` (the spectrum command's recorder) on the preconditioner's capture path."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from onlinela_torch.experiment import EAFactorRecorder

DECAY, STEPS, N = 0.9, 3, 8


def _batches():
    g = torch.Generator().manual_seed(0)
    return [(torch.randn(N, 5, generator=g, dtype=torch.float64), torch.randint(0, 3, (N,), generator=g))
            for _ in range(STEPS)]


def _reference(model: nn.Sequential):
    """The EA of ``[a, 1]ᵀ[a, 1] / n`` and ``n · goᵀ go`` computed from retained tensors, step by step."""
    A = G = None
    norms = []
    for x, y in _batches():
        h = model[0](x)
        h.retain_grad()
        F.cross_entropy(model[2](model[1](h)), y).backward()
        a = torch.cat([x, torch.ones(N, 1, dtype=x.dtype)], dim=1)
        inc_a, inc_g = a.T @ a / N, N * h.grad.T @ h.grad
        A = (1 - DECAY) * inc_a if A is None else DECAY * A + (1 - DECAY) * inc_a
        G = (1 - DECAY) * inc_g if G is None else DECAY * G + (1 - DECAY) * inc_g
        norms.append(float(torch.linalg.matrix_norm(inc_g, ord=2)))
        model.zero_grad()
    return A, G, norms


def _model():
    torch.manual_seed(1)
    return nn.Sequential(nn.Linear(5, 4), nn.Tanh(), nn.Linear(4, 3)).double()


def _record(model, run):
    rec = EAFactorRecorder(model[0] if isinstance(model, nn.Sequential) else model._orig_mod[0], decay=DECAY)
    for x, y in _batches():
        F.cross_entropy(run(x), y).backward()
        model.zero_grad()
    rec.remove()
    return rec


def test_recorder_factors_are_the_ea_of_the_captured_rows():
    A, G, norms = _reference(_model())
    model = _model()
    rec = _record(model, model)
    # float64 sums of O(n d) products of O(1) numbers: a few ulps of the entries' scale
    tol = dict(rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(rec.factors["A"], A, **tol)
    torch.testing.assert_close(rec.factors["G"], G, **tol)
    assert rec.increments["A"]["ranks"] == [min(N, 6)] * STEPS
    # the recorded norm is ‖C‖₂ of each increment, from the thin factor against the dense increment
    torch.testing.assert_close(torch.tensor(rec.increments["G"]["norms"]), torch.tensor(norms), **tol)
    evals = rec.eigenvalues("A")
    assert evals.shape == (6,) and bool((evals[:-1] >= evals[1:]).all())


def test_recorder_under_torch_compile_matches_eager():
    eager = _model()
    ref = _record(eager, eager)
    model = _model()
    compiled = torch.compile(model, backend="eager")  # Dynamo traces, no inductor build (CI has 2 cores)
    rec = _record(compiled, compiled)
    # float64, the same kernels (eager backend): agreement to a few ulps of the entries' scale
    for key in ("A", "G"):
        torch.testing.assert_close(rec.factors[key], ref.factors[key], rtol=1e-10, atol=1e-12)
    assert len(rec.increments["A"]["norms"]) == STEPS


def test_recorder_rejects_an_unsupported_layer():
    with pytest.raises(TypeError, match="layer"):
        EAFactorRecorder(nn.LSTM(3, 3))
    with pytest.raises(ValueError, match="decay"):
        EAFactorRecorder(nn.Linear(3, 3), decay=1.0)
