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

Launch with ``torchrun`` (any script that calls
``torch.distributed.init_process_group``), with :func:`spawn` (``N`` local
processes), or ``onlinela train --nproc N``; see docs/distributed.rst.
"""

from __future__ import annotations

import abc
import contextlib
import dataclasses
import datetime
import gc
import logging
import os
import pickle
import socket
import sys
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from .factors import FactorState
from .modules import g_scale
from .preconditioner import KFACLayer, KFACPreconditioner, _Plan

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

logger = logging.getLogger(__name__)

#: Categories of :meth:`DistributedKFACPreconditioner.stats` ``["distributed"]["bytes"]``.
BYTE_CATEGORIES = ("control", "statistics", "brand_rows", "decompositions", "gradients", "preconditioned")
#: The values of ``DistributedKFACPreconditioner(mode=...)``.
MODES = ("replicate", "memory")
_KINDS = ("dense", "randomized", "brand", "brand+dense")


def distributed_active(group: Any = None) -> bool:
    """Whether a process group of more than one rank is initialised."""
    return dist.is_available() and dist.is_initialized() and dist.get_world_size(group) > 1


# =========================================================================== work assignment
@dataclass(frozen=True)
class WorkItem:
    """One unit of decomposition work: one factor (``"layer/A"``), or a layer's two factors in ``mode="memory"``.

    Attributes
    ----------
    name : str
        ``"<layer>/A"``, ``"<layer>/G"``, or the layer name (``mode="memory"``).
    cost : float
        Estimated flops of one decomposition round of its factors (:func:`decomposition_cost`).
    """

    name: str
    cost: float


class AssignmentPolicy(abc.ABC):
    """Places each :class:`WorkItem` on one rank.  Must be deterministic: every rank calls it with the same input."""

    @abc.abstractmethod
    def assign(self, items: Sequence[WorkItem], loads: Sequence[float]) -> list[int]:
        """Owner rank of each item.

        Parameters
        ----------
        items : sequence of WorkItem
            The factors (or layers) to place, in layer order.
        loads : sequence of float
            The cost already placed on each rank (``len(loads)`` is the world size).

        Returns
        -------
        list of int
            ``owners[i]`` in ``[0, len(loads))`` for ``items[i]``.
        """


class GreedyAssignment(AssignmentPolicy):
    """Longest processing time first: the costliest item goes to the least-loaded rank (ties: lowest rank).

    Within ``4/3`` of the optimal makespan (Graham 1969).
    """

    def assign(self, items: Sequence[WorkItem], loads: Sequence[float]) -> list[int]:  # noqa: D102
        loads = list(loads)
        owners = [0] * len(items)
        for i in sorted(range(len(items)), key=lambda i: (-items[i].cost, i)):
            rank = min(range(len(loads)), key=lambda p: (loads[p], p))
            owners[i] = rank
            loads[rank] += items[i].cost
        return owners


def decomposition_cost(factor: FactorState, increment_rank: int, *, oversample: int, n_iter: int) -> float:
    """Flops estimate of one decomposition of ``factor`` (algorithms.md §3, §4).

    ``d³`` for a dense ``eigh``; ``d²(r+l)(q+1)`` for a randomized one
    (``d³`` when ``r + l >= d``, where the exact solver is used); ``d(r+s)²``
    for a Brand update with an increment of rank ``s``; the sum of the last two
    for a Brand factor that also keeps the dense EA.
    """
    d, r = factor.dim, factor.rank
    randomized = float(min(d**3, d * d * (r + oversample) * (n_iter + 1)))
    brand = float(d * (r + increment_rank) ** 2)
    return {"dense": float(d**3), "randomized": randomized, "brand": brand, "brand+dense": brand + randomized}[factor.kind]


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
    """

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
        self.rank = dist.get_rank(group)
        self.world_size = dist.get_world_size(group)
        self.assignment = GreedyAssignment() if assignment is None else assignment
        self.average_gradients = bool(average_gradients)
        self.owners: dict[tuple[str, str], int] = {}  # (layer, "A"/"G") -> rank
        self._precomputed: dict[str, torch.Tensor] | None = None
        self._loads = [0.0] * self.world_size
        self._increment_rank: dict[str, int] = {}
        self._changed: list[tuple[KFACLayer, str]] = []
        self._tri_masks: dict[tuple[int, torch.device], torch.Tensor] = {}
        self._bytes_total = dict.fromkeys(BYTE_CATEGORIES, 0)
        self._bytes_step = dict.fromkeys(BYTE_CATEGORIES, 0)
        self._counts = {"decompositions": 0, "received": 0}
        self._comm_seconds = 0.0
        for layer in self.layers.values():
            layer.low_rank_grad = False
        self._check_config()

    # ------------------------------------------------------------------ configuration check
    def _fingerprint(self) -> dict[str, Any]:
        return {
            "world_size": self.world_size,
            "method": self.method,
            "layers": [(n, type(lay.module).__name__, lay.helper.a_dim, lay.helper.g_dim) for n, lay in self.layers.items()],
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

    def _check_config(self) -> None:
        mine = self._fingerprint()
        everyone: list[Any] = [None] * self.world_size
        dist.all_gather_object(everyone, mine, group=self.group)
        self._count("control", len(pickle.dumps(mine)) * self.world_size)
        diff = sorted({key for other in everyone for key in mine if other.get(key) != everyone[0].get(key)})
        if diff:
            detail = "; ".join(f"{key}: " + ", ".join(f"rank {p}={fp.get(key)!r}" for p, fp in enumerate(everyone)) for key in diff)
            raise ValueError(f"DistributedKFACPreconditioner: the ranks were configured differently ({detail})")

    # ------------------------------------------------------------------ step
    @torch.no_grad()
    def step(self) -> bool:
        """As :meth:`KFACPreconditioner.step`, with the statistics, decompositions and gradients synchronised.

        Returns
        -------
        bool
            False when the step was skipped for a non-finite gradient (on every rank alike).
        """
        self._bytes_step = dict.fromkeys(BYTE_CATEGORIES, 0)
        self._changed = []
        plan = self._plan(self.steps)
        t0 = self._timer()
        if plan.capture:
            self._sync_statistics(plan.ea, plan.brand)
        self._assign_new_layers()
        self._comm_seconds += self._timer() - t0
        return super().step()

    def _update_layer(self, layer: KFACLayer, plan: _Plan, lam: float, k: int) -> None:
        mine = {which: f for which, f in layer.factors() if self._owner(layer.name, which) == self.rank}
        others = [f for which, f in layer.factors() if which not in mine]
        before = {which: _version(f) for which, f in mine.items()}
        with _decompositions_disabled(others):  # their EA updates run; the owner decomposes (and broadcasts)
            super()._update_layer(layer, plan, lam, k)
        for which, f in mine.items():
            now, then = _version(f), before[which]
            if any(a is not b for a, b in zip(now[:2], then[:2])) or now[2:] != then[2:]:
                self._changed.append((layer, which))
            if now[0] is not then[0]:
                self._counts["decompositions"] += 1

    def _owner(self, name: str, which: str) -> int:
        """The rank that decomposes factor ``which`` of layer ``name`` (this rank before any assignment)."""
        return self.owners.get((name, which), self.rank)

    def _precondition_step(self, k: int, lam: float) -> bool:
        t0 = self._timer()
        plan = self._plan(k)
        if self.mode == "replicate" and (plan.decompose or plan.brand or plan.overwrite):
            self._broadcast_factors()
        if self.average_gradients:
            self._average_gradients()
        self._comm_seconds += self._timer() - t0
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
            if self._owner(layer.name, "A") == self.rank:
                out[layer.name] = super()._apply_layer(layer, g, lam, thin=False)
        t0 = self._timer()
        for layer, g in entries:
            owner = self.owners.get((layer.name, "A"))
            if owner is None:
                continue
            v = out[layer.name].contiguous() if owner == self.rank else torch.empty_like(g, memory_format=torch.contiguous_format)
            dist.broadcast(v, group=self.group, group_src=owner)
            self._count("preconditioned", v.numel() * v.element_size())
            out[layer.name] = v
        self._comm_seconds += self._timer() - t0
        return out

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

    # ------------------------------------------------------------------ statistics
    def _sync_statistics(self, ea: bool, brand: bool) -> None:
        """All-reduce the step's Grams, gather Brand rows to the owners; set global row/sample counts."""
        layers = list(self.layers.values())
        meta = [self.steps, int(ea), int(brand), len(layers)]
        for layer in layers:
            meta += [layer.a_rows_seen, layer.samples_seen]
            for which in ("A", "G"):
                f = getattr(layer, which)
                meta += [-1 if f is None else _KINDS.index(f.kind), -1 if f is None else f.dim]
                meta.append(0 if f is None else sum(r.shape[0] for r in f._rows))
        local = torch.tensor(meta, dtype=torch.int64, device=self._device())
        table = [torch.empty_like(local) for _ in range(self.world_size)]
        dist.all_gather(table, local, group=self.group)
        self._count("control", local.numel() * 8 * self.world_size)
        table_t = torch.stack(table).cpu()
        self._check_table(table_t, layers)
        per_layer = table_t[:, 4:].reshape(self.world_size, len(layers), 8)
        active = []
        for i, layer in enumerate(layers):
            rows = per_layer[:, i, 0].tolist()
            if sum(rows):
                self._increment_rank[layer.name] = sum(rows)
                active.append((i, layer))
        self._assign_new_layers()
        finish = []
        for i, layer in active:
            n_total = int(per_layer[:, i, 1].sum())
            weight = {"A": 1.0, "G": (layer.samples_seen / n_total) ** 2 if self.loss_reduction == "mean" else 1.0}
            for which, f in layer.factors():
                if ea and f.keeps_dense:
                    finish.append(self._reduce_gram(f, weight[which], self._owner(layer.name, which)))
                if brand and f.keeps_rows:
                    counts = per_layer[:, i, 4 if which == "A" else 7].tolist()
                    self._gather_rows(self._owner(layer.name, which), f, weight[which], counts)
            layer.a_rows_seen, layer.samples_seen = self._increment_rank[layer.name], n_total
        for done in finish:
            done()

    def _check_table(self, table: torch.Tensor, layers: list[KFACLayer]) -> None:
        """Every rank must be at the same step with the same plan, layers and factor kinds."""
        shape = table[:, :4]
        per = table[:, 4:].reshape(self.world_size, len(layers), 8)[:, :, [2, 3, 5, 6]]
        if bool((shape != shape[0]).any()) or bool((per != per[0]).any()):
            bad = [
                f"{layer.name}: kinds/dims " + ", ".join(f"rank {p}={per[p, i].tolist()}" for p in range(self.world_size))
                for i, layer in enumerate(layers)
                if bool((per[:, i] != per[0, i]).any())
            ]
            raise RuntimeError(
                "DistributedKFACPreconditioner: ranks disagree at this statistics step "
                f"(step/ea/brand/layers per rank: {shape.tolist()}; {'; '.join(bad) or 'layers agree'}); "
                "every rank must run the same model, method and schedule and capture every layer"
            )

    def _reduce_gram(self, f: FactorState, weight: float, owner: int) -> Callable[[], None]:
        """Start the all-reduce of ``weight · Gram`` (upper triangle; a reduce to ``owner`` in ``mode="memory"``).

        Returns the function that finishes it: the summed Gram becomes the
        factor's pending increment (in ``mode="memory"`` on ``owner`` only;
        the other ranks drop theirs and keep no EA).
        """
        gram = f._gram if f._gram is not None else torch.zeros(f.dim, f.dim, dtype=f.dtype, device=f.device)
        mask = self._tri_mask(f.dim, gram.device)
        packed = gram[mask]
        if weight != 1.0:
            packed.mul_(weight)
        if self.mode == "memory":
            work = dist.reduce(packed, group=self.group, group_dst=owner, async_op=True)
        else:
            work = dist.all_reduce(packed, group=self.group, async_op=True)
        self._count("statistics", packed.numel() * packed.element_size())

        def finish() -> None:
            work.wait()
            if self.mode == "memory" and owner != self.rank:
                f._gram = None
                return
            full = torch.zeros_like(gram)
            full[mask] = packed
            f._gram = full.add_(full.triu(1).T)

        return finish

    def _tri_mask(self, d: int, device: torch.device) -> torch.Tensor:
        key = (d, device)
        if key not in self._tri_masks:
            self._tri_masks[key] = torch.ones(d, d, dtype=torch.bool, device=device).triu_()
        return self._tri_masks[key]

    def _gather_rows(self, owner: int, f: FactorState, weight: float, counts: list[int]) -> None:
        """Gather every rank's ``sqrt(weight)``-scaled rows (padded to the longest) to rank ``owner``."""
        n_max = max(counts)
        rows = torch.cat(f._rows, 0) if f._rows else torch.zeros(0, f.dim, dtype=f.dtype, device=f.device)
        if weight != 1.0:
            rows = rows * weight**0.5
        padded = torch.zeros(n_max, f.dim, dtype=f.dtype, device=f.device)
        padded[: rows.shape[0]] = rows
        bucket = [torch.empty_like(padded) for _ in range(self.world_size)] if self.rank == owner else None
        dist.gather(padded, bucket, group=self.group, group_dst=owner)
        elem = padded.numel() * padded.element_size()
        self._count("brand_rows", elem * (self.world_size if self.rank == owner else 1))
        if bucket is not None:
            f._rows = [b[:c] for b, c in zip(bucket, counts) if c]

    # ------------------------------------------------------------------ assignment
    def _assign_new_layers(self) -> None:
        """Place the factors without an owner (a layer's factors together in ``mode="memory"``)."""
        new: dict[str, tuple[KFACLayer, list[tuple[str, FactorState]]]] = {}  # work item name -> layer, factors
        for layer in self.layers.values():
            for which, f in layer.factors():
                if (layer.name, which) in self.owners:
                    continue
                placed = [self.owners[(layer.name, w)] for w in ("A", "G") if (layer.name, w) in self.owners]
                if self.mode == "memory" and placed:  # the layer already has an owner
                    self.owners[(layer.name, which)] = placed[0]
                    continue
                name = layer.name if self.mode == "memory" else f"{layer.name}/{which}"
                new.setdefault(name, (layer, []))[1].append((which, f))
        if new:
            self._assign(new)
        if self.mode == "memory":
            for layer in self.layers.values():
                for which, f in layer.factors():
                    if self._owner(layer.name, which) != self.rank:
                        _release(f)

    def _assign(self, new: Mapping[str, tuple[KFACLayer, list[tuple[str, FactorState]]]]) -> None:
        items = []
        for name, (layer, factors) in new.items():
            s = self._increment_rank.get(layer.name, 0)
            items.append(WorkItem(name, sum(decomposition_cost(f, s, oversample=self.oversample, n_iter=self.n_iter) for _, f in factors)))
        owners = self.assignment.assign(items, list(self._loads))
        for item, owner in zip(items, owners):
            if not 0 <= owner < self.world_size:
                raise ValueError(f"{type(self.assignment).__name__} placed {item.name!r} on rank {owner}")
            layer, factors = new[item.name]
            for which, _ in factors:
                self.owners[(layer.name, which)] = owner
            self._loads[owner] += item.cost
        logger.debug("rank %d: factor owners %s", self.rank, self.owners)

    # ------------------------------------------------------------------ decompositions
    def _broadcast_factors(self) -> None:
        """Send the factors this rank updated; receive the others' (every rank ends with the same state)."""
        mine = []
        for layer, which in self._changed:
            sd = dict(getattr(layer, which).state_dict())
            sd["ea"] = None  # identical everywhere: all-reduced
            skeleton, tensors = _split_tensors(sd)
            mine.append((layer.name, which, skeleton, [(tuple(t.shape), t.dtype) for t in tensors], tensors))
        header = [m[:4] for m in mine]
        everyone: list[Any] = [None] * self.world_size
        dist.all_gather_object(everyone, header, group=self.group)
        self._count("control", len(pickle.dumps(header)) * self.world_size)
        for src, entries in enumerate(everyone):
            for j, (name, which, skeleton, specs) in enumerate(entries):
                f = getattr(self.layers[name], which)
                if src == self.rank:
                    tensors = mine[j][4]
                else:
                    tensors = [torch.empty(shape, dtype=dtype, device=f.device) for shape, dtype in specs]
                for t in tensors:
                    dist.broadcast(t, group=self.group, group_src=src)
                    self._count("decompositions", t.numel() * t.element_size())
                if src != self.rank:
                    ea = f.ea
                    f.load_state_dict(_fill_tensors(skeleton, tensors))
                    f.ea = ea
                    self._counts["received"] += 1

    # ------------------------------------------------------------------ gradients
    def _average_gradients(self) -> None:
        grads = [p.grad for p in self.model.parameters() if p.grad is not None]
        sizes = torch.tensor([sum(g.numel() for g in grads)] * 2, dtype=torch.int64, device=self._device())
        sizes[1].neg_()
        dist.all_reduce(sizes, op=dist.ReduceOp.MAX, group=self.group)
        self._count("control", 16)
        if int(sizes[0]) != -int(sizes[1]):
            raise RuntimeError(
                "DistributedKFACPreconditioner: the ranks hold gradients of different sizes "
                f"(between {-int(sizes[1])} and {int(sizes[0])} elements); every rank must back-propagate the same parameters"
            )
        if not grads:
            return
        flat = torch.cat([g.reshape(-1) for g in grads])
        dist.all_reduce(flat, group=self.group)
        flat.div_(self.world_size)
        self._count("gradients", flat.numel() * flat.element_size())
        offset = 0
        for g in grads:
            g.copy_(flat[offset : offset + g.numel()].view_as(g))
            offset += g.numel()

    # ------------------------------------------------------------------ bookkeeping
    def _device(self) -> torch.device:
        """Where collectives' small tensors live: the model's device (NCCL needs CUDA tensors)."""
        return next(iter(self.layers.values())).module.weight.device

    def _factor_bytes(self) -> int:
        """Bytes of the factor tensors this rank holds (a tensor shared by snapshot and Brand state counted once)."""
        held: dict[int, int] = {}
        for layer in self.layers.values():
            for _, f in layer.factors():
                for t in _held_tensors(f):
                    held[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
        return sum(held.values())

    def _count(self, category: str, nbytes: int) -> None:
        self._bytes_step[category] += nbytes
        self._bytes_total[category] += nbytes

    def state_dict(self) -> dict[str, Any]:
        """As :meth:`KFACPreconditioner.state_dict`; in ``mode="memory"`` collective, and complete on rank 0 only.

        In ``mode="memory"`` every rank must call it: each owner sends its
        factors' state to rank 0 (point to point), so only rank 0 holds the
        whole state, transiently; the other ranks return their own factors.
        """
        sd = super().state_dict()
        if self.mode != "memory":
            return sd
        for name, layer_sd in sd["layers"].items():
            for which in ("A", "G"):
                owner = self.owners.get((name, which), 0)
                if owner == 0 or layer_sd[which] is None or self.rank not in (0, owner):
                    continue
                box = [layer_sd[which]]
                if self.rank == owner:
                    dist.send_object_list(box, group=self.group, group_dst=0)
                else:
                    dist.recv_object_list(box, group=self.group, group_src=owner)
                    layer_sd[which] = box[0]
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
            (payload bytes per category of :data:`BYTE_CATEGORIES`: the
            all-reduced or broadcast buffers, the rows sent to a gather and,
            at its root, received) and ``communication_seconds``.
        """
        out = super().stats()
        out["distributed"] = {
            "rank": self.rank,
            "world_size": self.world_size,
            "mode": self.mode,
            "owners": _nested(self.owners),
            "factor_bytes": self._factor_bytes(),
            "decompositions": self._counts["decompositions"],
            "received": self._counts["received"],
            "bytes_last_step": dict(self._bytes_step),
            "bytes_total": dict(self._bytes_total),
            "communication_seconds": self._comm_seconds,
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


def _release(f: FactorState) -> None:
    """Drop a factor's EA, snapshot and Brand state (``mode="memory"``, a factor another rank owns)."""
    f.ea = None
    f.eigen = None
    if hasattr(f, "brand"):
        f.brand = None


def _held_tensors(f: FactorState) -> list[torch.Tensor]:
    """The tensors a factor keeps between steps: EA, snapshot, Brand state."""
    out = [f.ea] if f.ea is not None else []
    for lr in (None if f.eigen is None else f.eigen.approx, getattr(f, "brand", None)):
        if lr is not None:
            out += [lr.eigvecs, lr.eigvals]
    return out


def _nested(owners: Mapping[tuple[str, str], int]) -> dict[str, dict[str, int]]:
    """``{(layer, which): rank}`` as ``{layer: {which: rank}}``."""
    out: dict[str, dict[str, int]] = {}
    for (name, which), rank in owners.items():
        out.setdefault(name, {})[which] = rank
    return out


def _version(f: FactorState) -> tuple[Any, ...]:
    """What an owner's update may change: snapshot and Brand state (compared by identity), rank, skips, errors."""
    return (f.eigen, getattr(f, "brand", None), f.rank, tuple(f.skipped.values()), len(f.errors))


@dataclass(frozen=True)
class _TensorSlot:
    index: int


def _split_tensors(obj: Any) -> tuple[Any, list[torch.Tensor]]:
    """Replace the tensors of a nested dict/list by slots; the same tensor object gets one slot."""
    tensors: list[torch.Tensor] = []
    seen: dict[int, int] = {}

    def walk(x: Any) -> Any:
        if isinstance(x, torch.Tensor):
            if id(x) not in seen:
                seen[id(x)] = len(tensors)
                tensors.append(x.contiguous())
            return _TensorSlot(seen[id(x)])
        if isinstance(x, Mapping):
            return {k: walk(v) for k, v in x.items()}
        if isinstance(x, (list, tuple)):
            return type(x)(walk(v) for v in x)
        return x

    return walk(obj), tensors


def _fill_tensors(obj: Any, tensors: list[torch.Tensor]) -> Any:
    """Inverse of :func:`_split_tensors`."""
    if isinstance(obj, _TensorSlot):
        return tensors[obj.index]
    if isinstance(obj, Mapping):
        return {k: _fill_tensors(v, tensors) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return type(obj)(_fill_tensors(v, tensors) for v in obj)
    return obj
