"""Self-describing checkpoints: safetensors weights, model config, training
config, metrics, and a sha256 manifest written last. A model whose image tower
trained also keeps θ_ref, the starting values of those weights
(`reference.safetensors`), so that t = 0 serves exactly the starting model.

A folder without a valid manifest, or whose bytes differ from it, is never
loaded; nothing is ever unpickled.
"""
from __future__ import annotations

import json
from pathlib import Path

import torch
from pydantic import TypeAdapter, ValidationError
from safetensors.torch import load_file, save_file

from po_cluster.config import ImageTowerMode, LastBlocks, ModelConfig
from po_cluster.model.aligned import AlignedCLIP
from po_cluster.model.loading import load_clip
from po_cluster.store.manifest import MANIFEST, ManifestError, verify_manifest, write_manifest

WEIGHTS = "model.safetensors"
REFERENCE = "reference.safetensors"
MODEL_JSON = "model.json"
TRAINING_JSON = "training.json"
METRICS_JSON = "metrics.json"


ImageTowerAdapter: TypeAdapter[ImageTowerMode] = TypeAdapter(ImageTowerMode)

# One error for every checkpoint that must not be loaded, whether the manifest check or the loader finds out.
CheckpointError = ManifestError


def model_description(model: AlignedCLIP, model_cfg: ModelConfig, classnames: tuple[str, ...],
                      template: str) -> dict:
    mode = model.image_tower
    return {"architecture": model.name, "pretrained": model_cfg.pretrained,
            "image_tower": mode.model_dump() if isinstance(mode, LastBlocks) else mode,
            "embed_dim": model.spectral.dim, "logit_scale": model.logit_scale,
            "classnames": list(classnames), "prompt_template": template}


def save_checkpoint(folder: str | Path, model: AlignedCLIP, description: dict, training: dict,
                    metrics: dict) -> Path:
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    (folder / MANIFEST).unlink(missing_ok=True)  # an overwrite in progress is incomplete
    state = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
    save_file(state, str(folder / WEIGHTS))
    if model.reference:
        save_file({k: v.detach().cpu().contiguous() for k, v in model.reference.items()}, str(folder / REFERENCE))
    else:
        (folder / REFERENCE).unlink(missing_ok=True)
    for name, content in ((MODEL_JSON, description), (TRAINING_JSON, training), (METRICS_JSON, metrics)):
        (folder / name).write_text(json.dumps(content, indent=2, default=str) + "\n")
    write_manifest(folder)
    return folder


def image_tower_mode(description: dict) -> ImageTowerMode:
    """The image tower mode a model.json records (a checkpoint without one trained no tower)."""
    mode = description.get("image_tower", "frozen")
    try:
        return ImageTowerAdapter.validate_python(mode)
    except ValidationError as error:
        raise CheckpointError(f"{MODEL_JSON}: image_tower {mode!r} is not a known mode: {error}") from None


def _load_reference(model: AlignedCLIP, folder: Path) -> None:
    if not (folder / REFERENCE).is_file():
        raise CheckpointError(f"{folder}: image_tower={model.image_tower!r} trained the image tower, but "
                              f"{REFERENCE} (its starting weights, which t = 0 serves) is missing")
    try:
        model.set_reference(load_file(str(folder / REFERENCE)))
    except Exception as error:  # safetensors raises several types for corrupt headers
        raise CheckpointError(f"{folder}: {REFERENCE} does not fit the model: {error}") from None


def read_json(folder: Path, name: str) -> dict:
    try:
        return json.loads((folder / name).read_text())
    except (OSError, json.JSONDecodeError) as error:
        raise CheckpointError(f"{folder}: cannot read {name}: {error}") from None


def load_checkpoint(folder: str | Path, device: str | torch.device = "cpu",
                    verify: bool = True) -> tuple[AlignedCLIP, dict]:
    """Verify, then build the architecture and load the weights. Returns (model, model.json).

    verify=False only for a folder ArtifactStore.pull_release has just returned: it verified every
    file already, and hashing a ViT's weights twice costs seconds at every start."""
    folder = Path(folder)
    if verify:
        verify_manifest(folder)
    description = read_json(folder, MODEL_JSON)
    loaded = load_clip(ModelConfig(name=description["architecture"], pretrained=None))
    model = AlignedCLIP(loaded, image_tower_mode(description))
    try:
        state = load_file(str(folder / WEIGHTS))
        model.load_state_dict(state, strict=True)
    except Exception as error:
        raise CheckpointError(f"{folder}: {WEIGHTS} does not load into {description['architecture']}: {error}") \
            from None
    if model.reference:
        _load_reference(model, folder)
    model.logit_scale = float(description.get("logit_scale", model.logit_scale))
    return model.to(device).eval(), description
