"""Layer selection, execution-order depths and hooks for any ``torch.nn.Module``.

(Over 500 lines, one job: choosing layers and hooking them. The selection
rules, their error messages and the hook lifecycle must stay together so
every probe reports the same layers in the same order.)

A probe picks layers by module name, by type or by regex, or by role
(:mod:`normprobe.roles`; default for representations: the model's blocks,
else every activation module, else every normalization module, else every
Linear/Conv; for gradients: every module owning a weight), runs the model
on inputs given by the batch contract (:mod:`normprobe.batch`), and numbers the layers in the order they
ran, so a model whose modules are registered out of order, or that calls one
module twice, still gets the right depths. A module called ``k > 1`` times in
one forward pass appears once per call, labelled ``name``, ``name#2``, ...

:class:`Probe` is the building block of every probe and is public so a
notebook cell can write a new one::

    with Probe(model, layers=r"blocks\\.\\d+\\.act") as p:
        model(x)
    p.activations["blocks.0.act"]  # the output of that layer in the last pass

Inside a :class:`Probe` the model runs in the requested mode with frozen
statistics, dropout off and a forked, seeded random state; on exit the hooks
are removed and the model is left exactly as found (also on an exception).
"""

from __future__ import annotations

import difflib
import re
import weakref
from collections.abc import Callable, Iterator, Sequence
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass
from functools import partial
from typing import Any, Literal

import torch
from torch import nn
from torch.nn.utils import parametrize

from normprobe.batch import (
    Inputs,
    attributes_kept,
    autograd_available,
    call_model,
    check_inputs,
    check_measurable,
    dense_gradients,
    draws_matter,
    dropout_off,
    fingerprint,
    forked_random_state,
    full_precision,
    generator_states,
    model_device,
    model_dtype,
    sparse_embeddings,
    split_batch,
    to_device,
    warn_of_random_draws,
)
from normprobe.errors import NormprobeError, listed
from normprobe.roles import (
    ACTIVATION_TYPES,
    AFFINE_TYPES,
    NORMALIZER_TYPES,
    find_blocks,
    is_activation,
    is_affine,
    is_normalizer,
    weight_layers,
    weight_rule,
)
from normprobe.state import (
    ModelSnapshot,
    frozen_statistics,
    held_snapshot,
    restore,
    restore_moved_buffers,
    snapshot,
    warn_of_frozen_statistics,
)

__all__ = [
    "ProbeError",
    "Layers",
    "Mode",
    "Capture",
    "Reduce",
    "LayerCall",
    "Probe",
    "select_layers",
    "resolve_layers",
    "REPRESENTATION_RULES",
    "session",
    "ACTIVATION_TYPES",
    "NORMALIZER_TYPES",
    "AFFINE_TYPES",
    "is_activation",
    "is_normalizer",
    "is_affine",
]


class ProbeError(NormprobeError, ValueError):
    """A probe called with arguments it cannot work with (layers, pairing, batch shapes)."""


#: module names, a module type or tuple of types, or a regex matched against whole names
Layers = str | Sequence[str] | type[nn.Module] | tuple[type[nn.Module], ...] | None
Mode = Literal["train", "eval"]
#: what a Probe records per layer call: its output, or the weight/bias tensors it applied
Capture = Literal["outputs", "weights"]
#: ``reduce(call, output)``: what a Probe keeps from one layer call's output
Reduce = Callable[["LayerCall", torch.Tensor], Any]
MODES: tuple[str, ...] = ("train", "eval")
#: the default representation rules (see :func:`select_layers`); a model may name one for
#: itself with a class attribute ``representation_layers``
REPRESENTATION_RULES: tuple[str, ...] = ("activations", "blocks", "normalizers", "weights")


@dataclass(frozen=True)
class LayerCall:
    """One call of a selected layer in a forward pass.

    ``label`` is ``name`` for the first call of the module and ``name#k`` for
    its k-th call; ``depth`` is the 1-based position among the selected
    layers' calls, in the order they finished (a module's output exists once
    its forward returns).
    """

    label: str
    name: str
    call: int
    depth: int
    module_type: str


# --------------------------------------------------------------------------- selection


def select_layers(
    model: nn.Module,
    layers: Layers = None,
    *,
    default: Literal["representations", "gradients"] = "representations",
    embeddings: bool = False,
    norms: bool = False,
    frozen: bool = True,
) -> dict[str, nn.Module]:
    """The modules named by ``layers``, by qualified name, in registration order.

    ``layers`` is ``None`` (the default rule), a list of module names, a module
    type or tuple of types, or a regex matched against whole names. The
    default rule for representations: the outputs of the model's blocks, i.e.
    the residual stream, and any activation module outside them (a stem),
    when it has blocks
    (:func:`normprobe.roles.find_blocks`: GPT-2's ``transformer.h.{i}``, a
    ResNet's blocks whether its ReLU is a module or ``F.relu``,
    ``nn.TransformerEncoder``'s layers); else every activation module (an
    MLP's hidden layers), else every normalization module, else every
    Linear/Conv. A model may choose one of these rules for itself with a
    class attribute ``representation_layers`` ("activations", "blocks",
    "normalizers" or "weights"); the zoo's models declare "activations", the
    layers their figures read.
    For gradients: every module owning a weight
    (:func:`normprobe.roles.weight_layers`, with the ``embeddings``, ``norms``
    and ``frozen`` options). Depths are not known here: they come from
    running the model (:class:`Probe`). :func:`resolve_layers` also says
    which rule chose them.

    >>> net = nn.Sequential(nn.Linear(3, 4), nn.ReLU(), nn.Linear(4, 2))
    >>> list(select_layers(net)), list(select_layers(net, default="gradients"))
    (['1'], ['0', '2'])
    >>> list(select_layers(net, r"[02]"))
    ['0', '2']
    """
    return resolve_layers(
        model, layers, default=default, embeddings=embeddings, norms=norms, frozen=frozen
    )[0]


def resolve_layers(
    model: nn.Module,
    layers: Layers = None,
    *,
    default: Literal["representations", "gradients"] = "representations",
    embeddings: bool = False,
    norms: bool = False,
    frozen: bool = True,
) -> tuple[dict[str, nn.Module], str]:
    """:func:`select_layers`, and the rule that chose the layers, as a result table states it.

    >>> net = nn.Sequential(nn.Linear(3, 4), nn.ReLU(), nn.Linear(4, 2))
    >>> resolve_layers(net)[1]
    'activations: activation modules (no blocks)'
    """
    named = {name: m for name, m in model.named_modules() if name}
    check_measurable(model, [model, *named.values()], ProbeError)
    if not named:
        raise ProbeError(
            f"{type(model).__name__} has no submodules to probe; probes hook into the layers of a "
            f"model (e.g. a Sequential of Linear and ReLU modules)"
        )
    if layers is None:
        if default == "gradients":
            chosen, left_out = weight_layers(
                model, embeddings=embeddings, norms=norms, frozen=frozen
            )
            if not chosen:
                options = [
                    option
                    for option, reason, on in (
                        ("embeddings=True", "embedding", embeddings),
                        ("norms=True", "norm", norms),
                        ("frozen=True", "frozen", frozen),
                    )
                    if not on and reason in left_out.values()
                ]
                fix = f"pass {' or '.join(options)}, or " if options else ""
                raise ProbeError(
                    f"no module of the model owns a weight that the rule takes "
                    f"({weight_rule(embeddings, norms, frozen, left_out)}); {fix}name the layers "
                    f"with layers=[...] (a layer whose weight a hook computes from other "
                    f"parameters, as torch.nn.utils.spectral_norm's, is measured at the weight it "
                    f"applies when named)"
                )
            return chosen, "weights: " + weight_rule(embeddings, norms, frozen, left_out)
        if default != "representations":
            raise ProbeError(f"default must be 'representations' or 'gradients', got {default!r}")
        return _default_layers(model, named)
    if isinstance(layers, str):
        return _weighted(_by_regex(named, layers), f"regex: {layers}", default)
    if isinstance(layers, type) or _all_types(layers):
        types = [layers] if isinstance(layers, type) else list(layers)
        rule = "type: " + ", ".join(t.__name__ for t in types)
        return _weighted(_by_type(named, layers), rule, default)
    if isinstance(layers, Sequence) and all(isinstance(n, str) for n in layers):
        return _by_names(named, list(layers)), "named"
    raise ProbeError(
        f"layers must be None (the default rule), a list of module names, a module type or tuple "
        f"of types, or a regex string; got {type(layers).__name__} {layers!r}"
    )


def _weighted(
    chosen: dict[str, nn.Module], rule: str, default: str
) -> tuple[dict[str, nn.Module], str]:
    """For the gradient probes (``default="gradients"``), a type or regex selection without
    the modules that apply no weight tensor (a ``LayerNorm(elementwise_affine=False)`` among
    the model's LayerNorms): left out and named in the rule, as the default rule does; a
    module named in ``layers=[...]`` is refused instead, when its pass runs."""
    if default != "gradients":
        return chosen, rule
    weightless = [
        n for n, m in chosen.items() if not isinstance(getattr(m, "weight", None), torch.Tensor)
    ]
    if not weightless:
        return chosen, rule
    kept = {n: m for n, m in chosen.items() if n not in weightless}
    if not kept:
        raise ProbeError(
            f"layers selects only modules without a weight tensor ({listed(weightless, 8)}); "
            f"gradient probes need layers with a weight (Linear, Conv, normalizers with an "
            f"affine scale)"
        )
    return kept, f"{rule}; left out: {listed(weightless, 8)} (no weight)"


def _all_types(layers: object) -> bool:
    return isinstance(layers, tuple) and bool(layers) and all(isinstance(t, type) for t in layers)


_RULE_TEXT = {
    "blocks": "blocks: repeated submodules of a ModuleList/Sequential (the residual stream)",
    "activations": "activations: activation modules",
    "normalizers": "normalizers: normalization modules",
    "weights": "weights: Linear/Conv modules",
}


def _default_layers(
    model: nn.Module, named: dict[str, nn.Module]
) -> tuple[dict[str, nn.Module], str]:
    rules = {
        "blocks": lambda: find_blocks(model),
        "activations": lambda: {n: m for n, m in named.items() if is_activation(m)},
        "normalizers": lambda: {n: m for n, m in named.items() if is_normalizer(m)},
        "weights": lambda: {n: m for n, m in named.items() if is_affine(m)},
    }
    declared = getattr(model, "representation_layers", None)
    if declared is not None:
        if declared not in rules:
            raise ProbeError(
                f"{type(model).__name__}.representation_layers is {declared!r}; it must be one of "
                f"{', '.join(REPRESENTATION_RULES)}"
            )
        chosen = rules[declared]()
        if chosen:
            return chosen, _RULE_TEXT[declared] + f" (declared by {type(model).__name__})"
    blocks = rules["blocks"]()
    acts = rules["activations"]()
    if blocks:
        # a block's output is the residual stream (a ResNet's relu after the add, a transformer
        # layer's x + mlp(x)); the activation modules inside a transformer's MLP are not. An
        # activation outside every block (a ResNet's stem) is a layer of its own.
        outside = {
            n: m for n, m in acts.items() if not any(n.startswith(b + ".") for b in blocks)
        }
        note = " and the activation modules outside them" if outside else ""
        return {**outside, **blocks}, _RULE_TEXT["blocks"] + note
    if acts:
        return acts, _RULE_TEXT["activations"] + " (no blocks)"
    for rule in ("normalizers", "weights"):
        chosen = rules[rule]()
        if chosen:
            return chosen, _RULE_TEXT[rule] + " (no blocks or activation modules)"
    raise ProbeError(
        f"the model has no activation or normalization or Linear/Conv modules (and no blocks) "
        f"for the default layer rule; name the layers to probe with layers=[...] (module names), a module "
        f"type, or a regex; modules: {listed(list(named), 12)}"
    )


def _by_regex(named: dict[str, nn.Module], pattern: str) -> dict[str, nn.Module]:
    try:
        compiled = re.compile(pattern)
    except re.error as err:
        raise ProbeError(f"layers={pattern!r} is not a valid regular expression: {err}") from None
    chosen = {name: m for name, m in named.items() if compiled.fullmatch(name)}
    if not chosen:
        literal = pattern.replace("\\", "")
        raise ProbeError(
            f"the regex layers={pattern!r} matches no module name (it must match a whole name)"
            f"{_did_you_mean(literal, list(named))}; module names: {listed(list(named), 12)}"
        )
    return chosen


def _by_type(
    named: dict[str, nn.Module], types: type[nn.Module] | tuple[type[nn.Module], ...]
) -> dict[str, nn.Module]:
    chosen = {name: m for name, m in named.items() if isinstance(m, types)}
    if not chosen:
        wanted = types.__name__ if isinstance(types, type) else [t.__name__ for t in types]
        present = sorted({type(m).__name__ for m in named.values()})
        raise ProbeError(
            f"layers={wanted} selects no module of this model; its module types are: "
            f"{', '.join(present)}"
        )
    return chosen


def _by_names(named: dict[str, nn.Module], names: list[str]) -> dict[str, nn.Module]:
    if not names:
        raise ProbeError("layers=[] selects nothing; pass module names, or None for the default")
    unknown = [n for n in names if n not in named]
    if unknown:
        hints = "; ".join(f"{n!r}{_did_you_mean(n, list(named))}" for n in unknown[:3])
        raise ProbeError(
            f"unknown module name(s) in layers: {hints}; module names: {listed(list(named), 12)}"
        )
    return {name: named[name] for name in named if name in set(names)}


def _did_you_mean(name: str, names: list[str]) -> str:
    close = difflib.get_close_matches(name, names, n=3, cutoff=0.5)
    return f" (did you mean {' or '.join(repr(c) for c in close)}?)" if close else ""


# --------------------------------------------------------------------------- state


@contextmanager
def session(model: nn.Module, mode: Mode = "train", seed: int = 0) -> Iterator[nn.Module]:
    """Run probe passes on ``model`` and leave it exactly as it was found.

    Inside: ``mode`` ("train": batch-statistic normalizers use the batch's
    statistics, as in training; "eval": running statistics), running
    statistics frozen (never updated), an enclosing ``torch.autocast`` off
    (:func:`normprobe.batch.full_precision`), dropout off (:func:`normprobe.batch.dropout_off`,
    attention dropout included: a probe measures the network, not its dropout noise), and the global random state
    forked and seeded with ``seed`` (any other randomness in the model, e.g.
    attention dropout, is reproducible and the caller's random state is left
    alone), embeddings built with ``sparse=True`` giving dense gradients
    (:func:`normprobe.batch.dense_gradients`: the same values). On exit, buffers, ``.grad``,
    ``training`` flags, ``requires_grad``
    and plain attributes such as RegNorm's recorded penalty are put back.

    >>> bn = nn.BatchNorm1d(2)
    >>> with session(bn, "train"):
    ...     _ = bn(torch.randn(8, 2) + 5)
    >>> float(bn.running_mean.abs().max()), bn.training
    (0.0, True)
    """
    _check_mode(mode)
    modules = list(model.modules())
    training = mode == "train"
    flip = any(m.training != training for m in modules)
    if flip and training:  # (before frozen_statistics sets the flag it reads)
        warn_of_frozen_statistics(model, "mode='train'")
    with ExitStack() as stack:
        # inside normprobe.state.held (a measurement step), the step's snapshot restores the model
        snap = stack.enter_context(held_snapshot(model, modules))
        if snap is None:
            snap = snapshot(model)
            stack.callback(restore, snap)
            stack.enter_context(attributes_kept(modules))
        # each probe pass starts from the buffers as this session found them
        starts = _STARTS.setdefault(id(model), [])
        starts.append((model, snap))
        stack.callback(_ended, model, starts)
        stack.enter_context(frozen_statistics(model, modules))
        device = model_device(model)
        stack.enter_context(forked_random_state(device, seed))
        stack.enter_context(full_precision(device))  # a loop's autocast: off
        stack.enter_context(autograd_available())  # a loop's inference_mode: off
        if flip:
            model.train(training)
        if training:
            stack.enter_context(dropout_off(model, modules))
        stack.enter_context(dense_gradients(sparse_embeddings(modules)))
        yield model


#: id(model) -> [(model, the snapshot its innermost session puts back)]: what each probe pass
#: starts from (:meth:`Probe._start_pass`)
_STARTS: dict[int, list[tuple[nn.Module, ModelSnapshot]]] = {}


def _ended(model: nn.Module, starts: list[tuple[nn.Module, ModelSnapshot]]) -> None:
    starts.pop()
    if not starts and _STARTS.get(id(model)) is starts:
        del _STARTS[id(model)]


def _check_mode(mode: str) -> None:
    if mode not in MODES:
        raise ProbeError(
            f"mode must be 'train' (batch statistics, as in training) or 'eval' (running "
            f"statistics), got {mode!r}"
        )


def to_model(x: Inputs, model: nn.Module) -> Inputs:
    """Inputs on the model's device; floating-point tensors in the model's dtype (batch contract)."""
    inputs = check_inputs(x, "inputs", ProbeError)
    return to_device(inputs, model_device(model), model_dtype(model))


# --------------------------------------------------------------------------- capture

#: the probes entered and not yet exited, innermost last
_ACTIVE: list[Probe] = []
#: model -> mode -> whether the random numbers its passes draw decide their output
#: (:meth:`Probe._draws_matter`): one repeated pass per model and mode, not per probe
_DRAWS_MATTER: weakref.WeakKeyDictionary[nn.Module, dict[str, bool]] = weakref.WeakKeyDictionary()


class Probe:
    """Hooks on chosen layers recording, per forward pass, each call in execution order.

    ``capture="outputs"`` keeps a detached copy of each selected layer's
    output (``activations``); ``capture="weights"`` keeps the ``weight`` and
    ``bias`` tensors each layer applied, as autograd sees them (after a weight
    parametrization such as weight norm, or as substituted by
    ``torch.func.functional_call``), so a probe can take gradients with
    respect to them (``weights``). A pass is one call of ``model``; each new
    pass replaces the record. The model runs as :func:`session` describes and
    is left exactly as found when the block exits.

    ``reduce(call, output)``, if set (also between passes: ``p.reduce = ...``),
    runs inside the hook on each output instead of copying it, and its result
    is kept in ``reduced``: a statistic computed while the output is fresh,
    before any later in-place op, without holding every activation.

    >>> torch.manual_seed(0) and None
    >>> net = nn.Sequential(nn.Linear(3, 4), nn.ReLU(), nn.Linear(4, 2))
    >>> with Probe(net, layers=["0", "1"]) as p:
    ...     _ = net(torch.randn(5, 3))
    >>> p.layers
    {'0': 1, '1': 2}
    >>> p.activations["1"].shape
    torch.Size([5, 4])
    >>> with Probe(net, reduce=lambda call, h: (h > 0).float().mean().item()) as p:
    ...     _ = net(torch.randn(5, 3))
    >>> list(p.reduced)  # the default layers: the activation modules
    ['1']
    """

    def __init__(
        self,
        model: nn.Module,
        layers: Layers = None,
        *,
        mode: Mode = "train",
        seed: int = 0,
        capture: Capture = "outputs",
        reduce: Reduce | None = None,
        embeddings: bool = False,
        norms: bool = False,
        frozen: bool = True,
    ) -> None:
        _check_mode(mode)
        if capture not in ("outputs", "weights"):
            raise ProbeError(f"capture must be 'outputs' or 'weights', got {capture!r}")
        if not isinstance(model, nn.Module):
            raise ProbeError(f"probes need a torch.nn.Module, got {type(model).__name__}")
        self.model = model
        self.mode = mode
        self.seed = seed
        self.capture = capture
        self.reduce = reduce
        default = "representations" if capture == "outputs" else "gradients"
        #: name -> module, and the rule that chose them (shown in the probes' tables)
        self.selected, self.rule = resolve_layers(
            model, layers, default=default, embeddings=embeddings, norms=norms, frozen=frozen
        )
        # explicitly named layers must all run; a default, type or regex selection
        # drops modules that never ran (e.g. MultiheadAttention.out_proj, called functionally)
        named = isinstance(layers, Sequence) and not isinstance(layers, str)
        self._required = list(self.selected) if named and not _all_types(layers) else []
        self._stack: ExitStack | None = None
        self._calls: list[LayerCall] = []
        self._records: dict[str, Any] = {}
        self._reduced: dict[str, Any] = {}
        self._counts: dict[str, int] = {}
        self._no_autograd: set[str] = set()
        self._paused = False
        self._device = torch.device("cpu")
        self._states: list[bytes] = []
        self._inputs: tuple[Any, dict[str, Any]] = ((), {})
        #: whether the last pass drew random numbers from torch's global generators
        self.last_pass_drew = False
        #: the first pass of this session that drew random numbers: its inputs and output's
        #: fingerprint, for :meth:`__exit__` to tell whether the numbers decided anything
        self._drawing: tuple[tuple[Any, dict[str, Any]], torch.Tensor] | None = None

    # -- context manager

    def __enter__(self) -> Probe:
        if self._stack is not None:
            raise ProbeError("this Probe is already active; a Probe is entered once at a time")
        stack = ExitStack()
        try:
            stack.enter_context(session(self.model, self.mode, self.seed))
            self._device, self._drawing = model_device(self.model), None
            if self.capture == "weights":
                # one effective weight per parametrized layer per block, the tensor forward uses
                stack.enter_context(parametrize.cached())
                for module in self.selected.values():
                    for p in module.parameters():
                        p.requires_grad_(True)
            handles = [
                self.model.register_forward_pre_hook(self._start_pass, with_kwargs=True),
                self.model.register_forward_hook(self._end_pass),
            ]
            for name, module in self.selected.items():
                handles.append(module.register_forward_hook(partial(self._record, name)))
            for handle in handles:
                stack.callback(handle.remove)
        except BaseException:
            stack.close()
            raise
        self._stack = stack
        _ACTIVE.append(self)
        return self

    def __exit__(self, *exc: object) -> None:
        stack, self._stack = self._stack, None
        if stack is not None:
            try:
                matter = exc[0] is None and self._draws_matter()
            finally:
                _ACTIVE.remove(self)
                stack.close()  # hooks first, then the model's state (LIFO)
            if matter:  # here, not in a hook: pointed at the caller
                warn_of_random_draws(
                    self.model,
                    "the probe's passes are seeded (repeatable), but each",
                    "drew its own numbers, so the values include that noise, not the network alone",
                    "to measure the network without it, give the model nn.Dropout modules or a "
                    "rate attribute whose name says dropout (the probes switch both off)"
                    + (", or measure with mode='eval'" if self.mode == "train" else ""),
                )

    def _draws_matter(self) -> bool:
        """Whether the random numbers a pass of this session drew decided its output: the
        pass again, on its inputs, with other numbers (every active probe paused), gives
        another output (:func:`normprobe.batch.draws_matter`)."""
        if self._drawing is None:
            return False
        (args, kwargs), seen = self._drawing
        self._drawing = None
        known = _DRAWS_MATTER.setdefault(self.model, {})
        if self.mode in known:  # asked once per model and mode: the answer is the model's
            return known[self.mode]
        with ExitStack() as stack:
            for p in _ACTIVE:
                if p.model is self.model:
                    stack.enter_context(p.paused())
            known[self.mode] = draws_matter(
                lambda: self.model(*args, **kwargs), seen, self._device, self.seed + 1
            )
        return known[self.mode]

    # -- what the last pass recorded

    @property
    def calls(self) -> list[LayerCall]:
        """The selected layers' calls in the last pass, in execution order."""
        return list(self._calls)

    @property
    def layers(self) -> dict[str, int]:
        """Layer label -> depth (1-based execution order) in the last pass."""
        return {c.label: c.depth for c in self._calls}

    @property
    def not_run(self) -> list[str]:
        """Selected modules that did not run as modules in the last pass (called functionally).

        torch's ``nn.MultiheadAttention`` applies its ``out_proj`` through
        ``F.multi_head_attention_forward``, so no hook sees it: a probe reports
        such layers in its ``layer_rule`` rather than dropping them unsaid.
        """
        return [name for name in self.selected if name not in self._counts]

    @property
    def without_autograd(self) -> list[str]:
        """Selected modules that ran with autograd off in the last pass (``capture="weights"``).

        A layer called inside ``torch.no_grad()`` (a frozen feature extractor
        run that way), or inside a reentrant ``torch.utils.checkpoint`` whose
        inputs need no gradient, has no gradient path from the loss to its
        weight: autograd gives it no gradient at all, and a zero would be a
        wrong value. The gradient probes leave it out and say so in their
        ``layer_rule``.
        """
        return [name for name in self.selected if name in self._no_autograd]

    @property
    def activations(self) -> dict[str, torch.Tensor]:
        """Layer label -> detached copy of its output in the last pass (``capture="outputs"``)."""
        self._expect("outputs", "activations")
        return dict(self._records)

    @property
    def reduced(self) -> dict[str, Any]:
        """Layer label -> what ``reduce`` returned for that call in the last pass."""
        return dict(self._reduced)

    @property
    def weights(self) -> dict[str, dict[str, torch.Tensor | None]]:
        """Layer label -> ``{"weight": W, "bias": b}`` applied in the last pass (``capture="weights"``;
        none for a call that ran with autograd off: :attr:`without_autograd`)."""
        self._expect("weights", "weights")
        return dict(self._records)

    def run(self, inputs: Inputs) -> Any:
        """One pass of the model on ``inputs`` by the batch contract (tensor, tuple or dict)."""
        return call_model(self.model, inputs, ProbeError)

    @contextmanager
    def paused(self) -> Iterator[Probe]:
        """Passes run inside leave this probe's record alone (its hooks stay, and ignore them).

        For a driver that lets two probes share one pass, then runs passes
        only the other one needs.

        >>> net = nn.Sequential(nn.Linear(3, 4), nn.ReLU())
        >>> with Probe(net) as p:
        ...     _ = net(torch.ones(2, 3))
        ...     with p.paused():
        ...         _ = net(torch.ones(5, 3))
        >>> p.activations["1"].shape
        torch.Size([2, 4])
        """
        was, self._paused = self._paused, True
        try:
            yield self
        finally:
            self._paused = was

    def _expect(self, capture: Capture, what: str) -> None:
        if self.capture != capture:
            raise ProbeError(f"Probe.{what} needs Probe(..., capture={capture!r})")

    # -- hooks

    def _start_pass(self, module: nn.Module, args: Any, kwargs: dict[str, Any]) -> None:
        if not self._paused:
            starts = _STARTS.get(id(self.model))
            if starts and starts[-1][0] is self.model:
                restore_moved_buffers(starts[-1][1])
            self._calls, self._records, self._reduced, self._counts = [], {}, {}, {}
            self._no_autograd = set()
            self._states = generator_states(self._device)
            self._inputs = (args, kwargs)

    def _end_pass(self, module: nn.Module, args: Any, output: Any) -> None:
        if self._paused:
            return
        self.last_pass_drew = self._states != generator_states(self._device)
        if self.last_pass_drew and self._drawing is None:
            self._drawing = (self._inputs, fingerprint(output))
        self._inputs = ((), {})
        ran = set(self._counts)
        missing = [name for name in self._required if name not in ran]
        off = [name for name in self._required if name in self._no_autograd]
        if off:
            raise ProbeError(
                f"layer(s) {', '.join(map(repr, off))} ran with autograd off (inside "
                f"torch.no_grad(), or a reentrant torch.utils.checkpoint whose inputs need no "
                f"gradient), so the loss has no gradient path to their weights; run them with "
                f"autograd on (checkpoint with use_reentrant=False), or leave them out of layers"
            )
        if missing:
            raise ProbeError(
                f"layer(s) {', '.join(map(repr, missing))} did not run as modules in the forward "
                f"pass (torch calls some submodules functionally, e.g. the out_proj of "
                f"MultiheadAttention), so their depth and output are unknown; leave them out of "
                f"layers"
            )
        if not ran:
            raise ProbeError(
                f"none of the selected layers ({listed(list(self.selected), 12)}) ran as a module "
                f"in the forward pass; the model may call them functionally (e.g. F.relu): name "
                f"the layers to probe with layers=..."
            )

    def _record(self, name: str, module: nn.Module, args: Any, output: Any) -> None:
        if self._paused:
            return
        call = self._counts.get(name, 0) + 1
        self._counts[name] = call
        label = name if call == 1 else f"{name}#{call}"
        self._calls.append(
            LayerCall(label, name, call, len(self._calls) + 1, type(module).__name__)
        )
        if self.capture == "weights":
            if torch.is_grad_enabled():
                self._records[label] = _applied_weights(name, module)
            else:  # no gradient path from the loss to this call's weight: no record
                self._no_autograd.add(name)
        elif self.reduce is not None:
            self._reduced[label] = self.reduce(self._calls[-1], _output(name, output).detach())
        else:
            # a copy: a later in-place op (ReLU(inplace=True), out += x) would change the original
            self._records[label] = _output(name, output).detach().clone()


def _output(name: str, output: Any) -> torch.Tensor:
    """A layer's representation: its output tensor, or the first item of a tuple it returns.

    The first item is the hidden state by the convention of torch's and
    Hugging Face's blocks (the rest: attention weights, caches).
    """
    if isinstance(output, (tuple, list)) and output and isinstance(output[0], torch.Tensor):
        return output[0]
    if not isinstance(output, torch.Tensor):
        raise ProbeError(
            f"layer {name!r} returned {type(output).__name__}, not a tensor; representation "
            f"probes need layers that return a tensor (or a tuple whose first item is one): "
            f"choose another layer (e.g. a submodule)"
        )
    return output


def _applied_weights(name: str, module: nn.Module) -> dict[str, torch.Tensor | None]:
    weight = getattr(module, "weight", None)
    if not isinstance(weight, torch.Tensor):
        raise ProbeError(
            f"layer {name!r} ({type(module).__name__}) has no weight tensor; gradient probes "
            f"need layers with a weight (Linear, Conv, normalizers with an affine scale)"
        )
    if not weight.requires_grad:
        raise ProbeError(
            f"the weight of layer {name!r} does not depend on any parameter of the layer, so it "
            f"has no gradient to probe; choose layers whose weight is a parameter"
        )
    bias = getattr(module, "bias", None)
    bias = bias if isinstance(bias, torch.Tensor) and bias.requires_grad else None
    return {"weight": weight, "bias": bias}


def inputs_of(x: object, what: str) -> Inputs:
    """``x`` checked as the inputs of a representation probe (batch contract: no targets).

    A tensor, a tuple of tensors (the model's positional inputs) or a dict
    (its keyword inputs). An ``(inputs, targets)`` batch is not accepted
    here: its targets would reach the model as a second input
    (:func:`normprobe.batch.call_model` refuses that when ``forward`` takes
    one input).
    """
    return check_inputs(x, what, ProbeError)


def unpack_batch(batch: Any, what: str = "batch") -> tuple[Inputs, torch.Tensor | None]:
    """``(inputs, targets)`` of a batch by the contract (:mod:`normprobe.batch`); a clear error otherwise."""
    return split_batch(batch, what, ProbeError)


def check_same_layers(first: Sequence[LayerCall], second: Sequence[LayerCall], what: str) -> None:
    """Raise if two passes ran different selected layers (data-dependent control flow)."""
    a, b = [c.label for c in first], [c.label for c in second]
    if a != b:
        raise ProbeError(
            f"the model ran different layers for {what}: {listed(a, 6)} against "
            f"{listed(b, 6)}; probes compare the same layers across passes, so the selected "
            f"layers must run in the same order every time"
        )
