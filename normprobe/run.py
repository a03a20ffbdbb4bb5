"""One run: build the model of a :class:`~normprobe.plan.RunSpec`, train it, measure it.

:func:`run_one` is the single place a run happens, whichever executor calls
it: the in-process loop of :func:`normprobe.analyze`, a local worker process
or a Ray task (:mod:`normprobe.executors`). At each scheduled step the
training loop calls the measures the run's config turns on, dispatched over
the table of measures (:mod:`normprobe.measures`).

>>> from normprobe.config import load_config
>>> from normprobe.plan import plan_runs, prepare_data
>>> cfg = load_config({"model": {"name": "mlp", "options": {"depth": 2, "width": 16}},
...     "normalizers": ["layer"], "train": {"steps": 2, "batch_size": 32},
...     "probes": {"schedule": [0, 2]}, "hessian": {"enabled": False}})[0]
>>> record = run_one(plan_runs(cfg)[0], prepare_data(cfg))
>>> record.status, sorted(record.tables)
('done', ['metrics'])
"""

from __future__ import annotations

import time
import traceback
from typing import Any

import pandas as pd
import torch
from torch import nn

from normprobe.batch import forked_random_state
from normprobe.hessian.hvp import NonFiniteProductError
from normprobe.measures import MeasureInputs, enabled_measures, measure_step
from normprobe.norms import set_total_steps
from normprobe.norms import spec as norm_spec
from normprobe.plan import ProbeData, RunSpec, build_run_model
from normprobe.results import RunRecord
from normprobe.rows import Rows, frame_of
from normprobe.training import (
    MeasurementDiverged,
    label_grouped_batches,
    label_minibatches,
    make_optimizer,
    train,
)

__all__ = ["run_one"]


def run_one(
    spec: RunSpec,
    data: ProbeData,
    *,
    device: torch.device | str = "cpu",
    progress_bar: Any = None,
) -> RunRecord:
    """Train and measure one run; its record (status ``done``, ``diverged`` or ``failed``).

    ``data``: the probe batches and dataset of the run's variant
    (:func:`~normprobe.plan.prepare_data`), the same for every run so that
    every run is measured on the same examples. ``progress_bar``: a
    ``tqdm``-like factory for a per-step bar, or None. An exception inside
    the run becomes a ``failed`` record with its traceback in ``info``
    (Ctrl-C is re-raised).
    """
    config = spec.resolved_config()
    device = torch.device(device)
    tc = config.train
    start = time.perf_counter()
    probes = enabled_measures(config.probes, config.hessian, schedule="probes")
    hessian = enabled_measures(config.probes, config.hessian, schedule="hessian")
    tables: dict[str, list[pd.DataFrame | Rows]] = {"hessian_nodes": [], "hessian_density": []}
    inputs = MeasureInputs(
        data.batch_a,
        data.batch_b,
        data.hessian,
        spec.seed,
        getattr(data.dataset, "num_classes", None),
    )

    def measure(step: int, model: nn.Module) -> list[pd.DataFrame | Rows]:
        chosen = (probes if step in spec.probe_steps else []) + (
            hessian if step in spec.hessian_steps else []
        )
        try:
            measured = measure_step(
                model, step, inputs, chosen, config.probes, config.hessian, lazy=True
            )
        except NonFiniteProductError as err:  # the model blew up: a diverged run, not a failure
            raise MeasurementDiverged(str(err)) from err
        for name in tables:
            tables[name].extend(measured[name])
        return measured["metrics"]

    bar = None
    try:
        # what a run draws from torch's global generators (a factory model's dropout, a noise
        # layer) comes from the run's seed: the same numbers in a rerun, whatever the executor,
        # the order of the runs or what ran before in the process (torch seeds the global
        # generator at random when a process starts)
        with forked_random_state(device, spec.seed):
            inputs = inputs.to(device)
            model = build_run_model(config, spec.normalizer, spec.seed, data.dataset).to(device)
            set_total_steps(model, tc.steps)
            optimizer = make_optimizer(
                tc.optimizer,
                model.parameters(),
                lr=spec.lr,
                momentum=tc.momentum,
                weight_decay=tc.weight_decay,
            )
            if progress_bar is not None:
                bar = progress_bar(total=tc.steps, desc=spec.run, leave=False, unit="step")

            def progress(step: int, loss: float) -> None:
                if bar is not None:
                    bar.update(1)
                    if step % 10 == 0:
                        bar.set_postfix(loss=f"{loss:.3f}")

            train_x, train_y = data.train_split()
            batches = None
            if tc.sampler.kind == "labels":
                batches = label_minibatches(
                    train_y,
                    tc.sampler.labels_per_batch,
                    tc.sampler.per_label,
                    torch.Generator().manual_seed(spec.seed),
                )
            bs_eval = tc.eval_batch_stats
            grouped = None
            if bs_eval.enabled and bs_eval.batches == "sampler":
                # fixed by data.seed, so every run is evaluated on the same batches
                grouped = tuple(
                    label_grouped_batches(
                        y,
                        tc.sampler.labels_per_batch,
                        tc.sampler.per_label,
                        torch.Generator().manual_seed(config.data.seed),
                    )
                    for y in (train_y[: tc.eval_train_samples], data.dataset.test.y)
                )
            outcome = train(
                model,
                (train_x, train_y),
                (data.dataset.test.x, data.dataset.test.y),
                val_split=data.val_split(),
                optimizer=optimizer,
                steps=tc.steps,
                batch_size=tc.batch_size,
                seed=spec.seed,
                measure_steps=set(spec.measure_steps),
                measure=measure,
                regnorm_lambda=tc.regnorm_lambda if norm_spec(spec.normalizer).regularized else 0.0,
                eval_batch_size=tc.eval_batch_size,
                eval_train_samples=tc.eval_train_samples,
                batch_stats_size=(
                    (bs_eval.batch_size or tc.batch_size)
                    if bs_eval.enabled and grouped is None
                    else None
                ),
                batch_stats_batches=grouped,
                batches=batches,
                progress=progress,
            )
    except KeyboardInterrupt:
        raise
    except Exception as err:
        return spec.failed(
            f"{type(err).__name__}: {err}",
            time.perf_counter() - start,
            {"traceback": traceback.format_exc(limit=8)},
        )
    finally:
        if bar is not None:
            bar.close()
    out = {"metrics": outcome.table()}  # the run's rows made one frame, once
    for name, frames in tables.items():
        if frames:
            out[name] = frame_of(frames)
    return RunRecord(
        spec.run,
        spec.normalizer,
        spec.lr,
        spec.seed,
        outcome.status,
        variant=spec.variant,
        seconds=time.perf_counter() - start,
        diverged_step=outcome.diverged_step,
        info={"measure_seconds": round(outcome.measure_seconds, 3)},
        tables=out,
    )
