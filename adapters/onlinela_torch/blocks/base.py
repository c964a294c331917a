"""The public curvature-block interface: :class:`BlockContext`, :class:`CurvatureBlock` and the registry.

A *curvature block* owns everything K-FAC needs for one module: it registers
its own capture hooks (:meth:`CurvatureBlock.attach`), keeps the statistics
of its parameters' Fisher/GGN block, folds them into exponential averages and
decompositions (:meth:`~CurvatureBlock.update`), returns the preconditioned
gradients of its own parameters (:meth:`~CurvatureBlock.precondition`) and
checkpoints itself.  The orchestrator (``KFACPreconditioner``) owns one
:class:`BlockContext` shared by every block: the schedule, the Fisher type, the
loss reduction, the ``GradScaler`` and the factory of big Kronecker factors,
so that the orchestrator's method (dense, randomized, Brand) applies to the
factors of every block.

Life cycle of one optimizer step, as the orchestrator drives it::

    ctx.watch(model)                    # once: counts forward passes (weight sharing)
    block.attach()                      # once per block
    ... forward, [fisher_backward through ctx.sampling], loss.backward() ...
    block.update(decompose=..., damping=lam, step=k)   # every step
    new = block.precondition(lam)       # {param: tensor}, nothing written
    ... post-processing, write p.grad ...

Normalisation shared by every block (docs/layers.rst): the curvature is the
GGN/Fisher of the *mean* loss, ``(1/M) Σ_m F_m`` over the ``M`` loss terms of
the step.  ``loss_terms="positions"`` (default) counts one loss term per
position of the dimensions in front of a layer's feature dimension (every
token of a language model; every sample of an image model, whose channels come
first); ``"samples"`` counts one per sample (sequence classification).  With
``loss_reduction="mean"`` the captured output gradient is ``δ/M`` and the
gradient factors are ``M Σ g gᵀ``; with ``"sum"`` they are ``(1/M) Σ g gᵀ``.
"""

from __future__ import annotations

import abc
import logging
import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Literal, Protocol

import numpy as np
import torch
from torch import nn

from ..compiled import eager_hook
from ..factors import DenseFactor, FactorState, as_rank_policy

__all__ = [
    "BlockContext",
    "CurvatureBlock",
    "FactorMaker",
    "StepFlags",
    "block_for",
    "block_or_reason",
    "dense_factor_maker",
    "register_block",
    "registered_blocks",
]

logger = logging.getLogger(__name__)

#: ``factory(name, module, ctx)``: a block, or a str saying why this configuration is not supported.
BlockFactory = Callable[[str, nn.Module, "BlockContext"], "CurvatureBlock | str"]


@dataclass(frozen=True)
class StepFlags:
    """What one step does with statistics; any object with these attributes works as ``ctx.plan()``.

    Attributes
    ----------
    ea : bool
        Fold the step's statistics into the dense exponential averages (a ``T_updt`` step).
    brand : bool
        Brand-update ``(U, D)`` of Brand factors (a ``T_B`` step).
    overwrite : bool
        B-R-KFAC overwrite of ``(U, D)`` from the dense EA.
    correct : bool
        B-KFAC-c Rayleigh–Ritz correction after the Brand update.
    """

    ea: bool = True
    brand: bool = False
    overwrite: bool = False
    correct: bool = False


class FactorMaker(Protocol):
    """Factory of one Kronecker factor state (the orchestrator's method decides the strategy).

    ``rows`` is the rank ``s`` of one step's increment (rows captured at the
    first statistics step), which decides Brand eligibility; ``kind`` is given
    when restoring a checkpoint (``FactorState.kind``).
    """

    def __call__(self, dim: int, name: str, *, rows: int, device: torch.device, kind: str | None = None) -> FactorState: ...


def dense_factor_maker(ctx: BlockContext, seed: int = 0) -> FactorMaker:
    """A :class:`FactorMaker` giving :class:`~onlinela_torch.factors.DenseFactor` states (K-FAC's dense EA + ``eigh``).

    For blocks used without an orchestrator (tests, custom loops); seeded per factor name.
    """

    def make(dim: int, name: str, *, rows: int, device: torch.device, kind: str | None = None) -> FactorState:
        if kind not in (None, "dense"):
            raise ValueError(f"factor {name}: this maker builds 'dense' factors, the checkpoint holds {kind!r}")
        rng = np.random.default_rng(np.random.SeedSequence(seed, spawn_key=tuple(name.encode())))
        return DenseFactor(
            dim, decay=ctx.factor_decay, rank=as_rank_policy(dim), dtype=ctx.factor_dtype,
            inv_dtype=ctx.inv_dtype, device=device, rng=rng, name=name,
        )

    return make


@dataclass
class BlockContext:
    """Settings and per-step state that the orchestrator shares with every block.

    Parameters
    ----------
    plan : callable returning StepFlags-like, optional
        The current step's flags (``ea``, ``brand``, ``overwrite``, ``correct``);
        default: statistics every step, no Brand.
    fisher : {"empirical", "true", "exact"}
        ``"empirical"``: output gradients of the real loss backward enter the
        gradient factors; otherwise only those of sampled-label backwards
        (``sampling`` not None).
    loss_reduction : {"mean", "sum"}
        How the loss reduces over its ``M`` terms (module docstring).
    loss_terms : {"positions", "samples"}
        What one loss term is (module docstring).
    grad_scale : callable returning float, optional
        The ``GradScaler``'s current scale (captured output gradients are divided by it).
    factor_decay : float in (0, 1)
        ``ρ`` of the exponential averages.
    factor_dtype, inv_dtype : torch.dtype
        Dtypes of statistics and decompositions (float32 or float64).
    damping_convention : {"product", "factor"}
        The Kronecker damping convention (algorithms.md §1).
    complement : {"min", "zero"}
        Eigenvalue of directions a low-rank factor did not compute.
    make_factor : FactorMaker, optional
        Builds each big Kronecker factor; default :func:`dense_factor_maker`.
    kron_solve : callable (G, A, X, damping) -> Tensor, optional
        The damped Kronecker inverse applied to a gradient matrix ``X`` of shape
        ``(d_G, d_A)`` from two ``FactorEigen`` snapshots; default
        ``onlinela_torch.preconditioner.apply_inverse`` with ``damping_convention``
        and ``complement`` (the orchestrator passes its own, e.g. with its damping scale).
    timer : callable
        Clock of the per-phase seconds in each block's ``stats()``.

    Attributes
    ----------
    sampling : float or None
        Weight of the sampled-label backward in progress (set by the
        orchestrator's ``fisher_backward``), None during the real loss backward.
    forward_count : int
        Forward passes of the watched model so far (:meth:`watch`); blocks use it
        to count samples once per forward when a module is called several times.
    """

    plan: Callable[[], Any] = field(default=lambda: StepFlags())
    fisher: Literal["empirical", "true", "exact"] = "empirical"
    loss_reduction: Literal["mean", "sum"] = "mean"
    loss_terms: Literal["positions", "samples"] = "positions"
    grad_scale: Callable[[], float] = field(default=lambda: 1.0)
    factor_decay: float = 0.95
    factor_dtype: torch.dtype = torch.float32
    inv_dtype: torch.dtype = torch.float32
    damping_convention: Literal["product", "factor"] = "product"
    complement: Literal["min", "zero"] = "min"
    make_factor: FactorMaker | None = None
    kron_solve: Callable[..., torch.Tensor] | None = None
    timer: Callable[[], float] = time.perf_counter
    sampling: float | None = field(default=None, init=False)
    forward_count: int = field(default=0, init=False)

    def __post_init__(self) -> None:
        _check_choice(self.fisher, "fisher", ("empirical", "true", "exact"))
        _check_choice(self.loss_reduction, "loss_reduction", ("mean", "sum"))
        _check_choice(self.loss_terms, "loss_terms", ("positions", "samples"))
        _check_choice(self.damping_convention, "damping_convention", ("product", "factor"))
        _check_choice(self.complement, "complement", ("min", "zero"))
        if not (isinstance(self.factor_decay, (int, float)) and 0.0 < self.factor_decay < 1.0):
            raise ValueError(f"`factor_decay` must be a float in (0, 1), got {self.factor_decay!r}")
        for name in ("factor_dtype", "inv_dtype"):
            if getattr(self, name) not in (torch.float32, torch.float64):
                raise ValueError(f"`{name}` must be torch.float32 or torch.float64, got {getattr(self, name)}")
        for name in ("plan", "grad_scale", "timer"):
            if not callable(getattr(self, name)):
                raise TypeError(f"`{name}` must be callable, got {type(getattr(self, name)).__name__}")
        if self.make_factor is None:
            self.make_factor = dense_factor_maker(self)
        if self.kron_solve is None:
            self.kron_solve = self._apply_inverse
        for name in ("make_factor", "kron_solve"):
            if not callable(getattr(self, name)):
                raise TypeError(f"`{name}` must be callable, got {type(getattr(self, name)).__name__}")

    def _apply_inverse(self, G: Any, A: Any, X: torch.Tensor, damping: float) -> torch.Tensor:
        from ..inverse import apply_inverse  # the one implementation

        return apply_inverse(G, A, X, damping, self.damping_convention, self.complement)

    def capturing(self) -> bool:
        """Whether statistics are collected on this step (``plan().ea or plan().brand``)."""
        p = self.plan()
        return bool(p.ea or p.brand)

    def watch(self, model: nn.Module) -> torch.utils.hooks.RemovableHandle:
        """Count the forward passes of ``model`` in :attr:`forward_count` (a forward pre-hook on it).

        Returns the hook handle; call ``.remove()`` to stop counting.
        """

        def count(module: nn.Module, args: Any) -> None:
            self.forward_count += 1

        return model.register_forward_pre_hook(eager_hook(count))

    def g_scale(self, terms: int) -> float:
        """``M`` (mean loss) or ``1/M`` (sum loss): turns ``Σ g gᵀ`` of captured gradients into the mean-loss curvature."""
        m = float(max(terms, 1))
        return m if self.loss_reduction == "mean" else 1.0 / m

    def output_weight(self) -> float | None:
        """Weight of the output gradient arriving now, or None when it must not enter the statistics.

        ``sqrt(sampling) / grad_scale`` during a sampled-label backward; during
        the real loss backward ``1 / grad_scale`` for ``fisher="empirical"``
        and None otherwise.
        """
        if self.sampling is not None:
            return math.sqrt(self.sampling) / self.grad_scale()
        if self.fisher == "empirical":
            return 1.0 / self.grad_scale()
        return None


def _check_choice(value: Any, name: str, choices: tuple[str, ...]) -> None:
    if value not in choices:
        raise ValueError(f"`{name}` must be one of {', '.join(map(repr, choices))}; got {value!r}")


_functorch_active = getattr(torch._C, "_are_functorch_transforms_active", lambda: False)


def capture_allowed(module: nn.Module, ctx: BlockContext) -> bool:
    """Statistics are captured only in training mode, with grad enabled, on statistics steps.

    Never inside a ``torch.func`` transform (``grad``, ``vmap``, ``jacrev``):
    a functional evaluation of the model is not a training step.
    """
    return module.training and torch.is_grad_enabled() and not _functorch_active() and ctx.capturing()


class CurvatureBlock(abc.ABC):
    """Curvature of the parameters of one module: capture, statistics, preconditioning, checkpoint.

    Public template methods (what the orchestrator calls) are concrete; a new
    layer type implements the small abstract hooks ``_attach``, ``_update``,
    ``_precondition``, ``_state``, ``_load`` and ``_dims``.  A block never
    writes ``p.grad``.

    Parameters
    ----------
    name : str
        The module's name in ``model.named_modules()`` (parameter names are ``f"{name}.{attr}"``).
    module : torch.nn.Module
    ctx : BlockContext
    """

    #: Short name of the block type, in ``stats()["kind"]``.
    kind: str = "block"

    def __init__(self, name: str, module: nn.Module, ctx: BlockContext) -> None:
        if not isinstance(ctx, BlockContext):
            raise TypeError(f"`ctx` must be a BlockContext, got {type(ctx).__name__}")
        self.name = name
        self.module = module
        self.ctx = ctx
        self.seconds = {"statistics": 0.0, "decomposition": 0.0, "preconditioning": 0.0}
        self.counters: dict[str, int] = {"skipped_statistics": 0, "missing_fisher": 0, "degenerate": 0}
        self._handles: list[Any] = []
        self._calls: dict[int, int] = {}  # forward_count -> loss terms of that forward (max over calls)

    # ------------------------------------------------------------------ template methods
    @abc.abstractmethod
    def params(self) -> list[tuple[str, nn.Parameter]]:
        """The ``(name, parameter)`` pairs this block preconditions (those with ``requires_grad``)."""

    def fisher_params(self) -> list[nn.Parameter]:
        """Parameters whose gradient ``fisher_backward`` must request so that this block's output hooks fire."""
        return [p for _, p in self.params()]

    def attach(self) -> None:
        """Register the capture hooks on the module (idempotent: a second call is a no-op)."""
        if not self._handles:
            self._handles = list(self._attach())

    def detach(self) -> None:
        """Remove the capture hooks and restore anything ``attach`` changed on the module."""
        for h in self._handles:
            h.remove()
        self._handles = []

    def update(self, *, decompose: bool, damping: float, step: int) -> None:
        """Fold this step's captured statistics into the EAs; decompose when ``decompose``.

        Always consumes the step's capture (also when ``ctx.plan()`` says no
        statistics step).  Non-finite statistics are skipped, logged and counted.
        """
        t0 = self.ctx.timer()
        try:
            self._update(decompose=decompose, damping=damping, step=step)
        finally:
            self._calls = {}
            self.discard()
        self.seconds["decomposition"] += self.ctx.timer() - t0

    def discard(self) -> None:
        """Drop the statistics captured since the last :meth:`update` (a skipped step)."""
        self._calls = {}
        self._discard()

    def precondition(self, damping: float) -> dict[nn.Parameter, torch.Tensor]:
        """The preconditioned gradient of each covered parameter that has a ``grad``.

        Nothing is written; a parameter whose block has no curvature yet (or
        an all-zero one) maps to its unchanged ``p.grad`` (the same tensor).
        """
        t0 = self.ctx.timer()
        grads = {p: p.grad for _, p in self.params() if p.grad is not None}
        out = self._precondition(grads, damping) if grads else {}
        self.seconds["preconditioning"] += self.ctx.timer() - t0
        return out

    def statistics_holders(self) -> list[Any] | None:
        """The objects that hold this block's per-step statistics, in a fixed order; None if it cannot be distributed.

        Each is a :class:`~onlinela_torch.blocks.kronecker.FactorSlot` or a
        :class:`~onlinela_torch.blocks.diagonal.TensorEA`.  Under
        :class:`~onlinela_torch.DistributedKFACPreconditioner` their pending
        increments are averaged over the ranks before :meth:`update` (one
        all-reduce per statistics step), which gives the global batch's
        statistics when the ranks hold equal shards.  A block that returns
        None (the default, e.g. a user's block keeping its statistics
        elsewhere) is not built under ``torch.distributed``: its parameters
        are reported as uncovered.
        """
        return None

    @property
    @abc.abstractmethod
    def has_curvature(self) -> bool:
        """Whether :meth:`precondition` changes the gradients (a decomposition exists and is not zero)."""

    def state_dict(self) -> dict[str, Any]:
        """The block's statistics, decompositions and counters (tensors are references)."""
        return {"kind": self.kind, "counters": dict(self.counters), "state": self._state()}

    def load_state_dict(self, sd: dict[str, Any]) -> None:
        """Restore from :meth:`state_dict`; a kind or shape mismatch raises ValueError naming the block."""
        if not isinstance(sd, dict) or sd.get("kind") != self.kind:
            got = sd.get("kind") if isinstance(sd, dict) else type(sd).__name__
            raise ValueError(f"block {self.name!r}: the checkpoint holds a {got!r} block, this is a {self.kind!r} one")
        self._load(sd["state"])
        self.counters = dict(sd["counters"])
        self.discard()

    def stats(self) -> dict[str, Any]:
        """``{"kind", "params", "dims", "seconds", "counters", ...}`` (plus block-specific entries)."""
        return {
            "kind": self.kind,
            "params": [n for n, _ in self.params()],
            "dims": self._dims(),
            "seconds": dict(self.seconds),
            "counters": dict(self.counters),
            **self._extra_stats(),
        }

    # ------------------------------------------------------------------ helpers for subclasses
    def _record_call(self, terms: int) -> None:
        """Count the loss terms of one captured call, once per forward pass (weight sharing)."""
        fc = self.ctx.forward_count
        self._calls[fc] = max(self._calls.get(fc, 0), int(terms))

    @property
    def _terms(self) -> int:
        """``M``: loss terms of the step (summed over forward passes, not over calls in one forward)."""
        return sum(self._calls.values())

    def _missing_fisher(self, step: int) -> None:
        self.counters["missing_fisher"] += 1
        logger.warning(
            "step %d: fisher=%r but no sampled-label backward reached block %s; its gradient statistics are not updated",
            step, self.ctx.fisher, self.name,
        )

    def _skip(self, step: int, why: str) -> None:
        self.counters["skipped_statistics"] += 1
        logger.warning("step %d: skipped the statistics of block %s (%s)", step, self.name, why)

    def _extra_stats(self) -> dict[str, Any]:
        return {}

    # ------------------------------------------------------------------ abstract hooks
    @abc.abstractmethod
    def _attach(self) -> list[Any]:
        """Install capture; return handles with ``.remove()``."""

    @abc.abstractmethod
    def _update(self, *, decompose: bool, damping: float, step: int) -> None: ...

    @abc.abstractmethod
    def _discard(self) -> None: ...

    @abc.abstractmethod
    def _precondition(self, grads: dict[nn.Parameter, torch.Tensor], damping: float) -> dict[nn.Parameter, torch.Tensor]: ...

    @abc.abstractmethod
    def _state(self) -> dict[str, Any]: ...

    @abc.abstractmethod
    def _load(self, state: dict[str, Any]) -> None: ...

    @abc.abstractmethod
    def _dims(self) -> dict[str, int]: ...


# =========================================================================== registry
_REGISTRY: dict[type, BlockFactory] = {}


def register_block(module_type: type, factory: BlockFactory) -> None:
    """Register ``factory(name, module, ctx) -> CurvatureBlock | str`` for modules of ``module_type``.

    :func:`block_for` looks the exact type up first, then the classes of its
    MRO in order, so registering a subclass overrides its base's block.  A
    factory returns a string saying why when it does not support a module's
    configuration (e.g. a grouped convolution); the orchestrator reports it.
    Re-registering a type replaces its factory.

    Raises
    ------
    TypeError
        ``module_type`` is not a subclass of ``torch.nn.Module`` or ``factory`` is not callable.
    """
    if not (isinstance(module_type, type) and issubclass(module_type, nn.Module)):
        raise TypeError(f"`module_type` must be a torch.nn.Module subclass, got {module_type!r}")
    if not callable(factory):
        raise TypeError(f"`factory` must be callable (name, module, ctx) -> CurvatureBlock | str, got {factory!r}")
    _REGISTRY[module_type] = factory


def registered_blocks() -> dict[type, BlockFactory]:
    """A copy of the registry: module type -> factory."""
    return dict(_REGISTRY)


def block_or_reason(name: str, module: nn.Module, ctx: BlockContext) -> tuple[CurvatureBlock | None, str]:
    """``(block, "")`` for a supported module, else ``(None, why)``.

    Lookup: the exact type, then the classes of its MRO.  ``why`` is empty
    for a module without trainable parameters of its own (containers,
    activations); otherwise it names the type or gives the factory's reason.
    """
    if not any(p.requires_grad for p in module.parameters(recurse=False)):
        return None, ""
    for cls in type(module).__mro__:
        factory = _REGISTRY.get(cls)
        if factory is None:
            continue
        block = factory(name, module, ctx)
        if isinstance(block, str):
            return None, block
        if not isinstance(block, CurvatureBlock):
            raise TypeError(f"the block factory for {cls.__name__} returned {type(block).__name__}, not a CurvatureBlock or str")
        if not block.params():
            return None, f"{type(module).__name__} has no trainable parameter"
        return block, ""
    return None, f"no curvature block is registered for {type(module).__name__} (see register_block)"


def block_for(name: str, module: nn.Module, ctx: BlockContext) -> CurvatureBlock | None:
    """The block for ``module`` from the registry (exact type, then MRO), or None (see :func:`block_or_reason`)."""
    return block_or_reason(name, module, ctx)[0]
