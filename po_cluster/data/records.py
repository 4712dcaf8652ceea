"""Typed record sets that flow from the data builders into training and evaluation.

Images are kept as uint8 HxWx3 arrays (what a decoder gives); conversion to
model input happens in one place (`po_cluster.model.loading.to_model_input`).
Labels are indices into the task's class names, so every set carries them.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

NO_WORD = -1  # `written` value for an image with no word on it


def _check_rows(name: str, images: np.ndarray, *columns: np.ndarray) -> None:
    if images.ndim != 4 or images.shape[-1] != 3 or images.dtype != np.uint8:
        raise ValueError(f"{name}: images must be uint8 [N, H, W, 3], got {images.dtype} {images.shape}")
    for column in columns:
        if len(column) != len(images):
            raise ValueError(f"{name}: {len(images)} images but a column of {len(column)} rows")


@dataclass(frozen=True)
class ImageSet:
    """Labelled images, optionally with the class index of a word written on them."""

    images: np.ndarray
    labels: np.ndarray
    written: np.ndarray
    classnames: tuple[str, ...]

    def __post_init__(self) -> None:
        _check_rows("ImageSet", self.images, self.labels, self.written)

    def __len__(self) -> int:
        return len(self.images)


@dataclass(frozen=True)
class PreferenceSet:
    """(x, y_w, y_l) records: chosen is the true class, rejected the written one."""

    images: np.ndarray
    chosen: np.ndarray
    rejected: np.ndarray
    classnames: tuple[str, ...]

    def __post_init__(self) -> None:
        _check_rows("PreferenceSet", self.images, self.chosen, self.rejected)
        if np.any(self.chosen == self.rejected):
            raise ValueError("PreferenceSet: a record has chosen == rejected")

    def __len__(self) -> int:
        return len(self.images)


@dataclass(frozen=True)
class UnpairedSet:
    """KTO's unpaired records (x, y, desirable)."""

    images: np.ndarray
    labels: np.ndarray
    desirable: np.ndarray
    classnames: tuple[str, ...]

    def __post_init__(self) -> None:
        _check_rows("UnpairedSet", self.images, self.labels, self.desirable)

    def __len__(self) -> int:
        return len(self.images)
