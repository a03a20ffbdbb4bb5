"""The MNIST IDX loader, on tiny IDX files written to ``tmp_path`` (nothing downloaded)."""

from __future__ import annotations

import gzip
import struct
from pathlib import Path

import numpy as np
import pytest
import torch

from normprobe.data import load_dataset
from normprobe.data.mnist import parse_idx
from normprobe.errors import DatasetError

N_TRAIN, N_TEST, H, W = 20, 10, 6, 5
FILES = {
    "train_images": "train-images-idx3-ubyte",
    "train_labels": "train-labels-idx1-ubyte",
    "test_images": "t10k-images-idx3-ubyte",
    "test_labels": "t10k-labels-idx1-ubyte",
}


def idx_bytes(array: np.ndarray) -> bytes:
    """IDX encoding of a uint8 array: 0, 0, 0x08, ndim, big-endian dims, data."""
    header = bytes([0, 0, 0x08, array.ndim]) + struct.pack(f">{array.ndim}I", *array.shape)
    return header + array.astype(np.uint8).tobytes()


def make_arrays(seed: int = 0) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    return {
        "train_images": rng.integers(0, 256, size=(N_TRAIN, H, W), dtype=np.uint8),
        "train_labels": (np.arange(N_TRAIN) % 10).astype(np.uint8),
        "test_images": rng.integers(0, 256, size=(N_TEST, H, W), dtype=np.uint8),
        "test_labels": (np.arange(N_TEST) * 3 % 10).astype(np.uint8),
    }


def write_mnist(folder: Path, arrays: dict[str, np.ndarray], *, gz: bool) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    for key, name in FILES.items():
        data = idx_bytes(arrays[key])
        if gz:
            (folder / f"{name}.gz").write_bytes(gzip.compress(data))
        else:
            (folder / name).write_bytes(data)


def raw_pixels(split, stats) -> torch.Tensor:
    """Undo the standardization and the /255 scaling."""
    return torch.round((split.x * stats["std"][0] + stats["mean"][0]) * 255)


@pytest.mark.parametrize("gz", [False, True])
@pytest.mark.parametrize("subdir", ["", "MNIST/raw", "raw"])
def test_loads_and_round_trips(tmp_path, gz, subdir) -> None:
    arrays = make_arrays()
    write_mnist(tmp_path / subdir if subdir else tmp_path, arrays, gz=gz)
    ds = load_dataset("mnist", root=tmp_path, flatten=False)
    assert ds.input_shape == (1, H, W)
    assert (len(ds.train), len(ds.test), ds.num_classes) == (N_TRAIN, N_TEST, 10)
    assert ds.train.x.dtype == torch.float32 and ds.train.y.dtype == torch.int64
    stats = ds.info["normalization"]
    assert torch.equal(
        raw_pixels(ds.train, stats), torch.from_numpy(arrays["train_images"]).float().unsqueeze(1)
    )
    assert torch.equal(
        raw_pixels(ds.test, stats), torch.from_numpy(arrays["test_images"]).float().unsqueeze(1)
    )
    assert ds.train.y.tolist() == arrays["train_labels"].tolist()
    assert ds.test.y.tolist() == arrays["test_labels"].tolist()
    assert abs(float(ds.train.x.mean())) < 1e-5 and abs(float(ds.train.x.std()) - 1) < 1e-4
    assert ds.info["files"]["train-images-idx3-ubyte"].endswith(
        FILES["train_images"] + (".gz" if gz else "")
    )


def test_flatten_default_and_string_root(tmp_path) -> None:
    arrays = make_arrays()
    write_mnist(tmp_path, arrays, gz=False)
    ds = load_dataset("mnist", root=str(tmp_path))
    assert ds.input_shape == (H * W,)
    flat = raw_pixels(ds.train, ds.info["normalization"])
    assert torch.equal(flat, torch.from_numpy(arrays["train_images"].reshape(N_TRAIN, -1)).float())


def test_subsets_are_seeded_and_consistent(tmp_path) -> None:
    arrays = make_arrays()
    write_mnist(tmp_path, arrays, gz=True)
    a = load_dataset("mnist", root=tmp_path, n_train=7, n_test=4, seed=5)
    b = load_dataset("mnist", root=tmp_path, n_train=7, n_test=4, seed=5)
    assert (len(a.train), len(a.test)) == (7, 4)
    assert torch.equal(a.train.x, b.train.x) and torch.equal(a.test.y, b.test.y)
    # every subset row is a real (image, label) pair from the files
    pixels = raw_pixels(a.train, a.info["normalization"]).reshape(7, -1)
    full = torch.from_numpy(arrays["train_images"].reshape(N_TRAIN, -1)).float()
    for row, label in zip(pixels, a.train.y):
        match = (full == row).all(dim=1).nonzero().flatten()
        assert len(match) == 1 and int(arrays["train_labels"][int(match)]) == int(label)
    # the test subset does not depend on whether a train subset was drawn
    c = load_dataset("mnist", root=tmp_path, n_test=4, seed=5)
    assert torch.equal(c.test.y, a.test.y)
    with pytest.raises(
        DatasetError, match=r"n_train=21 asks for more examples than the split has \(20\)"
    ):
        load_dataset("mnist", root=tmp_path, n_train=21)


def test_root_is_required() -> None:
    with pytest.raises(DatasetError) as info:
        load_dataset("mnist")
    message = str(info.value)
    assert "root=" in message and "train-images-idx3-ubyte" in message


def test_nonexistent_root(tmp_path) -> None:
    with pytest.raises(DatasetError, match="does not exist"):
        load_dataset("mnist", root=tmp_path / "nope")


def test_missing_file_names_file_directories_and_format(tmp_path) -> None:
    write_mnist(tmp_path, make_arrays(), gz=False)
    (tmp_path / FILES["test_labels"]).unlink()
    with pytest.raises(DatasetError) as info:
        load_dataset("mnist", root=tmp_path)
    message = str(info.value)
    assert "t10k-labels-idx1-ubyte" in message
    assert (
        "train-images-idx3-ubyte (plain" not in message
    )  # only the missing one is reported missing
    assert str(tmp_path) in message
    assert str(tmp_path / "MNIST" / "raw") in message and str(tmp_path / "raw") in message
    assert "IDX" in message and ".gz" in message and "yann.lecun.com" in message


def test_empty_root_lists_all_files(tmp_path) -> None:
    with pytest.raises(DatasetError) as info:
        load_dataset("mnist", root=tmp_path)
    for name in FILES.values():
        assert name in str(info.value)


def test_bad_magic(tmp_path) -> None:
    write_mnist(tmp_path, make_arrays(), gz=False)
    path = tmp_path / FILES["train_images"]
    data = bytearray(path.read_bytes())
    data[0] = 0x1F
    path.write_bytes(bytes(data))
    with pytest.raises(DatasetError) as info:
        load_dataset("mnist", root=tmp_path)
    message = str(info.value)
    assert str(path) in message and "magic" in message


def test_wrong_type_code(tmp_path) -> None:
    write_mnist(tmp_path, make_arrays(), gz=False)
    path = tmp_path / FILES["train_labels"]
    data = bytearray(path.read_bytes())
    data[2] = 0x0D
    path.write_bytes(bytes(data))
    with pytest.raises(DatasetError, match="type code 0x0d"):
        load_dataset("mnist", root=tmp_path)


def test_truncated(tmp_path) -> None:
    write_mnist(tmp_path, make_arrays(), gz=True)
    path = tmp_path / (FILES["test_images"] + ".gz")
    data = gzip.decompress(path.read_bytes())
    path.write_bytes(gzip.compress(data[:-7]))
    with pytest.raises(DatasetError) as info:
        load_dataset("mnist", root=tmp_path)
    message = str(info.value)
    assert str(path) in message and "truncated" in message
    assert f"{N_TEST * H * W} data bytes" in message and f"found {N_TEST * H * W - 7}" in message


def test_truncated_gzip_stream(tmp_path) -> None:
    write_mnist(tmp_path, make_arrays(), gz=True)
    path = tmp_path / (FILES["train_images"] + ".gz")
    path.write_bytes(path.read_bytes()[:30])
    with pytest.raises(DatasetError, match="could not read it as a gzip-compressed IDX file"):
        load_dataset("mnist", root=tmp_path)


def test_swapped_files_give_wrong_dims(tmp_path) -> None:
    arrays = make_arrays()
    arrays["train_images"], arrays["train_labels"] = arrays["train_labels"], arrays["train_images"]
    write_mnist(tmp_path, arrays, gz=False)
    with pytest.raises(DatasetError, match="expected an IDX file with 3 dimension"):
        load_dataset("mnist", root=tmp_path)


def test_label_count_mismatch(tmp_path) -> None:
    arrays = make_arrays()
    arrays["train_labels"] = arrays["train_labels"][:-1]
    write_mnist(tmp_path, arrays, gz=False)
    with pytest.raises(DatasetError) as info:
        load_dataset("mnist", root=tmp_path)
    message = str(info.value)
    assert "train-labels-idx1-ubyte" in message and f"{N_TRAIN - 1} labels" in message
    assert f"{N_TRAIN} images" in message


def test_parse_idx_trailing_bytes() -> None:
    data = idx_bytes(np.arange(4, dtype=np.uint8)) + b"\x00"
    with pytest.raises(DatasetError, match="trailing bytes"):
        parse_idx(data, expected_ndim=1, source="f")
    with pytest.raises(DatasetError, match="only 2 bytes"):
        parse_idx(b"\x00\x00", expected_ndim=1, source="f")
