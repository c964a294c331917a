r"""When a Brand update pays: a flop model of a factor's per-step cost under each strategy.

A Brand method keeps a factor of dimension ``d`` as Brand-updated eigenpairs
(rank ``r``, ``s`` new rows per statistics step, algorithms.md §4) only where
that is cheaper per step than what it would otherwise run: the dense EA (a
``d × s`` Gram every ``T_updt`` steps) and a randomized decomposition every
``T_inv`` steps.  ``r + s < d`` is necessary (otherwise the update does not
reduce anything) but far from sufficient: the update's ``(r+s)``-square
``eigh`` runs far below GEMM speed, so at ``d ≈ 1000`` with ``s = 250`` a Brand
update costs more than the work it saves (benchmarks/brand_cost.py).

The model counts flops of each kernel and multiplies those of the small dense
kernels (``eigh``, Householder QR) by a penalty measured on a CPU with one
thread (``benchmarks/results/brand_cost.json``); GPUs run small ``eigh`` even
further below their GEMM rate, so there the rule errs towards the randomized
fallback.  Pure functions and one frozen config; no state.
"""

from __future__ import annotations

from dataclasses import dataclass

__all__ = ["BrandCostModel"]


def brand_terms(d: int, r: int, s: int) -> tuple[float, float]:
    r"""Flops of one Brand update: ``(GEMM part, small-eigh part)``.

    GEMMs: projection ``UᵀX`` and residual ``X - UP`` (``2drs`` each), the
    residual's Gram and the orthogonality check (``2ds(r+2s)``), the rotation
    ``[U Q] W`` (``2d(r+s)²``).  Small kernels: ``eigh`` of the ``s × s``
    Gram and of the ``(r+s)``-square core, ``9k³`` each (LAPACK ``syevd``).
    """
    k = r + s
    return 4.0 * d * r * s + 2.0 * d * s * (r + 2 * s) + 2.0 * d * k * k, 9.0 * (k**3 + s**3)


def ea_flops(d: int, s: int) -> float:
    """Flops of one dense EA update: the ``d × s`` Gram ``XXᵀ`` (``2d²s``) and the axpy (``2d²``)."""
    return 2.0 * d * d * s + 2.0 * d * d


def randomized_terms(d: int, r: int, oversample: int, n_iter: int) -> tuple[float, float]:
    r"""Flops of one randomized SVD of a ``d × d`` factor (RS-KFAC): ``(GEMM part, QR/small part)``.

    ``k = r + l`` columns, ``2q + 2`` products with the factor (range finder
    and ``AᵀQ``), ``2q + 1`` Householder QRs of ``d × k`` (``4dk²`` each) and
    the SVD of the ``d × k`` projection (``4dk² + 9k³``).
    """
    k = min(r + oversample, d)
    return 2.0 * d * d * k * (2 * n_iter + 2), 4.0 * d * k * k * (2 * n_iter + 2) + 9.0 * k**3


@dataclass(frozen=True)
class BrandCostModel:
    r"""Per-step cost of a factor kept by Brand updates against the dense EA + randomized fallback.

    Parameters
    ----------
    eigh_penalty : float >= 1
        Cost of one flop of the Brand update's small ``eigh`` relative to a
        GEMM flop (default fitted on a 2-core x86 CPU, one thread, float32:
        ``benchmarks/brand_cost.py``).
    qr_penalty : float >= 1
        Same for the randomized decomposition's Householder QRs and small SVD.
    ea_penalty : float >= 1
        Same for the dense EA update (a Gram of only ``s`` rows and an axpy
        are memory-bound at small ``s``).
    margin : float >= 1
        Brand is chosen only when it is at least this much cheaper (default
        1: the cheaper one).

    Notes
    -----
    Per step, Brand costs ``(G_B + p_e E_B) / T_B`` and the fallback
    ``p_a F_EA / T_updt + (G_R + p_q Q_R) / T_inv`` (:func:`brand_terms`,
    :func:`ea_flops`, :func:`randomized_terms`), with ``p_e 9d³`` in place of
    the randomized decomposition where the fallback takes a full ``eigh``
    (the fitted ``p_e`` is within 2× of the dense ``eigh``'s measured
    2.0–3.9 at d = 256–1024); a method that keeps the dense
    EA next to its Brand state (``br-kfac``, ``b-kfac-c``) pays the EA either
    way, so only the decomposition is weighed.  Evaluating the rule is ``O(1)``.
    """

    eigh_penalty: float = 3.6
    qr_penalty: float = 4.2
    ea_penalty: float = 1.3
    margin: float = 1.0

    def __post_init__(self) -> None:
        for name in ("eigh_penalty", "qr_penalty", "ea_penalty", "margin"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not value >= 1.0:
                raise ValueError(f"`{name}` must be a number >= 1, got {value!r}")

    def brand_step(self, d: int, r: int, s: int, *, t_brand: int) -> float:
        """GEMM-equivalent flops per step of Brand updates every ``t_brand`` steps."""
        gemm, small = brand_terms(d, r, s)
        return (gemm + self.eigh_penalty * small) / t_brand

    def fallback_step(
        self, d: int, r: int, s: int, *, t_updt: int, t_inv: int, oversample: int, n_iter: int,
        keeps_dense: bool = False, exact: bool = False,
    ) -> float:
        """GEMM-equivalent flops per step of the dense EA (unless ``keeps_dense``) and the fallback's decomposition.

        The decomposition is a randomized SVD, or with ``exact`` a full
        ``eigh`` (``9d³`` flops at ``eigh_penalty``: the fallback factor takes
        it where it is cheaper, :func:`onlinela_torch.factors.exact_is_cheaper`).
        """
        if exact:
            decomposition = self.eigh_penalty * 9.0 * d**3
        else:
            gemm, small = randomized_terms(d, r, oversample, n_iter)
            decomposition = gemm + self.qr_penalty * small
        ea = 0.0 if keeps_dense else self.ea_penalty * ea_flops(d, s) / t_updt
        return ea + decomposition / t_inv

    def pays(
        self,
        d: int,
        r: int,
        s: int,
        *,
        t_brand: int,
        t_updt: int,
        t_inv: int,
        oversample: int,
        n_iter: int,
        keeps_dense: bool = False,
        exact: bool = False,
    ) -> bool:
        """Whether Brand updates of a ``d``-dimensional factor (rank ``r``, ``s`` rows per update) are the cheaper choice.

        Always False when ``r + s >= d`` (the update would not reduce the
        dimension).  ``exact``: the fallback would decompose by a full ``eigh``.
        """
        if r + s >= d:
            return False
        brand = self.brand_step(d, r, s, t_brand=t_brand)
        fallback = self.fallback_step(d, r, s, t_updt=t_updt, t_inv=t_inv, oversample=oversample, n_iter=n_iter,
                                      keeps_dense=keeps_dense, exact=exact)
        return self.margin * brand < fallback
