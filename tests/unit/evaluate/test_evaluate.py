"""Evaluator.with_model: the start's embeddings reused only where the weights cannot have changed."""
import copy

import pytest
import torch

from po_cluster.evaluate.metrics import Evaluator
from po_cluster.model.aligned import AlignedCLIP


def _changed(model: AlignedCLIP, seed: int) -> None:
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        model.spectral.skew.copy_(torch.randn(model.spectral.skew.shape, generator=generator) * 0.3)
        model.spectral.log_sigma.copy_(torch.randn(model.spectral.dim, generator=generator) * 0.5)
        if not model.image_tower_frozen:
            for p in model.clip.visual.parameters():
                p.add_(torch.randn(p.shape, generator=generator) * 0.05)


def test_with_model_equals_a_fresh_build(base_model, small_sets):
    for mode in ("frozen", "full"):
        model = copy.deepcopy(base_model)
        model.image_tower = mode
        start = Evaluator.build(model, small_sets)
        _changed(model, seed=5)  # in place, as training does
        fresh = Evaluator.build(model, small_sets, ref_clean_logps=start.ref_clean_logps)
        reused = start.with_model(model)
        assert (reused.image_emb is start.image_emb) == (mode == "frozen")
        assert reused.text_emb is start.text_emb
        assert reused.metrics(1.0) == fresh.metrics(1.0)
        assert reused.metrics(0.5) == fresh.metrics(0.5)


def test_each_set_is_scored_against_its_own_candidates(base_model):
    from po_cluster.data import world

    sets = {kind: world.image_set(kind, 32, 3) for kind in ("clean", "retain_colour", "retain_size",
                                                            "bias_stereotyped", "bias_counter")}
    evaluator = Evaluator.build(base_model, sets)
    assert evaluator.text_emb["clean"].shape[0] == len(world.SHAPES)
    assert evaluator.text_emb["retain_colour"].shape[0] == 6 and evaluator.text_emb["retain_size"].shape[0] == 2
    assert evaluator.text_emb["bias_counter"] is evaluator.text_emb["bias_stereotyped"]  # same prompts, once
    metrics = evaluator.metrics(1.0)
    assert metrics["retention"] == (metrics["retain_colour"] + metrics["retain_size"]) / 2
    assert metrics["bias_gap"] == metrics["bias_stereotyped"] - metrics["bias_counter"]


def test_derived_metrics_need_their_sets():
    from po_cluster.evaluate.metrics import derived_metrics

    assert derived_metrics({"clean": 1.0, "attacked": 0.5}) == {}  # a dataset's sets: nothing to derive
    assert derived_metrics({"retain_a": 0.5, "retain_b": 1.0, "bias_stereotyped": 0.9, "bias_counter": 0.4}) == \
        {"retention": 0.75, "bias_gap": 0.5}


def test_the_objective_charges_clean_and_retention_lost_beyond_the_tolerance():
    from po_cluster.config import ObjectiveConfig
    from po_cluster.evaluate.objective import Objective

    base = {"clean": 0.9, "retention": 0.9, "attacked": 0.1}
    objective = Objective(weights=ObjectiveConfig(clean_tolerance=0.02, clean_penalty=5.0, retention_penalty=2.0))
    assert objective.score({"clean": 0.89, "retention": 0.89, "attacked": 0.6}, base) == 0.6
    assert objective.score({"clean": 0.9, "retention": 0.78, "attacked": 0.6}, base) == \
        pytest.approx(0.6 - 2.0 * 0.1)
    assert objective.score({"clean": 0.78, "attacked": 0.6}, {"clean": 0.9}) == pytest.approx(0.6 - 5.0 * 0.1)
    # the worse of attacked and own-word: reading fails the first, avoiding the word the second
    assert objective.score({"clean": 0.89, "own_word": 0.88, "attacked": 0.6}, {"clean": 0.9}) == 0.6
    assert objective.score({"clean": 0.89, "own_word": 0.45, "attacked": 0.6}, {"clean": 0.9}) == 0.45
    assert objective.score({"clean": 0.89, "own_word": 0.99, "attacked": 0.6}, {"clean": 0.9}) == 0.6
    assert objective.score({"clean": 0.78, "own_word": 0.5, "attacked": 0.6}, {"clean": 0.9}) == \
        pytest.approx(0.5 - 5.0 * 0.1)
    bias = Objective(target="bias_counter")
    assert bias.score({"clean": 0.9, "bias_counter": 0.7}, {"clean": 0.9}) == 0.7
