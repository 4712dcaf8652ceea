"""The cluster stages of the life cycle as functions: sweep, average (soups + release), report, and the
pipeline that chains them. They take a validated SweepConfig and return frozen results; the stages
hand each other nothing in memory but read the experiment folder, as a resumed or separate run would.

Only `connect_ray` looks at the environment: it is for entry points (the CLI, a job script), called
before the stages that need Ray (the sweep; serving at the end of the demo).
"""
from __future__ import annotations

import logging
import os
from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path
from typing import TYPE_CHECKING

from po_cluster.config import SweepConfig

if TYPE_CHECKING:  # the stages import Ray Tune and torch when they run, not when a command starts
    from po_cluster.pipelines.demo import DemoAnswers
    from po_cluster.sweep.average import AverageResult
    from po_cluster.sweep.driver import SweepResult

AVERAGE_FILE = "average.json"


def connect_ray(address: str | None = None, num_cpus: int | None = None) -> bool:
    """Join a running cluster (`address`, else $RAY_ADDRESS), else start a local one.

    Returns whether the Ray this process uses is a local one of its own (neither an address nor
    $RAY_ADDRESS): only there does the pipeline end by serving the release it made.
    """
    import ray

    from po_cluster.serving import ingress
    from po_cluster.store.s3 import forwarded_aws_env

    own = address is None and not os.environ.get("RAY_ADDRESS")
    if not ray.is_initialized():
        if own:
            ingress.enable()  # a local Ray of ours: the demo ends by serving on it
        # The job's workers (trials, the shared-inputs task) read datasets in S3 as this process does.
        ray.init(address=address, num_cpus=num_cpus if address is None else None,
                 include_dashboard=True, log_to_driver=False, logging_level=logging.WARNING,
                 runtime_env={"env_vars": forwarded_aws_env()})
    return own


@dataclass(frozen=True)
class ReportResult:
    markdown: Path
    html: Path
    uri: str | None = None  # the uploaded copy beside a remote (s3://) experiment


@dataclass(frozen=True)
class PipelineResult:
    sweep: SweepResult
    average: AverageResult
    report: ReportResult
    served: DemoAnswers | None = None  # only when the pipeline was asked to serve its release


def run_average(cfg: SweepConfig, store: str, top_k: int | None = None, publish: bool = True) -> AverageResult:
    """Soups of the sweep's top-k trials (default: the config's top_k), written as a release folder
    and average.json; published to `store` (a folder or s3://bucket/prefix) unless `publish` is False."""
    from po_cluster.evaluate.objective import Objective
    from po_cluster.store.artifacts import open_store
    from po_cluster.sweep.average import average_trials
    from po_cluster.sweep.driver import read_sweep
    from po_cluster.sweep.experiment import open_experiment, scratch, work_dir
    from po_cluster.tracking.release import log_average
    from po_cluster.tracking.sweep import TRACKING_FILE

    trials = read_sweep(cfg).trials
    experiment = open_experiment(cfg)
    downloads = scratch()  # trial checkpoints in S3 are read from local copies, verified there
    tracked = experiment.read_json(TRACKING_FILE) if experiment.exists(TRACKING_FILE) else None
    lineage = {"sweep": cfg.name, "experiment": experiment.uri,
               "tracking": {k: tracked[k] for k in ("uri", "run_id") if k in tracked} if tracked else None}
    result = average_trials(trials, top_k or cfg.top_k, work_dir(experiment), cfg.base.data,
                            Objective.of(cfg.objective, cfg.base.data),
                            locate=lambda path: experiment.fetch(path, downloads / Path(path).name), lineage=lineage,
                            comparators=_comparators(cfg, work_dir(experiment)))
    if not experiment.is_local:  # a local experiment is the work folder: average_trials wrote it there
        experiment.write_json(AVERAGE_FILE, result.to_json())
    if publish:
        result = replace(result, release_id=open_store(store).publish_release(result.release_folder), store=store)
    log_average(cfg, experiment, result)  # after publishing: the registered version points at the release
    return result


def _comparators(cfg: SweepConfig, folder: Path) -> dict[str, dict[str, float]]:
    """The training-free defence of the same base on the same test sets, when the config asks for it."""
    if cfg.ablation is None or cfg.base.data.task != "typographic":
        return {}
    from po_cluster.pipelines.ablate import ablate

    result = ablate(cfg.base, cfg.ablation, folder / "ablation")
    heads = ", ".join(str(head) for head in result.selection.heads) or "none worth it"
    return {f"head ablation ({heads})": result.after}


def run_report(cfg: SweepConfig) -> ReportResult:
    """Markdown and HTML report of the sweep (and of its soups, once averaged), with plots."""
    from po_cluster.evaluate.report import write_report
    from po_cluster.sweep.driver import read_sweep
    from po_cluster.sweep.experiment import open_experiment, work_dir
    from po_cluster.tracking.release import log_report

    trials = read_sweep(cfg).trials
    experiment = open_experiment(cfg)
    average = experiment.read_json(AVERAGE_FILE) if experiment.exists(AVERAGE_FILE) else None
    folder = work_dir(experiment) / "report"
    markdown, page = write_report([t.to_json() for t in trials], average, folder, f"po-cluster sweep: {cfg.name}",
                                  slots=cfg.max_concurrent_trials)
    log_report(cfg, experiment, folder)
    if experiment.is_local:
        return ReportResult(markdown, page)
    experiment.upload(folder, "report")
    return ReportResult(markdown, page, f"{experiment.uri}/report/")


def sweep_or_resume(cfg: SweepConfig, rerun: bool = False) -> SweepResult:
    """Start the sweep, or resume it when its storage holds one; a finished one is read back instead
    (`rerun`: resume it anyway, which restarts trials that errored)."""
    from ray import tune

    from po_cluster.sweep.driver import RESULTS_FILE, read_sweep, run_sweep
    from po_cluster.sweep.experiment import open_experiment

    experiment = open_experiment(cfg)
    resume = tune.Tuner.can_restore(experiment.path, storage_filesystem=experiment.filesystem)
    if resume and experiment.exists(RESULTS_FILE) and not rerun:
        return read_sweep(cfg)
    return run_sweep(cfg, resume=resume)


def run_pipeline(cfg: SweepConfig, store: str, rerun: bool = False, ask_served: bool = False,
                 on_stage: Callable[[object], None] | None = None) -> PipelineResult:
    """The main job: sweep (resumed if it exists), soups + release published to `store`, report.

    Ray must be connected first (`connect_ray`). With `ask_served` (meant for a local Ray of the
    caller's own, as connect_ray reports it: a job on a shared cluster leaves serving alone) the
    release is then served on 127.0.0.1 and asked about one attacked image. `on_stage` is called with
    each stage's result as soon as it is done (SweepResult, AverageResult, ReportResult, DemoAnswers).
    """
    from po_cluster.pipelines.demo import ask_release

    def done(result):
        if on_stage is not None:
            on_stage(result)
        return result

    sweep = done(sweep_or_resume(cfg, rerun))
    average = done(run_average(cfg, store))
    report = done(run_report(cfg))
    served = done(ask_release(store, average.release_id)) if ask_served else None
    return PipelineResult(sweep, average, report, served)
