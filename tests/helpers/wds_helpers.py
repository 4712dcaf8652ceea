"""Webdataset tar shards as img2dataset writes them, for the data and embed tests."""
from __future__ import annotations

from pathlib import Path

from typo_helpers import labelled_folder

CORRUPT, UNLABELLED = 7, 12  # samples 7 (in shard 1) and 12 (in shard 2) of 15
LABEL_MEMBERS = ("cls", "json", "txt")  # shard n carries its labels in its own kind of member


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


def _label(kind: str, label: str) -> dict:
    if kind == "json":  # img2dataset's metadata, with the label as an added column
        return {"json": {"label": label, "url": "http://example.com/x.png", "status": "success"}}
    return {kind: label}


def shards_and_folder(root: Path) -> dict:
    """3 shards of 5 samples (keys numbered across shards, as img2dataset's), and the same labelled
    images as class folders <class>/<key>.png; the folder holds the corrupt image too (its class known),
    not the unlabelled one."""
    images = iter(sorted(labelled_folder(root / "rendered", per_class=4).glob("*/*.png")))
    shards: list[list[dict]] = [[], [], []]
    for i in range(15):
        number, key = i // 5, f"{i // 5:05d}{i % 5:04d}"
        path = None if i == CORRUPT else next(images)
        label, data = (path.parent.name, path.read_bytes()) if path else ("star", b"\x89PNG\r\n\x1a\ncut short")
        sample = {"__key__": key, "png": data}
        if i != UNLABELLED:
            sample |= _label(LABEL_MEMBERS[number], label)
            (root / "folder" / label).mkdir(parents=True, exist_ok=True)
            (root / "folder" / label / f"{key}.png").write_bytes(data)
        shards[number].append(sample)
    return {"shards": write_shards(root / "wds", shards), "folder": root / "folder"}
