"""The table of measures and one run, used without ``analyze``."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
import torch
from torch import nn

from normprobe.config import HessianConfig, ProbesConfig, load_config
from normprobe.hessian.hvp import NonFiniteProductError
from normprobe.measures import (
    MEASURES,
    Measure,
    MeasureInputs,
    enabled_measures,
    measure_step,
    register,
)
from normprobe.models import build_model
from normprobe.norms import NORMS
from normprobe.plan import RunSpec, plan_runs, prepare_data
from normprobe.probes import ProbeError
from normprobe.probes.gradients import gradient_correlation, gradient_norms, gradient_statistics
from normprobe.run import run_one

TINY = {
    "model": {"name": "mlp", "options": {"depth": 2, "width": 16}},
    "normalizers": ["batch"],
    "data": {"probe_batch": 32, "hessian_samples": 32},
    "train": {"steps": 4, "batch_size": 32},
    "probes": {"schedule": [0, 4], "signal": True},
    "hessian": {"schedule": [4], "lanczos_steps": 4, "pieces": ["top"], "top_k": 2},
}


def _net() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(6, 8), nn.BatchNorm1d(8), nn.ReLU(), nn.Linear(8, 3))


def _inputs() -> MeasureInputs:
    g = torch.Generator().manual_seed(1)
    x, y = torch.randn(16, 6, generator=g), torch.randint(0, 3, (16,), generator=g)
    return MeasureInputs((x[:8], y[:8]), (x[8:], y[8:]), (x, y), seed=3, num_classes=3)


def test_every_probe_switch_and_the_hessian_has_one_measure() -> None:
    switches = [s for m in MEASURES.values() for s in m.switches]
    assert len(switches) == len(set(switches))
    probes = {s.split(".", 1)[1] for s in switches if s.startswith("probes.")}
    assert probes == set(ProbesConfig.model_fields) - {"schedule"}
    assert "hessian" in switches
    with pytest.raises(ValueError, match="already registered"):
        register(MEASURES["signal"])


def test_measures_run_on_any_module_outside_an_analysis_and_leave_it_as_found() -> None:
    """What a recorder in the user's own training loop does: pick the measures, call a step."""
    net, inputs = _net(), _inputs()
    probes = ProbesConfig(signal=True, batch_mean=True)
    hessian = HessianConfig(lanczos_steps=4, pieces=["top"], top_k=2)
    chosen = enabled_measures(probes, hessian)
    assert [m.name for m in chosen] == [
        "representation",
        "gradients",
        "signal",
        "batch_mean",
        "hessian",
    ]
    net.eval()
    before = {k: v.clone() for k, v in net.state_dict().items()}
    tables = measure_step(net, 7, inputs, chosen, probes, hessian)
    after = net.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)  # running stats included
    assert not net.training and all(p.grad is None for p in net.parameters())
    metrics = pd.concat(tables["metrics"], ignore_index=True)
    assert set(metrics["step"]) == {7}
    assert {"repr_corr_noise", "grad_corr", "grad_growth_rate", "signal_var"} <= set(
        metrics["metric"]
    )
    assert {"batch_mean_sq", "eigenvalue"} <= set(metrics["metric"])
    assert len(tables["hessian_nodes"]) == 1 and not tables["hessian_density"]
    # the same step twice gives the same numbers: each measure seeds itself
    again = pd.concat(
        measure_step(net, 7, inputs, chosen, probes, hessian)["metrics"], ignore_index=True
    )
    pd.testing.assert_frame_equal(metrics, again, check_exact=True)


def test_a_registered_measure_is_dispatched_by_the_run() -> None:
    def count(model, step, inputs, probes, hessian):
        n = sum(p.numel() for p in model.parameters())
        return {"metrics": [pd.DataFrame({"layer": [None], "metric": ["params"], "value": [n]})]}

    extra = Measure("params", ("probes.signal",), "probes", ("model",), ("params",), count)
    register(extra)
    try:
        config, _ = load_config(TINY)
        spec = plan_runs(config)[0]
        record = run_one(spec, prepare_data(config))
    finally:
        del MEASURES["params"]
    rows = record.tables["metrics"]
    assert record.status == "done"
    assert rows[rows["metric"] == "params"]["step"].tolist() == [0, 4]


def test_run_one_needs_a_planned_spec_and_records_a_failure_as_failed() -> None:
    config, _ = load_config(TINY)
    data = prepare_data(config)
    with pytest.raises(ValueError, match="has no config; build the specs with plan_runs"):
        run_one(RunSpec("batch", 0.1, 0), data)
    spec = plan_runs(config)[0]
    assert spec.probe_steps == {0, 4} and spec.hessian_steps == {0, 4}  # 0 always
    assert spec.measure_steps == {0, 4}
    broken = RunSpec("batch", -1.0, 0, None, config)  # SGD refuses a negative rate
    record = run_one(broken, data)
    assert record.status == "failed" and "traceback" in record.info


def test_a_non_finite_hessian_product_ends_the_run_as_diverged_keeping_what_it_measured() -> None:
    """A model that blew up gives NaN curvature before a NaN loss: that is a diverged run (it
    counts as the worst at its rate), not a failure that loses its rows and is retried."""

    def overflow(model, step, inputs, probes, hessian):
        if step > 0:
            raise NonFiniteProductError("a Hessian-vector product is not finite")
        return {"metrics": [pd.DataFrame({"layer": [None], "metric": ["probe"], "value": [1.0]})]}

    extra = Measure("overflow", ("probes.signal",), "probes", ("model",), ("probe",), overflow)
    register(extra)
    try:
        config, _ = load_config(TINY)
        record = run_one(plan_runs(config)[0], prepare_data(config))
    finally:
        del MEASURES["overflow"]
    rows = record.tables["metrics"]
    assert record.status == "diverged" and record.diverged_step == 4
    assert rows[rows["metric"] == "probe"]["step"].tolist() == [0]
    assert set(rows[rows["metric"] == "test_acc"]["step"]) == {0, 4}


class _Attention(nn.Module):
    """A block through torch's fused attention, whose kernel choice may look at grad mode."""

    def __init__(self) -> None:
        super().__init__()
        self.qkv = nn.Linear(4, 12)
        self.act = nn.GELU()
        self.head = nn.Linear(4 * 3, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        q, k, v = self.qkv(x.reshape(-1, 3, 4)).chunk(3, dim=-1)
        h = self.act(nn.functional.scaled_dot_product_attention(q, k, v, is_causal=True))
        return self.head(h.reshape(len(x), -1))


class _Noisy(nn.Module):
    """Draws random numbers in its forward pass: no pass of it is another's."""

    def __init__(self) -> None:
        super().__init__()
        self.body = nn.Sequential(nn.Linear(12, 8), nn.LayerNorm(8), nn.ReLU(), nn.Linear(8, 3))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.body(x + 0.1 * torch.randn_like(x))


def _image_inputs() -> MeasureInputs:
    g = torch.Generator().manual_seed(2)
    x, y = torch.randn(16, 3, 8, 8, generator=g), torch.randint(0, 10, (16,), generator=g)
    return MeasureInputs((x[:8], y[:8]), (x[8:], y[8:]), None, seed=5, num_classes=10)


def _token_inputs() -> MeasureInputs:
    g = torch.Generator().manual_seed(3)
    x, y = torch.randint(0, 16, (16, 6), generator=g), torch.randint(0, 16, (16, 6), generator=g)
    return MeasureInputs((x[:8], y[:8]), (x[8:], y[8:]), None, seed=5, num_classes=16)


def _wide_inputs() -> MeasureInputs:
    g = torch.Generator().manual_seed(4)
    x, y = torch.randn(16, 12, generator=g), torch.randint(0, 3, (16,), generator=g)
    return MeasureInputs((x[:8], y[:8]), (x[8:], y[8:]), None, seed=5, num_classes=3)


SHARED_CASES = {
    "batch norm, train mode": (_net, _inputs, {}, True, True),
    "batch norm, eval mode": (lambda: _net().eval(), _inputs, {}, True, True),
    "batch norm, probes in eval mode": (
        _net, _inputs,
        {"representation": {"mode": "eval"}, "gradient_correlation": {"mode": "eval"},
         "gradient_norms": {"mode": "eval"}},
        True, True,
    ),
    "independent pairing": (_net, _inputs, {"representation": {"pairing": "independent"}}, True, True),
    "wide resnet": (
        lambda: build_model("wrn", "batch", seed=0, depth=10, input_shape=(3, 8, 8), num_classes=10),
        _image_inputs, {}, True, True,
    ),
    "transformer on tokens": (
        lambda: build_model("transformer", "layer", seed=0, num_classes=16, context=6, depth=1,
                            width=8, heads=2),
        _token_inputs, {"representation": {"pairing": "independent"}}, True, True,
    ),
    "fused attention": (lambda: torch.manual_seed(0) and _Attention(), _wide_inputs, {}, True, True),
    "random draws in the forward pass": (lambda: torch.manual_seed(0) and _Noisy(), _wide_inputs, {}, False, True),
    "modes differ": (_net, _inputs, {"representation": {"mode": "eval"}}, False, True),
    "within pairing": (_net, _inputs, {"representation": {"pairing": "within"}}, False, False),
}  # fmt: skip


@pytest.mark.parametrize("case", list(SHARED_CASES))
def test_the_representation_and_gradient_probes_share_a_pass_with_the_same_tables(case) -> None:
    """Measured together, batch_a's gradient pass is also the representation probe's first
    pass (one forward fewer) when it is exactly that pass; the tables are those of each
    measure alone, bit for bit, and where the pass cannot be shared it is not."""
    build, make_inputs, options, shares, two_pass = SHARED_CASES[case]
    model, inputs = build(), make_inputs()
    probes = ProbesConfig(**options)
    hessian = HessianConfig(enabled=False)
    rep, grads = MEASURES["representation"], MEASURES["gradients"]
    if case == "random draws in the forward pass":
        # whether the draws decide the output is asked, and said, once per model, by a pass
        # of its own: before the passes are counted
        with pytest.warns(UserWarning, match="forward pass depends on random numbers"):
            measure_step(model, 3, inputs, [rep], probes, hessian)
    passes: list[int] = []
    model.register_forward_pre_hook(lambda *_: passes.append(1))
    alone = [measure_step(model, 3, inputs, [m], probes, hessian)["metrics"] for m in (rep, grads)]
    alone_passes = len(passes)
    passes.clear()
    together = measure_step(model, 3, inputs, [rep, grads], probes, hessian)["metrics"]
    assert len(passes) == alone_passes - (1 if shares else 0)
    assert alone_passes == (4 if two_pass else 3)
    pd.testing.assert_frame_equal(
        pd.concat(together, ignore_index=True),
        pd.concat(alone[0] + alone[1], ignore_index=True),
        check_exact=True,
    )


@pytest.mark.parametrize("norm", NORMS.names())
def test_every_normalizer_shares_the_pass_with_the_same_tables(norm: str) -> None:
    """The shared pass on the zoo's MLP with each normalizer, after a few training steps
    (running statistics and step counters moved): the same tables as each measure alone."""
    if norm == "instance":  # per-channel statistics over space: a conv model
        model = build_model("wrn", norm, seed=0, depth=10, input_shape=(3, 8, 8), num_classes=10)
        inputs = _image_inputs()
    else:
        model = build_model("mlp", norm, seed=0, depth=3, width=16, input_shape=12, num_classes=3)
        inputs = _wide_inputs()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.05)
    x, y = inputs.batch_b
    for _ in range(3):
        optimizer.zero_grad()
        nn.functional.cross_entropy(model(x), y).backward()
        optimizer.step()
    probes, hessian = ProbesConfig(), HessianConfig(enabled=False)
    rep, grads = MEASURES["representation"], MEASURES["gradients"]
    alone = [measure_step(model, 2, inputs, [m], probes, hessian)["metrics"] for m in (rep, grads)]
    together = measure_step(model, 2, inputs, [rep, grads], probes, hessian)["metrics"]
    pd.testing.assert_frame_equal(
        pd.concat(together, ignore_index=True),
        pd.concat(alone[0] + alone[1], ignore_index=True),
        check_exact=True,
    )


def test_the_signal_measure_takes_its_channel_axis_from_the_config() -> None:
    """The zoo transformer's activation inputs are (N, T, 4D): refused without an axis, with
    the config field to set; measured over (N, T) per feature with channel_axis -1."""
    model = build_model(
        "transformer", "layer", seed=0, num_classes=16, context=6, depth=1, width=8, heads=2
    )
    hessian = HessianConfig(enabled=False)
    signal = [MEASURES["signal"]]
    with pytest.raises(ProbeError, match=r"probes\.signal\.channel_axis"):
        measure_step(model, 0, _token_inputs(), signal, ProbesConfig(signal=True), hessian)
    probes = ProbesConfig(signal={"enabled": True, "channel_axis": -1})
    rows = pd.concat(measure_step(model, 0, _token_inputs(), signal, probes, hessian)["metrics"])
    assert set(rows["metric"]) == {"signal_sq_mean", "signal_var"}
    assert rows["value"].notna().all()


def test_balanced_norm_on_non_negative_pixels_warns_only_of_the_noise_pass() -> None:
    """The quickstart's case: balanced normalization on pixels in [0, 1] checks its input sums
    in a measurement step's noise pass (the gradient probe's session puts its first-call flag
    back), where the noisy copy has negative pixels; the warning says so."""
    import warnings

    from normprobe.norms.balanced import BalancedInputWarning

    g = torch.Generator().manual_seed(0)
    x, y = torch.rand(32, 12, generator=g), torch.randint(0, 3, (32,), generator=g)
    x[:, :6] = 0.0  # dark border pixels: their sums are zero, their noisy sums signed
    inputs = MeasureInputs((x[:16], y[:16]), (x[16:], y[16:]), None, seed=5, num_classes=3)
    model = build_model("mlp", "balanced", seed=0, depth=2, width=8, input_shape=12, num_classes=3)
    chosen = [MEASURES["representation"], MEASURES["gradients"]]
    hessian = HessianConfig(enabled=False)
    both = {"gradient_correlation": True, "gradient_norms": True}  # one shared pass
    noise = ProbesConfig(**both)
    independent = ProbesConfig(representation={"pairing": "independent"}, **both)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        measure_step(model, 0, inputs, chosen, independent, hessian)
        assert not caught
        measure_step(model, 0, inputs, chosen, noise, hessian)
    said = [w for w in caught if w.category is BalancedInputWarning]
    assert len(said) == 1 and len(caught) == 1
    assert "blocks.0.norm" in str(said[0].message)
    assert "representation probe's noise pass" in str(said[0].message)


@pytest.mark.parametrize("shared", [True, False], ids=["one pass pair", "separate probes"])
def test_the_gradient_probes_draw_with_the_run_s_seed(shared: bool) -> None:
    """Randomness that nothing switches off is drawn from the run's seed, as in the other
    probes, and the rows say which seed: the same tables as the probe functions called with
    that seed, and not those of seed 0 (what every run drew before, whatever its seed)."""
    model, inputs = torch.manual_seed(0) and _Noisy(), _wide_inputs()
    options = {} if shared else {"gradient_norms": {"mode": "eval"}}
    probes, hessian = ProbesConfig(**options), HessianConfig(enabled=False)
    loss = nn.functional.cross_entropy

    def direct(seed: int) -> pd.DataFrame:
        if shared:
            return gradient_statistics(model, loss, inputs.batch_a, inputs.batch_b, seed=seed)
        corr = gradient_correlation(model, loss, inputs.batch_a, inputs.batch_b, seed=seed)
        norms = gradient_norms(model, loss, inputs.batch_a, mode="eval", seed=seed)
        return pd.concat([corr, norms], ignore_index=True)

    with pytest.warns(UserWarning, match="forward pass depends on random numbers"):
        direct(0)
    metrics = pd.concat(
        measure_step(model, 3, inputs, [MEASURES["gradients"]], probes, hessian)["metrics"],
        ignore_index=True,
    )
    rows = metrics[metrics["metric"] != "grad_growth_rate"].drop(columns="step")
    assert set(rows["probe_seed"]) == {inputs.seed} and inputs.seed != 0
    pd.testing.assert_frame_equal(
        rows.reset_index(drop=True),
        direct(inputs.seed)[rows.columns],
        check_exact=True,
        check_dtype=False,  # the growth row (layer None) leaves the step's layer column object
    )
    assert not np.allclose(rows["value"], direct(0)["value"])
