"""One trial of a sweep, in the Ray Tune trial's own process: its run settings from the sample,
and the TorchTrainer it builds and waits on (or, with `trial_runner: tune`, the worker it runs
itself). Ray's RunConfig (and ScalingConfig) are written qualified, `ray.train.…`: ours is a run's.

Every trial starts a new process that imports this module, so it imports only what building a
trainer needs (Ray Tune, Ray Train's TorchTrainer and torch, the configs): not Optuna, tracking,
or the training code (open_clip, torchvision), whose import would cost every trial seconds and
memory (docs/cluster.md). What only some trials need (a streamed dataset's π_ref cache, training
in the trial) is imported where it is used.
"""
from __future__ import annotations

import time
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING

import ray
import ray.train
from ray import tune
from ray.train.torch import TorchTrainer
from ray.tune.integration.ray_train import TuneReportCallback

from po_cluster.config import RunConfig, ScalingConfig, SweepConfig, TrainJobConfig
from po_cluster.data.stream_rows import dataset_meta, needs_pixels, passes_needed, ray_datasets
from po_cluster.sweep.space import tower_choices

if TYPE_CHECKING:
    from po_cluster.train.callbacks import Callback
from po_cluster.cluster.entry import job_config, train_in_trial, train_loop_per_worker


def local_or_uri(path: str) -> str:
    """Ray wants absolute local paths; URIs (s3://) pass through."""
    return path if "://" in path else str(Path(path).expanduser().resolve())


def trial_run_config(cfg: SweepConfig, sample: dict, trial_id: str) -> RunConfig:
    """The base run with a trial's sample applied, validated like any user config."""
    run = cfg.base.model_dump(mode="json")
    run["name"] = trial_id
    run["loss"].update({k: sample[k] for k in ("loss_type", "beta", "kl_weight")})
    if "lr" in sample:
        run["optimizer"]["lr"] = sample["lr"]
    if "image_tower" in sample:
        tower = tower_choices(cfg)[sample["image_tower"]]
        run["model"]["image_tower"] = tower if isinstance(tower, str) else tower.model_dump(mode="json")
    return RunConfig.model_validate(run)


def trial_settings(sweep: dict, sample: dict) -> dict:
    """A trial's whole run settings as JSON (what its tracking run records as parameters)."""
    return trial_run_config(SweepConfig.model_validate(sweep), sample, "trial").model_dump(mode="json")


def scaling_config(s: ScalingConfig) -> ray.train.ScalingConfig:
    resources = {"CPU": s.cpus_per_worker, **s.resources_per_worker}
    if s.use_gpu:
        resources["GPU"] = s.gpus_per_worker
    return ray.train.ScalingConfig(num_workers=s.num_workers, use_gpu=s.use_gpu, resources_per_worker=resources)


def fit_trial(job: TrainJobConfig, scaling: ScalingConfig, storage_path: str, name: str, max_failures: int,
              callbacks: list | None = None, filesystem=None, shared: ray.ObjectRef | None = None,
              train_callbacks: Sequence[Callback] = ()) -> ray.train.Result:
    """One Ray Train run; a run of the same name in the same storage resumes from its last checkpoint.

    `storage_path` is a local folder, or a path of `filesystem` (e.g. pyarrow S3: "bucket/prefix");
    `callbacks` Ray Train's run callbacks; `shared` the sweep's SharedInputs (po_cluster/cluster/shared.py),
    which every worker reads; `train_callbacks` callbacks every worker adds to its loop (a test's failure).
    """
    trainer = TorchTrainer(
        train_loop_per_worker,
        train_loop_config=job_config(job, shared, train_callbacks),
        datasets=streamed_datasets(job.run, scaling),
        scaling_config=scaling_config(scaling),
        run_config=ray.train.RunConfig(
            name=name, storage_path=storage_path if filesystem is not None else local_or_uri(storage_path),
            storage_filesystem=filesystem,
            failure_config=ray.train.FailureConfig(max_failures=max_failures),
            checkpoint_config=ray.train.CheckpointConfig(num_to_keep=2),
            callbacks=callbacks or [],
        ),
    )
    return trainer.fit()


def streamed_datasets(run: RunConfig, scaling: ScalingConfig) -> dict | None:
    """The Ray Data datasets a streaming run's workers read (po_cluster/cluster/stream.py), their rows
    with π_ref from the dataset's π_ref cache (computed first when it is not there), else None."""
    if not run.data.streaming:
        return None
    location, t = str(run.data.dataset), run.training
    meta = dataset_meta(location)
    passes = {"pref": passes_needed(meta, "pref", t.steps, t.batch_size),
              "reg": passes_needed(meta, "reg", t.steps, t.reg_batch_size)}
    from po_cluster.cluster.ref_cache import ensure_ref_cache  # the model's code: only where a stream needs π_ref
    from po_cluster.data.pairs import dataset_geometry
    from po_cluster.data.selection import prompt_template
    from po_cluster.model.loading import resolve_preprocess

    model = run.model
    geometry = dataset_geometry(meta, resolve_preprocess(model.name, model.pretrained, model.preprocess).geometry,
                                location)
    ref = ensure_ref_cache(run, scaling, prompt_template(run.data))
    return ray_datasets(location, meta, geometry, scaling.data_cpus, passes, t.seed, ref,
                        needs_pixels(run.model.image_tower, ref))


def trial_driver(sample: dict, sweep: dict, filesystem=None, root: str = "",
                 shared: list[ray.ObjectRef] | None = None) -> None:
    """The Tune trainable: build and fit one TorchTrainer for this trial, in the sweep's storage, or
    with `trial_runner: tune` train here, in the trial (po_cluster/cluster/session.py)."""
    started_at = time.time()  # the worker's phases (po_cluster/train/phases.py) count from here
    cfg = SweepConfig.model_validate(sweep)
    trial_id = tune.get_context().get_trial_id()
    job = TrainJobConfig(run=trial_run_config(cfg, sample, trial_id), objective=cfg.objective,
                         reporting=cfg.reporting, trial_started_at=started_at)
    if cfg.trial_runner == "tune":
        train_in_trial(job_config(job, shared[0] if shared else None))
        return
    fit_trial(job, cfg.scaling, f"{root.rstrip('/')}/{cfg.name}/trials", trial_id, cfg.max_failures,
              [TuneReportCallback()], filesystem, shared[0] if shared else None)
