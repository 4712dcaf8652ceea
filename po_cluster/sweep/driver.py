"""The Ray Tune + Optuna sweep over β, λ, the loss, the learning rate and the
image-tower mode: one TorchTrainer per trial (the Train V2 pattern), seeded
TPE with the study kept in the experiment folder, ASHA early stopping, and
resume after the driver dies.
"""
from __future__ import annotations

import functools
import math
from dataclasses import dataclass, field
from pathlib import Path

import optuna
import ray
from ray import tune
from ray.tune.schedulers import ASHAScheduler

from po_cluster.cluster.ref_cache import ensure_ref_cache
from po_cluster.cluster.shared import shared_inputs
from po_cluster.config import SweepConfig
from po_cluster.data.selection import prompt_template
from po_cluster.sweep.experiment import Experiment, open_experiment
from po_cluster.sweep.searcher import ReconcileOnRestore, ResumableOptunaSearch, search_algorithm
from po_cluster.sweep.space import define_by_run, distributions, starting_points
from po_cluster.sweep.trial import trial_driver, trial_settings
from po_cluster.tracking.sweep import TRACKING_FILE, finish_sweep, trial_callbacks

METRIC = "objective"
RESULTS_FILE = "sweep_results.json"


def driver_trainable(cfg: SweepConfig, experiment: Experiment, shared: ray.ObjectRef | None = None):
    """The trial driver with the sweep bound to it. It only waits on its TorchTrainer, so it
    reserves no CPU: otherwise the drivers could hold every CPU and no worker could start. With
    `trial_runner: tune` it trains, and asks one worker's resources.
    `shared` goes in a list: with_parameters resolves the references it is given, and the trial
    hands on the reference, not the object."""
    bound = tune.with_parameters(trial_driver, sweep=cfg.model_dump(mode="json"),
                                 filesystem=experiment.filesystem, root=experiment.root,
                                 shared=[shared] if shared is not None else None)
    return tune.with_resources(bound, trial_resources(cfg))


def trial_resources(cfg: SweepConfig) -> dict[str, float]:
    if cfg.trial_runner == "torch_trainer":
        return {"cpu": 0, "memory": 1 << 20}  # a bundle must not be empty
    s = cfg.scaling
    return {"cpu": s.cpus_per_worker, **({"gpu": s.gpus_per_worker} if s.use_gpu else {}), **s.resources_per_worker}


def max_concurrent_trials(cfg: SweepConfig) -> int:
    """As many trials as the cluster's CPUs (or GPUs) hold workers for; Tune cannot see Train's workers."""
    if cfg.max_concurrent_trials is not None:
        return cfg.max_concurrent_trials
    total = ray.cluster_resources()
    s = cfg.scaling
    # A streaming trial's Ray Data tasks need CPUs beside its workers, or every CPU is held by a
    # worker waiting for batches that no task can be scheduled to decode.
    per_trial = s.num_workers * s.cpus_per_worker + (s.data_cpus if cfg.base.data.streaming else 0)
    fits = [total.get("CPU", 0) / per_trial] if per_trial > 0 else []
    if s.use_gpu and s.gpus_per_worker > 0:
        fits.append(total.get("GPU", 0) / (s.num_workers * s.gpus_per_worker))
    return max(1, int(min(fits))) if fits else 1


STUDY_FILE = "optuna-study.journal"


def _study_file(experiment: Experiment) -> Path:
    """The Optuna journal: in the experiment folder when local, else a local copy synced to it."""
    folder = Path(experiment.path) if experiment.is_local else \
        Path.home() / ".cache" / "po-cluster" / "optuna" / experiment.name
    folder.mkdir(parents=True, exist_ok=True)
    return folder / STUDY_FILE


def _prepare_study(experiment: Experiment, resume: bool) -> None:
    """Remote experiments: a new sweep starts from an empty local journal (never a stale copy of an
    earlier sweep of the same name); a resumed one from the stored journal when there is one (a sweep
    killed before its first upload has only the local copy it wrote)."""
    if experiment.is_local:
        return
    local = _study_file(experiment)
    if not resume:
        local.unlink(missing_ok=True)
    elif experiment.exists(STUDY_FILE):
        with experiment.filesystem.open_input_stream(experiment.file(STUDY_FILE)) as stream:
            local.write_bytes(stream.read())


def _study_storage(experiment: Experiment) -> optuna.storages.BaseStorage:
    from optuna.storages.journal import JournalFileBackend

    return optuna.storages.JournalStorage(JournalFileBackend(str(_study_file(experiment))))


def build_tuner(cfg: SweepConfig, experiment: Experiment, callbacks: list | None = None,
                shared: ray.ObjectRef | None = None) -> tune.Tuner:
    """The sweep's Tuner; `callbacks` are Tune's (the tracking logger), run in this driver process."""
    searcher = ResumableOptunaSearch(space=define_by_run(cfg), distributions=distributions(cfg),
                                     metric=METRIC, mode="max", points_to_evaluate=starting_points(cfg),
                                     study_name=cfg.name,
                                     sampler=optuna.samplers.TPESampler(seed=cfg.seed),
                                     storage=_study_storage(experiment), seed=cfg.seed)
    search_alg = search_algorithm(searcher, max_concurrent_trials(cfg))
    reports = math.ceil(cfg.base.training.steps / cfg.reporting.report_every)
    scheduler = ASHAScheduler(time_attr="training_iteration", max_t=reports,
                              grace_period=min(cfg.scheduler.grace_period, reports),
                              reduction_factor=cfg.scheduler.reduction_factor)
    return tune.Tuner(
        driver_trainable(cfg, experiment, shared),
        tune_config=tune.TuneConfig(metric=METRIC, mode="max", search_alg=search_alg, scheduler=scheduler,
                                    num_samples=cfg.num_samples,
                                    # a trial that trains in Tune starts in the process its predecessor used
                                    reuse_actors=cfg.trial_runner == "tune"),
        run_config=tune.RunConfig(name=cfg.name, storage_path=experiment.root,
                                  storage_filesystem=experiment.filesystem, verbose=1,
                                  callbacks=[*(callbacks or []), ReconcileOnRestore(search_alg)],
                                  **in_trial_settings(cfg)),
    )


def in_trial_settings(cfg: SweepConfig) -> dict:
    """With `trial_runner: tune`, Tune keeps the trials' checkpoints and restarts a failed trial from
    its last one (what Ray Train does for a TorchTrainer's trial)."""
    if cfg.trial_runner != "tune":
        return {}
    return {"failure_config": tune.FailureConfig(max_failures=cfg.max_failures),
            "checkpoint_config": tune.CheckpointConfig(num_to_keep=2)}


@dataclass(frozen=True)
class TrialRecord:
    """What `average` and `report` need of a trial; its JSON is one entry of sweep_results.json."""

    trial_id: str | None
    config: dict = field(default_factory=dict)  # the sampled parameters
    metrics: dict = field(default_factory=dict)  # the last report: validation metrics, objective, step
    checkpoint_path: str | None = None
    error: str | None = None

    @property
    def objective(self) -> float | None:
        return self.metrics.get(METRIC)

    def to_json(self) -> dict:
        return {"trial_id": self.trial_id, "config": self.config, "metrics": self.metrics,
                "checkpoint_path": self.checkpoint_path, "error": self.error}

    @classmethod
    def from_json(cls, data: object, where: str) -> TrialRecord:
        if not isinstance(data, dict):
            raise ValueError(f"{where}: a trial must be a JSON object, not {type(data).__name__}")
        for key in ("config", "metrics"):
            if not isinstance(data.get(key, {}), dict):
                raise ValueError(f"{where}: trial {data.get('trial_id')!r} has a non-object {key!r}")
        return cls(data.get("trial_id"), data.get("config", {}), data.get("metrics", {}),
                   data.get("checkpoint_path"), data.get("error"))


@dataclass(frozen=True)
class SweepResult:
    name: str
    uri: str  # the experiment folder
    trials: tuple[TrialRecord, ...]
    ran: bool = True  # False: a finished sweep read back from its results file, not run again
    tracking_uri: str | None = None  # where its MLflow runs are; None: not tracked

    @property
    def with_checkpoint(self) -> int:
        return sum(1 for trial in self.trials if trial.checkpoint_path)


def read_sweep(cfg: SweepConfig) -> SweepResult:
    """The sweep's results as written by run_sweep; FileNotFoundError before the sweep has finished."""
    experiment = open_experiment(cfg)
    if not experiment.exists(RESULTS_FILE):
        raise FileNotFoundError(f"no {RESULTS_FILE} in {experiment.uri}: run (or resume) the sweep first")
    where = f"{experiment.uri}/{RESULTS_FILE}"
    trials = experiment.read_json(RESULTS_FILE).get("trials")
    if not isinstance(trials, list):
        raise ValueError(f"{where}: expected a list of trials under 'trials'")
    tracked = experiment.read_json(TRACKING_FILE).get("uri") if experiment.exists(TRACKING_FILE) else None
    return SweepResult(cfg.name, experiment.uri, tuple(TrialRecord.from_json(t, where) for t in trials), ran=False,
                       tracking_uri=tracked)


def run_sweep(cfg: SweepConfig, resume: bool = False) -> SweepResult:
    """Run (or resume) the sweep on the connected Ray cluster; writes one record per trial to
    sweep_results.json in the experiment folder and returns them."""
    experiment = open_experiment(cfg)
    restorable = tune.Tuner.can_restore(experiment.path, storage_filesystem=experiment.filesystem)
    if resume and not restorable:
        raise FileNotFoundError(f"no sweep to resume at {experiment.uri}")
    if not resume and restorable:
        raise FileExistsError(f"a sweep already exists at {experiment.uri}; use --resume or another name")
    # The tracker and parent run also close a resumed sweep; its Tuner, though, keeps the callbacks it
    # was made with (Tune pickles them with the experiment), so `callbacks` only goes to a new one.
    callbacks, tracker, parent = trial_callbacks(cfg, experiment,
                                                 functools.partial(trial_settings, cfg.model_dump(mode="json")))
    # Computed again by a resumed sweep: deterministic, so a trial that resumes gets the same inputs.
    shared = shared_inputs(cfg.base, cfg.scaling) if cfg.share_inputs else None
    if cfg.base.data.streaming:  # once, here, rather than by the first trials at once
        ensure_ref_cache(cfg.base, cfg.scaling, prompt_template(cfg.base.data))
    if resume:
        _prepare_study(experiment, resume=True)  # before Tune restores its searcher, which opens it
        tuner = tune.Tuner.restore(experiment.path, trainable=driver_trainable(cfg, experiment, shared),
                                   resume_unfinished=True, restart_errored=True,
                                   storage_filesystem=experiment.filesystem)
    else:
        _prepare_study(experiment, resume=False)
        tuner = build_tuner(cfg, experiment, callbacks, shared)
    grid = tuner.fit()
    if not experiment.is_local:
        experiment.upload(_study_file(experiment), STUDY_FILE)
    trials = tuple(trial_record(grid[i]) for i in range(len(grid)))  # ResultGrid indexes but declares no __iter__
    records = [trial.to_json() for trial in trials]
    results = experiment.write_json(RESULTS_FILE, {"sweep": cfg.model_dump(mode="json"), "trials": records})
    finish_sweep(tracker, parent, records, results)
    return SweepResult(cfg.name, experiment.uri, trials, tracking_uri=tracker.uri if tracker else None)


def _text(value: object) -> str | None:
    return None if value is None else str(value)


def trial_record(result) -> TrialRecord:
    """A Tune result in plain JSON values. A TorchTrainer's trial reports its checkpoint's path; a trial
    that trained in Tune (`trial_runner: tune`) has Tune's own checkpoint."""
    metrics = {k: v for k, v in (result.metrics or {}).items() if isinstance(v, (int, float, str))}
    checkpoint = metrics.get("checkpoint_path") or (result.checkpoint.path if result.checkpoint else None)
    return TrialRecord(_text(metrics.get("trial_id")), result.config, metrics, _text(checkpoint),
                       str(result.error) if result.error else None)
