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


def _mnist_files(folder) -> None:
    import struct

    import numpy as np

    def idx(array: np.ndarray) -> bytes:
        return (
            bytes([0, 0, 8, array.ndim])
            + struct.pack(f">{array.ndim}I", *array.shape)
            + (array.astype(np.uint8).tobytes())
        )

    folder.mkdir(parents=True, exist_ok=True)
    for name, n in (("train", 4), ("t10k", 2)):
        (folder / f"{name}-images-idx3-ubyte").write_bytes(idx(np.zeros((n, 3, 3))))
        (folder / f"{name}-labels-idx1-ubyte").write_bytes(idx(np.arange(n)))


#: every message that tells the user to set a dataset option: (dataset, options, the option)
SET_OPTION_CASES = {
    "mnist without root": ("mnist", {}, "root"),
    "mnist root missing": ("mnist", {"root": "{tmp}/nope"}, "root"),
    "mnist root a file": ("mnist", {"root": "{tmp}/file.txt"}, "root"),
    "mnist root not a path": ("mnist", {"root": 3}, "root"),
    "mnist root without the files": ("mnist", {"root": "{tmp}"}, "root"),
    "mnist n_train above the split": ("mnist", {"root": "{tmp}/idx", "n_train": 5}, "n_train"),
    "cifar10 root missing": ("cifar10", {"root": "{tmp}/nope"}, "root"),
    "cifar10 root without the batches": ("cifar10", {"root": "{tmp}"}, "root"),
    "digits flatten": ("digits", {"flatten": 3}, "flatten"),
    "digits channels": ("digits", {"channels": 0}, "channels"),
    "digits size": ("digits", {"size": 0}, "size"),
    "digits test_fraction": ("digits", {"test_fraction": 2}, "test_fraction"),
    "synthetic separation": ("synthetic", {"separation": -1.0}, "separation"),
    "synthetic shape": ("synthetic", {"shape": "big"}, "shape"),
    "text path missing": ("text", {"path": "{tmp}/nope.txt"}, "path"),
    "text path not a path": ("text", {"path": 3}, "path"),
    "text folder without matches": ("text", {"path": "{tmp}/empty"}, "pattern"),
    "text folder of one file": ("text", {"path": "{tmp}/one"}, "path"),
}


@pytest.mark.parametrize("case", list(SET_OPTION_CASES))
def test_a_fix_names_the_config_field_and_the_python_keyword(case: str, tmp_path) -> None:
    """A YAML user reads data.options.<option>, a Python user <option>=, in the same line."""
    name, options, option = SET_OPTION_CASES[case]
    (tmp_path / "file.txt").write_text("not a folder\n")
    (tmp_path / "empty").mkdir()
    (tmp_path / "one").mkdir()
    (tmp_path / "one" / "a.py").write_text("x = 1\n" * 50)
    _mnist_files(tmp_path / "idx")
    options = {k: v.format(tmp=tmp_path) if isinstance(v, str) else v for k, v in options.items()}
    with pytest.raises(DatasetError) as info:
        load_dataset(name, **options)
    message = str(info.value)
    assert "\n" not in message
    assert f"set data.options.{option}" in message, message
    assert f"{option}=" in message and "in Python)" in message, message
    assert "pass " not in message, message
