"""The one way in for "train this config": `train(job, session=None, callbacks=())`.

`po-cluster train` and `compare` (po_cluster/pipelines), a Ray Train worker and a Ray Tune trial
(po_cluster/cluster/entry.py) all call it; only the session differs (po_cluster/train/session.py).
Every run builds its model on the session's device, reads its records (the sweep's shared inputs,
a stream of the dataset's shards, or its own, decoded into memory), resumes from the session's last
checkpoint, if any, and trains with `fit`. A job with `reporting` (a trial's) validates, reports and
checkpoints through the session on the way (po_cluster/train/report.py); a session with a
`final_checkpoint` (this process alone) scores the test sets before and after training and saves
the final checkpoint there itself.
"""
from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch

from po_cluster.config import RunConfig, TrainJobConfig
from po_cluster.data.selection import build_records, held_out_sets, prompt_template
from po_cluster.evaluate.metrics import Evaluator
from po_cluster.model.aligned import AlignedCLIP
from po_cluster.model.checkpoint import model_description, save_checkpoint
from po_cluster.train.batch import BatchSource
from po_cluster.train.callbacks import Callback
from po_cluster.train.loop import (
    FitResult,
    MemorySource,
    TrainState,
    build_model,
    fit,
    load_average,
    prepare_data,
    unwrap,
)
from po_cluster.train.phases import PhaseClock
from po_cluster.train.report import ReportCallback, StepTimer, TowerImages, Validation
from po_cluster.train.session import LocalSession, Session
from po_cluster.train.state import load_train_state


@dataclass
class RunResult:
    """What a run leaves: the folder of its final checkpoint and the test sets' metrics before training,
    after it (the BMA weights, when averaged) and of the last iterate, where the session keeps a final
    checkpoint (else None and empty); the last step's training metrics; its wall time."""

    checkpoint: Path | None
    before: dict[str, float]
    after: dict[str, float]
    last_iterate: dict[str, float]
    seconds: float
    train: dict[str, float] = field(default_factory=dict)


def train(job: TrainJobConfig | RunConfig, session: Session | None = None,
          callbacks: Sequence[Callback] = ()) -> RunResult:
    """Train `job` (a RunConfig is a job without reporting) where `session` says: None is this process
    alone (`LocalSession.for_run`). `callbacks` run after each step, before the report of that step."""
    started = time.time()
    job = job if isinstance(job, TrainJobConfig) else TrainJobConfig(run=job)
    run = job.run
    session = session if session is not None else LocalSession.for_run(run)
    clock = PhaseClock(job.trial_started_at)
    torch.manual_seed(run.training.seed)
    with clock.phase("model_load"):
        model = build_model(run, session.device)
    tower = TowerImages(model)
    template = prompt_template(run.data)
    with clock.phase("data_prep"):
        source = _training_source(model, run, session, template)
    final = _FinalScore.start(model, run, session, template)
    with clock.phase("validation_build"):
        validation = _validation(model, job, session)
    state = TrainState.start(model, run)
    _resume(model, state, session)
    trained = session.prepare_model(model)
    loop: list[Callback] = [StepTimer(clock), *callbacks]
    if job.reporting is not None:
        loop.append(ReportCallback(job, session, trained, state, validation, clock, tower))
    result = fit(trained, source, run, loop, state, session.rank, session.world_size)
    if final is None:
        return RunResult(None, {}, {}, {}, time.time() - started, result.last_metrics)
    return final.finish(model, run, result, source.classnames, template, started)


def _training_source(model: AlignedCLIP, run: RunConfig, session: Session, template: str) -> BatchSource:
    """This process's batches: the session's stream of the dataset's shards, or records in memory (the
    sweep's shared ones, or its own), this rank's shard of each step's global batch."""
    if run.data.streaming:
        return session.stream(model, run, template)
    data = session.shared.train_data(model.image_tower_frozen) if session.shared is not None else \
        prepare_data(model, *build_records(run.data, model.preprocess.geometry), template)
    return MemorySource(model, data, run, session.rank, session.world_size)


def _validation(model: AlignedCLIP, job: TrainJobConfig, session: Session) -> Validation | None:
    """The validation sets of a reporting run's rank 0: the sweep's shared ones, or its own."""
    if job.reporting is None or session.rank != 0:
        return None
    if session.shared is not None:
        return Validation.of_shared(model, session.shared)
    return Validation.of_start(model, job.run.data)


def _resume(model: AlignedCLIP, state: TrainState, session: Session) -> None:
    """Continue from the run's last checkpoint, if the session restored one (after a failure)."""
    with session.checkpoint() as folder:
        if folder is not None:
            state.step = load_train_state(folder, unwrap(model), state.optimizer, state.bma, state.precision)


@dataclass
class _FinalScore:
    """The test sets scored before training and after it, and the final checkpoint saved with them."""

    evaluator: Evaluator
    before: dict[str, float]
    folder: Path

    @classmethod
    def start(cls, model: AlignedCLIP, run: RunConfig, session: Session, template: str) -> _FinalScore | None:
        # Before training the model is its own reference: π_ref on the clean set is taken from it once.
        if session.final_checkpoint is None:
            return None
        sets = session.test_sets if session.test_sets is not None else \
            held_out_sets(run.data, "test", model.preprocess.geometry)
        evaluator = Evaluator.build(model, sets, template=template)
        return cls(evaluator, evaluator.metrics(1.0), session.final_checkpoint)

    def finish(self, model: AlignedCLIP, run: RunConfig, result: FitResult, classnames: tuple[str, ...],
               template: str, started: float) -> RunResult:
        """Score the last iterate, load the BMA weights and score them, save them as the checkpoint."""
        last = self.evaluator.with_model(model).metrics(1.0)
        if result.bma is not None:
            load_average(model, result.bma)
        after = last if result.bma is None else self.evaluator.with_model(model).metrics(1.0)
        description = model_description(model, run.model, classnames, template)
        metrics = {"before": self.before, "after": after, "last_iterate": last, "train": result.last_metrics,
                   "seconds": time.time() - started}
        save_checkpoint(self.folder, model, description, run.model_dump(mode="json"), metrics)
        return RunResult(self.folder, self.before, after, last, time.time() - started, result.last_metrics)
