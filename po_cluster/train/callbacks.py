"""Hooks around each training step, named after transformers' TrainerCallback.

This module imports nothing but the standard library: a callback travels in a Ray entry's
config (po_cluster/cluster/entry.py), so the process that unpickles it imports its module.
Batches never depend on a callback.
"""
from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path


class Callback:
    """Does nothing at each hook; a callback overrides the hooks it needs. The single-process run shows
    progress with one; a trial reports and checkpoints with one (po_cluster/train/report.py)."""

    def on_step_begin(self, step: int) -> None:
        pass

    def on_step_end(self, step: int, metrics: dict[str, float]) -> None:
        pass


class ProgressCallback(Callback):
    """Calls `progress(step, metrics)` after each step (a progress bar's update)."""

    def __init__(self, progress: Callable[[int, dict[str, float]], None]) -> None:
        self.progress = progress

    def on_step_end(self, step: int, metrics: dict[str, float]) -> None:
        self.progress(step, metrics)


class CrashOnce(Callback):
    """Failure injection for the resilience tests: kill this process, hard, after `step` on rank 0, once
    (the `marker` file, written first, records that it happened, so the restarted worker goes on).
    Never part of a config: a test hands it to the Ray entry with the job (po_cluster/cluster/entry.py)."""

    def __init__(self, step: int, marker: str | Path) -> None:
        self.step, self.marker = step, Path(marker)

    def on_step_end(self, step: int, metrics: dict[str, float]) -> None:
        if step != self.step or _rank() != 0 or self.marker.exists():
            return
        self.marker.write_text(f"crashed at step {step}\n")
        os._exit(1)


def _rank() -> int:
    """This process's rank in its training group (0 alone). Imported here: this module stays light."""
    import torch.distributed as dist

    return dist.get_rank() if dist.is_available() and dist.is_initialized() else 0
