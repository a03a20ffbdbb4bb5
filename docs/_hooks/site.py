"""MkDocs hooks: the repository's figures in the site, and readable API pages.

- ``on_files``: the repository's figures (``figures/*.png``, ``*.csv``) and
  analysis files (``analyses/*.yaml``) are added to the site under the same
  paths, so pages link ``figures/fig1a.png`` or ``analyses/quickstart.yaml``
  and the built site serves the very files the repository holds, without a
  copy in ``docs/``.
- ``on_page_content``: docstrings use Sphinx roles (``:func:`x```); the API
  pages render them as plain code.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

from mkdocs.structure.files import File, Files

ROOT = Path(__file__).resolve().parents[2]
# folder -> the file suffixes of it that the site serves
SERVED = {"figures": (".png", ".csv", ".svg", ".pdf"), "analyses": (".yaml",)}

_ROLE = re.compile(r":(?:func|class|data|meth|attr|mod|obj|exc):(<code>)")


def on_files(files: Files, config: Any, **kwargs: Any) -> Files:
    for folder, suffixes in SERVED.items():
        for path in sorted((ROOT / folder).iterdir()):
            if path.suffix in suffixes:
                uri = f"{folder}/{path.name}"
                files.append(File.generated(config, uri, abs_src_path=str(path)))
    return files


def on_page_content(html: str, page: Any, **kwargs: Any) -> str:
    return _ROLE.sub(r"\1", html)
