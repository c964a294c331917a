"""Methods that forward to a component: how :class:`~onlinela_torch.KFACPreconditioner` exposes its parts.

``fisher_backward = forwarded("_capture", Capture.fisher_backward)`` in a class
body defines a method that calls ``Capture.fisher_backward`` on the instance's
``_capture`` attribute; it carries the component method's docstring and
signature (``functools.wraps``), so the public documentation lives next to the
code that implements it.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any, TypeVar

__all__ = ["forwarded"]

_T = TypeVar("_T")


def forwarded(component: str, method: Callable[..., _T]) -> Callable[..., _T]:
    """A method calling ``method(getattr(self, component), *args, **kwargs)``, with ``method``'s docstring and signature."""

    @functools.wraps(method)
    def call(self: Any, *args: Any, **kwargs: Any) -> _T:
        return method(getattr(self, component), *args, **kwargs)

    return call
