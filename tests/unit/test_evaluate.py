"""Evaluator.with_model: the start's embeddings reused only where the weights cannot have changed."""
import copy

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
