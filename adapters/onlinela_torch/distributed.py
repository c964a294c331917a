r"""Data-parallel K-FAC over ``torch.distributed``: factor all-reduce, decompositions split across ranks.

Every rank runs the same model on its shard of the global batch (usually
under :class:`~torch.nn.parallel.DistributedDataParallel`).  Per step,
:class:`DistributedKFACPreconditioner` adds three kinds of communication to
:class:`~onlinela_torch.KFACPreconditioner`'s phases:

1. **Statistics** (``T_updt`` / ``T_B`` steps), before the EA update.  Dense
   factors: the step's Gram matrices are all-reduced (summed, pre-weighted so
   that the result is the increment of the *global* batch); only the upper
   triangle travels, ``d(d+1)/2`` elements per factor.  Brand factors
   (``b-kfac``): the scaled rows ``X`` (``d × n_p`` on rank ``p``) are
   gathered to the one rank that Brand-updates the factor: ``d·n`` per rank
   instead of ``d²``, cheaper whenever the global batch ``n·P < d`` and the
   only choice for a Brand-only factor, which has no ``d × d`` matrix to reduce.
2. **Decompositions** (``T_inv`` / ``T_B`` steps).  Each *factor* is owned by
   one rank (a pluggable :class:`AssignmentPolicy`; default
   :class:`GreedyAssignment`, longest-processing-time first on the costs of
   :func:`decomposition_cost`), so a layer's ``A`` and ``G`` can be
   decomposed on different ranks; only the owner decomposes or
   Brand-updates a factor, then broadcasts its new state (eigenvectors,
   eigenvalues, Brand ``(U, D)``, rank, RNG state: ``≈ d·r`` elements per
   factor) so every rank holds the full preconditioner state.
3. **Gradients**, only when the model is *not* wrapped in DDP: ``p.grad`` is
   averaged over the ranks.  With DDP the gradients are already averaged.

Preconditioning then runs on every rank with identical factors (stored in
the same row-major layout) and gradients and is deterministic, so all ranks
take bitwise identical steps.  Because every rank keeps the complete state,
rank 0's :meth:`state_dict` is a full checkpoint and a run resumes on any
world size.

``mode="memory"`` trades communication for memory (KAISA's grad-worker
fraction ``1/P``): the unit of work is the layer, its statistics are
*reduced* to its owner only, only the owner keeps its EAs and
decompositions and preconditions its gradient, then broadcasts the
preconditioned gradient (``d_G × d_A`` elements per layer and step instead
of the decompositions every ``T_inv``).  :meth:`state_dict` is then
collective and complete on rank 0 only.

The collectives and their byte counters live in
:class:`~onlinela_torch.comm.Communicator` and
:class:`~onlinela_torch.comm.StatisticsSync`, the owner table in
:class:`~onlinela_torch.assignment.FactorPlacement`; this module composes
them into the preconditioner's step hooks.

Launch with ``torchrun`` (any script that calls
``torch.distributed.init_process_group``), with :func:`spawn` (``N`` local
processes), or ``onlinela train --nproc N``; see docs/distributed.rst.
"""

from __future__ import annotations

import contextlib
import dataclasses
import datetime
import gc
import logging
import os
import socket
import sys
from collections.abc import Callable, Iterator, Mapping, Sequence
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from .assignment import AssignmentPolicy, FactorPlacement, GreedyAssignment, WorkItem, decomposition_cost
from .comm import Communicator, StatisticsSync, held_bytes
from .factors import FactorState
from .layer import KFACLayer
from .methods import Plan
from .preconditioner import KFACPreconditioner

__all__ = [
    "AssignmentPolicy",
    "DistributedKFACPreconditioner",
    "GreedyAssignment",
    "WorkItem",
    "decomposition_cost",
    "distribute",
    "distributed_active",
    "spawn",
]

#: The values of ``DistributedKFACPreconditioner(mode=...)``.
MODES = ("replicate", "memory")


def distributed_active(group: Any = None) -> bool:
    """Whether a process group of more than one rank is initialised."""
    return dist.is_available() and dist.is_initialized() and dist.get_world_size(group) > 1


# =========================================================================== the preconditioner
class DistributedKFACPreconditioner(KFACPreconditioner):
    r"""Data-parallel :class:`~onlinela_torch.KFACPreconditioner` over a ``torch.distributed`` process group.

    Use it exactly like the single-process class (same arguments and
    results), on every rank, after ``torch.distributed.init_process_group``.
    With the same global batch it computes the same steps as one process
    (up to floating-point summation order); see the module docstring for what
    is communicated.

    Parameters
    ----------
    model : torch.nn.Module
        The model, or its :class:`~torch.nn.parallel.DistributedDataParallel`
        wrapper (unwrapped through ``.module``, so layer names and checkpoints
        are those of the bare model).
    group : ProcessGroup, optional
        Default: the world group.
    assignment : AssignmentPolicy, optional
        Which rank decomposes which factor (default :class:`GreedyAssignment`).
    mode : {"replicate", "memory"}
        ``"replicate"`` (default): every rank keeps every factor and
        decomposition; the work unit is the factor.  ``"memory"``: the unit
        is the layer; only its owner keeps the layer's factors, preconditions
        its gradient and broadcasts the result (per-rank factor memory about
        ``1/P``; :meth:`state_dict` and :meth:`precondition` become
        collective).  See docs/distributed.rst for bytes and memory per rank.
    average_gradients : bool, optional
        Average ``p.grad`` over the ranks before preconditioning.  None
        (default): when ``model`` is not a DDP wrapper.  Pass False when the
        gradients are averaged elsewhere (DDP wrapping the model after this
        preconditioner was built).
    **kwargs
        Any :class:`~onlinela_torch.KFACPreconditioner` keyword.

    Attributes
    ----------
    rank, world_size : int
        This rank and the group's size ``P``.
    comm : onlinela_torch.comm.Communicator
        The collectives (settings check, decomposition and gradient
        broadcasts, ``mode="memory"`` exchanges) and their byte counters.
    statistics : onlinela_torch.comm.StatisticsSync
        The statistics exchange of ``T_updt`` / ``T_B`` steps.
    placement : onlinela_torch.assignment.FactorPlacement
        Which rank decomposes which factor (:attr:`owners`).

    Raises
    ------
    RuntimeError
        If no process group is initialised.
    ValueError
        If the ranks were built with different settings (method, layers,
        dimensions, schedules, ...): detected here, on every rank, before any
        statistics are exchanged.

    Notes
    -----
    * The thin-factor gradient path (``low_rank_grad``) is off: each rank
      holds only its own rows while the gradient is the global one.
    * The factor is the unit of work (``colocate_factors=False`` in
      kfac-pytorch): the largest layer no longer bounds the makespan; in
      ``mode="memory"`` the layer is (its owner needs both factors).
    * Brand eligibility (``r + s < d``) is decided on ``s = P ×`` the local
      rows, i.e. assuming equal local batches; statistics are weighted exactly
      for unequal ones.
    * With ``mode="replicate"`` every rank holds every factor (``O(Σ d²)``
      for dense EAs), like one process.
    * Curvature blocks (attention, embeddings, norms, Conv1d, Linear on
      sequences) are replicated in both modes: their pending statistics are
      averaged over the ranks on every statistics step (one ``all_reduce``,
      :meth:`~onlinela_torch.comm.StatisticsSync.average_blocks`; exact for
      equal local batches) and every rank decomposes them; their factors use
      the dense EA (a Brand method's block factors run as RS-KFAC).
    """

    _synchronises_blocks = True

    def __init__(
        self,
        model: nn.Module,
        *,
        group: Any = None,
        assignment: AssignmentPolicy | None = None,
        average_gradients: bool | None = None,
        mode: str = "replicate",
        **kwargs: Any,
    ) -> None:
        if not (dist.is_available() and dist.is_initialized()):
            raise RuntimeError("DistributedKFACPreconditioner needs torch.distributed.init_process_group() first")
        ddp = isinstance(model, nn.parallel.DistributedDataParallel)
        super().__init__(model.module if ddp else model, **kwargs)
        self._setup_distributed(group, assignment, (not ddp) if average_gradients is None else average_gradients, mode)

    def _setup_distributed(
        self, group: Any, assignment: AssignmentPolicy | None, average_gradients: bool, mode: str = "replicate"
    ) -> None:
        """Distributed state on top of a constructed preconditioner; checks the ranks agree."""
        if assignment is not None and not isinstance(assignment, AssignmentPolicy):
            raise TypeError(f"`assignment` must be an AssignmentPolicy, got {type(assignment).__name__}")
        if mode not in MODES:
            raise ValueError(f"`mode` must be one of {MODES}, got {mode!r}")
        self.mode = mode
        self.group = group
        self._factors.dense_blocks = True  # block statistics are averaged as Grams (StatisticsSync.average_blocks)
        self.comm = Communicator(group, mode, self._timer)
        self.statistics = StatisticsSync(self.comm)
        self.rank = self.comm.rank
        self.world_size = self.comm.world_size
        self.assignment = GreedyAssignment() if assignment is None else assignment
        self.placement = FactorPlacement(
            self.assignment, self.rank, self.world_size, mode, oversample=self.oversample, n_iter=self.n_iter
        )
        self.average_gradients = bool(average_gradients)
        self._precomputed: dict[str, torch.Tensor] | None = None
        self._changed: list[tuple[KFACLayer, str]] = []
        self._decompositions = 0
        for layer in self.layers.values():
            layer.low_rank_grad = False
        self.comm.check_config(self._fingerprint())

    @property
    def owners(self) -> dict[tuple[str, str], int]:
        """``(layer, "A" or "G")`` to the rank that decomposes that factor (:class:`FactorPlacement`)."""
        return self.placement.owners

    def _fingerprint(self) -> dict[str, Any]:
        return {
            "world_size": self.world_size,
            "method": self.method,
            "layers": [(n, type(lay.module).__name__, lay.helper.a_dim, lay.helper.g_dim) for n, lay in self.layers.items()],
            "blocks": [(n, b.kind, b._dims()) for n, b in self.blocks.blocks.items()],
            "steps": self.steps,
            "factor_decay": self.factor_decay,
            "schedules@step": (self._t_updt(self.steps), self._t_inv(self.steps), self._t_brand(self.steps)),
            "damping@step": self.damping_at(self.steps),
            "rank_policy": _describe(self.rank_policy),
            "sketch": (self.oversample, self.n_iter),
            "clips": (self.kl_clip, self.rms_clip),
            "conventions": (self.damping_convention, self.complement, self.fisher, self.loss_reduction),
            "dtypes": (str(self.factor_dtype), str(self.inv_dtype)),
            "brand": _describe(self.brand),
            "seed": self.seed,
            "assignment": type(self.assignment).__name__,
            "average_gradients": self.average_gradients,
            "mode": self.mode,
            "step_rules": (self.warmup, self.damping_scale, self.graft, self.damping_factor),
        }

    # ------------------------------------------------------------------ step
    @torch.no_grad()
    def step(self) -> bool:
        """As :meth:`KFACPreconditioner.step`, with the statistics, decompositions and gradients synchronised.

        Returns
        -------
        bool
            False when the step was skipped for a non-finite gradient (on every rank alike).
        """
        self.comm.new_step()
        self._changed = []
        plan = self._plan(self.steps)
        with self.comm.timed():
            if plan.capture:
                self.statistics.sync(
                    self.layers, self.placement, step=self.steps, ea=plan.ea, brand=plan.brand,
                    loss_reduction=self.loss_reduction, device=self._device(),
                )
            if plan.ea and self.blocks.blocks:
                self.statistics.average_blocks(self.blocks.blocks, self._device(), self._warn.warn)
            self.placement.place_new(self.layers)
        return super().step()

    def _update_layer(self, layer: KFACLayer, plan: Plan, lam: float, k: int) -> None:
        mine = {which: f for which, f in layer.factors() if self.placement.owner(layer.name, which) == self.rank}
        others = [f for which, f in layer.factors() if which not in mine]
        before = {which: _version(f) for which, f in mine.items()}
        with _decompositions_disabled(others):  # their EA updates run; the owner decomposes (and broadcasts)
            super()._update_layer(layer, plan, lam, k)
        for which, f in mine.items():
            now, then = _version(f), before[which]
            if any(a is not b for a, b in zip(now[:2], then[:2])) or now[2:] != then[2:]:
                self._changed.append((layer, which))
            if now[0] is not then[0]:
                self._decompositions += 1

    def _precondition_step(self, k: int, lam: float) -> bool:
        plan = self._plan(k)
        with self.comm.timed():
            if self.mode == "replicate" and (plan.decompose or plan.brand or plan.overwrite):
                self.comm.broadcast_factors(self.layers, self._changed)
            if self.average_gradients:
                self.comm.average_gradients(self.model.parameters(), self._device())
        if self.mode == "memory":
            entries = [
                (layer, layer.helper.grad_matrix())
                for layer in self.layers.values()
                if layer.module.weight.requires_grad and layer.module.weight.grad is not None
            ]
            self._precomputed = self._precondition_owned(entries, lam)
        try:
            return super()._precondition_step(k, lam)
        finally:
            self._precomputed = None

    def _apply_layer(self, layer: KFACLayer, g: torch.Tensor, lam: float, *, thin: bool) -> torch.Tensor:
        if self._precomputed is not None:  # mode="memory", inside step(): the owner's result
            return self._precomputed[layer.name]
        return super()._apply_layer(layer, g, lam, thin=thin)

    def _precondition_owned(self, entries: list[tuple[KFACLayer, torch.Tensor]], lam: float) -> dict[str, torch.Tensor]:
        """``mode="memory"``: precondition the layers this rank owns, then broadcast every layer's result from its owner.

        Every rank computes its own layers first, so the ranks work in
        parallel; the broadcasts follow in layer order (``d_G d_A`` elements each).
        """
        out = {}
        for layer, g in entries:  # a layer without an owner has no factors yet: its gradient passes unchanged
            if self.placement.owner(layer.name, "A") == self.rank:
                out[layer.name] = super()._apply_layer(layer, g, lam, thin=False)
        return self.comm.broadcast_preconditioned(entries, out, self.placement)

    def precondition(self, grads: Mapping[str, torch.Tensor], *, damping: float | None = None) -> dict[str, torch.Tensor]:
        """As :meth:`KFACPreconditioner.precondition`; collective in ``mode="memory"``.

        In ``mode="memory"`` every rank must call it with the same layer names
        in the same order: each layer is preconditioned by its owner and broadcast.
        """
        if self.mode != "memory":
            return super().precondition(grads, damping=damping)
        super().precondition({}, damping=damping)  # validates `damping`
        unknown = [name for name in grads if name not in self.layers]
        if unknown:
            raise KeyError(f"{unknown[0]!r} is not a preconditioned layer; known: {list(self.layers)}")
        lam = self.damping_at(self.steps) if damping is None else float(damping)
        return self._precondition_owned([(self.layers[name], g) for name, g in grads.items()], lam)

    def _kind_for(self, dim: int, s: int) -> str:
        return super()._kind_for(dim, s * self.world_size)

    def _device(self) -> torch.device:
        """Where collectives' small tensors live: the model's device (NCCL needs CUDA tensors)."""
        return next(self.model.parameters()).device

    # ------------------------------------------------------------------ checkpoints and stats
    def state_dict(self) -> dict[str, Any]:
        """As :meth:`KFACPreconditioner.state_dict`; in ``mode="memory"`` collective, and complete on rank 0 only.

        In ``mode="memory"`` every rank must call it: each owner sends its
        factors' state to rank 0 (point to point), so only rank 0 holds the
        whole state, transiently; the other ranks return their own factors.
        """
        sd = super().state_dict()
        if self.mode == "memory":
            self.comm.collect_state(sd["layers"], self.placement)
        return sd

    def stats(self) -> dict[str, Any]:
        """:meth:`KFACPreconditioner.stats` plus ``"distributed"``.

        Returns
        -------
        dict
            ``stats["distributed"]`` holds ``rank``, ``world_size``, ``mode``,
            ``owners`` (layer name to ``{"A": rank, "G": rank}``),
            ``factor_bytes`` (bytes of the EAs, decompositions and Brand
            states this rank holds), ``decompositions`` (factor decompositions and
            Brand updates computed on this rank), ``received`` (factor states
            received from their owners), ``bytes_last_step`` and ``bytes_total``
            (payload bytes per category of :data:`~onlinela_torch.comm.BYTE_CATEGORIES`:
            the all-reduced or broadcast buffers, the rows sent to a gather and,
            at its root, received) and ``communication_seconds``.
        """
        out = super().stats()
        out["distributed"] = {
            "rank": self.rank,
            "world_size": self.world_size,
            "mode": self.mode,
            "owners": self.placement.nested(),
            "factor_bytes": held_bytes(self.layers.values()),
            "decompositions": self._decompositions,
            **self.comm.stats(),
        }
        return out


def distribute(
    preconditioner: KFACPreconditioner,
    *,
    group: Any = None,
    assignment: AssignmentPolicy | None = None,
    average_gradients: bool = True,
    mode: str = "replicate",
) -> KFACPreconditioner:
    """Turn a freshly built :class:`~onlinela_torch.KFACPreconditioner` into a distributed one, in place.

    For preconditioners built by someone else, e.g. ``opt.preconditioner`` of
    :class:`~onlinela_torch.RSKFAC`: call it on every rank before the first
    step (before loading a checkpoint).  Returns ``preconditioner`` unchanged
    when no multi-rank process group is initialised; when it is already a
    :class:`DistributedKFACPreconditioner`, only ``average_gradients`` is set.
    ``KFACPreconditioner(...)`` itself never synchronises ranks (it warns under
    a process group): this function, or constructing
    :class:`DistributedKFACPreconditioner` directly, is the explicit choice.

    Parameters
    ----------
    preconditioner : KFACPreconditioner
        Exactly this class (subclasses such as KLD-WRM's are refused), at step 0.
    group, assignment, mode
        As :class:`DistributedKFACPreconditioner` (``mode`` applies only to a
        preconditioner made distributed here, not to one built distributed).
    average_gradients : bool
        Average ``p.grad`` over the ranks; pass False when the model is
        trained through DDP (the gradients are already averaged).

    Returns
    -------
    KFACPreconditioner
        The same object, now a :class:`DistributedKFACPreconditioner`.
    """
    if isinstance(preconditioner, DistributedKFACPreconditioner):
        preconditioner.average_gradients = bool(average_gradients)
        return preconditioner
    if not distributed_active(group):
        return preconditioner
    if type(preconditioner) is not KFACPreconditioner:
        raise TypeError(f"distribute() supports KFACPreconditioner itself, not {type(preconditioner).__name__}")
    if preconditioner.steps != 0:
        raise ValueError("distribute() must be called before the first step (the factors would differ across ranks)")
    preconditioner.__class__ = DistributedKFACPreconditioner
    preconditioner._setup_distributed(group, assignment, average_gradients, mode)
    return preconditioner


# =========================================================================== launching
def spawn(
    fn: Callable[..., Any],
    nproc: int,
    args: Sequence[Any] = (),
    *,
    backend: str = "gloo",
    timeout: datetime.timedelta = datetime.timedelta(minutes=10),
) -> None:
    """Run ``fn(*args)`` in ``nproc`` new local processes joined in one process group.

    Rendezvous over TCP on a free port of 127.0.0.1.  With ``backend="nccl"``
    rank ``p`` uses ``cuda:p``.  Every collective fails after ``timeout``
    instead of hanging.  A non-zero int returned by ``fn`` becomes the
    process's exit status.

    Teardown, in this order, so that no process-group thread outlives the
    interpreter: a barrier once ``fn`` returned on every rank (no rank closes
    its connections while a peer still communicates), a garbage collection
    (DDP wrappers and hooked modules in reference cycles hold the group and
    pending work), ``destroy_process_group`` (joins gloo's worker threads),
    then ``os._exit`` with the status, after flushing the standard streams and
    logging.  Left to interpreter finalisation, a gloo worker thread that
    releases a tensor after Python has begun to shut down is torn down inside
    a ``noexcept`` destructor: ``terminate called without an active
    exception`` and SIGABRT (issue 15: 1 of 10 runs of the distributed tests).

    Raises
    ------
    torch.multiprocessing.ProcessRaisedException, torch.multiprocessing.ProcessExitedException
        When a process raised or exited with a non-zero status.
    """
    if nproc < 1:
        raise ValueError(f"`nproc` must be >= 1, got {nproc}")
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    torch.multiprocessing.start_processes(
        _spawned, args=(fn, nproc, port, backend, timeout, tuple(args)), nprocs=nproc, start_method="spawn"
    )


def _spawned(
    rank: int, fn: Callable[..., Any], nproc: int, port: int, backend: str, timeout: datetime.timedelta, args: tuple
) -> None:
    os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(nproc))
    if backend == "nccl":
        torch.cuda.set_device(rank % torch.cuda.device_count())
    dist.init_process_group(backend, init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=nproc, timeout=timeout)
    try:
        rc = fn(*args)
        dist.barrier()  # every rank is done communicating before any rank tears its group down
    finally:
        gc.collect()  # what still holds the group (modules, DDP reducers in reference cycles) goes while it exists
        dist.destroy_process_group()
    _exit(int(rc or 0))


def _exit(status: int) -> None:
    """Leave the process now, skipping interpreter finalisation (see :func:`spawn`); streams and logs flushed."""
    logging.shutdown()
    for stream in (sys.stdout, sys.stderr):
        stream.flush()
    os._exit(status)


# =========================================================================== helpers
def _describe(obj: Any) -> Any:
    """A rank-independent description of an option object: dataclass fields, callables by name (not address)."""
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        return type(obj).__name__, {f.name: _describe(getattr(obj, f.name)) for f in dataclasses.fields(obj)}
    if callable(obj):
        return getattr(obj, "__qualname__", type(obj).__name__)
    return obj


@contextlib.contextmanager
def _decompositions_disabled(factors: Sequence[FactorState]) -> Iterator[None]:
    """Within the block, ``update_brand`` and ``refresh`` of ``factors`` do nothing (their owner runs them)."""
    for f in factors:
        f.update_brand = f.refresh = _do_nothing  # instance attributes shadow the methods
    try:
        yield
    finally:
        for f in factors:
            del f.update_brand, f.refresh


def _do_nothing(*args: Any, **kwargs: Any) -> None:
    """Stands in for a factor's update method on a rank that does not own the factor."""


def _version(f: FactorState) -> tuple[Any, ...]:
    """What an owner's update may change: snapshot and Brand state (compared by identity), rank, skips, errors."""
    return (f.eigen, getattr(f, "brand", None), f.rank, tuple(f.skipped.values()), len(f.errors))
