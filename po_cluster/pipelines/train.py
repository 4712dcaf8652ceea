"""`po-cluster train`: single-process training, logged to MLflow when it is done."""
from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from po_cluster.config import RunConfig
from po_cluster.tracking.training import log_training
from po_cluster.train.loop import RunResult, run_training


@dataclass(frozen=True)
class TrainResult:
    run: RunResult
    tracking_uri: str | None  # where the run was logged; None: tracking off or unreachable


def train(cfg: RunConfig, progress: Callable[[int, dict[str, float]], None] | None = None) -> TrainResult:
    """run_training, with each step's metrics kept for the tracking run (and passed on to `progress`)."""
    history: list[tuple[int, dict[str, float]]] = []

    def step_done(step: int, metrics: dict[str, float]) -> None:
        history.append((step, dict(metrics)))
        if progress is not None:
            progress(step, metrics)

    result = run_training(cfg, step_done)
    return TrainResult(result, log_training(cfg, result, history))
