"""Model soups: checkpoints of different trials averaged weight by weight.

Valid because every trial of a sweep starts from the same weights, so their
fine-tuned weights lie in one basin (Wortsman et al. 2022).

Low-rank adapters are averaged as what they add to the weights: the mean of the
members' B_i·A_i (the mean of B times the mean of A is not that), truncated back
to the adapters' rank by SVD. The soup then has the trials' shape, so it is
scored, served and stored like one of them; what the truncation drops is in the
score the greedy soup sees, so the soup chosen is the one that is served. A
one-member soup is the trial, bit for bit.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping

import torch
from torch import Tensor

__all__ = ["greedy_soup", "uniform_soup"]

StateDict = dict[str, Tensor]


def _check_compatible(
    reference: Mapping[str, Tensor], other: Mapping[str, Tensor], index: int
) -> None:
    # Averaging is only meaningful between checkpoints of the same architecture;
    # name the first offending key so a mixed-up sweep is easy to diagnose.
    for key in reference:
        if key not in other:
            raise ValueError(f"state dict {index} lacks key {key!r}")
        if reference[key].shape != other[key].shape:
            raise ValueError(
                f"key {key!r}: shape {tuple(reference[key].shape)} in state dict 0 "
                f"vs {tuple(other[key].shape)} in state dict {index}"
            )
    for key in other:
        if key not in reference:
            raise ValueError(f"state dict {index} has extra key {key!r}")


def uniform_soup(state_dicts: list[StateDict]) -> StateDict:
    """Element-wise mean of checkpoints that share keys and shapes."""
    if not state_dicts:
        raise ValueError("uniform_soup needs at least one state dict")
    first = state_dicts[0]
    for i, sd in enumerate(state_dicts[1:], start=1):
        _check_compatible(first, sd, i)
    soup: StateDict = {}
    with torch.no_grad():
        for key, t in first.items():
            if not t.is_floating_point():
                soup[key] = t.detach().clone()  # counters: averaging has no meaning
                continue
            # Sum in float32 so fp16/bf16 checkpoints do not lose precision.
            total = torch.zeros_like(t, dtype=torch.float32)
            for sd in state_dicts:
                total += sd[key].detach().to(device=t.device, dtype=torch.float32)
            soup[key] = (total / len(state_dicts)).to(t.dtype)
    if len(state_dicts) > 1:
        for prefix in _adapter_prefixes(first):
            soup[prefix + "lora_A"], soup[prefix + "lora_B"] = _adapter_mean(state_dicts, prefix)
    return soup


def _adapter_prefixes(state: Mapping[str, Tensor]) -> list[str]:
    return [key.removesuffix("lora_A") for key in state
            if key.endswith("lora_A") and key.removesuffix("lora_A") + "lora_B" in state]


def _adapter_mean(state_dicts: list[StateDict], prefix: str) -> tuple[Tensor, Tensor]:
    """(A, B) of rank r whose product is the best rank-r approximation of the mean of B_i·A_i.
    A is [r, in, ...] (a Linear's or a conv kernel's), B is [out, r, ...]."""
    a0, b0 = state_dicts[0][prefix + "lora_A"], state_dicts[0][prefix + "lora_B"]
    rank = a0.shape[0]
    delta = sum((sd[prefix + "lora_B"].double().reshape(b0.shape[0], rank) @
                 sd[prefix + "lora_A"].double().reshape(rank, -1)) for sd in state_dicts) / len(state_dicts)
    u, sigma, vh = torch.linalg.svd(delta, full_matrices=False)
    root = sigma[:rank].sqrt()  # split evenly, so neither factor carries the whole scale
    b = (u[:, :rank] * root).reshape(b0.shape).to(b0.dtype)
    a = (root[:, None] * vh[:rank]).reshape(a0.shape).to(a0.dtype)
    return a, b


def greedy_soup(
    candidates: list[tuple[str, StateDict]], score: Callable[[StateDict], float]
) -> tuple[StateDict, list[str]]:
    """Greedy soup (Wortsman et al. 2022): candidates sorted best first.

    Keep an ingredient only if the uniform soup with it scores at least as well
    as the soup without it, so the held-out score never drops.
    """
    if not candidates:
        raise ValueError("greedy_soup needs at least one candidate")
    first_name, first_sd = candidates[0]
    accepted_names = [first_name]
    accepted = [first_sd]
    soup = uniform_soup(accepted)
    best = score(soup)
    for name, sd in candidates[1:]:
        trial = uniform_soup(accepted + [sd])
        trial_score = score(trial)
        if trial_score >= best:
            accepted.append(sd)
            accepted_names.append(name)
            soup, best = trial, trial_score
    return soup, accepted_names
