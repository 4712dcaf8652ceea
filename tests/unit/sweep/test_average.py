"""Scoring the soups' candidates: each is the base's evaluator continued with the candidate's weights."""
from __future__ import annotations

import pytest
import torch

from po_cluster.config import DataConfig, ModelConfig
from po_cluster.data import world
from po_cluster.evaluate import metrics as metrics_module
from po_cluster.evaluate.metrics import Evaluator
from po_cluster.evaluate.objective import Objective
from po_cluster.model.aligned import AlignedCLIP
from po_cluster.model.checkpoint import load_trained_state, model_description
from po_cluster.model.loading import load_clip
from po_cluster.sweep.average import Scorer


def _candidate_state(model: AlignedCLIP) -> dict[str, torch.Tensor]:
    """The model's weights with W moved (the tower as the base's), as a trial of either mode ends."""
    generator = torch.Generator().manual_seed(0)
    return {name: value + 0.05 * torch.randn(value.shape, generator=generator) if name.startswith("spectral.")
            and value.is_floating_point() else value.clone() for name, value in model.state_dict().items()}


@pytest.mark.slow  # the scorer builds the evaluator of the fixed test sets
@pytest.mark.parametrize("mode", ["frozen", "full"])
def test_a_candidate_scores_as_a_fresh_evaluator_and_a_frozen_tower_is_embedded_once(mode, monkeypatch) -> None:
    cfg = ModelConfig(image_tower=mode)
    built = AlignedCLIP(load_clip(cfg), mode)
    scorer = Scorer(model_description(built, cfg, world.SHAPES, world.PROMPT_TEMPLATE), DataConfig(n_val=40),
                    Objective())
    state = _candidate_state(built)
    embedded: list[int] = []
    embed = metrics_module.embed_images
    monkeypatch.setattr(metrics_module, "embed_images",
                        lambda model, images, *a, **k: embedded.append(len(images)) or embed(model, images, *a, **k))
    scored = scorer.validation(state)
    # A frozen tower's embeddings are the base's: no image is embedded again. A trained one re-embeds.
    assert embedded == ([] if mode == "frozen" else [len(s.images) for s in scorer.val_sets.values()])
    monkeypatch.undo()

    fresh = AlignedCLIP(load_clip(cfg), mode)
    load_trained_state(fresh, state, "the candidate")
    base = Evaluator.build(AlignedCLIP(load_clip(cfg), "frozen"), scorer.val_sets, scorer.template)
    expected = Evaluator.build(fresh, scorer.val_sets, scorer.template,
                               ref_clean_logps=base.ref_clean_logps).metrics(1.0)
    assert {k: v for k, v in scored.items() if k != "objective"} == pytest.approx(expected, abs=1e-6)
    assert scored["kl"] > 0  # W moved: the check can tell a candidate from the base
