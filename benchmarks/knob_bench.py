"""What the knob t costs a serving replica, in process (the engine code a model replica runs).

    .venv/bin/python benchmarks/knob_bench.py [--arch ViT-B-32] [--batch 16] [--repeats 20]

On a release whose image tower trained, in each mode (`full`: θ and θ_ref differ in every tower
weight; `lora`: adapters on the default targets with B ≠ 0), prints, in one run and side by side:
  - the first request at a new t relative to a later one at the same t (the first pays one
    interpolation θ(t) = θ_ref + t·(θ − θ_ref); later ones none), and the interpolation alone in ms;
  - a batch mixing 4 values of t relative to a single-t batch of the same size (full mode runs the
    tower once per distinct t: the same rows in 4 smaller passes; lora runs one pass, each row
    scaled by its own t; target <= 1.15x);
  - t = 0.5 relative to t = 1 on single-t batches (both from the cache).
Bounded by --repeats; nothing is served or leaves the process.
"""
from __future__ import annotations

import argparse
import statistics
import time

import numpy as np
import torch


def release(arch: str | None, mode: str):
    """A trained-looking release: the shipped base (or `arch` with random weights) with its tower moved
    off θ_ref (full) or adapters with B ≠ 0 (lora)."""
    from po_cluster.config import LoraConfig, LoraTowerConfig, ModelConfig
    from po_cluster.model.aligned import AlignedCLIP
    from po_cluster.model.loading import load_clip
    from po_cluster.model.release import ReleaseModel

    tower = LoraTowerConfig(lora=LoraConfig()) if mode == "lora" else "full"
    cfg = ModelConfig() if arch is None else ModelConfig(name=arch, pretrained=None)
    model = AlignedCLIP(load_clip(cfg), tower).eval()
    with torch.no_grad():
        for p in model.trainable_image_parameters():
            p.add_(torch.randn_like(p) * 0.01)
        model.spectral.log_sigma.normal_(0, 0.3)
    return ReleaseModel("bench", model, {"prompt_template": "a photo of a {}."}, tower_cache_size=64)


def timed(fn, *args) -> float:
    start = time.perf_counter()
    fn(*args)
    return time.perf_counter() - start


def measure(engine, images: list, prompts: list, repeats: int) -> dict[str, list[float]]:
    from po_cluster.model.release import Knob

    n = len(images)

    def batch(knobs: list) -> None:
        engine.classify_many(images, prompts, knobs)

    batch([Knob(1.0)] * n)  # warm-up: text cache, allocator
    times: dict[str, list[float]] = {k: [] for k in ("first", "later", "single", "mixed", "other")}
    for i in range(repeats):  # interleaved, so drifting load on the machine hits every kind alike
        new = [Knob(round(1.01 + i * 0.02, 2))] * n  # a t no round used (0.01 apart at least)
        times["first"].append(timed(batch, new))
        times["later"].append(timed(batch, new))
        times["single"].append(timed(batch, [Knob(1.0)] * n))
        times["mixed"].append(timed(batch, [Knob(x) for x in (1.0, 0.75, 0.5, 0.25)] * (n // 4)))
        times["other"].append(timed(batch, [Knob(0.75)] * n))
    return times


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--arch", default=None, help="an open_clip architecture with random weights (e.g. ViT-B-32)")
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--repeats", type=int, default=20)
    p.add_argument("--threads", type=int, default=1)
    a = p.parse_args()
    torch.set_num_threads(a.threads)
    from po_cluster.data import world

    images = list(world.image_set("attacked", a.batch, seed=7).images)
    prompts = [[f"a photo of a {name}." for name in world.SHAPES]] * a.batch
    median = statistics.median
    print(f"{a.arch or 'shipped po-tiny-rn'}, batch {a.batch}, {a.repeats} rounds, {a.threads} torch thread(s)")
    for mode in ("full", "lora"):
        engine = release(a.arch, mode)
        times = {k: median(v) for k, v in measure(engine, images, prompts, a.repeats).items()}
        trained = sum(p.numel() for p in engine.model.parameters() if p.requires_grad)
        copy_ms = median(timed(engine.model.tower_at, 3.0 + i) for i in range(5)) * 1000
        print(f"[{mode}] {trained:,} trained weights; interpolations made: {engine.interpolations}")
        print(f"[{mode}] first request at a new t / later at that t: {times['first'] / times['later']:.2f}x "
              f"({times['first'] * 1000:.1f} vs {times['later'] * 1000:.1f} ms; one tower at θ(t): {copy_ms:.2f} ms)")
        print(f"[{mode}] batch mixing 4 t / single-t batch of the same size: {times['mixed'] / times['single']:.2f}x")
        print(f"[{mode}] t = 0.75 / t = 1 (single-t batches): {times['other'] / times['single']:.2f}x")
        assert np.isfinite(times["first"])


if __name__ == "__main__":
    main()
