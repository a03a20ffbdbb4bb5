"""The Hessian on models as users write them: attention, half precision, sequence outputs, frozen layers."""

from __future__ import annotations

import math
import warnings

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call
from torch.nn.attention import SDPBackend, sdpa_kernel

from normprobe.hessian import HessianError, HessianOperator, hessian_spectrum
from normprobe.probes import gradient_norms


class Attend(nn.Module):
    """Self-attention over (N, T, D) then a per-token head: scores (N, T, K)."""

    def __init__(self, d: int = 4, k: int = 3) -> None:
        super().__init__()
        self.attn = nn.MultiheadAttention(d, 2, batch_first=True)
        self.head = nn.Linear(d, k)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h, _ = self.attn(x, x, x, need_weights=False)  # F.scaled_dot_product_attention inside
        return self.head(x + h)


def _seq_loss(out: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    return F.cross_entropy(out.reshape(-1, out.shape[-1]), y.reshape(-1))


def _data(n: int = 6, t: int = 5, d: int = 4, k: int = 3) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    return torch.randn(n, t, d, generator=g, dtype=torch.float64), torch.randint(
        0, k, (n, t), generator=g
    )


def _exact(model: nn.Module, loss_fn, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    named = [(n, p) for n, p in model.named_parameters()]
    flat = torch.cat([p.detach().reshape(-1) for _, p in named])

    def loss_of(w: torch.Tensor) -> torch.Tensor:
        parts = torch.split(w, [p.numel() for _, p in named])
        values = {n: part.reshape(p.shape) for (n, p), part in zip(named, parts)}
        return loss_fn(functional_call(model, values, (x,)), y)

    with sdpa_kernel(SDPBackend.MATH):
        return torch.autograd.functional.hessian(loss_of, flat)


def test_multihead_attention_on_cpu_matches_the_exact_hessian() -> None:
    torch.manual_seed(0)
    model = Attend().double()
    x, y = _data()
    exact = _exact(model, _seq_loss, x, y)
    # without the math kernel the double backward of the fused CPU attention does not exist
    with HessianOperator(model, _seq_loss, (x, y)) as op:
        assert op.dim == exact.shape[0]
        v = torch.randn(op.dim, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
        torch.testing.assert_close(op.matvec(v), exact @ v, rtol=1e-9, atol=1e-12)
    spec = hessian_spectrum(model, _seq_loss, (x, y), what="top", k=2, num_classes=3)
    assert spec.top_eigenvalues == pytest.approx(
        torch.linalg.eigvalsh(exact).flip(0)[:2].numpy(), rel=1e-7
    )


@pytest.mark.parametrize("low", [torch.float16, torch.bfloat16])
def test_half_precision_models_get_float32_products_not_nan(low: torch.dtype) -> None:
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(4, 8), nn.Tanh(), nn.Linear(8, 3))
    x, y = torch.randn(32, 4), torch.randint(0, 3, (32,))
    half = net.to(low)
    reference = nn.Sequential(nn.Linear(4, 8), nn.Tanh(), nn.Linear(8, 3))
    reference.load_state_dict({k: v.float() for k, v in half.state_dict().items()})
    spec = hessian_spectrum(half, F.cross_entropy, (x.to(low), y), what=("top", "trace"), k=3)
    # the same parameters, and the half inputs, in float32: the same products
    ref = hessian_spectrum(
        reference, F.cross_entropy, (x.to(low).float(), y), what=("top", "trace"), k=3
    )
    assert spec.model_dtype == str(low).replace("torch.", "") and spec.product_dtype == "float32"
    assert torch.isfinite(torch.as_tensor(spec.top_eigenvalues)).all()
    assert spec.top_eigenvalues == pytest.approx(ref.top_eigenvalues, rel=1e-4)
    assert all(p.dtype == low for p in half.parameters())  # the model itself is untouched
    with pytest.raises(HessianError, match="must be torch.float32 or torch.float64"):
        HessianOperator(half, F.cross_entropy, (x, y), product_dtype=torch.float16)


def test_a_non_finite_product_raises_instead_of_returning_nan() -> None:
    net = nn.Sequential(nn.Linear(3, 2))
    data = torch.randn(8, 3), torch.randint(0, 2, (8,))
    with HessianOperator(net, lambda out, y: (out * 1e30).pow(2).mean(), data) as op:
        with pytest.raises(HessianError, match="Hessian-vector product is not finite"):
            op.matvec(torch.ones(op.dim))


def test_k_comes_from_an_explicit_classes_axis_never_the_sequence_axis() -> None:
    torch.manual_seed(0)
    model = Attend(d=4, k=3).double()
    x, y = _data(t=7)  # T = 7 would be K if axis 1 were read
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        spec = hessian_spectrum(model, _seq_loss, (x, y), what="top", k=2)
    assert spec.num_classes is None and len(spec.top.values) == 2  # no 7 eigenvalues computed
    assert any(
        "outlier ratio not computed" in str(w.message) and "num_classes=" in str(w.message)
        for w in caught
    )
    assert "outlier_ratio" not in set(spec.to_frame()["metric"])
    model.classes_last = True
    assert hessian_spectrum(model, _seq_loss, (x, y), what="top", k=2).num_classes == 3
    del model.classes_last
    explicit = hessian_spectrum(model, _seq_loss, (x, y), what="top", k=2, num_classes=3)
    assert explicit.num_classes == 3 and len(explicit.top.values) == 3
    with pytest.raises(HessianError, match="num_classes must be a positive integer"):
        hessian_spectrum(model, _seq_loss, (x, y), what="top", num_classes=0)
    # (N, K): axis 1 is the classes axis, no declaration needed
    net = nn.Sequential(nn.Linear(4, 5)).double()
    two = hessian_spectrum(net, F.cross_entropy, (x[:, 0], y[:, 0]), what="top", k=2)
    assert two.num_classes == 5


def test_one_output_per_example_has_no_k_and_says_so() -> None:
    """A regression's (N, 1) output is not a classes axis of one class: lambda_1 / lambda_1 = 1
    would say nothing, so the outlier ratio is left out with a warning, as for (N,)."""
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(4, 6), nn.Tanh(), nn.Linear(6, 1)).double()
    x, target = torch.randn(32, 4).double(), torch.randn(32, 1).double()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        spec = hessian_spectrum(net, F.mse_loss, (x, target), what="top", k=2)
    assert spec.num_classes is None and math.isnan(spec.outlier_ratio)
    assert "outlier_ratio" not in set(spec.to_frame()["metric"])
    assert any("one output per example (shape (32, 1))" in str(w.message) for w in caught)
    given = hessian_spectrum(net, F.mse_loss, (x, target), what="top", k=2, num_classes=2)
    assert given.outlier_ratio == given.top.values[0] / given.top.values[1]


def test_gradient_probes_and_the_hessian_share_and_report_the_layer_options() -> None:
    torch.manual_seed(0)
    net = nn.Sequential(nn.Embedding(10, 4), nn.LayerNorm(4), nn.Linear(4, 4), nn.Linear(4, 3))
    net[2].requires_grad_(False)
    ids = torch.randint(0, 10, (8,))
    y = torch.randint(0, 3, (8,))
    grads = gradient_norms(net, F.cross_entropy, (ids, y))
    assert grads.query("metric == 'grad_norm'")[["layer", "frozen"]].values.tolist() == [
        ["2", True],
        ["3", False],
    ]
    assert "left out: 0 (embedding), 1 (norm)" in grads["layer_rule"].iloc[0]
    spec = hessian_spectrum(net, F.cross_entropy, (ids, y), what="trace", trace_samples=2)
    assert spec.excluded == {"2.weight": "frozen", "2.bias": "frozen"}
    frame = spec.to_frame().query("metric == 'excluded_param'")
    assert frame[["layer", "reason"]].values.tolist() == [
        ["2.weight", "frozen"],
        ["2.bias", "frozen"],
    ]
    only = hessian_spectrum(net, F.cross_entropy, (ids, y), what="trace", trace_samples=2,
                            embeddings=False, norms=False, frozen=True)  # fmt: skip
    assert only.dim == 4 * 4 + 4 + 4 * 3 + 3
    assert only.excluded == {"0.weight": "embedding", "1.weight": "norm", "1.bias": "norm"}
    same = gradient_norms(net, F.cross_entropy, (ids, y), embeddings=True, norms=True, frozen=False)
    assert same.query("metric == 'grad_norm'")["layer"].tolist() == ["0", "1", "3"]


def test_dict_inputs_and_no_targets_are_chunked_alike() -> None:
    class Two(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.fc = nn.Linear(3, 2)

        def forward(self, x: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
            return self.fc(x) * scale[:, None]

    torch.manual_seed(0)
    model = Two().double()
    x = torch.randn(10, 3, dtype=torch.float64)
    scale = torch.linspace(0.5, 2.0, 10, dtype=torch.float64)
    y = torch.randint(0, 2, (10,))

    def loss_of_targets(out: torch.Tensor, targets: None) -> torch.Tensor:
        assert targets is None
        return F.cross_entropy(out, y_current[0])

    y_current = [y]
    whole = HessianOperator(model, F.cross_entropy, ({"x": x, "scale": scale}, y), chunk_size=10)
    chunked = HessianOperator(model, F.cross_entropy, ((x, scale), y), chunk_size=3)
    v = torch.randn(whole.dim, dtype=torch.float64)
    # chunks of 4, 3, 3: sum_c (n_c / n) H_c equals the whole batch's Hessian for a per-example loss
    torch.testing.assert_close(chunked.matvec(v), whole.matvec(v))
    untargeted = HessianOperator(
        model, loss_of_targets, ({"x": x, "scale": scale}, None), chunk_size=10
    )
    torch.testing.assert_close(untargeted.matvec(v), whole.matvec(v))
    with pytest.raises(HessianError, match=r"cannot take the inputs, a dict with keys \['x'\]"):
        HessianOperator(model, F.cross_entropy, ({"x": x}, y))


def test_gradient_probes_say_which_weight_layers_never_ran_as_modules() -> None:
    torch.manual_seed(0)
    model = Attend().double()
    x, y = _data()
    frame = gradient_norms(model, _seq_loss, (x, y))
    # MultiheadAttention applies out_proj functionally: no row, but said in the rule
    assert frame.query("metric == 'grad_norm'")["layer"].tolist() == ["head"]
    assert (
        frame["layer_rule"].iloc[0].endswith("not run as modules (no gradient row): attn.out_proj")
    )


def test_a_module_with_parameters_but_no_weight_is_named_in_the_gradient_rule() -> None:
    """nn.MultiheadAttention keeps its input projection as in_proj_weight (no weight): the
    gradient probes cannot take it, and their layer rule says so instead of dropping it."""
    torch.manual_seed(0)

    class Attend(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.embed = nn.Linear(4, 8)
            self.attention = nn.MultiheadAttention(8, 2, batch_first=True)
            self.head = nn.Linear(8, 3)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            h = self.embed(x)
            h, _ = self.attention(h, h, h)
            return self.head(h.mean(1))

    x, y = torch.randn(6, 5, 4), torch.randint(0, 3, (6,))
    grads = gradient_norms(Attend(), F.cross_entropy, (x, y))
    assert grads.query("metric == 'grad_norm'")["layer"].tolist() == ["embed", "head"]
    rule = grads["layer_rule"].iloc[0]
    assert "left out: attention (in_proj_weight, in_proj_bias: not a weight)" in rule
    assert "not run as modules (no gradient row): attention.out_proj" in rule
