"""onlinela_torch: PyTorch adapters for the K-FAC family built on :mod:`onlinela`."""

from .brand_cost import BrandCostModel
from .blocks import BlockContext, CurvatureBlock, register_block
from .distributed import AssignmentPolicy, DistributedKFACPreconditioner, GreedyAssignment, distribute
from .factors import AdaptiveRank, ErrorTargetRank, FactorEigen, FactorState, RankPolicy
from .kldwrm import KLDWRM, KLDWRMConfig
from .optimizers import BKFAC, BKFACC, BRKFAC, KFAC, RSKFAC, SREKFAC, NystromKFAC
from .preconditioner import BrandConfig, KFACLayer, KFACPreconditioner, apply_inverse, damped_solve, factor_scale
from .quadratic import AdaptiveDamping

__all__: list[str] = [
    "AdaptiveDamping",
    "AdaptiveRank",
    "AssignmentPolicy",
    "BKFAC",
    "BlockContext",
    "BKFACC",
    "BRKFAC",
    "BrandConfig",
    "BrandCostModel",
    "CurvatureBlock",
    "DistributedKFACPreconditioner",
    "ErrorTargetRank",
    "FactorEigen",
    "FactorState",
    "GreedyAssignment",
    "KFAC",
    "KFACLayer",
    "KFACPreconditioner",
    "KLDWRM",
    "KLDWRMConfig",
    "NystromKFAC",
    "RSKFAC",
    "RankPolicy",
    "SREKFAC",
    "apply_inverse",
    "damped_solve",
    "distribute",
    "factor_scale",
    "register_block",
]
