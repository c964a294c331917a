"""The parts of :meth:`KFACPreconditioner.step <onlinela_torch.KFACPreconditioner.step>`: checks, factor updates, rewriting.

:func:`check_inputs` warns (and counts) the cases where a step would silently
do nothing; :func:`update_layer` folds a layer's captured statistics into its
factors and refreshes their decompositions as planned; :class:`GradientWriter`
preconditions every gradient in place: one fused norm (the finiteness test
and the graft lengths, one host read), the thin-path probes, each layer's
direction, the curvature blocks' directions, then the graft / RMS cap / KL
clip scales (:mod:`onlinela_torch.scaling`).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping

import torch
from torch import nn

from . import scaling
from . import thin as thin_path
from .blocks import BlockSet
from .factors import FactorEigen, FactorState, all_finite
from .layer import KFACLayer
from .logs import WarningCounter
from .methods import Plan
from .modules import g_scale
from .options import KFACOptions

__all__ = ["GradientWriter", "check_inputs", "eigen", "update_layer"]

#: decay of the running mean of the squared gradient norm of ``graft="unit"`` and ``"element"``
UNIT_DECAY = 0.99

AddSeconds = Callable[[KFACLayer, str, float], None]


def eigen(f: FactorState | None) -> FactorEigen | None:
    """The factor's current decomposition (None without a factor or before its first one)."""
    return None if f is None else f.eigen


def check_inputs(layers: Mapping[str, KFACLayer], blocks: BlockSet, plan: Plan, warn: WarningCounter, k: int) -> bool:
    """Warn about a step without gradients, without statistics, or with forwards never back-propagated; whether any gradient exists."""
    has_grad = any(layer.module.weight.grad is not None for layer in layers.values()) or any(
        p.grad is not None for b in blocks.blocks.values() for _, p in b.params()
    )
    if not has_grad:
        warn.warn("no_gradient", "step %d: no preconditioned layer has a gradient (no backward() since the "
                  "last step?); statistics folded in, nothing preconditioned", k)
    if has_grad and plan.capture and not any(layer.a_rows_seen or layer.pending_a for layer in layers.values()):
        warn.warn("no_statistics", "step %d: a statistics step, but no layer captured a forward/backward "
                  "(model in eval() mode, or forward under no_grad?); factors not updated", k)
    for layer in layers.values():
        if layer.pending_a:
            layer.counters["unused_forward"] += len(layer.pending_a)
            warn.warn("unused_forward", "step %d: %d forward pass(es) of %s had no backward before step(); "
                      "their statistics are dropped", k, len(layer.pending_a), layer.name)
    return has_grad


def update_layer(
    layer: KFACLayer, plan: Plan, lam: float, k: int, options: KFACOptions, warn: WarningCounter, add_seconds: AddSeconds
) -> None:
    """Fold the step's statistics into the layer's factors (EA and/or Brand), then refresh their decompositions."""
    timer = options.timer
    if plan.capture and layer.a_rows_seen:
        a_scale = 1.0 / layer.a_rows_seen
        gs = g_scale(layer.samples_seen, options.loss_reduction)
        if options.fisher != "empirical" and (layer.G is None or not layer.G.has_pending):
            layer.counters["missing_fisher"] += 1
            warn.warn(
                "missing_fisher", "step %d: fisher=%r but no fisher_backward() before this step; G of %s not updated",
                k, options.fisher, layer.name,
            )
        t0 = timer()
        if plan.ea:
            for f, s in ((layer.A, a_scale), (layer.G, gs)):
                if f is not None:
                    f.update_ea(s, step=k)
        t1 = timer()
        add_seconds(layer, "statistics", t1 - t0)
        if plan.brand:
            for f, s in ((layer.A, a_scale), (layer.G, gs)):
                if f is not None:
                    f.update_brand(s, correct=plan.correct, damping=math.sqrt(lam), step=k)
        add_seconds(layer, "decomposition", timer() - t1)
    t0 = timer()
    for _, f in layer.factors():
        f.discard_pending()
        f.refresh(decompose=plan.decompose, overwrite=plan.overwrite, damping=math.sqrt(lam), step=k)
    add_seconds(layer, "decomposition", timer() - t0)


class GradientWriter:
    """Rewrites every ``p.grad`` of one preconditioner by its clipped, grafted direction.

    Parameters
    ----------
    model : torch.nn.Module
        The model as given (a non-finite step sets all its gradients to None).
    params : list of Tensor
        The bare model's parameters, in order.
    param_names : dict of int to str
        ``id(parameter)`` to its name (the ``graft="unit"`` / ``"element"`` keys of block parameters).
    layers : dict of str to KFACLayer
    blocks : BlockSet
    options : KFACOptions
    warn : WarningCounter
    seconds : dict of str to float
        The preconditioner's per-phase totals (``"preconditioning"`` is booked here).

    Attributes
    ----------
    skipped_steps : int
        Steps skipped for a non-finite gradient.
    grad_sq : dict of str to (float, int)
        Per layer / block tensor: the EA of the squared gradient norm and its count (``graft="unit"`` / ``"element"``).
    """

    def __init__(
        self,
        model: nn.Module,
        params: list[torch.Tensor],
        param_names: dict[int, str],
        layers: dict[str, KFACLayer],
        blocks: BlockSet,
        options: KFACOptions,
        warn: WarningCounter,
        seconds: dict[str, float],
    ) -> None:
        self.model, self.params, self.param_names = model, params, param_names
        self.layers, self.blocks, self.options, self.warn, self.seconds = layers, blocks, options, warn, seconds
        self.skipped_steps = 0
        self.grad_sq: dict[str, tuple[float, int]] = {}

    def write(
        self, k: int, lam: float, apply_layer: Callable[..., torch.Tensor], effective_lr: Callable[[int], float]
    ) -> bool:
        """Precondition step ``k`` under damping ``lam`` (``apply_layer(layer, g, lam, thin=...)``); False if skipped."""
        o, timer = self.options, self.options.timer
        t0 = timer()
        entries: list[tuple[KFACLayer, torch.Tensor]] = [
            (layer, layer.helper.grad_matrix())
            for layer in self.layers.values()
            if layer.module.weight.requires_grad and layer.module.weight.grad is not None
        ]
        covered = {id(p) for layer, _ in entries for p in (layer.module.weight, layer.module.bias) if p is not None}
        others = [p for p in self.params if p.grad is not None and id(p) not in covered]
        thin_layers = [(layer, g) for layer, g in entries if thin_path.candidate(layer)]
        # one fused norm over every gradient (the finiteness test and the graft / unit-scale lengths), one host read
        gnorm = scaling.norms([g for _, g in entries] + [p.grad for p in others])
        checks = [gnorm] + [thin_path.probe_error(layer, g, o.seed * 1_000_003 + k).reshape(1) for layer, g in thin_layers]
        values = torch.cat([c.to(gnorm.device) for c in checks]).tolist() if entries or others else []
        n_grads = len(entries) + len(others)
        norms_host, probes = values[:n_grads], values[n_grads:]
        if not all(map(math.isfinite, norms_host)) and self.skip_nonfinite(k):
            self.seconds["preconditioning"] += timer() - t0
            return False
        thin_ok = {layer.name: err <= thin_path.probe_tol(layer) for (layer, _), err in zip(thin_layers, probes)}
        vs: list[torch.Tensor] = []
        for layer, g in entries:
            t1 = timer()
            use_thin = thin_ok.get(layer.name, False)
            eA, eG = eigen(layer.A), eigen(layer.G)
            if eA is not None and eG is not None and min(eA.max_eig, eG.max_eig) <= 0:
                layer.counters["degenerate"] += 1
            if layer.name in thin_ok:
                layer.counters["low_rank_grad" if use_thin else "low_rank_grad_fallback"] += 1
            vs.append(apply_layer(layer, g, lam, thin=use_thin))
            layer.seconds["preconditioning"] += timer() - t1
        block_out = list(self.blocks.precondition(lam).items())  # (parameter, preconditioned gradient)
        vs += [v for _, v in block_out]
        gs = [g for _, g in entries] + [p.grad for p, _ in block_out]
        ng, ng_host = scaling.gather_norms(gnorm, norms_host, len(entries), others, [p for p, _ in block_out])
        rms = None
        if o.graft in ("unit", "element") and vs:
            keys = [layer.name for layer, _ in entries] + [self.param_names.get(id(p), str(id(p))) for p, _ in block_out]
            rms = scaling.unit_rms(self.grad_sq, keys, ng_host, UNIT_DECAY)
        scales = scaling.direction_scales(vs, ng, rms, graft=o.graft, rms_clip=o.rms_clip) if vs else None
        if o.kl_clip is not None and vs:
            scales = scaling.kl_scales(scales, vs, gs, effective_lr(k), o.kl_clip)
        scaling.write_directions([layer.helper for layer, _ in entries], [p for p, _ in block_out], vs, scales)
        for layer, _ in entries:
            w = layer.module.weight.grad
            layer.written = (id(w), w._version)
        self.seconds["preconditioning"] += timer() - t0
        return True

    def skip_nonfinite(self, k: int) -> bool:
        """A gradient norm was not finite: skip the step (grads set to None) if an element truly is; False on overflow."""
        bad = [n for n, p in self.model.named_parameters() if p.grad is not None and not all_finite(p.grad)]
        if not bad:  # finite entries whose squares overflowed the norm
            return False
        self.skipped_steps += 1
        self.warn.warn("nonfinite_gradient", "step %d: non-finite gradient in %s; step skipped (grads set to None)",
                       k, ", ".join(bad))
        for p in self.model.parameters():
            p.grad = None
        self.blocks.discard()
        return True

    def already_written(self) -> bool:
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
