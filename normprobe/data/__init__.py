"""Datasets: a registry of loaders, each returning a standardized :class:`Dataset`.

>>> from normprobe.data import load_dataset
>>> ds = load_dataset("synthetic", shape=(3, 8, 8), num_classes=4, n_train=64, n_test=16)
>>> ds.input_shape
(3, 8, 8)

Loaders: ``digits`` (scikit-learn, no download), ``synthetic`` (no files),
``mnist`` and ``cifar10`` (from files under a ``root`` the user names), and
``text`` (byte-level next-token windows of a file the user names, or of
Python's standard library sources, no download).
"""

from __future__ import annotations

import difflib
import inspect
from collections.abc import Callable
from typing import Any

from normprobe.data.base import Dataset, Split, standardize
from normprobe.data.cifar10 import load_cifar10
from normprobe.data.digits import load_digits
from normprobe.data.mnist import load_mnist
from normprobe.data.synthetic import load_synthetic
from normprobe.data.text import load_text
from normprobe.errors import DatasetError
from normprobe.registry import Registry

__all__ = [
    "DATASETS",
    "Dataset",
    "Split",
    "standardize",
    "load_dataset",
    "describe",
    "dataset_options",
]

DATASETS = Registry[Callable[..., Dataset]]("dataset")
DATASETS.register("digits", load_digits)
DATASETS.register("synthetic", load_synthetic)
DATASETS.register("mnist", load_mnist)
DATASETS.register("cifar10", load_cifar10, aliases=("cifar-10",))
DATASETS.register("text", load_text)


def _options(loader: Callable[..., Dataset]) -> dict[str, inspect.Parameter]:
    return {
        p.name: p
        for p in inspect.signature(loader).parameters.values()
        if p.kind in (inspect.Parameter.KEYWORD_ONLY, inspect.Parameter.POSITIONAL_OR_KEYWORD)
    }


def dataset_options(name: str) -> dict[str, Any]:
    """Option name -> default value of dataset ``name``'s loader, in signature order.

    Lets a CLI or config validator show what a dataset accepts.

    >>> dataset_options("synthetic")["num_classes"]
    10
    """
    return {key: p.default for key, p in _options(DATASETS.get(name)).items()}


def load_dataset(name: str, **options: Any) -> Dataset:
    """Load the registered dataset ``name`` with the loader's keyword ``options``.

    Unknown names raise :class:`~normprobe.errors.UnknownNameError` with a
    did-you-mean hint; unknown options raise :class:`DatasetError` listing the
    valid ones (taken from the loader's signature), so a typo in a config file
    fails before any data is read.

    >>> load_dataset("digits").input_shape
    (64,)
    >>> load_dataset("digits", flaten=False)
    Traceback (most recent call last):
    ...
    normprobe.errors.DatasetError: dataset 'digits' has no option 'flaten'; did you mean 'flatten'? valid options: flatten, size, channels, test_fraction, normalize, seed
    """
    canonical = DATASETS.canonical(name)
    loader = DATASETS.get(canonical)
    params = inspect.signature(loader).parameters.values()
    if not any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params):
        valid = list(_options(loader))
        unknown = [key for key in options if key not in valid]
        if unknown:
            raise DatasetError(_unknown_options_message(canonical, unknown, valid))
    return loader(**options)


def _unknown_options_message(name: str, unknown: list[str], valid: list[str]) -> str:
    hints = []
    for key in unknown:
        close = difflib.get_close_matches(key, valid, n=1, cutoff=0.6)
        if close:
            hints.append(f"did you mean {close[0]!r}?")
    plural = "options" if len(unknown) > 1 else "option"
    listed = ", ".join(repr(k) for k in unknown)
    hint = f" {' '.join(hints)}" if hints else ""
    return (
        f"dataset {name!r} has no {plural} {listed};{hint} "
        f"valid options: {', '.join(valid) or '(none)'}"
    )


def describe() -> dict[str, str]:
    """Registered dataset name -> one-line description (its loader's first docstring line).

    In registration order, for a CLI's ``list datasets``.

    >>> list(describe())
    ['digits', 'synthetic', 'mnist', 'cifar10', 'text']
    """
    return {name: _first_line(loader) for name, loader in DATASETS.items()}


def _first_line(loader: Callable[..., Dataset]) -> str:
    doc = inspect.getdoc(loader) or ""
    return doc.strip().splitlines()[0].strip() if doc.strip() else ""
