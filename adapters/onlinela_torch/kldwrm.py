r"""KLD-WRM: KL-divergence wake-regularized models on the K-FAC platform (algorithms.md §5).

The exponentially averaged curvature of K-FAC is the exact answer to a *wake*
problem: with ``M̄_k = Σ_{i≤k} w_{k,i} F_i`` (the debiased EA, weights
``w_{k,i} = c_k ρ^{k-i}`` summing to one, ``c_k = (1-ρ)/(1-ρ^{n_k})``),

.. math::

    θ_{k+1} = \arg\min_θ\; g_kᵀ(θ-θ_k) + \frac{1}{2\,lr_k} Σ_{i≤k} w_{k,i} ‖θ-θ_i‖²_{F_i}

is reached by the recursion ``s_k = -lr_k M̄_k⁻¹ (g_k - β_k g_{k-1})`` with
``β_k = ρ (lr_{k-1}/lr_k)(c_k/c_{k-1})`` (``→ ρ lr_{k-1}/lr_k``, the papers'
formula, once ``ρ^{n_k}`` is negligible).  KLD-WRM keeps the wake but replaces
the quadratic terms by KL divergences to the past predictive distributions:

* ``"so"``  (linear model, second-order KL): K-FAC applied to ``g_k - β_k g_{k-1}``.
* ``"q"``   (quadratic model, second-order KL): ``(M̄_k + γ lr_k F_k) u_k = ĝ_k``,
  ``ĝ_k = g_k - β_k (g_{k-1} + γ F_{k-1} s_{k-1})``; each Kronecker factor is
  augmented with its local (this batch's) statistics, ``A_EA + γ lr_k A_loc``,
  and the direction gets a per-tensor RMS cap.
* ``"qe"``  (quadratic model, exact KL): the Q step, then a few SGD steps with
  momentum on ``g_k + γ F_k(θ-θ_k) + ∇ (λ/2) Σ_j w_j symKL(p_{θ_{k-j}}, p_θ)``
  over the current batch and the last ``n_stored`` networks.

:class:`KLDWRM` sits between ``loss.backward()`` and ``optimizer.step()``
like :class:`~onlinela_torch.KFACPreconditioner`: it rewrites ``p.grad`` so
that a plain SGD step applies the KLD-WRM step.  See docs/kldwrm.rst.
"""

from __future__ import annotations

import functools
import logging
import math
import time
from collections import deque
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
from torch import nn

from onlinela import LowRankPSD, brand_update
from onlinela import eigh as onlinela_eigh
from onlinela import validation as V

from .distributed import DistributedKFACPreconditioner
from .factors import EIG_CLIP, BrandFactor, FactorEigen, FactorState
from .modules import LayerHelper, g_scale
from .compiled import eager_hook
from .preconditioner import KFACLayer, KFACPreconditioner, apply_inverse

__all__ = ["KLDWRM", "KLDWRMConfig"]

logger = logging.getLogger(__name__)

#: The three instantiations of the papers, in order of cost.
VARIANTS = ("so", "q", "qe")
#: Options that KLD-WRM sets on its preconditioner itself.
_OWNED = {
    "lr": "the learning rate is read from `optimizer.param_groups`",
    "factor_decay": "the EA decay is the wake decay `KLDWRMConfig.rho`",
    "rms_clip": "set it in `KLDWRMConfig.rms_clip`",
}


@dataclass(frozen=True)
class KLDWRMConfig:
    """Options of :class:`KLDWRM` (KLD-WRM, algorithms.md §5); the papers' values unless said otherwise.

    Parameters
    ----------
    rho : float in (0, 1) or None
        ``ρ``: decay of the wake weights, which is also the EA decay of the
        Kronecker factors.  None gives the papers' value per variant: 0.33 for
        ``"so"``, 0.5 for ``"q"`` and ``"qe"``.
    rms_clip : float > 0 or None
        Per-tensor RMS cap ``ν_l = min(1, rms_clip / rms(u_l))`` on each
        layer's direction (2.0), applied before the graft and the KL clip.  The
        papers use it for Q and QE; here SO has it too (without it SO diverged
        at lr 0.1 on the small CNN, docs/kldwrm.rst).  None disables it.
    local_curvature : float >= 0
        ``γ``, weight of the quadratic model's curvature ``F_k`` (Q and QE; 1 in
        the papers).  ``γ = 0`` turns the quadratic model into SO's linear one.
    inner_steps : int >= 0
        QE: SGD steps after the Q step (7).  0 makes QE identical to Q.
    inner_lr : float > 0
        QE: inner learning rate as a multiple of the current ``lr`` (0.1).
    inner_momentum : float in [0, 1)
        QE: heavy-ball momentum of the inner steps (0.5).
    n_stored : int >= 1
        QE: networks in the exact-KL wake, the current one included (3).
    kl_weight : float >= 0
        QE: the exact-KL term's weight is ``λ = kl_weight / lr_k`` (0.1).
        ``kl_weight = 1`` is the wake's own weight (then ``(λ/2) symKL ≈
        (1/lr_k) KL`` to second order, Q's regulariser); on MNIST it
        over-brakes, because the exact KL of a Q step is typically 8-40 times
        its second-order K-FAC estimate (docs/kldwrm.rst), so the default is 0.1.
    """

    rho: float | None = None
    rms_clip: float | None = 2.0
    local_curvature: float = 1.0
    inner_steps: int = 7
    inner_lr: float = 0.1
    inner_momentum: float = 0.5
    n_stored: int = 3
    kl_weight: float = 0.1

    def __post_init__(self) -> None:
        if self.rho is not None:
            V.check_real(self.rho, "rho", low=0.0, high=1.0, low_open=True, high_open=True)
        if self.rms_clip is not None:
            V.check_real(self.rms_clip, "rms_clip", low=0.0, low_open=True)
        V.check_real(self.local_curvature, "local_curvature", low=0.0)
        V.check_int(self.inner_steps, "inner_steps", low=0)
        V.check_real(self.inner_lr, "inner_lr", low=0.0, low_open=True)
        V.check_real(self.inner_momentum, "inner_momentum", low=0.0, high=1.0, high_open=True)
        V.check_int(self.n_stored, "n_stored", low=1)
        V.check_real(self.kl_weight, "kl_weight", low=0.0)

    def rho_for(self, variant: str) -> float:
        """``ρ`` for ``variant``: :attr:`rho`, or the papers' 0.33 (SO) / 0.5 (Q, QE)."""
        if self.rho is not None:
            return float(self.rho)
        return 0.33 if variant == "so" else 0.5


# =========================================================================== local statistics
class _LocalFactor:
    """One step's Kronecker factor ``L = XᵀX``, kept thin (rows ``X`` of shape (R, d)) or dense (d, d).

    Thin when ``R < d`` (memory ``O(R d)``, products ``O(R d m)``), dense otherwise.
    """

    __slots__ = ("rows", "gram")

    def __init__(self, rows: torch.Tensor | None = None, gram: torch.Tensor | None = None) -> None:
        self.rows = rows
        self.gram = gram

    def dense(self, dtype: torch.dtype) -> torch.Tensor:
        """``L`` as a (d, d) tensor of ``dtype``."""
        if self.gram is not None:
            return self.gram.to(dtype)
        X = self.rows.to(dtype)
        return X.T @ X

    def left(self, S: torch.Tensor) -> torch.Tensor:
        """``L S`` for ``S`` of shape (d, m)."""
        if self.gram is not None:
            return self.gram.to(S.dtype) @ S
        X = self.rows.to(S.dtype)
        return X.T @ (X @ S)

    def right(self, S: torch.Tensor) -> torch.Tensor:
        """``S L`` for ``S`` of shape (m, d)."""
        if self.gram is not None:
            return S @ self.gram.to(S.dtype)
        X = self.rows.to(S.dtype)
        return (S @ X.T) @ X

    def finite(self) -> torch.Tensor:
        """A 0-d bool tensor (no device sync)."""
        return torch.isfinite(self.gram if self.gram is not None else self.rows).all()

    def state_dict(self) -> dict[str, torch.Tensor | None]:
        return {"rows": self.rows, "gram": self.gram}

    @classmethod
    def from_state(cls, sd: Mapping[str, Any], device: torch.device) -> _LocalFactor:
        def load(t: torch.Tensor | None) -> torch.Tensor | None:
            return None if t is None else t.to(device, copy=True)

        return cls(load(sd["rows"]), load(sd["gram"]))


class _Accumulator:
    """Rows of one factor over the micro-batches of a step; switches to a Gram once ``R >= d``."""

    def __init__(self, dim: int, dtype: torch.dtype) -> None:
        self.dim = dim
        self.dtype = dtype
        self.rows: list[torch.Tensor] = []
        self.n_rows = 0
        self.gram: torch.Tensor | None = None

    def add(self, rows: torch.Tensor) -> None:
        rows = rows.detach().to(self.dtype)
        self.n_rows += rows.shape[0]
        if self.gram is None and self.n_rows < self.dim:
            self.rows.append(rows)
            return
        if self.gram is None:
            self.gram = torch.zeros(self.dim, self.dim, dtype=self.dtype, device=rows.device)
            for r in self.rows:
                self.gram.add_(r.T @ r)
            self.rows = []
        self.gram.add_(rows.T @ rows)

    def finish(self, scale: float) -> _LocalFactor | None:
        """``scale · Σ rowsᵀ rows`` as a :class:`_LocalFactor`, None when nothing was captured."""
        if self.gram is not None:
            return _LocalFactor(gram=self.gram * scale)
        if not self.rows:
            return None
        return _LocalFactor(rows=torch.cat(self.rows, 0) * math.sqrt(scale))


class _Capture:
    """This step's activation and output-gradient rows of one layer."""

    def __init__(self, helper: LayerHelper, dtype: torch.dtype) -> None:
        self.A = _Accumulator(helper.a_dim, dtype)
        self.G = _Accumulator(helper.g_dim, dtype)
        self.samples = 0


# =========================================================================== per-layer state
class _LayerWake:
    """What a layer keeps from its last taken step.

    Attributes
    ----------
    g_prev : Tensor of shape (g_dim, a_dim) or None
        The raw gradient ``g_{k-1}``.
    lr_prev : float
        ``lr_{k-1}`` of the layer's parameter group.
    count_prev : int
        Statistics updates behind the curvature applied at step ``k-1`` (for ``c_{k-1}``).
    local_prev : tuple of _LocalFactor or None
        ``(A_loc, G_loc)`` of step ``k-1`` (Q, QE).
    """

    def __init__(self) -> None:
        self.g_prev: torch.Tensor | None = None
        self.lr_prev = 0.0
        self.count_prev = 0
        self.local_prev: tuple[_LocalFactor, _LocalFactor] | None = None


class _WakePreconditioner(KFACPreconditioner):
    """A :class:`KFACPreconditioner` that lets KLD-WRM rewrite the gradients after the curvature update.

    ``before_precondition(k, λ)`` runs after this step's statistics and
    decompositions and before the preconditioning; layers with an entry in
    :attr:`augmented` are preconditioned with those factors (Q's
    ``A_EA + γ lr A_loc``) instead of their EA snapshots during that step.
    """

    def __init__(self, model: nn.Module, *, before_precondition: Callable[[int, float], None], **kwargs: Any) -> None:
        super().__init__(model, **kwargs)
        self._before_precondition = before_precondition
        self.augmented: dict[str, tuple[FactorEigen, FactorEigen]] = {}

    def _precondition_step(self, k: int, lam: float) -> bool:
        self._before_precondition(k, lam)
        try:
            return super()._precondition_step(k, lam)
        finally:
            self.augmented = {}

    def _apply_layer(self, layer: KFACLayer, g: torch.Tensor, lam: float, *, thin: bool) -> torch.Tensor:
        aug = self.augmented.get(layer.name)
        if aug is None:
            return super()._apply_layer(layer, g, lam, thin=thin)
        eG, eA = aug
        return apply_inverse(eG, eA, g, lam, self.damping_convention, self.complement)


class _DistributedWakePreconditioner(DistributedKFACPreconditioner, _WakePreconditioner):
    """:class:`_WakePreconditioner` over ``torch.distributed`` (``mode="replicate"``).

    Method order: the distributed class synchronises statistics, broadcasts
    decompositions and averages the gradients, *then* the wake hook sees the
    global gradient, then the K-FAC preconditioning runs on every rank alike.
    The rank agreement check also covers KLD-WRM's own settings (``wake``).
    """

    def __init__(self, model: nn.Module, *, wake: Mapping[str, Any], **kwargs: Any) -> None:
        self._wake_fingerprint = dict(wake)
        super().__init__(model, **kwargs)

    def _fingerprint(self) -> dict[str, Any]:
        return {**super()._fingerprint(), "kldwrm": self._wake_fingerprint}


# =========================================================================== KLD-WRM
class KLDWRM:
    r"""The KLD-WRM family (SO, Q, QE) as a gradient rewriter for any torch optimizer.

    Call :meth:`step` after ``loss.backward()`` and before
    ``optimizer.step()``; it rewrites the gradients of the preconditioned
    layers (``nn.Linear``, ``nn.Conv2d``) so that the optimizer's plain SGD
    step ``θ ← θ - lr·p.grad`` is the KLD-WRM step::

        opt = torch.optim.SGD(model.parameters(), lr=0.01)
        kld = KLDWRM(model, opt, variant="qe")
        for x, y in loader:
            opt.zero_grad()
            F.cross_entropy(model(x), y).backward()
            kld.step(closure=lambda: model(x))   # QE needs the closure
            opt.step()

    Parameters
    ----------
    model : torch.nn.Module
        The network (its Linear/Conv2d layers get K-FAC curvature).
    optimizer : torch.optim.Optimizer
        Applies the step.  ``lr_k`` (per layer: the ``lr`` of the parameter
        group holding the layer's weight) is read from its ``param_groups`` at
        every step, so LR schedulers act as usual; ``lr_{k-1}/lr_k`` uses the
        value read at the previous taken step.
    variant : {"so", "q", "qe"}
        The instantiation (see the module docstring).
    method : str
        Curvature backend, any method of :class:`KFACPreconditioner`
        (``"kfac"``, ``"rs-kfac"``, ``"sre-kfac"``, ``"nystrom-kfac"``,
        ``"b-kfac"``, ``"br-kfac"``, ``"b-kfac-c"``).
    config : KLDWRMConfig, optional
        KLD-WRM options (default ``KLDWRMConfig()``).
    damping : float or callable
        Relative damping ``λ`` of the K-FAC direction (0.01, the papers' value).
    kl_clip : float or None
        KL clip ``κ`` of the direction (default None; the papers used 0.1 with
        ``graft=None``).  Chosen on the task zoo at equal steps (docs/kldwrm.rst).
    factor_update_freq, inv_update_freq : int or callable
        ``T_updt`` and ``T_inv`` (default 5 and 5; the papers used 30 and 30 on
        full MNIST, which on the zoo left SO with a stale one-batch curvature).
        The wake identity is exact with statistics and decompositions at every step.
    distributed : bool
        Train data-parallel over ``torch.distributed`` (default False): the
        curvature backend is a :class:`~onlinela_torch.DistributedKFACPreconditioner`
        (``group=``, ``assignment=``, ``average_gradients=`` go to it through
        ``preconditioner_options``; ``mode="memory"`` is not supported) and
        KLD-WRM all-reduces its own statistics through the same group: Q's
        local factors (one all-reduce per step) and QE's exact-KL gradients
        (one per inner step), weighted by each rank's share of the global
        batch.  On every rank, call it like the single-process class with the
        rank's shard; the steps equal one process's on the global batch up to
        summation order (tests/test_kldwrm_distributed.py).
    **preconditioner_options
        Any other :class:`KFACPreconditioner` keyword (``rank``, ``complement``,
        ``damping_convention``, ``fisher``, ``graft``, ``seed``, ...).  ``lr``,
        ``factor_decay`` and ``rms_clip`` are set by KLD-WRM; ``graft``
        defaults to ``"unit"`` (each layer's step has length ``≈ lr`` whatever
        the loss scale; ``graft=None`` with ``kl_clip=0.1`` is the papers'
        natural-gradient step); ``low_rank_grad`` defaults to False (the
        rewritten gradient never matches the captured thin factors).  Q and QE
        need ``fisher="empirical"`` (their local curvature is the batch's
        empirical Fisher).

    Attributes
    ----------
    preconditioner : KFACPreconditioner
        The curvature backend (a subclass that lets KLD-WRM edit the gradients
        between its curvature update and its preconditioning).
    variant : str
    config : KLDWRMConfig
    rho : float
        The resolved ``ρ``.

    Notes
    -----
    **Per step.**  Before the K-FAC direction is computed, each layer's
    gradient becomes ``ĝ_k = g_k - β_k (g_{k-1} + γ F_{k-1} s_{k-1})`` with
    ``β_k = ρ (lr_{k-1}/lr_k)(c_k/c_{k-1})`` (no ``F`` term for SO), where
    ``s_{k-1} = θ_k - θ_{k-1}`` is the displacement the optimizer actually
    applied and ``F_{k-1} s = G_loc S A_loc`` the Kronecker-factored local
    curvature of step ``k-1``.  Q and QE precondition with the augmented
    factors ``A_EA + γ lr_k A_loc`` and ``G_EA + γ lr_k G_loc`` (decomposed
    every step: a Brand update of the low-rank snapshot, ``O(d(r+n)²)``, when
    the batch's ``n`` rows are thin, ``r + n < d``; a dense ``eigh``, ``O(d³)``,
    otherwise).  Every variant caps each layer's direction's RMS, then the
    preconditioner grafts (``graft="unit"``) and KL-clips as configured.  Parameters outside the
    preconditioned layers keep their plain gradient, as with the preconditioner.

    **QE and the optimizer.**  The inner loop runs inside :meth:`step` on the
    preconditioned layers' parameters: it starts at the Q point
    ``θ_k - lr_k u_k``, takes ``inner_steps`` heavy-ball steps
    (``v ← μ v + h``, ``θ ← θ - 0.1·lr_k·v``), restores the parameters to
    ``θ_k`` and writes ``p.grad = -(θ_final - θ_k)/lr_k``.  A plain
    ``torch.optim.SGD`` step (momentum 0) therefore lands exactly on
    ``θ_final``; SGD's ``weight_decay`` adds ``-lr·wd·θ_k`` after the KLD-WRM
    step (the papers' order).  With momentum the optimizer adds ``μ`` times
    its buffer of past KLD-WRM steps, and Adam rescales the step per
    coordinate: both then apply a different step than the papers' (the same
    holds for SO and Q).  The closure's forward passes run with the model in
    ``eval()`` mode (dropout off, batch-norm running statistics), so the
    stored networks' outputs are deterministic and the curvature hooks record
    nothing; the closure must return logits of shape ``(n, ..., C)``.

    **Memory** beyond the preconditioner, for ``P`` trainable parameters and
    ``P_l`` in preconditioned layers: SO keeps ``g_{k-1}`` (``P_l``).  Q adds
    one parameter snapshot ``θ_{k-1}`` (``P``) and the local factors of step
    ``k-1`` (per factor ``min(n d, d²)``).  QE keeps ``max(1, n_stored - 1)``
    snapshots between steps (``θ_k`` is the live model) and, during the step,
    one more copy of the parameters, two of ``P_l`` (iterate and momentum) and
    ``n_stored`` output tensors of the batch.  QE costs ``n_stored +
    inner_steps`` extra forward and ``inner_steps`` extra backward passes per step.

    **Robustness.**  A non-finite gradient skips the step (every ``p.grad``
    becomes None, the KLD-WRM state is untouched); non-finite local statistics
    are dropped for that step and a failed decomposition of an augmented
    factor is skipped (Q falls back to the EA factors); a non-finite inner
    loop falls back to the Q step.  All are counted in :meth:`stats`
    and logged; the state never holds NaN.
    """

    #: The variants, in the papers' order.
    VARIANTS = VARIANTS

    def __init__(
        self,
        model: nn.Module,
        optimizer: torch.optim.Optimizer,
        *,
        variant: str = "so",
        method: str = "kfac",
        config: KLDWRMConfig | None = None,
        damping: float | Callable[[int], float] = 0.01,
        kl_clip: float | None = None,
        factor_update_freq: int | Callable[[int], int] = 5,
        inv_update_freq: int | Callable[[int], int] = 5,
        distributed: bool = False,
        **preconditioner_options: Any,
    ) -> None:
        if not isinstance(optimizer, torch.optim.Optimizer):
            raise TypeError(f"`optimizer` must be a torch.optim.Optimizer, got {type(optimizer).__name__}")
        if variant not in VARIANTS:
            raise ValueError(f"`variant` must be one of {', '.join(map(repr, VARIANTS))}; got {variant!r}")
        if config is None:
            config = KLDWRMConfig()
        if not isinstance(config, KLDWRMConfig):
            raise TypeError(f"`config` must be a KLDWRMConfig, got {type(config).__name__}")
        for key, why in _OWNED.items():
            if key in preconditioner_options:
                raise TypeError(f"KLDWRM does not take `{key}`: {why}")
        fisher = preconditioner_options.get("fisher", "empirical")
        if variant != "so" and fisher != "empirical":
            raise ValueError(
                f"`fisher` must be 'empirical' for variant={variant!r} (its local curvature is the batch's "
                f"empirical Fisher), got {fisher!r}"
            )
        if not isinstance(distributed, bool):
            raise TypeError(f"`distributed` must be a bool, got {type(distributed).__name__}")
        if distributed and preconditioner_options.get("mode", "replicate") != "replicate":
            raise ValueError(f"`mode` must be 'replicate' for a distributed KLDWRM, got {preconditioner_options['mode']!r}")
        preconditioner_options.setdefault("low_rank_grad", False)
        preconditioner_options.setdefault("graft", "unit")  # layer steps of length ~lr (docs/kldwrm.rst, Defaults)
        if distributed:
            cls = functools.partial(_DistributedWakePreconditioner, wake={"variant": variant, **vars(config)})
        else:
            cls = _WakePreconditioner
        self.model = model
        self.optimizer = optimizer
        self.variant = variant
        self.config = config
        self.rho = config.rho_for(variant)
        self.preconditioner = cls(
            model,
            before_precondition=self._before_precondition,
            method=method,
            lr=self._reference_lr,
            damping=damping,
            factor_decay=self.rho,
            factor_update_freq=factor_update_freq,
            inv_update_freq=inv_update_freq,
            kl_clip=kl_clip,
            rms_clip=config.rms_clip,
            **preconditioner_options,
        )
        self.method = method
        self.distributed = distributed
        self._group = self.preconditioner.group if distributed else None
        layers = self.preconditioner.layers
        in_optimizer = {id(p) for group in optimizer.param_groups for p in group["params"]}
        missing = [name for name, layer in layers.items() if id(layer.module.weight) not in in_optimizer]
        if missing:
            self.preconditioner.remove_hooks()
            raise ValueError(f"`optimizer` does not hold the weights of the preconditioned layers {missing}")
        self._first_weight = next(iter(layers.values())).module.weight
        self._params = [p for p in model.parameters() if p.requires_grad]
        self._index = {id(p): i for i, p in enumerate(self._params)}
        self._wake = {name: _LayerWake() for name in layers}
        # (snapshot object, statistics updates behind it) of each layer's A factor
        self._snapshot_counts: dict[str, tuple[FactorEigen | None, int]] = {name: (None, 0) for name in layers}
        # parameter snapshots θ_{k-1}, ...: none kept by SO, θ_{k-1} by Q, n_stored - 1 (>= 1) by QE
        self._history: deque[list[torch.Tensor]] = deque(maxlen=max(1, config.n_stored - 1) if variant == "qe" else 1)
        self._captures: dict[str, _Capture] = {}
        self._handles: list[Any] = []
        if variant != "so":
            # eager under torch.compile (a graph break, no per-step recompilation): compile before building KLDWRM
            hook = eager_hook(self._forward_hook)
            self._handles = [layer.module.register_forward_hook(hook) for layer in layers.values()]
            self._by_module = {layer.module: layer for layer in layers.values()}
        # per-step scratch
        self._lrs: dict[str, float] = {}
        self._local: dict[str, tuple[_LocalFactor, _LocalFactor]] = {}
        self._pending: dict[str, torch.Tensor] | None = None
        self._counts_now: dict[str, int] = {}
        self._counters = {"skipped_steps": 0, "local_skipped": 0, "inner_fallbacks": 0, "inner_capped": 0,
                          "augment_failures": 0}
        self._seconds = {"statistics": 0.0, "decomposition": 0.0, "preconditioning": 0.0, "inner": 0.0}

    # ================================================================== learning rates
    def _group_lrs(self) -> dict[int, float]:
        return {id(p): float(group["lr"]) for group in self.optimizer.param_groups for p in group["params"]}

    def _reference_lr(self, step: int) -> float:
        """The lr of the first preconditioned layer's group (the KL clip's ``lr``)."""
        return self._group_lrs()[id(self._first_weight)]

    # ================================================================== local statistics (Q, QE)
    def _forward_hook(self, module: nn.Module, inputs: tuple, output: Any) -> None:
        recording = module.training and torch.is_grad_enabled()
        if not (recording and isinstance(output, torch.Tensor) and output.requires_grad):
            return
        t0 = time.perf_counter()
        layer = self._by_module[module]
        cap = self._captures.get(layer.name)
        if cap is None:
            cap = self._captures[layer.name] = _Capture(layer.helper, self.preconditioner.factor_dtype)
        x = inputs[0].detach()
        cap.A.add(layer.helper.a_rows(x))
        cap.samples += layer.helper.batch_size(x)
        output.register_hook(functools.partial(self._grad_hook, layer, cap))
        self._seconds["statistics"] += time.perf_counter() - t0

    def _grad_hook(self, layer: KFACLayer, cap: _Capture, grad: torch.Tensor) -> None:
        t0 = time.perf_counter()
        rows = layer.helper.g_rows(grad.detach())
        scaler = self.preconditioner.grad_scaler
        if scaler is not None:
            rows = rows / float(scaler.get_scale())
        cap.G.add(rows)
        self._seconds["statistics"] += time.perf_counter() - t0

    def _finish_captures(self) -> dict[str, tuple[_LocalFactor, _LocalFactor]]:
        """``(A_loc, G_loc)`` per layer from this step's rows, in the preconditioner's scaling."""
        if self.distributed:
            return self._reduce_captures()
        out = {}
        reduction = self.preconditioner.loss_reduction
        for name, cap in self._captures.items():
            if not cap.A.n_rows or not cap.G.n_rows:
                continue
            A = cap.A.finish(1.0 / cap.A.n_rows)
            G = cap.G.finish(g_scale(cap.samples, reduction))
            if A is not None and G is not None:
                out[name] = (A, G)
        self._captures = {}
        return out

    def _reduce_captures(self) -> dict[str, tuple[_LocalFactor, _LocalFactor]]:
        r"""Distributed: the global batch's ``(A_loc, G_loc)`` from every rank's rows, by one all-reduce.

        Rank ``p`` contributes ``R_p A_p = Σ xxᵀ`` (its ``R_p`` activation rows)
        and ``n_p G_p`` (its ``n_p`` samples), so ``A = Σ_p R_p A_p / Σ_p R_p`` and
        ``G = Σ_p n_p G_p / Σ_p n_p`` are what one process computes on the
        concatenated batch (for a mean loss each rank's output gradients are
        those of its own mean, which the weights ``n_p`` undo).  Every layer
        takes part on every rank (zeros where nothing was captured), so the
        collective is the same everywhere; cost ``Σ (d_A² + d_G²)`` elements.
        """
        reduction = self.preconditioner.loss_reduction
        dtype = self.preconditioner.factor_dtype
        layers = self.preconditioner.layers
        device = next(iter(layers.values())).module.weight.device
        parts = []
        for name, layer in layers.items():
            cap = self._captures.get(name)
            dA, dG = layer.helper.a_dim, layer.helper.g_dim
            if cap is None or not cap.A.n_rows or not cap.G.n_rows:
                parts += [torch.zeros(2, dtype=dtype, device=device), torch.zeros(dA * dA + dG * dG, dtype=dtype, device=device)]
                continue
            A = cap.A.finish(1.0).dense(dtype)
            G = cap.G.finish(cap.samples * g_scale(cap.samples, reduction)).dense(dtype)
            counts = torch.tensor([cap.A.n_rows, cap.samples], dtype=dtype, device=device)
            parts += [counts, A.reshape(-1), G.reshape(-1)]
        flat = torch.cat(parts)
        dist.all_reduce(flat, group=self._group)
        self._captures = {}
        out, offset = {}, 0
        for name, layer in layers.items():
            dA, dG = layer.helper.a_dim, layer.helper.g_dim
            rows, samples = flat[offset : offset + 2].tolist()
            A = flat[offset + 2 : offset + 2 + dA * dA].view(dA, dA)
            G = flat[offset + 2 + dA * dA : offset + 2 + dA * dA + dG * dG].view(dG, dG)
            offset += 2 + dA * dA + dG * dG
            if rows > 0 and samples > 0:
                out[name] = (_LocalFactor(gram=A / rows), _LocalFactor(gram=G / samples))
        return out

    def _row_share(self, rows: int) -> float:
        """Distributed QE: this rank's fraction of the global batch's output rows (one all-reduce)."""
        total = torch.tensor([float(rows)], dtype=torch.float64, device=self._first_weight.device)
        dist.all_reduce(total, group=self._group)
        return rows / float(total)

    def _reduce_kl_grads(self, grads: list[torch.Tensor], share: float) -> list[torch.Tensor]:
        """Distributed QE: ``Σ_p share_p ∇KL_p`` (``share_p`` = the rank's fraction of the batch rows), one all-reduce."""
        flat = torch.cat([g.reshape(-1) for g in grads]) * share
        dist.all_reduce(flat, group=self._group)
        out, offset = [], 0
        for g in grads:
            out.append(flat[offset : offset + g.numel()].view_as(g))
            offset += g.numel()
        return out

    # ================================================================== step
    def step(self, closure: Callable[[], torch.Tensor] | None = None) -> bool:
        """Rewrite the gradients into the KLD-WRM step (after ``loss.backward()``, before ``optimizer.step()``).

        Parameters
        ----------
        closure : callable, optional
            ``closure() -> Tensor (n, ..., C)``: the model's logits on the
            current batch, recomputed with the current parameters (e.g.
            ``lambda: model(x)``).  Required by ``variant="qe"``, ignored otherwise.

        Returns
        -------
        bool
            False when the step was skipped because a gradient was not finite
            (every ``p.grad`` is then None, so any torch optimizer leaves the
            parameters alone); True otherwise.

        Raises
        ------
        ValueError
            ``variant="qe"`` without a ``closure``.
        """
        if self.variant == "qe" and closure is None:
            raise ValueError(
                "`closure` is required by variant='qe': pass closure=lambda: model(x) (the batch's logits)"
            )
        if closure is not None and not callable(closure):
            raise TypeError(f"`closure` must be callable, got {type(closure).__name__}")
        lrs = self._group_lrs()
        self._lrs = {name: lrs[id(layer.module.weight)] for name, layer in self.preconditioner.layers.items()}
        self._local = self._finish_captures() if self.variant != "so" else {}
        self._pending = None
        try:
            taken = self.preconditioner.step()
            if not taken or self._pending is None:
                self._counters["skipped_steps"] += 1
                logger.warning("KLD-WRM step %d skipped (non-finite gradient)", self.preconditioner.steps - 1)
                return False
            if self.variant == "qe" and self.config.inner_steps > 0:
                self._inner_loop(closure)
            self._commit()
            return True
        finally:
            self._pending = None
            self._local = {}

    @torch.no_grad()
    def _before_precondition(self, k: int, lam: float) -> None:
        """Called by the preconditioner after the curvature update: write ``ĝ_k``, build Q's factors."""
        self._track_snapshots()
        layers = self.preconditioner.layers
        grads: dict[str, torch.Tensor] = {}
        for name, layer in layers.items():
            w = layer.module.weight
            if w.requires_grad and w.grad is not None:
                grads[name] = layer.helper.grad_matrix()
        names = list(self._local)
        checks = [torch.isfinite(g).all() for g in grads.values()]
        checks += [torch.stack([A.finite(), G.finite()]).all() for A, G in self._local.values()]
        ok = torch.stack(checks).tolist() if checks else []
        if not all(ok[: len(grads)]):
            return  # the preconditioner skips the step
        for name, fine in zip(names, ok[len(grads) :]):
            if not fine:
                self._counters["local_skipped"] += 1
                logger.warning("step %d: non-finite local statistics in %s; Q uses the EA factors", k, name)
                del self._local[name]
        t0 = time.perf_counter()
        raw = {}
        for name, g in grads.items():
            raw[name] = g.clone()
            correction = self._correction(name, g)
            if correction is not None:
                layers[name].helper.set_grad_matrix(g - correction)
        self._pending = raw
        t1 = time.perf_counter()
        self._seconds["preconditioning"] += t1 - t0
        if self.variant != "so" and self.config.local_curvature > 0:
            for name in grads:
                self._augment_layer(name, k)
        self._seconds["decomposition"] += time.perf_counter() - t1

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
        st = self._wake[name]
        lr = self._lrs[name]
        if st.g_prev is None or lr <= 0:
            return None
        beta = self.rho * (st.lr_prev / lr) * self._c_ratio(st.count_prev, self._counts_now[name])
        term = st.g_prev.to(g.dtype)
        gamma = self.config.local_curvature
        if self.variant != "so" and gamma > 0 and st.local_prev is not None:
            helper = self.preconditioner.layers[name].helper
            A, G = st.local_prev
            S = (_param_matrix(helper) - self._layer_matrix(name, self._history[-1])).to(g.dtype)
            term = term + gamma * G.left(A.right(S))
        return beta * term

    # ================================================================== Q: augmented factors
    def _augment_layer(self, name: str, k: int) -> None:
        layer = self.preconditioner.layers[name]
        alpha = self.config.local_curvature * self._lrs[name]
        local = self._local.get(name)
        if local is None or alpha <= 0 or layer.A is None or layer.G is None:
            return
        eA, eG = layer.A.eigen, layer.G.eigen
        if eA is None or eG is None or eA.max_eig <= 0 or eG.max_eig <= 0:
            return
        try:
            aug = (self._augment(eG, local[1], alpha), self._augment(eA, local[0], alpha))
        except (ValueError, RuntimeError, np.linalg.LinAlgError) as exc:  # torch's LinAlgError is a RuntimeError
            self._counters["augment_failures"] += 1
            logger.warning("step %d: augmented factors of %s failed (%s); using the EA factors", k, name, exc)
            return
        self.preconditioner.augmented[name] = aug

    def _augment(self, e: FactorEigen, local: _LocalFactor, alpha: float) -> FactorEigen:
        r"""Decomposition of ``M + α L`` (``M`` the snapshot, with its complement, ``L`` the local factor).

        Brand when the snapshot is low rank and ``L`` thin with ``r + R < d``:
        ``M + αXXᵀ = (1+α)·brand_update(M, X, decay=1/(1+α))``, cost
        ``O(d(r+R)²)``, rank ``r + R``, complement unchanged.  Otherwise a dense
        ``eigh`` of the ``d × d`` sum, ``O(d³)``.
        """
        M = e.approx
        d, r = M.dim, M.rank
        low_rank = r < d
        c = e.min_eig if (low_rank and self.preconditioner.complement == "min") else 0.0
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

    # ================================================================== QE: inner loop
    def _inner_loop(self, closure: Callable[[], torch.Tensor]) -> None:
        """QE: inner heavy-ball steps from the Q point; writes ``-(θ_final - θ_k)/lr`` into the gradients."""
        layers = self.preconditioner.layers
        names = [n for n in self._pending if self._lrs[n] > 0 and layers[n].module.weight.grad is not None]
        if not names:
            return
        t0 = time.perf_counter()
        cfg = self.config
        lam = cfg.kl_weight / self._lrs[names[0]]
        with torch.no_grad():
            theta_k = [p.detach().clone() for p in self._params]
        stored = [theta_k, *reversed(self._history)][: cfg.n_stored]
        weights = [self.rho**j for j in range(len(stored))]
        weights = [w / sum(weights) for w in weights]
        layer_params = [_layer_params(layers[n].helper) for n in names]
        flat = [p for ps in layer_params for p in ps]
        was_training = self.model.training
        self.model.eval()
        try:
            with torch.no_grad():
                refs = []
                for snap in stored:
                    _load(self._params, snap)
                    refs.append(_log_probs(_outputs(closure)))
                _load(self._params, theta_k)
                theta0 = {n: _param_matrix(layers[n].helper) for n in names}
                x = {n: theta0[n] - self._lrs[n] * layers[n].helper.grad_matrix() for n in names}
                buf = {n: torch.zeros_like(x[n]) for n in names}
                # trust region of the inner loop: no inner step longer than the Q step itself, so a stiff
                # KL or local-curvature term cannot make the heavy-ball iteration diverge
                radius = {n: float((x[n] - theta0[n]).norm()) for n in names}
                share = self._row_share(refs[0].shape[0]) if self.distributed else 1.0
            for _ in range(cfg.inner_steps):
                with torch.no_grad():
                    for n in names:
                        _set_param_matrix(layers[n].helper, x[n])
                with torch.enable_grad():
                    logq = _log_probs(_outputs(closure), detach=False)
                    kl = sum(w * _sym_kl(logq, ref) for w, ref in zip(weights, refs))
                    kl_grads = torch.autograd.grad(0.5 * lam * kl, flat, allow_unused=True)
                if self.distributed:
                    kl_grads = self._reduce_kl_grads(
                        [torch.zeros_like(p) if gr is None else gr for p, gr in zip(flat, kl_grads)], share
                    )
                with torch.no_grad():
                    i = 0
                    for n, ps in zip(names, layer_params):
                        gs = [torch.zeros_like(p) if gr is None else gr for p, gr in zip(ps, kl_grads[i : i + len(ps)])]
                        i += len(ps)
                        h = self._pending[n].to(x[n].dtype) + _matrix(layers[n].helper, *gs)
                        local = self._local.get(n)
                        if local is not None and cfg.local_curvature > 0:
                            A, G = local
                            h = h + cfg.local_curvature * G.left(A.right(x[n] - theta0[n]))
                        buf[n].mul_(cfg.inner_momentum).add_(h)
                        step = buf[n] * (cfg.inner_lr * self._lrs[n])
                        norm = float(step.norm())
                        if not norm <= radius[n]:  # also catches a non-finite step
                            self._counters["inner_capped"] += 1
                            step = step * (radius[n] / norm) if math.isfinite(norm) and norm > 0 else torch.zeros_like(step)
                            buf[n].copy_(step / (cfg.inner_lr * self._lrs[n]))
                        x[n].sub_(step)
            with torch.no_grad():
                steps = {n: (x[n] - theta0[n]) / -self._lrs[n] for n in names}
                if bool(torch.stack([torch.isfinite(s).all() for s in steps.values()]).all()):
                    for n in names:
                        layers[n].helper.set_grad_matrix(steps[n])
                else:
                    self._counters["inner_fallbacks"] += 1
                    logger.warning(
                        "step %d: non-finite QE inner loop; the Q step is applied", self.preconditioner.steps - 1
                    )
        finally:
            with torch.no_grad():
                _load(self._params, theta_k)
            self.model.train(was_training)
            self._seconds["inner"] += time.perf_counter() - t0

    # ================================================================== bookkeeping
    @torch.no_grad()
    def _commit(self) -> None:
        """Keep what the next step needs: ``g_k``, ``lr_k``, ``c_k``'s count, local factors, ``θ_k``."""
        for name, g in self._pending.items():
            st = self._wake[name]
            st.g_prev = g
            st.lr_prev = self._lrs[name]
            st.count_prev = self._counts_now[name]
            st.local_prev = self._local.get(name)
        if self.variant != "so":
            self._history.append([p.detach().clone() for p in self._params])

    def _layer_matrix(self, name: str, snapshot: list[torch.Tensor]) -> torch.Tensor:
        """A layer's ``[W | b]`` from a parameter snapshot."""
        layer = self.preconditioner.layers[name]
        w = snapshot[self._index[id(layer.module.weight)]]
        b = snapshot[self._index[id(layer.module.bias)]] if layer.helper.has_bias else None
        return _matrix(layer.helper, w, b)

    def remove_hooks(self) -> None:
        """Detach from the model (the preconditioner's hooks and KLD-WRM's own)."""
        for h in self._handles:
            h.remove()
        self._handles = []
        self.preconditioner.remove_hooks()

    # ================================================================== state
    def state_dict(self) -> dict[str, Any]:
        """The full state: the preconditioner's, ``g_{k-1}``, ``lr_{k-1}``, local factors, snapshots, counters.

        Tensors are references (save with ``torch.save``); constructor
        arguments (variant options, schedules) are not included.
        """
        return {
            "version": 1,
            "variant": self.variant,
            "preconditioner": self.preconditioner.state_dict(),
            "counters": dict(self._counters),
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
                for name, st in self._wake.items()
            },
            "history": [list(snap) for snap in self._history],
        }

    def load_state_dict(self, state_dict: Mapping[str, Any]) -> None:
        """Restore a state from :meth:`state_dict` (same variant, method and layers)."""
        if state_dict.get("version") != 1:
            raise ValueError(f"unsupported KLDWRM state version {state_dict.get('version')!r}")
        if state_dict["variant"] != self.variant:
            raise ValueError(f"the state is for variant {state_dict['variant']!r}, this KLDWRM runs {self.variant!r}")
        if set(state_dict["layers"]) != set(self._wake):
            raise ValueError(f"the state holds layers {sorted(state_dict['layers'])}, the model has {sorted(self._wake)}")
        history = state_dict["history"]
        if history and len(history[0]) != len(self._params):
            raise ValueError(
                f"the state's snapshots hold {len(history[0])} parameters, the model has {len(self._params)}"
            )
        self.preconditioner.load_state_dict(state_dict["preconditioner"])
        self._counters = {**self._counters, **dict(state_dict["counters"])}
        for name, sd in state_dict["layers"].items():
            layer = self.preconditioner.layers[name]
            device = layer.module.weight.device
            st = self._wake[name]
            st.g_prev = None if sd["g_prev"] is None else sd["g_prev"].to(device, copy=True)
            st.lr_prev = float(sd["lr_prev"])
            st.count_prev = int(sd["count_prev"])
            lp = sd["local_prev"]
            st.local_prev = None if lp is None else (
                _LocalFactor.from_state(lp["A"], device),
                _LocalFactor.from_state(lp["G"], device),
            )
            e = None if layer.A is None else layer.A.eigen
            self._snapshot_counts[name] = (e, int(sd["snapshot_count"]))
        self._history.clear()
        for snap in history:
            self._history.append([t.to(p.device, p.dtype, copy=True) for t, p in zip(snap, self._params)])
        self._captures = {}

    def stats(self) -> dict[str, Any]:
        """Diagnostics: the preconditioner's :meth:`~KFACPreconditioner.stats` plus KLD-WRM's counters.

        Returns
        -------
        dict
            ``{"variant", "method", "rho", "step", "skipped_steps",
            "local_skipped", "inner_fallbacks", "inner_capped", "augment_failures", "seconds",
            "layers", "preconditioner"}``.  ``seconds`` adds KLD-WRM's time to the
            preconditioner's phases (local statistics to ``statistics``, Q's
            augmented factors to ``decomposition``, the corrected gradient to
            ``preconditioning``) and has ``inner`` (QE's loop); ``skipped_steps``
            counts KLD-WRM steps skipped for a non-finite gradient.
        """
        pre = self.preconditioner.stats()
        phases = ("statistics", "decomposition", "preconditioning")
        seconds = {p: pre["seconds"].get(p, 0.0) + self._seconds[p] for p in phases}
        seconds["inner"] = self._seconds["inner"]
        return {
            "variant": self.variant,
            "method": self.method,
            "rho": self.rho,
            "step": pre["step"],
            **self._counters,
            "seconds": seconds,
            "layers": pre["layers"],
            "preconditioner": pre,
        }


# =========================================================================== helpers
def _update_count(f: FactorState) -> int:
    """Statistics updates folded into ``f``'s current snapshot (Brand states count their own updates)."""
    return f.brand_count if isinstance(f, BrandFactor) else f.ea_count


def _layer_params(helper: LayerHelper) -> list[torch.Tensor]:
    """``[weight]`` or ``[weight, bias]`` of a layer."""
    mod = helper.module
    return [mod.weight, mod.bias] if helper.has_bias else [mod.weight]


def _matrix(helper: LayerHelper, w: torch.Tensor, b: torch.Tensor | None = None) -> torch.Tensor:
    """``[W | b]`` of shape (g_dim, a_dim) from weight-shaped and bias-shaped tensors."""
    m = w.reshape(helper.g_dim, -1)
    if helper.has_bias:
        m = torch.cat([m, b.reshape(-1, 1).to(m.dtype)], dim=1)
    return m


def _param_matrix(helper: LayerHelper) -> torch.Tensor:
    """The layer's current parameters as ``[W | b]`` (a new tensor)."""
    mod = helper.module
    return _matrix(helper, mod.weight.detach(), mod.bias.detach() if helper.has_bias else None).clone()


def _set_param_matrix(helper: LayerHelper, mat: torch.Tensor) -> None:
    """Write ``[W | b]`` into the layer's parameters in place (under ``no_grad``)."""
    mod = helper.module
    n_w = helper.a_dim - int(helper.has_bias)
    mod.weight.copy_(mat[:, :n_w].reshape(mod.weight.shape))
    if helper.has_bias:
        mod.bias.copy_(mat[:, n_w].reshape(mod.bias.shape))


def _load(params: Iterable[torch.Tensor], values: Iterable[torch.Tensor]) -> None:
    for p, v in zip(params, values):
        p.copy_(v)


def _outputs(closure: Callable[[], torch.Tensor]) -> torch.Tensor:
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
