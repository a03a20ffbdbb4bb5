"""MNIST from the standard IDX files in a folder the user names (nothing is downloaded)."""

from __future__ import annotations

import gzip
import math
import struct
import zlib
from pathlib import Path

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

__all__ = ["load_mnist", "parse_idx", "read_idx", "find_mnist_file", "MNIST_FILES"]

_NAME = "mnist"

#: split -> (images file, labels file), as distributed.
MNIST_FILES: dict[str, tuple[str, str]] = {
    "train": ("train-images-idx3-ubyte", "train-labels-idx1-ubyte"),
    "test": ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte"),
}
_FORMAT = (
    "the standard MNIST IDX files, plain or .gz, as distributed at "
    "http://yann.lecun.com/exdb/mnist/"
)
_ALL_FILES = ", ".join(f for pair in MNIST_FILES.values() for f in pair)
_EXAMPLE = "~/data/mnist"
_UBYTE = 0x08


def parse_idx(data: bytes, *, expected_ndim: int, source: str) -> np.ndarray:
    """The uint8 array stored in IDX bytes ``data``; a DatasetError naming ``source`` if malformed.

    IDX layout: two zero bytes, a type code (only ``0x08``, unsigned byte, is
    accepted), the number of dimensions, one big-endian int32 per dimension,
    then the values in row-major order. The data must fill the declared shape
    exactly (a short file is truncated; extra bytes mean a wrong header).

    >>> parse_idx(bytes([0, 0, 8, 1, 0, 0, 0, 2, 7, 9]), expected_ndim=1, source="x").tolist()
    [7, 9]
    """
    if len(data) < 4:
        raise DatasetError(
            f"{source}: expected an IDX file starting with a 4-byte magic number, "
            f"found only {len(data)} bytes; the file is empty or truncated, replace it with {_FORMAT}"
        )
    zero1, zero2, type_code, ndim = data[0], data[1], data[2], data[3]
    if zero1 != 0 or zero2 != 0:
        raise DatasetError(
            f"{source}: bad IDX magic number {data[:4].hex()} (expected 0000 then type and "
            f"dimension bytes, e.g. 00000803 for images); this is not an uncompressed IDX file "
            f"(a .gz file needs the .gz suffix), replace it with {_FORMAT}"
        )
    if type_code != _UBYTE:
        raise DatasetError(
            f"{source}: IDX type code 0x{type_code:02x} is not supported "
            f"(expected 0x08, unsigned byte, as in {_FORMAT})"
        )
    if ndim != expected_ndim:
        raise DatasetError(
            f"{source}: expected an IDX file with {expected_ndim} dimension(s), found {ndim}; "
            f"is this the right file (images have 3 dimensions, labels 1)?"
        )
    header = 4 + 4 * ndim
    if len(data) < header:
        raise DatasetError(
            f"{source}: IDX header declares {ndim} dimension(s) ({header} header bytes) "
            f"but the file has only {len(data)} bytes; the file is truncated"
        )
    dims = struct.unpack(f">{ndim}I", data[4:header])
    expected = math.prod(dims)
    found = len(data) - header
    if found != expected:
        problem = "is truncated" if found < expected else "has trailing bytes"
        raise DatasetError(
            f"{source}: IDX header declares shape {tuple(dims)}, i.e. {expected} data bytes, "
            f"but found {found}; the file {problem}, replace it with {_FORMAT}"
        )
    return np.frombuffer(data, dtype=np.uint8, offset=header).reshape(dims)


def read_idx(path: Path, *, expected_ndim: int) -> np.ndarray:
    """Read and parse one IDX file, gunzipping it when its name ends in ``.gz``."""
    try:
        if path.suffix == ".gz":
            with gzip.open(path, "rb") as f:
                data = f.read()
        else:
            data = path.read_bytes()
    except (OSError, EOFError, zlib.error) as exc:
        kind = "gzip-compressed " if path.suffix == ".gz" else ""
        raise DatasetError(
            f"{path}: could not read it as a {kind}IDX file ({exc}); replace it with {_FORMAT}"
        ) from exc
    return parse_idx(data, expected_ndim=expected_ndim, source=str(path))


def search_dirs(root: Path) -> list[Path]:
    """Folders searched for the IDX files: ``root``, then torchvision's ``root/MNIST/raw`` and ``root/raw``."""
    return [root, root / "MNIST" / "raw", root / "raw"]


def find_mnist_file(root: Path, filename: str) -> Path | None:
    """The first existing ``filename`` or ``filename.gz`` in :func:`search_dirs`, else None."""
    for folder in search_dirs(root):
        for candidate in (folder / filename, folder / f"{filename}.gz"):
            if candidate.is_file():
                return candidate
    return None


def _locate_files(root: Path) -> dict[str, Path]:
    found = {name: find_mnist_file(root, name) for pair in MNIST_FILES.values() for name in pair}
    missing = [name for name, path in found.items() if path is None]
    if missing:
        searched = ", ".join(repr(str(d)) for d in search_dirs(root))
        raise DatasetError(
            f"mnist: file(s) {', '.join(missing)} (plain or .gz) not found; searched {searched}. "
            f"Expected {_FORMAT}: {_ALL_FILES}; {set_option('root')} to the folder that holds them"
        )
    return {name: path for name, path in found.items() if path is not None}


def _load_split(files: dict[str, Path], split: str) -> tuple[np.ndarray, np.ndarray]:
    images_name, labels_name = MNIST_FILES[split]
    images = read_idx(files[images_name], expected_ndim=3)
    labels = read_idx(files[labels_name], expected_ndim=1)
    if images.shape[0] == 0:
        raise DatasetError(f"{files[images_name]}: the IDX file holds no images (count 0)")
    if labels.shape[0] != images.shape[0]:
        raise DatasetError(
            f"{files[labels_name]}: holds {labels.shape[0]} labels but "
            f"{files[images_name]} holds {images.shape[0]} images; expected one label per image "
            f"(are the files from the same split and complete?)"
        )
    if labels.size and int(labels.max()) > 9:
        raise DatasetError(
            f"{files[labels_name]}: expected digit labels 0..9, found {int(labels.max())}"
        )
    return images, labels


def load_mnist(
    *,
    root: str | Path | None = None,
    flatten: bool = True,
    n_train: int | None = None,
    n_test: int | None = None,
    normalize: str = "standard",
    seed: int = 0,
) -> Dataset:
    """MNIST 28x28 handwritten digits (10 classes) from the standard IDX files in a folder you name (option root).

    ``root`` (required) is the folder with ``train-images-idx3-ubyte``,
    ``train-labels-idx1-ubyte``, ``t10k-images-idx3-ubyte`` and
    ``t10k-labels-idx1-ubyte``, each plain or ``.gz``; torchvision's layout
    (``root/MNIST/raw`` or ``root/raw``) is found too. Nothing is downloaded.
    The image size is read from the file headers (28x28 for real MNIST).
    Pixels are scaled to [0, 1] and standardized with one scalar mean/std of
    the (subset) train split.

    Options:
        flatten: vectors of H*W (784) features; ``False`` gives ``(1, H, W)`` images.
        n_train, n_test: take a random subset of this many examples (quick runs).
        normalize: "standard" (default) centres and scales with the train
            split's statistics; "unit" keeps pixel values in [0, 1], the
            non-negative inputs balanced normalization assumes (Defazio & Bottou 2018, sec. 5.1).
        seed: seed of those subsets.

    >>> ds = load_mnist(root="~/data/mnist", n_train=1000)  # doctest: +SKIP
    >>> ds.input_shape  # doctest: +SKIP
    (784,)
    """
    root_dir = check_root(
        _NAME,
        root,
        expected=f"{_ALL_FILES} ({_FORMAT})",
        example=_EXAMPLE,
    )
    flatten = check_bool(_NAME, "flatten", flatten)
    n_train = check_optional_int(_NAME, "n_train", n_train, minimum=1)
    n_test = check_optional_int(_NAME, "n_test", n_test, minimum=1)
    seed = check_seed(_NAME, seed)
    normalize = check_normalize(_NAME, normalize)

    files = _locate_files(root_dir)
    train_images, train_labels = _load_split(files, "train")
    test_images, test_labels = _load_split(files, "test")
    if train_images.shape[1:] != test_images.shape[1:]:
        raise DatasetError(
            f"mnist: train images are {train_images.shape[1:]} but test images are "
            f"{test_images.shape[1:]} ({files[MNIST_FILES['test'][0]]}); expected the same size"
        )

    def tensors(images: np.ndarray, labels: np.ndarray) -> tuple[torch.Tensor, torch.Tensor]:
        # uint8 until after subsetting, so a small subset never holds the full float copy
        return torch.tensor(images).unsqueeze(1), torch.from_numpy(labels.astype(np.int64))

    train_x, train_y = random_subset(
        *tensors(train_images, train_labels),
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
                "source": root_dir.resolve(),
                "files": {name: path.resolve() for name, path in files.items()},
                "options": options,
                "pixel_scale": "0..255 divided by 255 to [0, 1] before standardization",
                "normalization": stats,
            }
        ),
    )
