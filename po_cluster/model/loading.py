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

from po_cluster.config import SHIPPED_BASE, ModelConfig
from po_cluster.data.images import square_pixels

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
    image_size: int
    mean: tuple[float, ...]
    std: tuple[float, ...]


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
    with _quiet_root_logger():
        model, _, _ = open_clip.create_model_and_transforms(cfg.name, pretrained=tag, cache_dir=cfg.cache_dir)
        tokenizer = open_clip.get_tokenizer(cfg.name)
    if local is not None:
        load_weights(model, resolve_weights(local, cfg.cache_dir))
    model.eval()
    visual = model.visual
    size = visual.image_size if isinstance(visual.image_size, int) else visual.image_size[0]
    return LoadedCLIP(model, tokenizer, cfg.name, int(size),
                      tuple(visual.image_mean or open_clip.OPENAI_DATASET_MEAN),
                      tuple(visual.image_std or open_clip.OPENAI_DATASET_STD))


def to_model_input(images: np.ndarray | torch.Tensor, image_size: int, mean: tuple, std: tuple,
                   device: torch.device | None = None) -> torch.Tensor:
    """uint8 [N, H, W, 3] → normalised float [N, 3, S, S] (resize shorter side, centre crop), on `device`.

    The resize is the image path's own (data.images.square_pixels), not a second one here:
    served and embedded images, decoded at full size, get the pixels a training record of
    this model's size holds. On CUDA the uint8 batch goes over pinned and non-blocking, and is
    converted and normalised there: a quarter of the bytes of a float batch cross the bus.
    """
    array = images.cpu().numpy() if isinstance(images, torch.Tensor) else np.asarray(images)
    if array.shape[1:3] != (image_size, image_size):
        array = np.stack([square_pixels(image, image_size) for image in array]) if len(array) else \
            np.empty((0, image_size, image_size, 3), dtype=np.uint8)
    elif not array.flags.writeable:
        array = array.copy()  # torch does not share read-only memory (decoded or zero-copy arrays); uint8, cheap
    raw = torch.from_numpy(array)
    if device is not None and device.type == "cuda":
        raw = raw.pin_memory().to(device, non_blocking=True)
    x = raw.permute(0, 3, 1, 2).float().div_(255.0)
    mean_t = torch.tensor(mean, device=x.device).view(1, 3, 1, 1)
    std_t = torch.tensor(std, device=x.device).view(1, 3, 1, 1)
    return ((x - mean_t) / std_t).to(device) if device is not None else (x - mean_t) / std_t
