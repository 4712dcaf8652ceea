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
    # The set's own prompt template, when its classes are not the task's (the world's attribute sets);
    # None: the template of the task it is evaluated with.
    template: str | None = None
    # Each image's word-free twin (the same scene before its word was written), where the source can
    # render it (the world's training sets); None elsewhere.
    twins: np.ndarray | None = None
    # A zero-shot benchmark's prompt templates ("{c}" for the class name): each class is the average of
    # its prompts, as clip_benchmark scores it; empty: one prompt per class.
    templates: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        _check_rows("ImageSet", self.images, self.labels, self.written)
        _check_twins("ImageSet", self.images, self.twins)

    def __len__(self) -> int:
        return len(self.images)

    def take(self, rows: np.ndarray) -> ImageSet:
        return ImageSet(self.images[rows], self.labels[rows], self.written[rows], self.classnames, self.template,
                        None if self.twins is None else self.twins[rows], self.templates)


def _check_twins(name: str, images: np.ndarray, twins: np.ndarray | None) -> None:
    if twins is not None and (twins.shape != images.shape or twins.dtype != images.dtype):
        raise ValueError(f"{name}: twins must be like the images ({images.dtype} {images.shape}), got "
                         f"{twins.dtype} {twins.shape}")


def subset_sets(sets: dict[str, ImageSet], n: int, seed: int) -> dict[str, ImageSet]:
    """At most `n` images of each set, a seeded subset kept in the sets' order (so a validation set
    drawn from a large split costs what n_val says, and the same images at every report)."""
    rng = np.random.default_rng(seed)
    return {name: s if len(s) <= n else s.take(np.sort(rng.choice(len(s), n, replace=False)))
            for name, s in sets.items()}


@dataclass(frozen=True)
class PreferenceSet:
    """(x, y_w, y_l) records: chosen is the true class, rejected the written one."""

    images: np.ndarray
    chosen: np.ndarray
    rejected: np.ndarray
    classnames: tuple[str, ...]
    twins: np.ndarray | None = None  # as ImageSet.twins

    def __post_init__(self) -> None:
        _check_rows("PreferenceSet", self.images, self.chosen, self.rejected)
        _check_twins("PreferenceSet", self.images, self.twins)
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
