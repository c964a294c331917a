"""Which modules :class:`~onlinela_torch.KFACPreconditioner` preconditions, and through which path.

``nn.Linear`` / ``nn.Conv2d`` take the preconditioner's own Kronecker path
(:class:`~onlinela_torch.KFACLayer`: thin gradients, distributed, KLD-WRM);
the curvature blocks of :mod:`onlinela_torch.blocks` cover attention,
embeddings, normalisation layers, Conv1d and user-registered types.  Layers
are selected by ``fnmatch`` patterns on ``named_modules()`` names or by type
(``layers`` / ``skip_layers``); names are those of the bare model under
``torch.compile``.
"""

from __future__ import annotations

import logging
import warnings
from collections.abc import Callable, Sequence
from fnmatch import fnmatchcase

import torch
from torch import nn

from .blocks import BlockContext, BlockSet, Uncovered, build_blocks
from .compiled import clean_name
from .factors import FactorState
from .inverse import apply_inverse
from .layer import KFACLayer
from .logs import WarningCounter
from .methods import Plan
from .modules import LayerHelper, LinearHelper, helper_for
from .options import KFACOptions, LayerSelector

__all__ = ["block_context", "build_block_set", "distributed_group_size", "kronecker_layers", "select_layers"]

logger = logging.getLogger(__name__)


def distributed_group_size() -> int:
    """World size of the default ``torch.distributed`` group (1 when none is initialised)."""
    dist = torch.distributed
    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


def block_context(
    options: KFACOptions,
    *,
    plan: Callable[[], Plan],
    grad_scale: Callable[[], float],
    make_factor: Callable[..., FactorState],
    reuse: Callable[[], int],
) -> BlockContext:
    """The :class:`~onlinela_torch.BlockContext` of the preconditioner's options (``reuse``: see ``inverse.damped_solve``)."""
    o = options
    return BlockContext(
        plan=plan,
        fisher=o.fisher,
        loss_reduction=o.loss_reduction,
        grad_scale=grad_scale,
        factor_decay=o.factor_decay,
        factor_dtype=o.factor_dtype,
        inv_dtype=o.inv_dtype,
        damping_convention=o.damping_convention,
        complement=o.complement,
        make_factor=make_factor,
        kron_solve=lambda G, A, X, damping: apply_inverse(
            G, A, X, damping, o.damping_convention, o.complement, o.damping_scale, reuse=reuse()
        ),
        timer=o.timer,
    )


def build_block_set(
    model: nn.Module, ctx: BlockContext, options: KFACOptions, warn: WarningCounter, *, synchronised: bool = False
) -> tuple[BlockSet, set[str]]:
    """Curvature blocks for every selected module the Kronecker layers do not handle.

    Returns the blocks and the names of the Linear/Conv2d modules the
    Kronecker path may take (a Linear inside an attention block is the
    block's, e.g. ``out_proj``).  Under ``torch.distributed`` a block is
    built only when ``synchronised`` (the preconditioner averages block
    statistics over the ranks: :class:`~onlinela_torch.DistributedKFACPreconditioner`)
    and the block declares its statistics
    (:meth:`~onlinela_torch.CurvatureBlock.statistics_holders`); the others'
    parameters are reported as uncovered (warned once).
    """
    layers, skip = options.layers, options.skip_layers
    built = build_blocks(model, ctx, select=lambda name, m: _selected(name, m, layers, skip))
    kron = {n for n, b in built.blocks.items() if type(b.module) in (nn.Linear, nn.Conv2d)}
    extra = {n: b for n, b in built.blocks.items() if n not in kron}
    if extra and distributed_group_size() > 1:
        why = ("its block does not declare its statistics (statistics_holders), so they cannot be averaged over "
               "the ranks" if synchronised else "curvature blocks under torch.distributed need "
               "DistributedKFACPreconditioner (onlinela_torch.distribute)")
        dropped = {n: b for n, b in extra.items() if not synchronised or b.statistics_holders() is None}
        for n, b in dropped.items():
            for pname, _ in b.params():
                built.uncovered.append(Uncovered(f"{n}.{pname}" if n else pname, type(b.module).__name__, why))
        if dropped:
            warn.warn("blocks_distributed", "%d curvature block(s) (%s) not built under torch.distributed (%s); "
                      "their parameters keep the plain gradient", len(dropped), ", ".join(sorted(dropped)), why)
        extra = {n: b for n, b in extra.items() if n not in dropped}
    return BlockSet(blocks=extra, uncovered=built.uncovered, shared=built.shared), kron


def kronecker_layers(
    model: nn.Module, options: KFACOptions, covered: set[str], blocks: BlockSet
) -> dict[str, KFACLayer]:
    """The :class:`KFACLayer` of each selected Linear/Conv2d in ``covered``; ValueError when nothing is selected."""
    selected = [e for e in select_layers(model, options.layers, options.skip_layers) if e[0] in covered]
    if not selected and not blocks.blocks:
        raise ValueError(
            "no supported layer selected in the model (see docs/layers.rst); check `layers` / `skip_layers`"
        )
    thin = options.thin
    return {
        name: KFACLayer(i, name, m, h, thin and isinstance(h, LinearHelper)) for i, (name, m, h) in enumerate(selected)
    }


def _matches(name: str, module: nn.Module, selectors: Sequence[LayerSelector]) -> bool:
    for s in selectors:
        if isinstance(s, str) and fnmatchcase(name, s):
            return True
        if isinstance(s, type) and isinstance(module, s):
            return True
    return False


def _selected(name: str, module: nn.Module, layers: Sequence[LayerSelector] | None, skip: Sequence[LayerSelector]) -> bool:
    if _matches(name, module, skip):
        return False
    return layers is None or _matches(name, module, layers)


def select_layers(
    model: nn.Module,
    layers: Sequence[LayerSelector] | None,
    skip_layers: Sequence[LayerSelector],
) -> list[tuple[str, nn.Module, LayerHelper]]:
    """``(name, module, helper)`` of every selected supported Linear/Conv2d; TypeError / ValueError for bad selectors."""
    for sel, arg in ((layers or (), "layers"), (skip_layers, "skip_layers")):
        if isinstance(sel, (str, type)):
            raise TypeError(f"`{arg}` must be a sequence of names or types, got a single {type(sel).__name__}")
        for s in sel:
            if not isinstance(s, (str, type)):
                raise TypeError(f"`{arg}` entries must be names (str) or module types, got {s!r}")
    out = []
    for name, m in model.named_modules():
        name = clean_name(name)
        if _matches(name, m, skip_layers):
            continue
        if layers is not None and not _matches(name, m, layers):
            continue
        helper, reason = helper_for(m)
        if helper is None:
            if layers is not None and name in layers:
                raise ValueError(f"layer {name!r} was selected by name but cannot be preconditioned: {reason}")
            if isinstance(m, (nn.Linear, nn.Conv2d)):
                msg = f"onlinela_torch: skipping layer {name!r}: {reason}; it keeps its plain gradient"
                warnings.warn(msg, stacklevel=4)  # the caller of KFACPreconditioner(...)
            continue
        if not m.weight.requires_grad:
            logger.debug("layer %s is frozen; not preconditioned", name)
            continue
        out.append((name, m, helper))
    return out
