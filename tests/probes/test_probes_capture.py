"""Layer selection, execution-order depths, reused modules and hook clean-up (normprobe.probes.capture)."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import normprobe
from normprobe.errors import NormprobeError
from normprobe.probes import Probe, ProbeError, select_layers


def _no_hooks(model: nn.Module) -> bool:
    return all(not m._forward_hooks and not m._forward_pre_hooks for m in model.modules())


class Backwards(nn.Module):
    """Modules registered in the reverse of the order they run."""

    def __init__(self) -> None:
        super().__init__()
        self.act_c = nn.ReLU()
        self.c = nn.Linear(4, 2)
        self.act_b = nn.ReLU()
        self.b = nn.Linear(4, 4)
        self.act_a = nn.ReLU()
        self.a = nn.Linear(3, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.act_c(self.c(self.act_b(self.b(self.act_a(self.a(x))))))


class Twice(nn.Module):
    """One ReLU module called twice."""

    def __init__(self) -> None:
        super().__init__()
        self.lin1 = nn.Linear(3, 5)
        self.relu = nn.ReLU()
        self.lin2 = nn.Linear(5, 5)
        self.head = nn.Linear(5, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.relu(self.lin2(self.relu(self.lin1(x)))))


def _seeded(module: nn.Module, seed: int = 0) -> nn.Module:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.7)
    return module


# --------------------------------------------------------------------------- selection


def test_default_rule_is_activations_else_normalizers_else_affine_ops() -> None:
    acts = nn.Sequential(nn.Linear(3, 4), nn.BatchNorm1d(4), nn.ReLU(), nn.Linear(4, 2))
    norms_only = nn.Sequential(nn.Linear(3, 4), nn.LayerNorm(4), nn.Linear(4, 2))
    affine_only = nn.Sequential(nn.Linear(3, 4), nn.Linear(4, 2))
    assert list(select_layers(acts)) == ["2"]
    assert list(select_layers(norms_only)) == ["1"]
    assert list(select_layers(affine_only)) == ["0", "1"]
    # gradient probes default to the layers that own a weight
    assert list(select_layers(acts, default="gradients")) == ["0", "3"]
    with pytest.raises(ProbeError, match="no activation or normalization or Linear/Conv"):
        select_layers(nn.Sequential(nn.Flatten(), nn.Identity()))


def test_normprobe_normalizers_are_found_by_their_flag_without_importing_norms() -> None:
    model = normprobe.build_model("mlp", "batch", seed=0, depth=2, width=8, input_shape=5)
    assert list(select_layers(model, nn.Linear)) == ["blocks.0.affine", "blocks.1.affine", "head"]
    by_flag = select_layers(model, r"blocks\.\d+\.norm")
    assert all(getattr(m, "is_normalizer", False) for m in by_flag.values())
    assert list(select_layers(model)) == ["blocks.0.act", "blocks.1.act"]


def test_layers_by_names_type_tuple_and_regex() -> None:
    model = Backwards()
    assert list(select_layers(model, ["a", "act_a"])) == ["act_a", "a"]  # registration order
    assert list(select_layers(model, nn.Linear)) == ["c", "b", "a"]
    assert list(select_layers(model, (nn.Linear, nn.ReLU))) == list(dict(model.named_children()))
    assert list(select_layers(model, r"act_[ab]")) == ["act_b", "act_a"]


def test_bad_layer_specs_raise_one_clear_error_each() -> None:
    model = normprobe.build_model("mlp", "layer", seed=0, depth=2, width=8, input_shape=5)
    with pytest.raises(ProbeError, match=r"'blocks\.0\.actt'.*did you mean 'blocks\.0\.act'"):
        select_layers(model, ["blocks.0.actt"])
    with pytest.raises(ProbeError, match=r"matches no module name.*did you mean 'blocks\.0\.act'"):
        select_layers(model, r"blocks\.0\.actt")
    with pytest.raises(ProbeError, match="not a valid regular expression"):
        select_layers(model, "blocks.(")
    with pytest.raises(ProbeError, match="selects no module.*module types are"):
        select_layers(model, nn.Conv2d)
    with pytest.raises(ProbeError, match="layers must be None"):
        select_layers(model, 3)  # type: ignore[arg-type]
    with pytest.raises(ProbeError, match="selects nothing"):
        select_layers(model, [])
    assert issubclass(ProbeError, NormprobeError) and issubclass(ProbeError, ValueError)


def test_mode_and_capture_are_checked() -> None:
    with pytest.raises(ProbeError, match="mode must be 'train'.*or 'eval'.*got 'test'"):
        Probe(Twice(), mode="test")  # type: ignore[arg-type]
    with pytest.raises(ProbeError, match="capture must be"):
        Probe(Twice(), capture="inputs")  # type: ignore[arg-type]


# --------------------------------------------------------------------------- depths


def test_depth_is_execution_order_not_registration_order() -> None:
    model = _seeded(Backwards())
    with Probe(model, layers=(nn.Linear, nn.ReLU)) as p:
        model(torch.randn(4, 3))
    assert p.layers == {"a": 1, "act_a": 2, "b": 3, "act_b": 4, "c": 5, "act_c": 6}
    assert [c.module_type for c in p.calls] == ["Linear", "ReLU"] * 3


def test_a_module_called_twice_appears_once_per_call() -> None:
    model = _seeded(Twice())
    x = torch.randn(6, 3)
    with Probe(model) as p:
        model(x)
    first = torch.relu(model.lin1(x))
    second = torch.relu(model.lin2(first))
    assert p.layers == {"relu": 1, "relu#2": 2}
    assert [(c.name, c.call) for c in p.calls] == [("relu", 1), ("relu", 2)]
    assert torch.allclose(p.activations["relu"], first)
    assert torch.allclose(p.activations["relu#2"], second)


def test_each_pass_replaces_the_record_of_the_last_one() -> None:
    model = _seeded(Twice())
    with Probe(model, layers=["lin1"]) as p:
        model(torch.zeros(2, 3))
        x = torch.randn(5, 3)
        model(x)
        assert p.layers == {"lin1": 1}
        assert torch.allclose(p.activations["lin1"], model.lin1(x))


def test_captured_outputs_are_copies_that_later_in_place_ops_cannot_change() -> None:
    model = _seeded(nn.Sequential(nn.Linear(3, 8), nn.ReLU(inplace=True)))
    x = torch.randn(16, 3)
    with Probe(model, layers=["0"]) as p, torch.no_grad():
        model(x)
    assert (p.activations["0"] < 0).any()  # the ReLU ran in place on the original
    assert torch.allclose(p.activations["0"], model[0](x))


def test_named_layers_that_never_run_as_modules_raise() -> None:
    enc = nn.TransformerEncoder(
        nn.TransformerEncoderLayer(8, 2, 16, batch_first=True), 1, enable_nested_tensor=False
    )
    with pytest.raises(ProbeError, match="out_proj.*did not run as modules"):
        with Probe(enc, layers=["layers.0.self_attn.out_proj", "layers.0.linear1"]):
            enc(torch.randn(2, 3, 8))
    assert _no_hooks(enc)
    # a type selection keeps the Linear layers that ran and drops out_proj
    with Probe(enc, layers=nn.Linear) as p:
        enc(torch.randn(2, 3, 8))
    assert list(p.layers) == ["layers.0.linear1", "layers.0.linear2"]


def test_default_layers_that_never_run_raise_a_hint() -> None:
    class Functional(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.lin = nn.Linear(3, 3)
            self.unused = nn.ReLU()

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return F.relu(self.lin(x))

    model = Functional()
    with pytest.raises(ProbeError, match="none of the selected layers.*F.relu"):
        with Probe(model):
            model(torch.randn(2, 3))


# --------------------------------------------------------------------------- clean-up


def test_hooks_are_removed_and_state_restored_when_the_block_raises() -> None:
    model = nn.Sequential(nn.Linear(3, 4), nn.BatchNorm1d(4), nn.ReLU())
    model.eval()
    with pytest.raises(RuntimeError, match="boom"):
        with Probe(model, mode="train") as p:
            assert model.training and not _no_hooks(model)
            model(torch.randn(8, 3) + 3)
            raise RuntimeError("boom")
    assert _no_hooks(model)
    assert not model.training and not model[1].training
    assert int(model[1].num_batches_tracked) == 0 and torch.equal(
        model[1].running_mean, torch.zeros(4)
    )
    assert p.layers == {"2": 1}


def test_hooks_are_removed_when_the_model_raises_inside_a_probe() -> None:
    model = nn.Sequential(nn.Linear(3, 4), nn.ReLU())
    with pytest.raises(RuntimeError):
        normprobe.probes.representation_correlation(model, torch.randn(4, 5))  # wrong width
    assert _no_hooks(model)

    def bad_loss(out: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        raise ValueError("loss failed")

    with pytest.raises(ValueError, match="loss failed"):
        normprobe.probes.gradient_norms(model, bad_loss, (torch.randn(4, 3), torch.zeros(4)))
    assert _no_hooks(model) and all(p.grad is None for p in model.parameters())


def test_dropout_is_off_and_the_global_random_state_untouched() -> None:
    model = nn.Sequential(nn.Linear(4, 32), nn.ReLU(), nn.Dropout(0.5))
    x = torch.randn(8, 4)
    state = torch.get_rng_state()
    with Probe(model, layers=["2"]) as p, torch.no_grad():
        model(x)
        assert not model[2].training and model[0].training
    assert torch.equal(torch.get_rng_state(), state)
    assert torch.equal(p.activations["2"], torch.relu(model[0](x)))
    assert model[2].training
