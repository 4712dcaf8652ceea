"""The shipped base model: pretraining it, writing it with its card, and its metrics."""
from __future__ import annotations

import json
import time
from pathlib import Path

import torch
from safetensors.torch import save_file

from po_cluster.config import SHIPPED_BASE, ModelConfig
from po_cluster.data import world
from po_cluster.data.selection import evaluation_sets
from po_cluster.evaluate.metrics import Evaluator
from po_cluster.model.aligned import AlignedCLIP
from po_cluster.model.loading import WEIGHTS_FILE, load_clip
from po_cluster.model.pretrain import PretrainConfig, pretrain
from po_cluster.store.manifest import sha256_file


def evaluate_weights(name: str, weights: Path) -> dict[str, float]:
    """Base-model metrics on the fixed evaluation sets (t is irrelevant: W = I)."""
    model = AlignedCLIP(load_clip(ModelConfig(name=name, pretrained=str(weights))), "frozen")
    return Evaluator.build(model, evaluation_sets()).metrics(0.0)


def _card_markdown(card: dict) -> str:
    metrics = "\n".join(f"| {k} | {v:.3f} |" for k, v in card["metrics"].items())
    return f"""# typo-shapes base model ({card['architecture']})

Pretrained by `jobs/pretrain_base.py` on the typo-shapes world's web-like mix
({', '.join(f'{k} {v:.0%}' for k, v in card['pretrain_mix'].items())}); the
attacked images are captioned with the written word, so the model reads and is
fooled by typographic attacks as CLIP is. Captions often name the object's size,
colour and pattern, which it keeps knowing (`retention`: colour and size, zero-shot).
Each class carries its stereotyped pattern in {card.get('stereotype_share', 0.95):.0%} of
its pretraining images, and captions of an object that breaks it name the stereotyped
pattern {card.get('stereotyped_caption', 0.5):.0%} of the time, so the model names the pattern partly by the class
(`bias_gap`: pattern accuracy on stereotyped minus counter-stereotyped images).
Load it with `pretrained: {SHIPPED_BASE}`.

- weights: `{WEIGHTS_FILE}` (sha256 `{card['sha256']}`)
- seed {card['config']['seed']}, {card['config']['steps']} steps of batch {card['config']['batch_size']},
  {card['train_seconds']:.0f} s on {card['device']}

| fixed evaluation set (1,000 images each) | accuracy |
|---|---|
{metrics}
"""


def write_base_model(cfg: PretrainConfig, out_dir: str | Path) -> dict:
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    start = time.time()
    last = [start]

    def progress(step: int, loss: float) -> None:
        if time.time() - last[0] > 30 or step == cfg.steps - 1:
            last[0] = time.time()
            print(f"step {step + 1}/{cfg.steps} loss {loss:.3f} ({time.time() - start:.0f} s)", flush=True)

    model = pretrain(cfg, progress)
    seconds = time.time() - start
    weights = out / WEIGHTS_FILE
    save_file({k: v.detach().contiguous() for k, v in model.state_dict().items()}, str(weights))
    return write_card(cfg, weights, seconds)


def write_card(cfg: PretrainConfig, weights: Path, train_seconds: float) -> dict:
    """card.json and CARD.md beside `weights`, pretrained by `cfg` in `train_seconds`: the recipe, the
    world's mix, and the metrics on the fixed evaluation sets (measured here)."""
    card = {"architecture": cfg.name, "config": cfg.model_dump(mode="json"), "pretrain_mix": world.PRETRAIN_MIX,
            "stereotype_share": world.STEREOTYPE_SHARE, "stereotyped_caption": world.STEREOTYPED_CAPTION,
            "classes": list(world.SHAPES),
            "sha256": sha256_file(weights), "metrics": evaluate_weights(cfg.name, weights),
            "train_seconds": train_seconds, "device": "cpu", "torch": torch.__version__}
    (weights.parent / "card.json").write_text(json.dumps(card, indent=2) + "\n")
    (weights.parent / "CARD.md").write_text(_card_markdown(card))
    return card
