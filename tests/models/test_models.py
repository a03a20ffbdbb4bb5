"""Model builders: every normalizer in both models, readable names, WRN depths, seeding."""

from __future__ import annotations

import warnings

import pytest
import torch
from torch import nn

import normprobe
from normprobe.errors import ModelError, NormalizerError, UnknownNameError
from normprobe.models.wrn import blocks_per_stage
from normprobe.norms.balanced import BalancedInputWarning


@pytest.fixture(scope="module")
def digits() -> dict[str, normprobe.Dataset]:
    return {
        "mlp": normprobe.load_dataset("digits"),
        "wrn": normprobe.load_dataset("digits", size=16),
    }


MODEL_KW = {"mlp": {"depth": 4, "width": 64}, "wrn": {"depth": 10, "widen": 1}}


def _train(model: nn.Module, ds: normprobe.Dataset, steps: int, lr: float = 0.05) -> list[float]:
    opt = torch.optim.SGD(model.parameters(), lr=lr, momentum=0.9)
    g = torch.Generator().manual_seed(0)
    losses = []
    for _ in range(steps):
        idx = torch.randint(0, len(ds.train), (32,), generator=g)
        loss = nn.functional.cross_entropy(model(ds.train.x[idx]), ds.train.y[idx])
        loss = loss + 0.1 * normprobe.norms.regularization(model)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    return losses


@pytest.mark.parametrize("model_name", ["mlp", "wrn"])
@pytest.mark.parametrize("norm", normprobe.normalizers())
def test_every_normalizer_trains_five_sgd_steps_on_digits(model_name, norm, digits) -> None:
    ds = digits[model_name]
    kwargs = dict(input_shape=ds.input_shape, num_classes=10, **MODEL_KW[model_name])
    if norm == "instance" and model_name == "mlp":
        with pytest.raises(NormalizerError, match=r"'blocks\.0' is dense"):
            normprobe.build_model(model_name, norm, seed=0, **kwargs)
        return
    model = normprobe.build_model(model_name, norm, seed=0, **kwargs)
    before = [p.detach().clone() for p in model.parameters()]
    with warnings.catch_warnings():
        # balanced warns that standardized digits are not the non-negative input it assumes
        warnings.simplefilter("ignore", BalancedInputWarning)
        losses = _train(model, ds, steps=5)
    assert all(torch.isfinite(torch.tensor(losses))), losses
    for p in model.parameters():
        assert torch.isfinite(p).all()
    assert any(not torch.equal(a, b) for a, b in zip(before, model.parameters()))
    model.eval()
    with torch.no_grad():
        assert torch.isfinite(model(ds.test.x[:64])).all()


def test_balanced_learns_on_non_negative_digits() -> None:
    ds = normprobe.load_dataset("digits", normalize="unit")
    model = normprobe.build_model("mlp", "balanced", seed=0, depth=4, width=64)
    with warnings.catch_warnings():
        warnings.simplefilter("error", BalancedInputWarning)
        losses = _train(model, ds, steps=60)
    assert sum(losses[-10:]) / 10 < 0.5 * losses[0]


def test_mlp_module_names_are_readable() -> None:
    model = normprobe.build_model("mlp", "batch", depth=3, width=16)
    names = dict(model.named_modules())
    for i in range(3):
        for child in ("affine", "norm", "act"):
            assert f"blocks.{i}.{child}" in names
    assert isinstance(names["blocks.2.norm"], normprobe.norms.BatchNorm)
    assert names["blocks.2.norm"].layer_name == "blocks.2.norm"
    assert isinstance(names["head"], nn.Linear)


@pytest.mark.parametrize("skip", [True, False])
def test_wrn_structure_and_names(skip: bool) -> None:
    model = normprobe.build_model(
        "wrn", "layer", depth=16, widen=2, skip=skip, input_shape=(3, 16, 16)
    )
    names = dict(model.named_modules())
    assert {"stem.affine", "stem.norm", "stem.act", "pool", "head"} <= set(names)
    convs = [m for m in model.modules() if isinstance(m, nn.Conv2d)]
    # WRN-16-2: n = 2 blocks per stage, 2 convs per block, plus the stem
    three_by_three = [c for c in convs if c.kernel_size == (3, 3)]
    assert len(three_by_three) == 1 + 3 * 2 * 2
    assert [c.out_channels for c in three_by_three[1::4]] == [32, 64, 128]
    strides = [c.stride for c in three_by_three]
    assert strides.count((2, 2)) == 2  # stride 2 between stages
    projections = [n for n in names if n.endswith("shortcut")]
    if skip:  # width changes in every stage (16 -> 32 with k = 2), so every stage projects
        assert projections == ["blocks.0.shortcut", "blocks.2.shortcut", "blocks.4.shortcut"]
    else:
        assert projections == []
    for i in range(6):
        assert f"blocks.{i}.conv1.norm" in names and f"blocks.{i}.conv2.norm" in names
    assert model(torch.randn(2, 3, 16, 16)).shape == (2, 10)


def test_wrn_skip_changes_the_function_but_not_the_main_path() -> None:
    a = normprobe.build_model("wrn", "batch", depth=10, skip=True, seed=3, input_shape=(3, 8, 8))
    b = normprobe.build_model("wrn", "batch", depth=10, skip=False, seed=3, input_shape=(3, 8, 8))
    assert "blocks.1.shortcut.affine.weight" in a.state_dict()
    assert not any("shortcut" in k for k in b.state_dict())
    x = torch.randn(4, 3, 8, 8)
    assert not torch.allclose(a(x), b(x))


@pytest.mark.parametrize(
    "depth,n", [(10, 1), (16, 2), (22, 3), (28, 4), (26, 4), (20, 3), (14, 2), (40, 6)]
)
def test_wrn_depth_conventions(depth: int, n: int) -> None:
    assert blocks_per_stage(depth) == n


def test_wrn26_has_26_weight_layers_without_skips() -> None:
    model = normprobe.build_model("wrn", "batch", depth=26, widen=2, skip=False)
    weights = [m for m in model.modules() if isinstance(m, (nn.Conv2d, nn.Linear))]
    assert len(weights) == 26


def test_bad_model_arguments_are_explained() -> None:
    with pytest.raises(ModelError, match="wrn depth must be 6n \\+ 4 .* got 25"):
        normprobe.build_model("wrn", depth=25)
    with pytest.raises(ModelError, match="has no option 'widht'; did you mean 'width'"):
        normprobe.build_model("mlp", widht=3)
    with pytest.raises(ModelError, match="input_shape must be \\(channels, height, width\\)"):
        normprobe.build_model("wrn", input_shape=(64,))
    with pytest.raises(UnknownNameError, match="did you mean 'wrn'"):
        normprobe.build_model("wrm")
    with pytest.raises(UnknownNameError, match="unknown activation"):
        normprobe.build_model("mlp", activation="relu6")
    with pytest.raises(ModelError, match="flatten=False"):
        normprobe.build_model("wrn", input_shape=(1, 8, 8))(torch.randn(2, 64))


def test_seeded_build_is_reproducible_and_leaves_global_rng_alone() -> None:
    torch.manual_seed(1234)
    expected_next = torch.rand(3)
    torch.manual_seed(1234)
    a = normprobe.build_model("mlp", "balanced", seed=7, depth=2, width=8)
    assert torch.equal(torch.rand(3), expected_next)
    b = normprobe.build_model("mlp", "balanced", seed=7, depth=2, width=8)
    for (ka, va), (kb, vb) in zip(a.state_dict().items(), b.state_dict().items()):
        assert ka == kb and torch.equal(va, vb)


def test_he_initialization_preserves_scale_without_normalization() -> None:
    model = normprobe.build_model("mlp", "none", seed=0, depth=20, width=512, input_shape=64)
    x = torch.randn(256, 64)
    h = model.blocks(x)
    # He init keeps E[h^2] ~ E[x^2] through ReLU layers: no explosion or collapse after 20
    ratio = (h.square().mean() / x.square().mean()).item()
    assert 0.2 < ratio < 5.0
