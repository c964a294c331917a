"""``torch.optim.Optimizer`` classes: a :class:`KFACPreconditioner` bundled with SGD.

Each class fixes ``method`` and applies the papers' update rule
(algorithms.md §1): ``p ← p − lr·(ν v + wd·p)`` with ``v`` the preconditioned
gradient, ``ν`` the KL clip (and optional RMS cap), momentum 0 and weight
decay added *after* preconditioning, only from step ``20·T_updt`` on::

    opt = RSKFAC(model, lr=0.1)
    for x, y in loader:
        opt.zero_grad()
        loss_fn(model(x), y).backward()
        opt.step()

They share every line of curvature code with the preconditioner (reachable
as ``opt.preconditioner``); LR schedulers act on ``param_groups`` as usual and
the KL clip follows the scheduled learning rate.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable
from typing import Any, ClassVar, Literal

import torch
from torch import nn

from onlinela import validation as V

from .preconditioner import KFACPreconditioner
from .quadratic import AdaptiveDamping, LevenbergMarquardt, curvature_products, loss_value, solve_step

__all__ = ["KFAC", "RSKFAC", "SREKFAC", "NystromKFAC", "BKFAC", "BRKFAC", "BKFACC"]


class _KFACFamily(torch.optim.Optimizer):
    r"""SGD on K-FAC-preconditioned gradients (base of the public classes).

    Parameters
    ----------
    model : torch.nn.Module
        The network.  A model, not ``model.parameters()``: the preconditioner
        registers hooks on its layers to capture their inputs and output
        gradients, which a parameter list cannot give.  Use ``params`` to
        optimise a subset or to pass parameter groups.
    lr : float or "auto"
        Learning rate (``param_groups[i]["lr"]``, also the KL clip's).
        ``"auto"``: step size and momentum from the quadratic model
        (Martens & Grosse 2015, §7): ``δ = αΔ + μδ₀`` with ``(α, μ)``
        minimising ``½δᵀCδ + gᵀδ`` on the batch, ``C`` the exact Gauss–Newton
        (or Hessian) matrix plus the damping; needs ``step(closure)`` (see
        :meth:`step`) and costs about one extra forward–backward pass per
        vector per step (``stats()["optimizer"]["seconds_quadratic"]``).
    momentum : float >= 0
        Heavy-ball momentum on the clipped direction (default 0.9; the papers
        use 0).  Ignored with ``lr="auto"`` (``μ`` comes from the model).
    weight_decay : float >= 0
        ``wd``.
    weight_decay_mode : {"after", "before"}
        ``"after"`` (the papers): ``wd·p`` is added to the preconditioned,
        clipped direction; ``"before"``: to the gradient before preconditioning
        (so it is preconditioned and counts in the KL clip).
    weight_decay_start : int
        First step with weight decay (default 0: from the start).  The papers'
        CIFAR runs used ``20·T_updt``; ``stats()["optimizer"]`` shows whether it is on.
    adaptive_damping : AdaptiveDamping or None
        The Levenberg–Marquardt rule (§6.5; :class:`~onlinela_torch.quadratic.AdaptiveDamping`):
        every ``interval`` steps the loss after the step is re-evaluated on the
        same batch by the closure and the damping multiplied or divided by
        ``ω``.  Needs ``step(closure)``; without a closure on such a step the
        rule is skipped (warned once, counted).  Without a closure at all, the
        cheaper alternative is a damping schedule (``damping=callable``) or the
        library default (relative damping, which follows the factors' scale).
    params : iterable of Tensor or dict, optional
        The parameters (or groups) to optimise; default ``model.parameters()``.
    **kwargs
        Passed to :class:`KFACPreconditioner` (``damping``, ``factor_decay``,
        ``factor_update_freq``, ``inv_update_freq``, ``rank``, ``kl_clip``, ...);
        ``method`` and ``optimizer`` are set by the class.

    Notes
    -----
    :meth:`step` skips the whole update (momentum and weight decay included)
    when the preconditioner reports a non-finite gradient.  :meth:`state_dict`
    includes the preconditioner's state under ``"preconditioner"``.
    """

    method: ClassVar[str]

    def __init__(
        self,
        model: nn.Module,
        lr: float | Literal["auto"] = 0.1,
        *,
        momentum: float = 0.9,
        weight_decay: float = 0.0,
        weight_decay_mode: Literal["after", "before"] = "after",
        weight_decay_start: int = 0,
        adaptive_damping: AdaptiveDamping | None = None,
        params: Iterable[Any] | None = None,
        **kwargs: Any,
    ) -> None:
        if not isinstance(model, nn.Module):
            raise TypeError(
                f"{type(self).__name__} needs the model (a torch.nn.Module), got {type(model).__name__}: the "
                "preconditioner hooks the model's layers to capture their statistics, which a parameter list "
                "cannot give; pass `model` (and `params=` to optimise a subset)"
            )
        for bad in ("method", "optimizer"):
            if bad in kwargs:
                raise TypeError(f"{type(self).__name__} sets `{bad}` itself; do not pass it in the preconditioner options")
        self.auto = isinstance(lr, str)
        if self.auto and lr != "auto":
            raise ValueError(f"`lr` must be a positive float or 'auto', got {lr!r}")
        if not self.auto:
            V.check_real(lr, "lr", low=0.0, low_open=True)
        V.check_real(momentum, "momentum", low=0.0, high=1.0, high_open=True)
        V.check_real(weight_decay, "weight_decay", low=0.0)
        if weight_decay_mode not in ("after", "before"):
            raise ValueError(f"`weight_decay_mode` must be 'after' or 'before', got {weight_decay_mode!r}")
        if adaptive_damping is not None and not isinstance(adaptive_damping, AdaptiveDamping):
            raise TypeError(f"`adaptive_damping` must be an AdaptiveDamping or None, got {type(adaptive_damping).__name__}")
        defaults = dict(lr=1.0 if self.auto else lr, momentum=0.0 if self.auto else momentum, weight_decay=weight_decay)
        super().__init__(model.parameters() if params is None else params, defaults)
        self.model = model
        self.weight_decay_mode = "before" if self.auto else weight_decay_mode
        if self.auto:  # the model sets the step: no clip, no grafting unless asked for
            kwargs.setdefault("kl_clip", None)
            kwargs.setdefault("graft", None)
        self.preconditioner = KFACPreconditioner(model, method=self.method, optimizer=self, **kwargs)
        self.weight_decay_start = V.check_int(weight_decay_start, "weight_decay_start", low=0)
        self._counts = {"auto_fallback": 0, "lm_skipped": 0, "lm_updates": 0}
        self._seconds_quadratic = 0.0
        self._last: dict[str, float] = {}
        self._lm = LevenbergMarquardt(
            adaptive_damping, self.preconditioner, counts=self._counts, last=self._last,
            warn=self.preconditioner._warn.warn,
        )

    @property
    def adaptive_damping(self) -> AdaptiveDamping | None:
        """The Levenberg–Marquardt rule in effect (None: off); set at construction."""
        return self._lm.cfg

    @torch.no_grad()
    def step(self, closure: Callable[[], Any] | None = None) -> Any:
        """Precondition the gradients, then take the SGD step (skipped on a non-finite gradient).

        Parameters
        ----------
        closure : callable, optional
            With a float ``lr``: re-evaluates the model and calls
            ``backward()`` (the usual torch contract); its return value is
            returned, and with ``adaptive_damping`` it is called once more
            (under ``no_grad``) after the update to measure the actual reduction.
            With ``lr="auto"``: computes the batch loss on the model **without**
            calling ``backward()`` and returns ``loss`` or ``(loss, outputs)``;
            with the outputs the curvature is the exact Gauss–Newton matrix,
            without them the Hessian.  The optimizer differentiates it itself.
        """
        if self.auto:
            if closure is None:
                raise ValueError(f"{type(self).__name__}(lr='auto') needs step(closure); see the step() docstring")
            return self._auto_step(closure)
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        params = [p for g in self.param_groups for p in g["params"]]
        g_before = self._lm.snapshot(closure, params)
        if not self._precondition():
            return loss
        deltas = self._sgd_update()
        self._lm.after_step(closure, loss, g_before, deltas, params)
        return loss

    # ------------------------------------------------------------------ plain update
    def _decay_on(self) -> bool:
        return self.preconditioner.steps >= self.weight_decay_start

    def _precondition(self) -> bool:
        if self._decay_on() and self.weight_decay_mode == "before":
            for group in self.param_groups:
                if group["weight_decay"]:
                    for p in group["params"]:
                        if p.grad is not None:
                            p.grad.add_(p, alpha=group["weight_decay"])
        return self.preconditioner.step()

    def _sgd_update(self) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """Apply ``p ← p − lr·d``; returns ``(p, δ)`` pairs of the applied update."""
        decay_on = self._decay_on()
        out = []
        for group in self.param_groups:
            wd = group["weight_decay"] if decay_on and self.weight_decay_mode == "after" else 0.0
            for p in group["params"]:
                if p.grad is None:
                    continue
                d = p.grad.add(p, alpha=wd) if wd else p.grad
                if group["momentum"]:
                    state = self.state[p]
                    buf = state.get("momentum_buffer")
                    if buf is None:
                        buf = state["momentum_buffer"] = d.clone()
                    else:
                        buf.mul_(group["momentum"]).add_(d)
                    d = buf
                delta = d * (-group["lr"])
                p.add_(delta)
                out.append((p, delta))
        return out

    # ------------------------------------------------------------------ lr="auto"
    def _auto_step(self, closure: Callable[[], Any]) -> torch.Tensor:
        pre = self.preconditioner
        params = [p for g in self.param_groups for p in g["params"] if p.requires_grad]
        with torch.enable_grad():
            loss, outputs = _split_closure(closure())
            hessian = outputs is None
            try:
                grads = torch.autograd.grad(loss, params, create_graph=hessian, retain_graph=True, allow_unused=True)
            except RuntimeError as exc:
                raise ValueError(
                    "with lr='auto' the closure must return the loss (or (loss, outputs)) without calling "
                    f"backward(): the optimizer differentiates it itself ({exc})"
                ) from None
        for p, g in zip(params, grads):
            p.grad = torch.zeros_like(p) if g is None else g.detach().clone()
        if not self._precondition():  # adds weight decay first ("before"), so g below includes it
            return loss.detach()
        t0 = time.perf_counter()
        wd = {id(p): (grp["weight_decay"] if self._decay_on() else 0.0) for grp in self.param_groups for p in grp["params"]}
        raw = [torch.zeros_like(p) if g is None else g.detach() for g, p in zip(grads, params)]
        raw = [r + wd[id(p)] * p if wd[id(p)] else r for r, p in zip(raw, params)]
        delta = [-p.grad for p in params]
        prev = [self.state[p].get("prev_update") for p in params]
        has_prev = all(x is not None for x in prev)
        lam = self._param_damping(params, wd)
        vecs = [delta] + ([prev] if has_prev else [])
        with torch.enable_grad(), pre.paused():
            fv = curvature_products(loss, params, vecs, outputs=outputs, grads=grads if hessian else None)
        cv = [[f + lam[i] * v for i, (f, v) in enumerate(zip(fvi, vi))] for fvi, vi in zip(fv, vecs)]
        sol = solve_step(raw, delta, cv[0], prev if has_prev else None, cv[1] if has_prev else None)
        if sol.fallback == "indefinite":
            self._counts["auto_fallback"] += 1
            pre._warn.warn("auto_indefinite", "step %d: the quadratic model has no minimiser on span(Δ, δ₀); "
                           "no update this step", pre.steps - 1)
        for i, p in enumerate(params):
            u = delta[i] * sol.alpha
            if has_prev and sol.mu:
                u = u + prev[i] * sol.mu
            p.add_(u)
            self.state[p]["prev_update"] = u
        self._seconds_quadratic += time.perf_counter() - t0
        self._last.update(alpha=sol.alpha, mu=sol.mu, predicted=sol.predicted)
        if self._lm.due():
            with torch.no_grad(), pre.paused():
                new = loss_value(_split_closure(closure())[0])
            self._lm.apply(float(loss), new, sol.predicted)
        return loss.detach()

    def _param_damping(self, params: list[torch.Tensor], wd: dict[int, float]) -> list[float]:
        """``λ`` of ``C = F + λI`` per parameter: its layer's absolute damping plus weight decay."""
        per_layer = self.preconditioner.absolute_damping()
        of: dict[int, float] = {}
        for name, layer in self.preconditioner.layers.items():
            for q in (layer.module.weight, getattr(layer.module, "bias", None)):
                if q is not None:
                    of[id(q)] = per_layer[name]
        return [of.get(id(p), 0.0) + wd[id(p)] for p in params]

    def stats(self) -> dict[str, Any]:
        """The preconditioner's :meth:`~KFACPreconditioner.stats` plus ``"optimizer"``.

        ``"optimizer"``: ``weight_decay_active`` (the step is at or past
        ``weight_decay_start``), ``weight_decay_start``, ``lr`` (``"auto"`` or
        the first group's), ``damping`` (the relative damping in effect),
        ``last`` (the last ``alpha``, ``mu``, ``predicted``, ``rho``, ``damping``),
        ``seconds_quadratic`` (curvature products and the 2×2 solves) and
        counters ``auto_fallback``, ``lm_updates``, ``lm_skipped``.
        """
        st = self.preconditioner.stats()
        pre = self.preconditioner
        st["optimizer"] = {
            "weight_decay_active": self._decay_on(),
            "weight_decay_start": self.weight_decay_start,
            "lr": "auto" if self.auto else float(self.param_groups[0]["lr"]),
            "damping": pre.damping_at(pre.steps),
            "last": dict(self._last),
            "seconds_quadratic": self._seconds_quadratic,
            **self._counts,
        }
        return st

    def state_dict(self) -> dict[str, Any]:
        """The SGD state plus ``"preconditioner"``: :meth:`KFACPreconditioner.state_dict`."""
        sd = super().state_dict()
        sd["preconditioner"] = self.preconditioner.state_dict()
        sd["quadratic"] = {"counts": dict(self._counts), "seconds": self._seconds_quadratic, "last": dict(self._last)}
        return sd

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Restore both the SGD state and the preconditioner's."""
        sd = dict(state_dict)
        pre = sd.pop("preconditioner")
        quad = sd.pop("quadratic", None)
        super().load_state_dict(sd)
        self.preconditioner.load_state_dict(pre)
        if quad is not None:  # in place: the LM rule holds these dicts
            self._counts.clear()
            self._counts.update(quad["counts"])
            self._seconds_quadratic = float(quad["seconds"])
            self._last.clear()
            self._last.update(quad["last"])


class KFAC(_KFACFamily):
    """K-FAC: dense EA factors, full ``eigh`` every ``T_inv``, product damping.

    ``KFAC(model, lr=0.1, *, momentum=0, weight_decay=0, weight_decay_mode="after",
    weight_decay_start=None, **preconditioner_options)``; see :class:`KFACPreconditioner`.
    """

    method = "kfac"


class RSKFAC(_KFACFamily):
    """RS-KFAC: randomized SVD of each EA factor (rank 220, oversampling 10, 3 power iterations).

    Same arguments as :class:`KFAC`; per-factor damping.
    """

    method = "rs-kfac"


class SREKFAC(_KFACFamily):
    """SRE-KFAC: symmetric randomized eigendecomposition (subspace iteration) of each EA factor.

    Same arguments as :class:`KFAC`; per-factor damping.
    """

    method = "sre-kfac"


class NystromKFAC(_KFACFamily):
    """Nyström K-FAC: one-pass (``n_iter=0``) or power-iterated Nyström approximation of each EA factor.

    Same arguments as :class:`KFAC`; per-factor damping.
    """

    method = "nystrom-kfac"


class BKFAC(_KFACFamily):
    """B-KFAC: Brand-updated low-rank factors ``(U, D)`` only (memory and time linear in the width).

    Factors with ``r + s >= d`` (conv, small) use RS-KFAC.  Same arguments as
    :class:`KFAC` plus ``brand=BrandConfig(...)``; per-factor damping.
    """

    method = "b-kfac"


class BRKFAC(_KFACFamily):
    """B-R-KFAC: B-KFAC plus the dense EA and a randomized overwrite every ``overwrite_period·T_inv`` steps.

    Same arguments as :class:`BKFAC`.
    """

    method = "br-kfac"


class BKFACC(_KFACFamily):
    """B-KFAC-c: B-R-KFAC plus a Rayleigh–Ritz correction every ``correction_period`` Brand updates.

    Same arguments as :class:`BKFAC`.
    """

    method = "b-kfac-c"


def _split_closure(out: Any) -> tuple[torch.Tensor, torch.Tensor | None]:
    """``loss`` or ``(loss, outputs)`` from an auto-mode closure, checked."""
    loss, outputs = (out[0], out[1]) if isinstance(out, tuple) and len(out) == 2 else (out, None)
    if not (isinstance(loss, torch.Tensor) and loss.numel() == 1):
        raise TypeError(f"the closure must return a scalar loss tensor or (loss, outputs), got {type(out).__name__}")
    if outputs is not None and not isinstance(outputs, torch.Tensor):
        raise TypeError(f"the closure's outputs must be a Tensor, got {type(outputs).__name__}")
    return loss.reshape(()), outputs

