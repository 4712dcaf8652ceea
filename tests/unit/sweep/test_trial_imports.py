"""What a sweep's trial process imports. Tune starts a new process for every trial, which imports
po_cluster/sweep/trial.py to build the trial's TorchTrainer: what it imports costs CPU and memory
on every trial (docs/cluster.md)."""
from __future__ import annotations

import subprocess
import sys

# The model's code (open_clip, torchvision and torch._dynamo), the sweep's driver and tracking.
HEAVY = ("open_clip", "torchvision", "mlflow", "po_cluster.train.run",
         "po_cluster.train.loop", "po_cluster.sweep.driver", "po_cluster.tracking.sweep")


def imported_after(module: str, names: tuple[str, ...]) -> list[str]:
    """Which of `names` a fresh interpreter holds after importing `module`."""
    probe = f"import sys, {module}; print(','.join(m for m in {names!r} if m in sys.modules))"
    out = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, check=True)
    return [m for m in out.stdout.strip().split(",") if m]


def test_a_trials_process_imports_no_model_code():
    assert imported_after("po_cluster.sweep.trial", HEAVY) == []


def test_the_train_entry_imports_neither_torch_nor_the_worker():
    """Ray pickles the entry functions by reference: whoever builds a trainer imports their module."""
    assert imported_after("po_cluster.cluster.entry", ("torch", *HEAVY)) == []


def test_the_sweep_driver_still_does():
    """The probe can fail: the driver imports what the trial process must not."""
    assert "po_cluster.train.loop" in imported_after("po_cluster.sweep.driver", HEAVY)
