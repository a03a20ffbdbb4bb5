"""The scikit-learn digits loader: shapes, standardization, determinism, resize/channels."""

from __future__ import annotations

import pytest
import torch

from normprobe.data import load_dataset
from normprobe.data.digits import stratified_split
from normprobe.errors import DatasetError


@pytest.fixture(scope="module")
def digits():
    return load_dataset("digits")


def test_default_shapes_and_dtypes(digits) -> None:
    assert digits.input_shape == (64,)
    assert digits.num_classes == 10
    assert len(digits.train) + len(digits.test) == 1797
    assert abs(len(digits.test) - 0.2 * 1797) <= 10
    for split in (digits.train, digits.test):
        assert split.x.dtype == torch.float32
        assert split.y.dtype == torch.int64
    assert set(digits.train.y.tolist()) == set(range(10))


def test_flat_train_split_is_standardized_with_one_scalar(digits) -> None:
    x = digits.train.x
    assert abs(float(x.mean())) < 1e-5
    assert abs(float(x.std()) - 1.0) < 1e-4
    stats = digits.info["normalization"]
    assert stats["per"] == "all" and len(stats["mean"]) == 1 and len(stats["std"]) == 1
    assert digits.info["source"] == "sklearn.datasets.load_digits"
    assert digits.info["options"]["test_fraction"] == 0.2


def test_split_is_stratified(digits) -> None:
    train_counts = torch.bincount(digits.train.y, minlength=10).float()
    test_counts = torch.bincount(digits.test.y, minlength=10).float()
    ratio = test_counts / (train_counts + test_counts)
    assert torch.all((ratio - 0.2).abs() < 0.01)


def test_deterministic_and_seed_dependent(digits) -> None:
    again = load_dataset("digits")
    assert torch.equal(digits.train.x, again.train.x)
    assert torch.equal(digits.test.y, again.test.y)
    other = load_dataset("digits", seed=1)
    assert not torch.equal(digits.test.y, other.test.y) or not torch.equal(
        digits.test.x, other.test.x
    )


def test_images_are_standardized_per_channel() -> None:
    ds = load_dataset("digits", flatten=False)
    assert ds.input_shape == (1, 8, 8)
    x = ds.train.x
    assert abs(float(x.mean())) < 1e-5 and abs(float(x.std()) - 1) < 1e-4


def test_resize_and_channels_imply_images() -> None:
    ds = load_dataset("digits", size=32, channels=3)
    assert ds.input_shape == (3, 32, 32)
    x = ds.train.x
    assert torch.equal(x[:, 0], x[:, 1]) and torch.equal(x[:, 0], x[:, 2])
    mean = x.mean(dim=(0, 2, 3))
    std = x.std(dim=(0, 2, 3))
    assert torch.allclose(mean, torch.zeros(3), atol=1e-5)
    assert torch.allclose(std, torch.ones(3), atol=1e-4)
    assert len(ds.info["normalization"]["mean"]) == 3
    assert load_dataset("digits", size=16).input_shape == (1, 16, 16)
    assert load_dataset("digits", channels=3).input_shape == (3, 8, 8)


def test_resize_is_bilinear_interpolation_of_the_same_images() -> None:
    small = load_dataset("digits", flatten=False)
    big = load_dataset("digits", size=16)
    # undo both standardizations and compare with interpolating the 8x8 images ourselves
    s_mean, s_std = small.info["normalization"]["mean"][0], small.info["normalization"]["std"][0]
    b_mean, b_std = big.info["normalization"]["mean"][0], big.info["normalization"]["std"][0]
    raw = small.train.x * s_std + s_mean
    expected = torch.nn.functional.interpolate(
        raw, size=(16, 16), mode="bilinear", align_corners=False
    )
    assert torch.allclose(big.train.x * b_std + b_mean, expected, atol=1e-5)
    assert torch.equal(small.train.y, big.train.y)


def test_flatten_true_flattens_the_resized_image() -> None:
    ds = load_dataset("digits", size=10, channels=2, flatten=True)
    assert ds.input_shape == (2 * 10 * 10,)
    assert ds.info["normalization"]["per"] == "channel"


@pytest.mark.parametrize(
    ("options", "needle"),
    [
        ({"size": 0}, "size must be None or an integer >= 1"),
        ({"channels": 0}, "channels must be an integer >= 1"),
        ({"test_fraction": 1.0}, "strictly between 0 and 1"),
        ({"seed": -1}, "seed must be an integer >= 0"),
        ({"size": 2.5}, "got 2.5"),
    ],
)
def test_bad_options(options, needle) -> None:
    with pytest.raises(DatasetError, match=needle):
        load_dataset("digits", **options)


def test_stratified_split_keeps_each_class_on_both_sides() -> None:
    y = torch.tensor([0, 0, 1, 1, 1, 2, 2, 2, 2, 2])
    train, test = stratified_split(y, 0.2, torch.Generator().manual_seed(0))
    assert sorted(torch.cat([train, test]).tolist()) == list(range(10))
    assert set(y[train].tolist()) == set(y[test].tolist()) == {0, 1, 2}


def test_unit_normalization_keeps_pixels_in_unit_range() -> None:
    ds = load_dataset("digits", normalize="unit")
    assert float(ds.train.x.min()) == 0.0 and float(ds.train.x.max()) == 1.0
    raw = load_dataset("digits")
    stats = raw.info["normalization"]
    # standard = unit pixels centred and scaled with one scalar mean/std
    restored = raw.train.x * stats["std"][0] + stats["mean"][0]
    torch.testing.assert_close(restored, ds.train.x, atol=1e-5, rtol=0)
    assert ds.info["normalization"]["mode"] == "unit"


def test_bad_normalize_option_names_the_choices() -> None:
    with pytest.raises(DatasetError, match="normalize must be one of 'standard', 'unit'"):
        load_dataset("digits", normalize="minmax")
