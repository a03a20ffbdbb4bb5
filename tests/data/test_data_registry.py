"""The dataset registry and ``load_dataset``'s handling of names and options."""

from __future__ import annotations

import pytest

from normprobe.data import DATASETS, Dataset, Split, dataset_options, describe, load_dataset
from normprobe.errors import DatasetError, NormprobeError, UnknownNameError


def test_registration_order() -> None:
    assert DATASETS.names() == ["digits", "synthetic", "mnist", "cifar10", "text"]


def test_describe_gives_one_line_per_loader() -> None:
    lines = describe()
    assert list(lines) == DATASETS.names()
    for name, line in lines.items():
        assert line and "\n" not in line, name
    assert "8x8" in lines["digits"]


def test_dataset_options_lists_defaults() -> None:
    assert dataset_options("synthetic") == {
        "shape": (64,),
        "num_classes": 10,
        "n_train": 1024,
        "n_test": 256,
        "separation": 3.0,
        "seed": 0,
    }
    assert "root" in dataset_options("MNIST")


def test_unknown_name_suggests_close_match() -> None:
    with pytest.raises(UnknownNameError) as info:
        load_dataset("digts")
    message = str(info.value)
    assert "did you mean 'digits'" in message
    assert "cifar10" in message  # lists what is registered


def test_name_is_case_insensitive_and_alias_works(tmp_path) -> None:
    ds = load_dataset("Synthetic", n_train=20, n_test=5)
    assert isinstance(ds, Dataset) and ds.name == "synthetic"
    with pytest.raises(DatasetError, match="cifar10"):  # alias resolves; then root is missing
        load_dataset("cifar-10", root=tmp_path)


def test_unknown_option_lists_valid_ones() -> None:
    with pytest.raises(DatasetError) as info:
        load_dataset("digits", flaten=False)
    message = str(info.value)
    assert "'flaten'" in message
    assert "did you mean 'flatten'" in message
    for option in ("flatten", "size", "channels", "test_fraction", "seed"):
        assert option in message
    assert isinstance(info.value, NormprobeError)


def test_several_unknown_options_are_all_named() -> None:
    with pytest.raises(DatasetError) as info:
        load_dataset("synthetic", bogus=1, other=2)
    assert "'bogus'" in str(info.value) and "'other'" in str(info.value)


def test_bad_option_value_is_dataset_error() -> None:
    with pytest.raises(DatasetError, match="num_classes must be an integer >= 2, got 1"):
        load_dataset("synthetic", num_classes=1)
    with pytest.raises(DatasetError, match="flatten must be True or False"):
        load_dataset("digits", flatten="yes")


def test_split_unpacks() -> None:
    ds = load_dataset("synthetic", n_train=20, n_test=5)
    x, y = ds.train
    assert isinstance(ds.train, Split) and x.shape[0] == y.shape[0] == 20
