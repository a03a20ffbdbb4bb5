"""Models normprobe did not build: Hugging Face GPT-2 and BERT, and a ResNet with F.relu.

For each: every public probe and ``hessian_spectrum`` runs, the layers are
those the rules say (every module owning a weight for the gradient probes,
the blocks for the representations), the model is left exactly as found,
and a Hessian-vector product matches the exact Hessian of a small parameter
block in float64 (``torch.autograd.functional.hessian`` of the loss).
The Hugging Face models are built from tiny configs with random weights: no
download.
"""

from __future__ import annotations

import re
import warnings
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call
from torch.nn.attention import SDPBackend, sdpa_kernel

import normprobe
from normprobe.hessian import HessianOperator
from normprobe.probes import (
    ProbeError,
    batch_dependence,
    batch_mean,
    gradient_correlation,
    gradient_norms,
    gradient_statistics,
    representation_correlation,
    signal_statistics,
    train_eval_gap,
)

transformers = pytest.importorskip("transformers")

V, T, N = 24, 6, 6


def _gpt2() -> nn.Module:
    torch.manual_seed(0)
    config = transformers.GPT2Config(
        vocab_size=V, n_positions=16, n_embd=8, n_layer=2, n_head=2, n_inner=16,
        bos_token_id=0, eos_token_id=0, pad_token_id=0,
    )  # fmt: skip
    return transformers.GPT2LMHeadModel(config).double()


def _bert() -> nn.Module:
    torch.manual_seed(0)
    config = transformers.BertConfig(
        vocab_size=V, hidden_size=8, num_hidden_layers=2, num_attention_heads=2,
        intermediate_size=16, max_position_embeddings=16, num_labels=3, pad_token_id=0,
    )  # fmt: skip
    return transformers.BertForSequenceClassification(config).double()


class BasicBlock(nn.Module):
    """conv-bn-relu-conv-bn plus the input, then relu: activations are F.relu calls."""

    def __init__(self, c: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(c, c, 3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(c)
        self.conv2 = nn.Conv2d(c, c, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(c)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.relu(self.bn1(self.conv1(x)))
        return F.relu(x + self.bn2(self.conv2(out)))


class ResNet(nn.Module):
    def __init__(self, c: int = 4, classes: int = 3) -> None:
        super().__init__()
        self.stem = nn.Conv2d(1, c, 3, padding=1, bias=False)
        self.bn = nn.BatchNorm2d(c)
        self.layer1 = nn.Sequential(BasicBlock(c), BasicBlock(c))
        self.fc = nn.Linear(c, classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.layer1(F.relu(self.bn(self.stem(x))))
        return self.fc(h.mean(dim=(2, 3)))


def _resnet() -> nn.Module:
    torch.manual_seed(0)
    return ResNet().double().to(memory_format=torch.channels_last)


def _lm_loss(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    return F.cross_entropy(logits.reshape(-1, logits.shape[-1]), targets.reshape(-1))


def _lm_batches() -> tuple[tuple, tuple]:
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(1, V, (2, N, T + 1), generator=g)
    return (ids[0, :, :-1], ids[0, :, 1:]), (ids[1, :, :-1], ids[1, :, 1:])


def _bert_batches() -> tuple[tuple, tuple]:
    g = torch.Generator().manual_seed(2)
    out = []
    for _ in range(2):
        ids = torch.randint(1, V, (N, T), generator=g)
        mask = torch.ones(N, T, dtype=torch.long)
        mask[: N // 2, -2:] = 0  # padding at the end of half the sequences
        out.append(
            ({"input_ids": ids, "attention_mask": mask}, torch.randint(0, 3, (N,), generator=g))
        )
    return out[0], out[1]


def _image_batches() -> tuple[tuple, tuple]:
    g = torch.Generator().manual_seed(3)
    x = torch.randn(2, N, 1, 6, 6, generator=g, dtype=torch.float64)
    y = torch.randint(0, 3, (2, N), generator=g)
    cl = torch.channels_last
    return (x[0].contiguous(memory_format=cl), y[0]), (x[1].contiguous(memory_format=cl), y[1])


CASES: dict[str, tuple[Callable[[], nn.Module], Callable, Callable]] = {
    "gpt2": (_gpt2, _lm_loss, _lm_batches),
    "bert": (_bert, F.cross_entropy, _bert_batches),
    "resnet": (_resnet, F.cross_entropy, _image_batches),
}

# the rules' answers, written out: modules owning a weight (less embeddings and norms), and blocks
WEIGHT_LAYERS = {
    "gpt2": [
        f"transformer.h.{i}.{m}"
        for i in range(2)
        for m in ("attn.c_attn", "attn.c_proj", "mlp.c_fc", "mlp.c_proj")
    ]
    + ["lm_head"],
    "bert": [
        f"bert.encoder.layer.{i}.{m}"
        for i in range(2)
        for m in (
            "attention.self.query",
            "attention.self.key",
            "attention.self.value",
            "attention.output.dense",
            "intermediate.dense",
            "output.dense",
        )
    ]
    + ["bert.pooler.dense", "classifier"],
    "resnet": ["stem"] + [f"layer1.{i}.conv{j}" for i in range(2) for j in (1, 2)] + ["fc"],
}
BLOCKS = {
    "gpt2": ["transformer.h.0", "transformer.h.1"],
    # the blocks, then the pooler's tanh (an activation module outside every block)
    "bert": ["bert.encoder.layer.0", "bert.encoder.layer.1", "bert.pooler.activation"],
    "resnet": ["layer1.0", "layer1.1"],
}
# the parameters the Hessian leaves out with embeddings=False, norms=False (besides none frozen)
LEFT_OUT = {"gpt2": 2 + 2 * 2 * 2 + 2, "bert": 3 + 2 + 2 * 2 * 2, "resnet": 2 + 2 * 2 * 2}


def _state(model: nn.Module) -> dict[str, object]:
    return {
        "tensors": {k: v.clone() for k, v in model.state_dict(keep_vars=True).items()},
        "grads": {n: p.grad for n, p in model.named_parameters()},
        "flags": {n: m.training for n, m in model.named_modules()},
        "requires_grad": {n: p.requires_grad for n, p in model.named_parameters()},
        "attributes": {n: sorted(vars(m)) for n, m in model.named_modules()},
        "hooks": sum(len(m._forward_hooks) + len(m._forward_pre_hooks) for m in model.modules()),
    }


def _assert_same(before: dict, after: dict) -> None:
    for k, v in before["tensors"].items():
        assert torch.equal(v, after["tensors"][k]), k
    for key in ("grads", "flags", "requires_grad", "attributes", "hooks"):
        assert before[key] == after[key], key


def _inputs(batch: tuple) -> object:
    return batch[0]


@pytest.mark.slow
@pytest.mark.parametrize("case", list(CASES))
def test_every_probe_and_the_hessian_run_cover_the_rule_and_leave_the_model(case: str) -> None:
    build, loss_fn, batches = CASES[case]
    model = build()
    a, b = batches()
    before = _state(model)

    grads = gradient_norms(model, loss_fn, a)
    assert grads.query("metric == 'grad_norm'")["layer"].tolist() == WEIGHT_LAYERS[case]
    assert (
        grads["value"].notna().all() and (grads.query("metric == 'grad_norm'")["value"] > 0).all()
    )
    assert grads["layer_rule"].iloc[0].startswith("weights: modules owning a weight")
    corr = gradient_correlation(model, loss_fn, a, b)
    assert corr["layer"].tolist() == WEIGHT_LAYERS[case] and corr["value"].between(-1, 1).all()
    stats = gradient_statistics(model, loss_fn, a, b)
    assert set(stats["metric"]) == {"grad_corr", "grad_norm", "grad_norm_ratio"}
    with_norms = gradient_norms(model, loss_fn, a, embeddings=True, norms=True)
    assert set(with_norms["role"]) == {"weight", "norm"} | (
        {"embedding"} if case != "resnet" else set()
    )

    if case == "resnet":
        rep = representation_correlation(model, _inputs(a))
    else:  # token ids: no noise, a second batch
        rep = representation_correlation(
            model, _inputs(a), pairing="independent", x_other=_inputs(b)
        )
    assert rep["layer"].tolist() == ["input", *BLOCKS[case]]
    assert rep["layer_rule"].iloc[0].startswith("blocks:")
    assert rep["value"].between(-1, 1).all()
    within = representation_correlation(model, _inputs(a), pairing="within")
    assert within["layer"].tolist() == ["input", *BLOCKS[case]]
    assert batch_dependence(model, _inputs(a), _inputs(b))["layer"].tolist()[:-1] == BLOCKS[case]
    assert train_eval_gap(model, _inputs(a))["value"].notna().all()
    axis = None if case == "resnet" else -1  # the blocks' inputs are (N, T, D) hidden states
    assert len(signal_statistics(model, _inputs(a), channel_axis=axis)) == 2 * len(BLOCKS[case])
    assert len(batch_mean(model, _inputs(a))) > 0

    num_classes = {"gpt2": V, "bert": 3, "resnet": 3}[case]
    spec = normprobe.hessian_spectrum(
        model, loss_fn, a, what=("top", "trace", "density"), k=2, steps=8, num_vectors=1,
        trace_samples=4, num_classes=num_classes if case == "gpt2" else None,
        embeddings=False, norms=False,
    )  # fmt: skip
    assert spec.num_classes == num_classes
    assert len(spec.excluded) == LEFT_OUT[case]
    assert set(spec.excluded.values()) <= {"embedding", "norm"}
    assert all(torch.isfinite(torch.as_tensor(n)).all() for n in spec.nodes)
    assert spec.top_eigenvalues[0] >= spec.top_eigenvalues[1]
    _assert_same(before, _state(model))


# the parameter block whose exact Hessian is built, and how to read the loss
EXACT = {"gpt2": "transformer.h.1.mlp.c_proj", "bert": "classifier", "resnet": "layer1.1.conv2"}


@pytest.mark.slow
@pytest.mark.parametrize("case", list(CASES))
def test_hessian_vector_products_match_the_exact_hessian_of_a_block(case: str) -> None:
    build, loss_fn, batches = CASES[case]
    model = build()
    batch, _ = batches()
    inputs, targets = batch
    prefix = EXACT[case]
    names = [n for n, _ in model.named_parameters() if n.startswith(prefix + ".")]
    shapes = [model.get_submodule(prefix).get_parameter(n[len(prefix) + 1 :]).shape for n in names]
    flat = torch.cat([model.get_parameter(n).detach().reshape(-1) for n in names])

    # reference: a copy in train mode with dropout off, as the operator runs the model (the
    # copy's BatchNorm running statistics take this pass's update; the model's do not)
    reference = build()
    reference.load_state_dict(model.state_dict())
    reference.train()
    for m in reference.modules():  # attention dropout too: GPT-2 passes attn_dropout.p to SDPA
        if isinstance(m, nn.Dropout):
            m.p = 0.0

    def loss_of(w: torch.Tensor) -> torch.Tensor:
        parts = torch.split(w, [s.numel() for s in shapes])
        values = {n: p.reshape(s) for n, p, s in zip(names, parts, shapes)}
        args, kwargs = ((), inputs) if isinstance(inputs, dict) else ((inputs,), {})
        out = functional_call(reference, values, args, kwargs, strict=False)
        return loss_fn(out.logits if hasattr(out, "logits") else out, targets)

    with sdpa_kernel(SDPBackend.MATH):
        exact = torch.autograd.functional.hessian(loss_of, flat)
    with HessianOperator(model, loss_fn, batch, params=prefix) as op:
        assert op.dim == flat.numel() and op.names == names
        g = torch.Generator().manual_seed(0)
        for _ in range(3):
            v = torch.randn(op.dim, generator=g, dtype=torch.float64)
            torch.testing.assert_close(op.matvec(v), exact @ v, rtol=1e-9, atol=1e-11)
            op.release()  # rebuilt: a product with attention dropout left on would differ
            torch.testing.assert_close(op.matvec(v), exact @ v, rtol=1e-9, atol=1e-11)
    spec = normprobe.hessian_spectrum(model, loss_fn, batch, params=prefix, what="top", k=2,
                                      num_classes=1)  # fmt: skip
    top = torch.linalg.eigvalsh(exact).flip(0)[:2].numpy()
    assert spec.top_eigenvalues == pytest.approx(top, rel=1e-7)


def _checkpointing(model: nn.Module, reentrant: bool) -> nn.Module:
    """Activation checkpointing on, by the method this transformers version has."""
    kwargs = {"use_reentrant": reentrant}
    if hasattr(model, "activation_checkpointing_enable"):  # transformers >= 5
        model.activation_checkpointing_enable(activation_checkpointing_kwargs=kwargs)
    else:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)
    return model


def test_activation_checkpointing_gives_the_products_and_probes_without_it() -> None:
    """Non-reentrant checkpointing recomputes the blocks in the backward passes, outside the
    forward's dropout-off, train mode and math attention kernel: the products' backward runs
    them as the forward did, so every value is that of the model without checkpointing."""
    batch, other = _lm_batches()
    plain = _gpt2()
    checkpointed = _checkpointing(_gpt2(), reentrant=False)
    checkpointed.eval()  # the operator's train mode must hold in the recomputation too
    _lm_loss(checkpointed(batch[0]).logits, batch[1]).backward()  # grads a loop has not used
    grads = {n: p.grad.clone() for n, p in checkpointed.named_parameters()}
    before = _state(checkpointed)
    v = torch.randn(
        sum(p.numel() for p in plain.parameters()),
        generator=torch.Generator().manual_seed(0),
        dtype=torch.float64,
    )
    with HessianOperator(plain, _lm_loss, batch) as op:
        expected = op.matvec(v)
        assert not op.recomputes
    with HessianOperator(checkpointed, _lm_loss, batch) as op:
        hv = op.matvec(v)
        assert op.recomputes
        torch.testing.assert_close(op.matvec(v), hv, rtol=0, atol=0)
    torch.testing.assert_close(hv, expected, rtol=0, atol=1e-13 * float(expected.abs().max()))
    _assert_same(before, _state(checkpointed))
    assert all(torch.equal(p.grad, grads[n]) for n, p in checkpointed.named_parameters())
    norms = gradient_norms(checkpointed, _lm_loss, batch)["value"]
    assert norms.tolist() == gradient_norms(plain, _lm_loss, batch)["value"].tolist()


def _convnext(drop_path_rate: float) -> nn.Module:
    config = transformers.ConvNextConfig(
        num_channels=1, hidden_sizes=[4, 8], depths=[2, 2], num_stages=2, num_labels=3,
        drop_path_rate=drop_path_rate, layer_scale_init_value=1.0, patch_size=2,
    )  # fmt: skip
    torch.manual_seed(0)
    return transformers.ConvNextForImageClassification(config).double()


class LayerDropConfig:
    """A Hugging Face style config, read at call time as Wav2Vec2's encoder reads its own."""

    def __init__(self, layerdrop: float) -> None:
        self.layerdrop = layerdrop

    def to_dict(self) -> dict[str, float]:
        return dict(vars(self))


class _LayerDropNet(nn.Module):
    """Skips its middle layer in training mode with probability config.layerdrop."""

    def __init__(self, layerdrop: float) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.config = LayerDropConfig(layerdrop)
        self.layers = nn.ModuleList(nn.Linear(6, 6) for _ in range(3))
        self.head = nn.Linear(6, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for i, layer in enumerate(self.layers):
            if i == 1 and self.training and float(torch.rand(())) < self.config.layerdrop:
                continue
            x = torch.tanh(layer(x))
        return self.head(x)


@pytest.mark.parametrize("case", ["drop_path", "layerdrop"])
def test_stochastic_depth_and_layer_drop_are_off_like_dropout(case: str) -> None:
    """Drop path (ConvNeXt's) and layer drop skip whole branches or layers in training mode:
    the probes and the Hessian measure the network without them, as with dropout, and
    put the rates back."""
    if case == "drop_path":
        build, rate = _convnext, 0.9
        x = torch.randn(8, 1, 8, 8, generator=torch.Generator().manual_seed(2), dtype=torch.float64)
    else:
        build, rate = (lambda r: _LayerDropNet(r).double()), 0.9
        x = torch.randn(8, 6, generator=torch.Generator().manual_seed(2), dtype=torch.float64)
    y = torch.randint(0, 3, (8,), generator=torch.Generator().manual_seed(1))
    plain, dropping = build(0.0), build(rate)
    dropping.load_state_dict(plain.state_dict())
    before = _state(dropping)

    def measured(model: nn.Module) -> tuple:
        norms = gradient_norms(model, F.cross_entropy, (x, y))["value"].tolist()
        reps = representation_correlation(model, x)["value"].tolist()
        top = normprobe.hessian_spectrum(
            model, F.cross_entropy, (x, y), what="top", k=2, dtype=torch.float64
        ).top_eigenvalues.tolist()
        return norms, reps, top

    assert measured(dropping) == measured(plain)
    _assert_same(before, _state(dropping))
    if case == "layerdrop":
        assert dropping.config.layerdrop == rate
    else:
        assert dropping.config.drop_path_rate == rate


def test_reentrant_checkpointing_is_refused_with_the_fix() -> None:
    model = _checkpointing(_gpt2(), reentrant=True)
    batch, _ = _lm_batches()
    fix = r"use_reentrant=True .*; checkpoint with use_reentrant=False"
    with pytest.raises(ProbeError, match=fix):
        gradient_norms(model, _lm_loss, batch)
    with pytest.raises(normprobe.hessian.HessianError, match=fix):
        normprobe.hessian_spectrum(model, _lm_loss, batch, what="top", k=2, num_classes=V)


def test_padding_in_the_inputs_is_said_by_the_representation_probe() -> None:
    """The correlations take every position of a (N, T, D) output, padded ones too: said, with
    the count, once per call; unpadded inputs and other probes say nothing."""
    model = _bert()
    (a, _), (b, _) = _bert_batches()  # 3 of 6 sequences end in 2 padded positions
    said = r"attention_mask marks {} of {} positions as padding; .* the padded ones too"
    with pytest.warns(UserWarning, match=said.format(6, 36)):
        within = representation_correlation(model, a, pairing="within")
    with pytest.warns(UserWarning, match=said.format(12, 72)):
        representation_correlation(model, a, pairing="independent", x_other=b)
    full = {key: dict(x, attention_mask=torch.ones_like(x["attention_mask"])) for key, x in
            (("a", a), ("b", b))}  # fmt: skip
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        representation_correlation(model, full["a"], pairing="independent", x_other=full["b"])
        representation_correlation(model, {"input_ids": a["input_ids"]}, pairing="within")
    assert len(within) == 4  # the input, the two blocks and the pooler, as without padding

    class Encoder(nn.Module):  # torch's convention: True marks padding
        def __init__(self) -> None:
            super().__init__()
            self.embed = nn.Embedding(V, 8)
            self.layers = nn.TransformerEncoder(
                nn.TransformerEncoderLayer(8, 2, 16, dropout=0.0, batch_first=True), 2
            )

        def forward(self, ids: torch.Tensor, src_key_padding_mask: torch.Tensor) -> torch.Tensor:
            return self.layers(self.embed(ids), src_key_padding_mask=src_key_padding_mask)

    pad = a["attention_mask"] == 0
    with pytest.warns(UserWarning, match="src_key_padding_mask marks 6 of 36 positions"):
        representation_correlation(
            Encoder(), {"ids": a["input_ids"], "src_key_padding_mask": pad}, pairing="within"
        )


def test_changing_the_attention_mask_changes_the_probes() -> None:
    model = _bert()
    (inputs, targets), _ = _bert_batches()
    full = dict(inputs, attention_mask=torch.ones_like(inputs["attention_mask"]))
    padded = representation_correlation(model, inputs, pairing="within")
    unpadded = representation_correlation(model, full, pairing="within")
    # the input row flattens ids and mask together; every block's value moves with the mask
    diff = (padded["value"] - unpadded["value"]).abs()
    assert (diff.iloc[1:] > 1e-6).all()
    g_padded = gradient_norms(model, F.cross_entropy, (inputs, targets))
    g_full = gradient_norms(model, F.cross_entropy, (full, targets))
    assert not torch.allclose(
        torch.tensor(g_padded["value"].values), torch.tensor(g_full["value"].values)
    )


def test_a_dropped_input_is_caught() -> None:
    """The old reading of (ids, mask) as (x, y) dropped the mask and still returned numbers."""

    class Masked(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.embed = nn.Embedding(V, 8)
            self.blocks = nn.ModuleList(nn.Sequential(nn.Linear(8, 8), nn.Tanh()) for _ in range(2))

        def forward(self, ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
            h = self.embed(ids) * mask[..., None]
            for block in self.blocks:
                h = h + block(h)
            return h

    torch.manual_seed(0)
    model = Masked()
    ids = torch.randint(0, V, (4, T))
    ones, half = torch.ones(4, T), torch.ones(4, T)
    half[:, T // 2 :] = 0
    a = representation_correlation(model, (ids, ones), pairing="within", layers=["blocks.1"])
    b = representation_correlation(model, (ids, half), pairing="within", layers=["blocks.1"])
    assert a["value"].iloc[-1] != pytest.approx(b["value"].iloc[-1])  # the mask reached the model
    # the noise pairing perturbs the float mask only, never the token ids
    noisy = representation_correlation(model, (ids, half), layers=["blocks.1"])
    assert noisy["value"].iloc[-1] < 1
    # a model that takes one input, given an (inputs, targets) pair: refused, not half-used
    resnet = _resnet()
    (x, y), _ = _image_batches()
    with pytest.raises(ProbeError, match=r"cannot take the inputs, a tuple of 2 tensors"):
        representation_correlation(resnet, (x, y))
    with pytest.raises(ProbeError, match=r"cannot take the inputs, a dict with keys \['ids'\]"):
        representation_correlation(model, {"ids": ids}, pairing="within")
    with pytest.raises(
        ProbeError, match=r"must be an \(inputs, targets\) pair, got tuple of length 3"
    ):
        gradient_norms(model, F.cross_entropy, (ids, ones, ids))
    with pytest.raises(ProbeError, match="disagree on the number of examples"):
        gradient_norms(model, None, ((ids, ones[:3]), None))


def test_the_model_s_own_loss_and_a_named_output() -> None:
    model = _gpt2()
    (x, y), _ = _lm_batches()
    own = gradient_norms(model, None, ({"input_ids": x, "labels": x}, None))
    # Hugging Face shifts the labels itself: the same loss as (x[:, :-1] -> x[:, 1:])
    mine = gradient_norms(
        model, lambda logits, t: _lm_loss(logits[:, :-1], t[:, 1:]), ({"input_ids": x}, x)
    )
    # (Hugging Face's loss upcasts the logits with .float(): float32, even for a float64 model)
    assert own["value"].tolist() == pytest.approx(mine["value"].tolist(), rel=1e-6)
    named = gradient_norms(model, _lm_loss, ({"input_ids": x}, y), output="logits")
    assert named["value"].tolist() == pytest.approx(
        gradient_norms(model, _lm_loss, (x, y))["value"].tolist()
    )
    with pytest.raises(ProbeError, match=r"output='hidden' names no key or attribute"):
        gradient_norms(model, _lm_loss, (x, y), output="hidden")


def test_no_warning_or_output_on_a_float64_gpt2() -> None:
    model = _gpt2()
    batch, _ = _lm_batches()
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        spec = normprobe.hessian_spectrum(model, _lm_loss, batch, what="trace", trace_samples=2)
    assert torch.isfinite(torch.tensor(spec.trace))


@pytest.mark.slow
def test_the_readme_s_own_model_example_reports_what_the_readme_says(monkeypatch) -> None:
    text = (Path(__file__).resolve().parents[1] / "README.md").read_text()
    section = text.split("## Your own model", 1)[1].split("\n## ", 1)[0]
    code = re.search(r"```python\n(.*?)\n```", section, flags=re.S).group(1)
    seen: dict[str, object] = {}
    real = normprobe.hessian_spectrum

    def recording(*args: object, **kwargs: object) -> object:
        seen["spec"] = real(*args, **kwargs)
        return seen["spec"]

    monkeypatch.setattr(normprobe, "hessian_spectrum", recording)
    namespace: dict[str, object] = {}
    exec(compile(code, "README.md", "exec"), namespace)
    spec = seen["spec"]
    assert spec.num_classes == 32 and spec.dim == 7360
    assert spec.top_eigenvalues == pytest.approx([7.32, 6.79, 5.76], abs=0.006)
    assert spec.outlier_ratio == pytest.approx(5.21, abs=0.006)
    assert "rms" in type(namespace["model"].transformer.ln_f.inner).__name__.lower()
