"""Mixed precision in the training step: fp32 unchanged, bf16 runs (on CPU here) with fp32 losses,
fp16 refused without CUDA, and the fp16 gradient scaler's state survives a checkpoint."""
import numpy as np
import pytest
import torch

from po_cluster.config import ConfigError, LossConfig, parse_config
from po_cluster.data.images import Geometry, Preprocess
from po_cluster.data.selection import build_records
from po_cluster.model.loading import to_model_input
from po_cluster.train.loop import TrainState, build_model, fit, prepare_data, train_step
from po_cluster.train.precision import Precision, PrecisionError
from po_cluster.train.state import load_train_state, save_train_state

CPU = torch.device("cpu")


def _cfg(precision="fp32", steps=6):
    return parse_config({"data": {"n_pairs": 256, "n_reg": 128}, "model": {"image_tower": "full"},
                         "loss": {"beta": 0.1, "kl_weight": 0.1},
                         "optimizer": {"lr": 1e-3, "spectral_lr": 1e-2, "warmup_steps": 1},
                         "training": {"steps": steps, "batch_size": 32, "reg_batch_size": 32, "bma": False,
                                      "precision": precision}})


@pytest.fixture(scope="module")
def model_and_data():
    cfg = _cfg()
    model = build_model(cfg, CPU)
    return cfg, model, prepare_data(model, *build_records(cfg.data))


def test_fp32_precision_is_the_plain_step(model_and_data):
    cfg, model, data = model_and_data
    idx = np.arange(16)
    plain, _ = train_step(model, data, idx, idx, "dpo", LossConfig(beta=0.1, kl_weight=0.1))
    at_fp32, _ = train_step(model, data, idx, idx, "dpo", LossConfig(beta=0.1, kl_weight=0.1),
                            Precision.for_device("fp32", CPU))
    assert torch.equal(plain, at_fp32)


def test_bf16_forward_is_bf16_and_the_loss_fp32(model_and_data):
    cfg, model, data = model_and_data
    seen: list[torch.dtype] = []
    layers = [m for m in model.clip.visual.modules() if isinstance(m, (torch.nn.Linear, torch.nn.Conv2d))]
    hooks = [m.register_forward_hook(lambda _m, _i, out: seen.append(out.dtype)) for m in layers]
    try:
        idx = np.arange(16)
        loss, metrics = train_step(model, data, idx, idx, "dpo", LossConfig(beta=0.1, kl_weight=0.1),
                                   Precision.for_device("bf16", CPU))
    finally:
        for hook in hooks:
            hook.remove()
    assert seen and all(dtype == torch.bfloat16 for dtype in seen)
    assert loss.dtype == torch.float32
    # π = π_ref at step 0, so h = 0 and the DPO loss is log 2 up to bf16's rounding of the forward
    assert metrics["loss"] == pytest.approx(np.log(2), abs=0.05)


def test_a_bf16_fit_follows_the_fp32_one():
    losses = {}
    for precision in ("fp32", "bf16"):
        cfg = _cfg(precision, steps=8)
        model = build_model(cfg, CPU)
        data = prepare_data(model, *build_records(cfg.data))
        result = fit(model, data, cfg)
        losses[precision] = result.last_metrics["loss"]
    assert np.isfinite(losses["bf16"])
    assert losses["bf16"] == pytest.approx(losses["fp32"], abs=0.1)
    assert losses["bf16"] < np.log(2)  # it learned, not just ran


def test_fp16_without_cuda_is_refused_by_name():
    with pytest.raises(PrecisionError, match="training.precision"):
        Precision.for_device("fp16", CPU)
    with pytest.raises(ConfigError, match="fp16 needs CUDA"):
        parse_config({"training": {"precision": "fp16", "device": "cpu"}})
    with pytest.raises(ConfigError, match="precision"):
        parse_config({"training": {"precision": "fp8"}})


def test_the_fp16_scaler_steps_and_its_state_survives_a_checkpoint(model_and_data, tmp_path):
    cfg, model, data = model_and_data
    # CPU has a GradScaler too: the fp16 path minus CUDA (for_device refuses fp16 on CPU for real runs)
    precision = Precision("fp16", CPU, torch.amp.GradScaler("cpu", init_scale=1024.0, growth_interval=1))
    state = TrainState(torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.0), None,
                       precision)
    idx = np.arange(8)
    loss, _ = train_step(model, data, idx, idx, "dpo", LossConfig(beta=0.1, kl_weight=0.1), precision)
    precision.step(loss, state.optimizer)
    scale = precision.scaler.get_scale()
    assert scale != 1024.0  # grown after a finite step, or backed off after an overflow: it ran
    save_train_state(tmp_path, 1, model, state.optimizer, None, precision)
    restored = Precision("fp16", CPU, torch.amp.GradScaler("cpu"))
    load_train_state(tmp_path, model, state.optimizer, None, restored)
    assert restored.scaler.get_scale() == scale
    assert restored.state_dict() == precision.state_dict()


def test_model_input_on_a_device_equals_the_host_conversion():
    images = np.random.default_rng(0).integers(0, 256, (3, 32, 32, 3), dtype=np.uint8)
    mean, std = (0.5, 0.4, 0.3), (0.2, 0.25, 0.3)
    preprocess = Preprocess(Geometry(32), mean, std)
    host = to_model_input(images, preprocess)
    placed = to_model_input(images, preprocess, CPU)
    assert placed.device == CPU and torch.equal(host, placed)
