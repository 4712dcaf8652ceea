"""Small labelled image sets made with the typo-shapes renderer, for the data tests."""
from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image

from po_cluster.data import world

CLASSES = ("circle", "square", "triangle", "star")


def labelled_folder(root: Path, per_class: int = 2, classes: tuple[str, ...] = CLASSES,
                    sizes: tuple[tuple[int, int], ...] = ((64, 64), (80, 56))) -> Path:
    """root/<class>/<i>.png: clean shapes of varying sizes (not square, to exercise the crop)."""
    rng = np.random.default_rng(0)
    for name in classes:
        (root / name).mkdir(parents=True, exist_ok=True)
        for i in range(per_class):
            shape = world.SHAPES.index(name)
            image = Image.fromarray(world.render(shape, None, rng, size=64))
            image.resize(sizes[i % len(sizes)]).save(root / name / f"{i}.png")
    return root


def tree_bytes(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def built_rows(out: Path) -> tuple[list[dict], list[dict]]:
    """A built dataset's (pair rows, regularisation rows), read from its shards as dataset.json lists them."""
    import json

    from po_cluster.data.shards import read_shards

    rows = read_shards(str(out), json.loads((out / "dataset.json").read_text())["shards"])
    return [r for r in rows if r["kind"] == "pair"], [r for r in rows if r["kind"] == "regularization"]


def row_image(row: dict) -> Image.Image:
    import io

    return Image.open(io.BytesIO(row["image"]))
