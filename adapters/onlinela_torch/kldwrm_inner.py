r"""QE's inner loop: heavy-ball steps on the exact-KL wake from the Q point (algorithms.md §5).

:func:`inner_loop` minimises, over the preconditioned layers' parameters,
``g_kᵀ(θ-θ_k) + (γ/2) ‖θ-θ_k‖²_{F_k} + (λ/2) Σ_j w_j symKL(p_{θ_{k-j}}, p_θ)``
on the current batch, ``λ = kl_weight / lr_k`` and ``w_j ∝ ρ^j`` over the
last ``n_stored`` networks, by ``inner_steps`` heavy-ball steps started at the
Q point; it then writes ``p.grad = -(θ_final - θ_k)/lr_k`` so that a plain
SGD step lands on ``θ_final``.  Internal to :class:`~onlinela_torch.KLDWRM`
(docs/kldwrm.rst).
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Callable, Iterable

import torch
from torch import nn

from .kldwrm_capture import LocalStatistics
from .kldwrm_wake import Wake, matrix, param_matrix
from .modules import LayerHelper

__all__: list[str] = []

logger = logging.getLogger(__name__)


def inner_loop(wake: Wake, model: nn.Module, closure: Callable[[], torch.Tensor], comm: LocalStatistics | None) -> None:
    """QE: inner heavy-ball steps from the Q point; writes ``-(θ_final - θ_k)/lr`` into the gradients.

    Parameters
    ----------
    wake : Wake
        This step's state: raw gradients ``wake.pending``, ``lrs``, local
        factors, the stored networks ``wake.history``; its counters
        ``inner_capped`` and ``inner_fallbacks`` and ``seconds["inner"]`` are updated.
    model : torch.nn.Module
        Run in ``eval()`` mode during the loop, its mode restored after.
    closure : callable
        ``closure() -> Tensor (n, ..., C)``, the batch's logits.
    comm : LocalStatistics or None
        Distributed: all-reduces the KL gradients, weighted by each rank's
        share of the batch rows; None in one process.

    Notes
    -----
    Cost ``n_stored + inner_steps`` forward and ``inner_steps`` backward
    passes; the parameters are always restored to ``θ_k``.  No inner step is
    longer than the Q step (counted ``inner_capped``); a non-finite result
    keeps the Q step (counted ``inner_fallbacks``, logged).
    """
    layers = wake.preconditioner.layers
    lrs = wake.lrs
    names = [n for n in wake.pending if lrs[n] > 0 and layers[n].module.weight.grad is not None]
    if not names:
        return
    t0 = time.perf_counter()
    cfg = wake.config
    lam = cfg.kl_weight / lrs[names[0]]
    params = wake.params
    with torch.no_grad():
        theta_k = [p.detach().clone() for p in params]
    stored = [theta_k, *reversed(wake.history)][: cfg.n_stored]
    weights = [wake.rho**j for j in range(len(stored))]
    weights = [w / sum(weights) for w in weights]
    layer_params = [_layer_params(layers[n].helper) for n in names]
    flat = [p for ps in layer_params for p in ps]
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            refs = []
            for snap in stored:
                _load(params, snap)
                refs.append(_log_probs(_outputs(closure)))
            _load(params, theta_k)
            theta0 = {n: param_matrix(layers[n].helper) for n in names}
            x = {n: theta0[n] - lrs[n] * layers[n].helper.grad_matrix() for n in names}
            buf = {n: torch.zeros_like(x[n]) for n in names}
            # trust region of the inner loop: no inner step longer than the Q step itself, so a stiff
            # KL or local-curvature term cannot make the heavy-ball iteration diverge
            radius = {n: float((x[n] - theta0[n]).norm()) for n in names}
            share = comm.row_share(refs[0].shape[0]) if comm is not None else 1.0
        for _ in range(cfg.inner_steps):
            with torch.no_grad():
                for n in names:
                    _set_param_matrix(layers[n].helper, x[n])
            with torch.enable_grad():
                logq = _log_probs(_outputs(closure), detach=False)
                kl = sum(w * _sym_kl(logq, ref) for w, ref in zip(weights, refs))
                kl_grads = torch.autograd.grad(0.5 * lam * kl, flat, allow_unused=True)
            if comm is not None:
                kl_grads = comm.reduce_kl_grads(
                    [torch.zeros_like(p) if gr is None else gr for p, gr in zip(flat, kl_grads)], share
                )
            with torch.no_grad():
                i = 0
                for n, ps in zip(names, layer_params):
                    gs = [torch.zeros_like(p) if gr is None else gr for p, gr in zip(ps, kl_grads[i : i + len(ps)])]
                    i += len(ps)
                    h = wake.pending[n].to(x[n].dtype) + matrix(layers[n].helper, *gs)
                    local = wake.local.get(n)
                    if local is not None and cfg.local_curvature > 0:
                        A, G = local
                        h = h + cfg.local_curvature * G.left(A.right(x[n] - theta0[n]))
                    buf[n].mul_(cfg.inner_momentum).add_(h)
                    step = buf[n] * (cfg.inner_lr * lrs[n])
                    norm = float(step.norm())
                    if not norm <= radius[n]:  # also catches a non-finite step
                        wake.counters["inner_capped"] += 1
                        step = step * (radius[n] / norm) if math.isfinite(norm) and norm > 0 else torch.zeros_like(step)
                        buf[n].copy_(step / (cfg.inner_lr * lrs[n]))
                    x[n].sub_(step)
        with torch.no_grad():
            steps = {n: (x[n] - theta0[n]) / -lrs[n] for n in names}
            if bool(torch.stack([torch.isfinite(s).all() for s in steps.values()]).all()):
                for n in names:
                    layers[n].helper.set_grad_matrix(steps[n])
            else:
                wake.counters["inner_fallbacks"] += 1
                logger.warning(
                    "step %d: non-finite QE inner loop; the Q step is applied", wake.preconditioner.steps - 1
                )
    finally:
        with torch.no_grad():
            _load(params, theta_k)
        model.train(was_training)
        wake.seconds["inner"] += time.perf_counter() - t0


def _layer_params(helper: LayerHelper) -> list[torch.Tensor]:
    """``[weight]`` or ``[weight, bias]`` of a layer."""
    mod = helper.module
    return [mod.weight, mod.bias] if helper.has_bias else [mod.weight]


def _set_param_matrix(helper: LayerHelper, mat: torch.Tensor) -> None:
    """Write ``[W | b]`` into the layer's parameters in place (under ``no_grad``)."""
    mod = helper.module
    n_w = helper.a_dim - int(helper.has_bias)
    mod.weight.copy_(mat[:, :n_w].reshape(mod.weight.shape))
    if helper.has_bias:
        mod.bias.copy_(mat[:, n_w].reshape(mod.bias.shape))


def _load(params: Iterable[torch.Tensor], values: Iterable[torch.Tensor]) -> None:
    """Copy ``values`` into ``params`` in place."""
    for p, v in zip(params, values):
        p.copy_(v)


def _outputs(closure: Callable[[], torch.Tensor]) -> torch.Tensor:
    """The closure's logits, checked to be a tensor of at least one dimension."""
    out = closure()
    if not isinstance(out, torch.Tensor) or out.ndim < 1:
        got = f"a tensor of shape {tuple(out.shape)}" if isinstance(out, torch.Tensor) else type(out).__name__
        raise TypeError(f"`closure` must return the model's logits on the batch, a tensor of shape (n, ..., C); got {got}")
    return out


def _log_probs(out: torch.Tensor, *, detach: bool = True) -> torch.Tensor:
    """Log-softmax over the last dimension, rows flattened to (N, C), at least float32."""
    out = out.reshape(-1, out.shape[-1])
    if out.dtype not in (torch.float32, torch.float64):
        out = out.float()
    logp = torch.log_softmax(out, dim=-1)
    return logp.detach() if detach else logp


def _sym_kl(logq: torch.Tensor, logp: torch.Tensor) -> torch.Tensor:
    """Mean over rows of ``KL(p‖q) + KL(q‖p) = Σ_c (q_c - p_c)(log q_c - log p_c)``."""
    return ((logq.exp() - logp.exp()) * (logq - logp)).sum(-1).mean()
