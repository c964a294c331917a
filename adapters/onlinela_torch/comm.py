r"""The collectives of a distributed K-FAC preconditioner, and the bytes they move.

:class:`Communicator` owns the ``torch.distributed`` calls of
:class:`~onlinela_torch.DistributedKFACPreconditioner` (its
:class:`StatisticsSync` those of the statistics) and counts the payload bytes
of each (:data:`BYTE_CATEGORIES`) and the seconds spent in them.  For
``P`` ranks, ``L`` layers, a factor of dimension ``d`` and rank ``r``, and
``n_p`` rows on rank ``p``, the payload per rank is:

* :meth:`Communicator.check_config`: ``all_gather_object`` of the settings (one pickled dict).
* :meth:`StatisticsSync.sync`: ``all_gather`` of a step table
  (``8(4 + 8L)`` bytes), then per factor an ``all_reduce`` (a ``reduce`` to
  the owner in ``mode="memory"``) of the Gram's upper triangle (``d(d+1)/2``
  elements) or a ``gather`` of the Brand rows to the owner (``max_p n_p · d``
  elements, ``P`` times that received at the root).
* :meth:`Communicator.broadcast_factors`: ``all_gather_object`` of the
  headers, then one ``broadcast`` per tensor of each new factor state
  (``≈ d·r`` elements per factor).
* :meth:`Communicator.average_gradients`: ``all_reduce`` of the sizes (16
  bytes), then of every gradient flattened into one buffer.
* :meth:`Communicator.broadcast_preconditioned` (``mode="memory"``): one
  ``broadcast`` per layer from its owner (``d_G · d_A`` elements).
* :meth:`Communicator.collect_state` (``mode="memory"``): ``send``/``recv``
  of the pickled factor states from their owners to rank 0.
"""

from __future__ import annotations

import contextlib
import pickle
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist

from .assignment import FactorPlacement
from .blocks.kronecker import FactorSlot
from .factors import FactorState
from .layer import KFACLayer

__all__ = ["BYTE_CATEGORIES", "Communicator", "StatisticsSync", "held_bytes"]

#: Categories of :meth:`DistributedKFACPreconditioner.stats` ``["distributed"]["bytes"]``.
BYTE_CATEGORIES = ("control", "statistics", "brand_rows", "decompositions", "gradients", "preconditioned")
_KINDS = ("dense", "randomized", "brand", "brand+dense")


class Communicator:
    """The collectives of a distributed preconditioner over one process group, with byte and time counters.

    Every method is collective: all ranks of ``group`` call it in the same
    order with matching arguments.

    Parameters
    ----------
    group : ProcessGroup or None
        The process group (None: the world group); must be initialised.
    mode : {"replicate", "memory"}
        ``"memory"``: the Grams are *reduced* to their owner only, and the
        non-owners drop theirs.
    timer : callable
        Returns seconds; measures :attr:`seconds` (the preconditioner's timer).

    Attributes
    ----------
    rank, world_size : int
        This rank in ``group`` and the group's size ``P``.
    bytes_step, bytes_total : dict of str to int
        Payload bytes per category of :data:`BYTE_CATEGORIES` in the current
        step and since construction.
    received : int
        Factor states received from their owners.
    seconds : float
        Seconds spent in :meth:`timed` blocks.
    """

    def __init__(self, group: Any, mode: str, timer: Callable[[], float]) -> None:
        self.group = group
        self.mode = mode
        self.rank = dist.get_rank(group)
        self.world_size = dist.get_world_size(group)
        self._timer = timer
        self.bytes_total = dict.fromkeys(BYTE_CATEGORIES, 0)
        self.bytes_step = dict.fromkeys(BYTE_CATEGORIES, 0)
        self.received = 0
        self.seconds = 0.0

    # ------------------------------------------------------------------ bookkeeping
    def new_step(self) -> None:
        """Start counting the bytes of a new step."""
        self.bytes_step = dict.fromkeys(BYTE_CATEGORIES, 0)

    def count(self, category: str, nbytes: int) -> None:
        """Add ``nbytes`` payload bytes to ``category`` (one of :data:`BYTE_CATEGORIES`)."""
        self.bytes_step[category] += nbytes
        self.bytes_total[category] += nbytes

    @contextlib.contextmanager
    def timed(self) -> Iterator[None]:
        """Add the block's duration to :attr:`seconds` (not when it raises)."""
        t0 = self._timer()
        yield
        self.seconds += self._timer() - t0

    def stats(self) -> dict[str, Any]:
        """``received``, ``bytes_last_step``, ``bytes_total`` and ``communication_seconds``."""
        return {
            "received": self.received,
            "bytes_last_step": dict(self.bytes_step),
            "bytes_total": dict(self.bytes_total),
            "communication_seconds": self.seconds,
        }

    # ------------------------------------------------------------------ configuration check
    def check_config(self, mine: Mapping[str, Any]) -> None:
        """Gather every rank's settings (``all_gather_object``); ValueError naming each setting that differs.

        Payload: the pickled ``mine`` from each rank (counted as ``P ×`` this rank's).
        """
        everyone: list[Any] = [None] * self.world_size
        dist.all_gather_object(everyone, mine, group=self.group)
        self.count("control", len(pickle.dumps(mine)) * self.world_size)
        diff = sorted({key for other in everyone for key in mine if other.get(key) != everyone[0].get(key)})
        if diff:
            detail = "; ".join(f"{key}: " + ", ".join(f"rank {p}={fp.get(key)!r}" for p, fp in enumerate(everyone)) for key in diff)
            raise ValueError(f"DistributedKFACPreconditioner: the ranks were configured differently ({detail})")

    # ------------------------------------------------------------------ decompositions
    def broadcast_factors(self, layers: Mapping[str, KFACLayer], changed: list[tuple[KFACLayer, str]]) -> None:
        """Send the factors this rank updated; receive the others' (every rank ends with the same state).

        One ``all_gather_object`` of the headers (layer, factor, state
        skeleton, tensor shapes), then one ``broadcast`` per tensor of each
        changed factor's state, from its owner (``≈ d·r`` elements per
        factor; the EA is not sent, it is identical everywhere).

        Parameters
        ----------
        layers : mapping of str to KFACLayer
            Every preconditioned layer, by name.
        changed : list of (KFACLayer, str)
            The ``(layer, "A" or "G")`` factors whose state this rank changed this step.
        """
        mine = []
        for layer, which in changed:
            sd = dict(getattr(layer, which).state_dict())
            sd["ea"] = None  # identical everywhere: all-reduced
            skeleton, tensors = _split_tensors(sd)
            mine.append((layer.name, which, skeleton, [(tuple(t.shape), t.dtype) for t in tensors], tensors))
        header = [m[:4] for m in mine]
        everyone: list[Any] = [None] * self.world_size
        dist.all_gather_object(everyone, header, group=self.group)
        self.count("control", len(pickle.dumps(header)) * self.world_size)
        for src, entries in enumerate(everyone):
            for j, (name, which, skeleton, specs) in enumerate(entries):
                f = getattr(layers[name], which)
                if src == self.rank:
                    tensors = mine[j][4]
                else:
                    tensors = [torch.empty(shape, dtype=dtype, device=f.device) for shape, dtype in specs]
                for t in tensors:
                    dist.broadcast(t, group=self.group, group_src=src)
                    self.count("decompositions", t.numel() * t.element_size())
                if src != self.rank:
                    ea = f.ea
                    f.load_state_dict(_fill_tensors(skeleton, tensors))
                    f.ea = ea
                    self.received += 1

    # ------------------------------------------------------------------ gradients
    def average_gradients(self, params: Iterable[torch.nn.Parameter], device: torch.device) -> None:
        """Average the ``p.grad`` of ``params`` over the ranks, in place.

        An ``all_reduce`` (MAX) of two int64 (the gradient sizes: RuntimeError
        when the ranks differ), then one ``all_reduce`` of every gradient
        flattened into one buffer.
        """
        grads = [p.grad for p in params if p.grad is not None]
        sizes = torch.tensor([sum(g.numel() for g in grads)] * 2, dtype=torch.int64, device=device)
        sizes[1].neg_()
        dist.all_reduce(sizes, op=dist.ReduceOp.MAX, group=self.group)
        self.count("control", 16)
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
        self.count("gradients", flat.numel() * flat.element_size())
        offset = 0
        for g in grads:
            g.copy_(flat[offset : offset + g.numel()].view_as(g))
            offset += g.numel()

    # ------------------------------------------------------------------ mode="memory"
    def broadcast_preconditioned(
        self, entries: list[tuple[KFACLayer, torch.Tensor]], out: dict[str, torch.Tensor], placement: FactorPlacement
    ) -> dict[str, torch.Tensor]:
        """Broadcast each layer's preconditioned gradient from its owner, in layer order (timed).

        Parameters
        ----------
        entries : list of (KFACLayer, Tensor)
            The layers and their gradient matrices ``(d_G, d_A)``, the same on every rank.
        out : dict of str to Tensor
            The results of the layers this rank owns; completed in place with
            the others' (``d_G · d_A`` elements per layer with an owner).
        placement : FactorPlacement
            The owners; a layer without one is left out.

        Returns
        -------
        dict of str to Tensor
            ``out``.
        """
        with self.timed():
            for layer, g in entries:
                owner = placement.owners.get((layer.name, "A"))
                if owner is None:
                    continue
                v = out[layer.name].contiguous() if owner == self.rank else torch.empty_like(g, memory_format=torch.contiguous_format)
                dist.broadcast(v, group=self.group, group_src=owner)
                self.count("preconditioned", v.numel() * v.element_size())
                out[layer.name] = v
        return out

    def collect_state(self, layer_states: dict[str, dict[str, Any]], placement: FactorPlacement) -> None:
        """Send each factor's state from its owner to rank 0 (point to point), in place in ``layer_states``.

        Parameters
        ----------
        layer_states : dict of str to dict
            The ``"layers"`` entry of a :meth:`~onlinela_torch.KFACPreconditioner.state_dict`;
            on rank 0, its ``"A"``/``"G"`` entries are replaced by the owners'.
        placement : FactorPlacement
            The owners (a factor without one stays as it is).
        """
        for name, layer_sd in layer_states.items():
            for which in ("A", "G"):
                owner = placement.owners.get((name, which), 0)
                if owner == 0 or layer_sd[which] is None or self.rank not in (0, owner):
                    continue
                box = [layer_sd[which]]
                if self.rank == owner:
                    dist.send_object_list(box, group=self.group, group_dst=0)
                else:
                    dist.recv_object_list(box, group=self.group, group_src=owner)
                    layer_sd[which] = box[0]


class StatisticsSync:
    """The statistics exchange of a distributed preconditioner: Grams all-reduced, Brand rows gathered to the owners.

    Parameters
    ----------
    comm : Communicator
        Its group, mode and byte counters (category ``"statistics"`` for the
        Grams, ``"brand_rows"`` for the rows, ``"control"`` for the step table).
    """

    def __init__(self, comm: Communicator) -> None:
        self.comm = comm
        self._tri_masks: dict[tuple[int, torch.device], torch.Tensor] = {}

    def sync(
        self,
        layers: Mapping[str, KFACLayer],
        placement: FactorPlacement,
        *,
        step: int,
        ea: bool,
        brand: bool,
        loss_reduction: str,
        device: torch.device,
    ) -> None:
        """All-reduce the step's Grams, gather Brand rows to the owners; set global row/sample counts.

        First an ``all_gather`` of a table of ``4 + 8L`` int64 per rank (step,
        plan, and per layer its rows, samples, factor kinds, dimensions and
        pending rows) checks that the ranks agree (:meth:`_check_table`); new
        factors are then placed (``placement``), and each factor's statistics
        are sent: ``d(d+1)/2`` elements (``all_reduce``, asynchronous, all
        started before any is waited for) for a dense EA, ``max_p n_p · d``
        (``gather`` to the owner) for Brand rows.

        Parameters
        ----------
        layers : mapping of str to KFACLayer
            Every preconditioned layer, in the same order on every rank.
        placement : FactorPlacement
            Gets each active layer's global increment rank and places new factors.
        step : int
            The preconditioner's step (checked equal on every rank).
        ea, brand : bool
            Whether this step updates the dense EAs / the Brand factors.
        loss_reduction : {"mean", "sum"}
            ``"mean"``: a rank's ``G`` statistics are weighted by
            ``(n_p / n)²`` so that their sum is the global batch's.
        device : torch.device
            Where the step table lives (NCCL needs CUDA tensors).
        """
        layer_list = list(layers.values())
        meta = [step, int(ea), int(brand), len(layer_list)]
        for layer in layer_list:
            meta += [layer.a_rows_seen, layer.samples_seen]
            for which in ("A", "G"):
                f = getattr(layer, which)
                meta += [-1 if f is None else _KINDS.index(f.kind), -1 if f is None else f.dim]
                meta.append(0 if f is None else sum(r.shape[0] for r in f._rows))
        local = torch.tensor(meta, dtype=torch.int64, device=device)
        table = [torch.empty_like(local) for _ in range(self.comm.world_size)]
        dist.all_gather(table, local, group=self.comm.group)
        self.comm.count("control", local.numel() * 8 * self.comm.world_size)
        table_t = torch.stack(table).cpu()
        self._check_table(table_t, layer_list)
        per_layer = table_t[:, 4:].reshape(self.comm.world_size, len(layer_list), 8)
        active = []
        for i, layer in enumerate(layer_list):
            rows = per_layer[:, i, 0].tolist()
            if sum(rows):
                placement.increment_rank[layer.name] = sum(rows)
                active.append((i, layer))
        placement.place_new(layers)
        finish = []
        for i, layer in active:
            n_total = int(per_layer[:, i, 1].sum())
            weight = {"A": 1.0, "G": (layer.samples_seen / n_total) ** 2 if loss_reduction == "mean" else 1.0}
            for which, f in layer.factors():
                if ea and f.keeps_dense:
                    finish.append(self._reduce_gram(f, weight[which], placement.owner(layer.name, which)))
                if brand and f.keeps_rows:
                    counts = per_layer[:, i, 4 if which == "A" else 7].tolist()
                    self._gather_rows(placement.owner(layer.name, which), f, weight[which], counts)
            layer.a_rows_seen, layer.samples_seen = placement.increment_rank[layer.name], n_total
        for done in finish:
            done()

    def average_blocks(self, blocks: Mapping[str, Any], device: torch.device, warn: Callable[..., Any]) -> None:
        """Replace every curvature block's pending statistics by their mean over the ranks (one ``all_reduce``).

        The holders (:meth:`~onlinela_torch.CurvatureBlock.statistics_holders`,
        in block order) carry a pending Gram (a block factor's ``d × d``) or a
        pending small tensor (a diagonal / per-channel statistic).  Each block
        scales its pending sums by its local rows and loss terms, so with equal
        shards the mean over ranks is the global batch's increment; unequal
        loss terms are warned (``blocks_unequal_shards``) and averaged all the
        same.  First an ``all_gather`` of a table (``8(H + B)`` bytes: a
        pending flag per holder, the loss terms per block) says which holders
        any rank filled; those are sent as one flat buffer of their elements
        (zeros where a rank has none).  RuntimeError when a block factor
        exists on some ranks only or keeps Brand rows.
        """
        holders = [(name, h) for name, b in blocks.items() for h in b.statistics_holders()]
        if not holders:
            return
        pending = [_pending_tensor(name, h) for name, h in holders]
        meta = [int(t is not None) for t in pending] + [int(b._terms) for b in blocks.values()]
        local = torch.tensor(meta, dtype=torch.int64, device=device)
        table = [torch.empty_like(local) for _ in range(self.comm.world_size)]
        dist.all_gather(table, local, group=self.comm.group)
        self.comm.count("control", local.numel() * 8 * self.comm.world_size)
        t = torch.stack(table).cpu()
        terms = t[:, len(holders):]
        if bool((terms != terms[0]).any()):
            warn("blocks_unequal_shards", "curvature blocks saw different numbers of loss terms per rank (%s); their "
                 "statistics are averaged as if the shards were equal", terms.tolist())
        chosen = [i for i in range(len(holders)) if bool(t[:, i].any())]
        if not chosen:
            return
        parts = []
        for i in chosen:
            h = holders[i][1]
            mine = pending[i] if pending[i] is not None else torch.zeros(_holder_shape(h), dtype=_holder_dtype(h), device=device)
            parts.append(mine.reshape(-1))
        flat = torch.cat([q.to(parts[0].dtype) for q in parts])
        dist.all_reduce(flat, group=self.comm.group)
        self.comm.count("statistics", flat.numel() * flat.element_size())
        flat.div_(self.comm.world_size)
        offset = 0
        for i, q in zip(chosen, parts):
            name, h = holders[i]
            value = flat[offset : offset + q.numel()].reshape(_holder_shape(h)).to(_holder_dtype(h))
            offset += q.numel()
            _set_pending(name, h, value.clone())

    def _check_table(self, table: torch.Tensor, layers: list[KFACLayer]) -> None:
        """Every rank must be at the same step with the same plan, layers and factor kinds."""
        shape = table[:, :4]
        per = table[:, 4:].reshape(self.comm.world_size, len(layers), 8)[:, :, [2, 3, 5, 6]]
        if bool((shape != shape[0]).any()) or bool((per != per[0]).any()):
            bad = [
                f"{layer.name}: kinds/dims " + ", ".join(f"rank {p}={per[p, i].tolist()}" for p in range(self.comm.world_size))
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
        if self.comm.mode == "memory":
            work = dist.reduce(packed, group=self.comm.group, group_dst=owner, async_op=True)
        else:
            work = dist.all_reduce(packed, group=self.comm.group, async_op=True)
        self.comm.count("statistics", packed.numel() * packed.element_size())

        def finish() -> None:
            work.wait()
            if self.comm.mode == "memory" and owner != self.comm.rank:
                f._gram = None
                return
            full = torch.zeros_like(gram)
            full[mask] = packed
            f._gram = full.add_(full.triu(1).T)

        return finish

    def _tri_mask(self, d: int, device: torch.device) -> torch.Tensor:
        """The cached ``d × d`` boolean upper-triangle mask (diagonal included) on ``device``."""
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
        bucket = [torch.empty_like(padded) for _ in range(self.comm.world_size)] if self.comm.rank == owner else None
        dist.gather(padded, bucket, group=self.comm.group, group_dst=owner)
        elem = padded.numel() * padded.element_size()
        self.comm.count("brand_rows", elem * (self.comm.world_size if self.comm.rank == owner else 1))
        if bucket is not None:
            f._rows = [b[:c] for b, c in zip(bucket, counts) if c]


def _pending_tensor(block: str, holder: Any) -> torch.Tensor | None:
    """A statistics holder's pending increment: a block factor's Gram, or a small tensor's pending sum."""
    if not isinstance(holder, FactorSlot):
        return holder.pending
    f = holder.state
    if f is not None and f.keeps_rows and not f.keeps_dense:
        raise RuntimeError(f"block {block!r}: factor {holder.name} keeps Brand rows, which cannot be averaged over ranks")
    return None if f is None else f._gram


def _holder_shape(holder: Any) -> tuple[int, ...]:
    return (holder.dim, holder.dim) if isinstance(holder, FactorSlot) else tuple(holder.shape)


def _holder_dtype(holder: Any) -> torch.dtype:
    return holder.ctx.factor_dtype if isinstance(holder, FactorSlot) else holder.dtype


def _set_pending(block: str, holder: Any, value: torch.Tensor) -> None:
    if not isinstance(holder, FactorSlot):
        holder.pending = value
        return
    if holder.state is None:
        raise RuntimeError(f"block {block!r}: factor {holder.name} captured statistics on some ranks only; every "
                           "rank must run the same forward and backward")
    holder.state._gram = value


def held_bytes(layers: Iterable[KFACLayer]) -> int:
    """Bytes of the factor tensors held by ``layers`` (a tensor shared by snapshot and Brand state counted once)."""
    held: dict[int, int] = {}
    for layer in layers:
        for _, f in layer.factors():
            for t in _held_tensors(f):
                held[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
    return sum(held.values())


def _held_tensors(f: FactorState) -> list[torch.Tensor]:
    """The tensors a factor keeps between steps: EA, snapshot, Brand state."""
    out = [f.ea] if f.ea is not None else []
    for lr in (None if f.eigen is None else f.eigen.approx, getattr(f, "brand", None)):
        if lr is not None:
            out += [lr.eigvecs, lr.eigvals]
    return out


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
