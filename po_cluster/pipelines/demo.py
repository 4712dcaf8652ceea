"""The end of the demo: serve a release locally and ask it about one attacked image, beside the
answer of the shipped base model that the release was trained away from."""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

SHAPE, WORD = "square", "circle"  # the image asked about: a square with the word "circle" on it


@dataclass(frozen=True)
class DemoAnswers:
    release_id: str
    url: str  # where it was served (stopped again by now)
    store: str
    shape: str  # what the image shows
    word: str  # what is written on it
    base: tuple[tuple[str, float], ...]  # the shipped base model's top classes, in process
    t0: dict  # the release's /v1/classify answer with the spectral layer off
    t1: dict  # and on


def attacked_image() -> np.ndarray:
    from po_cluster.data import world

    return world.render(world.SHAPES.index(SHAPE), world.SHAPES.index(WORD), np.random.default_rng(7))


def base_scores(image: np.ndarray, top: int = 3) -> tuple[tuple[str, float], ...]:
    """The shipped base model's top classes for one image: the attack it falls for."""
    import torch

    from po_cluster.config import ModelConfig
    from po_cluster.data import world
    from po_cluster.evaluate.metrics import embed_images, embed_prompts
    from po_cluster.model.aligned import AlignedCLIP
    from po_cluster.model.loading import load_clip

    base = AlignedCLIP(load_clip(ModelConfig()), "frozen")
    probs = base.logprobs(embed_images(base, image[None]), embed_prompts(base, world.prompts()), 0.0)[0].exp()
    best = torch.argsort(probs, descending=True)[:top]
    return tuple((world.SHAPES[i], float(probs[i])) for i in best.tolist())


def ask_release(store: str, release_id: str) -> DemoAnswers:
    """Serve the release on 127.0.0.1, ask it about the attacked image at t = 0 and t = 1, stop serving."""
    from po_cluster.data import world
    from po_cluster.serving.local import serve_and_ask

    image = attacked_image()
    answers = serve_and_ask(store, release_id, image, list(world.SHAPES))
    return DemoAnswers(release_id, answers["url"], store, SHAPE, WORD, base_scores(image),
                       answers["t0"], answers["t1"])
