"""scikit-learn's 8x8 handwritten digits: a small real dataset that needs no download."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from normprobe.data._common import (
    check_bool,
    check_fraction,
    check_int,
    check_normalize,
    check_optional_int,
    check_seed,
    jsonable,
    normalize_splits,
    seeded_generator,
)
from normprobe.data.base import Dataset, Split

__all__ = ["load_digits", "stratified_split"]

_NAME = "digits"


def stratified_split(
    y: torch.Tensor, test_fraction: float, generator: torch.Generator
) -> tuple[torch.Tensor, torch.Tensor]:
    """Train and test row indices (each sorted) with every class split in the same proportion.

    Each class of ``n`` examples sends ``round(test_fraction * n)`` of them,
    clamped to ``[1, n - 1]`` when ``n >= 2``, to the test split, chosen with
    ``generator``, so the split depends only on the labels and the seed (not on
    the scikit-learn version).

    >>> tr, te = stratified_split(torch.tensor([0, 0, 0, 0, 1, 1, 1, 1, 1]), 0.25, torch.Generator().manual_seed(0))
    >>> len(tr), len(te)
    (7, 2)
    """
    test_parts: list[torch.Tensor] = []
    for label in torch.unique(y).tolist():
        members = torch.nonzero(y == label).flatten()
        n = int(members.numel())
        n_test = round(test_fraction * n)
        if n >= 2:
            n_test = min(max(n_test, 1), n - 1)
        chosen = torch.randperm(n, generator=generator)[:n_test]
        test_parts.append(members[chosen])
    is_test = torch.zeros(y.shape[0], dtype=torch.bool)
    if test_parts:
        is_test[torch.cat(test_parts)] = True
    return torch.nonzero(~is_test).flatten(), torch.nonzero(is_test).flatten()


def _images(pixels: torch.Tensor, size: int | None, channels: int) -> torch.Tensor:
    """``(N, 8, 8)`` pixels in [0, 1] as ``(N, channels, size, size)`` images (bilinear resize)."""
    images = pixels.unsqueeze(1)
    if size is not None and size != images.shape[-1]:
        images = F.interpolate(images, size=(size, size), mode="bilinear", align_corners=False)
    if channels != 1:
        images = images.repeat(1, channels, 1, 1)
    return images


def load_digits(
    *,
    flatten: bool | None = None,
    size: int | None = None,
    channels: int = 1,
    test_fraction: float = 0.2,
    normalize: str = "standard",
    seed: int = 0,
) -> Dataset:
    """scikit-learn's 1,797 8x8 handwritten digits (10 classes); shipped with sklearn, no download.

    The split is stratified by class and fixed by ``seed``; ``test_fraction``
    of each class goes to the test split. Pixels (0..16) are scaled to [0, 1]
    and then standardized with the train split's statistics (one scalar
    mean/std for single-channel data, one per channel otherwise).

    Options:
        flatten: vectors of ``channels * size * size`` features (``(64,)`` by
            default) instead of ``(channels, size, size)`` images. Defaults to
            True for the plain digits and to False when ``size`` or
            ``channels`` is given; pass ``flatten=True`` to flatten the
            resized/repeated image.
        size: resize the images to ``size x size`` (bilinear,
            ``align_corners=False``), e.g. 32 for a CIFAR-shaped network.
        channels: repeat the grey channel, e.g. 3 for an RGB network.
        test_fraction: share of each class held out for testing.
        normalize: "standard" (default) centres and scales with the train
            split's statistics; "unit" keeps pixel values in [0, 1], the
            non-negative inputs balanced normalization assumes (Defazio & Bottou 2018, sec. 5.1).
        seed: seed of the train/test split.

    >>> ds = load_digits()
    >>> ds.input_shape, ds.num_classes
    ((64,), 10)
    >>> load_digits(size=32, channels=3).input_shape
    (3, 32, 32)
    """
    from sklearn.datasets import load_digits as sklearn_load_digits

    size = check_optional_int(_NAME, "size", size, minimum=1)
    channels = check_int(_NAME, "channels", channels, minimum=1)
    test_fraction = check_fraction(_NAME, "test_fraction", test_fraction)
    seed = check_seed(_NAME, seed)
    normalize = check_normalize(_NAME, normalize)
    if flatten is None:
        flatten = size is None and channels == 1
    flatten = check_bool(_NAME, "flatten", flatten)

    bunch = sklearn_load_digits()
    pixels = torch.as_tensor(bunch.images, dtype=torch.float32) / 16.0  # (N, 8, 8)
    labels = torch.as_tensor(bunch.target, dtype=torch.int64)

    train_idx, test_idx = stratified_split(labels, test_fraction, seeded_generator(seed))
    if size is None and channels == 1 and flatten:
        train_x, test_x = pixels[train_idx].reshape(-1, 64), pixels[test_idx].reshape(-1, 64)
    else:
        images = _images(pixels, size, channels)
        train_x, test_x = images[train_idx], images[test_idx]
    train_x, test_x, stats = normalize_splits(train_x, test_x, flatten=flatten, mode=normalize)

    options = {
        "flatten": flatten,
        "size": size,
        "channels": channels,
        "test_fraction": test_fraction,
        "normalize": normalize,
        "seed": seed,
    }
    return Dataset(
        name=_NAME,
        train=Split(train_x, labels[train_idx]),
        test=Split(test_x, labels[test_idx]),
        num_classes=10,
        info=jsonable(
            {
                "source": "sklearn.datasets.load_digits",
                "options": options,
                "split": "stratified by class",
                "pixel_scale": "0..16 divided by 16 to [0, 1] before standardization",
                "resize": None if size is None else "bilinear, align_corners=False",
                "normalization": stats,
            }
        ),
    )
