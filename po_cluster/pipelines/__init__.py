"""The stages of po-cluster as plain functions over validated configs, returning frozen results.

- `cluster`: run_average, run_report, run_pipeline (and connect_ray, for entry points); run_sweep and
  read_sweep are sweep.driver's, AverageResult sweep.average's;
- `compare`: compare_losses, every loss trained once from the base model;
- `demo`: ask_release, the served release and the base model asked about one attacked image.

Names are imported on first use: `import po_cluster.pipelines` does not import Ray, Tune or torch.
"""
from __future__ import annotations

import importlib
from typing import Any

_EXPORTS = {  # name → the module that defines it
    **dict.fromkeys(("connect_ray", "run_average", "run_report", "run_pipeline", "sweep_or_resume",
                     "PipelineResult", "ReportResult"), "po_cluster.pipelines.cluster"),
    **dict.fromkeys(("run_sweep", "read_sweep", "SweepResult", "TrialRecord"), "po_cluster.sweep.driver"),
    "AverageResult": "po_cluster.sweep.average",
    **dict.fromkeys(("compare_losses", "CompareResult"), "po_cluster.pipelines.compare"),
    **dict.fromkeys(("ask_release", "DemoAnswers"), "po_cluster.pipelines.demo"),
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    if name not in _EXPORTS:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    return getattr(importlib.import_module(_EXPORTS[name]), name)
