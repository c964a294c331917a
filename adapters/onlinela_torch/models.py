"""Reference models of the K-FAC-family papers, for the ``onlinela`` command.

* :class:`MNISTAutoencoder` — the deep autoencoder 784-1000-500-250-30 with a
  mirrored decoder (Hinton & Salakhutdinov 2006), the classic benchmark of
  Martens 2010 and Martens & Grosse 2015.
* :class:`MLPClassifier` — a fully connected classifier.
* :class:`SmallCNN` — the KLD-WRM paper's MNIST network.
* :func:`vgg16_bn` — VGG16 with batch normalisation and the papers' CIFAR-10
  head, or the Brand paper's wide-FC variant.
* :class:`TinyCausalLM` — a small character-level causal transformer (the
  ``tiny-lm`` task).

The image models take images ``(N, C, H, W)``; ``width`` options scale hidden
sizes so a CPU can run a proportional proxy of the full-size network.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence

import torch
from torch import nn

logger = logging.getLogger(__name__)

__all__ = [
    "MLPClassifier",
    "MNISTAutoencoder",
    "SmallCNN",
    "TinyCausalLM",
    "VGG16_CONFIG",
    "WIDE_HEAD_WIDTH",
    "count_parameters",
    "sparse_init_",
    "vgg16_bn",
]

_ACTIVATIONS = {"sigmoid": nn.Sigmoid, "tanh": nn.Tanh, "relu": nn.ReLU}

#: Convolution channels of VGG16 ("M" is a 2×2 max-pool).
VGG16_CONFIG: tuple[int | str, ...] = (
    64, 64, "M", 128, 128, "M", 256, 256, 256, "M", 512, 512, 512, "M", 512, 512, 512, "M",
)
#: Hidden width of the wide-FC VGG16 variant: its second FC layer has an
#: A-factor of dimension 16,385, the regime where Brand updates pay off most.
WIDE_HEAD_WIDTH = 16384


def _scaled(sizes: Sequence[int], width: float) -> list[int]:
    if width <= 0:
        raise ValueError(f"`width` must be positive, got {width}")
    return [max(1, int(round(s * width))) for s in sizes]


def _activation(name: str) -> type[nn.Module]:
    if name not in _ACTIVATIONS:
        raise ValueError(f"`activation` must be one of {sorted(_ACTIVATIONS)}, got {name!r}")
    return _ACTIVATIONS[name]


@torch.no_grad()
def sparse_init_(layer: nn.Linear, nonzeros: int = 15) -> nn.Linear:
    """Martens' (2010) sparse initialisation, in place.

    Each output unit keeps ``min(nonzeros, in_features)`` incoming weights,
    at input positions chosen uniformly without replacement, drawn from
    ``N(0, 1)``; every other weight and the bias are zero.  Uses torch's
    global generator.  Cost ``O(out_features · in_features)``.

    Parameters
    ----------
    layer : torch.nn.Linear
        Weight of shape ``(out_features, in_features)``, any float dtype and
        device (kept); overwritten in place.
    nonzeros : int >= 1, default 15
        Non-zero incoming weights per output unit.

    Returns
    -------
    The same ``layer``.

    Raises
    ------
    ValueError
        If ``nonzeros`` is not a positive int.
    """
    if isinstance(nonzeros, bool) or not isinstance(nonzeros, int) or nonzeros < 1:
        raise ValueError(f"`nonzeros` must be a positive int, got {nonzeros!r}")
    out_features, in_features = layer.weight.shape
    k = min(nonzeros, in_features)
    idx = torch.rand(out_features, in_features, device=layer.weight.device).argsort(dim=1)[:, :k]
    weight = torch.zeros_like(layer.weight)
    weight.scatter_(1, idx, torch.randn(out_features, k, device=weight.device, dtype=weight.dtype))
    layer.weight.copy_(weight)
    if layer.bias is not None:
        layer.bias.zero_()
    return layer


def _mlp(sizes: Sequence[int], activation: type[nn.Module]) -> list[nn.Module]:
    """Linear layers between consecutive ``sizes``, an activation after each but the last."""
    layers: list[nn.Module] = []
    for i, (d_in, d_out) in enumerate(zip(sizes[:-1], sizes[1:])):
        layers.append(nn.Linear(d_in, d_out))
        if i < len(sizes) - 2:
            layers.append(activation())
    return layers


class MNISTAutoencoder(nn.Module):
    """Deep autoencoder ``in-1000-500-250-30-250-500-1000-in``.

    Logistic hidden units, a linear 30-unit code layer and logit outputs (use
    a binary cross-entropy with logits), as in Hinton & Salakhutdinov 2006 and
    the K-FAC paper's MNIST benchmark.  The default ``init="sparse"`` is that
    benchmark's initialisation (Martens 2010): every unit gets ``sparsity``
    non-zero incoming weights drawn from ``N(0, 1)`` and a zero bias.  With
    PyTorch's dense default initialisation (``init="default"``) the logistic
    network starts on the mean-image plateau (reconstruction error ≈ 53 on
    MNIST), where every optimizer we tried stalled.

    Parameters
    ----------
    in_features : int, default 784
        Pixels per image (784 for 28×28 MNIST, 64 for 8×8 digits).
    width : float, default 1.0
        Scale of the hidden sizes 1000, 500, 250 (the code size stays 30):
        ``width=0.25`` gives a 784-250-125-62-30 proxy for CPUs.
    hidden : sequence of int, default (1000, 500, 250)
        Encoder hidden sizes before scaling.
    code : int, default 30
        Code (bottleneck) size.
    activation : {"sigmoid", "tanh", "relu"}, default "sigmoid"
        Hidden nonlinearity.
    init : {"sparse", "default"}, default "sparse"
        Weight initialisation (draws from torch's global generator: seed it
        with :func:`torch.manual_seed` for reproducibility).
    sparsity : int, default 15
        Non-zero incoming weights per unit under ``init="sparse"`` (all of
        them when the layer has fewer inputs).
    """

    def __init__(
        self,
        in_features: int = 784,
        *,
        width: float = 1.0,
        hidden: Sequence[int] = (1000, 500, 250),
        code: int = 30,
        activation: str = "sigmoid",
        init: str = "sparse",
        sparsity: int = 15,
    ) -> None:
        super().__init__()
        act = _activation(activation)
        if init not in ("sparse", "default"):
            raise ValueError(f"`init` must be 'sparse' or 'default', got {init!r}")
        if isinstance(sparsity, bool) or not isinstance(sparsity, int) or sparsity < 1:
            raise ValueError(f"`sparsity` must be a positive int, got {sparsity!r}")
        sizes = [in_features, *_scaled(hidden, width), code]
        self.sizes = tuple(sizes)
        self.encoder = nn.Sequential(*_mlp(sizes, act))
        self.decoder = nn.Sequential(*_mlp(sizes[::-1], act))
        if init == "sparse":
            for module in self.modules():
                if isinstance(module, nn.Linear):
                    sparse_init_(module, sparsity)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Reconstruction logits ``(N, in_features)`` of images ``(N, ...)``."""
        return self.decoder(self.encoder(x.flatten(1)))


class MLPClassifier(nn.Module):
    """Fully connected classifier ``in-hidden...-num_classes``.

    Parameters
    ----------
    in_features : int
        Input features (pixels per image).
    num_classes : int, default 10
        Output logits.
    hidden : sequence of int, default (512, 256)
        Hidden sizes before scaling.
    width : float, default 1.0
        Scale of the hidden sizes.
    activation : {"relu", "tanh", "sigmoid"}, default "relu"
        Hidden nonlinearity.
    """

    def __init__(
        self,
        in_features: int,
        num_classes: int = 10,
        *,
        hidden: Sequence[int] = (512, 256),
        width: float = 1.0,
        activation: str = "relu",
    ) -> None:
        super().__init__()
        self.sizes = (in_features, *_scaled(hidden, width), num_classes)
        self.layers = nn.Sequential(*_mlp(self.sizes, _activation(activation)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Logits ``(N, num_classes)``."""
        return self.layers(x.flatten(1))


class SmallCNN(nn.Module):
    """The KLD-WRM paper's MNIST network.

    conv 1→5 (5×5), ReLU, 2×2 max-pool, conv 5→7 (5×5), ReLU, 2×2 max-pool,
    FC 112→30, ReLU, dropout 0.5, FC 30→10.  On 28×28 inputs the valid
    convolutions and pools give 28→24→12→8→4, so the flattened size is
    7·4·4 = 112.  Inputs smaller than 16×16 (e.g. the 8×8 digits) would
    vanish under valid 5×5 convolutions; for those the convolutions are
    zero-padded by 2 ("same"): 8→8→4→4→2, flattened size 7·2·2 = 28.

    Parameters
    ----------
    in_channels : int, default 1
        Image channels.
    image_size : int, default 28
        Height (= width) of the input images.
    num_classes : int, default 10
        Output logits.
    hidden : int, default 30
        Width of the hidden FC layer.
    dropout : float, default 0.5
        Dropout before the last layer.
    """

    def __init__(
        self,
        in_channels: int = 1,
        image_size: int = 28,
        num_classes: int = 10,
        *,
        hidden: int = 30,
        dropout: float = 0.5,
    ) -> None:
        super().__init__()
        padding = 0 if image_size >= 16 else 2
        side = image_size
        for _ in range(2):
            side = (side + 2 * padding - 4) // 2
        if side < 1:
            raise ValueError(f"`image_size` must be at least 4, got {image_size}")
        self.padding = padding
        self.flat_features = 7 * side * side
        self.features = nn.Sequential(
            nn.Conv2d(in_channels, 5, 5, padding=padding),
            nn.ReLU(),
            nn.MaxPool2d(2),
            nn.Conv2d(5, 7, 5, padding=padding),
            nn.ReLU(),
            nn.MaxPool2d(2),
        )
        self.classifier = nn.Sequential(
            nn.Linear(self.flat_features, hidden),
            nn.ReLU(),
            nn.Dropout(dropout),
            nn.Linear(hidden, num_classes),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Logits ``(N, num_classes)`` of images ``(N, C, H, W)``."""
        return self.classifier(self.features(x).flatten(1))


def vgg16_bn(
    num_classes: int = 10,
    *,
    in_channels: int = 3,
    image_size: int = 32,
    head_width: int = 512,
    width: float = 1.0,
) -> nn.Sequential:
    """VGG16 with batch normalisation and a small fully connected head.

    Thirteen 3×3 convolutions (each followed by BatchNorm and ReLU) in five
    blocks with 2×2 max-pools (:data:`VGG16_CONFIG`), then the head
    ``F -> head_width -> 512 -> num_classes`` with ReLUs, where F is the
    flattened feature size (512 for 32×32 CIFAR-10 images).  The default
    ``head_width=512`` is the papers' "512-512-10" head (three FC layers of
    output widths 512, 512, 10); ``head_width=WIDE_HEAD_WIDTH`` is our reading
    of the Brand paper's "slightly modified" network with a wide first FC
    layer, so that the second FC layer's A-factor has dimension ≈16k.

    Parameters
    ----------
    num_classes : int, default 10
        Output logits.
    in_channels : int, default 3
        Image channels.
    image_size : int, default 32
        Height (= width) of the input; must be divisible by 32.
    head_width : int, default 512
        Width of the first FC layer.
    width : float, default 1.0
        Scale of the convolution channels (a CPU proxy); the head's second
        layer stays 512 wide.

    Returns
    -------
    torch.nn.Sequential
        ``features`` (convolutions), ``flatten``, ``classifier`` (the head).
    """
    if image_size % 32:
        raise ValueError(f"`image_size` must be divisible by 32 (five 2x2 pools), got {image_size}")
    layers: list[nn.Module] = []
    channels = in_channels
    for item in VGG16_CONFIG:
        if item == "M":
            layers.append(nn.MaxPool2d(2))
            continue
        out = _scaled([int(item)], width)[0]
        layers += [nn.Conv2d(channels, out, 3, padding=1), nn.BatchNorm2d(out), nn.ReLU(inplace=True)]
        channels = out
    flat = channels * (image_size // 32) ** 2
    head = nn.Sequential(
        nn.Linear(flat, head_width),
        nn.ReLU(inplace=True),
        nn.Linear(head_width, 512),
        nn.ReLU(inplace=True),
        nn.Linear(512, num_classes),
    )
    model = nn.Sequential()
    model.add_module("features", nn.Sequential(*layers))
    model.add_module("flatten", nn.Flatten())
    model.add_module("classifier", head)
    logger.debug("vgg16_bn: %.1fM parameters", sum(p.numel() for p in model.parameters()) / 1e6)
    return model


def count_parameters(model: nn.Module) -> int:
    """Number of trainable parameters of ``model``."""
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


class TinyCausalLM(nn.Module):
    """Character-level causal transformer: token + learned position embeddings, pre-LN encoder layers, output Linear.

    ``logits = head(LayerNorm(layers(tok(x) + pos(t))))`` where each layer is
    ``nn.TransformerEncoderLayer(batch_first=True, norm_first=True)`` (GELU,
    feed-forward width ``4 d_model``) run with a causal mask, so position
    ``t`` only sees positions ``≤ t``.

    Parameters
    ----------
    vocab_size : int
        Number of tokens ``V``.
    d_model : int, default 64
    n_layers : int, default 2
    n_heads : int, default 4
        Must divide ``d_model``.
    context : int, default 64
        Longest input sequence ``T`` (size of the position table).
    dropout : float, default 0.0
    tie_weights : bool, default False
        Share the token embedding with the output layer's weight (the head then has no bias).

    Notes
    -----
    Input ``(N, T)`` int64 token ids with ``T <= context``; output logits
    ``(N, T, V)``.  Parameters: ``V d + T d + n_layers (12 d² + 13 d) + 2 d + d V (+ V)``.
    """

    def __init__(
        self,
        vocab_size: int,
        *,
        d_model: int = 64,
        n_layers: int = 2,
        n_heads: int = 4,
        context: int = 64,
        dropout: float = 0.0,
        tie_weights: bool = False,
    ) -> None:
        super().__init__()
        for name, v in (("vocab_size", vocab_size), ("d_model", d_model), ("n_layers", n_layers),
                        ("n_heads", n_heads), ("context", context)):
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise ValueError(f"`{name}` must be a positive int, got {v!r}")
        if d_model % n_heads:
            raise ValueError(f"`n_heads` must divide `d_model`, got d_model={d_model}, n_heads={n_heads}")
        if not 0.0 <= dropout < 1.0:
            raise ValueError(f"`dropout` must be in [0, 1), got {dropout}")
        self.context = context
        self.tok = nn.Embedding(vocab_size, d_model)
        self.pos = nn.Embedding(context, d_model)
        self.layers = nn.ModuleList(
            nn.TransformerEncoderLayer(
                d_model, n_heads, dim_feedforward=4 * d_model, dropout=dropout,
                activation="gelu", batch_first=True, norm_first=True,
            )
            for _ in range(n_layers)
        )
        self.norm = nn.LayerNorm(d_model)
        self.head = nn.Linear(d_model, vocab_size, bias=not tie_weights)
        if tie_weights:
            self.head.weight = self.tok.weight
        self.register_buffer("causal_mask", nn.Transformer.generate_square_subsequent_mask(context), persistent=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Logits ``(N, T, V)`` of token ids ``(N, T)``."""
        if x.ndim != 2 or x.shape[1] > self.context:
            raise ValueError(f"input must be token ids of shape (N, T) with T <= {self.context}, got {tuple(x.shape)}")
        T = x.shape[1]
        h = self.tok(x) + self.pos(torch.arange(T, device=x.device))
        mask = self.causal_mask[:T, :T]
        for layer in self.layers:
            h = layer(h, src_mask=mask, is_causal=True)
        return self.head(self.norm(h))
