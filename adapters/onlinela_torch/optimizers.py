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

from collections.abc import Callable
from typing import Any, ClassVar, Literal

import torch
from torch import nn

from onlinela import _validation as V

from .preconditioner import KFACPreconditioner

__all__ = ["KFAC", "RSKFAC", "SREKFAC", "NystromKFAC", "BKFAC", "BRKFAC", "BKFACC"]


class _KFACFamily(torch.optim.Optimizer):
    """SGD on K-FAC-preconditioned gradients (base of the public classes).

    Parameters
    ----------
    model : torch.nn.Module
        All of its parameters are optimized; its Linear/Conv2d layers are preconditioned.
    lr : float
        Learning rate (``param_groups[0]["lr"]``, also the KL clip's ``lr``).
    momentum : float >= 0
        Heavy-ball momentum on the clipped direction (the papers use 0).
    weight_decay : float >= 0
        ``wd``.
    weight_decay_mode : {"after", "before"}
        ``"after"`` (the papers): ``wd·p`` is added to the preconditioned,
        clipped direction; ``"before"``: to the gradient before preconditioning
        (so it is preconditioned and counts in the KL clip).
    weight_decay_start : int or None
        First step with weight decay; None gives the papers' ``20·T_updt``.
    **kwargs
        Passed to :class:`KFACPreconditioner` (``damping``, ``factor_decay``,
        ``factor_update_freq``, ``inv_update_freq``, ``rank``, ``kl_clip``, ...);
        ``method`` and ``lr`` are set by the class.

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
        lr: float = 0.1,
        *,
        momentum: float = 0.0,
        weight_decay: float = 0.0,
        weight_decay_mode: Literal["after", "before"] = "after",
        weight_decay_start: int | None = None,
        **kwargs: Any,
    ) -> None:
        for bad in ("method", "lr"):
            if bad in kwargs:
                raise TypeError(f"{type(self).__name__} sets `{bad}` itself; do not pass it in the preconditioner options")
        V.check_real(lr, "lr", low=0.0, low_open=True)
        V.check_real(momentum, "momentum", low=0.0, high=1.0, high_open=True)
        V.check_real(weight_decay, "weight_decay", low=0.0)
        if weight_decay_mode not in ("after", "before"):
            raise ValueError(f"`weight_decay_mode` must be 'after' or 'before', got {weight_decay_mode!r}")
        super().__init__(model.parameters(), dict(lr=lr, momentum=momentum, weight_decay=weight_decay))
        self.weight_decay_mode = weight_decay_mode
        self.preconditioner = KFACPreconditioner(model, method=self.method, lr=self._current_lr, **kwargs)
        if weight_decay_start is None:
            freq = kwargs.get("factor_update_freq", 10)
            weight_decay_start = 20 * (freq(0) if callable(freq) else freq)
        self.weight_decay_start = V.check_int(weight_decay_start, "weight_decay_start", low=0)

    def _current_lr(self, step: int) -> float:
        return float(self.param_groups[0]["lr"])

    @torch.no_grad()
    def step(self, closure: Callable[[], Any] | None = None) -> Any:
        """Precondition the gradients, then take the SGD step (skipped on a non-finite gradient).

        Parameters
        ----------
        closure : callable, optional
            Re-evaluates the model and calls ``backward()``; its return value is returned.
        """
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        decay_on = self.preconditioner.steps >= self.weight_decay_start
        if decay_on and self.weight_decay_mode == "before":
            for group in self.param_groups:
                if group["weight_decay"]:
                    for p in group["params"]:
                        if p.grad is not None:
                            p.grad.add_(p, alpha=group["weight_decay"])
        if not self.preconditioner.step():
            return loss
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
                p.add_(d, alpha=-group["lr"])
        return loss

    def state_dict(self) -> dict[str, Any]:
        """The SGD state plus ``"preconditioner"``: :meth:`KFACPreconditioner.state_dict`."""
        sd = super().state_dict()
        sd["preconditioner"] = self.preconditioner.state_dict()
        return sd

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Restore both the SGD state and the preconditioner's."""
        sd = dict(state_dict)
        pre = sd.pop("preconditioner")
        super().load_state_dict(sd)
        self.preconditioner.load_state_dict(pre)


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
