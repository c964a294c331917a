"""EA spectral-decay bounds (algorithms.md §2, §7.6) against dense eigenvalues of random streams.

The oracle is the float64 eigendecomposition of the EA built from the increments
as the backend stores them (cast to float64).  The bounds are exact statements
about that matrix, so the only slack is the oracle's own rounding:
``|λ_j computed - λ_j| <= c * d * eps64 * ||M||`` with ``c = 10``.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
from hypothesis import given, strategies as st

from onlinela import (
    damped_inverse_error,
    ea_eigenvalue_bound,
    ea_rank_for_inverse_error,
    ea_rank_for_tolerance,
    ea_stream_eigenvalue_bound,
)
from onlinela.testing import to_numpy
from onlinela.testing import strategies as ost

EPS64 = float(np.finfo(np.float64).eps)


def _ea(stream, init: np.ndarray | None, d: int) -> tuple[np.ndarray, list[np.ndarray]]:
    rho = stream.decay
    M = np.zeros((d, d)) if init is None else init.copy()
    Cs = []
    for X in stream.increments:
        Xd = to_numpy(X).astype(np.float64)
        C = Xd @ Xd.T
        Cs.append(C)
        M = rho * M + (1 - rho) * C
    return M, Cs


def _init(data, d: int) -> np.ndarray | None:
    """None (M_0 = 0) or a random PSD M_0 of random norm and rank."""
    if not data.draw(st.booleans()):
        return None
    rng = np.random.default_rng(data.draw(st.integers(0, 2**32 - 1)))
    k = data.draw(st.integers(1, d))
    Y = rng.standard_normal((d, k)) * 10.0 ** rng.uniform(-1, 1, k)
    return Y @ Y.T / d


@given(data=st.data(), d=st.integers(4, 24))
def test_weyl_bound_holds_for_every_index(xp, data, d):
    stream = data.draw(ost.ea_streams(xp, d, dtypes=[xp.float32, xp.float64], styles=ost.STREAM_STYLES))
    M0 = _init(data, d)
    M, Cs = _ea(stream, M0, d)
    lam = np.linalg.eigvalsh(M)[::-1]
    K = max(np.linalg.norm(C, 2) for C in Cs)  # of the increments as stored (after the cast)
    m0 = 0.0 if M0 is None else float(np.linalg.norm(M0, 2))
    s, k = stream.increment_rank, len(Cs)
    slack = 10.0 * d * EPS64 * max(lam[0], 1e-300)
    for j in range(1, d + 1):
        sharp = ea_eigenvalue_bound(j, decay=stream.decay, increment_rank=s, increment_norm=K, init_norm=m0, steps=k)
        assert lam[j - 1] <= sharp + slack, (j, lam[j - 1], sharp)
        if m0 == 0.0 or (j - 1) // s <= k:  # the steps-free form's assumption
            plain = ea_eigenvalue_bound(j, decay=stream.decay, increment_rank=s, increment_norm=K, init_norm=m0)
            assert lam[j - 1] <= plain + slack
            assert sharp <= plain * (1 + 1e-12)  # knowing k never hurts
    # the bound is not vacuous: equality for one rank-s increment from zero (j <= s)
    if M0 is None and k == 1:
        for j in range(1, s + 1):
            b = ea_eigenvalue_bound(j, decay=stream.decay, increment_rank=s, increment_norm=K, steps=1)
            assert b == pytest.approx((1 - stream.decay) * K)
            assert lam[0] == pytest.approx(b, rel=1e-9)


@given(data=st.data(), d=st.integers(4, 24), use_traces=st.booleans())
def test_stream_bound_holds_and_is_never_looser_than_weyl(xp, data, d, use_traces):
    stream = data.draw(ost.ea_streams(xp, d, dtypes=[xp.float32, xp.float64], styles=ost.STREAM_STYLES))
    M0 = _init(data, d)
    M, Cs = _ea(stream, M0, d)
    lam = np.linalg.eigvalsh(M)[::-1]
    norms = [float(np.linalg.norm(C, 2)) for C in Cs]
    traces = [float(np.trace(C)) for C in Cs]
    ranks = [int(np.linalg.matrix_rank(C)) for C in Cs]  # <= s; exact ranks sharpen the bound
    m0 = 0.0 if M0 is None else float(np.linalg.norm(M0, 2))
    t0 = None if M0 is None else float(np.trace(M0))
    k, s = len(Cs), stream.increment_rank
    slack = 10.0 * d * EPS64 * max(lam[0], 1e-300)
    strictly_better = 0
    for j in range(1, d + 1):
        b = ea_stream_eigenvalue_bound(
            j,
            decay=stream.decay,
            increment_norms=norms,
            increment_ranks=ranks,
            increment_traces=traces if use_traces else None,
            init_norm=m0,
            init_trace=t0,
        )
        assert lam[j - 1] <= b * (1 + 1e-12) + slack, (j, lam[j - 1], b)
        weyl = ea_eigenvalue_bound(j, decay=stream.decay, increment_rank=s, increment_norm=max(norms), init_norm=m0, steps=k)
        assert b <= weyl
        if M0 is None:  # then the steps-free Weyl form is valid too
            assert b <= ea_eigenvalue_bound(j, decay=stream.decay, increment_rank=s, increment_norm=max(norms))
        strictly_better += b < weyl * (1 - 1e-9)
    # with one increment's norm alone a stream of >= 2 unequal increments is usually sharper
    if k >= 2 and len(set(norms)) > 1 and M0 is None:
        assert strictly_better >= 1


def test_stream_bound_trace_term_on_a_flat_increment():
    """One increment C = I_d / d (norm 1/d, trace 1): the trace term gives λ_j <= (1-ρ)/j-ish."""
    d, rho = 50, 0.5
    b_norm = ea_stream_eigenvalue_bound(10, decay=rho, increment_norms=[1.0], increment_ranks=d)
    b_tr = ea_stream_eigenvalue_bound(10, decay=rho, increment_norms=[1.0], increment_ranks=d, increment_traces=[1.0])
    assert b_norm == pytest.approx(0.5) and b_tr == pytest.approx(0.05)


@given(tol=st.floats(1e-6, 2.0), decay=st.floats(0.05, 0.999), s=st.integers(1, 300))
def test_rank_for_tolerance_is_the_smallest_guaranteeing_rank(tol, decay, s):
    m = ea_rank_for_tolerance(tol, decay=decay, increment_rank=s)
    assert m % s == 0
    assert ea_eigenvalue_bound(m + 1, decay=decay, increment_rank=s, increment_norm=1.0) <= tol
    if m:
        assert ea_eigenvalue_bound(m, decay=decay, increment_rank=s, increment_norm=1.0) > tol


def test_rank_for_tolerance_matches_the_design_example():
    # algorithms.md §2: rho = 0.95, eps = 0.03, s = 256 gives ~17.7k modes
    assert ea_rank_for_tolerance(0.03, decay=0.95, increment_rank=256) == 256 * 69
    assert ea_rank_for_tolerance(1.0, decay=0.95, increment_rank=256) == 0
    assert ea_rank_for_tolerance(0.5, decay=0.5, increment_rank=3) == 3  # rho^1 = tol exactly


@given(data=st.data(), damping=st.floats(1e-4, 10.0))
def test_damped_inverse_error_is_exact_for_top_r_truncation(xp, data, damping):
    case = data.draw(ost.psd_cases(xp, dims=st.integers(2, 24), dtypes=[xp.float64]))
    lam, Q = case.eigvals, case.eigvecs
    d = lam.shape[0]
    r = data.draw(st.integers(0, d - 1))
    M = (Q * lam) @ Q.T
    Mr = (Q[:, :r] * lam[:r]) @ Q[:, :r].T
    diff = np.linalg.inv(M + damping * np.eye(d)) - np.linalg.inv(Mr + damping * np.eye(d))
    got = damped_inverse_error(float(lam[r]), damping)
    cond = (lam[0] + damping) / damping
    assert np.linalg.norm(diff, 2) == pytest.approx(got, rel=1e-9, abs=100 * d * EPS64 * cond / damping)
    assert got < 1.0 / damping


@given(data=st.data(), d=st.integers(6, 20), err=st.floats(1e-3, 10.0), damping=st.floats(1e-2, 1.0))
def test_rank_for_inverse_error_guarantees_the_preconditioner_error(xp, data, d, err, damping):
    stream = data.draw(ost.ea_streams(xp, d, dtypes=[xp.float64]))
    M, Cs = _ea(stream, None, d)
    K = max(float(np.linalg.norm(C, 2)) for C in Cs)
    r = ea_rank_for_inverse_error(err, damping=damping, decay=stream.decay, increment_rank=stream.increment_rank, increment_norm=K)
    lam, Q = np.linalg.eigh(M)
    lam, Q = lam[::-1].clip(0), Q[:, ::-1]
    if r < d:
        Mr = (Q[:, :r] * lam[:r]) @ Q[:, :r].T
        diff = np.linalg.inv(M + damping * np.eye(d)) - np.linalg.inv(Mr + damping * np.eye(d))
        assert np.linalg.norm(diff, 2) <= err * (1 + 1e-9) + 100 * d * EPS64 / damping
    if r >= stream.increment_rank:  # minimal: one block fewer is not guaranteed by the bound
        b = ea_eigenvalue_bound(r - stream.increment_rank + 1, decay=stream.decay, increment_rank=stream.increment_rank, increment_norm=K)
        assert damped_inverse_error(b, damping) > err


# ----------------------------------------------------------------------------- bad input


@pytest.mark.parametrize("decay", [0.0, 1.0, -0.1, 1.1, float("nan"), float("inf")])
def test_every_function_rejects_decay_outside_unit_interval(decay):
    calls = [
        lambda: ea_eigenvalue_bound(1, decay=decay, increment_rank=1, increment_norm=1.0),
        lambda: ea_stream_eigenvalue_bound(1, decay=decay, increment_norms=[1.0], increment_ranks=1),
        lambda: ea_rank_for_tolerance(0.1, decay=decay, increment_rank=1),
        lambda: ea_rank_for_inverse_error(0.1, damping=1.0, decay=decay, increment_rank=1, increment_norm=1.0),
    ]
    for call in calls:
        with pytest.raises(ValueError, match="`decay` must be a finite number in \\(0.0, 1.0\\)"):
            call()


@pytest.mark.parametrize(
    "call, exc, match",
    [
        (lambda: ea_eigenvalue_bound(0, decay=0.5, increment_rank=1, increment_norm=1.0), ValueError, "`index` must satisfy 1 <= index"),
        (lambda: ea_eigenvalue_bound(1.0, decay=0.5, increment_rank=1, increment_norm=1.0), TypeError, "`index` must be an int"),
        (lambda: ea_eigenvalue_bound(1, decay=0.5, increment_rank=0, increment_norm=1.0), ValueError, "`increment_rank`"),
        (lambda: ea_eigenvalue_bound(1, decay=0.5, increment_rank=1, increment_norm=-1.0), ValueError, "`increment_norm`"),
        (lambda: ea_eigenvalue_bound(1, decay=0.5, increment_rank=1, increment_norm=1.0, init_norm=-1.0), ValueError, "`init_norm`"),
        (lambda: ea_eigenvalue_bound(1, decay=0.5, increment_rank=1, increment_norm=1.0, steps=-1), ValueError, "`steps`"),
        (lambda: ea_eigenvalue_bound(1, decay="0.5", increment_rank=1, increment_norm=1.0), TypeError, "`decay` must be a real number"),
        (lambda: ea_eigenvalue_bound(True, decay=0.5, increment_rank=1, increment_norm=1.0), TypeError, "`index`"),
        (lambda: ea_stream_eigenvalue_bound(1, decay=0.5, increment_norms=[1.0, -1.0], increment_ranks=1), ValueError, "`increment_norms`"),
        (lambda: ea_stream_eigenvalue_bound(1, decay=0.5, increment_norms=[1.0], increment_ranks=[1, 1]), ValueError, "`increment_ranks` must have one entry per increment"),
        (lambda: ea_stream_eigenvalue_bound(1, decay=0.5, increment_norms=[1.0], increment_ranks=1, increment_traces=[1.0, 2.0]), ValueError, "`increment_traces`"),
        (lambda: ea_stream_eigenvalue_bound(1, decay=0.5, increment_norms=[1.0], increment_ranks=1, init_norm=2.0, init_trace=1.0), ValueError, "`init_trace` must be >= `init_norm`"),
        (lambda: ea_stream_eigenvalue_bound(1, decay=0.5, increment_norms=5, increment_ranks=1), ValueError, "`increment_norms` must be a sequence"),
        (lambda: ea_rank_for_tolerance(0.0, decay=0.5, increment_rank=1), ValueError, "`tol`"),
        (lambda: ea_rank_for_tolerance(-1.0, decay=0.5, increment_rank=1), ValueError, "`tol`"),
        (lambda: damped_inverse_error(-1.0, 1.0), ValueError, "`next_eigval`"),
        (lambda: damped_inverse_error(1.0, 0.0), ValueError, "`damping`"),
        (lambda: damped_inverse_error(1.0, float("nan")), ValueError, "`damping`"),
        (lambda: ea_rank_for_inverse_error(0.0, damping=1.0, decay=0.5, increment_rank=1, increment_norm=1.0), ValueError, "`error`"),
        (lambda: ea_rank_for_inverse_error(0.1, damping=-1.0, decay=0.5, increment_rank=1, increment_norm=1.0), ValueError, "`damping`"),
    ],
)
def test_bad_arguments_are_named(call, exc, match):
    with pytest.raises(exc, match=match):
        call()


def test_outputs_are_python_numbers():
    assert type(ea_eigenvalue_bound(np.int64(3), decay=np.float32(0.5), increment_rank=2, increment_norm=np.float64(1.0))) is float
    assert type(ea_stream_eigenvalue_bound(2, decay=0.5, increment_norms=np.ones(3), increment_ranks=1)) is float
    assert type(ea_rank_for_tolerance(0.1, decay=0.5, increment_rank=2)) is int
    assert type(damped_inverse_error(1.0, 0.5)) is float
    assert math.isclose(damped_inverse_error(0.0, 0.5), 0.0)
