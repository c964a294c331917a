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

This module holds the public class and the preconditioner subclass it
drives; the work is done by components, one job per module:
:mod:`~onlinela_torch.kldwrm_config` (the options),
:mod:`~onlinela_torch.kldwrm_capture` (this step's local factors and the
all-reduces of the distributed variant), :mod:`~onlinela_torch.kldwrm_wake`
(the state between steps, the gradient rewrite, Q's augmented factors, the
checkpoint) and :mod:`~onlinela_torch.kldwrm_inner` (QE's inner loop).
"""

from __future__ import annotations

import functools
import logging
from collections.abc import Callable, Mapping
from typing import Any

import torch
from torch import nn

from .distributed import DistributedKFACPreconditioner
from .factors import FactorEigen
from .inverse import apply_inverse
from .kldwrm_capture import LocalStatistics
from .kldwrm_config import VARIANTS, KLDWRMConfig
from .kldwrm_inner import inner_loop
from .kldwrm_wake import Wake
from .layer import KFACLayer
from .preconditioner import KFACPreconditioner

__all__ = ["KLDWRM", "KLDWRMConfig"]

logger = logging.getLogger(__name__)

#: Options that KLD-WRM sets on its preconditioner itself.
_OWNED = {
    "lr": "the learning rate is read from `optimizer.param_groups`",
    "factor_decay": "the EA decay is the wake decay `KLDWRMConfig.rho`",
    "rms_clip": "set it in `KLDWRMConfig.rms_clip`",
}


# =========================================================================== the preconditioner KLD-WRM drives
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
        config = _check_arguments(optimizer, variant, config, distributed, preconditioner_options)
        self.model = model
        self.optimizer = optimizer
        self.variant = variant
        self.config = config
        self.rho = config.rho_for(variant)
        self.preconditioner = _wake_preconditioner(
            model,
            variant,
            config,
            distributed=distributed,
            before_precondition=self._before_precondition,
            method=method,
            lr=self._reference_lr,
            damping=damping,
            factor_update_freq=factor_update_freq,
            inv_update_freq=inv_update_freq,
            kl_clip=kl_clip,
            **preconditioner_options,
        )
        self.method = method
        self.distributed = distributed
        layers = self.preconditioner.layers
        in_optimizer = {id(p) for group in optimizer.param_groups for p in group["params"]}
        missing = [name for name, layer in layers.items() if id(layer.module.weight) not in in_optimizer]
        if missing:
            self.preconditioner.remove_hooks()
            raise ValueError(f"`optimizer` does not hold the weights of the preconditioned layers {missing}")
        self._first_weight = next(iter(layers.values())).module.weight
        params = [p for p in model.parameters() if p.requires_grad]
        self._wake = Wake(self.preconditioner, variant=variant, config=config, rho=self.rho, params=params)
        # Q and QE: this step's local statistics (hooks registered now: compile the model before building KLDWRM)
        group = self.preconditioner.group if distributed else None
        self._statistics = None if variant == "so" else LocalStatistics(
            self.preconditioner, self._wake.seconds, distributed=distributed, group=group
        )

    # ================================================================== learning rates
    def _group_lrs(self) -> dict[int, float]:
        return {id(p): float(group["lr"]) for group in self.optimizer.param_groups for p in group["params"]}

    def _reference_lr(self, step: int) -> float:
        """The lr of the first preconditioned layer's group (the KL clip's ``lr``)."""
        return self._group_lrs()[id(self._first_weight)]

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
        wake = self._wake
        wake.begin(
            {name: lrs[id(layer.module.weight)] for name, layer in self.preconditioner.layers.items()},
            self._statistics.finish() if self._statistics is not None else {},
        )
        try:
            taken = self.preconditioner.step()
            if not taken or wake.pending is None:
                wake.counters["skipped_steps"] += 1
                logger.warning("KLD-WRM step %d skipped (non-finite gradient)", self.preconditioner.steps - 1)
                return False
            if self.variant == "qe" and self.config.inner_steps > 0:
                inner_loop(wake, self.model, closure, self._statistics if self.distributed else None)
            wake.commit()
            return True
        finally:
            wake.end()

    def _before_precondition(self, k: int, lam: float) -> None:
        """The preconditioner's hook after its curvature update: the wake rewrites the gradients (:class:`Wake`)."""
        self._wake.before_precondition(k, lam)

    def remove_hooks(self) -> None:
        """Detach from the model (the preconditioner's hooks and KLD-WRM's own)."""
        if self._statistics is not None:
            self._statistics.remove_hooks()
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
            **self._wake.state_dict(),
        }

    def load_state_dict(self, state_dict: Mapping[str, Any]) -> None:
        """Restore a state from :meth:`state_dict` (same variant, method and layers)."""
        self._wake.check_state(state_dict)
        self.preconditioner.load_state_dict(state_dict["preconditioner"])
        self._wake.load_state_dict(state_dict)
        if self._statistics is not None:
            self._statistics.clear()

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
        return self._wake.stats(self.preconditioner.stats(), method=self.method)


def _check_arguments(
    optimizer: Any, variant: Any, config: Any, distributed: Any, options: Mapping[str, Any]
) -> KLDWRMConfig:
    """Validate :class:`KLDWRM`'s arguments (TypeError/ValueError naming the argument); the config in effect."""
    if not isinstance(optimizer, torch.optim.Optimizer):
        raise TypeError(f"`optimizer` must be a torch.optim.Optimizer, got {type(optimizer).__name__}")
    if variant not in VARIANTS:
        raise ValueError(f"`variant` must be one of {', '.join(map(repr, VARIANTS))}; got {variant!r}")
    if config is None:
        config = KLDWRMConfig()
    if not isinstance(config, KLDWRMConfig):
        raise TypeError(f"`config` must be a KLDWRMConfig, got {type(config).__name__}")
    for key, why in _OWNED.items():
        if key in options:
            raise TypeError(f"KLDWRM does not take `{key}`: {why}")
    fisher = options.get("fisher", "empirical")
    if variant != "so" and fisher != "empirical":
        raise ValueError(
            f"`fisher` must be 'empirical' for variant={variant!r} (its local curvature is the batch's "
            f"empirical Fisher), got {fisher!r}"
        )
    if not isinstance(distributed, bool):
        raise TypeError(f"`distributed` must be a bool, got {type(distributed).__name__}")
    if distributed and options.get("mode", "replicate") != "replicate":
        raise ValueError(f"`mode` must be 'replicate' for a distributed KLDWRM, got {options['mode']!r}")
    return config


def _wake_preconditioner(
    model: nn.Module, variant: str, config: KLDWRMConfig, *, distributed: bool, **options: Any
) -> _WakePreconditioner:
    """KLD-WRM's curvature backend: ``factor_decay = ρ``, ``rms_clip`` from ``config``, KLD-WRM's defaults.

    ``graft`` defaults to ``"unit"`` (layer steps of length ``≈ lr``,
    docs/kldwrm.rst, Defaults) and ``low_rank_grad`` to False; distributed,
    the ranks also agree on ``variant`` and ``config``.
    """
    options.setdefault("low_rank_grad", False)
    options.setdefault("graft", "unit")
    if distributed:
        cls = functools.partial(_DistributedWakePreconditioner, wake={"variant": variant, **vars(config)})
    else:
        cls = _WakePreconditioner
    return cls(model, factor_decay=config.rho_for(variant), rms_clip=config.rms_clip, **options)
