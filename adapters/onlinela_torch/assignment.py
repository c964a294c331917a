r"""Which rank decomposes which factor: work items, placement policies, and a distributed preconditioner's owner table.

:class:`~onlinela_torch.DistributedKFACPreconditioner` splits its
decompositions across ranks.  The unit of work is a :class:`WorkItem` (one
factor, or one layer's two factors in ``mode="memory"``) whose cost is
:func:`decomposition_cost`; an :class:`AssignmentPolicy` (default
:class:`GreedyAssignment`) places new items on ranks; :class:`FactorPlacement`
keeps the resulting owner table, the load placed on each rank and the global
increment rank of each layer.  Nothing here communicates: every rank computes
the same table from the same input.
"""

from __future__ import annotations

import abc
import logging
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

from .factors import FactorState
from .layer import KFACLayer

__all__ = ["AssignmentPolicy", "FactorPlacement", "GreedyAssignment", "WorkItem", "decomposition_cost"]

logger = logging.getLogger(__name__)

#: Layer name -> (layer, its factors ``[("A", f), ("G", f)]`` that one work item places together).
_NewItems = Mapping[str, tuple[KFACLayer, list[tuple[str, FactorState]]]]


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


class FactorPlacement:
    """The owner table of a distributed preconditioner: which rank decomposes each factor.

    Factors are placed once, when they first exist (a layer gets its
    factors at its first statistics step), by ``policy`` on the costs of
    :func:`decomposition_cost`; the placement never moves afterwards.

    Parameters
    ----------
    policy : AssignmentPolicy
        Places the new work items.
    rank, world_size : int
        This rank and the number of ranks ``P``.
    mode : {"replicate", "memory"}
        ``"replicate"``: one work item per factor.  ``"memory"``: one per
        layer (its two factors on one rank); the factors another rank owns
        are released here (EA, snapshot and Brand state dropped).
    oversample, n_iter : int
        The randomized decomposition's settings, for the costs.

    Attributes
    ----------
    owners : dict of (str, str) to int
        ``(layer, "A" or "G")`` to the owner rank.
    loads : list of float
        Flops placed on each rank so far (length ``P``).
    increment_rank : dict of str to int
        Layer name to the rows of its last statistics step over all ranks
        (the ``s`` of a Brand update's cost).
    """

    def __init__(self, policy: AssignmentPolicy, rank: int, world_size: int, mode: str, *, oversample: int, n_iter: int) -> None:
        self.policy = policy
        self.rank = rank
        self.world_size = world_size
        self.mode = mode
        self.oversample = oversample
        self.n_iter = n_iter
        self.owners: dict[tuple[str, str], int] = {}
        self.loads = [0.0] * world_size
        self.increment_rank: dict[str, int] = {}

    def owner(self, name: str, which: str) -> int:
        """The rank that decomposes factor ``which`` of layer ``name`` (this rank before any assignment)."""
        return self.owners.get((name, which), self.rank)

    def place_new(self, layers: Mapping[str, KFACLayer]) -> None:
        """Place the factors without an owner (a layer's factors together in ``mode="memory"``).

        Cost: ``O(L log L)`` for ``L`` new work items (the policy's sort); no communication.
        """
        new: dict[str, tuple[KFACLayer, list[tuple[str, FactorState]]]] = {}  # work item name -> layer, factors
        for layer in layers.values():
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
            for layer in layers.values():
                for which, f in layer.factors():
                    if self.owner(layer.name, which) != self.rank:
                        _release(f)

    def _assign(self, new: _NewItems) -> None:
        items = []
        for name, (layer, factors) in new.items():
            s = self.increment_rank.get(layer.name, 0)
            items.append(WorkItem(name, sum(decomposition_cost(f, s, oversample=self.oversample, n_iter=self.n_iter) for _, f in factors)))
        owners = self.policy.assign(items, list(self.loads))
        for item, owner in zip(items, owners):
            if not 0 <= owner < self.world_size:
                raise ValueError(f"{type(self.policy).__name__} placed {item.name!r} on rank {owner}")
            layer, factors = new[item.name]
            for which, _ in factors:
                self.owners[(layer.name, which)] = owner
            self.loads[owner] += item.cost
        logger.debug("rank %d: factor owners %s", self.rank, self.owners)

    def nested(self) -> dict[str, dict[str, int]]:
        """The owner table as ``{layer: {"A": rank, "G": rank}}``."""
        out: dict[str, dict[str, int]] = {}
        for (name, which), rank in self.owners.items():
            out.setdefault(name, {})[which] = rank
        return out


def _release(f: FactorState) -> None:
    """Drop a factor's EA, snapshot and Brand state (``mode="memory"``, a factor another rank owns)."""
    f.ea = None
    f.eigen = None
    if hasattr(f, "brand"):
        f.brand = None
