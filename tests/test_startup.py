"""``import normprobe`` and the command's ``--help`` are quick: torch, pandas and scipy are
imported when a name that needs them is first used, and every public name is what it was."""

from __future__ import annotations

import subprocess
import sys

HEAVY = ("torch", "pandas", "scipy", "matplotlib")


def _loaded_after(code: str) -> list[str]:
    """The heavy packages a fresh interpreter holds after running ``code``."""
    probe = f"{code}\nimport sys\nprint(','.join(m for m in {HEAVY!r} if m in sys.modules))"
    out = subprocess.run(
        [sys.executable, "-c", probe], capture_output=True, text=True, check=True
    ).stdout
    last = out.splitlines()[-1] if out.strip() else ""
    return [m for m in last.split(",") if m]


def test_importing_the_package_and_asking_for_help_load_no_heavy_package() -> None:
    assert _loaded_after("import normprobe") == []
    help_text = "import contextlib, io\nfrom normprobe.cli import main\n"
    help_text += (
        "with contextlib.redirect_stdout(io.StringIO()), contextlib.suppress(SystemExit):\n"
    )
    for command in ([], ["analyze"], ["plot"], ["figures"], ["properties"], ["list"]):
        code = help_text + f"    main({[*command, '--help']!r})"
        assert _loaded_after(code) == [], command


def test_every_public_name_is_the_object_of_its_module() -> None:
    import normprobe.analyze  # binds the submodule to the package, as any import of it does
    import normprobe.cli  # noqa: F401

    for name in normprobe.__all__:
        value = getattr(normprobe, name)
        if name == "__version__":
            continue
        module, attribute = normprobe._WHERE[name]
        assert value is getattr(sys.modules[module], attribute), name
    assert callable(normprobe.analyze) and normprobe.analyze.__module__ == "normprobe.analyze"
    assert set(dir(normprobe)) >= set(normprobe.__all__)
