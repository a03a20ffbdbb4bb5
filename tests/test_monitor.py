"""normprobe.Monitor: the same measures as an analysis, inside the user's own loop.

The central check: a loop written by hand that trains like an analysis,
with a Monitor, records tables bit-identical to ``analyze``'s for the same
model, data, seed and schedule.
"""

from __future__ import annotations

import json
import re
import warnings
from pathlib import Path

import pandas as pd
import pytest
import torch
import torch.nn.functional as F
from torch import nn

import normprobe
from normprobe.analyze import analyze
from normprobe.batch import prediction
from normprobe.config import load_config
from normprobe.monitor import Monitor, MonitorError
from normprobe.norms import set_total_steps
from normprobe.plan import build_run_model, plan_runs, prepare_data
from normprobe.plotting import plot_results
from normprobe.results import load_results
from normprobe.threads import torch_threads
from normprobe.training import make_optimizer, minibatches, training_loss

STEPS = 6
CONFIG = {
    "model": {"name": "mlp", "options": {"depth": 3, "width": 32}},
    "normalizers": ["batch"],
    "data": {"probe_batch": 32, "hessian_samples": 64},
    "train": {"steps": STEPS, "batch_size": 32, "lr": 0.05, "seeds": [1]},
    "probes": {"schedule": {"every": 3}, "batch_mean": True},
    "hessian": {"schedule": [0, 3], "lanczos_steps": 10, "chunk_size": 32, "start_vectors": 2},
}


def _tables(results: normprobe.Results) -> dict[str, pd.DataFrame]:
    out = {}
    for name in ("metrics", "hessian_nodes", "hessian_density"):
        frame = getattr(results, name).drop(columns="selected", errors="ignore")
        out[name] = frame.reset_index(drop=True)
    return out


def test_monitor_results_are_bit_identical_to_analyze(tmp_path: Path) -> None:
    # the analysis at this process's thread count, which the monitor (in the user's loop) keeps
    expected = analyze(
        CONFIG, out=tmp_path / "analysis", quiet=True, threads=torch.get_num_threads()
    )
    config = load_config(CONFIG)[0]
    spec = plan_runs(config)[0]
    data = prepare_data(config)
    ds = data.dataset
    model = build_run_model(config, "batch", spec.seed, ds)
    set_total_steps(model, STEPS)
    tc = config.train
    optimizer = make_optimizer(tc.optimizer, model.parameters(), lr=spec.lr, momentum=tc.momentum)
    monitor = Monitor(
        model,
        None,  # the analysis' loss: mean cross-entropy
        data,
        probes=config.probes,
        hessian=config.hessian,
        out=tmp_path / "monitored",
        run=spec.run,
        normalizer="batch",
        seed=spec.seed,
        optimizer=optimizer,
        eval_data={
            "train": (ds.train.x[: tc.eval_train_samples], ds.train.y[: tc.eval_train_samples]),
            "test": (ds.test.x, ds.test.y),
        },
        num_classes=ds.num_classes,
        total_steps=STEPS,
    )
    batches = minibatches(len(ds.train.x), tc.batch_size, torch.Generator().manual_seed(spec.seed))
    for step in range(STEPS + 1):
        monitor.step(step)
        if step == STEPS:
            break
        index = next(batches)
        loss = training_loss(model, prediction(model(ds.train.x[index])), ds.train.y[index], 0.0)
        monitor.log(step, batch_loss=loss.item())
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
    results = monitor.close()
    got, want = _tables(results), _tables(expected)
    assert set(want["metrics"]["metric"]) >= {
        "grad_corr",
        "eigenvalue",
        "batch_mean_sq",
        "test_acc",
    }
    for name in want:
        pd.testing.assert_frame_equal(got[name], want[name], check_exact=True)
    # and the folder it wrote reads back the same
    again = _tables(load_results(tmp_path / "monitored"))
    for name in want:
        pd.testing.assert_frame_equal(again[name], want[name], check_exact=True)


def _net(norm: nn.Module | None = None, seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(
        nn.Linear(6, 16), norm or nn.BatchNorm1d(16), nn.ReLU(), nn.Linear(16, 16), nn.ReLU(),
        nn.Linear(16, 4),
    )  # fmt: skip


def _data(n: int = 64) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(5)
    return torch.randn(n, 6, generator=g), torch.randint(0, 4, (n,), generator=g)


SMALL_HESSIAN = {"pieces": ["top", "trace", "density"], "lanczos_steps": 8, "trace_samples": 4}


def test_monitor_leaves_model_grads_optimizer_and_rng_as_found() -> None:
    model = _net()
    x, y = _data()
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-2)
    for _ in range(2):
        optimizer.zero_grad()
        F.cross_entropy(model(x), y).backward()
        optimizer.step()
    F.cross_entropy(model(x[:16]), y[:16]).backward()  # gradients the loop has not used yet
    monitor = Monitor(model, F.cross_entropy, (x, y), hessian=SMALL_HESSIAN, schedule=[0])
    state = {k: v.clone() for k, v in model.state_dict().items()}
    grads = [p.grad.clone() for p in model.parameters()]
    opt_state = json.dumps(optimizer.state_dict()["param_groups"])
    moments = [t.clone() for s in optimizer.state.values() for t in s.values()]
    training = [m.training for m in model.modules()]
    rng = torch.get_rng_state()
    monitor.step(0)
    assert "eigenvalue" in set(monitor.results.metrics["metric"])
    for k, v in model.state_dict().items():
        assert torch.equal(v, state[k]), k
    for p, g in zip(model.parameters(), grads):
        assert torch.equal(p.grad, g)
    assert json.dumps(optimizer.state_dict()["param_groups"]) == opt_state
    assert all(
        torch.equal(a, b)
        for a, b in zip([t for s in optimizer.state.values() for t in s.values()], moments)
    )
    assert [m.training for m in model.modules()] == training
    assert torch.equal(torch.get_rng_state(), rng)


def test_a_custom_loss_reaches_the_gradient_probes_and_the_hessian() -> None:
    model = _net(nn.LayerNorm(16))
    x, y = _data()
    scaled = lambda out, t: 3.0 * F.cross_entropy(out, t)  # noqa: E731
    kwargs = {"probes": ["gradient_norms"], "hessian": SMALL_HESSIAN, "schedule": [0]}
    plain = Monitor(model, F.cross_entropy, (x, y), **kwargs)
    tripled = Monitor(model, scaled, (x, y), **kwargs)
    plain.step(0)
    tripled.step(0)
    a, b = plain.results.metrics, tripled.results.metrics
    for metric, factor in (("grad_norm", 3.0), ("trace", 3.0)):
        va = a[a["metric"] == metric]["value"].to_numpy()
        vb = b[b["metric"] == metric]["value"].to_numpy()
        assert vb == pytest.approx(factor * va, rel=1e-4), metric


def test_schedule_every_k_steps_and_its_own_hessian_schedule() -> None:
    model = _net()
    x, y = _data()
    monitor = Monitor(model, F.cross_entropy, (x, y), schedule=50, hessian=False)
    assert [s for s in range(201) if monitor.due(s)] == [0, 50, 100, 150, 200]
    both = Monitor(model, None, (x, y), schedule=[0, 7], hessian={"schedule": [0, 3]})
    assert both.due(7) == ["representation", "gradients"]
    assert both.due(3) == ["hessian"] and both.due(0)[-1] == "hessian" and both.due(4) == []
    ends = Monitor(model, None, (x, y), schedule={"every": 4}, hessian=False, total_steps=10)
    assert [s for s in range(11) if ends.due(s)] == [0, 4, 8, 10]  # as an analysis: the last step


def test_run_folder_is_written_as_it_goes_and_several_runs_plot_together(tmp_path: Path) -> None:
    x, y = _data(128)
    xt, yt = _data(64)
    out = tmp_path / "results"
    for norm, layer in (("batch", nn.BatchNorm1d(16)), ("layer", nn.LayerNorm(16))):
        model = _net(layer)
        optimizer = torch.optim.SGD(model.parameters(), lr=0.05)
        monitor = Monitor(
            model,
            F.cross_entropy,
            (x, y),
            hessian={**SMALL_HESSIAN, "schedule": [0, 4]},
            schedule=2,
            out=out,
            normalizer=norm,
            optimizer=optimizer,
            eval_data={"test": (xt, yt)},
        )
        for step in range(5):
            monitor.step(step)
            if step == 0:  # after the first measurement its folder is there, marked running
                status = json.loads((out / "runs" / monitor.run / "run.json").read_text())
                assert status["status"] == "running"
                rows = load_results(out).metrics
                assert set(rows[rows["run"] == monitor.run]["step"]) == {0}
            loss = F.cross_entropy(model(x[:32]), y[:32])
            monitor.log(step, batch_loss=loss)
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
        monitor.close()
    results = load_results(out)
    assert sorted(results.runs["run"]) == ["batch_lr0.05_seed0", "layer_lr0.05_seed0"]
    assert set(results.runs["status"]) == {"done"} and results.runs["selected"].all()
    assert (out / "results.parquet").exists() and (out / "manifest.json").exists()
    report = plot_results(results, tmp_path / "figures")
    for name in ("fig1a_custom", "fig1b_custom", "fig3a_custom", "fig3c_custom", "fig4_custom"):
        assert name in report.written, (name, report.skipped)
    assert {"batch", "layer"} <= set(results.rows("test_acc")["normalizer"])


CRASHING_LOOP = """
import sys, time
import torch, torch.nn.functional as F
from torch import nn
from normprobe import Monitor

def net():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(6, 16), nn.BatchNorm1d(16), nn.ReLU(), nn.Linear(16, 4))

def data(n):
    g = torch.Generator().manual_seed(5)
    return torch.randn(n, 6, generator=g), torch.randint(0, 4, (n,), generator=g)

def loop(out, steps, report=None):
    model = net()
    x, y = data(64)
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    monitor = Monitor(model, F.cross_entropy, (x, y), schedule=2, out=out, normalizer="batch",
                      hessian={"pieces": ["top", "density"], "lanczos_steps": 6, "schedule": [0, 4]},
                      eval_data={"test": data(32)}, optimizer=opt)
    for step in range(steps + 1):
        monitor.step(step)
        if report is not None and monitor.due(step):
            print("measured", step, flush=True)
            time.sleep(0.05)
        loss = F.cross_entropy(model(x[:32]), y[:32])
        monitor.log(step, batch_loss=loss.item())
        opt.zero_grad(); loss.backward(); opt.step()
    return monitor

if __name__ == "__main__":
    loop(sys.argv[1], 10**6, report=True)
"""


def test_a_killed_monitor_loses_at_most_the_measurement_in_progress(tmp_path: Path) -> None:
    """SIGKILL mid-run: load_results reads every measurement completed before the kill (from
    the part files, saying the run is unclosed), the values those of a run that was not killed,
    and ``normprobe plot`` draws it."""
    import os
    import signal
    import subprocess
    import sys
    import warnings

    from normprobe.cli import main
    from normprobe.results import UnclosedRunWarning

    script = tmp_path / "crashing_loop.py"
    script.write_text(CRASHING_LOOP)
    out = tmp_path / "results"
    env = {
        **os.environ,
        "PYTHONPATH": str(Path(__file__).resolve().parents[1]),
        "OMP_NUM_THREADS": "1",
    }
    child = subprocess.Popen(
        [sys.executable, str(script), str(out)], stdout=subprocess.PIPE, text=True, env=env
    )
    measured: list[int] = []
    try:
        assert child.stdout is not None
        for line in child.stdout:
            measured.append(int(line.split()[1]))
            if len(measured) == 4:  # steps 0, 2, 4 (with the Hessian), 6
                break
        child.send_signal(signal.SIGKILL)
    finally:
        child.kill()
        child.wait()
        child.stdout.close()
    assert measured == [0, 2, 4, 6]
    with pytest.warns(UnclosedRunWarning, match="batch_lr0.05_seed0"):
        crashed = load_results(out)
    assert crashed.unclosed == ["batch_lr0.05_seed0"]
    assert crashed.runs["status"].tolist() == ["running"]
    rows = crashed.metrics
    assert set(measured) <= set(rows[rows["metric"] == "grad_corr"]["step"])
    assert set(rows[rows["metric"] == "eigenvalue"]["step"]) == {0, 4}

    # the same loop, not killed, closed after the last step seen: the same rows up to it
    namespace: dict = {}
    exec(compile(CRASHING_LOOP, str(script), "exec"), namespace)
    with torch_threads(1):  # the child's count (OMP_NUM_THREADS=1): CPU sums depend on it
        whole = namespace["loop"](tmp_path / "whole", measured[-1]).close()
    last = measured[-1]
    for table in ("metrics", "hessian_nodes", "hessian_density"):
        got, want = getattr(crashed, table), getattr(whole, table)
        if table == "metrics":  # the loss logged after the last measurement came with the next
            got, want = (f[(f["step"] < last) | (f["metric"] != "batch_loss")] for f in (got, want))
        got, want = got[got["step"] <= last], want[want["step"] <= last]
        by = [c for c in ("step", "metric", "layer", "index", "vector", "grid") if c in want]
        got = got.sort_values(by, kind="stable").reset_index(drop=True)
        want = want.sort_values(by, kind="stable").reset_index(drop=True)
        assert len(got) == len(want) > 0, table
        for column in ("step", "metric", "value"):
            if column in want:
                assert got[column].tolist() == want[column].tolist(), (table, column)

    assert main(["plot", str(out), "--out", str(tmp_path / "figures")]) == 0
    assert any((tmp_path / "figures").iterdir())
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # closed: read from its tables, no warning
        assert load_results(tmp_path / "whole").unclosed == []
    assert not (tmp_path / "whole" / "runs" / "batch_lr0.05_seed0" / "parts").exists()


def test_results_without_a_folder_are_the_same_object_load_results_gives() -> None:
    model = _net()
    x, y = _data()
    monitor = Monitor(model, F.cross_entropy, (x, y), hessian=False, schedule=1, run="mine")
    monitor.step(0, batch_loss=1.5)
    monitor.step(1, batch_loss=1.25)
    results = monitor.results
    assert isinstance(results, normprobe.Results)
    assert list(results.metrics.columns[:5]) == ["run", "normalizer", "lr", "seed", "step"]
    assert results.rows("batch_loss")["value"].tolist() == [1.5, 1.25]
    assert results.runs["status"].tolist() == ["running"]


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"schedule": 0}, r"every 0 steps is not a schedule"),
        ({"schedule": {"log": 5}}, r"pass total_steps="),
        ({"schedule": {"every": 2, "steps": [1]}}, r"give one of steps, every or log"),
        ({"probes": ["gradient_norm"]}, r"unknown probe 'gradient_norm'; the probes are"),
        ({"probes": {"representation": {"pairing": "pairs"}}}, r"probes.representation.pairing"),
        (
            {"hessian": {"lanczos_step": 4}},
            r"hessian.lanczos_step: unknown key 'lanczos_step'; did you mean 'lanczos_steps'",
        ),
        ({"hessian": "yes"}, r"Monitor\(hessian=...\): expected True/False"),
    ],
)
def test_bad_options_get_one_clear_error(kwargs: dict, message: str) -> None:
    x, y = _data()
    with pytest.raises(MonitorError, match=message):
        Monitor(_net(), None, (x, y), **kwargs)


def test_a_step_inside_the_loop_s_autocast_region_measures_in_the_model_s_dtype() -> None:
    """A loop that trains under torch.autocast and calls step() inside it gets the tables of
    a step outside it, bit for bit: the probes and the Hessian switch autocast off."""
    x, y = _data()
    tables = []
    for autocast in (False, True):
        model = _net(nn.LayerNorm(16))
        monitor = Monitor(model, F.cross_entropy, (x, y), schedule=[0], hessian=SMALL_HESSIAN)
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
            assert torch.is_autocast_enabled("cpu") is autocast
            monitor.step(0)
        tables.append(monitor.results)
    outside, inside = tables
    pd.testing.assert_frame_equal(inside.metrics, outside.metrics)
    pd.testing.assert_frame_equal(inside.hessian_nodes, outside.hessian_nodes)
    assert {"repr_corr_noise", "grad_norm", "eigenvalue", "slq_node"} <= set(
        pd.concat([inside.metrics, inside.hessian_nodes])["metric"]
    )


def test_a_step_inside_inference_mode_measures_as_outside_it() -> None:
    """Inside a loop's torch.inference_mode() block (where enable_grad records nothing) a
    step records the tables of a step outside it, bit for bit; inputs made in that mode are
    measured as well."""
    x, y = _data()
    tables = []
    for inference in (False, True):
        model = _net(nn.LayerNorm(16))
        monitor = Monitor(model, F.cross_entropy, (x, y), schedule=[0], hessian=SMALL_HESSIAN)
        with torch.inference_mode(inference):
            monitor.step(0)
        tables.append(monitor.results)
    outside, inside = tables
    pd.testing.assert_frame_equal(inside.metrics, outside.metrics, check_exact=True)
    pd.testing.assert_frame_equal(inside.hessian_nodes, outside.hessian_nodes, check_exact=True)
    model = _net()
    with torch.inference_mode():
        made_inside = x.clone(), y.clone()
        norms = normprobe.gradient_norms(model, F.cross_entropy, made_inside)
        top = normprobe.hessian_spectrum(model, F.cross_entropy, made_inside, what="top", k=2)
    pd.testing.assert_frame_equal(
        norms, normprobe.gradient_norms(model, F.cross_entropy, (x, y)), check_exact=True
    )
    again = normprobe.hessian_spectrum(model, F.cross_entropy, (x, y), what="top", k=2)
    assert top.top_eigenvalues.tolist() == again.top_eigenvalues.tolist()


class _MonteCarloDropout(nn.Module):
    """A functional dropout that draws in eval mode too (Monte Carlo dropout)."""

    def __init__(self) -> None:
        super().__init__()
        self.net = _net(nn.LayerNorm(16))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net[5](F.dropout(self.net[:5](x), 0.2, training=True))


def test_evaluating_eval_data_changes_neither_the_training_nor_follows_autocast() -> None:
    """eval_data is scored on its own seeded random stream, in the model's dtype: a model that
    draws in eval mode trains to the same parameters with the evaluation as without it, and a
    step inside the loop's autocast region records the losses of a step outside it."""
    x, y = _data()
    held_out = _data(48)

    def trained(eval_data: dict | None, autocast: bool) -> tuple[list[torch.Tensor], Monitor]:
        torch.manual_seed(0)
        model = _MonteCarloDropout()
        optimizer = torch.optim.SGD(model.parameters(), lr=0.05)
        monitor = Monitor(
            model, F.cross_entropy, (x, y), schedule={"every": 2}, hessian=False,
            probes=["gradient_norms"], eval_data=eval_data,
        )  # fmt: skip
        for step in range(6):
            with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
                monitor.step(step)
            i = torch.randint(0, len(x), (16,))
            optimizer.zero_grad()
            F.cross_entropy(model(x[i]), y[i]).backward()
            optimizer.step()
        return [p.detach().clone() for p in model.parameters()], monitor

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the probes say the model draws; said elsewhere
        plain, _ = trained(None, False)
        evaluated, outside = trained({"test": held_out}, False)
        _, inside = trained({"test": held_out}, True)
    assert all(torch.equal(a, b) for a, b in zip(plain, evaluated))
    scores = outside.results.metrics.query("metric in ['test_loss', 'test_acc']")
    assert len(scores) == 6
    pd.testing.assert_frame_equal(
        inside.results.metrics.query("metric in ['test_loss', 'test_acc']"), scores,
        check_exact=True,
    )  # fmt: skip


def test_a_run_name_is_one_folder_name(tmp_path: Path) -> None:
    """The run names its folder: a derived name that is not one is made one (the normalizer
    keeps its name), and an explicit one is refused. A folder starting with a dot is a
    staging folder that results leave out, so such a run used to vanish from them."""
    x, y = _data()
    for normalizer, run in (("resnet/bn", "resnet-bn_seed0"), ("..", "_._seed0")):
        out = tmp_path / run
        monitor = Monitor(_net(), None, (x, y), out=out, normalizer=normalizer, schedule=[0],
                          hessian=False)  # fmt: skip
        monitor.step(0)
        monitor.close()
        results = normprobe.load_results(out)
        assert results.runs["run"].tolist() == [run]
        assert set(results.metrics["normalizer"]) == {normalizer}
        assert [p.name for p in (out / "runs").iterdir()] == [run]
    for bad, fix in (("x/y", "x-y"), (".hidden", "_hidden"), ("", "mine")):
        with pytest.raises(
            MonitorError, match=rf"run=...\): {bad!r} names the run's folder.*{fix!r}"
        ):
            Monitor(_net(), None, (x, y), run=bad, hessian=False)


class _TokenNet(nn.Module):
    """Token ids in, one class score per sequence out (an embedding, a LayerNorm, a head)."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.embed = nn.Embedding(20, 8)
        self.norm = nn.LayerNorm(8)
        self.head = nn.Linear(8, 4)

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        return self.head(torch.relu(self.norm(self.embed(input_ids))).mean(dim=1))


def test_the_noise_pairing_on_token_ids_is_refused_when_the_monitor_is_built() -> None:
    g = torch.Generator().manual_seed(0)
    ids, y = torch.randint(0, 20, (16, 5), generator=g), torch.randint(0, 4, (16,), generator=g)
    model = _TokenNet()
    with pytest.raises(
        MonitorError,
        match=r"probes.representation.pairing: 'noise' .* has none \(input_ids \(int64\)\); "
        r"for token ids pass probes=\{'representation': \{'pairing': 'independent'\}\}",
    ):
        Monitor(model, None, ({"input_ids": ids}, y), hessian=False)
    # the other pairings, and the noise pairing with the representation probe off, are taken
    for probes in ({"representation": {"pairing": "independent"}}, ["gradient_norms"]):
        monitor = Monitor(model, None, ({"input_ids": ids}, y), probes=probes, hessian=False)
        monitor.step(0)
        assert len(monitor.results.metrics)


def test_probe_data_drawn_from_the_run_s_seed_is_refused_when_the_monitor_is_built() -> None:
    """The step-0 noise of a run with seed 0 is what torch.manual_seed(0); torch.randn draws."""
    torch.manual_seed(0)
    x = torch.randn(128, 6)  # two probe batches of 64 x 6 entries
    y = torch.randint(0, 4, (128,))
    with pytest.raises(MonitorError, match=r"probe_data: at step 0: the noise pairing's noise, "
                       r"drawn from a torch.Generator seeded with 0, is the input itself"):  # fmt: skip
        Monitor(_net(), None, (x, y), hessian=False)
    monitor = Monitor(_net(), None, (x, y), hessian=False, seed=1)
    monitor.step(0)
    noise = monitor.results.metrics.query("metric == 'repr_corr_noise'")
    assert len(noise) and (noise.value < 0.999).all()
    # a later step's noise seed is seed + step: known before training from a listed schedule
    # or the run's length, and refused then (every 3 steps of a run with seed 0: step 3's is 3)
    torch.manual_seed(3)
    x3 = torch.randn(128, 6)
    for when in ({"schedule": [0, 3, 6]}, {"schedule": 3, "total_steps": 9}):
        with pytest.raises(MonitorError, match=r"at step 3: .* seeded with 3, is the input"):
            Monitor(_net(), None, (x3, y), hessian=False, **when)
    Monitor(_net(), None, (x3, y), hessian=False, schedule=3)  # unknown length: step 0 only


def test_bad_probe_data_and_steps_are_named() -> None:
    x, y = _data()
    with pytest.raises(MonitorError, match=r"probe_data must be an \(inputs, targets\) pair"):
        Monitor(_net(), None, x)
    with pytest.raises(MonitorError, match=r"probe_data: x has 64 samples but y has shape"):
        Monitor(_net(), None, (x, y[:10]))
    with pytest.raises(MonitorError, match=r"the Hessian is on but no Hessian set"):
        Monitor(_net(), None, {"a": (x[:8], y[:8]), "b": (x[8:16], y[8:16])})
    monitor = Monitor(_net(), None, (x, y), hessian=False, schedule=[0, 2])
    for bad in (-1, 1.5, "3", True):
        with pytest.raises(MonitorError, match=rf"an int >= 0\), got {bad!r}"):
            monitor.step(bad)
    monitor.step(torch.tensor(2))  # an integer tensor, as some trainers count steps
    assert sorted(monitor.results.metrics["step"].unique()) == [2]
    rows = len(monitor.results.metrics)
    with pytest.raises(MonitorError, match=r"step 2 was measured already"):
        monitor.step(2, batch_loss=0.5)
    assert len(monitor.results.metrics) == rows  # nothing recorded twice, nothing logged
    monitor.step(1, batch_loss=0.5)  # a step that measures nothing may be logged at any time


def test_eval_data_is_recorded_at_the_last_step_as_an_analysis_does() -> None:
    x, y = _data()
    monitor = Monitor(_net(), None, (x, y), hessian=False, probes=False, schedule=[0],
                      total_steps=5, eval_data={"test": (x, y)})  # fmt: skip
    for step in range(6):
        monitor.step(step)
    assert sorted(monitor.results.rows("test_acc")["step"]) == [0, 5]


@pytest.mark.slow
def test_the_readme_s_own_loop_example_records_every_50_steps_and_draws(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    text = (Path(__file__).resolve().parents[1] / "README.md").read_text()
    before = text.split("## From Python", 1)[1].split("\n## ", 1)[0]
    setup = re.search(r"```python\n(.*?)\n```", before, flags=re.S).group(1).split("for norm")[0]
    section = text.split("## Your own training loop", 1)[1].split("\n## ", 1)[0]
    code = re.search(r"```python\n(.*?)\n```", section, flags=re.S).group(1)
    added = [line for line in code.splitlines() if line.strip()]
    assert len(added) <= 10, added
    monkeypatch.chdir(tmp_path)
    namespace: dict[str, object] = {}
    exec(compile(setup + "\n" + code, "README.md", "exec"), namespace)
    results = load_results(tmp_path / "runs" / "my-loop")
    steps = [0, 50, 100, 150, 200, 250, 300]
    for metric in ("repr_corr_noise", "grad_corr", "grad_norm", "eigenvalue", "trace"):
        assert sorted(results.rows(metric)["step"].unique()) == steps, metric
    assert results.runs["normalizer"].tolist() == ["batch"]
    for name in ("fig1a", "fig1b", "fig3b", "fig3c", "fig4", "fig6a", "fig6b"):
        assert (tmp_path / "runs" / "my-loop" / "figures" / f"{name}_custom.png").exists(), name


def test_a_logged_value_cannot_take_a_measured_metric_s_name() -> None:
    x, y = _data()
    monitor = Monitor(_net(), None, (x, y), hessian=False)
    with pytest.raises(MonitorError, match=r"'grad_norm' is a metric the measures write.*"):
        monitor.log(3, grad_norm=1.0)


def test_a_value_is_logged_at_a_number_of_updates() -> None:
    x, y = _data()
    monitor = Monitor(_net(), None, (x, y), hessian=False, schedule=[0])
    for bad in (-1, 1.5, "3", True):
        with pytest.raises(MonitorError, match=rf"Monitor.log: .* \(an int >= 0\), got {bad!r}"):
            monitor.log(bad, batch_loss=1.0)
    monitor.log(torch.tensor(2), batch_loss=0.5)  # an integer tensor, as some trainers count steps
    monitor.log(0, batch_loss=0.25)
    logged = monitor.results.rows("batch_loss")
    assert sorted(zip(logged["step"], logged["value"])) == [(0, 0.25), (2, 0.5)]


class _Scalars:
    """A stand-in for a SummaryWriter: records add_scalar calls."""

    def __init__(self) -> None:
        self.calls: list[tuple[str, float, int]] = []

    def add_scalar(self, tag: str, value: float, step: int) -> None:
        self.calls.append((tag, value, step))


def test_scalar_measures_go_to_a_tensorboard_writer() -> None:
    model = _net()
    x, y = _data()
    writer = _Scalars()
    monitor = Monitor(
        model, F.cross_entropy, (x, y), schedule=2, hessian={**SMALL_HESSIAN, "schedule": [0]},
        tensorboard=writer,
    )  # fmt: skip
    for step in range(3):
        monitor.step(step, batch_loss=1.0 / (step + 1))
    monitor.close()
    tags = {(tag, step) for tag, _, step in writer.calls}
    assert {("grad_corr/0", 0), ("grad_corr/0", 2), ("grad_growth_rate", 2)} <= tags
    assert {("eigenvalue/1", 0), ("trace", 0), ("batch_loss", 1)} <= tags
    assert not any(tag.startswith(("trace_sample", "slq_node")) for tag, _ in tags)
    rows = monitor.results.metrics
    want = rows[(rows["metric"] == "grad_corr") & (rows["layer"] == "0")]["value"].tolist()
    assert [v for tag, v, _ in writer.calls if tag == "grad_corr/0"] == want
    with pytest.raises(MonitorError, match=r"Monitor\(tensorboard=...\): expected a log folder"):
        Monitor(model, F.cross_entropy, (x, y), hessian=False, tensorboard=3)


def test_tensorboard_log_folder(tmp_path: Path) -> None:
    pytest.importorskip("tensorboard")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    model = _net()
    x, y = _data()
    with Monitor(
        model, F.cross_entropy, (x, y), schedule=1, hessian=False, tensorboard=tmp_path / "tb"
    ) as monitor:
        for step in range(2):
            monitor.step(step, batch_loss=0.5)
    events = EventAccumulator(str(tmp_path / "tb"))
    events.Reload()
    assert {"grad_corr/0", "grad_growth_rate", "batch_loss"} <= set(events.Tags()["scalars"])
    assert [e.step for e in events.Scalars("grad_growth_rate")] == [0, 1]
