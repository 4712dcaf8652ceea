"""A randomly initialised ViT-B-32 trains on CPU through the tiny model's code path, from a JSONL pairs file."""
import json
import math

import numpy as np
import pytest
import torch
from PIL import Image

from po_cluster.config import parse_config
from po_cluster.data import world
from po_cluster.data.selection import build_records, prompt_template
from po_cluster.train.loop import build_model, fit, prepare_data

pytestmark = pytest.mark.slow
SHAPES = ("circle", "square", "star")  # three candidate classes


@pytest.fixture(scope="module")
def pairs_file(tmp_path_factory):
    """Four 64-px shapes with another shape's name on them; the loader resizes them to 224."""
    root = tmp_path_factory.mktemp("pairs")
    rng = np.random.default_rng(2)
    rows = []
    for i, (shape, word) in enumerate([(0, 1), (1, 2), (2, 0), (0, 2)]):
        image = world.render(world.SHAPES.index(SHAPES[shape]), world.SHAPES.index(SHAPES[word]), rng)
        Image.fromarray(image).save(root / f"{i}.png")
        rows.append({"image": f"{i}.png", "chosen": f"a photo of a {SHAPES[shape]}.",
                     "rejected": f"a photo of a {SHAPES[word]}."})
    (root / "pairs.jsonl").write_text("".join(json.dumps(row) + "\n" for row in rows))
    return root / "pairs.jsonl"


def _one_step(pairs_file, image_tower: str):
    cfg = parse_config({
        "model": {"name": "ViT-B-32", "pretrained": None, "image_tower": image_tower},
        "data": {"dataset": str(pairs_file), "n_pairs": 4, "n_reg": 4},
        "optimizer": {"lr": 1e-4, "spectral_lr": 1e-2, "warmup_steps": 0},
        "training": {"steps": 1, "batch_size": 2, "reg_batch_size": 2, "device": "cpu"},
    })
    torch.manual_seed(0)
    model = build_model(cfg, torch.device("cpu"))
    pref, reg = build_records(cfg.data)
    assert pref.images.shape[1:] == (224, 224, 3) and len(pref.classnames) == 3
    data = prepare_data(model, pref, reg, prompt_template(cfg.data))
    before = {name: p.detach().clone() for name, p in model.named_parameters()}
    result = fit(model, data, cfg)
    changed = {name for name, p in model.named_parameters() if not torch.equal(p, before[name])}
    return model, data, result, changed


def test_full_fine_tuning_step(pairs_file):
    model, data, result, changed = _one_step(pairs_file, "full")
    assert data.pref_emb is None  # a trainable tower is run on pixels each step
    assert math.isfinite(result.last_metrics["loss"])
    assert any(name.startswith("clip.visual.") for name in changed)
    assert any(name.startswith("spectral.") for name in changed)
    assert not any(name.startswith(("clip.transformer.", "clip.token_embedding")) for name in changed)


def test_spectral_only_step(pairs_file):
    model, data, result, changed = _one_step(pairs_file, "frozen")
    assert data.pref_emb is not None and data.pref_emb.shape == (4, 512)  # cached f(x)
    assert math.isfinite(result.last_metrics["loss"])
    assert changed and all(name.startswith("spectral.") for name in changed)
