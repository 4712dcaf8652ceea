"""Streaming a sharded dataset into a Ray Train worker vs decoding it into memory, side by side.

Builds two typographic datasets from rendered shapes, of N and 8N source images (each with
one attacked copy, so 2N and 16N records, in Parquet shards), and trains the shipped base
model on each for the same steps in a 1-worker TorchTrainer on a local 2-CPU Ray cluster,
once in memory (`data.streaming: false`) and once streamed (`true`: Ray Data reads and
decodes the shards in CPU tasks beside the worker, each row with its π_ref from the dataset's
π_ref cache, computed once before: its seconds are printed apart). It prints the worker's peak RSS for each
(streamed, N and 8N should be within 1.25× of each other; in memory it grows with the data),
and the training steps/s of streaming ÷ in memory (target ≥ 0.8).

    .venv/bin/python benchmarks/data_bench.py [--n 500] [--steps 60]
"""
import argparse
import logging
import tempfile
import time
from pathlib import Path

import numpy as np
from PIL import Image

from po_cluster.config import ReportingConfig, ScalingConfig, TrainJobConfig, parse_config
from po_cluster.data import world
from po_cluster.data.typographic import TypographicConfig, build_typographic


def make_dataset(root: Path, n: int) -> str:
    """n rendered shapes in class folders, built into a sharded typographic dataset."""
    rng = np.random.default_rng(0)
    for i in range(n):
        shape = i % len(world.SHAPES)
        folder = root / "src" / world.SHAPES[shape]
        folder.mkdir(parents=True, exist_ok=True)
        Image.fromarray(world.render(shape, None, rng)).save(folder / f"{i}.png")
    out = root / "ds"
    build_typographic(TypographicConfig(source=str(root / "src"), out=str(out), image_size=world.IMAGE_SIZE,
                                        splits=(0.9, 0.05, 0.05), workers=2))
    return str(out)


def train(dataset: str, streaming: bool, steps: int, storage: Path, data_cpus: float) -> dict:
    from po_cluster.data.selection import prompt_template
    from po_cluster.sweep.trial import fit_trial
    from po_cluster.train.ref_cache import ensure_ref_cache

    run = parse_config({"data": {"dataset": dataset, "streaming": streaming, "n_pairs": 1 << 30,
                                 "n_reg": 1 << 30, "n_val": 64},
                        "training": {"steps": steps, "batch_size": 64, "reg_batch_size": 64}})
    scaling = ScalingConfig(num_workers=1, cpus_per_worker=1, data_cpus=data_cpus)
    started = time.perf_counter()
    # Streamed: the dataset's π_ref cache, once per dataset and base (fit_trial would compute it the same way).
    cached = streaming and ensure_ref_cache(run, scaling, prompt_template(run.data)) is not None
    ref_seconds = time.perf_counter() - started if cached else float("nan")
    worker = TrainJobConfig(run=run, reporting=ReportingConfig(report_every=steps, checkpoint_every=steps))
    result = fit_trial(worker, scaling, str(storage), f"bench-{time.time_ns()}", 0)
    return {**result.metrics, "ref_cache_seconds": ref_seconds}


def main() -> None:
    import ray

    parser = argparse.ArgumentParser()
    parser.add_argument("--n", type=int, default=500, help="source images of the small dataset (8× for the large)")
    parser.add_argument("--steps", type=int, default=60)
    parser.add_argument("--data-cpus", type=float, default=0.5, help="CPUs each Ray Data task asks (scaling.data_cpus)")
    args = parser.parse_args()
    logging.getLogger().setLevel(logging.ERROR)
    with tempfile.TemporaryDirectory(prefix="po-data-bench-") as tmp:
        root = Path(tmp)
        datasets = {n: make_dataset(root / str(n), n) for n in (args.n, 8 * args.n)}
        ray.init(num_cpus=2, include_dashboard=True, log_to_driver=False, logging_level="ERROR")
        try:
            rows = {(n, streaming): train(path, streaming, args.steps, root / "runs", args.data_cpus)
                    for n, path in datasets.items() for streaming in (False, True)}
        finally:
            ray.shutdown()
    print(f"{'source images':>14} {'records':>8} {'mode':>10} {'peak RSS MB':>12} {'π_ref cache s':>14} "
          f"{'data prep s':>12} {'steps/s':>8}")
    for (n, streaming), m in rows.items():
        print(f"{n:>14} {2 * n:>8} {'streamed' if streaming else 'in memory':>10} {m['peak_rss_mb']:>12.0f} "
              f"{m['ref_cache_seconds']:>14.1f} {m['time_data_prep']:>12.1f} {m['steps_per_second']:>8.2f}")
    small, large = args.n, 8 * args.n
    for streaming in (False, True):
        ratio = rows[large, streaming]["peak_rss_mb"] / rows[small, streaming]["peak_rss_mb"]
        print(f"peak RSS {8}N ÷ N, {'streamed' if streaming else 'in memory'}: {ratio:.2f}"
              + ("  (target ≤ 1.25)" if streaming else ""))
    for n in (small, large):
        speed = rows[n, True]["steps_per_second"] / rows[n, False]["steps_per_second"]
        print(f"steps/s streamed ÷ in memory, {n} source images: {speed:.2f}  (target ≥ 0.8)")


if __name__ == "__main__":
    main()
