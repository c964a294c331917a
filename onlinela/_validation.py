"""Argument checks shared by the public functions of :mod:`onlinela`.

Every message names the argument and states its contract, e.g.
"`rank` must satisfy 0 < rank <= 64 (the matrix dimension), got 65".
Validators return the normalised value so callers can write
``rank = check_int(rank, "rank", low=1, high=d)``.
"""

from __future__ import annotations

import math
import numbers
import warnings
from types import ModuleType
from typing import Any

import numpy as np

from . import _backend as B

__all__: list[str] = []  # private module


def check_float_array(a: Any, name: str, xp: ModuleType, *, min_ndim: int = 2, finite: bool = True) -> None:
    """``a`` is a real float32/float64 array with at least ``min_ndim`` axes, non-empty and finite."""
    if a.ndim < min_ndim:
        raise ValueError(f"`{name}` must have at least {min_ndim} dimensions, got shape {tuple(a.shape)}")
    dt = a.dtype
    if dt not in (xp.float32, xp.float64):
        kind = "complex" if _is_complex(xp, dt) else "integer or boolean" if not _is_float(xp, dt) else "low-precision"
        raise TypeError(
            f"`{name}` must have a real floating dtype (float32 or float64), got {kind} dtype {dt}; "
            "cast it first (e.g. to float32)"
        )
    if min_ndim and any(s == 0 for s in a.shape[-min_ndim:]):
        raise ValueError(f"`{name}` must not be empty, got shape {tuple(a.shape)}")
    if min_ndim and any(s == 0 for s in a.shape):
        raise ValueError(f"`{name}` must not be an empty stack (a batch axis of size 0), got shape {tuple(a.shape)}")
    if finite and not bool(xp.all(xp.isfinite(a))):
        raise ValueError(f"`{name}` must be finite (no NaN or Inf)")


def _is_complex(xp: ModuleType, dt: Any) -> bool:
    try:
        return xp.isdtype(dt, "complex floating")
    except Exception:
        return "complex" in str(dt)


def _is_float(xp: ModuleType, dt: Any) -> bool:
    try:
        return xp.isdtype(dt, "real floating")
    except Exception:
        return "float" in str(dt)


def check_square(a: Any, name: str) -> int:
    if a.shape[-1] != a.shape[-2]:
        raise ValueError(f"`{name}` must be square in its last two dimensions, got shape {tuple(a.shape)}")
    return int(a.shape[-1])


def check_symmetric(a: Any, name: str, xp: ModuleType, *, rtol: float | None = None, check_finite: bool = False) -> None:
    """``||A - A^T||_max <= rtol * ||A||_max`` with ``rtol = 100 * sqrt(d) * eps`` by default.

    Cost ``O(d^2)`` per matrix, negligible beside any decomposition of ``A``:
    the comparison runs over cache-sized tiles (a plain ``A - A.T`` reads one
    operand with stride ``d`` and costs ~5 GEMM-equivalents at ``d = 4096``),
    and ``max|A|`` is only computed when the cheaper bound ``max|diag A|``
    (equal to it for PSD input) would reject.  With ``check_finite`` the same
    pass doubles as the finiteness check (a NaN/Inf entry makes ``A - Aᵀ``
    non-finite) and raises the message of :func:`check_float_array`.
    """
    d = a.shape[-1]
    tol = rtol if rtol is not None else 100.0 * d**0.5 * B.eps(xp, a.dtype)
    asym = _max_asymmetry(xp, a)
    if check_finite and not math.isfinite(asym):
        if not bool(xp.all(xp.isfinite(a))):
            raise ValueError(f"`{name}` must be finite (no NaN or Inf)")
    tiny = B.eps(xp, a.dtype)
    if asym <= tol * max(float(xp.max(xp.abs(B.diagonal(xp, a)))), tiny) or asym == 0:
        return
    scale = float(xp.max(xp.abs(a)))
    if asym > tol * max(scale, tiny):
        raise ValueError(
            f"`{name}` must be symmetric: max|A - A^T| = {asym:.3g} exceeds {tol:.2g} * max|A| = {tol * scale:.3g}"
        )


_SYM_TILE = 192  # tile edge for the blocked symmetry check (fits L2 with its transpose)


def _max_asymmetry(xp: ModuleType, a: Any) -> float:
    """``max|A - Aᵀ|`` over a stack (NaN/Inf if ``A`` has a non-finite entry), tile by tile."""
    d = a.shape[-1]
    with warnings.catch_warnings():  # inf - inf is the point here, not a bug
        warnings.simplefilter("ignore", RuntimeWarning)
        if d <= 2 * _SYM_TILE:
            return float(xp.max(xp.abs(a - B.mT(xp, a))))
        if B.is_numpy(xp) or B.is_torch(xp):
            return _max_asymmetry_native(xp, a)
        t = _SYM_TILE
        m = None
        for i in range(0, d, t):
            for j in range(i, d, t):
                i1, j1 = min(i + t, d), min(j + t, d)  # in-bounds stops (the standard requires it)
                v = xp.max(xp.abs(a[..., i:i1, j:j1] - B.mT(xp, a[..., j:j1, i:i1])))
                m = v if m is None else xp.maximum(m, v)
        return float(m)


def _max_asymmetry_native(xp: ModuleType, a: Any) -> float:
    """NumPy / torch tile loop writing into one preallocated tile (no temporaries; ~1.5x faster)."""
    if B.is_torch(xp):
        torch = B._torch()
        t = 256  # torch parallelises each tile; larger tiles amortise the thread hand-off
        buf = torch.empty(tuple(a.shape[:-2]) + (t, t), dtype=a.dtype, device=a.device)
        sub, minmax = torch.sub, torch.aminmax
    else:
        t = _SYM_TILE  # NumPy's elementwise loops are single-threaded: tiles that stay in L2
        buf = np.empty(tuple(a.shape[:-2]) + (t, t), dtype=a.dtype)
        sub, minmax = np.subtract, lambda o: (o.min(), o.max())
    d = a.shape[-1]
    vals = []
    for i in range(0, d, t):
        for j in range(i, d, t):
            x = a[..., i : i + t, j : j + t]
            o = buf[..., : x.shape[-2], : x.shape[-1]]
            sub(x, B.mT(xp, a[..., j : j + t, i : i + t]), out=o)
            lo, hi = minmax(o)
            vals += [hi, -lo]
    if B.is_torch(xp):
        return float(B._torch().stack(vals).max())
    return float(np.max(np.array(vals)))  # propagates NaN, unlike the builtin max


def check_int(value: Any, name: str, *, low: int | None = None, high: int | None = None, what: str = "") -> int:
    """An integer with ``low <= value <= high``; ``what`` explains ``high``."""
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise TypeError(f"`{name}` must be an int, got {type(value).__name__}")
    v = int(value)
    if (low is not None and v < low) or (high is not None and v > high):
        lo = f"{low} <= " if low is not None else ""
        hi = f" <= {high}" + (f" ({what})" if what else "") if high is not None else ""
        raise ValueError(f"`{name}` must satisfy {lo}{name}{hi}, got {v}")
    return v


def check_bool(value: Any, name: str) -> bool:
    """A Python (or NumPy) bool; anything else is a ``TypeError`` (a truthy string is not a flag)."""
    if not isinstance(value, (bool, np.bool_)):
        raise TypeError(f"`{name}` must be a bool (True or False), got {type(value).__name__}")
    return bool(value)


def check_real(
    value: Any,
    name: str,
    *,
    low: float | None = None,
    high: float | None = None,
    low_open: bool = False,
    high_open: bool = False,
) -> float:
    """A finite real number inside the stated (open or closed) interval."""
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise TypeError(f"`{name}` must be a real number, got {type(value).__name__}")
    v = float(value)
    bad = v != v or v in (float("inf"), float("-inf"))
    if low is not None:
        bad |= v <= low if low_open else v < low
    if high is not None:
        bad |= v >= high if high_open else v > high
    if bad:
        if low is not None and high is not None:
            rule = f"in {'(' if low_open else '['}{low}, {high}{')' if high_open else ']'}"
        elif low is not None:
            rule = f"{'>' if low_open else '>='} {low}"
        else:
            rule = f"{'<' if high_open else '<='} {high}"
        raise ValueError(f"`{name}` must be a finite number {rule}, got {value}")
    return v


def check_psd_input(a: Any, name: str = "A") -> tuple[ModuleType, int]:
    """Common checks for a symmetric PSD input stack ``(..., d, d)``; returns ``(xp, d)``."""
    xp = B.get_namespace(a, names=(name,))
    check_float_array(a, name, xp, finite=False)
    d = check_square(a, name)
    check_symmetric(a, name, xp, check_finite=True)  # one O(d^2) pass checks both
    return xp, d
