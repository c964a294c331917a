"""Factor creation for :class:`~onlinela_torch.KFACPreconditioner`: strategy, Brand eligibility, seeding.

:class:`FactorFactory` builds each factor of the method's strategy
(:mod:`onlinela_torch.factors`) the first time statistics arrive, when the
increment rank ``s`` that decides Brand eligibility is known.  For the Brand
methods a factor keeps Brand updates only where they reduce the dimension
(``r + s < d``) and, with ``BrandConfig.cost``, are cheaper per step than the
dense EA + randomized fallback; the choices are counted in
:attr:`FactorFactory.brand_choice` (``stats()["brand"]``) and logged on the
preconditioner's logger (at INFO the first time in the process for each
reason, at DEBUG after that).  Every factor has its own random stream, seeded
from ``seed`` and the layer index (or block name).
"""

from __future__ import annotations

import logging
import zlib
from collections import Counter
from collections.abc import Callable

import numpy as np
import torch

from .factors import BrandDenseFactor, BrandFactor, DenseFactor, FactorState, RandomizedFactor, fallback_takes_eigh
from .layer import KFACLayer
from .logs import WarningCounter
from .methods import StepSchedule
from .options import KFACOptions

__all__ = ["FactorFactory"]

#: fallback reasons already logged at INFO in this process (later ones go to DEBUG; all are counted)
_REPORTED: set[str] = set()


class FactorFactory:
    """Builds the factors of one preconditioner.

    Parameters
    ----------
    options : KFACOptions
    schedule : StepSchedule
        ``T_updt``, ``T_inv``, ``T_B`` at step 0 enter the Brand cost rule.
    warn : WarningCounter
        Shared with the factors (skipped updates are warned and counted); its
        logger (the preconditioner's) also gets the INFO / DEBUG lines.
    kind_for : callable (dim, s) -> str
        The strategy of a new factor; the preconditioner passes its (overridable)
        ``_kind_for``, whose default is :meth:`default_kind`.

    Attributes
    ----------
    brand_choice : Counter
        Brand methods: factors kept by Brand updates (``"brand"``), by the
        randomized fallback because ``r + s >= d`` (``"randomized_rank"``) or
        because of the cost model (``"randomized_cost"``); factors restored
        from a checkpoint count under ``"brand"`` or ``"randomized_restored"``,
        block factors kept dense for a distributed preconditioner under
        ``"randomized_distributed"``.
    """

    def __init__(
        self, options: KFACOptions, schedule: StepSchedule, warn: WarningCounter, kind_for: Callable[[int, int], str]
    ) -> None:
        self.options = options
        self.schedule = schedule
        self.warn = warn
        self.kind_for = kind_for
        self.brand_choice: Counter[str] = Counter()
        #: curvature blocks get dense-keeping factors only (set by the distributed preconditioner)
        self.dense_blocks = False

    def for_layer(self, layer: KFACLayer, which: str, s: int, kind: str | None = None) -> FactorState:
        """The layer's ``which`` factor, created on first use (Brand eligibility needs ``s``)."""
        f = getattr(layer, which)
        if f is not None:
            return f
        dim = layer.helper.a_dim if which == "A" else layer.helper.g_dim
        rng = np.random.default_rng(np.random.SeedSequence(self.options.seed, spawn_key=(layer.index, int(which == "G"))))
        f = self.new(dim, f"{layer.name or '<model>'}/{which}", s, layer.module.weight.device, rng, kind)
        setattr(layer, which, f)
        return f

    def for_block(self, dim: int, name: str, *, rows: int, device: torch.device, kind: str | None = None) -> FactorState:
        """The :class:`~onlinela_torch.blocks.FactorMaker` of the curvature blocks: this method's strategy.

        With :attr:`dense_blocks` a Brand kind becomes ``"randomized"``
        (counted as ``"randomized_distributed"``): averaged block statistics
        are Gram matrices, not rows; a checkpoint's Brand kind is then a
        ValueError (a Brand-only state has no dense EA to continue from).
        """
        rng = np.random.default_rng(np.random.SeedSequence(self.options.seed, spawn_key=(zlib.crc32(name.encode()),)))
        if self.dense_blocks and kind in ("brand", "brand+dense"):
            raise ValueError(f"block factor {name!r} was saved with a Brand state ({kind!r}), but a distributed "
                             "preconditioner keeps block factors dense; load the checkpoint into a single-process one")
        if kind is None and self.dense_blocks:
            kind = self.kind_for(dim, rows)
            if kind in ("brand", "brand+dense"):  # counted as "brand" by kind_for: recount it
                self.brand_choice.subtract(["brand"])
                self.brand_choice["randomized_distributed"] += 1
                self.brand_choice = +self.brand_choice  # drop a zero count
                kind = "randomized"
            return self.new(dim, name, rows, device, rng, kind, restored=False)
        return self.new(dim, name, rows, device, rng, kind)

    def new(
        self, dim: int, name: str, s: int, device: torch.device, rng: np.random.Generator, kind: str | None,
        *, restored: bool = True,
    ) -> FactorState:
        """A factor of strategy ``kind`` (None: ``kind_for(dim, s)``; a given kind is a checkpoint's when ``restored``).

        ValueError for an unknown kind (a checkpoint's).
        """
        o = self.options
        common = dict(
            decay=o.factor_decay,
            rank=o.rank_policy,
            dtype=o.factor_dtype,
            inv_dtype=o.inv_dtype,
            device=device,
            rng=rng,
            name=name,
            warn=self.warn,
        )
        if kind is None:
            kind = self.kind_for(dim, s)
        elif o.spec.brand and restored:  # from a checkpoint, which keeps the kind but not why it was chosen
            self.brand_choice["brand" if kind in ("brand", "brand+dense") else "randomized_restored"] += 1
        sketch = dict(oversample=o.oversample, n_iter=o.n_iter)
        if kind == "dense":
            f = DenseFactor(dim, **common)
        elif kind == "randomized":
            f = RandomizedFactor(dim, method=o.spec.randomized or o.brand.fallback, **sketch, **common)
        elif kind == "brand":
            f = BrandFactor(dim, **common)
        elif kind == "brand+dense":
            f = BrandDenseFactor(dim, method=o.brand.fallback, fraction=o.brand.correction_fraction, **sketch, **common)
        else:
            raise ValueError(f"unknown factor kind {kind!r} in checkpoint")
        self.warn.logger.debug("factor %s: %s, d=%d", name, kind, dim)
        return f

    def default_kind(self, dim: int, s: int) -> str:
        """The method's strategy for a ``dim``-dimensional factor with ``s`` rows per update (counted in :attr:`brand_choice`)."""
        o = self.options
        if not o.spec.brand:
            return o.spec.factor
        keeps_dense = o.spec.factor == "brand+dense"
        r = o.rank_policy.initial
        cost = o.brand.cost
        sched = self.schedule
        if r + s >= dim:  # a Brand update would not reduce the dimension
            reason = "rank"
        elif cost is not None and not cost.pays(
            dim, r, s, t_brand=sched.t_brand(0), t_updt=sched.t_updt(0), t_inv=sched.t_inv(0),
            oversample=o.oversample, n_iter=o.n_iter, keeps_dense=keeps_dense,
            exact=fallback_takes_eigh(dim, r, o.oversample, o.n_iter, o.brand.fallback, o.rank_policy),
        ):
            reason = "cost"
        else:
            self.brand_choice["brand"] += 1
            return o.spec.factor
        self.brand_choice[f"randomized_{reason}"] += 1
        # INFO the first time in the process for each reason, DEBUG after: a CLI run builds many preconditioners
        level = logging.DEBUG if reason in _REPORTED else logging.INFO
        _REPORTED.add(reason)
        self.warn.logger.log(level, "factor of d=%d (rank %d, %d rows per update): a Brand update %s; kept by "
                             "randomized %s (counted in stats()['brand'])", dim, r, s,
                             "would not reduce the dimension" if reason == "rank" else
                             "costs more per step than the EA + randomized fallback (BrandConfig.cost)",
                             o.brand.fallback)
        return "randomized"
