"""Export: the tower at θ(t) and W(t) folded into both projections give stock open_clip the aligned
embeddings at t."""
import subprocess
import sys
import textwrap

import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file

from po_cluster import cli
from po_cluster.config import ModelConfig
from po_cluster.data import world
from po_cluster.model.aligned import AlignedCLIP
from po_cluster.model.checkpoint import model_description, save_checkpoint
from po_cluster.model.export import export_open_clip
from po_cluster.model.loading import CONFIG_DIR, load_clip

PROMPTS = ["a photo of a circle.", "a photo of a star.", "a hexagon on a noisy background."]

# Runs in a fresh interpreter with nothing but open_clip: what a user without po-cluster does.
STOCK_OPEN_CLIP = textwrap.dedent("""
    import sys, open_clip, torch
    from safetensors.torch import load_file, save_file
    name, weights, inputs, out, config_dir = sys.argv[1:6]
    if config_dir != "-":
        open_clip.add_model_config(config_dir)  # a custom architecture ships its JSON config
    model, _, _ = open_clip.create_model_and_transforms(name, pretrained=weights)
    model.eval()
    x = load_file(inputs)
    with torch.no_grad():
        image = model.encode_image(x["pixels"], normalize=True)
        text = model.encode_text(open_clip.get_tokenizer(name)(sys.argv[6:]), normalize=True)
    assert not any(m.startswith("po_cluster") for m in sys.modules)
    save_file({"image": image.contiguous(), "text": text.contiguous()}, out)
""")


def _aligned(name: str, image_tower: str = "full") -> tuple[AlignedCLIP, ModelConfig]:
    torch.manual_seed(0)
    cfg = ModelConfig(name=name, pretrained=None, image_tower=image_tower)
    model = AlignedCLIP(load_clip(cfg), image_tower)
    with torch.no_grad():  # a non-trivial W: rotated basis, σ spread over ~e^±0.5
        model.spectral.skew.normal_(0, 0.2)
        model.spectral.log_sigma.normal_(0, 0.25)
        for p in model.trainable_image_parameters():  # θ ≠ θ_ref, so t also moves the tower
            p.add_(torch.randn_like(p) * 0.02)
    return model.eval(), cfg


@torch.no_grad()
def _po_cluster_embeddings(model: AlignedCLIP, pixels: torch.Tensor, t: float) -> tuple[torch.Tensor, torch.Tensor]:
    return (model.project(model.encode_image(pixels, t), t),
            model.project(model.encode_text(model.tokens(PROMPTS)), t))


def _stock_embeddings(tmp_path, name: str, weights, pixels: torch.Tensor, config_dir: str) -> dict:
    save_file({"pixels": pixels.contiguous()}, str(tmp_path / "inputs.safetensors"))
    out = tmp_path / "stock.safetensors"
    subprocess.run([sys.executable, "-c", STOCK_OPEN_CLIP, name, str(weights), str(tmp_path / "inputs.safetensors"),
                    str(out), config_dir, *PROMPTS], check=True, capture_output=True, text=True)
    return load_file(str(out))


def _checkpoint(tmp_path, model: AlignedCLIP, cfg: ModelConfig):
    description = model_description(model, cfg, world.SHAPES, world.PROMPT_TEMPLATE)
    return save_checkpoint(tmp_path / "ckpt", model, description, {}, {})


def test_tiny_model_export_matches_in_stock_open_clip(tmp_path):
    model, cfg = _aligned("po-tiny-rn")
    folder = _checkpoint(tmp_path, model, cfg)
    pixels = model.pixels(world.image_set("attacked", 6, seed=1).images)
    for t in (1.0, 0.5):
        out = tmp_path / f"export-{t}.safetensors"
        assert cli.main(["export", "--release", str(folder), "--t", str(t), "--out", str(out)]) == 0
        stock = _stock_embeddings(tmp_path, "po-tiny-rn", out, pixels, str(CONFIG_DIR))
        image, text = _po_cluster_embeddings(model, pixels, t)
        assert torch.allclose(stock["image"], image, atol=1e-5), (stock["image"] - image).abs().max()
        assert torch.allclose(stock["text"], text, atol=1e-5), (stock["text"] - text).abs().max()
    assert not torch.allclose(_po_cluster_embeddings(model, pixels, 1.0)[0],
                              _po_cluster_embeddings(model, pixels, 0.0)[0], atol=1e-2)  # W mattered


def test_export_refuses_a_wrong_suffix_and_a_missing_folder(tmp_path, capsys):
    assert cli.main(["export", "--release", str(tmp_path), "--out", str(tmp_path / "x.pt")]) == 2
    assert "must end in .safetensors" in capsys.readouterr().err
    assert cli.main(["export", "--release", str(tmp_path / "none"), "--out", str(tmp_path / "x.safetensors")]) == 2
    assert "no checkpoint folder" in capsys.readouterr().err


@pytest.mark.slow
def test_vit_b_32_export_matches_in_stock_open_clip(tmp_path):
    model, cfg = _aligned("ViT-B-32", "frozen")
    folder = _checkpoint(tmp_path, model, cfg)
    out = export_open_clip(folder, tmp_path / "vit.safetensors", t=1.0).path
    rng = np.random.default_rng(0)
    pixels = model.pixels(rng.integers(0, 256, size=(2, 224, 224, 3), dtype=np.uint8))
    stock = _stock_embeddings(tmp_path, "ViT-B-32", out, pixels, "-")
    image, text = _po_cluster_embeddings(model, pixels, 1.0)
    assert torch.allclose(stock["image"], image, atol=1e-5), (stock["image"] - image).abs().max()
    assert torch.allclose(stock["text"], text, atol=1e-5), (stock["text"] - text).abs().max()


def test_lora_release_export_merges_the_adapters_at_t(tmp_path):
    from po_cluster.config import LoraConfig, LoraTowerConfig
    from po_cluster.model.lora import adapters

    mode = LoraTowerConfig(lora=LoraConfig(rank=4))
    torch.manual_seed(0)
    cfg = ModelConfig(image_tower=mode)  # LoRA needs its base: the shipped one
    model = AlignedCLIP(load_clip(cfg), mode).eval()
    with torch.no_grad():
        for _, adapter in adapters(model.clip.visual):
            adapter.lora_B.normal_(0, 0.05)
        model.spectral.log_sigma.normal_(0, 0.25)
    folder = _checkpoint(tmp_path, model, cfg)
    pixels = model.pixels(world.image_set("attacked", 4, seed=2).images)
    out = export_open_clip(folder, tmp_path / "lora.safetensors", t=0.5).path
    assert not any("lora_" in key or ".base." in key for key in load_file(str(out)))  # stock open_clip names
    stock = _stock_embeddings(tmp_path, "po-tiny-rn", out, pixels, str(CONFIG_DIR))
    image, text = _po_cluster_embeddings(model, pixels, 0.5)
    assert torch.allclose(stock["image"], image, atol=1e-5), (stock["image"] - image).abs().max()
    assert torch.allclose(stock["text"], text, atol=1e-5), (stock["text"] - text).abs().max()
