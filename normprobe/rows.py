"""A run's table rows kept as columns while it trains, made one frame when it ends.

A measurement step gives a few dozen rows (one per layer and metric, plus
the step's scalar metrics). Building a pandas frame for each step and kind of
row cost more than computing the rows (about 1 ms a frame), so the training
loop keeps them as :class:`Rows` (a step and its columns) and
:func:`frame_of` builds one frame per run from all of them: the same rows,
columns and dtypes as concatenating a frame per block (``pd.concat(...,
ignore_index=True, sort=False)``), which is what it replaced.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import pandas as pd

__all__ = ["Columns", "Rows", "frame_of", "frames_of", "joined"]

#: column name -> one value per row (every column of a block has the same length)
Columns = Mapping[str, list[Any]]


@dataclass(frozen=True)
class Rows:
    """Rows of one step as columns, without their ``step`` column (:func:`joined` adds it)."""

    step: int
    columns: Columns

    def __len__(self) -> int:
        return len(next(iter(self.columns.values()), ()))


def joined(blocks: Sequence[Rows]) -> pd.DataFrame:
    """One frame of several blocks' rows, ``step`` first: the rows and dtypes of ``pd.concat`` of a
    frame per block (a column a block lacks is NaN there; a column that a block gives as all None
    is an object column, as a frame of that block would make it).

    >>> a = Rows(0, {"metric": ["loss"], "value": [0.5]})
    >>> b = Rows(0, {"metric": ["corr"], "value": [1.0], "layer": ["fc1"]})
    >>> frame = joined([a, b])
    >>> frame.equals(pd.concat([joined([a]), joined([b])], ignore_index=True, sort=False))
    True
    """
    sizes = [len(block) for block in blocks]
    steps = [np.full(n, block.step, dtype=np.int64) for block, n in zip(blocks, sizes)]
    if len(blocks) == 1:
        return pd.DataFrame({"step": steps[0], **blocks[0].columns})
    data: dict[str, Any] = {"step": np.concatenate(steps) if steps else np.empty(0, np.int64)}
    for name in dict.fromkeys(key for block in blocks for key in block.columns):
        values: list[Any] = []
        objects = False
        for block, n in zip(blocks, sizes):
            column = block.columns.get(name)
            if column is None:
                values.extend([np.nan] * n)
            else:
                values.extend(column)
                objects = objects or (n > 0 and all(v is None for v in column))
        data[name] = pd.Series(values, dtype=object) if objects else values
    return pd.DataFrame(data)


def frame_of(items: Sequence[pd.DataFrame | Rows]) -> pd.DataFrame:
    """The frames and row blocks of ``items``, in order, as one frame with a fresh index.

    Consecutive :class:`Rows` become one frame (:func:`joined`); the result is
    what concatenating a frame per item gives.

    >>> a, b = Rows(0, {"value": [1.0]}), Rows(5, {"value": [2.0]})
    >>> frame_of([a, pd.DataFrame({"step": [9], "value": [3.0]}), b]).to_dict("list")
    {'step': [0, 9, 5], 'value': [1.0, 3.0, 2.0]}
    """
    return pd.concat(frames_of(items), ignore_index=True, sort=False)


def frames_of(items: Sequence[pd.DataFrame | Rows]) -> list[pd.DataFrame]:
    """``items`` as frames, in order: each run of consecutive :class:`Rows` one frame
    (:func:`joined`), each frame as it is."""
    frames: list[pd.DataFrame] = []
    run: list[Rows] = []
    for item in items:
        if isinstance(item, Rows):
            run.append(item)
            continue
        if run:
            frames.append(joined(run))
            run = []
        frames.append(item)
    if run:
        frames.append(joined(run))
    return frames
