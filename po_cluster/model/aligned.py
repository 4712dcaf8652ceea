"""AlignedCLIP: an open_clip model with a frozen text tower, a trainable (or
frozen) image tower, and the spectral layer W acting on both towers' embeddings.

`candidate_logprobs` is the one function that turns embeddings into log π(y|x)
over a candidate set; losses only ever see its output.

The knob t moves every trained parameter along one path (docs/design.md, "The
knob t"): the image tower's trained weights are θ(t) = θ_ref + t·(θ − θ_ref) and
W's singular values σ_i^t, so t = 0 is exactly the starting model and t = 1 the
trained one. θ_ref is kept beside the model (`reference`), not in its state dict.
"""
from __future__ import annotations

import copy
from collections.abc import Callable, Iterator
from typing import Any, Literal, overload

import torch
import torch.nn.functional as F
from torch import nn

from po_cluster.config import ImageTowerMode, LastBlocksConfig, LoraTowerConfig
from po_cluster.model.loading import LoadedCLIP, to_model_input
from po_cluster.model.lora import AdapterScale, add_adapters
from po_cluster.model.spectral import SpectralLayer


def candidate_logprobs(image_emb: torch.Tensor, text_emb: torch.Tensor, logit_scale: float) -> torch.Tensor:
    """log π(y|x) = log_softmax_y(s·⟨x̂, ŷ⟩) over the candidates; inputs already L2-normalised."""
    return F.log_softmax(logit_scale * image_emb @ text_emb.T, dim=-1)


def _image_blocks(visual: Any) -> list[nn.Module]:
    """The image tower's blocks in forward order, for `last_blocks: k`.

    `visual` is any of open_clip's towers, told apart by their submodules: as an nn.Module, each
    attribute would only be known as a Tensor or a Module.
    """
    if hasattr(visual, "transformer"):  # open_clip VisionTransformer
        return [*visual.transformer.resblocks, *(m for m in (visual.ln_post,) if m is not None)]
    if hasattr(visual, "layer4"):  # open_clip ModifiedResNet
        return [*visual.layer1, *visual.layer2, *visual.layer3, *visual.layer4, visual.attnpool]
    if hasattr(visual, "trunk"):  # TimmModel
        return list(visual.trunk.children()) + [visual.head]
    raise ValueError(f"last_blocks is not supported for image tower {type(visual).__name__}")


def _embedding_dim(clip: Any) -> int:
    """The joint embedding's width: CLIP's text projection's, else a tower's output_dim (a CustomTextCLIP
    such as SigLIP keeps it on its text tower; a timm image tower has none)."""
    projection = getattr(clip, "text_projection", None)
    if isinstance(projection, torch.Tensor):
        return int(projection.shape[1])
    for tower in (getattr(clip, "visual", None), getattr(clip, "text", None)):
        dim = getattr(tower, "output_dim", None)
        if isinstance(dim, int):
            return dim
    raise ValueError(f"cannot tell the embedding width of {type(clip).__name__}")


class AlignedCLIP(nn.Module):
    def __init__(self, loaded: LoadedCLIP, image_tower: ImageTowerMode = "full") -> None:
        super().__init__()
        clip = loaded.model
        self.clip = clip
        self.name = loaded.name
        self.tokenizer = loaded.tokenizer
        self.preprocess = loaded.preprocess  # open_clip's of this model: every image enters through it
        self.spectral = SpectralLayer(_embedding_dim(clip))
        # The scale is that of the loaded model and is not trained (docs/design.md, "Policy").
        self.logit_scale = float(clip.logit_scale.exp().clamp(max=100).item())
        self.image_tower = image_tower
        # With LoRA, t scales the adapters' output, which is the whole path (model/lora.py): no θ_ref.
        self.adapter_scale: AdapterScale | None = None
        self._set_trainable(image_tower)
        # θ_ref: the values the trained tower parameters start from. A model is built from its
        # starting weights (or gets the saved ones from load_checkpoint), so a snapshot now is θ_ref.
        self.reference: dict[str, torch.Tensor] = {} if self.adapter_scale is not None else {
            name: p.detach().clone() for name, p in self.clip.visual.named_parameters() if p.requires_grad}

    def _set_trainable(self, mode: ImageTowerMode) -> None:
        for p in self.clip.parameters():
            p.requires_grad_(False)
        if mode == "full":
            for p in self.clip.visual.parameters():
                p.requires_grad_(True)
        elif isinstance(mode, LastBlocksConfig):
            blocks = _image_blocks(self.clip.visual)
            if mode.last_blocks > len(blocks):
                raise ValueError(f"last_blocks {mode.last_blocks} > the {len(blocks)} blocks of the image tower")
            for block in blocks[-mode.last_blocks:]:
                for p in block.parameters():
                    p.requires_grad_(True)
        elif isinstance(mode, LoraTowerConfig):
            self.adapter_scale = add_adapters(self.clip.visual, mode.lora)  # new parameters: trainable

    def trained_keys(self) -> set[str]:
        """The state-dict entries training can change: with LoRA the adapters and W (a release stores
        only those, the base tower comes from `pretrained`), otherwise every entry."""
        keys = set(self.state_dict())
        if self.adapter_scale is None:
            return keys
        return {k for k in keys if ".lora_A" in k or ".lora_B" in k or k.startswith("spectral.")}

    @property
    def image_size(self) -> int:
        return self.preprocess.size

    @property
    def image_tower_frozen(self) -> bool:
        return self.image_tower == "frozen"

    @property
    def tower_moves_with_t(self) -> bool:
        """Whether f depends on t: the tower trained (θ_ref kept) or carries adapters."""
        return bool(self.reference) or self.adapter_scale is not None

    def set_reference(self, state: dict[str, torch.Tensor]) -> None:
        """θ_ref as saved with a checkpoint: exactly the trained tower parameters' names and shapes."""
        own = dict(self.clip.visual.named_parameters())
        expected = set(self.reference)
        if set(state) != expected:
            missing, extra = sorted(expected - set(state)), sorted(set(state) - expected)
            raise ValueError(f"reference weights do not match the trained parameters of image_tower="
                             f"{self.image_tower!r}: missing {missing[:5]}, unexpected {extra[:5]}")
        for name, value in state.items():
            if value.shape != own[name].shape:
                raise ValueError(f"reference weight {name!r} has shape {tuple(value.shape)}, "
                                 f"the model's is {tuple(own[name].shape)}")
            if not bool(torch.isfinite(value).all()):
                raise ValueError(f"reference weight {name!r} holds NaN or infinite values")
        self.reference = {name: value.to(own[name]) for name, value in state.items()}

    def _apply(self, fn: Callable[[torch.Tensor], torch.Tensor], recurse: bool = True) -> AlignedCLIP:
        # .to(), .cuda(), .half() reach θ_ref too: it is a plain dict (not buffers, which DDP would
        # broadcast at every step), so nn.Module would not move it otherwise.
        super()._apply(fn, recurse)
        self.reference = {name: fn(value) for name, value in getattr(self, "reference", {}).items()}
        return self

    @torch.no_grad()
    def tower_at(self, t: float) -> nn.Module:
        """The image tower with θ(t): a copy holding the interpolated weights and sharing every tensor t
        does not move (untrained weights, BatchNorm statistics). At t = 1, or with nothing trained, the
        tower itself."""
        visual = self.clip.visual
        if t == 1.0 or not self.reference:  # LoRA: the tower itself, encode_image sets its t
            return visual
        state = self.tower_state(t)
        own = dict(visual.named_parameters())
        # deepcopy takes what the memo holds for an object instead of copying it.
        memo: dict[int, object] = {id(b): b for b in visual.buffers()}
        memo.update({id(p): p for name, p in own.items() if name not in state})
        memo.update({id(own[name]): nn.Parameter(value, requires_grad=False) for name, value in state.items()})
        return copy.deepcopy(visual, memo).eval()

    @torch.no_grad()
    def tower_state(self, t: float) -> dict[str, torch.Tensor]:
        """θ(t) for the trained tower parameters (names within `clip.visual`). torch.lerp is exact at
        both ends, so t = 0 gives θ_ref and t = 1 the trained weights bit for bit."""
        own = dict(self.clip.visual.named_parameters())
        return {name: torch.lerp(ref, own[name].detach(), float(t)) for name, ref in self.reference.items()}

    def trainable_image_parameters(self) -> Iterator[nn.Parameter]:
        return (p for p in self.clip.visual.parameters() if p.requires_grad)

    def train(self, mode: bool = True) -> AlignedCLIP:
        super().train(mode)
        # The towers keep eval behaviour while fine-tuning: BatchNorm statistics stay
        # those of pretraining (attacked-only batches would skew them) and at step 0
        # the policy equals the reference exactly.
        self.clip.eval()
        return self

    def pixels(self, images, device: torch.device | None = None) -> torch.Tensor:
        """uint8 [N, H, W, 3] → this model's normalised input (on `device`, converted there on CUDA)."""
        return to_model_input(images, self.preprocess, device)

    @torch.no_grad()
    def tokens(self, texts: list[str]) -> torch.Tensor:
        return self.tokenizer(texts)

    def encode_image(self, pixels: torch.Tensor, t: float | torch.Tensor = 1.0,
                     tower: nn.Module | None = None) -> torch.Tensor:
        """f_t(x), L2-normalised, before W: through `tower` (a caller's `tower_at(t)`, kept for many
        batches), else through tower_at(t). open_clip's encode_image is its image tower's forward.
        With LoRA, t may be one value per row: the adapters scale each sample by its own t."""
        if self.adapter_scale is not None:
            with self.adapter_scale.at(t):
                return F.normalize(self.clip.visual(pixels), dim=-1)
        if isinstance(t, torch.Tensor):
            raise ValueError("one t per row needs a LoRA image tower; group rows by t instead")
        return F.normalize((self.tower_at(t) if tower is None else tower)(pixels), dim=-1)

    @torch.no_grad()
    def encode_text(self, tokens: torch.Tensor) -> torch.Tensor:
        """g(y), L2-normalised, before W. The text tower is frozen: no graph is kept."""
        return F.normalize(self.clip.encode_text(tokens), dim=-1)

    def project(self, emb: torch.Tensor, t: float = 1.0, overrides: dict[int, float] | None = None) -> torch.Tensor:
        """W(t)·z, re-normalised: the embedding the aligned model serves."""
        return F.normalize(self.spectral(emb, t, overrides), dim=-1)

    @overload
    def forward(self, images_or_emb: torch.Tensor, text_emb: torch.Tensor, t: float = ...,
                overrides: dict[int, float] | None = ..., with_embedding: Literal[False] = ...) -> torch.Tensor: ...

    @overload
    def forward(self, images_or_emb: torch.Tensor, text_emb: torch.Tensor, t: float = ...,
                overrides: dict[int, float] | None = ..., *,
                with_embedding: Literal[True]) -> tuple[torch.Tensor, torch.Tensor]: ...

    def forward(self, images_or_emb: torch.Tensor, text_emb: torch.Tensor, t: float = 1.0,
                overrides: dict[int, float] | None = None,
                with_embedding: bool = False) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
        """log π(y|x) for a batch: pixels [N, 3, S, S], or cached f(x) [N, d] when the tower is frozen;
        `with_embedding`, also f(x) (L2-normalised, before W), which the embedding anchor holds.

        Training goes through this call (not the helpers) so that DDP sees the forward pass.
        """
        emb = images_or_emb if images_or_emb.dim() == 2 else self.encode_image(images_or_emb, t)
        logps = self.logprobs(emb, text_emb, t, overrides)
        return (logps, emb) if with_embedding else logps

    def logprobs(self, image_emb: torch.Tensor, text_emb: torch.Tensor, t: float = 1.0,
                 overrides: dict[int, float] | None = None) -> torch.Tensor:
        """log π_t(y|x) from f_t(x) (`encode_image` at the same t) and g(y); this applies W(t)."""
        if t == 0 and not overrides:  # exactly the starting model
            return candidate_logprobs(F.normalize(image_emb, dim=-1), F.normalize(text_emb, dim=-1),
                                      self.logit_scale)
        w = self.spectral.matrix(t, overrides)  # one matrix exponential for both towers
        return candidate_logprobs(F.normalize(image_emb @ w, dim=-1), F.normalize(text_emb @ w, dim=-1),
                                  self.logit_scale)
