"""The batch contract (normprobe.batch) and the roles of layers (normprobe.roles)."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch
from torch import nn
from torch.nn.utils.parametrizations import weight_norm

from normprobe.batch import (
    BatchError,
    attributes_kept,
    call_model,
    chunk_batch,
    compute_loss,
    dropout_off,
    map_floating,
    prediction,
    split_batch,
    to_device,
)
from normprobe.roles import find_blocks, is_normalizer, weight_layers


def test_split_batch_takes_tensor_tuple_and_dict_inputs_and_says_what_is_wrong() -> None:
    x, m, y = torch.zeros(4, 3), torch.ones(4, 3, dtype=torch.long), torch.zeros(4)
    assert split_batch((x, y))[0] is x
    assert split_batch([(x, m), None])[0] == (x, m)
    assert list(split_batch(({"a": x, "use_cache": False}, y))[0]) == ["a", "use_cache"]
    with pytest.raises(
        BatchError, match=r"must be an \(inputs, targets\) pair, got tuple of length 3"
    ):
        split_batch((x, m, y))
    with pytest.raises(BatchError, match="targets must be a tensor or None, got list"):
        split_batch((x, [0, 1]))
    dataset = torch.utils.data.TensorDataset(x, y)
    with pytest.raises(BatchError, match=r"got DataLoader; take one batch of it: next\(iter"):
        split_batch(torch.utils.data.DataLoader(dataset, batch_size=2))
    with pytest.raises(BatchError, match=r"got TensorDataset; take one batch of it: torch.utils"):
        split_batch(dataset)
    # the fix the message names gives a batch
    assert split_batch(torch.utils.data.default_collate([dataset[i] for i in range(4)]))
    with pytest.raises(BatchError, match=r"x has 4 samples but y has shape \(3,\)"):
        split_batch((x, y[:3]))
    with pytest.raises(BatchError, match=r"disagree on the number of examples.*inputs\[1\]: 2"):
        split_batch(((x, m[:2]), y))
    with pytest.raises(BatchError, match="a mapping without any tensor"):
        split_batch(({"a": 1}, y))


def test_chunks_and_device_moves_cut_and_cast_every_tensor_alike() -> None:
    x = torch.arange(10.0)[:, None]
    ids = torch.arange(10)
    chunks = chunk_batch({"x": x, "ids": ids, "flag": True}, ids * 2, 3)
    assert [len(c[0]["x"]) for c in chunks] == [4, 3, 3]
    for inputs, targets in chunks:  # rows stay together
        assert torch.equal(inputs["x"][:, 0].long(), inputs["ids"]) and torch.equal(
            targets, inputs["ids"] * 2
        )
        assert inputs["flag"] is True
    moved = to_device((x, ids), torch.device("cpu"), torch.float64)
    assert moved[0].dtype == torch.float64 and moved[1].dtype == torch.int64  # ids keep theirs
    noisy, changed = map_floating({"x": x, "ids": ids}, lambda t: t + 1)
    assert changed == ["x"] and torch.equal(noisy["ids"], ids) and torch.equal(noisy["x"], x + 1)


def test_the_prediction_rule_and_output_picks() -> None:
    logits = torch.zeros(2, 3)
    hf_like = SimpleNamespace(loss=torch.tensor(1.5), logits=logits)
    assert prediction(hf_like) is logits
    assert prediction({"logits": logits, "loss": 1}) is logits
    assert prediction((logits, torch.ones(1))) is logits
    assert prediction((torch.ones(1), logits), 1) is logits
    assert prediction(hf_like, "loss").shape == ()
    assert prediction(hf_like, lambda out: out.logits * 2).shape == (2, 3)
    with pytest.raises(BatchError, match="cannot tell the prediction.*say which with output="):
        prediction(SimpleNamespace(hidden=logits))
    with pytest.raises(BatchError, match=r"output=5 takes position 5"):
        prediction((logits,), 5)
    assert compute_loss(None, hf_like, None).item() == 1.5
    with pytest.raises(BatchError, match="loss_fn=None takes the model's own loss"):
        compute_loss(None, logits, None)


def test_a_loss_function_that_raises_is_named_not_the_targets() -> None:
    def smoothed(prediction: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        raise RuntimeError("boom")

    message = r"loss_fn \(smoothed\) raised RuntimeError on the prediction \(shape \(2, 3\)\) and "
    with pytest.raises(BatchError, match=message + r"the targets \(shape \(2,\)\): boom"):
        compute_loss(smoothed, torch.zeros(2, 3), torch.zeros(2, dtype=torch.long))
    with pytest.raises(BatchError, match=r"loss_fn \(MSELoss\) raised"):
        compute_loss(nn.MSELoss(), torch.zeros(2, 3), torch.zeros(5))


def test_call_model_passes_every_input_and_refuses_what_forward_cannot_take() -> None:
    class Two(nn.Module):
        def forward(self, x: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
            return x if mask is None else x * mask

    x, mask = torch.ones(2, 3), torch.zeros(2, 3)
    assert call_model(Two(), (x, mask)).sum() == 0
    assert call_model(Two(), {"x": x, "mask": mask}).sum() == 0
    with pytest.raises(BatchError, match=r"cannot take the inputs, a tuple of 3 tensors"):
        call_model(Two(), (x, mask, mask))
    with pytest.raises(BatchError, match=r"a dict with keys \['x', 'other'\]"):
        call_model(Two(), {"x": x, "other": mask})


def test_attributes_kept_and_dropout_off_put_everything_back() -> None:
    class Cache(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.attention_dropout = 0.25
            self.drop = nn.Dropout(0.5)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            self.cached = x  # a third-party layer's cache, added on the first call
            return self.drop(x) * (1 - self.attention_dropout)

    m = Cache().train()
    with attributes_kept(m), dropout_off(m):
        assert torch.equal(m(torch.ones(3)), torch.ones(3))  # no dropout at all
        assert m.drop.p == 0.0 and m.attention_dropout == 0.0 and not m.drop.training
    assert not hasattr(m, "cached") and m.drop.p == 0.5 and m.attention_dropout == 0.25


def test_attributes_kept_puts_back_rebound_removed_and_reordered_attributes() -> None:
    """Every way a pass can leave a module's attributes: rebound (same keys), removed, added,
    two values swapped, and a key removed and added again (other order, equal keys)."""
    m = nn.Linear(2, 2)
    a, b, flag = object(), object(), object()
    m.a, m.b, m.flag = a, b, flag
    before = dict(vars(m))
    cases = [
        lambda: setattr(m, "flag", object()),
        lambda: delattr(m, "flag"),
        lambda: setattr(m, "new", 1),
        lambda: (setattr(m, "a", b), setattr(m, "b", a)),
        lambda: (delattr(m, "a"), setattr(m, "a", a)),
    ]
    for change in cases:
        with attributes_kept(m):
            change()
            assert vars(m) != before or list(vars(m)) != list(before)
        assert all(vars(m)[k] is v for k, v in before.items()) and vars(m).keys() == before.keys()


def test_roles_find_weights_norms_embeddings_and_blocks() -> None:
    class Conv1D(nn.Module):  # Hugging Face's transposed linear layer, by its look
        def __init__(self, nf: int, nx: int) -> None:
            super().__init__()
            self.weight = nn.Parameter(torch.randn(nx, nf))
            self.bias = nn.Parameter(torch.zeros(nf))

    class RMSish(nn.Module):
        def __init__(self, d: int) -> None:
            super().__init__()
            self.weight = nn.Parameter(torch.ones(d))
            self.variance_epsilon = 1e-6

    class LlamaRMSNorm(RMSish):
        pass

    class Block(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.c_fc = Conv1D(4, 4)
            self.norm = LlamaRMSNorm(4)

    model = nn.Sequential(
        nn.Embedding(5, 4), nn.ModuleList([Block(), Block()]), weight_norm(nn.Linear(4, 2))
    )
    assert is_normalizer(LlamaRMSNorm(4)) and not is_normalizer(model[2].parametrizations.weight[0])
    chosen, left_out = weight_layers(model)
    assert list(chosen) == ["1.0.c_fc", "1.1.c_fc", "2"]
    assert left_out == {"0": "embedding", "1.0.norm": "norm", "1.1.norm": "norm"}
    chosen, _ = weight_layers(model, embeddings=True, norms=True)
    assert list(chosen) == ["0", "1.0.c_fc", "1.0.norm", "1.1.c_fc", "1.1.norm", "2"]
    assert list(find_blocks(model)) == ["1.0", "1.1"]
    nested = nn.Sequential(nn.Sequential(Block(), Block()), nn.Sequential(Block(), Block()))
    assert list(find_blocks(nested)) == ["0.0", "0.1", "1.0", "1.1"]  # the innermost


class _ByKeyword(nn.Module):
    """forward(x, mask): the inputs as keyword arguments."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.body = nn.Sequential(nn.Linear(6, 12), nn.BatchNorm1d(12), nn.ReLU())
        self.head = nn.Linear(12, 3)

    def forward(self, x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        return self.head(self.body(x * mask))


class _ByDict(_ByKeyword):
    """forward(batch): one dict, as research code often takes its batches."""

    def forward(self, batch: dict) -> torch.Tensor:  # type: ignore[override]
        return super().forward(batch["x"], batch["mask"])


def test_a_forward_that_takes_a_dict_as_one_argument_is_measured_as_by_keywords() -> None:
    """forward(self, batch) reading batch["x"] had no way in: a dict went in as keywords and a
    tuple could hold tensors only. A tuple holding the dict now passes it as one argument; every
    measure equals the keyword model's, bit for bit, and the Monitor takes it too."""
    import torch.nn.functional as F

    import normprobe
    from normprobe.probes import gradient_statistics

    g = torch.Generator().manual_seed(3)
    x, y = torch.randn(24, 6, generator=g), torch.randint(0, 3, (24,), generator=g)
    mask = (torch.rand(24, 6, generator=g) > 0.2).float()
    kw = {"x": x, "mask": mask, "note": "kept"}  # a plain value rides along
    keyword, by_dict = _ByKeyword(), _ByDict()
    a, b = slice(0, 12), slice(12, 24)

    def measured(model: nn.Module, wrap) -> list:
        half = lambda s: {k: v[s] if isinstance(v, torch.Tensor) else v for k, v in kw.items()}  # noqa: E731
        return [
            gradient_statistics(model, F.cross_entropy, (wrap(half(a)), y[a]),
                                (wrap(half(b)), y[b])),
            normprobe.representation_correlation(model, wrap(half(a)), seed=1),
            normprobe.representation_correlation(
                model, wrap(half(a)), pairing="independent", x_other=wrap(half(b))
            ),
            normprobe.hessian_spectrum(model, F.cross_entropy, (wrap(kw), y), what="top", k=2,
                                       chunk_size=8).top_eigenvalues,
        ]  # fmt: skip

    kw.pop("note")  # _ByKeyword takes no such argument
    plain = measured(keyword, lambda d: d)
    kw["note"] = "kept"
    nested = measured(by_dict, lambda d: (d,))
    for got, want in zip(nested[:3], plain[:3]):
        assert got.value.tolist() == want.value.tolist()
        assert got.layer.tolist() == want.layer.tolist()
    assert nested[3].tolist() == plain[3].tolist()
    # chunks cut the tensors of the dict alike; the labels name them inside the tuple
    chunks = chunk_batch(({"x": x, "mask": mask},), y, 3)
    assert [len(c[0][0]["x"]) for c in chunks] == [8, 8, 8]
    with pytest.raises(BatchError, match=r"inputs\[0\].mask: 4"):
        split_batch((({"x": x, "mask": mask[:4]},), y))
    monitor = normprobe.Monitor(by_dict, F.cross_entropy, (({"x": x, "mask": mask},), y),
                                hessian=False)  # fmt: skip
    monitor.step(0)
    assert {"grad_corr", "repr_corr_noise"} <= set(monitor.results.metrics.metric)
