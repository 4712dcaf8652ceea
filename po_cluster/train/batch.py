"""One training batch, wherever it came from, and the preference objective on it.

Records held in memory (po_cluster/train/loop.py) and a stream of shards
(po_cluster/train/stream.py) both hand `fit` a Batch per step, with π_ref's
log-probabilities beside the inputs, so the objective is computed one way.
"""
from __future__ import annotations

from contextlib import nullcontext
from dataclasses import dataclass
from typing import Protocol

import torch

from po_cluster.losses import LossWeights, PreferenceLogps, kl_ref_policy, preference_objective
from po_cluster.train.precision import Precision


@dataclass(frozen=True)
class Batch:
    """One worker's share of a step: model inputs (pixels, or cached f(x) for a frozen tower), the
    pairs' class indices, and π_ref's log-probabilities on both sets of images, on the device."""

    pref_inputs: torch.Tensor
    chosen: torch.Tensor  # [B] long
    rejected: torch.Tensor
    ref_pref_logps: torch.Tensor  # [B, C]
    reg_inputs: torch.Tensor
    ref_reg_logps: torch.Tensor  # [M, C]
    anchor_logps: torch.Tensor | None = None  # [B, C] π_ref on the pairs' word-free twins (anchor on)
    # the reference's f(x̄) of the twins of the pairs' and the regularisation images (embedding anchor on)
    anchor_pref_emb: torch.Tensor | None = None  # [B, d]
    anchor_reg_emb: torch.Tensor | None = None  # [M, d]

    @property
    def anchor_emb(self) -> torch.Tensor | None:
        """The twins' reference embeddings in the forward's row order (pairs, then regularisation)."""
        if self.anchor_pref_emb is None or self.anchor_reg_emb is None:
            return None
        return torch.cat([self.anchor_pref_emb, self.anchor_reg_emb])


class BatchSource(Protocol):
    """Where fit's batches come from: the candidates, their g(y), and this worker's batch of each step.
    `reg_text_emb` is the regularisation images' own candidates when they differ (else None)."""

    text_emb: torch.Tensor
    reg_text_emb: torch.Tensor | None
    classnames: tuple[str, ...]

    def __call__(self, step: int) -> Batch: ...


def batch_objective(model: torch.nn.Module, batch: Batch, text_emb: torch.Tensor, loss_type: str,
                    weights: LossWeights, precision: Precision | None = None,
                    reg_text_emb: torch.Tensor | None = None) -> tuple[torch.Tensor, dict[str, float]]:
    """The objective on one batch. The forward runs under `precision`'s autocast, over preference and
    regularisation images together; the log-probabilities, and so the loss, are fp32.

    With `reg_text_emb` (the bias task: pattern pairs, the class task held by the KL term) the one
    forward scores every image against both candidate sets, and each set is renormalised on its own:
    log_softmax over a group of columns of log-probabilities equals it over those columns' logits."""
    n, c = len(batch.chosen), len(text_emb)
    both = text_emb if reg_text_emb is None else torch.cat([text_emb, reg_text_emb])
    anchor_emb = batch.anchor_emb
    inputs = torch.cat([batch.pref_inputs, batch.reg_inputs])
    with precision.autocast() if precision is not None else nullcontext():
        # f(x) comes back only for the embedding anchor: the other objectives see the answers alone.
        out = model(inputs, both, with_embedding=True) if anchor_emb is not None else (model(inputs, both), None)
    all_logps, image_emb = out[0].float(), None if out[1] is None else out[1].float()
    policy, reg_policy = all_logps[:n], all_logps[n:]
    if reg_text_emb is not None:
        policy, reg_policy = policy[:, :c].log_softmax(-1), reg_policy[:, c:].log_softmax(-1)
    ref = batch.ref_pref_logps
    rows = torch.arange(n, device=policy.device)
    logps = PreferenceLogps(policy[rows, batch.chosen], policy[rows, batch.rejected], ref[rows, batch.chosen],
                            ref[rows, batch.rejected], policy, ref, batch.chosen, batch.anchor_logps,
                            image_emb, anchor_emb)
    kl = kl_ref_policy(batch.ref_reg_logps, reg_policy)
    return preference_objective(loss_type, logps, kl, weights)
