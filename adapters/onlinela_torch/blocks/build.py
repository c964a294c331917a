"""Blocks for a whole model: selection, nesting, tied parameters and the uncovered-parameter report.

:func:`build_blocks` walks ``model.named_modules()`` and asks the registry
for a block per module.  A child whose parameters its parent's block already
covers (``out_proj`` inside ``nn.MultiheadAttention``) gets none.  A
parameter claimed by two blocks is *tied*:

* an ``nn.Embedding`` weight that is also an ``nn.Linear`` weight (tied
  input/output embeddings): the Linear (output) block keeps it — its
  Kronecker factors ``G`` (vocabulary side) and ``A`` (model side) cover the
  whole matrix, whereas the embedding's token-count factor sees only the
  rows of the tokens in the batch — and the embedding block is dropped.  The
  approximation: the curvature of the shared matrix is the output layer's;
  the embedding's own contribution is left out of the factors (its gradient
  is still preconditioned, as part of the sum).
* any other sharing between two modules: the first block keeps the
  parameter; the later module's block is dropped, so its calls do not enter
  the statistics.

Both are logged once (warning) and listed in :attr:`BlockSet.shared`; every
trainable parameter left without a block is listed in
:attr:`BlockSet.uncovered` with its module type and why.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from ..compiled import clean_name
from .base import BlockContext, CurvatureBlock, block_or_reason

__all__ = ["BlockSet", "Uncovered", "build_blocks"]

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class Uncovered:
    """A trainable parameter without a curvature block: ``name``, its module ``type`` and ``why``."""

    name: str
    type: str
    why: str


@dataclass
class BlockSet:
    """The blocks of one model, by module name, with the report of what they do not cover.

    Attributes
    ----------
    blocks : dict of str to CurvatureBlock
        In ``named_modules()`` order.
    uncovered : list of Uncovered
        Trainable parameters that keep their plain gradient.
    shared : list of tuple of str
        ``(parameter, kept block, dropped block)`` for tied parameters.
    """

    blocks: dict[str, CurvatureBlock] = field(default_factory=dict)
    uncovered: list[Uncovered] = field(default_factory=list)
    shared: list[tuple[str, str, str]] = field(default_factory=list)

    def attach(self) -> None:
        """Attach every block (register its capture)."""
        for b in self.blocks.values():
            b.attach()

    def detach(self) -> None:
        """Detach every block (restore the modules)."""
        for b in self.blocks.values():
            b.detach()

    def fisher_params(self) -> list[nn.Parameter]:
        """The union of the blocks' :meth:`~CurvatureBlock.fisher_params`, without duplicates."""
        seen: dict[int, nn.Parameter] = {}
        for b in self.blocks.values():
            for p in b.fisher_params():
                seen.setdefault(id(p), p)
        return list(seen.values())

    def update(self, *, decompose: bool, damping: float, step: int) -> None:
        """:meth:`CurvatureBlock.update` of every block."""
        for b in self.blocks.values():
            b.update(decompose=decompose, damping=damping, step=step)

    def discard(self) -> None:
        """:meth:`CurvatureBlock.discard` of every block (a skipped step)."""
        for b in self.blocks.values():
            b.discard()

    def precondition(self, damping: float) -> dict[nn.Parameter, torch.Tensor]:
        """The union of the blocks' preconditioned gradients (nothing written)."""
        out: dict[nn.Parameter, torch.Tensor] = {}
        for b in self.blocks.values():
            out.update(b.precondition(damping))
        return out

    def state_dict(self) -> dict[str, Any]:
        """``{module name: block state}``."""
        return {name: b.state_dict() for name, b in self.blocks.items()}

    def load_state_dict(self, sd: dict[str, Any]) -> None:
        """Restore every block; different block names raise ValueError listing both sets."""
        if set(sd) != set(self.blocks):
            raise ValueError(f"the state holds blocks {sorted(sd)}, the model has {sorted(self.blocks)}")
        for name, b in self.blocks.items():
            b.load_state_dict(sd[name])

    def stats(self) -> dict[str, Any]:
        """``{"blocks": {name: stats}, "uncovered": [...], "shared": [...]}``."""
        return {
            "blocks": {name: b.stats() for name, b in self.blocks.items()},
            "uncovered": [vars(u) for u in self.uncovered],
            "shared": [list(s) for s in self.shared],
        }


def build_blocks(
    model: nn.Module, ctx: BlockContext, *, select: Callable[[str, nn.Module], bool] | None = None
) -> BlockSet:
    """One block per supported module of ``model`` (not attached yet; module docstring for the rules).

    Parameters
    ----------
    model : torch.nn.Module
    ctx : BlockContext
    select : callable (name, module) -> bool, optional
        Which modules get a block (default all); the parameters of the others
        are reported as ``"not selected"``.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"`model` must be a torch.nn.Module, got {type(model).__name__}")
    out = BlockSet()
    owner: dict[int, str] = {}  # id(param) -> block name
    names: dict[int, str] = {}  # id(param) -> first parameter name
    reasons: dict[int, Uncovered] = {}
    for mname, module in model.named_modules():
        mname = clean_name(mname)  # torch.compile wrappers: the eager model's names
        direct = [(n, p) for n, p in module.named_parameters(recurse=False) if p.requires_grad]
        for n, p in direct:
            names.setdefault(id(p), f"{mname}.{n}" if mname else n)
        if not direct or all(id(p) in owner and _inside(mname, owner[id(p)]) for _, p in direct):
            continue
        if select is not None and not select(mname, module):
            for n, p in direct:
                reasons.setdefault(id(p), Uncovered(names[id(p)], type(module).__name__, "not selected"))
            continue
        block, why = block_or_reason(mname, module, ctx)
        if block is None:
            for n, p in direct:
                reasons.setdefault(id(p), Uncovered(names[id(p)], type(module).__name__, why))
            continue
        for p in _claim(out, block, owner, names):
            reasons.setdefault(id(p), Uncovered(names[id(p)], type(module).__name__, "its block was dropped (tied parameter)"))
    for pid, u in reasons.items():
        if pid not in owner:
            out.uncovered.append(u)
            logger.warning("parameter %s (%s) has no curvature block: %s; it keeps its plain gradient", u.name, u.type, u.why)
    return out


def _inside(child: str, parent: str) -> bool:
    return parent == "" or child.startswith(parent + ".")


def _claim(out: BlockSet, block: CurvatureBlock, owner: dict[int, str], names: dict[int, str]) -> list[nn.Parameter]:
    """Add ``block``, resolving parameters another block already claimed; returns the parameters a dropped block leaves."""
    clashes = {owner[id(p)] for _, p in block.params() if id(p) in owner}
    for other in sorted(clashes):
        kept, dropped = _tie_winner(out.blocks[other], block)
        pname = next(names[id(p)] for _, p in block.params() if owner.get(id(p)) == other)
        out.shared.append((pname, kept.name, dropped.name))
        logger.warning(
            "parameter %s is shared by blocks %s (%s) and %s (%s): preconditioned by %s; %s is dropped",
            pname, other, out.blocks[other].kind, block.name, block.kind, kept.name, dropped.name,
        )
        if dropped is block:
            return [p for _, p in block.params() if id(p) not in owner]
        del out.blocks[other]
        for pid in [pid for pid, b in owner.items() if b == other]:
            del owner[pid]
    out.blocks[block.name] = block
    for _, p in block.params():
        owner[id(p)] = block.name
    return []


def _tie_winner(first: CurvatureBlock, second: CurvatureBlock) -> tuple[CurvatureBlock, CurvatureBlock]:
    """``(kept, dropped)``: an output Linear wins over an Embedding; otherwise the first wins."""
    if isinstance(first.module, nn.Embedding) and isinstance(second.module, nn.Linear):
        return second, first
    return first, second
