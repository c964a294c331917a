"""Output-gradient vectors whose back-propagation gives the true or exact Fisher's ``G`` (``fisher_backward``)."""

from __future__ import annotations

from typing import Literal

import torch

__all__: list[str] = []


def label_vectors(
    f: torch.Tensor,
    likelihood: Literal["categorical", "bernoulli", "gaussian"],
    *,
    exact: bool,
    n_samples: int,
    gen: torch.Generator | None,
) -> tuple[list[torch.Tensor], float]:
    r"""The vectors to back-propagate from the outputs ``f`` (shape ``(n, ..., C)``) and the weight of each.

    ``exact``: the ``C`` columns of a square root of the loss Hessian
    (``√p_c (p - e_c)``, ``√(p_c (1 - p_c)) e_c`` or ``e_c``), weight 1 — the
    expectation over labels, exactly.  Otherwise ``n_samples`` Monte-Carlo
    label gradients ``p - y`` (``y`` drawn from the predictive distribution with
    ``gen``; Gaussian: unit-variance noise), weight ``1 / n_samples``.
    """
    C = f.shape[-1]
    if exact:
        eye = torch.eye(C, device=f.device, dtype=f.dtype)
        if likelihood == "categorical":
            p = torch.softmax(f, -1)
            return [p[..., c : c + 1].sqrt() * (p - eye[c]) for c in range(C)], 1.0
        if likelihood == "bernoulli":
            p = torch.sigmoid(f)
            root = (p * (1.0 - p)).sqrt()
            return [root * eye[c] for c in range(C)], 1.0
        return [eye[c].expand_as(f) for c in range(C)], 1.0
    if likelihood == "categorical":
        p = torch.softmax(f, -1)
        flat = p.reshape(-1, C)
        vecs = []
        for _ in range(n_samples):
            y = torch.multinomial(flat, 1, generator=gen).reshape(p.shape[:-1])
            vecs.append(p - torch.nn.functional.one_hot(y, C).to(p.dtype))
    elif likelihood == "bernoulli":
        p = torch.sigmoid(f)
        vecs = [p - torch.bernoulli(p, generator=gen) for _ in range(n_samples)]
    else:
        vecs = [torch.randn(f.shape, generator=gen, device=f.device, dtype=f.dtype) for _ in range(n_samples)]
    return vecs, 1.0 / n_samples
