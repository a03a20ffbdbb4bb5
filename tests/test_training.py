"""Training features: the label sampler, evaluation with batch statistics, per-token losses."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from normprobe.models import build_model
from normprobe.state import frozen_statistics
from normprobe.training import (
    cross_entropy,
    evaluate,
    evaluate_batch_stats,
    label_grouped_batches,
    label_minibatches,
    make_optimizer,
    minibatches,
    train,
)


def _labels(sizes: list[int]) -> torch.Tensor:
    """Labels with the given class sizes, shuffled."""
    y = torch.cat([torch.full((n,), c) for c, n in enumerate(sizes)])
    return y[torch.randperm(len(y), generator=torch.Generator().manual_seed(1))]


def _take(it, count: int) -> list[torch.Tensor]:
    return [next(it) for _ in range(count)]


def test_label_sampler_draws_k_distinct_labels_with_n_examples_each() -> None:
    y = _labels([9, 12, 7, 10, 8])
    for batch in _take(label_minibatches(y, 3, 2, torch.Generator().manual_seed(0)), 200):
        assert len(batch) == 6
        counts = torch.bincount(y[batch], minlength=5)
        assert sorted(counts.tolist()) == [0, 0, 2, 2, 2]
        # grouped by label: consecutive pairs share a label
        assert (y[batch][0::2] == y[batch][1::2]).all()


def test_label_sampler_is_seeded_and_uses_each_label_without_replacement() -> None:
    y = _labels([9, 12, 7, 10, 8])
    a = _take(label_minibatches(y, 2, 3, torch.Generator().manual_seed(5)), 50)
    b = _take(label_minibatches(y, 2, 3, torch.Generator().manual_seed(5)), 50)
    c = _take(label_minibatches(y, 2, 3, torch.Generator().manual_seed(6)), 50)
    assert all(torch.equal(p, q) for p, q in zip(a, b))
    assert not all(torch.equal(p, q) for p, q in zip(a, c))
    # per label: the first floor(size / n) draws of 3 examples never repeat an example
    for label, size in enumerate([9, 12, 7, 10, 8]):
        drawn = torch.cat([batch[y[batch] == label] for batch in a])
        first_epoch = drawn[: (size // 3) * 3]
        assert len(first_epoch.unique()) == len(first_epoch)
        assert set(drawn.tolist()) <= set(torch.nonzero(y == label).flatten().tolist())
    # labels are drawn uniformly: every label appears
    assert set(torch.cat([y[batch] for batch in a]).tolist()) == set(range(5))


def test_label_sampler_refuses_what_the_data_cannot_give() -> None:
    y = _labels([4, 4, 2])
    with pytest.raises(ValueError, match="more than the 3 labels"):
        next(label_minibatches(y, 4, 1, torch.Generator()))
    with pytest.raises(ValueError, match="2 training examples of label 2"):
        next(label_minibatches(y, 2, 3, torch.Generator()))


def test_iid_sampler_unchanged() -> None:
    it = minibatches(10, 4, torch.Generator().manual_seed(0))
    g = torch.Generator().manual_seed(0)
    order = torch.randperm(10, generator=g)
    assert torch.equal(next(it), order[:4]) and torch.equal(next(it), order[4:8])


def _trained(norm: str, steps: int = 30):
    """A small MLP trained a few steps on separable blobs, and a test set."""
    g = torch.Generator().manual_seed(0)
    centers = torch.randn(4, 10, generator=g) * 3
    y = torch.arange(400) % 4
    x = centers[y] + torch.randn(400, 10, generator=g)
    model = build_model("mlp", norm, seed=0, input_shape=(10,), num_classes=4, depth=3, width=32)
    opt = make_optimizer("sgd", model.parameters(), lr=0.05)
    model.train()
    for index in _take(minibatches(300, 32, torch.Generator().manual_seed(1)), steps):
        loss = F.cross_entropy(model(x[index]), y[index])
        opt.zero_grad()
        loss.backward()
        opt.step()
    return model, x[300:], y[300:]


def _state(model) -> dict[str, torch.Tensor]:
    return {k: v.clone() for k, v in model.state_dict().items()}


def test_batch_stats_evaluation_equals_a_hand_computation_and_changes_nothing() -> None:
    model, x, y = _trained("batch")
    model.eval()
    before = _state(model)
    rng = torch.get_rng_state()
    loss, acc = evaluate_batch_stats(model, x, y, batch_size=8)
    after = model.state_dict()
    assert before.keys() == after.keys()
    assert all(torch.equal(before[k], after[k]) for k in before)  # bit for bit
    assert not model.training and torch.equal(torch.get_rng_state(), rng)

    clone = build_model("mlp", "batch", seed=0, input_shape=(10,), num_classes=4, depth=3, width=32)
    clone.load_state_dict(before)
    outs = []
    with torch.no_grad(), frozen_statistics(clone):
        clone.train()
        for start in range(0, len(x), 8):  # 100 examples: 12 batches of 8 and one of 4
            outs.append(clone(x[start : start + 8]))
    out = torch.cat(outs)
    assert loss == pytest.approx(F.cross_entropy(out, y).item(), rel=1e-6)
    assert acc == (out.argmax(1) == y).float().mean().item()
    assert all(torch.equal(before[k], v) for k, v in clone.state_dict().items())


def test_a_last_batch_of_one_joins_the_one_before() -> None:
    model, x, y = _trained("batch", steps=5)
    loss, acc = evaluate_batch_stats(model, x[:9], y[:9], batch_size=2)  # 2,2,2,3
    with torch.no_grad(), frozen_statistics(model):
        model.train()
        out = torch.cat([model(x[s:e]) for s, e in [(0, 2), (2, 4), (4, 6), (6, 9)]])
    assert loss == pytest.approx(F.cross_entropy(out, y[:9]).item(), rel=1e-6)


def test_batchnorm_batch_stats_differ_from_eval_mode_on_tiny_test_batches() -> None:
    model, x, y = _trained("batch")
    eval_loss, eval_acc = evaluate(model, x, y)
    bs_loss, bs_acc = evaluate_batch_stats(model, x, y, batch_size=2)
    assert eval_acc > 0.9
    assert bs_acc < eval_acc - 0.05 and bs_loss > eval_loss
    # with large batches the batch statistics are close to the running ones
    big_loss, big_acc = evaluate_batch_stats(model, x, y, batch_size=100)
    assert abs(big_acc - eval_acc) < 0.05


def test_without_batch_statistics_both_evaluations_agree() -> None:
    model, x, y = _trained("layer")
    eval_loss, eval_acc = evaluate(model, x, y)
    bs_loss, bs_acc = evaluate_batch_stats(model, x, y, batch_size=2)
    assert bs_acc == eval_acc and bs_loss == pytest.approx(eval_loss, rel=1e-5)


def test_microbatch_models_evaluate_every_example_in_whole_microbatches() -> None:
    """A last batch that is not a multiple of norm_batch is widened backwards, not crashed on."""
    from normprobe.training import _split, norm_batch_of

    assert _split(10, 4, 4) == [(0, 4, 0), (4, 8, 4), (6, 10, 8)]
    assert _split(9, 6, 3) == [(0, 6, 0), (3, 9, 6)]  # every batch the same size
    assert _split(11, 6, 3) == [(0, 6, 0), (5, 11, 6)]
    assert _split(359, 512, 4) == [(0, 356, 0), (3, 359, 356)]  # fewer than a batch
    assert _split(10, 6, 4) == [(0, 4, 0), (4, 8, 4), (6, 10, 8)]  # 6 rounded down to 4
    with pytest.raises(ValueError, match="cannot fill one microbatch"):
        _split(3, 4, 4)

    model, x, y = _trained("batch-train")  # eval mode: the eval batch's microbatch statistics
    x, y = x[:70], y[:70]
    options = {"norm_options": {"norm_batch": 4}}
    ghost = build_model(
        "mlp", "batch-train", seed=0, input_shape=(10,), num_classes=4, depth=3, width=32, **options
    )
    ghost.load_state_dict(model.state_dict())
    assert norm_batch_of(ghost) == 4 and norm_batch_of(model) is None
    before = _state(ghost)
    loss, acc = evaluate(ghost, x, y, batch_size=16)  # 16, 16, 16, 16, then 6 -> 16 wide
    bs_loss, bs_acc = evaluate_batch_stats(ghost, x, y, batch_size=16)
    assert all(torch.equal(before[k], v) for k, v in ghost.state_dict().items())
    with torch.no_grad():
        ghost.eval()
        outs = [ghost(x[s : s + 16]) for s in range(0, 64, 16)]
        outs.append(ghost(x[54:70])[10:])
    out = torch.cat(outs)
    assert len(out) == 70
    assert loss == pytest.approx(F.cross_entropy(out, y).item(), rel=1e-6)
    assert acc == (out.argmax(1) == y).float().mean().item()
    # batch-train in eval mode is the same normalization as train mode with frozen statistics
    assert bs_loss == pytest.approx(loss, rel=1e-5) and bs_acc == acc


@pytest.mark.parametrize(
    ("sizes", "k", "n", "expected"),
    [
        ([36, 36, 35, 37, 9], 4, 8, 4),  # chunks 4,4,4,4,1: 17 chunks make 4 batches of 4
        ([5, 5, 5], 2, 2, 3),  # chunks 2,2,2: all 6 used, never two of one label together
        ([20, 2, 2], 2, 2, 2),  # label 0 has 10 chunks, but only 2 partners
    ],
)
def test_grouped_eval_batches_are_label_grouped_and_use_each_example_once(
    sizes, k, n, expected
) -> None:
    y = _labels(sizes)
    batches = label_grouped_batches(y, k, n, torch.Generator().manual_seed(3))
    used = torch.cat(batches)
    assert len(used.unique()) == len(used)  # no example twice
    for batch in batches:
        counts = torch.bincount(y[batch])
        assert len(batch) == k * n and sorted(counts[counts > 0].tolist()) == [n] * k
    assert len(batches) == expected  # the most batches these chunks can make
    again = label_grouped_batches(y, k, n, torch.Generator().manual_seed(3))
    assert all(torch.equal(a, b) for a, b in zip(batches, again, strict=True))


def test_batch_stats_evaluation_on_given_batches_equals_a_hand_computation() -> None:
    model, x, y = _trained("batch")
    before = _state(model)
    batches = [torch.tensor([0, 5, 9, 11]), torch.tensor([2, 3, 50, 60, 70, 80])]
    loss, acc = evaluate_batch_stats(model, x, y, batches=batches)
    clone = build_model("mlp", "batch", seed=0, input_shape=(10,), num_classes=4, depth=3, width=32)
    clone.load_state_dict(before)
    with torch.no_grad(), frozen_statistics(clone):
        clone.train()
        out = torch.cat([clone(x[b]) for b in batches])
    target = y[torch.cat(batches)]
    assert loss == pytest.approx(F.cross_entropy(out, target).item(), rel=1e-6)
    assert acc == int((out.argmax(1) == target).sum()) / len(target)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    with pytest.raises(ValueError, match="batch_size or batches"):
        evaluate_batch_stats(model, x, y)


# --------------------------------------------------------------------------- language models


def _lm(norm: str = "layer"):
    return build_model(
        "transformer", norm, seed=0, num_classes=16, context=6, depth=1, width=8, heads=2
    )


def test_token_cross_entropy_is_the_mean_over_every_token() -> None:
    g = torch.Generator().manual_seed(0)
    out, y = torch.randn(3, 5, 7, generator=g), torch.randint(0, 7, (3, 5), generator=g)
    per_token = [
        F.cross_entropy(out[i, t][None], y[i, t][None]) for i in range(3) for t in range(5)
    ]
    mean = cross_entropy(out, y, classes_last=True)
    torch.testing.assert_close(mean, torch.stack(per_token).mean())
    torch.testing.assert_close(
        cross_entropy(out, y, classes_last=True, reduction="sum"), torch.stack(per_token).sum()
    )
    # T == K: the model's declaration, not the shapes, says where the classes are
    square = torch.randn(2, 4, 4, generator=g)
    target = torch.randint(0, 4, (2, 4), generator=g)
    assert not torch.equal(
        cross_entropy(square, target, classes_last=True), cross_entropy(square, target)
    )
    with pytest.raises(ValueError, match=r"targets \(3, 5\) want scores \(3, 5, 'K'\)"):
        cross_entropy(out[:, :4], y, classes_last=True)


def test_evaluate_a_language_model_per_token_and_record_perplexity() -> None:
    model = _lm()
    g = torch.Generator().manual_seed(0)
    x = torch.randint(0, 16, (10, 6), generator=g)
    y = torch.randint(0, 16, (10, 6), generator=g)
    loss, acc = evaluate(model, x, y, batch_size=4)
    with torch.no_grad():
        model.eval()
        out = model(x)
    torch.testing.assert_close(
        torch.tensor(loss), F.cross_entropy(out.reshape(-1, 16), y.reshape(-1)), rtol=1e-6, atol=0
    )
    assert acc == pytest.approx(float((out.argmax(-1) == y).float().mean()))
    fresh = _lm()
    outcome = train(
        fresh,
        (x, y),
        (x[:4], y[:4]),
        optimizer=torch.optim.Adam(fresh.parameters(), lr=1e-3),
        steps=2,
        batch_size=4,
        seed=0,
        measure_steps={0, 2},
    )
    rows = outcome.frames[0].set_index("metric")["value"]
    assert rows["test_perplexity"] == pytest.approx(torch.tensor(rows["test_loss"]).exp().item())
    assert rows["train_perplexity"] == pytest.approx(torch.tensor(rows["train_loss"]).exp().item())


def test_classifier_tables_get_no_perplexity() -> None:
    model = build_model("mlp", "layer", seed=0, depth=1, width=8, input_shape=4, num_classes=3)
    g = torch.Generator().manual_seed(0)
    x, y = torch.randn(12, 4, generator=g), torch.randint(0, 3, (12,), generator=g)
    outcome = train(
        model,
        (x, y),
        (x, y),
        optimizer=make_optimizer("sgd", model.parameters(), lr=0.1),
        steps=1,
        batch_size=4,
        seed=0,
        measure_steps={0},
    )
    assert set(outcome.frames[0]["metric"]) == {"train_loss", "train_acc", "test_loss", "test_acc"}


def test_training_updates_from_fresh_grads_and_measures_a_model_without_grads() -> None:
    """Grads are dropped after each update: the updates are those of plain SGD from fresh
    grads (a model that came in with grads included), and every measurement finds none."""
    g = torch.Generator().manual_seed(0)
    x, y = torch.randn(16, 4, generator=g), torch.randint(0, 3, (16,), generator=g)
    model = build_model("mlp", "none", seed=0, depth=1, width=8, input_shape=4, num_classes=3)
    reference = build_model("mlp", "none", seed=0, depth=1, width=8, input_shape=4, num_classes=3)
    model(x).sum().backward()  # stale grads from before training must not leak into step 0
    seen: list[bool] = []

    def measure(step: int, m: torch.nn.Module) -> list:
        seen.append(any(p.grad is not None for p in m.parameters()))
        return []

    train(
        model,
        (x, y),
        (x, y),
        optimizer=torch.optim.SGD(model.parameters(), lr=0.1),
        steps=3,
        batch_size=4,
        seed=0,
        measure_steps={0, 1, 3},
        measure=measure,
    )
    assert seen == [False, False, False]
    batches = minibatches(16, 4, torch.Generator().manual_seed(0))
    for _ in range(3):  # the same three updates by hand
        i = next(batches)
        reference.zero_grad(set_to_none=True)
        cross_entropy(reference(x[i]), y[i]).backward()
        with torch.no_grad():
            for p in reference.parameters():
                p.add_(p.grad, alpha=-0.1)
    for p, q in zip(model.parameters(), reference.parameters()):
        torch.testing.assert_close(p, q, rtol=0, atol=0)


class _DropoutAlways(torch.nn.Module):
    """Monte Carlo dropout: a functional dropout that draws in eval mode too."""

    def __init__(self) -> None:
        super().__init__()
        self.fc1, self.fc2 = torch.nn.Linear(6, 16), torch.nn.Linear(16, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(F.dropout(torch.relu(self.fc1(x)), 0.3, training=True))


@pytest.mark.parametrize("which", ["evaluate", "evaluate_batch_stats"])
def test_evaluation_draws_from_its_own_seeded_stream(which: str) -> None:
    """A model that draws random numbers in eval mode neither moves the caller's random stream
    (which would change the training that follows) nor gives other values from call to call."""
    torch.manual_seed(0)
    model = _DropoutAlways()
    x, y = torch.randn(40, 6), torch.randint(0, 3, (40,))
    run = evaluate if which == "evaluate" else lambda *a: evaluate_batch_stats(*a, batch_size=20)
    state = torch.get_rng_state()
    first = run(model, x, y)
    assert torch.equal(torch.get_rng_state(), state)
    torch.rand(5)  # the caller's stream moves on; the evaluation's does not
    assert run(model, x, y) == first
    assert run(model, x, y) != evaluate(model, x, y, seed=1)  # the draws decide the value


@pytest.mark.parametrize("which", ["evaluate", "evaluate_batch_stats"])
def test_evaluation_inside_autocast_runs_in_the_models_dtype(which: str) -> None:
    torch.manual_seed(0)
    model = build_model("mlp", "batch", depth=3, width=32, input_shape=64, seed=0)
    x, y = torch.randn(300, 64), torch.randint(0, 10, (300,))
    run = evaluate if which == "evaluate" else lambda *a: evaluate_batch_stats(*a, batch_size=50)
    outside = run(model, x, y)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        inside = run(model, x, y)
    assert inside == outside
