"""Shared fixtures: the ``xp`` backend matrix and hypothesis profiles.

``xp`` runs a test on numpy, array-api-strict, torch (CPU) and cupy (skipped
unless a CUDA device is present).  Hypothesis uses the deterministic ``ci``
profile by default (``derandomize=True``, no deadline) so CI is reproducible;
``HYPOTHESIS_PROFILE=dev`` explores more examples with fresh randomness.
"""

from __future__ import annotations

import importlib
import os

import pytest
from hypothesis import HealthCheck, settings

settings.register_profile(
    "ci",
    derandomize=True,
    deadline=None,
    max_examples=20,
    print_blob=True,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)
settings.register_profile(
    "dev",
    deadline=None,
    max_examples=200,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "ci"))


def _cupy_available() -> bool:
    try:
        cupy = importlib.import_module("cupy")
        return cupy.cuda.runtime.getDeviceCount() > 0
    except Exception:
        return False


@pytest.fixture(autouse=True, scope="session")
def _one_torch_thread():
    """Tiny matrices and two xdist workers on two cores: one torch thread per worker
    avoids oversubscription (measured 10-40x slowdowns of small kernels otherwise)."""
    try:
        import torch
    except ImportError:
        yield
        return
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


BACKENDS = ["numpy", "array_api_strict", "torch", "cupy"]


@pytest.fixture(params=BACKENDS, scope="session")
def xp(request):
    """The array namespace under test (array-API compatible)."""
    name = request.param
    if name == "numpy":
        return importlib.import_module("array_api_compat.numpy")
    if name == "array_api_strict":
        return pytest.importorskip("array_api_strict")
    if name == "torch":
        pytest.importorskip("torch")
        return importlib.import_module("array_api_compat.torch")
    if not _cupy_available():
        pytest.skip("cupy needs a CUDA device")
    return importlib.import_module("array_api_compat.cupy")
