"""The training loop of one run, with measurements at scheduled steps.

Step ``t`` means "after ``t`` optimizer updates": step 0 is the initialized
model. At every scheduled step the loop records train/test loss and accuracy
and calls the ``measure`` callback (probes, Hessian), which must leave the
model as it found it (``normprobe.state.preserved``) and use its own random
generators, so measuring never changes the training trajectory.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Literal

import pandas as pd
import torch
import torch.nn.functional as F
from torch import nn

from normprobe.state import preserved

__all__ = [
    "TrainOutcome",
    "minibatches",
    "evaluate",
    "make_optimizer",
    "train",
    "training_loss",
]

Measure = Callable[[int, nn.Module], list[pd.DataFrame]]


@dataclass
class TrainOutcome:
    """What a run produced: its status, tidy metric rows and timings."""

    status: Literal["done", "diverged"]
    frames: list[pd.DataFrame] = field(default_factory=list)
    diverged_step: int | None = None
    seconds: float = 0.0
    measure_seconds: float = 0.0


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


def training_loss(
    model: nn.Module, output: torch.Tensor, target: torch.Tensor, lam: float
) -> torch.Tensor:
    """Cross-entropy plus ``lam`` times the RegNorm penalties of the last forward pass."""
    from normprobe.norms import regularization

    loss = F.cross_entropy(output, target)
    if lam:
        loss = loss + lam * regularization(model)
    return loss


@torch.no_grad()
def evaluate(
    model: nn.Module, x: torch.Tensor, y: torch.Tensor, *, batch_size: int = 512
) -> tuple[float, float]:
    """Mean cross-entropy and accuracy in eval mode, in batches; the model is left as found."""
    device = next(model.parameters()).device
    total_loss, correct = 0.0, 0
    with preserved(model):
        model.eval()
        for start in range(0, len(x), batch_size):
            xb = x[start : start + batch_size].to(device)
            yb = y[start : start + batch_size].to(device)
            out = model(xb)
            total_loss += F.cross_entropy(out, yb, reduction="sum").item()
            correct += int((out.argmax(dim=1) == yb).sum())
    return total_loss / len(x), correct / len(x)


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


def _rows(step: int, values: dict[str, float]) -> pd.DataFrame:
    return pd.DataFrame(
        {
            "step": step,
            "layer": None,
            "depth": float("nan"),
            "metric": list(values),
            "value": list(values.values()),
        }
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
    progress: Callable[[int, float], None] | None = None,
) -> TrainOutcome:
    """Train for ``steps`` updates, measuring at ``measure_steps``; stop at a non-finite loss.

    Records ``batch_loss`` at every update and, at each measured step,
    ``train_loss``, ``train_acc`` (on the first ``eval_train_samples``
    training examples), ``test_loss`` and ``test_acc`` (eval mode), plus
    whatever ``measure(step, model)`` returns.
    """
    start = time.perf_counter()
    device = next(model.parameters()).device
    x_train, y_train = train_split
    x_eval, y_eval = x_train[:eval_train_samples], y_train[:eval_train_samples]
    batches = minibatches(len(x_train), batch_size, torch.Generator().manual_seed(seed))
    frames: list[pd.DataFrame] = []
    losses: list[float] = []
    measure_seconds = 0.0

    def record(step: int) -> None:
        nonlocal measure_seconds
        t0 = time.perf_counter()
        train_loss, train_acc = evaluate(model, x_eval, y_eval, batch_size=eval_batch_size)
        test_loss, test_acc = evaluate(model, *test_split, batch_size=eval_batch_size)
        frames.append(
            _rows(
                step,
                {
                    "train_loss": train_loss,
                    "train_acc": train_acc,
                    "test_loss": test_loss,
                    "test_acc": test_acc,
                },
            )
        )
        if measure is not None:
            frames.extend(measure(step, model))
        measure_seconds += time.perf_counter() - t0

    model.train()
    for step in range(steps + 1):
        if step in measure_steps:
            record(step)
        if step == steps:
            break
        index = next(batches)
        xb, yb = x_train[index].to(device), y_train[index].to(device)
        loss = training_loss(model, model(xb), yb, regnorm_lambda)
        value = loss.item()
        losses.append(value)
        if not math.isfinite(value):
            return TrainOutcome(
                "diverged",
                _finish(frames, losses),
                step,
                time.perf_counter() - start,
                measure_seconds,
            )
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        if progress is not None:
            progress(step + 1, value)
    return TrainOutcome(
        "done", _finish(frames, losses), None, time.perf_counter() - start, measure_seconds
    )


def _finish(frames: list[pd.DataFrame], losses: list[float]) -> list[pd.DataFrame]:
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
