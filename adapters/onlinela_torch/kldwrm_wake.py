r"""KLD-WRM's wake: what it keeps between steps and how it rewrites the gradients (algorithms.md §5).

:class:`Wake` holds, per preconditioned layer, the last taken step's raw
gradient ``g_{k-1}``, learning rate, statistics count and local factors
(:class:`LayerWake`), plus the parameter snapshots ``θ_{k-1}, …`` (Q, QE).
Called by the preconditioner between its curvature update and its
preconditioning (:meth:`Wake.before_precondition`), it replaces each layer's
gradient by ``ĝ_k = g_k - β_k (g_{k-1} + γ F_{k-1} s_{k-1})`` and gives Q and
QE the augmented factors ``M + γ lr_k L`` (:func:`augment_factor`).  It also
owns KLD-WRM's counters, timings and the wake part of the checkpoint.
Internal to :class:`~onlinela_torch.KLDWRM` (docs/kldwrm.rst).
"""

from __future__ import annotations

import logging
import time
from collections import deque
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from onlinela import LowRankPSD, brand_update
from onlinela import eigh as onlinela_eigh

from .factors import EIG_CLIP, BrandFactor, FactorEigen, FactorState
from .kldwrm_capture import LocalFactor
from .kldwrm_config import KLDWRMConfig
from .modules import LayerHelper

if TYPE_CHECKING:
    from .preconditioner import KFACPreconditioner

__all__: list[str] = []

logger = logging.getLogger(__name__)


class LayerWake:
    """What a layer keeps from its last taken step.

    Attributes
    ----------
    g_prev : Tensor of shape (g_dim, a_dim) or None
        The raw gradient ``g_{k-1}``.
    lr_prev : float
        ``lr_{k-1}`` of the layer's parameter group.
    count_prev : int
        Statistics updates behind the curvature applied at step ``k-1`` (for ``c_{k-1}``).
    local_prev : tuple of LocalFactor or None
        ``(A_loc, G_loc)`` of step ``k-1`` (Q, QE).
    """

    def __init__(self) -> None:
        self.g_prev: torch.Tensor | None = None
        self.lr_prev = 0.0
        self.count_prev = 0
        self.local_prev: tuple[LocalFactor, LocalFactor] | None = None


class Wake:
    """KLD-WRM's state between steps and its gradient rewrite within one (see the module docstring).

    Parameters
    ----------
    preconditioner : KFACPreconditioner
        The curvature backend (its ``layers``, ``complement``, ``steps``).
    variant : {"so", "q", "qe"}
    config : KLDWRMConfig
    rho : float
        The resolved wake decay ``ρ``.
    params : list of Tensor
        The model's trainable parameters, in the order of the snapshots.

    Attributes
    ----------
    lrs : dict of str to float
        This step's ``lr_k`` per layer (set by :meth:`begin`).
    local : dict of str to (LocalFactor, LocalFactor)
        This step's ``(A_loc, G_loc)`` (Q, QE; set by :meth:`begin`, non-finite ones dropped).
    pending : dict of str to Tensor or None
        This step's raw gradients ``g_k``, set once the rewrite ran (None: the step is skipped).
    history : deque of list of Tensor
        Parameter snapshots ``θ_{k-1}, …``: none kept by SO, ``θ_{k-1}`` by Q,
        ``n_stored - 1`` (at least one) by QE.
    counters, seconds : dict
        Counted events and timings reported by :meth:`KLDWRM.stats`.
    """

    def __init__(
        self,
        preconditioner: KFACPreconditioner,
        *,
        variant: str,
        config: KLDWRMConfig,
        rho: float,
        params: list[torch.Tensor],
    ) -> None:
        self.preconditioner = preconditioner
        self.variant = variant
        self.config = config
        self.rho = rho
        self.params = params
        self._index = {id(p): i for i, p in enumerate(params)}
        layers = preconditioner.layers
        self.layers = {name: LayerWake() for name in layers}
        # (snapshot object, statistics updates behind it) of each layer's A factor
        self._snapshot_counts: dict[str, tuple[FactorEigen | None, int]] = {name: (None, 0) for name in layers}
        self.history: deque[list[torch.Tensor]] = deque(maxlen=max(1, config.n_stored - 1) if variant == "qe" else 1)
        self.lrs: dict[str, float] = {}
        self.local: dict[str, tuple[LocalFactor, LocalFactor]] = {}
        self.pending: dict[str, torch.Tensor] | None = None
        self._counts_now: dict[str, int] = {}
        self.counters = {"skipped_steps": 0, "local_skipped": 0, "inner_fallbacks": 0, "inner_capped": 0,
                         "augment_failures": 0}
        self.seconds = {"statistics": 0.0, "decomposition": 0.0, "preconditioning": 0.0, "inner": 0.0}

    def begin(self, lrs: dict[str, float], local: dict[str, tuple[LocalFactor, LocalFactor]]) -> None:
        """Start a step with its learning rates and local factors."""
        self.lrs = lrs
        self.local = local
        self.pending = None

    def end(self) -> None:
        """Drop the step's scratch (raw gradients and local factors)."""
        self.pending = None
        self.local = {}

    # ------------------------------------------------------------------ the rewrite
    @torch.no_grad()
    def before_precondition(self, k: int, lam: float) -> None:
        """Called by the preconditioner after the curvature update: write ``ĝ_k``, build Q's factors."""
        self._track_snapshots()
        layers = self.preconditioner.layers
        grads: dict[str, torch.Tensor] = {}
        for name, layer in layers.items():
            w = layer.module.weight
            if w.requires_grad and w.grad is not None:
                grads[name] = layer.helper.grad_matrix()
        names = list(self.local)
        checks = [torch.isfinite(g).all() for g in grads.values()]
        checks += [torch.stack([A.finite(), G.finite()]).all() for A, G in self.local.values()]
        ok = torch.stack(checks).tolist() if checks else []
        if not all(ok[: len(grads)]):
            return  # the preconditioner skips the step
        for name, fine in zip(names, ok[len(grads) :]):
            if not fine:
                self.counters["local_skipped"] += 1
                logger.warning("step %d: non-finite local statistics in %s; Q uses the EA factors", k, name)
                del self.local[name]
        t0 = time.perf_counter()
        raw = {}
        for name, g in grads.items():
            raw[name] = g.clone()
            correction = self._correction(name, g)
            if correction is not None:
                layers[name].helper.set_grad_matrix(g - correction)
        self.pending = raw
        t1 = time.perf_counter()
        self.seconds["preconditioning"] += t1 - t0
        if self.variant != "so" and self.config.local_curvature > 0:
            for name in grads:
                self._augment_layer(name, k)
        self.seconds["decomposition"] += time.perf_counter() - t1

    def _track_snapshots(self) -> None:
        """Record, for each layer, how many statistics updates are behind the snapshot applied now."""
        for name, layer in self.preconditioner.layers.items():
            f = layer.A
            e = None if f is None else f.eigen
            ref, _ = self._snapshot_counts[name]
            if e is not ref:
                self._snapshot_counts[name] = (e, 0 if e is None else _update_count(f))
            self._counts_now[name] = self._snapshot_counts[name][1]

    def _c_ratio(self, n_prev: int, n_now: int) -> float:
        """``c_k / c_{k-1}`` with ``c = (1-ρ)/(1-ρ^n)``: the debiased EA's weight normalisation."""
        if n_prev == n_now or n_prev < 1 or n_now < 1:
            return 1.0
        return (1.0 - self.rho**n_prev) / (1.0 - self.rho**n_now)

    def _correction(self, name: str, g: torch.Tensor) -> torch.Tensor | None:
        """``β_k (g_{k-1} + γ F_{k-1} s_{k-1})`` for one layer, or None at the first step."""
        st = self.layers[name]
        lr = self.lrs[name]
        if st.g_prev is None or lr <= 0:
            return None
        beta = self.rho * (st.lr_prev / lr) * self._c_ratio(st.count_prev, self._counts_now[name])
        term = st.g_prev.to(g.dtype)
        gamma = self.config.local_curvature
        if self.variant != "so" and gamma > 0 and st.local_prev is not None:
            helper = self.preconditioner.layers[name].helper
            A, G = st.local_prev
            S = (param_matrix(helper) - self._layer_matrix(name, self.history[-1])).to(g.dtype)
            term = term + gamma * G.left(A.right(S))
        return beta * term

    def _augment_layer(self, name: str, k: int) -> None:
        """Q: give the preconditioner this layer's augmented factors ``M_EA + γ lr_k L_loc`` for this step."""
        layer = self.preconditioner.layers[name]
        alpha = self.config.local_curvature * self.lrs[name]
        local = self.local.get(name)
        if local is None or alpha <= 0 or layer.A is None or layer.G is None:
            return
        eA, eG = layer.A.eigen, layer.G.eigen
        if eA is None or eG is None or eA.max_eig <= 0 or eG.max_eig <= 0:
            return
        complement = self.preconditioner.complement
        try:
            aug = (augment_factor(eG, local[1], alpha, complement), augment_factor(eA, local[0], alpha, complement))
        except (ValueError, RuntimeError, np.linalg.LinAlgError) as exc:  # torch's LinAlgError is a RuntimeError
            self.counters["augment_failures"] += 1
            logger.warning("step %d: augmented factors of %s failed (%s); using the EA factors", k, name, exc)
            return
        self.preconditioner.augmented[name] = aug

    # ------------------------------------------------------------------ between steps
    @torch.no_grad()
    def commit(self) -> None:
        """Keep what the next step needs: ``g_k``, ``lr_k``, ``c_k``'s count, local factors, ``θ_k``."""
        for name, g in self.pending.items():
            st = self.layers[name]
            st.g_prev = g
            st.lr_prev = self.lrs[name]
            st.count_prev = self._counts_now[name]
            st.local_prev = self.local.get(name)
        if self.variant != "so":
            self.history.append([p.detach().clone() for p in self.params])

    def _layer_matrix(self, name: str, snapshot: list[torch.Tensor]) -> torch.Tensor:
        """A layer's ``[W | b]`` from a parameter snapshot."""
        layer = self.preconditioner.layers[name]
        w = snapshot[self._index[id(layer.module.weight)]]
        b = snapshot[self._index[id(layer.module.bias)]] if layer.helper.has_bias else None
        return matrix(layer.helper, w, b)

    def stats(self, pre: dict[str, Any], *, method: str) -> dict[str, Any]:
        """:meth:`KLDWRM.stats` from the preconditioner's ``stats()`` ``pre`` (KLD-WRM's time added to its phases)."""
        phases = ("statistics", "decomposition", "preconditioning")
        seconds = {p: pre["seconds"].get(p, 0.0) + self.seconds[p] for p in phases}
        seconds["inner"] = self.seconds["inner"]
        return {
            "variant": self.variant,
            "method": method,
            "rho": self.rho,
            "step": pre["step"],
            **self.counters,
            "seconds": seconds,
            "layers": pre["layers"],
            "preconditioner": pre,
        }

    # ------------------------------------------------------------------ checkpoint
    def state_dict(self) -> dict[str, Any]:
        """``{"counters", "layers", "history"}`` of :meth:`KLDWRM.state_dict` (tensors are references)."""
        return {
            "counters": dict(self.counters),
            "layers": {
                name: {
                    "g_prev": st.g_prev,
                    "lr_prev": st.lr_prev,
                    "count_prev": st.count_prev,
                    "snapshot_count": self._snapshot_counts[name][1],
                    "local_prev": None
                    if st.local_prev is None
                    else {"A": st.local_prev[0].state_dict(), "G": st.local_prev[1].state_dict()},
                }
                for name, st in self.layers.items()
            },
            "history": [list(snap) for snap in self.history],
        }

    def check_state(self, state_dict: Mapping[str, Any]) -> None:
        """Raise ValueError unless ``state_dict`` is a version-1 state of this variant, layers and parameters."""
        if state_dict.get("version") != 1:
            raise ValueError(f"unsupported KLDWRM state version {state_dict.get('version')!r}")
        if state_dict["variant"] != self.variant:
            raise ValueError(f"the state is for variant {state_dict['variant']!r}, this KLDWRM runs {self.variant!r}")
        if set(state_dict["layers"]) != set(self.layers):
            raise ValueError(f"the state holds layers {sorted(state_dict['layers'])}, the model has {sorted(self.layers)}")
        history = state_dict["history"]
        if history and len(history[0]) != len(self.params):
            raise ValueError(
                f"the state's snapshots hold {len(history[0])} parameters, the model has {len(self.params)}"
            )

    def load_state_dict(self, state_dict: Mapping[str, Any]) -> None:
        """Restore the counters, per-layer wake and snapshots (after :meth:`check_state` and the preconditioner's)."""
        self.counters.update(dict(state_dict["counters"]))
        for name, sd in state_dict["layers"].items():
            layer = self.preconditioner.layers[name]
            device = layer.module.weight.device
            st = self.layers[name]
            st.g_prev = None if sd["g_prev"] is None else sd["g_prev"].to(device, copy=True)
            st.lr_prev = float(sd["lr_prev"])
            st.count_prev = int(sd["count_prev"])
            lp = sd["local_prev"]
            st.local_prev = None if lp is None else (
                LocalFactor.from_state(lp["A"], device),
                LocalFactor.from_state(lp["G"], device),
            )
            e = None if layer.A is None else layer.A.eigen
            self._snapshot_counts[name] = (e, int(sd["snapshot_count"]))
        self.history.clear()
        for snap in state_dict["history"]:
            self.history.append([t.to(p.device, p.dtype, copy=True) for t, p in zip(snap, self.params)])


# =========================================================================== Q: augmented factors
def augment_factor(e: FactorEigen, local: LocalFactor, alpha: float, complement: str | None) -> FactorEigen:
    r"""Decomposition of ``M + α L`` (``M`` the snapshot ``e``, with its complement, ``L`` the local factor).

    Brand when the snapshot is low rank and ``L`` thin with ``r + R < d``:
    ``M + αXXᵀ = (1+α)·brand_update(M, X, decay=1/(1+α))``, cost
    ``O(d(r+R)²)``, rank ``r + R``, complement unchanged.  Otherwise a dense
    ``eigh`` of the ``d × d`` sum, ``O(d³)``.  ``complement == "min"`` keeps a
    low-rank snapshot's ``c (I - UUᵀ)`` term (the preconditioner's option).
    """
    M = e.approx
    d, r = M.dim, M.rank
    low_rank = r < d
    c = e.min_eig if (low_rank and complement == "min") else 0.0
    if low_rank and local.rows is not None and r + local.rows.shape[0] < d:
        X = local.rows.T.to(M.dtype).contiguous()
        out = brand_update(LowRankPSD.unchecked(M.eigvecs, M.eigvals, c), X, decay=1.0 / (1.0 + alpha))
        U, w = out.eigvecs, out.eigvals * (1.0 + alpha)
    else:
        U0, w0 = M.eigvecs, M.eigvals
        dense = (U0 * w0) @ U0.T + alpha * local.dense(M.dtype)
        if low_rank and c:
            dense = dense + c * (torch.eye(d, dtype=M.dtype, device=U0.device) - U0 @ U0.T)
        w, U = onlinela_eigh(dense, check_inputs=False)
        low_rank = False
    w = w.clamp_min(0)
    wmax = float(w[0]) if w.numel() else 0.0
    w = torch.where(w < EIG_CLIP * wmax, torch.zeros_like(w), w)
    wmin = float(w[-1]) if w.numel() else 0.0
    return FactorEigen(LowRankPSD.unchecked(U, w), wmax, c if low_rank else wmin)


# =========================================================================== helpers
def _update_count(f: FactorState) -> int:
    """Statistics updates folded into ``f``'s current snapshot (Brand states count their own updates)."""
    return f.brand_count if isinstance(f, BrandFactor) else f.ea_count


def matrix(helper: LayerHelper, w: torch.Tensor, b: torch.Tensor | None = None) -> torch.Tensor:
    """``[W | b]`` of shape (g_dim, a_dim) from weight-shaped and bias-shaped tensors."""
    m = w.reshape(helper.g_dim, -1)
    if helper.has_bias:
        m = torch.cat([m, b.reshape(-1, 1).to(m.dtype)], dim=1)
    return m


def param_matrix(helper: LayerHelper) -> torch.Tensor:
    """The layer's current parameters as ``[W | b]`` (a new tensor)."""
    mod = helper.module
    return matrix(helper, mod.weight.detach(), mod.bias.detach() if helper.has_bias else None).clone()
