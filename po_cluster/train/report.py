"""What a trial reports, every `reporting.report_every` steps and at the last: the training metrics
averaged across workers, the validation metrics of its BMA weights and the objective, where its
time went (po_cluster/train/phases.py), and every `checkpoint_every` steps a resumable checkpoint,
through its session (po_cluster/train/session.py). A callback of the loop; plain torch, so the
same code reports to Ray Train, Ray Tune, or a list in this process.

Reporting is a collective: every worker calls it, rank 0 evaluates and writes the checkpoint.
"""
from __future__ import annotations

import resource
import sys
import tempfile
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.distributed as dist

from po_cluster.config import DataConfig, RunConfig, TrainJobConfig
from po_cluster.data.selection import held_out_sets, prompt_template
from po_cluster.evaluate.metrics import Evaluator
from po_cluster.evaluate.objective import Objective
from po_cluster.model.checkpoint import model_description, save_checkpoint
from po_cluster.train.bma import BetaMovingAverage
from po_cluster.train.callbacks import Callback
from po_cluster.train.inputs import SharedInputs
from po_cluster.train.loop import TrainState, load_average, trainable_state, unwrap
from po_cluster.train.phases import PhaseClock
from po_cluster.train.session import Session
from po_cluster.train.state import save_train_state


def _mean_across_workers(values: dict[str, float], device: torch.device) -> dict[str, float]:
    if not dist.is_initialized():
        return values
    keys = sorted(values)
    tensor = torch.tensor([values[k] for k in keys], dtype=torch.float64, device=device)
    dist.all_reduce(tensor)
    return dict(zip(keys, (tensor / dist.get_world_size()).tolist(), strict=True))


def replica_divergence(model: torch.nn.Module) -> float:
    """max |θ_rank − θ_rank0| over trainable parameters and workers: 0 when DDP keeps replicas in sync."""
    if not dist.is_initialized():
        return 0.0
    worst = torch.zeros((), dtype=torch.float64, device=next(model.parameters()).device)
    for p in (p for p in model.parameters() if p.requires_grad):
        reference = p.detach().clone()
        dist.broadcast(reference, src=0)
        worst = torch.maximum(worst, (p.detach() - reference).abs().max().double())
    dist.all_reduce(worst, op=dist.ReduceOp.MAX)
    return float(worst)


@contextmanager
def averaged_weights(model: torch.nn.Module, bma: BetaMovingAverage | None):
    """Temporarily swap the BMA weights in (what a trial reports and saves); the iterate comes back after."""
    core = unwrap(model)
    last = {n: t.clone() for n, t in trainable_state(core).items()}
    if bma is not None:
        load_average(core, bma)
    try:
        yield core
    finally:
        with torch.no_grad():
            params = dict(core.named_parameters())
            for name, value in last.items():
                params[name].copy_(value)


def _write_checkpoint(folder: Path, model, state: TrainState, cfg: RunConfig, metrics: dict,
                      classnames: tuple[str, ...]) -> None:
    save_train_state(folder, state.step, unwrap(model), state.optimizer, state.bma, state.precision)
    with averaged_weights(model, state.bma) as core:
        description = model_description(core, cfg.model, classnames, prompt_template(cfg.data))
        save_checkpoint(folder, core, description, cfg.model_dump(mode="json"), {**metrics, "step": state.step})


@dataclass
class Validation:
    """The validation sets, embedded by the starting model (π_ref's log-probs on their clean images
    with them), and the base model's metrics."""

    start: Evaluator
    base: dict[str, float]

    @property
    def sets(self) -> dict:
        return self.start.sets

    @classmethod
    def of_shared(cls, model, shared: SharedInputs) -> Validation:
        return cls(shared.evaluator(unwrap(model)), dict(shared.base_metrics))

    @classmethod
    def of_start(cls, model, data: DataConfig) -> Validation:
        core = unwrap(model)
        sets = held_out_sets(data, "val", core.preprocess.geometry)
        evaluator = Evaluator.build(core, sets, template=prompt_template(data))
        return cls(evaluator, evaluator.metrics(0.0))

    def metrics(self, model, bma) -> dict[str, float]:
        # With a frozen image tower only W changed: no validation image goes through the tower again.
        with averaged_weights(model, bma) as core:
            return self.start.with_model(core).metrics(1.0)


def _peak_rss_mb() -> float:
    """This worker process's peak resident memory so far (Linux reports KiB, macOS bytes)."""
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak / (1 << 20) if sys.platform == "darwin" else peak / 1024


def _report(job: TrainJobConfig, session: Session, model, state: TrainState, validation: Validation | None,
            train_metrics: dict, resumed_from: int, clock: PhaseClock) -> None:
    """All workers call report (it is a collective); rank 0 evaluates and writes the checkpoint.

    The phases are taken after this report's validation and checkpoint writing, before its
    hand-off to the session (which the next report counts)."""
    step = state.step
    divergence = replica_divergence(model)
    if session.rank != 0:
        session.report({"step": step})
        return
    assert validation is not None and job.reporting is not None, "rank 0 of a reporting run validates"
    with clock.phase("validation"):
        metrics = validation.metrics(model, state.bma)
    score = Objective.of(job.objective, job.run.data).score(metrics, validation.base)
    out = {**{f"val_{k}": v for k, v in metrics.items()}, "objective": score, "step": step,
           "base_val_clean": validation.base["clean"], "base_val_attacked": validation.base["attacked"],
           "replica_divergence": divergence, "resumed_from_step": resumed_from, **train_metrics,
           "torch_threads": torch.get_num_threads(), "peak_rss_mb": _peak_rss_mb()}
    with tempfile.TemporaryDirectory() as tmp:
        folder = None
        if step % job.reporting.checkpoint_every == 0 or step == job.run.training.steps:
            classnames = next(iter(validation.sets.values())).classnames
            folder = Path(tmp)
            with clock.phase("checkpoint"):
                _write_checkpoint(folder, model, state, job.run, out, classnames)
        out.update(clock.summary())
        with clock.phase("checkpoint"):
            session.report(out, folder)


class TowerImages:
    """How many images went through this worker's image tower (a forward pre-hook): 0 for a trial of a
    frozen tower that got the sweep's shared inputs, which is what sharing them is for."""

    def __init__(self, model: torch.nn.Module) -> None:
        self.images = 0
        unwrap(model).clip.visual.register_forward_pre_hook(self._count)

    def _count(self, module: torch.nn.Module, args: tuple) -> None:
        self.images += len(args[0]) if args else 0


class StepTimer(Callback):
    """Counts the training steps' time into the clock's `train_steps` phase; the loop's first callback."""

    def __init__(self, clock: PhaseClock) -> None:
        self.clock = clock

    def on_step_begin(self, step: int) -> None:
        self.clock.start("train_steps")

    def on_step_end(self, step: int, metrics: dict[str, float]) -> None:
        self.clock.stop("train_steps")


class ReportCallback(Callback):
    """Every `reporting.report_every` steps (and at the last): the mean metrics across workers,
    validation and a checkpoint, reported to the session. The loop's last callback."""

    def __init__(self, job: TrainJobConfig, session: Session, model: torch.nn.Module, state: TrainState,
                 validation: Validation | None, clock: PhaseClock, tower: TowerImages | None = None) -> None:
        if job.reporting is None:
            raise ValueError("a ReportCallback needs the job's reporting section")
        self.job, self.every, self.model, self.state = job, job.reporting.report_every, model, state
        self.session, self.validation, self.clock, self.tower = session, validation, clock, tower
        self.resumed_from = state.step
        self.device = next(model.parameters()).device

    def on_step_end(self, step: int, metrics: dict[str, float]) -> None:
        if step % self.every == 0 or step == self.job.run.training.steps:
            metrics = _mean_across_workers(metrics, self.device)
            if self.tower is not None:  # this worker's own count, not a mean
                metrics["image_tower_images"] = float(self.tower.images)
            _report(self.job, self.session, self.model, self.state, self.validation, metrics, self.resumed_from,
                    self.clock)
