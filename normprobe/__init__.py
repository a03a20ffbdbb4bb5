"""normprobe: what does this normalization layer do to my network?

Public API, grouped by topic:

- normalizers: :func:`normalizers`, :data:`NORMS`, :func:`build_norm`
- models: :func:`build_model`, :data:`MODELS`, :func:`swap_norms` (norms in your own model)
- data: :func:`load_dataset`, :data:`DATASETS`, :class:`Dataset`
- probes: :func:`representation_correlation`, :func:`gradient_correlation`,
  :func:`gradient_norms`, :func:`growth_rate`, :func:`batch_dependence`,
  :func:`train_eval_gap`, :func:`signal_statistics`, :class:`Probe`
- Hessian: :func:`hessian_spectrum`, :class:`HessianOperator`, :class:`HessianSpectrum`
- measures: :data:`MEASURES` (every probe and the Hessian, registered once),
  :class:`MeasureInputs`, :func:`enabled_measures`, :func:`measure_step` (for a
  recorder in any training loop), :func:`sequence_leak`
- experiments: :func:`analyze`, :func:`plan_runs`, :func:`prepare_data`,
  :func:`run_one`, :func:`load_results`, :class:`Results`,
  :func:`measure_properties` (seed 003's Table 2, measured)

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
from normprobe.measures import MEASURES, MeasureInputs, enabled_measures, measure_step
from normprobe.models import MODELS, build_model
from normprobe.models.swap import swap_norms
from normprobe.norms import NORMS, normalizers
from normprobe.norms import build as build_norm
from normprobe.plan import plan_runs, prepare_data
from normprobe.probes import (
    Probe,
    batch_dependence,
    gradient_correlation,
    gradient_norms,
    growth_rate,
    representation_correlation,
    signal_statistics,
    train_eval_gap,
)
from normprobe.results import Results, load_results
from normprobe.run import run_one
from normprobe.zoo_measures import measure_properties, sequence_leak

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
    "swap_norms",
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
    "batch_dependence",
    "train_eval_gap",
    "signal_statistics",
    "Probe",
    # Hessian
    "hessian_spectrum",
    "HessianOperator",
    "HessianSpectrum",
    # measures
    "MEASURES",
    "MeasureInputs",
    "enabled_measures",
    "measure_step",
    "sequence_leak",
    # experiments
    "analyze",
    "plan_runs",
    "prepare_data",
    "run_one",
    "load_results",
    "Results",
    "measure_properties",
    # errors
    "NormprobeError",
]
