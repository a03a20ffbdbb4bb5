"""normprobe: what does this normalization layer do to my network?

Public API, grouped by topic:

- normalizers: :func:`normalizers`, :data:`NORMS`, :func:`build_norm`
- models: :func:`build_model`, :data:`MODELS`
- data: :func:`load_dataset`, :data:`DATASETS`, :class:`Dataset`
- probes: :func:`representation_correlation`, :func:`gradient_correlation`,
  :func:`gradient_norms`, :func:`growth_rate`, :class:`Probe`
- Hessian: :func:`hessian_spectrum`, :class:`HessianOperator`, :class:`HessianSpectrum`
- experiments: :func:`analyze`, :func:`load_results`, :class:`Results`

>>> import normprobe
>>> "batch" in normprobe.normalizers()
True
"""

from __future__ import annotations

from importlib.metadata import PackageNotFoundError, version

from normprobe.analyze import analyze
from normprobe.data import DATASETS, Dataset, Split, load_dataset
from normprobe.errors import NormprobeError
from normprobe.hessian import HessianOperator, HessianSpectrum, hessian_spectrum
from normprobe.models import MODELS, build_model
from normprobe.norms import NORMS, normalizers
from normprobe.norms import build as build_norm
from normprobe.probes import (
    Probe,
    gradient_correlation,
    gradient_norms,
    growth_rate,
    representation_correlation,
)
from normprobe.results import Results, load_results

try:
    __version__ = version("normprobe")
except PackageNotFoundError:  # running from a source tree that was not installed
    __version__ = "0.0.0+unknown"

__all__ = [
    "__version__",
    # normalizers
    "normalizers",
    "NORMS",
    "build_norm",
    # models
    "build_model",
    "MODELS",
    # data
    "load_dataset",
    "DATASETS",
    "Dataset",
    "Split",
    # probes
    "representation_correlation",
    "gradient_correlation",
    "gradient_norms",
    "growth_rate",
    "Probe",
    # Hessian
    "hessian_spectrum",
    "HessianOperator",
    "HessianSpectrum",
    # experiments
    "analyze",
    "load_results",
    "Results",
    # errors
    "NormprobeError",
]
