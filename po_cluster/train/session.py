"""Where a training worker runs, and so whom it reports to: a Ray Train worker (one of a
TorchTrainer's group) or a Ray Tune trial itself.

The worker (po_cluster/train/worker.py) is the same loop in both; only these four things differ.
A trial of a frozen image tower trains W alone on the sweep's shared embeddings: a fraction of a
second per hundred steps, against the ~7 s a TorchTrainer's controller and worker group take to
start. Such trials run in the Tune trial (`trial_runner: tune`), which Tune packs by the fractions
of a CPU or GPU they ask, restarts after a failure, and resumes from their last checkpoint.
"""
from __future__ import annotations

from collections.abc import Iterator
from contextlib import AbstractContextManager, contextmanager
from pathlib import Path
from typing import Protocol

import ray
import ray.train
import ray.train.torch
import torch
from ray import tune


class Session(Protocol):
    rank: int
    world_size: int
    device: torch.device

    def report(self, metrics: dict, folder: Path | None = None) -> None:
        """Report `metrics`, and the checkpoint in `folder` (persisted before this returns)."""

    def checkpoint(self) -> AbstractContextManager[Path | None]:
        """A context manager: the folder of the run's last checkpoint, or None on a fresh start."""


@contextmanager
def _as_folder(checkpoint) -> Iterator[Path | None]:
    """A Train or Tune checkpoint (the same class) as a local folder, or None."""
    if checkpoint is None:
        yield None
        return
    with checkpoint.as_directory() as folder:
        yield Path(folder)


class TrainSession:
    """A Ray Train worker: DDP ranks, Train's device, reports through `ray.train.report`."""

    def __init__(self) -> None:
        ctx = ray.train.get_context()
        self.rank, self.world_size = ctx.get_world_rank(), ctx.get_world_size()
        self.device = ray.train.torch.get_device()

    def report(self, metrics: dict, folder: Path | None = None) -> None:
        ray.train.report(metrics, checkpoint=ray.train.Checkpoint.from_directory(folder) if folder else None)

    def checkpoint(self) -> AbstractContextManager[Path | None]:
        return _as_folder(ray.train.get_checkpoint())


class TuneSession:
    """A Ray Tune trial that trains in its own process: one rank, the GPU Tune gave it if any."""

    rank, world_size = 0, 1

    def __init__(self) -> None:
        # Tune sets CUDA_VISIBLE_DEVICES to the trial's GPUs (a fraction shares one): the first is ours
        self.device = torch.device("cuda:0") if ray.get_gpu_ids() and torch.cuda.is_available() \
            else torch.device("cpu")

    def report(self, metrics: dict, folder: Path | None = None) -> None:
        tune.report(metrics, checkpoint=tune.Checkpoint.from_directory(folder) if folder else None)

    def checkpoint(self) -> AbstractContextManager[Path | None]:
        return _as_folder(tune.get_checkpoint())
