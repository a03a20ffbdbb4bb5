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
  :func:`measure_properties` (the properties table of Rao & Sohl-Dickstein 2020, measured)
- your own training loop: :class:`Monitor` (the measures on a schedule, written as a run)

>>> import normprobe
>>> "batch" in normprobe.normalizers()
True
"""

from __future__ import annotations

import sys
from importlib import import_module
from importlib.metadata import PackageNotFoundError, version
from types import ModuleType
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:  # what the names below are, for type checkers and editors
    from normprobe.analyze import analyze
    from normprobe.data import DATASETS, Dataset, Split, load_dataset
    from normprobe.errors import NormprobeError
    from normprobe.hessian import HessianOperator, HessianSpectrum, hessian_spectrum
    from normprobe.measures import MEASURES, MeasureInputs, enabled_measures, measure_step
    from normprobe.models import MODELS, build_model
    from normprobe.models.swap import swap_norms
    from normprobe.monitor import Monitor
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

#: public name -> (module, its name there). Imported on first use (PEP 562): ``import
#: normprobe`` and the command line's ``--help`` do not pay for torch, pandas and scipy
#: until a name that needs them is used.
_WHERE = {
    "analyze": ("normprobe.analyze", "analyze"),
    "DATASETS": ("normprobe.data", "DATASETS"),
    "Dataset": ("normprobe.data", "Dataset"),
    "Split": ("normprobe.data", "Split"),
    "load_dataset": ("normprobe.data", "load_dataset"),
    "NormprobeError": ("normprobe.errors", "NormprobeError"),
    "HessianOperator": ("normprobe.hessian", "HessianOperator"),
    "HessianSpectrum": ("normprobe.hessian", "HessianSpectrum"),
    "hessian_spectrum": ("normprobe.hessian", "hessian_spectrum"),
    "MEASURES": ("normprobe.measures", "MEASURES"),
    "MeasureInputs": ("normprobe.measures", "MeasureInputs"),
    "enabled_measures": ("normprobe.measures", "enabled_measures"),
    "measure_step": ("normprobe.measures", "measure_step"),
    "MODELS": ("normprobe.models", "MODELS"),
    "build_model": ("normprobe.models", "build_model"),
    "swap_norms": ("normprobe.models.swap", "swap_norms"),
    "Monitor": ("normprobe.monitor", "Monitor"),
    "NORMS": ("normprobe.norms", "NORMS"),
    "normalizers": ("normprobe.norms", "normalizers"),
    "build_norm": ("normprobe.norms", "build"),
    "plan_runs": ("normprobe.plan", "plan_runs"),
    "prepare_data": ("normprobe.plan", "prepare_data"),
    "Probe": ("normprobe.probes", "Probe"),
    "batch_dependence": ("normprobe.probes", "batch_dependence"),
    "gradient_correlation": ("normprobe.probes", "gradient_correlation"),
    "gradient_norms": ("normprobe.probes", "gradient_norms"),
    "growth_rate": ("normprobe.probes", "growth_rate"),
    "representation_correlation": ("normprobe.probes", "representation_correlation"),
    "signal_statistics": ("normprobe.probes", "signal_statistics"),
    "train_eval_gap": ("normprobe.probes", "train_eval_gap"),
    "Results": ("normprobe.results", "Results"),
    "load_results": ("normprobe.results", "load_results"),
    "run_one": ("normprobe.run", "run_one"),
    "measure_properties": ("normprobe.zoo_measures", "measure_properties"),
    "sequence_leak": ("normprobe.zoo_measures", "sequence_leak"),
}


def __getattr__(name: str) -> Any:
    """A public name, imported from its module the first time it is asked for."""
    where = _WHERE.get(name)
    if where is None:
        raise AttributeError(f"module 'normprobe' has no attribute {name!r}")
    value = getattr(import_module(where[0]), where[1])
    globals()[name] = value  # later lookups find it without this call
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_WHERE))


class _Package(ModuleType):
    """The package, whose public ``analyze`` is the function of its module ``analyze``.

    Importing a submodule binds it to its package's attribute of the same name
    (the import system's ``setattr``): once anything imported
    :mod:`normprobe.analyze`, ``normprobe.analyze`` would be that module. The
    public name keeps the function, as it did when the package imported it
    eagerly.
    """

    def __setattr__(self, name: str, value: Any) -> None:
        where = _WHERE.get(name)
        if where is not None and isinstance(value, ModuleType) and value.__name__ == where[0]:
            value = getattr(value, where[1])
        super().__setattr__(name, value)


sys.modules[__name__].__class__ = _Package


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
    # your own training loop
    "Monitor",
    # errors
    "NormprobeError",
]
