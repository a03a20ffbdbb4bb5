"""MkDocs hooks: the repository's figures in the site, and readable API pages.

- ``on_files``: the repository's figures (``figures/*.png``, ``*.csv``) and
  analysis files (``analyses/*.yaml``) are added to the site under the same
  paths, so pages link ``figures/fig1a.png`` or ``analyses/quickstart.yaml``
  and the built site serves the very files the repository holds, without a
  copy in ``docs/``. The example notebooks (``examples/*.ipynb``, committed
  with their outputs) are added the same way as pages under ``examples/``;
  this runs before the ``mkdocs-jupyter`` plugin's ``on_files`` (higher
  priority) so that the plugin renders them without a copy in ``docs/``.
- ``on_page_content``: docstrings use Sphinx roles (``:func:`x```); the API
  pages render them as plain code.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

from mkdocs.plugins import event_priority
from mkdocs.structure.files import File, Files

ROOT = Path(__file__).resolve().parents[2]
# folder -> the file suffixes of it that the site serves
SERVED = {
    "figures": (".png", ".csv", ".svg", ".pdf"),
    "analyses": (".yaml",),
    "examples": (".ipynb",),
}

_ROLE = re.compile(r":(?:func|class|data|meth|attr|mod|obj|exc):(<code>)")


@event_priority(50)
def on_files(files: Files, config: Any, **kwargs: Any) -> Files:
    for folder, suffixes in SERVED.items():
        for path in sorted((ROOT / folder).iterdir()):
            if path.suffix in suffixes:
                uri = f"{folder}/{path.name}"
                # a plain File read from the repository root: the notebook
                # plugin wraps it, and a generated File has no source to read
                files.append(
                    File(
                        uri,
                        src_dir=str(ROOT),
                        dest_dir=config["site_dir"],
                        use_directory_urls=config["use_directory_urls"],
                    )
                )
    return files


def on_page_content(html: str, page: Any, **kwargs: Any) -> str:
    return _ROLE.sub(r"\1", html)
