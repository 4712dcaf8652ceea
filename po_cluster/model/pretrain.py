"""Pretraining of the tiny base model on the typo-shapes world's "web-like" mix.

A standard CLIP contrastive loss, except that captions repeated inside a batch
(8 classes, batch 128) count as positives of each other instead of false
negatives: targets are spread uniformly over all images sharing a caption.
"""
from __future__ import annotations

import math

import numpy as np
import open_clip
import torch
import torch.nn.functional as F
from pydantic import Field

from po_cluster.config import Strict
from po_cluster.data import world
from po_cluster.model.loading import register_configs, resolve_preprocess, to_model_input


class PretrainConfig(Strict):
    """`jobs/pretrain_base.py`: contrastive pretraining of the tiny base model from random init.

    The run is deterministic from these fields, so the defaults are part of the shipped model's
    recipe (its card records the values it was made with).
    """

    name: str = Field("po-tiny-rn", description="open_clip architecture name")
    steps: int = Field(3600, gt=0, description="the shipped base model was trained for 3600")
    # A contrastive batch needs at least one negative per image.
    batch_size: int = Field(128, ge=2)
    lr: float = Field(2e-3, gt=0)
    weight_decay: float = Field(0.1, ge=0)
    warmup_steps: int = Field(100, ge=0)
    seed: int = Field(0, ge=0, description="torch init and the batch stream (numpy needs it >= 0)")


def contrastive_loss(image_emb: torch.Tensor, text_emb: torch.Tensor, logit_scale: torch.Tensor,
                     caption_ids: torch.Tensor) -> torch.Tensor:
    """Symmetric InfoNCE with multi-positive targets for identical captions."""
    logits = logit_scale * image_emb @ text_emb.T
    same = (caption_ids[:, None] == caption_ids[None, :]).float()
    targets = same / same.sum(dim=1, keepdim=True)
    return 0.5 * (F.cross_entropy(logits, targets) + F.cross_entropy(logits.T, targets))


def _lr_at(step: int, cfg: PretrainConfig) -> float:
    if step < cfg.warmup_steps:
        return cfg.lr * (step + 1) / cfg.warmup_steps
    progress = (step - cfg.warmup_steps) / max(1, cfg.steps - cfg.warmup_steps)
    return cfg.lr * 0.5 * (1 + math.cos(math.pi * progress))


def pretrain(cfg: PretrainConfig, progress=None) -> open_clip.model.CLIP:
    """Train `cfg.name` from random init; deterministic given the seed (on one thread layout)."""
    register_configs()
    torch.manual_seed(cfg.seed)
    model = open_clip.create_model(cfg.name, pretrained=None)
    tokenizer = open_clip.get_tokenizer(cfg.name)
    preprocess = resolve_preprocess(cfg.name)
    optimizer = torch.optim.AdamW(model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    rng = np.random.default_rng(cfg.seed)
    model.train()
    for step in range(cfg.steps):
        images, captions, _ = world.pretraining_batch(cfg.batch_size, rng)
        unique = {caption: i for i, caption in enumerate(dict.fromkeys(captions))}
        caption_ids = torch.tensor([unique[c] for c in captions])
        for group in optimizer.param_groups:
            group["lr"] = _lr_at(step, cfg)
        image_emb = model.encode_image(to_model_input(images, preprocess), normalize=True)
        text_emb = model.encode_text(tokenizer(captions), normalize=True)
        loss = contrastive_loss(image_emb, text_emb, model.logit_scale.exp().clamp(max=100), caption_ids)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        if progress is not None:
            progress(step, loss.item())
    model.eval()
    return model
