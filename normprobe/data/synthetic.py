"""Seeded class-conditional Gaussian data of any input shape: a dataset with no files."""

from __future__ import annotations

import math

import numpy as np
import torch

from normprobe.data._common import (
    check_float,
    check_int,
    check_seed,
    jsonable,
    normalize_splits,
    seeded_generator,
    set_option,
)
from normprobe.data.base import Dataset, Split
from normprobe.errors import DatasetError

__all__ = ["load_synthetic", "parse_shape", "balanced_labels"]

_NAME = "synthetic"


def parse_shape(shape: object) -> tuple[int, ...]:
    """The example shape as a tuple of positive ints; an int ``d`` means ``(d,)``.

    Lists are accepted too (they come from YAML/JSON configs).

    >>> parse_shape(64), parse_shape([3, 8, 8])
    ((64,), (3, 8, 8))
    """
    dims = [shape] if isinstance(shape, (int, np.integer)) else shape
    ok = (
        isinstance(dims, (list, tuple))
        and len(dims) > 0
        and all(
            isinstance(d, (int, np.integer)) and not isinstance(d, (bool, np.bool_)) and d >= 1
            for d in dims
        )
    )
    if not ok:
        raise DatasetError(
            f"{_NAME} option shape must be a positive int or a non-empty tuple/list of positive "
            f"ints (the shape of one example), got {shape!r} ({type(shape).__name__}); "
            f"e.g. {set_option('shape', '64 or [3, 32, 32]', '64 or shape=(3, 32, 32)')}"
        )
    return tuple(int(d) for d in dims)


def balanced_labels(n: int, num_classes: int, generator: torch.Generator) -> torch.Tensor:
    """``n`` int64 labels dealt round-robin over the classes, then shuffled with ``generator``.

    Class counts differ by at most one.

    >>> torch.bincount(balanced_labels(10, 3, torch.Generator().manual_seed(0))).tolist()
    [4, 3, 3]
    """
    labels = torch.arange(n, dtype=torch.int64) % num_classes
    return labels[torch.randperm(n, generator=generator)]


def load_synthetic(
    *,
    shape: tuple[int, ...] | list[int] | int = (64,),
    num_classes: int = 10,
    n_train: int = 1024,
    n_test: int = 256,
    separation: float = 3.0,
    seed: int = 0,
) -> Dataset:
    """Seeded class-conditional Gaussians of any shape and class count (no files needed).

    Each class has a mean whose coordinates are drawn from
    ``N(0, separation**2 / (2 * d))`` with ``d = prod(shape)``, so two class
    means are ``separation`` apart on average, in units of the unit noise std
    added to every example. Labels are balanced. Everything comes from one
    ``torch.Generator`` seeded with ``seed`` (global RNG state is neither read
    nor changed), so the same options give bit-identical data. Both splits are
    then standardized with the train statistics (one scalar mean/std for
    vector shapes, one per channel ``shape[0]`` otherwise).

    >>> ds = load_synthetic(shape=(3, 8, 8), num_classes=4, n_train=64, n_test=16)
    >>> ds.input_shape, ds.num_classes, len(ds.train)
    ((3, 8, 8), 4, 64)
    """
    dims = parse_shape(shape)
    num_classes = check_int(_NAME, "num_classes", num_classes, minimum=2)
    n_train = check_int(_NAME, "n_train", n_train, minimum=num_classes)
    n_test = check_int(_NAME, "n_test", n_test, minimum=1)
    separation = check_float(_NAME, "separation", separation, minimum=0.0)
    seed = check_seed(_NAME, seed)

    d = math.prod(dims)
    g = seeded_generator(seed)
    means = torch.randn(num_classes, d, generator=g, dtype=torch.float32)
    means *= separation / math.sqrt(2.0 * d)

    def draw(n: int) -> tuple[torch.Tensor, torch.Tensor]:
        y = balanced_labels(n, num_classes, g)
        x = means[y] + torch.randn(n, d, generator=g, dtype=torch.float32)
        return x.reshape(n, *dims), y

    train_x, train_y = draw(n_train)
    test_x, test_y = draw(n_test)
    train_x, test_x, stats = normalize_splits(train_x, test_x, flatten=False)

    options = {
        "shape": dims,
        "num_classes": num_classes,
        "n_train": n_train,
        "n_test": n_test,
        "separation": separation,
        "seed": seed,
    }
    return Dataset(
        name=_NAME,
        train=Split(train_x, train_y),
        test=Split(test_x, test_y),
        num_classes=num_classes,
        info=jsonable(
            {
                "source": "synthetic class-conditional Gaussians (normprobe.data.synthetic)",
                "options": options,
                "normalization": stats,
            }
        ),
    )
