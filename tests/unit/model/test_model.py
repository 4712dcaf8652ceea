import numpy as np
import pytest
import torch

from po_cluster.config import LastBlocksConfig, ModelConfig
from po_cluster.data.images import Geometry, Preprocess
from po_cluster.model.aligned import AlignedCLIP, candidate_logprobs
from po_cluster.model.loading import ModelLoadError, load_clip, resolve_weights, to_model_input


def test_candidate_logprobs_normalise_over_candidates():
    img = torch.nn.functional.normalize(torch.randn(3, 8), dim=-1)
    txt = torch.nn.functional.normalize(torch.randn(5, 8), dim=-1)
    logps = candidate_logprobs(img, txt, 100.0)
    assert logps.shape == (3, 5)
    assert torch.allclose(logps.exp().sum(-1), torch.ones(3), atol=1e-6)


def test_shipped_base_loads_and_text_tower_is_frozen(base_model):
    assert base_model.name == "po-tiny-rn"
    assert not any(p.requires_grad for p in base_model.clip.parameters())
    assert all(p.requires_grad for p in base_model.spectral.parameters())


def test_image_tower_modes():
    loaded = load_clip(ModelConfig(pretrained=None))
    full = AlignedCLIP(loaded, "full")
    visual = sum(p.numel() for p in full.clip.visual.parameters())
    assert sum(p.numel() for p in full.trainable_image_parameters()) == visual
    assert not any(p.requires_grad for p in full.clip.transformer.parameters())
    partial = AlignedCLIP(load_clip(ModelConfig(pretrained=None)), LastBlocksConfig(last_blocks=2))
    trainable = {n for n, p in partial.clip.visual.named_parameters() if p.requires_grad}
    assert trainable and all(n.startswith(("layer4", "attnpool")) for n in trainable)
    with pytest.raises(ValueError, match="blocks"):
        AlignedCLIP(load_clip(ModelConfig(pretrained=None)), LastBlocksConfig(last_blocks=99))


def test_local_weights_must_be_safetensors(tmp_path):
    pickle_file = tmp_path / "weights.pt"
    torch.save({"x": torch.zeros(1)}, pickle_file)
    with pytest.raises(ModelLoadError, match="only .safetensors"):
        resolve_weights(str(pickle_file))
    with pytest.raises(ModelLoadError, match="not found"):
        load_clip(ModelConfig(pretrained=str(tmp_path / "missing.safetensors")))
    with pytest.raises(ModelLoadError, match="unknown open_clip architecture"):
        load_clip(ModelConfig(name="not-a-model", pretrained=None))


def test_corrupt_weights_are_refused(tmp_path):
    bad = tmp_path / "bad.safetensors"
    bad.write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not json}")
    with pytest.raises(ModelLoadError, match="cannot read weights"):
        load_clip(ModelConfig(pretrained=str(bad)))


def test_to_model_input_resizes_and_normalises():
    images = np.full((2, 100, 80, 3), 255, dtype=np.uint8)
    x = to_model_input(images, Preprocess(Geometry(64), (0.5, 0.5, 0.5), (0.25, 0.25, 0.25)))
    assert x.shape == (2, 3, 64, 64)
    assert torch.allclose(x, torch.full_like(x, 2.0), atol=1e-4)


def test_open_clip_tag_goes_through_open_clip(monkeypatch):
    import open_clip

    seen = {}

    def fake_create(name, pretrained=None, **kwargs):
        seen["pretrained"] = pretrained
        raise RuntimeError("stop here")

    monkeypatch.setattr(open_clip, "create_model", fake_create)
    with pytest.raises(RuntimeError, match="stop here"):
        load_clip(ModelConfig(name="ViT-B-32", pretrained="openai"))
    assert seen["pretrained"] == "openai"
