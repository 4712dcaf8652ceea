"""Ray Train workers: real DDP, and a crashed worker resumed from its checkpoint."""
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from po_cluster.config import ScalingSettings, WorkerConfig, parse_config
from po_cluster.sweep import fit_trial
from po_cluster.train import build_model, build_records, fit, load_average, prepare_data

pytestmark = pytest.mark.integration


def _run_config(name: str, steps: int):
    return parse_config({
        "name": name, "data": {"n_pairs": 256, "n_reg": 128, "n_val": 60},
        "model": {"image_tower": {"last_blocks": 1}},
        "loss": {"loss_type": "dpo", "beta": 0.5, "kl_weight": 0.3},
        "optimizer": {"lr": 1e-3, "spectral_lr": 1e-2, "warmup_steps": 2},
        "training": {"steps": steps, "batch_size": 32, "reg_batch_size": 32},
    })


def test_two_workers_train_data_parallel_like_one_process(ray_cluster, tmp_path):
    run = _run_config("ddp", 6)
    result = fit_trial(WorkerConfig(run=run, report_every=3, checkpoint_every=6),
                       ScalingSettings(num_workers=2), str(tmp_path), "ddp", 0)
    assert result.error is None
    # DDP keeps both replicas identical: rank 0 broadcast vs every rank, max over workers
    assert result.metrics["replica_divergence"] == 0.0
    # The same run in one plain process, on the same global batches
    model = build_model(run, torch.device("cpu"))
    data = prepare_data(model, *build_records(run.data))
    single = fit(model, data, run)
    load_average(model, single.bma)
    with result.checkpoint.as_directory() as folder:
        distributed = load_file(str(Path(folder) / "model.safetensors"))
    # Tolerance: the two runs differ only by float summation order in DDP's gradient average.
    worst = max(float((distributed[k] - v).abs().max()) for k, v in model.state_dict().items())
    assert worst < 1e-4, f"2-worker weights differ from single-process by {worst}"
    for key in ("loss", "kl", "reward_margin"):
        assert result.metrics[key] == pytest.approx(single.last_metrics[key], abs=1e-4)


def test_crashed_worker_resumes_from_last_checkpoint(ray_cluster, tmp_path):
    run = _run_config("crash", 12)
    marker = tmp_path / "crashed-once"
    worker = WorkerConfig(run=run, report_every=4, checkpoint_every=4, fail_at_step=10, fail_marker=str(marker))
    result = fit_trial(worker, ScalingSettings(num_workers=1), str(tmp_path / "runs"), "crash", 1)
    assert marker.exists(), "the injected failure did not happen"
    assert result.error is None
    assert result.metrics["step"] == 12
    # the retry started after the step-8 checkpoint, not from zero
    assert result.metrics["resumed_from_step"] == 8
    with result.checkpoint.as_directory() as folder:
        assert json.loads((Path(folder) / "metrics.json").read_text())["step"] == 12
