"""Public testing helpers: hypothesis strategies and dtype-aware assertions.

Use them to property-test your own solvers against the same matrices
:mod:`onlinela` is tested on::

    from hypothesis import given
    from onlinela.testing import strategies as ost, assert_allclose_dtype

    @given(ost.psd_cases(numpy_namespace))
    def test_my_solver(case):
        ...

``hypothesis`` is imported only when :mod:`onlinela.testing.strategies` is
first accessed, so the assertions work without it.
"""

from __future__ import annotations

import importlib
from typing import Any

from ._assertions import (
    assert_allclose_dtype,
    assert_orthonormal,
    assert_same_subspace,
    default_tolerance,
    to_numpy,
)

__all__ = [
    "assert_allclose_dtype",
    "assert_orthonormal",
    "assert_same_subspace",
    "default_tolerance",
    "strategies",
    "to_numpy",
]


def __getattr__(name: str) -> Any:
    if name == "strategies":
        return importlib.import_module(".strategies", __name__)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
