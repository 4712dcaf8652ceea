"""`po-cluster train` in MLflow: one run with the run's settings as parameters, the training
metrics of every step, the evaluation before and after (at the last step), and the checkpoint's
location as a tag (the weights stay in the checkpoint folder). Logged when training is done, in a
few batched calls, so that a slow or absent server costs the training loop nothing."""
from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

from po_cluster.config import RunConfig
from po_cluster.tracking.client import log_metrics, log_params, open_tracker, run_params

if TYPE_CHECKING:
    from po_cluster.train.run import RunResult

CHECKPOINT_TAG = "checkpoint_path"


def log_training(cfg: RunConfig, result: RunResult, history: list[tuple[int, dict[str, float]]]) -> str | None:
    """Log one finished training run; returns the tracking URI it went to, None when tracking is off
    or could not be reached (said once, as a TrackingUnavailable warning)."""
    tracker = open_tracker(cfg.tracking, Path(cfg.output_dir), cfg.name)
    if tracker is None:
        return None

    def log() -> str:
        client = tracker.client
        tags = {"po_cluster.kind": "train"}
        if result.checkpoint is not None:
            tags[CHECKPOINT_TAG] = str(Path(result.checkpoint).resolve())
        run = client.create_run(tracker.experiment_id, run_name=cfg.name, tags=tags)
        run_id = run.info.run_id
        log_params(client, run_id, run_params(cfg.model_dump(mode="json")))
        last = cfg.training.steps
        evaluation = {f"{when}_{k}": v for when, metrics in (("before", result.before), ("after", result.after),
                                                            ("last_iterate", result.last_iterate))
                      for k, v in metrics.items()}
        log_metrics(client, run_id, [*history, (last, {**evaluation, "seconds": result.seconds})])
        client.set_terminated(run_id, "FINISHED")
        return run_id

    return tracker.uri if tracker.guarded(log) is not None else None
