"""``text``: byte-level next-token windows of a user's file or folder, or of the stdlib sources."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from normprobe.data import dataset_options, load_dataset
from normprobe.data.text import STDLIB_MAX_BYTES, stdlib_root, token_windows
from normprobe.errors import DatasetError

TEXT = b"the quick brown fox jumps over the lazy dog\n" * 5  # 220 bytes


def _bytes(t: torch.Tensor) -> bytes:
    return bytes(t.flatten().tolist())


def test_a_file_is_split_by_position_into_byte_windows(tmp_path: Path) -> None:
    path = tmp_path / "corpus.txt"
    path.write_bytes(TEXT)
    ds = load_dataset("text", path=path, window=8)
    assert ds.name == "text" and ds.num_classes == 256 and ds.input_shape == (8,)
    for split in (ds.train, ds.test):
        assert split.x.dtype == split.y.dtype == torch.int64
        assert split.x.shape == split.y.shape
        assert torch.equal(split.x[:, 1:], split.y[:, :-1])  # y is x shifted by one
    train, test = TEXT[:198], TEXT[198:]  # the last 10% (22 bytes) for testing
    assert len(ds.train) == (198 - 9) // 8 + 1 and len(ds.test) == (22 - 9) // 8 + 1
    assert _bytes(ds.train.x[0]) == train[:8] and _bytes(ds.train.y[0]) == train[1:9]
    assert _bytes(ds.test.x[0]) == test[:8] and _bytes(ds.test.y[-1]) == test[9:17]
    assert ds.info["bytes"] == {"train": 198, "test": 22}


def test_stride_overlaps_windows_and_tokens_are_bytes(tmp_path: Path) -> None:
    path = tmp_path / "utf8.txt"
    path.write_text("café au lait, " * 20, encoding="utf-8")
    ds = load_dataset("text", path=str(path), window=6, stride=1, test_fraction=0.25)
    assert torch.equal(ds.train.x[1, :-1], ds.train.x[0, 1:])
    assert _bytes(ds.train.x[0, :5]) == "café".encode()  # é is two tokens
    assert int(ds.train.x.max()) == 0xC3 and int(ds.train.x.min()) >= 0  # é is C3 A9


def test_token_windows_count_and_short_streams() -> None:
    x, y = token_windows(torch.arange(10), window=4, stride=3)
    assert x.tolist() == [[0, 1, 2, 3], [3, 4, 5, 6]] and y[-1].tolist() == [4, 5, 6, 7]
    x, _ = token_windows(torch.arange(4), window=4, stride=1)
    assert x.shape == (0, 4)


def _folder(tmp_path: Path, n: int) -> list[bytes]:
    contents = [f"# file {i}\n{'x = 1' * (i + 3)}\n".encode() for i in range(n)]
    for i, data in enumerate(contents):
        (tmp_path / f"m{i:02d}.py").write_bytes(data)
    (tmp_path / "notes.txt").write_bytes(b"not python " * 10)  # pattern leaves it out
    return contents


def test_a_folder_is_split_by_file_every_kth_in_sorted_order(tmp_path: Path) -> None:
    contents = _folder(tmp_path, 12)
    ds = load_dataset("text", path=tmp_path, window=5)
    train = b"".join(c for i, c in enumerate(contents) if i != 9)
    test = contents[9]  # the 10th file in sorted order
    assert ds.info["bytes"] == {"train": len(train), "test": len(test)}
    assert _bytes(ds.test.x[0]) == test[:5] and _bytes(ds.train.x[0]) == train[:5]
    assert ds.info["files"] == {
        "train": 11,
        "test": 1,
        "first": "m00.py",
        "last": "m11.py",
        "not_read": 0,
    }
    few = load_dataset("text", path=tmp_path, window=5, test_every=3)
    assert few.info["files"]["test"] == 4  # m02, m05, m08, m11
    with pytest.raises(DatasetError, match=r"single file matching '\*\.txt' \(notes\.txt\)"):
        load_dataset("text", path=tmp_path, window=5, pattern="*.txt")


def test_max_bytes_reads_whole_files_in_sorted_order(tmp_path: Path) -> None:
    contents = _folder(tmp_path, 12)
    cap = sum(len(c) for c in contents[:4]) - 1  # reached inside the 4th file: it is kept whole
    ds = load_dataset("text", path=tmp_path, window=5, max_bytes=cap, test_every=2)
    assert ds.info["files"]["train"] == 2 and ds.info["files"]["not_read"] == 8
    assert ds.info["bytes"]["test"] == len(contents[1]) + len(contents[3])


def test_missing_short_and_empty_sources_are_explained(tmp_path: Path) -> None:
    with pytest.raises(
        DatasetError,
        match=r"text file '.*nope\.txt' does not exist; set data.options.path in the config \(path=\.\.\. in Python\)",
    ):
        load_dataset("text", path=tmp_path / "nope.txt")
    short = tmp_path / "short.txt"
    short.write_bytes(b"tiny text, not enough for a window")
    with pytest.raises(
        DatasetError, match=r"test split has 3 bytes, shorter than one window.*at most 2"
    ):
        load_dataset("text", path=short, window=64)
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(DatasetError, match=r"has no files matching '\*\.py'.*pattern="):
        load_dataset("text", path=empty)
    (empty / "one.py").write_bytes(TEXT)
    with pytest.raises(DatasetError, match=r"single file matching.*split it by position"):
        load_dataset("text", path=empty)
    with pytest.raises(DatasetError, match="window must be an integer >= 1"):
        load_dataset("text", path=short, window=0)
    with pytest.raises(DatasetError, match="path must be a path"):
        load_dataset("text", path=3)
    with pytest.raises(DatasetError, match="no option 'windw'; did you mean 'window'"):
        load_dataset("text", windw=8)


def test_the_default_reads_the_standard_library_deterministically() -> None:
    a = load_dataset("text", window=32)
    b = load_dataset("text", window=32)
    assert a.info["source"] == "Python standard library"
    assert a.info["stdlib"] == str(stdlib_root())
    assert a.info["sha256"] == b.info["sha256"]
    for sa, sb in ((a.train, b.train), (a.test, b.test)):
        assert torch.equal(sa.x, sb.x) and torch.equal(sa.y, sb.y)
    n_train, n_test = a.info["bytes"]["train"], a.info["bytes"]["test"]
    assert STDLIB_MAX_BYTES <= n_train + n_test < STDLIB_MAX_BYTES + 500_000
    assert len(a.train) == (n_train - 33) // 32 + 1 and len(a.test) > 100
    files = a.info["files"]
    assert files["test"] == (files["train"] + files["test"]) // 10
    assert b"def " in _bytes(a.test.x) and a.info["files"]["first"] == "__future__.py"


def test_options_are_listed_for_configs() -> None:
    from normprobe.config import parse_config

    assert dataset_options("text")["window"] == 64
    cfg = parse_config({"data": {"name": "text", "options": {"window": 32}}})
    assert cfg.data.name == "text"
