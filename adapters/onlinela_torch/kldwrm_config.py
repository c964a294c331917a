"""Options of KLD-WRM: :class:`KLDWRMConfig` and the variant names (algorithms.md §5, docs/kldwrm.rst)."""

from __future__ import annotations

from dataclasses import dataclass

from onlinela import validation as V

__all__ = ["KLDWRMConfig"]

#: The three instantiations of the papers, in order of cost.
VARIANTS = ("so", "q", "qe")


@dataclass(frozen=True)
class KLDWRMConfig:
    """Options of :class:`KLDWRM` (KLD-WRM, algorithms.md §5); the papers' values unless said otherwise.

    Parameters
    ----------
    rho : float in (0, 1) or None
        ``ρ``: decay of the wake weights, which is also the EA decay of the
        Kronecker factors.  None gives the papers' value per variant: 0.33 for
        ``"so"``, 0.5 for ``"q"`` and ``"qe"``.
    rms_clip : float > 0 or None
        Per-tensor RMS cap ``ν_l = min(1, rms_clip / rms(u_l))`` on each
        layer's direction (2.0), applied before the graft and the KL clip.  The
        papers use it for Q and QE; here SO has it too (without it SO diverged
        at lr 0.1 on the small CNN, docs/kldwrm.rst).  None disables it.
    local_curvature : float >= 0
        ``γ``, weight of the quadratic model's curvature ``F_k`` (Q and QE; 1 in
        the papers).  ``γ = 0`` turns the quadratic model into SO's linear one.
    inner_steps : int >= 0
        QE: SGD steps after the Q step (7).  0 makes QE identical to Q.
    inner_lr : float > 0
        QE: inner learning rate as a multiple of the current ``lr`` (0.1).
    inner_momentum : float in [0, 1)
        QE: heavy-ball momentum of the inner steps (0.5).
    n_stored : int >= 1
        QE: networks in the exact-KL wake, the current one included (3).
    kl_weight : float >= 0
        QE: the exact-KL term's weight is ``λ = kl_weight / lr_k`` (0.1).
        ``kl_weight = 1`` is the wake's own weight (then ``(λ/2) symKL ≈
        (1/lr_k) KL`` to second order, Q's regulariser); on MNIST it
        over-brakes, because the exact KL of a Q step is typically 8-40 times
        its second-order K-FAC estimate (docs/kldwrm.rst), so the default is 0.1.
    """

    rho: float | None = None
    rms_clip: float | None = 2.0
    local_curvature: float = 1.0
    inner_steps: int = 7
    inner_lr: float = 0.1
    inner_momentum: float = 0.5
    n_stored: int = 3
    kl_weight: float = 0.1

    def __post_init__(self) -> None:
        if self.rho is not None:
            V.check_real(self.rho, "rho", low=0.0, high=1.0, low_open=True, high_open=True)
        if self.rms_clip is not None:
            V.check_real(self.rms_clip, "rms_clip", low=0.0, low_open=True)
        V.check_real(self.local_curvature, "local_curvature", low=0.0)
        V.check_int(self.inner_steps, "inner_steps", low=0)
        V.check_real(self.inner_lr, "inner_lr", low=0.0, low_open=True)
        V.check_real(self.inner_momentum, "inner_momentum", low=0.0, high=1.0, high_open=True)
        V.check_int(self.n_stored, "n_stored", low=1)
        V.check_real(self.kl_weight, "kl_weight", low=0.0)

    def rho_for(self, variant: str) -> float:
        """``ρ`` for ``variant``: :attr:`rho`, or the papers' 0.33 (SO) / 0.5 (Q, QE)."""
        if self.rho is not None:
            return float(self.rho)
        return 0.33 if variant == "so" else 0.5
