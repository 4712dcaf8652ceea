"""What `average` and `report` put on the sweep's MLflow run: average.json, the soups' table, the
release card and the report as artifacts, and the release registered as a version of a registered
model whose source is the release's store URI (nothing is copied)."""
from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

from po_cluster.config import SweepConfig
from po_cluster.sweep.experiment import Experiment
from po_cluster.tracking.client import Tracker, log_metrics
from po_cluster.tracking.sweep import RELEASE_TAG, open_sweep_tracker, parent_run

if TYPE_CHECKING:
    from po_cluster.sweep.average import AverageResult


def release_location(store: str, release_id: str) -> str:
    """The release's URI in its store (`<store>/releases/<id>`), what `serve` and `pull` read."""
    from po_cluster.store.artifacts import RELEASES, open_store
    from po_cluster.store.location import join

    return join(open_store(store).uri, f"{RELEASES}/{release_id}")


def log_average(cfg: SweepConfig, experiment: Experiment, result: AverageResult) -> None:
    """The soups' table, the release card and average.json on the sweep's run, the chosen candidate's
    metrics, and once published the release registered as a version whose source is its store URI."""
    tracker = open_sweep_tracker(cfg, experiment)
    if tracker is None:
        return
    parent = tracker.guarded(lambda: parent_run(tracker, cfg, experiment))
    if parent is None:
        return
    tracker.guarded(lambda: _log_soups(tracker, parent, result))
    if result.release_id is not None and result.store is not None:
        uri = release_location(result.store, result.release_id)
        tracker.guarded(lambda: register_release(tracker, cfg.tracking.registered_model or cfg.name, parent,
                                                 result, uri), "model registry", down=False)


def _soups_table(result: AverageResult) -> str:
    keys = sorted({k for metrics in result.test.values() for k in metrics})
    rows = [f"| {name} | " + " | ".join(f"{metrics.get(k, float('nan')):.4f}" for k in keys) + " |"
            for name, metrics in result.test.items()]
    return "\n".join([f"| model | {' | '.join(keys)} |", "|---" * (len(keys) + 1) + "|", *rows,
                      "", f"chosen: {result.chosen}; greedy soup: {', '.join(result.greedy_members)}", ""])


def _log_soups(tracker: Tracker, parent: str, result: AverageResult) -> None:
    client = tracker.client
    client.log_dict(parent, result.to_json(), "average/average.json")
    client.log_text(parent, _soups_table(result), "average/soups.md")
    card = Path(result.release_folder) / "card.md"
    if card.is_file():
        client.log_artifact(parent, str(card), "average")
    rows = {f"release_test_{k}": v for k, v in result.metrics.items()}
    rows.update({f"release_val_{k}": v for k, v in result.validation[result.chosen].items()})
    log_metrics(tracker.client, parent, [(0, rows)])
    client.set_tag(parent, "po_cluster.chosen", result.chosen)


def register_release(tracker: Tracker, model_name: str, parent: str, result: AverageResult,
                     release_uri: str) -> str:
    """A new version of `model_name` pointing at the release in the store; returns its version."""
    from mlflow.exceptions import MlflowException

    if tracker.uri.startswith(("http://", "https://")) and "://" not in release_uri:
        # A server refuses local paths as sources (and could not read this machine's folder anyway).
        raise ValueError(f"a tracking server cannot register the local release {release_uri}: "
                         "publish to an s3:// store to register releases there")
    client = tracker.client
    try:
        client.create_registered_model(model_name, description="po-cluster releases (sources: the artifact store)")
    except MlflowException as error:
        if error.error_code != "RESOURCE_ALREADY_EXISTS":
            raise
    tags = {"release_id": result.release_id or "", "chosen": result.chosen, "store": result.store or "",
            **{f"test_{k}": f"{v:.6g}" for k, v in result.metrics.items()}}
    version = client.create_model_version(model_name, release_uri, run_id=parent, tags=tags,
                                          description=f"{result.chosen} of {', '.join(result.trials)}",
                                          await_creation_for=0)  # nothing is copied: ready at once
    client.set_tag(parent, RELEASE_TAG, release_uri)
    client.set_tag(parent, "po_cluster.model_version", f"{model_name}/{version.version}")
    return str(version.version)


def log_report(cfg: SweepConfig, experiment: Experiment, folder: Path) -> None:
    """The report (Markdown, HTML, plots) as artifacts of the sweep's run."""
    tracker = open_sweep_tracker(cfg, experiment)
    if tracker is None:
        return
    parent = tracker.guarded(lambda: parent_run(tracker, cfg, experiment))
    if parent is not None:
        tracker.guarded(lambda: tracker.client.log_artifacts(parent, str(folder), "report"))

