"""Per-layer-type helpers: K-factor statistics and the layer's gradient matrix.

One helper per supported layer type turns what the hooks capture (the layer
input and the gradient of the loss w.r.t. the layer output) into *rows* whose
Gram matrices are the Kronecker factors of algorithms.md §1, and reads/writes
the layer gradient as one matrix ``[dW | db]`` of shape ``(g_dim, a_dim)``.

Conventions (the "expand" flavour of Eschenhagen et al. 2023, which for
``Conv2d`` is KFC, Grosse & Martens 2016):

* ``A = (1/R) Σ_i ā_i ā_iᵀ`` over the ``R`` activation rows (``R = n`` for a
  Linear layer on a batch of ``n`` vectors; ``R = n |T|`` patch rows for a
  Conv2d layer with ``|T|`` output positions), with ``ā = [a; 1]`` when the
  layer has a bias.
* ``G = (1/n) Σ_b Σ_t δ_{b,t} δ_{b,t}ᵀ`` with ``δ`` the *per-sample*
  pre-activation gradients.  With a batch-mean loss the captured output
  gradient is ``δ/n``, so ``G = n Σ_rows g gᵀ``; with a sum loss it is ``δ``,
  so ``G = (1/n) Σ_rows g gᵀ`` (see :func:`g_scale`).

The product ``A ⊗ G`` is then the KFC approximation ``Ω ⊗ Γ`` for convolutions
and the usual K-FAC block for Linear layers; splitting the ``|T|`` between the
factors this way leaves both damping conventions unchanged (they are
invariant to ``A → cA, G → G/c``).
"""

from __future__ import annotations

import abc
import functools
import logging
from typing import Literal

import torch
import torch.nn.functional as F
from torch import nn

from .scaling import write_scaled

__all__ = ["Conv1dHelper", "Conv2dHelper", "LayerHelper", "LinearHelper", "g_scale", "helper_for"]

logger = logging.getLogger(__name__)


def g_scale(n_samples: int, loss_reduction: Literal["mean", "sum"]) -> float:
    """Factor turning ``Σ_rows g gᵀ`` of captured output gradients into ``G``.

    Parameters
    ----------
    n_samples : int
        Number of samples ``n`` whose gradients were captured this step (all
        micro-batches together).
    loss_reduction : {"mean", "sum"}
        How the loss that was back-propagated reduces over those samples.
        ``"mean"`` (the gradient the optimizer sees is the mean over the ``n``
        samples, e.g. each of ``m`` micro-batch losses divided by ``m``) gives
        ``n``; ``"sum"`` gives ``1/n``.
    """
    return float(n_samples) if loss_reduction == "mean" else 1.0 / float(n_samples)


class LayerHelper(abc.ABC):
    """Factor rows and gradient matrix of one supported module.

    Parameters
    ----------
    module : torch.nn.Module
        The layer.  Its ``weight`` (and optional ``bias``) are read and written
        in place; nothing else is touched.

    Attributes
    ----------
    a_dim : int
        Dimension of the activation factor ``A`` (inputs per output, +1 with a bias).
    g_dim : int
        Dimension of the gradient factor ``G`` (output features/channels).
    """

    def __init__(self, module: nn.Module) -> None:
        self.module = module

    @property
    def has_bias(self) -> bool:
        """Whether the bias is folded into the factors as a trailing column of ones."""
        return getattr(self.module, "bias", None) is not None

    @property
    @abc.abstractmethod
    def a_dim(self) -> int: ...

    @property
    @abc.abstractmethod
    def g_dim(self) -> int: ...

    @abc.abstractmethod
    def a_rows(self, x: torch.Tensor) -> torch.Tensor:
        """Activation rows ``ā`` of shape ``(R, a_dim)`` from the layer input ``x`` (input dtype)."""

    @abc.abstractmethod
    def g_rows(self, grad_output: torch.Tensor) -> torch.Tensor:
        """Output-gradient rows of shape ``(R, g_dim)`` from the gradient w.r.t. the layer output."""

    @staticmethod
    def batch_size(x: torch.Tensor) -> int:
        """Number of samples ``n`` in a layer input (its leading dimension; 1 when unbatched)."""
        return int(x.shape[0]) if x.ndim >= 2 else 1

    def _append_ones(self, rows: torch.Tensor) -> torch.Tensor:
        if not self.has_bias:
            return rows
        return torch.cat([rows, rows.new_ones(rows.shape[0], 1)], dim=1)

    # ------------------------------------------------------------------ factors
    def a_factor(self, x: torch.Tensor, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """``A = (1/R) Σ ā āᵀ`` for one input batch, shape ``(a_dim, a_dim)``.  Cost ``O(R a_dim²)``."""
        rows = self.a_rows(x).to(dtype)
        return rows.T @ rows / rows.shape[0]

    def g_factor(
        self,
        grad_output: torch.Tensor,
        n_samples: int,
        loss_reduction: Literal["mean", "sum"] = "mean",
        dtype: torch.dtype = torch.float32,
    ) -> torch.Tensor:
        """``G`` for one batch of output gradients, shape ``(g_dim, g_dim)``.  Cost ``O(R g_dim²)``."""
        rows = self.g_rows(grad_output).to(dtype)
        return (rows.T @ rows) * g_scale(n_samples, loss_reduction)

    # ------------------------------------------------------------------ gradient
    @functools.cached_property
    def _layout(self) -> tuple[nn.Parameter, nn.Parameter | None, int]:
        """``(weight, bias or None, g_dim)``, read from the module once (the per-step path skips ``nn.Module.__getattr__``)."""
        return self.module.weight, getattr(self.module, "bias", None), self.g_dim

    def grad_matrix(self) -> torch.Tensor | None:
        """The gradient ``[dW | db]`` of shape ``(g_dim, a_dim)``, or ``None`` without a weight gradient.

        A new tensor (a concatenation) when the layer has a bias, a view of
        ``weight.grad`` otherwise.
        """
        w, b, g_dim = self._layout
        if w.grad is None:
            return None
        g = w.grad.reshape(g_dim, -1)
        if b is not None:
            bg = b.grad if b.grad is not None else torch.zeros_like(b)
            if bg.dtype != g.dtype:
                bg = bg.to(g.dtype)
            g = torch.cat([g, bg.reshape(-1, 1)], dim=1)
        return g

    def grad_pairs(self, mat: torch.Tensor) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """``(destination, source)`` pairs that write ``mat`` (shape ``(g_dim, a_dim)``) into the gradients.

        Destinations are views of ``weight.grad`` (and ``bias.grad``, created
        as zeros when missing) of the sources' shapes; no data is copied here.
        """
        w, b, g_dim = self._layout
        wg = w.grad
        if b is None:
            return [(wg, mat.reshape(wg.shape))]
        n_w = mat.shape[1] - 1
        pairs = [(wg.view(g_dim, n_w), mat[:, :n_w]) if wg.is_contiguous() else (wg, mat[:, :n_w].reshape(wg.shape))]
        if b.grad is None:
            b.grad = torch.zeros_like(b)
        pairs.append((b.grad.view(-1), mat[:, n_w]))
        return pairs

    def set_grad_matrix(self, mat: torch.Tensor, scale: torch.Tensor | None = None) -> None:
        """Write ``mat`` (shape ``(g_dim, a_dim)``), times the 0-dim ``scale`` if given, into ``weight.grad`` and ``bias.grad`` in place.

        One scaled copy per tensor (see :func:`onlinela_torch.scaling.write_scaled`).
        """
        w = self.module.weight
        n_w = self.a_dim - int(self.has_bias)
        write_scaled(w.grad, mat[:, :n_w] if self.has_bias else mat, scale)
        if self.has_bias:
            b = self.module.bias
            if b.grad is None:
                b.grad = torch.zeros_like(b)
            write_scaled(b.grad, mat[:, n_w], scale)


class LinearHelper(LayerHelper):
    """``nn.Linear``: inputs of shape ``(n, ..., d_in)``; every leading position is one row.

    ``a_dim = d_in (+1)``, ``g_dim = d_out``; ``R = n · prod(extra dims)``.
    """

    module: nn.Linear

    @property
    def a_dim(self) -> int:
        return int(self.module.in_features) + int(self.has_bias)

    @property
    def g_dim(self) -> int:
        return int(self.module.out_features)

    def a_rows(self, x: torch.Tensor) -> torch.Tensor:
        return self._append_ones(x.reshape(-1, x.shape[-1]))

    def g_rows(self, grad_output: torch.Tensor) -> torch.Tensor:
        return grad_output.reshape(-1, grad_output.shape[-1])


class Conv2dHelper(LayerHelper):
    """``nn.Conv2d`` with ``groups=1``: KFC patch expansion with ``torch.nn.functional.unfold``.

    Each of the ``|T| = H_out W_out`` output positions of each sample gives one
    row: the ``c_in k_h k_w`` input patch it sees (stride, padding, dilation as
    the layer), ``+1`` for the bias.  ``a_dim = c_in k_h k_w (+1)``,
    ``g_dim = c_out``, ``R = n |T|``.  Unfolding costs ``O(n |T| a_dim)`` memory.
    """

    module: nn.Conv2d

    @property
    def a_dim(self) -> int:
        m = self.module
        return int(m.in_channels * m.kernel_size[0] * m.kernel_size[1]) + int(self.has_bias)

    @property
    def g_dim(self) -> int:
        return int(self.module.out_channels)

    def a_rows(self, x: torch.Tensor) -> torch.Tensor:
        m = self.module
        if x.ndim == 3:
            x = x.unsqueeze(0)
        if isinstance(m.padding, str):  # "same"/"valid": pad exactly as the layer does
            x = F.pad(x, m._reversed_padding_repeated_twice)
            padding: tuple[int, int] | int = 0
        else:
            padding = m.padding
        cols = F.unfold(x, m.kernel_size, dilation=m.dilation, padding=padding, stride=m.stride)
        return _patch_rows(cols, self.has_bias)

    def g_rows(self, grad_output: torch.Tensor) -> torch.Tensor:
        if grad_output.ndim == 3:
            grad_output = grad_output.unsqueeze(0)
        return grad_output.permute(0, 2, 3, 1).reshape(-1, grad_output.shape[1])


class Conv1dHelper(LayerHelper):
    """``nn.Conv1d`` with ``groups=1``: KFC patch expansion (as :class:`Conv2dHelper` with height 1).

    Each of the ``|T| = L_out`` output positions of each sample gives one row:
    the ``c_in k`` input patch it sees (stride, padding, dilation as the
    layer), ``+1`` for the bias.  ``a_dim = c_in k (+1)``, ``g_dim = c_out``,
    ``R = n |T|``.  Unfolding costs ``O(n |T| a_dim)`` memory.  Used by the
    curvature blocks (``onlinela_torch.blocks``).
    """

    module: nn.Conv1d

    @property
    def a_dim(self) -> int:
        m = self.module
        return int(m.in_channels * m.kernel_size[0]) + int(self.has_bias)

    @property
    def g_dim(self) -> int:
        return int(self.module.out_channels)

    def a_rows(self, x: torch.Tensor) -> torch.Tensor:
        m = self.module
        if x.ndim == 2:
            x = x.unsqueeze(0)
        if isinstance(m.padding, str):  # "same"/"valid": pad exactly as the layer does
            x = F.pad(x, m._reversed_padding_repeated_twice)
            padding = 0
        else:
            padding = m.padding[0]
        cols = F.unfold(
            x.unsqueeze(2), (1, m.kernel_size[0]), dilation=(1, m.dilation[0]), padding=(0, padding), stride=(1, m.stride[0])
        )
        return _patch_rows(cols, self.has_bias)

    def g_rows(self, grad_output: torch.Tensor) -> torch.Tensor:
        if grad_output.ndim == 2:
            grad_output = grad_output.unsqueeze(0)
        return grad_output.transpose(1, 2).reshape(-1, grad_output.shape[1])


def _patch_rows(cols: torch.Tensor, bias: bool) -> torch.Tensor:
    """Rows ``(n·|T|, p [+1])`` of unfolded patches ``cols`` ``(n, p, |T|)``, the ones column appended when ``bias``.

    One copy: the transposed patches and the ones are written into one buffer
    (a transpose-reshape and a concatenation would copy the patches twice).
    """
    n, p, t = cols.shape
    out = cols.new_empty(n, t, p + int(bias))
    out[..., :p].copy_(cols.transpose(1, 2))
    if bias:
        out[..., p].fill_(1.0)
    return out.view(n * t, p + int(bias))


def helper_for(module: nn.Module) -> tuple[LayerHelper | None, str]:
    """The helper for ``module``, or ``(None, reason)`` when it is not supported.

    Supported: ``nn.Linear``; ``nn.Conv2d`` with ``groups=1`` and
    ``padding_mode="zeros"``.  Everything else (BatchNorm, embeddings,
    grouped/depthwise convolutions, ...) keeps its plain gradient.
    """
    if isinstance(module, nn.Linear):
        return LinearHelper(module), ""
    if isinstance(module, nn.Conv2d):
        if module.groups != 1:
            return None, f"Conv2d with groups={module.groups} is not supported (KFC needs groups=1)"
        if module.padding_mode != "zeros":
            return None, f"Conv2d with padding_mode={module.padding_mode!r} is not supported (needs 'zeros')"
        return Conv2dHelper(module), ""
    return None, f"{type(module).__name__} is not a supported layer type (Linear, Conv2d)"
