"""HessianOperator: exact HVPs for every normalizer, chunking, norm modes, subsets, state."""

from __future__ import annotations

import copy
import warnings
from collections import OrderedDict
from typing import Any

import numpy as np
import pytest
import scipy.sparse.linalg
import torch
from torch import nn

import normprobe
from normprobe.hessian import HessianError, HessianOperator, blas_threads, select_parameters
from normprobe.state import frozen_statistics

F = nn.functional


def _reference_hvps(model: nn.Module, chunks, vectors: torch.Tensor, train: bool) -> torch.Tensor:
    """Plain double backward on a copy of the model, chunk by chunk, no graph reuse."""
    model = copy.deepcopy(model)
    params = [p for p in model.parameters() if p.requires_grad]
    total = sum(len(x) for x, _ in chunks)
    out = torch.zeros_like(vectors)
    with frozen_statistics(model):
        model.train(train)
        for m in model.modules():
            if isinstance(m, nn.Dropout):
                m.eval()
        for x, y in chunks:
            for i, v in enumerate(vectors):
                loss = F.cross_entropy(model(x), y) * (len(x) / total)
                g = torch.autograd.grad(loss, params, create_graph=True)
                parts = torch.split(v.to(params[0].dtype), [p.numel() for p in params])
                hv = torch.autograd.grad(g, params, [t.view_as(p) for t, p in zip(parts, params)])
                out[i] += torch.cat([h.reshape(-1) for h in hv]).to(out.dtype)
    return out


def _state(model: nn.Module) -> dict:
    return {
        "tensors": {k: v.clone() for k, v in model.state_dict().items()},
        "grads": {
            n: None if p.grad is None else p.grad.clone() for n, p in model.named_parameters()
        },
        "flags": {n: m.training for n, m in model.named_modules()},
        "requires_grad": {n: p.requires_grad for n, p in model.named_parameters()},
        "attributes": {
            (n, k): v
            for n, m in model.named_modules()
            for k, v in vars(m).items()
            if not k.startswith("_") and not isinstance(v, (dict, nn.Module))
        },
    }


def _assert_same_state(before: dict, after: dict) -> None:
    for k, v in before["tensors"].items():
        assert torch.equal(v, after["tensors"][k]), k
    for k, g in before["grads"].items():
        h = after["grads"][k]
        assert (g is None) == (h is None) and (g is None or torch.equal(g, h)), k
    assert before["flags"] == after["flags"]
    assert before["requires_grad"] == after["requires_grad"]
    assert before["attributes"].keys() == after["attributes"].keys()
    for key, value in before["attributes"].items():
        assert after["attributes"][key] is value or after["attributes"][key] == value, key


def _messy(model: nn.Module, x: torch.Tensor) -> None:
    """Give the model some grads, a None grad, mixed flags and a frozen parameter."""
    F.cross_entropy(model(x), torch.zeros(len(x), dtype=torch.long)).backward()
    params = list(model.parameters())
    params[0].grad = None
    params[-1].requires_grad_(False)
    model.eval()
    list(model.children())[0].train()


def _zoo_case(
    norm: str, arch: str, activation: str = "relu"
) -> tuple[nn.Module, list, torch.Tensor]:
    gen = torch.Generator().manual_seed(0)
    if arch == "mlp":
        model = normprobe.build_model(
            "mlp", norm, seed=0, depth=2, width=8, input_shape=6, activation=activation
        )
        x = torch.rand(24, 6, generator=gen, dtype=torch.float64) + 0.1
    else:
        model = normprobe.build_model(
            "wrn", norm, seed=0, depth=10, base_channels=2, input_shape=(1, 6, 6),
            num_classes=3, activation=activation,
        )  # fmt: skip
        x = torch.rand(24, 1, 6, 6, generator=gen, dtype=torch.float64) + 0.1
    model = model.double()
    y = torch.randint(0, 3, (24,), generator=gen)
    return model, [(x[:12], y[:12]), (x[12:], y[12:])], x


ZOO = [(n, "mlp") for n in normprobe.normalizers() if n != "instance"] + [
    (n, "wrn") for n in normprobe.normalizers()
]
#: torch's weight norm: its fused kernel's double backward is wrong (see test below)
TORCH_WEIGHT_NORM = {"weight", "weight-meanbn"}


@pytest.mark.parametrize(("norm", "arch"), ZOO)
def test_hvp_exact_and_model_untouched_for_every_normalizer(norm: str, arch: str) -> None:
    model, chunks, x = _zoo_case(norm, arch)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # balanced's input-sign warning
        _messy(model, x)
        before = _state(model)
        with HessianOperator(model, F.cross_entropy, chunks) as hess:
            vectors = torch.randn(
                3, hess.dim, generator=torch.Generator().manual_seed(1), dtype=torch.float64
            )
            hv = torch.stack([hess.matvec(v) for v in vectors])
            assert hess.cached_chunks == 2
        after = _state(model)
        reference = _reference_hvps(model, chunks, vectors, train=True)
    _assert_same_state(before, after)
    # symmetric: u^T H v == v^T H u
    assert float(vectors[0] @ hv[1]) == pytest.approx(float(vectors[1] @ hv[0]), rel=1e-10)
    if (
        norm not in TORCH_WEIGHT_NORM
    ):  # the plain reference is wrong there (finite differences below)
        scale = float(reference.abs().max())
        assert scale > 0
        torch.testing.assert_close(hv, reference, rtol=0, atol=1e-12 * scale)


def _finite_difference_hvp(model: nn.Module, chunks, v: torch.Tensor, eps: float) -> torch.Tensor:
    """Central differences of the (first-order, trusted) autograd gradient along ``v``."""

    def gradient(t: float) -> torch.Tensor:
        shifted = copy.deepcopy(model)
        with torch.no_grad():
            offset = 0
            for p in shifted.parameters():
                p.add_(t * v[offset : offset + p.numel()].view_as(p))
                offset += p.numel()
        return HessianOperator(shifted, F.cross_entropy, chunks).gradient()

    return (gradient(eps) - gradient(-eps)) / (2 * eps)


SMOOTH = [(n, "mlp") for n in normprobe.normalizers() if n not in ("instance", "balanced")] + [
    ("instance", "wrn"),
    ("weight", "wrn"),
    ("batch", "wrn"),
]


@pytest.mark.parametrize(("norm", "arch"), SMOOTH)
def test_hvp_matches_finite_differences_on_smooth_networks(norm: str, arch: str) -> None:
    """tanh networks (no kinks): an independent reference, also for torch's weight norm.

    Balanced normalization is left out: it has kinks of its own (sign masks of
    the weights, exact zeros before a ReLU), so finite differences are no
    reference for it; its HVPs equal autograd's double backward above.
    """
    model, chunks, _ = _zoo_case(norm, arch, activation="tanh")
    hess = HessianOperator(model, F.cross_entropy, chunks)
    v = torch.randn(hess.dim, generator=torch.Generator().manual_seed(2), dtype=torch.float64)
    fd = _finite_difference_hvp(model, chunks, v, eps=1e-6)
    hv = hess.matvec(v)
    assert float((hv - fd).norm() / fd.norm()) < 1e-6


def test_torch_weight_norm_is_decomposed_with_the_same_value_and_gradient() -> None:
    from normprobe.hessian.hvp import _weight_norm_decomposed

    gen = torch.Generator().manual_seed(0)
    for shape, dim in (((5, 3), 0), ((4, 3, 2, 2), 0), ((4, 3), 1), ((4, 3), -1)):
        v = torch.randn(*shape, generator=gen, dtype=torch.float64, requires_grad=True)
        g_shape = (
            [1] * len(shape)
            if dim == -1
            else [shape[dim] if i == dim % len(shape) else 1 for i in range(len(shape))]
        )
        g = torch.rand(*g_shape, generator=gen, dtype=torch.float64, requires_grad=True)
        ours, theirs = _weight_norm_decomposed(v, g, dim), torch._weight_norm(v, g, dim)
        torch.testing.assert_close(ours, theirs, rtol=1e-13, atol=1e-14)
        w = torch.randn(*shape, generator=gen, dtype=torch.float64)
        grads = torch.autograd.grad((ours * w).sum(), (v, g))
        expected = torch.autograd.grad((theirs * w).sum(), (v, g))
        for a, b in zip(grads, expected):
            torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-13)


def test_regnorm_penalty_attribute_is_put_back() -> None:
    model, chunks, _ = _zoo_case("regnorm", "mlp")
    penalty = model.blocks[0].norm.penalty
    with HessianOperator(model, F.cross_entropy, chunks) as hess:
        hess.matvec(torch.ones(hess.dim, dtype=torch.float64))
        assert model.blocks[0].norm.penalty is penalty  # no graph kept alive through it


def test_chunked_hvp_is_the_weighted_sum_of_chunk_hvps(exact_case) -> None:
    model, chunks = exact_case.model, exact_case.chunks
    v = torch.randn(
        sum(p.numel() for p in model.parameters()),
        generator=torch.Generator().manual_seed(0),
        dtype=torch.float64,
    )
    whole = HessianOperator(model, F.cross_entropy, chunks).matvec(v)
    n = sum(len(x) for x, _ in chunks)
    parts = sum(
        len(x) / n * HessianOperator(model, F.cross_entropy, [(x, y)]).matvec(v) for x, y in chunks
    )
    torch.testing.assert_close(whole, parts, rtol=1e-12, atol=1e-14)
    # and equals the exact Hessian built by forward-over-reverse
    torch.testing.assert_close(whole, exact_case.hessian @ v, rtol=1e-10, atol=1e-12)
    # the tuple form cuts the same chunks
    tuple_form = HessianOperator(
        model, F.cross_entropy, (exact_case.x, exact_case.y), chunk_size=128
    )
    torch.testing.assert_close(tuple_form.matvec(v), whole, rtol=0, atol=0)


@pytest.mark.parametrize("norm", ["batch", "layer", "bmlv"])
def test_eval_mode_hvp_does_not_depend_on_chunking(norm: str, digits_probe) -> None:
    x, y = digits_probe[0][:240], digits_probe[1][:240]
    model = normprobe.build_model("mlp", norm, seed=0, depth=2, width=16, input_shape=64).double()
    with torch.no_grad():  # non-trivial running statistics
        for i in range(3):
            model(x[80 * i : 80 * (i + 1)] * (1 + i))
    v = torch.randn(
        sum(p.numel() for p in model.parameters()),
        generator=torch.Generator().manual_seed(0),
        dtype=torch.float64,
    )
    single = HessianOperator(model, F.cross_entropy, [(x, y)], norm_mode="eval").matvec(v)
    for chunking in ([(x[:7], y[:7]), (x[7:200], y[7:200]), (x[200:], y[200:])], 64, 13):
        data = chunking if isinstance(chunking, list) else (x, y)
        size = chunking if isinstance(chunking, int) else 128
        hv = HessianOperator(
            model, F.cross_entropy, data, norm_mode="eval", chunk_size=size
        ).matvec(v)
        torch.testing.assert_close(hv, single, rtol=1e-11, atol=1e-13)
    if norm != "layer":  # train mode differs: batch statistics per chunk
        train = HessianOperator(model, F.cross_entropy, (x, y), chunk_size=64).matvec(v)
        assert not torch.allclose(train, single, rtol=1e-3)


def test_parameter_subset_is_the_block_of_the_full_hessian(exact_case) -> None:
    model = exact_case.model
    names = [n for n, _ in model.named_parameters()]
    sizes = [p.numel() for p in model.parameters()]
    offsets = dict(zip(names, np.cumsum([0, *sizes[:-1]])))
    for selection in ("blocks.1", ["head.weight", "blocks.0.norm"], model.head):
        hess = HessianOperator(model, F.cross_entropy, exact_case.chunks, params=selection)
        index = torch.cat([torch.arange(offsets[n], offsets[n] + p.numel()) for n, p in hess.named])
        block = exact_case.hessian[index][:, index]
        v = torch.randn(hess.dim, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
        torch.testing.assert_close(hess.matvec(v), block @ v, rtol=1e-10, atol=1e-12)


def test_select_parameters_names_prefixes_modules_and_errors() -> None:
    model = normprobe.build_model("mlp", "batch", seed=0, depth=2, width=4, input_shape=3)
    assert [n for n, _ in select_parameters(model, "blocks.0")] == [
        "blocks.0.affine.weight", "blocks.0.norm.weight", "blocks.0.norm.bias"
    ]  # fmt: skip
    assert [n for n, _ in select_parameters(model, model.head)] == ["head.weight", "head.bias"]
    with pytest.raises(HessianError, match=r"did you mean 'blocks\.0'"):
        select_parameters(model, "block.0")
    with pytest.raises(HessianError, match="no parameters of the model"):
        select_parameters(model, nn.Linear(2, 2))
    model.requires_grad_(False)
    with pytest.raises(HessianError, match="requires grad"):
        select_parameters(model)
    assert len(select_parameters(model, "head")) == 2  # frozen but named: included


class _Tied(nn.Module):
    """A token model whose output layer applies the embedding's weight (GPT-2's lm_head)."""

    def __init__(self) -> None:
        super().__init__()
        self.emb, self.mix = nn.Embedding(7, 4), nn.Linear(4, 4)
        self.out = nn.Linear(4, 7)
        self.out.weight = self.emb.weight

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return self.out(torch.tanh(self.mix(self.emb(ids))))


def test_a_tied_weight_is_taken_with_either_module_that_applies_it(exact_hessian_fn) -> None:
    """params="out" takes the weight out shares with emb (named emb.weight, once), as
    params=model.out does: the block of the exact Hessian over both of out's parameters."""
    torch.manual_seed(0)
    model = _Tied().double()
    ids, y = torch.randint(0, 7, (24,)), torch.randint(0, 7, (24,))
    chunks = [(ids, y)]
    full = exact_hessian_fn(model, F.cross_entropy, chunks)
    sizes = {n: p.numel() for n, p in model.named_parameters()}
    offsets = dict(zip(sizes, np.cumsum([0, *list(sizes.values())[:-1]])))
    v = torch.randn(sum(sizes.values()), generator=torch.Generator().manual_seed(1)).double()
    for selection, names in (
        ("out", ["emb.weight", "out.bias"]),
        (model.out, ["emb.weight", "out.bias"]),
        ("out.weight", ["emb.weight"]),
        (["emb", "out"], ["emb.weight", "out.bias"]),
    ):
        hess = HessianOperator(model, F.cross_entropy, chunks, params=selection)
        assert [n for n, _ in hess.named] == names
        index = torch.cat([torch.arange(offsets[n], offsets[n] + sizes[n]) for n in names])
        torch.testing.assert_close(
            hess.matvec(v[: hess.dim]),
            full[index][:, index] @ v[: hess.dim],
            rtol=1e-10,
            atol=1e-12,
        )
    relu_first = nn.Sequential(OrderedDict(act=nn.ReLU(), lin=nn.Linear(2, 2)))
    with pytest.raises(HessianError, match="module 'act' has no parameters of its own"):
        select_parameters(relu_first, "act")


def test_linear_operator_view_and_eigsh(exact_case) -> None:
    hess = HessianOperator(exact_case.model, F.cross_entropy, exact_case.chunks)
    linop = hess.as_linear_operator()
    assert linop.shape == (hess.dim, hess.dim) and linop.dtype == np.float64
    v = np.random.default_rng(0).standard_normal(hess.dim)
    np.testing.assert_allclose(linop @ v, exact_case.hessian.numpy() @ v, rtol=1e-10, atol=1e-12)
    with blas_threads(1):
        top = scipy.sparse.linalg.eigsh(
            linop, k=2, which="LA", tol=1e-10, return_eigenvectors=False
        )
    np.testing.assert_allclose(np.sort(top), exact_case.eigenvalues[-2:], rtol=1e-8)


def test_graph_memory_budget_bounds_caching_without_changing_results(exact_case) -> None:
    model, chunks = exact_case.model, exact_case.chunks
    v = torch.randn(
        exact_case.hessian.shape[0], generator=torch.Generator().manual_seed(0), dtype=torch.float64
    )
    cached = HessianOperator(model, F.cross_entropy, chunks)
    hv = cached.matvec(v)
    assert cached.cached_chunks == 4 and cached.graph_bytes > 0
    per_chunk = cached.graph_bytes / 4
    some = HessianOperator(model, F.cross_entropy, chunks, graph_memory=int(2.5 * per_chunk))
    none = HessianOperator(model, F.cross_entropy, chunks, graph_memory=0)
    torch.testing.assert_close(some.matvec(v), hv, rtol=0, atol=1e-14)
    torch.testing.assert_close(none.matvec(v), hv, rtol=0, atol=1e-14)
    assert some.cached_chunks == 2 and none.cached_chunks == 0 and none.graph_bytes == 0
    torch.testing.assert_close(cached.gradient(), none.gradient(), rtol=1e-13, atol=1e-15)


def test_cached_graphs_follow_parameter_changes() -> None:
    model, chunks, _ = _zoo_case("batch", "mlp")
    hess = HessianOperator(model, F.cross_entropy, chunks)
    v = torch.ones(hess.dim, dtype=torch.float64)
    first = hess.matvec(v)
    with torch.no_grad():
        model.head.weight.mul_(2.0)
    second = hess.matvec(v)
    fresh = HessianOperator(model, F.cross_entropy, chunks).matvec(v)
    assert not torch.allclose(first, second)
    torch.testing.assert_close(second, fresh, rtol=0, atol=0)


def test_dropout_is_off_so_the_operator_is_deterministic() -> None:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(5, 16), nn.ReLU(), nn.Dropout(0.5), nn.Linear(16, 3)).double()
    x, y = torch.randn(32, 5, dtype=torch.float64), torch.randint(0, 3, (32,))
    hess = HessianOperator(model, F.cross_entropy, (x, y), graph_memory=0)
    v = torch.randn(hess.dim, dtype=torch.float64)
    torch.testing.assert_close(hess.matvec(v), hess.matvec(v), rtol=0, atol=0)
    assert model.training


def test_weight_scaled_operator_is_d_h_d(exact_case) -> None:
    model = exact_case.model
    hess = HessianOperator(model, F.cross_entropy, exact_case.chunks, weight_scaled=True)
    d = torch.cat(
        [
            torch.full(
                (p.numel(),), float(p.detach().norm()) if p.dim() >= 2 else 1.0, dtype=torch.float64
            )
            for p in model.parameters()
        ]
    )
    v = torch.randn(hess.dim, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    expected = d * (exact_case.hessian @ (d * v))
    torch.testing.assert_close(hess.matvec(v), expected, rtol=1e-10, atol=1e-12)


# importing torch.compile warns about torch.jit.script_method
@pytest.mark.filterwarnings("ignore:`torch.jit.script_method` is deprecated")
def _runs_the_model_inside(wrapped: nn.Module, model: nn.Module, chunks, exact_hessian_fn) -> None:
    """The Hessian of ``wrapped`` runs ``model``: its names (no wrapper's prefix), products
    exact against the dense Hessian, the model left as found, the plain model's spectrum."""
    before = _state(model)
    with HessianOperator(wrapped, F.cross_entropy, chunks) as hess:
        assert hess.model is model
        assert hess.names == [n for n, _ in model.named_parameters()]  # no "_orig_mod." prefix
        v = torch.randn(hess.dim, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
        hv = hess.matvec(v)
    _assert_same_state(before, _state(model))
    expected = exact_hessian_fn(model, F.cross_entropy, chunks) @ v
    torch.testing.assert_close(hv, expected, rtol=0, atol=1e-12 * float(expected.abs().max()))
    spectrum = normprobe.hessian_spectrum(
        wrapped, F.cross_entropy, chunks, what="top", k=2, dtype=torch.float64
    )
    plain = normprobe.hessian_spectrum(
        model, F.cross_entropy, chunks, what="top", k=2, dtype=torch.float64
    )
    assert np.array_equal(spectrum.top_eigenvalues, plain.top_eigenvalues)


def test_a_compiled_model_is_taken_through_its_original_module(exact_hessian_fn) -> None:
    """torch.compile's graphs have no double backward: the products run the module it wrapped
    (same parameters, same function), exact against the dense Hessian; compiled submodules
    are refused with the fix."""
    model, chunks, x = _zoo_case("batch", "mlp")
    compiled = torch.compile(model)
    _runs_the_model_inside(compiled, model, chunks, exact_hessian_fn)
    # a parameter named as the compiled wrapper names it, or as the original does
    first = next(n for n, _ in compiled.named_parameters())
    assert first.startswith("_orig_mod.")
    for params in (first, first.removeprefix("_orig_mod.")):
        assert HessianOperator(compiled, F.cross_entropy, chunks, params=params).names == [
            first.removeprefix("_orig_mod.")
        ]
    inner = next(name for name, m in model.named_children())
    setattr(model, inner, torch.compile(getattr(model, inner)))
    with pytest.raises(
        HessianError, match=rf"need double backward.* compiled: {inner}; pass the model with"
    ):
        HessianOperator(model, F.cross_entropy, chunks)


def test_a_data_parallel_model_is_taken_through_its_module(exact_hessian_fn) -> None:
    """nn.DataParallel takes no functional_call (torch: "The stateless API can't be used with
    nn.DataParallel module"): the products run its module, exact against the dense Hessian, and
    names with the wrapper's "module." prefix are taken without it."""
    model, chunks, x = _zoo_case("batch", "mlp")
    wrapped = torch.compile(nn.DataParallel(model))  # wrappers in a chain are all taken off
    _runs_the_model_inside(wrapped, model, chunks, exact_hessian_fn)
    _runs_the_model_inside(nn.DataParallel(model), model, chunks, exact_hessian_fn)
    first = next(n for n, _ in model.named_parameters())
    for params in (f"_orig_mod.module.{first}", f"module.{first}", first):
        assert HessianOperator(wrapped, F.cross_entropy, chunks, params=params).names == [first]
    # a module of the model that is itself named "module" keeps its name
    holder = nn.Sequential()
    holder.add_module("module", model)
    names = HessianOperator(nn.DataParallel(holder), F.cross_entropy, chunks, params="module").names
    assert names == [f"module.{n}" for n, _ in model.named_parameters()]


class _TwiceReLU(torch.autograd.Function):
    """A ReLU with a backward of differentiable torch ops."""

    @staticmethod
    def forward(ctx, x: torch.Tensor) -> torch.Tensor:
        ctx.save_for_backward(x)
        return x.clamp(min=0)

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> torch.Tensor:
        (x,) = ctx.saved_tensors
        return grad * (x > 0)


class _OnceReLU(_TwiceReLU):
    """The same ReLU, its backward marked as one torch can run only once."""

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad: torch.Tensor) -> torch.Tensor:
        return _TwiceReLU.backward(ctx, grad)


class _CustomReLUNet(nn.Module):
    def __init__(self, relu: Any) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.hidden, self.head, self.relu = nn.Linear(6, 8), nn.Linear(8, 3), relu

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.relu(self.hidden(x)))


def test_a_once_differentiable_function_is_refused_not_left_out_of_the_products(
    exact_hessian_fn,
) -> None:
    """torch.autograd.grad never reaches the error node @once_differentiable leaves in the
    gradient's graph, so without the check the product silently drops every term through it."""
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(24, 6, generator=gen, dtype=torch.float64)
    y = torch.randint(0, 3, (24,), generator=gen)
    plain = _CustomReLUNet(F.relu).double()
    v = torch.randn(83, generator=gen, dtype=torch.float64)
    expected = exact_hessian_fn(plain, F.cross_entropy, [(x, y)]) @ v
    twice = _CustomReLUNet(_TwiceReLU.apply).double()
    hv = HessianOperator(twice, F.cross_entropy, (x, y)).matvec(v)
    torch.testing.assert_close(hv, expected, rtol=0, atol=1e-12 * float(expected.abs().max()))
    once = _CustomReLUNet(_OnceReLU.apply).double()
    message = r"custom autograd Function marked @once_differentiable \(_OnceReLU\), which torch"
    with pytest.raises(HessianError, match=message):
        HessianOperator(once, F.cross_entropy, (x, y)).matvec(v)
    with pytest.raises(HessianError, match=message):
        normprobe.hessian_spectrum(once, F.cross_entropy, (x, y), what="top", k=2)


def test_float32_model_with_float64_vectors() -> None:
    model, chunks, _ = _zoo_case("layer", "mlp")
    model32 = copy.deepcopy(model).float()
    v = torch.randn(sum(p.numel() for p in model.parameters()), dtype=torch.float64)
    hv32 = HessianOperator(model32, F.cross_entropy, chunks).matvec(v)
    hv64 = HessianOperator(model, F.cross_entropy, chunks).matvec(v)
    assert hv32.dtype == torch.float64
    torch.testing.assert_close(hv32, hv64, rtol=1e-4, atol=1e-5 * float(hv64.abs().max()))


def test_user_errors_say_what_and_how() -> None:
    model, chunks, x = _zoo_case("none", "mlp")
    with pytest.raises(HessianError, match="norm_mode must be one of train, eval"):
        HessianOperator(model, F.cross_entropy, chunks, norm_mode="test")
    with pytest.raises(HessianError, match="x has 24 samples but y"):
        HessianOperator(model, F.cross_entropy, (x, torch.zeros(3)))
    with pytest.raises(HessianError, match="not an \\(x, y\\) pair"):
        HessianOperator(model, F.cross_entropy, [x])
    hess = HessianOperator(model, lambda out, y: F.cross_entropy(out, y, reduction="none"), chunks)
    with pytest.raises(HessianError, match="mean loss over the chunk"):
        hess.matvec(torch.ones(hess.dim, dtype=torch.float64))
    with pytest.raises(HessianError, match=r"shape \(\d+,\)"):
        hess.matvec(torch.ones(3))


class _FunctionalDropout(nn.Module):
    """Dropout as ``F.dropout`` at a fixed rate: a mask no module flag or rate attribute reaches;
    ``undecided``: none, but a number drawn in every pass that decides nothing (Hugging Face's
    layer drop at rate 0)."""

    def __init__(self, undecided: bool = False, counter: bool = False) -> None:
        super().__init__()
        self.undecided = undecided
        self.fc1, self.fc2, self.fc3 = nn.Linear(4, 6), nn.Linear(6, 6), nn.Linear(6, 3)
        self.counter = counter  # a buffer the forward writes to in place, then uses
        self.register_buffer("calls", torch.ones(()))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.undecided:
            skip = self.training and float(torch.rand(())) < 0.0
            return x[:, :3] if skip else self.fc3(torch.tanh(self.fc2(torch.tanh(self.fc1(x)))))
        h = torch.tanh(self.fc1(x))
        if self.counter:
            self.calls.add_(1.0)
            h = h * self.calls  # saved for the backward pass
        h = F.dropout(h, 0.5, self.training)
        h = F.dropout(torch.tanh(self.fc2(h)), 0.5, self.training)
        return self.fc3(h)


def test_random_draws_of_the_forward_pass_are_seeded_per_chunk_and_said() -> None:
    """A forward pass that drew a fresh dropout mask at every graph build gave another Hessian
    per call with the same seed (top eigenvalue 0.694, then 0.771), drew from the caller's
    random stream, and would have given another matrix per product wherever a chunk's graph
    is rebuilt. The draws now come from generators seeded by the seed and the chunk: the
    products are exact against the dense Hessian of the network under those draws, equal bit
    for bit whether graphs are kept or rebuilt, repeatable, and said in a warning (not where
    the numbers drawn decide nothing, nor in eval mode, where this dropout is off)."""
    from normprobe.hessian.hvp import _chunk_seed

    def make(**kw: Any) -> nn.Module:
        torch.manual_seed(0)
        return _FunctionalDropout(**kw).double()

    net = make()
    g = torch.Generator().manual_seed(3)
    x = torch.randn(32, 4, generator=g, dtype=torch.float64)
    y = torch.randint(0, 3, (32,), generator=g)
    chunks = [(x[:16], y[:16]), (x[16:], y[16:])]
    stream = torch.random.get_rng_state()

    def dense(**kw: Any) -> torch.Tensor:  # a model of its own: said once per model
        op = HessianOperator(make(), F.cross_entropy, (x, y), chunk_size=16, **kw)
        said = "the Hessian is that of the network with one draw per chunk"
        # the graphs are built at the first product
        with pytest.warns(UserWarning, match=said) as caught:
            rows = [op.matvec(e) for e in torch.eye(op.dim, dtype=torch.float64)]
        assert {w.filename for w in caught} == {__file__}  # the caller's line
        return torch.stack(rows)

    kept = dense(seed=7)
    names = [n for n, _ in net.named_parameters()]
    params = {n: p.detach().clone().requires_grad_(True) for n, p in net.named_parameters()}
    exact = torch.zeros_like(kept)
    for index, (xc, yc) in enumerate(chunks):
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(_chunk_seed(7, 0, index))
            out = torch.func.functional_call(net, params, (xc,))
        loss = F.cross_entropy(out, yc) * (len(xc) / len(x))
        grads = torch.autograd.grad(loss, [params[n] for n in names], create_graph=True)
        flat = torch.cat([t.reshape(-1) for t in grads])
        for i in range(flat.numel()):
            row = torch.autograd.grad(flat[i], [params[n] for n in names], retain_graph=True)
            exact[i] += torch.cat([t.reshape(-1) for t in row])
    torch.testing.assert_close(kept, exact, rtol=1e-12, atol=1e-14)
    assert torch.equal(dense(seed=7, graph_memory=0), kept)  # rebuilt per product: the same draws
    assert torch.equal(dense(seed=7), kept)
    assert not torch.allclose(dense(seed=8), kept)  # another seed, other draws
    assert torch.equal(torch.random.get_rng_state(), stream)  # the caller's stream, untouched
    spectrum = normprobe.hessian_spectrum  # ARPACK asks for the products from scipy
    with pytest.warns(UserWarning, match="one draw per chunk") as caught:
        tops = [spectrum(net, F.cross_entropy, (x, y), what="top", k=2).top.values]
    assert {w.filename for w in caught} == {__file__}  # the caller's line, not scipy's
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # said once per model
        tops.append(spectrum(net, F.cross_entropy, (x, y), what="top", k=2).top.values)
    assert np.array_equal(*tops)
    undecided = make(undecided=True)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # eval mode: F.dropout(..., self.training) is off
        op = HessianOperator(net, F.cross_entropy, (x, y), chunk_size=16, norm_mode="eval")
        op.matvec(torch.ones(op.dim, dtype=torch.float64))
        op = HessianOperator(undecided, F.cross_entropy, (x, y), chunk_size=16)
        op.matvec(torch.ones(op.dim, dtype=torch.float64))
        assert not op.draws
    # the repeated pass runs on copies of the buffers: a forward that writes to one in place
    # and then uses it leaves the kept graphs as a rebuilt one is
    counting, v = make(counter=True), torch.randn(kept.shape[0], generator=g, dtype=torch.float64)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        products = [
            HessianOperator(counting, F.cross_entropy, (x, y), chunk_size=16, **kw).matvec(v)
            for kw in ({}, {"graph_memory": 0})
        ]
    assert torch.equal(*products)
    assert float(counting.calls) == 1.0  # put back as found


class _Autocast(nn.Module):
    """A forward that enters ``torch.autocast`` itself (``cast``), or switches it off for a part
    that must stay in float32 (``cast=None``, as Hugging Face's rotary embeddings do)."""

    def __init__(self, cast: bool | None) -> None:
        super().__init__()
        self.cast = cast
        self.fc1, self.fc2 = nn.Linear(8, 16), nn.Linear(16, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bool(self.cast)):
            return self.fc2(torch.tanh(self.fc1(x))).float()


def _autocast_products(cast: bool | None | nn.Module) -> torch.Tensor:
    g = torch.Generator().manual_seed(4)
    x, y = torch.randn(64, 8, generator=g), torch.randint(0, 3, (64,), generator=g)
    torch.manual_seed(0)
    model = cast if isinstance(cast, nn.Module) else _Autocast(cast)
    op = HessianOperator(model, F.cross_entropy, (x, y), chunk_size=64)
    return torch.stack([op.matvec(e) for e in torch.eye(op.dim)[:20]])


def test_autocast_the_forward_turns_on_itself_is_said() -> None:
    """An autocast region that the model's forward enters itself cannot be switched off from
    outside: its products carry bfloat16's rounding, and the only sign was the top eigenvalues
    missing their tolerance with a hint about float32. A warning now names it, at the
    caller's line; a forward that switches autocast off, or never turns it on, says nothing."""
    with pytest.warns(
        UserWarning, match=r"turns torch.autocast on itself \(bfloat16, running fc1, fc2\)"
    ) as caught:
        cast = _autocast_products(True)
    assert {w.filename for w in caught} == {__file__}
    torch.manual_seed(0)
    model = _Autocast(True)
    with pytest.warns(UserWarning, match="turns torch.autocast on itself"):
        _autocast_products(model)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        _autocast_products(model)  # once per model: a training loop measures it at every step
        plain, off = _autocast_products(False), _autocast_products(None)
    assert torch.equal(plain, off)
    # the warning's reason: bfloat16's rounding, far above float32's
    assert float((cast - plain).norm() / plain.norm()) > 1e-3


def test_products_inside_a_loop_s_autocast_region_are_those_outside_it() -> None:
    """The operator used directly inside a training loop's autocast region: the graphs were
    built in full precision, but the products' backward pass ran under the caller's autocast
    state and cast its matrix multiplications to bfloat16 (3e-3 relative here). The products
    now equal those outside the region, bit for bit, and nothing is said."""
    plain = _autocast_products(False)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        with torch.autocast("cpu", dtype=torch.bfloat16):
            outer = _autocast_products(False)
    assert torch.equal(plain, outer)
