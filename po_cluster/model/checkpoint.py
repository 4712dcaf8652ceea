"""Self-describing checkpoints: safetensors weights, model config, training
config, metrics, and a sha256 manifest written last. A model whose image tower
trained also keeps θ_ref, the starting values of those weights
(`reference.safetensors`), so that t = 0 serves exactly the starting model.
A LoRA checkpoint stores only the adapters and W: its base tower is loaded from
`pretrained` (checked against the sha256 recorded at training, where it is a file).

A folder without a valid manifest, or whose bytes differ from it, is never
loaded; nothing is ever unpickled.
"""
from __future__ import annotations

import functools
import json
from pathlib import Path

import torch
from pydantic import TypeAdapter, ValidationError
from safetensors.torch import load_file, save_file

from po_cluster.config import ImageTowerMode, LoraTowerConfig, ModelConfig, PreprocessConfig
from po_cluster.model.aligned import AlignedCLIP
from po_cluster.model.loading import is_weights_file, load_clip, preprocess_config, resolve_weights
from po_cluster.store.manifest import MANIFEST, ManifestError, sha256_file, verify_manifest, write_manifest

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
    description = {"architecture": model.name, "pretrained": model_cfg.pretrained,
                   "image_tower": mode if isinstance(mode, str) else mode.model_dump(mode="json"),
                   "embed_dim": model.spectral.dim, "logit_scale": model.logit_scale,
                   "classnames": list(classnames), "prompt_template": template,
                   # open_clip's preprocessing of the start (its tag's, when it was one): the release is built
                   # from bare weights, and must see the pixels its start was pretrained on
                   "preprocess": model.preprocess.to_open_clip()}
    if model.adapter_scale is not None:  # the release needs its base: say which bytes it was
        description["pretrained_sha256"] = _base_sha256(model_cfg.pretrained, model_cfg.cache_dir)
    return description


def _base_sha256(pretrained: str | None, cache_dir: str | None) -> str | None:
    """sha256 of the base weights when they are a file we read (shipped, local, s3://); None for an
    open_clip tag, whose download open_clip itself checks."""
    if pretrained is None or not is_weights_file(pretrained):
        return None
    path = resolve_weights(pretrained, cache_dir)
    stat = path.stat()
    return _file_sha256(str(path), stat.st_mtime_ns, stat.st_size)


@functools.lru_cache(maxsize=8)
def _file_sha256(path: str, mtime_ns: int, size: int) -> str:
    # Keyed by mtime and size too: a LoRA run describes its base at every checkpoint, and hashing a
    # ViT's weights costs seconds; a file changed in place is hashed again.
    return sha256_file(Path(path))


def load_trained_state(model: AlignedCLIP, state: dict[str, torch.Tensor], where: str) -> None:
    """Load the entries training changes (every entry, or with LoRA the adapters and W), exactly those."""
    expected = model.trained_keys()
    missing, unexpected = sorted(expected - set(state)), sorted(set(state) - expected)
    if missing or unexpected:
        raise CheckpointError(f"{where} does not fit image_tower={model.image_tower!r}: missing {missing[:5]}, "
                              f"unexpected {unexpected[:5]}")
    try:
        model.load_state_dict(state, strict=model.adapter_scale is None)
    except Exception as error:
        raise CheckpointError(f"{where} does not load into {model.name}: {error}") from None


def save_checkpoint(folder: str | Path, model: AlignedCLIP, description: dict, training: dict,
                    metrics: dict) -> Path:
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    (folder / MANIFEST).unlink(missing_ok=True)  # an overwrite in progress is incomplete
    keys = model.trained_keys()
    state = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items() if k in keys}
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


def recorded_preprocess(description: dict, where: str) -> PreprocessConfig | None:
    """The preprocessing a model.json records (None in one written before it did: the architecture's)."""
    recorded = description.get("preprocess")
    if recorded is None:
        return None
    from po_cluster.data.images import Preprocess

    try:
        return preprocess_config(Preprocess.from_open_clip(recorded))
    except (ValueError, TypeError, AttributeError) as error:
        raise CheckpointError(f"{where}: {MODEL_JSON}: preprocess {recorded!r} is not usable: {error}") from None


def _architecture_config(description: dict, mode: ImageTowerMode, folder: Path) -> ModelConfig:
    """What to build before loading the weights: the bare architecture, or for LoRA its base model."""
    preprocess = recorded_preprocess(description, str(folder))
    if not isinstance(mode, LoraTowerConfig):
        return ModelConfig(name=description["architecture"], pretrained=None, preprocess=preprocess)
    cfg = ModelConfig(name=description["architecture"], pretrained=description.get("pretrained"),
                      preprocess=preprocess)
    recorded = description.get("pretrained_sha256")
    if recorded is not None and _base_sha256(cfg.pretrained, cfg.cache_dir) != recorded:
        raise CheckpointError(f"{folder}: a LoRA release of base {cfg.pretrained!r}, whose weights have changed "
                              f"since it was trained (sha256 {recorded[:12]}… expected)")
    return cfg


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
    mode = image_tower_mode(description)
    model = AlignedCLIP(load_clip(_architecture_config(description, mode, folder)), mode)
    try:
        state = load_file(str(folder / WEIGHTS))
    except Exception as error:  # safetensors raises several types for corrupt headers
        raise CheckpointError(f"{folder}: cannot read {WEIGHTS}: {error}") from None
    load_trained_state(model, state, f"{folder}: {WEIGHTS}")
    if model.reference:
        _load_reference(model, folder)
    model.logit_scale = float(description.get("logit_scale", model.logit_scale))
    return model.to(device).eval(), description
