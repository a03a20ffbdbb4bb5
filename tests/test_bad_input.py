"""Bad input is one line naming the field or argument and the fix; never a traceback.

Regression tests for config mistakes that used to run silently, blame the
wrong field or end in a traceback, for the API's argument checks, and a
property test over generated malformed configs: each ends in exit status 2
with one line, or in a clean run.
"""

from __future__ import annotations

import os
import warnings
from pathlib import Path

import pytest
import torch
import yaml
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st
from torch import nn

from normprobe.cli import main
from normprobe.errors import NormprobeError
from normprobe.hessian.spectrum import hessian_spectrum
from normprobe.probes.gradients import gradient_norms
from normprobe.probes.signal import representation_correlation

TINY = {
    "model": {"name": "mlp", "options": {"depth": 2, "width": 8}},
    "normalizers": ["layer"],
    "data": {"probe_batch": 16},
    "train": {"steps": 2, "batch_size": 16},
    "probes": {"schedule": [0, 2]},
    "hessian": {"enabled": False},
}


def _analyze(
    tmp_path: Path, text: str, capsys: pytest.CaptureFixture[str], *extra: str
) -> tuple[int, str]:
    config = tmp_path / "cfg.yaml"
    config.write_text(text)
    code = main(["analyze", str(config), "--out", str(tmp_path / "out"), "--quiet", *extra])
    return code, capsys.readouterr().err


def _one_line(code: int, err: str) -> str:
    assert code == 2, err
    assert "Traceback" not in err and err.count("\n") == 1, err
    assert err.startswith("normprobe: error: ")
    return err.removeprefix("normprobe: error: ")


BASE = yaml.safe_dump(TINY)

#: case -> (config text or --set arguments, what the line must contain)
CASES: dict[str, tuple[str | list[str], list[str]]] = {
    "duplicate section": (
        BASE + "train: {lr: 0.1}\n",
        ["key 'train' appears twice", "keep one"],
    ),
    "duplicate key in a flow mapping": (
        "model: mlp\ntrain: {steps: 2, batch_size: 16, steps: 3}\n",
        ["appears twice"],
    ),
    "depth true": (["--set", "model.options.depth=true"], ["model.options.depth", ">= 1"]),
    "depth -1 blames the model": (["--set", "model.options.depth=-1"], ["model.options.depth"]),
    "width 0": (["--set", "model.options.width=0"], ["model.options.width"]),
    "width a word": (["--set", "model.options.width=wide"], ["model.options.width", "'wide'"]),
    "normalizers a number": (["--set", "normalizers=5"], ["normalizers", "list of normalizer"]),
    "steps 1e20": (["--set", "train.steps=1.0e+20"], ["train.steps"]),
    "steps 1e20 in the file": (BASE.replace("steps: 2", "steps: 1.0e+20"), ["train.steps"]),
    "probe schedule past the end": (
        ["--set", "probes.schedule=[0,50]"],
        ["probes.schedule.steps[1]", "past the end of training", "train.steps: 2"],
    ),
    "hessian schedule past the end": (
        ["--set", "hessian.enabled=true", "--set", "hessian.schedule=[0,9]"],
        ["hessian.schedule.steps[1]"],
    ),
    "top_k beyond the parameters": (
        ["--set", "hessian.enabled=true", "--set", "hessian.schedule=[0]",
         "--set", "hessian.top_k=100000"],
        ["hessian.top_k", "use top_k <="],
    ),
    "top_k within the parameters but beyond ARPACK's budget": (
        ["--set", "hessian.enabled=true", "--set", "hessian.schedule=[0]",
         "--set", "model.options.width=64", "--set", "hessian.top_k=600"],
        ["hessian.top_k: 600 eigenvalues", "1,201 Hessian-vector products", "use top_k <= 499"],
    ),
    "lanczos_steps beyond a run's products": (
        ["--set", "hessian.enabled=true", "--set", "hessian.schedule=[0]",
         "--set", "model.options.width=64", "--set", "hessian.lanczos_steps=1000000"],
        ["hessian.lanczos_steps: 1000000 Lanczos steps", "use lanczos_steps <= 1000"],
    ),
    "trace_samples beyond a run's products": (
        ["--set", "hessian.enabled=true", "--set", "hessian.schedule=[0]",
         "--set", "hessian.trace_samples=5000"],
        ["hessian.trace_samples: 5000 samples", "use trace_samples <= 1000"],
    ),
    "hessian_samples beyond the data": (
        ["--set", "hessian.enabled=true", "--set", "hessian.schedule=[0]",
         "--set", "data.hessian_samples=100000"],
        ["data.hessian_samples", "use hessian_samples <="],
    ),
    "depth 100000": (
        ["--set", "model.options.depth=100000", "--set", "model.options.width=128"],
        ["model.options", "parameters", "GB", "train.max_parameters"],
    ),
    "depth 100000 of narrow layers": (
        ["--set", "model.options.depth=100000"],
        ["model.options.depth", "take hours", "train.max_parameters"],
    ),
    "a --set value is named as such": (["--set", "train.lr=abc"], ["--set train.lr=abc: train.lr"]),
    "a learning rate twice": (
        ["--set", "train.lr=[0.05,0.05]"],
        ["train.lr[1]: learning rate 0.05 is given twice", "list each rate once: [0.05]"],
    ),
    "a learning rate twice in the file, written two ways": (
        BASE.replace("steps: 2", "steps: 2\n  lr: [0.1, 0.05, 5.0e-2]"),
        ["train.lr[2]: learning rate 0.05 is given twice", "[0.1, 0.05]"],
    ),
    "a YAML error inside --set": (["--set", "train.lr=[0.1,"], ["--set", "not valid YAML"]),
}


@pytest.mark.parametrize("case", list(CASES))
def test_config_mistakes_are_one_line_naming_the_field(
    case: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    given_, expected = CASES[case]
    if isinstance(given_, list):
        code, err = _analyze(tmp_path, BASE, capsys, *given_)
    else:
        code, err = _analyze(tmp_path, given_, capsys)
    line = _one_line(code, err)
    for part in expected:
        assert part in line, line
    assert not (tmp_path / "out" / "runs").exists()


def test_a_set_error_in_a_fine_file_does_not_blame_the_file(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    line = _one_line(*_analyze(tmp_path, BASE, capsys, "--set", "train.momentum=2"))
    assert line.startswith("--set train.momentum=2: train.momentum") and "cfg.yaml" not in line


@pytest.mark.parametrize(
    "content,expected",
    [
        ("name: caf\xe9\n".encode("latin-1"), "not UTF-8"),
        (BASE.encode("utf-16"), "UTF-16"),
        (b"\x7fELF\x02\x01\x01\x00\x00\x00binary", "binary"),
    ],
)
def test_config_files_that_are_not_utf8_text(
    content: bytes, expected: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    config = tmp_path / "cfg.yaml"
    config.write_bytes(content)
    code = main(["analyze", str(config), "--out", str(tmp_path / "out")])
    assert expected in _one_line(code, capsys.readouterr().err)


@pytest.mark.skipif(not hasattr(os, "mkfifo"), reason="no FIFOs here")
def test_a_fifo_config_path_is_refused_without_reading(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    fifo = tmp_path / "cfg.yaml"
    os.mkfifo(fifo)
    code = main(["analyze", str(fifo), "--out", str(tmp_path / "out")])
    assert "not a regular file" in _one_line(code, capsys.readouterr().err)


def test_plot_only_an_unknown_figure(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    config = tmp_path / "cfg.yaml"
    config.write_text(BASE)
    assert main(["analyze", str(config), "--out", str(tmp_path / "r"), "--quiet"]) == 0
    capsys.readouterr()
    code = main(["plot", str(tmp_path / "r"), "--only", "nosuchfig"])
    line = _one_line(code, capsys.readouterr().err)
    assert "only: no figure named 'nosuchfig'" in line and "fig4" in line


# ------------------------------------------------------------------------------- the API


def _net() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(4, 8), nn.BatchNorm1d(8), nn.ReLU(), nn.Linear(8, 3))


X = torch.randn(16, 4, generator=torch.Generator().manual_seed(0))
Y = torch.arange(16) % 3
LOSS = nn.CrossEntropyLoss()

API_CASES = {
    "a batch of one under batch statistics": (
        lambda: representation_correlation(_net(), X[:1]),
        ["inputs: one example", "BatchNorm1d", "at least 2"],
    ),
    "a batch of one, gradient probe": (
        lambda: gradient_norms(_net(), LOSS, (X[:1], Y[:1])),
        ["inputs: one example"],
    ),
    "mismatched lengths": (
        lambda: gradient_norms(_net(), LOSS, (X, Y[:5])),
        ["x has 16 samples but y has shape (5,)"],
    ),
    "wrong feature width": (
        lambda: gradient_norms(_net(), LOSS, (torch.randn(16, 5), Y)),
        ["inputs ((16, 5))", "shapes cannot be multiplied"],
    ),
    "integer inputs": (
        lambda: gradient_norms(_net(), LOSS, (X.long(), Y)),
        ["inputs", "dtype"],
    ),
    "labels out of range": (
        lambda: gradient_norms(_net(), LOSS, (X, Y + 5)),
        ["targets: class labels must lie in 0..2", "from 5 to 7"],
    ),
    "NaN inputs": (
        lambda: representation_correlation(_net(), X * float("nan")),
        ["NaN or infinite"],
    ),
    "infinite inputs": (
        lambda: gradient_norms(_net(), LOSS, (X * float("inf"), Y)),
        ["NaN or infinite"],
    ),
    "empty inputs": (
        lambda: representation_correlation(_net(), X[:0]),
        ["no examples"],
    ),
    "empty batch": (
        lambda: gradient_norms(_net(), LOSS, (X[:0], Y[:0])),
        ["no examples"],
    ),
    "k beyond the dimension": (
        lambda: hessian_spectrum(
            nn.Linear(2, 2), LOSS, (torch.randn(8, 2), torch.arange(8) % 2), what="top", k=100
        ),
        ["k: 100 eigenvalues", "dimension 6", "use k <= 6"],
    ),
    "k within the dimension but beyond the memory": (
        lambda: hessian_spectrum(
            nn.Linear(1000, 100), LOSS, (torch.randn(8, 1000), torch.arange(8)), what="top",
            k=100_099,
        ),
        ["k: 100099 eigenvalues", "dimension 100,100", "dense Hessian", "available", "use k <="],
    ),
}


@pytest.mark.parametrize("case", list(API_CASES))
def test_api_arguments_are_checked_before_torch(case: str) -> None:
    call, expected = API_CASES[case]
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # an error, not a warning and a NaN
        with pytest.raises(NormprobeError) as info:
            call()
    for part in expected:
        assert part in str(info.value), str(info.value)


def test_a_forward_error_keeps_torchs_message_as_its_cause() -> None:
    with pytest.raises(NormprobeError) as info:
        gradient_norms(_net(), LOSS, (torch.randn(16, 5), Y))
    assert isinstance(info.value.__cause__, RuntimeError)


def test_probes_leave_the_model_as_found_when_they_refuse() -> None:
    net = _net()
    before = {k: v.clone() for k, v in net.state_dict().items()}
    with pytest.raises(NormprobeError):
        representation_correlation(net, X[:1])
    assert net.training and all(torch.equal(before[k], v) for k, v in net.state_dict().items())


def _every_measurement(net: nn.Module) -> list:
    return [
        lambda: gradient_norms(net, LOSS, (X, Y)),
        lambda: representation_correlation(net, X, seed=1),
        lambda: hessian_spectrum(net, LOSS, (X, Y), what="top", k=2),
    ]


def test_torchscript_and_lazy_models_are_refused_and_left_as_found() -> None:
    """A scripted model used to end in AttributeError ('OrderedDictWrapper' object has no
    attribute 'get') or torch's "Can't set constant"; a lazy one in torch's errors, and the
    representation probe made its parameters (LazyLinear became Linear) before it failed."""
    scripted = torch.jit.script(_net())
    for call in _every_measurement(scripted):
        with pytest.raises(NormprobeError, match=r"^the model is TorchScript .* pass the "
                           r"nn.Module it was made from"):  # fmt: skip
            call()
    mixed = _net()
    mixed[3] = torch.jit.script(mixed[3])
    with pytest.raises(NormprobeError, match=r"^module\(s\) 3 are TorchScript"):
        gradient_norms(mixed, LOSS, (X, Y))

    torch.manual_seed(0)
    lazy = nn.Sequential(nn.LazyLinear(8), nn.BatchNorm1d(8), nn.ReLU(), nn.Linear(8, 3))
    for call in _every_measurement(lazy):
        with pytest.raises(NormprobeError, match=r"^lazy module\(s\) 0 have no parameters yet.* "
                           r"run one forward pass first"):  # fmt: skip
            call()
        assert type(lazy[0]) is nn.LazyLinear  # not made by a probe's pass
        assert isinstance(lazy[0].weight, nn.parameter.UninitializedParameter)
    with torch.no_grad():
        lazy(X)  # made: now a Linear, measured like any other
    grads, reps, spectrum = (call() for call in _every_measurement(lazy))
    assert len(grads) == 4 and len(reps) == 2 and len(spectrum.top_eigenvalues) == 2


# ------------------------------------------------------------ generated malformed configs

#: where a mistake can go, and the values tried there (small: a valid pick trains in seconds)
PATHS = [
    "model.options.depth", "model.options.width", "model.name", "model.options",
    "normalizers", "train.steps", "train.lr", "train.batch_size", "train.seeds",
    "train.momentum", "data.probe_batch", "data.name", "probes.schedule", "probes",
    "hessian.top_k", "train", "model", "data", "bogus",
]
VALUES = st.sampled_from(
    [-1, 0, 1, 2, True, False, None, "", "wide", 1.5, "1e20", 1e20, [], {}, [0, 1], "all",
     [2, 0], {"x": 1}, 100000, "nan", float("nan")]
)


def _set(raw: dict, dotted: str, value: object) -> None:
    *parents, last = dotted.split(".")
    node = raw
    for part in parents:
        if not isinstance(node.get(part), dict):
            node[part] = {}
        node = node[part]
    node[last] = value


@settings(
    max_examples=20,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture],
)
@given(changes=st.lists(st.tuples(st.sampled_from(PATHS), VALUES), min_size=1, max_size=2))
def test_generated_malformed_configs_end_in_one_line_or_a_clean_run(
    changes: list[tuple[str, object]], tmp_path_factory: pytest.TempPathFactory,
    capsys: pytest.CaptureFixture[str],
) -> None:
    raw = yaml.safe_load(BASE)
    assume(("train.steps", 100000) not in changes)  # valid, but a long training
    for path, value in changes:
        if path in ("model.options.depth", "model.options.width") and value == 100000:
            raw["model"]["options"]["width"] = 8  # the size check is what is exercised
        _set(raw, path, value)
    folder = tmp_path_factory.mktemp("gen")
    capsys.readouterr()
    code, err = _analyze(folder, yaml.safe_dump(raw), capsys)
    if code == 0:
        assert (folder / "out" / "results.parquet").exists(), err
    else:
        _one_line(code, err)
