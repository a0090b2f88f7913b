"""Speed benchmarks of DAST (``dast bench``): one JSON-ready dict per measurement.

* :mod:`dast.benchmarking.modes`: named speed modes (``eager-fp32``, ``fast``, ...) and a
  training setup built for one;
* :mod:`dast.benchmarking.workloads`: the stage-1/stage-2 iterations, target inference and
  pseudo-labelling, and :func:`run_benchmarks`;
* :mod:`dast.benchmarking.timing`: synchronised wall-clock timing and memory figures.
"""

from dast.benchmarking.modes import MODES, Mode, ResolvedMode, TrainingSetup, parse_modes, resolve_mode
from dast.benchmarking.workloads import SIZES, WHATS, BenchRequest, Sizes, Workload, run_benchmarks

__all__ = [
    "MODES",
    "SIZES",
    "WHATS",
    "Mode",
    "ResolvedMode",
    "Sizes",
    "TrainingSetup",
    "parse_modes",
    "resolve_mode",
    "run_benchmarks",
    "BenchRequest",
    "Workload",
]
