"""The spectral layer W = V diag(σ) Vᵀ of docs/design.md, "The spectral layer and t".

V is orthogonal by construction (the matrix exponential of a skew-symmetric
matrix), σ = exp(ρ) > 0. Both start at the identity, so an untrained layer is
exactly W = I. The knob t raises σ to σ^t (the image tower's own path is in aligned.py);
single σ_i may be overridden.
"""
from __future__ import annotations

import torch
from torch import nn


class SpectralLayer(nn.Module):
    def __init__(self, dim: int) -> None:
        super().__init__()
        self.dim = dim
        # Only the strict upper triangle is used; A - Aᵀ is then skew-symmetric.
        self.skew = nn.Parameter(torch.zeros(dim, dim))
        self.log_sigma = nn.Parameter(torch.zeros(dim))

    def basis(self) -> torch.Tensor:
        upper = torch.triu(self.skew, diagonal=1)
        return torch.linalg.matrix_exp(upper - upper.T)

    def sigma(self, t: float = 1.0, overrides: dict[int, float] | None = None) -> torch.Tensor:
        """σ_i(t) = σ_i^t, then any per-index overrides (values of σ, not of ρ)."""
        sigma = torch.exp(t * self.log_sigma)
        if overrides:
            sigma = sigma.clone()
            for index, value in overrides.items():
                if not 0 <= index < self.dim:
                    raise IndexError(f"σ override index {index} out of range 0..{self.dim - 1}")
                if not value > 0:
                    raise ValueError(f"σ override for index {index} must be > 0, got {value}")
                sigma[index] = value
        return sigma

    def matrix(self, t: float = 1.0, overrides: dict[int, float] | None = None) -> torch.Tensor:
        v = self.basis()
        return (v * self.sigma(t, overrides)) @ v.T

    def forward(self, z: torch.Tensor, t: float = 1.0, overrides: dict[int, float] | None = None) -> torch.Tensor:
        if t == 0 and not overrides:
            return z  # exactly the starting model, not just up to rounding in V Vᵀ
        v = self.basis()
        return ((z @ v) * self.sigma(t, overrides)) @ v.T
