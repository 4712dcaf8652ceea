"""LoRA image-tower mode: adapters scaled by each sample's t, small releases, soups of adapters.

"Trained" adapters here are seeded noise in B (A is initialised at random, B at zero); every
expectation is computed another way: the adapters merged into the weights by hand.
"""
import copy

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from po_cluster.config import LoraConfig, LoraTowerConfig, ModelConfig, RunConfig
from po_cluster.data import world
from po_cluster.model.aligned import AlignedCLIP
from po_cluster.model.checkpoint import WEIGHTS, CheckpointError, load_checkpoint, model_description, save_checkpoint
from po_cluster.model.loading import load_clip
from po_cluster.model.lora import LoraConv2d, LoraLinear, adapters, merge_adapters
from po_cluster.model.release import Knob, ReleaseModel
from po_cluster.store.manifest import write_manifest
from po_cluster.sweep.soup import uniform_soup

LORA = LoraTowerConfig(lora=LoraConfig(rank=4, alpha=8.0))


def lora_model(seed: int = 0, mode: LoraTowerConfig = LORA) -> AlignedCLIP:
    torch.manual_seed(seed)
    model = AlignedCLIP(load_clip(ModelConfig(image_tower=mode)), mode).eval()
    with torch.no_grad():
        for _, adapter in adapters(model.clip.visual):
            adapter.lora_B.normal_(0, 0.05)
        model.spectral.log_sigma.normal_(0, 0.3)
    return model


@torch.no_grad()
def merged(model: AlignedCLIP, pixels: torch.Tensor, t: float) -> torch.Tensor:
    visual = copy.deepcopy(model.clip.visual)
    merge_adapters(visual, t)
    assert not list(adapters(visual))
    return torch.nn.functional.normalize(visual(pixels), dim=-1)


def test_adapters_wrap_the_default_targets_and_only_they_train(base_model, pixels):
    torch.manual_seed(0)
    model = AlignedCLIP(load_clip(ModelConfig(image_tower=LORA)), LORA)
    wrapped = dict(adapters(model.clip.visual))
    assert wrapped and all(isinstance(a, LoraConv2d) for a in wrapped.values())
    assert all(name.split(".")[-1] in {"conv1", "conv2", "conv3"} and name.startswith("layer") for name in wrapped)
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable == {k for k in model.trained_keys()} and all("lora_" in k or "spectral" in k for k in trainable)
    assert model.reference == {}  # the scale is the path: nothing to keep
    with torch.no_grad():  # B = 0: an untrained adapter is the base layer, at any t
        for t in (1.0, 0.3):
            assert torch.equal(model.encode_image(pixels, t), base_model.encode_image(pixels))


@torch.no_grad()
def test_t_scales_the_adapters_and_is_the_merged_weights_path(base_model, pixels):
    model = lora_model()
    assert torch.allclose(model.encode_image(pixels, 0.0), base_model.encode_image(pixels), atol=1e-6)
    for t in (0.5, 1.0, 1.7):
        assert torch.allclose(model.encode_image(pixels, t), merged(model, pixels, t), atol=1e-5)
    assert not torch.allclose(model.encode_image(pixels, 1.0), base_model.encode_image(pixels), atol=1e-3)


def test_scores_at_t0_are_the_base_models(base_model, small_sets):
    from po_cluster.evaluate.metrics import Evaluator

    release, base = Evaluator.build(lora_model(), small_sets), Evaluator.build(base_model, small_sets)
    at0, want = release.metrics(0.0), base.metrics(1.0)
    assert at0.keys() == want.keys() and all(abs(at0[k] - want[k]) < 1e-6 for k in want), (at0, want)
    assert abs(at0["kl"]) < 1e-7 and release.metrics(1.0)["kl"] > 1e-5  # π_ref is the model at t = 0


@torch.no_grad()
def test_one_pass_serves_a_t_per_row(pixels):
    model = lora_model()
    ts = torch.tensor([0.0, 1.0, 0.25, 0.5, 2.0, 1.0, 0.75, -0.5])  # one per row of `pixels`
    together = model.encode_image(pixels, ts)
    for i, t in enumerate(ts.tolist()):
        assert torch.allclose(together[i], model.encode_image(pixels[i:i + 1], t)[0], atol=1e-5)
    with pytest.raises(ValueError, match="LoRA"):
        AlignedCLIP(load_clip(ModelConfig()), "full").encode_image(pixels, ts)


def test_vit_mlps_are_the_default_targets_and_rows_keep_their_t():
    torch.manual_seed(0)
    mode = LoraTowerConfig(lora=LoraConfig(rank=2))
    model = AlignedCLIP(load_clip(ModelConfig(name="ViT-B-32", pretrained=None)), mode).eval()
    wrapped = dict(adapters(model.clip.visual))
    assert len(wrapped) == 24 and all(isinstance(a, LoraLinear) for a in wrapped.values())
    with torch.no_grad():
        for adapter in wrapped.values():
            adapter.lora_B.normal_(0, 0.05)
        x = torch.randn(2, 3, 224, 224)
        both = model.encode_image(x, torch.tensor([0.0, 1.0]))
        assert torch.allclose(both[1], model.encode_image(x[1:], 1.0)[0], atol=1e-5)
        assert torch.allclose(both[0], model.encode_image(x[:1], 0.0)[0], atol=1e-5)


@pytest.mark.parametrize("targets, message", [
    (("layer9.*",), "match no layer"), (("attnpool.q_proj",), "reads its weight directly"),
    (("layer1.0.bn1",), "not a Linear or Conv2d")])
def test_bad_targets_are_refused_by_name(targets, message):
    with pytest.raises(ValueError, match=message):
        AlignedCLIP(load_clip(ModelConfig()), LoraTowerConfig(lora=LoraConfig(targets=targets)))


def test_a_release_stores_only_adapters_and_w_and_refuses_a_changed_base(tmp_path, pixels):
    model = lora_model()
    cfg = ModelConfig(image_tower=LORA)
    description = model_description(model, cfg, world.SHAPES, world.PROMPT_TEMPLATE)
    assert len(description["pretrained_sha256"]) == 64
    folder = save_checkpoint(tmp_path / "lora", model, description, {}, {})
    stored = load_file(str(folder / WEIGHTS))
    assert set(stored) == model.trained_keys() and not any(k.startswith("clip.text") for k in stored)
    full_size = sum(v.numel() for v in model.state_dict().values())
    assert sum(v.numel() for v in stored.values()) < full_size / 10
    loaded, _ = load_checkpoint(folder)
    with torch.no_grad():
        for t in (0.0, 0.5, 1.0):
            assert torch.equal(loaded.encode_image(pixels, t), model.encode_image(pixels, t))
    (folder / "model.json").write_text((folder / "model.json").read_text().replace(
        description["pretrained_sha256"], "0" * 64))
    write_manifest(folder)
    with pytest.raises(CheckpointError, match="weights have changed"):
        load_checkpoint(folder)


def test_soups_average_what_the_adapters_add():
    one, two = lora_model(seed=1), lora_model(seed=2)
    with torch.no_grad():  # rank-2 deltas each, so their mean has rank <= 4 = the adapters' rank
        for model in (one, two):
            for _, adapter in adapters(model.clip.visual):
                adapter.lora_B[:, 2:] = 0
    states = [{k: v for k, v in m.state_dict().items() if k in m.trained_keys()} for m in (one, two)]
    alone = uniform_soup(states[:1])
    assert all(torch.equal(alone[k], states[0][k]) for k in states[0])  # a one-member soup is the trial
    soup = uniform_soup(states)
    for (name, a1), (_, a2) in zip(adapters(one.clip.visual), adapters(two.clip.visual), strict=True):
        prefix = f"clip.visual.{name}."
        want = (a1.delta_weight() + a2.delta_weight()) / 2
        got = copy.deepcopy(a1)
        got.lora_A.data, got.lora_B.data = soup[prefix + "lora_A"], soup[prefix + "lora_B"]
        assert torch.allclose(got.delta_weight(), want, atol=1e-6), name
    key = "spectral.log_sigma"
    assert torch.allclose(soup[key], (states[0][key] + states[1][key]) / 2)


def test_engine_mixed_t_batch_equals_each_request_alone():
    engine = ReleaseModel("r", lora_model(), {"prompt_template": "a photo of a {}."})
    images = list(world.image_set("attacked", 4, seed=9).images)
    knobs = [Knob(1.0), Knob(0.0), Knob(0.5), Knob(0.75)]
    mixed = engine.classify_many(images, [world.prompts()] * 4, knobs)
    for image, knob, (logits, _) in zip(images, knobs, mixed, strict=True):
        assert np.allclose(logits, engine.classify_many([image], [world.prompts()], [knob])[0][0], atol=1e-4)
    assert engine.interpolations == 0  # nothing to interpolate: the scale is per row


def test_lora_training_moves_only_adapters_and_w(tmp_path):
    from po_cluster.train.run import train
    from po_cluster.train.session import LocalSession

    cfg = RunConfig.model_validate({
        "name": "lora", "output_dir": str(tmp_path), "model": {"image_tower": LORA.model_dump()},
        "data": {"n_pairs": 64, "n_reg": 64, "n_val": 20}, "optimizer": {"lr": 1e-2},
        "training": {"steps": 3, "batch_size": 32, "reg_batch_size": 32, "bma": False}})
    result = train(cfg, LocalSession.for_run(cfg, world.validation_sets(20)))
    stored = load_file(str(result.checkpoint / WEIGHTS))
    assert any(k.endswith("lora_B") and v.abs().max() > 0 for k, v in stored.items())  # B left zero
    loaded, description = load_checkpoint(result.checkpoint)
    base = load_clip(ModelConfig()).model.state_dict()
    for key, value in base.items():  # the base tower is untouched (its keys moved under .base)
        own = loaded.clip.state_dict()
        name = key if key in own else key.rsplit(".", 1)[0] + ".base." + key.rsplit(".", 1)[1]
        assert torch.equal(own[name], value), key
    assert description["image_tower"] == LORA.model_dump(mode="json")
