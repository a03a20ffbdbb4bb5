"""The training loop of one run, with measurements at scheduled steps.

(Just over 500 lines: the loop with the samplers and the evaluations it
records, which share its batching rules.)

Step ``t`` means "after ``t`` optimizer updates": step 0 is the initialized
model. Losses are cross-entropies averaged over every target: one per example
for a classifier, one per token for a language model (a model with
``classes_last = True`` whose scores ``(N, T, K)`` meet targets ``(N, T)``;
:func:`cross_entropy`), whose runs also record perplexity. At every scheduled step the loop records train/test loss and accuracy
and calls the ``measure`` callback (probes, Hessian), which must leave the
model as it found it (``normprobe.state.preserved``) and use its own random
generators, so measuring never changes the training trajectory.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Literal

import pandas as pd
import torch
import torch.nn.functional as F
from torch import nn

from normprobe.batch import forked_random_state, full_precision, model_device, prediction
from normprobe.norms import regularization
from normprobe.rows import Rows, frame_of, joined
from normprobe.state import frozen_statistics, preserved

__all__ = [
    "MeasurementDiverged",
    "TrainOutcome",
    "cross_entropy",
    "loss_for",
    "classes_last",
    "minibatches",
    "label_minibatches",
    "label_grouped_batches",
    "evaluate",
    "metric_block",
    "metric_rows",
    "evaluate_batch_stats",
    "norm_batch_of",
    "make_optimizer",
    "train",
    "training_loss",
]

Measure = Callable[[int, nn.Module], list[pd.DataFrame | Rows]]


class MeasurementDiverged(Exception):
    """Raised by a ``measure`` callback when the model's numbers are no longer finite (e.g. a
    Hessian-vector product overflowed): :func:`train` then ends the run as ``diverged`` at that
    step, keeping what it recorded before, as it does for a non-finite training loss."""


@dataclass
class TrainOutcome:
    """What a run produced: its status, tidy metric rows and timings.

    ``items``: the rows in the order recorded, frames or blocks of columns
    (:class:`~normprobe.rows.Rows`); :meth:`table` makes them one frame,
    :attr:`frames` a frame each.
    """

    status: Literal["done", "diverged"]
    items: list[pd.DataFrame | Rows] = field(default_factory=list)
    diverged_step: int | None = None
    seconds: float = 0.0
    measure_seconds: float = 0.0

    @property
    def frames(self) -> list[pd.DataFrame]:
        """A frame per recorded block, in order."""
        return [frame_of([item]) for item in self.items]

    def table(self) -> pd.DataFrame:
        """Every row in one frame: what concatenating :attr:`frames` gives."""
        return frame_of(self.items)


def minibatches(n: int, batch_size: int, generator: torch.Generator) -> Iterator[torch.Tensor]:
    """Endless index batches: a fresh permutation each epoch, the incomplete last batch dropped.

    >>> it = minibatches(10, 4, torch.Generator().manual_seed(0))
    >>> [len(next(it)) for _ in range(3)]
    [4, 4, 4]
    """
    if batch_size > n:
        raise ValueError(f"batch size {batch_size} is larger than the training set ({n} examples)")
    while True:
        order = torch.randperm(n, generator=generator)
        for start in range(0, n - batch_size + 1, batch_size):
            yield order[start : start + batch_size]


def label_minibatches(
    labels: torch.Tensor, labels_per_batch: int, per_label: int, generator: torch.Generator
) -> Iterator[torch.Tensor]:
    """Endless non-i.i.d. index batches: ``labels_per_batch`` distinct labels x ``per_label`` each.

    Each batch draws its labels uniformly without replacement from the labels
    that occur (whatever the class sizes), in random order, and takes the next
    ``per_label`` examples of each, so the batch is grouped by label. Each
    label's examples are shuffled and used without replacement; when fewer
    than ``per_label`` are left, the remainder is dropped and that label's
    examples are reshuffled (an epoch per label). Everything is drawn from
    ``generator``, so the same seed gives the same batches.

    >>> y = torch.arange(12) % 3
    >>> batch = next(label_minibatches(y, 2, 2, torch.Generator().manual_seed(0)))
    >>> len(batch), sorted(torch.bincount(y[batch], minlength=3).tolist())
    (4, [0, 2, 2])
    """
    classes = torch.unique(labels)
    if labels_per_batch > len(classes):
        raise ValueError(
            f"labels_per_batch {labels_per_batch} is more than the {len(classes)} labels "
            "in the training set"
        )
    members = [torch.nonzero(labels == c).flatten() for c in classes]
    small = [(int(c), len(m)) for c, m in zip(classes, members) if len(m) < per_label]
    if small:
        label, count = small[0]
        raise ValueError(
            f"per_label {per_label} is more than the {count} training examples of label {label}"
        )
    orders: list[torch.Tensor | None] = [None] * len(classes)
    used = [0] * len(classes)
    while True:
        chosen = torch.randperm(len(classes), generator=generator)[:labels_per_batch]
        parts = []
        for c in chosen.tolist():
            order = orders[c]
            if order is None or used[c] + per_label > len(order):
                order = orders[c] = members[c][torch.randperm(len(members[c]), generator=generator)]
                used[c] = 0
            parts.append(order[used[c] : used[c] + per_label])
            used[c] += per_label
        yield torch.cat(parts)


def label_grouped_batches(
    labels: torch.Tensor, labels_per_batch: int, per_label: int, generator: torch.Generator
) -> list[torch.Tensor]:
    """Fixed non-i.i.d. index batches over a set, each example used at most once.

    Each batch is ``labels_per_batch`` distinct labels x ``per_label``
    examples each, grouped by label, as :func:`label_minibatches` draws them
    for training. Every label's examples are shuffled and cut into chunks of
    ``per_label`` (a shorter remainder is left out); batches are then built
    greedily from the labels with the most chunks left (ties broken at
    random), which uses every chunk whenever that is possible. Chunks of
    fewer than ``labels_per_batch`` labels left at the end are left out.

    >>> y = torch.arange(20) % 4                       # 4 labels x 5 examples
    >>> batches = label_grouped_batches(y, 2, 2, torch.Generator().manual_seed(0))
    >>> len(batches), [sorted(set(y[b].tolist())).__len__() for b in batches]
    (4, [2, 2, 2, 2])
    >>> len(torch.cat(batches).unique())               # 4 x 2 chunks of 2, none twice
    16
    """
    chunks: list[list[torch.Tensor]] = []
    for c in torch.unique(labels):
        members = torch.nonzero(labels == c).flatten()
        members = members[torch.randperm(len(members), generator=generator)]
        whole = len(members) // per_label * per_label
        chunks.append(list(members[:whole].split(per_label)) if whole else [])
    batches = []
    while True:
        tiebreak = torch.rand(len(chunks), generator=generator).tolist()
        ranked = sorted(range(len(chunks)), key=lambda i: (-len(chunks[i]), tiebreak[i]))
        chosen = [i for i in ranked[:labels_per_batch] if chunks[i]]
        if len(chosen) < labels_per_batch:
            return batches
        batches.append(torch.cat([chunks[i].pop() for i in chosen]))


def classes_last(model: nn.Module) -> bool:
    """Whether ``model``'s scores have the classes on the last axis (``classes_last = True``).

    A language model's ``(N, T, K)`` next-token scores do (the zoo's
    transformer); a classifier's ``(N, K)`` follow torch's convention of
    classes on axis 1. Declared by the model, not guessed from shapes: an
    ``(N, T, K)`` output with ``T == K`` fits both readings.
    """
    return bool(getattr(model, "classes_last", False))


def cross_entropy(
    output: torch.Tensor,
    target: torch.Tensor,
    *,
    classes_last: bool = False,
    reduction: Literal["mean", "sum"] = "mean",
) -> torch.Tensor:
    """Cross-entropy over every target: torch's ``F.cross_entropy``, or per token with classes last.

    With ``classes_last``, ``output`` ``(..., K)`` and ``target`` of its
    leading shape (a language model's ``(N, T, K)`` against ``(N, T)``) are
    flattened to ``(N * T, K)`` and ``(N * T,)``: the mean is over all
    ``N * T`` tokens, whose ``exp`` is the perplexity.

    >>> out, y = torch.zeros(2, 3, 4), torch.zeros(2, 3, dtype=torch.long)
    >>> round(cross_entropy(out, y, classes_last=True).item(), 4)  # log 4
    1.3863
    """
    if not classes_last:
        return F.cross_entropy(output, target, reduction=reduction)
    if output.shape[:-1] != target.shape:
        raise ValueError(
            f"scores with the classes on the last axis must have the targets' shape plus one "
            f"axis: targets {tuple(target.shape)} want scores {(*target.shape, 'K')}, got "
            f"{tuple(output.shape)}"
        )
    return F.cross_entropy(
        output.reshape(-1, output.shape[-1]), target.reshape(-1), reduction=reduction
    )


def loss_for(model: nn.Module) -> Callable[[torch.Tensor, torch.Tensor], torch.Tensor]:
    """The mean cross-entropy ``loss_fn(output, target)`` for ``model`` (probes, Hessian)."""
    if classes_last(model):
        return _token_cross_entropy
    return F.cross_entropy


def _token_cross_entropy(output: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    return cross_entropy(output, target, classes_last=True)


def training_loss(
    model: nn.Module, output: torch.Tensor, target: torch.Tensor, lam: float
) -> torch.Tensor:
    """Cross-entropy (per token for a language model) plus ``lam`` times the RegNorm penalties."""
    loss = cross_entropy(output, target, classes_last=classes_last(model))
    if lam:
        loss = loss + lam * regularization(model)
    return loss


def norm_batch_of(model: nn.Module) -> int | None:
    """The microbatch size every batch must be a multiple of (lcm of the ``norm_batch``
    of the model's normalizers), or None when no normalizer uses microbatches."""
    sizes = {
        int(g) for m in model.modules() if isinstance(g := getattr(m, "norm_batch", None), int)
    }
    return math.lcm(*sizes) if sizes else None


def _evaluated(
    model: nn.Module, x: torch.Tensor, y: torch.Tensor, batch_size: int, multiple: int | None
) -> tuple[float, float]:
    """Summed cross-entropy and correct count over ``_split`` batches (model mode as set)."""
    device = next(model.parameters()).device
    last = classes_last(model)
    total_loss, correct = 0.0, 0
    for start, stop, first in _split(len(x), batch_size, multiple):
        out = prediction(model(x[start:stop].to(device)))[first - start :]
        loss, right = _scored(out, y[first:stop], last)
        total_loss, correct = total_loss + loss, correct + right
    return total_loss, correct


def _scored(out: torch.Tensor, y: torch.Tensor, last: bool = False) -> tuple[float, int]:
    """Summed cross-entropy and the number of correct predictions (per target) of one batch."""
    y = y.to(out.device)
    loss = cross_entropy(out, y, classes_last=last, reduction="sum").item()
    return loss, int((out.argmax(dim=-1 if last else 1) == y).sum())


@torch.no_grad()
def evaluate(
    model: nn.Module, x: torch.Tensor, y: torch.Tensor, *, batch_size: int = 512, seed: int = 0
) -> tuple[float, float]:
    """Mean cross-entropy and accuracy in eval mode, in batches; the model is left as found.

    Means over every target: per example, or per token for ``(N, T)``
    next-token targets (:func:`cross_entropy`). With microbatch normalizers (``norm_batch``, see :func:`norm_batch_of`;
    eval mode uses them in ``batch-train``) every batch is a multiple of
    ``norm_batch``: see :func:`_split` for the last batch.

    The passes draw from the global generators seeded with ``seed`` and put
    back as found (a model whose eval-mode forward draws random numbers,
    ``F.dropout(h, training=True)`` say, neither moves the caller's random
    stream, which would change its training, nor gives other values from call
    to call), and run in the model's own dtype inside a loop's
    ``torch.autocast`` region (:func:`normprobe.batch.full_precision`).
    """
    device = model_device(model)
    with preserved(model), forked_random_state(device, seed), full_precision(device):
        model.eval()
        total_loss, correct = _evaluated(model, x, y, batch_size, norm_batch_of(model))
    return total_loss / y.numel(), correct / y.numel()


def _split(n: int, batch_size: int, multiple: int | None = None) -> list[tuple[int, int, int]]:
    """Consecutive ``(start, stop, first)`` batches; examples ``first:stop`` are counted.

    Without ``multiple``: batches of ``batch_size`` in order, ``first == start``;
    a last batch of one joins the one before it. With ``multiple`` (the
    microbatch size ``norm_batch``): every batch has the same size,
    ``batch_size`` rounded down to a multiple (at least one microbatch) or,
    for fewer examples, ``n`` rounded down to a multiple; a short last batch is widened backwards
    to that size, overlapping the batch before it, and only its new examples
    are counted. So every batch the model sees is a whole number of
    microbatches of the same size, and every example is counted once.

    >>> _split(10, 4, 4)
    [(0, 4, 0), (4, 8, 4), (6, 10, 8)]
    >>> _split(10, 16, 4)
    [(0, 8, 0), (2, 10, 8)]
    >>> _split(9, 4)
    [(0, 4, 0), (4, 9, 4)]
    """
    if multiple is None:
        bounds = [(start, min(start + batch_size, n)) for start in range(0, n, batch_size)]
        if len(bounds) > 1 and bounds[-1][1] - bounds[-1][0] == 1:
            bounds[-2:] = [(bounds[-2][0], n)]
        return [(start, stop, start) for start, stop in bounds]
    if n < multiple:
        raise ValueError(
            f"{n} examples to evaluate cannot fill one microbatch of norm_batch {multiple}; "
            f"evaluate at least {multiple} examples"
        )
    size = min(max(batch_size // multiple, 1) * multiple, n // multiple * multiple)
    return [
        (min(start + size, n) - size, min(start + size, n), start) for start in range(0, n, size)
    ]


@torch.no_grad()
def evaluate_batch_stats(
    model: nn.Module,
    x: torch.Tensor,
    y: torch.Tensor,
    *,
    batch_size: int | None = None,
    batches: Sequence[torch.Tensor] | None = None,
    seed: int = 0,
) -> tuple[float, float]:
    """Mean cross-entropy and accuracy without aggregated statistics (each batch's own).

    ``batches``: index batches to evaluate instead of consecutive ones (e.g.
    :func:`label_grouped_batches`); the means are then over the examples
    they hold.

    The model runs in train mode under :func:`normprobe.state.frozen_statistics`,
    on consecutive batches of ``batch_size`` examples in the given order
    (every example counted; a last batch of one example, which has no batch
    statistics, joins the batch before it); dropout modules stay in eval mode.
    With microbatch normalizers (``norm_batch``) every batch is a whole number
    of microbatches: a last batch that is not is widened backwards over the
    batch before it and only its new examples are counted (:func:`_split`).
    Running statistics, counters, flags, gradients and the global random
    state are left as found (the passes draw from generators seeded with
    ``seed``, in the model's own dtype, as :func:`evaluate`'s). For normalizers
    without batch statistics this equals :func:`evaluate` up to floating-point
    rounding.
    """
    device = model_device(model)
    with (
        preserved(model),
        frozen_statistics(model),
        forked_random_state(device, seed),
        full_precision(device),
    ):
        model.train()
        for module in model.modules():
            if isinstance(module, nn.modules.dropout._DropoutNd):
                module.eval()
        if batches is None:
            if batch_size is None:
                raise ValueError("evaluate_batch_stats needs batch_size or batches")
            total_loss, correct = _evaluated(model, x, y, batch_size, norm_batch_of(model))
            count = y.numel()
        else:
            device = next(model.parameters()).device
            last = classes_last(model)
            total_loss, correct, count = 0.0, 0, 0
            for index in batches:
                loss, right = _scored(prediction(model(x[index].to(device))), y[index], last)
                total_loss, correct = total_loss + loss, correct + right
                count += y[index].numel()
            if count == 0:
                raise ValueError("evaluate_batch_stats got no examples in batches")
    return total_loss / count, correct / count


def make_optimizer(
    name: Literal["sgd", "adam"],
    params: Iterator[nn.Parameter],
    *,
    lr: float,
    momentum: float = 0.9,
    weight_decay: float = 0.0,
) -> torch.optim.Optimizer:
    """SGD with momentum or Adam (``momentum`` is Adam's beta1)."""
    if name == "sgd":
        return torch.optim.SGD(params, lr=lr, momentum=momentum, weight_decay=weight_decay)
    if name == "adam":
        return torch.optim.Adam(params, lr=lr, betas=(momentum, 0.999), weight_decay=weight_decay)
    raise ValueError(f"unknown optimizer {name!r}; use 'sgd' or 'adam'")


def _perplexity(loss: float) -> float:
    """``exp(loss)`` of a mean token cross-entropy; inf where that overflows (a diverging run)."""
    try:
        return math.exp(loss)
    except OverflowError:
        return math.inf


def metric_rows(step: int, values: dict[str, float]) -> pd.DataFrame:
    """One tidy row per scalar metric of a step (no layer, no depth), as a frame."""
    return joined([metric_block(step, values)])


def metric_block(step: int, values: dict[str, float]) -> Rows:
    """One row per scalar metric of a step as a block of columns, for a run that makes its frame
    at the end (:func:`metric_rows` makes it a frame now).

    >>> frame = metric_rows(3, {"train_loss": 0.5, "test_acc": 0.9})
    >>> frame.dtypes.astype(str).tolist(), frame["layer"].tolist()
    (['int64', 'object', 'float64', 'str', 'float64'], [None, None])
    """
    n = len(values)
    return Rows(
        step,
        {
            "layer": [None] * n,
            "depth": [float("nan")] * n,
            "metric": list(values),
            "value": list(values.values()),
        },
    )


def train(
    model: nn.Module,
    train_split: tuple[torch.Tensor, torch.Tensor],
    test_split: tuple[torch.Tensor, torch.Tensor],
    *,
    optimizer: torch.optim.Optimizer,
    steps: int,
    batch_size: int,
    seed: int,
    measure_steps: set[int],
    measure: Measure | None = None,
    regnorm_lambda: float = 0.0,
    eval_batch_size: int = 512,
    eval_train_samples: int = 1024,
    batch_stats_size: int | None = None,
    batch_stats_batches: tuple[Sequence[torch.Tensor], Sequence[torch.Tensor]] | None = None,
    batches: Iterator[torch.Tensor] | None = None,
    progress: Callable[[int, float], None] | None = None,
    val_split: tuple[torch.Tensor, torch.Tensor] | None = None,
) -> TrainOutcome:
    """Train for ``steps`` updates, measuring at ``measure_steps``; stop at a non-finite loss
    (or when ``measure`` raises :class:`MeasurementDiverged`).

    Records ``batch_loss`` at every update and, at each measured step,
    ``train_loss``, ``train_acc`` (on the first ``eval_train_samples``
    training examples), ``test_loss`` and ``test_acc`` (eval mode; for
    next-token targets ``(N, T)`` means per token, and ``train_perplexity``
    and ``test_perplexity``, ``exp`` of the mean token cross-entropy), plus
    whatever ``measure(step, model)`` returns. With ``batch_stats_size``,
    also ``train_loss_batchstats``, ``train_acc_batchstats``,
    ``test_loss_batchstats`` and ``test_acc_batchstats``
    (:func:`evaluate_batch_stats` with batches of that size), or with
    ``batch_stats_batches`` = (index batches into the first
    ``eval_train_samples`` training examples, index batches into the test
    set), the same four on those batches. With ``val_split`` (examples held
    out of training), also ``val_loss`` and ``val_acc`` (and
    ``val_perplexity`` for next-token targets), evaluated like the test set.

    ``batches`` yields the index batches to train on (e.g.
    :func:`label_minibatches`); default: :func:`minibatches` of
    ``batch_size`` seeded with ``seed``. Grads are set to None before the
    first update and after each one, so ``measure`` sees a model without
    grads, and the model ends without them.
    """
    start = time.perf_counter()
    device = next(model.parameters()).device
    x_train, y_train = train_split
    per_token = y_train.dim() > 1  # next-token targets (N, T): language modelling
    x_eval, y_eval = x_train[:eval_train_samples], y_train[:eval_train_samples]
    if batches is None:
        batches = minibatches(len(x_train), batch_size, torch.Generator().manual_seed(seed))
    frames: list[pd.DataFrame | Rows] = []  # made one frame per run, at the end
    losses: list[float] = []
    measure_seconds = 0.0

    def record(step: int) -> None:
        nonlocal measure_seconds
        t0 = time.perf_counter()
        train_loss, train_acc = evaluate(model, x_eval, y_eval, batch_size=eval_batch_size)
        test_loss, test_acc = evaluate(model, *test_split, batch_size=eval_batch_size)
        values = {
            "train_loss": train_loss,
            "train_acc": train_acc,
            "test_loss": test_loss,
            "test_acc": test_acc,
        }
        if per_token:
            values["train_perplexity"] = _perplexity(train_loss)
            values["test_perplexity"] = _perplexity(test_loss)
        if val_split is not None:
            val_loss, val_acc = evaluate(model, *val_split, batch_size=eval_batch_size)
            values["val_loss"], values["val_acc"] = val_loss, val_acc
            if per_token:
                values["val_perplexity"] = _perplexity(val_loss)
        frames.append(metric_block(step, values))
        if batch_stats_size is not None or batch_stats_batches is not None:
            on_train, on_test = batch_stats_batches or (None, None)
            train_loss, train_acc = evaluate_batch_stats(
                model, x_eval, y_eval, batch_size=batch_stats_size, batches=on_train
            )
            test_loss, test_acc = evaluate_batch_stats(
                model, *test_split, batch_size=batch_stats_size, batches=on_test
            )
            frames.append(
                metric_block(
                    step,
                    {
                        "train_loss_batchstats": train_loss,
                        "train_acc_batchstats": train_acc,
                        "test_loss_batchstats": test_loss,
                        "test_acc_batchstats": test_acc,
                    },
                )
            )
        if measure is not None:
            frames.extend(measure(step, model))
        measure_seconds += time.perf_counter() - t0

    def outcome(status: Literal["done", "diverged"], step: int | None) -> TrainOutcome:
        return TrainOutcome(
            status, _finish(frames, losses), step, time.perf_counter() - start, measure_seconds
        )

    model.train()
    # Grads are dropped right after each update (and once before the first), not just before
    # the next backward: the same updates, and a measurement between two updates finds no
    # grads for the probes to copy and put back.
    optimizer.zero_grad(set_to_none=True)
    for step in range(steps + 1):
        if step in measure_steps:
            try:
                record(step)
            except MeasurementDiverged:
                return outcome("diverged", step)
        if step == steps:
            break
        index = next(batches)
        xb, yb = x_train[index].to(device), y_train[index].to(device)
        loss = training_loss(model, prediction(model(xb)), yb, regnorm_lambda)
        value = loss.item()
        losses.append(value)
        if not math.isfinite(value):
            return outcome("diverged", step)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        if progress is not None:
            progress(step + 1, value)
    return outcome("done", None)


def _finish(frames: list[pd.DataFrame | Rows], losses: list[float]) -> list[pd.DataFrame | Rows]:
    """Append the per-update minibatch losses as one frame."""
    if losses:
        frames = [
            *frames,
            pd.DataFrame(
                {
                    "step": range(len(losses)),
                    "layer": None,
                    "depth": float("nan"),
                    "metric": "batch_loss",
                    "value": losses,
                }
            ),
        ]
    return frames
