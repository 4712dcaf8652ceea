"""The knob t on a model whose image tower trained: θ(t) = θ_ref + t·(θ − θ_ref), W(t) = V diag(σ^t) Vᵀ.

The "trained" model here is the shipped base with its tower weights and W moved by seeded noise, so
θ ≠ θ_ref everywhere; every expectation is computed independently of the code under test (a copy of
the tower with the interpolated weights written in by hand).
"""
import copy

import numpy as np
import pytest
import torch

from po_cluster.config import LastBlocksConfig, ModelConfig
from po_cluster.data import world
from po_cluster.evaluate.metrics import Evaluator
from po_cluster.model.aligned import AlignedCLIP
from po_cluster.model.checkpoint import REFERENCE, CheckpointError, load_checkpoint, model_description, save_checkpoint
from po_cluster.model.loading import load_clip
from po_cluster.model.release import Knob, ReleaseModel
from po_cluster.store.manifest import write_manifest


def moved(mode="full", seed: int = 0) -> AlignedCLIP:
    model = AlignedCLIP(load_clip(ModelConfig()), mode).eval()
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.trainable_image_parameters():
            p.add_(torch.randn(p.shape, generator=generator) * 0.05 * (p.std() if p.numel() > 1 else 1.0))
        model.spectral.log_sigma.copy_(torch.randn(model.spectral.dim, generator=generator) * 0.3)
    return model


@pytest.fixture(scope="module")
def trained() -> AlignedCLIP:
    return moved()


@torch.no_grad()
def by_hand(model: AlignedCLIP, pixels: torch.Tensor, t: float) -> torch.Tensor:
    """f_t from a deep copy of the tower with θ_ref + t·(θ − θ_ref) written into it."""
    visual = copy.deepcopy(model.clip.visual)
    for name, p in visual.named_parameters():
        if name in model.reference:
            p.copy_(model.reference[name] + t * (p - model.reference[name]))
    return torch.nn.functional.normalize(visual(pixels), dim=-1)


@torch.no_grad()
def test_t0_is_the_starting_tower_bit_for_bit_and_t1_the_trained_one(trained, base_model, pixels):
    assert len(trained.reference) == len(list(trained.trainable_image_parameters())) > 0
    assert torch.equal(trained.encode_image(pixels, 0.0), base_model.encode_image(pixels))
    assert torch.equal(trained.encode_image(pixels, 1.0), torch.nn.functional.normalize(
        trained.clip.encode_image(pixels), dim=-1))
    assert not torch.allclose(trained.encode_image(pixels, 1.0), base_model.encode_image(pixels), atol=1e-3)


@torch.no_grad()
@pytest.mark.parametrize("t", [0.25, 0.5, 0.75, 1.5, -0.5])
def test_between_and_beyond_the_tower_follows_the_straight_path(trained, pixels, t):
    assert torch.allclose(trained.encode_image(pixels, t), by_hand(trained, pixels, t), atol=1e-6)


def test_scores_at_t0_are_the_base_models(trained, base_model, small_sets):
    release, base = Evaluator.build(trained, small_sets), Evaluator.build(base_model, small_sets)
    assert release.metrics(0.0) == base.metrics(1.0)  # base: W = I at any t
    assert abs(release.metrics(0.0)["kl"]) < 1e-7  # π_ref is the model at t = 0, its start
    assert release.metrics(1.0) != release.metrics(0.0)


def test_last_blocks_keeps_only_its_blocks(pixels, base_model):
    model = moved(LastBlocksConfig(last_blocks=2), seed=1)
    trainable = {n for n, p in model.clip.visual.named_parameters() if p.requires_grad}
    assert set(model.reference) == trainable and 0 < len(trainable) < len(list(model.clip.visual.parameters()))
    assert torch.equal(model.encode_image(pixels, 0.0), base_model.encode_image(pixels))


def test_frozen_tower_has_no_path(base_model, pixels):
    assert base_model.reference == {}
    assert torch.equal(base_model.encode_image(pixels, 0.3), base_model.encode_image(pixels, 1.0))


def test_reference_moves_with_the_model():
    model = moved()
    model.double()
    assert all(v.dtype == torch.float64 for v in model.reference.values())


def test_checkpoint_keeps_the_reference_and_refuses_a_release_without_it(trained, base_model, pixels, tmp_path):
    description = model_description(trained, ModelConfig(), world.SHAPES, world.PROMPT_TEMPLATE)
    folder = save_checkpoint(tmp_path / "ckpt", trained, description, {}, {})
    loaded, _ = load_checkpoint(folder)
    assert loaded.image_tower == "full"
    with torch.no_grad():
        assert torch.equal(loaded.encode_image(pixels, 0.0), base_model.encode_image(pixels))
        assert torch.equal(loaded.encode_image(pixels, 0.5), trained.encode_image(pixels, 0.5))
    (folder / REFERENCE).unlink()
    write_manifest(folder)  # a consistent folder that simply lacks θ_ref
    with pytest.raises(CheckpointError, match=r"reference.safetensors .*missing"):
        load_checkpoint(folder)


def test_a_reference_of_the_wrong_shape_or_with_nan_is_refused(trained):
    model = moved()
    name, value = next(iter(trained.reference.items()))
    with pytest.raises(ValueError, match="missing"):
        model.set_reference({name: value})
    bad = dict(trained.reference)
    bad[name] = torch.full_like(value, float("nan"))
    with pytest.raises(ValueError, match="NaN"):
        model.set_reference(bad)
    bad[name] = value.reshape(-1)[:1]
    with pytest.raises(ValueError, match="shape"):
        model.set_reference(bad)


def test_engine_interpolates_once_per_rounded_t_and_mixes_ts_in_one_batch(trained, base_model):
    release = ReleaseModel("r", trained, {"prompt_template": "a photo of a {}.", "image_tower": "full"},
                           tower_cache_size=2)
    images = list(world.image_set("attacked", 4, seed=2).images)
    prompts = [world.prompts()] * 4
    knobs = [Knob(0.0), Knob(1.0), Knob(0.5), Knob(0.501)]  # 0.501 runs the tower at 0.5, W at 0.501
    mixed = release.classify_many(images, prompts, knobs)
    assert release.interpolations == 2  # 1 needs none; 0.5 and 0.501 share one
    for image, knob, (logits, _) in zip(images, knobs, mixed, strict=True):
        alone = release.classify_many([image], [world.prompts()], [knob])[0][0]
        assert np.allclose(logits, alone, atol=1e-4)
    base = ReleaseModel("b", base_model, {"prompt_template": "a photo of a {}."})
    assert np.allclose(mixed[0][0], base.classify_many([images[0]], [world.prompts()], [Knob(1.0)])[0][0],
                       atol=1e-5)  # t = 0 is the base model
    assert release.interpolations == 2
    release.classify_many(images[:1], prompts[:1], [Knob(0.7)])
    release.classify_many(images[:1], prompts[:1], [Knob(0.9)])  # evicts 0.5 (bound 2)
    release.classify_many(images[:1], prompts[:1], [Knob(0.5)])
    assert release.interpolations == 5
