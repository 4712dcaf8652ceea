"""What a frozen tower's stream saves by decoding no image, side by side in one run.

With `image_tower: frozen` and the dataset's π_ref cache, a streamed step's input is each row's
cached f(x), so the Ray Data tasks that read the shards decode no image (po_cluster/data/
stream_rows.py, `pixels`). This builds a typographic dataset of N rendered shapes (2N records, in
Parquet shards) and its π_ref cache, then times what one read task does, every shard read and
checked against dataset.json, with and without decoding its images, alternated `--rounds` times
in this one process: the CPU a frozen-tower stream no longer spends beside its training step.

    .venv/bin/python benchmarks/frozen_stream_bench.py [--n 400] [--rounds 3]
"""
import argparse
import logging
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from data_bench import make_dataset

from po_cluster.config import parse_config
from po_cluster.data.selection import prompt_template
from po_cluster.data.stream_rows import dataset_meta, image_size, read_numbered_shards
from po_cluster.train.loop import build_model
from po_cluster.train.ref_cache import ref_cache


def read_all(dataset: str, meta: dict, manifest: dict, pixels: bool) -> tuple[float, int]:
    """Seconds to read every shard's pairs as a read task does, and the rows read."""
    started = time.process_time()
    rows = read_numbered_shards({"shard": np.arange(len(meta["shards"]))}, dataset, meta, "pair", False,
                                image_size(meta), manifest, pixels)
    return time.process_time() - started, len(rows["chosen"])


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--n", type=int, default=400, help="source images")
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()
    logging.getLogger().setLevel(logging.ERROR)
    torch.set_num_threads(1)  # as a Ray Data task with 1 CPU
    with tempfile.TemporaryDirectory(prefix="po-frozen-stream-") as tmp:
        dataset = make_dataset(Path(tmp), args.n)
        run = parse_config({"data": {"dataset": dataset, "streaming": True}, "model": {"image_tower": "frozen"}})
        manifest = ref_cache(build_model(run, torch.device("cpu")), run, prompt_template(run.data))
        assert manifest is not None, "the π_ref cache could not be written"
        meta = dataset_meta(dataset)
        times: dict[bool, list[float]] = {True: [], False: []}
        for _ in range(args.rounds):
            for pixels in (True, False):
                seconds, rows = read_all(dataset, meta, manifest, pixels)
                times[pixels].append(seconds)
    with_images, without = statistics.median(times[True]), statistics.median(times[False])
    print(f"{len(meta['shards'])} shards, {rows} train pairs; CPU seconds of the read tasks, median of "
          f"{args.rounds} alternated rounds:")
    rounds = {pixels: ", ".join(f"{t:.2f}" for t in times[pixels]) for pixels in (True, False)}
    print(f"  decoding images (full tower, or no cache): {with_images:.2f} s  ({rounds[True]})")
    print(f"  no images (frozen tower with the cache):   {without:.2f} s  ({rounds[False]})")
    print(f"no images ÷ decoding: {without / with_images:.2f}")


if __name__ == "__main__":
    main()
