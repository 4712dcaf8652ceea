"""BMA weights and the running average checked against hand-computed numbers."""

from __future__ import annotations

import pytest
import torch

from po_cluster.train.bma import BetaMovingAverage, beta_weights


def const(value: float, dtype: torch.dtype = torch.float32) -> dict[str, torch.Tensor]:
    return {"w": torch.full((2, 2), value, dtype=dtype), "b": torch.full((3,), value, dtype=dtype)}


# ---------------------------------------------------------------- beta_weights


def test_beta_weights_by_hand_for_T2() -> None:
    # x_k = (k + ½)/3 = 1/6, 1/2, 5/6. BetaPDF(x; a, a) ∝ (x(1 − x))^(a − 1), the
    # normalising constant B(a, a) cancels: x(1 − x) = 5/36, 1/4, 5/36, a − 1 = −0.3.
    raw = [(5 / 36) ** -0.3, 0.25**-0.3, (5 / 36) ** -0.3]  # ≈ 1.80801, 1.51572, 1.80801
    expected = [r / sum(raw) for r in raw]  # ≈ 0.35232, 0.29536, 0.35232
    assert beta_weights(2, 0.7) == pytest.approx(expected, rel=1e-12)
    assert beta_weights(2, 0.7)[0] == pytest.approx(0.352319, abs=1e-6)


@pytest.mark.parametrize("T", [1, 5, 10, 101])
def test_beta_weights_symmetric_and_normalised(T: int) -> None:
    w = beta_weights(T, 0.7)
    assert len(w) == T + 1
    assert sum(w) == pytest.approx(1.0, rel=1e-12)
    assert w == pytest.approx(w[::-1], rel=1e-12)
    # a < 1: U-shaped, the ends weigh more than the middle (T = 1 has no middle)
    if T > 1:
        assert w[0] > w[T // 2]


def test_beta_weights_uniform_for_a_equal_one() -> None:
    assert beta_weights(4, 1.0) == pytest.approx([0.2] * 5, rel=1e-12)


def test_beta_weights_reject_bad_arguments() -> None:
    with pytest.raises(ValueError):
        beta_weights(-1)
    with pytest.raises(ValueError):
        beta_weights(3, 0.0)


# ---------------------------------------------------------------- BetaMovingAverage


def test_bma_weighted_mean_of_three_constant_iterates() -> None:
    w0, w1, w2 = beta_weights(2, 0.7)
    bma = BetaMovingAverage(const(0.0), total_steps=2)
    bma.update(1, const(1.0))
    # mid-run: (w0·0 + w1·1) / (w0 + w1)
    assert bma.average()["w"][0, 0].item() == pytest.approx(w1 / (w0 + w1), rel=1e-6)
    bma.update(2, const(3.0))
    # end: w0·0 + w1·1 + w2·3 with Σw = 1 ≈ 0.29536 + 1.05696 = 1.35232
    avg = bma.average()
    assert torch.allclose(avg["w"], torch.full((2, 2), w1 + 3 * w2))
    assert torch.allclose(avg["b"], torch.full((3,), w1 + 3 * w2))
    assert avg["w"][0, 0].item() == pytest.approx(1.352319, abs=1e-5)


def test_bma_with_a_one_is_plain_mean() -> None:
    bma = BetaMovingAverage(const(1.0), total_steps=3, a=1.0)
    for step, value in [(1, 2.0), (2, 4.0), (3, 9.0)]:
        bma.update(step, const(value))
    # (1 + 2 + 4 + 9) / 4 = 4
    assert torch.allclose(bma.average()["w"], torch.full((2, 2), 4.0))


def test_bma_copies_and_keeps_dtype() -> None:
    params = const(2.0, dtype=torch.float16)
    params["w"].requires_grad_()
    bma = BetaMovingAverage(const(0.0, dtype=torch.float16), total_steps=2, a=1.0)
    bma.update(1, params)
    with torch.no_grad():
        params["w"].add_(100.0)  # later in-place changes must not leak into the average
    avg = bma.average()
    assert avg["w"].dtype == torch.float16 and not avg["w"].requires_grad
    assert torch.allclose(avg["w"].float(), torch.full((2, 2), 1.0))  # (0 + 2) / 2


def test_bma_rejects_bad_steps() -> None:
    bma = BetaMovingAverage(const(0.0), total_steps=3)
    for bad in (0, 4, -1):
        with pytest.raises(ValueError, match=str(bad)):
            bma.update(bad, const(1.0))
    bma.update(2, const(1.0))
    for bad in (2, 1):
        with pytest.raises(ValueError, match=f"step {bad}"):
            bma.update(bad, const(1.0))
    bma.update(3, const(1.0))  # skipping a step is allowed


def test_bma_rejects_other_parameter_names() -> None:
    bma = BetaMovingAverage(const(0.0), total_steps=3)
    with pytest.raises(ValueError, match="'b'"):
        bma.update(1, {"w": torch.zeros(2, 2)})
