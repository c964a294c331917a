"""KFACPreconditioner: the orchestration of the K-FAC family (capture, plan, factors, rewrite).

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

The class composes single-job parts: :mod:`~onlinela_torch.options` (the
checked keywords), :mod:`~onlinela_torch.methods` (method registry, per-step
plan), :mod:`~onlinela_torch.selection` (layers and curvature blocks),
:mod:`~onlinela_torch.factory` (factors, Brand eligibility),
:mod:`~onlinela_torch.capture` (hooks, sampled-label backward),
:mod:`~onlinela_torch.stepping` (factor updates, gradient rewriting),
:mod:`~onlinela_torch.checkpoint` and :mod:`~onlinela_torch.diagnostics`.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Mapping
from typing import Any

import torch
from torch import nn

from onlinela import validation as V

from . import checkpoint, diagnostics
from . import thin as thin_path
from .capture import Capture
from .compiled import clean_name, unwrap_compiled
from .delegation import forwarded
from .factory import FactorFactory
from .inverse import apply_inverse, damped_solve, factor_scale
from .layer import KFACLayer
from .logs import WarningCounter
from .methods import METHODS
from .methods import Plan
from .options import ATTRIBUTES, BrandConfig, KFACOptions, takes_options
from .selection import block_context, build_block_set, distributed_group_size, kronecker_layers
from .stepping import GradientWriter, check_inputs, eigen, update_layer

__all__ = ["METHODS", "BrandConfig", "KFACLayer", "KFACPreconditioner", "apply_inverse", "damped_solve", "factor_scale"]

logger = logging.getLogger(__name__)


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
    **options
        The keywords of :class:`~onlinela_torch.options.KFACOptions`, each
        documented there: ``method`` (one of :attr:`METHODS`), ``lr``, ``damping``,
        ``factor_decay``, ``factor_update_freq``, ``inv_update_freq``, ``rank``,
        ``oversample``, ``n_iter``, ``kl_clip``, ``rms_clip``,
        ``damping_convention``, ``complement``, ``brand``, ``fisher``,
        ``loss_reduction``, ``layers``, ``skip_layers``, ``factor_dtype``,
        ``inv_dtype``, ``low_rank_grad``, ``grad_scaler``, ``seed``, ``timer``,
        ``optimizer``, ``warmup``, ``damping_scale``, ``graft``.  An unknown
        keyword raises ``TypeError`` naming it.

    Attributes
    ----------
    options : KFACOptions
        The checked options; ``precond.rank_policy``, ``precond.brand``, ... read them.
    layers : dict of str to KFACLayer
        The Kronecker layers; ``blocks`` holds the other curvature blocks.
    steps : int
        Steps taken; ``damping_factor`` multiplies the damping schedule.

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
    #: Whether this class averages the curvature blocks' statistics over a process group (the distributed one does)
    _synchronises_blocks = False

    @takes_options
    def __init__(self, model: nn.Module, **options: Any) -> None:
        if not isinstance(model, nn.Module):
            raise TypeError(f"`model` must be a torch.nn.Module, got {type(model).__name__}")
        self.options = opts = KFACOptions.from_keywords(type(self).__name__, options)
        self.model, self.method = model, opts.method
        self._schedule = opts.step_schedule()
        self._t_updt, self._t_inv, self._t_brand = self._schedule.t_updt, self._schedule.t_inv, self._schedule.t_brand
        self._timer = opts.timer
        self._reuse = 1  # expected reuse of this step's (snapshot, damping) pairs, see inverse.damped_solve
        self._warn = WarningCounter(logger)
        self._factors = FactorFactory(opts, self._schedule, self._warn, kind_for=lambda dim, s: self._kind_for(dim, s))
        base = unwrap_compiled(model)  # torch.compile(model): the same names as the eager model
        self._ctx = block_context(opts, plan=lambda: self._plan(self.steps), grad_scale=lambda: self._capture.grad_scale(),
                                  make_factor=self._factors.for_block, reuse=lambda: self._reuse)
        self.blocks, covered = build_block_set(base, self._ctx, opts, self._warn, synchronised=self._synchronises_blocks)
        self.layers: dict[str, KFACLayer] = kronecker_layers(base, opts, covered, self.blocks)
        self._seconds = {"statistics": 0.0, "decomposition": 0.0, "preconditioning": 0.0}
        self._capture = Capture(model, self.layers, self.blocks, self._ctx, opts, plan=lambda: self._plan(self.steps),
                                step=lambda: self.steps, factor_for=self._factors.for_layer, add_seconds=self._add_seconds)
        self._by_module = self._capture.by_module
        names = {id(p): clean_name(n) for n, p in base.named_parameters()}
        self._writer = GradientWriter(model, list(base.parameters()), names, self.layers, self.blocks, opts, self._warn,
                                      self._seconds)
        self._curvature = diagnostics.CurvatureModel(self.layers, opts, lambda: self.damping_at(self.steps))
        self._capture.attach()
        if type(self) is KFACPreconditioner and distributed_group_size() > 1:
            self._warn.warn(
                "not_distributed", "a torch.distributed group of %d ranks is active, but this preconditioner does not "
                "synchronise them: call onlinela_torch.distribute(precond) on every rank before the first step",
                distributed_group_size(),
            )
        #: multiplies the damping schedule (the Levenberg–Marquardt rule of the optimizer classes adapts it)
        self.damping_factor = 1.0
        self.steps = 0
        self._brand_updates = 0

    def __getattr__(self, name: str) -> Any:
        """The options named in :data:`~onlinela_torch.options.ATTRIBUTES` read as attributes."""
        if name in ATTRIBUTES and "options" in vars(self):
            return getattr(vars(self)["options"], name)
        raise AttributeError(f"{type(self).__name__!r} object has no attribute {name!r}")

    # ================================================================== components' methods
    fisher_backward = forwarded("_capture", Capture.fisher_backward)
    paused = forwarded("_capture", Capture.pause)
    remove_hooks = forwarded("_capture", Capture.remove)
    effective_lr = forwarded("options", KFACOptions.effective_lr)
    absolute_damping = forwarded("_curvature", diagnostics.CurvatureModel.absolute_damping)
    model_curvature = forwarded("_curvature", diagnostics.CurvatureModel.model_curvature)

    def damping_at(self, step: int) -> float:
        """The relative damping ``λ`` at ``step``: the schedule times :attr:`damping_factor`."""
        return self.options.schedules.damping(step) * self.damping_factor

    def _plan(self, k: int) -> Plan:
        return self._schedule.plan(k, self._brand_updates)

    def _kind_for(self, dim: int, s: int) -> str:
        return self._factors.default_kind(dim, s)

    def _add_seconds(self, layer: KFACLayer, phase: str, dt: float) -> None:
        layer.seconds[phase] += dt
        self._seconds[phase] += dt

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
        self._capture.reattach_if_compiled()  # torch.compile may have come after the constructor
        if self._writer.already_written():
            self._warn.warn("repeated_step", "step %d: step() called again on gradients it already preconditioned; "
                            "left unchanged (call loss.backward() before each step())", k)
            return True
        plan = self._plan(k)  # evaluates (and validates) the schedules at k
        has_grad = check_inputs(self.layers, self.blocks, plan, self._warn, k)
        lam = self.damping_at(k)
        self._reuse = self._schedule.expected_reuse(k)
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

    def _update_layer(self, layer: KFACLayer, plan: Plan, lam: float, k: int) -> None:
        update_layer(layer, plan, lam, k, self.options, self._warn, self._add_seconds)

    def _precondition_step(self, k: int, lam: float) -> bool:
        return self._writer.write(k, lam, self._apply_layer, self.effective_lr)

    def _apply_layer(self, layer: KFACLayer, g: torch.Tensor, lam: float, *, thin: bool) -> torch.Tensor:
        """``v`` for one layer (unclipped); the gradient itself when a factor is missing or all zero."""
        eA, eG, o = eigen(layer.A), eigen(layer.G), self.options
        if eA is None or eG is None or eA.max_eig <= 0 or eG.max_eig <= 0:
            return g
        if thin:
            return thin_path.apply(layer, eG, eA, lam, o.inv_dtype, o.damping_scale, o.complement).to(g.dtype)
        return apply_inverse(eG, eA, g, lam, o.damping_convention, o.complement, o.damping_scale, reuse=self._reuse)

    # ================================================================== gradients
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
        mats = {name: layer.helper.grad_matrix() for name, layer in self.layers.items()}
        return {name: g for name, g in mats.items() if g is not None}

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
        counters = {"steps": self.steps, "brand_updates": self._brand_updates, "skipped_steps": self._writer.skipped_steps,
                    "damping_factor": self.damping_factor, "grad_sq": self._writer.grad_sq, "warnings": self._warn.as_dict()}
        return checkpoint.state_dict(self.method, counters, self.layers, self.blocks, self._capture.rng_state())

    def load_state_dict(self, state_dict: Mapping[str, Any]) -> None:
        """Restore a state from :meth:`state_dict` (same method and layer names)."""
        checkpoint.check_state(state_dict, self.method, self.layers, self.blocks)
        self._factors.brand_choice.clear()  # every factor is rebuilt below, each counted again
        self.blocks.load_state_dict(state_dict.get("blocks", {}))  # checks every shape (ValueError naming the block)
        c = checkpoint.counters(state_dict)
        self.steps, self._brand_updates, self._writer.skipped_steps = c["steps"], c["brand_updates"], c["skipped_steps"]
        self.damping_factor, self._writer.grad_sq = c["damping_factor"], c["grad_sq"]
        self._warn.load(state_dict.get("warnings", {}))
        self._schedule.cache = None
        self._capture.load_rng_state(state_dict["fisher_rng"])
        checkpoint.load_layers(state_dict, self.layers, self._factors.for_layer)

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
        return diagnostics.stats(self.method, self.steps, self._writer.skipped_steps, self._warn.as_dict(), self._seconds,
                                 self.layers, self.blocks, self._factors.brand_choice)
