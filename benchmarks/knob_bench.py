"""What the knob t costs a serving replica, in process (the engine code a model replica runs).

    .venv/bin/python benchmarks/knob_bench.py [--arch ViT-B-32] [--batch 16] [--repeats 20]

On a release whose image tower trained (`full`: θ and θ_ref differ in every tower weight), prints, in
one run and side by side:
  - the first request at a new t relative to a later one at the same t (the first pays one
    interpolation θ(t) = θ_ref + t·(θ − θ_ref); later ones none), and the interpolation alone in ms;
  - a batch mixing 4 values of t relative to a single-t batch of the same size (full mode runs the
    tower once per distinct t: the same rows in 4 smaller passes);
  - t = 0.5 relative to t = 1 on single-t batches (both from the cache).
Bounded by --repeats; nothing is served or leaves the process.
"""
from __future__ import annotations

import argparse
import statistics
import time

import numpy as np
import torch


def release(arch: str | None):
    """A full-mode release: the shipped base (or `arch` with random weights), its tower moved off θ_ref."""
    from po_cluster.config import ModelConfig
    from po_cluster.model.aligned import AlignedCLIP
    from po_cluster.model.loading import load_clip
    from po_cluster.serving.engine import ReleaseModel

    cfg = ModelConfig(image_tower="full") if arch is None else ModelConfig(name=arch, pretrained=None)
    model = AlignedCLIP(load_clip(cfg), "full").eval()
    with torch.no_grad():
        for p in model.trainable_image_parameters():
            p.add_(torch.randn_like(p) * 0.01)
        model.spectral.log_sigma.normal_(0, 0.3)
    return ReleaseModel("bench", model, {"prompt_template": "a photo of a {}.", "image_tower": "full"},
                        tower_cache_size=64)


def timed(fn, *args) -> float:
    start = time.perf_counter()
    fn(*args)
    return time.perf_counter() - start


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--arch", default=None, help="an open_clip architecture with random weights (e.g. ViT-B-32)")
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--repeats", type=int, default=20)
    p.add_argument("--threads", type=int, default=1)
    a = p.parse_args()
    torch.set_num_threads(a.threads)
    from po_cluster.data import world
    from po_cluster.serving.engine import Knob

    engine = release(a.arch)
    images = list(world.image_set("attacked", a.batch, seed=7).images)
    prompts = [[f"a photo of a {name}." for name in world.SHAPES]] * a.batch

    def batch(knobs: list[Knob]) -> None:
        engine.classify_many(images, prompts, knobs)

    batch([Knob(1.0)] * a.batch)  # warm-up: text cache, allocator
    first, later, interpolate, single, mixed, half = [], [], [], [], [], []
    for i in range(a.repeats):  # interleaved, so drifting load on the machine hits every kind alike
        new = [Knob(round(1.01 + i * 0.02, 2))] * a.batch  # a t no round used (0.01 apart at least)
        first.append(timed(batch, new))
        later.append(timed(batch, new))
        interpolate.append(timed(engine.model.tower_at, 3.0 + i))
        single.append(timed(batch, [Knob(1.0)] * a.batch))
        mixed.append(timed(batch, [Knob(x) for x in (1.0, 0.75, 0.5, 0.25)] * (a.batch // 4)))
        half.append(timed(batch, [Knob(0.75)] * a.batch))
    median = statistics.median
    params = sum(v.numel() for v in engine.model.reference.values())
    print(f"release: {a.arch or 'shipped po-tiny-rn'}, full image tower ({params:,} trained weights), "
          f"batch {a.batch}, {a.repeats} rounds, {a.threads} torch thread(s)")
    print(f"first request at a new t / later at that t: {median(first) / median(later):.2f}x  "
          f"({median(first) * 1000:.1f} vs {median(later) * 1000:.1f} ms)")
    print(f"one interpolation (a tower copy at θ(t)): {median(interpolate) * 1000:.2f} ms; "
          f"interpolations made: {engine.interpolations} for {a.repeats} new t (plus 0.75, 0.5, 0.25)")
    print(f"batch mixing 4 t / single-t batch of the same size: {median(mixed) / median(single):.2f}x")
    print(f"t = 0.75 / t = 1 (single-t batches, cached): {median(half) / median(single):.2f}x")
    assert np.isfinite(median(first))


if __name__ == "__main__":
    main()
