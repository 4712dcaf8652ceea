"""Where a run trains, and so whom it reports to: the one thing that differs between `po-cluster
train` (this process alone, `LocalSession`), a Ray Train worker and a Ray Tune trial
(po_cluster/cluster/session.py). The run itself (po_cluster/train/run.py) is the same code.
"""
from __future__ import annotations

from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Protocol

import torch

from po_cluster.config import RunConfig
from po_cluster.data.records import ImageSet
from po_cluster.model.aligned import AlignedCLIP
from po_cluster.train.batch import BatchSource
from po_cluster.train.loop import resolve_device

if TYPE_CHECKING:
    from po_cluster.train.inputs import SharedInputs


class Session(Protocol):
    """What a run asks of where it runs.

    `shared`: the sweep's inputs computed once for every trial (po_cluster/train/inputs.py), or None
    to compute them here. `final_checkpoint`: where this process saves the run's final checkpoint
    itself, scored on `test_sets` (None: the run's test split) before and after training; None where
    the session's reports carry the checkpoints (Train, Tune)."""

    rank: int
    world_size: int
    device: torch.device
    final_checkpoint: Path | None
    test_sets: dict[str, ImageSet] | None

    @property
    def shared(self) -> SharedInputs | None: ...

    def report(self, metrics: dict, folder: Path | None = None) -> None:
        """Report `metrics`, and the checkpoint in `folder` (persisted before this returns)."""

    def checkpoint(self) -> AbstractContextManager[Path | None]:
        """A context manager: the folder of the run's last checkpoint, or None on a fresh start."""

    def prepare_model(self, model: AlignedCLIP) -> torch.nn.Module:
        """The model as the loop trains it: wrapped for data parallelism across a group, else itself."""

    def stream(self, model: AlignedCLIP, run: RunConfig, template: str) -> BatchSource:
        """This process's stream of the dataset's train split (`data.streaming`)."""


@dataclass
class LocalSession:
    """This process alone: rank 0 of 1, on the run's device, nothing to resume from; reports are kept
    in `reports` (a run with `reporting` reports here), and the final checkpoint is saved to
    `final_checkpoint`."""

    device: torch.device
    final_checkpoint: Path | None = None
    test_sets: dict[str, ImageSet] | None = None
    reports: list[dict] = field(default_factory=list)
    rank: int = 0
    world_size: int = 1
    shared: SharedInputs | None = None

    @classmethod
    def for_run(cls, run: RunConfig, test_sets: dict[str, ImageSet] | None = None) -> LocalSession:
        """The run's device, and its checkpoint in <output_dir>/<name>."""
        return cls(resolve_device(run.training.device), Path(run.output_dir) / run.name, test_sets)

    def report(self, metrics: dict, folder: Path | None = None) -> None:
        self.reports.append(dict(metrics))  # the folder is the caller's to delete: only the metrics are kept

    def checkpoint(self) -> AbstractContextManager[Path | None]:
        return nullcontext(None)

    def prepare_model(self, model: AlignedCLIP) -> torch.nn.Module:
        return model

    def stream(self, model: AlignedCLIP, run: RunConfig, template: str) -> BatchSource:
        from po_cluster.train.stream import local_source

        return local_source(model, run, template)
