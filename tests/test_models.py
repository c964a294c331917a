"""onlinela_torch.models: the papers' architectures, their sizes and shapes."""

from __future__ import annotations

import pytest

torch = pytest.importorskip("torch")

from torch import nn  # noqa: E402

from onlinela_torch import models  # noqa: E402


def linear_sizes(module):
    return [(m.in_features, m.out_features) for m in module.modules() if isinstance(m, nn.Linear)]


def test_autoencoder_is_the_classic_784_1000_500_250_30():
    model = models.MNISTAutoencoder()
    assert linear_sizes(model) == [
        (784, 1000), (1000, 500), (500, 250), (250, 30),
        (30, 250), (250, 500), (500, 1000), (1000, 784),
    ]
    # the code layer is linear: the encoder ends with a Linear, the decoder starts with one
    assert isinstance(model.encoder[-1], nn.Linear) and isinstance(model.decoder[0], nn.Linear)
    assert sum(isinstance(m, nn.Sigmoid) for m in model.modules()) == 6
    out = model(torch.rand(3, 1, 28, 28))
    assert out.shape == (3, 784)


def test_autoencoder_width_scales_hidden_layers_only():
    model = models.MNISTAutoencoder(64, width=0.25, activation="relu")
    assert model.sizes == (64, 250, 125, 62, 30)
    assert model(torch.rand(2, 1, 8, 8)).shape == (2, 64)


def test_autoencoder_sparse_init_is_martens_2010():
    torch.manual_seed(0)
    model = models.MNISTAutoencoder(64, width=0.25)
    for layer in (m for m in model.modules() if isinstance(m, nn.Linear)):
        nonzero_per_unit = (layer.weight != 0).sum(dim=1)
        assert torch.all(nonzero_per_unit == min(15, layer.in_features)), layer
        assert torch.all(layer.bias == 0)
    # N(0, 1) entries: the sample std of N draws has standard error 1/sqrt(2N); allow 10 of them
    big = models.sparse_init_(nn.Linear(100, 2000))
    vals = big.weight.detach()[big.weight != 0]
    assert vals.numel() == 2000 * 15
    assert abs(float(vals.std()) - 1.0) < 10 / (2 * vals.numel()) ** 0.5
    # input positions are spread, not always the first ones
    assert (big.weight != 0).any(dim=0).sum() == 100
    # reproducible under the global seed, and the dense default is still available
    torch.manual_seed(0)
    again = models.MNISTAutoencoder(64, width=0.25)
    assert all(torch.equal(a, b) for a, b in zip(model.parameters(), again.parameters()))
    dense = models.MNISTAutoencoder(64, width=0.25, init="default")
    assert (dense.encoder[0].weight != 0).all()


@pytest.mark.parametrize(("kwargs", "match"), [({"init": "xavier"}, "init"), ({"sparsity": 0}, "sparsity")])
def test_autoencoder_rejects_bad_options(kwargs, match):
    with pytest.raises(ValueError, match=match):
        models.MNISTAutoencoder(64, **kwargs)
    with pytest.raises(ValueError, match="nonzeros"):
        models.sparse_init_(nn.Linear(3, 2), nonzeros=0)


def test_small_cnn_matches_the_kldwrm_paper():
    model = models.SmallCNN()
    assert model.flat_features == 7 * 4 * 4 == 112
    convs = [m for m in model.modules() if isinstance(m, nn.Conv2d)]
    assert [(c.in_channels, c.out_channels, c.kernel_size) for c in convs] == [(1, 5, (5, 5)), (5, 7, (5, 5))]
    assert linear_sizes(model) == [(112, 30), (30, 10)]
    assert any(isinstance(m, nn.Dropout) and m.p == 0.5 for m in model.modules())
    assert models.count_parameters(model) == 130 + 882 + 3390 + 310
    assert model(torch.rand(4, 1, 28, 28)).shape == (4, 10)


def test_small_cnn_on_8x8_digits_uses_same_padding():
    model = models.SmallCNN(image_size=8)
    assert model.padding == 2 and model.flat_features == 7 * 2 * 2
    assert model(torch.rand(2, 1, 8, 8)).shape == (2, 10)
    with pytest.raises(ValueError, match="image_size"):
        models.SmallCNN(image_size=2)


def test_mlp_classifier():
    model = models.MLPClassifier(64, 10, width=0.5)
    assert linear_sizes(model) == [(64, 256), (256, 128), (128, 10)]
    assert model(torch.rand(5, 1, 8, 8)).shape == (5, 10)
    with pytest.raises(ValueError, match="width"):
        models.MLPClassifier(64, width=0.0)
    with pytest.raises(ValueError, match="activation"):
        models.MLPClassifier(64, activation="gelu")


def test_vgg16_bn_construct_only():
    model = models.vgg16_bn()
    convs = [m for m in model.modules() if isinstance(m, nn.Conv2d)]
    assert len(convs) == 13 and sum(isinstance(m, nn.BatchNorm2d) for m in model.modules()) == 13
    assert [c.out_channels for c in convs] == [c for c in models.VGG16_CONFIG if c != "M"]
    assert linear_sizes(model.classifier) == [(512, 512), (512, 512), (512, 10)]
    wide = models.vgg16_bn(head_width=models.WIDE_HEAD_WIDTH)
    assert linear_sizes(wide.classifier) == [(512, 16384), (16384, 512), (512, 10)]
    with pytest.raises(ValueError, match="divisible by 32"):
        models.vgg16_bn(image_size=28)


def test_vgg16_bn_narrow_proxy_forward():
    model = models.vgg16_bn(width=1 / 16)
    assert model(torch.rand(2, 3, 32, 32)).shape == (2, 10)


def test_tiny_causal_lm_shapes_layout_and_parameter_count():
    torch.manual_seed(0)
    model = models.TinyCausalLM(11, d_model=8, n_layers=2, n_heads=2, context=6)
    layers = [m for m in model.modules() if isinstance(m, nn.TransformerEncoderLayer)]
    assert len(layers) == 2 and all(layer.norm_first and layer.self_attn.batch_first for layer in layers)
    x = torch.randint(0, 11, (3, 5))
    assert model(x).shape == (3, 5, 11)
    d, V, T = 8, 11, 6
    assert models.count_parameters(model) == V * d + T * d + 2 * (12 * d * d + 13 * d) + 2 * d + d * V + V


def test_tiny_causal_lm_is_causal_in_training_and_eval():
    torch.manual_seed(1)
    model = models.TinyCausalLM(7, d_model=8, n_layers=2, n_heads=2, context=8)
    x = torch.randint(0, 7, (2, 8))
    y = x.clone()
    y[:, 5:] = (y[:, 5:] + 1) % 7  # change the future only
    for mode in (model.train, model.eval):
        mode()
        with torch.no_grad():
            a, b = model(x), model(y)
        torch.testing.assert_close(a[:, :5], b[:, :5])
        assert not torch.allclose(a[:, 5:], b[:, 5:])


def test_tiny_causal_lm_tied_weights_and_bad_arguments():
    model = models.TinyCausalLM(9, d_model=8, n_heads=2, context=4, tie_weights=True)
    assert model.head.weight is model.tok.weight and model.head.bias is None
    with pytest.raises(ValueError, match="n_heads"):
        models.TinyCausalLM(9, d_model=8, n_heads=3)
    with pytest.raises(ValueError, match="vocab_size"):
        models.TinyCausalLM(0)
    with pytest.raises(ValueError, match="T <= 4"):
        model(torch.zeros(1, 5, dtype=torch.long))
