"""Attention heads of an open_clip image tower, and ablating them: the training-free defence that
removes the heads whose output carries the written word (in the spirit of Dyslexify, ICLR 2026).

A head's output reaches the rest of the tower only through its slice of the out-projection's input
columns: multi-head attention concatenates the heads (head h in features h·d_h … (h+1)·d_h − 1) and
multiplies by the out-projection, so zeroing those columns removes exactly that head's contribution
and nothing else (the projection's bias belongs to no head and stays). The heads are:
- an open_clip VisionTransformer's blocks, `transformer.resblocks[i].attn` (nn.MultiheadAttention,
  out-projection `out_proj`);
- an open_clip ModifiedResNet's attention pool, `attnpool` (its `c_proj` is the out-projection).

Everything here is plain torch on a tower's state dict (keys relative to `clip.visual`); choosing
which heads to ablate is `greedy_heads`, given any score of a head set.
"""
from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass

import torch
from torch import nn


@dataclass(frozen=True, order=True)
class Head:
    """Head `index` of the attention module at `module` (a path within the image tower), whose output
    is columns index·width … (index + 1)·width − 1 of the out-projection weight `weight`."""

    module: str
    index: int
    weight: str
    width: int

    def __str__(self) -> str:
        return f"{self.module}.head{self.index}"

    @property
    def columns(self) -> slice:
        return slice(self.index * self.width, (self.index + 1) * self.width)


def _module_heads(path: str, weight: str, num_heads: int, out_weight: torch.Tensor) -> list[Head]:
    in_features = int(out_weight.shape[1])
    if num_heads < 1 or in_features % num_heads:
        raise ValueError(f"{path}: {in_features} out-projection inputs do not split into {num_heads} heads")
    return [Head(path, h, weight, in_features // num_heads) for h in range(num_heads)]


def attention_heads(visual: nn.Module) -> list[Head]:
    """Every head of the tower, in forward order (block by block, then head by head).

    Refuses a tower with none this module knows how to ablate (a timm trunk, a plain CNN)."""
    heads: list[Head] = []
    blocks = getattr(getattr(visual, "transformer", None), "resblocks", None)
    if blocks is not None:  # open_clip VisionTransformer
        for i, block in enumerate(blocks):
            attn = getattr(block, "attn", None)
            if isinstance(attn, nn.MultiheadAttention):
                path = f"transformer.resblocks.{i}.attn"
                heads += _module_heads(path, f"{path}.out_proj.weight", attn.num_heads, attn.out_proj.weight)
    pool = getattr(visual, "attnpool", None)
    if pool is not None and isinstance(getattr(pool, "c_proj", None), nn.Linear):  # open_clip ModifiedResNet
        heads += _module_heads("attnpool", "attnpool.c_proj.weight", int(pool.num_heads), pool.c_proj.weight)
    if not heads:
        raise ValueError(f"no attention heads found in image tower {type(visual).__name__}: ablation needs an "
                         "open_clip VisionTransformer (transformer.resblocks[i].attn) or ModifiedResNet (attnpool)")
    return heads


def ablate_heads(state: dict[str, torch.Tensor], heads: Iterable[Head]) -> dict[str, torch.Tensor]:
    """`state` with the out-projection columns of `heads` set to 0: a new dict; the tensors of the
    weights touched are copies, every other entry is the same tensor (so equal bit for bit)."""
    out = dict(state)
    for head in heads:
        if head.weight not in state:
            raise KeyError(f"{head}: {head.weight} is not in the state dict")
        if out[head.weight] is state[head.weight]:
            out[head.weight] = state[head.weight].clone()
        if out[head.weight].shape[1] < head.columns.stop:
            raise ValueError(f"{head}: {head.weight} has {out[head.weight].shape[1]} columns, fewer than the head's")
        out[head.weight][:, head.columns] = 0
    return out


@torch.no_grad()
def set_ablation(visual: nn.Module, base: dict[str, torch.Tensor], heads: Iterable[Head]) -> None:
    """Put the out-projection weights of `base` (the tower's own state, or its keys of out-projections)
    with `heads` ablated into `visual`, in place: every out-projection is set again, so heads ablated
    by an earlier call and not in `heads` come back."""
    heads = tuple(heads)
    weights = {head.weight for head in attention_heads(visual)}
    ablated = ablate_heads({k: base[k] for k in weights}, heads)
    params = dict(visual.named_parameters())
    for key, value in ablated.items():
        params[key].copy_(value)


@dataclass(frozen=True)
class GreedyStep:
    """One round of the greedy search: the head it ablated and the score with it (and the ones before)."""

    head: Head
    score: float


@dataclass(frozen=True)
class Selection:
    """What `greedy_heads` chose: the heads, in the order it ablated them, and the scores."""

    start: float  # the score with no head ablated
    steps: tuple[GreedyStep, ...]

    @property
    def heads(self) -> tuple[Head, ...]:
        return tuple(step.head for step in self.steps)

    @property
    def score(self) -> float:
        return self.steps[-1].score if self.steps else self.start


def greedy_heads(heads: Sequence[Head], score: Callable[[tuple[Head, ...]], float], max_heads: int,
                 min_gain: float = 0.0) -> Selection:
    """Ablate, one round at a time, the head whose removal (with those already removed) raises `score`
    most; stop when no head raises it by more than `min_gain`, or after `max_heads` heads.

    Deterministic: candidates are tried in the order of `heads` and a tie keeps the first, so the
    same score function gives the same heads."""
    if max_heads < 1:
        raise ValueError(f"max_heads must be at least 1, got {max_heads}")
    chosen: tuple[Head, ...] = ()
    start = current = float(score(chosen))
    steps: list[GreedyStep] = []
    while len(chosen) < min(max_heads, len(heads)):
        best: GreedyStep | None = None
        for head in heads:
            if head in chosen:
                continue
            value = float(score((*chosen, head)))
            if best is None or value > best.score:
                best = GreedyStep(head, value)
        if best is None or best.score <= current + min_gain:
            break
        chosen, current = (*chosen, best.head), best.score
        steps.append(best)
    return Selection(start, tuple(steps))
