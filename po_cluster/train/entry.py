"""The functions Ray calls to train: `train_loop_per_worker` in a Ray Train worker, and
`train_in_trial` in a Ray Tune trial that trains itself (`trial_runner: tune`).

This module imports nothing heavy, on purpose. Ray pickles these functions by reference, so
the process that builds a trainer imports the module that defines them. A sweep's trial
process only builds a TorchTrainer and waits on it. If these functions lived in
po_cluster/train/worker.py, that process would import open_clip and torchvision as well
(which pulls in torch._dynamo): seconds of CPU and about 250 MB more for every trial. The
worker's code is imported where it runs.
"""
from __future__ import annotations

SHARED_INPUTS_KEY = "shared_inputs"  # beside the WorkerConfig in train_loop_config: an ObjectRef


def train_loop_per_worker(config: dict) -> None:
    """Ray Train entry: config = WorkerConfig as a dict, and under SHARED_INPUTS_KEY the ObjectRef of
    the sweep's SharedInputs (po_cluster/train/shared.py), if any."""
    from po_cluster.train.session import TrainSession
    from po_cluster.train.worker import run_worker

    run_worker(_without_key(config), TrainSession(), config.get(SHARED_INPUTS_KEY))


def train_in_trial(config: dict) -> None:
    """The same worker in the Ray Tune trial itself (`trial_runner: tune`), with the same config."""
    from po_cluster.train.session import TuneSession
    from po_cluster.train.worker import run_worker

    run_worker(_without_key(config), TuneSession(), config.get(SHARED_INPUTS_KEY))


def _without_key(config: dict) -> dict:
    return {k: v for k, v in config.items() if k != SHARED_INPUTS_KEY}
