"""Per-factor curvature state: one interface, four storage/decomposition strategies.

Every Kronecker factor (``A`` or ``G`` of one layer) owns a :class:`FactorState`
that receives the statistics captured by the hooks, keeps its exponential
average (EA) ``M_k = ρ M_{k-1} + (1-ρ) C_k`` in some form, and exposes a
decomposition snapshot :class:`FactorEigen` (a :class:`onlinela.LowRankPSD`)
that the preconditioner applies.  The strategies (algorithms.md §1, §3, §4):

============================  ==============================================  ====================================
class                         storage                                         decomposition
============================  ==============================================  ====================================
:class:`DenseFactor`          dense EA ``M`` (``d × d``)                      full ``eigh`` every ``T_inv``
:class:`RandomizedFactor`     dense EA ``M``                                  randomized (RS / SRE / Nyström), or
                                                                              ``eigh`` where cheaper
:class:`BrandFactor`          only ``(U, D)`` (``d × r``): memory ``O(dr)``   Brand update every ``T_B``
:class:`BrandDenseFactor`     dense EA ``M`` and ``(U, D)``                   Brand update, periodic randomized
                                                                              overwrite, Rayleigh–Ritz correction
============================  ==============================================  ====================================

The EA starts from zero and every snapshot is *debiased* by ``1/(1-ρ^k)``
after ``k`` updates (as Adam does), so the factor has the scale of one
increment from the first step on.  Both damping conventions are relative to
the factor's largest eigenvalue, so the debiasing only fixes the step length
in early steps; it replaces the papers' identity initialisation, whose
``ρ^k I`` term would otherwise act as extra damping for ~100 updates.

Rank policies (:class:`FixedRank`, :class:`ScheduledRank`,
:class:`AdaptiveRank`, :class:`ErrorTargetRank`) choose each low-rank
factor's rank before each decomposition from the previous one.
"""

from __future__ import annotations

import abc
import logging
import math
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, ClassVar, Literal

import numpy as np
import torch

from onlinela import LowRankPSD
from onlinela import eigh as onlinela_eigh
from onlinela import brand_update, empty_lowrank, randomized_eigh, rayleigh_ritz_refresh

from .logs import WarningCounter

__all__ = [
    "AdaptiveRank",
    "BrandDenseFactor",
    "BrandFactor",
    "DenseFactor",
    "EXACT_BELOW",
    "ErrorTargetRank",
    "FactorEigen",
    "FactorState",
    "FixedRank",
    "RandomizedFactor",
    "RankPolicy",
    "ScheduledRank",
    "as_rank_policy",
    "exact_is_cheaper",
    "fallback_takes_eigh",
]

logger = logging.getLogger(__name__)

#: Eigenvalues below this fraction of the largest are set to 0 (algorithms.md §1).
EIG_CLIP = 1e-10


# =========================================================================== rank policies
class RankPolicy(abc.ABC):
    """Chooses the rank of a low-rank factor before each decomposition."""

    @abc.abstractmethod
    def next_rank(self, step: int, current: int, eigvals: torch.Tensor | None, errors: list[float], damping: float) -> int:
        """The rank for the decomposition at ``step``.

        Parameters
        ----------
        step : int
            The optimizer step (0-based).
        current : int
            The rank of the previous decomposition (the policy's initial rank before the first).
        eigvals : Tensor of shape (r,) or None
            Debiased eigenvalues of the previous decomposition, descending (None before the first).
        errors : list of float
            ``λ_r / λ_1`` of the previous decompositions, oldest first.
        damping : float
            The factor's relative damping (``μ = damping · λ_1``; ``√λ`` of the
            preconditioner's ``λ``).
        """

    @property
    @abc.abstractmethod
    def initial(self) -> int:
        """Rank of the first decomposition."""


@dataclass(frozen=True)
class FixedRank(RankPolicy):
    """Always ``rank`` (the papers' ``r = 220``)."""

    rank: int = 220

    def __post_init__(self) -> None:
        _check_positive_int(self.rank, "rank")

    @property
    def initial(self) -> int:
        return self.rank

    def next_rank(self, step, current, eigvals, errors, damping) -> int:  # noqa: D102
        return self.rank


@dataclass(frozen=True)
class ScheduledRank(RankPolicy):
    """``schedule(step)``: any callable of the 0-based step returning a positive int."""

    schedule: Callable[[int], int]

    @property
    def initial(self) -> int:
        return _check_positive_int(self.schedule(0), "rank(0)")

    def next_rank(self, step, current, eigvals, errors, damping) -> int:  # noqa: D102
        return _check_positive_int(self.schedule(step), f"rank({step})")


@dataclass(frozen=True)
class AdaptiveRank(RankPolicy):
    """The papers' adaptive rule (algorithms.md §3).

    Before each decomposition, ``err`` = mean of ``λ_r/λ_1`` over the last
    ``window`` decompositions of this factor; the rank drops by ``step`` when
    ``err < target - lower`` and grows by ``step`` when ``err > target + upper``,
    within ``[min_rank, max_rank]``.  Defaults: 220 start, target 0.033,
    bands 0.007 / 0.02, step 10, range [10, 700].
    """

    start: int = 220
    target: float = 0.033
    lower: float = 0.007
    upper: float = 0.02
    step: int = 10
    min_rank: int = 10
    max_rank: int = 700
    window: int = 3

    def __post_init__(self) -> None:
        for name in ("start", "step", "min_rank", "max_rank", "window"):
            _check_positive_int(getattr(self, name), name)
        if not self.min_rank <= self.start <= self.max_rank:
            raise ValueError(
                f"AdaptiveRank needs min_rank <= start <= max_rank, got {self.min_rank}, {self.start}, {self.max_rank}"
            )
        if not (0 < self.target < 1 and 0 <= self.lower < self.target and self.upper >= 0):
            raise ValueError("AdaptiveRank needs 0 < target < 1, 0 <= lower < target and upper >= 0")

    @property
    def initial(self) -> int:
        return self.start

    def next_rank(self, step, current, eigvals, errors, damping) -> int:  # noqa: D102
        if not errors:
            return current
        err = float(np.mean(errors[-self.window :]))
        if err < self.target - self.lower:
            current -= self.step
        elif err > self.target + self.upper:
            current += self.step
        return int(min(max(current, self.min_rank), self.max_rank))


@dataclass(frozen=True)
class ErrorTargetRank(RankPolicy):
    r"""Smallest rank whose truncation error on the damped inverse is below ``tol``.

    Dropping the eigenvalues after the ``r``-th changes ``(M + μI)⁻¹`` by at
    most ``λ_{r+1} / (μ(μ + λ_{r+1}))`` in spectral norm (algorithms.md §2);
    relative to ``‖(M+μI)⁻¹‖ ≤ 1/μ`` that is ``e_r = λ_{r+1} / (μ + λ_{r+1})``
    with ``μ`` the factor's damping (``√λ · λ_1`` for the preconditioner's ``λ``).  From the previous decomposition's eigenvalues the next
    rank is the smallest ``r`` with ``e_r ≤ tol`` (``λ_{r+1}`` read off the
    computed eigenvalues), or ``ceil(growth · r)`` when even the smallest
    computed eigenvalue misses the target (the tail is then unknown).
    """

    tol: float = 0.05
    start: int = 220
    min_rank: int = 10
    max_rank: int = 2000
    growth: float = 1.5

    def __post_init__(self) -> None:
        for name in ("start", "min_rank", "max_rank"):
            _check_positive_int(getattr(self, name), name)
        if not 0 < self.tol < 1:
            raise ValueError(f"ErrorTargetRank needs 0 < tol < 1, got {self.tol}")
        if not self.growth > 1:
            raise ValueError(f"ErrorTargetRank needs growth > 1, got {self.growth}")
        if not self.min_rank <= self.start <= self.max_rank:
            raise ValueError("ErrorTargetRank needs min_rank <= start <= max_rank")

    @property
    def initial(self) -> int:
        return self.start

    def next_rank(self, step, current, eigvals, errors, damping) -> int:  # noqa: D102
        if eigvals is None or eigvals.numel() == 0:
            return current
        w = eigvals.detach().double().cpu()
        if float(w[0]) <= 0:
            return self.min_rank
        mu = damping * float(w[0])
        err = w / (mu + w)  # err[j] = e_j: error of keeping the first j eigenpairs (0-based)
        ok = torch.nonzero(err <= self.tol)
        rank = int(ok[0]) if ok.numel() else math.ceil(self.growth * current)
        return int(min(max(rank, self.min_rank), self.max_rank))


def as_rank_policy(rank: int | Callable[[int], int] | RankPolicy) -> RankPolicy:
    """Normalise the ``rank`` argument: an int, a callable of the step, or a :class:`RankPolicy`."""
    if isinstance(rank, RankPolicy):
        return rank
    if callable(rank):
        return ScheduledRank(rank)
    return FixedRank(_check_positive_int(rank, "rank"))


def _check_positive_int(value: Any, name: str) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)):
        raise TypeError(f"`{name}` must be a positive int, got {type(value).__name__}")
    if value <= 0:
        raise ValueError(f"`{name}` must be a positive int (>= 1), got {value}")
    return int(value)


# =========================================================================== snapshots
@dataclass(frozen=True)
class FactorEigen:
    """A debiased decomposition of one factor, ready to apply.

    Attributes
    ----------
    approx : onlinela.LowRankPSD
        ``M ≈ U diag(w) Uᵀ`` (complement eigenvalue 0) in the inverse dtype;
        full rank for exact decompositions.
    max_eig, min_eig : float
        The largest (the damping scale) and smallest kept eigenvalue as Python
        floats, read once per decomposition so applying the preconditioner
        never synchronises with the device.
    cache : dict
        Quantities derived from this snapshot by :mod:`onlinela_torch.inverse`
        (damped inverse coefficients, dense damped inverses, the mean
        eigenvalue), each keyed by the damping it was computed for; they live
        and die with the snapshot, so a new decomposition never sees stale ones.
    """

    approx: LowRankPSD
    max_eig: float
    min_eig: float
    cache: dict = field(default_factory=dict, compare=False, repr=False)


# =========================================================================== states
class FactorState(abc.ABC):
    """Curvature state of one Kronecker factor.

    Lifecycle per optimizer step: the hooks call :meth:`accumulate` with the
    rows of each micro-batch; :meth:`update_ea` folds the step's increment
    ``C = scale · Σ rowsᵀ rows`` into the EA, :meth:`update_brand` Brand-updates
    ``(U, D)``, :meth:`discard_pending` drops what neither used;
    :meth:`refresh` recomputes the decomposition when scheduled; :attr:`eigen`
    is what the preconditioner applies.  Non-finite increments and failed
    decompositions are skipped, logged and counted in :attr:`skipped`; the
    state never holds NaN.

    Parameters
    ----------
    dim : int
        ``d``, the factor dimension.
    decay : float
        ``ρ`` in (0, 1).
    rank : RankPolicy
        Rank policy of low-rank decompositions (unused by :class:`DenseFactor`).
    dtype, inv_dtype : torch.dtype
        Dtype of the accumulated statistics / of the decomposition snapshot.
    device : torch.device
    rng : numpy.random.Generator
        Source of the randomized sketches (its state is part of :meth:`state_dict`).
    name : str
        For log messages, e.g. ``"features.0/A"``.
    warn : WarningCounter, optional
        Shared rate-limited log of skipped updates (the preconditioner's, so
        its ``stats()`` counts them); a private one by default.
    """

    kind: ClassVar[str]
    #: whether the dense EA ``M`` is kept (needs the Gram of the rows)
    keeps_dense: ClassVar[bool] = True
    #: whether the raw rows of the step are kept (Brand updates need them)
    keeps_rows: ClassVar[bool] = False

    def __init__(
        self,
        dim: int,
        *,
        decay: float,
        rank: RankPolicy,
        dtype: torch.dtype,
        inv_dtype: torch.dtype,
        device: torch.device,
        rng: np.random.Generator,
        name: str = "",
        warn: WarningCounter | None = None,
    ) -> None:
        self.dim = dim
        self._warn = warn if warn is not None else WarningCounter(logger)
        self.decay = decay
        self.rank_policy = rank
        self.dtype = dtype
        self.inv_dtype = inv_dtype
        self.device = device
        self.rng = rng
        self.name = name
        self.rank = min(rank.initial, dim)
        self.errors: list[float] = []
        self.eigen: FactorEigen | None = None
        self.skipped = {"statistics": 0, "decomposition": 0}
        self.ea: torch.Tensor | None = None  # raw (not debiased) dense EA
        self.ea_count = 0
        self._gram: torch.Tensor | None = None
        self._rows: list[torch.Tensor] = []

    # ------------------------------------------------------------------ statistics
    def accumulate(self, rows: torch.Tensor, *, ea: bool = True, brand: bool = True) -> None:
        """Add one micro-batch of rows ``(R, d)`` to this step's pending increment.

        ``ea`` / ``brand`` say which updates this step will make.  Cost
        ``O(R d²)`` for the dense EA (the Gram is formed at once, so the rows
        are not held), ``O(1)`` for a Brand update (the rows are held).
        """
        rows = rows.detach()
        if rows.dtype != self.dtype:
            rows = rows.to(self.dtype)
        if self.keeps_dense and ea:
            if torch.is_autocast_enabled(rows.device.type):  # hooks run inside the user's autocast
                with torch.autocast(rows.device.type, enabled=False):
                    g = rows.T @ rows
            else:  # entering/leaving an autocast context costs more than a small Gram
                g = rows.T @ rows
            self._gram = g if self._gram is None else self._gram.add_(g)
        if self.keeps_rows and brand:
            self._rows.append(rows)

    @property
    def has_pending(self) -> bool:
        """Whether statistics were accumulated and not yet consumed or discarded."""
        return self._gram is not None or bool(self._rows)

    def discard_pending(self) -> None:
        """Drop the pending statistics."""
        self._gram = None
        self._rows = []

    def update_ea(self, scale: float, *, step: int) -> None:
        """Fold the pending increment ``C = scale · Σ rowsᵀ rows`` into the dense EA (a ``T_updt`` step).

        ``M ← ρ M + (1-ρ) C``; a non-finite ``C`` is skipped (counted, logged).
        No-op for states without a dense EA or without pending statistics.
        """
        if not (self.keeps_dense and self._gram is not None):
            return
        C, self._gram = self._gram, None
        if not all_finite(C):
            self._skip("statistics", step, "non-finite increment")
            return
        C.mul_(scale)
        if self.ea is None:
            self.ea = C.mul_(1 - self.decay)
        else:
            self.ea.mul_(self.decay).add_(C, alpha=1 - self.decay)
        self.ea_count += 1

    def update_brand(self, scale: float, *, correct: bool, damping: float, step: int) -> None:
        """Brand-update ``(U, D)`` with the pending rows: ``ρM + (1-ρ)XXᵀ``, ``X = sqrt(scale)·rowsᵀ`` (a ``T_B`` step).

        Parameters
        ----------
        scale : float
            As :meth:`update_ea`.
        correct : bool
            Follow with a Rayleigh–Ritz correction (B-KFAC-c).
        damping : float
            The factor's relative damping ``μ/λ_1`` (for the rank policy).
        step : int
            For the rank policy and log messages.

        No-op for states without ``(U, D)`` or without pending rows.
        """
        if not (self.keeps_rows and self._rows):
            return
        X = torch.cat(self._rows, 0).T * math.sqrt(scale)
        self._rows = []
        if not all_finite(X):
            self._skip("statistics", step, "non-finite increment")
            return
        self._brand(X, correct=correct, damping=damping, step=step)

    def _brand(self, X: torch.Tensor, *, correct: bool, damping: float, step: int) -> None:
        """Brand update with the scaled increment ``X`` (d × s); only Brand states have one."""

    # ------------------------------------------------------------------ decomposition
    def refresh(self, *, decompose: bool, overwrite: bool, damping: float, step: int) -> None:
        """Recompute :attr:`eigen` from the dense EA on a ``T_inv`` step.

        ``overwrite`` (a B-R-KFAC overwrite step) matters only to
        :class:`BrandDenseFactor`; Brand-only states ignore both flags.
        """
        if decompose and self.ea is not None:
            out = self._guarded(lambda: self._decompose(self.ea.to(self.inv_dtype), step, damping), step)
            if out is not None:
                U, w, exact = out
                self._snapshot(U, w, self.ea_count, exact=exact)

    def _decompose(self, M: torch.Tensor, step: int, damping: float) -> tuple[torch.Tensor, torch.Tensor, bool]:
        """Decomposition of the dense EA: ``(U, w descending, exact)``."""
        return _exact(M)

    def _guarded(self, fn: Callable[[], tuple], step: int) -> tuple | None:
        """Run a decomposition; on failure or non-finite output count, log and return None."""
        try:
            out = fn()
        except Exception as exc:  # LinAlgError / torch._C._LinAlgError after the float64 retry
            self._skip("decomposition", step, f"{type(exc).__name__}: {exc}")
            return None
        tensors = [u for t in out for u in ((t.eigvecs, t.eigvals) if isinstance(t, LowRankPSD) else (t,))]
        if not all(all_finite(t) for t in tensors if isinstance(t, torch.Tensor)):
            self._skip("decomposition", step, "non-finite eigenpairs")
            return None
        return out

    def dense(self) -> torch.Tensor | None:
        """The debiased dense EA ``M_k / (1-ρ^k)`` as a new ``(d, d)`` tensor, or None when none is kept."""
        return None if self.ea is None else self.ea * self._debias(self.ea_count)

    def _debias(self, count: int) -> float:
        return 1.0 / (1.0 - self.decay**count) if count else 1.0

    def _snapshot(self, U: torch.Tensor, w: torch.Tensor, count: int, *, exact: bool) -> None:
        """Store a debiased snapshot; clip eigenvalues < 1e-10·max to 0; record ``λ_r/λ_1``."""
        w = w.clamp_min(0)
        wmax, wmin = (float(w[0]), float(w[-1])) if w.numel() else (0.0, 0.0)
        if wmin < EIG_CLIP * wmax:
            w = torch.where(w < EIG_CLIP * wmax, torch.zeros_like(w), w)
            wmin = 0.0
        deb = self._debias(count)
        # row-major storage on every rank: an owner's LAPACK output (column-major) and a broadcast copy
        # (contiguous) would otherwise enter the preconditioning products with different roundings
        approx = LowRankPSD.unchecked(U.to(self.inv_dtype).contiguous(), (w * deb).to(self.inv_dtype).contiguous())
        self.eigen = FactorEigen(approx, wmax * deb, wmin * deb)
        self.errors.append(0.0 if exact or wmax == 0 else wmin / wmax)
        del self.errors[:-32]

    def _choose_rank(self, step: int, damping: float) -> int:
        prev = self.eigen.approx.eigvals if self.eigen is not None else None
        self.rank = min(self.rank_policy.next_rank(step, self.rank, prev, self.errors, damping), self.dim)
        return self.rank

    def _skip(self, what: str, step: int, why: str) -> None:
        self.skipped[what] += 1
        self._warn.warn(f"skipped_{what}", "step %d: skipped the %s update of factor %s (%s)", step, what, self.name, why)

    def summary(self) -> dict[str, Any]:
        """Diagnostics for ``stats()``: ``kind``, ``dim``, ``rank`` (of the current decomposition, None
        before the first), ``target_rank``, ``error`` (``λ_r/λ_1`` of the last decomposition, 0 for exact
        ones) and ``skipped`` (statistics/decomposition counts)."""
        return {
            "kind": self.kind,
            "dim": self.dim,
            "rank": None if self.eigen is None else self.eigen.approx.rank,
            "target_rank": self.rank,
            "error": self.errors[-1] if self.errors else None,
            "skipped": dict(self.skipped),
        }

    # ------------------------------------------------------------------ checkpoint
    def state_dict(self) -> dict[str, Any]:
        """Everything needed to continue bitwise: EA, snapshot, rank state, RNG state, counters."""
        eig = None
        if self.eigen is not None:
            e = self.eigen
            eig = {"eigvecs": e.approx.eigvecs, "eigvals": e.approx.eigvals, "max_eig": e.max_eig, "min_eig": e.min_eig}
        return {
            "kind": self.kind,
            "ea": self.ea,
            "ea_count": self.ea_count,
            "rank": self.rank,
            "errors": list(self.errors),
            "skipped": dict(self.skipped),
            "rng": self.rng.bit_generator.state,
            "eigen": eig,
        }

    def load_state_dict(self, sd: dict[str, Any]) -> None:
        """Restore from :meth:`state_dict` (tensors are copied onto this factor's device and dtypes)."""
        if sd["kind"] != self.kind:
            raise ValueError(f"factor {self.name}: the checkpoint holds a {sd['kind']!r} factor, this run a {self.kind!r} one")
        self.ea = None if sd["ea"] is None else sd["ea"].to(self.device, self.dtype, copy=True)
        self.ea_count = int(sd["ea_count"])
        self.rank = int(sd["rank"])
        self.errors = list(sd["errors"])
        self.skipped = dict(sd["skipped"])
        self.rng.bit_generator.state = sd["rng"]
        e = sd["eigen"]
        self.eigen = None
        if e is not None:
            U = e["eigvecs"].to(self.device, self.inv_dtype, copy=True)
            w = e["eigvals"].to(self.device, self.inv_dtype, copy=True)
            self.eigen = FactorEigen(LowRankPSD.unchecked(U, w), float(e["max_eig"]), float(e["min_eig"]))


class DenseFactor(FactorState):
    """Dense EA + full ``eigh`` (K-FAC).  Memory ``O(d²)``; decomposition ``O(d³)``."""

    kind = "dense"


class RandomizedFactor(FactorState):
    """Dense EA + randomized low-rank eigendecomposition (RS-KFAC / SRE-KFAC / Nyström).

    Cost per decomposition ``O(d²(r+l)(q+1))``; when ``r + l >= d``, or with
    a fixed or scheduled rank when it is cheaper (:func:`exact_is_cheaper`:
    ``d < 3.3 (r+l)`` for ``"svd"``, ``2 (r+l)`` for the others, at ``q = 3``),
    the exact ``eigh`` is used instead: full rank, no truncation error.

    Parameters
    ----------
    dim : int
    method : {"svd", "subspace", "nystrom"}
        Passed to :func:`onlinela.randomized_eigh` (RS-KFAC, SRE-KFAC, Nyström).
    oversample, n_iter : int
        ``l`` and ``q``.
    **kwargs
        See :class:`FactorState`.
    """

    kind = "randomized"

    def __init__(
        self, dim: int, *, method: Literal["svd", "subspace", "nystrom"], oversample: int, n_iter: int, **kwargs: Any
    ) -> None:
        super().__init__(dim, **kwargs)
        self.method = method
        self.oversample = oversample
        self.n_iter = n_iter

    def _decompose(self, M: torch.Tensor, step: int, damping: float) -> tuple[torch.Tensor, torch.Tensor, bool]:
        r = self._choose_rank(step, damping)
        if _use_exact(self, r):
            return _exact(M)
        approx = _randomized(M, r, self.oversample, self.n_iter, self.method, self.rng)
        return approx.eigvecs, approx.eigvals, False


class BrandFactor(FactorState):
    """Only ``(U, D)`` (B-KFAC): Brand-updated every ``T_B`` steps; memory ``O(d(r+s))``.

    Each update costs ``O(d(r+s)² + (r+s)³)`` for an increment of rank ``s``:
    linear in ``d``, the dense factor is never formed.  Starts empty (rank 0),
    so the first ``⌊r/s⌋`` updates reproduce the EA exactly.  Only used when
    ``r + s < d``; the preconditioner falls back to :class:`RandomizedFactor`
    otherwise.
    """

    kind = "brand"
    keeps_dense = False
    keeps_rows = True

    def __init__(self, dim: int, **kwargs: Any) -> None:
        super().__init__(dim, **kwargs)
        self.brand: LowRankPSD | None = None  # raw (not debiased) U diag(D) Uᵀ
        self.brand_count = 0

    def _brand(self, X: torch.Tensor, *, correct: bool, damping: float, step: int) -> None:
        r = min(self._choose_rank(step, damping), max(self.dim - X.shape[1], 1))
        prev = self.brand if self.brand is not None else empty_lowrank(self.dim, like=X)
        out = self._guarded(lambda: (brand_update(prev, X, decay=self.decay, rank=r, check_inputs=False),), step)
        if out is None:
            return
        self.brand = _row_major_lowrank(out[0])
        self.brand_count += 1
        if correct:
            self._correct(step)
        self._snapshot(self.brand.eigvecs, self.brand.eigvals, self.brand_count, exact=False)

    def _correct(self, step: int) -> None:
        """Rayleigh–Ritz correction; needs the dense EA, so only :class:`BrandDenseFactor` has one."""

    def refresh(self, *, decompose: bool, overwrite: bool, damping: float, step: int) -> None:  # noqa: D102
        return None

    def state_dict(self) -> dict[str, Any]:  # noqa: D102
        sd = super().state_dict()
        sd["brand_count"] = self.brand_count
        sd["brand"] = None if self.brand is None else {"eigvecs": self.brand.eigvecs, "eigvals": self.brand.eigvals}
        return sd

    def load_state_dict(self, sd: dict[str, Any]) -> None:  # noqa: D102
        super().load_state_dict(sd)
        self.brand_count = int(sd["brand_count"])
        self.brand = None
        if sd["brand"] is not None:
            U = sd["brand"]["eigvecs"].to(self.device, self.dtype, copy=True)
            w = sd["brand"]["eigvals"].to(self.device, self.dtype, copy=True)
            self.brand = LowRankPSD.unchecked(U, w)


class BrandDenseFactor(BrandFactor):
    """Dense EA and Brand-updated ``(U, D)`` (B-R-KFAC, B-KFAC-c).

    On an overwrite step ``(U, D)`` is replaced by a randomized decomposition
    of the dense EA (cost ``O(d²(r+l)(q+1))``); with ``correct`` a Brand update
    is followed by a partial Rayleigh–Ritz refresh of a random fraction ``φ``
    of ``U``'s columns against the dense EA (cost ``O(d² φr)``).  Memory
    ``O(d²)``: the dense EA is kept.

    Parameters
    ----------
    dim : int
    method, oversample, n_iter
        As :class:`RandomizedFactor`, for the overwrite.
    fraction : float
        ``φ`` of the Rayleigh–Ritz correction.
    **kwargs
        See :class:`FactorState`.
    """

    kind = "brand+dense"
    keeps_dense = True

    def __init__(
        self,
        dim: int,
        *,
        method: Literal["svd", "subspace", "nystrom"],
        oversample: int,
        n_iter: int,
        fraction: float,
        **kwargs: Any,
    ) -> None:
        super().__init__(dim, **kwargs)
        self.method = method
        self.oversample = oversample
        self.n_iter = n_iter
        self.fraction = fraction

    def _raw_ea_for_brand(self) -> torch.Tensor:
        """The dense EA rescaled to the Brand state's update count (equal counts: no copy)."""
        if self.ea_count == self.brand_count:
            return self.ea
        return self.ea * (self._debias(self.ea_count) / self._debias(self.brand_count))

    def _correct(self, step: int) -> None:
        if self.ea is None or self.brand is None or self.brand.rank == 0:
            return
        out = self._guarded(
            lambda: (rayleigh_ritz_refresh(
                self.brand, self._raw_ea_for_brand(), fraction=self.fraction, rng=self.rng, check_inputs=False
            ),), step
        )
        if out is not None:
            self.brand = _row_major_lowrank(out[0])

    def refresh(self, *, decompose: bool, overwrite: bool, damping: float, step: int) -> None:  # noqa: D102
        if not overwrite or self.ea is None:
            return
        r = min(self._choose_rank(step, damping), self.dim)

        def run() -> tuple[LowRankPSD]:
            if _use_exact(self, r):
                U, w, _ = _exact(self.ea)
                return (LowRankPSD.unchecked(U[:, :r], w[:r]),)
            return (_randomized(self.ea, r, self.oversample, self.n_iter, self.method, self.rng),)

        out = self._guarded(run, step)
        if out is None:
            return
        self.brand = _row_major_lowrank(out[0])
        self.brand_count = self.ea_count
        self._snapshot(self.brand.eigvecs, self.brand.eigvals, self.brand_count, exact=False)


def all_finite(t: torch.Tensor) -> bool:
    """Whether every element of ``t`` is finite; one host read.

    A finite sum has no infinite or NaN term (``inf - inf`` is NaN), so the
    sum answers at the cost of one reduction (``isfinite(t).all()`` costs ~10×
    more on CPU); only a non-finite sum (a true non-finite element, or an
    overflow of finite ones) takes the exact elementwise test.
    """
    if t.numel() == 0 or bool(torch.isfinite(t.sum())):
        return True
    return bool(torch.isfinite(t).all())


def _row_major_lowrank(lr: LowRankPSD) -> LowRankPSD:
    """``lr`` with row-major eigenvectors and eigenvalues: the layout every rank stores (see :meth:`FactorState._snapshot`)."""
    return LowRankPSD.unchecked(lr.eigvecs.contiguous(), lr.eigvals.contiguous(), lr.complement)


#: ``d / (r + l)`` below which a full ``eigh`` of a ``d × d`` factor is cheaper than the randomized
#: decomposition with ``q = 3`` iterations (measured, one CPU thread, float32, torch 2.13, r = 32-220,
#: d = 128-1536: ``benchmarks/exact_vs_randomized.py``); the sketch's cost grows like ``q + 1``
EXACT_BELOW = {"svd": 3.3, "subspace": 2.0, "nystrom": 2.0}


def exact_is_cheaper(d: int, k: int, method: str, n_iter: int) -> bool:
    """Whether ``eigh`` of a ``d × d`` matrix costs less than a randomized decomposition with ``k = r + l`` columns.

    ``eigh`` costs ``≈ c_e d³``, the sketch ``≈ c_m d² k (q + 1)``: the
    crossover ``d / k`` is linear in ``q + 1``; :data:`EXACT_BELOW` holds it
    at ``q = 3``.  On GPUs ``eigh`` runs further below GEMM speed than on a
    CPU, so there this rule errs towards ``eigh`` (not measured).  ``O(1)``.
    """
    return d < EXACT_BELOW[method] * k * (n_iter + 1) / 4


def fallback_takes_eigh(d: int, r: int, oversample: int, n_iter: int, method: str, policy: RankPolicy) -> bool:
    """Whether a randomized factor of dimension ``d`` replaces its rank-``r`` sketch by a full ``eigh``.

    Always when ``r + l >= d``; otherwise only for a fixed or scheduled rank
    and when :func:`exact_is_cheaper` (the adaptive rank policies keep the
    sketch: their rule reads the truncation errors of low-rank decompositions).
    """
    k = r + oversample
    if k >= d:
        return True
    return isinstance(policy, (FixedRank, ScheduledRank)) and exact_is_cheaper(d, k, method, n_iter)


def _use_exact(f: Any, r: int) -> bool:
    """:func:`fallback_takes_eigh` for factor ``f`` (with ``oversample``, ``n_iter``, ``method``) at rank ``r``."""
    return fallback_takes_eigh(f.dim, r, f.oversample, f.n_iter, f.method, f.rank_policy)


def _exact(M: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, bool]:
    """Full ``eigh`` (descending, float64 retry): ``(U, w, True)``.  Cost ``O(d³)``."""
    w, U = onlinela_eigh(M, check_inputs=False)
    return U, w, True


def _randomized(
    M: torch.Tensor, rank: int, oversample: int, n_iter: int, method: str, rng: np.random.Generator
) -> LowRankPSD:
    """Randomized PSD eigendecomposition of rank ``rank`` (validated by the caller)."""
    return randomized_eigh(M, rank, oversample=oversample, n_iter=n_iter, method=method, rng=rng, check_inputs=False)
