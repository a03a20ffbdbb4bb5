"""The YAML route with a model from elsewhere: a Hugging Face GPT-2 from a factory, trained on text."""

from __future__ import annotations

import textwrap
from pathlib import Path

import pytest

from normprobe import analyze

pytest.importorskip("transformers")


@pytest.mark.slow
def test_a_hugging_face_factory_trains_on_text_with_swapped_norms(
    tmp_path: Path, monkeypatch
) -> None:
    package = tmp_path / "hfpkg"
    package.mkdir()
    (package / "__init__.py").write_text("")
    (package / "lm.py").write_text(
        textwrap.dedent("""\
        import transformers

        def gpt2(width=16):
            config = transformers.GPT2Config(vocab_size=256, n_positions=16, n_embd=width,
                                             n_layer=2, n_head=2, bos_token_id=0, eos_token_id=0)
            model = transformers.GPT2LMHeadModel(config)
            model.classes_last = True  # logits (N, T, 256) against next-token targets (N, T)
            return model
        """)
    )
    monkeypatch.syspath_prepend(str(tmp_path))
    config = {
        "model": {"factory": "hfpkg.lm:gpt2", "swap_norms": True},
        "normalizers": ["layer", "rms"],
        "data": {
            "name": "text",
            "options": {"window": 16, "max_bytes": 20000},
            "probe_batch": 8,
            "hessian_samples": 8,
        },
        "train": {"optimizer": "adam", "lr": 0.003, "batch_size": 8, "steps": 4},
        "probes": {"representation": {"pairing": "independent"}, "schedule": [0, 4]},
        "hessian": {
            "schedule": [4],
            "pieces": ["top"],
            "top_k": 2,
            "outlier_k": 2,
            "chunk_size": 8,
        },
    }
    results = analyze(config, out=tmp_path / "out", quiet=True)
    assert set(results.runs["status"]) == {"done"}
    metrics = results.metrics
    assert {"train_loss", "test_loss", "grad_norm", "repr_corr_independent"} <= set(
        metrics["metric"]
    )
    # the representations are the blocks' outputs, the gradients every Conv1D and lm_head
    layers = set(metrics.query("metric == 'repr_corr_independent'")["layer"])
    assert {"transformer.h.0", "transformer.h.1"} <= layers
    grads = set(metrics.query("metric == 'grad_norm'")["layer"])
    assert "transformer.h.1.mlp.c_proj" in grads and "lm_head" in grads
    # the two normalizers give different models (the swap happened per token)
    final = metrics.query("metric == 'train_loss'").groupby("normalizer")["value"].last()
    assert final["layer"] != final["rms"]
