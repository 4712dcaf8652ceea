"""The sweep's shared inputs (po_cluster/train/inputs.py), computed once in a Ray task and handed to
every trial by reference."""
from __future__ import annotations

from typing import Any

from po_cluster.config import RunConfig, ScalingConfig
from po_cluster.train.inputs import SharedInputs, compute_shared_inputs


def _computed(run: RunConfig) -> tuple[dict, SharedInputs]:
    """The task's two returns: a small summary the driver waits on, and the inputs themselves."""
    inputs = compute_shared_inputs(run)
    return {"train_records": 0 if inputs.data is None else len(inputs.data.pref)}, inputs


def shared_inputs(run: RunConfig, scaling: ScalingConfig):
    """Compute the shared inputs in one Ray task (a trial worker's resources, so on a GPU when the
    trials have one) and wait for it; returns the inputs' ObjectRef, owned by the caller (the sweep
    driver), so they live as long as the sweep.

    The driver waits before any trial starts: a task still queued while the trials' workers hold
    every CPU, each waiting for its result, would never run. A task that fails (a dataset that
    cannot be read) fails the sweep here, once, with its error. Only the summary reaches the
    driver; the inputs stay in the object store."""
    import ray

    gpus = scaling.gpus_per_worker if scaling.use_gpu else 0
    task = ray.remote(_computed).options(num_cpus=max(scaling.cpus_per_worker, 0.01), num_gpus=gpus,
                                         num_returns=2, name="po-cluster.shared_inputs")
    refs: Any = task.remote(run)  # num_returns=2: two ObjectRefs (Ray's stubs see one)
    summary, inputs = refs
    ray.get(summary)
    return inputs
