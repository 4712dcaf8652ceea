"""Export an aligned checkpoint as a stock open_clip checkpoint at one t: the image
tower's weights at θ(t) = θ_ref + t·(θ − θ_ref) and W(t) folded in.

The aligned embedding is normalize(W·normalize(f)) = normalize(W·f) (the inner
normalisation is a positive scale, which the outer one removes), and f ends in
one linear map per tower. Folding W into that map therefore gives a plain
open_clip model whose normalised embeddings are the aligned ones:
    f = h·P        → h·(P·M)                      (ViT `visual.proj`, text `text_projection` Parameter)
    f = h·Aᵀ + b   → h·(Aᵀ·M) + b·M               (nn.Linear: ModifiedResNet `attnpool.c_proj`, …)
with M = W(t) acting on row vectors as the spectral layer does (z ↦ z·M).

Two forms: one .safetensors file, which `open_clip.create_model_and_transforms(architecture,
pretrained=<file>)` loads where the architecture is known; or a folder in open_clip's own layout
(open_clip_config.json with the architecture's model_cfg and the model's preprocess_cfg, the
weights as open_clip_model.safetensors, a Hugging Face tokenizer's files when it has one, and a
README), which `create_model_and_transforms("local-dir:<folder>")` loads with its preprocessing,
and `hf-hub:` once pushed. No po-cluster code is needed to use either.
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
from po_cluster.model.loading import architecture_config
from po_cluster.model.lora import merge_adapters

CONFIG_JSON = "open_clip_config.json"
FOLDER_WEIGHTS = "open_clip_model.safetensors"  # the first name open_clip looks for in a local-dir: folder


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


def _folded_state(model: AlignedCLIP, t: float) -> dict[str, torch.Tensor]:
    return {key: value.detach().contiguous() for key, value in folded_clip(model, t).state_dict().items()}


def export_open_clip(target: str | Path, out: str | Path, t: float = 1.0, store: str | None = None) -> ExportResult:
    """Load `target` (anything `evaluate` takes, model.targets), fold W(t), write one stock open_clip
    .safetensors file."""
    from po_cluster.model.targets import open_target

    out = Path(out)
    if out.suffix != ".safetensors":
        raise ValueError(f"{out}: the export must end in .safetensors (open_clip picks its loader by suffix)")
    opened = open_target(target, store)
    description = opened.description
    metadata = {"format": "open_clip", "architecture": description["architecture"], "po_cluster_t": repr(t),
                "source": str(target), "pretrained_base": str(description.get("pretrained")),
                "classnames": json.dumps(description.get("classnames", [])),
                "prompt_template": str(description.get("prompt_template", ""))}
    out.parent.mkdir(parents=True, exist_ok=True)
    save_file(_folded_state(opened.model, t), str(out), metadata=metadata)
    return ExportResult(out, description["architecture"], t)


def _save_tokenizer(model: AlignedCLIP, model_cfg: dict, folder: Path) -> None:
    """open_clip reads a local-dir: model's Hugging Face tokenizer from the folder itself; its own
    SimpleTokenizer needs no file (the config's context_length is all it takes)."""
    if not model_cfg.get("text_cfg", {}).get("hf_tokenizer_name"):
        return
    inner = getattr(getattr(model.tokenizer, "tokenizer", None), "tokenizer", None)  # LazyTokenizer → HFTokenizer
    if inner is None or not hasattr(inner, "save_pretrained"):
        raise ExportError(f"{model.name}: its Hugging Face tokenizer could not be loaded to be saved beside the "
                          "weights (transformers installed, and its files downloaded once, are needed)")
    inner.save_pretrained(str(folder))


def _card(description: dict, t: float, source: str, preprocess: dict) -> str:
    name = description["architecture"]
    return f"""---
library_name: open_clip
tags: [clip, open_clip, po-cluster]
---
# {name}, aligned by po-cluster at t = {t:g}

Exported from `{source}` (base `{description.get('pretrained')}`, image tower `{description.get('image_tower')}`)
with its image tower at θ(t) and the spectral layer W(t) folded into both projections: plain open_clip
weights whose normalised embeddings are the aligned model's at t = {t:g}.

```python
import open_clip
model, _, preprocess = open_clip.create_model_and_transforms("local-dir:<this folder>")  # or "hf-hub:<repo>"
tokenizer = open_clip.get_tokenizer("local-dir:<this folder>")
```

Preprocessing (open_clip_config.json): {json.dumps(preprocess)}.
Prompt template `{description.get('prompt_template')}`; classes: {', '.join(description.get('classnames', []))}.
"""


def export_open_clip_folder(target: str | Path, out: str | Path, t: float = 1.0,
                            store: str | None = None) -> ExportResult:
    """Load `target` (anything `evaluate` takes), fold W(t), write open_clip's local-dir: layout in `out`
    (a new or empty folder, or one a previous export wrote: its files are replaced)."""
    from po_cluster.model.targets import open_target

    folder = Path(out)
    if folder.exists() and (not folder.is_dir() or (any(folder.iterdir()) and not (folder / CONFIG_JSON).is_file())):
        raise ExportError(f"{folder}: not an empty folder nor an earlier open_clip export; refusing to write in it")
    opened = open_target(target, store)
    model, description = opened.model, opened.description
    model_cfg = architecture_config(description["architecture"])
    preprocess = model.preprocess.to_open_clip()
    folder.mkdir(parents=True, exist_ok=True)
    (folder / CONFIG_JSON).unlink(missing_ok=True)  # written last: a folder without it is incomplete
    save_file(_folded_state(model, t), str(folder / FOLDER_WEIGHTS), metadata={"format": "pt"})
    _save_tokenizer(model, model_cfg, folder)
    (folder / "README.md").write_text(_card(description, t, str(target), preprocess))
    config = {"model_cfg": model_cfg, "preprocess_cfg": preprocess,
              "po_cluster": {"t": t, "source": str(target), "architecture": description["architecture"],
                             "pretrained_base": description.get("pretrained"),
                             "classnames": list(description.get("classnames", [])),
                             "prompt_template": description.get("prompt_template")}}
    (folder / CONFIG_JSON).write_text(json.dumps(config, indent=2) + "\n")
    return ExportResult(folder, description["architecture"], t)
