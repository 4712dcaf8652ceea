"""The sessions of a run on Ray (po_cluster/train/session.py): a Ray Train worker (one of a
TorchTrainer's group) or a Ray Tune trial itself.

A trial of a frozen image tower trains W alone on the sweep's shared embeddings: a small fraction
of what a TorchTrainer's controller and worker group take to start. Such trials run in the Tune
trial (`trial_runner: tune`), which Tune packs by the fractions of a CPU or GPU they ask, restarts
after a failure, and resumes from their last checkpoint.
"""
from __future__ import annotations

from collections.abc import Iterator
from contextlib import AbstractContextManager, contextmanager
from pathlib import Path

import ray
import ray.train
import ray.train.torch
import torch
from ray import tune

from po_cluster.config import RunConfig
from po_cluster.data.records import ImageSet
from po_cluster.model.aligned import AlignedCLIP
from po_cluster.train.batch import BatchSource
from po_cluster.train.inputs import SharedInputs


@contextmanager
def _as_folder(checkpoint) -> Iterator[Path | None]:
    """A Train or Tune checkpoint (the same class) as a local folder, or None."""
    if checkpoint is None:
        yield None
        return
    with checkpoint.as_directory() as folder:
        yield Path(folder)


class _RaySession:
    """What Train's and Tune's sessions share: the sweep's inputs, if any, and no final checkpoint of
    their own (their reports carry the checkpoints)."""

    rank: int
    world_size: int
    device: torch.device
    final_checkpoint: Path | None = None
    test_sets: dict[str, ImageSet] | None = None

    def __init__(self, shared_ref: ray.ObjectRef | None = None) -> None:
        self._shared_ref, self._shared = shared_ref, None

    @property
    def shared(self) -> SharedInputs | None:
        """The sweep's inputs, fetched from the object store on first use (in the run's data_prep phase)."""
        if self._shared is None and self._shared_ref is not None:
            self._shared = ray.get(self._shared_ref)
        return self._shared

    def prepare_model(self, model: AlignedCLIP) -> torch.nn.Module:
        """DDP across the worker group (Train's own wrapping), the model itself alone."""
        return ray.train.torch.prepare_model(model) if self.world_size > 1 else model

    def stream(self, model: AlignedCLIP, run: RunConfig, template: str) -> BatchSource:
        """This worker's shard of the trainer's Ray Data datasets (po_cluster/cluster/stream.py)."""
        from po_cluster.cluster.stream import worker_source

        text_emb = self.shared.val_text_emb["clean"] if self.shared is not None else None
        return worker_source(model, run, template, self.rank, self.world_size, text_emb)


class TrainSession(_RaySession):
    """A Ray Train worker: DDP ranks, Train's device, reports through `ray.train.report`."""

    def __init__(self, shared_ref: ray.ObjectRef | None = None) -> None:
        super().__init__(shared_ref)
        ctx = ray.train.get_context()
        self.rank, self.world_size = ctx.get_world_rank(), ctx.get_world_size()
        self.device = ray.train.torch.get_device()

    def report(self, metrics: dict, folder: Path | None = None) -> None:
        ray.train.report(metrics, checkpoint=ray.train.Checkpoint.from_directory(folder) if folder else None)

    def checkpoint(self) -> AbstractContextManager[Path | None]:
        return _as_folder(ray.train.get_checkpoint())


class TuneSession(_RaySession):
    """A Ray Tune trial that trains in its own process: one rank, the GPU Tune gave it if any."""

    def __init__(self, shared_ref: ray.ObjectRef | None = None) -> None:
        super().__init__(shared_ref)
        self.rank, self.world_size = 0, 1
        # Tune sets CUDA_VISIBLE_DEVICES to the trial's GPUs (a fraction shares one): the first is ours
        self.device = torch.device("cuda:0") if ray.get_gpu_ids() and torch.cuda.is_available() \
            else torch.device("cpu")

    def report(self, metrics: dict, folder: Path | None = None) -> None:
        tune.report(metrics, checkpoint=tune.Checkpoint.from_directory(folder) if folder else None)

    def checkpoint(self) -> AbstractContextManager[Path | None]:
        return _as_folder(tune.get_checkpoint())
