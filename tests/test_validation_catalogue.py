"""A catalogue of bad inputs to every public function of :mod:`onlinela` (issue 15's bar).

Every case must raise ``ValueError`` or ``TypeError`` (the class stated per case) with a
message that names the offending argument in backticks (e.g. "`rank`").  The catalogue covers
wrong shapes, non-finite values, wrong dtypes, bad ranks / decays / tolerances, torch ``meta``
tensors, empty stacks and mixed namespaces, on every backend of the ``xp`` fixture; the
mixed-namespace cases need two libraries and run once, with NumPy and torch.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable

import numpy as np
import pytest

import onlinela as ol
from onlinela import LowRankPSD

D = 6  # dimension of the good inputs


def _spd(d: int = D) -> np.ndarray:
    X = np.random.default_rng(0).standard_normal((d, d))
    return X @ X.T + np.eye(d)


@dataclass(frozen=True)
class Case:
    name: str
    call: Callable[[Any], Any]  # xp -> call that must raise
    exc: type
    arg: str  # the argument the message must name
    needs: str = ""  # an attribute of xp the case needs (e.g. "float16")


def _A(xp, a=None, dtype=None):
    return xp.asarray(_spd() if a is None else a, dtype=dtype or xp.float64)


def _approx(xp, d=D, r=2, dtype=None):
    dt = dtype or xp.float64
    return LowRankPSD(xp.asarray(np.eye(d, r), dtype=dt), xp.asarray(np.linspace(2.0, 1.0, r), dtype=dt))


def _X(xp, rows=D, cols=2, dtype=None, fill=None):
    x = np.random.default_rng(1).standard_normal((rows, cols)) if fill is None else np.full((rows, cols), fill)
    return xp.asarray(x, dtype=dtype or xp.float64)


def _nan(a: np.ndarray, v: float = np.nan) -> np.ndarray:
    a = a.copy()
    a[1, 2] = a[2, 1] = v
    return a


def _matrix_cases(fn_name: str, call: Callable[[Any, Any], Any]) -> list[Case]:
    """Bad ``A`` for a function whose first argument is a symmetric PSD (..., d, d) array."""
    asym = _spd()
    asym[0, 1] += 1.0
    return [
        Case(f"{fn_name}: A a list", lambda xp: call(xp, _spd().tolist()), TypeError, "A"),
        Case(f"{fn_name}: A a scalar", lambda xp: call(xp, 3.0), TypeError, "A"),
        Case(f"{fn_name}: A 1-D", lambda xp: call(xp, xp.ones((D,), dtype=xp.float64)), ValueError, "A"),
        Case(f"{fn_name}: A 0-d", lambda xp: call(xp, xp.asarray(1.0, dtype=xp.float64)), ValueError, "A"),
        Case(f"{fn_name}: A int", lambda xp: call(xp, xp.asarray(np.eye(D, dtype=np.int64))), TypeError, "A"),
        Case(f"{fn_name}: A bool", lambda xp: call(xp, xp.asarray(np.eye(D, dtype=bool))), TypeError, "A"),
        Case(f"{fn_name}: A complex", lambda xp: call(xp, xp.asarray(_spd().astype(np.complex128))), TypeError, "A"),
        Case(f"{fn_name}: A float16", lambda xp: call(xp, xp.asarray(_spd(), dtype=xp.float16)), TypeError, "A", "float16"),
        Case(f"{fn_name}: A NaN", lambda xp: call(xp, _A(xp, _nan(_spd()))), ValueError, "A"),
        Case(f"{fn_name}: A Inf", lambda xp: call(xp, _A(xp, _nan(_spd(), np.inf))), ValueError, "A"),
        Case(f"{fn_name}: A -Inf", lambda xp: call(xp, _A(xp, _nan(_spd(), -np.inf))), ValueError, "A"),
        Case(f"{fn_name}: A not square", lambda xp: call(xp, _A(xp, np.ones((D, D + 1)))), ValueError, "A"),
        Case(f"{fn_name}: A not symmetric", lambda xp: call(xp, _A(xp, asym)), ValueError, "A"),
        Case(f"{fn_name}: A empty", lambda xp: call(xp, _A(xp, np.zeros((0, 0)))), ValueError, "A"),
        Case(f"{fn_name}: A empty stack", lambda xp: call(xp, _A(xp, np.zeros((0, D, D)))), ValueError, "A"),
    ]


def _rank_cases(fn_name: str, call: Callable[[Any, Any], Any], name: str = "rank", high: int = D) -> list[Case]:
    return [
        Case(f"{fn_name}: {name}=0", lambda xp: call(xp, 0), ValueError, name),
        Case(f"{fn_name}: {name}=-1", lambda xp: call(xp, -1), ValueError, name),
        Case(f"{fn_name}: {name}>d", lambda xp: call(xp, high + 1), ValueError, name),
        Case(f"{fn_name}: {name} float", lambda xp: call(xp, 2.0), TypeError, name),
        Case(f"{fn_name}: {name} str", lambda xp: call(xp, "2"), TypeError, name),
        Case(f"{fn_name}: {name} bool", lambda xp: call(xp, True), TypeError, name),
        Case(f"{fn_name}: {name} None", lambda xp: call(xp, None), TypeError, name),
    ]


def _nonneg_int_cases(fn_name: str, call: Callable[[Any, Any], Any], name: str, low: int = 0) -> list[Case]:
    return [
        Case(f"{fn_name}: {name}={low - 1}", lambda xp: call(xp, low - 1), ValueError, name),
        Case(f"{fn_name}: {name} float", lambda xp: call(xp, 1.5), TypeError, name),
        Case(f"{fn_name}: {name} str", lambda xp: call(xp, "1"), TypeError, name),
    ]


def _real_cases(fn_name: str, call: Callable[[Any, Any], Any], name: str, bad_values: list[float]) -> list[Case]:
    out = [Case(f"{fn_name}: {name}={v}", (lambda v: lambda xp: call(xp, v))(v), ValueError, name) for v in bad_values]
    out += [
        Case(f"{fn_name}: {name}=nan", lambda xp: call(xp, float("nan")), ValueError, name),
        Case(f"{fn_name}: {name}=inf", lambda xp: call(xp, float("inf")), ValueError, name),
        Case(f"{fn_name}: {name} str", lambda xp: call(xp, "0.5"), TypeError, name),
        Case(f"{fn_name}: {name} None", lambda xp: call(xp, None), TypeError, name),
        Case(f"{fn_name}: {name} bool", lambda xp: call(xp, True), TypeError, name),
    ]
    return out


def _rng_cases(fn_name: str, call: Callable[[Any, Any], Any]) -> list[Case]:
    return [
        Case(f"{fn_name}: rng=-1", lambda xp: call(xp, -1), ValueError, "rng"),
        Case(f"{fn_name}: rng str", lambda xp: call(xp, "seed"), TypeError, "rng"),
        Case(f"{fn_name}: rng float", lambda xp: call(xp, 1.5), TypeError, "rng"),
        Case(f"{fn_name}: rng bool", lambda xp: call(xp, True), TypeError, "rng"),
    ]


def _flag_cases(fn_name: str, call: Callable[[Any, Any], Any]) -> list[Case]:
    return [
        Case(f"{fn_name}: check_inputs str", lambda xp: call(xp, "no"), TypeError, "check_inputs"),
        Case(f"{fn_name}: check_inputs None", lambda xp: call(xp, None), TypeError, "check_inputs"),
    ]


def _catalogue() -> list[Case]:
    c: list[Case] = []
    # randomized_eigh
    re = ol.randomized_eigh
    c += _matrix_cases("randomized_eigh", lambda xp, A: re(A, 2))
    c += _rank_cases("randomized_eigh", lambda xp, r: re(_A(xp), r))
    c += _nonneg_int_cases("randomized_eigh", lambda xp, v: re(_A(xp), 2, oversample=v), "oversample")
    c += _nonneg_int_cases("randomized_eigh", lambda xp, v: re(_A(xp), 2, n_iter=v, method="subspace"), "n_iter")
    c += [
        Case("randomized_eigh: n_iter with auto", lambda xp: re(_A(xp), 2, n_iter=2), ValueError, "n_iter"),
        Case("randomized_eigh: method unknown", lambda xp: re(_A(xp), 2, method="lanczos"), ValueError, "method"),
        Case("randomized_eigh: method int", lambda xp: re(_A(xp), 2, method=1), ValueError, "method"),
        Case("randomized_eigh: nystrom on indefinite A", lambda xp: re(_A(xp, np.diag([3.0, 2, 1, -50, 0.5, 0.1])), 2, method="nystrom", oversample=4, n_iter=0), ValueError, "A"),
    ]
    c += _rng_cases("randomized_eigh", lambda xp, g: re(_A(xp), 2, rng=g))
    c += _flag_cases("randomized_eigh", lambda xp, f: re(_A(xp), 2, check_inputs=f))
    # adaptive_randomized_eigh
    ad = ol.adaptive_randomized_eigh
    c += _matrix_cases("adaptive_randomized_eigh", lambda xp, A: ad(A, 0.1))
    c += _real_cases("adaptive_randomized_eigh", lambda xp, t: ad(_A(xp), t), "tol", [0.0, 1.0, -0.1, 2.0])
    c += _rank_cases("adaptive_randomized_eigh", lambda xp, r: ad(_A(xp), 0.1, max_rank=r), "max_rank")[:-1]  # None = d is valid
    c += _nonneg_int_cases("adaptive_randomized_eigh", lambda xp, v: ad(_A(xp), 0.1, block_size=v), "block_size", low=1)
    c += _nonneg_int_cases("adaptive_randomized_eigh", lambda xp, v: ad(_A(xp), 0.1, n_iter=v), "n_iter")
    c += _nonneg_int_cases("adaptive_randomized_eigh", lambda xp, v: ad(_A(xp), 0.1, est_iter=v), "est_iter", low=1)
    c += _rng_cases("adaptive_randomized_eigh", lambda xp, g: ad(_A(xp), 0.1, rng=g))
    # randomized_svd / randomized_range_finder (rectangular input)
    for name, fn, kw in (("randomized_svd", ol.randomized_svd, "rank"), ("randomized_range_finder", ol.randomized_range_finder, "size")):
        rect = lambda xp: xp.asarray(np.ones((D, D - 2)) + np.eye(D, D - 2), dtype=xp.float64)  # noqa: E731
        c += [
            Case(f"{name}: A list", lambda xp, fn=fn: fn(np.ones((4, 3)).tolist(), 2), TypeError, "A"),
            Case(f"{name}: A 1-D", lambda xp, fn=fn: fn(xp.ones((D,), dtype=xp.float64), 2), ValueError, "A"),
            Case(f"{name}: A int", lambda xp, fn=fn: fn(xp.asarray(np.ones((4, 3), dtype=np.int32)), 2), TypeError, "A"),
            Case(f"{name}: A complex", lambda xp, fn=fn: fn(xp.asarray(np.ones((4, 3), dtype=np.complex64)), 2), TypeError, "A"),
            Case(f"{name}: A NaN", lambda xp, fn=fn: fn(xp.asarray(np.full((4, 3), np.nan)), 2), ValueError, "A"),
            Case(f"{name}: A Inf", lambda xp, fn=fn: fn(xp.asarray(np.full((4, 3), np.inf)), 2), ValueError, "A"),
            Case(f"{name}: A empty", lambda xp, fn=fn: fn(xp.asarray(np.zeros((4, 0))), 2), ValueError, "A"),
            Case(f"{name}: A empty stack", lambda xp, fn=fn: fn(xp.asarray(np.zeros((0, 4, 3))), 2), ValueError, "A"),
        ]
        c += _rank_cases(name, lambda xp, r, fn=fn: fn(rect(xp), r), name=kw, high=D - 2)
        c += _nonneg_int_cases(name, lambda xp, v, fn=fn: fn(rect(xp), 2, n_iter=v), "n_iter")
        c += _rng_cases(name, lambda xp, g, fn=fn: fn(rect(xp), 2, rng=g))
    c += _nonneg_int_cases("randomized_svd", lambda xp, v: ol.randomized_svd(_A(xp), 2, oversample=v), "oversample")
    # estimate_spectral_error
    es = ol.estimate_spectral_error
    c += _matrix_cases("estimate_spectral_error", lambda xp, A: es(A, _approx(xp)))
    c += [
        Case("estimate_spectral_error: approx an array", lambda xp: es(_A(xp), _A(xp)), TypeError, "approx"),
        Case("estimate_spectral_error: approx float32", lambda xp: es(_A(xp), _approx(xp, dtype=xp.float32)), TypeError, "approx"),
        Case("estimate_spectral_error: approx wrong d", lambda xp: es(_A(xp), _approx(xp, d=D + 1)), ValueError, "approx"),
    ]
    c += _nonneg_int_cases("estimate_spectral_error", lambda xp, v: es(_A(xp), _approx(xp), n_iter=v), "n_iter", low=1)
    c += _nonneg_int_cases("estimate_spectral_error", lambda xp, v: es(_A(xp), _approx(xp), block_size=v), "block_size", low=1)
    c += _rng_cases("estimate_spectral_error", lambda xp, g: es(_A(xp), _approx(xp), rng=g))
    # brand_update
    bu = ol.brand_update
    c += [
        Case("brand_update: approx an array", lambda xp: bu(_A(xp), _X(xp), decay=0.9), TypeError, "approx"),
        Case("brand_update: X a list", lambda xp: bu(_approx(xp), np.ones((D, 2)).tolist(), decay=0.9), TypeError, "X"),
        Case("brand_update: X 1-D", lambda xp: bu(_approx(xp), xp.ones((D,), dtype=xp.float64), decay=0.9), ValueError, "X"),
        Case("brand_update: X int", lambda xp: bu(_approx(xp), xp.asarray(np.ones((D, 2), dtype=np.int64)), decay=0.9), TypeError, "X"),
        Case("brand_update: X complex", lambda xp: bu(_approx(xp), xp.asarray(np.ones((D, 2), dtype=np.complex128)), decay=0.9), TypeError, "X"),
        Case("brand_update: X float32 vs float64 state", lambda xp: bu(_approx(xp), _X(xp, dtype=xp.float32), decay=0.9), TypeError, "X"),
        Case("brand_update: X NaN", lambda xp: bu(_approx(xp), _X(xp, fill=np.nan), decay=0.9), ValueError, "X"),
        Case("brand_update: X Inf", lambda xp: bu(_approx(xp), _X(xp, fill=np.inf), decay=0.9), ValueError, "X"),
        Case("brand_update: X wrong rows", lambda xp: bu(_approx(xp), _X(xp, rows=D + 1), decay=0.9), ValueError, "X"),
        Case("brand_update: X batch mismatch", lambda xp: bu(_approx(xp), xp.ones((3, D, 2), dtype=xp.float64), decay=0.9), ValueError, "X"),
        Case("brand_update: X empty stack", lambda xp: bu(_approx(xp), xp.ones((0, D, 2), dtype=xp.float64), decay=0.9), ValueError, "X"),
    ]
    c += _real_cases("brand_update", lambda xp, v: bu(_approx(xp), _X(xp), decay=v), "decay", [0.0, 1.0, -0.5, 1.5])
    c += _nonneg_int_cases("brand_update", lambda xp, v: bu(_approx(xp), _X(xp), decay=0.9, rank=v), "rank")
    c += _flag_cases("brand_update", lambda xp, f: bu(_approx(xp), _X(xp), decay=0.9, check_inputs=f))
    # rayleigh_ritz_refresh
    rr = ol.rayleigh_ritz_refresh
    c += _matrix_cases("rayleigh_ritz_refresh", lambda xp, A: rr(_approx(xp), A))
    c += [
        Case("rayleigh_ritz_refresh: approx an array", lambda xp: rr(_A(xp), _A(xp)), TypeError, "approx"),
        Case("rayleigh_ritz_refresh: A float32", lambda xp: rr(_approx(xp), _A(xp, dtype=xp.float32)), TypeError, "A"),
        Case("rayleigh_ritz_refresh: A wrong d", lambda xp: rr(_approx(xp), _A(xp, _spd(D + 1))), ValueError, "A"),
        Case("rayleigh_ritz_refresh: A batch mismatch", lambda xp: rr(_approx(xp), xp.asarray(np.stack([_spd()] * 2))), ValueError, "A"),
    ]
    c += _real_cases("rayleigh_ritz_refresh", lambda xp, v: rr(_approx(xp), _A(xp), fraction=v), "fraction", [0.0, -0.2, 1.5])
    c += _rng_cases("rayleigh_ritz_refresh", lambda xp, g: rr(_approx(xp), _A(xp), rng=g))
    c += _flag_cases("rayleigh_ritz_refresh", lambda xp, f: rr(_approx(xp), _A(xp), check_inputs=f))
    # LowRankPSD and its methods
    U = lambda xp, dt=None: xp.asarray(np.eye(D, 2), dtype=dt or xp.float64)  # noqa: E731
    w = lambda xp, v=(2.0, 1.0), dt=None: xp.asarray(np.array(v), dtype=dt or xp.float64)  # noqa: E731
    c += [
        Case("LowRankPSD: eigvecs a list", lambda xp: LowRankPSD(np.eye(D, 2).tolist(), w(xp)), TypeError, "eigvecs"),
        Case("LowRankPSD: eigvecs int", lambda xp: LowRankPSD(xp.asarray(np.eye(D, 2, dtype=np.int64)), w(xp)), TypeError, "eigvecs"),
        Case("LowRankPSD: eigvecs 1-D", lambda xp: LowRankPSD(xp.ones((D,), dtype=xp.float64), w(xp)), ValueError, "eigvecs"),
        Case("LowRankPSD: eigvecs NaN", lambda xp: LowRankPSD(xp.asarray(np.full((D, 2), np.nan)), w(xp)), ValueError, "eigvecs"),
        Case("LowRankPSD: eigvecs r > d", lambda xp: LowRankPSD(xp.asarray(np.eye(2, 3)), w(xp, (3.0, 2.0, 1.0))), ValueError, "eigvecs"),
        Case("LowRankPSD: eigvals dtype", lambda xp: LowRankPSD(U(xp), w(xp, dt=xp.float32)), TypeError, "eigvals"),
        Case("LowRankPSD: eigvals shape", lambda xp: LowRankPSD(U(xp), w(xp, (3.0, 2.0, 1.0))), ValueError, "eigvals"),
        Case("LowRankPSD: eigvals negative", lambda xp: LowRankPSD(U(xp), w(xp, (2.0, -1.0))), ValueError, "eigvals"),
        Case("LowRankPSD: eigvals ascending", lambda xp: LowRankPSD(U(xp), w(xp, (1.0, 2.0))), ValueError, "eigvals"),
        Case("LowRankPSD: eigvals NaN", lambda xp: LowRankPSD(U(xp), w(xp, (np.nan, 1.0))), ValueError, "eigvals"),
        Case("LowRankPSD: complement negative", lambda xp: LowRankPSD(U(xp), w(xp), complement=-1.0), ValueError, "complement"),
        Case("LowRankPSD: complement unknown str", lambda xp: LowRankPSD(U(xp), w(xp), complement="max"), ValueError, "complement"),
        Case("LowRankPSD: complement nan", lambda xp: LowRankPSD(U(xp), w(xp), complement=float("nan")), ValueError, "complement"),
    ]
    for op in ("solve", "matmul", "damped_power"):
        args = {"solve": (0.1,), "matmul": (), "damped_power": (-0.5, 0.1)}[op]
        c += [
            Case(f"LowRankPSD.{op}: X list", lambda xp, op=op, a=args: getattr(_approx(xp), op)(np.ones((D, 1)).tolist(), *a), TypeError, "X"),
            Case(f"LowRankPSD.{op}: X rows", lambda xp, op=op, a=args: getattr(_approx(xp), op)(_X(xp, rows=D + 1), *a), ValueError, "X"),
            Case(f"LowRankPSD.{op}: X dtype", lambda xp, op=op, a=args: getattr(_approx(xp), op)(_X(xp, dtype=xp.float32), *a), TypeError, "X"),
            Case(f"LowRankPSD.{op}: X int", lambda xp, op=op, a=args: getattr(_approx(xp), op)(xp.asarray(np.ones((D, 1), dtype=np.int64)), *a), TypeError, "X"),
            Case(f"LowRankPSD.{op}: X NaN", lambda xp, op=op, a=args: getattr(_approx(xp), op)(_X(xp, fill=np.nan), *a), ValueError, "X"),
            Case(f"LowRankPSD.{op}: X Inf", lambda xp, op=op, a=args: getattr(_approx(xp), op)(_X(xp, fill=np.inf), *a), ValueError, "X"),
            Case(f"LowRankPSD.{op}: X 0-d", lambda xp, op=op, a=args: getattr(_approx(xp), op)(xp.asarray(1.0, dtype=xp.float64), *a), ValueError, "X"),
        ]
    c += _real_cases("LowRankPSD.solve", lambda xp, v: _approx(xp).solve(_X(xp), v), "damping", [-0.1, 0.0])
    c += [
        Case("LowRankPSD.damped_power: power nan", lambda xp: _approx(xp).damped_power(_X(xp), float("nan"), 0.1), ValueError, "power"),
        Case("LowRankPSD.damped_power: power str", lambda xp: _approx(xp).damped_power(_X(xp), "-1", 0.1), TypeError, "power"),
    ]
    c += _rank_cases("LowRankPSD.truncate", lambda xp, r: _approx(xp).truncate(r), high=2)[1:]  # 0 is valid
    # empty_lowrank
    el = ol.empty_lowrank
    c += _rank_cases("empty_lowrank", lambda xp, v: el(v, xp=xp), name="dim", high=10**9)[:2] + [
        Case("empty_lowrank: dim float", lambda xp: el(2.5, xp=xp), TypeError, "dim"),
        Case("empty_lowrank: rank > dim", lambda xp: el(3, rank=4, xp=xp), ValueError, "rank"),
        Case("empty_lowrank: rank -1", lambda xp: el(3, rank=-1, xp=xp), ValueError, "rank"),
        Case("empty_lowrank: batch_shape -1", lambda xp: el(3, batch_shape=(-1,), xp=xp), ValueError, "batch_shape"),
        Case("empty_lowrank: batch_shape int", lambda xp: el(3, batch_shape=2, xp=xp), TypeError, "batch_shape"),
        Case("empty_lowrank: dtype int", lambda xp: el(3, xp=xp, dtype=xp.int64), TypeError, "dtype"),
        Case("empty_lowrank: complement -1", lambda xp: el(3, xp=xp, complement=-1.0), ValueError, "complement"),
        Case("empty_lowrank: complement nan", lambda xp: el(3, xp=xp, complement=float("nan")), ValueError, "complement"),
        Case("empty_lowrank: xp and like", lambda xp: el(3, xp=xp, like=_X(xp)), TypeError, "like"),
        Case("empty_lowrank: like a list", lambda xp: el(3, like=[1.0]), TypeError, "like"),
        Case("empty_lowrank: like int", lambda xp: el(3, like=xp.asarray(np.ones(2, dtype=np.int64))), TypeError, "dtype"),
    ]
    # decay.py: a priori bounds
    eb = ol.ea_eigenvalue_bound
    good_eb = dict(decay=0.9, increment_rank=4, increment_norm=1.0)
    c += _rank_cases("ea_eigenvalue_bound", lambda xp, v: eb(v, **good_eb), name="index", high=10**9)[:2]
    c += _real_cases("ea_eigenvalue_bound", lambda xp, v: eb(3, **{**good_eb, "decay": v}), "decay", [0.0, 1.0, -1.0])
    c += _nonneg_int_cases("ea_eigenvalue_bound", lambda xp, v: eb(3, **{**good_eb, "increment_rank": v}), "increment_rank", low=1)
    c += _real_cases("ea_eigenvalue_bound", lambda xp, v: eb(3, **{**good_eb, "increment_norm": v}), "increment_norm", [-1.0])
    c += _real_cases("ea_eigenvalue_bound", lambda xp, v: eb(3, **good_eb, init_norm=v), "init_norm", [-1.0])
    c += _nonneg_int_cases("ea_eigenvalue_bound", lambda xp, v: eb(3, **good_eb, steps=v), "steps")
    sb = ol.ea_stream_eigenvalue_bound
    good_sb = dict(decay=0.9, increment_norms=[1.0, 2.0], increment_ranks=2)
    c += [
        Case("ea_stream_eigenvalue_bound: index 0", lambda xp: sb(0, **good_sb), ValueError, "index"),
        Case("ea_stream_eigenvalue_bound: decay 1", lambda xp: sb(1, **{**good_sb, "decay": 1.0}), ValueError, "decay"),
        Case("ea_stream_eigenvalue_bound: norms negative", lambda xp: sb(1, **{**good_sb, "increment_norms": [1.0, -2.0]}), ValueError, "increment_norms"),
        Case("ea_stream_eigenvalue_bound: norms nan", lambda xp: sb(1, **{**good_sb, "increment_norms": [float("nan"), 1.0]}), ValueError, "increment_norms"),
        Case("ea_stream_eigenvalue_bound: norms str", lambda xp: sb(1, **{**good_sb, "increment_norms": "ab"}), TypeError, "increment_norms"),
        Case("ea_stream_eigenvalue_bound: ranks length", lambda xp: sb(1, **{**good_sb, "increment_ranks": [1, 2, 3]}), ValueError, "increment_ranks"),
        Case("ea_stream_eigenvalue_bound: ranks negative", lambda xp: sb(1, **{**good_sb, "increment_ranks": -1}), ValueError, "increment_ranks"),
        Case("ea_stream_eigenvalue_bound: ranks float", lambda xp: sb(1, **{**good_sb, "increment_ranks": 1.5}), TypeError, "increment_ranks"),
        Case("ea_stream_eigenvalue_bound: traces length", lambda xp: sb(1, **good_sb, increment_traces=[1.0]), ValueError, "increment_traces"),
        Case("ea_stream_eigenvalue_bound: init_trace < init_norm", lambda xp: sb(1, **good_sb, init_norm=2.0, init_trace=1.0), ValueError, "init_trace"),
        Case("ea_stream_eigenvalue_bound: init_norm -1", lambda xp: sb(1, **good_sb, init_norm=-1.0), ValueError, "init_norm"),
    ]
    rt = ol.ea_rank_for_tolerance
    c += _real_cases("ea_rank_for_tolerance", lambda xp, v: rt(v, decay=0.9, increment_rank=4), "tol", [0.0, -0.1])
    c += _real_cases("ea_rank_for_tolerance", lambda xp, v: rt(0.1, decay=v, increment_rank=4), "decay", [0.0, 1.0])
    c += _nonneg_int_cases("ea_rank_for_tolerance", lambda xp, v: rt(0.1, decay=0.9, increment_rank=v), "increment_rank", low=1)
    di = ol.damped_inverse_error
    c += _real_cases("damped_inverse_error", lambda xp, v: di(v, 0.1), "next_eigval", [-1.0])
    c += _real_cases("damped_inverse_error", lambda xp, v: di(0.5, v), "damping", [0.0, -1.0])
    ri = ol.ea_rank_for_inverse_error
    good_ri = dict(damping=0.1, decay=0.9, increment_rank=4, increment_norm=1.0)
    c += _real_cases("ea_rank_for_inverse_error", lambda xp, v: ri(v, **good_ri), "error", [0.0, -1.0])
    c += _real_cases("ea_rank_for_inverse_error", lambda xp, v: ri(0.1, **{**good_ri, "damping": v}), "damping", [0.0])
    c += _real_cases("ea_rank_for_inverse_error", lambda xp, v: ri(0.1, **{**good_ri, "decay": v}), "decay", [1.0])
    c += _nonneg_int_cases("ea_rank_for_inverse_error", lambda xp, v: ri(0.1, **{**good_ri, "increment_rank": v}), "increment_rank", low=1)
    c += _real_cases("ea_rank_for_inverse_error", lambda xp, v: ri(0.1, **{**good_ri, "increment_norm": v}), "increment_norm", [-1.0])
    eg = ol.eigh
    c += [
        Case("eigh: A 1-D", lambda xp: eg(xp.ones(4, dtype=xp.float64)), ValueError, "A"),
        Case("eigh: A not square", lambda xp: eg(xp.ones((4, 3), dtype=xp.float64)), ValueError, "A"),
        Case("eigh: A integer", lambda xp: eg(xp.ones((3, 3), dtype=xp.int64)), TypeError, "A"),
        Case("eigh: A non-finite", lambda xp: eg(xp.full((3, 3), float("nan"), dtype=xp.float64)), ValueError, "A"),
        Case("eigh: check_inputs not a bool", lambda xp: eg(_A(xp), check_inputs=1), TypeError, "check_inputs"),
    ]
    return c


CATALOGUE = _catalogue()


@pytest.mark.parametrize("case", CATALOGUE, ids=[c.name for c in CATALOGUE])
def test_bad_input_is_rejected_naming_the_argument(xp, case):
    if case.needs and not hasattr(xp, case.needs):
        pytest.skip(f"{xp.__name__} has no {case.needs}")
    with pytest.raises((ValueError, TypeError)) as info:
        case.call(xp)
    assert isinstance(info.value, case.exc), f"{case.name}: {type(info.value).__name__}: {info.value}"
    assert f"`{case.arg}`" in str(info.value), f"{case.name}: message does not name `{case.arg}`: {info.value}"


# --------------------------------------------------------------------------- two libraries at once


def _torch():
    return pytest.importorskip("torch")


def _mixed_cases() -> list[Case]:
    def t(a):
        return _torch().from_numpy(np.ascontiguousarray(a))

    A = _spd()
    npx = __import__("array_api_compat.numpy", fromlist=["numpy"])
    return [
        Case("estimate_spectral_error: A numpy, approx torch", lambda _: ol.estimate_spectral_error(A, LowRankPSD(t(np.eye(D, 2)), t(np.array([2.0, 1.0])))), TypeError, "A"),
        Case("brand_update: approx numpy, X torch", lambda _: ol.brand_update(_approx(npx), t(np.ones((D, 2))), decay=0.9), TypeError, "X"),
        Case("rayleigh_ritz_refresh: approx numpy, A torch", lambda _: ol.rayleigh_ritz_refresh(_approx(npx), t(A)), TypeError, "A"),
        Case("LowRankPSD: eigvecs numpy, eigvals torch", lambda _: LowRankPSD(np.eye(D, 2), t(np.array([2.0, 1.0]))), TypeError, "eigvals"),
        Case("LowRankPSD.solve: X torch for a numpy factor", lambda _: _approx(npx).solve(t(np.ones((D, 1))), 0.1), TypeError, "X"),
        Case("randomized_eigh: torch meta tensor", lambda _: ol.randomized_eigh(_torch().empty(D, D, device="meta"), 2), ValueError, "A"),
        Case("brand_update: X a torch meta tensor", lambda _: ol.brand_update(
            LowRankPSD(t(np.eye(D, 2)), t(np.array([2.0, 1.0]))), _torch().empty(D, 2, dtype=_torch().float64, device="meta"), decay=0.9), ValueError, "X"),
        Case("LowRankPSD: eigvecs a torch meta tensor", lambda _: LowRankPSD(_torch().empty(D, 2, device="meta"), _torch().empty(2, device="meta")), ValueError, "eigvecs"),
    ]


MIXED = _mixed_cases()


@pytest.mark.parametrize("case", MIXED, ids=[c.name for c in MIXED])
def test_mixed_namespaces_and_meta_tensors_are_rejected_by_name(case):
    with pytest.raises((ValueError, TypeError)) as info:
        case.call(None)
    assert isinstance(info.value, case.exc), f"{case.name}: {type(info.value).__name__}: {info.value}"
    assert f"`{case.arg}`" in str(info.value), f"{case.name}: message does not name `{case.arg}`: {info.value}"
