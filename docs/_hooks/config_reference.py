"""The config reference, generated from the pydantic schema in ``normprobe.config``.

Each section of the YAML file is one pydantic model; this module walks them
(``model_fields``: type, default, constraints) and renders one table per
model. What the schema cannot say (a sentence per field and an example) is
kept in ``DESCRIPTIONS`` and ``EXAMPLES`` below, keyed by ``Model.field``;
``tests/test_docs.py`` fails when a field lacks either, when a key names no
field, or when an example does not validate, so the page cannot drift from
the code.
"""

from __future__ import annotations

import types
import typing
from typing import Any, Literal, get_args, get_origin

import yaml
from pydantic import BaseModel

from normprobe import config as cfg

# ---------------------------------------------------------------------------- prose per field

DESCRIPTIONS: dict[str, str] = {
    # top level
    "Config.name": "Names the analysis; the default output folder is `runs/<name>`. "
    "A config file without it takes the file's stem.",
    "Config.description": "Free text, kept in the manifest.",
    "Config.model": "The network to build for each normalizer (section `model`).",
    "Config.normalizers": "Registry names or aliases of the normalizers to compare, or `all` "
    "(every registered normalizer that fits the model).",
    "Config.data": "The dataset and the sizes of the probe batches (section `data`).",
    "Config.train": "The training runs (section `train`).",
    "Config.probes": "Which probes run and when (section `probes`).",
    "Config.hessian": "The Hessian spectrum and its own schedule (section `hessian`).",
    "Config.variants": "Variant name -> `{dotted.key: value}`: the grid runs again per variant "
    "with those settings replaced. `name`, `description` and `output` cannot vary; each variant "
    "is validated as a whole config.",
    "Config.output": "Output folder (default `runs/<name>`).",
    # model
    "ModelConfig.name": "A zoo model: `mlp`, `wrn` or `transformer`. A plain string in YAML "
    "(`model: mlp`) is short for this; give `name` or `factory`, not both.",
    "ModelConfig.factory": "Your own model, `package.module:function`, called as "
    "`factory(norm=<normalizer>, **options)`. A string with a colon (`model: pkg.mod:make`) is "
    "short for this.",
    "ModelConfig.options": "Keyword options of the model (for a zoo model, checked against its "
    "signature: `depth`, `width`, `widen`, `skip`, ...).",
    "ModelConfig.swap_norms": "Factory models only: call `factory(**options)` and replace its "
    "torch BatchNorm/GroupNorm/InstanceNorm/LayerNorm/RMSNorm layers by the normalizer under test.",
    "ModelConfig.norm_options": "Normalizer options per normalizer: `{default: {...}, "
    "<normalizer or alias>: {...}}`; a normalizer's entry overrides `default` option by option. "
    "`norm_batch` (microbatch statistics) is ignored by per-example normalizers.",
    # data
    "DataConfig.name": "A registered dataset: `digits`, `synthetic`, `mnist`, `cifar10`, `text`.",
    "DataConfig.options": "Keyword options of the dataset loader (`size`, `flatten`, `normalize`, "
    "`root`, `window`, ...), checked against its signature.",
    "DataConfig.probe_batch": "Examples per probe minibatch (the gradient correlation takes two "
    "disjoint ones).",
    "DataConfig.hessian_samples": "Size `n_H` of the fixed Hessian probe set.",
    "DataConfig.seed": "Seed that picks the probe batches, the Hessian probe set and the "
    "held-out split.",
    "DataConfig.held_out": "Training examples held out for learning-rate selection: a fraction "
    "(0 < f < 1) or a count. They are the last ones of a permutation of the training set seeded "
    "by `data.seed`, never trained on; runs record `val_loss` and `val_acc` (and "
    "`val_perplexity` for a language model) at the evaluation steps. `0`: none.",
    # train
    "TrainConfig.optimizer": "`sgd` (with `momentum`) or `adam`.",
    "TrainConfig.lr": "A learning rate, a grid, or a mapping per normalizer with an optional "
    "`default`. Every rate runs; the best per normalizer (final accuracy, or loss for a language "
    "model, on the split `select_on` names) is marked `selected`.",
    "TrainConfig.momentum": "SGD momentum.",
    "TrainConfig.weight_decay": "Weight decay of the optimizer.",
    "TrainConfig.batch_size": "Training minibatch size.",
    "TrainConfig.steps": "Optimizer steps per run.",
    "TrainConfig.seeds": "One run per seed (model initialization and minibatch order); "
    "a single integer is short for a list of one.",
    "TrainConfig.regnorm_lambda": "Weight `lambda` of the RegNorm/PreRegNorm loss term.",
    "TrainConfig.eval_batch_size": "Batch size for evaluating accuracy and loss.",
    "TrainConfig.eval_train_samples": "Training examples used to measure train accuracy and loss.",
    "TrainConfig.device": "A torch device: `cpu`, `cuda`, `cuda:1`.",
    "TrainConfig.max_parameters": "the largest model, in parameters, an analysis builds "
    "unless told to: a larger one (depth: 100000) is refused up front with its size.",
    "TrainConfig.threads": "torch CPU threads of each run: a number, or `auto` (the default; "
    "`null` means the same): 1 thread per 250,000 parameters of the largest model, at most "
    "the cores but one, shared among `--jobs` runs; never from the load, so a rerun on the "
    "same machine reproduces bit for bit. Recorded with each run; a resume keeps it. "
    "`1` is the fastest choice on a busy machine.",
    "TrainConfig.sampler": "How minibatches are drawn (section `train.sampler`); `sampler: iid` "
    "is short for `{kind: iid}`.",
    "TrainConfig.eval_batch_stats": "Also evaluate without aggregated statistics (section "
    "`train.eval_batch_stats`); `true` or a batch size is a shorthand.",
    "TrainConfig.select_on": "What selects the learning rate: `held_out` (the `data.held_out` "
    "split), `test` (the test set), or `auto` (held_out when `data.held_out` > 0, else test).",
    "TrainConfig.lr_extend": "Extend the grid past an edge when the selected rate is at it "
    "(section `train.lr_extend`); an integer is short for `{max_extra: n}`. Off by default.",
    "LrExtend.max_extra": "The most rates added beyond each edge of a (normalizer, variant)'s "
    "grid; 0: no extension.",
    "LrExtend.factor": "The ratio between an added rate and the edge rate (unset: the ratio of "
    "the two rates at that edge of the grid; 3 for a one-rate grid).",
    "SamplerConfig.kind": "`iid`: a fresh permutation each epoch. `labels`: non-i.i.d. batches of "
    "`labels_per_batch` distinct labels with `per_label` examples each.",
    "SamplerConfig.labels_per_batch": "Distinct labels per batch (kind `labels` only).",
    "SamplerConfig.per_label": "Examples per label in a batch (kind `labels` only); "
    "`train.batch_size` must equal `labels_per_batch * per_label`.",
    "BatchStatsEval.enabled": "Record `test_acc_batchstats`, `test_loss_batchstats`, "
    "`train_acc_batchstats`, `train_loss_batchstats` at every measured step.",
    "BatchStatsEval.batch_size": "Size of the evaluation batches whose own statistics normalize "
    "them (unset: the training batch size).",
    "BatchStatsEval.batches": "`consecutive` batches of the test set, or `sampler`: batches drawn "
    "like the non-i.i.d. training batches (needs `train.sampler.kind: labels`).",
    # probes
    "ProbesConfig.representation": "Representation correlation (probe 1). `true`/`false` is short "
    "for `{enabled: ...}`, as for every probe below.",
    "ProbesConfig.gradient_correlation": "Gradient correlation of two minibatches (probe 2).",
    "ProbesConfig.gradient_norms": "Gradient norms with depth and their growth rate (probe 3).",
    "ProbesConfig.batch_mean": "RegNorm's batch-mean term `R_l` of every normalization layer.",
    "ProbesConfig.batch_dependence": "Batch dependence of the outputs (properties table).",
    "ProbesConfig.train_eval_gap": "Train-mode against eval-mode outputs (properties table).",
    "ProbesConfig.signal": "Signal-propagation statistics of each activation's input "
    "(properties table).",
    "ProbesConfig.schedule": "The steps at which the probes run (step 0 always included).",
    "RepresentationProbe.enabled": "Run this probe.",
    "RepresentationProbe.pairing": "`noise`: a minibatch against a noisy copy; `independent`: "
    "two disjoint minibatches; `within`: mean cosine between the examples of one minibatch.",
    "RepresentationProbe.noise_scale": "`s` of the noise pairing, in units of the input's "
    "standard deviation.",
    "RepresentationProbe.layers": "Layers to probe: module names, a regex, or unset for the "
    "default (activation modules, else normalization modules, else Linear/Conv).",
    "RepresentationProbe.mode": "Normalization mode of the probe's forward passes: `train` "
    "(batch statistics, as in training) or `eval`.",
    "GradientProbe.enabled": "Run this probe.",
    "GradientProbe.layers": "Layers whose parameters' gradients are compared (unset: the "
    "default selection).",
    "GradientProbe.mode": "`train` or `eval` normalization for the gradient passes.",
    "BatchMeanProbe.enabled": "Record `batch_mean_sq` per normalization layer.",
    "BatchMeanProbe.mode": "`train` or `eval` normalization for the probe's forward pass.",
    "StructuralProbe.enabled": "Run this probe.",
    "StructuralProbe.layers": "Layers to measure (unset: the default selection).",
    "SignalProbe.enabled": "Run this probe.",
    "SignalProbe.layers": "Layers to measure (unset: the default selection).",
    "SignalProbe.channel_axis": (
        "The channel axis of the layers' inputs: unset takes axis 1 of a 2-D (N, C) or 4-D "
        "(N, C, H, W) input and refuses a 3-D one; 1 for a 1-D convolution's (N, C, L), -1 for "
        "a sequence's (N, T, D)."
    ),
    "Schedule.steps": "Explicit steps. In YAML a plain list (`schedule: [0, 50, 300]`) is short "
    "for this.",
    "Schedule.every": "Every k steps, and the last step.",
    "Schedule.log": "This many points spaced logarithmically up to the last step.",
    # hessian
    "HessianConfig.enabled": "Compute the Hessian spectrum.",
    "HessianConfig.schedule": "The steps at which the Hessian is measured.",
    "HessianConfig.lanczos_steps": "Lanczos steps `m` per start vector.",
    "HessianConfig.start_vectors": "Rademacher start vectors `n_v` of stochastic Lanczos "
    "quadrature.",
    "HessianConfig.pieces": "What to compute: `density` (SLQ), `top` (top-k eigenvalues and the "
    "outlier ratio), `smallest` (the smallest eigenvalue), `trace` (Hutchinson).",
    "HessianConfig.top_k": "How many of the largest eigenvalues to report.",
    "HessianConfig.trace_samples": "Rademacher vectors of the Hutchinson trace estimate.",
    "HessianConfig.norm_mode": "`train`: batch statistics per chunk (running statistics "
    "untouched); `eval`: running statistics.",
    "HessianConfig.chunk_size": "Examples per chunk of the probe set in each Hessian-vector "
    "product.",
    "HessianConfig.dtype": "Floating-point type of the Hessian computation.",
    "HessianConfig.outlier_k": "K of the outlier ratio `lambda_1 / lambda_K` (unset: the "
    "dataset's number of classes).",
    "HessianConfig.batched": "Hessian-vector products in blocks (SLQ's start vectors side by "
    "side, Hutchinson's probes 8 at a time): the same numbers to rounding. `auto`: for fully "
    "connected networks of at most 65,536 parameters (decided from the model, never from a "
    "timing, so a rerun takes the same path); `true` or `false` to force.",
}

# One YAML snippet per field; each must validate on its own (tests/test_docs.py checks,
# with a stand-in module ``mymodels`` for the factory examples).
EXAMPLES: dict[str, str] = {
    "Config.name": "name: quickstart",
    "Config.description": "description: MLP on digits, every normalizer",
    "Config.model": "model: {name: mlp, options: {depth: 8, width: 128}}",
    "Config.normalizers": "normalizers: [batch, layer, none]",
    "Config.data": "data: {name: digits, options: {normalize: unit}}",
    "Config.train": "train: {lr: 0.05, steps: 300}",
    "Config.probes": "probes: {gradient_norms: false}",
    "Config.hessian": "hessian: {enabled: false}",
    "Config.variants": "variants: {bs8: {train.batch_size: 8}}",
    "Config.output": "output: runs/quickstart",
    "ModelConfig.name": "model: {name: wrn, options: {depth: 14, widen: 1}}",
    "ModelConfig.factory": "model: {factory: mymodels:make_net, options: {width: 64}}",
    "ModelConfig.options": "model: {name: mlp, options: {depth: 16, width: 64}}",
    "ModelConfig.swap_norms": "model: {factory: mymodels:make_resnet, swap_norms: true}",
    "ModelConfig.norm_options": "model: {name: mlp, norm_options: {default: {norm_batch: 4}, "
    "balanced: {stat_fraction: 0.25}}}",
    "DataConfig.name": "data: {name: synthetic}",
    "DataConfig.options": "data: {name: digits, options: {normalize: unit}}",
    "DataConfig.probe_batch": "data: {probe_batch: 256}",
    "DataConfig.hessian_samples": "data: {hessian_samples: 256}",
    "DataConfig.seed": "data: {seed: 1}",
    "DataConfig.held_out": "data: {held_out: 0.1}",
    "TrainConfig.optimizer": "train: {optimizer: adam}",
    "TrainConfig.lr": "train: {lr: {batch: [0.1, 0.03], default: 0.01}}",
    "TrainConfig.momentum": "train: {momentum: 0.9}",
    "TrainConfig.weight_decay": "train: {weight_decay: 0.0005}",
    "TrainConfig.batch_size": "train: {batch_size: 64}",
    "TrainConfig.steps": "train: {steps: 1000}",
    "TrainConfig.seeds": "train: {seeds: [0, 1, 2]}",
    "TrainConfig.regnorm_lambda": "train: {regnorm_lambda: 0.1}",
    "TrainConfig.eval_batch_size": "train: {eval_batch_size: 256}",
    "TrainConfig.eval_train_samples": "train: {eval_train_samples: 512}",
    "TrainConfig.device": "train: {device: cpu}",
    "TrainConfig.threads": "train: {threads: auto}",
    "TrainConfig.max_parameters": "train: {max_parameters: 500000000}",
    "TrainConfig.sampler": "train: {sampler: iid}",
    "TrainConfig.eval_batch_stats": "train: {eval_batch_stats: 2}",
    "TrainConfig.select_on": "train: {select_on: test}",
    "TrainConfig.lr_extend": "train: {lr_extend: 2}",
    "LrExtend.max_extra": "train: {lr_extend: {max_extra: 3}}",
    "LrExtend.factor": "train: {lr_extend: {max_extra: 2, factor: 3.0}}",
    "SamplerConfig.kind": "train: {batch_size: 32, sampler: {kind: labels, labels_per_batch: 4, "
    "per_label: 8}}",
    "SamplerConfig.labels_per_batch": "train: {batch_size: 40, sampler: {kind: labels, "
    "labels_per_batch: 5, per_label: 8}}",
    "SamplerConfig.per_label": "train: {batch_size: 16, sampler: {kind: labels, "
    "labels_per_batch: 4, per_label: 4}}",
    "BatchStatsEval.enabled": "train: {eval_batch_stats: {enabled: true}}",
    "BatchStatsEval.batch_size": "train: {eval_batch_stats: {enabled: true, batch_size: 2}}",
    "BatchStatsEval.batches": "train: {batch_size: 32, sampler: {kind: labels, labels_per_batch: "
    "4, per_label: 8}, eval_batch_stats: {enabled: true, batches: sampler}}",
    "ProbesConfig.representation": "probes: {representation: {pairing: independent}}",
    "ProbesConfig.gradient_correlation": "probes: {gradient_correlation: false}",
    "ProbesConfig.gradient_norms": "probes: {gradient_norms: true}",
    "ProbesConfig.batch_mean": "probes: {batch_mean: true}",
    "ProbesConfig.batch_dependence": "probes: {batch_dependence: true}",
    "ProbesConfig.train_eval_gap": "probes: {train_eval_gap: true}",
    "ProbesConfig.signal": "probes: {signal: {enabled: true}}",
    "ProbesConfig.schedule": "probes: {schedule: {every: 50}}",
    "RepresentationProbe.enabled": "probes: {representation: {enabled: false}}",
    "RepresentationProbe.pairing": "probes: {representation: {pairing: within}}",
    "RepresentationProbe.noise_scale": "probes: {representation: {noise_scale: 0.1}}",
    "RepresentationProbe.layers": "probes: {representation: {layers: 'blocks\\.\\d+\\.act'}}",
    "RepresentationProbe.mode": "probes: {representation: {mode: eval}}",
    "GradientProbe.enabled": "probes: {gradient_norms: {enabled: false}}",
    "GradientProbe.layers": "probes: {gradient_correlation: {layers: ['blocks.0.affine', "
    "'head']}}",
    "GradientProbe.mode": "probes: {gradient_correlation: {mode: eval}}",
    "BatchMeanProbe.enabled": "probes: {batch_mean: {enabled: true}}",
    "BatchMeanProbe.mode": "probes: {batch_mean: {enabled: true, mode: eval}}",
    "StructuralProbe.enabled": "probes: {train_eval_gap: {enabled: true}}",
    "StructuralProbe.layers": "probes: {signal: {enabled: true, layers: 'blocks\\.\\d+\\.act'}}",
    "SignalProbe.enabled": "probes: {signal: {enabled: true}}",
    "SignalProbe.layers": "probes: {signal: {enabled: true, layers: 'blocks\\.\\d+\\.act'}}",
    "SignalProbe.channel_axis": "probes: {signal: {enabled: true, channel_axis: -1}}",
    "Schedule.steps": "hessian: {schedule: {steps: [0, 50, 300]}}",
    "Schedule.every": "probes: {schedule: {every: 25}}",
    "Schedule.log": "probes: {schedule: {log: 10}}",
    "HessianConfig.enabled": "hessian: {enabled: false}",
    "HessianConfig.schedule": "hessian: {schedule: {steps: [0, 50]}}",
    "HessianConfig.lanczos_steps": "hessian: {lanczos_steps: 40}",
    "HessianConfig.start_vectors": "hessian: {start_vectors: 4}",
    "HessianConfig.pieces": "hessian: {pieces: [density, top, trace]}",
    "HessianConfig.top_k": "hessian: {top_k: 20}",
    "HessianConfig.trace_samples": "hessian: {trace_samples: 16}",
    "HessianConfig.norm_mode": "hessian: {norm_mode: eval}",
    "HessianConfig.chunk_size": "hessian: {chunk_size: 64}",
    "HessianConfig.dtype": "hessian: {dtype: float32}",
    "HessianConfig.outlier_k": "hessian: {outlier_k: 5}",
    "HessianConfig.batched": "hessian: {batched: false}",
}

# ---------------------------------------------------------------------------- the walk


def _submodels(annotation: Any) -> list[type[BaseModel]]:
    args = get_args(annotation) or (annotation,)
    return [a for a in args if isinstance(a, type) and issubclass(a, BaseModel)]


def sections() -> dict[type[BaseModel], list[str]]:
    """Every section model of the schema, in file order, with the dotted paths it sits at."""
    found: dict[type[BaseModel], list[str]] = {cfg.Config: ["(top level)"]}

    def walk(model: type[BaseModel], prefix: str) -> None:
        for name, field in model.model_fields.items():
            for sub in _submodels(field.annotation):
                found.setdefault(sub, []).append(prefix + name)
                walk(sub, prefix + name + ".")

    walk(cfg.Config, "")
    return found


def field_paths() -> list[str]:
    """Every dotted field path of the schema (``train.sampler.kind``, ...)."""
    out: list[str] = []

    def walk(model: type[BaseModel], prefix: str) -> None:
        for name, field in model.model_fields.items():
            out.append(prefix + name)
            for sub in _submodels(field.annotation):
                walk(sub, prefix + name + ".")

    walk(cfg.Config, "")
    return out


def type_name(annotation: Any) -> str:
    """A short, readable type: ``int | None``, ``"iid" | "labels"``, ``list[int]``."""
    origin = get_origin(annotation)
    if origin is Literal:
        return " | ".join(f'"{a}"' for a in get_args(annotation))
    if origin in (typing.Union, types.UnionType):
        return " | ".join(type_name(a) for a in get_args(annotation))
    if origin in (list, dict, tuple):
        return f"{origin.__name__}[{', '.join(type_name(a) for a in get_args(annotation))}]"
    if annotation is type(None):
        return "None"
    if annotation is Any:
        return "Any"
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return f"[{annotation.__name__}](#{annotation.__name__.lower()})"
    return getattr(annotation, "__name__", str(annotation))


def constraints(field: Any) -> str:
    words = {"ge": ">=", "gt": ">", "le": "<=", "lt": "<", "min_length": "length >="}
    parts = []
    for item in field.metadata:
        for attr, sign in words.items():
            value = getattr(item, attr, None)
            if value is not None:
                parts.append(f"{sign} {value}")
    return ", ".join(parts)


def default(field: Any) -> str:
    if field.is_required():
        return "required"
    value = field.get_default(call_default_factory=True)
    if isinstance(value, BaseModel):
        value = value.model_dump(mode="json", exclude_defaults=True) or "(its defaults)"
        if value == "(its defaults)":
            return value
    if value is None:
        return "unset"
    return f"`{yaml.safe_dump(value, default_flow_style=True, width=1000).strip().removesuffix('...').strip()}`"


def _cell(text: str) -> str:
    return text.replace("|", "\\|").replace("\n", " ")


def _code(text: str) -> str:
    return f"<code>{_html(text)}</code>"


def _html(text: str) -> str:
    return text.replace("&", "&amp;").replace("<", "&lt;").replace(">", "&gt;").replace("|", "&#124;")


def render() -> str:
    """The Markdown of the generated part of the config reference."""
    lines: list[str] = []
    for model, paths in sections().items():
        title = model.__name__
        where = ", ".join(f"`{p}`" if p != "(top level)" else p for p in paths)
        doc = (model.__doc__ or "").strip().split("\n\n")[0].replace("\n", " ")
        lines += [f"## {title}", "", f"At: {where}.", "", doc, ""]
        lines += ["| field | type | default | what it does |", "| --- | --- | --- | --- |"]
        for name, field in model.model_fields.items():
            key = f"{title}.{name}"
            kind = type_name(field.annotation)
            limit = constraints(field)
            example = EXAMPLES.get(key, "")
            cells = [
                f"`{name}`",
                f"{kind}, {limit}" if limit else kind,
                default(field),
                f"{DESCRIPTIONS.get(key, '')}<br>Example: {_code(example)}",
            ]
            lines.append("| " + " | ".join(_cell(c) for c in cells) + " |")
        lines.append("")
    return "\n".join(lines)


MARKER = "<!-- config-reference -->"


def on_page_markdown(markdown: str, page: Any, **kwargs: Any) -> str:
    if MARKER in markdown:
        return markdown.replace(MARKER, render())
    return markdown
