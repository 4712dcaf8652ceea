"""Loss values checked against numbers worked out by hand (docs/design.md, "Conventions").

Reference values are computed with `math` from the formulas in docs/design.md "Losses", never
by calling the function under test.
"""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch

from po_cluster.config import LossConfig
from po_cluster.losses import (
    LOSSES,
    PreferenceLogps,
    ce_loss,
    dpo_loss,
    embedding_anchor_loss,
    ipo_loss,
    kl_ref_policy,
    kto_loss,
    kto_paired_loss,
    preference_objective,
)


def t(*values: float) -> torch.Tensor:
    return torch.tensor(values, dtype=torch.float64)


def sigmoid(x: float) -> float:
    return 1.0 / (1.0 + math.exp(-x))


# A two-pair batch used throughout:
#   pc = [-1.0, -0.5], pr = [-2.0, -1.0], rc = [-1.5, -0.7], rr = [-1.5, -0.7]
#   h  = (pc - pr) - (rc - rr) = [1.0 - 0.0, 0.5 - 0.0] = [1.0, 0.5]
PC, PR, RC, RR = t(-1.0, -0.5), t(-2.0, -1.0), t(-1.5, -0.7), t(-1.5, -0.7)


# ---------------------------------------------------------------- DPO


def test_dpo_matches_hand_numbers() -> None:
    # −log σ(x) = log(1 + e^{−x}); β = 0.5: β·h = [0.5, 0.25]
    expected = (math.log1p(math.exp(-0.5)) + math.log1p(math.exp(-0.25))) / 2  # ≈ 0.5887
    assert dpo_loss(PC, PR, RC, RR, beta=0.5).item() == pytest.approx(expected, rel=1e-12)


def test_dpo_depends_on_beta() -> None:
    # β = 2: β·h = [2.0, 1.0] → (log(1+e^-2) + log(1+e^-1)) / 2 ≈ (0.126928 + 0.313262) / 2
    expected = (math.log1p(math.exp(-2.0)) + math.log1p(math.exp(-1.0))) / 2
    got = dpo_loss(PC, PR, RC, RR, beta=2.0).item()
    assert got == pytest.approx(expected, rel=1e-12)
    assert got == pytest.approx(0.2200951, abs=1e-6)
    assert got != pytest.approx(dpo_loss(PC, PR, RC, RR, beta=0.5).item())


def test_dpo_at_zero_margin_is_log2() -> None:
    # policy == reference → h = 0 → −log σ(0) = log 2, whatever β
    z = t(-1.0, -3.0)
    assert dpo_loss(z, z - 1, z, z - 1, beta=0.3).item() == pytest.approx(math.log(2))


# ---------------------------------------------------------------- IPO


def test_ipo_matches_hand_numbers() -> None:
    # β = 0.25 → 1/(2β) = 2; (1 − 2)² = 1, (0.5 − 2)² = 2.25; mean = 1.625
    assert ipo_loss(PC, PR, RC, RR, beta=0.25).item() == pytest.approx(1.625)
    # β = 0.5 → target 1; (1 − 1)² = 0, (0.5 − 1)² = 0.25; mean = 0.125
    assert ipo_loss(PC, PR, RC, RR, beta=0.5).item() == pytest.approx(0.125)


def test_ipo_minimum_at_h_equals_one_over_two_beta() -> None:
    beta = 2.0  # target h* = 1/(2β) = 0.25
    ref = t(-1.0)
    for h, expected in [(0.25, 0.0), (0.0, 0.0625), (0.5, 0.0625), (1.25, 1.0)]:
        # pc − pr = h with rc = rr, so the margin is exactly h; loss = (h − 0.25)²
        pc = t(-1.0 + h)
        assert ipo_loss(pc, t(-1.0), ref, ref, beta=beta).item() == pytest.approx(expected)
    # the gradient vanishes at the minimum
    pc = t(-0.75).requires_grad_()
    ipo_loss(pc, t(-1.0), ref, ref, beta=beta).backward()
    assert pc.grad is not None and pc.grad.item() == pytest.approx(0.0)


# ---------------------------------------------------------------- KTO

# Unpaired records: policy = [-1.0, -2.0], ref = [-1.5, -1.0], desirable = [True, False]
#   r = policy − ref = [0.5, -1.0]; with kl = 0.2 → z = 0.2, β = 1:
#   desirable:   1 − σ(β(r − z)) = 1 − σ(0.3)
#   undesirable: 1 − σ(β(z − r)) = 1 − σ(1.2)
POL, REF, DES = t(-1.0, -2.0), t(-1.5, -1.0), torch.tensor([True, False])


def test_kto_matches_hand_numbers() -> None:
    expected = ((1 - sigmoid(0.3)) + (1 - sigmoid(1.2))) / 2  # ≈ (0.425557 + 0.231475) / 2
    got = kto_loss(POL, REF, DES, t(0.2).squeeze(), beta=1.0).item()
    assert got == pytest.approx(expected, rel=1e-12)
    assert got == pytest.approx(0.328516, abs=1e-6)


def test_kto_weights_desirable_and_undesirable_separately() -> None:
    kl = torch.tensor(0.2, dtype=torch.float64)
    # w_d = 2, w_u = 0.5: (2·(1 − σ(0.3)) + 0.5·(1 − σ(1.2))) / 2
    expected = (2 * (1 - sigmoid(0.3)) + 0.5 * (1 - sigmoid(1.2))) / 2
    got = kto_loss(POL, REF, DES, kl, beta=1.0, desirable_weight=2.0, undesirable_weight=0.5)
    assert got.item() == pytest.approx(expected, rel=1e-12)
    # only the undesirable weight moves an all-undesirable batch
    undes = torch.tensor([False, False])
    a = kto_loss(POL, REF, undes, kl, beta=1.0, desirable_weight=5.0, undesirable_weight=1.0)
    b = kto_loss(POL, REF, undes, kl, beta=1.0, desirable_weight=1.0, undesirable_weight=1.0)
    assert a.item() == pytest.approx(b.item())


def test_kto_depends_on_beta_and_clamps_negative_kl() -> None:
    # β = 2, kl = −0.3 → z = max(0, −0.3) = 0: 1 − σ(2·0.5) and 1 − σ(2·(0 + 1.0))
    expected = ((1 - sigmoid(1.0)) + (1 - sigmoid(2.0))) / 2
    got = kto_loss(POL, REF, DES, torch.tensor(-0.3, dtype=torch.float64), beta=2.0)
    assert got.item() == pytest.approx(expected, rel=1e-12)


def test_kto_reference_point_is_detached() -> None:
    pol = POL.clone().requires_grad_()
    kl = torch.tensor(0.2, dtype=torch.float64, requires_grad=True)
    kto_loss(pol, REF, DES, kl, beta=1.0).backward()
    assert kl.grad is None
    assert pol.grad is not None


def test_kto_paired_is_per_pair_sum_of_unpaired() -> None:
    kl = torch.tensor(0.1, dtype=torch.float64)
    paired = kto_paired_loss(
        PC, PR, RC, RR, kl, beta=0.5, desirable_weight=1.5, undesirable_weight=0.7
    )
    unpaired = kto_loss(
        torch.cat([PC, PR]), torch.cat([RC, RR]), torch.tensor([True, True, False, False]),
        kl, beta=0.5, desirable_weight=1.5, undesirable_weight=0.7,
    )
    assert paired.item() == pytest.approx(2 * unpaired.item(), rel=1e-12)
    # by hand: r_w = pc − rc = [0.5, 0.2], r_l = pr − rr = [−0.5, −0.3], z = 0.1, β = 0.5
    expected = (
        1.5 * (1 - sigmoid(0.5 * (0.5 - 0.1))) + 1.5 * (1 - sigmoid(0.5 * (0.2 - 0.1)))
        + 0.7 * (1 - sigmoid(0.5 * (0.1 + 0.5))) + 0.7 * (1 - sigmoid(0.5 * (0.1 + 0.3)))
    ) / 2  # per pair: desirable + undesirable term, mean over the 2 pairs
    assert paired.item() == pytest.approx(expected, rel=1e-12)


# ---------------------------------------------------------------- CE and KL


def test_ce_matches_hand_numbers() -> None:
    rows = torch.log(t(0.7, 0.2, 0.1, 0.25, 0.25, 0.5).reshape(2, 3))
    target = torch.tensor([0, 2])
    # −(log 0.7 + log 0.5) / 2 ≈ (0.356675 + 0.693147) / 2
    expected = -(math.log(0.7) + math.log(0.5)) / 2
    assert ce_loss(rows, target).item() == pytest.approx(expected, rel=1e-12)


def test_kl_matches_hand_numbers_and_is_zero_for_equal_rows() -> None:
    ref = torch.log(t(0.5, 0.5, 0.2, 0.8).reshape(2, 2))
    pol = torch.log(t(0.25, 0.75, 0.2, 0.8).reshape(2, 2))
    # row 0: 0.5·log(0.5/0.25) + 0.5·log(0.5/0.75) = 0.5·log 2 + 0.5·log(2/3) ≈ 0.143841
    # row 1: equal distributions → 0; mean over the batch
    expected = (0.5 * math.log(2) + 0.5 * math.log(2 / 3) + 0.0) / 2
    assert kl_ref_policy(ref, pol).item() == pytest.approx(expected, rel=1e-12)
    assert kl_ref_policy(ref, ref).item() == 0.0


def test_kl_direction_is_ref_then_policy() -> None:
    ref = torch.log(t(0.9, 0.1).reshape(1, 2))
    pol = torch.log(t(0.5, 0.5).reshape(1, 2))
    # KL(ref‖pol) = 0.9·log 1.8 + 0.1·log 0.2 ≈ 0.368064; KL(pol‖ref) ≈ 0.510826
    expected = 0.9 * math.log(0.9 / 0.5) + 0.1 * math.log(0.1 / 0.5)
    assert kl_ref_policy(ref, pol).item() == pytest.approx(expected, rel=1e-12)


# ---------------------------------------------------------------- objective


def _logps() -> PreferenceLogps:
    # h = (pc − pr) − (rc − rr) = [(−1.0 + 2.0) − 0, (−1.5 + 1.0) − 0] = [1.0, −0.5]
    pol_all = torch.log(t(0.6, 0.3, 0.1, 0.2, 0.5, 0.3).reshape(2, 3))
    ref_all = torch.log(t(0.5, 0.4, 0.1, 0.3, 0.4, 0.3).reshape(2, 3))
    return PreferenceLogps(
        policy_chosen=t(-1.0, -1.5), policy_rejected=t(-2.0, -1.0),
        ref_chosen=t(-1.5, -1.0), ref_rejected=t(-1.5, -1.0),
        policy_all=pol_all, ref_all=ref_all, target=torch.tensor([0, 0]),
    )


def test_registry_names() -> None:
    assert set(LOSSES) == {"dpo", "ipo", "kto", "ce", "anchor"}


def test_objective_adds_weighted_kl_and_reports_metrics() -> None:
    logps, kl = _logps(), torch.tensor(0.4, dtype=torch.float64)
    # h = [(-1.0 + 2.0) − 0, (-1.5 + 1.0) − 0] = [1.0, −0.5]; β = 1
    dpo = (math.log1p(math.exp(-1.0)) + math.log1p(math.exp(0.5))) / 2
    total, m = preference_objective("dpo", logps, kl, LossConfig(beta=1.0, kl_weight=0.5))
    assert total.item() == pytest.approx(dpo + 0.5 * 0.4, rel=1e-12)
    assert m["loss"] == pytest.approx(dpo)
    assert m["kl"] == pytest.approx(0.4)
    assert m["reward_margin"] == pytest.approx(0.25)  # (1.0 − 0.5) / 2
    assert m["reward_accuracy"] == pytest.approx(0.5)  # one of two margins > 0
    # changing λ moves the total by Δλ·kl = 1.5 · 0.4 = 0.6
    total2, _ = preference_objective("dpo", logps, kl, LossConfig(beta=1.0, kl_weight=2.0))
    assert total2.item() - total.item() == pytest.approx(0.6, rel=1e-12)


def test_objective_other_losses_by_hand() -> None:
    logps, kl = _logps(), torch.tensor(0.4, dtype=torch.float64)
    s = LossConfig(beta=0.5, kl_weight=0.1, desirable_weight=2.0, undesirable_weight=1.0)
    # ipo: target 1/(2·0.5) = 1; ((1 − 1)² + (−0.5 − 1)²) / 2 = 1.125
    total, _ = preference_objective("ipo", logps, kl, s)
    assert total.item() == pytest.approx(1.125 + 0.1 * 0.4)
    # kto: z = 0.4; r_w = pc − rc = [0.5, −0.5], r_l = pr − rr = [−0.5, 0.0]
    kto = (
        2 * (1 - sigmoid(0.5 * (0.5 - 0.4))) + 2 * (1 - sigmoid(0.5 * (-0.5 - 0.4)))
        + (1 - sigmoid(0.5 * (0.4 + 0.5))) + (1 - sigmoid(0.5 * (0.4 - 0.0)))
    ) / 2  # two pairs, each desirable term + undesirable term
    total, _ = preference_objective("kto", logps, kl, s)
    assert total.item() == pytest.approx(kto + 0.04, rel=1e-12)
    # ce: target 0 on both rows → −(log 0.6 + log 0.2) / 2
    total, _ = preference_objective("ce", logps, kl, s)
    assert total.item() == pytest.approx(-(math.log(0.6) + math.log(0.2)) / 2 + 0.04, rel=1e-12)


def test_anchor_by_hand_alone_and_beside_a_loss() -> None:
    from dataclasses import replace

    # π on the attacked images: rows [0.6, 0.3, 0.1], [0.2, 0.5, 0.3]; π_ref on their word-free twins:
    # [0.6, 0.3, 0.1] (the same: 0) and [0.5, 0.4, 0.1]
    twins = torch.log(t(0.6, 0.3, 0.1, 0.5, 0.4, 0.1).reshape(2, 3))
    logps, kl = replace(_logps(), anchor_all=twins), torch.tensor(0.4, dtype=torch.float64)
    row1 = 0.5 * math.log(0.5 / 0.2) + 0.4 * math.log(0.4 / 0.5) + 0.1 * math.log(0.1 / 0.3)
    anchor = (0.0 + row1) / 2
    total, m = preference_objective("anchor", logps, kl, LossConfig(kl_weight=0.5))
    assert total.item() == pytest.approx(anchor + 0.5 * 0.4, rel=1e-12) and m["anchor_kl"] == pytest.approx(anchor)
    ce = -(math.log(0.6) + math.log(0.2)) / 2
    total, m = preference_objective("ce", logps, kl, LossConfig(kl_weight=0.5, anchor_weight=2.0))
    assert total.item() == pytest.approx(ce + 0.5 * 0.4 + 2.0 * anchor, rel=1e-12)
    # the paper's losses stay exactly the paper's: no anchor term, no anchor metric, twins or not
    total, m = preference_objective("ce", logps, kl, LossConfig(kl_weight=0.5))
    assert total.item() == pytest.approx(ce + 0.5 * 0.4, rel=1e-12) and "anchor_kl" not in m
    with pytest.raises(ValueError, match="word-free twin"):
        preference_objective("anchor", _logps(), kl, LossConfig())


def test_embedding_anchor_by_hand_alone_and_beside_a_loss() -> None:
    from dataclasses import replace

    # f(x) of three images (two attacked, one regularisation) and the reference's f(x̄) of their twins:
    # cos([1, 0], [1, 0]) = 1; cos([0, 2], [1, 1]) = 2 / (2·√2) = 1/√2; cos([3, 4], [−4, 3]) = 0
    policy, twins = t(1.0, 0.0, 0.0, 2.0, 3.0, 4.0).reshape(3, 2), t(1.0, 0.0, 1.0, 1.0, -4.0, 3.0).reshape(3, 2)
    distance = (0.0 + (1 - 1 / math.sqrt(2)) + 1.0) / 3
    assert embedding_anchor_loss(policy, twins).item() == pytest.approx(distance, rel=1e-12)
    logps, kl = replace(_logps(), policy_emb=policy, anchor_emb=twins), torch.tensor(0.4, dtype=torch.float64)
    alone = LossConfig(loss_type="anchor", anchor_space="embedding", anchor_weight=10.0, kl_weight=0.5)
    total, m = preference_objective("anchor", logps, kl, alone)
    assert total.item() == pytest.approx(10.0 * distance + 0.5 * 0.4, rel=1e-12)
    assert m["anchor_distance"] == pytest.approx(distance) and "anchor_kl" not in m
    total, _ = preference_objective("anchor", logps, kl, LossConfig(anchor_space="embedding", kl_weight=0.5))
    assert total.item() == pytest.approx(distance + 0.5 * 0.4, rel=1e-12)  # μ unset: 1 for the anchor loss
    dpo = (math.log1p(math.exp(-1.0)) + math.log1p(math.exp(0.5))) / 2  # h = [1.0, −0.5], β = 1
    beside = LossConfig(beta=1.0, kl_weight=0.5, anchor_space="embedding", anchor_weight=3.0)
    total, _ = preference_objective("dpo", logps, kl, beside)
    assert total.item() == pytest.approx(dpo + 0.5 * 0.4 + 3.0 * distance, rel=1e-12)
    # μ unset beside dpo: exactly the paper's, whatever the space and whatever embeddings the batch has
    paper, _ = preference_objective("dpo", _logps(), kl, LossConfig(beta=1.0, kl_weight=0.5))
    for space in ("logits", "embedding"):
        total, m = preference_objective("dpo", logps, kl, LossConfig(beta=1.0, kl_weight=0.5, anchor_space=space))
        assert total.item() == paper.item() and not any(k.startswith("anchor") for k in m)
    with pytest.raises(ValueError, match="embedding anchor needs"):
        preference_objective("anchor", _logps(), kl, alone)
    with pytest.raises(ValueError, match="shape"):
        embedding_anchor_loss(policy, twins[:2])


def test_embedding_anchor_gradient_turns_f_toward_the_twin() -> None:
    # d(1 − cos(p, q))/dp at p = [1, 0], q = [0, 1]: −(q/(|p||q|) − cos·p/|p|²) = −[0, 1]
    policy = t(1.0, 0.0).reshape(1, 2).requires_grad_()
    embedding_anchor_loss(policy, t(0.0, 1.0).reshape(1, 2)).backward()
    assert policy.grad is not None and policy.grad[0].tolist() == pytest.approx([0.0, -1.0])


def test_anchor_config_needs_records_with_twins() -> None:
    from po_cluster.config import RunConfig

    with pytest.raises(ValueError, match="word-free twin"):
        RunConfig.model_validate({"loss": {"loss_type": "anchor"}, "data": {"task": "bias"}})
    with pytest.raises(ValueError, match="word-free twin"):
        RunConfig.model_validate({"loss": {"anchor_weight": 1.0}, "data": {"dataset": "/somewhere"}})


def test_embedding_anchor_config_needs_a_tower_that_trains() -> None:
    from po_cluster.config import RunConfig, SweepConfig

    embedding = {"loss_type": "anchor", "anchor_space": "embedding"}
    with pytest.raises(ValueError, match="frozen tower cannot move"):
        RunConfig.model_validate({"loss": embedding, "model": {"image_tower": "frozen"}})
    with pytest.raises(ValueError, match="searches frozen"):
        SweepConfig.model_validate({"base": {"loss": embedding}, "space": {"loss_type": ["anchor"],
                                                                          "image_tower": ["full", "frozen"]}})
    # the space is irrelevant where the anchor is off: the paper's dpo on a frozen tower
    RunConfig.model_validate({"loss": {"anchor_space": "embedding"}, "model": {"image_tower": "frozen"}})
    with pytest.raises(ValueError, match="anchor_weight 0"):
        LossConfig(loss_type="anchor", anchor_weight=0.0)


def test_objective_gradient_flows_through_kl() -> None:
    kl = torch.tensor(0.4, dtype=torch.float64, requires_grad=True)
    total, _ = preference_objective("kto", _logps(), kl, LossConfig(beta=1.0, kl_weight=0.3))
    total.backward()
    # kto uses kl only detached, so the gradient is exactly λ
    assert kl.grad is not None and kl.grad.item() == pytest.approx(0.3)


def test_unknown_loss_type_and_bad_beta() -> None:
    s = LossConfig(beta=1.0, kl_weight=0.0)
    with pytest.raises(ValueError, match="orpo") as err:
        preference_objective("orpo", _logps(), torch.tensor(0.0), s)
    assert all(name in str(err.value) for name in ("dpo", "ipo", "kto", "ce"))
    for beta in (0.0, -1.0):
        with pytest.raises(ValueError, match="beta"):
            dpo_loss(PC, PR, RC, RR, beta=beta)
        with pytest.raises(ValueError, match="beta"):
            ipo_loss(PC, PR, RC, RR, beta=beta)
        with pytest.raises(ValueError, match="beta"):
            kto_loss(POL, REF, DES, torch.tensor(0.0), beta=beta)
        with pytest.raises(ValueError, match="beta"):
            bad = LossConfig.model_construct(beta=beta, kl_weight=0.0)  # past the config's own check
            preference_objective("ce", _logps(), torch.tensor(0.0), bad)


def test_losses_module_imports_nothing_from_the_model() -> None:
    # docs/design.md, "Conventions": losses are pure functions of log-probs; only torch and the stdlib.
    import ast

    import po_cluster.losses as mod

    tree = ast.parse(Path(mod.__file__).read_text(encoding="utf-8"))
    roots = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            roots |= {alias.name.split(".")[0] for alias in node.names}
        elif isinstance(node, ast.ImportFrom):
            roots.add((node.module or "").split(".")[0])
    assert roots <= {"__future__", "collections", "dataclasses", "typing", "torch"}, roots
