"""Webdataset tar shards as img2dataset writes them, for the data and embed tests."""
from __future__ import annotations

from pathlib import Path


def write_shards(folder: Path, shards: list[list[dict]]) -> list[Path]:
    """folder/<n:05d>.tar, one per list of samples ({"__key__": …, "png": bytes, "cls": "circle", …}), written by
    webdataset's TarWriter (img2dataset's writer), with img2dataset's .parquet and _stats.json beside each."""
    import webdataset

    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for number, samples in enumerate(shards):
        path = folder / f"{number:05d}.tar"
        with webdataset.TarWriter(str(path)) as writer:
            for sample in samples:
                writer.write(sample)
        (folder / f"{number:05d}.parquet").write_bytes(b"PAR1")  # not a sample: ignored by the readers
        (folder / f"{number:05d}_stats.json").write_text("{}")
        paths.append(path)
    return paths
