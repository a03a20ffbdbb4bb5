"""The Lightning and Hugging Face Trainer callbacks record a tiny model's run with a Monitor,
and training with them follows the same trajectory as training without."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import pytorch_lightning as pl
import torch
import torch.nn.functional as F
import transformers
from torch import nn
from torch.utils.data import DataLoader, Dataset, TensorDataset

from normprobe.integrations.huggingface import NormprobeCallback as HFCallback
from normprobe.integrations.lightning import NormprobeCallback as LightningCallback
from normprobe.results import load_results

HESSIAN = {"pieces": ["top", "trace"], "lanczos_steps": 6, "trace_samples": 4, "top_k": 2}


def _data(n: int = 96) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(13)
    return torch.randn(n, 5, generator=g), torch.randint(0, 3, (n,), generator=g)


def _net() -> nn.Sequential:
    return nn.Sequential(nn.Linear(5, 12), nn.LayerNorm(12), nn.ReLU(), nn.Linear(12, 3))


class TinyModule(pl.LightningModule):
    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.net = _net()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)

    def training_step(self, batch: tuple[torch.Tensor, torch.Tensor], batch_idx: int):
        x, y = batch
        loss = F.cross_entropy(self(x), y)
        self.log("train_acc", (self(x).argmax(1) == y).float().mean())
        return loss

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.SGD(self.parameters(), lr=0.1, momentum=0.9)


class LossesModule(TinyModule):
    """Keeps the loss of each batch its training step sees."""

    def __init__(self) -> None:
        super().__init__()
        self.losses: list[float] = []

    def training_step(self, batch: tuple[torch.Tensor, torch.Tensor], batch_idx: int):
        loss = super().training_step(batch, batch_idx)
        self.losses.append(loss.item())
        return loss


def _fit(callbacks: list[pl.Callback], module: TinyModule | None = None, **options) -> TinyModule:
    module = module or TinyModule()
    x, y = _data()
    options.setdefault("max_steps", 6)
    trainer = pl.Trainer(
        **options,
        accelerator="cpu",
        devices=1,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        callbacks=callbacks,
    )
    trainer.fit(module, DataLoader(TensorDataset(x, y), batch_size=16, shuffle=False))
    return module


def test_lightning_callback_records_a_run_and_leaves_training_unchanged(tmp_path: Path) -> None:
    x, y = _data()
    callback = LightningCallback(
        (x[:32], y[:32]), schedule=3, hessian=HESSIAN, out=tmp_path, normalizer="layer"
    )
    monitored = _fit([callback])
    plain = _fit([])
    for a, b in zip(monitored.parameters(), plain.parameters()):
        assert torch.equal(a, b)
    results = load_results(tmp_path)
    assert results.runs["status"].tolist() == ["done"]
    assert results.runs["lr"].tolist() == [0.1]
    for metric in ("grad_corr", "repr_corr_noise", "eigenvalue", "trace"):
        assert sorted(results.rows(metric)["step"].unique()) == [0, 3, 6], metric
    assert sorted(results.rows("batch_loss")["step"]) == [0, 1, 2, 3, 4, 5]
    assert sorted(results.rows("train_acc")["step"].unique()) == [3, 6]
    assert callback.results is not None and len(callback.results.metrics) == len(results.metrics)


def test_lightning_batch_loss_is_the_loss_of_each_update(tmp_path: Path) -> None:
    """Without accumulation, the training step's loss at the step its update starts from."""
    x, y = _data()
    callback = LightningCallback((x[:32], y[:32]), schedule=3, hessian=False, out=tmp_path)
    module = _fit([callback], LossesModule())
    recorded = load_results(tmp_path).rows("batch_loss").sort_values("step")
    assert recorded["step"].tolist() == [0, 1, 2, 3, 4, 5]
    assert recorded["value"].tolist() == module.losses  # bit for bit


def test_lightning_batch_loss_with_accumulated_batches(tmp_path: Path) -> None:
    """One batch_loss per update, at the step it starts from: the mean of its batches' losses.
    Six batches an epoch in groups of four: the epoch's last update takes the last two."""
    x, y = _data()
    callback = LightningCallback((x[:32], y[:32]), schedule=2, hessian=False, out=tmp_path)
    module = _fit([callback], LossesModule(), max_steps=4, accumulate_grad_batches=4)
    results = load_results(tmp_path)
    recorded = results.rows("batch_loss").sort_values("step")
    assert recorded["step"].tolist() == [0, 1, 2, 3]
    losses = module.losses
    groups = [losses[0:4], losses[4:6], losses[6:10], losses[10:12]]
    assert len(losses) == 12
    assert recorded["value"].tolist() == pytest.approx([sum(g) / len(g) for g in groups])
    assert sorted(results.rows("grad_corr")["step"].unique()) == [0, 2, 4]
    assert sorted(results.rows("train_acc")["step"].unique()) == [2, 4]


class TinyHF(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.net = _net()

    def forward(self, x: torch.Tensor, labels: torch.Tensor | None = None) -> dict:
        logits = self.net(x)
        out = {"logits": logits}
        if labels is not None:
            out["loss"] = F.cross_entropy(logits, labels)
        return out


class Rows(Dataset):
    def __init__(self) -> None:
        self.x, self.y = _data()

    def __len__(self) -> int:
        return len(self.x)

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        return {"x": self.x[i], "labels": self.y[i]}


class LossesHF(TinyHF):
    """Keeps the loss of each batch the Trainer trains on."""

    def __init__(self) -> None:
        super().__init__()
        self.losses: list[float] = []

    def forward(self, x: torch.Tensor, labels: torch.Tensor | None = None) -> dict:
        out = super().forward(x, labels)
        if labels is not None:
            self.losses.append(out["loss"].item())
        return out


def _hf_train(tmp_path: Path, callbacks: list, model: TinyHF | None = None, **options) -> TinyHF:
    model = model or TinyHF()
    options = {"max_steps": 6, "logging_steps": 2, **options}
    args = transformers.TrainingArguments(
        output_dir=str(tmp_path / "trainer"),
        per_device_train_batch_size=16,
        learning_rate=0.05,
        **options,
        report_to=[],
        save_strategy="no",
        use_cpu=True,
        disable_tqdm=True,
        seed=0,
    )
    trainer = transformers.Trainer(
        model=model, args=args, train_dataset=Rows(), callbacks=callbacks
    )
    trainer.train()
    return model


def test_huggingface_callback_records_a_run_and_leaves_training_unchanged(tmp_path: Path) -> None:
    x, y = _data()
    out = tmp_path / "results"
    callback = HFCallback(({"x": x[:32]}, y[:32]), schedule=3, hessian=HESSIAN, out=out)
    monitored = _hf_train(tmp_path, [callback])
    plain = _hf_train(tmp_path, [])
    for a, b in zip(monitored.parameters(), plain.parameters()):
        assert torch.equal(a, b)
    results = load_results(out)
    status = json.loads(next((out / "runs").iterdir()).joinpath("run.json").read_text())
    assert status["status"] == "done" and status["lr"] == pytest.approx(0.05)
    for metric in ("grad_corr", "grad_norm", "eigenvalue"):
        assert sorted(results.rows(metric)["step"].unique()) == [0, 3, 6], metric
    assert sorted(results.rows("loss")["step"]) == [2, 4, 6]  # the Trainer's logged loss
    assert sorted(results.rows("trainer_grad_norm")["step"]) == [2, 4, 6]


def test_the_lightning_callback_prefers_lightning_pytorch_and_falls_back(monkeypatch) -> None:
    """``lightning.pytorch`` (the ``lightning`` distribution) first, else ``pytorch_lightning``;
    NORMPROBE_LIGHTNING picks one. The first is faked here: only pytorch-lightning is installed."""
    import importlib
    import sys
    import types

    import normprobe.integrations.lightning as integration

    fake_root = types.ModuleType("lightning")
    fake = types.ModuleType("lightning.pytorch")

    class Callback:  # what the fake package offers
        pass

    fake.Callback, fake.Trainer, fake.LightningModule = Callback, object, object
    fake_root.pytorch = fake
    try:
        monkeypatch.delenv("NORMPROBE_LIGHTNING", raising=False)
        monkeypatch.setitem(sys.modules, "lightning", fake_root)
        monkeypatch.setitem(sys.modules, "lightning.pytorch", fake)
        chosen = importlib.reload(integration)
        assert chosen.LIGHTNING == "lightning.pytorch"
        assert issubclass(chosen.NormprobeCallback, Callback)
        monkeypatch.setenv("NORMPROBE_LIGHTNING", "pytorch_lightning")
        chosen = importlib.reload(integration)
        assert chosen.LIGHTNING == "pytorch_lightning"
        assert issubclass(chosen.NormprobeCallback, pl.Callback)
        with pytest.raises(
            ImportError, match="expected one of lightning.pytorch, pytorch_lightning"
        ):
            integration.lightning_package("lightning")
        monkeypatch.delenv("NORMPROBE_LIGHTNING")
        monkeypatch.setitem(sys.modules, "lightning.pytorch", None)  # not installed: falls back
        chosen = importlib.reload(integration)
        assert chosen.LIGHTNING == "pytorch_lightning"
    finally:
        monkeypatch.undo()
        importlib.reload(integration)
    assert integration.LIGHTNING == "pytorch_lightning"
    assert issubclass(integration.NormprobeCallback, pl.Callback)


def test_huggingface_callback_with_accumulated_batches(tmp_path: Path) -> None:
    """With gradient accumulation, the steps are still the updates: each measured once, and the
    Trainer's loss (the mean of the update's batches' losses) at the step it is logged."""
    x, y = _data()
    out = tmp_path / "results"
    callback = HFCallback(({"x": x[:32]}, y[:32]), schedule=1, hessian=False, out=out)
    model = _hf_train(
        tmp_path,
        [callback],
        LossesHF(),
        max_steps=3,
        logging_steps=1,
        gradient_accumulation_steps=2,
    )
    results = load_results(out)
    assert sorted(results.rows("grad_norm")["step"].unique()) == [0, 1, 2, 3]
    assert results.rows("grad_norm").groupby("step").size().nunique() == 1  # measured once each
    logged = results.rows("loss").sort_values("step")
    assert logged["step"].tolist() == [1, 2, 3]
    pairs = zip(model.losses[0::2], model.losses[1::2])
    assert len(model.losses) == 6
    assert logged["value"].tolist() == pytest.approx([(a + b) / 2 for a, b in pairs])
