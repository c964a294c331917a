"""The per-step scalar work of :meth:`KFACPreconditioner.step`, batched over layers.

One fused norm over every gradient tensor (finiteness check, graft and
unit-scale lengths), one host read per step, and one coefficient per
preconditioned tensor that grafting, the unit scale, the RMS clip and the KL
clip fold into, so writing the result back is one scaled copy per tensor.
Pure functions of tensors; no state.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch

__all__: list[str] = []

_TINY = torch.finfo(torch.float32).tiny


def norms(tensors: Sequence[torch.Tensor]) -> torch.Tensor:
    """Frobenius norms of ``tensors`` as one float32 vector of shape ``(n,)`` (one fused ``_foreach_norm``).

    A norm is NaN or inf when its tensor holds a NaN or an inf (and inf on
    overflow of finite entries: callers confirm with an exact test).  16-bit
    tensors are reduced in float32.  Cost ``O(Σ numel)``.
    """
    if not tensors:
        return torch.zeros(0)
    ts = [t if t.dtype in (torch.float32, torch.float64) else t.float() for t in tensors]
    return stack_scalars(torch._foreach_norm(ts))


#: per-entry step RMS, per unit of lr, of ``graft="element"``: chosen on the zoo so that the
#: family's best learning rates sit mid-grid, as ``"unit"``'s do (docs/tuning.rst, "graft")
ELEMENT_SCALE = 0.03


def stack_scalars(values: Sequence[torch.Tensor]) -> torch.Tensor:
    """0-dim tensors as one float32 vector (on the first one's device; a copy only for others)."""
    dev = values[0].device
    if any(v.device != dev for v in values):
        values = [v.to(dev) for v in values]
    return torch.stack(list(values)).float()


def direction_scales(
    vs: Sequence[torch.Tensor],
    grad_norms: torch.Tensor,
    rms: Sequence[float] | None,
    *,
    graft: str | None,
    rms_clip: float | None,
) -> torch.Tensor | None:
    r"""One factor ``c_l`` per direction ``v_l`` (float32, shape ``(n,)``), or None when every ``c_l = 1``.

    * ``graft`` set: ``c_l = ‖g_l‖ / ‖v_l‖`` (0 when ``v_l = 0``), divided by
      ``rms[l]`` (the unit scale; entries 0 leave the factor alone), and for
      ``graft="element"`` multiplied by ``ELEMENT_SCALE · √numel(v_l)`` (a
      per-entry step RMS of ``ELEMENT_SCALE`` per unit of lr).  A prior RMS
      clip would be undone by the graft, so it is not applied.
    * ``graft=None`` with ``rms_clip``: ``c_l = min(1, κ / rms(v_l))``.
    """
    if graft is None and rms_clip is None:
        return None
    nv = norms(vs)
    if graft is not None:
        c = torch.where(nv > 0, grad_norms.to(nv.device) / nv.clamp_min(_TINY), torch.zeros_like(nv))
        if rms is not None:
            c = c / torch.tensor([r if r > 0 else 1.0 for r in rms], dtype=c.dtype, device=c.device)
        if graft == "element":
            c = c * torch.tensor([ELEMENT_SCALE * math.sqrt(v.numel()) for v in vs], dtype=c.dtype, device=c.device)
        return c
    numel = torch.tensor([float(v.numel()) for v in vs], dtype=nv.dtype, device=nv.device)
    return torch.clamp(rms_clip / (nv / numel.sqrt()), max=1.0)


def kl_scales(
    scales: torch.Tensor | None, vs: Sequence[torch.Tensor], gs: Sequence[torch.Tensor], lr: float, kl_clip: float
) -> torch.Tensor:
    r"""``scales`` times the KL clip ``ν = min(1, sqrt(κ / |Σ_l c_l v_l·g_l η²|))`` (a vector of ``n`` factors)."""
    dots = stack_scalars([torch.dot(v.reshape(-1).float(), g.reshape(-1).float()) for v, g in zip(vs, gs)])
    if scales is not None:
        dots = dots * scales
    nu = torch.clamp(torch.sqrt(kl_clip / (dots.sum() * lr**2).abs()), max=1.0)
    return nu.expand(len(vs)) if scales is None else scales * nu


def write_scaled(dst: torch.Tensor, src: torch.Tensor, scale: torch.Tensor | None) -> None:
    """``dst ← scale · src`` in place (``src`` of ``dst``'s number of elements), one pass when ``dst`` is contiguous."""
    if scale is None:
        dst.copy_(src.reshape(dst.shape))
    elif dst.is_contiguous():
        torch.mul(src, scale.to(src.dtype), out=dst.view(src.shape))
    else:
        dst.copy_((src * scale.to(src.dtype)).reshape(dst.shape))


def write_all(dsts: list[torch.Tensor], srcs: list[torch.Tensor], scales: list[torch.Tensor] | None) -> None:
    """``dst ← scale · src`` for every pair (same shapes): one fused copy and one fused scaling.

    Destinations that share memory (a parameter written twice) are written one
    after the other, in list order, so the last write wins as in a loop.
    """
    if len({d.data_ptr() for d in dsts}) < len(dsts):
        for i, (d, s) in enumerate(zip(dsts, srcs)):
            write_scaled(d, s, None if scales is None else scales[i])
        return
    torch._foreach_copy_(dsts, srcs)
    if scales is not None:
        torch._foreach_mul_(dsts, [c if c.dtype == d.dtype else c.to(d.dtype) for c, d in zip(scales, dsts)])


def gather_norms(
    gnorm: torch.Tensor, host: list[float], n_layers: int, others: list[torch.Tensor], block_params: list[torch.Tensor]
) -> tuple[torch.Tensor, list[float]]:
    """Gradient norms of the layers, then of the block parameters, on the device and on the host.

    ``gnorm`` / ``host`` hold the norms of the ``n_layers`` layer matrices
    followed by those of ``others`` (the parameters outside the layers); a
    block parameter shared with a layer gets its own norm.
    """
    if not block_params:
        return gnorm[:n_layers], host[:n_layers]
    pos = {id(p): n_layers + i for i, p in enumerate(others)}
    idx = [pos.get(id(p), -1) for p in block_params]
    if min(idx) < 0:
        extra = norms([p.grad for p in block_params]).to(gnorm.device)
        return torch.cat([gnorm[:n_layers], extra]), host[:n_layers] + extra.tolist()
    sel = list(range(n_layers)) + idx
    return gnorm.index_select(0, torch.tensor(sel, device=gnorm.device)), [host[i] for i in sel]


def unit_rms(store: dict[str, tuple[float, int]], keys: list[str], grad_norms: list[float], decay: float) -> list[float]:
    """Update each key's running mean of its squared gradient norm in ``store``; return its debiased root.

    After grafting ``‖v_l‖ = ‖g_l‖``, so dividing by this RMS makes each
    layer's step ``≈ lr`` long whatever the scale of the loss, layer by layer
    (``graft="unit"``; ``"element"`` then scales it per entry).  Host floats: ``store`` is part of the checkpoint.
    """
    out = []
    for key, n in zip(keys, grad_norms):
        ea, count = store.get(key, (0.0, 0))
        ea, count = decay * ea + (1 - decay) * n * n, count + 1
        store[key] = (ea, count)
        out.append(math.sqrt(ea / (1 - decay**count)))
    return out


def write_directions(helpers: list, block_params: list[torch.Tensor], vs: list[torch.Tensor], scales: torch.Tensor | None) -> None:
    """``p.grad ← c · v``: the layers' ``[dW | db]`` through their helpers, then the block parameters (two fused calls)."""
    per = [None] * len(vs) if scales is None else scales.unbind(0)
    dsts: list[torch.Tensor] = []
    srcs: list[torch.Tensor] = []
    cs: list[torch.Tensor | None] = []
    for helper, v, c in zip(helpers, vs, per):
        for dst, src in helper.grad_pairs(v):
            dsts.append(dst)
            srcs.append(src)
            cs.append(c)
    for p, v, c in zip(block_params, vs[len(helpers) :], per[len(helpers) :]):
        dsts.append(p.grad)
        srcs.append(v.reshape(p.grad.shape))
        cs.append(c)
    write_all(dsts, srcs, None if scales is None else cs)
