"""KFACPreconditioner: hooks, schedules, damping, clipping and ``step()`` for the K-FAC family.

The preconditioner sits between ``loss.backward()`` and ``optimizer.step()``
and rewrites ``p.grad`` in place, so any ``torch.optim`` optimizer, LR
scheduler, gradient accumulation and ``GradScaler`` compose with it::

    precond = KFACPreconditioner(model, method="rs-kfac")
    for x, y in loader:
        optimizer.zero_grad()
        loss = loss_fn(model(x), y)
        loss.backward()
        precond.step()          # p.grad <- ν · (G + μ_G I)⁻¹ dW (A + μ_A I)⁻¹
        optimizer.step()

Per step ``k`` (0-based): on ``k % T_updt == 0`` the hooks capture the layer
inputs and output gradients and the exponential averages are updated; on
``k % T_inv == 0`` the factors are decomposed (dense ``eigh`` or randomized);
Brand methods update ``(U, D)`` every ``T_B`` steps.  See docs/kfac.rst.
"""

from __future__ import annotations

import contextlib
import functools
import logging
import math
import time
import warnings
import zlib
from collections import Counter
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from fnmatch import fnmatchcase
from typing import Any, Literal, Union

import numpy as np
import torch
from torch import nn

from onlinela import validation as V

from . import scaling
from . import thin as thin_path
from .brand_cost import BrandCostModel
from .factors import (
    BrandDenseFactor,
    BrandFactor,
    DenseFactor,
    FactorEigen,
    FactorState,
    RandomizedFactor,
    RankPolicy,
    all_finite,
    as_rank_policy,
)
from .compiled import clean_name, dynamo_loaded, eager_hook, unwrap_compiled
from .blocks import BlockContext, BlockSet, Uncovered, build_blocks
from .inverse import _complement, apply_inverse, damped_solve, factor_scale
from .fisher import label_vectors
from .layer import KFACLayer
from .logs import WarningCounter
from .modules import LayerHelper, LinearHelper, g_scale, helper_for

__all__ = ["METHODS", "BrandConfig", "KFACLayer", "KFACPreconditioner", "apply_inverse", "damped_solve"]

logger = logging.getLogger(__name__)

#: The supported methods, in the order of the papers.
METHODS = ("kfac", "rs-kfac", "sre-kfac", "nystrom-kfac", "b-kfac", "br-kfac", "b-kfac-c")
_RANDOMIZED = {"rs-kfac": "svd", "sre-kfac": "subspace", "nystrom-kfac": "nystrom"}
_BRAND = ("b-kfac", "br-kfac", "b-kfac-c")

IntSchedule = Union[int, Callable[[int], int]]
FloatSchedule = Union[float, Callable[[int], float]]
LayerSelector = Union[str, type]


@dataclass(frozen=True)
class BrandConfig:
    """Options of the Brand methods ``b-kfac``, ``br-kfac``, ``b-kfac-c`` (algorithms.md §4).

    Parameters
    ----------
    update_freq : int, callable of the step, or None
        ``T_B``: Brand-update ``(U, D)`` every ``T_B`` steps.  ``None`` (default)
        uses ``factor_update_freq`` (the author's later default "every T_updt").
    overwrite_period : int or callable
        B-R-KFAC / B-KFAC-c: overwrite ``(U, D)`` by a randomized decomposition of
        the dense EA every ``overwrite_period · T_inv`` steps (default 2).
    correction_period : int or callable
        B-KFAC-c: Rayleigh–Ritz-correct after every ``correction_period``-th
        Brand update (default 2).
    correction_fraction : float
        ``φ`` in (0, 1]: fraction of ``U``'s columns refreshed (default 0.2).
    fallback : {"svd", "subspace", "nystrom"}
        Randomized method of the overwrite and of the factors a Brand update
        does not pay off on.  Default RS-KFAC's ``"svd"``.
    cost : BrandCostModel or None
        Decides, per factor, whether Brand updates are cheaper per step than
        the dense EA + randomized fallback (:class:`~onlinela_torch.BrandCostModel`,
        fitted by ``benchmarks/brand_cost.py``); ``None``: Brand wherever
        ``r + s < d`` (the papers' rule, which also picks Brand at ``d ≈ 1000``,
        ``s = 256``, where it costs more).  The choice is in ``stats()["brand"]``.
    """

    update_freq: IntSchedule | None = None
    overwrite_period: IntSchedule = 2
    correction_period: IntSchedule = 2
    correction_fraction: float = 0.2
    fallback: Literal["svd", "subspace", "nystrom"] = "svd"
    cost: BrandCostModel | None = BrandCostModel()

    def __post_init__(self) -> None:
        if self.cost is not None and not isinstance(self.cost, BrandCostModel):
            raise TypeError(f"`brand.cost` must be a BrandCostModel or None, got {type(self.cost).__name__}")
        if self.update_freq is not None:
            _int_schedule(self.update_freq, "brand.update_freq")
        _int_schedule(self.overwrite_period, "brand.overwrite_period")
        _int_schedule(self.correction_period, "brand.correction_period")
        V.check_real(self.correction_fraction, "brand.correction_fraction", low=0.0, high=1.0, low_open=True)
        if self.fallback not in ("svd", "subspace", "nystrom"):
            raise ValueError(f"`brand.fallback` must be 'svd', 'subspace' or 'nystrom', got {self.fallback!r}")


@dataclass(frozen=True)
class _Plan:
    """What happens at one step (shared by all layers)."""

    ea: bool  # T_updt: update the dense EAs
    brand: bool  # T_B: Brand updates
    decompose: bool  # T_inv: decompose dense EAs
    overwrite: bool  # B-R: overwrite (U, D) from the dense EA
    correct: bool  # B-KFAC-c: Rayleigh-Ritz correction after the Brand update

    @property
    def capture(self) -> bool:
        return self.ea or self.brand


class KFACPreconditioner:
    r"""K-FAC-family gradient preconditioner for ``nn.Linear`` and ``nn.Conv2d`` layers.

    Call :meth:`step` after ``loss.backward()`` and before ``optimizer.step()``;
    it replaces each supported layer's gradient ``[dW | db]`` (shape
    ``d_out × (d_in+1)``) by the clipped natural-gradient direction and leaves
    every other parameter's gradient alone.

    Parameters
    ----------
    model : torch.nn.Module
        The network; forward hooks are registered on the selected layers.
    method : {"kfac", "rs-kfac", "sre-kfac", "nystrom-kfac", "b-kfac", "br-kfac", "b-kfac-c"}
        ``"kfac"``: dense EA + ``eigh``.  ``"rs-kfac"`` / ``"sre-kfac"`` /
        ``"nystrom-kfac"``: dense EA + randomized SVD / symmetric subspace
        iteration / Nyström eigendecomposition of rank ``rank``.  ``"b-kfac"``:
        Brand-updated ``(U, D)`` only, for factors with ``r + s < d``;
        ``"br-kfac"``: plus the dense EA and a periodic randomized overwrite;
        ``"b-kfac-c"``: plus a Rayleigh–Ritz correction.  Factors that are too
        small for a Brand update use RS-KFAC.
    lr : float or callable of the step
        Learning rate, used by the KL clip only (the optimizer applies its own),
        when no ``optimizer`` is given.
    damping : float > 0 or callable of the step
        Relative damping ``λ`` (default ``1e-2``, chosen on the task zoo, docs/tuning.rst).  Product convention: ``λ' = λ · max eig G · max eig A``;
        per-factor convention: ``μ_X = √λ · max eig X`` (the same floor
        ``λ · max eig A · max eig G`` under the damped Kronecker product, so
        methods compare at one ``λ``; the papers' per-factor ``λ_f`` is ``damping = λ_f²``).
    factor_decay : float in (0, 1)
        ``ρ`` of the exponential averages.
    factor_update_freq, inv_update_freq : int >= 1 or callable of the step
        ``T_updt`` and ``T_inv``: statistics on steps ``k % T_updt == 0``,
        decompositions on ``k % T_inv == 0``.
    rank : int, callable of the step, or RankPolicy
        Target rank ``r`` of low-rank factors (default 220); :class:`~onlinela_torch.AdaptiveRank`
        is the papers' adaptive rule, :class:`~onlinela_torch.ErrorTargetRank`
        a tolerance on the damped inverse.
    oversample, n_iter : int >= 0
        Oversampling ``l`` and power/subspace iterations ``q`` of the randomized sketches.
    kl_clip : float > 0 or None
        ``κ`` of the KL clip ``ν = min(1, sqrt(κ / |Σ v·g·η²|))``, ``η`` the applied
        step length (:meth:`effective_lr`: ``lr/(1-β)`` under momentum ``β``);
        None (default) disables it.  The papers used ``1e-3`` – ``0.3`` with ``graft=None``.
    rms_clip : float > 0 or None
        The papers' per-layer RMS cap ``ν_l = min(1, κ / rms(v_l))`` (0.07 in
        their CIFAR runs); applied before the KL clip.  None (default) disables it.
    damping_convention : {"product", "factor"} or None
        None picks ``"product"`` for ``"kfac"`` (the K-FAC baseline) and
        ``"factor"`` for the randomized and Brand methods, as the papers do.
    complement : {"min", "zero"}
        Eigenvalue given to the directions a low-rank decomposition did not
        compute: ``"zero"`` is the papers' identity ``(UDUᵀ + μI)⁻¹ = U[(D+μ)⁻¹ - μ⁻¹]Uᵀ + μ⁻¹I``;
        ``"min"`` (default) uses the smallest kept eigenvalue, which keeps the
        step bounded when the rank is too small for the spectrum (the §3
        variant).  Irrelevant for full-rank factors (``"kfac"``, small factors).
    brand : BrandConfig, optional
        Periods of the Brand methods (default ``BrandConfig()``).
    fisher : {"empirical", "true", "exact"}
        Where ``G`` comes from: ``"empirical"`` (default, the papers): the
        back-propagated training loss; ``"true"``: labels sampled from the
        model's predictive distribution; ``"exact"``: the expectation over
        labels taken exactly (one backward pass per output dimension).  The last
        two need :meth:`fisher_backward` on the model outputs before ``loss.backward()``.
    loss_reduction : {"mean", "sum"}
        How the training loss reduces over the samples of a step (see
        :func:`onlinela_torch.modules.g_scale`; with gradient accumulation,
        "mean" means every micro-batch loss is divided by the number of micro-batches).
    layers, skip_layers : sequence of str or type, optional
        Select layers by name (``fnmatch`` patterns on ``named_modules()`` names)
        or by module type.  ``layers=None`` selects every supported layer.
    factor_dtype, inv_dtype : torch.dtype
        Dtype of the factor statistics and of the decompositions (float32 or
        float64; default float32).  Activations captured under ``torch.autocast``
        are cast up before use.
    low_rank_grad : bool or None
        Precondition Linear layers through the rank-``n`` gradient factors
        (``O((d_in+d_out)(r+n)n)`` for the solves instead of ``O(d_in d_out r)``).
        Needs the per-factor convention and the plain minibatch gradient of the
        captured batch: checked each step with a random probe, falling back to
        the dense path otherwise.  None enables it for the Brand methods.
    grad_scaler : torch.amp.GradScaler or None
        When given, captured output gradients are divided by its scale.
    seed : int
        Seeds the randomized sketches (one stream per factor) and label sampling.
    timer : callable
        Clock of the per-phase seconds in :meth:`stats` (default
        ``time.perf_counter``; e.g. ``time.process_time`` for CPU time, or a
        function that calls ``torch.cuda.synchronize()`` first for exact GPU phases).
    optimizer : torch.optim.Optimizer, optional
        The optimizer this preconditioner feeds: the KL clip reads its current
        ``lr`` and ``momentum`` (so LR schedulers act on both).
    warmup : bool
        Statistics on each of the first 4 steps, and decompositions after 4,
        16, 64, ... steps within the first ``T_inv`` instead of one at step 0
        (default True): no decomposition of a one-batch factor is kept for a
        whole period, and the warm-up costs the statistics of 4 steps (on the
        zoo's short runs a longer warm-up, statistics on every step of the
        first ``T_inv``, cost more than it gained; docs/tuning.rst).  Until the
        first decomposition the layers take the plain (grafted) gradient.
    damping_scale : {"max", "mean"}
        The factor scale ``s_X`` the relative damping multiplies: the largest
        eigenvalue (default) or the mean eigenvalue ``tr(X)/d`` (trace norm, as
        π-adjusted Tikhonov damping).
    graft : {"unit", "sgd"} or None
        Step length of the preconditioned direction.  ``"unit"`` (default):
        each layer's direction is rescaled to its gradient's norm divided by
        the running RMS of that norm, so each layer's step has length ``≈ lr``
        whatever the scale of the loss (mean or sum, targets ×100);
        ``"sgd"``: to its gradient's norm (SGD's step length); None: the
        natural-gradient length (the papers; use with ``kl_clip``).  See docs/tuning.rst.

    Notes
    -----
    State: :meth:`state_dict` / :meth:`load_state_dict` restore a run exactly
    (on CPU continuing after a reload gives bitwise the same parameters).
    Robustness: a non-finite gradient skips the step (every ``p.grad`` is set to
    ``None`` so any torch optimizer skips its update), non-finite statistics and
    failed decompositions are skipped; all are counted in :meth:`stats` and
    logged, and the state never holds NaN.
    """

    #: The supported ``method`` names.
    METHODS = METHODS

    def __init__(
        self,
        model: nn.Module,
        *,
        method: str = "kfac",
        lr: FloatSchedule = 0.1,
        damping: FloatSchedule = 1e-2,
        factor_decay: float = 0.95,
        factor_update_freq: IntSchedule = 10,
        inv_update_freq: IntSchedule = 50,
        rank: int | Callable[[int], int] | RankPolicy = 220,
        oversample: int = 10,
        n_iter: int = 3,
        kl_clip: float | None = None,
        rms_clip: float | None = None,
        damping_convention: Literal["product", "factor"] | None = None,
        complement: Literal["zero", "min"] = "min",
        brand: BrandConfig | None = None,
        fisher: Literal["empirical", "true", "exact"] = "empirical",
        loss_reduction: Literal["mean", "sum"] = "mean",
        layers: Sequence[LayerSelector] | None = None,
        skip_layers: Sequence[LayerSelector] = (),
        factor_dtype: torch.dtype = torch.float32,
        inv_dtype: torch.dtype = torch.float32,
        low_rank_grad: bool | None = None,
        grad_scaler: Any = None,
        seed: int = 0,
        timer: Callable[[], float] = time.perf_counter,
        optimizer: torch.optim.Optimizer | None = None,
        warmup: bool = True,
        damping_scale: Literal["max", "mean"] = "max",
        graft: Literal["sgd", "unit"] | None = "unit",
    ) -> None:
        if not isinstance(model, nn.Module):
            raise TypeError(f"`model` must be a torch.nn.Module, got {type(model).__name__}")
        if method not in METHODS:
            raise ValueError(f"`method` must be one of {', '.join(map(repr, METHODS))}; got {method!r}")
        self.model = model
        self.method = method
        self._lr = _float_schedule(lr, "lr")
        self._damping = _float_schedule(damping, "damping")
        # a damping schedule may change every step: no cached damped inverse is then reused
        self._damping_varies = callable(damping)
        self._reuse = 1  # expected reuse of this step's (snapshot, damping) pairs, see inverse.damped_solve
        self.factor_decay = V.check_real(factor_decay, "factor_decay", low=0.0, high=1.0, low_open=True, high_open=True)
        self._t_updt = _int_schedule(factor_update_freq, "factor_update_freq")
        self._t_inv = _int_schedule(inv_update_freq, "inv_update_freq")
        self.rank_policy = as_rank_policy(rank)
        self.oversample = V.check_int(oversample, "oversample", low=0)
        self.n_iter = V.check_int(n_iter, "n_iter", low=0)
        self.kl_clip = None if kl_clip is None else V.check_real(kl_clip, "kl_clip", low=0.0, low_open=True)
        self.rms_clip = None if rms_clip is None else V.check_real(rms_clip, "rms_clip", low=0.0, low_open=True)
        if damping_convention is None:
            damping_convention = "product" if method == "kfac" else "factor"
        if damping_convention not in ("product", "factor"):
            raise ValueError(f"`damping_convention` must be 'product', 'factor' or None, got {damping_convention!r}")
        self.damping_convention = damping_convention
        if complement not in ("zero", "min"):
            raise ValueError(f"`complement` must be 'zero' or 'min', got {complement!r}")
        self.complement = complement
        brand = BrandConfig() if brand is None else brand
        if not isinstance(brand, BrandConfig):
            raise TypeError(f"`brand` must be a BrandConfig, got {type(brand).__name__}")
        self.brand = brand
        self._t_brand = self._t_updt if brand.update_freq is None else _int_schedule(brand.update_freq, "brand.update_freq")
        self._overwrite = _int_schedule(brand.overwrite_period, "brand.overwrite_period")
        self._correction = _int_schedule(brand.correction_period, "brand.correction_period")
        if fisher not in ("empirical", "true", "exact"):
            raise ValueError(f"`fisher` must be 'empirical', 'true' or 'exact', got {fisher!r}")
        self.fisher = fisher
        if loss_reduction not in ("mean", "sum"):
            raise ValueError(f"`loss_reduction` must be 'mean' or 'sum', got {loss_reduction!r}")
        self.loss_reduction = loss_reduction
        for dt, name in ((factor_dtype, "factor_dtype"), (inv_dtype, "inv_dtype")):
            if dt not in (torch.float32, torch.float64):
                raise ValueError(f"`{name}` must be torch.float32 or torch.float64, got {dt}")
        self.factor_dtype = factor_dtype
        self.inv_dtype = inv_dtype
        if low_rank_grad is None:
            low_rank_grad = method in _BRAND
        self.grad_scaler = grad_scaler
        self.seed = V.check_int(seed, "seed", low=0)
        if not callable(timer):
            raise TypeError(f"`timer` must be a callable returning seconds, got {type(timer).__name__}")
        self._timer = timer
        if optimizer is not None and not isinstance(optimizer, torch.optim.Optimizer):
            raise TypeError(f"`optimizer` must be a torch.optim.Optimizer or None, got {type(optimizer).__name__}")
        self.optimizer = optimizer
        if not isinstance(warmup, bool):
            raise TypeError(f"`warmup` must be a bool, got {type(warmup).__name__}")
        self.warmup = warmup
        if damping_scale not in ("max", "mean"):
            raise ValueError(f"`damping_scale` must be 'max' or 'mean', got {damping_scale!r}")
        self.damping_scale = damping_scale
        if graft not in (None, "sgd", "unit"):
            raise ValueError(f"`graft` must be None, 'sgd' or 'unit', got {graft!r}")
        self.graft = graft
        # per layer / block tensor: (EA of the squared gradient norm, count) for graft="unit"
        self._grad_sq: dict[str, tuple[float, int]] = {}
        base = unwrap_compiled(model)  # torch.compile(model): the same names as the eager model
        self._param_names = {id(p): clean_name(n) for n, p in base.named_parameters()}
        self._params = list(base.parameters())

        thin = bool(low_rank_grad) and damping_convention == "factor"
        self._warn = WarningCounter(logger)
        # Brand methods: factors kept by Brand updates / by the fallback because r + s >= d / because of the cost
        self._brand_choice: Counter[str] = Counter()
        self.blocks, covered = self._build_blocks(base, layers, skip_layers)
        selected = [entry for entry in _select_layers(base, layers, skip_layers, allow_empty=True) if entry[0] in covered]
        if not selected and not self.blocks.blocks:
            raise ValueError(
                "no supported layer selected in the model (see docs/layers.rst); check `layers` / `skip_layers`"
            )
        self.layers: dict[str, KFACLayer] = {
            name: KFACLayer(i, name, m, h, thin and isinstance(h, LinearHelper)) for i, (name, m, h) in enumerate(selected)
        }
        self._by_module = {layer.module: layer for layer in self.layers.values()}
        self._handles: list[Any] = []
        self._attach_hooks()
        if type(self) is KFACPreconditioner and distributed_group_size() > 1:
            self._warn.warn(
                "not_distributed", "a torch.distributed group of %d ranks is active, but this preconditioner does not "
                "synchronise them: call onlinela_torch.distribute(precond) on every rank before the first step",
                distributed_group_size(),
            )
        self._paused = False
        #: multiplies the damping schedule (the Levenberg–Marquardt rule of the optimizer classes adapts it)
        self.damping_factor = 1.0
        self.steps = 0
        self._brand_updates = 0
        self._skipped_steps = 0
        self._seconds = {"statistics": 0.0, "decomposition": 0.0, "preconditioning": 0.0}
        self._plan_cache: tuple[int, _Plan] | None = None
        self._scale_cache: tuple[int, float] | None = None
        self._sampling: float | None = None  # weight of the sampled-label backward in progress
        self._fisher_gen: torch.Generator | None = None
        self._fisher_gen_state: torch.Tensor | None = None

    def _build_blocks(
        self, model: nn.Module, layers: Sequence[LayerSelector] | None, skip_layers: Sequence[LayerSelector]
    ) -> tuple[BlockSet, set[str]]:
        """Curvature blocks for every selected module the Kronecker layers do not handle.

        ``nn.Linear`` / ``nn.Conv2d`` keep this class's own path (thin gradients,
        distributed, KLD-WRM); the blocks of :mod:`onlinela_torch.blocks` cover
        attention, embeddings, normalisation layers, Conv1d and user-registered
        types.  Returns the blocks and the names of the Linear/Conv2d modules
        the Kronecker path may take (a Linear inside an attention block is the
        block's, e.g. ``out_proj``).
        """
        self._ctx = BlockContext(
            plan=lambda: self._plan(self.steps),
            fisher=self.fisher,
            loss_reduction=self.loss_reduction,
            grad_scale=self._grad_scale,
            factor_decay=self.factor_decay,
            factor_dtype=self.factor_dtype,
            inv_dtype=self.inv_dtype,
            damping_convention=self.damping_convention,
            complement=self.complement,
            make_factor=self._block_factor,
            kron_solve=lambda G, A, X, damping: apply_inverse(
                G, A, X, damping, self.damping_convention, self.complement, self.damping_scale, reuse=self._reuse
            ),
            timer=self._timer,
        )
        built = build_blocks(model, self._ctx, select=lambda name, m: _selected(name, m, layers, skip_layers))
        kron = {n for n, b in built.blocks.items() if type(b.module) in (nn.Linear, nn.Conv2d)}
        extra = {n: b for n, b in built.blocks.items() if n not in kron}
        if extra and distributed_group_size() > 1:
            for n, b in extra.items():
                for pname, _ in b.params():
                    built.uncovered.append(Uncovered(f"{n}.{pname}" if n else pname, type(b.module).__name__,
                                                     "curvature blocks do not run under torch.distributed yet"))
            self._warn.warn("blocks_distributed", "%d curvature block(s) (%s) are not distributed yet; their "
                            "parameters keep the plain gradient", len(extra), ", ".join(sorted(extra)))
            extra = {}
        return BlockSet(blocks=extra, uncovered=built.uncovered, shared=built.shared), kron


    # ================================================================== schedules
    def damping_at(self, step: int) -> float:
        """The relative damping ``λ`` at ``step``: the schedule times :attr:`damping_factor`."""
        return self._damping(step) * self.damping_factor

    def absolute_damping(self) -> dict[str, float]:
        r"""Per layer, the damping ``λ · s_A · s_G`` in curvature units (0 before the first decomposition).

        ``s`` is each factor's damping scale (``damping_scale``); it is the
        ``λ`` of ``C = F + λI`` that the quadratic model of the optimizer classes
        uses on the layer's parameters, consistent with what :meth:`step` inverts.
        """
        lam = self.damping_at(self.steps)
        out = {}
        for name, layer in self.layers.items():
            eA, eG = _eigen(layer.A), _eigen(layer.G)
            if eA is None or eG is None:
                out[name] = 0.0
            else:
                sA = factor_scale(eA, self.damping_scale, self.complement)
                sG = factor_scale(eG, self.damping_scale, self.complement)
                out[name] = lam * sA * sG
        return out

    def model_curvature(self, deltas: Mapping[int, torch.Tensor]) -> float:
        r"""``δᵀ(F̂ + λI)δ`` under the K-FAC model, ``F̂`` the current decompositions.

        Parameters
        ----------
        deltas : mapping of ``id(parameter)`` to Tensor
            A step for (some of) the model's parameters, each of its parameter's shape.

        Returns
        -------
        float
            ``Σ_l tr(δ_lᵀ G_l δ_l A_l) + λ_l ‖δ_l‖²`` over the preconditioned
            layers with a decomposition (``δ_l = [δW | δb]``, ``λ_l`` from
            :meth:`absolute_damping`); other parameters contribute nothing.
            The cheap quadratic model of the Levenberg–Marquardt rule without
            exact curvature products.  Cost ``O(d_G d_A (r_G + r_A))`` per layer.
        """
        lam = self.absolute_damping()
        total = 0.0
        for name, layer in self.layers.items():
            eA, eG = _eigen(layer.A), _eigen(layer.G)
            dw = deltas.get(id(layer.module.weight))
            if eA is None or eG is None or dw is None:
                continue
            d = dw.reshape(layer.helper.g_dim, -1)
            if layer.helper.has_bias:
                db = deltas.get(id(layer.module.bias))
                db = torch.zeros(d.shape[0], dtype=d.dtype, device=d.device) if db is None else db
                d = torch.cat([d, db.reshape(-1, 1).to(d.dtype)], dim=1)
            d = d.to(eA.approx.dtype)
            gd = eG.approx.matmul(d)
            gda = eA.approx.matmul(gd.T).T
            total += float((gda * d).sum()) + lam[name] * float((d * d).sum())
        return total

    @contextlib.contextmanager
    def paused(self) -> Iterator[None]:
        """Within the block the hooks capture nothing (extra forward/backward passes, e.g. curvature products)."""
        prev, self._paused = self._paused, True
        try:
            yield
        finally:
            self._paused = prev

    def effective_lr(self, step: int) -> float:
        r"""The step length the KL clip bounds: ``lr / (1 - β)`` under heavy-ball momentum ``β``.

        With ``optimizer=`` the learning rate and momentum are read from its
        ``param_groups[0]`` (so LR schedulers act on both); otherwise ``lr``
        (the constructor's schedule) and no momentum.  SGD with momentum ``β``
        and dampening ``τ`` applies ``(1-τ)/(1-β)`` times a constant direction
        in steady state, so the clip bounds that amplified step.
        """
        if self.optimizer is None:
            return self._lr(step)
        group = self.optimizer.param_groups[0]
        lr = float(group["lr"])
        beta = float(group.get("momentum", 0.0) or 0.0)
        if beta:
            lr *= (1.0 - float(group.get("dampening", 0.0) or 0.0)) / (1.0 - beta)
        return lr

    def _plan(self, k: int) -> _Plan:
        if self._plan_cache is not None and self._plan_cache[0] == k:
            return self._plan_cache[1]
        brand_method = self.method in _BRAND
        t_inv = self._t_inv(k)
        # warm-up: statistics on the first _WARMUP_STATS steps, decompositions after 4, 16, 64, ... steps
        # within the first T_inv (none at step 0: the plain gradient until then), so no decomposition of a
        # barely filled factor is kept for a whole T_inv period and the warm-up costs a few steps' statistics
        warm = self.warmup and k < t_inv
        ea = k % self._t_updt(k) == 0 or (warm and k < _WARMUP_STATS)
        brand = brand_method and (k % self._t_brand(k) == 0 or (warm and k < _WARMUP_STATS))
        periodic = k % t_inv == 0 and not (warm and k == 0 and t_inv > _WARMUP_STATS)
        plan = _Plan(
            ea=ea,
            brand=brand,
            decompose=periodic or (warm and k > 0 and _is_power_of_4(k + 1)),
            overwrite=self.method in ("br-kfac", "b-kfac-c") and k % (self._overwrite(k) * self._t_inv(k)) == 0,
            correct=self.method == "b-kfac-c" and brand and (self._brand_updates + 1) % self._correction(k) == 0,
        )
        self._plan_cache = (k, plan)
        return plan

    def _grad_scale(self) -> float:
        if self.grad_scaler is None:
            return 1.0
        if self._scale_cache is None or self._scale_cache[0] != self.steps:
            self._scale_cache = (self.steps, float(self.grad_scaler.get_scale()))
        return self._scale_cache[1]

    # ================================================================== factors
    def _factor_for(self, layer: KFACLayer, which: str, s: int, kind: str | None = None) -> FactorState:
        """The layer's ``which`` factor, created on first use (Brand eligibility needs ``s``)."""
        f = getattr(layer, which)
        if f is not None:
            return f
        dim = layer.helper.a_dim if which == "A" else layer.helper.g_dim
        rng = np.random.default_rng(np.random.SeedSequence(self.seed, spawn_key=(layer.index, int(which == "G"))))
        f = self._new_factor(dim, f"{layer.name or '<model>'}/{which}", s, layer.module.weight.device, rng, kind)
        setattr(layer, which, f)
        return f

    def _block_factor(self, dim: int, name: str, *, rows: int, device: torch.device, kind: str | None = None) -> FactorState:
        """The :class:`~onlinela_torch.blocks.FactorMaker` of the curvature blocks: this method's strategy."""
        rng = np.random.default_rng(np.random.SeedSequence(self.seed, spawn_key=(zlib.crc32(name.encode()),)))
        return self._new_factor(dim, name, rows, device, rng, kind)

    def _new_factor(
        self, dim: int, name: str, s: int, device: torch.device, rng: np.random.Generator, kind: str | None
    ) -> FactorState:
        common = dict(
            decay=self.factor_decay,
            rank=self.rank_policy,
            dtype=self.factor_dtype,
            inv_dtype=self.inv_dtype,
            device=device,
            rng=rng,
            name=name,
            warn=self._warn,
        )
        if kind is None:
            kind = self._kind_for(dim, s)
        sketch = dict(oversample=self.oversample, n_iter=self.n_iter)
        if kind == "dense":
            f = DenseFactor(dim, **common)
        elif kind == "randomized":
            f = RandomizedFactor(dim, method=_RANDOMIZED.get(self.method, self.brand.fallback), **sketch, **common)
        elif kind == "brand":
            f = BrandFactor(dim, **common)
        elif kind == "brand+dense":
            f = BrandDenseFactor(
                dim, method=self.brand.fallback, fraction=self.brand.correction_fraction, **sketch, **common
            )
        else:
            raise ValueError(f"unknown factor kind {kind!r} in checkpoint")
        logger.debug("factor %s: %s, d=%d", name, kind, dim)
        return f

    def _kind_for(self, dim: int, s: int) -> str:
        if self.method == "kfac":
            return "dense"
        if self.method in _RANDOMIZED:
            return "randomized"
        keeps_dense = self.method != "b-kfac"
        r = self.rank_policy.initial
        cost = self.brand.cost
        if r + s >= dim:  # a Brand update would not reduce the dimension
            reason = "rank"
        elif cost is not None and not cost.pays(
            dim, r, s, t_brand=self._t_brand(0), t_updt=self._t_updt(0), t_inv=self._t_inv(0),
            oversample=self.oversample, n_iter=self.n_iter, keeps_dense=keeps_dense,
        ):
            reason = "cost"
        else:
            self._brand_choice["brand"] += 1
            return "brand+dense" if keeps_dense else "brand"
        self._brand_choice[f"randomized_{reason}"] += 1
        logger.info("factor of d=%d (rank %d, %d rows per update): a Brand update %s; kept by randomized %s",
                    dim, r, s, "would not reduce the dimension" if reason == "rank" else
                    "costs more per step than the EA + randomized fallback (BrandConfig.cost)", self.brand.fallback)
        return "randomized"

    # ================================================================== hooks
    def _forward_hook(self, module: nn.Module, inputs: tuple, output: Any) -> None:
        if self._paused or not (module.training and torch.is_grad_enabled() and isinstance(output, torch.Tensor) and output.requires_grad):
            return
        layer = self._by_module[module]
        plan = self._plan(self.steps)
        if not (plan.capture or layer.low_rank_grad):
            return
        t0 = self._timer()
        x = inputs[0].detach()
        rows = layer.helper.a_rows(x)
        call = layer.calls
        layer.calls += 1
        if plan.capture:
            layer.pending_a[call] = (rows, layer.helper.batch_size(x))
        idx = None
        if layer.low_rank_grad:
            layer.thin_a.append(rows)
            idx = len(layer.thin_a) - 1
        output.register_hook(functools.partial(self._grad_hook, layer, idx, call))
        self._add_seconds(layer, "statistics", self._timer() - t0)

    def _grad_hook(self, layer: KFACLayer, idx: int | None, call: int, grad: torch.Tensor) -> None:
        if self._paused:
            return
        t0 = self._timer()
        plan = self._plan(self.steps)
        pending = layer.pending_a.pop(call, None)
        if pending is not None:  # statistics come from the forwards whose backward precedes step()
            rows_a, n = pending
            self._factor_for(layer, "A", rows_a.shape[0]).accumulate(rows_a, ea=plan.ea, brand=plan.brand)
            layer.a_rows_seen += rows_a.shape[0]
            layer.samples_seen += n
        rows = layer.helper.g_rows(grad.detach())
        scale = self._grad_scale()
        if scale != 1.0:
            rows = rows / scale
        if self._sampling is not None:
            if plan.capture:
                g = self._factor_for(layer, "G", rows.shape[0])
                g.accumulate(rows * math.sqrt(self._sampling), ea=plan.ea, brand=plan.brand)
        else:
            if plan.capture and self.fisher == "empirical":
                self._factor_for(layer, "G", rows.shape[0]).accumulate(rows, ea=plan.ea, brand=plan.brand)
            if idx is not None:
                layer.thin_g[idx] = rows
        self._add_seconds(layer, "statistics", self._timer() - t0)

    def _attach_hooks(self) -> None:
        """(Re-)register the capture hooks; under ``torch.compile`` they run eagerly (:func:`~onlinela_torch.compiled.eager_hook`)."""
        self.remove_hooks()
        self._handles = [layer.module.register_forward_hook(eager_hook(self._forward_hook)) for layer in self.layers.values()]
        self._handles.append(self._ctx.watch(self.model))
        self.blocks.attach()
        self._hooks_for_dynamo = dynamo_loaded()

    def remove_hooks(self) -> None:
        """Detach the preconditioner from the model (its state stays usable)."""
        for h in self._handles:
            h.remove()
        self._handles = []
        self.blocks.detach()

    # ================================================================== true Fisher
    def fisher_backward(
        self,
        outputs: torch.Tensor,
        *,
        likelihood: Literal["categorical", "bernoulli", "gaussian"] = "categorical",
        n_samples: int = 1,
    ) -> None:
        r"""Back-propagate label gradients from the model's predictive distribution to capture ``G``.

        Call it on the model outputs of each micro-batch *before*
        ``loss.backward()`` (it keeps the graph).  It only touches the factor
        statistics: ``p.grad`` is unchanged.  A no-op on steps without
        statistics and with ``fisher="empirical"``.

        Parameters
        ----------
        outputs : Tensor of shape (n, ..., C)
            Logits (``"categorical"``: ``p = softmax(f)``, the loss
            ``cross_entropy``; ``"bernoulli"``: ``p = sigmoid(f)`` independently
            per output, the loss ``binary_cross_entropy_with_logits``, e.g. an
            autoencoder's pixels) or means (``"gaussian"``, unit variance, i.e.
            the loss ``½‖f - y‖²``) of the ``n`` samples.
        likelihood : {"categorical", "bernoulli", "gaussian"}
        n_samples : int >= 1
            ``fisher="true"``: Monte-Carlo labels per sample, averaged.  Ignored
            by ``fisher="exact"``, which back-propagates the ``C`` columns of a
            square root of the loss Hessian (``√p_c (p - e_c)``,
            ``√(p_c (1 - p_c)) e_c`` or ``e_c``): the expectation over labels, exactly.

        Notes
        -----
        Cost: ``n_samples`` (true) or ``C`` (exact) backward passes.  The
        output gradients follow ``loss_reduction``: scaled by ``1/n`` for "mean".
        """
        if self.fisher == "empirical" or not self._plan(self.steps).capture:
            return
        if likelihood not in ("categorical", "bernoulli", "gaussian"):
            raise ValueError(f"`likelihood` must be 'categorical', 'bernoulli' or 'gaussian', got {likelihood!r}")
        n_samples = V.check_int(n_samples, "n_samples", low=1)
        f = outputs.detach()
        if f.dtype not in (torch.float32, torch.float64):  # autocast outputs: sample in float32
            f = f.float()
        n = f.shape[0] if f.ndim >= 2 else 1
        scale = 1.0 / n if self.loss_reduction == "mean" else 1.0
        gen = None if self.fisher == "exact" else self._generator(f.device)
        vecs, weight = label_vectors(f, likelihood, exact=self.fisher == "exact", n_samples=n_samples, gen=gen)
        weights = [layer.module.weight for layer in self.layers.values() if layer.module.weight.requires_grad]
        weights += self.blocks.fisher_params()
        self._sampling = weight
        self._ctx.sampling = weight
        try:
            for v in vecs:
                torch.autograd.grad(
                    outputs, weights, grad_outputs=(v * scale).to(outputs.dtype), retain_graph=True, allow_unused=True
                )
        finally:
            self._sampling = None
            self._ctx.sampling = None

    def _generator(self, device: torch.device) -> torch.Generator:
        if self._fisher_gen is None or self._fisher_gen.device != device:
            self._fisher_gen = torch.Generator(device=device)
            if self._fisher_gen_state is not None:
                self._fisher_gen.set_state(self._fisher_gen_state)
            else:
                self._fisher_gen.manual_seed(self.seed)
        return self._fisher_gen

    # ================================================================== step
    @torch.no_grad()
    def step(self) -> bool:
        """Update statistics and decompositions as scheduled, then precondition every ``p.grad`` in place.

        Returns
        -------
        bool
            False when the step was skipped because a gradient was not finite
            (every ``p.grad`` of the model is then set to ``None``, so that any
            torch optimizer leaves the parameters alone) or because no layer
            has a gradient (no ``backward()`` since the last step); True otherwise.

        Notes
        -----
        The rules that keep a step from silently doing nothing, each warned
        (once, then every 100th time) and counted in ``stats()["warnings"]``:

        * statistics come from the forward passes whose backward ran before
          this call; a captured forward without a backward (an extra forward
          for logging) is dropped (``unused_forward``);
        * a statistics step on which no layer captured anything (e.g. the model
          in ``eval()`` mode, or under ``torch.no_grad()``) is counted
          (``no_statistics``); the gradients are still preconditioned;
        * no gradient on any layer (``step()`` without ``backward()``, e.g.
          after :meth:`fisher_backward` only) folds the captured statistics in
          as scheduled and returns False: nothing to precondition (``no_gradient``);
        * a second call on gradients this preconditioner already rewrote
          (``step()`` twice) leaves them as they are (``repeated_step``) and
          returns True: the optimizer applies the preconditioned gradient once more,
          not a doubly preconditioned one.
        """
        k = self.steps
        if self._handles and not self._hooks_for_dynamo and dynamo_loaded():  # torch.compile came after the constructor
            self._attach_hooks()
        if self._already_written():
            self._warn.warn("repeated_step", "step %d: step() called again on gradients it already preconditioned; "
                            "left unchanged (call loss.backward() before each step())", k)
            return True
        plan = self._plan(k)  # evaluates (and validates) the schedules at k
        has_grad = any(layer.module.weight.grad is not None for layer in self.layers.values()) or any(
            p.grad is not None for b in self.blocks.blocks.values() for _, p in b.params()
        )
        if not has_grad:
            self._warn.warn("no_gradient", "step %d: no preconditioned layer has a gradient (no backward() since the "
                            "last step?); statistics folded in, nothing preconditioned", k)
        if has_grad and plan.capture and not any(layer.a_rows_seen or layer.pending_a for layer in self.layers.values()):
            self._warn.warn("no_statistics", "step %d: a statistics step, but no layer captured a forward/backward "
                            "(model in eval() mode, or forward under no_grad?); factors not updated", k)
        for layer in self.layers.values():
            if layer.pending_a:
                layer.counters["unused_forward"] += len(layer.pending_a)
                self._warn.warn("unused_forward", "step %d: %d forward pass(es) of %s had no backward before step(); "
                                "their statistics are dropped", k, len(layer.pending_a), layer.name)
        lam = self.damping_at(k)
        self._reuse = self._expected_reuse(k)
        device_type = next(iter(self.layers.values())).module.weight.device.type
        # full-precision linear algebra (entering an autocast context costs more than a small layer's step)
        no_autocast = torch.autocast(device_type, enabled=False) if torch.is_autocast_enabled(device_type) else contextlib.nullcontext()
        try:
            with no_autocast:
                if plan.capture or plan.decompose or plan.overwrite:  # otherwise no factor has anything to do
                    for layer in self.layers.values():
                        self._update_layer(layer, plan, lam, k)
                t0 = self._timer()
                self.blocks.update(decompose=plan.decompose, damping=lam, step=k)
                self._seconds["decomposition"] += self._timer() - t0
                if plan.brand:
                    self._brand_updates += 1
                return self._precondition_step(k, lam) if has_grad else False
        finally:
            for layer in self.layers.values():
                layer.reset_capture()
            self.steps += 1

    def _expected_reuse(self, k: int) -> int:
        """Steps a decomposition is applied under one damping: its refresh period, 1 under a damping schedule."""
        if self._damping_varies:
            return 1
        return self._t_brand(k) if self.method in _BRAND else self._t_inv(k)

    def _update_layer(self, layer: KFACLayer, plan: _Plan, lam: float, k: int) -> None:
        if plan.capture and layer.a_rows_seen:
            a_scale = 1.0 / layer.a_rows_seen
            gs = g_scale(layer.samples_seen, self.loss_reduction)
            if self.fisher != "empirical" and (layer.G is None or not layer.G.has_pending):
                layer.counters["missing_fisher"] += 1
                self._warn.warn(
                    "missing_fisher", "step %d: fisher=%r but no fisher_backward() before this step; G of %s not updated",
                    k, self.fisher, layer.name,
                )
            t0 = self._timer()
            if plan.ea:
                for f, s in ((layer.A, a_scale), (layer.G, gs)):
                    if f is not None:
                        f.update_ea(s, step=k)
            t1 = self._timer()
            self._add_seconds(layer, "statistics", t1 - t0)
            if plan.brand:
                for f, s in ((layer.A, a_scale), (layer.G, gs)):
                    if f is not None:
                        f.update_brand(s, correct=plan.correct, damping=math.sqrt(lam), step=k)
            self._add_seconds(layer, "decomposition", self._timer() - t1)
        t0 = self._timer()
        for _, f in layer.factors():
            f.discard_pending()
            f.refresh(decompose=plan.decompose, overwrite=plan.overwrite, damping=math.sqrt(lam), step=k)
        self._add_seconds(layer, "decomposition", self._timer() - t0)

    def _precondition_step(self, k: int, lam: float) -> bool:
        t0 = self._timer()
        entries: list[tuple[KFACLayer, torch.Tensor]] = [
            (layer, layer.helper.grad_matrix())
            for layer in self.layers.values()
            if layer.module.weight.requires_grad and layer.module.weight.grad is not None
        ]
        covered = {id(p) for layer, _ in entries for p in (layer.module.weight, layer.module.bias) if p is not None}
        others = [p for p in self._params if p.grad is not None and id(p) not in covered]
        thin_layers = [(layer, g) for layer, g in entries if thin_path.candidate(layer)]
        # one fused norm over every gradient (the finiteness test and the graft / unit-scale lengths), one host read
        gnorm = scaling.norms([g for _, g in entries] + [p.grad for p in others])
        checks = [gnorm] + [thin_path.probe_error(layer, g, self.seed * 1_000_003 + k).reshape(1) for layer, g in thin_layers]
        values = torch.cat([c.to(gnorm.device) for c in checks]).tolist() if entries or others else []
        n_grads = len(entries) + len(others)
        norms_host, probes = values[:n_grads], values[n_grads:]
        if not all(map(math.isfinite, norms_host)) and self._skip_nonfinite(k):
            self._seconds["preconditioning"] += self._timer() - t0
            return False
        thin_ok = {layer.name: err <= thin_path.probe_tol(layer) for (layer, _), err in zip(thin_layers, probes)}
        vs: list[torch.Tensor] = []
        for layer, g in entries:
            t1 = self._timer()
            use_thin = thin_ok.get(layer.name, False)
            eA, eG = _eigen(layer.A), _eigen(layer.G)
            if eA is not None and eG is not None and min(eA.max_eig, eG.max_eig) <= 0:
                layer.counters["degenerate"] += 1
            if layer.name in thin_ok:
                layer.counters["low_rank_grad" if use_thin else "low_rank_grad_fallback"] += 1
            vs.append(self._apply_layer(layer, g, lam, thin=use_thin))
            layer.seconds["preconditioning"] += self._timer() - t1
        block_out = list(self.blocks.precondition(lam).items())  # (parameter, preconditioned gradient)
        vs += [v for _, v in block_out]
        gs = [g for _, g in entries] + [p.grad for p, _ in block_out]
        ng, ng_host = scaling.gather_norms(gnorm, norms_host, len(entries), others, [p for p, _ in block_out])
        rms = None
        if self.graft == "unit" and vs:
            keys = [layer.name for layer, _ in entries] + [self._param_names.get(id(p), str(id(p))) for p, _ in block_out]
            rms = scaling.unit_rms(self._grad_sq, keys, ng_host, _UNIT_DECAY)
        scales = scaling.direction_scales(vs, ng, rms, graft=self.graft, rms_clip=self.rms_clip) if vs else None
        if self.kl_clip is not None and vs:
            scales = scaling.kl_scales(scales, vs, gs, self.effective_lr(k), self.kl_clip)
        scaling.write_directions([layer.helper for layer, _ in entries], [p for p, _ in block_out], vs, scales)
        for layer, _ in entries:
            w = layer.module.weight.grad
            layer.written = (id(w), w._version)
        self._seconds["preconditioning"] += self._timer() - t0
        return True

    def _skip_nonfinite(self, k: int) -> bool:
        """A gradient norm was not finite: skip the step (grads set to None) if an element truly is; False on overflow."""
        bad = [n for n, p in self.model.named_parameters() if p.grad is not None and not all_finite(p.grad)]
        if not bad:  # finite entries whose squares overflowed the norm
            return False
        self._skipped_steps += 1
        self._warn.warn("nonfinite_gradient", "step %d: non-finite gradient in %s; step skipped (grads set to None)",
                        k, ", ".join(bad))
        for p in self.model.parameters():
            p.grad = None
        self.blocks.discard()
        return True

    def _already_written(self) -> bool:
        """Whether every layer's weight gradient is still the tensor, unmodified, that the last step wrote."""
        seen = False
        for layer in self.layers.values():
            w = layer.module.weight.grad
            if w is None:
                continue
            if layer.written != (id(w), w._version):
                return False
            seen = True
        return seen

    def _add_seconds(self, layer: KFACLayer, phase: str, dt: float) -> None:
        layer.seconds[phase] += dt
        self._seconds[phase] += dt

    # ================================================================== preconditioning
    def _apply_layer(self, layer: KFACLayer, g: torch.Tensor, lam: float, *, thin: bool) -> torch.Tensor:
        """``v`` for one layer (unclipped); the gradient itself when a factor is missing or all zero."""
        eA, eG = _eigen(layer.A), _eigen(layer.G)
        if eA is None or eG is None or eA.max_eig <= 0 or eG.max_eig <= 0:
            return g
        if thin:
            return thin_path.apply(layer, eG, eA, lam, self.inv_dtype, self.damping_scale, self.complement).to(g.dtype)
        return apply_inverse(eG, eA, g, lam, self.damping_convention, self.complement, self.damping_scale, reuse=self._reuse)

    def precondition(self, grads: Mapping[str, torch.Tensor], *, damping: float | None = None) -> dict[str, torch.Tensor]:
        """Apply the current inverse curvature to arbitrary gradient matrices (no clipping, no state change).

        Parameters
        ----------
        grads : mapping of layer name to Tensor of shape (g_dim, a_dim)
            Matrices in the layout of :meth:`grad_matrices` (bias as last column).
        damping : float, optional
            Relative damping ``λ``; default the schedule's value at the current step.

        Returns
        -------
        dict
            The preconditioned matrices; layers without a decomposition yet (or
            with an all-zero factor) are returned unchanged.  Cost per layer as
            one :meth:`step` of the dense path.
        """
        lam = self.damping_at(self.steps) if damping is None else V.check_real(damping, "damping", low=0.0, low_open=True)
        out = {}
        for name, g in grads.items():
            if name not in self.layers:
                raise KeyError(f"{name!r} is not a preconditioned layer; known: {list(self.layers)}")
            out[name] = self._apply_layer(self.layers[name], g, lam, thin=False)
        return out

    def grad_matrices(self) -> dict[str, torch.Tensor]:
        """The current gradients ``[dW | db]`` of the preconditioned layers, shape (g_dim, a_dim) each."""
        out = {}
        for name, layer in self.layers.items():
            g = layer.helper.grad_matrix()
            if g is not None:
                out[name] = g
        return out

    def set_grad_matrices(self, mats: Mapping[str, torch.Tensor]) -> None:
        """Write matrices of shape (g_dim, a_dim) into the layers' ``weight.grad`` / ``bias.grad`` in place."""
        for name, m in mats.items():
            self.layers[name].helper.set_grad_matrix(m)

    # ================================================================== state
    def state_dict(self) -> dict[str, Any]:
        """The full state: step counters, every factor (EA, decomposition, rank, RNG), counters.

        Tensors are references (as ``torch.optim.Optimizer.state_dict``); save
        it with ``torch.save``.  Schedules and other constructor arguments are not included.
        """
        gen_state = self._fisher_gen.get_state() if self._fisher_gen is not None else self._fisher_gen_state
        return {
            "version": 1,
            "method": self.method,
            "steps": self.steps,
            "brand_updates": self._brand_updates,
            "skipped_steps": self._skipped_steps,
            "damping_factor": self.damping_factor,
            "grad_sq": {k: list(v) for k, v in self._grad_sq.items()},
            "warnings": self._warn.as_dict(),
            "fisher_rng": gen_state,
            "layers": {
                name: {
                    "A": None if layer.A is None else layer.A.state_dict(),
                    "G": None if layer.G is None else layer.G.state_dict(),
                    "counters": dict(layer.counters),
                }
                for name, layer in self.layers.items()
            },
            "blocks": self.blocks.state_dict(),
        }

    def load_state_dict(self, state_dict: Mapping[str, Any]) -> None:
        """Restore a state from :meth:`state_dict` (same method and layer names)."""
        if state_dict.get("version") != 1:
            raise ValueError(f"unsupported KFACPreconditioner state version {state_dict.get('version')!r}")
        if state_dict["method"] != self.method:
            raise ValueError(f"the state is for method {state_dict['method']!r}, this preconditioner runs {self.method!r}")
        if set(state_dict["layers"]) != set(self.layers):
            raise ValueError(
                f"the state holds layers {sorted(state_dict['layers'])}, the model has {sorted(self.layers)}"
            )
        for name, sd in state_dict["layers"].items():  # every shape checked before anything is changed
            helper = self.layers[name].helper
            for which, dim in (("A", helper.a_dim), ("G", helper.g_dim)):
                for what, shape in _factor_shapes(sd[which]):
                    if shape[0] != dim or (what == "ea" and shape != (dim, dim)):
                        raise ValueError(
                            f"layer {name!r}: the state's {which} factor {what} has shape {shape}, this model's "
                            f"{which} factor has dimension {dim} (a state of a different model?)"
                        )
        blocks_sd = state_dict.get("blocks", {})
        if set(blocks_sd) != set(self.blocks.blocks):
            raise ValueError(f"the state holds curvature blocks {sorted(blocks_sd)}, the model has {sorted(self.blocks.blocks)}")
        self.blocks.load_state_dict(blocks_sd)  # checks every shape (ValueError naming the block)
        self.steps = int(state_dict["steps"])
        self._brand_updates = int(state_dict["brand_updates"])
        self._skipped_steps = int(state_dict["skipped_steps"])
        self.damping_factor = float(state_dict.get("damping_factor", 1.0))
        self._grad_sq = {str(k): (float(v[0]), int(v[1])) for k, v in state_dict.get("grad_sq", {}).items()}
        self._warn.load(state_dict.get("warnings", {}))
        self._plan_cache = None
        self._scale_cache = None
        self._fisher_gen = None
        self._fisher_gen_state = state_dict["fisher_rng"]
        for name, sd in state_dict["layers"].items():
            layer = self.layers[name]
            layer.A = layer.G = None
            for which in ("A", "G"):
                if sd[which] is not None:
                    self._factor_for(layer, which, 0, kind=sd[which]["kind"]).load_state_dict(sd[which])
            layer.counters = dict(sd["counters"])
            layer.reset_capture()

    def stats(self) -> dict[str, Any]:
        """Diagnostics: per layer rank, last error estimate, seconds per phase, skip counters.

        Returns
        -------
        dict
            ``{"method", "step", "skipped_steps", "seconds": {phase: s},
            "layers": {name: {"A": {...}, "G": {...}, "seconds": {...}, "counters": {...}}}}``
            where each factor entry has ``kind``, ``dim``, ``rank`` (of the current
            decomposition), ``target_rank``, ``error`` (``λ_r/λ_1`` of the last
            decomposition, 0 for exact ones, None before the first) and
            ``skipped`` (``statistics``/``decomposition`` counts).  Seconds are
            wall-clock on the host (asynchronous on CUDA).
        """
        layers = {}
        for name, layer in self.layers.items():
            entry: dict[str, Any] = {"seconds": dict(layer.seconds), "counters": dict(layer.counters)}
            for which, f in (("A", layer.A), ("G", layer.G)):
                entry[which] = None if f is None else f.summary()
            layers[name] = entry
        return {
            "method": self.method,
            "step": self.steps,
            "skipped_steps": self._skipped_steps,
            "warnings": self._warn.as_dict(),
            "seconds": dict(self._seconds),
            "layers": layers,
            "blocks": self.blocks.stats()["blocks"],
            "uncovered": [vars(u) for u in self.blocks.uncovered],
            "shared": [list(t) for t in self.blocks.shared],
            "brand": dict(self._brand_choice),
        }


# ====================================================================== pure functions
#: steps of the warm-up that capture statistics whatever ``factor_update_freq`` says
_WARMUP_STATS = 4
#: decay of the running mean of the squared gradient norm of ``graft="unit"``
_UNIT_DECAY = 0.99


def _factor_shapes(sd: Mapping[str, Any] | None) -> list[tuple[str, tuple[int, ...]]]:
    """``(what, shape)`` of every tensor in a factor's state whose first dimension is the factor's ``d``."""
    if sd is None:
        return []
    out = []
    if sd.get("ea") is not None:
        out.append(("ea", tuple(sd["ea"].shape)))
    for key in ("eigen", "brand"):
        if sd.get(key) is not None:
            out.append((f"{key} eigenvectors", tuple(sd[key]["eigvecs"].shape)))
    return out


def _eigen(f: FactorState | None) -> FactorEigen | None:
    return None if f is None else f.eigen


def _int_schedule(value: IntSchedule, name: str) -> Callable[[int], int]:
    """A positive-int schedule: the constant checked now, a callable's values at each use."""
    if callable(value):

        def f(step: int) -> int:
            out = value(step)
            try:
                return V.check_int(out, f"{name}({step})", low=1)
            except TypeError as exc:
                raise TypeError(f"`{name}` must return a positive int, got {type(out).__name__}") from exc

        return f
    v = V.check_int(value, name, low=1)
    return lambda step: v


def _float_schedule(value: FloatSchedule, name: str) -> Callable[[int], float]:
    """A positive-float schedule: the constant checked now, a callable's values at each use."""
    if callable(value):
        return lambda step: V.check_real(value(step), f"{name}({step})", low=0.0, low_open=True)
    v = V.check_real(value, name, low=0.0, low_open=True)
    return lambda step: v


def _matches(name: str, module: nn.Module, selectors: Sequence[LayerSelector]) -> bool:
    for s in selectors:
        if isinstance(s, str) and fnmatchcase(name, s):
            return True
        if isinstance(s, type) and isinstance(module, s):
            return True
    return False


def _is_power_of_4(n: int) -> bool:
    return n > 0 and n & (n - 1) == 0 and (n.bit_length() - 1) % 2 == 0


def distributed_group_size() -> int:
    """World size of the default ``torch.distributed`` group (1 when none is initialised)."""
    dist = torch.distributed
    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


def _selected(name: str, module: nn.Module, layers: Sequence[LayerSelector] | None, skip: Sequence[LayerSelector]) -> bool:
    if _matches(name, module, skip):
        return False
    return layers is None or _matches(name, module, layers)


def _select_layers(
    model: nn.Module,
    layers: Sequence[LayerSelector] | None,
    skip_layers: Sequence[LayerSelector],
    *,
    allow_empty: bool = False,
) -> list[tuple[str, nn.Module, LayerHelper]]:
    for sel, arg in ((layers or (), "layers"), (skip_layers, "skip_layers")):
        if isinstance(sel, (str, type)):
            raise TypeError(f"`{arg}` must be a sequence of names or types, got a single {type(sel).__name__}")
        for s in sel:
            if not isinstance(s, (str, type)):
                raise TypeError(f"`{arg}` entries must be names (str) or module types, got {s!r}")
    out = []
    for name, m in model.named_modules():
        name = clean_name(name)
        if _matches(name, m, skip_layers):
            continue
        if layers is not None and not _matches(name, m, layers):
            continue
        helper, reason = helper_for(m)
        if helper is None:
            if layers is not None and name in layers:
                raise ValueError(f"layer {name!r} was selected by name but cannot be preconditioned: {reason}")
            if isinstance(m, (nn.Linear, nn.Conv2d)):
                warnings.warn(f"onlinela_torch: skipping layer {name!r}: {reason}; it keeps its plain gradient", stacklevel=3)
            continue
        if not m.weight.requires_grad:
            logger.debug("layer %s is frozen; not preconditioned", name)
            continue
        out.append((name, m, helper))
    if not out and not allow_empty:
        raise ValueError(
            "no supported layer (nn.Linear, nn.Conv2d with groups=1) selected in the model; "
            "check `layers` / `skip_layers`"
        )
    return out

