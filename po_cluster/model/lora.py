"""Low-rank adapters for the image tower, scaled by each sample's own t.

A target layer with weight W0 computes W0·x + t·s·B·A·x (s = alpha / rank), with A and B
trained and W0 frozen. B starts at zero, so an untrained adapter is exactly the base
layer, and the adapter's effective weight W0 + t·s·B·A is θ(t) = θ_ref + t·(θ − θ_ref)
of docs/design.md, "The knob t", for every t: the scale is the whole path. Because t
enters as a per-sample factor on the adapter's output, one batched forward serves rows
with different t.

Written here rather than taken from peft: peft scales an adapter per layer or per
adapter name, not per sample within a batch, and per-sample scaling is what lets one
forward serve mixed t. Only layers whose forward is their own `forward` can be wrapped:
layers whose weights their parent reads directly (nn.MultiheadAttention's out_proj,
open_clip's attention pooling) are refused with that reason.
"""
from __future__ import annotations

import fnmatch
import math
from collections.abc import Iterator
from contextlib import contextmanager

import torch
import torch.nn.functional as F
from torch import nn

from po_cluster.config import LoraConfig

# Layers whose parent reads `.weight` itself (F.multi_head_attention_forward): a wrapper's forward never runs.
_READ_BY_PARENT = ("*attnpool.q_proj", "*attnpool.k_proj", "*attnpool.v_proj", "*attnpool.c_proj",
                   "*attn.out_proj")


class AdapterScale:
    """The t the adapters of one tower apply: a number, or one value per sample of the batch."""

    def __init__(self) -> None:
        self.value: float | torch.Tensor = 1.0

    @contextmanager
    def at(self, t: float | torch.Tensor) -> Iterator[None]:
        previous, self.value = self.value, t
        try:
            yield
        finally:
            self.value = previous

    def apply(self, delta: torch.Tensor) -> torch.Tensor:
        value = self.value
        if isinstance(value, torch.Tensor):  # [N]: sample i of the batch (dim 0) at t_i
            return delta * value.to(delta).view(-1, *([1] * (delta.dim() - 1)))
        return delta if value == 1.0 else delta * value


class LoraLinear(nn.Module):
    def __init__(self, base: nn.Linear, rank: int, alpha: float, scale: AdapterScale) -> None:
        super().__init__()
        self.base, self.scale, self.scaling = base, scale, alpha / rank
        self.lora_A = nn.Parameter(torch.empty(rank, base.in_features, device=base.weight.device))
        self.lora_B = nn.Parameter(torch.zeros(base.out_features, rank, device=base.weight.device))
        nn.init.kaiming_uniform_(self.lora_A, a=math.sqrt(5))  # as nn.Linear initialises its weight

    def delta_weight(self) -> torch.Tensor:
        """s·B·A, shaped like the base weight: what t = 1 adds to it."""
        return self.scaling * self.lora_B @ self.lora_A

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.base(x) + self.scale.apply(F.linear(F.linear(x, self.lora_A), self.lora_B) * self.scaling)


class LoraConv2d(nn.Module):
    """A: a conv of the base's kernel, stride and padding to `rank` channels; B: a 1×1 conv back to the
    base's output channels. Their composition is one conv with weight s·B·A (channels mixed after)."""

    def __init__(self, base: nn.Conv2d, rank: int, alpha: float, scale: AdapterScale) -> None:
        super().__init__()
        if base.groups != 1:
            raise ValueError(f"LoRA on a grouped convolution (groups={base.groups}) is not supported")
        self.base, self.scale, self.scaling = base, scale, alpha / rank
        kh, kw = base.kernel_size
        self.lora_A = nn.Parameter(torch.empty(rank, base.in_channels, kh, kw, device=base.weight.device))
        self.lora_B = nn.Parameter(torch.zeros(base.out_channels, rank, 1, 1, device=base.weight.device))
        nn.init.kaiming_uniform_(self.lora_A, a=math.sqrt(5))

    def delta_weight(self) -> torch.Tensor:
        rank = self.lora_A.shape[0]
        merged = self.lora_B.reshape(-1, rank) @ self.lora_A.reshape(rank, -1)
        return self.scaling * merged.reshape(self.base.weight.shape)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b = self.base
        low = F.conv2d(x, self.lora_A, None, b.stride, b.padding, b.dilation)
        return b(x) + self.scale.apply(F.conv2d(low, self.lora_B) * self.scaling)


Adapter = LoraLinear | LoraConv2d


def default_targets(visual: nn.Module) -> tuple[str, ...]:
    """Per architecture: a ViT's MLPs, a ModifiedResNet's bottleneck convolutions."""
    if hasattr(visual, "transformer"):
        return ("transformer.resblocks.*.mlp.c_fc", "transformer.resblocks.*.mlp.c_proj")
    if hasattr(visual, "layer4"):
        return ("layer*.*.conv1", "layer*.*.conv2", "layer*.*.conv3")
    raise ValueError(f"no default LoRA targets for image tower {type(visual).__name__}: set lora.targets")


def _matches(name: str, patterns: tuple[str, ...]) -> bool:
    return any(fnmatch.fnmatchcase(name, pattern) for pattern in patterns)


def add_adapters(visual: nn.Module, spec: LoraConfig) -> AdapterScale:
    """Wrap every target layer of `visual` (names matched by spec.targets, fnmatch patterns) in place."""
    patterns = spec.targets or default_targets(visual)
    chosen = [(name, module) for name, module in visual.named_modules() if name and _matches(name, patterns)]
    unmatched = [p for p in patterns if not any(fnmatch.fnmatchcase(name, p) for name, _ in chosen)]
    if unmatched:
        raise ValueError(f"lora.targets {unmatched} match no layer of the image tower {type(visual).__name__}")
    scale = AdapterScale()
    for name, module in chosen:
        if _matches(name, _READ_BY_PARENT):
            raise ValueError(f"lora target {name!r}: its parent reads its weight directly, so an adapter "
                             "around it would never run")
        if isinstance(module, nn.Linear):
            adapter: Adapter = LoraLinear(module, spec.rank, spec.alpha, scale)
        elif isinstance(module, nn.Conv2d):
            adapter = LoraConv2d(module, spec.rank, spec.alpha, scale)
        else:
            raise ValueError(f"lora target {name!r} is a {type(module).__name__}, not a Linear or Conv2d")
        parent_name, _, child = name.rpartition(".")
        setattr(visual.get_submodule(parent_name) if parent_name else visual, child, adapter)
    return scale


def adapters(module: nn.Module) -> Iterator[tuple[str, Adapter]]:
    return ((name, m) for name, m in module.named_modules() if isinstance(m, LoraLinear | LoraConv2d))


@torch.no_grad()
def merge_adapters(visual: nn.Module, t: float) -> None:
    """Fold each adapter into its base layer at t (W0 + t·s·B·A) and put the base layer back: the tower
    is then a stock open_clip tower."""
    for name, adapter in list(adapters(visual)):
        base = adapter.base
        base.weight.add_(t * adapter.delta_weight().to(base.weight))
        parent_name, _, child = name.rpartition(".")
        setattr(visual.get_submodule(parent_name) if parent_name else visual, child, base)
