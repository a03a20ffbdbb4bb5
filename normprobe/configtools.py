"""The mechanics around the config schema: errors, dotted keys, YAML, factories.

Every config mistake is one :class:`ConfigError` whose message names the
field path (``train.lr[2]``) and the fix. Validators that know a deeper
path than their field raise :class:`PathError`; :func:`explain` turns
pydantic's errors into that one line. :func:`set_dotted` and
:func:`apply_overrides` give ``--set train.steps=100`` and the variants'
``{train.batch_size: 32}`` one meaning.
"""

from __future__ import annotations

import copy
import difflib
import importlib
import re
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import yaml
from pydantic import BaseModel, ConfigDict

from normprobe.errors import NormprobeError, UnknownNameError

__all__ = [
    "ConfigError",
    "PathError",
    "Strict",
    "suggest",
    "canonical",
    "format_path",
    "explain",
    "most_specific",
    "load_yaml",
    "parse_yaml",
    "UniqueKeyLoader",
    "set_dotted",
    "apply_overrides",
    "import_factory",
]


class ConfigError(NormprobeError, ValueError):
    """A config that cannot be run; the message names the field path and the fix."""


class Strict(BaseModel):
    """A schema section: unknown keys rejected, assignments validated."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True)


def suggest(key: str, valid: Sequence[str]) -> str:
    close = difflib.get_close_matches(key, list(valid), n=1, cutoff=0.5)
    return f"did you mean {close[0]!r}? " if close else ""


class PathError(ValueError):
    """A ValueError raised inside a validator that knows a deeper path than the field's."""

    def __init__(self, path: tuple[Any, ...], message: str) -> None:
        super().__init__(message)
        self.path = path
        self.message = message


def canonical(registry: Any, name: str, field: str) -> str:
    try:
        return registry.canonical(name)
    except UnknownNameError as err:
        raise PathError((field,), str(err)) from None


def import_factory(path: str) -> Callable[..., Any]:
    """Import ``package.module:function``; a clear error if it cannot be imported."""
    if not isinstance(path, str) or path.count(":") != 1:
        raise ValueError(
            f"{path!r} is not an import path; write package.module:function, "
            "e.g. mymodels.resnets:make_resnet"
        )
    module_name, attr = path.split(":")
    try:
        module = importlib.import_module(module_name)
    except ImportError as err:
        raise ValueError(
            f"cannot import module {module_name!r} ({err}); make sure it is installed or on "
            "PYTHONPATH (for a module in the current folder: PYTHONPATH=. normprobe analyze ...)"
        ) from None
    try:
        factory = getattr(module, attr)
    except AttributeError:
        names = [n for n in dir(module) if not n.startswith("_")]
        raise ValueError(
            f"module {module_name!r} has no attribute {attr!r}; {suggest(attr, names)}its "
            f"functions: {', '.join(n for n in names if callable(getattr(module, n)))[:200]}"
        ) from None
    if not callable(factory):
        raise ValueError(
            f"{path} is a {type(factory).__name__}, not a callable that builds a model"
        )
    return factory


_TYPE_TAG = re.compile(r"\[|^(float|int|str|bool|none|list|dict|tuple)$")


def format_path(loc: Sequence[Any]) -> str:
    out = ""
    for part in loc:
        if isinstance(part, int):
            out += f"[{part}]"
        else:
            out += f".{part}" if out else str(part)
    return out or "(top level)"


def explain(error: Mapping[str, Any], valid_keys: Callable[[tuple[Any, ...]], list[str]]) -> str:
    loc = tuple(p for p in error["loc"] if not (isinstance(p, str) and _TYPE_TAG.search(p)))
    ctx = error.get("ctx") or {}
    inner = ctx.get("error")
    if isinstance(inner, PathError):
        loc = (*loc, *inner.path)
        return f"{format_path(loc)}: {inner.message}"
    kind = error["type"]
    given = error.get("input")
    if kind == "extra_forbidden":
        *parent, key = loc
        valid = valid_keys(tuple(parent))
        return (
            f"{format_path(loc)}: unknown key {key!r}; {suggest(str(key), valid)}"
            f"valid keys here: {', '.join(valid)}"
        )
    message = str(inner) if isinstance(inner, Exception) else error["msg"]
    message = re.sub(r"^(Value|Assertion) error, ", "", message)
    if kind not in ("value_error", "assertion_error", "missing"):
        message = f"{message}, got {given!r}"
    return f"{format_path(loc)}: {message}"


def most_specific(errors: list[Mapping[str, Any]]) -> Mapping[str, Any]:
    """The error to report: the first field's deepest (most specific) union branch."""

    def clean(e: Mapping[str, Any]) -> tuple[Any, ...]:
        return tuple(p for p in e["loc"] if not (isinstance(p, str) and _TYPE_TAG.search(p)))

    first = clean(errors[0])
    same_field = [e for e in errors if clean(e)[: len(first)] == first]
    return max(same_field, key=lambda e: (len(e["loc"]), e["type"] != "float_type"))


_DUPLICATE = "appears twice"


class UniqueKeyLoader(yaml.SafeLoader):
    """PyYAML's safe loader, except that a key given twice in one mapping is an error.

    Plain PyYAML keeps the last one, so a second ``train:`` block silently
    replaced the whole first one.
    """


def _unique_mapping(loader: UniqueKeyLoader, node: yaml.MappingNode, deep: bool = False) -> Any:
    seen: dict[Any, int] = {}
    for key_node, _ in node.value:
        if key_node.tag == "tag:yaml.org,2002:merge":
            continue
        key = loader.construct_object(key_node, deep=True)
        try:
            first = seen.get(key)
        except TypeError:  # an unhashable key: the schema refuses it later
            continue
        seen.setdefault(key, key_node.start_mark.line)
        if first is not None:
            raise yaml.constructor.ConstructorError(
                None,
                None,
                f"key {key!r} {_DUPLICATE} (first on line {first + 1}); keep one, merging "
                "the two",
                key_node.start_mark,
            )
    return loader.construct_mapping(node, deep=deep)


UniqueKeyLoader.add_constructor(yaml.resolver.BaseResolver.DEFAULT_MAPPING_TAG, _unique_mapping)


def parse_yaml(text: str) -> Any:
    """``yaml.safe_load`` that refuses duplicate keys (:class:`UniqueKeyLoader`)."""
    return yaml.load(text, Loader=UniqueKeyLoader)  # noqa: S506 - a SafeLoader subclass


def load_yaml(path: Path) -> Any:
    if not path.exists():
        raise ConfigError(f"config file {str(path)!r} does not exist; check the path")
    if path.is_dir():
        raise ConfigError(f"{str(path)!r} is a folder; pass a YAML config file")
    if not path.is_file():  # a FIFO or a device would block or never end
        raise ConfigError(f"{str(path)!r} is not a regular file; pass a YAML config file")
    try:
        data = path.read_bytes()
    except OSError as err:
        raise ConfigError(
            f"config file {str(path)!r} cannot be read ({err.strerror or err}); check it"
        ) from None
    if data.startswith((b"\xff\xfe", b"\xfe\xff")):
        raise ConfigError(f"{path}: UTF-16 text; save it as UTF-8")
    if b"\0" in data:
        raise ConfigError(f"{path}: a binary file, not a YAML config; pass a YAML text file")
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as err:
        raise ConfigError(
            f"{path}: not UTF-8 text (byte {err.start} is {data[err.start]:#04x}); "
            "save it as UTF-8"
        ) from None
    try:
        return parse_yaml(text)
    except yaml.YAMLError as err:
        mark = getattr(err, "problem_mark", None)
        where = f" line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        problem = getattr(err, "problem", None) or str(err)
        if _DUPLICATE in problem:
            raise ConfigError(f"{path}:{where}: {problem}") from None
        raise ConfigError(
            f"{path}:{where}: malformed YAML: {problem}; fix the syntax there"
        ) from None


def set_dotted(raw: dict[str, Any], dotted: str, value: Any) -> None:
    parts = dotted.split(".")
    node = raw
    for i, part in enumerate(parts[:-1]):
        child = node.get(part)
        if child is None:
            child = node[part] = {}
        elif isinstance(child, bool):  # the `gradient_norms: true` shorthand of a section
            child = node[part] = {"enabled": child}
        elif not isinstance(child, dict):
            raise ConfigError(
                f"--set {dotted}: {'.'.join(parts[: i + 1])} is a {type(child).__name__}, "
                f"not a section with keys"
            )
        node = child
    node[parts[-1]] = value


def apply_overrides(raw: Mapping[str, Any], overrides: Sequence[str]) -> dict[str, Any]:
    """Apply ``key.sub=value`` overrides (values parsed as YAML) to a raw config mapping."""
    result = copy.deepcopy(dict(raw))
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"--set {item!r}: expected key=value, e.g. --set train.steps=100")
        key, text = item.split("=", 1)
        key = key.strip()
        if not re.fullmatch(r"[A-Za-z_][\w-]*(\.[A-Za-z_][\w-]*)*", key):
            raise ConfigError(f"--set {item!r}: {key!r} is not a dotted key like train.steps")
        try:
            value = parse_yaml(text)
        except yaml.YAMLError as err:
            problem = getattr(err, "problem", None) or str(err).splitlines()[0]
            raise ConfigError(
                f"--set {item!r}: the value is not valid YAML ({problem}); fix it, or quote "
                f"it to give a string: --set {key}='\"{text}\"'"
            ) from None
        set_dotted(result, key, value)
    return result
