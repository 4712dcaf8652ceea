"""The Beta moving average (BMA) of one run's iterates.

BMA (docs/design.md, "BMA"): w_k ∝ BetaPDF((k + ½)/(T + 1); a, a), k = 0..T, iterate 0 being
the pretrained weights. With a < 1 the U-shaped Beta puts extra mass on both
ends — the starting model (which keeps robustness) and the final iterate (which
holds what was learned). Averages across trials (soups) are in po_cluster.sweep.soup.
"""

from __future__ import annotations

import math
from collections.abc import Mapping

import torch
from torch import Tensor

__all__ = ["BetaMovingAverage", "beta_weights"]

StateDict = dict[str, Tensor]


def _beta_pdf(x: float, a: float, b: float) -> float:
    # Beta(x; a, b) = x^(a−1) (1−x)^(b−1) / B(a, b), B(a, b) = Γ(a)Γ(b)/Γ(a+b);
    # computed in log space with lgamma so it needs no scipy and never overflows.
    log_b = math.lgamma(a) + math.lgamma(b) - math.lgamma(a + b)
    return math.exp((a - 1.0) * math.log(x) + (b - 1.0) * math.log1p(-x) - log_b)


def beta_weights(T: int, a: float = 0.7) -> list[float]:
    """Normalised BMA weights w_0..w_T, w_k ∝ BetaPDF((k + ½)/(T + 1); a, a)."""
    if T < 0:
        raise ValueError(f"T must be >= 0, got {T}")
    if not a > 0:
        raise ValueError(f"a must be > 0, got {a}")
    # The +½ midpoint keeps x strictly inside (0, 1), where the pdf is finite even for a < 1.
    raw = [_beta_pdf((k + 0.5) / (T + 1), a, a) for k in range(T + 1)]
    total = sum(raw)
    return [w / total for w in raw]


class BetaMovingAverage:
    """Running Beta-weighted average of a run's iterates (docs/design.md, "BMA").

    Accumulates Σ_k w_k θ_k in float32 so that low-precision weights do not
    lose the small contributions; `average()` divides by Σ w_k of the iterates
    seen so far, so it is a proper average at any point of the run.
    """

    def __init__(self, initial: Mapping[str, Tensor], total_steps: int, a: float = 0.7) -> None:
        if total_steps < 1:
            raise ValueError(f"total_steps must be >= 1, got {total_steps}")
        self.total_steps = total_steps
        self.a = a
        self.weights = beta_weights(total_steps, a)
        self._dtypes = {name: t.dtype for name, t in initial.items()}
        self._acc: StateDict = {}
        w0 = self.weights[0]
        with torch.no_grad():
            for name, t in initial.items():
                # Integer buffers (counters) cannot be averaged; keep their latest value.
                if t.is_floating_point():
                    self._acc[name] = t.detach().to(torch.float32).clone() * w0
                else:
                    self._acc[name] = t.detach().clone()
        self._weight_sum = w0
        self.last_step = 0

    def update(self, step: int, params: Mapping[str, Tensor]) -> None:
        """Add iterate θ_step with weight w_step; steps must increase within 1..T."""
        if not 1 <= step <= self.total_steps:
            raise ValueError(f"step {step} outside 1..{self.total_steps}")
        if step <= self.last_step:
            raise ValueError(f"step {step} is not after the last step {self.last_step}")
        if set(params) != set(self._acc):
            missing = sorted(set(self._acc) ^ set(params))
            raise ValueError(
                f"step {step}: parameter names differ from the initial ones: {missing[:5]}"
            )
        w = self.weights[step]
        with torch.no_grad():
            for name, acc in self._acc.items():
                p = params[name].detach().to(device=acc.device)
                if acc.is_floating_point():
                    acc.add_(p.to(torch.float32), alpha=w)
                else:
                    acc.copy_(p)
        self._weight_sum += w
        self.last_step = step

    def state_dict(self) -> tuple[StateDict, dict]:
        """Tensors and plain metadata, so a checkpoint can hold them without pickling."""
        meta = {"total_steps": self.total_steps, "a": self.a, "weight_sum": self._weight_sum,
                "last_step": self.last_step}
        return {name: acc.clone() for name, acc in self._acc.items()}, meta

    def load_state_dict(self, tensors: Mapping[str, Tensor], meta: dict) -> None:
        """Resume a run: the accumulators and the weight sum of the iterates seen so far."""
        if meta["total_steps"] != self.total_steps or meta["a"] != self.a:
            raise ValueError(f"BMA state is for T={meta['total_steps']}, a={meta['a']}; "
                             f"this run has T={self.total_steps}, a={self.a}")
        if set(tensors) != set(self._acc):
            raise ValueError(f"BMA state names differ: {sorted(set(tensors) ^ set(self._acc))[:5]}")
        with torch.no_grad():
            for name, acc in self._acc.items():
                acc.copy_(tensors[name].to(device=acc.device, dtype=acc.dtype))
        self._weight_sum = float(meta["weight_sum"])
        self.last_step = int(meta["last_step"])

    def average(self) -> StateDict:
        """Σ_k w_k θ_k / Σ_k w_k over the iterates seen so far, in the original dtypes."""
        out: StateDict = {}
        for name, acc in self._acc.items():
            if acc.is_floating_point():
                out[name] = (acc / self._weight_sum).to(self._dtypes[name])
            else:
                out[name] = acc.clone()
        return out
