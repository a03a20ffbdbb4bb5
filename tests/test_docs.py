"""The documentation site: complete references, valid examples, a strict build.

The config reference is generated from the pydantic schema by
``docs/_hooks/config_reference.py``; these tests fail when a field has no
description or example, when an example does not validate, or when a public
name is missing from the API reference. The slow test builds the whole site
with ``mkdocs build --strict`` (broken links or references fail it).
"""

from __future__ import annotations

import doctest
import importlib.util
import os
import re
import subprocess
import sys
from pathlib import Path
from types import ModuleType

import pytest
import yaml

import normprobe
from normprobe.config import parse_config

ROOT = Path(__file__).resolve().parents[1]
DOCS = ROOT / "docs"


def _hook(name: str) -> ModuleType:
    path = DOCS / "_hooks" / f"{name}.py"
    spec = importlib.util.spec_from_file_location(f"_normprobe_docs_{name}", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def reference() -> ModuleType:
    return _hook("config_reference")


def _field_keys(reference: ModuleType) -> set[str]:
    return {
        f"{model.__name__}.{name}"
        for model in reference.sections()
        for name in model.model_fields
    }


def test_every_config_field_has_a_description_and_an_example(reference: ModuleType) -> None:
    keys = _field_keys(reference)
    assert keys - set(reference.DESCRIPTIONS) == set(), "fields without a description"
    assert keys - set(reference.EXAMPLES) == set(), "fields without an example"
    assert set(reference.DESCRIPTIONS) - keys == set(), "descriptions of fields that do not exist"
    assert set(reference.EXAMPLES) - keys == set(), "examples of fields that do not exist"


def test_every_config_field_and_section_appears_in_the_reference(reference: ModuleType) -> None:
    text = reference.render()
    sections = re.split(r"^## ", text, flags=re.M)[1:]
    by_title = {s.split("\n", 1)[0]: s for s in sections}
    for model, paths in reference.sections().items():
        section = by_title[model.__name__]
        for path in paths:
            assert f"`{path}`" in section or path == "(top level)", (model.__name__, path)
        for name in model.model_fields:
            assert f"| `{name}` |" in section, f"{model.__name__}.{name}"
    # every dotted path of the schema: its section is listed at its parent's path
    for path in reference.field_paths():
        parent, _, name = path.rpartition(".")
        assert any(
            (f"`{parent}`" in s if parent else "(top level)" in s) and f"| `{name}` |" in s
            for s in sections
        ), path


def test_config_reference_shows_the_schema_defaults_and_constraints(reference: ModuleType) -> None:
    text = reference.render()
    assert "| `steps` | int, >= 0 | `300` |" in text
    assert '| `kind` | "iid" \\| "labels" | `iid` |' in text
    assert "| `momentum` | float, >= 0.0, < 1.0 | `0.9` |" in text
    assert "Example: <code>train: {optimizer: adam}</code>" in text


def test_every_config_example_validates(
    reference: ModuleType, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # the factory examples name a module of the user's; stand one in
    (tmp_path / "mymodels.py").write_text(
        "def make_net(norm='batch', **options):\n    raise NotImplementedError\n\n"
        "def make_resnet(**options):\n    raise NotImplementedError\n"
    )
    monkeypatch.syspath_prepend(str(tmp_path))
    for key, example in reference.EXAMPLES.items():
        raw = yaml.safe_load(example)
        assert isinstance(raw, dict), (key, example)
        parse_config(raw, source=key)
        field = key.split(".")[1]
        assert re.search(rf"\b{field}:", example), f"{key}: the example does not set {field}"


def test_api_reference_lists_every_public_name() -> None:
    text = (DOCS / "api.md").read_text()
    documented = set(re.findall(r"^::: normprobe\.(\w+)", text, flags=re.M))
    assert set(normprobe.__all__) - documented == set()


def test_doctest_fences_in_the_api_pages() -> None:
    module = _hook("griffe_doctest")
    result = doctest.testmod(module, optionflags=doctest.NORMALIZE_WHITESPACE)
    assert result.attempted and not result.failed


def _text_files() -> list[Path]:
    listed = subprocess.run(
        ["git", "ls-files", "-co", "--exclude-standard"],
        cwd=ROOT, capture_output=True, text=True, check=True,
    ).stdout.split()
    return [
        ROOT / p
        for p in listed
        if p.endswith((".py", ".md", ".yaml", ".yml", ".toml", ".txt", ".cfg"))
        and (ROOT / p).is_file()
        and p != "tests/test_docs.py"
    ]


def test_the_repository_cites_papers_by_name_and_points_only_inside_itself() -> None:
    design = "DESIGN" + ".md"
    outside = re.compile(r"\]\(\.\./(?!docs/|figures/|analyses/|README)")
    shorthand = re.compile(r"\b[Ss]eeds?\s+00\d\b")
    problems = []
    for path in _text_files():
        text = path.read_text(errors="replace")
        rel = path.relative_to(ROOT)
        if design in text:
            problems.append(f"{rel}: cites {design}; point to docs/definitions.md")
        if outside.search(text):
            problems.append(f"{rel}: links outside the repository")
        if shorthand.search(text):
            problems.append(f"{rel}: 'seed 00N' shorthand; cite the paper (docs/bibliography.md)")
    assert problems == []


def _docs_tools_installed() -> bool:
    names = ("mkdocs", "material", "mkdocstrings", "mkdocstrings_handlers.python")
    return all(importlib.util.find_spec(n.split(".")[0]) for n in names)


@pytest.mark.slow
def test_site_builds_in_strict_mode(tmp_path: Path) -> None:
    if not _docs_tools_installed():
        if os.environ.get("CI"):
            pytest.fail('CI must build the docs: install them with pip install ".[test,docs]"')
        pytest.skip('the docs extra is not installed (pip install ".[docs]")')
    site = tmp_path / "site"
    env = {**os.environ, "NO_MKDOCS_2_WARNING": "1"}
    result = subprocess.run(
        [sys.executable, "-m", "mkdocs", "build", "--strict", "-d", str(site)],
        cwd=ROOT, capture_output=True, text=True, timeout=300, env=env,
    )
    assert result.returncode == 0, result.stderr[-4000:]
    config_page = (site / "config" / "index.html").read_text()
    for name in ("lanczos_steps", "labels_per_batch", "norm_options", "eval_batch_stats"):
        assert name in config_page
    api_page = (site / "api" / "index.html").read_text()
    assert "hessian_spectrum" in api_page and ":func:" not in api_page
    assert (site / "figures" / "fig1a.png").stat().st_size > 1000
    assert (site / "analyses" / "quickstart.yaml").is_file()
