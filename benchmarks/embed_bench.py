"""Batch-embedding benchmark: the Ray Data job (po_cluster/embed/job.py) against a plain in-process loop.

    .venv/bin/python benchmarks/embed_bench.py [--images 6000] [--batch-size 64] [--num-cpus 2]
        [--concurrency 2] [--actor-num-cpus 0.5] [--architecture ViT-B-32] [--image-size 64]

Both read the same PNG files, decode them with the same rules, and run the same
release (the shipped base model, or an open_clip architecture with random
weights: no download) with the same batch size. The loop is one process, timed
with 1 torch thread and with --num-cpus threads, before and after the job (a
shared machine's load drifts); the reference is the better setting's mean.

The job runs on a fresh local Ray with --num-cpus CPUs, as `ray job submit`
would: its worker processes start cold. Printed:
  - end to end: the images over the whole job's time: the driver's release
    check and listing, worker and actor start-up (imports, model load), the
    pipeline and the shard files;
  - sustained: from the first shard file written to the last, what a long job
    runs at once started. (While the model is the slower stage, as here,
    images decoded during the start-up cannot flatter it: the actors bound it.)
Each relative to the loop (target ≥ 0.7). The defaults split 2 CPUs into one
decoding slot and two single-threaded model actors of half a CPU each.
"""
from __future__ import annotations

import argparse
import logging
import tempfile
import time
from pathlib import Path

import numpy as np


def write_images(folder: Path, n: int, size: int) -> list[Path]:
    """n typo-shapes images as PNG files."""
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
    """images/s of read → decode (the job's rules) → f(x) → W(t) with ReleaseModel, one batch at a time."""
    import torch

    from po_cluster.data.images import ImageLimitsConfig
    from po_cluster.embed.decode import decode_file
    from po_cluster.model.release import Knob, ReleaseModel

    release = ReleaseModel.load("bench", folder)
    limits, knob = ImageLimitsConfig(), Knob(t)
    start = time.perf_counter()
    with torch.no_grad():
        for begin in range(0, len(paths), batch_size):
            images = [decode_file(p.read_bytes(), limits) for p in paths[begin:begin + batch_size]]
            release.project(release.image_features(images), [knob] * len(images)).numpy()
    return len(paths) / (time.perf_counter() - start)


def run_job(args: argparse.Namespace, root: Path, store: str) -> tuple:
    """(summary, seconds from the start at which each shard file was written) of the job over every image."""
    import ray

    from po_cluster.embed.job import EmbedConfig, run_embed

    cfg = EmbedConfig(input=str(root / "images"), output=str(root / "out"), store=store, release="r-bench",
                      batch_size=args.batch_size, decode_batch_size=args.batch_size, shard_size=args.shard_size,
                      concurrency=args.concurrency, actor_num_cpus=args.actor_num_cpus,
                      store_settings={"cache_dir": str(root / "cache")})
    written: list[tuple[float, int]] = []
    ray.init(num_cpus=args.num_cpus, include_dashboard=False, log_to_driver=False, logging_level="ERROR")
    start = time.perf_counter()
    try:
        summary = run_embed(cfg, on_shard=lambda r: written.append((time.perf_counter() - start, r.ok + r.failed)))
    finally:
        ray.shutdown()
    return summary, written


def loops(paths: list[Path], folder: Path, batch_size: int, num_cpus: int) -> dict[int, float]:
    """images/s of the loop with 1 torch thread and with num_cpus threads."""
    import torch

    default = torch.get_num_threads()
    rates = {}
    for threads in sorted({1, num_cpus}):
        torch.set_num_threads(threads)
        rates[threads] = in_process_loop(paths, folder, 1.0, batch_size)
    torch.set_num_threads(default)
    return rates


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--images", type=int, default=6000)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--shard-size", type=int, default=500)
    parser.add_argument("--num-cpus", type=int, default=2)
    parser.add_argument("--concurrency", type=int, default=2, help="model actors")
    parser.add_argument("--actor-num-cpus", type=float, default=0.5)
    parser.add_argument("--architecture", default=None, help="open_clip name with random weights (default: shipped)")
    parser.add_argument("--image-size", type=int, default=64, help="side of the generated images")
    args = parser.parse_args()
    logging.getLogger().setLevel(logging.ERROR)

    from po_cluster.serving.local import publish_example_release
    from po_cluster.store.artifacts import open_store

    with tempfile.TemporaryDirectory(prefix="embed-bench-") as tmp:
        root = Path(tmp)
        paths = write_images(root / "images", args.images, args.image_size)
        store = str(root / "store")
        publish_example_release(store, "r-bench", str(root / "checkpoints"), architecture=args.architecture)
        folder = open_store(store).pull_release("r-bench", root / "cache")
        before = loops(paths, folder, args.batch_size, args.num_cpus)
        summary, written = run_job(args, root, store)
        after = loops(paths, folder, args.batch_size, args.num_cpus)
    means = {threads: (before[threads] + after[threads]) / 2 for threads in before}
    threads = max(means, key=means.get)
    loop = means[threads]
    sustained = sum(n for _, n in written[1:]) / (written[-1][0] - written[0][0])
    print(summary.line())
    print(f"{args.images} images of {args.image_size} px, batch {args.batch_size}, "
          f"{args.architecture or 'shipped po-tiny-rn'}; Ray: {args.num_cpus} CPUs, {args.concurrency} model "
          f"actor(s) of {args.actor_num_cpus:g} CPU")
    runs = ", ".join(f"{n} thread(s) {before[n]:.1f} before / {after[n]:.1f} after" for n in before)
    print(f"in-process loop: {runs} → reference {loop:.1f} images/s ({threads} thread(s))")
    print(f"job end to end:  {summary.images_per_s:.1f} images/s ({summary.seconds:.1f} s, the first shard "
          f"written after {written[0][0]:.1f} s)   job / loop = {summary.images_per_s / loop:.2f}")
    print(f"job sustained:   {sustained:.1f} images/s   job / loop = {sustained / loop:.2f}   (target ≥ 0.7)")

if __name__ == "__main__":
    main()
