"""`po-cluster train`: the one training function (po_cluster/train/run.py) in this process, logged to
MLflow when it is done."""
from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from po_cluster.config import RunConfig
from po_cluster.tracking.training import log_training
from po_cluster.train.callbacks import ProgressCallback
from po_cluster.train.run import RunResult, train


@dataclass(frozen=True)
class TrackedRun:
    run: RunResult
    tracking_uri: str | None  # where the run was logged; None: tracking off or unreachable


def run_train(cfg: RunConfig, progress: Callable[[int, dict[str, float]], None] | None = None) -> TrackedRun:
    """Train `cfg` alone, with each step's metrics kept for the tracking run (and passed on to `progress`)."""
    history: list[tuple[int, dict[str, float]]] = []

    def step_done(step: int, metrics: dict[str, float]) -> None:
        history.append((step, dict(metrics)))
        if progress is not None:
            progress(step, metrics)

    result = train(cfg, callbacks=[ProgressCallback(step_done)])
    return TrackedRun(result, log_training(cfg, result, history))
