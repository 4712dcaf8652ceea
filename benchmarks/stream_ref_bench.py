"""What π_ref per batch costs a streamed run, apart from reading and decoding: side by side in one process.

The same `fit` on the same records, alternated for a few rounds: once from memory (π_ref computed
before the first step, as a run in memory does), once through the streaming source over those
records already decoded in memory (π_ref from θ_ref's tower at every step, as a streamed run does
without its dataset's π_ref cache, po_cluster/train/ref_cache.py; no Ray Data, no decode). The
ratio of the two is what the π_ref cache buys a trained tower's stream, and the most such a stream
can reach without it, whatever the reader does (benchmarks/data_bench.py measures the whole).

    .venv/bin/python benchmarks/stream_ref_bench.py [--steps 40] [--rounds 2] [--tower full]
"""
import argparse
import logging
import statistics
import time
from collections.abc import Iterator

import numpy as np
import torch

from po_cluster.config import parse_config
from po_cluster.data import world
from po_cluster.data.selection import build_records, prompt_template
from po_cluster.train.loop import build_model, fit, prepare_data
from po_cluster.train.stream import StreamSource


def batches(images: np.ndarray, size: int, seed: int, **columns: np.ndarray) -> Iterator[dict[str, np.ndarray]]:
    """Seeded batches of records held in memory, forever: a stream with nothing to read or decode."""
    rng = np.random.default_rng(seed)
    while True:
        rows = rng.choice(len(images), size, replace=False)
        yield {"image": images[rows], **{name: values[rows] for name, values in columns.items()}}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--steps", type=int, default=40)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--tower", default="full", choices=["full", "frozen", "last_blocks"])
    args = parser.parse_args()
    logging.getLogger().setLevel(logging.ERROR)
    torch.set_num_threads(1)  # as a Ray Train worker with 1 CPU
    run = parse_config({"model": {"image_tower": args.tower}, "data": {"n_pairs": 512, "n_reg": 512},
                        "training": {"steps": args.steps, "batch_size": 64, "reg_batch_size": 64}})
    pref, reg = build_records(run.data)
    data = prepare_data(build_model(run, torch.device("cpu")), pref, reg, prompt_template(run.data))
    speed: dict[str, list[float]] = {"memory": [], "stream": []}
    for _ in range(args.rounds):
        for mode in speed:
            model = build_model(run, torch.device("cpu"))
            source = data if mode == "memory" else StreamSource(
                model, tuple(world.SHAPES), data.text_emb,
                batches(pref.images, 64, 0, chosen=pref.chosen, rejected=pref.rejected),
                batches(reg.images, 64, 1, label=np.zeros(len(reg.images), dtype=np.int64)))
            start = time.perf_counter()
            fit(model, source, run)
            speed[mode].append(args.steps / (time.perf_counter() - start))
    for mode, values in speed.items():
        print(f"{mode:>7}: {' / '.join(f'{v:.2f}' for v in values)} steps/s")
    ratio = statistics.median(speed["stream"]) / statistics.median(speed["memory"])
    print(f"π_ref per batch ({args.tower} tower): stream from memory ÷ memory = {ratio:.2f} (medians)")


if __name__ == "__main__":
    main()
