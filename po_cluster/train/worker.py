"""The training worker: the single-process loop (`fit`), under DDP in a Ray Train worker
group or alone in a Ray Tune trial (po_cluster/train/session.py), resumed from the
trial's last checkpoint, with BMA weights reported to its session and resumable
checkpoints every N steps (a callback of the loop).

Each worker renders the same (deterministic) records and computes the text
embeddings and π_ref's log-probs once; the global batch of each step depends
only on (seed, step) and every worker takes its own shard of it.
"""
from __future__ import annotations

import os
import resource
import sys
import tempfile
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import ray
import ray.train.torch
import torch
import torch.distributed as dist

from po_cluster.config import DataConfig, RunConfig, SweepConfig, WorkerConfig
from po_cluster.evaluate.metrics import Evaluator
from po_cluster.model.checkpoint import model_description, save_checkpoint
from po_cluster.train.bma import BetaMovingAverage
from po_cluster.train.loop import (
    Callback,
    TrainData,
    TrainState,
    build_model,
    build_records,
    fit,
    held_out_sets,
    load_average,
    prepare_data,
    prompt_template,
    trainable_state,
    unwrap,
)
from po_cluster.train.phases import PhaseClock
from po_cluster.train.session import Session
from po_cluster.train.shared import SharedInputs
from po_cluster.train.state import load_train_state, save_train_state
from po_cluster.train.stream import StreamSource, worker_source

# What a run is chosen for, per world task: the accuracy on the hard case (the attacked images; the
# attribute on images that break the stereotype).
TASK_TARGETS = {"typographic": "attacked", "bias": "bias_counter"}


@dataclass(frozen=True)
class Objective:
    """The validation objective: the target accuracy, minus `clean_penalty` (`retention_penalty`) times
    the clean accuracy (the retention) lost beyond `tolerance`. Retention counts only where the sets
    have tasks to keep (the world's, not a dataset's). Where they have shapes with their own name
    written (`own_word`), accuracy on those below clean is clean accuracy lost too: a model that avoids
    the written word instead of ignoring it (docs/design.md, "Ignoring the word, not avoiding it")."""

    target: str = "attacked"
    tolerance: float = 0.02
    clean_penalty: float = 5.0
    retention_penalty: float = 5.0

    @classmethod
    def of(cls, cfg: WorkerConfig | SweepConfig, data: DataConfig) -> Objective:
        return cls(TASK_TARGETS[data.task], cfg.clean_tolerance, cfg.clean_penalty, cfg.retention_penalty)

    def score(self, metrics: dict[str, float], base: dict[str, float]) -> float:
        score = metrics[self.target] - self.clean_penalty * max(0.0, base["clean"] - metrics["clean"] - self.tolerance)
        if "own_word" in metrics:
            score -= self.clean_penalty * max(0.0, metrics["clean"] - metrics["own_word"] - self.tolerance)
        if "retention" in metrics and "retention" in base:
            score -= self.retention_penalty * max(0.0, base["retention"] - metrics["retention"] - self.tolerance)
        return score


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
        sets = held_out_sets(data, "val")
        evaluator = Evaluator.build(unwrap(model), sets, template=prompt_template(data))
        return cls(evaluator, evaluator.metrics(0.0))

    def metrics(self, model, bma) -> dict[str, float]:
        # With a frozen image tower only W changed: no validation image goes through the tower again.
        with averaged_weights(model, bma) as core:
            return self.start.with_model(core).metrics(1.0)


def _maybe_inject_failure(cfg: WorkerConfig, step: int, rank: int) -> None:
    """Test hook: crash this worker process once, hard, at a given step (marker file makes it once)."""
    if cfg.fail_at_step != step or cfg.fail_marker is None or rank != 0:
        return
    marker = Path(cfg.fail_marker)
    if not marker.exists():
        marker.write_text(f"crashed at step {step}\n")
        os._exit(1)


def _resume(model: torch.nn.Module, state: TrainState, session: Session) -> None:
    """Continue from the trial's last checkpoint, if Ray restored one (after a failure)."""
    with session.checkpoint() as folder:
        if folder is not None:
            state.step = load_train_state(folder, unwrap(model), state.optimizer, state.bma, state.precision)


def _peak_rss_mb() -> float:
    """This worker process's peak resident memory so far (Linux reports KiB, macOS bytes)."""
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak / (1 << 20) if sys.platform == "darwin" else peak / 1024


def _report(cfg: WorkerConfig, session: Session, model, state: TrainState, validation: Validation | None,
            train_metrics: dict, resumed_from: int, clock: PhaseClock) -> None:
    """All workers call report (it is a collective); rank 0 evaluates and writes the checkpoint.

    The phases are taken after this report's validation and checkpoint writing, before its
    hand-off to Ray (which the next report counts)."""
    step = state.step
    divergence = replica_divergence(model)
    if session.rank != 0:
        session.report({"step": step})
        return
    assert validation is not None, "rank 0 builds the validation sets (run_worker)"
    with clock.phase("validation"):
        metrics = validation.metrics(model, state.bma)
    score = Objective.of(cfg, cfg.run.data).score(metrics, validation.base)
    out = {**{f"val_{k}": v for k, v in metrics.items()}, "objective": score, "step": step,
           "base_val_clean": validation.base["clean"], "base_val_attacked": validation.base["attacked"],
           "replica_divergence": divergence, "resumed_from_step": resumed_from, **train_metrics,
           "torch_threads": torch.get_num_threads(), "peak_rss_mb": _peak_rss_mb()}
    with tempfile.TemporaryDirectory() as tmp:
        folder = None
        if step % cfg.checkpoint_every == 0 or step == cfg.run.training.steps:
            classnames = next(iter(validation.sets.values())).classnames
            folder = Path(tmp)
            with clock.phase("checkpoint"):
                _write_checkpoint(folder, model, state, cfg.run, out, classnames)
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


class WorkerCallback(Callback):
    """The worker's part of each step: its clock, the test failure, and every `report_every` steps
    (and at the last) the mean metrics across workers, validation and a checkpoint, reported."""

    def __init__(self, cfg: WorkerConfig, session: Session, model: torch.nn.Module, state: TrainState,
                 validation: Validation | None, clock: PhaseClock, tower: TowerImages | None = None) -> None:
        self.cfg, self.model, self.state, self.validation, self.clock = cfg, model, state, validation, clock
        self.session = session
        self.tower = tower
        self.resumed_from = state.step
        self.device = next(model.parameters()).device

    def on_step_begin(self, step: int) -> None:
        self.clock.start("train_steps")

    def on_step_end(self, step: int, metrics: dict[str, float]) -> None:
        self.clock.stop("train_steps")
        _maybe_inject_failure(self.cfg, step, self.session.rank)
        if step % self.cfg.report_every == 0 or step == self.cfg.run.training.steps:
            metrics = _mean_across_workers(metrics, self.device)
            if self.tower is not None:  # this worker's own count, not a mean
                metrics["image_tower_images"] = float(self.tower.images)
            _report(self.cfg, self.session, self.model, self.state, self.validation, metrics, self.resumed_from,
                    self.clock)


def _training_data(model, run: RunConfig, shared: SharedInputs | None, rank: int,
                   world_size: int) -> TrainData | StreamSource:
    """This worker's stream of the dataset's shards, the sweep's shared records, or its own."""
    if run.data.streaming:
        return worker_source(model, run, prompt_template(run.data), rank, world_size,
                             shared.val_text_emb["clean"] if shared is not None else None)
    if shared is not None:
        return shared.train_data(model.image_tower_frozen)
    return prepare_data(model, *build_records(run.data), prompt_template(run.data))


def run_worker(config: dict, session: Session, shared_ref: ray.ObjectRef | None) -> None:
    """Validate the config at the edge, build the model, data and validation, resume, and fit. Ray
    calls it through po_cluster/train/entry.py: config = WorkerConfig as a dict, `shared_ref` the
    sweep's SharedInputs (po_cluster/train/shared.py), if any."""
    cfg = WorkerConfig.model_validate(config)
    clock = PhaseClock(cfg.trial_started_at)
    run = cfg.run
    rank, world_size = session.rank, session.world_size
    torch.manual_seed(run.training.seed)
    with clock.phase("model_load"):
        model = build_model(run, session.device)
    tower = TowerImages(model)
    with clock.phase("data_prep"):
        shared: SharedInputs | None = ray.get(shared_ref) if shared_ref is not None else None
        data = _training_data(model, run, shared, rank, world_size)
    with clock.phase("validation_build"):
        validation = None if rank != 0 else \
            Validation.of_shared(model, shared) if shared is not None else Validation.of_start(model, run.data)
    state = TrainState.start(model, run)
    _resume(model, state, session)
    ddp = ray.train.torch.prepare_model(model) if world_size > 1 else model
    fit(ddp, data, run, [WorkerCallback(cfg, session, ddp, state, validation, clock, tower)], state, rank, world_size)
