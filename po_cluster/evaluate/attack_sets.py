"""Evaluation on real typographic attack sets laid out as PAINT and RTA-100 are.

Both sets (PAINT: github.com/mlfoundations/patching, `typographic_attack_data.zip`;
RTA-100: github.com/azuma164/Defense-Prefix, `rta100.zip`) carry the annotation
in each file name: `label=<true class>_text=<written text>.<ext>`, e.g.
`label=dog_text=cat.png` is a dog with "cat" written on it. What we accept:
- any folder (local or s3://) whose image files, at any depth, are all named so;
  point at the folder holding the images (RTA-100: `ours/data`, PAINT:
  `typographic_attacks`). Non-image files are ignored; an image named otherwise
  is an error naming it.
- `.png .jpg .jpeg .webp .bmp .tif .tiff`, any size (fitted to the model's input by
  its own open_clip preprocessing).
- the label runs to the first `_text=`, so labels may contain underscores; an
  optional `_<digits>` just before the extension is taken as a duplicate
  counter (`label=dog_text=cat_2.png`), not part of the text.
- underscores in names read as spaces ("teddy_bear" → "teddy bear").

As in those papers, the candidate set is the union of true labels and written
texts, prompted with "a photo of a {}."; accuracy is against the true label, and
attack success is the fraction predicted as the written text.
"""
from __future__ import annotations

import re
from dataclasses import dataclass

import numpy as np
import torch

from po_cluster.data.images import Geometry, is_image_name
from po_cluster.data.labelled import display_name
from po_cluster.data.pairs import DataError, list_files, load_images
from po_cluster.data.records import ImageSet
from po_cluster.evaluate.metrics import embed_images, embed_prompts
from po_cluster.model.aligned import AlignedCLIP
from po_cluster.store.location import join

ATTACK_TEMPLATE = "a photo of a {}."
_NAME = re.compile(r"^label=(?P<label>.+?)_text=(?P<text>.+?)(?:_(?P<copy>\d+))?$")


def parse_attack_name(file_name: str) -> tuple[str, str]:
    """(true label, written text) from `label=<label>_text=<text>[_<n>].<ext>`."""
    base = file_name.rsplit("/", 1)[-1]
    stem = base.rsplit(".", 1)[0]
    match = _NAME.match(stem)
    if match is None:
        raise DataError(f"{file_name}: not named label=<true class>_text=<written text>.<ext>")
    label, text = display_name(match["label"]), display_name(match["text"])
    if not label or not text:
        raise DataError(f"{file_name}: empty label or text in the file name")
    return label, text


@dataclass(frozen=True)
class AttackSet:
    images: ImageSet  # labels = true class, written = attack text, both indices into classnames
    files: tuple[str, ...]  # relative to the folder, in row order


def read_attack_set(folder: str, geometry: Geometry) -> AttackSet:
    """Every attack image under `folder`, sorted by name, fitted by `geometry` (the model's); candidates
    sorted for a stable order."""
    files = [name for name in list_files(folder) if is_image_name(name)]
    if not files:
        raise DataError(f"{folder}: no images (expected files named label=<class>_text=<text>.png)")
    parsed = [parse_attack_name(join(folder, name)) for name in files]
    classnames = tuple(sorted({name for pair in parsed for name in pair}))
    index = {name: i for i, name in enumerate(classnames)}
    labels = np.array([index[label] for label, _ in parsed], dtype=np.int64)
    written = np.array([index[text] for _, text in parsed], dtype=np.int64)
    images = load_images([join(folder, name) for name in files], geometry)
    return AttackSet(ImageSet(images, labels, written, classnames), tuple(files))


def score(logps: torch.Tensor, labels: np.ndarray, written: np.ndarray) -> dict[str, float]:
    """Accuracy against the true label and attack success (predicted the written text)."""
    predicted = logps.argmax(-1).cpu().numpy()
    return {"accuracy": float(np.mean(predicted == labels)),
            "attack_success": float(np.mean(predicted == written)), "n": float(len(labels))}


@dataclass
class AttackResult:
    metrics: dict[str, float]
    rows: list[dict]  # per image: file, label, text, predicted


@torch.no_grad()
def evaluate_attack_set(model: AlignedCLIP, attack_set: AttackSet, t: float = 1.0,
                        template: str = ATTACK_TEMPLATE) -> AttackResult:
    """Zero-shot classification of every image over the union candidate set, at t (θ(t) and σ^t)."""
    images = attack_set.images
    text_emb = embed_prompts(model, [template.format(name) for name in images.classnames])
    image_emb = embed_images(model, images.images, t=t)
    device = next(model.spectral.parameters()).device
    logps = model.logprobs(image_emb.to(device), text_emb.to(device), t).cpu()
    predicted = logps.argmax(-1).numpy()
    names = images.classnames
    rows = [{"file": file, "label": names[label], "text": names[text], "predicted": names[pred]}
            for file, label, text, pred in zip(attack_set.files, images.labels, images.written, predicted,
                                               strict=True)]
    return AttackResult(score(logps, images.labels, images.written), rows)
