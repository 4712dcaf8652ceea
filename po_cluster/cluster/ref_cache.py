"""The π_ref cache (po_cluster/train/ref_cache.py) of a Ray run or sweep, computed in one Ray task
before any worker starts."""
from __future__ import annotations

import torch

from po_cluster.config import RunConfig, ScalingConfig
from po_cluster.model.aligned import AlignedCLIP
from po_cluster.model.loading import load_clip
from po_cluster.train.ref_cache import find_ref_cache, ref_cache


def _computed_in_task(run: RunConfig, template: str) -> dict | None:
    frozen = run.model.model_copy(update={"image_tower": "frozen"})
    device = torch.device("cuda") if torch.cuda.is_available() else torch.device("cpu")
    return ref_cache(AlignedCLIP(load_clip(frozen), "frozen").to(device), run, template)


def ensure_ref_cache(run: RunConfig, scaling: ScalingConfig, template: str) -> dict | None:
    """The cache for a Ray run or sweep: read when there, else computed in one Ray task with a trial
    worker's resources (on a GPU when the workers have one), before any worker starts."""
    import ray

    found = find_ref_cache(run, template)[1]
    if found is not None:
        return found
    gpus = scaling.gpus_per_worker if scaling.use_gpu else 0
    task = ray.remote(_computed_in_task).options(num_cpus=max(scaling.cpus_per_worker, 0.01), num_gpus=gpus,
                                                 name="po-cluster.ref_cache")
    return ray.get(task.remote(run, template))
