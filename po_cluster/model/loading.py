"""open_clip loading for any architecture, and the one conversion to model input.

`pretrained` may be an open_clip tag (downloaded by open_clip itself), a local
.safetensors file, an s3:// URI, or the shipped base model. Files we read are
safetensors only: nothing read from disk or storage is ever unpickled.
"""
from __future__ import annotations

import logging
from collections.abc import Callable
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import open_clip
import torch
from safetensors.torch import load_file

from po_cluster.config import SHIPPED_BASE, ModelConfig, PreprocessConfig
from po_cluster.data.images import Preprocess

CONFIG_DIR = Path(__file__).parent / "configs"
ASSETS_DIR = Path(__file__).resolve().parent.parent / "assets"
SHIPPED_BASE_DIR = ASSETS_DIR / "typo_shapes_base"
WEIGHTS_FILE = "open_clip_model.safetensors"


class ModelLoadError(RuntimeError):
    """The model or its weights cannot be loaded; the message says which and why."""


def register_configs() -> None:
    """Make the package's own architectures (po-tiny-rn, …) known to open_clip."""
    if "po-tiny-rn" not in open_clip.list_models():
        open_clip.add_model_config(CONFIG_DIR)


@dataclass
class LoadedCLIP:
    model: open_clip.model.CLIP
    tokenizer: Callable
    name: str
    preprocess: Preprocess


class LazyTokenizer:
    """open_clip's tokenizer of `name`, made at its first use: an image-only user (the embed job's
    images, a SigLIP tower) never needs one, and some (a Hugging Face tokenizer) are downloaded."""

    def __init__(self, name: str, cache_dir: str | None = None) -> None:
        self.name, self.cache_dir = name, cache_dir
        self._tokenizer: Callable | None = None

    @property
    def tokenizer(self) -> Callable:
        if self._tokenizer is None:
            with _quiet_root_logger():
                self._tokenizer = open_clip.get_tokenizer(self.name, cache_dir=self.cache_dir)
        return self._tokenizer

    def __call__(self, texts: list[str]) -> torch.Tensor:
        return self.tokenizer(texts)

    def __getattr__(self, attribute: str):  # context_length, vocab_size, …: the tokenizer's own
        if attribute.startswith("_"):
            raise AttributeError(attribute)
        return getattr(self.tokenizer, attribute)


def architecture_config(name: str) -> dict:
    """open_clip's config of architecture `name` (ours included); ModelLoadError naming it when unknown."""
    register_configs()
    cfg = open_clip.get_model_config(name)
    if cfg is None:
        raise ModelLoadError(f"unknown open_clip architecture {name!r}")
    return cfg


def _tag_preprocess(name: str, tag: str) -> dict:
    """The preprocessing open_clip's pretrained tag `tag` of `name` declares ({} for a tag without any)."""
    cfg = open_clip.get_pretrained_cfg(name, tag)
    if not cfg:
        tags = open_clip.list_pretrained_tags_by_model(name)
        raise ModelLoadError(f"preprocess {tag!r}: not an open_clip pretrained tag of {name} "
                             f"(its tags: {', '.join(tags) or 'none'})")
    return {k: v for k, v in cfg.items() if k in ("mean", "std", "interpolation", "resize_mode", "fill_color")}


def resolve_preprocess(name: str, pretrained: str | None = None,
                       override: str | PreprocessConfig | None = None) -> Preprocess:
    """The input conversion open_clip gives model `name` loaded with `pretrained`, read from open_clip's
    registry (no weights are built or downloaded): its defaults, the tower's image size, the pretrained
    tag's own settings when `pretrained` is a tag (SigLIP's squash and 0.5 mean, …), then `override`:
    another tag's settings (for that tag's weights kept as a file, which open_clip cannot tell), or
    settings one by one."""
    vision = architecture_config(name).get("vision_cfg", {})
    cfg: dict = {"size": vision.get("image_size", 224)}
    if pretrained is not None and not is_weights_file(pretrained) and open_clip.get_pretrained_cfg(name, pretrained):
        cfg |= _tag_preprocess(name, pretrained)
    if isinstance(override, str):
        cfg |= _tag_preprocess(name, override)
    elif override is not None:
        cfg |= override.model_dump(exclude_none=True)
    try:
        return Preprocess.from_open_clip(cfg)
    except ValueError as error:
        raise ModelLoadError(f"{name}: {error}") from None


def preprocess_config(preprocess: Preprocess) -> PreprocessConfig:
    """A resolved conversion as the override that reproduces it (what a checkpoint's model.json keeps)."""
    geometry = preprocess.geometry
    return PreprocessConfig(resize_mode=geometry.resize_mode, interpolation=geometry.interpolation,
                            fill_color=geometry.fill_color, mean=preprocess.mean, std=preprocess.std)


def _is_local_file(pretrained: str) -> bool:
    return pretrained.endswith(".safetensors") or "/" in pretrained or pretrained.startswith(".")


def is_weights_file(pretrained: str) -> bool:
    """Whether `pretrained` names weights we read ourselves (shipped, s3:// or local), not an open_clip tag."""
    return pretrained == SHIPPED_BASE or pretrained.startswith("s3://") or _is_local_file(pretrained)


def resolve_weights(pretrained: str, cache_dir: str | None = None) -> Path:
    """A local safetensors path for `pretrained` (shipped, local or s3://)."""
    if pretrained == SHIPPED_BASE:
        path = SHIPPED_BASE_DIR / WEIGHTS_FILE
    elif pretrained.startswith("s3://"):
        from po_cluster.store.artifacts import fetch_file

        path = fetch_file(pretrained, cache_dir)
    else:
        path = Path(pretrained).expanduser()
    if not path.is_file():
        raise ModelLoadError(f"weights file not found: {path} (from pretrained={pretrained!r})")
    if path.suffix != ".safetensors":
        raise ModelLoadError(f"refusing to load {path}: only .safetensors weights are read (no pickles)")
    return path


def load_weights(model: torch.nn.Module, path: Path) -> None:
    try:
        state = load_file(str(path))
    except Exception as error:  # safetensors raises several types for corrupt headers
        raise ModelLoadError(f"cannot read weights {path}: {error}") from None
    missing, unexpected = model.load_state_dict(state, strict=False)
    if missing or unexpected:
        raise ModelLoadError(
            f"weights {path} do not fit the architecture: missing {sorted(missing)[:5]}, "
            f"unexpected {sorted(unexpected)[:5]}"
        )


@contextmanager
def _quiet_root_logger():
    """open_clip logs its every step on the root logger (and warns when built without
    weights, which we do on purpose before loading safetensors ourselves)."""
    root = logging.getLogger()
    level = root.level
    root.setLevel(logging.ERROR)
    try:
        yield
    finally:
        root.setLevel(level)


def load_clip(cfg: ModelConfig) -> LoadedCLIP:
    """Build the open_clip model `cfg.name` and load `cfg.pretrained` into it."""
    register_configs()
    if cfg.name not in open_clip.list_models():
        raise ModelLoadError(f"unknown open_clip architecture {cfg.name!r}")
    pretrained = cfg.pretrained
    local = pretrained if pretrained is not None and is_weights_file(pretrained) else None
    tag = pretrained if local is None else None
    # Tags go through open_clip's own loader (it downloads from the hub); files through ours.
    preprocess = resolve_preprocess(cfg.name, pretrained, cfg.preprocess)
    with _quiet_root_logger():
        model = open_clip.create_model(cfg.name, pretrained=tag, cache_dir=cfg.cache_dir)
    if local is not None:
        load_weights(model, resolve_weights(local, cfg.cache_dir))
    model.eval()
    size = model.visual.image_size
    if (size if isinstance(size, int) else tuple(size)) not in (preprocess.size, (preprocess.size,) * 2):
        raise ModelLoadError(f"{cfg.name}: its image tower takes {size} pixels, its preprocessing "
                             f"{preprocess.size}")
    return LoadedCLIP(model, LazyTokenizer(cfg.name, cfg.cache_dir), cfg.name, preprocess)


def to_model_input(images: np.ndarray | torch.Tensor, preprocess: Preprocess,
                   device: torch.device | None = None) -> torch.Tensor:
    """uint8 [N, H, W, 3] → normalised float [N, 3, S, S] by the model's `preprocess`, on `device`.

    The resize and crop are the image path's own (data.images.Geometry), not a second one here:
    served and embedded images, decoded at full size, get the pixels a training record prepared
    for this model holds, and those open_clip's transform gives. Images already S × S are taken
    as fitted (a record's). On CUDA the uint8 batch goes over pinned and non-blocking, and is
    converted and normalised there: a quarter of the bytes of a float batch cross the bus.
    """
    size, mean, std = preprocess.size, preprocess.mean, preprocess.std
    array = images.cpu().numpy() if isinstance(images, torch.Tensor) else np.asarray(images)
    if array.shape[1:3] != (size, size):
        array = np.stack([preprocess.geometry.fit_pixels(image) for image in array]) if len(array) else \
            np.empty((0, size, size, 3), dtype=np.uint8)
    elif not array.flags.writeable:
        array = array.copy()  # torch does not share read-only memory (decoded or zero-copy arrays); uint8, cheap
    raw = torch.from_numpy(array)
    if device is not None and device.type == "cuda":
        raw = raw.pin_memory().to(device, non_blocking=True)
    x = raw.permute(0, 3, 1, 2).float().div_(255.0)
    mean_t = torch.tensor(mean, device=x.device).view(1, 3, 1, 1)
    std_t = torch.tensor(std, device=x.device).view(1, 3, 1, 1)
    return ((x - mean_t) / std_t).to(device) if device is not None else (x - mean_t) / std_t
