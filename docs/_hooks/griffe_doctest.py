"""A griffe extension: show docstring examples (``>>>`` lines) as Python code blocks.

The package's docstrings carry doctests, which pytest runs; without this,
Markdown would read their ``>>>`` prompts as nested quotes. Each run of
``>>>``/``...`` lines and the output lines after them becomes a ``pycon``
fenced block, indented as in the docstring (also inside a ``::`` literal).
"""

from __future__ import annotations

from typing import Any

import griffe


def fence_doctests(text: str) -> str:
    r"""Wrap every doctest block of ``text`` in a ``pycon`` code fence.

    >>> fence_doctests("Add.\n\n>>> 1 + 1\n2\n\nDone.").splitlines()
    ['Add.', '', '```pycon', '>>> 1 + 1', '2', '```', '', 'Done.']
    """
    out: list[str] = []
    lines = text.split("\n")
    i = 0
    while i < len(lines):
        stripped = lines[i].lstrip()
        if stripped.startswith(">>>"):
            indent = lines[i][: len(lines[i]) - len(stripped)]
            block = []
            while i < len(lines) and lines[i].strip() and lines[i].startswith(indent):
                block.append(lines[i][len(indent) :])
                i += 1
            out += [f"{indent}```pycon", *(indent + b for b in block), f"{indent}```"]
            continue
        out.append(lines[i])
        i += 1
    return "\n".join(out)


def _fence(obj: Any) -> None:
    if obj.docstring is not None and ">>>" in obj.docstring.value:
        if "```pycon" not in obj.docstring.value:
            obj.docstring.value = fence_doctests(obj.docstring.value)


class DoctestFences(griffe.Extension):
    def on_object(self, *, obj: Any, **kwargs: Any) -> None:
        _fence(obj)

    def on_package(self, *, pkg: Any, **kwargs: Any) -> None:
        _fence(pkg)
