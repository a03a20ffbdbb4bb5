"""Which results a figure folder was drawn from: ``normprobe-figures.json`` next to the figures.

Two analyses plotted into one folder would leave their figures side by side,
and nothing would say which is which. Each plot therefore records, in the
figure folder, the results it was drawn from (their folder, relative to the
figure folder, and the config hash of their manifest) and the files it wrote
with their SHA-256. ``normprobe plot`` reads the record before it draws:

- the same results again (the normal regenerate case), into a folder of their
  figures alone or of several results (as ``normprobe figures`` writes):
  drawn, the record updated;
- other results: refused, naming both, unless ``--force``, which removes the
  figures the record lists for the other results once the new ones are drawn.
  A listed file whose content changed since normprobe wrote it is kept, and
  a file the record does not list is never removed;
- figure files that no record lists (drawn before the record existed, or
  copied in): refused, except in the results' own ``figures`` folder, the
  default, which holds nothing but their figures.

The conventions are those of an analysis' output folder
(:func:`normprobe.analyze.analyze`): a folder holding another config's
results is refused with ``--out`` and ``--force`` as the ways out.
``normprobe figures`` draws every group's results into one folder: it
records each, and checks nothing (the folder is the figure set's).
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from normprobe.errors import listed
from normprobe.plotting.gallery import FIGURES, figure_name
from normprobe.plotting.style import FORMATS
from normprobe.results import Results, ResultsError, file_digest, write_json_atomic

__all__ = ["RECORD_NAME", "figure_sources", "check_figure_folder", "record_figures"]

#: The record in a figure folder.
RECORD_NAME = "normprobe-figures.json"
_ABOUT = (
    "The figures in this folder and the results each was drawn from, written by normprobe "
    "plot and normprobe figures. normprobe removes only files listed here, unchanged."
)


def figure_sources(out: str | Path, what: str = "--out") -> list[dict[str, Any]]:
    """The record's entries (``results``, ``config_hash``, ``name``, ``files``: name -> sha256),
    or ``[]`` when ``out`` holds no record; a record that cannot be read is a ResultsError."""
    path = Path(out) / RECORD_NAME
    if not path.is_file():
        return []
    try:
        record = json.loads(path.read_text())
        sources = record["sources"]
        if not isinstance(sources, list) or not all(
            isinstance(s, dict) and isinstance(s.get("files"), dict) for s in sources
        ):
            raise ValueError("'sources' is not a list of entries with files")
    except (OSError, ValueError, KeyError, TypeError) as err:
        raise ResultsError(
            f"{what}: {str(path)!r} is not a figure record normprobe can read ({err}); "
            "move it away and plot again (the figures beside it then count as unrecorded)"
        ) from None
    return sources


def _identity(results: Results) -> tuple[Path, str | None]:
    return Path(results.directory).resolve(), (results.manifest or {}).get("config_hash")


def _entry_path(out: Path, entry: dict[str, Any]) -> Path:
    return (out / str(entry.get("results", ""))).resolve()


def _shown(path: Path) -> str:
    """``path`` as the user most likely wrote it: relative to the current folder when inside it."""
    try:
        return str(path.relative_to(Path.cwd().resolve()))
    except ValueError:
        return str(path)


def _describe(path: Path, name: str | None, chash: str | None) -> str:
    analysis = f"analysis {name}, " if name else ""
    return f"{_shown(path)!r} ({analysis}config hash {chash})"


def _count(files: list[Path]) -> str:
    return f"{len(files)} figure file{'' if len(files) == 1 else 's'}"


def _figure_names() -> set[str]:
    names = {spec.base for spec in FIGURES}
    names |= {figure_name(spec, v) for spec in FIGURES for v in spec.variants}
    return {f"{name}.{kind}" for name in names for kind in FORMATS}


def check_figure_folder(
    out: str | Path, results: Results, *, what: str = "--out", force: bool = False
) -> list[Path]:
    """Refuse to draw ``results`` into ``out`` when it holds figures of other results.

    Returns the figure files of other results that ``force`` will have removed
    once the new figures are drawn (pass them to :func:`record_figures`);
    without ``force`` that is ``[]`` or a :class:`ResultsError` naming both
    results and the fixes. Writes nothing.
    """
    out = Path(out)
    if not out.is_dir():
        return []
    sources = figure_sources(out, what)
    here, chash = _identity(results)
    others = [e for e in sources if (_entry_path(out, e), e.get("config_hash")) != (here, chash)]
    this = _describe(here, ((results.manifest or {}).get("config") or {}).get("name"), chash)
    if len(others) < len(sources):
        # these results drew here before: drawing them again mixes nothing in (a folder of
        # several, as normprobe figures writes, stays as it is)
        return []
    if not others:
        recorded = {name for e in sources for name in e["files"]}
        unrecorded = sorted(
            p.name for p in out.iterdir() if p.name in _figure_names() and p.name not in recorded
        )
        if unrecorded and out.resolve() != here / "figures":
            raise ResultsError(
                f"{what}: {str(out)!r} holds figures that no record ties to any results "
                f"({listed(unrecorded, 3)}: drawn before normprobe kept {RECORD_NAME}, or "
                f"copied there), and these would be drawn from {this}; pass --out to draw "
                "into another folder, or delete those files first (normprobe removes only "
                "figures it recorded drawing)"
            )
        return []
    files = [out / name for e in others for name in e["files"] if (out / name).is_file()]
    if force or not files:
        return files
    if len(others) == 1 and _entry_path(out, others[0]) == here:
        drawn = (
            f"drawn from {_shown(here)!r} when it held another analysis' results (config "
            f"hash {others[0].get('config_hash')}; now {chash})"
        )
    else:
        described = [
            _describe(_entry_path(out, e), e.get("name"), e.get("config_hash")) for e in others
        ]
        drawn = f"drawn from {listed(described, 2)}, not from {this}"
    raise ResultsError(
        f"{what}: {str(out)!r} holds {_count(files)} {drawn}; pass --out to draw these "
        f"elsewhere, or --force to replace them (once the new figures are drawn it removes "
        f"those {len(files)} files, which {RECORD_NAME} lists, and nothing else)"
    )


def record_figures(
    out: str | Path,
    results: Results,
    written: Iterable[Path],
    remove: Iterable[Path] = (),
) -> tuple[list[Path], list[Path]]:
    """Record in ``out`` that ``results`` drew the files ``written``, and remove ``remove``
    (figures of other results, from :func:`check_figure_folder` with ``force``).

    A file to remove whose content is no longer what normprobe wrote, or that
    was just written again, stays. Returns ``(removed, kept)``: the files
    removed, and those kept because they changed.
    """
    out = Path(out)
    sources = figure_sources(out)
    written = [Path(p) for p in written]
    names = {p.name: file_digest(p)["sha256"] for p in written}
    digests = {name: sha for e in sources for name, sha in e["files"].items()}
    removed, kept = [], []
    for path in remove:
        path = Path(path)
        if path.name in names or not path.is_file():
            continue
        if file_digest(path)["sha256"] != digests.get(path.name):
            kept.append(path)
            continue
        path.unlink()
        removed.append(path)
    gone = set(names) | {p.name for p in removed} | {p.name for p in kept}
    here, chash = _identity(results)
    entry = None
    updated = []
    for e in sources:
        if (_entry_path(out, e), e.get("config_hash")) == (here, chash):
            entry = e
        e["files"] = {
            n: sha for n, sha in e["files"].items() if n not in gone and (out / n).is_file()
        }
        if e["files"] or e is entry:
            updated.append(e)
    if entry is None:
        entry = {
            "results": _relative(here, out),
            "config_hash": chash,
            "name": ((results.manifest or {}).get("config") or {}).get("name"),
            "files": {},
        }
        updated.append(entry)
    entry["files"] = dict(sorted({**entry["files"], **names}.items()))
    if not entry["files"]:
        updated.remove(entry)
    write_json_atomic(out / RECORD_NAME, {"about": _ABOUT, "sources": updated})
    return removed, kept


def _relative(path: Path, out: Path) -> str:
    """``path`` relative to the figure folder (the record stays true when both move together)."""
    try:
        return os.path.relpath(path, out.resolve())
    except ValueError:  # another drive
        return str(path)
