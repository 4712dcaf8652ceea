"""One release loaded at t, without Ray: batched towers, projections by knob (serving, the embed job,
the benchmarks).

A batch holds rows from many requests. The text tower never trains, so every
text goes through it together. The image tower is served at θ(t) (docs/design.md,
"The knob t"): with LoRA adapters, every row in one pass, each scaled by its own
t; when it trained otherwise, rows are grouped by t rounded to 0.01, each group
runs through the tower with that t's weights, kept in a small LRU (one
interpolation per new t, none after); when it did not, all rows go together. The
projection W(t) then runs once per distinct (t, σ overrides) in the batch.
The serving replicas, the embed job's actors and the benchmarks' in-process baselines all
call this same code.
"""
from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from po_cluster.model.aligned import AlignedCLIP, candidate_logprobs

Overrides = tuple[tuple[int, float], ...]


@dataclass(frozen=True)
class Knob:
    """t and the σ overrides of one request; hashable, so equal knobs share one projection."""

    t: float = 1.0
    overrides: Overrides = ()

    def as_dict(self) -> dict[int, float] | None:
        return dict(self.overrides) or None


ClassifyItem = tuple[np.ndarray, list[str], Knob]  # image, prompts, knob of one classify request
Scores = tuple[list[float], list[float]]  # logits, probabilities over the prompts
EmbedRequest = tuple[list[np.ndarray], list[str], Knob]  # images, texts, knob of one embeddings request
EmbedResult = tuple[list[np.ndarray], list[np.ndarray], int]  # image rows, text rows, token count


def tower_t(t: float, trained: bool) -> float:
    """The t the image tower runs at: t to 0.01 when it trained (0 and 1 stay exact), else 1 (no path)."""
    return round(float(t), 2) if trained else 1.0


class ReleaseModel:
    """A release loaded for serving: the AlignedCLIP, its description, a bounded cache of g(y), one of W(t),
    and one of the image tower's θ(t).

    A served release never changes, so V = exp(A − Aᵀ) is computed once at load, W(t) once per
    distinct knob and θ(t) once per distinct rounded t (LRUs): after its first request, a t costs
    no more than t = 1.
    """

    def __init__(self, release_id: str, model: AlignedCLIP, description: dict, text_cache_size: int = 4096,
                 max_forward: int = 64, projection_cache_size: int = 64, tower_cache_size: int = 4) -> None:
        self.release_id, self.model, self.description = release_id, model.eval(), description
        self.dim = model.spectral.dim
        self.device = next(model.parameters()).device
        self.prompt_template = str(description.get("prompt_template") or "{}")
        self.max_forward = max_forward  # images (or texts) per tower pass: bounds a pass's memory
        self._texts: OrderedDict[str, tuple[torch.Tensor, int]] = OrderedDict()
        self._cache_size = text_cache_size
        with torch.no_grad():
            self._basis = model.spectral.basis()
        self._projections: OrderedDict[Knob, torch.Tensor] = OrderedDict()
        self._projection_cache_size = projection_cache_size
        # Each entry is a copy of the trained tower weights: bounded by memory, not by request count.
        self._towers: OrderedDict[float, torch.nn.Module] = OrderedDict()
        self._tower_cache_size = tower_cache_size
        self.interpolations = 0  # θ(t) computed so far (the benchmark and tests read it)

    @classmethod
    def load(cls, release_id: str, folder: Path, text_cache_size: int = 4096, device: str = "cpu",
             max_forward: int = 64, verify: bool = True, tower_cache_size: int = 4) -> ReleaseModel:
        """verify=False for a folder pull_release has just returned (and verified)."""
        from po_cluster.model.checkpoint import load_checkpoint

        model, description = load_checkpoint(folder, device, verify)
        return cls(release_id, model, description, text_cache_size, max_forward,
                   tower_cache_size=tower_cache_size)

    @torch.no_grad()
    def image_features(self, images: list[np.ndarray], ts: list[float] | None = None) -> torch.Tensor:
        """f_t(x) [N, d] for uint8 [H, W, 3] images of any sizes, row i at ts[i] (default 1)."""
        by_shape: dict[tuple[int, ...], list[int]] = {}
        for i, image in enumerate(images):
            by_shape.setdefault(image.shape, []).append(i)
        pixels = torch.empty((len(images), 3, self.model.image_size, self.model.image_size))
        for rows in by_shape.values():  # resizing works on equal shapes: one call per shape
            pixels[rows] = self.model.pixels(np.stack([images[i] for i in rows]))
        return self.pixel_features(pixels.to(self.device), ts)

    @torch.no_grad()
    def pixel_features(self, pixels: torch.Tensor, ts: list[float] | None = None) -> torch.Tensor:
        """f_t(x) [N, d] from model input [N, 3, S, S]: one tower pass per distinct tower t, in chunks
        of max_forward rows."""
        if self.model.adapter_scale is not None:  # LoRA: each row's own t, all rows in one pass
            row_t = torch.tensor(ts if ts is not None else [1.0] * len(pixels), dtype=torch.float32,
                                 device=self.device)
            return torch.cat([self.model.encode_image(pixels[start:start + self.max_forward],
                                                      row_t[start:start + self.max_forward])
                              for start in range(0, len(pixels), self.max_forward)])
        trained = bool(self.model.reference)
        keys = [tower_t(t, trained) for t in ts] if ts is not None else [1.0] * len(pixels)
        groups: dict[float, list[int]] = {}
        for i, key in enumerate(keys):
            groups.setdefault(key, []).append(i)
        out = torch.empty((len(pixels), self.dim), device=self.device)
        for key, rows in groups.items():
            tower, part = self.tower(key), pixels[rows]
            out[rows] = torch.cat([self.model.encode_image(part[start:start + self.max_forward], key, tower)
                                   for start in range(0, len(rows), self.max_forward)])
        return out

    @torch.no_grad()
    def tower(self, t: float) -> torch.nn.Module:
        """The image tower at θ(t) (LRU of copies); at t = 1, or when it did not train, the tower itself."""
        if t == 1.0 or not self.model.reference:
            return self.model.tower_at(1.0)
        tower = self._towers.get(t)
        if tower is None:
            tower = self._towers[t] = self.model.tower_at(t)
            self.interpolations += 1
            while len(self._towers) > self._tower_cache_size:
                self._towers.popitem(last=False)
        self._towers.move_to_end(t)
        return tower

    @torch.no_grad()
    def text_features(self, texts: list[str]) -> tuple[torch.Tensor, list[int]]:
        """g(y) [N, d] and the token count of each text; texts seen before come from the cache."""
        missing = list(dict.fromkeys(t for t in texts if t not in self._texts))
        for start in range(0, len(missing), self.max_forward):
            part = missing[start:start + self.max_forward]
            tokens = self.model.tokens(part).to(self.device)
            features = self.model.encode_text(tokens)
            counts = (tokens != 0).sum(dim=1).tolist()  # open_clip pads with 0
            for text, feature, count in zip(part, features, counts, strict=True):
                self._texts[text] = (feature, int(count))
        found = [self._texts[t] for t in texts]
        for text in texts:
            self._texts.move_to_end(text)
        while len(self._texts) > self._cache_size:
            self._texts.popitem(last=False)
        return torch.stack([f for f, _ in found]), [c for _, c in found]

    @torch.no_grad()
    def project(self, features: torch.Tensor, knobs: list[Knob]) -> torch.Tensor:
        """Row i projected with knobs[i]: W(t)·z re-normalised, one projection per distinct knob."""
        out = torch.empty_like(features)
        groups: dict[Knob, list[int]] = {}
        for i, knob in enumerate(knobs):
            groups.setdefault(knob, []).append(i)
        for knob, rows in groups.items():
            w = self.projection(knob)
            out[rows] = F.normalize(features[rows] if w is None else features[rows] @ w, dim=-1)
        return out.cpu()

    @torch.no_grad()
    def projection(self, knob: Knob) -> torch.Tensor | None:
        """W(t) with the knob's σ overrides (symmetric, so z·W = W·z); None at t = 0 without overrides,
        where the layer is bypassed exactly as AlignedCLIP does."""
        if knob.t == 0 and not knob.overrides:
            return None
        w = self._projections.get(knob)
        if w is None:
            sigma = self.model.spectral.sigma(knob.t, knob.as_dict())  # checks the override indices
            w = (self._basis * sigma) @ self._basis.T
            self._projections[knob] = w
            while len(self._projections) > self._projection_cache_size:
                self._projections.popitem(last=False)
        self._projections.move_to_end(knob)
        return w

    @torch.no_grad()
    def classify_many(self, images: list[np.ndarray], prompts: list[list[str]],
                      knobs: list[Knob]) -> list[Scores]:
        """(logits, probabilities) per request of a batch: one tower pass for all images, one for all
        uncached prompts, one projection per distinct knob on each side."""
        image_rows = self.project(self.image_features(images, [knob.t for knob in knobs]), knobs)
        flat = [text for group in prompts for text in group]
        text_features, _ = self.text_features(flat)
        text_knobs = [knob for group, knob in zip(prompts, knobs, strict=True) for _ in group]
        text_rows = self.project(text_features, text_knobs)
        out, start = [], 0
        for image_row, group in zip(image_rows, prompts, strict=True):
            logits, probabilities = self.scores(image_row, text_rows[start:start + len(group)])
            out.append((logits.tolist(), probabilities.tolist()))
            start += len(group)
        return out

    @torch.no_grad()
    def embed_many(self, requests: list[EmbedRequest]) -> list[EmbedResult]:
        """(image rows, text rows, token count) per embeddings request of a batch: the images of all
        requests through the image tower together, the texts through the text tower together."""
        images = [image for request_images, _, _ in requests for image in request_images]
        image_knobs = [knob for request_images, _, knob in requests for _ in request_images]
        texts = [text for _, request_texts, _ in requests for text in request_texts]
        text_knobs = [knob for _, request_texts, knob in requests for _ in request_texts]
        empty = np.zeros((0, 0), dtype=np.float32)  # sliced to [] for a request with no images (or texts)
        image_rows = self.project(self.image_features(images, [knob.t for knob in image_knobs]),
                                  image_knobs).numpy() if images else empty
        text_rows, counts = empty, list[int]()
        if texts:
            features, counts = self.text_features(texts)
            text_rows = self.project(features, text_knobs).numpy()
        out, image_start, text_start = [], 0, 0
        for request_images, request_texts, _ in requests:
            n, m = len(request_images), len(request_texts)
            out.append((list(image_rows[image_start:image_start + n]),
                        list(text_rows[text_start:text_start + m]),
                        int(sum(counts[text_start:text_start + m]))))
            image_start, text_start = image_start + n, text_start + m
        return out

    @torch.no_grad()
    def scores(self, image: torch.Tensor, prompts: torch.Tensor) -> tuple[np.ndarray, np.ndarray]:
        """(logits, probabilities) over the candidates, from projected f(x) [d] and g(y) [L, d]."""
        logits = self.model.logit_scale * prompts @ image
        probabilities = candidate_logprobs(image[None], prompts, self.model.logit_scale)[0].exp()
        return logits.numpy().astype(np.float64), probabilities.numpy().astype(np.float64)
