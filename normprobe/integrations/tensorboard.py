"""The scalar measures of a :class:`~normprobe.Monitor` as TensorBoard scalars.

``Monitor(..., tensorboard="runs/tb/batch")`` (a log folder) or
``tensorboard=SummaryWriter(...)`` (any object with ``add_scalar(tag,
value, step)``) writes, at each measurement, every scalar row of the
metrics table: a run-level value under its metric's name (``trace``,
``outlier_ratio``, ``grad_growth_rate``, ``test_acc``), a per-layer value
under ``<metric>/<layer>`` (``grad_corr/fc.3``), an eigenvalue under
``eigenvalue/<index>``; the values given to ``Monitor.log`` under their
names as they are logged. The Hessian's SLQ nodes, densities and single
trace samples are left to the result tables. A log folder needs the
``tensorboard`` package (``torch.utils.tensorboard`` writes the files); a
writer you pass is used as it is (and left open).

>>> class Printed:  # anything with add_scalar
...     def add_scalar(self, tag, value, step):
...         print(tag, round(value, 2), step)
>>> import pandas as pd
>>> rows = pd.DataFrame({"step": [5, 5], "layer": ["fc1", None], "depth": [1, float("nan")],
...                      "metric": ["grad_corr", "grad_growth_rate"], "value": [0.5, 1.25]})
>>> ScalarWriter(Printed()).write([rows])
grad_corr/fc1 0.5 5
grad_growth_rate 1.25 5
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

import pandas as pd

__all__ = ["ScalarWriter", "SKIPPED", "scalar_tags"]

#: metrics written to the result tables only (many values per step, not a curve each)
SKIPPED = frozenset({"trace_sample", "slq_node", "density"})


def _name(value: Any) -> str | None:
    """A label from a table cell, or None for a missing one (None, NaN, pandas' NA)."""
    if value is None or (isinstance(value, float) and math.isnan(value)) or value is pd.NA:
        return None
    if isinstance(value, float) and value.is_integer():
        value = int(value)
    return str(value)


def scalar_tags(frame: pd.DataFrame) -> Iterable[tuple[str, float, int]]:
    """``(tag, value, step)`` of each scalar row of a metrics frame (module docstring)."""
    if frame is None or not len(frame) or not {"step", "metric", "value"} <= set(frame.columns):
        return
    columns = ["step", "metric", "value"]
    extras = [c for c in ("layer", "index") if c in frame.columns]
    for row in frame[columns + extras].itertuples(index=False, name=None):
        step, metric, value = row[0], row[1], row[2]
        if metric in SKIPPED or value is None or value is pd.NA:
            continue
        parts = [str(metric)] + [p for p in map(_name, row[3:]) if p is not None]
        yield "/".join(parts), float(value), int(step)


class ScalarWriter:
    """Writes a monitor's scalar rows to TensorBoard (module docstring).

    ``target``: a log folder (a ``torch.utils.tensorboard.SummaryWriter`` is
    made on it, and closed by :meth:`close`), or a writer with ``add_scalar``.
    """

    def __init__(self, target: str | Path | Any) -> None:
        if isinstance(target, (str, Path)):
            try:
                from torch.utils.tensorboard import SummaryWriter
            except ImportError as err:
                raise ImportError(
                    f"Monitor(tensorboard={str(target)!r}): writing TensorBoard logs needs the "
                    f"tensorboard package (pip install tensorboard), or pass a writer with "
                    f"add_scalar ({err})"
                ) from None
            self.writer: Any = SummaryWriter(log_dir=str(target))
            self.owned = True
        elif callable(getattr(target, "add_scalar", None)):
            self.writer, self.owned = target, False
        else:
            raise TypeError(
                f"Monitor(tensorboard=...): expected a log folder or a writer with "
                f"add_scalar(tag, value, step), got {type(target).__name__}"
            )

    def write(self, frames: Iterable[pd.DataFrame]) -> None:
        """The scalar rows of one measurement's metrics frames."""
        for frame in frames:
            for tag, value, step in scalar_tags(frame):
                self.writer.add_scalar(tag, value, step)
        flush = getattr(self.writer, "flush", None)
        if callable(flush):
            flush()

    def log(self, step: int, values: Mapping[str, float]) -> None:
        """Values the loop logs (``batch_loss``), under their names."""
        for name, value in values.items():
            self.writer.add_scalar(name, float(value), int(step))

    def close(self) -> None:
        """Close a writer made here (a writer passed in is left open, flushed)."""
        if self.owned:
            self.writer.close()
        else:
            flush = getattr(self.writer, "flush", None)
            if callable(flush):
                flush()
