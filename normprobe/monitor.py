"""Record the probes and the Hessian inside your own training loop: :class:`Monitor`.

A :class:`Monitor` holds fixed probe batches and, at the steps its schedule
names, runs the measures an analysis would (the same table of measures,
:mod:`normprobe.measures`, with the same options and defaults), leaving the
model, its ``.grad``, the optimizer and the global random state as found.
Its records are the tables of an analysis: ``monitor.results`` is a
:class:`~normprobe.results.Results`, and with ``out=`` it keeps a run folder
in the layout of ``normprobe analyze``: each measurement adds one small part
file (written under a temporary name and renamed, so a crash loses at most
the measurement in progress) and :meth:`Monitor.close` writes the run's
tables once. ``normprobe plot``, ``normprobe properties`` and
:func:`~normprobe.results.load_results` read it, closed or not (an unclosed
run is read from its parts and named in ``Results.unclosed``). Several monitored runs (one per
normalizer, say) written to one folder plot together.

>>> import torch, torch.nn.functional as F
>>> from torch import nn
>>> torch.manual_seed(0)  # doctest: +ELLIPSIS
<torch._C.Generator object at ...>
>>> model = nn.Sequential(nn.Linear(4, 8), nn.LayerNorm(8), nn.ReLU(), nn.Linear(8, 3))
>>> x, y = torch.randn(32, 4), torch.randint(0, 3, (32,))
>>> monitor = Monitor(model, F.cross_entropy, (x, y), schedule=2, hessian=False,
...                   normalizer="layer")
>>> opt = torch.optim.SGD(model.parameters(), lr=0.1)
>>> for step in range(5):
...     monitor.step(step, batch_loss=F.cross_entropy(model(x), y).item())
...     opt.zero_grad(); F.cross_entropy(model(x), y).backward(); opt.step()
>>> sorted(monitor.results.metrics["step"].unique().tolist())
[0, 1, 2, 3, 4]
>>> sorted(monitor.results.metrics.query("metric == 'grad_corr'")["step"].unique().tolist())
[0, 2, 4]
"""

from __future__ import annotations

import math
import operator
import time
from collections.abc import Callable, Iterable, Mapping
from pathlib import Path
from typing import Any

import pandas as pd
import torch
from torch import nn

from normprobe.batch import (
    batch_size,
    call_model,
    input_tensors,
    model_device,
    prediction,
    split_batch,
    take,
    to_device,
)
from normprobe.config import ConfigError, HessianConfig, ProbesConfig, parse_config
from normprobe.integrations.tensorboard import ScalarWriter
from normprobe.measures import MEASURES, TABLES, MeasureInputs, enabled_measures, measure_step
from normprobe.probes.capture import ProbeError, to_model
from normprobe.probes.signal import noisy_inputs
from normprobe.results import (
    Results,
    RunRecord,
    assemble,
    finish_run,
    logged_rows,
    records_results,
    start_run,
    write_json_atomic,
    write_part,
)
from normprobe.schema import PROBES, Schedule
from normprobe.state import preserved
from normprobe.training import classes_last, evaluate, metric_rows

__all__ = ["Monitor", "MonitorError", "measured_names", "logged_name"]

Batch = tuple[Any, torch.Tensor]
ScheduleLike = int | Iterable[int] | Schedule | Mapping[str, Any]


class MonitorError(ConfigError):
    """A :class:`Monitor` given something it cannot use; the message names the argument."""


def measured_names() -> set[str]:
    """The metric names the measures write (a logged value may not take one)."""
    return {name for m in MEASURES.values() for name in m.writes}


def _updates(step: Any, what: str) -> int:
    """``step`` as the number of updates so far (an int >= 0; numpy and torch integers too),
    or a :class:`MonitorError` naming ``what`` was given it."""
    try:
        count = -1 if isinstance(step, bool) else operator.index(step)
    except TypeError:
        count = -1
    if count < 0:
        raise MonitorError(
            f"{what}: step must be the number of updates so far (an int >= 0), got {step!r}"
        )
    return count


def logged_name(name: str, prefix: str = "trainer_") -> str:
    """``name``, or ``prefix + name`` where a measure writes ``name`` (a trainer's own
    ``grad_norm``, a total, is not the gradient-norm probe's per-layer ``grad_norm``).

    >>> logged_name("loss"), logged_name("grad_norm")
    ('loss', 'trainer_grad_norm')
    """
    return prefix + name if name in measured_names() else name


def _schedule(value: ScheduleLike, what: str) -> Schedule:
    """A schedule from ``50`` (every 50 steps), a list of steps, a mapping or a Schedule."""
    if isinstance(value, Schedule):
        return value
    if isinstance(value, bool):
        raise MonitorError(f"{what}: expected a number of steps, a list of steps or a mapping")
    if isinstance(value, int):
        if value < 1:
            raise MonitorError(f"{what}: every {value} steps is not a schedule; give every >= 1")
        return Schedule(every=value)
    if isinstance(value, Mapping):
        raw: Any = dict(value)
    else:
        try:
            raw = [int(s) for s in value]
        except TypeError:
            raise MonitorError(
                f"{what}: expected an int (every k steps), a list of steps, "
                f"{{'every': k}}, {{'steps': [...]}} or {{'log': n}}; got {type(value).__name__}"
            ) from None
    try:
        return parse_config({"probes": {"schedule": raw}}, source=what).probes.schedule
    except ConfigError as err:
        raise MonitorError(str(err).replace("probes.schedule", "schedule")) from None


def _section(name: str, value: Mapping[str, Any]) -> Any:
    """The config section ``name`` parsed from ``value``; errors name the field path."""
    try:
        return getattr(parse_config({name: dict(value)}, source=f"Monitor({name}=...)"), name)
    except ConfigError as err:
        raise MonitorError(str(err)) from None


def _probes_config(probes: Any) -> ProbesConfig:
    if probes is None:
        return ProbesConfig()
    if isinstance(probes, ProbesConfig):
        return probes
    if isinstance(probes, bool):
        return ProbesConfig(**{name: {"enabled": probes} for name in PROBES})
    if isinstance(probes, Mapping):
        return _section("probes", probes)
    if isinstance(probes, str):
        probes = [probes]
    names = list(probes)
    unknown = [n for n in names if n not in PROBES]
    if unknown:
        raise MonitorError(
            f"Monitor(probes=...): unknown probe {unknown[0]!r}; the probes are {', '.join(PROBES)}"
        )
    return ProbesConfig(**{name: {"enabled": name in names} for name in PROBES})


def _hessian_config(hessian: Any) -> HessianConfig:
    if hessian is None:
        return HessianConfig()
    if isinstance(hessian, HessianConfig):
        return hessian
    if isinstance(hessian, bool):
        return HessianConfig(enabled=hessian)
    if isinstance(hessian, Mapping):
        return _section("hessian", hessian)
    raise MonitorError(
        f"Monitor(hessian=...): expected True/False, a mapping of the config's hessian options "
        f"or a HessianConfig; got {type(hessian).__name__}"
    )


def _inputs_of(
    probe_data: Any, device: torch.device, seed: int, num_classes: int | None, loss_fn: Any
) -> MeasureInputs:
    """The measures' inputs from one batch (halved for the two probe batches), a mapping with
    ``a``, ``b`` and ``hessian``, or an object with ``batch_a``, ``batch_b`` and ``hessian``
    (:class:`~normprobe.plan.ProbeData`)."""

    def moved(batch: Any, what: str) -> Batch:
        inputs, targets = split_batch(batch, what, MonitorError)
        if targets is None:
            raise MonitorError(f"{what}: the probes and the Hessian need targets, got None")
        return to_device(inputs, device), to_device(targets, device)

    if isinstance(probe_data, MeasureInputs):
        a, b, h = probe_data.batch_a, probe_data.batch_b, probe_data.hessian_set
    elif isinstance(probe_data, Mapping) and {"a", "b"} <= set(probe_data):
        a, b, h = probe_data["a"], probe_data["b"], probe_data.get("hessian")
    elif hasattr(probe_data, "batch_a") and hasattr(probe_data, "batch_b"):
        a, b, h = probe_data.batch_a, probe_data.batch_b, getattr(probe_data, "hessian", None)
    else:
        inputs, targets = split_batch(probe_data, "probe_data", MonitorError)
        n = batch_size(inputs, targets, "probe_data", MonitorError)
        if n < 4:
            raise MonitorError(
                f"probe_data: {n} examples cannot make two probe batches of at least two; "
                f"pass at least 4 (e.g. 256)"
            )
        half = n // 2
        a = (take(inputs, slice(0, half)), targets[:half])
        b = (take(inputs, slice(half, 2 * half)), targets[half : 2 * half])
        h = (inputs, targets)
    return MeasureInputs(
        moved(a, "probe_data (first probe batch)"),
        moved(b, "probe_data (second probe batch)"),
        None if h is None else moved(h, "probe_data (Hessian set)"),
        seed,
        num_classes,
        loss_fn,
    )


def _folder_safe(name: str) -> str:
    """``name`` as one folder name: path separators become ``-``, a leading dot ``_``."""
    name = name.replace("/", "-").replace("\\", "-").replace("\0", "")
    return "_" + name[1:] if name.startswith(".") else name


def _check_run(run: Any) -> str:
    """``run``, refused unless it can be its folder's name (``out/runs/<run>``): a folder
    whose name starts with a dot is a staging folder, and results leave it out."""
    if not isinstance(run, str) or not run or run != _folder_safe(run):
        raise MonitorError(
            f"Monitor(run=...): {run!r} names the run's folder (out/runs/<run>); use a name "
            f"without / or \\ that does not start with a dot, e.g. {_folder_safe(str(run)) or 'mine'!r}"
        )
    return run


class Monitor:
    """Records the probes and the Hessian on a schedule inside any training loop.

    Call ``monitor.step(t)`` (or ``monitor(t)``) when the model has had
    ``t`` updates (step 0: at initialization, before the first update); at
    the steps of the schedule it measures the model on the fixed probe
    batches. Keyword values given to :meth:`step` or :meth:`log` (the loop's
    ``batch_loss``, a ``test_acc``) are recorded as metrics at that step.

    Args:
        model: any ``nn.Module`` taking the batches' inputs (batch contract:
            a tensor, a tuple or a dict of tensors).
        loss_fn: ``loss_fn(output, target)`` of the gradient probes and the
            Hessian; None: the mean cross-entropy an analysis uses.
        probe_data: one ``(inputs, targets)`` batch, halved into the two
            probe batches and taken whole as the Hessian set; or a mapping
            ``{"a": batch, "b": batch, "hessian": batch}``; or the
            :class:`~normprobe.plan.ProbeData` of an analysis.
        probes: which probes run and their options, as under ``probes:`` in
            a config (a mapping, a list of probe names, True/False, a
            ``ProbesConfig``); default: an analysis' defaults.
        hessian: the Hessian's options, as under ``hessian:`` (a mapping,
            True/False, a ``HessianConfig``); default: an analysis' defaults.
        schedule: when to measure, for the probes and the Hessian alike
            unless ``probes``/``hessian`` give their own ``schedule``: ``50``
            (every 50 steps), a list of steps, or ``{"log": n}`` (needs
            ``total_steps``); default: the config's schedules.
        out: a results folder; the run is kept in ``out/runs/<run>/``: one
            part file per measurement as it goes (a crash loses at most the
            measurement in progress), its tables written by :meth:`close`.
        run: the run's name (default ``<normalizer>_seed<seed>``, with the
            learning rate when ``lr`` is known).
        normalizer: the name the figures group and color the run by (default:
            a zoo model's normalizer, else the run's name).
        seed: the run's seed (recorded, and the probes' noise seed).
        lr: the learning rate to record (default: the optimizer's, if given).
        optimizer: optional; only its learning rate is read.
        eval_data: ``{"test": (x, y), "train": (x, y)}``: at each scheduled
            step record ``<name>_loss`` and ``<name>_acc`` (eval mode, as an
            analysis does), which the training-curve figures read.
        num_classes: K of the Hessian outlier ratio (default: the size of the
            model's class axis).
        total_steps: the length of the run, which makes the schedules end on
            it as an analysis' do (``every`` includes the last step).
        tensorboard: a TensorBoard log folder (needs the ``tensorboard``
            package) or a writer with ``add_scalar`` (a ``SummaryWriter``):
            the scalar measures and logged values are written there too
            (:mod:`normprobe.integrations.tensorboard`).

    Example:
        >>> import torch.nn.functional as F
        >>> from torch import nn
        >>> model = nn.Sequential(nn.Linear(4, 16), nn.BatchNorm1d(16), nn.Linear(16, 3))
        >>> x, y = torch.randn(64, 4), torch.randint(0, 3, (64,))
        >>> monitor = Monitor(model, F.cross_entropy, (x, y), schedule=[0], normalizer="batch",
        ...                   hessian={"pieces": ["top"], "lanczos_steps": 8, "top_k": 2})
        >>> monitor.step(0)
        >>> monitor.results.rows("eigenvalue")["index"].tolist()  # top max(top_k, K): K = 3
        [1, 2, 3]
    """

    def __init__(
        self,
        model: nn.Module,
        loss_fn: Callable[[Any, torch.Tensor], torch.Tensor] | None,
        probe_data: Any,
        *,
        probes: Any = None,
        hessian: Any = None,
        schedule: ScheduleLike | None = None,
        out: str | Path | None = None,
        run: str | None = None,
        normalizer: str | None = None,
        seed: int = 0,
        lr: float | None = None,
        optimizer: torch.optim.Optimizer | None = None,
        eval_data: Mapping[str, Any] | None = None,
        num_classes: int | None = None,
        total_steps: int | None = None,
        tensorboard: str | Path | Any | None = None,
    ) -> None:
        if not isinstance(model, nn.Module):
            raise MonitorError(
                f"Monitor(model=...): expected a torch.nn.Module, got {type(model).__name__}"
            )
        if loss_fn is not None and not callable(loss_fn):
            raise MonitorError(
                f"Monitor(loss_fn=...): expected loss_fn(output, target) or None, "
                f"got {type(loss_fn).__name__}"
            )
        self.model = model
        self.probes_config = _probes_config(probes)
        self.hessian_config = _hessian_config(hessian)
        if schedule is not None:
            sched = _schedule(schedule, "Monitor(schedule=...)")
            own = lambda given: isinstance(given, Mapping) and "schedule" in given  # noqa: E731
            if not own(probes):
                self.probes_config = self.probes_config.model_copy(update={"schedule": sched})
            if not own(hessian):
                self.hessian_config = self.hessian_config.model_copy(update={"schedule": sched})
        self.total_steps = total_steps
        for what, s in (("probes", self.probes_config), ("hessian", self.hessian_config)):
            if s.schedule.log is not None and total_steps is None:
                raise MonitorError(
                    f"Monitor: the {what} schedule {{'log': {s.schedule.log}}} spaces points up "
                    f"to the last step; pass total_steps=<the run's number of updates>"
                )
        self._probes = enabled_measures(self.probes_config, self.hessian_config, schedule="probes")
        self._hessian = enabled_measures(
            self.probes_config, self.hessian_config, schedule="hessian"
        )
        if lr is None and optimizer is not None:
            lr = float(optimizer.param_groups[0]["lr"])
        self.lr = float("nan") if lr is None else float(lr)
        self.seed = int(seed)
        # a zoo model knows its normalizer; another model is named by its run
        self.normalizer = normalizer or getattr(model, "norm_name", None) or run or "model"
        if run is None:
            rate = "" if math.isnan(self.lr) else f"_lr{self.lr:g}"
            # the run names its folder: a normalizer such as "resnet/bn" keeps its name in the
            # tables, and its run is resnet-bn_...
            run = _folder_safe(f"{self.normalizer}{rate}_seed{self.seed}")
        self.run = _check_run(run)
        device = model_device(model)
        if self._hessian and num_classes is None and self.hessian_config.outlier_k is None:
            num_classes = self._class_count(probe_data)
        self.inputs = _inputs_of(probe_data, device, self.seed, num_classes, loss_fn)
        if self._hessian and self.inputs.hessian_set is None:
            raise MonitorError(
                "probe_data: the Hessian is on but no Hessian set was given; add "
                "'hessian': (x, y) to the mapping, or pass hessian=False"
            )
        self._check_noise_pairing()
        self.eval_data = {
            str(name): split_batch(batch, f"eval_data[{name!r}]", MonitorError)
            for name, batch in (eval_data or {}).items()
        }
        self.directory = None if out is None else Path(out)
        self._scalars = None
        if tensorboard is not None:
            try:
                self._scalars = ScalarWriter(tensorboard)
            except (ImportError, TypeError) as err:
                raise MonitorError(str(err)) from None
        self._frames: dict[str, list[pd.DataFrame]] = {name: [] for name in TABLES}
        self._logged: list[dict[str, Any]] = []  # logged since the last record()
        self._unwritten: list[dict[str, Any]] = []  # logged since the last part file
        self._parts = 0
        self._logged_frame = pd.DataFrame(
            {
                "step": pd.Series(dtype="int64"),
                "layer": pd.Series(dtype=object),
                "depth": pd.Series(dtype="float64"),
                "metric": pd.Series(dtype=object),
                "value": pd.Series(dtype="float64"),
            }
        )
        self.status = "running"
        self.measure_seconds = 0.0
        self._started = time.perf_counter()
        self._last_step: int | None = None
        self._measured: set[int] = set()  # the steps measured so far
        if self.directory is not None:
            self._write_manifest()
            start_run(self.directory, self.record())

    def _check_noise_pairing(self) -> None:
        """Refuse the noise pairing on inputs without a floating-point tensor (token ids), or
        whose noise at a scheduled step is the inputs themselves (drawn from the seed of that
        step's noise), when the monitor is built, not at the measurement: a loop would have
        trained up to it."""
        rc = self.probes_config.representation
        if not (rc.pairing == "noise" and any(m.name == "representation" for m in self._probes)):
            return
        tensors = input_tensors(self.inputs.batch_a[0])
        if any(t.is_floating_point() for _, t in tensors):
            x = to_model(self.inputs.batch_a[0], self.model)
            for step in self._noise_steps():  # the noise of each, drawn as the probe draws it
                try:
                    noisy_inputs(x, rc.noise_scale, self.inputs.seed + step)
                except ProbeError as err:
                    raise MonitorError(f"probe_data: at step {step}: {err}") from None
            return
        kinds = ", ".join(f"{k} ({str(t.dtype).replace('torch.', '')})" for k, t in tensors)
        raise MonitorError(
            f"probes.representation.pairing: 'noise' adds Gaussian noise to the floating-point "
            f"inputs, and the probe batch has none ({kinds}); for token ids pass "
            f"probes={{'representation': {{'pairing': 'independent'}}}} (the second probe "
            f"batch as the other minibatch) or 'within'"
        )

    #: the most scheduled steps whose noise :meth:`_check_noise_pairing` draws when built
    NOISE_STEPS_CHECKED = 64

    def _noise_steps(self) -> list[int]:
        """The representation probe's steps known before training (their noise seeds are the
        run's seed plus the step): step 0, the listed steps, or all of them when the run's
        length is given; at most :attr:`NOISE_STEPS_CHECKED`, the first ones."""
        schedule = self.probes_config.schedule
        if self.total_steps is not None:
            steps = schedule.resolve(self.total_steps)
        else:
            steps = sorted({0, *(schedule.steps or [])})
        return steps[: self.NOISE_STEPS_CHECKED]

    # ------------------------------------------------------------------ the schedule

    def _due(self, schedule: Schedule, step: int) -> bool:
        if self.total_steps is not None:
            return step in schedule.resolve(self.total_steps)
        if step == 0:
            return True
        if schedule.steps is not None:
            return step in schedule.steps
        return schedule.every is not None and step % schedule.every == 0

    def due(self, step: int) -> list[str]:
        """The names of the measures scheduled at ``step`` (empty: nothing to measure)."""
        chosen = (self._probes if self._due(self.probes_config.schedule, step) else []) + (
            self._hessian if self._due(self.hessian_config.schedule, step) else []
        )
        return [m.name for m in chosen]

    # ------------------------------------------------------------------ recording

    def step(self, step: int, **values: float) -> None:
        """Record ``values`` at ``step`` and, if the schedule says so, measure the model.

        The model, its gradients, the optimizer and the global random state
        are left as found; :meth:`due` says what a step will measure.
        """
        step = _updates(step, "Monitor.step")
        names = set(self.due(step))
        chosen = [m for m in self._probes + self._hessian if m.name in names]
        # evaluated at the steps an analysis evaluates: the probe schedule's, the Hessian's
        # and the last one
        evaluate_now = bool(self.eval_data) and (
            self._due(self.probes_config.schedule, step)
            or (self.hessian_config.enabled and self._due(self.hessian_config.schedule, step))
            or step == self.total_steps
        )
        if (chosen or evaluate_now) and step in self._measured:
            raise MonitorError(
                f"Monitor.step: step {step} was measured already; its rows would be in the "
                f"tables twice. Pass the number of updates so far, which grows from call to "
                f"call (a second training run gets a Monitor of its own, with run=...)"
            )
        if values:
            self.log(step, **values)
        if not chosen and not evaluate_now:
            return
        t0 = time.perf_counter()
        measured = measure_step(
            self.model, step, self.inputs, chosen, self.probes_config, self.hessian_config
        )
        if evaluate_now:
            measured["metrics"][:0] = [self._evaluated(step)]
        for name, frames in measured.items():
            self._frames[name].extend(frames)
        if self.directory is not None:
            self._write_part(measured)
        if self._scalars is not None:
            self._scalars.write(measured["metrics"])
        self.measure_seconds += time.perf_counter() - t0
        self._last_step = step
        self._measured.add(step)

    __call__ = step

    def log(self, step: int, **values: float) -> None:
        """Record training metrics (``batch_loss=``, ``test_acc=``, ...) at ``step`` (the
        number of updates so far, an int >= 0).

        Logged values are kept in memory and written with the next
        measurement's part file (or by :meth:`close`).
        """
        step = _updates(step, "Monitor.log")
        taken = sorted(set(values) & measured_names())
        if taken:
            raise MonitorError(
                f"Monitor.log: {taken[0]!r} is a metric the measures write; log the loop's value "
                f"under another name (e.g. {logged_name(taken[0])!r})"
            )
        for name, value in values.items():
            if isinstance(value, torch.Tensor):
                value = value.item()
            row = {"step": step, "metric": name, "value": float(value)}
            self._logged.append(row)
            if self.directory is not None:
                self._unwritten.append(row)
            if self._scalars is not None:
                self._scalars.log(row["step"], {name: row["value"]})

    def _evaluated(self, step: int) -> pd.DataFrame:
        values: dict[str, float] = {}
        for name, (x, y) in self.eval_data.items():
            values[f"{name}_loss"], values[f"{name}_acc"] = evaluate(self.model, x, y)
        return metric_rows(step, values)

    def _class_count(self, probe_data: Any) -> int | None:
        """K for the outlier ratio: the size of the class axis of the model's output."""
        first = (
            probe_data.batch_a
            if hasattr(probe_data, "batch_a")
            else probe_data["a"]
            if isinstance(probe_data, Mapping) and "a" in probe_data
            else probe_data
        )
        inputs, _ = split_batch(first, "probe_data", MonitorError)
        # the whole batch: a microbatch normalizer (norm_batch) refuses a batch of two
        inputs = to_device(inputs, model_device(self.model))
        with preserved(self.model), torch.no_grad(), torch.random.fork_rng(devices=[]):
            self.model.eval()
            out = prediction(call_model(self.model, inputs))
        return int(out.shape[-1] if classes_last(self.model) else out.shape[1])

    # ------------------------------------------------------------------ results

    def record(self) -> RunRecord:
        """The run as a :class:`~normprobe.results.RunRecord` (what its folder holds)."""
        tables: dict[str, pd.DataFrame] = {}
        # the frames so far are joined once and kept joined: a measurement adds its own
        # frames to one table instead of every write joining them all again
        for name in TABLES:
            if len(self._frames[name]) > 1:
                self._frames[name] = [pd.concat(self._frames[name], ignore_index=True, sort=False)]
        if self._logged:
            new = logged_rows(self._logged)
            self._logged_frame = pd.concat([self._logged_frame, new], ignore_index=True)
            self._logged = []
        metrics = [*self._frames["metrics"], self._logged_frame]
        metrics = [f for f in metrics if len(f)]
        if metrics:
            tables["metrics"] = pd.concat(metrics, ignore_index=True, sort=False)
        for name in TABLES[1:]:
            if self._frames[name]:
                tables[name] = self._frames[name][0]
        return RunRecord(
            self.run,
            self.normalizer,
            self.lr,
            self.seed,
            self.status,
            seconds=time.perf_counter() - self._started,
            info={"measure_seconds": round(self.measure_seconds, 3), "monitor": True},
            tables=tables,
        )

    @property
    def results(self) -> Results:
        """The recorded tables: with ``out``, every run in that folder (as
        :func:`~normprobe.results.load_results` reads it); otherwise this run's."""
        if self.directory is not None:
            return assemble(self.directory, write=False, live=[self.record()])
        return records_results([self.record()], ".", self._manifest())

    def close(self) -> Results:
        """Mark the run done, write its folder's tables (once, replacing its part files) and
        the folder's combined tables; the results."""
        self.status = "done"
        if self._scalars is not None:
            self._scalars.close()
        if self.directory is None:
            return self.results
        finish_run(self.directory, self.record())
        return assemble(self.directory)

    def __enter__(self) -> Monitor:
        return self

    def __exit__(self, kind: Any, error: Any, tb: Any) -> None:
        if kind is None:
            self.close()
        else:  # the loop failed: keep what was recorded, marked failed
            self.status = "failed"
            if self._scalars is not None:
                self._scalars.close()
            if self.directory is not None:
                finish_run(self.directory, self.record())

    def _write_part(self, measured: Mapping[str, list[pd.DataFrame]]) -> None:
        """One part file per table for this measurement (the values logged since the previous
        part travel with its metrics part)."""
        assert self.directory is not None
        tables: dict[str, pd.DataFrame] = {}
        for name, frames in measured.items():
            frames = [f for f in frames if len(f)]
            if frames:
                tables[name] = (
                    frames[0]
                    if len(frames) == 1
                    else pd.concat(frames, ignore_index=True, sort=False)
                )
        write_part(self.directory, self.run, self._parts, tables, self._unwritten)
        self._parts += 1
        self._unwritten = []

    def _manifest(self) -> dict[str, Any]:
        model = type(self.model)
        return {
            "name": self.directory.name if self.directory is not None else self.run,
            "monitor": True,
            "config": {
                "model": {"factory": f"{model.__module__}:{model.__qualname__}"},
                "probes": self.probes_config.model_dump(mode="json"),
                "hessian": self.hessian_config.model_dump(mode="json"),
            },
        }

    def _write_manifest(self) -> None:
        """A manifest for the folder, unless one is there (another monitored run's, or an
        analysis')."""
        assert self.directory is not None
        path = self.directory / "manifest.json"
        if not path.exists():
            write_json_atomic(path, self._manifest())

    def __repr__(self) -> str:
        measures = [m.name for m in self._probes + self._hessian]
        return (
            f"Monitor(run={self.run!r}, measures={measures}, last_step={self._last_step}, "
            f"out={None if self.directory is None else str(self.directory)!r})"
        )
