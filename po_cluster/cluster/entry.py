"""The functions Ray calls to train: `train_loop_per_worker` in a Ray Train worker, and
`train_in_trial` in a Ray Tune trial that trains itself (`trial_runner: tune`). Both validate the
job at the edge and call the one training function (po_cluster/train/run.py) with their session.

This module imports nothing heavy, on purpose. Ray pickles these functions by reference, so
the process that builds a trainer imports the module that defines them. A sweep's trial
process only builds a TorchTrainer and waits on it. If these functions lived beside the
training code, that process would import open_clip and torchvision as well (which pulls in
torch._dynamo), in every trial. The training code is imported where it runs.

What Ray hands them is `job_config(...)`: the TrainJobConfig as JSON and, beside it, the sweep's
shared inputs by reference (SHARED_INPUTS_KEY) and the callbacks to add to the loop
(CALLBACKS_KEY: objects of light modules, such as a test's po_cluster.train.callbacks.CrashOnce).
"""
from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from po_cluster.config import TrainJobConfig
    from po_cluster.train.callbacks import Callback

SHARED_INPUTS_KEY = "shared_inputs"  # an ObjectRef of the sweep's SharedInputs (po_cluster/cluster/shared.py)
CALLBACKS_KEY = "callbacks"  # a list of po_cluster.train.callbacks.Callback objects
_EXTRAS = (SHARED_INPUTS_KEY, CALLBACKS_KEY)


def job_config(job: TrainJobConfig, shared: Any = None, callbacks: Sequence[Callback] = ()) -> dict:
    """What the entry functions take: the job as JSON, the shared inputs' ObjectRef and the callbacks."""
    config = job.model_dump(mode="json")
    if shared is not None:
        config[SHARED_INPUTS_KEY] = shared
    if callbacks:
        config[CALLBACKS_KEY] = list(callbacks)
    return config


def train_loop_per_worker(config: dict) -> None:
    """Ray Train entry (config: `job_config(...)`)."""
    from po_cluster.cluster.session import TrainSession

    _train(config, TrainSession)


def train_in_trial(config: dict) -> None:
    """The same training in the Ray Tune trial itself (`trial_runner: tune`), with the same config."""
    from po_cluster.cluster.session import TuneSession

    _train(config, TuneSession)


def _train(config: dict, session_type: Any) -> None:
    from po_cluster.config import TrainJobConfig
    from po_cluster.train.run import train

    job = TrainJobConfig.model_validate({k: v for k, v in config.items() if k not in _EXTRAS})
    train(job, session_type(config.get(SHARED_INPUTS_KEY)), config.get(CALLBACKS_KEY, ()))
