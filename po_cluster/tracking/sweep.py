"""A sweep in MLflow: one parent run per sweep, one child run per trial (logged by Ray Tune's own
MLflowLoggerCallback, from the Tune driver), and on the parent what `average` and `report` make:
the soups' table, the card, the report and its plots as artifacts, the release registered as a
version of a registered model whose source is the release's store URI (its weights stay there);
those last are in tracking/release.py.

The parent run's id is kept in the experiment folder (tracking.json), so a resumed sweep, and
`average` or `report` run later in another process, log to the same run.
"""
from __future__ import annotations

import json
from collections.abc import Callable
from typing import Any

from ray.air.integrations.mlflow import MLflowLoggerCallback
from ray.tune.result import AUTO_RESULT_KEYS, DEBUG_METRICS, TRAINING_ITERATION

from po_cluster.config import SweepConfig
from po_cluster.sweep.experiment import Experiment, work_dir
from po_cluster.tracking.client import (
    Tracker,
    flat_params,
    is_down,
    log_metrics,
    log_params,
    open_tracker,
    run_params,
    warn_once,
)

TRACKING_FILE = "tracking.json"
PARENT_TAG = "mlflow.parentRunId"  # what the MLflow UI nests child runs under
CHECKPOINT_TAG = "checkpoint_path"
CHECKPOINT_DIR_NAME = "checkpoint_dir_name"  # what Tune adds to a result that came with a checkpoint
RELEASE_TAG = "release_uri"
# Tune's bookkeeping and what is not a number of the trial's own: not logged as metrics.
NOT_METRICS = {*AUTO_RESULT_KEYS, *DEBUG_METRICS, "done", "step", CHECKPOINT_TAG, CHECKPOINT_DIR_NAME,
               "should_checkpoint"}


def open_sweep_tracker(cfg: SweepConfig, experiment: Experiment) -> Tracker | None:
    return open_tracker(cfg.tracking, work_dir(experiment), cfg.name)


def _sweep_params(cfg: SweepConfig) -> dict[str, str]:
    data = cfg.model_dump(mode="json", exclude={"base", "tracking"})
    space = data.pop("space")
    params = flat_params(data)
    params.update({f"space.{k}": json.dumps(v) for k, v in space.items() if v is not None})
    params.update(flat_params(cfg.base.model_dump(mode="json", exclude={"tracking", "name", "output_dir"}), "base."))
    return params


def parent_run(tracker: Tracker, cfg: SweepConfig, experiment: Experiment) -> str:
    """The sweep's run: the one tracking.json names when this tracker still has it, else a new one."""
    from mlflow.exceptions import MlflowException

    recorded = experiment.read_json(TRACKING_FILE) if experiment.exists(TRACKING_FILE) else {}
    if recorded.get("uri") == tracker.uri and recorded.get("experiment_id") == tracker.experiment_id:
        try:
            return tracker.client.get_run(recorded["run_id"]).info.run_id
        except MlflowException:
            pass  # deleted since, or a fresh database: start again
    run = tracker.client.create_run(tracker.experiment_id, run_name=cfg.name,
                                    tags={"po_cluster.kind": "sweep", "po_cluster.experiment_uri": experiment.uri})
    log_params(tracker.client, run.info.run_id, _sweep_params(cfg))
    experiment.write_json(TRACKING_FILE, {"uri": tracker.uri, "experiment_id": tracker.experiment_id,
                                          "run_id": run.info.run_id})
    return run.info.run_id


class TrialRunsCallback(MLflowLoggerCallback):
    """Ray Tune's MLflow logger with the sweep's choices on top:

    - each trial's run is a child of the sweep's run (Tune's logger takes the parent as a tag) and
      carries the trial's whole run settings beside the sampled values Tune logs;
    - metrics are logged by training step (Tune's logger uses the report count) in one batch;
    - the last checkpoint's location is a tag (the weights stay in the sweep's storage);
    - a resumed trial logs to its run of before, found by its trial id;
    - a tracking failure disables the logger with one warning instead of failing the sweep.
    """

    def __init__(self, uri: str, experiment_name: str, parent_run_id: str,
                 settings_of: Callable[[dict], dict]) -> None:
        """`settings_of(sample)`: the trial's RunConfig as JSON (a module-level function or a partial of
        one, since Tune pickles its callbacks with the experiment)."""
        super().__init__(tracking_uri=uri, registry_uri=uri, experiment_name=experiment_name,
                         tags={PARENT_TAG: parent_run_id})
        self.parent_run_id, self.settings_of, self.failed = parent_run_id, settings_of, False

    def _guard(self, action) -> None:
        if self.failed or is_down(self.tracking_uri or ""):
            return
        try:
            action()
        except Exception as error:  # any failure of MLflow or the network: tracking never fails the sweep
            self.failed = True
            warn_once(self.tracking_uri or "", error)

    def _client(self) -> Any:
        return self.mlflow_util._get_client()

    def setup(self, *args, **kwargs) -> None:
        self._trial_runs = {}  # before anything can fail: the other hooks look trials up here
        self._guard(lambda: MLflowLoggerCallback.setup(self, *args, **kwargs))

    def _earlier_run(self, trial) -> str | None:
        runs = self._client().search_runs(
            [self.mlflow_util.experiment_id], max_results=1,
            filter_string=f"tags.`{PARENT_TAG}` = '{self.parent_run_id}' and tags.trial_id = '{trial.trial_id}'")
        return runs[0].info.run_id if runs else None

    def log_trial_start(self, trial) -> None:
        def start() -> None:
            if trial not in self._trial_runs and (earlier := self._earlier_run(trial)) is not None:
                self._trial_runs[trial] = earlier
            MLflowLoggerCallback.log_trial_start(self, trial)
            run_id = self._trial_runs[trial]
            params = {k: v for k, v in run_params(self.settings_of(trial.config)).items()
                      if k not in trial.config}  # Tune logged the sampled ones
            log_params(self._client(), run_id, params, {"trial_id": trial.trial_id})

        self._guard(start)

    def log_trial_result(self, iteration: int, trial, result: dict) -> None:
        def log() -> None:
            run_id = self._trial_runs[trial]
            step = int(result.get("step") or result[TRAINING_ITERATION])
            metrics = {k: v for k, v in result.items() if k not in NOT_METRICS}
            log_metrics(self._client(), run_id, [(step, metrics)])
            if (checkpoint := checkpoint_of(trial, result)) is not None:
                self._client().set_tag(run_id, CHECKPOINT_TAG, checkpoint)

        if trial in self._trial_runs:
            self._guard(log)

    def log_trial_end(self, trial, failed: bool = False) -> None:
        if trial in self._trial_runs:
            self._guard(lambda: MLflowLoggerCallback.log_trial_end(self, trial, failed))


def checkpoint_of(trial, result: dict) -> str | None:
    """Where this result's checkpoint lies: a TorchTrainer's trial reports the path; a trial that
    trained in Tune (`trial_runner: tune`) names its folder in the trial's storage, which Tune
    registers only after the callbacks have seen the result."""
    if result.get(CHECKPOINT_TAG):
        return str(result[CHECKPOINT_TAG])
    if result.get(CHECKPOINT_DIR_NAME):
        return f"{trial.storage.trial_fs_path}/{result[CHECKPOINT_DIR_NAME]}"
    return None


def trial_callbacks(cfg: SweepConfig, experiment: Experiment,
                    settings_of: Callable[[dict], dict]) -> tuple[list, Tracker | None, str | None]:
    """Tune's callbacks for the sweep (none when tracking is off or down), its tracker and parent run."""
    tracker = open_sweep_tracker(cfg, experiment)
    if tracker is None:
        return [], None, None
    parent = tracker.guarded(lambda: parent_run(tracker, cfg, experiment))
    if parent is None:
        return [], None, None
    return [TrialRunsCallback(tracker.uri, tracker.experiment_name, parent, settings_of)], \
        tracker, parent


def finish_sweep(tracker: Tracker | None, parent: str | None, records: list[dict], results_uri: str) -> None:
    """The sweep's best objective on its run, where its results are, and the run marked finished."""
    if tracker is None or parent is None:
        return
    objectives = [r["metrics"]["objective"] for r in records if isinstance(r["metrics"].get("objective"), float)]

    def finish() -> None:
        if objectives:
            log_metrics(tracker.client, parent, [(0, {"best_objective": max(objectives), "trials": len(records)})])
        tracker.client.set_tag(parent, "po_cluster.results", results_uri)
        tracker.client.set_terminated(parent, "FINISHED")

    tracker.guarded(finish)
