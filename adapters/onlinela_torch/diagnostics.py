"""Read-only views of a :class:`~onlinela_torch.KFACPreconditioner`: ``stats()``, absolute damping, model curvature.

Nothing here changes state.  :func:`stats` gathers the counters, per-phase
seconds and per-factor summaries; :class:`CurvatureModel` expresses the
current K-FAC model in curvature units
for the Levenberg–Marquardt rule of the optimizer classes
(``O(d_G d_A (r_G + r_A))`` per layer).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

import torch

from .blocks import BlockSet
from .inverse import factor_scale
from .layer import KFACLayer
from .options import KFACOptions
from .stepping import eigen

__all__ = ["CurvatureModel", "stats"]


def stats(
    method: str,
    steps: int,
    skipped_steps: int,
    warnings: Mapping[str, int],
    seconds: Mapping[str, float],
    layers: Mapping[str, KFACLayer],
    blocks: BlockSet,
    brand_choice: Mapping[str, int],
) -> dict[str, Any]:
    """The dict of :meth:`KFACPreconditioner.stats <onlinela_torch.KFACPreconditioner.stats>` (fresh copies)."""
    per_layer = {}
    for name, layer in layers.items():
        entry: dict[str, Any] = {"seconds": dict(layer.seconds), "counters": dict(layer.counters)}
        for which, f in (("A", layer.A), ("G", layer.G)):
            entry[which] = None if f is None else f.summary()
        per_layer[name] = entry
    return {
        "method": method,
        "step": steps,
        "skipped_steps": skipped_steps,
        "warnings": dict(warnings),
        "seconds": dict(seconds),
        "layers": per_layer,
        "blocks": blocks.stats()["blocks"],
        "uncovered": [vars(u) for u in blocks.uncovered],
        "shared": [list(t) for t in blocks.shared],
        "brand": dict(brand_choice),
    }


class CurvatureModel:
    """The K-FAC model of the Kronecker layers in curvature units (the optimizer classes' quadratic model).

    Parameters
    ----------
    layers : dict of str to KFACLayer
    options : KFACOptions
        ``damping_scale`` and ``complement`` define each factor's scale.
    damping : callable returning float
        The current relative damping ``λ``.
    """

    def __init__(self, layers: Mapping[str, KFACLayer], options: KFACOptions, damping: Callable[[], float]) -> None:
        self.layers, self.options, self.damping = layers, options, damping

    def absolute_damping(self) -> dict[str, float]:
        r"""Per layer, the damping ``λ · s_A · s_G`` in curvature units (0 before the first decomposition).

        ``s`` is each factor's damping scale (``damping_scale``); it is the
        ``λ`` of ``C = F + λI`` that the quadratic model of the optimizer classes
        uses on the layer's parameters, consistent with what ``step()`` inverts.
        """
        lam, o = self.damping(), self.options
        out = {}
        for name, layer in self.layers.items():
            eA, eG = eigen(layer.A), eigen(layer.G)
            if eA is None or eG is None:
                out[name] = 0.0
            else:
                sA = factor_scale(eA, o.damping_scale, o.complement)
                sG = factor_scale(eG, o.damping_scale, o.complement)
                out[name] = lam * sA * sG
        return out

    def model_curvature(self, deltas: Mapping[int, torch.Tensor]) -> float:
        r"""``δᵀ(F̂ + λI)δ`` under the K-FAC model, ``F̂`` the current decompositions.

        Parameters
        ----------
        deltas : mapping of ``id(parameter)`` to Tensor
            A step for (some of) the model's parameters, each of its parameter's shape.

        Returns
        -------
        float
            ``Σ_l tr(δ_lᵀ G_l δ_l A_l) + λ_l ‖δ_l‖²`` over the preconditioned
            layers with a decomposition (``δ_l = [δW | δb]``, ``λ_l`` from
            :meth:`absolute_damping`); other parameters contribute nothing.
            The cheap quadratic model of the Levenberg–Marquardt rule without
            exact curvature products.  Cost ``O(d_G d_A (r_G + r_A))`` per layer.
        """
        lam = self.absolute_damping()
        total = 0.0
        for name, layer in self.layers.items():
            eA, eG = eigen(layer.A), eigen(layer.G)
            dw = deltas.get(id(layer.module.weight))
            if eA is None or eG is None or dw is None:
                continue
            d = dw.reshape(layer.helper.g_dim, -1)
            if layer.helper.has_bias:
                db = deltas.get(id(layer.module.bias))
                db = torch.zeros(d.shape[0], dtype=d.dtype, device=d.device) if db is None else db
                d = torch.cat([d, db.reshape(-1, 1).to(d.dtype)], dim=1)
            d = d.to(eA.approx.dtype)
            gd = eG.approx.matmul(d)
            gda = eA.approx.matmul(gd.T).T
            total += float((gda * d).sum()) + lam[name] * float((d * d).sum())
        return total
