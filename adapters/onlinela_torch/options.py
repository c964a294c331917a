"""The options of :class:`~onlinela_torch.KFACPreconditioner`: one frozen, validated record.

:class:`KFACOptions` holds every keyword the preconditioner takes (besides the
model), checks each once at construction (``TypeError`` / ``ValueError``
naming the argument) and resolves the method-dependent defaults
(``damping_convention=None``, ``low_rank_grad=None``, ``brand=None``) from the
method registry (:mod:`onlinela_torch.methods`).  :class:`BrandConfig` holds
the periods of the Brand methods.  :func:`takes_options` gives
``KFACPreconditioner.__init__(self, model, **options)`` the signature of the
record, so ``inspect.signature`` (the CLI's option checks) sees every keyword.
"""

from __future__ import annotations

import inspect
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field, fields
from typing import Any, Literal, NamedTuple, TypeVar, Union

import torch
from torch import nn

from onlinela import validation as V

from .brand_cost import BrandCostModel
from .factors import RankPolicy, as_rank_policy
from .methods import FloatSchedule, IntSchedule, MethodSpec, StepSchedule, float_schedule, int_schedule, method_spec

__all__ = ["ATTRIBUTES", "BrandConfig", "KFACOptions", "LayerSelector", "Schedules", "takes_options"]

LayerSelector = Union[str, type]


@dataclass(frozen=True)
class BrandConfig:
    """Options of the Brand methods ``b-kfac``, ``br-kfac``, ``b-kfac-c`` (algorithms.md §4).

    Parameters
    ----------
    update_freq : int, callable of the step, or None
        ``T_B``: Brand-update ``(U, D)`` every ``T_B`` steps.  ``None`` (default)
        uses ``factor_update_freq`` (the author's later default "every T_updt").
    overwrite_period : int or callable
        B-R-KFAC / B-KFAC-c: overwrite ``(U, D)`` by a randomized decomposition of
        the dense EA every ``overwrite_period · T_inv`` steps (default 2).
    correction_period : int or callable
        B-KFAC-c: Rayleigh–Ritz-correct after every ``correction_period``-th
        Brand update (default 2).
    correction_fraction : float
        ``φ`` in (0, 1]: fraction of ``U``'s columns refreshed (default 0.2).
    fallback : {"svd", "subspace", "nystrom"}
        Randomized method of the overwrite and of the factors a Brand update
        does not pay off on.  Default RS-KFAC's ``"svd"``.
    cost : BrandCostModel or None
        Decides, per factor, whether Brand updates are cheaper per step than
        the dense EA + randomized fallback (:class:`~onlinela_torch.BrandCostModel`,
        fitted by ``benchmarks/brand_cost.py``); ``None``: Brand wherever
        ``r + s < d`` (the papers' rule, which also picks Brand at ``d ≈ 1000``,
        ``s = 256``, where it costs more).  The choice is in ``stats()["brand"]``.
    """

    update_freq: IntSchedule | None = None
    overwrite_period: IntSchedule = 2
    correction_period: IntSchedule = 2
    correction_fraction: float = 0.2
    fallback: Literal["svd", "subspace", "nystrom"] = "svd"
    cost: BrandCostModel | None = BrandCostModel()

    def __post_init__(self) -> None:
        if self.cost is not None and not isinstance(self.cost, BrandCostModel):
            raise TypeError(f"`brand.cost` must be a BrandCostModel or None, got {type(self.cost).__name__}")
        if self.update_freq is not None:
            int_schedule(self.update_freq, "brand.update_freq")
        int_schedule(self.overwrite_period, "brand.overwrite_period")
        int_schedule(self.correction_period, "brand.correction_period")
        V.check_real(self.correction_fraction, "brand.correction_fraction", low=0.0, high=1.0, low_open=True)
        if self.fallback not in ("svd", "subspace", "nystrom"):
            raise ValueError(f"`brand.fallback` must be 'svd', 'subspace' or 'nystrom', got {self.fallback!r}")


class Schedules(NamedTuple):
    """The checked schedules of :class:`KFACOptions`, each a callable of the step (values checked at each use)."""

    lr: Callable[[int], float]
    damping: Callable[[int], float]
    t_updt: Callable[[int], int]
    t_inv: Callable[[int], int]
    t_brand: Callable[[int], int]
    overwrite: Callable[[int], int]
    correction: Callable[[int], int]


def _choice(value: Any, name: str, allowed: tuple[Any, ...]) -> None:
    """ValueError naming ``name`` and the ``allowed`` values unless ``value`` is one of them."""
    if value not in allowed:
        listed = ", ".join(map(repr, allowed[:-1])) + f" or {allowed[-1]!r}"
        raise ValueError(f"`{name}` must be {listed}, got {value!r}")


def _put(obj: Any, name: str, value: Any) -> None:
    """Set a field of a frozen dataclass during its ``__post_init__`` (the checked or resolved value)."""
    object.__setattr__(obj, name, value)


@dataclass(frozen=True, kw_only=True)
class KFACOptions:
    r"""Every keyword of :class:`~onlinela_torch.KFACPreconditioner`, checked; method defaults resolved.

    Parameters
    ----------
    method : {"kfac", "rs-kfac", "sre-kfac", "nystrom-kfac", "b-kfac", "br-kfac", "b-kfac-c"}
        ``"kfac"``: dense EA + ``eigh``.  ``"rs-kfac"`` / ``"sre-kfac"`` /
        ``"nystrom-kfac"``: dense EA + randomized SVD / symmetric subspace
        iteration / Nyström eigendecomposition of rank ``rank``.  ``"b-kfac"``:
        Brand-updated ``(U, D)`` only, for factors with ``r + s < d``;
        ``"br-kfac"``: plus the dense EA and a periodic randomized overwrite;
        ``"b-kfac-c"``: plus a Rayleigh–Ritz correction.  Factors that are too
        small for a Brand update use RS-KFAC.
    lr : float or callable of the step
        Learning rate, used by the KL clip only (the optimizer applies its own),
        when no ``optimizer`` is given.
    damping : float > 0 or callable of the step
        Relative damping ``λ`` (default ``1e-2``, chosen on the task zoo, docs/tuning.rst).  Product convention: ``λ' = λ · max eig G · max eig A``;
        per-factor convention: ``μ_X = √λ · max eig X`` (the same floor
        ``λ · max eig A · max eig G`` under the damped Kronecker product, so
        methods compare at one ``λ``; the papers' per-factor ``λ_f`` is ``damping = λ_f²``).
    factor_decay : float in (0, 1)
        ``ρ`` of the exponential averages.
    factor_update_freq, inv_update_freq : int >= 1 or callable of the step
        ``T_updt`` and ``T_inv``: statistics on steps ``k % T_updt == 0``,
        decompositions on ``k % T_inv == 0``.
    rank : int, callable of the step, or RankPolicy
        Target rank ``r`` of low-rank factors (default 220); :class:`~onlinela_torch.AdaptiveRank`
        is the papers' adaptive rule, :class:`~onlinela_torch.ErrorTargetRank`
        a tolerance on the damped inverse.
    oversample, n_iter : int >= 0
        Oversampling ``l`` and power/subspace iterations ``q`` of the randomized sketches.
    kl_clip : float > 0 or None
        ``κ`` of the KL clip ``ν = min(1, sqrt(κ / |Σ v·g·η²|))``, ``η`` the applied
        step length (:meth:`effective_lr`: ``lr/(1-β)`` under momentum ``β``);
        None (default) disables it.  The papers used ``1e-3`` – ``0.3`` with ``graft=None``.
    rms_clip : float > 0 or None
        The papers' per-layer RMS cap ``ν_l = min(1, κ / rms(v_l))`` (0.07 in
        their CIFAR runs); applied before the KL clip.  None (default) disables it.
    damping_convention : {"product", "factor"} or None
        None picks ``"product"`` for ``"kfac"`` (the K-FAC baseline) and
        ``"factor"`` for the randomized and Brand methods, as the papers do.
    complement : {"min", "zero"}
        Eigenvalue given to the directions a low-rank decomposition did not
        compute: ``"zero"`` is the papers' identity ``(UDUᵀ + μI)⁻¹ = U[(D+μ)⁻¹ - μ⁻¹]Uᵀ + μ⁻¹I``;
        ``"min"`` (default) uses the smallest kept eigenvalue, which keeps the
        step bounded when the rank is too small for the spectrum (the §3
        variant).  Irrelevant for full-rank factors (``"kfac"``, small factors).
    brand : BrandConfig, optional
        Periods of the Brand methods (default ``BrandConfig()``).
    fisher : {"empirical", "true", "exact"}
        Where ``G`` comes from: ``"empirical"`` (default, the papers): the
        back-propagated training loss; ``"true"``: labels sampled from the
        model's predictive distribution; ``"exact"``: the expectation over
        labels taken exactly (one backward pass per output dimension).  The last
        two need :meth:`~onlinela_torch.KFACPreconditioner.fisher_backward` on
        the model outputs before ``loss.backward()``.
    loss_reduction : {"mean", "sum"}
        How the training loss reduces over the samples of a step (see
        :func:`onlinela_torch.modules.g_scale`; with gradient accumulation,
        "mean" means every micro-batch loss is divided by the number of micro-batches).
    layers, skip_layers : sequence of str or type, optional
        Select layers by name (``fnmatch`` patterns on ``named_modules()`` names)
        or by module type.  ``layers=None`` selects every supported layer.
    factor_dtype, inv_dtype : torch.dtype
        Dtype of the factor statistics and of the decompositions (float32 or
        float64; default float32).  Activations captured under ``torch.autocast``
        are cast up before use.
    low_rank_grad : bool or None
        Precondition Linear layers through the rank-``n`` gradient factors
        (``O((d_in+d_out)(r+n)n)`` for the solves instead of ``O(d_in d_out r)``).
        Needs the per-factor convention and the plain minibatch gradient of the
        captured batch: checked each step with a random probe, falling back to
        the dense path otherwise.  None enables it for the Brand methods.
    grad_scaler : torch.amp.GradScaler or None
        When given, captured output gradients are divided by its scale.
    seed : int
        Seeds the randomized sketches (one stream per factor) and label sampling.
    timer : callable
        Clock of the per-phase seconds in ``stats()`` (default
        ``time.perf_counter``; e.g. ``time.process_time`` for CPU time, or a
        function that calls ``torch.cuda.synchronize()`` first for exact GPU phases).
    optimizer : torch.optim.Optimizer, optional
        The optimizer the preconditioner feeds: the KL clip reads its current
        ``lr`` and ``momentum`` (so LR schedulers act on both).
    warmup : bool
        Statistics on each of the first 4 steps, and decompositions after 4,
        16, 64, ... steps within the first ``T_inv`` instead of one at step 0
        (default True): no decomposition of a one-batch factor is kept for a
        whole period, and the warm-up costs the statistics of 4 steps (on the
        zoo's short runs a longer warm-up, statistics on every step of the
        first ``T_inv``, cost more than it gained; docs/tuning.rst).  Until the
        first decomposition the layers take the plain (grafted) gradient.
    damping_scale : {"max", "mean"}
        The factor scale ``s_X`` the relative damping multiplies: the largest
        eigenvalue (default) or the mean eigenvalue ``tr(X)/d`` (trace norm, as
        π-adjusted Tikhonov damping).
    graft : {"unit", "element", "sgd"} or None
        Step length of the preconditioned direction.  ``"unit"``: each
        layer's direction is rescaled to its gradient's norm divided by the
        running RMS of that norm, so each layer's step has length ``≈ lr``
        whatever the scale of the loss (mean or sum, targets ×100);
        ``"element"`` (default): as ``"unit"``, times ``0.03 √n_l`` for a
        layer of ``n_l`` entries, so that the step's RMS *per entry* is
        ``≈ 0.03 lr`` in every layer (Adam-like across layers of different
        sizes; chosen on the task zoo, docs/tuning.rst);
        ``"sgd"``: to its gradient's norm (SGD's step length); None: the
        natural-gradient length (the papers; use with ``kl_clip``).  See docs/tuning.rst.

    Attributes
    ----------
    spec : MethodSpec
        The registry record of ``method``.
    rank_policy : RankPolicy
        ``rank`` normalised.
    schedules : Schedules
        The checked schedules as callables of the step.
    thin : bool
        Whether Linear layers may take the thin-factor gradient path
        (``low_rank_grad`` under the per-factor convention).

    Notes
    -----
    The checks run in the order of the fields; ``layers`` / ``skip_layers``
    are checked when the layers are selected.  After construction
    ``damping_convention``, ``low_rank_grad`` and ``brand`` hold the resolved
    values (never None).
    """

    method: str = "kfac"
    lr: FloatSchedule = 0.1
    damping: FloatSchedule = 1e-2
    factor_decay: float = 0.95
    factor_update_freq: IntSchedule = 10
    inv_update_freq: IntSchedule = 50
    rank: int | Callable[[int], int] | RankPolicy = 220
    oversample: int = 10
    n_iter: int = 3
    kl_clip: float | None = None
    rms_clip: float | None = None
    damping_convention: Literal["product", "factor"] | None = None
    complement: Literal["zero", "min"] = "min"
    brand: BrandConfig | None = None
    fisher: Literal["empirical", "true", "exact"] = "empirical"
    loss_reduction: Literal["mean", "sum"] = "mean"
    layers: Sequence[LayerSelector] | None = None
    skip_layers: Sequence[LayerSelector] = ()
    factor_dtype: torch.dtype = torch.float32
    inv_dtype: torch.dtype = torch.float32
    low_rank_grad: bool | None = None
    grad_scaler: Any = None
    seed: int = 0
    timer: Callable[[], float] = time.perf_counter
    optimizer: torch.optim.Optimizer | None = None
    warmup: bool = True
    damping_scale: Literal["max", "mean"] = "max"
    graft: Literal["sgd", "unit", "element"] | None = "element"
    spec: MethodSpec = field(init=False, repr=False)
    rank_policy: RankPolicy = field(init=False, repr=False)
    schedules: Schedules = field(init=False, repr=False)

    def __post_init__(self) -> None:
        _put(self, "spec", method_spec(self.method))
        lr, damping = float_schedule(self.lr, "lr"), float_schedule(self.damping, "damping")
        decay = V.check_real(self.factor_decay, "factor_decay", low=0.0, high=1.0, low_open=True, high_open=True)
        _put(self, "factor_decay", decay)
        t_updt = int_schedule(self.factor_update_freq, "factor_update_freq")
        t_inv = int_schedule(self.inv_update_freq, "inv_update_freq")
        _put(self, "rank_policy", as_rank_policy(self.rank))
        _put(self, "oversample", V.check_int(self.oversample, "oversample", low=0))
        _put(self, "n_iter", V.check_int(self.n_iter, "n_iter", low=0))
        for name in ("kl_clip", "rms_clip"):
            value = getattr(self, name)
            _put(self, name, None if value is None else V.check_real(value, name, low=0.0, low_open=True))
        if self.damping_convention is None:
            _put(self, "damping_convention", self.spec.damping_convention)
        _choice(self.damping_convention, "damping_convention", ("product", "factor", None))
        _choice(self.complement, "complement", ("zero", "min"))
        _put(self, "brand", BrandConfig() if self.brand is None else self.brand)
        if not isinstance(self.brand, BrandConfig):
            raise TypeError(f"`brand` must be a BrandConfig, got {type(self.brand).__name__}")
        b = self.brand
        t_brand = t_updt if b.update_freq is None else int_schedule(b.update_freq, "brand.update_freq")
        overwrite = int_schedule(b.overwrite_period, "brand.overwrite_period")
        correction = int_schedule(b.correction_period, "brand.correction_period")
        _put(self, "schedules", Schedules(lr, damping, t_updt, t_inv, t_brand, overwrite, correction))
        _choice(self.fisher, "fisher", ("empirical", "true", "exact"))
        _choice(self.loss_reduction, "loss_reduction", ("mean", "sum"))
        for name in ("factor_dtype", "inv_dtype"):
            if getattr(self, name) not in (torch.float32, torch.float64):
                raise ValueError(f"`{name}` must be torch.float32 or torch.float64, got {getattr(self, name)}")
        _put(self, "low_rank_grad", self.spec.low_rank_grad if self.low_rank_grad is None else self.low_rank_grad)
        _put(self, "seed", V.check_int(self.seed, "seed", low=0))
        self._check_objects()
        _choice(self.damping_scale, "damping_scale", ("max", "mean"))
        _choice(self.graft, "graft", (None, "sgd", "unit", "element"))

    @classmethod
    def from_keywords(cls, owner: str, options: Mapping[str, Any]) -> KFACOptions:
        """The options of ``owner(model, **options)``; an unknown keyword raises ``TypeError`` naming it and ``owner``."""
        unknown = sorted(set(options) - {f.name for f in fields(cls) if f.init})
        if unknown:
            raise TypeError(f"{owner}() got an unexpected keyword argument {unknown[0]!r}")
        return cls(**options)

    def _check_objects(self) -> None:
        if not callable(self.timer):
            raise TypeError(f"`timer` must be a callable returning seconds, got {type(self.timer).__name__}")
        if self.optimizer is not None and not isinstance(self.optimizer, torch.optim.Optimizer):
            raise TypeError(f"`optimizer` must be a torch.optim.Optimizer or None, got {type(self.optimizer).__name__}")
        if not isinstance(self.warmup, bool):
            raise TypeError(f"`warmup` must be a bool, got {type(self.warmup).__name__}")

    @property
    def thin(self) -> bool:
        """Whether Linear layers may take the thin-factor gradient path."""
        return bool(self.low_rank_grad) and self.damping_convention == "factor"

    def step_schedule(self) -> StepSchedule:
        """A fresh :class:`~onlinela_torch.methods.StepSchedule` (its own plan cache) of these schedules."""
        s = self.schedules
        return StepSchedule(self.spec, s.t_updt, s.t_inv, s.t_brand, s.overwrite, s.correction,
                            warmup=self.warmup, damping_varies=callable(self.damping))

    def effective_lr(self, step: int) -> float:
        r"""The step length the KL clip bounds: ``lr / (1 - β)`` under heavy-ball momentum ``β``.

        With ``optimizer=`` the learning rate and momentum are read from its
        ``param_groups[0]`` (so LR schedulers act on both); otherwise ``lr``
        (the constructor's schedule) and no momentum.  SGD with momentum ``β``
        and dampening ``τ`` applies ``(1-τ)/(1-β)`` times a constant direction
        in steady state, so the clip bounds that amplified step.
        """
        if self.optimizer is None:
            return self.schedules.lr(step)
        group = self.optimizer.param_groups[0]
        lr = float(group["lr"])
        beta = float(group.get("momentum", 0.0) or 0.0)
        if beta:
            lr *= (1.0 - float(group.get("dampening", 0.0) or 0.0)) / (1.0 - beta)
        return lr


#: The options readable as preconditioner attributes (``precond.rank_policy``, ``precond.brand``, ...).
ATTRIBUTES = frozenset((
    "factor_decay", "rank_policy", "oversample", "n_iter", "kl_clip", "rms_clip", "damping_convention", "complement",
    "brand", "fisher", "loss_reduction", "factor_dtype", "inv_dtype", "grad_scaler", "seed", "optimizer", "warmup",
    "damping_scale", "graft",
))

_Init = TypeVar("_Init", bound=Callable[..., None])


def takes_options(init: _Init) -> _Init:
    """Give ``init(self, model, **options)`` the signature ``(self, model, *, <every KFACOptions field>)``."""
    kw = inspect.Parameter.KEYWORD_ONLY
    params = [
        inspect.Parameter("self", inspect.Parameter.POSITIONAL_OR_KEYWORD),
        inspect.Parameter("model", inspect.Parameter.POSITIONAL_OR_KEYWORD, annotation=nn.Module),
    ]
    params += [inspect.Parameter(f.name, kw, default=f.default, annotation=f.type) for f in fields(KFACOptions) if f.init]
    init.__signature__ = inspect.Signature(params, return_annotation=None)  # type: ignore[attr-defined]
    return init
