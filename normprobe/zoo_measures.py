"""Measures of the normalizers themselves, and the properties table completed with them.

The properties table (:mod:`normprobe.properties`) is a reader of stored
results. One of its properties, "easy application to sequential models",
is a fact about a normalizer rather than about a trained run: whether a
per-token layer's earlier positions change when later positions change.
:func:`sequence_leak` measures it on a freshly built layer (deterministic,
milliseconds), so results folders of any age give the same table, and
:func:`measure_properties` hands the leaks and the zoo's normalizers to the
reader. The CLI's ``properties``, ``plot`` and ``figures`` commands use it.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import pandas as pd
import torch
from torch import nn

from normprobe import norms
from normprobe.errors import NormprobeError
from normprobe.probes.structure import relative_change
from normprobe.properties import PropertyTable, judge_properties
from normprobe.results import Results, load_results

__all__ = ["sequence_leak", "sequence_leaks", "measure_properties"]


def sequence_leak(normalizer: str, *, tokens: int = 8, width: int = 16, seed: int = 0) -> float:
    """How much a per-token layer's earlier positions change when later positions change.

    The zoo layer ``normalizer`` (a Linear op of ``width`` features, its
    normalizer, ReLU) runs in train mode on a ``(4 * tokens, width)`` batch of
    non-negative tokens, 4 sequences of ``tokens`` positions flattened as a sequence model
    flattens ``(N, T, D)``; positions after the middle are then redrawn.
    Returns ``||h_early - h'_early|| / ||h_early||`` (0 when nothing leaks
    backwards in time); ``inf`` when the normalizer cannot take per-token
    features (``instance``: conv only).

    >>> sequence_leak("layer"), sequence_leak("batch") > 0
    (0.0, True)
    """
    generator = torch.Generator().manual_seed(seed)
    # non-negative features, which every normalizer takes (balanced assumes them)
    x = torch.rand(4, tokens, width, generator=generator, dtype=torch.float64)
    later = x.clone()
    half = tokens // 2
    later[:, half:] = torch.rand(4, tokens - half, width, generator=generator, dtype=x.dtype)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        try:
            layer = norms.build(normalizer, nn.Linear(width, width), nn.ReLU()).double().train()
        except NormprobeError:
            return float("inf")
    with torch.no_grad():
        try:
            a = layer(x.reshape(-1, width)).reshape(4, tokens, width)
        except NormprobeError:
            return float("inf")
        b = layer(later.reshape(-1, width)).reshape(4, tokens, width)
    return relative_change(a[:, :half], b[:, :half])


def sequence_leaks(names: Sequence[str]) -> dict[str, float]:
    """:func:`sequence_leak` of each zoo normalizer in ``names`` (others cannot be built)."""
    zoo = norms.normalizers()
    return {n: sequence_leak(n) for n in names if n in zoo}


def measure_properties(
    results: Results | pd.DataFrame | str | Path,
    *,
    normalizers: Sequence[str] | None = None,
    properties: Sequence[str] | None = None,
) -> PropertyTable:
    """The properties table of ``results`` for every normalizer, sequence leaks measured.

    Rows: ``normalizers`` (default: every normalizer in the zoo, then any
    other normalizer found in the results), so a newly registered
    normalizer gets a row, "not measured" where the results do not cover
    it. ``properties``: criterion keys (default: all). See
    :func:`normprobe.properties.judge_properties`.
    """
    if not isinstance(results, (Results, pd.DataFrame)):
        results = load_results(results)
    if normalizers is None:
        # the normalizers found in the results (and the check that there are measurements)
        found = judge_properties(results, properties=["training"]).normalizers
        zoo = norms.normalizers()
        normalizers = [*zoo, *(n for n in found if n not in zoo)]
    leaks = None
    if properties is None or "sequential" in properties:
        leaks = sequence_leaks(normalizers)
    return judge_properties(
        results, normalizers=normalizers, properties=properties, sequence_leaks=leaks
    )
