"""Preference-optimisation losses as pure functions of log-probabilities.

Every function here takes log π(y|x) values that were already computed by the
model code (log-softmax over the candidate texts C, docs/design.md "Losses") and returns a
scalar: the mean over the batch. Nothing in this module knows about CLIP,
open_clip, or any other po_cluster module (docs/design.md, "Conventions"), so each loss can be
checked against numbers worked out by hand.

Notation (docs/design.md, "Losses"):
    h = [log π(y_w|x) − log π(y_l|x)] − [log π_ref(y_w|x) − log π_ref(y_l|x)]
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Protocol, runtime_checkable

import torch
import torch.nn.functional as F
from torch import Tensor

__all__ = [
    "LOSSES",
    "LossWeights",
    "anchor_loss",
    "anchor_on",
    "anchor_mu",
    "embedding_anchor_loss",
    "PreferenceLogps",
    "ce_loss",
    "dpo_loss",
    "ipo_loss",
    "kl_ref_policy",
    "kto_loss",
    "kto_paired_loss",
    "preference_objective",
]


def _check_beta(beta: float) -> None:
    # β is a temperature on the implicit reward; β <= 0 flips or kills the
    # gradient (and IPO divides by it), so refuse it instead of training nonsense.
    if not beta > 0:
        raise ValueError(f"beta must be > 0, got {beta!r}")


def _log_ratio_margin(
    policy_chosen: Tensor, policy_rejected: Tensor, ref_chosen: Tensor, ref_rejected: Tensor
) -> Tensor:
    # h = (log π(y_w|x) − log π(y_l|x)) − (log π_ref(y_w|x) − log π_ref(y_l|x))   [docs/design.md "Losses"]
    return (policy_chosen - policy_rejected) - (ref_chosen - ref_rejected)


def dpo_loss(
    policy_chosen: Tensor,
    policy_rejected: Tensor,
    ref_chosen: Tensor,
    ref_rejected: Tensor,
    beta: float,
) -> Tensor:
    """DPO: mean of −log σ(β·h)."""
    _check_beta(beta)
    h = _log_ratio_margin(policy_chosen, policy_rejected, ref_chosen, ref_rejected)
    # L_DPO = −E[log σ(β·h)]   [design "Losses", "dpo"; Rafailov et al. 2023, eq. 7]
    # logsigmoid rather than log(sigmoid(·)) so large negative β·h stays finite.
    return -F.logsigmoid(beta * h).mean()


def ipo_loss(
    policy_chosen: Tensor,
    policy_rejected: Tensor,
    ref_chosen: Tensor,
    ref_rejected: Tensor,
    beta: float,
) -> Tensor:
    """IPO: mean of (h − 1/(2β))², minimised at h = 1/(2β)."""
    _check_beta(beta)
    h = _log_ratio_margin(policy_chosen, policy_rejected, ref_chosen, ref_rejected)
    # L_IPO = E[(h − τ⁻¹/2)²] with τ = β   [design "Losses", "ipo"; Azar et al. 2023, eq. 17]
    return ((h - 1.0 / (2.0 * beta)) ** 2).mean()


def kto_loss(
    policy_logps: Tensor,
    ref_logps: Tensor,
    desirable: Tensor,
    kl: Tensor,
    beta: float,
    desirable_weight: float = 1.0,
    undesirable_weight: float = 1.0,
) -> Tensor:
    """Unpaired KTO: one record per (x, y), flagged desirable or not; mean over records."""
    _check_beta(beta)
    desirable = desirable.to(torch.bool)
    if desirable.shape != policy_logps.shape:
        raise ValueError(
            f"desirable has shape {tuple(desirable.shape)}, "
            f"policy_logps has shape {tuple(policy_logps.shape)}"
        )
    # r = log π(y|x) − log π_ref(y|x)   [Ethayarajh et al. 2024, eq. 8, r_θ]
    r = policy_logps - ref_logps
    # z_0 = max(0, KL) and carries no gradient: it is a reference point, not a target
    # [Ethayarajh et al. 2024, eq. 8, z_0; design "Losses", "kto" (detached)].
    z = kl.detach().clamp(min=0)
    # v(x,y) = λ_D σ(β(r − z_0)) if desirable, λ_U σ(β(z_0 − r)) otherwise; L = E[λ_y − v]
    # [Ethayarajh et al. 2024, eq. 8;
    #  design "Losses", "kto": w_d(1 − σ(β(r_w − z))), w_u(1 − σ(β(z − r_l)))]
    per_record = torch.where(
        desirable,
        desirable_weight * (1.0 - torch.sigmoid(beta * (r - z))),
        undesirable_weight * (1.0 - torch.sigmoid(beta * (z - r))),
    )
    return per_record.mean()


def kto_paired_loss(
    policy_chosen: Tensor,
    policy_rejected: Tensor,
    ref_chosen: Tensor,
    ref_rejected: Tensor,
    kl: Tensor,
    beta: float,
    desirable_weight: float = 1.0,
    undesirable_weight: float = 1.0,
) -> Tensor:
    """KTO on paired data: y_w is a desirable record, y_l an undesirable one.

    Per pair w_d·(1 − σ(β(r_w − z))) + w_u·(1 − σ(β(z − r_l))) as in docs/design.md "Losses", averaged
    over pairs: twice `kto_loss` on the concatenation of both halves (a mean over 2B records).
    """
    # Unpairing (x, y_w, y_l) into (x, y_w, True), (x, y_l, False)   [Ethayarajh et al. 2024, §4]
    policy = torch.cat([policy_chosen, policy_rejected])
    ref = torch.cat([ref_chosen, ref_rejected])
    desirable = torch.cat(
        [
            torch.ones_like(policy_chosen, dtype=torch.bool),
            torch.zeros_like(policy_rejected, dtype=torch.bool),
        ]
    )
    return 2.0 * kto_loss(policy, ref, desirable, kl, beta, desirable_weight, undesirable_weight)


def ce_loss(policy_logps_all: Tensor, target: Tensor) -> Tensor:
    """Cross-entropy on already log-softmaxed rows [B, C] against class indices [B]."""
    # L_CE = −E[log π(y_true|x)]   [design "Losses", "ce"]; gather, because the rows are already log-probs
    picked = policy_logps_all.gather(1, target.long().unsqueeze(1)).squeeze(1)
    return -picked.mean()


def kl_ref_policy(ref_logps_all: Tensor, policy_logps_all: Tensor) -> Tensor:
    """KL(π_ref ‖ π) over the candidate set, averaged over the batch."""
    # KL(π_ref ‖ π) = Σ_c π_ref(c|x) (log π_ref(c|x) − log π(c|x))   [design "Losses", "regulariser"]
    per_row = (ref_logps_all.exp() * (ref_logps_all - policy_logps_all)).sum(dim=-1)
    return per_row.mean()


@dataclass(frozen=True)
class PreferenceLogps:
    """Log-probs of one batch of preference records, as produced by the model code.

    policy_chosen / policy_rejected / ref_chosen / ref_rejected: [B], log π(y_w|x) etc.
    policy_all / ref_all: [B, C] full log-prob rows on the attacked images.
    target: [B] long, the index of the true class (= y_w) in C.
    anchor_all: [B, C] log π_ref on each image's word-free twin (the same scene before its word was
        written), where the records have twins and the anchor is on; else None.
    policy_emb / anchor_emb: [K, d] for the embedding anchor (else None): the policy's image embedding
        f(x) of the batch's attacked and regularisation images, and the reference's f(x̄) of their twins,
        row for row.
    """

    policy_chosen: Tensor
    policy_rejected: Tensor
    ref_chosen: Tensor
    ref_rejected: Tensor
    policy_all: Tensor
    ref_all: Tensor
    target: Tensor
    anchor_all: Tensor | None = None
    policy_emb: Tensor | None = None
    anchor_emb: Tensor | None = None


@runtime_checkable
class LossWeights(Protocol):
    """The objective's hyper-parameters, names after TRL (docs/design.md, "Losses"). The run config's
    loss section is one (po_cluster/config.py, LossConfig): it is passed as it is, so the numbers are
    stated once and this module still knows no config."""

    @property
    def beta(self) -> float: ...
    @property
    def kl_weight(self) -> float: ...
    @property
    def desirable_weight(self) -> float: ...
    @property
    def undesirable_weight(self) -> float: ...
    @property
    def anchor_weight(self) -> float | None: ...
    @property
    def anchor_space(self) -> str: ...
    @property
    def loss_type(self) -> str: ...


def anchor_mu(weights: LossWeights, loss_type: str | None = None) -> float:
    """μ, the anchor term's weight in the objective of `loss_type` (default: the weights' own): as set;
    unset, 1 for the `anchor` loss (the term is that loss) and 0 beside dpo, ipo, kto or ce, so that
    those stay exactly the paper's."""
    if weights.anchor_weight is not None:
        return weights.anchor_weight
    return 1.0 if (loss_type or weights.loss_type) == "anchor" else 0.0


def anchor_on(weights: LossWeights, loss_type: str | None = None) -> bool:
    """Whether the word-free anchor is part of the objective (μ > 0). Then π_ref's answers on the
    regularisation images are also its answers on their twins."""
    return anchor_mu(weights, loss_type) > 0


def _pairs(logps: PreferenceLogps) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    return logps.policy_chosen, logps.policy_rejected, logps.ref_chosen, logps.ref_rejected


def _dpo(logps: PreferenceLogps, kl: Tensor, s: LossWeights) -> Tensor:
    return dpo_loss(*_pairs(logps), s.beta)


def _ipo(logps: PreferenceLogps, kl: Tensor, s: LossWeights) -> Tensor:
    return ipo_loss(*_pairs(logps), s.beta)


def _kto(logps: PreferenceLogps, kl: Tensor, s: LossWeights) -> Tensor:
    # The regulariser KL doubles as KTO's reference point z (detached inside kto_loss).
    return kto_paired_loss(*_pairs(logps), kl, s.beta, s.desirable_weight, s.undesirable_weight)


def _ce(logps: PreferenceLogps, kl: Tensor, s: LossWeights) -> Tensor:
    return ce_loss(logps.policy_all, logps.target)


def anchor_loss(logps: PreferenceLogps) -> Tensor:
    """The word-free anchor: KL(π_ref(·|x̄) ‖ π(·|x)) averaged over the batch, x an attacked image and
    x̄ its word-free twin. Zero exactly when the policy answers the attacked image as the reference
    answers the same scene without the word: the word is ignored, neither read nor avoided."""
    if logps.anchor_all is None:
        raise ValueError("the word-free anchor needs π_ref on each image's word-free twin (anchor_all)")
    # L_anchor = E_x[KL(π_ref(·|x̄) ‖ π(·|x))]   [design "Losses", "anchor"]
    return kl_ref_policy(logps.anchor_all, logps.policy_all)


def embedding_anchor_loss(policy_emb: Tensor, anchor_emb: Tensor) -> Tensor:
    """The word-free anchor on image embeddings: mean of 1 − cos(f(x), f_ref(x̄)) over the rows, x an
    image and x̄ its word-free twin. Zero exactly when the policy's tower sees each image as the
    reference sees the same scene without the word; the answers follow from the embedding, and the
    tower keeps its geometry, which an anchor on the answers alone leaves free."""
    if policy_emb.shape != anchor_emb.shape:
        raise ValueError(f"policy_emb has shape {tuple(policy_emb.shape)}, anchor_emb {tuple(anchor_emb.shape)}")
    # L = E[1 − cos(f(x), f_ref(x̄))]   [design "Losses", "anchor", anchor_space embedding]
    return (1.0 - F.cosine_similarity(policy_emb, anchor_emb, dim=-1)).mean()


def anchor_term(logps: PreferenceLogps, space: str) -> Tensor:
    """The anchor term, unweighted, in `space`: "logits" holds the answers (anchor_loss), "embedding"
    the image embeddings (embedding_anchor_loss)."""
    if space == "logits":
        return anchor_loss(logps)
    if space != "embedding":
        raise ValueError(f"unknown anchor_space {space!r}; valid: logits, embedding")
    if logps.policy_emb is None or logps.anchor_emb is None:
        raise ValueError("the embedding anchor needs the policy's f(x) and the reference's f(x̄) of each "
                         "image's word-free twin (policy_emb, anchor_emb)")
    return embedding_anchor_loss(logps.policy_emb, logps.anchor_emb)


def _anchor(logps: PreferenceLogps, kl: Tensor, s: LossWeights) -> Tensor:
    # The anchor loss is the μ-weighted anchor term alone (μ 1 unless set); no preference term.
    return anchor_mu(s, "anchor") * anchor_term(logps, s.anchor_space)


LOSSES: dict[str, Callable[[PreferenceLogps, Tensor, LossWeights], Tensor]] = {
    "dpo": _dpo,
    "ipo": _ipo,
    "kto": _kto,
    "ce": _ce,
    "anchor": _anchor,
}


def preference_objective(
    loss_type: str, logps: PreferenceLogps, kl: Tensor, weights: LossWeights
) -> tuple[Tensor, dict[str, float]]:
    """Total training objective: the chosen loss + λ·KL(π_ref ‖ π) on the regularisation images, and
    + μ·L_anchor when `anchor_weight` μ > 0 beside a preference loss (L_anchor in `anchor_space`).

    `kl` is computed by the caller on the regularisation images, with grad.
    Returns (total, metrics); metrics are detached Python floats for logging.
    """
    if loss_type not in LOSSES:
        raise ValueError(f"unknown loss_type {loss_type!r}; valid names: {sorted(LOSSES)}")
    # Checked here too so "ce" (which ignores β) still rejects a bad config early.
    _check_beta(weights.beta)
    loss = LOSSES[loss_type](logps, kl, weights)
    # total = L_loss_type + λ·KL(π_ref ‖ π)   [design "Losses", "regulariser, added to every loss"]
    total = loss + weights.kl_weight * kl
    if loss_type != "anchor" and anchor_on(weights, loss_type):  # + μ·L_anchor   [design "Losses", "anchor"]
        total = total + anchor_mu(weights, loss_type) * anchor_term(logps, weights.anchor_space)
    with torch.no_grad():
        h = _log_ratio_margin(*_pairs(logps))
        metrics = {
            "loss": float(loss.detach()),
            "kl": float(kl.detach()),
            "total": float(total.detach()),
            # Implicit-reward margin and accuracy (TRL's rewards/margins, rewards/accuracies),
            # logged for every loss type so "ce" runs are comparable with the others.
            "reward_margin": float(h.mean()),
            "reward_accuracy": float((h > 0).float().mean()),
        }
        if anchor_on(weights, loss_type):  # the term unweighted, under its own name in each space
            name = "anchor_kl" if weights.anchor_space == "logits" else "anchor_distance"
            metrics[name] = float(anchor_term(logps, weights.anchor_space))
    return total, metrics
