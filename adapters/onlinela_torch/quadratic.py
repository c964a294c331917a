r"""The quadratic model of a step: exact curvature–vector products, the (α, μ) solve, the LM damping rule.

Martens & Grosse (2015), §6.5 and §7 (algorithms.md §8).  With ``h`` the
batch loss, ``g = ∇h``, ``Δ`` the preconditioned direction, ``δ₀`` the
previous update and ``C = F + λ I`` (``F`` the exact GGN or Hessian of the
batch, ``λ`` per parameter block), the model of a step ``δ`` is
``q(δ) = ½ δᵀCδ + gᵀδ``.

* :func:`curvature_products`: ``C v`` for a few vectors, exact on the batch:
  the Gauss–Newton product ``Jᵀ H_L J v`` by double backward when the model
  outputs are known (three backward passes per vector), else the Hessian
  product ``∇(gᵀv)`` (one double-backward pass per vector).
* :func:`solve_step`: ``(α, μ)`` minimising ``q(αΔ + μδ₀)``: the 2×2 system
  ``[[ΔᵀCΔ, ΔᵀCδ₀], [δ₀ᵀCΔ, δ₀ᵀCδ₀]] [α, μ]ᵀ = -[gᵀΔ, gᵀδ₀]ᵀ``, and the
  predicted change ``q`` of the solution.
* :func:`lm_adjust`: the Levenberg–Marquardt rule on the reduction ratio
  ``ρ = (h(θ+δ) − h(θ)) / q(δ)``.
* :class:`LevenbergMarquardt`: that rule run on a preconditioner's damping by
  the K-FAC optimizers (the bookkeeping: when, the K-FAC model's prediction,
  the re-evaluated loss, the counters).
"""

from __future__ import annotations

import math
from collections.abc import Callable, MutableMapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch

from onlinela import validation as V

__all__ = ["AdaptiveDamping", "StepSolution", "curvature_products", "lm_adjust", "solve_step"]

Vectors = Sequence[torch.Tensor]


@dataclass(frozen=True)
class AdaptiveDamping:
    r"""Levenberg–Marquardt adaptation of the damping (Martens & Grosse 2015, §6.5).

    Every ``interval`` steps the optimizer compares the actual change of the
    batch loss with the quadratic model's prediction, ``ρ = Δh / q(δ)``:
    ``ρ > 3/4`` multiplies the damping by ``omega``, ``ρ < 1/4`` divides it
    by ``omega`` (more damping when the model was too optimistic).

    Parameters
    ----------
    interval : int >= 1
        ``T₁`` (the paper: 5).  Costs one extra forward pass every ``T₁`` steps.
    omega : float in (0, 1) or None
        ``ω``; None gives the paper's ``(19/20)^T₁``.
    min_damping, max_damping : float > 0
        Bounds of the relative damping ``λ`` the rule may reach.
    """

    interval: int = 5
    omega: float | None = None
    min_damping: float = 1e-6
    max_damping: float = 10.0

    def __post_init__(self) -> None:
        V.check_int(self.interval, "interval", low=1)
        if self.omega is not None:
            V.check_real(self.omega, "omega", low=0.0, high=1.0, low_open=True, high_open=True)
        V.check_real(self.min_damping, "min_damping", low=0.0, low_open=True)
        V.check_real(self.max_damping, "max_damping", low=self.min_damping)

    @property
    def factor(self) -> float:
        """``ω`` in effect."""
        return self.omega if self.omega is not None else (19.0 / 20.0) ** self.interval


@dataclass(frozen=True)
class StepSolution:
    """Result of :func:`solve_step`.

    Attributes
    ----------
    alpha, mu : float
        Coefficients of ``Δ`` and ``δ₀``.
    predicted : float
        ``q(αΔ + μδ₀)`` (≤ 0 when the 2×2 matrix is positive definite).
    fallback : str or None
        Why the 2×2 solve was not used: ``"no_previous"`` (first step: the 1-D
        minimiser ``α = −gᵀΔ / ΔᵀCΔ``), ``"indefinite"`` (the model has no
        minimiser on the span; ``α = μ = 0``), or None.
    """

    alpha: float
    mu: float
    predicted: float
    fallback: str | None


def _dot(xs: Vectors, ys: Vectors) -> float:
    return float(sum(torch.sum(x.double() * y.double()) for x, y in zip(xs, ys)))


def solve_step(
    g: Vectors, delta: Vectors, c_delta: Vectors, prev: Vectors | None = None, c_prev: Vectors | None = None
) -> StepSolution:
    r"""``(α, μ)`` minimising ``q(αΔ + μδ₀) = ½ δᵀCδ + gᵀδ`` over the span of ``Δ`` and ``δ₀``.

    Parameters
    ----------
    g, delta, c_delta : sequences of Tensor
        The gradient, the direction ``Δ`` and ``CΔ``, one tensor per parameter.
    prev, c_prev : sequences of Tensor, optional
        ``δ₀`` and ``Cδ₀``; without them (or with ``δ₀ = 0``) the 1-D solve.

    Returns
    -------
    StepSolution
        In float64 arithmetic.  Cost ``O(P)`` for ``P`` parameters.
    """
    dCd = _dot(delta, c_delta)
    gd = _dot(g, delta)
    if prev is None or c_prev is None or _dot(prev, prev) == 0.0:
        if not dCd > 0:
            return StepSolution(0.0, 0.0, 0.0, "indefinite")
        a = -gd / dCd
        return StepSolution(a, 0.0, 0.5 * a * a * dCd + a * gd, "no_previous")
    pCp = _dot(prev, c_prev)
    dCp = 0.5 * (_dot(delta, c_prev) + _dot(prev, c_delta))  # symmetrised against round-off
    gp = _dot(g, prev)
    det = dCd * pCp - dCp * dCp
    if not (dCd > 0 and pCp > 0 and det > 1e-12 * dCd * pCp):
        if dCd > 0:  # degenerate span (δ₀ ∥ Δ) or indefinite in δ₀: the 1-D solve along Δ
            a = -gd / dCd
            return StepSolution(a, 0.0, 0.5 * a * a * dCd + a * gd, "indefinite" if pCp <= 0 else "no_previous")
        return StepSolution(0.0, 0.0, 0.0, "indefinite")
    a = (-gd * pCp + gp * dCp) / det
    m = (-gp * dCd + gd * dCp) / det
    q = 0.5 * (a * a * dCd + 2 * a * m * dCp + m * m * pCp) + a * gd + m * gp
    return StepSolution(a, m, q, None)


def curvature_products(
    loss: torch.Tensor,
    params: Sequence[torch.Tensor],
    vectors: Sequence[Vectors],
    *,
    outputs: torch.Tensor | None = None,
    grads: Vectors | None = None,
) -> list[list[torch.Tensor]]:
    r"""Exact curvature–vector products on the batch: ``F v`` for each ``v`` in ``vectors``.

    Parameters
    ----------
    loss : Tensor, scalar
        The batch loss, its graph intact (``retain_graph`` is used throughout).
    params : sequence of Tensor
        The parameters ``θ`` (``requires_grad``).
    vectors : sequence of sequences of Tensor
        Each ``v`` has one tensor per parameter, of the parameter's shape.
    outputs : Tensor, optional
        The model outputs ``f(θ)`` that ``loss`` is computed from.  Given:
        the generalised Gauss–Newton product ``Jᵀ H_L J v`` (the exact Fisher
        for the usual likelihoods; PSD for a convex loss), by the double-backward
        trick (``Jv`` as the derivative of ``Jᵀu`` in ``u``).  Cost about three
        backward passes per vector.
    grads : sequence of Tensor, optional
        Without ``outputs``: ``∇h`` computed with ``create_graph=True``; the
        Hessian product ``∇(∇hᵀ v)``, one double-backward pass per vector.

    Returns
    -------
    list of lists of Tensor
        ``F v`` per vector, detached, shapes of ``params``.
    """
    out: list[list[torch.Tensor]] = []
    if outputs is not None:
        u = torch.zeros_like(outputs, requires_grad=True)
        jt_u = torch.autograd.grad(outputs, params, u, create_graph=True, allow_unused=True)
        pairs = [(j, p) for j, p in zip(jt_u, params) if j is not None]
        g_out = torch.autograd.grad(loss, outputs, create_graph=True)[0]
        for v in vectors:
            vs = [vi for j, vi in zip(jt_u, v) if j is not None]
            jv = torch.autograd.grad([j for j, _ in pairs], u, vs, retain_graph=True)[0]
            hjv = torch.autograd.grad(g_out, outputs, jv, retain_graph=True)[0]
            gv = torch.autograd.grad(outputs, params, hjv, retain_graph=True, allow_unused=True)
            out.append([torch.zeros_like(p) if x is None else x.detach() for x, p in zip(gv, params)])
        return out
    if grads is None:
        raise ValueError("curvature_products needs `outputs` (Gauss-Newton) or `grads` with a graph (Hessian)")
    for v in vectors:
        hv = torch.autograd.grad(grads, params, v, retain_graph=True, allow_unused=True)
        out.append([torch.zeros_like(p) if x is None else x.detach() for x, p in zip(hv, params)])
    return out


def lm_adjust(damping: float, rho: float, cfg: AdaptiveDamping) -> float:
    r"""One Levenberg–Marquardt update of the relative damping from the reduction ratio ``ρ``.

    ``ρ > 3/4`` → ``λ·ω`` (the model is good: trust it more); ``ρ < 1/4`` or
    ``ρ`` not finite → ``λ/ω`` (too optimistic: damp more); otherwise unchanged.
    The result is clamped to ``[cfg.min_damping, cfg.max_damping]``.
    """
    w = cfg.factor
    if not math.isfinite(rho) or rho < 0.25:
        damping = damping / w
    elif rho > 0.75:
        damping = damping * w
    return min(max(damping, cfg.min_damping), cfg.max_damping)


class LevenbergMarquardt:
    r"""The Levenberg–Marquardt rule (:func:`lm_adjust`) run on a preconditioner's relative damping.

    Every ``cfg.interval`` steps the optimizer compares the loss after its
    step with the quadratic model's prediction and rescales
    ``preconditioner.damping_factor`` so that the damping in effect becomes
    :func:`lm_adjust`'s.  Plain mode predicts with the K-FAC model
    ``q = gᵀδ + ½ δᵀ(F̂ + λI)δ`` (:meth:`snapshot` before the step,
    :meth:`after_step` after it); ``lr="auto"`` passes its own prediction to
    :meth:`apply`.

    Parameters
    ----------
    cfg : AdaptiveDamping or None
        The rule; None: never due.
    preconditioner : KFACPreconditioner
        Its ``steps``, ``damping_at``, ``model_curvature``, ``paused`` and
        ``damping_factor`` (rewritten by :meth:`apply`); typed ``Any`` so that
        this module does not import the preconditioner (which may use it).
    counts : mutable mapping
        Counters ``lm_skipped`` and ``lm_updates``, incremented in place.
    last : mutable mapping
        Receives the last ``rho`` and ``damping``, in place.
    warn : callable
        ``warn(key, message)``: a warning reported once per key.
    """

    def __init__(
        self,
        cfg: AdaptiveDamping | None,
        preconditioner: Any,
        *,
        counts: MutableMapping[str, int],
        last: MutableMapping[str, float],
        warn: Callable[[str, str], None],
    ) -> None:
        self.cfg = cfg
        self.preconditioner = preconditioner
        self.counts = counts
        self.last = last
        self._warn = warn

    def due(self) -> bool:
        """Whether the rule runs at this step."""
        return self.cfg is not None and self.preconditioner.steps % self.cfg.interval == 0

    def snapshot(self, closure: Callable[[], Any] | None, params: Sequence[torch.Tensor]) -> list[torch.Tensor | None] | None:
        """The raw gradients of ``params`` (for the model's linear term), on a due step with a closure.

        Without a closure on a due step the rule is skipped: counted
        ``lm_skipped`` and warned once.  Returns None when the rule does not run.
        """
        if not self.due():
            return None
        if closure is None:
            self.counts["lm_skipped"] += 1
            self._warn("lm_without_closure", "adaptive_damping needs step(closure) to re-evaluate the loss; rule skipped")
            return None
        return [p.grad.detach().clone() if p.grad is not None else None for p in params]

    def after_step(
        self,
        closure: Callable[[], Any] | None,
        loss: Any,
        g_before: Sequence[torch.Tensor | None] | None,
        deltas: Sequence[tuple[torch.Tensor, torch.Tensor]],
        params: Sequence[torch.Tensor],
    ) -> None:
        """Plain mode: ``ρ`` from the loss after the step and the K-FAC model ``q = gᵀδ + ½ δᵀ(F̂ + λI)δ``.

        ``g_before`` is :meth:`snapshot`'s result for ``params`` and
        ``deltas`` the applied ``(p, δ)`` pairs.  The closure runs once more
        with the preconditioner paused; the gradients it leaves are cleared.
        Cost one forward–backward pass and ``O(P)``.
        """
        if g_before is None or closure is None or loss is None:
            return
        g_of = {id(p): gb for p, gb in zip(params, g_before) if gb is not None}
        lin = sum(float((g_of[id(p)].double() * d.double()).sum()) for p, d in deltas if id(p) in g_of)
        quad = self.preconditioner.model_curvature({id(p): d for p, d in deltas})
        with self.preconditioner.paused(), torch.enable_grad():
            new = loss_value(closure())
        for p in params:  # the re-evaluation's backward is not this step's gradient
            p.grad = None
        self.apply(loss_value(loss), new, lin + 0.5 * quad)

    def apply(self, old: float, new: float, predicted: float) -> None:
        """One update from the losses before and after the step and the predicted change ``q`` (< 0)."""
        rho = (new - old) / predicted if predicted < 0 else float("nan")
        pre = self.preconditioner
        base = pre.damping_at(pre.steps) / pre.damping_factor
        lam = lm_adjust(base * pre.damping_factor, rho, self.cfg)
        pre.damping_factor = lam / base
        self.counts["lm_updates"] += 1
        self.last.update(rho=rho, damping=lam)


def loss_value(out: Any) -> float:
    """The float value of a closure's loss (``loss`` or a tuple starting with it; tensor or number)."""
    loss = out[0] if isinstance(out, tuple) else out
    return float(loss.detach()) if isinstance(loss, torch.Tensor) else float(loss)
