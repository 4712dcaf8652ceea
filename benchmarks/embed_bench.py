"""Batch-embedding benchmark: the Ray Data job (po_cluster/embed.py) against a plain in-process loop.

    .venv/bin/python benchmarks/embed_bench.py [--images 6000] [--batch-size 64] [--num-cpus 2]
                                               [--architecture ViT-B-32] [--image-size 64]

Both read the same PNG files, decode them with the same rules, and run the same
release (the shipped base model, or an open_clip architecture with random
weights: no download) with the same batch size. The loop is one process that
uses every core torch wants; the job runs on a local Ray with --num-cpus CPUs
(decoding tasks + one model actor). The job's time is end to end: the driver's
release check, listing, worker and actor start-up (imports, model load) and
writing the shard files included. The loop runs before and after the job (the
mean is the reference: a shared machine's load drifts). Prints the rates and
their ratio (target ≥ 0.7).
"""
from __future__ import annotations

import argparse
import logging
import tempfile
import time
from pathlib import Path

import numpy as np


def write_images(folder: Path, n: int, size: int) -> list[Path]:
    """n typo-shapes images as PNG files (rendered in chunks: rendering is not what we measure)."""
    from PIL import Image

    from po_cluster.data import world

    rng = np.random.default_rng(0)
    paths = []
    for i in range(n):
        image = world.render(int(rng.integers(len(world.SHAPES))), None, rng, size=size)
        path = folder / f"{i // 1000:03d}" / f"img-{i:06d}.png"
        path.parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(image).save(path)
        paths.append(path)
    return sorted(paths)


def in_process_loop(paths: list[Path], folder: Path, t: float, batch_size: int) -> float:
    """images/s of read → decode (the job's rules) → model input → f(x) → W(t), one batch at a time."""
    import torch

    from po_cluster.embed import DecodeLimits, decode_file
    from po_cluster.serving.engine import Knob, ReleaseModel

    release = ReleaseModel.load("bench", folder)
    limits, knob = DecodeLimits().serving(), Knob(t)
    start = time.perf_counter()
    with torch.no_grad():
        for begin in range(0, len(paths), batch_size):
            images = [decode_file(p.read_bytes(), limits) for p in paths[begin:begin + batch_size]]
            release.project(release.image_features(images), [knob] * len(images)).numpy()  # the engine's path
    return len(paths) / (time.perf_counter() - start)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--images", type=int, default=6000)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--shard-size", type=int, default=500)
    parser.add_argument("--num-cpus", type=int, default=2)
    parser.add_argument("--architecture", default=None, help="open_clip name with random weights (default: shipped)")
    parser.add_argument("--image-size", type=int, default=64, help="side of the generated images")
    args = parser.parse_args()
    logging.getLogger().setLevel(logging.ERROR)

    import ray

    from po_cluster.embed import EmbedConfig, run_embed
    from po_cluster.serving.demo import publish_example_release
    from po_cluster.storage import open_store

    with tempfile.TemporaryDirectory(prefix="embed-bench-") as tmp:
        root = Path(tmp)
        paths = write_images(root / "images", args.images, args.image_size)
        store = str(root / "store")
        publish_example_release(store, "r-bench", str(root / "checkpoints"), architecture=args.architecture)
        folder = open_store(store).pull_release("r-bench", root / "cache")
        before = in_process_loop(paths, folder, 1.0, args.batch_size)
        ray.init(num_cpus=args.num_cpus, include_dashboard=False, log_to_driver=False, logging_level="ERROR")
        try:
            cfg = EmbedConfig(input=str(root / "images"), output=str(root / "out"), store=store, release="r-bench",
                              batch_size=args.batch_size, decode_batch_size=args.batch_size,
                              shard_size=args.shard_size, store_settings={"cache_dir": str(root / "cache")})
            summary = run_embed(cfg)
        finally:
            ray.shutdown()
        after = in_process_loop(paths, folder, 1.0, args.batch_size)
    loop = (before + after) / 2  # the loop runs before and after the job: a shared machine's load drifts
    print(summary.line())
    print(f"in-process loop: {loop:.1f} images/s (before {before:.1f}, after {after:.1f}); Ray Data job: "
          f"{summary.images_per_s:.1f} images/s end to end ({args.images} images of {args.image_size} px, "
          f"batch {args.batch_size}, {args.architecture or 'shipped po-tiny-rn'}, {args.num_cpus} Ray CPUs)")
    print(f"job / loop = {summary.images_per_s / loop:.2f}  (target ≥ 0.7)")

if __name__ == "__main__":
    main()
