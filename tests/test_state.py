"""normprobe.state.preserved puts back everything a probe can change, for every normalizer."""

from __future__ import annotations

import pytest
import torch

import normprobe
from normprobe.state import preserved


def _state(model: torch.nn.Module) -> dict[str, object]:
    return {
        "tensors": {k: v.clone() for k, v in model.state_dict().items()},
        "grads": {
            n: None if p.grad is None else p.grad.clone() for n, p in model.named_parameters()
        },
        "flags": {n: m.training for n, m in model.named_modules()},
        "requires_grad": {n: p.requires_grad for n, p in model.named_parameters()},
    }


def _assert_same(a: dict, b: dict) -> None:
    assert a["tensors"].keys() == b["tensors"].keys()
    for k in a["tensors"]:
        assert torch.equal(a["tensors"][k], b["tensors"][k]), k
    for k in a["grads"]:
        ga, gb = a["grads"][k], b["grads"][k]
        assert (ga is None) == (gb is None), k
        assert ga is None or torch.equal(ga, gb), k
    assert a["flags"] == b["flags"] and a["requires_grad"] == b["requires_grad"]


@pytest.mark.parametrize("norm", [n for n in normprobe.normalizers() if n != "instance"])
def test_forward_backward_and_mode_changes_are_undone(norm: str) -> None:
    model = normprobe.build_model("mlp", norm, seed=0, depth=3, width=16, input_shape=5)
    x = torch.rand(8, 5)
    model(x).sum().backward()  # some grads exist, ...
    model.blocks[0].affine.zero_grad(set_to_none=True)  # ... some are None
    model.blocks[1].eval()  # mixed train/eval flags
    next(model.head.parameters()).requires_grad_(False)
    before = _state(model)
    with preserved(model):
        model.train()
        for p in model.parameters():
            p.requires_grad_(True)
        for _ in range(3):
            model(x * 3 + 1).square().sum().backward()
    _assert_same(before, _state(model))


def test_restored_even_when_the_block_raises() -> None:
    bn = torch.nn.BatchNorm1d(3)
    with pytest.raises(ValueError, match="boom"):
        with preserved(bn):
            bn(torch.randn(4, 3) + 2)
            raise ValueError("boom")
    assert torch.equal(bn.running_mean, torch.zeros(3)) and int(bn.num_batches_tracked) == 0


def test_in_place_parameter_changes_are_reported_not_hidden() -> None:
    lin = torch.nn.Linear(2, 2)
    with pytest.raises(RuntimeError, match="weight .*modified in place"):
        with preserved(lin):
            with torch.no_grad():
                lin.weight.add_(1.0)


class _MaxNorm(torch.nn.Linear):
    """A max-norm constraint applied in forward, as some papers' code does."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():
            self.weight.renorm_(2, 0, 0.5)
        return super().forward(x)


def test_a_forward_that_writes_its_parameters_is_named_as_the_writer() -> None:
    """The message used to call it a bug in normprobe, as a bare RuntimeError."""
    from normprobe.errors import NormprobeError

    x, y = torch.randn(8, 3), torch.arange(8) % 2
    for measure in (
        lambda m: normprobe.gradient_norms(m, torch.nn.functional.cross_entropy, (x, y)),
        lambda m: normprobe.hessian_spectrum(
            m, torch.nn.functional.cross_entropy, (x, y), what="top", k=1
        ),
    ):
        torch.manual_seed(0)
        model = torch.nn.Sequential(_MaxNorm(3, 4), torch.nn.ReLU(), torch.nn.Linear(4, 2))
        with pytest.raises(NormprobeError, match=r"^parameters 0.weight were modified in place "
                           r"during normprobe's passes .* the model's forward pass does .* after "
                           r"the optimizer step rather than in forward"):  # fmt: skip
            measure(model)


@pytest.mark.parametrize("norm", [n for n in normprobe.normalizers() if n != "instance"])
def test_frozen_statistics_use_batch_statistics_and_touch_no_buffer(norm: str) -> None:
    from normprobe.state import frozen_statistics

    model = normprobe.build_model("mlp", norm, seed=0, depth=3, width=16, input_shape=5)
    x = torch.rand(8, 5) + 0.5
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with frozen_statistics(model):
        frozen = model(x)
        model(x * 2)
    for k, v in model.state_dict().items():
        assert torch.equal(before[k], v), (norm, k)
    # the frozen pass computed exactly what an ordinary train-mode pass computes
    assert torch.equal(frozen, model(x))
    assert all(m.track_running_stats for m in model.modules() if hasattr(m, "track_running_stats"))


def test_held_restores_what_a_covered_block_moved_and_everything_on_exit() -> None:
    from normprobe.probes.capture import session
    from normprobe.state import held

    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.BatchNorm1d(4), torch.nn.Linear(4, 2))
    net(torch.randn(8, 3)).sum().backward()
    net.eval()
    grads = [p.grad.clone() for p in net.parameters()]
    running = net[1].running_mean.clone()
    with held(net):
        with session(net, "train"):
            net[1].running_mean.add_(1.0)  # moved inside a covered block: put back at its end
            net[0].weight.grad.mul_(2.0)
            net[2].bias.grad = None
            net[0].extra = 1  # a plain attribute: put back when held ends
        assert not net.training and torch.equal(net[1].running_mean, running)
        assert all(torch.equal(p.grad, g) for p, g in zip(net.parameters(), grads))
        assert net[0].extra == 1
        with session(net, "train"):  # a second covered block sees the model as found
            assert torch.equal(net[1].running_mean, running)
    assert not hasattr(net[0], "extra") and not net.training
    assert all(torch.equal(p.grad, g) for p, g in zip(net.parameters(), grads))


def test_a_block_nested_in_a_covered_block_puts_back_the_outer_blocks_state() -> None:
    """A probe run inside another probe's session (a shared pass) restores the model as the
    outer block left it, not as held found it, copying only what the outer block changed."""
    from normprobe.probes.capture import session
    from normprobe.state import _HELD, held, snapshot_since

    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.BatchNorm1d(4), torch.nn.Linear(4, 2))
    net(torch.randn(8, 3)).sum().backward()
    net[2].bias.grad = None
    original = _state(net)
    with held(net):
        with session(net, "train"):
            net[1].running_mean.add_(1.0)  # the outer block's changes ...
            net[0].weight.grad.mul_(2.0)
            net[2].bias.grad = torch.ones(2)
            net[0].outer = 1
            inside_outer = _state(net)
            # only what the outer block changed is copied; the rest shares held's copies
            since = snapshot_since(_HELD[id(net)][1])
            earlier = _HELD[id(net)][1]
            held_copies = {id(s) for *_, s in earlier.grads + earlier.buffers}
            fresh = [s for _, _, s in since.grads] + [s for *_, s in since.buffers]
            assert sum(s is not None and id(s) not in held_copies for s in fresh) == 3
            with session(net, "train"):  # ... survive a nested block's own changes
                for p in net.parameters():
                    p.requires_grad_(False)
                net[1].running_mean.mul_(5.0)
                net[1].running_var.add_(3.0)
                net[0].weight.grad.add_(7.0)
                net[2].bias.grad.add_(1.0)
                net[0].bias.grad = None
                net[0].outer = 2
                net[0].inner = 3
            _assert_same(inside_outer, _state(net))
            assert net[0].outer == 1 and not hasattr(net[0], "inner")
    _assert_same(original, _state(net))
    assert not hasattr(net[0], "outer")


class _Scaled(torch.nn.Module):
    """A layer whose output is multiplied by a buffer: autograd saves the buffer."""

    def __init__(self) -> None:
        super().__init__()
        self.lin = torch.nn.Linear(4, 3)
        self.register_buffer("scale", torch.full((3,), 2.0))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.lin(x) * self.scale


@pytest.mark.parametrize("between", ["held", "preserved", "representation", "gradients"])
def test_a_graph_built_before_a_probe_still_differentiates(between: str) -> None:
    """A loop that measures between its forward pass and ``loss.backward()`` (``monitor.step(
    step, batch_loss=loss.item())`` right after the loss): buffers the probe left at their
    values are not written back, so the graph's saved tensors keep their versions."""
    from normprobe.state import frozen_statistics, held

    torch.manual_seed(0)
    net = torch.nn.Sequential(
        torch.nn.Linear(4, 4), torch.nn.BatchNorm1d(4), torch.nn.ReLU(), _Scaled()
    )
    x, y = torch.randn(8, 4), torch.randint(0, 3, (8,))
    reference = torch.nn.functional.cross_entropy(net(x), y)
    expected = torch.autograd.grad(reference, list(net.parameters()))
    loss = torch.nn.functional.cross_entropy(net(x), y)
    before = _state(net)
    if between in ("held", "preserved"):
        with (held if between == "held" else preserved)(net), frozen_statistics(net):
            net(x)  # a pass that leaves every buffer's values as they were
    elif between == "representation":
        normprobe.representation_correlation(net, x)
    else:
        normprobe.gradient_norms(net, torch.nn.functional.cross_entropy, (x, y))
    _assert_same(before, _state(net))
    loss.backward()
    assert all(torch.equal(p.grad, g) for p, g in zip(net.parameters(), expected))


def test_values_written_through_data_are_still_put_back() -> None:
    """A write through ``.data`` moves no version counter: the values are compared."""
    from normprobe.state import held

    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.BatchNorm1d(4))
    net(torch.randn(8, 3)).sum().backward()
    original = _state(net)
    for block in (held, preserved):
        with block(net):
            net[1].running_mean.data.add_(1.0)
            net[0].weight.grad.data.mul_(3.0)
        _assert_same(original, _state(net))
