"""Model soups: checkpoints of different trials averaged weight by weight.

Valid because every trial of a sweep starts from the same weights, so their
fine-tuned weights lie in one basin (Wortsman et al. 2022).
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
    return soup


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
