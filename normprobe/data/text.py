"""Byte-level text windows for next-token prediction: a file you name, or Python's own sources.

The vocabulary is the 256 byte values: a token is one byte of the file as
stored (UTF-8 for Python sources), so every file has a vocabulary, no symbol
is unknown and models built for one text fit any other. ASCII characters are
one token each; other characters span several.

Each example is a window of ``window`` consecutive tokens ``x`` with the
next-token targets ``y`` (the same window shifted by one), both ``(T,)``
int64 with ``T = window``. Windows are cut from each split's token stream
every ``stride`` tokens (``stride = window`` by default: no token is an
input twice) and never cross from one split into the other.

Splits, fixed and without randomness:

- a file (``path=...``): by position, the last ``test_fraction`` (10%) of
  its bytes for testing;
- a folder (``path=...`` naming one, or the default, the standard library
  of the running Python, ``sysconfig.get_paths()["stdlib"]``): its files
  matching ``pattern`` (``*.py``, not searched recursively, so the
  standard library's ``site-packages`` and test packages stay out), sorted by
  name and taken in that order until ``max_bytes`` is reached; every
  ``test_every``-th of them (10th, 20th, ...) is a test file. Each split's
  files are joined in order into one stream.
"""

from __future__ import annotations

import hashlib
import sys
import sysconfig
from pathlib import Path

import torch

from normprobe.data._common import (
    check_fraction,
    check_int,
    check_optional_int,
    jsonable,
    set_option,
)
from normprobe.data.base import Dataset, Split
from normprobe.errors import DatasetError

__all__ = ["load_text", "token_windows", "stdlib_root", "VOCAB_SIZE", "STDLIB_MAX_BYTES"]

_NAME = "text"

#: tokens are bytes
VOCAB_SIZE = 256
#: the standard library default reads about this many bytes (a few files past it: none is cut)
STDLIB_MAX_BYTES = 2_000_000


def stdlib_root() -> Path:
    """The folder of the running Python's standard library sources."""
    return Path(sysconfig.get_paths()["stdlib"])


def token_windows(
    tokens: torch.Tensor, window: int, stride: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """``x`` and next-token ``y``, each ``(N, window)``, from a 1-D token stream.

    Window ``i`` starts at ``i * stride``; its targets are the tokens one
    place later, so a window needs ``window + 1`` tokens and a stream of ``L``
    gives ``(L - window - 1) // stride + 1`` windows (0 if ``L <= window``).

    >>> x, y = token_windows(torch.arange(7), window=3, stride=2)
    >>> x.tolist(), y.tolist()
    ([[0, 1, 2], [2, 3, 4]], [[1, 2, 3], [3, 4, 5]])
    """
    if tokens.numel() < window + 1:
        empty = torch.empty(0, window, dtype=torch.int64)
        return empty, empty.clone()
    chunks = tokens.to(torch.int64).unfold(0, window + 1, stride)  # (N, window + 1)
    return chunks[:, :-1].contiguous(), chunks[:, 1:].contiguous()


def _bytes_to_tokens(data: bytes) -> torch.Tensor:
    if not data:
        return torch.empty(0, dtype=torch.int64)
    return torch.frombuffer(bytearray(data), dtype=torch.uint8).to(torch.int64)


def _check_path(path: object) -> Path:
    if not isinstance(path, (str, Path)):
        raise DatasetError(
            f"text option path must be a path (str or pathlib.Path) to a text file or a folder "
            f"of them, got {path!r} ({type(path).__name__}); e.g. "
            f"{set_option('path', '~/data/corpus.txt', repr('~/data/corpus.txt'))}, or leave it "
            f"out for Python's standard library sources"
        )
    resolved = Path(path).expanduser()
    if not resolved.exists():
        raise DatasetError(
            f"text file {str(resolved)!r} does not exist; {set_option('path')} to a text file "
            f"(or a folder of them), e.g. path: ~/data/corpus.txt, or leave path out for "
            f"Python's standard library sources"
        )
    return resolved


def _folder_files(
    folder: Path, pattern: str, max_bytes: int | None
) -> tuple[list[Path], list[Path]]:
    """Every matching file in sorted order up to ``max_bytes``, and the ones left out."""
    files = sorted(p for p in folder.glob(pattern) if p.is_file())
    if not files:
        raise DatasetError(
            f"text folder {str(folder)!r} has no files matching {pattern!r} (searched only the "
            f"folder itself, not subfolders); e.g. "
            f"{set_option('pattern', repr('*.txt'), repr('*.txt'))}, or set data.options.path "
            f"(path=...) to a folder that holds such files, or to a single file"
        )
    if max_bytes is None:
        return files, []
    taken, total = [], 0
    for p in files:
        if total >= max_bytes:
            break
        taken.append(p)
        total += p.stat().st_size
    return taken, files[len(taken) :]


def _too_short(where: str, split: str, n_bytes: int, window: int, fix: str) -> DatasetError:
    return DatasetError(
        f"{where}: the {split} split has {n_bytes} bytes, shorter than one window of "
        f"{window} tokens plus its next-token target ({window + 1} bytes); {fix}"
    )


def load_text(
    *,
    path: str | Path | None = None,
    window: int = 64,
    stride: int | None = None,
    test_fraction: float = 0.1,
    test_every: int = 10,
    pattern: str = "*.py",
    max_bytes: int | None = None,
) -> Dataset:
    """Byte-level next-token windows of a text file or folder (default: Python's stdlib sources).

    ``x`` and ``y`` are ``(N, window)`` int64 tokens (bytes, vocabulary 256 =
    ``num_classes``); ``y`` is ``x`` shifted by one token. Nothing is
    downloaded and nothing is random: the same files give the same windows.

    Options:
        path: a text file (split by position: the last ``test_fraction`` for
            testing) or a folder (split by file, as for the default). None
            (default): the standard library of the running Python.
        window: tokens per example (the sequence length T).
        stride: tokens between the starts of consecutive windows; default
            ``window`` (non-overlapping).
        test_fraction: share of a single file's bytes, from its end, held out.
        test_every: in a folder, every ``test_every``-th file in sorted order
            is a test file.
        pattern: which files of a folder are read (``glob`` in the folder
            itself, not in subfolders).
        max_bytes: read files in sorted order until this many bytes (a file is
            never cut; of a single file, the first ``max_bytes`` bytes). None:
            2,000,000 for the standard library, everything for ``path``.

    >>> ds = load_text(window=32)
    >>> ds.input_shape, ds.num_classes, ds.train.x.dtype
    ((32,), 256, torch.int64)
    >>> bool((ds.train.x[:, 1:] == ds.train.y[:, :-1]).all())
    True
    """
    window = check_int(_NAME, "window", window, minimum=1)
    stride = check_optional_int(_NAME, "stride", stride, minimum=1)
    stride = window if stride is None else stride
    test_fraction = check_fraction(_NAME, "test_fraction", test_fraction)
    test_every = check_int(_NAME, "test_every", test_every, minimum=2)
    max_bytes = check_optional_int(_NAME, "max_bytes", max_bytes, minimum=1)
    if not isinstance(pattern, str) or not pattern:
        raise DatasetError(
            f"text option pattern must be a glob pattern such as '*.py' or '*.txt', got {pattern!r}"
        )

    if path is None:
        source, folder = "Python standard library", stdlib_root()
        if max_bytes is None:
            max_bytes = STDLIB_MAX_BYTES
    else:
        resolved = _check_path(path)
        source, folder = str(resolved), resolved if resolved.is_dir() else None

    options = {
        "path": None if path is None else str(path),
        "window": window,
        "stride": stride,
        "test_fraction": test_fraction,
        "test_every": test_every,
        "pattern": pattern,
        "max_bytes": max_bytes,
    }
    info: dict[str, object] = {
        "source": source,
        "task": "next-token prediction: y is x shifted by one token",
        "vocabulary": "bytes 0..255 of the files as stored (UTF-8 for Python sources)",
        "options": options,
    }

    if folder is None:  # one file: split by position
        data = resolved.read_bytes()
        if max_bytes is not None:
            data = data[:max_bytes]
        cut = len(data) - round(test_fraction * len(data))
        train_bytes, test_bytes = data[:cut], data[cut:]
        where = f"text file {source!r} ({len(data)} bytes)"
        fix = (
            f"use a longer file, a smaller window (at most {len(test_bytes) - 1} here), or a "
            f"larger test_fraction"
        )
        info["split"] = f"by position: the last {test_fraction:g} of the bytes for testing"
    else:
        files, left_out = _folder_files(folder, pattern, max_bytes)
        if len(files) < 2:
            raise DatasetError(
                f"text folder {str(folder)!r} gives a single file matching {pattern!r} "
                f"({files[0].name}), but a folder is split by file; {set_option('path')} to "
                f"that file to split it by position, or add files"
            )
        test_idx = [i for i in range(len(files)) if i % test_every == test_every - 1]
        if not test_idx:
            test_idx = [len(files) - 1]  # fewer files than test_every: the last one tests
        test_files = [files[i] for i in test_idx]
        train_files = [p for i, p in enumerate(files) if i not in test_idx]
        train_bytes = b"".join(p.read_bytes() for p in train_files)
        test_bytes = b"".join(p.read_bytes() for p in test_files)
        where = f"text folder {source!r} ({len(files)} files matching {pattern!r})"
        fix = "use larger or more files, a smaller window, or a larger max_bytes"
        info["split"] = (
            f"by file: files sorted by name, every {test_every}th ({len(test_files)}) for testing"
        )
        info["files"] = {
            "train": len(train_files),
            "test": len(test_files),
            "first": files[0].name,
            "last": files[-1].name,
            "not_read": len(left_out),
        }
        if path is None:
            info["python"] = sys.version.split()[0]
            info["stdlib"] = str(folder)

    for split, data in (("test", test_bytes), ("train", train_bytes)):  # test: the shorter
        if len(data) < window + 1:
            raise _too_short(where, split, len(data), window, fix)

    train_x, train_y = token_windows(_bytes_to_tokens(train_bytes), window, stride)
    test_x, test_y = token_windows(_bytes_to_tokens(test_bytes), window, stride)
    info["bytes"] = {"train": len(train_bytes), "test": len(test_bytes)}
    info["sha256"] = hashlib.sha256(train_bytes + b"\0" + test_bytes).hexdigest()
    return Dataset(
        name=_NAME,
        train=Split(train_x, train_y),
        test=Split(test_x, test_y),
        num_classes=VOCAB_SIZE,
        info=jsonable(info),
    )
