"""CIFAR-10 from the standard python-pickle batches (``cifar-10-batches-py``); nothing is downloaded."""

from __future__ import annotations

import pickle
from pathlib import Path
from typing import Any

import numpy as np
import torch

from normprobe.data._common import (
    check_bool,
    check_normalize,
    check_optional_int,
    check_root,
    check_seed,
    jsonable,
    normalize_splits,
    random_subset,
    seeded_generator,
    set_option,
)
from normprobe.data.base import Dataset, Split
from normprobe.errors import DatasetError

__all__ = [
    "load_cifar10",
    "find_batches_dir",
    "read_batch",
    "CIFAR10_TRAIN_FILES",
    "CIFAR10_TEST_FILE",
]

_NAME = "cifar10"
_DIRNAME = "cifar-10-batches-py"
CIFAR10_TRAIN_FILES: tuple[str, ...] = tuple(f"data_batch_{i}" for i in range(1, 6))
CIFAR10_TEST_FILE = "test_batch"
_ALL_FILES = (*CIFAR10_TRAIN_FILES, CIFAR10_TEST_FILE)
_ROW = 3 * 32 * 32
_FORMAT = (
    "the CIFAR-10 python version (cifar-10-python.tar.gz from "
    "https://www.cs.toronto.edu/~kriz/cifar.html, extracted): pickled dicts with b'data', "
    f"a uint8 array of shape (N, {_ROW}) holding 3x32x32 images in row-major CHW order, "
    "and b'labels', N integers 0..9"
)
_EXAMPLE = "~/data/cifar-10-batches-py"


def find_batches_dir(root: Path) -> Path:
    """The folder holding the batch files: ``root`` itself or ``root/cifar-10-batches-py``.

    ``root`` counts as the batches folder when it is named ``cifar-10-batches-py``
    or holds any batch file; otherwise its ``cifar-10-batches-py`` subfolder is
    used when present. Raises a DatasetError naming every missing file.
    """
    child = root / _DIRNAME
    looks_like_batches = root.name == _DIRNAME or any((root / f).exists() for f in _ALL_FILES)
    if looks_like_batches:
        folder = root
    elif child.is_dir():
        folder = child
    else:
        raise DatasetError(
            f"cifar10: neither {str(root)!r} nor {str(child)!r} holds the CIFAR-10 batches "
            f"({', '.join(_ALL_FILES)}); expected {_FORMAT}; {set_option('root')} to the "
            f"{_DIRNAME} folder or its parent"
        )
    missing = [f for f in _ALL_FILES if not (folder / f).is_file()]
    if missing:
        raise DatasetError(
            f"cifar10: file(s) {', '.join(missing)} not found in {str(folder)!r}; expected all of "
            f"{', '.join(_ALL_FILES)} there, in {_FORMAT}"
        )
    return folder


def _get(batch: dict[Any, Any], key: str) -> Any:
    for candidate in (key.encode(), key):
        if candidate in batch:
            return batch[candidate]
    return None


def read_batch(path: Path) -> tuple[np.ndarray, np.ndarray]:
    """One batch file as ``(images (N, 3, 32, 32) uint8, labels (N,) int64)``, validated.

    Keys may be bytes (as pickled by the CIFAR authors under Python 2) or str.
    Unpickling runs code stored in the file, so only load batches you trust.
    """
    try:
        with open(path, "rb") as f:
            batch = pickle.load(f, encoding="bytes")
    except Exception as exc:  # pickle raises many types on garbage: UnpicklingError, EOFError, ...
        raise DatasetError(
            f"{path}: could not unpickle it ({type(exc).__name__}: {exc}); expected {_FORMAT}"
        ) from exc
    if not isinstance(batch, dict):
        raise DatasetError(
            f"{path}: expected a pickled dict, found {type(batch).__name__}; expected {_FORMAT}"
        )
    data, labels = _get(batch, "data"), _get(batch, "labels")
    if data is None or labels is None:
        keys = ", ".join(repr(k) for k in batch)
        raise DatasetError(
            f"{path}: expected keys b'data' and b'labels' (or 'data'/'labels'), found {keys or 'none'}"
        )
    data = np.asarray(data)
    if data.ndim != 2 or data.shape[1] != _ROW or data.shape[0] == 0:
        raise DatasetError(
            f"{path}: expected data of shape (N, {_ROW}) with N >= 1 (3x32x32 images, one per "
            f"row), found shape {data.shape}"
        )
    if data.dtype != np.uint8:
        if not np.issubdtype(data.dtype, np.integer) or data.min() < 0 or data.max() > 255:
            raise DatasetError(
                f"{path}: expected uint8 pixel data (0..255), found dtype {data.dtype}"
            )
        data = data.astype(np.uint8)
    try:
        labels = np.asarray(labels)
    except Exception as exc:  # ragged nonsense
        raise DatasetError(f"{path}: labels are not a list of integers ({exc})") from exc
    if labels.ndim != 1 or not np.issubdtype(labels.dtype, np.integer):
        raise DatasetError(
            f"{path}: expected labels as a flat list of integers, found shape {labels.shape} "
            f"of dtype {labels.dtype}"
        )
    if labels.shape[0] != data.shape[0]:
        raise DatasetError(
            f"{path}: holds {data.shape[0]} images but {labels.shape[0]} labels; expected one "
            f"label per image"
        )
    if labels.min() < 0 or labels.max() > 9:
        raise DatasetError(
            f"{path}: expected labels 0..9, found values from {labels.min()} to {labels.max()}"
        )
    return data.reshape(-1, 3, 32, 32), labels.astype(np.int64)


def load_cifar10(
    *,
    root: str | Path | None = None,
    flatten: bool = False,
    n_train: int | None = None,
    n_test: int | None = None,
    normalize: str = "standard",
    seed: int = 0,
) -> Dataset:
    """CIFAR-10 32x32 colour images (10 classes) from the python-pickle batches in a folder you name (option root).

    ``root`` (required) is the extracted ``cifar-10-batches-py`` folder or its
    parent; it must hold ``data_batch_1`` .. ``data_batch_5`` (train) and
    ``test_batch``. Nothing is downloaded. Pixels are scaled to [0, 1] and
    standardized per channel with the (subset) train split's statistics.

    Options:
        flatten: vectors of 3072 features (CHW order) instead of ``(3, 32, 32)`` images.
        n_train, n_test: take a random subset of this many examples (quick runs).
        normalize: "standard" (default) centres and scales with the train
            split's statistics; "unit" keeps pixel values in [0, 1], the
            non-negative inputs balanced normalization assumes (Defazio & Bottou 2018, sec. 5.1).
        seed: seed of those subsets.

    >>> ds = load_cifar10(root="~/data", n_train=5000)  # doctest: +SKIP
    >>> ds.input_shape  # doctest: +SKIP
    (3, 32, 32)
    """
    root_dir = check_root(
        _NAME,
        root,
        expected=f"the {_DIRNAME} batches ({', '.join(_ALL_FILES)})",
        example=_EXAMPLE,
    )
    flatten = check_bool(_NAME, "flatten", flatten)
    n_train = check_optional_int(_NAME, "n_train", n_train, minimum=1)
    n_test = check_optional_int(_NAME, "n_test", n_test, minimum=1)
    seed = check_seed(_NAME, seed)
    normalize = check_normalize(_NAME, normalize)

    folder = find_batches_dir(root_dir)
    train_parts = [read_batch(folder / name) for name in CIFAR10_TRAIN_FILES]
    test_images, test_labels = read_batch(folder / CIFAR10_TEST_FILE)

    def tensors(images: np.ndarray, labels: np.ndarray) -> tuple[torch.Tensor, torch.Tensor]:
        # uint8 until after subsetting, so a small subset never holds the full float copy
        return torch.from_numpy(images), torch.from_numpy(labels)

    train_x, train_y = random_subset(
        *tensors(
            np.concatenate([images for images, _ in train_parts]),
            np.concatenate([labels for _, labels in train_parts]),
        ),
        n_train,
        generator=seeded_generator(seed, 0),
        dataset=_NAME,
        option="n_train",
    )
    test_x, test_y = random_subset(
        *tensors(test_images, test_labels),
        n_test,
        generator=seeded_generator(seed, 1),
        dataset=_NAME,
        option="n_test",
    )
    train_x, test_x, stats = normalize_splits(
        train_x.float().div_(255.0), test_x.float().div_(255.0), flatten=flatten, mode=normalize
    )

    options = {
        "root": root_dir,
        "flatten": flatten,
        "n_train": n_train,
        "n_test": n_test,
        "normalize": normalize,
        "seed": seed,
    }
    return Dataset(
        name=_NAME,
        train=Split(train_x, train_y),
        test=Split(test_x, test_y),
        num_classes=10,
        info=jsonable(
            {
                "source": folder.resolve(),
                "files": [(folder / name).resolve() for name in _ALL_FILES],
                "options": options,
                "pixel_scale": "0..255 divided by 255 to [0, 1] before standardization",
                "normalization": stats,
            }
        ),
    )
