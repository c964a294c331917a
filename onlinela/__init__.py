"""onlinela: online and randomized low-rank linear algebra for K-FAC-family optimizers.

Backend-agnostic (NumPy, CuPy, torch tensors, any array-API array through
``array-api-compat``); imports neither torch, cupy nor hypothesis.
"""

from .lowrank import LowRankPSD

__version__ = "0.1.0"

__all__ = [
    "LowRankPSD",
]
