"""A release as open_clip hands out a model: (model, preprocess, tokenizer), for notebooks.

The model is a plain open_clip model with the release folded in at t (model/export.py: the tower at
θ(t), W(t) in both projections), so `encode_image(preprocess(image)[None], normalize=True)` and
`encode_text(tokenizer(texts), normalize=True)` give the aligned embeddings at t that serving gives.
`preprocess` is po-cluster's image path with the release's own open_clip preprocessing (EXIF
orientation applied, any mode to RGB, then the model's resize, crop and normalisation), the function
every other stage uses; the model's `visual.preprocess_cfg` says the same settings, as open_clip sets it.
"""
from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from po_cluster.data.images import Preprocess, to_pixels, upright_rgb
from po_cluster.model.export import folded_clip
from po_cluster.model.loading import to_model_input
from po_cluster.model.targets import open_target


class ImagePreprocess:
    """PIL image (or uint8 [H, W, 3] array) → the model's input [3, S, S], as open_clip's preprocess is called."""

    def __init__(self, preprocess: Preprocess) -> None:
        self.preprocess = preprocess

    def __call__(self, image: Image.Image | np.ndarray) -> torch.Tensor:
        pixels = np.asarray(image, dtype=np.uint8) if isinstance(image, np.ndarray) else to_pixels(upright_rgb(image))
        return to_model_input(pixels[None], self.preprocess)[0]

    def __repr__(self) -> str:
        return f"ImagePreprocess({self.preprocess})"


def load_release(target: str | Path, t: float = 1.0, store: str | None = None,
                 device: str | torch.device = "cpu") -> tuple[torch.nn.Module, ImagePreprocess, Callable]:
    """(model, preprocess, tokenizer) of `target` (anything `evaluate` takes) at t, in open_clip's shapes."""
    from open_clip.model import set_model_preprocess_cfg

    opened = open_target(target, store)
    model = folded_clip(opened.model, t).to(device).eval()
    set_model_preprocess_cfg(model, opened.model.preprocess.to_open_clip())
    tokenizer = getattr(opened.model.tokenizer, "tokenizer", opened.model.tokenizer)  # open_clip's own
    return model, ImagePreprocess(opened.model.preprocess), tokenizer
