"""Statistics capture of :class:`~onlinela_torch.KFACPreconditioner`: hooks and the sampled-label backward.

A forward hook on each Kronecker layer keeps its input rows (on statistics
steps, or every step for the thin-factor gradient path) and registers a hook
on the output; the output-gradient hook folds the rows into the ``A`` and
``G`` factors (:class:`~onlinela_torch.factory.FactorFactory` creates them on
first use).  Only forwards whose backward runs before ``step()`` count.
``fisher="true"`` / ``"exact"`` take ``G`` from :meth:`Capture.fisher_backward`
instead of the loss backward.  Under ``torch.compile`` the hooks run eagerly
(:func:`~onlinela_torch.compiled.eager_hook`).  Cost per captured layer and
batch: the row extraction (``O(n d)``) and the factors' accumulation.
"""

from __future__ import annotations

import contextlib
import functools
import math
from collections.abc import Callable, Iterator
from typing import Any, Literal

import torch
from torch import nn

from onlinela import validation as V

from .blocks import BlockContext, BlockSet
from .compiled import dynamo_loaded, eager_hook
from .factors import FactorState
from .fisher import label_vectors
from .layer import KFACLayer
from .methods import Plan
from .options import KFACOptions

__all__ = ["Capture"]


class Capture:
    """The capture hooks of one preconditioner and its label sampling.

    Parameters
    ----------
    model : torch.nn.Module
        The model as given (a compiled wrapper included): the block context watches its forwards.
    layers : dict of str to KFACLayer
        The Kronecker layers whose modules get the hooks.
    blocks : BlockSet
        The curvature blocks (attached and detached with the hooks).
    ctx : BlockContext
        Shared with the blocks (the sampled-label weight is set on it).
    options : KFACOptions
    plan : callable returning Plan
        The current step's plan.
    step : callable returning int
        The current step (the ``GradScaler`` scale is read once per step).
    factor_for : callable (layer, which, s) -> FactorState
        The layer's factor, created on first use.
    add_seconds : callable (layer, phase, seconds)
        Books seconds to a layer and to the preconditioner's totals.

    Attributes
    ----------
    paused : bool
        While True (:meth:`pause`) the hooks capture nothing.
    sampling : float or None
        Weight of the sampled-label backward in progress.
    """

    def __init__(
        self,
        model: nn.Module,
        layers: dict[str, KFACLayer],
        blocks: BlockSet,
        ctx: BlockContext,
        options: KFACOptions,
        *,
        plan: Callable[[], Plan],
        step: Callable[[], int],
        factor_for: Callable[[KFACLayer, str, int], FactorState],
        add_seconds: Callable[[KFACLayer, str, float], None],
    ) -> None:
        self.model, self.layers, self.blocks, self.ctx, self.options = model, layers, blocks, ctx, options
        self.by_module = {layer.module: layer for layer in layers.values()}
        self.plan, self.step, self.factor_for, self.add_seconds = plan, step, factor_for, add_seconds
        self.timer = options.timer
        self.paused = False
        self.sampling: float | None = None
        self.handles: list[Any] = []
        self.hooks_for_dynamo = False
        self.fisher_gen: torch.Generator | None = None
        self.fisher_gen_state: torch.Tensor | None = None
        self.scale_cache: tuple[int, float] | None = None

    # ------------------------------------------------------------------ hooks
    def forward_hook(self, module: nn.Module, inputs: tuple, output: Any) -> None:
        """Keep the layer's input rows of this forward and hook its output gradient."""
        if self.paused or not (module.training and torch.is_grad_enabled() and isinstance(output, torch.Tensor) and output.requires_grad):
            return
        layer = self.by_module[module]
        plan = self.plan()
        if not (plan.capture or layer.low_rank_grad):
            return
        t0 = self.timer()
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
        output.register_hook(functools.partial(self.grad_hook, layer, idx, call))
        self.add_seconds(layer, "statistics", self.timer() - t0)

    def grad_hook(self, layer: KFACLayer, idx: int | None, call: int, grad: torch.Tensor) -> None:
        """Fold the forward's A rows and this output gradient's G rows into the layer's factors."""
        if self.paused:
            return
        t0 = self.timer()
        plan = self.plan()
        pending = layer.pending_a.pop(call, None)
        if pending is not None:  # statistics come from the forwards whose backward precedes step()
            rows_a, n = pending
            self.factor_for(layer, "A", rows_a.shape[0]).accumulate(rows_a, ea=plan.ea, brand=plan.brand)
            layer.a_rows_seen += rows_a.shape[0]
            layer.samples_seen += n
        rows = layer.helper.g_rows(grad.detach())
        scale = self.grad_scale()
        if scale != 1.0:
            rows = rows / scale
        if self.sampling is not None:
            if plan.capture:
                g = self.factor_for(layer, "G", rows.shape[0])
                g.accumulate(rows * math.sqrt(self.sampling), ea=plan.ea, brand=plan.brand)
        else:
            if plan.capture and self.options.fisher == "empirical":
                self.factor_for(layer, "G", rows.shape[0]).accumulate(rows, ea=plan.ea, brand=plan.brand)
            if idx is not None:
                layer.thin_g[idx] = rows
        self.add_seconds(layer, "statistics", self.timer() - t0)

    def grad_scale(self) -> float:
        """The ``GradScaler``'s scale of the current step (1 without one), read once per step."""
        scaler = self.options.grad_scaler
        if scaler is None:
            return 1.0
        k = self.step()
        if self.scale_cache is None or self.scale_cache[0] != k:
            self.scale_cache = (k, float(scaler.get_scale()))
        return self.scale_cache[1]

    def attach(self) -> None:
        """(Re-)register the hooks of the layers and the blocks."""
        self.remove()
        self.handles = [layer.module.register_forward_hook(eager_hook(self.forward_hook)) for layer in self.layers.values()]
        self.handles.append(self.ctx.watch(self.model))
        self.blocks.attach()
        self.hooks_for_dynamo = dynamo_loaded()

    def reattach_if_compiled(self) -> None:
        """Re-register the hooks when ``torch.compile`` was loaded after they were (so they run eagerly)."""
        if self.handles and not self.hooks_for_dynamo and dynamo_loaded():
            self.attach()

    def remove(self) -> None:
        """Detach the preconditioner from the model (its state stays usable)."""
        for h in self.handles:
            h.remove()
        self.handles = []
        self.blocks.detach()

    @contextlib.contextmanager
    def pause(self) -> Iterator[None]:
        """Within the block the hooks capture nothing (extra forward/backward passes, e.g. curvature products)."""
        prev, self.paused = self.paused, True
        try:
            yield
        finally:
            self.paused = prev

    # ------------------------------------------------------------------ true Fisher
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
        fisher = self.options.fisher
        if fisher == "empirical" or not self.plan().capture:
            return
        if likelihood not in ("categorical", "bernoulli", "gaussian"):
            raise ValueError(f"`likelihood` must be 'categorical', 'bernoulli' or 'gaussian', got {likelihood!r}")
        n_samples = V.check_int(n_samples, "n_samples", low=1)
        f = outputs.detach()
        if f.dtype not in (torch.float32, torch.float64):  # autocast outputs: sample in float32
            f = f.float()
        n = f.shape[0] if f.ndim >= 2 else 1
        scale = 1.0 / n if self.options.loss_reduction == "mean" else 1.0
        gen = None if fisher == "exact" else self.generator(f.device)
        vecs, weight = label_vectors(f, likelihood, exact=fisher == "exact", n_samples=n_samples, gen=gen)
        weights = [layer.module.weight for layer in self.layers.values() if layer.module.weight.requires_grad]
        weights += self.blocks.fisher_params()
        self.sampling = weight
        self.ctx.sampling = weight
        try:
            for v in vecs:
                torch.autograd.grad(
                    outputs, weights, grad_outputs=(v * scale).to(outputs.dtype), retain_graph=True, allow_unused=True
                )
        finally:
            self.sampling = None
            self.ctx.sampling = None

    def generator(self, device: torch.device) -> torch.Generator:
        """The label-sampling generator on ``device`` (seeded from ``seed``, or restored from a checkpoint)."""
        if self.fisher_gen is None or self.fisher_gen.device != device:
            self.fisher_gen = torch.Generator(device=device)
            if self.fisher_gen_state is not None:
                self.fisher_gen.set_state(self.fisher_gen_state)
            else:
                self.fisher_gen.manual_seed(self.options.seed)
        return self.fisher_gen

    def rng_state(self) -> torch.Tensor | None:
        """The label-sampling generator's state for a checkpoint (None before any sampling)."""
        return self.fisher_gen.get_state() if self.fisher_gen is not None else self.fisher_gen_state

    def load_rng_state(self, state: torch.Tensor | None) -> None:
        """Restore :meth:`rng_state` (applied when the generator is next created); forgets the scale cache."""
        self.fisher_gen = None
        self.fisher_gen_state = state
        self.scale_cache = None
