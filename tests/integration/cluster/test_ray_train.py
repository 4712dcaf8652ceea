"""Ray Train workers: real DDP, and a crashed worker resumed from its checkpoint."""
import json
from pathlib import Path

import pytest
import torch

from po_cluster.config import ReportingConfig, ScalingConfig, TrainJobConfig, parse_config
from po_cluster.data import world
from po_cluster.data.selection import build_records
from po_cluster.evaluate.metrics import embed_images, embed_prompts
from po_cluster.model.checkpoint import load_checkpoint
from po_cluster.sweep.trial import fit_trial
from po_cluster.train.callbacks import CrashOnce
from po_cluster.train.loop import build_model, fit, load_average, prepare_data


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
    result = fit_trial(TrainJobConfig(run=run, reporting=ReportingConfig(report_every=3, checkpoint_every=6)),
                       ScalingConfig(num_workers=2), str(tmp_path), "ddp", 0)
    assert result.error is None
    # DDP keeps both replicas identical: rank 0 broadcast vs every rank, max over workers
    assert result.metrics["replica_divergence"] == 0.0
    # The same run in one plain process, on the same global batches
    model = build_model(run, torch.device("cpu"))
    data = prepare_data(model, *build_records(run.data))
    single = fit(model, data, run)
    load_average(model, single.bma)
    with result.checkpoint.as_directory() as folder:
        distributed, _ = load_checkpoint(folder)
    # Compared as functions, not raw parameters: the runs differ only by float summation
    # order in DDP's gradient average, and Adam turns the rounding noise of gradients that
    # are exactly zero in theory (V while σ = 1, attention key biases) into ±lr steps that
    # do not change the model's outputs. Stated tolerance: 1e-3 on log-probs; on the losses 1e-4,
    # relative or absolute (float32 sums in another order: 1.2e-4 on a loss of 2.25 on one CPU model
    # where another gave less than 1e-4, the code unchanged).
    images = world.image_set("attacked", 64, 7).images
    text = embed_prompts(model, world.prompts())
    with torch.no_grad():
        ours = distributed.logprobs(embed_images(distributed, images), text)
        theirs = model.logprobs(embed_images(model, images), text)
    assert float((ours - theirs).abs().max()) < 1e-3
    for key in ("loss", "kl", "reward_margin"):
        assert result.metrics[key] == pytest.approx(single.last_metrics[key], rel=1e-4, abs=1e-4)


def test_crashed_worker_resumes_from_last_checkpoint(ray_cluster, tmp_path):
    run = _run_config("crash", 12)
    marker = tmp_path / "crashed-once"
    job = TrainJobConfig(run=run, reporting=ReportingConfig(report_every=4, checkpoint_every=4))
    result = fit_trial(job, ScalingConfig(num_workers=1), str(tmp_path / "runs"), "crash", 1,
                       train_callbacks=[CrashOnce(10, marker)])
    assert marker.exists(), "the injected failure did not happen"
    assert result.error is None
    assert result.metrics["step"] == 12
    # The retry started from a checkpoint, not from zero: the step-8 one, or the step-4 one
    # when the controller had not registered step 8 yet as the worker died.
    assert result.metrics["resumed_from_step"] in (4, 8)
    with result.checkpoint.as_directory() as folder:
        assert json.loads((Path(folder) / "metrics.json").read_text())["step"] == 12
