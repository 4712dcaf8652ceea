"""Training: the PO train_step and the one loop (`fit`) that every run goes through
(po_cluster/train/run.py, alone or in a Ray Train worker or Tune trial).

The text tower is frozen, so the candidate prompts are embedded once. The
reference model never changes and the records are fixed, so π_ref's
log-probs are computed once for every record, before the first step. With
the image tower frozen, image embeddings are cached too and a step costs only
the spectral layer.
"""
from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, replace

import numpy as np
import torch

from po_cluster.config import OptimizerConfig, RunConfig
from po_cluster.data import world
from po_cluster.data.records import ImageSet, PreferenceSet
from po_cluster.evaluate.metrics import embed_images, embed_prompts
from po_cluster.losses import LossWeights, anchor_on
from po_cluster.model.aligned import AlignedCLIP
from po_cluster.model.loading import load_clip
from po_cluster.train.batch import Batch, BatchSource, batch_objective
from po_cluster.train.bma import BetaMovingAverage
from po_cluster.train.callbacks import Callback
from po_cluster.train.precision import Precision


@dataclass
class TrainData:
    """Records plus everything about them that does not change while training."""

    pref: PreferenceSet
    reg: ImageSet
    text_emb: torch.Tensor  # [C, d] g(y) of the candidate prompts, before W
    ref_pref_logps: torch.Tensor  # [N, C] log π_ref on the preference images
    ref_reg_logps: torch.Tensor  # [M, C'] log π_ref on the regularisation images, over their candidates
    pref_emb: torch.Tensor | None = None  # cached f(x) when the image tower is frozen
    reg_emb: torch.Tensor | None = None
    reg_text_emb: torch.Tensor | None = None  # [C', d] when the regularisation set has its own candidates
    # π_ref on the word-free twins (records that carry them): the anchor's targets on the pairs, and
    # the KL term's on the regularisation images when the anchor is on (losses.anchor_on).
    anchor_pref_logps: torch.Tensor | None = None  # [N, C]
    anchor_reg_logps: torch.Tensor | None = None  # [M, C']
    # The reference's f(x̄) of the same twins: the embedding anchor's targets (loss.anchor_space).
    anchor_pref_emb: torch.Tensor | None = None  # [N, d]
    anchor_reg_emb: torch.Tensor | None = None  # [M, d]

    def to(self, device: torch.device) -> TrainData:
        """Every tensor on `device`, once (g(y), π_ref's log-probs, cached f(x)); the uint8 images stay
        on the host and go over batch by batch (pinned, non-blocking on CUDA)."""
        def move(tensor: torch.Tensor | None) -> torch.Tensor | None:
            return None if tensor is None else tensor.to(device)

        return replace(self, text_emb=self.text_emb.to(device), ref_pref_logps=self.ref_pref_logps.to(device),
                       ref_reg_logps=self.ref_reg_logps.to(device), pref_emb=move(self.pref_emb),
                       reg_emb=move(self.reg_emb), reg_text_emb=move(self.reg_text_emb),
                       anchor_pref_logps=move(self.anchor_pref_logps), anchor_reg_logps=move(self.anchor_reg_logps),
                       anchor_pref_emb=move(self.anchor_pref_emb), anchor_reg_emb=move(self.anchor_reg_emb))


@torch.no_grad()
def prepare_data(model: AlignedCLIP, pref: PreferenceSet, reg: ImageSet,
                 template: str = world.PROMPT_TEMPLATE) -> TrainData:
    """Embed prompts once and compute π_ref once, with the model as it is now (the reference).

    The regularisation images are scored on their own candidates when those differ from the pairs'
    (the bias task's pairs ask the pattern; the KL term holds the class answers it must keep)."""
    prompts = world.prompts(pref.classnames, template)
    text_emb = embed_prompts(model, prompts)
    reg_prompts = world.prompts(reg.classnames, reg.template or template)
    reg_text_emb = embed_prompts(model, reg_prompts) if reg_prompts != prompts else None
    pref_emb, reg_emb = embed_images(model, pref.images), embed_images(model, reg.images)
    ref_pref = model.logprobs(pref_emb, text_emb, t=0.0)
    ref_reg = model.logprobs(reg_emb, text_emb if reg_text_emb is None else reg_text_emb, t=0.0)
    frozen = model.image_tower_frozen
    twins = None if pref.twins is None or reg.twins is None else \
        (embed_images(model, pref.twins), embed_images(model, reg.twins))
    anchor_pref = anchor_reg = None
    if twins is not None:
        anchor_pref = model.logprobs(twins[0], text_emb, t=0.0)
        anchor_reg = model.logprobs(twins[1], text_emb if reg_text_emb is None else reg_text_emb, t=0.0)
        # Training reads only the reference's f and answers on the twins, never their pixels: the records
        # go on without.
        pref, reg = replace(pref, twins=None), replace(reg, twins=None)
    return TrainData(pref, reg, text_emb, ref_pref, ref_reg, pref_emb if frozen else None,
                     reg_emb if frozen else None, reg_text_emb, anchor_pref, anchor_reg,
                     *(twins if twins is not None else (None, None)))


def unwrap(model: torch.nn.Module) -> AlignedCLIP:
    """The AlignedCLIP inside a DDP wrapper (or the model itself)."""
    inner = model.module if isinstance(model, torch.nn.parallel.DistributedDataParallel) else model
    if not isinstance(inner, AlignedCLIP):
        raise TypeError(f"expected an AlignedCLIP (or one wrapped in DDP), got {type(inner).__name__}")
    return inner


def _inputs(model: AlignedCLIP, images: np.ndarray, cached: torch.Tensor | None, idx: np.ndarray,
            device: torch.device) -> torch.Tensor:
    return cached[torch.as_tensor(idx, device=cached.device)] if cached is not None else \
        model.pixels(images[idx], device)


def anchor_space(weights: LossWeights) -> str | None:
    """The space the word-free anchor holds the policy in (logits, embedding), or None when it is off."""
    return weights.anchor_space if anchor_on(weights) else None


def memory_batch(model: AlignedCLIP, data: TrainData, pref_idx: np.ndarray, reg_idx: np.ndarray,
                 device: torch.device, anchor: str | None = None) -> Batch:
    """The batch of these rows of records held in memory, with their precomputed π_ref; with the anchor
    on (`anchor`: its space), the KL term's targets from the regularisation images' twins, and the
    anchor's own targets: π_ref on the pairs' twins (logits), or the reference's f(x̄) of the pairs'
    and the regularisation images' twins (embedding)."""
    if anchor is not None and (data.anchor_pref_logps is None or data.anchor_reg_logps is None):
        raise ValueError("the word-free anchor is on, but these records carry no word-free twins")
    reg_targets = data.anchor_reg_logps if anchor is not None else data.ref_reg_logps
    assert reg_targets is not None

    def rows(tensor: torch.Tensor | None, idx: np.ndarray, space: str) -> torch.Tensor | None:
        return tensor[idx].to(device) if tensor is not None and anchor == space else None

    return Batch(_inputs(model, data.pref.images, data.pref_emb, pref_idx, device).to(device),
                 torch.as_tensor(data.pref.chosen[pref_idx], device=device),
                 torch.as_tensor(data.pref.rejected[pref_idx], device=device),
                 data.ref_pref_logps[pref_idx].to(device),
                 _inputs(model, data.reg.images, data.reg_emb, reg_idx, device).to(device),
                 reg_targets[reg_idx].to(device),
                 rows(data.anchor_pref_logps, pref_idx, "logits"),
                 rows(data.anchor_pref_emb, pref_idx, "embedding"), rows(data.anchor_reg_emb, reg_idx, "embedding"))


def train_step(model: torch.nn.Module, data: TrainData, pref_idx: np.ndarray, reg_idx: np.ndarray,
               loss_type: str, weights: LossWeights,
               precision: Precision | None = None) -> tuple[torch.Tensor, dict[str, float]]:
    """The objective on these rows of in-memory records (no optimizer step, so DDP and plain loops
    share it)."""
    core = unwrap(model)
    device = next(core.parameters()).device
    batch = memory_batch(core, data, pref_idx, reg_idx, device, anchor_space(weights))
    reg_text_emb = None if data.reg_text_emb is None else data.reg_text_emb.to(device)
    return batch_objective(model, batch, data.text_emb.to(device), loss_type, weights, precision, reg_text_emb)


def make_optimizer(model: AlignedCLIP, cfg: OptimizerConfig) -> torch.optim.Optimizer:
    groups = [{"params": list(model.spectral.parameters()), "lr": cfg.spectral_lr or cfg.lr, "weight_decay": 0.0}]
    image = list(model.trainable_image_parameters())
    if image:
        groups.append({"params": image, "lr": cfg.lr, "weight_decay": cfg.weight_decay})
    for group in groups:
        group["base_lr"] = group["lr"]
    # Measured on CPU: the per-parameter loop beats foreach/fused (which copy into lists of
    # temporaries); on CUDA the fused kernel wins.
    on_cuda = next(model.parameters()).is_cuda
    return torch.optim.AdamW(groups, fused=on_cuda or None, foreach=False if not on_cuda else None)


def set_lr(optimizer: torch.optim.Optimizer, step: int, total: int, warmup: int) -> None:
    """Linear warmup, then cosine to zero."""
    if step < warmup:
        factor = (step + 1) / warmup
    else:
        factor = 0.5 * (1 + math.cos(math.pi * (step - warmup) / max(1, total - warmup)))
    for group in optimizer.param_groups:
        group["lr"] = group["base_lr"] * factor


def trainable_state(model: AlignedCLIP) -> dict[str, torch.Tensor]:
    return {name: p.detach() for name, p in model.named_parameters() if p.requires_grad}


def batch_indices(seed: int, step: int, n_pref: int, n_reg: int, batch: int, reg_batch: int,
                  rank: int = 0, world_size: int = 1) -> tuple[np.ndarray, np.ndarray]:
    """This worker's shard of the global batch of `step`.

    The global batch depends only on (seed, step): a resumed run sees the same
    batches, and N workers together see exactly what one process would.
    """
    rng = np.random.default_rng([seed, step])
    pref = rng.choice(n_pref, size=batch, replace=False)
    reg = rng.choice(n_reg, size=min(reg_batch, n_reg), replace=False)
    return pref[rank::world_size], reg[rank::world_size]


@dataclass
class TrainState:
    """What a step changes besides the weights; `step` is the last step done (a resumed run's start)."""

    optimizer: torch.optim.Optimizer
    bma: BetaMovingAverage | None
    precision: Precision
    step: int = 0

    @classmethod
    def start(cls, model: AlignedCLIP, cfg: RunConfig) -> TrainState:
        """A fresh optimizer (and fp16 grad scaler), and a BMA whose iterate 0 is the model as it is now."""
        t = cfg.training
        bma = BetaMovingAverage(trainable_state(model), t.steps, t.bma_a) if t.bma else None
        precision = Precision.for_device(t.precision, next(model.parameters()).device)
        return cls(make_optimizer(model, cfg.optimizer), bma, precision)


@dataclass
class FitResult:
    last_metrics: dict[str, float]
    bma: BetaMovingAverage | None


class MemorySource:
    """Batches of records held in memory, chosen by (seed, step): the same on a resumed run, and N
    workers' shards together are one process's batch."""

    def __init__(self, model: AlignedCLIP, data: TrainData, cfg: RunConfig, rank: int = 0,
                 world_size: int = 1) -> None:
        self.device = next(model.parameters()).device
        self.model, self.data, self.t = model, data.to(self.device), cfg.training
        self.rank, self.world_size, self.text_emb = rank, world_size, self.data.text_emb
        self.reg_text_emb = self.data.reg_text_emb
        self.classnames = data.pref.classnames
        self.anchor = anchor_space(cfg.loss)

    def __call__(self, step: int) -> Batch:
        pref_idx, reg_idx = batch_indices(self.t.seed, step, len(self.data.pref), len(self.data.reg),
                                          self.t.batch_size, self.t.reg_batch_size, self.rank, self.world_size)
        return memory_batch(self.model, self.data, pref_idx, reg_idx, self.device, self.anchor)


def fit(model: torch.nn.Module, data: TrainData | BatchSource, cfg: RunConfig, callbacks: Sequence[Callback] = (),
        state: TrainState | None = None, rank: int = 0, world_size: int = 1) -> FitResult:
    """Train from step `state.step + 1` to cfg.training.steps; leaves the model at its last iterate.

    `model` is an AlignedCLIP or its DDP wrapper; with DDP, each of the `world_size` processes
    passes its `rank` and takes its shard of every global batch. `data` is records in memory or a
    stream (po_cluster/train/stream.py). Each step: LR schedule, the objective, AdamW, BMA update,
    then the callbacks.
    """
    t = cfg.training
    core = unwrap(model)
    state = state if state is not None else TrainState.start(core, cfg)
    source = MemorySource(core, data, cfg, rank, world_size) if isinstance(data, TrainData) else data
    metrics: dict[str, float] = {}
    model.train()
    for step in range(state.step + 1, t.steps + 1):
        for callback in callbacks:
            callback.on_step_begin(step)
        set_lr(state.optimizer, step - 1, t.steps, cfg.optimizer.warmup_steps)
        loss, metrics = batch_objective(model, source(step), source.text_emb, cfg.loss.loss_type, cfg.loss,
                                        state.precision, source.reg_text_emb)
        state.precision.step(loss, state.optimizer)
        if state.bma is not None:
            state.bma.update(step, trainable_state(core))
        state.step = step
        for callback in callbacks:
            callback.on_step_end(step, metrics)
    model.eval()
    return FitResult(metrics, state.bma)


def load_average(model: AlignedCLIP, bma: BetaMovingAverage) -> None:
    """Replace the trainable parameters with their Beta moving average."""
    with torch.no_grad():
        params = dict(model.named_parameters())
        for name, value in bma.average().items():
            params[name].copy_(value)


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise RuntimeError("training.device is cuda but no CUDA device is available")
    return torch.device(name)


def build_model(cfg: RunConfig, device: torch.device) -> AlignedCLIP:
    return AlignedCLIP(load_clip(cfg.model), cfg.model.image_tower).to(device)
