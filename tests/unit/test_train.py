"""Training on the shipped base model: small, fast runs that must move the right way."""
import numpy as np
import pytest
import torch

from po_cluster.config import parse_config
from po_cluster.evaluate.metrics import Evaluator
from po_cluster.losses import LossSettings
from po_cluster.train.loop import build_model, build_records, fit, load_average, prepare_data, train_step


def _cfg(**overrides):
    base = {"data": {"n_pairs": 1024, "n_reg": 512},
            "model": {"image_tower": "frozen"},
            "loss": {"beta": 0.1, "kl_weight": 0.1},
            "optimizer": {"lr": 5e-2, "spectral_lr": 5e-2, "warmup_steps": 5},
            "training": {"steps": 200, "batch_size": 128, "reg_batch_size": 128}}
    for section, values in overrides.items():
        base.setdefault(section, {}).update(values)
    return parse_config(base)


def test_reference_logprobs_are_the_policy_at_step_zero():
    cfg = _cfg(model={"image_tower": "full"})
    model = build_model(cfg, torch.device("cpu"))
    data = prepare_data(model, *build_records(cfg.data))
    assert data.pref_emb is None  # a trainable tower is not cached
    idx = np.arange(16)
    _, metrics = train_step(model, data, idx, idx, "dpo", LossSettings(1.0, 0.3))
    assert metrics["loss"] == pytest.approx(np.log(2), abs=1e-5)  # h = 0 → −log σ(0)
    assert metrics["kl"] == pytest.approx(0.0, abs=1e-6)


def test_spectral_only_training_keeps_t0_and_trades_ocr_for_robustness(small_sets):
    cfg = _cfg()
    model = build_model(cfg, torch.device("cpu"))
    data = prepare_data(model, *build_records(cfg.data))
    assert data.pref_emb is not None  # the frozen tower's embeddings are cached
    before = Evaluator.build(model, small_sets)
    base_scores = model.logprobs(before.image_emb["attacked"], before.text_emb, 0.0)
    result = fit(model, data, cfg)
    load_average(model, result.bma)
    after = Evaluator.build(model, small_sets)
    # t = 0 is exactly the starting model
    scores_t0 = model.logprobs(after.image_emb["attacked"], after.text_emb, 0.0)
    assert torch.allclose(scores_t0, base_scores, atol=1e-5)
    m0, m1 = after.metrics(0.0), after.metrics(1.0)
    assert m1["attacked"] > m0["attacked"] + 0.05
    assert m1["word_only"] < m0["word_only"]


@pytest.mark.parametrize("loss_type", ["dpo", "ipo", "kto", "ce"])
def test_each_loss_learns_on_a_few_steps(loss_type):
    cfg = _cfg(loss={"loss_type": loss_type}, training={"steps": 40})
    model = build_model(cfg, torch.device("cpu"))
    data = prepare_data(model, *build_records(cfg.data))
    idx = np.arange(256)
    settings = LossSettings(cfg.loss.beta, cfg.loss.kl_weight)
    start, _ = train_step(model, data, idx, idx, loss_type, settings)
    fit(model, data, cfg)
    end, _ = train_step(model, data, idx, idx, loss_type, settings)
    assert end.item() < start.item()
