"""Curvature blocks: one per layer family, behind one public interface (docs/layers.rst).

Importing the package registers the built-in blocks:

===========================================  ==============================  =========================================
module type                                  block                           curvature
===========================================  ==============================  =========================================
``nn.Linear``                                :class:`LinearBlock`            ``A ⊗ G``, K-FAC-expand (default) / reduce
``nn.Conv1d``, ``nn.Conv2d`` (groups=1)      :class:`Conv1dBlock`,           ``A ⊗ G`` over unfolded patches (KFC)
                                             :class:`Conv2dBlock`
``nn.MultiheadAttention``                    :class:`MultiheadAttentionBlock`  ``A ⊗ G`` per projection q, k, v, out
``nn.Embedding``                             :class:`EmbeddingBlock`         diagonal token counts ``⊗ G``
``nn.LayerNorm``, ``nn.RMSNorm``,            :class:`ScaleShiftBlock`        diagonal or per-channel 2×2 of (γ, β)
``nn.BatchNorm1d/2d/3d``, ``nn.GroupNorm``
===========================================  ==============================  =========================================
"""

from . import attention as _attention  # noqa: F401  (registers its block)
from . import embedding as _embedding  # noqa: F401
from . import norm as _norm  # noqa: F401
from .attention import MultiheadAttentionBlock
from .base import (
    BlockContext,
    CurvatureBlock,
    FactorMaker,
    StepFlags,
    block_for,
    block_or_reason,
    dense_factor_maker,
    register_block,
    registered_blocks,
)
from .build import BlockSet, Uncovered, build_blocks
from .diagonal import TensorEA
from .embedding import EmbeddingBlock
from .kronecker import (
    Conv1dBlock,
    Conv2dBlock,
    FactorSlot,
    KroneckerBlock,
    KroneckerFactors,
    LinearBlock,
)
from .norm import ScaleShiftBlock

__all__ = [
    "BlockContext",
    "BlockSet",
    "Conv1dBlock",
    "Conv2dBlock",
    "CurvatureBlock",
    "EmbeddingBlock",
    "FactorMaker",
    "FactorSlot",
    "KroneckerBlock",
    "KroneckerFactors",
    "LinearBlock",
    "MultiheadAttentionBlock",
    "ScaleShiftBlock",
    "StepFlags",
    "TensorEA",
    "Uncovered",
    "block_for",
    "block_or_reason",
    "build_blocks",
    "dense_factor_maker",
    "register_block",
    "registered_blocks",
]
