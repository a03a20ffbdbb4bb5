"""Every registered normalizer: builds for dense and conv, trains, saves, and fails clearly."""

from __future__ import annotations

import copy
import io
import pickle

import pytest
import torch
from torch import nn

import normprobe
from normprobe import norms
from normprobe.errors import NormalizerError, UnknownNameError
from normprobe.norms.balanced import BalancedInputWarning

ALL = norms.normalizers()
DESIGN_TABLE = [
    "none", "batch", "batch-train", "layer", "group", "instance", "weight", "scaled-weight",
    "weight-meanbn", "bmlv", "lmbv", "prelayer", "regnorm", "preregnorm", "batch-renorm", "rms",
    "balanced",
]  # fmt: skip
BATCH_STATS = ["batch", "batch-train", "bmlv", "lmbv", "batch-renorm", "weight-meanbn"]


def _layer(name: str, kind: str, seed: int = 0) -> tuple[nn.Module, torch.Tensor]:
    torch.manual_seed(seed)
    if kind == "dense":
        affine, x = nn.Linear(6, 8), torch.rand(10, 6) + 0.1
    else:
        affine, x = nn.Conv2d(3, 8, 3, padding=1), torch.rand(4, 3, 5, 5) + 0.1
    return norms.build(name, affine, nn.ReLU(), layer_name="blocks.0"), x


def _kinds(name: str) -> list[str]:
    return ["dense", "conv"] if norms.spec(name).dense else ["conv"]


CASES = [(n, k) for n in ALL for k in _kinds(n)]


def test_registry_holds_the_normalizers_of_design_and_the_equinorm_alias() -> None:
    assert ALL == DESIGN_TABLE == normprobe.normalizers()
    assert norms.spec("equinorm") is norms.spec("balanced")
    assert norms.NORMS.aliases()["equinorm"] == "balanced"
    for name in ALL:
        summary = norms.spec(name).summary
        assert "eval" in summary and len(summary.splitlines()) == 1, name


@pytest.mark.parametrize("name,kind", CASES)
def test_forward_backward_train_and_eval(name: str, kind: str) -> None:
    layer, x = _layer(name, kind)
    for training in (True, False):
        layer.train(training)
        layer.zero_grad()
        xi = x.clone().requires_grad_(True)
        y = layer(xi)
        assert y.shape[:2] == (x.shape[0], 8)
        assert torch.isfinite(y).all()
        (y * torch.linspace(-1, 1, y.numel()).reshape(y.shape)).sum().backward()
        assert torch.isfinite(xi.grad).all() and xi.grad.abs().sum() > 0
        for pname, p in layer.named_parameters():
            assert p.grad is not None and torch.isfinite(p.grad).all(), (name, pname)


@pytest.mark.parametrize("name,kind", CASES)
def test_state_dict_round_trip_reproduces_the_layer_exactly(name: str, kind: str) -> None:
    layer, x = _layer(name, kind)
    opt = torch.optim.SGD(layer.parameters(), lr=0.1)
    for step in range(3):  # running statistics, counters and weights all move
        opt.zero_grad()
        layer((x + step) * (1 + step)).pow(2).mean().backward()
        opt.step()
    buf = io.BytesIO()
    torch.save(layer.state_dict(), buf)
    fresh, _ = _layer(name, kind, seed=1)
    buf.seek(0)
    fresh.load_state_dict(torch.load(buf))
    for training in (False, True):
        layer.train(training), fresh.train(training)
        assert torch.equal(layer(x), fresh(x)), (name, training)


@pytest.mark.parametrize("name", ALL)
def test_running_statistics_and_counters_are_buffers(name: str) -> None:
    layer, _ = _layer(name, "conv")
    buffers = dict(layer.named_buffers())
    state = layer.state_dict()
    for key in buffers:
        assert key in state
    expected = {
        "batch": {"norm.running_mean", "norm.running_var", "norm.num_batches_tracked"},
        "batch-train": {"norm.running_mean", "norm.running_var", "norm.num_batches_tracked"},
        "bmlv": {"norm.running_mean", "norm.num_batches_tracked"},
        "lmbv": {"norm.running_var", "norm.num_batches_tracked"},
        "weight-meanbn": {"norm.running_mean", "norm.num_batches_tracked"},
        "batch-renorm": {
            "norm.running_mean", "norm.running_std", "norm.num_batches_tracked", "norm.total_steps",
        },
        "balanced": {"norm.running_input_sum", "norm.num_batches_tracked"},
    }.get(name, set())  # fmt: skip
    assert set(buffers) == expected


@pytest.mark.parametrize("name,kind", CASES)
def test_copy_and_pickle_after_a_forward_pass(name: str, kind: str) -> None:
    layer, x = _layer(name, kind)
    layer(x)  # RegNorm layers now hold a penalty with an autograd graph
    clone = copy.deepcopy(layer)
    layer.eval(), clone.eval()
    assert torch.equal(layer(x), clone(x))
    if name in ("weight", "scaled-weight", "weight-meanbn"):
        # torch serializes parametrized modules through state_dict() only
        return
    restored = pickle.loads(pickle.dumps(layer))
    restored.eval()
    assert torch.equal(layer(x), restored(x))


@pytest.mark.parametrize("name", ALL)
def test_float64_and_dtype_follow_the_affine_op(name: str) -> None:
    torch.manual_seed(0)
    layer = norms.build(name, nn.Conv2d(3, 8, 3).double())
    assert {p.dtype for p in layer.parameters()} == {torch.float64}
    assert layer(torch.rand(2, 3, 5, 5, dtype=torch.float64)).dtype == torch.float64


@pytest.mark.parametrize("name", BATCH_STATS)
@pytest.mark.parametrize("kind", ["dense", "conv"])
def test_batch_of_one_in_train_mode_names_the_layer_and_the_fix(name: str, kind: str) -> None:
    layer, x = _layer(name, kind)
    with pytest.raises(NormalizerError, match=r"blocks\.0.*batch of 1 .*model\.eval\(\)"):
        layer(x[:1])
    layer.eval()
    if name != "batch-train":  # eval mode uses running statistics: one example is fine
        assert torch.isfinite(layer(x[:1])).all()
    else:
        with pytest.raises(NormalizerError, match="batch of 1"):
            layer(x[:1])


@pytest.mark.parametrize("name", [n for n in ALL if n not in BATCH_STATS])
def test_normalizers_without_batch_statistics_accept_a_batch_of_one(name: str) -> None:
    for kind in _kinds(name):
        layer, x = _layer(name, kind)
        assert torch.isfinite(layer(x[:1])).all()


def test_instance_norm_on_a_dense_layer_is_refused_with_a_fix() -> None:
    with pytest.raises(NormalizerError, match=r"'blocks\.2' is dense.*use 'layer' or 'group'"):
        norms.build("instance", nn.Linear(4, 8), layer_name="blocks.2")
    with pytest.raises(NormalizerError, match="instance norm needs spatial axes"):
        norms.InstanceNorm(8)(torch.randn(4, 8))


def test_groups_that_do_not_divide_the_channels() -> None:
    with pytest.raises(NormalizerError, match=r"layer 'blocks\.1'.*groups=5 cannot split 12"):
        norms.build("group", nn.Conv2d(3, 12, 3), layer_name="blocks.1", groups=5)
    with pytest.raises(NormalizerError, match="divisors of 12 .*1, 2, 3, 4, 6, 12"):
        norms.GroupNorm(12, groups=5)


def test_group_with_single_value_groups_is_refused() -> None:
    layer = norms.build("group", nn.Linear(4, 8), groups=8, layer_name="blocks.0")
    with pytest.raises(NormalizerError, match="each group normalizes a single value"):
        layer(torch.randn(5, 4))


def test_unknown_normalizer_suggests_the_closest_names() -> None:
    with pytest.raises(UnknownNameError, match=r"unknown normalizer 'layr'; did you mean 'layer'"):
        norms.build("layr", nn.Linear(2, 2))
    assert norms.spec("BatchNorm").name == "batch"  # torch-style names are aliases
    with pytest.raises(UnknownNameError, match="'prelayer'"):
        norms.spec("pre-layer")


def test_unknown_option_lists_the_normalizers_options() -> None:
    with pytest.raises(NormalizerError, match=r"no option 'grups'; did you mean 'groups'"):
        norms.build("group", nn.Conv2d(3, 8, 3), grups=4)
    with pytest.raises(NormalizerError, match="its options are: eps, momentum"):
        norms.build("batch", nn.Conv2d(3, 8, 3), r_max=2)


def test_shape_mismatch_is_explained() -> None:
    with pytest.raises(NormalizerError, match=r"expects input of shape \(N, 8, \.\.\.\)"):
        norms.BatchNorm(8)(torch.randn(4, 6))


def test_redundant_bias_is_dropped_and_needed_bias_kept() -> None:
    for name in ALL:
        layer = norms.build(name, nn.Conv2d(3, 8, 3))
        assert (layer.affine.bias is not None) == norms.spec(name).affine_bias, name
    # rms neither subtracts a mean nor has a shift of its own, so the bias is not redundant
    assert {n for n in ALL if norms.spec(n).affine_bias} == {
        "none",
        "weight",
        "scaled-weight",
        "rms",
    }


def test_batch_renorm_total_steps_follows_the_run() -> None:
    model = nn.Sequential(
        norms.build("batch-renorm", nn.Linear(3, 4)), norms.build("batch-renorm", nn.Linear(4, 4))
    )
    assert norms.set_total_steps(model, 200) == 2
    renorm = model[0].norm
    assert int(renorm.total_steps) == 200
    assert renorm.clip_limits(step=19) == (1.0, 0.0)  # first 10%: pure BatchNorm
    assert renorm.clip_limits(step=100) == (3.0, pytest.approx(5.0 * 80 / 140))
    assert renorm.clip_limits(step=160) == (3.0, 5.0)


def test_balanced_warns_once_about_non_positive_inputs() -> None:
    layer = norms.build("balanced", nn.Linear(4, 6), layer_name="blocks.0")
    with pytest.warns(BalancedInputWarning, match=r"blocks\.0.*normalize='unit'"):
        layer(torch.randn(8, 4) - 2.0)
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("error")
        layer(torch.randn(8, 4) - 2.0)  # warned once is enough
        norms.build("balanced", nn.Linear(4, 6))(torch.rand(8, 4))  # positive inputs: silent
