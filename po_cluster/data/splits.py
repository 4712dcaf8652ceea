"""Train / val / test splits of a preference dataset, made by source image.

A sweep trains on `train`, its trials report (and Tune, ASHA and the soups choose)
on `val`, and a release is scored on `test`, which nothing trained or chose on.
Every attacked copy of one source image, and its clean copy, lie in the same split:
an attacked copy of a test image seen in training would leak the test set.

The typographic builder assigns splits (stratified by class, from its seed) and
writes them into every record. Records written by hand may name their own
`split`; those that do not get one from a hash of their `source` (or, without
one, their image path as written in the file), so a hand-written file always
splits the same way on every machine.
"""
from __future__ import annotations

import hashlib
from collections.abc import Sequence
from typing import Literal

import numpy as np

Split = Literal["train", "val", "test"]
SPLITS: tuple[Split, ...] = ("train", "val", "test")
DEFAULT_FRACTIONS = (0.8, 0.1, 0.1)


def check_fractions(fractions: Sequence[float]) -> tuple[float, float, float]:
    """(train, val, test), each in [0, 1], train > 0, summing to 1; ValueError naming what is wrong."""
    if len(fractions) != 3:
        raise ValueError(f"needs three fractions (train, val, test), got {len(fractions)}")
    train, val, test = (float(f) for f in fractions)
    if min(train, val, test) < 0 or train <= 0:
        raise ValueError(f"fractions {tuple(fractions)}: train must be > 0 and val, test ≥ 0")
    if abs(train + val + test - 1.0) > 1e-6:
        raise ValueError(f"fractions {tuple(fractions)} sum to {train + val + test:g}, not 1")
    return train, val, test


def _class_counts(n: int, fractions: tuple[float, float, float]) -> tuple[int, int]:
    """(val, test) image counts for a class of n images: at least one each when the fraction is
    non-zero and the class has enough images to keep one for training."""
    _, f_val, f_test = fractions
    n_val = max(int(round(n * f_val)), 1 if f_val > 0 and n >= 3 else 0)
    n_test = max(int(round(n * f_test)), 1 if f_test > 0 and n >= 3 else 0)
    while n_val + n_test >= n and (n_val or n_test):  # keep at least one training image
        if n_val >= n_test:
            n_val -= 1
        else:
            n_test -= 1
    return n_val, n_test


def assign_splits(labels: Sequence[str], fractions: Sequence[float] = DEFAULT_FRACTIONS,
                  seed: int = 0) -> list[Split]:
    """The split of each source image (given by its class label), stratified by class so every class
    is in every split it can be: a pure function of the labels' order, the fractions and the seed."""
    checked = check_fractions(fractions)
    out: list[Split] = ["train"] * len(labels)
    for number, label in enumerate(sorted(set(labels))):
        rows = np.array([i for i, other in enumerate(labels) if other == label])
        rows = rows[np.random.default_rng([seed, 0x5EED, number]).permutation(len(rows))]
        n_val, n_test = _class_counts(len(rows), checked)
        for i in rows[:n_val]:
            out[int(i)] = "val"
        for i in rows[n_val:n_val + n_test]:
            out[int(i)] = "test"
    return out


def hashed_split(key: str, fractions: Sequence[float] = DEFAULT_FRACTIONS) -> Split:
    """The split of a record that names none, from a hash of its source key: the same on every
    machine and in every run, whatever the file's order."""
    train, val, _ = check_fractions(fractions)
    point = int.from_bytes(hashlib.sha256(key.encode()).digest()[:8], "big") / 2 ** 64
    return "train" if point < train else "val" if point < train + val else "test"
