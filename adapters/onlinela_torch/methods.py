"""The method registry and the per-step plan of :class:`~onlinela_torch.KFACPreconditioner`.

One frozen :class:`MethodSpec` per ``method`` name says which factor strategy
the method uses, which randomized algorithm, whether it Brand-updates,
overwrites and corrects, and its default damping convention and
``low_rank_grad``; the other modules read the record instead of comparing
method strings.  :class:`StepSchedule` turns the schedules (``T_updt``,
``T_inv``, ``T_B``, the Brand periods, the warm-up) into one :class:`Plan` per
step.  Cost: a few integer operations per step (the plan is cached per step).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Literal, Union

from onlinela import validation as V

__all__ = ["METHODS", "METHOD_SPECS", "MethodSpec", "Plan", "StepSchedule", "float_schedule", "int_schedule", "method_spec"]

IntSchedule = Union[int, Callable[[int], int]]
FloatSchedule = Union[float, Callable[[int], float]]

#: steps of the warm-up that capture statistics whatever ``factor_update_freq`` says
WARMUP_STATS = 4


@dataclass(frozen=True)
class MethodSpec:
    """What one ``method`` name means.

    Attributes
    ----------
    name : str
        The ``method`` argument, e.g. ``"rs-kfac"``.
    factor : {"dense", "randomized", "brand", "brand+dense"}
        The factor strategy of :mod:`onlinela_torch.factors`; for the Brand
        methods the strategy of the factors a Brand update pays off on (the
        others use ``"randomized"`` with ``BrandConfig.fallback``).
    randomized : {"svd", "subspace", "nystrom"} or None
        The randomized algorithm of the method's ``"randomized"`` factors; None:
        ``BrandConfig.fallback``.
    brand : bool
        Brand-updates ``(U, D)`` every ``T_B`` steps.
    overwrite : bool
        Overwrites ``(U, D)`` by a randomized decomposition of the dense EA.
    correct : bool
        Rayleigh–Ritz-corrects after Brand updates.
    damping_convention : {"product", "factor"}
        The default of ``damping_convention=None``.
    low_rank_grad : bool
        The default of ``low_rank_grad=None``.
    """

    name: str
    factor: Literal["dense", "randomized", "brand", "brand+dense"]
    randomized: Literal["svd", "subspace", "nystrom"] | None = None
    brand: bool = False
    overwrite: bool = False
    correct: bool = False
    damping_convention: Literal["product", "factor"] = "factor"
    low_rank_grad: bool = False


#: One record per supported method, in the order of the papers.
METHOD_SPECS: dict[str, MethodSpec] = {
    s.name: s
    for s in (
        MethodSpec("kfac", "dense", damping_convention="product"),
        MethodSpec("rs-kfac", "randomized", randomized="svd"),
        MethodSpec("sre-kfac", "randomized", randomized="subspace"),
        MethodSpec("nystrom-kfac", "randomized", randomized="nystrom"),
        MethodSpec("b-kfac", "brand", brand=True, low_rank_grad=True),
        MethodSpec("br-kfac", "brand+dense", brand=True, overwrite=True, low_rank_grad=True),
        MethodSpec("b-kfac-c", "brand+dense", brand=True, overwrite=True, correct=True, low_rank_grad=True),
    )
}
#: The supported methods, in the order of the papers.
METHODS = tuple(METHOD_SPECS)


def method_spec(method: str) -> MethodSpec:
    """The :class:`MethodSpec` of ``method``; ValueError naming the supported ones otherwise."""
    if method not in METHOD_SPECS:
        raise ValueError(f"`method` must be one of {', '.join(map(repr, METHODS))}; got {method!r}")
    return METHOD_SPECS[method]


# ====================================================================== schedules
def int_schedule(value: IntSchedule, name: str) -> Callable[[int], int]:
    """A positive-int schedule: the constant checked now, a callable's values at each use."""
    if callable(value):

        def f(step: int) -> int:
            out = value(step)
            try:
                return V.check_int(out, f"{name}({step})", low=1)
            except TypeError as exc:
                raise TypeError(f"`{name}` must return a positive int, got {type(out).__name__}") from exc

        return f
    v = V.check_int(value, name, low=1)
    return lambda step: v


def float_schedule(value: FloatSchedule, name: str) -> Callable[[int], float]:
    """A positive-float schedule: the constant checked now, a callable's values at each use."""
    if callable(value):
        return lambda step: V.check_real(value(step), f"{name}({step})", low=0.0, low_open=True)
    v = V.check_real(value, name, low=0.0, low_open=True)
    return lambda step: v


@dataclass(frozen=True)
class Plan:
    """What happens at one step (shared by all layers)."""

    ea: bool  # T_updt: update the dense EAs
    brand: bool  # T_B: Brand updates
    decompose: bool  # T_inv: decompose dense EAs
    overwrite: bool  # B-R: overwrite (U, D) from the dense EA
    correct: bool  # B-KFAC-c: Rayleigh-Ritz correction after the Brand update

    @property
    def capture(self) -> bool:
        """Whether the hooks capture statistics at this step (EA or Brand update)."""
        return self.ea or self.brand


class StepSchedule:
    """The per-step :class:`Plan` of one method from its checked schedules, cached for the current step.

    Parameters
    ----------
    spec : MethodSpec
    t_updt, t_inv, t_brand : callable of the step
        ``T_updt``, ``T_inv`` and ``T_B`` (from :func:`int_schedule`).
    overwrite, correction : callable of the step
        ``BrandConfig.overwrite_period`` and ``correction_period``.
    warmup : bool
        Statistics on each of the first :data:`WARMUP_STATS` steps, decompositions
        after 4, 16, 64, ... steps within the first ``T_inv`` (none at step 0).
    damping_varies : bool
        A damping schedule: no damped inverse is reused across steps.
    """

    def __init__(
        self,
        spec: MethodSpec,
        t_updt: Callable[[int], int],
        t_inv: Callable[[int], int],
        t_brand: Callable[[int], int],
        overwrite: Callable[[int], int],
        correction: Callable[[int], int],
        *,
        warmup: bool,
        damping_varies: bool,
    ) -> None:
        self.spec = spec
        self.t_updt, self.t_inv, self.t_brand = t_updt, t_inv, t_brand
        self.overwrite, self.correction = overwrite, correction
        self.warmup = warmup
        self.damping_varies = damping_varies
        self.cache: tuple[int, Plan] | None = None

    def plan(self, k: int, brand_updates: int) -> Plan:
        """The plan of step ``k`` (``brand_updates``: Brand updates done before it); evaluates the schedules at ``k``."""
        if self.cache is not None and self.cache[0] == k:
            return self.cache[1]
        spec = self.spec
        t_inv = self.t_inv(k)
        # warm-up: statistics on the first WARMUP_STATS steps, decompositions after 4, 16, 64, ... steps
        # within the first T_inv (none at step 0: the plain gradient until then), so no decomposition of a
        # barely filled factor is kept for a whole T_inv period and the warm-up costs a few steps' statistics
        warm = self.warmup and k < t_inv
        ea = k % self.t_updt(k) == 0 or (warm and k < WARMUP_STATS)
        brand = spec.brand and (k % self.t_brand(k) == 0 or (warm and k < WARMUP_STATS))
        periodic = k % t_inv == 0 and not (warm and k == 0 and t_inv > WARMUP_STATS)
        plan = Plan(
            ea=ea,
            brand=brand,
            decompose=periodic or (warm and k > 0 and _is_power_of_4(k + 1)),
            overwrite=spec.overwrite and k % (self.overwrite(k) * self.t_inv(k)) == 0,
            correct=spec.correct and brand and (brand_updates + 1) % self.correction(k) == 0,
        )
        self.cache = (k, plan)
        return plan

    def expected_reuse(self, k: int) -> int:
        """Steps a decomposition is applied under one damping: its refresh period, 1 under a damping schedule."""
        if self.damping_varies:
            return 1
        return self.t_brand(k) if self.spec.brand else self.t_inv(k)


def _is_power_of_4(n: int) -> bool:
    return n > 0 and n & (n - 1) == 0 and (n.bit_length() - 1) % 2 == 0
