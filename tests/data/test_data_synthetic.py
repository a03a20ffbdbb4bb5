"""The synthetic Gaussian loader: determinism, shapes, class balance, separation."""

from __future__ import annotations

import math

import pytest
import torch

from normprobe.data import load_dataset
from normprobe.errors import DatasetError


def test_same_seed_gives_bit_identical_data() -> None:
    a = load_dataset("synthetic", shape=(3, 4, 4), n_train=64, n_test=16, seed=3)
    b = load_dataset("synthetic", shape=(3, 4, 4), n_train=64, n_test=16, seed=3)
    for sa, sb in ((a.train, b.train), (a.test, b.test)):
        assert torch.equal(sa.x, sb.x) and torch.equal(sa.y, sb.y)
    c = load_dataset("synthetic", shape=(3, 4, 4), n_train=64, n_test=16, seed=4)
    assert not torch.equal(a.train.x, c.train.x)


def test_does_not_touch_global_rng() -> None:
    torch.manual_seed(123)
    expected = torch.rand(3)
    torch.manual_seed(123)
    load_dataset("synthetic", n_train=32, n_test=8)
    assert torch.equal(torch.rand(3), expected)
    torch.manual_seed(999)  # global state differs, data does not
    a = load_dataset("synthetic", n_train=32, n_test=8)
    torch.manual_seed(0)
    b = load_dataset("synthetic", n_train=32, n_test=8)
    assert torch.equal(a.train.x, b.train.x)


def test_defaults() -> None:
    ds = load_dataset("synthetic")
    assert ds.input_shape == (64,)
    assert (len(ds.train), len(ds.test), ds.num_classes) == (1024, 256, 10)
    assert ds.train.x.dtype == torch.float32 and ds.train.y.dtype == torch.int64
    assert abs(float(ds.train.x.mean())) < 1e-5
    assert abs(float(ds.train.x.std()) - 1) < 1e-4
    assert ds.info["options"]["shape"] == [64]


@pytest.mark.parametrize("shape", [5, [5], (2, 3), [3, 4, 4]])
def test_shape_option_forms(shape) -> None:
    expected = (shape,) if isinstance(shape, int) else tuple(shape)
    ds = load_dataset("synthetic", shape=shape, n_train=30, n_test=7, num_classes=3)
    assert ds.input_shape == expected
    assert ds.test.x.shape == (7, *expected)


def test_images_standardized_per_channel() -> None:
    ds = load_dataset("synthetic", shape=(3, 4, 4), n_train=200, n_test=10)
    x = ds.train.x
    assert torch.allclose(x.mean(dim=(0, 2, 3)), torch.zeros(3), atol=1e-5)
    assert torch.allclose(x.std(dim=(0, 2, 3)), torch.ones(3), atol=1e-4)


def test_labels_are_balanced_and_shuffled() -> None:
    ds = load_dataset("synthetic", num_classes=7, n_train=100, n_test=20)
    counts = torch.bincount(ds.train.y, minlength=7)
    assert int(counts.max() - counts.min()) <= 1
    assert int(ds.train.y.max()) == 6
    assert not torch.equal(ds.train.y, torch.arange(100) % 7)


def test_separation_controls_class_mean_distance() -> None:
    d = 256
    ds = load_dataset(
        "synthetic", shape=d, num_classes=2, n_train=4000, n_test=2, separation=4.0, seed=1
    )
    # undo the (scalar) standardization to get back to noise-std units
    std = ds.info["normalization"]["std"][0]
    x = ds.train.x * std
    m0, m1 = x[ds.train.y == 0].mean(0), x[ds.train.y == 1].mean(0)
    # E|m0 - m1|^2 = separation^2, plus sampling noise of the empirical means ~ 2 d / 2000
    distance = math.sqrt(max(float(((m0 - m1) ** 2).sum()) - 2 * d / 2000, 0.0))
    assert 2.0 < distance < 6.0
    none = load_dataset("synthetic", shape=d, num_classes=2, n_train=4000, n_test=2, separation=0)
    n0 = none.train.x[none.train.y == 0].mean(0)
    n1 = none.train.x[none.train.y == 1].mean(0)
    assert float(((n0 - n1) ** 2).sum()) < 1.0


@pytest.mark.parametrize(
    ("options", "needle"),
    [
        ({"shape": (0, 3)}, "shape must be a positive int"),
        ({"shape": "64"}, "shape must be a positive int"),
        ({"shape": ()}, "shape must be a positive int"),
        ({"num_classes": 5, "n_train": 3}, "n_train must be an integer >= 5"),
        ({"n_test": 0}, "n_test must be an integer >= 1"),
        ({"separation": -1.0}, "separation must be a finite number >= 0"),
        ({"separation": float("nan")}, "separation must be a finite number"),
    ],
)
def test_bad_options(options, needle) -> None:
    with pytest.raises(DatasetError, match=needle):
        load_dataset("synthetic", **options)
