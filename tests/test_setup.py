"""The README's set-up commands, CI script and command-line entry points agree and work."""

from __future__ import annotations

import importlib
import re
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import pytest

import normprobe

ROOT = Path(__file__).resolve().parents[1]
#: the cli_here fixture (tests/conftest.py): the CLI in this process
Cli = Callable[..., subprocess.CompletedProcess[str]]


def _readme_commands() -> list[str]:
    text = (ROOT / "README.md").read_text()
    setup = text.split("## Set up", 1)[1].split("\n## ", 1)[0]
    return re.findall(r"```bash\n(.*?)\n```", setup, flags=re.S)


def test_readme_has_exactly_two_setup_commands_and_ci_runs_the_test_one() -> None:
    commands = _readme_commands()
    assert len(commands) == 2, commands
    install_and_run, install_and_test = commands
    assert install_and_run.startswith("pip install . && normprobe ")
    extras = re.search(r'"\.\[([\w,-]+)\]"', install_and_test)
    assert extras is not None, install_and_test
    assert {"test", "docs"} <= set(extras.group(1).split(",")), install_and_test
    assert "pytest" in install_and_test
    ci = (ROOT / ".ci" / "run").read_text()
    assert install_and_test in ci.splitlines()


def test_torch_is_pinned_to_the_cpu_build() -> None:
    text = (ROOT / "pyproject.toml").read_text()
    assert '"torch==2.13.0"' in text
    assert "torchvision" not in text


def _cli(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "normprobe", *args], capture_output=True, text=True, timeout=120
    )


def test_cli_list_prints_every_registered_name_grouped(cli_here: Cli) -> None:
    result = cli_here("list")
    assert result.returncode == 0, result.stderr
    out = result.stdout
    groups = [line for line in out.splitlines() if line and not line.startswith(" ")]
    assert groups == ["normalizers:", "models:", "datasets:"]
    listed = {line.split()[0] for line in out.splitlines() if line.startswith("  ")}
    expected = set(normprobe.normalizers()) | set(normprobe.MODELS) | set(normprobe.DATASETS)
    assert listed == expected


def test_cli_list_one_group(cli_here: Cli) -> None:
    result = cli_here("list", "models")
    assert result.returncode == 0
    assert result.stdout.splitlines()[0] == "models:"
    assert "normalizers:" not in result.stdout


def test_cli_help_and_version(cli_here: Cli) -> None:
    result = cli_here("--help")
    assert result.returncode == 0 and "normprobe list" in result.stdout
    # the entry point as a user starts it, in a process of its own
    result = _cli("--version")
    assert result.returncode == 0 and result.stdout.strip() == f"normprobe {normprobe.__version__}"


def test_cli_bad_usage_exits_non_zero_with_one_message(cli_here: Cli) -> None:
    result = cli_here("list", "normalisers")
    assert result.returncode == 2
    assert "invalid choice: 'normalisers'" in result.stderr
    assert "Traceback" not in result.stderr


def test_a_config_override_without_set_is_pointed_to_set(cli_here: Cli) -> None:
    result = cli_here("analyze", "analyses/quickstart.yaml", "train.steps=20")
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert "unrecognized arguments: train.steps=20" in result.stderr
    assert "config overrides go after --set: --set train.steps=20" in result.stderr


def test_an_interrupted_analysis_says_that_rerunning_resumes(
    cli_here: Cli, monkeypatch: pytest.MonkeyPatch
) -> None:
    # the module, not the package's function of the same name
    analyze_module = importlib.import_module("normprobe.analyze")

    def interrupted(*args: object, **kwargs: object) -> None:
        raise KeyboardInterrupt

    monkeypatch.setattr(analyze_module, "analyze", interrupted)
    result = cli_here("analyze", "analyses/quickstart.yaml")
    assert result.returncode == 130
    assert "interrupted; finished runs are kept, and the same command resumes" in result.stderr
    # --force starts again: it is the command without --force that resumes
    result = cli_here("analyze", "analyses/quickstart.yaml", "--force")
    assert result.returncode == 130
    assert "run the same command without --force to resume from them" in result.stderr
