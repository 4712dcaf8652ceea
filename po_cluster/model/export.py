"""Export an aligned checkpoint as a stock open_clip checkpoint at one t: the image
tower's weights at θ(t) = θ_ref + t·(θ − θ_ref) and W(t) folded in.

The aligned embedding is normalize(W·normalize(f)) = normalize(W·f) (the inner
normalisation is a positive scale, which the outer one removes), and f ends in
one linear map per tower. Folding W into that map therefore gives a plain
open_clip model whose normalised embeddings are the aligned ones:
    f = h·P        → h·(P·M)                      (ViT `visual.proj`, text `text_projection` Parameter)
    f = h·Aᵀ + b   → h·(Aᵀ·M) + b·M               (nn.Linear: ModifiedResNet `attnpool.c_proj`, …)
with M = W(t) acting on row vectors as the spectral layer does (z ↦ z·M).
`open_clip.create_model_and_transforms(architecture, pretrained=<file>)` loads the
result; no po-cluster code is needed to use it.
"""
from __future__ import annotations

import copy
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file
from torch import nn

from po_cluster.model.aligned import AlignedCLIP
from po_cluster.model.checkpoint import load_checkpoint
from po_cluster.model.lora import merge_adapters


class ExportError(RuntimeError):
    """The model has no projection we know how to fold W into; the message names the tower."""


@torch.no_grad()
def _fold(owner: nn.Module, attr: str, matrix: torch.Tensor, where: str) -> None:
    """Replace the projection `owner.attr` (a Parameter used as x @ P, or an nn.Linear) by its product with M."""
    proj = getattr(owner, attr, None)
    if isinstance(proj, nn.Linear):
        weight = proj.weight.double()  # [out, in]; y = x Aᵀ + b
        proj.weight.copy_((weight.T @ matrix).T.to(proj.weight.dtype))
        if proj.bias is not None:
            proj.bias.copy_((proj.bias.double() @ matrix).to(proj.bias.dtype))
    elif isinstance(proj, torch.Tensor):
        proj.copy_((proj.double() @ matrix).to(proj.dtype))
    else:
        raise ExportError(f"{where}: no projection to fold W into ({type(proj).__name__})")


def _image_projection(visual: Any) -> tuple[nn.Module, str]:
    # `visual` is any of open_clip's towers, told apart by their submodules (see aligned._image_blocks).
    if hasattr(visual, "attnpool"):  # ModifiedResNet: attention pooling ends in c_proj
        return visual.attnpool, "c_proj"
    if getattr(visual, "proj", None) is not None:  # VisionTransformer
        return visual, "proj"
    head = getattr(visual, "head", None)  # TimmModel with a linear projection head
    if head is not None and isinstance(getattr(head, "proj", None), nn.Linear):
        return head, "proj"
    raise ExportError(f"image tower {type(visual).__name__}: no final linear projection to fold W into")


def _text_projection(clip: nn.Module) -> tuple[nn.Module, str]:
    if getattr(clip, "text_projection", None) is not None:  # CLIP
        return clip, "text_projection"
    text = getattr(clip, "text", None)  # CustomTextCLIP
    if text is not None and getattr(text, "text_projection", None) is not None:
        return text, "text_projection"
    if text is not None and isinstance(getattr(text, "proj", None), nn.Linear):  # HF text encoder
        return text, "proj"
    raise ExportError(f"text tower of {type(clip).__name__}: no final linear projection to fold W into")


def folded_clip(model: AlignedCLIP, t: float = 1.0) -> nn.Module:
    """A copy of the open_clip model with the image tower at θ(t) and W(t) folded into both towers'
    last linear maps: its embeddings are the aligned model's at t."""
    matrix = model.spectral.matrix(t).detach().double().cpu()
    clip = copy.deepcopy(model.clip).cpu().float()
    merge_adapters(clip.visual, t)  # LoRA: W0 + t·s·B·A, and the stock layers put back
    if t != 1.0 and model.reference:
        with torch.no_grad():
            own = dict(clip.visual.named_parameters())
            for name, value in model.tower_state(t).items():
                own[name].copy_(value)
    _fold(*_image_projection(clip.visual), matrix, "image tower")
    _fold(*_text_projection(clip), matrix, "text tower")
    return clip


@dataclass
class ExportResult:
    path: Path
    architecture: str
    t: float


def checkpoint_folder(release: str | Path) -> Path:
    """A local checkpoint folder as it is, or `<store>/releases/<id or latest>` pulled (and verified)."""
    path = Path(release)
    if path.is_dir():
        return path
    if "/releases/" in str(release):
        from po_cluster.store.artifacts import pull_release_uri

        return pull_release_uri(str(release))
    raise FileNotFoundError(f"no checkpoint folder at {release} (nor a <store>/releases/<id> URI)")


def export_open_clip(checkpoint: str | Path, out: str | Path, t: float = 1.0) -> ExportResult:
    """Verify and load a po-cluster checkpoint, fold W(t), write a stock open_clip .safetensors."""
    out = Path(out)
    if out.suffix != ".safetensors":
        raise ValueError(f"{out}: the export must end in .safetensors (open_clip picks its loader by suffix)")
    model, description = load_checkpoint(checkpoint_folder(checkpoint))
    clip = folded_clip(model, t)
    state = {key: value.detach().contiguous() for key, value in clip.state_dict().items()}
    metadata = {"format": "open_clip", "architecture": description["architecture"], "po_cluster_t": repr(t),
                "source": str(checkpoint), "pretrained_base": str(description.get("pretrained")),
                "classnames": json.dumps(description.get("classnames", [])),
                "prompt_template": str(description.get("prompt_template", ""))}
    out.parent.mkdir(parents=True, exist_ok=True)
    save_file(state, str(out), metadata=metadata)
    return ExportResult(out, description["architecture"], t)
