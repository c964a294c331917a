"""The checkpoint format of :class:`~onlinela_torch.KFACPreconditioner` (version 1).

:func:`state_dict` gathers step counters, every factor (EA, decomposition,
rank, RNG), the curvature blocks, the warning counts and the label-sampling
generator; :func:`load_state_dict` checks a state against the model (method,
layer names, every factor shape, the blocks) before changing anything, then
restores the factors.  The format is the one written since version 1, so
earlier checkpoints load and continue bitwise (on CPU).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

import torch

from .blocks import BlockSet
from .factors import FactorState
from .layer import KFACLayer

__all__ = ["check_state", "counters", "load_layers", "state_dict"]

#: the step counters of the preconditioner stored at the top level (key -> type)
COUNTERS = {"steps": int, "brand_updates": int, "skipped_steps": int}


def state_dict(
    method: str,
    counters: Mapping[str, Any],
    layers: Mapping[str, KFACLayer],
    blocks: BlockSet,
    fisher_rng: torch.Tensor | None,
) -> dict[str, Any]:
    """The version-1 state.

    ``counters`` holds ``steps``, ``brand_updates``, ``skipped_steps``,
    ``damping_factor``, ``grad_sq`` and ``warnings``; tensors are references.
    """
    return {
        "version": 1,
        "method": method,
        "steps": counters["steps"],
        "brand_updates": counters["brand_updates"],
        "skipped_steps": counters["skipped_steps"],
        "damping_factor": counters["damping_factor"],
        "grad_sq": {k: list(v) for k, v in counters["grad_sq"].items()},
        "warnings": counters["warnings"],
        "fisher_rng": fisher_rng,
        "layers": {
            name: {
                "A": None if layer.A is None else layer.A.state_dict(),
                "G": None if layer.G is None else layer.G.state_dict(),
                "counters": dict(layer.counters),
            }
            for name, layer in layers.items()
        },
        "blocks": blocks.state_dict(),
    }


def check_state(state: Mapping[str, Any], method: str, layers: Mapping[str, KFACLayer], blocks: BlockSet) -> None:
    """ValueError unless ``state`` is a version-1 state of this method and model (layers, factor shapes, blocks)."""
    if state.get("version") != 1:
        raise ValueError(f"unsupported KFACPreconditioner state version {state.get('version')!r}")
    if state["method"] != method:
        raise ValueError(f"the state is for method {state['method']!r}, this preconditioner runs {method!r}")
    if set(state["layers"]) != set(layers):
        raise ValueError(f"the state holds layers {sorted(state['layers'])}, the model has {sorted(layers)}")
    for name, sd in state["layers"].items():  # every shape checked before anything is changed
        helper = layers[name].helper
        for which, dim in (("A", helper.a_dim), ("G", helper.g_dim)):
            for what, shape in _factor_shapes(sd[which]):
                if shape[0] != dim or (what == "ea" and shape != (dim, dim)):
                    raise ValueError(
                        f"layer {name!r}: the state's {which} factor {what} has shape {shape}, this model's "
                        f"{which} factor has dimension {dim} (a state of a different model?)"
                    )
    blocks_sd = state.get("blocks", {})
    if set(blocks_sd) != set(blocks.blocks):
        raise ValueError(f"the state holds curvature blocks {sorted(blocks_sd)}, the model has {sorted(blocks.blocks)}")


def counters(state: Mapping[str, Any]) -> dict[str, Any]:
    """The step counters, ``damping_factor`` and ``grad_sq`` of a state, typed (defaults for keys older states lack)."""
    out: dict[str, Any] = {key: kind(state[key]) for key, kind in COUNTERS.items()}
    out["damping_factor"] = float(state.get("damping_factor", 1.0))
    out["grad_sq"] = {str(k): (float(v[0]), int(v[1])) for k, v in state.get("grad_sq", {}).items()}
    return out


def load_layers(
    state: Mapping[str, Any], layers: Mapping[str, KFACLayer], factor_for: Callable[..., FactorState]
) -> None:
    """Replace every layer's factors and counters by the state's (``factor_for(layer, which, 0, kind=...)`` builds each)."""
    for name, sd in state["layers"].items():
        layer = layers[name]
        layer.A = layer.G = None
        for which in ("A", "G"):
            if sd[which] is not None:
                factor_for(layer, which, 0, kind=sd[which]["kind"]).load_state_dict(sd[which])
        layer.counters = dict(sd["counters"])
        layer.reset_capture()


def _factor_shapes(sd: Mapping[str, Any] | None) -> list[tuple[str, tuple[int, ...]]]:
    """``(what, shape)`` of every tensor in a factor's state whose first dimension is the factor's ``d``."""
    if sd is None:
        return []
    out = []
    if sd.get("ea") is not None:
        out.append(("ea", tuple(sd["ea"].shape)))
    for key in ("eigen", "brand"):
        if sd.get(key) is not None:
            out.append((f"{key} eigenvectors", tuple(sd[key]["eigvecs"].shape)))
    return out
