"""onlinela: online and randomized low-rank linear algebra for K-FAC-family optimizers.

Backend-agnostic (NumPy, CuPy, torch tensors, any array-API array through
``array-api-compat``); imports neither torch, cupy nor hypothesis.
"""

from .decay import (
    damped_inverse_error,
    ea_eigenvalue_bound,
    ea_rank_for_inverse_error,
    ea_rank_for_tolerance,
    ea_stream_eigenvalue_bound,
)
from .dense import eigh
from .lowrank import LowRankPSD
from .online import brand_update, empty_lowrank, rayleigh_ritz_refresh
from .randomized import (
    adaptive_randomized_eigh,
    estimate_spectral_error,
    randomized_eigh,
    randomized_range_finder,
    randomized_svd,
)

__version__ = "0.1.0"

__all__ = [
    "LowRankPSD",
    "adaptive_randomized_eigh",
    "brand_update",
    "damped_inverse_error",
    "ea_eigenvalue_bound",
    "ea_rank_for_inverse_error",
    "ea_rank_for_tolerance",
    "ea_stream_eigenvalue_bound",
    "eigh",
    "empty_lowrank",
    "estimate_spectral_error",
    "randomized_eigh",
    "randomized_range_finder",
    "randomized_svd",
    "rayleigh_ritz_refresh",
]
