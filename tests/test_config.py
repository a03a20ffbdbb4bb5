"""Config validation: every mistake is one message naming the field path and the fix."""

from __future__ import annotations

import hashlib
import json
import subprocess
import sys
import textwrap
from collections.abc import Callable
from pathlib import Path

import pytest

from normprobe.config import (
    ConfigError,
    apply_overrides,
    config_hash,
    load_config,
    parse_config,
)
from normprobe.schema import Schedule

BASE = """\
model: {name: mlp, options: {depth: 2, width: 16}}
normalizers: [batch, layer]
train: {steps: 4, batch_size: 16}
hessian: {enabled: false}
"""
#: the cli_here fixture (tests/conftest.py): the CLI in this process
Cli = Callable[..., subprocess.CompletedProcess[str]]

#: BASE without its train section, for cases that give their own (a key twice is an error)
NO_TRAIN = BASE.replace("train: {steps: 4, batch_size: 16}\n", "")


def _cli(*args: str, cwd: Path | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "normprobe", *args],
        capture_output=True,
        text=True,
        timeout=300,
        cwd=cwd,
    )


def _write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "cfg.yaml"
    path.write_text(textwrap.dedent(text))
    return path


# Each case: YAML text, the field path the message must name, a phrase of the fix.
CLI_CASES = {
    "unknown key": (BASE + "trian: {steps: 3}\n", "trian", "did you mean 'train'"),
    "unknown nested key": (
        BASE.replace("steps: 4", "stpes: 4"),
        "train.stpes",
        "did you mean 'steps'",
    ),
    "wrong type": (BASE.replace("steps: 4", "steps: four"), "train.steps", "valid integer"),
    "wrong value": (
        BASE.replace("steps: 4", "steps: -4"),
        "train.steps",
        "greater than or equal to 0",
    ),
    "bad lr in a grid": (
        NO_TRAIN + "train: {steps: 4, batch_size: 16, lr: [0.1, 0.2, -1]}\n",
        "train.lr[2]",
        "positive number",
    ),
    "unknown normalizer": (
        BASE.replace("[batch, layer]", "[batch, layr]"),
        "normalizers[1]",
        "did you mean 'layer'",
    ),
    "unknown model": (BASE.replace("name: mlp", "name: mpl"), "model.name", "did you mean 'mlp'"),
    "unknown model option": (
        BASE.replace("width: 16", "widht: 16"),
        "model.options.widht",
        "did you mean 'width'",
    ),
    "unknown dataset": (BASE + "data: {name: digit}\n", "data.name", "did you mean 'digits'"),
    "factory that cannot be imported": (
        BASE.replace(
            "{name: mlp, options: {depth: 2, width: 16}}", "{factory: 'nosuchpkg.nets:make'}"
        ),
        "model.factory",
        "cannot import module 'nosuchpkg.nets'",
    ),
    "missing dataset file": (
        BASE + "data: {name: mnist, options: {root: /nonexistent/mnist}}\n",
        "data.options",
        "does not exist",
    ),
    "instance norm in an MLP": (
        BASE.replace("[batch, layer]", "[batch, instance]"),
        "normalizers[1]",
        "use 'layer' or 'group' for dense layers",
    ),
    "sampler that does not fit the batch size": (
        NO_TRAIN + "train: {steps: 4, batch_size: 16, sampler: {kind: labels, labels_per_batch: 5, "
        "per_label: 4}}\n",
        "train.batch_size",
        "set batch_size: 20",
    ),
    "more labels per batch than the dataset has": (
        NO_TRAIN
        + "train: {steps: 4, batch_size: 24, sampler: {kind: labels, labels_per_batch: 12, "
        "per_label: 2}}\n",
        "train.sampler.labels_per_batch",
        "use labels_per_batch <= 10",
    ),
    "unknown normalizer under model.norm_options": (
        BASE.replace("width: 16}", "width: 16}, norm_options: {balancd: {stat_fraction: 0.5}}"),
        "model.norm_options.balancd",
        "did you mean 'balanced'",
    ),
    "an option the normalizer does not have": (
        BASE.replace("width: 16}", "width: 16}, norm_options: {default: {stat_fraction: 0.5}}"),
        "model.norm_options.default.stat_fraction",
        "normalizer 'batch' has no option 'stat_fraction'",
    ),
    "an option value the normalizer rejects": (
        BASE.replace("width: 16}", "width: 16}, norm_options: {equinorm: {stat_fraction: 2}}"),
        "model.norm_options.equinorm.stat_fraction",
        "must be in (0, 1]",
    ),
    "norm options in both places": (
        BASE.replace(
            "width: 16}", "width: 16, norm_options: {}}, norm_options: {default: {norm_batch: 4}}"
        ),
        "model.options.norm_options",
        "move them to model.norm_options",
    ),
    "batch size not a multiple of norm_batch": (
        BASE.replace("width: 16}", "width: 16}, norm_options: {batch: {norm_batch: 5}}"),
        "train.batch_size",
        "use 15 or 20",
    ),
    "probe batch not a multiple of norm_batch": (
        BASE.replace("width: 16}", "width: 16}, norm_options: {default: {norm_batch: 8}}")
        + "data: {probe_batch: 20}\n",
        "data.probe_batch",
        "not a multiple of norm_batch 8 (model.norm_options.default.norm_batch",
    ),
    "hessian chunks not a multiple of norm_batch": (
        BASE.replace("width: 16}", "width: 16}, norm_options: {default: {norm_batch: 8}}").replace(
            "hessian: {enabled: false}", "hessian: {chunk_size: 60}"
        )
        + "data: {probe_batch: 16}\n",
        "hessian.chunk_size",
        "use 56 or 64",
    ),
    "batch-stats evaluation batch not a multiple of norm_batch": (
        BASE.replace("width: 16}", "width: 16}, norm_options: {default: {norm_batch: 4}}").replace(
            "batch_size: 16}", "batch_size: 16, eval_batch_stats: 10}"
        )
        + "data: {probe_batch: 16}\n",
        "train.eval_batch_stats.batch_size",
        "use 8 or 12",
    ),
    "a variant with an unknown key": (
        BASE + "variants: {small: {train.batch_sise: 8}}\n",
        "variants.small: train.batch_sise",
        "did you mean 'batch_size'",
    ),
    "a variant that changes the output": (
        BASE + "variants: {small: {output: elsewhere}}\n",
        "variants.small.output",
        "the same for every variant",
    ),
    "a variant the dataset cannot serve": (
        BASE + "variants: {labels: {train.batch_size: 24, train.sampler: {kind: labels, "
        "labels_per_batch: 12, per_label: 2}}}\n",
        "variants.labels: train.sampler.labels_per_batch",
        "use labels_per_batch <= 10",
    ),
    "sampler evaluation batches without a label sampler": (
        BASE.replace(
            "batch_size: 16}",
            "batch_size: 16, eval_batch_stats: {enabled: true, batches: sampler}}",
        ),
        "train.eval_batch_stats.batches",
        "set train.sampler to {kind: labels",
    ),
    "malformed yaml": ("model: {name: mlp\nnormalizers: [batch\n", "line", "malformed YAML"),
}


@pytest.mark.parametrize("case", list(CLI_CASES))
def test_cli_config_errors_are_one_line_with_field_and_fix(
    tmp_path: Path, case: str, cli_here: Cli
) -> None:
    text, field, fix = CLI_CASES[case]
    args = ("analyze", str(_write(tmp_path, text)), "--out", str(tmp_path / "out"), "--quiet")
    # one case through a process of its own, as a user runs it; the others in this process
    result = _cli(*args) if case == "malformed yaml" else cli_here(*args)
    assert result.returncode == 2, result.stderr
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1, result.stderr
    assert "Traceback" not in result.stderr
    assert field in lines[0] and fix in lines[0], lines[0]
    assert not (tmp_path / "out" / "runs").exists()  # nothing ran


def test_cli_set_overrides_are_validated_like_the_file(tmp_path: Path, cli_here: Cli) -> None:
    cfg = _write(tmp_path, BASE)
    result = cli_here("analyze", str(cfg), "--set", "train.lr=[0.1,oops]", "--quiet")
    assert result.returncode == 2
    assert "train.lr[1]" in result.stderr
    result = cli_here("analyze", str(cfg), "--set", "train.steps", "--quiet")
    assert result.returncode == 2 and "expected key=value" in result.stderr


def test_cli_missing_config_file(tmp_path: Path, cli_here: Cli) -> None:
    result = cli_here("analyze", str(tmp_path / "nope.yaml"))
    assert result.returncode == 2 and "does not exist" in result.stderr


def test_overrides_parse_yaml_values_and_create_sections() -> None:
    raw = apply_overrides(
        {"train": {"steps": 3}}, ["train.steps=7", "train.lr=[0.1, 0.2]", "name=x"]
    )
    assert raw == {"train": {"steps": 7, "lr": [0.1, 0.2]}, "name": "x"}
    with pytest.raises(ConfigError, match="is a int, not a section"):
        apply_overrides({"train": {"steps": 3}}, ["train.steps.x=1"])
    # a section given by its on/off shorthand opens up into its keys
    raw = apply_overrides({"probes": {"gradient_norms": True}}, ["probes.gradient_norms.mode=eval"])
    assert raw == {"probes": {"gradient_norms": {"enabled": True, "mode": "eval"}}}


def test_learning_rate_grids_per_normalizer() -> None:
    cfg = parse_config({"train": {"lr": {"batch": [0.1, 1.0], "default": 0.05}}})
    assert cfg.train.rates_for("batch") == [0.1, 1.0]
    assert cfg.train.rates_for("layer") == [0.05]
    cfg = parse_config({"train": {"lr": {"batchnorm": 0.3}}})  # aliases resolve
    assert cfg.train.rates_for("batch") == [0.3]
    with pytest.raises(ConfigError, match="no learning rate for normalizer 'layer'"):
        cfg.train.rates_for("layer")


@pytest.mark.parametrize(
    "train,field,words",
    [
        # the same rate twice ran once: a grid one rate short, without a word
        ({"lr": [0.05, 0.05]}, "train.lr[1]", ["0.05 is given twice", "train.lr[0]", "[0.05]"]),
        ({"lr": [0.01, 0.05, 5e-2]}, "train.lr[2]", ["0.05 is given twice", "[0.01, 0.05]"]),
        ({"lr": [0.05, "5e-2"]}, "train.lr[1]", ["0.05 is given twice"]),  # YAML reads 5e-2 as text
        # two rates that differ past the sixth digit wrote one run folder
        ({"lr": [0.05, 0.0500000001]}, "train.lr[1]", ["both name runs lr0.05"]),
        (
            {"lr": {"batch": [0.1, 0.1], "default": 0.05}},
            "train.lr.batch[1]",
            ["0.1 is given twice"],
        ),
        # two keys of one normalizer: the last won, the other grid was never run
        (
            {"lr": {"batch": 0.1, "batchnorm": 0.2}},
            "train.lr.batchnorm",
            ["name the same normalizer"],
        ),
        ({"seeds": [0, 1, 0]}, "train.seeds[2]", ["seed 0 is given twice", "[0, 1]"]),
    ],
)
def test_a_rate_or_seed_given_twice_is_refused(train: dict, field: str, words: list[str]) -> None:
    with pytest.raises(ConfigError) as err:
        parse_config({"normalizers": ["batch"], "train": train})
    message = str(err.value)
    assert f"{field}: " in message and "\n" not in message, message
    for word in words:
        assert word in message, message


def test_a_normalizer_given_twice_is_refused_by_any_of_its_names() -> None:
    with pytest.raises(
        ConfigError, match=r"normalizers\[2\]: 'batch' is given twice.*\[batch, layer\]"
    ):
        parse_config({"normalizers": ["batch", "layer", "batch"]})
    with pytest.raises(ConfigError, match=r"normalizers\[1\]: 'batchnorm' is batch again"):
        parse_config({"normalizers": ["batch", "batchnorm"]})


def test_distinct_rates_and_seeds_are_kept_in_order() -> None:
    cfg = parse_config({"train": {"lr": [0.1, 0.01, 0.0501, 0.05], "seeds": [3, 1]}})
    assert cfg.train.rates_for("batch") == [0.1, 0.01, 0.0501, 0.05]
    assert cfg.train.seeds == [3, 1]


@pytest.mark.parametrize(
    "schedule,steps,expected",
    [
        ([10, 50, 5000], 100, [0, 10, 50]),
        ({"every": 40}, 100, [0, 40, 80, 100]),
        ({"log": 5}, 1000, [0, 1, 6, 32, 178, 1000]),
        ({"steps": []}, 10, [0]),
    ],
)
def test_schedules_always_include_step_zero(schedule, steps, expected) -> None:
    # the schedule alone: in a config, steps past train.steps are an error (see test_bad_input.py)
    assert Schedule.model_validate(schedule).resolve(steps) == expected


def test_config_round_trips_through_its_dict() -> None:
    cfg, _ = load_config(
        {"normalizers": ["batchnorm"], "train": {"seeds": 3}, "probes": {"gradient_norms": False}}
    )
    assert cfg.normalizer_names() == ["batch"] and cfg.train.seeds == [3]
    again = parse_config(cfg.to_dict())
    assert again == cfg


def test_sampler_and_batch_stats_options() -> None:
    train = parse_config({"train": {"batch_size": 40, "sampler": "iid"}}).train
    assert train.sampler.kind == "iid" and not train.eval_batch_stats.enabled
    labels = {"kind": "labels", "labels_per_batch": 5, "per_label": 8}
    train = parse_config({"train": {"batch_size": 40, "sampler": labels}}).train
    assert (train.sampler.labels_per_batch, train.sampler.per_label) == (5, 8)
    assert parse_config({"train": {"eval_batch_stats": True}}).train.eval_batch_stats.enabled
    shorthand = parse_config({"train": {"eval_batch_stats": 4}}).train.eval_batch_stats
    assert shorthand.enabled and shorthand.batch_size == 4
    cases = [
        ({"sampler": {"kind": "labels", "labels_per_batch": 5}}, "train.sampler.per_label"),
        ({"sampler": {"kind": "iid", "per_label": 2}}, "train.sampler.per_label: per_label"),
        ({"sampler": {"kind": "label"}}, "train.sampler.kind"),
        ({"batch_size": 32, "sampler": labels}, "train.batch_size: 32 does not match"),
        ({"eval_batch_stats": {"batch_size": 1}}, "train.eval_batch_stats.batch_size"),
        ({"eval_batch_stats": {"size": 4}}, "did you mean 'batch_size'"),
    ]
    for train, phrase in cases:
        with pytest.raises(ConfigError, match=phrase.replace(".", r"\.")):
            parse_config({"train": train})
    config, _ = load_config(
        {"train": {"eval_batch_stats": True}}, ["train.eval_batch_stats.batch_size=8"]
    )
    assert config.train.eval_batch_stats.batch_size == 8


def test_per_normalizer_options_merge_and_the_old_key_still_works() -> None:
    options = {"default": {"norm_batch": 4}, "equinorm": {"stat_fraction": 0.25, "norm_batch": 8}}
    cfg = parse_config(
        {
            "model": {"name": "mlp", "norm_options": options},
            "normalizers": ["batch", "balanced", "layer"],
            "train": {"batch_size": 32},
            "data": {"probe_batch": 32, "hessian_samples": 64},
            "hessian": {"chunk_size": 32},
        }
    )
    assert cfg.norm_options_for("batch") == {"norm_batch": 4}
    assert cfg.norm_options_for("balanced") == {"norm_batch": 8, "stat_fraction": 0.25}
    assert cfg.norm_batch_for("batch")[0] == 4 and cfg.norm_batch_for("balanced")[0] == 8
    assert cfg.norm_batch_for("layer")[0] is None  # per-example statistics ignore it
    assert parse_config(cfg.to_dict()) == cfg
    # model.options.norm_options (before model.norm_options) counts as the default
    old = parse_config(
        {
            "model": {"name": "mlp", "options": {"norm_options": {"norm_batch": 4}}},
            "normalizers": ["batch"],
            "train": {"batch_size": 32},
            "data": {"probe_batch": 32, "hessian_samples": 64},
            "hessian": {"chunk_size": 32},
        }
    )
    assert old.norm_options_for("batch") == {"norm_batch": 4}
    with pytest.raises(ConfigError, match=r"model\.options\.norm_options\.stat_fraction"):
        parse_config(
            {
                "model": {"name": "mlp", "options": {"norm_options": {"stat_fraction": 0.5}}},
                "normalizers": ["batch"],
            }
        )
    # a config that leaves the newer keys at their defaults hashes as before they existed
    plain = parse_config({"normalizers": ["batch"]})
    data = plain.to_dict()
    data.pop("output", None)
    data["model"].pop("norm_options")
    data.pop("variants")
    data["probes"].pop("batch_mean")
    for key in ("batch_dependence", "train_eval_gap", "signal"):
        data["probes"].pop(key)
    data["train"]["eval_batch_stats"].pop("batches")
    data["hessian"].pop("outlier_k")
    data["hessian"].pop("batched")
    data["train"].pop("max_parameters")
    assert data["train"]["threads"] == "auto"
    data["train"]["threads"] = None  # the default before threads: auto
    data["data"].pop("held_out")
    data["train"].pop("select_on")
    data["train"].pop("lr_extend")
    text = json.dumps(data, sort_keys=True, separators=(",", ":"))
    assert config_hash(plain) == hashlib.sha256(text.encode()).hexdigest()[:16]
    on = parse_config({"normalizers": ["batch"], "probes": {"signal": True}})
    assert on.probes.signal.enabled and config_hash(on) != config_hash(plain)
    forced = parse_config({"normalizers": ["batch"], "hessian": {"batched": False}})
    assert forced.hessian.batched is False and config_hash(forced) != config_hash(plain)


def test_variants_change_settings_per_variant_and_name_runs() -> None:
    from normprobe.plan import plan_runs

    cfg = parse_config(
        {
            "normalizers": ["batch", "balanced"],
            "train": {"batch_size": 32},
            "variants": {
                "micro4": {"model.norm_options.default.norm_batch": 4},
                "quarter": {
                    "normalizers": ["balanced"],
                    "model.norm_options.balanced": {"stat_fraction": 0.25},
                },
                "labels": {
                    "train.sampler": {"kind": "labels", "labels_per_batch": 4, "per_label": 8},
                    "train.eval_batch_stats": {"enabled": True, "batches": "sampler"},
                },
            },
        }
    )
    configs = dict(cfg.variant_configs())
    assert configs["micro4"].norm_options_for("batch") == {"norm_batch": 4}
    assert configs["quarter"].normalizer_names() == ["balanced"]
    assert configs["quarter"].norm_options_for("balanced") == {"stat_fraction": 0.25}
    assert configs["labels"].train.sampler.per_label == 8
    assert all(not c.variants for c in configs.values())
    runs = [spec.run for spec in plan_runs(cfg)]
    assert runs == [
        "batch_micro4_lr0.1_seed0",
        "balanced_micro4_lr0.1_seed0",
        "balanced_quarter_lr0.1_seed0",
        "batch_labels_lr0.1_seed0",
        "balanced_labels_lr0.1_seed0",
    ]
    # the variants are part of the hash; without them the hash is the plain config's
    assert config_hash(cfg) != config_hash(parse_config({**cfg.to_dict(), "variants": {}}))
    plain = {k: v for k, v in cfg.to_dict().items() if k != "variants"}
    assert config_hash(parse_config(plain)) == config_hash(parse_config({**plain, "variants": {}}))
    # a variant value replaces the key it names, validated like the file
    with pytest.raises(ConfigError, match=r"variants\.bad: train\.batch_size: 30 is not a "):
        parse_config(
            {
                **cfg.to_dict(),
                "variants": {
                    "bad": {"train.batch_size": 30, "model.norm_options.default.norm_batch": 4}
                },
            }
        )
    with pytest.raises(ConfigError, match=r"variants\.a_b: a variant name"):
        parse_config({"variants": {"a_b": {}}})
