"""The CIFAR-10 pickle loader, on a tiny ``cifar-10-batches-py`` written to ``tmp_path``."""

from __future__ import annotations

import pickle
from pathlib import Path

import numpy as np
import pytest
import torch

from normprobe.data import load_dataset
from normprobe.errors import DatasetError

ROWS = 4  # per batch
TRAIN_FILES = [f"data_batch_{i}" for i in range(1, 6)]


def make_batches(seed: int = 0) -> dict[str, dict[bytes, object]]:
    rng = np.random.default_rng(seed)
    return {
        name: {
            b"batch_label": name.encode(),
            b"data": rng.integers(0, 256, size=(ROWS, 3072), dtype=np.uint8),
            b"labels": [int(v) for v in rng.integers(0, 10, size=ROWS)],
        }
        for name in [*TRAIN_FILES, "test_batch"]
    }


def write_cifar(parent: Path, batches, *, str_keys: bool = False) -> Path:
    folder = parent / "cifar-10-batches-py"
    folder.mkdir(parents=True)
    for name, batch in batches.items():
        if str_keys:
            batch = {k.decode(): v for k, v in batch.items()}
        with open(folder / name, "wb") as f:
            pickle.dump(batch, f, protocol=2)
    (folder / "batches.meta").write_bytes(pickle.dumps({b"label_names": [b"x"] * 10}))
    return folder


def raw_pixels(split, stats, flat: bool = False) -> torch.Tensor:
    """Undo the per-channel standardization and the /255 scaling."""
    mean = torch.tensor(stats["mean"])
    std = torch.tensor(stats["std"])
    x = split.x.reshape(len(split), 3, 32, 32) if flat else split.x
    return torch.round((x * std[:, None, None] + mean[:, None, None]) * 255)


@pytest.mark.parametrize("via", ["dir", "parent"])
def test_loads_and_chw_round_trips(tmp_path, via) -> None:
    batches = make_batches()
    folder = write_cifar(tmp_path, batches)
    ds = load_dataset("cifar10", root=folder if via == "dir" else tmp_path)
    assert ds.input_shape == (3, 32, 32)
    assert (len(ds.train), len(ds.test), ds.num_classes) == (5 * ROWS, ROWS, 10)
    assert ds.train.x.dtype == torch.float32 and ds.train.y.dtype == torch.int64
    stats = ds.info["normalization"]
    assert stats["per"] == "channel" and len(stats["mean"]) == 3
    assert ds.info["source"] == str(folder.resolve())

    train_rows = np.concatenate([batches[n][b"data"] for n in TRAIN_FILES])
    train_labels = sum((batches[n][b"labels"] for n in TRAIN_FILES), [])
    pixels = raw_pixels(ds.train, stats)
    # row-major CHW: x[i, c, h, w] == row[c * 1024 + h * 32 + w]
    expected = torch.from_numpy(train_rows.reshape(-1, 3, 32, 32)).float()
    assert torch.equal(pixels, expected)
    assert float(pixels[3, 2, 5, 7]) == float(train_rows[3, 2 * 1024 + 5 * 32 + 7])
    assert float(pixels[9, 1, 31, 0]) == float(train_rows[9, 1024 + 31 * 32])
    assert ds.train.y.tolist() == train_labels
    test_expected = torch.from_numpy(batches["test_batch"][b"data"].reshape(-1, 3, 32, 32)).float()
    assert torch.equal(raw_pixels(ds.test, stats), test_expected)
    assert ds.test.y.tolist() == batches["test_batch"][b"labels"]

    x = ds.train.x
    assert torch.allclose(x.mean(dim=(0, 2, 3)), torch.zeros(3), atol=1e-5)
    assert torch.allclose(x.std(dim=(0, 2, 3)), torch.ones(3), atol=1e-4)


def test_str_keys_flatten_and_subsets(tmp_path) -> None:
    batches = make_batches(1)
    write_cifar(tmp_path, batches, str_keys=True)
    ds = load_dataset("cifar10", root=tmp_path, flatten=True, n_train=6, n_test=2, seed=3)
    assert ds.input_shape == (3072,)
    assert (len(ds.train), len(ds.test)) == (6, 2)
    again = load_dataset("cifar10", root=tmp_path, flatten=True, n_train=6, n_test=2, seed=3)
    assert torch.equal(ds.train.x, again.train.x)
    rows = raw_pixels(ds.train, ds.info["normalization"], flat=True).reshape(6, -1)
    full = torch.from_numpy(np.concatenate([batches[n][b"data"] for n in TRAIN_FILES])).float()
    for row in rows:  # each subset row is one of the file's rows, CHW order kept when flattened
        assert bool((full == row).all(dim=1).any())


def test_root_required_and_missing_dir(tmp_path) -> None:
    with pytest.raises(DatasetError, match="root="):
        load_dataset("cifar10")
    with pytest.raises(DatasetError) as info:
        load_dataset("cifar10", root=tmp_path)
    message = str(info.value)
    assert "cifar-10-batches-py" in message and str(tmp_path) in message
    assert "data_batch_1" in message and "test_batch" in message


def test_missing_batch_is_named(tmp_path) -> None:
    folder = write_cifar(tmp_path, make_batches())
    (folder / "data_batch_4").unlink()
    with pytest.raises(DatasetError) as info:
        load_dataset("cifar10", root=tmp_path)
    message = str(info.value)
    assert "data_batch_4" in message and str(folder) in message
    assert (
        "data_batch_1," not in message.split("not found")[0]
    )  # only the missing one before "not found"


def test_garbage_file(tmp_path) -> None:
    folder = write_cifar(tmp_path, make_batches())
    (folder / "test_batch").write_bytes(b"this is not a pickle")
    with pytest.raises(DatasetError) as info:
        load_dataset("cifar10", root=folder)
    message = str(info.value)
    assert str(folder / "test_batch") in message and "could not unpickle" in message


@pytest.mark.parametrize(
    ("mutate", "needle"),
    [
        (lambda b: b.pop(b"data"), "expected keys b'data' and b'labels'"),
        (
            lambda b: b.__setitem__(b"data", b[b"data"][:, :100]),
            r"expected data of shape \(N, 3072\)",
        ),
        (lambda b: b.__setitem__(b"labels", b[b"labels"][:-1]), "holds 4 images but 3 labels"),
        (lambda b: b.__setitem__(b"labels", [0, 1, 2, 10]), "expected labels 0..9"),
        (lambda b: b.__setitem__(b"data", b[b"data"].astype(np.float32)), "expected uint8"),
    ],
)
def test_malformed_batch(tmp_path, mutate, needle) -> None:
    batches = make_batches()
    mutate(batches["data_batch_2"])
    folder = write_cifar(tmp_path, batches)
    with pytest.raises(DatasetError, match=needle) as info:
        load_dataset("cifar10", root=tmp_path)
    assert str(folder / "data_batch_2") in str(info.value)


def test_not_a_dict(tmp_path) -> None:
    folder = write_cifar(tmp_path, make_batches())
    (folder / "data_batch_1").write_bytes(pickle.dumps([1, 2, 3]))
    with pytest.raises(DatasetError, match="expected a pickled dict, found list"):
        load_dataset("cifar10", root=tmp_path)
