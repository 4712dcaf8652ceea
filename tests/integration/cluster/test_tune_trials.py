"""Frozen-tower trials that train in the Ray Tune trial itself (`trial_runner: tune`): packed
several to a CPU, resumed exactly after a crash, and averaged into a release like any sweep's."""
import json
from pathlib import Path

import pytest
import torch
from ray import tune

from po_cluster.cluster.entry import job_config, train_in_trial
from po_cluster.config import ReportingConfig, SweepConfig, TrainJobConfig, parse_config
from po_cluster.data.selection import build_records
from po_cluster.evaluate.report import peak_overlap
from po_cluster.model.checkpoint import load_checkpoint, verify_manifest
from po_cluster.pipelines import run_average
from po_cluster.sweep.driver import max_concurrent_trials, run_sweep
from po_cluster.train.callbacks import CrashOnce
from po_cluster.train.loop import build_model, fit, load_average, prepare_data
from po_cluster.train.phases import STARTED_KEY, TRIAL_KEY

pytestmark = pytest.mark.slow

BASE = {"model": {"image_tower": "frozen"}, "data": {"n_pairs": 512, "n_reg": 256, "n_val": 100},
        "loss": {"loss_type": "dpo", "beta": 0.3, "kl_weight": 0.3},
        "optimizer": {"lr": 5e-2, "spectral_lr": 5e-2, "warmup_steps": 2},
        "training": {"steps": 12, "batch_size": 64, "reg_batch_size": 64}}


def test_a_trial_in_tune_resumes_exactly_after_its_process_dies(ray_cluster, tmp_path):
    run = parse_config({**BASE, "name": "crash"})
    marker = tmp_path / "crashed-once"
    job = TrainJobConfig(run=run, reporting=ReportingConfig(report_every=4, checkpoint_every=4))
    config = job_config(job, callbacks=[CrashOnce(10, marker)])
    tuner = tune.Tuner(tune.with_resources(train_in_trial, {"cpu": 0.5}), param_space=config,
                       run_config=tune.RunConfig(name="crash", storage_path=str(tmp_path / "runs"), verbose=0,
                                                 failure_config=tune.FailureConfig(max_failures=1)))
    result = tuner.fit()[0]
    assert marker.exists(), "the injected failure did not happen"
    assert result.error is None and result.metrics["step"] == 12
    assert result.metrics["resumed_from_step"] == 8  # Tune registers a function's checkpoint as it reports
    # Exact: the resumed trial ends where one uninterrupted process does (batches depend on (seed, step);
    # optimiser, BMA and step come back from the checkpoint).
    model = build_model(run, torch.device("cpu"))
    single = fit(model, prepare_data(model, *build_records(run.data)), run)
    load_average(model, single.bma)
    with result.checkpoint.as_directory() as folder:
        resumed, _ = load_checkpoint(folder)
        assert json.loads((Path(folder) / "metrics.json").read_text())["step"] == 12
    for key in ("loss", "kl", "reward_margin"):
        assert result.metrics[key] == pytest.approx(single.last_metrics[key], abs=1e-6)
    theirs = dict(model.named_parameters())
    for name, value in resumed.named_parameters():
        if value.requires_grad:
            torch.testing.assert_close(value, theirs[name], atol=1e-6, rtol=0)


def test_a_spectral_sweep_packs_its_trials_and_releases(ray_cluster, tmp_path):
    cfg = SweepConfig.model_validate({
        "name": "packed", "storage_path": str(tmp_path / "sweeps"), "store": str(tmp_path / "store"),
        "num_samples": 8, "reporting": {"report_every": 6, "checkpoint_every": 6}, "top_k": 3, "seed": 2,
        "trial_runner": "tune", "scaling": {"cpus_per_worker": 0.25},
        "space": {"loss_type": ["dpo", "kto"], "beta": {"low": 0.1, "high": 1}, "kl_weight": {"low": 0.1, "high": 1}},
        "scheduler": {"grace_period": 2}, "base": BASE})
    assert max_concurrent_trials(cfg) == 8  # a quarter of a CPU each, on the 2-CPU test cluster
    result = run_sweep(cfg)
    assert len(result.trials) == 8 and result.with_checkpoint == 8, [t.error for t in result.trials]
    metrics = [t.metrics for t in result.trials]
    # the sweep embedded every image once, in its shared-inputs task; no trial ran the tower
    assert all(m["image_tower_images"] == 0 for m in metrics)
    overlap = peak_overlap([(m[STARTED_KEY], m[STARTED_KEY] + m[TRIAL_KEY]) for m in metrics])
    assert overlap >= 3, f"at most {overlap} trials ran at once on 2 CPUs"
    # Tune's checkpoints are what average reads, and what the tracker tagged each trial with
    from mlflow import MlflowClient

    experiment = Path(result.uri)
    uri = f"sqlite:///{experiment / 'mlflow.db'}"
    client = MlflowClient(uri, registry_uri=uri)
    runs = client.search_runs([client.get_experiment_by_name("packed").experiment_id])
    tagged = {r.data.tags["trial_id"]: r.data.tags.get("checkpoint_path") for r in runs if "trial_id" in r.data.tags}
    assert tagged == {t.trial_id: t.checkpoint_path for t in result.trials}
    average = run_average(cfg, cfg.store)
    verify_manifest(average.release_folder)
    model, description = load_checkpoint(average.release_folder)
    assert description["lineage"]["sweep"] == "packed"
