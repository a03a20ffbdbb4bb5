"""Helpers shared by the dataset loaders: option checks, seeded subsets, normalization.

Each check raises :class:`~normprobe.errors.DatasetError` with a message that
names the dataset and option, says what was expected and what was given, and
how to fix it, so a loader can validate its keyword arguments in one line each.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import torch

from normprobe.data.base import standardize
from normprobe.errors import DatasetError

__all__ = [
    "check_bool",
    "check_int",
    "check_optional_int",
    "check_seed",
    "check_fraction",
    "check_float",
    "check_root",
    "set_option",
    "seeded_generator",
    "random_subset",
    "normalize_splits",
    "check_normalize",
    "NORMALIZE_CHOICES",
    "jsonable",
]

#: ``standard``: per-channel mean/std of the train split (the default);
#: ``unit``: pixel values in [0, 1], not centred (non-negative inputs, as
#: balanced normalization assumes, Defazio & Bottou 2018, sec. 5.1).
NORMALIZE_CHOICES = ("standard", "unit")


def set_option(option: str, value: object = None, python: str | None = None) -> str:
    """How to set dataset option ``option``, for both readers of a message: the config field
    (a YAML user) and the loader keyword (a Python user), in one phrase.

    ``value``, when given, is the example value as YAML writes it; ``python``
    the same value as Python writes it (default: ``value``).

    >>> set_option("root")
    'set data.options.root in the config (root=... in Python)'
    >>> set_option("flatten", "false", "False")
    'set data.options.flatten: false in the config (flatten=False in Python)'
    """
    if value is None:
        return f"set data.options.{option} in the config ({option}=... in Python)"
    python = str(value) if python is None else python
    return f"set data.options.{option}: {value} in the config ({option}={python} in Python)"


def _describe(value: object) -> str:
    return f"{value!r} ({type(value).__name__})"


def _is_int(value: object) -> bool:
    return isinstance(value, (int, np.integer)) and not isinstance(value, (bool, np.bool_))


def check_bool(dataset: str, option: str, value: object) -> bool:
    """``value`` as a bool, or a DatasetError if it is not ``True``/``False``.

    >>> check_bool("digits", "flatten", True)
    True
    """
    if isinstance(value, (bool, np.bool_)):
        return bool(value)
    raise DatasetError(
        f"{dataset} option {option} must be True or False, got {_describe(value)}; "
        f"set data.options.{option} to true or false in the config "
        f"({option}=True or {option}=False in Python)"
    )


def check_int(dataset: str, option: str, value: object, *, minimum: int) -> int:
    """``value`` as an int no smaller than ``minimum``, else a DatasetError.

    >>> check_int("synthetic", "num_classes", 3, minimum=2)
    3
    """
    if not _is_int(value) or int(value) < minimum:  # type: ignore[call-overload]
        raise DatasetError(
            f"{dataset} option {option} must be an integer >= {minimum}, got {_describe(value)}; "
            f"e.g. {set_option(option, max(minimum, 1))}"
        )
    return int(value)  # type: ignore[call-overload]


def check_optional_int(dataset: str, option: str, value: object, *, minimum: int) -> int | None:
    """Like :func:`check_int` but ``None`` passes through (meaning "not set").

    >>> check_optional_int("mnist", "n_train", None, minimum=1) is None
    True
    """
    if value is None:
        return None
    if not _is_int(value) or int(value) < minimum:  # type: ignore[call-overload]
        raise DatasetError(
            f"{dataset} option {option} must be None or an integer >= {minimum}, "
            f"got {_describe(value)}; e.g. {set_option(option, max(minimum, 1))}, or leave it out"
        )
    return int(value)  # type: ignore[call-overload]


def check_seed(dataset: str, value: object) -> int:
    """A seed: a non-negative integer (a ``torch.Generator`` accepts no negative seeds).

    >>> check_seed("synthetic", 7)
    7
    """
    return check_int(dataset, "seed", value, minimum=0)


def check_float(dataset: str, option: str, value: object, *, minimum: float) -> float:
    """``value`` as a finite float no smaller than ``minimum``, else a DatasetError.

    >>> check_float("synthetic", "separation", 3, minimum=0.0)
    3.0
    """
    ok = isinstance(value, (int, float, np.integer, np.floating)) and not isinstance(
        value, (bool, np.bool_)
    )
    if not ok or not np.isfinite(float(value)) or float(value) < minimum:  # type: ignore[arg-type]
        raise DatasetError(
            f"{dataset} option {option} must be a finite number >= {minimum}, "
            f"got {_describe(value)}; e.g. {set_option(option, max(minimum, 1.0))}"
        )
    return float(value)  # type: ignore[arg-type]


def check_fraction(dataset: str, option: str, value: object) -> float:
    """A fraction strictly between 0 and 1, else a DatasetError.

    >>> check_fraction("digits", "test_fraction", 0.2)
    0.2
    """
    ok = isinstance(value, (int, float, np.integer, np.floating)) and not isinstance(
        value, (bool, np.bool_)
    )
    if not ok or not 0.0 < float(value) < 1.0:  # type: ignore[arg-type]
        raise DatasetError(
            f"{dataset} option {option} must be a number strictly between 0 and 1, "
            f"got {_describe(value)}; e.g. {set_option(option, 0.2)}"
        )
    return float(value)  # type: ignore[arg-type]


def check_root(dataset: str, root: object, *, expected: str, example: str) -> Path:
    """The user's ``root`` folder as an existing directory, else a DatasetError.

    ``expected`` says what the folder should hold and ``example`` is a folder
    that would do (``~/data/mnist``); both go into the message when ``root``
    is missing or wrong, which names the config field and the keyword.

    >>> check_root("mnist", "/no/such/folder", expected="the IDX files", example="~/data/mnist")
    Traceback (most recent call last):
    ...
    normprobe.errors.DatasetError: mnist root '/no/such/folder' does not exist; set data.options.root in the config (root=... in Python) to the folder holding the IDX files, e.g. root: ~/data/mnist
    """
    fix = f"{set_option('root')} to the folder holding {expected}, e.g. root: {example}"
    if root is None:
        raise DatasetError(f"{dataset} needs a root folder and downloads nothing; {fix}")
    if not isinstance(root, (str, Path)):
        raise DatasetError(
            f"{dataset} option root must be a path (str or pathlib.Path), "
            f"got {_describe(root)}; {fix}"
        )
    path = Path(root).expanduser()
    if not path.exists():
        raise DatasetError(f"{dataset} root {str(path)!r} does not exist; {fix}")
    if not path.is_dir():
        raise DatasetError(f"{dataset} root {str(path)!r} is a file, not a folder; {fix}")
    return path


def seeded_generator(seed: int, stream: int = 0) -> torch.Generator:
    """A CPU ``torch.Generator`` seeded from ``(seed, stream)``; never touches global RNG state.

    Different ``stream`` values give independent-looking generators for the same
    user seed (e.g. one for the train subset and one for the test subset), so
    choosing a train subset does not change which test subset is drawn.

    >>> a = torch.rand(2, generator=seeded_generator(0, 1))
    >>> bool((a == torch.rand(2, generator=seeded_generator(0, 1))).all())
    True
    """
    mixed = (int(seed) * 1_000_003 + int(stream)) % (2**63)
    return torch.Generator(device="cpu").manual_seed(mixed)


def random_subset(
    x: torch.Tensor,
    y: torch.Tensor,
    n: int | None,
    *,
    generator: torch.Generator,
    dataset: str,
    option: str,
) -> tuple[torch.Tensor, torch.Tensor]:
    """``n`` rows of ``(x, y)`` drawn without replacement (kept in file order); all if ``n`` is None.

    Raises a DatasetError when ``n`` exceeds the rows available.

    >>> x, y = torch.arange(10.0), torch.arange(10)
    >>> len(random_subset(x, y, 3, generator=seeded_generator(0), dataset="d", option="n")[1])
    3
    """
    total = int(x.shape[0])
    if n is None:
        return x, y
    if n > total:
        raise DatasetError(
            f"{dataset} option {option}={n} asks for more examples than the split has ({total}); "
            f"{set_option(option)} to at most {total}, or leave it out to use all of them"
        )
    index = torch.randperm(total, generator=generator)[:n].sort().values
    return x[index], y[index]


def check_normalize(dataset: str, value: object) -> str:
    """One of :data:`NORMALIZE_CHOICES`, else a DatasetError.

    >>> check_normalize("digits", "unit")
    'unit'
    """
    if value not in NORMALIZE_CHOICES:
        raise DatasetError(
            f"{dataset} option normalize must be one of {', '.join(map(repr, NORMALIZE_CHOICES))}, "
            f"got {_describe(value)}; 'standard' centres and scales each channel, 'unit' keeps "
            f"pixel values in [0, 1] (non-negative, for balanced normalization)"
        )
    return str(value)


def normalize_splits(
    train_x: torch.Tensor, test_x: torch.Tensor, *, flatten: bool, mode: str = "standard"
) -> tuple[torch.Tensor, torch.Tensor, dict[str, Any]]:
    """Standardize both splits with train statistics, then optionally flatten each example.

    ``mode="unit"`` skips the standardization and keeps the values as given
    (pixels already scaled to [0, 1] by the loader).

    Inputs of shape ``(N, C, ...)`` with ``C > 1`` get one mean/std per channel
    (dim 1); vectors ``(N, D)`` and single-channel inputs get one scalar
    mean/std over all features. Standardizing before flattening keeps
    per-channel statistics for e.g. flattened CIFAR-10. The returned stats dict
    says which was used (``"per": "channel"`` or ``"all"``).

    >>> a, b, stats = normalize_splits(torch.rand(8, 3, 2, 2), torch.rand(4, 3, 2, 2), flatten=True)
    >>> a.shape, stats["per"], len(stats["mean"])
    (torch.Size([8, 12]), 'channel', 3)
    """
    per_channel = train_x.dim() > 2 and train_x.shape[1] > 1
    if mode == "unit":
        if flatten:
            train_x = train_x.reshape(train_x.shape[0], -1)
            test_x = test_x.reshape(test_x.shape[0], -1)
        return train_x.contiguous(), test_x.contiguous(), {"per": "none", "mode": "unit"}
    train_x, test_x, stats = standardize(train_x, test_x, channel_dim=1 if per_channel else None)
    if flatten:
        train_x = train_x.reshape(train_x.shape[0], -1)
        test_x = test_x.reshape(test_x.shape[0], -1)
    return (
        train_x.contiguous(),
        test_x.contiguous(),
        {
            "per": "channel" if per_channel else "all",
            "mode": "standard",
            **stats,
            "computed_on": "train",
        },
    )


def jsonable(value: Any) -> Any:
    """``value`` with paths and tuples turned into str and lists, for ``Dataset.info``.

    >>> jsonable({"root": Path("/data"), "shape": (3, 8)})
    {'root': '/data', 'shape': [3, 8]}
    """
    if isinstance(value, Path):
        return str(value)
    if isinstance(value, dict):
        return {str(k): jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [jsonable(v) for v in value]
    if isinstance(value, np.generic):
        return value.item()
    return value
