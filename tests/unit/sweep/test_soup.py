"""Uniform and greedy soups checked against hand-computed numbers."""

from __future__ import annotations

import pytest
import torch

from po_cluster.sweep.soup import greedy_soup, uniform_soup


def test_uniform_soup_is_the_mean() -> None:
    a = {"w": torch.tensor([1.0, 2.0]), "n": torch.tensor(7)}
    b = {"w": torch.tensor([3.0, 4.0]), "n": torch.tensor(7)}
    c = {"w": torch.tensor([5.0, 9.0]), "n": torch.tensor(7)}
    soup = uniform_soup([a, b, c])
    # [(1 + 3 + 5)/3, (2 + 4 + 9)/3] = [3, 5]
    assert torch.allclose(soup["w"], torch.tensor([3.0, 5.0]))
    assert soup["n"].item() == 7


def test_uniform_soup_errors() -> None:
    with pytest.raises(ValueError):
        uniform_soup([])
    a = {"x": torch.zeros(2), "proj": torch.zeros(4, 3)}
    b = {"x": torch.zeros(2), "proj": torch.zeros(3, 4)}
    with pytest.raises(ValueError, match=r"'proj'.*\(4, 3\).*\(3, 4\)"):
        uniform_soup([a, b])
    with pytest.raises(ValueError, match="'proj'"):
        uniform_soup([a, {"x": torch.zeros(2)}])
    with pytest.raises(ValueError, match="'extra'"):
        uniform_soup([a, {**a, "extra": torch.zeros(1)}])


def test_greedy_soup_accepts_and_rejects_by_hand() -> None:
    def sd(v: float) -> dict[str, torch.Tensor]:
        return {"w": torch.tensor([v])}

    def score(s: dict[str, torch.Tensor]) -> float:
        return -abs(s["w"].item() - 2.0)  # best when the soup's weight is 2

    candidates = [("A", sd(1.0)), ("B", sd(3.0)), ("C", sd(10.0)), ("D", sd(2.0))]
    # A alone: w = 1 → score −1
    # + B: (1 + 3)/2 = 2 → score 0 ≥ −1, accept
    # + C: (1 + 3 + 10)/3 = 14/3 → score −8/3 < 0, reject
    # + D: (1 + 3 + 2)/3 = 2 → score 0 ≥ 0, accept (ties keep the ingredient)
    soup, names = greedy_soup(candidates, score)
    assert names == ["A", "B", "D"]
    assert soup["w"].item() == pytest.approx(2.0)


def test_greedy_soup_keeps_first_when_nothing_helps() -> None:
    soup, names = greedy_soup(
        [("best", {"w": torch.tensor([2.0])}), ("bad", {"w": torch.tensor([8.0])})],
        lambda s: -abs(s["w"].item() - 2.0),
    )
    assert names == ["best"] and soup["w"].item() == 2.0
    with pytest.raises(ValueError):
        greedy_soup([], lambda s: 0.0)
